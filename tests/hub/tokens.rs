//! Token rotation and revocation through `logbook-hub token`, on the
//! suite's storage (`LOGBOOK_TEST_HUB_STORAGE=postgres+s3` runs them on
//! PostgreSQL): a device's second token works beside the first; a revoked
//! token is refused from the next request on, the other stays good.

use std::process::Command;

use logbook::wire::Level;

use super::{batch, record, HubProc, DEVICE, ORG, PROJECT};
use crate::util;

fn revoke(hub: &HubProc, token: &str) -> std::process::Output {
    Command::new(util::bin("logbook-hub"))
        .args(["token", "revoke", "--data-dir"])
        .arg(hub.data_dir())
        .envs(hub.env.iter().map(|(k, v)| (k, v)))
        .arg(token)
        .output()
        .unwrap()
}

fn post(hub: &HubProc, rt: &tokio::runtime::Runtime, seq: u64, token: &str) -> u16 {
    let b = batch(
        vec![],
        vec![record(
            seq,
            None,
            Level::Info,
            "m",
            &format!("record {seq}"),
        )],
        vec![],
    );
    rt.block_on(hub.post_body(&b.encode(1), token)).0
}

#[test]
fn a_device_rotates_its_token_and_the_old_one_is_revoked() {
    let hub = HubProc::start("tokens_rotate");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let old = hub.device.clone();
    assert_eq!(post(&hub, &rt, 1, &old), 200);
    // The rotation window: a second token for the same device; both work.
    let new = hub.token(ORG, PROJECT, Some(DEVICE));
    assert_ne!(new, old);
    assert_eq!(post(&hub, &rt, 2, &new), 200);
    assert_eq!(post(&hub, &rt, 3, &old), 200);

    let out = revoke(&hub, &old);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("revoked the device token of {DEVICE} in {ORG}/{PROJECT}")
    );
    // The very next request with it is refused; the new one goes on.
    assert_eq!(post(&hub, &rt, 4, &old), 401);
    assert_eq!(post(&hub, &rt, 4, &new), 200);
    let (status, page) = rt.block_on(hub.get(&hub.api(&format!("/devices/{DEVICE}/logs"))));
    assert_eq!(status, 200, "{page}");
    let mut seqs: Vec<u64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    seqs.sort();
    assert_eq!(seqs, [1, 2, 3, 4]);

    // Revoking again, or a token the hub never made: one line, exit 1.
    let out = revoke(&hub, &old);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no such token"), "{err}");

    // An operator key is revoked the same way.
    let key = hub.token(ORG, PROJECT, None);
    assert_eq!(rt.block_on(hub.get_as(&hub.api("/sessions"), &key)).0, 200);
    assert!(revoke(&hub, &key).status.success());
    assert_eq!(rt.block_on(hub.get_as(&hub.api("/sessions"), &key)).0, 401);
    assert_eq!(rt.block_on(hub.get(&hub.api("/sessions"))).0, 200);
}
