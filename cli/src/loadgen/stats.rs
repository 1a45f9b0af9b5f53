//! Latency distributions with exact percentiles.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// A latency distribution kept exactly at microsecond resolution: a count per distinct
/// value, so memory grows with the number of distinct microsecond values (bounded by the
/// spread of the latencies), not with the number of samples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencyHistogram {
    /// Microseconds → how many samples had that value.
    counts: BTreeMap<u64, u64>,
    count: u64,
    sum_us: u128,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl LatencyHistogram {
    /// An empty distribution.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sample (truncated to whole microseconds).
    pub fn record(&mut self, value: Duration) {
        self.record_n(value, 1);
    }

    /// Adds `n` samples of the same value.
    pub fn record_n(&mut self, value: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let us = micros(value);
        *self.counts.entry(us).or_insert(0) += n;
        self.count += n;
        self.sum_us += u128::from(us) * u128::from(n);
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (&us, &n) in &other.counts {
            *self.counts.entry(us).or_insert(0) += n;
        }
        self.count += other.count;
        self.sum_us += other.sum_us;
    }

    /// Samples at or below `limit`.
    pub fn count_at_most(&self, limit: Duration) -> u64 {
        self.counts.range(..=micros(limit)).map(|(_, n)| n).sum()
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `p`-th percentile (`0 < p <= 100`) by the nearest-rank method: the smallest
    /// sample such that at least `p`% of the samples are at or below it. Always one of the
    /// recorded values, never interpolated. `None` when empty; `p` outside `(0, 100]` is
    /// clamped (so `p <= 0` gives the minimum).
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let p = if p.is_nan() {
            100.0
        } else {
            p.clamp(0.0, 100.0)
        };
        // p * n is exact for integral p; the epsilon absorbs rounding for fractional p
        // (99.9 * 1000 / 100 must give rank 999, not 1000).
        let exact = p * self.count as f64 / 100.0;
        let rank = ((exact - 1e-9).ceil().max(1.0) as u64).min(self.count);
        let mut seen = 0;
        for (&us, &n) in &self.counts {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_micros(us));
            }
        }
        self.max()
    }

    /// The arithmetic mean, to the microsecond (rounded down).
    pub fn mean(&self) -> Option<Duration> {
        let mean = self.sum_us.checked_div(u128::from(self.count))?;
        Some(Duration::from_micros(
            u64::try_from(mean).unwrap_or(u64::MAX),
        ))
    }

    /// The smallest sample.
    pub fn min(&self) -> Option<Duration> {
        self.counts
            .first_key_value()
            .map(|(&us, _)| Duration::from_micros(us))
    }

    /// The largest sample.
    pub fn max(&self) -> Option<Duration> {
        self.counts
            .last_key_value()
            .map(|(&us, _)| Duration::from_micros(us))
    }

    /// Count, mean, p50/p90/p99, min and max in milliseconds; `None` when empty.
    pub fn summary(&self) -> Option<LatencySummary> {
        // From whole microseconds, so the figures print without binary noise (92.65, not
        // 92.64999999999999).
        let ms = |d: Option<Duration>| d.map_or(0.0, |d| d.as_micros() as f64 / 1e3);
        (self.count > 0).then(|| LatencySummary {
            count: self.count,
            mean_ms: ms(self.mean()),
            p50_ms: ms(self.percentile(50.0)),
            p90_ms: ms(self.percentile(90.0)),
            p99_ms: ms(self.percentile(99.0)),
            min_ms: ms(self.min()),
            max_ms: ms(self.max()),
        })
    }
}

/// The figures a report shows for one latency distribution, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Samples (requests for TTFT and end-to-end latency, tokens for inter-token latency).
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn of(values: &[u64]) -> LatencyHistogram {
        let mut h = LatencyHistogram::new();
        for &v in values {
            h.record(ms(v));
        }
        h
    }

    #[test]
    fn empty_has_no_figures() {
        let h = LatencyHistogram::new();
        assert_eq!(h.percentile(50.0), None);
        assert_eq!(h.mean(), None);
        assert_eq!(h.max(), None);
        assert_eq!(h.summary(), None);
    }

    #[test]
    fn nearest_rank_percentiles_on_one_to_ten() {
        // Recorded out of order: the distribution sorts.
        let h = of(&[7, 3, 10, 1, 5, 2, 9, 4, 8, 6]);
        assert_eq!(h.percentile(50.0), Some(ms(5)));
        assert_eq!(h.percentile(90.0), Some(ms(9)));
        assert_eq!(h.percentile(99.0), Some(ms(10)));
        assert_eq!(h.percentile(100.0), Some(ms(10)));
        assert_eq!(h.percentile(10.0), Some(ms(1)));
        assert_eq!(h.percentile(11.0), Some(ms(2)));
        assert_eq!(h.percentile(0.0), Some(ms(1)));
        assert_eq!(h.mean(), Some(Duration::from_micros(5500)));
        assert_eq!(h.min(), Some(ms(1)));
        assert_eq!(h.max(), Some(ms(10)));
    }

    #[test]
    fn percentiles_of_one_to_a_hundred_and_a_thousand() {
        let h = of(&(1..=100).collect::<Vec<_>>());
        assert_eq!(h.percentile(50.0), Some(ms(50)));
        assert_eq!(h.percentile(90.0), Some(ms(90)));
        assert_eq!(h.percentile(99.0), Some(ms(99)));
        let h = of(&(1..=1000).collect::<Vec<_>>());
        assert_eq!(h.percentile(99.9), Some(ms(999)));
        assert_eq!(h.percentile(99.0), Some(ms(990)));
    }

    #[test]
    fn single_sample_and_repeats() {
        let h = of(&[42]);
        for p in [1.0, 50.0, 99.0, 100.0] {
            assert_eq!(h.percentile(p), Some(ms(42)));
        }
        let mut h = LatencyHistogram::new();
        h.record_n(ms(1), 98);
        h.record_n(ms(100), 2);
        h.record_n(ms(5), 0);
        assert_eq!(h.count(), 100);
        assert_eq!(h.percentile(98.0), Some(ms(1)));
        assert_eq!(h.percentile(99.0), Some(ms(100)));
        assert_eq!(h.mean(), Some(Duration::from_micros(2980)));
        assert_eq!(h.min(), Some(ms(1)));
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let mut a = of(&[1, 2, 3]);
        a.merge(&of(&[3, 4]));
        assert_eq!(a, of(&[1, 2, 3, 3, 4]));
    }

    #[test]
    fn summary_in_milliseconds() {
        let s = of(&[1, 2, 3, 4]).summary().expect("not empty");
        assert_eq!(s.count, 4);
        assert_eq!(s.mean_ms, 2.5);
        assert_eq!(s.p50_ms, 2.0);
        assert_eq!(s.p90_ms, 4.0);
        assert_eq!(s.p99_ms, 4.0);
        assert_eq!(s.min_ms, 1.0);
        assert_eq!(s.max_ms, 4.0);
    }
}
