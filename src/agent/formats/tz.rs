//! Time zones for RFC 3164 timestamps, which carry local wall-clock time
//! with no zone: a [`Zone`] read from TZif bytes (`/etc/localtime`, RFC
//! 8536) or a POSIX `TZ` rule, answering "what was the UTC offset at this
//! instant". Read once at start-up by the syslog listener; the `time`
//! crate's own local offset cannot be queried soundly once the agent has
//! threads, and a single offset taken at start would be an hour off after
//! the next daylight-saving change.
//!
//! Invariant: pure (bytes in, offsets out), no panic on any input; an
//! unreadable zone is `None` and the caller falls back to UTC.

use time::{Date, Month, OffsetDateTime};

/// A zone: its transitions and the rule that continues after them.
#[derive(Debug, Clone, PartialEq)]
pub struct Zone {
    /// (UTC second the offset starts, offset in seconds east), ascending.
    transitions: Vec<(i64, i32)>,
    /// Offset before the first transition (or always, without any).
    initial: i32,
    /// The POSIX rule for instants after the last transition (TZif v2+
    /// footer, or a `TZ` value).
    rule: Option<Rule>,
}

/// `std offset [dst [offset] ,start[/time],end[/time]]`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rule {
    std: i32,
    dst: Option<(i32, When, When)>,
}

/// `Mm.w.d/time`: weekday `d` (0 = Sunday) of week `w` (5 = last) of month
/// `m`, at `time` seconds of local time.
#[derive(Debug, Clone, Copy, PartialEq)]
struct When {
    month: u8,
    week: u8,
    weekday: u8,
    time: i32,
}

impl Zone {
    pub fn utc() -> Zone {
        Zone::fixed(0)
    }

    /// A zone that is always `offset` seconds east of UTC.
    pub fn fixed(offset: i32) -> Zone {
        Zone {
            transitions: Vec::new(),
            initial: offset,
            rule: None,
        }
    }

    /// The UTC offset (seconds east) in force at `unix` seconds.
    pub fn offset_at(&self, unix: i64) -> i32 {
        let i = self.transitions.partition_point(|(t, _)| *t <= unix);
        match (i, self.rule) {
            (i, Some(rule)) if i == self.transitions.len() => rule.offset_at(unix),
            (0, _) => self.initial,
            (i, _) => self.transitions[i - 1].1,
        }
    }

    /// Local wall-clock seconds (as if they were UTC) to UTC seconds. In
    /// the hour a clock skips or repeats, either reading is as good.
    pub fn local_to_utc(&self, local: i64) -> i64 {
        let guess = local - self.offset_at(local) as i64;
        local - self.offset_at(guess) as i64
    }

    /// A TZif file (RFC 8536), version 1 to 4.
    pub fn from_tzif(data: &[u8]) -> Option<Zone> {
        let v1 = Header::read(data)?;
        if v1.version == 0 {
            return v1.zone(&data[44..], 4, None);
        }
        // Version 2+: skip the 32-bit block, read the 64-bit one and the
        // footer rule after it.
        let rest = data.get(44 + v1.len(4)?..)?;
        let v2 = Header::read(rest)?;
        let body = rest.get(44..)?;
        let footer = body.get(v2.len(8)?..)?;
        let rule = footer
            .strip_prefix(b"\n")
            .and_then(|f| f.split(|&b| b == b'\n').next())
            .and_then(|f| std::str::from_utf8(f).ok())
            .and_then(Rule::parse);
        v2.zone(body, 8, rule)
    }

    /// A POSIX `TZ` rule such as `CET-1CEST,M3.5.0,M10.5.0/3` or `UTC0`.
    pub fn from_posix(tz: &str) -> Option<Zone> {
        let rule = Rule::parse(tz)?;
        Some(Zone {
            transitions: Vec::new(),
            initial: rule.std,
            rule: Some(rule),
        })
    }
}

struct Header {
    version: u8,
    isutcnt: usize,
    isstdcnt: usize,
    leapcnt: usize,
    timecnt: usize,
    typecnt: usize,
    charcnt: usize,
}

