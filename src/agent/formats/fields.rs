//! The field names common loggers already emit (message, level, time,
//! module, metadata aliases), mapped onto an [`Incoming`] record. The one
//! mapping of every structured format (JSON lines on `ingest.sock`, Fluent
//! Forward records) so a record means the same whichever socket it came
//! through.
//!
//! Invariant: no field is lost. A value that is not used as message, level,
//! time or module (including an alias that lost to an earlier one, or a
//! level/time that does not parse) stays in metadata under its own key.

use serde_json::{Map, Value};

use super::{truncate_message, TRUNCATION_MARK};
use crate::agent::record::Incoming;
use crate::wire::Level;

/// Message aliases, first present wins. `event` is structlog's; `log` is
/// what Docker's json-file and fluentd drivers and Fluent Bit's tail input
/// call the line.
pub const MESSAGE_KEYS: &[&str] = &["message", "msg", "event", "log"];
/// Level aliases: names (`warn`, `WARNING`, …), syslog 0–7, pino 10–60.
/// `levelname` is python-json-logger's.
pub const LEVEL_KEYS: &[&str] = &["level", "lvl", "severity", "levelname"];
/// Time aliases: RFC 3339 text or Unix seconds / ms / µs / ns.
pub const TIME_KEYS: &[&str] = &["timestamp", "time", "ts"];
/// Module aliases (tracing's `target`, Python's `logger`/`name`).
pub const MODULE_KEYS: &[&str] = &["module", "target", "logger", "name"];
/// Objects whose members are flattened into metadata.
pub const METADATA_KEYS: &[&str] = &["metadata", "fields"];

/// What the format knows beyond the record's own fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context<'a> {
    /// Module when the record names none (Fluent Forward: the tag).
    pub default_module: Option<&'a str>,
    /// Time when the record has no usable time field (Fluent Forward: the
    /// event time). `None` is stamped on arrival by the agent.
    pub default_time_ns: Option<i64>,
    /// `ingest.max_record_bytes`.
    pub max_record_bytes: usize,
    /// Encoded size of the record, so the metadata is only measured (which
    /// costs a serialization) when the whole record may be over the limit.
    pub encoded_len: usize,
}

/// Maps one record object. Never fails: every object is a record.
pub fn to_incoming(mut map: Map<String, Value>, cx: &Context<'_>) -> Incoming {
    // Nested metadata objects (`fields` is tracing-subscriber's JSON, which
    // puts the message there too) are lifted to the top level first, so
    // their aliases count; a top-level field of the same name wins.
    let mut shadowed = Map::new();
    for key in METADATA_KEYS {
        if let Some(Value::Object(_)) = map.get(*key) {
            if let Some(Value::Object(inner)) = map.remove(*key) {
                for (k, v) in inner {
                    let lift = if MESSAGE_KEYS.contains(&k.as_str()) {
                        !MESSAGE_KEYS.iter().any(|m| map.contains_key(*m))
                    } else {
                        !map.contains_key(&k)
                    };
                    if lift {
                        map.insert(k, v);
                    } else {
                        shadowed.insert(k, v);
                    }
                }
            }
        }
    }

    let message = take_first(&mut map, MESSAGE_KEYS, |v| match v {
        Value::String(s) => Ok(s),
        Value::Null => Err(v),
        other => Ok(other.to_string()),
    })
    // A structured message (an object or array) only when no alias holds
    // text: it is shown as its JSON.
    .or_else(|| {
        let key = MESSAGE_KEYS
            .iter()
            .find(|k| matches!(map.get(**k), Some(Value::Object(_) | Value::Array(_))))?;
        map.remove(*key).map(|v| v.to_string())
    });
    let level = take_first(&mut map, LEVEL_KEYS, |v| level_of(&v).ok_or(v)).unwrap_or(Level::Info);
    let timestamp_ns =
        take_first(&mut map, TIME_KEYS, |v| time_of(&v).ok_or(v)).or(cx.default_time_ns);
    let module = take_first(&mut map, MODULE_KEYS, |v| match v {
        Value::String(s) if !s.is_empty() => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(other),
    })
    .or_else(|| cx.default_module.map(str::to_owned));

    // Top-level fields win over nested ones of the same name: they are what
    // the program wrote most directly.
    let mut metadata = shadowed;
    if metadata.is_empty() {
        metadata = map;
    } else {
        metadata.extend(map);
    }

    let mut message = message.unwrap_or_default();
    // Loggers end lines with a newline; the record is the line.
    while message.ends_with('\n') || message.ends_with('\r') {
        message.pop();
    }
    let mut record = Incoming {
        timestamp_ns,
        level,
        module,
        message,
        metadata,
        truncated: false,
    };
    if cx.encoded_len > cx.max_record_bytes || record.message.len() > cx.max_record_bytes {
        truncate(&mut record, cx.max_record_bytes);
    }
    record
}

