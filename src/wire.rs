//! Versioned wire types shared by `agent` and `hub`: the sync [`Batch`] the
//! agent posts to `POST /api/v1/ingest/batches` (msgpack + gzip), the hub's
//! [`BatchAck`], the tus `Upload-Metadata` keys, and the JSON error body.
//!
//! Three batch encodings: v1 is the structs as msgpack arrays (row by
//! row); v2 keeps a msgpack envelope but packs the records column by
//! column (the `v2` module below), which compresses far better; v3
//! is v2 with the batch's [`Mark`]s after the columns; v4 (written by
//! default) is v3 with the agent's [`AgentReport`] after the marks. v1 and
//! v2 carry no marks: an agent sending them to an older hub keeps its
//! marks pending; v1 to v3 carry no report, which an agent sending them
//! simply leaves out (the next batch carries a fresh one).
//!
//! Invariant: this module is the only thing `agent` and `hub` share about
//! sync. A change to any struct here that alters the encoding bumps
//! [`BATCH_VERSION`]; the golden-bytes tests below fail otherwise. Every
//! decoder checks each count and length against the input left before it
//! allocates, so a hostile body costs at most a bounded multiple of its size.

use std::borrow::Cow;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Version of the [`Batch`] encoding this build writes by default.
pub const BATCH_VERSION: u32 = 4;
/// Versions of the [`Batch`] encoding this build reads (and can write:
/// [`Batch::to_msgpack`] writes the version named in [`Batch::version`]).
pub const SUPPORTED_BATCH_VERSIONS: &[u32] = &[1, 2, 3, 4];
/// Most string bytes [`Batch::from_msgpack`] materializes when no explicit
/// limit is given (see [`Batch::from_msgpack_limited`]).
pub const DEFAULT_MAX_DECODED_BYTES: usize = 128 << 20;

/// Stable `error.code`s of the hub that the agent acts on.
pub mod error_code {
    /// The hub does not read the batch's encoding version (400). The agent
    /// re-encodes in an older version instead of setting the batch aside.
    pub const UNSUPPORTED_BATCH_VERSION: &str = "unsupported_batch_version";
    /// The same refusal as hubs built before v2 spell it.
    pub const UNSUPPORTED_VERSION_OLD: &str = "unsupported_version";
}

/// Hub route for batches (relative to the hub's base URL).
pub const BATCHES_PATH: &str = "/api/v1/ingest/batches";
/// Hub route for tus artifact uploads (relative to the hub's base URL).
pub const UPLOADS_PATH: &str = "/api/v1/ingest/uploads";
/// `Content-Type` of a batch body.
pub const CONTENT_TYPE_MSGPACK: &str = "application/msgpack";
/// What a hub that reads zstd bodies says in the `Accept-Encoding` of its
/// answers on [`BATCHES_PATH`] (RFC 7694): an agent sends gzip until a
/// hub says this, so a hub from before zstd keeps getting gzip.
pub const ACCEPT_ENCODING: &str = "zstd, gzip";
/// Largest window a zstd body may make the hub's decoder hold: 2^23 bytes
/// (8 MiB). The agent's levels use 2 MiB at most; a frame asking for more
/// is refused as malformed instead of costing the hub its memory.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// How a batch body is compressed: its `Content-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// No `Content-Encoding` (or `identity`): msgpack as it is.
    Identity,
    Gzip,
    /// zstd, with a content checksum (as gzip carries its CRC).
    Zstd,
}

impl Coding {
    /// The coding a `Content-Encoding` value names (`None` for a header
    /// that is absent); `None` for one this build does not read.
    pub fn from_header(value: Option<&str>) -> Option<Coding> {
        match value.map(str::trim) {
            None | Some("identity") => Some(Coding::Identity),
            Some(v) if v.eq_ignore_ascii_case("gzip") => Some(Coding::Gzip),
            Some(v) if v.eq_ignore_ascii_case("zstd") => Some(Coding::Zstd),
            Some(_) => None,
        }
    }

    /// The `Content-Encoding` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Identity => "identity",
            Coding::Gzip => "gzip",
            Coding::Zstd => "zstd",
        }
    }

    /// Whether an `Accept-Encoding` value (of an answer) lists this coding.
    pub fn listed_in(self, accept: &str) -> bool {
        accept.split(',').any(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            // `zstd;q=0` says "not this one".
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0))
            });
            name.eq_ignore_ascii_case(self.as_str()) && !refused
        })
    }

    /// `raw` compressed: gzip at `level` 0-9, zstd at `level` 1-22.
    pub fn compress(self, raw: &[u8], level: i32) -> Vec<u8> {
        match self {
            Coding::Identity => raw.to_vec(),
            Coding::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(
                    Vec::with_capacity(raw.len() / 4 + 64),
                    flate2::Compression::new(level.clamp(0, 9) as u32),
                );
                gz.write_all(raw).expect("writing to a Vec cannot fail");
                gz.finish().expect("writing to a Vec cannot fail")
            }
            Coding::Zstd => {
                let zstd = || {
                    let mut c = zstd::bulk::Compressor::new(level)?;
                    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
                    c.compress(raw)
                };
                // Only an allocation failure could stop it, as for gzip.
                zstd().expect("zstd compresses any input")
            }
        }
    }

    /// `body` decompressed (itself, uncopied, for identity), failing once
    /// the output would exceed `limit` bytes (a bomb stops there, having
    /// cost at most that much).
    pub fn decompress(self, body: &[u8], limit: usize) -> Result<Cow<'_, [u8]>, WireError> {
        match self {
            Coding::Identity if body.len() > limit => Err(WireError::TooLarge { limit }),
            Coding::Identity => Ok(Cow::Borrowed(body)),
            Coding::Gzip => gunzip_limited(body, limit).map(Cow::Owned),
            Coding::Zstd => unzstd_limited(body, limit).map(Cow::Owned),
        }
    }
}

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
    /// The agent's disk was full: even after evicting, there was no room
    /// to store these records.
    pub const DISK_FULL: &str = "disk_full";
    /// SQLite refused to store these records for another reason (an I/O
    /// error).
    pub const WRITE_FAILED: &str = "write_failed";
    /// The agent's database file went bad while it ran; it was moved aside
    /// with these unsynced records in it.
    pub const CORRUPT: &str = "corrupt";
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

