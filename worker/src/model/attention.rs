//! Attention over a paged KV cache, for a batch that mixes prefill chunks and decode
//! tokens of many sequences.
//!
//! The batch is flat: `n` new tokens of all sequences one after another. Projections, norms
//! and rotary run once over all of them; each new key/value row is written to its *slot*
//! (`block · block_size + offset`) of the layer's cache; then each sequence attends from its
//! new rows over its whole context, gathered from the cache by slot.

use candle_core::{D, DType, Device, Module, Result, Tensor};

use super::ModelError;
use super::checkpoint::Weights;
use super::config::ModelConfig;
use super::family::QkNorm;
use super::layers::{Linear, RmsNorm, Rotary};
use super::simd::attend::Cached;

/// One layer's keys and values, `[slots, kv_heads, head_dim]` each, written in place.
#[derive(Debug)]
pub struct PagedKv {
    /// Per layer: `(keys, values)`.
    layers: Vec<(Tensor, Tensor)>,
}

impl PagedKv {
    /// Zeroed storage for `slots` token positions in every layer.
    pub fn new(cfg: &ModelConfig, slots: usize, dtype: DType, device: &Device) -> Result<Self> {
        let ((kh, kd), (vh, vd)) = Self::row_shapes(cfg);
        let layers = (0..cfg.num_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros((slots, kh, kd), dtype, device)?,
                    Tensor::zeros((slots, vh, vd), dtype, device)?,
                ))
            })
            .collect::<Result<Vec<(Tensor, Tensor)>>>()?;
        // Decode reads every cached row of a sequence per step: 2 MB pages as they fill.
        for t in layers.iter().flat_map(|(k, v)| [k, v]) {
            super::pages::advise_tensor(t);
        }
        Ok(Self { layers })
    }

    /// What one token position stores per layer, as `(heads, width)` of the two tensors:
    /// keys and values per KV head, or for MLA the compressed latent and the shared rotary
    /// key (`kv_lora_rank + qk_rope_head_dim` values, whatever the head count).
    pub fn row_shapes(cfg: &ModelConfig) -> ((usize, usize), (usize, usize)) {
        match &cfg.mla {
            Some(mla) => ((1, mla.kv_lora_rank), (1, mla.qk_rope_head_dim)),
            None => (
                (cfg.num_kv_heads, cfg.head_dim),
                (cfg.num_kv_heads, cfg.head_dim),
            ),
        }
    }

    /// Layer `l`'s two tensors.
    pub fn layer(&self, l: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[l];
        (k, v)
    }

    /// Bytes one token position costs across all layers.
    pub fn bytes_per_slot(cfg: &ModelConfig, dtype: DType) -> usize {
        let ((kh, kd), (vh, vd)) = Self::row_shapes(cfg);
        cfg.num_layers * (kh * kd + vh * vd) * dtype.size_in_bytes()
    }
}

/// One sequence's part of a [`ForwardBatch`].
#[derive(Debug, Clone)]
pub struct SeqSlice {
    /// First row of this sequence in the flat batch.
    pub start: usize,
    /// New tokens of this sequence in this step.
    pub len: usize,
    /// Context after this step (cached tokens + new ones).
    pub context_len: usize,
    /// Slots of positions `0..context_len` (`u32 [context_len]`), `None` when the step is the
    /// whole context (a first prefill), which attends over the fresh rows directly.
    pub context_slots: Option<Tensor>,
    /// Additive causal mask `[len, context_len]` when `len > 1`.
    pub mask: Option<Tensor>,
    /// Slots of positions `0..context_len`, on the host (the CPU decode kernel reads them).
    pub slots: Vec<u32>,
}

/// The input of one model step.
#[derive(Debug, Clone)]
pub struct ForwardBatch {
    /// `u32 [n]` token ids.
    pub tokens: Tensor,
    /// `u32 [n]` absolute positions.
    pub positions: Tensor,
    /// Runs of consecutive slots: `(first row, first slot, length)`.
    pub writes: Vec<(usize, usize, usize)>,
    /// The sequences, in row order.
    pub seqs: Vec<SeqSlice>,
    /// `u32 [m]` rows whose logits are wanted.
    pub logit_rows: Tensor,
    /// Number of new tokens.
    pub num_tokens: usize,
}

