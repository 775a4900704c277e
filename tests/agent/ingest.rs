//! JSON-lines ingest end to end: logger dialects from concurrent clients,
//! trusted fields, and bad input that must not disturb anyone.

use std::io::Write;

use super::{send_lines, Agent};
use crate::util::TestDir;

/// One line per logger dialect: (line, level, module, message).
const DIALECTS: &[(&str, &str, &str, &str)] = &[
    (
        r#"{"timestamp":"2024-05-01T12:00:00.5Z","level":"INFO","fields":{"message":"tracing","k":1},"target":"nav::plan"}"#,
        "INFO",
        "nav::plan",
        "tracing",
    ),
    (
        r#"{"time":"2024-05-01T12:00:00Z","level":"WARN","msg":"slog","temp":80}"#,
        "WARN",
        "",
        "slog",
    ),
    (
        r#"{"level":"error","ts":1714564800.25,"logger":"drive","msg":"zap"}"#,
        "ERROR",
        "drive",
        "zap",
    ),
    (
        r#"{"level":20,"time":1714564800000,"pid":1,"hostname":"h","msg":"pino"}"#,
        "DEBUG",
        "",
        "pino",
    ),
    (
        r#"{"name":"arm","hostname":"h","pid":1,"level":60,"msg":"bunyan","time":"2024-05-01T12:00:00.000Z","v":0}"#,
        "FATAL",
        "arm",
        "bunyan",
    ),
    (
        r#"{"event":"structlog","level":"warning","timestamp":"2024-05-01T12:00:00Z"}"#,
        "WARN",
        "",
        "structlog",
    ),
    (
        r#"{"message":"pyjson","levelname":"DEBUG","name":"robot.io"}"#,
        "DEBUG",
        "robot.io",
        "pyjson",
    ),
    (
        r#"{"msg":"syslognum","level":3,"module":"m"}"#,
        "ERROR",
        "m",
        "syslognum",
    ),
    (
        r#"{"msg":"sev","severity":"trace","metadata":{"x":"y"}}"#,
        "TRACE",
        "",
        "sev",
    ),
];

#[test]
fn dialects_from_concurrent_clients_with_trusted_fields() {
    let dir = TestDir::new("dialects_concurrent");
    let agent = Agent::start(&dir, &[]);
    let clients = 6;
    let per_client = 200;
    std::thread::scope(|s| {
        for c in 0..clients {
            let agent = &agent;
            s.spawn(move || {
                let mut sock = agent.ingest();
                for i in 0..per_client {
                    let (line, ..) = DIALECTS[(c + i) % DIALECTS.len()];
                    // Tag each line so the test can find it again.
                    let line = line.replacen('{', &format!("{{\"client\":{c},\"i\":{i},"), 1);
                    sock.write_all(line.as_bytes()).unwrap();
                    sock.write_all(b"\n").unwrap();
                }
            });
        }
    });
    agent.flush();
    let all = agent.logs("");
    assert_eq!(all.len(), clients * per_client);
    let me = std::process::id() as u64;
    for r in &all {
        let c = r["metadata"]["client"].as_u64().unwrap() as usize;
        let i = r["metadata"]["i"].as_u64().unwrap() as usize;
        let (_, level, module, message) = DIALECTS[(c + i) % DIALECTS.len()];
        assert_eq!(r["level"], level, "{r}");
        assert_eq!(r["module"], module, "{r}");
        assert_eq!(r["message"], message, "{r}");
        assert_eq!(r["pid"].as_u64(), Some(me), "trusted pid of {r}");
        assert_eq!(
            r["uid"].as_u64(),
            Some(rustix::process::getuid().as_raw() as u64)
        );
        assert_eq!(
            r["gid"].as_u64(),
            Some(rustix::process::getgid().as_raw() as u64)
        );
        assert!(r["process"].as_str().is_some_and(|p| !p.is_empty()), "{r}");
        assert!(r["session_id"].is_null());
    }
    // seq strictly increasing
    let seqs: Vec<u64> = all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    // A client-supplied pid stays metadata; the trusted one wins.
    let pino = all.iter().find(|r| r["message"] == "pino").unwrap();
    assert_eq!(pino["metadata"]["pid"], 1);
    // Filters: level at-or-above, module with children, search, time.
    let warn_up = agent.logs("level=warn");
    assert!(warn_up
        .iter()
        .all(|r| ["WARN", "ERROR", "FATAL"].contains(&r["level"].as_str().unwrap())));
    assert_eq!(
        warn_up.len(),
        all.iter()
            .filter(|r| ["WARN", "ERROR", "FATAL"].contains(&r["level"].as_str().unwrap()))
            .count()
    );
    assert!(!agent.logs("module=nav").is_empty());
    assert!(agent
        .logs("module=nav")
        .iter()
        .all(|r| r["module"] == "nav::plan"));
    assert!(agent
        .logs("search=bunya")
        .iter()
        .all(|r| r["message"] == "bunyan"));
    let since = agent.logs("since=2024-05-01T12:00:00.4Z&until=2024-05-01T12:00:00.6Z");
    assert!(!since.is_empty() && since.iter().all(|r| r["message"] == "tracing"));
}

