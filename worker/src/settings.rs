//! The effective settings of each worker role: one place that decides every value.
//!
//! ```text
//!   DEFAULT_* constants (here, once) ─┐  lowest
//!   worker.json (--config)           ─┤
//!   SWITCHYARD_* environment         ─┤  clap fills the same Option as the flag
//!   flags                            ─┘  highest
//!        └─ FrontendSettings::resolve / ShardSettings::resolve   (pure: no I/O)
//!             └─ log() once at start-up ─> into_options() (demo model, admission file)
//!                  └─ FrontendOptions / ShardOptions ─> frontend::start / shard::start
//! ```
//!
//! A flag or its variable the user set wins over worker.json; an unset one falls back to
//! worker.json, then to the default. Five flags name what worker.json fixes for the whole
//! deployment — `--model`, `--model-id`, `--dtype`, `--quantization` and `--shard-count` —
//! and are refused with `--config` (a frontend and its shards must agree on them, so one
//! pod must not differ). The flags are `Option`s without clap defaults so "set" and "default" differ.

use std::path::{Path, PathBuf};
use std::time::Duration;

use switchyard_proto::worker_config::{AdmissionConfig, PlacementStrategy, WorkerConfig};

use crate::StartError;
use crate::admission::AdmissionOptions;
use crate::experts::placement::PlacementSource;
use crate::experts::remote::{RemoteOptions, ShardTargets};
use crate::experts::shard::{MAX_REQUEST_BYTES, ShardOptions};
use crate::frontend::FrontendOptions;
use crate::model::quant::Quantization;

/// Compute dtype unless `--dtype` or worker.json says.
pub const DEFAULT_DTYPE: &str = "auto";
/// Compute device unless `--device` says.
pub const DEFAULT_DEVICE: &str = "auto";
/// Sequences decoded together, without worker.json or `--max-batch-size`.
pub const DEFAULT_MAX_BATCH_SIZE: usize = 32;
/// New tokens per engine step, without worker.json or `--max-batch-tokens`.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 512;
/// Largest `max_tokens`, without worker.json or `--max-tokens-per-request`.
pub const DEFAULT_MAX_TOKENS_PER_REQUEST: usize = 1024;
/// Tokens per KV-cache block.
pub const DEFAULT_KV_BLOCK_SIZE: usize = 16;
/// Hidden rows' dtype on the wire to expert shards.
pub const DEFAULT_EXPERT_WIRE_DTYPE: &str = "f32";
/// Deadline of one call to an expert shard.
pub const DEFAULT_EXPERT_TIMEOUT_MS: u64 = 5000;
/// How long start-up waits for every routed expert to have a shard. Sized for pods,
/// whose shards may still be loading a large checkpoint when the frontend starts.
pub const DEFAULT_EXPERT_WAIT_SECS: u64 = 300;
/// Split decode steps into two overlapping micro-batches.
pub const DEFAULT_OVERLAP: bool = true;
/// Reuse computed KV blocks of repeated prompt prefixes (per tenant).
pub const DEFAULT_PREFIX_CACHE: bool = true;

/// A combination of flags, environment and worker.json that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error(
        "{flag} (or {env}) cannot be used with --config: {why}; remove it, or run without --config"
    )]
    RefusedWithConfig {
        flag: &'static str,
        env: &'static str,
        why: &'static str,
    },
    #[error(
        "the {role} needs a model: pass --model DIR (or --model demo), or --config worker.json"
    )]
    NoModel { role: &'static str },
    #[error("{flag}: {message}")]
    Invalid { flag: &'static str, message: String },
}

/// Flags both roles read: the checkpoint and how to load it.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ModelArgs {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer.json), a `.gguf` file, or
    /// `demo` for the built-in random demo model (generated into the cache on first use). Refused with
    /// --config (worker.json's model.path).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    pub model: Option<PathBuf>,
    /// The model id clients name [default: the directory's name]. Refused with --config
    /// (the id is the ModelDeployment's name).
    #[arg(long, env = "SWITCHYARD_MODEL_ID")]
    pub model_id: Option<String>,
    /// Compute dtype: auto (f32 on CPU), f32, bf16 or f16 [default: auto]. Refused with
    /// --config (worker.json's model.dtype).
    #[arg(long, env = "SWITCHYARD_DTYPE")]
    pub dtype: Option<String>,
    /// How weight matrices are stored: auto (as the checkpoint stores them), none (dense;
    /// a GGUF's quantized tensors dequantized), int8 (Q8_0) or int4 (Q4_K/Q4_0, Q6_K/Q8_0
    /// head) [default: auto]. Refused with --config (worker.json's model.quantization).
    #[arg(long, env = "SWITCHYARD_QUANTIZATION")]
    pub quantization: Option<String>,
    /// Compute device: auto (a CUDA GPU when built with the `cuda` feature), cpu, cuda:N
    /// [default: auto].
    #[arg(long, env = "SWITCHYARD_DEVICE")]
    pub device: Option<String>,
    /// Where the demo model is generated [default: ~/.cache/switchyard].
    #[arg(long, env = "SWITCHYARD_CACHE")]
    pub cache_dir: Option<PathBuf>,
}

