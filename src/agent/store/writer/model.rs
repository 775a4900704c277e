//! The ring buffer against a model: a proptest state machine that drives the
//! real writer (appends, sessions, marks, acknowledgements, set-asides,
//! eviction by count and under the size bound, a smaller `pinned_max`,
//! restarts in the same and a new boot) and, after every step, holds the
//! database to a plain in-memory model of DESIGN.md's rules and README
//! "Marks": which records are stored, their seqs, sessions, levels and
//! times, which are synced, which marks still pin their window, the gap
//! counters and what the uploader reads as pending. Pinned windows are
//! evicted last; pins over `pinned_max` are released oldest normal first,
//! then oldest high, each release a `pin_released` gap of its window.
//!
//! 32 cases of up to 60 steps run in `cargo test`; run it longer with
//! `PROPTEST_CASES=2000 cargo test --lib agent::store::writer::model`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::Ordering;

use proptest::prelude::*;
use tokio::sync::oneshot;

use super::tests::writer_in_boot;
use super::{Msg, SessionCmd, Writer, SEQ_BLOCK};
use crate::agent::marks::{MarkSpec, Priority};
use crate::agent::record::Trusted;
use crate::agent::store::marks::PIN_RELEASED;
use crate::agent::store::sync::{self, Acked, SetAside, SyncReader};
use crate::agent::store::Row;
use crate::agent::types::{OpenSession, Target};
use crate::wire::{gap_reason, seq_ranges, Level};

/// What the hub does with a batch the uploader sent.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// Acknowledges every record and gap counter in it.
    All,
    /// Acknowledges the first half of its records (and no gap counter).
    Half,
    /// Nothing comes back (the link dropped).
    Lost,
    /// Refuses it as invalid: its records are set aside.
    Refused,
    /// Acknowledges everything, after the writer evicted two records while
    /// the batch was at the hub (the acknowledgement counts what is left).
    Late,
}

#[derive(Debug, Clone)]
enum Op {
    /// One pipeline message: records of these levels, each with the count
    /// of events its client says it dropped before it.
    Append(Vec<(Level, u8)>),
    Open,
    Stop,
    /// The uploader reads up to `limit` pending records (errors and fatals
    /// only when `urgent`, as when it is behind) and the gap counters, and
    /// sends them.
    Sync {
        urgent: bool,
        limit: usize,
        answer: Answer,
    },
    Evict(u64),
    /// The size bound shrinks to this percentage of the pages in use, and
    /// the writer keeps it.
    Bound(u64),
    /// The agent restarts, in the same boot or after a reboot.
    Restart {
        reboot: bool,
    },
    /// A mark in the active session (or outside sessions) at `back`
    /// records before the newest one, pinning `[ts - before, ts + after]`.
    Mark {
        back: i64,
        before: i64,
        after: i64,
        high: bool,
    },
    /// `buffer.pinned_max` becomes this many bytes (a record here takes
    /// about 57).
    PinnedMax(u64),
}

fn level() -> impl Strategy<Value = Level> {
    prop::sample::select(Level::ALL.to_vec())
}

fn op() -> impl Strategy<Value = Op> {
    let dropped = prop_oneof![8 => Just(0u8), 1 => 1u8..5];
    let answer = prop_oneof![
        4 => Just(Answer::All),
        1 => Just(Answer::Late),
        2 => Just(Answer::Half),
        1 => Just(Answer::Lost),
        1 => Just(Answer::Refused),
    ];
    prop_oneof![
        8 => prop::collection::vec((level(), dropped), 1..12).prop_map(Op::Append),
        2 => Just(Op::Open),
        2 => Just(Op::Stop),
        5 => (any::<bool>(), 1usize..16, answer).prop_map(|(urgent, limit, answer)| Op::Sync {
            urgent,
            limit,
            answer
        }),
        2 => (1u64..20).prop_map(Op::Evict),
        1 => (10u64..95).prop_map(Op::Bound),
        1 => any::<bool>().prop_map(|reboot| Op::Restart { reboot }),
        3 => (0i64..30, 0i64..6, 0i64..6, any::<bool>()).prop_map(|(back, before, after, high)| {
            Op::Mark { back, before, after, high }
        }),
        1 => prop_oneof![(0u64..1500), Just(1u64 << 28)].prop_map(Op::PinnedMax),
    ]
}

