//! The JSON-lines parser: one line (one JSON object) to one [`Incoming`],
//! accepting the field names common JSON loggers already emit.
//!
//! Invariant: pure and total. No I/O, no clock, no panics on any input (the
//! fuzz target `json_line` checks the last part); every field the parser does
//! not map to a record field ends up in `metadata`.

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;

use crate::agent::record::Incoming;
use crate::wire::Level;

/// Why a line was skipped. The names are the `reason` label of the
/// `bad_records` counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadRecord {
    #[error("line is not valid UTF-8")]
    InvalidUtf8,
    #[error("line is not JSON")]
    NotJson,
    #[error("line is JSON but not an object")]
    NotObject,
}

impl BadRecord {
    pub const ALL: [BadRecord; 3] = [
        BadRecord::InvalidUtf8,
        BadRecord::NotJson,
        BadRecord::NotObject,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            BadRecord::InvalidUtf8 => "invalid_utf8",
            BadRecord::NotJson => "not_json",
            BadRecord::NotObject => "not_object",
        }
    }
}

/// The mark appended to a message that was cut to fit `max_record_bytes`.
pub const TRUNCATION_MARK: &str = " …[truncated]";

/// Field aliases, in priority order: the first present wins, the others stay
/// in metadata.
const MESSAGE: &[&str] = &["message", "msg", "event"];
const LEVEL: &[&str] = &["level", "lvl", "severity", "levelname"];
const TIME: &[&str] = &["timestamp", "time", "ts"];
const MODULE: &[&str] = &["module", "target", "logger", "name"];
const NESTED: &[&str] = &["metadata", "fields"];

