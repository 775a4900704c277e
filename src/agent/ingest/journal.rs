//! The systemd journal as an ingest source (`ingest.journal = true`):
//! `journalctl -o export --follow` as a child process (no libsystemd linked
//! into the robot's binary), its export stream parsed into records, and its
//! position (`__CURSOR`) committed by the writer in the same transaction as
//! the records it ends (`store::journal`), so a restart resumes right after
//! the last entry the buffer holds: nothing read twice, nothing skipped.
//!
//! Mapping: `MESSAGE` → message; `PRIORITY` → level (as syslog severities);
//! `SYSLOG_IDENTIFIER`, else `_SYSTEMD_UNIT`, else `_COMM` → module;
//! `_PID`/`_UID`/`_GID`/`_COMM` → the trusted fields (journald takes them
//! from the kernel, as the agent does on its sockets);
//! `_SOURCE_REALTIME_TIMESTAMP`, else `__REALTIME_TIMESTAMP` → time; every
//! other field → metadata under its journal name (the journal's own
//! addressing fields `__CURSOR`, `__MONOTONIC_TIMESTAMP`, `__SEQNUM*` are
//! left out).
//!
//! Invariant: nothing here touches SQLite; a field is read into at most
//! `ingest.max_record_bytes` (the rest is skipped), an entry into at most
//! [`MAX_FIELDS`] fields, a batch into at most [`BATCH`] entries. A
//! journalctl that is missing or exits is reported and restarted with a
//! backoff; the agent goes on.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use super::{Pipeline, Protocol};
use crate::agent::config::AgentConfig;
use crate::agent::crash::Reporter;
use crate::agent::formats::truncate_message;
use crate::agent::record::{Incoming, Trusted};
use crate::agent::store::writer::Msg;
use crate::agent::store::{now_ns, Row};
use crate::wire::Level;

/// Most entries sent to the writer in one message.
pub const BATCH: usize = 1024;
/// Most fields kept of one entry (journald itself allows 1024 by default).
pub const MAX_FIELDS: usize = 1024;
/// Longest wait before starting journalctl again after it failed.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Bytes of journalctl's stderr kept for the error report.
const STDERR_MAX: usize = 4096;

/// Priority names of `ingest.journal_priority`, 0 (emerg) to 7 (debug).
pub const PRIORITIES: [&str; 8] = [
    "emerg", "alert", "crit", "err", "warning", "notice", "info", "debug",
];

/// What the journal reader was configured with.
#[derive(Debug, Clone, PartialEq)]
pub struct JournalConfig {
    /// Entries of these units pass (with `identifiers`: either list).
    pub units: Vec<String>,
    /// Entries with these `SYSLOG_IDENTIFIER`s pass.
    pub identifiers: Vec<String>,
    /// Entries with a `PRIORITY` above this (less urgent) are skipped.
    pub max_priority: u8,
    /// `journalctl --directory`; `None`: the system journal.
    pub directory: Option<PathBuf>,
    /// The journalctl program (a test may point it elsewhere).
    pub program: PathBuf,
    /// The database, for the cursor the last run committed.
    pub db_path: PathBuf,
    pub max_record_bytes: usize,
}

impl JournalConfig {
    /// The reader's settings, or `None` when `ingest.journal` is off.
    pub fn from_agent(cfg: &AgentConfig) -> Option<JournalConfig> {
        let raw = &cfg.raw.ingest;
        if !raw.journal {
            return None;
        }
        let max_priority = PRIORITIES
            .iter()
            .position(|p| *p == raw.journal_priority)
            .unwrap_or(7) as u8;
        let directory = Some(raw.journal_directory.trim())
            .filter(|d| !d.is_empty())
            .map(|d| cfg.state_dir.join(d));
        Some(JournalConfig {
            units: raw.journal_units.clone(),
            identifiers: raw.journal_identifiers.clone(),
            max_priority,
            directory,
            program: PathBuf::from("journalctl"),
            db_path: cfg.db_path(),
            max_record_bytes: cfg.max_record_bytes,
        })
    }

