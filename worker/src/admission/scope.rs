//! How tier quotas hold across frontends (`admission.quotaScope` in worker.json).
//!
//! ```text
//!  unset ── each frontend enforces every quota in full (one frontend, `switchyard serve`)
//!  split ── each frontend enforces ⌈quota ÷ n⌉ (rate and burst, at least 1), n = the live
//!           frontends: the distinct addresses of `peers` ∪ this pod's own, re-resolved
//!           every 2 s (a failed lookup keeps the last n)
//!  redis ── one exact GCRA per tenant in Redis (super::global), shared by all frontends;
//!           a request Redis does not answer for in time is decided as in split mode
//!           (counted in switchyard_admission_quota_fallbacks_total)
//! ```
//!
//! `peers` is a DNS name (the frontends' headless Service), or several names or
//! addresses separated by commas, each resolved: `127.0.0.1,127.0.0.2,127.0.0.3` counts
//! three frontends (how the tests stand up three frontends on one machine). Both modes
//! count peers: split to divide, redis for its fallback and for the demand report's caps
//! (each frontend reports its share of a tenant's cap, and the count it divided by).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};
use switchyard_proto::worker_config::{ENV_POD_IP, QuotaScopeConfig};

use super::AdmissionError;
use super::gcra::{Limit, TierLimits};
use super::global::GlobalQuotas;
use super::redis::RedisError;

/// How often the peers are counted.
pub const PEER_REFRESH: Duration = Duration::from_secs(2);
/// The longest a lookup of the peers may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Redis failures are logged at most this often (with the count since the last line).
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Key prefix in Redis when the configuration sets none.
pub const DEFAULT_REDIS_PREFIX: &str = "switchyard/";
/// The Redis call timeout when the settings give none (`--quota-redis-timeout-ms`).
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);

/// Where quotas are kept.
#[derive(Debug)]
pub enum Mode {
    /// This frontend's share, locally.
    Split,
    /// In Redis, for all frontends.
    Redis(GlobalQuotas),
}

/// A frontend's quota scope: the mode, the live frontend count, and the fallback's
/// bookkeeping.
#[derive(Debug)]
pub struct QuotaScope {
    mode: Mode,
    peers: Vec<String>,
    own_ip: Option<IpAddr>,
    frontends: AtomicU32,
    gauge: IntGauge,
    fallbacks: IntCounter,
    /// Redis mode: tenants whose request bucket Redis refused, and until when. The request
    /// TAT only ever moves forward (no refunds), so refusing them locally until then is
    /// exact: this is the request-quota check before the body is read. With each: when
    /// the bucket is full again, as Redis said.
    spent: Mutex<HashMap<String, (Instant, Instant)>>,
    warned: Mutex<Option<Instant>>,
    unlogged: AtomicU64,
}

impl QuotaScope {
    /// The scope `config` describes; `own_ip` is this pod's address (counted even before
    /// the peers' records list it); `timeout` bounds each Redis call. The gauge and the
    /// counter are admission's metrics.
    pub fn new(
        config: &QuotaScopeConfig,
        own_ip: Option<IpAddr>,
        timeout: Duration,
        gauge: IntGauge,
        fallbacks: IntCounter,
    ) -> Result<Self, AdmissionError> {
        let bad = |field: &str, message: String| {
            AdmissionError::Scope(format!("admission.quotaScope.{field}: {message}"))
        };
        let peers: Vec<String> = config
            .peers
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        if peers.is_empty() {
            return Err(bad(
                "peers",
                "empty; give the DNS name of the frontends' headless Service (or \
                 comma-separated names or addresses)"
                    .into(),
            ));
        }
        let mode = match config.mode.as_str() {
            "split" => Mode::Split,
            "redis" => {
                let address = config.redis_address.as_deref().unwrap_or_default();
                if address.is_empty() {
                    return Err(bad("redisAddress", "mode redis needs host:port".into()));
                }
                let prefix = config
                    .redis_key_prefix
                    .as_deref()
                    .unwrap_or(DEFAULT_REDIS_PREFIX);
                Mode::Redis(GlobalQuotas::new(address, prefix, timeout))
            }
            other => {
                return Err(bad("mode", format!("{other:?} is not one of split, redis")));
            }
        };
        gauge.set(1);
        Ok(Self {
            mode,
            peers,
            own_ip,
            frontends: AtomicU32::new(1),
            gauge,
            fallbacks,
            spent: Mutex::new(HashMap::new()),
            warned: Mutex::new(None),
            unlogged: AtomicU64::new(0),
        })
    }

