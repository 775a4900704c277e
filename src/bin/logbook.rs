//! `logbook` binary: the CLI for the local agent over `api.sock` (sessions,
//! logs with `--follow`, artifacts, status), and the same commands against a
//! hub's Sessions API with `--hub URL` (an operator laptop).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use hyper::{Method, StatusCode};
use logbook::agent::types::{
    ArtifactItem, Flushed, LogItem, OpenSession, Page, SessionView, StopSession,
};
use logbook::client::hub::{HubClient, HubLog, HubSession, LogFilter, LogScope, SessionFilter};
use logbook::client::percent_encode;
use logbook::wire::{ErrorBody, Level, Package};

/// Sessions, logs and artifacts of the logbook agent on this machine, or of
/// a whole fleet at a hub (`--hub URL`).
#[derive(Debug, Parser)]
#[command(name = "logbook", version)]
struct Cli {
    /// Directory of the agent's sockets (default /run/logbook).
    #[arg(long, value_name = "DIR", global = true, conflicts_with = "api_socket")]
    runtime_dir: Option<PathBuf>,
    /// The agent's API socket (default /run/logbook/api.sock).
    #[arg(long, value_name = "PATH", global = true)]
    api_socket: Option<PathBuf>,
    /// Ask this hub instead of the local agent (e.g. https://hub.example).
    #[arg(
        long,
        value_name = "URL",
        global = true,
        env = "LOGBOOK_HUB_URL",
        conflicts_with_all = ["runtime_dir", "api_socket"]
    )]
    hub: Option<String>,
    /// Operator key for the hub.
    #[arg(
        long,
        value_name = "KEY",
        global = true,
        env = "LOGBOOK_HUB_KEY",
        hide_env_values = true
    )]
    key: Option<String>,
    /// Organization at the hub.
    #[arg(long, value_name = "ORG", global = true, env = "LOGBOOK_ORG")]
    org: Option<String>,
    /// Project at the hub.
    #[arg(long, value_name = "PROJECT", global = true, env = "LOGBOOK_PROJECT")]
    project: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open, close, tag and show sessions.
    Session {
        #[command(subcommand)]
        command: SessionCommand,
    },
    /// Print log records (oldest first), optionally following new ones.
    Logs(LogsArgs),
    /// List sessions, newest first.
    Sessions(SessionsArgs),
    /// List the files in a session's artifact directory (with --hub: the
    /// files at the hub, and --download to fetch one).
    Artifacts {
        /// Session id (default: the active session, else the latest).
        #[arg(long)]
        session: Option<String>,
        /// With --hub: download this artifact (its path in the listing).
        #[arg(long, value_name = "PATH")]
        download: Option<String>,
        /// Where --download writes (default: the file name in the current
        /// directory; `-` for stdout). A shorter file there is resumed.
        #[arg(long, short = 'o', value_name = "FILE", requires = "download")]
        output: Option<PathBuf>,
    },
    /// Summary of the agent: buffer, records, ingest counters, gaps.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Wait until every record the agent received is committed.
    Flush,
    /// Run a hub and an agent on this machine, wired together, and print
    /// where they are and what to try. Ctrl-C stops both.
    Dev {
        /// Directory for the hub's data, the agent's buffer and the keys
        /// (reused by later runs).
        #[arg(long, value_name = "DIR", default_value = ".logbook")]
        dir: PathBuf,
        /// The hub's address (a free port is used when it is taken).
        #[arg(long, value_name = "ADDR", default_value = logbook::dev::DEFAULT_LISTEN)]
        listen: String,
    },
}

