//! Multi-head latent attention (DeepSeek-V2/V3), attending over a cache of compressed
//! latents.
//!
//! ```text
//!  x ─ q_proj, or q_b(norm(q_a(x))) ──> q = [q_nope | q_rope] per head
//!  x ─ kv_a_proj_with_mqa ──> [c_kv (kv_lora_rank) | k_rope (shared by all heads)]
//!                              c_kv = kv_a_layernorm(c_kv)
//!  cache per token: c_kv and rotated k_rope — kv_lora_rank + qk_rope_head_dim values,
//!  not 2 · heads · head_dim
//! ```
//!
//! Keys and values are never expanded for the context. `kv_b_proj` splits per head into
//! `W_UK` (`qk_nope × kv_lora`) and `W_UV` (`v × kv_lora`); then, per head,
//! `q_nope · k_nope = (q_nope · W_UK) · c_kv` and `Σ p · v = W_UV · (Σ p · c_kv)`, so
//! attention runs in the latent space ("weight absorption"), as DeepSeek's inference does.

use candle_core::{DType, Module, Result, Tensor};

use super::ModelError;
use super::attention::{ForwardBatch, PagedKv, axpy, cpu_f32_decode, dot, softmax_in_place};
use super::checkpoint::Weights;
use super::config::{MlaConfig, ModelConfig};
use super::layers::{Linear, RmsNorm, Rotary};

/// The epsilon of `q_a_layernorm` and `kv_a_layernorm`: transformers builds them without
/// one, so they use its default whatever `rms_norm_eps` says.
const LORA_NORM_EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
enum QueryProj {
    Direct(Linear),
    LowRank { a: Linear, norm: RmsNorm, b: Linear },
}

/// MLA of one decoder layer.
#[derive(Debug, Clone)]
pub struct Mla {
    q: QueryProj,
    kv_a: Linear,
    kv_norm: RmsNorm,
    /// `[heads, qk_nope, kv_lora]`.
    w_uk: Tensor,
    /// `[heads, kv_lora, v]` (transposed for the final product).
    w_uv_t: Tensor,
    o: Linear,
    dims: MlaConfig,
    heads: usize,
    scale: f64,
    /// The rotary part is stored as interleaved pairs (DeepSeek's layout).
    interleaved: bool,
    layer: usize,
    /// Largest score matrix (elements) the prefill path builds at once.
    score_elements: usize,
}

impl Mla {
    /// Loads layer `layer`'s latent attention from `w` (at `model.layers.<layer>.self_attn`),
    /// with the biases the family declares on `q_a_proj`, `kv_a_proj_with_mqa` and `o_proj`.
    pub fn load(
        cfg: &ModelConfig,
        dims: MlaConfig,
        w: &Weights<'_>,
        layer: usize,
    ) -> std::result::Result<Self, ModelError> {
        let (d, h) = (cfg.hidden_size, cfg.num_heads);
        let qk = dims.qk_nope_head_dim + dims.qk_rope_head_dim;
        let q = match dims.q_lora_rank {
            None => QueryProj::Direct(Linear::load(&w.pp("q_proj"), (h * qk, d), false)?),
            Some(r) => QueryProj::LowRank {
                a: Linear::load(&w.pp("q_a_proj"), (r, d), cfg.qkv_bias)?,
                norm: RmsNorm::load(&w.pp("q_a_layernorm"), r, LORA_NORM_EPS)?,
                b: Linear::load(&w.pp("q_b_proj"), (h * qk, r), false)?,
            },
        };
        let (r, rope) = (dims.kv_lora_rank, dims.qk_rope_head_dim);
        let kv_a = Linear::load(&w.pp("kv_a_proj_with_mqa"), (r + rope, d), cfg.qkv_bias)?;
        let kv_norm = RmsNorm::load(&w.pp("kv_a_layernorm"), r, LORA_NORM_EPS)?;
        let (nope, v) = (dims.qk_nope_head_dim, dims.v_head_dim);
        let kv_b_proj = w.pp("kv_b_proj");
        let kv_b = kv_b_proj.vector("weight", &[h * (nope + v), r])?;
        let split = || -> Result<(Tensor, Tensor)> {
            let per_head = kv_b.reshape((h, nope + v, r))?;
            Ok((
                per_head.narrow(1, 0, nope)?.contiguous()?,
                per_head.narrow(1, nope, v)?.transpose(1, 2)?.contiguous()?,
            ))
        };
        let (w_uk, w_uv_t) = split().map_err(|e| kv_b_proj.error("weight", e))?;
        let o = Linear::load(&w.pp("o_proj"), (d, h * v), cfg.o_bias)?;
        Ok(Self {
            q,
            kv_a,
            kv_norm,
            w_uk,
            w_uv_t,
            o,
            dims,
            heads: h,
            scale: dims.softmax_mscale / (qk as f64).sqrt(),
            interleaved: dims.rope_interleave,
            layer,
            score_elements: SCORE_ELEMENTS,
        })
    }

