//! The inference engine: continuous batching over one model and one paged KV cache.
//!
//! ```text
//!  EngineHandle::submit ──cmd──> engine thread ──────────────────────────────────────┐
//!   (any task)                    │ admit: preempted/waiting → batch by free blocks  │
//!                                 │ grow:  blocks for new tokens; short → preempt    │
//!                                 │ plan:  every decode + prefill chunks ≤ budget    │
//!                                 │ run:   Transformer::forward(ForwardBatch, PagedKv)│
//!                                 │ sample, stop checks, free blocks of ended seqs   │
//!  Receiver<Event> <──Token/Finished/Failed──────────────────────────────────────────┘
//! ```
//!
//! One OS thread owns the model, the cache and every sequence; callers talk to it through
//! channels, so there is no lock on the hot path. A sequence joins the batch between two
//! steps; long prompts are prefilled in chunks so running decodes keep moving. Dropping
//! the event receiver (client gone, deadline passed) cancels the sequence: its blocks are
//! back in the pool before the next step runs.

pub mod bench;
pub mod kv_budget;
pub mod kv_cache;
pub mod sampling;
pub mod scheduler;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::model::attention::{ForwardBatch, PagedKv, SeqStep};
use crate::model::moe::ExpertError;
use crate::model::transformer::{StepRoutes, Transformer};
use kv_cache::{BlockHash, BlockHasher, BlockPool, CacheCounters, blocks_for_tokens};
use sampling::{Sampler, SamplingConfig};
use scheduler::{Plan, SeqState};

/// Sizes of the engine's resources.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Token positions per KV block.
    pub block_size: usize,
    /// Blocks in the KV cache (its memory budget divided by a block's bytes).
    pub kv_blocks: usize,
    /// Sequences in the batch at most.
    pub max_running: usize,
    /// New tokens per step at most (decodes first, then prefill chunks).
    pub step_token_budget: usize,
    /// Longest context (prompt + output) a sequence may reach.
    pub max_context: usize,
    /// Split a decode step into two micro-batches when the routed experts are remote, so
    /// one micro-batch's attention runs while the other's experts are computed.
    pub overlap: bool,
    /// Reuse the keys and values of full blocks a sequence of the same salt computed
    /// before ([`kv_cache`]'s prefix cache).
    pub prefix_cache: bool,
}

/// One generation to run.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt token ids (non-empty).
    pub prompt: Vec<u32>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// How to pick each token.
    pub sampling: SamplingConfig,
    /// Tokens that end the sequence (EOS unless ignored, plus the caller's).
    pub stop_token_ids: Vec<u32>,
    /// Drop the sequence (with [`FinishReason::Deadline`]) once this passes.
    pub deadline: Option<Instant>,
    /// Scheduling rank (higher first): while sequences of a higher rank are in the batch,
    /// those of lower ranks pause, keeping their cache; equal ranks share each step. At
    /// most `max_running` sequences of a rank or above are admitted at once.
    pub rank: u8,
    /// The prefix cache's partition: only sequences of the same salt share cached blocks
    /// (the frontend gives each tenant its own).
    pub cache_salt: u64,
}

/// Why a sequence ended normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced one of its stop tokens (sent as its last token, with `stop` set).
    StopToken(u32),
    /// It produced `max_tokens` tokens.
    Length,
    /// It reached the model's context length.
    ContextLength,
    /// Its deadline passed before it finished.
    Deadline,
}

/// What the engine tells a caller about its sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The sequence left the queue and joined the batch.
    Started {
        /// From submission to admission.
        queue_time: Duration,
        /// Prompt tokens whose keys and values came from the prefix cache.
        cached_prompt_tokens: usize,
    },
    /// A new token.
    Token {
        /// The token id.
        id: u32,
        /// It is one of the sequence's stop tokens, whose text is not part of the output.
        stop: bool,
        /// It is the sequence's last token: `Finished` follows.
        last: bool,
    },
    /// The sequence ended; no further events follow.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens, including a final stop token.
        completion_tokens: usize,
        /// Prompt tokens whose keys and values came from the prefix cache.
        cached_prompt_tokens: usize,
        /// From submission to the sequence's first step.
        queue_time: Duration,
    },
    /// The model failed on a step this sequence was in; no further events follow.
    Failed {
        /// What went wrong.
        message: String,
        /// Whether the cause is capacity that may come back (routed experts with no
        /// reachable shard: `UNAVAILABLE`), rather than a fault (`INTERNAL`).
        unavailable: bool,
    },
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The prompt is empty.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// Prompt + max_tokens exceed the context.
    #[error(
        "prompt ({prompt} tokens) + max_tokens ({max_tokens}) exceeds the context length {context}"
    )]
    TooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Requested output tokens.
        max_tokens: usize,
        /// The engine's context length.
        context: usize,
    },
    /// The request needs more KV blocks than the whole cache has.
    #[error("the request needs {needed} KV-cache blocks but the cache has {total}")]
    CacheTooSmall {
        /// Blocks needed.
        needed: usize,
        /// Blocks in the cache.
        total: usize,
    },
    /// The engine thread has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

