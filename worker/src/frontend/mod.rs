//! The frontend role: one model behind `switchyard.v1.Inference`.
//!
//! ```text
//!  FrontendOptions (from settings::FrontendSettings: defaults, worker.json, env, flags)
//!     └─ start(): LoadedModel + Tokenizer → EngineHandle (engine thread) → Frontend
//!  gRPC ─> admission layers ─> service::Frontend ─ validate ─> admit ─> engine ─ tokens
//!                                          ─> detokenize, stop strings ─> client
//!  HTTP /v1 (same port) ─> openai::Wire ─> admission layers ─> openai ─> admit ─> engine
//!  HTTP ─> telemetry::serve_metrics  (/metrics, /healthz)
//! ```
//!
//! - [`validate`]: request checks, each failure naming the field and the accepted range.
//! - [`service`]: the `Inference` implementation.
//! - [`openai`]: the OpenAI-compatible HTTP API on the same port and pipeline.
//! - [`metrics`]: the Prometheus metrics (served by [`crate::telemetry`]).

pub mod expert_load;
pub mod metrics;
pub mod openai;
pub mod service;
pub mod validate;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use switchyard_proto::inference::v1 as pb;

use crate::StartError;
use crate::engine::{EngineConfig, EngineHandle};
use crate::model::LoadedModel;
use crate::model::attention::PagedKv;
use crate::text::Tokenizer;
pub use metrics::FrontendMetrics;
pub use service::Frontend;

/// Everything the frontend needs to start.
#[derive(Debug, Clone)]
pub struct FrontendOptions {
    /// Checkpoint directory.
    pub model: PathBuf,
    /// The id clients use (`ListModels`, `GenerateRequest.model`).
    pub model_id: String,
    /// `auto`, `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// How weight matrices are stored.
    pub quantization: crate::model::quant::Quantization,
    /// `auto` (the first CUDA GPU when built with the `cuda` feature and one is present,
    /// else the CPU), `cpu`, or `cuda:<ordinal>`.
    pub device: String,
    /// Sequences decoded together at most.
    pub max_batch_size: usize,
    /// New tokens per engine step at most (bounds how long a prefill chunk stalls decodes).
    pub max_batch_tokens: usize,
    /// Context length; `None` = the model's.
    pub max_context_length: Option<usize>,
    /// Largest `max_tokens` (also the default when a request sets none).
    pub max_tokens_per_request: usize,
    /// KV-cache capacity in tokens; `None` = what fits in the memory left after the weights
    /// (`engine::kv_budget`).
    pub kv_cache_tokens: Option<u64>,
    /// Tokens per KV block.
    pub kv_block_size: usize,
    /// Routed experts on expert shards; `None`: all in this process.
    pub experts: Option<crate::experts::remote::RemoteOptions>,
    /// Split decode steps into two micro-batches to overlap attention with remote experts.
    pub overlap: bool,
    /// Reuse the KV blocks of prompt prefixes a tenant sent before.
    pub prefix_cache: bool,
    /// API keys, tiers, quotas, the fair queue and the cap on requests in the engine.
    pub admission: crate::admission::AdmissionOptions,
}

/// A started frontend: the service to serve and its metrics.
#[derive(Debug)]
pub struct Started {
    /// The `Inference` service.
    pub service: Frontend,
    /// Its metrics (serve with [`crate::telemetry::serve_metrics`]).
    pub metrics: Arc<FrontendMetrics>,
    /// What `ListModels` reports.
    pub info: pb::ModelInfo,
    /// KV-cache blocks and their size.
    pub kv_blocks: usize,
    /// Admission control, whose layers the service is served behind
    /// ([`crate::server::frontend_service`]).
    pub admission: Arc<crate::admission::Admission>,
    /// With expert shards: `Err` while no reachable shard holds some routed expert (the
    /// readiness probe then reports NOT_SERVING). `None`: every expert is in process.
    pub readiness: Option<crate::server::Readiness>,
    /// The expert shards it calls, when it has them (what each holds, for `/expert-load`).
    pub remote: Option<crate::experts::remote::RemoteExperts>,
}

/// The demand report (`GET /demand`): admission's, with the frontend's KV cache use and
/// recent TTFT from its metrics.
pub fn demand(
    admission: &crate::admission::Admission,
    metrics: &FrontendMetrics,
) -> crate::admission::demand::Demand {
    let mut demand = admission.demand();
    demand.kv_cache = Some(metrics.kv_use());
    demand.ttft = metrics.recent_ttft();
    demand
}

