//! Admission metrics (prefix `switchyard_`).
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `switchyard_admission_requests_total` | counter | `tenant`, `tier`, `outcome` |
//! | `switchyard_admission_accepted_total` | counter | `tenant`, `tier` |
//! | `switchyard_admission_deadline_misses_total` | counter | |
//! | `switchyard_tenant_tokens_total` | counter | `tenant`, `kind`: prompt (computed), cached_prompt, completion |
//! | `switchyard_admission_queued` | gauge | `band` |
//! | `switchyard_admission_inflight` | gauge | |
//! | `switchyard_admission_queue_wait_seconds` | histogram | `band` |
//! | `switchyard_admission_quota_frontends` | gauge | |
//! | `switchyard_admission_quota_fallbacks_total` | counter | |

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::Admission;
use super::fair_queue::Band;
use super::identity::Caller;
use super::outcome::Outcome;

#[derive(Debug, Clone)]
pub(super) struct AdmissionMetrics {
    requests: IntCounterVec,
    accepted: IntCounterVec,
    deadline_misses: prometheus::IntCounter,
    pub(super) tokens: IntCounterVec,
    queued: IntGaugeVec,
    inflight: prometheus::IntGauge,
    pub(super) queue_wait: HistogramVec,
    pub(super) key_reloads: IntCounterVec,
    /// The frontends a tenant's quota is split over (1 without `quotaScope`).
    pub(super) quota_frontends: prometheus::IntGauge,
    /// Requests decided by this frontend's split share because Redis did not answer.
    pub(super) quota_fallbacks: prometheus::IntCounter,
}

impl AdmissionMetrics {
    pub(super) fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
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
        let deadline_misses = prometheus::IntCounter::new(
            "admission_deadline_misses_total",
            "Requests that started but did not finish by their deadline (counted expired): \
             the run estimate that admitted them was too optimistic",
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
        let key_reloads = IntCounterVec::new(
            Opts::new(
                "admission_key_reloads_total",
                "Changes to the API-key files seen while running: ok (in use) or error \
                 (refused; the previous keys stay)",
            ),
            &["result"],
        )?;
        let quota_frontends = prometheus::IntGauge::new(
            "admission_quota_frontends",
            "Frontends each tenant's quota is shared by, as this frontend last counted them \
             (admission.quotaScope.peers); 1 without a quota scope",
        )?;
        let quota_fallbacks = prometheus::IntCounter::new(
            "admission_quota_fallbacks_total",
            "Requests whose quota was decided by this frontend's split share because Redis \
             did not answer in time (quotaScope.mode redis)",
        )?;
        quota_frontends.set(1);
        registry.register(Box::new(quota_frontends.clone()))?;
        registry.register(Box::new(quota_fallbacks.clone()))?;
        registry.register(Box::new(key_reloads.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(accepted.clone()))?;
        registry.register(Box::new(deadline_misses.clone()))?;
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
            deadline_misses,
            tokens,
            queued,
            inflight,
            queue_wait,
            key_reloads,
            quota_frontends,
            quota_fallbacks,
        })
    }

    pub(super) fn set_queue(&self, by_band: &[usize; 4], inflight: usize) {
        for b in Band::ALL {
            self.queued
                .with_label_values(&[b.name()])
                .set(by_band[b as usize] as i64);
        }
        self.inflight.set(inflight as i64);
    }
}

impl Admission {
    /// Counts a request's end: its outcome by tenant and tier (`unknown` before the
    /// caller is identified). Called by the outcome layer only.
    pub(super) fn record(&self, caller: Option<&Caller>, outcome: Outcome) {
        let (label, tier) = caller.map_or(("unknown", "unknown"), |c| {
            (c.label.as_str(), c.tier.name.as_str())
        });
        self.metrics
            .requests
            .with_label_values(&[label, tier, outcome.label()])
            .inc();
        if let Some(caller) = caller {
            self.recent_mut()
                .ended(caller, outcome, std::time::Instant::now());
        }
    }

    /// Counts a request that started and then ran past its deadline.
    pub(super) fn record_deadline_miss(&self) {
        self.metrics.deadline_misses.inc();
    }

    /// Counts a request accepted past identity, validation and quota.
    pub(super) fn record_accepted(&self, caller: &Caller) {
        self.metrics
            .accepted
            .with_label_values(&[&caller.label, &caller.tier.name])
            .inc();
        self.recent_mut()
            .admitted(caller, std::time::Instant::now());
    }

    pub(super) fn recent_mut(&self) -> std::sync::MutexGuard<'_, super::demand::Recent> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }
}
