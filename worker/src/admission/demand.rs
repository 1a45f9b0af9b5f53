//! The demand report (`GET /demand` on a frontend's metrics port): what the autoscaler
//! polls, directly and sub-second, instead of scraping Prometheus.
//!
//! Per tenant: requests in the system (queued + running; only admitted ones, so refused
//! traffic is absent by construction) and `cap`, the most its request quota can keep in
//! the system (rate × mean time in the system). The autoscaler counts each tenant for at
//! most its cap (`switchyard_operator::autoscale`), so a flood over quota buys nothing.
//! With a quota scope (several frontends share each quota) a frontend reports its share,
//! cap ÷ the frontends it counted, in split and redis mode alike, and that count: the
//! autoscaler takes a tenant's whole cap as the largest share × count any frontend
//! reports.
//! Anonymous callers are one entry with one tier's cap: many addresses do not add up to
//! many quotas.
//!
//! Over the last [`WINDOW_SECONDS`] (so a poller needs no state of its own), per tenant:
//! requests admitted, tokens generated and requests refused, by reason (quota, shed,
//! expired), per second; a tenant appears while it has requests in the system or anything
//! in the window. The frontend adds its KV cache use and recent TTFT
//! (`switchyard_worker::frontend`).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Admission;
use super::identity::Caller;
use super::outcome::Outcome;
use crate::recent::{Quantiles, RecentRate, WINDOW_SECONDS};

/// The report.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Demand {
    /// Mean time an admitted request spends in the system (EWMA), in seconds; 0 before
    /// the first request ends.
    pub mean_service_seconds: f64,
    /// Requests in the engine and waiting, all tenants.
    pub running: usize,
    pub queued: usize,
    /// The frontends this one shares quotas with, itself included (1 without a quota
    /// scope): each tenant's `cap` is its share, so cap × frontends is the whole.
    pub frontends: u32,
    /// What the per-second figures cover, in seconds.
    pub window_seconds: u64,
    /// Tenants with requests in the system or anything in the window, by name.
    pub tenants: Vec<TenantDemand>,
    /// The KV cache's blocks (the frontend fills it in).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_cache: Option<KvUse>,
    /// Time to first token over the window, all tenants (the frontend fills it in;
    /// absent when no request started in the window).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft: Option<Quantiles>,
}

/// KV cache blocks in use and free.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KvUse {
    pub used_blocks: u64,
    pub free_blocks: u64,
}

/// One tenant's part.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantDemand {
    /// Tenant name (`anonymous` for every caller without a key).
    pub tenant: String,
    pub tier: String,
    pub queued: usize,
    pub running: usize,
    /// The most requests its quota can keep in the system — this frontend's share of it:
    /// with `admission.quotaScope` set, the cap ÷ [`Demand::frontends`] (in both modes);
    /// absent: no request quota.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cap: Option<f64>,
    /// Over the window, per second: requests admitted (past identity, validation and
    /// quota), tokens generated, and requests refused by reason.
    pub admitted_per_second: f64,
    pub tokens_per_second: f64,
    pub refused_per_second: Refused,
}

/// Refusals per second, by reason.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Refused {
    /// Over the tenant's quota (`RESOURCE_EXHAUSTED`).
    pub quota: f64,
    /// Overload: the queue was full or the request was evicted (`UNAVAILABLE`).
    pub shed: f64,
    /// Its deadline passed, queued or running (`DEADLINE_EXCEEDED`).
    pub expired: f64,
}

/// One tenant's recent counts.
#[derive(Debug, Clone)]
struct TenantRecent {
    /// Its tier's name; `None` when first seen by a token count alone (its admission left
    /// the window): the default tier's is reported.
    tier: Option<String>,
    admitted: RecentRate,
    tokens: RecentRate,
    quota: RecentRate,
    shed: RecentRate,
    expired: RecentRate,
}

impl TenantRecent {
    fn new(tier: Option<&str>, now: Instant) -> Self {
        let rate = RecentRate::new(now);
        Self {
            tier: tier.map(str::to_string),
            admitted: rate.clone(),
            tokens: rate.clone(),
            quota: rate.clone(),
            shed: rate.clone(),
            expired: rate,
        }
    }

    fn is_quiet(&self, now: Instant) -> bool {
        [
            &self.admitted,
            &self.tokens,
            &self.quota,
            &self.shed,
            &self.expired,
        ]
        .iter()
        .all(|r| r.is_quiet(now))
    }
}

