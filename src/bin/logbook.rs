//! `logbook` binary: the CLI for the local agent over `api.sock` (sessions,
//! logs with `--follow`, artifacts, status), and the same commands against a
//! hub's Sessions API with `--hub URL` (an operator laptop).

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use logbook::agent::types::StopSession;
use logbook::client::hub::{HubClient, LogScope, SessionFilter};
use logbook::client::logger::{LogError, LogLine};
use logbook::client::print;
use logbook::client::{Api, ApiError, FollowFrom, LogFilter, NewSession};
use logbook::wire::Level;

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
    /// Trust the hub certificates this PEM file signs (a private CA), besides
    /// the system's roots.
    #[arg(long, value_name = "PATH", global = true, env = "LOGBOOK_HUB_CA_FILE")]
    ca_file: Option<PathBuf>,
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
    /// Mark a moment of the active session (e.g. `collision`): the records
    /// around it are kept longest and sent first.
    Mark {
        /// What happened.
        name: String,
        /// How much before the mark to keep (e.g. 30s).
        #[arg(long, value_name = "DUR")]
        before: Option<String>,
        /// How much after the mark to keep (e.g. 10s).
        #[arg(long, value_name = "DUR")]
        after: Option<String>,
        /// high or normal: high pins are released last.
        #[arg(long, value_name = "P")]
        priority: Option<String>,
        /// Free metadata, repeatable.
        #[arg(long = "meta", value_name = "K=V")]
        meta: Vec<String>,
        /// Print the mark as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List marks, newest first (of --session; with --hub, --mark NAME
    /// lists sessions' marks of that name across sessions).
    Marks {
        /// Session id (or `current` locally).
        #[arg(long)]
        session: Option<String>,
        /// With --hub: only marks of this name.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Send a log record to the agent, like logger(1): the MESSAGE words
    /// as one record, or one record per line of stdin when there are none.
    Log {
        /// trace, debug, info, warn, error or fatal.
        #[arg(long, short = 'l', value_name = "L", default_value = "info")]
        level: String,
        /// The module the records come from (e.g. `nav::planner`).
        #[arg(long, short = 'm', value_name = "M")]
        module: Option<String>,
        /// Words of the message (read stdin when there are none).
        #[arg(value_name = "MESSAGE", trailing_var_arg = true)]
        message: Vec<String>,
    },
    /// Run a hub and an agent on this machine, wired together, and print
    /// where they are and what to try. Ctrl-C stops both.
    #[cfg(feature = "hub")]
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
    /// Only the window of the newest mark of this name (in --session).
    #[arg(long, value_name = "NAME")]
    mark: Option<String>,
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
    let result = match cli.command {
        // `dev` runs two daemons: it gets the multi-threaded runtime they
        // are built for; the hub client is async on one thread; the local
        // commands are blocking calls to api.sock and need no runtime.
        #[cfg(feature = "hub")]
        Command::Dev { dir, listen } => runtime(true).and_then(|rt| rt.block_on(dev(dir, listen))),
        _ if cli.hub.is_some() => runtime(false).and_then(|rt| rt.block_on(run_hub(cli))),
        _ => run_local(cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => logbook::exit::report("logbook", e.as_ref()),
    }
}

fn runtime(multi_thread: bool) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all().build().context("cannot start")
}

/// `logbook dev`: the hub and the agent in this process until Ctrl-C or
/// SIGTERM (built with the `hub` feature only).
#[cfg(feature = "hub")]
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
    let opts = logbook::dev::DevOptions {
        dir,
        listen,
        cli: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("logbook")),
    };
    let mut out = std::io::stdout();
    let dev = logbook::dev::run(opts, &mut out, shutdown.clone());
    logbook::exit::run_until_terminated(shutdown, dev, || {
        eprintln!("logbook dev: stopping (the agent commits everything first)");
    })
    .await?;
    eprintln!("logbook dev: stopped");
    Ok(())
}

/// The agent's runtime directory (`--runtime-dir`, default /run/logbook).
fn runtime_dir(cli: &Cli) -> PathBuf {
    cli.runtime_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/run/logbook"))
}

/// The local API client for `--api-socket`, else `--runtime-dir`.
fn local_api(cli: &Cli) -> Api {
    let socket = match &cli.api_socket {
        Some(p) => p.clone(),
        None => runtime_dir(cli).join("api.sock"),
    };
    Api::new().socket(socket)
}

