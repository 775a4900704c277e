//! Configuration loading shared by `logbookd` and `logbook-hub`, in two
//! stages: [`load`] merges raw values (TOML file, then `LOGBOOK_*`
//! environment variables) and checks every key against a table of known
//! [`Key`]s; each side then deserializes the merged table into its own typed
//! config and resolves it (paths, durations).
//!
//! Invariant: the table of keys is the single source of truth. Environment
//! variable names are derived from it ([`Key::env_name`]); a key missing from
//! it cannot be set anywhere.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// The type a key's value must have. Values are normalized while merging,
/// so the typed config sees `Bytes` as an integer and `Secs` as a float.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Str,
    Bool,
    U64,
    /// A byte size: an integer, or a string like `256MiB`, `64KiB`, `1GB`.
    Bytes,
    /// A duration in seconds: a number, or a string like `500ms`, `2s`, `5m`.
    Secs,
    /// One of the listed strings.
    Choice(&'static [&'static str]),
    /// A list of strings.
    List,
}

/// One configuration key, `section.key`.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    pub section: &'static str,
    pub key: &'static str,
    pub kind: Kind,
    /// One line for `--help`-style listings.
    pub doc: &'static str,
}

impl Key {
    /// `buffer.max_bytes` -> `LOGBOOK_BUFFER_MAX_BYTES`.
    pub fn env_name(&self) -> String {
        format!(
            "LOGBOOK_{}_{}",
            self.section.to_ascii_uppercase(),
            self.key.to_ascii_uppercase()
        )
    }

    pub fn dotted(&self) -> String {
        format!("{}.{}", self.section, self.key)
    }
}

/// The environment variable of `section.key` in `keys`, for code that sets
/// one (`logbook dev` wiring its agent). Panics on a key the table does not
/// have: a typo here is a programming error that the first run shows.
pub fn env_name(keys: &[Key], section: &str, key: &str) -> String {
    keys.iter()
        .find(|k| k.section == section && k.key == key)
        .unwrap_or_else(|| panic!("no config key {section}.{key}"))
        .env_name()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Syntax { file: PathBuf, message: String },
    #[error("{origin}: {message}")]
    Key { origin: String, message: String },
}

/// Merges `file` (if given and present; `required` makes a missing file an
/// error) and the environment `env` over the defaults of `T`, checks every
/// key against `keys`, and deserializes. Unknown keys and wrongly typed
/// values are refused with a one-line message naming the key and where it
/// came from.
pub fn load<T: DeserializeOwned>(
    keys: &[Key],
    file: Option<&Path>,
    required: bool,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let mut text = None;
    if let Some(path) = file {
        match std::fs::read_to_string(path) {
            Ok(t) => text = Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {}
            Err(source) => {
                return Err(ConfigError::Read {
                    file: path.to_owned(),
                    source,
                })
            }
        }
    }
    let origin = file.map(|p| p.display().to_string());
    load_text(keys, text.as_deref(), origin.as_deref(), env)
}

/// [`load`] with the file's `text` in hand (`origin` names it in errors).
pub fn load_text<T: DeserializeOwned>(
    keys: &[Key],
    text: Option<&str>,
    origin: Option<&str>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let mut merged = toml::Table::new();
    if let Some(text) = text {
        let file = origin.unwrap_or("configuration");
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    file: PathBuf::from(file),
                    message: e.message().to_owned(),
                })?;
        merge_file(keys, &table, file, &mut merged)?;
    }
    let env: std::collections::HashMap<String, String> = env.into_iter().collect();
    for key in keys {
        let name = key.env_name();
        if let Some(raw) = env.get(&name) {
            let value = parse_env(key, raw).map_err(|message| ConfigError::Key {
                origin: format!("environment variable {name}"),
                message,
            })?;
            set(&mut merged, key, value);
        }
    }
    T::deserialize(toml::Value::Table(merged)).map_err(|e| ConfigError::Key {
        origin: origin.unwrap_or("configuration").to_owned(),
        message: e.to_string().trim().to_owned(),
    })
}

/// The fuzz entry point of configuration loading (fuzz target `config`):
/// `data` as a config file of the key table `keys`, and its first line as
/// the environment value of every key. Returns the typed config when both
/// load; never panics; every refusal is one line.
pub fn fuzz_one<T: DeserializeOwned>(keys: &[Key], data: &[u8]) -> Option<T> {
    let text = String::from_utf8_lossy(data);
    let one_line = |e: &ConfigError| {
        let m = e.to_string();
        // A TOML syntax error may quote the line it is on, which is the
        // file's own text; the message itself stays on one line.
        if !matches!(e, ConfigError::Syntax { .. }) {
            assert!(!m.trim_end().contains('\n'), "{m:?}");
        }
    };
    let _ = parse_bytes(&text);
    let _ = parse_secs(&text);
    let first = text.lines().next().unwrap_or("").to_owned();
    for key in keys {
        let env = [(key.env_name(), first.clone())];
        if let Err(e) = load_text::<T>(keys, None, None, env) {
            one_line(&e);
        }
    }
    load_text::<T>(keys, Some(&text), Some("fuzz.toml"), [])
        .map_err(|e| one_line(&e))
        .ok()
}

