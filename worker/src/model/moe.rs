//! Mixture-of-experts: the [`ExpertBackend`] that runs routed experts (in process here;
//! on expert shards in `crate::experts`), and the MoE block that routes each token and adds
//! the shared expert.
//!
//! ```text
//!  x ─┬─ gate (f32) → logits → Router::route → Routes{expert, weight}×k per row ─┐
//!     │                                                                          ▼
//!     ├──────────────────────────────────── ExpertBackend::dispatch(layer, x, routes)
//!     │                                       (LocalExperts, or RemoteExperts' shards)
//!     └─ shared expert [· sigmoid(shared_expert_gate(x)) for Qwen2-MoE] ───── + ──> y
//! ```
//!
//! What a layer's block is called, how its experts are stored and which shared expert it
//! has come from the family's declaration (`model::family`): each layout the family
//! declares is tried in order, and a block that matches none fails with the tensor it
//! lacks. Routing is `model::router`, a pure function of the logits; the backend only does
//! arithmetic, so the remote backend gives the same tokens as the local one.

use std::fmt::Debug;

use candle_core::{DType, Device, Module, Result, Tensor};

use super::ModelError;
use super::checkpoint::{Checkpoint, Weights};
use super::config::{ModelConfig, MoeConfig};
use super::family::{CORRECTION_BIAS, ExpertStorage, MoeLayout, MoeSpec, SWIGLU, SharedExpert};
use super::layers::{Linear, Mlp, Precision};
pub use super::router::{ExpertRows, Router, RouterRule, Routes, group_by_expert};

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

    /// Counts the storage types of the experts held here (none for a remote backend: the
    /// shards log theirs).
    fn tally(&self, _: &mut super::quant::Tally) {}

    /// Bytes of the routed experts held here, as stored, and how many experts that is
    /// (`None` for a remote backend).
    fn held_bytes(&self) -> Option<(usize, usize)> {
        None
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
        let (Some(moe), Some(spec)) = (&cfg.moe, &cfg.family.spec().moe) else {
            return Ok(Self::default());
        };
        let layers_w = Weights::new(ckpt, dtype, device).pp("model").pp("layers");
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
            let mut source = None;
            for e in 0..moe.num_experts as u32 {
                if !wanted(layer, e) {
                    held.push(None);
                    continue;
                }
                if let Some(mlp) = reuse.and_then(|r| r.get(layer, e)) {
                    held.push(Some(mlp.clone()));
                    continue;
                }
                // The layout is looked up once per layer, and only if an expert is read.
                let src = match source.take() {
                    Some(src) => src,
                    None => ExpertSource::find(cfg, moe, spec, &layers_w.pp(layer))?,
                };
                held.push(Some(src.load(e)?));
                source = Some(src);
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
        if let Some(out) = self.forward_groups_cpu(layer, xs, groups)? {
            return Ok(out);
        }
        self.forward_groups_tensors(layer, xs, groups)
    }

    /// [`Self::forward_groups`] with candle's tensor operations, on any device and weight.
    fn forward_groups_tensors(
        &self,
        layer: usize,
        xs: &Tensor,
        groups: &[ExpertRows],
    ) -> Result<Tensor> {
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

impl LocalExperts {
    /// [`Self::forward_groups`] on the CPU with dense f32/bf16 experts: the experts'
    /// products in two parallel regions ([`Mlp::forward_many_cpu`]) and the weighted sum
    /// into one buffer, with no tensor per expert. The same arithmetic in the same order
    /// as the general path. `None` where that does not apply.
    fn forward_groups_cpu(
        &self,
        layer: usize,
        xs: &Tensor,
        groups: &[ExpertRows],
    ) -> Result<Option<Tensor>> {
        if !xs.device().is_cpu() || xs.dtype() != DType::F32 || groups.is_empty() {
            return Ok(None);
        }
        let (total, d) = xs.dims2()?;
        let x = xs.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut gathered = Vec::with_capacity(groups.len());
        let mut mlps = Vec::with_capacity(groups.len());
        for (expert, r, _) in groups {
            mlps.push(self.get(layer, *expert).ok_or_else(|| {
                candle_core::Error::Msg(format!("expert {expert} of layer {layer} is not held"))
            })?);
            let mut g = Vec::with_capacity(r.len() * d);
            for &row in r {
                g.extend_from_slice(&x[row as usize * d..][..d]);
            }
            gathered.push(g);
        }
        let parts: Vec<(&Mlp, &[f32], usize)> = mlps
            .iter()
            .zip(&gathered)
            .zip(groups)
            .map(|((m, g), (_, r, _))| (*m, g.as_slice(), r.len()))
            .collect();
        let Some(ys) = Mlp::forward_many_cpu(&parts) else {
            return Ok(None);
        };
        let mut out = vec![0f32; total * d];
        for ((_, r, w), y) in groups.iter().zip(&ys) {
            for ((&row, &wt), y) in r.iter().zip(w).zip(y.chunks_exact(d)) {
                let o = &mut out[row as usize * d..][..d];
                for (v, y) in o.iter_mut().zip(y) {
                    *v += y * wt;
                }
            }
        }
        Ok(Some(Tensor::from_vec(out, (total, d), xs.device())?))
    }
}

/// Which declared layout a layer's MoE block uses: the first whose marker tensor the
/// checkpoint holds. None is an error naming the first layout's marker (and the others).
pub fn layout_of(
    spec: &'static MoeSpec,
    cfg: &ModelConfig,
    moe: &MoeConfig,
    layer: &Weights<'_>,
) -> std::result::Result<&'static MoeLayout, ModelError> {
    if let Some(found) = spec.layouts.iter().find(|l| layer.contains(&l.marker())) {
        return Ok(found);
    }
    let (d, ff, n) = (
        cfg.hidden_size,
        moe.expert_intermediate_size,
        moe.num_experts,
    );
    let shape = |l: &MoeLayout| match l.experts {
        ExpertStorage::PerExpert(_) => format!("[{ff}, {d}]"),
        ExpertStorage::Fused => format!("[{n}, {}, {d}]", 2 * ff),
    };
    let first = &spec.layouts[0];
    let others: Vec<String> = spec.layouts[1..]
        .iter()
        .map(|l| format!("`{}` {}", layer.name(&l.marker()), shape(l)))
        .collect();
    Err(ModelError::MissingTensor {
        dir: layer.checkpoint().dir().to_path_buf(),
        name: layer.name(&first.marker()),
        expected: if others.is_empty() {
            shape(first)
        } else {
            format!(
                "{}; {} routed experts may instead be stored as {}",
                shape(first),
                cfg.family,
                others.join(" or ")
            )
        },
    })
}

/// One layer's routed experts as the checkpoint stores them (the layout its family
/// declares and the checkpoint uses): an MLP per expert, or transformers v5's fused
/// `[E, …]` tensors, of which only the wanted expert's rows are read.
struct ExpertSource<'a> {
    /// At `<layer>.<block>.experts`.
    experts: Weights<'a>,
    storage: ExpertStorage,
    /// `(d, ff, num_experts)`.
    dims: (usize, usize, usize),
}