/// Frontend flags. Each one set overrides worker.json's value.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FrontendArgs {
    /// Sequences decoded together at most [default: 32; worker.json: serving.maxBatchSize].
    #[arg(long, env = "SWITCHYARD_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,
    /// New tokens per engine step at most (prefill chunks share it with decodes)
    /// [default: 512; worker.json: serving.maxBatchTokens].
    #[arg(long, env = "SWITCHYARD_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,
    /// Context length [default: the model's; worker.json: serving.maxContextLength].
    #[arg(long, env = "SWITCHYARD_MAX_CONTEXT")]
    pub max_context: Option<usize>,
    /// Largest `max_tokens` per request, also the default [default: 1024; worker.json:
    /// serving.maxTokensPerRequest].
    #[arg(long, env = "SWITCHYARD_MAX_TOKENS_PER_REQUEST")]
    pub max_tokens_per_request: Option<usize>,
    /// KV-cache capacity in tokens [default: what fits in the memory left after the
    /// weights, at most max batch size × context; worker.json: serving.kvCacheTokens].
    #[arg(long, env = "SWITCHYARD_KV_CACHE_TOKENS")]
    pub kv_cache_tokens: Option<u64>,
    /// Tokens per KV-cache block [default: 16].
    #[arg(long, env = "SWITCHYARD_KV_BLOCK_SIZE")]
    pub kv_block_size: Option<usize>,
    /// Run the routed experts on expert shards: comma-separated `host:port` addresses, or
    /// `dns:///NAME:PORT` for every address behind a (headless Service) name, re-resolved
    /// every second [default: every expert in this process; worker.json: its shards].
    #[arg(long, env = "SWITCHYARD_EXPERT_SHARDS")]
    pub expert_shards: Option<String>,
    /// Dtype of hidden rows on the wire to shards: f32 (exact), bf16 or f16 (half the
    /// bytes) [default: f32].
    #[arg(long, env = "SWITCHYARD_EXPERT_WIRE_DTYPE")]
    pub expert_wire_dtype: Option<String>,
    /// Deadline of one call to a shard, in milliseconds; a shard that misses it is routed
    /// around [default: 5000].
    #[arg(long, env = "SWITCHYARD_EXPERT_TIMEOUT_MS")]
    pub expert_timeout_ms: Option<u64>,
    /// How long start-up waits for every routed expert to have a shard, in seconds, before
    /// serving anyway [default: 300].
    #[arg(long, env = "SWITCHYARD_EXPERT_WAIT_SECS")]
    pub expert_wait_secs: Option<u64>,
    /// Split decode steps into two micro-batches so one's attention overlaps the other's
    /// remote experts (`--overlap false` to turn off) [default: true].
    #[arg(long, env = "SWITCHYARD_OVERLAP", action = clap::ArgAction::Set)]
    pub overlap: Option<bool>,
    /// Reuse the KV-cache blocks of a prompt prefix the same tenant sent before (the
    /// prefix cache; `--prefix-cache false` to turn off) [default: true].
    #[arg(long, env = "SWITCHYARD_PREFIX_CACHE", action = clap::ArgAction::Set)]
    pub prefix_cache: Option<bool>,
    /// Admission settings as a JSON file in the shape of worker.json's `admission` object
    /// (`apiKeysDir`, `tiers`, `defaultTier`, `maxQueued`, `defaultDeadlineSeconds`; see
    /// docs/admission.md) [default: no API keys, one unlimited tier, 256 queued, 30 s;
    /// worker.json: admission].
    #[arg(long, env = "SWITCHYARD_ADMISSION_CONFIG")]
    pub admission_config: Option<PathBuf>,
    /// Requests running in the engine at most (the rest wait in the fair queue)
    /// [default: the max batch size].
    #[arg(long, env = "SWITCHYARD_MAX_INFLIGHT")]
    pub max_inflight: Option<usize>,
    /// Longest a call to the Redis of shared quotas (worker.json `admission.quotaScope`,
    /// mode redis) may take, in milliseconds; past it the request is decided by this
    /// frontend's split share [default: 50].
    #[arg(long, env = "SWITCHYARD_QUOTA_REDIS_TIMEOUT_MS")]
    pub quota_redis_timeout_ms: Option<u64>,
}

/// Expert-shard flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ShardArgs {
    /// This shard's index in the deployment (its entry in the placement) [default: 0].
    #[arg(long, env = "SWITCHYARD_SHARD_INDEX")]
    pub shard_index: Option<u32>,
    /// Hold an even share of every MoE layer's experts, as shard `--shard-index` of this
    /// many (contiguous near-equal blocks). Ignored with `--placement`; refused with
    /// --config (worker.json's shards.count).
    #[arg(long, env = "SWITCHYARD_SHARD_COUNT")]
    pub shard_count: Option<u32>,
    /// The placement file (JSON; see docs/experts.md), re-read on change; overrides
    /// worker.json's even spread [default: every routed expert, or worker.json's spread].
    #[arg(long, env = "SWITCHYARD_PLACEMENT")]
    pub placement: Option<PathBuf>,
    /// Fault injection for tests: delay every Forward by this many ms.
    #[arg(long, hide = true)]
    pub debug_forward_delay_ms: Option<u64>,
}

/// Where the checkpoint comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A checkpoint directory.
    Dir(PathBuf),
    /// The built-in demo model, generated into `cache` (default `~/.cache/switchyard`).
    Demo { cache: Option<PathBuf> },
}

/// The checkpoint and how to compute with it (both roles).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSettings {
    /// The checkpoint.
    pub source: ModelSource,
    /// The id clients and shards use; `None`: the checkpoint directory's name.
    pub model_id: Option<String>,
    /// `auto`, `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// How weight matrices are stored.
    pub quantization: Quantization,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
}

