//! [`Admission`]: identity, quotas, the fair queue and the cap on requests in the engine,
//! put together for the frontend; every refusal is a [`Rejection`] with its status code,
//! its metadata (retry pushback, remaining quota) and the outcome it is counted as.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use switchyard_proto::worker_config::AdmissionConfig;
use tokio::sync::{Notify, oneshot};
use tonic::Status;
use tonic::metadata::{MetadataMap, MetadataValue};

use super::fair_queue::{Band, FairQueue, Pushed, QueueConfig, Ticket};
use super::gcra::{DenyReason, Limit, Quotas, Receipt, Remaining, TierLimits};
use super::keys::{KeyRing, bearer};

/// How a request ended, counted once per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A summary was sent.
    Completed,
    /// Over quota (`RESOURCE_EXHAUSTED`).
    Rejected,
    /// No or unknown API key (`UNAUTHENTICATED`).
    Unauthenticated,
    /// A field out of range (`INVALID_ARGUMENT`, `NOT_FOUND` for the model).
    Invalid,
    /// Overload: the queue was full, or the request was evicted for a higher band
    /// (`UNAVAILABLE` with pushback).
    Shed,
    /// Its deadline passed, queued or running (`DEADLINE_EXCEEDED`).
    Expired,
    /// The client went away.
    Cancelled,
    /// The server failed it (`INTERNAL`, or `UNAVAILABLE` from missing experts).
    Failed,
}

impl Outcome {
    /// Every outcome, for metrics.
    pub const ALL: [Outcome; 8] = [
        Outcome::Completed,
        Outcome::Rejected,
        Outcome::Unauthenticated,
        Outcome::Invalid,
        Outcome::Shed,
        Outcome::Expired,
        Outcome::Cancelled,
        Outcome::Failed,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Rejected => "rejected",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Invalid => "invalid",
            Outcome::Shed => "shed",
            Outcome::Expired => "expired",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "failed",
        }
    }

    /// The outcome a status from after admission means.
    pub fn of_status(status: &Status) -> Self {
        match status.code() {
            tonic::Code::Ok => Outcome::Completed,
            tonic::Code::Cancelled => Outcome::Cancelled,
            tonic::Code::DeadlineExceeded => Outcome::Expired,
            tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::OutOfRange => {
                Outcome::Invalid
            }
            tonic::Code::Unauthenticated => Outcome::Unauthenticated,
            tonic::Code::ResourceExhausted => Outcome::Rejected,
            _ => Outcome::Failed,
        }
    }
}

/// A refusal: the status to answer with (metadata included) and how it is counted.
#[derive(Debug)]
pub struct Rejection {
    /// The status, with `grpc-retry-pushback-ms`, `retry-after` and quota metadata where
    /// they apply.
    pub status: Status,
    /// How the request is counted.
    pub outcome: Outcome,
}

/// A service tier as admission applies it.
#[derive(Debug, Clone)]
pub struct Tier {
    /// Name.
    pub name: String,
    /// Highest band its requests may use (also the default).
    pub band: Band,
    /// Fair-share weight of each tenant.
    pub weight: u32,
    /// Quotas per tenant.
    pub limits: TierLimits,
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The quota and fairness key: the tenant, or `anonymous/<address>`.
    pub key: String,
    /// The tenant label for metrics (`anonymous` for every anonymous caller, so an
    /// address flood does not create series).
    pub label: String,
    /// Its tier.
    pub tier: Arc<Tier>,
}

/// Admission settings.
#[derive(Debug, Clone)]
pub struct AdmissionOptions {
    /// Keys, tiers, queue bound and default deadline (the operator's `worker.json` shape).
    pub config: AdmissionConfig,
    /// Requests in the engine at most: its throughput knee (default: the batch size).
    pub max_inflight: usize,
    /// Least time a request needs from leaving the queue to its first token: a queued
    /// request whose deadline is closer than this is expired at once.
    pub min_service: Duration,
}

