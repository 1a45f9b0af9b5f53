//! `config.json` → [`ModelConfig`]: one validated description of the architecture, whatever
//! the family spelled its keys as.
//!
//! Each family keeps its own key names (`num_local_experts` for Mixtral, `num_experts` for
//! Qwen and OLMoE, `rope_parameters` in transformers v5 versus `rope_theta` + `rope_scaling`
//! before it). Everything is read into [`RawConfig`], a serde struct named after the
//! checkpoint's own keys, then checked and resolved here against the family's declaration
//! ([`super::family`]): which keys it reads, its defaults, its router. Nothing here or in
//! the model code matches on a family.

use std::path::Path;

use serde::Deserialize;

use super::ModelError;
pub use super::family::Family;
use super::family::{AttentionKind, Bias, RouterSpec, SharedExpert, SlidingWindow, SparseLayers};
use super::router::RouterRule;

/// How rotary position frequencies are computed.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (`"linear"`).
    Linear {
        /// Divisor of every frequency.
        factor: f64,
    },
    /// Llama 3.1's band-wise scaling (`"llama3"`).
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The pre-training context length.
        original_max_position_embeddings: f64,
    },
    /// YaRN (`"yarn"`): interpolate low frequencies, extrapolate high ones, with a linear
    /// ramp between (Qwen2.5/Qwen3 long-context configs, DeepSeek-V2/V3).
    Yarn {
        /// Context extension factor.
        factor: f64,
        /// The pre-training context length.
        original_max_position_embeddings: f64,
        /// Rotations above which frequencies are kept (default 32).
        beta_fast: f64,
        /// Rotations below which frequencies are interpolated (default 1).
        beta_slow: f64,
        /// Multiplier of cos and sin (given, or from `factor`, `mscale`, `mscale_all_dim`).
        attention_factor: f64,
        /// Round the ramp's ends to whole dimensions (default true).
        truncate: bool,
    },
}

impl RopeScaling {
    /// The factor cos and sin are multiplied by (YaRN's attention scaling; 1 otherwise).
    pub fn attention_factor(&self) -> f64 {
        match self {
            Self::Yarn {
                attention_factor, ..
            } => *attention_factor,
            _ => 1.0,
        }
    }
}

/// YaRN's attention-scale term: `0.1 · mscale · ln(scale) + 1` (1 when not extending).
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// The routed-expert part of a sparse model.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts chosen per token.
    pub top_k: usize,
    /// Hidden width of one routed expert.
    pub expert_intermediate_size: usize,
    /// Hidden width of the always-on shared expert, if the family has one.
    pub shared_expert_intermediate_size: Option<usize>,
    /// Per layer: whether it is an MoE layer (else a dense MLP of `intermediate_size`).
    pub sparse_layers: Vec<bool>,
    /// How experts are chosen and weighted.
    pub router: RouterRule,
}

/// Multi-head latent attention (DeepSeek-V2/V3) dimensions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaConfig {
    /// Rank of the query compression; `None` = a direct `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Rank of the key/value latent (what the KV cache stores, with the rope part).
    pub kv_lora_rank: usize,
    /// Per-head query/key width without rotary embedding.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key width with rotary embedding (shared across heads for keys).
    pub qk_rope_head_dim: usize,
    /// Per-head value width.
    pub v_head_dim: usize,
    /// Extra softmax scale factor (YaRN's `mscale_all_dim` term, squared), 1 without it.
    pub softmax_mscale: f64,
    /// The rotary dimensions are interleaved pairs (V2 always; V3 unless
    /// `rope_interleave: false`).
    pub rope_interleave: bool,
}

/// Everything the model code needs to know about an architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The family, from `model_type`.
    pub family: Family,
    /// Rows of the embedding and the LM head.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the dense MLPs (dense models, and dense layers of sparse ones).
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Longest context the model supports (capped by a sliding window when one applies).
    pub max_position_embeddings: usize,
    /// The LM head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// OLMoE clamps q, k and v to ±this.
    pub clip_qkv: Option<f64>,
    /// The attention's input projections have biases (q/k/v; MLA's `q_a_proj` and
    /// `kv_a_proj_with_mqa`), as the family declares and config.json may choose.
    pub qkv_bias: bool,
    /// `o_proj` has a bias.
    pub o_bias: bool,
    /// Present for MoE families.
    pub moe: Option<MoeConfig>,
    /// Present for DeepSeek's multi-head latent attention.
    pub mla: Option<MlaConfig>,
    /// `torch_dtype` / `dtype` as saved (informational; the weights' own dtypes rule).
    pub saved_dtype: Option<String>,
    /// `bos_token_id` from config.json.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` from config.json (one or several).
    pub eos_token_ids: Vec<u32>,
}

