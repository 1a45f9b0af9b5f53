//! The `ModelDeployment` API (`switchyard.dev/v1alpha1`): the Rust types the CRD is
//! generated from.
//!
//! Every rule a user can break is in the schema (bounds, enums, patterns) or in a CEL rule
//! (`x-kubernetes-validations`), so the API server itself refuses a bad manifest at
//! `kubectl apply`, with a message that names the field. Defaults live here too (serde
//! defaults become schema defaults), so `kubectl get -o yaml` shows them; the few
//! optional fields whose default depends on the model or the cluster (context length,
//! KV-cache size, pull policy, INT4 group size) stay unset and say so in their docs.
//!
//! ```text
//!   ModelDeployment
//!   ├─ spec.model        where the weights are (exactly one of pvc / hostPath / image), dtype, quantization
//!   ├─ spec.image        the worker image
//!   ├─ spec.frontend     replicas (the scale subresource), resources, scheduling
//!   ├─ spec.experts      shards (expert-parallel degree; 0 = frontends only), redundant expert slots, resources, scheduling
//!   ├─ spec.serving      gRPC port, batch, context and KV-cache limits
//!   ├─ spec.admission    API-key Secret, tiers (priority, weight, quotas), queue bounds
//!   ├─ spec.autoscaling  bounds per role, signal, windows
//!   ├─ spec.monitoring   who may scrape the metrics port, an optional PodMonitor
//!   ├─ spec.tls          a kubernetes.io/tls Secret: the client endpoint over TLS
//!   └─ status            observedGeneration, conditions, per-role counts, endpoint, placement
//! ```

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every Switchyard resource.
pub const GROUP: &str = "switchyard.dev";

/// A Mixture-of-Experts model served by frontends (attention, KV cache, router) and expert
/// shards (routed experts), with admission control and autoscaling.
// clippy reads the several `printcolumn(type_ = ...)` entries as one duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "switchyard.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    plural = "modeldeployments",
    shortname = "md",
    category = "switchyard",
    namespaced,
    status = "ModelDeploymentStatus",
    derive = "PartialEq",
    doc = "A Mixture-of-Experts model served by frontends and expert shards, with admission control and autoscaling.",
    scale(
        spec_replicas_path = ".spec.frontend.replicas",
        status_replicas_path = ".status.frontend.replicas",
        label_selector_path = ".status.frontend.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Frontends",
        type_ = "string",
        json_path = ".status.frontend.summary"
    ),
    printcolumn(
        name = "Shards",
        type_ = "string",
        json_path = ".status.experts.summary"
    ),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.autoscaling) || !self.autoscaling.enabled || self.autoscaling.mode == 'Shadow' || (self.frontend.replicas >= self.autoscaling.frontend.minReplicas && self.frontend.replicas <= self.autoscaling.frontend.maxReplicas)"
).message("frontend.replicas must lie within autoscaling.frontend.minReplicas..maxReplicas while autoscaling is enabled in mode Active").field_path(".frontend.replicas"))]
#[x_kube(validation = Rule::new(
    "!has(self.autoscaling) || !has(self.autoscaling.tierBudgets) || self.autoscaling.tierBudgets.all(b, b.tier == 'anonymous' || (has(self.admission) && has(self.admission.tiers) && self.admission.tiers.exists(t, t.name == b.tier)))"
).message("autoscaling.tierBudgets: each tier must be one of admission.tiers, or anonymous").field_path(".autoscaling.tierBudgets"))]
#[x_kube(validation = Rule::new(
    "!has(self.autoscaling) || !self.autoscaling.enabled || !has(self.autoscaling.experts) || self.experts.shards >= 1"
).message("autoscaling.experts sizes the shard pods: it needs experts.shards >= 1").field_path(".autoscaling.experts"))]
pub struct ModelDeploymentSpec {
    /// Where the checkpoint is and how to load it.
    pub model: ModelSpec,

    /// The `switchyard-worker` container image both roles run. Default: the image of the
    /// operator's own release (`ghcr.io/switchyard-dev/switchyard-worker:<operator
    /// version>`), or what the operator's `--default-worker-image` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Pull policy for `image`. Default: the Kubernetes default (`Always` for `:latest`,
    /// else `IfNotPresent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,

    /// The frontend pods: they hold attention, the KV cache and the router and serve the
    /// gRPC endpoint. `spec.frontend.replicas` is what `kubectl scale` changes.
    #[serde(default)]
    pub frontend: FrontendSpec,

    /// The expert-shard pods: they hold the routed experts.
    #[serde(default)]
    pub experts: ExpertsSpec,

    /// Limits of the serving engine.
    #[serde(default)]
    pub serving: ServingSpec,

    /// Who may call, and how much.
    #[serde(default)]
    pub admission: AdmissionSpec,

