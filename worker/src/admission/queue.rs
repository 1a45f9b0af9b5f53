//! Queue coordination: the fair queue ([`super::fair_queue`]) and the cap on requests in
//! the engine put together. An admitted request is a [`Reservation`]: its slot now, or its
//! place in the queue until a slot frees up, it is shed for higher-priority work, or its
//! deadline passes. A running request holds a [`Slot`].
//!
//! Each holds its [`Charge`], so whichever way a request leaves — refused on entry,
//! evicted, expired, its client gone while queued or running, finished — dropping it
//! refunds the unused tokens. No path refunds by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tonic::Status;

use super::Admission;
use super::accounting::{Charge, QuotaView};
use super::fair_queue::{Band, FairQueue, Pushed, Ticket};
use super::identity::Caller;
use super::outcome::{Call, Outcome, REPLY_MARGIN, Rejection};
use super::pipeline::Cost;
use super::share::{self, Shares};
use super::status;

/// A queued request, waiting for its slot.
pub(super) struct Waiter {
    tx: oneshot::Sender<Result<Slot, Rejection>>,
    key: String,
    label: String,
    charge: Charge,
    queued_at: Instant,
    /// When it must have finished (the client's deadline), if the client set one.
    finish_by: Option<Instant>,
    max_tokens: u64,
    rank: u8,
    /// Its tier's price of a cached prompt token, in percent of a computed one.
    cached_percent: u32,
}

/// Whose slot [`Admission::take_slot`] makes, and what it is charged.
struct SlotOf {
    key: String,
    /// The tenant label for usage metrics.
    label: String,
    /// Prompt tokens.
    input: u64,
    band: Band,
    /// Its scheduling rank ([`share::rank`]): the engine runs the highest first.
    rank: u8,
    weight: u32,
    /// The pre-charge (prompt + max_tokens), refunded of what was not used as it drops.
    charge: Charge,
    /// Its tier's price of a cached prompt token, in percent of a computed one.
    cached_percent: u32,
}

/// The queue and the requests in the engine (under [`Admission`]'s lock).
pub(super) struct QueueState {
    pub(super) queue: FairQueue<Waiter>,
    pub(super) shares: Shares,
}