impl Header {
    fn read(data: &[u8]) -> Option<Header> {
        if data.get(..4)? != b"TZif" {
            return None;
        }
        let version = match *data.get(4)? {
            0 => 0,
            v @ b'2'..=b'9' => v - b'0',
            _ => return None,
        };
        let n = |i: usize| -> Option<usize> {
            let b = data.get(20 + 4 * i..24 + 4 * i)?;
            Some(u32::from_be_bytes(b.try_into().ok()?) as usize)
        };
        Some(Header {
            version,
            isutcnt: n(0)?,
            isstdcnt: n(1)?,
            leapcnt: n(2)?,
            timecnt: n(3)?,
            typecnt: n(4)?,
            charcnt: n(5)?,
        })
    }

    /// Bytes of the data block with `time` bytes per transition time.
    fn len(&self, time: usize) -> Option<usize> {
        let parts = [
            self.timecnt.checked_mul(time + 1)?,
            self.typecnt.checked_mul(6)?,
            self.charcnt,
            self.leapcnt.checked_mul(time + 4)?,
            self.isstdcnt,
            self.isutcnt,
        ];
        parts.iter().try_fold(0usize, |a, b| a.checked_add(*b))
    }

    fn zone(&self, body: &[u8], time: usize, rule: Option<Rule>) -> Option<Zone> {
        if self.typecnt == 0 || body.len() < self.len(time)? {
            return None;
        }
        let times = &body[..self.timecnt * time];
        let idx = &body[self.timecnt * time..self.timecnt * (time + 1)];
        let types = &body[self.timecnt * (time + 1)..][..self.typecnt * 6];
        let offset = |i: usize| -> Option<i32> {
            let t = types.get(6 * i..6 * i + 4)?;
            Some(i32::from_be_bytes(t.try_into().ok()?))
        };
        let mut transitions = Vec::with_capacity(self.timecnt);
        for k in 0..self.timecnt {
            let at = if time == 8 {
                i64::from_be_bytes(times[8 * k..8 * k + 8].try_into().ok()?)
            } else {
                i32::from_be_bytes(times[4 * k..4 * k + 4].try_into().ok()?) as i64
            };
            transitions.push((at, offset(idx[k] as usize)?));
        }
        if transitions.windows(2).any(|w| w[0].0 > w[1].0) {
            return None;
        }
        Some(Zone {
            transitions,
            initial: offset(0)?,
            rule,
        })
    }
}

impl Rule {
    fn parse(s: &str) -> Option<Rule> {
        let mut r = s.as_bytes();
        name(&mut r)?;
        let std = -hms(&mut r)?;
        if r.is_empty() {
            return Some(Rule { std, dst: None });
        }
        name(&mut r)?;
        let dst = if r.first().is_some_and(|b| *b != b',') {
            -hms(&mut r)?
        } else {
            std + 3600
        };
        r = r.strip_prefix(b",")?;
        let start = when(&mut r)?;
        r = r.strip_prefix(b",")?;
        let end = when(&mut r)?;
        if !r.is_empty() {
            return None;
        }
        Some(Rule {
            std,
            dst: Some((dst, start, end)),
        })
    }

    fn offset_at(&self, unix: i64) -> i32 {
        let Some((dst, start, end)) = self.dst else {
            return self.std;
        };
        let Ok(t) = OffsetDateTime::from_unix_timestamp(unix + self.std as i64) else {
            return self.std;
        };
        let year = t.year();
        // Start is given in standard time, end in daylight time.
        let (Some(s), Some(e)) = (start.local(year), end.local(year)) else {
            return self.std;
        };
        let s = s - self.std as i64;
        let e = e - dst as i64;
        let in_dst = if s < e {
            s <= unix && unix < e
        } else {
            // Southern hemisphere: daylight time spans the new year.
            !(e <= unix && unix < s)
        };
        if in_dst {
            dst
        } else {
            self.std
        }
    }
}

