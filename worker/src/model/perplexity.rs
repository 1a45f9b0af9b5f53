//! Perplexity of a loaded model on a token stream, computed as llama.cpp's
//! `llama-perplexity` computes it by default, so the two can be set side by side on the same
//! file and text:
//!
//! - the tokens are cut into consecutive chunks of `ctx` tokens (a tail shorter than `ctx` is
//!   dropped);
//! - each chunk is run from an empty cache; only its second half is scored: the logits at
//!   positions `ctx/2 .. ctx-2` predict tokens `ctx/2+1 .. ctx-1`, so every scored token has
//!   at least `ctx/2` tokens of context;
//! - perplexity is `exp(mean negative log-likelihood)` over every scored token, in f64.
//!
//! [`greedy`] is the other side-by-side check: the argmax continuation of prompt ids, which
//! `make bench-llamacpp` compares with llama.cpp's on the same GGUF file.

use candle_core::{DType, Device};

use super::Transformer;
use super::attention::{ForwardBatch, LogitRows, PagedKv, SeqStep};

/// KV-cache block size used for the runs (any works; the cache holds one chunk).
const BLOCK: usize = 16;

/// The result of a perplexity run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Perplexity {
    /// `exp(mean NLL)`.
    pub perplexity: f64,
    /// Chunks run.
    pub chunks: usize,
    /// Tokens scored.
    pub scored_tokens: usize,
    /// The mean negative log-likelihood, nats per token.
    pub mean_nll: f64,
}

/// Runs `tokens` through `model` in chunks of `ctx` (see the module docs); `progress` gets
/// `(chunk done, chunks, perplexity so far)` after each chunk.
pub fn perplexity(
    model: &Transformer,
    tokens: &[u32],
    ctx: usize,
    mut progress: impl FnMut(usize, usize, f64),
) -> anyhow::Result<Perplexity> {
    anyhow::ensure!(
        ctx >= 4,
        "the context must be at least 4 tokens (got {ctx})"
    );
    let chunks = tokens.len() / ctx;
    anyhow::ensure!(
        chunks > 0,
        "the text has {} tokens, fewer than one chunk of {ctx}",
        tokens.len()
    );
    let device: &Device = model.device();
    let blocks = ctx.div_ceil(BLOCK);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let kv = PagedKv::new(model.config(), blocks * BLOCK, model.dtype(), device)?;
    let first = ctx / 2;
    let (mut nll, mut scored) = (0f64, 0usize);
    for c in 0..chunks {
        let chunk = &tokens[c * ctx..(c + 1) * ctx];
        // The unscored first half fills the cache; the second half's logits are scored.
        let steps = [
            SeqStep {
                tokens: &chunk[..first],
                cached: 0,
                blocks: &table,
                logits: LogitRows::None,
            },
            SeqStep {
                tokens: &chunk[first..],
                cached: first,
                blocks: &table,
                logits: LogitRows::All,
            },
        ];
        let mut logits = None;
        for step in steps {
            let batch = ForwardBatch::new(&[step], BLOCK, device)?;
            let (l, _) = model
                .forward(std::slice::from_ref(&batch), &kv)
                .map_err(|e| anyhow::anyhow!("chunk {c}: {e}"))?;
            logits = Some(l);
        }
        let rows = logits
            .expect("two steps ran")
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        // Row i is position first + i and predicts token first + i + 1.
        for (i, row) in rows.iter().enumerate().take(ctx - 1 - first) {
            let target = chunk[first + i + 1] as usize;
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|v| f64::from(v - max).exp()).sum();
            nll += sum.ln() - f64::from(row[target] - max);
            scored += 1;
        }
        progress(c + 1, chunks, (nll / scored as f64).exp());
    }
    let mean_nll = nll / scored as f64;
    Ok(Perplexity {
        perplexity: mean_nll.exp(),
        chunks,
        scored_tokens: scored,
        mean_nll,
    })
}

/// The `new_tokens` ids a greedy decode picks after `prompt` (the lowest id on ties, as
/// the engine's greedy sampler), one sequence from an empty cache.
pub fn greedy(model: &Transformer, prompt: &[u32], new_tokens: usize) -> anyhow::Result<Vec<u32>> {
    anyhow::ensure!(!prompt.is_empty(), "the prompt has no tokens");
    let vocab = model.config().vocab_size;
    if let Some(bad) = prompt.iter().find(|t| **t as usize >= vocab) {
        anyhow::bail!("prompt id {bad} is outside the vocabulary ({vocab} ids)");
    }
    let device: &Device = model.device();
    let total = prompt.len() + new_tokens;
    let blocks = total.div_ceil(BLOCK);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let kv = PagedKv::new(model.config(), blocks * BLOCK, model.dtype(), device)?;
    let mut ids = prompt.to_vec();
    let mut cached = 0;
    while ids.len() < total {
        let step = SeqStep {
            tokens: &ids[cached..],
            cached,
            blocks: &table,
            logits: LogitRows::Last,
        };
        let batch = ForwardBatch::new(&[step], BLOCK, device)?;
        let (logits, _) = model
            .forward(std::slice::from_ref(&batch), &kv)
            .map_err(|e| anyhow::anyhow!("position {}: {e}", ids.len()))?;
        let row = logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let best = row
            .iter()
            .enumerate()
            .fold(0, |best, (i, v)| if *v > row[best] { i } else { best });
        cached = ids.len();
        ids.push(best as u32);
    }
    Ok(ids.split_off(prompt.len()))
}
