//! Every supported family, declared once: how it attends, where it normalises queries and
//! keys, which biases its checkpoints must hold, what its tensors are called, how its routed
//! experts may be stored, its shared expert and its router rule.
//!
//! ```text
//!  config.json ─ model_type ─> Family ─ spec() ─> FamilySpec ─┬─> config::resolve (keys, defaults)
//!                                                             └─> loaders (tensor names, kinds)
//! ```
//!
//! The rest of `model/` reads these declarations; it never matches on a family and never
//! infers a kind from what a checkpoint happens to contain. A tensor a family requires and
//! the checkpoint lacks is a load error that names it; a bias the family does not declare is
//! refused rather than ignored.

/// Architectures this engine runs, by `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Dense Llama (1–3.x), incl. `llama3` rope scaling.
    Llama,
    /// Dense Qwen2 / Qwen2.5 (q/k/v biases).
    Qwen2,
    /// Dense Qwen3 (per-head q/k RMSNorm).
    Qwen3,
    /// Mixtral: softmax top-k, always renormalised.
    Mixtral,
    /// Qwen1.5/2-MoE: shared expert behind a sigmoid gate.
    Qwen2Moe,
    /// Qwen3-MoE: per-head q/k norm, no shared expert.
    Qwen3Moe,
    /// OLMoE: q/k norm over the whole projection.
    Olmoe,
    /// DeepSeek-V2 / V2-Lite: MLA, softmax router (greedy or group-limited), shared experts.
    DeepseekV2,
    /// DeepSeek-V3 / R1: MLA, sigmoid router with correction bias and groups.
    DeepseekV3,
}

impl Family {
    /// Every supported family.
    pub const ALL: [Family; 9] = [
        Self::Llama,
        Self::Qwen2,
        Self::Qwen3,
        Self::Mixtral,
        Self::Qwen2Moe,
        Self::Qwen3Moe,
        Self::Olmoe,
        Self::DeepseekV2,
        Self::DeepseekV3,
    ];

    /// Every supported `model_type`, for error messages.
    pub const SUPPORTED: &'static str =
        "llama, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3";

    /// The family whose `model_type` this is.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.model_type() == model_type)
    }

    /// The `model_type` string.
    pub fn model_type(self) -> &'static str {
        self.spec().model_type
    }

    /// The family's declaration.
    pub fn spec(self) -> &'static FamilySpec {
        match self {
            Self::Llama => &LLAMA,
            Self::Qwen2 => &QWEN2,
            Self::Qwen3 => &QWEN3,
            Self::Mixtral => &MIXTRAL,
            Self::Qwen2Moe => &QWEN2_MOE,
            Self::Qwen3Moe => &QWEN3_MOE,
            Self::Olmoe => &OLMOE,
            Self::DeepseekV2 => &DEEPSEEK_V2,
            Self::DeepseekV3 => &DEEPSEEK_V3,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// What a family is: everything the config resolver and the loaders need to know about it.
#[derive(Debug)]
pub struct FamilySpec {
    /// `config.json`'s `model_type`.
    pub model_type: &'static str,
    /// Self-attention.
    pub attention: AttentionSpec,
    /// When `sliding_window` applies.
    pub sliding_window: SlidingWindow,
    /// The routed experts, for sparse families.
    pub moe: Option<MoeSpec>,
}

/// How a family attends.
#[derive(Debug)]
pub struct AttentionSpec {
    /// Multi-head (with GQA) or DeepSeek's latent attention.
    pub kind: AttentionKind,
    /// Where queries and keys are RMS-normalised.
    pub qk_norm: QkNorm,
    /// Biases of the input projections: `q/k/v_proj`, or MLA's `q_a_proj` and
    /// `kv_a_proj_with_mqa` (MLA's `q_proj`, `q_b_proj` and `kv_b_proj` never have one).
    pub qkv_bias: Bias,
    /// Bias of `o_proj`.
    pub o_bias: Bias,
}

/// The attention mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    /// `q/k/v/o_proj`, one key/value head per `num_attention_heads / num_key_value_heads`
    /// query heads.
    MultiHead,
    /// Multi-head latent attention (`model::mla`).
    Latent {
        /// The rotary part is always stored as interleaved pairs (V2); otherwise
        /// `rope_interleave` says, defaulting to true (V3).
        always_interleaved: bool,
    },
}

