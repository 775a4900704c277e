//! The sync link's live state, shared by the uploader (which writes it) and
//! the local API (which shows it in `/v1/status`, `logbook status` and
//! `/metrics`).
//!
//! It also carries the hub URL and the device token both uploaders read per
//! request ([`Remote`]), so a SIGHUP can hand them new ones without a
//! restart.
//!
//! Invariant: plain atomics, one small mutex and one watch channel; nothing
//! here waits, so the API never blocks on the uploader.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `sync` object of `GET /v1/status` (defined with the other local-API
/// types).
pub use crate::agent::types::SyncStatus;

/// Where the link to the hub stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkState {
    /// No hub configured.
    Disabled,
    /// The last request reached the hub and was answered with success.
    Online,
    /// The hub cannot be reached or answers with transient errors.
    Offline,
    /// The hub refused the device token (401/403): uploading stopped until
    /// a new token arrives (SIGHUP after fixing `sync.token`, or a restart).
    AuthFailed,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Disabled => "disabled",
            LinkState::Online => "online",
            LinkState::Offline => "offline",
            LinkState::AuthFailed => "auth-failed",
        }
    }

    fn from_u8(v: u8) -> LinkState {
        match v {
            1 => LinkState::Online,
            2 => LinkState::Offline,
            3 => LinkState::AuthFailed,
            _ => LinkState::Disabled,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            LinkState::Disabled => 0,
            LinkState::Online => 1,
            LinkState::Offline => 2,
            LinkState::AuthFailed => 3,
        }
    }
}

/// Counters and state of the uploader.
#[derive(Debug, Default)]
pub struct SyncShared {
    link: AtomicU8,
    /// Unix ns of the last acknowledged batch (0 = never).
    pub last_success_ns: AtomicI64,
    /// Upper bound of the current retry wait in ms (0 = not backing off).
    pub backoff_ms: AtomicU64,
    /// Compressed request bytes of acknowledged batches.
    pub bytes_sent: AtomicU64,
    /// The same batches before compression (msgpack).
    pub bytes_raw: AtomicU64,
    pub batches_sent: AtomicU64,
    pub records_sent: AtomicU64,
    pub failures: AtomicU64,
    pub set_aside_batches: AtomicU64,
    pub set_aside_records: AtomicU64,
    /// Times the supervisor restarted a stalled (or crashed) uploader.
    pub restarts: AtomicU64,
    /// Bumped on every turn of the uploader's loop and every wake-up while
    /// it waits: the supervisor's evidence that it is alive.
    pub heartbeat: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// `sync.hub` and `sync.token`, replaced on reload.
    remote: tokio::sync::watch::Sender<Remote>,
}

/// Where the uploaders send, and as whom: `sync.hub` and `sync.token`.
/// One value, so a reload that changes both is seen as one change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Remote {
    /// The hub URL without a trailing slash (a path prefix kept).
    pub hub: Arc<str>,
    /// The device token.
    pub token: Arc<str>,
    /// The CA and client certificate the link's HTTP client uses
    /// (`sync.ca_file`, `sync.client_cert`, `sync.client_key`).
    pub tls: Arc<crate::agent::config::LinkTls>,
}

/// What [`SyncShared::set_remote`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Changed {
    pub hub: bool,
    pub token: bool,
}

impl SyncShared {
    pub fn new(enabled: bool) -> SyncShared {
        let s = SyncShared::default();
        s.set_link(if enabled {
            LinkState::Offline
        } else {
            LinkState::Disabled
        });
        s
    }

    /// The device token to send now: read per request, never cached.
    pub fn token(&self) -> Arc<str> {
        self.remote.borrow().token.clone()
    }

    /// The hub to send to now (without a trailing slash).
    pub fn hub(&self) -> Arc<str> {
        self.remote.borrow().hub.clone()
    }

    /// Replaces the device token; true when it changed (see
    /// [`SyncShared::set_remote`]).
    pub fn set_token(&self, token: &str) -> bool {
        let hub = self.hub();
        self.set_remote(&hub, token).token
    }

    /// Replaces the hub URL and the device token at once; says which
    /// changed. Either change moves a link parked as `auth-failed` to
    /// `offline` at once (a token refused by one hub may be good at
    /// another), and the uploader that refused checks for a change again
    /// after parking, so neither side misses the other.
    pub fn set_remote(&self, hub: &str, token: &str) -> Changed {
        let hub = hub.trim().trim_end_matches('/');
        let mut changed = Changed::default();
        self.remote.send_if_modified(|r| {
            changed = Changed {
                hub: &*r.hub != hub,
                token: &*r.token != token,
            };
            if changed.hub {
                r.hub = Arc::from(hub);
            }
            if changed.token {
                r.token = Arc::from(token);
            }
            changed.hub || changed.token
        });
        if (changed.hub || changed.token) && self.link() == LinkState::AuthFailed {
            self.set_link(LinkState::Offline);
        }
        changed
    }

