//! Benchmark of agent → hub sync, with a real `logbookd` and a real
//! `logbook-hub` on this machine:
//!
//! 1. backlog: N records are written into an agent with sync off (the
//!    baseline: local ingest rate, and the bytes of the same records as
//!    JSON lines);
//! 2. drain: the agent restarts with the hub configured and the time until
//!    the hub has acknowledged everything gives records/s, and the bytes on
//!    the wire (compressed bodies, in the coding the status names) compare with the raw JSON lines. The backlog
//!    belongs to one session; as the drain starts, a high mark is made
//!    (`POST /v1/marks`) on the moment the record at `--mark-at` (a share of
//!    the backlog, default 0.75) was written, 0.1 s before and after: mark
//!    to queryable is the time until the hub's query narrowed to that mark
//!    counts every record of its window (as many as it counts once the
//!    drain is over);
//! 3. online: steady logging at R records/s; a sampler asks the hub for the
//!    newest record every 100 ms and takes its age (send time is in the
//!    message) as the socket → hub-query latency; the agent's CPU over the
//!    phase comes from /proc.
//!
//! With `--tls` the hub serves TLS with a certificate of a private CA made
//! for the run (rcgen), the agent trusts that CA (`sync.ca_file`) and the
//! bench's own queries go through TLS too: run it beside a plain run to
//! see what TLS costs the drain (BENCHMARKS.md).
//!
//! ```text
//! cargo build --release --bins --example sync_bench
//! target/release/examples/sync_bench --records 1000000 --rate 2000 --online-secs 20 [--tls]
//! ```

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{arg, cpu_secs, line, Reaped};

fn body_json(resp: &str) -> serde_json::Value {
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

/// The hub as the bench queries it: plain HTTP on a fresh connection per
/// query, or (`--tls`) HTTPS on a kept-alive connection trusting the run's
/// CA.
struct HubQuery {
    addr: String,
    tls: Option<(reqwest::Client, tokio::runtime::Runtime)>,
}

impl HubQuery {
    fn get(&self, path: &str, token: &str) -> serde_json::Value {
        if let Some((client, rt)) = &self.tls {
            let port = self.addr.rsplit(':').next().unwrap();
            let url = format!("https://localhost:{port}{path}");
            return rt.block_on(async {
                let r = client.get(&url).bearer_auth(token).send().await;
                match r {
                    Ok(r) => serde_json::from_str(&r.text().await.unwrap_or_default())
                        .unwrap_or(serde_json::Value::Null),
                    Err(e) => panic!("query {url}: {e}"),
                }
            });
        }
        let mut s = TcpStream::connect(&self.addr).expect("connect hub");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        body_json(&out)
    }
}

/// A private CA and a certificate for `localhost` signed by it, written
/// into `dir`: (CA file, certificate chain, key).
fn private_pki(dir: &Path) -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let (ca_file, chain, key_file) = (dir.join("ca.pem"), dir.join("hub.pem"), dir.join("hub.key"));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&chain, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let s = |p: &Path| p.display().to_string();
    (s(&ca_file), s(&chain), s(&key_file))
}

