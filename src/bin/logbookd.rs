//! `logbookd` binary: parses flags, loads the configuration, and runs
//! [`logbook::agent::run_with_reload`] until SIGTERM or SIGINT (SIGHUP
//! reloads the configuration).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use logbook::agent::{self, config, systemd};

/// The logbook agent: ingests logs over Unix sockets into a bounded SQLite
/// ring buffer and manages sessions.
#[derive(Debug, Parser)]
#[command(name = "logbookd", version)]
struct Args {
    /// Configuration file (default /etc/logbook/agent.toml, optional).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Stands in for /var/lib/logbook (database, artifacts).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Stands in for /run/logbook (sockets).
    #[arg(long, value_name = "DIR")]
    runtime_dir: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => logbook::exit::report("logbookd", e.as_ref()),
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let overrides = config::Overrides {
        state_dir: args.state_dir,
        runtime_dir: args.runtime_dir,
    };
    let cfg = config::load(args.config.as_deref(), &overrides, std::env::vars())?;
    // SIGHUP loads again exactly this way (the same file, flags, and the
    // process environment).
    let file = args.config.clone();
    let again = overrides.clone();
    let reload: agent::Reloader =
        std::sync::Arc::new(move || config::load(file.as_deref(), &again, std::env::vars()));
    if args.print_config {
        print!("{}", config::to_toml(&cfg));
        return Ok(());
    }
    // `Targets` ("info", "logbook=debug,warn"), not `EnvFilter`: the same
    // directives for the agent's own log without the regex engine that
    // span and field filters need (BENCHMARKS.md, "Binary sizes").
    let filter: tracing_subscriber::filter::Targets = cfg
        .raw
        .log
        .level
        .parse()
        .map_err(|e| anyhow::anyhow!("log.level: {e}"))?;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .finish()
        .with(filter)
        .init();
    // Before the runtime starts threads: adopting fds and clearing the
    // LISTEN_* variables is only sound while this is the only thread.
    let passed = systemd::listen_fds();
    let notifier = systemd::Notifier::from_env();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let agent = agent::run_with_reload(cfg, passed, shutdown.clone(), notifier, Some(reload));
        logbook::exit::run_until_terminated(shutdown, agent, || {}).await
    })?;
    Ok(())
}
