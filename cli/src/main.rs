//! `switchyard`: the command-line client for a Switchyard endpoint.
//!
//! ```text
//!   switchyard health | services              standard gRPC endpoints
//!   switchyard generate [PROMPT] [--chat ...]  one completion, streamed (or --json)
//!   switchyard bench --concurrency N | --rate R  load generator and report
//! ```
//!
//! See `docs/cli.md` for every flag and report column.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use clap::{ArgMatches, Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use switchyard_cli::client;
use switchyard_cli::loadgen::generate::{self, GenerateOptions, Input};
use switchyard_cli::loadgen::{
    self, ApiKey, BenchConfig, Load, ProgressMode, Scenario, Tenant, VocabRange, Workload,
    describe_status, parse_duration, parse_priority,
};
use switchyard_proto::inference::v1::inference_client::InferenceClient;
use switchyard_proto::inference::v1::{ChatMessage, ListModelsRequest, ModelInfo, Priority, Role};
use tonic::transport::Channel;

/// Talk to a Switchyard worker or deployment endpoint over gRPC.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The endpoint, e.g. http://127.0.0.1:50051.
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    addr: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check health (grpc.health.v1); exits 1 unless the answer is SERVING.
    Health {
        /// Service to check; empty means the whole server (liveness).
        #[arg(long, default_value = "")]
        service: String,
    },
    /// List the gRPC services the endpoint advertises (server reflection).
    Services,
    /// Generate one completion: streams the text to stdout as it is produced and prints a
    /// summary line to stderr (or, with --json, prints one JSON object).
    Generate(GenerateArgs),
    /// Load-test the endpoint with synthetic token-id prompts and report throughput and
    /// latency percentiles, in total and per tenant.
    Bench(BenchArgs),
}

/// The API key flag shared by `generate` and `bench`.
#[derive(Debug, Args)]
struct KeyArgs {
    /// API key, sent as `authorization: Bearer <KEY>`.
    #[arg(
        long,
        env = "SWITCHYARD_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    api_key: Option<String>,
}

impl KeyArgs {
    fn key(&self) -> anyhow::Result<Option<ApiKey>> {
        self.api_key
            .as_deref()
            .map(|k| ApiKey::new(k).map_err(|e| anyhow!("--api-key (or SWITCHYARD_API_KEY): {e}")))
            .transpose()
    }
}

