//! Admission control on frontends: who may call, how much, and in what order — before a
//! request reaches the engine. The whole policy lives here; a protocol (the gRPC
//! `Inference` service today, an OpenAI-style HTTP API later) only plugs into it.
//!
//! The complete order is written once, in code, in [`pipeline`]:
//!
//! ```text
//!  connection ─ per peer ─────── open connections and new connections/s per client
//!  (connections)                 address; over ─> closed on accept, before any HTTP/2 work
//!  ── tower layers, before the body is read ([`pipeline::layers`]) ─────────────────────────
//!  call ─ count outcome ──────── opens the call's record; counts its final status and, for
//!       │ (outcome)              generation, the tenant's outcome, exactly once
//!       ─ identify ──────────── API key → (tenant, tier), or anonymous per client address;
//!       │ (identity)             the caller goes into the request's extensions
//!       │                        none / unknown ─> UNAUTHENTICATED
//!       ─ request quota ─────── generation only: a tenant whose request quota is spent is
//!       │ (pipeline)             refused before its body is even decoded
//!       │                        ─> RESOURCE_EXHAUSTED + grpc-retry-pushback-ms, retry-after
//!  ── the protocol decodes and validates the body ─> INVALID_ARGUMENT ──────────────────────
//!  admit(call, cost, priority, deadline) -> Reservation ([`pipeline`]):
//!       ─ charge ────────────── 1 request + prompt + max_tokens tokens, both or neither:
//!       │ (accounting, scope)    here, this frontend's share, or in Redis (quotaScope)
//!       │                        over ─> RESOURCE_EXHAUSTED (+ pushback)
//!       ─ fair queue ────────── strict bands by tier/priority; within a band the tenant with
//!       │ (queue, fair_queue)    the least virtual tokens served; deadline-aware; bounded
//!       │                        full ─> UNAVAILABLE + pushback (lowest band shed first)
//!       │                        can no longer start in time ─> DEADLINE_EXCEEDED
//!       ─ slot ──────────────── at most `max_inflight` requests in the engine (its knee)
//!  end ─ the reservation, or its slot, refunds the unused tokens when dropped (whatever the
//!        path), charges generated tokens to the tenant's counter; the outcome layer counts
//!        completed | rejected | unauthenticated | invalid | shed | expired | cancelled | failed
//! ```
//!
//! - [`pipeline`]: the order above, the policy of each RPC, and `admit`.
//! - [`outcome`]: how a call ended ([`Outcome`]), its record ([`Call`]), the counting layer.
//! - [`identity`]: who is calling ([`Caller`]) and the identify layer.
//! - [`accounting`]: quota charges ([`Charge`], refunded on drop) and usage.
//! - [`queue`]: the queue and the engine slots put together ([`Reservation`], [`Slot`]).
//! - [`connections`]: HTTP/2 and per-peer connection limits ([`TransportLimits`]).
//! - [`tiers`]: service tiers from the configuration.
//! - [`status`]: how refusals are encoded (status codes, pushback, quota metadata).
//! - [`metrics`]: the `switchyard_admission_*` and `switchyard_tenant_*` metrics.
//! - [`keys`]: API keys (constant-time lookup, never logged).
//! - [`demand`]: the per-tenant demand report the autoscaler polls (`/demand`).
//! - [`gcra`]: per-tenant quotas (GCRA with exact refunds).
//! - [`scope`]: how quotas hold across frontends (split over the live frontends, or in
//!   Redis: [`global`] over the small client [`redis`]).
//! - [`fair_queue`]: the bounded fair queue.

pub mod accounting;
pub mod connections;
pub mod demand;
pub mod fair_queue;
pub mod gcra;
pub mod global;
pub mod identity;
pub mod keys;
pub mod metrics;
pub mod outcome;
pub mod pipeline;
pub mod queue;
pub mod redis;
pub mod scope;
pub mod share;
pub mod status;
pub mod tiers;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::Registry;
use switchyard_proto::worker_config::AdmissionConfig;
use tokio::sync::Notify;

pub use accounting::{Charge, Kept, QuotaView};
pub use connections::TransportLimits;
pub use identity::Caller;
pub use outcome::{Call, Outcome, Rejection, StatusCounter};
pub use pipeline::{Cost, Policy};
pub use queue::{Reservation, Slot};
pub use tiers::Tier;

use fair_queue::{FairQueue, QueueConfig};
use gcra::Quotas;
use keys::LiveKeys;
use metrics::AdmissionMetrics;
use queue::QueueState;
use scope::QuotaScope;
use share::Shares;
use tiers::Tiers;

/// Why admission cannot be configured.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    /// A tier is out of range; the message names the field and what is accepted.
    #[error("{0}")]
    Tier(String),
    /// `quotaScope` is out of range; the message names the field.
    #[error("{0}")]
    Scope(String),
    /// The API key files are unusable.
    #[error("admission.apiKeysDir: {0}")]
    Keys(#[from] keys::KeyError),
    /// `apiKeysDir` is set but empty.
    #[error(
        "admission.apiKeysDir: empty; give the directory the API-key Secret is mounted at, \
         or leave the field out to admit every caller without a key"
    )]
    EmptyKeysDir,
    /// A metric could not be registered (a bug: a name registered twice).
    #[error("registering the admission metrics")]
    Metrics(#[from] prometheus::Error),
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
    /// Longest a Redis call may take before the request is decided locally
    /// (`quotaScope.mode: redis`).
    pub redis_timeout: Duration,
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
                quota_scope: None,
            },
            max_inflight,
            min_service: Duration::from_millis(10),
            redis_timeout: scope::DEFAULT_REDIS_TIMEOUT,
        }
    }
}

