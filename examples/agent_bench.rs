//! Benchmark of the agent's ingest path: N clients stream realistic robot
//! log records into a running `logbookd` until `/v1/flush` says they are
//! committed; the same records then go through a bare rusqlite insert loop
//! into the same schema, the ceiling of this design.
//!
//! `--protocol` picks how the clients send (the same record content each
//! time): `json` (JSON lines on `ingest.sock`, the default), `syslog` (RFC
//! 5424 datagrams on `syslog.sock`, fields as structured data), `forward`
//! (Fluent Forward Message mode on `forward.sock`, one record per message
//! as fluent-logger sends), `packed` (PackedForward, 512 records per
//! message as Fluent Bit sends), a comma list of those, or `all`: each on
//! a fresh agent in the same run, with its ratio to JSON lines.
//!
//! ```text
//! cargo build --release --bins --example agent_bench
//! target/release/examples/agent_bench --clients 4 --records 1000000
//! target/release/examples/agent_bench --protocol all --records 400000 --rounds 3
//! ```
//!
//! `--buffer-max` (default `1GiB`) bounds the agent's buffer: a bound
//! smaller than the records measures ingest into a full buffer, evicting
//! as it goes (the bare baseline keeps everything).
//!
//! With syslog among the protocols, each round also measures the bare
//! datagram rate: the same datagrams from the same clients, received and
//! discarded, the kernel's own ceiling for `syslog.sock`.

mod common;

use std::io::Write;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{arg, proc_stats, thread_cpu, LEVELS, MODULES};
use logbook::agent::store::schema;

/// One line of 150–300 bytes, varying with `i`: the shared level and
/// module mix, padded and tagged with its client (its own shape, not
/// `common::line`, so the figures in BENCHMARKS.md stay comparable).
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

/// Records per PackedForward message.
const PACKED: usize = 512;

/// One unit a client sends (a line, a datagram, a Forward message) and how
/// many records it holds.
struct Unit {
    bytes: Vec<u8>,
    records: usize,
}

/// `line(client, i)` re-encoded for `protocol`, in units.
fn units(protocol: &str, client: usize) -> Vec<Unit> {
    let values: Vec<serde_json::Value> = (0..4096)
        .map(|i| serde_json::from_str(&line(client, i)).unwrap())
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    match protocol {
        "json" => (0..4096)
            .map(|i| Unit {
                bytes: format!("{}\n", line(client, i)).into_bytes(),
                records: 1,
            })
            .collect(),
        "syslog" => values
            .iter()
            .map(|v| {
                let sev = match v["level"].as_str().unwrap() {
                    "error" => 3,
                    "warn" => 4,
                    "info" => 6,
                    _ => 7,
                };
                let f = &v["fields"];
                Unit {
                    bytes: format!(
                        "<{}>1 2026-11-26T01:02:03.123456Z robot1 {} 4242 - [f client=\"{}\" seq=\"{}\" temp_c=\"{}\"] {}",
                        16 * 8 + sev,
                        v["target"].as_str().unwrap(),
                        f["client"],
                        f["seq"],
                        f["temp_c"],
                        v["msg"].as_str().unwrap()
                    )
                    .into_bytes(),
                    records: 1,
                }
            })
            .collect(),
        "forward" => values
            .iter()
            .map(|v| Unit {
                bytes: rmp_serde::to_vec(&("robot", now, v)).unwrap(),
                records: 1,
            })
            .collect(),
        "packed" => values
            .chunks(PACKED)
            .map(|chunk| {
                let mut entries = Vec::new();
                for v in chunk {
                    entries.extend(rmp_serde::to_vec(&(now, v)).unwrap());
                }
                let mut bytes = Vec::new();
                rmp::encode::write_array_len(&mut bytes, 2).unwrap();
                rmp::encode::write_str(&mut bytes, "robot").unwrap();
                rmp::encode::write_bin(&mut bytes, &entries).unwrap();
                Unit {
                    bytes,
                    records: chunk.len(),
                }
            })
            .collect(),
        other => panic!("unknown --protocol {other} (json, syslog, forward, packed, all)"),
    }
}

/// What one run of the agent measured.
struct Run {
    protocol: String,
    total: usize,
    stored: usize,
    refused: u64,
    rate: f64,
    elapsed: f64,
    cpu: f64,
    threads: Vec<(String, f64)>,
    idle_rss: u64,
    peak_rss: u64,
    avg_len: f64,
}

/// Marks made before a `+marks` run.
const ACTIVE_MARKS: usize = 1000;

