//! `redis-server` as a child process on a free loopback port, for the tests of quotas that
//! frontends share through Redis (`tests/tests/quotas.rs`). The Debian package is installed
//! by `hack/install-node-runtime.sh` (`make node-runtime`, which `make test` runs).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::control_plane::wait_until;
use crate::error::{HarnessError, Result};
use crate::process::{ManagedProcess, TempDir, free_port};

/// A running `redis-server`: no persistence, loopback only, its files in a temporary
/// directory. Stopped when dropped.
#[derive(Debug)]
pub struct RedisServer {
    process: ManagedProcess,
    port: u16,
    _dir: TempDir,
}

impl RedisServer {
    /// Starts one; returns once it answers `PING`.
    pub async fn start() -> Result<Self> {
        let binary = binary()?;
        let dir = TempDir::new("redis")?;
        let port = free_port()?;
        let mut command = Command::new(&binary);
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path());
        let process = ManagedProcess::spawn("redis-server", command, dir.path().join("redis.log"))?;
        wait_until(&process, Duration::from_secs(20), || async move {
            match query(port, &["PING"]).await {
                Ok(reply) if reply == "+PONG" => Ok(true),
                Ok(reply) => Err(format!("PING answered {reply:?}")),
                Err(e) => Err(format!("port {port}: {e}")),
            }
        })
        .await?;
        Ok(Self {
            process,
            port,
            _dir: dir,
        })
    }

    /// `127.0.0.1:<port>`, as `quotaScope.redisAddress` takes it.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Runs one command; its reply's first line as sent (`+OK`, `:1`, `$5`, ...).
    pub async fn query(&self, args: &[&str]) -> std::io::Result<String> {
        query(self.port, args).await
    }

    /// The process (for its log, or to kill it).
    pub fn process(&self) -> &ManagedProcess {
        &self.process
    }
}

/// `redis-server` on the `PATH`, else `/usr/bin/redis-server`.
fn binary() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("redis-server"))
            .find(|p| p.is_file())
    });
    let path = on_path.unwrap_or_else(|| PathBuf::from("/usr/bin/redis-server"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::MissingProgram {
            name: "redis-server".into(),
            hint: "install it with `make node-runtime` (hack/install-node-runtime.sh), or \
                   `apt-get install redis-server`"
                .into(),
        })
    }
}

/// One command over a fresh connection; the first line of the reply.
async fn query(port: u16, args: &[&str]) -> std::io::Result<String> {
    let mut frame = format!("*{}\r\n", args.len());
    for a in args {
        frame.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(frame.as_bytes()).await?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 512];
    while !reply.ends_with(b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply"))??;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&reply);
    Ok(text.lines().next().unwrap_or_default().to_string())
}