impl AdmissionOptions {
    /// No keys (everyone anonymous, one tier per defaults), `max_queued` 256, 30 s.
    pub fn open(max_inflight: usize) -> Self {
        Self {
            config: AdmissionConfig {
                api_keys_dir: None,
                tiers: Vec::new(),
                default_tier: None,
                max_queued: 256,
                default_deadline_seconds: 30,
            },
            max_inflight,
            min_service: Duration::from_millis(10),
        }
    }
}

struct Waiter {
    tx: oneshot::Sender<Result<Slot, Rejection>>,
    key: String,
    label: String,
    limits: TierLimits,
    reserved: u64,
    receipt: Option<Receipt>,
    queued_at: Instant,
}

struct QueueState {
    queue: FairQueue<Waiter>,
    inflight: usize,
}

/// Admission control of one frontend (share it as `Arc<Admission>`).
pub struct Admission {
    keys: Option<KeyRing>,
    tiers: HashMap<String, Arc<Tier>>,
    default_tier: Arc<Tier>,
    quotas: Quotas<String>,
    state: Mutex<QueueState>,
    max_inflight: usize,
    default_deadline: Duration,
    min_service: Duration,
    /// Mean time a request holds its slot (EWMA, µs): the basis of overload pushback.
    mean_service_us: AtomicU64,
    wake: Arc<Notify>,
    metrics: AdmissionMetrics,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("keys", &self.keys)
            .field("tiers", &self.tiers.keys().collect::<Vec<_>>())
            .field("max_inflight", &self.max_inflight)
            .finish_non_exhaustive()
    }
}

/// A tier's `field` (per minute) as a limit whose bucket holds one minute's worth.
fn per_minute(tier: &str, field: &str, value: Option<u64>) -> anyhow::Result<Option<Limit>> {
    value
        .map(|n| {
            Limit::per_minute(n).map_err(|e| {
                anyhow::anyhow!("admission.tiers[{tier}].{field}: {e} (at least 1 per minute)")
            })
        })
        .transpose()
}

fn band_of(priority: i32) -> Option<Band> {
    match priority {
        1 => Some(Band::Low),
        2 => Some(Band::Normal),
        3 => Some(Band::High),
        4 => Some(Band::Critical),
        _ => None,
    }
}

fn with_pushback(mut status: Status, wait: Option<Duration>) -> Status {
    let md = status.metadata_mut();
    match wait {
        Some(w) => {
            let ms = w.as_millis().max(1);
            if let Ok(v) = MetadataValue::try_from(ms.to_string()) {
                md.insert("grpc-retry-pushback-ms", v);
            }
            if let Ok(v) = MetadataValue::try_from(w.as_secs_f64().ceil().max(1.0).to_string()) {
                md.insert("retry-after", v);
            }
        }
        // Negative pushback: do not retry (the gRPC retry design's convention).
        None => {
            md.insert("grpc-retry-pushback-ms", MetadataValue::from_static("-1"));
        }
    }
    status
}

/// Adds the remaining-quota metadata (`x-ratelimit-*`, as the major LLM APIs send).
pub fn quota_metadata(md: &mut MetadataMap, tier: &Tier, r: &Remaining) {
    let mut put = |name: &'static str, v: String| {
        if let Ok(v) = MetadataValue::try_from(v) {
            md.insert(name, v);
        }
    };
    if let (Some(l), Some(left)) = (tier.limits.requests, r.requests) {
        put(
            "x-ratelimit-limit-requests",
            l.rate_per_minute().to_string(),
        );
        put("x-ratelimit-remaining-requests", left.to_string());
        put(
            "x-ratelimit-reset-requests-ms",
            r.reset_requests.as_millis().to_string(),
        );
    }
    if let (Some(l), Some(left)) = (tier.limits.tokens, r.tokens) {
        put("x-ratelimit-limit-tokens", l.rate_per_minute().to_string());
        put("x-ratelimit-remaining-tokens", left.to_string());
        put(
            "x-ratelimit-reset-tokens-ms",
            r.reset_tokens.as_millis().to_string(),
        );
    }
}

