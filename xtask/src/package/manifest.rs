//! `manifest.json` and `SHA256SUMS`: the package's self-description.
//!
//! The manifest lists every packed file with its sha256, so hashing the manifest bytes
//! identifies the whole payload before anything is compressed.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Version of the manifest layout; bump when a field changes meaning.
pub const MANIFEST_FORMAT: u32 = 1;
/// Name of the manifest inside the package (always the first archive entry).
pub const MANIFEST_NAME: &str = "manifest.json";
/// Name of the coreutils checksum list inside the package (second archive entry).
pub const SUMS_NAME: &str = "SHA256SUMS";

/// Reference to the container image the payload runs in.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub hash: String,
    pub sif_remote_path: String,
    pub included: bool,
}

/// One packed file (regular file or symlink); directories are not listed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub path: String,
    pub size: u64,
    /// Normalised octal mode: "0755", "0644", or "0777" for symlinks.
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

/// The package description stored as `manifest.json`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub format: u32,
    pub tool_version: String,
    pub source_commit: String,
    pub source_dirty: bool,
    pub image: Option<ImageRef>,
    pub target: String,
    pub created: u64,
    /// Sorted by `path` (byte order), so serialisation is deterministic.
    pub files: Vec<FileRecord>,
}

impl FileRecord {
    /// Record for a regular file; `executable` selects 0755 over 0644.
    pub fn regular(path: &str, size: u64, executable: bool, sha256: String) -> Self {
        FileRecord {
            path: path.to_owned(),
            size,
            mode: mode_string(file_mode(executable)),
            sha256: Some(sha256),
            link_target: None,
        }
    }

    /// Record for a symlink (size 0, mode 0777 as tar stores them).
    pub fn symlink(path: &str, target: &str) -> Self {
        FileRecord {
            path: path.to_owned(),
            size: 0,
            mode: mode_string(SYMLINK_MODE),
            sha256: None,
            link_target: Some(target.to_owned()),
        }
    }
}

/// Directory mode inside the package.
pub const DIR_MODE: u32 = 0o755;
/// Mode stored for symlinks (the value is ignored by extractors, but must be stable).
pub const SYMLINK_MODE: u32 = 0o777;

/// Normalised file mode: executables stay executable for everyone, the rest is 0644.
pub fn file_mode(executable: bool) -> u32 {
    if executable {
        0o755
    } else {
        0o644
    }
}

/// Octal text form used in the manifest ("0755").
pub fn mode_string(mode: u32) -> String {
    format!("{mode:04o}")
}

impl Manifest {
    /// Pretty JSON with a trailing newline; the exact bytes define the content hash.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut bytes =
            serde_json::to_vec_pretty(self).context("cannot serialise manifest.json")?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    /// Parses and sanity-checks a manifest read from a package.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let manifest: Manifest = serde_json::from_slice(bytes)
            .context("manifest.json is not valid JSON for this xtask version")?;
        if manifest.format != MANIFEST_FORMAT {
            bail!(
                "manifest.json has format {} but this xtask understands format {}; \
                 use the xtask version that built the package",
                manifest.format,
                MANIFEST_FORMAT
            );
        }
        for record in &manifest.files {
            match (&record.sha256, &record.link_target) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => bail!(
                    "manifest.json entry {} must have exactly one of sha256 or link_target",
                    record.path
                ),
            }
        }
        Ok(manifest)
    }

    /// `sha256sum` listing of every regular file plus manifest.json itself, sorted by path.
    ///
    /// Lets the cluster side check an extracted package with plain coreutils.
    pub fn sha256sums(&self, manifest_sha256: &str) -> String {
        let mut lines: Vec<(&str, &str)> = self
            .files
            .iter()
            .filter_map(|f| f.sha256.as_deref().map(|sha| (f.path.as_str(), sha)))
            .collect();
        lines.push((MANIFEST_NAME, manifest_sha256));
        lines.sort_unstable();
        lines
            .iter()
            .map(|(path, sha)| format!("{sha}  {path}\n"))
            .collect()
    }
}

/// Lower-case hex of a byte slice.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// sha256 hex of an in-memory buffer.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            tool_version: "0.1.0".into(),
            source_commit: "abc".into(),
            source_dirty: false,
            image: None,
            target: "x86_64".into(),
            created: 7,
            files: vec![
                FileRecord::regular("bin/a", 3, true, "aa".into()),
                FileRecord::symlink("lib/l.so", "l.so.1"),
                FileRecord::regular("lib/l.so.1", 1, false, "bb".into()),
            ],
        }
    }

    #[test]
    fn round_trips_and_omits_absent_fields() {
        let m = sample();
        let bytes = m.to_bytes().unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("\"image\": null"));
        assert!(text.contains("\"link_target\": \"l.so.1\""));
        assert_eq!(text.matches("sha256").count(), 2);
        assert_eq!(Manifest::from_bytes(&bytes).unwrap(), m);
    }

    #[test]
    fn sums_cover_regular_files_and_manifest_sorted() {
        let sums = sample().sha256sums("mm");
        assert_eq!(sums, "aa  bin/a\nbb  lib/l.so.1\nmm  manifest.json\n");
    }

    #[test]
    fn rejects_unknown_format_and_ambiguous_records() {
        let mut m = sample();
        m.format = 2;
        let err = Manifest::from_bytes(&m.to_bytes().unwrap()).unwrap_err();
        assert!(format!("{err:#}").contains("format 2"));
        let mut m = sample();
        m.files[0].link_target = Some("x".into());
        let err = Manifest::from_bytes(&m.to_bytes().unwrap()).unwrap_err();
        assert!(format!("{err:#}").contains("bin/a"));
    }
}