/// How often a frontend re-reads its API-key files. With the kubelet's refresh of a
/// mounted Secret (up to about a minute by default), a rotated key works, and a removed
/// one stops working, within that plus this.
pub const KEY_RELOAD: Duration = Duration::from_secs(5);

/// Admission control of one frontend (share it as `Arc<Admission>`). Its parts are in the
/// submodules; [`pipeline`] puts them in order.
pub struct Admission {
    keys: Option<LiveKeys>,
    tiers: Tiers,
    quotas: Arc<Quotas<String>>,
    /// How quotas hold across frontends; `None`: each frontend enforces them in full.
    scope: Option<Arc<QuotaScope>>,
    state: Mutex<QueueState>,
    max_inflight: usize,
    default_deadline: Duration,
    min_service: Duration,
    /// Mean time a request holds its slot (EWMA, µs): the basis of overload pushback.
    mean_service_us: AtomicU64,
    /// Mean time in the engine per generated token (EWMA, µs, prefill included), and its
    /// mean deviation: how long a request will run, for deadlines.
    us_per_token: AtomicU64,
    us_per_token_dev: AtomicU64,
    wake: Arc<Notify>,
    metrics: AdmissionMetrics,
    /// Per tenant, what the last seconds held (the demand report's rates).
    recent: Mutex<demand::Recent>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("keys", &self.keys)
            .field("tiers", &self.tiers)
            .field("max_inflight", &self.max_inflight)
            .field("quota_scope", &self.scope.as_ref().map(|s| s.describe()))
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// Builds admission from `opts`, reading the API keys; metrics go into `registry`.
    pub fn new(opts: &AdmissionOptions, registry: &Registry) -> Result<Arc<Self>, AdmissionError> {
        let c = &opts.config;
        let tiers = Tiers::from_config(c)?;
        let keys = match &c.api_keys_dir {
            Some(dir) if dir.trim().is_empty() => return Err(AdmissionError::EmptyKeysDir),
            Some(dir) => {
                let keys = LiveKeys::load(
                    std::path::Path::new(dir),
                    tiers.names(),
                    c.default_tier.clone(),
                )?;
                tracing::info!(keys = keys.ring().len(), dir = %dir, "API keys loaded; re-read every {KEY_RELOAD:?}");
                Some(keys)
            }
            None => None,
        };
        let metrics = AdmissionMetrics::new(registry)?;
        let scope = match &c.quota_scope {
            Some(config) => Some(Arc::new(QuotaScope::new(
                config,
                QuotaScope::own_ip_from_env(),
                opts.redis_timeout,
                metrics.quota_frontends.clone(),
                metrics.quota_fallbacks.clone(),
            )?)),
            None => None,
        };
        Ok(Arc::new(Self {
            keys,
            tiers,
            quotas: Arc::new(Quotas::new()),
            scope,
            state: Mutex::new(QueueState {
                queue: FairQueue::new(QueueConfig {
                    max_queued: c.max_queued.max(1) as usize,
                    ..QueueConfig::default()
                }),
                shares: Shares::default(),
            }),
            max_inflight: opts.max_inflight.max(1),
            default_deadline: Duration::from_secs(u64::from(c.default_deadline_seconds.max(1))),
            min_service: opts.min_service,
            mean_service_us: AtomicU64::new(0),
            us_per_token: AtomicU64::new(0),
            us_per_token_dev: AtomicU64::new(0),
            wake: Arc::new(Notify::new()),
            metrics,
            recent: Mutex::default(),
        }))
    }

    /// Starts the housekeeping task: expiring queued requests that can no longer start in
    /// time, forgetting idle tenants' quota and fairness state, and re-reading the API keys
    /// every [`KEY_RELOAD`]; with a quota scope, also the task that counts the frontends
    /// ([`scope::PEER_REFRESH`]).
    pub fn spawn_housekeeping(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        if let Some(scope) = &self.scope {
            scope.spawn_peer_count(weak.clone());
        }
        tokio::spawn(async move {
            let mut last_gc = Instant::now();
            let mut last_keys = Instant::now();
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
                if last_keys.elapsed() >= KEY_RELOAD {
                    last_keys = Instant::now();
                    me.reload_keys();
                }
                if last_gc.elapsed() >= Duration::from_secs(1) {
                    last_gc = Instant::now();
                    me.quotas.evict_idle(last_gc);
                    if let Some(scope) = &me.scope {
                        scope.forget_spent(last_gc);
                    }
                    let mut st = me.lock();
                    st.queue.forget_idle();
                    let QueueState { queue, shares } = &mut *st;
                    shares.forget_idle(queue, last_gc);
                    // A tenant that went quiet gives its share back to the others.
                    me.dispatch(&mut st);
                }
            }
        });
    }

    /// Re-reads the API-key files; a change takes effect at once (see [`LiveKeys`]).
    fn reload_keys(&self) {
        let Some(keys) = &self.keys else { return };
        match keys.reload() {
            keys::Reload::Unchanged => {}
            keys::Reload::Reloaded(count) => {
                self.metrics.key_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(keys = count, "API keys changed: reloaded");
            }
            keys::Reload::Refused(why) => {
                self.metrics.key_reloads.with_label_values(&["error"]).inc();
                tracing::error!(error = %why, "API keys changed but cannot be used; keeping the previous keys");
            }
        }
    }

    /// The quota scope, if the configuration sets one.
    pub fn quota_scope(&self) -> Option<&Arc<QuotaScope>> {
        self.scope.as_ref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
