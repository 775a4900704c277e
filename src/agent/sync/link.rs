//! The agent's one link to the hub, used by the batch and the artifact
//! uploader alike: the HTTP client, the hub URL and the device token on
//! every request (both replaced by a reload, see [`Remote`]),
//! the share of the bandwidth cap, and what happens after a failure —
//! backoff with full jitter and a cap, the hub's `Retry-After`, a TCP probe
//! that ends the wait once an unreachable hub is back, and parking on a
//! refused token until a new one arrives — reported as link state.
//!
//! Each uploader owns one `Link` (its own backoff) and says what an answer
//! meant: [`Link::progressed`] when the hub took work, [`Link::answered`]
//! when it answered but took nothing, [`Link::retry`] for
//! [`Action::Retry`](super::error::Action::Retry), and [`Link::refused`] for
//! [`Action::Stop`](super::error::Action::Stop). What a batch or a file does
//! about the other actions (split, set aside, start over) stays with its
//! uploader.
//!
//! Invariant: the hub URL and the token are read for every request, never
//! cached (the probe reads the URL when it starts); a probe
//! ends a wait only after a connect failed and a later one worked, so a hub
//! that accepts connections and then drops them is never hammered; a
//! `Retry-After` is waited out in full, without probing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::artifacts::ArtifactStats;
use super::backoff::Backoff;
use super::error::SyncError;
use super::status::{LinkState, Remote, SyncShared};
use super::throttle::Throttle;
use crate::agent::config::LinkTls;

/// While backing off from an unreachable hub, a TCP connect is tried this
/// often; sync resumes within seconds of the link coming back.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// Longest a probe's connect may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest the link waits (for the cap, a backoff, a new token) without a
/// sign of life to its [`Report`].
const BEAT_EVERY: Duration = Duration::from_secs(1);

/// Where a link reports its state: the batch link to [`SyncShared`] (the
/// `sync` part of `/v1/status`), the artifact link to [`ArtifactStats`].
pub trait Report: Send + Sync {
    /// Where the link stands now.
    fn link(&self, state: LinkState);
    /// Upper bound of the current retry wait; `None` when not backing off.
    fn backoff(&self, bound: Option<Duration>);
    /// A sign of life while the link waits, for a supervisor.
    fn beat(&self) {}
}

impl Report for SyncShared {
    fn link(&self, state: LinkState) {
        self.set_link(state);
    }

    fn backoff(&self, bound: Option<Duration>) {
        self.set_backoff(bound);
    }

    fn beat(&self) {
        SyncShared::beat(self);
    }
}