impl Admission {
    /// Enters a charged request: a [`Slot`] at once when there is room and nobody waits,
    /// else a place in the fair queue, else a refusal (queue full of equal or higher
    /// priority work, or a deadline too close to finish in time). Never waits itself, so a
    /// refusal is immediate; a refused request's `charge` is dropped, refunding it.
    ///
    /// `finish_by` is the client's deadline: the request must start early enough to
    /// finish its `max_tokens` by then at the recent rate ([`Admission::run_estimate`]).
    /// Without one it must start within the configured default deadline.
    pub(super) fn enter(
        self: &Arc<Self>,
        caller: &Caller,
        band: Band,
        paced: bool,
        cost: Cost,
        charge: Charge,
        finish_by: Option<Instant>,
    ) -> Result<Turn, Rejection> {
        let now = Instant::now();
        let input_tokens = cost.prompt;
        let deadline = match finish_by {
            Some(finish) => {
                let needs = self.run_estimate(cost.max_tokens);
                let start_by = finish.checked_sub(needs).unwrap_or(now);
                if start_by <= now + self.min_service {
                    return Err(status::cannot_finish(
                        needs,
                        finish.saturating_duration_since(now),
                        cost.max_tokens,
                    ));
                }
                start_by
            }
            None => now + self.default_deadline,
        };
        let rank = share::rank(band, paced);
        let weight = caller.tier.weight;
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock();
        st.shares.arrived_in(band, &caller.key, &caller.tier, now);
        if st.queue.is_empty() {
            let active = st.shares.active(&st.queue, now);
            if st
                .shares
                .may_start(&active, self.max_inflight, rank, band, &caller.key, weight)
            {
                let slot = self.take_slot(
                    &mut st,
                    SlotOf {
                        key: caller.key.clone(),
                        label: caller.label.clone(),
                        input: input_tokens,
                        band,
                        rank,
                        weight,
                        charge,
                        cached_percent: caller.tier.cached_prompt_percent,
                    },
                    now,
                );
                self.metrics
                    .set_queue(&st.queue.len_by_band(), st.shares.total());
                return Ok(Turn::Now(slot));
            }
        }
        let pushed = st.queue.push(Ticket {
            tenant: caller.key.clone(),
            band,
            weight,
            input_tokens,
            deadline,
            item: Waiter {
                tx,
                key: caller.key.clone(),
                label: caller.label.clone(),
                charge,
                queued_at: now,
                finish_by,
                max_tokens: cost.max_tokens,
                rank,
                cached_percent: caller.tier.cached_prompt_percent,
            },
        });
        let queued = st.queue.len();
        let id = match pushed {
            Pushed::Queued(id) => id,
            Pushed::QueuedEvicting(id, shed) => {
                let pushback = self.overload_pushback(queued);
                let same_band = shed.band == band;
                let _ = shed
                    .item
                    .tx
                    .send(Err(status::shed_for(band, same_band, pushback)));
                id
            }
            Pushed::Full(refused) => {
                drop(st);
                drop(refused);
                return Err(status::queue_full(
                    queued,
                    band,
                    self.overload_pushback(queued),
                ));
            }
        };
        // It may start at once: a higher rank than the work in the engine, or a tenant
        // under its share behind others that are not.
        self.dispatch(&mut st);
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

    /// The pushback for an overload refusal: how long the queue ahead takes to drain at
    /// the recent service rate (at least 100 ms).
    fn overload_pushback(&self, queued: usize) -> Duration {
        let mean = Duration::from_micros(self.mean_service_us.load(Ordering::Relaxed));
        let drain = mean.mul_f64(queued as f64 / self.max_inflight as f64);
        drain.max(Duration::from_millis(100))
    }

    /// How long a request of `max_tokens` needs before its deadline, at the recent rate
    /// and with margins: (mean + 4 × mean deviation) per generated token — prefill
    /// included — times `max_tokens`, the way TCP sizes a retransmission timeout from
    /// round-trip times; plus a tenth, and the time the reply is sent ahead of the
    /// deadline. (Measured at 3× overload on the demo model, requests started with the
    /// bare estimate to spare ran within a few ms of it, and a few percent missed.) Zero
    /// before any request has finished.
    pub(super) fn run_estimate(&self, max_tokens: u64) -> Duration {
        let mean = self.us_per_token.load(Ordering::Relaxed);
        let dev = self.us_per_token_dev.load(Ordering::Relaxed);
        let run = mean
            .saturating_add(dev.saturating_mul(4))
            .saturating_mul(max_tokens);
        if run == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(run.saturating_add(run / 10)) + REPLY_MARGIN
    }

    /// Folds one finished request's time per generated token into the estimate.
    fn observe_per_token(&self, us: u64) {
        let mean = self.us_per_token.load(Ordering::Relaxed);
        if mean == 0 {
            self.us_per_token.store(us.max(1), Ordering::Relaxed);
            self.us_per_token_dev.store(us / 2, Ordering::Relaxed);
            return;
        }
        let dev = self.us_per_token_dev.load(Ordering::Relaxed);
        // RFC 6298's weights: 1/4 for the deviation, 1/8 for the mean.
        self.us_per_token_dev
            .store((dev * 3 + mean.abs_diff(us)) / 4, Ordering::Relaxed);
        self.us_per_token
            .store(((mean * 7 + us) / 8).max(1), Ordering::Relaxed);
    }

    /// Gives `of` a slot in the engine, started at `now` (caller holds the lock).
    fn take_slot(self: &Arc<Self>, st: &mut QueueState, of: SlotOf, now: Instant) -> Slot {
        st.shares.started(of.rank, of.band, &of.key);
        Slot {
            admission: self.clone(),
            used: AtomicU64::new(of.input),
            cached: AtomicU64::new(0),
            of,
            started: now,
            armed: true,
        }
    }

    /// Hands free slots to the next queued requests that may take one
    /// ([`Shares::may_start`]: by rank from the top, each tenant within its share), in the
    /// fair queue's order (caller holds the lock). A request that can no longer finish by
    /// its deadline at the recent rate is expired instead of started.
    pub(super) fn dispatch(self: &Arc<Self>, st: &mut QueueState) {
        // Who is active does not change within one round: a tenant that starts a request
        // was queued, and is in the engine now.
        let active = st.shares.active(&st.queue, Instant::now());
        loop {
            let now = Instant::now();
            let QueueState { queue, shares } = &mut *st;
            let max = self.max_inflight;
            let Some((_, t)) = queue.pop_where(|t| {
                shares.may_start(&active, max, t.item.rank, t.band, &t.tenant, t.weight)
            }) else {
                break;
            };
            let w = t.item;
            if let Some(finish) = w.finish_by {
                let needs = self.run_estimate(w.max_tokens);
                if now + needs > finish {
                    let rejection = status::cannot_finish(
                        needs,
                        finish.saturating_duration_since(now),
                        w.max_tokens,
                    );
                    let _ = w.tx.send(Err(rejection));
                    continue;
                }
            }
            let slot = self.take_slot(
                st,
                SlotOf {
                    key: w.key,
                    label: w.label,
                    input: t.input_tokens,
                    band: t.band,
                    rank: w.rank,
                    weight: t.weight,
                    charge: w.charge,
                    cached_percent: w.cached_percent,
                },
                now,
            );
            if let Err(Ok(mut slot)) = w.tx.send(Ok(slot)) {
                // The waiter is gone: nobody will use the slot; dropping it refunds all.
                slot.armed = false;
                st.shares.ended(slot.of.rank, slot.of.band, &slot.of.key);
            }
        }
        self.metrics
            .set_queue(&st.queue.len_by_band(), st.shares.total());
    }

    /// Expires the queued requests that can no longer start before their deadline.
    pub(super) fn expire(&self, now: Instant) {
        let mut st = self.lock();
        for (_, t) in st.queue.expire(now, self.min_service) {
            let w = t.item;
            let rejection = status::expired_in_queue(w.queued_at.elapsed(), st.queue.len());
            let _ = w.tx.send(Err(rejection));
        }
        self.metrics
            .set_queue(&st.queue.len_by_band(), st.shares.total());
    }
}

/// An admitted request: charged, and holding its slot or its place in the queue. Dropping
/// it (the client went away, or it is never run) leaves the queue and refunds the charge.
#[derive(Debug)]
pub struct Reservation {
    pub(super) call: Call,
    pub(super) caller: Caller,
    pub(super) band: Band,
    pub(super) turn: Turn,
    pub(super) quota: QuotaView,
}

impl Reservation {
    /// Who is calling.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// The band the request runs in, after its tier's default and cap.
    pub fn band(&self) -> Band {
        self.band
    }

