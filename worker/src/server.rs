//! The worker's gRPC server: what both roles serve, built in one place.
//!
//! ```text
//!   TcpListener ──> tonic Server
//!                     ├─ grpc.health.v1.Health          "" = the process is up (liveness)
//!                     │                                 <role service> = ready for traffic
//!                     ├─ grpc.reflection.v1 / v1alpha   advertises what is served
//!                     └─ the role's service             (Inference, ExpertShard)
//! ```
//!
//! Health follows the gRPC health protocol: Kubernetes' liveness probe checks the empty
//! service name, the readiness probe checks the role's service name, which reports
//! `NOT_SERVING` until the role's service is given (its engine has loaded the model).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::admission::gcra::{Limit, Quotas, TierLimits};
use tonic_health::ServingStatus;

/// What a worker process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Holds attention, the KV cache and the router; serves `switchyard.v1.Inference`.
    Frontend,
    /// Holds routed experts; serves `switchyard.expert.v1.ExpertShard` to frontends.
    ExpertShard,
}

impl Role {
    /// The fully-qualified gRPC service this role serves, also its readiness health key.
    pub fn service_name(self) -> &'static str {
        match self {
            Role::Frontend => "switchyard.v1.Inference",
            Role::ExpertShard => "switchyard.expert.v1.ExpertShard",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Frontend => "frontend",
            Role::ExpertShard => "expert-shard",
        })
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("binding the gRPC listener on {addr}: {source} (is the port in use, or not allowed?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// HTTP/2 and connection limits of the gRPC server: what a misbehaving or hostile client
/// may cost before it loses its connection.
#[derive(Debug, Clone)]
pub struct TransportLimits {
    /// Concurrent streams (calls) per connection; more are refused by HTTP/2 itself.
    pub max_concurrent_streams: u32,
    /// Largest header list (all metadata of a call), bytes: a CONTINUATION flood ends the
    /// connection instead of filling memory.
    pub max_header_list_bytes: u32,
    /// Streams a client may open and reset before they are accepted (CVE-2023-44487,
    /// "rapid reset"); past it the connection is closed with GOAWAY.
    pub max_pending_accept_reset_streams: usize,
    /// Streams the server may reset for protocol errors before closing the connection.
    pub max_local_error_reset_streams: usize,
    /// HTTP/2 PING interval and how long to wait for its answer: dead peers are dropped.
    pub keepalive_interval: Duration,
    /// See `keepalive_interval`.
    pub keepalive_timeout: Duration,
    /// A connection is closed (gracefully, after `max_connection_age_grace`) once this old,
    /// so long-lived clients rebalance over frontends.
    pub max_connection_age: Duration,
    /// Time in-flight calls get to finish when a connection reaches its age.
    pub max_connection_age_grace: Duration,
    /// Open connections per client IP address; further ones are closed on accept.
    pub max_connections_per_peer: usize,
    /// New connections per client IP address per second (sustained), with this burst;
    /// faster reconnects are closed on accept, before any HTTP/2 work. A client that is
    /// cut off for abuse (rapid reset, header floods) cannot simply reconnect at once.
    pub new_connections_per_peer_per_second: u64,
    /// See `new_connections_per_peer_per_second`.
    pub new_connections_burst: u64,
}

impl Default for TransportLimits {
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

/// Open connections per client address, shared by the accept loop and the connections.
#[derive(Debug)]
struct PeerTable {
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
    fn new(l: &TransportLimits) -> Self {
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
fn incoming(
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

/// Binds `addr` (port 0 picks a free one; see the returned listener's `local_addr`).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// Serves `role`'s endpoints on `listener` until `shutdown` completes, then drains
/// in-flight calls and returns. `role_service` is the role's own gRPC service, once its
/// engine is up; without it the role's health reports `NOT_SERVING`.
pub async fn serve(
    role: Role,
    listener: TcpListener,
    role_service: Option<tonic::service::Routes>,
    limits: TransportLimits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let status = if role_service.is_some() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health_reporter
        .set_service_status(role.service_name(), status)
        .await;
    let serving_role = role_service.is_some();

    let health_service = "grpc.health.v1.Health";
    let reflection = || {
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(switchyard_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(health_service)
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        if serving_role {
            builder.with_service_name(role.service_name())
        } else {
            builder
        }
    };
    let reflection_v1 = reflection().build_v1()?;
    // v1alpha too: grpcurl and many deployed clients still ask for it.
    let reflection_v1alpha = reflection().build_v1alpha()?;

    tracing::info!(%role, addr = ?listener.local_addr().ok(), "serving gRPC");
    let l = limits;
    let peers = Arc::new(PeerTable::new(&l));
    tonic::transport::Server::builder()
        .max_concurrent_streams(l.max_concurrent_streams)
        .http2_max_header_list_size(l.max_header_list_bytes)
        .http2_max_pending_accept_reset_streams(Some(l.max_pending_accept_reset_streams))
        .http2_max_local_error_reset_streams(Some(l.max_local_error_reset_streams))
        .http2_keepalive_interval(Some(l.keepalive_interval))
        .http2_keepalive_timeout(Some(l.keepalive_timeout))
        .max_connection_age(l.max_connection_age)
        .max_connection_age_grace(l.max_connection_age_grace)
        .add_routes(role_service.unwrap_or_default())
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            incoming(listener, peers, l.max_connections_per_peer),
            shutdown,
        )
        .await?;
    tracing::info!(%role, "gRPC server stopped");
    Ok(())
}
