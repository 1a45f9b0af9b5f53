//! Mixture-of-experts: the router (which experts each token goes to, with what weight), the
//! [`ExpertBackend`] that runs routed experts, and the MoE block that ties them together
//! with the shared expert.
//!
//! ```text
//!  x ─┬─ gate → scores (f32) → route() → Routes{expert, weight}×k per row ─┐
//!     │                                                                    ▼
//!     ├────────────────────────────── ExpertBackend::forward(layer, x, routes)
//!     │                                 (LocalExperts here; gRPC shards later)
//!     └─ shared expert · sigmoid(shared_gate(x))  (Qwen2-MoE) ──────── + ──> y
//! ```
//!
//! Routing is a pure function of the scores, unit-tested on hand-made rows; the backend
//! only does arithmetic, so the remote backend gets the same tokens as the local one.

use std::fmt::Debug;

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};

use super::ModelError;
use super::checkpoint::Checkpoint;
use super::config::{Family, ModelConfig, MoeConfig, Routing};
use super::layers::{Linear, Mlp, Precision};
pub use super::router::RouterRule;

/// The experts chosen for each row of a batch: `top_k` `(expert, weight)` pairs per row,
/// flattened row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Routes {
    /// Experts per row.
    pub top_k: usize,
    /// `experts[row * top_k + j]`.
    pub experts: Vec<u32>,
    /// `weights[row * top_k + j]`, the multiplier of that expert's output.
    pub weights: Vec<f32>,
}

impl Routes {
    /// For each expert that has work: the rows it serves and their weights, experts in
    /// ascending order and rows in batch order (the fixed order partial sums are added in).
    pub fn by_expert(&self, num_experts: usize) -> Vec<(u32, Vec<u32>, Vec<f32>)> {
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); num_experts];
        let mut weights: Vec<Vec<f32>> = vec![Vec::new(); num_experts];
        for (i, (&e, &w)) in self.experts.iter().zip(&self.weights).enumerate() {
            let e = e as usize;
            if e < num_experts {
                rows[e].push((i / self.top_k) as u32);
                weights[e].push(w);
            }
        }
        rows.into_iter()
            .zip(weights)
            .enumerate()
            .filter(|(_, (r, _))| !r.is_empty())
            .map(|(e, (r, w))| (e as u32, r, w))
            .collect()
    }
}

/// Runs the routed experts of one MoE layer. The in-process implementation holds every
/// expert; the remote one (expert parallelism) sends rows to the shards that hold them.
/// Both must return, for each row, `Σ weight · expert(row)` over its routes, added in
/// ascending expert order, so they give the same tokens.
pub trait ExpertBackend: Send + Sync + Debug {
    /// `xs` is `[rows, hidden]`; returns `[rows, hidden]` in `xs`'s dtype.
    fn forward(&self, layer: usize, xs: &Tensor, routes: &Routes) -> Result<Tensor>;
}

/// Every routed expert of every MoE layer, in this process.
#[derive(Debug)]
pub struct LocalExperts {
    /// `layers[l]` is empty for dense layers.
    layers: Vec<Vec<Mlp>>,
}

