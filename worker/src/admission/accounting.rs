//! Quota accounting: the request-quota check before a body is read, the charge of a valid
//! request (one request and its token reservation, both or neither), and the refund of
//! what it did not use — owned by a [`Charge`], so it happens on drop, on every path.
//!
//! Where the quota is kept follows the quota scope ([`super::scope`]): here, in full
//! (no scope) or this frontend's split share of it; or in Redis, shared by every
//! frontend, with the split share as the fallback when Redis does not answer in time.

use std::sync::Arc;
use std::time::Instant;

use super::Admission;
use super::gcra::{Denied, DenyReason, Quotas, Receipt, Remaining, TierLimits};
use super::identity::Caller;
use super::outcome::Rejection;
use super::scope::QuotaScope;
use super::status;

/// Where the quota a caller was measured against is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// On this frontend: the tier's quota split over `frontends` (1: the whole quota).
    Here { frontends: u32 },
    /// In Redis, shared by every frontend: the tier's whole quota.
    Redis,
}

/// The quota a caller was measured against: the limits applied, what is left of them, and
/// where they are kept (for response metadata and refusal messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaView {
    /// The limits applied: the tier's, or this frontend's split share of them.
    pub limits: TierLimits,
    /// What is left of them.
    pub remaining: Remaining,
    /// Where they are kept.
    pub kept: Kept,
}

/// A request's token pre-charge (prompt + `max_tokens`). Dropping it refunds what was not
/// used — all of it unless [`Charge::settle`] said otherwise — exactly once.
pub struct Charge {
    refund: Refund,
    reserved: u64,
    used: u64,
}

/// How a charge is refunded: where it was taken, and the limits it was taken under.
enum Refund {
    Local {
        quotas: Arc<Quotas<String>>,
        key: String,
        limits: TierLimits,
        receipt: Receipt,
    },
    Redis {
        scope: Arc<QuotaScope>,
        key: String,
        limits: TierLimits,
        runtime: tokio::runtime::Handle,
    },
    Done,
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Charge")
            .field("reserved", &self.reserved)
            .field("used", &self.used)
            .finish_non_exhaustive()
    }
}

impl Charge {
    /// Tokens pre-charged.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// `used` tokens of the pre-charge were used: they are not refunded.
    pub fn settle(&mut self, used: u64) {
        self.used = used;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let unused = self.reserved.saturating_sub(self.used);
        match std::mem::replace(&mut self.refund, Refund::Done) {
            Refund::Local {
                quotas,
                key,
                limits,
                receipt,
            } => {
                quotas.refund(&key, &limits, receipt, unused, Instant::now());
            }
            Refund::Redis {
                scope,
                key,
                limits,
                runtime,
            } => {
                if unused == 0 || limits.tokens.is_none() {
                    return;
                }
                // Not awaited: the request is over; a refund Redis does not take is lost
                // (the tenant is credited less, never more).
                runtime.spawn(async move {
                    let Some(global) = scope.global() else { return };
                    if let Err(e) = global.refund(&key, &limits, unused).await {
                        scope.warn("a token refund was lost (the tenant is credited less)", &e);
                    }
                });
            }
            Refund::Done => {}
        }
    }
}

impl Admission {
    /// Refuses a caller whose request quota is spent, before anything else is done for
    /// the request (even its validation), so a flooding caller costs almost nothing.
    /// Charges nothing: [`Admission::charge`] charges the request and its tokens together
    /// once the request is valid.
    ///
    /// In redis mode this never waits on Redis: it refuses a tenant that Redis refused for
    /// its request quota until the wait Redis gave has passed (the request bucket only
    /// fills with time, so that is exact); the charge asks Redis.
    pub fn precheck_request(&self, caller: &Caller) -> Result<(), Rejection> {
        if let Some(scope) = self.redis_scope() {
            let now = Instant::now();
            let Some((until, full_at)) = scope.spent_until(&caller.key, now) else {
                return Ok(());
            };
            let view = QuotaView {
                limits: caller.tier.limits,
                remaining: Remaining {
                    requests: caller.tier.limits.requests.map(|_| 0),
                    tokens: None,
                    reset_requests: full_at.saturating_duration_since(now),
                    reset_tokens: std::time::Duration::ZERO,
                },
                kept: Kept::Redis,
            };
            let denied = Denied {
                reason: DenyReason::Requests,
                retry_after: until.saturating_duration_since(now),
                remaining: view.remaining,
            };
            return Err(status::over_quota(&caller.tier, &view, 0, &denied));
        }
        if self.remaining(caller).remaining.requests != Some(0) {
            return Ok(());
        }
        // Spent: the same check as `charge` with no tokens gives the exact wait (and
        // charges nothing when it refuses). Should a cell have freed up meanwhile, it
        // passes and charges one request; the request then goes on.
        self.charge_local(caller, 0).map(drop)
    }

