//! Marks: a named moment of a session ("collision") with a window of time
//! before and after it whose records the buffer keeps longest (see
//! `agent::store::writer::bound`). [`MarkSpec`] is what every way of making
//! one produces: `POST /v1/marks`, and a record carrying an `event` field
//! (JSON lines, Forward, syslog structured data, the tracing layer's `mark`
//! field) through [`from_event`].
//!
//! Invariant: pure, no I/O and no clock; every spec it returns is within
//! the bounds below (name, window, metadata size), so the writer only
//! checks the per-session count.

use serde_json::{Map, Value};

/// Longest mark name, in bytes.
pub const MAX_NAME: usize = 128;
/// Most metadata text a mark keeps, in bytes (its JSON object).
pub const MAX_META: usize = 4096;
/// Longest window on either side of a mark.
pub const MAX_WINDOW_NS: i64 = 3600 * 1_000_000_000;
/// Most marks one session (or the device logs outside sessions) holds.
pub const MAX_PER_SESSION: i64 = 10_000;
/// The window when a mark does not say.
pub const DEFAULT_BEFORE_NS: i64 = 30 * 1_000_000_000;
pub const DEFAULT_AFTER_NS: i64 = 10 * 1_000_000_000;

/// How a mark's pin ranks when pins exceed `buffer.pinned_max`: normal
/// ones are released first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Priority {
    #[default]
    Normal,
    High,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
    pub fn code(self) -> i64 {
        self as i64
    }
    pub fn from_code(c: i64) -> Priority {
        if c == 1 {
            Priority::High
        } else {
            Priority::Normal
        }
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "normal" => Ok(Priority::Normal),
            "high" => Ok(Priority::High),
            other => Err(format!("priority {other:?} is not high or normal")),
        }
    }
}

/// A mark as asked for, before the writer gives it a session.
#[derive(Debug, Clone, PartialEq)]
pub struct MarkSpec {
    pub name: String,
    /// Unix nanoseconds; `None`: the agent's clock when the writer takes it.
    pub timestamp_ns: Option<i64>,
    pub before_ns: i64,
    pub after_ns: i64,
    pub priority: Priority,
    /// JSON object text, or empty.
    pub metadata: String,
}

impl MarkSpec {
    /// Checks and builds a spec; the error is a one-line reason for the user.
    pub fn new(
        name: String,
        timestamp_ns: Option<i64>,
        before_ns: Option<i64>,
        after_ns: Option<i64>,
        priority: Priority,
        metadata: &Map<String, Value>,
    ) -> Result<MarkSpec, String> {
        let name = name.trim().to_owned();
        if name.is_empty() {
            return Err("a mark needs a name".into());
        }
        if name.len() > MAX_NAME || name.chars().any(char::is_control) {
            return Err(format!(
                "mark name must be at most {MAX_NAME} bytes without control characters"
            ));
        }
        let window = |what: &str, v: Option<i64>, default: i64| match v {
            None => Ok(default),
            Some(ns) if (0..=MAX_WINDOW_NS).contains(&ns) => Ok(ns),
            Some(_) => Err(format!("mark {what} must be between 0 and 1h")),
        };
        let before_ns = window("before", before_ns, DEFAULT_BEFORE_NS)?;
        let after_ns = window("after", after_ns, DEFAULT_AFTER_NS)?;
        let metadata = if metadata.is_empty() {
            String::new()
        } else {
            serde_json::to_string(metadata).unwrap_or_default()
        };
        if metadata.len() > MAX_META {
            return Err(format!(
                "mark metadata is {} bytes; at most {MAX_META}",
                metadata.len()
            ));
        }
        Ok(MarkSpec {
            name,
            timestamp_ns,
            before_ns,
            after_ns,
            priority,
            metadata,
        })
    }
}

/// A window length: seconds as a number, or a duration text (`30s`,
/// `500ms`, `2m`).
pub fn duration_ns(v: &Value) -> Result<i64, String> {
    let secs = match v {
        Value::Number(n) => n.as_f64().ok_or("not a number")?,
        Value::String(s) => crate::config::parse_secs(s)?,
        _ => return Err("a window is seconds or a duration like 30s".into()),
    };
    if !secs.is_finite() || !(0.0..=(MAX_WINDOW_NS / 1_000_000_000) as f64).contains(&secs) {
        return Err("mark window must be between 0 and 1h".into());
    }
    Ok((secs * 1e9) as i64)
}

/// The mark a record's `event` field asks for, at the record's time:
/// `"event": "collision"`, or `"event": {"name": "collision", "before":
/// "30s", "after": 10, "priority": "high", "metadata": {...}}`. `None`
/// when the record has no `event` field; an error (counted by the caller,
/// the record kept) when it is not a valid mark.
pub fn from_event(
    metadata: &Map<String, Value>,
    timestamp_ns: i64,
) -> Option<Result<MarkSpec, String>> {
    let event = metadata.get("event")?;
    Some(parse_event(event, timestamp_ns))
}