#[derive(Debug, Subcommand)]
enum SessionCommand {
    /// Open a session; prints only its id.
    Start {
        /// A tag, repeatable.
        #[arg(long = "tag", value_name = "T")]
        tags: Vec<String>,
        /// NAME or NAME@VERSION of the software this session runs.
        #[arg(long, value_name = "NAME[@VERSION]")]
        package: Option<String>,
        /// Free metadata, repeatable.
        #[arg(long = "meta", value_name = "K=V")]
        meta: Vec<String>,
    },
    /// Close the active session.
    Stop {
        /// Close it as failed.
        #[arg(long)]
        failed: bool,
        /// Why it failed.
        #[arg(long, value_name = "TEXT")]
        error: Option<String>,
    },
    /// Add a tag to the active session (`tag TAG`), or to a session by id
    /// (`tag ID TAG`, the form a hub needs).
    Tag {
        /// TAG, or ID when a second argument follows.
        #[arg(value_name = "[ID] TAG")]
        first: String,
        #[arg(hide = true)]
        second: Option<String>,
    },
    /// Show the active session, or the session ID.
    Status {
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show the session ID.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Print log records: the same as `logbook logs`.
    Logs(LogsArgs),
}

#[derive(Debug, clap::Args)]
struct SessionsArgs {
    /// With --hub: only this device's sessions.
    #[arg(long, value_name = "D")]
    device: Option<String>,
    /// active, completed or failed.
    #[arg(long, value_name = "S")]
    status: Option<String>,
    /// With --hub: only sessions with this tag (repeatable: all of them).
    #[arg(long = "tag", value_name = "T")]
    tags: Vec<String>,
    /// Only the newest N sessions.
    #[arg(long, short = 'n')]
    limit: Option<usize>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct LogsArgs {
    /// Session id, or `current`.
    #[arg(long)]
    session: Option<String>,
    /// With --hub: the records this device logged outside any session.
    #[arg(long, value_name = "D", conflicts_with = "session")]
    device: Option<String>,
    /// This level and above: trace, debug, info, warn, error, fatal.
    #[arg(long)]
    level: Option<String>,
    /// A module and its children.
    #[arg(long)]
    module: Option<String>,
    /// Text the message contains.
    #[arg(long)]
    search: Option<String>,
    /// RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// RFC 3339 time.
    #[arg(long)]
    until: Option<String>,
    /// Only the newest N records.
    #[arg(long, short = 'n')]
    limit: Option<usize>,
    /// Keep printing new records as they arrive (like `journalctl -f`).
    #[arg(long, short = 'f')]
    follow: bool,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `dev` runs two daemons: it gets the multi-threaded runtime they are
    // built for; everything else is one request on one thread.
    let rt = if matches!(cli.command, Command::Dev { .. }) {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("logbook: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Dev { dir, listen } => rt.block_on(dev(dir, listen)),
        _ if cli.hub.is_some() => rt.block_on(run_hub(cli)),
        _ => rt.block_on(run(cli)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => logbook::exit::report("logbook", e.as_ref()),
    }
}

/// `logbook dev`: the hub and the agent in this process until Ctrl-C or
/// SIGTERM.
async fn dev(dir: PathBuf, listen: String) -> anyhow::Result<()> {
    let listen = listen
        .parse()
        .with_context(|| format!("--listen: expected host:port, found {listen:?}"))?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOGBOOK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        logbook::exit::terminated().await;
        eprintln!("logbook dev: stopping (the agent commits everything first)");
        signals.cancel();
    });
    let opts = logbook::dev::DevOptions {
        dir,
        listen,
        cli: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("logbook")),
    };
    let mut out = std::io::stdout();
    logbook::dev::run(opts, &mut out, shutdown).await?;
    eprintln!("logbook dev: stopped");
    Ok(())
}

struct Api {
    socket: PathBuf,
}

impl Api {
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        // The library's client (logbook::client::Api): one HTTP client for
        // api.sock, shared with Rust programs; blocking, so off the runtime.
        let client = logbook::client::Api::new().socket(&self.socket);
        let path = path.to_owned();
        let (status, bytes) = tokio::task::spawn_blocking(move || {
            client.call(method.as_str(), &path, body.as_deref())
        })
        .await
        .context("talking to logbookd")?
        .map_err(|e| match e {
            logbook::client::ApiError::NotRunning(p) => anyhow!(
                "is logbookd running? no socket at {} (start it, or point --runtime-dir / --api-socket at it)",
                p.display()
            ),
            logbook::client::ApiError::PermissionDenied(p) => anyhow!(
                "permission denied on {}: join the group that owns it (api.socket_group) or use sudo",
                p.display()
            ),
            e => anyhow::Error::new(e),
        })?;
        let status = StatusCode::from_u16(status).context("logbookd answered a bad status")?;
        let bytes = Bytes::from(bytes);
        Ok((status, bytes))
    }

