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

use super::msgpack::{Head, Reader};
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

    let message = take_first(&mut map, MESSAGE_KEYS, message_of)
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
    let module = take_first(&mut map, MODULE_KEYS, module_of)
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
        rendered: None,
        truncated: false,
    };
    if cx.encoded_len > cx.max_record_bytes || record.message.len() > cx.max_record_bytes {
        truncate(&mut record, cx.max_record_bytes);
    }
    record
}

/// A message alias's value as the message; `Err` hands it back (it stays
/// in metadata).
fn message_of(v: Value) -> Result<String, Value> {
    match v {
        Value::String(s) => Ok(s),
        Value::Null => Err(v),
        other => Ok(other.to_string()),
    }
}

/// A module alias's value as the module; `Err` hands it back.
fn module_of(v: Value) -> Result<String, Value> {
    match v {
        Value::String(s) if !s.is_empty() => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(other),
    }
}

/// [`to_incoming`] straight from a msgpack map (Fluent Forward records),
/// for the common shape: text keys, no key twice, nested `metadata` or
/// `fields` maps whose keys are all new and none a message alias, a message
/// that is not a structure, at most 64 fields, nothing over the size limit
/// and no `logbook_dropped` or `event` (a mark). The metadata is written as JSON text straight
/// from the msgpack bytes, without the map of owned keys and values that
/// [`to_incoming`] takes (building and tearing down that map was most of
/// the Forward listener's work). `None` for any other shape: the caller
/// then decodes the map and calls [`to_incoming`], which gives the same
/// record for everything this accepts (a test compares the two over
/// generated records, and the `forward` fuzz target on every input).
///
/// `pos` is at the map's first key (its head, of `n` pairs, already read);
/// `entry_start` is where the whole entry began, for the size limit. Also
/// returns the position after the map.
pub fn from_msgpack(
    buf: &[u8],
    pos: usize,
    n: u32,
    entry_start: usize,
    cx: &Context<'_>,
) -> Option<(Incoming, usize)> {
    // Depth of the record's own values, as `Reader::map_body(n, 1)` counts
    // it, so a record too deep for the map is left to it (and refused).
    const TOP: usize = 2;
    // More fields than `taken` has bits (and an untrusted count: never an
    // allocation size).
    if n > 64 {
        return None;
    }
    let mut r = Reader { buf, pos };
    // (key, encoded value, depth) of every field, nested ones lifted.
    let mut fields: Vec<(&str, &[u8], usize)> = Vec::with_capacity(n as usize + 8);
    // Nested maps to lift, per METADATA_KEYS entry: (pairs, position).
    let mut nested: [Option<(u32, usize)>; METADATA_KEYS.len()] = [None; METADATA_KEYS.len()];
    for _ in 0..n {
        let key = text_key(r.head().ok()?)?;
        let start = r.pos;
        if let Some(i) = METADATA_KEYS.iter().position(|k| *k == key) {
            let mut inner = r.clone();
            match inner.head() {
                Ok(Head::Map(m)) => {
                    if nested[i].replace((m, inner.pos)).is_some() {
                        return None;
                    }
                    r.skip().ok()?;
                    continue;
                }
                // An extension decodes to an object, which would be lifted.
                Ok(Head::Ext(..)) => return None,
                _ => {}
            }
        }
        r.skip().ok()?;
        fields.push((key, &buf[start..r.pos], TOP));
    }
    let end = r.pos;
    for (i, slot) in nested.iter().enumerate() {
        let Some((m, at)) = *slot else { continue };
        if fields.iter().any(|f| f.0 == METADATA_KEYS[i]) {
            return None;
        }
        if m > 64 {
            return None;
        }
        let mut r = Reader { buf, pos: at };
        for _ in 0..m {
            let key = text_key(r.head().ok()?)?;
            if MESSAGE_KEYS.contains(&key) || METADATA_KEYS.contains(&key) {
                return None;
            }
            let start = r.pos;
            r.skip().ok()?;
            fields.push((key, &buf[start..r.pos], TOP + 1));
        }
    }
    if fields.len() > 64 {
        return None;
    }
    // Sorted as the map's keys are, so the text comes out in its order.
    fields.sort_by(|a, b| a.0.cmp(b.0));
    if fields.windows(2).any(|w| w[0].0 == w[1].0) {
        return None;
    }
    let find = |key: &str| fields.binary_search_by(|f| f.0.cmp(key)).ok();
    if find("logbook_dropped").is_some() || find("event").is_some() {
        return None;
    }
    // The aliases, as `take_first` picks them: the first one present whose
    // value is usable; containers and refused values stay in metadata.
    let mut container = false;
    let message = first_alias(&fields, MESSAGE_KEYS, &mut container, |v| {
        message_of(v).ok()
    })?;
    if message.is_none() && container {
        // A structured message: `to_incoming` shows it as its JSON.
        return None;
    }
    let level = first_alias(&fields, LEVEL_KEYS, &mut container, |v| level_of(&v))?;
    let time = first_alias(&fields, TIME_KEYS, &mut container, |v| time_of(&v))?;
    let module = first_alias(&fields, MODULE_KEYS, &mut container, |v| module_of(v).ok())?;
    let mut taken: u64 = 0;
    for i in [
        message.as_ref().map(|m| m.0),
        level.map(|l| l.0),
        time.map(|t| t.0),
        module.as_ref().map(|m| m.0),
    ]
    .into_iter()
    .flatten()
    {
        taken |= 1 << i;
    }
    let (message, level, timestamp_ns, module) = (
        message.map(|m| m.1),
        level.map(|l| l.1),
        time.map(|t| t.1),
        module.map(|m| m.1),
    );
    let mut message = message.unwrap_or_default();
    while message.ends_with('\n') || message.ends_with('\r') {
        message.pop();
    }
    if end - entry_start > cx.max_record_bytes || message.len() > cx.max_record_bytes {
        // To be cut: `to_incoming` measures and cuts.
        return None;
    }
    let mut out: Vec<u8> = Vec::new();
    for (i, (key, raw, depth)) in fields.iter().enumerate() {
        if taken & (1 << i) != 0 {
            continue;
        }
        out.push(if out.is_empty() { b'{' } else { b',' });
        serde_json::to_writer(&mut out, key).ok()?;
        out.push(b':');
        json_value(&mut out, raw, *depth)?;
    }
    if !out.is_empty() {
        out.push(b'}');
    }
    let record = Incoming {
        timestamp_ns: timestamp_ns.or(cx.default_time_ns),
        level: level.unwrap_or(Level::Info),
        module: module.or_else(|| cx.default_module.map(str::to_owned)),
        message,
        metadata: Map::new(),
        rendered: Some(String::from_utf8(out).ok()?),
        truncated: false,
    };
    Some((record, end))
}