impl Admission {
    /// Builds admission from `opts`, reading the API keys; metrics go into `registry`.
    pub fn new(opts: &AdmissionOptions, registry: &Registry) -> anyhow::Result<Arc<Self>> {
        let c = &opts.config;
        let mut tiers = HashMap::new();
        for t in &c.tiers {
            let band = Band::parse(&t.priority).ok_or_else(|| {
                anyhow::anyhow!(
                    "admission.tiers[{}].priority: {:?} is not one of low, normal, high, critical",
                    t.name,
                    t.priority
                )
            })?;
            anyhow::ensure!(
                tiers
                    .insert(
                        t.name.clone(),
                        Arc::new(Tier {
                            name: t.name.clone(),
                            band,
                            weight: t.weight.max(1),
                            limits: TierLimits {
                                requests: per_minute(
                                    &t.name,
                                    "requestsPerMinute",
                                    t.requests_per_minute
                                )?,
                                tokens: per_minute(
                                    &t.name,
                                    "tokensPerMinute",
                                    t.tokens_per_minute
                                )?,
                            },
                        }),
                    )
                    .is_none(),
                "admission.tiers: {:?} is listed twice",
                t.name
            );
        }
        let default_tier = match &c.default_tier {
            Some(name) => tiers.get(name).cloned().ok_or_else(|| {
                anyhow::anyhow!("admission.defaultTier: {name:?} is not one of admission.tiers")
            })?,
            None => Arc::new(Tier {
                name: "default".into(),
                band: Band::Normal,
                weight: 1,
                limits: TierLimits::default(),
            }),
        };
        let keys = match &c.api_keys_dir {
            Some(dir) => {
                let names: Vec<String> = tiers.keys().cloned().collect();
                let ring =
                    KeyRing::load(std::path::Path::new(dir), &names, c.default_tier.as_deref())?;
                tracing::info!(keys = ring.len(), dir = %dir, "API keys loaded");
                Some(ring)
            }
            None => None,
        };
        let metrics = AdmissionMetrics::new(registry)?;
        Ok(Arc::new(Self {
            keys,
            tiers,
            default_tier,
            quotas: Quotas::new(),
            state: Mutex::new(QueueState {
                queue: FairQueue::new(QueueConfig {
                    max_queued: c.max_queued.max(1) as usize,
                    ..QueueConfig::default()
                }),
                inflight: 0,
            }),
            max_inflight: opts.max_inflight.max(1),
            default_deadline: Duration::from_secs(u64::from(c.default_deadline_seconds.max(1))),
            min_service: opts.min_service,
            mean_service_us: AtomicU64::new(0),
            wake: Arc::new(Notify::new()),
            metrics,
        }))
    }

