//! What the benchmarks under `examples/` share: `arg` for `--name value`
//! flags, the realistic robot log mix (`LEVELS`, `MODULES`, `line(i)`),
//! finding and starting the release binaries next to the bench, and CPU
//! and memory figures of a process from `/proc`.
//!
//! Each bench declares `mod common;` and uses the part it needs, so the
//! rest is unused there.
#![allow(dead_code)]

use std::ops::{Deref, DerefMut};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The value after flag `name` on the command line, or `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_owned())
}

pub const LEVELS: &[&str] = &[
    "debug", "info", "info", "info", "warn", "debug", "error", "trace",
];
pub const MODULES: &[&str] = &[
    "nav::planner",
    "nav::localization",
    "perception.lidar",
    "perception.camera",
    "drive::motor_left",
    "drive::motor_right",
    "arm.controller",
    "battery",
];

/// A realistic robot log line of 150–300 bytes, distinct for every `i`.
pub fn line(i: u64) -> String {
    let level = LEVELS[(i % LEVELS.len() as u64) as usize];
    let module = MODULES[((i / 3) % MODULES.len() as u64) as usize];
    format!(
        r#"{{"level":"{level}","target":"{module}","msg":"cycle {i} done in {}us, queue depth {}, pose x={}.{} y={}.{}","fields":{{"seq":{i},"temp_c":{}.{},"mission":"m-{}"}}}}"#,
        (i * 37) % 5000,
        i % 17,
        (i * 13) % 200,
        i % 1000,
        (i * 7) % 150,
        (i * 3) % 1000,
        40 + i % 30,
        i % 10,
        i / 10_000
    )
}

/// The directory holding the crate's binaries of the bench's profile
/// (`target/release/` for `target/release/examples/x`).
pub fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned()
}

/// A `logbookd` on its own state and runtime directories, with a buffer of
/// `buffer_max` (a size such as `1GiB`) and no free-space floor, so the
/// bench measures ingest and not eviction; its stdout is discarded.
pub fn logbookd(bin: &Path, state: &Path, run: &Path, buffer_max: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--state-dir")
        .arg(state)
        .arg("--runtime-dir")
        .arg(run)
        .env("LOGBOOK_DEVICE_ID", "bench")
        .env("LOGBOOK_BUFFER_MAX_BYTES", buffer_max)
        .env("LOGBOOK_BUFFER_MIN_FREE_BYTES", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}

/// A process the bench started, killed and reaped when this drops: a
/// bench that panics does not leave its agent or hub running (holding the
/// bench's stdout, so that a `| tee` would wait forever).
pub struct Reaped(pub Child);

impl Deref for Reaped {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        // Ok if it was stopped and reaped already.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the agent's `api.sock` in `run` accepts a connection;
/// panics after `limit`.
pub fn wait_for_api(run: &Path, limit: Duration) {
    let start = Instant::now();
    while UnixStream::connect(run.join("api.sock")).is_err() {
        assert!(start.elapsed() < limit, "logbookd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The fields of `/proc/{pid}/stat` after the command name (which may
/// hold spaces): field 0 is the state, 11 utime, 12 stime.
fn stat_fields(stat: &str) -> Vec<&str> {
    stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect()
}

/// utime + stime of a `stat` file's fields, seconds (at 100 ticks/s).
fn stat_cpu(f: &[&str]) -> f64 {
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

/// utime + stime of `pid`, seconds.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat_cpu(&stat_fields(&stat))
}

/// (utime + stime in seconds, VmRSS KiB, VmHWM KiB) of `pid`.
pub fn proc_stats(pid: u32) -> (f64, u64, u64) {
    let cpu = cpu_secs(pid);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    (
        cpu,
        proc_field(&status, "VmRSS:"),
        proc_field(&status, "VmHWM:"),
    )
}

/// The number after `key` in a `/proc` "Key: value" file (`status`,
/// `smaps_rollup`); 0 when it is missing.
pub fn proc_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds per thread name of `pid`, busiest first.
pub fn thread_cpu(pid: u32) -> Vec<(String, f64)> {
    let mut by_name: std::collections::BTreeMap<String, f64> = Default::default();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let name = stat[stat.find('(').unwrap() + 1..stat.rfind(')').unwrap()].to_owned();
        *by_name.entry(name).or_default() += stat_cpu(&stat_fields(&stat));
    }
    let mut v: Vec<_> = by_name.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}
