//! Syslog datagrams, RFC 5424 and RFC 3164 (BSD) with the variants real
//! senders produce, parsed into one [`Incoming`] record each.
//!
//! What arrives on a local syslog socket in practice:
//! - `logger -u` (util-linux): `<13>Nov 26 01:06:35 root: hello`, no host;
//!   with `--rfc3164` a host after the time; with `--rfc5424` the full form
//!   (`<11>1 2026-11-26T01:06:36.952032+00:00 vm planner - PLAN1 [sd] msg`).
//! - Python's `SysLogHandler(address=path)`: `<12>battery low\0`, or with an
//!   ident/formatter `<11>perception: camera timeout\0` (no time, no host).
//! - rsyslog `omuxsock` (traditional forward format):
//!   `<30>Nov 26 01:02:03 robot7 systemd[1]: Started nav.service.`
//!
//! Mapping: severity → level ([`Level::from_syslog_severity`]); APP-NAME
//! or the 3164 tag → module; metadata keeps `syslog_facility` (name),
//! `syslog_severity` (0–7), and when present `hostname`, `procid` (5424
//! PROCID or the 3164 `tag[pid]`), `msgid` and `structured_data`
//! (`{"sd-id": {"param": "value"}}`, a repeated param becomes an array).
//!
//! RFC 3164 timestamps have no year and no zone. They are read as wall-clock
//! time in the [`Zone`] the caller passes (the listener's local zone, with
//! the offset in force on that date, see [`super::tz`]), and the year is the
//! one that puts the time nearest to `now` without being more than a day
//! ahead of it, so a December message read in early January lands in the
//! old year.
//!
//! Invariant: a datagram never panics the parser and is never dropped for
//! being odd, because a log line on a robot is worth more than grammar:
//! without a valid PRI it is a user.notice message (as RFC 3164 relays do);
//! an RFC 5424 header that breaks its grammar, or an impossible 3164 date,
//! makes the rest of the datagram the message and names the problem in
//! metadata under [`ERROR_KEY`] (as rsyslog falls back to the legacy
//! parser). The only error is an empty datagram.

use serde_json::{Map, Value};
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

use super::truncate_message;
use super::tz::Zone;
use crate::agent::record::Incoming;
use crate::wire::Level;

/// Why a datagram is not a proper syslog message. Only [`BadSyslog::Empty`]
/// is returned as an error; the others are kept with the record under
/// [`ERROR_KEY`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadSyslog {
    #[error("empty datagram")]
    Empty,
    #[error("RFC 5424 header: {field} {problem}")]
    Header {
        field: &'static str,
        problem: &'static str,
    },
    #[error("RFC 5424 structured data: {0}")]
    StructuredData(&'static str),
    #[error("RFC 3164 timestamp is not a real date or time")]
    Timestamp,
}

/// Facility names in the order of their codes (RFC 5424 table 1, with the
/// names Linux tools print).
pub const FACILITIES: [&str; 24] = [
    "kern",
    "user",
    "mail",
    "daemon",
    "auth",
    "syslog",
    "lpr",
    "news",
    "uucp",
    "cron",
    "authpriv",
    "ftp",
    "ntp",
    "security",
    "console",
    "solaris-cron",
    "local0",
    "local1",
    "local2",
    "local3",
    "local4",
    "local5",
    "local6",
    "local7",
];

/// Metadata key naming why a datagram was kept as plain text (a
/// [`BadSyslog`] message); listeners may count these as malformed.
pub const ERROR_KEY: &str = "syslog_error";

/// PRI used when a datagram has none: user.notice, as RFC 3164 §4.3.3 says.
const DEFAULT_PRI: u8 = 13;

/// Parses one datagram, interpreting RFC 3164 times in UTC relative to the
/// current clock.
pub fn parse(datagram: &[u8], max_record_bytes: usize) -> Result<Incoming, BadSyslog> {
    parse_at(datagram, max_record_bytes, OffsetDateTime::now_utc())
}

/// Parses one datagram; `now` gives the year of RFC 3164 timestamps and,
/// with its offset, their zone (see the module docs).
pub fn parse_at(
    datagram: &[u8],
    max_record_bytes: usize,
    now: OffsetDateTime,
) -> Result<Incoming, BadSyslog> {
    let zone = Zone::fixed(now.offset().whole_seconds());
    parse_in(datagram, max_record_bytes, now, &zone)
}

