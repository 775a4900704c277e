//! Token rotation and revocation through `logbook-hub token`, on the
//! suite's storage (`LOGBOOK_TEST_HUB_STORAGE=postgres+s3` runs them on
//! PostgreSQL): a device's second token works beside the first; a revoked
//! token is refused from the next request on, the other stays good; an
//! operator key made with `--project` reads that project only.

use std::process::Command;

use logbook::wire::Level;

use super::{batch, record, HubProc, WsClient, DEVICE, ORG, PROJECT};
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

#[test]
fn an_operator_key_made_for_a_project_reads_that_project_only() {
    let hub = HubProc::start("tokens_scoped");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    assert_eq!(post(&hub, &rt, 1, &hub.device), 200);
    let projects = |key: &str| {
        let (st, v) = rt.block_on(hub.get_as(
            &format!("{}/api/v1/organizations/{ORG}/projects", hub.url),
            key,
        ));
        assert_eq!(st, 200, "{v}");
        let names: Vec<String> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect();
        names
    };
    let lab = hub.token(ORG, "lab", None);
    let lab_url = |path: &str| format!("{}/api/v1/organizations/{ORG}/projects/lab{path}", hub.url);
    // Its own project (empty) answers; the organization's other project is
    // a 404, as if it did not exist, on every kind of route.
    let (st, v) = rt.block_on(hub.get_as(&lab_url("/sessions"), &lab));
    assert_eq!((st, v["total"].as_u64()), (200, Some(0)), "{v}");
    for path in [
        "/sessions".to_owned(),
        "/devices".to_owned(),
        format!("/devices/{DEVICE}/logs"),
        "/marks".to_owned(),
    ] {
        let (st, v) = rt.block_on(hub.get_as(&hub.api(&path), &lab));
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{path}: {v}"
        );
    }
    let ws = format!("/ws/organizations/{ORG}/projects/{PROJECT}/devices/{DEVICE}/logs?tail=1");
    let refused = WsClient::connect(&hub.addr, &ws, &lab).err().unwrap();
    assert!(refused.starts_with("HTTP/1.1 404"), "{refused}");
    assert!(WsClient::connect(&hub.addr, &ws, &hub.operator).is_ok());
    assert_eq!(projects(&lab), ["lab"]);

    // The suite's key was made with --project warehouse: warehouse only.
    assert_eq!(projects(&hub.operator), [PROJECT]);
    let (st, _) = rt.block_on(hub.get(&lab_url("/sessions")));
    assert_eq!(st, 404);
    let (st, v) = rt.block_on(hub.get(&hub.api(&format!("/devices/{DEVICE}/logs"))));
    assert_eq!(
        (st, v["items"].as_array().map(Vec::len)),
        (200, Some(1)),
        "{v}"
    );

    // A key made without --project reads every project of its
    // organization, and of no other.
    let all = hub.org_key(ORG);
    assert_eq!(projects(&all), ["lab", PROJECT]);
    assert_eq!(rt.block_on(hub.get_as(&lab_url("/sessions"), &all)).0, 200);
    assert_eq!(rt.block_on(hub.get_as(&hub.api("/sessions"), &all)).0, 200);
    let (st, _) = rt.block_on(hub.get_as(
        &format!("{}/api/v1/organizations/globex/projects", hub.url),
        &all,
    ));
    assert_eq!(st, 404);
    let out = revoke(&hub, &all);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("revoked the operator key of {ORG}")
    );
    let out = revoke(&hub, &lab);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("revoked the operator key of {ORG}/lab")
    );

    // A device token needs its project.
    let out = Command::new(util::bin("logbook-hub"))
        .args(["token", "create", "--data-dir"])
        .arg(hub.data_dir())
        .envs(hub.env.iter().map(|(k, v)| (k, v)))
        .args(["--org", ORG, "--device", "robot-7"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--project"),
        "{out:?}"
    );
}
