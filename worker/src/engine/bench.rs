//! `switchyard-worker bench`: the engine's own speed, in process (no gRPC), the figures
//! `docs/benchmarks.md` sets beside Python `transformers` on the same checkpoint.
//!
//! - prefill: one prompt of `prompt_len` tokens, tokens/s of the whole prefill;
//! - decode at batch B: B sequences prefilled, then timed while all B decode
//!   `decode_len` tokens together (greedy, EOS ignored), tokens/s = B · steps / time;
//! - for each step, the bytes of weights it read (attention, router, shared experts, LM
//!   head, and the routed experts the batch actually touched per layer), against a measured
//!   copy bandwidth of the machine: the memory-bandwidth bound decode cannot beat.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::model::Transformer;

use super::sampling::SamplingConfig;
use super::{
    EngineConfig, EngineHandle, EngineObserver, Event, GenerationRequest, Occupancy, StepReport,
};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Decode batch sizes.
    pub batches: Vec<usize>,
    /// Prompt tokens per sequence.
    pub prompt_len: usize,
    /// Tokens each sequence decodes in the timed part.
    pub decode_len: usize,
    /// Vocabulary rows to draw prompt ids from.
    pub vocab: usize,
    /// Overlap micro-batches with remote experts (see [`EngineConfig::overlap`]).
    pub overlap: bool,
}

/// One measured figure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figure {
    /// `prefill` or `decode`.
    pub phase: &'static str,
    /// Sequences.
    pub batch: usize,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Mean engine step time, milliseconds.
    pub step_ms: f64,
    /// Mean bytes of weights read per step.
    pub weight_bytes_per_step: f64,
    /// `weight_bytes_per_step / step time / copy bandwidth`.
    pub bandwidth_fraction: f64,
}

#[derive(Debug, Default)]
struct Recorder {
    steps: AtomicU64,
    step_ns: AtomicU64,
    /// Σ over steps of bytes of weights read.
    bytes: Mutex<f64>,
    per_expert_bytes: f64,
    fixed_bytes: f64,
}

impl EngineObserver for Recorder {
    fn step(&self, r: &StepReport<'_>) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.step_ns
            .fetch_add(r.duration.as_nanos() as u64, Ordering::Relaxed);
        let distinct: usize = r
            .routes
            .iter()
            .map(|(_, routes)| {
                let mut e = routes.experts.clone();
                e.sort_unstable();
                e.dedup();
                e.len()
            })
            .sum();
        if let Ok(mut b) = self.bytes.lock() {
            *b += self.fixed_bytes + distinct as f64 * self.per_expert_bytes;
        }
    }

    fn occupancy(&self, _: Occupancy) {}
}

impl Recorder {
    fn reset(&self) {
        self.steps.store(0, Ordering::Relaxed);
        self.step_ns.store(0, Ordering::Relaxed);
        if let Ok(mut b) = self.bytes.lock() {
            *b = 0.0;
        }
    }

    fn mean(&self) -> (f64, f64) {
        let steps = self.steps.load(Ordering::Relaxed).max(1) as f64;
        let ns = self.step_ns.load(Ordering::Relaxed) as f64;
        let bytes = self.bytes.lock().map_or(0.0, |b| *b);
        (ns / steps / 1e6, bytes / steps)
    }
}

/// Memory copy bandwidth of this machine in bytes/s (best of a few 256 MiB copies; reads +
/// writes counted, as a weight read is one stream).
pub fn copy_bandwidth() -> f64 {
    let n = 64 << 20; // f32s = 256 MiB
    // On the pages the weights are on (`model::pages`): zeroed allocations are not yet
    // touched, so advised before they are written.
    let mut src = vec![0.0f32; n];
    let mut dst = vec![0.0f32; n];
    crate::model::pages::advise(&src);
    crate::model::pages::advise(&dst);
    src.fill(1.0);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&mut dst);
    }
    // A copy moves each byte twice (read + write).
    2.0 * (n * 4) as f64 / best
}

/// Memory read bandwidth in bytes/s: every core summing its share of a 512 MiB array (best
/// of a few passes). Decode streams weights without writing them back, so this, not the
/// copy figure, is the bound it can reach.
pub fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = 128 << 20; // f32s = 512 MiB
    let mut data = vec![0.0f32; n];
    crate::model::pages::advise(&data);
    data.fill(1.0);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let sum: f32 = data
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 16];
                for chunk in c.chunks_exact(16) {
                    for i in 0..16 {
                        acc[i] += chunk[i];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(sum);
    }
    (n * 4) as f64 / best
}

