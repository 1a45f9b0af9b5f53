//! The worker contract: the configuration file the operator mounts into every worker pod.
//!
//! ```text
//!   ModelDeployment ──operator──> ConfigMap <name>-config, key `worker.json`
//!                                   └─ mounted at /etc/switchyard/worker.json (both roles)
//!   pod-specific facts come from the downward API, not the file:
//!     SWITCHYARD_POD_NAME, SWITCHYARD_POD_NAMESPACE, SWITCHYARD_POD_IP,
//!     SWITCHYARD_SHARD_INDEX (expert shards: the StatefulSet pod index)
//! ```
//!
//! One definition, compiled into both the operator (which writes it) and the worker (which
//! reads it). The file is JSON; unknown fields are refused so a version skew between
//! operator and worker fails loudly at start-up instead of silently ignoring a setting.

use serde::{Deserialize, Serialize};

/// Directory the config file is mounted in.
pub const CONFIG_DIR: &str = "/etc/switchyard";
/// Key in the ConfigMap and file name in [`CONFIG_DIR`].
pub const CONFIG_FILE: &str = "worker.json";
/// Where an expert shard finds the balanced placement's file (a ConfigMap the operator
/// rewrites).
pub const PLACEMENT_DIR: &str = "/etc/switchyard/placement";
/// The balanced placement file's name in [`PLACEMENT_DIR`] (and its ConfigMap key).
pub const PLACEMENT_FILE: &str = "placement.json";
/// Where the model volume is mounted in both roles.
pub const MODEL_MOUNT: &str = "/models";
/// Where the API-key Secret is mounted on frontends.
pub const API_KEYS_DIR: &str = "/etc/switchyard/api-keys";
/// Where the `kubernetes.io/tls` Secret of `spec.tls` is mounted on frontends
/// (`tls.crt`, `tls.key`).
pub const TLS_DIR: &str = "/etc/switchyard/tls";
/// Downward API: the pod's name.
pub const ENV_POD_NAME: &str = "SWITCHYARD_POD_NAME";
/// Downward API: the pod's namespace.
pub const ENV_POD_NAMESPACE: &str = "SWITCHYARD_POD_NAMESPACE";
/// Downward API: the pod's IP.
pub const ENV_POD_IP: &str = "SWITCHYARD_POD_IP";
/// Expert shards only: the StatefulSet pod index, which is the shard index.
pub const ENV_SHARD_INDEX: &str = "SWITCHYARD_SHARD_INDEX";
/// The only version of the file format so far.
pub const CONFIG_VERSION: u32 = 1;

/// Everything a worker needs to know that is the same for all pods of a deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerConfig {
    /// Format version, [`CONFIG_VERSION`].
    pub version: u32,
    /// Name of the ModelDeployment.
    pub deployment: String,
    /// The checkpoint.
    pub model: ModelConfig,
    /// Engine limits.
    pub serving: ServingConfig,
    /// Admission control (frontends).
    pub admission: AdmissionConfig,
    /// Where the expert shards are.
    pub shards: ShardsConfig,
    /// Which shard holds which experts.
    pub placement: PlacementConfig,
}

impl WorkerConfig {
    /// The parts of the file an expert shard reads (the worker's `ShardSettings`): the
    /// version, the deployment (the model id), the checkpoint, the shard count and the
    /// placement. The operator rolls shards only when this changes, so a frontend-only
    /// change (a tier quota, a serving limit) does not restart them and reload their
    /// weights. With the balanced placement the shard count is left out: the placement
    /// file decides what each running shard holds, and the operator moves experts through
    /// it when the count changes, rolling no shard.
    pub fn shard_contract(&self) -> serde_json::Value {
        let count = match self.placement.strategy {
            PlacementStrategy::EvenSpread => Some(self.shards.count),
            PlacementStrategy::Balanced => None,
        };
        serde_json::json!({
            "version": self.version,
            "deployment": self.deployment,
            "model": self.model,
            "shardCount": count,
            "placement": self.placement,
        })
    }