    /// The caller's quota right after the charge: the limits applied and what was left
    /// (for response metadata).
    pub fn quota(&self) -> &QuotaView {
        &self.quota
    }

    /// The slot, now or once the queued requests ahead have run; a refusal meanwhile
    /// (shed for higher-priority work, deadline passed) is noted on the call.
    pub async fn start(self) -> Result<Slot, Status> {
        let result = match self.turn {
            Turn::Now(slot) => Ok(slot),
            Turn::Queued(q) => q.wait().await,
        };
        result.map_err(|r| self.call.refuse(r))
    }
}

/// A request's turn, as [`Admission::enter`] gives it.
#[derive(Debug)]
pub(super) enum Turn {
    /// Run now.
    Now(Slot),
    /// Queued: wait for the slot.
    Queued(QueuedTurn),
}

/// A queued request's claim on a future slot; dropping it (the client went away) takes
/// the request out of the queue.
pub(super) struct QueuedTurn {
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
    async fn wait(mut self) -> Result<Slot, Rejection> {
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

struct CancelOnDrop {
    admission: Arc<Admission>,
    id: Option<u64>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let mut st = self.admission.lock();
            // The cancelled waiter's charge is refunded as it drops.
            drop(st.queue.cancel(id));
            self.admission
                .metrics
                .set_queue(&st.queue.len_by_band(), st.shares.total());
        }
    }
}

/// A request's place in the engine: generated tokens are charged to its tenant's fair
/// share as they come ([`Slot::generated`]); dropping it frees the place for the next
/// queued request and refunds the unused part of the token pre-charge.
pub struct Slot {
    admission: Arc<Admission>,
    of: SlotOf,
    /// Tokens used so far (prompt + generated).
    used: AtomicU64,
    /// Of the prompt's tokens, those served from the prefix cache.
    cached: AtomicU64,
    started: Instant,
    /// False for a slot never handed to its request (it frees nothing when dropped).
    armed: bool,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("band", &self.of.band)
            .field("reserved", &self.of.charge.reserved())
            .finish_non_exhaustive()
    }
}

