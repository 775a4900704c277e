//! TLS between a real agent and a real hub, with certificates this test
//! makes (a private CA, an expired certificate, one for another name,
//! client certificates): the agent syncs through a hub it trusts with
//! `sync.ca_file`, reports a hub it cannot trust as a link error while it
//! keeps its records (and delivers them once the right CA arrives with a
//! SIGHUP), and under mTLS a device's certificate must name the device of
//! its token (403 otherwise). Configuration mistakes are one line at start.

use std::process::Command;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

use super::{assert_exact_seqs, hub_logs, start_agent, sync_env, wait_synced};
use crate::agent::send_lines;
use crate::hub::{HubProc, DEVICE};
use crate::util::{self, wait_for, TestDir};

/// A private CA and the files of what it signs, in one directory.
struct Pki {
    dir: TestDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = TestDir::new(&format!("{name}_pki"));
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca }
    }

    fn ca_file(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }

    /// A leaf certificate for `names`, valid now unless `expired`: its chain
    /// (leaf, then the CA) and its key, as files named after `file`.
    fn leaf(&self, file: &str, names: &[&str], expired: bool) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].to_owned());
        let now = time::OffsetDateTime::now_utc();
        if expired {
            params.not_before = now - time::Duration::days(30);
            params.not_after = now - time::Duration::days(1);
        } else {
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + time::Duration::days(30);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_path, key_path) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert_path, format!("{}{}", cert.pem(), self.ca.pem())).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (
            cert_path.display().to_string(),
            key_path.display().to_string(),
        )
    }
}

/// A hub serving TLS with `cert` and `key` (and `client_ca` for mTLS).
fn tls_hub(name: &str, cert: &str, key: &str, client_ca: Option<&str>) -> HubProc {
    let mut env = vec![
        ("LOGBOOK_SERVER_TLS_CERT", cert),
        ("LOGBOOK_SERVER_TLS_KEY", key),
    ];
    if let Some(ca) = client_ca {
        env.push(("LOGBOOK_SERVER_CLIENT_CA", ca));
    }
    HubProc::start_with(name, &env)
}