    /// Bounds and behaviour of the autoscaler (off by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// Who may scrape the workers' metrics port, and an optional PodMonitor.
    #[serde(default)]
    pub monitoring: MonitoringSpec,

    /// TLS on the client endpoint. Unset: plaintext gRPC (`h2c`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

/// TLS on the frontends' gRPC port.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A `kubernetes.io/tls` Secret in this namespace (`tls.crt`, `tls.key`), as
    /// cert-manager writes it. Frontends serve gRPC over TLS with it (HTTP/2 by ALPN) and
    /// pick up a renewed certificate without a restart (the kubelet's volume refresh, then
    /// within 5 s); their probes move to the metrics port's `/healthz` and `/readyz`,
    /// because the kubelet's gRPC probe cannot speak TLS. Shards stay plaintext: only
    /// frontends reach them (NetworkPolicy).
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

/// Reaching the workers' Prometheus endpoint (`/metrics` on port 9090, named `metrics`
/// on the pods and Services).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// Who the NetworkPolicies let reach the metrics port of both roles, as NetworkPolicy
    /// peers (`namespaceSelector`, `podSelector`, `ipBlock`), e.g. the `monitoring`
    /// namespace. Empty (the default): any source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub scrape_from: Vec<NetworkPolicyPeer>,
    /// A Prometheus Operator PodMonitor for both roles' pods.
    #[serde(default)]
    pub pod_monitor: PodMonitorSpec,
}

/// A `monitoring.coreos.com/v1` PodMonitor named after the ModelDeployment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodMonitorSpec {
    /// Create it. It is created only where the PodMonitor CRD is installed; elsewhere a
    /// `PodMonitorUnavailable` warning event says so. Turning it off deletes it. Default
    /// false.
    #[serde(default)]
    pub enabled: bool,
    /// Scrape interval, e.g. `30s` or `1m`. Default `30s`.
    #[serde(default = "default_scrape_interval")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub interval: String,
}

impl Default for PodMonitorSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: default_scrape_interval(),
        }
    }
}

fn default_scrape_interval() -> String {
    "30s".into()
}

/// Where the weights are and how to load them. Exactly one of `pvc`, `hostPath` and
/// `image` must be set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "(has(self.pvc) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) + (has(self.image) ? 1 : 0) == 1"
).message("exactly one model source must be set: model.pvc, model.hostPath or model.image"))]
#[x_kube(validation = Rule::new(
    "self.quantization in ['int8', 'int4'] || !has(self.quantizationGroupSize)"
).message("model.quantizationGroupSize applies only with model.quantization: int8 or int4").field_path(".quantizationGroupSize"))]
pub struct ModelSpec {
    /// A PersistentVolumeClaim holding the checkpoint directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,
    /// A directory on the node (for single-node and test setups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathSource>,
    /// An OCI image (or artifact) mounted as a read-only image volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSource>,
    /// The dtype weights and activations are computed in.
    #[serde(default)]
    pub dtype: Dtype,
    /// How weight matrices are held: `auto` (as the checkpoint stores them: a safetensors
    /// checkpoint dense in `dtype`, a GGUF's quantized tensors as they are), `none` (dense;
    /// a GGUF dequantized), `int8` (Q8_0) or `int4` (Q4_K, Q4_0 where a row is not a
    /// multiple of 256; the LM head Q6_K/Q8_0). Norms, the router and the embedding are
    /// never quantized.
    #[serde(default)]
    pub quantization: Quantization,
    /// Weights per quantization scale. Every supported quantized type has one scale per 32
    /// weights, so only 32 is accepted; only with `quantization: int8` or `int4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_group_size: Option<QuantizationGroupSize>,
}

/// A checkpoint on a PersistentVolumeClaim.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// Name of a PersistentVolumeClaim in the ModelDeployment's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// Directory inside the volume that holds `config.json` and the `*.safetensors`.
    #[serde(default = "default_model_path")]
    #[x_kube(validation = Rule::new("self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)')").message("model.pvc.path must be an absolute path without '..' segments"))]
    pub path: String,
}

/// A checkpoint in a directory on the node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostPathSource {
    /// Absolute path of the checkpoint directory on the node.
    #[x_kube(validation = Rule::new("self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)')").message("model.hostPath.path must be an absolute path without '..' segments"))]
    pub path: String,
}

/// A checkpoint packaged as an OCI image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageSource {
    /// Image reference, e.g. `registry.example.com/models/olmoe:1b-7b`.
    #[schemars(length(min = 1, max = 512))]
    pub reference: String,
    /// Directory inside the image that holds the checkpoint.
    #[serde(default = "default_model_path")]
    #[x_kube(validation = Rule::new("self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)')").message("model.image.path must be an absolute path without '..' segments"))]
    pub path: String,
    /// Pull policy of the image volume. Unset: the Kubernetes default (`Always` for
    /// `:latest`, else `IfNotPresent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
}