/// An integer or a list of integers, as `eos_token_id` is saved.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// `"eos_token_id": 2`
    One(u32),
    /// `"eos_token_id": [128001, 128009]`
    Many(Vec<u32>),
}

impl OneOrMany {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// `config.json` as the families write it: every key any supported family uses.
#[derive(Debug, Clone, Deserialize)]
pub struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    clip_qkv: Option<f64>,
    attention_bias: Option<bool>,
    qkv_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    hidden_act: Option<String>,
    // MoE
    num_local_experts: Option<usize>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    // DeepSeek
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    first_k_dense_replace: Option<usize>,
    moe_layer_freq: Option<usize>,
    topk_method: Option<String>,
    scoring_func: Option<String>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    routed_scaling_factor: Option<f64>,
    q_lora_rank: Option<usize>,
    kv_lora_rank: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    rope_interleave: Option<bool>,
    // Informational
    torch_dtype: Option<String>,
    dtype: Option<String>,
    bos_token_id: Option<OneOrMany>,
    eos_token_id: Option<OneOrMany>,
}

impl RawConfig {
    /// The count a family declares by key name (`model::family`), if saved.
    fn count(&self, key: &str) -> Option<usize> {
        match key {
            "num_local_experts" => self.num_local_experts,
            "num_experts" => self.num_experts,
            "n_routed_experts" => self.n_routed_experts,
            "intermediate_size" => self.intermediate_size,
            "moe_intermediate_size" => self.moe_intermediate_size,
            _ => None,
        }
    }

    /// The boolean a family declares by key name (`model::family`), if saved.
    fn flag(&self, key: &str) -> Option<bool> {
        match key {
            "attention_bias" => self.attention_bias,
            "qkv_bias" => self.qkv_bias,
            _ => None,
        }
    }

    fn bias(&self, rule: Bias) -> bool {
        match rule {
            Bias::Never => false,
            Bias::Always => true,
            Bias::Config { key, default } => self.flag(key).unwrap_or(default),
        }
    }
}

/// Reads and validates `<dir>/config.json`, or a GGUF file's metadata (see
/// [`super::gguf`]).
pub fn load(dir: &Path) -> Result<ModelConfig, ModelError> {
    if super::gguf::is_gguf(dir) {
        let json = super::gguf::GgufFile::open(dir)?.config_json()?;
        let raw: RawConfig = serde_json::from_value(json).map_err(|e| ModelError::Json {
            file: dir.to_path_buf(),
            message: format!("GGUF metadata: {e}"),
        })?;
        return resolve(dir, raw);
    }
    let file = dir.join("config.json");
    let text = std::fs::read_to_string(&file).map_err(|source| ModelError::Io {
        file: file.clone(),
        source,
    })?;
    let raw: RawConfig = serde_json::from_str(&text).map_err(|e| ModelError::Json {
        file: file.clone(),
        message: e.to_string(),
    })?;
    resolve(&file, raw)
}

struct Checker<'a> {
    file: &'a Path,
}

impl Checker<'_> {
    fn bad(&self, key: &str, expected: impl Into<String>) -> ModelError {
        ModelError::Config {
            file: self.file.to_path_buf(),
            key: key.to_string(),
            expected: expected.into(),
        }
    }

    /// [`Checker::required`], and at most `cap`: counts that size what is allocated before
    /// the weights are read, bounded far above any released model so that a corrupt or
    /// hostile config cannot ask for more memory than the machine has.
    fn at_most(&self, value: Option<usize>, key: &str, cap: usize) -> Result<usize, ModelError> {
        let v = self.required(value, key)?;
        if v > cap {
            return Err(self.bad(key, format!("a positive integer up to {cap} (got {v})")));
        }
        Ok(v)
    }

    fn required(&self, value: Option<usize>, key: &str) -> Result<usize, ModelError> {
        match value {
            Some(v) if v > 0 => Ok(v),
            Some(_) => Err(self.bad(key, "a positive integer")),
            None => Err(self.bad(key, "a positive integer (the key is missing)")),
        }
    }
}

/// The most memory the rotary tables may take (cos and sin, f32, every position).
pub const MAX_ROTARY_TABLE_BYTES: usize = 1 << 30;

