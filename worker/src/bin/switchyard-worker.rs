//! `switchyard-worker`: runs one worker process (a frontend or an expert shard).

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use std::path::PathBuf;

use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::expert::v1::expert_shard_server::ExpertShardServer;
use switchyard_worker::experts::{
    self,
    placement::PlacementSource,
    remote::{RemoteExperts, RemoteOptions, ShardTargets},
    shard::ShardOptions,
};
use switchyard_worker::frontend::{self, FrontendOptions};
use switchyard_worker::server::{self, Role};

/// A Switchyard worker: serves one role of a ModelDeployment over gRPC.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Which part of the model this process serves (required unless a subcommand is given).
    #[arg(long, env = "SWITCHYARD_ROLE", value_enum)]
    role: Option<Role>,
    #[command(subcommand)]
    command: Option<Tool>,
    /// Address to serve gRPC on (port 0 picks a free port and logs it).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// The worker contract file the operator mounts (`worker.json`). Optional when run by
    /// hand; when given, a file that does not parse stops the worker at start-up.
    #[arg(long, env = "SWITCHYARD_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Log filter, in `tracing_subscriber::EnvFilter` syntax (e.g. `info,switchyard_worker=debug`).
    #[arg(long, env = "SWITCHYARD_LOG", default_value = "info")]
    log: String,
    /// Address of the Prometheus `/metrics` and `/healthz` endpoint.
    #[arg(
        long,
        env = "SWITCHYARD_METRICS_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    metrics_listen: SocketAddr,
    #[command(flatten)]
    frontend: FrontendArgs,
    /// HTTP/2 and per-peer connection limits (both roles; docs/admission.md).
    #[command(flatten)]
    transport: server::TransportLimits,
}

