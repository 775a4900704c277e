//! A hostile HTTP client at every hub route: malformed requests, oversized
//! headers, path tricks (`..`, encoded slashes, NUL), bad query values,
//! gzip and msgpack bombs. Every request the router sees gets a 4xx with
//! the JSON `ErrorBody`; what hyper refuses before the router (a request
//! that is not HTTP, headers over its limit) gets a bare 4xx or a closed
//! connection. After each, a good request still succeeds.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use logbook::wire::{Level, SessionStatus};
use serde_json::Value;

use super::*;

/// One raw exchange: the status and the body (de-chunked), or `None`
/// when the hub closed the connection without an answer.
fn exchange(addr: &str, request: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The hub may answer and close before it read everything: a reset
    // while writing is an answer too.
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status: u16 = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let at = out.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = text[..at].to_ascii_lowercase();
    let mut body = out[at..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut plain = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..eol]).ok()?.trim(), 16).ok()?;
            if size == 0 {
                break;
            }
            plain.extend_from_slice(rest.get(eol + 2..eol + 2 + size)?);
            rest = rest.get(eol + 4 + size..)?;
        }
        body = plain;
    }
    Some((status, body))
}

fn get(target: &str, token: &str) -> Vec<u8> {
    format!(
        "GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// Asserts a 4xx with the JSON error body.
fn refused_json(what: &str, answer: Option<(u16, Vec<u8>)>) {
    let (status, body) = answer.unwrap_or_else(|| panic!("{what}: no answer"));
    assert!((400..500).contains(&status), "{what}: status {status}");
    let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "{what}: {status} without a JSON body ({e}): {:?}",
            String::from_utf8_lossy(&body)
        )
    });
    assert!(
        v["error"]["code"].is_string() && v["error"]["message"].is_string(),
        "{what}: {v}"
    );
}