/// Where a family applies RMSNorm to queries and keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// No q/k norm.
    None,
    /// `q_norm`/`k_norm` of `head_dim`, applied to each head (Qwen3).
    PerHead,
    /// `q_norm`/`k_norm` over the whole projection, `heads · head_dim` (OLMoE).
    Full,
}

/// Whether a projection has a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bias {
    /// Never.
    Never,
    /// Always (Qwen2's q/k/v).
    Always,
    /// As the boolean `config.json` key says, `default` when it is absent.
    Config {
        /// The key (`attention_bias`, `qkv_bias`).
        key: &'static str,
        /// Its value when absent.
        default: bool,
    },
}

/// When a configured `sliding_window` limits attention (and so the context we serve).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlidingWindow {
    /// Whenever `sliding_window` is set (Mistral-style).
    WhenSet,
    /// Only with `use_sliding_window: true` and some layer at or above `max_window_layers`
    /// (Qwen).
    WhenEnabled,
}

/// The routed-expert part of a sparse family.
#[derive(Debug)]
pub struct MoeSpec {
    /// Keys the expert count may be saved under, the canonical one first (named in errors).
    pub experts_keys: &'static [&'static str],
    /// The key of one routed expert's hidden width.
    pub expert_width_key: &'static str,
    /// How the checkpoint may store a layer's MoE block, in order of preference: the first
    /// whose marker tensor exists is read.
    pub layouts: &'static [MoeLayout],
    /// The always-on shared expert.
    pub shared: SharedExpert,
    /// Which layers are sparse.
    pub sparse_layers: SparseLayers,
    /// How tokens are routed.
    pub router: RouterSpec,
}

/// Where a layer's MoE block lives and how its routed experts are stored.
#[derive(Debug)]
pub struct MoeLayout {
    /// The block's name under `model.layers.<l>` (router `gate`, `experts`, shared expert).
    pub block: &'static str,
    /// The routed experts' storage.
    pub experts: ExpertStorage,
}

/// How routed experts are stored under `<block>.experts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertStorage {
    /// One MLP per expert, `experts.<e>.<names>.weight`.
    PerExpert(MlpNames),
    /// transformers v5: `experts.gate_up_proj` `[E, 2·ff, d]` (gate rows first) and
    /// `experts.down_proj` `[E, d, ff]`.
    Fused,
}

impl MoeLayout {
    /// The tensor whose presence says a checkpoint uses this layout, under the layer prefix.
    pub fn marker(&self) -> String {
        match self.experts {
            ExpertStorage::PerExpert(names) => {
                format!("{}.experts.0.{}.weight", self.block, names.gate)
            }
            ExpertStorage::Fused => format!("{}.experts.gate_up_proj", self.block),
        }
    }
}

/// The names of a SwiGLU MLP's three matrices under its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlpNames {
    /// The gate (its output goes through SiLU).
    pub gate: &'static str,
    /// The up projection.
    pub up: &'static str,
    /// The down projection.
    pub down: &'static str,
}

/// `gate_proj`, `up_proj`, `down_proj`: every dense MLP and most experts.
pub const SWIGLU: MlpNames = MlpNames {
    gate: "gate_proj",
    up: "up_proj",
    down: "down_proj",
};

/// Mixtral's classic expert names: `w1` (gate), `w3` (up), `w2` (down).
pub const MIXTRAL_EXPERT: MlpNames = MlpNames {
    gate: "w1",
    up: "w3",
    down: "w2",
};

/// The dense MLP of every family, `model.layers.<l>.mlp`.
pub const DENSE_MLP: &str = "mlp";

/// A sparse family's shared expert, run on every token beside the routed ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedExpert {
    /// None.
    None,
    /// Qwen2-MoE: `<block>.<mlp>` of `shared_expert_intermediate_size` (none when 0),
    /// scaled by `sigmoid(<block>.<gate>(x))`.
    Gated {
        /// The MLP's name.
        mlp: &'static str,
        /// The `[1, d]` gate's name.
        gate: &'static str,
    },
    /// DeepSeek: `n_shared_experts` experts fused into one always-on MLP `<block>.<mlp>`
    /// of `n_shared_experts · moe_intermediate_size`, no gate.
    AlwaysOn {
        /// The MLP's name.
        mlp: &'static str,
    },
}

/// Which layers of a sparse family are MoE layers (the others have a dense MLP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparseLayers {
    /// Every layer.
    All,
    /// Qwen: every `decoder_sparse_step`-th layer (1-based), except `mlp_only_layers`.
    Step,
    /// DeepSeek: from `first_k_dense_replace` on, every `moe_layer_freq`-th.
    FirstDense,
}