/// The KV cache size when the memory left cannot be measured: `max_batch_size` ×
/// min(context, 2048) tokens, with a warning saying why and what to set.
fn fallback_kv_tokens(opts: &FrontendOptions, context: usize, why: &str) -> u64 {
    let tokens = (opts.max_batch_size * context.min(2048)) as u64;
    tracing::warn!(
        tokens,
        why,
        "sizing the KV cache as maxBatchSize × min(context, 2048); set serving.kvCacheTokens \
         (--kv-cache-tokens) to choose"
    );
    tokens
}

/// Loads the model and tokenizer and starts the engine.
pub fn start(opts: &FrontendOptions) -> Result<Started, StartError> {
    let device = crate::model::parse_device(&opts.device)?;
    let dtype = crate::model::parse_dtype(&opts.dtype, &device).map_err(StartError::Invalid)?;
    let t0 = Instant::now();
    let cfg = crate::model::config::load(&opts.model)?;
    let metrics = Arc::new(FrontendMetrics::new(
        cfg.num_layers,
        cfg.moe.as_ref().map_or(0, |m| m.num_experts),
    ));
    let mut remote_experts = None;
    let loaded = match &opts.experts {
        None => LoadedModel::load(&opts.model, dtype, opts.quantization, &device)?,
        Some(remote) if cfg.moe.is_some() => {
            let rt = tokio::runtime::Handle::try_current().map_err(StartError::NoRuntime)?;
            let mut failure = None;
            let mut backend = None;
            let loaded = LoadedModel::load_with(
                &opts.model,
                dtype,
                opts.quantization,
                &device,
                |cfg, ckpt, precision| {
                    let identity = crate::experts::identity(&opts.model_id, ckpt, precision)?;
                    tracing::info!(model = %crate::experts::describe_identity(Some(&identity)), targets = ?remote.targets, "routed experts are on expert shards");
                    match rt.block_on(crate::experts::remote::RemoteExperts::connect(
                        cfg,
                        identity,
                        remote.clone(),
                        metrics.registry(),
                    )) {
                        Ok(remote) => {
                            backend = Some(remote.clone());
                            Ok(Arc::new(remote))
                        }
                        Err(e) => {
                            let message = switchyard_edge::exit::error_chain(&e);
                            failure = Some(e);
                            Err(crate::model::ModelError::Unsupported {
                                file: opts.model.clone(),
                                what: format!("expert shards: {message}"),
                            })
                        }
                    }
                },
            );
            if let Some(remote) = &backend {
                metrics.set_placement(remote.clone());
            }
            remote_experts = backend;
            match (loaded, failure) {
                (Ok(l), _) => l,
                (Err(_), Some(e)) => return Err(StartError::Shards(Box::new(e))),
                (Err(e), None) => return Err(e.into()),
            }
        }
        Some(_) => {
            tracing::warn!(
                "the model is dense: it has no routed experts to put on shards; running it whole"
            );
            LoadedModel::load(&opts.model, dtype, opts.quantization, &device)?
        }
    };
    let tokenizer =
        Arc::new(
            Tokenizer::load(&opts.model).map_err(|source| StartError::Tokenizer {
                path: opts.model.clone(),
                source,
            })?,
        );
    let cfg = loaded.config.clone();
    // The KV cache is in the activations' dtype; ListModels reports the weights'.
    let dtype = loaded.transformer.dtype();
    let weights_dtype = loaded.transformer.precision().weights;
    let context = opts
        .max_context_length
        .map_or(cfg.max_position_embeddings, |n| {
            n.min(cfg.max_position_embeddings)
        });
    for (value, name) in [
        (opts.kv_block_size, "the KV block size"),
        (opts.max_batch_size, "maxBatchSize"),
        (opts.max_batch_tokens, "maxBatchTokens"),
    ] {
        if value == 0 {
            return Err(StartError::invalid(format!("{name} must be at least 1")));
        }
    }
    let per_token = PagedKv::bytes_per_slot(&cfg, dtype);
    let kv_tokens = match opts.kv_cache_tokens {
        Some(tokens) => tokens,
        // What fits in the memory left now that the weights are loaded.
        None if device.is_cpu() => match crate::engine::kv_budget::cpu_memory_left() {
            Some(left) => {
                // Running requests are at most the engine's cap; the queue holds the rest.
                let held = opts.admission.max_inflight as u64
                    + u64::from(opts.admission.config.max_queued);
                let reserved =
                    crate::engine::kv_budget::reserve(&cfg, opts.max_batch_tokens as u64, held);
                let tokens = crate::engine::kv_budget::tokens_for(
                    left,
                    reserved,
                    per_token as u64,
                    context as u64,
                    opts.max_batch_size as u64,
                )?;
                tracing::info!(
                    left_mib = left >> 20,
                    reserved_mib = reserved >> 20,
                    kv_tokens = tokens,
                    at_most = opts.max_batch_size as u64 * context as u64,
                    "KV cache sized from the memory left after the weights, less one step's \
                     activations and the requests held"
                );
                tokens
            }
            None => fallback_kv_tokens(opts, context, "the memory left cannot be read"),
        },
        None => fallback_kv_tokens(opts, context, "free GPU memory is not measured yet"),
    };
    let kv_blocks = (kv_tokens as usize).div_ceil(opts.kv_block_size);
    let tally = loaded.transformer.weight_tally();
    let quantized = tally.rows().iter().any(|(_, t, _)| t.starts_with('q'));
    let kv_bytes = kv_blocks * opts.kv_block_size * per_token;
    tracing::info!(
        model = %opts.model.display(),
        family = %cfg.family,
        parameters = cfg.parameter_count(),
        weights = ?weights_dtype,
        quantization = %opts.quantization,
        held = %tally,
        activations = ?dtype,
        saved = ?loaded.saved_dtypes,
        context,
        kv_blocks,
        kv_block_size = opts.kv_block_size,
        kv_mib = kv_bytes >> 20,
        took_ms = t0.elapsed().as_millis() as u64,
        "model loaded"
    );
    metrics.set_kv_block_size(opts.kv_block_size as u64);
    metrics.set_kv_blocks(0, kv_blocks as u64);
    let engine = EngineHandle::start(
        Arc::new(loaded.transformer),
        EngineConfig {
            block_size: opts.kv_block_size,
            kv_blocks,
            max_running: opts.max_batch_size,
            step_token_budget: opts.max_batch_tokens,
            max_context: context,
            overlap: opts.overlap,
            prefix_cache: opts.prefix_cache,
        },
        metrics.clone(),
    )
    .map_err(StartError::Engine)?;
    let info = pb::ModelInfo {
        id: opts.model_id.clone(),
        model_type: cfg.family.model_type().into(),
        context_length: context as u32,
        max_tokens_per_request: opts.max_tokens_per_request as u32,
        vocab_size: cfg.vocab_size as u32,
        dtype: format!("{weights_dtype:?}").to_lowercase(),
        quantization: opts.quantization.name().into(),
        quantization_group_size: if quantized {
            crate::model::quant::GROUP_SIZE
        } else {
            0
        },
        weights: tally
            .rows()
            .into_iter()
            .map(|(part, r#type, n)| pb::WeightStorage {
                part: part.into(),
                r#type,
                matrices: n as u32,
            })
            .collect(),
        num_experts: cfg.moe.as_ref().map_or(0, |m| m.num_experts as u32),
        experts_per_token: cfg.moe.as_ref().map_or(0, |m| m.top_k as u32),
        has_chat_template: tokenizer.chat_template().is_some(),
    };
    let limits = validate::Limits {
        model_id: opts.model_id.clone(),
        context_length: context,
        vocab_size: cfg.vocab_size,
        default_max_tokens: opts.max_tokens_per_request,
        max_tokens_per_request: opts.max_tokens_per_request,
    };
    let admission = crate::admission::Admission::new(&opts.admission, metrics.registry())
        .map_err(StartError::Admission)?;
    admission.spawn_housekeeping();
    tracing::info!(
        admission = ?admission,
        max_queued = opts.admission.config.max_queued,
        "admission control ready"
    );
    let service = Frontend::new(
        engine,
        tokenizer,
        limits,
        info.clone(),
        metrics.clone(),
        admission.clone(),
    );
    let readiness = remote_experts
        .clone()
        .map(|remote| crate::server::Readiness::new(move || remote.readiness()));
    Ok(Started {
        service,
        metrics,
        info,
        kv_blocks,
        admission,
        readiness,
        remote: remote_experts,
    })
}
