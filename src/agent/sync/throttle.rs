//! The optional bandwidth cap (`sync.max_bytes_per_sec`) for metered links:
//! one token bucket that every byte sent to the hub passes through, shared
//! (`Arc<Throttle>`) by the batch uploader and the artifact uploader so that
//! logs and artifacts together stay within the one configured rate.
//!
//! Invariant: a sender reserves its bytes under the lock and then waits off
//! the debt that was there before it, so over any interval the bytes let
//! through are at most one second's worth (the burst) plus the rate times the
//! interval plus the last reservation, however many tasks share the bucket.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct Throttle {
    /// Bytes per second; `None` means no cap.
    rate: Option<u64>,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may be sent now; negative after a large send or while
    /// reservations wait, which the next caller waits off.
    tokens: f64,
    last: Instant,
}

impl Throttle {
    pub fn new(rate: Option<u64>) -> Throttle {
        let rate = rate.filter(|r| *r > 0);
        Throttle {
            rate,
            bucket: Mutex::new(Bucket {
                tokens: rate.unwrap_or(0) as f64,
                last: Instant::now(),
            }),
        }
    }

    /// Waits until `bytes` may be sent under the cap. A send larger than one
    /// second's worth is allowed and paid back by whoever sends next, so a
    /// large chunk never stalls forever.
    pub async fn take(&self, bytes: u64) {
        let Some(rate) = self.rate else { return };
        let wait = {
            // Never held across an await: the reservation is immediate and
            // the wait happens outside.
            let mut b = self.bucket.lock().expect("throttle lock");
            let now = Instant::now();
            let burst = rate as f64;
            b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * burst).min(burst);
            b.last = now;
            let wait = if b.tokens < 0.0 {
                Duration::from_secs_f64(-b.tokens / burst)
            } else {
                Duration::ZERO
            };
            b.tokens -= bytes as f64;
            wait
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn holds_the_average_rate() {
        let t = Throttle::new(Some(1000));
        let start = Instant::now();
        for _ in 0..10 {
            t.take(500).await;
        }
        // 5000 bytes at 1000 B/s with a 1000-byte burst: the tenth send may
        // start once 4000 bytes were paid off, after about 3.5 s.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(3400), "{took:?}");
        assert!(took <= Duration::from_millis(4600), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn two_tasks_share_one_rate() {
        // Logs and artifacts drawing from one bucket: together they stay
        // within the rate, not twice it.
        const RATE: u64 = 1000;
        let t = Arc::new(Throttle::new(Some(RATE)));
        let start = Instant::now();
        let sent = Arc::new(Mutex::new(Vec::<(Duration, u64)>::new()));
        let task = |chunk: u64, n: usize| {
            let (t, sent) = (t.clone(), sent.clone());
            tokio::spawn(async move {
                for _ in 0..n {
                    t.take(chunk).await;
                    sent.lock().unwrap().push((start.elapsed(), chunk));
                }
            })
        };
        let logs = task(300, 30);
        let artifacts = task(700, 15);
        logs.await.unwrap();
        artifacts.await.unwrap();
        let mut sent = sent.lock().unwrap().clone();
        sent.sort();
        let total: u64 = sent.iter().map(|s| s.1).sum();
        assert_eq!(total, 19_500);
        // At every moment, what went out fits the burst, the rate so far and
        // the one send that just went.
        let mut so_far = 0;
        for (at, chunk) in &sent {
            so_far += chunk;
            let allowed = RATE as f64 * (1.0 + at.as_secs_f64()) + *chunk as f64;
            assert!(so_far as f64 <= allowed, "{so_far} bytes by {at:?}");
        }
        // And it was not slower than the cap needs: 18.5 s of debt to pay
        // before the last send, at most one send's worth more.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(17_800), "{took:?}");
        assert!(took <= Duration::from_millis(19_300), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn no_cap_never_waits() {
        let t = Throttle::new(None);
        let start = Instant::now();
        t.take(u64::MAX / 2).await;
        t.take(u64::MAX / 2).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        let zero = Throttle::new(Some(0));
        zero.take(1 << 30).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
