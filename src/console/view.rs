//! Values for the consoles' templates: URL building with escaping, the
//! human forms of times, durations and sizes, a log line with its search
//! hits marked, and the minimum-level chips.
//!
//! Invariant: every value put into a URL goes through [`enc`] or [`qs`];
//! values put into HTML are escaped by the templates, never here; a
//! message reaches a page only as [`Part`]s, so log text can never become
//! markup.

use std::borrow::Cow;

use crate::wire::Level;

/// Percent-encodes everything but RFC 3986's unreserved characters, so
/// the text is safe as a path segment or a query value.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Like [`enc`] but keeping `/`, for artifact paths.
pub fn enc_path(s: &str) -> String {
    s.split('/').map(enc).collect::<Vec<_>>().join("/")
}

/// A query string (`?a=1&b=2`, or empty) of the non-empty pairs.
pub fn qs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let parts: Vec<String> = pairs
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// The last value of query parameter `name`, or "".
pub fn value<'a>(p: &'a [(String, String)], name: &str) -> &'a str {
    p.iter()
        .rev()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

/// One `<option>` of a select.
pub struct Opt {
    pub value: String,
    pub label: String,
    pub selected: bool,
}

/// The options `(value, label)` of a select, the one equal to `current`
/// selected.
pub fn options(current: &str, choices: &[(&str, &str)]) -> Vec<Opt> {
    choices
        .iter()
        .map(|(v, l)| Opt {
            value: (*v).to_owned(),
            label: (*l).to_owned(),
            selected: *v == current,
        })
        .collect()
}

/// RFC 3339 to the millisecond, UTC: `2025-01-10T10:23:45.123Z`.
pub const MILLIS: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
);

/// A time for people: `2025-01-10 10:23:45.123Z`.
pub fn time(ns: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ns as i128)
        .ok()
        .and_then(|t| t.format(MILLIS).ok())
        .map_or_else(|| ns.to_string(), |s| s.replacen('T', " ", 1))
}

/// [`time`] of an RFC 3339 text (the agent's API form); the text itself
/// when it is not one.
pub fn time_of(rfc3339: &str) -> String {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| i64::try_from(t.unix_timestamp_nanos()).ok())
        .map_or_else(|| rfc3339.to_owned(), time)
}

/// `2h 05m 03s`, `4.2s`, `120ms`.
pub fn duration(ns: i64) -> String {
    let ms = ns / 1_000_000;
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let s = ms / 1_000;
    if s < 60 {
        return format!("{:.1}s", ms as f64 / 1_000.0);
    }
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}h {m:02}m {s:02}s")
    } else {
        format!("{m}m {s:02}s")
    }
}

/// `532 B`, `1.5 KiB`, `3.0 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A piece of a message: marked when it matched the search.
#[derive(Debug, PartialEq, Eq)]
pub struct Part<'a> {
    pub text: &'a str,
    pub hit: bool,
}

/// The words of a full-text search worth marking: FTS operators, quotes
/// and prefix stars left out.
pub fn terms(search: &str) -> Vec<String> {
    search
        .split_whitespace()
        .map(|t| t.trim_matches(|c: char| matches!(c, '"' | '*' | '(' | ')' | '^')))
        .filter(|t| !t.is_empty() && !matches!(*t, "AND" | "OR" | "NOT" | "NEAR"))
        .map(str::to_ascii_lowercase)
        .collect()
}

/// Splits `text` into parts, the (ASCII case-insensitive) occurrences of
/// any term marked. UTF-8 needles only ever match at character
/// boundaries, so every part is valid text.
pub fn highlight<'a>(text: &'a str, terms: &[String]) -> Vec<Part<'a>> {
    let lower = text.to_ascii_lowercase();
    let mut parts = Vec::new();
    let (mut pos, mut plain_from) = (0, 0);
    while pos < text.len() {
        let hit = terms
            .iter()
            .filter(|t| lower[pos..].starts_with(t.as_str()))
            .map(String::len)
            .max();
        match hit {
            Some(n) => {
                if plain_from < pos {
                    parts.push(Part {
                        text: &text[plain_from..pos],
                        hit: false,
                    });
                }
                parts.push(Part {
                    text: &text[pos..pos + n],
                    hit: true,
                });
                pos += n;
                plain_from = pos;
            }
            None => {
                pos += text[pos..].chars().next().map_or(1, char::len_utf8);
            }
        }
    }
    if plain_from < text.len() || parts.is_empty() {
        parts.push(Part {
            text: &text[plain_from..],
            hit: false,
        });
    }
    parts
}

/// One row of `log_table.html`.
pub struct Line<'a> {
    pub seq: u64,
    pub permalink: String,
    pub time: String,
    pub level: &'static str,
    pub level_class: &'static str,
    pub module: &'a str,
    pub parts: Vec<Part<'a>>,
    /// Empty when the record has none.
    pub metadata: Cow<'a, str>,
    pub process: String,
}