fn default_model_path() -> String {
    "/".into()
}

/// Image pull policy: `Always`, `IfNotPresent` or `Never`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// Compute dtype: `bf16`, `f16` or `f32`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    Bf16,
    F16,
    F32,
}

/// Weight quantization: `auto` (as stored), `none` (dense), `int8` or `int4`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    #[default]
    Auto,
    None,
    Int8,
    Int4,
}

/// INT4 group size.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(try_from = "u32", into = "u32")]
pub struct QuantizationGroupSize(pub u32);

impl QuantizationGroupSize {
    /// Every quantized type the worker holds has one scale per 32 weights (Q8_0, Q4_0, and
    /// Q4_K's and Q6_K's sub-blocks), so the group size is fixed.
    pub const ACCEPTED: [u32; 1] = [32];
}

impl TryFrom<u32> for QuantizationGroupSize {
    type Error = String;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        if Self::ACCEPTED.contains(&v) {
            Ok(Self(v))
        } else {
            Err(format!(
                "quantizationGroupSize {v} is not one of {:?}",
                Self::ACCEPTED
            ))
        }
    }
}

impl From<QuantizationGroupSize> for u32 {
    fn from(v: QuantizationGroupSize) -> u32 {
        v.0
    }
}

impl schemars::JsonSchema for QuantizationGroupSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "QuantizationGroupSize".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "integer",
            "format": "int32",
            "enum": Self::ACCEPTED,
            "description": "Weights per quantization scale: 32 (the only size the quantized types have)."
        })
    }
}

/// Resources and scheduling of one role's pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodSettings {
    /// CPU, memory and `nvidia.com/gpu` requests and limits of the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate (GPU nodes are often tainted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
}

/// The frontend role.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FrontendSpec {
    /// Number of frontend pods (0 parks the deployment). Default 1.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    #[serde(flatten)]
    pub pod: PodSettings,
}

impl Default for FrontendSpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            pod: PodSettings::default(),
        }
    }
}

/// The expert-shard role.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.replicaShards == 0 || self.shards >= 1")
    .message("experts.replicaShards copies shards: it needs experts.shards >= 1")
    .field_path(".replicaShards"))]
#[x_kube(validation = Rule::new(
    "self.redundantExperts == 0 || (has(self.placement) && has(self.placement.strategy) && self.placement.strategy == 'balanced')"
)
    .message("experts.redundantExperts needs experts.placement.strategy: balanced (the even spread holds each expert once); set the strategy, or leave redundantExperts 0")
    .field_path(".redundantExperts"))]
pub struct ExpertsSpec {
    /// Number of expert shards: the expert-parallel degree. The routed experts of every
    /// MoE layer are spread over them. 0 (the default): no shards; the frontends hold the
    /// whole model, which is what a dense checkpoint needs (and a MoE small enough for one
    /// pod). Going to 0 deletes the shard StatefulSet, its Service, PDB and NetworkPolicy.
    #[serde(default)]
    #[schemars(range(min = 0, max = 256))]
    pub shards: i32,
    /// Shard pods beyond `shards`, each a full copy of one shard's experts (pod k copies
    /// shard k mod `shards`): more capacity for the experts without re-spreading them.
    /// The frontends find the copies through the headless Service and send each expert's
    /// rows to its least loaded holder; adding or removing copies restarts no pod (a
    /// removed copy's calls in flight are re-planned on the other holders). Default 0;
    /// needs `shards` ≥ 1.
    #[serde(default)]
    #[schemars(range(min = 0, max = 256))]
    pub replica_shards: i32,
    /// Extra expert slots per MoE layer, over all shards, for replicas of the most loaded
    /// experts: each shard has ⌈(experts + redundantExperts) / shards⌉ slots per layer
    /// (vLLM's and SGLang's `num_redundant_experts`). A slot is filled only where a
    /// replica lowers the busiest shard's load. Needs `placement.strategy: balanced`.
    /// Default 0.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1024))]
    pub redundant_experts: i32,
    /// How the routed experts are spread over the shards.
    #[serde(default)]
    pub placement: PlacementSpec,
    #[serde(flatten)]
    pub pod: PodSettings,
}