/// Recent counts by tenant label (`anonymous` for every anonymous caller, so an address
/// flood is one entry). Quiet tenants are dropped at each report, so it holds the tenants
/// of the last window only.
#[derive(Debug, Default)]
pub(super) struct Recent {
    by_tenant: BTreeMap<String, TenantRecent>,
}

impl Recent {
    fn tenant(&mut self, label: &str, tier: Option<&str>, now: Instant) -> &mut TenantRecent {
        if !self.by_tenant.contains_key(label) {
            self.by_tenant
                .insert(label.to_string(), TenantRecent::new(tier, now));
        }
        self.by_tenant.get_mut(label).expect("inserted above")
    }

    pub(super) fn admitted(&mut self, caller: &Caller, now: Instant) {
        self.tenant(&caller.label, Some(&caller.tier.name), now)
            .admitted
            .add(now, 1);
    }

    /// `n` tokens generated for the tenant labelled `label`.
    pub(super) fn generated(&mut self, label: &str, n: u64, now: Instant) {
        self.tenant(label, None, now).tokens.add(now, n);
    }

    pub(super) fn ended(&mut self, caller: &Caller, outcome: Outcome, now: Instant) {
        let t = self.tenant(&caller.label, Some(&caller.tier.name), now);
        match outcome {
            Outcome::Rejected => t.quota.add(now, 1),
            Outcome::Shed => t.shed.add(now, 1),
            Outcome::Expired => t.expired.add(now, 1),
            _ => {}
        }
    }
}

/// Until a request has ended, the time in the system a cap assumes.
const ASSUMED_SERVICE: Duration = Duration::from_secs(1);

impl Admission {
    /// The demand report now.
    pub fn demand(&self) -> Demand {
        let mean = Duration::from_micros(self.mean_service_us.load(Ordering::Relaxed));
        let service = if mean.is_zero() {
            ASSUMED_SERVICE
        } else {
            mean
        };
        // Each frontend reports its share and the count it divided by.
        let frontends = self.scope.as_ref().map_or(1, |s| s.frontends());
        let cap = |tier: &super::tiers::Tier| {
            tier.limits.requests.map(|l| {
                l.rate_per_minute() as f64 / 60.0 * service.as_secs_f64() / f64::from(frontends)
            })
        };
        // A tenant's entry before its counts are added.
        let nothing_yet = |tenant: String, tier: &super::tiers::Tier| TenantDemand {
            tenant,
            cap: cap(tier),
            tier: tier.name.clone(),
            queued: 0,
            running: 0,
            admitted_per_second: 0.0,
            tokens_per_second: 0.0,
            refused_per_second: Refused::default(),
        };
        let st = self.lock();
        // By name, so anonymous addresses fold into one entry and the report is sorted.
        let mut tenants: BTreeMap<String, TenantDemand> = Default::default();
        for (key, tier, queued, running) in st.shares.in_system(&st.queue) {
            let name = if key.starts_with("anonymous/") {
                "anonymous".to_string()
            } else {
                key
            };
            let entry = tenants.entry(name.clone()).or_insert_with(|| {
                nothing_yet(name, &tier.unwrap_or_else(|| self.tiers.default_tier()))
            });
            entry.queued += queued;
            entry.running += running;
        }
        let (running, queued) = (st.shares.total(), st.queue.len());
        drop(st);
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.by_tenant.retain(|_, t| !t.is_quiet(now));
        for (name, r) in &recent.by_tenant {
            let entry = tenants.entry(name.clone()).or_insert_with(|| {
                let tier = r.tier.as_deref().map_or_else(
                    || self.tiers.default_tier(),
                    |t| self.tiers.get_or_default(t),
                );
                nothing_yet(name.clone(), &tier)
            });
            entry.admitted_per_second = r.admitted.per_second(now);
            entry.tokens_per_second = r.tokens.per_second(now);
            entry.refused_per_second = Refused {
                quota: r.quota.per_second(now),
                shed: r.shed.per_second(now),
                expired: r.expired.per_second(now),
            };
        }
        Demand {
            mean_service_seconds: mean.as_secs_f64(),
            running,
            queued,
            frontends,
            window_seconds: WINDOW_SECONDS,
            tenants: tenants.into_values().collect(),
            kv_cache: None,
            ttft: None,
        }
    }
}
