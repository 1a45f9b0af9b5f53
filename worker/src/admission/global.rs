//! Quotas shared by every frontend through Redis (`quotaScope.mode: redis`): each tenant's
//! request and token buckets live in Redis as GCRA theoretical arrival times (TAT), and a
//! Lua script updates both atomically, so the frontends together admit exactly what one
//! frontend would.
//!
//! ```text
//!  keys   {prefix}{tenant}/requests, {prefix}{tenant}/tokens: the TAT in µs of Redis TIME,
//!         expiring when the bucket is full again (a missing key is a full bucket)
//!  charge (CHARGE)  1 request cell and `tokens` token cells, both or neither; the answer:
//!         allowed or which bucket refused, the exact wait, what is left of each bucket
//!  refund (REFUND)  the unused token cells: the token TAT moves back by them, never
//!         below now
//! ```
//!
//! Time is Redis's (`TIME`), so the frontends' clocks do not matter. With `I = 60 s / rate`
//! and a bucket of `burst` cells (`τ = burst · I`), a cost of `n` cells passes when
//! `max(TAT, now) + n · I − now ≤ τ` (to within 1 µs, the precision of the stored TAT); it
//! then becomes the new TAT.
//!
//! The refund is simpler than the local one ([`super::gcra`]), which remembers the debts
//! later admissions found: it moves the TAT back by the unused cells, stopping at now. The
//! two differ only when, between the charge and the refund, the bucket was (or, had the
//! request been charged only what it used, would have been) full at some admission: the
//! local refund then gives back only what a perfect record would, this one up to the
//! unused cells. So one refund credits at most the unused tokens of its request, and never
//! fills the bucket past full; over any window the tokens a tenant uses can exceed
//! `burst + rate × window` by at most the unused reservations of the requests that were
//! running at such moments (docs/admission.md, "Quotas across frontends").

use std::time::Duration;

use super::gcra::{Denied, DenyReason, Remaining, TierLimits};
use super::redis::{Redis, RedisError, Script, Value};

/// Charges one request and ARGV[5] tokens, both or neither. KEYS: the request bucket, the
/// token bucket. ARGV: request rate per minute (0: unlimited), request burst, token rate
/// per minute (0: unlimited), token burst, tokens. Returns `{allowed, reason, wait_us,
/// requests_left, requests_reset_us, tokens_left, tokens_reset_us}`; reason 1: requests,
/// 2: tokens, 3: more tokens than the bucket holds; -1: unlimited.
const CHARGE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function load(key, rate, burst)
  if rate <= 0 then return nil end
  local interval = 60000000 / rate
  local stored = redis.call('GET', key)
  local tat = stored and tonumber(stored) or now
  if tat < now then tat = now end
  return {key = key, interval = interval, burst = burst, tau = burst * interval, tat = tat}
end
local function over(b, cells)
  if not b then return 0 end
  local excess = b.tat + cells * b.interval - b.tau - now
  if excess <= 1 then return 0 end
  return math.ceil(excess)
end
local function left(b, tat)
  if not b then return -1, 0 end
  local cells = math.floor((b.tau - (tat - now)) / b.interval + 1e-6)
  if cells < 0 then cells = 0 end
  if cells > b.burst then cells = b.burst end
  return cells, math.ceil(tat - now)
