//! Loading the worker contract file (`worker.json`) the operator mounts into every pod.

use std::path::{Path, PathBuf};

use switchyard_proto::worker_config::{CONFIG_VERSION, WorkerConfig};

/// Why the config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the worker config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the worker config {} is not valid: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the worker config {} has format version {found}; this worker reads version {CONFIG_VERSION} \
         (operator and worker images are out of step: upgrade them together)",
        path.display()
    )]
    Version { path: PathBuf, found: u32 },
}

/// Reads and checks `path`.
pub fn load(path: &Path) -> Result<WorkerConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Checks `text`, the content of `path`.
pub fn parse(path: &Path, text: &str) -> Result<WorkerConfig, ConfigError> {
    let config: WorkerConfig = serde_json::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    if config.version != CONFIG_VERSION {
        return Err(ConfigError::Version {
            path: path.to_path_buf(),
            found: config.version,
        });
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"{
      "version": 1, "deployment": "md",
      "model": {"path": "/models", "dtype": "bf16", "quantization": "none"},
      "serving": {"port": 50051, "maxBatchSize": 64, "maxBatchTokens": 8192, "maxTokensPerRequest": 4096},
      "admission": {"tiers": [], "maxQueued": 256, "defaultDeadlineSeconds": 30},
      "shards": {"count": 2, "service": "md-experts.ns.svc", "podPrefix": "md-experts-", "port": 50051},
      "placement": {"strategy": "evenSpread", "revision": "abc"}
    }"#;

    fn write(name: &str, text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("switchyard-{}-{name}.json", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_valid_file_loads() {
        let path = write("valid", VALID);
        let config = load(&path).unwrap();
        assert_eq!(config.shards.count, 2);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let path = write("typo", &VALID.replace("maxQueued", "maxQueue"));
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("maxQueue"), "{err}");
        std::fs::remove_file(path).unwrap();

        let path = write(
            "version",
            &VALID.replace(r#""version": 1"#, r#""version": 2"#),
        );
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("version 2"), "{err}");
        std::fs::remove_file(path).unwrap();

        let err = load(Path::new("/nonexistent/worker.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/worker.json"), "{err}");
    }
}
