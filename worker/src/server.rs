//! The worker's gRPC server: what both roles serve, built in one place.
//!
//! ```text
//!   TcpListener ─ per-peer connection caps (admission::connections) ─> tonic Server
//!                     │  HTTP/2 limits (admission::TransportLimits)
//!                     ├─ grpc.health.v1.Health          "" = the process is up (liveness)
//!                     │                                 <role service> = ready for traffic
//!                     ├─ grpc.reflection.v1 / v1alpha   advertises what is served
//!                     └─ the role's service             ExpertShard, or Inference behind the
//!                                                       admission layers ([`frontend_routes`])
//! ```
//!
//! Health follows the gRPC health protocol: Kubernetes' liveness probe checks the empty
//! service name, the readiness probe checks the role's service name. That reports
//! `SERVING` only while the role can serve: its engine has loaded the model and, on a
//! frontend with expert shards, a reachable shard holds every routed expert
//! ([`Readiness`], polled every second); `NOT_SERVING` from SIGTERM on ([`crate::drain`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_proto::inference::v1::inference_server::InferenceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::LayerExt as _;
use tonic_health::ServingStatus;

use crate::admission;
pub use crate::admission::TransportLimits;
use crate::admission::connections::{PeerTable, incoming};
pub use crate::drain::{Drain, DrainArgs};
use crate::frontend;

/// The largest `Inference` request a frontend decodes (a prompt of about a million
/// tokens as ids).
pub const FRONTEND_MAX_REQUEST_BYTES: usize = 16 << 20;

/// The frontend's service: `switchyard.v1.Inference` behind the admission layers
/// ([`admission::pipeline::layers`]: count outcome → identify → request quota), so every
/// RPC gets its policy from the pipeline; ready while the frontend can serve
/// ([`frontend::Started::readiness`]); its streams end when the drain budget is spent.
pub fn frontend_service(started: &frontend::Started) -> RoleService {
    let inference = InferenceServer::new(started.service.clone())
        .max_decoding_message_size(FRONTEND_MAX_REQUEST_BYTES);
    let counter: Arc<dyn admission::StatusCounter> = started.metrics.clone();
    let admitted =
        admission::pipeline::layers(&started.admission, counter.clone()).named_layer(inference);
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(admitted);
    let mut routes = routes.routes();
    // The OpenAI-compatible HTTP API on the same port, behind the same layers.
    let openai = frontend::openai::service(started.service.clone(), &started.admission, counter);
    let router = routes.axum_router_mut();
    for path in frontend::openai::ROUTES {
        *router = std::mem::take(router).route_service(path, openai.clone());
    }
    RoleService {
        routes,
        readiness: started.readiness.clone(),
        drain: Some(started.service.drain().clone()),
    }
}

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