    /// Charges one request and `tokens` (prompt + `max_tokens`) together, both or
    /// neither; returns the quota left and the [`Charge`], which refunds the unused part
    /// when dropped.
    ///
    /// In redis mode the charge is Redis's, shared by every frontend; when Redis does not
    /// answer within its timeout the request is decided by this frontend's split share
    /// instead (counted in `switchyard_admission_quota_fallbacks_total`), never refused
    /// for that and never kept waiting longer.
    pub async fn charge(
        &self,
        caller: &Caller,
        tokens: u64,
    ) -> Result<(QuotaView, Charge), Rejection> {
        if let Some(scope) = self.redis_scope()
            && let Some(global) = scope.global()
        {
            let limits = caller.tier.limits;
            match global.check(&caller.key, &limits, tokens).await {
                Ok(Ok(remaining)) => {
                    let view = QuotaView {
                        limits,
                        remaining,
                        kept: Kept::Redis,
                    };
                    let charge = Charge {
                        refund: Refund::Redis {
                            scope: scope.clone(),
                            key: caller.key.clone(),
                            limits,
                            runtime: tokio::runtime::Handle::current(),
                        },
                        reserved: tokens,
                        used: 0,
                    };
                    return Ok((view, charge));
                }
                Ok(Err(denied)) => {
                    let now = Instant::now();
                    if denied.reason == DenyReason::Requests {
                        scope.note_spent(
                            &caller.key,
                            now + denied.retry_after,
                            now + denied.remaining.reset_requests,
                        );
                    }
                    let view = QuotaView {
                        limits,
                        remaining: denied.remaining,
                        kept: Kept::Redis,
                    };
                    return Err(status::over_quota(&caller.tier, &view, tokens, &denied));
                }
                Err(e) => scope.fell_back(&e),
            }
        }
        self.charge_local(caller, tokens)
    }

    /// The quota of `caller` on this frontend now: the limits it enforces here and what
    /// is left of them.
    pub fn remaining(&self, caller: &Caller) -> QuotaView {
        let (limits, kept) = self.local_limits(caller);
        QuotaView {
            limits,
            remaining: self.quotas.remaining(&caller.key, &limits, Instant::now()),
            kept,
        }
    }

    /// What `caller` may spend next, for the metadata at the end of a call that was
    /// charged as `charged`: this frontend's quota now, or (kept in Redis, whose refund
    /// is not awaited) what was left right after the charge.
    pub fn remaining_after(&self, caller: &Caller, charged: &QuotaView) -> QuotaView {
        match charged.kept {
            Kept::Redis => *charged,
            Kept::Here { .. } => self.remaining(caller),
        }
    }

    /// The limits this frontend enforces for `caller` by itself: the tier's, or in a quota
    /// scope (and in redis mode's fallback) their share over the live frontends.
    pub(super) fn local_limits(&self, caller: &Caller) -> (TierLimits, Kept) {
        match &self.scope {
            None => (caller.tier.limits, Kept::Here { frontends: 1 }),
            Some(scope) => (
                scope.split(&caller.tier.limits),
                Kept::Here {
                    frontends: scope.frontends(),
                },
            ),
        }
    }

    fn redis_scope(&self) -> Option<&Arc<QuotaScope>> {
        self.scope.as_ref().filter(|s| s.global().is_some())
    }