/// The 1, 5 and 15 minute load averages (the machine may be shared: the
/// figures only mean something next to these).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn token(hub: &Path, data: &Path, args: &[&str]) -> String {
    let out = Command::new(hub)
        .args(["token", "create", "--data-dir"])
        .arg(data)
        .args(["--org", "bench", "--project", "sync"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn start_agent(
    logbookd: &Path,
    state: &Path,
    run: &Path,
    sync: Option<(&str, &str)>,
    ca_file: Option<&str>,
) -> Reaped {
    let mut cmd = common::logbookd(logbookd, state, run, "2GiB");
    cmd.env(
        "LOGBOOK_LOG_LEVEL",
        std::env::var("BENCH_AGENT_LOG").unwrap_or("warn".into()),
    );
    if let Some((url, token)) = sync {
        cmd.env("LOGBOOK_SYNC_HUB", url)
            .env("LOGBOOK_SYNC_TOKEN", token);
    }
    if let Some(ca) = ca_file {
        cmd.env("LOGBOOK_SYNC_CA_FILE", ca);
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", logbookd.display()));
    let child = Reaped(child);
    common::wait_for_api(run, Duration::from_secs(60));
    child
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

fn main() {
    let records: u64 = arg("--records", "1000000").parse().unwrap();
    let rate: u64 = arg("--rate", "2000").parse().unwrap();
    let online_secs: u64 = arg("--online-secs", "20").parse().unwrap();
    let mark_at: f64 = arg("--mark-at", "0.75").parse().unwrap();
    let tls = std::env::args().any(|a| a == "--tls");
    let load_before = loadavg();
    let bin_dir = common::bin_dir();
    let logbookd = bin_dir.join("logbookd");
    let hub_bin = bin_dir.join("logbook-hub");
    let dir = tempfile::tempdir().unwrap();
    let (state, run, data) = (
        dir.path().join("state"),
        dir.path().join("run"),
        dir.path().join("hub"),
    );
    let api = run.join("api.sock");

    let operator = token(&hub_bin, &data, &["--operator"]);
    let device = token(&hub_bin, &data, &["--device", "bench"]);
    let pki = tls.then(|| private_pki(&dir.path().join("pki")));
    let mut hub = Command::new(&hub_bin);
    hub.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("LOGBOOK_LOG", "warn")
        .stdout(Stdio::null());
    if let Some((_, chain, key)) = &pki {
        hub.env("LOGBOOK_SERVER_TLS_CERT", chain)
            .env("LOGBOOK_SERVER_TLS_KEY", key);
    }
    let hub = Reaped(hub.spawn().unwrap());
    let addr_file = data.join("hub.addr");
    let start = Instant::now();
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
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
    let (url, query) = match &pki {
        None => (
            format!("http://{addr}"),
            HubQuery {
                addr: addr.clone(),
                tls: None,
            },
        ),
        Some((ca, _, _)) => {
            let port = addr.rsplit(':').next().unwrap();
            let client = reqwest::Client::builder()
                .add_root_certificate(
                    reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap(),
                )
                .build()
                .unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            (
                format!("https://localhost:{port}"),
                HubQuery {
                    addr: addr.clone(),
                    tls: Some((client, rt)),
                },
            )
        }
    };
    let ca_file = pki.as_ref().map(|(ca, _, _)| ca.as_str());

    let agent_api = logbook::client::Api::new()
        .socket(&api)
        .timeout(Duration::from_secs(600));

    // 1. The backlog, written with sync off, in one session.
    let mut agent = start_agent(&logbookd, &state, &run, None, None);
    let session: serde_json::Value = agent_api
        .json("POST", "/v1/sessions", Some(br#"{"tags":["bench"]}"#))
        .expect("open a session");
    let session = session["id"].as_str().unwrap().to_owned();
    let t0 = Instant::now();
    let mut json_bytes = 0u64;
    let mark_line = ((records as f64 * mark_at) as u64).clamp(1, records);
    let mut mark_ns = 0;
    {
        let mut sock = UnixStream::connect(run.join("ingest.sock")).unwrap();
        let mut buf = Vec::with_capacity(1 << 20);
        for i in 1..=records {
            if i == mark_line {
                mark_ns = now_ns();
            }
            buf.extend_from_slice(line(i).as_bytes());
            buf.push(b'\n');
            if buf.len() >= 1 << 20 {
                json_bytes += buf.len() as u64;
                sock.write_all(&buf).unwrap();
                buf.clear();
            }
        }
        json_bytes += buf.len() as u64;
        sock.write_all(&buf).unwrap();
    }
    let _: serde_json::Value = agent_api.json("POST", "/v1/flush", None).expect("flush");
    let ingest_secs = t0.elapsed().as_secs_f64();
    stop(&mut agent);

    // 2. The drain.
    let mut agent = start_agent(&logbookd, &state, &run, Some((&url, &device)), ca_file);
    let pid = agent.id();
    let t0 = Instant::now();
    let cpu0 = cpu_secs(pid);
    let hub_cpu0 = cpu_secs(hub.id());
    let mark = format!(
        r#"{{"name":"collision","timestamp":"{}","before":0.1,"after":0.1,"priority":"high"}}"#,
        time::OffsetDateTime::from_unix_timestamp_nanos(mark_ns as i128)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    );
    let _: serde_json::Value = agent_api
        .json("POST", "/v1/marks", Some(mark.as_bytes()))
        .expect("mark");
    let marked_at = Instant::now();
    // The window's records as the agent counts them (its local query).
    let mut expected = 0u64;
    let mut after = 0u64;
    loop {
        let page: serde_json::Value = agent_api
            .json(
                "GET",
                &format!("/v1/logs?mark=collision&order=asc&limit=1000&after={after}"),
                None,
            )
            .expect("the agent's logs of the mark");
        let items = page["items"].as_array().cloned().unwrap_or_default();
        expected += items.len() as u64;
        match items.last() {
            Some(last) if items.len() == 1000 => after = last["seq"].as_u64().unwrap(),
            _ => break,
        }
    }
    let in_window = || {
        query.get(
            &format!(
                "/api/v1/organizations/bench/projects/sync/sessions/{session}/logs?mark=collision&limit=1"
            ),
            &operator,
        )["total"]
            .as_u64()
            .unwrap_or(0)
    };
    // (seconds after the mark, records of its window at the hub)
    let mut window_seen: Vec<(f64, u64)> = Vec::new();
    let status = loop {
        let since = marked_at.elapsed().as_secs_f64();
        // Asked until it is all there (each ask is a count at the hub).
        let done = window_seen.last().is_some_and(|(_, n)| *n >= expected);
        if !done && window_seen.last().is_none_or(|(t, _)| since - t >= 0.1) {
            window_seen.push((since, in_window()));
        }
        let s: serde_json::Value = agent_api.json("GET", "/v1/status", None).expect("status");
        if s["sync"]["backlog_records"] == 0 && s["records"]["synced"].as_u64() >= Some(records) {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "drain did not finish: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let drain_secs = t0.elapsed().as_secs_f64();
    let drain_cpu = cpu_secs(pid) - cpu0;
    let hub_drain_cpu = cpu_secs(hub.id()) - hub_cpu0;
    let newest = query.get(
        &format!(
            "/api/v1/organizations/bench/projects/sync/sessions/{session}/logs?order=desc&limit=1"
        ),
        &operator,
    );
    let q0 = Instant::now();
    let window = in_window();
    let query_ms = q0.elapsed().as_secs_f64() * 1e3;
    assert_eq!(
        window, expected,
        "the hub's window differs from the agent's"
    );
    let queryable = window_seen
        .iter()
        .find(|(_, n)| *n == window)
        .map(|(t, _)| *t);
    assert_eq!(
        newest["items"][0]["seq"].as_u64(),
        Some(records),
        "the hub lacks the newest record: {newest}"
    );
    let wire = status["sync"]["bytes_sent"].as_u64().unwrap();
    let coding = status["sync"]["content_encoding"]
        .as_str()
        .unwrap_or("?")
        .to_owned();

    // 3. Online: steady logging and the age of the newest record at the hub.
    let stop_flag = Arc::new(AtomicBool::new(false));
    let logger = {
        let stop_flag = stop_flag.clone();
        let ingest = run.join("ingest.sock");
        std::thread::spawn(move || {
            let mut sock = UnixStream::connect(ingest).unwrap();
            let per_tick = (rate / 100).max(1);
            let mut next = Instant::now();
            let mut i = 0u64;
            while !stop_flag.load(Ordering::SeqCst) {
                let mut buf = String::new();
                for _ in 0..per_tick {
                    i += 1;
                    buf.push_str(&format!(
                        r#"{{"level":"info","target":"nav::planner","msg":"online {i} sent_ns={}","fields":{{"i":{i}}}}}"#,
                        now_ns()
                    ));
                    buf.push('\n');
                }
                sock.write_all(buf.as_bytes()).unwrap();
                next += Duration::from_millis(10);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let cpu0 = cpu_secs(pid);
    let t0 = Instant::now();
    let mut ages = Vec::new();
    while t0.elapsed() < Duration::from_secs(online_secs) {
        let v = query.get(
            &format!("/api/v1/organizations/bench/projects/sync/sessions/{session}/logs?order=desc&limit=1"),
            &operator,
        );
        if let Some(sent) = v["items"][0]["message"]
            .as_str()
            .and_then(|m| m.split("sent_ns=").nth(1))
            .and_then(|n| n.parse::<u128>().ok())
        {
            ages.push((now_ns().saturating_sub(sent)) as f64 / 1e9);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let online_cpu = (cpu_secs(pid) - cpu0) / t0.elapsed().as_secs_f64();
    stop_flag.store(true, Ordering::SeqCst);
    logger.join().unwrap();
    stop(&mut agent);
    drop(hub);
    ages.sort_by(f64::total_cmp);
    let pct = |p: f64| ages[((ages.len() - 1) as f64 * p) as usize];

    let ingest_rate = records as f64 / ingest_secs;
    let drain_rate = records as f64 / drain_secs;
    println!(
        "link                {}",
        if tls {
            "TLS (rustls, private CA)"
        } else {
            "plain HTTP"
        }
    );
    println!(
        "records             {records}, {:.0} bytes/line as JSON",
        json_bytes as f64 / records as f64
    );
    println!("baseline ingest     {ingest_rate:.0} records/s into the agent (sync off)");
    println!("drain to hub        {drain_rate:.0} records/s ({drain_secs:.2} s), CPU agent {drain_cpu:.2} s, hub {hub_drain_cpu:.2} s");
    println!("drain / ingest      {:.2}", drain_rate / ingest_rate);
    match queryable {
        Some(t) => println!(
            "mark to queryable   {t:.2} s ({window} records in its window, at record {mark_line}: in seq order about {:.2} s; asked every 0.1 s or {query_ms:.0} ms, what one ask takes)",
            drain_secs * mark_line as f64 / records as f64
        ),
        None => println!("mark to queryable   not seen ({window} records in its window)"),
    }
    let per_million = 1e6 / records as f64;
    println!(
        "drain CPU per 1M    agent {:.2} s, hub {:.2} s",
        drain_cpu * per_million,
        hub_drain_cpu * per_million
    );
    println!(
        "wire bytes          {wire} {coding} vs {json_bytes} JSON lines: 1/{:.1}",
        json_bytes as f64 / wire as f64
    );
    println!(
        "online {rate}/s       latency median {:.3} s, p90 {:.3} s, max {:.3} s ({} samples)",
        pct(0.5),
        pct(0.9),
        pct(1.0),
        ages.len()
    );
    println!("online agent CPU    {:.1}% of one core", online_cpu * 100.0);
    println!(
        "load average        {load_before} before, {} after ({} CPUs)",
        loadavg(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}