impl Report for ArtifactStats {
    /// Artifacts show only a refused token; `sync.link` is the batch link's.
    fn link(&self, state: LinkState) {
        self.auth_failed.store(
            state == LinkState::AuthFailed,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn backoff(&self, bound: Option<Duration>) {
        // At least 1 ms, so a short wait never reads as "not backing off".
        let ms = bound.map_or(0, |d| d.as_millis().max(1) as u64);
        self.backoff_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a link needs from the configuration besides the [`Remote`].
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// First retry wait's bound (`sync.retry_min`); it doubles per failure.
    pub retry_min: Duration,
    /// Largest bound (`sync.retry_max`, `artifacts.retry_max_secs`).
    pub retry_max: Duration,
}

pub struct Link {
    /// Names the uploader in logs ("batch upload", "artifact upload").
    name: &'static str,
    /// The HTTP client, and the TLS material it was built with: a reload
    /// that changes the material makes the next request build a new one.
    /// (A mutex only so requests take `&self`; never held across an await.)
    http: Mutex<(Arc<LinkTls>, reqwest::Client)>,
    /// The hub URL (endpoints are appended to it) and the device token. A
    /// request marks the current value seen, so after a 401/403
    /// `has_changed` says whether a newer token or hub arrived meanwhile.
    /// (A mutex only so requests take `&self`; never held across an await.)
    remote: Mutex<watch::Receiver<Remote>>,
    throttle: Arc<Throttle>,
    report: Arc<dyn Report>,
    backoff: Backoff,
}

impl Link {
    pub fn new(
        name: &'static str,
        cfg: &LinkConfig,
        remote: watch::Receiver<Remote>,
        throttle: Arc<Throttle>,
        report: Arc<dyn Report>,
    ) -> Result<Link, SyncError> {
        let (hub, tls) = {
            let r = remote.borrow();
            (r.hub.clone(), r.tls.clone())
        };
        reqwest::Url::parse(&hub)
            .map_err(|e| SyncError::Local(format!("bad hub URL {hub:?}: {e}")))?;
        let http = client(&tls)?;
        Ok(Link {
            name,
            http: Mutex::new((tls, http)),
            remote: Mutex::new(remote),
            throttle,
            report,
            backoff: Backoff::new(cfg.retry_min, cfg.retry_max),
        })
    }

    /// The HTTP client for `tls` as it is now: the one built for it, or a
    /// new one when a reload changed it (the old one's pooled connections
    /// close with it).
    fn http(&self, tls: &Arc<LinkTls>) -> reqwest::Client {
        let mut http = self.http.lock().expect("http lock");
        if http.0 != *tls {
            match client(tls) {
                Ok(c) => {
                    tracing::info!(
                        "{}: the link's TLS files changed; new connections use them",
                        self.name
                    );
                    *http = (tls.clone(), c);
                }
                // Checked when the configuration was loaded: not expected.
                Err(e) => tracing::error!("{}: {e}; the previous TLS files stay", self.name),
            }
        }
        http.1.clone()
    }

    /// The hub as it is now (without a trailing slash).
    fn hub(&self) -> Arc<str> {
        self.remote
            .lock()
            .expect("remote lock")
            .borrow()
            .hub
            .clone()
    }

    /// The absolute URL of `path` (`/api/v1/...`) at the hub as it is now,
    /// keeping a path prefix the hub URL has.
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.hub())
    }

    /// Whether `url` (an upload's, which the hub made) is at the hub as it
    /// is now: after a reload moved the uploaders to another hub, an
    /// upload begun at the old one starts over.
    pub fn at_hub(&self, url: &str) -> bool {
        let hub = self.hub();
        url.strip_prefix(&*hub)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// `host:port` of the hub as it is now, for the reachability probe.
    fn probe(&self) -> Option<String> {
        probe_addr(&reqwest::Url::parse(&self.hub()).ok()?)
    }

    /// A request with the device token (and TLS files) as they are now.
    pub fn request(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        let (token, tls) = {
            let mut remote = self.remote.lock().expect("remote lock");
            let r = remote.borrow_and_update();
            (r.token.clone(), r.tls.clone())
        };
        self.http(&tls).request(method, url).bearer_auth(&*token)
    }

    /// Waits for the bandwidth cap to let `bytes` go, beating meanwhile (a
    /// capped link holding a batch back is progress). True on shutdown.
    pub async fn share(&self, bytes: u64, shutdown: &CancellationToken) -> bool {
        let take = self.throttle.take(bytes);
        tokio::pin!(take);
        loop {
            tokio::select! {
                _ = &mut take => return false,
                _ = shutdown.cancelled() => return true,
                _ = tokio::time::sleep(BEAT_EVERY) => self.report.beat(),
            }
        }
    }

    /// The hub took work: the link is up and the backoff starts over.
    pub fn progressed(&mut self) {
        self.backoff.reset();
        self.report.backoff(None);
        self.report.link(LinkState::Online);
    }

    /// The hub answered but took nothing (it refused a body for good): the
    /// link works, and the backoff stays where it is.
    pub fn answered(&self) {
        self.report.link(LinkState::Online);
    }

    /// Nothing is waiting to be sent, so nothing is being retried: the
    /// report shows no backoff (the schedule itself starts over only after
    /// progress).
    pub fn idle(&self) {
        self.report.backoff(None);
    }

    /// After a transient failure (`Action::Retry { after }`): waits the
    /// hub's `after`, or the next jittered backoff. A wait after an
    /// unreachable hub is cut short by the probe. True on shutdown.
    pub async fn retry(
        &mut self,
        err: &SyncError,
        after: Option<Duration>,
        shutdown: &CancellationToken,
    ) -> bool {
        let wait = self.backoff.next_delay(after);
        // The backoff before the link: a status read in between must not
        // show `offline` without the wait it is in.
        self.report
            .backoff(self.backoff.current().map(|bound| bound.max(wait)));
        self.report.link(LinkState::Offline);
        tracing::warn!("{} failed ({err}); retrying in {wait:.1?}", self.name);
        // The hub sent `Retry-After`, so it is up: wait what it asked.
        let probe = err.is_offline() && after.is_none();
        self.wait(wait, probe, err.is_connect(), shutdown).await
    }

    /// After a 401/403 (`Action::Stop`): retrying the same token cannot
    /// help. Shows `auth-failed` and waits for a new token (SIGHUP after
    /// fixing `sync.token`); one that arrived while the refused request
    /// was under way is tried at once. True on shutdown.
    pub async fn refused(&mut self, err: &SyncError, shutdown: &CancellationToken) -> bool {
        // Parked first, then checked: `SyncShared::set_token` moves an
        // `auth-failed` link to `offline`, so neither side misses the other.
        self.report.link(LinkState::AuthFailed);
        self.report.backoff(None);
        let token = self.remote.get_mut().expect("remote lock");
        if token.has_changed().unwrap_or(false) {
            self.report.link(LinkState::Offline);
            return false;
        }
        tracing::error!(
            "the hub refuses this device's token ({err}); {} stopped until sync.token is fixed \
             and logbookd reloaded (SIGHUP)",
            self.name
        );
        let mut closed = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return true,
                r = token.changed(), if !closed => match r {
                    Ok(()) => break,
                    // No more tokens can come: wait for shutdown.
                    Err(_) => closed = true,
                },
                _ = tokio::time::sleep(BEAT_EVERY) => {}
            }
            self.report.beat();
        }
        self.report.link(LinkState::Offline);
        tracing::info!("{}: trying the new device token", self.name);
        false
    }

