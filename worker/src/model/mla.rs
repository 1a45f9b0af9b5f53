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

use candle_core::{DType, Device, Module, Result, Tensor};

use super::ModelError;
use super::attention::{ForwardBatch, PagedKv};
use super::checkpoint::Checkpoint;
use super::config::{MlaConfig, ModelConfig};
use super::layers::{Linear, Precision, RmsNorm, Rotary};

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
}

impl Mla {
    /// Loads `model.layers.<layer>.self_attn.*`.
    pub fn load(
        cfg: &ModelConfig,
        dims: MlaConfig,
        interleaved: bool,
        ckpt: &Checkpoint,
        layer: usize,
        dtype: Precision,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        let p = format!("model.layers.{layer}.self_attn");
        let (d, h) = (cfg.hidden_size, cfg.num_heads);
        let qk = dims.qk_nope_head_dim + dims.qk_rope_head_dim;
        let q = match dims.q_lora_rank {
            None => QueryProj::Direct(Linear::load(
                ckpt,
                &format!("{p}.q_proj"),
                (h * qk, d),
                dtype,
                device,
            )?),
            Some(r) => QueryProj::LowRank {
                a: Linear::load(ckpt, &format!("{p}.q_a_proj"), (r, d), dtype, device)?,
                norm: RmsNorm::load(
                    ckpt,
                    &format!("{p}.q_a_layernorm.weight"),
                    r,
                    LORA_NORM_EPS,
                    dtype,
                    device,
                )?,
                b: Linear::load(ckpt, &format!("{p}.q_b_proj"), (h * qk, r), dtype, device)?,
            },
        };
        let (r, rope) = (dims.kv_lora_rank, dims.qk_rope_head_dim);
        let kv_a = Linear::load(
            ckpt,
            &format!("{p}.kv_a_proj_with_mqa"),
            (r + rope, d),
            dtype,
            device,
        )?;
        let kv_norm = RmsNorm::load(
            ckpt,
            &format!("{p}.kv_a_layernorm.weight"),
            r,
            LORA_NORM_EPS,
            dtype,
            device,
        )?;
        let (nope, v) = (dims.qk_nope_head_dim, dims.v_head_dim);
        let kv_b_name = format!("{p}.kv_b_proj.weight");
        let kv_b = ckpt.tensor(&kv_b_name, &[h * (nope + v), r], dtype.acts, device)?;
        let split = || -> Result<(Tensor, Tensor)> {
            let per_head = kv_b.reshape((h, nope + v, r))?;
            Ok((
                per_head.narrow(1, 0, nope)?.contiguous()?,
                per_head.narrow(1, nope, v)?.transpose(1, 2)?.contiguous()?,
            ))
        };
        let (w_uk, w_uv_t) = split().map_err(|e| ModelError::Tensor {
            file: ckpt.dir().to_path_buf(),
            name: kv_b_name,
            message: e.to_string(),
        })?;
        let o = Linear::load(ckpt, &format!("{p}.o_proj"), (d, h * v), dtype, device)?;
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
            interleaved,
            layer,
        })
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
            let ql = q_lat.narrow(1, seq.start, len)?;
            let qr = q_rope.narrow(1, seq.start, len)?;
            let scores =
                (ql.broadcast_matmul(&c_ctx.t()?)? + qr.broadcast_matmul(&rope_ctx.t()?)?)?;
            let mut scores = (scores * self.scale)?.to_dtype(DType::F32)?;
            if let Some(mask) = &seq.mask {
                scores = scores.broadcast_add(mask)?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(c_ctx.dtype())?;
            let out = probs
                .broadcast_matmul(&c_ctx.contiguous()?)? // [h, len, r]
                .matmul(&self.w_uv_t)? // [h, len, v]
                .transpose(0, 1)?
                .reshape((len, h * d.v_head_dim))?;
            outs.push(out);
        }
        self.o.forward(&Tensor::cat(&outs, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::DType;

    use crate::model::attention::PagedKv;
    use crate::model::config::{RawConfig, resolve};

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
