//! The offline tools of `switchyard-worker` (`bench`, `bench-experts`,
//! `make-checkpoint`): they share the worker's model code but serve nothing.

use std::path::PathBuf;
use std::sync::Arc;

use switchyard_worker::experts::{
    self,
    remote::{RemoteExperts, ShardTargets},
};
use switchyard_worker::settings::{default_model_id, remote_options};

/// Offline tools that share the worker's model code.
#[derive(Debug, clap::Subcommand)]
pub enum Tool {
    /// Measure the engine in process (no gRPC): prefill and decode tokens/s at several
    /// batch sizes, and the fraction of the memory-bandwidth bound; prints JSON on stdout.
    Bench {
        /// Checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// Compute dtype: auto, f32, bf16 or f16.
        #[arg(long, default_value = "auto")]
        dtype: String,
        /// How weight matrices are stored: auto, none, int8 or int4.
        #[arg(long, default_value = "auto")]
        quantization: String,
        /// Compute device: cpu, auto or cuda:N (a `--features cuda` build).
        #[arg(long, default_value = "cpu")]
        device: String,
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
        /// Skewed routes: the expert of popularity rank r is chosen with weight
        /// 1/(r+1)^S (real routers are skewed); unset: every expert equally likely.
        #[arg(long, value_parser = zipf_exponent)]
        zipf: Option<f64>,
        /// Also write the routes' load per expert over 20 000 tokens, as a frontend's
        /// `GET /expert-load` reports it, to this file (for `switchyard-operator
        /// plan-placement`), and exit without timing anything.
        #[arg(long)]
        load_out: Option<PathBuf>,
    },
    /// Perplexity of a checkpoint on a text file, computed as llama.cpp's
    /// `llama-perplexity` does by default (chunks of --ctx tokens, the second half of each
    /// scored), so the two can be compared on the same file and text. Progress on stderr,
    /// one JSON object on stdout.
    Perplexity {
        /// Checkpoint directory or `.gguf` file.
        #[arg(long)]
        model: PathBuf,
        /// The text (UTF-8).
        #[arg(long)]
        text: PathBuf,
        /// Tokens per chunk (llama-perplexity's -c).
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Compute dtype: auto, f32, bf16 or f16.
        #[arg(long, default_value = "auto")]
        dtype: String,
        /// How weight matrices are stored: auto, none, int8 or int4.
        #[arg(long, default_value = "auto")]
        quantization: String,
    },
    /// The greedy continuation of prompt token ids (the argmax at every step), printed as
    /// JSON: the side-by-side check against llama.cpp on the same GGUF file.
    Greedy {
        /// Checkpoint directory or `.gguf` file.
        #[arg(long)]
        model: PathBuf,
        /// Prompt token ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        prompt_ids: Vec<u32>,
        /// New tokens to pick.
        #[arg(long, default_value_t = 16)]
        tokens: usize,
        /// Compute dtype: auto, f32, bf16 or f16.
        #[arg(long, default_value = "auto")]
        dtype: String,
        /// How weight matrices are stored: auto, none, int8 or int4.
        #[arg(long, default_value = "auto")]
        quantization: String,
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

/// For the offline tools: routed experts on the shards `spec` names (blocking; called
/// from a blocking thread of the runtime).
/// `--zipf`: a finite exponent ≥ 0.
fn zipf_exponent(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Ok(s),
        _ => Err(format!(
            "{v:?}: a Zipf exponent is a number ≥ 0 (1.0 is a typical skew)"
        )),
    }
}

fn tool_remote_experts(
    cfg: &switchyard_worker::model::ModelConfig,
    ckpt: &switchyard_worker::model::checkpoint::Checkpoint,
    precision: switchyard_worker::model::layers::Precision,
    model_id: &str,
    spec: &str,
    wire: &str,
) -> anyhow::Result<RemoteExperts> {
    let targets = ShardTargets::parse(spec).map_err(|e| anyhow::anyhow!("--expert-shards {e}"))?;
    let remote = remote_options(targets, wire, 10_000, 60)?;
    let identity = experts::identity(model_id, ckpt, precision)?;
    let registry = prometheus::Registry::new();
    Ok(tokio::runtime::Handle::current()
        .block_on(RemoteExperts::connect(cfg, identity, remote, &registry))?)
}

/// The CPU, and the `--dtype` and `--quantization` of the offline tools that run on it.
fn cpu_settings(
    dtype: &str,
    quantization: &str,
) -> anyhow::Result<(
    candle_core::Device,
    Option<candle_core::DType>,
    switchyard_worker::model::quant::Quantization,
)> {
    let device = candle_core::Device::Cpu;
    let dtype =
        switchyard_worker::model::parse_dtype(dtype, &device).map_err(anyhow::Error::msg)?;
    let quant = switchyard_worker::model::quant::Quantization::parse(quantization)
        .map_err(anyhow::Error::msg)?;
    Ok((device, dtype, quant))
}

/// Runs `tool` (blocking; called on a blocking thread of the runtime).
pub fn run(tool: Tool) -> anyhow::Result<()> {
    use switchyard_worker::engine::bench;
    use switchyard_worker::model::quant::Quantization;
    use switchyard_worker::model::{LoadedModel, demo, parse_dtype};
    match tool {
        Tool::Bench {
            model,
            dtype,
            quantization,
            device,
            batch,
            prompt_len,
            decode_len,
            expert_shards,
            expert_wire_dtype,
            overlap,
            model_id,
        } => {
            let device = switchyard_worker::model::parse_device(&device)?;
            let dtype = parse_dtype(&dtype, &device).map_err(anyhow::Error::msg)?;
            let quant = Quantization::parse(&quantization).map_err(anyhow::Error::msg)?;
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
            let mut loaded = match &expert_shards {
                None => LoadedModel::load(&model, dtype, quant, &device)?,
                Some(spec) => {
                    let id = model_id.clone().unwrap_or_else(|| default_model_id(&model));
                    LoadedModel::load_with(
                        &model,
                        dtype,
                        quant,
                        &device,
                        |cfg, ckpt, precision| {
                            tool_remote_experts(cfg, ckpt, precision, &id, spec, &expert_wire_dtype)
                                .map(|b| {
                                    Arc::new(b)
                                        as Arc<dyn switchyard_worker::model::moe::ExpertBackend>
                                })
                                .map_err(|e| switchyard_worker::model::ModelError::Unsupported {
                                    file: model.clone(),
                                    what: format!("expert shards: {e:#}"),
                                })
                        },
                    )?
                }
            };
            // Measured on the pages the engine serves from once settled.
            if let Some(pages) = loaded.pages.take() {
                eprintln!("moving the weights to 2 MB pages...");
                if let Some(done) = pages.wait() {
                    eprintln!("{done}");
                }
            }
            let vocab = loaded.config.vocab_size;
            let config = loaded.config.clone();
            let dtype_name = format!("{:?}", loaded.transformer.precision().weights).to_lowercase();
            let held = loaded.transformer.describe_weights();
            let device_name = format!("{:?}", loaded.transformer.device());
            eprintln!("weights held: {held}");
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
                "device": device_name,
                "weights": held,
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
            zipf,
            load_out,
        } => {
            let device = candle_core::Device::Cpu;
            let cfg = switchyard_worker::model::config::load(&model)?;
            let routing = zipf.map_or(
                experts::bench::Routing::Uniform,
                experts::bench::Routing::Zipf,
            );
            if let Some(path) = load_out {
                let report = experts::bench::load_report(&cfg, routing, 20_000);
                std::fs::write(&path, report.to_string())
                    .map_err(|e| anyhow::anyhow!("--load-out {}: {e}", path.display()))?;
                eprintln!("the routes' load per expert written to {}", path.display());
                return Ok(());
            }
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
                let stats =
                    experts::bench::layer_latency(backend.as_ref(), &cfg, t, iterations, routing)?;
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
                    "zipf": zipf,
                    "results": results,
                })
            );
            Ok(())
        }
        Tool::Perplexity {
            model,
            text,
            ctx,
            dtype,
            quantization,
        } => {
            let (device, dtype, quant) = cpu_settings(&dtype, &quantization)?;
            let body = std::fs::read_to_string(&text)
                .map_err(|e| anyhow::anyhow!("--text {}: {e}", text.display()))?;
            let tokenizer = switchyard_worker::text::Tokenizer::load(&model)?;
            let tokens = tokenizer.encode(&body, true)?;
            let started = std::time::Instant::now();
            let loaded = LoadedModel::load(&model, dtype, quant, &device)?;
            eprintln!(
                "{}: {} tokens, {} chunks of {ctx}; weights {}",
                text.display(),
                tokens.len(),
                tokens.len() / ctx.max(1),
                loaded.transformer.describe_weights()
            );
            let result = switchyard_worker::model::perplexity::perplexity(
                &loaded.transformer,
                &tokens,
                ctx,
                |done, of, ppl| eprintln!("[{done}/{of}] perplexity so far {ppl:.4}"),
            )?;
            println!(
                "{}",
                serde_json::json!({
                    "model": model.display().to_string(),
                    "text": text.display().to_string(),
                    "ctx": ctx,
                    "quantization": quant.name(),
                    "weights": loaded.transformer.describe_weights(),
                    "tokens": tokens.len(),
                    "seconds": started.elapsed().as_secs_f64(),
                    "result": result,
                })
            );
            Ok(())
        }
        Tool::Greedy {
            model,
            prompt_ids,
            tokens,
            dtype,
            quantization,
        } => {
            let (device, dtype, quant) = cpu_settings(&dtype, &quantization)?;
            let loaded = LoadedModel::load(&model, dtype, quant, &device)?;
            let picked = switchyard_worker::model::perplexity::greedy(
                &loaded.transformer,
                &prompt_ids,
                tokens,
            )?;
            println!(
                "{}",
                serde_json::json!({
                    "model": model.display().to_string(),
                    "weights": loaded.transformer.describe_weights(),
                    "prompt_ids": prompt_ids,
                    "tokens": picked,
                })
            );
            Ok(())
        }
        Tool::MakeCheckpoint { shape, out } if shape == "deepseek-bench" => {
            eprintln!(
                "writing a random DeepSeek-V2-Lite-shaped checkpoint to {}",
                out.display()
            );
            Ok(demo::write_deepseek_bench(&out)?)
        }
        Tool::MakeCheckpoint { shape, out } => {
            let shape = match shape.as_str() {
                "bench" => demo::BENCH,
                "ep-bench" => demo::EP_BENCH,
                _ => demo::DEMO,
            };
            eprintln!("writing a random {shape:?} checkpoint to {}", out.display());
            Ok(demo::write(&out, &shape)?)
        }
    }
}
