//! Choosing the next token from one sequence's logits. Pure CPU code over `&mut [f32]`:
//! no model, no batch, no tokenizer.
//!
//! The pipeline follows Hugging Face `generate` (and vLLM), so a checkpoint's
//! `generation_config.json` defaults mean what their authors tested:
//!
//! 1. penalties, in place: `repetition_penalty` (HF: for every token in prompt + output,
//!    a positive logit is divided by it, a negative one multiplied), then
//!    `presence_penalty` (OpenAI: subtracted once from every token present in the output);
//! 2. `temperature == 0`: greedy, the arg max, lowest id on ties (no random draw);
//! 3. otherwise `top_k` keeps the k highest logits, the temperature scales the rest,
//!    `top_p` keeps the smallest prefix of the probability-sorted tokens whose mass
//!    reaches `top_p` (always at least one), and one token is drawn from what remains.
//!
//! `top_p` is applied to the temperature-scaled distribution, as HF's
//! `TemperatureLogitsWarper` → `TopKLogitsWarper` → `TopPLogitsWarper` order and vLLM do.
//!
//! Each sequence owns its [`Sampler`] and with it a xoshiro256** generator seeded from
//! the request's seed (through SplitMix64), drawing exactly one number per sampled token:
//! a seed reproduces the same tokens whatever else shares the batch.
//!
//! For a 150k vocabulary the cost is one or two passes over the logits; `top_k` uses a
//! linear-time selection and `top_p` sorts only the head of the distribution, growing it
//! until it holds `top_p` of the mass.

use std::cell::RefCell;
use std::cmp::Ordering;

/// How one sequence picks its tokens. Checked by [`validate`](Self::validate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 = greedy. Accepted: finite, in [0, 100].
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 = off. Any value.
    pub top_k: u32,
    /// Nucleus sampling mass; 1 = off. Accepted: (0, 1].
    pub top_p: f32,
    /// HF repetition penalty over prompt + output; 1 = off. Accepted: (0, 10].
    pub repetition_penalty: f32,
    /// OpenAI presence penalty over the output; 0 = off. Accepted: [-2, 2].
    pub presence_penalty: f32,
    /// Seed of the sequence's random generator.
    pub seed: u64,
}

impl Default for SamplingConfig {
    /// Plain sampling at temperature 1 with nothing else on (OpenAI's defaults).
    fn default() -> Self {
        SamplingConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }
}

/// A sampling option outside its accepted range. Displays as `field: problem`, so a caller
/// can prefix the request path (`sampling.temperature: ...`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {value} is not accepted; expected {accepted}")]
pub struct SamplingError {
    pub field: &'static str,
    pub value: String,
    pub accepted: &'static str,
}

impl SamplingConfig {
    /// Greedy decoding, nothing else on.
    pub fn greedy() -> Self {
        SamplingConfig {
            temperature: 0.0,
            ..SamplingConfig::default()
        }
    }

    /// Checks every field against its documented range.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let check = |field, value: f32, ok: bool, accepted| {
            if ok && value.is_finite() {
                Ok(())
            } else {
                Err(SamplingError {
                    field,
                    value: value.to_string(),
                    accepted,
                })
            }
        };
        let t = self.temperature;
        check(
            "temperature",
            t,
            (0.0..=100.0).contains(&t),
            "a number in [0, 100] (0 = greedy)",
        )?;
        let p = self.top_p;
        check(
            "top_p",
            p,
            p > 0.0 && p <= 1.0,
            "a number in (0, 1] (1 = off)",
        )?;
        let r = self.repetition_penalty;
        check(
            "repetition_penalty",
            r,
            r > 0.0 && r <= 10.0,
            "a number in (0, 10] (1 = off)",
        )?;
        let q = self.presence_penalty;
        check(
            "presence_penalty",
            q,
            (-2.0..=2.0).contains(&q),
            "a number in [-2, 2] (0 = off)",
        )?;
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        // NaN and negative temperatures (an unvalidated config) fall back to greedy too.
        self.temperature.is_nan() || self.temperature <= 0.0
    }
}

/// A sampled token and its log-probability under the model's raw distribution (the
/// logits as given, before penalties, temperature and truncation; what OpenAI-style
/// `logprobs` report).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
}