/// Checks a parsed `config.json` and resolves family defaults; `file` names it in errors.
pub fn resolve(file: &Path, raw: RawConfig) -> Result<ModelConfig, ModelError> {
    let c = Checker { file };
    let model_type = raw
        .model_type
        .as_deref()
        .ok_or_else(|| c.bad("model_type", format!("one of: {}", Family::SUPPORTED)))?;
    let family = Family::from_model_type(model_type).ok_or_else(|| ModelError::Unsupported {
        file: file.to_path_buf(),
        what: format!(
            "model_type {model_type:?} (supported: {})",
            Family::SUPPORTED
        ),
    })?;
    if let Some(act) = raw.hidden_act.as_deref()
        && act != "silu"
    {
        return Err(c.bad("hidden_act", format!("\"silu\" (got {act:?})")));
    }
    let vocab_size = c.at_most(raw.vocab_size, "vocab_size", 1 << 24)?;
    let hidden_size = c.at_most(raw.hidden_size, "hidden_size", 1 << 20)?;
    let num_layers = c.at_most(raw.num_hidden_layers, "num_hidden_layers", 1 << 12)?;
    let num_heads = c.at_most(raw.num_attention_heads, "num_attention_heads", 1 << 12)?;
    let num_kv_heads = c.required(
        raw.num_key_value_heads.or(Some(num_heads)),
        "num_key_value_heads",
    )?;
    if num_heads % num_kv_heads != 0 {
        return Err(c.bad(
            "num_key_value_heads",
            format!("a divisor of num_attention_heads = {num_heads} (got {num_kv_heads})"),
        ));
    }
    let spec = family.spec();
    let latent = match spec.attention.kind {
        AttentionKind::Latent { always_interleaved } => Some(always_interleaved),
        AttentionKind::MultiHead => None,
    };
    let head_dim = match raw.head_dim {
        // MLA: rotary embeddings apply to the `qk_rope_head_dim` part only.
        _ if latent.is_some() => c.required(raw.qk_rope_head_dim, "qk_rope_head_dim")?,
        Some(d) => c.required(Some(d), "head_dim")?,
        None if hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => {
            return Err(c.bad(
                "head_dim",
                "present, since hidden_size is not a multiple of num_attention_heads",
            ));
        }
    };
    if head_dim % 2 != 0 {
        return Err(c.bad(
            "head_dim",
            format!("even, for rotary embeddings (got {head_dim})"),
        ));
    }
    let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
    if !(rms_norm_eps > 0.0 && rms_norm_eps.is_finite()) {
        return Err(c.bad("rms_norm_eps", "a positive number"));
    }
    let (rope_theta, rope_scaling) = resolve_rope(&c, &raw, raw.max_position_embeddings)?;
    let mut max_position_embeddings = c.required(
        raw.max_position_embeddings.or(Some(4096)),
        "max_position_embeddings",
    )?;
    // A sliding window only changes attention beyond its length; capping the context at the
    // window keeps the semantics exact without implementing windowed attention.
    let window_applies = match spec.sliding_window {
        SlidingWindow::WhenEnabled => {
            raw.use_sliding_window.unwrap_or(false)
                && raw.max_window_layers.is_none_or(|n| n < num_layers)
        }
        SlidingWindow::WhenSet => true,
    };
    if window_applies && let Some(window) = raw.sliding_window.filter(|w| *w > 0) {
        max_position_embeddings = max_position_embeddings.min(window);
    }
    // The rotary tables hold every position up front (f32 cos and sin, head_dim / 2 each):
    // bounded, so a corrupt or hostile config cannot ask for more memory than the machine
    // has. Every supported family's released models are well under it (Qwen2.5-1M: 512
    // MiB).
    let table_bytes = max_position_embeddings
        .saturating_mul(head_dim)
        .saturating_mul(4);
    if table_bytes > MAX_ROTARY_TABLE_BYTES {
        return Err(c.bad(
            "max_position_embeddings",
            format!(
                "at most {} for head_dim {head_dim} (got {max_position_embeddings}: its rotary \
                 tables would take {} MiB, over the {} MiB this engine allows)",
                MAX_ROTARY_TABLE_BYTES / head_dim / 4,
                table_bytes >> 20,
                MAX_ROTARY_TABLE_BYTES >> 20
            ),
        ));
    }
    let moe = resolve_moe(&c, &raw, family, num_layers)?;
    let mla = if let Some(always_interleaved) = latent {
        let rank = |v: Option<usize>, key: &str| c.required(v, key);
        // DeepSeek scales the softmax by YaRN's mscale(factor, mscale_all_dim), squared.
        let softmax_mscale = match (&rope_scaling, &raw.rope_parameters, &raw.rope_scaling) {
            (RopeScaling::Yarn { factor, .. }, p, s) => {
                let params = p.as_ref().filter(|v| !v.is_null()).or(s.as_ref());
                let all_dim = params
                    .and_then(|v| v.get("mscale_all_dim"))
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(0.0);
                if all_dim != 0.0 {
                    yarn_mscale(*factor, all_dim).powi(2)
                } else {
                    1.0
                }
            }
            _ => 1.0,
        };
        Some(MlaConfig {
            q_lora_rank: raw.q_lora_rank.filter(|r| *r > 0),
            kv_lora_rank: rank(raw.kv_lora_rank, "kv_lora_rank")?,
            qk_nope_head_dim: rank(raw.qk_nope_head_dim, "qk_nope_head_dim")?,
            qk_rope_head_dim: head_dim,
            v_head_dim: rank(raw.v_head_dim, "v_head_dim")?,
            softmax_mscale,
            rope_interleave: always_interleaved || raw.rope_interleave.unwrap_or(true),
        })
    } else {
        None
    };
    let intermediate_size = match (&moe, raw.intermediate_size) {
        (_, Some(n)) => c.required(Some(n), "intermediate_size")?,
        // An all-sparse model needs no dense width.
        (Some(moe), None) if moe.sparse_layers.iter().all(|s| *s) => 0,
        _ => c.required(None, "intermediate_size")?,
    };
    if let Some(clip) = raw.clip_qkv
        && (clip.is_nan() || clip <= 0.0)
    {
        return Err(c.bad("clip_qkv", "a positive number or null"));
    }
    Ok(ModelConfig {
        family,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        clip_qkv: raw.clip_qkv,
        qkv_bias: raw.bias(spec.attention.qkv_bias),
        o_bias: raw.bias(spec.attention.o_bias),
        moe,
        mla,
        saved_dtype: raw.dtype.or(raw.torch_dtype),
        bos_token_id: raw.bos_token_id.and_then(|b| b.to_vec().first().copied()),
        eos_token_ids: raw.eos_token_id.map(|e| e.to_vec()).unwrap_or_default(),
    })
}