impl ModelSettings {
    fn resolve(
        args: &ModelArgs,
        config: Option<&WorkerConfig>,
        role: &'static str,
    ) -> Result<Self, SettingsError> {
        let device = args.device.clone().unwrap_or_else(|| DEFAULT_DEVICE.into());
        let Some(config) = config else {
            let Some(model) = &args.model else {
                return Err(SettingsError::NoModel { role });
            };
            let quantization = Quantization::parse(args.quantization.as_deref().unwrap_or(""))
                .map_err(|message| SettingsError::Invalid {
                    flag: "--quantization",
                    message,
                })?;
            return Ok(Self {
                quantization,
                source: if model.as_os_str() == "demo" {
                    ModelSource::Demo {
                        cache: args.cache_dir.clone(),
                    }
                } else {
                    ModelSource::Dir(model.clone())
                },
                model_id: args.model_id.clone(),
                dtype: args.dtype.clone().unwrap_or_else(|| DEFAULT_DTYPE.into()),
                device,
            });
        };
        refuse(
            args.model.is_some(),
            "--model",
            "SWITCHYARD_MODEL",
            "worker.json's model.path names the checkpoint",
        )?;
        refuse(
            args.model_id.is_some(),
            "--model-id",
            "SWITCHYARD_MODEL_ID",
            "the model id is worker.json's deployment, which the frontends and shards share",
        )?;
        refuse(
            args.dtype.is_some(),
            "--dtype",
            "SWITCHYARD_DTYPE",
            "worker.json's model.dtype sets it, and frontends and shards must compute in the same dtype",
        )?;
        refuse(
            args.quantization.is_some(),
            "--quantization",
            "SWITCHYARD_QUANTIZATION",
            "worker.json's model.quantization sets it, and frontends and shards must hold the same weights",
        )?;
        let quantization = Quantization::parse(&config.model.quantization).map_err(|message| {
            SettingsError::Invalid {
                flag: "worker.json model.quantization",
                message,
            }
        })?;
        if let Some(group) = config.model.quantization_group_size
            && group != crate::model::quant::GROUP_SIZE
        {
            return Err(SettingsError::Invalid {
                flag: "worker.json model.quantizationGroupSize",
                message: format!(
                    "{group}: every quantized type here has one scale per {} weights; set {} or leave it out",
                    crate::model::quant::GROUP_SIZE,
                    crate::model::quant::GROUP_SIZE
                ),
            });
        }
        Ok(Self {
            quantization,
            source: ModelSource::Dir(PathBuf::from(&config.model.path)),
            model_id: Some(config.deployment.clone()),
            dtype: config.model.dtype.clone(),
            device,
        })
    }

    /// The checkpoint directory and the model id; generates the demo model on first use.
    pub fn open(&self) -> Result<(PathBuf, String), StartError> {
        let dir = match &self.source {
            ModelSource::Dir(dir) => dir.clone(),
            ModelSource::Demo { cache } => {
                let cache = match cache {
                    Some(dir) => dir.clone(),
                    None => default_cache_dir()?,
                };
                tracing::info!(cache = %cache.display(), "using the built-in demo model (random weights)");
                crate::model::demo::ensure(&cache)
                    .map_err(|source| StartError::Demo { cache, source })?
            }
        };
        let id = self
            .model_id
            .clone()
            .unwrap_or_else(|| default_model_id(&dir));
        Ok((dir, id))
    }

    fn describe(&self) -> String {
        match &self.source {
            ModelSource::Dir(dir) => dir.display().to_string(),
            ModelSource::Demo { .. } => "demo".into(),
        }
    }
}

fn refuse(
    set: bool,
    flag: &'static str,
    env: &'static str,
    why: &'static str,
) -> Result<(), SettingsError> {
    if set {
        return Err(SettingsError::RefusedWithConfig { flag, env, why });
    }
    Ok(())
}

/// Where admission's keys, tiers and queue settings come from.
#[derive(Debug, Clone, PartialEq)]
pub enum AdmissionSource {
    /// No API keys, one unlimited tier, 256 queued, 30 s ([`AdmissionOptions::open`]).
    Open,
    /// worker.json's `admission` object.
    WorkerJson(AdmissionConfig),
    /// `--admission-config`, read at start-up.
    File(PathBuf),
}

/// Everything the frontend role runs with, decided.
#[derive(Debug, Clone)]
pub struct FrontendSettings {
    /// The checkpoint.
    pub model: ModelSettings,
    /// Sequences decoded together at most.
    pub max_batch_size: usize,
    /// New tokens per engine step at most.
    pub max_batch_tokens: usize,
    /// Context length; `None`: the model's.
    pub max_context: Option<usize>,
    /// Largest `max_tokens` per request.
    pub max_tokens_per_request: usize,
    /// KV-cache capacity in tokens; `None`: max batch size × min(context, 2048).
    pub kv_cache_tokens: Option<u64>,
    /// Tokens per KV-cache block.
    pub kv_block_size: usize,
    /// Routed experts on expert shards; `None`: all in this process.
    pub experts: Option<RemoteOptions>,
    /// Two overlapping micro-batches per decode step.
    pub overlap: bool,
    /// The prefix cache.
    pub prefix_cache: bool,
    /// Keys, tiers, queue bound and default deadline.
    pub admission: AdmissionSource,
    /// Requests in the engine at most.
    pub max_inflight: usize,
    /// Longest a Redis call of shared quotas may take.
    pub quota_redis_timeout: Duration,
}

