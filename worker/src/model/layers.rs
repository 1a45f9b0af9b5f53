//! The small building blocks every family shares: projections, RMSNorm, rotary tables and
//! the SwiGLU MLP (dense layers, routed experts and shared experts are all one [`Mlp`]).
//!
//! Each loads from a [`Weights`] already at its own prefix; what it reads is what its
//! caller says the family declares (a projection's bias, an MLP's tensor names), never what
//! the checkpoint happens to hold.

use candle_core::{D, DType, Device, Module, Result, Tensor};

use super::ModelError;
use super::checkpoint::Weights;
use super::config::RopeScaling;
use super::family::MlpNames;
use super::matmul::{HeldRows, Weight, linear_w};
use super::quant::{Quantization, Tally};

/// The dtypes a model is computed in: weight matrices, and everything else (activations,
/// norms, biases, embeddings, the KV cache). They differ on the CPU for bf16/f16
/// checkpoints: matrices stay 16-bit (half the bytes to stream per token) while the
/// arithmetic runs in f32, since candle has no 16-bit GEMM on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    /// Linear layers, experts, the LM head.
    pub weights: DType,
    /// Activations and every other tensor.
    pub acts: DType,
    /// How weight matrices are stored (see [`super::quant`]).
    pub quant: Quantization,
}

impl Precision {
    /// One dtype for everything, nothing quantized (a quantized GGUF tensor dequantized).
    pub fn uniform(dtype: DType) -> Self {
        Self {
            weights: dtype,
            acts: dtype,
            quant: Quantization::None,
        }
    }

    /// The same with `quant`.
    pub fn with_quant(self, quant: Quantization) -> Self {
        Self { quant, ..self }
    }
}

/// `y = x Wᵀ (+ b)`, the weight kept as saved (`[out, in]`, dense or block-quantized);
/// the product is [`linear_w`], which picks the fastest path for the batch's shape.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` (`[out, in]`) under `w`, and `bias` exactly when `bias` says the
    /// family has one: a declared bias that is missing, or a saved one that is not
    /// declared, is an error naming it.
    pub fn load(
        w: &Weights<'_>,
        out_in: (usize, usize),
        bias: bool,
    ) -> std::result::Result<Self, ModelError> {
        let weight = w.matrix("weight", &[out_in.0, out_in.1])?;
        let bias = match (bias, w.contains("bias")) {
            (true, _) => Some(w.vector("bias", &[out_in.0])?),
            (false, false) => None,
            (false, true) => {
                return Err(ModelError::UnexpectedTensor {
                    dir: w.checkpoint().dir().to_path_buf(),
                    name: w.name("bias"),
                    why: "the family declares no bias for this projection (for one that \
                          depends on config.json, see `attention_bias` or `qkv_bias`)"
                        .into(),
                });
            }
        };
        Ok(Self { weight, bias })
    }

    /// From an existing `[out, in]` weight (shares its storage).
    pub fn from_weight(weight: Weight) -> Self {
        Self { weight, bias: None }
    }

    /// Bytes of the weight.
    pub fn weight_bytes(&self) -> usize {
        self.weight.bytes()
    }

    /// The weight.
    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// One projection computing `parts` side by side (their output rows stacked, biases
    /// likewise), so a token row costs one product instead of several; `None` when the
    /// parts are stored differently or only some have a bias.
    pub fn cat_rows(parts: &[&Linear]) -> Result<Option<Self>> {
        let Some((first, rest)) = parts.split_first() else {
            return Ok(None);
        };
        let mut weight = first.weight.clone();
        for p in rest {
            match Weight::cat_rows(&weight, &p.weight)? {
                Some(w) => weight = w,
                None => return Ok(None),
            }
        }
        let bias = match parts
            .iter()
            .map(|p| p.bias.as_ref())
            .collect::<Option<Vec<_>>>()
        {
            Some(b) => Some(Tensor::cat(&b, 0)?),
            None if parts.iter().all(|p| p.bias.is_none()) => None,
            None => return Ok(None),
        };
        Ok(Some(Self { weight, bias }))
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = linear_w(xs, &self.weight)?;
        match &self.bias {
            Some(b) => ys.broadcast_add(b),
            None => Ok(ys),
        }
    }
}