/// A stored record as the model sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rec {
    level: Level,
    /// The session's pk, 0 for device logs.
    session: i64,
    synced: bool,
    /// Its time, which the test makes its seq.
    ts: i64,
    /// What it counts for against `pinned_max` (`marks::RECORD_BYTES`).
    bytes: i64,
}

/// A mark as the model sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MarkM {
    id: i64,
    session: i64,
    start: i64,
    end: i64,
    ts: i64,
    high: bool,
    released: bool,
}

/// `(session, level code, reason)` → `(dropped, synced_dropped)`.
type Gaps = BTreeMap<(i64, i64, String), (i64, i64)>;

#[derive(Debug, Default)]
struct Model {
    records: BTreeMap<u64, Rec>,
    next_seq: u64,
    /// The end of the synced seq reservation (seqs below it are covered).
    reserved: u64,
    /// The active session's pk.
    current: Option<i64>,
    gaps: Gaps,
    marks: Vec<MarkM>,
    pinned_max: i64,
}

impl Model {
    /// Before `n` records go in: seqs past the reservation reserve them
    /// and the next block.
    fn reserve(&mut self, n: u64) {
        if self.next_seq + 1 + n > self.reserved {
            self.reserved = self.next_seq + 1 + n + SEQ_BLOCK as u64;
        }
    }

    fn gap(&mut self, session: i64, level: Level, reason: &str, n: i64) {
        if n > 0 {
            let key = (session, level.code() as i64, reason.to_owned());
            self.gaps.entry(key).or_default().0 += n;
        }
    }

    fn unsynced(&self) -> impl Iterator<Item = (u64, &Rec)> {
        self.records
            .iter()
            .filter(|(_, r)| !r.synced)
            .map(|(s, r)| (*s, r))
    }

    fn in_window(m: &MarkM, r: &Rec) -> bool {
        m.session == r.session && m.start <= r.ts && r.ts <= m.end
    }

    /// Inside the window of a mark not released (README "Marks").
    fn pinned(&self, r: &Rec) -> bool {
        self.marks
            .iter()
            .any(|m| !m.released && Self::in_window(m, r))
    }

    fn pinned_bytes(&self) -> i64 {
        self.records
            .values()
            .filter(|r| self.pinned(r))
            .map(|r| r.bytes)
            .sum()
    }

    /// `marks::release_over`: while the pinned records take more than
    /// `max` bytes, release marks, normal ones before high ones, oldest
    /// first, each counting its window's records (per level) as a
    /// `pin_released` gap, until the estimate (each window's bytes taken
    /// off in turn) is within `max`.
    fn release_over(&mut self, max: i64) {
        let mut total = self.pinned_bytes();
        while total > max {
            let mut order: Vec<MarkM> =
                self.marks.iter().filter(|m| !m.released).copied().collect();
            if order.is_empty() {
                break;
            }
            order.sort_by_key(|m| (m.high, m.ts, m.id));
            let mut estimate = total;
            for m in order {
                if estimate <= max {
                    break;
                }
                self.marks
                    .iter_mut()
                    .find(|x| x.id == m.id)
                    .unwrap()
                    .released = true;
                let mut per_level: BTreeMap<Level, (i64, i64)> = BTreeMap::new();
                for r in self.records.values().filter(|r| Self::in_window(&m, r)) {
                    let e = per_level.entry(r.level).or_default();
                    e.0 += 1;
                    e.1 += r.bytes;
                }
                for (level, (n, bytes)) in per_level {
                    estimate -= bytes;
                    self.gap(m.session, level, PIN_RELEASED, n);
                }
            }
            total = self.pinned_bytes();
        }
    }