impl<'a> ExpertSource<'a> {
    fn find(
        cfg: &ModelConfig,
        moe: &MoeConfig,
        spec: &'static MoeSpec,
        layer: &Weights<'a>,
    ) -> std::result::Result<Self, ModelError> {
        let layout = layout_of(spec, cfg, moe, layer)?;
        Ok(Self {
            experts: layer.pp(layout.block).pp("experts"),
            storage: layout.experts,
            dims: (
                cfg.hidden_size,
                moe.expert_intermediate_size,
                moe.num_experts,
            ),
        })
    }

    fn load(&self, expert: u32) -> std::result::Result<Mlp, ModelError> {
        let (d, ff, n) = self.dims;
        match self.storage {
            ExpertStorage::PerExpert(names) => Mlp::load(&self.experts.pp(expert), names, d, ff),
            // [E, 2·ff, d] (gate rows first) and [E, d, ff].
            ExpertStorage::Fused => {
                let e = expert as usize;
                let gu = self
                    .experts
                    .matrix_row("gate_up_proj", &[n, 2 * ff, d], e)?;
                let dn = self.experts.matrix_row("down_proj", &[n, d, ff], e)?;
                Mlp::from_fused(gu, dn).map_err(|err| self.experts.error("gate_up_proj", err))
            }
        }
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

    fn tally(&self, t: &mut super::quant::Tally) {
        for mlp in self.layers.iter().flatten().flatten() {
            mlp.tally("routed experts", t);
        }
    }

    fn held_bytes(&self) -> Option<(usize, usize)> {
        let held: Vec<&Mlp> = self.layers.iter().flatten().flatten().collect();
        Some((held.iter().map(|m| m.weight_bytes()).sum(), held.len()))
    }
}

/// One MoE layer's frontend side: the router and the optional shared expert.
#[derive(Debug, Clone)]
pub struct MoeBlock {
    gate: Linear,
    router: Router,
    num_experts: usize,
    shared: Option<(Mlp, Option<Linear>)>,
}

impl MoeBlock {
    /// Loads a sparse layer's router (with DeepSeek-V3's correction bias) and shared expert
    /// from `layer` (at `model.layers.<l>`), in the layout its family declares.
    pub fn load(
        cfg: &ModelConfig,
        moe: &MoeConfig,
        layer: &Weights<'_>,
    ) -> std::result::Result<Self, ModelError> {
        let spec = cfg
            .family
            .spec()
            .moe
            .as_ref()
            .ok_or_else(|| ModelError::Unsupported {
                file: layer.checkpoint().dir().to_path_buf(),
                what: format!("routed experts for the dense family {}", cfg.family),
            })?;
        let d = cfg.hidden_size;
        // The block is found by its router, not its experts: a frontend never reads those.
        let block = spec
            .layouts
            .iter()
            .map(|l| layer.pp(l.block))
            .find(|b| b.pp("gate").contains("weight"))
            .unwrap_or_else(|| layer.pp(spec.layouts[0].block));
        // The router runs in f32 whatever the weights are: near-ties must break the way
        // transformers (which upcasts the softmax) breaks them.
        let gate_w = block
            .pp("gate")
            .with_precision(Precision::uniform(DType::F32));
        let gate = Linear::load(&gate_w, (moe.num_experts, d), false)?;
        let correction_bias = if moe.router.has_correction_bias() {
            gate_w.host_f32(CORRECTION_BIAS, &[moe.num_experts])?
        } else {
            Vec::new()
        };
        let shared = match (spec.shared, moe.shared_expert_intermediate_size) {
            (SharedExpert::Gated { mlp, gate }, Some(ff)) => Some((
                Mlp::load(&block.pp(mlp), SWIGLU, d, ff)?,
                // A one-row gate, like the router: never quantized.
                Some(Linear::load(
                    &block.pp(gate).with_precision(
                        block
                            .precision()
                            .with_quant(super::quant::Quantization::None),
                    ),
                    (1, d),
                    false,
                )?),
            )),
            (SharedExpert::AlwaysOn { mlp }, Some(ff)) => {
                Some((Mlp::load(&block.pp(mlp), SWIGLU, d, ff)?, None))
            }
            _ => None,
        };
        Ok(Self {
            gate,
            router: Router {
                rule: moe.router,
                top_k: moe.top_k,
                correction_bias,
            },
            num_experts: moe.num_experts,
            shared,
        })
    }