/// The first of `keys` among `fields` (sorted) whose value `take` accepts,
/// with its index; `container` is set when one of them holds an array or
/// a map (skipped, as `take_first` skips them). `None` when a value cannot
/// be decoded.
fn first_alias<T>(
    fields: &[(&str, &[u8], usize)],
    keys: &[&str],
    container: &mut bool,
    take: impl Fn(Value) -> Option<T>,
) -> Option<Option<(usize, T)>> {
    for key in keys {
        let Ok(i) = fields.binary_search_by(|f| f.0.cmp(key)) else {
            continue;
        };
        let (_, raw, depth) = fields[i];
        let v = Reader::new(raw).value_at(depth).ok()?;
        if !accepts(&v) {
            *container = true;
            continue;
        }
        if let Some(t) = take(v) {
            return Some(Some((i, t)));
        }
    }
    Some(None)
}

/// Checks [`from_msgpack`] against the map path on `record` (a msgpack
/// map, after `prefix` bytes of its entry) with `max` as the record limit:
/// they must agree whenever the fast path takes the record. Returns whether
/// it did. For the unit test over generated records and the `forward` fuzz
/// target; panics on a difference.
pub fn compare_msgpack_paths(record: &[u8], prefix: usize, max: usize) -> bool {
    let mut r = Reader::new(record);
    let Ok(Head::Map(n)) = r.head() else {
        return false;
    };
    let cx = Context {
        default_module: Some("tag.default"),
        default_time_ns: Some(7),
        max_record_bytes: max,
        encoded_len: 0,
    };
    // As `forward::entry` calls it: positions within the entry.
    let mut entry = vec![0; prefix];
    entry.extend_from_slice(record);
    let fast = from_msgpack(&entry, prefix + r.pos, n, 0, &cx);
    let decoded = match r.map_body(n, 1) {
        Ok(m) => m,
        Err(_) => {
            assert!(fast.is_none(), "the map path refuses {record:x?}");
            return false;
        }
    };
    let Some((mut fast, end)) = fast else {
        return false;
    };
    assert_eq!(end, prefix + r.pos, "{record:x?}");
    let cx = Context {
        encoded_len: prefix + r.pos,
        ..cx
    };
    let mut slow = to_incoming(decoded, &cx);
    let (f, s) = (fast.take_metadata_text(), slow.take_metadata_text());
    assert_eq!((&fast, f), (&slow, s), "{record:x?}");
    true
}