    /// DESIGN.md's order, pins released over `pinned_max` first, records
    /// outside pinned windows before those inside (when any window is
    /// pinned), and within each: synced records oldest first; then
    /// unsynced ones from the lowest level up, oldest first, each counted
    /// as a gap.
    fn evict(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        self.release_over(self.pinned_max);
        let passes: &[Option<bool>] = if self.marks.iter().any(|m| !m.released) {
            &[Some(false), Some(true)]
        } else {
            &[None]
        };
        let mut left = n as usize;
        for pass in passes {
            let in_pass = |model: &Model, r: &Rec| pass.is_none_or(|p| model.pinned(r) == p);
            let synced: Vec<u64> = self
                .records
                .iter()
                .filter(|(_, r)| r.synced && in_pass(self, r))
                .map(|(s, _)| *s)
                .take(left)
                .collect();
            left -= synced.len();
            for s in synced {
                self.records.remove(&s);
            }
            for level in Level::ALL {
                let gone: Vec<(u64, i64)> = self
                    .unsynced()
                    .filter(|(_, r)| r.level == level && in_pass(self, r))
                    .map(|(s, r)| (s, r.session))
                    .take(left)
                    .collect();
                left -= gone.len();
                for (s, session) in gone {
                    self.records.remove(&s);
                    self.gap(session, level, gap_reason::EVICTED, 1);
                }
            }
        }
    }

    /// Gap counters the hub has not acknowledged, as the uploader reads
    /// them.
    fn pending_gaps(&self) -> BTreeMap<(i64, i64, String), i64> {
        self.gaps
            .iter()
            .filter(|(_, (d, s))| d > s)
            .map(|(k, (d, _))| (k.clone(), *d))
            .collect()
    }
}

/// The real writer, as the writer loop drives it: each message in its own
/// transaction, committed, then the bound kept.
struct Real<'a> {
    dir: &'a Path,
    w: Writer,
    boot: u32,
}