/// Binds `addr` (port 0 picks a free one; see the returned listener's `local_addr`).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// How the server listens and stops.
#[derive(Clone, Default)]
pub struct ServeOptions {
    /// HTTP/2 and per-address connection limits.
    pub limits: TransportLimits,
    /// How long in-flight calls get after SIGTERM.
    pub drain: DrainArgs,
    /// TLS on the gRPC port ([`crate::tls`]); `None`: plaintext (`h2c`).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The metrics server's `/readyz`, kept equal to the role's gRPC readiness (the
    /// probes use it when the gRPC port speaks TLS, which the kubelet's gRPC probe cannot).
    pub ready: Option<switchyard_edge::metrics::Readiness>,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("limits", &self.limits)
            .field("drain", &self.drain)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Whether the role can serve now: `Err(why)` while it cannot (a frontend that does not
/// reach a shard holding every routed expert). Polled every [`READINESS_POLL`].
#[derive(Clone)]
pub struct Readiness(Arc<dyn Fn() -> Result<(), String> + Send + Sync>);

impl Readiness {
    pub fn new(check: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Self {
        Self(Arc::new(check))
    }

    /// `Err(why)` while the role cannot serve.
    pub fn check(&self) -> Result<(), String> {
        (self.0)()
    }
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Readiness")
    }
}

/// How often the role's health follows its [`Readiness`] while ready.
pub const READINESS_POLL: Duration = Duration::from_secs(1);
/// How often while not ready: a new pod (a frontend waiting for its shards) counts as
/// capacity within this of being able to serve, not a second later.
pub const UNREADY_POLL: Duration = Duration::from_millis(100);

/// The role's own gRPC service, and what its health and shutdown follow.
#[derive(Debug)]
pub struct RoleService {
    pub routes: tonic::service::Routes,
    /// `None`: ready whenever served.
    pub readiness: Option<Readiness>,
    /// Ends the role's in-flight calls when the drain budget is spent.
    pub drain: Option<Drain>,
}

impl RoleService {
    /// Routes that are always ready and have no calls of their own to end.
    pub fn plain(routes: tonic::service::Routes) -> Self {
        Self {
            routes,
            readiness: None,
            drain: None,
        }
    }
}

/// Serves `role`'s endpoints on `listener` until `shutdown` completes, then drains
/// ([`crate::drain`]): readiness NOT_SERVING at once, new calls still taken for the unready
/// delay, then in-flight calls run until the budget is spent, after which they end with
/// UNAVAILABLE. `role_service` is the role's own gRPC service, once its engine is up;
/// without it the role's health reports `NOT_SERVING`.
pub async fn serve(
    role: Role,
    listener: TcpListener,
    role_service: Option<RoleService>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let ServeOptions {
        limits,
        drain: drain_args,
        tls,
        ready,
    } = options;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let serving_role = role_service.is_some();
    let (routes, readiness, drain) = match role_service {
        Some(r) => (r.routes, r.readiness, r.drain),
        None => (tonic::service::Routes::default(), None, None),
    };
    // When SIGTERM came (`None` while serving): the drain and its budget count from then.
    let (began_tx, mut began_rx) = watch::channel(None::<Instant>);
    let began_at = began_rx.clone();
    let health_task = tokio::spawn(follow_readiness(
        role,
        serving_role,
        readiness,
        began_rx.clone(),
        health_reporter.clone(),
        ready.clone(),
    ));

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

    tracing::info!(%role, addr = ?listener.local_addr().ok(), ?limits, drain_seconds = drain_args.seconds, tls = tls.is_some(), "serving gRPC");
    let stop_accepting = {
        let reporter = health_reporter.clone();
        async move {
            shutdown.await;
            began_tx.send_replace(Some(Instant::now()));
            if let Some(ready) = &ready {
                ready.set(false);
            }
            reporter
                .set_service_status(role.service_name(), ServingStatus::NotServing)
                .await;
            let delay = drain_args.unready_delay();
            tracing::info!(%role, budget_s = drain_args.seconds, still_accepting_ms = delay.as_millis() as u64, "draining: readiness NOT_SERVING; in-flight calls run to their end");
            tokio::time::sleep(delay).await;
            tracing::info!(%role, "draining: no longer accepting connections");
        }
    };
    let budget_spent = async move {
        let began: Option<Instant> = began_rx
            .wait_for(Option::is_some)
            .await
            .map_or(None, |b| *b);
        let Some(began) = began else {
            // The sender went away without a SIGTERM: the server stopped on its own.
            return std::future::pending().await;
        };
        tokio::time::sleep_until((began + drain_args.budget()).into()).await;
    };

    let l = limits;
    let peers = Arc::new(PeerTable::new(&l));
    let server = tonic::transport::Server::builder()
        // HTTP/1.1 too, for the frontend's OpenAI-compatible API (curl, the openai client).
        .accept_http1(true)
        .max_concurrent_streams(l.max_concurrent_streams)
        .http2_max_header_list_size(l.max_header_list_bytes)
        .http2_max_pending_accept_reset_streams(Some(l.max_pending_accept_reset_streams))
        .http2_max_local_error_reset_streams(Some(l.max_local_error_reset_streams))
        .http2_keepalive_interval(Some(l.keepalive_interval))
        .http2_keepalive_timeout(Some(l.keepalive_timeout))
        .max_connection_age(l.max_connection_age)
        .max_connection_age_grace(l.max_connection_age_grace)
        .add_routes(routes)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            crate::tls::incoming(incoming(listener, peers, l.max_connections_per_peer), tls),
            stop_accepting,
        );
    tokio::pin!(server);
    let result = tokio::select! {
        result = &mut server => result,
        () = budget_spent => {
            let what = if let Some(drain) = &drain {
                drain.expire();
                "ending them with UNAVAILABLE"
            } else {
                "stopping"
            };
            tracing::warn!(%role, budget_s = drain_args.seconds, "drain budget spent with calls still in flight; {what}");
            // The ended calls flush their status, then the connections close; a client
            // that never reads cannot hold the process past this.
            match tokio::time::timeout(HARD_STOP, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(%role, "connections still open {HARD_STOP:?} after the drain budget; exiting anyway");
                    Ok(())
                }
            }
        }
    };
    let began = *began_at.borrow();
    if let Some(began) = began {
        tracing::info!(%role, drained_ms = began.elapsed().as_millis() as u64, "drained");
    }
    health_task.abort();
    result?;
    tracing::info!(%role, "gRPC server stopped");
    Ok(())
}

/// How long after the drain budget the server may take to flush the ended calls.
const HARD_STOP: Duration = Duration::from_secs(2);

/// Keeps the role's health (and `/readyz`) equal to its readiness, every
/// [`READINESS_POLL`] ([`UNREADY_POLL`] while not ready), logging each change with the reason; NOT_SERVING for good once the
/// drain has begun (`began` holds when).
async fn follow_readiness(
    role: Role,
    serving_role: bool,
    readiness: Option<Readiness>,
    began: watch::Receiver<Option<Instant>>,
    reporter: tonic_health::server::HealthReporter,
    ready: Option<switchyard_edge::metrics::Readiness>,
) {
    let draining = || began.borrow().is_some();
    let mut last: Option<Result<(), String>> = None;
    loop {
        if draining() {
            return;
        }
        let now = if serving_role {
            readiness.as_ref().map_or(Ok(()), Readiness::check)
        } else {
            Err("the role's engine is not up".to_string())
        };
        if last.as_ref() != Some(&now) {
            let status = match &now {
                Ok(()) => {
                    if last.is_some() {
                        tracing::info!(%role, "ready: SERVING");
                    }
                    ServingStatus::Serving
                }
                Err(why) => {
                    tracing::warn!(%role, %why, "not ready: NOT_SERVING");
                    ServingStatus::NotServing
                }
            };
            reporter
                .set_service_status(role.service_name(), status)
                .await;
            if let Some(ready) = &ready {
                ready.set(now.is_ok());
            }
            if draining() {
                // SIGTERM came while that was written: NOT_SERVING wins.
                reporter
                    .set_service_status(role.service_name(), ServingStatus::NotServing)
                    .await;
                if let Some(ready) = &ready {
                    ready.set(false);
                }
                return;
            }
            last = Some(now);
        }
        if readiness.is_none() {
            return;
        }
        let ready_now = matches!(last, Some(Ok(())));
        tokio::time::sleep(if ready_now {
            READINESS_POLL
        } else {
            UNREADY_POLL
        })
        .await;
    }
}
