//! Sync under abuse: a randomized schedule of network faults between agent
//! and hub under continuous logging, and repeated kill -9 of the agent, or
//! of the hub, in the middle of uploading. Afterwards the hub holds every
//! record exactly once.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use super::faultproxy::{schedule_rng, Fault, FaultProxy};
use super::{assert_exact_seqs, hub_get, hub_logs, start_agent, sync_env, wait_synced};
use crate::hub::{HubProc, DEVICE};
use crate::util::{wait_for, TestDir};

#[test]
fn every_record_arrives_once_through_a_faulty_network() {
    let mut rng = schedule_rng();
    let hub = HubProc::start("sync_chaos");
    let proxy = FaultProxy::start(hub.addr.parse().unwrap());
    let dir = TestDir::new("sync_chaos");
    let mut env = sync_env(&proxy.url(), &hub.device);
    // Small batches: many requests, so many of them meet a fault.
    env.push(("LOGBOOK_SYNC_BATCH_RECORDS".into(), "150".into()));
    let agent = start_agent(&dir, &env);

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let logger = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let mut conn = agent.ingest();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                for _ in 0..20 {
                    i += 1;
                    writeln!(conn, r#"{{"level":"info","msg":"chaos {i}"}}"#).unwrap();
                }
                sent.store(i, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // The schedule itself is time: each fault holds for a random while.
    for _ in 0..24 {
        let f = Fault::random(&mut rng, 100..4_100, 20..170);
        let hold = Duration::from_millis(rng.random_range(100..500));
        eprintln!("fault {f:?} for {hold:?}");
        let pass = f == Fault::Pass;
        proxy.set(f);
        if !pass {
            // Pooled keep-alive connections would dodge the new fault.
            proxy.cut();
        }
        std::thread::sleep(hold);
    }
    proxy.set(Fault::Pass);
    stop.store(true, Ordering::SeqCst);
    logger.join().unwrap();
    let total = sent.load(Ordering::SeqCst);
    wait_synced(&agent, Duration::from_secs(60));
    let logs = hub_logs(&hub, &format!("/devices/{DEVICE}/logs"));
    assert_exact_seqs(&logs, 1..=total);
    for (i, r) in logs.iter().enumerate() {
        assert_eq!(r["message"], format!("chaos {}", i + 1));
    }
    let (accepted, faulted) = proxy.counts();
    eprintln!("{total} records; proxy saw {accepted} connections, faulted {faulted}");
    assert!(faulted > 0);
    let st = agent.status()["sync"].clone();
    assert_eq!(st["set_aside_batches"], 0, "{st}");
    assert_eq!(st["link"], "online", "{st}");
}

#[test]
fn kill_9_mid_upload_loses_and_duplicates_nothing() {
    let hub = HubProc::start("sync_kill9");
    let dir = TestDir::new("sync_kill9");
    let mut env = sync_env(&hub.url, &hub.device);
    // Slow uploads, so each kill lands while batches are in flight.
    env.push(("LOGBOOK_SYNC_BATCH_RECORDS".into(), "50".into()));
    env.push(("LOGBOOK_SYNC_MAX_BYTES_PER_SEC".into(), "4000".into()));
    let mut total = 0u64;
    for round in 0..3 {
        let mut agent = start_agent(&dir, &env);
        let lines: Vec<String> = (total + 1..=total + 1500)
            .map(|i| {
                format!(
                    r#"{{"level":"info","msg":"kill {i}","pad":"{}"}}"#,
                    "p".repeat(40)
                )
            })
            .collect();
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        crate::agent::send_lines(&agent, &refs);
        total += 1500;
        assert_eq!(agent.flush(), total);
        // Kill once the hub has some of this round's records, not all.
        let before = total - 1500;
        wait_for("uploads under way", Duration::from_secs(30), || {
            // The hub knows the device from its first batch on: until
            // then its logs are a 404, not an empty list.
            let first = hub_get(&hub, &hub.api(&format!("/devices/{DEVICE}/logs?limit=1")));
            if first.0 == 404 {
                return None;
            }
            let n = hub_logs(&hub, &format!("/devices/{DEVICE}/logs")).len() as u64;
            (n > before + 50).then_some(())
        });
        agent.kill9();
        let at_hub = hub_logs(&hub, &format!("/devices/{DEVICE}/logs")).len() as u64;
        eprintln!("round {round}: killed with {at_hub} of {total} at the hub");
    }
    env.retain(|(k, _)| k != "LOGBOOK_SYNC_MAX_BYTES_PER_SEC");
    let agent = start_agent(&dir, &env);
    wait_synced(&agent, Duration::from_secs(60));
    let logs = hub_logs(&hub, &format!("/devices/{DEVICE}/logs"));
    assert_exact_seqs(&logs, 1..=total);
    for (i, r) in logs.iter().enumerate() {
        assert_eq!(r["message"], format!("kill {}", i + 1));
    }
    let st = agent.status();
    assert!(st["gaps"].as_array().unwrap().is_empty(), "{st}");
}

/// Kill -9 of the agent at random points while it uploads, `cycles` times
/// (a short form here; `LOGBOOK_TEST_CYCLES=200` runs the full one):
/// everything flushed before each kill reaches the hub exactly once.
#[test]
fn crash_loop_of_the_agent_loses_and_doubles_nothing() {
    let cycles: u64 = std::env::var("LOGBOOK_TEST_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut rng = schedule_rng();
    let hub = HubProc::start("sync_crash_loop");
    let dir = TestDir::new("sync_crash_loop");
    let mut env = sync_env(&hub.url, &hub.device);
    env.push(("LOGBOOK_SYNC_BATCH_RECORDS".into(), "64".into()));
    let mut total = 0u64;
    for _ in 0..cycles {
        let mut agent = start_agent(&dir, &env);
        let n = rng.random_range(50..400u64);
        let lines: Vec<String> = (total + 1..=total + n)
            .map(|i| format!(r#"{{"level":"info","msg":"loop {i}"}}"#))
            .collect();
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        crate::agent::send_lines(&agent, &refs);
        total += n;
        assert_eq!(agent.flush(), total);
        // The fault: a kill at a random point of the upload, not a wait.
        std::thread::sleep(Duration::from_millis(rng.random_range(0..150)));
        agent.kill9();
    }
    let agent = start_agent(&dir, &env);
    wait_synced(&agent, Duration::from_secs(120));
    let logs = hub_logs(&hub, &format!("/devices/{DEVICE}/logs"));
    assert_exact_seqs(&logs, 1..=total);
    for (i, r) in logs.iter().enumerate() {
        assert_eq!(r["message"], format!("loop {}", i + 1));
    }
    eprintln!("{cycles} kill -9 cycles: {total} records, each at the hub once");
}

/// Kill -9 and restart of the hub at random points while a real agent
/// logs and uploads, `cycles` times (20 here; `LOGBOOK_TEST_CYCLES=200`
/// the full run), on the suite's storage (`LOGBOOK_TEST_HUB_STORAGE`):
/// every record the agent committed is at the hub exactly once.
#[test]
fn crash_loop_of_the_hub_loses_and_doubles_nothing() {
    let cycles: u64 = std::env::var("LOGBOOK_TEST_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut rng = schedule_rng();
    let mut hub = HubProc::start("sync_hub_crash_loop");
    let dir = TestDir::new("sync_hub_crash_loop");
    let mut env = sync_env(&hub.url, &hub.device);
    env.push(("LOGBOOK_SYNC_BATCH_RECORDS".into(), "64".into()));
    let agent = start_agent(&dir, &env);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let logger = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let mut conn = agent.ingest();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                for _ in 0..20 {
                    i += 1;
                    writeln!(conn, r#"{{"level":"info","msg":"hub loop {i}"}}"#).unwrap();
                }
                sent.store(i, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    for _ in 0..cycles {
        // The fault: a kill at a random point of the uploads.
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        hub.restart();
    }
    stop.store(true, Ordering::SeqCst);
    logger.join().unwrap();
    let total = sent.load(Ordering::SeqCst);
    wait_synced(&agent, Duration::from_secs(120));
    let logs = hub_logs(&hub, &format!("/devices/{DEVICE}/logs"));
    assert_exact_seqs(&logs, 1..=total);
    for (i, r) in logs.iter().enumerate() {
        assert_eq!(r["message"], format!("hub loop {}", i + 1));
    }
    let st = agent.status()["sync"].clone();
    assert_eq!(st["set_aside_batches"], 0, "{st}");
    eprintln!("{cycles} kill -9 cycles of the hub: {total} records, each at the hub once");
}
