//! Parser throughput (records/s) of the ingest formats on the same record
//! content, against the JSON-lines parser (`ingest::json::parse_line`:
//! `serde_json` plus the field mapping every format shares) measured in the
//! same run.
//! Goal (BENCHMARKS.md, "Parsers of the other ingest formats"): syslog and
//! Forward at least 70% of JSON lines,
//! PackedForward at least 100%.
//!
//! ```sh
//! cargo run --release --example formats_bench            # 200k records
//! cargo run --release --example formats_bench -- 1000000
//! ```
//!
//! Parsers only: no sockets, no SQLite. The Forward cases go through
//! `ForwardDecoder` fed 64 KiB reads, as a connection would.

use std::hint::black_box;
use std::io::Write as _;
use std::time::{Duration, Instant};

use logbook::agent::formats::{forward, syslog};
use logbook::agent::ingest::json;
use serde_json::json;

const MAX_RECORD: usize = 64 << 10;
const READ: usize = 64 << 10;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("record count"))
        .unwrap_or(200_000);
    let messages: Vec<String> = (0..n)
        .map(|i| format!("route planned in {} ms, {} waypoints", 10 + i % 90, i % 17))
        .collect();

    // JSON lines: the baseline.
    let json_lines: Vec<Vec<u8>> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            serde_json::to_vec(&json!({
                "timestamp": "2026-11-26T01:02:03.123456Z", "level": "info",
                "module": "nav.planner", "message": m,
                "waypoints": i % 17, "cost": 3.5,
            }))
            .unwrap()
        })
        .collect();
    let baseline = measure("json-lines (ingest::json::parse_line)", n, || {
        for line in &json_lines {
            black_box(json::parse_line(line, MAX_RECORD).unwrap());
        }
    });

    let now = time::OffsetDateTime::now_utc();
    let rfc5424: Vec<Vec<u8>> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            format!("<14>1 2026-11-26T01:02:03.123456Z robot7 nav.planner 4242 - [route waypoints=\"{}\" cost=\"3.5\"] {m}", i % 17).into_bytes()
        })
        .collect();
    let r5424 = measure("syslog RFC 5424 (with structured data)", n, || {
        for d in &rfc5424 {
            black_box(syslog::parse_at(d, MAX_RECORD, now).unwrap());
        }
    });
    let rfc3164: Vec<Vec<u8>> = messages
        .iter()
        .map(|m| format!("<14>Nov 26 01:02:03 nav.planner[4242]: {m}").into_bytes())
        .collect();
    let r3164 = measure("syslog RFC 3164 (logger -u form)", n, || {
        for d in &rfc3164 {
            black_box(syslog::parse_at(d, MAX_RECORD, now).unwrap());
        }
    });

    // Forward: the same fields as msgpack maps, EventTime times.
    let records: Vec<Vec<u8>> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            rmp_serde::to_vec(&json!({
                "level": "info", "module": "nav.planner", "message": m,
                "waypoints": i % 17, "cost": 3.5,
            }))
            .unwrap()
        })
        .collect();
    let entry = |rec: &[u8], out: &mut Vec<u8>| {
        out.push(0x92);
        event_time(out, 1_764_119_000, 123_456_000);
        out.extend_from_slice(rec);
    };
    let mut message_stream = Vec::new();
    for rec in &records {
        message_stream.push(0x93);
        rmp::encode::write_str(&mut message_stream, "nav").unwrap();
        event_time(&mut message_stream, 1_764_119_000, 123_456_000);
        message_stream.extend_from_slice(rec);
    }
    let message = measure("forward Message mode", n, || {
        decode_stream(&message_stream, n)
    });

    // Fluent Bit's default: chunks of entries with a chunk id for the ack.
    const CHUNK: usize = 1000;
    let mut forward_stream = Vec::new();
    let mut packed_stream = Vec::new();
    let mut gzip_stream = Vec::new();
    for (c, recs) in records.chunks(CHUNK).enumerate() {
        let mut entries = Vec::new();
        for rec in recs {
            entry(rec, &mut entries);
        }
        let chunk = format!("chunk-{c}");
        // Forward mode: [tag, [entries...], option]
        forward_stream.push(0x93);
        rmp::encode::write_str(&mut forward_stream, "nav").unwrap();
        rmp::encode::write_array_len(&mut forward_stream, recs.len() as u32).unwrap();
        forward_stream.extend_from_slice(&entries);
        options(&mut forward_stream, &chunk, recs.len(), false);
        // PackedForward: [tag, bin(entries), option]
        packed_stream.push(0x93);
        rmp::encode::write_str(&mut packed_stream, "nav").unwrap();
        rmp::encode::write_bin(&mut packed_stream, &entries).unwrap();
        options(&mut packed_stream, &chunk, recs.len(), false);
        // CompressedPackedForward
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&entries).unwrap();
        let gz = gz.finish().unwrap();
        gzip_stream.push(0x93);
        rmp::encode::write_str(&mut gzip_stream, "nav").unwrap();
        rmp::encode::write_bin(&mut gzip_stream, &gz).unwrap();
        options(&mut gzip_stream, &chunk, recs.len(), true);
    }
    let fwd = measure("forward Forward mode (1000/chunk)", n, || {
        decode_stream(&forward_stream, n)
    });
    let packed = measure("forward PackedForward (1000/chunk)", n, || {
        decode_stream(&packed_stream, n)
    });
    let gzip = measure("forward CompressedPackedForward (gzip)", n, || {
        decode_stream(&gzip_stream, n)
    });

    println!();
    println!("{n} records per run, best of 5; ratio = records/s against json-lines in this run");
    for (name, rate, goal) in [
        ("json-lines baseline", baseline, None),
        ("syslog RFC 5424", r5424, Some(0.7)),
        ("syslog RFC 3164", r3164, Some(0.7)),
        ("forward Message", message, Some(0.7)),
        ("forward Forward", fwd, Some(0.7)),
        ("forward PackedForward", packed, Some(1.0)),
        ("forward CompressedPackedForward", gzip, None),
    ] {
        let ratio = rate / baseline;
        let verdict = match goal {
            Some(g) if ratio >= g => format!("goal {:.0}%: met", g * 100.0),
            Some(g) => format!("goal {:.0}%: NOT met", g * 100.0),
            None => String::new(),
        };
        println!("{name:<34} {:>12.0} rec/s  {ratio:>5.2}x  {verdict}", rate);
    }
}

