//! One clear line for each way `logbook --hub` can go wrong: no key, a
//! refused key, an unknown session, an unreachable hub, bad flag combos.
//! The key is never echoed.

use super::*;
use crate::hub::session_id;
use crate::util::bin;

#[test]
fn errors_are_one_clear_line() {
    let hub = HubProc::start("cli_errors");
    let one_line = |err: &str| {
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.starts_with("logbook: ") || err.starts_with("error: "),
            "{err}"
        );
    };

    // No key.
    let mut c = cli(&hub);
    c.env_remove("LOGBOOK_HUB_KEY");
    let err = fails(c, &["sessions"]);
    one_line(&err);
    assert!(
        err.contains("no operator key: give --key or set LOGBOOK_HUB_KEY"),
        "{err}"
    );

    // A wrong key (flag beats environment), never echoed.
    let mut c = cli(&hub);
    c.args(["--key", "lbk_not_a_real_key_123"]);
    let err = fails(c, &["sessions"]);
    one_line(&err);
    assert!(
        err.contains(&format!("the hub at {} refused the operator key", hub.url)),
        "{err}"
    );
    assert!(!err.contains("lbk_not_a_real_key_123"), "{err}");

    // A device token is not an operator key.
    let mut c = cli(&hub);
    c.env("LOGBOOK_HUB_KEY", &hub.device);
    let err = fails(c, &["sessions"]);
    one_line(&err);
    assert!(
        err.contains("refused") || err.contains("does not let this key"),
        "{err}"
    );
    assert!(!err.contains(&hub.device), "{err}");

    // Another organization's data.
    let mut c = cli(&hub);
    c.env("LOGBOOK_ORG", "globex");
    let err = fails(c, &["sessions"]);
    one_line(&err);
    assert!(err.contains("globex"), "{err}");

    // Unknown session.
    let missing = session_id(99).to_string();
    let err = fails(cli(&hub), &["session", "show", &missing]);
    one_line(&err);
    assert!(
        err.contains(&format!("not found at the hub: no session {missing}")),
        "{err}"
    );
    let err = fails(cli(&hub), &["logs", "--session", &missing]);
    assert!(err.contains("no session"), "{err}");

    // Unreachable hub: a port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let mut c = cli(&hub);
    c.env("LOGBOOK_HUB_URL", &url);
    let err = fails(c, &["sessions"]);
    one_line(&err);
    assert!(
        err.contains(&format!("cannot reach the hub at {url}")),
        "{err}"
    );

    // Bad flag combinations.
    let err = fails(cli(&hub), &["logs"]);
    assert!(err.contains("with --hub, logs needs --session ID"), "{err}");
    let err = fails(cli(&hub), &["logs", "--device", "robot-9", "--follow"]);
    assert!(err.contains("no device robot-9"), "{err}");
    let err = fails(cli(&hub), &["artifacts"]);
    assert!(err.contains("artifacts needs --session ID"), "{err}");
    let err = fails(cli(&hub), &["session", "start"]);
    assert!(
        err.contains("sessions start and stop on the robot"),
        "{err}"
    );
    let err = fails(cli(&hub), &["session", "tag", "only-a-tag"]);
    assert!(err.contains("`session tag ID TAG`"), "{err}");
    let err = fails(cli(&hub), &["status"]);
    assert!(err.contains("run them there without --hub"), "{err}");
    let mut c = cli(&hub);
    c.args(["--runtime-dir", "/tmp"]);
    let err = fails(c, &["sessions"]);
    assert!(err.contains("cannot be used with"), "{err}");
    let mut c = cli(&hub);
    c.env("LOGBOOK_HUB_URL", "hub.example:8080");
    let err = fails(c, &["sessions"]);
    assert!(
        err.contains("--hub: expected an http:// or https:// URL"),
        "{err}"
    );
    let mut c = cli(&hub);
    c.env_remove("LOGBOOK_PROJECT");
    let err = fails(c, &["sessions"]);
    assert!(
        err.contains("no project: give --project or set LOGBOOK_PROJECT"),
        "{err}"
    );

    // Without --hub, the hub-only flags say what they need.
    let mut c = std::process::Command::new(bin("logbook"));
    c.env_remove("LOGBOOK_HUB_URL");
    let err = fails(
        c,
        &["--runtime-dir", "/nonexistent", "sessions", "--tag", "x"],
    );
    assert!(err.contains("give --hub URL"), "{err}");
    let mut c = std::process::Command::new(bin("logbook"));
    c.env_remove("LOGBOOK_HUB_URL");
    let err = fails(
        c,
        &["--runtime-dir", "/nonexistent", "logs", "--device", "x"],
    );
    assert!(err.contains("give --hub URL"), "{err}");
}
