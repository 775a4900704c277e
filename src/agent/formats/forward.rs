//! The Fluent Forward protocol v1 over a stream socket: [`ForwardDecoder`]
//! is fed the bytes of one connection as they arrive and yields one
//! [`Frame`] per complete message (Message, Forward, PackedForward or
//! CompressedPackedForward mode), with its records and the ack to write
//! back when the sender asked for one (`chunk` option).
//!
//! The Unix-socket case needs no handshake (Fluentd only sends HELO when
//! `<security>` is configured, which a local socket does not use), so the
//! first bytes are already a message.
//!
//! Invariant: memory per connection is bounded by
//! [`Limits::max_frame_bytes`] (buffered, not yet complete) plus
//! [`Limits::max_decompressed_bytes`] (one gunzipped payload); a frame that
//! is well-formed msgpack but not a valid Forward message is skipped and
//! counted, and only a stream that can no longer be framed (not msgpack, or
//! a frame over the limit) is fatal, for this connection only.

use std::io::Read as _;

use serde_json::{Map, Value};

use super::fields::{self, Context};
use super::msgpack::{self, Head, Reader, Scan};
use crate::agent::record::Incoming;

/// Bounds for one connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest frame (one msgpack message) accepted. Fluent Bit sends
    /// chunks of about 2 MiB, Fluentd's memory buffer 8 MiB.
    pub max_frame_bytes: usize,
    /// Largest gunzipped CompressedPackedForward payload.
    pub max_decompressed_bytes: usize,
    /// `ingest.max_record_bytes`: larger records are cut visibly.
    pub max_record_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_frame_bytes: 16 << 20,
            max_decompressed_bytes: 64 << 20,
            max_record_bytes: 64 << 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BadForward {
    // Fatal: the stream cannot be framed any more.
    #[error("frame exceeds {limit} bytes")]
    FrameTooLarge { limit: usize },
    #[error("not msgpack at byte {offset} of the stream")]
    NotMsgpack { offset: u64 },
    // The frame is skipped, the connection goes on.
    #[error("frame is not a Forward message: {0}")]
    BadFrame(&'static str),
    #[error("unknown compression {0:?} (expected \"gzip\" or \"text\")")]
    UnknownCompression(String),
    #[error("compressed payload is not valid gzip: {0}")]
    Gzip(String),
    #[error("decompressed payload exceeds {limit} bytes")]
    DecompressedTooLarge { limit: usize },
    // One entry is skipped, the others in its frame are kept.
    #[error("entry {index}: {what}")]
    BadEntry { index: usize, what: &'static str },
}

impl BadForward {
    /// A fatal error means the connection must be closed: the stream has no
    /// recoverable frame boundary after it.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            BadForward::FrameTooLarge { .. } | BadForward::NotMsgpack { .. }
        )
    }
}

/// One complete Forward message.
#[derive(Debug, Default, PartialEq)]
pub struct Frame {
    pub tag: String,
    /// Records in sending order.
    pub records: Vec<Incoming>,
    /// Entries (or the whole frame) that could not be used; counted as bad
    /// records by the listener.
    pub bad: usize,
    /// The first reason something was bad, for the report.
    pub first_error: Option<BadForward>,
    /// msgpack `{"ack": <chunk>}` to write back once the records are handed
    /// to the pipeline, when the sender asked with the `chunk` option.
    pub ack: Option<Vec<u8>>,
}