/// Loads from the real process environment.
pub fn load_from_env<T: DeserializeOwned>(
    keys: &[Key],
    file: Option<&Path>,
    required: bool,
) -> Result<T, ConfigError> {
    load(keys, file, required, std::env::vars())
}

fn set(merged: &mut toml::Table, key: &Key, value: toml::Value) {
    let section = merged
        .entry(key.section.to_owned())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(t) = section {
        t.insert(key.key.to_owned(), value);
    }
}

fn merge_file(
    keys: &[Key],
    table: &toml::Table,
    origin: &str,
    merged: &mut toml::Table,
) -> Result<(), ConfigError> {
    let err = |message: String| ConfigError::Key {
        origin: origin.to_owned(),
        message,
    };
    for (section, value) in table {
        let known: Vec<&Key> = keys.iter().filter(|k| k.section == section).collect();
        if known.is_empty() {
            let mut sections: Vec<&str> = keys.iter().map(|k| k.section).collect();
            sections.dedup();
            return Err(err(format!(
                "unknown section [{section}] (known sections: {})",
                sections.join(", ")
            )));
        }
        let toml::Value::Table(entries) = value else {
            return Err(err(format!("`{section}` must be a table ([{section}])")));
        };
        for (name, value) in entries {
            let Some(key) = known.iter().find(|k| k.key == name) else {
                let names: Vec<&str> = known.iter().map(|k| k.key).collect();
                return Err(err(format!(
                    "unknown key `{section}.{name}` (known keys in [{section}]: {})",
                    names.join(", ")
                )));
            };
            let value = normalize(key, value).map_err(|m| err(format!("{}: {m}", key.dotted())))?;
            set(merged, key, value);
        }
    }
    Ok(())
}

/// Checks a file value against its kind and normalizes sizes and durations.
fn normalize(key: &Key, value: &toml::Value) -> Result<toml::Value, String> {
    use toml::Value as V;
    match (key.kind, value) {
        (Kind::Str, V::String(_)) | (Kind::Bool, V::Boolean(_)) | (Kind::U64, V::Integer(0..)) => {
            Ok(value.clone())
        }
        (Kind::List, V::Array(items)) if items.iter().all(|v| v.is_str()) => Ok(value.clone()),
        (Kind::List, V::String(s)) => Ok(split_list(s)),
        (Kind::Bytes, V::Integer(n)) if *n >= 0 => Ok(value.clone()),
        (Kind::Bytes, V::String(s)) => parse_bytes(s).map(|n| V::Integer(n as i64)),
        (Kind::Secs, V::Integer(n)) if *n >= 0 => Ok(V::Float(*n as f64)),
        (Kind::Secs, V::Float(f)) if *f >= 0.0 && f.is_finite() => Ok(value.clone()),
        (Kind::Secs, V::String(s)) => parse_secs(s).map(V::Float),
        (Kind::Choice(options), V::String(s)) if options.contains(&s.as_str()) => Ok(value.clone()),
        (kind, other) => Err(format!(
            "expected {}, found {}",
            describe(kind),
            short(other)
        )),
    }
}

fn parse_env(key: &Key, raw: &str) -> Result<toml::Value, String> {
    use toml::Value as V;
    let raw_t = raw.trim();
    match key.kind {
        Kind::Str => Ok(V::String(raw.to_owned())),
        Kind::Bool => match raw_t.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(V::Boolean(true)),
            "0" | "false" | "no" | "off" => Ok(V::Boolean(false)),
            _ => Err(format!("expected true or false, found {raw:?}")),
        },
        Kind::U64 => raw_t
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(V::Integer)
            .ok_or_else(|| format!("expected a non-negative integer, found {raw:?}")),
        Kind::List => Ok(split_list(raw)),
        _ => normalize(key, &V::String(raw_t.to_owned())),
    }
}

fn split_list(s: &str) -> toml::Value {
    toml::Value::Array(
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| toml::Value::String(p.to_owned()))
            .collect(),
    )
}

fn describe(kind: Kind) -> String {
    match kind {
        Kind::Str => "a string".into(),
        Kind::Bool => "true or false".into(),
        Kind::U64 => "a non-negative integer".into(),
        Kind::Bytes => "a size (bytes, or e.g. \"256MiB\")".into(),
        Kind::Secs => "a duration (seconds, or e.g. \"500ms\", \"2s\")".into(),
        Kind::Choice(options) => format!("one of {}", options.join(", ")),
        Kind::List => "a list of strings".into(),
    }
}

fn short(v: &toml::Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!("{}…", &s[..s.floor_char_boundary(40)])
    } else {
        s
    }
}

/// Splits `1.5GiB` into its number and its unit (trimmed, maybe empty);
/// `expected` names the form in the error.
fn number_and_unit<'a>(s: &'a str, expected: &str) -> Result<(f64, &'a str), String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("expected {expected}, found {s:?}"))?;
    Ok((num, unit.trim()))
}