/// RMSNorm over the last dimension, computed in f32 as transformers does.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// Loads `weight` (length `dim`) under `w`.
    pub fn load(w: &Weights<'_>, dim: usize, eps: f64) -> std::result::Result<Self, ModelError> {
        Ok(Self {
            weight: w.vector("weight", &[dim])?,
            eps: eps as f32,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = xs.contiguous()?;
        candle_nn::ops::rms_norm(&xs, &self.weight, self.eps)
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) · up(x))`, gate and up fused into one matrix when they
/// are stored alike, so a token row costs two products, not three.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_up: GateUp,
    /// `[d, ff]`.
    down: Weight,
    ff: usize,
}

#[derive(Debug, Clone)]
enum GateUp {
    /// `[2·ff, d]`: gate rows first.
    Fused(Weight),
    /// Stored in two types (a GGUF may quantize them differently): `[ff, d]` each.
    Split(Weight, Weight),
}

impl Mlp {
    /// From separate dense `[ff, d]` gate and up weights and a `[d, ff]` down weight.
    pub fn new(gate: &Tensor, up: &Tensor, down: &Tensor) -> Result<Self> {
        Self::from_parts(
            Weight::Dense(gate.clone()),
            Weight::Dense(up.clone()),
            Weight::Dense(down.contiguous()?),
        )
    }

    /// From separate gate, up and down weights, dense or quantized.
    pub fn from_parts(gate: Weight, up: Weight, down: Weight) -> Result<Self> {
        let ff = gate.dims2()?.0;
        let gate_up = match Weight::cat_rows(&gate, &up)? {
            Some(fused) => GateUp::Fused(fused),
            None => GateUp::Split(gate, up),
        };
        Ok(Self { gate_up, down, ff })
    }

    /// From an already fused `[2·ff, d]` gate+up weight (gate rows first).
    pub fn from_fused(gate_up: Weight, down: Weight) -> Result<Self> {
        let ff = gate_up.dims2()?.0 / 2;
        let gate_up = match gate_up {
            Weight::Dense(t) => Weight::Dense(t.contiguous()?),
            q => q,
        };
        let down = match down {
            Weight::Dense(t) => Weight::Dense(t.contiguous()?),
            q => q,
        };
        Ok(Self {
            gate_up: GateUp::Fused(gate_up),
            down,
            ff,
        })
    }

    /// Loads the three matrices `names` gives under `w`, for width `d` and hidden width
    /// `ff`.
    pub fn load(
        w: &Weights<'_>,
        names: MlpNames,
        d: usize,
        ff: usize,
    ) -> std::result::Result<Self, ModelError> {
        let gate = w.pp(names.gate).matrix("weight", &[ff, d])?;
        let up = w.pp(names.up).matrix("weight", &[ff, d])?;
        let down = w.pp(names.down).matrix("weight", &[d, ff])?;
        Self::from_parts(gate, up, down).map_err(|e| w.pp(names.gate).error("weight", e))
    }

    /// Bytes of weights one token reads.
    pub fn weight_bytes(&self) -> usize {
        let gate_up = match &self.gate_up {
            GateUp::Fused(w) => w.bytes(),
            GateUp::Split(g, u) => g.bytes() + u.bytes(),
        };
        gate_up + self.down.bytes()
    }

    /// Counts its matrices' storage types under `part`.
    pub fn tally(&self, part: &'static str, t: &mut Tally) {
        match &self.gate_up {
            GateUp::Fused(w) => t.add(part, w.type_name()),
            GateUp::Split(g, u) => {
                t.add(part, g.type_name());
                t.add(part, u.type_name());
            }
        }
        t.add(part, self.down.type_name());
    }
}

impl Mlp {
    /// Several MLPs, each on its own rows (`[rows, d]` row-major f32), as two parallel
    /// regions: every gate+up product at once, then every down product; `silu(gate) · up`
    /// between them in the same order of operations as [`Module::forward`]. Each result is
    /// `[rows, d]`. `None` unless every MLP holds fused dense f32/bf16 CPU
    /// weights and the CPU has a [`simd`](super::simd) kernel.
    pub fn forward_many_cpu(parts: &[(&Mlp, &[f32], usize)]) -> Option<Vec<Vec<f32>>> {
        use super::simd::{self, Job};
        let isa = simd::Isa::detect();
        let mut held = Vec::with_capacity(parts.len());
        for (mlp, _, _) in parts {
            let GateUp::Fused(gate_up) = &mlp.gate_up else {
                return None;
            };
            held.push((HeldRows::of(gate_up)?, HeldRows::of(&mlp.down)?));
        }
        let d = match parts.first() {
            Some((mlp, _, _)) => mlp.down.dims2().ok()?.0,
            None => return Some(Vec::new()),
        };
        let jobs: Vec<Job<'_>> = parts
            .iter()
            .zip(&held)
            .map(|((_, x, rows), (gu, _))| Job {
                x,
                rows: *rows,
                k: d,
                w: gu.rows(),
            })
            .collect();
        let h = simd::products(&jobs, isa)?;
        let acts: Vec<Vec<f32>> = parts
            .iter()
            .zip(&h)
            .map(|((mlp, _, rows), h)| {
                let (ff, rows) = (mlp.ff, *rows);
                let mut act = vec![0f32; rows * ff];
                for (a, h) in act
                    .chunks_exact_mut(ff.max(1))
                    .zip(h.chunks_exact(2 * ff.max(1)))
                {
                    let (gate, up) = h.split_at(ff);
                    for ((v, g), u) in a.iter_mut().zip(gate).zip(up) {
                        // candle's silu: x / (1 + e^-x).
                        *v = g / (1.0 + (-g).exp()) * u;
                    }
                }
                act
            })
            .collect();
        let jobs: Vec<Job<'_>> = parts
            .iter()
            .zip(&held)
            .zip(&acts)
            .map(|(((mlp, _, rows), (_, down)), x)| Job {
                x,
                rows: *rows,
                k: mlp.ff,
                w: down.rows(),
            })
            .collect();
        simd::products(&jobs, isa)
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Fused(w) => {
                let h = linear_w(xs, w)?;
                (
                    h.narrow(D::Minus1, 0, self.ff)?,
                    h.narrow(D::Minus1, self.ff, self.ff)?,
                )
            }
            GateUp::Split(g, u) => (linear_w(xs, g)?, linear_w(xs, u)?),
        };
        let act = (candle_nn::ops::silu(&gate)? * up)?;
        linear_w(&act.contiguous()?, &self.down)
    }
}

/// Precomputed rotary `cos`/`sin` tables, `[max_positions, head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

/// The rotary inverse frequencies for `head_dim`, as transformers computes them (f32).
pub fn inverse_frequencies(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    match *scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
            );
            let old = original_max_position_embeddings as f32;
            let low_freq_wavelen = old / low;
            let high_freq_wavelen = old / high;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            truncate,
            ..
        } => {
            // transformers' _compute_yarn_parameters: the ramp's ends in f64, the
            // frequencies in f32.
            let dim = head_dim as f64;
            let correction_dim = |rotations: f64| {
                dim * (original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI))
                    .ln()
                    / (2.0 * theta.ln())
            };
            let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
            if truncate {
                low = low.floor();
                high = high.ceil();
            }
            let (low, mut high) = (low.max(0.0) as f32, high.min(dim - 1.0) as f32);
            if low == high {
                high += 0.001;
            }
            base.iter()
                .enumerate()
                .map(|(i, &extrapolation)| {
                    let interpolation = extrapolation / factor as f32;
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let keep = 1.0 - ramp;
                    interpolation * (1.0 - keep) + extrapolation * keep
                })
                .collect()
        }
    }
}

