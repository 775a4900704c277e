//! `logbookd` binary: parses flags, loads the configuration, and runs
//! [`logbook::agent::run_with_reload`] until SIGTERM or SIGINT (SIGHUP
//! reloads the configuration).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use logbook::agent::{self, config, systemd};

/// `logbookd --help`.
const HELP: &str = "\
The logbook agent: ingests logs over Unix sockets into a bounded SQLite
ring buffer and manages sessions.

Usage: logbookd [OPTIONS]

Options:
      --config <FILE>      Configuration file (default /etc/logbook/agent.toml, optional)
      --state-dir <DIR>    Stands in for /var/lib/logbook (database, artifacts)
      --runtime-dir <DIR>  Stands in for /run/logbook (sockets)
      --print-config       Print the effective configuration as TOML and exit
  -h, --help               Print help
  -V, --version            Print version
";

/// The flags. Parsed with `lexopt`, not clap as `logbook` is: four flags
/// are not worth clap's 250 KB in the robot's binary (BENCHMARKS.md,
/// "zstd on the wire").
#[derive(Debug, Default, PartialEq)]
struct Args {
    config: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    runtime_dir: Option<PathBuf>,
    print_config: bool,
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
enum Command {
    Run(Args),
    /// Print this and exit 0 (`--help`, `--version`).
    Print(String),
}

fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, lexopt::Error> {
    use lexopt::prelude::*;
    let mut out = Args::default();
    let mut parser = lexopt::Parser::from_iter(std::iter::once("logbookd".into()).chain(args));
    while let Some(arg) = parser.next()? {
        match arg {
            Long("config") => out.config = Some(parser.value()?.into()),
            Long("state-dir") => out.state_dir = Some(parser.value()?.into()),
            Long("runtime-dir") => out.runtime_dir = Some(parser.value()?.into()),
            Long("print-config") => out.print_config = true,
            Short('h') | Long("help") => return Ok(Command::Print(HELP.to_owned())),
            Short('V') | Long("version") => {
                return Ok(Command::Print(format!(
                    "logbookd {}\n",
                    env!("CARGO_PKG_VERSION")
                )))
            }
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(Command::Run(out))
}

fn main() -> ExitCode {
    // Before anything can load a library at run time (agent::memory).
    logbook::agent::memory::note_start_mappings();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => logbook::exit::report("logbookd", e.as_ref()),
    }
}

fn run() -> anyhow::Result<()> {
    let args = match parse(std::env::args_os().skip(1))
        .map_err(|e| anyhow::anyhow!("{e} (see logbookd --help)"))?
    {
        Command::Run(args) => args,
        Command::Print(text) => {
            print!("{text}");
            return Ok(());
        }
    };
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
    // A registry, not `fmt()`: its subscriber stops at INFO whatever the
    // filter allows, which kept `log.level = "debug"` from showing debug.
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false),
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(OsString::from)).map_err(|e| e.to_string())
    }

    #[test]
    fn flags_parse_as_documented() {
        assert_eq!(parsed(&[]), Ok(Command::Run(Args::default())));
        let want = Args {
            config: Some("/etc/x.toml".into()),
            state_dir: Some("/s".into()),
            runtime_dir: Some("/r".into()),
            print_config: true,
        };
        let spaced = [
            "--config",
            "/etc/x.toml",
            "--state-dir",
            "/s",
            "--runtime-dir",
            "/r",
            "--print-config",
        ];
        assert_eq!(parsed(&spaced), Ok(Command::Run(want)));
        let joined = parsed(&["--config=/etc/x.toml", "--state-dir=/s"]);
        let Ok(Command::Run(a)) = joined else {
            panic!("{joined:?}")
        };
        assert_eq!(a.config, Some("/etc/x.toml".into()));
        assert_eq!(a.state_dir, Some("/s".into()));
        for help in ["-h", "--help"] {
            let Ok(Command::Print(text)) = parsed(&[help]) else {
                panic!("{help}")
            };
            assert!(text.contains("--runtime-dir <DIR>"), "{text}");
        }
        let Ok(Command::Print(v)) = parsed(&["-V"]) else {
            panic!("-V")
        };
        assert_eq!(v, format!("logbookd {}\n", env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn a_bad_command_line_says_what_is_wrong() {
        let e = parsed(&["--nope"]).unwrap_err();
        assert!(e.contains("--nope"), "{e}");
        let e = parsed(&["--config"]).unwrap_err();
        assert!(e.contains("--config") && e.contains("missing"), "{e}");
        let e = parsed(&["extra"]).unwrap_err();
        assert!(e.contains("extra"), "{e}");
        let e = parsed(&["--print-config=yes"]).unwrap_err();
        assert!(e.contains("--print-config"), "{e}");
    }
}
