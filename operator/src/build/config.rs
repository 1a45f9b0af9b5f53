//! `worker.json`: the spec, translated into the worker contract.

use switchyard_proto::worker_config::{
    API_KEYS_DIR, AdmissionConfig, CONFIG_VERSION, MODEL_MOUNT, ModelConfig, PLACEMENT_DIR,
    PLACEMENT_FILE, PlacementConfig, PlacementStrategy, QuotaScopeConfig, ServingConfig,
    ShardsConfig, TierConfig, WorkerConfig,
};

use super::Names;
use crate::api::{
    Dtype, ModelDeployment, PlacementStrategyName, Priority, Quantization, QuotaScopeMode,
};

/// The worker configuration for `md`. Every number was bounded by the CRD schema, so the
/// conversions to unsigned types cannot fail for objects the API server accepted; a
/// negative value from elsewhere becomes 0 rather than a panic.
pub fn worker_config(md: &ModelDeployment, names: &Names) -> WorkerConfig {
    let spec = &md.spec;
    let model = &spec.model;
    let serving = &spec.serving;
    let admission = &spec.admission;
    WorkerConfig {
        version: CONFIG_VERSION,
        deployment: names.deployment.clone(),
        model: ModelConfig {
            // The volume is mounted there with the checkpoint directory as its subPath.
            path: MODEL_MOUNT.to_string(),
            dtype: match model.dtype {
                Dtype::Bf16 => "bf16",
                Dtype::F16 => "f16",
                Dtype::F32 => "f32",
            }
            .into(),
            quantization: match model.quantization {
                Quantization::Auto => "auto",
                Quantization::None => "none",
                Quantization::Int8 => "int8",
                Quantization::Int4 => "int4",
            }
            .into(),
            quantization_group_size: model.quantization_group_size.map(|g| g.0),
        },
        serving: ServingConfig {
            port: u16::try_from(serving.port).unwrap_or_default(),
            max_batch_size: unsigned(serving.max_batch_size),
            max_batch_tokens: unsigned(serving.max_batch_tokens),
            max_context_length: serving.max_context_length.map(unsigned),
            max_tokens_per_request: unsigned(serving.max_tokens_per_request),
            kv_cache_tokens: serving
                .kv_cache_tokens
                .map(|t| u64::try_from(t).unwrap_or_default()),
        },
        admission: AdmissionConfig {
            api_keys_dir: admission
                .api_key_secret
                .as_ref()
                .map(|_| API_KEYS_DIR.to_string()),
            tiers: admission
                .tiers
                .iter()
                .map(|t| TierConfig {
                    name: t.name.clone(),
                    priority: match t.priority {
                        Priority::Low => "low",
                        Priority::Normal => "normal",
                        Priority::High => "high",
                        Priority::Critical => "critical",
                    }
                    .into(),
                    weight: unsigned(t.weight),
                    requests_per_minute: t.requests_per_minute.map(unsigned64),
                    tokens_per_minute: t.tokens_per_minute.map(unsigned64),
                    cached_prompt_token_percent: t.cached_prompt_token_percent.map(unsigned),
                })
                .collect(),
            default_tier: admission.default_tier.clone(),
            max_queued: unsigned(admission.queue.max_queued),
            default_deadline_seconds: unsigned(admission.queue.default_deadline_seconds),
            quota_scope: Some(QuotaScopeConfig {
                mode: match admission.quota_scope.mode {
                    QuotaScopeMode::Split => "split",
                    QuotaScopeMode::Redis => "redis",
                }
                .into(),
                peers: format!("{}.{}.svc", names.frontend_peers, names.namespace),
                redis_address: admission
                    .quota_scope
                    .redis
                    .as_ref()
                    .map(|r| r.address.clone()),
                redis_key_prefix: admission
                    .quota_scope
                    .redis
                    .as_ref()
                    .map(|_| format!("switchyard/{}/{}/", names.namespace, names.deployment)),
            }),
        },
        shards: ShardsConfig {
            count: unsigned(spec.experts.shards),
            service: format!("{}.{}.svc", names.experts, names.namespace),
            pod_prefix: format!("{}-", names.experts),
            port: u16::try_from(serving.port).unwrap_or_default(),
        },
        placement: {
            let strategy = match spec.experts.placement.strategy {
                PlacementStrategyName::EvenSpread => PlacementStrategy::EvenSpread,
                PlacementStrategyName::Balanced => PlacementStrategy::Balanced,
            };
            // The balanced placement moves experts through its own file, re-read by the
            // running shards (the spare slots, `redundantExperts`, only change what the
            // operator plans, and a new shard count is a move): its revision, and so the
            // pods, change only with the strategy. The even spread's changes with the count.
            let revision = match strategy {
                PlacementStrategy::EvenSpread => format!("{strategy:?}/{}", spec.experts.shards),
                PlacementStrategy::Balanced => format!("{strategy:?}"),
            };
            PlacementConfig {
                strategy,
                revision: config_hash(&revision),
                file: (strategy == PlacementStrategy::Balanced)
                    .then(|| format!("{PLACEMENT_DIR}/{PLACEMENT_FILE}")),
            }
        },
    }
}

fn unsigned(v: i32) -> u32 {
    u32::try_from(v).unwrap_or_default()
}

fn unsigned64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or_default()
}

/// A short, stable digest (FNV-1a, 64 bits, hex) used to roll pods when their
/// configuration changes. Not a security boundary.
pub fn config_hash(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}