/// The ingest socket beside the API socket (`--api-socket`), else in
/// `--runtime-dir`.
fn ingest_socket(cli: &Cli) -> PathBuf {
    match cli.api_socket.as_deref().and_then(Path::parent) {
        Some(dir) => dir.join("ingest.sock"),
        None => runtime_dir(cli).join("ingest.sock"),
    }
}

/// A local API error as the CLI says it: what to do when the agent is not
/// there or the socket is not ours.
fn local(e: ApiError) -> anyhow::Error {
    match e {
        ApiError::NotRunning(p) => anyhow!(
            "is logbookd running? no socket at {} (start it, or point --runtime-dir / --api-socket at it)",
            p.display()
        ),
        ApiError::PermissionDenied(p) => anyhow!(
            "permission denied on {}: join the group that owns it (api.socket_group) or use sudo",
            p.display()
        ),
        ApiError::Refused { code, message, .. } => anyhow!("{message} ({code})"),
        e => anyhow::Error::new(e),
    }
}

/// Every command against the agent on this machine.
fn run_local(cli: Cli) -> anyhow::Result<()> {
    let api = local_api(&cli);
    let ingest = ingest_socket(&cli);
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Session { command } => match command {
            SessionCommand::Start {
                tags,
                package,
                meta,
            } => {
                let mut new = NewSession::new();
                for t in tags {
                    new = new.tag(t);
                }
                if let Some(p) = package {
                    new = new.package_spec(&p);
                }
                for kv in meta {
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or_else(|| anyhow!("--meta {kv:?} must look like KEY=VALUE"))?;
                    new = new.meta(k, v);
                }
                let s = api.open(&new).map_err(local)?;
                writeln!(out, "{}", s.id())?;
            }
            SessionCommand::Stop { failed, error } => {
                if error.is_some() && !failed {
                    bail!("--error goes with --failed");
                }
                let s = api
                    .stop("current", &StopSession { failed, error })
                    .map_err(local)?;
                writeln!(
                    out,
                    "{} {} after {}",
                    s.id,
                    s.status.as_str(),
                    print::human_duration(s.duration_seconds)
                )?;
            }
            SessionCommand::Tag { first, second } => {
                let (id, tag) = match second {
                    Some(tag) => (first, tag),
                    None => ("current".to_owned(), first),
                };
                let s = api.add_tag(&id, &tag).map_err(local)?;
                print::tags_line(&mut out, &s.id.to_string(), &s.tags)?;
            }
            SessionCommand::Logs(args) => logs(&api, &mut out, args)?,
            SessionCommand::Status { id: None, json } => match api.current_view().map_err(local)? {
                None => writeln!(out, "no active session")?,
                Some(s) if json => print::json_line(&mut out, &s)?,
                Some(s) => print::session(&mut out, &s)?,
            },
            SessionCommand::Status { id: Some(id), json } | SessionCommand::Show { id, json } => {
                let s = api.session(&id).map_err(local)?;
                if json {
                    print::json_line(&mut out, &s)?;
                } else {
                    print::session(&mut out, &s)?;
                }
            }
        },
        Command::Logs(args) => logs(&api, &mut out, args)?,
        Command::Sessions(a) => {
            if a.device.is_some() || !a.tags.is_empty() {
                bail!("--device and --tag filter sessions at a hub: give --hub URL");
            }
            for s in api
                .every_session(a.status.as_deref(), a.limit)
                .map_err(local)?
            {
                if a.json {
                    print::json_line(&mut out, &s)?;
                } else {
                    print::local_session_row(&mut out, &s)?;
                }
            }
        }
        Command::Artifacts {
            download: Some(_), ..
        } => bail!("--download fetches an artifact from a hub: give --hub URL (local files are in the session's artifact directory)"),
        Command::Artifacts { session, .. } => {
            let s = match session {
                Some(id) => api.session(&id).map_err(local)?,
                None => match api.current_view().map_err(local)? {
                    Some(s) => s,
                    None => api
                        .sessions(None, 1, None)
                        .map_err(local)?
                        .items
                        .into_iter()
                        .next()
                        .ok_or_else(|| anyhow!("there are no sessions yet"))?,
                },
            };
            // Upload state from the agent; without a hub nothing uploads.
            let items = api.artifacts(&s.id.to_string()).map_err(local)?;
            let uploads = api.status().map_err(local)?.artifacts.enabled;
            let dir = PathBuf::from(&s.artifact_dir);
            let rows = print::artifact_rows(&dir, items, uploads);
            if rows.is_empty() {
                eprintln!("no artifacts in {} (session {})", dir.display(), s.id);
            }
            for r in rows {
                print::artifact_row(&mut out, r.size, &r.state, &r.path)?;
            }
        }
        Command::Status { json } => {
            let s = api.status().map_err(local)?;
            if json {
                print::json_line(&mut out, &s)?;
            } else {
                print::status(&mut out, &s)?;
            }
        }
        Command::Flush => {
            let f = api.flush().map_err(local)?;
            writeln!(out, "committed up to seq {}", f.last_seq)?;
        }
        Command::Mark {
            name,
            before,
            after,
            priority,
            meta,
            json,
        } => {
            let mut new = logbook::agent::types::NewMark {
                name,
                before: before.map(serde_json::Value::String),
                after: after.map(serde_json::Value::String),
                priority,
                ..Default::default()
            };
            for kv in meta {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--meta {kv:?} must look like KEY=VALUE"))?;
                new.metadata.insert(k.into(), serde_json::Value::String(v.into()));
            }
            let m = api.mark(&new).map_err(local)?;
            if json {
                print::json_line(&mut out, &m)?;
            } else {
                print::mark_row(&mut out, &local_mark_row(&m, &m.session_id.map(|s| s.to_string())))?;
            }
        }
        Command::Marks { session, name, json } => {
            if name.is_some() {
                bail!("--name lists marks across sessions at a hub: give --hub URL");
            }
            for m in api.every_mark(session.as_deref()).map_err(local)? {
                if json {
                    print::json_line(&mut out, &m)?;
                } else {
                    let id = m.session_id.map(|s| s.to_string());
                    print::mark_row(&mut out, &local_mark_row(&m, &id))?;
                }
            }
        }
        Command::Log {
            level,
            module,
            message,
        } => {
            let line = LogLine {
                level: level.parse::<Level>().map_err(|e| anyhow!("--level: {e}"))?,
                module: module.unwrap_or_default(),
            };
            let sent = if message.is_empty() {
                let stdin = std::io::stdin().lock();
                let lines = stdin.lines().filter(|l| l.as_ref().map_or(true, |l| !l.is_empty()));
                logbook::client::logger::send(&ingest, &line, lines)
            } else {
                logbook::client::logger::send(&ingest, &line, [Ok(message.join(" "))])
            };
            sent.map_err(|e| match e {
                LogError::NotRunning(p) => anyhow!(
                    "is logbookd running? no socket at {} (start it, or point --runtime-dir / --api-socket at it)",
                    p.display()
                ),
                e => anyhow::Error::new(e),
            })?;
        }
        #[cfg(feature = "hub")]
        Command::Dev { .. } => unreachable!("main runs `dev` on its own runtime"),
    }
    out.flush()?;
    Ok(())
}

