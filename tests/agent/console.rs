//! The read-only console of `logbookd` (`api.console`): a real daemon on
//! a loopback port, read over TCP as a browser on the robot (or through
//! an SSH tunnel) reads it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::{send_lines, Agent};
use crate::util::{self, wait_for, TestDir};

/// The console's address, from the line logbookd logs when it binds.
fn console_addr(agent: &Agent) -> String {
    wait_for("the console's address", Duration::from_secs(20), || {
        let log = agent.log_text();
        let at = log.find("read-only console on http://")?;
        let rest = &log[at + "read-only console on http://".len()..];
        Some(rest[..rest.find('/')?].to_owned())
    })
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// One HTTP/1.1 request with `Host: host`; the answer read to its end.
fn request(addr: &str, method: &str, path: &str, host: &str) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Answer {
        status: head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

fn get(addr: &str, path: &str) -> Answer {
    request(addr, "GET", path, addr)
}

/// The first `href` after `marker` in `html`, unescaped.
fn link_after(html: &str, marker: &str) -> String {
    let at = html
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} in {html}"));
    let before = &html[..at];
    let start = before.rfind("href=\"").unwrap() + 6;
    let end = start + html[start..].find('"').unwrap();
    html[start..end].replace("&#38;", "&").replace("&amp;", "&")
}

/// Opens a session tagged `tag` and sends it an error with markup in it,
/// a line that is not JSON, and 150 info lines; its id.
fn fill(agent: &Agent, tag: &str) -> String {
    let body = serde_json::json!({"tags": [tag], "metadata": {"site": "lab"}}).to_string();
    let opened = agent.ok("POST", "/v1/sessions", Some(&body));
    let id = opened["id"].as_str().unwrap().to_owned();
    let mut lines = vec![
        r#"{"msg":"motor stalled <script>alert(1)</script>","level":"error","module":"drive"}"#
            .to_owned(),
        "this line is not JSON".to_owned(),
    ];
    for i in 0..150 {
        lines.push(format!(
            r#"{{"msg":"tick {i}","level":"info","module":"nav"}}"#
        ));
    }
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    send_lines(agent, &refs);
    agent.flush();
    id
}

#[test]
fn the_console_shows_the_buffer_its_sessions_and_logs() {
    let dir = TestDir::new("agent_console");
    let agent = Agent::start(&dir, &[("LOGBOOK_API_CONSOLE", "127.0.0.1:0")]);
    let addr = console_addr(&agent);

    let id = fill(&agent, "dock <b>");

    // Home: the buffer, the drop of the bad line and why, the session.
    let home = get(&addr, "/");
    assert_eq!(home.status, 200, "{}", home.body);
    assert!(
        home.head
            .contains("content-security-policy: default-src 'none'"),
        "{}",
        home.head
    );
    assert!(home.head.contains("text/html"));
    assert!(
        home.body.contains(&format!("href=\"/sessions/{id}\"")),
        "{}",
        home.body
    );
    assert!(home.body.contains("bad input: "), "{}", home.body);
    assert!(!home.body.contains("<b>"), "tags are escaped");
    // The stylesheet it links is served.
    let css = link_after(&home.body, "\">\n</head>");
    assert!(css.starts_with("/assets/"), "{css}");
    let style = get(&addr, &css);
    assert_eq!(style.status, 200);
    assert!(style.head.contains("text/css") && style.body.contains(".lvl"));

    // The session: its tags, metadata, and a link to its logs.
    let session = get(&addr, &format!("/sessions/{id}"));
    assert_eq!(session.status, 200, "{}", session.body);
    assert!(session.body.contains("dock &#60;b&#62;") || session.body.contains("dock &lt;b&gt;"));
    assert!(session.body.contains("site"));
    let logs = link_after(&session.body, "records</a>");
    assert_eq!(logs, format!("/logs?session={id}"));

    // Its logs: the newest page of 100, and the next one from its link.
    let first = get(&addr, &logs);
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.body.matches("<tr id=\"l").count(), 100);
    assert!(first.body.contains("tick 149"));
    let older = link_after(&first.body, "Older »");
    let second = get(&addr, &older);
    assert_eq!(second.body.matches("<tr id=\"l").count(), 51, "{older}");
    assert!(second.body.contains("stalled") && !second.body.contains("tick 149"));
    assert!(
        !second.body.contains("<script>alert"),
        "log text is escaped"
    );

    // Filters: errors only, with the search words marked.
    let errors = get(
        &addr,
        &format!("/logs?session={id}&level=error&search=stalled"),
    );
    assert_eq!(
        errors.body.matches("<tr id=\"l").count(),
        1,
        "{}",
        errors.body
    );
    assert!(errors.body.contains("<mark>stalled</mark>"));
    assert!(!errors.body.contains("<script>alert"));

    // What the console refuses, each with a page that says why.
    let rebound = request(&addr, "GET", "/", "evil.example");
    assert_eq!(rebound.status, 403);
    assert!(
        rebound.body.contains("answers only to localhost"),
        "{}",
        rebound.body
    );
    assert_eq!(request(&addr, "POST", "/", &addr).status, 405);
    let bad = get(&addr, "/sessions/not-a-session");
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("not a session id"));
    let missing = get(&addr, "/sessions/01930000-0000-7000-8000-000000000000");
    assert_eq!(missing.status, 404);
    let bad_time = get(&addr, "/logs?since=yesterday");
    assert_eq!(bad_time.status, 400);
    assert!(bad_time.body.contains("RFC 3339"), "{}", bad_time.body);
    assert_eq!(get(&addr, "/no/such/page").status, 404);

    // The agent kept running through all of it.
    assert_eq!(
        agent.ok("GET", "/v1/sessions/current", None)["id"],
        id.as_str()
    );
}

