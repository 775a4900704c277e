//! The operator console on a real hub: every route refuses without a
//! sign-in, another organization's URLs answer 404, cross-site posts are
//! refused, the security headers are there, the screens show seeded data
//! (escaped), and a Playwright run in headless Chromium clicks through it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use logbook::wire::{Gap, Level, SessionStatus};
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use sha2::Digest;

use super::*;
use crate::util;

/// What [`seed`] put in the hub.
pub struct Seeded {
    pub s1: Uuid,
    pub s2: Uuid,
    pub artifact: Vec<u8>,
}

/// Two sessions of robot-1: a completed one with logs (one of them markup,
/// one an error), a gap, tags and an artifact; a failed one.
pub async fn seed(hub: &HubProc) -> Seeded {
    let (s1, s2) = (session_id(1), session_id(2));
    let mut recs: Vec<_> = (1..=30u64)
        .map(|i| {
            record(
                i,
                Some(s1),
                Level::Info,
                "nav",
                &format!("waypoint {i} reached"),
            )
        })
        .collect();
    recs.push(record(
        31,
        Some(s1),
        Level::Error,
        "motor",
        "Motor stalled on axis 2",
    ));
    recs.push(record(
        32,
        Some(s1),
        Level::Warn,
        "web",
        "<script>alert(1)</script> in a log",
    ));
    recs.push(record(
        33,
        Some(s2),
        Level::Info,
        "nav",
        "second session line",
    ));
    let gap = Gap {
        session_id: Some(s1),
        level: Level::Debug,
        reason: "buffer_full".into(),
        dropped: 12,
    };
    let (st, body) = hub
        .post_batch(&batch(
            vec![
                state(s1, 2, SessionStatus::Completed, &["field-test"]),
                state(s2, 2, SessionStatus::Failed, &[]),
            ],
            recs,
            vec![gap],
        ))
        .await;
    assert_eq!(st, 200, "{body}");
    let artifact: Vec<u8> = (0..5000u32).flat_map(|i| i.to_le_bytes()).collect();
    let url = hub
        .create_upload(s1, "bags/run 1.bin", &artifact, None)
        .await;
    let r = hub
        .http
        .patch(&url)
        .bearer_auth(&hub.device)
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "0")
        .body(artifact.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    Seeded { s1, s2, artifact }
}

/// The status line and headers of one raw request's response (the hub
/// keeps the connection open after it).
fn response_head(addr: &str, request: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).expect("a response");
        assert!(n > 0, "connection closed before a response");
        head.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Extra request headers of a case.
type Headers<'a> = &'a [(&'a str, &'a str)];

