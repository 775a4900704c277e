//! systemd-coredump as a crash source: its journal entry (message id
//! [`MESSAGE_ID`], fields `COREDUMP_*`) arrives through the journal reader
//! (`agent::ingest::journal`) like any entry; [`take`] turns it into a
//! [`Crash`] and adds the `crash` mark to the record (README "Crashes").
//!
//! Invariant: pure; reads only the record's metadata, which the journal
//! reader has already bounded.

use serde_json::{Map, Value};

use super::{Crash, Source};
use crate::agent::record::Incoming;
use crate::wire::Level;

/// `MESSAGE_ID` of systemd-coredump's "Process … dumped core" entries
/// (`SD_MESSAGE_COREDUMP`).
pub const MESSAGE_ID: &str = "fc2e22bc6ee647b6b90729ab34a250b1";

/// The crash a journal record reports, when it is systemd-coredump's; the
/// record then carries the `crash` mark and is at least an error.
pub fn take(record: &mut Incoming) -> Option<Crash> {
    let m = &record.metadata;
    if m.get("MESSAGE_ID").and_then(Value::as_str) != Some(MESSAGE_ID) {
        return None;
    }
    let text = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
    let num = |k: &str| text(k).and_then(|v| v.trim().parse::<i64>().ok());
    let time_ns = num("COREDUMP_TIMESTAMP")
        .and_then(|us| us.checked_mul(1000))
        .or(record.timestamp_ns)
        .unwrap_or_else(crate::agent::store::now_ns);
    let mut extra = Map::new();
    for k in [
        "COREDUMP_UNIT",
        "COREDUMP_USER_UNIT",
        "COREDUMP_UID",
        "COREDUMP_GID",
        "COREDUMP_HOSTNAME",
        "COREDUMP_PACKAGE_NAME",
        "COREDUMP_PACKAGE_VERSION",
    ] {
        if let Some(v) = text(k) {
            extra.insert(k.to_ascii_lowercase().replace("coredump_", ""), v.into());
        }
    }
    let crash = Crash {
        source: Source::Coredump,
        executable: text("COREDUMP_EXE"),
        command: text("COREDUMP_COMM"),
        args: text("COREDUMP_CMDLINE"),
        pid: num("COREDUMP_PID").and_then(|p| u32::try_from(p).ok()),
        signal: num("COREDUMP_SIGNAL").and_then(|s| i32::try_from(s).ok()),
        time_ns,
        core: text("COREDUMP_FILENAME").map(Into::into),
        extra,
    };
    if record.level < Level::Error {
        record.level = Level::Error;
    }
    record.metadata.insert("event".into(), crash.event());
    Some(crash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::ingest::journal::{to_record, Entry, JournalConfig};

    /// A systemd-coredump entry as `journalctl -o export` prints it
    /// (systemd 252, Debian bookworm; stack trace and maps shortened).
    const EXPORT: &str = "__CURSOR=s=6a1c;i=2f1;b=9e1;m=2d4;t=60e;x=1\n\
__REALTIME_TIMESTAMP=1733390000123456\n__MONOTONIC_TIMESTAMP=3000000\n\
_BOOT_ID=9e1d0c3a2b4f4e5f8a7b6c5d4e3f2a1b\nPRIORITY=2\nSYSLOG_FACILITY=3\n\
SYSLOG_IDENTIFIER=systemd-coredump\n_TRANSPORT=journal\n_PID=5120\n_UID=0\n_GID=0\n\
_COMM=systemd-coredum\nMESSAGE_ID=fc2e22bc6ee647b6b90729ab34a250b1\n\
COREDUMP_PID=4242\nCOREDUMP_UID=1000\nCOREDUMP_GID=1000\nCOREDUMP_SIGNAL=11\n\
COREDUMP_SIGNAL_NAME=SIGSEGV\nCOREDUMP_TIMESTAMP=1733390000100000\nCOREDUMP_RLIMIT=18446744073709551615\n\
COREDUMP_HOSTNAME=robot-7\nCOREDUMP_COMM=planner\nCOREDUMP_EXE=/usr/bin/planner\n\
COREDUMP_UNIT=planner.service\nCOREDUMP_CMDLINE=/usr/bin/planner --map warehouse\n\
COREDUMP_CWD=/\nCOREDUMP_FILENAME=/var/lib/systemd/coredump/core.planner.1000.9e1d.4242.1733390000000000.zst\n\
MESSAGE=Process 4242 (planner) of user 1000 dumped core.\n\n\
Stack trace of thread 4242:\n#0  0x000055d1 main (planner + 0x1151)\n\n";

    fn entry() -> Entry {
        let mut r = tokio::io::BufReader::new(EXPORT.as_bytes());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(crate::agent::ingest::journal::next_entry(&mut r, 1 << 16))
            .unwrap()
            .unwrap()
    }

    fn cfg() -> JournalConfig {
        JournalConfig {
            units: Vec::new(),
            identifiers: Vec::new(),
            max_priority: 7,
            directory: None,
            program: "journalctl".into(),
            db_path: "/nonexistent".into(),
            max_record_bytes: 1 << 16,
        }
    }

    #[test]
    fn a_coredump_entry_is_a_crash_with_its_mark() {
        let (rec, _) = to_record(entry(), &cfg());
        let (mut rec, trusted) = rec.unwrap();
        assert_eq!(trusted.process.as_deref(), Some("systemd-coredum"));
        let crash = take(&mut rec).expect("a crash");
        assert_eq!(crash.source, Source::Coredump);
        assert_eq!(crash.executable.as_deref(), Some("/usr/bin/planner"));
        assert_eq!(crash.command.as_deref(), Some("planner"));
        assert_eq!(
            crash.args.as_deref(),
            Some("/usr/bin/planner --map warehouse")
        );
        assert_eq!(crash.pid, Some(4242));
        assert_eq!(crash.signal, Some(11));
        assert_eq!(crash.time_ns, 1_733_390_000_100_000_000);
        assert_eq!(
            crash.core.as_deref(),
            Some(std::path::Path::new(
                "/var/lib/systemd/coredump/core.planner.1000.9e1d.4242.1733390000000000.zst"
            ))
        );
        assert_eq!(crash.extra["unit"], "planner.service");
        assert_eq!(rec.level, Level::Fatal);
        // The record now makes the crash mark, at the record's time (the
        // journal's, when systemd-coredump wrote it).
        let at = rec.timestamp_ns.unwrap();
        let mark = crate::agent::marks::from_record(&rec.metadata, at)
            .unwrap()
            .unwrap();
        assert_eq!(mark.name, "crash");
        assert_eq!(mark.timestamp_ns, Some(at));
        assert_eq!(mark.priority, crate::agent::marks::Priority::High);
        let meta: Value = serde_json::from_str(&mark.metadata).unwrap();
        assert_eq!(meta["signal"], "SIGSEGV");
        assert_eq!(meta["pid"], 4242);
        assert_eq!(meta["command"], "planner");
    }

    #[test]
    fn other_entries_are_left_alone() {
        let text = EXPORT.replace(MESSAGE_ID, "39f53479d3a045ac8e11786248231fbf");
        let mut r = tokio::io::BufReader::new(text.as_bytes());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let e = rt
            .block_on(crate::agent::ingest::journal::next_entry(&mut r, 1 << 16))
            .unwrap()
            .unwrap();
        let (mut rec, _) = to_record(e, &cfg()).0.unwrap();
        let before = rec.clone();
        assert!(take(&mut rec).is_none());
        assert_eq!(rec, before);
    }
}
