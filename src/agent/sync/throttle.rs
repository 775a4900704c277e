//! The optional bandwidth cap (`sync.max_bytes_per_sec`) for metered links:
//! a token bucket every byte sent to the hub passes through.

use std::time::Duration;

use tokio::time::Instant;

pub struct Throttle {
    /// Bytes per second; `None` means no cap.
    rate: Option<u64>,
    /// Bytes that may be sent now; may go negative after a large send, which
    /// the next call waits off.
    tokens: f64,
    last: Instant,
}

impl Throttle {
    pub fn new(rate: Option<u64>) -> Throttle {
        let rate = rate.filter(|r| *r > 0);
        Throttle {
            rate,
            tokens: rate.unwrap_or(0) as f64,
            last: Instant::now(),
        }
    }

    /// Waits until `bytes` may be sent under the cap. A send larger than one
    /// second's worth is allowed and paid back by waiting afterwards, so a
    /// large chunk never stalls forever.
    pub async fn take(&mut self, bytes: u64) {
        let Some(rate) = self.rate else { return };
        let now = Instant::now();
        let burst = rate as f64;
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * burst).min(burst);
        self.last = now;
        if self.tokens < 0.0 {
            let wait = Duration::from_secs_f64(-self.tokens / burst);
            tokio::time::sleep(wait).await;
            self.tokens = 0.0;
            self.last = Instant::now();
        }
        self.tokens -= bytes as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_the_average_rate() {
        let mut t = Throttle::new(Some(1000));
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
    async fn no_cap_never_waits() {
        let mut t = Throttle::new(None);
        let start = Instant::now();
        t.take(u64::MAX / 2).await;
        t.take(u64::MAX / 2).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        let mut zero = Throttle::new(Some(0));
        zero.take(1 << 30).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