/// The hub still serves: a good request succeeds.
fn still_serving(hub: &HubProc, what: &str) {
    let good = get(
        "/api/v1/organizations/acme/projects/warehouse/sessions",
        &hub.operator,
    );
    let (status, _) =
        exchange(&hub.addr, &good).unwrap_or_else(|| panic!("after {what}: no answer"));
    assert_eq!(status, 200, "after {what}");
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn post(target: &str, token: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n{headers}\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[test]
fn a_hostile_client_gets_4xx_json_errors_and_the_hub_keeps_serving() {
    let hub = HubProc::start_with(
        "hub_hostile",
        &[
            ("LOGBOOK_INGEST_MAX_BODY_BYTES", "1MiB"),
            ("LOGBOOK_INGEST_MAX_DECOMPRESSED_BYTES", "4MiB"),
        ],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = session_id(1);
    let (st, _) = rt.block_on(hub.post_batch(&batch(
        vec![state(s, 1, SessionStatus::Active, &["t"])],
        vec![record(1, Some(s), Level::Info, "m", "hello")],
        vec![],
    )));
    assert_eq!(st, 200);
    let p = "/api/v1/organizations/acme/projects/warehouse";
    let op = hub.operator.clone();

    // Every operator route, each with ids and paths that are no id, and
    // query values that do not parse.
    let bad_ids = [
        "not-a-uuid",
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e",
        "%00",
        &"f".repeat(4000),
    ];
    let mut cases: Vec<String> = Vec::new();
    for id in bad_ids {
        for tail in [
            "",
            "/logs",
            "/logs/export",
            "/marks",
            "/marks/export",
            "/files",
            "/files/download",
            "/files/a.txt",
        ] {
            cases.push(format!("{p}/sessions/{id}{tail}"));
        }
    }
    for q in [
        "limit=abc",
        "limit=-1",
        "limit=99999999999999999999999",
        "level=bogus",
        "since=not-a-time",
        "after=x",
        "search=a%00b",
    ] {
        for route in [
            format!("/sessions?{q}"),
            format!("/sessions/{s}/logs?{q}"),
            format!("/sessions/{s}/logs/export?{q}"),
            format!("/devices/{DEVICE}/logs?{q}"),
            format!("/marks?{q}"),
            format!("/devices?{q}"),
        ] {
            // Not every route reads every parameter: only those that do.
            cases.push(format!("{p}{route}"));
        }
    }
    for path in [
        "../../../etc/passwd",
        "%2e%2e/%2e%2e/etc/passwd",
        "a%2F..%2F..%2Fsecret",
        "%00",
        "/etc/passwd",
    ] {
        cases.push(format!("{p}/sessions/{s}/files/{path}"));
    }
    cases.push(format!("{p}/devices/..%2F..%2Fx/logs"));
    cases.push(format!("{p}/devices/%00/logs"));
    cases.push("/api/v1/organizations/..%2Facme/projects/warehouse/sessions".into());
    let mut checked = 0;
    for target in &cases {
        let answer = exchange(&hub.addr, &get(target, &op));
        if let Some((200, _)) = answer {
            // A route that does not read this parameter answers as usual.
            assert!(target.contains('?'), "{target}: 200");
            continue;
        }
        refused_json(target, answer);
        checked += 1;
    }
    still_serving(&hub, "bad ids, paths and queries");
    eprintln!(
        "{checked} of {} hostile GETs refused with a JSON error",
        cases.len()
    );

    // Ingest: bombs and garbage, as the device.
    let batches = "/api/v1/ingest/batches";
    let msgpack = "Content-Type: application/msgpack\r\nContent-Encoding: gzip\r\n";
    // A msgpack array that claims 4 billion records, in a few bytes.
    let claim = gzip(b"\xdd\xff\xff\xff\xff\x01\x02");
    // A map nested 100,000 deep.
    let deep = gzip(&vec![0x81u8; 100_000]);
    for (what, body) in [
        ("gzip bomb", gzip(&vec![0u8; 16 << 20])),
        ("msgpack length bomb", claim),
        ("msgpack nesting bomb", deep),
        ("truncated gzip", gzip(b"\x93\x01\x02\x03")[..10].to_vec()),
    ] {
        refused_json(
            what,
            exchange(&hub.addr, &post(batches, &hub.device, msgpack, &body)),
        );
        still_serving(&hub, what);
    }
    // tus: hostile headers on creation and on a chunk.
    let uploads = "/api/v1/uploads";
    for (what, headers) in [
        ("no Upload-Length", "Tus-Resumable: 1.0.0\r\n".to_owned()),
        ("negative Upload-Length", "Tus-Resumable: 1.0.0\r\nUpload-Length: -5\r\n".to_owned()),
        ("huge Upload-Length", "Tus-Resumable: 1.0.0\r\nUpload-Length: 99999999999999999999999\r\n".to_owned()),
        (
            "metadata not base64",
            "Tus-Resumable: 1.0.0\r\nUpload-Length: 5\r\nUpload-Metadata: path !!!,session ???\r\n".to_owned(),
        ),
        (
            "path escaping the session",
            format!(
                "Tus-Resumable: 1.0.0\r\nUpload-Length: 5\r\nUpload-Metadata: session {},path {}\r\n",
                b64(s.to_string().as_bytes()),
                b64(b"../../etc/passwd")
            ),
        ),
        ("wrong tus version", "Tus-Resumable: 0.9\r\nUpload-Length: 5\r\n".to_owned()),
    ] {
        refused_json(what, exchange(&hub.addr, &post(uploads, &hub.device, &headers, b"")));
        still_serving(&hub, what);
    }

    // What hyper refuses before any route: a bare 4xx or a closed
    // connection, never a crash.
    let huge_header = format!(
        "GET {p}/sessions HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(512 << 10)
    );
    let many_headers = format!(
        "GET {p}/sessions HTTP/1.1\r\nHost: x\r\n{}Connection: close\r\n\r\n",
        (0..2000)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    for (what, raw) in [
        ("not HTTP", b"HELLO THERE\r\n\r\n".to_vec()),
        (
            "binary noise",
            (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
        ),
        ("HTTP/9.9", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n".to_vec()),
        (
            "header without a colon",
            format!("GET {p}/sessions HTTP/1.1\r\nHost x\r\n\r\n").into_bytes(),
        ),
        (
            "NUL in the target",
            format!("GET {p}/sess\0ions HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes(),
        ),
        ("a header of 512 KiB", huge_header.into_bytes()),
        ("2,000 headers", many_headers.into_bytes()),
        (
            "a body longer than its Content-Length",
            format!("POST {batches} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nabcdefgh")
                .into_bytes(),
        ),
        (
            "a bad chunk size",
            format!(
                "POST {batches} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
            )
            .into_bytes(),
        ),
    ] {
        if let Some((status, _)) = exchange(&hub.addr, &raw) {
            assert!((400..500).contains(&status), "{what}: status {status}");
        }
        still_serving(&hub, what);
    }
}