/// A mark (README "Marks"): a named moment of a session with a window
/// before and after it. The hub keeps each (device, `id`) once, at the
/// highest `revision` it has seen, so resending is harmless.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    /// The device's id of the mark, never reused on that device.
    pub id: u64,
    /// Increases with every change on the device (a pin released).
    pub revision: u64,
    /// `None` for a mark made while no session was active.
    pub session_id: Option<Uuid>,
    /// Robot wall clock, Unix nanoseconds.
    pub timestamp_ns: i64,
    pub before_ns: i64,
    pub after_ns: i64,
    pub name: String,
    /// `high` or `normal`.
    pub priority: String,
    /// JSON object text; empty when there is none.
    pub metadata: String,
    /// Why the device released its pin (`pin_released`), if it did.
    pub released: Option<String>,
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
    /// Only in v3 and later (v1's rows never carry it).
    #[serde(skip)]
    pub marks: Vec<Mark>,
    /// What the agent reports about itself when the batch left; only in
    /// v4 and later (`None` in older versions).
    #[serde(skip)]
    pub agent: Option<AgentReport>,
}

/// What an agent says about itself in a v4 batch (README "Devices"): its
/// version, its ring buffer's fill and bound, and the records it dropped
/// since it started, by reason. The hub keeps the latest per device.
/// Encoded as a msgpack array, like the rest of the head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    /// `logbookd`'s version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// Bytes the ring buffer takes on disk.
    pub buffer_bytes: u64,
    /// Its bound, `buffer.max_bytes`.
    pub buffer_max_bytes: u64,
    /// Records dropped since the agent started, by reason (only reasons
    /// with a count), at most [`AgentReport::MAX_REASONS`] of them.
    pub dropped: Vec<(String, u64)>,
}

impl AgentReport {
    /// Most reasons a report carries; more is a malformed batch.
    pub const MAX_REASONS: usize = 32;
    /// Longest version or reason text, in bytes.
    pub const MAX_TEXT: usize = 64;

    /// Checks the bounds above (the decoder refuses a report outside them).
    pub fn check(&self) -> Result<(), String> {
        if self.version.len() > Self::MAX_TEXT {
            return Err(format!(
                "agent version longer than {} bytes",
                Self::MAX_TEXT
            ));
        }
        if self.dropped.len() > Self::MAX_REASONS {
            return Err(format!("more than {} drop reasons", Self::MAX_REASONS));
        }
        if self.dropped.iter().any(|(r, _)| r.len() > Self::MAX_TEXT) {
            return Err(format!(
                "a drop reason longer than {} bytes",
                Self::MAX_TEXT
            ));
        }
        Ok(())
    }
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
    #[error("body is not valid zstd: {0}")]
    Zstd(std::io::Error),
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
    /// The uncompressed body in the encoding [`Batch::version`] names: the
    /// columnar v2 for 2, otherwise the v1 row form (msgpack, structs as
    /// arrays) carrying whatever version number the batch holds.
    pub fn to_msgpack(&self) -> Vec<u8> {
        match self.version {
            2..=4 => v2::encode(self),
            _ => rmp_serde::to_vec(self).expect("a Batch always serializes"),
        }
    }

    /// The request body: [`Batch::to_msgpack`], gzip-compressed at `level`
    /// (0-9).
    pub fn encode(&self, level: u32) -> Vec<u8> {
        Coding::Gzip.compress(&self.to_msgpack(), level as i32)
    }

    /// Decodes a request body: gunzips at most `max_decompressed` bytes (a
    /// gzip bomb fails with [`WireError::TooLarge`] after reading only that
    /// much), checks the version, then decodes, materializing at most
    /// `max_decompressed` bytes of strings.
    pub fn decode(gzipped: &[u8], max_decompressed: usize) -> Result<Batch, WireError> {
        Batch::decode_as(gzipped, Coding::Gzip, max_decompressed)
    }

    /// [`Batch::decode`] for a body in any [`Coding`].
    pub fn decode_as(
        body: &[u8],
        coding: Coding,
        max_decompressed: usize,
    ) -> Result<Batch, WireError> {
        let raw = coding.decompress(body, max_decompressed)?;
        Batch::from_msgpack_limited(&raw, max_decompressed)
    }

    /// Decodes an uncompressed body, checking the version first.
    pub fn from_msgpack(raw: &[u8]) -> Result<Batch, WireError> {
        Batch::from_msgpack_limited(raw, DEFAULT_MAX_DECODED_BYTES)
    }

