//! Per-tenant quotas: GCRA limits on requests and on tokens per minute.
//!
//! Each limited key owns two buckets, one counting requests and one counting tokens,
//! and both follow the generic cell rate algorithm (GCRA, as in the `governor` crate):
//! a bucket holds `burst` cells and refills at `per_minute` cells a minute. A request is
//! admitted only when both buckets can pay for it (one request cell, `tokens` token
//! cells); then both pay, otherwise neither does.
//!
//! # Arithmetic
//!
//! GCRA keeps a "theoretical arrival time" per bucket. Here the state is kept as a
//! *debt*: how far that time lies ahead of the last instant the bucket was looked at,
//! counted in ticks, where one cell is 60·10⁹ ticks and one nanosecond of waiting repays
//! `per_minute` ticks. Every quantity is then an exact integer, whatever the rate, so a
//! tenant sending at exactly its limit is never denied, a retry hint is exact to the
//! nanosecond, and no rounding drift accumulates. Instants are never added to, so no
//! limit can overflow one.
//!
//! # Refunds
//!
//! Tokens are charged up front as prompt + `max_tokens`, and the unused part goes back
//! when the request ends. A correct refund makes the bucket what it would be had the
//! request been charged only what it used. That is *not* simply "move the debt back by
//! the unused cells, stopping at a full bucket": had the request cost less, the bucket
//! might have filled up at some later moment and dropped the surplus, and every later
//! request would have been charged from that fuller bucket. The credit the refund can
//! restore is therefore the smallest debt the bucket carried at any admission after the
//! refunded one (and at the refund itself, where it cannot exceed a full bucket).
//! Each bucket logs those debts compactly (suffix minima, at most
//! `REFUND_LOG` entries, merged toward less credit when full), and [`Quotas::check`]
//! hands out a [`Receipt`] that identifies the charge. A refund thus never gives more
//! than a perfect record would, and gives exactly that in all but long runs of
//! overlapping requests. A receipt is consumed by the refund, so it cannot be refunded
//! twice.
//!
//! # Memory
//!
//! A key whose buckets are full again is indistinguishable from a key never seen, so
//! [`Quotas::evict_idle`] may drop it; a flood of one-off keys costs memory only until
//! their buckets refill. Unlimited tiers store nothing.

use std::collections::HashMap;
use std::error::Error;
use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Ticks in one cell: nanoseconds in a minute, so that a nanosecond repays `per_minute`
/// ticks and every rate divides evenly.
const TICKS_PER_CELL: u128 = 60_000_000_000;

/// Independent locks; concurrent tenants rarely share one.
const SHARDS: usize = 16;

/// Entries of a bucket's refund log; more overlapping admissions are merged.
const REFUND_LOG: usize = 8;

/// A GCRA limit: `per_minute` cells a minute, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    per_minute: u64,
    burst: u64,
}

/// Why a [`Limit`] was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidLimit {
    /// `per_minute` was zero: the bucket would never refill.
    ZeroRate,
    /// `burst` was zero: the bucket could never admit anything.
    ZeroBurst,
}

impl fmt::Display for InvalidLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroRate => f.write_str("a quota's rate per minute must be at least 1"),
            Self::ZeroBurst => f.write_str("a quota's burst must be at least 1"),
        }
    }
}

impl Error for InvalidLimit {}

impl Limit {
    /// A limit of `per_minute` cells a minute with a bucket of `burst` cells.
    ///
    /// # Errors
    ///
    /// When either is zero.
    pub fn new(per_minute: u64, burst: u64) -> Result<Self, InvalidLimit> {
        if per_minute == 0 {
            return Err(InvalidLimit::ZeroRate);
        }
        if burst == 0 {
            return Err(InvalidLimit::ZeroBurst);
        }
        Ok(Self { per_minute, burst })
    }

    /// A limit of `per_minute` cells a minute whose bucket holds one minute's worth.
    ///
    /// # Errors
    ///
    /// When `per_minute` is zero.
    pub fn per_minute(per_minute: u64) -> Result<Self, InvalidLimit> {
        Self::new(per_minute, per_minute)
    }

    /// Cells a minute.
    pub fn rate_per_minute(&self) -> u64 {
        self.per_minute
    }

    /// Bucket size in cells: the most one request may cost, and the most a full bucket
    /// admits at once.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    fn capacity(&self) -> u128 {
        u128::from(self.burst) * TICKS_PER_CELL
    }

    /// Debt repaid by `nanos` of waiting.
    fn repaid(&self, nanos: u128) -> u128 {
        nanos.saturating_mul(u128::from(self.per_minute))
    }

    /// Ticks by which `debt + cells` overflows the bucket: zero when they fit.
    fn excess(&self, debt: u128, cells: u64) -> u128 {
        debt.saturating_add(cost(cells))
            .saturating_sub(self.capacity())
    }

    /// The shortest wait that repays `ticks`.
    fn wait(&self, ticks: u128) -> Duration {
        duration_from_nanos(div_ceil(ticks, self.per_minute))
    }

    /// Whole cells a bucket with `debt` can still pay.
    fn cells_left(&self, debt: u128) -> u64 {
        let cells = div_floor(self.capacity().saturating_sub(debt), TICKS_PER_CELL);
        u64::try_from(cells).unwrap_or(u64::MAX).min(self.burst)
    }
}

fn cost(cells: u64) -> u128 {
    u128::from(cells) * TICKS_PER_CELL
}

fn div_floor(a: u128, b: impl Into<u128>) -> u128 {
    let b = b.into();
    // u128 division is a slow library call; almost every operand fits in 64 bits.
    match (u64::try_from(a), u64::try_from(b)) {
        (Ok(a), Ok(b)) => u128::from(a / b),
        _ => a / b,
    }
}

fn div_ceil(a: u128, b: u64) -> u128 {
    let q = div_floor(a, b);
    if q * u128::from(b) == a { q } else { q + 1 }
}

