//! Power cuts of the robot, modelled by copying `agent.db` and its WAL at
//! random instants while the agent writes and syncs (README "After a power
//! cut"; the model and its limits are in TESTING.md). Each copy then runs
//! as the device in a new boot, against the hub that holds everything the
//! agent sent before it was cut: nothing doubles, and new records get seqs
//! the hub takes (none is dropped as a duplicate of a record the copy
//! lost).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use super::faultproxy::schedule_rng;
use super::{hub_get, hub_logs, start_agent, sync_env, wait_synced};
use crate::agent::Agent;
use crate::hub::{HubProc, DEVICE};
use crate::util::TestDir;

/// The files a power cut leaves, as they are at this instant: the WAL's
/// frames up to the last one fully written (a torn last frame fails its
/// checksum and ends recovery there). A read transaction is held across
/// the copy so no checkpoint copies frames newer than it into `agent.db`
/// or restarts the WAL meanwhile: a real cut never sees those (a
/// checkpoint syncs the database before the WAL starts over). `-shm` is
/// not copied: SQLite rebuilds it from the WAL when the first connection
/// opens, as after a reboot.
fn cut(state: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let db = rusqlite::Connection::open_with_flags(
        state.join("agent.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    db.execute_batch("BEGIN").unwrap();
    let _: i64 = db
        .query_row("SELECT count(*) FROM meta", [], |r| r.get(0))
        .unwrap();
    for name in ["agent.db", "agent.db-wal"] {
        let from = state.join(name);
        if from.exists() {
            std::fs::copy(&from, to.join(name)).unwrap();
        }
    }
    db.execute_batch("COMMIT").unwrap();
}

fn meta(state: &Path, key: &str) -> Option<i64> {
    let db = rusqlite::Connection::open_with_flags(
        state.join("agent.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    db.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .ok()
}

/// The agent of generation `g`: on `dir`, in boot `boot-g`.
fn agent_in_boot(dir: &TestDir, env: &[(String, String)], g: usize) -> Agent {
    let boot = dir.join("boot_id");
    std::fs::write(&boot, format!("boot-{g}\n")).unwrap();
    let mut env = env.to_vec();
    env.push((
        "LOGBOOK_PATHS_BOOT_ID_FILE".into(),
        boot.display().to_string(),
    ));
    start_agent(dir, &env)
}

/// Generations of one device: each runs under heavy writes while it
/// syncs, is cut at a random instant (`LOGBOOK_TEST_CYCLES` cuts, 4 by
/// default), and its copy goes on as the next generation after a reboot.
#[test]
fn a_power_cut_copy_opens_doubles_nothing_and_new_seqs_reach_the_hub() {
    let cuts: usize = std::env::var("LOGBOOK_TEST_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let mut rng = schedule_rng();
    let hub = HubProc::start("sync_powercut");
    let mut env = sync_env(&hub.url, &hub.device);
    env.push(("LOGBOOK_SYNC_BATCH_RECORDS".into(), "200".into()));
    // A small WAL bound (2 MiB) and so frequent checkpoints: cuts land
    // before, during and after them.
    env.push(("LOGBOOK_BUFFER_MAX_BYTES".into(), (32u64 << 20).to_string()));
    // Every line that must be at the hub in the end: flushed before the
    // cut of its generation, so in the copy that carries on.
    let mut must: Vec<String> = Vec::new();
    let mut dirs = vec![TestDir::new("sync_powercut_0")];
    let mut agent = agent_in_boot(&dirs[0], &env, 0);
    let (mut lost_unsent, mut not_a_cut, mut ahead) = (0u64, 0usize, 0usize);
    for g in 0..cuts {
        // Records that must survive: committed before the cut.
        let n = rng.random_range(100..600usize);
        let lines: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"level":"info","msg":"g{g} flushed {i}"}}"#))
            .collect();
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        crate::agent::send_lines(&agent, &refs);
        agent.flush();
        must.extend((0..n).map(|i| format!("g{g} flushed {i}")));
        // Heavy writes while it syncs; these may be lost with the cut.
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let logger = {
            let (stop, sent) = (stop.clone(), sent.clone());
            let mut conn = agent.ingest();
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    for _ in 0..20 {
                        let pad = "p".repeat((i % 200) as usize);
                        if writeln!(
                            conn,
                            r#"{{"level":"debug","msg":"g{g} load {i}","pad":"{pad}"}}"#
                        )
                        .is_err()
                        {
                            return;
                        }
                        i += 1;
                    }
                    sent.store(i, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        std::thread::sleep(Duration::from_millis(rng.random_range(20..400)));
        let next = TestDir::new(&format!("sync_powercut_{}", g + 1));
        cut(&agent.state, &next.join("state"));
        // The agent runs on for a while: what it commits and the hub
        // acknowledges now is what a cut takes from an unsynced WAL after
        // the hub has it (the hazard: those seqs are at the hub, not in
        // the copy).
        std::thread::sleep(Duration::from_millis(rng.random_range(0..400)));
        agent.kill9();
        stop.store(true, Ordering::SeqCst);
        logger.join().unwrap();
        // Between the copy and the kill the agent may have reserved the
        // next seq block (synced): a real cut after that commit keeps it
        // (and all before it), so the copy is no state a cut leaves; the
        // state the kill left (a cut that lost nothing) stands in for it.
        let (cut_reserved, last_reserved) = (
            meta(&next.join("state"), "seq_reserved"),
            meta(&agent.state, "seq_reserved"),
        );
        if cut_reserved != last_reserved {
            not_a_cut += 1;
            std::fs::remove_dir_all(next.join("state")).unwrap();
            cut(&agent.state, &next.join("state"));
        }
        // A generation cut early on a busy machine may not have reached
        // the hub at all: then it knows no such device, and holds nothing.
        let known = hub_get(&hub, &hub.api(&format!("/devices/{DEVICE}/logs?limit=1"))).0 == 200;
        let logs = match known {
            true => hub_logs(&hub, &format!("/devices/{DEVICE}/logs")),
            false => Vec::new(),
        };
        let top = logs.last().map_or(0, |r| r["seq"].as_u64().unwrap());
        let copied = meta(&next.join("state"), "next_seq").unwrap_or(1) as u64;
        let loaded = sent.load(Ordering::SeqCst);
        lost_unsent += loaded;
        if top >= copied {
            ahead += 1;
        }
        eprintln!(
            "cut {g}: {n} flushed + {loaded} under load; the hub holds {} up to seq {top}, \
             the copy's counter is at {copied}",
            logs.len()
        );
        dirs.push(next);
        agent = agent_in_boot(&dirs[g + 1], &env, g + 1);
        // It opened, and holds every record flushed before the cut (those
        // of earlier generations may be synced and evicted by now).
        let held: std::collections::HashSet<String> = agent
            .logs("")
            .iter()
            .map(|r| r["message"].as_str().unwrap().to_owned())
            .collect();
        for i in 0..n {
            let m = format!("g{g} flushed {i}");
            assert!(
                held.contains(&m),
                "cut {g}: {m:?} was flushed but is not in the copy"
            );
        }
    }
    // The last generation adds its own and drains.
    let lines: Vec<String> = (0..300)
        .map(|i| format!(r#"{{"level":"info","msg":"last {i}"}}"#))
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    crate::agent::send_lines(&agent, &refs);
    must.extend((0..300).map(|i| format!("last {i}")));
    wait_synced(&agent, Duration::from_secs(120));
    let logs = hub_logs(&hub, &format!("/devices/{DEVICE}/logs"));
    let mut seen = std::collections::HashMap::new();
    for r in &logs {
        *seen
            .entry(r["message"].as_str().unwrap().to_owned())
            .or_insert(0u32) += 1;
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(10).collect();
    assert!(doubled.is_empty(), "records held twice: {doubled:?}");
    let missing: Vec<_> = must.iter().filter(|m| !seen.contains_key(*m)).collect();
    assert!(
        missing.is_empty(),
        "{} flushed records never reached the hub (first {:?}): a new record taken for \
         a duplicate of a lost one?",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let load_at_hub = seen.keys().filter(|m| m.contains(" load ")).count() as u64;
    eprintln!(
        "{cuts} cuts ({not_a_cut} replaced by the state the kill left; in {ahead} the hub held \
         seqs the copy had lost): {} flushed records each at the hub once; {load_at_hub} of \
         {lost_unsent} records under load reached it, the rest went with the cuts",
        must.len()
    );
}