    /// [`Batch::from_msgpack`], failing with [`WireError::TooLarge`] when
    /// the records' strings would take more than `limit` bytes. v2 names
    /// modules and processes once per batch, so its strings can outgrow
    /// the body; the limit keeps that growth to what a v1 body of `limit`
    /// bytes could hold.
    pub fn from_msgpack_limited(raw: &[u8], limit: usize) -> Result<Batch, WireError> {
        let version = peek_version(raw)?;
        match version {
            1 => rmp_serde::from_slice(raw).map_err(|e| WireError::Malformed(e.to_string())),
            2..=4 => v2::decode(raw, limit),
            found => Err(WireError::Version {
                found,
                supported: SUPPORTED_BATCH_VERSIONS,
            }),
        }
    }
}

/// Gunzips `body`, failing once the output would exceed `limit` bytes.
pub fn gunzip_limited(body: &[u8], limit: usize) -> Result<Vec<u8>, WireError> {
    read_limited(
        flate2::read::GzDecoder::new(body),
        limit,
        0,
        WireError::Gzip,
    )
}

/// Decompresses zstd `body` (one frame or several), failing once the
/// output would exceed `limit` bytes or a frame asks for a window larger
/// than 2^[`ZSTD_WINDOW_LOG_MAX`].
pub fn unzstd_limited(body: &[u8], limit: usize) -> Result<Vec<u8>, WireError> {
    // The frame's own size, when it states one, sizes the output at once.
    let stated = zstd::zstd_safe::get_frame_content_size(body)
        .ok()
        .flatten()
        .unwrap_or(0);
    let capacity = stated.min(limit as u64 + 1) as usize;
    let mut dec = zstd::stream::read::Decoder::with_buffer(body).map_err(WireError::Zstd)?;
    dec.window_log_max(ZSTD_WINDOW_LOG_MAX)
        .map_err(WireError::Zstd)?;
    read_limited(dec, limit, capacity, WireError::Zstd)
}

/// Reads a decoder to its end into a buffer of `capacity`, stopping with
/// [`WireError::TooLarge`] once the output would exceed `limit` bytes;
/// `invalid` names the decoder's own errors.
fn read_limited(
    dec: impl Read,
    limit: usize,
    capacity: usize,
    invalid: fn(std::io::Error) -> WireError,
) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(capacity);
    dec.take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(invalid)?;
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

/// One fuzz input (`fuzz/fuzz_targets/batch.rs`): `data` as a raw body,
/// a gzip body and a zstd body must decode to an error or a batch, never
/// panic, and stay within a 1 MiB string budget; a batch that decodes must
/// survive re-encoding in its own version unchanged.
pub fn fuzz_one(data: &[u8]) {
    const LIMIT: usize = 1 << 20;
    let decoded = [
        Batch::from_msgpack_limited(data, LIMIT),
        Batch::decode(data, LIMIT),
        Batch::decode_as(data, Coding::Zstd, LIMIT),
    ];
    for batch in decoded.into_iter().flatten() {
        let again = Batch::from_msgpack_limited(&batch.to_msgpack(), usize::MAX)
            .expect("a decoded batch re-encodes");
        assert_eq!(again, batch, "re-encoding changed the batch");
    }
}

/// Batch v2: the v1 envelope's fields, with the records as columns.
///
/// The body is a msgpack array `[2, head, columns]`, so any hub can read
/// its version: `head` is `[device, sent_at_ns, sessions, gaps]` as in v1
/// (they are few), and `columns` is a msgpack `bin` holding the records
/// column by column, every integer an LEB128 varint (signed ones
/// zigzagged), in this order:
///
/// 1. `n`, the number of records;
/// 2. seqs as deltas from the previous one (the first from 0), zigzag;
/// 3. timestamps the same way;
/// 4. levels, one byte each;
/// 5. session ids: a table (`k`, then `k` × 16 bytes), then per record
///    0 for none or 1 + its index in the table;
/// 6. modules: a table (`k`, then `k` × length + UTF-8), then per record
///    its index;
/// 7. processes: a table as for modules, then per record 0 or 1 + index;
/// 8. pid, uid, gid: per record 0 for none or 1 + the value, one column each;
/// 9. messages: per record its length, then all of them concatenated;
/// 10. metadata: the same.
///
/// Like values end up next to each other (runs of deltas of 1, repeated
/// indices, text beside text), which is what gzip's window feeds on.
///
/// v3 is `[3, head, columns, marks]`; v4 is `[4, head, columns, marks,
/// agent]`, `agent` an [`AgentReport`] or nil. The report could not ride
/// as a fifth element of the head: hubs before v4 decode the head as a
/// four-element tuple and refuse a longer one as malformed (a 400 the
/// agent would set the batch aside for), while an unknown version is a
/// refusal the agent answers by sending v3.
mod v2 {
    use std::collections::HashMap;

    use super::*;

    /// Fewest bytes a record takes in the columns: one per varint column
    /// (seq, time, session, module, process, pid, uid, gid, two lengths)
    /// and its level byte. Bounds `n` by the input before allocating.
    const MIN_RECORD_BYTES: usize = 11;
    /// msgpack `bin 32` marker: the columns' length is patched in after
    /// they are written, so its size must not depend on the length.
    const BIN32: u8 = 0xc6;