    /// Starts the housekeeping task: expiring queued requests that can no longer start in
    /// time, and forgetting idle tenants' quota and fairness state.
    pub fn spawn_housekeeping(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last_gc = Instant::now();
            loop {
                let Some(me) = weak.upgrade() else { return };
                let next = me.lock().queue.next_deadline();
                let now = Instant::now();
                let wait = next
                    .map(|d| d.saturating_duration_since(now + me.min_service))
                    .unwrap_or(Duration::from_secs(1))
                    .min(Duration::from_secs(1));
                let wake = me.wake.clone();
                drop(me);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = wake.notified() => {}
                }
                let Some(me) = weak.upgrade() else { return };
                me.expire(Instant::now());
                if last_gc.elapsed() >= Duration::from_secs(1) {
                    last_gc = Instant::now();
                    me.quotas.evict_idle(last_gc);
                    me.lock().queue.forget_idle();
                }
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn expire(&self, now: Instant) {
        let mut st = self.lock();
        for (_, t) in st.queue.expire(now, self.min_service) {
            let w = t.item;
            self.give_back(&w.key, &w.limits, w.receipt, w.reserved, now);
            let status = Status::deadline_exceeded(format!(
                "the request could not start before its deadline: it waited {} ms in the queue \
                 behind {} others",
                w.queued_at.elapsed().as_millis(),
                st.queue.len()
            ));
            let _ = w.tx.send(Err(Rejection {
                status,
                outcome: Outcome::Expired,
            }));
        }
        self.metrics.set_queue(&st.queue.len_by_band(), st.inflight);
    }

    /// Who is calling: the API key's tenant and tier, or — when no keys are configured —
    /// an anonymous caller keyed by its address, in the default tier.
    pub fn identify(
        &self,
        metadata: &MetadataMap,
        peer: Option<SocketAddr>,
    ) -> Result<Caller, Rejection> {
        let Some(keys) = &self.keys else {
            let ip = peer.map_or_else(|| "unknown".to_string(), |p| p.ip().to_string());
            return Ok(Caller {
                key: format!("anonymous/{ip}"),
                label: "anonymous".into(),
                tier: self.default_tier.clone(),
            });
        };
        let unauthenticated = |message: &str| {
            let mut status = Status::unauthenticated(message.to_string());
            status
                .metadata_mut()
                .insert("www-authenticate", MetadataValue::from_static("Bearer"));
            Rejection {
                status,
                outcome: Outcome::Unauthenticated,
            }
        };
        let Some(key) = bearer(metadata) else {
            return Err(unauthenticated(
                "authorization: an API key is required, as `authorization: Bearer <key>` metadata",
            ));
        };
        let owner = keys
            .lookup(key)
            .ok_or_else(|| unauthenticated("authorization: the API key is not valid"))?;
        let tier = self
            .tiers
            .get(&owner.tier)
            .cloned()
            .unwrap_or_else(|| self.default_tier.clone());
        Ok(Caller {
            key: owner.tenant.clone(),
            label: owner.tenant.clone(),
            tier,
        })
    }

    /// Refuses a caller whose request quota is spent, before anything else is done for
    /// the request (even its validation), so a flooding caller costs almost nothing.
    /// Charges nothing: [`Admission::charge`] charges the request and its tokens together
    /// once the request is valid.
    pub fn precheck_request(&self, caller: &Caller) -> Result<(), Rejection> {
        if self.remaining(caller).requests != Some(0) {
            return Ok(());
        }
        // Spent: the same check as `charge` with no tokens gives the exact wait (and
        // charges nothing when it refuses). Should a cell have freed up meanwhile, it
        // passes and charges one request; the request then goes on.
        self.charge_limits(caller, &caller.tier.limits, 0)
            .map(|_| ())
    }

    /// Charges one request and `tokens` (prompt + `max_tokens`) together, both or
    /// neither; returns the quota left and the receipt [`Admission::enter`] needs to
    /// refund the unused part when the request ends (or all of it if it never runs).
    pub fn charge(&self, caller: &Caller, tokens: u64) -> Result<(Remaining, Receipt), Rejection> {
        let receipt = self.charge_limits(caller, &caller.tier.limits, tokens)?;
        Ok((self.remaining(caller), receipt))
    }

    /// Gives back `unused` tokens of a charge (nothing without a receipt).
    fn give_back(
        &self,
        key: &String,
        limits: &TierLimits,
        receipt: Option<Receipt>,
        unused: u64,
        now: Instant,
    ) {
        if let Some(receipt) = receipt {
            self.quotas.refund(key, limits, receipt, unused, now);
        }
    }

    fn charge_limits(
        &self,
        caller: &Caller,
        limits: &TierLimits,
        tokens: u64,
    ) -> Result<Receipt, Rejection> {
        match self
            .quotas
            .check(&caller.key, limits, tokens, Instant::now())
        {
            Ok(grant) => Ok(grant.receipt),
            Err(d) => {
                let limits = &caller.tier.limits;
                let (message, wait) = match d.reason {
                    DenyReason::TooLarge => (
                        format!(
                            "the request needs {tokens} tokens (prompt + max_tokens) but tier {:?} \
                             allows at most {} at once; lower max_tokens",
                            caller.tier.name,
                            limits.tokens.map_or(0, |l| l.burst())
                        ),
                        None,
                    ),
                    DenyReason::Requests => (
                        format!(
                            "request quota of tier {:?} exhausted ({} per minute); retry in {} ms",
                            caller.tier.name,
                            limits.requests.map_or(0, |l| l.rate_per_minute()),
                            d.retry_after.as_millis().max(1)
                        ),
                        Some(d.retry_after),
                    ),
                    DenyReason::Tokens => (
                        format!(
                            "token quota of tier {:?} exhausted ({} per minute); retry in {} ms",
                            caller.tier.name,
                            limits.tokens.map_or(0, |l| l.rate_per_minute()),
                            d.retry_after.as_millis().max(1)
                        ),
                        Some(d.retry_after),
                    ),
                };
                let mut status = with_pushback(Status::resource_exhausted(message), wait);
                quota_metadata(status.metadata_mut(), &caller.tier, &self.remaining(caller));
                Err(Rejection {
                    status,
                    outcome: Outcome::Rejected,
                })
            }
        }
    }

    /// The pushback for an overload refusal: how long the queue ahead takes to drain at
    /// the recent service rate (at least 100 ms).
    fn overload_pushback(&self, queued: usize) -> Duration {
        let mean = Duration::from_micros(self.mean_service_us.load(Ordering::Relaxed));
        let drain = mean.mul_f64(queued as f64 / self.max_inflight as f64);
        drain.max(Duration::from_millis(100))
    }

    /// Enters the caller's request: a [`Slot`] at once when there is room and nobody
    /// waits, else a place in the fair queue ([`Turn::Queued`], awaited with
    /// [`QueuedTurn::wait`]), else a refusal (queue full of equal or higher priority work,
    /// or a deadline too close). Never waits itself, so a refusal is immediate. `reserved`
    /// is what [`Admission::charge`] charged (with its `receipt`), refunded if the
    /// request never runs.
    pub fn enter(
        self: &Arc<Self>,
        caller: &Caller,
        priority: i32,
        input_tokens: u64,
        reserved: u64,
        receipt: Receipt,
        deadline: Option<Instant>,
    ) -> Result<Turn, Rejection> {
        let now = Instant::now();
        let band = band_of(priority).map_or(caller.tier.band, |b| b.min(caller.tier.band));
        let deadline = deadline.unwrap_or(now + self.default_deadline);
        let refund = |receipt| {
            self.give_back(
                &caller.key,
                &caller.tier.limits,
                Some(receipt),
                reserved,
                Instant::now(),
            );
        };
        if deadline <= now + self.min_service {
            refund(receipt);
            return Err(Rejection {
                status: Status::deadline_exceeded(
                    "the deadline is too close for the request to start",
                ),
                outcome: Outcome::Expired,
            });
        }
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock();
        if st.inflight < self.max_inflight && st.queue.is_empty() {
            st.inflight += 1;
            self.metrics.set_queue(&st.queue.len_by_band(), st.inflight);
            return Ok(Turn::Now(self.slot(
                caller,
                band,
                input_tokens,
                reserved,
                receipt,
                now,
            )));
        }
        let pushed = st.queue.push(Ticket {
            tenant: caller.key.clone(),
            band,
            weight: caller.tier.weight,
            input_tokens,
            deadline,
            item: Waiter {
                tx,
                key: caller.key.clone(),
                label: caller.label.clone(),
                limits: caller.tier.limits,
                reserved,
                receipt: Some(receipt),
                queued_at: now,
            },
        });
        let queued = st.queue.len();
        let id = match pushed {
            Pushed::Queued(id) => id,
            Pushed::QueuedEvicting(id, shed) => {
                let w = shed.item;
                self.give_back(&w.key, &w.limits, w.receipt, w.reserved, now);
                let status = with_pushback(
                    Status::unavailable(format!(
                        "overloaded: the request was shed for {} priority work; retry later",
                        band.name()
                    )),
                    Some(self.overload_pushback(queued)),
                );
                let _ = w.tx.send(Err(Rejection {
                    status,
                    outcome: Outcome::Shed,
                }));
                id
            }
            Pushed::Full(t) => {
                drop(st);
                if let Some(receipt) = t.item.receipt {
                    refund(receipt);
                }
                return Err(Rejection {
                    status: with_pushback(
                        Status::unavailable(format!(
                            "overloaded: {queued} requests are queued at {} priority or above; \
                             retry later",
                            band.name()
                        )),
                        Some(self.overload_pushback(queued)),
                    ),
                    outcome: Outcome::Shed,
                });
            }
        };
        self.metrics.set_queue(&st.queue.len_by_band(), st.inflight);
        drop(st);
        self.wake.notify_one();
        Ok(Turn::Queued(QueuedTurn {
            rx,
            guard: CancelOnDrop {
                admission: self.clone(),
                id: Some(id),
            },
            band,
            queued_at: now,
        }))
    }

    fn slot(
        self: &Arc<Self>,
        caller: &Caller,
        band: Band,
        input_tokens: u64,
        reserved: u64,
        receipt: Receipt,
        now: Instant,
    ) -> Slot {
        Slot {
            receipt: Some(receipt),
            admission: self.clone(),
            key: caller.key.clone(),
            label: caller.label.clone(),
            input: input_tokens,
            band,
            weight: caller.tier.weight,
            limits: caller.tier.limits,
            reserved,
            used: AtomicU64::new(input_tokens),
            started: now,
            armed: true,
        }
    }

    /// Hands free slots to the next queued requests (caller holds the lock).
    fn dispatch(self: &Arc<Self>, st: &mut QueueState) {
        while st.inflight < self.max_inflight {
            let Some((_, t)) = st.queue.pop() else { break };
            let w = t.item;
            let slot = Slot {
                admission: self.clone(),
                key: w.key.clone(),
                label: w.label.clone(),
                input: t.input_tokens,
                band: t.band,
                weight: t.weight,
                limits: w.limits,
                reserved: w.reserved,
                receipt: w.receipt,
                used: AtomicU64::new(t.input_tokens),
                started: Instant::now(),
                armed: true,
            };
            st.inflight += 1;
            if let Err(Ok(mut slot)) = w.tx.send(Ok(slot)) {
                // The waiter is gone: nobody will use the slot.
                slot.armed = false;
                st.inflight -= 1;
                let receipt = slot.receipt.take();
                self.give_back(&w.key, &w.limits, receipt, w.reserved, Instant::now());
            }
        }
        self.metrics.set_queue(&st.queue.len_by_band(), st.inflight);
    }

    /// Counts a request's end: its outcome by tenant and tier.
    pub fn record(&self, caller: Option<&Caller>, outcome: Outcome) {
        let (label, tier) = caller.map_or(("unknown", "unknown"), |c| {
            (c.label.as_str(), c.tier.name.as_str())
        });
        self.metrics
            .requests
            .with_label_values(&[label, tier, outcome.label()])
            .inc();
    }

    /// Counts a request accepted past identity, validation and quota.
    pub fn record_accepted(&self, caller: &Caller) {
        self.metrics
            .accepted
            .with_label_values(&[&caller.label, &caller.tier.name])
            .inc();
    }

    /// The remaining quota of `caller` now (for metadata at the end of a stream).
    pub fn remaining(&self, caller: &Caller) -> Remaining {
        self.quotas
            .remaining(&caller.key, &caller.tier.limits, Instant::now())
    }
}

/// What [`Admission::enter`] gives a request that may run.
#[derive(Debug)]
pub enum Turn {
    /// Run now.
    Now(Slot),
    /// Queued: wait for the slot.
    Queued(QueuedTurn),
}

/// A queued request's claim on a future slot; dropping it (the client went away) takes
/// the request out of the queue.
pub struct QueuedTurn {
    rx: oneshot::Receiver<Result<Slot, Rejection>>,
    guard: CancelOnDrop,
    band: Band,
    queued_at: Instant,
}

impl std::fmt::Debug for QueuedTurn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuedTurn")
            .field("band", &self.band)
            .finish_non_exhaustive()
    }
}