fn duration_from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    match u64::try_from(nanos / NANOS_PER_SEC) {
        // The remainder is below 10⁹ and so always fits.
        Ok(secs) => Duration::new(secs, (nanos % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}

/// The limits of one tier; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TierLimits {
    /// Requests per minute.
    pub requests: Option<Limit>,
    /// Tokens per minute, charged as prompt + `max_tokens` and partly refunded.
    pub tokens: Option<Limit>,
}

impl TierLimits {
    /// No limit on either.
    pub const UNLIMITED: Self = Self {
        requests: None,
        tokens: None,
    };
}

/// What is left of a key's quota, as the `x-ratelimit-*` response headers report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Remaining {
    /// Requests that could be admitted now; `None` when requests are unlimited.
    pub requests: Option<u64>,
    /// Tokens that could be charged now; `None` when tokens are unlimited.
    pub tokens: Option<u64>,
    /// Time until the request bucket is full again; zero when full or unlimited.
    pub reset_requests: Duration,
    /// Time until the token bucket is full again; zero when full or unlimited.
    pub reset_tokens: Duration,
}

/// An admitted request: what is left after paying for it, and its receipt.
#[derive(Debug, PartialEq, Eq)]
pub struct Grant {
    /// The quota left after this request was charged.
    pub remaining: Remaining,
    /// Proof of the token charge; give it to [`Quotas::refund`] when the request ends.
    pub receipt: Receipt,
}

/// Identifies one admission's token charge so that it can be refunded once.
///
/// Neither `Clone` nor `Copy`: [`Quotas::refund`] consumes it, so a charge cannot be
/// refunded twice. Dropping it forgoes the refund.
#[derive(Debug, PartialEq, Eq)]
pub struct Receipt {
    /// Admission order within the key's shard, which orders the key's admissions.
    seq: u64,
    /// Token cells charged (zero when tokens were unlimited): the most a refund returns.
    tokens: u64,
}

impl Receipt {
    /// Token cells charged at admission.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// The request quota is spent for now.
    Requests,
    /// The token quota is spent for now.
    Tokens,
    /// The request costs more tokens than the token bucket holds: it can never be
    /// admitted, so a retry is pointless.
    TooLarge,
}

/// A refused request. Nothing was charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Denied {
    /// The limit that refused it; when both did, the one with the longer wait
    /// (requests on a tie).
    pub reason: DenyReason,
    /// The exact wait after which the same request is admitted, if nothing else is
    /// charged meanwhile. Meaningless (zero) for [`DenyReason::TooLarge`], which no wait
    /// cures.
    pub retry_after: Duration,
    /// The quota left, unchanged by the refusal.
    pub remaining: Remaining,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            DenyReason::Requests => write!(
                f,
                "request quota exceeded; retry after {:?}",
                self.retry_after
            ),
            DenyReason::Tokens => {
                write!(
                    f,
                    "token quota exceeded; retry after {:?}",
                    self.retry_after
                )
            }
            DenyReason::TooLarge => f.write_str("request needs more tokens than the quota allows"),
        }
    }
}

impl Error for Denied {}

/// The debts a refund may not cut below: after a charge with sequence `seq`, the bucket
/// carried at least `lag` ticks at every later admission. Seqs and lags both increase,
/// so the first entry after a receipt gives the minimum over everything after it.
#[derive(Debug, Clone, Default)]
struct RefundLog {
    len: usize,
    entries: [(u64, u64); REFUND_LOG],
}

impl RefundLog {
    /// Notes that an admission with sequence `seq` found `debt` ticks in the bucket.
    fn record(&mut self, seq: u64, debt: u128) {
        // Saturating understates the bound, which only shrinks refunds.
        let lag = u64::try_from(debt).unwrap_or(u64::MAX);
        while self.len > 0 && self.entries[self.len - 1].1 >= lag {
            self.len -= 1;
        }
        if self.len == REFUND_LOG {
            // Fold the two oldest into one holding the smaller lag: receipts between
            // them get less back than they could, never more.
            self.entries[1].1 = self.entries[0].1;
            self.entries.copy_within(1.., 0);
            self.len -= 1;
        }
        self.entries[self.len] = (seq, lag);
        self.len += 1;
    }

    fn first_after(&self, seq: u64) -> Option<usize> {
        self.entries[..self.len].iter().position(|e| e.0 > seq)
    }

    /// The most a refund of the charge `seq` may take off the debt.
    fn bound(&self, seq: u64) -> u128 {
        self.first_after(seq)
            .map_or(u128::MAX, |i| u128::from(self.entries[i].1))
    }

    /// Accounts for `seq`'s charge having shrunk by `ticks`: every later admission
    /// found that much less debt.
    fn refunded(&mut self, seq: u64, ticks: u128) {
        let Some(start) = self.first_after(seq) else {
            return;
        };
        let ticks = u64::try_from(ticks).unwrap_or(u64::MAX);
        for entry in &mut self.entries[start..self.len] {
            entry.1 = entry.1.saturating_sub(ticks);
        }
        // Earlier entries no smaller than the new minimum no longer bound anything.
        let min = self.entries[start].1;
        let mut keep = start;
        while keep > 0 && self.entries[keep - 1].1 >= min {
            keep -= 1;
        }
        self.entries.copy_within(start..self.len, keep);
        self.len -= start - keep;
    }
}

/// One key's buckets.
#[derive(Debug, Clone)]
struct State {
    /// When the debts were last brought up to date; never moves back.
    at: Instant,
    /// Request-bucket debt in ticks at `at`.
    requests: u128,
    /// Token-bucket debt in ticks at `at`.
    tokens: u128,
    /// When both debts are repaid at the rates last applied; `None` if beyond what an
    /// `Instant` can hold.
    full_at: Option<Instant>,
    refunds: RefundLog,
}

impl State {
    fn new(now: Instant) -> Self {
        Self {
            at: now,
            requests: 0,
            tokens: 0,
            full_at: Some(now),
            refunds: RefundLog::default(),
        }
    }

