//! Versioned wire types shared by `agent` and `hub`: the sync [`Batch`] the
//! agent posts to `POST /api/v1/ingest/batches` (msgpack + gzip), the hub's
//! [`BatchAck`], the tus `Upload-Metadata` keys, and the JSON error body.
//!
//! Invariant: this module is the only thing `agent` and `hub` share about
//! sync. A change to any struct here that alters the encoding bumps
//! [`BATCH_VERSION`]; the golden-bytes test below fails otherwise.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Version of the [`Batch`] encoding this build writes.
pub const BATCH_VERSION: u32 = 1;
/// Versions of the [`Batch`] encoding this build reads.
pub const SUPPORTED_BATCH_VERSIONS: &[u32] = &[1];

/// Hub route for batches (relative to the hub's base URL).
pub const BATCHES_PATH: &str = "/api/v1/ingest/batches";
/// Hub route for tus artifact uploads (relative to the hub's base URL).
pub const UPLOADS_PATH: &str = "/api/v1/ingest/uploads";
/// `Content-Type` of a batch body.
pub const CONTENT_TYPE_MSGPACK: &str = "application/msgpack";

/// tus `Upload-Metadata` keys (values are base64 as tus requires).
pub mod upload_meta {
    pub const SESSION_ID: &str = "session_id";
    /// Path relative to the session's artifact directory, `/`-separated.
    pub const PATH: &str = "path";
    pub const CONTENT_TYPE: &str = "content_type";
    /// Hex SHA-256 of the whole file.
    pub const SHA256: &str = "sha256";
}

/// Gap reasons: why records never reached the hub.
pub mod gap_reason {
    /// The agent's ring buffer was full and evicted unsynced records.
    pub const EVICTED: &str = "evicted";
    /// The hub rejected a batch as invalid (400); its records were set aside.
    pub const REJECTED: &str = "rejected";
    /// A client library (e.g. the tracing layer) dropped events while the
    /// agent was unreachable.
    pub const CLIENT_DROPPED: &str = "client_dropped";
}

/// Severity of a record. A level filter means "this level and above".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Level {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Fatal = 5,
}

impl Level {
    pub const ALL: [Level; 6] = [
        Level::Trace,
        Level::Debug,
        Level::Info,
        Level::Warn,
        Level::Error,
        Level::Fatal,
    ];

    /// Lower-case name, as used in filters and config.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
            Level::Fatal => "fatal",
        }
    }

    /// Upper-case name, as the Sessions API shows it (`"INFO"`).
    pub fn as_upper(self) -> &'static str {
        match self {
            Level::Trace => "TRACE",
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
            Level::Fatal => "FATAL",
        }
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Level> {
        Level::ALL.get(code as usize).copied()
    }

    /// Parses a level name as loggers write them, in any case: the six
    /// names plus common synonyms (`warning`, `err`, `critical`, `panic`, …).
    pub fn parse(name: &str) -> Option<Level> {
        let lower = name.trim().to_ascii_lowercase();
        Some(match lower.as_str() {
            "trace" | "trc" | "verbose" => Level::Trace,
            "debug" | "dbg" => Level::Debug,
            "info" | "inf" | "information" | "notice" | "informational" => Level::Info,
            "warn" | "warning" | "wrn" => Level::Warn,
            "error" | "err" | "eror" => Level::Error,
            "fatal" | "critical" | "crit" | "alert" | "emerg" | "emergency" | "panic"
            | "dpanic" => Level::Fatal,
            _ => return None,
        })
    }

    /// Maps a syslog severity (0 emerg … 7 debug).
    pub fn from_syslog_severity(severity: u8) -> Option<Level> {
        Some(match severity {
            0..=2 => Level::Fatal,
            3 => Level::Error,
            4 => Level::Warn,
            5 | 6 => Level::Info,
            7 => Level::Debug,
            _ => return None,
        })
    }

    /// Maps a pino/bunyan numeric level (10 trace … 60 fatal).
    pub fn from_pino(level: i64) -> Option<Level> {
        Some(match level {
            10 => Level::Trace,
            20 => Level::Debug,
            30 => Level::Info,
            40 => Level::Warn,
            50 => Level::Error,
            60 => Level::Fatal,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Level::parse(s).ok_or_else(|| {
            format!("unknown level {s:?} (expected trace, debug, info, warn, error or fatal)")
        })
    }
}

/// In human-readable formats (JSON APIs) a level is its upper-case name; in
/// msgpack it is its one-byte code.
impl Serialize for Level {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(self.as_upper())
        } else {
            s.serialize_u8(self.code())
        }
    }
}

