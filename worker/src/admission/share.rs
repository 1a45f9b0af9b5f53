//! Engine share: which queued request may take an engine slot now. A quota bounds how
//! much a tenant gets per minute; this bounds how much of the engine it holds at one
//! moment, so that the first seconds of a flood are as fair as the rest of it.
//!
//! ```text
//!  rank = band × 2 + paced        paced: the tenant is at most 2 s of its request quota
//!                                 ahead of its sustained rate (or has no request quota);
//!                                 a request drawing deeper on its burst is not paced
//!  slots, top down ────────────── a request of rank r starts while the requests in the
//!                                 engine of rank ≥ r are fewer than max_inflight: lower
//!                                 ranks never keep a higher one waiting
//!  the engine ─────────────────── steps only the highest rank it holds; lower ranks pause
//!                                 (keeping their KV cache) until it is done
//!  tenant share, within a band ── a tenant holds at most max_inflight × weight / Σ weight
//!                                 of the band's active tenants (at least 1) while another
//!                                 tenant is active there; alone, it may use every slot
//!  active ─────────────────────── in the engine, queued, or arrived in the last 5 s
//! ```
//!
//! Why pausing rather than sharing the batch: on a batched engine every sequence in a step
//! slows every other (on the 2-vCPU demo, two sequences take 1.5× as long per request as
//! one), so a fair share of slots still multiplies a light tenant's latency by the heavy
//! tenant's batch. Work that a tenant sends beyond its sustained rate — a burst, a flood
//! within its quota — is deferred to the gaps of paced work instead; it still runs at the
//! engine's full speed whenever no paced work is running, so nothing is wasted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::fair_queue::{Band, FairQueue};
use super::gcra::{Remaining, TierLimits};

/// Scheduling ranks: two per band, the paced one above the other.
pub const RANKS: usize = 8;

/// How long a tenant counts as active in its band after its last request arrived: a
/// steady tenant between two requests keeps its share.
pub const ACTIVE_WINDOW: Duration = Duration::from_secs(5);

/// A request is paced while its tenant is at most this many seconds of its request quota
/// ahead of its sustained rate (at least one request).
const PACED_AHEAD_SECONDS: u64 = 2;

/// The scheduling rank of a request of `band`, paced or not (0 lowest … 7 highest).
pub fn rank(band: Band, paced: bool) -> u8 {
    band as u8 * 2 + u8::from(paced)
}

/// Whether a request just charged is paced: its tenant, after the charge, is at most
/// [`PACED_AHEAD_SECONDS`] of its request quota ahead of its sustained rate. Tenants
/// without a request quota are always paced (their share within the band bounds them).
pub fn paced(limits: &TierLimits, after: &Remaining) -> bool {
    match (limits.requests, after.requests) {
        (Some(limit), Some(left)) => {
            let ahead = limit.burst().saturating_sub(left);
            ahead <= (limit.rate_per_minute() * PACED_AHEAD_SECONDS / 60).max(1)
        }
        _ => true,
    }
}

#[derive(Debug)]
struct Use {
    inflight: usize,
    weight: u32,
    last: Instant,
    /// The tenant's tier, once known (for the demand report's quota caps).
    tier: Option<std::sync::Arc<super::tiers::Tier>>,
}

/// Requests in the engine by rank and by tenant, and when each tenant last arrived.
#[derive(Debug, Default)]
pub(super) struct Shares {
    inflight: [usize; RANKS],
    tenants: HashMap<(Band, String), Use>,
}

/// Who is active in each band, taken once per round of decisions.
#[derive(Debug, Clone, Copy)]
pub(super) struct Active {
    weight: [u64; 4],
    tenants: [usize; 4],
}

impl Shares {
    /// Requests in the engine.
    pub(super) fn total(&self) -> usize {
        self.inflight.iter().sum()
    }

    /// Requests `key` holds in the engine in `band`.
    pub(super) fn held(&self, band: Band, key: &str) -> usize {
        self.tenants
            .get(&(band, key.to_string()))
            .map_or(0, |u| u.inflight)
    }