    /// The debts at `now`; an instant older than one already seen (threads racing to
    /// the lock) counts as that one.
    fn debts_at(&self, limits: &TierLimits, now: Instant) -> (u128, u128) {
        let elapsed = now.saturating_duration_since(self.at).as_nanos();
        let debt = |limit: Option<Limit>, debt: u128| {
            limit.map_or(0, |l| debt.saturating_sub(l.repaid(elapsed)))
        };
        (
            debt(limits.requests, self.requests),
            debt(limits.tokens, self.tokens),
        )
    }

    fn advance(&mut self, limits: &TierLimits, now: Instant) {
        (self.requests, self.tokens) = self.debts_at(limits, now);
        self.at = self.at.max(now);
    }

    /// Recomputes `full_at` after the debts changed.
    fn settle(&mut self, limits: &TierLimits) {
        let wait =
            |limit: Option<Limit>, debt: u128| limit.map_or(Duration::ZERO, |l| l.wait(debt));
        let wait = wait(limits.requests, self.requests).max(wait(limits.tokens, self.tokens));
        self.full_at = self.at.checked_add(wait);
    }

    fn remaining(&self, limits: &TierLimits) -> Remaining {
        remaining(limits, self.requests, self.tokens)
    }
}

fn remaining(limits: &TierLimits, requests: u128, tokens: u128) -> Remaining {
    Remaining {
        requests: limits.requests.map(|l| l.cells_left(requests)),
        tokens: limits.tokens.map(|l| l.cells_left(tokens)),
        reset_requests: limits.requests.map_or(Duration::ZERO, |l| l.wait(requests)),
        reset_tokens: limits.tokens.map_or(Duration::ZERO, |l| l.wait(tokens)),
    }
}

#[derive(Debug)]
struct Shard<K> {
    keys: HashMap<K, State>,
    /// Admission counter; a key always lands in the same shard, so this orders each
    /// key's admissions across evictions too.
    next_seq: u64,
}

/// Per-key request and token quotas, safe to share between threads.
///
/// Every method takes the current time as `now`; pass instants that do not go back
/// (an older one is treated as the newest already seen for that key).
///
/// The limits may change between calls for one key (a tier edit, or a frontend's split
/// share when the frontend count changes: `super::scope`). The state stays consistent:
/// debts are kept in cells, so a smaller bucket refuses until the debt fits it and a
/// larger one admits at once; the time since a key's last call is repaid at the rate
/// of the call that observes it; a refund passed the limits its charge was made under
/// credits at most that charge's unused cells and never below zero debt.
pub struct Quotas<K> {
    shards: Box<[Mutex<Shard<K>>]>,
    hasher: RandomState,
}

impl<K> fmt::Debug for Quotas<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quotas")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl<K: Eq + Hash + Clone> Default for Quotas<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Eq + Hash + Clone> Quotas<K> {
    /// No keys yet: every key starts with full buckets.
    pub fn new() -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    keys: HashMap::new(),
                    next_seq: 0,
                })
            })
            .collect();
        Self {
            shards,
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, key: &K) -> MutexGuard<'_, Shard<K>> {
        let index = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
        lock(&self.shards[index])
    }

    /// Admits a request costing one request cell and `tokens` token cells when both of
    /// `key`'s buckets can pay, and charges both; otherwise charges nothing.
    ///
    /// # Errors
    ///
    /// [`Denied`] says which limit refused and how long to wait, or that the request is
    /// [`DenyReason::TooLarge`] to ever fit.
    pub fn check(
        &self,
        key: &K,
        limits: &TierLimits,
        tokens: u64,
        now: Instant,
    ) -> Result<Grant, Denied> {
        if limits.requests.is_none() && limits.tokens.is_none() {
            // Nothing to count, so nothing to store.
            return Ok(Grant {
                remaining: Remaining::default(),
                receipt: Receipt { seq: 0, tokens: 0 },
            });
        }
        let mut guard = self.shard(key);
        let shard = &mut *guard;
        match shard.keys.get_mut(key) {
            Some(state) => admit(state, &mut shard.next_seq, limits, tokens, now),
            None => {
                let mut state = State::new(now);
                let decision = admit(&mut state, &mut shard.next_seq, limits, tokens, now);
                // A refused newcomer leaves no trace, so floods of refusals cost no memory.
                if decision.is_ok() {
                    shard.keys.insert(key.clone(), state);
                }
                decision
            }
        }
    }

    /// Gives back `unused_tokens` of the token cells `receipt` charged (at most all of
    /// them), as if the request had been charged only what it used; returns the quota
    /// left afterwards, for the response's metadata.
    ///
    /// The refund is limited to the credit a perfect record would restore (see the
    /// module docs): it never fills the bucket past full, and capacity that was
    /// already given to later requests at a moment the bucket was full is not given
    /// again. Pass the `limits` the request was admitted under.
    pub fn refund(
        &self,
        key: &K,
        limits: &TierLimits,
        receipt: Receipt,
        unused_tokens: u64,
        now: Instant,
    ) -> Remaining {
        let mut guard = self.shard(key);
        let Some(state) = guard.keys.get_mut(key) else {
            // A forgotten key had full buckets, which a refund cannot raise.
            return remaining(limits, 0, 0);
        };
        state.advance(limits, now);
        let unused = unused_tokens.min(receipt.tokens);
        if limits.tokens.is_some() && unused > 0 && state.tokens > 0 {
            let credit = cost(unused).min(state.refunds.bound(receipt.seq));
            state.tokens = state.tokens.saturating_sub(credit);
            state.refunds.refunded(receipt.seq, credit);
            state.settle(limits);
        }
        state.remaining(limits)
    }

    /// The quota `key` has left at `now`, without charging anything.
    pub fn remaining(&self, key: &K, limits: &TierLimits, now: Instant) -> Remaining {
        let guard = self.shard(key);
        let (requests, tokens) = guard
            .keys
            .get(key)
            .map_or((0, 0), |state| state.debts_at(limits, now));
        remaining(limits, requests, tokens)
    }

    /// Forgets every key whose buckets are full at `now` and returns how many.
    ///
    /// Such a key behaves exactly like one never seen, so no later decision changes as
    /// long as later calls pass `now` no earlier than this one and the key's limits
    /// stay the same. When they change, a key is full at the rates of the last check or
    /// refund that looked at it (until then, debt may be judged repaid at the old rate).
    /// Call it periodically to bound memory under floods of distinct keys; each shard
    /// is locked in turn while its keys are scanned.
    pub fn evict_idle(&self, now: Instant) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let mut shard = lock(shard);
                let before = shard.keys.len();
                shard
                    .keys
                    .retain(|_, state| state.full_at.is_none_or(|full| full > now));
                before - shard.keys.len()
            })
            .sum()
    }

    /// Keys with state (buckets not known to be full).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).keys.len()).sum()
    }

    /// Whether no key has state.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| lock(s).keys.is_empty())
    }
}