impl Real<'_> {
    /// One turn of `Writer::run` for one message: begin, handle, commit,
    /// keep the bound, then answer the acknowledgements that committed.
    fn send(&mut self, msg: Msg) {
        self.w.conn.execute_batch("BEGIN").unwrap();
        self.w.handle(msg, &mut Vec::new(), &mut 0, &mut 0);
        self.w.commit();
        self.w.enforce_bound().unwrap();
        for (reply, n) in self.w.sync_replies.drain(..) {
            let synced = &self.w.stats.records_synced;
            synced.fetch_add(n as i64, std::sync::atomic::Ordering::Relaxed);
            let _ = reply.send(Ok(n));
        }
    }

    fn session(&mut self, cmd: SessionCmd) -> Option<i64> {
        let (tx, mut rx) = oneshot::channel();
        self.send(Msg::Session(cmd, tx));
        let view = rx.try_recv().expect("answered after the commit").ok()?;
        Some(
            self.w
                .conn
                .query_row(
                    "SELECT pk FROM sessions WHERE id = ?1",
                    [view.id.to_string()],
                    |r| r.get(0),
                )
                .unwrap(),
        )
    }

    fn sync(&mut self, msg: impl FnOnce(SyncReply) -> Msg) {
        let (tx, mut rx) = oneshot::channel();
        self.send(msg(tx));
        rx.try_recv()
            .expect("answered after the commit")
            .expect("recorded");
    }

    fn reader(&self) -> SyncReader {
        SyncReader::open(&self.dir.join("agent.db"), &self.boot_id()).unwrap()
    }

    fn boot_id(&self) -> String {
        format!("boot-{}", self.boot)
    }

    fn records(&self) -> BTreeMap<u64, Rec> {
        let c = &self.w.conn;
        let w = sync::watermark(c).unwrap();
        let ahead: BTreeSet<i64> = c
            .prepare("SELECT seq FROM synced_ahead")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            ahead.iter().all(|s| *s > w),
            "synced_ahead {ahead:?} at or below W {w}"
        );
        let mut stmt = c
            .prepare(
                "SELECT seq, level, coalesce(session, 0), ts_ns, \
                 length(module) + length(message) + length(metadata) + 48 FROM records",
            )
            .unwrap();
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, u8>(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                ))
            })
            .unwrap();
        let out: BTreeMap<u64, Rec> = rows
            .map(|r| {
                let (seq, level, session, ts, bytes) = r.unwrap();
                let rec = Rec {
                    level: Level::from_code(level).unwrap(),
                    session,
                    synced: seq <= w || ahead.contains(&seq),
                    ts,
                    bytes,
                };
                (seq as u64, rec)
            })
            .collect();
        let stored: BTreeSet<u64> = out.keys().copied().collect();
        let named: BTreeSet<u64> = ahead.iter().map(|s| *s as u64).collect();
        assert!(
            named.is_subset(&stored),
            "synced_ahead names records not stored"
        );
        out
    }

    /// (id, session, released) of every mark.
    fn marks(&self) -> Vec<(i64, i64, bool)> {
        let mut stmt = self
            .w
            .conn
            .prepare("SELECT id, session, released IS NOT NULL FROM marks ORDER BY id")
            .unwrap();
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap();
        rows.collect::<rusqlite::Result<_>>().unwrap()
    }

    fn gaps(&self) -> Gaps {
        let mut stmt = self
            .w
            .conn
            .prepare("SELECT session, level, reason, dropped, synced_dropped FROM gaps")
            .unwrap();
        let rows = stmt
            .query_map([], |r| {
                Ok(((r.get(0)?, r.get(1)?, r.get(2)?), (r.get(3)?, r.get(4)?)))
            })
            .unwrap();
        rows.collect::<rusqlite::Result<_>>().unwrap()
    }
}

type SyncReply = oneshot::Sender<Result<u64, String>>;

/// A message's rows, the `i`th at time `first_ts + i` (the seq it gets).
fn rows(levels: &[(Level, u8)], first_ts: i64) -> Vec<Row> {
    levels
        .iter()
        .enumerate()
        .map(|(i, (level, dropped))| Row {
            timestamp_ns: first_ts + i as i64,
            level: *level,
            module: "m".into(),
            message: format!("{level} {i}"),
            metadata: String::new(),
            trusted: std::sync::Arc::new(Trusted::default()),
            client_dropped: *dropped as u64,
            mark: None,
        })
        .collect()
}