/// Parses one line (without its newline). A line longer than
/// `max_record_bytes` is kept with its message (and, if needed, its metadata)
/// cut, and `truncated` set.
pub fn parse_line(line: &[u8], max_record_bytes: usize) -> Result<Incoming, BadRecord> {
    let text = std::str::from_utf8(line).map_err(|_| BadRecord::InvalidUtf8)?;
    let value: Value = serde_json::from_str(text).map_err(|_| BadRecord::NotJson)?;
    let Value::Object(mut obj) = value else {
        return Err(BadRecord::NotObject);
    };

    // Nested metadata objects (`fields` is tracing-subscriber's, which also
    // puts the message there) are flattened into the top level first.
    let mut metadata = Map::new();
    for key in NESTED {
        if let Some(Value::Object(_)) = obj.get(*key) {
            if let Some(Value::Object(inner)) = obj.remove(*key) {
                for (k, v) in inner {
                    if (MESSAGE.contains(&k.as_str()) && !has_any(&obj, MESSAGE))
                        || !obj.contains_key(&k)
                    {
                        obj.insert(k, v);
                    } else {
                        metadata.insert(k, v);
                    }
                }
            }
        }
    }

    let message = match take_first(&mut obj, MESSAGE) {
        Some(Value::String(s)) => s,
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let level = match take_first(&mut obj, LEVEL) {
        Some(v) => match level_of(&v) {
            Some(level) => level,
            None => {
                // Unknown level: keep what the client said.
                metadata.insert("level".into(), v);
                Level::Info
            }
        },
        None => Level::Info,
    };
    let timestamp_ns = match take_first(&mut obj, TIME) {
        Some(v) => match time_of(&v) {
            Some(ns) => Some(ns),
            None => {
                metadata.insert("time".into(), v);
                None
            }
        },
        None => None,
    };
    let module = match take_first(&mut obj, MODULE) {
        Some(Value::String(s)) => Some(s),
        Some(other) => Some(other.to_string()),
        None => None,
    };
    for (k, v) in obj {
        metadata.entry(k).or_insert(v);
    }

    let mut record = Incoming {
        timestamp_ns,
        level,
        module,
        message,
        metadata,
        truncated: false,
    };
    if line.len() > max_record_bytes {
        truncate(&mut record, max_record_bytes);
    }
    Ok(record)
}

/// A line the reader had to cut before its end (longer than it buffers): the
/// JSON is incomplete, so the record keeps the raw start as its message.
pub fn cut_line(prefix: &[u8], total_len: usize, max_record_bytes: usize) -> Incoming {
    let keep = prefix.len().min(max_record_bytes / 2);
    let mut message = String::from_utf8_lossy(&prefix[..keep]).into_owned();
    message.push_str(TRUNCATION_MARK);
    let mut metadata = Map::new();
    metadata.insert("logbook_original_bytes".into(), Value::from(total_len));
    Incoming {
        timestamp_ns: None,
        level: Level::Info,
        module: None,
        message,
        metadata,
        truncated: true,
    }
}

/// Cuts the record to about `max` bytes: metadata first (replaced by its
/// size when it is the bulk), then the message, which gets a visible mark.
fn truncate(record: &mut Incoming, max: usize) {
    record.truncated = true;
    let meta_len = if record.metadata.is_empty() {
        0
    } else {
        serde_json::to_string(&record.metadata).map_or(0, |s| s.len())
    };
    let module_len = record.module.as_ref().map_or(0, |m| m.len());
    if let Some(m) = &mut record.module {
        if m.len() > 256 {
            cut_str(m, 256);
        }
    }
    let mut budget = max.saturating_sub(module_len.min(256) + 64);
    if meta_len > budget / 2 {
        let mut small = Map::new();
        small.insert("logbook_truncated_metadata_bytes".into(), meta_len.into());
        record.metadata = small;
    } else {
        budget -= meta_len;
    }
    if record.message.len() > budget {
        cut_str(&mut record.message, budget);
    }
    record.message.push_str(TRUNCATION_MARK);
}

fn cut_str(s: &mut String, max: usize) {
    let mut at = max.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    s.truncate(at);
}

fn has_any(obj: &Map<String, Value>, keys: &[&str]) -> bool {
    keys.iter().any(|k| obj.contains_key(*k))
}

fn take_first(obj: &mut Map<String, Value>, keys: &[&str]) -> Option<Value> {
    keys.iter().find_map(|k| obj.remove(*k))
}

fn level_of(v: &Value) -> Option<Level> {
    match v {
        Value::String(s) => {
            Level::parse(s).or_else(|| s.trim().parse::<i64>().ok().and_then(numeric_level))
        }
        Value::Number(n) => n.as_i64().and_then(numeric_level),
        _ => None,
    }
}

/// 0–7 is a syslog severity, 10 and up a pino/bunyan level (custom levels
/// fall into the bucket below them).
fn numeric_level(n: i64) -> Option<Level> {
    match n {
        0..=7 => Level::from_syslog_severity(n as u8),
        10..=19 => Some(Level::Trace),
        20..=29 => Some(Level::Debug),
        30..=39 => Some(Level::Info),
        40..=49 => Some(Level::Warn),
        50..=59 => Some(Level::Error),
        60.. => Some(Level::Fatal),
        _ => None,
    }
}

fn time_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                unix_int(i)
            } else {
                n.as_f64().and_then(unix_float)
            }
        }
        Value::String(s) => {
            let s = s.trim();
            if let Ok(i) = s.parse::<i64>() {
                return unix_int(i);
            }
            if let Ok(f) = s.parse::<f64>() {
                return unix_float(f);
            }
            rfc3339(s)
        }
        _ => None,
    }
}

/// Unix time in seconds, milliseconds, microseconds or nanoseconds, told
/// apart by magnitude (seconds cover 1970–5138, and so on).
fn unix_int(i: i64) -> Option<i64> {
    match i {
        0..100_000_000_000 => i.checked_mul(1_000_000_000),
        100_000_000_000..100_000_000_000_000 => i.checked_mul(1_000_000),
        100_000_000_000_000..100_000_000_000_000_000 => i.checked_mul(1_000),
        _ if i >= 0 => Some(i),
        _ => None,
    }
}