#[derive(Debug, Args)]
struct GenerateArgs {
    /// The prompt (plain text, no chat template); `-` reads it from stdin.
    #[arg(value_name = "PROMPT")]
    prompt: Option<String>,
    /// The prompt, as a flag instead of the positional argument.
    #[arg(long = "prompt", value_name = "TEXT", conflicts_with = "prompt")]
    prompt_flag: Option<String>,
    /// Send the prompt as a user message rendered with the model's chat template.
    /// Implied by --system, --user, --assistant and --messages.
    #[arg(long)]
    chat: bool,
    /// A system message (repeatable; messages keep their command-line order).
    #[arg(long, value_name = "TEXT")]
    system: Vec<String>,
    /// A user message (repeatable). A PROMPT given too becomes the last user message.
    #[arg(long, value_name = "TEXT")]
    user: Vec<String>,
    /// An earlier assistant reply (repeatable), for multi-turn conversations.
    #[arg(long, value_name = "TEXT")]
    assistant: Vec<String>,
    /// Chat messages from a JSON file (`-`: stdin): an array of {"role", "content"}
    /// objects, or {"messages": [...]}.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompt", "prompt_flag", "system", "user", "assistant"])]
    messages: Option<PathBuf>,
    /// Model id; empty selects the deployment's only model.
    #[arg(long, default_value = "")]
    model: String,
    /// Most tokens to generate (server default: the model's max_tokens_per_request).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_tokens: Option<u32>,
    /// Sampling temperature, >= 0; 0 is greedy (server default: 1.0).
    #[arg(long, value_name = "T", value_parser = parse_temperature)]
    temperature: Option<f32>,
    /// Keep only the K most likely tokens; 0 disables the filter.
    #[arg(long, value_name = "K", default_value_t = 0)]
    top_k: u32,
    /// Nucleus sampling probability mass, in (0, 1] (server default: 1.0, disabled).
    #[arg(long, value_name = "P", value_parser = parse_top_p)]
    top_p: Option<f32>,
    /// Sampler seed, for reproducible sampling (server default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// A string that ends generation (repeatable, up to 16).
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    /// Scheduling priority: low, normal, high, critical, or unspecified (the tier's default).
    #[arg(long, value_parser = parse_priority, default_value = "unspecified")]
    priority: Priority,
    #[command(flatten)]
    key: KeyArgs,
    /// Use the unary Generate call and print one JSON object (text, token_ids, summary,
    /// latency_ms) instead of streaming.
    #[arg(long)]
    json: bool,
    /// Give up after this long (e.g. 30s, 2m); sent as the gRPC deadline. Default: none.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    timeout: Option<Duration>,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Traffic mix: uniform (every tenant, split by weight), or an admission scenario
    /// over the tenants of --tenants/--api-keys-file — baseline (the legitimate tenants
    /// only), flood (plus the tenant named `attacker` at --attack-rate), botnet (plus
    /// every `bot-*` tenant at --attack-rate each), h2-abuse (the legitimate tenants while
    /// other connections abuse HTTP/2 and TCP); or an autoscaling scenario: spike,
    /// flood+spike, yoyo (see --spike-factor). Scenarios other than uniform need --rate.
    #[arg(long, value_name = "NAME", default_value = "uniform", value_parser = parse_scenario)]
    scenario: loadgen::ScenarioKind,
    /// Requests per second of each attacking tenant (flood, botnet, flood+spike); default
    /// 50 × a legitimate tenant's share of --rate.
    #[arg(long, value_name = "R", value_parser = parse_rate)]
    attack_rate: Option<f64>,
    /// The autoscaling scenarios: spike (the legitimate rate × --spike-factor for the
    /// middle third of --duration), flood+spike (the same, with the `attacker` tenant at
    /// --attack-rate throughout) and yoyo (× --spike-factor for the first quarter of every
    /// --yoyo-period). The factor; default 3.
    #[arg(long, value_name = "F", value_parser = parse_factor)]
    spike_factor: Option<f64>,
    /// yoyo: the period of the bursts (default 60s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    yoyo_period: Option<Duration>,
    /// Write the run's time series, one row a second, to DIR/<scenario>.csv and a plot to
    /// DIR/<scenario>.svg: offered load per tenant, accepted load, replicas (with
    /// --replicas-command) and the legitimate p99 TTFT.
    #[arg(long, value_name = "DIR")]
    series: Option<PathBuf>,
    /// With --series: a shell command printing the deployment's replicas as `DESIRED
    /// [READY]`, run every second, e.g. kubectl get modeldeployment NAME -o
    /// jsonpath='{.spec.frontend.replicas} {.status.frontend.readyReplicas}'.
    #[arg(long, value_name = "COMMAND", requires = "series")]
    replicas_command: Option<String>,
    /// A time-to-first-token objective (e.g. 500ms): the report adds how many successful
    /// requests met it and their rate, the goodput.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    ttft_slo: Option<Duration>,
    /// Closed loop: keep N requests in flight (default 1 when --rate is not given).
    #[arg(long, value_name = "N", conflicts_with = "rate", value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: Option<u64>,
    /// Open loop: send requests as a Poisson process at R per second on average.
    #[arg(long, value_name = "R", value_parser = parse_rate)]
    rate: Option<f64>,
    /// Stop sending after this long (after the warmup), e.g. 60s, 5m.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many measured requests. With --duration too, whichever comes first;
    /// with neither, 100.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,
    /// Send requests for this long first without counting them (e.g. 10s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0s")]
    warmup: Duration,
    /// Prompt length in tokens (prompts are token ids, so the length is exact).
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    prompt_tokens: u32,
    /// Tokens every prompt starts with, the same for all (a shared system prompt), before
    /// its own --prompt-tokens: what the server's prefix cache serves.
    #[arg(long, value_name = "N", default_value_t = 0)]
    shared_prefix_tokens: u32,
    /// Seed of the shared prefix's tokens (default: --seed), so runs with different
    /// questions can share one system prompt.
    #[arg(long, value_name = "N")]
    shared_prefix_seed: Option<u64>,
    /// Draw each prompt's length uniformly from prompt-tokens ± this.
    #[arg(long, value_name = "N", default_value_t = 0)]
    prompt_tokens_jitter: u32,
    /// Tokens to generate per request (sent as max_tokens with ignore_eos, so exact).
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    output_tokens: u32,
    /// Token ids prompts are drawn from, START..END (END excluded). Default 1000..8000, or
    /// the middle half of the vocabulary when the model reports fewer than 8000 ids.
    #[arg(long, value_name = "START..END")]
    vocab_range: Option<VocabRange>,
    /// Model id; empty selects the deployment's only model.
    #[arg(long, default_value = "")]
    model: String,
    /// Scheduling priority of every request: low, normal, high, critical, or unspecified.
    #[arg(long, value_parser = parse_priority, default_value = "unspecified")]
    priority: Priority,
    /// Tenants as NAME:KEY[:WEIGHT],... : requests split by weight, each carrying its
    /// tenant's key. Replaces --api-key.
    #[arg(long, value_name = "LIST", conflicts_with = "api_keys_file")]
    tenants: Option<String>,
    /// Tenants from a file, one NAME:KEY[:WEIGHT] per line (# comments).
    #[arg(long, value_name = "FILE")]
    api_keys_file: Option<PathBuf>,
    #[command(flatten)]
    key: KeyArgs,
    /// Per-request timeout, sent as the gRPC deadline (e.g. 30s, 5m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "5m")]
    timeout: Duration,
    /// HTTP/2 connections to spread requests over.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    connections: u64,
    /// Seed for prompts, the tenant split and arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the report as JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Which of the frontend's APIs to call: grpc (GenerateStream over HTTP/2), or openai
    /// (streamed POST /v1/completions over HTTP/1.1 keep-alive connections, plaintext;
    /// the same requests, for comparing the two).
    #[arg(long, value_enum, default_value = "grpc")]
    api: BenchApi,
    /// No progress line on stderr.
    #[arg(long)]
    no_progress: bool,
}