/// One sequence's sampler: its configuration and random generator. Small; the
/// vocabulary-sized scratch buffers live once per thread, not once per sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplingConfig,
    rng: Xoshiro256StarStar,
    /// Length of the prompt within `history`, learnt on the first `sample` call (the
    /// history then holds exactly the prompt) unless set explicitly.
    prompt_len: Option<usize>,
}

impl Sampler {
    /// A sampler for one sequence. `config` should have passed
    /// [`SamplingConfig::validate`]; out-of-range values do not panic (a non-positive
    /// temperature is greedy, a `top_p` outside (0, 1) is off or keeps one token).
    pub fn new(config: &SamplingConfig) -> Sampler {
        Sampler {
            config: *config,
            rng: Xoshiro256StarStar::seed_from_u64(config.seed),
            prompt_len: None,
        }
    }

    /// Tells the sampler where the prompt ends in `history` (for `presence_penalty`, which
    /// counts output tokens only). Without it, the first `sample` call's history is taken
    /// to be the prompt.
    pub fn set_prompt_len(&mut self, prompt_len: usize) {
        self.prompt_len = Some(prompt_len);
    }

    pub fn config(&self) -> &SamplingConfig {
        &self.config
    }

    /// The next token. `logits` is one row over the vocabulary (modified in place by the
    /// penalties); `history` is the sequence so far, prompt then output.
    ///
    /// # Panics
    /// If `logits` is empty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.sample_inner(logits, history, false).token
    }

    /// [`sample`](Self::sample) plus the token's log-probability (one extra pass over the
    /// logits).
    pub fn sample_with_logprob(&mut self, logits: &mut [f32], history: &[u32]) -> Sampled {
        self.sample_inner(logits, history, true)
    }

    fn sample_inner(&mut self, logits: &mut [f32], history: &[u32], want_logprob: bool) -> Sampled {
        assert!(!logits.is_empty(), "sampling from an empty logits row");
        let prompt_len = (*self.prompt_len.get_or_insert(history.len())).min(history.len());
        // Exactly one draw per sampled token (none when greedy), so the stream of tokens
        // depends on the seed alone.
        let u = (!self.config.is_greedy()).then(|| self.rng.next_f64());
        SCRATCH.with(|scratch| {
            scratch
                .borrow_mut()
                .sample(&self.config, u, logits, history, prompt_len, want_logprob)
        })
    }
}