fn resolve_rope(
    c: &Checker<'_>,
    raw: &RawConfig,
    max_position_embeddings: Option<usize>,
) -> Result<(f64, RopeScaling), ModelError> {
    // transformers v5 folds rope_theta and rope_scaling into one `rope_parameters` object.
    let (key, params) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(p), _) if !p.is_null() => ("rope_parameters", Some(p)),
        (_, Some(s)) if !s.is_null() => ("rope_scaling", Some(s)),
        _ => ("rope_scaling", None),
    };
    let field = |name: &str| {
        params
            .and_then(|p| p.get(name))
            .and_then(serde_json::Value::as_f64)
    };
    let theta = field("rope_theta").or(raw.rope_theta).unwrap_or(10_000.0);
    if !(theta > 0.0 && theta.is_finite()) {
        return Err(c.bad("rope_theta", "a positive number"));
    }
    let Some(params) = params else {
        return Ok((theta, RopeScaling::None));
    };
    let kind = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("default");
    let factor = || {
        field("factor")
            .filter(|f| *f > 0.0)
            .ok_or_else(|| c.bad(&format!("{key}.factor"), "a positive number"))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "llama3" => {
            let need = |name: &str| {
                field(name)
                    .filter(|v| *v > 0.0)
                    .ok_or_else(|| c.bad(&format!("{key}.{name}"), "a positive number"))
            };
            let (low, high) = (need("low_freq_factor")?, need("high_freq_factor")?);
            if high <= low {
                return Err(c.bad(
                    &format!("{key}.high_freq_factor"),
                    format!("greater than low_freq_factor = {low}"),
                ));
            }
            RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: need("original_max_position_embeddings")?,
            }
        }
        "yarn" => {
            let original = field("original_max_position_embeddings")
                .or(max_position_embeddings.map(|m| m as f64))
                .filter(|v| *v > 0.0)
                .ok_or_else(|| {
                    c.bad(
                        &format!("{key}.original_max_position_embeddings"),
                        "a positive number",
                    )
                })?;
            // transformers: a missing factor is max_position_embeddings / original.
            let factor = match field("factor") {
                Some(f) if f > 0.0 => f,
                Some(_) => return Err(c.bad(&format!("{key}.factor"), "a positive number")),
                None => max_position_embeddings.map_or(1.0, |m| m as f64 / original),
            };
            let positive_or =
                |name: &str, default: f64| field(name).filter(|v| *v != 0.0).unwrap_or(default);
            let attention_factor = match field("attention_factor") {
                Some(a) => a,
                None => {
                    let (m, m_all) = (field("mscale"), field("mscale_all_dim"));
                    match (m.filter(|v| *v != 0.0), m_all.filter(|v| *v != 0.0)) {
                        (Some(m), Some(m_all)) => {
                            yarn_mscale(factor, m) / yarn_mscale(factor, m_all)
                        }
                        _ => yarn_mscale(factor, 1.0),
                    }
                }
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: positive_or("beta_fast", 32.0),
                beta_slow: positive_or("beta_slow", 1.0),
                attention_factor,
                truncate: params
                    .get("truncate")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(true),
            }
        }
        other => {
            return Err(ModelError::Unsupported {
                file: c.file.to_path_buf(),
                what: format!("{key} type {other:?} (supported: default, linear, llama3, yarn)"),
            });
        }
    };
    Ok((theta, scaling))
}