    /// Calls and decodes a success body, turning error bodies into errors.
    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<T> {
        let (status, bytes) = self.call(method, path, body).await?;
        if !status.is_success() {
            match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => bail!("{} ({})", e.error.message, e.error.code),
                Err(_) => bail!(
                    "logbookd answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ),
            }
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("unexpected answer from logbookd to {path}"))
    }
}

fn socket_path(cli: &Cli) -> PathBuf {
    if let Some(p) = &cli.api_socket {
        return p.clone();
    }
    cli.runtime_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/run/logbook"))
        .join("api.sock")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let api = Api {
        socket: socket_path(&cli),
    };
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Session { command } => match command {
            SessionCommand::Start {
                tags,
                package,
                meta,
            } => {
                let package = package.map(|p| match p.split_once('@') {
                    Some((name, version)) => Package {
                        name: name.into(),
                        version: Some(version.into()).filter(|v: &String| !v.is_empty()),
                    },
                    None => Package {
                        name: p,
                        version: None,
                    },
                });
                let mut metadata = serde_json::Map::new();
                for kv in meta {
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or_else(|| anyhow!("--meta {kv:?} must look like KEY=VALUE"))?;
                    metadata.insert(k.into(), serde_json::Value::String(v.into()));
                }
                let body = serde_json::to_vec(&OpenSession {
                    tags,
                    package,
                    metadata,
                })?;
                let s: SessionView = api.json(Method::POST, "/v1/sessions", Some(body)).await?;
                writeln!(out, "{}", s.id)?;
            }
            SessionCommand::Stop { failed, error } => {
                if error.is_some() && !failed {
                    bail!("--error goes with --failed");
                }
                let body = serde_json::to_vec(&StopSession { failed, error })?;
                let s: SessionView = api
                    .json(Method::POST, "/v1/sessions/current/stop", Some(body))
                    .await?;
                writeln!(
                    out,
                    "{} {} after {}",
                    s.id,
                    s.status.as_str(),
                    human_duration(s.duration_seconds)
                )?;
            }
            SessionCommand::Tag { first, second } => {
                let (id, tag) = match second {
                    Some(tag) => (first, tag),
                    None => ("current".to_owned(), first),
                };
                let body = serde_json::to_vec(&serde_json::json!({ "tag": tag }))?;
                let s: SessionView = api
                    .json(
                        Method::POST,
                        &format!("/v1/sessions/{}/tags", percent_encode(&id)),
                        Some(body),
                    )
                    .await?;
                writeln!(out, "{} tags: {}", s.id, s.tags.join(", "))?;
            }
            SessionCommand::Logs(args) => logs(&api, &mut out, args).await?,
            SessionCommand::Status { id: None, json } => {
                let (status, bytes) = api.call(Method::GET, "/v1/sessions/current", None).await?;
                if status == StatusCode::NOT_FOUND {
                    writeln!(out, "no active session")?;
                    return Ok(());
                }
                if !status.is_success() {
                    bail!(
                        "logbookd answered {status}: {}",
                        String::from_utf8_lossy(&bytes)
                    );
                }
                if json {
                    out.write_all(&bytes)?;
                    writeln!(out)?;
                } else {
                    let s: SessionView = serde_json::from_slice(&bytes)?;
                    print_session(&mut out, &s)?;
                }
            }
            SessionCommand::Status { id: Some(id), json } | SessionCommand::Show { id, json } => {
                let s: serde_json::Value = api
                    .json(Method::GET, &format!("/v1/sessions/{}", percent_encode(&id)), None)
                    .await?;
                if json {
                    writeln!(out, "{s}")?;
                } else {
                    print_session(&mut out, &serde_json::from_value(s)?)?;
                }
            }
        },
        Command::Logs(args) => logs(&api, &mut out, args).await?,
        Command::Sessions(a) => {
            if a.device.is_some() || !a.tags.is_empty() {
                bail!("--device and --tag filter sessions at a hub: give --hub URL");
            }
            let mut filter = String::new();
            if let Some(st) = &a.status {
                filter.push_str(&format!("&status={}", percent_encode(st)));
            }
            let mut seen = 0usize;
            let mut before: Option<String> = None;
            loop {
                let want = a.limit.map_or(500, |n| (n - seen).min(500));
                if want == 0 {
                    break;
                }
                let mut path = format!("/v1/sessions?limit={want}{filter}");
                if let Some(b) = &before {
                    path.push_str(&format!("&before={}", percent_encode(b)));
                }
                let page: Page<serde_json::Value> = api.json(Method::GET, &path, None).await?;
                for v in &page.items {
                    if a.json {
                        writeln!(out, "{v}")?;
                    } else {
                        let s: SessionView = serde_json::from_value(v.clone())?;
                        session_row(
                            &mut out,
                            &s.id.to_string(),
                            s.status.as_str(),
                            &s.started_at,
                            Some(s.duration_seconds),
                            &s.device_id,
                            &s.tags,
                        )?;
                    }
                }
                seen += page.items.len();
                match page.next_cursor {
                    Some(c) if !page.items.is_empty() => before = Some(c),
                    _ => break,
                }
            }
        }
        Command::Artifacts {
            download: Some(_), ..
        } => bail!("--download fetches an artifact from a hub: give --hub URL (local files are in the session's artifact directory)"),
        Command::Artifacts { session, .. } => {
            let s: SessionView = match session {
                Some(id) => {
                    api.json(Method::GET, &format!("/v1/sessions/{}", percent_encode(&id)), None)
                        .await?
                }
                None => {
                    let (status, bytes) =
                        api.call(Method::GET, "/v1/sessions/current", None).await?;
                    if status.is_success() {
                        serde_json::from_slice(&bytes)?
                    } else {
                        let page: Page<SessionView> =
                            api.json(Method::GET, "/v1/sessions?limit=1", None).await?;
                        page.items
                            .into_iter()
                            .next()
                            .ok_or_else(|| anyhow!("there are no sessions yet"))?
                    }
                }
            };
            let dir = PathBuf::from(&s.artifact_dir);
            let mut files = Vec::new();
            list_files(&dir, &dir, &mut files);
            // Upload state from the agent; files it has not reported yet
            // (still being written, or waiting to settle) show as `new`.
            let listed: serde_json::Value = api
                .json(
                    Method::GET,
                    &format!("/v1/sessions/{}/artifacts", s.id),
                    None,
                )
                .await?;
            let items: Vec<ArtifactItem> =
                serde_json::from_value(listed["items"].clone()).unwrap_or_default();
            // Without a hub nothing is uploaded: say so instead of `new`.
            let status: serde_json::Value = api.json(Method::GET, "/v1/status", None).await?;
            let unlisted = if status["artifacts"]["enabled"] == true {
                "new"
            } else {
                "local"
            };
            let mut rows: std::collections::BTreeMap<String, (u64, String)> = files
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
            if rows.is_empty() {
                eprintln!("no artifacts in {} (session {})", dir.display(), s.id);
            }
            for (rel, (len, state)) in rows {
                writeln!(out, "{len:>12}  {state:<10}  {rel}")?;
            }
        }
        Command::Status { json } => {
            let (status, bytes) = api.call(Method::GET, "/v1/status", None).await?;
            if !status.is_success() {
                bail!(
                    "logbookd answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                );
            }
            if json {
                out.write_all(&bytes)?;
                writeln!(out)?;
            } else {
                print_status(&mut out, &serde_json::from_slice(&bytes)?)?;
            }
        }
        Command::Flush => {
            let f: Flushed = api
                .json(Method::POST, "/v1/flush", Some(b"{}".to_vec()))
                .await?;
            writeln!(out, "committed up to seq {}", f.last_seq)?;
        }
        Command::Dev { .. } => unreachable!("main runs `dev` on its own runtime"),
    }
    out.flush()?;
    Ok(())
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

fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{secs:.1}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60),
    }
}