/// One step's numbers, for metrics.
#[derive(Debug)]
pub struct StepReport<'a> {
    /// Wall time of the model step.
    pub duration: Duration,
    /// Sequences in the batch.
    pub sequences: usize,
    /// New tokens in the batch.
    pub tokens: usize,
    /// Tokens sampled.
    pub sampled: usize,
    /// The routes each MoE layer chose.
    pub routes: &'a StepRoutes,
}

/// The engine's occupancy, reported after every change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Occupancy {
    /// Sequences in the batch.
    pub running: usize,
    /// Sequences admitted by the caller but waiting for KV blocks or a batch slot
    /// (preempted ones included).
    pub waiting: usize,
    /// KV blocks held.
    pub kv_used: usize,
    /// KV blocks free (including cached blocks no sequence holds).
    pub kv_free: usize,
    /// KV blocks in the prefix cache (held or not).
    pub kv_cached: usize,
    /// The prefix cache's counters so far.
    pub cache: CacheCounters,
    /// Sequences preempted so far (the KV cache ran short; recomputed later).
    pub preemptions: u64,
}

/// Receives the engine's numbers (the frontend's Prometheus metrics implement it).
pub trait EngineObserver: Send + Sync {
    /// After each model step.
    fn step(&self, report: &StepReport<'_>);
    /// Whenever the occupancy changes.
    fn occupancy(&self, occupancy: Occupancy);
}

/// An observer that ignores everything.
#[derive(Debug, Clone, Copy)]
pub struct NoObserver;

impl EngineObserver for NoObserver {
    fn step(&self, _: &StepReport<'_>) {}
    fn occupancy(&self, _: Occupancy) {}
}

enum Command {
    Submit(Box<Pending>),
}

/// Why a step must be run again.
enum Retry {
    /// Without these sequences (indices into `running`), which fail with this message.
    Without(Vec<usize>, String),
}

struct Pending {
    request: GenerationRequest,
    events: mpsc::UnboundedSender<Event>,
    submitted: Instant,
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    commands: std_mpsc::Sender<Command>,
    config: Arc<EngineConfig>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl EngineHandle {
    /// Starts the engine thread for `model`.
    pub fn start(
        model: Arc<Transformer>,
        config: EngineConfig,
        observer: Arc<dyn EngineObserver>,
    ) -> candle_core::Result<Self> {
        let slots = config.kv_blocks * config.block_size;
        let kv = PagedKv::new(model.config(), slots, model.dtype(), model.device())?;
        let (tx, rx) = std_mpsc::channel();
        let config = Arc::new(config);
        let mut engine = Engine {
            model,
            kv,
            blocks: BlockPool::new(config.kv_blocks, config.block_size),
            config: config.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            preempted: VecDeque::new(),
            preemptions: 0,
            observer,
            commands: rx,
            last_occupancy: None,
        };
        std::thread::Builder::new()
            .name("switchyard-engine".into())
            .spawn(move || engine.run())
            .map_err(|e| candle_core::Error::Msg(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            commands: tx,
            config,
        })
    }

    /// Checks `request` against the engine's limits and queues it. Events arrive on the
    /// returned receiver; dropping it cancels the sequence.
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, SubmitError> {
        self.check(&request)?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.commands
            .send(Command::Submit(Box::new(Pending {
                request,
                events: tx,
                submitted: Instant::now(),
            })))
            .map_err(|_| SubmitError::Stopped)?;
        Ok(rx)
    }

    /// Whether `request` could ever run on this engine.
    pub fn check(&self, request: &GenerationRequest) -> Result<(), SubmitError> {
        let c = &self.config;
        if request.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        let total = request.prompt.len() + request.max_tokens;
        if total > c.max_context {
            return Err(SubmitError::TooLong {
                prompt: request.prompt.len(),
                max_tokens: request.max_tokens,
                context: c.max_context,
            });
        }
        let needed = blocks_for_tokens(total, c.block_size);
        if needed > c.kv_blocks {
            return Err(SubmitError::CacheTooSmall {
                needed,
                total: c.kv_blocks,
            });
        }
        Ok(())
    }
}

/// A sequence the engine is running.
struct Sequence {
    state: SeqState,
    sampler: Sampler,
    stop_token_ids: Vec<u32>,
    events: mpsc::UnboundedSender<Event>,
    submitted: Instant,
    queue_time: Duration,
    deadline: Option<Instant>,
    blocks: Vec<u32>,
    rank: u8,
    /// The prefix cache's chain over this sequence's full blocks: `hashes[i]` is block
    /// `i`'s, for the blocks whose keys and values are computed (or were found).
    hashes: Vec<BlockHash>,
    salt: u64,
    /// Prompt tokens found in the prefix cache.
    cached_prompt: usize,
}

impl Sequence {
    /// Puts every block that became full and computed in the prefix cache.
    fn cache_full_blocks(&mut self, pool: &mut BlockPool) {
        let bs = pool.block_size();
        let mut hasher = BlockHasher::after(self.salt, self.hashes.last().copied());
        while (self.hashes.len() + 1) * bs <= self.state.cached {
            let i = self.hashes.len();
            let hash = hasher.next(&self.state.history()[i * bs..(i + 1) * bs]);
            pool.register(self.blocks[i], hash, self.salt);
            self.hashes.push(hash);
        }
    }
}

/// Where the next sequence to admit comes from (an index into the list).
#[derive(Debug, Clone, Copy)]
enum Candidate {
    Preempted(usize),
    Waiting(usize),
}

struct Engine {
    model: Arc<Transformer>,
    kv: PagedKv,
    blocks: BlockPool,
    config: Arc<EngineConfig>,
    waiting: VecDeque<Pending>,
    running: Vec<Sequence>,
    /// Sequences taken out of the batch when the cache ran short, holding no blocks,
    /// to be admitted again.
    preempted: VecDeque<Sequence>,
    /// Preemptions so far.
    preemptions: u64,
    observer: Arc<dyn EngineObserver>,
    commands: std_mpsc::Receiver<Command>,
    last_occupancy: Option<Occupancy>,
}

impl Engine {
    fn run(&mut self) {
        loop {
            let idle =
                self.running.is_empty() && self.waiting.is_empty() && self.preempted.is_empty();
            if idle {
                // Nothing to do: sleep until a request arrives (or every handle is gone).
                match self.commands.recv() {
                    Ok(cmd) => self.accept(cmd),
                    Err(_) => return,
                }
            }
            loop {
                match self.commands.try_recv() {
                    Ok(cmd) => self.accept(cmd),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) if idle => return,
                    Err(std_mpsc::TryRecvError::Disconnected) => break,
                }
            }
            self.drop_gone();
            self.admit();
            self.grow();
            self.report_occupancy();
            if !self.running.is_empty() {
                self.step();
                // Sequences that just ended freed their blocks: report it now, not when the
                // next request arrives (the engine may go idle right after this step).
                self.report_occupancy();
            } else if !self.waiting.is_empty() || !self.preempted.is_empty() {
                // Waiting work that cannot be admitted with nothing running cannot happen
                // (submit rejects what never fits); guard against a busy loop regardless.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn accept(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(p) => self.waiting.push_back(*p),
        }
    }