    /// This pod's address from the downward API (`SWITCHYARD_POD_IP`), if set and valid.
    pub fn own_ip_from_env() -> Option<IpAddr> {
        let value = std::env::var(ENV_POD_IP).ok()?;
        match value.trim().parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                tracing::warn!(value = %value, "{ENV_POD_IP} is not an IP address; not counted");
                None
            }
        }
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        let peers = self.peers.join(",");
        match &self.mode {
            Mode::Split => format!("split over {} frontends (peers {peers})", self.frontends()),
            Mode::Redis(g) => format!(
                "redis at {} (fallback: split over {} frontends; peers {peers})",
                g.address(),
                self.frontends()
            ),
        }
    }

    /// The mode.
    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// The Redis quotas, in redis mode.
    pub fn global(&self) -> Option<&GlobalQuotas> {
        match &self.mode {
            Mode::Redis(g) => Some(g),
            Mode::Split => None,
        }
    }

    /// The live frontends last counted (at least 1).
    pub fn frontends(&self) -> u32 {
        self.frontends.load(Ordering::Relaxed).max(1)
    }

    /// Sets the frontend count (the peer task does; tests may).
    pub fn set_frontends(&self, n: u32) {
        let n = n.max(1);
        self.frontends.store(n, Ordering::Relaxed);
        self.gauge.set(i64::from(n));
    }

    /// `limits` as this frontend enforces them in split mode (and in redis mode's
    /// fallback): each rate and burst ⌈x ÷ frontends⌉, at least 1.
    pub fn split(&self, limits: &TierLimits) -> TierLimits {
        split(limits, self.frontends())
    }

    /// Redis mode: refuses `tenant`'s requests locally until `until` (its request bucket
    /// is spent until then, and full again at `full_at`).
    pub fn note_spent(&self, tenant: &str, until: Instant, full_at: Instant) {
        lock(&self.spent).insert(tenant.to_string(), (until, full_at));
    }

    /// Redis mode: until when `tenant`'s request quota is known to be spent, if it is at
    /// `now`, and when its bucket is full again.
    pub fn spent_until(&self, tenant: &str, now: Instant) -> Option<(Instant, Instant)> {
        lock(&self.spent)
            .get(tenant)
            .copied()
            .filter(|(until, _)| *until > now)
    }

    /// Forgets the tenants whose request quota is no longer known to be spent.
    pub fn forget_spent(&self, now: Instant) {
        lock(&self.spent).retain(|_, (until, _)| *until > now);
    }

    /// Counts a request decided locally because Redis did not answer, and logs it (at most
    /// every [`WARN_EVERY`]).
    pub fn fell_back(&self, error: &RedisError) {
        self.fallbacks.inc();
        self.warn("quota decided locally (this frontend's split share)", error);
    }

    /// Logs a Redis failure `what` led to, at most every [`WARN_EVERY`].
    pub fn warn(&self, what: &str, error: &RedisError) {
        let now = Instant::now();
        let mut last = lock(&self.warned);
        if last.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        let also = self.unlogged.swap(0, Ordering::Relaxed);
        tracing::warn!(
            error = %error,
            frontends = self.frontends(),
            unlogged_since_last = also,
            "Redis quotas unavailable: {what}"
        );
    }

    /// Starts the task that counts the peers every [`PEER_REFRESH`] while `owner` lives.
    pub fn spawn_peer_count<T: Send + Sync + 'static>(self: &Arc<Self>, owner: Weak<T>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                let Some(scope) = me.upgrade() else { return };
                if owner.strong_count() == 0 {
                    return;
                }
                match count_peers(&scope.peers, scope.own_ip).await {
                    Ok(n) => {
                        if failing || n != scope.frontends() {
                            tracing::info!(frontends = n, peers = ?scope.peers, "quota frontends counted");
                        }
                        failing = false;
                        scope.set_frontends(n);
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(
                                error = %e,
                                peers = ?scope.peers,
                                frontends = scope.frontends(),
                                "cannot count the frontends sharing quotas; keeping the last count"
                            );
                        }
                        failing = true;
                    }
                }
                drop(scope);
                tokio::time::sleep(PEER_REFRESH).await;
            }
        });
    }
}

/// The distinct addresses of every name in `peers` ∪ `own`, at least 1.
///
/// # Errors
///
/// When any name does not resolve (in time).
pub async fn count_peers(peers: &[String], own: Option<IpAddr>) -> std::io::Result<u32> {
    let mut ips: HashSet<IpAddr> = own.into_iter().collect();
    for name in peers {
        let found =
            tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((name.as_str(), 0)))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("looking up {name} took more than {LOOKUP_TIMEOUT:?}"),
                    )
                })?
                .map_err(|e| std::io::Error::new(e.kind(), format!("looking up {name}: {e}")))?;
        ips.extend(found.map(|a| a.ip()));
    }
    Ok(u32::try_from(ips.len()).unwrap_or(u32::MAX).max(1))
}