fn print_session(out: &mut impl Write, s: &SessionView) -> std::io::Result<()> {
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

fn print_status(out: &mut impl Write, s: &serde_json::Value) -> std::io::Result<()> {
    let n = |p: &str| s.pointer(p).and_then(|v| v.as_f64()).unwrap_or(0.0);
    let mib = |b: f64| b / (1024.0 * 1024.0);
    writeln!(
        out,
        "device    {} ({})",
        s["device_name"].as_str().unwrap_or(""),
        s["device_id"].as_str().unwrap_or("")
    )?;
    writeln!(out, "uptime    {}", human_duration(n("/uptime_seconds")))?;
    match s["current_session"].as_str() {
        Some(id) => writeln!(out, "session   {id} (active)")?,
        None => writeln!(out, "session   none active")?,
    }
    let (used, limit) = (n("/buffer/bytes_used"), n("/buffer/bytes_limit"));
    writeln!(
        out,
        "buffer    {:.1} MiB of {:.1} MiB ({:.0}%)",
        mib(used),
        mib(limit),
        if limit > 0.0 {
            used / limit * 100.0
        } else {
            0.0
        }
    )?;
    writeln!(
        out,
        "records   {} stored ({} synced, {} unsynced), last seq {}",
        n("/records/stored"),
        n("/records/synced"),
        n("/records/unsynced"),
        n("/records/last_seq")
    )?;
    let bad: f64 = s["ingest"]["bad"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_f64()).sum())
        .unwrap_or(0.0);
    writeln!(
        out,
        "ingest    {} accepted (json {}, syslog {}, forward {}), {} truncated, {} bad, {} refused; {} clients connected",
        n("/ingest/accepted"),
        n("/ingest/accepted_by_protocol/json"),
        n("/ingest/accepted_by_protocol/syslog"),
        n("/ingest/accepted_by_protocol/forward"),
        n("/ingest/truncated"),
        bad,
        n("/ingest/refused"),
        n("/ingest/connections_open")
    )?;
    print_sync(out, &s["sync"])?;
    let gaps = s["gaps"].as_array().cloned().unwrap_or_default();
    if gaps.is_empty() {
        writeln!(out, "gaps      none")?;
    }
    for g in gaps {
        writeln!(
            out,
            "gap       {} {} records {} (session {})",
            g["dropped"],
            g["level"].as_str().unwrap_or("").to_ascii_lowercase(),
            g["reason"].as_str().unwrap_or(""),
            g["session_id"].as_str().unwrap_or("none")
        )?;
    }
    let a = &s["artifacts"];
    if a["enabled"].as_bool() == Some(true) {
        writeln!(
            out,
            "artifacts {} pending ({:.1} MiB), {} uploading, {} uploaded, {} refused, {} failed; {:.1} MiB sent",
            n("/artifacts/pending"),
            mib(n("/artifacts/bytes_pending")),
            n("/artifacts/uploading"),
            n("/artifacts/uploaded"),
            n("/artifacts/refused"),
            n("/artifacts/failed"),
            mib(n("/artifacts/bytes_sent")),
        )?;
        if a["auth_failed"].as_bool() == Some(true) {
            writeln!(out, "artifacts STOPPED: the hub refused the device token")?;
        }
        if let Some(b) = a["backoff_seconds"].as_f64() {
            writeln!(out, "artifacts retrying in up to {b:.1}s")?;
        }
        if let Some(e) = a["last_error"].as_str() {
            writeln!(out, "artifacts last error: {e}")?;
        }
    } else {
        writeln!(out, "artifacts kept on this device (no hub configured)")?;
    }
    Ok(())
}