#[test]
fn a_console_address_off_the_loopback_is_refused_at_start() {
    let dir = TestDir::new("agent_console_refused");
    let mut agent = Agent::spawn(&dir, &[("LOGBOOK_API_CONSOLE", "0.0.0.0:8900")], &[]);
    let status = wait_for("logbookd to refuse", Duration::from_secs(10), || {
        agent.child.try_wait().unwrap()
    });
    assert!(!status.success());
    let log = agent.log_text();
    assert!(
        log.contains("api.console") && log.contains("not a loopback address"),
        "{log}"
    );
}

/// The console in Chromium (tests/browser/agent_console.mjs): the pages
/// load under their own CSP with no error, links, chips, the search form,
/// permalinks and back/forward work; screenshots under
/// `target/console-screenshots/agent-*.png`.
#[test]
fn agent_console_in_a_browser() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !util::interop_client("node") || !util::interop_client(&chromium) {
        return;
    }
    if !browser_dir.join("node_modules/playwright-core").is_dir() {
        if std::env::var_os("CI").is_some() {
            panic!("playwright-core is not installed: .ci/run runs npm ci in tests/browser");
        }
        eprintln!("SKIPPED: playwright-core is not installed (cd tests/browser && npm ci)");
        return;
    }
    let dir = TestDir::new("agent_console_browser");
    let agent = Agent::start(&dir, &[("LOGBOOK_API_CONSOLE", "127.0.0.1:0")]);
    let addr = console_addr(&agent);
    let id = fill(&agent, "calibration");
    let shots = root.join("target/console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let transcript = dir.join("agent_console.mjs.txt");
    let out_file = std::fs::File::create(&transcript).unwrap();
    let mut child = util::KillOnDrop(
        std::process::Command::new("node")
            .arg("agent_console.mjs")
            .current_dir(&browser_dir)
            .env("CONSOLE_URL", format!("http://{addr}"))
            .env("SESSION_ID", &id)
            .env("CHROMIUM", &chromium)
            .env("SCREENSHOTS", &shots)
            .stdin(std::process::Stdio::null())
            .stdout(out_file.try_clone().unwrap())
            .stderr(out_file)
            .spawn()
            .expect("run node"),
    );
    let out = wait_for("agent_console.mjs to end", Duration::from_secs(300), || {
        child.0.try_wait().unwrap()
    });
    let text = std::fs::read_to_string(&transcript).unwrap();
    assert!(out.success(), "agent_console.mjs failed:\n{text}");
    assert!(text.contains("agent console walk: ok"), "{text}");
}

/// A console port something else holds costs the console, never the
/// agent: it starts, says why there is no console, and takes logs.
#[test]
fn a_console_port_in_use_leaves_the_agent_running_without_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = TestDir::new("agent_console_port_taken");
    let agent = Agent::start(&dir, &[("LOGBOOK_API_CONSOLE", &addr)]);
    wait_for("the console's error", Duration::from_secs(20), || {
        agent
            .log_text()
            .contains(&format!("cannot listen on {addr}"))
            .then_some(())
    });
    send_lines(&agent, &[r#"{"msg":"still logging"}"#]);
    assert_eq!(agent.flush(), 1);
    drop(taken);
}