impl QueuedTurn {
    /// Waits until the request may run, or is shed or expired.
    pub async fn wait(mut self) -> Result<Slot, Rejection> {
        let result = (&mut self.rx).await;
        self.guard.id = None;
        match result {
            Ok(Ok(slot)) => {
                self.guard
                    .admission
                    .metrics
                    .queue_wait
                    .with_label_values(&[self.band.name()])
                    .observe(self.queued_at.elapsed().as_secs_f64());
                Ok(slot)
            }
            Ok(Err(rejection)) => Err(rejection),
            Err(_) => Err(Rejection {
                status: Status::internal("the admission queue dropped the request"),
                outcome: Outcome::Failed,
            }),
        }
    }
}

impl Turn {
    /// The slot, now or once queued requests ahead have run.
    pub async fn slot(self) -> Result<Slot, Rejection> {
        match self {
            Turn::Now(slot) => Ok(slot),
            Turn::Queued(q) => q.wait().await,
        }
    }
}

struct CancelOnDrop {
    admission: Arc<Admission>,
    id: Option<u64>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let mut st = self.admission.lock();
            if let Some(t) = st.queue.cancel(id) {
                let w = t.item;
                self.admission
                    .give_back(&w.key, &w.limits, w.receipt, w.reserved, Instant::now());
            }
            self.admission
                .metrics
                .set_queue(&st.queue.len_by_band(), st.inflight);
        }
    }
}

