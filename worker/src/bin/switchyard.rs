//! `switchyard`: the command-line client for a Switchyard endpoint.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use switchyard_worker::client;

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
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    switchyard_worker::cli::exit_with(run(Cli::parse()).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let channel = client::connect(&cli.addr).await?;
    match cli.command {
        Command::Health { service } => {
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
            for name in client::list_services(channel).await? {
                println!("{name}");
            }
        }
    }
    Ok(())
}