/// EventTime: fixext8, type 0, big-endian seconds and nanoseconds.
fn event_time(out: &mut Vec<u8>, secs: u32, nanos: u32) {
    out.extend_from_slice(&[0xd7, 0x00]);
    out.extend_from_slice(&secs.to_be_bytes());
    out.extend_from_slice(&nanos.to_be_bytes());
}

fn options(out: &mut Vec<u8>, chunk: &str, size: usize, gzip: bool) {
    rmp::encode::write_map_len(out, if gzip { 3 } else { 2 }).unwrap();
    rmp::encode::write_str(out, "chunk").unwrap();
    rmp::encode::write_str(out, chunk).unwrap();
    rmp::encode::write_str(out, "size").unwrap();
    rmp::encode::write_uint(out, size as u64).unwrap();
    if gzip {
        rmp::encode::write_str(out, "compressed").unwrap();
        rmp::encode::write_str(out, "gzip").unwrap();
    }
}

/// Feeds a whole connection's bytes in 64 KiB reads and counts records.
fn decode_stream(stream: &[u8], expected: usize) {
    let mut d = forward::ForwardDecoder::new(forward::Limits::default());
    let mut got = 0;
    for read in stream.chunks(READ) {
        d.feed(read);
        while let Some(frame) = d.next_frame().unwrap() {
            assert_eq!(frame.bad, 0, "{:?}", frame.first_error);
            got += frame.records.len();
            black_box(frame);
        }
    }
    assert_eq!(got, expected);
}

/// Best records/s over five runs (the first also warms caches).
fn measure(name: &str, n: usize, mut f: impl FnMut()) -> f64 {
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        f();
        best = best.min(start.elapsed());
    }
    let rate = n as f64 / best.as_secs_f64();
    eprintln!(
        "{name:<44} {:>9.1} ms  {rate:>12.0} rec/s",
        best.as_secs_f64() * 1e3
    );
    rate
}
