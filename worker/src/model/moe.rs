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

use candle_core::{DType, Device, Module, Result, Tensor};

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
    /// Rows of the batch.
    pub fn rows(&self) -> usize {
        self.experts.len().checked_div(self.top_k).unwrap_or(0)
    }

    /// Every `(row, expert, weight)`, row-major.
    pub fn pairs(&self) -> impl Iterator<Item = (u32, u32, f32)> + '_ {
        self.experts
            .iter()
            .zip(&self.weights)
            .enumerate()
            .map(|(i, (&e, &w))| ((i / self.top_k) as u32, e, w))
    }

    /// For each expert that has work: the rows it serves and their weights, experts in
    /// ascending order and rows in batch order (the fixed order partial sums are added in).
    pub fn by_expert(&self, num_experts: usize) -> Vec<ExpertRows> {
        group_by_expert(self.pairs(), num_experts)
    }
}

/// One expert's share of a batch: `(expert, rows, weights)`.
pub type ExpertRows = (u32, Vec<u32>, Vec<f32>);

/// Groups `(row, expert, weight)` pairs by expert: experts ascending, rows in the order
/// given. Experts `>= num_experts` are left out.
pub fn group_by_expert(
    pairs: impl Iterator<Item = (u32, u32, f32)>,
    num_experts: usize,
) -> Vec<ExpertRows> {
    let mut rows: Vec<Vec<u32>> = vec![Vec::new(); num_experts];
    let mut weights: Vec<Vec<f32>> = vec![Vec::new(); num_experts];
    for (row, e, w) in pairs {
        let e = e as usize;
        if e < num_experts {
            rows[e].push(row);
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

/// Why routed experts could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum ExpertError {
    /// The arithmetic failed (a bug or a device error).
    #[error(transparent)]
    Compute(#[from] candle_core::Error),
    /// No reachable holder for some routed experts: the rows routed to them cannot be
    /// computed now; every other row could be.
    #[error("{message}")]
    Unavailable {
        /// Rows of the batch (as given to the backend) that need a missing expert.
        rows: Vec<u32>,
        /// Names the missing `(layer, expert)` pairs and why.
        message: String,
    },
}

impl ExpertError {
    /// The same error with its rows moved by `by` (a micro-batch's place in its step).
    pub fn shifted(self, by: u32) -> Self {
        match self {
            ExpertError::Unavailable { rows, message } => ExpertError::Unavailable {
                rows: rows.into_iter().map(|r| r + by).collect(),
                message,
            },
            other => other,
        }
    }
}

/// Routed-expert output that may still be in flight (on expert shards); [`Pending::wait`]
/// blocks until it is there.
pub enum Pending {
    /// Computed in place.
    Ready(Tensor),
    /// Computed elsewhere; the closure blocks until the result arrives.
    Waiting(Box<dyn FnOnce() -> std::result::Result<Tensor, ExpertError> + Send>),
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pending::Ready(_) => "Pending::Ready",
            Pending::Waiting(_) => "Pending::Waiting",
        })
    }
}

impl Pending {
    /// The `[rows, hidden]` output.
    pub fn wait(self) -> std::result::Result<Tensor, ExpertError> {
        match self {
            Pending::Ready(t) => Ok(t),
            Pending::Waiting(f) => f(),
        }
    }
}

/// Runs the routed experts of one MoE layer. The in-process implementation holds every
/// expert; the remote one (expert parallelism) sends rows to the shards that hold them.
/// Both return, for each row, `Σ weight · expert(row)` over its routes, so they give the
/// same tokens.
pub trait ExpertBackend: Send + Sync + Debug {
    /// Starts the routed experts of `layer` on `xs` (`[rows, hidden]`); the output
    /// (`[rows, hidden]` in `xs`'s dtype) comes from [`Pending::wait`]. A backend that
    /// computes in place returns [`Pending::Ready`]; a remote one returns at once so the
    /// caller can work (attention of another micro-batch) while the shards compute.
    fn dispatch(
        &self,
        layer: usize,
        xs: &Tensor,
        routes: &Routes,
    ) -> std::result::Result<Pending, ExpertError>;

    /// [`dispatch`](Self::dispatch) and wait.
    fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        routes: &Routes,
    ) -> std::result::Result<Tensor, ExpertError> {
        self.dispatch(layer, xs, routes)?.wait()
    }

    /// Whether [`dispatch`](Self::dispatch) returns before the experts are done, so that
    /// splitting a batch into micro-batches can overlap attention with expert work.
    fn is_remote(&self) -> bool {
        false
    }
}

/// Routed experts in this process: every one (single-process mode), or the subset an
/// expert shard's placement assigns it.
#[derive(Debug, Clone, Default)]
pub struct LocalExperts {
    /// `layers[l][e]`: `None` for experts not held; `layers[l]` is empty for dense layers.
    layers: Vec<Vec<Option<Mlp>>>,
}