/// Where the routed experts go (`spec.experts.placement`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// `evenSpread` (the default): shard i holds the i-th contiguous block of every MoE
    /// layer's experts, fixed. `balanced`: the operator reads each frontend's routed tokens
    /// per expert over the last minute (`GET /expert-load`) and, when the busiest shard
    /// carries too much more than the mean (`rebalance`), moves experts and places
    /// replicas of the hottest in the `redundantExperts` slots, while serving: shards load
    /// what they gain before they drop what they lose, and no pod restarts. Shards start
    /// on the even spread. `status.placement.balanced` shows the placement and the last
    /// move.
    #[serde(default)]
    pub strategy: PlacementStrategyName,
    /// When a `balanced` placement moves experts.
    #[serde(default)]
    pub rebalance: RebalanceSpec,
}

/// See [`PlacementSpec::strategy`].
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum PlacementStrategyName {
    #[default]
    EvenSpread,
    Balanced,
}

/// When the balanced placement moves experts: the measured imbalance (the busiest shard's
/// routed tokens over the mean shard's, summed over the MoE layers, each layer weighed by
/// its load) stays at or above `imbalancePercent` for `sustainSeconds`, the last move was
/// at least `minIntervalSeconds` ago, and the new plan lowers it by at least a twentieth.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceSpec {
    /// Imbalance, in percent of perfect balance (100), from which a move is worth its
    /// cost. Default 115.
    #[serde(default = "default_imbalance_percent")]
    #[schemars(range(min = 101, max = 10000))]
    pub imbalance_percent: i32,
    /// Seconds the imbalance must hold before a move (a burst does not move experts).
    /// Default 30.
    #[serde(default = "default_sustain_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub sustain_seconds: i32,
    /// Least seconds between the starts of two moves. Default 300.
    #[serde(default = "default_min_interval_seconds")]
    #[schemars(range(min = 10, max = 86400))]
    pub min_interval_seconds: i32,
}

impl Default for RebalanceSpec {
    fn default() -> Self {
        Self {
            imbalance_percent: default_imbalance_percent(),
            sustain_seconds: default_sustain_seconds(),
            min_interval_seconds: default_min_interval_seconds(),
        }
    }
}

fn default_imbalance_percent() -> i32 {
    115
}

fn default_sustain_seconds() -> i32 {
    30
}

fn default_min_interval_seconds() -> i32 {
    300
}

fn yes() -> bool {
    true
}

fn one() -> i32 {
    1
}

/// Limits of the serving engine on each frontend.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.maxContextLength) || self.maxTokensPerRequest <= self.maxContextLength"
).message("serving.maxTokensPerRequest must not exceed serving.maxContextLength").field_path(".maxTokensPerRequest"))]
#[x_kube(validation = Rule::new("self.port != 9090")
    .message("serving.port must not be 9090: the workers serve /metrics there")
    .field_path(".port"))]
pub struct ServingSpec {
    /// gRPC port of both roles (not 9090, the workers' metrics port). Default 50051.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: i32,
    /// Most sequences decoded together in one batch. Default 64.
    #[serde(default = "default_max_batch_size")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_batch_size: i32,
    /// Most tokens (prefill + decode) in one forward step. Default 8192.
    #[serde(default = "default_max_batch_tokens")]
    #[schemars(range(min = 16, max = 1048576))]
    pub max_batch_tokens: i32,
    /// Longest prompt + completion. Default: the model's own context length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 1048576))]
    pub max_context_length: Option<i32>,
    /// Largest `max_tokens` a request may ask for. Default 4096.
    #[serde(default = "default_max_tokens_per_request")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_tokens_per_request: i32,
    /// Tokens of KV cache per frontend. Default: what fits in the memory left after the
    /// weights are loaded (on CPUs the container's memory limit minus its usage), less a
    /// reserve for one step's activations at `maxBatchTokens` and 64 KiB per request the
    /// frontend may hold (`maxBatchSize` + `admission.queue.maxQueued`), 90% of the rest,
    /// at most `maxBatchSize` full-context sequences; a frontend where not even one
    /// full-context sequence fits fails to start, saying so. On GPUs the free memory is not
    /// measured yet: set this there (the default is `maxBatchSize` × min(context, 2048)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16))]
    pub kv_cache_tokens: Option<i64>,
    /// Seconds a stopping worker (scale-down, rollout, node drain) gives in-flight calls
    /// to finish. On SIGTERM it reports not ready at once, so the Service sends it no new
    /// work, keeps taking calls for min(5, this / 2) seconds while endpoints catch up, then
    /// lets the running ones finish; any still running at the end get UNAVAILABLE
    /// ("shutting down ... retry it"). The pods' `terminationGracePeriodSeconds` is this
    /// plus 10. Default 30.
    #[serde(default = "default_drain_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub drain_seconds: i32,
}

impl Default for ServingSpec {
    fn default() -> Self {
        Self {
            port: default_port(),
            max_batch_size: default_max_batch_size(),
            max_batch_tokens: default_max_batch_tokens(),
            max_context_length: None,
            max_tokens_per_request: default_max_tokens_per_request(),
            kv_cache_tokens: None,
            drain_seconds: default_drain_seconds(),
        }
    }
}

