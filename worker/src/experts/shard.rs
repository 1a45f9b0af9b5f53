//! The expert-shard role: routed experts behind `switchyard.expert.v1.ExpertShard`.
//!
//! ```text
//!  Forward ─ validate (identity, shape, routes, held?) ─ wait for the device (one call
//!           computes at a time; the others count as queued) ─ blocking task:
//!           decode rows → LocalExperts::forward_groups → encode in the request's dtype
//!  Describe ─ identity, held experts with rows served, accepted dtypes, load
//!  watch task ─ placement file changed → load what is new, drop what is gone, swap
//! ```
//!
//! A shard keeps no per-request state: any shard holding the requested experts can serve
//! a call, and a retried call is harmless.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use candle_core::Device;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use switchyard_proto::expert::v1 as pb;
use switchyard_proto::expert::v1::expert_shard_server::ExpertShard;
use tonic::{Request, Response, Status};

use super::placement::{Assignment, PlacementSource};
use super::{describe_identity, identity, wire};
use crate::StartError;
use crate::model::checkpoint::Checkpoint;
use crate::model::layers::Precision;
use crate::model::moe::{LocalExperts, group_by_expert};
use crate::model::{ModelConfig, ModelError, config};

/// The largest encoded `ForwardRequest` a shard accepts (its gRPC decoding limit too).
pub const MAX_REQUEST_BYTES: usize = 256 << 20;

/// Everything a shard needs to start.
#[derive(Debug, Clone)]
pub struct ShardOptions {
    /// Checkpoint directory.
    pub model: PathBuf,
    /// The model id frontends use (must equal theirs).
    pub model_id: String,
    /// `auto`, `f32`, `bf16` or `f16` (must equal the frontends').
    pub dtype: String,
    /// How the experts' weight matrices are stored.
    pub quantization: crate::model::quant::Quantization,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// This shard's index in the deployment.
    pub shard_index: u32,
    /// What to hold.
    pub placement: PlacementSource,
    /// Largest encoded `ForwardRequest` accepted.
    pub max_request_bytes: usize,
    /// Fault injection for tests: sleep this long in every `Forward` before computing.
    pub forward_delay: Option<Duration>,
}

/// The `ExpertShard` service (cheap to clone).
#[derive(Debug, Clone)]
pub struct ShardService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Holding {
    assignment: Assignment,
    experts: LocalExperts,
}

struct Inner {
    identity: pb::ModelIdentity,
    cfg: ModelConfig,
    ckpt: Checkpoint,
    precision: Precision,
    device: Device,
    opts: ShardOptions,
    holding: RwLock<Arc<Holding>>,
    /// One computation at a time: the CPU kernels already use every core.
    compute: tokio::sync::Semaphore,
    in_flight: AtomicU32,
    queued: AtomicU32,
    rows_total: AtomicU64,
    expert_rows_total: AtomicU64,
    /// `layer * num_experts + expert` → rows served.
    rows_by_expert: Vec<AtomicU64>,
    busy_ns: AtomicU64,
    /// `(when, busy_ns then)`, one a second for the last 10 s.
    busy_samples: Mutex<VecDeque<(Instant, u64)>>,
    metrics: ShardMetrics,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardService")
            .field("identity", &self.identity)
            .field("shard_index", &self.opts.shard_index)
            .finish_non_exhaustive()
    }
}

/// A started shard: its service and the registry of its metrics.
#[derive(Debug)]
pub struct StartedShard {
    /// The service to serve.
    pub service: ShardService,
    /// Its Prometheus metrics.
    pub registry: Registry,
}