end
local function store(b, tat)
  redis.call('SET', b.key, string.format('%.17g', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
end
local req = load(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
local tok = load(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
local tokens = tonumber(ARGV[5])
local reason, wait = 0, 0
if tok and tokens > tok.burst then
  reason = 3
else
  local wr, wt = over(req, 1), over(tok, tokens)
  if wr > 0 or wt > 0 then
    if wr >= wt then reason, wait = 1, wr else reason, wait = 2, wt end
  end
end
local rtat = req and req.tat or now
local ttat = tok and tok.tat or now
if reason == 0 then
  if req then
    rtat = req.tat + req.interval
    store(req, rtat)
  end
  if tok and tokens > 0 then
    ttat = tok.tat + tokens * tok.interval
    store(tok, ttat)
  end
end
local rl, rr = left(req, rtat)
local tl, tr = left(tok, ttat)
return {reason == 0 and 1 or 0, reason, wait, rl, rr, tl, tr}
";

/// Gives back ARGV[3] token cells. KEYS: the token bucket. ARGV: token rate per minute,
/// token burst, unused tokens. Returns `{tokens_left, tokens_reset_us}`.
const REFUND: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = 60000000 / tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local stored = redis.call('GET', KEYS[1])
local tat = stored and tonumber(stored) or now
if tat > now then
  tat = tat - tonumber(ARGV[3]) * interval
  if tat <= now then
    tat = now
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], string.format('%.17g', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  end
else
  tat = now
end
local cells = math.floor((burst * interval - (tat - now)) / interval + 1e-6)
if cells < 0 then cells = 0 end
if cells > burst then cells = burst end
return {cells, math.ceil(tat - now)}
";

/// The Redis side of shared quotas: the client and the two scripts.
#[derive(Debug)]
pub struct GlobalQuotas {
    redis: Redis,
    prefix: String,
    charge: Script,
    refund: Script,
}

impl GlobalQuotas {
    /// Quotas in the Redis at `address`, under keys starting with `prefix`; every call
    /// takes at most `timeout` (per Redis command: an unknown script costs two).
    pub fn new(address: &str, prefix: &str, timeout: Duration) -> Self {
        Self {
            redis: Redis::new(address, timeout),
            prefix: prefix.to_string(),
            charge: Script::new(CHARGE),
            refund: Script::new(REFUND),
        }
    }

    /// `host:port` of Redis.
    pub fn address(&self) -> &str {
        self.redis.address()
    }

    /// The Redis key of `tenant`'s `bucket` (`requests` or `tokens`).
    pub fn key(&self, tenant: &str, bucket: &str) -> String {
        format!("{}{tenant}/{bucket}", self.prefix)
    }

    /// Charges one request and `tokens` to `tenant` under `limits` (the tier's whole
    /// quota), both or neither: what is left, or why not.
    ///
    /// # Errors
    ///
    /// When Redis gives no usable answer in time; nothing may have been charged, or the
    /// charge may have been taken without the answer arriving.
    pub async fn check(
        &self,
        tenant: &str,
        limits: &TierLimits,
        tokens: u64,
    ) -> Result<Result<Remaining, Denied>, RedisError> {
        let (rr, rb) = limits
            .requests
            .map_or((0, 0), |l| (l.rate_per_minute(), l.burst()));
        let (tr, tb) = limits
            .tokens
            .map_or((0, 0), |l| (l.rate_per_minute(), l.burst()));
        let keys = [self.key(tenant, "requests"), self.key(tenant, "tokens")];
        let args = [rr, rb, tr, tb, tokens].map(|n| n.to_string());
        let reply = self
            .charge
            .run(&self.redis, &[&keys[0], &keys[1]], &args)
            .await?;
        let [allowed, reason, wait, rl, rreset, tl, treset] = integers::<7>(&reply)?;
        let remaining = remaining(limits, rl, rreset, tl, treset);
        if allowed == 1 {
            return Ok(Ok(remaining));
        }
        let reason = match reason {
            1 => DenyReason::Requests,
            2 => DenyReason::Tokens,
            3 => DenyReason::TooLarge,
            other => return Err(RedisError::Reply(format!("refusal reason {other}"))),
        };
        let retry_after = if reason == DenyReason::TooLarge {
            Duration::ZERO
        } else {
            micros(wait).max(Duration::from_micros(1))
        };
        Ok(Err(Denied {
            reason,
            retry_after,
            remaining,
        }))
    }

    /// Gives back `unused` token cells of a charge made under `limits`: the token TAT
    /// moves back by them, never below now. Returns what is left of the token bucket.
    ///
    /// # Errors
    ///
    /// When Redis gives no usable answer in time (the refund may be lost: the tenant is
    /// then credited less, never more).
    pub async fn refund(
        &self,
        tenant: &str,
        limits: &TierLimits,
        unused: u64,
    ) -> Result<Option<u64>, RedisError> {
        let Some(tokens) = limits.tokens else {
            return Ok(None);
        };
        let key = self.key(tenant, "tokens");
        let args = [tokens.rate_per_minute(), tokens.burst(), unused].map(|n| n.to_string());
        let reply = self.refund.run(&self.redis, &[&key], &args).await?;
        let [left, _reset] = integers::<2>(&reply)?;
        Ok(Some(u64::try_from(left).unwrap_or(0)))
    }
}

fn micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

fn remaining(limits: &TierLimits, rl: i64, rreset: i64, tl: i64, treset: i64) -> Remaining {
    let cells = |n: i64| u64::try_from(n).unwrap_or(0);
    Remaining {
        requests: limits.requests.map(|_| cells(rl)),
        tokens: limits.tokens.map(|_| cells(tl)),
        reset_requests: limits.requests.map_or(Duration::ZERO, |_| micros(rreset)),
        reset_tokens: limits.tokens.map_or(Duration::ZERO, |_| micros(treset)),
    }
}

/// The `N` integers of a script's array reply.
fn integers<const N: usize>(reply: &Value) -> Result<[i64; N], RedisError> {
    let shape = || RedisError::Reply(format!("expected {N} integers, got {reply:?}"));
    let Value::Array(items) = reply else {
        return Err(shape());
    };
    if items.len() != N {
        return Err(shape());
    }
    let mut out = [0; N];
    for (slot, item) in out.iter_mut().zip(items) {
        let Value::Integer(n) = item else {
            return Err(shape());
        };
        *slot = *n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::gcra::Limit;

    #[test]
    fn replies_map_to_the_quota_left_and_the_wait() {
        let limits = TierLimits {
            requests: Limit::per_minute(60).ok(),
            tokens: None,
        };
        let reply = Value::Array(
            [0, 1, 1_500_000, 0, 60_000_000, -1, 0]
                .map(Value::Integer)
                .to_vec(),
        );
        let [allowed, reason, wait, rl, rr, tl, tr] = integers::<7>(&reply).expect("shape");
        assert_eq!((allowed, reason), (0, 1));
        assert_eq!(micros(wait), Duration::from_millis(1500));
        let left = remaining(&limits, rl, rr, tl, tr);
        assert_eq!(left.requests, Some(0));
        assert_eq!(left.tokens, None, "unlimited tokens report nothing");
        assert_eq!(left.reset_requests, Duration::from_secs(60));
        assert!(integers::<7>(&Value::Array(vec![Value::Integer(1)])).is_err());
        assert!(integers::<2>(&Value::Nil).is_err());
    }

    #[test]
    fn keys_are_the_prefix_the_tenant_and_the_bucket() {
        let q = GlobalQuotas::new(
            "127.0.0.1:6379",
            "switchyard/ns/md/",
            Duration::from_millis(50),
        );
        assert_eq!(q.key("acme", "requests"), "switchyard/ns/md/acme/requests");
        assert_eq!(q.key("acme", "tokens"), "switchyard/ns/md/acme/tokens");
    }
}