/// A client that does not follow redirects, to see them.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Signs in with `key`; returns the `Cookie` header value.
pub(super) async fn sign_in(hub: &HubProc, key: &str) -> String {
    let r = client()
        .post(format!("{}/sign-in", hub.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("key={key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let set = r.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    assert!(!set.contains("Secure"), "plain HTTP gets no Secure: {set}");
    set.split(';').next().unwrap().to_owned()
}

pub(super) async fn get(url: &str, cookie: Option<&str>) -> (u16, HeaderMap, String) {
    let mut req = client().get(url);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let r = req.send().await.unwrap();
    let (st, h) = (r.status().as_u16(), r.headers().clone());
    (st, h, r.text().await.unwrap())
}

async fn post(
    url: &str,
    cookie: Option<&str>,
    body: &str,
    extra: &[(&str, &str)],
) -> (u16, HeaderMap) {
    let mut req = client()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned());
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.headers().clone())
}

/// The CSRF token in a page's forms.
fn csrf_of(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .expect("a form with a csrf token")
        + 19;
    html[at..].split('"').next().unwrap().to_owned()
}

fn tags_of(v: &Value) -> Vec<String> {
    serde_json::from_value(v["tags"].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_console_route_refuses_without_a_sign_in() {
    let hub = HubProc::start("console_refuses");
    let seeded = seed(&hub).await;
    let s = format!("{}/o/{ORG}/{PROJECT}/sessions/{}", hub.url, seeded.s1);
    let pages = [
        format!("{}/o/{ORG}/{PROJECT}/sessions", hub.url),
        format!("{}/o/{ORG}/{PROJECT}/devices", hub.url),
        s.clone(),
        format!("{s}/logs"),
        format!("{s}/logs/export?format=csv"),
        format!("{s}/files.zip"),
        format!("{s}/files/bags/run%201.bin"),
        format!("{s}/timeline"),
        format!("{s}/artifacts"),
        format!("{s}/logs/live"),
    ];
    for cookie in [None, Some("logbook_console=forged")] {
        for url in &pages {
            let (st, h, body) = get(url, cookie).await;
            assert_eq!(st, 303, "{url} {cookie:?}: {body}");
            assert_eq!(h[LOCATION], "/", "{url}");
            assert!(!body.contains("waypoint"), "{url}");
        }
        for path in ["tags", "tags/remove"] {
            let (st, _) = post(&format!("{s}/{path}"), cookie, "tag=x&csrf=x", &[]).await;
            assert_eq!(st, 403, "{path}");
        }
        let (st, _) = post(&format!("{}/sign-out", hub.url), cookie, "csrf=x", &[]).await;
        assert_eq!(st, 403);
    }
    let (_, v) = hub.get(&hub.api(&format!("/sessions/{}", seeded.s1))).await;
    assert_eq!(tags_of(&v), vec!["field-test"]);

    // The sign-in page itself, with the security headers every page has.
    let (st, h, body) = get(&format!("{}/", hub.url), None).await;
    assert_eq!(st, 200);
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["cache-control"], "no-store");
    assert!(body.contains("name=\"key\""));
    // No inline script: every <script> has a src on the hub.
    assert_eq!(
        body.matches("<script").count(),
        body.matches("<script src=\"/assets/").count()
    );

    // Wrong keys do not sign in; device tokens cannot.
    let (st, h) = post(
        &format!("{}/sign-in", hub.url),
        None,
        "key=lbk_op_nope",
        &[],
    )
    .await;
    assert_eq!(st, 401);
    assert!(h.get(SET_COOKIE).is_none());
    let (st, _) = post(
        &format!("{}/sign-in", hub.url),
        None,
        &format!("key={}", hub.device),
        &[],
    )
    .await;
    assert_eq!(st, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screens_show_the_organizations_data_and_tags_change() {
    let hub = HubProc::start("console_screens");
    let seeded = seed(&hub).await;
    let cookie = sign_in(&hub, &hub.operator).await;
    let base = format!("{}/o/{ORG}/{PROJECT}", hub.url);

    // `/` sends a signed-in operator to the sessions screen.
    let (st, h, _) = get(&format!("{}/", hub.url), Some(&cookie)).await;
    assert_eq!(
        (st, h[LOCATION].to_str().unwrap()),
        (303, "/o/acme/warehouse/sessions")
    );

    let (st, h, html) = get(&format!("{base}/sessions"), Some(&cookie)).await;
    assert_eq!(st, 200, "{html}");
    assert!(h["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    assert!(html.contains(&seeded.s1.to_string()) && html.contains(&seeded.s2.to_string()));
    assert!(html.contains("2 matching"), "{html}");
    // Filters are the API's: status and tags narrow the list.
    let (_, _, html) = get(&format!("{base}/sessions?status=failed"), Some(&cookie)).await;
    assert!(html.contains(&seeded.s2.to_string()) && !html.contains(&seeded.s1.to_string()));
    let (_, _, html) = get(
        &format!("{base}/sessions?tag=field-test&has_errors=true"),
        Some(&cookie),
    )
    .await;
    assert!(html.contains(&seeded.s1.to_string()) && !html.contains(&seeded.s2.to_string()));
    let (_, _, html) = get(
        &format!(
            "{base}/sessions?package=perception%402.1.0&metadata=%7B%22site%22%3A%22paris%22%7D"
        ),
        Some(&cookie),
    )
    .await;
    assert!(html.contains("0 matching"), "{html}");
    assert!(
        html.contains("value=\"{&#34;site&#34;:&#34;paris&#34;}\"") || html.contains("paris"),
        "{html}"
    );
    let (st, _, html) = get(&format!("{base}/sessions?status=done"), Some(&cookie)).await;
    assert_eq!(st, 400);
    assert!(
        html.contains("status: expected active, completed or failed"),
        "{html}"
    );
    // The search box: a piece of one session's id finds that one only.
    let id2 = seeded.s2.to_string();
    let (_, _, html) = get(
        &format!(
            "{base}/sessions?search={}",
            &id2[id2.len() - 8..].to_uppercase()
        ),
        Some(&cookie),
    )
    .await;
    assert!(html.contains(&id2) && !html.contains(&seeded.s1.to_string()));
    assert!(html.contains("1 matching"), "{html}");
    // Cursor pages: one per page, the second page links on. The first
    // page reloads its rows (running sessions move); a later one stays.
    let (_, _, html) = get(&format!("{base}/sessions?page_size=1"), Some(&cookie)).await;
    assert!(html.contains("rel=\"next\""), "{html}");
    assert!(html.contains("hx-trigger=\"every 5s\""), "{html}");
    let next = html
        .split("rel=\"next\"")
        .next()
        .and_then(|h| h.rsplit("href=\"").next())
        .and_then(|h| h.split('"').next())
        .unwrap()
        .replace("&#38;", "&");
    let (st, _, html) = get(&format!("{}{next}", hub.url), Some(&cookie)).await;
    assert_eq!(st, 200, "{next}: {html}");
    assert!(!html.contains("hx-trigger=\"every 5s\""), "{html}");

    let s = format!("{base}/sessions/{}", seeded.s1);
    let (st, _, html) = get(&s, Some(&cookie)).await;
    assert_eq!(st, 200);
    for want in [
        "field-test",
        "buffer_full",
        "bags/run 1.bin",
        "19.5 KiB",
        "perception@2.1.0",
        "berlin",
    ] {
        assert!(html.contains(want), "{want} in {html}");
    }
    // Devices: robot-1 with its last batch; no session of it runs.
    let (st, _, html) = get(&format!("{base}/devices"), Some(&cookie)).await;
    assert_eq!(st, 200);
    assert!(
        html.contains("robot-1") && html.contains("warehouse-robot-01"),
        "{html}"
    );
    assert!(
        html.contains("/o/acme/warehouse/sessions?device_id=robot-1"),
        "{html}"
    );

    // The timeline's data: the session's records per level over its time.
    let (st, _, json) = get(&format!("{s}/timeline"), Some(&cookie)).await;
    assert_eq!(st, 200, "{json}");
    let t: Value = serde_json::from_str(&json).unwrap();
    let total = |level: &str| -> u64 {
        let series = t["series"].as_array().unwrap();
        let s = series.iter().find(|s| s["level"] == level).unwrap();
        s["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        (total("info"), total("warn"), total("error"), total("debug")),
        (30, 1, 1, 0)
    );
    assert_eq!(t["start_ns"], at(0));
    let (st, _, _) = get(
        &format!("{base}/sessions/{}", session_id(99)),
        Some(&cookie),
    )
    .await;
    assert_eq!(st, 404);

    // Logs: escaped markup, marked search matches, pages, exports.
    let (_, _, html) = get(&format!("{s}/logs"), Some(&cookie)).await;
    assert!(
        html.contains("&#60;script&#62;alert(1)") || html.contains("&lt;script&gt;alert(1)"),
        "{html}"
    );
    assert!(!html.contains("<script>alert"));
    assert!(html.contains("32</span> matching"), "{html}");
    let (_, _, html) = get(&format!("{s}/logs?search=stalled"), Some(&cookie)).await;
    assert!(
        html.contains("<mark>stalled</mark>") && html.contains(">1</span> matching"),
        "{html}"
    );
    let (_, _, html) = get(&format!("{s}/logs?level=error"), Some(&cookie)).await;
    assert!(
        html.contains("Motor") && !html.contains("waypoint"),
        "{html}"
    );
    let (_, _, html) = get(&format!("{s}/logs?limit=10"), Some(&cookie)).await;
    assert_eq!(html.matches("<tr id=\"l").count(), 10);
    assert!(
        html.contains("before=23"),
        "the next page starts below seq 23: {html}"
    );
    let (st, h, csv) = get(
        &format!("{s}/logs/export?format=csv&level=error"),
        Some(&cookie),
    )
    .await;
    assert_eq!(st, 200);
    assert!(h["content-type"].to_str().unwrap().starts_with("text/csv"));
    assert_eq!(csv.lines().count(), 2, "{csv}");
    let r = client()
        .get(format!("{s}/files/bags/run%201.bin"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-security-policy"], "sandbox");
    assert_eq!(r.bytes().await.unwrap(), seeded.artifact);

    // Tags: POST with the page's CSRF token, read back through the API.
    let (_, _, html) = get(&s, Some(&cookie)).await;
    let token = csrf_of(&html);
    let (st, h) = post(
        &format!("{s}/tags"),
        Some(&cookie),
        &format!("csrf={token}&tag=reviewed"),
        &[],
    )
    .await;
    assert_eq!(st, 303);
    assert_eq!(
        h[LOCATION].to_str().unwrap(),
        format!("/o/acme/warehouse/sessions/{}", seeded.s1)
    );
    let (_, v) = hub.get(&hub.api(&format!("/sessions/{}", seeded.s1))).await;
    assert_eq!(tags_of(&v), vec!["field-test", "reviewed"]);
    let (st, _) = post(
        &format!("{s}/tags"),
        Some(&cookie),
        &format!("csrf={token}&tag=%20"),
        &[],
    )
    .await;
    assert_eq!(st, 400);
    let (st, _) = post(
        &format!("{s}/tags/remove"),
        Some(&cookie),
        &format!("csrf={token}&tag=field-test"),
        &[("origin", &hub.url)],
    )
    .await;
    assert_eq!(st, 303);
    let (_, v) = hub.get(&hub.api(&format!("/sessions/{}", seeded.s1))).await;
    assert_eq!(tags_of(&v), vec!["reviewed"]);

    // Sign-out ends the server-side sign-in: the old cookie is refused.
    let (st, h) = post(
        &format!("{}/sign-out", hub.url),
        Some(&cookie),
        &format!("csrf={token}"),
        &[],
    )
    .await;
    assert_eq!(st, 303);
    assert!(h[SET_COOKIE].to_str().unwrap().contains("Max-Age=0"));
    let (st, _, _) = get(&format!("{base}/sessions"), Some(&cookie)).await;
    assert_eq!(st, 303);

    // Signing in again from the same browser ends its earlier sign-in.
    let first = sign_in(&hub, &hub.operator).await;
    let r = client()
        .post(format!("{}/sign-in", hub.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("cookie", &first)
        .body(format!("key={}", hub.operator))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let second = r.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(get(&format!("{base}/sessions"), Some(&first)).await.0, 303);
    assert_eq!(get(&format!("{base}/sessions"), Some(&second)).await.0, 200);

    // Over TLS (as a proxy reports it) the cookie is Secure.
    let r = client()
        .post(format!("{}/sign-in", hub.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .body(format!("key={}", hub.operator))
        .send()
        .await
        .unwrap();
    assert!(r.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .ends_with("; Secure"));
}

/// Every console page of acme/warehouse's data, for the 404 checks.
fn acme_pages(hub: &HubProc, seeded: &Seeded) -> Vec<String> {
    let s = format!("{}/o/{ORG}/{PROJECT}/sessions/{}", hub.url, seeded.s1);
    vec![
        format!("{}/o/{ORG}/{PROJECT}/sessions", hub.url),
        format!("{}/o/{ORG}/{PROJECT}/devices", hub.url),
        format!("{s}/logs"),
        format!("{s}/logs/export"),
        format!("{s}/files.zip"),
        format!("{s}/files/bags/run%201.bin"),
        format!("{s}/timeline"),
        format!("{s}/artifacts"),
        format!("{s}/logs/live"),
        s,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_key_sees_its_project_and_an_organization_key_picks_one() {
    let hub = HubProc::start("console_projects");
    let seeded = seed(&hub).await;
    // A key made for project "lab" lands on lab's sessions; warehouse's
    // pages are 404 to it, as if they did not exist.
    let lab = sign_in(&hub, &hub.token(ORG, "lab", None)).await;
    let (st, h, _) = get(&format!("{}/", hub.url), Some(&lab)).await;
    assert_eq!(
        (st, h[LOCATION].to_str().unwrap()),
        (303, "/o/acme/lab/sessions")
    );
    let (st, _, html) = get(&format!("{}/o/{ORG}/lab/sessions", hub.url), Some(&lab)).await;
    assert_eq!(st, 200, "{html}");
    assert!(html.contains("0 matching"), "{html}");
    assert!(
        !html.contains("href=\"/o/acme\""),
        "no projects link: {html}"
    );
    let s = format!("{}/o/{ORG}/{PROJECT}/sessions/{}", hub.url, seeded.s1);
    for url in acme_pages(&hub, &seeded) {
        let (st, _, body) = get(&url, Some(&lab)).await;
        assert_eq!(st, 404, "{url}");
        assert!(!body.contains("waypoint"), "{url}");
    }
    let (st, _, html) = get(&format!("{}/o/{ORG}", hub.url), Some(&lab)).await;
    assert_eq!(st, 200);
    assert!(
        html.contains("/o/acme/lab/sessions") && !html.contains("/o/acme/warehouse/"),
        "{html}"
    );

    // An organization-wide key lands on the projects, and opens either.
    let all = sign_in(&hub, &hub.org_key(ORG)).await;
    let (st, h, _) = get(&format!("{}/", hub.url), Some(&all)).await;
    assert_eq!((st, h[LOCATION].to_str().unwrap()), (303, "/o/acme"));
    let (st, _, html) = get(&format!("{}/o/{ORG}", hub.url), Some(&all)).await;
    assert_eq!(st, 200, "{html}");
    let (at_lab, at_warehouse) = (
        html.find("href=\"/o/acme/lab/sessions\"")
            .expect("lab listed"),
        html.find("href=\"/o/acme/warehouse/sessions\"")
            .expect("warehouse listed"),
    );
    assert!(at_lab < at_warehouse, "by name: {html}");
    let (st, _, html) = get(&s, Some(&all)).await;
    assert_eq!(st, 200);
    assert!(
        html.contains("href=\"/o/acme\""),
        "the org links to its projects: {html}"
    );
    let (st, _, _) = get(&format!("{}/o/globex", hub.url), Some(&all)).await;
    assert_eq!(st, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_organizations_get_404_and_cross_site_posts_are_refused() {
    let hub = HubProc::start("console_cross");
    let seeded = seed(&hub).await;
    let other = hub.token("globex", "warehouse", None);
    let other_cookie = sign_in(&hub, &other).await;
    let s = format!("{}/o/{ORG}/{PROJECT}/sessions/{}", hub.url, seeded.s1);
    for url in acme_pages(&hub, &seeded) {
        let (st, _, body) = get(&url, Some(&other_cookie)).await;
        assert_eq!(st, 404, "{url}");
        assert!(
            !body.contains("waypoint") && !body.contains(&seeded.s1.to_string()),
            "{url}"
        );
    }
    // Its own organization's list has none of acme's sessions.
    let (st, _, html) = get(
        &format!("{}/o/globex/warehouse/sessions", hub.url),
        Some(&other_cookie),
    )
    .await;
    assert_eq!(st, 200);
    assert!(
        html.contains("0 matching") && !html.contains(&seeded.s1.to_string()),
        "{html}"
    );
    let other_token = csrf_of(&html);
    let (st, _) = post(
        &format!("{s}/tags"),
        Some(&other_cookie),
        &format!("csrf={other_token}&tag=x"),
        &[],
    )
    .await;
    assert_eq!(st, 404);

    // acme's own operator, but the post is cross-site or lacks the token.
    let cookie = sign_in(&hub, &hub.operator).await;
    let (_, _, html) = get(&s, Some(&cookie)).await;
    let token = csrf_of(&html);
    let evil = [("origin", "http://evil.example")];
    let cross = [("sec-fetch-site", "cross-site")];
    let refused: [(&str, String, Headers); 5] = [
        ("no token", "tag=x".into(), &[]),
        ("wrong token", "tag=x&csrf=nope".into(), &[]),
        (
            "another sign-in's token",
            format!("tag=x&csrf={other_token}"),
            &[],
        ),
        ("foreign origin", format!("tag=x&csrf={token}"), &evil),
        ("cross-site fetch", format!("tag=x&csrf={token}"), &cross),
    ];
    for (what, body, extra) in refused {
        let (st, _) = post(&format!("{s}/tags"), Some(&cookie), &body, extra).await;
        assert_eq!(st, 403, "{what}");
    }
    // A WebSocket handshake from another site (cross-site WebSocket
    // hijacking) is refused before the upgrade.
    let path = format!("/o/{ORG}/{PROJECT}/sessions/{}/logs/live", seeded.s1);
    let handshake = |origin: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nOrigin: {origin}\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            addr = hub.addr
        )
    };
    let r = response_head(&hub.addr, &handshake("http://evil.example"));
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");

    let (st, _) = post(
        &format!("{}/sign-in", hub.url),
        None,
        &format!("key={}", hub.operator),
        &evil,
    )
    .await;
    assert_eq!(st, 403, "sign-in from another site");
    let (_, v) = hub.get(&hub.api(&format!("/sessions/{}", seeded.s1))).await;
    assert_eq!(tags_of(&v), vec!["field-test"]);
}

/// The artifact the walkthrough uploads in two halves (64 KiB).
const FRONT_CAMERA: &[u8] = &[0x5a; 64 << 10];

/// One tus PATCH with the device token, which must be taken whole.
async fn tus_patch(hub: &HubProc, url: &str, offset: u64, data: &[u8]) {
    let r = hub
        .http
        .patch(url)
        .bearer_auth(&hub.device)
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", offset.to_string())
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "PATCH at {offset}");
}

/// Runs `tests/browser/console.mjs` (Playwright in headless Chromium)
/// against a seeded hub; screenshots go to `target/console-screenshots/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_walkthrough() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let have_playwright = browser_dir.join("node_modules/playwright-core").is_dir();
    if !util::interop_client("node") || !util::interop_client(&chromium) {
        return;
    }
    if !have_playwright {
        if std::env::var_os("CI").is_some() {
            panic!("playwright-core is not installed: .ci/run runs npm ci in tests/browser");
        }
        eprintln!("SKIPPED: playwright-core is not installed (cd tests/browser && npm ci)");
        return;
    }
    let hub = HubProc::start("console_browser");
    let seeded = seed(&hub).await;
    let other = hub.token("globex", "warehouse", None);
    let shots = root.join("target/console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let live = session_id(3);
    let sha = hex::encode(sha2::Sha256::digest(&seeded.artifact));
    let mut child = Command::new("node")
        .arg("console.mjs")
        .current_dir(&browser_dir)
        .env("HUB_URL", &hub.url)
        .env("OPERATOR_KEY", &hub.operator)
        .env("OTHER_KEY", other)
        .env("SESSION_ID", seeded.s1.to_string())
        .env("FAILED_SESSION_ID", seeded.s2.to_string())
        .env("LIVE_SESSION_ID", live.to_string())
        .env("ARTIFACT_SHA256", sha)
        .env("CHROMIUM", chromium)
        .env("SCREENSHOTS", shots)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Answer the script's requests (batches only a device can post) until
    // it ends.
    let mut transcript = String::new();
    let mut upload_url: Option<String> = None;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(300);
    while let Some(line) = tokio::time::timeout_at(deadline, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("console.mjs still running after 300 s:\n{transcript}"))
    {
        transcript.push_str(&line);
        transcript.push('\n');
        // An artifact that uploads while the session screen is open: half
        // of it first (a tus PATCH of part of the bytes), then the rest.
        let half = FRONT_CAMERA.len() / 2;
        match line.as_str() {
            "upload: half of cam/front.mp4" => {
                let url = hub
                    .create_upload(seeded.s1, "cam/front.mp4", FRONT_CAMERA, None)
                    .await;
                tus_patch(&hub, &url, 0, &FRONT_CAMERA[..half]).await;
                upload_url = Some(url);
                writeln!(stdin, "ok").unwrap();
                continue;
            }
            "upload: the rest of cam/front.mp4" => {
                let url = upload_url.take().expect("the upload was started");
                tus_patch(&hub, &url, half as u64, &FRONT_CAMERA[half..]).await;
                writeln!(stdin, "ok").unwrap();
                continue;
            }
            _ => {}
        }
        let batch = match line.as_str() {
            "live: start a session" => Some(batch(
                vec![state(live, 1, SessionStatus::Active, &[])],
                vec![record(
                    40,
                    Some(live),
                    Level::Info,
                    "nav",
                    "first live line",
                )],
                vec![],
            )),
            "live: send a line" => Some(batch(
                vec![],
                vec![record(
                    41,
                    Some(live),
                    Level::Warn,
                    "nav",
                    "a live line <b>bold</b>",
                )],
                vec![],
            )),
            _ => None,
        };
        if let Some(b) = batch {
            let (st, body) = hub.post_batch(&b).await;
            assert_eq!(st, 200, "{body}");
            writeln!(stdin, "ok").unwrap();
        }
    }
    drop(stdin);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "console.mjs failed ({})\nstdout:\n{transcript}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        transcript.contains("console walkthrough: ok"),
        "{transcript}"
    );
    eprint!("{transcript}");
    let (_, v) = hub.get(&hub.api(&format!("/sessions/{}", seeded.s1))).await;
    assert!(tags_of(&v).contains(&"browser-reviewed".to_owned()), "{v}");
}
