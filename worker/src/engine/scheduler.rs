//! What runs in the next step: a pure decision from the running sequences' progress and a
//! token budget.
//!
//! Every decoding sequence gets its one token first (so a long prompt arriving never stalls
//! them); what budget is left goes to prefill chunks, oldest sequence first. A prompt longer
//! than the budget is prefilled over several steps, interleaved with decodes.

use crate::model::attention::LogitRows;

/// One sequence's tokens and how far the cache has got.
#[derive(Debug, Clone)]
pub struct SeqState {
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose keys/values are in the cache.
    pub cached: usize,
    /// Generated tokens allowed.
    pub max_tokens: usize,
}

impl SeqState {
    /// A sequence that has not run yet.
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt_len: prompt.len(),
            tokens: prompt,
            cached: 0,
            max_tokens,
        }
    }

    /// Prompt + generated tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether there are no tokens at all (never, for an admitted sequence).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Prompt tokens.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Every token so far (for repetition penalties).
    pub fn history(&self) -> &[u32] {
        &self.tokens
    }

    /// Appends a sampled token.
    pub fn push(&mut self, token: u32) {
        self.tokens.push(token);
    }

    /// The next `n` tokens not yet in the cache.
    pub fn next_tokens(&self, n: usize) -> &[u32] {
        &self.tokens[self.cached..self.cached + n]
    }

    /// Tokens not yet in the cache.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.cached
    }

    /// Whether the prompt is fully cached (the sequence is decoding).
    pub fn is_decoding(&self) -> bool {
        self.cached >= self.prompt_len
    }
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanEntry {
    /// Index into the running list.
    pub seq: usize,
    /// Tokens to run.
    pub tokens: usize,
    /// Whether the step reaches the sequence's last token (a token is sampled).
    pub logits: LogitRows,
}

/// The next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Sequences in the step, in running-list order.
    pub entries: Vec<PlanEntry>,
}

impl Plan {
    /// Plans a step over `seqs` (in admission order) with at most `budget` new tokens;
    /// decodes always run, even beyond the budget, so admitted work never stalls.
    pub fn new(seqs: &[&SeqState], budget: usize) -> Self {
        let mut entries = Vec::with_capacity(seqs.len());
        let mut used = 0;
        for (i, s) in seqs.iter().enumerate() {
            if s.is_decoding() && s.pending() > 0 {
                entries.push(PlanEntry {
                    seq: i,
                    tokens: s.pending(),
                    logits: LogitRows::Last,
                });
                used += s.pending();
            }
        }
        for (i, s) in seqs.iter().enumerate() {
            if s.is_decoding() || used >= budget {
                continue;
            }
            let n = s.pending().min(budget - used);
            used += n;
            entries.push(PlanEntry {
                seq: i,
                tokens: n,
                logits: if n == s.pending() {
                    LogitRows::Last
                } else {
                    LogitRows::None
                },
            });
        }
        entries.sort_by_key(|e| e.seq);
        Self { entries }
    }

    /// New tokens in the step.
    pub fn tokens(&self) -> usize {
        self.entries.iter().map(|e| e.tokens).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoding(prompt: usize) -> SeqState {
        let mut s = SeqState::new(vec![1; prompt], 10);
        s.cached = prompt;
        s.push(7);
        s
    }

    #[test]
    fn decodes_first_then_prefill_chunks_within_budget() {
        let a = decoding(5);
        let b = SeqState::new(vec![2; 100], 10);
        let c = SeqState::new(vec![3; 4], 10);
        let plan = Plan::new(&[&b, &a, &c], 32);
        assert_eq!(
            plan.entries,
            vec![
                PlanEntry {
                    seq: 0,
                    tokens: 31,
                    logits: LogitRows::None
                },
                PlanEntry {
                    seq: 1,
                    tokens: 1,
                    logits: LogitRows::Last
                },
            ]
        );
        assert_eq!(plan.tokens(), 32);
    }

    #[test]
    fn a_prompt_that_fits_samples_its_first_token() {
        let mut b = SeqState::new(vec![2; 100], 10);
        b.cached = 90;
        let c = SeqState::new(vec![3; 4], 10);
        let plan = Plan::new(&[&b, &c], 64);
        assert_eq!(plan.entries[0].tokens, 10);
        assert_eq!(plan.entries[0].logits, LogitRows::Last);
        assert_eq!(plan.entries[1].tokens, 4);
    }

    #[test]
    fn decodes_run_even_past_the_budget() {
        let seqs: Vec<SeqState> = (0..8).map(|_| decoding(3)).collect();
        let refs: Vec<&SeqState> = seqs.iter().collect();
        let plan = Plan::new(&refs, 4);
        assert_eq!(plan.entries.len(), 8);
    }
}
