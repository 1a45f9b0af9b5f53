//! The worker's telemetry, shared by both roles: constructors for statically named
//! metrics, the `/metrics` and `/healthz` server the binary starts, and (from
//! [`switchyard_edge::metrics`], which the operator and the CLI use too) the gRPC status
//! label every `*_total{status}` series uses.
//!
//! What each role measures lives with the role ([`crate::frontend::metrics`],
//! [`crate::experts::shard`], [`crate::experts::remote`]); this module knows no metric names.

use std::net::SocketAddr;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};
pub use switchyard_edge::metrics::{ALL_CODES, render, status_label};

/// A histogram with a static name, help and buckets.
pub fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("static metric options are valid")
}

/// A counter with a static name and help.
pub fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("static metric options are valid")
}

/// A gauge with a static name and help.
pub fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("static metric options are valid")
}

/// Saturating `u64` → `i64` for gauges.
pub fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `switchyard_startup_timestamp_seconds{phase}`: when this process reached each start-up
/// phase, as Unix time in seconds (millisecond precision): `process` (it began), `loaded`
/// (its role's weights in memory), `listening` (its gRPC port open). With the pod's own
/// times and a frontend's `switchyard_first_token_timestamp_seconds` it breaks a new pod's
/// time to useful capacity down (docs/benchmarks.md).
#[derive(Debug, Clone)]
pub struct Startup(prometheus::GaugeVec);

impl Startup {
    /// Starts the clock: `process` is now.
    pub fn begin() -> Self {
        let gauges = prometheus::GaugeVec::new(
            prometheus::Opts::new(
                "startup_timestamp_seconds",
                "When this process reached each start-up phase (Unix time)",
            ),
            &["phase"],
        )
        .expect("static metric options are valid");
        let startup = Self(gauges);
        startup.mark("process");
        startup
    }

    /// `phase` is reached now.
    pub fn mark(&self, phase: &str) {
        self.0.with_label_values(&[phase]).set(unix_now());
    }

    /// Adds the gauges to the registry the role serves.
    pub fn register(&self, registry: &Registry) {
        if let Err(e) = registry.register(Box::new(self.0.clone())) {
            tracing::warn!(error = %e, "could not register the start-up timestamps");
        }
    }
}

/// Unix time now, in seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Serves `/metrics`, `/healthz` and `/readyz` (what `ready` says) for `registry` on
/// `addr` in the background, for the process's lifetime; fails only if `addr` cannot be
/// bound.
pub async fn spawn_server(
    addr: SocketAddr,
    registry: Registry,
    ready: switchyard_edge::metrics::Readiness,
    extra: Vec<switchyard_edge::metrics::JsonEndpoint>,
) -> Result<(), crate::StartError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| crate::StartError::Bind {
            what: "the metrics listener",
            addr,
            source,
        })?;
    tracing::info!(addr = ?listener.local_addr().ok(), "serving /metrics");
    tokio::spawn(async move {
        if let Err(e) = switchyard_edge::metrics::serve(
            listener,
            registry,
            Some(ready),
            extra,
            std::future::pending(),
        )
        .await
        {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(())
}