/// A family's router, with transformers' defaults for the keys a config may omit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RouterSpec {
    /// Softmax top-k (Mixtral, Qwen-MoE, OLMoE).
    Softmax {
        /// Renormalise the top-k weights whatever `norm_topk_prob` says (Mixtral).
        always_renormalise: bool,
    },
    /// DeepSeek: `topk_method` × `scoring_func` choose the rule (see `model::router`).
    DeepSeek {
        /// `topk_method` when absent.
        method: &'static str,
        /// `scoring_func` when absent.
        scoring: &'static str,
        /// `norm_topk_prob` when absent.
        norm_topk_prob: bool,
        /// `routed_scaling_factor` when absent.
        routed_scaling_factor: f64,
        /// `(n_group, topk_group)` when absent, if the family has defaults.
        groups: Option<(usize, usize)>,
    },
}

/// The name, under `<block>.gate`, of the per-expert selection bias of DeepSeek-V3's
/// `noaux_tc` rule.
pub const CORRECTION_BIAS: &str = "e_score_correction_bias";

const MHA_PLAIN: AttentionSpec = AttentionSpec {
    kind: AttentionKind::MultiHead,
    qk_norm: QkNorm::None,
    qkv_bias: Bias::Config {
        key: "attention_bias",
        default: false,
    },
    o_bias: Bias::Config {
        key: "attention_bias",
        default: false,
    },
};

const MOE_MLP: &[MoeLayout] = &[
    MoeLayout {
        block: "mlp",
        experts: ExpertStorage::PerExpert(SWIGLU),
    },
    MoeLayout {
        block: "mlp",
        experts: ExpertStorage::Fused,
    },
];

const QWEN_MOE_EXPERTS: &[&str] = &["num_experts", "num_local_experts"];

/// Llama: the plain architecture every other family starts from.
pub const LLAMA: FamilySpec = FamilySpec {
    model_type: "llama",
    attention: MHA_PLAIN,
    sliding_window: SlidingWindow::WhenSet,
    moe: None,
};

/// Qwen2: biases on q, k and v (never on o), always.
pub const QWEN2: FamilySpec = FamilySpec {
    model_type: "qwen2",
    attention: AttentionSpec {
        kind: AttentionKind::MultiHead,
        qk_norm: QkNorm::None,
        qkv_bias: Bias::Always,
        o_bias: Bias::Never,
    },
    sliding_window: SlidingWindow::WhenEnabled,
    moe: None,
};

/// Qwen3: per-head q/k norm.
pub const QWEN3: FamilySpec = FamilySpec {
    model_type: "qwen3",
    attention: AttentionSpec {
        qk_norm: QkNorm::PerHead,
        ..MHA_PLAIN
    },
    sliding_window: SlidingWindow::WhenEnabled,
    moe: None,
};

/// Mixtral: classic `block_sparse_moe` with `w1/w3/w2` experts, or transformers v5's
/// `mlp` with fused experts.
pub const MIXTRAL: FamilySpec = FamilySpec {
    model_type: "mixtral",
    attention: AttentionSpec {
        qkv_bias: Bias::Never,
        o_bias: Bias::Never,
        ..MHA_PLAIN
    },
    sliding_window: SlidingWindow::WhenSet,
    moe: Some(MoeSpec {
        experts_keys: &["num_local_experts", "num_experts"],
        expert_width_key: "intermediate_size",
        layouts: &[
            MoeLayout {
                block: "block_sparse_moe",
                experts: ExpertStorage::PerExpert(MIXTRAL_EXPERT),
            },
            MoeLayout {
                block: "mlp",
                experts: ExpertStorage::Fused,
            },
        ],
        shared: SharedExpert::None,
        sparse_layers: SparseLayers::All,
        router: RouterSpec::Softmax {
            always_renormalise: true,
        },
    }),
};