/// Offline tools that share the worker's model code.
#[derive(Debug, clap::Subcommand)]
enum Tool {
    /// Measure the engine in process (no gRPC): prefill and decode tokens/s at several
    /// batch sizes, and the fraction of the memory-bandwidth bound; prints JSON on stdout.
    Bench {
        /// Checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// Compute dtype: auto, f32, bf16 or f16.
        #[arg(long, default_value = "auto")]
        dtype: String,
        /// Decode batch sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        batch: Vec<usize>,
        /// Prompt tokens per sequence.
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        /// Tokens each sequence decodes in the timed window.
        #[arg(long, default_value_t = 32)]
        decode_len: usize,
        /// Run the routed experts on these expert shards (as `--expert-shards` of a
        /// frontend) instead of in process.
        #[arg(long)]
        expert_shards: Option<String>,
        /// Hidden rows' dtype on the wire to shards: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        expert_wire_dtype: String,
        /// Split decode steps into two micro-batches that overlap with remote experts.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        overlap: bool,
        /// The model id the shards serve (default: the directory's name).
        #[arg(long)]
        model_id: Option<String>,
    },
    /// Time one MoE layer's routed experts (dispatch, expert compute, combine) for
    /// batches of random hidden rows with random top-k routes: on expert shards
    /// (`--expert-shards`) or in process; prints p50/p99 per batch size as JSON on stdout.
    BenchExperts {
        /// Checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// Shard addresses (as a frontend's `--expert-shards`); unset: in process.
        #[arg(long)]
        expert_shards: Option<String>,
        /// Hidden rows' dtype on the wire: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        expert_wire_dtype: String,
        /// Tokens per call, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,32,128")]
        tokens: Vec<usize>,
        /// Timed calls per batch size.
        #[arg(long, default_value_t = 200)]
        iterations: usize,
        /// The model id the shards serve (default: the directory's name).
        #[arg(long)]
        model_id: Option<String>,
    },
    /// Write a deterministic random checkpoint (Hugging Face layout, qwen3_moe) to a
    /// directory: `demo` (what `make demo` serves), `bench` (about 0.5 B parameters),
    /// `deepseek-bench` (DeepSeek-V2-Lite proportions, MLA, about 0.45 B parameters) or
    /// `ep-bench` (one MoE layer at hidden 2048, 64 narrow experts, top-8: expert-parallel
    /// dispatch and combine).
    MakeCheckpoint {
        /// Which shape.
        #[arg(long, value_parser = ["demo", "bench", "deepseek-bench", "ep-bench"], default_value = "demo")]
        shape: String,
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Model and serving settings for local use; `--config` (the operator's worker.json)
/// replaces them.
#[derive(Debug, clap::Args)]
struct FrontendArgs {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer.json), or `demo` for the
    /// built-in random demo model (generated into the cache on first use).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<PathBuf>,
    /// The model id clients name; default: the directory's name.
    #[arg(long, env = "SWITCHYARD_MODEL_ID")]
    model_id: Option<String>,
    /// Compute dtype: auto (f32 on CPU), f32, bf16 or f16.
    #[arg(long, env = "SWITCHYARD_DTYPE", default_value = "auto")]
    dtype: String,
    /// Compute device: auto (a CUDA GPU when built with the `cuda` feature), cpu, cuda:N.
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "auto")]
    device: String,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 32)]
    max_batch_size: usize,
    /// New tokens per engine step at most (prefill chunks share it with decodes).
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// Context length; default: the model's.
    #[arg(long)]
    max_context: Option<usize>,
    /// Largest `max_tokens` per request (also the default).
    #[arg(long, default_value_t = 1024)]
    max_tokens_per_request: usize,
    /// KV-cache capacity in tokens; default: max batch size × min(context, 2048).
    #[arg(long, env = "SWITCHYARD_KV_CACHE_TOKENS")]
    kv_cache_tokens: Option<u64>,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    kv_block_size: usize,
    /// Where the demo model is generated.
    #[arg(long, env = "SWITCHYARD_CACHE")]
    cache_dir: Option<PathBuf>,
    /// Frontend: run the routed experts on expert shards: comma-separated `host:port`
    /// addresses, or `dns:///NAME:PORT` for every address behind a (headless Service)
    /// name, re-resolved every second. Unset: every expert in this process.
    #[arg(long, env = "SWITCHYARD_EXPERT_SHARDS")]
    expert_shards: Option<String>,
    /// Frontend: dtype of hidden rows on the wire to shards: f32 (exact), bf16 or f16
    /// (half the bytes).
    #[arg(long, default_value = "f32")]
    expert_wire_dtype: String,
    /// Frontend: deadline of one call to a shard, in milliseconds; a shard that misses it
    /// is routed around.
    #[arg(long, default_value_t = 5000)]
    expert_timeout_ms: u64,
    /// Frontend: how long start-up waits for every routed expert to have a shard, in
    /// seconds, before serving anyway.
    #[arg(long, default_value_t = 120)]
    expert_wait_secs: u64,
    /// Frontend: split decode steps into two micro-batches so one's attention overlaps
    /// the other's remote experts (`--overlap false` to turn off).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    overlap: bool,
    /// Frontend: admission settings as JSON, in the shape of worker.json's `admission`
    /// object (`apiKeysDir`, `tiers`, `defaultTier`, `maxQueued`,
    /// `defaultDeadlineSeconds`; see docs/admission.md). Unset: no API keys (callers are
    /// anonymous, keyed by address), one unlimited tier, 256 queued, 30 s.
    #[arg(long, env = "SWITCHYARD_ADMISSION_CONFIG")]
    admission_config: Option<PathBuf>,
    /// Frontend: requests running in the engine at most (the rest wait in the fair
    /// queue); default: --max-batch-size.
    #[arg(long)]
    max_inflight: Option<usize>,
    /// Expert shard: this shard's index in the deployment (its entry in the placement).
    #[arg(long, env = "SWITCHYARD_SHARD_INDEX", default_value_t = 0)]
    shard_index: u32,
    /// Expert shard: hold an even share of every MoE layer's experts, as shard
    /// `--shard-index` of this many (contiguous near-equal blocks). Ignored with
    /// `--placement`.
    #[arg(long)]
    shard_count: Option<u32>,
    /// Expert shard: the placement file (JSON; see docs/experts.md), re-read on change.
    /// Unset (and no --shard-count or worker.json): the shard holds every routed expert.
    #[arg(long, env = "SWITCHYARD_PLACEMENT")]
    placement: Option<PathBuf>,
    /// Expert shard, fault injection for tests: delay every Forward by this many ms.
    #[arg(long, hide = true)]
    debug_forward_delay_ms: Option<u64>,
}

