//! What happened in the last few seconds, for live reports (`/demand`): rates over a
//! sliding window of whole seconds and latency quantiles over the same window.
//!
//! Prometheus counters and histograms hold totals since start, so a reader that wants
//! "now" must keep the previous scrape; the autoscaler polls several pods every few
//! hundred milliseconds and should not have to. These hold the window themselves.
//! Every method takes `now`, so the tests drive the clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The window every recent figure covers, in seconds.
pub const WINDOW_SECONDS: u64 = 10;
const BUCKETS: usize = WINDOW_SECONDS as usize;

/// Events per second over the last [`WINDOW_SECONDS`], counted in one-second buckets.
#[derive(Debug, Clone)]
pub struct RecentRate {
    origin: Instant,
    /// `(second since origin, count)`; a bucket is current while its second is.
    buckets: [(u64, u64); BUCKETS],
}

impl RecentRate {
    pub fn new(now: Instant) -> Self {
        Self {
            origin: now,
            buckets: [(u64::MAX, 0); BUCKETS],
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }

    /// `n` events at `now`.
    pub fn add(&mut self, now: Instant, n: u64) {
        let s = self.second(now);
        let bucket = &mut self.buckets[(s % WINDOW_SECONDS) as usize];
        if bucket.0 != s {
            *bucket = (s, 0);
        }
        bucket.1 += n;
    }

    /// Events in the window ending at `now`.
    fn in_window(&self, now: Instant) -> u64 {
        let s = self.second(now);
        self.buckets
            .iter()
            .filter(|(at, _)| *at <= s && s - *at < WINDOW_SECONDS)
            .map(|(_, n)| n)
            .sum()
    }

    /// Events per second over the window (or over the time since the first event, when
    /// that is shorter, and at least one second, so a first burst is not a huge rate).
    pub fn per_second(&self, now: Instant) -> f64 {
        let covered = now
            .saturating_duration_since(self.origin)
            .as_secs_f64()
            .clamp(1.0, WINDOW_SECONDS as f64);
        self.in_window(now) as f64 / covered
    }

    /// Nothing in the window.
    pub fn is_quiet(&self, now: Instant) -> bool {
        self.in_window(now) == 0
    }
}

/// The latencies observed in the last [`WINDOW_SECONDS`] (the newest [`Self::CAPACITY`] of
/// them), for quantiles.
#[derive(Debug, Clone, Default)]
pub struct RecentLatencies {
    samples: VecDeque<(Instant, Duration)>,
}

/// Quantiles of [`RecentLatencies`], in seconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Quantiles {
    /// Observations in the window.
    pub samples: usize,
    pub p50_seconds: f64,
    pub p99_seconds: f64,
}

impl RecentLatencies {
    /// The most observations kept: beyond it the oldest go, so the memory is bounded
    /// whatever the request rate (the quantiles then cover the newest ones).
    pub const CAPACITY: usize = 4096;

    pub fn observe(&mut self, now: Instant, latency: Duration) {
        self.forget(now);
        if self.samples.len() == Self::CAPACITY {
            self.samples.pop_front();
        }
        self.samples.push_back((now, latency));
    }

    fn forget(&mut self, now: Instant) {
        let window = Duration::from_secs(WINDOW_SECONDS);
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= window)
        {
            self.samples.pop_front();
        }
    }

    /// p50 and p99 (nearest rank) over the window; `None` when it is empty.
    pub fn quantiles(&mut self, now: Instant) -> Option<Quantiles> {
        self.forget(now);
        let mut v: Vec<Duration> = self.samples.iter().map(|(_, d)| *d).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let rank = |q: usize| v[(v.len() * q).div_ceil(100).max(1) - 1].as_secs_f64();
        Some(Quantiles {
            samples: v.len(),
            p50_seconds: rank(50),
            p99_seconds: rank(99),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_covers_the_last_ten_seconds_and_forgets_older_ones() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = RecentRate::new(t0);
        // A first burst is spread over at least one second.
        r.add(at(0), 5);
        assert_eq!(r.per_second(at(100)), 5.0);
        // 10 a second for 20 s: the rate is 10, whatever came before the window.
        for ms in (0..20_000).step_by(100) {
            r.add(at(1_000 + ms), 1);
        }
        let rate = r.per_second(at(20_999));
        assert!((rate - 10.0).abs() <= 1.0, "{rate}");
        assert!(!r.is_quiet(at(20_999)));
        // Ten quiet seconds later: nothing.
        assert_eq!(r.per_second(at(31_000)), 0.0);
        assert!(r.is_quiet(at(31_000)));
        // A bucket reused after a wrap starts from zero.
        r.add(at(41_000), 2);
        assert_eq!(r.per_second(at(41_500)), 0.2);
    }

    #[test]
    fn latency_quantiles_cover_the_window_and_stay_bounded() {
        let t0 = Instant::now();
        let mut l = RecentLatencies::default();
        assert_eq!(l.quantiles(t0), None);
        for i in 1..=100u64 {
            l.observe(t0, Duration::from_millis(i));
        }
        let q = l.quantiles(t0).expect("samples");
        assert_eq!(q.samples, 100);
        assert_eq!(q.p50_seconds, 0.050);
        assert_eq!(q.p99_seconds, 0.099);
        // Eleven seconds on, the old ones are gone.
        let later = t0 + Duration::from_secs(11);
        l.observe(later, Duration::from_millis(7));
        let q = l.quantiles(later).expect("one sample");
        assert_eq!((q.samples, q.p99_seconds), (1, 0.007));
        for _ in 0..2 * RecentLatencies::CAPACITY {
            l.observe(later, Duration::from_millis(1));
        }
        assert_eq!(l.samples.len(), RecentLatencies::CAPACITY);
    }
}
