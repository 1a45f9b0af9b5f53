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

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use super::Admission;

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
    /// Tenants with requests in the system, by name.
    pub tenants: Vec<TenantDemand>,
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
        let st = self.lock();
        // By name, so anonymous addresses fold into one entry and the report is sorted.
        let mut tenants: std::collections::BTreeMap<String, TenantDemand> = Default::default();
        for (key, tier, queued, running) in st.shares.in_system(&st.queue) {
            let name = if key.starts_with("anonymous/") {
                "anonymous".to_string()
            } else {
                key
            };
            let entry = tenants.entry(name.clone()).or_insert_with(|| {
                let tier = tier.unwrap_or_else(|| self.tiers.default_tier());
                TenantDemand {
                    tenant: name,
                    cap: tier.limits.requests.map(|l| {
                        l.rate_per_minute() as f64 / 60.0 * service.as_secs_f64()
                            / f64::from(frontends)
                    }),
                    tier: tier.name.clone(),
                    queued: 0,
                    running: 0,
                }
            });
            entry.queued += queued;
            entry.running += running;
        }
        Demand {
            mean_service_seconds: mean.as_secs_f64(),
            running: st.shares.total(),
            queued: st.queue.len(),
            frontends,
            tenants: tenants.into_values().collect(),
        }
    }
}