/// Why a benchmark could not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The model or the engine failed (or a tensor could not be made).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The benchmark's runtime could not start.
    #[error("starting the benchmark's runtime")]
    Runtime(#[from] std::io::Error),
    /// The engine refused a request.
    #[error(transparent)]
    Submit(#[from] super::SubmitError),
    /// A sequence failed in the engine.
    #[error("a sequence failed: {0}")]
    Failed(String),
    /// The engine ended a sequence without finishing it.
    #[error("the engine dropped a sequence")]
    Dropped,
    /// A timing task panicked.
    #[error(transparent)]
    Join(#[from] tokio::task::JoinError),
    /// The routed experts failed.
    #[error(transparent)]
    Experts(#[from] crate::model::moe::ExpertError),
    /// The benchmark cannot measure what was asked.
    #[error("{0}")]
    Invalid(String),
}

/// Runs the benchmark; `progress` gets a line per phase.
pub fn run(
    model: Arc<Transformer>,
    cfg: &BenchConfig,
    bandwidth: f64,
    mut progress: impl FnMut(&str),
) -> Result<Vec<Figure>, BenchError> {
    let c = model.config().clone();
    let per_expert = model.routed_expert_bytes() as f64;
    let all = model.weight_bytes_per_step(0) as f64;
    let recorder = Arc::new(Recorder {
        per_expert_bytes: per_expert,
        fixed_bytes: all,
        ..Recorder::default()
    });
    let max_batch = cfg.batches.iter().copied().max().unwrap_or(1);
    let block = 16;
    let per_seq = (cfg.prompt_len + cfg.decode_len + 1).div_ceil(block);
    let engine = EngineHandle::start(
        model,
        EngineConfig {
            block_size: block,
            kv_blocks: per_seq * max_batch.max(1) + 1,
            max_running: max_batch.max(1),
            // Every prompt of a batch prefills in one step, so the timed window is pure
            // decode of all B sequences in lock-step.
            step_token_budget: cfg.prompt_len * max_batch.max(1),
            max_context: c.max_position_embeddings,
            overlap: cfg.overlap,
            // Prompts repeat across runs: the bench measures computing them.
            prefix_cache: false,
        },
        recorder.clone(),
    )?;
    let prompt = |i: usize| -> Vec<u32> {
        (0..cfg.prompt_len)
            .map(|j| ((i * 7919 + j * 104_729) % cfg.vocab.max(2)) as u32)
            .collect()
    };
    let request = |i: usize, max_tokens: usize| GenerationRequest {
        prompt: prompt(i),
        max_tokens,
        sampling: SamplingConfig::greedy(),
        stop_token_ids: Vec::new(),
        deadline: None,
        rank: 0,
        cache_salt: 0,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let mut figures = Vec::new();

    // Warm up (first-touch page faults of the mmapped weights, allocator).
    rt.block_on(drain(engine.submit(request(0, 2))?))?;

    // Prefill: one sequence, max_tokens 1, so the time is the prefill step(s).
    recorder.reset();
    let t = Instant::now();
    rt.block_on(drain(engine.submit(request(1, 1))?))?;
    let took = t.elapsed();
    let (step_ms, weight_bytes) = recorder.mean();
    figures.push(figure(
        "prefill",
        1,
        cfg.prompt_len as f64 / took.as_secs_f64(),
        step_ms,
        weight_bytes,
        bandwidth,
    ));
    progress(&format!(
        "prefill {} tokens: {:.0} tokens/s",
        cfg.prompt_len, figures[0].tokens_per_s
    ));

    for &b in &cfg.batches {
        // Prefill all B first (max_tokens 1 would end them), so time only the decode part:
        // submit with the decode budget, and start the clock at the first token of the last.
        recorder.reset();
        let receivers = (0..b)
            .map(|i| engine.submit(request(100 + i, cfg.decode_len + 1)))
            .collect::<Result<Vec<_>, _>>()?;
        let times: Vec<Vec<Instant>> = rt.block_on(async {
            let mut handles = Vec::new();
            for mut rx in receivers {
                handles.push(tokio::spawn(async move {
                    let mut times = Vec::new();
                    while let Some(ev) = rx.recv().await {
                        match ev {
                            Event::Token { .. } => times.push(Instant::now()),
                            Event::Started { .. } => {}
                            Event::Finished { .. } => return Ok(times),
                            Event::Failed { message, .. } => {
                                return Err(BenchError::Failed(message));
                            }
                        }
                    }
                    Err(BenchError::Dropped)
                }));
            }
            let mut all = Vec::new();
            for h in handles {
                all.push(h.await??);
            }
            Ok::<_, BenchError>(all)
        })?;
        // The timed window starts when the last sequence has its first token (every
        // sequence is decoding from then on) and ends with the last token.
        let start = times.iter().filter_map(|t| t.first()).max().copied();
        let end = times.iter().filter_map(|t| t.last()).max().copied();
        let (Some(start), Some(end)) = (start, end) else {
            return Err(BenchError::Invalid(format!(
                "no tokens were generated at batch {b}"
            )));
        };
        let tokens = times.iter().flatten().filter(|t| **t > start).count();
        let secs = (end - start).as_secs_f64().max(1e-9);
        let (_, weight_bytes) = recorder.mean();
        let tps = tokens as f64 / secs;
        let step_ms = secs * 1e3 / (tokens as f64 / b as f64).max(1.0);
        figures.push(figure("decode", b, tps, step_ms, weight_bytes, bandwidth));
        progress(&format!(
            "decode batch {b}: {tps:.1} tokens/s ({step_ms:.1} ms/step)"
        ));
    }
    Ok(figures)
}

fn figure(
    phase: &'static str,
    batch: usize,
    tps: f64,
    step_ms: f64,
    bytes: f64,
    bandwidth: f64,
) -> Figure {
    Figure {
        phase,
        batch,
        tokens_per_s: tps,
        step_ms,
        weight_bytes_per_step: bytes,
        bandwidth_fraction: if step_ms > 0.0 {
            bytes / (step_ms / 1e3) / bandwidth
        } else {
            0.0
        },
    }
}

async fn drain(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> Result<Duration, BenchError> {
    let t = Instant::now();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { .. } | Event::Started { .. } => {}
            Event::Finished { .. } => return Ok(t.elapsed()),
            Event::Failed { message, .. } => return Err(BenchError::Failed(message)),
        }
    }
    Err(BenchError::Dropped)
}