/// The syslog SD-ID that makes a mark (README "Marks"): `[event@32473
/// name="collision" before="30s" after="10s" priority="high"]`; its other
/// parameters become the mark's metadata.
pub const SYSLOG_SD_ID: &str = "event@32473";

/// [`from_event`], or a syslog record's [`SYSLOG_SD_ID`] element.
pub fn from_record(
    metadata: &Map<String, Value>,
    timestamp_ns: i64,
) -> Option<Result<MarkSpec, String>> {
    if let Some(m) = from_event(metadata, timestamp_ns) {
        return Some(m);
    }
    let sd = metadata
        .get("structured_data")?
        .as_object()?
        .get(SYSLOG_SD_ID)?
        .as_object()?;
    let mut event = Map::new();
    let mut meta = Map::new();
    for (k, v) in sd {
        if ["name", "before", "after", "priority"].contains(&k.as_str()) {
            event.insert(k.clone(), v.clone());
        } else {
            meta.insert(k.clone(), v.clone());
        }
    }
    if !meta.is_empty() {
        event.insert("metadata".into(), Value::Object(meta));
    }
    Some(parse_event(&Value::Object(event), timestamp_ns))
}

fn parse_event(event: &Value, timestamp_ns: i64) -> Result<MarkSpec, String> {
    match event {
        Value::String(name) => MarkSpec::new(
            name.clone(),
            Some(timestamp_ns),
            None,
            None,
            Priority::Normal,
            &Map::new(),
        ),
        Value::Object(o) => {
            for k in o.keys() {
                if !["name", "before", "after", "priority", "metadata"].contains(&k.as_str()) {
                    return Err(format!("unknown field {k:?} in event"));
                }
            }
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or("an event object needs a text name")?;
            let before = o.get("before").map(duration_ns).transpose()?;
            let after = o.get("after").map(duration_ns).transpose()?;
            let priority = match o.get("priority") {
                None => Priority::Normal,
                Some(Value::String(p)) => p.parse()?,
                Some(_) => return Err("event priority is high or normal".into()),
            };
            let empty = Map::new();
            let meta = match o.get("metadata") {
                None => &empty,
                Some(Value::Object(m)) => m,
                Some(_) => return Err("event metadata must be an object".into()),
            };
            MarkSpec::new(
                name.to_owned(),
                Some(timestamp_ns),
                before,
                after,
                priority,
                meta,
            )
        }
        _ => Err("event must be a name or an object with a name".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(event: Value, expected: Result<(&str, i64, i64, Priority, &str), &str>) {
        let meta = json!({ "event": event });
        let got = from_event(meta.as_object().unwrap(), 7).unwrap();
        match (got, expected) {
            (Ok(m), Ok((name, before, after, prio, md))) => {
                assert_eq!(
                    (
                        m.name.as_str(),
                        m.before_ns,
                        m.after_ns,
                        m.priority,
                        m.metadata.as_str()
                    ),
                    (name, before, after, prio, md)
                );
                assert_eq!(m.timestamp_ns, Some(7));
            }
            (Err(e), Err(want)) => assert!(e.contains(want), "{e}"),
            (got, want) => panic!("{got:?} vs {want:?}"),
        }
    }

    #[test]
    fn events_become_marks() {
        const S: i64 = 1_000_000_000;
        check(
            json!("collision"),
            Ok(("collision", 30 * S, 10 * S, Priority::Normal, "")),
        );
        check(
            json!({"name": "estop", "before": "5s", "after": 2, "priority": "high", "metadata": {"x": 1}}),
            Ok(("estop", 5 * S, 2 * S, Priority::High, r#"{"x":1}"#)),
        );
        check(
            json!({"name": "a", "before": "500ms"}),
            Ok(("a", S / 2, 10 * S, Priority::Normal, "")),
        );
        check(json!(""), Err("needs a name"));
        check(json!(3), Err("event must be"));
        check(json!({"before": 1}), Err("needs a text name"));
        check(
            json!({"name": "a", "before": "2h"}),
            Err("between 0 and 1h"),
        );
        check(
            json!({"name": "a", "priority": "urgent"}),
            Err("not high or normal"),
        );
        check(json!({"name": "a", "color": 1}), Err("unknown field"));
        check(json!("x".repeat(200)), Err("at most 128"));
        check(
            json!({"name": "a", "metadata": {"big": "x".repeat(5000)}}),
            Err("at most 4096"),
        );
        assert!(from_event(json!({"msg": 1}).as_object().unwrap(), 0).is_none());
        let syslog = json!({"structured_data": {"event@32473": {"name": "bump", "after": "1s", "zone": "b"}}});
        let m = from_record(syslog.as_object().unwrap(), 9)
            .unwrap()
            .unwrap();
        assert_eq!(
            (m.name.as_str(), m.after_ns, m.metadata.as_str()),
            ("bump", S, r#"{"zone":"b"}"#)
        );
    }
}
