//! House rules of the agent's part of the tree, kept true by a plain
//! `cargo test`: every file opens with a `//!` line saying what it owns, and
//! the agent never names the hub (they share only `wire` and `config`).

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn agent_files_say_what_they_own_and_never_name_the_hub() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src/agent"), &mut files);
    rust_files(&root.join("tests/agent"), &mut files);
    files.push(root.join("src/bin/logbookd.rs"));
    files.push(root.join("src/bin/logbook.rs"));
    files.push(root.join("examples/agent_bench.rs"));
    assert!(files.len() > 10);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            text.starts_with("//!"),
            "{} must open with a //! line",
            f.display()
        );
        if f.starts_with(root.join("src/agent")) {
            for banned in ["crate::hub", "logbook::hub"] {
                assert!(!text.contains(banned), "{} names {banned}", f.display());
            }
        }
    }
}