/// Loads the assigned experts (blocking; minutes for a large checkpoint).
pub fn start(opts: &ShardOptions) -> Result<StartedShard, StartError> {
    let device = crate::model::parse_device(&opts.device)?;
    let cfg = config::load(&opts.model)?;
    if cfg.moe.is_none() {
        return Err(StartError::invalid(format!(
            "{}: a dense model ({}) has no routed experts to serve",
            opts.model.display(),
            cfg.family
        )));
    }
    let ckpt = Checkpoint::open(&opts.model)?;
    let dtype = crate::model::parse_dtype(&opts.dtype, &device)
        .map_err(StartError::Invalid)?
        .unwrap_or_else(|| crate::model::saved_dtype(&cfg, &ckpt));
    let precision = crate::model::precision_for(dtype, &device).with_quant(opts.quantization);
    let assignment = opts
        .placement
        .resolve(&cfg)
        .map_err(StartError::Placement)?;
    let t0 = Instant::now();
    let experts = load(&cfg, &ckpt, precision, &device, &assignment, None)?;
    let identity = identity(&opts.model_id, &ckpt, precision)?;
    let num_experts = cfg.moe.as_ref().map_or(0, |m| m.num_experts);
    let metrics = ShardMetrics::new()?;
    metrics.experts_held.set(assignment.held() as i64);
    tracing::info!(
        shard = opts.shard_index,
        model = %describe_identity(Some(&identity)),
        experts = assignment.len(),
        revision = %assignment.revision,
        weight_mib = experts.weight_bytes() >> 20,
        quantization = %opts.quantization,
        held = %{
            let mut t = crate::model::quant::Tally::default();
            crate::model::moe::ExpertBackend::tally(&experts, &mut t);
            t
        },
        took_ms = t0.elapsed().as_millis() as u64,
        "routed experts loaded"
    );
    let registry = metrics.registry.clone();
    let inner = Inner {
        identity,
        rows_by_expert: (0..cfg.num_layers * num_experts)
            .map(|_| AtomicU64::new(0))
            .collect(),
        cfg,
        ckpt,
        precision,
        device,
        opts: opts.clone(),
        holding: RwLock::new(Arc::new(Holding {
            assignment,
            experts,
        })),
        compute: tokio::sync::Semaphore::new(1),
        in_flight: AtomicU32::new(0),
        queued: AtomicU32::new(0),
        rows_total: AtomicU64::new(0),
        expert_rows_total: AtomicU64::new(0),
        busy_ns: AtomicU64::new(0),
        busy_samples: Mutex::new(VecDeque::new()),
        metrics,
    };
    Ok(StartedShard {
        service: ShardService {
            inner: Arc::new(inner),
        },
        registry,
    })
}

fn load(
    cfg: &ModelConfig,
    ckpt: &Checkpoint,
    precision: Precision,
    device: &Device,
    assignment: &Assignment,
    reuse: Option<&LocalExperts>,
) -> Result<LocalExperts, ModelError> {
    let experts = LocalExperts::load_subset(
        cfg,
        ckpt,
        precision,
        device,
        &|l, e| assignment.serves(l, e),
        reuse,
    )?;
    if device.is_cpu() {
        // Runs on while the shard serves (see `model::pages`).
        drop(crate::model::pages::in_background("the shard's experts"));
    }
    Ok(experts)
}

