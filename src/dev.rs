//! `logbook dev`: a hub and an agent in this one process, under one
//! directory, wired together — the whole system on a laptop with one
//! command. It creates (once) an operator key and a device token, runs
//! `hub::serve` on a bound listener and `agent::run` with a config pointing
//! at it, prints where everything is and three commands to try, and on
//! Ctrl-C stops the agent (which commits everything) before the hub.
//!
//! Invariant: the only module that uses both `agent` and `hub`; it talks to
//! each through its public entry points only, exactly as the two daemons'
//! `main`s do.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::agent;
use crate::hub::{self, HubConfig};

/// The organization and project `logbook dev` creates its keys in.
pub const ORG: &str = "dev";
pub const PROJECT: &str = "sandbox";
/// The device id of the in-process agent (its token is bound to it).
pub const DEVICE_ID: &str = "dev-robot";
/// Where the hub listens unless told otherwise (the hub's own default).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8470";

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Keys(String),
    #[error(transparent)]
    Hub(#[from] hub::HubError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Agent(#[from] agent::AgentError),
    #[error("the agent did not open {0} within 20 s")]
    NotReady(PathBuf),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevError {
    let what = what.into();
    move |source| DevError::Io { what, source }
}

/// What `logbook dev` was asked for.
#[derive(Debug, Clone)]
pub struct DevOptions {
    pub dir: PathBuf,
    /// The hub's address; when it is taken, a free port is used instead.
    pub listen: SocketAddr,
    /// The `logbook` binary, for the commands printed to try.
    pub cli: PathBuf,
}

/// The keys of a dev directory, made once and reused.
#[derive(Debug, Clone, PartialEq)]
pub struct Keys {
    pub operator: String,
    pub device: String,
}

/// Reads `keys.toml`, or creates the tokens at the hub's store and writes
/// it (mode 0600: the keys are secrets, even on a laptop).
pub fn keys(dir: &Path, hub_dir: &Path) -> Result<Keys, DevError> {
    let path = dir.join("keys.toml");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let table: toml::Table = text
            .parse()
            .map_err(|e| DevError::Keys(format!("{}: {e}", path.display())))?;
        let get = |k: &str| {
            table
                .get(k)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
                .ok_or_else(|| {
                    DevError::Keys(format!(
                        "{}: no {k} (delete the file to make new keys)",
                        path.display()
                    ))
                })
        };
        return Ok(Keys {
            operator: get("operator")?,
            device: get("device")?,
        });
    }
    let keys = Keys {
        operator: hub::create_token(hub_dir, ORG, None, None)?,
        device: hub::create_token(hub_dir, ORG, Some(PROJECT), Some(DEVICE_ID))?,
    };
    let mut table = toml::Table::new();
    table.insert("operator".into(), keys.operator.clone().into());
    table.insert("device".into(), keys.device.clone().into());
    let text = format!(
        "# Keys of this `logbook dev` directory (org {ORG:?}, project {PROJECT:?}).\n{table}"
    );
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(io(format!("writing {}", path.display())))?;
    Ok(keys)
}