fn resolve_moe(
    c: &Checker<'_>,
    raw: &RawConfig,
    family: Family,
    num_layers: usize,
) -> Result<Option<MoeConfig>, ModelError> {
    let Some(spec) = &family.spec().moe else {
        return Ok(None);
    };
    // Read every spelling the family declares: transformers v5 writes `num_local_experts`
    // for Qwen3-MoE (and Mixtral) but `num_experts` for Qwen2-MoE and OLMoE.
    let experts_key = spec.experts_keys[0];
    let num_experts = spec.experts_keys.iter().find_map(|k| raw.count(k));
    let num_experts = c.at_most(num_experts, experts_key, 1 << 16)?;
    let top_k = c.required(raw.num_experts_per_tok, "num_experts_per_tok")?;
    if top_k > num_experts {
        return Err(c.bad(
            "num_experts_per_tok",
            format!("at most {experts_key} = {num_experts} (got {top_k})"),
        ));
    }
    let expert_intermediate_size =
        c.required(raw.count(spec.expert_width_key), spec.expert_width_key)?;
    let shared_expert_intermediate_size = match spec.shared {
        SharedExpert::Gated { .. } => raw.shared_expert_intermediate_size.filter(|n| *n > 0),
        SharedExpert::AlwaysOn { .. } => raw
            .n_shared_experts
            .filter(|n| *n > 0)
            .map(|n| n * expert_intermediate_size),
        SharedExpert::None => None,
    };
    let router = resolve_router(c, raw, spec.router, num_experts)?;
    let sparse_layers = match spec.sparse_layers {
        SparseLayers::Step => {
            let step = raw.decoder_sparse_step.unwrap_or(1);
            if step == 0 {
                return Err(c.bad("decoder_sparse_step", "a positive integer"));
            }
            let dense = raw.mlp_only_layers.clone().unwrap_or_default();
            if let Some(bad) = dense.iter().find(|l| **l >= num_layers) {
                return Err(c.bad(
                    "mlp_only_layers",
                    format!("layer indices below num_hidden_layers = {num_layers} (got {bad})"),
                ));
            }
            (0..num_layers)
                .map(|l| !dense.contains(&l) && (l + 1) % step == 0)
                .collect()
        }
        SparseLayers::FirstDense => {
            let first_dense = raw.first_k_dense_replace.unwrap_or(0);
            let freq = raw.moe_layer_freq.unwrap_or(1);
            if freq == 0 {
                return Err(c.bad("moe_layer_freq", "a positive integer"));
            }
            (0..num_layers)
                .map(|l| l >= first_dense && l % freq == 0)
                .collect()
        }
        SparseLayers::All => vec![true; num_layers],
    };
    Ok(Some(MoeConfig {
        num_experts,
        top_k,
        expert_intermediate_size,
        shared_expert_intermediate_size,
        sparse_layers,
        router,
    }))
}