    /// Waits `wait`, beating. With `probe`, ends early once a TCP connect
    /// to the hub works after one that failed (`connect_failed`: the request
    /// that led here could not connect at all). A reload's new hub URL or
    /// token ends it too: the next request goes out at once. True on
    /// shutdown.
    async fn wait(
        &self,
        wait: Duration,
        probe: bool,
        connect_failed: bool,
        shutdown: &CancellationToken,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        let target = self.probe().filter(|_| probe);
        let target = target.as_deref();
        let mut seen_down = connect_failed;
        let mut updates = self.remote.lock().expect("remote lock").clone();
        let mut closed = false;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            let step = left.min(if target.is_some() {
                PROBE_EVERY
            } else {
                BEAT_EVERY
            });
            tokio::select! {
                _ = shutdown.cancelled() => return true,
                r = updates.changed(), if !closed => match r {
                    Ok(()) => {
                        tracing::info!("{}: the hub or its token changed; trying now", self.name);
                        return false;
                    }
                    Err(_) => closed = true,
                },
                _ = tokio::time::sleep(step) => {}
            }
            self.report.beat();
            let Some(addr) = target else { continue };
            let connect = tokio::net::TcpStream::connect(addr);
            let up = tokio::time::timeout(PROBE_TIMEOUT, connect)
                .await
                .is_ok_and(|r| r.is_ok());
            if !up {
                seen_down = true;
            } else if seen_down {
                tracing::info!("the hub answers again; {} resumes now", self.name);
                return false;
            }
        }
    }
}