/// What the engine knows about one sequence in a step.
#[derive(Debug, Clone, Copy)]
pub struct SeqStep<'a> {
    /// The tokens to run now.
    pub tokens: &'a [u32],
    /// Tokens of this sequence already in the cache.
    pub cached: usize,
    /// The sequence's blocks, in order.
    pub blocks: &'a [u32],
    /// Which of the new tokens' logits are wanted.
    pub logits: LogitRows,
}

/// Which rows of a sequence's step produce logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// None: a prefill chunk that does not reach the end of the prompt.
    None,
    /// The last new token's (the next token is sampled from it).
    Last,
    /// Every new token's (reference tests).
    All,
}

impl ForwardBatch {
    /// Lays out `steps` for a cache of `block_size`-token blocks.
    pub fn new(steps: &[SeqStep<'_>], block_size: usize, device: &Device) -> Result<Self> {
        let slot_of = |blocks: &[u32], pos: usize| -> Result<usize> {
            blocks
                .get(pos / block_size)
                .map(|b| *b as usize * block_size + pos % block_size)
                .ok_or_else(|| candle_core::Error::Msg(format!("no KV block for position {pos}")))
        };
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut writes: Vec<(usize, usize, usize)> = Vec::new();
        let mut seqs = Vec::with_capacity(steps.len());
        let mut logit_rows = Vec::new();
        for step in steps {
            let start = tokens.len();
            let len = step.tokens.len();
            let context_len = step.cached + len;
            for (i, &t) in step.tokens.iter().enumerate() {
                let pos = step.cached + i;
                let slot = slot_of(step.blocks, pos)?;
                let row = start + i;
                match writes.last_mut() {
                    Some((r0, s0, n)) if *r0 + *n == row && *s0 + *n == slot => *n += 1,
                    _ => writes.push((row, slot, 1)),
                }
                tokens.push(t);
                positions.push(pos as u32);
            }
            match step.logits {
                LogitRows::All => logit_rows.extend((start..start + len).map(|r| r as u32)),
                LogitRows::Last if len > 0 => logit_rows.push((start + len - 1) as u32),
                LogitRows::Last | LogitRows::None => {}
            }
            let slots = (0..context_len)
                .map(|p| slot_of(step.blocks, p).map(|s| s as u32))
                .collect::<Result<Vec<_>>>()?;
            let context_slots = if step.cached == 0 {
                None
            } else {
                Some(Tensor::new(slots.as_slice(), device)?)
            };
            let mask = if len > 1 {
                let mut m = vec![0f32; len * context_len];
                for i in 0..len {
                    for j in (step.cached + i + 1)..context_len {
                        m[i * context_len + j] = f32::NEG_INFINITY;
                    }
                }
                Some(Tensor::from_vec(m, (len, context_len), device)?)
            } else {
                None
            };
            seqs.push(SeqSlice {
                start,
                len,
                context_len,
                context_slots,
                mask,
                slots,
            });
        }
        Ok(Self {
            num_tokens: tokens.len(),
            tokens: Tensor::new(tokens.as_slice(), device)?,
            positions: Tensor::new(positions.as_slice(), device)?,
            writes,
            seqs,
            logit_rows: Tensor::new(logit_rows.as_slice(), device)?,
        })
    }
}

/// The q/k RMSNorms, where the family declares them ([`QkNorm`]).
#[derive(Debug, Clone)]
enum QkNorms {
    None,
    /// Qwen3: each head normalised over `head_dim`.
    PerHead(RmsNorm, RmsNorm),
    /// OLMoE: the whole projection normalised over `heads · head_dim`.
    Full(RmsNorm, RmsNorm),
}

/// The q, k and v projections: one product for all three when they are stored alike.
#[derive(Debug, Clone)]
enum Qkv {
    /// `[q; k; v]` rows, and the widths of q and of k (= v).
    Fused(Linear, usize, usize),
    Split(Linear, Linear, Linear),
}

impl Qkv {
    fn new(q: Linear, k: Linear, v: Linear, qw: usize, kvw: usize) -> Result<Self> {
        Ok(match Linear::cat_rows(&[&q, &k, &v])? {
            Some(fused) => Self::Fused(fused, qw, kvw),
            None => Self::Split(q, k, v),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        match self {
            Self::Fused(l, qw, kvw) => {
                let h = l.forward(xs)?;
                Ok((
                    h.narrow(D::Minus1, 0, *qw)?,
                    h.narrow(D::Minus1, *qw, *kvw)?,
                    h.narrow(D::Minus1, qw + kvw, *kvw)?,
                ))
            }
            Self::Split(q, k, v) => Ok((q.forward(xs)?, k.forward(xs)?, v.forward(xs)?)),
        }
    }

    /// (storage type, how many of the three projections hold it).
    fn types(&self) -> Vec<(String, usize)> {
        match self {
            Self::Fused(l, ..) => vec![(l.weight().type_name(), 3)],
            Self::Split(q, k, v) => [q, k, v]
                .iter()
                .map(|l| (l.weight().type_name(), 1))
                .collect(),
        }
    }

    fn weight_bytes(&self) -> usize {
        match self {
            Self::Fused(l, ..) => l.weight_bytes(),
            Self::Split(q, k, v) => q.weight_bytes() + k.weight_bytes() + v.weight_bytes(),
        }
    }
}

/// Self-attention of one decoder layer.
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Qkv,
    o: Linear,
    qk_norm: QkNorms,
    clip_qkv: Option<f64>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    layer: usize,
}

impl Attention {
    /// Loads layer `layer`'s attention from `w` (at `model.layers.<layer>.self_attn`): the
    /// biases, and the q/k norms of the kind, the family declares.
    pub fn load(
        cfg: &ModelConfig,
        w: &Weights<'_>,
        layer: usize,
    ) -> std::result::Result<Self, ModelError> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let (qw, kvw) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let q = Linear::load(&w.pp("q_proj"), (qw, d), cfg.qkv_bias)?;
        let k = Linear::load(&w.pp("k_proj"), (kvw, d), cfg.qkv_bias)?;
        let v = Linear::load(&w.pp("v_proj"), (kvw, d), cfg.qkv_bias)?;
        let o = Linear::load(&w.pp("o_proj"), (d, qw), cfg.o_bias)?;
        let eps = cfg.rms_norm_eps;
        let (qn, kn) = (w.pp("q_norm"), w.pp("k_norm"));
        let qk_norm = match cfg.family.spec().attention.qk_norm {
            QkNorm::None => QkNorms::None,
            QkNorm::PerHead => {
                QkNorms::PerHead(RmsNorm::load(&qn, hd, eps)?, RmsNorm::load(&kn, hd, eps)?)
            }
            QkNorm::Full => {
                QkNorms::Full(RmsNorm::load(&qn, qw, eps)?, RmsNorm::load(&kn, kvw, eps)?)
            }
        };
        Ok(Self {
            qkv: Qkv::new(q, k, v, qw, kvw).map_err(|e| w.pp("q_proj").error("weight", e))?,
            o,
            qk_norm,
            clip_qkv: cfg.clip_qkv,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: hd,
            scale: 1.0 / (hd as f64).sqrt(),
            layer,
        })
    }