#[test]
fn bad_input_is_counted_and_never_disturbs_anyone() {
    let dir = TestDir::new("bad_input");
    let agent = Agent::start(&dir, &[("LOGBOOK_INGEST_MAX_RECORD_BYTES", "1KiB")]);
    // A bystander connection that must survive everything.
    let mut bystander = agent.ingest();
    bystander.write_all(b"{\"msg\":\"bystander-1\"}\n").unwrap();

    let mut s = agent.ingest();
    let huge = "y".repeat(10_000);
    let big = "x".repeat(3000);
    let mut input: Vec<u8> = Vec::new();
    input.extend_from_slice(b"{\"msg\":\"good-1\"}\n");
    input.extend_from_slice(b"not json at all\n");
    input.extend_from_slice(b"[1,2,3]\n");
    input.extend_from_slice(b"{\"msg\":\"bad utf8 \xff\xfe\"}\n");
    input.extend_from_slice(b"{\"msg\":\"good-2\"}\n");
    input.extend_from_slice(format!("{{\"msg\":\"big-{big}\",\"level\":\"error\"}}\n").as_bytes());
    input.extend_from_slice(format!("{{\"msg\":\"huge-{huge}\"}}\n").as_bytes());
    input.extend_from_slice(b"\n   \n{\"msg\":\"good-3\"}\n");
    s.write_all(&input).unwrap();
    bystander.write_all(b"{\"msg\":\"bystander-2\"}\n").unwrap();
    agent.flush();

    let msgs: Vec<String> = agent
        .logs("")
        .iter()
        .map(|r| r["message"].as_str().unwrap().to_owned())
        .collect();
    for want in ["bystander-1", "good-1", "good-2", "good-3", "bystander-2"] {
        assert!(
            msgs.iter().any(|m| m == want),
            "{want} missing from {msgs:?}"
        );
    }
    let big = agent.logs("search=big-");
    assert_eq!(big.len(), 1);
    let m = big[0]["message"].as_str().unwrap();
    assert!(m.ends_with("…[truncated]") && m.len() <= 1024, "{m}");
    assert_eq!(big[0]["level"], "ERROR");
    let huge = agent.logs("search=huge-");
    assert_eq!(huge.len(), 1);
    assert!(huge[0]["message"]
        .as_str()
        .unwrap()
        .ends_with("…[truncated]"));

    let st = agent.status();
    assert_eq!(st["ingest"]["bad"]["not_json"], 1, "{st}");
    assert_eq!(st["ingest"]["bad"]["not_object"], 1, "{st}");
    assert_eq!(st["ingest"]["bad"]["invalid_utf8"], 1, "{st}");
    assert_eq!(st["ingest"]["truncated"], 2, "{st}");

    // Both connections still work after all that.
    s.write_all(b"{\"msg\":\"after-bad\"}\n").unwrap();
    bystander.write_all(b"{\"msg\":\"bystander-3\"}\n").unwrap();
    agent.flush();
    assert_eq!(agent.logs("search=after-bad").len(), 1);
    assert_eq!(agent.logs("search=bystander-3").len(), 1);

    // The metrics show the same counters.
    let (code, metrics) = agent.api("GET", "/metrics", None);
    assert_eq!(code, 200);
    let text = metrics.as_str().unwrap();
    assert!(
        text.contains("logbook_ingest_records_total{outcome=\"bad\",reason=\"not_json\"} 1"),
        "{text}"
    );

    // Bad API input gets clear errors and the agent keeps serving.
    let (code, body) = agent.api("GET", "/v1/logs?level=loud", None);
    assert_eq!(code, 400);
    assert_eq!(body["error"]["code"], "invalid");
    let (code, _) = agent.api("POST", "/v1/sessions", Some("{not json"));
    assert_eq!(code, 400);
    let (code, body) = agent.api("GET", "/v1/sessions/nope", None);
    assert_eq!(code, 400, "{body}");
    assert_eq!(agent.api("GET", "/healthz", None).0, 200);
}

#[test]
fn client_dropped_counts_as_a_gap() {
    let dir = TestDir::new("client_dropped");
    let agent = Agent::start(&dir, &[]);
    send_lines(&agent, &[r#"{"msg":"back again","logbook_dropped":17}"#]);
    agent.flush();
    let st = agent.status();
    let gap = &st["gaps"][0];
    assert_eq!(gap["reason"], "client_dropped", "{st}");
    assert_eq!(gap["dropped"], 17);
    assert_eq!(agent.logs("search=back%20again").len(), 1);
    // The CLI's human summary says the same.
    let out = crate::util::run_ok(agent.cli().arg("status"));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("gap       17 info records client_dropped (session none)"),
        "{text}"
    );
    assert!(
        text.contains("records   1 stored (0 synced, 1 unsynced)"),
        "{text}"
    );
    assert!(
        text.contains("device    ") && text.contains("(test-device)"),
        "{text}"
    );
}