fn resolve_router(
    c: &Checker<'_>,
    raw: &RawConfig,
    spec: RouterSpec,
    num_experts: usize,
) -> Result<RouterRule, ModelError> {
    // transformers' defaults when a config omits them.
    let (default_scale, default_groups) = match spec {
        RouterSpec::Softmax { .. } => (1.0, None),
        RouterSpec::DeepSeek {
            routed_scaling_factor,
            groups,
            ..
        } => (routed_scaling_factor, groups),
    };
    let scale = raw.routed_scaling_factor.unwrap_or(default_scale) as f32;
    if !(scale > 0.0 && scale.is_finite()) {
        return Err(c.bad("routed_scaling_factor", "a positive number"));
    }
    let groups = || -> Result<(usize, usize), ModelError> {
        let n_group = c.required(raw.n_group.or(default_groups.map(|g| g.0)), "n_group")?;
        let topk_group =
            c.required(raw.topk_group.or(default_groups.map(|g| g.1)), "topk_group")?;
        if !num_experts.is_multiple_of(n_group) {
            return Err(c.bad(
                "n_group",
                format!("a divisor of the expert count {num_experts} (got {n_group})"),
            ));
        }
        if topk_group > n_group {
            return Err(c.bad(
                "topk_group",
                format!("at most n_group = {n_group} (got {topk_group})"),
            ));
        }
        Ok((n_group, topk_group))
    };
    // Saved configs may omit the method and scoring: default them from the family.
    let (default_method, default_scoring, default_norm) = match spec {
        RouterSpec::Softmax { always_renormalise } => {
            return Ok(RouterRule::Softmax {
                norm_topk_prob: always_renormalise || raw.norm_topk_prob.unwrap_or(false),
            });
        }
        RouterSpec::DeepSeek {
            method,
            scoring,
            norm_topk_prob,
            ..
        } => (method, scoring, norm_topk_prob),
    };
    let method = raw.topk_method.as_deref().unwrap_or(default_method);
    let scoring = raw.scoring_func.as_deref().unwrap_or(default_scoring);
    match (method, scoring) {
        ("greedy", "softmax") => Ok(RouterRule::DeepSeekV2 {
            routed_scaling_factor: scale,
            groups: None,
        }),
        ("group_limited_greedy", "softmax") => Ok(RouterRule::DeepSeekV2 {
            routed_scaling_factor: scale,
            groups: Some(groups()?),
        }),
        ("noaux_tc", "sigmoid") => {
            let (n_group, topk_group) = groups()?;
            Ok(RouterRule::DeepSeekV3 {
                norm_topk_prob: raw.norm_topk_prob.unwrap_or(default_norm),
                routed_scaling_factor: scale,
                n_group,
                topk_group,
            })
        }
        (m, s) => Err(ModelError::Unsupported {
            file: c.file.to_path_buf(),
            what: format!(
                "topk_method {m:?} with scoring_func {s:?} (supported: greedy or \
                 group_limited_greedy with softmax, noaux_tc with sigmoid)"
            ),
        }),
    }
}

impl ModelConfig {
    /// Query heads per key/value head.
    pub fn gqa_group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Parameters, counted from the shapes (routed experts included).
    pub fn parameter_count(&self) -> u64 {
        let (d, v) = (self.hidden_size as u64, self.vocab_size as u64);
        let mut total = v * d * if self.tie_word_embeddings { 1 } else { 2 };
        for layer in 0..self.num_layers {
            total += self.attention_parameters() + 2 * d;
            total += match &self.moe {
                Some(moe) if moe.sparse_layers[layer] => {
                    let n = moe.num_experts as u64;
                    let expert = 3 * d * moe.expert_intermediate_size as u64;
                    let shared =
                        moe.shared_expert_intermediate_size.map_or(0, |ff| {
                            // Qwen2-MoE gates its shared expert; DeepSeek's are always on.
                            let gated =
                                self.family.spec().moe.as_ref().is_some_and(|m| {
                                    matches!(m.shared, SharedExpert::Gated { .. })
                                });
                            3 * d * ff as u64 + if gated { d } else { 0 }
                        });
                    let bias = if moe.router.has_correction_bias() {
                        n
                    } else {
                        0
                    };
                    n * (expert + d) + shared + bias
                }
                _ => 3 * d * self.intermediate_size as u64,
            };
        }
        total
    }

