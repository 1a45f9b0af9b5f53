//! The decoder stack every supported family shares: embeddings → N × (RMSNorm → attention,
//! RMSNorm → dense MLP or MoE) → RMSNorm → LM head. Families differ only in what
//! [`ModelConfig`] and their declaration (`model::family`) say, never in code paths chosen
//! by name.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor};

use super::ModelError;
use super::attention::{Attention, ForwardBatch, PagedKv};
use super::checkpoint::{Checkpoint, Weights};
use super::config::ModelConfig;
use super::family::{DENSE_MLP, SWIGLU};
use super::layers::{Linear, Mlp, Precision, RmsNorm, Rotary};
use super::matmul::Weight;
use super::mla::Mla;
use super::moe::{ExpertBackend, ExpertError, MoeBlock, PendingMoe, Routes};
use super::quant::{Role, Tally};

#[derive(Debug, Clone)]
enum FeedForward {
    Dense(Mlp),
    Moe(MoeBlock),
}

#[derive(Debug, Clone)]
enum SelfAttention {
    Mha(Attention),
    Mla(Mla),
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: RmsNorm,
    attention: SelfAttention,
    post_norm: RmsNorm,
    ff: FeedForward,
}

/// The routes one step chose, per MoE layer (for expert-load metrics).
pub type StepRoutes = Vec<(usize, Routes)>;

/// A loaded model, ready to run steps against a [`PagedKv`].
#[derive(Debug)]
pub struct Transformer {
    cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    experts: Arc<dyn ExpertBackend>,
    precision: Precision,
    device: Device,
}

