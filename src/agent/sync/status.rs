//! The sync link's live state, shared by the uploader (which writes it) and
//! the local API (which shows it in `/v1/status`, `logbook status` and
//! `/metrics`).
//!
//! It also carries the device token both uploaders read per request, so a
//! SIGHUP can hand them a new one without a restart.
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
    /// The device token (`sync.token`), replaced on reload.
    token: tokio::sync::watch::Sender<Arc<str>>,
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
        self.token.borrow().clone()
    }

    /// Replaces the device token; true when it changed. A link parked as
    /// `auth-failed` leaves that state at once (the uploader that refused
    /// checks the token again after parking, so neither side misses the
    /// other).
    pub fn set_token(&self, token: &str) -> bool {
        let changed = self.token.send_if_modified(|t| {
            if &**t == token {
                return false;
            }
            *t = Arc::from(token);
            true
        });
        if changed && self.link() == LinkState::AuthFailed {
            self.set_link(LinkState::Offline);
        }
        changed
    }

    /// Wakes on every new token.
    pub fn token_updates(&self) -> tokio::sync::watch::Receiver<Arc<str>> {
        self.token.subscribe()
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
        let mut updates = s.token_updates();
        assert!(s.set_token("a"));
        assert!(updates.has_changed().unwrap());
        assert_eq!(&*updates.borrow_and_update().clone(), "a");
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
}