    /// What a frontend reads: all of the file but the shard count, of which it reads only
    /// whether there are shards (it finds them through `shards.service` and asks each
    /// what it holds), and the placement's revision (which follows the count). The
    /// operator rolls frontends only when this changes, so a change of the shard count
    /// restarts no frontend.
    pub fn frontend_contract(&self) -> serde_json::Value {
        let mut file = self.clone();
        file.shards.count = file.shards.count.min(1);
        file.placement.revision.clear();
        serde_json::to_value(file).unwrap_or_default()
    }
}

/// The checkpoint and how to load it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelConfig {
    /// Directory holding `config.json`, `*.safetensors` and `tokenizer.json`.
    pub path: String,
    /// `bf16`, `f16` or `f32`.
    pub dtype: String,
    /// `none` or `int4`.
    pub quantization: String,
    /// Weights per INT4 group; set exactly when `quantization` is `int4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_group_size: Option<u32>,
}

/// Engine limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServingConfig {
    /// gRPC port of both roles.
    pub port: u16,
    /// Most sequences decoded together.
    pub max_batch_size: u32,
    /// Most tokens in one forward step.
    pub max_batch_tokens: u32,
    /// Unset: the model's own context length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_context_length: Option<u32>,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_per_request: u32,
    /// Unset: what fits in memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_tokens: Option<u64>,
}

/// Admission control on frontends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Directory of the mounted API-key Secret; unset: no authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys_dir: Option<String>,
    #[serde(default)]
    /// Service tiers.
    pub tiers: Vec<TierConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Tier of callers the key file does not place.
    pub default_tier: Option<String>,
    /// Most requests waiting per frontend.
    pub max_queued: u32,
    /// Deadline for requests that set none.
    pub default_deadline_seconds: u32,
    /// How tier quotas hold across frontends; unset: each frontend enforces every quota in
    /// full by itself (one frontend, `switchyard serve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_scope: Option<QuotaScopeConfig>,
}

/// How a tenant's quota holds when several frontends serve it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuotaScopeConfig {
    /// `split`: each frontend enforces quota ÷ live frontends (counted through `peers`);
    /// `redis`: one exact counter per tenant in Redis at `redis_address`, shared by all.
    pub mode: String,
    /// DNS name whose addresses are the ready frontends (a headless Service): how a
    /// frontend counts its peers (both modes; `redis` falls back to `split` when Redis
    /// does not answer). Several names or addresses may be given, separated by commas;
    /// each is resolved and the distinct addresses are counted (with the pod's own,
    /// `SWITCHYARD_POD_IP`), so `127.0.0.1,127.0.0.2,127.0.0.3` counts three.
    pub peers: String,
    /// `host:port` of Redis (`redis` mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_address: Option<String>,
    /// Prefix of every key this deployment writes in Redis (`redis` mode):
    /// `switchyard/<namespace>/<deployment>/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_key_prefix: Option<String>,
}

/// One service tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierConfig {
    /// Tier name.
    pub name: String,
    /// `low`, `normal`, `high` or `critical`.
    pub priority: String,
    /// Share within its priority band.
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Request quota per tenant; unset: unlimited.
    pub requests_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Token quota per tenant; unset: unlimited.
    pub tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// What a prompt token served from the prefix cache costs against the token quota,
    /// in percent of a computed one (0 to 100); unset: 25.
    pub cached_prompt_token_percent: Option<u32>,
}

/// How frontends find the expert shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShardsConfig {
    /// Number of expert shards the experts are spread over (copies come on top).
    pub count: u32,
    /// Headless Service of the shards: frontends address every ready shard pod it
    /// resolves to (re-resolved every second), copies included; shard `i` alone is
    /// `<podPrefix><i>.<service>:<port>` ([`ShardsConfig::address`]).
    pub service: String,
    /// StatefulSet pod name prefix (`<statefulset>-`).
    pub pod_prefix: String,
    /// gRPC port of the shards.
    pub port: u16,
}