thread_local! {
    /// Scratch buffers of the sampling thread (the engine samples on one thread).
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Vocabulary-sized buffers reused between calls, so sampling allocates nothing after the
/// first call on a thread.
#[derive(Debug, Default)]
struct Scratch {
    /// (value, token id) candidates for top-k / top-p.
    candidates: Vec<(f32, u32)>,
    /// Unnormalised probabilities of the whole row (plain sampling).
    weights: Vec<f32>,
    /// One bit per vocabulary id: tokens already penalised in the current pass.
    seen: Vec<u64>,
    /// (token, logit before any penalty), in the order penalised.
    penalised: Vec<(u32, f32)>,
}

impl Scratch {
    fn sample(
        &mut self,
        config: &SamplingConfig,
        u: Option<f64>,
        logits: &mut [f32],
        history: &[u32],
        prompt_len: usize,
        want_logprob: bool,
    ) -> Sampled {
        let raw_log_sum_exp = want_logprob.then(|| log_sum_exp(logits));

        self.penalised.clear();
        self.apply_penalties(config, logits, history, prompt_len);

        let token = match u {
            None => argmax(logits),
            Some(u) => self.draw(config, u, logits),
        };

        let logprob = match raw_log_sum_exp {
            Some(lse) => {
                let raw = self
                    .penalised
                    .iter()
                    .find(|(t, _)| *t == token)
                    .map_or(logits[token as usize], |(_, original)| *original);
                raw - lse
            }
            None => 0.0,
        };
        Sampled { token, logprob }
    }

    fn apply_penalties(
        &mut self,
        config: &SamplingConfig,
        logits: &mut [f32],
        history: &[u32],
        prompt_len: usize,
    ) {
        let repetition = config.repetition_penalty;
        let presence = config.presence_penalty;
        let repetition_on = repetition != 1.0 && repetition > 0.0 && repetition.is_finite();
        let presence_on = presence != 0.0 && presence.is_finite();
        if !repetition_on && !presence_on {
            return;
        }
        let words = logits.len().div_ceil(64);
        if self.seen.len() < words {
            self.seen.resize(words, 0);
        }
        if repetition_on {
            let apply = |x: f32| {
                if x > 0.0 {
                    x / repetition
                } else {
                    x * repetition
                }
            };
            self.penalise(logits, history, apply);
        }
        if presence_on {
            self.penalise(logits, &history[prompt_len..], |x| x - presence);
        }
    }

    /// Applies `apply` once to each distinct token of `tokens`, recording the value it
    /// had before any penalty.
    fn penalise(&mut self, logits: &mut [f32], tokens: &[u32], apply: impl Fn(f32) -> f32) {
        for &t in tokens {
            let i = t as usize;
            if i >= logits.len() {
                continue; // an id past this row (e.g. a padded vocabulary): nothing to do
            }
            let (word, bit) = (i / 64, 1u64 << (i % 64));
            if self.seen[word] & bit != 0 {
                continue;
            }
            self.seen[word] |= bit;
            self.penalised.push((t, logits[i]));
            logits[i] = apply(logits[i]);
        }
        // Clear only the words this call touched, not the whole vocabulary's bitset.
        for &(t, _) in &self.penalised {
            self.seen[t as usize / 64] = 0;
        }
    }

    /// Top-k, temperature, top-p, then the draw `u` (uniform in [0, 1)) picks a token.
    fn draw(&mut self, config: &SamplingConfig, u: f64, logits: &[f32]) -> u32 {
        let n = logits.len();
        let inv_t = 1.0 / config.temperature;
        let top_k = config.top_k as usize;
        let top_k = if top_k == 0 || top_k >= n {
            None
        } else {
            Some(top_k)
        };
        let top_p = config.top_p;
        let top_p_on = top_p < 1.0;

        let max = max_logit(logits);
        if !max.is_finite() {
            // All -inf, or a +inf logit: the arg max is the only sensible answer.
            return argmax(logits);
        }

        if top_k.is_none() && !top_p_on {
            // Plain softmax sampling: one exp pass into a reused buffer, then walk it until
            // the mass passes u (no sort, no candidate list).
            let weights = &mut self.weights;
            weights.clear();
            weights.extend(logits.iter().map(|&x| {
                if x.is_nan() {
                    0.0
                } else {
                    ((x - max) * inv_t).exp()
                }
            }));
            let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
            let target = u * total;
            let mut acc = 0.0;
            let mut last = None;
            for (i, &w) in weights.iter().enumerate() {
                if w > 0.0 {
                    acc += f64::from(w);
                    last = Some(i);
                    if acc > target {
                        return i as u32;
                    }
                }
            }
            // Rounding left `target` just above the sum: the last token with any mass.
            return last.map_or_else(|| argmax(logits), |i| i as u32);
        }

        let candidates = &mut self.candidates;
        candidates.clear();
        candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, x)| !x.is_nan())
                .map(|(i, &x)| (x, i as u32)),
        );
        if let Some(k) = top_k
            && k < candidates.len()
        {
            candidates.select_nth_unstable_by(k - 1, descending);
            candidates.truncate(k);
        }
        // Logits → unnormalised probabilities at the temperature. `max` is the global
        // maximum, which top-k always keeps.
        for c in candidates.iter_mut() {
            c.0 = ((c.0 - max) * inv_t).exp();
        }
        let mut total: f64 = candidates.iter().map(|c| f64::from(c.0)).sum();

        if top_p_on {
            let keep = nucleus(candidates, total * f64::from(top_p.max(0.0)));
            candidates.truncate(keep);
            total = candidates.iter().map(|c| f64::from(c.0)).sum();
        }

        let target = u * total;
        let mut acc = 0.0;
        for &(w, id) in candidates.iter() {
            acc += f64::from(w);
            if acc > target {
                return id;
            }
        }
        candidates
            .iter()
            .rev()
            .find(|c| c.0 > 0.0)
            .or(candidates.first())
            .map_or_else(|| argmax(logits), |c| c.1)
    }
}