impl FrontendArgs {
    fn options(&self) -> anyhow::Result<FrontendOptions> {
        let Some(model) = &self.model else {
            anyhow::bail!(
                "the frontend needs a model: pass --model DIR (or --model demo), or --config worker.json"
            );
        };
        let model = if model.as_os_str() == "demo" {
            let cache = match &self.cache_dir {
                Some(dir) => dir.clone(),
                None => default_cache_dir()?,
            };
            tracing::info!(cache = %cache.display(), "using the built-in demo model (random weights)");
            switchyard_worker::model::demo::ensure(&cache)
                .with_context(|| format!("generating the demo model under {}", cache.display()))?
        } else {
            model.clone()
        };
        let model_id = self
            .model_id
            .clone()
            .unwrap_or_else(|| default_model_id(&model));
        let experts = match &self.expert_shards {
            None => None,
            Some(spec) => Some(remote_options(
                spec,
                &self.expert_wire_dtype,
                self.expert_timeout_ms,
                self.expert_wait_secs,
            )?),
        };
        let mut admission =
            switchyard_worker::admission::AdmissionOptions::open(self.max_batch_size);
        if let Some(path) = &self.admission_config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --admission-config {}", path.display()))?;
            admission.config = serde_json::from_str(&text)
                .with_context(|| format!("--admission-config {}", path.display()))?;
        }
        if let Some(n) = self.max_inflight {
            admission.max_inflight = n;
        }
        Ok(FrontendOptions {
            admission,
            experts,
            overlap: self.overlap,
            model,
            model_id,
            dtype: self.dtype.clone(),
            device: self.device.clone(),
            max_batch_size: self.max_batch_size,
            max_batch_tokens: self.max_batch_tokens,
            max_context_length: self.max_context,
            max_tokens_per_request: self.max_tokens_per_request,
            kv_cache_tokens: self.kv_cache_tokens,
            kv_block_size: self.kv_block_size,
        })
    }
}

impl FrontendArgs {
    /// The model directory and id (the demo model generated on first use).
    fn model_and_id(&self) -> anyhow::Result<(PathBuf, String)> {
        let o = self.options()?;
        Ok((o.model, o.model_id))
    }

    fn shard_options(&self) -> anyhow::Result<ShardOptions> {
        let (model, model_id) = self.model_and_id()?;
        Ok(ShardOptions {
            model,
            model_id,
            dtype: self.dtype.clone(),
            device: self.device.clone(),
            shard_index: self.shard_index,
            placement: match &self.placement {
                Some(path) => PlacementSource::File {
                    path: path.clone(),
                    shard: self.shard_index,
                },
                None => match self.shard_count {
                    Some(n) => PlacementSource::EvenSpread {
                        shards: n,
                        shard: self.shard_index,
                        revision: format!("even-{n}"),
                    },
                    None => PlacementSource::All,
                },
            },
            max_request_bytes: SHARD_MAX_REQUEST_BYTES,
            forward_delay: self.debug_forward_delay_ms.map(Duration::from_millis),
        })
    }
}

impl FrontendArgs {
    /// A shard's options from the operator's worker.json: its even spread over
    /// `shards.count`, at the index the pod's environment gives.
    fn shard_options_from(
        &self,
        config: &switchyard_proto::worker_config::WorkerConfig,
    ) -> anyhow::Result<ShardOptions> {
        Ok(ShardOptions {
            model: PathBuf::from(&config.model.path),
            model_id: config.deployment.clone(),
            dtype: config.model.dtype.clone(),
            device: self.device.clone(),
            shard_index: self.shard_index,
            placement: match &self.placement {
                Some(path) => PlacementSource::File {
                    path: path.clone(),
                    shard: self.shard_index,
                },
                None => PlacementSource::EvenSpread {
                    shards: config.shards.count.max(1),
                    shard: self.shard_index,
                    revision: config.placement.revision.clone(),
                },
            },
            max_request_bytes: SHARD_MAX_REQUEST_BYTES,
            forward_delay: None,
        })
    }
}

/// The largest `ForwardRequest` a shard accepts.
const SHARD_MAX_REQUEST_BYTES: usize = 256 << 20;

fn remote_options(
    spec: &str,
    wire: &str,
    timeout_ms: u64,
    wait_secs: u64,
) -> anyhow::Result<RemoteOptions> {
    Ok(RemoteOptions {
        targets: ShardTargets::parse(spec).map_err(|e| anyhow::anyhow!("--expert-shards {e}"))?,
        wire: switchyard_worker::experts::wire::parse_dtype(wire)
            .map_err(|e| anyhow::anyhow!("--expert-wire-dtype: {e}"))?,
        timeout: Duration::from_millis(timeout_ms.max(1)),
        refresh: Duration::from_secs(1),
        wait: Duration::from_secs(wait_secs),
    })
}

/// The model id clients and shards use unless told: the checkpoint directory's name.
fn default_model_id(model: &std::path::Path) -> String {
    model
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
}