    /// Counts its projections' storage types.
    pub fn tally(&self, t: &mut super::quant::Tally) {
        for (name, count) in self.qkv.types() {
            for _ in 0..count {
                t.add("attention", name.clone());
            }
        }
        t.add("attention", self.o.weight().type_name());
    }

    /// Bytes of weights one token reads.
    pub fn weight_bytes(&self) -> usize {
        self.qkv.weight_bytes() + self.o.weight_bytes()
    }

    /// `xs` is `[n, hidden]` (normed); writes this step's keys/values into `kv` and returns
    /// `[n, hidden]`.
    pub fn forward(
        &self,
        xs: &Tensor,
        batch: &ForwardBatch,
        cos_sin: &(Tensor, Tensor),
        kv: &PagedKv,
    ) -> Result<Tensor> {
        let n = batch.num_tokens;
        let (hd, h, kvh) = (self.head_dim, self.heads, self.kv_heads);
        let (mut q, mut k, mut v) = self.qkv.forward(xs)?;
        if let Some(c) = self.clip_qkv {
            q = q.clamp(-c, c)?;
            k = k.clamp(-c, c)?;
            v = v.clamp(-c, c)?;
        }
        if let QkNorms::Full(qn, kn) = &self.qk_norm {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let mut q = q.reshape((n, h, hd))?;
        let mut k = k.reshape((n, kvh, hd))?;
        let v = v.reshape((n, kvh, hd))?.contiguous()?;
        if let QkNorms::PerHead(qn, kn) = &self.qk_norm {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let (cos, sin) = cos_sin;
        let q = Rotary::apply(&q, cos, sin)?;
        let k = Rotary::apply(&k, cos, sin)?.contiguous()?;

        let (k_cache, v_cache) = &kv.layers[self.layer];
        for &(row, slot, len) in &batch.writes {
            k_cache.slice_set(&k.narrow(0, row, len)?, 0, slot)?;
            v_cache.slice_set(&v.narrow(0, row, len)?, 0, slot)?;
        }

        if let Some(attn) = decode_attention_cpu(&q, batch, k_cache, v_cache, self.scale as f32)? {
            return self.o.forward(&attn);
        }
        let group = h / kvh;
        let mut outs = Vec::with_capacity(batch.seqs.len());
        for seq in &batch.seqs {
            let (len, ctx) = (seq.len, seq.context_len);
            let (ks, vs) = match &seq.context_slots {
                Some(slots) => (
                    k_cache.index_select(slots, 0)?,
                    v_cache.index_select(slots, 0)?,
                ),
                None => (k.narrow(0, seq.start, len)?, v.narrow(0, seq.start, len)?),
            };
            // [len, kvh·group, hd] → [kvh, group·len, hd]: query heads of one KV head side by side.
            let qs = q
                .narrow(0, seq.start, len)?
                .reshape((len, kvh, group, hd))?
                .permute((1, 2, 0, 3))?
                .reshape((kvh, group * len, hd))?;
            let ks = ks.transpose(0, 1)?.contiguous()?; // [kvh, ctx, hd]
            let vs = vs.transpose(0, 1)?.contiguous()?;
            let mut scores = (qs.matmul(&ks.t()?)? * self.scale)?.to_dtype(DType::F32)?;
            if let Some(mask) = &seq.mask {
                scores = scores
                    .reshape((kvh, group, len, ctx))?
                    .broadcast_add(mask)?
                    .reshape((kvh, group * len, ctx))?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(vs.dtype())?;
            let out = probs
                .matmul(&vs)? // [kvh, group·len, hd]
                .reshape((kvh, group, len, hd))?
                .permute((2, 0, 1, 3))?
                .reshape((len, h * hd))?;
            outs.push(out);
        }
        let attn = Tensor::cat(&outs, 0)?;
        self.o.forward(&attn)
    }
}

/// Attention for a batch of pure decode steps (one new token per sequence) on the CPU in
/// f32, read straight from the cache's memory: no gather of the context, no per-sequence
/// tensor ops. Per-sequence candle ops cost ~200 µs each at batch 32 (dozens of tiny
/// kernels), which made attention the larger half of a decode step; this loop is a few µs
/// per sequence and head. `None` when the batch or device does not qualify (the generic
/// path then runs).
fn decode_attention_cpu(
    q: &Tensor,
    batch: &ForwardBatch,
    k_cache: &Tensor,
    v_cache: &Tensor,
    scale: f32,
) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    if !cpu_f32_decode(q, batch, k_cache) {
        return Ok(None);
    }
    let (n, h, hd) = q.dims3()?;
    let kvh = k_cache.dim(1)?;
    let group = h / kvh;
    let qv = q.flatten_all()?.to_vec1::<f32>()?;
    let (k_store, k_layout) = k_cache.storage_and_layout();
    let (v_store, v_layout) = v_cache.storage_and_layout();
    let (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) = (&*k_store, &*v_store)
    else {
        return Ok(None);
    };
    let (ko, vo) = (k_layout.start_offset(), v_layout.start_offset());
    let (kd, vd) = (&kc.as_slice::<f32>()?[ko..], &vc.as_slice::<f32>()?[vo..]);
    let mut out = vec![0f32; n * h * hd];
    // One task per sequence and KV head: its query heads (the GQA group) read each cached
    // row once. With fewer such tasks than threads (batch 1 of a model with few KV heads),
    // one task per query head, so that every core has work.
    let per = if n * kvh >= rayon::current_num_threads() {
        group
    } else {
        1
    };
    let simd = super::simd::attend::available(hd);
    let avx2 = super::simd::Isa::detect() >= super::simd::Isa::Avx2;
    out.par_chunks_mut(per * hd)
        .enumerate()
        .for_each_init(Vec::new, |scores, (i, oh)| {
            let (seq, head) = (&batch.seqs[i * per / h], i * per % h);
            let kv = Cached {
                k: kd,
                v: vd,
                slots: &seq.slots,
                stride: kvh * hd,
                offset: (head / group) * hd,
            };
            let q = &qv[(seq.start * h + head) * hd..][..per * hd];
            if simd {
                super::simd::attend::attend(q, hd, kv, scale, scores, oh);
                return;
            }
            for (q, oh) in q.chunks_exact(hd).zip(oh.chunks_exact_mut(hd)) {
                let one = Head { q, kv, scale };
                if avx2 {
                    // SAFETY: the CPU has AVX2 and FMA (`Isa::detect`); the function takes
                    // slices.
                    #[allow(unsafe_code)]
                    unsafe {
                        one.attend_avx2(oh)
                    }
                } else {
                    one.attend(oh)
                }
            }
        });
    Ok(Some(Tensor::from_vec(out, (n, h * hd), q.device())?))
}

/// One query head against its KV head's cached rows: the loop for CPUs without AVX-512
/// and head widths [`super::simd::attend`] does not take.
struct Head<'a> {
    q: &'a [f32],
    kv: Cached<'a>,
    scale: f32,
}

impl Head<'_> {
    /// `out ← softmax(q·Kᵀ · scale) · V`.
    #[inline(always)]
    fn attend(&self, out: &mut [f32]) {
        let (hd, kv) = (self.q.len(), &self.kv);
        let mut scores: Vec<f32> = (0..kv.slots.len())
            .map(|t| dot(self.q, kv.rows(t, hd).0) * self.scale)
            .collect();
        softmax_in_place(&mut scores);
        for (t, &p) in scores.iter().enumerate() {
            axpy(out, p, kv.rows(t, hd).1);
        }
    }