/// The `hub` lines of `logbook status`: link, last success, backlog,
/// backoff, traffic and anything set aside.
fn print_sync(out: &mut impl Write, s: &serde_json::Value) -> std::io::Result<()> {
    let n = |k: &str| s[k].as_f64().unwrap_or(0.0);
    let link = s["link"].as_str().unwrap_or("unknown");
    let last = s["last_success"]
        .as_str()
        .map_or("never synced".to_owned(), |t| format!("last success {t}"));
    writeln!(out, "hub       {link}, {last}")?;
    if link == "disabled" {
        return Ok(());
    }
    let backoff = match s["backoff_seconds"].as_f64() {
        Some(b) => format!(", retrying within {b:.1}s"),
        None => String::new(),
    };
    writeln!(
        out,
        "backlog   {} records ({:.1} MiB){backoff}",
        n("backlog_records"),
        n("backlog_bytes") / (1024.0 * 1024.0)
    )?;
    writeln!(
        out,
        "sent      {} records in {} batches, {:.1} MiB on the wire (compression {:.1}x)",
        n("records_sent"),
        n("batches_sent"),
        n("bytes_sent") / (1024.0 * 1024.0),
        n("compression_ratio")
    )?;
    if n("set_aside_batches") > 0.0 {
        writeln!(
            out,
            "set aside {} batches ({} records) the hub refused; counted as gaps",
            n("set_aside_batches"),
            n("set_aside_records")
        )?;
    }
    if n("uploader_restarts") > 0.0 {
        writeln!(
            out,
            "restarts  {} stalled uploader restarts",
            n("uploader_restarts")
        )?;
    }
    if let Some(e) = s["last_error"].as_str() {
        writeln!(out, "error     {e}")?;
    }
    Ok(())
}

