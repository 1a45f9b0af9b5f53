//! Connection-level admission: HTTP/2 limits and per-peer connection caps, applied before
//! any call exists. A connection over a per-address cap is closed on accept, costing the
//! peer its connection and the server nothing; the HTTP/2 limits bound what one connection
//! may cost before it loses it.
//!
//! [`TransportLimits`] is configured with the rest of the worker: CLI flags with `SWITCHYARD_*`
//! environment fallbacks (see docs/admission.md), printed at start-up.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::gcra::{Limit, Quotas, TierLimits};

/// HTTP/2 and connection limits of the gRPC server: what a misbehaving or hostile client
/// may cost before it loses its connection.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct TransportLimits {
    /// Concurrent streams (calls) per connection; more are refused by HTTP/2 itself.
    #[arg(long, env = "SWITCHYARD_MAX_CONCURRENT_STREAMS", default_value_t = 128)]
    pub max_concurrent_streams: u32,
    /// Largest header list (all metadata of a call), bytes: a CONTINUATION flood ends the
    /// connection instead of filling memory.
    #[arg(long, env = "SWITCHYARD_MAX_HEADER_LIST_BYTES", default_value_t = 16 << 10)]
    pub max_header_list_bytes: u32,
    /// Streams a client may open and reset before they are accepted (CVE-2023-44487,
    /// "rapid reset"); past it the connection is closed with GOAWAY.
    #[arg(
        long,
        env = "SWITCHYARD_MAX_PENDING_ACCEPT_RESET_STREAMS",
        default_value_t = 20
    )]
    pub max_pending_accept_reset_streams: usize,
    /// Streams the server may reset for protocol errors before closing the connection.
    #[arg(
        long,
        env = "SWITCHYARD_MAX_LOCAL_ERROR_RESET_STREAMS",
        default_value_t = 64
    )]
    pub max_local_error_reset_streams: usize,
    /// HTTP/2 PING interval (e.g. 30s): dead peers are dropped.
    #[arg(long, env = "SWITCHYARD_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is dropped.
    #[arg(long, env = "SWITCHYARD_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub keepalive_timeout: Duration,
    /// A connection is closed (gracefully, after `--max-connection-age-grace`) once this
    /// old, so long-lived clients rebalance over frontends.
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTION_AGE", default_value = "30m", value_parser = parse_duration)]
    pub max_connection_age: Duration,
    /// Time in-flight calls get to finish when a connection reaches its age.
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTION_AGE_GRACE", default_value = "60s", value_parser = parse_duration)]
    pub max_connection_age_grace: Duration,
    /// Open connections per client IP address; further ones are closed on accept.
    #[arg(
        long,
        env = "SWITCHYARD_MAX_CONNECTIONS_PER_PEER",
        default_value_t = 64
    )]
    pub max_connections_per_peer: usize,
    /// New connections per client IP address per second (sustained), with
    /// `--new-connections-burst`; faster reconnects are closed on accept, before any HTTP/2
    /// work. A client that is cut off for abuse (rapid reset, header floods) cannot simply
    /// reconnect at once.
    #[arg(
        long,
        env = "SWITCHYARD_NEW_CONNECTIONS_PER_PEER_PER_SECOND",
        default_value_t = 20
    )]
    pub new_connections_per_peer_per_second: u64,
    /// New connections per client IP address at once, before the rate applies.
    #[arg(long, env = "SWITCHYARD_NEW_CONNECTIONS_BURST", default_value_t = 100)]
    pub new_connections_burst: u64,
}

impl Default for TransportLimits {
    /// The flags' defaults.
    fn default() -> Self {
        Self {
            max_concurrent_streams: 128,
            max_header_list_bytes: 16 << 10,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 64,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(30 * 60),
            max_connection_age_grace: Duration::from_secs(60),
            max_connections_per_peer: 64,
            new_connections_per_peer_per_second: 20,
            new_connections_burst: 100,
        }
    }
}