fn default_port() -> i32 {
    50051
}
fn default_max_batch_size() -> i32 {
    64
}
fn default_max_batch_tokens() -> i32 {
    8192
}
fn default_max_tokens_per_request() -> i32 {
    4096
}
fn default_drain_seconds() -> i32 {
    30
}

/// Who may call the endpoint and how much.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.defaultTier) || (has(self.tiers) && self.tiers.exists(t, t.name == self.defaultTier))"
).message("admission.defaultTier must name one of admission.tiers").field_path(".defaultTier"))]
#[x_kube(validation = Rule::new(
    "!has(self.apiKeySecret) || (has(self.tiers) && size(self.tiers) > 0)"
).message("admission.tiers must list at least one tier when admission.apiKeySecret is set").field_path(".tiers"))]
pub struct AdmissionSpec {
    /// Secret in this namespace mapping API keys to tenants and tiers. Unset: no
    /// authentication; every caller is one anonymous tenant, in `defaultTier` if set, else
    /// in a built-in tier with priority `normal`, weight 1 and no quotas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretRef>,
    /// Service tiers; each key in the Secret names one. Names are unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub tiers: Vec<Tier>,
    /// Tier for keys the Secret lists without a tier, and for everyone when there is no
    /// Secret. A key the Secret does not list is refused (UNAUTHENTICATED) either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub default_tier: Option<String>,
    /// Bounds of the fair queue on each frontend.
    #[serde(default)]
    pub queue: QueueSpec,
    /// Per-address connection caps on each frontend. Behind a gateway or a mesh every
    /// caller shares the gateway's address: raise these there.
    #[serde(default)]
    pub connections: ConnectionsSpec,
    /// How each tenant's quota holds across frontends. Default: split over the live
    /// frontends.
    #[serde(default)]
    pub quota_scope: QuotaScopeSpec,
}

/// How a tier's quota holds when several frontends serve a tenant.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'Redis' || has(self.redis)")
    .message("admission.quotaScope.redis: mode Redis needs redis.address")
    .field_path(".redis"))]
#[x_kube(validation = Rule::new("self.mode == 'Redis' || !has(self.redis)")
    .message("admission.quotaScope.redis: only used with mode Redis")
    .field_path(".redis"))]
pub struct QuotaScopeSpec {
    /// `Split` (default): each frontend enforces quota ÷ ready frontends, counted through
    /// a headless Service, no dependency; a tenant never gets more than its quota (plus
    /// rounding), but one whose calls reach fewer frontends gets less. `Redis`: one exact
    /// counter per tenant in Redis, shared by all frontends.
    #[serde(default)]
    pub mode: QuotaScopeMode,
    /// The Redis the frontends share (mode `Redis`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,
}

/// See [`QuotaScopeSpec::mode`].
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum QuotaScopeMode {
    #[default]
    Split,
    Redis,
}

/// Where Redis is.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// `host:port`, e.g. `redis.platform.svc:6379`. No password or TLS yet.
    #[schemars(length(min = 3, max = 255))]
    #[schemars(regex(pattern = r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$"))]
    pub address: String,
}

/// Connection caps per client IP address, checked on accept, before any HTTP/2 work.
/// Unset fields keep the worker's defaults.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionsSpec {
    /// Open connections per client address; further ones are closed on accept. Default 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_per_address: Option<i32>,
    /// New connections per client address per second, sustained; faster reconnects are
    /// closed on accept. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub new_per_second: Option<i32>,
    /// New connections per client address at once, before `newPerSecond` applies.
    /// Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub new_burst: Option<i32>,
}

/// A reference to a Secret in the ModelDeployment's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A service tier: how urgent its requests are, its share, and its quotas.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Tier {
    /// Tier name, referenced by the API-key Secret and `defaultTier`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Highest priority band this tier's requests may use. Default `normal`.
    #[serde(default)]
    pub priority: Priority,
    /// Fair-share weight of each tenant in this tier, against the other tenants in the
    /// same priority band. Default 1.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: i32,
    /// Requests per minute per tenant. Unset: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<i64>,
    /// Tokens (prompt + max_tokens, refunded when unused) per minute per tenant. Unset:
    /// unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<i64>,
    /// What a prompt token served from the prefix cache costs against
    /// `tokensPerMinute`, in percent of a computed one. Unset: 25 (DeepSeek's price ratio
    /// of cached to computed input tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub cached_prompt_token_percent: Option<i32>,
}

/// Priority bands, strict: a higher band is always served first. `low`, `normal`, `high`
/// or `critical`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
    Critical,
}