    /// [`Self::attend`] compiled for AVX2+FMA, so its dot products and axpys vectorise
    /// 8 wide.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn attend_avx2(&self, out: &mut [f32]) {
        self.attend(out)
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn attend_avx2(&self, out: &mut [f32]) {
        self.attend(out)
    }
}

/// Whether the CPU decode kernels apply: every sequence decodes one token, and the
/// queries and the cache are f32 on the CPU.
pub(super) fn cpu_f32_decode(q: &Tensor, batch: &ForwardBatch, cache: &Tensor) -> bool {
    q.device().is_cpu()
        && q.dtype() == DType::F32
        && cache.dtype() == DType::F32
        && batch.seqs.iter().all(|s| s.len == 1)
}

/// `scores ← softmax(scores)`.
pub(super) fn softmax_in_place(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    for s in scores.iter_mut() {
        *s *= inv;
    }
}

/// `acc ← acc + w · x`.
#[inline(always)]
pub(super) fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
    for (a, x) in acc.iter_mut().zip(x) {
        *a += w * x;
    }
}

/// Dot product with independent accumulators, so the compiler vectorises it.
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_layout_merges_consecutive_slots_and_masks_causally() -> Result<()> {
        let dev = Device::Cpu;
        // Sequence A: 3 cached tokens, 2 new, blocks [5, 2] of size 4 → positions 3, 4 are
        // slots 23 and 8. Sequence B: first prefill of 3 tokens in block 7 → 28, 29, 30.
        let steps = [
            SeqStep {
                tokens: &[10, 11],
                cached: 3,
                blocks: &[5, 2],
                logits: LogitRows::Last,
            },
            SeqStep {
                tokens: &[1, 2, 3],
                cached: 0,
                blocks: &[7],
                logits: LogitRows::All,
            },
        ];
        let b = ForwardBatch::new(&steps, 4, &dev)?;
        assert_eq!(b.writes, vec![(0, 23, 1), (1, 8, 1), (2, 28, 3)]);
        assert_eq!(b.positions.to_vec1::<u32>()?, vec![3, 4, 0, 1, 2]);
        assert_eq!(b.logit_rows.to_vec1::<u32>()?, vec![1, 2, 3, 4]);
        let a = &b.seqs[0];
        assert_eq!(
            a.context_slots
                .as_ref()
                .map(|t| t.to_vec1::<u32>())
                .transpose()?,
            Some(vec![20, 21, 22, 23, 8])
        );
        let mask = a
            .mask
            .as_ref()
            .map(|m| m.to_vec2::<f32>())
            .transpose()?
            .unwrap_or_default();
        assert_eq!(mask[0][3], 0.0);
        assert_eq!(mask[0][4], f32::NEG_INFINITY);
        assert!(b.seqs[1].context_slots.is_none());
        Ok(())
    }

    #[test]
    fn missing_block_is_an_error() {
        let steps = [SeqStep {
            tokens: &[1, 2],
            cached: 3,
            blocks: &[0],
            logits: LogitRows::Last,
        }];
        assert!(ForwardBatch::new(&steps, 4, &Device::Cpu).is_err());
    }
}