/// A request's place in the engine: generated tokens are charged to its tenant's fair
/// share as they come ([`Slot::generated`]); dropping it frees the place for the next
/// queued request and refunds the unused part of the token pre-charge.
pub struct Slot {
    admission: Arc<Admission>,
    key: String,
    /// The tenant label for usage metrics.
    label: String,
    /// Prompt tokens.
    input: u64,
    band: Band,
    weight: u32,
    limits: TierLimits,
    /// Tokens pre-charged (prompt + max_tokens).
    reserved: u64,
    /// The pre-charge's receipt, for the refund of what was not used.
    receipt: Option<Receipt>,
    /// Tokens used so far (prompt + generated).
    used: AtomicU64,
    started: Instant,
    armed: bool,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("band", &self.band)
            .field("reserved", &self.reserved)
            .finish_non_exhaustive()
    }
}

impl Slot {
    /// `n` more generated tokens: charged to the tenant's virtual counter, and not
    /// refunded from the pre-charge.
    pub fn generated(&self, n: u64) {
        self.used.fetch_add(n, Ordering::Relaxed);
        self.admission
            .lock()
            .queue
            .charge_output(&self.key, self.band, self.weight, n);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let a = self.admission.clone();
        let now = Instant::now();
        let used = self.used.load(Ordering::Relaxed);
        // Usage as it happened, also for requests cancelled part-way.
        let t = &a.metrics.tokens;
        t.with_label_values(&[&self.label, "prompt"])
            .inc_by(self.input);
        t.with_label_values(&[&self.label, "cached_prompt"])
            .inc_by(0);
        t.with_label_values(&[&self.label, "completion"])
            .inc_by(used.saturating_sub(self.input));
        let unused = self.reserved.saturating_sub(used);
        let receipt = self.receipt.take();
        a.give_back(&self.key, &self.limits, receipt, unused, now);
        let us = self.started.elapsed().as_micros() as u64;
        let old = a.mean_service_us.load(Ordering::Relaxed);
        let mean = if old == 0 { us } else { (old * 7 + us) / 8 };
        a.mean_service_us.store(mean, Ordering::Relaxed);
        let mut st = a.lock();
        st.inflight = st.inflight.saturating_sub(1);
        a.dispatch(&mut st);
    }
}