impl ShardService {
    fn holding(&self) -> Arc<Holding> {
        self.inner
            .holding
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Starts the background work: utilisation sampling, and re-reading the placement
    /// file every `poll` when the placement comes from one.
    pub fn spawn_background(&self, poll: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                me.sample_busy();
            }
        });
        if let Some(path) = self.inner.opts.placement.watched_file() {
            let me = self.clone();
            let path = path.to_path_buf();
            tokio::spawn(async move {
                let mut last = std::fs::read(&path).ok();
                let mut tick = tokio::time::interval(poll);
                loop {
                    tick.tick().await;
                    let now = std::fs::read(&path).ok();
                    if now.is_none() || now == last {
                        continue;
                    }
                    last = now;
                    let me = me.clone();
                    match tokio::task::spawn_blocking(move || me.reload()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::error!(
                            error = %switchyard_edge::exit::error_chain(&e),
                            "placement changed but cannot be applied; keeping the experts held now"
                        ),
                        Err(e) => tracing::error!(error = %e, "placement reload panicked"),
                    }
                }
            });
        }
    }

    /// Re-reads the placement, loads what is newly assigned (reusing what is held) and
    /// swaps; `Describe` reports the new set from then on.
    fn reload(&self) -> Result<(), StartError> {
        let s = &self.inner;
        let assignment = s
            .opts
            .placement
            .resolve(&s.cfg)
            .map_err(StartError::Placement)?;
        let current = self.holding();
        if assignment == current.assignment {
            return Ok(());
        }
        let experts = load(
            &s.cfg,
            &s.ckpt,
            s.precision,
            &s.device,
            &assignment,
            Some(&current.experts),
        )?;
        tracing::info!(
            revision = %assignment.revision,
            experts = assignment.len(),
            draining = assignment.held() - assignment.len(),
            was = current.assignment.held(),
            "placement changed; now holding the new assignment"
        );
        s.metrics.experts_held.set(assignment.held() as i64);
        *s.holding
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(Holding {
            assignment,
            experts,
        });
        Ok(())
    }

    fn sample_busy(&self) {
        let mut samples = self
            .inner
            .busy_samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        samples.push_back((Instant::now(), self.inner.busy_ns.load(Ordering::Relaxed)));
        while samples.len() > 11 {
            samples.pop_front();
        }
    }

    /// Its load now: what `Describe` reports to the frontends and `GET /load` on the
    /// metrics port to the operator.
    pub fn load(&self) -> Load {
        let s = &self.inner;
        Load {
            shard_index: s.opts.shard_index,
            utilisation: self.utilisation(),
            in_flight_requests: s.in_flight.load(Ordering::Relaxed),
            queue_depth: s.queued.load(Ordering::Relaxed),
            rows_processed_total: s.rows_total.load(Ordering::Relaxed),
            expert_rows_processed_total: s.expert_rows_total.load(Ordering::Relaxed),
        }
    }

    /// [`Self::load`] with the placement revision held (`GET /load`): the operator moves
    /// experts on once every shard reports the revision it wrote.
    pub fn load_report(&self) -> LoadReport {
        LoadReport {
            load: self.load(),
            placement_revision: self.holding().assignment.revision.clone(),
        }
    }

    /// Fraction of the last ~10 s the device computed `Forward` work.
    fn utilisation(&self) -> f32 {
        let samples = self
            .inner
            .busy_samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let busy_now = self.inner.busy_ns.load(Ordering::Relaxed);
        let Some(&(t0, busy0)) = samples.front() else {
            return 0.0;
        };
        let span = t0.elapsed().as_nanos() as f64;
        if span <= 0.0 {
            return 0.0;
        }
        ((busy_now - busy0) as f64 / span).clamp(0.0, 1.0) as f32
    }

    async fn run_forward(&self, req: pb::ForwardRequest) -> Result<pb::ForwardResponse, Status> {
        let s = &self.inner;
        let model = req.model.as_ref().ok_or_else(|| {
            Status::invalid_argument("model: required (the caller's ModelIdentity)")
        })?;
        if model != &s.identity {
            return Err(Status::failed_precondition(format!(
                "model: this shard serves {} but the request is for {}",
                describe_identity(Some(&s.identity)),
                describe_identity(Some(model))
            )));
        }
        let hidden = req.hidden.as_ref().ok_or_else(|| {
            Status::invalid_argument("hidden: required, a [rows, hidden_size] tensor")
        })?;
        let (rows, width) = hidden.matrix_shape()?;
        if rows == 0 {
            return Err(Status::invalid_argument(
                "hidden: at least one row is required",
            ));
        }
        if width != s.cfg.hidden_size {
            return Err(Status::invalid_argument(format!(
                "hidden: rows of width {width}, but this model's hidden size is {}",
                s.cfg.hidden_size
            )));
        }
        let dtype = hidden.supported_dtype()?;
        if req.routes.len() != rows {
            return Err(Status::invalid_argument(format!(
                "routes: {} entries for {rows} rows of hidden; exactly one per row is required",
                req.routes.len()
            )));
        }
        let layer = req.layer as usize;
        let holding = self.holding();
        let mut pairs = Vec::with_capacity(rows * 2);
        for (row, r) in req.routes.iter().enumerate() {
            for (j, route) in r.routes.iter().enumerate() {
                if !route.weight.is_finite() {
                    return Err(Status::invalid_argument(format!(
                        "routes[{row}].routes[{j}].weight: {} is not finite",
                        route.weight
                    )));
                }
                if r.routes[..j].iter().any(|o| o.expert == route.expert) {
                    return Err(Status::invalid_argument(format!(
                        "routes[{row}].routes: expert {} is listed twice",
                        route.expert
                    )));
                }
                if !holding.assignment.serves(layer, route.expert) {
                    return Err(Status::not_found(format!(
                        "layer {layer} expert {} (routes[{row}]): not held by shard {} (placement revision {:?}, {} experts held)",
                        route.expert,
                        s.opts.shard_index,
                        holding.assignment.revision,
                        holding.assignment.held()
                    )));
                }
                pairs.push((row as u32, route.expert, route.weight));
            }
        }
        s.queued.fetch_add(1, Ordering::Relaxed);
        let permit = s.compute.acquire().await;
        s.queued.fetch_sub(1, Ordering::Relaxed);
        let _permit = permit.map_err(|_| Status::unavailable("the shard is shutting down"))?;
        if let Some(delay) = s.opts.forward_delay {
            tokio::time::sleep(delay).await;
        }
        let me = self.clone();
        let received = req.hidden.as_ref().map_or(0, hidden_bytes);
        let expert_rows = pairs.len() as u64;
        let counted: Vec<(u32, u32)> = pairs.iter().map(|p| (p.1, 1)).collect();
        let (output, took) = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let s = &me.inner;
            let Some(hidden) = req.hidden else {
                return Err(Status::internal("hidden vanished"));
            };
            let xs = wire::decode(&hidden, &s.device)
                .map_err(Status::invalid_argument)?
                .to_dtype(s.precision.acts)
                .map_err(|e| Status::internal(e.to_string()))?;
            let num_experts = s.cfg.moe.as_ref().map_or(0, |m| m.num_experts);
            let groups = group_by_expert(pairs.into_iter(), num_experts);
            let ys = holding
                .experts
                .forward_groups(layer, &xs, &groups)
                .map_err(|e| Status::internal(format!("computing layer {layer}: {e}")))?;
            let out = wire::encode(&ys, dtype).map_err(|e| Status::internal(e.to_string()))?;
            Ok((out, t.elapsed()))
        })
        .await
        .map_err(|e| Status::internal(format!("the compute task failed: {e}")))??;
        s.busy_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        s.rows_total.fetch_add(rows as u64, Ordering::Relaxed);
        s.expert_rows_total
            .fetch_add(expert_rows, Ordering::Relaxed);
        let num_experts = s.cfg.moe.as_ref().map_or(0, |m| m.num_experts);
        for (e, n) in counted {
            if let Some(c) = s.rows_by_expert.get(layer * num_experts + e as usize) {
                c.fetch_add(u64::from(n), Ordering::Relaxed);
            }
        }
        let m = &s.metrics;
        m.rows.inc_by(rows as u64);
        m.expert_rows.inc_by(expert_rows);
        m.compute.observe(took.as_secs_f64());
        m.bytes_received.inc_by(received);
        m.bytes_sent.inc_by(hidden_bytes(&output));
        Ok(pb::ForwardResponse {
            output: Some(output),
            compute_time_us: Some(took.as_micros() as u64),
        })
    }
}