fn local_mark_row<'a>(
    m: &'a logbook::agent::types::MarkView,
    session: &'a Option<String>,
) -> print::MarkRow<'a> {
    print::MarkRow {
        timestamp: &m.timestamp,
        priority: &m.priority,
        name: &m.name,
        before_seconds: m.before_seconds,
        after_seconds: m.after_seconds,
        session: session.as_deref(),
        metadata: &m.metadata,
        released: m.released.as_deref(),
    }
}

/// `logs` on the robot: every matching record (paging upwards), or the
/// newest `--limit` N; with `--follow`, the newest N (10 by default, like
/// journalctl) and then each new record as the agent commits it, over one
/// streamed request, until the session ends (or Ctrl-C).
fn logs(api: &Api, out: &mut impl Write, a: LogsArgs) -> anyhow::Result<()> {
    if a.device.is_some() {
        bail!("--device reads a device's logs at a hub: give --hub URL (here every record is this device's)");
    }
    let filter = LogFilter {
        session: a.session,
        level: a.level,
        module: a.module,
        search: a.search,
        since: a.since,
        until: a.until,
        mark: a.mark,
    };
    if a.follow {
        let from = FollowFrom::Tail(a.limit.unwrap_or(10));
        for r in api.follow_resuming(&filter, from, |note| eprintln!("logbook: {note}")) {
            print::record(out, &r.map_err(local)?, a.json)?;
            out.flush()?;
        }
        return Ok(());
    }
    if let Some(n) = a.limit {
        for r in api.newest(&filter, n).map_err(local)? {
            print::record(out, &r, a.json)?;
        }
        return Ok(());
    }
    for r in api.every_log(&filter) {
        print::record(out, &r.map_err(local)?, a.json)?;
    }
    Ok(())
}

