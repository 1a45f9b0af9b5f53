//! Prometheus metrics of the operator, served with the health endpoints by
//! [`switchyard_edge::metrics::serve`].
//!
//! ```text
//!   GET /metrics   switchyard_operator_* (text format)
//!   GET /healthz   200 while the process runs
//!   GET /readyz    200 once the controller runs (leader) or stands by (follower)
//!   GET /autoscaling/<namespace>/<name>   the demand signal for KEDA
//!                  (`crate::autoscale::external`), on every replica
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use switchyard_edge::metrics::Readiness;

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
    /// Frontends the autoscaler wants, per deployment.
    pub autoscaler_desired: IntGaugeVec,
    /// Expert-shard pods (copies included) the autoscaler wants, per deployment.
    pub autoscaler_desired_shards: IntGaugeVec,
    /// Demand per deployment: legitimate over the `stable` and `panic` windows, and `all`
    /// (quota or not) in the last sample.
    pub autoscaler_demand: GaugeVec,
    /// Changes of a count, by reason and mode (Shadow: recommended only).
    pub autoscaler_decisions: IntCounterVec,
    /// Frontends that did not answer a demand poll.
    pub autoscaler_poll_failures: IntCounterVec,
    ready: Readiness,
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
        let deployment = ["namespace", "deployment"];
        let autoscaler_desired = IntGaugeVec::new(
            Opts::new(
                "autoscaler_desired_frontends",
                "Frontends the autoscaler wants",
            ),
            &deployment,
        )
        .expect("static metric options are valid");
        let autoscaler_desired_shards = IntGaugeVec::new(
            Opts::new(
                "autoscaler_desired_shards",
                "Expert-shard pods (shards and copies) the autoscaler wants",
            ),
            &deployment,
        )
        .expect("static metric options are valid");
        let autoscaler_demand = GaugeVec::new(
            Opts::new(
                "autoscaler_demand",
                "Requests in the system: legitimate over the stable and panic windows, and all",
            ),
            &["namespace", "deployment", "window"],
        )
        .expect("static metric options are valid");
        let autoscaler_decisions = IntCounterVec::new(
            Opts::new(
                "autoscaler_decisions_total",
                "Changes of a count (frontends or shard pods), by reason; mode Shadow: recommended, not applied",
            ),
            &["namespace", "deployment", "reason", "mode"],
        )
        .expect("static metric options are valid");
        let autoscaler_poll_failures = IntCounterVec::new(
            Opts::new(
                "autoscaler_poll_failures_total",
                "Frontends that did not answer a demand poll",
            ),
            &deployment,
        )
        .expect("static metric options are valid");
        for collector in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(managed_objects.clone()),
            Box::new(leader.clone()),
            Box::new(autoscaler_desired.clone()),
            Box::new(autoscaler_desired_shards.clone()),
            Box::new(autoscaler_demand.clone()),
            Box::new(autoscaler_decisions.clone()),
            Box::new(autoscaler_poll_failures.clone()),
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
            autoscaler_desired,
            autoscaler_desired_shards,
            autoscaler_demand,
            autoscaler_decisions,
            autoscaler_poll_failures,
            ready: Readiness::default(),
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
    pub fn set_managed<'a>(
        &self,
        deployments: impl IntoIterator<Item = &'a crate::api::ModelDeploymentSpec>,
    ) {
        let objects: usize = deployments
            .into_iter()
            .map(crate::build::Desired::object_count)
            .sum();
        self.managed_objects.set(objects as i64);
    }

    /// Marks the process ready (`/readyz` answers 200).
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(ready);
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    extra: Vec<switchyard_edge::metrics::JsonEndpoint>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    switchyard_edge::metrics::serve(
        listener,
        metrics.registry.clone(),
        Some(metrics.ready.clone()),
        extra,
        shutdown,
    )
    .await
}

/// The metrics address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("binding --metrics-addr {addr}")]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Binds the metrics address, naming it in the error.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, BindError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}
