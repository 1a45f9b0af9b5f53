//! `switchyard-worker --role frontend` and `--role expert-shard` as child processes on
//! loopback ports, for end-to-end tests over real gRPC.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::control_plane::{http_get_plain, wait_until};
use crate::error::Result;
use crate::process::{ManagedProcess, TempDir, free_port};
use crate::tools::workspace_binary;

/// A committed fixture checkpoint of the worker crate (`worker/tests/fixtures/models/<name>`).
pub fn fixture_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../worker/tests/fixtures/models")
        .join(name)
}

/// A greedy request for `prompt` that generates exactly `max_tokens` (EOS ignored): the
/// same tokens on every run and every replica.
pub fn greedy_request(
    prompt: &str,
    max_tokens: u32,
) -> switchyard_proto::inference::v1::GenerateRequest {
    use switchyard_proto::inference::v1 as pb;
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt(prompt.into())),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A running frontend.
#[derive(Debug)]
pub struct FrontendProcess {
    process: ManagedProcess,
    grpc_port: u16,
    metrics_port: u16,
    _dir: TempDir,
}

impl FrontendProcess {
    /// Starts a frontend serving `model` with `extra` flags; returns once gRPC accepts
    /// connections (the model is loaded by then).
    pub async fn start(model: &Path, extra: &[&str]) -> Result<Self> {
        let mut args: Vec<std::ffi::OsString> = vec!["--model".into(), model.into()];
        args.extend(extra.iter().map(Into::into));
        Self::start_with(&args).await
    }

    /// Starts a frontend with exactly `args` (besides the ports, log and cache flags), e.g.
    /// `--config worker.json`.
    pub async fn start_with(args: &[std::ffi::OsString]) -> Result<Self> {
        let (process, grpc_port, metrics_port, dir) =
            spawn_worker("frontend", free_port()?, args).await?;
        Ok(Self {
            process,
            grpc_port,
            metrics_port,
            _dir: dir,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> std::result::Result<String, String> {
        http_get_plain(self.metrics_port, "/metrics").await
    }

    /// `GET <path>` on the metrics port (`/healthz`, `/readyz`): the body of a 200, else
    /// the error.
    pub async fn http(&self, path: &str) -> std::result::Result<String, String> {
        http_get_plain(self.metrics_port, path).await
    }

    /// The value of one metric series (`name{labels}` exactly as exposed), if present.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics().await.ok()?, series)
    }

    /// The process (for its log, or to kill it).
    pub fn process(&self) -> &ManagedProcess {
        &self.process
    }
}

/// The value of one series (`name{labels}` exactly as exposed) in a metrics text.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A running expert shard.
#[derive(Debug)]
pub struct ShardProcess {
    process: ManagedProcess,
    grpc_port: u16,
    metrics_port: u16,
    _dir: TempDir,
}

impl ShardProcess {
    /// Starts `--role expert-shard --model model` with `extra` flags (e.g. `--placement
    /// FILE --shard-index 1`); returns once gRPC accepts connections (its experts are
    /// loaded by then).
    pub async fn start(model: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_on(free_port()?, model, extra).await
    }

    /// [`start`](Self::start) on a given gRPC port (to restart a shard where frontends
    /// expect it).
    pub async fn start_on(grpc_port: u16, model: &Path, extra: &[&str]) -> Result<Self> {
        let mut args: Vec<std::ffi::OsString> = vec!["--model".into(), model.into()];
        args.extend(extra.iter().map(Into::into));
        let (process, grpc_port, metrics_port, dir) =
            spawn_worker("expert-shard", grpc_port, &args).await?;
        Ok(Self {
            process,
            grpc_port,
            metrics_port,
            _dir: dir,
        })
    }

    /// `127.0.0.1:<port>`, as `--expert-shards` takes it.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.grpc_port)
    }

    /// The gRPC port.
    pub fn port(&self) -> u16 {
        self.grpc_port
    }

    /// The value of one of its metric series, if present.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_value(
            &http_get_plain(self.metrics_port, "/metrics").await.ok()?,
            series,
        )
    }

    /// `GET <path>` on its metrics port (`/load`): the body of a 200, else the error.
    pub async fn http(&self, path: &str) -> std::result::Result<String, String> {
        http_get_plain(self.metrics_port, path).await
    }

    /// The process (for its log, or to kill it).
    pub fn process(&self) -> &ManagedProcess {
        &self.process
    }
}

/// Starts `switchyard-worker --role ROLE` on `grpc_port` and a free metrics port with
/// `args`, its log and cache in a temporary directory; returns once gRPC accepts
/// connections.
async fn spawn_worker(
    role: &str,
    grpc_port: u16,
    args: &[std::ffi::OsString],
) -> Result<(ManagedProcess, u16, u16, TempDir)> {
    let binary = workspace_binary("switchyard-worker")?;
    let dir = TempDir::new(role)?;
    let metrics_port = free_port()?;
    let mut command = Command::new(binary);
    command
        .args(["--role", role, "--log", "info"])
        .args(["--listen", &format!("127.0.0.1:{grpc_port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .arg("--cache-dir")
        .arg(dir.path())
        .args(args)
        .env_remove("SWITCHYARD_CONFIG")
        .env_remove("SWITCHYARD_SHARD_INDEX");
    let process = ManagedProcess::spawn(
        &format!("switchyard-worker ({role})"),
        command,
        dir.path().join(format!("{role}.log")),
    )?;
    wait_until(&process, Duration::from_secs(120), || async move {
        match tokio::net::TcpStream::connect(("127.0.0.1", grpc_port)).await {
            Ok(_) => Ok(true),
            Err(e) => Err(format!("gRPC port {grpc_port}: {e}")),
        }
    })
    .await?;
    Ok((process, grpc_port, metrics_port, dir))
}
