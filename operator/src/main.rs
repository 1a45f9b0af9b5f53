//! `switchyard-operator`: the Switchyard Kubernetes operator.

use clap::{Parser, Subcommand};

/// The Switchyard operator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the ModelDeployment CustomResourceDefinition as YAML (for `kubectl apply -f -`).
    Crd,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", switchyard_operator::crd_yaml()),
    }
    Ok(())
}
