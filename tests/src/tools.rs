//! Where the control-plane binaries built by `hack/build-control-plane.sh` live.

use std::path::PathBuf;

use crate::error::{HarnessError, Result};

/// The directory holding `etcd`, `kube-apiserver`, `kube-controller-manager`,
/// `kube-scheduler`, `kubectl`, `kwok` and `helm`: `$SWITCHYARD_TOOLS_BIN` if set, else
/// `$SWITCHYARD_CACHE_DIR/tools/bin`, else `~/.cache/switchyard/tools/bin` (the same rule as
/// the build script's `--print-bin-dir`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SWITCHYARD_TOOLS_BIN") {
        return PathBuf::from(dir);
    }
    cache_dir().join("tools/bin")
}

/// `$SWITCHYARD_CACHE_DIR`, else `~/.cache/switchyard`: where the hack/ scripts keep what
/// they build (tools, images).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("SWITCHYARD_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/switchyard")
        })
}

/// The path of one tool, or an error naming it and the `make` target that builds it.
pub fn tool(name: &str) -> Result<PathBuf> {
    tool_in(&bin_dir(), name)
}

fn tool_in(dir: &std::path::Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    // `exists` follows the link that the build script leaves, so a dangling one counts as missing.
    if path.exists() {
        Ok(path)
    } else {
        Err(HarnessError::MissingTool {
            name: name.to_string(),
            path,
        })
    }
}

/// A binary of this workspace (`switchyard-operator`, `switchyard-worker`), from the
/// target directory the running test binary was built into. `make test` builds them
/// first (`cargo test` alone does not build other packages' binaries); a missing one is an
/// error that says so.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(HarnessError::io("locating the test binary"))?;
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let path = dir.join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(HarnessError::MissingWorkspaceBinary {
            name: name.to_string(),
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_names_the_binary_and_the_make_target() {
        let dir = std::env::temp_dir().join("switchyard-no-such-tools-dir");
        let err = tool_in(&dir, "kube-apiserver").unwrap_err().to_string();
        assert!(err.contains("`kube-apiserver` not found"), "{err}");
        assert!(err.contains("make tools"), "{err}");
        assert!(err.contains(&dir.display().to_string()), "{err}");
    }
}
