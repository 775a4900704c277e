//! `logbook-hub`: the fleet server (`serve`), its token tool (`token
//! create`) and its schema tool (`migrate`). A thin shell over `logbook::hub`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use logbook::hub::{self, HubConfig};

#[derive(Parser)]
#[command(name = "logbook-hub", version, about = "The logbook fleet server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the ingest and Sessions API until SIGTERM or Ctrl-C.
    Serve {
        /// Configuration file (default /etc/logbook/hub.toml if present).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory (hub.db, blobs/, uploads/); overrides server.data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Address to listen on; port 0 picks one, written to <data-dir>/hub.addr.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Bring the database's schema up to this binary's (also done by
    /// `serve`) and print its version.
    Migrate {
        /// Configuration file (default /etc/logbook/hub.toml if present).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Manage tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a token and print it (only once: the hub keeps its hash). For
    /// a device that has one already, this adds a second: both work until
    /// the old one is revoked (rotation without downtime).
    Create(CreateArgs),
    /// Revoke a token: refused from the next request on, on every replica.
    Revoke(RevokeArgs),
}

#[derive(Args)]
struct RevokeArgs {
    /// The hub's data directory (where hub.db is); overrides server.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Configuration file (default /etc/logbook/hub.toml if present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The token to revoke; `-` reads it from stdin (keeps it out of ps).
    token: String,
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("kind").required(true).args(["operator", "device"]))]
struct CreateArgs {
    /// The hub's data directory (where hub.db is); overrides server.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Configuration file (default /etc/logbook/hub.toml if present): the
    /// token goes to its storage.database, as `serve` would store it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Organization the token belongs to.
    #[arg(long)]
    org: String,
    /// Project the token belongs to: a device token ingests into it; an
    /// operator key reads and manages it only. An operator key made
    /// without it reads every project of the organization.
    #[arg(long)]
    project: Option<String>,
    /// An operator key: reads and manages the organization's data (one
    /// project's with --project).
    #[arg(long)]
    operator: bool,
    /// A device token: ingest only, for this device id (needs --project).
    #[arg(long, value_name = "DEVICE_ID", requires = "project")]
    device: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => logbook::exit::report("logbook-hub", e.as_ref()),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Token {
            command: TokenCommand::Create(a),
        } => {
            anyhow::ensure!(!a.org.trim().is_empty(), "--org must not be empty");
            if let Some(p) = &a.project {
                anyhow::ensure!(!p.trim().is_empty(), "--project must not be empty");
            }
            if let Some(d) = &a.device {
                anyhow::ensure!(!d.trim().is_empty(), "--device must not be empty");
            }
            // The token goes where `serve` with the same configuration
            // (file, environment, --data-dir) keeps its rows.
            let mut cfg = HubConfig::load(a.config.as_deref(), std::env::vars())?;
            if let Some(d) = a.data_dir {
                cfg.data_dir = d;
            }
            let token = hub::create_token_in(
                &cfg.database,
                &cfg.data_dir,
                &a.org,
                a.project.as_deref(),
                a.device.as_deref(),
            )
            .context("cannot create token")?;
            use std::io::Write;
            writeln!(std::io::stdout(), "{token}")?;
            Ok(())
        }
        Command::Token {
            command: TokenCommand::Revoke(a),
        } => {
            let token = if a.token == "-" {
                let mut t = String::new();
                std::io::stdin()
                    .read_line(&mut t)
                    .context("cannot read the token from stdin")?;
                t
            } else {
                a.token
            };
            anyhow::ensure!(!token.trim().is_empty(), "the token must not be empty");
            let mut cfg = HubConfig::load(a.config.as_deref(), std::env::vars())?;
            if let Some(d) = a.data_dir {
                cfg.data_dir = d;
            }
            let who = hub::revoke_token_in(&cfg.database, &cfg.data_dir, &token)
                .context("cannot revoke token")?;
            let Some(p) = who else {
                anyhow::bail!("no such token on this hub (already revoked?)");
            };
            let what = match (&p.kind, &p.device_id) {
                (hub::TokenKind::Device, Some(d)) => {
                    format!("device token of {d} in {}/{}", p.org, p.project)
                }
                _ if p.all_projects => format!("operator key of {}", p.org),
                _ => format!("operator key of {}/{}", p.org, p.project),
            };
            use std::io::Write;
            writeln!(std::io::stdout(), "revoked the {what}")?;
            Ok(())
        }
        Command::Migrate { config } => {
            let cfg = HubConfig::load(config.as_deref(), std::env::vars())?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            let done = rt.block_on(hub::migrate(&cfg)).context("cannot migrate")?;
            use std::io::Write;
            writeln!(std::io::stdout(), "{done}")?;
            Ok(())
        }
        Command::Serve {
            config,
            data_dir,
            listen,
        } => {
            let mut cfg = HubConfig::load(config.as_deref(), std::env::vars())?;
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if let Some(l) = listen {
                cfg.listen = l
                    .parse()
                    .with_context(|| format!("--listen: expected host:port, found {l:?}"))?;
            }
            init_tracing();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            rt.block_on(serve(cfg))
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOGBOOK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never into journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn serve(cfg: HubConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data directory {}", cfg.data_dir.display()))?;
    let data_dir = cfg.data_dir.clone();
    // Storage first: "listening" means it is open; until then connections
    // wait in the listener's backlog.
    let opened = hub::open(cfg).await?;
    // Written atomically, so a reader never sees half an address.
    let addr_file = data_dir.join(hub::ADDR_FILE);
    let tmp = addr_file.with_extension("addr.tmp");
    std::fs::write(&tmp, format!("{addr}\n"))
        .and_then(|()| std::fs::rename(&tmp, &addr_file))
        .with_context(|| format!("cannot write {}", addr_file.display()))?;
    println!("logbook-hub listening on {}://{addr}", opened.scheme());
    let shutdown = logbook::exit::terminated();
    let result = opened.serve(listener, shutdown).await;
    let _ = std::fs::remove_file(&addr_file);
    Ok(result?)
}