    /// Ends sequences whose caller went away or whose deadline passed, and frees their
    /// blocks.
    fn drop_gone(&mut self) {
        let now = Instant::now();
        self.waiting.retain(|p| {
            if p.events.is_closed() {
                return false;
            }
            if p.request.deadline.is_some_and(|d| d <= now) {
                let _ = p.events.send(Event::Finished {
                    reason: FinishReason::Deadline,
                    prompt_tokens: p.request.prompt.len(),
                    completion_tokens: 0,
                    cached_prompt_tokens: 0,
                    queue_time: now - p.submitted,
                });
                return false;
            }
            true
        });
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            if s.events.is_closed() {
                let s = self.running.remove(i);
                self.blocks.release(s.blocks);
            } else if s.deadline.is_some_and(|d| d <= now) {
                self.finish(i, FinishReason::Deadline);
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.preempted.len() {
            let s = &self.preempted[i];
            if s.events.is_closed() {
                self.preempted.remove(i);
            } else if s.deadline.is_some_and(|d| d <= now) {
                if let Some(s) = self.preempted.remove(i) {
                    self.ended(s, FinishReason::Deadline);
                }
            } else {
                i += 1;
            }
        }
    }

    /// Moves requests into the batch — preempted sequences and waiting requests, the
    /// highest rank first, then the oldest (a preempted sequence before a waiting request
    /// of its rank) — while each finds fewer than `max_running` sequences of its rank or
    /// above running (lower ranks pause while a higher one runs, so they never hold a
    /// higher one back) and the blocks its tokens need are free, cached ones included.
    /// Blocks are taken for the tokens known now (the prompt, or everything a preempted
    /// sequence had); the sequence grows as it generates ([`Self::grow`]). While anything
    /// runs, a watermark of 1% of the cache stays free, so an admission does not cause a
    /// preemption in the very next step.
    fn admit(&mut self) {
        let bs = self.config.block_size;
        loop {
            let resume = (0..self.preempted.len()).max_by_key(|&i| {
                let s = &self.preempted[i];
                (s.rank, std::cmp::Reverse(s.submitted))
            });
            let new = (0..self.waiting.len())
                .max_by_key(|&i| (self.waiting[i].request.rank, std::cmp::Reverse(i)));
            let pick = match (resume, new) {
                (Some(p), Some(w)) if self.preempted[p].rank >= self.waiting[w].request.rank => {
                    Candidate::Preempted(p)
                }
                (_, Some(w)) => Candidate::Waiting(w),
                (Some(p), None) => Candidate::Preempted(p),
                (None, None) => return,
            };
            let (rank, tokens, salt) = match pick {
                Candidate::Preempted(p) => {
                    let s = &self.preempted[p];
                    (s.rank, s.state.history(), s.salt)
                }
                Candidate::Waiting(w) => {
                    let r = &self.waiting[w].request;
                    (r.rank, r.prompt.as_slice(), r.cache_salt)
                }
            };
            let at_or_above = self.running.iter().filter(|s| s.rank >= rank).count();
            if at_or_above >= self.config.max_running {
                return;
            }
            // The full blocks before the last token (which must run, for the logits of
            // the next one) are looked up in the prefix cache.
            let cacheable = if self.config.prefix_cache {
                (tokens.len() - 1) / bs
            } else {
                0
            };
            let mut hashes = BlockHasher::chain(salt, tokens, bs, cacheable);
            let needed_total = blocks_for_tokens(tokens.len(), bs);
            let mut blocks = self.blocks.lookup(&hashes);
            let needed = needed_total - blocks.len();
            let watermark = if self.running.is_empty() {
                0
            } else {
                (self.config.kv_blocks / 100).max(1)
            };
            let more = (self.blocks.free() >= needed + watermark)
                .then(|| self.blocks.allocate(needed))
                .flatten();
            let Some(more) = more else {
                self.blocks.release(blocks);
                return;
            };
            hashes.truncate(blocks.len());
            let cached = blocks.len() * bs;
            blocks.extend(more);
            match pick {
                Candidate::Preempted(p) => {
                    let mut s = self
                        .preempted
                        .swap_remove_back(p)
                        .expect("an index from the list");
                    s.state.cached = cached;
                    s.blocks = blocks;
                    s.hashes = hashes;
                    self.running.push(s);
                }
                Candidate::Waiting(w) => {
                    let p = self.waiting.remove(w).expect("an index from the queue");
                    let queue_time = p.submitted.elapsed();
                    let _ = p.events.send(Event::Started {
                        queue_time,
                        cached_prompt_tokens: cached,
                    });
                    let mut sampler = Sampler::new(&p.request.sampling);
                    sampler.set_prompt_len(p.request.prompt.len());
                    let mut state = SeqState::new(p.request.prompt, p.request.max_tokens);
                    state.cached = cached;
                    self.running.push(Sequence {
                        sampler,
                        state,
                        stop_token_ids: p.request.stop_token_ids,
                        events: p.events,
                        submitted: p.submitted,
                        queue_time,
                        deadline: p.request.deadline,
                        blocks,
                        rank: p.request.rank,
                        hashes,
                        salt: p.request.cache_salt,
                        cached_prompt: cached,
                    });
                }
            }
        }
    }

    /// Gives every sequence that steps next (the top rank's) blocks for all its tokens
    /// not yet in the cache. When the pool runs short, the sequence of the lowest rank
    /// that arrived last is preempted — its blocks freed, its tokens kept, to be
    /// recomputed when it is admitted again (from the prefix cache, as far as its blocks
    /// are still there) — and the growth is tried again. A request whose whole budget
    /// exceeds the cache is refused at submission, so the oldest sequence of the top rank
    /// can always grow: every admitted request ends, by its own end or its client's.
    fn grow(&mut self) {
        let bs = self.config.block_size;
        loop {
            let Some(top) = self.running.iter().map(|s| s.rank).max() else {
                return;
            };
            let mut order: Vec<usize> = (0..self.running.len())
                .filter(|&i| self.running[i].rank == top)
                .collect();
            order.sort_by_key(|&i| self.running[i].submitted);
            let mut short = false;
            for i in order {
                let s = &mut self.running[i];
                let need = blocks_for_tokens(s.state.len(), bs).saturating_sub(s.blocks.len());
                if need == 0 {
                    continue;
                }
                match self.blocks.allocate(need) {
                    Some(more) => s.blocks.extend(more),
                    None => {
                        short = true;
                        break;
                    }
                }
            }
            if !short {
                return;
            }
            let victim = (0..self.running.len())
                .min_by_key(|&i| {
                    let s = &self.running[i];
                    (s.rank, std::cmp::Reverse(s.submitted))
                })
                .expect("a sequence runs");
            self.preempt(victim);
        }
    }

    /// Takes sequence `i` out of the batch: its blocks back to the pool (the computed
    /// full ones stay in the prefix cache until evicted), its tokens and sampler kept.
    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.blocks.release(std::mem::take(&mut s.blocks));
        s.state.cached = 0;
        s.hashes.clear();
        self.preemptions += 1;
        tracing::debug!(
            tokens = s.state.len(),
            rank = s.rank,
            "KV cache full: preempted a sequence, to recompute when blocks free up"
        );
        self.preempted.push_back(s);
    }