fn step(real: &mut Real, model: &mut Model, op: &Op) {
    match op {
        Op::Append(levels) => {
            let made = rows(levels, model.next_seq as i64 + 1);
            real.send(Msg::Rows(made.clone()));
            model.reserve(levels.len() as u64);
            let session = model.current.unwrap_or(0);
            for (row, (level, _)) in made.iter().zip(levels) {
                model.next_seq += 1;
                let rec = Rec {
                    level: *level,
                    session,
                    synced: false,
                    ts: row.timestamp_ns,
                    bytes: (row.module.len() + row.message.len() + row.metadata.len() + 48) as i64,
                };
                model.records.insert(model.next_seq, rec);
            }
            let dropped: i64 = levels.iter().map(|(_, d)| *d as i64).sum();
            model.gap(session, Level::Info, gap_reason::CLIENT_DROPPED, dropped);
        }
        Op::Open => {
            let opened = real.session(SessionCmd::Open(OpenSession::default()));
            match model.current {
                Some(_) => assert_eq!(opened, None, "a second active session"),
                None => model.current = Some(opened.expect("a session opens")),
            }
        }
        Op::Stop => {
            let stopped = real.session(SessionCmd::Stop {
                target: Target::Current,
                failed: false,
                error: None,
            });
            assert_eq!(stopped, model.current, "the stopped session");
            model.current = None;
        }
        Op::Sync {
            urgent,
            limit,
            answer,
        } => {
            // As the uploader does: the deletion counter before the read,
            // so acknowledgements take the writer's uncounted path.
            let read_at = Some(real.w.stats.deletions.load(Ordering::SeqCst));
            let reader = real.reader();
            let pending = if *urgent {
                reader.urgent_records(0, *limit, 1 << 20).unwrap()
            } else {
                let from = reader.first_unsynced().unwrap();
                assert_eq!(from, model.unsynced().next().map(|(s, _)| s));
                match from {
                    Some(from) => reader
                        .records_from(from, u64::MAX, *limit, 1 << 20)
                        .unwrap(),
                    None => Vec::new(),
                }
            };
            let sent: Vec<u64> = pending.iter().map(|p| p.record.seq).collect();
            let want: Vec<u64> = model
                .unsynced()
                .filter(|(_, r)| !*urgent || r.level >= Level::Error)
                .map(|(s, _)| s)
                .take(*limit)
                .collect();
            assert_eq!(sent, want, "the pending records");
            for p in &pending {
                let r = model.records[&p.record.seq];
                assert_eq!((p.record.level, p.pk), (r.level, r.session));
            }
            let gaps: BTreeMap<(i64, i64, String), i64> = reader
                .pending_gaps()
                .unwrap()
                .into_iter()
                .map(|g| {
                    let key = (g.session, g.gap.level.code() as i64, g.gap.reason);
                    (key, g.gap.dropped as i64)
                })
                .collect();
            assert_eq!(gaps, model.pending_gaps(), "the pending gap counters");
            let acked_gaps = || {
                gaps.iter()
                    .map(|((s, l, why), d)| {
                        let level = Level::from_code(*l as u8).unwrap();
                        (*s, level, why.clone(), *d as u64)
                    })
                    .collect()
            };
            let acked = match answer {
                Answer::All | Answer::Refused | Answer::Late => sent.clone(),
                Answer::Half => sent[..sent.len() / 2].to_vec(),
                Answer::Lost => return,
            };
            if let Answer::Late = answer {
                real.w.evict(2).unwrap();
                model.evict(2);
            }
            match answer {
                Answer::Refused => {
                    let aside = SetAside {
                        acked: Acked {
                            marks: Vec::new(),
                            gaps: acked_gaps(),
                            read_at,
                            ..Acked::default()
                        },
                        records: pending
                            .iter()
                            .map(|p| (p.record.seq, p.pk, p.record.level))
                            .collect(),
                        reason: "invalid".into(),
                    };
                    real.sync(|tx| Msg::SetAside(aside, tx));
                    for (k, d) in &gaps {
                        let g = model.gaps.get_mut(k).unwrap();
                        g.1 = g.1.max(*d);
                    }
                    for s in &acked {
                        let r = model.records[s];
                        model.gap(r.session, r.level, gap_reason::REJECTED, 1);
                    }
                }
                _ => {
                    let all = matches!(answer, Answer::All | Answer::Late);
                    let ack = Acked {
                        marks: Vec::new(),
                        records: seq_ranges(acked.iter().copied()),
                        sessions: Vec::new(),
                        gaps: if all { acked_gaps() } else { Vec::new() },
                        read_at,
                    };
                    real.sync(|tx| Msg::Acked(ack, tx));
                    if all {
                        for (k, d) in &gaps {
                            let g = model.gaps.get_mut(k).unwrap();
                            g.1 = g.1.max(*d);
                        }
                    }
                }
            }
            for s in acked {
                match model.records.get_mut(&s) {
                    Some(r) => r.synced = true,
                    None => assert!(matches!(answer, Answer::Late), "{s} is stored"),
                }
            }
        }
        Op::Evict(n) => {
            real.w.evict(*n).unwrap();
            model.evict(*n);
        }
        Op::Bound(percent) => {
            let c = &real.w.conn;
            let pragma = |p: &str| -> u64 { c.pragma_query_value(None, p, |r| r.get(0)).unwrap() };
            let used = (pragma("page_count") - pragma("freelist_count")) * pragma("page_size");
            let before = real.records().len() as u64;
            let max = real.w.cfg.max_bytes;
            // What the bound leaves for pages (see `enforce_bound`): the
            // limit less room for a full WAL and two transactions.
            let headroom = real.w.wal_limit + 2 * real.w.tx_bytes as u64;
            real.w.cfg.max_bytes = headroom + used * percent / 100;
            real.w.enforce_bound().unwrap();
            real.w.cfg.max_bytes = max;
            let evicted = before - real.records().len() as u64;
            model.evict(evicted);
        }
        Op::Restart { reboot } => {
            if *reboot {
                real.boot += 1;
                // The session active in the earlier boot is closed as failed.
                model.current = None;
                // Not a stop of its own, and a new boot: the WAL may have
                // lost its end, so the counter starts past the reservation.
                model.next_seq = model.next_seq.max(model.reserved - 1);
            }
            // Uncommitted state dies with the process: only what is in
            // the database (and the boot id) carries over.
            real.w = writer_in_boot(real.dir, &real.boot_id());
            let current = real.w.current.map(|(pk, _)| pk);
            assert_eq!(current, model.current, "the session active after a restart");
            model.reserved = model.next_seq + 1 + SEQ_BLOCK as u64;
            real.w.cfg.pinned_max = model.pinned_max as u64;
        }
        Op::Mark {
            back,
            before,
            after,
            high,
        } => {
            let ts = (model.next_seq as i64 - back).max(1);
            let spec = MarkSpec {
                name: format!("m{ts}"),
                timestamp_ns: Some(ts),
                before_ns: *before,
                after_ns: *after,
                priority: if *high {
                    Priority::High
                } else {
                    Priority::Normal
                },
                metadata: String::new(),
            };
            let (tx, mut rx) = oneshot::channel();
            real.send(Msg::Mark(spec, tx));
            let id = rx.try_recv().expect("answered").expect("stored");
            model.marks.push(MarkM {
                id,
                session: model.current.unwrap_or(0),
                start: ts - before,
                end: ts + after,
                ts,
                high: *high,
                released: false,
            });
        }
        Op::PinnedMax(bytes) => {
            real.w.cfg.pinned_max = *bytes;
            model.pinned_max = *bytes as i64;
        }
    }
    check(real, model);
}