/// Bounds of the fair queue.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// Most requests waiting on one frontend; past it new requests get UNAVAILABLE at
    /// once. Default 256.
    #[serde(default = "default_max_queued")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_queued: i32,
    /// Longest a request may wait for its first token when the client set no deadline.
    /// Default 30.
    #[serde(default = "default_deadline_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub default_deadline_seconds: i32,
}

impl Default for QueueSpec {
    fn default() -> Self {
        Self {
            max_queued: default_max_queued(),
            default_deadline_seconds: default_deadline_seconds(),
        }
    }
}

fn default_max_queued() -> i32 {
    256
}
fn default_deadline_seconds() -> i32 {
    30
}

/// How the autoscaler sizes each role.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.panicWindowSeconds < self.stableWindowSeconds")
    .message("autoscaling.panicWindowSeconds must be shorter than autoscaling.stableWindowSeconds")
    .field_path(".panicWindowSeconds"))]
pub struct AutoscalingSpec {
    /// Whether the operator sizes the frontends by itself, from the legitimate demand
    /// its frontends report (`spec.frontend.replicas` is then the autoscaler's: it writes
    /// it through the scale subresource). False (the default): replicas are the user's,
    /// or an HPA's or KEDA's through the same subresource.
    #[serde(default)]
    pub enabled: bool,
    /// `Active` (the default): the autoscaler writes the counts it decides. `Shadow`: it
    /// decides exactly as in `Active` and shows each recommendation, its reason and the
    /// signal in `status.autoscaling`, Events and metrics, but never changes a count (the
    /// user, an HPA or KEDA keep them). Switching to `Active` applies the current
    /// recommendation.
    #[serde(default)]
    pub mode: AutoscalingMode,
    #[serde(default)]
    pub frontend: FrontendScaling,
    /// What each tier's demand can buy, as a share of `frontend.maxReplicas`: a tier's
    /// legitimate demand counts for at most the frontends its share gives (rounded up)
    /// times `targetQueueDepth`, however many tenants it has, so many keys each within
    /// its quota (a sybil flood) cannot buy more. `tier` names one of `admission.tiers`,
    /// or `anonymous` for callers without an API key. Unlisted, anonymous callers and the
    /// default tier (`admission.defaultTier`, where keys without a tier land) get 50 %;
    /// other tiers are unbounded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 33))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["tier"]))]
    pub tier_budgets: Vec<TierBudget>,
    /// Expert-shard autoscaling: absent, the shard count is the user's. Present (with
    /// `enabled`), the autoscaler sizes the shard pods, `experts.shards` plus the copies it
    /// writes to `experts.replicaShards`, from the utilisation the shards report; needs
    /// `experts.shards` ≥ 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<ExpertScaling>,
    /// Legitimate requests in the system (queued + running, each tenant counted up to
    /// what its quota allows) per frontend the autoscaler aims for. Default 5.
    #[serde(default = "default_target_queue_depth")]
    #[schemars(range(min = 1, max = 10000))]
    pub target_queue_depth: i32,
    /// Window over which demand is averaged for normal decisions. Default 60.
    #[serde(default = "default_stable_window")]
    #[schemars(range(min = 6, max = 3600))]
    pub stable_window_seconds: i32,
    /// Short window that triggers fast scale-up on a spike. Default 2.
    #[serde(default = "default_panic_window")]
    #[schemars(range(min = 1, max = 600))]
    pub panic_window_seconds: i32,
    /// Panic (scale up at once, never down) when the panic window wants at least this
    /// percentage of the ready frontends. Default 200.
    #[serde(default = "default_panic_threshold")]
    #[schemars(range(min = 110, max = 10000))]
    pub panic_threshold_percent: i32,
    /// At most this many times the current frontends in one decision. Default 10.
    #[serde(default = "default_max_scale_up_rate")]
    #[schemars(range(min = 2, max = 1000))]
    pub max_scale_up_rate: i32,
    /// At least the current frontends divided by this in one decision. Default 2.
    #[serde(default = "default_max_scale_down_rate")]
    #[schemars(range(min = 2, max = 1000))]
    pub max_scale_down_rate: i32,
    /// Demand must stay low this long before replicas are removed. Default 300.
    #[serde(default = "default_scale_down_delay")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_delay_seconds: i32,
    /// How often every ready frontend's demand report is polled, in milliseconds.
    /// Default 500.
    #[serde(default = "default_poll_interval")]
    #[schemars(range(min = 100, max = 10000))]
    pub poll_interval_milliseconds: i32,
}

impl Default for AutoscalingSpec {
    /// What an empty `autoscaling: {}` means (off, every field at its default).
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({}))
            .expect("every AutoscalingSpec field has a default")
    }
}