impl Rotary {
    /// Tables for positions `0..max_positions`.
    pub fn new(
        head_dim: usize,
        max_positions: usize,
        theta: f64,
        scaling: &RopeScaling,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv = inverse_frequencies(head_dim, theta, scaling);
        let half = inv.len();
        let attention_factor = scaling.attention_factor() as f32;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv {
                // transformers multiplies in f32; so do we.
                let angle = p as f32 * f;
                cos.push(angle.cos() * attention_factor);
                sin.push(angle.sin() * attention_factor);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?,
        })
    }

    /// `(cos, sin)` rows for `positions` (`u32 [n]`).
    pub fn at(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }

    /// Rotates `xs` (`[n, heads, head_dim]`) with per-row tables from [`Rotary::at`].
    pub fn apply(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope_thd(&xs.unsqueeze(0)?.contiguous()?, cos, sin)?.squeeze(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let base = inverse_frequencies(128, 500_000.0, &RopeScaling::None);
        let scaled = inverse_frequencies(128, 500_000.0, &scaling);
        assert_eq!(scaled[0], base[0], "highest frequency untouched");
        let last = base.len() - 1;
        assert!(
            (scaled[last] - base[last] / 8.0).abs() < 1e-12,
            "lowest frequency / factor"
        );
        // Some band in between is smoothed: strictly between the two.
        assert!(
            base.iter()
                .zip(&scaled)
                .any(|(b, s)| *s < *b && *s > *b / 8.0)
        );
    }

    #[test]
    fn yarn_frequencies_match_transformers() {
        // transformers 5.24 `ROPE_INIT_FUNCTIONS["yarn"]` for head_dim 16, theta 1e4,
        // factor 4, original 32 (defaults beta 32/1, truncate).
        let want = [
            1.0f32,
            0.197_642_36,
            0.025,
            0.007_905_695,
            0.0025,
            0.000_790_569_5,
            0.000_25,
            7.905_695e-5,
        ];
        let scaling = RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 32.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: 1.0,
            truncate: true,
        };
        let got = inverse_frequencies(16, 10_000.0, &scaling);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-6 * w.max(1e-3), "{got:?}");
        }
    }

    #[test]
    fn rotary_position_zero_is_identity() -> Result<()> {
        let rot = Rotary::new(8, 4, 10_000.0, &RopeScaling::None, DType::F32, &Device::Cpu)?;
        let xs = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((1, 2, 8))?;
        let (cos, sin) = rot.at(&Tensor::new(&[0u32], &Device::Cpu)?)?;
        let ys = Rotary::apply(&xs, &cos, &sin)?;
        assert_eq!(ys.to_vec3::<f32>()?, xs.to_vec3::<f32>()?);
        Ok(())
    }
}