/// The agent's sockets live in `<dir>/run` unless that path is too long
/// for a Unix socket (108 bytes), then in a short directory under /tmp
/// named after the dev directory.
fn runtime_dir(dir: &Path) -> PathBuf {
    let preferred = dir.join("run");
    if preferred.join("forward.sock").as_os_str().len() < 100 {
        return preferred;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
    std::env::temp_dir().join(format!("logbook-dev-{}", &hex::encode(digest)[..12]))
}

const AGENT_TOML: &str = "\
# Configuration of the agent that `logbook dev` runs (same keys as
# /etc/logbook/agent.toml). The hub URL, token and device id are set by
# `logbook dev` itself. For example:
#
# [buffer]
# max_bytes = \"64MiB\"
#
# [sync]
# linger = \"200ms\"
";

/// Runs the hub and the agent until `shutdown` fires; prints the intro to
/// `out` once both are up.
pub async fn run(
    opts: DevOptions,
    out: &mut (impl Write + Send),
    shutdown: CancellationToken,
) -> Result<(), DevError> {
    let dir = if opts.dir.is_absolute() {
        opts.dir.clone()
    } else {
        std::env::current_dir()
            .map_err(io("finding the current directory"))?
            .join(&opts.dir)
    };
    // `./x` would print as `/cwd/./x`: drop the `.` parts.
    let dir: PathBuf = dir
        .components()
        .filter(|c| *c != std::path::Component::CurDir)
        .collect();
    let hub_dir = dir.join("hub");
    let state_dir = dir.join("agent");
    for d in [&dir, &hub_dir, &state_dir] {
        std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
    }
    let keys = {
        let (dir, hub_dir) = (dir.clone(), hub_dir.clone());
        tokio::task::spawn_blocking(move || keys(&dir, &hub_dir))
            .await
            .map_err(|e| DevError::Keys(e.to_string()))??
    };

    let listener = match tokio::net::TcpListener::bind(opts.listen).await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let any = SocketAddr::new(opts.listen.ip(), 0);
            tokio::net::TcpListener::bind(any)
                .await
                .map_err(io(format!("listening on {any}")))?
        }
        Err(e) => return Err(io(format!("listening on {}", opts.listen))(e)),
    };
    let addr = listener
        .local_addr()
        .map_err(io("reading the hub address"))?;
    let url = format!("http://{addr}");
    let hub_cfg = HubConfig {
        data_dir: hub_dir.clone(),
        listen: addr,
        ..HubConfig::default()
    };
    let hub_stop = CancellationToken::new();
    let mut hub_task = tokio::spawn(hub::serve(
        listener,
        hub_cfg,
        hub_stop.clone().cancelled_owned(),
    ));

    let agent_toml = dir.join("agent.toml");
    if !agent_toml.exists() {
        std::fs::write(&agent_toml, AGENT_TOML)
            .map_err(io(format!("writing {}", agent_toml.display())))?;
    }
    let runtime = runtime_dir(&dir);
    // The caller's LOGBOOK_* variables apply, except the wiring, which must
    // match the token.
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("LOGBOOK_"))
        .collect();
    let var = |section, key| crate::config::env_name(agent::config::KEYS, section, key);
    env.extend([
        (var("device", "id"), DEVICE_ID.to_owned()),
        (var("sync", "hub"), url.clone()),
        (var("sync", "token"), keys.device.clone()),
    ]);
    let overrides = agent::config::Overrides {
        state_dir: Some(state_dir.clone()),
        runtime_dir: Some(runtime.clone()),
    };
    let agent_cfg = agent::config::load(Some(&agent_toml), &overrides, env)?;
    let api_socket = agent_cfg.api_socket();
    let ingest_socket = agent_cfg.ingest_socket();
    let agent_stop = CancellationToken::new();
    let mut agent_task = tokio::spawn(agent::run(
        agent_cfg,
        HashMap::new(),
        agent_stop.clone(),
        agent::systemd::Notifier::new(None),
    ));

    // Ready when the API socket answers a connect.
    let start = tokio::time::Instant::now();
    loop {
        if tokio::net::UnixStream::connect(&api_socket).await.is_ok() {
            break;
        }
        if agent_task.is_finished() || start.elapsed() > Duration::from_secs(20) {
            hub_stop.cancel();
            let _ = (&mut hub_task).await;
            return match agent_task.await {
                Ok(Err(e)) => Err(e.into()),
                _ => Err(DevError::NotReady(api_socket)),
            };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let intro = intro(&Intro {
        dir: &dir,
        url: &url,
        keys: &keys,
        api_socket: &api_socket,
        ingest_socket: &ingest_socket,
        runtime: &runtime,
        cli: &opts.cli,
    });
    out.write_all(intro.as_bytes())
        .and_then(|()| out.flush())
        .map_err(io("printing"))?;

    let mut failed: Option<DevError> = None;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        r = &mut agent_task => {
            failed = Some(match r {
                Ok(Err(e)) => e.into(),
                Ok(Ok(())) => DevError::Keys("the agent stopped unexpectedly".into()),
                Err(e) => DevError::Keys(format!("the agent crashed: {e}")),
            });
        }
        r = &mut hub_task => {
            failed = Some(match r {
                Ok(Err(e)) => e.into(),
                Ok(Ok(())) => DevError::Keys("the hub stopped unexpectedly".into()),
                Err(e) => DevError::Keys(format!("the hub crashed: {e}")),
            });
        }
    }
    // The agent first: it commits everything it received; then the hub.
    agent_stop.cancel();
    if !agent_task.is_finished() {
        match agent_task.await {
            Ok(Err(e)) => tracing::error!("the agent stopped with an error: {e}"),
            Err(e) => tracing::error!("the agent crashed: {e}"),
            Ok(Ok(())) => {}
        }
    }
    hub_stop.cancel();
    if !hub_task.is_finished() {
        match hub_task.await {
            Ok(Err(e)) => tracing::error!("the hub stopped with an error: {e}"),
            Err(e) => tracing::error!("the hub crashed: {e}"),
            Ok(Ok(())) => {}
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

struct Intro<'a> {
    dir: &'a Path,
    url: &'a str,
    keys: &'a Keys,
    api_socket: &'a Path,
    ingest_socket: &'a Path,
    runtime: &'a Path,
    cli: &'a Path,
}

/// The text printed once both are up: where everything is and three
/// commands to try.
fn intro(i: &Intro<'_>) -> String {
    let api = format!("{}/api/v1/organizations/{ORG}/projects/{PROJECT}", i.url);
    format!(
        "\
logbook dev: a hub and an agent on this machine, wired together.

  directory      {dir}
  hub            {url}  (organization {ORG}, project {PROJECT})
  console        {url}/  (open in a browser, sign in with the operator key)
  operator key   {op}
  device         {DEVICE_ID}
  agent API      {api_socket}
  log ingest     {ingest}  (JSON lines)
                 {syslog}  (syslog)
                 {forward}  (Fluent Forward)

Try:
  # 1. start a session
  {cli} --runtime-dir {runtime} session start --tag demo
  # 2. send a log line (or pipe lines in: one record each)
  {cli} --runtime-dir {runtime} log --level info hello from my robot
  #    (any JSON-lines client works too, e.g. with socat:
  #     echo '{{\"level\":\"info\",\"msg\":\"hello\"}}' | socat - UNIX-CONNECT:{ingest})
  # 3. list sessions at the hub, as from an operator laptop
  export LOGBOOK_HUB_URL={url} LOGBOOK_HUB_KEY={op} LOGBOOK_ORG={ORG} LOGBOOK_PROJECT={PROJECT}
  {cli} sessions
  #    (the API itself: curl -s -H 'Authorization: Bearer {op}' {api}/sessions)

Ctrl-C stops both.
",
        dir = i.dir.display(),
        url = i.url,
        op = i.keys.operator,
        api_socket = i.api_socket.display(),
        ingest = i.ingest_socket.display(),
        syslog = i.runtime.join("syslog.sock").display(),
        forward = i.runtime.join("forward.sock").display(),
        cli = i.cli.display(),
        runtime = i.runtime.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_directories_get_a_short_runtime_dir() {
        let check = |dir: &str, under_dir: bool| {
            let r = runtime_dir(Path::new(dir));
            assert_eq!(r.starts_with(dir), under_dir, "{dir} -> {}", r.display());
            assert!(r.join("forward.sock").as_os_str().len() < 108);
        };
        check("/home/me/logbook/.logbook", true);
        check(&format!("/home/me/{}/.logbook", "deep/".repeat(30)), false);
    }

    #[test]
    fn the_intro_exports_what_the_hub_commands_need() {
        let keys = Keys {
            operator: "lbk_op".into(),
            device: "lbd_dev".into(),
        };
        let text = intro(&Intro {
            dir: Path::new("/d"),
            url: "http://127.0.0.1:7070",
            keys: &keys,
            api_socket: Path::new("/d/run/api.sock"),
            ingest_socket: Path::new("/d/run/ingest.sock"),
            runtime: Path::new("/d/run"),
            cli: Path::new("/bin/logbook"),
        });
        let export = format!(
            "export LOGBOOK_HUB_URL=http://127.0.0.1:7070 LOGBOOK_HUB_KEY=lbk_op LOGBOOK_ORG={ORG} LOGBOOK_PROJECT={PROJECT}\n  /bin/logbook sessions\n"
        );
        assert!(text.contains(&export), "{text}");
        assert!(
            text.contains(
                "  /bin/logbook --runtime-dir /d/run log --level info hello from my robot\n"
            ),
            "{text}"
        );
        assert!(
            !text.contains("lbd_dev"),
            "the device token stays in keys.toml"
        );
    }

    #[test]
    fn keys_are_made_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let hub_dir = dir.path().join("hub");
        let first = keys(dir.path(), &hub_dir).unwrap();
        let again = keys(dir.path(), &hub_dir).unwrap();
        assert_eq!(first, again);
        assert_ne!(first.operator, first.device);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("keys.toml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