/// The link's HTTP client, trusting the system's roots and `tls`'s CA,
/// presenting `tls`'s client certificate if any (README, "TLS").
fn client(tls: &LinkTls) -> Result<reqwest::Client, SyncError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        // A dead link must not hold a request forever; a body at a slow
        // rate still goes (the cap waits before sending, not during).
        .read_timeout(Duration::from_secs(60))
        // Below the idle timeouts of the hub and common proxies, so a
        // pooled connection is not reused just as the other side
        // closes it.
        .pool_idle_timeout(Duration::from_secs(50))
        .tcp_nodelay(true)
        .user_agent(concat!("logbookd/", env!("CARGO_PKG_VERSION")));
    for root in tls.roots() {
        builder = builder.add_root_certificate(root);
    }
    if let Some(identity) = tls.client_identity() {
        builder = builder.identity(identity);
    }
    builder
        .build()
        .map_err(|e| SyncError::Local(format!("cannot build an HTTP client: {e}")))
}

/// `host:port` of the hub (an IPv6 host keeps its brackets, so the string
/// parses as a socket address).
fn probe_addr(url: &reqwest::Url) -> Option<String> {
    Some(format!(
        "{}:{}",
        url.host_str()?,
        url.port_or_known_default()?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, RETRY_AFTER};
    use reqwest::StatusCode;
    use tokio::time::Instant;

    use crate::agent::sync::error::Action;

    fn link(hub: &str, min: Duration, max: Duration) -> (Link, Arc<SyncShared>) {
        let shared = Arc::new(SyncShared::new(true));
        shared.set_remote(hub, "t1");
        let cfg = LinkConfig {
            retry_min: min,
            retry_max: max,
        };
        let throttle = Arc::new(Throttle::new(None));
        let link = Link::new(
            "test",
            &cfg,
            shared.remote_updates(),
            throttle,
            shared.clone(),
        );
        (link.unwrap(), shared)
    }

    fn status(code: u16, retry_after: Option<&str>) -> SyncError {
        let mut headers = HeaderMap::new();
        if let Some(v) = retry_after {
            headers.insert(RETRY_AFTER, v.parse().unwrap());
        }
        SyncError::from_response(StatusCode::from_u16(code).unwrap(), &headers, b"")
    }

    fn after(err: &SyncError) -> Option<Duration> {
        match err.action() {
            Action::Retry { after } => after,
            other => panic!("{err}: {other:?}"),
        }
    }

    fn backoff_seconds(shared: &SyncShared) -> Option<f64> {
        shared.view(0, 0).backoff_seconds
    }

    /// A free local port with nothing listening on it.
    fn closed_port() -> std::net::SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    #[test]
    fn endpoints_keep_a_prefix_and_probes_keep_brackets() {
        let check = |hub: &str, endpoint: &str, probe: Option<&str>| {
            let (l, _) = link(hub, Duration::from_secs(1), Duration::from_secs(1));
            assert_eq!(l.endpoint("/api/v1/x"), endpoint, "{hub}");
            assert_eq!(l.probe().as_deref(), probe, "{hub}");
        };
        check(
            "http://hub:8080",
            "http://hub:8080/api/v1/x",
            Some("hub:8080"),
        );
        check(
            "http://hub:8080/",
            "http://hub:8080/api/v1/x",
            Some("hub:8080"),
        );
        check(
            "https://example.com/logbook/",
            "https://example.com/logbook/api/v1/x",
            Some("example.com:443"),
        );
        check(
            "http://[::1]:9000",
            "http://[::1]:9000/api/v1/x",
            Some("[::1]:9000"),
        );
        // The probe's string is what `TcpStream::connect` takes.
        assert!("[::1]:9000".parse::<std::net::SocketAddr>().is_ok());
        let cfg = LinkConfig {
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(1),
        };
        let shared = Arc::new(SyncShared::new(true));
        shared.set_remote("not a url", "t");
        let throttle = Arc::new(Throttle::new(None));
        assert!(Link::new("t", &cfg, shared.remote_updates(), throttle, shared).is_err());
    }

    #[test]
    fn a_reloaded_hub_applies_to_the_next_request() {
        let (l, shared) = link(
            "http://old:8080/",
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let upload = l.endpoint("/api/v1/ingest/uploads/u1");
        assert!(l.at_hub(&upload));
        shared.set_remote("https://new.example/logbook", "t2");
        assert_eq!(
            l.endpoint("/api/v1/x"),
            "https://new.example/logbook/api/v1/x"
        );
        assert_eq!(l.probe().as_deref(), Some("new.example:443"));
        // An upload the old hub made is not at the new one.
        assert!(!l.at_hub(&upload));
        assert!(l.at_hub("https://new.example/logbook/api/v1/ingest/uploads/u2"));
        assert!(!l.at_hub("https://new.example/logbook2/api/v1/ingest/uploads/u2"));
        let req = l.request(Method::GET, &l.endpoint("/")).build().unwrap();
        let auth = req.headers()[reqwest::header::AUTHORIZATION]
            .to_str()
            .unwrap();
        assert_eq!(auth, "Bearer t2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_ends_a_wait() {
        let (l, shared) = link(
            "http://127.0.0.1:9",
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let shutdown = CancellationToken::new();
        let start = Instant::now();
        let mut waiting = Box::pin(l.wait(Duration::from_secs(300), false, false, &shutdown));
        assert!(tokio::time::timeout(Duration::from_secs(5), &mut waiting)
            .await
            .is_err());
        shared.set_remote("http://127.0.0.1:10", "t1");
        assert!(!waiting.await);
        assert!(start.elapsed() < Duration::from_secs(6));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_waited_out_in_full() {
        let (mut l, shared) = link(
            "http://127.0.0.1:9",
            Duration::from_millis(100),
            Duration::from_secs(1),
        );
        let shutdown = CancellationToken::new();
        for code in [503, 429] {
            let err = status(code, Some("7"));
            let start = Instant::now();
            assert!(!l.retry(&err, after(&err), &shutdown).await);
            assert_eq!(start.elapsed(), Duration::from_secs(7), "{code}");
            // Above the cap: the hub asked for it.
            assert_eq!(backoff_seconds(&shared), Some(7.0), "{code}");
            assert_eq!(shared.link(), LinkState::Offline);
        }
        // Only 429 and 503 carry a delay the agent takes.
        assert_eq!(after(&status(502, Some("7"))), None);
        assert_eq!(after(&status(500, Some("7"))), None);
        l.progressed();
        assert_eq!(backoff_seconds(&shared), None);
        assert_eq!(shared.link(), LinkState::Online);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_to_the_cap_with_full_jitter_and_starts_over() {
        let (mut l, shared) = link(
            "http://127.0.0.1:9",
            Duration::from_millis(100),
            Duration::from_secs(1),
        );
        let shutdown = CancellationToken::new();
        let err = status(503, None);
        let mut rounds = Vec::new();
        for _ in 0..12 {
            let start = Instant::now();
            assert!(!l.retry(&err, after(&err), &shutdown).await);
            let bound = backoff_seconds(&shared).unwrap();
            rounds.push((start.elapsed().as_secs_f64(), bound));
        }
        for (waited, bound) in &rounds {
            assert!(waited <= bound, "{rounds:?}");
        }
        let bounds: Vec<u64> = rounds
            .iter()
            .map(|r| (r.1 * 1000.0).round() as u64)
            .collect();
        assert_eq!(&bounds[..4], &[100, 200, 400, 800], "{rounds:?}");
        assert!(bounds[4..].iter().all(|b| *b == 1000), "{rounds:?}");
        // Jitter: the waits are spread below their bounds, not at them.
        assert!(rounds.iter().any(|(w, b)| w < &(b * 0.9)), "{rounds:?}");
        // Idle hides the backoff; only progress starts it over.
        l.idle();
        assert_eq!(backoff_seconds(&shared), None);
        l.retry(&err, None, &shutdown).await;
        assert_eq!(backoff_seconds(&shared), Some(1.0));
        l.progressed();
        let start = Instant::now();
        l.retry(&err, None, &shutdown).await;
        assert!(start.elapsed() <= Duration::from_millis(100));
        assert_eq!(backoff_seconds(&shared), Some(0.1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_token_parks_until_a_new_one_arrives() {
        let (mut l, shared) = link(
            "http://127.0.0.1:9",
            Duration::from_millis(100),
            Duration::from_secs(1),
        );
        let shutdown = CancellationToken::new();
        let err = status(401, None);
        assert_eq!(err.action(), Action::Stop);
        let _ = l.request(Method::POST, "http://127.0.0.1:9/x");
        let mut parked = Box::pin(l.refused(&err, &shutdown));
        let beats = shared.heartbeat.load(std::sync::atomic::Ordering::Relaxed);
        // An hour later it still waits, alive, and shows why.
        let idle = tokio::time::timeout(Duration::from_secs(3600), &mut parked).await;
        assert!(idle.is_err());
        assert_eq!(shared.link(), LinkState::AuthFailed);
        assert_eq!(backoff_seconds(&shared), None);
        assert!(shared.heartbeat.load(std::sync::atomic::Ordering::Relaxed) > beats + 3000);
        // A new token ends it.
        assert!(shared.set_token("t2"));
        assert!(!parked.await);
        assert_eq!(shared.link(), LinkState::Offline);
        drop(l);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_that_arrived_during_the_refused_request_is_tried_at_once() {
        let (mut l, shared) = link(
            "http://127.0.0.1:9",
            Duration::from_millis(100),
            Duration::from_secs(1),
        );
        let shutdown = CancellationToken::new();
        let _ = l.request(Method::POST, "http://127.0.0.1:9/x");
        shared.set_token("t2");
        let start = Instant::now();
        assert!(!l.refused(&status(403, None), &shutdown).await);
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(shared.link(), LinkState::Offline);
        // And a shutdown ends a parked link.
        let _ = l.request(Method::POST, "http://127.0.0.1:9/x");
        shutdown.cancel();
        assert!(l.refused(&status(403, None), &shutdown).await);
    }

    #[tokio::test(start_paused = true)]
    async fn the_probe_ends_a_wait_once_the_hub_accepts_connections_again() {
        let addr = closed_port();
        let hub = format!("http://{addr}");
        let (l, _) = link(&hub, Duration::from_secs(30), Duration::from_secs(120));
        let shutdown = CancellationToken::new();
        // A real connect error, as the uploaders see it.
        let err = l
            .request(Method::GET, &l.endpoint("/"))
            .send()
            .await
            .map_err(SyncError::Transport)
            .unwrap_err();
        assert!(err.is_offline() && err.is_connect(), "{err}");
        let start = Instant::now();
        let mut waiting = Box::pin(l.wait(Duration::from_secs(60), true, true, &shutdown));
        assert!(tokio::time::timeout(Duration::from_secs(9), &mut waiting)
            .await
            .is_err());
        let listener = std::net::TcpListener::bind(addr).unwrap();
        assert!(!waiting.await);
        let took = start.elapsed();
        assert!(
            took <= Duration::from_secs(9) + PROBE_EVERY + PROBE_TIMEOUT,
            "{took:?}"
        );
        drop(listener);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hub_that_accepts_and_drops_never_cuts_the_wait_short() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let hub = format!("http://{}", listener.local_addr().unwrap());
        let (l, _) = link(&hub, Duration::from_secs(30), Duration::from_secs(120));
        let shutdown = CancellationToken::new();
        // The request that failed had connected (a reset, a timeout), and
        // every probe connects: the whole wait is waited.
        let start = Instant::now();
        assert!(
            !l.wait(Duration::from_secs(20), true, false, &shutdown)
                .await
        );
        assert!(start.elapsed() >= Duration::from_secs(20));
        // A wait the hub asked for is never probed.
        let (mut l, _) = link(&hub, Duration::from_secs(30), Duration::from_secs(120));
        let err = status(503, Some("12"));
        let start = Instant::now();
        assert!(!l.retry(&err, after(&err), &shutdown).await);
        assert_eq!(start.elapsed(), Duration::from_secs(12));
        drop(listener);
    }
}
