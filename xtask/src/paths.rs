//! Where things live, all derived from the project root.

use camino::{Utf8Path, Utf8PathBuf};

/// The workspace root: the parent of the xtask crate (matklad's `project_root()`).
pub fn project_root() -> Utf8PathBuf {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    let dir = Utf8PathBuf::from(manifest);
    dir.parent().map(Utf8Path::to_owned).unwrap_or(dir)
}

/// All local state of the tool: runs, builds, packages, images, generated targets.
pub fn state_dir(root: &Utf8Path) -> Utf8PathBuf {
    root.join("target").join("xtask")
}

pub fn runs_dir(root: &Utf8Path) -> Utf8PathBuf {
    state_dir(root).join("runs")
}

pub fn builds_dir(root: &Utf8Path) -> Utf8PathBuf {
    state_dir(root).join("builds")
}

pub fn packages_dir(root: &Utf8Path) -> Utf8PathBuf {
    state_dir(root).join("packages")
}

/// `path` relative to `root` when it lies inside it, for shorter messages.
pub fn display(root: &Utf8Path, path: &Utf8Path) -> String {
    path.strip_prefix(root).map(|p| p.to_string()).unwrap_or_else(|_| path.to_string())
}