fn parse_temperature(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err("expected a finite number >= 0 (0 is greedy), e.g. 0.7".into()),
    }
}

fn parse_top_p(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        _ => Err("expected a number in (0, 1], e.g. 0.9".into()),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err("expected a positive number of requests per second, e.g. 20 or 0.5".into()),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    switchyard_edge::exit::exit_with(run(cli, &matches).await)
}

async fn run(cli: Cli, matches: &ArgMatches) -> anyhow::Result<()> {
    match cli.command {
        Command::Health { service } => {
            let channel = client::connect(&cli.addr).await?;
            let status = client::health(channel, &service)
                .await
                .with_context(|| format!("health check of {:?} at {}", service, cli.addr))?;
            let shown = if service.is_empty() {
                "(server)"
            } else {
                &service
            };
            println!("{shown}: {}", status.as_str_name());
            if status != tonic_health::pb::health_check_response::ServingStatus::Serving {
                std::process::exit(1);
            }
        }
        Command::Services => {
            let channel = client::connect(&cli.addr).await?;
            for name in client::list_services(channel).await? {
                println!("{name}");
            }
        }
        Command::Generate(args) => {
            let sub = matches
                .subcommand_matches("generate")
                .context("internal: the generate arguments are missing")?;
            run_generate(&cli.addr, args, sub).await?;
        }
        Command::Bench(args) => run_bench(&cli.addr, args).await?,
    }
    Ok(())
}

/// Reads a file, or stdin for `-`, naming it in the error.
fn read_input(path: &Path, what: &str) -> anyhow::Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .with_context(|| format!("reading {what} from stdin"))?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {what} {}", path.display()))
}