    /// Counts its projections' storage types (the absorbed `kv_b_proj` is always dense).
    pub fn tally(&self, t: &mut super::quant::Tally) {
        let mut add = |l: &Linear| t.add("attention", l.weight().type_name());
        match &self.q {
            QueryProj::Direct(q) => add(q),
            QueryProj::LowRank { a, b, .. } => {
                add(a);
                add(b);
            }
        }
        add(&self.kv_a);
        add(&self.o);
        t.add(
            "attention (kv_b, absorbed)",
            format!("{:?}", self.w_uk.dtype()).to_lowercase(),
        );
    }

    /// Bytes of weights one token reads.
    pub fn weight_bytes(&self) -> usize {
        let q = match &self.q {
            QueryProj::Direct(q) => q.weight_bytes(),
            QueryProj::LowRank { a, b, .. } => a.weight_bytes() + b.weight_bytes(),
        };
        let absorbed =
            (self.w_uk.elem_count() + self.w_uv_t.elem_count()) * self.w_uk.dtype().size_in_bytes();
        q + self.kv_a.weight_bytes() + absorbed + self.o.weight_bytes()
    }

    /// Interleaved pairs `(x0, x1), (x2, x3)…` → `[x0, x2, … | x1, x3, …]`, the layout the
    /// rotate-half kernel expects. The same permutation of q and k leaves their dot
    /// products unchanged.
    fn deinterleave(&self, x: &Tensor) -> Result<Tensor> {
        if !self.interleaved {
            return x.contiguous();
        }
        let dims = x.dims().to_vec();
        let last = dims[dims.len() - 1];
        let mut pairs = dims.clone();
        pairs.pop();
        pairs.extend([last / 2, 2]);
        let rank = pairs.len();
        x.reshape(pairs)?
            .transpose(rank - 2, rank - 1)?
            .contiguous()?
            .reshape(dims)
    }

    /// `xs` is `[n, hidden]` (normed); writes this step's latents into `kv` and returns
    /// `[n, hidden]`.
    pub fn forward(
        &self,
        xs: &Tensor,
        batch: &ForwardBatch,
        cos_sin: &(Tensor, Tensor),
        kv: &PagedKv,
    ) -> Result<Tensor> {
        let n = batch.num_tokens;
        let d = &self.dims;
        let (h, nope, rope, r) = (
            self.heads,
            d.qk_nope_head_dim,
            d.qk_rope_head_dim,
            d.kv_lora_rank,
        );
        let q = match &self.q {
            QueryProj::Direct(q) => q.forward(xs)?,
            QueryProj::LowRank { a, norm, b } => b.forward(&norm.forward(&a.forward(xs)?)?)?,
        }
        .reshape((n, h, nope + rope))?;
        let q_nope = q.narrow(2, 0, nope)?;
        let (cos, sin) = cos_sin;
        let q_rope = Rotary::apply(&self.deinterleave(&q.narrow(2, nope, rope)?)?, cos, sin)?;
        let ckv = self.kv_a.forward(xs)?;
        let c = self
            .kv_norm
            .forward(&ckv.narrow(1, 0, r)?)?
            .reshape((n, 1, r))?;
        let k_rope = Rotary::apply(
            &self.deinterleave(&ckv.narrow(1, r, rope)?.reshape((n, 1, rope))?)?,
            cos,
            sin,
        )?
        .contiguous()?;

        let (c_cache, rope_cache) = kv.layer(self.layer);
        for &(row, slot, len) in &batch.writes {
            c_cache.slice_set(&c.narrow(0, row, len)?.contiguous()?, 0, slot)?;
            rope_cache.slice_set(&k_rope.narrow(0, row, len)?, 0, slot)?;
        }

        // Queries in the latent space: [h, n, r].
        let q_lat = q_nope.transpose(0, 1)?.contiguous()?.matmul(&self.w_uk)?;
        let q_rope = q_rope.transpose(0, 1)?.contiguous()?; // [h, n, rope]
        let scale = self.scale;
        let latent = match decode_latent_cpu(&q_lat, &q_rope, batch, c_cache, rope_cache, scale)? {
            Some(lat) => lat.transpose(0, 1)?.contiguous()?,
            None => {
                let mut outs = Vec::with_capacity(batch.seqs.len());
                for seq in &batch.seqs {
                    let (len, ctx) = (seq.len, seq.context_len);
                    let (c_ctx, rope_ctx) = match &seq.context_slots {
                        Some(slots) => (
                            c_cache.index_select(slots, 0)?.reshape((ctx, r))?,
                            rope_cache.index_select(slots, 0)?.reshape((ctx, rope))?,
                        ),
                        None => (
                            c.narrow(0, seq.start, len)?.reshape((ctx, r))?,
                            k_rope.narrow(0, seq.start, len)?.reshape((ctx, rope))?,
                        ),
                    };
                    let (c_t, rope_t) = (c_ctx.t()?, rope_ctx.t()?);
                    // Query rows in chunks, so one chunk's scores ([h, rows, ctx]) stay
                    // bounded however long the prompt and however many heads.
                    let rows = (self.score_elements / (h * ctx).max(1)).clamp(1, len);
                    for r0 in (0..len).step_by(rows) {
                        let m = rows.min(len - r0);
                        // [h, m, ·] → [h·m, ·]: one 2-D product per chunk for all heads,
                        // since every head attends over the same latent rows.
                        let ql = q_lat.narrow(1, seq.start + r0, m)?.contiguous()?;
                        let qr = q_rope.narrow(1, seq.start + r0, m)?.contiguous()?;
                        let scores = (ql.reshape((h * m, r))?.matmul(&c_t)?
                            + qr.reshape((h * m, rope))?.matmul(&rope_t)?)?;
                        let mut scores = (scores * scale)?
                            .to_dtype(DType::F32)?
                            .reshape((h, m, ctx))?;
                        if let Some(mask) = &seq.mask {
                            scores = scores.broadcast_add(&mask.narrow(0, r0, m)?)?;
                        }
                        let probs = candle_nn::ops::softmax_last_dim(&scores)?
                            .to_dtype(c_ctx.dtype())?
                            .reshape((h * m, ctx))?;
                        outs.push(probs.matmul(&c_ctx)?.reshape((h, m, r))?);
                    }
                }
                Tensor::cat(&outs, 1)?
            }
        };
        // Back out of the latent space per head: [h, n, r] · [h, r, v] → [n, h·v].
        let out = latent
            .matmul(&self.w_uv_t)?
            .transpose(0, 1)?
            .reshape((n, h * d.v_head_dim))?;
        self.o.forward(&out)
    }
}