/// Parses one datagram, reading RFC 3164 wall-clock times in `zone` (with
/// the offset it had at that time) and their year by `now`.
pub fn parse_in(
    datagram: &[u8],
    max_record_bytes: usize,
    now: OffsetDateTime,
    zone: &Zone,
) -> Result<Incoming, BadSyslog> {
    // Senders end datagrams with NUL (Python, glibc's syslog(3) over a
    // stream) or a newline (shell tools); neither belongs to the message.
    let mut end = datagram.len();
    while end > 0 && matches!(datagram[end - 1], b'\0' | b'\n' | b'\r') {
        end -= 1;
    }
    let data = &datagram[..end];
    if data.is_empty() {
        return Err(BadSyslog::Empty);
    }
    let (pri, rest) = match pri(data) {
        Some((pri, rest)) => (pri, rest),
        None => (DEFAULT_PRI, data),
    };
    let mut metadata = Map::new();
    metadata.insert(
        "syslog_facility".into(),
        Value::String(FACILITIES[(pri >> 3) as usize].into()),
    );
    let severity = pri & 7;
    metadata.insert("syslog_severity".into(), Value::from(severity));
    let level = Level::from_syslog_severity(severity).expect("severity is 0-7");

    let parsed = match rest.strip_prefix(b"1 ") {
        Some(after_version) => {
            // Header fields go to a scratch map so a header that fails
            // half-way leaves no half of itself behind.
            let mut header = Map::new();
            match rfc5424(after_version, &mut header) {
                Ok(parsed) => {
                    metadata.extend(header);
                    parsed
                }
                Err(e) => {
                    metadata.insert(ERROR_KEY.into(), Value::String(e.to_string()));
                    Parsed {
                        timestamp_ns: None,
                        module: None,
                        message: rest,
                    }
                }
            }
        }
        None => rfc3164(rest, now, zone, &mut metadata),
    };
    let mut message = text(strip_bom(parsed.message));
    let truncated = truncate_message(&mut message, max_record_bytes);
    Ok(Incoming {
        timestamp_ns: parsed.timestamp_ns,
        level,
        module: parsed.module,
        message,
        metadata,
        rendered: None,
        truncated,
    })
}

struct Parsed<'a> {
    timestamp_ns: Option<i64>,
    module: Option<String>,
    message: &'a [u8],
}

/// `<N>` with N in 0..=191 and at most three digits.
fn pri(data: &[u8]) -> Option<(u8, &[u8])> {
    let inner = data.strip_prefix(b"<")?;
    let close = inner.iter().take(4).position(|&b| b == b'>')?;
    let digits = &inner[..close];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u16 = digits.iter().fold(0, |n, d| n * 10 + (d - b'0') as u16);
    (n <= 191).then_some((n as u8, &inner[close + 1..]))
}

/// `TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD [SP MSG]`,
/// after `<PRI>1 `.
fn rfc5424<'a>(
    mut rest: &'a [u8],
    metadata: &mut Map<String, Value>,
) -> Result<Parsed<'a>, BadSyslog> {
    let mut field = |name: &'static str, max: usize| -> Result<Option<&'a str>, BadSyslog> {
        let bad = |problem| BadSyslog::Header {
            field: name,
            problem,
        };
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or(bad("is missing"))?;
        let token = &rest[..sp];
        rest = &rest[sp + 1..];
        if token.is_empty() {
            return Err(bad("is empty"));
        }
        if token.len() > max {
            return Err(bad("is too long"));
        }
        if !token.iter().all(|b| (33..=126).contains(b)) {
            return Err(bad("has a character outside printable ASCII"));
        }
        let s = std::str::from_utf8(token).expect("ASCII");
        Ok((s != "-").then_some(s))
    };
    let timestamp = field("TIMESTAMP", 64)?;
    let hostname = field("HOSTNAME", 255)?;
    let app_name = field("APP-NAME", 48)?;
    let procid = field("PROCID", 128)?;
    // MSGID is followed by SP only when SD follows, which it always must.
    let msgid = field("MSGID", 32)?;
    let timestamp_ns = match timestamp {
        None => None,
        Some(t) => Some(rfc3339(t).ok_or(BadSyslog::Header {
            field: "TIMESTAMP",
            problem: "is not an RFC 3339 time",
        })?),
    };
    for (key, v) in [("hostname", hostname), ("procid", procid), ("msgid", msgid)] {
        if let Some(v) = v {
            metadata.insert(key.into(), Value::String(v.into()));
        }
    }
    let (sd, after) = structured_data(rest)?;
    if let Some(sd) = sd {
        metadata.insert("structured_data".into(), Value::Object(sd));
    }
    let message = match after {
        [] => &[][..],
        [b' ', msg @ ..] => msg,
        _ => return Err(BadSyslog::StructuredData("no space before the message")),
    };
    Ok(Parsed {
        timestamp_ns,
        module: app_name.map(str::to_owned),
        message,
    })
}