fn lines(n: u64) -> Vec<String> {
    (1..=n)
        .map(|i| format!(r#"{{"level":"info","msg":"line {i}"}}"#))
        .collect()
}

fn send(agent: &crate::agent::Agent, n: u64) {
    let lines = lines(n);
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    send_lines(agent, &refs);
    agent.flush();
}

fn hup(agent: &crate::agent::Agent) {
    let pid = rustix::process::Pid::from_raw(agent.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
}

#[test]
fn an_agent_syncs_through_tls_to_a_hub_of_a_private_ca() {
    let pki = Pki::new("tls_good");
    let (cert, key) = pki.leaf("hub", &["localhost"], false);
    let hub = tls_hub("tls_good", &cert, &key, None);
    assert!(hub.url.starts_with("https://localhost:"), "{}", hub.url);
    let dir = TestDir::new("tls_good");
    let mut env = sync_env(&hub.url, &hub.device);
    env.push(("LOGBOOK_SYNC_CA_FILE".into(), pki.ca_file()));
    let agent = start_agent(&dir, &env);
    send(&agent, 50);
    wait_synced(&agent, Duration::from_secs(30));
    assert_eq!(agent.status()["sync"]["link"], "online");
    assert_exact_seqs(&hub_logs(&hub, &format!("/devices/{DEVICE}/logs")), 1..=50);
    // The operator's CLI trusts the private CA with --ca-file; without it,
    // it says why in one line.
    let logs = crate::cli::ok(
        crate::cli::cli(&hub),
        &["logs", "--device", DEVICE, "--ca-file", &pki.ca_file()],
    );
    assert_eq!(logs.lines().count(), 50, "{logs}");
    let err = crate::cli::fails(crate::cli::cli(&hub), &["logs", "--device", DEVICE]);
    assert!(err.contains("UnknownIssuer"), "{err}");
    let err = crate::cli::fails(
        crate::cli::cli(&hub),
        &["logs", "--device", DEVICE, "--ca-file", "/nonexistent.pem"],
    );
    assert!(
        err.contains("--ca-file /nonexistent.pem: cannot read"),
        "{err}"
    );
    // Plain HTTP to the TLS port gets no answer.
    assert!(crate::hub::raw_request(
        &hub.addr,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .is_none_or(|r| !r.starts_with("HTTP/1.1 200")));
}

/// The agent cannot trust the hub: `why` (a part of rustls' reason) shows
/// in `/v1/status`, the link stays offline, and every record stays with the
/// agent, none at the hub.
fn untrusted(name: &str, hub_names: &[&str], expired: bool, agent_ca: &Pki, why: &str) {
    let pki = Pki::new(name);
    let (cert, key) = pki.leaf("hub", hub_names, expired);
    let hub = tls_hub(name, &cert, &key, None);
    let dir = TestDir::new(name);
    let mut env = sync_env(&hub.url, &hub.device);
    env.push(("LOGBOOK_SYNC_CA_FILE".into(), agent_ca.ca_file()));
    let agent = start_agent(&dir, &env);
    send(&agent, 20);
    let err = wait_for("a TLS link error", Duration::from_secs(20), || {
        let s = agent.status()["sync"].clone();
        let e = s["last_error"].as_str().unwrap_or_default().to_owned();
        e.contains(why).then_some((e, s))
    });
    assert_eq!(err.1["link"], "offline", "{}", err.1);
    assert_eq!(err.1["backlog_records"], 20, "{}", err.1);
    assert!(err.0.contains("certificate"), "{}", err.0);
    assert_eq!(agent.logs("").len(), 20);
    let (status, page) = super::hub_get(&hub, &hub.api(&format!("/devices/{DEVICE}/logs")));
    // The hub never heard of the device.
    assert_eq!(status, 404, "{page}");
}

#[test]
fn a_hub_of_another_ca_is_a_link_error_and_the_records_stay() {
    let other = Pki::new("tls_other_ca_agent");
    untrusted(
        "tls_other_ca",
        &["localhost"],
        false,
        &other,
        "UnknownIssuer",
    );
}

#[test]
fn an_expired_hub_certificate_is_a_link_error() {
    let pki = Pki::new("tls_expired_ca");
    let (cert, key) = pki.leaf("hub", &["localhost"], true);
    let hub = tls_hub("tls_expired", &cert, &key, None);
    let dir = TestDir::new("tls_expired");
    let mut env = sync_env(&hub.url, &hub.device);
    env.push(("LOGBOOK_SYNC_CA_FILE".into(), pki.ca_file()));
    let agent = start_agent(&dir, &env);
    send(&agent, 5);
    let err = wait_for(
        "an expired-certificate error",
        Duration::from_secs(20),
        || {
            agent.status()["sync"]["last_error"]
                .as_str()
                .filter(|e| e.contains("certificate expired"))
                .map(str::to_owned)
        },
    );
    assert!(err.contains("certificate"), "{err}");
    assert_eq!(agent.status()["sync"]["backlog_records"], 5);
}

#[test]
fn a_hub_certificate_for_another_name_is_a_link_error() {
    let pki = Pki::new("tls_name_ca");
    let (cert, key) = pki.leaf("hub", &["hub.example.org"], false);
    let hub = tls_hub("tls_name", &cert, &key, None);
    let dir = TestDir::new("tls_name");
    let mut env = sync_env(&hub.url, &hub.device);
    env.push(("LOGBOOK_SYNC_CA_FILE".into(), pki.ca_file()));
    let agent = start_agent(&dir, &env);
    send(&agent, 5);
    let err = wait_for("a wrong-name error", Duration::from_secs(20), || {
        agent.status()["sync"]["last_error"]
            .as_str()
            .filter(|e| e.contains("certificate not valid for name"))
            .map(str::to_owned)
    });
    assert!(err.contains("certificate"), "{err}");
    assert_eq!(agent.status()["sync"]["backlog_records"], 5);
}

#[test]
fn the_right_ca_after_a_sighup_delivers_every_record_once() {
    let pki = Pki::new("tls_reload");
    let (cert, key) = pki.leaf("hub", &["localhost"], false);
    let hub = tls_hub("tls_reload", &cert, &key, None);
    let other = Pki::new("tls_reload_other");
    // The agent's CA file holds another CA first.
    let ca_file = TestDir::new("tls_reload_agent_ca");
    let ca_path = ca_file.join("ca.pem");
    std::fs::copy(other.ca_file(), &ca_path).unwrap();
    let dir = TestDir::new("tls_reload");
    let mut env = sync_env(&hub.url, &hub.device);
    env.push(("LOGBOOK_SYNC_CA_FILE".into(), ca_path.display().to_string()));
    let agent = start_agent(&dir, &env);
    send(&agent, 30);
    wait_for("UnknownIssuer", Duration::from_secs(20), || {
        agent.status()["sync"]["last_error"]
            .as_str()
            .filter(|e| e.contains("UnknownIssuer"))
            .map(|_| ())
    });
    std::fs::copy(pki.ca_file(), &ca_path).unwrap();
    hup(&agent);
    wait_synced(&agent, Duration::from_secs(30));
    assert_exact_seqs(&hub_logs(&hub, &format!("/devices/{DEVICE}/logs")), 1..=30);
    assert!(
        agent.log_text().contains("new sync TLS files"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn mtls_binds_the_client_certificate_to_the_device_of_the_token() {
    let pki = Pki::new("tls_mtls");
    let (cert, key) = pki.leaf("hub", &["localhost"], false);
    let mut hub = tls_hub("tls_mtls", &cert, &key, Some(&pki.ca_file()));
    let (robot1_cert, robot1_key) = pki.leaf("robot-1", &[DEVICE], false);
    let (robot2_cert, robot2_key) = pki.leaf("robot-2", &["robot-2"], false);

    // Without a client certificate there is no TLS session at all.
    let plain = healthz(&client(&pki, None), &hub);
    assert!(plain.is_err(), "{plain:?}");
    // With one, operators are served.
    let identity = |cert: &str, key: &str| {
        let mut pem = std::fs::read(cert).unwrap();
        pem.extend(std::fs::read(key).unwrap());
        reqwest::Identity::from_pem(&pem).unwrap()
    };
    hub.http = client(&pki, Some(identity(&robot1_cert, &robot1_key)));
    let (status, _) = super::hub_get(&hub, &hub.api("/sessions"));
    assert_eq!(status, 200);

    // robot-1's certificate with robot-1's token: synced.
    let dir = TestDir::new("tls_mtls_robot1");
    let mut env = sync_env(&hub.url, &hub.device);
    env.extend([
        ("LOGBOOK_SYNC_CA_FILE".to_string(), pki.ca_file()),
        ("LOGBOOK_SYNC_CLIENT_CERT".to_string(), robot1_cert.clone()),
        ("LOGBOOK_SYNC_CLIENT_KEY".to_string(), robot1_key.clone()),
    ]);
    let agent = start_agent(&dir, &env);
    send(&agent, 10);
    wait_synced(&agent, Duration::from_secs(30));
    assert_exact_seqs(&hub_logs(&hub, &format!("/devices/{DEVICE}/logs")), 1..=10);

    // robot-2's certificate with robot-1's token: 403, the agent stops
    // and says why.
    let dir = TestDir::new("tls_mtls_robot2");
    let mut env = sync_env(&hub.url, &hub.device);
    env.retain(|(k, _)| k != "LOGBOOK_DEVICE_ID");
    env.extend([
        ("LOGBOOK_DEVICE_ID".to_string(), "robot-1".to_string()),
        ("LOGBOOK_SYNC_CA_FILE".to_string(), pki.ca_file()),
        ("LOGBOOK_SYNC_CLIENT_CERT".to_string(), robot2_cert.clone()),
        ("LOGBOOK_SYNC_CLIENT_KEY".to_string(), robot2_key.clone()),
    ]);
    let mallory = start_agent(&dir, &env);
    send(&mallory, 3);
    let st = wait_for("auth-failed", Duration::from_secs(20), || {
        let s = mallory.status()["sync"].clone();
        (s["link"] == "auth-failed").then_some(s)
    });
    let err = st["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("403"), "{st}");
    assert!(err.contains("certificate_mismatch"), "{st}");
    assert!(err.contains("does not name device"), "{st}");
    // The direct answer is an ErrorBody.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c = client(&pki, Some(identity(&robot2_cert, &robot2_key)));
    let (status, body) = rt.block_on(async {
        let r = c
            .post(format!("{}{}", hub.url, logbook::wire::BATCHES_PATH))
            .bearer_auth(&hub.device)
            .header("content-type", "application/x-msgpack")
            .body(vec![0u8])
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    assert_eq!(status, 403, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "certificate_mismatch", "{body}");
    // Still only robot-1's ten records.
    assert_exact_seqs(&hub_logs(&hub, &format!("/devices/{DEVICE}/logs")), 1..=10);
}

/// A client trusting `pki`'s CA, presenting `identity`.
fn client(pki: &Pki, identity: Option<reqwest::Identity>) -> reqwest::Client {
    let pem = std::fs::read(pki.ca_file()).unwrap();
    let mut b = reqwest::Client::builder();
    for c in reqwest::Certificate::from_pem_bundle(&pem).unwrap() {
        b = b.add_root_certificate(c);
    }
    if let Some(i) = identity {
        b = b.identity(i);
    }
    b.build().unwrap()
}

/// `GET /healthz` with `c`: its status, or why there was none.
fn healthz(c: &reqwest::Client, hub: &HubProc) -> Result<u16, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        c.get(format!("{}/healthz", hub.url))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| format!("{e:?}"))
    })
}

/// Each configuration mistake is one line naming the key and the file,
/// at start, from the hub and from the agent.
#[test]
fn tls_configuration_mistakes_are_one_line_at_start() {
    let pki = Pki::new("tls_config");
    let (cert, key) = pki.leaf("hub", &["localhost"], false);
    let dir = TestDir::new("tls_config");
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a pem file\n").unwrap();
    let garbage = garbage.display().to_string();
    let missing = dir.join("missing.pem").display().to_string();
    let hub_err = |env: &[(&str, &str)]| {
        let out = Command::new(util::bin("logbook-hub"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("hub"))
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        assert_eq!(err.lines().count(), 1, "{err}");
        err
    };
    let e = hub_err(&[
        ("LOGBOOK_SERVER_TLS_CERT", &missing),
        ("LOGBOOK_SERVER_TLS_KEY", &key),
    ]);
    assert!(
        e.contains("server.tls_cert") && e.contains("missing.pem") && e.contains("cannot read"),
        "{e}"
    );
    let e = hub_err(&[
        ("LOGBOOK_SERVER_TLS_CERT", &garbage),
        ("LOGBOOK_SERVER_TLS_KEY", &key),
    ]);
    assert!(
        e.contains("server.tls_cert") && e.contains("no CERTIFICATE"),
        "{e}"
    );
    let e = hub_err(&[
        ("LOGBOOK_SERVER_TLS_CERT", &cert),
        ("LOGBOOK_SERVER_TLS_KEY", &garbage),
    ]);
    assert!(
        e.contains("server.tls_key") && e.contains("private key"),
        "{e}"
    );
    let e = hub_err(&[("LOGBOOK_SERVER_TLS_CERT", &cert)]);
    assert!(e.contains("server.tls_key is not"), "{e}");
    let e = hub_err(&[
        ("LOGBOOK_SERVER_TLS_CERT", &cert),
        ("LOGBOOK_SERVER_TLS_KEY", &key),
        ("LOGBOOK_SERVER_CLIENT_CA", &garbage),
    ]);
    assert!(e.contains("server.client_ca"), "{e}");

    let agent_err = |env: &[(&str, &str)]| {
        let mut all = vec![
            ("LOGBOOK_SYNC_HUB", "https://localhost:1"),
            ("LOGBOOK_SYNC_TOKEN", "t"),
        ];
        all.extend_from_slice(env);
        let out = Command::new(util::bin("logbookd"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--runtime-dir")
            .arg(dir.join("run"))
            .envs(all)
            .env_remove("NOTIFY_SOCKET")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        assert_eq!(err.lines().count(), 1, "{err}");
        err
    };
    let e = agent_err(&[("LOGBOOK_SYNC_CA_FILE", &missing)]);
    assert!(
        e.contains("sync.ca_file") && e.contains("cannot read"),
        "{e}"
    );
    let e = agent_err(&[("LOGBOOK_SYNC_CA_FILE", &garbage)]);
    assert!(
        e.contains("sync.ca_file") && e.contains("no CERTIFICATE"),
        "{e}"
    );
    let e = agent_err(&[
        ("LOGBOOK_SYNC_CLIENT_CERT", &cert),
        ("LOGBOOK_SYNC_CLIENT_KEY", &garbage),
    ]);
    assert!(e.contains("sync.client_key"), "{e}");
    let e = agent_err(&[("LOGBOOK_SYNC_CLIENT_CERT", &cert)]);
    assert!(e.contains("sync.client_key"), "{e}");
}