/// Longest module kept in an over-size record.
const MAX_MODULE: usize = 256;

/// Cuts an over-size record to about `max` bytes, visibly: the module to
/// [`MAX_MODULE`], metadata entries that do not fit in half the budget to
/// the mark (with the original metadata size under
/// `logbook_truncated_metadata_bytes`), the message to what is left. The
/// message always ends with [`TRUNCATION_MARK`], so a reader sees the cut.
fn truncate(record: &mut Incoming, max: usize) {
    record.truncated = true;
    if let Some(m) = &mut record.module {
        cut_str(m, MAX_MODULE);
    }
    let module_len = record.module.as_ref().map_or(0, String::len);
    let budget = max.saturating_sub(module_len + 64);
    let meta_used = if record.metadata.is_empty() {
        0
    } else {
        let meta_len = serde_json::to_string(&record.metadata).map_or(0, |s| s.len());
        if meta_len > budget / 2 {
            bound_metadata(&mut record.metadata, budget / 2);
            record
                .metadata
                .insert("logbook_truncated_metadata_bytes".into(), meta_len.into());
            serde_json::to_string(&record.metadata).map_or(0, |s| s.len())
        } else {
            meta_len
        }
    };
    let keep = budget.saturating_sub(meta_used);
    if !truncate_message(&mut record.message, keep.max(TRUNCATION_MARK.len())) {
        record.message.push_str(TRUNCATION_MARK);
    }
}

fn cut_str(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut at = max;
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    s.truncate(at);
}

/// Removes the first alias present whose value `f` accepts; `f` hands a
/// rejected value back and it is put back, so it stays in metadata.
fn take_first<T>(
    map: &mut Map<String, Value>,
    keys: &[&str],
    f: impl Fn(Value) -> Result<T, Value>,
) -> Option<T> {
    for key in keys {
        match map.get(*key) {
            Some(v) if accepts(v) => {}
            _ => continue,
        }
        let (k, v) = map.remove_entry(*key).expect("present");
        match f(v) {
            Ok(t) => return Some(t),
            Err(v) => {
                map.insert(k, v);
            }
        }
    }
    None
}

/// Cheap pre-filter: containers are never a message, level, time or module.
fn accepts(v: &Value) -> bool {
    !matches!(v, Value::Object(_) | Value::Array(_))
}

/// A level from a name or a syslog (0–7) / pino (10–60) number.
pub fn level_of(v: &Value) -> Option<Level> {
    match v {
        Value::String(s) => Level::parse(s).or_else(|| level_of_number(s.trim().parse().ok()?)),
        Value::Number(n) => level_of_number(n.as_i64()?),
        _ => None,
    }
}

/// 0–7 is a syslog severity, 10 and up a pino/bunyan level (custom levels
/// fall into the bucket below them: 35 is info).
fn level_of_number(n: i64) -> Option<Level> {
    match n {
        0..=7 => Level::from_syslog_severity(n as u8),
        10..=59 => Level::from_pino(n - n % 10),
        60.. => Some(Level::Fatal),
        _ => None,
    }
}

/// Unix nanoseconds from RFC 3339 text (also with a space for the `T` and
/// without an offset, read as UTC, as some Python formatters write it) or a
/// Unix number in seconds, milliseconds, microseconds or nanoseconds, as a
/// number or as text (told apart by magnitude: any time after 1973 in
/// seconds is below 1e11, in ms below 1e14, and so on).
pub fn time_of(v: &Value) -> Option<i64> {
    match v {
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
        Value::Number(n) => match n.as_i64() {
            Some(i) => unix_int(i),
            None => unix_float(n.as_f64()?),
        },
        _ => None,
    }
}