/// Highest value first, then lowest id: a total order, so selection is deterministic.
fn descending(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Reorders `candidates` so the nucleus comes first, sorted by descending weight, and
/// returns its size: the tokens taken in order while the mass before them is below
/// `threshold` (so the one that crosses it is kept, and always at least one). Sorts only
/// as much of the head as needed, quadrupling the sorted part each round.
fn nucleus(candidates: &mut [(f32, u32)], threshold: f64) -> usize {
    let len = candidates.len();
    let mut sorted = 0;
    let mut chunk = 64;
    let mut mass = 0.0;
    while sorted < len {
        let end = (sorted + chunk).min(len);
        let rest = &mut candidates[sorted..];
        if end < len {
            rest.select_nth_unstable_by(end - sorted - 1, descending);
        }
        rest[..end - sorted].sort_unstable_by(descending);
        for (i, c) in candidates[sorted..end].iter().enumerate() {
            if mass >= threshold && sorted + i > 0 {
                return sorted + i;
            }
            mass += f64::from(c.0);
        }
        sorted = end;
        chunk *= 4;
    }
    len.max(1)
}

/// The arg max, lowest index on ties; NaN never wins. Returns 0 for an all-NaN row.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &x) in logits.iter().enumerate() {
        if x > best_value || (!found && x == f32::NEG_INFINITY) {
            best = i;
            best_value = x;
            found = true;
        }
    }
    best as u32
}

fn max_logit(logits: &[f32]) -> f32 {
    logits
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `ln Σ exp(x)` over the row, stably.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = max_logit(logits);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = logits
        .iter()
        .filter(|x| !x.is_nan())
        .map(|&x| f64::from((x - max).exp()))
        .sum();
    max + sum.ln() as f32
}

/// xoshiro256** (Blackman & Vigna): small, fast, and good enough for sampling.
#[derive(Debug, Clone)]
struct Xoshiro256StarStar {
    s: [u64; 4],
}