impl LocalExperts {
    /// Loads the routed experts of every sparse layer, per-expert or fused layout.
    pub fn load(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        dtype: Precision,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        Self::load_subset(cfg, ckpt, dtype, device, &|_, _| true, None)
    }

    /// Loads the routed experts `wanted(layer, expert)` selects. Experts already in
    /// `reuse` are taken from it instead of being read again (a placement change only
    /// reads what is new).
    pub fn load_subset(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        dtype: Precision,
        device: &Device,
        wanted: &dyn Fn(usize, u32) -> bool,
        reuse: Option<&LocalExperts>,
    ) -> std::result::Result<Self, ModelError> {
        let Some(moe) = &cfg.moe else {
            return Ok(Self::default());
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
            if !*sparse {
                layers.push(Vec::new());
                continue;
            }
            let mut held = Vec::with_capacity(moe.num_experts);
            let mut fused = None;
            for e in 0..moe.num_experts as u32 {
                if !wanted(layer, e) {
                    held.push(None);
                    continue;
                }
                if let Some(mlp) = reuse.and_then(|r| r.get(layer, e)) {
                    held.push(Some(mlp.clone()));
                    continue;
                }
                let src = fused.get_or_insert_with(|| ExpertSource::find(ckpt, layer));
                held.push(Some(src.load(cfg, moe, ckpt, e, dtype, device)?));
            }
            layers.push(held);
        }
        Ok(Self { layers })
    }

    /// Expert `expert` of `layer`, if held.
    pub fn get(&self, layer: usize, expert: u32) -> Option<&Mlp> {
        self.layers.get(layer)?.get(expert as usize)?.as_ref()
    }

    /// The held experts of each layer that has any, ascending.
    pub fn held(&self) -> Vec<(usize, Vec<u32>)> {
        self.layers
            .iter()
            .enumerate()
            .filter_map(|(l, experts)| {
                let ids: Vec<u32> = experts
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| m.is_some())
                    .map(|(e, _)| e as u32)
                    .collect();
                (!ids.is_empty()).then_some((l, ids))
            })
            .collect()
    }

    /// Bytes of the held experts' weights.
    pub fn weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(Mlp::weight_bytes)
            .sum()
    }

    /// `Σ weight · expert(row)` for each row of `xs` over `groups` (from
    /// [`group_by_expert`]), added in the groups' order. Every expert must be held.
    pub fn forward_groups(
        &self,
        layer: usize,
        xs: &Tensor,
        groups: &[ExpertRows],
    ) -> Result<Tensor> {
        // One gather, one weighting and one scatter-add for the whole layer (not one per
        // expert): rows grouped by expert in ascending order, so each row's partial sums
        // are still added in ascending expert order.
        let mut rows = Vec::new();
        let mut weights = Vec::new();
        for (_, r, w) in groups {
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
        for (expert, r, _) in groups {
            let mlp = self.get(layer, *expert).ok_or_else(|| {
                candle_core::Error::Msg(format!("expert {expert} of layer {layer} is not held"))
            })?;
            ys.push(mlp.forward(&gathered.narrow(0, at, r.len())?)?);
            at += r.len();
        }
        let w = Tensor::new(weights.as_slice(), xs.device())?
            .to_dtype(xs.dtype())?
            .unsqueeze(1)?;
        let ys = Tensor::cat(&ys, 0)?.broadcast_mul(&w)?;
        out.index_add(&idx, &ys, 0)
    }
}

/// Where one layer's routed experts are stored: per-expert tensors (Mixtral's `w1/w2/w3`
/// or `gate/up/down_proj`), or transformers v5's fused `[E, …]` tensors, of which only the
/// wanted expert's rows are read.
enum ExpertSource {
    PerExpert { prefix: String, mixtral_names: bool },
    Fused { gate_up: String, down: String },
}

impl ExpertSource {
    fn find(ckpt: &Checkpoint, layer: usize) -> Self {
        let prefix = moe_prefix(ckpt, layer);
        let gate_up = format!("{prefix}.experts.gate_up_proj");
        if ckpt.contains(&gate_up) {
            return Self::Fused {
                gate_up,
                down: format!("{prefix}.experts.down_proj"),
            };
        }
        let mixtral_names = ckpt.contains(&format!("{prefix}.experts.0.w1.weight"));
        Self::PerExpert {
            prefix,
            mixtral_names,
        }
    }