type Sd = Map<String, Value>;

/// `-` or one or more `[SD-ID *(SP PARAM-NAME="PARAM-VALUE")]`; returns
/// the elements and the bytes after them.
fn structured_data(data: &[u8]) -> Result<(Option<Sd>, &[u8]), BadSyslog> {
    let bad = BadSyslog::StructuredData;
    if let Some(after) = data.strip_prefix(b"-") {
        return Ok((None, after));
    }
    if !data.starts_with(b"[") {
        return Err(bad("is neither '-' nor '['"));
    }
    let mut sd = Map::new();
    let mut rest = data;
    while let Some(after_open) = rest.strip_prefix(b"[") {
        let (id, mut r) = sd_name(after_open).ok_or(bad("bad SD-ID"))?;
        let mut params = Map::new();
        loop {
            match r {
                [b']', after @ ..] => {
                    r = after;
                    break;
                }
                [b' ', after @ ..] => {
                    let (name, after) = sd_name(after).ok_or(bad("bad PARAM-NAME"))?;
                    let after = after
                        .strip_prefix(b"=\"")
                        .ok_or(bad("expected =\" after a name"))?;
                    let (value, after) =
                        param_value(after).ok_or(bad("unterminated PARAM-VALUE"))?;
                    add_param(&mut params, name, value);
                    r = after;
                }
                _ => return Err(bad("unterminated element")),
            }
        }
        match sd.get_mut(id) {
            // RFC 5424 forbids a repeated SD-ID; keep its params anyway.
            Some(Value::Object(existing)) => {
                for (k, v) in params {
                    match v {
                        Value::String(s) => add_param(existing, &k, s),
                        Value::Array(values) => {
                            for v in values {
                                if let Value::String(s) = v {
                                    add_param(existing, &k, s);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {
                sd.insert(id.to_owned(), Value::Object(params));
            }
        }
        rest = r;
    }
    Ok((Some(sd), rest))
}

fn add_param(params: &mut Map<String, Value>, name: &str, value: String) {
    match params.get_mut(name) {
        None => {
            params.insert(name.to_owned(), Value::String(value));
        }
        Some(Value::Array(values)) => values.push(Value::String(value)),
        Some(first) => {
            let first = first.take();
            params.insert(
                name.to_owned(),
                Value::Array(vec![first, Value::String(value)]),
            );
        }
    }
}

/// SD-NAME: 1–32 printable ASCII except `=`, SP, `]`, `"`.
fn sd_name(data: &[u8]) -> Option<(&str, &[u8])> {
    let n = data
        .iter()
        .position(|&b| !(33..=126).contains(&b) || matches!(b, b'=' | b']' | b'"'))
        .unwrap_or(data.len());
    if n == 0 || n > 32 {
        return None;
    }
    Some((std::str::from_utf8(&data[..n]).ok()?, &data[n..]))
}

/// PARAM-VALUE up to the closing quote: `\"`, `\\` and `\]` are escapes; a
/// backslash before anything else is kept, as RFC 5424 §6.3.3 says.
fn param_value(data: &[u8]) -> Option<(String, &[u8])> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'"' => return Some((text(&out), &data[i + 1..])),
            b'\\' if matches!(data.get(i + 1), Some(b'"' | b'\\' | b']')) => {
                out.push(data[i + 1]);
                i += 2;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    None
}

/// RFC 3164 and what real senders do with it: `[TIMESTAMP SP [HOSTNAME SP]]
/// [TAG[\[PID\]]: ]MSG`, where TIMESTAMP is `Mmm dd hh:mm:ss` (or an RFC
/// 3339 time, as rsyslog's high-precision forward format writes).
fn rfc3164<'a>(
    data: &'a [u8],
    now: OffsetDateTime,
    zone: &Zone,
    metadata: &mut Map<String, Value>,
) -> Parsed<'a> {
    let bsd = bsd_timestamp(data, now, zone).unwrap_or_else(|e| {
        metadata.insert(ERROR_KEY.into(), Value::String(e.to_string()));
        None
    });
    let (timestamp_ns, rest) = match bsd {
        Some((ts, rest)) => (Some(ts), rest),
        None => match first_token(data).and_then(|(t, rest)| Some((rfc3339(t)?, rest))) {
            Some((ts, rest)) => (Some(ts), rest),
            None => (None, data),
        },
    };
    let mut rest = rest;
    let mut module = None;
    if let Some((tag, pid, after)) = tag(rest) {
        module = Some(tag);
        if let Some(pid) = pid {
            metadata.insert("procid".into(), Value::String(pid));
        }
        rest = after;
    } else if timestamp_ns.is_some() {
        // After a time, RFC 3164 puts the host; a tag may follow it.
        if let Some((host, after)) = first_token(rest) {
            if !host.ends_with(':') && !host.contains('[') {
                metadata.insert("hostname".into(), Value::String(host.into()));
                rest = after;
                if let Some((tag, pid, after)) = tag(rest) {
                    module = Some(tag);
                    if let Some(pid) = pid {
                        metadata.insert("procid".into(), Value::String(pid));
                    }
                    rest = after;
                }
            }
        }
    }
    Parsed {
        timestamp_ns,
        module,
        message: rest,
    }
}

/// The first space-separated token (printable ASCII, 1–255 bytes) and the
/// rest after its space; `None` if there is no space after it.
fn first_token(data: &[u8]) -> Option<(&str, &[u8])> {
    let sp = data.iter().position(|&b| b == b' ')?;
    let token = &data[..sp];
    if token.is_empty() || token.len() > 255 || !token.iter().all(|b| (33..=126).contains(b)) {
        return None;
    }
    Some((std::str::from_utf8(token).ok()?, &data[sp + 1..]))
}

/// `TAG: ` or `TAG[PID]: ` (or the same at the very end): TAG is 1–48
/// printable characters without `:`, `[`, `]`; returns tag, pid and the
/// message after the colon and one space.
fn tag(data: &[u8]) -> Option<(String, Option<String>, &[u8])> {
    let n = data
        .iter()
        .take(49)
        .position(|&b| !(33..=126).contains(&b) || matches!(b, b':' | b'[' | b']'))?;
    if n == 0 {
        return None;
    }
    let tag = std::str::from_utf8(&data[..n]).ok()?.to_owned();
    let mut rest = &data[n..];
    let mut pid = None;
    if let Some(after) = rest.strip_prefix(b"[") {
        let close = after.iter().take(129).position(|&b| b == b']')?;
        let p = &after[..close];
        if p.is_empty() || !p.iter().all(|b| (33..=126).contains(b)) {
            return None;
        }
        pid = Some(std::str::from_utf8(p).ok()?.to_owned());
        rest = &after[close + 1..];
    }
    let rest = rest.strip_prefix(b":")?;
    let rest = match rest {
        [] => rest,
        [b' ', after @ ..] => after,
        _ => return None,
    };
    Some((tag, pid, rest))
}

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// `Mmm dd hh:mm:ss[.frac] ` (day space-padded or not). `Ok(None)` when the
/// datagram does not start with a month name; an impossible date or time
/// after one is an error.
fn bsd_timestamp<'a>(
    data: &'a [u8],
    now: OffsetDateTime,
    zone: &Zone,
) -> Result<Option<(i64, &'a [u8])>, BadSyslog> {
    let Some(month) = data.get(..4).and_then(|m| {
        MONTHS
            .iter()
            .position(|name| &m[..3] == *name && m[3] == b' ')
    }) else {
        return Ok(None);
    };
    let mut r = &data[4..];
    if r.first() == Some(&b' ') {
        r = &r[1..];
    }
    let num = |r: &mut &[u8], max_digits: usize| -> Option<u32> {
        let n = r
            .iter()
            .take(max_digits)
            .take_while(|b| b.is_ascii_digit())
            .count();
        if n == 0 {
            return None;
        }
        let v = r[..n].iter().fold(0u32, |v, d| v * 10 + (d - b'0') as u32);
        *r = &r[n..];
        Some(v)
    };
    let sep = |r: &mut &[u8], c: u8| -> Option<()> {
        *r = r.strip_prefix(&[c])?;
        Some(())
    };
    // Anything not shaped like a BSD time is not one: the month name was
    // just the first word of a message ("Mar 3 was a good day" ...).
    let shape = (|| {
        let day = num(&mut r, 2)?;
        sep(&mut r, b' ')?;
        let h = num(&mut r, 2)?;
        sep(&mut r, b':')?;
        let m = num(&mut r, 2)?;
        sep(&mut r, b':')?;
        let s = num(&mut r, 2)?;
        let mut nanos = 0u32;
        if let Some(after) = r.strip_prefix(b".") {
            let n = after
                .iter()
                .take(9)
                .take_while(|b| b.is_ascii_digit())
                .count();
            if n > 0 {
                let digits = after[..n]
                    .iter()
                    .fold(0u32, |v, d| v * 10 + (d - b'0') as u32);
                nanos = digits * 10u32.pow(9 - n as u32);
                r = &after[n..];
            }
        }
        match r {
            [] => {}
            [b' ', after @ ..] => r = after,
            _ => return None,
        }
        Some((day, h, m, s, nanos))
    })();
    let Some((day, h, m, s, nanos)) = shape else {
        return Ok(None);
    };
    let month = Month::try_from(month as u8 + 1).expect("1-12");
    let time = Time::from_hms_nano(h as u8, m as u8, s.min(59) as u8, nanos)
        .map_err(|_| BadSyslog::Timestamp)?;
    // The year: the one that puts the time nearest to now without being
    // more than a day ahead of it (a sender's clock may run a little
    // ahead; a December line read in January is last year's).
    let now_s = now.unix_timestamp();
    let year = now.to_offset(time::UtcOffset::UTC).year();
    let candidates: Vec<i64> = (year - 1..=year + 1)
        .filter_map(|y| Date::from_calendar_date(y, month, day as u8).ok())
        .map(|d| {
            zone.local_to_utc(
                PrimitiveDateTime::new(d, time)
                    .assume_utc()
                    .unix_timestamp(),
            )
        })
        .collect();
    let nearest = |allowed: &dyn Fn(&i64) -> bool| {
        candidates
            .iter()
            .copied()
            .filter(|t| allowed(t))
            .min_by_key(|t| (t - now_s).abs())
    };
    let secs = nearest(&|t| *t - now_s <= 86_400)
        .or_else(|| nearest(&|_| true))
        .ok_or(BadSyslog::Timestamp)?;
    let best = OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|_| BadSyslog::Timestamp)?
        .replace_nanosecond(nanos)
        .map_err(|_| BadSyslog::Timestamp)?;
    let ns = i64::try_from(best.unix_timestamp_nanos()).map_err(|_| BadSyslog::Timestamp)?;
    Ok(Some((ns, r)))
}

fn rfc3339(s: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos()).ok()
}

fn strip_bom(msg: &[u8]) -> &[u8] {
    msg.strip_prefix(b"\xef\xbb\xbf").unwrap_or(msg)
}

/// Messages are UTF-8 in practice; a sender that writes Latin-1 still gets
/// its text through, with replacement characters for the odd bytes.
fn text(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(b).into_owned(),
    }
}

