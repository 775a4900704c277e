//! `logbook --hub … logs --follow`: the newest records first, then every
//! record posted afterwards exactly once, across a hub restart, until the
//! session ends.

use std::time::Duration;

use logbook::wire::{Level, SessionStatus};

use super::*;
use crate::hub::{batch, record, session_id, state};
use crate::util::wait_for;

fn printed_seqs(run: &Running) -> Vec<u64> {
    run.lines()
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_prints_new_records_once_across_a_hub_restart() {
    let mut hub = HubProc::start("cli_follow");
    let s = session_id(1);
    let post = |from: u64, to: u64, status: SessionStatus, revision: u64| {
        batch(
            vec![state(s, revision, status, &[])],
            (from..=to)
                .map(|i| record(i, Some(s), Level::Info, "nav", &format!("r{i}")))
                .collect(),
            vec![],
        )
    };
    let (st, body) = hub.post_batch(&post(1, 30, SessionStatus::Active, 1)).await;
    assert_eq!(st, 200, "{body}");

    let sid = s.to_string();
    let run = Running::spawn(
        cli(&hub),
        &[
            "logs",
            "--session",
            &sid,
            "--follow",
            "--json",
            "--limit",
            "5",
        ],
    );
    // The newest five first (the 25 older ones stay out, even though the
    // live stream replays them).
    wait_for("the tail", Duration::from_secs(10), || {
        (printed_seqs(&run).len() >= 5).then_some(())
    });

    // Records posted after it started arrive, each once. The stream is
    // connected once the tail is out; post until the first live one shows.
    let mut next = 31;
    wait_for("a live record", Duration::from_secs(20), || {
        if printed_seqs(&run).len() > 5 {
            return Some(());
        }
        let b = post(next, next, SessionStatus::Active, 1);
        next += 1;
        let rt = tokio::runtime::Handle::current();
        let (st, _) = tokio::task::block_in_place(|| rt.block_on(hub.post_batch(&b)));
        assert_eq!(st, 200);
        std::thread::sleep(Duration::from_millis(100));
        None
    });
    let (st, _) = hub
        .post_batch(&post(next, next + 9, SessionStatus::Active, 1))
        .await;
    assert_eq!(st, 200);
    let last = next + 9;
    wait_for("the live batch", Duration::from_secs(10), || {
        printed_seqs(&run).contains(&last).then_some(())
    });

    // The hub restarts: the CLI reconnects with backoff and goes on.
    hub.restart();
    let mut more = last + 1;
    wait_for(
        "a record after the restart",
        Duration::from_secs(30),
        || {
            if printed_seqs(&run).iter().any(|s| *s > last) {
                return Some(());
            }
            let b = post(more, more, SessionStatus::Active, 1);
            more += 1;
            let rt = tokio::runtime::Handle::current();
            let (st, _) = tokio::task::block_in_place(|| rt.block_on(hub.post_batch(&b)));
            assert_eq!(st, 200);
            std::thread::sleep(Duration::from_millis(200));
            None
        },
    );
    assert!(run.stderr().contains("reconnect"), "{}", run.stderr());

    // The session ends: the stream closes and the CLI exits 0.
    let (st, _) = hub
        .post_batch(&post(more, more, SessionStatus::Completed, 2))
        .await;
    assert_eq!(st, 200);
    let mut run = run;
    let status = wait_for("logbook to exit", Duration::from_secs(10), || {
        run.child.try_wait().unwrap()
    });
    assert!(status.success(), "{}", run.stderr());

    // Printed exactly once each, from seq 26 on, with nothing the hub holds
    // for that range missing.
    let got = printed_seqs(&run);
    let mut sorted = got.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), got.len(), "printed twice: {got:?}");
    assert_eq!(sorted, (26..=more).collect::<Vec<_>>(), "{got:?}");
}