impl ShardsConfig {
    /// The gRPC address of shard `index`.
    pub fn address(&self, index: u32) -> String {
        format!(
            "http://{}{index}.{}:{}",
            self.pod_prefix, self.service, self.port
        )
    }
}

/// Which shard holds which routed experts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlacementConfig {
    /// How experts are assigned; see [`PlacementStrategy`].
    pub strategy: PlacementStrategy,
    /// Changes whenever the placement changes (it rolls the pods). With `balanced` the
    /// operator moves experts through [`PlacementConfig::file`] instead, rolling nothing.
    pub revision: String,
    /// With `balanced`: the placement file the operator rewrites as the load moves
    /// (mounted from a ConfigMap, re-read by the shards while they run): shard `i` holds
    /// entry `i mod n` of its `n` entries. Until it exists, shards hold the even spread
    /// over `shards.count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// Placement strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PlacementStrategy {
    /// The routed experts of every MoE layer in contiguous, near-equal blocks over the
    /// shards ([`even_spread`]). The operator cannot read the checkpoint, so the expert
    /// count is applied by the worker, which can.
    EvenSpread,
    /// Experts placed where the measured load is, replicas of the hottest in the
    /// spare slots (`spec.experts.redundantExperts`): the operator plans from the frontends' expert load
    /// and writes [`PlacementConfig::file`]; the even spread until it has.
    Balanced,
}

/// Expert ids `0..num_experts` in `shards` contiguous blocks whose sizes differ by at most
/// one (the first `num_experts % shards` blocks get the extra expert). A shard beyond the
/// expert count gets none.
pub fn even_spread(num_experts: u32, shards: u32) -> Vec<std::ops::Range<u32>> {
    (0..shards)
        .map(|i| even_block(num_experts, shards, i))
        .collect()
}

/// Block `index` of [`even_spread`], computed alone: a shard needs only its own, and a
/// shard count can be as large as a `u32` (a list of every block would not fit in memory).
/// Empty when `shards` is 0 or `index` is not below it.
pub fn even_block(num_experts: u32, shards: u32, index: u32) -> std::ops::Range<u32> {
    if index >= shards {
        return 0..0;
    }
    let base = num_experts / shards;
    let extra = num_experts % shards;
    // Blocks before `index`: `index` of size `base`, the first `extra` of them one longer.
    let start = base * index + index.min(extra);
    start..start + base + u32::from(index < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_spread_covers_every_expert_once_in_near_equal_blocks() {
        for experts in [1, 7, 8, 60, 64, 256] {
            for shards in 1..=9 {
                let blocks = even_spread(experts, shards);
                assert_eq!(blocks.len(), shards as usize);
                let all: Vec<u32> = blocks.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(all, (0..experts).collect::<Vec<_>>(), "{experts}/{shards}");
                let sizes: Vec<u32> = blocks.iter().map(|r| r.end - r.start).collect();
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(max - min <= 1, "{experts}/{shards}: {sizes:?}");
            }
        }
        assert_eq!(even_spread(10, 4), [0..3, 3..6, 6..8, 8..10]);
        assert!(even_spread(4, 0).is_empty());
        // One block of a huge shard count, without the list of all of them.
        assert_eq!(even_block(64, u32::MAX, 63), 63..64);
        assert_eq!(even_block(64, u32::MAX, 64), 64..64);
        assert_eq!(even_block(64, u32::MAX, u32::MAX - 1), 64..64);
        assert_eq!(even_block(u32::MAX, 2, 1), u32::MAX / 2 + 1..u32::MAX);
        assert_eq!(even_block(8, 0, 0), 0..0);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<PlacementConfig>(
            r#"{"strategy":"evenSpread","revision":"r","extra":1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `extra`"), "{err}");
    }

    #[test]
    fn shard_addresses_use_the_headless_service() {
        let shards = ShardsConfig {
            count: 2,
            service: "md-experts.ns.svc".into(),
            pod_prefix: "md-experts-".into(),
            port: 50051,
        };
        assert_eq!(
            shards.address(1),
            "http://md-experts-1.md-experts.ns.svc:50051"
        );
    }
}