/// The prompt input: `--messages`, or chat messages from the flags (in command-line order)
/// with the prompt as the last user message, or the plain prompt.
fn generate_input(args: &GenerateArgs, matches: &ArgMatches) -> anyhow::Result<Input> {
    if let Some(path) = &args.messages {
        let text = read_input(path, "--messages")?;
        let source = format!("--messages {}", path.display());
        return Ok(Input::Chat(generate::parse_messages_json(&text, &source)?));
    }
    let prompt = match args.prompt.as_deref().or(args.prompt_flag.as_deref()) {
        Some("-") => Some(read_input(Path::new("-"), "the prompt")?),
        other => other.map(String::from),
    };
    let mut flagged: Vec<(usize, Role, String)> = Vec::new();
    for (id, role, values) in [
        ("system", Role::System, &args.system),
        ("user", Role::User, &args.user),
        ("assistant", Role::Assistant, &args.assistant),
    ] {
        let indices = matches.indices_of(id).into_iter().flatten();
        flagged.extend(
            indices
                .zip(values)
                .map(|(index, text)| (index, role, text.clone())),
        );
    }
    flagged.sort_by_key(|&(index, _, _)| index);
    if flagged.is_empty() && !args.chat {
        return prompt.map(Input::Prompt).ok_or_else(|| {
            anyhow!(
                "no prompt: give PROMPT (or - for stdin), --prompt TEXT, --user TEXT or \
                 --messages FILE"
            )
        });
    }
    let mut messages: Vec<ChatMessage> = flagged
        .into_iter()
        .map(|(_, role, content)| ChatMessage {
            role: role as i32,
            content,
        })
        .collect();
    if let Some(prompt) = prompt {
        messages.push(ChatMessage {
            role: Role::User as i32,
            content: prompt,
        });
    }
    if messages.is_empty() {
        bail!("--chat without messages: give PROMPT, --user TEXT or --messages FILE");
    }
    Ok(Input::Chat(messages))
}

async fn run_generate(addr: &str, args: GenerateArgs, matches: &ArgMatches) -> anyhow::Result<()> {
    let options = GenerateOptions {
        model: args.model.clone(),
        input: generate_input(&args, matches)?,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop: args.stop.clone(),
        priority: args.priority,
    };
    let key = args.key.key()?;
    let channel = client::connect(addr).await?;
    let request = options.request();

    if args.json {
        let mut call = tonic::Request::new(request);
        if let Some(timeout) = args.timeout {
            call.set_timeout(timeout);
        }
        loadgen::workload::authorize(&mut call, key.as_ref());
        let sent = Instant::now();
        let response = InferenceClient::new(channel)
            .generate(call)
            .await
            .map_err(|status| anyhow!(describe_status(&status)))?
            .into_inner();
        let latency = sent.elapsed();
        println!("{}", generate::response_json(&response, latency));
        return match response.summary {
            Some(s) if loadgen::finish_reason_name(s.finish_reason) == "error" => bail!(
                "generation failed after {} tokens: {}",
                response.token_ids.len(),
                s.error_message
            ),
            _ => Ok(()),
        };
    }

    let mut stdout = std::io::stdout().lock();
    let mut last_char = '\n';
    let measurement = loadgen::measure_stream(
        InferenceClient::new(channel),
        request,
        key.as_ref(),
        args.timeout,
        |chunk| {
            if let Some(c) = chunk.text.chars().last() {
                last_char = c;
            }
            // A closed stdout (`| head`) is not an error of the generation.
            let _ = stdout.write_all(chunk.text.as_bytes());
            let _ = stdout.flush();
        },
    )
    .await;
    if last_char != '\n' && stdout.is_terminal() {
        let _ = writeln!(stdout);
    }
    drop(stdout);
    if let Some(summary) = &measurement.summary {
        eprintln!("{}", generate::summary_line(summary, &measurement));
    }
    if let Err(e) = &measurement.result {
        bail!("{e}");
    }
    match &measurement.summary {
        Some(s) if loadgen::finish_reason_name(s.finish_reason) == "error" => bail!(
            "generation failed after {} tokens: {}",
            measurement.output_tokens,
            s.error_message
        ),
        _ => Ok(()),
    }
}