/// Counts one request's outcome exactly once: the outcome set, or `cancelled` if the
/// request's future is dropped first (the client went away: the server drops the call).
pub struct OutcomeRecorder {
    admission: Arc<Admission>,
    caller: Caller,
    outcome: Option<Outcome>,
}

impl std::fmt::Debug for OutcomeRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutcomeRecorder")
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

impl OutcomeRecorder {
    /// Will count `caller`'s request when dropped.
    pub fn new(admission: Arc<Admission>, caller: Caller) -> Self {
        Self {
            admission,
            caller,
            outcome: None,
        }
    }

    /// How the request ended.
    pub fn set(&mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
    }
}

impl Drop for OutcomeRecorder {
    fn drop(&mut self) {
        self.admission.record(
            Some(&self.caller),
            self.outcome.unwrap_or(Outcome::Cancelled),
        );
    }
}

/// Admission metrics (prefix `switchyard_`).
///
/// | metric | type | labels |
/// | --- | --- | --- |
/// | `switchyard_admission_requests_total` | counter | `tenant`, `tier`, `outcome` |
/// | `switchyard_admission_accepted_total` | counter | `tenant`, `tier` |
/// | `switchyard_tenant_tokens_total` | counter | `tenant`, `kind`: prompt, cached_prompt, completion |
/// | `switchyard_admission_queued` | gauge | `band` |
/// | `switchyard_admission_inflight` | gauge | |
/// | `switchyard_admission_queue_wait_seconds` | histogram | `band` |
#[derive(Debug, Clone)]
struct AdmissionMetrics {
    requests: IntCounterVec,
    accepted: IntCounterVec,
    tokens: IntCounterVec,
    queued: IntGaugeVec,
    inflight: prometheus::IntGauge,
    queue_wait: HistogramVec,
}

