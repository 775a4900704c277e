//! House rules kept true by a plain `cargo test`: every Rust file opens with
//! a `//!` line saying what it owns; the agent and the client library (linked
//! into robot programs) never name the hub, and the hub never names the
//! agent; ARCHITECTURE.md's code map names every module of the library.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_file_says_what_it_owns() {
    let mut files = Vec::new();
    for dir in ["src", "tests", "examples", "fuzz/fuzz_targets"] {
        rust_files(&root().join(dir), &mut files);
    }
    assert!(files.len() > 60, "{files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            text.starts_with("//!"),
            "{} must open with a //! line",
            f.display()
        );
    }
}

#[test]
fn agent_and_hub_never_name_each_other() {
    let check = |dir: &str, banned: [&str; 2]| {
        let mut files = Vec::new();
        rust_files(&root().join(dir), &mut files);
        assert!(!files.is_empty(), "{dir}");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for b in banned {
                assert!(!text.contains(b), "{} names {b}", f.display());
            }
        }
    };
    check("src/agent", ["crate::hub", "logbook::hub"]);
    check("src/client", ["crate::hub", "logbook::hub"]);
    check("src/hub", ["crate::agent", "logbook::agent"]);
}

/// A module is named when ARCHITECTURE.md shows its path (`agent::sync`)
/// or, inside its parent's entry, its own name (`uploader`) in backticks.
#[test]
fn architecture_names_every_module() {
    let map = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut missing = Vec::new();
    for f in files {
        let rel = f.strip_prefix(root().join("src")).unwrap();
        let name = rel.file_name().unwrap().to_str().unwrap();
        if rel.starts_with("bin") || name == "lib.rs" || name == "tests.rs" {
            continue;
        }
        let path = rel.with_extension("");
        let mut parts: Vec<&str> = path.iter().map(|p| p.to_str().unwrap()).collect();
        if parts.last() == Some(&"mod") {
            parts.pop();
        }
        let full = parts.join("::");
        let own = parts.last().unwrap();
        if !map.contains(&format!("`{full}")) && !map.contains(&format!("`{own}`")) {
            missing.push(full);
        }
    }
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md does not name {missing:?}"
    );
}