    fn load(
        &self,
        cfg: &ModelConfig,
        moe: &MoeConfig,
        ckpt: &Checkpoint,
        expert: u32,
        dtype: Precision,
        device: &Device,
    ) -> std::result::Result<Mlp, ModelError> {
        let (d, ff, n) = (
            cfg.hidden_size,
            moe.expert_intermediate_size,
            moe.num_experts,
        );
        match self {
            Self::PerExpert {
                prefix,
                mixtral_names,
            } => Mlp::load(
                ckpt,
                &format!("{prefix}.experts.{expert}"),
                d,
                ff,
                *mixtral_names,
                dtype,
                device,
            ),
            // [E, 2·ff, d] (gate rows first) and [E, d, ff].
            Self::Fused { gate_up, down } => {
                let e = expert as usize;
                let gu = ckpt.tensor_row(gate_up, &[n, 2 * ff, d], e, dtype.weights, device)?;
                let dn = ckpt.tensor_row(down, &[n, d, ff], e, dtype.weights, device)?;
                Mlp::from_fused(&gu, &dn).map_err(|err| ModelError::Tensor {
                    file: ckpt.dir().to_path_buf(),
                    name: gate_up.clone(),
                    message: err.to_string(),
                })
            }
        }
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

impl ExpertBackend for LocalExperts {
    fn dispatch(
        &self,
        layer: usize,
        xs: &Tensor,
        routes: &Routes,
    ) -> std::result::Result<Pending, ExpertError> {
        let experts = self
            .layers
            .get(layer)
            .filter(|l| !l.is_empty())
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("layer {layer} has no routed experts"))
            })?;
        let groups = routes.by_expert(experts.len());
        Ok(Pending::Ready(self.forward_groups(layer, xs, &groups)?))
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

    /// Routes `xs`, starts its routed experts on `backend` and computes the shared expert
    /// meanwhile; [`PendingMoe::wait`] gives the block's output.
    pub fn dispatch(
        &self,
        layer: usize,
        xs: &Tensor,
        backend: &dyn ExpertBackend,
    ) -> std::result::Result<(PendingMoe, Routes), ExpertError> {
        let routes = self.route(xs)?;
        let routed = backend.dispatch(layer, xs, &routes)?;
        let shared = match &self.shared {
            Some((mlp, gate)) => {
                let mut shared = mlp.forward(xs)?;
                if let Some(gate) = gate {
                    shared = shared.broadcast_mul(&candle_nn::ops::sigmoid(&gate.forward(xs)?)?)?;
                }
                Some(shared)
            }
            None => None,
        };
        Ok((PendingMoe { routed, shared }, routes))
    }

    /// Routed experts through `backend`, plus the shared expert.
    pub fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        backend: &dyn ExpertBackend,
    ) -> std::result::Result<(Tensor, Routes), ExpertError> {
        let (pending, routes) = self.dispatch(layer, xs, backend)?;
        Ok((pending.wait()?, routes))
    }
}

/// A MoE block's output in the making: routed experts maybe still in flight, the shared
/// expert done.
#[derive(Debug)]
pub struct PendingMoe {
    routed: Pending,
    shared: Option<Tensor>,
}

impl PendingMoe {
    /// Routed plus shared output, `[rows, hidden]`.
    pub fn wait(self) -> std::result::Result<Tensor, ExpertError> {
        let ys = self.routed.wait()?;
        Ok(match self.shared {
            Some(shared) => (ys + shared)?,
            None => ys,
        })
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

    /// A shard's memory is its share: half the experts, half the bytes, from the fused
    /// `[E, …]` tensors (qwen3_moe fixture) and the per-expert ones (mixtral fixture).
    #[test]
    fn a_subset_holds_only_its_experts_bytes() {
        for name in ["qwen3_moe", "mixtral"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/models")
                .join(name);
            let cfg = super::super::config::load(&dir).expect("config");
            let ckpt = Checkpoint::open(&dir).expect("checkpoint");
            let p = Precision::uniform(DType::F32);
            let all = LocalExperts::load(&cfg, &ckpt, p, &Device::Cpu).expect("all");
            let half = LocalExperts::load_subset(&cfg, &ckpt, p, &Device::Cpu, &|_, e| e < 4, None)
                .expect("half");
            assert_eq!(half.weight_bytes() * 2, all.weight_bytes(), "{name}");
            assert!(
                half.get(1, 3).is_some() && half.get(1, 4).is_none(),
                "{name}"
            );
            // Reused experts are the same tensors, not new reads.
            let more =
                LocalExperts::load_subset(&cfg, &ckpt, p, &Device::Cpu, &|_, e| e < 6, Some(&half))
                    .expect("more");
            assert_eq!(more.held()[0].1, vec![0, 1, 2, 3, 4, 5], "{name}");
        }
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
            layers: vec![vec![Some(mk(1.0)?), Some(mk(2.0)?)]],
        };
        let xs = Tensor::new(&[[1f32, 1.0], [2.0, 2.0]], &dev)?;
        let routes = Routes {
            top_k: 2,
            experts: vec![0, 1, 1, 0],
            weights: vec![0.5, 0.5, 1.0, 0.0],
        };
        let ys = experts
            .forward(0, &xs, &routes)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .to_vec2::<f32>()?;
        // row 0: 0.5·(50·1)·1/50 + 0.5·(50·2)·1/50 = 1.5 (silu(50) ≈ 50).
        assert!((ys[0][0] - 1.5).abs() < 1e-3, "{ys:?}");
        // row 1: 1.0 · expert 1 on x=2: 2·(2·50)/50·... = silu(100)·4/50 = 8.
        assert!((ys[1][0] - 8.0).abs() < 1e-3, "{ys:?}");
        Ok(())
    }
}