impl FrontendSettings {
    /// Defaults, then `config` (worker.json), then what `model` and `args` set.
    pub fn resolve(
        model: &ModelArgs,
        args: &FrontendArgs,
        config: Option<&WorkerConfig>,
    ) -> Result<Self, SettingsError> {
        let model = ModelSettings::resolve(model, config, "frontend")?;
        let serving = config.map(|c| &c.serving);
        let max_batch_size = args
            .max_batch_size
            .or(serving.map(|s| s.max_batch_size as usize))
            .unwrap_or(DEFAULT_MAX_BATCH_SIZE);
        let targets = match (&args.expert_shards, config) {
            (Some(spec), _) => {
                Some(
                    ShardTargets::parse(spec).map_err(|message| SettingsError::Invalid {
                        flag: "--expert-shards",
                        message,
                    })?,
                )
            }
            // Every ready shard pod the headless Service resolves to, re-resolved each
            // refresh: the shards, and the copies (`experts.replicaShards`) as they come
            // and go, with no restart.
            (None, Some(c)) if c.shards.count > 0 => Some(ShardTargets::Dns {
                host: c.shards.service.clone(),
                port: c.shards.port,
            }),
            (None, _) => None,
        };
        let experts = match targets {
            None => None,
            Some(targets) => Some(remote_options(
                targets,
                args.expert_wire_dtype
                    .as_deref()
                    .unwrap_or(DEFAULT_EXPERT_WIRE_DTYPE),
                args.expert_timeout_ms.unwrap_or(DEFAULT_EXPERT_TIMEOUT_MS),
                args.expert_wait_secs.unwrap_or(DEFAULT_EXPERT_WAIT_SECS),
            )?),
        };
        let admission = match (&args.admission_config, config) {
            (Some(path), _) => AdmissionSource::File(path.clone()),
            (None, Some(c)) => AdmissionSource::WorkerJson(c.admission.clone()),
            (None, None) => AdmissionSource::Open,
        };
        Ok(Self {
            model,
            max_batch_size,
            max_batch_tokens: args
                .max_batch_tokens
                .or(serving.map(|s| s.max_batch_tokens as usize))
                .unwrap_or(DEFAULT_MAX_BATCH_TOKENS),
            max_context: args
                .max_context
                .or(serving.and_then(|s| s.max_context_length.map(|n| n as usize))),
            max_tokens_per_request: args
                .max_tokens_per_request
                .or(serving.map(|s| s.max_tokens_per_request as usize))
                .unwrap_or(DEFAULT_MAX_TOKENS_PER_REQUEST),
            kv_cache_tokens: args
                .kv_cache_tokens
                .or(serving.and_then(|s| s.kv_cache_tokens)),
            kv_block_size: args.kv_block_size.unwrap_or(DEFAULT_KV_BLOCK_SIZE),
            experts,
            overlap: args.overlap.unwrap_or(DEFAULT_OVERLAP),
            prefix_cache: args.prefix_cache.unwrap_or(DEFAULT_PREFIX_CACHE),
            admission,
            max_inflight: args.max_inflight.unwrap_or(max_batch_size),
            quota_redis_timeout: args
                .quota_redis_timeout_ms
                .map_or(crate::admission::scope::DEFAULT_REDIS_TIMEOUT, |ms| {
                    Duration::from_millis(ms.max(1))
                }),
        })
    }

    /// One structured line with every effective setting (no secrets: API keys stay in
    /// their directory).
    pub fn log(&self) {
        let admission = match &self.admission {
            AdmissionSource::Open => "open (no API keys, one unlimited tier)".to_string(),
            AdmissionSource::WorkerJson(a) => format!(
                "worker.json ({} tiers, keys {}, {} queued, {} s deadline)",
                a.tiers.len(),
                a.api_keys_dir.as_deref().unwrap_or("none"),
                a.max_queued,
                a.default_deadline_seconds
            ),
            AdmissionSource::File(path) => format!("file {}", path.display()),
        };
        tracing::info!(
            role = "frontend",
            model = %self.model.describe(),
            model_id = ?self.model.model_id,
            dtype = %self.model.dtype,
            quantization = %self.model.quantization,
            device = %self.model.device,
            max_batch_size = self.max_batch_size,
            max_batch_tokens = self.max_batch_tokens,
            max_context = ?self.max_context,
            max_tokens_per_request = self.max_tokens_per_request,
            kv_cache_tokens = ?self.kv_cache_tokens,
            kv_block_size = self.kv_block_size,
            expert_shards = ?self.experts.as_ref().map(|e| &e.targets),
            expert_wire_dtype = ?self.experts.as_ref().map(|e| e.wire),
            expert_timeout_ms = ?self.experts.as_ref().map(|e| e.timeout.as_millis()),
            expert_wait_secs = ?self.experts.as_ref().map(|e| e.wait.as_secs()),
            overlap = self.overlap,
            prefix_cache = self.prefix_cache,
            admission = %admission,
            max_inflight = self.max_inflight,
            quota_redis_timeout_ms = self.quota_redis_timeout.as_millis(),
            "effective settings"
        );
    }

    /// The options `frontend::start` takes: generates the demo model and reads
    /// `--admission-config` (the only I/O of settings).
    pub fn into_options(self) -> Result<FrontendOptions, StartError> {
        let (model, model_id) = self.model.open()?;
        let mut admission = AdmissionOptions::open(self.max_inflight);
        admission.redis_timeout = self.quota_redis_timeout;
        match self.admission {
            AdmissionSource::Open => {}
            AdmissionSource::WorkerJson(config) => admission.config = config,
            AdmissionSource::File(path) => {
                let what = "--admission-config";
                let text = std::fs::read_to_string(&path).map_err(|source| StartError::Read {
                    what,
                    path: path.clone(),
                    source,
                })?;
                admission.config = serde_json::from_str(&text)
                    .map_err(|source| StartError::Json { what, path, source })?;
            }
        }
        Ok(FrontendOptions {
            model,
            model_id,
            dtype: self.model.dtype,
            quantization: self.model.quantization,
            device: self.model.device,
            max_batch_size: self.max_batch_size,
            max_batch_tokens: self.max_batch_tokens,
            max_context_length: self.max_context,
            max_tokens_per_request: self.max_tokens_per_request,
            kv_cache_tokens: self.kv_cache_tokens,
            kv_block_size: self.kv_block_size,
            experts: self.experts,
            overlap: self.overlap,
            prefix_cache: self.prefix_cache,
            admission,
        })
    }
}

/// Everything the expert-shard role runs with, decided.
#[derive(Debug, Clone)]
pub struct ShardSettings {
    /// The checkpoint.
    pub model: ModelSettings,
    /// This shard's index in the deployment.
    pub shard_index: u32,
    /// What to hold.
    pub placement: PlacementSource,
    /// Fault injection for tests.
    pub forward_delay: Option<Duration>,
}