    /// A request of `key` (of `weight`) arrived in `band`.
    pub(super) fn arrived(&mut self, band: Band, key: &str, weight: u32, now: Instant) {
        let u = self.tenants.entry((band, key.to_string())).or_insert(Use {
            inflight: 0,
            weight,
            last: now,
            tier: None,
        });
        u.weight = weight.max(1);
        u.last = now;
    }

    /// [`Shares::arrived`], for a caller whose tier is known.
    pub(super) fn arrived_in(
        &mut self,
        band: Band,
        key: &str,
        tier: &std::sync::Arc<super::tiers::Tier>,
        now: Instant,
    ) {
        self.arrived(band, key, tier.weight, now);
        if let Some(u) = self.tenants.get_mut(&(band, key.to_string())) {
            u.tier = Some(tier.clone());
        }
    }

    /// Every tenant with requests in the system: (key, tier, queued, running), summed
    /// over bands.
    pub(super) fn in_system<T>(
        &self,
        queue: &FairQueue<T>,
    ) -> Vec<(
        String,
        Option<std::sync::Arc<super::tiers::Tier>>,
        usize,
        usize,
    )> {
        let mut out: HashMap<&str, (Option<std::sync::Arc<super::tiers::Tier>>, usize, usize)> =
            HashMap::new();
        for ((band, key), u) in &self.tenants {
            let queued = queue.queued(key, *band);
            if queued == 0 && u.inflight == 0 {
                continue;
            }
            let e = out.entry(key.as_str()).or_insert((None, 0, 0));
            e.0 = e.0.take().or_else(|| u.tier.clone());
            e.1 += queued;
            e.2 += u.inflight;
        }
        out.into_iter()
            .map(|(key, (tier, queued, running))| (key.to_string(), tier, queued, running))
            .collect()
    }

    /// A request of rank `rank` took a slot.
    pub(super) fn started(&mut self, rank: u8, band: Band, key: &str) {
        self.inflight[usize::from(rank)] += 1;
        if let Some(u) = self.tenants.get_mut(&(band, key.to_string())) {
            u.inflight += 1;
        }
    }

    /// A request of rank `rank` gave its slot back.
    pub(super) fn ended(&mut self, rank: u8, band: Band, key: &str) {
        let n = &mut self.inflight[usize::from(rank)];
        *n = n.saturating_sub(1);
        if let Some(u) = self.tenants.get_mut(&(band, key.to_string())) {
            u.inflight = u.inflight.saturating_sub(1);
        }
    }

    /// The active tenants of each band now: in the engine, queued, or arrived within
    /// [`ACTIVE_WINDOW`].
    pub(super) fn active<T>(&self, queue: &FairQueue<T>, now: Instant) -> Active {
        let mut active = Active {
            weight: [0; 4],
            tenants: [0; 4],
        };
        for ((band, key), u) in &self.tenants {
            if u.inflight > 0
                || now.duration_since(u.last) < ACTIVE_WINDOW
                || queue.queued(key, *band) > 0
            {
                active.weight[*band as usize] += u64::from(u.weight.max(1));
                active.tenants[*band as usize] += 1;
            }
        }
        active
    }

    /// Whether a request of `key` (of `weight`), rank `rank` in `band`, may take a slot
    /// now, with at most `max` requests in the engine.
    pub(super) fn may_start(
        &self,
        active: &Active,
        max: usize,
        rank: u8,
        band: Band,
        key: &str,
        weight: u32,
    ) -> bool {
        if self.inflight[usize::from(rank)..].iter().sum::<usize>() >= max {
            return false;
        }
        let b = band as usize;
        if active.tenants[b] <= 1 {
            return true;
        }
        let total = active.weight[b].max(u64::from(weight.max(1)));
        let share = (max as u64 * u64::from(weight.max(1)) / total).max(1);
        (self.held(band, key) as u64) < share
    }

