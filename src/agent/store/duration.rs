//! A session's duration: the one boot-aware rule the writer (when a session
//! ends) and every reader (the local API, the uploader) apply.
//!
//! Invariant: pure (the clocks come in as [`Now`]); never negative; an
//! active session is measured on `CLOCK_BOOTTIME` only when this boot saw
//! it start (that clock restarts at boot), on the wall clock otherwise.

use super::{boottime_ns, now_ns};

/// Both clocks, read once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Unix nanoseconds.
    pub wall_ns: i64,
    /// `CLOCK_BOOTTIME` nanoseconds of the boot this process runs in.
    pub boottime_ns: i64,
}

impl Now {
    pub fn read() -> Now {
        Now {
            wall_ns: now_ns(),
            boottime_ns: boottime_ns(),
        }
    }
}

/// What a session row says about its time.
#[derive(Debug, Clone, Copy)]
pub struct Span<'a> {
    pub started_ns: i64,
    pub started_boottime_ns: i64,
    /// The boot the session started in.
    pub boot_id: &'a str,
    /// Set once the session ended.
    pub ended_ns: Option<i64>,
    /// Set when the session ended: its duration, fixed then.
    pub duration_ns: Option<i64>,
}

/// The duration of `span` as seen at `now` in the boot `boot_id`: the
/// duration fixed when it ended; else, if it ended, ended − started; else,
/// if it started in this boot, `CLOCK_BOOTTIME` now − at its start (immune
/// to wall-clock steps, counting suspend); else wall clock now − started.
/// Never negative.
pub fn duration_ns(span: &Span<'_>, boot_id: &str, now: Now) -> i64 {
    let d = match (span.duration_ns, span.ended_ns) {
        (Some(d), _) => d,
        (None, Some(ended)) => ended - span.started_ns,
        (None, None) if span.boot_id == boot_id => now.boottime_ns - span.started_boottime_ns,
        (None, None) => now.wall_ns - span.started_ns,
    };
    d.max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_rule() {
        let now = Now {
            wall_ns: 10_000,
            boottime_ns: 500,
        };
        let check = |boot: &str, ended: Option<i64>, fixed: Option<i64>, want: i64| {
            let span = Span {
                started_ns: 9_000,
                started_boottime_ns: 200,
                boot_id: "b1",
                ended_ns: ended,
                duration_ns: fixed,
            };
            assert_eq!(
                duration_ns(&span, boot, now),
                want,
                "{boot} {ended:?} {fixed:?}"
            );
        };
        // Ended: the duration fixed at its end, whatever the clocks say now.
        check("b1", Some(9_700), Some(650), 650);
        check("b2", Some(9_700), Some(650), 650);
        // Ended without a fixed duration: its two ends.
        check("b1", Some(9_700), None, 700);
        // Active, started in this boot: the boot clock.
        check("b1", None, None, 300);
        // Active, started in an earlier boot: the wall clock.
        check("b2", None, None, 1_000);
        // Never negative (a wall clock stepped back, a bad row).
        check("b1", None, Some(-5), 0);
        check("b1", Some(8_000), None, 0);
        let earlier = Span {
            started_ns: 20_000,
            started_boottime_ns: 0,
            boot_id: "b0",
            ended_ns: None,
            duration_ns: None,
        };
        assert_eq!(duration_ns(&earlier, "b1", now), 0);
    }
}
