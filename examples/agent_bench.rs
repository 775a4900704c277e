//! Benchmark of the agent's ingest path: N clients stream realistic robot
//! log lines into a running `logbookd` until `/v1/flush` says they are
//! committed; the same records then go through a bare rusqlite insert loop
//! into the same schema, the ceiling of this design.
//!
//! ```text
//! cargo build --release --bins --example agent_bench
//! target/release/examples/agent_bench --clients 4 --records 1000000
//! ```

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use logbook::agent::store::schema;

const LEVELS: &[&str] = &[
    "debug", "info", "info", "info", "warn", "debug", "error", "trace",
];
const MODULES: &[&str] = &[
    "nav::planner",
    "nav::localization",
    "perception.lidar",
    "perception.camera",
    "drive::motor_left",
    "drive::motor_right",
    "arm.controller",
    "battery",
];

/// One line of 150–300 bytes, varying with `i`.
fn line(client: usize, i: usize) -> String {
    let level = LEVELS[i % LEVELS.len()];
    let module = MODULES[(i / 3 + client) % MODULES.len()];
    let pad = "x".repeat((i * 7) % 90);
    format!(
        r#"{{"level":"{level}","target":"{module}","msg":"cycle {i} done in {}us, queue depth {} {pad}","fields":{{"client":{client},"seq":{i},"temp_c":{}.{}}}}}"#,
        (i * 37) % 5000,
        i % 17,
        40 + i % 30,
        i % 10
    )
}

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_owned())
}

fn http(socket: &Path, method: &str, path: &str) -> String {
    let mut s = UnixStream::connect(socket).expect("connect api.sock");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// CPU seconds per thread name of `pid`, busiest first.
fn thread_cpu(pid: u32) -> Vec<(String, f64)> {
    let mut by_name: std::collections::BTreeMap<String, f64> = Default::default();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let name = stat[stat.find('(').unwrap() + 1..stat.rfind(')').unwrap()].to_owned();
        let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        let secs = (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0;
        *by_name.entry(name).or_default() += secs;
    }
    let mut v: Vec<_> = by_name.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// (utime + stime in seconds, VmRSS KiB, VmHWM KiB) of `pid`.
fn proc_stats(pid: u32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (ticks / 100.0, kib("VmRSS:"), kib("VmHWM:"))
}

fn main() {
    let clients: usize = arg("--clients", "4").parse().unwrap();
    let records: usize = arg("--records", "1000000").parse().unwrap();
    let exe_dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    let logbookd = PathBuf::from(arg(
        "--logbookd",
        &exe_dir.join("logbookd").display().to_string(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let run = dir.path().join("run");
    let api = run.join("api.sock");

    let mut child = Command::new(&logbookd)
        .arg("--state-dir")
        .arg(&state)
        .arg("--runtime-dir")
        .arg(&run)
        .env("LOGBOOK_DEVICE_ID", "bench")
        .env("LOGBOOK_BUFFER_MAX_BYTES", "1GiB")
        .env("LOGBOOK_BUFFER_MIN_FREE_BYTES", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", logbookd.display()));
    let start = Instant::now();
    while UnixStream::connect(&api).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "logbookd did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(500));
    let (cpu0, idle_rss, _) = proc_stats(pid);

    // Each client writes a precomputed ring of distinct lines, so the
    // clients' own formatting does not compete for the two cores.
    let per_client = records / clients;
    let payloads: Vec<Vec<u8>> = (0..clients)
        .map(|c| {
            let mut buf = Vec::new();
            for i in 0..4096 {
                buf.extend_from_slice(line(c, i).as_bytes());
                buf.push(b'\n');
            }
            buf
        })
        .collect();
    let avg_len = payloads[0].len() as f64 / 4096.0;
    let ingest = run.join("ingest.sock");
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for payload in &payloads {
            let ingest = &ingest;
            s.spawn(move || {
                let mut sock = UnixStream::connect(ingest).unwrap();
                let mut left = per_client;
                while left > 0 {
                    let n = left.min(4096);
                    if n == 4096 {
                        sock.write_all(payload).unwrap();
                    } else {
                        let end = payload
                            .iter()
                            .enumerate()
                            .filter(|(_, b)| **b == b'\n')
                            .nth(n - 1)
                            .map(|(i, _)| i + 1)
                            .unwrap();
                        sock.write_all(&payload[..end]).unwrap();
                    }
                    left -= n;
                }
            });
        }
    });
    let flushed = http(&api, "POST", "/v1/flush");
    let elapsed = t0.elapsed().as_secs_f64();
    assert!(flushed.starts_with("HTTP/1.1 200"), "{flushed}");
    let (cpu1, _, peak_rss) = proc_stats(pid);
    let threads = thread_cpu(pid);
    let status = http(&api, "GET", "/v1/status");
    let total = per_client * clients;
    assert!(
        status.contains(&format!("\"stored\":{total}")),
        "not every record was stored: {status}"
    );
    let _ = child.kill();
    let _ = child.wait();
    let agent_rate = total as f64 / elapsed;

    // The ceiling: the same rows straight into the same schema.
    let bare_path = dir.path().join("bare.db");
    let mut conn = schema::open_writer(&bare_path, false).unwrap();
    let rows: Vec<(i64, u8, String, String, String)> = (0..4096)
        .map(|i| {
            let v: serde_json::Value = serde_json::from_str(&line(0, i)).unwrap();
            (
                1_700_000_000_000_000_000 + i as i64,
                (i % 6) as u8,
                v["target"].as_str().unwrap().to_owned(),
                v["msg"].as_str().unwrap().to_owned(),
                v["fields"].to_string(),
            )
        })
        .collect();
    let t0 = Instant::now();
    let mut done = 0;
    while done < total {
        let tx = conn.transaction().unwrap();
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO records(seq, session, ts_ns, level, module, message, metadata, pid, uid, gid, process) \
                     VALUES (?6, NULL, ?1, ?2, ?3, ?4, ?5, 1, 0, 0, 'bench')",
                )
                .unwrap();
            for k in 0..20_000.min(total - done) {
                let r = &rows[(done + k) % rows.len()];
                let seq = (done + k + 1) as i64;
                stmt.execute(rusqlite::params![r.0, r.1, r.2, r.3, r.4, seq])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
        done += 20_000.min(total - done);
    }
    let bare_rate = total as f64 / t0.elapsed().as_secs_f64();

    let cpu = cpu1 - cpu0;
    println!("records            {total} from {clients} clients, avg {avg_len:.0} bytes/line");
    println!("agent              {agent_rate:.0} records/s committed ({elapsed:.2} s)");
    println!("bare rusqlite      {bare_rate:.0} records/s");
    println!("agent / bare       {:.2}", agent_rate / bare_rate);
    println!(
        "agent CPU          {:.2} s per million records",
        cpu / total as f64 * 1e6
    );
    let threads: Vec<String> = threads
        .iter()
        .map(|(n, s)| format!("{n} {s:.2}s"))
        .collect();
    println!("agent threads      {}", threads.join(", "));
    println!(
        "agent RSS          idle {:.1} MiB, peak {:.1} MiB",
        idle_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
}