fn default_target_queue_depth() -> i32 {
    5
}
fn default_stable_window() -> i32 {
    60
}
fn default_panic_window() -> i32 {
    2
}
fn default_panic_threshold() -> i32 {
    200
}
fn default_max_scale_up_rate() -> i32 {
    10
}
fn default_max_scale_down_rate() -> i32 {
    2
}
fn default_poll_interval() -> i32 {
    500
}
fn default_scale_down_delay() -> i32 {
    300
}

/// See [`AutoscalingSpec::mode`].
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AutoscalingMode {
    #[default]
    Active,
    Shadow,
}

/// The most one tier's demand can buy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TierBudget {
    /// A tier of `admission.tiers`, or `anonymous` (callers without an API key).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub tier: String,
    /// Its share of `autoscaling.frontend.maxReplicas`, in percent (rounded up to whole
    /// frontends); 0: its demand never adds a frontend.
    #[schemars(range(min = 0, max = 100))]
    pub max_frontends_percent: i32,
}

/// Frontend replica bounds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("autoscaling.frontend.minReplicas must not exceed autoscaling.frontend.maxReplicas")
    .field_path(".minReplicas"))]
pub struct FrontendScaling {
    /// Default 1. At least 1: the frontends report the demand, so none cannot see it
    /// come back (scale to zero needs an activator, which is not built).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Default 4.
    #[serde(default = "default_max_frontends")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
}

impl Default for FrontendScaling {
    fn default() -> Self {
        Self {
            min_replicas: 1,
            max_replicas: default_max_frontends(),
        }
    }
}

fn default_max_frontends() -> i32 {
    4
}

/// Expert-shard bounds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minShards <= self.maxShards")
    .message("autoscaling.experts.minShards must not exceed autoscaling.experts.maxShards")
    .field_path(".minShards"))]
pub struct ExpertScaling {
    /// Fewest shard pods (shards and copies together); never fewer than
    /// `experts.shards`, which every expert needs. Default 1.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 256))]
    pub min_shards: i32,
    /// Most shard pods (shards and copies together). Default 8.
    #[serde(default = "default_max_shards")]
    #[schemars(range(min = 1, max = 256))]
    pub max_shards: i32,
    /// The utilisation (percent of the time a shard computes `Forward` work) to aim for
    /// on the busiest shard's experts: a shard's experts at 2× this get a copy. Default 70.
    #[serde(default = "default_target_utilization")]
    #[schemars(range(min = 10, max = 100))]
    pub target_utilization_percent: i32,
}

impl Default for ExpertScaling {
    fn default() -> Self {
        Self {
            min_shards: 1,
            max_shards: default_max_shards(),
            target_utilization_percent: default_target_utilization(),
        }
    }
}

fn default_target_utilization() -> i32 {
    70
}

fn default_max_shards() -> i32 {
    8
}

/// What the operator observed and did.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Frontend pods.
    #[serde(default)]
    pub frontend: RoleStatus,
    /// Expert-shard pods.
    #[serde(default)]
    pub experts: RoleStatus,
    /// The client endpoint: `<service>.<namespace>.svc:<port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Which shard holds which experts, in short.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementSummary>,
    /// What the autoscaler sees and decided (while `spec.autoscaling.enabled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// The autoscaler's view of one ModelDeployment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// `Active` or `Shadow` (recommendations only: the counts are someone else's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<AutoscalingMode>,
    /// Frontends the autoscaler wants now (in `Shadow`: recommends).
    pub desired_frontends: i32,
    /// Why: `Panic`, `Stable`, `ScaleDownDelay`, `RateLimited`, `Bounded`,
    /// `PartialSignal` or `NoSignal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Frontends `spec.frontend.replicas` asks for.
    pub current_frontends: i32,
    /// Ready frontends, and how many of them answered the last poll.
    pub ready_frontends: i32,
    pub reporting_frontends: i32,
    /// Legitimate demand (requests in the system, each tenant up to its quota) averaged
    /// over the stable and the panic window, as decimal strings.
    pub stable_demand: String,
    pub panic_demand: String,
    /// All demand the frontends hold, quota or not (what an aggregate autoscaler sees).
    pub total_demand: String,
    /// Over the frontends' last 10 s, all frontends together: requests refused (over
    /// quota, shed, expired) and tokens generated, per second. Shown, not scaled on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_per_second: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<String>,
    /// The fullest frontend's KV cache use, in percent of its blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_used_percent: Option<i32>,
    /// The slowest frontend's p99 time to first token over its last 10 s, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_p99_seconds: Option<String>,
    /// With `autoscaling.experts`: shard pods (shards and copies) wanted and asked for
    /// (`experts.shards` + `experts.replicaShards`), ready and reporting, and their mean
    /// utilisation over their last ~10 s (a decimal string, 0–1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_shards: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_shards: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporting_shards: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_utilization: Option<String>,
    /// Legitimate demand per tier in the last sample (anonymous callers as `anonymous`),
    /// and what its budget (`autoscaling.tierBudgets`) lets it count for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 33))]
    pub tiers: Vec<TierDemandStatus>,
    /// When the sample above was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled_at: Option<Time>,
    /// The last scaling decisions, newest last (at most 5).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5))]
    pub decisions: Vec<ScalingDecision>,
}