fn unix_int(i: i64) -> Option<i64> {
    let a = i.unsigned_abs();
    let mult: i64 = if a < 100_000_000_000 {
        1_000_000_000
    } else if a < 100_000_000_000_000 {
        1_000_000
    } else if a < 100_000_000_000_000_000 {
        1_000
    } else {
        1
    };
    i.checked_mul(mult)
}

fn unix_float(f: f64) -> Option<i64> {
    let a = f.abs();
    if a < 1e11 {
        // An f64 of seconds carries about microseconds: round to them so
        // `1700000000.123` reads as .123000000, not .122999906.
        return scaled(f, 1_000_000).and_then(|us| us.checked_mul(1_000));
    }
    let mult = if a < 1e14 {
        1_000_000
    } else if a < 1e17 {
        1_000
    } else {
        1
    };
    scaled(f, mult)
}

fn rfc3339(s: &str) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    let parsed = time::OffsetDateTime::parse(s, &Rfc3339).ok().or_else(|| {
        // `2024-05-01 12:00:00Z` (space separator) and offset-less local
        // times as some Python formatters write them, read as UTC.
        if s.len() < 19 || !s.is_char_boundary(s.len() - 6) {
            return None;
        }
        let mut fixed = s.replacen(' ', "T", 1);
        if !fixed.ends_with(['Z', 'z']) && !fixed[fixed.len() - 6..].contains(['+', '-']) {
            fixed.push('Z');
        }
        time::OffsetDateTime::parse(&fixed, &Rfc3339).ok()
    })?;
    i64::try_from(parsed.unix_timestamp_nanos()).ok()
}

/// `f * mult` as an integer without the rounding error of multiplying a
/// large float: whole and fractional parts are scaled apart.
pub fn scaled(f: f64, mult: i64) -> Option<i64> {
    if !f.is_finite() {
        return None;
    }
    let whole = f.trunc();
    if whole.abs() >= i64::MAX as f64 {
        return None;
    }
    let frac = ((f - whole) * mult as f64).round() as i64;
    (whole as i64).checked_mul(mult)?.checked_add(frac)
}