    /// Replaces the link's TLS material (a reload read the files again);
    /// true when it changed. Like a new token, it moves a link parked as
    /// `auth-failed` to `offline` (a new client certificate may be what
    /// the hub wanted).
    pub fn set_tls(&self, tls: &Arc<crate::agent::config::LinkTls>) -> bool {
        let changed = self.remote.send_if_modified(|r| {
            if *r.tls == **tls {
                return false;
            }
            r.tls = tls.clone();
            true
        });
        if changed && self.link() == LinkState::AuthFailed {
            self.set_link(LinkState::Offline);
        }
        changed
    }

    /// Wakes on every new hub URL or token.
    pub fn remote_updates(&self) -> tokio::sync::watch::Receiver<Remote> {
        self.remote.subscribe()
    }

    pub fn link(&self) -> LinkState {
        LinkState::from_u8(self.link.load(Ordering::Relaxed))
    }

    pub fn set_link(&self, state: LinkState) {
        self.link.store(state.to_u8(), Ordering::Relaxed);
    }

    pub fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().expect("sync status lock") = e;
    }

    pub fn beat(&self) {
        self.heartbeat.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_backoff(&self, d: Option<Duration>) {
        self.backoff_ms
            .store(d.map_or(0, |d| d.as_millis() as u64), Ordering::Relaxed);
    }

    /// The status view; `unsynced_records` and `unsynced_bytes` come from
    /// the store's counters.
    pub fn view(&self, unsynced_records: u64, unsynced_bytes: u64) -> SyncStatus {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let sent = get(&self.bytes_sent);
        let raw = get(&self.bytes_raw);
        let last = self.last_success_ns.load(Ordering::Relaxed);
        SyncStatus {
            link: self.link(),
            last_success: (last > 0).then(|| crate::agent::store::rfc3339(last)),
            backlog_records: unsynced_records,
            backlog_bytes: unsynced_bytes,
            backoff_seconds: match get(&self.backoff_ms) {
                0 => None,
                ms => Some(ms as f64 / 1000.0),
            },
            bytes_sent: sent,
            bytes_uncompressed: raw,
            compression_ratio: if sent > 0 {
                raw as f64 / sent as f64
            } else {
                0.0
            },
            content_encoding: super::error::BODY_CODING.current().as_str().to_owned(),
            batches_sent: get(&self.batches_sent),
            records_sent: get(&self.records_sent),
            failures: get(&self.failures),
            set_aside_batches: get(&self.set_aside_batches),
            set_aside_records: get(&self.set_aside_records),
            uploader_restarts: get(&self.restarts),
            last_error: self.last_error.lock().expect("sync status lock").clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_ends_auth_failed() {
        let s = SyncShared::new(true);
        let mut updates = s.remote_updates();
        assert!(s.set_token("a"));
        assert!(updates.has_changed().unwrap());
        assert_eq!(&*updates.borrow_and_update().token, "a");
        s.set_link(LinkState::AuthFailed);
        assert!(!s.set_token("a"), "the same token is no change");
        assert_eq!(s.link(), LinkState::AuthFailed);
        assert!(!updates.has_changed().unwrap());
        assert!(s.set_token("b"));
        assert_eq!(s.link(), LinkState::Offline);
        assert_eq!(&*s.token(), "b");
        s.set_link(LinkState::Online);
        assert!(s.set_token("c"));
        assert_eq!(s.link(), LinkState::Online, "only auth-failed changes");
    }

    #[test]
    fn a_new_hub_is_one_change_with_its_token_and_ends_auth_failed() {
        let s = SyncShared::new(true);
        let mut updates = s.remote_updates();
        let both = Changed {
            hub: true,
            token: true,
        };
        assert_eq!(s.set_remote("http://a/", "t"), both);
        assert_eq!(&*updates.borrow_and_update().hub, "http://a");
        s.set_link(LinkState::AuthFailed);
        assert_eq!(s.set_remote("http://a", "t"), Changed::default());
        assert!(!updates.has_changed().unwrap());
        assert_eq!(s.link(), LinkState::AuthFailed);
        let hub = Changed {
            hub: true,
            token: false,
        };
        assert_eq!(s.set_remote("http://b/prefix", "t"), hub);
        assert!(updates.has_changed().unwrap());
        assert_eq!(s.link(), LinkState::Offline);
        assert_eq!((&*s.hub(), &*s.token()), ("http://b/prefix", "t"));
        // A new token keeps the hub.
        assert!(s.set_token("u"));
        assert_eq!(&*s.hub(), "http://b/prefix");
    }
}