impl LocalExperts {
    /// Loads the routed experts of every sparse layer, per-expert or fused layout.
    pub fn load(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        dtype: Precision,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        let Some(moe) = &cfg.moe else {
            return Ok(Self { layers: Vec::new() });
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        let started = std::time::Instant::now();
        let every = cfg.num_layers.div_ceil(10).max(1);
        for (layer, sparse) in moe.sparse_layers.iter().enumerate() {
            // The routed experts are most of a checkpoint's bytes: report progress.
            if layer > 0 && layer % every == 0 {
                tracing::info!(
                    layer,
                    of = cfg.num_layers,
                    secs = started.elapsed().as_secs(),
                    "loading routed experts"
                );
            }
            layers.push(if *sparse {
                load_layer_experts(cfg, moe, ckpt, layer, dtype, device)?
            } else {
                Vec::new()
            });
        }
        Ok(Self { layers })
    }
}

/// The prefix of layer `layer`'s MoE block: Mixtral's classic `block_sparse_moe`, else `mlp`.
pub fn moe_prefix(ckpt: &Checkpoint, layer: usize) -> String {
    let classic = format!("model.layers.{layer}.block_sparse_moe");
    if ckpt.contains(&format!("{classic}.gate.weight")) {
        classic
    } else {
        format!("model.layers.{layer}.mlp")
    }
}

fn load_layer_experts(
    cfg: &ModelConfig,
    moe: &MoeConfig,
    ckpt: &Checkpoint,
    layer: usize,
    dtype: Precision,
    device: &Device,
) -> std::result::Result<Vec<Mlp>, ModelError> {
    let prefix = moe_prefix(ckpt, layer);
    let (d, ff, n) = (
        cfg.hidden_size,
        moe.expert_intermediate_size,
        moe.num_experts,
    );
    let fused_gate_up = format!("{prefix}.experts.gate_up_proj");
    let tensor_err = |name: &str, e: candle_core::Error| ModelError::Tensor {
        file: ckpt.dir().to_path_buf(),
        name: name.to_string(),
        message: e.to_string(),
    };
    if ckpt.contains(&fused_gate_up) {
        // transformers v5 layout: [E, 2·ff, d] (gate rows first) and [E, d, ff].
        let fused_down = format!("{prefix}.experts.down_proj");
        let gate_up = ckpt.tensor(&fused_gate_up, &[n, 2 * ff, d], dtype.weights, device)?;
        let down = ckpt.tensor(&fused_down, &[n, d, ff], dtype.weights, device)?;
        return (0..n)
            .map(|e| {
                let gu = gate_up.i(e);
                let dn = down.i(e);
                gu.and_then(|gu| Mlp::from_fused(&gu, &dn?))
                    .map_err(|err| tensor_err(&fused_gate_up, err))
            })
            .collect();
    }
    let mixtral_names = ckpt.contains(&format!("{prefix}.experts.0.w1.weight"));
    (0..n)
        .map(|e| {
            Mlp::load(
                ckpt,
                &format!("{prefix}.experts.{e}"),
                d,
                ff,
                mixtral_names,
                dtype,
                device,
            )
        })
        .collect()
}

impl ExpertBackend for LocalExperts {
    fn forward(&self, layer: usize, xs: &Tensor, routes: &Routes) -> Result<Tensor> {
        let experts = self
            .layers
            .get(layer)
            .filter(|l| !l.is_empty())
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("layer {layer} has no routed experts"))
            })?;
        // One gather, one weighting and one scatter-add for the whole layer (not one per
        // expert): rows grouped by expert in ascending order, so each row's partial sums
        // are still added in ascending expert order.
        let groups = routes.by_expert(experts.len());
        let mut rows = Vec::with_capacity(routes.experts.len());
        let mut weights = Vec::with_capacity(routes.experts.len());
        for (_, r, w) in &groups {
            rows.extend_from_slice(r);
            weights.extend_from_slice(w);
        }
        let out = xs.zeros_like()?;
        if rows.is_empty() {
            return Ok(out);
        }
        let idx = Tensor::new(rows.as_slice(), xs.device())?;
        let gathered = xs.index_select(&idx, 0)?;
        let mut ys = Vec::with_capacity(groups.len());
        let mut at = 0;
        for (expert, r, _) in &groups {
            ys.push(experts[*expert as usize].forward(&gathered.narrow(0, at, r.len())?)?);
            at += r.len();
        }
        let w = Tensor::new(weights.as_slice(), xs.device())?
            .to_dtype(xs.dtype())?
            .unsqueeze(1)?;
        let ys = Tensor::cat(&ys, 0)?.broadcast_mul(&w)?;
        out.index_add(&idx, &ys, 0)
    }
}

/// One MoE layer's frontend side: the router and the optional shared expert.
#[derive(Debug, Clone)]
pub struct MoeBlock {
    gate: Linear,
    rule: RouterRule,
    num_experts: usize,
    shared: Option<(Mlp, Option<Linear>)>,
}

impl MoeBlock {
    /// Loads the router (its rule from the family; DeepSeek-V3's correction bias) and the
    /// shared expert (Qwen2-MoE's gated one, DeepSeek's always-on ones) of `layer`.
    pub fn load(
        cfg: &ModelConfig,
        moe: &MoeConfig,
        ckpt: &Checkpoint,
        layer: usize,
        dtype: Precision,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        let prefix = moe_prefix(ckpt, layer);
        let d = cfg.hidden_size;
        // The router runs in f32 whatever the weights are: near-ties must break the way
        // transformers (which upcasts the softmax) breaks them.
        let gate = Linear::load(
            ckpt,
            &format!("{prefix}.gate"),
            (moe.num_experts, d),
            Precision::uniform(DType::F32),
            device,
        )?;
        let shared = match (cfg.family, moe.shared_expert_intermediate_size) {
            (Family::Qwen2Moe, Some(ff)) => {
                let mlp = Mlp::load(
                    ckpt,
                    &format!("{prefix}.shared_expert"),
                    d,
                    ff,
                    false,
                    dtype,
                    device,
                )?;
                let gate_name = format!("{prefix}.shared_expert_gate");
                let gate = if ckpt.contains(&format!("{gate_name}.weight")) {
                    Some(Linear::load(ckpt, &gate_name, (1, d), dtype, device)?)
                } else {
                    None
                };
                Some((mlp, gate))
            }
            // DeepSeek: `n_shared_experts` fused into one always-on MLP, no gate.
            (Family::DeepseekV2 | Family::DeepseekV3, Some(ff)) => Some((
                Mlp::load(
                    ckpt,
                    &format!("{prefix}.shared_experts"),
                    d,
                    ff,
                    false,
                    dtype,
                    device,
                )?,
                None,
            )),
            _ => None,
        };
        let (top_k, norm_topk_prob) = (moe.top_k, moe.norm_topk_prob);
        let rule = match moe.routing {
            Routing::Softmax => RouterRule::Softmax {
                top_k,
                norm_topk_prob,
            },
            Routing::DeepSeekV2 {
                routed_scaling_factor,
                groups,
            } => RouterRule::DeepSeekV2 {
                top_k,
                routed_scaling_factor,
                groups,
            },
            Routing::DeepSeekV3 {
                routed_scaling_factor,
                n_group,
                topk_group,
            } => {
                let name = format!("{prefix}.gate.e_score_correction_bias");
                let bias = ckpt
                    .tensor(&name, &[moe.num_experts], DType::F32, &Device::Cpu)?
                    .to_vec1::<f32>()
                    .map_err(|e| ModelError::Tensor {
                        file: ckpt.dir().to_path_buf(),
                        name,
                        message: e.to_string(),
                    })?;
                RouterRule::DeepSeekV3 {
                    top_k,
                    norm_topk_prob,
                    routed_scaling_factor,
                    n_group,
                    topk_group,
                    bias,
                }
            }
        };
        Ok(Self {
            gate,
            rule,
            num_experts: moe.num_experts,
            shared,
        })
    }

