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

/// The part of a source file before its unit tests (`#[cfg(test)]`), where
/// house rules about shipped code apply.
fn shipped_part(text: &str) -> &str {
    text.split("#[cfg(test)]").next().unwrap_or(text)
}

/// Config keys' variables are made from the key tables (`Key::env_name`,
/// `config::env_name`), never written by hand: a `LOGBOOK_*` name spelled
/// out in shipped code is one of the few variables that are not config
/// keys (the CLI's and the client library's own), and none of those may
/// shadow a key.
#[test]
fn env_names_come_from_the_key_tables() {
    // Not config keys: read by the CLI, the client library and the tests.
    const NOT_KEYS: &[&str] = &[
        "LOGBOOK_LOG",
        "LOGBOOK_API_SOCKET",
        "LOGBOOK_INGEST_SOCKET",
        "LOGBOOK_RUNTIME_DIR",
        "LOGBOOK_HUB_URL",
        "LOGBOOK_HUB_KEY",
        "LOGBOOK_HUB_CA_FILE",
        "LOGBOOK_ORG",
        "LOGBOOK_PROJECT",
    ];
    let keys: Vec<String> = logbook::agent::config::KEYS
        .iter()
        .chain(logbook::hub::config::KEYS)
        .map(|k| k.env_name())
        .collect();
    for name in NOT_KEYS {
        assert!(!keys.contains(&name.to_string()), "{name} is a config key");
    }
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut hand_written = Vec::new();
    for f in files {
        if f.ends_with("tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let code = shipped_part(&text)
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"));
        for line in code {
            let mut rest = line;
            while let Some(at) = rest.find("LOGBOOK_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                // `LOGBOOK_` alone is the prefix the tables' names are made with.
                if name != "LOGBOOK_" && !NOT_KEYS.contains(&name.as_str()) {
                    hand_written.push(format!("{}: {name}", f.display()));
                }
            }
        }
    }
    assert!(
        hand_written.is_empty(),
        "variable names written by hand instead of from a key table: {hand_written:?}"
    );
}

/// Unsafe code is denied crate-wide (`[lints]` in Cargo.toml); it is let in
/// only item by item, in the four modules ARCHITECTURE.md names, never for
/// a whole module.
#[test]
fn unsafe_code_only_in_the_audited_items() {
    const AUDITED: [&str; 4] = [
        "src/agent/ingest/mmsg.rs",
        "src/agent/memory.rs",
        "src/agent/store/insert.rs",
        "src/agent/systemd.rs",
    ];
    let map = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    for module in [
        "agent::ingest::mmsg",
        "agent::memory",
        "agent::store::insert",
        "agent::systemd",
    ] {
        assert!(map.contains(&format!("`{module}`")), "{module}");
    }
    let cargo = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    assert!(cargo.contains("unsafe_code = \"deny\""));
    assert!(cargo.contains("undocumented_unsafe_blocks = \"deny\""));
    let mut files = Vec::new();
    for dir in ["src", "tests", "examples"] {
        rust_files(&root().join(dir), &mut files);
    }
    for f in files {
        let rel = f.strip_prefix(root()).unwrap().to_str().unwrap().to_owned();
        if rel == "tests/tidy.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            !text.contains("#![allow(unsafe_code)]"),
            "{rel}: unsafe code is allowed item by item, not for a module"
        );
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if !line.contains("allow(unsafe_code)") || line.trim_start().starts_with("//") {
                continue;
            }
            assert!(
                AUDITED.contains(&rel.as_str()),
                "{rel}:{}: unsafe code outside the audited modules",
                i + 1
            );
            let item = lines[i + 1..]
                .iter()
                .map(|l| l.trim_start())
                .find(|l| !l.starts_with("#[") && !l.starts_with("//"))
                .unwrap_or("");
            assert!(
                !item.starts_with("mod ") && !item.starts_with("pub mod "),
                "{rel}:{}: unsafe code is allowed for a function or impl, not a module",
                i + 1
            );
        }
    }
}