impl Frame {
    fn fail(&mut self, e: BadForward) {
        self.bad += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

/// Incremental decoder for one connection.
#[derive(Debug)]
pub struct ForwardDecoder {
    limits: Limits,
    buf: Vec<u8>,
    /// Start of the first unconsumed frame in `buf`.
    start: usize,
    /// Progress of the scan for the end of the frame at `start`.
    scan: Scan,
    /// Bytes consumed before `buf[0]`, for error offsets.
    consumed: u64,
    /// Set once a fatal error was returned; every later call returns it.
    poisoned: Option<BadForward>,
}

impl ForwardDecoder {
    pub fn new(limits: Limits) -> ForwardDecoder {
        ForwardDecoder {
            limits,
            buf: Vec::new(),
            start: 0,
            scan: Scan::new(0),
            consumed: 0,
            poisoned: None,
        }
    }

    /// Appends bytes read from the connection. Call [`Self::next_frame`]
    /// until it returns `Ok(None)` after each feed.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.poisoned.is_some() {
            return;
        }
        // Drop consumed frames before growing, so the buffer holds at most
        // one partial frame plus one read.
        if self.start > 0 && (self.start == self.buf.len() || self.start >= self.buf.len() / 2) {
            self.buf.drain(..self.start);
            self.consumed += self.start as u64;
            self.scan.pos -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet part of a complete frame.
    pub fn pending_bytes(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed, or a
    /// fatal error after which the connection should be closed (a
    /// non-fatal problem is reported inside the [`Frame`]).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, BadForward> {
        let mut records = Vec::new();
        let frame = self.next_frame_with(&mut |r| records.push(r))?;
        Ok(frame.map(|f| Frame { records, ..f }))
    }

    /// [`Self::next_frame`], handing each record to `sink` as soon as it is
    /// decoded instead of collecting them in [`Frame::records`] (left
    /// empty). A listener turns each into a row at once, so a 512-entry
    /// PackedForward frame never holds 512 decoded records and their maps
    /// at the same time: the allocator reuses one record's memory for the
    /// next instead of spilling out of its thread cache.
    pub fn next_frame_with(
        &mut self,
        sink: &mut impl FnMut(Incoming),
    ) -> Result<Option<Frame>, BadForward> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        if self.start == self.buf.len() {
            return Ok(None);
        }
        let limit = self.limits.max_frame_bytes;
        match self.scan.run(&self.buf) {
            Ok(()) if self.scan.pos - self.start <= limit => {}
            Ok(()) => return Err(self.poison(BadForward::FrameTooLarge { limit })),
            Err(msgpack::Error::Eof) if self.pending_bytes() <= limit => return Ok(None),
            Err(msgpack::Error::Eof) => {
                return Err(self.poison(BadForward::FrameTooLarge { limit }))
            }
            Err(_) => {
                let offset = self.consumed + self.scan.pos as u64;
                return Err(self.poison(BadForward::NotMsgpack { offset }));
            }
        }
        let end = self.scan.pos;
        let frame = decode_frame_with(&self.buf[self.start..end], &self.limits, sink);
        self.start = end;
        self.scan = Scan::new(end);
        Ok(Some(frame))
    }

    fn poison(&mut self, e: BadForward) -> BadForward {
        self.poisoned = Some(e.clone());
        self.buf = Vec::new();
        self.start = 0;
        e
    }
}

/// Decodes one complete frame (its bytes are exactly one msgpack value),
/// records collected (the tests' form; the decoder hands them over).
#[cfg(test)]
fn decode_frame(bytes: &[u8], limits: &Limits) -> Frame {
    let mut records = Vec::new();
    let frame = decode_frame_with(bytes, limits, &mut |r| records.push(r));
    Frame { records, ..frame }
}

/// Decodes one complete frame (its bytes are exactly one msgpack value),
/// each record handed to `sink` (see [`ForwardDecoder::next_frame_with`]).
fn decode_frame_with(bytes: &[u8], limits: &Limits, sink: &mut impl FnMut(Incoming)) -> Frame {
    let mut frame = Frame::default();
    if let Err(e) = decode_into(bytes, limits, &mut frame, sink) {
        frame.fail(e);
    }
    frame
}

/// The `option` map's fields this protocol version defines.
#[derive(Debug, Default)]
struct Options {
    chunk: Option<String>,
    compressed: Option<String>,
}

fn decode_into(
    bytes: &[u8],
    limits: &Limits,
    frame: &mut Frame,
    sink: &mut impl FnMut(Incoming),
) -> Result<(), BadForward> {
    let bad = BadForward::BadFrame;
    let mut r = Reader::new(bytes);
    let n = match r.head() {
        Ok(Head::Array(n @ 2..=4)) => n,
        Ok(_) => return Err(bad("not an array of 2 to 4 elements")),
        Err(_) => return Err(bad("truncated")),
    };
    frame.tag = match r.head() {
        Ok(Head::Str(s) | Head::Bin(s)) => msgpack::text(s),
        _ => return Err(bad("tag is not a string")),
    };
    // The second element tells the mode.
    let second = r.clone().head().map_err(|_| bad("truncated"))?;
    match second {
        Head::Array(_) => {
            // Forward: [tag, [[time, record], ...], option?]
            let Ok(Head::Array(entries)) = r.head() else {
                return Err(bad("truncated"));
            };
            // Entries first, in place; the options come after them.
            entries_into(&mut r, Some(entries), limits, frame, sink);
            let opts = options(&mut r, n, 3)?;
            ack(frame, &opts);
        }
        Head::Str(_) | Head::Bin(_) => {
            // PackedForward: [tag, <concatenated entries>, option?]
            let (Ok(Head::Str(payload)) | Ok(Head::Bin(payload))) = r.head() else {
                return Err(bad("truncated"));
            };
            let opts = options(&mut r, n, 3)?;
            ack(frame, &opts);
            match opts.compressed.as_deref() {
                None | Some("text") => {
                    entries_into(&mut Reader::new(payload), None, limits, frame, sink)
                }
                Some("gzip") => {
                    let raw = gunzip(payload, limits.max_decompressed_bytes)?;
                    entries_into(&mut Reader::new(&raw), None, limits, frame, sink)
                }
                Some(other) => return Err(BadForward::UnknownCompression(other.to_owned())),
            }
        }
        _ => {
            // Message: [tag, time, record, option?]
            if n < 3 {
                return Err(bad("message mode needs a time and a record"));
            }
            let entry_start = r.pos;
            let parsed = entry(&mut r, entry_start, &frame.tag, limits);
            if parsed.is_err() {
                // Find the option after the unusable entry.
                r.pos = entry_start;
                r.skip().map_err(|_| bad("truncated"))?;
                r.skip().map_err(|_| bad("truncated"))?;
            }
            let opts = options(&mut r, n, 4)?;
            ack(frame, &opts);
            match parsed {
                Ok(rec) => sink(rec),
                Err(what) => frame.fail(BadForward::BadEntry { index: 0, what }),
            }
        }
    }
    Ok(())
}

/// Reads the option map when the frame has `full_len` elements (it is the
/// last one); unknown keys are ignored as the spec asks.
fn options(r: &mut Reader<'_>, n: u32, full_len: u32) -> Result<Options, BadForward> {
    let mut opts = Options::default();
    if n < full_len {
        return Ok(opts);
    }
    let value = r
        .value()
        .map_err(|_| BadForward::BadFrame("unreadable option"))?;
    match value {
        Value::Object(m) => {
            if let Some(Value::String(c)) = m.get("chunk") {
                opts.chunk = Some(c.clone());
            }
            if let Some(Value::String(c)) = m.get("compressed") {
                opts.compressed = Some(c.clone());
            }
            // `size` (the entry count) needs no check: entries are framed
            // by msgpack itself, so a wrong size cannot misalign anything.
            Ok(opts)
        }
        Value::Null => Ok(opts),
        _ => Err(BadForward::BadFrame("option is not a map")),
    }
}

fn ack(frame: &mut Frame, opts: &Options) {
    if let Some(chunk) = &opts.chunk {
        // {"ack": chunk}: fixmap of one pair, "ack" as fixstr, then chunk.
        let mut out = Vec::with_capacity(chunk.len() + 10);
        out.extend_from_slice(b"\x81\xa3ack");
        let n = chunk.len();
        if n < 32 {
            out.push(0xa0 | n as u8);
        } else if n < 256 {
            out.extend_from_slice(&[0xd9, n as u8]);
        } else if n < 65536 {
            out.push(0xda);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            out.push(0xdb);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        out.extend_from_slice(chunk.as_bytes());
        frame.ack = Some(out);
    }
}

/// Decodes concatenated `[time, record]` entries (all of `r`, or `count`).
/// A malformed entry is counted and skipped; bytes that are not msgpack end
/// the payload, since nothing after them can be framed.
fn entries_into(
    r: &mut Reader<'_>,
    count: Option<u32>,
    limits: &Limits,
    frame: &mut Frame,
    sink: &mut impl FnMut(Incoming),
) {
    let mut index = 0usize;
    while count.map_or(!r.at_end(), |c| index < c as usize) {
        let start = r.pos;
        let parsed = match r.head() {
            Ok(Head::Array(2)) => entry(r, start, &frame.tag, limits),
            _ => Err("not a [time, record] pair"),
        };
        match parsed {
            Ok(rec) => sink(rec),
            Err(what) => {
                // Step over the whole unusable entry, if it can be framed.
                r.pos = start;
                if r.skip().is_err() {
                    frame.fail(BadForward::BadEntry {
                        index,
                        what: "truncated or not msgpack",
                    });
                    return;
                }
                frame.fail(BadForward::BadEntry { index, what });
            }
        }
        index += 1;
    }
}

/// Reads `time, record` (the array head, if any, already consumed; the
/// entry began at `start`) into a record.
fn entry(
    r: &mut Reader<'_>,
    start: usize,
    tag: &str,
    limits: &Limits,
) -> Result<Incoming, &'static str> {
    let mut extra: Option<Map<String, Value>> = None;
    let time_ns = match r.head().map_err(|_| "truncated time")? {
        // Fluent Bit 2.x entries carry [time, metadata] in the time slot.
        Head::Array(2) => {
            let t = time(r.head().map_err(|_| "truncated time")?)?;
            match r.value() {
                Ok(Value::Object(m)) if !m.is_empty() => extra = Some(m),
                Ok(Value::Object(_)) | Ok(Value::Null) => {}
                _ => return Err("entry metadata is not a map"),
            }
            t
        }
        h => time(h)?,
    };
    let cx = Context {
        // An empty tag names nothing; the agent falls back as for JSON lines.
        default_module: (!tag.is_empty()).then_some(tag),
        default_time_ns: time_ns,
        max_record_bytes: limits.max_record_bytes,
        encoded_len: 0,
    };
    let mut record = match r.head() {
        Ok(Head::Map(n)) => {
            if extra.is_none() {
                // Most records: mapped straight from the msgpack bytes.
                if let Some((record, end)) = fields::from_msgpack(r.buf, r.pos, n, start, &cx) {
                    r.pos = end;
                    return Ok(record);
                }
            }
            r.map_body(n, 1).map_err(|e| match e {
                msgpack::Error::TooDeep => "record nested too deeply",
                _ => "truncated record",
            })?
        }
        Ok(_) => return Err("record is not a map"),
        Err(_) => return Err("truncated record"),
    };
    if let Some(m) = extra {
        record.entry("fluent_metadata").or_insert(Value::Object(m));
    }
    let cx = Context {
        encoded_len: r.pos - start,
        ..cx
    };
    Ok(fields::to_incoming(record, &cx))
}

/// Event time: integer seconds, float seconds, or EventTime (ext 0). Nil
/// means "stamp on arrival".
fn time(h: Head<'_>) -> Result<Option<i64>, &'static str> {
    let secs = |s: i128| -> Result<Option<i64>, &'static str> {
        i64::try_from(s * 1_000_000_000)
            .map(Some)
            .map_err(|_| "time out of range")
    };
    match h {
        Head::Uint(u) => secs(u as i128),
        Head::Int(i) => secs(i as i128),
        Head::F32(f) => float_secs(f as f64),
        Head::F64(f) => float_secs(f),
        Head::Ext(0, data) if data.len() == 8 => msgpack::event_time(0, data)
            .map(Some)
            .ok_or("EventTime nanoseconds over 999999999"),
        Head::Ext(..) => Err("time is an unknown extension type"),
        Head::Nil => Ok(None),
        _ => Err("time is not a number or EventTime"),
    }
}

fn float_secs(f: f64) -> Result<Option<i64>, &'static str> {
    fields::scaled(f, 1_000_000_000)
        .map(Some)
        .ok_or("time out of range")
}