    fn report_occupancy(&mut self) {
        let now = Occupancy {
            running: self.running.len(),
            waiting: self.waiting.len() + self.preempted.len(),
            kv_used: self.blocks.used(),
            kv_free: self.blocks.free(),
            kv_cached: self.blocks.cached(),
            cache: self.blocks.counters(),
            preemptions: self.preemptions,
        };
        if self.last_occupancy != Some(now) {
            self.observer.occupancy(now);
            self.last_occupancy = Some(now);
        }
    }

    fn step(&mut self) {
        // Sequences whose routed experts have no reachable shard fail alone: the step is
        // run again without them (the others' cache writes are simply redone).
        for _ in 0..=self.running.len() {
            match self.try_step() {
                Ok(()) => return,
                Err(Retry::Without(seqs, message)) => {
                    tracing::warn!(failed = seqs.len(), %message, "routed experts unavailable; failing the sequences that need them");
                    self.fail(seqs, &message, true);
                    if self.running.is_empty() {
                        return;
                    }
                }
            }
        }
    }

    /// Removes sequences `seqs` (indices into `running`), telling each why.
    fn fail(&mut self, mut seqs: Vec<usize>, message: &str, unavailable: bool) {
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        seqs.dedup();
        for i in seqs {
            let s = self.running.remove(i);
            let _ = s.events.send(Event::Failed {
                message: message.to_string(),
                unavailable,
            });
            self.blocks.release(s.blocks);
        }
    }

