//! Where a server's logs go: stderr, structured by `tracing`, coloured on a terminal only.

use anyhow::Context as _;

/// Installs the process-wide `tracing` subscriber with `filter` (`--log`, in
/// `tracing_subscriber::EnvFilter` syntax, e.g. `info,switchyard_worker=debug`).
pub fn init(filter: &str) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter)
                .with_context(|| format!("--log {filter:?} is not a valid log filter"))?,
        )
        .init();
    Ok(())
}