    pub fn encode(b: &Batch) -> Vec<u8> {
        let text: usize = b
            .records
            .iter()
            .map(|r| r.message.len() + r.metadata.len())
            .sum();
        let mut out = Vec::with_capacity(256 + text + b.records.len() * 24);
        // v3: the marks follow the columns; v4: then the agent's report.
        let version = b.version.clamp(2, 4);
        let v3 = version >= 3;
        rmp::encode::write_array_len(&mut out, envelope_len(version))
            .expect("writing to a Vec cannot fail");
        rmp::encode::write_uint(&mut out, u64::from(version))
            .expect("writing to a Vec cannot fail");
        rmp_serde::encode::write(&mut out, &(&b.device, b.sent_at_ns, &b.sessions, &b.gaps))
            .expect("a Batch always serializes");
        out.push(BIN32);
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        columns(&mut out, &b.records);
        let len = u32::try_from(out.len() - len_at - 4).expect("a batch is far below 4 GiB");
        out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
        if v3 {
            rmp_serde::encode::write(&mut out, &b.marks).expect("a Batch always serializes");
        }
        if version >= 4 {
            rmp_serde::encode::write(&mut out, &b.agent).expect("a Batch always serializes");
        }
        out
    }

    /// Elements of a v2 (and later) envelope.
    fn envelope_len(version: u32) -> u32 {
        match version {
            2 => 3,
            3 => 4,
            _ => 5,
        }
    }

    fn uv(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn zigzag(v: i64) -> u64 {
        ((v << 1) ^ (v >> 63)) as u64
    }

    fn unzigzag(v: u64) -> i64 {
        (v >> 1) as i64 ^ -((v & 1) as i64)
    }

    /// Interns values in first-seen order; `index` is their position.
    struct Table<K> {
        index: HashMap<K, u64, foldhash::fast::RandomState>,
        order: Vec<K>,
    }

    impl<K: std::hash::Hash + Eq + Copy> Table<K> {
        fn new() -> Self {
            Table {
                index: HashMap::default(),
                order: Vec::new(),
            }
        }
        fn id(&mut self, k: K) -> u64 {
            *self.index.entry(k).or_insert_with(|| {
                self.order.push(k);
                self.order.len() as u64 - 1
            })
        }
    }

    fn strings(out: &mut Vec<u8>, table: &Table<&str>) {
        uv(out, table.order.len() as u64);
        for s in &table.order {
            uv(out, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
        }
    }

    fn columns(out: &mut Vec<u8>, records: &[Record]) {
        uv(out, records.len() as u64);
        let mut prev = 0u64;
        for r in records {
            uv(out, zigzag(r.seq.wrapping_sub(prev) as i64));
            prev = r.seq;
        }
        let mut prev = 0i64;
        for r in records {
            uv(out, zigzag(r.timestamp_ns.wrapping_sub(prev)));
            prev = r.timestamp_ns;
        }
        out.extend(records.iter().map(|r| r.level.code()));

        let mut ids = Vec::with_capacity(records.len());
        let mut sessions = Table::new();
        for r in records {
            ids.push(r.session_id.map_or(0, |s| 1 + sessions.id(s)));
        }
        uv(out, sessions.order.len() as u64);
        for s in &sessions.order {
            out.extend_from_slice(s.as_bytes());
        }
        ids.iter().for_each(|&i| uv(out, i));

        ids.clear();
        let mut modules = Table::new();
        for r in records {
            ids.push(modules.id(r.module.as_str()));
        }
        strings(out, &modules);
        ids.iter().for_each(|&i| uv(out, i));

        ids.clear();
        let mut processes = Table::new();
        for r in records {
            ids.push(r.process.as_deref().map_or(0, |p| 1 + processes.id(p)));
        }
        strings(out, &processes);
        ids.iter().for_each(|&i| uv(out, i));

        for field in [|r: &Record| r.pid, |r: &Record| r.uid, |r: &Record| r.gid] {
            for r in records {
                uv(out, field(r).map_or(0, |v| 1 + u64::from(v)));
            }
        }
        let texts: [fn(&Record) -> &str; 2] = [|r| &r.message, |r| &r.metadata];
        for field in texts {
            for r in records {
                uv(out, field(r).len() as u64);
            }
            for r in records {
                out.extend_from_slice(field(r).as_bytes());
            }
        }
    }

    fn bad(what: impl Into<String>) -> WireError {
        WireError::Malformed(format!("batch v2: {}", what.into()))
    }

    pub fn decode(raw: &[u8], limit: usize) -> Result<Batch, WireError> {
        let mut cur = raw;
        let len = rmp::decode::read_array_len(&mut cur).map_err(|_| bad("not an array"))?;
        let version: u32 =
            rmp::decode::read_int(&mut cur).map_err(|_| bad("version is not an integer"))?;
        let want = envelope_len(version);
        if len != want {
            return Err(bad(format!(
                "v{version} envelope has {len} elements, not {want}"
            )));
        }
        type Head = (Device, i64, Vec<SessionState>, Vec<Gap>);
        let (device, sent_at_ns, sessions, gaps): Head = {
            let mut de = rmp_serde::Deserializer::new(&mut cur);
            Deserialize::deserialize(&mut de).map_err(|e| bad(format!("head: {e}")))?
        };
        let cols = rmp::decode::read_bin_len(&mut cur).map_err(|_| bad("no record columns"))?;
        let cols = cols as usize;
        if (version < 3 && cols != cur.len()) || cols > cur.len() {
            return Err(bad(format!(
                "record columns say {cols} bytes but {} follow",
                cur.len()
            )));
        }
        let (columns, mut rest) = cur.split_at(cols);
        let records = Columns {
            buf: columns,
            spent: 0,
            limit,
        }
        .records()?;
        let marks: Vec<Mark> = if version >= 3 {
            let mut de = rmp_serde::Deserializer::new(&mut rest);
            Deserialize::deserialize(&mut de).map_err(|e| bad(format!("marks: {e}")))?
        } else {
            Vec::new()
        };
        let agent: Option<AgentReport> = if version >= 4 {
            let mut de = rmp_serde::Deserializer::new(&mut rest);
            let agent: Option<AgentReport> =
                Deserialize::deserialize(&mut de).map_err(|e| bad(format!("agent report: {e}")))?;
            if let Some(a) = &agent {
                a.check().map_err(|e| bad(format!("agent report: {e}")))?;
            }
            agent
        } else {
            None
        };
        if !rest.is_empty() {
            let after = if version >= 4 {
                "agent report"
            } else {
                "marks"
            };
            return Err(bad(format!("{} bytes after the {after}", rest.len())));
        }
        Ok(Batch {
            version,
            device,
            sent_at_ns,
            sessions,
            records,
            gaps,
            marks,
            agent,
        })
    }

    /// A reader over the record columns that never reads past them and
    /// keeps count of the string bytes it materializes.
    struct Columns<'a> {
        buf: &'a [u8],
        spent: usize,
        limit: usize,
    }

    impl<'a> Columns<'a> {
        fn uv(&mut self) -> Result<u64, WireError> {
            let mut v = 0u64;
            for (i, &b) in self.buf.iter().enumerate().take(10) {
                if i == 9 && b > 1 {
                    break;
                }
                v |= u64::from(b & 0x7f) << (7 * i);
                if b < 0x80 {
                    self.buf = &self.buf[i + 1..];
                    return Ok(v);
                }
            }
            Err(bad("truncated or overlong varint"))
        }

        /// A varint that must be at most `max`.
        fn index(&mut self, max: u64, what: &str) -> Result<u64, WireError> {
            let v = self.uv()?;
            if v > max {
                return Err(bad(format!("{what} index {v} outside its table")));
            }
            Ok(v)
        }

        /// A count of items taking at least `min_bytes` each, checked
        /// against what is left before anything is allocated for them.
        fn count(&mut self, min_bytes: usize, what: &str) -> Result<usize, WireError> {
            let v = self.uv()?;
            if v > (self.buf.len() / min_bytes) as u64 {
                return Err(bad(format!(
                    "{v} {what} cannot fit in the {} bytes left",
                    self.buf.len()
                )));
            }
            Ok(v as usize)
        }

        fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], WireError> {
            if n > self.buf.len() as u64 {
                return Err(bad(format!("{what} runs past the end")));
            }
            let (head, rest) = self.buf.split_at(n as usize);
            self.buf = rest;
            Ok(head)
        }

        fn spend(&mut self, n: usize) -> Result<(), WireError> {
            self.spent = self.spent.saturating_add(n);
            if self.spent > self.limit {
                return Err(WireError::TooLarge { limit: self.limit });
            }
            Ok(())
        }

        fn table(&mut self, what: &str) -> Result<Vec<&'a str>, WireError> {
            let k = self.count(1, what)?;
            let mut out = Vec::with_capacity(k);
            for _ in 0..k {
                let len = self.uv()?;
                let bytes = self.take(len, what)?;
                out.push(
                    std::str::from_utf8(bytes).map_err(|_| bad(format!("{what}: not UTF-8")))?,
                );
            }
            Ok(out)
        }

