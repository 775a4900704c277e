//! House rules for this area's files, kept true by a plain `cargo test`:
//! each opens with a `//!` line saying what it owns, and the client library
//! (linked into robot programs) never names the hub.

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
fn files_say_what_they_own_and_the_client_never_names_the_hub() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src/client"), &mut files);
    rust_files(&root.join("src/agent/formats"), &mut files);
    rust_files(&root.join("src/agent/ingest"), &mut files);
    rust_files(&root.join("tests/ingest"), &mut files);
    rust_files(&root.join("fuzz/fuzz_targets"), &mut files);
    for e in ["tracing_client", "formats_bench", "agent_bench"] {
        files.push(root.join(format!("examples/{e}.rs")));
    }
    assert!(files.len() > 15, "{files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            text.starts_with("//!"),
            "{} must open with a //! line",
            f.display()
        );
        if f.starts_with(root.join("src/client")) {
            for banned in ["crate::hub", "logbook::hub"] {
                assert!(!text.contains(banned), "{} names {banned}", f.display());
            }
        }
    }
}