impl AdmissionMetrics {
    fn new(registry: &Registry) -> anyhow::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "admission_requests_total",
                "Generate requests by tenant, tier and how they ended (each counted once)",
            ),
            &["tenant", "tier", "outcome"],
        )?;
        let accepted = IntCounterVec::new(
            Opts::new(
                "admission_accepted_total",
                "Requests accepted past identity, validation and quota; each then ends \
                 completed, shed, expired, cancelled or failed",
            ),
            &["tenant", "tier"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new("tenant_tokens_total", "Tokens used, by tenant and kind"),
            &["tenant", "kind"],
        )?;
        let queued = IntGaugeVec::new(
            Opts::new(
                "admission_queued",
                "Requests waiting in the fair queue, by band",
            ),
            &["band"],
        )?;
        let inflight = prometheus::IntGauge::new(
            "admission_inflight",
            "Requests admitted to the engine (at most the configured cap)",
        )?;
        let queue_wait = HistogramVec::new(
            HistogramOpts::new(
                "admission_queue_wait_seconds",
                "Time requests waited in the fair queue before running",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["band"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(accepted.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(queued.clone()))?;
        registry.register(Box::new(inflight.clone()))?;
        registry.register(Box::new(queue_wait.clone()))?;
        for b in Band::ALL {
            queued.with_label_values(&[b.name()]).set(0);
        }
        Ok(Self {
            requests,
            accepted,
            tokens,
            queued,
            inflight,
            queue_wait,
        })
    }

    fn set_queue(&self, by_band: &[usize; 4], inflight: usize) {
        for b in Band::ALL {
            self.queued
                .with_label_values(&[b.name()])
                .set(by_band[b as usize] as i64);
        }
        self.inflight.set(inflight as i64);
    }
}