        /// `n` lengths, then the strings they measure, concatenated.
        fn texts(&mut self, n: usize, what: &str) -> Result<Vec<String>, WireError> {
            let mut lens = Vec::with_capacity(n);
            let mut total = 0u64;
            for _ in 0..n {
                let len = self.uv()?;
                total = total.saturating_add(len);
                lens.push(len as usize);
            }
            let block = self.take(total, what)?;
            self.spend(block.len())?;
            let block =
                std::str::from_utf8(block).map_err(|_| bad(format!("{what}: not UTF-8")))?;
            let mut out = Vec::with_capacity(n);
            let mut at = 0;
            for len in lens {
                let s = block
                    .get(at..at + len)
                    .ok_or_else(|| bad(format!("{what}: a length splits a character")))?;
                out.push(s.to_owned());
                at += len;
            }
            Ok(out)
        }

        fn records(mut self) -> Result<Vec<Record>, WireError> {
            let n = self.count(MIN_RECORD_BYTES, "records")?;
            let mut seqs = Vec::with_capacity(n);
            let mut prev = 0u64;
            for _ in 0..n {
                prev = prev.wrapping_add(unzigzag(self.uv()?) as u64);
                seqs.push(prev);
            }
            let mut times = Vec::with_capacity(n);
            let mut prev = 0i64;
            for _ in 0..n {
                prev = prev.wrapping_add(unzigzag(self.uv()?));
                times.push(prev);
            }
            let levels = self.take(n as u64, "levels")?;

            let k = self.count(16, "session ids")?;
            let table = self.take(16 * k as u64, "session ids")?;
            let ids: Vec<Uuid> = table
                .chunks_exact(16)
                .map(|c| Uuid::from_bytes(c.try_into().expect("chunks of 16")))
                .collect();
            let mut session_ids = Vec::with_capacity(n);
            for _ in 0..n {
                let i = self.index(k as u64, "session")?;
                session_ids.push(i.checked_sub(1).map(|i| ids[i as usize]));
            }

            let modules = self.table("modules")?;
            let mut module_ids = Vec::with_capacity(n);
            for _ in 0..n {
                let i = self.uv()?;
                if i >= modules.len() as u64 {
                    return Err(bad(format!("module index {i} outside its table")));
                }
                module_ids.push(i as usize);
            }
            let processes = self.table("processes")?;
            let mut process_ids = Vec::with_capacity(n);
            for _ in 0..n {
                process_ids.push(self.index(processes.len() as u64, "process")? as usize);
            }
            let mut creds = [(); 3].map(|_| Vec::with_capacity(n));
            for col in &mut creds {
                for _ in 0..n {
                    let v = self.uv()?;
                    let v = match v.checked_sub(1) {
                        None => None,
                        Some(v) => Some(u32::try_from(v).map_err(|_| bad("id out of range"))?),
                    };
                    col.push(v);
                }
            }
            let messages = self.texts(n, "messages")?;
            let metadata = self.texts(n, "metadata")?;
            if !self.buf.is_empty() {
                return Err(bad(format!("{} bytes after the columns", self.buf.len())));
            }

            let mut out = Vec::with_capacity(n);
            let [pids, uids, gids] = creds;
            for (i, (message, metadata)) in messages.into_iter().zip(metadata).enumerate() {
                let module = modules[module_ids[i]];
                let process = process_ids[i].checked_sub(1).map(|p| processes[p]);
                self.spend(module.len() + process.map_or(0, str::len))?;
                out.push(Record {
                    seq: seqs[i],
                    session_id: session_ids[i],
                    timestamp_ns: times[i],
                    level: Level::from_code(levels[i])
                        .ok_or_else(|| bad(format!("level code {} out of range 0-5", levels[i])))?,
                    module: module.to_owned(),
                    message,
                    metadata,
                    pid: pids[i],
                    uid: uids[i],
                    gid: gids[i],
                    process: process.map(str::to_owned),
                });
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Batch {
        sample_v(BATCH_VERSION)
    }

    fn sample_v(version: u32) -> Batch {
        let session = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001);
        Batch {
            version,
            device: Device {
                id: "robot-7".into(),
                name: "warehouse-robot-07".into(),
            },
            sent_at_ns: 1_736_496_000_000_000_000,
            sessions: vec![SessionState {
                id: session,
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
                session_id: Some(session),
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
                session_id: Some(session),
                level: Level::Debug,
                reason: gap_reason::EVICTED.into(),
                dropped: 4312,
            }],
            marks: if version >= 3 {
                vec![Mark {
                    id: 7,
                    revision: 1,
                    session_id: Some(session),
                    timestamp_ns: 1_736_504_625_000_000_000,
                    before_ns: 30_000_000_000,
                    after_ns: 10_000_000_000,
                    name: "collision".into(),
                    priority: "high".into(),
                    metadata: r#"{"bumper":"front"}"#.into(),
                    released: None,
                }]
            } else {
                Vec::new()
            },
            agent: (version >= 4).then(|| AgentReport {
                version: "0.9.0".into(),
                buffer_bytes: 48 << 20,
                buffer_max_bytes: 256 << 20,
                dropped: vec![("evicted".into(), 4312), ("bad_json".into(), 2)],
            }),
        }
    }

    /// Records that exercise every column: none and several sessions,
    /// missing credentials and process, seqs out of order and at the ends
    /// of the range, clocks jumping back, multi-byte text.
    fn varied() -> Vec<Record> {
        let base = sample_v(2).records[0].clone();
        let s2 = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0002);
        let mut out = Vec::new();
        for (i, seq) in [43, 44, 7, 45, u64::MAX, 0, 46].into_iter().enumerate() {
            let mut r = base.clone();
            r.seq = seq;
            r.timestamp_ns = [1, -5, i64::MAX, i64::MIN, 0, 1_736_504_625_123_000_000, 9][i];
            r.level = Level::ALL[i % 6];
            r.session_id = [None, r.session_id, Some(s2)][i % 3];
            r.module = ["nav", "perception", "nav", "", "ünïcødé", "nav", "x"][i].into();
            r.message = ["", "ok", "größe 5 µm", "x", "\n", "🤖 done", ""][i].into();
            r.metadata = if i % 2 == 0 {
                String::new()
            } else {
                format!("{{\"i\":{i}}}")
            };
            r.pid = (i % 3 != 0).then_some(i as u32 * 1000);
            r.uid = (i % 2 == 0).then_some(u32::MAX);
            r.gid = (i % 4 != 0).then_some(0);
            r.process = (i % 3 != 1).then(|| format!("proc-{}", i % 2));
            out.push(r);
        }
        out
    }

