//! A real Docker daemon's `fluentd` log driver pointed at `forward.sock`:
//! the test starts its own `dockerd` on a temporary directory (no network,
//! vfs storage), imports a one-binary busybox image, and runs containers
//! whose stdout and stderr must arrive with the tag as module and the
//! driver's container fields in metadata, every line exactly once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::record;
use crate::agent::Agent;
use crate::util::{interop_client, run_ok, wait_for, TestDir};

/// A `dockerd` of this test only; stopped (with its containerd) on drop.
struct Dockerd {
    child: Child,
    host: String,
    log: PathBuf,
}

impl Dockerd {
    fn start(dir: &TestDir) -> Dockerd {
        let log = dir.join("dockerd.log");
        let host = format!("unix://{}", dir.join("docker.sock").display());
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(dir.join("d"))
            .arg("--exec-root")
            .arg(dir.join("x"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .args(["-H", &host])
            // No network of its own, no firewall rules on the host, and a
            // storage driver that needs no kernel module.
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .args(["--storage-driver=vfs"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start dockerd");
        let d = Dockerd { child, host, log };
        wait_for("dockerd to answer", Duration::from_secs(60), || {
            d.docker()
                .arg("info")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()
                .filter(|s| s.success())
        });
        d
    }

    fn docker(&self) -> Command {
        let mut c = Command::new("docker");
        c.env("DOCKER_HOST", &self.host);
        c
    }

    /// An image holding only a static busybox, made from the host's.
    fn import_busybox(&self, dir: &TestDir) -> &'static str {
        let busybox = run_ok(Command::new("sh").args(["-c", "command -v busybox"]));
        let busybox = PathBuf::from(String::from_utf8(busybox.stdout).unwrap().trim());
        let root = dir.join("image");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::copy(&busybox, root.join("bin/busybox")).unwrap();
        let tar = dir.join("image.tar");
        run_ok(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
        );
        let image = "logbook-test/busybox";
        run_ok(self.docker().arg("import").arg(&tar).arg(image));
        image
    }

    /// Runs `sh -c script` in a container whose logs go to `forward.sock`.
    fn run(&self, image: &str, socket: &Path, tag: &str, extra: &[&str], script: &str) {
        let mut c = self.docker();
        c.args([
            "run",
            "--rm",
            "--network",
            "none",
            "--log-driver",
            "fluentd",
        ])
        .arg("--log-opt")
        .arg(format!("fluentd-address=unix://{}", socket.display()))
        .arg("--log-opt")
        .arg(format!("tag={tag}"));
        for opt in extra {
            c.args(["--log-opt", opt]);
        }
        c.args([image, "/bin/busybox", "sh", "-c", script]);
        run_ok(&mut c);
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SIGTERM lets dockerd stop its containerd; a kill would orphan it.
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        for _ in 0..1000 {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- dockerd log\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// dockerd needs root; like a missing client, that is a skip on a
/// developer's machine and a failure under CI.
fn can_run_dockerd() -> bool {
    if !interop_client("dockerd") || !interop_client("docker") || !interop_client("busybox") {
        return false;
    }
    if !rustix::process::getuid().is_root() {
        if std::env::var_os("CI").is_some() {
            panic!("the Docker interop test needs root under CI");
        }
        eprintln!("SKIPPED: dockerd needs root");
        return false;
    }
    true
}

#[test]
fn docker_fluentd_log_driver_with_and_without_acks() {
    if !can_run_dockerd() {
        return;
    }
    let dir = TestDir::new("docker_fluentd");
    let agent = Agent::start(&dir, &[]);
    let docker = Dockerd::start(&dir);
    let image = docker.import_busybox(&dir);
    let socket = agent.runtime.join("forward.sock");

    // The README's options: async, so a restarting agent never stalls the
    // container; the driver may still be sending when `docker run` ends.
    docker.run(
        image,
        &socket,
        "robot.nav",
        &["fluentd-async=true"],
        "echo 'planner ready'; echo 'lidar timeout' >&2",
    );
    wait_for("the container's lines", Duration::from_secs(20), || {
        agent.flush();
        (agent.logs("module=robot.nav").len() == 2).then_some(())
    });
    let out = record(&agent, "planner ready");
    assert_eq!(out["module"], "robot.nav", "{out}");
    assert_eq!(out["level"], "INFO", "{out}");
    assert_eq!(out["metadata"]["source"], "stdout", "{out}");
    let container = out["metadata"]["container_id"].as_str().unwrap();
    assert_eq!(container.len(), 64, "{out}");
    assert!(out["metadata"]["container_name"]
        .as_str()
        .unwrap()
        .starts_with('/'));
    // The sender is the daemon, and the kernel says so.
    assert_eq!(out["process"], "dockerd", "{out}");
    assert_eq!(out["uid"], 0, "{out}");
    let err = record(&agent, "lidar timeout");
    assert_eq!(err["metadata"]["source"], "stderr", "{err}");
    assert_eq!(err["metadata"]["container_id"], container, "{err}");

    // With acks the driver sends a chunk id and waits for our answer: a
    // burst of lines must arrive once each, in order.
    docker.run(
        image,
        &socket,
        "robot.arm",
        &["fluentd-request-ack=true"],
        "i=0; while [ $i -lt 500 ]; do echo \"arm step $i\"; i=$((i+1)); done",
    );
    agent.flush();
    let arm: Vec<Value> = agent
        .logs("module=robot.arm")
        .into_iter()
        .filter(|r| r["message"].as_str().unwrap().starts_with("arm step "))
        .collect();
    let messages: Vec<&str> = arm.iter().map(|r| r["message"].as_str().unwrap()).collect();
    let expected: Vec<String> = (0..500).map(|i| format!("arm step {i}")).collect();
    assert_eq!(messages, expected, "every line once, in order");
    let bad = &agent.status()["ingest"]["bad"];
    let bad_total: u64 = bad
        .as_object()
        .unwrap()
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(bad_total, 0, "no input refused: {bad}");
}
