//! When requests are sent and whose they are: Poisson arrival times for the open loop, and
//! the weighted split of requests between tenants.

use std::time::Duration;

use super::rng::Rng;

/// Arrival times of a Poisson process: exponential gaps with mean `1 / rate`, drawn from a
/// seeded [`Rng`], so a seed fixes the whole schedule. Yields each arrival's offset from the
/// start; the first arrival comes one gap after the start. Never ends.
#[derive(Debug, Clone)]
pub struct PoissonArrivals {
    rng: Rng,
    rate: f64,
    at: f64,
}

impl PoissonArrivals {
    /// Arrivals at `rate` per second on average. `rate` must be finite and positive
    /// (checked where the flag is parsed); anything else yields no arrivals.
    pub fn new(rate: f64, seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            rate,
            at: 0.0,
        }
    }
}

impl Iterator for PoissonArrivals {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return None;
        }
        self.at += self.rng.exponential(self.rate);
        Duration::try_from_secs_f64(self.at).ok()
    }
}

/// Splits requests between tenants in proportion to integer weights, deterministically:
/// smooth weighted round robin (as nginx balances upstreams). Over every run of
/// `sum(weights)` picks each tenant gets exactly its weight, and its picks are spread out
/// rather than bunched (weights 5, 1, 1 give `a a b a c a a`).
#[derive(Debug, Clone)]
pub struct WeightedSplit {
    weights: Vec<i64>,
    current: Vec<i64>,
    total: i64,
}

impl WeightedSplit {
    /// A split over `weights.len()` tenants. Zero weights never get picked; with no positive
    /// weight at all, every pick is tenant 0.
    pub fn new(weights: &[u32]) -> Self {
        let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w)).collect();
        Self {
            total: weights.iter().sum(),
            current: vec![0; weights.len()],
            weights,
        }
    }

    /// The index of the tenant of the next request.
    pub fn next_index(&mut self) -> usize {
        if self.total == 0 {
            return 0;
        }
        let mut best = 0;
        for i in 0..self.weights.len() {
            self.current[i] += self.weights[i];
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= self.total;
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_weighted_split_matches_nginx() {
        let mut split = WeightedSplit::new(&[5, 1, 1]);
        let picks: Vec<usize> = (0..14).map(|_| split.next_index()).collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn split_is_exact_per_cycle_and_skips_zero_weights() {
        let mut split = WeightedSplit::new(&[3, 0, 2]);
        let mut counts = [0; 3];
        for _ in 0..50 {
            counts[split.next_index()] += 1;
        }
        assert_eq!(counts, [30, 0, 20]);
        assert_eq!(WeightedSplit::new(&[]).next_index(), 0);
        assert_eq!(WeightedSplit::new(&[0, 0]).next_index(), 0);
    }

    #[test]
    fn poisson_arrivals_are_seeded_increasing_and_at_the_rate() {
        let a: Vec<Duration> = PoissonArrivals::new(50.0, 9).take(20).collect();
        let b: Vec<Duration> = PoissonArrivals::new(50.0, 9).take(20).collect();
        assert_eq!(a, b);
        assert!(a.windows(2).all(|w| w[0] <= w[1]));

        // The gaps are the PRNG's exponential draws, summed.
        let mut rng = Rng::new(9);
        let mut at = 0.0;
        for arrival in &a {
            at += rng.exponential(50.0);
            assert_eq!(*arrival, Duration::from_secs_f64(at));
        }

        // 20 000 arrivals at 50/s take about 400 s.
        let last = PoissonArrivals::new(50.0, 3).nth(19_999).expect("endless");
        assert!((last.as_secs_f64() - 400.0).abs() < 10.0, "{last:?}");
        assert_eq!(PoissonArrivals::new(0.0, 1).next(), None);
        assert_eq!(PoissonArrivals::new(f64::NAN, 1).next(), None);
    }
}