    #[test]
    fn roundtrip_through_gzip() {
        for version in SUPPORTED_BATCH_VERSIONS {
            let mut b = sample_v(*version);
            let body = b.encode(6);
            assert_eq!(Batch::decode(&body, 1 << 20).unwrap(), b);
            b.records = varied();
            let body = b.encode(6);
            assert_eq!(Batch::decode(&body, 1 << 20).unwrap(), b, "v{version}");
            b.records.clear();
            b.sessions.clear();
            b.gaps.clear();
            assert_eq!(Batch::decode(&b.encode(1), 1 << 20).unwrap(), b);
        }
    }

    #[test]
    fn every_coding_round_trips() {
        let mut b = sample_v(BATCH_VERSION);
        b.records = varied();
        let raw = b.to_msgpack();
        for coding in [Coding::Identity, Coding::Gzip, Coding::Zstd] {
            let body = coding.compress(&raw, 3);
            assert_eq!(coding.decompress(&body, 1 << 20).unwrap(), raw);
            assert_eq!(Batch::decode_as(&body, coding, 1 << 20).unwrap(), b);
            let header = Some(coding.as_str());
            assert_eq!(Coding::from_header(header), Some(coding));
        }
        // Two zstd frames one after the other are one body.
        let mut two = Coding::Zstd.compress(&raw[..10], 1);
        two.extend(Coding::Zstd.compress(&raw[10..], 1));
        assert_eq!(unzstd_limited(&two, 1 << 20).unwrap(), raw);
        assert_eq!(Coding::from_header(None), Some(Coding::Identity));
        assert_eq!(Coding::from_header(Some(" ZSTD ")), Some(Coding::Zstd));
        assert_eq!(Coding::from_header(Some("br")), None);
        assert_eq!(Coding::from_header(Some("gzip, zstd")), None);
    }