impl<'de> Deserialize<'de> for Level {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Level;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a level name or code 0-5")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Level, E> {
                u8::try_from(v)
                    .ok()
                    .and_then(Level::from_code)
                    .ok_or_else(|| E::custom(format!("level code {v} out of range 0-5")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Level, E> {
                self.visit_u64(u64::try_from(v).map_err(|_| E::custom("negative level code"))?)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Level, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// The device a batch comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Stable id (defaults to `/etc/machine-id`). Must match the token's device.
    pub id: String,
    /// Human name (defaults to the host name).
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    Active,
    Completed,
    Failed,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Active => "active",
            SessionStatus::Completed => "completed",
            SessionStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<SessionStatus> {
        match s {
            "active" => Some(SessionStatus::Active),
            "completed" => Some(SessionStatus::Completed),
            "failed" => Some(SessionStatus::Failed),
            _ => None,
        }
    }
}

/// Name and version of the software a session runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: Option<String>,
}

/// The whole current state of one session, as the device knows it. The hub
/// keeps, per session, the state with the highest `revision`; sending the
/// same or an older state again changes nothing, so upserts are idempotent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionState {
    pub id: Uuid,
    /// Increases with every change to the session on the device.
    pub revision: u64,
    pub status: SessionStatus,
    /// Robot wall clock, Unix nanoseconds.
    pub started_at_ns: i64,
    pub ended_at_ns: Option<i64>,
    /// Measured with the monotonic clock, so clock jumps do not distort it.
    /// For an active session, the duration so far.
    pub duration_ns: Option<i64>,
    pub tags: Vec<String>,
    pub package: Option<Package>,
    /// Free key/value metadata given when the session was opened.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Why the session failed.
    pub error: Option<String>,
}

/// One log record. `seq` is per device and strictly increasing; the hub
/// stores each (device, seq) once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// `None` for device logs received while no session was active.
    pub session_id: Option<Uuid>,
    /// Robot wall clock, Unix nanoseconds (from the record, or on arrival).
    pub timestamp_ns: i64,
    pub level: Level,
    pub module: String,
    pub message: String,
    /// JSON object text; empty when the record has no metadata. Kept as
    /// text because both ends store it as text.
    pub metadata: String,
    /// Trusted fields from the sender's socket credentials (`SO_PEERCRED`).
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub process: Option<String>,
}

/// Records that never reached the hub, counted on the device. `dropped` is
/// the cumulative total for this (session, level, reason) on the device, so
/// the hub keeps the maximum it has seen and resending is harmless.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gap {
    pub session_id: Option<Uuid>,
    pub level: Level,
    /// One of [`gap_reason`].
    pub reason: String,
    pub dropped: u64,
}

/// What the agent posts to the hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// Always first: [`Batch::decode`] reads it before the rest.
    pub version: u32,
    pub device: Device,
    /// Robot wall clock when the batch was sent, Unix nanoseconds, so the hub
    /// can record the clock skew it saw.
    pub sent_at_ns: i64,
    pub sessions: Vec<SessionState>,
    pub records: Vec<Record>,
    pub gaps: Vec<Gap>,
}

/// The hub's answer to a stored batch (JSON). A batch is stored in one
/// transaction: either every record in it is acked, or the request failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchAck {
    /// Records newly stored.
    pub stored: u64,
    /// Records the hub already had (a retried or overlapping batch).
    pub duplicates: u64,
    /// Inclusive seq ranges now safely at the hub (stored or duplicate).
    pub acked: Vec<(u64, u64)>,
    /// Session states applied (newer than what the hub had).
    pub sessions: u64,
    pub gaps: u64,
    /// Hub wall clock when the batch was stored, Unix nanoseconds.
    pub hub_time_ns: i64,
}