/// Gunzips every concatenated member (Fluent Bit appends one per write),
/// reading at most `limit + 1` bytes so a bomb stops early.
fn gunzip(payload: &[u8], limit: usize) -> Result<Vec<u8>, BadForward> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(payload)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| BadForward::Gzip(e.to_string()))?;
    if out.len() > limit {
        return Err(BadForward::DecompressedTooLarge { limit });
    }
    Ok(out)
}

/// Fuzz target body (`fuzz/fuzz_targets/forward.rs` calls it): the bytes
/// fed whole and in small chunks must frame identically, never panic, and
/// every frame must respect the limits.
pub fn fuzz_one(data: &[u8]) {
    let limits = Limits {
        max_frame_bytes: 4096,
        max_decompressed_bytes: 8192,
        max_record_bytes: 512,
    };
    let drain = |chunk: usize| {
        let mut d = ForwardDecoder::new(limits);
        let mut out = Vec::new();
        for piece in data.chunks(chunk.max(1)) {
            d.feed(piece);
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => {
                        for r in &f.records {
                            assert!(r.message.len() <= limits.max_record_bytes);
                        }
                        out.push(Ok(f));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        assert!(e.is_fatal());
                        out.push(Err(e));
                        return out;
                    }
                }
            }
            assert!(d.pending_bytes() <= limits.max_frame_bytes + chunk.max(1));
        }
        out
    };
    // The fast record mapping agrees with the map path.
    fields::compare_msgpack_paths(data, 2, limits.max_record_bytes);
    let whole = drain(data.len());
    let split = drain(1 + data.first().copied().unwrap_or(0) as usize % 7);
    // Framing is deterministic: chunking may change which fatal error ends
    // the stream (over-size is noticed before the bytes that are not
    // msgpack arrive), never the frames before it.
    let ok = |v: &[Result<Frame, BadForward>]| -> Vec<_> {
        v.iter()
            .filter_map(|f| {
                f.as_ref()
                    .ok()
                    .map(|f| (f.records.clone(), f.bad, f.ack.clone()))
            })
            .collect()
    };
    assert_eq!(ok(&whole), ok(&split), "chunking changed the frames");
    assert_eq!(
        whole.last().is_some_and(|f| f.is_err()),
        split.last().is_some_and(|f| f.is_err())
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::formats::mutate;
    use crate::wire::Level;
    use serde_json::json;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/formats/forward/{name}.bin",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    const SAMPLES: &[&str] = &[
        "fluent_logger_message_int_time",
        "fluent_logger_nanosecond_eventtime",
        "fluent_handler_logging",
        "docker_fluentd_message",
        "forward_mode_chunk",
        "packed_forward_chunk",
        "compressed_packed_forward",
        "forward_v2_metadata_entry",
    ];

    fn one_frame(bytes: &[u8]) -> Frame {
        let mut d = ForwardDecoder::new(Limits::default());
        d.feed(bytes);
        let f = d.next_frame().unwrap().expect("a complete frame");
        assert_eq!(d.next_frame(), Ok(None));
        f
    }

    /// (level, module, message, time, metadata) of each record.
    type Row = (Level, String, String, Option<i64>, Value);

    fn rows(f: &Frame) -> Vec<Row> {
        f.records
            .iter()
            .map(|r| {
                (
                    r.level,
                    r.module.clone().unwrap_or_default(),
                    r.message.clone(),
                    r.timestamp_ns,
                    metadata(r),
                )
            })
            .collect()
    }

    /// A record's metadata as stored, as a JSON value (`{}` for none).
    fn metadata(r: &Incoming) -> Value {
        let text = r.clone().take_metadata_text();
        if text.is_empty() {
            json!({})
        } else {
            serde_json::from_str(&text).unwrap()
        }
    }

    fn check(name: &str, ack: Option<&str>, expected: &[Row]) {
        let f = one_frame(&fixture(name));
        assert_eq!((f.bad, &f.first_error), (0, &None), "{name}");
        assert_eq!(rows(&f), expected, "{name}");
        let want_ack = ack.map(|c| rmp_serde::to_vec_named(&json!({ "ack": c })).unwrap());
        assert_eq!(f.ack, want_ack, "{name}");
    }

    fn row(level: Level, module: &str, message: &str, ts: i64, meta: Value) -> Row {
        (level, module.into(), message.into(), Some(ts), meta)
    }

    #[test]
    fn real_senders() {
        check(
            "fluent_logger_message_int_time",
            None,
            &[row(
                Level::Info,
                "robot.nav.planner",
                "route planned",
                1_764_119_000_000_000_000,
                json!({"waypoints": 12}),
            )],
        );
        // Python float time through EventTime keeps sub-microsecond digits.
        let f = one_frame(&fixture("fluent_logger_nanosecond_eventtime"));
        assert_eq!(
            f.records[0].timestamp_ns.unwrap() / 1000,
            1_764_119_000_123_456
        );
        assert_eq!(
            (f.records[0].level, f.records[0].message.as_str()),
            (Level::Warn, "replanning")
        );
        assert_eq!(
            metadata(&f.records[0]),
            json!({"cost": 3.5, "ok": true, "path": [1, 2, 3]})
        );
        let f = one_frame(&fixture("fluent_handler_logging"));
        assert_eq!(
            (
                f.records[0].level,
                f.records[0].module.as_deref(),
                f.records[0].message.as_str()
            ),
            (Level::Error, Some("arm.driver"), "joint 3 over temperature")
        );
        check(
            "docker_fluentd_message",
            None,
            &[row(
                Level::Info,
                "docker.3f2a",
                "E1126 nav: lost localization",
                1_764_119_001_250_000_000,
                json!({"container_id": "3f2a9c0d1e", "container_name": "/nav", "source": "stderr"}),
            )],
        );
        let three = |i: i64| {
            row(
                if i % 2 == 1 {
                    Level::Debug
                } else {
                    Level::Info
                },
                "fluentbit.tail",
                &format!("line {i}"),
                1_764_119_002_000_000_000 + i * 1000,
                json!({}),
            )
        };
        check(
            "forward_mode_chunk",
            Some("p8n9gmxTQVC8/nh2wlKKeQ=="),
            &[three(0), three(1), three(2)],
        );
        check(
            "packed_forward_chunk",
            Some("Q2h1bmsy"),
            &[three(0), three(1), three(2)],
        );
        check(
            "compressed_packed_forward",
            Some("Q2h1bmsz"),
            &[three(0), three(1), three(2)],
        );
        check(
            "forward_v2_metadata_entry",
            None,
            &[row(
                Level::Error,
                "fb.v2",
                "with metadata",
                1_764_119_003_000_000_000,
                json!({"fluent_metadata": {"otel": 1}}),
            )],
        );
    }

    /// Builds a frame with rmp_serde from JSON-ish parts.
    fn enc(v: &Value) -> Vec<u8> {
        rmp_serde::to_vec(v).unwrap()
    }

    fn check_bad(bytes: &[u8], records: usize, error: BadForward) {
        let f = one_frame(bytes);
        assert_eq!(
            (f.records.len(), f.first_error),
            (records, Some(error)),
            "{bytes:02x?}"
        );
    }

    #[test]
    fn bad_frames_are_skipped_not_fatal() {
        let bad = BadForward::BadFrame;
        check_bad(
            &enc(&json!({"not": "an array"})),
            0,
            bad("not an array of 2 to 4 elements"),
        );
        check_bad(&enc(&json!([1, 2, 3])), 0, bad("tag is not a string"));
        check_bad(
            &enc(&json!(["t", 1])),
            0,
            bad("message mode needs a time and a record"),
        );
        check_bad(
            &enc(&json!(["t", 1, {"m": 1}, "opt"])),
            0,
            bad("option is not a map"),
        );
        check_bad(
            &enc(&json!(["t", 1, "rec"])),
            0,
            BadForward::BadEntry {
                index: 0,
                what: "record is not a map",
            },
        );
        check_bad(
            &enc(&json!(["t", "x", {"m": 1}])),
            0,
            BadForward::BadEntry {
                index: 0,
                what: "not a [time, record] pair",
            },
        );
        check_bad(
            &enc(&json!(["t", [[1, {"m": 1}], [1, 2], ["x", {}], [2, {"m": 2}]]])),
            2,
            BadForward::BadEntry {
                index: 1,
                what: "record is not a map",
            },
        );
        let mut zstd = vec![0x93, 0xa1, b't', 0xc4, 0x01, 0x00];
        zstd.extend(enc(&json!({"compressed": "zstd"})));
        check_bad(&zstd, 0, BadForward::UnknownCompression("zstd".into()));
        // A packed payload cut mid-entry keeps the entries before the cut.
        let mut cut = vec![0x92, 0xa1, b't', 0xc4];
        let entries = [enc(&json!([1, {"m": 1}])), enc(&json!([2, {"m": 2}]))].concat();
        cut.push((entries.len() - 2) as u8);
        cut.extend(&entries[..entries.len() - 2]);
        check_bad(
            &cut,
            1,
            BadForward::BadEntry {
                index: 1,
                what: "truncated or not msgpack",
            },
        );
    }

    #[test]
    fn event_time_forms() {
        let time_of = |time: &[u8]| {
            let mut f = vec![0x93, 0xa1, b't'];
            f.extend_from_slice(time);
            f.extend(enc(&json!({"m": 1})));
            let frame = one_frame(&f);
            (
                frame.records.first().and_then(|r| r.timestamp_ns),
                frame.first_error,
            )
        };
        let ok = |ns: i64| (Some(ns), None);
        let bad = |what| (None, Some(BadForward::BadEntry { index: 0, what }));
        assert_eq!(
            time_of(b"\xce\x69\x26\x51\xd8"),
            ok(1_764_119_000_000_000_000)
        );
        assert_eq!(
            time_of(&enc(&json!(1_764_119_000.5))),
            ok(1_764_119_000_500_000_000)
        );
        // EventTime as fixext8 (what senders use) and as ext8 of length 8.
        assert_eq!(
            time_of(b"\xd7\x00\x69\x26\x51\xd8\x00\x00\x00\x07"),
            ok(1_764_119_000_000_000_007)
        );
        assert_eq!(
            time_of(b"\xc7\x08\x00\x69\x26\x51\xd8\x00\x00\x00\x07"),
            ok(1_764_119_000_000_000_007)
        );
        // Nil: stamped on arrival by the agent.
        assert_eq!(time_of(b"\xc0"), (None, None));
        assert_eq!(
            time_of(b"\xd7\x05\x69\x26\x51\xd8\x00\x00\x00\x07"),
            bad("time is an unknown extension type")
        );
        assert_eq!(
            time_of(b"\xd7\x00\x69\x26\x51\xd8\xff\xff\xff\xff"),
            bad("EventTime nanoseconds over 999999999")
        );
        assert_eq!(time_of(&enc(&json!(f64::MAX))), bad("time out of range"));
        assert_eq!(time_of(&enc(&json!(u64::MAX))), bad("time out of range"));
    }

    #[test]
    fn stream_framing_is_chunking_independent() {
        let mut stream = Vec::new();
        for s in SAMPLES {
            stream.extend(fixture(s));
        }
        let all = |chunk: usize| {
            let mut d = ForwardDecoder::new(Limits::default());
            let mut out = Vec::new();
            for piece in stream.chunks(chunk) {
                d.feed(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    out.push(f);
                }
            }
            assert_eq!(d.pending_bytes(), 0);
            out
        };
        let whole = all(stream.len());
        assert_eq!(whole.len(), SAMPLES.len());
        for chunk in [1, 2, 3, 7, 64] {
            assert_eq!(all(chunk), whole, "chunk {chunk}");
        }
    }

    #[test]
    fn oversize_frame_is_fatal_for_the_connection() {
        let limits = Limits {
            max_frame_bytes: 100,
            ..Limits::default()
        };
        let big = enc(&json!(["t", 1, {"message": "x".repeat(200)}]));
        let mut d = ForwardDecoder::new(limits);
        d.feed(&big[..50]);
        assert_eq!(d.next_frame(), Ok(None));
        d.feed(&big[50..]);
        assert_eq!(
            d.next_frame(),
            Err(BadForward::FrameTooLarge { limit: 100 })
        );
        // Stays closed: later bytes are not interpreted.
        d.feed(&fixture("docker_fluentd_message"));
        assert!(d.next_frame().unwrap_err().is_fatal());

        let mut d = ForwardDecoder::new(Limits::default());
        d.feed(b"\xc1garbage");
        assert_eq!(d.next_frame(), Err(BadForward::NotMsgpack { offset: 0 }));
    }

    #[test]
    fn gzip_bomb_is_refused() {
        let limits = Limits {
            max_decompressed_bytes: 1 << 16,
            ..Limits::default()
        };
        let entry = enc(&json!([1, {"message": "y".repeat(1000)}]));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        for _ in 0..1000 {
            std::io::Write::write_all(&mut gz, &entry).unwrap();
        }
        let payload = gz.finish().unwrap();
        let mut frame = vec![0x93, 0xa1, b't'];
        frame.extend(rmp_serde::to_vec(&Bin(&payload)).unwrap());
        frame.extend(enc(&json!({"compressed": "gzip", "chunk": "c1"})));
        let f = decode_frame(&frame, &limits);
        assert_eq!(
            f.first_error,
            Some(BadForward::DecompressedTooLarge { limit: 1 << 16 })
        );
        assert!(f.records.is_empty());
        // Still acked: the chunk was received, and resending it cannot help.
        assert!(f.ack.is_some());
    }

    /// Serializes as msgpack bin (rmp_serde writes `&[u8]` as an array).
    struct Bin<'a>(&'a [u8]);

    impl serde::Serialize for Bin<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    #[test]
    fn oversize_record_is_truncated_visibly() {
        let limits = Limits {
            max_record_bytes: 100,
            ..Limits::default()
        };
        let f = decode_frame(&enc(&json!(["t", 1, {"log": "z".repeat(500)}])), &limits);
        assert!(f.records[0].truncated);
        assert!(f.records[0].message.len() <= 100);
        assert!(f.records[0]
            .message
            .ends_with(crate::agent::formats::TRUNCATION_MARK));
    }

    #[test]
    fn every_truncation_is_incomplete_never_a_panic() {
        for s in SAMPLES {
            let bytes = fixture(s);
            for cut in 0..bytes.len() {
                let mut d = ForwardDecoder::new(Limits::default());
                d.feed(&bytes[..cut]);
                assert_eq!(d.next_frame(), Ok(None), "{s} cut at {cut}");
                // A cut frame decoded as if complete is an error, not a panic.
                let f = decode_frame(&bytes[..cut], &Limits::default());
                assert!(
                    f.bad > 0 || !f.records.is_empty() || cut == 0,
                    "{s} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn mutations_never_panic() {
        let mut rng = mutate::Rng::new(0x5eed_f0f0);
        let samples: Vec<Vec<u8>> = SAMPLES.iter().map(|s| fixture(s)).collect();
        for _ in 0..20_000 {
            let s = &samples[rng.below(samples.len())];
            fuzz_one(&mutate::mutate(&mut rng, s));
        }
    }
}