impl ShardSettings {
    /// Defaults, then `config` (worker.json: an even spread over `shards.count`), then what
    /// `model` and `args` set (`--placement` replaces the even spread).
    pub fn resolve(
        model: &ModelArgs,
        args: &ShardArgs,
        config: Option<&WorkerConfig>,
    ) -> Result<Self, SettingsError> {
        let model = ModelSettings::resolve(model, config, "expert shard")?;
        if config.is_some() {
            refuse(
                args.shard_count.is_some(),
                "--shard-count",
                "SWITCHYARD_SHARD_COUNT",
                "worker.json's shards.count sets how many shards the experts spread over, \
                 and the frontends address exactly that many",
            )?;
        }
        let shard = args.shard_index.unwrap_or(0);
        let placement = match (&args.placement, config) {
            (Some(path), _) => PlacementSource::File {
                path: path.clone(),
                shard,
            },
            (None, Some(c)) => match (c.placement.strategy, &c.placement.file) {
                (PlacementStrategy::EvenSpread, _) => PlacementSource::EvenSpread {
                    shards: c.shards.count.max(1),
                    shard,
                    revision: c.placement.revision.clone(),
                },
                (PlacementStrategy::Balanced, Some(file)) => PlacementSource::Balanced {
                    path: PathBuf::from(file),
                    shards: c.shards.count.max(1),
                    shard,
                    revision: c.placement.revision.clone(),
                },
                (PlacementStrategy::Balanced, None) => {
                    return Err(SettingsError::Invalid {
                        flag: "--config",
                        message: "worker.json: placement.strategy balanced needs \
                                  placement.file, the placement file the operator writes"
                            .into(),
                    });
                }
            },
            (None, None) => match args.shard_count {
                Some(n) => PlacementSource::EvenSpread {
                    shards: n,
                    shard,
                    revision: format!("even-{n}"),
                },
                None => PlacementSource::All,
            },
        };
        Ok(Self {
            model,
            shard_index: shard,
            placement,
            forward_delay: args.debug_forward_delay_ms.map(Duration::from_millis),
        })
    }

    /// One structured line with every effective setting.
    pub fn log(&self) {
        tracing::info!(
            role = "expert-shard",
            model = %self.model.describe(),
            model_id = ?self.model.model_id,
            dtype = %self.model.dtype,
            quantization = %self.model.quantization,
            device = %self.model.device,
            shard_index = self.shard_index,
            placement = ?self.placement,
            forward_delay_ms = ?self.forward_delay.map(|d| d.as_millis()),
            "effective settings"
        );
    }

    /// The options `experts::shard::start` takes (generates the demo model on first use).
    pub fn into_options(self) -> Result<ShardOptions, StartError> {
        let (model, model_id) = self.model.open()?;
        Ok(ShardOptions {
            model,
            model_id,
            dtype: self.model.dtype,
            quantization: self.model.quantization,
            device: self.model.device,
            shard_index: self.shard_index,
            placement: self.placement,
            max_request_bytes: MAX_REQUEST_BYTES,
            forward_delay: self.forward_delay,
        })
    }
}

/// Remote-expert options from flag values; errors name the flag.
pub fn remote_options(
    targets: ShardTargets,
    wire: &str,
    timeout_ms: u64,
    wait_secs: u64,
) -> Result<RemoteOptions, SettingsError> {
    Ok(RemoteOptions {
        targets,
        wire: crate::experts::wire::parse_dtype(wire).map_err(|message| {
            SettingsError::Invalid {
                flag: "--expert-wire-dtype",
                message,
            }
        })?,
        timeout: Duration::from_millis(timeout_ms.max(1)),
        refresh: Duration::from_secs(1),
        wait: Duration::from_secs(wait_secs),
    })
}

/// The model id clients and shards use unless told: the checkpoint directory's name.
pub fn default_model_id(model: &Path) -> String {
    model
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
}

