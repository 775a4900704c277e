//! The JSON-lines parser: one line (one JSON object) to one [`Incoming`],
//! accepting the field names common JSON loggers already emit.
//!
//! Invariant: pure and total. No I/O, no clock, no panics on any input (the
//! fuzz target `json_line` checks the last part); every field the parser does
//! not map to a record field ends up in `metadata`.

use serde_json::{Map, Value};

use crate::agent::formats::fields::{self, Context};
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

pub use crate::agent::formats::TRUNCATION_MARK;

/// Parses one line (without its newline) with the field mapping every
/// structured format shares ([`fields::to_incoming`]). A line longer than
/// `max_record_bytes` is kept with its message (and, if needed, its
/// metadata) cut, and `truncated` set.
pub fn parse_line(line: &[u8], max_record_bytes: usize) -> Result<Incoming, BadRecord> {
    let text = std::str::from_utf8(line).map_err(|_| BadRecord::InvalidUtf8)?;
    let value: Value = serde_json::from_str(text).map_err(|_| BadRecord::NotJson)?;
    let Value::Object(obj) = value else {
        return Err(BadRecord::NotObject);
    };
    let cx = Context {
        default_module: None,
        default_time_ns: None,
        max_record_bytes,
        encoded_len: line.len(),
    };
    Ok(fields::to_incoming(obj, &cx))
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
        rendered: None,
        truncated: true,
    }
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