fn parse_scenario(s: &str) -> Result<loadgen::ScenarioKind, String> {
    loadgen::ScenarioKind::parse(s)
}

fn parse_factor(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 1.0 => Ok(f),
        _ => Err("expected a number of at least 1 (the rate's multiple), e.g. 3".into()),
    }
}

/// The legitimate rate's shape for `kind` from the flags; flags a scenario does not use
/// are refused, not ignored.
fn bench_shape(args: &BenchArgs) -> anyhow::Result<loadgen::Shape> {
    use loadgen::ScenarioKind as K;
    let kind = args.scenario;
    if args.spike_factor.is_some() && !kind.shaped() {
        bail!(
            "--spike-factor: scenario {} has no spike (spike, flood+spike and yoyo do)",
            kind.name()
        );
    }
    if args.yoyo_period.is_some() && kind != K::Yoyo {
        bail!("--yoyo-period: only the yoyo scenario has a period");
    }
    let factor = args.spike_factor.unwrap_or(3.0);
    Ok(match kind {
        K::Spike | K::FloodSpike => {
            let Some(duration) = args.duration else {
                bail!(
                    "--scenario {}: give --duration (the spike is its middle third)",
                    kind.name()
                );
            };
            loadgen::Shape::Spike {
                from: duration / 3,
                to: duration * 2 / 3,
                factor,
            }
        }
        K::Yoyo => {
            let period = args.yoyo_period.unwrap_or(Duration::from_secs(60));
            if period < Duration::from_secs(4) {
                bail!("--yoyo-period: {period:?}: give at least 4s");
            }
            loadgen::Shape::Yoyo {
                period,
                burst: period / 4,
                factor,
            }
        }
        _ => loadgen::Shape::Steady,
    })
}

fn bench_tenants(args: &BenchArgs) -> anyhow::Result<Vec<Tenant>> {
    if let Some(list) = &args.tenants {
        return Ok(loadgen::parse_tenant_list(list)?);
    }
    if let Some(path) = &args.api_keys_file {
        let text = read_input(path, "--api-keys-file")?;
        let source = format!("--api-keys-file {}", path.display());
        return Ok(loadgen::parse_tenant_file(&text, &source)?);
    }
    Ok(vec![Tenant {
        name: "default".into(),
        api_key: args.key.key()?,
        weight: 1,
    }])
}

/// The deployment's description of the model the benchmark targets, if it answers
/// `ListModels`; `None` when it does not (the benchmark then runs unchecked).
async fn target_model(channel: Channel, model: &str, key: Option<&ApiKey>) -> Option<ModelInfo> {
    let mut request = tonic::Request::new(ListModelsRequest {});
    request.set_timeout(Duration::from_secs(10));
    loadgen::workload::authorize(&mut request, key);
    let models = InferenceClient::new(channel)
        .list_models(request)
        .await
        .ok()?
        .into_inner()
        .models;
    match model {
        "" if models.len() == 1 => models.into_iter().next(),
        "" => None,
        id => models.into_iter().find(|m| m.id == id),
    }
}

/// The API `switchyard bench` calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchApi {
    Grpc,
    Openai,
}

/// `host:port` of a plaintext `http://` endpoint, for the HTTP client of `--api openai`.
fn http_authority(addr: &str) -> anyhow::Result<String> {
    let uri: http::Uri = addr
        .parse()
        .map_err(|e| anyhow::anyhow!("--addr {addr:?}: not a URI ({e})"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(authority)) if authority.port().is_some() => Ok(authority.to_string()),
        _ => anyhow::bail!(
            "--api openai: --addr must be a plaintext http://HOST:PORT endpoint (got {addr:?}); \
             TLS endpoints are not supported by the bench's HTTP client"
        ),
    }
}