fn print_record(out: &mut impl Write, r: &LogItem, json: bool) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, r)?;
        writeln!(out)?;
        return Ok(());
    }
    record_line(
        out,
        &r.timestamp,
        r.level,
        &r.module,
        &r.message,
        Some(&r.metadata),
        r.process.as_deref(),
        r.pid,
    )
}

/// A hub record: the same line as a local one (`--json`: the hub's object,
/// which adds `device_id`).
fn print_hub_record(out: &mut impl Write, r: &HubLog, json: bool) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, r)?;
        writeln!(out)?;
        return Ok(());
    }
    record_line(
        out,
        &r.timestamp,
        r.level,
        &r.module,
        &r.message,
        r.metadata.as_object(),
        r.process.as_deref(),
        r.pid,
    )
}

/// `TIME LEVEL module: message {metadata} [process pid]`, the text form of
/// a record wherever it comes from.
#[allow(clippy::too_many_arguments)]
fn record_line(
    out: &mut impl Write,
    timestamp: &str,
    level: Level,
    module: &str,
    message: &str,
    metadata: Option<&serde_json::Map<String, serde_json::Value>>,
    process: Option<&str>,
    pid: Option<u32>,
) -> anyhow::Result<()> {
    // Milliseconds are enough on a terminal.
    let ts = match timestamp.find('.') {
        Some(dot) if timestamp.len() > dot + 4 => format!("{}Z", &timestamp[..dot + 4]),
        _ => timestamp.to_owned(),
    };
    write!(out, "{ts} {:<5} ", level.as_upper())?;
    if !module.is_empty() {
        write!(out, "{module}: ")?;
    }
    write!(out, "{message}")?;
    if let Some(m) = metadata.filter(|m| !m.is_empty()) {
        write!(out, " ")?;
        serde_json::to_writer(&mut *out, m)?;
    }
    if let Some(p) = process {
        write!(out, " [{p}")?;
        if let Some(pid) = pid {
            write!(out, " {pid}")?;
        }
        write!(out, "]")?;
    }
    writeln!(out)?;
    Ok(())
}

/// One line of `logbook sessions`: id, status, start, duration, device,
/// tags (the same columns locally and at a hub).
fn session_row(
    out: &mut impl Write,
    id: &str,
    status: &str,
    started: &str,
    duration: Option<f64>,
    device: &str,
    tags: &[String],
) -> std::io::Result<()> {
    let duration = duration.map_or("-".to_owned(), human_duration);
    writeln!(
        out,
        "{id}  {status:<9}  {started:<24}  {duration:>9}  {device}  {}",
        tags.join(",")
    )
}