    /// Bytes of weights every token reads whatever its routes: the router and the shared
    /// expert (with its gate).
    pub fn always_read_bytes(&self) -> usize {
        self.gate.weight_bytes()
            + self.shared.as_ref().map_or(0, |(mlp, gate)| {
                mlp.weight_bytes() + gate.as_ref().map_or(0, Linear::weight_bytes)
            })
    }

    /// The routes of every row of `xs`.
    pub fn route(&self, xs: &Tensor) -> Result<Routes> {
        let logits = self.gate.forward(&xs.to_dtype(DType::F32)?)?;
        let flat = logits.flatten_all()?.to_vec1::<f32>()?;
        Ok(self.rule.route(&flat, self.num_experts))
    }

    /// Routed experts through `backend`, plus the shared expert.
    pub fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        backend: &dyn ExpertBackend,
    ) -> Result<(Tensor, Routes)> {
        let routes = self.route(xs)?;
        let mut ys = backend.forward(layer, xs, &routes)?;
        if let Some((mlp, gate)) = &self.shared {
            let mut shared = mlp.forward(xs)?;
            if let Some(gate) = gate {
                shared = shared.broadcast_mul(&candle_nn::ops::sigmoid(&gate.forward(xs)?)?)?;
            }
            ys = (ys + shared)?;
        }
        Ok((ys, routes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_expert_groups_rows_in_order() {
        let routes = Routes {
            top_k: 2,
            experts: vec![3, 1, 1, 0, 3, 0],
            weights: vec![0.6, 0.4, 0.7, 0.3, 0.5, 0.5],
        };
        assert_eq!(
            routes.by_expert(4),
            vec![
                (0, vec![1, 2], vec![0.3, 0.5]),
                (1, vec![0, 1], vec![0.4, 0.7]),
                (3, vec![0, 2], vec![0.6, 0.5]),
            ]
        );
    }

    #[test]
    fn local_experts_weight_and_sum() -> Result<()> {
        let dev = Device::Cpu;
        // Expert e maps x to (e+1)·x through identity-ish weights: gate = large so silu≈id.
        let d = 2;
        let mk = |scale: f32| -> Result<Mlp> {
            let gate = (Tensor::eye(d, DType::F32, &dev)? * 50.0)?;
            let up = (Tensor::eye(d, DType::F32, &dev)? * f64::from(scale))?;
            let down = (Tensor::eye(d, DType::F32, &dev)? / 50.0)?;
            Mlp::new(&gate, &up, &down)
        };
        let experts = LocalExperts {
            layers: vec![vec![mk(1.0)?, mk(2.0)?]],
        };
        let xs = Tensor::new(&[[1f32, 1.0], [2.0, 2.0]], &dev)?;
        let routes = Routes {
            top_k: 2,
            experts: vec![0, 1, 1, 0],
            weights: vec![0.5, 0.5, 1.0, 0.0],
        };
        let ys = experts.forward(0, &xs, &routes)?.to_vec2::<f32>()?;
        // row 0: 0.5·(50·1)·1/50 + 0.5·(50·2)·1/50 = 1.5 (silu(50) ≈ 50).
        assert!((ys[0][0] - 1.5).abs() < 1e-3, "{ys:?}");
        // row 1: 1.0 · expert 1 on x=2: 2·(2·50)/50·... = silu(100)·4/50 = 8.
        assert!((ys[1][0] - 8.0).abs() < 1e-3, "{ys:?}");
        Ok(())
    }
}
