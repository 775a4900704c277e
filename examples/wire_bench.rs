//! Benchmark of the sync wire encodings, in process: N records of the
//! realistic robot mix (`common::line`, parsed the way `logbookd` parses
//! JSON lines) are cut into batches as the uploader cuts them, and each
//! encoding (batch version × gzip or zstd level) reports its bytes against the
//! same records as raw JSON lines, and its encode and decode CPU per
//! million records. The baseline is v1 at gzip 6 (what agents sent before
//! v2), measured in the same run.
//!
//! ```text
//! cargo build --release --example wire_bench
//! target/release/examples/wire_bench --records 1000000 --batch 20000
//! ```

mod common;

use std::time::{Duration, Instant};

use common::arg;
use logbook::agent::ingest::json::parse_line;
use logbook::wire::{Batch, Coding, Device, Record};

/// The record `logbookd` stores for line `i` sent by one program over
/// `ingest.sock`: stamped on arrival (about 2 µs apart, the agent's ingest
/// rate), no session, the sender's credentials and process name.
fn record(i: u64, line: &str) -> Record {
    let inc = parse_line(line.as_bytes(), 64 << 10).expect("the generator writes valid JSON");
    Record {
        seq: i,
        session_id: None,
        timestamp_ns: 1_764_000_000_000_000_000 + (i as i64) * 2_147 + (i as i64 * 7919) % 600,
        level: inc.level,
        module: inc.module.unwrap_or_default(),
        message: inc.message,
        metadata: if inc.metadata.is_empty() {
            String::new()
        } else {
            serde_json::to_string(&inc.metadata).unwrap()
        },
        pid: Some(48_213),
        uid: Some(1000),
        gid: Some(1000),
        process: Some("sync_bench".into()),
    }
}

struct Outcome {
    raw: u64,
    wire: u64,
    encode: Duration,
    decode: Duration,
}

fn run(batches: &mut [Batch], version: u32, coding: Coding, level: i32) -> Outcome {
    let mut out = Outcome {
        raw: 0,
        wire: 0,
        encode: Duration::ZERO,
        decode: Duration::ZERO,
    };
    for b in batches.iter_mut() {
        b.version = version;
        // What the uploader does: serialize, then compress.
        let t = Instant::now();
        let raw = b.to_msgpack();
        let body = coding.compress(&raw, level);
        out.encode += t.elapsed();
        let raw_len = raw.len();
        out.raw += raw_len as u64;
        out.wire += body.len() as u64;
        let t = Instant::now();
        let back = Batch::decode_as(&body, coding, 128 << 20).expect("a batch decodes");
        out.decode += t.elapsed();
        assert_eq!(back.records.len(), b.records.len());
        assert!(back == *b, "v{version} did not round-trip");
    }
    out
}

fn main() {
    let records: u64 = arg("--records", "1000000").parse().unwrap();
    let per_batch: usize = arg("--batch", "20000").parse().unwrap();
    let mut json_bytes = 0u64;
    let mut all = Vec::with_capacity(records as usize);
    for i in 1..=records {
        let l = common::line(i);
        json_bytes += l.len() as u64 + 1;
        all.push(record(i, &l));
    }
    let mut batches: Vec<Batch> = all
        .chunks(per_batch)
        .map(|c| Batch {
            marks: Vec::new(),
            agent: None,
            version: 1,
            device: Device {
                id: "bench".into(),
                name: "bench".into(),
            },
            sent_at_ns: 1_764_000_000_000_000_000,
            sessions: vec![],
            records: c.to_vec(),
            gaps: vec![],
        })
        .collect();
    drop(all);
    println!(
        "{records} records in {} batches of {per_batch}; {json_bytes} bytes as JSON lines ({:.0}/line)",
        batches.len(),
        json_bytes as f64 / records as f64
    );
    println!(
        "{:<14} {:>12} {:>12} {:>8} {:>8} {:>12} {:>12}",
        "encoding", "raw bytes", "wire bytes", "JSON/x", "v1-6/x", "enc s/Mrec", "dec s/Mrec"
    );
    let per_m = |d: Duration| d.as_secs_f64() * 1e6 / records as f64;
    let mut baseline = None;
    let (gzip, zstd) = (Coding::Gzip, Coding::Zstd);
    for (version, coding, level) in [
        (1, gzip, 6),
        (1, gzip, 1),
        (2, gzip, 1),
        (4, gzip, 3),
        (2, gzip, 6),
        (2, gzip, 9),
        (4, zstd, 1),
        (4, zstd, 2),
        (4, zstd, 3),
        (4, zstd, 6),
    ] {
        let o = run(&mut batches, version, coding, level);
        let base = *baseline.get_or_insert(o.wire);
        println!(
            "{:<14} {:>12} {:>12} {:>8} {:>8.2} {:>12.3} {:>12.3}",
            format!("v{version} {} {level}", coding.as_str()),
            o.raw,
            o.wire,
            format!("1/{:.1}", json_bytes as f64 / o.wire as f64),
            base as f64 / o.wire as f64,
            per_m(o.encode),
            per_m(o.decode),
        );
    }
}