fn hidden_bytes(t: &pb::Tensor) -> u64 {
    t.data.len() as u64
}

#[tonic::async_trait]
impl ExpertShard for ShardService {
    async fn forward(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        let s = &self.inner;
        s.in_flight.fetch_add(1, Ordering::Relaxed);
        let result = self.run_forward(request.into_inner()).await;
        s.in_flight.fetch_sub(1, Ordering::Relaxed);
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        s.metrics
            .requests
            .with_label_values(&[crate::telemetry::status_label(code)])
            .inc();
        result.map(Response::new)
    }

    async fn describe(
        &self,
        _: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::DescribeResponse>, Status> {
        let s = &self.inner;
        let holding = self.holding();
        let num_experts = s.cfg.moe.as_ref().map_or(0, |m| m.num_experts);
        let listed = |sets: &BTreeMap<usize, BTreeSet<u32>>| -> Vec<pb::LayerExperts> {
            sets.iter()
                .map(|(&layer, experts)| pb::LayerExperts {
                    layer: layer as u32,
                    experts: experts.iter().copied().collect(),
                    rows_processed_total: experts
                        .iter()
                        .map(|&e| {
                            s.rows_by_expert
                                .get(layer * num_experts + e as usize)
                                .map_or(0, |c| c.load(Ordering::Relaxed))
                        })
                        .collect(),
                })
                .collect()
        };
        let compute = wire::wire_dtype(s.precision.acts).unwrap_or(pb::Dtype::F32);
        let mut accepted = vec![compute as i32];
        accepted.extend(
            pb::Dtype::SUPPORTED
                .iter()
                .filter(|d| **d != compute)
                .map(|d| *d as i32),
        );
        Ok(Response::new(pb::DescribeResponse {
            model: Some(s.identity.clone()),
            shard_index: s.opts.shard_index,
            placement_revision: holding.assignment.revision.clone(),
            layers: listed(&holding.assignment.layers),
            draining: listed(&holding.assignment.draining),
            hidden_size: s.cfg.hidden_size as u32,
            accepted_dtypes: accepted,
            max_request_bytes: s.opts.max_request_bytes as u64,
            load: Some(self.load().into()),
        }))
    }
}

/// A shard's load ([`ShardService::load`]): `Describe`'s `ShardLoad`, and the JSON of
/// `GET /load` on the metrics port (camelCase), which the autoscaler can poll like the
/// frontends' `/demand`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Load {
    /// Its index in the StatefulSet (a copy's is past `shards.count`).
    pub shard_index: u32,
    /// Fraction of the last ~10 s it computed `Forward` work (one computation at a time,
    /// so 1.0 is saturated).
    pub utilisation: f32,
    /// `Forward` calls being served, and those of them waiting to compute.
    pub in_flight_requests: u32,
    pub queue_depth: u32,
    pub rows_processed_total: u64,
    pub expert_rows_processed_total: u64,
}

