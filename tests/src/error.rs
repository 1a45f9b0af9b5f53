//! The harness's one error type. Messages are written for the person whose test just failed:
//! they say which component, what went wrong, and where its log is.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can stop the harness from giving a test its control plane.
// Debug prints the Display text: tests `unwrap()` these, and the message (with its log
// excerpt) is what the reader needs, not an escaped struct dump.
#[derive(thiserror::Error)]
pub enum HarnessError {
    /// A control-plane binary has not been built on this machine.
    #[error(
        "`{name}` not found at {}: build the test control plane with `make tools` \
         (hack/build-control-plane.sh), or point SWITCHYARD_TOOLS_BIN at a directory holding it",
        path.display()
    )]
    MissingTool { name: String, path: PathBuf },

    /// A binary of this workspace has not been built.
    #[error(
        "`{name}` not found at {}: build it with `cargo build --workspace --bins` \
         (`make test` does; `cargo test` alone does not build other packages' binaries)",
        path.display()
    )]
    MissingWorkspaceBinary { name: String, path: PathBuf },

    /// A component exited, or never became ready.
    #[error("{component} did not become ready within {timeout:?}: {reason}\n--- last lines of {} ---\n{log_tail}", log.display())]
    NotReady {
        component: String,
        timeout: Duration,
        reason: String,
        log: PathBuf,
        log_tail: String,
    },

    /// A component exited while it should have been running.
    #[error("{component} exited with {status}\n--- last lines of {} ---\n{log_tail}", log.display())]
    Exited {
        component: String,
        status: String,
        log: PathBuf,
        log_tail: String,
    },

    /// The shared control plane of this test binary failed to start earlier; every test
    /// that needs it fails with the same cause instead of retrying a slow start.
    #[error("the shared test control plane failed to start: {0}")]
    SharedStartFailed(String),

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error("generating test certificates: {0}")]
    Certificates(#[from] rcgen::Error),

    #[error("loading the test kubeconfig: {0}")]
    Kubeconfig(String),

    #[error("Kubernetes API call failed ({what}): {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },

    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },

    /// A program a test runs is not installed.
    #[error("`{name}` is not installed: {hint}")]
    MissingProgram { name: String, hint: String },

    /// A piece of the real test node is missing on this machine.
    #[error("the real test node needs {what}, which is missing: {hint}")]
    MissingNodeRuntime { what: String, hint: String },

    /// An external command the harness ran failed.
    #[error("`{command}` failed ({status}):\n{output}")]
    CommandFailed {
        command: String,
        status: String,
        output: String,
    },

    /// Something on the real node did not happen in time; the diagnosis holds the pods'
    /// events, their logs and the kubelet's log.
    #[error("timed out after {timeout:?} waiting for {what} (last: {last})\n{diagnosis}")]
    Stuck {
        what: String,
        timeout: Duration,
        last: String,
        diagnosis: String,
    },
}

impl std::fmt::Debug for HarnessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl HarnessError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    pub(crate) fn kube(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let what = what.into();
        move |source| Self::Kube { what, source }
    }
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;