/// JSON error body of every hub and local-API error:
/// `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `unauthorized`, `payload_too_large`.
    pub code: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("body is not valid gzip: {0}")]
    Gzip(std::io::Error),
    #[error("decompressed body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("unsupported batch version {found} (this hub understands {supported:?})")]
    Version {
        found: u32,
        supported: &'static [u32],
    },
    #[error("malformed batch: {0}")]
    Malformed(String),
}

/// Inclusive ranges covering `seqs` (which need not be sorted).
pub fn seq_ranges(seqs: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut v: Vec<u64> = seqs.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in v {
        match out.last_mut() {
            Some((_, hi)) if *hi + 1 == s => *hi = s,
            _ => out.push((s, s)),
        }
    }
    out
}

impl Batch {
    /// msgpack (structs as arrays, the compact form), no compression.
    pub fn to_msgpack(&self) -> Vec<u8> {
        rmp_serde::to_vec(self).expect("a Batch always serializes")
    }

    /// The request body: msgpack, gzip-compressed at `level` (0-9).
    pub fn encode(&self, level: u32) -> Vec<u8> {
        let raw = self.to_msgpack();
        let mut gz = flate2::write::GzEncoder::new(
            Vec::with_capacity(raw.len() / 4 + 64),
            flate2::Compression::new(level),
        );
        gz.write_all(&raw).expect("writing to a Vec cannot fail");
        gz.finish().expect("writing to a Vec cannot fail")
    }

    /// Decodes a request body: gunzips at most `max_decompressed` bytes (a
    /// gzip bomb fails with [`WireError::TooLarge`] after reading only that
    /// much), checks the version, then decodes.
    pub fn decode(gzipped: &[u8], max_decompressed: usize) -> Result<Batch, WireError> {
        let raw = gunzip_limited(gzipped, max_decompressed)?;
        Batch::from_msgpack(&raw)
    }

    /// Decodes uncompressed msgpack, checking the version first.
    pub fn from_msgpack(raw: &[u8]) -> Result<Batch, WireError> {
        let version = peek_version(raw)?;
        if !SUPPORTED_BATCH_VERSIONS.contains(&version) {
            return Err(WireError::Version {
                found: version,
                supported: SUPPORTED_BATCH_VERSIONS,
            });
        }
        rmp_serde::from_slice(raw).map_err(|e| WireError::Malformed(e.to_string()))
    }
}

/// Gunzips `body`, failing once the output would exceed `limit` bytes.
pub fn gunzip_limited(body: &[u8], limit: usize) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    let mut dec = flate2::read::GzDecoder::new(body).take(limit as u64 + 1);
    dec.read_to_end(&mut out).map_err(WireError::Gzip)?;
    if out.len() > limit {
        return Err(WireError::TooLarge { limit });
    }
    Ok(out)
}