    /// Charges on this frontend, under the limits it enforces itself; the refund uses the
    /// same limits even if the frontend count changes meanwhile.
    fn charge_local(&self, caller: &Caller, tokens: u64) -> Result<(QuotaView, Charge), Rejection> {
        let (limits, kept) = self.local_limits(caller);
        let now = Instant::now();
        match self.quotas.check(&caller.key, &limits, tokens, now) {
            Ok(grant) => {
                let view = QuotaView {
                    limits,
                    remaining: grant.remaining,
                    kept,
                };
                let charge = Charge {
                    refund: Refund::Local {
                        quotas: self.quotas.clone(),
                        key: caller.key.clone(),
                        limits,
                        receipt: grant.receipt,
                    },
                    reserved: tokens,
                    used: 0,
                };
                Ok((view, charge))
            }
            Err(denied) => {
                let view = QuotaView {
                    limits,
                    remaining: denied.remaining,
                    kept,
                };
                Err(status::over_quota(&caller.tier, &view, tokens, &denied))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use switchyard_proto::worker_config::{AdmissionConfig, QuotaScopeConfig, TierConfig};

    use super::*;
    use crate::admission::AdmissionOptions;
    use crate::frontend::FrontendMetrics;

    const KEY: &str = "acme-key-0123456789";

    /// Admission with one tier (`requests` and `tokens` a minute), the key `KEY` of tenant
    /// `acme`, and `scope`; returns the caller too.
    fn scoped(
        scope: Option<QuotaScopeConfig>,
        requests: Option<u64>,
        tokens: Option<u64>,
    ) -> (Arc<Admission>, Arc<FrontendMetrics>, Caller) {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "switchyard-accounting-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("tenants"), format!("acme:{KEY}:free\n")).expect("keys");
        let opts = AdmissionOptions {
            config: AdmissionConfig {
                api_keys_dir: Some(dir.to_string_lossy().into_owned()),
                default_tier: Some("free".into()),
                tiers: vec![TierConfig {
                    name: "free".into(),
                    priority: "normal".into(),
                    weight: 1,
                    requests_per_minute: requests,
                    tokens_per_minute: tokens,
                    cached_prompt_token_percent: None,
                }],
                max_queued: 16,
                default_deadline_seconds: 30,
                quota_scope: scope,
            },
            max_inflight: 4,
            min_service: Duration::from_millis(1),
            redis_timeout: Duration::from_millis(50),
        };
        let metrics = Arc::new(FrontendMetrics::new(1, 0));
        let admission = Admission::new(&opts, metrics.registry()).expect("admission");
        let _ = std::fs::remove_dir_all(&dir);
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "authorization",
            http::HeaderValue::from_str(&format!("Bearer {KEY}")).expect("header"),
        );
        let caller = admission.identify(&headers, None).expect("caller");
        (admission, metrics, caller)
    }

    fn split(peers: &str) -> Option<QuotaScopeConfig> {
        Some(QuotaScopeConfig {
            mode: "split".into(),
            peers: peers.into(),
            redis_address: None,
            redis_key_prefix: None,
        })
    }

    fn metric(metrics: &FrontendMetrics, series: &str) -> f64 {
        crate::telemetry::render(metrics.registry())
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(-1.0)
    }

    #[tokio::test]
    async fn without_a_scope_a_frontend_enforces_the_whole_quota() {
        let (admission, metrics, caller) = scoped(None, Some(10), None);
        for _ in 0..10 {
            admission
                .charge(&caller, 0)
                .await
                .expect("within the quota");
        }
        assert!(admission.charge(&caller, 0).await.is_err());
        assert_eq!(
            metric(&metrics, "switchyard_admission_quota_frontends"),
            1.0
        );
    }

    #[tokio::test]
    async fn split_over_three_frontends_each_admits_a_third_rounded_up_a_minute() {
        let (admission, metrics, caller) = scoped(split("frontends"), Some(10), None);
        admission.quota_scope().expect("scope").set_frontends(3);
        assert_eq!(
            metric(&metrics, "switchyard_admission_quota_frontends"),
            3.0
        );
        // ⌈10 / 3⌉ = 4 at once, then one every 15 s: 4 a minute.
        for left in (0..4).rev() {
            let (quota, _) = admission
                .charge(&caller, 0)
                .await
                .expect("within the share");
            assert_eq!(quota.remaining.requests, Some(left));
            assert_eq!(quota.kept, Kept::Here { frontends: 3 });
            let l = quota.limits.requests.expect("a request quota");
            assert_eq!((l.rate_per_minute(), l.burst()), (4, 4));
        }
        let refused = admission.charge(&caller, 0).await.expect_err("share spent");
        let status = refused.status;
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status
                .message()
                .contains("(4 per minute: this frontend's share of 10 over 3 frontends)"),
            "{}",
            status.message()
        );
        let pushback: u64 = status
            .metadata()
            .get("grpc-retry-pushback-ms")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .expect("pushback");
        assert!((14_900..=15_000).contains(&pushback), "{pushback}");
        assert_eq!(
            status
                .metadata()
                .get("x-ratelimit-limit-requests")
                .map(|v| v.to_str().unwrap_or_default()),
            Some("4"),
            "the limit applied here"
        );
        // The request-quota check before the body says the same.
        assert!(admission.precheck_request(&caller).is_err());
    }

    #[tokio::test]
    async fn a_count_change_mid_stream_applies_the_new_share_and_refunds_as_charged() {
        let (admission, _metrics, caller) = scoped(split("frontends"), None, Some(300));
        let scope = admission.quota_scope().expect("scope").clone();
        // Alone: the whole 300; a request reserves 200 of it.
        let (quota, mut first) = admission.charge(&caller, 200).await.expect("fits");
        assert_eq!(quota.remaining.tokens, Some(100));
        // Two more frontends come up: this one now enforces 100 a minute, and the debt
        // of 200 is more than its whole bucket.
        scope.set_frontends(3);
        let left = admission.remaining(&caller);
        assert_eq!(left.remaining.tokens, Some(0));
        assert_eq!(left.limits.tokens.map(|l| l.burst()), Some(100));
        assert!(
            admission.charge(&caller, 1).await.is_err(),
            "over the new share"
        );
        // The first request used 10: the refund, under the limits it was charged with,
        // gives back 190, and the new share then has room for 90-odd tokens (it refills
        // a little while the test runs).
        first.settle(10);
        drop(first);
        let left = admission
            .remaining(&caller)
            .remaining
            .tokens
            .expect("tokens");
        assert!((90..=92).contains(&left), "{left}");
        let _second = admission
            .charge(&caller, 90)
            .await
            .expect("fits the new share");
        // And back to one frontend: the whole quota again, the same debt.
        scope.set_frontends(1);
        let left = admission
            .remaining(&caller)
            .remaining
            .tokens
            .expect("tokens");
        assert!((200..=203).contains(&left), "{left}");
    }

    #[tokio::test]
    async fn the_demand_cap_is_this_frontends_share_of_the_tenants_cap() {
        let (admission, _metrics, caller) = scoped(split("frontends"), Some(60), None);
        let call = crate::admission::Call::default();
        call.identified(caller);
        let cost = crate::admission::Cost {
            prompt: 1,
            max_tokens: 1,
        };
        let _held = admission
            .admit(&call, cost, 0, None)
            .await
            .expect("admitted");
        let cap = |a: &Admission| a.demand().tenants[0].cap.expect("a request quota");
        // 1 request a second × the 1 s assumed in the system, whole on one frontend...
        assert!((cap(&admission) - 1.0).abs() < 1e-9);
        // ... a third on each of three: the autoscaler sums them back to 1.
        admission.quota_scope().expect("scope").set_frontends(3);
        assert!((cap(&admission) - 1.0 / 3.0).abs() < 1e-9);
    }

    #[tokio::test]
    async fn an_unreachable_redis_falls_back_to_the_split_share_at_once() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let scope = QuotaScopeConfig {
            mode: "redis".into(),
            peers: "127.0.0.1,127.0.0.2,127.0.0.3".into(),
            redis_address: Some(format!("127.0.0.1:{port}")),
            redis_key_prefix: Some("switchyard/test/".into()),
        };
        let (admission, metrics, caller) = scoped(Some(scope), Some(6), None);
        admission.quota_scope().expect("scope").set_frontends(3);
        let started = std::time::Instant::now();
        // ⌈6 / 3⌉ = 2 here, decided locally: no refusal for Redis being away...
        for _ in 0..2 {
            let (quota, _) = admission.charge(&caller, 0).await.expect("the split share");
            assert_eq!(quota.kept, Kept::Here { frontends: 3 });
        }
        // ... and the split share's refusal once it is spent.
        let refused = admission.charge(&caller, 0).await.expect_err("share spent");
        assert_eq!(refused.status.code(), tonic::Code::ResourceExhausted);
        assert!(started.elapsed() < Duration::from_millis(500), "no hang");
        assert_eq!(
            metric(&metrics, "switchyard_admission_quota_fallbacks_total"),
            3.0
        );
        // The check before the body does not wait on Redis either.
        assert!(admission.precheck_request(&caller).is_ok());
    }

    #[tokio::test]
    async fn in_redis_mode_a_tenant_redis_refused_is_refused_before_its_body_until_its_wait() {
        let scope = QuotaScopeConfig {
            mode: "redis".into(),
            peers: "localhost".into(),
            redis_address: Some("127.0.0.1:1".into()),
            redis_key_prefix: None,
        };
        let (admission, _metrics, caller) = scoped(Some(scope), Some(60), None);
        assert!(admission.precheck_request(&caller).is_ok());
        let now = Instant::now();
        admission.quota_scope().expect("scope").note_spent(
            &caller.key,
            now + Duration::from_millis(800),
            now + Duration::from_secs(60),
        );
        let refused = admission.precheck_request(&caller).expect_err("spent");
        let pushback: u64 = refused
            .status
            .metadata()
            .get("grpc-retry-pushback-ms")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .expect("pushback");
        assert!((700..=800).contains(&pushback), "{pushback}");
        assert!(
            refused.status.message().contains("(60 per minute)"),
            "the whole quota: {}",
            refused.status.message()
        );
    }
}
