//! What in an artifact directory is an artifact: the naming rules (hidden,
//! `*.tmp`, `*.part` ignored), refusal of symlinks, hard links, special
//! files and anything that resolves outside the directory, and a bounded
//! walk that never follows a link.
//!
//! Invariant: nothing here follows a symlink: entries are examined with
//! `lstat`/`file_type()`, files are opened with `O_NOFOLLOW`, and an opened
//! file is accepted only if it still is the entry that was examined and its
//! real path lies inside the artifact directory.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Deepest directory nesting walked inside one artifact directory.
const MAX_DEPTH: usize = 16;
/// Most entries one walk of one artifact directory looks at.
const MAX_ENTRIES: usize = 20_000;

/// One entry of an artifact directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A regular file that may be uploaded once complete.
    File {
        rel: String,
        size: u64,
        mtime_ns: i64,
    },
    /// Never uploaded; reported with the reason.
    Refused { rel: String, reason: String },
    /// A directory to walk (events inside it are watched too).
    Dir(PathBuf),
    /// Hidden, temporary, vanished: nothing to do.
    Ignored,
}

/// True for names the design says to leave alone: hidden files and
/// directories, and files still being written under a temporary name.
pub fn ignored_name(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".part")
}

/// Why a relative path cannot be an artifact name at the hub, if it cannot.
fn bad_name(rel: &str) -> Option<String> {
    if rel.len() > 1024 {
        return Some("path is longer than 1024 bytes".into());
    }
    if rel.chars().any(|c| c.is_control() || c == '\\') {
        return Some("name contains a control character or a backslash".into());
    }
    None
}

/// Examines `full`, which must lie under `root` (the artifact directory),
/// without following links.
pub fn examine(root: &Path, full: &Path) -> Entry {
    let Ok(rel_path) = full.strip_prefix(root) else {
        return Entry::Ignored;
    };
    let mut parts = Vec::new();
    for c in rel_path.components() {
        match c {
            Component::Normal(n) => parts.push(n),
            // `..` or an absolute component cannot come from a walk or an
            // event under `root`; refuse rather than guess.
            _ => return Entry::Ignored,
        }
    }
    if parts.is_empty() {
        return Entry::Ignored;
    }
    let mut names = Vec::with_capacity(parts.len());
    for p in &parts {
        let Some(s) = p.to_str() else {
            let rel = rel_path.to_string_lossy().into_owned();
            return Entry::Refused {
                rel,
                reason: "name is not UTF-8".into(),
            };
        };
        if ignored_name(s) {
            return Entry::Ignored;
        }
        names.push(s);
    }
    let rel = names.join("/");
    let Ok(meta) = std::fs::symlink_metadata(full) else {
        return Entry::Ignored;
    };
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Entry::Refused {
            rel,
            reason: "symlink (never followed)".into(),
        };
    }
    if ft.is_dir() {
        return Entry::Dir(full.to_owned());
    }
    if !ft.is_file() {
        return Entry::Refused {
            rel,
            reason: "not a regular file".into(),
        };
    }
    if meta.nlink() > 1 {
        // A hard link can make a file from elsewhere (even one this user
        // may only read) appear inside the directory.
        return Entry::Refused {
            rel,
            reason: "hard link (the file has other names)".into(),
        };
    }
    if let Some(reason) = bad_name(&rel) {
        return Entry::Refused { rel, reason };
    }
    Entry::File {
        rel,
        size: meta.len(),
        mtime_ns: mtime_ns(&meta),
    }
}

pub fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

/// Every entry under `root`, depth-first, bounded in depth and count.
pub fn walk(root: &Path) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_owned(), 0usize)];
    let mut seen = 0usize;
    while let Some((dir, depth)) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            seen += 1;
            if seen > MAX_ENTRIES {
                tracing::warn!(
                    "{} holds more than {MAX_ENTRIES} entries; the rest wait for the next scan",
                    root.display()
                );
                return out;
            }
            match examine(root, &e.path()) {
                Entry::Dir(d) if depth < MAX_DEPTH => stack.push((d, depth + 1)),
                Entry::Dir(d) => out.push(Entry::Refused {
                    rel: d
                        .strip_prefix(root)
                        .unwrap_or(&d)
                        .to_string_lossy()
                        .into_owned(),
                    reason: format!("nested deeper than {MAX_DEPTH} directories"),
                }),
                Entry::Ignored => {}
                other => out.push(other),
            }
        }
    }
    out
}

/// Opens `root/rel` for reading, refusing links and anything whose real
/// path is not inside `root` (a directory swapped for a symlink between
/// the scan and the open).
pub fn open_inside(root: &Path, rel: &str) -> std::io::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags};
    let full = root.join(rel);
    let fd = rustix::fs::open(
        &full,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .map_err(std::io::Error::from)?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata()?;
    if !meta.is_file() || meta.nlink() > 1 {
        return Err(std::io::Error::other(
            "not a regular file with a single name",
        ));
    }
    let real = std::fs::read_link(format!("/proc/self/fd/{}", {
        use std::os::fd::AsRawFd;
        file.as_raw_fd()
    }))?;
    let root_real = std::fs::canonicalize(root)?;
    if !real.starts_with(&root_real) {
        return Err(std::io::Error::other(format!(
            "resolves to {} outside the artifact directory",
            real.display()
        )));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let check = |name: &str, ignored: bool| assert_eq!(ignored_name(name), ignored, "{name}");
        check("run.mcap", false);
        check("photo.png", false);
        check(".hidden", true);
        check(".git", true);
        check("bag.tmp", true);
        check("bag.mcap.part", true);
        check("tmp", false);
        check("part.txt", false);
    }

    #[test]
    fn walk_refuses_links_and_skips_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("artifacts");
        std::fs::create_dir_all(root.join("sub/.hid")).unwrap();
        std::fs::write(root.join("a.txt"), b"abc").unwrap();
        std::fs::write(root.join("sub/b.bin"), b"12345").unwrap();
        std::fs::write(root.join("sub/.hid/c"), b"x").unwrap();
        std::fs::write(root.join("w.part"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::fs::write(dir.path().join("other"), b"o").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("dirlink")).unwrap();
        std::fs::hard_link(dir.path().join("secret"), root.join("hard")).unwrap();
        let mut got: Vec<String> = walk(&root)
            .into_iter()
            .map(|e| match e {
                Entry::File { rel, size, .. } => format!("file {rel} {size}"),
                Entry::Refused { rel, reason } => {
                    format!("refused {rel} {}", reason.split(' ').next().unwrap())
                }
                other => format!("{other:?}"),
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                "file a.txt 3",
                "file sub/b.bin 5",
                "refused dirlink symlink",
                "refused hard hard",
                "refused link symlink",
            ]
        );
        assert!(open_inside(&root, "a.txt").is_ok());
        assert!(open_inside(&root, "link").is_err());
        // The last component is a plain file; the directory above it is
        // the link, which the real-path check catches.
        assert!(open_inside(&root, "dirlink/other").is_err());
        assert!(open_inside(&root, "hard").is_err());
    }
}