/// Locks a shard even if a panicking thread poisoned it: every update finishes its
/// arithmetic before it writes, so the state is consistent either way.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn admit(
    state: &mut State,
    next_seq: &mut u64,
    limits: &TierLimits,
    tokens: u64,
    now: Instant,
) -> Result<Grant, Denied> {
    state.advance(limits, now);
    // A refusal changes no debt, but the key's full time follows the limits just applied
    // (they change with a split share's frontend count), so eviction never forgets debt
    // those limits still count.
    state.settle(limits);
    let deny = |reason, retry_after| Denied {
        reason,
        retry_after,
        remaining: state.remaining(limits),
    };
    if limits.tokens.is_some_and(|l| tokens > l.burst) {
        return Err(deny(DenyReason::TooLarge, Duration::ZERO));
    }
    let wait_requests = limits
        .requests
        .map_or(Duration::ZERO, |l| l.wait(l.excess(state.requests, 1)));
    let wait_tokens = limits
        .tokens
        .map_or(Duration::ZERO, |l| l.wait(l.excess(state.tokens, tokens)));
    if wait_requests > Duration::ZERO || wait_tokens > Duration::ZERO {
        return Err(if wait_requests >= wait_tokens {
            deny(DenyReason::Requests, wait_requests)
        } else {
            deny(DenyReason::Tokens, wait_tokens)
        });
    }
    let seq = *next_seq;
    *next_seq += 1;
    if limits.requests.is_some() {
        state.requests += cost(1);
    }
    let charged = if limits.tokens.is_some() { tokens } else { 0 };
    if charged > 0 {
        state.refunds.record(seq, state.tokens);
        state.tokens += cost(charged);
    }
    state.settle(limits);
    Ok(Grant {
        remaining: state.remaining(limits),
        receipt: Receipt {
            seq,
            tokens: charged,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: Duration = Duration::from_secs(1);
    const NS: Duration = Duration::from_nanos(1);

    fn limits(requests: Option<(u64, u64)>, tokens: Option<(u64, u64)>) -> TierLimits {
        TierLimits {
            requests: requests.map(|(r, b)| Limit::new(r, b).unwrap()),
            tokens: tokens.map(|(r, b)| Limit::new(r, b).unwrap()),
        }
    }

    fn requests_only(per_minute: u64, burst: u64) -> TierLimits {
        limits(Some((per_minute, burst)), None)
    }

    fn tokens_only(per_minute: u64, burst: u64) -> TierLimits {
        limits(None, Some((per_minute, burst)))
    }

    #[test]
    fn limits_are_validated() {
        assert_eq!(Limit::new(0, 1), Err(InvalidLimit::ZeroRate));
        assert_eq!(Limit::new(1, 0), Err(InvalidLimit::ZeroBurst));
        assert_eq!(Limit::per_minute(0), Err(InvalidLimit::ZeroRate));
        let l = Limit::per_minute(600).unwrap();
        assert_eq!((l.rate_per_minute(), l.burst()), (600, 600));
    }

    #[test]
    fn first_request_of_a_fresh_key_passes_and_reports_what_is_left() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = limits(Some((60, 10)), Some((6000, 1000)));
        assert_eq!(q.remaining(&"a", &tier, t0).requests, Some(10));
        let g = q.check(&"a", &tier, 100, t0).unwrap();
        assert_eq!(
            g.remaining,
            Remaining {
                requests: Some(9),
                tokens: Some(900),
                reset_requests: SEC,
                reset_tokens: SEC,
            }
        );
        assert_eq!(g.receipt.tokens(), 100);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn burst_then_one_more_waits_exactly_one_emission_interval() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = requests_only(60, 5);
        for _ in 0..5 {
            q.check(&1, &tier, 0, t0).unwrap();
        }
        let denied = q.check(&1, &tier, 0, t0).unwrap_err();
        assert_eq!(denied.reason, DenyReason::Requests);
        assert_eq!(denied.retry_after, SEC);
        assert_eq!(denied.remaining.requests, Some(0));
        assert_eq!(denied.remaining.reset_requests, 5 * SEC);
        assert!(q.check(&1, &tier, 0, t0 + SEC - NS).is_err());
        assert!(q.check(&1, &tier, 0, t0 + SEC).is_ok());
    }

    #[test]
    fn retry_after_is_exact_for_rates_that_do_not_divide_a_minute() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = requests_only(7, 1);
        q.check(&1, &tier, 0, t0).unwrap();
        let wait = q.check(&1, &tier, 0, t0).unwrap_err().retry_after;
        // 60 s / 7 = 8.571428571428… s, rounded up to the nanosecond.
        assert_eq!(wait, Duration::from_nanos(8_571_428_572));
        assert!(q.check(&1, &tier, 0, t0 + wait - NS).is_err());
        assert!(q.check(&1, &tier, 0, t0 + wait).is_ok());
    }

    #[test]
    fn sending_at_exactly_the_limit_is_never_denied() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = requests_only(60, 1);
        for k in 0..1000u32 {
            assert!(q.check(&1, &tier, 0, t0 + k * SEC).is_ok());
        }
        let tier = tokens_only(6000, 100);
        for k in 0..1000u32 {
            assert!(q.check(&2, &tier, 100, t0 + k * SEC).is_ok());
        }
    }

    #[test]
    fn no_rounding_drift_at_rates_that_do_not_divide_a_minute() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = requests_only(7, 5);
        for _ in 0..5 {
            q.check(&1, &tier, 0, t0).unwrap();
        }
        // With the bucket kept empty, the k-th refill lands at exactly k·60/7 s, which is
        // never a whole nanosecond: a rounded emission interval would drift by up to a
        // nanosecond per request and, after enough of them, admit early or deny on time.
        for k in 1..=20_000u64 {
            let due = Duration::from_nanos((k * 60_000_000_000).div_ceil(7));
            assert!(q.check(&1, &tier, 0, t0 + due - NS).is_err(), "early {k}");
            assert!(q.check(&1, &tier, 0, t0 + due).is_ok(), "on time {k}");
        }
    }

    #[test]
    fn a_cost_equal_to_the_burst_passes_only_on_a_full_bucket() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = tokens_only(600, 1000);
        assert!(q.check(&1, &tier, 1000, t0).is_ok());
        assert_eq!(q.remaining(&1, &tier, t0).tokens, Some(0));
        let denied = q.check(&1, &tier, 1000, t0 + 50 * SEC).unwrap_err();
        assert_eq!(denied.reason, DenyReason::Tokens);
        assert_eq!(denied.retry_after, 50 * SEC);
        assert!(q.check(&1, &tier, 1000, t0 + 100 * SEC).is_ok());
    }

    #[test]
    fn a_cost_above_the_burst_is_too_large_and_charges_nothing() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = limits(Some((60, 10)), Some((600, 1000)));
        let denied = q.check(&1, &tier, 1001, t0).unwrap_err();
        assert_eq!(denied.reason, DenyReason::TooLarge);
        assert_eq!(denied.retry_after, Duration::ZERO);
        assert_eq!(denied.remaining.requests, Some(10));
        assert_eq!(denied.remaining.tokens, Some(1000));
        assert!(q.is_empty(), "a refused newcomer is not stored");
        // Too large even when the bucket is also empty: the reason that no wait cures wins.
        q.check(&1, &tier, 1000, t0).unwrap();
        let denied = q.check(&1, &tier, 1001, t0).unwrap_err();
        assert_eq!(denied.reason, DenyReason::TooLarge);
        assert!(denied.to_string().contains("more tokens"));
    }

    #[test]
    fn a_refusal_by_one_limit_charges_neither() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = limits(Some((60, 2)), Some((600, 1000)));
        q.check(&1, &tier, 10, t0).unwrap();
        q.check(&1, &tier, 10, t0).unwrap();
        let denied = q.check(&1, &tier, 10, t0).unwrap_err();
        assert_eq!(denied.reason, DenyReason::Requests);
        assert_eq!(denied.remaining.tokens, Some(980), "tokens untouched");
        let denied = q.check(&1, &tier, 991, t0 + SEC).unwrap_err();
        assert_eq!(denied.reason, DenyReason::Tokens);
        assert_eq!(denied.remaining.requests, Some(1), "requests untouched");
        assert!(q.check(&1, &tier, 990, t0 + SEC).is_ok());
    }

    #[test]
    fn when_both_limits_refuse_the_longer_wait_is_reported() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = limits(Some((60, 1)), Some((60, 10)));
        q.check(&1, &tier, 10, t0).unwrap();
        let denied = q.check(&1, &tier, 5, t0).unwrap_err();
        assert_eq!(denied.reason, DenyReason::Tokens);
        assert_eq!(denied.retry_after, 5 * SEC);
        let denied = q.check(&1, &tier, 0, t0).unwrap_err();
        assert_eq!(denied.reason, DenyReason::Requests);
        assert_eq!(denied.retry_after, SEC);
    }

    #[test]
    fn unlimited_tiers_always_pass_and_store_nothing() {
        let q = Quotas::new();
        let t0 = Instant::now();
        for _ in 0..100 {
            let g = q.check(&1, &TierLimits::UNLIMITED, u64::MAX, t0).unwrap();
            assert_eq!(g.remaining, Remaining::default());
        }
        assert!(q.is_empty());
        let g = q.check(&1, &tokens_only(60, 10), 3, t0).unwrap();
        assert_eq!(g.remaining.requests, None);
        assert_eq!(g.remaining.reset_requests, Duration::ZERO);
    }

    #[test]
    fn idle_time_refills_to_the_burst_and_no_further() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = requests_only(60, 5);
        for _ in 0..5 {
            q.check(&1, &tier, 0, t0).unwrap();
        }
        let later = t0 + 3600 * SEC;
        assert_eq!(q.remaining(&1, &tier, later).requests, Some(5));
        assert_eq!(q.remaining(&1, &tier, later).reset_requests, Duration::ZERO);
        for _ in 0..5 {
            q.check(&1, &tier, 0, later).unwrap();
        }
        assert_eq!(q.check(&1, &tier, 0, later).unwrap_err().retry_after, SEC);
    }

    #[test]
    fn a_refund_restores_the_unused_tokens_at_once() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = tokens_only(60, 1000);
        let g = q.check(&1, &tier, 1000, t0).unwrap();
        let left = q.refund(&1, &tier, g.receipt, 900, t0 + SEC);
        // 1 token refilled in the second, 900 given back.
        assert_eq!(left.tokens, Some(901));
        assert_eq!(left.reset_tokens, 99 * SEC);
        assert!(q.check(&1, &tier, 901, t0 + SEC).is_ok());
        assert!(q.check(&1, &tier, 1, t0 + SEC).is_err());
    }

    #[test]
    fn a_refund_never_fills_a_bucket_past_full() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = tokens_only(60, 100);
        let g = q.check(&1, &tier, 100, t0).unwrap();
        // Half repaid by waiting; refunding all 100 can restore only the other half.
        let left = q.refund(&1, &tier, g.receipt, 100, t0 + 50 * SEC);
        assert_eq!(left.tokens, Some(100));
        assert!(q.check(&1, &tier, 100, t0 + 50 * SEC).is_ok());
        assert!(q.check(&1, &tier, 1, t0 + 50 * SEC).is_err());
        // Unused beyond the charge is ignored.
        let q = Quotas::new();
        let g = q.check(&1, &tier, 10, t0).unwrap();
        let h = q.check(&1, &tier, 50, t0).unwrap();
        assert_eq!(q.refund(&1, &tier, g.receipt, 1000, t0).tokens, Some(50));
        assert_eq!(q.refund(&1, &tier, h.receipt, 20, t0).tokens, Some(70));
    }

    #[test]
    fn a_refund_does_not_return_capacity_already_given_to_later_requests() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = tokens_only(100, 100);
        // A pre-charges the whole bucket, B charges 50 once half has refilled, then A
        // turns out to have used nothing. Had A been charged 0, the bucket would have been
        // full when B came and B would leave 50, not the full bucket a naive refund gives.
        let a = q.check(&1, &tier, 100, t0).unwrap();
        q.check(&1, &tier, 50, t0 + 30 * SEC).unwrap();
        let left = q.refund(&1, &tier, a.receipt, 100, t0 + 31 * SEC);
        let ideal = Quotas::new();
        ideal.check(&1, &tier, 50, t0 + 30 * SEC).unwrap();
        assert_eq!(left, ideal.remaining(&1, &tier, t0 + 31 * SEC));
        assert_eq!(left.tokens.unwrap(), 51);
    }

    #[test]
    fn overlapping_refunds_match_a_history_charged_only_what_was_used() {
        let tier = tokens_only(600, 1000);
        let t0 = Instant::now();
        let q = Quotas::new();
        let a = q.check(&1, &tier, 400, t0).unwrap();
        let b = q.check(&1, &tier, 300, t0 + SEC).unwrap();
        let c = q.check(&1, &tier, 200, t0 + 2 * SEC).unwrap();
        q.refund(&1, &tier, b.receipt, 250, t0 + 3 * SEC);
        q.refund(&1, &tier, a.receipt, 300, t0 + 4 * SEC);
        let left = q.refund(&1, &tier, c.receipt, 100, t0 + 5 * SEC);
        let ideal = Quotas::new();
        ideal.check(&1, &tier, 100, t0).unwrap();
        ideal.check(&1, &tier, 50, t0 + SEC).unwrap();
        ideal.check(&1, &tier, 100, t0 + 2 * SEC).unwrap();
        assert_eq!(left, ideal.remaining(&1, &tier, t0 + 5 * SEC));
    }

    #[test]
    fn a_refund_accounts_for_earlier_refunds() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = tokens_only(60, 100);
        let a = q.check(&1, &tier, 50, t0).unwrap();
        let b = q.check(&1, &tier, 20, t0 + 30 * SEC).unwrap();
        q.check(&1, &tier, 10, t0 + 55 * SEC).unwrap();
        let now = t0 + 55 * SEC;
        // Without b's 20 the bucket was full when the third came, and with neither a's nor
        // b's charge it was full as well: refunding both leaves only the third's 10.
        q.refund(&1, &tier, b.receipt, 20, now);
        let left = q.refund(&1, &tier, a.receipt, 50, now);
        assert_eq!(left.tokens, Some(90));
    }

    #[test]
    fn past_the_refund_log_refunds_err_toward_less_credit() {
        let tier = tokens_only(60, 1000);
        let t0 = Instant::now();
        let q = Quotas::new();
        let mut receipts: Vec<_> = (0..=REFUND_LOG as u64 + 1)
            .map(|i| q.check(&1, &tier, 10 + 20 * i, t0).unwrap().receipt)
            .collect();
        let newest = receipts.pop().unwrap();
        // The newest admission's log entries survived: its refund is exact.
        assert_eq!(q.refund(&1, &tier, newest, 190, t0).tokens, Some(190));
        // The oldest two were folded together: refunding the first (whose true bound is
        // the 10 the second found) restores nothing rather than too much.
        let first = receipts.remove(0);
        let before = q.remaining(&1, &tier, t0).tokens.unwrap();
        assert_eq!(q.refund(&1, &tier, first, 10, t0).tokens, Some(before));
    }

    #[test]
    fn refunds_to_unknown_keys_or_unlimited_tokens_change_nothing() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = limits(Some((60, 10)), None);
        let g = q.check(&1, &tier, 500, t0).unwrap();
        assert_eq!(g.receipt.tokens(), 0);
        assert_eq!(q.refund(&1, &tier, g.receipt, 500, t0).requests, Some(9));
        let tier = tokens_only(60, 10);
        let g = q.check(&2, &tier, 10, t0).unwrap();
        assert_eq!(q.evict_idle(t0 + 10 * SEC), 2);
        assert_eq!(
            q.refund(&2, &tier, g.receipt, 10, t0 + 10 * SEC).tokens,
            Some(10)
        );
        assert!(q.is_empty());
    }

    #[test]
    fn a_refund_after_the_key_was_forgotten_and_reused_gives_nothing() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = tokens_only(60, 10);
        let old = q.check(&1, &tier, 10, t0).unwrap();
        q.evict_idle(t0 + 10 * SEC);
        q.check(&1, &tier, 10, t0 + 10 * SEC).unwrap();
        assert_eq!(
            q.refund(&1, &tier, old.receipt, 10, t0 + 10 * SEC).tokens,
            Some(0)
        );
    }

    #[test]
    fn eviction_drops_only_full_buckets() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = limits(Some((60, 10)), Some((60, 100)));
        q.check(&"idle", &tier, 1, t0).unwrap();
        q.check(&"busy", &tier, 30, t0).unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(q.evict_idle(t0 + SEC - NS), 0);
        assert_eq!(q.evict_idle(t0 + SEC), 1);
        assert_eq!(q.len(), 1);
        assert_eq!(q.remaining(&"busy", &tier, t0 + SEC).tokens, Some(71));
        assert_eq!(q.evict_idle(t0 + 30 * SEC), 1);
        assert!(q.is_empty());
    }

    #[test]
    fn instants_older_than_the_last_seen_count_as_the_last_seen() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = requests_only(60, 1);
        q.check(&1, &tier, 0, t0 + SEC).unwrap();
        let denied = q.check(&1, &tier, 0, t0).unwrap_err();
        assert_eq!(denied.retry_after, SEC);
    }

    #[test]
    fn a_raised_limit_keeps_the_debt_in_cells_and_repays_it_faster() {
        let q = Quotas::new();
        let t0 = Instant::now();
        q.check(&1, &tokens_only(60, 100), 100, t0).unwrap();
        let faster = tokens_only(600, 100);
        assert_eq!(q.remaining(&1, &faster, t0).tokens, Some(0));
        assert_eq!(q.remaining(&1, &faster, t0).reset_tokens, 10 * SEC);
    }

    #[test]
    fn limits_that_change_mid_stream_keep_the_debt_in_cells_and_decide_by_the_new_ones() {
        // A frontend's split share: 60 a minute alone, 20 once three frontends share it.
        let q = Quotas::new();
        let t0 = Instant::now();
        let alone = limits(Some((60, 60)), Some((600, 600)));
        let third = limits(Some((20, 20)), Some((200, 200)));
        let mut receipts: Vec<Receipt> = (0..30)
            .map(|_| q.check(&1, &alone, 10, t0).unwrap().receipt)
            .collect();
        // 30 requests and 300 tokens of debt: more than the new buckets hold.
        assert_eq!(
            q.remaining(&1, &third, t0),
            Remaining {
                requests: Some(0),
                tokens: Some(0),
                reset_requests: 90 * SEC,
                reset_tokens: 90 * SEC,
            }
        );
        // A charge made under the old share, refunded under it: its unused 10 come off.
        q.refund(&1, &alone, receipts.pop().unwrap(), 10, t0);
        assert_eq!(q.remaining(&1, &third, t0).reset_tokens, 87 * SEC);
        // The next request waits until the debt fits the new bucket: 11 cells at 20/min.
        let denied = q.check(&1, &third, 0, t0).unwrap_err();
        assert_eq!(denied.reason, DenyReason::Requests);
        assert_eq!(denied.retry_after, 33 * SEC);
        // That look moved the key's full time to the new rates: it is not forgotten when
        // the old ones would have repaid it.
        assert_eq!(q.evict_idle(t0 + 30 * SEC), 0);
        assert!(q.check(&1, &third, 0, t0 + 33 * SEC - NS).is_err());
        let g = q.check(&1, &third, 0, t0 + 33 * SEC).unwrap();
        assert_eq!(g.remaining.requests, Some(0));
        // Back to one frontend: the same debt in cells (20 requests, 180 tokens), and
        // the whole buckets around it.
        let whole = q.remaining(&1, &alone, t0 + 33 * SEC);
        assert_eq!((whole.requests, whole.tokens), (Some(40), Some(420)));
        for _ in 0..40 {
            q.check(&1, &alone, 0, t0 + 33 * SEC).unwrap();
        }
        assert!(q.check(&1, &alone, 0, t0 + 33 * SEC).is_err());
    }

    #[test]
    fn concurrent_checks_on_one_key_admit_exactly_the_burst() {
        let q = Quotas::new();
        let t0 = Instant::now();
        let tier = limits(Some((1, 1000)), Some((1, 5000)));
        let admitted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..1000)
                            .filter(|_| q.check(&"k", &tier, 3, t0).is_ok())
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 1000);
        assert_eq!(q.remaining(&"k", &tier, t0).tokens, Some(2000));
    }

    // ---- properties ----

    #[derive(Debug, Clone)]
    enum Op {
        Check {
            key: u8,
            dt_ms: u32,
            tokens: u64,
        },
        Refund {
            pick: usize,
            unused_pct: u8,
            dt_ms: u32,
        },
        Evict,
    }

    fn op() -> impl Strategy<Value = Op> {
        op_over(3, 3000)
    }

    fn op_over(keys: u8, max_dt_ms: u32) -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0..keys, 0..max_dt_ms, 0u64..140).prop_map(|(key, dt_ms, tokens)| Op::Check { key, dt_ms, tokens }),
            3 => (any::<usize>(), 0u8..=100, 0..max_dt_ms).prop_map(|(pick, unused_pct, dt_ms)| Op::Refund { pick, unused_pct, dt_ms }),
            1 => Just(Op::Evict),
        ]
    }

    fn tier() -> impl Strategy<Value = TierLimits> {
        (1u64..200, 1u64..20, 1u64..5000, 1u64..130)
            .prop_map(|(rr, rb, tr, tb)| limits(Some((rr, rb)), Some((tr, tb))))
    }

    /// Whether `cells` admitted within `window` respect a rate and burst.
    fn within_bound(limit: Limit, cells: u128, window: Duration) -> bool {
        cells.saturating_sub(u128::from(limit.burst())) * TICKS_PER_CELL
            <= window.as_nanos() * u128::from(limit.rate_per_minute())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Cells used (charged minus refunded, counted at admission) in any window
        /// [t, t + W] never exceed burst + rate·W, refunds included.
        #[test]
        fn usage_in_any_window_is_bounded(tier in tier(), ops in prop::collection::vec(op(), 1..120)) {
            let q = Quotas::new();
            let t0 = Instant::now();
            let mut now = t0;
            // (key, admitted at, tokens used, receipt if not yet refunded)
            let mut log: Vec<(u8, Instant, u64, Option<Receipt>)> = Vec::new();
            for op in ops {
                match op {
                    Op::Check { key, dt_ms, tokens } => {
                        now += Duration::from_millis(dt_ms.into());
                        if let Ok(g) = q.check(&key, &tier, tokens, now) {
                            log.push((key, now, tokens, Some(g.receipt)));
                        }
                    }
                    Op::Refund { pick, unused_pct, dt_ms } => {
                        now += Duration::from_millis(dt_ms.into());
                        if log.is_empty() { continue; }
                        let i = pick % log.len();
                        if let Some(receipt) = log[i].3.take() {
                            let unused = log[i].2 * u64::from(unused_pct) / 100;
                            log[i].2 -= unused;
                            let left = q.refund(&log[i].0, &tier, receipt, unused, now);
                            prop_assert!(left.tokens.unwrap() <= tier.tokens.unwrap().burst());
                        }
                    }
                    Op::Evict => { q.evict_idle(now); }
                }
            }
            for key in 0..3u8 {
                let mine: Vec<_> = log.iter().filter(|e| e.0 == key).collect();
                for (i, first) in mine.iter().enumerate() {
                    let (mut requests, mut tokens) = (0u128, 0u128);
                    for last in &mine[i..] {
                        requests += 1;
                        tokens += u128::from(last.2);
                        let window = last.1 - first.1;
                        prop_assert!(within_bound(tier.requests.unwrap(), requests, window));
                        prop_assert!(within_bound(tier.tokens.unwrap(), tokens, window),
                            "{tokens} tokens in {window:?}");
                    }
                }
            }
        }

        /// After any refunds, the quota left is never more than had every admission been
        /// charged only what it used, and exactly that while the refund log holds every
        /// admission.
        #[test]
        fn refunds_match_a_perfect_record(
            tier in (1u64..300, 20u64..130).prop_map(|(r, b)| limits(Some((1000, 1000)), Some((r, b)))),
            ops in prop::collection::vec(op_over(2, 20_000), 1..40),
        ) {
            let q = Quotas::new();
            let t0 = Instant::now();
            let mut now = t0;
            let mut log: Vec<(u8, Instant, u64, Option<Receipt>)> = Vec::new();
            for op in ops {
                match op {
                    Op::Check { key, dt_ms, tokens } => {
                        now += Duration::from_millis(dt_ms.into());
                        if let Ok(g) = q.check(&key, &tier, tokens, now) {
                            log.push((key, now, tokens, Some(g.receipt)));
                        }
                    }
                    Op::Refund { pick, unused_pct, dt_ms } => {
                        now += Duration::from_millis(dt_ms.into());
                        if log.is_empty() { continue; }
                        let i = pick % log.len();
                        if let Some(receipt) = log[i].3.take() {
                            let unused = log[i].2 * u64::from(unused_pct) / 100;
                            log[i].2 -= unused;
                            q.refund(&log[i].0, &tier, receipt, unused, now);
                        }
                    }
                    Op::Evict => { q.evict_idle(now); }
                }
            }
            let ideal = Quotas::new();
            for (key, at, used, _) in &log {
                prop_assert!(ideal.check(key, &tier, *used, *at).is_ok());
            }
            for key in 0..3u8 {
                let actual = q.remaining(&key, &tier, now);
                let perfect = ideal.remaining(&key, &tier, now);
                prop_assert!(actual.tokens <= perfect.tokens);
                prop_assert!(actual.reset_tokens >= perfect.reset_tokens);
                if log.iter().filter(|e| e.0 == key).count() <= REFUND_LOG {
                    prop_assert_eq!(actual, perfect);
                }
            }
        }

        /// A refused request passes exactly `retry_after` later and not a nanosecond
        /// (or a millisecond, when the wait is that long) sooner.
        #[test]
        fn retry_after_is_exact(tier in tier(), ops in prop::collection::vec((0u32..2000, 0u64..140), 1..80)) {
            let q = Quotas::new();
            let mut now = Instant::now();
            for (dt_ms, tokens) in ops {
                now += Duration::from_millis(dt_ms.into());
                let Err(denied) = q.check(&0, &tier, tokens, now) else { continue };
                if denied.reason == DenyReason::TooLarge {
                    prop_assert!(tokens > tier.tokens.unwrap().burst());
                    continue;
                }
                let wait = denied.retry_after;
                prop_assert!(wait > Duration::ZERO);
                if wait > Duration::from_millis(1) {
                    prop_assert!(q.check(&0, &tier, tokens, now + wait - Duration::from_millis(1)).is_err());
                }
                prop_assert!(q.check(&0, &tier, tokens, now + wait - NS).is_err());
                now += wait;
                prop_assert!(q.check(&0, &tier, tokens, now).is_ok());
            }
        }

        /// Evicting at any point changes no later decision or report.
        #[test]
        fn eviction_changes_no_decision(tier in tier(), ops in prop::collection::vec(op(), 1..150)) {
            let kept = Quotas::new();
            let evicted = Quotas::new();
            let mut now = Instant::now();
            let mut receipts: Vec<(u8, u64, Receipt, Receipt)> = Vec::new();
            for op in ops {
                match op {
                    Op::Check { key, dt_ms, tokens } => {
                        now += Duration::from_millis(dt_ms.into());
                        let a = kept.check(&key, &tier, tokens, now);
                        let b = evicted.check(&key, &tier, tokens, now);
                        match (a, b) {
                            (Ok(a), Ok(b)) => {
                                prop_assert_eq!(a.remaining, b.remaining);
                                receipts.push((key, tokens, a.receipt, b.receipt));
                            }
                            (Err(a), Err(b)) => prop_assert_eq!(a, b),
                            (a, b) => prop_assert!(false, "{a:?} vs {b:?}"),
                        }
                    }
                    Op::Refund { pick, unused_pct, dt_ms } => {
                        now += Duration::from_millis(dt_ms.into());
                        if receipts.is_empty() { continue; }
                        let (key, tokens, a, b) = receipts.swap_remove(pick % receipts.len());
                        let unused = tokens * u64::from(unused_pct) / 100;
                        prop_assert_eq!(
                            kept.refund(&key, &tier, a, unused, now),
                            evicted.refund(&key, &tier, b, unused, now)
                        );
                    }
                    Op::Evict => { evicted.evict_idle(now); }
                }
                for key in 0..3u8 {
                    prop_assert_eq!(kept.remaining(&key, &tier, now), evicted.remaining(&key, &tier, now));
                }
            }
        }
    }
}