/// For the offline tools: routed experts on the shards `spec` names (blocking; called
/// from a blocking thread of the runtime).
fn tool_remote_experts(
    cfg: &switchyard_worker::model::ModelConfig,
    ckpt: &switchyard_worker::model::checkpoint::Checkpoint,
    precision: switchyard_worker::model::layers::Precision,
    model_id: &str,
    spec: &str,
    wire: &str,
) -> anyhow::Result<RemoteExperts> {
    let remote = remote_options(spec, wire, 10_000, 60)?;
    let identity = experts::identity(model_id, ckpt, precision.weights)?;
    let registry = prometheus::Registry::new();
    tokio::runtime::Handle::current()
        .block_on(RemoteExperts::connect(cfg, identity, remote, &registry))
}

fn run_tool(tool: Tool) -> anyhow::Result<()> {
    use switchyard_worker::engine::bench;
    use switchyard_worker::model::{LoadedModel, demo, parse_dtype};
    match tool {
        Tool::Bench {
            model,
            dtype,
            batch,
            prompt_len,
            decode_len,
            expert_shards,
            expert_wire_dtype,
            overlap,
            model_id,
        } => {
            let device = candle_core::Device::Cpu;
            let dtype = parse_dtype(&dtype, &device).map_err(anyhow::Error::msg)?;
            eprintln!("measuring memory bandwidth...");
            let copy = bench::copy_bandwidth();
            let read = bench::read_bandwidth();
            // The bound decode can reach: whichever measurement shows the memory faster.
            let bandwidth = copy.max(read);
            eprintln!(
                "copy bandwidth {:.1} GB/s, read bandwidth {:.1} GB/s; loading {}",
                copy / 1e9,
                read / 1e9,
                model.display()
            );
            let loaded = match &expert_shards {
                None => LoadedModel::load(&model, dtype, &device)?,
                Some(spec) => {
                    let id = model_id.clone().unwrap_or_else(|| default_model_id(&model));
                    LoadedModel::load_with(&model, dtype, &device, |cfg, ckpt, precision| {
                        tool_remote_experts(cfg, ckpt, precision, &id, spec, &expert_wire_dtype)
                            .map(|b| {
                                Arc::new(b) as Arc<dyn switchyard_worker::model::moe::ExpertBackend>
                            })
                            .map_err(|e| switchyard_worker::model::ModelError::Unsupported {
                                file: model.clone(),
                                what: format!("expert shards: {e:#}"),
                            })
                    })?
                }
            };
            let vocab = loaded.config.vocab_size;
            let config = loaded.config.clone();
            let dtype_name = format!("{:?}", loaded.transformer.precision().weights).to_lowercase();
            let figures = bench::run(
                std::sync::Arc::new(loaded.transformer),
                &bench::BenchConfig {
                    batches: batch,
                    prompt_len,
                    decode_len,
                    vocab,
                    overlap,
                },
                bandwidth,
                |line| eprintln!("{line}"),
            )?;
            let report = serde_json::json!({
                "engine": "switchyard",
                "model": model.display().to_string(),
                "parameters": config.parameter_count(),
                "dtype": dtype_name,
                "prompt_len": prompt_len,
                "expert_shards": expert_shards,
                "overlap": overlap,
                "decode_len": decode_len,
                "copy_bandwidth_gb_s": copy / 1e9,
                "read_bandwidth_gb_s": read / 1e9,
                "bound_bandwidth_gb_s": bandwidth / 1e9,
                "figures": figures,
            });
            println!("{report}");
            Ok(())
        }
        Tool::BenchExperts {
            model,
            expert_shards,
            expert_wire_dtype,
            tokens,
            iterations,
            model_id,
        } => {
            let device = candle_core::Device::Cpu;
            let cfg = switchyard_worker::model::config::load(&model)?;
            let ckpt = switchyard_worker::model::checkpoint::Checkpoint::open(&model)?;
            let precision =
                switchyard_worker::model::precision_for(candle_core::DType::F32, &device);
            let backend: Arc<dyn switchyard_worker::model::moe::ExpertBackend> =
                match &expert_shards {
                    None => Arc::new(switchyard_worker::model::moe::LocalExperts::load(
                        &cfg, &ckpt, precision, &device,
                    )?),
                    Some(spec) => {
                        let id = model_id.unwrap_or_else(|| default_model_id(&model));
                        Arc::new(tool_remote_experts(
                            &cfg,
                            &ckpt,
                            precision,
                            &id,
                            spec,
                            &expert_wire_dtype,
                        )?)
                    }
                };
            let mut results = Vec::new();
            for t in tokens {
                let stats = experts::bench::layer_latency(backend.as_ref(), &cfg, t, iterations)?;
                eprintln!(
                    "{t} tokens: p50 {:.0} us, p99 {:.0} us, mean {:.0} us",
                    stats.p50_us, stats.p99_us, stats.mean_us
                );
                results.push(stats);
            }
            println!(
                "{}",
                serde_json::json!({
                    "model": model.display().to_string(),
                    "hidden": cfg.hidden_size,
                    "top_k": cfg.moe.as_ref().map(|m| m.top_k),
                    "experts": cfg.moe.as_ref().map(|m| m.num_experts),
                    "expert_shards": expert_shards,
                    "wire": expert_wire_dtype,
                    "results": results,
                })
            );
            Ok(())
        }
        Tool::MakeCheckpoint { shape, out } if shape == "deepseek-bench" => {
            eprintln!(
                "writing a random DeepSeek-V2-Lite-shaped checkpoint to {}",
                out.display()
            );
            demo::write_deepseek_bench(&out)
        }
        Tool::MakeCheckpoint { shape, out } => {
            let shape = match shape.as_str() {
                "bench" => demo::BENCH,
                "ep-bench" => demo::EP_BENCH,
                _ => demo::DEMO,
            };
            eprintln!("writing a random {shape:?} checkpoint to {}", out.display());
            demo::write(&out, &shape)
        }
    }
}

