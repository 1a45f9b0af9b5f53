//! A plain HTTP/1.0 GET, for the workers' and the operator's own small endpoints
//! (`/demand`, `/readyz`): no TLS, no redirects, one request per connection, the whole
//! answer read (bounded).

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Largest answer read; more is an error.
const MAX_ANSWER: usize = 1 << 20;

/// Why a GET got no answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not an HTTP answer: {0:?}")]
    Malformed(String),
    #[error("the answer is larger than {MAX_ANSWER} bytes")]
    TooLarge,
}

/// `GET path` from `authority` (`host:port`); the status code and the body. The whole
/// exchange, connect included, takes at most `timeout`.
pub async fn get(
    authority: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), HttpError> {
    tokio::time::timeout(timeout, exchange(authority, path))
        .await
        .map_err(|_| HttpError::Timeout(timeout))?
}

async fn exchange(authority: &str, path: &str) -> Result<(u16, Vec<u8>), HttpError> {
    let mut stream = tokio::net::TcpStream::connect(authority).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
        if answer.len() > MAX_ANSWER {
            return Err(HttpError::TooLarge);
        }
    }
    let head_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| HttpError::Malformed(String::from_utf8_lossy(&answer).into_owned()))?;
    let head = String::from_utf8_lossy(&answer[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or(HttpError::Malformed(head))?;
    Ok((status, answer[head_end + 4..].to_vec()))
}