/// `session status ID` at a hub: the local labels, with the hub's counts.
fn print_hub_session(out: &mut impl Write, s: &HubSession) -> std::io::Result<()> {
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

/// Every command against a hub (`--hub URL`).
async fn run_hub(cli: Cli) -> anyhow::Result<()> {
    let url = cli.hub.as_deref().unwrap_or_default();
    let hub = HubClient::new(
        url,
        cli.key.as_deref(),
        cli.org.as_deref(),
        cli.project.as_deref(),
    )?;
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Sessions(a) => {
            let f = SessionFilter {
                device: a.device,
                status: a.status,
                tags: a.tags,
                limit: a.limit,
            };
            for s in hub.sessions(&f).await? {
                if a.json {
                    serde_json::to_writer(&mut out, &s)?;
                    writeln!(out)?;
                } else {
                    session_row(
                        &mut out,
                        &s.id,
                        &s.status,
                        &s.started_at,
                        s.duration_seconds,
                        &s.device_id,
                        &s.tags,
                    )?;
                }
            }
        }
        Command::Session { command } => match command {
            SessionCommand::Status { id: Some(id), json } | SessionCommand::Show { id, json } => {
                let s = hub.session(&id).await?;
                if json {
                    serde_json::to_writer(&mut out, &s)?;
                    writeln!(out)?;
                } else {
                    print_hub_session(&mut out, &s)?;
                }
            }
            SessionCommand::Status { id: None, .. } => {
                bail!("with --hub, say which session: `session status ID` (list them with `sessions`)")
            }
            SessionCommand::Tag {
                first,
                second: Some(tag),
            } => {
                let s = hub.add_tag(&first, &tag).await?;
                writeln!(out, "{} tags: {}", s.id, s.tags.join(", "))?;
            }
            SessionCommand::Tag { second: None, .. } => {
                bail!("with --hub, say which session: `session tag ID TAG`")
            }
            SessionCommand::Logs(a) => hub_logs(&hub, &mut out, a).await?,
            SessionCommand::Start { .. } | SessionCommand::Stop { .. } => bail!(
                "sessions start and stop on the robot (run without --hub there); the hub only tags them"
            ),
        },
        Command::Logs(a) => hub_logs(&hub, &mut out, a).await?,
        Command::Artifacts {
            session,
            download,
            output,
        } => {
            let session = session.ok_or_else(|| {
                anyhow!("with --hub, artifacts needs --session ID (list sessions with `sessions`)")
            })?;
            match download {
                None => {
                    let items = hub.artifacts(&session).await?;
                    if items.is_empty() {
                        eprintln!("no artifacts at the hub for session {session}");
                    }
                    for a in items {
                        // The local listing's columns; at the hub every
                        // file is uploaded.
                        writeln!(out, "{:>12}  {:<10}  {}", a.size_bytes, "uploaded", a.path)?;
                    }
                }
                Some(path) if output.as_deref() == Some(Path::new("-")) => {
                    hub.download_to(&session, &path, &mut out).await?;
                }
                Some(path) => {
                    let file = match output {
                        Some(f) => f,
                        None => PathBuf::from(
                            Path::new(&path)
                                .file_name()
                                .ok_or_else(|| anyhow!("--download {path:?} names no file"))?,
                        ),
                    };
                    let d = hub.download(&session, &path, &file).await?;
                    let how = if d.resumed_from > 0 {
                        format!(", resumed at byte {}", d.resumed_from)
                    } else if d.fetched == 0 {
                        ", already complete".to_owned()
                    } else {
                        String::new()
                    };
                    eprintln!(
                        "{} -> {} ({} bytes{how}, sha256 {} checked)",
                        path,
                        file.display(),
                        d.size,
                        &d.sha256[..12]
                    );
                }
            }
        }
        Command::Status { .. } | Command::Flush => bail!(
            "`status` and `flush` ask the agent on a robot; run them there without --hub"
        ),
        Command::Dev { .. } => unreachable!("main runs `dev` on its own runtime"),
    }
    out.flush()?;
    Ok(())
}

