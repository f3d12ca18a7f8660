//! Archive path rules shared by `pack` and `verify`.
//!
//! Paths inside a package are relative, '/'-separated and free of `.`/`..`, so an
//! archive can never write outside the directory it is extracted into.

use std::collections::BTreeMap;

/// Maximum symlink hops while resolving a link target (Linux uses 40 too).
const MAX_LINK_HOPS: usize = 40;

/// Checks an archive path; returns a human-readable reason when it is unsafe.
///
/// Control characters and backslashes are refused as well because `sha256sum`
/// escapes them, which would break `sha256sum -c` on the cluster.
pub fn check_archive_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    if path.starts_with('/') {
        return Err("absolute paths are not allowed".into());
    }
    if let Some(c) = path.chars().find(|c| c.is_control() || *c == '\\') {
        return Err(format!("the path contains the forbidden character {c:?}"));
    }
    for component in path.split('/') {
        match component {
            "" => return Err("the path has an empty component (`//` or a trailing `/`)".into()),
            "." | ".." => return Err(format!("the path has a `{component}` component")),
            _ => {}
        }
    }
    Ok(())
}

/// Every proper ancestor directory of `path` ("a/b/c" → "a", "a/b").
pub fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

/// Directory holding `path` inside the package ("" for the root).
pub fn parent(path: &str) -> &str {
    path.rfind('/').map_or("", |i| &path[..i])
}

/// Why a symlink target is not acceptable.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkError {
    Empty,
    Absolute,
    Escapes,
    Loop,
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkError::Empty => "its target is empty",
            LinkError::Absolute => "its target is an absolute path",
            LinkError::Escapes => "its target leaves the package",
            LinkError::Loop => "it is part of a symlink loop",
        })
    }
}

/// Resolves the symlink at `link_path` with `target` inside the package root.
///
/// Other links in `links` (path → target) are followed, so `a -> b/..` cannot escape via
/// a link `b -> ..`. Dangling targets inside the package are fine. Returns the resolved path.
pub fn resolve_link(
    link_path: &str,
    target: &str,
    links: &BTreeMap<String, String>,
) -> Result<String, LinkError> {
    let mut stack: Vec<String> = split(parent(link_path));
    let mut hops = 0;
    walk(&mut stack, target, links, &mut hops)?;
    Ok(stack.join("/"))
}

fn split(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Applies `target` to the directory `stack`, following links found on the way.
fn walk(
    stack: &mut Vec<String>,
    target: &str,
    links: &BTreeMap<String, String>,
    hops: &mut usize,
) -> Result<(), LinkError> {
    if target.is_empty() {
        return Err(LinkError::Empty);
    }
    if target.starts_with('/') {
        return Err(LinkError::Absolute);
    }
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                stack.pop().ok_or(LinkError::Escapes)?;
            }
            name => {
                stack.push(name.to_owned());
                if let Some(next) = links.get(&stack.join("/")) {
                    *hops += 1;
                    if *hops > MAX_LINK_HOPS {
                        return Err(LinkError::Loop);
                    }
                    stack.pop();
                    walk(stack, next, links, hops)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_paths() {
        assert!(check_archive_path("bin/daphne").is_ok());
        assert!(check_archive_path("a.b/..c").is_ok());
        for bad in [
            "", "/etc/x", "../x", "a/../b", "a//b", "a/", "./a", "a\nb", "a\\b", "a\0b",
        ] {
            assert!(check_archive_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ancestors_and_parent() {
        assert_eq!(ancestors("a/b/c").collect::<Vec<_>>(), ["a", "a/b"]);
        assert_eq!(ancestors("a").count(), 0);
        assert_eq!(parent("a/b/c"), "a/b");
        assert_eq!(parent("a"), "");
    }

    #[test]
    fn links() {
        let none = BTreeMap::new();
        assert_eq!(
            resolve_link("lib/a.so", "a.so.1", &none),
            Ok("lib/a.so.1".into())
        );
        assert_eq!(resolve_link("bin/x", "../lib/y", &none), Ok("lib/y".into()));
        assert_eq!(resolve_link("x", "..", &none), Err(LinkError::Escapes));
        assert_eq!(
            resolve_link("a/x", "../../y", &none),
            Err(LinkError::Escapes)
        );
        assert_eq!(resolve_link("x", "/etc", &none), Err(LinkError::Absolute));
        assert_eq!(resolve_link("x", "", &none), Err(LinkError::Empty));
    }

    #[test]
    fn links_through_other_links() {
        // dir/s -> .. is the root, so t -> dir/s/../x would leave the package.
        let mut links = BTreeMap::new();
        links.insert("dir/s".to_owned(), "..".to_owned());
        assert_eq!(resolve_link("dir/s", "..", &links), Ok(String::new()));
        assert_eq!(
            resolve_link("t", "dir/s/../x", &links),
            Err(LinkError::Escapes)
        );
        let mut looped = BTreeMap::new();
        looped.insert("a".to_owned(), "b".to_owned());
        looped.insert("b".to_owned(), "a".to_owned());
        assert_eq!(resolve_link("a", "b", &looped), Err(LinkError::Loop));
    }
}