/// Qwen1.5/2-MoE: Qwen2's q/k/v biases (`qkv_bias` in transformers v5), a gated shared
/// expert.
pub const QWEN2_MOE: FamilySpec = FamilySpec {
    model_type: "qwen2_moe",
    attention: AttentionSpec {
        kind: AttentionKind::MultiHead,
        qk_norm: QkNorm::None,
        qkv_bias: Bias::Config {
            key: "qkv_bias",
            default: true,
        },
        o_bias: Bias::Never,
    },
    sliding_window: SlidingWindow::WhenEnabled,
    moe: Some(MoeSpec {
        experts_keys: QWEN_MOE_EXPERTS,
        expert_width_key: "moe_intermediate_size",
        layouts: MOE_MLP,
        shared: SharedExpert::Gated {
            mlp: "shared_expert",
            gate: "shared_expert_gate",
        },
        sparse_layers: SparseLayers::Step,
        router: RouterSpec::Softmax {
            always_renormalise: false,
        },
    }),
};

/// Qwen3-MoE: Qwen3's per-head q/k norm, no shared expert.
pub const QWEN3_MOE: FamilySpec = FamilySpec {
    model_type: "qwen3_moe",
    attention: AttentionSpec {
        qk_norm: QkNorm::PerHead,
        ..MHA_PLAIN
    },
    sliding_window: SlidingWindow::WhenEnabled,
    moe: Some(MoeSpec {
        experts_keys: QWEN_MOE_EXPERTS,
        expert_width_key: "moe_intermediate_size",
        layouts: MOE_MLP,
        shared: SharedExpert::None,
        sparse_layers: SparseLayers::Step,
        router: RouterSpec::Softmax {
            always_renormalise: false,
        },
    }),
};

/// OLMoE: q/k norm over the whole projection; experts as wide as `intermediate_size`.
pub const OLMOE: FamilySpec = FamilySpec {
    model_type: "olmoe",
    attention: AttentionSpec {
        qk_norm: QkNorm::Full,
        ..MHA_PLAIN
    },
    sliding_window: SlidingWindow::WhenSet,
    moe: Some(MoeSpec {
        experts_keys: QWEN_MOE_EXPERTS,
        expert_width_key: "intermediate_size",
        layouts: MOE_MLP,
        shared: SharedExpert::None,
        sparse_layers: SparseLayers::All,
        router: RouterSpec::Softmax {
            always_renormalise: false,
        },
    }),
};

const DEEPSEEK_MOE: MoeSpec = MoeSpec {
    experts_keys: &["n_routed_experts"],
    expert_width_key: "moe_intermediate_size",
    layouts: MOE_MLP,
    shared: SharedExpert::AlwaysOn {
        mlp: "shared_experts",
    },
    sparse_layers: SparseLayers::FirstDense,
    router: RouterSpec::DeepSeek {
        method: "greedy",
        scoring: "softmax",
        norm_topk_prob: false,
        routed_scaling_factor: 1.0,
        groups: None,
    },
};

/// DeepSeek-V2: MLA with interleaved rotary pairs, softmax router (`greedy` by default).
pub const DEEPSEEK_V2: FamilySpec = FamilySpec {
    model_type: "deepseek_v2",
    attention: AttentionSpec {
        kind: AttentionKind::Latent {
            always_interleaved: true,
        },
        ..MHA_PLAIN
    },
    sliding_window: SlidingWindow::WhenSet,
    moe: Some(DEEPSEEK_MOE),
};

/// DeepSeek-V3: MLA, sigmoid router with correction bias (`noaux_tc`), 8 groups keep 4,
/// weights × 2.5, all by default.
pub const DEEPSEEK_V3: FamilySpec = FamilySpec {
    model_type: "deepseek_v3",
    attention: AttentionSpec {
        kind: AttentionKind::Latent {
            always_interleaved: false,
        },
        ..MHA_PLAIN
    },
    sliding_window: SlidingWindow::WhenSet,
    moe: Some(MoeSpec {
        router: RouterSpec::DeepSeek {
            method: "noaux_tc",
            scoring: "sigmoid",
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
            groups: Some((8, 4)),
        },
        ..DEEPSEEK_MOE
    }),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_types_round_trip_and_are_all_listed() {
        for family in Family::ALL {
            assert_eq!(Family::from_model_type(family.model_type()), Some(family));
            assert!(Family::SUPPORTED.contains(family.model_type()), "{family}");
        }
        assert_eq!(Family::from_model_type("gpt2"), None);
    }

    #[test]
    fn every_sparse_family_can_read_fused_experts() {
        for family in Family::ALL {
            if let Some(moe) = &family.spec().moe {
                assert!(
                    moe.layouts
                        .iter()
                        .any(|l| l.experts == ExpertStorage::Fused),
                    "{family}"
                );
            }
        }
    }
}