    /// Counts the router's and the shared expert's storage types.
    pub fn tally(&self, t: &mut super::quant::Tally) {
        t.add("router", self.gate.weight().type_name());
        if let Some((mlp, gate)) = &self.shared {
            mlp.tally("shared experts", t);
            if let Some(g) = gate {
                t.add("router", g.weight().type_name());
            }
        }
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
        Ok(self.router.route(&flat, self.num_experts))
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

    /// The CPU's grouped path gives the tensor path's numbers bit for bit (same operations
    /// in the same order), for f32 and bf16 experts and uneven groups.
    #[test]
    fn the_grouped_cpu_path_equals_the_tensor_path() -> Result<()> {
        let dev = Device::Cpu;
        let (d, ff, n) = (96, 80, 5);
        for dtype in [DType::F32, DType::BF16] {
            let mk = |_| -> Result<Option<Mlp>> {
                let w = |r, c| Tensor::randn(0f32, 0.2, (r, c), &dev)?.to_dtype(dtype);
                Ok(Some(Mlp::new(&w(ff, d)?, &w(ff, d)?, &w(d, ff)?)?))
            };
            let experts = LocalExperts {
                layers: vec![(0..n).map(mk).collect::<Result<Vec<_>>>()?],
            };
            let xs = Tensor::randn(0f32, 1.0, (7, d), &dev)?;
            let groups: Vec<ExpertRows> = vec![
                (0, vec![0, 3, 6], vec![0.5, 0.25, 1.0]),
                (2, vec![1], vec![0.75]),
                (4, vec![0, 1, 2, 3, 4, 5, 6], vec![0.1; 7]),
            ];
            let fast = experts
                .forward_groups_cpu(0, &xs, &groups)?
                .expect("dense CPU experts take the grouped path");
            let general = experts.forward_groups_tensors(0, &xs, &groups)?;
            let diff = (fast - general)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{dtype:?}");
        }
        Ok(())
    }
}