/// Reads the version, the first element of the batch (an array in the
/// compact encoding, a map with `version` first in the named one).
fn peek_version(raw: &[u8]) -> Result<u32, WireError> {
    let bad = |what: &str| WireError::Malformed(format!("cannot read batch version: {what}"));
    let mut cur = raw;
    let marker = rmp::decode::read_marker(&mut cur).map_err(|_| bad("empty body"))?;
    use rmp::Marker;
    match marker {
        Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
            // Re-read the length properly, then the first element.
            let mut cur = raw;
            rmp::decode::read_array_len(&mut cur).map_err(|_| bad("bad array"))?;
            rmp::decode::read_int(&mut cur).map_err(|_| bad("first element is not an integer"))
        }
        Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
            let mut cur = raw;
            rmp::decode::read_map_len(&mut cur).map_err(|_| bad("bad map"))?;
            let mut key = [0u8; 16];
            let k = rmp::decode::read_str(&mut cur, &mut key).map_err(|_| bad("bad key"))?;
            if k != "version" {
                return Err(bad("first key is not `version`"));
            }
            rmp::decode::read_int(&mut cur).map_err(|_| bad("version is not an integer"))
        }
        _ => Err(bad("body is not a msgpack array or map")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Batch {
        let sid = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001);
        Batch {
            version: BATCH_VERSION,
            device: Device {
                id: "robot-7".into(),
                name: "warehouse-robot-07".into(),
            },
            sent_at_ns: 1_736_496_000_000_000_000,
            sessions: vec![SessionState {
                id: sid,
                revision: 3,
                status: SessionStatus::Completed,
                started_at_ns: 1_736_496_000_000_000_000,
                ended_at_ns: Some(1_736_505_000_000_000_000),
                duration_ns: Some(9_000_000_000_000),
                tags: vec!["production".into(), "shift-1".into()],
                package: Some(Package {
                    name: "perception".into(),
                    version: Some("2.1.0".into()),
                }),
                metadata: serde_json::json!({"site": "berlin"})
                    .as_object()
                    .unwrap()
                    .clone(),
                error: None,
            }],
            records: vec![Record {
                seq: 42,
                session_id: Some(sid),
                timestamp_ns: 1_736_504_625_123_000_000,
                level: Level::Info,
                module: "perception".into(),
                message: "Detected 5 obstacles".into(),
                metadata: r#"{"obstacle_count":5}"#.into(),
                pid: Some(1234),
                uid: Some(1000),
                gid: Some(1000),
                process: Some("perceptiond".into()),
            }],
            gaps: vec![Gap {
                session_id: Some(sid),
                level: Level::Debug,
                reason: gap_reason::EVICTED.into(),
                dropped: 4312,
            }],
        }
    }

    #[test]
    fn roundtrip_through_gzip() {
        let b = sample();
        let body = b.encode(6);
        assert_eq!(Batch::decode(&body, 1 << 20).unwrap(), b);
    }

    /// The encoding must never drift silently: if this fails, the format
    /// changed, and BATCH_VERSION must be bumped (keeping the old decoder).
    #[test]
    fn golden_bytes() {
        let hex = hex::encode(sample().to_msgpack());
        let golden = include_str!("../tests/fixtures/batch_v1.hex").trim();
        assert_eq!(hex, golden, "Batch v1 msgpack encoding changed");
    }

    #[test]
    fn unknown_version_is_named() {
        let mut b = sample();
        b.version = 99;
        let err = Batch::from_msgpack(&b.to_msgpack()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported batch version 99 (this hub understands [1])"
        );
    }

    #[test]
    fn named_encoding_is_also_read() {
        let b = sample();
        let named = rmp_serde::to_vec_named(&b).unwrap();
        assert_eq!(Batch::from_msgpack(&named).unwrap(), b);
    }

    #[test]
    fn gzip_bomb_stops_at_limit() {
        let zeros = vec![0u8; 10 << 20];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&zeros).unwrap();
        let body = gz.finish().unwrap();
        assert!(body.len() < 20_000);
        assert!(matches!(
            Batch::decode(&body, 1 << 20),
            Err(WireError::TooLarge { limit }) if limit == 1 << 20
        ));
    }

    #[test]
    fn garbage_is_malformed_not_panic() {
        for body in [
            &b""[..],
            b"\x91",
            b"\x93\x01\x02",
            b"\xc1",
            b"\x81\xa1x\x01",
        ] {
            assert!(Batch::from_msgpack(body).is_err(), "{body:?}");
        }
        assert!(matches!(
            Batch::decode(b"not gzip", 100),
            Err(WireError::Gzip(_))
        ));
    }

    #[test]
    fn level_names_and_codes() {
        for l in Level::ALL {
            assert_eq!(Level::parse(l.as_str()), Some(l));
            assert_eq!(Level::parse(l.as_upper()), Some(l));
            assert_eq!(Level::from_code(l.code()), Some(l));
        }
        assert_eq!(Level::parse("WARNING"), Some(Level::Warn));
        assert_eq!(Level::parse("critical"), Some(Level::Fatal));
        assert_eq!(Level::parse("loud"), None);
        assert_eq!(serde_json::to_string(&Level::Warn).unwrap(), "\"WARN\"");
        assert_eq!(
            serde_json::from_str::<Level>("\"error\"").unwrap(),
            Level::Error
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(
            seq_ranges([5, 1, 2, 3, 7, 8, 2]),
            vec![(1, 3), (5, 5), (7, 8)]
        );
        assert_eq!(seq_ranges([]), vec![]);
    }
}
