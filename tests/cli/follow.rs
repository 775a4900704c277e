//! `logbook --hub … logs --follow`: the newest records first, then every
//! record posted afterwards exactly once, across a hub restart or a cut
//! link (however much arrived meanwhile), until the session ends.

use std::time::Duration;

use logbook::wire::{Batch, Level, SessionStatus};

use super::*;
use crate::hub::{batch, record, session_id, state};
use crate::sync::faultproxy::{Fault, FaultProxy};
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

    let session = s.to_string();
    let run = Running::spawn(
        cli(&hub),
        &[
            "logs",
            "--session",
            &session,
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
    let status = run.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{}", run.stderr());

    // Printed exactly once each, from seq 26 on, with nothing the hub holds
    // for that range missing.
    each_once(&printed_seqs(&run), 26..=more);
}

/// Asserts `got` holds every seq of `want` exactly once (in any order).
fn each_once(got: &[u64], want: std::ops::RangeInclusive<u64>) {
    let mut sorted = got.to_vec();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), got.len(), "printed twice: {got:?}");
    assert_eq!(sorted, want.collect::<Vec<_>>(), "{got:?}");
}

/// Once `run` printed its first `printed` records (read by pages, before
/// it follows), posts one record at a time (from `*next` on) until it
/// printed more: those came over the live stream, which is then connected
/// and has a resume point. (Posting before the pages were read would let a
/// page, under load, show a record the stream has not covered yet.)
async fn until_live(
    hub: &HubProc,
    run: &Running,
    post: impl Fn(u64) -> Batch,
    next: &mut u64,
    printed: usize,
) {
    wait_for("the records read by pages", Duration::from_secs(20), || {
        (printed_seqs(run).len() >= printed).then_some(())
    });
    loop {
        if printed_seqs(run).len() > printed {
            return;
        }
        let (st, _) = hub.post_batch(&post(*next)).await;
        assert_eq!(st, 200);
        *next += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(*next < 200, "no live record printed: {}", run.stderr());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_misses_nothing_that_arrived_while_the_link_was_cut() {
    let hub = HubProc::start("cli_follow_cut");
    let proxy = FaultProxy::start(hub.addr.parse().unwrap());
    let s = session_id(2);
    let post = |seqs: std::ops::RangeInclusive<u64>, level: Level, status: SessionStatus| {
        let revision = if status == SessionStatus::Active {
            1
        } else {
            2
        };
        batch(
            vec![state(s, revision, status, &[])],
            seqs.map(|i| record(i, Some(s), level, "nav", &format!("r{i}")))
                .collect(),
            vec![],
        )
    };
    let (st, body) = hub
        .post_batch(&post(1..=5, Level::Info, SessionStatus::Active))
        .await;
    assert_eq!(st, 200, "{body}");

    let session = s.to_string();
    let mut cmd = cli(&hub);
    cmd.env("LOGBOOK_HUB_URL", proxy.url());
    let run = Running::spawn(cmd, &["logs", "--session", &session, "--follow", "--json"]);
    let mut next = 6;
    let one = |i: u64| post(i..=i, Level::Info, SessionStatus::Active);
    until_live(&hub, &run, one, &mut next, 5).await;

    // The link goes down; meanwhile the hub takes 2,000 more records (twice
    // what a stream replays as its tail): errors first, out of seq order,
    // as an agent sends them after an outage, then the rest.
    proxy.set(Fault::Down);
    let first = next;
    let last = first + 1999;
    let (st, _) = hub
        .post_batch(&post(last - 9..=last, Level::Error, SessionStatus::Active))
        .await;
    assert_eq!(st, 200);
    for from in (first..last - 9).step_by(500) {
        let to = (from + 499).min(last - 10);
        let (st, body) = hub
            .post_batch(&post(from..=to, Level::Info, SessionStatus::Active))
            .await;
        assert_eq!(st, 200, "{body}");
    }
    wait_for("the CLI to notice the cut", Duration::from_secs(20), || {
        run.stderr().contains("reconnect").then_some(())
    });
    proxy.set(Fault::Pass);
    let since = std::time::Instant::now();
    let deadline = since + Duration::from_secs(30);
    while printed_seqs(&run).len() < last as usize {
        let printed = printed_seqs(&run);
        assert!(
            std::time::Instant::now() < deadline,
            "after {:?}, {} of {last} records printed, missing {:?}; stderr:\n{}",
            since.elapsed(),
            printed.len(),
            (1..=last)
                .filter(|s| !printed.contains(s))
                .collect::<Vec<_>>(),
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "the records posted while cut printed in {:?}",
        since.elapsed()
    );

    // The session ends: the CLI exits 0, having printed every record once.
    let (st, _) = hub
        .post_batch(&post(
            last + 1..=last + 1,
            Level::Info,
            SessionStatus::Completed,
        ))
        .await;
    assert_eq!(st, 200);
    let mut run = run;
    let status = run.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{}", run.stderr());
    let got = printed_seqs(&run);
    each_once(&got, 1..=last + 1);
    // In the order the hub took them: the errors before the rest.
    let at = |seq: u64| got.iter().position(|s| *s == seq).unwrap();
    assert!(at(last) < at(first), "{:?}", &got[..20]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_a_device_prints_its_new_records_from_outside_sessions() {
    let hub = HubProc::start("cli_follow_device");
    let outside = |from: u64, to: u64| {
        batch(
            vec![],
            (from..=to)
                .map(|i| record(i, None, Level::Info, "boot", &format!("out {i}")))
                .collect(),
            vec![],
        )
    };
    assert_eq!(hub.post_batch(&outside(1, 12)).await.0, 200);
    let mut run = Running::spawn(
        cli(&hub),
        &["logs", "--device", "robot-1", "--follow", "--json"],
    );
    // Like journalctl -f: the last ten first...
    wait_for("the tail", Duration::from_secs(10), || {
        (printed_seqs(&run).len() >= 10).then_some(())
    });
    // ...then what the device sends outside sessions, as it comes.
    let mut next = 13;
    until_live(&hub, &run, |i| outside(i, i), &mut next, 10).await;
    let (st, _) = hub.post_batch(&outside(next, next + 4)).await;
    assert_eq!(st, 200);
    let last = next + 4;
    wait_for("the live batch", Duration::from_secs(10), || {
        printed_seqs(&run).contains(&last).then_some(())
    });
    // A device's stream has no end of its own: the operator stops it.
    assert!(run.child.try_wait().unwrap().is_none(), "{}", run.stderr());
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    each_once(&printed_seqs(&run), 3..=last);
}