impl Slot {
    /// The scheduling rank to run the request at in the engine (0 lowest … 7 highest):
    /// while sequences of a higher rank run, lower ones pause.
    pub fn rank(&self) -> u8 {
        self.of.rank
    }

    /// `n` of the prompt's tokens came from the prefix cache: they cost the tier's
    /// `cachedPromptTokenPercent` of a computed token against the token quota (the rest is
    /// refunded when the slot drops) and are counted as `cached_prompt`.
    pub fn cached_prompt(&self, n: u64) {
        self.cached.store(n.min(self.of.input), Ordering::Relaxed);
    }

    /// `n` more generated tokens: charged to the tenant's virtual counter, and not
    /// refunded from the pre-charge.
    pub fn generated(&self, n: u64) {
        self.used.fetch_add(n, Ordering::Relaxed);
        self.admission
            .recent_mut()
            .generated(&self.of.label, n, Instant::now());
        self.admission
            .lock()
            .queue
            .charge_output(&self.of.key, self.of.band, self.of.weight, n);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let a = self.admission.clone();
        let used = self.used.load(Ordering::Relaxed);
        let cached = self.cached.load(Ordering::Relaxed);
        // Usage as it happened, also for requests cancelled part-way: prompt tokens
        // computed, and those served from the prefix cache.
        let t = &a.metrics.tokens;
        t.with_label_values(&[&self.of.label, "prompt"])
            .inc_by(self.of.input - cached);
        t.with_label_values(&[&self.of.label, "cached_prompt"])
            .inc_by(cached);
        t.with_label_values(&[&self.of.label, "completion"])
            .inc_by(used.saturating_sub(self.of.input));
        // The charge refunds the rest when it drops, right after this: the unused output,
        // and the discount on cached prompt tokens (rounded in the tenant's favour).
        let cached_cost = (cached * u64::from(self.of.cached_percent)).div_ceil(100);
        self.of.charge.settle(used - cached + cached_cost);
        let us = self.started.elapsed().as_micros() as u64;
        ewma(&a.mean_service_us, us);
        if let Some(per_token) = us.checked_div(used.saturating_sub(self.of.input)) {
            a.observe_per_token(per_token);
        }
        let mut st = a.lock();
        st.shares.ended(self.of.rank, self.of.band, &self.of.key);
        a.dispatch(&mut st);
    }
}

/// Folds `sample` into the moving average in `cell` (weight 1/8; the first sample sets it).
fn ewma(cell: &AtomicU64, sample: u64) {
    let old = cell.load(Ordering::Relaxed);
    let mean = if old == 0 {
        sample.max(1)
    } else {
        (old * 7 + sample) / 8
    };
    cell.store(mean.max(1), Ordering::Relaxed);
}
