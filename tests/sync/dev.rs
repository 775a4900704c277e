//! `logbook dev` as a newcomer uses it: start it, start a session, send a
//! log line with `logbook log`, see it through the hub's API with the printed key,
//! stop it with Ctrl-C; run it again and find the same keys and data.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::util::{bin, run_ok, wait_for, TestDir};

struct Dev {
    child: Child,
    intro: String,
}

impl Dev {
    fn start(dir: &TestDir) -> Dev {
        let mut child = Command::new(bin("logbook"))
            .args(["dev", "--listen", "127.0.0.1:0", "--dir"])
            .arg(dir.join("dev"))
            .env_remove("LOGBOOK_SYNC_HUB")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start logbook dev");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut intro = String::new();
        // Reading blocks until the intro is printed: that is readiness.
        while !intro.contains("Ctrl-C stops both.") {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                panic!("logbook dev exited early; printed:\n{intro}");
            }
            intro.push_str(&line);
        }
        Dev { child, intro }
    }

    /// The value printed after `label` on its line.
    fn field(&self, label: &str) -> String {
        self.intro
            .lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(|v| v.split_whitespace().next().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no {label:?} in:\n{}", self.intro))
    }

    fn interrupt(&mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
        wait_for("logbook dev to stop", Duration::from_secs(20), || {
            self.child.try_wait().unwrap()
        })
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(url: &str, key: &str) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = reqwest::Client::new()
            .get(url)
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{url}");
        serde_json::from_str(&r.text().await.unwrap()).unwrap()
    })
}

#[test]
fn logbook_dev_runs_the_whole_system_and_stops_cleanly() {
    let dir = TestDir::new("sync_dev");
    let mut dev = Dev::start(&dir);
    let hub = dev.field("hub");
    let key = dev.field("operator key");
    let ingest = dev.field("log ingest");
    let runtime = std::path::Path::new(&ingest).parent().unwrap().to_owned();
    assert!(hub.starts_with("http://127.0.0.1:"), "{}", dev.intro);
    for part in [
        "session start",
        " log --level info hello from my robot",
        "socat",
        "curl -s -H 'Authorization: Bearer",
    ] {
        assert!(dev.intro.contains(part), "{part}: {}", dev.intro);
    }

    // 1. start a session, as printed.
    let out = run_ok(
        Command::new(bin("logbook"))
            .arg("--runtime-dir")
            .arg(&runtime)
            .args(["session", "start", "--tag", "demo"]),
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    // 2. send a log line with `logbook log`, as printed.
    run_ok(
        Command::new(bin("logbook"))
            .arg("--runtime-dir")
            .arg(&runtime)
            .args(["log", "--level", "info", "hello", "from", "my", "robot"]),
    );
    // 3. the session and its log at the hub, with the printed key.
    let api = format!("{hub}/api/v1/organizations/dev/projects/sandbox");
    wait_for("the session at the hub", Duration::from_secs(10), || {
        let list = get(&format!("{api}/sessions"), &key);
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == id && s["log_count"] == 1)
            .then_some(())
    });
    let logs = get(&format!("{api}/sessions/{id}/logs"), &key);
    assert_eq!(logs["items"][0]["message"], "hello from my robot", "{logs}");

    assert!(dev.interrupt().success());
    assert!(
        !std::path::Path::new(&ingest).exists(),
        "sockets removed on exit"
    );

    // Again: same directory, same keys, the data still there.
    let dev2 = Dev::start(&dir);
    assert_eq!(dev2.field("operator key"), key);
    let hub2 = dev2.field("hub");
    let s = get(
        &format!("{hub2}/api/v1/organizations/dev/projects/sandbox/sessions/{id}"),
        &key,
    );
    assert_eq!(s["tags"], serde_json::json!(["demo"]));
}
