//! Test-only PostgreSQL: one throwaway cluster per test process (Debian's
//! `postgresql` package, in a temporary directory, on a free port), a
//! fresh database per test, and the cluster stopped and removed when the
//! test process exits.
//!
//! The server runs under a small shell that reads its stdin: the pipe
//! closes when this process ends however it ends (passed, panicked,
//! killed), and the shell then stops the server and removes its directory.
//! As root (initdb refuses it) the server runs as the `postgres` user.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A role that must log in with a password (`right`), for tests of wrong
/// credentials; every other role is trusted on 127.0.0.1.
pub(crate) const PASSWORD_ROLE: &str = "logbook_pw";

struct Cluster {
    port: u16,
    /// Holding the shell's stdin open keeps the server running.
    _keeper: Mutex<Child>,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// The newest installed server's `bin` directory.
fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin)
}

/// `cmd` run as the `postgres` user when this process is root.
fn as_server_user(program: &Path) -> Command {
    if rustix::process::geteuid().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut cmd: Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

fn start() -> Result<Cluster, String> {
    let bin = bin_dir().ok_or("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; apt-get install postgresql)")?;
    let dir = tempfile::Builder::new()
        .prefix("logbook-pg-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?
        .keep();
    if rustix::process::geteuid().is_root() {
        let out = Command::new("id")
            .args(["-u", "postgres"])
            .output()
            .map_err(|e| format!("id -u postgres: {e}"))?;
        let uid: u32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| "no postgres user to run the server as".to_string())?;
        std::os::unix::fs::chown(&dir, Some(uid), None).map_err(|e| format!("chown: {e}"))?;
    }
    let data = dir.join("data");
    let mut initdb = as_server_user(&bin.join("initdb"));
    initdb.arg("-D").arg(&data).args([
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--locale=C",
    ]);
    run(initdb, "initdb")?;
    let hba = format!(
        "local all all trust\nhost all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 trust\n"
    );
    // Written through the server user: the data directory is theirs.
    let mut write_hba = as_server_user(Path::new("/bin/sh"));
    write_hba
        .arg("-c")
        .arg(format!(
            "printf '%s' \"$1\" > '{}'",
            data.join("pg_hba.conf").display()
        ))
        .arg("sh")
        .arg(hba);
    run(write_hba, "writing pg_hba.conf")?;

    // A port taken between `free_port` and the server's bind: try another.
    let mut last_err = String::new();
    for _ in 0..3 {
        let port = free_port();
        let script = format!(
            "'{postgres}' -D '{data}' -p {port} -k '{dir}' -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200 &
             pid=$!
             read _ignored
             kill -INT $pid; wait $pid; rm -rf '{dir}'",
            postgres = bin.join("postgres").display(),
            data = data.display(),
            dir = dir.display(),
        );
        let mut sh = as_server_user(Path::new("/bin/sh"));
        sh.arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = sh.spawn().map_err(|e| format!("starting postgres: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-p"])
                .arg(port.to_string())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                let role = format!("CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD 'right'");
                let mut psql = Command::new(bin.join("psql"));
                psql.args([
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-p",
                ])
                .arg(port.to_string())
                .args(["-c", &role]);
                run(psql, "creating the password role")?;
                return Ok(Cluster {
                    port,
                    _keeper: Mutex::new(child),
                });
            }
            if let Ok(Some(_)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    std::io::Read::read_to_string(&mut e, &mut err).ok();
                }
                last_err = format!("postgres exited: {}", err.trim());
                break;
            }
            if Instant::now() > deadline {
                child.stdin.take().map(|mut s| s.write_all(b"\n"));
                return Err("postgres did not accept connections within 60 s".into());
            }
            // Polling readiness (pg_isready), not a fixed wait.
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Err(last_err)
}

/// A URL of a fresh, empty database on this process's cluster, or `None`
/// (after printing `SKIPPED: ...`) when PostgreSQL is not installed.
/// Under CI (`CI` set) a cluster that cannot start fails the test.
pub(crate) fn fresh_database(test: &str) -> Option<String> {
    let port = match CLUSTER.get_or_init(start) {
        Ok(c) => c.port,
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("{test}: PostgreSQL is required under CI: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: {test}: {e}");
            return None;
        }
    };
    let name = format!(
        "t{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    );
    let bin = bin_dir().expect("the cluster started from it");
    let mut psql = Command::new(bin.join("psql"));
    psql.args([
        "-q",
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-p",
    ])
    .arg(port.to_string())
    .args(["-c", &format!("CREATE DATABASE {name}")]);
    run(psql, "CREATE DATABASE").unwrap_or_else(|e| panic!("{test}: {e}"));
    Some(format!("postgres://postgres@127.0.0.1:{port}/{name}"))
}

/// The port of this process's cluster (starting it), for tests that build
/// their own URLs; `None` as [`fresh_database`] would.
pub(crate) fn cluster_port(test: &str) -> Option<u16> {
    fresh_database(test)?;
    CLUSTER.get()?.as_ref().ok().map(|c| c.port)
}

/// Runs `sql` with psql on the database at `url` (as the `postgres`
/// superuser); the unaligned output, or a panic with psql's error.
pub(crate) fn psql(url: &str, sql: &str) -> String {
    let bin = bin_dir().expect("PostgreSQL is installed");
    let out = Command::new(bin.join("psql"))
        .args(["-qAtX", "-d", url, "-c", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