impl When {
    /// Local seconds (as if UTC) of this moment in `year`.
    fn local(&self, year: i32) -> Option<i64> {
        let month = Month::try_from(self.month).ok()?;
        let first = Date::from_calendar_date(year, month, 1).ok()?;
        let wd1 = first.weekday().number_days_from_sunday();
        let mut day = 1 + (self.weekday + 7 - wd1) % 7 + (self.week - 1) * 7;
        let last = time::util::days_in_month(month, year);
        while day > last {
            day -= 7;
        }
        let date = Date::from_calendar_date(year, month, day).ok()?;
        let midnight = date.midnight().assume_utc().unix_timestamp();
        Some(midnight + self.time as i64)
    }
}

/// A zone abbreviation: letters, or anything in `<…>`.
fn name(r: &mut &[u8]) -> Option<()> {
    let n = if r.first() == Some(&b'<') {
        r.iter().position(|&b| b == b'>')? + 1
    } else {
        let n = r.iter().take_while(|b| b.is_ascii_alphabetic()).count();
        if n < 3 {
            return None;
        }
        n
    };
    *r = &r[n..];
    Some(())
}

/// `[+-]h[h][:mm[:ss]]` in seconds.
fn hms(r: &mut &[u8]) -> Option<i32> {
    let sign = match r.first() {
        Some(b'-') => {
            *r = &r[1..];
            -1
        }
        Some(b'+') => {
            *r = &r[1..];
            1
        }
        _ => 1,
    };
    let mut total = 0;
    for (i, scale) in [3600, 60, 1].into_iter().enumerate() {
        if i > 0 {
            match r.strip_prefix(b":") {
                Some(after) => *r = after,
                None => break,
            }
        }
        let n = r.iter().take(3).take_while(|b| b.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        let v: i32 = std::str::from_utf8(&r[..n]).ok()?.parse().ok()?;
        *r = &r[n..];
        total += v * scale;
    }
    (total <= 167 * 3600).then_some(sign * total)
}

/// `Mm.w.d[/time]` (the only form current zones use).
fn when(r: &mut &[u8]) -> Option<When> {
    *r = r.strip_prefix(b"M")?;
    fn num(r: &mut &[u8], max: u8) -> Option<u8> {
        let n = r.iter().take(2).take_while(|b| b.is_ascii_digit()).count();
        let v: u8 = std::str::from_utf8(&r[..n]).ok()?.parse().ok()?;
        *r = &r[n..];
        (v <= max).then_some(v)
    }
    let month = num(r, 12)?;
    *r = r.strip_prefix(b".")?;
    let week = num(r, 5)?;
    *r = r.strip_prefix(b".")?;
    let weekday = num(r, 6)?;
    if month == 0 || week == 0 {
        return None;
    }
    let time = match r.strip_prefix(b"/") {
        Some(after) => {
            *r = after;
            hms(r)?
        }
        None => 7200,
    };
    Some(When {
        month,
        week,
        weekday,
        time,
    })
}

/// Fuzz entry point: any bytes as TZif and as a `TZ` rule.
pub fn fuzz_one(data: &[u8]) {
    if let Some(z) = Zone::from_tzif(data) {
        for t in [i64::MIN / 4, -1, 0, 1_795_655_400, i64::MAX / 4] {
            z.local_to_utc(t);
        }
    }
    if let Some(z) = std::str::from_utf8(data).ok().and_then(Zone::from_posix) {
        z.local_to_utc(1_795_655_400);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> i64 {
        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .unwrap()
            .unix_timestamp()
    }

    /// Berlin's rule: CET, CEST from the last Sunday of March 02:00 to
    /// the last Sunday of October 03:00.
    const BERLIN: &str = "CET-1CEST,M3.5.0,M10.5.0/3";

    #[test]
    fn posix_rules() {
        let check = |tz: &str, at: &str, offset: Option<i32>| {
            assert_eq!(
                Zone::from_posix(tz).map(|z| z.offset_at(utc(at))),
                offset,
                "{tz} at {at}"
            );
        };
        check("UTC0", "2026-07-01T00:00:00Z", Some(0));
        check("<+0530>-5:30", "2026-07-01T00:00:00Z", Some(19800));
        check(BERLIN, "2026-01-15T12:00:00Z", Some(3600));
        check(BERLIN, "2026-07-15T12:00:00Z", Some(7200));
        // 2026-03-29 01:00 UTC is 02:00 CET: the switch.
        check(BERLIN, "2026-03-29T00:59:59Z", Some(3600));
        check(BERLIN, "2026-03-29T01:00:00Z", Some(7200));
        // 2026-10-25 01:00 UTC is 03:00 CEST: back.
        check(BERLIN, "2026-10-25T00:59:59Z", Some(7200));
        check(BERLIN, "2026-10-25T01:00:00Z", Some(3600));
        // Southern hemisphere: Sydney, DST over the new year.
        let syd = "AEST-10AEDT,M10.1.0,M4.1.0/3";
        check(syd, "2026-01-15T00:00:00Z", Some(39600));
        check(syd, "2026-07-15T00:00:00Z", Some(36000));
        check(
            "EST5EDT,M3.2.0,M11.1.0",
            "2026-07-04T12:00:00Z",
            Some(-14400),
        );
        for bad in [
            "",
            "X1",
            "CET",
            "CET-1CEST,M3.5.0",
            "CET-1CEST,M13.1.0,M10.5.0",
            "CET-1,",
        ] {
            check(bad, "2026-07-01T00:00:00Z", None);
        }
    }

    /// A TZif v2 file: v1 block with no transitions, then a v2 block with
    /// the given transitions and types, then `footer`.
    fn tzif(transitions: &[(i64, u8)], types: &[i32], footer: &str) -> Vec<u8> {
        let header = |timecnt: usize, typecnt: usize| {
            let mut h = b"TZif2".to_vec();
            h.extend([0u8; 15]);
            for n in [0, 0, 0, timecnt, typecnt, 4] {
                h.extend((n as u32).to_be_bytes());
            }
            h
        };
        let mut out = header(0, 1);
        out.extend(0i32.to_be_bytes());
        out.extend([0, 0]);
        out.extend(b"UTC\0");
        out.extend(header(transitions.len(), types.len()));
        for (t, _) in transitions {
            out.extend(t.to_be_bytes());
        }
        out.extend(transitions.iter().map(|(_, i)| *i));
        for off in types {
            out.extend(off.to_be_bytes());
            out.extend([0, 0]);
        }
        out.extend(b"ABC\0");
        out.extend(format!("\n{footer}\n").as_bytes());
        out
    }

    #[test]
    fn tzif_transitions_then_the_footer_rule() {
        let data = tzif(
            &[
                (utc("2000-01-01T00:00:00Z"), 1),
                (utc("2010-01-01T00:00:00Z"), 0),
            ],
            &[3600, 7200],
            BERLIN,
        );
        let z = Zone::from_tzif(&data).unwrap();
        assert_eq!(
            z.offset_at(utc("1999-06-01T00:00:00Z")),
            3600,
            "before: type 0"
        );
        assert_eq!(z.offset_at(utc("2005-01-01T00:00:00Z")), 7200);
        // After the last transition, the footer rule decides.
        assert_eq!(z.offset_at(utc("2026-07-15T12:00:00Z")), 7200);
        assert_eq!(z.offset_at(utc("2026-01-15T12:00:00Z")), 3600);
        // Local 2026-07-15 14:00 in Berlin is 12:00 UTC.
        assert_eq!(
            z.local_to_utc(utc("2026-07-15T14:00:00Z")),
            utc("2026-07-15T12:00:00Z")
        );
        // Cut anywhere, it is refused, never a panic.
        for n in 0..data.len() - 6 {
            let _ = Zone::from_tzif(&data[..n]);
        }
        assert_eq!(Zone::from_tzif(b"TZif"), None);
        assert_eq!(Zone::from_tzif(b"not a zone file at all, no"), None);
    }

    #[test]
    fn the_system_zone_file_parses_when_there_is_one() {
        // Not every build machine has tzdata; when it does, the file must
        // be understood.
        if let Ok(data) = std::fs::read("/usr/share/zoneinfo/Europe/Berlin") {
            let z = Zone::from_tzif(&data).expect("Europe/Berlin");
            assert_eq!(z.offset_at(utc("2026-07-15T12:00:00Z")), 7200);
            assert_eq!(z.offset_at(utc("2026-01-15T12:00:00Z")), 3600);
        }
    }
}