    /// Forgets tenants that are no longer active and hold nothing.
    pub(super) fn forget_idle<T>(&mut self, queue: &FairQueue<T>, now: Instant) {
        self.tenants.retain(|(band, key), u| {
            u.inflight > 0
                || now.duration_since(u.last) < ACTIVE_WINDOW
                || queue.queued(key, *band) > 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::fair_queue::QueueConfig;
    use crate::admission::gcra::Limit;

    fn queue() -> FairQueue<()> {
        FairQueue::new(QueueConfig::default())
    }

    #[test]
    fn ranks_order_bands_first_then_pacing() {
        assert!(rank(Band::Normal, false) < rank(Band::Normal, true));
        assert!(rank(Band::Normal, true) < rank(Band::High, false));
        assert_eq!(rank(Band::Critical, true) as usize, RANKS - 1);
    }

    #[test]
    fn a_request_is_paced_within_two_seconds_of_its_quota() {
        let limits = TierLimits {
            requests: Some(Limit::per_minute(120).expect("limit")),
            tokens: None,
        };
        let left = |n| Remaining {
            requests: Some(n),
            ..Remaining::default()
        };
        // 120 a minute: 4 requests are 2 s of it.
        assert!(paced(&limits, &left(119)));
        assert!(paced(&limits, &left(116)));
        assert!(!paced(&limits, &left(115)));
        let slow = TierLimits {
            requests: Some(Limit::per_minute(6).expect("limit")),
            tokens: None,
        };
        assert!(paced(&slow, &left(5)), "at least one request");
        assert!(paced(&TierLimits::UNLIMITED, &Remaining::default()));
    }

    #[test]
    fn slots_are_counted_from_the_top_rank_down() {
        let mut s = Shares::default();
        let now = Instant::now();
        s.arrived(Band::Normal, "a", 1, now);
        let active = s.active(&queue(), now);
        let low = rank(Band::Normal, false);
        let high = rank(Band::Normal, true);
        for _ in 0..4 {
            assert!(s.may_start(&active, 4, low, Band::Normal, "a", 1));
            s.started(low, Band::Normal, "a");
        }
        // The engine is full of unpaced work: more of it waits, paced work does not.
        assert!(!s.may_start(&active, 4, low, Band::Normal, "a", 1));
        assert!(s.may_start(&active, 4, high, Band::Normal, "a", 1));
        s.ended(low, Band::Normal, "a");
        assert!(s.may_start(&active, 4, low, Band::Normal, "a", 1));
    }

    #[test]
    fn a_tenant_holds_its_weighted_share_while_another_is_active() {
        let mut s = Shares::default();
        let now = Instant::now();
        let r = rank(Band::Normal, true);
        s.arrived(Band::Normal, "flood", 1, now);
        // Alone: every slot.
        let active = s.active(&queue(), now);
        for _ in 0..8 {
            assert!(s.may_start(&active, 8, r, Band::Normal, "flood", 1));
            s.started(r, Band::Normal, "flood");
        }
        for _ in 0..8 {
            s.ended(r, Band::Normal, "flood");
        }
        // With a tenant of weight 3 active: a quarter (2 of 8), however much it asks.
        s.arrived(Band::Normal, "steady", 3, now);
        let active = s.active(&queue(), now);
        let mut held = 0;
        while s.may_start(&active, 8, r, Band::Normal, "flood", 1) {
            s.started(r, Band::Normal, "flood");
            held += 1;
        }
        assert_eq!(held, 2);
        assert!(s.may_start(&active, 8, r, Band::Normal, "steady", 3));
        // Another band's tenants do not count.
        s.arrived(Band::High, "other", 1, now);
        let active = s.active(&queue(), now);
        assert!(!s.may_start(&active, 8, r, Band::Normal, "flood", 1));
        // Once the steady tenant has been quiet for the window, the flood may use the rest.
        let later = now + ACTIVE_WINDOW;
        s.forget_idle(&queue(), later);
        let active = s.active(&queue(), later);
        assert!(s.may_start(&active, 8, r, Band::Normal, "flood", 1));
    }
}