impl Xoshiro256StarStar {
    /// Seeds the state from SplitMix64, as the authors recommend; never all zero.
    fn seed_from_u64(seed: u64) -> Self {
        let mut sm = switchyard_edge::rng::Rng::new(seed);
        Xoshiro256StarStar {
            s: [sm.next_u64(), sm.next_u64(), sm.next_u64(), sm.next_u64()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(temperature: f32, top_k: u32, top_p: f32, seed: u64) -> SamplingConfig {
        SamplingConfig {
            temperature,
            top_k,
            top_p,
            seed,
            ..SamplingConfig::default()
        }
    }

    /// Logits whose softmax is exactly `probs`.
    fn logits_for(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    /// Frequencies of each token over `n` draws from a fresh sampler.
    fn frequencies(config: &SamplingConfig, logits: &[f32], n: usize) -> Vec<f64> {
        let mut sampler = Sampler::new(config);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            let mut row = logits.to_vec();
            counts[sampler.sample(&mut row, &[]) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    fn assert_close(actual: &[f64], expected: &[f64], tolerance: f64) {
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!(
                (a - e).abs() <= tolerance,
                "token {i}: frequency {a:.4}, expected {e:.4} (all: {actual:?})"
            );
        }
    }

    #[test]
    fn splitmix64_reference_value() {
        // First output for seed 0 in the reference implementation.
        assert_eq!(
            switchyard_edge::rng::Rng::new(0).next_u64(),
            0xE220_A839_7B1D_CDAF
        );
    }

    #[test]
    fn greedy_picks_argmax_lowest_index_on_ties() {
        let mut sampler = Sampler::new(&SamplingConfig::greedy());
        assert_eq!(sampler.sample(&mut [0.1, 3.0, -1.0, 2.9], &[]), 1);
        assert_eq!(sampler.sample(&mut [1.0, 5.0, 5.0, 5.0], &[]), 1);
        assert_eq!(sampler.sample(&mut [f32::NAN, 1.0, f32::NAN], &[]), 1);
        assert_eq!(sampler.sample(&mut [f32::NEG_INFINITY; 3], &[]), 0);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect();
        let run = |seed| {
            let mut sampler = Sampler::new(&config(1.0, 50, 0.9, seed));
            let mut history = Vec::new();
            (0..200)
                .map(|_| {
                    let t = sampler.sample(&mut logits.clone(), &history);
                    history.push(t);
                    t
                })
                .collect::<Vec<u32>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn top_k_1_and_tiny_top_p_equal_greedy() {
        let logits: Vec<f32> = (0..5000).map(|i| ((i * 31) % 977) as f32 * 0.01).collect();
        let greedy = argmax(&logits);
        for seed in 0..50 {
            let mut k1 = Sampler::new(&config(1.5, 1, 1.0, seed));
            assert_eq!(k1.sample(&mut logits.clone(), &[]), greedy);
            let mut p = Sampler::new(&config(1.5, 0, 1e-6, seed));
            assert_eq!(p.sample(&mut logits.clone(), &[]), greedy);
        }
    }

    #[test]
    fn distribution_matches_softmax() {
        let probs = [0.5, 0.3, 0.15, 0.05];
        let logits = logits_for(&probs);
        // 20k draws: the standard error is at most 0.0035; 0.015 is over 4 of them.
        let freq = frequencies(&config(1.0, 0, 1.0, 7), &logits, 20_000);
        assert_close(&freq, &probs, 0.015);
    }

    #[test]
    fn temperature_sharpens() {
        let logits = logits_for(&[0.5, 0.3, 0.2]);
        // At T = 0.5 the probabilities are ∝ p²: 0.25, 0.09, 0.04 over 0.38.
        let freq = frequencies(&config(0.5, 0, 1.0, 11), &logits, 20_000);
        assert_close(&freq, &[0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38], 0.015);
    }

    #[test]
    fn top_k_and_top_p_truncate() {
        let logits = logits_for(&[0.5, 0.3, 0.15, 0.05]);
        // top_k = 2: 0.5 and 0.3 renormalised.
        let freq = frequencies(&config(1.0, 2, 1.0, 3), &logits, 20_000);
        assert_close(&freq, &[0.625, 0.375, 0.0, 0.0], 0.015);
        // top_p = 0.6: 0.5 is below it, so 0.3 (which crosses it) is kept too.
        let freq = frequencies(&config(1.0, 0, 0.6, 5), &logits, 20_000);
        assert_close(&freq, &[0.625, 0.375, 0.0, 0.0], 0.015);
        // top_p = 0.85: three tokens (0.5 + 0.3 = 0.8 < 0.85).
        let freq = frequencies(&config(1.0, 0, 0.85, 9), &logits, 20_000);
        assert_close(&freq, &[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], 0.015);
    }

    #[test]
    fn top_p_over_a_large_vocabulary() {
        // 150k tokens: four share 80% of the mass, the tail the rest. top_p = 0.75 must
        // keep exactly the four, whose order the chunked sort has to get right.
        let n = 150_000;
        let tail = 0.2 / (n - 4) as f64;
        let mut probs = vec![tail; n];
        for (i, p) in [(140_000, 0.35), (3, 0.2), (77_777, 0.15), (149_999, 0.1)] {
            probs[i] = p;
        }
        let logits = logits_for(&probs);
        let mut sampler = Sampler::new(&config(1.0, 0, 0.75, 1));
        let mut counts = std::collections::HashMap::new();
        // Few draws: an unoptimised test build takes milliseconds per 150k-token draw.
        let draws = 400;
        for _ in 0..draws {
            *counts
                .entry(sampler.sample(&mut logits.clone(), &[]))
                .or_insert(0usize) += 1;
        }
        let mut seen: Vec<u32> = counts.keys().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, [3, 77_777, 140_000, 149_999]);
        // Expected 0.35 / 0.8 = 0.4375; the standard error at 400 draws is 0.025.
        let share = counts[&140_000] as f64 / draws as f64;
        assert!((share - 0.35 / 0.8).abs() < 0.1, "{share}");
    }

    #[test]
    fn repetition_penalty_hf_semantics() {
        let mut sampler = Sampler::new(&SamplingConfig {
            repetition_penalty: 2.0,
            ..SamplingConfig::greedy()
        });
        let mut logits = [4.0, -1.0, 3.0, 0.5];
        // Token 0 (positive) is halved, token 1 (negative) doubled, repeats count once.
        let token = sampler.sample(&mut logits, &[0, 1, 0, 1]);
        assert_eq!(logits, [2.0, -2.0, 3.0, 0.5]);
        assert_eq!(token, 2);
    }

    #[test]
    fn presence_penalty_counts_output_only() {
        let mut sampler = Sampler::new(&SamplingConfig {
            presence_penalty: 1.5,
            ..SamplingConfig::greedy()
        });
        // First call: the history is the prompt; nothing is penalised.
        let mut logits = [1.0, 2.0, 0.0];
        assert_eq!(sampler.sample(&mut logits, &[1]), 1);
        assert_eq!(logits, [1.0, 2.0, 0.0]);
        // Now token 1 is output (twice) and is penalised once; prompt token 0 is not.
        let mut logits = [1.0, 2.0, 0.0];
        assert_eq!(sampler.sample(&mut logits, &[0, 1, 1]), 0);
        assert_eq!(logits, [1.0, 0.5, 0.0]);

        // Both penalties: repetition first, then presence.
        let mut sampler = Sampler::new(&SamplingConfig {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            ..SamplingConfig::greedy()
        });
        sampler.set_prompt_len(1);
        let mut logits = [4.0, 4.0, 1.0];
        sampler.sample(&mut logits, &[0, 1, 9]);
        assert_eq!(logits, [2.0, 1.5, 1.0]);
    }

    #[test]
    fn logprob_is_of_the_raw_distribution() {
        let probs = [0.6, 0.3, 0.1];
        let mut sampler = Sampler::new(&SamplingConfig {
            repetition_penalty: 3.0,
            ..SamplingConfig::greedy()
        });
        // Penalising token 0 makes token 1 the greedy choice; its logprob is still
        // that of the unpenalised model.
        let mut logits = logits_for(&probs);
        let s = sampler.sample_with_logprob(&mut logits, &[0]);
        assert_eq!(s.token, 1);
        assert!((s.logprob - 0.3f32.ln()).abs() < 1e-5, "{}", s.logprob);

        let mut sampler = Sampler::new(&config(0.7, 2, 0.9, 4));
        let s = sampler.sample_with_logprob(&mut logits_for(&probs), &[]);
        assert!((s.logprob - (probs[s.token as usize] as f32).ln()).abs() < 1e-5);
    }

    #[test]
    fn masked_and_degenerate_rows() {
        // -inf logits are never drawn.
        let mut logits = vec![f32::NEG_INFINITY; 10];
        logits[7] = 0.0;
        logits[2] = 0.0;
        let mut sampler = Sampler::new(&config(1.0, 0, 1.0, 0));
        for _ in 0..100 {
            let t = sampler.sample(&mut logits.clone(), &[]);
            assert!(t == 2 || t == 7, "{t}");
        }
        let mut sampler = Sampler::new(&config(1.0, 5, 0.5, 0));
        for _ in 0..100 {
            let t = sampler.sample(&mut logits.clone(), &[]);
            assert!(t == 2 || t == 7, "{t}");
        }
        // Everything masked, or a +inf: the arg max.
        let mut sampler = Sampler::new(&config(1.0, 0, 1.0, 0));
        assert_eq!(sampler.sample(&mut [f32::NEG_INFINITY; 4], &[]), 0);
        assert_eq!(sampler.sample(&mut [0.0, f32::INFINITY, 1.0], &[]), 1);
        // Out-of-vocabulary history ids are ignored.
        let mut sampler = Sampler::new(&SamplingConfig {
            repetition_penalty: 1.2,
            ..SamplingConfig::greedy()
        });
        assert_eq!(sampler.sample(&mut [0.0, 1.0], &[5, 1_000_000]), 1);
    }

    #[test]
    fn validate_names_field_and_range() {
        assert!(SamplingConfig::default().validate().is_ok());
        assert!(SamplingConfig::greedy().validate().is_ok());
        let cases = [
            (
                SamplingConfig {
                    temperature: -0.1,
                    ..Default::default()
                },
                "temperature",
                "[0, 100]",
            ),
            (
                SamplingConfig {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
                "[0, 100]",
            ),
            (
                SamplingConfig {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
                "(0, 1]",
            ),
            (
                SamplingConfig {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p",
                "(0, 1]",
            ),
            (
                SamplingConfig {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
                "(0, 10]",
            ),
            (
                SamplingConfig {
                    presence_penalty: 2.5,
                    ..Default::default()
                },
                "presence_penalty",
                "[-2, 2]",
            ),
        ];
        for (config, field, range) in cases {
            let err = config.validate().expect_err(field);
            assert_eq!(err.field, field);
            let text = err.to_string();
            assert!(text.starts_with(&format!("{field}: ")), "{text}");
            assert!(text.contains(range), "{text}");
        }
    }
}