fn unix_float(f: f64) -> Option<i64> {
    if !f.is_finite() || f < 0.0 {
        return None;
    }
    if f < 1e11 {
        // An f64 of seconds carries about microseconds: round to them so
        // `1700000000.123` reads as .123000000, not .122999808.
        let secs = f.trunc();
        let micros = ((f - secs) * 1e6).round() as i64;
        return Some(secs as i64 * 1_000_000_000 + micros * 1_000);
    }
    let ns = if f < 1e14 {
        f * 1e6
    } else if f < 1e17 {
        f * 1e3
    } else {
        f
    };
    (ns < i64::MAX as f64).then_some(ns as i64)
}

fn rfc3339(s: &str) -> Option<i64> {
    let parsed = time::OffsetDateTime::parse(s, &Rfc3339).ok().or_else(|| {
        // `2024-05-01 12:00:00Z` (space separator) and offset-less local
        // times as some Python formatters write them, read as UTC.
        let mut fixed = s.replacen(' ', "T", 1);
        if !fixed.ends_with('Z') && !fixed[fixed.len().saturating_sub(6)..].contains(['+', '-']) {
            fixed.push('Z');
        }
        time::OffsetDateTime::parse(&fixed, &Rfc3339).ok()
    })?;
    i64::try_from(parsed.unix_timestamp_nanos()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// (timestamp_ns, level, module, message, metadata)
    fn check(
        line: &str,
        ts: Option<i64>,
        level: Level,
        module: Option<&str>,
        message: &str,
        meta: Value,
    ) {
        let got = parse_line(line.as_bytes(), 64 << 10).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(got.timestamp_ns, ts, "ts of {line}");
        assert_eq!(got.level, level, "level of {line}");
        assert_eq!(got.module.as_deref(), module, "module of {line}");
        assert_eq!(got.message, message, "message of {line}");
        assert_eq!(Value::Object(got.metadata), meta, "metadata of {line}");
        assert!(!got.truncated);
    }

    const T: i64 = 1_700_000_000_000_000_000;
    const T_MS: i64 = 1_700_000_000_123_000_000;

    #[test]
    fn dialects() {
        use Level::*;
        // tracing-subscriber's JSON format
        check(
            r#"{"timestamp":"2023-11-14T22:13:20.123Z","level":"INFO","fields":{"message":"hi","speed":3},"target":"nav::planner"}"#,
            Some(T_MS),
            Info,
            Some("nav::planner"),
            "hi",
            json!({"speed":3}),
        );
        // Go slog
        check(
            r#"{"time":"2023-11-14T23:13:20.123+01:00","level":"WARN","msg":"hot","temp":81}"#,
            Some(T_MS),
            Warn,
            None,
            "hot",
            json!({"temp":81}),
        );
        // zap (float seconds, logger)
        check(
            r#"{"level":"error","ts":1700000000.123,"logger":"drive","msg":"stall"}"#,
            Some(T_MS),
            Error,
            Some("drive"),
            "stall",
            json!({}),
        );
        // pino (ms, numeric level)
        check(
            r#"{"level":30,"time":1700000000123,"pid":7,"hostname":"r1","msg":"up"}"#,
            Some(T_MS),
            Info,
            None,
            "up",
            json!({"pid":7,"hostname":"r1"}),
        );
        // bunyan
        check(
            r#"{"name":"app","hostname":"r1","pid":7,"level":50,"msg":"x","time":"2023-11-14T22:13:20.000Z","v":0}"#,
            Some(T),
            Error,
            Some("app"),
            "x",
            json!({"hostname":"r1","pid":7,"v":0}),
        );
        // structlog
        check(
            r#"{"event":"docked","level":"debug","timestamp":"2023-11-14T22:13:20Z","station":4}"#,
            Some(T),
            Debug,
            None,
            "docked",
            json!({"station":4}),
        );
        // python-json-logger
        check(
            r#"{"message":"boot","levelname":"CRITICAL","name":"robot.main"}"#,
            None,
            Fatal,
            Some("robot.main"),
            "boot",
            json!({}),
        );
        // syslog severities, seconds and nanoseconds, `lvl`, `severity`, `metadata`
        check(
            r#"{"msg":"a","level":3,"ts":1700000000}"#,
            Some(T),
            Error,
            None,
            "a",
            json!({}),
        );
        check(
            r#"{"msg":"a","lvl":"trace","time":1700000000000000000}"#,
            Some(T),
            Trace,
            None,
            "a",
            json!({}),
        );
        check(
            r#"{"msg":"a","severity":"Warning","metadata":{"k":"v"}}"#,
            None,
            Warn,
            None,
            "a",
            json!({"k":"v"}),
        );
        check(
            r#"{"msg":"a","level":"7"}"#,
            None,
            Debug,
            None,
            "a",
            json!({}),
        );
        // unknown level and bad time stay visible in metadata
        check(
            r#"{"msg":"a","level":"loud","time":"yesterday"}"#,
            None,
            Info,
            None,
            "a",
            json!({"level":"loud","time":"yesterday"}),
        );
        // space-separated, offset-less time
        check(
            r#"{"msg":"a","time":"2023-11-14 22:13:20"}"#,
            Some(T),
            Info,
            None,
            "a",
            json!({}),
        );
        // no message, non-string message and module
        check(r#"{"x":1}"#, None, Info, None, "", json!({"x":1}));
        check(
            r#"{"msg":{"a":1},"module":5}"#,
            None,
            Info,
            Some("5"),
            r#"{"a":1}"#,
            json!({}),
        );
    }

    #[test]
    fn bad_lines() {
        let check = |line: &[u8], want: BadRecord| {
            assert_eq!(parse_line(line, 1024), Err(want), "{line:?}")
        };
        check(b"hello", BadRecord::NotJson);
        check(b"{\"msg\":", BadRecord::NotJson);
        check(b"[1,2]", BadRecord::NotObject);
        check(b"\"s\"", BadRecord::NotObject);
        check(b"{\"msg\":\"\xff\"}", BadRecord::InvalidUtf8);
    }

    #[test]
    fn oversize_is_kept_truncated() {
        let long = "x".repeat(5000);
        let line = format!(r#"{{"msg":"{long}","level":"error"}}"#);
        let r = parse_line(line.as_bytes(), 1024).unwrap();
        assert!(r.truncated);
        assert_eq!(r.level, Level::Error);
        assert!(r.message.ends_with(TRUNCATION_MARK));
        assert!(r.message.len() <= 1024);
        let line = format!(r#"{{"msg":"m","blob":"{long}"}}"#);
        let r = parse_line(line.as_bytes(), 1024).unwrap();
        assert_eq!(r.message, format!("m{TRUNCATION_MARK}"));
        assert!(r.metadata.contains_key("logbook_truncated_metadata_bytes"));
        let c = cut_line(long.as_bytes(), 99999, 1024);
        assert!(c.truncated && c.message.len() < 1024 && c.message.ends_with(TRUNCATION_MARK));
    }

    /// A seeded stand-in for the fuzz target in plain `cargo test`: random
    /// mutations of real lines never panic, and truncation keeps its bound.
    #[test]
    fn mutations_never_panic() {
        use rand::{Rng, SeedableRng};
        let seeds = [
            r#"{"timestamp":"2023-11-14T22:13:20.123Z","level":"INFO","fields":{"message":"hi","speed":3},"target":"nav"}"#,
            r#"{"level":30,"time":1700000000123,"msg":"up","nested":{"a":[1,2,{"b":null}]}}"#,
            r#"{"ts":1.5e300,"lvl":-4,"msg":"\u00e9\ud83d\ude00","metadata":[]}"#,
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for i in 0..20_000 {
            let mut line = seeds[i % seeds.len()].as_bytes().to_vec();
            for _ in 0..rng.random_range(1..6) {
                let at = rng.random_range(0..line.len());
                match rng.random_range(0..3) {
                    0 => line[at] = rng.random(),
                    1 => {
                        line.remove(at);
                    }
                    _ => line.insert(at, b"{}[]\\\",:0e-\"\xff"[rng.random_range(0..13)]),
                }
                if line.is_empty() {
                    break;
                }
            }
            let max = 256 + rng.random_range(0..512);
            if let Ok(r) = parse_line(&line, max) {
                if r.truncated {
                    assert!(r.message.len() <= max + TRUNCATION_MARK.len());
                }
            }
        }
    }
}
