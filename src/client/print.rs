//! How the `logbook` CLI prints: records (local and hub alike, through
//! [`record`]), sessions, the session table, `logbook status`, artifact
//! listings and durations.
//!
//! Invariant: formatting only, no I/O but the writer it is given; a local
//! record and a hub record with the same fields print the same line, and
//! `--json` prints the object the API sent, one per line.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

use serde::Serialize;

use crate::agent::types::{ArtifactItem, LogItem, SessionView, Status, SyncStatus};
use crate::client::hub::{HubLog, HubSession};
use crate::wire::Level;

/// The fields of a record the text line shows, wherever it came from.
pub struct RecordFields<'a> {
    pub timestamp: &'a str,
    pub level: Level,
    pub module: &'a str,
    pub message: &'a str,
    pub metadata: Option<&'a serde_json::Map<String, serde_json::Value>>,
    pub process: Option<&'a str>,
    pub pid: Option<u32>,
}

/// A record the CLI prints: a local [`LogItem`] or a hub [`HubLog`].
pub trait Record: Serialize {
    fn fields(&self) -> RecordFields<'_>;
}

impl Record for LogItem {
    fn fields(&self) -> RecordFields<'_> {
        RecordFields {
            timestamp: &self.timestamp,
            level: self.level,
            module: &self.module,
            message: &self.message,
            metadata: Some(&self.metadata),
            process: self.process.as_deref(),
            pid: self.pid,
        }
    }
}

/// `--json` prints the hub's object, which adds `device_id`.
impl Record for HubLog {
    fn fields(&self) -> RecordFields<'_> {
        RecordFields {
            timestamp: &self.timestamp,
            level: self.level,
            module: &self.module,
            message: &self.message,
            metadata: self.metadata.as_object(),
            process: self.process.as_deref(),
            pid: self.pid,
        }
    }
}

/// One value as one JSON line.
pub fn json_line(out: &mut impl Write, v: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, v)?;
    writeln!(out)
}

/// One row of `logbook marks`: `TIME PRIORITY NAME -BEFORE/+AFTER
/// SESSION {metadata}`, and why its pin was released when it was.
pub fn mark_row(out: &mut impl Write, m: &MarkRow<'_>) -> io::Result<()> {
    write!(
        out,
        "{}  {:<6}  {}  -{}/+{}  {}",
        m.timestamp,
        m.priority,
        m.name,
        human_duration(m.before_seconds),
        human_duration(m.after_seconds),
        m.session.unwrap_or("-"),
    )?;
    if !m.metadata.is_empty() {
        write!(out, "  {}", serde_json::Value::Object(m.metadata.clone()))?;
    }
    if let Some(r) = m.released {
        write!(out, "  (pin released: {r})")?;
    }
    writeln!(out)
}

/// What [`mark_row`] prints, from a local or a hub mark.
pub struct MarkRow<'a> {
    pub timestamp: &'a str,
    pub priority: &'a str,
    pub name: &'a str,
    pub before_seconds: f64,
    pub after_seconds: f64,
    pub session: Option<&'a str>,
    pub metadata: &'a serde_json::Map<String, serde_json::Value>,
    pub released: Option<&'a str>,
}

/// One record: its JSON object (`json`), or `TIME LEVEL module: message
/// {metadata} [process pid]`.
pub fn record(out: &mut impl Write, r: &impl Record, json: bool) -> io::Result<()> {
    if json {
        return json_line(out, r);
    }
    let f = r.fields();
    // Milliseconds are enough on a terminal.
    let ts = match f.timestamp.find('.') {
        Some(dot) if f.timestamp.len() > dot + 4 => format!("{}Z", &f.timestamp[..dot + 4]),
        _ => f.timestamp.to_owned(),
    };
    write!(out, "{ts} {:<5} ", f.level.as_upper())?;
    if !f.module.is_empty() {
        write!(out, "{}: ", f.module)?;
    }
    write!(out, "{}", f.message)?;
    if let Some(m) = f.metadata.filter(|m| !m.is_empty()) {
        write!(out, " ")?;
        serde_json::to_writer(&mut *out, m)?;
    }
    if let Some(p) = f.process {
        write!(out, " [{p}")?;
        if let Some(pid) = f.pid {
            write!(out, " {pid}")?;
        }
        write!(out, "]")?;
    }
    writeln!(out)
}

