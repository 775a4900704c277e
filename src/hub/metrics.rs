//! Prometheus counters of the hub (`GET /metrics`, text format 0.0.4).
//!
//! Invariant: counting never blocks a request: plain atomics, plus one
//! small mutex-guarded map of reject reasons (a handful of fixed names).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use crate::prom::{Kind, Text};

#[derive(Default)]
pub struct Metrics {
    pub batches: AtomicU64,
    pub records_stored: AtomicU64,
    pub records_duplicate: AtomicU64,
    pub bytes_in: AtomicU64,
    pub uploads_created: AtomicU64,
    pub uploads_completed: AtomicU64,
    pub upload_bytes: AtomicU64,
    /// Bytes of PATCHes kept (checksum verified, not rolled back): with no
    /// acknowledged range ever re-sent, this equals the sum of completed
    /// upload lengths.
    pub upload_acked_bytes: AtomicU64,
    /// Unfinished uploads deleted after `uploads.expire_after` without a
    /// write.
    pub uploads_expired: AtomicU64,
    pub active_streams: AtomicU64,
    /// Times a live stream fell behind the broadcast and read what it
    /// missed back from the database.
    pub stream_catch_ups: AtomicU64,
    /// Commits of other replicas heard (a shared store only).
    pub live_heard: AtomicU64,
    /// Times the replicas' feed was (re)established.
    pub live_resyncs: AtomicU64,
    /// Live streams closed because their client took no message for
    /// `server.stream_send_timeout`.
    pub stream_slow_closes: AtomicU64,
    /// Bytes of batches held now under `ingest.max_inflight_bytes`.
    pub inflight_bytes: AtomicU64,
    /// Batch requests waiting now for room under it.
    pub inflight_waiting: AtomicU64,
    rejects: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Counts a refused request by a fixed reason name.
    pub fn reject(&self, reason: &'static str) {
        *self
            .rejects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    pub fn render(&self) -> String {
        let mut t = Text::default();
        for (name, help, counter) in [
            (
                "logbook_hub_batches_total",
                "Batches stored.",
                &self.batches,
            ),
            (
                "logbook_hub_records_total",
                "Records newly stored.",
                &self.records_stored,
            ),
            (
                "logbook_hub_records_duplicate_total",
                "Records received again (retries, overlaps).",
                &self.records_duplicate,
            ),
            (
                "logbook_hub_bytes_in_total",
                "Request body bytes received by ingest and uploads.",
                &self.bytes_in,
            ),
            (
                "logbook_hub_uploads_created_total",
                "Artifact uploads created.",
                &self.uploads_created,
            ),
            (
                "logbook_hub_uploads_completed_total",
                "Artifact uploads completed and verified.",
                &self.uploads_completed,
            ),
            (
                "logbook_hub_upload_bytes_total",
                "Artifact bytes received.",
                &self.upload_bytes,
            ),
            (
                "logbook_hub_upload_acked_bytes_total",
                "Artifact bytes of PATCHes kept (verified, not rolled back).",
                &self.upload_acked_bytes,
            ),
            (
                "logbook_hub_uploads_expired_total",
                "Unfinished uploads deleted after uploads.expire_after without a write.",
                &self.uploads_expired,
            ),
            (
                "logbook_hub_stream_catch_ups_total",
                "Times a live stream fell behind and read what it missed from the database.",
                &self.stream_catch_ups,
            ),
            (
                "logbook_hub_live_heard_total",
                "Commits of other replicas heard by the live fan-out.",
                &self.live_heard,
            ),
            (
                "logbook_hub_live_resyncs_total",
                "Times the live fan-out's feed was (re)established and every stream read what it missed.",
                &self.live_resyncs,
            ),
            (
                "logbook_hub_stream_slow_closes_total",
                "Live streams closed because their client took no message for server.stream_send_timeout.",
                &self.stream_slow_closes,
            ),
        ] {
            t.counter(name, help, counter.load(Relaxed));
        }
        t.gauge(
            "logbook_hub_active_streams",
            "Live WebSocket log streams.",
            self.active_streams.load(Relaxed),
        );
        t.gauge(
            "logbook_hub_inflight_bytes",
            "Bytes of batches held by requests now (ingest.max_inflight_bytes bounds them).",
            self.inflight_bytes.load(Relaxed),
        );
        t.gauge(
            "logbook_hub_inflight_waiting",
            "Batch requests waiting for room under ingest.max_inflight_bytes.",
            self.inflight_waiting.load(Relaxed),
        );
        let mut rejects = t.family(
            "logbook_hub_rejects_total",
            Kind::Counter,
            "Requests refused, by reason.",
        );
        for (reason, n) in self
            .rejects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            rejects.sample(&[("reason", reason)], n);
        }
        t.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_reasons() {
        let m = Metrics::default();
        Metrics::add(&m.batches, 2);
        m.reject("gzip_bomb");
        m.reject("gzip_bomb");
        let text = m.render();
        assert!(text.contains("\nlogbook_hub_batches_total 2\n"), "{text}");
        assert!(text.contains("logbook_hub_rejects_total{reason=\"gzip_bomb\"} 2\n"));
    }

    /// The whole body, pinned: dashboards and alerts match these names and
    /// the families' order and help text.
    #[test]
    fn renders_the_whole_text() {
        let m = Metrics::default();
        Metrics::add(&m.records_stored, 42);
        m.reject("unauthorized");
        let families = [
            ("batches_total", "Batches stored.", "counter", "0"),
            ("records_total", "Records newly stored.", "counter", "42"),
            (
                "records_duplicate_total",
                "Records received again (retries, overlaps).",
                "counter",
                "0",
            ),
            (
                "bytes_in_total",
                "Request body bytes received by ingest and uploads.",
                "counter",
                "0",
            ),
            (
                "uploads_created_total",
                "Artifact uploads created.",
                "counter",
                "0",
            ),
            (
                "uploads_completed_total",
                "Artifact uploads completed and verified.",
                "counter",
                "0",
            ),
            (
                "upload_bytes_total",
                "Artifact bytes received.",
                "counter",
                "0",
            ),
            (
                "upload_acked_bytes_total",
                "Artifact bytes of PATCHes kept (verified, not rolled back).",
                "counter",
                "0",
            ),
            (
                "uploads_expired_total",
                "Unfinished uploads deleted after uploads.expire_after without a write.",
                "counter",
                "0",
            ),
            (
                "stream_catch_ups_total",
                "Times a live stream fell behind and read what it missed from the database.",
                "counter",
                "0",
            ),
            (
                "live_heard_total",
                "Commits of other replicas heard by the live fan-out.",
                "counter",
                "0",
            ),
            (
                "live_resyncs_total",
                "Times the live fan-out's feed was (re)established and every stream read what it missed.",
                "counter",
                "0",
            ),
            (
                "stream_slow_closes_total",
                "Live streams closed because their client took no message for server.stream_send_timeout.",
                "counter",
                "0",
            ),
            (
                "active_streams",
                "Live WebSocket log streams.",
                "gauge",
                "0",
            ),
            (
                "inflight_bytes",
                "Bytes of batches held by requests now (ingest.max_inflight_bytes bounds them).",
                "gauge",
                "0",
            ),
            (
                "inflight_waiting",
                "Batch requests waiting for room under ingest.max_inflight_bytes.",
                "gauge",
                "0",
            ),
        ];
        let mut expected = String::new();
        for (name, help, kind, v) in families {
            expected += &format!(
                "# HELP logbook_hub_{name} {help}\n# TYPE logbook_hub_{name} {kind}\nlogbook_hub_{name} {v}\n"
            );
        }
        expected += "# HELP logbook_hub_rejects_total Requests refused, by reason.\n\
                     # TYPE logbook_hub_rejects_total counter\n\
                     logbook_hub_rejects_total{reason=\"unauthorized\"} 1\n";
        assert_eq!(m.render(), expected);
    }
}