/// The map names nothing that is gone: every crate path ARCHITECTURE.md
/// shows in backticks (`agent::sync::status`, `hub::serve`,
/// `agent::systemd::adopt::listener`) is a module of the tree, or an item
/// its module's files still mention.
#[test]
fn architecture_names_only_what_exists() {
    const TOP: [&str; 8] = [
        "agent", "hub", "client", "wire", "config", "dev", "exit", "prom",
    ];
    let map = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let src = root().join("src");
    let mut stale = Vec::new();
    for (i, span) in map.split('`').enumerate() {
        // Odd pieces are inside backticks.
        let path = span.trim_end_matches("()");
        let parts: Vec<&str> = path.split("::").collect();
        let is_path = i % 2 == 1
            && parts.len() > 1
            && TOP.contains(&parts[0])
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        if !is_path {
            continue;
        }
        // The longest prefix that is a module file, then the rest as items.
        let mut dir = src.clone();
        let mut module_files: Vec<PathBuf> = Vec::new();
        let mut rest = &parts[..];
        while let Some((first, tail)) = rest.split_first() {
            let file = dir.join(format!("{first}.rs"));
            let sub = dir.join(first);
            if file.is_file() {
                module_files = vec![file];
            } else if sub.join("mod.rs").is_file() {
                module_files = vec![sub.join("mod.rs")];
            } else {
                break;
            }
            dir = sub;
            rest = tail;
        }
        if module_files.is_empty() {
            stale.push(path.to_owned());
            continue;
        }
        // Items may sit in the module's own files below it, too.
        rust_files(&dir, &mut module_files);
        let text: String = module_files
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .collect();
        if rest.iter().any(|item| !text.contains(item)) {
            stale.push(path.to_owned());
        }
    }
    assert!(
        stale.is_empty(),
        "ARCHITECTURE.md names what the tree no longer has: {stale:?}"
    );
}

/// Every route a router declares with a literal path (`.route("/v1/logs",
/// …)`) is in ARCHITECTURE.md's route tables, so the map leads to each
/// route's handler in one hop.
#[test]
fn architecture_lists_every_route() {
    let map = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut routes = 0;
    let mut missing = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let mut rest = shipped_part(&text);
        while let Some(at) = rest.find(".route(") {
            rest = &rest[at + ".route(".len()..];
            let arg = rest.trim_start();
            let Some(lit) = arg.strip_prefix('"') else {
                continue; // a path built from constants, named in the map by them
            };
            let path = &lit[..lit.find('"').unwrap()];
            routes += 1;
            if !map.contains(&format!(" {path}`")) && !map.contains(&format!(" {path},")) {
                missing.push(format!("{}: {path}", f.display()));
            }
        }
    }
    assert!(routes > 20, "found only {routes} routes");
    assert!(
        missing.is_empty(),
        "routes missing from ARCHITECTURE.md's route tables: {missing:?}"
    );
}

/// Only wire, API and config types derive serde (ARCHITECTURE.md,
/// "Boundaries"): the files that may are listed there, and no other does.
#[test]
fn serde_types_only_where_the_map_says() {
    let map = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let boundaries = map
        .split("- **Boundaries.**")
        .nth(1)
        .and_then(|s| s.split("\n- **").next())
        .expect("ARCHITECTURE.md has a Boundaries concern");
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut stray = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let derives = shipped_part(&text).lines().any(|l| {
            l.trim_start().starts_with("#[derive(")
                && (l.contains("Serialize") || l.contains("Deserialize"))
        });
        if !derives {
            continue;
        }
        let rel = f
            .strip_prefix(root().join("src"))
            .unwrap()
            .with_extension("");
        let mut parts: Vec<&str> = rel.iter().map(|p| p.to_str().unwrap()).collect();
        if parts.last() == Some(&"mod") {
            parts.pop();
        }
        let module = parts.join("::");
        if !boundaries.contains(&format!("`{module}`")) {
            stray.push(module);
        }
    }
    assert!(
        stray.is_empty(),
        "serde derives in modules ARCHITECTURE.md's Boundaries does not list: {stray:?}"
    );
}