/// `GET /load`: the [`Load`] and the placement revision the shard holds.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    #[serde(flatten)]
    pub load: Load,
    pub placement_revision: String,
}

impl From<Load> for pb::ShardLoad {
    fn from(l: Load) -> Self {
        pb::ShardLoad {
            in_flight_requests: l.in_flight_requests,
            queue_depth: l.queue_depth,
            rows_processed_total: l.rows_processed_total,
            expert_rows_processed_total: l.expert_rows_processed_total,
            utilisation: l.utilisation,
        }
    }
}

/// A shard's Prometheus metrics (prefix `switchyard_`).
///
/// | metric | type | labels |
/// | --- | --- | --- |
/// | `switchyard_shard_forward_requests_total` | counter | `status` |
/// | `switchyard_shard_rows_total` | counter | |
/// | `switchyard_shard_expert_rows_total` | counter | |
/// | `switchyard_shard_compute_seconds` | histogram | |
/// | `switchyard_shard_experts_held` | gauge | |
/// | `switchyard_shard_bytes_received_total`, `_sent_total` | counter | |
#[derive(Debug, Clone)]
struct ShardMetrics {
    registry: Registry,
    requests: IntCounterVec,
    rows: IntCounter,
    expert_rows: IntCounter,
    compute: Histogram,
    experts_held: IntGauge,
    bytes_received: IntCounter,
    bytes_sent: IntCounter,
}

impl ShardMetrics {
    fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("switchyard".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new(
                "shard_forward_requests_total",
                "ExpertShard.Forward calls, by gRPC status code",
            ),
            &["status"],
        )?;
        let rows = IntCounter::new("shard_rows_total", "Hidden rows computed by Forward")?;
        let expert_rows = IntCounter::new(
            "shard_expert_rows_total",
            "(row, expert) applications computed by Forward",
        )?;
        let compute = Histogram::with_opts(
            HistogramOpts::new(
                "shard_compute_seconds",
                "Time one Forward computed, excluding queueing and transport",
            )
            .buckets(vec![
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0,
            ]),
        )?;
        let experts_held = IntGauge::new(
            "shard_experts_held",
            "(layer, expert) pairs this shard holds and serves",
        )?;
        let bytes_received = IntCounter::new(
            "shard_bytes_received_total",
            "Bytes of hidden rows received by Forward",
        )?;
        let bytes_sent = IntCounter::new(
            "shard_bytes_sent_total",
            "Bytes of output rows returned by Forward",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(rows.clone()))?;
        registry.register(Box::new(expert_rows.clone()))?;
        registry.register(Box::new(compute.clone()))?;
        registry.register(Box::new(experts_held.clone()))?;
        registry.register(Box::new(bytes_received.clone()))?;
        registry.register(Box::new(bytes_sent.clone()))?;
        Ok(Self {
            registry,
            requests,
            rows,
            expert_rows,
            compute,
            experts_held,
            bytes_received,
            bytes_sent,
        })
    }
}
