//! Live fan-out across replicas (README "Running the hub for a fleet"):
//! each ingest transaction NOTIFYs [`CHANNEL`] with what it changed (row
//! ids of sessions and devices, never records: a payload holds at most
//! 8000 bytes), and every replica LISTENs on one connection of its own
//! ([`follow`]), waking its streams, which read the records from the store
//! after the id they covered.
//!
//! Invariant: one listening connection per hub process, outside the pool;
//! a payload never exceeds [`MAX_PAYLOAD`] (a larger change is sent as
//! "every stream"); after any interruption, the feed's first word is
//! [`Heard::Resync`], so a commit missed meanwhile costs a read, never a
//! record.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::cause;
use crate::hub::store::{Changed, Heard};

/// The notification channel every replica listens on.
pub(super) const CHANNEL: &str = "logbook_live";

/// `application_name` of the listening connection.
pub const APPLICATION_NAME: &str = "logbook-hub live";

/// Longest payload sent (PostgreSQL refuses 8000 bytes and more).
pub(super) const MAX_PAYLOAD: usize = 7900;

/// How often the listening connection is checked with a query (a peer
/// gone without a FIN is found within this plus [`PING_TIMEOUT`]).
const PING_EVERY: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect delays: doubling from the first to the last, jittered; back
/// to the first once a connection lasted [`STABLE`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const STABLE: Duration = Duration::from_secs(30);

/// `1 ORIGIN s=1,2 d=3 e=1`: the format version, the process that
/// committed, and the sessions with new records, devices with new records
/// outside sessions, and sessions ended. `1 ORIGIN all` when the lists do
/// not fit.
pub(super) fn encode(origin: &str, c: &Changed) -> String {
    let list = |ids: &[i64]| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let text = format!(
        "1 {origin} s={} d={} e={}",
        list(&c.sessions),
        list(&c.devices),
        list(&c.ended)
    );
    if text.len() <= MAX_PAYLOAD {
        text
    } else {
        format!("1 {origin} all")
    }
}

/// The origin and what changed (`None`: every stream may be behind); a
/// payload this binary does not read (a newer hub's) also means every
/// stream.
pub(super) fn decode(payload: &str) -> (Option<&str>, Option<Changed>) {
    let mut words = payload.split(' ');
    if words.next() != Some("1") {
        return (None, None);
    }
    let origin = words.next();
    let mut c = Changed::default();
    for w in words {
        let (key, ids) = match w.split_once('=') {
            Some(kv) => kv,
            None => return (origin, None),
        };
        let list = match key {
            "s" => &mut c.sessions,
            "d" => &mut c.devices,
            "e" => &mut c.ended,
            _ => return (origin, None),
        };
        for id in ids.split(',').filter(|i| !i.is_empty()) {
            match id.parse() {
                Ok(id) => list.push(id),
                Err(_) => return (origin, None),
            }
        }
    }
    (origin, Some(c))
}

/// Listens on [`CHANNEL`] until `stop`, reconnecting with a backoff:
/// hands `heard` every change committed by a process other than `origin`,
/// and [`Heard::Resync`] each time listening starts. `what` names the
/// database in messages (no password).
pub(super) async fn follow(
    config: tokio_postgres::Config,
    what: String,
    origin: String,
    heard: Box<dyn Fn(Heard) + Send + Sync>,
    stop: CancellationToken,
) {
    let mut delay = BACKOFF_MIN;
    let mut lost = false;
    loop {
        let began = Instant::now();
        let ended = tokio::select! {
            _ = stop.cancelled() => return,
            e = listen(&config, &origin, &*heard, lost) => e,
        };
        if began.elapsed() >= STABLE {
            delay = BACKOFF_MIN;
        }
        let wait = delay.mul_f64(rand::random_range(0.5..=1.0));
        tracing::warn!(
            database = %what,
            "live fan-out: lost the notification connection ({ended}); live streams of other replicas' records wait; reconnecting in {wait:.1?}"
        );
        lost = true;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

/// One connection's life: connect, LISTEN, then hand on notifications and
/// check the link every [`PING_EVERY`]; returns why it ended.
async fn listen(
    config: &tokio_postgres::Config,
    origin: &str,
    heard: &(dyn Fn(Heard) + Send + Sync),
    reconnect: bool,
) -> String {
    let mut config = config.clone();
    // So an operator (or a test) tells it apart in `pg_stat_activity`.
    config.application_name(APPLICATION_NAME);
    let (client, mut conn) = match config.connect(tokio_postgres::NoTls).await {
        Ok(c) => c,
        Err(e) => return cause(&e),
    };
    // The connection's messages (notifications among them) arrive only
    // while it is polled, so every wait below polls it too.
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    let on = |m: Option<Result<AsyncMessage, tokio_postgres::Error>>| -> Result<(), String> {
        match m {
            None => Err("the server closed the connection".into()),
            Some(Err(e)) => Err(cause(&e)),
            Some(Ok(AsyncMessage::Notification(n))) => {
                match decode(n.payload()) {
                    (Some(o), _) if o == origin => {}
                    (_, Some(c)) => heard(Heard::Changed(c)),
                    (_, None) => heard(Heard::Resync),
                }
                Ok(())
            }
            Some(Ok(_)) => Ok(()),
        }
    };
    let statement = format!("LISTEN {CHANNEL}");
    let listening = client.batch_execute(&statement);
    tokio::pin!(listening);
    loop {
        tokio::select! {
            r = &mut listening => match r {
                Ok(()) => break,
                Err(e) => return cause(&e),
            },
            m = messages.next() => if let Err(e) = on(m) { return e },
        }
    }
    if reconnect {
        tracing::info!("live fan-out: listening again; every live stream reads what it missed");
    }
    heard(Heard::Resync);
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            m = messages.next() => if let Err(e) = on(m) { return e },
            _ = ping.tick() => {
                let query = client.simple_query("SELECT 1");
                tokio::pin!(query);
                let deadline = tokio::time::sleep(PING_TIMEOUT);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        r = &mut query => match r {
                            Ok(_) => break,
                            Err(e) => return cause(&e),
                        },
                        m = messages.next() => if let Err(e) = on(m) { return e },
                        _ = &mut deadline => {
                            return format!("no answer to a check within {PING_TIMEOUT:?}");
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed(s: &[i64], d: &[i64], e: &[i64]) -> Changed {
        Changed {
            sessions: s.to_vec(),
            devices: d.to_vec(),
            ended: e.to_vec(),
        }
    }

    #[test]
    fn payloads_round_trip_and_stay_under_the_limit() {
        for c in [
            changed(&[], &[], &[]),
            changed(&[1, 2], &[3], &[1]),
            changed(&[i64::MAX], &[], &[9, 10, 11]),
        ] {
            let text = encode("abc", &c);
            assert_eq!(decode(&text), (Some("abc"), Some(c)), "{text}");
        }
        let many = changed(&(0..2000).collect::<Vec<_>>(), &[], &[]);
        let text = encode("abc", &many);
        assert_eq!(text, "1 abc all");
        assert_eq!(decode(&text), (Some("abc"), None));
        let most = changed(&(0..1400).collect::<Vec<_>>(), &[], &[]);
        assert!(encode("abc", &most).len() <= MAX_PAYLOAD);
    }

    #[test]
    fn an_unreadable_payload_wakes_every_stream() {
        for text in ["", "2 abc s=1", "1 abc s=x", "1 abc q=1", "1 abc s"] {
            assert_eq!(decode(text).1, None, "{text:?}");
        }
    }
}