/// A duration flag: a whole number with a unit, `ms`, `s`, `m` or `h` (`30s`, `500ms`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let expected =
        || format!("{text:?}: expected a whole number with a unit: 500ms, 30s, 5m or 1h");
    let n: u64 = digits.parse().map_err(|_| expected())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
        _ => Err(expected()),
    }
}

/// Open connections per client address, shared by the accept loop and the connections.
#[derive(Debug)]
pub(crate) struct PeerTable {
    open: std::sync::Mutex<HashMap<IpAddr, usize>>,
    /// New-connection rate per address.
    rates: Quotas<IpAddr>,
    rate: TierLimits,
    refused: AtomicU64,
}

/// One slot of a peer's connection budget, given back when the connection closes.
#[derive(Debug)]
struct PeerSlot {
    table: Arc<PeerTable>,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self
            .table
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl PeerTable {
    pub(crate) fn new(l: &TransportLimits) -> Self {
        Self {
            open: std::sync::Mutex::new(HashMap::new()),
            rates: Quotas::new(),
            rate: TierLimits {
                // Both arguments are at least 1, which is all `Limit::new` checks.
                requests: Limit::new(
                    l.new_connections_per_peer_per_second
                        .saturating_mul(60)
                        .max(1),
                    l.new_connections_burst.max(1),
                )
                .ok(),
                tokens: None,
            },
            refused: AtomicU64::new(0),
        }
    }

    fn admit(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<PeerSlot> {
        let now = std::time::Instant::now();
        if self.rates.check(&ip, &self.rate, 0, now).is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // Forget addresses whose budget has refilled, now and then.
        if self.refused.load(Ordering::Relaxed) % 1024 == 1023 {
            self.rates.evict_idle(now);
        }
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= cap {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            table: self.clone(),
            ip,
        })
    }
}

/// An accepted connection holding its peer's slot.
#[derive(Debug)]
pub struct Conn {
    inner: TcpStream,
    _slot: PeerSlot,
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepted connections, with Nagle's algorithm off (a streamed token is a few dozen bytes
/// and must leave at once, not wait up to 40 ms for the previous one's ACK), and at most
/// `cap` open per client address: the extra ones are closed on accept, costing the peer
/// its connection and us nothing.
pub(crate) fn incoming(
    listener: TcpListener,
    peers: Arc<PeerTable>,
    cap: usize,
) -> impl tokio_stream::Stream<Item = std::io::Result<Conn>> {
    use tokio_stream::StreamExt as _;
    TcpListenerStream::new(listener).filter_map(move |conn| {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        let ip = conn
            .peer_addr()
            .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        let Some(slot) = peers.admit(ip, cap) else {
            tracing::debug!(%ip, cap, "closing a connection over the per-peer cap");
            return None;
        };
        if let Err(e) = conn.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
        }
        Some(Ok(Conn {
            inner: conn,
            _slot: slot,
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(Debug, clap::Parser)]
    struct Flags {
        #[command(flatten)]
        limits: TransportLimits,
    }

    #[test]
    fn the_flags_defaults_are_the_defaults() {
        let flags = Flags::try_parse_from(["worker"]).expect("no flags");
        assert_eq!(flags.limits, TransportLimits::default());
    }

    #[test]
    fn flags_set_limits_and_durations_need_a_unit() {
        let flags = Flags::try_parse_from([
            "worker",
            "--max-connections-per-peer",
            "8",
            "--keepalive-interval",
            "500ms",
            "--max-connection-age",
            "2h",
        ])
        .expect("flags");
        assert_eq!(flags.limits.max_connections_per_peer, 8);
        assert_eq!(flags.limits.keepalive_interval, Duration::from_millis(500));
        assert_eq!(flags.limits.max_connection_age, Duration::from_secs(7200));
        let err = Flags::try_parse_from(["worker", "--keepalive-timeout", "10"])
            .expect_err("no unit")
            .to_string();
        assert!(err.contains("expected a whole number with a unit"), "{err}");
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("s").is_err() && parse_duration("1.5s").is_err());
    }
}