/// Largest score matrix (elements) the prefill path builds at once: 64 MiB in f32.
const SCORE_ELEMENTS: usize = 1 << 24;

/// Latent attention for a batch of pure decode steps on the CPU in f32, read straight from
/// the cache: each context row (`c_kv`, `k_rope`) is loaded once for all heads of a work
/// item, no context is gathered and no per-head copy is made. Returns the latent output
/// `[n, h, r]`, or `None` when the batch or device does not qualify (the generic path then
/// runs).
///
/// Work is split by sequence and, when there are fewer sequences than threads, by runs of
/// heads, so batch 1 uses every core.
fn decode_latent_cpu(
    q_lat: &Tensor,
    q_rope: &Tensor,
    batch: &ForwardBatch,
    c_cache: &Tensor,
    rope_cache: &Tensor,
    scale: f64,
) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    if !cpu_f32_decode(q_lat, batch, c_cache) {
        return Ok(None);
    }
    let (h, n, r) = q_lat.dims3()?;
    let rope = q_rope.dim(2)?;
    let (ql, qr) = (
        q_lat.flatten_all()?.to_vec1::<f32>()?,
        q_rope.flatten_all()?.to_vec1::<f32>()?,
    );
    let (c_store, c_layout) = c_cache.storage_and_layout();
    let (r_store, r_layout) = rope_cache.storage_and_layout();
    let (candle_core::Storage::Cpu(cs), candle_core::Storage::Cpu(rs)) = (&*c_store, &*r_store)
    else {
        return Ok(None);
    };
    let cd = &cs.as_slice::<f32>()?[c_layout.start_offset()..];
    let rd = &rs.as_slice::<f32>()?[r_layout.start_offset()..];
    let scale = scale as f32;
    let splits = (2 * rayon::current_num_threads())
        .div_ceil(n.max(1))
        .clamp(1, h);
    let heads_per_item = h.div_ceil(splits);
    let mut out = vec![0f32; n * h * r];
    out.par_chunks_mut(h * r)
        .zip(batch.seqs.par_iter())
        .for_each(|(o, seq)| {
            o.par_chunks_mut(heads_per_item * r)
                .enumerate()
                .for_each(|(item, o)| {
                    let h0 = item * heads_per_item;
                    let k = o.len() / r;
                    let ctx = seq.slots.len();
                    // scores[j · ctx + t]: head h0 + j at context position t.
                    let mut scores = vec![0f32; k * ctx];
                    for (t, &slot) in seq.slots.iter().enumerate() {
                        let c = &cd[slot as usize * r..][..r];
                        let kr = &rd[slot as usize * rope..][..rope];
                        for j in 0..k {
                            let qi = (h0 + j) * n + seq.start;
                            scores[j * ctx + t] = (dot(&ql[qi * r..][..r], c)
                                + dot(&qr[qi * rope..][..rope], kr))
                                * scale;
                        }
                    }
                    for row in scores.chunks_mut(ctx) {
                        softmax_in_place(row);
                    }
                    for (t, &slot) in seq.slots.iter().enumerate() {
                        let c = &cd[slot as usize * r..][..r];
                        for (j, oh) in o.chunks_mut(r).enumerate() {
                            axpy(oh, scores[j * ctx + t], c);
                        }
                    }
                });
        });
    Ok(Some(Tensor::from_vec(out, (n, h, r), q_lat.device())?))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::DType;

    use candle_core::{Device, Tensor};

    use super::Mla;
    use crate::model::attention::{ForwardBatch, LogitRows, PagedKv, SeqStep};
    use crate::model::checkpoint::{Checkpoint, Weights};
    use crate::model::config::{self, RawConfig, resolve};
    use crate::model::layers::{Precision, Rotary};

    /// A long prompt's scores are built a few query rows at a time; the result must not
    /// depend on where the chunks fall (including a short last chunk).
    #[test]
    fn prefill_in_row_chunks_matches_one_pass() -> candle_core::Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/deepseek_v3");
        let cfg = config::load(&dir).expect("config");
        let ckpt = Checkpoint::open(&dir).expect("checkpoint");
        let dims = cfg.mla.expect("an MLA fixture");
        let dev = Device::Cpu;
        let prec = Precision::uniform(DType::F32);
        let layer = Weights::new(&ckpt, prec, &dev).pp("model.layers.0.self_attn");
        let mut mla = Mla::load(&cfg, dims, &layer, 0).expect("layer 0");
        let rotary = Rotary::new(
            cfg.head_dim,
            64,
            cfg.rope_theta,
            &cfg.rope_scaling,
            DType::F32,
            &dev,
        )?;
        let n = 11;
        let tokens: Vec<u32> = (0..n as u32).collect();
        let batch = ForwardBatch::new(
            &[SeqStep {
                tokens: &tokens,
                cached: 0,
                blocks: &[0, 1, 2],
                logits: LogitRows::All,
            }],
            4,
            &dev,
        )?;
        let xs = Tensor::randn(0f32, 1.0, (n, cfg.hidden_size), &dev)?;
        let cos_sin = rotary.at(&batch.positions)?;
        let kv = PagedKv::new(&cfg, 12, DType::F32, &dev)?;
        let whole = mla.forward(&xs, &batch, &cos_sin, &kv)?;
        // Three query rows per chunk: 3 + 3 + 3 + 2.
        mla.score_elements = cfg.num_heads * n * 3;
        let chunked = mla.forward(&xs, &batch, &cos_sin, &kv)?;
        let diff = (whole - chunked)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "chunked prefill differs by {diff}");
        Ok(())
    }

    /// The cache rows of the published shapes: DeepSeek-V2-Lite (27 layers, 16 heads) and
    /// V3 (61 layers, 128 heads), both kv_lora_rank 512, qk_rope 64, qk_nope 128, v 128.
    fn shape(layers: usize, heads: usize) -> crate::model::ModelConfig {
        let raw: RawConfig = serde_json::from_value(serde_json::json!({
            "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
            "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "n_routed_experts": 256, "n_shared_experts": 1,
            "num_experts_per_tok": 8, "first_k_dense_replace": 3, "kv_lora_rank": 512,
            "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "v_head_dim": 128, "n_group": 8, "topk_group": 4
        }))
        .expect("raw");
        resolve(Path::new("config.json"), raw).expect("valid")
    }

    #[test]
    fn the_cache_holds_the_latent_not_per_head_keys_and_values() {
        for (layers, heads) in [(27, 16), (61, 128)] {
            let cfg = shape(layers, heads);
            let ((kh, kd), (vh, vd)) = PagedKv::row_shapes(&cfg);
            assert_eq!(
                kh * kd + vh * vd,
                576,
                "kv_lora_rank + qk_rope_head_dim per token and layer"
            );
            let latent = PagedKv::bytes_per_slot(&cfg, DType::BF16);
            assert_eq!(latent, 576 * 2 * layers);
            // Per-head keys (128 + 64) and values (128) for every head, as MHA would cache.
            let per_head = layers * heads * (192 + 128) * 2;
            assert!(per_head / latent >= 8, "{per_head} vs {latent}");
        }
    }
}