    #[test]
    fn zstd_bombs_wide_windows_and_garbage_are_refused() {
        let bomb = Coding::Zstd.compress(&vec![0u8; 8 << 20], 3);
        assert!(bomb.len() < 4 << 10, "{}", bomb.len());
        assert!(matches!(
            unzstd_limited(&bomb, 1 << 20),
            Err(WireError::TooLarge { limit }) if limit == 1 << 20
        ));
        assert_eq!(unzstd_limited(&bomb, 8 << 20).unwrap().len(), 8 << 20);
        // A frame asking for a window past 2^ZSTD_WINDOW_LOG_MAX.
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        e.set_parameter(zstd::zstd_safe::CParameter::WindowLog(
            ZSTD_WINDOW_LOG_MAX + 1,
        ))
        .unwrap();
        e.write_all(b"a window too wide").unwrap();
        let wide = e.finish().unwrap();
        let err = unzstd_limited(&wide, 1 << 20).unwrap_err();
        assert!(matches!(err, WireError::Zstd(_)), "{err}");
        // Cut short, a flipped checksum, and not zstd at all.
        let body = Coding::Zstd.compress(&sample_v(BATCH_VERSION).to_msgpack(), 3);
        assert!(unzstd_limited(&body[..body.len() - 6], 1 << 20).is_err());
        let mut flipped = body.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(unzstd_limited(&flipped, 1 << 20).is_err());
        assert!(unzstd_limited(b"not zstd", 1 << 20).is_err());
        // Identity is bounded too.
        assert!(matches!(
            Batch::decode_as(&[0x90; 64], Coding::Identity, 10),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn accept_encoding_is_read_as_rfc_9110_writes_it() {
        let zstd = |v: &str| Coding::Zstd.listed_in(v);
        assert!(zstd(ACCEPT_ENCODING));
        assert!(zstd("gzip,zstd"));
        assert!(zstd("ZSTD;q=0.5, gzip"));
        assert!(!zstd("gzip"));
        assert!(!zstd(""));
        assert!(!zstd("x-zstd, zstdx"));
        assert!(!zstd("zstd;q=0, gzip"));
        assert!(!zstd("zstd; q=0.0"));
        assert!(Coding::Gzip.listed_in(ACCEPT_ENCODING));
    }

    /// The encoding must never drift silently: if this fails, the format
    /// changed, and BATCH_VERSION must be bumped (keeping the old decoder).
    #[test]
    fn golden_bytes() {
        let golden = |v: u32, fixture: &str| {
            let hex = hex::encode(sample_v(v).to_msgpack());
            assert_eq!(hex, fixture.trim(), "Batch v{v} encoding changed");
            let raw = hex::decode(fixture.trim()).unwrap();
            assert_eq!(Batch::from_msgpack(&raw).unwrap(), sample_v(v));
        };
        golden(1, include_str!("../tests/fixtures/batch_v1.hex"));
        golden(2, include_str!("../tests/fixtures/batch_v2.hex"));
        golden(3, include_str!("../tests/fixtures/batch_v3.hex"));
        golden(4, include_str!("../tests/fixtures/batch_v4.hex"));
        // The fuzz seeds are the same batch.
        let seeds: [(&[u8], u32); 4] = [
            (
                include_bytes!("../tests/fixtures/formats/batch/v1.msgpack"),
                1,
            ),
            (
                include_bytes!("../tests/fixtures/formats/batch/v2.msgpack"),
                2,
            ),
            (
                include_bytes!("../tests/fixtures/formats/batch/v2.msgpack.gz"),
                2,
            ),
            (
                include_bytes!("../tests/fixtures/formats/batch/v4.msgpack"),
                4,
            ),
        ];
        for (i, (body, v)) in seeds.into_iter().enumerate() {
            let got = Batch::from_msgpack(body).or_else(|_| Batch::decode(body, 1 << 20));
            assert_eq!(got.unwrap(), sample_v(v), "seed {i}");
        }
    }

    #[test]
    fn unknown_version_is_named() {
        let mut b = sample();
        b.version = 99;
        let err = Batch::from_msgpack(&b.to_msgpack()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported batch version 99 (this hub understands [1, 2, 3, 4])"
        );
    }

    /// A hub before v4 reads the version first, so a v4 batch is a version
    /// refusal there (the agent then sends v3), never a malformed batch.
    #[test]
    fn agent_report_bounds() {
        let mut b = sample_v(4);
        let ok = b.to_msgpack();
        assert_eq!(Batch::from_msgpack(&ok).unwrap(), b);
        b.agent.as_mut().unwrap().dropped = (0..=AgentReport::MAX_REASONS)
            .map(|i| (format!("r{i}"), 1))
            .collect();
        let err = Batch::from_msgpack(&b.to_msgpack())
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than 32 drop reasons"), "{err}");
        b.agent.as_mut().unwrap().dropped = vec![("é".repeat(40), 1)];
        let err = Batch::from_msgpack(&b.to_msgpack())
            .unwrap_err()
            .to_string();
        assert!(err.contains("longer than 64 bytes"), "{err}");
        b.agent = None;
        assert_eq!(Batch::from_msgpack(&b.to_msgpack()).unwrap(), b);
        // Older versions carry no report: it is left out, nothing else.
        let mut v3 = sample_v(4);
        v3.version = 3;
        let back = Batch::from_msgpack(&v3.to_msgpack()).unwrap();
        assert_eq!(back.agent, None);
        assert_eq!(back.marks, v3.marks);
    }

    #[test]
    fn named_encoding_is_also_read() {
        let b = sample_v(1);
        let named = rmp_serde::to_vec_named(&b).unwrap();
        assert_eq!(Batch::from_msgpack(&named).unwrap(), b);
    }

    /// v2 names a module once and uses it for every record, so a small
    /// body could stand for huge strings: the decoder stops at the limit.
    #[test]
    fn v2_string_growth_stops_at_limit() {
        let mut b = sample_v(2);
        let mut r = b.records[0].clone();
        r.module = "m".repeat(200);
        r.message.clear();
        r.metadata.clear();
        b.records = (0..10_000).map(|seq| Record { seq, ..r.clone() }).collect();
        let raw = b.to_msgpack();
        assert!(raw.len() < 200_000, "{}", raw.len());
        assert!(matches!(
            Batch::from_msgpack_limited(&raw, 1 << 20),
            Err(WireError::TooLarge { limit }) if limit == 1 << 20
        ));
        assert_eq!(Batch::from_msgpack_limited(&raw, 4 << 20).unwrap(), b);
    }

    /// Hand-made v2 bodies whose counts, lengths and indices lie: each is
    /// refused with a reason, none allocates by the lie.
    #[test]
    fn v2_lies_are_malformed() {
        let head = |cols: &[u8]| {
            let mut out = vec![0x93, 0x02];
            out.extend(rmp_serde::to_vec(&(&sample_v(2).device, 0i64, (), ())).unwrap());
            // Replace the two unit placeholders by empty arrays.
            out.truncate(out.len() - 2);
            out.extend([0x90, 0x90, 0xc4, cols.len() as u8]);
            out.extend_from_slice(cols);
            out
        };
        let check = |cols: &[u8], want: &str| {
            let err = Batch::from_msgpack(&head(cols)).unwrap_err().to_string();
            assert!(err.contains(want), "{cols:?}: {err}");
        };
        // n = 2^62 records in 3 bytes.
        check(
            &[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40],
            "cannot fit",
        );
        check(&[0xff; 11], "varint");
        // One record: n, seq, time, level, sessions (none), its index,
        // modules (one: "m"), its index, processes (none), its index, pid,
        // uid, gid, message length and text, metadata length and text.
        let one = [1, 2, 2, 2, 0, 0, 1, 1, b'm', 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(Batch::from_msgpack(&head(&one)).unwrap().records.len(), 1);
        let with = |at: usize, v: &[u8]| {
            let mut c = one.to_vec();
            c.splice(at..at + 1, v.iter().copied());
            c
        };
        check(&with(5, &[1]), "session index 1 outside");
        check(&with(6, &[0]), "module index 1 outside");
        check(&with(3, &[9]), "level code 9");
        check(&with(15, &[9]), "messages runs past the end");
        check(&with(15, &[1, 0xff]), "messages: not UTF-8");
        check(&with(16, &[0, 5]), "1 bytes after the columns");
        let b = Batch::from_msgpack(&head(&with(16, &[2, 0xc3, 0xa9]))).unwrap();
        assert_eq!(b.records[0].metadata, "é");
        // The smallest valid body: no records, empty tables.
        assert!(Batch::from_msgpack(&head(&[0, 0, 0, 0])).is_ok());
        check(&[0, 0, 0, 0, 7], "1 bytes after the columns");
    }

    /// Deterministic mutations (flips, truncations, insertions) of real
    /// v1 and v2 bodies: an error or a batch, never a panic; what decodes
    /// re-encodes to something that decodes to the same batch.
    #[test]
    fn mutated_bodies_never_panic() {
        let mut rng = crate::test_rng::Rng::new(0x9E37_79B9_7F4A_7C15);
        let mut next = || rng.next();
        for version in [1, 2] {
            let mut b = sample_v(version);
            b.records = varied();
            let raw = b.to_msgpack();
            for _ in 0..5000 {
                let mut m = raw.clone();
                let i = (next() as usize) % m.len();
                match next() % 3 {
                    0 => m[i] ^= 1 << (next() % 8),
                    1 => m.truncate(i),
                    _ => m.insert(i, next() as u8),
                }
                fuzz_one(&m);
            }
        }
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