/// Every command against a hub (`--hub URL`).
async fn run_hub(cli: Cli) -> anyhow::Result<()> {
    let url = cli.hub.as_deref().unwrap_or_default();
    let mut hub = HubClient::new(
        url,
        cli.key.as_deref(),
        cli.org.as_deref(),
        cli.project.as_deref(),
    )?;
    if let Some(ca) = &cli.ca_file {
        hub = hub.trusting(ca)?;
    }
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
                    print::json_line(&mut out, &s)?;
                } else {
                    print::hub_session_row(&mut out, &s)?;
                }
            }
        }
        Command::Session { command } => match command {
            SessionCommand::Status { id: Some(id), json } | SessionCommand::Show { id, json } => {
                let s = hub.session(&id).await?;
                if json {
                    print::json_line(&mut out, &s)?;
                } else {
                    print::hub_session(&mut out, &s)?;
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
                print::tags_line(&mut out, &s.id, &s.tags)?;
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
                        print::artifact_row(&mut out, a.size_bytes, "uploaded", &a.path)?;
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
        Command::Mark { .. } => bail!(
            "marks are made on the robot (run `logbook mark` there without --hub)"
        ),
        Command::Marks {
            session,
            name,
            json,
        } => {
            for m in hub.marks(session.as_deref(), name.as_deref()).await? {
                if json {
                    print::json_line(&mut out, &m)?;
                } else {
                    print::mark_row(
                        &mut out,
                        &print::MarkRow {
                            timestamp: &m.timestamp,
                            priority: &m.priority,
                            name: &m.name,
                            before_seconds: m.before_seconds,
                            after_seconds: m.after_seconds,
                            session: m.session_id.as_deref(),
                            metadata: &m.metadata,
                            released: m.released.as_deref(),
                        },
                    )?;
                }
            }
        }
        Command::Status { .. } | Command::Flush | Command::Log { .. } => bail!(
            "`status`, `flush` and `log` talk to the agent on a robot; run them there without --hub"
        ),
        #[cfg(feature = "hub")]
        Command::Dev { .. } => unreachable!("main runs `dev` on its own runtime"),
    }
    out.flush()?;
    Ok(())
}

/// `logs` at a hub: the local paging and tail rules, then `--follow` over
/// the hub's WebSocket live route.
async fn hub_logs(hub: &HubClient, out: &mut impl Write, a: LogsArgs) -> anyhow::Result<()> {
    if a.mark.is_some() && (a.follow || a.device.is_some()) {
        bail!("with --hub, --mark narrows a session's logs (--session ID), without --follow");
    }
    let scope = match (a.session.as_deref(), a.device) {
        (_, Some(d)) => LogScope::Device(d),
        (Some("current") | None, None) => bail!(
            "with --hub, logs needs --session ID or --device D (list sessions with `sessions`)"
        ),
        (Some(s), None) => LogScope::Session(s.to_owned()),
    };
    let mut filter = logbook::client::hub::LogFilter::default();
    for (k, v) in [
        ("level", a.level),
        ("module", a.module),
        ("search", a.search),
        ("since", a.since),
        ("until", a.until),
        ("mark", a.mark),
    ] {
        if let Some(v) = v {
            filter.0.push((k, v));
        }
    }
    let mut seen = BTreeSet::new();
    let tail = a.limit.or(if a.follow { Some(10) } else { None });
    match tail {
        // The newest N, printed oldest first.
        Some(n) => {
            for r in hub.newest(&scope, &filter, n).await? {
                print::record(out, &r, a.json)?;
                seen.insert(r.seq);
            }
        }
        None => {
            hub.each_log(&scope, &filter, |r| print::record(out, r, a.json))
                .await?
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
            print::record(out, r, json)?;
            out.flush()
        },
        |note| eprintln!("logbook: {note}"),
        logbook::client::hub::FollowTiming::default(),
    )
    .await?;
    Ok(())
}