/// Starts a fresh agent, sends `records` records over `clients`
/// connections in `protocol`, waits for the flush.
fn run_agent(logbookd: &Path, name: &str, clients: usize, records: usize) -> Run {
    // `json+marks`: the same run with ACTIVE_MARKS marks pinning windows
    // first (issue 14: ingest with marks against without).
    let (protocol, marks) = match name.strip_suffix("+marks") {
        Some(p) => (p, ACTIVE_MARKS),
        None => (name, 0),
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let run = dir.path().join("run");
    let api = run.join("api.sock");

    let child = common::logbookd(logbookd, &state, &run, &arg("--buffer-max", "1GiB"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", logbookd.display()));
    let child = common::Reaped(child);
    common::wait_for_api(&run, Duration::from_secs(20));
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(500));
    let marker = logbook::client::Api::new().socket(&api);
    for i in 0..marks {
        let body = format!(r#"{{"name":"bench-{i}","before":"30s","after":"10s"}}"#);
        let _: serde_json::Value = marker
            .json("POST", "/v1/marks", Some(body.as_bytes()))
            .expect("mark");
    }
    let (cpu0, idle_rss, _) = proc_stats(pid);

    // Each client sends a precomputed ring of distinct records, so the
    // clients' own formatting does not compete for the cores.
    let rings: Vec<Vec<Unit>> = (0..clients).map(|c| units(protocol, c)).collect();
    let per_unit = rings[0][0].records;
    let per_client = records / clients / per_unit * per_unit;
    let avg_len = rings[0].iter().map(|u| u.bytes.len()).sum::<usize>() as f64
        / rings[0].iter().map(|u| u.records).sum::<usize>() as f64;
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for ring in &rings {
            let run = &run;
            s.spawn(move || {
                let mut left = per_client;
                let mut units = ring.iter().cycle();
                if protocol == "syslog" {
                    let sock = UnixDatagram::unbound().unwrap();
                    sock.connect(run.join("syslog.sock")).unwrap();
                    while left > 0 {
                        let u = units.next().unwrap();
                        sock.send(&u.bytes).unwrap();
                        left -= u.records;
                    }
                    return;
                }
                let path = if protocol == "json" {
                    run.join("ingest.sock")
                } else {
                    run.join("forward.sock")
                };
                let mut sock = UnixStream::connect(path).unwrap();
                let mut buf = Vec::with_capacity(128 << 10);
                while left > 0 {
                    let u = units.next().unwrap();
                    buf.extend_from_slice(&u.bytes);
                    left -= u.records;
                    if buf.len() >= 64 << 10 || left == 0 {
                        sock.write_all(&buf).unwrap();
                        buf.clear();
                    }
                }
            });
        }
    });
    let agent_api = logbook::client::Api::new()
        .socket(&api)
        .timeout(Duration::from_secs(600));
    let _: serde_json::Value = agent_api.json("POST", "/v1/flush", None).expect("flush");
    let elapsed = t0.elapsed().as_secs_f64();
    let (cpu1, _, peak_rss) = proc_stats(pid);
    let threads = thread_cpu(pid);
    let v: serde_json::Value = agent_api.json("GET", "/v1/status", None).expect("status");
    let stored = v["records"]["stored"].as_u64().unwrap() as usize;
    let refused = v["ingest"]["refused"].as_u64().unwrap();
    let total = per_client * clients;
    // Records a full buffer evicted (`--buffer-max`) were taken in and then
    // let go, each counted as a gap.
    let evicted = v["records"]["evicted_unsynced"].as_u64().unwrap_or(0) as usize;
    if protocol != "syslog" {
        // Stream senders are slowed, never dropped.
        assert_eq!(stored + evicted, total, "not every record was stored: {v}");
    }
    let stored = stored + evicted;
    drop(child);
    Run {
        protocol: name.to_owned(),
        total,
        stored,
        refused,
        rate: stored as f64 / elapsed,
        elapsed,
        cpu: cpu1 - cpu0,
        threads,
        idle_rss,
        peak_rss,
        avg_len,
    }
}

fn main() {
    let clients: usize = arg("--clients", "4").parse().unwrap();
    let records: usize = arg("--records", "1000000").parse().unwrap();
    let protocol = arg("--protocol", "json");
    let logbookd = PathBuf::from(arg(
        "--logbookd",
        &common::bin_dir().join("logbookd").display().to_string(),
    ));
    let protocols: Vec<&str> = if protocol == "all" {
        vec!["json", "syslog", "forward", "packed"]
    } else {
        protocol.split(',').collect()
    };
    // Rounds run the protocols interleaved, so a change in the machine's
    // load hits every protocol of a round alike; ratios are per round.
    // Each round starts one protocol later, so none is always first, and a
    // discarded warm-up run comes before them all: the first run of an
    // invocation is 10-20 % faster than the rest (a fresh page cache).
    let rounds: usize = arg("--rounds", "1").parse::<usize>().unwrap().max(1);
    let warmup: usize = arg("--warmup", "1").parse().unwrap();
    for _ in 0..warmup {
        run_agent(&logbookd, protocols[0], clients, records);
    }
    let mut runs: Vec<Run> = Vec::new();
    let mut datagrams: Vec<f64> = Vec::new();
    for round in 0..rounds {
        for k in 0..protocols.len() {
            let p = protocols[(round + k) % protocols.len()];
            runs.push(run_agent(&logbookd, p, clients, records));
        }
        if protocols.contains(&"syslog") {
            datagrams.push(bare_datagrams(clients, records));
        }
    }
    let total = runs[0].total;
    let dir = tempfile::tempdir().unwrap();
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

    for r in &runs {
        println!("--- {} ({} clients)", r.protocol, clients);
        println!(
            "records            {} sent, {} stored, {} refused, avg {:.0} bytes/record",
            r.total, r.stored, r.refused, r.avg_len
        );
        println!(
            "agent              {:.0} records/s committed ({:.2} s)",
            r.rate, r.elapsed
        );
        println!("agent / bare       {:.2}", r.rate / bare_rate);
        println!(
            "agent CPU          {:.2} s per million records",
            r.cpu / r.stored.max(1) as f64 * 1e6
        );
        let threads: Vec<String> = r
            .threads
            .iter()
            .map(|(n, s)| format!("{n} {s:.2}s"))
            .collect();
        println!("agent threads      {}", threads.join(", "));
        println!(
            "agent RSS          idle {:.1} MiB, peak {:.1} MiB",
            r.idle_rss as f64 / 1024.0,
            r.peak_rss as f64 / 1024.0
        );
    }
    println!("bare rusqlite      {bare_rate:.0} records/s");
    let rate = |round: &[Run], name: &str| round.iter().find(|r| r.protocol == name).unwrap().rate;
    let rounds: Vec<&[Run]> = runs.chunks(protocols.len()).collect();
    if !datagrams.is_empty() {
        println!(
            "bare datagrams     {} datagrams/s (the same datagrams, received and discarded: the kernel's ceiling for syslog.sock)",
            each(&datagrams, 0)
        );
        let of: Vec<f64> = rounds
            .iter()
            .zip(&datagrams)
            .map(|(r, d)| rate(r, "syslog") / d)
            .collect();
        report("syslog / datagrams", &of, "of the bare datagrams/s");
        if protocols.contains(&"json") {
            let of: Vec<f64> = rounds
                .iter()
                .zip(&datagrams)
                .map(|(r, d)| d / rate(r, "json"))
                .collect();
            report("datagrams / json", &of, "of JSON lines' records/s");
        }
    }
    if !protocols.contains(&"json") {
        return;
    }
    for p in protocols.iter().filter(|p| **p != "json") {
        // The ratio of each round, against that round's JSON-lines run.
        let ratios: Vec<f64> = rounds
            .iter()
            .map(|r| rate(r, p) / rate(r, "json"))
            .collect();
        report(&format!("{p} / json"), &ratios, "of JSON lines' records/s");
    }
}

/// `values` with `decimals`, comma-separated.
fn each(values: &[f64], decimals: usize) -> String {
    let each: Vec<String> = values.iter().map(|v| format!("{v:.decimals$}")).collect();
    each.join(", ")
}

/// Prints the median of per-round `ratios` (and each, when more than one).
fn report(name: &str, ratios: &[f64], what: &str) {
    let mut sorted = ratios.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = (sorted[(n - 1) / 2] + sorted[n / 2]) / 2.0;
    if n == 1 {
        println!("{name:<18} {median:.2} {what}");
    } else {
        println!(
            "{name:<18} {median:.2} {what} (median of rounds: {})",
            each(ratios, 2)
        );
    }
}

/// The ceiling of syslog ingest on this machine: the bench's syslog
/// clients send the same datagrams to a socket set up as `syslog.sock` is
/// (`SO_PASSCRED`, the same receive buffer), read by one thread with the
/// agent's own `recvmmsg` batch, and discarded. Datagrams/s.
fn bare_datagrams(clients: usize, records: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("syslog.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    rustix::net::sockopt::set_socket_passcred(&socket, true).unwrap();
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&socket, 4 << 20);
    let rings: Vec<Vec<Unit>> = (0..clients).map(|c| units("syslog", c)).collect();
    let per_client = records / clients;
    let total = per_client * clients;
    // The agent's own receive: 32 datagrams per call at most, with
    // credentials, as `syslog.sock`'s listener takes them.
    let mut batch = logbook::agent::ingest::mmsg::Batch::new(32, 8192);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for ring in &rings {
            let path = &path;
            s.spawn(move || {
                let sock = UnixDatagram::unbound().unwrap();
                sock.connect(path).unwrap();
                for u in ring.iter().cycle().take(per_client) {
                    sock.send(&u.bytes).unwrap();
                }
            });
        }
        let mut got = 0;
        while got < total {
            got += batch.recv(&socket, true).expect("recvmmsg");
        }
    });
    total as f64 / t0.elapsed().as_secs_f64()
}
