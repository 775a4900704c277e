//! Benchmark of `logbookd` at idle (BENCHMARKS.md, "Idle"), not a test:
//! starts the agent (synced to a `logbook-hub` when `--hub-bin` names one,
//! with an active session and crash capture on, as on a robot), lets it
//! settle, then reads `/proc` over `--secs` seconds with no traffic: RSS,
//! CPU time, and the context switches of every thread (each wake-up of a
//! sleeping thread is a voluntary switch), by thread name.
//!
//! ```text
//! cargo build --release --no-default-features --bin logbookd --example idle_bench
//! target/release/examples/idle_bench --secs 60 [--logbookd PATH] [--hub-bin target/debug/logbook-hub]
//! ```

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{arg, proc_field, proc_stats};

/// Resident KiB per mapped file of `pid` (`[anon]` for the rest), from
/// `/proc/PID/smaps`, largest first.
fn rss_by_mapping(pid: u32) -> Vec<(String, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    let mut name = String::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // A mapping's header: address perms offset dev inode [path].
            let path = words.nth(4).unwrap_or("");
            name = if path.starts_with('/') {
                path.rsplit('/').next().unwrap_or(path).to_owned()
            } else {
                "[anon]".to_owned()
            };
        } else if first == "Rss:" {
            *by.entry(name.clone()).or_default() += proc_field(line, "Rss:");
        }
    }
    let mut v: Vec<_> = by.into_iter().filter(|(_, k)| *k > 0).collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.1));
    v
}

/// (voluntary, involuntary) context switches per thread name of `pid`.
fn switches(pid: u32) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let field = |key: &str| proc_field(&status, key);
        let name = status
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_owned();
        let slot = out.entry(name).or_default();
        slot.0 += field("voluntary_ctxt_switches:");
        slot.1 += field("nonvoluntary_ctxt_switches:");
    }
    out
}

fn hub(hub_bin: &Path, data: &Path) -> (std::process::Child, String, String) {
    let out = Command::new(hub_bin)
        .args(["token", "create", "--data-dir"])
        .arg(data)
        .args(["--org", "bench", "--project", "idle", "--device", "bench"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let child = Command::new(hub_bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("LOGBOOK_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(data.join("hub.addr")) {
            if a.ends_with('\n') {
                break a.trim().to_owned();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "hub did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    (child, format!("http://{addr}"), token)
}

fn main() {
    let secs: u64 = arg("--secs", "60").parse().unwrap();
    let logbookd = PathBuf::from(arg(
        "--logbookd",
        common::bin_dir().join("logbookd").to_str().unwrap(),
    ));
    let hub_bin = arg("--hub-bin", "");
    let dir = tempfile::tempdir().unwrap();
    let (state, run) = (dir.path().join("state"), dir.path().join("run"));
    let mut hub_proc = None;
    let mut cmd = common::logbookd(&logbookd, &state, &run, "256MiB");
    cmd.env("LOGBOOK_LOG_LEVEL", "warn")
        .env("LOGBOOK_ARTIFACTS_CORE_DIR", dir.path().join("cores"));
    if !hub_bin.is_empty() {
        let (child, url, token) = hub(Path::new(&hub_bin), &dir.path().join("hub"));
        cmd.env("LOGBOOK_SYNC_HUB", url)
            .env("LOGBOOK_SYNC_TOKEN", token);
        hub_proc = Some(common::Reaped(child));
    }
    let agent = common::Reaped(cmd.spawn().unwrap());
    common::wait_for_api(&run, Duration::from_secs(30));
    // An active session (its artifact directory watched), a few records.
    let mut api = UnixStream::connect(run.join("api.sock")).unwrap();
    api.write_all(
        b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .unwrap();
    let mut answer = String::new();
    api.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 201") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
    let mut ingest = UnixStream::connect(run.join("ingest.sock")).unwrap();
    for i in 0..100 {
        writeln!(ingest, "{}", common::line(i)).unwrap();
    }
    drop(ingest);
    // Let start-up, the first sync and the first rescans pass.
    std::thread::sleep(Duration::from_secs(5));

    let pid = agent.id();
    let (cpu0, _, _) = proc_stats(pid);
    let sw0 = switches(pid);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let took = t0.elapsed().as_secs_f64();
    let (cpu1, rss, hwm) = proc_stats(pid);
    let sw1 = switches(pid);

    println!(
        "logbookd idle {took:.0} s ({}): RSS {rss} KiB ({:.2} MiB), peak {hwm} KiB, CPU {:.2} s",
        if hub_proc.is_some() {
            "synced to a hub, session active"
        } else {
            "no hub, session active"
        },
        rss as f64 / 1024.0,
        cpu1 - cpu0
    );
    // What the RSS is made of: the binary's own pages (clean, file-backed,
    // shared with the page cache, dropped first under memory pressure)
    // and the process's anonymous memory (heap, stacks, SQLite's cache).
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let kib = |key: &str| proc_field(&rollup, key);
    let anon = kib("Anonymous:");
    println!(
        "  of which anonymous {anon} KiB ({:.2} MiB), file-backed {} KiB (the binary and libraries' pages)",
        anon as f64 / 1024.0,
        kib("Rss:").saturating_sub(anon)
    );
    for (file, kib) in rss_by_mapping(pid) {
        println!("    {file:<30} {kib:>6} KiB");
    }
    let mut total = 0u64;
    println!(
        "{:<24} {:>10} {:>10} {:>8}",
        "thread", "voluntary", "involunt.", "per s"
    );
    for (name, (v1, n1)) in &sw1 {
        // Threads of one name are summed; one that ended in between (a
        // blocking thread past its keep-alive) takes its count with it.
        let (v0, n0) = sw0.get(name).copied().unwrap_or_default();
        let (v, n) = (v1.saturating_sub(v0), n1.saturating_sub(n0));
        total += v + n;
        println!("{name:<24} {v:>10} {n:>10} {:>8.2}", (v + n) as f64 / took);
    }
    println!(
        "all threads: {total} switches, {:.2} per second",
        total as f64 / took
    );
    drop(agent);
    drop(hub_proc);
}