/// `logs` at a hub: the local paging and tail rules, then `--follow` over
/// the hub's WebSocket live route.
async fn hub_logs(hub: &HubClient, out: &mut impl Write, a: LogsArgs) -> anyhow::Result<()> {
    let scope = match (a.session.as_deref(), a.device) {
        (_, Some(d)) => LogScope::Device(d),
        (Some("current") | None, None) => bail!(
            "with --hub, logs needs --session ID or --device D (list sessions with `sessions`)"
        ),
        (Some(s), None) => LogScope::Session(s.to_owned()),
    };
    let mut filter = LogFilter::default();
    for (k, v) in [
        ("level", a.level),
        ("module", a.module),
        ("search", a.search),
        ("since", a.since),
        ("until", a.until),
    ] {
        if let Some(v) = v {
            filter.0.push((k, v));
        }
    }
    let mut seen = BTreeSet::new();
    let tail = a.limit.or(if a.follow { Some(10) } else { None });
    if let Some(n) = tail {
        // The newest N, newest first in pages, printed oldest first.
        let mut items: Vec<HubLog> = Vec::new();
        let mut before: Option<u64> = None;
        while items.len() < n {
            let want = n - items.len();
            let page = hub
                .logs_page(&scope, &filter, want, before.map(|b| ("before", b)))
                .await?;
            let done = page.next_cursor.is_none() || page.items.is_empty();
            before = page.items.last().map(|r| r.seq);
            items.extend(page.items);
            if done {
                break;
            }
        }
        for r in items.iter().rev() {
            print_hub_record(out, r, a.json)?;
            seen.insert(r.seq);
        }
    } else {
        let mut after = 0u64;
        loop {
            let page = hub
                .logs_page(
                    &scope,
                    &filter,
                    logbook::client::hub::PAGE,
                    Some(("after", after)),
                )
                .await?;
            for r in &page.items {
                print_hub_record(out, r, a.json)?;
                after = r.seq;
            }
            if page.next_cursor.is_none() || page.items.is_empty() {
                break;
            }
        }
    }
    out.flush()?;
    if !a.follow {
        return Ok(());
    }
    let json = a.json;
    hub.follow(
        &scope,
        &filter,
        seen,
        |r| {
            print_hub_record(out, r, json).map_err(|e| match e.downcast::<std::io::Error>() {
                Ok(io) => io,
                Err(e) => std::io::Error::other(e.to_string()),
            })?;
            out.flush()
        },
        |note| eprintln!("logbook: {note}"),
        logbook::client::hub::FollowTiming::default(),
    )
    .await?;
    Ok(())
}

async fn logs(api: &Api, out: &mut impl Write, a: LogsArgs) -> anyhow::Result<()> {
    if a.device.is_some() {
        bail!("--device reads a device's logs at a hub: give --hub URL (here every record is this device's)");
    }
    let mut filter = String::new();
    for (k, v) in [
        ("session", &a.session),
        ("level", &a.level),
        ("module", &a.module),
        ("search", &a.search),
        ("since", &a.since),
        ("until", &a.until),
    ] {
        if let Some(v) = v {
            filter.push_str(&format!("&{k}={}", percent_encode(v)));
        }
    }
    let mut last_seq: u64 = 0;
    // With --limit (or --follow, like journalctl's last 10): the newest N,
    // printed oldest first. Otherwise every record, paging upwards.
    let tail = a.limit.or(if a.follow { Some(10) } else { None });
    if let Some(n) = tail {
        let mut items = Vec::new();
        let mut before: Option<u64> = None;
        while items.len() < n {
            let want = (n - items.len()).min(1000);
            let mut path = format!("/v1/logs?limit={want}{filter}");
            if let Some(b) = before {
                path.push_str(&format!("&before={b}"));
            }
            let page: Page<LogItem> = api.json(Method::GET, &path, None).await?;
            let done = page.next_cursor.is_none();
            before = page.items.last().map(|r| r.seq);
            items.extend(page.items);
            if done {
                break;
            }
        }
        if a.follow && items.is_empty() {
            // Nothing matched yet: follow from the newest record of all.
            let page: Page<LogItem> = api.json(Method::GET, "/v1/logs?limit=1", None).await?;
            last_seq = page.items.first().map_or(0, |r| r.seq);
        }
        for r in items.iter().rev() {
            print_record(out, r, a.json)?;
            last_seq = last_seq.max(r.seq);
        }
        out.flush()?;
        if !a.follow {
            return Ok(());
        }
    }
    loop {
        let page: Page<LogItem> = api
            .json(
                Method::GET,
                &format!("/v1/logs?after={last_seq}&limit=1000{filter}"),
                None,
            )
            .await?;
        let full = page.next_cursor.is_some();
        for r in &page.items {
            print_record(out, r, a.json)?;
            last_seq = r.seq;
        }
        out.flush()?;
        if !full {
            if !a.follow {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
