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
//! service name, the readiness probe checks the role's service name, which reports
//! `NOT_SERVING` until the role's service is given (its engine has loaded the model).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use switchyard_proto::inference::v1::inference_server::InferenceServer;
use tokio::net::TcpListener;
use tonic::service::LayerExt as _;
use tonic_health::ServingStatus;

use crate::admission;
pub use crate::admission::TransportLimits;
use crate::admission::connections::{PeerTable, incoming};
use crate::frontend;

/// The largest `Inference` request a frontend decodes (a prompt of about a million
/// tokens as ids).
pub const FRONTEND_MAX_REQUEST_BYTES: usize = 16 << 20;

/// The frontend's routes: `switchyard.v1.Inference` behind the admission layers
/// ([`admission::pipeline::layers`]: count outcome → identify → request quota), so every
/// RPC gets its policy from the pipeline.
pub fn frontend_routes(started: &frontend::Started) -> tonic::service::Routes {
    let inference = InferenceServer::new(started.service.clone())
        .max_decoding_message_size(FRONTEND_MAX_REQUEST_BYTES);
    let counter: Arc<dyn admission::StatusCounter> = started.metrics.clone();
    let admitted = admission::pipeline::layers(&started.admission, counter).named_layer(inference);
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(admitted);
    routes.routes()
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

    tracing::info!(%role, addr = ?listener.local_addr().ok(), ?limits, "serving gRPC");
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
