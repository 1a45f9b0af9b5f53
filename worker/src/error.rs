//! Why a worker could not start: one typed error for both roles' start-up (settings, the
//! model, the engine, admission, expert shards, listeners), each variant naming the input
//! or resource that failed. The binary prints it with its causes
//! (`switchyard_edge::exit::error_line`), so a variant's message never repeats its source's.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::model::ModelError;

/// Why a frontend or an expert shard could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is out of range or inconsistent; the message names it and what would be
    /// accepted.
    #[error("{0}")]
    Invalid(String),
    /// A combination of flags, environment and `worker.json` that cannot be used.
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
    /// The compute device could not be opened.
    #[error(
        "--device {name}: {source} (is this build compiled with --features cuda, and is the GPU visible?)"
    )]
    Device {
        /// The device asked for.
        name: String,
        /// candle's error.
        source: candle_core::Error,
    },
    /// The checkpoint could not be loaded.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tokenizer could not be loaded.
    #[error("loading the tokenizer of {}", path.display())]
    Tokenizer {
        /// The checkpoint directory.
        path: PathBuf,
        /// Why.
        source: crate::text::TextError,
    },
    /// A file could not be read.
    #[error("reading {what} {}", path.display())]
    Read {
        /// Which input it is (e.g. `--admission-config`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A JSON file did not parse.
    #[error("{what} {}", path.display())]
    Json {
        /// Which input it is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// serde's error, with line and column.
        source: serde_json::Error,
    },
    /// The demo model could not be generated.
    #[error("generating the demo model under {}", cache.display())]
    Demo {
        /// The cache directory.
        cache: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not even one full-context sequence fits in the memory left for the KV cache.
    #[error(transparent)]
    KvBudget(#[from] crate::engine::kv_budget::KvBudgetError),
    /// The engine thread could not start.
    #[error("starting the engine")]
    Engine(#[source] candle_core::Error),
    /// The admission configuration or the API keys are unusable.
    #[error("configuring admission")]
    Admission(#[source] crate::admission::AdmissionError),
    /// The expert placement cannot be used.
    #[error("the placement cannot be used")]
    Placement(#[source] crate::experts::placement::PlacementError),
    /// Remote experts need a tokio runtime to run on.
    #[error("expert shards need a tokio runtime")]
    NoRuntime(#[source] tokio::runtime::TryCurrentError),
    /// The frontend could not reach its expert shards.
    #[error("connecting to the expert shards")]
    Shards(#[source] Box<StartError>),
    /// A metric could not be registered (a name registered twice: a bug).
    #[error("registering metrics")]
    Metrics(#[from] prometheus::Error),
    /// A listener could not be bound.
    #[error("binding {what} on {addr}")]
    Bind {
        /// Which listener (`the metrics listener`, ...).
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl StartError {
    /// A setting out of range: `message` names it and what would be accepted.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid(message.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_edge::exit::error_chain;

    #[test]
    fn each_cause_is_named_once() {
        let e = StartError::Shards(Box::new(StartError::invalid(
            "a dense model has no routed experts to put on shards",
        )));
        assert_eq!(
            error_chain(&e),
            "connecting to the expert shards: a dense model has no routed experts to put on shards"
        );
        let e = StartError::Read {
            what: "--admission-config",
            path: "/nope.json".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(
            error_chain(&e),
            "reading --admission-config /nope.json: entity not found"
        );
        let e = crate::model::parse_device("tpu:0").expect_err("unknown device");
        assert_eq!(
            error_chain(&e),
            "--device \"tpu:0\": expected auto, cpu or cuda:<ordinal>"
        );
    }
}