    fn try_step(&mut self) -> Result<(), Retry> {
        // Only the highest rank present runs; lower ranks pause until it is done.
        let top = self.running.iter().map(|s| s.rank).max().unwrap_or(0);
        let active: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].rank == top)
            .collect();
        let states: Vec<&SeqState> = active.iter().map(|&i| &self.running[i].state).collect();
        let mut plan = Plan::new(&states, self.config.step_token_budget);
        for e in &mut plan.entries {
            e.seq = active[e.seq];
        }
        let steps: Vec<SeqStep<'_>> = plan
            .entries
            .iter()
            .map(|e| {
                let s = &self.running[e.seq];
                SeqStep {
                    tokens: s.state.next_tokens(e.tokens),
                    cached: s.state.cached,
                    blocks: &s.blocks,
                    logits: e.logits,
                }
            })
            .collect();
        // Two micro-batches when that can hide remote expert latency: a pure decode step
        // of at least two sequences (prefill chunks are compute-bound already).
        let split = if self.config.overlap
            && steps.len() >= 2
            && self.model.experts_are_remote()
            && steps.iter().all(|s| s.tokens.len() == 1)
        {
            steps.len() / 2
        } else {
            steps.len()
        };
        let started = Instant::now();
        // A panic inside a kernel must fail this step's sequences, not kill the engine
        // thread (which would leave the frontend up but unable to serve).
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let device = self.model.device();
            let mut parts = vec![ForwardBatch::new(
                &steps[..split],
                self.config.block_size,
                device,
            )?];
            if split < steps.len() {
                parts.push(ForwardBatch::new(
                    &steps[split..],
                    self.config.block_size,
                    device,
                )?);
            }
            // With every expert in this process the step runs on a worker of rayon's
            // pool, so the products inside fork from there: called from this thread, each
            // of a decode step's 60-odd parallel products injected its work from outside
            // and slept this thread until it was done, a futex wake and sleep per product
            // (17 % of a batch-1 Q4_K_M profile, docs/benchmarks.md). A step that waits on
            // shards stays on this thread: inside the pool it stalled the real-node test's
            // frontends (shard utilisation 0.00 under the spike; cause not yet isolated).
            let forward = || self.model.forward(&parts, &self.kv);
            let (logits, routes) = if self.model.experts_are_remote() {
                forward()?
            } else {
                rayon::scope(|_| forward())?
            };
            Ok((logits.to_vec2::<f32>()?, routes))
        }))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(ExpertError::Compute(candle_core::Error::Msg(format!(
                "panic in the model step: {what}"
            ))))
        });
        let duration = started.elapsed();
        let (mut logits, routes) = match result {
            Ok(ok) => ok,
            Err(ExpertError::Unavailable { rows, message }) => {
                // Rows are the step's new tokens in plan order: find their sequences.
                let mut at = 0u32;
                let mut hit = Vec::new();
                for e in &plan.entries {
                    let end = at + e.tokens as u32;
                    if rows.iter().any(|r| (at..end).contains(r)) {
                        hit.push(e.seq);
                    }
                    at = end;
                }
                if hit.is_empty() {
                    hit = plan.entries.iter().map(|e| e.seq).collect();
                }
                return Err(Retry::Without(hit, message));
            }
            Err(ExpertError::Compute(e)) => {
                tracing::error!(error = %e, "model step failed; failing the sequences in it");
                let idx = plan.entries.iter().map(|e| e.seq).collect();
                self.fail(idx, &format!("model step failed: {e}"), false);
                return Ok(());
            }
        };
        let mut sampled = 0;
        let mut rows = logits.iter_mut();
        let mut finished = Vec::new();
        for e in &plan.entries {
            let s = &mut self.running[e.seq];
            s.state.cached += e.tokens;
            if self.config.prefix_cache {
                s.cache_full_blocks(&mut self.blocks);
            }
            if e.logits == crate::model::attention::LogitRows::None {
                continue;
            }
            let Some(row) = rows.next() else { break };
            let token = s.sampler.sample(row, s.state.history());
            sampled += 1;
            s.state.push(token);
            let stop = s.stop_token_ids.contains(&token);
            let end = if stop {
                Some(FinishReason::StopToken(token))
            } else if s.state.generated() >= s.state.max_tokens {
                Some(FinishReason::Length)
            } else if s.state.len() >= self.config.max_context {
                Some(FinishReason::ContextLength)
            } else {
                None
            };
            let _ = s.events.send(Event::Token {
                id: token,
                stop,
                last: end.is_some(),
            });
            if let Some(reason) = end {
                finished.push((e.seq, reason));
            }
        }
        self.observer.step(&StepReport {
            duration,
            sequences: plan.entries.len(),
            tokens: plan.tokens(),
            sampled,
            routes: &routes,
        });
        // Highest index first so remove keeps the others' indices valid.
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        for (i, reason) in finished {
            self.finish(i, reason);
        }
        Ok(())
    }

    fn finish(&mut self, i: usize, reason: FinishReason) {
        let s = self.running.remove(i);
        self.ended(s, reason);
    }

    /// Tells `s`'s caller it ended, and frees its blocks.
    fn ended(&mut self, s: Sequence, reason: FinishReason) {
        let _ = s.events.send(Event::Finished {
            reason,
            prompt_tokens: s.state.prompt_len(),
            completion_tokens: s.state.generated(),
            cached_prompt_tokens: s.cached_prompt,
            queue_time: s.queue_time,
        });
        let _ = s.submitted;
        self.blocks.release(s.blocks);
    }
}
