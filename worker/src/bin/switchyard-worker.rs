//! `switchyard-worker`: runs one worker process (a frontend or an expert shard).

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use switchyard_worker::server::{self, Role};

/// A Switchyard worker: serves one role of a ModelDeployment over gRPC.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Which part of the model this process serves.
    #[arg(long, env = "SWITCHYARD_ROLE", value_enum)]
    role: Role,
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
    tracing::info!(role = %args.role, listen = %args.listen, config = ?args.config, "starting switchyard-worker");
    if let Some(path) = &args.config {
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
    }
    let listener = server::bind(args.listen).await?;
    let addr = listener.local_addr().context("reading the bound address")?;
    tracing::info!(%addr, "listening");
    server::serve(args.role, listener, shutdown_signal()).await?;
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