impl Transformer {
    /// Loads everything but the routed experts, which `experts` runs.
    pub fn load(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        experts: Arc<dyn ExpertBackend>,
        dtype: Precision,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let root = Weights::new(ckpt, dtype, device);
        let model = root.pp("model");
        let embed = model.pp("embed_tokens").vector("weight", &[v, d])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        let started = std::time::Instant::now();
        let every = cfg.num_layers.div_ceil(10).max(1);
        let eps = cfg.rms_norm_eps;
        for l in 0..cfg.num_layers {
            // Large checkpoints take minutes: say how far loading has got.
            if l > 0 && l % every == 0 {
                tracing::info!(
                    layer = l,
                    of = cfg.num_layers,
                    secs = started.elapsed().as_secs(),
                    "loading decoder layers"
                );
            }
            let w = model.pp("layers").pp(l);
            let ff = match &cfg.moe {
                Some(moe) if moe.sparse_layers[l] => {
                    FeedForward::Moe(MoeBlock::load(cfg, moe, &w)?)
                }
                _ => FeedForward::Dense(Mlp::load(
                    &w.pp(DENSE_MLP),
                    SWIGLU,
                    d,
                    cfg.intermediate_size,
                )?),
            };
            let attn = w.pp("self_attn");
            layers.push(Layer {
                input_norm: RmsNorm::load(&w.pp("input_layernorm"), d, eps)?,
                attention: match cfg.mla {
                    Some(mla) => SelfAttention::Mla(Mla::load(cfg, mla, &attn, l)?),
                    None => SelfAttention::Mha(Attention::load(cfg, &attn, l)?),
                },
                post_norm: RmsNorm::load(&w.pp("post_attention_layernorm"), d, eps)?,
                ff,
            });
        }
        let norm = RmsNorm::load(&model.pp("norm"), d, eps)?;
        // Tied checkpoints usually omit lm_head; some save a copy anyway.
        let head = root.pp("lm_head");
        let lm_head = if head.contains("weight") {
            Linear::from_weight(head.matrix_as("weight", &[v, d], Role::Head)?)
        } else if cfg.tie_word_embeddings {
            let table = model.pp("embed_tokens");
            let stored = ckpt.stored_quantized(&table.name("weight"));
            if super::quant::plan(dtype.quant, Role::Head, stored, d) == super::quant::Plan::Dense {
                // The lookup table itself (shared storage when the dtypes agree).
                let tied = |e| table.error("weight", e);
                Linear::from_weight(Weight::Dense(embed.to_dtype(dtype.weights).map_err(tied)?))
            } else {
                // Read again as a matrix, held quantized by the head's precision rule while
                // the lookup table stays dense.
                Linear::from_weight(table.matrix_as("weight", &[v, d], Role::Head)?)
            }
        } else {
            return Err(ModelError::MissingTensor {
                dir: ckpt.dir().to_path_buf(),
                name: head.name("weight"),
                expected: format!("[{v}, {d}] (config.json has tie_word_embeddings: false)"),
            });
        };
        let rotary = Rotary::new(
            cfg.head_dim,
            cfg.max_position_embeddings,
            cfg.rope_theta,
            &cfg.rope_scaling,
            dtype.acts,
            device,
        )
        .map_err(|e| ModelError::Tensor {
            file: ckpt.dir().to_path_buf(),
            name: "rotary tables".into(),
            message: e.to_string(),
        })?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            rotary,
            experts,
            precision: dtype,
            device: device.clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The dtype activations (and the KV cache) are computed in.
    pub fn dtype(&self) -> DType {
        self.precision.acts
    }

    /// The dtypes of weights and activations.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs one step over `parts` (one batch, or micro-batches of one step): writes their
    /// keys/values into `kv` and returns f32 logits `[Σ logit_rows, vocab]` (parts in
    /// order) plus the routes each MoE layer chose.
    ///
    /// With several parts the layers are interleaved so that one part's routed experts
    /// are in flight while the next part's attention runs: for each layer and part, wait
    /// for that part's experts of the previous layer, then run this layer's attention and
    /// dispatch its experts. With a backend that computes in place this is the plain
    /// sequential order; with expert shards it hides their latency behind attention.
    /// [`ExpertError::Unavailable`] rows are rows of the concatenated parts.
    pub fn forward(
        &self,
        parts: &[ForwardBatch],
        kv: &PagedKv,
    ) -> std::result::Result<(Tensor, StepRoutes), ExpertError> {
        let mut offsets = Vec::with_capacity(parts.len());
        let mut total = 0u32;
        for b in parts {
            offsets.push(total);
            total += b.num_tokens as u32;
        }
        let mut xs = parts
            .iter()
            .map(|b| self.embed.index_select(&b.tokens, 0))
            .collect::<Result<Vec<_>>>()?;
        let cos_sin = parts
            .iter()
            .map(|b| self.rotary.at(&b.positions))
            .collect::<Result<Vec<_>>>()?;
        let mut pending: Vec<Option<PendingMoe>> =
            std::iter::repeat_with(|| None).take(parts.len()).collect();
        let mut routes = Vec::new();
        let finish = |x: &Tensor, p: PendingMoe, at: u32| {
            let ys = p.wait().map_err(|e| e.shifted(at))?;
            Ok::<_, ExpertError>((x + ys)?)
        };
        for (l, layer) in self.layers.iter().enumerate() {
            for (i, batch) in parts.iter().enumerate() {
                if let Some(p) = pending[i].take() {
                    xs[i] = finish(&xs[i], p, offsets[i])?;
                }
                let h = layer.input_norm.forward(&xs[i])?;
                let h = match &layer.attention {
                    SelfAttention::Mha(a) => a.forward(&h, batch, &cos_sin[i], kv)?,
                    SelfAttention::Mla(a) => a.forward(&h, batch, &cos_sin[i], kv)?,
                };
                xs[i] = (&xs[i] + h)?;
                let h = layer.post_norm.forward(&xs[i])?;
                match &layer.ff {
                    FeedForward::Dense(mlp) => xs[i] = (&xs[i] + mlp.forward(&h)?)?,
                    FeedForward::Moe(block) => {
                        let (p, r) = block
                            .dispatch(l, &h, self.experts.as_ref())
                            .map_err(|e| e.shifted(offsets[i]))?;
                        routes.push((l, r));
                        pending[i] = Some(p);
                    }
                }
            }
        }
        let mut rows = Vec::with_capacity(parts.len());
        for (i, batch) in parts.iter().enumerate() {
            if let Some(p) = pending[i].take() {
                xs[i] = finish(&xs[i], p, offsets[i])?;
            }
            rows.push(xs[i].index_select(&batch.logit_rows, 0)?);
        }
        let rows = Tensor::cat(&rows, 0)?;
        let logits = self.lm_head.forward(&self.norm.forward(&rows)?)?;
        Ok((logits.to_dtype(DType::F32)?, routes))
    }

    /// Which storage types the model holds, per part (see [`super::quant`]).
    pub fn weight_tally(&self) -> Tally {
        let mut t = Tally::default();
        t.add(
            "embeddings",
            format!("{:?}", self.embed.dtype()).to_lowercase(),
        );
        for layer in &self.layers {
            match &layer.attention {
                SelfAttention::Mha(a) => a.tally(&mut t),
                SelfAttention::Mla(a) => a.tally(&mut t),
            }
            match &layer.ff {
                FeedForward::Dense(m) => m.tally("mlp", &mut t),
                FeedForward::Moe(m) => m.tally(&mut t),
            }
        }
        self.experts.tally(&mut t);
        t.add("head", self.lm_head.weight().type_name());
        t
    }

    /// [`Self::weight_tally`] on one line.
    pub fn describe_weights(&self) -> String {
        self.weight_tally().to_string()
    }

    /// Whether the routed experts run elsewhere (so micro-batches can overlap with them).
    pub fn experts_are_remote(&self) -> bool {
        self.experts.is_remote()
    }

    /// Bytes one routed expert's weights read: the mean of those held here, as stored (a
    /// GGUF file's types, or the quantization setting's); for remote experts, their type
    /// under the quantization setting (18 or 34 bytes per 32 weights), else the dense
    /// dtype's size. 0 for a dense model.
    pub fn routed_expert_bytes(&self) -> u64 {
        let c = &self.cfg;
        let per_weight = match self.precision.quant {
            super::quant::Quantization::Int4 => 18.0 / 32.0,
            super::quant::Quantization::Int8 => 34.0 / 32.0,
            _ => self.precision.weights.size_in_bytes() as f64,
        };
        c.moe
            .as_ref()
            .map_or(0, |m| match self.experts.held_bytes() {
                Some((bytes, held)) if held > 0 => (bytes / held) as u64,
                _ => {
                    (3.0 * (c.hidden_size * m.expert_intermediate_size) as f64 * per_weight) as u64
                }
            })
    }

    /// Bytes of weights one decode step reads for `distinct_experts` routed experts per MoE
    /// layer: attention, router, shared experts, dense MLPs and the LM head always, counted
    /// from the loaded tensors (norms and the embedding gather are left out).
    pub fn weight_bytes_per_step(&self, distinct_experts: usize) -> u64 {
        let c = &self.cfg;
        let per_expert = self.routed_expert_bytes();
        let routed = c.moe.as_ref().map_or(0, |m| {
            distinct_experts.min(m.num_experts) as u64 * per_expert
        });
        let mut total = self.lm_head.weight_bytes() as u64;
        for layer in &self.layers {
            total += match &layer.attention {
                SelfAttention::Mha(a) => a.weight_bytes(),
                SelfAttention::Mla(a) => a.weight_bytes(),
            } as u64;
            total += match &layer.ff {
                FeedForward::Dense(m) => m.weight_bytes() as u64,
                FeedForward::Moe(m) => m.always_read_bytes() as u64 + routed,
            };
        }
        total
    }
}
