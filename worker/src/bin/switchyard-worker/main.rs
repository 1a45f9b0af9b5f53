//! `switchyard-worker`: runs one worker process (a frontend or an expert shard), or one
//! of the offline tools ([`tools`]).
//!
//! ```text
//!   Args (flags + SWITCHYARD_* env) ─┐
//!   worker.json (--config)          ─┴─> settings::{Frontend,Shard}Settings (logged)
//!                                          └─> start the role ─> serve gRPC + /metrics
//! ```

mod tools;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use switchyard_proto::expert::v1::expert_shard_server::ExpertShardServer;
use switchyard_proto::worker_config::WorkerConfig;
use switchyard_worker::experts::{self, shard::MAX_REQUEST_BYTES};
use switchyard_worker::frontend;
use switchyard_worker::server::{self, Role};
use switchyard_worker::settings::{
    FrontendArgs, FrontendSettings, ModelArgs, ShardArgs, ShardSettings,
};

/// A Switchyard worker: serves one role of a ModelDeployment over gRPC.
///
/// Settings, lowest precedence first: built-in defaults, the --config file (worker.json),
/// then each flag or its SWITCHYARD_* variable that is set. --model, --model-id, --dtype
/// and --shard-count are refused with --config, which fixes them for the deployment.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Which part of the model this process serves (required unless a subcommand is given).
    #[arg(long, env = "SWITCHYARD_ROLE", value_enum)]
    role: Option<Role>,
    #[command(subcommand)]
    command: Option<tools::Tool>,
    /// Address to serve gRPC on (port 0 picks a free port and logs it).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// The worker contract file the operator mounts (`worker.json`). Optional when run by
    /// hand; when given, a file that does not parse stops the worker at start-up.
    #[arg(long, env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
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
    /// The checkpoint and its dtype and device (both roles).
    #[command(flatten)]
    model: ModelArgs,
    /// Frontend serving flags.
    #[command(flatten)]
    frontend: FrontendArgs,
    /// Expert-shard flags.
    #[command(flatten)]
    shard: ShardArgs,
    /// HTTP/2 and per-peer connection limits (both roles; docs/admission.md).
    #[command(flatten)]
    transport: server::TransportLimits,
    /// How long in-flight calls may run after SIGTERM (both roles; docs/worker.md).
    #[command(flatten)]
    drain: server::DrainArgs,
    /// TLS on the gRPC port (docs/worker.md).
    #[command(flatten)]
    tls: switchyard_worker::tls::TlsArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    switchyard_edge::exit::exit_with(run(Args::parse()).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let startup = switchyard_worker::telemetry::Startup::begin();
    switchyard_edge::logging::init(&args.log)?;
    switchyard_worker::model::matmul::int8_activations_setting().map_err(anyhow::Error::msg)?;
    switchyard_worker::model::pages::setting().map_err(anyhow::Error::msg)?;
    if let Some(tool) = args.command {
        return tokio::task::spawn_blocking(move || tools::run(tool))
            .await
            .context("the tool panicked")?;
    }
    let Some(role) = args.role else {
        anyhow::bail!(
            "--role is required (frontend or expert-shard), or give a subcommand; see --help"
        );
    };
    tracing::info!(%role, listen = %args.listen, config = ?args.config, "starting switchyard-worker");
    let config = match &args.config {
        Some(path) => Some(load_worker_config(path)?),
        None => None,
    };
    // Before loading: a bad certificate should not cost a model load to find out.
    let tls = args.tls.acceptor()?;
    let ready = switchyard_edge::metrics::Readiness::default();
    let role_service = match role {
        Role::Frontend => {
            let settings = FrontendSettings::resolve(&args.model, &args.frontend, config.as_ref())?;
            settings.log();
            start_frontend(settings, args.metrics_listen, ready.clone(), &startup).await?
        }
        Role::ExpertShard => {
            let settings = ShardSettings::resolve(&args.model, &args.shard, config.as_ref())?;
            settings.log();
            start_shard(settings, args.metrics_listen, ready.clone(), &startup).await?
        }
    };
    let listener = server::bind(args.listen).await?;
    let addr = listener.local_addr().context("reading the bound address")?;
    tracing::info!(%addr, "listening");
    startup.mark("listening");
    server::serve(
        role,
        listener,
        Some(role_service),
        server::ServeOptions {
            limits: args.transport,
            drain: args.drain,
            tls,
            ready: Some(ready),
        },
        switchyard_edge::signal::shutdown_signal(),
    )
    .await?;
    Ok(())
}

