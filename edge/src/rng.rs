//! A tiny seeded PRNG (SplitMix64), the one source of reproducible randomness in
//! Switchyard: the load generator's workloads and arrival times, the seeding of each sequence's
//! sampler, and the demo checkpoints' weights. No `rand` dependency. Not for anything secret.

/// SplitMix64 (Steele, Lea, Flood 2014): 64 bits of state, passes BigCrush, and every seed
/// (0 included) gives a full-period stream.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator whose stream is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[0, n)`; 0 when `n` is 0. (Multiply-shift: the bias is below 2^-32 for
    /// any `n` that fits in 32 bits.)
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[start, end)`; `start` when the range is empty.
    pub fn range_u32(&mut self, start: u32, end: u32) -> u32 {
        if end <= start {
            return start;
        }
        // below(n) < n = end - start, so the sum stays below `end`.
        start + self.below(u64::from(end - start)) as u32
    }

    /// An exponentially distributed value with the given rate (mean `1 / rate`): the gap
    /// between two events of a Poisson process.
    pub fn exponential(&mut self, rate: f64) -> f64 {
        // 1 - u is in (0, 1], so the logarithm is finite.
        -(1.0 - self.next_f64()).ln() / rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_splitmix64() {
        // First outputs of the reference implementation for seed 0.
        let mut rng = Rng::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(rng.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn same_seed_same_stream() {
        let a: Vec<u64> = {
            let mut r = Rng::new(42);
            (0..8).map(|_| r.next_u64()).collect()
        };
        let mut r = Rng::new(42);
        let b: Vec<u64> = (0..8).map(|_| r.next_u64()).collect();
        assert_eq!(a, b);
        assert_ne!(a[0], Rng::new(43).next_u64());
    }

    #[test]
    fn ranges_stay_in_bounds() {
        let mut rng = Rng::new(7);
        for _ in 0..10_000 {
            let f = rng.next_f64();
            assert!((0.0..1.0).contains(&f));
            let x = rng.range_u32(10, 13);
            assert!((10..13).contains(&x));
        }
        assert_eq!(rng.range_u32(5, 5), 5);
        assert_eq!(rng.below(0), 0);
    }

    #[test]
    fn exponential_has_the_right_mean() {
        let mut rng = Rng::new(1);
        let n = 200_000;
        let mean = (0..n).map(|_| rng.exponential(4.0)).sum::<f64>() / f64::from(n);
        assert!((mean - 0.25).abs() < 0.005, "mean {mean}");
    }
}