fn default_cache_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set; pass --cache-dir")?;
    Ok(PathBuf::from(home).join(".cache/switchyard"))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    switchyard_worker::cli::exit_with(run(Args::parse()).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .with_context(|| format!("--log {:?} is not a valid log filter", args.log))?,
        )
        .init();
    if let Some(tool) = args.command {
        return tokio::task::spawn_blocking(move || run_tool(tool))
            .await
            .context("the tool panicked")?;
    }
    let Some(role) = args.role else {
        anyhow::bail!(
            "--role is required (frontend or expert-shard), or give a subcommand; see --help"
        );
    };
    tracing::info!(%role, listen = %args.listen, config = ?args.config, "starting switchyard-worker");
    let mut frontend_options = None;
    if let Some(path) = &args.config {
        let config = switchyard_worker::config::load(path)?;
        frontend_options = Some(FrontendOptions::from_worker_config(&config));
        tracing::info!(
            deployment = %config.deployment,
            model = %config.model.path,
            dtype = %config.model.dtype,
            quantization = %config.model.quantization,
            shards = config.shards.count,
            placement = %config.placement.revision,
            "loaded the worker config"
        );
    }
    let role_service = match role {
        Role::Frontend => {
            let options = match frontend_options {
                Some(o) => o,
                None => args.frontend.options()?,
            };
            let started = tokio::task::spawn_blocking(move || frontend::start(&options))
                .await
                .context("the model loading task panicked")??;
            serve_metrics_on(args.metrics_listen, started.metrics.registry().clone()).await?;
            Some(server::frontend_routes(&started))
        }
        Role::ExpertShard => {
            let options = match &args.config {
                Some(path) => {
                    let config = switchyard_worker::config::load(path)?;
                    let mut o = args.frontend.shard_options_from(&config)?;
                    o.forward_delay = args
                        .frontend
                        .debug_forward_delay_ms
                        .map(Duration::from_millis);
                    o
                }
                None => args.frontend.shard_options()?,
            };
            let started = tokio::task::spawn_blocking(move || experts::shard::start(&options))
                .await
                .context("the expert loading task panicked")??;
            started.service.spawn_background(Duration::from_secs(2));
            serve_metrics_on(args.metrics_listen, started.registry.clone()).await?;
            let mut routes = tonic::service::RoutesBuilder::default();
            routes.add_service(
                ExpertShardServer::new(started.service)
                    .max_decoding_message_size(SHARD_MAX_REQUEST_BYTES)
                    .max_encoding_message_size(SHARD_MAX_REQUEST_BYTES),
            );
            Some(routes.routes())
        }
    };
    let listener = server::bind(args.listen).await?;
    let addr = listener.local_addr().context("reading the bound address")?;
    tracing::info!(%addr, "listening");
    server::serve(
        role,
        listener,
        role_service,
        args.transport,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

/// Serves `/metrics` and `/healthz` for `registry` on `addr` in the background.
async fn serve_metrics_on(addr: SocketAddr, registry: prometheus::Registry) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener on {addr}"))?;
    tracing::info!(addr = ?listener.local_addr().ok(), "serving /metrics");
    tokio::spawn(async move {
        if let Err(e) =
            frontend::metrics::serve_metrics(listener, registry, std::future::pending()).await
        {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(())
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested; draining in-flight calls");
}