async fn run_bench(addr: &str, args: BenchArgs) -> anyhow::Result<()> {
    let tenants = bench_tenants(&args)?;
    let mut workload = Workload {
        model: args.model.clone(),
        prompt_tokens: args.prompt_tokens,
        prompt_tokens_jitter: args.prompt_tokens_jitter,
        output_tokens: args.output_tokens,
        vocab: args.vocab_range.unwrap_or(VocabRange {
            start: 1000,
            end: 8000,
        }),
        priority: args.priority,
        shared_prefix: Vec::new(),
    };
    let load = match (args.rate, args.concurrency) {
        (Some(rate), _) => Load::Open { rate },
        (None, concurrency) => Load::Closed {
            concurrency: usize::try_from(concurrency.unwrap_or(1)).unwrap_or(usize::MAX),
        },
    };
    let requests = match (args.duration, args.requests) {
        (None, None) => Some(100),
        (_, requests) => requests,
    };

    let mut channels = Vec::new();
    for _ in 0..args.connections {
        channels.push(client::connect(addr).await?);
    }
    let model = target_model(
        channels[0].clone(),
        &args.model,
        tenants[0].api_key.as_ref(),
    )
    .await;
    if let Some(model) = &model
        && args.vocab_range.is_none()
        && model.vocab_size > 0
        && model.vocab_size < 8000
    {
        let v = model.vocab_size;
        workload.vocab = VocabRange {
            start: v / 4,
            end: (v / 4 * 3).max(v / 4 + 1),
        };
    }
    workload.shared_prefix = Workload::prefix(
        workload.vocab,
        args.shared_prefix_tokens,
        args.shared_prefix_seed.unwrap_or(args.seed),
    );
    if let Some(model) = &model {
        workload.check_against(model)?;
    }

    let progress = if args.no_progress {
        ProgressMode::Off
    } else if std::io::stderr().is_terminal() {
        ProgressMode::InPlace
    } else {
        ProgressMode::Lines
    };
    let (scenario, load) = match (args.scenario, load) {
        (loadgen::ScenarioKind::Uniform, load) => (Scenario::uniform(tenants, workload), load),
        (kind, Load::Open { rate }) => {
            let legit = tenants
                .iter()
                .filter(|t| t.name != "attacker" && !t.name.starts_with("bot-"))
                .count()
                .max(1);
            let attack = args.attack_rate.unwrap_or(50.0 * rate / legit as f64);
            let shape = bench_shape(&args)?;
            let (scenario, total) =
                Scenario::named_shaped(kind, tenants, workload, rate, attack, shape)?;
            (scenario, Load::Open { rate: total })
        }
        (kind, Load::Closed { .. }) => bail!(
            "--scenario {}: give --rate (scenarios replay open-loop traffic)",
            kind.name()
        ),
    };
    // h2-abuse: the attackers run beside the measured traffic for the whole run.
    let abuse = (args.scenario == loadgen::ScenarioKind::H2Abuse).then(|| {
        let target = addr
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_string();
        let length = args.duration.unwrap_or(Duration::from_secs(10)) + args.warmup;
        tokio::spawn(async move {
            let (a, b, c) = tokio::join!(
                loadgen::abuse::rapid_reset(&target, length),
                loadgen::abuse::header_flood(&target, length),
                loadgen::abuse::connection_flood(&target, 256, length),
            );
            vec![a, b, c]
        })
    });
    let config = BenchConfig {
        ttft_slo: args.ttft_slo,
        scenario,
        load,
        duration: args.duration,
        requests,
        warmup: args.warmup,
        timeout: args.timeout,
        seed: args.seed,
        progress,
        series: args.series.as_ref().map(|_| loadgen::SeriesOptions {
            replicas_command: args.replicas_command.clone(),
        }),
        openai: match args.api {
            BenchApi::Grpc => None,
            BenchApi::Openai => Some(http_authority(addr)?),
        },
    };
    if !args.no_progress {
        eprintln!("{}", start_line(&config, addr));
    }
    let interrupt = async {
        // If the handler cannot be installed, run without Ctrl-C handling.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let report = loadgen::run_bench(channels, config, interrupt).await?;
    let abuse = match abuse {
        Some(task) => task.await.context("the abuse task failed")?,
        None => Vec::new(),
    };
    if let (Some(dir), Some(rows)) = (&args.series, &report.series) {
        write_series(dir, &config_name(&report), &report, rows)?;
    }
    if args.json {
        let mut value = serde_json::to_value(&report).context("encoding the report as JSON")?;
        if !abuse.is_empty() {
            value["abuse"] = serde_json::to_value(&abuse).context("encoding the abuse report")?;
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", loadgen::format_report(&report));
        for a in &abuse {
            println!(
                "abuse {}: {} attempts on {} live connections; the server closed {} of them \
                 and refused {} on accept{}",
                a.kind,
                a.attempts,
                a.connections,
                a.closed_by_server,
                a.refused,
                a.first_close_s
                    .map_or_else(String::new, |s| format!(" (first after {s:.2} s)"))
            );
        }
    }
    let total = &report.total;
    if total.ok == 0 && total.failed > 0 {
        let errors: Vec<String> = total
            .errors
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        bail!("no request succeeded ({})", errors.join(", "));
    }
    Ok(())
}

fn config_name(report: &loadgen::Report) -> String {
    report.run.scenario.replace('+', "-")
}

/// `--series`: DIR/<scenario>.csv and DIR/<scenario>.svg.
fn write_series(
    dir: &std::path::Path,
    stem: &str,
    report: &loadgen::Report,
    rows: &[switchyard_edge::series::Row],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--series: creating {}", dir.display()))?;
    let names: Vec<&str> = report.tenants.iter().map(|t| t.name.as_str()).collect();
    let csv = dir.join(format!("{stem}.csv"));
    std::fs::write(&csv, switchyard_edge::series::csv(&names, rows))
        .with_context(|| format!("--series: writing {}", csv.display()))?;
    let svg = dir.join(format!("{stem}.svg"));
    let title = format!("{}: measured by switchyard bench", report.run.scenario);
    std::fs::write(&svg, switchyard_edge::series::svg(&title, &names, rows))
        .with_context(|| format!("--series: writing {}", svg.display()))?;
    eprintln!(
        "bench: time series ({} s) in {} and {}",
        rows.len(),
        csv.display(),
        svg.display()
    );
    Ok(())
}

/// What is about to run, printed to stderr before the first request.
fn start_line(config: &BenchConfig, addr: &str) -> String {
    let load = match config.load {
        Load::Closed { concurrency } => format!("closed loop, concurrency {concurrency}"),
        Load::Open { rate } => format!("open loop, {rate} req/s"),
    };
    let stop = match (config.duration, config.requests) {
        (Some(d), Some(n)) => format!("{n} requests or {d:?}"),
        (Some(d), None) => format!("{d:?}"),
        (None, Some(n)) => format!("{n} requests"),
        (None, None) => "no limit".into(),
    };
    let tenants = config.scenario.tenants.len();
    let shape = config
        .scenario
        .tenants
        .first()
        .map_or_else(String::new, |t| {
            let w = &t.workload;
            let jitter = if w.prompt_tokens_jitter > 0 {
                format!(" ± {}", w.prompt_tokens_jitter)
            } else {
                String::new()
            };
            let shared = if w.shared_prefix.is_empty() {
                String::new()
            } else {
                format!(" after a shared prefix of {}", w.shared_prefix.len())
            };
            format!(
                ", prompts {}{jitter} tokens{shared}, outputs {} tokens",
                w.prompt_tokens, w.output_tokens
            )
        });
    let api = if config.openai.is_some() {
        " (OpenAI HTTP API)"
    } else {
        ""
    };
    format!(
        "bench {addr}{api}: {load}, {stop}, {tenants} tenant{}{shape}",
        if tenants == 1 { "" } else { "s" }
    )
}