/// The database agrees with the model.
fn check(real: &Real, model: &Model) {
    assert_eq!(real.records(), model.records, "the stored records");
    assert_eq!(real.gaps(), model.gaps, "the gap counters");
    let marks: Vec<(i64, i64, bool)> = model
        .marks
        .iter()
        .map(|m| (m.id, m.session, m.released))
        .collect();
    assert_eq!(real.marks(), marks, "the marks and which are released");
    let stats = &real.w.stats;
    let stored = stats
        .records_stored
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(stored, model.records.len() as i64, "Stats::records_stored");
    let synced = model.records.values().filter(|r| r.synced).count() as i64;
    assert_eq!(sync::count_synced(&real.w.conn).unwrap(), synced);
    let counted = stats
        .records_synced
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(counted, synced, "Stats::records_synced");
    assert_eq!(
        real.w.next_seq as u64,
        model.next_seq + 1,
        "the next seq (never reused)"
    );
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn the_ring_buffer_agrees_with_its_model(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut real = Real { dir: dir.path(), w: writer_in_boot(dir.path(), "boot-0"), boot: 0 };
        let mut model = Model { pinned_max: real.w.cfg.pinned_max as i64, reserved: 1 + SEQ_BLOCK as u64, ..Model::default() };
        for op in &ops {
            step(&mut real, &mut model, op);
        }
    }
}