fn default_cache_dir() -> Result<PathBuf, StartError> {
    let home = std::env::var_os("HOME")
        .ok_or_else(|| StartError::invalid("HOME is not set; pass --cache-dir"))?;
    Ok(PathBuf::from(home).join(".cache/switchyard"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory as _, Parser as _};
    use switchyard_proto::expert::v1::Dtype;
    use switchyard_proto::worker_config::{
        ModelConfig, PlacementConfig, PlacementStrategy, ServingConfig, ShardsConfig,
    };

    /// The worker's role flags, as the binary flattens them.
    #[derive(Debug, clap::Parser)]
    struct Args {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        frontend: FrontendArgs,
        #[command(flatten)]
        shard: ShardArgs,
        // Not read by the settings, but server flags all the same: the env test walks them.
        #[command(flatten)]
        transport: crate::server::TransportLimits,
        #[command(flatten)]
        drain: crate::drain::DrainArgs,
        #[command(flatten)]
        tls: crate::tls::TlsArgs,
    }

    fn parse(flags: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("switchyard-worker").chain(flags.iter().copied()))
            .expect("flags parse")
    }

    fn worker_json() -> WorkerConfig {
        WorkerConfig {
            version: 1,
            deployment: "md".into(),
            model: ModelConfig {
                path: "/models".into(),
                dtype: "bf16".into(),
                quantization: "none".into(),
                quantization_group_size: None,
            },
            serving: ServingConfig {
                port: 50051,
                max_batch_size: 64,
                max_batch_tokens: 8192,
                max_context_length: Some(4096),
                max_tokens_per_request: 2048,
                kv_cache_tokens: Some(100_000),
            },
            admission: AdmissionConfig {
                api_keys_dir: Some("/etc/switchyard/api-keys".into()),
                tiers: Vec::new(),
                default_tier: None,
                max_queued: 99,
                default_deadline_seconds: 30,
                quota_scope: None,
            },
            shards: ShardsConfig {
                count: 2,
                service: "md-experts.ns.svc".into(),
                pod_prefix: "md-experts-".into(),
                port: 50051,
            },
            placement: PlacementConfig {
                strategy: PlacementStrategy::EvenSpread,
                file: None,
                revision: "rev1".into(),
            },
        }
    }

    fn frontend(args: &Args, config: Option<&WorkerConfig>) -> FrontendSettings {
        FrontendSettings::resolve(&args.model, &args.frontend, config).expect("settings")
    }

    #[test]
    fn without_worker_json_every_unset_flag_takes_its_default() {
        let s = frontend(&parse(&["--model", "/ckpt"]), None);
        assert_eq!(s.model.source, ModelSource::Dir("/ckpt".into()));
        assert_eq!(s.model.model_id, None);
        assert_eq!(
            (s.model.dtype.as_str(), s.model.device.as_str()),
            ("auto", "auto")
        );
        assert_eq!(
            (
                s.max_batch_size,
                s.max_batch_tokens,
                s.max_tokens_per_request
            ),
            (32, 512, 1024)
        );
        assert_eq!(
            (s.max_context, s.kv_cache_tokens, s.kv_block_size),
            (None, None, 16)
        );
        assert!(s.experts.is_none());
        assert!(s.overlap);
        assert_eq!(s.admission, AdmissionSource::Open);
        assert_eq!(s.max_inflight, 32, "defaults to the batch size");

        // With shards but no expert flags: the expert defaults, the same as under --config.
        let s = frontend(&parse(&["--model", "demo", "--expert-shards", "h:1"]), None);
        assert_eq!(s.model.source, ModelSource::Demo { cache: None });
        let e = s.experts.expect("remote experts");
        assert_eq!(e.wire, Dtype::F32);
        assert_eq!(e.timeout, Duration::from_millis(DEFAULT_EXPERT_TIMEOUT_MS));
        assert_eq!(e.wait, Duration::from_secs(DEFAULT_EXPERT_WAIT_SECS));

        let s = ShardSettings::resolve(
            &parse(&["--model", "/ckpt"]).model,
            &ShardArgs::default(),
            None,
        )
        .expect("settings");
        assert_eq!((s.shard_index, &s.placement), (0, &PlacementSource::All));
    }

    #[test]
    fn worker_json_replaces_the_defaults() {
        let config = worker_json();
        let s = frontend(&parse(&[]), Some(&config));
        assert_eq!(s.model.source, ModelSource::Dir("/models".into()));
        assert_eq!(s.model.model_id.as_deref(), Some("md"));
        assert_eq!(
            (s.model.dtype.as_str(), s.model.device.as_str()),
            ("bf16", "auto")
        );
        assert_eq!(
            (
                s.max_batch_size,
                s.max_batch_tokens,
                s.max_tokens_per_request
            ),
            (64, 8192, 2048)
        );
        assert_eq!(
            (s.max_context, s.kv_cache_tokens),
            (Some(4096), Some(100_000))
        );
        assert_eq!(
            s.admission,
            AdmissionSource::WorkerJson(config.admission.clone())
        );
        assert_eq!(s.max_inflight, 64);
        let e = s.experts.expect("worker.json has shards");
        assert_eq!(
            e.targets,
            ShardTargets::Dns {
                host: config.shards.service.clone(),
                port: config.shards.port,
            }
        );
        assert_eq!(e.wait, Duration::from_secs(DEFAULT_EXPERT_WAIT_SECS));

        let s = ShardSettings::resolve(
            &ModelArgs::default(),
            &parse(&["--shard-index", "1"]).shard,
            Some(&config),
        )
        .expect("settings");
        assert_eq!(
            s.placement,
            PlacementSource::EvenSpread {
                shards: 2,
                shard: 1,
                revision: "rev1".into()
            }
        );

        // The balanced placement: the operator's file, the even spread until it exists.
        let mut balanced = config.clone();
        balanced.placement.strategy = PlacementStrategy::Balanced;
        balanced.placement.file = Some("/etc/switchyard/placement/placement.json".into());
        let shard_args = parse(&["--shard-index", "1"]).shard;
        let s = ShardSettings::resolve(&ModelArgs::default(), &shard_args, Some(&balanced))
            .expect("settings");
        assert_eq!(
            s.placement,
            PlacementSource::Balanced {
                path: "/etc/switchyard/placement/placement.json".into(),
                shards: 2,
                shard: 1,
                revision: "rev1".into()
            }
        );
        balanced.placement.file = None;
        let e = ShardSettings::resolve(&ModelArgs::default(), &shard_args, Some(&balanced))
            .unwrap_err()
            .to_string();
        assert!(e.contains("balanced needs placement.file"), "{e}");
    }

    #[test]
    fn a_flag_beats_worker_json() {
        let config = worker_json();
        let args = parse(&[
            "--device",
            "cpu",
            "--max-batch-size",
            "8",
            "--max-context",
            "256",
            "--max-inflight",
            "4",
            "--overlap",
            "false",
            "--expert-shards",
            "dns:///shards:7000",
            "--expert-wire-dtype",
            "bf16",
            "--expert-timeout-ms",
            "250",
            "--expert-wait-secs",
            "120",
            "--admission-config",
            "/tmp/admission.json",
        ]);
        let s = frontend(&args, Some(&config));
        assert_eq!(s.model.device, "cpu");
        assert_eq!(
            (s.max_batch_size, s.max_context, s.max_inflight),
            (8, Some(256), 4)
        );
        assert_eq!(
            s.max_batch_tokens, 8192,
            "unset flags keep worker.json's value"
        );
        assert!(!s.overlap);
        assert_eq!(
            s.admission,
            AdmissionSource::File("/tmp/admission.json".into())
        );
        let e = s.experts.expect("remote experts");
        assert_eq!(
            e.targets,
            ShardTargets::Dns {
                host: "shards".into(),
                port: 7000
            }
        );
        assert_eq!(
            (e.wire, e.timeout, e.wait),
            (
                Dtype::Bf16,
                Duration::from_millis(250),
                Duration::from_secs(120)
            )
        );

        let shard = parse(&["--placement", "/p.json", "--shard-index", "1"]).shard;
        let s =
            ShardSettings::resolve(&ModelArgs::default(), &shard, Some(&config)).expect("settings");
        assert_eq!(
            s.placement,
            PlacementSource::File {
                path: "/p.json".into(),
                shard: 1
            }
        );
    }

    #[test]
    fn quantization_comes_from_worker_json_or_the_flag_and_bad_values_are_named() {
        let mut config = worker_json();
        config.model.quantization = "int4".into();
        config.model.quantization_group_size = Some(32);
        let s = ModelSettings::resolve(&parse(&[]).model, Some(&config), "frontend").expect("int4");
        assert_eq!(s.quantization, Quantization::Int4);
        config.model.quantization_group_size = Some(128);
        let e = ModelSettings::resolve(&parse(&[]).model, Some(&config), "frontend")
            .expect_err("group 128");
        assert!(e.to_string().contains("quantizationGroupSize"), "{e}");
        config.model.quantization = "int3".into();
        let e =
            ModelSettings::resolve(&parse(&[]).model, Some(&config), "frontend").expect_err("int3");
        assert!(e.to_string().contains("auto, none, int8, int4"), "{e}");
        let args = parse(&["--model", "/m", "--quantization", "int8"]);
        let s = ModelSettings::resolve(&args.model, None, "frontend").expect("flag");
        assert_eq!(s.quantization, Quantization::Int8);
        let args = parse(&["--quantization", "int8"]);
        let e = ModelSettings::resolve(&args.model, Some(&worker_json()), "frontend")
            .expect_err("refused with --config");
        assert!(e.to_string().contains("--quantization"), "{e}");
    }

    /// README.md says so: every flag of the server roles has an environment fallback.
    #[test]
    fn every_server_flag_has_an_environment_variable() {
        let command = Args::command();
        let missing: Vec<String> = command
            .get_arguments()
            .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
            // Hidden fault-injection flags for tests are not in --help.
            .filter(|a| !a.is_hide_set())
            .filter(|a| a.get_env().is_none())
            .map(|a| a.get_id().to_string())
            .collect();
        assert!(
            missing.is_empty(),
            "flags without a SWITCHYARD_* variable: {missing:?}"
        );
    }

    #[test]
    fn an_environment_variable_counts_as_set_and_beats_worker_json() {
        // clap puts a SWITCHYARD_* value into the same `Option` its flag fills, so resolve()
        // cannot tell them apart; setting the process environment here would need `unsafe`
        // (and race the other tests), so this checks each override has its variable and
        // that a value arriving through it wins.
        let command = Args::command();
        for (id, env) in [
            ("device", "SWITCHYARD_DEVICE"),
            ("max_batch_size", "SWITCHYARD_MAX_BATCH_SIZE"),
            ("max_inflight", "SWITCHYARD_MAX_INFLIGHT"),
            (
                "quota_redis_timeout_ms",
                "SWITCHYARD_QUOTA_REDIS_TIMEOUT_MS",
            ),
            ("overlap", "SWITCHYARD_OVERLAP"),
            ("prefix_cache", "SWITCHYARD_PREFIX_CACHE"),
            ("expert_wire_dtype", "SWITCHYARD_EXPERT_WIRE_DTYPE"),
            ("expert_timeout_ms", "SWITCHYARD_EXPERT_TIMEOUT_MS"),
            ("expert_wait_secs", "SWITCHYARD_EXPERT_WAIT_SECS"),
            ("shard_index", "SWITCHYARD_SHARD_INDEX"),
        ] {
            let arg = command
                .get_arguments()
                .find(|a| a.get_id() == id)
                .unwrap_or_else(|| panic!("no flag {id}"));
            assert_eq!(arg.get_env(), Some(std::ffi::OsStr::new(env)), "{id}");
        }
        let config = worker_json();
        let mut args = parse(&[]);
        // What SWITCHYARD_DEVICE=cuda:1 and SWITCHYARD_EXPERT_WAIT_SECS=7 leave in the args.
        args.model.device = Some("cuda:1".into());
        args.frontend.expert_wait_secs = Some(7);
        let s = frontend(&args, Some(&config));
        assert_eq!(s.model.device, "cuda:1");
        assert_eq!(s.experts.expect("remote").wait, Duration::from_secs(7));
    }

    #[test]
    fn flags_that_worker_json_fixes_are_refused_with_config() {
        let config = worker_json();
        for (flags, flag, reason) in [
            (&["--model", "/elsewhere"][..], "--model", "model.path"),
            (&["--model-id", "x"][..], "--model-id", "deployment"),
            (&["--dtype", "f32"][..], "--dtype", "model.dtype"),
        ] {
            let args = parse(flags);
            let err = FrontendSettings::resolve(&args.model, &args.frontend, Some(&config))
                .expect_err("refused")
                .to_string();
            assert!(err.starts_with(&format!("{flag} (or SWITCHYARD_")), "{err}");
            assert!(err.contains("cannot be used with --config"), "{err}");
            assert!(err.contains(reason), "{err}");
            let err = ShardSettings::resolve(&args.model, &args.shard, Some(&config))
                .expect_err("refused for shards too")
                .to_string();
            assert!(err.starts_with(flag), "{err}");
        }
        let args = parse(&["--shard-count", "4"]);
        let err = ShardSettings::resolve(&args.model, &args.shard, Some(&config))
            .expect_err("refused")
            .to_string();
        assert!(err.starts_with("--shard-count (or SWITCHYARD_SHARD_COUNT) cannot be used with --config: worker.json's shards.count"), "{err}");

        let err = FrontendSettings::resolve(&ModelArgs::default(), &FrontendArgs::default(), None)
            .expect_err("no model")
            .to_string();
        assert!(err.contains("pass --model DIR"), "{err}");
        let args = parse(&[
            "--model",
            "m",
            "--expert-shards",
            "h:1",
            "--expert-wire-dtype",
            "f8",
        ]);
        let err = FrontendSettings::resolve(&args.model, &args.frontend, None)
            .expect_err("bad wire dtype")
            .to_string();
        assert!(err.starts_with("--expert-wire-dtype: "), "{err}");
    }

    /// Found by `any_worker_json_is_used_or_refused_by_name`: an empty `apiKeysDir` read
    /// the current directory's missing "" and said only "API keys : No such file".
    #[test]
    fn an_empty_api_keys_dir_is_refused_by_name() {
        let mut config = worker_json().admission;
        for dir in ["", "  "] {
            config.api_keys_dir = Some(dir.into());
            let opts = crate::admission::AdmissionOptions {
                config: config.clone(),
                ..crate::admission::AdmissionOptions::open(4)
            };
            let err = crate::admission::Admission::new(&opts, &prometheus::Registry::new())
                .expect_err("refused")
                .to_string();
            assert!(err.starts_with("admission.apiKeysDir: empty"), "{err}");
        }
        config.api_keys_dir = Some("/nonexistent/keys".into());
        let opts = crate::admission::AdmissionOptions {
            config,
            ..crate::admission::AdmissionOptions::open(4)
        };
        let err = crate::admission::Admission::new(&opts, &prometheus::Registry::new())
            .expect_err("refused")
            .to_string();
        assert!(
            err.starts_with("admission.apiKeysDir: API keys /nonexistent/keys"),
            "{err}"
        );
    }

    /// Every leaf of `v` as a JSON pointer.
    fn leaves(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    leaves(x, format!("{at}/{k}"), out);
                }
            }
            serde_json::Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    leaves(x, format!("{at}/{i}"), out);
                }
            }
            _ => out.push(at),
        }
    }

    fn any_json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::json;
        prop_oneof![
            any::<u64>().prop_map(|n| json!(n)),
            any::<i64>().prop_map(|n| json!(n)),
            prop_oneof![
                Just(0u64),
                Just(1),
                Just(u64::from(u32::MAX)),
                Just(u64::MAX)
            ]
            .prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            "[ -~]{0,12}".prop_map(|t| json!(t)),
            any::<bool>().prop_map(|b| json!(b)),
            Just(serde_json::Value::Null),
            // A tier, possibly malformed.
            (
                "[a-z]{0,3}",
                "low|normal|high|critical|[a-z]{0,4}",
                any::<u32>(),
                proptest::option::of(prop_oneof![Just(0u64), any::<u64>()]),
                proptest::option::of(any::<u64>()),
                proptest::option::of(prop_oneof![0u32..=100, any::<u32>()]),
            )
                .prop_map(|(name, priority, weight, rpm, tpm, percent)| {
                    json!([{"name": name, "priority": priority, "weight": weight,
                            "requestsPerMinute": rpm, "tokensPerMinute": tpm,
                            "cachedPromptTokenPercent": percent}])
                }),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 1000, ..Default::default() })]

        /// Any worker.json: the operator's file with up to four fields replaced by other
        /// values (extremes, other types, a malformed tier), or cut short. Parsing, both
        /// roles' settings, admission and the shard's placement accept it or refuse it with
        /// a message naming the file or the field; never a panic, never an allocation sized
        /// by a number in the file.
        #[test]
        fn any_worker_json_is_used_or_refused_by_name(
            edits in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), any_json_value()),
                0..4,
            ),
            cut in proptest::option::of(proptest::prelude::any::<proptest::sample::Index>()),
            tiers in proptest::option::of(any_json_value()),
        ) {
            let mut v = serde_json::to_value(worker_json()).expect("encodes");
            v["admission"]["apiKeysDir"] = serde_json::Value::Null;
            if let Some(t) = tiers {
                v["admission"]["tiers"] = t;
            }
            let mut paths = Vec::new();
            leaves(&v, String::new(), &mut paths);
            for (at, value) in edits {
                let path = at.get(&paths).clone();
                if let Some(slot) = v.pointer_mut(&path) {
                    *slot = value;
                }
            }
            let mut text = v.to_string();
            if let Some(cut) = cut {
                text.truncate(cut.index(text.len() + 1));
            }
            let file = std::path::Path::new("/etc/switchyard/worker.json");
            let config = match crate::config::parse(file, &text) {
                Ok(c) => c,
                Err(e) => {
                    proptest::prop_assert!(e.to_string().contains("/etc/switchyard/worker.json"), "{}", e);
                    return Ok(());
                }
            };
            let args = parse(&[]);
            match FrontendSettings::resolve(&args.model, &args.frontend, Some(&config)) {
                Ok(f) => {
                    if let AdmissionSource::WorkerJson(a) = &f.admission {
                        let opts = crate::admission::AdmissionOptions {
                            config: a.clone(),
                            ..crate::admission::AdmissionOptions::open(f.max_inflight)
                        };
                        if let Err(e) = crate::admission::Admission::new(&opts, &prometheus::Registry::new()) {
                            proptest::prop_assert!(e.to_string().contains("admission."), "{}", e);
                        }
                    }
                }
                Err(e) => proptest::prop_assert!(e.to_string().contains(':'), "{}", e),
            }
            match ShardSettings::resolve(&args.model, &args.shard, Some(&config)) {
                Ok(sh) => {
                    let raw: crate::model::config::RawConfig = serde_json::from_value(serde_json::json!({
                        "model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 16,
                        "intermediate_size": 32, "moe_intermediate_size": 8,
                        "num_hidden_layers": 2, "num_attention_heads": 2,
                        "num_key_value_heads": 2, "num_experts": 8, "num_experts_per_tok": 2
                    })).expect("raw config");
                    let cfg = crate::model::config::resolve(std::path::Path::new("config.json"), raw)
                        .expect("a valid config");
                    if let Err(e) = sh.placement.resolve(&cfg) {
                        proptest::prop_assert!(e.to_string().contains("worker.json"), "{}", e);
                    }
                }
                Err(e) => proptest::prop_assert!(e.to_string().contains(':'), "{}", e),
            }
        }
    }
}