/// A map key `from_msgpack` takes: valid UTF-8 text.
fn text_key(h: Head<'_>) -> Option<&str> {
    match h {
        Head::Str(s) => std::str::from_utf8(s).ok(),
        _ => None,
    }
}

/// Writes one encoded msgpack value as the JSON `serde_json` writes for the
/// [`Value`] the map decoder makes of it: text and numbers directly, the
/// rest through that `Value`. `None` if it is deeper than the decoder goes.
fn json_value(out: &mut Vec<u8>, raw: &[u8], depth: usize) -> Option<()> {
    let mut r = Reader::new(raw);
    let written = match r.head().ok()? {
        Head::Str(s) => match std::str::from_utf8(s) {
            Ok(t) => serde_json::to_writer(&mut *out, t),
            Err(_) => return json_decoded(out, raw, depth),
        },
        Head::Uint(u) => serde_json::to_writer(&mut *out, &u),
        Head::Int(i) => serde_json::to_writer(&mut *out, &i),
        Head::Bool(b) => serde_json::to_writer(&mut *out, &b),
        Head::Nil => serde_json::to_writer(&mut *out, &()),
        _ => return json_decoded(out, raw, depth),
    };
    written.ok()
}

fn json_decoded(out: &mut Vec<u8>, raw: &[u8], depth: usize) -> Option<()> {
    let v = Reader::new(raw).value_at(depth).ok()?;
    serde_json::to_writer(&mut *out, &v).ok()
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
    use crate::test_rng::Rng;
    use serde_json::json;

    const KEYS: &[&str] = &[
        "message",
        "msg",
        "event",
        "log",
        "level",
        "lvl",
        "severity",
        "levelname",
        "timestamp",
        "time",
        "ts",
        "module",
        "target",
        "logger",
        "name",
        "metadata",
        "fields",
        "a",
        "b",
        "seq",
        "logbook_dropped",
        "q\"uote",
        "é",
    ];
    const TEXTS: &[&str] = &[
        "",
        "warn",
        "INFO",
        "3",
        "42",
        "1700000000",
        "1700000000123",
        "2026-11-26T01:02:03.5Z",
        "hello\n",
        "x\"\\y\u{1}",
        "nav.planner",
        "null",
    ];

    /// One msgpack value; maps and arrays nest up to `depth` more levels.
    fn value(g: &mut Rng, out: &mut Vec<u8>, depth: usize) {
        use rmp::encode::*;
        match g.below(if depth == 0 { 12 } else { 15 }) {
            0 => write_nil(out).unwrap(),
            1 => write_bool(out, g.below(2) == 1).unwrap(),
            2 => {
                write_uint(out, g.next() % 100).unwrap();
            }
            3 => {
                let _ = write_sint(out, -(g.below(1000) as i64)).unwrap();
            }
            4 => {
                let _ = write_uint(out, g.next()).unwrap();
            }
            5 => write_f64(out, [3.5, f64::NAN, 1e21, -0.0, 1.7e9][g.below(5)]).unwrap(),
            6 => write_f32(out, 0.1).unwrap(),
            7 | 8 => write_str(out, TEXTS[g.below(TEXTS.len())]).unwrap(),
            9 => write_bin(out, [&b"ok"[..], &[0xff, 0xfe][..]][g.below(2)]).unwrap(),
            10 => {
                // EventTime, or another extension type.
                let t = [0i8, 5][g.below(2)];
                let _ = write_ext_meta(out, 8, t).unwrap();
                out.extend_from_slice(&[0x65, 0, 0, 0, 0, 0, 0, 1]);
            }
            11 => {
                // Invalid UTF-8 in a str.
                out.extend_from_slice(&[0xa2, 0xc3, 0x28]);
            }
            12 | 13 => map(g, out, depth - 1),
            _ => {
                let n = g.below(3);
                let _ = write_array_len(out, n as u32).unwrap();
                for _ in 0..n {
                    value(g, out, depth - 1);
                }
            }
        }
    }

    /// A msgpack map of up to 7 pairs; keys from [`KEYS`], now and then
    /// twice or not text.
    fn map(g: &mut Rng, out: &mut Vec<u8>, depth: usize) {
        let n = g.below(8);
        let _ = rmp::encode::write_map_len(out, n as u32).unwrap();
        for _ in 0..n {
            if g.below(40) == 0 {
                let _ = rmp::encode::write_uint(out, 7).unwrap();
            } else {
                rmp::encode::write_str(out, KEYS[g.below(KEYS.len())]).unwrap();
            }
            value(g, out, depth);
        }
    }

    /// The fast path and the map path agree on every record the fast path
    /// takes, and the fast path takes the common shapes.
    #[test]
    fn msgpack_records_map_as_their_decoded_maps_do() {
        let mut g = Rng::new(0x9e37_79b9_7f4a_7c15);
        let mut taken = 0;
        let cases = 20_000;
        for _ in 0..cases {
            // As the map of an entry `[1, {record}]`; a difference panics
            // with the record's bytes.
            let mut bytes = vec![0x92, 0x01];
            map(&mut g, &mut bytes, 3);
            let max = [1 << 16, 40][g.below(2)];
            if compare_msgpack_paths(&bytes[2..], 2, max) {
                taken += 1;
            }
        }
        assert!(
            taken > cases / 5,
            "the fast path took only {taken} of {cases}"
        );
    }

    #[test]
    fn a_robot_record_takes_the_fast_path() {
        let v = json!({"level": "warn", "target": "nav", "msg": "replanning\n",
                       "fields": {"seq": 3, "temp_c": 40.5, "ok": true}});
        let bytes = rmp_serde::to_vec(&(1_700_000_000u64, &v)).unwrap();
        let mut r = Reader::new(&bytes);
        r.head().unwrap();
        r.head().unwrap();
        let Ok(Head::Map(n)) = r.head() else {
            unreachable!()
        };
        let (mut got, end) = from_msgpack(&bytes, r.pos, n, 0, &cx()).expect("fast path");
        assert_eq!(end, bytes.len());
        assert_eq!(
            (
                got.level,
                got.module.as_deref(),
                got.message.as_str(),
                got.timestamp_ns
            ),
            (Level::Warn, Some("nav"), "replanning", Some(7))
        );
        assert_eq!(
            got.take_metadata_text(),
            r#"{"ok":true,"seq":3,"temp_c":40.5}"#
        );
    }

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