    /// journalctl's arguments: the export stream, following, from just
    /// after `cursor`, or from the start of the current boot on a first run.
    pub fn args(&self, cursor: Option<&str>) -> Vec<String> {
        let mut args: Vec<String> = ["--output=export", "--follow", "--no-tail", "--quiet"]
            .map(String::from)
            .into();
        if let Some(d) = &self.directory {
            args.push(format!("--directory={}", d.display()));
        }
        match cursor {
            Some(c) => args.push(format!("--after-cursor={c}")),
            None => args.push("--boot".into()),
        }
        args
    }

    /// Whether an entry passes the unit/identifier filters and the floor.
    fn passes(&self, priority: u8, unit: Option<&str>, identifier: Option<&str>) -> bool {
        if priority > self.max_priority {
            return false;
        }
        if self.units.is_empty() && self.identifiers.is_empty() {
            return true;
        }
        let unit_ok = unit.is_some_and(|u| self.units.iter().any(|w| w == u));
        let ident_ok = identifier.is_some_and(|i| self.identifiers.iter().any(|w| w == i));
        unit_ok || ident_ok
    }
}

/// One entry of the export stream: its fields in order, values as bytes.
pub type Entry = Vec<(String, Vec<u8>)>;

/// Reads the next entry of an export stream (`journalctl -o export`):
/// `NAME=value` lines, or a name line, a little-endian u64 length, the
/// bytes and a newline for values with control characters; an empty line
/// ends an entry. `None` at the end of the stream. Values over `max` bytes
/// are cut to `max` (the rest is read and dropped); fields past
/// [`MAX_FIELDS`] are dropped.
pub async fn next_entry<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<Entry>> {
    let mut entry = Entry::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = read_line(r, &mut line, max + 256).await?;
        if n == 0 {
            // End of stream: a last entry without its blank line still counts.
            return Ok((!entry.is_empty()).then_some(entry));
        }
        if line.is_empty() {
            if entry.is_empty() {
                continue;
            }
            return Ok(Some(entry));
        }
        let field = match line.iter().position(|b| *b == b'=') {
            Some(eq) => {
                let name = String::from_utf8_lossy(&line[..eq]).into_owned();
                let mut value = line[eq + 1..].to_vec();
                value.truncate(max);
                (name, value)
            }
            None => {
                let name = String::from_utf8_lossy(&line).into_owned();
                let mut len = [0u8; 8];
                r.read_exact(&mut len).await?;
                let len = u64::from_le_bytes(len);
                let keep = len.min(max as u64) as usize;
                let mut value = vec![0u8; keep];
                r.read_exact(&mut value).await?;
                let rest = len - keep as u64 + 1; // and the newline
                let skipped = tokio::io::copy(&mut r.take(rest), &mut tokio::io::sink()).await?;
                if skipped < rest {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                (name, value)
            }
        };
        if entry.len() < MAX_FIELDS {
            entry.push(field);
        }
    }
}

/// Reads one line without its newline into `line`, keeping at most `max`
/// bytes of it (the rest is skipped). Returns the bytes consumed; 0 at the
/// end of the stream.
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<usize> {
    let mut consumed = 0;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(consumed);
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let room = max.saturating_sub(line.len());
        let content = if done { take - 1 } else { take };
        line.extend_from_slice(&buf[..content.min(room)]);
        r.consume(take);
        consumed += take;
        if done {
            return Ok(consumed);
        }
    }
}