/// `12.3s`, `4m05s`, `2h03m04s`.
pub fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{secs:.1}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60),
    }
}

/// One line of `logbook sessions`: id, status, start, duration, device,
/// tags (the same columns locally and at a hub).
pub fn session_row(
    out: &mut impl Write,
    id: &str,
    status: &str,
    started: &str,
    duration: Option<f64>,
    device: &str,
    tags: &[String],
) -> io::Result<()> {
    let duration = duration.map_or("-".to_owned(), human_duration);
    writeln!(
        out,
        "{id}  {status:<9}  {started:<24}  {duration:>9}  {device}  {}",
        tags.join(",")
    )
}

/// A local session's row of `logbook sessions`.
pub fn local_session_row(out: &mut impl Write, s: &SessionView) -> io::Result<()> {
    session_row(
        out,
        &s.id.to_string(),
        s.status.as_str(),
        &s.started_at,
        Some(s.duration_seconds),
        &s.device_id,
        &s.tags,
    )
}

/// A hub session's row of `logbook sessions`.
pub fn hub_session_row(out: &mut impl Write, s: &HubSession) -> io::Result<()> {
    session_row(
        out,
        &s.id,
        &s.status,
        &s.started_at,
        s.duration_seconds,
        &s.device_id,
        &s.tags,
    )
}

/// `ID tags: a, b` after a tag was added.
pub fn tags_line(out: &mut impl Write, id: &str, tags: &[String]) -> io::Result<()> {
    writeln!(out, "{id} tags: {}", tags.join(", "))
}

/// `session status` on the robot.
pub fn session(out: &mut impl Write, s: &SessionView) -> io::Result<()> {
    writeln!(out, "session   {}", s.id)?;
    writeln!(out, "status    {}", s.status.as_str())?;
    writeln!(out, "started   {}", s.started_at)?;
    if let Some(e) = &s.ended_at {
        writeln!(out, "ended     {e}")?;
    }
    writeln!(out, "duration  {}", human_duration(s.duration_seconds))?;
    if !s.tags.is_empty() {
        writeln!(out, "tags      {}", s.tags.join(", "))?;
    }
    if let Some(p) = &s.package {
        writeln!(
            out,
            "package   {}{}",
            p.name,
            p.version
                .as_deref()
                .map(|v| format!("@{v}"))
                .unwrap_or_default()
        )?;
    }
    if !s.metadata.is_empty() {
        writeln!(
            out,
            "metadata  {}",
            serde_json::Value::Object(s.metadata.clone())
        )?;
    }
    if let Some(e) = &s.error {
        writeln!(out, "error     {e}")?;
    }
    writeln!(out, "logs      {}", s.log_count)?;
    writeln!(out, "artifacts {}", s.artifact_dir)
}

