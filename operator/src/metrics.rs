//! Prometheus metrics of the operator, and the small HTTP server that exposes them with
//! the health endpoints.
//!
//! ```text
//!   GET /metrics   switchyard_operator_* (text format)
//!   GET /healthz   200 while the process runs
//!   GET /readyz    200 once the controller runs (leader) or stands by (follower)
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// The operator's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: IntCounterVec,
    errors: IntCounterVec,
    duration: HistogramVec,
    /// Objects the operator manages (ModelDeployments in its cache × owned objects each).
    managed_objects: IntGauge,
    /// 1 while this replica holds the leader lease.
    pub leader: IntGauge,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("switchyard_operator".into()), None)
            .expect("static registry options are valid");
        let reconciles = IntCounterVec::new(
            Opts::new("reconciles_total", "Reconciles run, by result"),
            &["result"],
        )
        .expect("static metric options are valid");
        let errors = IntCounterVec::new(
            Opts::new("reconcile_errors_total", "Failed reconciles, by reason"),
            &["reason"],
        )
        .expect("static metric options are valid");
        let duration = HistogramVec::new(
            HistogramOpts::new("reconcile_duration_seconds", "Time one reconcile took").buckets(
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            ),
            &[],
        )
        .expect("static metric options are valid");
        let managed_objects = IntGauge::new("managed_objects", "Objects the operator manages")
            .expect("static metric options are valid");
        let leader = IntGauge::new("leader", "1 while this replica holds the leader lease")
            .expect("static metric options are valid");
        for collector in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(managed_objects.clone()),
            Box::new(leader.clone()),
        ] {
            registry
                .register(collector)
                .expect("each metric is registered once");
        }
        Self {
            registry,
            reconciles,
            errors,
            duration,
            managed_objects,
            leader,
            ready: AtomicBool::new(false),
        }
    }

    /// Records one reconcile: how long it took, and the failure's reason label
    /// (`reconcile::Error::reason`) if it failed. Takes the reason, not the error, so this
    /// module depends on nothing in `reconcile`.
    pub fn observe_reconcile(&self, took: Duration, error_reason: Option<&'static str>) {
        self.duration
            .with_label_values::<&str>(&[])
            .observe(took.as_secs_f64());
        match error_reason {
            None => self.reconciles.with_label_values(&["success"]).inc(),
            Some(reason) => {
                self.reconciles.with_label_values(&["error"]).inc();
                self.errors.with_label_values(&[reason]).inc();
            }
        }
    }

    /// Sets the managed-objects gauge from the ModelDeployments in the cache.
    pub fn set_managed_deployments(&self, deployments: usize) {
        self.managed_objects
            .set((deployments * crate::build::Desired::OBJECT_COUNT) as i64);
    }

    /// Marks the process ready (`/readyz` answers 200).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(route(&request, &metrics)) }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn route(request: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, body): (StatusCode, Vec<u8>) = match request.uri().path() {
        "/metrics" => (StatusCode::OK, metrics.render()),
        "/healthz" => (StatusCode::OK, b"ok".to_vec()),
        "/readyz" if metrics.ready.load(Ordering::Relaxed) => (StatusCode::OK, b"ok".to_vec()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, b"starting".to_vec()),
        _ => (
            StatusCode::NOT_FOUND,
            b"not found: try /metrics, /healthz or /readyz".to_vec(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Binds the metrics address, naming it in the error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding --metrics-addr {addr}: {e}"))
}