fn load_worker_config(path: &std::path::Path) -> anyhow::Result<WorkerConfig> {
    let config = switchyard_worker::config::load(path)?;
    tracing::info!(
        deployment = %config.deployment,
        model = %config.model.path,
        dtype = %config.model.dtype,
        quantization = %config.model.quantization,
        shards = config.shards.count,
        placement = %config.placement.revision,
        "loaded the worker config"
    );
    Ok(config)
}

/// Loads the model (blocking task), serves its metrics, returns its gRPC service.
async fn start_frontend(
    settings: FrontendSettings,
    metrics_listen: SocketAddr,
    ready: switchyard_edge::metrics::Readiness,
    startup: &switchyard_worker::telemetry::Startup,
) -> anyhow::Result<server::RoleService> {
    let started = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let options = settings.into_options()?;
        Ok(frontend::start(&options)?)
    })
    .await
    .context("the model loading task panicked")??;
    startup.mark("loaded");
    startup.register(started.metrics.registry());
    let (admission, metrics) = (started.admission.clone(), started.metrics.clone());
    let demand = switchyard_edge::metrics::JsonEndpoint {
        path: "/demand",
        body: switchyard_edge::metrics::JsonBody::Now(std::sync::Arc::new(move || {
            serde_json::to_string(&frontend::demand(&admission, &metrics))
                .unwrap_or_else(|e| format!("{{\"error\": \"encoding the demand report: {e}\"}}"))
        })),
    };
    let (expert_metrics, remote) = (started.metrics.clone(), started.remote.clone());
    let expert_load = switchyard_edge::metrics::JsonEndpoint {
        path: "/expert-load",
        body: switchyard_edge::metrics::JsonBody::Now(std::sync::Arc::new(move || {
            let mut report = expert_metrics.expert_load(std::time::Instant::now());
            if let Some(r) = &remote {
                report.shards = r.shards_seen();
                (report.moe_layers, report.experts) = r.shape();
            }
            serde_json::to_string(&report)
                .unwrap_or_else(|e| format!("{{\"error\": \"encoding the expert load: {e}\"}}"))
        })),
    };
    switchyard_worker::telemetry::spawn_server(
        metrics_listen,
        started.metrics.registry().clone(),
        ready,
        vec![demand, expert_load],
    )
    .await?;
    Ok(server::frontend_service(&started))
}

/// Loads the assigned experts (blocking task), serves their metrics, returns the service.
async fn start_shard(
    settings: ShardSettings,
    metrics_listen: SocketAddr,
    ready: switchyard_edge::metrics::Readiness,
    startup: &switchyard_worker::telemetry::Startup,
) -> anyhow::Result<server::RoleService> {
    let started = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let options = settings.into_options()?;
        Ok(experts::shard::start(&options)?)
    })
    .await
    .context("the expert loading task panicked")??;
    startup.mark("loaded");
    startup.register(&started.registry);
    started.service.spawn_background(Duration::from_secs(2));
    let service = started.service.clone();
    let load = switchyard_edge::metrics::JsonEndpoint {
        path: "/load",
        body: switchyard_edge::metrics::JsonBody::Now(std::sync::Arc::new(move || {
            serde_json::to_string(&service.load_report())
                .unwrap_or_else(|e| format!("{{\"error\": \"encoding the load report: {e}\"}}"))
        })),
    };
    switchyard_worker::telemetry::spawn_server(
        metrics_listen,
        started.registry.clone(),
        ready,
        vec![load],
    )
    .await?;
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(
        ExpertShardServer::new(started.service)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_REQUEST_BYTES),
    );
    Ok(server::RoleService::plain(routes.routes()))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn the_flags_do_not_collide() {
        super::Args::command().debug_assert();
    }
}
