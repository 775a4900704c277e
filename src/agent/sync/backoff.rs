//! Retry delays for the uploader: exponential (backon's schedule, capped)
//! with full jitter — each wait is uniform in [0, min(cap, base·2ⁿ)] — so a
//! fleet that lost its hub does not come back in lockstep. A hub's
//! `Retry-After` replaces the computed delay.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

pub struct Backoff {
    builder: ExponentialBuilder,
    schedule: ExponentialBackoff,
    cap: Duration,
    /// The upper bound of the last wait, for status reports.
    current: Option<Duration>,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        let builder = ExponentialBuilder::default()
            .with_min_delay(base)
            .with_max_delay(cap)
            .without_max_times();
        Backoff {
            schedule: builder.build(),
            builder,
            cap,
            current: None,
        }
    }

    /// The next wait. `retry_after` (from the hub) wins over the schedule,
    /// but the schedule still advances.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let bound = self.schedule.next().unwrap_or(self.cap).min(self.cap);
        self.current = Some(bound);
        match retry_after {
            Some(after) => after,
            None => full_jitter(bound),
        }
    }

    /// Back to the first step after a success.
    pub fn reset(&mut self) {
        self.schedule = self.builder.build();
        self.current = None;
    }

    /// The current backoff bound, `None` when not backing off.
    pub fn current(&self) -> Option<Duration> {
        self.current
    }
}

fn full_jitter(bound: Duration) -> Duration {
    let nanos = bound.as_nanos().min(u64::MAX as u128) as u64;
    Duration::from_nanos(rand::random_range(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_below_the_bound() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut bounds = Vec::new();
        for _ in 0..10 {
            let d = b.next_delay(None);
            let bound = b.current().unwrap();
            assert!(d <= bound, "{d:?} > {bound:?}");
            bounds.push(bound);
        }
        // backon computes in f32: compare whole milliseconds.
        let ms: Vec<u128> = bounds.iter().map(|d| d.as_millis()).collect();
        assert_eq!(&ms[..4], &[100, 200, 400, 800]);
        assert_eq!(ms[9], 5000);
        assert!(bounds.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn retry_after_wins_and_reset_restarts() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        b.next_delay(None);
        assert_eq!(b.current().unwrap().as_millis(), 200);
        b.reset();
        assert_eq!(b.current(), None);
        b.next_delay(None);
        assert_eq!(b.current().unwrap().as_millis(), 100);
    }

    #[test]
    fn full_jitter_spreads_over_the_whole_range() {
        let bound = Duration::from_secs(1);
        let samples: Vec<Duration> = (0..2000).map(|_| full_jitter(bound)).collect();
        assert!(samples.iter().all(|d| *d <= bound));
        assert!(samples.iter().any(|d| *d < bound / 10));
        assert!(samples.iter().any(|d| *d > bound * 9 / 10));
    }
}