/// What one entry becomes: a record with its trusted fields when it passes
/// the filters, and the entry's cursor either way.
pub fn to_record(
    entry: Entry,
    cfg: &JournalConfig,
) -> (Option<(Incoming, Trusted)>, Option<String>) {
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    let mut cursor = None;
    let mut message = None;
    let mut priority = 6u8;
    let mut unit = None;
    let mut identifier = None;
    let mut comm = None;
    let (mut realtime, mut source_realtime) = (None, None);
    let mut trusted = Trusted::default();
    let mut metadata = Map::new();
    for (name, value) in entry {
        let num = || {
            std::str::from_utf8(&value)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
        };
        match name.as_str() {
            "__CURSOR" => cursor = Some(text(&value)),
            "__MONOTONIC_TIMESTAMP" | "__SEQNUM" | "__SEQNUM_ID" => {}
            "__REALTIME_TIMESTAMP" => realtime = num(),
            "_SOURCE_REALTIME_TIMESTAMP" => source_realtime = num(),
            "MESSAGE" => message = Some(text(&value)),
            "PRIORITY" => priority = num().filter(|p| *p <= 7).unwrap_or(6) as u8,
            "_PID" => trusted.pid = num().and_then(|n| u32::try_from(n).ok()),
            "_UID" => trusted.uid = num().and_then(|n| u32::try_from(n).ok()),
            "_GID" => trusted.gid = num().and_then(|n| u32::try_from(n).ok()),
            "_COMM" => comm = Some(text(&value)),
            _ => {
                let v = text(&value);
                match name.as_str() {
                    "_SYSTEMD_UNIT" => unit = Some(v.clone()),
                    "SYSLOG_IDENTIFIER" => identifier = Some(v.clone()),
                    _ => {}
                }
                metadata.insert(name, Value::String(v));
            }
        }
    }
    if !cfg.passes(priority, unit.as_deref(), identifier.as_deref()) {
        return (None, cursor);
    }
    trusted.process = comm.clone();
    let module = identifier.or(unit).or(comm);
    let mut message = message.unwrap_or_default();
    let truncated = truncate_message(&mut message, cfg.max_record_bytes);
    let timestamp_ns = source_realtime
        .or(realtime)
        .and_then(|us| i64::try_from(us).ok())
        .and_then(|us| us.checked_mul(1000));
    let record = Incoming {
        timestamp_ns,
        level: Level::from_syslog_severity(priority).unwrap_or(Level::Info),
        module,
        message,
        metadata,
        rendered: None,
        truncated,
    };
    (Some((record, trusted)), cursor)
}