/// What one record shows in a log table (both sides' row types lend
/// their fields).
pub struct Record<'a> {
    pub seq: u64,
    /// Already in [`time`]'s form.
    pub time: String,
    pub level: Level,
    pub module: &'a str,
    pub message: &'a str,
    /// JSON text; empty or `{}` when there is none.
    pub metadata: Cow<'a, str>,
    pub process: Option<&'a str>,
    pub pid: Option<u32>,
}

impl<'a> Line<'a> {
    /// The row of `r`, its permalink the page of `logs_href` (which may
    /// already carry a query) that starts at it.
    pub fn new(r: Record<'a>, logs_href: &str, terms: &[String]) -> Line<'a> {
        let sep = if logs_href.contains('?') { '&' } else { '?' };
        Line {
            seq: r.seq,
            permalink: format!(
                "{logs_href}{sep}before={}#l{}",
                r.seq.saturating_add(1),
                r.seq
            ),
            time: r.time,
            level: r.level.as_upper(),
            level_class: r.level.as_str(),
            module: r.module,
            parts: highlight(r.message, terms),
            metadata: if r.metadata == "{}" {
                Cow::Borrowed("")
            } else {
                r.metadata
            },
            process: match (r.process, r.pid) {
                (Some(p), Some(pid)) => format!("{p}[{pid}]"),
                (Some(p), None) => p.to_owned(),
                (None, Some(pid)) => format!("[{pid}]"),
                (None, None) => String::new(),
            },
        }
    }
}

/// A minimum-level filter link.
pub struct Chip {
    pub label: &'static str,
    pub href: String,
    pub active: bool,
}

/// The minimum-level chips of a log viewer at `action`, each keeping the
/// other `filters` (any `level` among them is replaced).
pub fn level_chips(action: &str, filters: &[(&str, &str)], current: &str) -> Vec<Chip> {
    let current = current.to_ascii_lowercase();
    [
        ("all", ""),
        ("debug+", "debug"),
        ("info+", "info"),
        ("warn+", "warn"),
        ("error+", "error"),
    ]
    .into_iter()
    .map(|(label, level)| {
        let mut pairs: Vec<(&str, &str)> = filters
            .iter()
            .copied()
            .filter(|(k, _)| *k != "level")
            .collect();
        pairs.push(("level", level));
        Chip {
            label,
            href: format!("{action}{}", qs(pairs)),
            active: current == level,
        }
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_urls() {
        assert_eq!(enc("a b/c?d&e=\"<"), "a%20b%2Fc%3Fd%26e%3D%22%3C");
        assert_eq!(enc_path("logs/a b.txt"), "logs/a%20b.txt");
        assert_eq!(qs([("tag", "a&b"), ("status", "")]), "?tag=a%26b");
        assert_eq!(qs([("x", "")]), "");
    }

    #[test]
    fn human_forms() {
        let check = |ns: i64, want: &str| assert_eq!(duration(ns), want);
        check(120_000_000, "120ms");
        check(4_200_000_000, "4.2s");
        check(125_000_000_000, "2m 05s");
        check(9000 * 1_000_000_000, "2h 30m 00s");
        assert_eq!(bytes(532), "532 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(time(1_736_504_625_123_000_000), "2025-01-10 10:23:45.123Z");
        assert_eq!(
            time_of("2025-01-10T10:23:45.123456789Z"),
            "2025-01-10 10:23:45.123Z"
        );
        assert_eq!(time_of("not a time"), "not a time");
    }

    fn marked(text: &str, search: &str) -> String {
        highlight(text, &terms(search))
            .iter()
            .map(|p| {
                if p.hit {
                    format!("[{}]", p.text)
                } else {
                    p.text.to_owned()
                }
            })
            .collect()
    }

    #[test]
    fn highlights() {
        assert_eq!(
            marked("Motor stalled on axis 2", "stalled"),
            "Motor [stalled] on axis 2"
        );
        assert_eq!(marked("Motor STALLED", "stalled"), "Motor [STALLED]");
        assert_eq!(marked("a b a", "a"), "[a] b [a]");
        assert_eq!(marked("no match", "zzz"), "no match");
        assert_eq!(marked("", "x"), "");
        assert_eq!(marked("über straße", "straße"), "über [straße]");
        assert_eq!(marked("temp high", "\"temp\" AND high*"), "[temp] [high]");
        assert_eq!(marked("nothing", ""), "nothing");
    }

    #[test]
    fn lines_and_chips() {
        let r = Record {
            seq: 41,
            time: "t".into(),
            level: Level::Warn,
            module: "nav",
            message: "stalled",
            metadata: Cow::Borrowed("{}"),
            process: Some("planner"),
            pid: Some(7),
        };
        let l = Line::new(r, "/logs?session=x", &[]);
        assert_eq!(l.permalink, "/logs?session=x&before=42#l41");
        assert_eq!(
            (l.level, l.process.as_str(), l.metadata.as_ref()),
            ("WARN", "planner[7]", "")
        );
        let chips = level_chips("/logs", &[("level", "info"), ("module", "nav")], "INFO");
        assert_eq!(chips[0].href, "/logs?module=nav");
        assert_eq!(chips[2].href, "/logs?module=nav&level=info");
        assert!(chips[2].active && !chips[0].active);
    }
}