/// Fuzz target body (`fuzz/fuzz_targets/syslog.rs` calls it): any bytes give
/// a record within the limit or an error, never a panic.
pub fn fuzz_one(data: &[u8]) {
    let now = OffsetDateTime::from_unix_timestamp(1_764_119_000).expect("valid");
    match parse_at(data, 256, now) {
        Ok(r) => {
            assert!(r.message.len() <= 256);
            assert!(r.metadata.contains_key("syslog_severity"));
        }
        // Only a datagram of nothing but terminators is refused.
        Err(e) => {
            assert_eq!(e, BadSyslog::Empty);
            assert!(data.iter().all(|b| matches!(b, b'\0' | b'\n' | b'\r')));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::formats::mutate;
    use serde_json::json;

    /// 2026-11-26T01:10:00Z, the day the fixtures were captured.
    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_795_655_400).unwrap()
    }

    fn ts(rfc3339_text: &str) -> Option<i64> {
        Some(rfc3339(rfc3339_text).unwrap())
    }

    fn check(
        input: &[u8],
        level: Level,
        module: Option<&str>,
        message: &str,
        time: Option<i64>,
        meta: Value,
    ) {
        let r = parse_at(input, 1024, now())
            .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(input)));
        assert_eq!(
            (
                r.level,
                r.module.as_deref(),
                r.message.as_str(),
                r.timestamp_ns,
                Value::Object(r.metadata)
            ),
            (level, module, message, time, meta),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/formats/syslog/{name}.bin",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    const SAMPLES: &[&str] = &[
        "logger_u_tag_pid",
        "logger_u_default",
        "logger_u_rfc5424_sd",
        "logger_u_rfc3164",
        "logger_u_rfc5424_notime",
        "python_sysloghandler_plain",
        "python_sysloghandler_ident",
        "python_sysloghandler_formatter_utf8",
    ];

    #[test]
    fn captured_from_real_senders() {
        check(
            &fixture("logger_u_tag_pid"),
            Level::Warn,
            Some("navstack"),
            "obstacle ahead at 1.2 m",
            ts("2026-11-26T01:06:36Z"),
            json!({"syslog_facility": "local3", "syslog_severity": 4, "procid": "4242"}),
        );
        check(
            &fixture("logger_u_default"),
            Level::Info,
            Some("root"),
            "hello from the shell",
            ts("2026-11-26T01:06:36Z"),
            json!({"syslog_facility": "user", "syslog_severity": 5}),
        );
        check(
            &fixture("logger_u_rfc5424_sd"),
            Level::Error,
            Some("planner"),
            "route failed",
            ts("2026-11-26T01:06:36.952032Z"),
            json!({
                "syslog_facility": "user", "syslog_severity": 3, "hostname": "vm", "msgid": "PLAN1",
                "structured_data": {"timeQuality": {"tzKnown": "1", "isSynced": "0"}, "mission@32473": {"id": "m-17", "note": "a \"quoted\" ] value"}},
            }),
        );
        check(
            &fixture("logger_u_rfc3164"),
            Level::Debug,
            Some("motor"),
            "current 3.2 A",
            ts("2026-11-26T01:06:36Z"),
            json!({"syslog_facility": "daemon", "syslog_severity": 7, "hostname": "vm"}),
        );
        check(
            &fixture("logger_u_rfc5424_notime"),
            Level::Info,
            Some("lidar"),
            "spin ok",
            None,
            json!({"syslog_facility": "local0", "syslog_severity": 6}),
        );
        check(
            &fixture("python_sysloghandler_plain"),
            Level::Warn,
            None,
            "battery low: 14%",
            None,
            json!({"syslog_facility": "user", "syslog_severity": 4}),
        );
        check(
            &fixture("python_sysloghandler_ident"),
            Level::Error,
            Some("perception"),
            "camera timeout",
            None,
            json!({"syslog_facility": "user", "syslog_severity": 3}),
        );
        check(
            &fixture("python_sysloghandler_formatter_utf8"),
            Level::Info,
            Some("py"),
            "INFO Détection: 5 obstacles",
            None,
            json!({"syslog_facility": "local5", "syslog_severity": 6, "procid": "10678"}),
        );
    }

    #[test]
    fn rfc_and_relay_variants() {
        let u = |sev: u8| json!({"syslog_facility": "user", "syslog_severity": sev});
        // RFC 5424 §6.5 examples.
        check(b"<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - \xef\xbb\xbf'su root' failed for lonvick on /dev/pts/8", Level::Fatal, Some("su"), "'su root' failed for lonvick on /dev/pts/8", ts("2003-10-11T22:14:15.003Z"),
            json!({"syslog_facility": "auth", "syslog_severity": 2, "hostname": "mymachine.example.com", "msgid": "ID47"}));
        check(b"<165>1 2003-08-24T05:14:15.000003-07:00 192.0.2.1 myproc 8710 - - %% It's time to make the do-nuts.", Level::Info, Some("myproc"), "%% It's time to make the do-nuts.", ts("2003-08-24T12:14:15.000003Z"),
            json!({"syslog_facility": "local4", "syslog_severity": 5, "hostname": "192.0.2.1", "procid": "8710"}));
        check(b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut=\"3\" eventSource=\"Application\" eventID=\"1011\"][examplePriority@32473 class=\"high\"]", Level::Info, Some("evntslog"), "", ts("2003-10-11T22:14:15.003Z"),
            json!({"syslog_facility": "local4", "syslog_severity": 5, "hostname": "mymachine.example.com", "msgid": "ID47",
                   "structured_data": {"exampleSDID@32473": {"iut": "3", "eventSource": "Application", "eventID": "1011"}, "examplePriority@32473": {"class": "high"}}}));
        check(
            b"<14>1 - - - - - [a x=\"1\" x=\"2\" y=\"back\\\\slash \\n kept\"] m",
            Level::Info,
            None,
            "m",
            None,
            json!({"syslog_facility": "user", "syslog_severity": 6, "structured_data": {"a": {"x": ["1", "2"], "y": "back\\slash \\n kept"}}}),
        );
        // RFC 3164 §5.4 example and rsyslog omuxsock's traditional format.
        check(
            b"<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick on /dev/pts/8",
            Level::Fatal,
            Some("su"),
            "'su root' failed for lonvick on /dev/pts/8",
            ts("2026-10-11T22:14:15Z"),
            json!({"syslog_facility": "auth", "syslog_severity": 2, "hostname": "mymachine"}),
        );
        check(
            b"<30>Nov 26 01:02:03 robot7 systemd[1]: Started nav.service.\n",
            Level::Info,
            Some("systemd"),
            "Started nav.service.",
            ts("2026-11-26T01:02:03Z"),
            json!({"syslog_facility": "daemon", "syslog_severity": 6, "hostname": "robot7", "procid": "1"}),
        );
        // rsyslog's high-precision forward format: RFC 3339 time in 3164.
        check(
            b"<13>2026-11-26T01:02:03.123+01:00 robot7 nav[9]: up",
            Level::Info,
            Some("nav"),
            "up",
            ts("2026-11-26T00:02:03.123Z"),
            json!({"syslog_facility": "user", "syslog_severity": 5, "hostname": "robot7", "procid": "9"}),
        );
        // Unpadded day, fractional seconds, no host, bare message.
        check(
            b"<14>Nov 6 01:02:03.25 tag: m",
            Level::Info,
            Some("tag"),
            "m",
            ts("2026-11-06T01:02:03.25Z"),
            u(6),
        );
        check(
            b"<14>Nov  6 01:02:03 host message without tag",
            Level::Info,
            None,
            "message without tag",
            ts("2026-11-06T01:02:03Z"),
            json!({"syslog_facility": "user", "syslog_severity": 6, "hostname": "host"}),
        );
        check(
            b"<14>Mar 3 was a good day",
            Level::Info,
            None,
            "Mar 3 was a good day",
            None,
            u(6),
        );
        check(b"<14>tag:", Level::Info, Some("tag"), "", None, u(6));
        check(
            b"<14>tag:no space is message",
            Level::Info,
            None,
            "tag:no space is message",
            None,
            u(6),
        );
        // Missing or invalid PRI: user.notice, the whole datagram is the message.
        check(b"plain text\0", Level::Info, None, "plain text", None, u(5));
        check(b"<192>x", Level::Info, None, "<192>x", None, u(5));
        check(b"<1x>y", Level::Info, None, "<1x>y", None, u(5));
        check(
            b"<0>kern: panic",
            Level::Fatal,
            Some("kern"),
            "panic",
            None,
            json!({"syslog_facility": "kern", "syslog_severity": 0}),
        );
        check(
            b"<14>caf\xe9 latin-1",
            Level::Info,
            None,
            "caf\u{fffd} latin-1",
            None,
            u(6),
        );
    }

    #[test]
    fn year_is_the_nearest_to_now_and_not_ahead_by_more_than_a_day() {
        let at = |y, m: u8, d, h: u8, min: u8| {
            OffsetDateTime::new_utc(
                Date::from_calendar_date(y, Month::try_from(m).unwrap(), d).unwrap(),
                Time::from_hms(h, min, 0).unwrap(),
            )
        };
        let check = |line: &[u8], now: OffsetDateTime, expected: &str| {
            let r = parse_in(line, 100, now, &Zone::utc()).unwrap();
            assert_eq!(r.timestamp_ns, ts(expected), "{now}");
        };
        let dec31 = b"<14>Dec 31 23:59:00 t: m";
        let jan1 = b"<14>Jan  1 00:01:00 t: m";
        // A December line read in January is last year's.
        check(dec31, at(2027, 1, 1, 0, 0), "2026-12-31T23:59:00Z");
        // Weeks ahead of now is not "nearest": it is last year's.
        check(dec31, at(2026, 12, 1, 0, 0), "2025-12-31T23:59:00Z");
        // A sender's clock a few minutes ahead still gives this year.
        check(jan1, at(2026, 12, 31, 23, 59), "2027-01-01T00:01:00Z");
        // More than a day ahead: the past year instead.
        check(jan1, at(2026, 12, 30, 23, 0), "2026-01-01T00:01:00Z");
        // Feb 29 exists only in leap years: 2028 is the one.
        check(
            b"<14>Feb 29 12:00:00 t: m",
            at(2028, 3, 1, 0, 0),
            "2028-02-29T12:00:00Z",
        );
    }

    #[test]
    fn bsd_times_are_local_time() {
        let now = OffsetDateTime::from_unix_timestamp(1_795_655_400).unwrap(); // 2026-11-26T01:10Z
        let check = |zone: &Zone, line: &[u8], expected: &str| {
            let r = parse_in(line, 100, now, zone).unwrap();
            assert_eq!(
                r.timestamp_ns,
                ts(expected),
                "{}",
                String::from_utf8_lossy(line)
            );
        };
        let plus2 = Zone::fixed(7200);
        check(&plus2, b"<14>Nov 26 03:00:00 t: m", "2026-11-26T01:00:00Z");
        check(
            &plus2,
            b"<14>Nov 26 03:00:00.25 t: m",
            "2026-11-26T01:00:00.25Z",
        );
        let minus5 = Zone::fixed(-5 * 3600);
        check(&minus5, b"<14>Nov 25 20:00:00 t: m", "2026-11-26T01:00:00Z");
        // Berlin: the offset of that date, not of now (CEST in July).
        let berlin = Zone::from_posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap();
        check(&berlin, b"<14>Jul 15 14:00:00 t: m", "2026-07-15T12:00:00Z");
        check(&berlin, b"<14>Nov 26 02:00:00 t: m", "2026-11-26T01:00:00Z");
        // parse_at takes the zone from now's offset, as before.
        let local = now.to_offset(time::UtcOffset::from_hms(2, 0, 0).unwrap());
        assert_eq!(
            parse_at(b"<14>Nov 26 03:00:00 t: m", 100, local)
                .unwrap()
                .timestamp_ns,
            ts("2026-11-26T01:00:00Z")
        );
        // RFC 5424 times carry their own offset: the zone is not applied.
        check(
            &plus2,
            b"<14>1 2026-11-26T01:00:00Z h a - - - m",
            "2026-11-26T01:00:00Z",
        );
    }

    /// A malformed datagram is kept whole as the message, with the
    /// problem named in metadata.
    fn check_kept(input: &[u8], problem: BadSyslog) {
        let r = parse_at(input, 1024, now()).unwrap();
        let text = String::from_utf8_lossy(input);
        let body = &text[text.find('>').unwrap() + 1..];
        assert_eq!(
            (
                r.message.as_str(),
                r.metadata.get(ERROR_KEY),
                r.module,
                r.timestamp_ns
            ),
            (body, Some(&Value::String(problem.to_string())), None, None),
            "{text:?}"
        );
        assert_eq!(
            r.metadata.len(),
            3,
            "only facility, severity and the error: {:?}",
            r.metadata
        );
    }

    #[test]
    fn malformed() {
        assert_eq!(parse_at(b"", 1024, now()), Err(BadSyslog::Empty));
        assert_eq!(parse_at(b"\0\n", 1024, now()), Err(BadSyslog::Empty));
        let h = |field, problem| BadSyslog::Header { field, problem };
        check_kept(b"<14>1 ", h("TIMESTAMP", "is missing"));
        check_kept(b"<14>1 item left", h("HOSTNAME", "is missing"));
        check_kept(
            b"<14>1 2003-10-11T22:14:15Z host app",
            h("APP-NAME", "is missing"),
        );
        check_kept(
            b"<14>1 yesterday host app - - - m",
            h("TIMESTAMP", "is not an RFC 3339 time"),
        );
        check_kept(b"<14>1 -  app - - - m", h("HOSTNAME", "is empty"));
        check_kept(
            b"<14>1 - h\xc3\xa9 app - - - m",
            h("HOSTNAME", "has a character outside printable ASCII"),
        );
        check_kept(
            &[&b"<14>1 - - - - "[..], &[b'm'; 33], b" - x"].concat(),
            h("MSGID", "is too long"),
        );
        check_kept(
            b"<14>1 - host - - - x",
            BadSyslog::StructuredData("is neither '-' nor '['"),
        );
        check_kept(
            b"<14>1 - host - - - [id",
            BadSyslog::StructuredData("unterminated element"),
        );
        check_kept(
            b"<14>1 - - - - - [id a=\"open",
            BadSyslog::StructuredData("unterminated PARAM-VALUE"),
        );
        check_kept(
            b"<14>1 - - - - - [id a=1]",
            BadSyslog::StructuredData("expected =\" after a name"),
        );
        check_kept(
            b"<14>1 - - - - - []",
            BadSyslog::StructuredData("bad SD-ID"),
        );
        check_kept(
            b"<14>1 - - - - - -x",
            BadSyslog::StructuredData("no space before the message"),
        );
        check_kept(b"<14>Feb 30 01:02:03 t: m", BadSyslog::Timestamp);
        check_kept(b"<14>Nov 26 25:02:03 t: m", BadSyslog::Timestamp);
    }

    #[test]
    fn oversize_message_is_cut_visibly() {
        let mut d = b"<14>t: ".to_vec();
        d.extend(vec![b'x'; 5000]);
        let r = parse_at(&d, 100, now()).unwrap();
        assert!(r.truncated && r.message.len() <= 100);
        assert!(r.message.ends_with(crate::agent::formats::TRUNCATION_MARK));
    }

    #[test]
    fn every_truncation_is_a_record_or_an_error() {
        for s in SAMPLES {
            let bytes = fixture(s);
            for cut in 0..=bytes.len() {
                fuzz_one(&bytes[..cut]);
            }
        }
    }

    #[test]
    fn mutations_never_panic() {
        let mut rng = mutate::Rng::new(0xface_b00c);
        let samples: Vec<Vec<u8>> = SAMPLES.iter().map(|s| fixture(s)).collect();
        for _ in 0..50_000 {
            let s = &samples[rng.below(samples.len())];
            fuzz_one(&mutate::mutate(&mut rng, s));
        }
    }
}