/// Parses `123`, `64KiB`, `256MiB`, `1GiB`, `10MB`, `1.5GiB` into bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let (num, unit) = number_and_unit(s, "a size like 256MiB")?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    let bytes = num * mult as f64;
    if !bytes.is_finite() || bytes > i64::MAX as f64 {
        return Err(format!("size {s:?} is too large"));
    }
    Ok(bytes as u64)
}

/// Parses `2`, `2.5`, `500ms`, `2s`, `5m`, `1h` into seconds.
pub fn parse_secs(s: &str) -> Result<f64, String> {
    let (num, unit) = number_and_unit(s, "a duration like 2s or 500ms")?;
    let mult = match unit {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "us" | "µs" => 0.000_001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown duration unit {other:?} in {s:?}")),
    };
    Ok(num * mult)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    const KEYS: &[Key] = &[
        Key {
            section: "buffer",
            key: "max_bytes",
            kind: Kind::Bytes,
            doc: "",
        },
        Key {
            section: "buffer",
            key: "synchronous",
            kind: Kind::Choice(&["normal", "full"]),
            doc: "",
        },
        Key {
            section: "sync",
            key: "hub",
            kind: Kind::Str,
            doc: "",
        },
        Key {
            section: "sync",
            key: "linger",
            kind: Kind::Secs,
            doc: "",
        },
        Key {
            section: "sync",
            key: "enabled",
            kind: Kind::Bool,
            doc: "",
        },
    ];

    #[derive(Debug, Deserialize, Default, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Cfg {
        buffer: Buffer,
        sync: Sync,
    }
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Buffer {
        max_bytes: u64,
        synchronous: String,
    }
    impl Default for Buffer {
        fn default() -> Self {
            Buffer {
                max_bytes: 256 << 20,
                synchronous: "normal".into(),
            }
        }
    }
    #[derive(Debug, Deserialize, Default, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Sync {
        hub: String,
        linger: f64,
        enabled: bool,
    }

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Cfg, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, toml).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        load(KEYS, Some(&path), true, env)
            .map_err(|e| e.to_string().replace(&path.display().to_string(), "FILE"))
    }

    #[test]
    fn env_names_come_from_the_table() {
        assert_eq!(KEYS[0].env_name(), "LOGBOOK_BUFFER_MAX_BYTES");
        assert_eq!(KEYS[2].env_name(), "LOGBOOK_SYNC_HUB");
    }

    #[test]
    fn file_then_env() {
        let c = load_str(
            "[buffer]\nmax_bytes = \"64MiB\"\n[sync]\nlinger = \"500ms\"\n",
            &[
                ("LOGBOOK_SYNC_HUB", "http://hub:8080"),
                ("LOGBOOK_BUFFER_MAX_BYTES", "1024"),
            ],
        )
        .unwrap();
        assert_eq!(c.buffer.max_bytes, 1024);
        assert_eq!(c.buffer.synchronous, "normal");
        assert_eq!(c.sync.hub, "http://hub:8080");
        assert_eq!(c.sync.linger, 0.5);
    }

    #[test]
    fn errors_name_key_and_origin() {
        let check = |toml: &str, env: &[(&str, &str)], want: &str| {
            assert_eq!(load_str(toml, env).unwrap_err(), want);
        };
        check(
            "[buffer]\nmax_byte = 1\n",
            &[],
            "FILE: unknown key `buffer.max_byte` (known keys in [buffer]: max_bytes, synchronous)",
        );
        check(
            "[bufer]\n",
            &[],
            "FILE: unknown section [bufer] (known sections: buffer, sync)",
        );
        check(
            "[buffer]\nsynchronous = \"off\"\n",
            &[],
            "FILE: buffer.synchronous: expected one of normal, full, found \"off\"",
        );
        check(
            "[sync]\nenabled = \"yes\"\n",
            &[],
            "FILE: sync.enabled: expected true or false, found \"yes\"",
        );
        check(
            "",
            &[("LOGBOOK_BUFFER_MAX_BYTES", "lots")],
            "environment variable LOGBOOK_BUFFER_MAX_BYTES: expected a size like 256MiB, found \"lots\"",
        );
        assert!(load_str("[buffer\n", &[])
            .unwrap_err()
            .starts_with("FILE: "));
    }

    #[test]
    fn missing_optional_file_is_fine() {
        let c: Cfg = load(KEYS, Some(Path::new("/nonexistent/x.toml")), false, vec![]).unwrap();
        assert_eq!(c, Cfg::default());
        assert!(load::<Cfg>(KEYS, Some(Path::new("/nonexistent/x.toml")), true, vec![]).is_err());
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("64 KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes("10MB"), Ok(10_000_000));
        assert_eq!(parse_bytes("7"), Ok(7));
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
        assert_eq!(parse_secs("500ms"), Ok(0.5));
        assert_eq!(parse_secs("2"), Ok(2.0));
        assert_eq!(parse_secs("5m"), Ok(300.0));
        assert!(parse_secs("soon").is_err());
    }
}
