//! Exporting a session of 1,000,000 logs as JSON and CSV streams in
//! bounded memory: the hub's peak RSS (VmHWM) barely moves while hundreds
//! of megabytes go out. And an export in flight when SIGTERM arrives
//! finishes before the hub exits.

use logbook::wire::{Level, SessionStatus};

use super::*;

const RECORDS: u64 = 1_000_000;
const PER_BATCH: u64 = 25_000;
/// Growth of the hub's peak RSS an export may cause. A buffered export of
/// this session would be several hundred MiB.
const MAX_GROWTH_KIB: u64 = 48 << 10;

async fn count_lines(hub: &HubProc, url: &str) -> (u64, u64, String) {
    let mut r = hub
        .http
        .get(url)
        .bearer_auth(&hub.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (mut lines, mut bytes) = (0u64, 0u64);
    let mut head = String::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        if head.len() < 200 {
            head.push_str(&String::from_utf8_lossy(&chunk[..chunk.len().min(200)]));
        }
        bytes += chunk.len() as u64;
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    (lines, bytes, head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn million_log_export_streams_in_bounded_memory() {
    let hub = HubProc::start("hub_export_1m");
    let s = session_id(1);
    let levels = [Level::Debug, Level::Info, Level::Warn, Level::Error];
    let mut seq = 0u64;
    for b in 0..RECORDS / PER_BATCH {
        let recs: Vec<_> = (0..PER_BATCH)
            .map(|i| {
                seq += 1;
                record(
                    seq,
                    Some(s),
                    levels[(i % 4) as usize],
                    "perception.lidar",
                    "point cloud frame processed, 12034 points, 3 clusters, latency 4.2 ms",
                )
            })
            .collect();
        let sessions = if b == 0 {
            vec![state(s, 1, SessionStatus::Completed, &[])]
        } else {
            vec![]
        };
        let (st, ack) = hub.post_batch(&batch(sessions, recs, vec![])).await;
        assert_eq!(st, 200, "{ack}");
        assert_eq!(ack["stored"], PER_BATCH);
    }
    let (_, sess) = hub.get(&hub.api(&format!("/sessions/{s}"))).await;
    assert_eq!(sess["metrics"]["log_count"], RECORDS);

    let before = hub.peak_rss_kib();
    let base = hub.api(&format!("/sessions/{s}/logs/export"));
    let (lines, json_bytes, head) = count_lines(&hub, &format!("{base}?format=json")).await;
    assert_eq!(lines, RECORDS + 2, "[, one line per record, ]");
    assert!(head.starts_with("[\n{\"seq\":1,"), "{head}");
    let (lines, csv_bytes, head) = count_lines(&hub, &format!("{base}?format=csv")).await;
    assert_eq!(lines, RECORDS + 1, "header and one line per record");
    assert!(head.starts_with("seq,timestamp,level"), "{head}");
    let after = hub.peak_rss_kib();
    eprintln!(
        "export of {} MiB: hub peak RSS {before} KiB before, {after} KiB after",
        (json_bytes + csv_bytes) >> 20
    );
    assert!(json_bytes > 200 << 20 && csv_bytes > 100 << 20);
    assert!(
        after.saturating_sub(before) < MAX_GROWTH_KIB,
        "peak RSS grew from {before} KiB to {after} KiB while exporting {} MiB",
        (json_bytes + csv_bytes) >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_export_in_flight_finish() {
    let mut hub = HubProc::start("hub_export_sigterm");
    let s = session_id(2);
    let n = 100_000u64;
    for b in 0..n / PER_BATCH {
        let recs: Vec<_> = (1..=PER_BATCH)
            .map(|i| {
                record(
                    b * PER_BATCH + i,
                    Some(s),
                    Level::Info,
                    "nav",
                    "waypoint reached, replanning",
                )
            })
            .collect();
        let sessions = if b == 0 {
            vec![state(s, 1, SessionStatus::Active, &[])]
        } else {
            vec![]
        };
        assert_eq!(hub.post_batch(&batch(sessions, recs, vec![])).await.0, 200);
    }
    let url = hub.api(&format!("/sessions/{s}/logs/export?format=json"));
    let mut r = hub
        .http
        .get(url)
        .bearer_auth(&hub.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().unwrap();
    // Shutdown begins while most of the export is still to come.
    hub.sigterm();
    let mut lines = first.iter().filter(|b| **b == b'\n').count() as u64;
    while let Some(chunk) = r.chunk().await.unwrap() {
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    assert_eq!(lines, n + 2, "the export was cut short");
    let status = hub.wait_exit();
    assert!(status.success(), "{status}");
}