    /// Parameters of one layer's attention: q, k, v and o for every head, or MLA's
    /// low-rank projections and their norms.
    fn attention_parameters(&self) -> u64 {
        let (d, h) = (self.hidden_size as u64, self.num_heads as u64);
        let Some(m) = &self.mla else {
            let hd = self.head_dim as u64;
            return d * hd * (2 * h + 2 * self.num_kv_heads as u64);
        };
        let (nope, rope, v) = (
            m.qk_nope_head_dim as u64,
            m.qk_rope_head_dim as u64,
            m.v_head_dim as u64,
        );
        let r = m.kv_lora_rank as u64;
        let q_out = h * (nope + rope);
        let q = match m.q_lora_rank {
            Some(ql) => d * ql as u64 + ql as u64 + ql as u64 * q_out,
            None => d * q_out,
        };
        q + d * (r + rope) + r + r * h * (nope + v) + h * v * d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> Result<ModelConfig, ModelError> {
        resolve(
            Path::new("config.json"),
            serde_json::from_value(json).expect("raw config"),
        )
    }

    fn base(model_type: &str) -> serde_json::Value {
        serde_json::json!({
            "model_type": model_type, "vocab_size": 100, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5
        })
    }

    #[test]
    fn dense_llama_defaults() {
        let c = parse(base("llama")).expect("valid");
        assert_eq!((c.head_dim, c.gqa_group(), c.rope_theta), (8, 2, 10_000.0));
        assert!(c.moe.is_none());
    }

    #[test]
    fn unknown_family_names_supported_ones() {
        let e = parse(base("gpt2")).expect_err("unsupported").to_string();
        assert!(e.contains("\"gpt2\"") && e.contains("mixtral"), "{e}");
    }

    /// Counts that size allocations before the weights are read are bounded, and the
    /// error names the key, the cap and the value.
    #[test]
    fn absurd_sizes_are_refused_before_anything_is_allocated() {
        for (key, value, cap) in [
            ("num_hidden_layers", 1u64 << 40, "4096"),
            ("vocab_size", 1 << 30, "16777216"),
            ("hidden_size", 1 << 21, "1048576"),
        ] {
            let mut j = base("llama");
            j[key] = value.into();
            let e = parse(j).expect_err(key).to_string();
            assert!(
                e.contains(key) && e.contains(cap) && e.contains(&value.to_string()),
                "{e}"
            );
        }
        // head_dim 8: 2^25 positions take 1 GiB of rotary tables; one more is refused.
        let mut j = base("llama");
        j["max_position_embeddings"] = (1u64 << 25).into();
        assert!(parse(j.clone()).is_ok());
        j["max_position_embeddings"] = ((1u64 << 25) + 1).into();
        let e = parse(j).expect_err("too long").to_string();
        assert!(
            e.contains("max_position_embeddings") && e.contains("rotary"),
            "{e}"
        );
    }

    #[test]
    fn missing_key_names_it() {
        let mut j = base("llama");
        j.as_object_mut().expect("object").remove("hidden_size");
        let e = parse(j).expect_err("missing").to_string();
        assert!(
            e.contains("hidden_size") && e.contains("config.json"),
            "{e}"
        );
    }

    #[test]
    fn qwen2_moe_sparse_layers_and_shared_expert() {
        let mut j = base("qwen2_moe");
        let o = j.as_object_mut().expect("object");
        o.insert("num_hidden_layers".into(), 4.into());
        o.insert("num_experts".into(), 8.into());
        o.insert("num_experts_per_tok".into(), 2.into());
        o.insert("moe_intermediate_size".into(), 16.into());
        o.insert("shared_expert_intermediate_size".into(), 32.into());
        o.insert("decoder_sparse_step".into(), 2.into());
        o.insert("mlp_only_layers".into(), serde_json::json!([3]));
        let c = parse(j).expect("valid");
        let moe = c.moe.expect("moe");
        assert_eq!(moe.sparse_layers, vec![false, true, false, false]);
        assert_eq!(moe.shared_expert_intermediate_size, Some(32));
        assert_eq!(
            moe.router,
            RouterRule::Softmax {
                norm_topk_prob: false
            }
        );
    }

    #[test]
    fn mixtral_always_renormalises() {
        let mut j = base("mixtral");
        let o = j.as_object_mut().expect("object");
        o.insert("num_local_experts".into(), 4.into());
        o.insert("num_experts_per_tok".into(), 2.into());
        let mut j2 = j.clone();
        j2["norm_topk_prob"] = false.into();
        for j in [j, j2] {
            let moe = parse(j).expect("valid").moe.expect("moe");
            assert_eq!(
                moe.router,
                RouterRule::Softmax {
                    norm_topk_prob: true
                }
            );
            assert_eq!(moe.expert_intermediate_size, 64);
        }
    }

    #[test]
    fn top_k_above_experts_is_rejected() {
        let mut j = base("olmoe");
        let o = j.as_object_mut().expect("object");
        o.insert("num_experts".into(), 4.into());
        o.insert("num_experts_per_tok".into(), 5.into());
        let e = parse(j).expect_err("bad top-k").to_string();
        assert!(
            e.contains("num_experts_per_tok") && e.contains("at most"),
            "{e}"
        );
    }

    #[test]
    fn rope_parameters_v5_and_llama3_scaling() {
        let mut j = base("llama");
        j.as_object_mut().expect("object").insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}),
        );
        let c = parse(j).expect("valid");
        assert_eq!(c.rope_theta, 500_000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn yarn_defaults_and_attention_factor_follow_transformers() {
        let mut j = base("qwen2");
        j.as_object_mut().expect("object").insert(
            "rope_scaling".into(),
            serde_json::json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
        );
        let c = parse(j).expect("valid");
        // transformers 5.24: attention_factor = 0.1·ln(4) + 1 with no mscale given.
        assert!((c.rope_scaling.attention_factor() - 1.138_629_436_111_989).abs() < 1e-12);
        assert!(
            matches!(c.rope_scaling, RopeScaling::Yarn { beta_fast, beta_slow, truncate: true, .. }
            if beta_fast == 32.0 && beta_slow == 1.0)
        );
        let mut j = base("qwen2");
        j.as_object_mut().expect("object").insert(
            "rope_scaling".into(),
            serde_json::json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                "mscale": 1.0, "mscale_all_dim": 0.8}),
        );
        let c = parse(j).expect("valid");
        assert!((c.rope_scaling.attention_factor() - 1.024_957_960_796_966_8).abs() < 1e-12);
    }

    fn deepseek(model_type: &str) -> serde_json::Value {
        serde_json::json!({
            "model_type": model_type, "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 96, "moe_intermediate_size": 24, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
            "n_shared_experts": 2, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
            "moe_layer_freq": 1, "kv_lora_rank": 16, "q_lora_rank": null,
            "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
            "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5
        })
    }

    #[test]
    fn deepseek_defaults_come_from_the_family() {
        let c = parse(deepseek("deepseek_v3")).expect("valid");
        let moe = c.moe.expect("moe");
        assert_eq!(moe.sparse_layers, vec![false, true, true, true]);
        assert_eq!(moe.shared_expert_intermediate_size, Some(48));
        assert!(matches!(
            moe.router,
            RouterRule::DeepSeekV3 {
                n_group: 4,
                topk_group: 2,
                norm_topk_prob: true,
                ..
            }
        ));
        let mla = c.mla.expect("mla");
        assert_eq!(
            (mla.q_lora_rank, mla.kv_lora_rank, c.head_dim),
            (None, 16, 4)
        );
        assert!(mla.rope_interleave);
        let c = parse(deepseek("deepseek_v2")).expect("valid");
        assert!(matches!(
            c.moe.expect("moe").router,
            RouterRule::DeepSeekV2 { groups: None, .. }
        ));
    }

    /// The published totals: DeepSeek-V2-Lite 15.7 B, V3 671 B (without its MTP layer).
    #[test]
    fn deepseek_parameter_counts_match_the_published_totals() {
        let lite = parse(serde_json::json!({
            "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048,
            "intermediate_size": 10944, "moe_intermediate_size": 1408,
            "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
            "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
            "first_k_dense_replace": 1, "kv_lora_rank": 512, "q_lora_rank": null,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "topk_method": "greedy", "n_group": 1, "topk_group": 1
        }))
        .expect("V2-Lite");
        let v3 = parse(serde_json::json!({
            "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
            "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
            "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
            "first_k_dense_replace": 3, "kv_lora_rank": 512, "q_lora_rank": 1536,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "n_group": 8, "topk_group": 4
        }))
        .expect("V3");
        for (c, published) in [(lite, 15.7e9), (v3, 671e9)] {
            let n = c.parameter_count() as f64;
            assert!((n / published - 1.0).abs() < 0.005, "{n} vs {published}");
        }
    }

    #[test]
    fn deepseek_routing_settings_are_checked() {
        let mut j = deepseek("deepseek_v2");
        j["topk_method"] = "group_limited_greedy".into();
        j["n_group"] = 3.into();
        let e = parse(j).expect_err("8 experts in 3 groups").to_string();
        assert!(e.contains("n_group") && e.contains("divisor"), "{e}");
        let mut j = deepseek("deepseek_v3");
        j["scoring_func"] = "softmax".into();
        let e = parse(j).expect_err("v3 with softmax").to_string();
        assert!(e.contains("noaux_tc") && e.contains("softmax"), "{e}");
    }

    #[test]
    fn unsupported_rope_type_is_named() {
        let mut j = base("qwen2");
        j.as_object_mut().expect("object").insert(
            "rope_scaling".into(),
            serde_json::json!({"type": "dynamic", "factor": 2.0}),
        );
        let e = parse(j).expect_err("unsupported").to_string();
        assert!(
            e.contains("\"dynamic\"") && e.contains("rope_scaling"),
            "{e}"
        );
    }

    #[test]
    fn sliding_window_caps_the_context() {
        let mut j = base("mixtral");
        let o = j.as_object_mut().expect("object");
        o.insert("num_local_experts".into(), 4.into());
        o.insert("num_experts_per_tok".into(), 2.into());
        o.insert("max_position_embeddings".into(), 32768.into());
        o.insert("sliding_window".into(), 4096.into());
        assert_eq!(parse(j).expect("valid").max_position_embeddings, 4096);
    }
}
