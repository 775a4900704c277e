//! What a device's agent reports, end to end: a real `logbookd` syncing to
//! a real hub sends its version, buffer fill and drops in each v4 batch
//! (README "Devices"); the hub keeps the latest per device and shows it in
//! `GET …/devices` and on the console's Devices screen.

use std::time::Duration;

use serde_json::Value;

use super::console::{get, sign_in};
use super::HubProc;
use crate::sync::{start_agent, sync_env, wait_synced};
use crate::util::TestDir;

/// The device's entry in `GET …/devices`, once its report says `want`.
async fn device_when(hub: &HubProc, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (st, v) = hub.get(&hub.api("/devices")).await;
        assert_eq!(st, 200, "{v}");
        let dev = v["items"]
            .as_array()
            .and_then(|items| items.iter().find(|d| d["device_id"] == super::DEVICE))
            .cloned()
            .unwrap_or(Value::Null);
        if want(&dev) {
            return dev;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the device's report never showed {what}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_report_reaches_the_devices_screen() {
    let hub = HubProc::start("console_devices");
    let dir = TestDir::new("console_devices");
    let mut env = sync_env(&hub.url, &hub.device);
    env.push(("LOGBOOK_BUFFER_MAX_BYTES".into(), "64MiB".into()));
    let agent = tokio::task::block_in_place(|| start_agent(&dir, &env));
    // Two lines the agent cannot store (counted as dropped, by reason),
    // then good ones.
    tokio::task::block_in_place(|| {
        crate::agent::send_lines(
            &agent,
            &[
                "not json at all",
                "[1, 2]",
                r#"{"msg":"boot ok","level":"info"}"#,
                r#"{"msg":"arm homed","level":"info"}"#,
            ],
        );
        wait_synced(&agent, Duration::from_secs(30));
    });
    let status = tokio::task::block_in_place(|| agent.status());

    let dev = device_when(&hub, "both drops", |d| {
        d["agent"]["dropped"]["not_json"] == 1 && d["agent"]["dropped"]["not_object"] == 1
    })
    .await;
    let report = &dev["agent"];
    assert_eq!(report["version"], status["version"], "{dev}");
    assert_eq!(report["buffer_max_bytes"], 64 << 20, "{dev}");
    assert!(report["buffer_bytes"].as_u64() > Some(0), "{dev}");
    assert_eq!(report["dropped"].as_object().unwrap().len(), 2, "{dev}");
    assert!(
        report["reported_at"].as_str().unwrap().ends_with('Z'),
        "{dev}"
    );

    // The Devices screen shows the same report.
    let cookie = sign_in(&hub, &hub.operator).await;
    let (st, _, html) = get(
        &format!("{}/o/acme/warehouse/devices", hub.url),
        Some(&cookie),
    )
    .await;
    assert_eq!(st, 200, "{html}");
    let version = status["version"].as_str().unwrap();
    assert!(html.contains(&format!(">{version}</td>")), "{html}");
    assert!(html.contains("of 64.0 MiB"), "{html}");
    assert!(
        html.contains("not_json: <span class=\"num\">1</span>"),
        "{html}"
    );
    assert!(
        html.contains("not_object: <span class=\"num\">1</span>"),
        "{html}"
    );
    assert!(!html.contains("not reported"), "{html}");

    // A later batch brings a fresh report: another bad line shows up.
    tokio::task::block_in_place(|| {
        crate::agent::send_lines(&agent, &["still not json", r#"{"msg":"tick"}"#]);
        wait_synced(&agent, Duration::from_secs(30));
    });
    device_when(&hub, "the third drop", |d| {
        d["agent"]["dropped"]["not_json"] == 2
    })
    .await;
}