/// Reads the journal into `pipeline` until `shutdown`, restarting
/// journalctl (with a backoff, from the last cursor it handed over) when it
/// fails or ends.
///
/// systemd-coredump's entries carry the `crash` mark, and their crash goes
/// to `crashes` for its report (README "Crashes").
pub async fn serve(
    cfg: JournalConfig,
    pipeline: Pipeline,
    crashes: Option<Reporter>,
    shutdown: CancellationToken,
) {
    let pipeline = pipeline.for_protocol(Protocol::Journal);
    let db = cfg.db_path.clone();
    let mut cursor =
        match tokio::task::spawn_blocking(move || crate::agent::store::journal::load_cursor(&db))
            .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::error!(
                    "reading the journal cursor failed ({e}); reading the current boot"
                );
                None
            }
            Err(_) => None,
        };
    let mut delay = Duration::from_secs(1);
    loop {
        let outcome = run_once(&cfg, &pipeline, crashes.as_ref(), &mut cursor, &shutdown).await;
        if shutdown.is_cancelled() {
            return;
        }
        match outcome {
            Ok(read) if read > 0 => delay = Duration::from_secs(1),
            _ => {}
        }
        let why = match outcome {
            Ok(_) => "journalctl ended".to_owned(),
            Err(e) => e,
        };
        tracing::error!(
            "reading the systemd journal: {why}; starting journalctl again in {}s",
            delay.as_secs()
        );
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// One run of journalctl: entries read, or why it failed. `cursor` follows
/// the last entry handed to the writer.
async fn run_once(
    cfg: &JournalConfig,
    pipeline: &Pipeline,
    crashes: Option<&Reporter>,
    cursor: &mut Option<String>,
    shutdown: &CancellationToken,
) -> Result<u64, String> {
    let mut child = tokio::process::Command::new(&cfg.program)
        .args(cfg.args(cursor.as_deref()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", cfg.program.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let errors = tokio::spawn(async move {
        let mut kept = Vec::new();
        let _ = stderr.take(STDERR_MAX as u64).read_to_end(&mut kept).await;
        String::from_utf8_lossy(&kept).trim().to_owned()
    });
    let mut reader = tokio::io::BufReader::with_capacity(64 << 10, stdout);
    let mut read = 0u64;
    let mut rows: Vec<Row> = Vec::new();
    let mut last: Option<String> = None;
    let result = loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            n = next_entry(&mut reader, cfg.max_record_bytes) => n,
        };
        match next {
            Ok(Some(entry)) => {
                read += 1;
                let (record, c) = to_record(entry, cfg);
                if let Some((mut record, trusted)) = record {
                    if let Some(crash) = crate::agent::crash::coredump::take(&mut record) {
                        if let Some(to) = crashes {
                            to.report(crash);
                        }
                    }
                    rows.push(pipeline.row(record, Arc::new(trusted), now_ns()));
                }
                if c.is_some() {
                    last = c;
                }
                // Hand over when the pipe has nothing more ready, or a
                // batch is full: a quiet journal's entries go at once.
                if reader.buffer().is_empty() || rows.len() >= BATCH {
                    if let Some(c) = last.take() {
                        send(pipeline, std::mem::take(&mut rows), c.clone()).await;
                        *cursor = Some(c);
                    }
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(format!("reading journalctl's output: {e}")),
        }
    };
    // What was read but not handed over is read again by the next run.
    let _ = child.start_kill();
    let status = child.wait().await;
    let stderr = errors.await.unwrap_or_default();
    if shutdown.is_cancelled() {
        return Ok(read);
    }
    result?;
    match status {
        Ok(s) if s.success() => Ok(read),
        Ok(s) => Err(format!("journalctl exited with {s}: {stderr}")),
        Err(e) => Err(format!("waiting for journalctl: {e}")),
    }
}

/// Queues a batch and the cursor of its last entry, waiting for room (the
/// journal keeps what is not read yet; nothing is dropped).
async fn send(pipeline: &Pipeline, rows: Vec<Row>, cursor: String) {
    pipeline.stats.spent.free();
    let n = rows.len() as u64;
    if pipeline.tx.send(Msg::Journal(rows, cursor)).await.is_err() {
        pipeline
            .stats
            .refused
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> JournalConfig {
        JournalConfig {
            units: Vec::new(),
            identifiers: Vec::new(),
            max_priority: 7,
            directory: None,
            program: "journalctl".into(),
            db_path: "/nonexistent".into(),
            max_record_bytes: 64,
        }
    }

    async fn entries(stream: &[u8], max: usize) -> Vec<Entry> {
        let mut r = stream;
        let mut out = Vec::new();
        while let Some(e) = next_entry(&mut r, max).await.unwrap() {
            out.push(e);
        }
        out
    }

    fn f(name: &str, value: &[u8]) -> (String, Vec<u8>) {
        (name.to_owned(), value.to_vec())
    }

    #[tokio::test]
    async fn export_stream_text_and_binary_fields() {
        let mut s = b"__CURSOR=c1\nMESSAGE=one\n\nMESSAGE\n".to_vec();
        s.extend_from_slice(&9u64.to_le_bytes());
        s.extend_from_slice(b"two\nlines\nPRIORITY=3\n\n\n__CURSOR=c3\n");
        let got = entries(&s, 64).await;
        assert_eq!(
            got,
            vec![
                vec![f("__CURSOR", b"c1"), f("MESSAGE", b"one")],
                vec![f("MESSAGE", b"two\nlines"), f("PRIORITY", b"3")],
                vec![f("__CURSOR", b"c3")],
            ]
        );
    }

    #[tokio::test]
    async fn over_long_values_are_cut_and_the_stream_goes_on() {
        let mut s = format!("MESSAGE={}\nA=b\n\nBIN\n", "x".repeat(1000)).into_bytes();
        s.extend_from_slice(&500u64.to_le_bytes());
        s.extend_from_slice(&[b'y'; 500]);
        s.extend_from_slice(b"\nC=d\n\n");
        let got = entries(&s, 16).await;
        assert_eq!(
            got,
            vec![
                vec![f("MESSAGE", &[b'x'; 16]), f("A", b"b")],
                vec![f("BIN", &[b'y'; 16]), f("C", b"d")],
            ]
        );
    }

    #[tokio::test]
    async fn a_binary_field_cut_short_is_an_error() {
        let mut s = b"BIN\n".to_vec();
        s.extend_from_slice(&500u64.to_le_bytes());
        s.extend_from_slice(b"short");
        let mut r = &s[..];
        assert!(next_entry(&mut r, 1000).await.is_err());
    }

    #[test]
    fn mapping() {
        let entry = vec![
            f("__CURSOR", b"s=1;i=2"),
            f("__REALTIME_TIMESTAMP", b"1700000000000001"),
            f("__MONOTONIC_TIMESTAMP", b"5"),
            f("_BOOT_ID", b"b0"),
            f("PRIORITY", b"3"),
            f("SYSLOG_IDENTIFIER", b"nav"),
            f("_SYSTEMD_UNIT", b"nav.service"),
            f("_PID", b"42"),
            f("_UID", b"1000"),
            f("_GID", b"1001"),
            f("_COMM", b"navd"),
            f("MESSAGE", b"lost localization"),
            f("CODE_LINE", b"7"),
        ];
        let (record, cursor) = to_record(entry, &cfg());
        let (r, t) = record.unwrap();
        assert_eq!(cursor.as_deref(), Some("s=1;i=2"));
        assert_eq!(r.level, Level::Error);
        assert_eq!(r.module.as_deref(), Some("nav"));
        assert_eq!(r.message, "lost localization");
        assert_eq!(r.timestamp_ns, Some(1_700_000_000_000_001_000));
        assert_eq!(
            t,
            Trusted {
                pid: Some(42),
                uid: Some(1000),
                gid: Some(1001),
                process: Some("navd".into())
            }
        );
        let keys: Vec<_> = r.metadata.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "CODE_LINE",
                "SYSLOG_IDENTIFIER",
                "_BOOT_ID",
                "_SYSTEMD_UNIT"
            ]
        );
    }

    #[test]
    fn module_falls_back_to_unit_then_comm_and_long_messages_are_marked() {
        let (r, _) = to_record(
            vec![f("_SYSTEMD_UNIT", b"a.service"), f("_COMM", b"a")],
            &cfg(),
        );
        assert_eq!(r.unwrap().0.module.as_deref(), Some("a.service"));
        let (r, _) = to_record(vec![f("_COMM", b"a")], &cfg());
        let r = r.unwrap().0;
        assert_eq!(r.module.as_deref(), Some("a"));
        assert_eq!(
            r.level,
            Level::Info,
            "no PRIORITY is info, as journald's default"
        );
        let (r, _) = to_record(vec![f("MESSAGE", &[b'z'; 200])], &cfg());
        let r = r.unwrap().0;
        assert!(r.truncated && r.message.len() <= 64);
    }

    #[test]
    fn filters() {
        let check = |units: &[&str], idents: &[&str], floor: u8, entry: Entry, want: bool| {
            let c = JournalConfig {
                units: units.iter().map(|s| s.to_string()).collect(),
                identifiers: idents.iter().map(|s| s.to_string()).collect(),
                max_priority: floor,
                ..cfg()
            };
            let (r, cursor) = to_record(entry.clone(), &c);
            assert_eq!(r.is_some(), want, "{units:?} {idents:?} {floor} {entry:?}");
            assert_eq!(cursor.as_deref(), Some("c"), "the cursor moves either way");
        };
        let e = |unit: &str, ident: &str, prio: &str| {
            vec![
                f("__CURSOR", b"c"),
                f("_SYSTEMD_UNIT", unit.as_bytes()),
                f("SYSLOG_IDENTIFIER", ident.as_bytes()),
                f("PRIORITY", prio.as_bytes()),
            ]
        };
        check(&[], &[], 7, e("a.service", "a", "7"), true);
        check(&[], &[], 6, e("a.service", "a", "7"), false);
        check(&[], &[], 3, e("a.service", "a", "3"), true);
        check(&["a.service"], &[], 7, e("a.service", "x", "6"), true);
        check(&["a.service"], &[], 7, e("b.service", "a", "6"), false);
        check(&["a.service"], &["b"], 7, e("b.service", "b", "6"), true);
        check(&[], &["b"], 7, e("b.service", "c", "6"), false);
        check(&["a.service"], &[], 4, e("a.service", "x", "6"), false);
    }

    #[test]
    fn args() {
        let c = JournalConfig {
            directory: Some("/j".into()),
            ..cfg()
        };
        assert_eq!(
            c.args(Some("s=1")),
            [
                "--output=export",
                "--follow",
                "--no-tail",
                "--quiet",
                "--directory=/j",
                "--after-cursor=s=1"
            ]
        );
        assert_eq!(cfg().args(None).last().unwrap(), "--boot");
    }
}
