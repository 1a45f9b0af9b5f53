//! `switchyard-operator run` as a child process against a test control plane, scoped to
//! one namespace so tests (and their leases) do not see each other.

use std::process::Command;
use std::time::Duration;

use crate::control_plane::{ControlPlane, http_get_plain, wait_until};
use crate::error::Result;
use crate::process::{ManagedProcess, free_port};
use crate::tools::workspace_binary;

/// A running operator.
#[derive(Debug)]
pub struct OperatorProcess {
    process: ManagedProcess,
    metrics_port: u16,
}

impl OperatorProcess {
    /// Starts an operator that watches `namespace` and elects a leader on a Lease there,
    /// as `identity`; waits until its `/readyz` answers (leader or standby).
    pub async fn start(
        control_plane: &ControlPlane,
        namespace: &str,
        identity: &str,
        lease_duration: Duration,
    ) -> Result<Self> {
        let binary = workspace_binary("switchyard-operator")?;
        let metrics_port = free_port()?;
        let mut command = Command::new(binary);
        command
            .env("KUBECONFIG", control_plane.kubeconfig())
            .env_remove("SWITCHYARD_WATCH_NAMESPACE")
            .args(["run", "--namespace", namespace])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(["--leader-election", "true", "--lease-namespace", namespace])
            .args([
                "--lease-duration-seconds",
                &lease_duration.as_secs().to_string(),
            ])
            .args(["--identity", identity, "--log", "info,kube=warn"]);
        let process = ManagedProcess::spawn(
            &format!("switchyard-operator ({identity})"),
            command,
            control_plane
                .dir()
                .join(format!("operator-{namespace}-{identity}.log")),
        )?;
        let operator = Self {
            process,
            metrics_port,
        };
        wait_until(&operator.process, Duration::from_secs(60), || async move {
            let response = http_get_plain(metrics_port, "/readyz").await?;
            Ok(response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200"))
        })
        .await?;
        Ok(operator)
    }

    /// The operator's `/metrics` text.
    pub async fn metrics(&self) -> std::result::Result<String, String> {
        http_get_plain(self.metrics_port, "/metrics").await
    }

    /// `GET path` on the metrics port: the whole response, status line included.
    pub async fn http(&self, path: &str) -> std::result::Result<String, String> {
        http_get_plain(self.metrics_port, path).await
    }

    /// Peak resident memory of the operator so far, in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.process.peak_rss_kib()
    }

    /// Kills the process at once (no lease release: a crash, as far as the others know).
    pub fn kill(&self) {
        self.process.kill();
    }

    /// SIGTERM, then waits for a graceful exit; `None` if it had to be killed.
    pub fn terminate(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.process.terminate(timeout)
    }

    /// Fails with the log if the operator has exited.
    pub fn check_running(&self) -> Result<()> {
        self.process.check_running()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}