/// Keeps metadata entries while they fit in `budget` bytes of JSON; the
/// rest keep their key with the truncation mark as value, so a reader sees
/// which fields were cut. Returns whether anything was cut.
fn bound_metadata(metadata: &mut Map<String, Value>, budget: usize) -> bool {
    let mut used = 2; // the braces
    let mut cut = false;
    for (k, v) in metadata.iter_mut() {
        let len = k.len() + 4 + serde_json::to_string(v).map(|s| s.len()).unwrap_or(0);
        if used + len <= budget {
            used += len;
        } else {
            *v = Value::String(TRUNCATION_MARK.trim_start().to_owned());
            used += k.len() + 4 + TRUNCATION_MARK.len();
            cut = true;
        }
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cx() -> Context<'static> {
        Context {
            default_module: Some("tag.default"),
            default_time_ns: Some(7),
            max_record_bytes: 1 << 16,
            encoded_len: 0,
        }
    }

    /// One line per logger dialect: input object, then the expected
    /// (level, module, message, time, metadata).
    fn check(
        input: Value,
        level: Level,
        module: &str,
        message: &str,
        ts: Option<i64>,
        meta: Value,
    ) {
        let Value::Object(map) = input.clone() else {
            panic!()
        };
        let r = to_incoming(map, &cx());
        assert_eq!(
            (
                r.level,
                r.module.as_deref(),
                r.message.as_str(),
                r.timestamp_ns,
                Value::Object(r.metadata)
            ),
            (level, Some(module), message, ts, meta),
            "{input}"
        );
    }

    #[test]
    fn dialects() {
        check(
            json!({"message": "m", "level": "info"}),
            Level::Info,
            "tag.default",
            "m",
            Some(7),
            json!({}),
        );
        check(
            json!({"msg": "m", "lvl": "WARNING", "logger": "nav"}),
            Level::Warn,
            "nav",
            "m",
            Some(7),
            json!({}),
        );
        check(
            json!({"log": "E lost\n", "container_id": "3f", "source": "stderr"}),
            Level::Info,
            "tag.default",
            "E lost",
            Some(7),
            json!({"container_id": "3f", "source": "stderr"}),
        );
        check(
            json!({"msg": "p", "level": 50, "time": 1_764_119_000_123_i64, "name": "svc"}),
            Level::Error,
            "svc",
            "p",
            Some(1_764_119_000_123_000_000),
            json!({}),
        );
        check(
            json!({"message": "s", "severity": 3}),
            Level::Error,
            "tag.default",
            "s",
            Some(7),
            json!({}),
        );
        check(
            json!({"message": "s", "severity": "7"}),
            Level::Debug,
            "tag.default",
            "s",
            Some(7),
            json!({}),
        );
        check(
            json!({"message": "t", "target": "app::db", "fields": {"rows": 3}, "spans": ["a"]}),
            Level::Info,
            "app::db",
            "t",
            Some(7),
            json!({"rows": 3, "spans": ["a"]}),
        );
        check(
            json!({"message": "t", "timestamp": "2026-11-26T01:02:03.5Z"}),
            Level::Info,
            "tag.default",
            "t",
            Some(1_795_654_923_500_000_000),
            json!({}),
        );
        check(
            json!({"message": "t", "ts": 1_764_119_000.25}),
            Level::Info,
            "tag.default",
            "t",
            Some(1_764_119_000_250_000_000),
            json!({}),
        );
        // Losers and unparseable values stay in metadata.
        check(
            json!({"message": "a", "msg": "b", "level": "loud", "time": "yesterday"}),
            Level::Info,
            "tag.default",
            "a",
            Some(7),
            json!({"msg": "b", "level": "loud", "time": "yesterday"}),
        );
        check(
            json!({"message": {"nested": 1}, "msg": "b"}),
            Level::Info,
            "tag.default",
            "b",
            Some(7),
            json!({"message": {"nested": 1}}),
        );
        check(
            json!({"message": 42, "module": ""}),
            Level::Info,
            "tag.default",
            "42",
            Some(7),
            json!({"module": ""}),
        );
        check(
            json!({"metadata": {"k": 1, "x": 1}, "x": 2}),
            Level::Info,
            "tag.default",
            "",
            Some(7),
            json!({"k": 1, "x": 2}),
        );
        // Nested aliases count unless the top level has one; custom pino
        // levels fall into the bucket below; numbers as text are times.
        check(
            json!({"fields": {"message": "nested", "level": "warn"}, "msg": "top"}),
            Level::Warn,
            "tag.default",
            "top",
            Some(7),
            json!({"message": "nested"}),
        );
        check(
            json!({"event": "docked", "levelname": "CRITICAL", "level": 35, "time": "1764119000"}),
            Level::Info,
            "tag.default",
            "docked",
            Some(1_764_119_000_000_000_000),
            json!({"levelname": "CRITICAL"}),
        );
        check(
            json!({"msg": {"a": 1}, "module": 5, "time": "2026-11-26 01:02:03"}),
            Level::Info,
            "5",
            r#"{"a":1}"#,
            Some(1_795_654_923_000_000_000),
            json!({}),
        );
        check(
            json!({"metadata": "not an object"}),
            Level::Info,
            "tag.default",
            "",
            Some(7),
            json!({"metadata": "not an object"}),
        );
    }

    #[test]
    fn oversize_record_is_cut_visibly() {
        let big = "x".repeat(5000);
        let Value::Object(map) = json!({"message": big, "a": "small", "b": big}) else {
            panic!()
        };
        let r = to_incoming(
            map,
            &Context {
                max_record_bytes: 1000,
                encoded_len: 10_020,
                ..cx()
            },
        );
        assert!(r.truncated);
        assert!(r.message.len() <= 1000 && r.message.ends_with(TRUNCATION_MARK));
        assert_eq!(r.metadata["b"], json!("…[truncated]"));
    }
}