/// One tier's demand in [`AutoscalingStatus::tiers`].
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TierDemandStatus {
    pub tier: String,
    /// Its tenants' legitimate demand (each up to its quota), a decimal string.
    pub demand: String,
    /// What it counts for: the demand, at most its budget's frontends × targetQueueDepth.
    pub counted: String,
    /// The frontends its budget buys at most; absent: unbounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_frontends: Option<i32>,
}

/// One change of `spec.frontend.replicas` by the autoscaler (or, in `Shadow`, of its
/// recommendation).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScalingDecision {
    pub time: Time,
    /// False in `Shadow`: recommended, not written.
    #[serde(default = "yes")]
    pub applied: bool,
    /// `frontend`, or `expert-shard` (its counts are shard pods, copies included).
    pub role: String,
    pub from: i32,
    pub to: i32,
    /// `Panic`, `Stable`, `ScaleDownDelay`, `RateLimited`, `Bounded`.
    pub reason: String,
    /// The signal values behind it.
    pub stable_demand: String,
    pub panic_demand: String,
    pub total_demand: String,
}

/// Replica counts of one role.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RoleStatus {
    /// Pods the role's workload has (the scale subresource's status replicas).
    #[serde(default)]
    pub replicas: i32,
    /// Pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Pods wanted.
    #[serde(default)]
    pub desired_replicas: i32,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// Label selector of the role's pods (the scale subresource's selector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

/// A short description of the current placement.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSummary {
    /// Digest of the placement the ConfigMap holds; changes roll the pods.
    pub revision: String,
    /// Number of shards the experts are spread over.
    pub shards: i32,
    /// With `experts.placement.strategy: balanced`: the placement the operator planned
    /// from the measured load, and its last move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balanced: Option<BalancedPlacementStatus>,
}

/// `status.placement.balanced`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BalancedPlacementStatus {
    /// The placement file's revision (`b<n>`, the n-th move; empty before the first).
    #[serde(default)]
    pub revision: String,
    /// `Measuring` (no move yet or since the last one finished), `Moving` (shards load what
    /// they gain; the frontends switch once every shard reports the revision) or
    /// `Waiting` (a move is wanted but held back; `message` says why).
    pub phase: String,
    /// The busiest shard's load over the mean shard's on the last minute's traffic with
    /// the current placement (decimal; 1 is perfect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imbalance: Option<String>,
    /// The same figure before and after the last move, on the traffic it was planned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imbalance_before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imbalance_after: Option<String>,
    /// Expert slots per shard and MoE layer.
    #[serde(default)]
    pub slots_per_shard: i32,
    /// How many shards the placement file in force spreads the experts over (unset
    /// before the operator has written one). Differs from `spec.experts.shards` while a
    /// change of the count is moved: the shard pods past a smaller count stay until the
    /// others hold their experts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<i32>,
    /// The hottest experts over all MoE layers and the shards holding them.
    #[serde(default)]
    pub hottest: Vec<HotExpertStatus>,
    /// When the last move started, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rebalance_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the operator is waiting for, or why it cannot measure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One hot expert in [`BalancedPlacementStatus::hottest`].
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HotExpertStatus {
    pub layer: i32,
    pub expert: i32,
    /// Its share of its layer's routed tokens (decimal).
    pub share: String,
    /// Shard indices holding it (more than one: replicas, rows split between them).
    pub shards: Vec<i32>,
}

impl ModelDeployment {
    /// The expert-shard pods to run: the shards and their copies (`replicaShards`); with
    /// the balanced placement, at least as many shards as its file in force spreads the
    /// experts over (`status.placement.balanced.shards`), so a smaller count takes pods
    /// away only once the operator has moved their experts onto the others. 0 without
    /// shards.
    pub fn shard_pods(&self) -> i32 {
        let experts = &self.spec.experts;
        if experts.shards <= 0 {
            return 0;
        }
        let placed = match experts.placement.strategy {
            PlacementStrategyName::EvenSpread => None,
            PlacementStrategyName::Balanced => self
                .status
                .as_ref()
                .and_then(|s| s.placement.as_ref())
                .and_then(|p| p.balanced.as_ref())
                .and_then(|b| b.shards),
        };
        experts.shards.max(placed.unwrap_or(0)) + experts.replica_shards.max(0)
    }
}