/// Each rate and burst of `limits` as ⌈x ÷ n⌉, at least 1.
pub fn split(limits: &TierLimits, n: u32) -> TierLimits {
    if n <= 1 {
        return *limits;
    }
    let share = |l: Limit| {
        let part = |x: u64| x.div_ceil(u64::from(n)).max(1);
        Limit::new(part(l.rate_per_minute()), part(l.burst())).unwrap_or(l)
    };
    TierLimits {
        requests: limits.requests.map(share),
        tokens: limits.tokens.map(share),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mode: &str, peers: &str, redis: Option<&str>) -> QuotaScopeConfig {
        QuotaScopeConfig {
            mode: mode.into(),
            peers: peers.into(),
            redis_address: redis.map(str::to_string),
            redis_key_prefix: None,
        }
    }

    fn scope(c: &QuotaScopeConfig) -> Result<QuotaScope, AdmissionError> {
        QuotaScope::new(
            c,
            None,
            DEFAULT_REDIS_TIMEOUT,
            IntGauge::new("g", "g").expect("gauge"),
            IntCounter::new("c", "c").expect("counter"),
        )
    }

    #[test]
    fn split_limits_round_up_and_never_reach_zero() {
        let limits = TierLimits {
            requests: Limit::per_minute(10).ok(),
            tokens: Limit::new(100, 2).ok(),
        };
        let third = split(&limits, 3);
        let r = third.requests.expect("requests");
        assert_eq!((r.rate_per_minute(), r.burst()), (4, 4));
        let t = third.tokens.expect("tokens");
        assert_eq!((t.rate_per_minute(), t.burst()), (34, 1));
        assert_eq!(split(&limits, 1), limits);
        assert_eq!(split(&limits, 0), limits);
        let many = split(&limits, 1000).requests.expect("requests");
        assert_eq!((many.rate_per_minute(), many.burst()), (1, 1));
        assert_eq!(split(&TierLimits::UNLIMITED, 3), TierLimits::UNLIMITED);
    }

    #[test]
    fn configuration_errors_name_the_field() {
        let err = |c| scope(&c).expect_err("refused").to_string();
        assert!(err(config("global", "x", None)).contains("quotaScope.mode"));
        assert!(err(config("split", " , ", None)).contains("quotaScope.peers"));
        assert!(err(config("redis", "x", None)).contains("quotaScope.redisAddress"));
        assert!(scope(&config("split", "frontends.ns.svc", None)).is_ok());
        let redis = scope(&config("redis", "a, b", Some("redis:6379"))).expect("redis");
        assert_eq!(redis.peers, ["a", "b"]);
        assert_eq!(
            redis.global().expect("redis").key("t", "tokens"),
            "switchyard/t/tokens"
        );
    }

    #[tokio::test]
    async fn peers_count_distinct_addresses_and_this_pod() {
        let peers = |s: &str| s.split(',').map(str::to_string).collect::<Vec<_>>();
        let three = peers("127.0.0.1,127.0.0.2,127.0.0.3");
        assert_eq!(count_peers(&three, None).await.expect("resolved"), 3);
        // The same address twice counts once; this pod counts even when not listed yet.
        let dup = peers("127.0.0.1,127.0.0.1");
        assert_eq!(count_peers(&dup, None).await.expect("resolved"), 1);
        let own = Some("10.0.0.9".parse().expect("ip"));
        assert_eq!(count_peers(&dup, own).await.expect("resolved"), 2);
        assert_eq!(
            count_peers(&three, Some("127.0.0.2".parse().expect("ip")))
                .await
                .expect("resolved"),
            3
        );
        let bad = peers("no-such-host.invalid");
        assert!(count_peers(&bad, None).await.is_err());
    }

    #[test]
    fn the_count_is_at_least_one_and_sets_the_gauge() {
        let s = scope(&config("split", "x", None)).expect("split");
        assert_eq!(s.frontends(), 1);
        s.set_frontends(0);
        assert_eq!(s.frontends(), 1);
        s.set_frontends(3);
        assert_eq!(s.frontends(), 3);
        assert_eq!(s.gauge.get(), 3);
    }

    #[test]
    fn a_spent_request_quota_is_remembered_until_it_refills() {
        let s = scope(&config("redis", "x", Some("127.0.0.1:1"))).expect("redis");
        let now = Instant::now();
        let (until, full) = (now + Duration::from_secs(2), now + Duration::from_secs(60));
        s.note_spent("acme", until, full);
        assert_eq!(s.spent_until("acme", now), Some((until, full)));
        assert_eq!(s.spent_until("other", now), None);
        assert_eq!(s.spent_until("acme", now + Duration::from_secs(2)), None);
        s.forget_spent(now + Duration::from_secs(3));
        assert!(lock(&s.spent).is_empty());
    }
}