/// `session status ID` at a hub: the local labels, with the hub's counts.
pub fn hub_session(out: &mut impl Write, s: &HubSession) -> io::Result<()> {
    writeln!(out, "session   {}", s.id)?;
    writeln!(out, "device    {} ({})", s.device_name, s.device_id)?;
    writeln!(out, "status    {}", s.status)?;
    writeln!(out, "started   {}", s.started_at)?;
    if let Some(e) = &s.ended_at {
        writeln!(out, "ended     {e}")?;
    }
    if let Some(d) = s.duration_seconds {
        writeln!(out, "duration  {}", human_duration(d))?;
    }
    if !s.tags.is_empty() {
        writeln!(out, "tags      {}", s.tags.join(", "))?;
    }
    if let Some(p) = &s.package {
        writeln!(out, "package   {}", p.id)?;
    }
    if s.metadata.as_object().is_some_and(|m| !m.is_empty()) {
        writeln!(out, "metadata  {}", s.metadata)?;
    }
    if let Some(e) = &s.error {
        writeln!(out, "error     {e}")?;
    }
    writeln!(
        out,
        "logs      {}{}",
        s.log_count,
        if s.has_errors { " (with errors)" } else { "" }
    )?;
    writeln!(out, "artifacts {} at the hub", s.artifact_count)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// `logbook status`: device, session, buffer, records, ingest, hub link,
/// gaps and artifacts.
pub fn status(out: &mut impl Write, s: &Status) -> io::Result<()> {
    writeln!(out, "device    {} ({})", s.device_name, s.device_id)?;
    writeln!(out, "uptime    {}", human_duration(s.uptime_seconds))?;
    match s.current_session {
        Some(id) => writeln!(out, "session   {id} (active)")?,
        None => writeln!(out, "session   none active")?,
    }
    let (used, limit) = (s.buffer.bytes_used, s.buffer.bytes_limit);
    writeln!(
        out,
        "buffer    {:.1} MiB of {:.1} MiB ({:.0}%)",
        mib(used),
        mib(limit),
        if limit > 0 {
            used as f64 / limit as f64 * 100.0
        } else {
            0.0
        }
    )?;
    if s.buffer.disk_full {
        writeln!(out, "          disk full: evicting to make room")?;
    }
    if let Some(to) = &s.buffer.quarantined_to {
        writeln!(
            out,
            "          database went bad {} time(s), last moved to {to}",
            s.buffer.quarantined
        )?;
    }
    let r = &s.records;
    writeln!(
        out,
        "records   {} stored ({} synced, {} unsynced), last seq {}",
        r.stored, r.synced, r.unsynced, r.last_seq
    )?;
    let i = &s.ingest;
    let by = |p: &str| i.accepted_by_protocol.get(p).copied().unwrap_or(0);
    writeln!(
        out,
        "ingest    {} accepted (json {}, syslog {}, forward {}), {} truncated, {} bad, {} refused; {} clients connected",
        i.accepted,
        by("json"),
        by("syslog"),
        by("forward"),
        i.truncated,
        i.bad.values().sum::<u64>(),
        i.refused,
        i.connections_open
    )?;
    sync(out, &s.sync)?;
    if s.gaps.is_empty() {
        writeln!(out, "gaps      none")?;
    }
    for g in &s.gaps {
        let session = g.session_id.map_or("none".to_owned(), |u| u.to_string());
        writeln!(
            out,
            "gap       {} {} records {} (session {session})",
            g.dropped,
            g.level.as_str(),
            g.reason,
        )?;
    }
    let a = &s.artifacts;
    if a.enabled {
        writeln!(
            out,
            "artifacts {} pending ({:.1} MiB), {} uploading, {} uploaded, {} refused, {} failed; {:.1} MiB sent",
            a.pending,
            mib(a.bytes_pending),
            a.uploading,
            a.uploaded,
            a.refused,
            a.failed,
            mib(a.bytes_sent),
        )?;
        if a.auth_failed {
            writeln!(out, "artifacts STOPPED: the hub refused the device token")?;
        }
        if let Some(b) = a.backoff_seconds {
            writeln!(out, "artifacts retrying in up to {b:.1}s")?;
        }
        if let Some(e) = &a.last_error {
            writeln!(out, "artifacts last error: {e}")?;
        }
    } else {
        writeln!(out, "artifacts kept on this device (no hub configured)")?;
    }
    Ok(())
}

/// The `hub` lines of `logbook status`: link, last success, backlog,
/// backoff, traffic and anything set aside.
fn sync(out: &mut impl Write, s: &SyncStatus) -> io::Result<()> {
    let last = s
        .last_success
        .as_ref()
        .map_or("never synced".to_owned(), |t| format!("last success {t}"));
    writeln!(out, "hub       {}, {last}", s.link.as_str())?;
    if s.link == crate::agent::sync::status::LinkState::Disabled {
        return Ok(());
    }
    let backoff = match s.backoff_seconds {
        Some(b) => format!(", retrying within {b:.1}s"),
        None => String::new(),
    };
    writeln!(
        out,
        "backlog   {} records ({:.1} MiB){backoff}",
        s.backlog_records,
        mib(s.backlog_bytes)
    )?;
    writeln!(
        out,
        "sent      {} records in {} batches, {:.1} MiB on the wire ({}, compression {:.1}x)",
        s.records_sent,
        s.batches_sent,
        mib(s.bytes_sent),
        s.content_encoding,
        s.compression_ratio
    )?;
    if s.set_aside_batches > 0 {
        writeln!(
            out,
            "set aside {} batches ({} records) the hub refused; counted as gaps",
            s.set_aside_batches, s.set_aside_records
        )?;
    }
    if s.uploader_restarts > 0 {
        writeln!(
            out,
            "restarts  {} stalled uploader restarts",
            s.uploader_restarts
        )?;
    }
    if let Some(e) = &s.last_error {
        writeln!(out, "error     {e}")?;
    }
    Ok(())
}

/// The rows of a local `logbook artifacts`: every file under `dir` with the
/// upload state the agent reported (`items`), path order. A file the agent
/// has not reported yet (still written, or settling) is `new`, or `local`
/// when no hub is configured (`uploads`false).
pub fn artifact_rows(dir: &Path, items: Vec<ArtifactItem>, uploads: bool) -> Vec<ArtifactRow> {
    let mut files = Vec::new();
    list_files(dir, dir, &mut files);
    let unlisted = if uploads { "new" } else { "local" };
    let mut rows: BTreeMap<String, (u64, String)> = files
        .into_iter()
        .map(|(rel, len)| (rel, (len, unlisted.to_string())))
        .collect();
    for a in items {
        let state = match (a.state.as_str(), &a.error) {
            ("uploading", _) => format!("uploading {}/{}", a.uploaded_bytes, a.size),
            ("refused" | "failed", Some(e)) => format!("{} ({e})", a.state),
            (st, _) => st.to_owned(),
        };
        let size = rows.get(&a.path).map_or(a.size, |r| r.0);
        rows.insert(a.path, (size, state));
    }
    rows.into_iter()
        .map(|(path, (size, state))| ArtifactRow { size, state, path })
        .collect()
}

/// One line of `logbook artifacts`.
#[derive(Debug, Clone, PartialEq)]
pub struct ArtifactRow {
    pub size: u64,
    pub state: String,
    pub path: String,
}

/// `SIZE  STATE  PATH`, locally and at a hub.
pub fn artifact_row(out: &mut impl Write, size: u64, state: &str, path: &str) -> io::Result<()> {
    writeln!(out, "{size:>12}  {state:<10}  {path}")
}

fn list_files(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        let p = e.path();
        if ft.is_dir() {
            list_files(root, &p, out);
        } else if ft.is_file() {
            let rel = p.strip_prefix(root).unwrap_or(&p).display().to_string();
            out.push((rel, e.metadata().map_or(0, |m| m.len())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_duration(secs: f64, expected: &str) {
        assert_eq!(human_duration(secs), expected, "{secs}");
    }

    #[test]
    fn durations() {
        check_duration(-1.0, "-1.0s");
        check_duration(0.0, "0.0s");
        check_duration(59.94, "59.9s");
        check_duration(61.0, "1m01s");
        check_duration(3599.0, "59m59s");
        check_duration(3600.0, "1h00m00s");
        check_duration(7384.0, "2h03m04s");
    }

    fn line(r: &impl Record) -> String {
        let mut out = Vec::new();
        record(&mut out, r, false).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_local_and_a_hub_record_print_the_same_line() {
        let local: LogItem = serde_json::from_str(
            r#"{"seq":7,"session_id":null,"timestamp":"2025-01-10T08:00:00.123456789Z",
                "level":"warn","module":"nav","message":"slow","metadata":{"ms":40},
                "pid":12,"uid":0,"gid":0,"process":"planner"}"#,
        )
        .unwrap();
        let hub: HubLog = serde_json::from_str(
            r#"{"seq":7,"session_id":null,"device_id":"r7","timestamp":"2025-01-10T08:00:00.123456789Z",
                "level":"warn","module":"nav","message":"slow","metadata":{"ms":40},
                "pid":12,"uid":0,"gid":0,"process":"planner"}"#,
        )
        .unwrap();
        let want = "2025-01-10T08:00:00.123Z WARN  nav: slow {\"ms\":40} [planner 12]\n";
        assert_eq!(line(&local), want);
        assert_eq!(line(&hub), want);
        let mut bare = local.clone();
        (bare.module, bare.metadata, bare.process) = (String::new(), Default::default(), None);
        assert_eq!(line(&bare), "2025-01-10T08:00:00.123Z WARN  slow\n");
    }
}
