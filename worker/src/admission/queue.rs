//! The admission queue: bounded, strict priority bands, fair shares within a band,
//! deadline-aware.
//!
//! # Order of service
//!
//! A higher [`Band`] is always served before a lower one. Within a band, tenants get
//! fair shares of the work by virtual token counters (VTC; Sheng et al., "Fairness in
//! Serving Large Language Models", OSDI '24): each tenant has a counter that grows by
//! the tokens it is served, input tokens × `input_weight` when its request is popped and
//! generated tokens × `output_weight` as [`FairQueue::charge_output`] reports them, both
//! divided by the tenant's weight. The backlogged tenant with the smallest counter goes
//! next (ties: the earlier ticket), and a tenant's own tickets go first come, first
//! served.
//!
//! # No banked credit
//!
//! Each band keeps a *virtual time*: the counter of the tenant it last served, taken
//! before charging. Every backlogged counter is at least that. A tenant with nothing
//! queued counts as `max(its counter, virtual time)`, and when it becomes backlogged it
//! is lifted to the smallest counter among the other backlogged tenants if that is
//! higher. So a tenant that was idle returns level with the others, not with credit for
//! the time it was away, and output charged while it has nothing queued is added on top
//! of the virtual time, not on top of an older, lower counter.
//!
//! # Memory
//!
//! A counter at or below its band's virtual time equals what the rule above gives a
//! tenant without one, so it is forgotten as soon as the tenant has nothing queued;
//! tenants above it are forgotten as the band's virtual time passes them. Beyond
//! `max(max_queued, 1024)` such idle counters per band, the lowest (closest to the
//! virtual time, so the least credit lost) is forgotten early, which bounds memory
//! whatever the traffic.
//!
//! # Bounds and deadlines
//!
//! At most `max_queued` tickets are held. When full, a newcomer displaces a ticket of the
//! lowest band below its own, else it is refused. A ticket whose deadline passes is never
//! popped; [`FairQueue::expire`] hands it back. Every pushed ticket leaves exactly once:
//! popped, shed, expired or cancelled.
//!
//! Time is passed in as `now`; an instant older than one already seen counts as that one.
//! Every operation is O(log n) in the tickets held, amortized, plus O(log n) per ticket
//! it returns.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::error::Error;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

/// Idle counters a band keeps at least, whatever `max_queued` is.
const MIN_IDLE_TRACKED: usize = 1024;

/// A scheduling priority. A higher band is always served before a lower one and shed
/// after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Band {
    /// Background work that may wait.
    Low,
    /// Ordinary traffic.
    Normal,
    /// Interactive traffic.
    High,
    /// Traffic that must get through when everything else is shed.
    Critical,
}

impl Band {
    /// Every band, lowest first.
    pub const ALL: [Band; 4] = [Band::Low, Band::Normal, Band::High, Band::Critical];

    /// The lower-case name, as tier configs and metric labels spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Band::Low => "low",
            Band::Normal => "normal",
            Band::High => "high",
            Band::Critical => "critical",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Band {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Validated settings of a [`FairQueue`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueConfig {
    max_queued: usize,
    input_weight: f64,
    output_weight: f64,
}

/// Why a [`QueueConfig`] was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidQueueConfig {
    /// `max_queued` was zero.
    ZeroCapacity,
    /// `input_weight` was not a finite number above zero.
    InputWeight,
    /// `output_weight` was not a finite number above zero.
    OutputWeight,
}

impl fmt::Display for InvalidQueueConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ZeroCapacity => "the queue must hold at least one request",
            Self::InputWeight => "the input token weight must be finite and above zero",
            Self::OutputWeight => "the output token weight must be finite and above zero",
        })
    }
}

impl Error for InvalidQueueConfig {}

impl QueueConfig {
    /// A queue of at most `max_queued` tickets, charging each input token
    /// `input_weight` and each generated token `output_weight` (the VTC paper uses 1
    /// and 2: decoding a token costs more than prefilling one).
    ///
    /// # Errors
    ///
    /// When `max_queued` is zero or a weight is not finite and above zero.
    pub fn new(
        max_queued: usize,
        input_weight: f64,
        output_weight: f64,
    ) -> Result<Self, InvalidQueueConfig> {
        let valid = |w: f64| w.is_finite() && w > 0.0;
        if max_queued == 0 {
            Err(InvalidQueueConfig::ZeroCapacity)
        } else if !valid(input_weight) {
            Err(InvalidQueueConfig::InputWeight)
        } else if !valid(output_weight) {
            Err(InvalidQueueConfig::OutputWeight)
        } else {
            Ok(Self {
                max_queued,
                input_weight,
                output_weight,
            })
        }
    }

    /// Most tickets held at once.
    pub fn max_queued(&self) -> usize {
        self.max_queued
    }

    /// Counter charge per input token at weight 1.
    pub fn input_weight(&self) -> f64 {
        self.input_weight
    }

    /// Counter charge per generated token at weight 1.
    pub fn output_weight(&self) -> f64 {
        self.output_weight
    }
}

/// A request waiting for admission.
#[derive(Debug, Clone)]
pub struct Ticket<T> {
    /// Whose share it draws on.
    pub tenant: String,
    /// Its priority.
    pub band: Band,
    /// The tenant's share within the band, relative to other tenants' weights.
    pub weight: NonZeroU32,
    /// Prompt tokens, charged to the tenant's counter when the ticket is popped.
    pub input_tokens: u64,
    /// When the request must have started by: from this instant on it is overdue,
    /// never popped, and handed back by [`FairQueue::expire`].
    pub deadline: Instant,
    /// The caller's payload, such as the channel that starts or answers the request.
    pub item: T,
}

/// Names a pushed ticket, for [`FairQueue::cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TicketId(u64);

/// A ticket accepted by [`FairQueue::push`].
#[derive(Debug)]
pub struct Pushed<T> {
    /// The accepted ticket's id.
    pub id: TicketId,
    /// The ticket displaced to make room, to be answered as overloaded.
    pub shed: Option<Ticket<T>>,
}

/// A tenant counter, ordered totally so that it can key a B-tree. Counters are sums of
/// non-negative finite products, so the order is the usual one.
#[derive(Debug, Clone, Copy)]
struct Counter(f64);

impl PartialEq for Counter {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Counter {}

impl PartialOrd for Counter {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Counter {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[derive(Debug)]
struct Tenant<T> {
    /// Empty while the slot is free.
    name: String,
    counter: f64,
    /// Tickets by id, which is arrival order.
    queued: BTreeMap<u64, Ticket<T>>,
}

/// One band's tenants and their counters.
#[derive(Debug)]
struct BandQueue<T> {
    virtual_time: f64,
    by_name: HashMap<String, usize>,
    /// Slots, reused through `free` so that indices held elsewhere stay valid.
    tenants: Vec<Tenant<T>>,
    free: Vec<usize>,
    /// Backlogged tenants by (counter, id of their oldest ticket).
    backlogged: BTreeMap<(Counter, u64), usize>,
    /// Tenants with nothing queued whose counters are above the virtual time.
    idle: BTreeSet<(Counter, usize)>,
    idle_cap: usize,
}

impl<T> BandQueue<T> {
    fn new(idle_cap: usize) -> Self {
        Self {
            virtual_time: 0.0,
            by_name: HashMap::new(),
            tenants: Vec::new(),
            free: Vec::new(),
            backlogged: BTreeMap::new(),
            idle: BTreeSet::new(),
            idle_cap,
        }
    }

    fn allocate(&mut self, name: &str, counter: f64) -> usize {
        let tenant = Tenant {
            name: name.to_owned(),
            counter,
            queued: BTreeMap::new(),
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.tenants[slot] = tenant;
                slot
            }
            None => {
                self.tenants.push(tenant);
                self.tenants.len() - 1
            }
        };
        self.by_name.insert(name.to_owned(), slot);
        slot
    }

    fn forget(&mut self, slot: usize) {
        let name = std::mem::take(&mut self.tenants[slot].name);
        self.by_name.remove(&name);
        self.free.push(slot);
    }

    /// Files a tenant whose last ticket just left.
    fn settle(&mut self, slot: usize) {
        let counter = self.tenants[slot].counter;
        if counter <= self.virtual_time {
            self.forget(slot);
            return;
        }
        self.idle.insert((Counter(counter), slot));
        while self.idle.len() > self.idle_cap {
            if let Some((_, lowest)) = self.idle.pop_first() {
                self.forget(lowest);
            }
        }
    }

    /// Queues `ticket` as `id`, lifting its tenant if it was not backlogged; returns
    /// the tenant's slot.
    fn enqueue(&mut self, id: u64, ticket: Ticket<T>) -> usize {
        let slot = match self.by_name.get(ticket.tenant.as_str()) {
            Some(&slot) => slot,
            None => self.allocate(&ticket.tenant, self.virtual_time),
        };
        let tenant = &mut self.tenants[slot];
        if tenant.queued.is_empty() {
            self.idle.remove(&(Counter(tenant.counter), slot));
            let others = self
                .backlogged
                .first_key_value()
                .map_or(0.0, |((c, _), _)| c.0);
            tenant.counter = tenant.counter.max(self.virtual_time).max(others);
            self.backlogged.insert((Counter(tenant.counter), id), slot);
        }
        tenant.queued.insert(id, ticket);
        slot
    }

    /// Removes ticket `id` of the tenant in `slot`.
    fn take(&mut self, slot: usize, id: u64) -> Option<Ticket<T>> {
        let tenant = &mut self.tenants[slot];
        let head = *tenant.queued.first_key_value()?.0;
        let ticket = tenant.queued.remove(&id)?;
        if id == head {
            self.backlogged.remove(&(Counter(tenant.counter), head));
            match tenant.queued.first_key_value() {
                Some((&next, _)) => {
                    self.backlogged
                        .insert((Counter(tenant.counter), next), slot);
                }
                None => self.settle(slot),
            }
        }
        Some(ticket)
    }

    /// Pops the oldest ticket of the tenant with the smallest counter and charges its
    /// input tokens.
    fn pop(&mut self, input_weight: f64) -> Option<(u64, Ticket<T>)> {
        let ((counter, _), slot) = self.backlogged.pop_first()?;
        self.virtual_time = self.virtual_time.max(counter.0);
        let tenant = &mut self.tenants[slot];
        let popped = tenant.queued.pop_first();
        if let Some((_, ticket)) = &popped {
            tenant.counter += charge(ticket.input_tokens, input_weight, ticket.weight);
        }
        match tenant.queued.first_key_value() {
            Some((&next, _)) => {
                self.backlogged
                    .insert((Counter(tenant.counter), next), slot);
            }
            None => self.settle(slot),
        }
        while let Some(&(c, idle)) = self.idle.first()
            && c.0 <= self.virtual_time
        {
            self.idle.pop_first();
            self.forget(idle);
        }
        popped
    }

    fn charge(&mut self, name: &str, cost: f64) {
        let Some(&slot) = self.by_name.get(name) else {
            let counter = self.virtual_time + cost;
            if counter > self.virtual_time {
                let slot = self.allocate(name, counter);
                self.settle(slot);
            }
            return;
        };
        let tenant = &mut self.tenants[slot];
        let old = Counter(tenant.counter);
        tenant.counter += cost;
        let new = Counter(tenant.counter);
        match tenant.queued.first_key_value() {
            Some((&head, _)) => {
                self.backlogged.remove(&(old, head));
                self.backlogged.insert((new, head), slot);
            }
            None => {
                self.idle.remove(&(old, slot));
                self.idle.insert((new, slot));
            }
        }
    }

    /// The backlogged tenant with the largest counter and its newest ticket.
    fn shed_candidate(&self) -> Option<u64> {
        let (_, &slot) = self.backlogged.last_key_value()?;
        let (&id, _) = self.tenants[slot].queued.last_key_value()?;
        Some(id)
    }
}

fn charge(tokens: u64, token_weight: f64, weight: NonZeroU32) -> f64 {
    tokens as f64 * token_weight / f64::from(weight.get())
}

/// Hashes ticket ids, which this queue hands out in sequence, so no caller can choose
/// colliding ones and SipHash's protection is not needed: one multiply spreads them.
#[derive(Debug, Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, id: u64) {
        // Fibonacci hashing; hashbrown takes both the low and the high bits.
        self.0 = (self.0 ^ id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Where a held ticket is.
#[derive(Debug, Clone, Copy)]
enum Place {
    /// In its band's tenant queue, in `slot`.
    Queued {
        band: Band,
        slot: usize,
        deadline: Instant,
    },
    /// Past its deadline, waiting for [`FairQueue::expire`].
    Overdue { deadline: Instant },
}

/// A bounded queue of [`Ticket`]s: strict priority between bands, virtual token
/// counters within one, deadlines throughout. See the [module docs](self).
#[derive(Debug)]
pub struct FairQueue<T> {
    config: QueueConfig,
    places: HashMap<u64, Place, BuildHasherDefault<IdHasher>>,
    /// Deadlines of queued tickets.
    deadlines: BTreeSet<(Instant, u64)>,
    /// Tickets whose deadline passed, until `expire` hands them back.
    overdue: BTreeMap<(Instant, u64), Ticket<T>>,
    bands: [BandQueue<T>; 4],
    held: [usize; 4],
    clock: Option<Instant>,
    next_id: u64,
}

impl<T> FairQueue<T> {
    /// An empty queue.
    pub fn new(config: QueueConfig) -> Self {
        let idle_cap = config.max_queued.max(MIN_IDLE_TRACKED);
        Self {
            config,
            places: HashMap::default(),
            deadlines: BTreeSet::new(),
            overdue: BTreeMap::new(),
            bands: std::array::from_fn(|_| BandQueue::new(idle_cap)),
            held: [0; 4],
            clock: None,
            next_id: 0,
        }
    }

    /// The settings it was made with.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Tickets held, overdue ones not yet collected by [`expire`](Self::expire)
    /// included.
    pub fn len(&self) -> usize {
        self.places.len()
    }

    /// Whether no ticket is held.
    pub fn is_empty(&self) -> bool {
        self.places.is_empty()
    }

    /// Tickets held in `band`, overdue ones included.
    pub fn band_len(&self, band: Band) -> usize {
        self.held[band.index()]
    }

    /// The earliest deadline of a held ticket, so that the caller can sleep until then
    /// and call [`expire`](Self::expire). It may already have passed.
    pub fn next_deadline(&self) -> Option<Instant> {
        let queued = self.deadlines.first().map(|&(d, _)| d);
        let overdue = self.overdue.first_key_value().map(|(&(d, _), _)| d);
        queued.into_iter().chain(overdue).min()
    }

    /// `tenant`'s counter in `band`. A tenant the band keeps no counter for gets the
    /// band's virtual time, which is what it would be lifted to.
    pub fn counter(&self, band: Band, tenant: &str) -> f64 {
        let band = &self.bands[band.index()];
        band.by_name
            .get(tenant)
            .map_or(band.virtual_time, |&slot| band.tenants[slot].counter)
    }

    /// Tenant counters kept over all bands (for memory metrics).
    pub fn tracked_tenants(&self) -> usize {
        self.bands.iter().map(|b| b.by_name.len()).sum()
    }

    /// Moves the clock to `now` (never back) and sets aside every ticket whose
    /// deadline it reached.
    fn advance(&mut self, now: Instant) -> Instant {
        let now = self.clock.map_or(now, |clock| clock.max(now));
        self.clock = Some(now);
        while let Some(&(deadline, id)) = self.deadlines.first()
            && deadline <= now
        {
            self.deadlines.pop_first();
            if let Some(Place::Queued { band, slot, .. }) = self.places.get(&id).copied()
                && let Some(ticket) = self.bands[band.index()].take(slot, id)
            {
                self.overdue.insert((deadline, id), ticket);
                self.places.insert(id, Place::Overdue { deadline });
            }
        }
        now
    }

    /// Queues `ticket`, displacing one of a lower band if the queue is full.
    ///
    /// When full, the victim comes from the lowest band below the newcomer's that has
    /// tickets still able to start: the newest ticket of that band's tenant with the
    /// largest counter. That tenant has had the most service and would be served last
    /// anyway, and its newest ticket has waited least, so older waiters are never
    /// starved by a stream of newer ones. A ticket whose deadline has already passed is
    /// accepted if there is room and comes back from the next [`expire`](Self::expire).
    ///
    /// Overdue tickets count against `max_queued` until collected, so call `expire`
    /// before pushing (it is cheap when nothing is due) to keep them from taking room.
    ///
    /// # Errors
    ///
    /// The ticket itself, when the queue is full and holds nothing of a lower band that
    /// could be displaced.
    pub fn push(&mut self, ticket: Ticket<T>, now: Instant) -> Result<Pushed<T>, Ticket<T>> {
        let now = self.advance(now);
        let shed = if self.places.len() >= self.config.max_queued {
            match self.shed_below(ticket.band) {
                Some(victim) => Some(victim),
                None => return Err(ticket),
            }
        } else {
            None
        };
        let id = self.next_id;
        self.next_id += 1;
        let (band, deadline) = (ticket.band, ticket.deadline);
        self.held[band.index()] += 1;
        if deadline <= now {
            self.overdue.insert((deadline, id), ticket);
            self.places.insert(id, Place::Overdue { deadline });
        } else {
            let slot = self.bands[band.index()].enqueue(id, ticket);
            self.deadlines.insert((deadline, id));
            self.places.insert(
                id,
                Place::Queued {
                    band,
                    slot,
                    deadline,
                },
            );
        }
        Ok(Pushed {
            id: TicketId(id),
            shed,
        })
    }

    fn shed_below(&mut self, band: Band) -> Option<Ticket<T>> {
        let id = Band::ALL
            .into_iter()
            .take_while(|&b| b < band)
            .find_map(|b| self.bands[b.index()].shed_candidate())?;
        self.remove(TicketId(id))
    }

    /// Takes the next ticket to serve at `now`: from the highest band with a ticket
    /// that can still start, the oldest ticket of the tenant with the smallest counter.
    /// Charges that tenant's counter for the ticket's input tokens.
    pub fn pop(&mut self, now: Instant) -> Option<Ticket<T>> {
        self.advance(now);
        let input_weight = self.config.input_weight;
        for band in Band::ALL.into_iter().rev() {
            if let Some((id, ticket)) = self.bands[band.index()].pop(input_weight) {
                self.deadlines.remove(&(ticket.deadline, id));
                self.places.remove(&id);
                self.held[band.index()] -= 1;
                return Some(ticket);
            }
        }
        None
    }

    /// Charges `tokens` generated for `tenant` in `band` to its counter, at its `weight`.
    ///
    /// A tenant without a counter gets one at the band's virtual time plus the charge:
    /// output produced while it had nothing queued still counts against its next turn.
    pub fn charge_output(&mut self, tenant: &str, band: Band, weight: NonZeroU32, tokens: u64) {
        let cost = charge(tokens, self.config.output_weight, weight);
        if cost > 0.0 {
            self.bands[band.index()].charge(tenant, cost);
        }
    }

    /// Removes and returns, earliest deadline first, every ticket that can no longer
    /// start in time: those with `deadline <= now + min_service`.
    pub fn expire(&mut self, now: Instant, min_service: Duration) -> Vec<Ticket<T>> {
        let now = self.advance(now);
        let horizon = now.checked_add(min_service);
        let overdue = std::mem::take(&mut self.overdue);
        let mut expired = Vec::with_capacity(overdue.len());
        for ((_, id), ticket) in overdue {
            self.places.remove(&id);
            self.held[ticket.band.index()] -= 1;
            expired.push(ticket);
        }
        while let Some(&(deadline, id)) = self.deadlines.first()
            && horizon.is_none_or(|h| deadline <= h)
        {
            self.deadlines.pop_first();
            expired.extend(self.remove(TicketId(id)));
        }
        expired
    }

    /// Removes ticket `id` (its client went away); `None` if it already left.
    pub fn cancel(&mut self, id: TicketId) -> Option<Ticket<T>> {
        self.remove(id)
    }

    fn remove(&mut self, TicketId(id): TicketId) -> Option<Ticket<T>> {
        let ticket = match self.places.remove(&id)? {
            Place::Queued {
                band,
                slot,
                deadline,
            } => {
                self.deadlines.remove(&(deadline, id));
                self.bands[band.index()].take(slot, id)?
            }
            Place::Overdue { deadline } => self.overdue.remove(&(deadline, id))?,
        };
        self.held[ticket.band.index()] -= 1;
        Some(ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const SEC: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    fn w(weight: u32) -> NonZeroU32 {
        NonZeroU32::new(weight).unwrap()
    }

    fn queue(max_queued: usize) -> FairQueue<u64> {
        FairQueue::new(QueueConfig::new(max_queued, 1.0, 2.0).unwrap())
    }

    fn ticket(
        tenant: &str,
        band: Band,
        input_tokens: u64,
        deadline: Instant,
        item: u64,
    ) -> Ticket<u64> {
        Ticket {
            tenant: tenant.to_owned(),
            band,
            weight: w(1),
            input_tokens,
            deadline,
            item,
        }
    }

    /// Pushes and expects no shedding; returns the id.
    fn put(q: &mut FairQueue<u64>, t: Ticket<u64>, now: Instant) -> TicketId {
        let pushed = q.push(t, now).unwrap();
        assert!(pushed.shed.is_none());
        pushed.id
    }

    fn items(tickets: Vec<Ticket<u64>>) -> Vec<u64> {
        tickets.into_iter().map(|t| t.item).collect()
    }

    #[test]
    fn config_is_validated() {
        assert_eq!(
            QueueConfig::new(0, 1.0, 1.0),
            Err(InvalidQueueConfig::ZeroCapacity)
        );
        assert_eq!(
            QueueConfig::new(1, 0.0, 1.0),
            Err(InvalidQueueConfig::InputWeight)
        );
        assert_eq!(
            QueueConfig::new(1, f64::NAN, 1.0),
            Err(InvalidQueueConfig::InputWeight)
        );
        assert_eq!(
            QueueConfig::new(1, 1.0, f64::INFINITY),
            Err(InvalidQueueConfig::OutputWeight)
        );
        assert_eq!(
            QueueConfig::new(1, 1.0, -2.0),
            Err(InvalidQueueConfig::OutputWeight)
        );
        let c = QueueConfig::new(5, 1.0, 2.0).unwrap();
        assert_eq!(
            (c.max_queued(), c.input_weight(), c.output_weight()),
            (5, 1.0, 2.0)
        );
        assert_eq!(Band::High.to_string(), "high");
        assert!(Band::ALL.windows(2).all(|p| p[0] < p[1]));
    }

    #[test]
    fn a_higher_band_always_goes_first() {
        let t0 = Instant::now();
        let mut q = queue(100);
        let far = t0 + 60 * SEC;
        for (i, band) in [
            Band::Low,
            Band::Normal,
            Band::Critical,
            Band::High,
            Band::Low,
            Band::Critical,
        ]
        .into_iter()
        .enumerate()
        {
            put(&mut q, ticket("a", band, 10, far, i as u64), t0);
        }
        assert_eq!(q.band_len(Band::Low), 2);
        assert_eq!(q.band_len(Band::Critical), 2);
        let order: Vec<_> = std::iter::from_fn(|| q.pop(t0)).map(|t| t.item).collect();
        assert_eq!(order, [2, 5, 3, 1, 0, 4]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_tenant_is_served_first_come_first_served() {
        let t0 = Instant::now();
        let mut q = queue(100);
        for i in 0..10 {
            // Later tickets with earlier deadlines still wait their turn.
            put(
                &mut q,
                ticket(
                    "a",
                    Band::Normal,
                    10 * (10 - i),
                    t0 + (100 - i as u32) * SEC,
                    i,
                ),
                t0,
            );
        }
        let order: Vec<_> = std::iter::from_fn(|| q.pop(t0)).map(|t| t.item).collect();
        assert_eq!(order, (0..10).collect::<Vec<_>>());
    }

    /// Pops `n` tickets, refilling each popped tenant so that everyone stays backlogged;
    /// returns the input tokens served per tenant after each pop.
    fn serve_backlogged(
        q: &mut FairQueue<u64>,
        tenants: &[(&str, u32, u64)],
        n: usize,
        t0: Instant,
    ) -> Vec<HashMap<String, u64>> {
        let far = t0 + 3600 * SEC;
        for &(name, weight, tokens) in tenants {
            for _ in 0..3 {
                let mut t = ticket(name, Band::Normal, tokens, far, 0);
                t.weight = w(weight);
                put(q, t, t0);
            }
        }
        let mut served: HashMap<String, u64> = HashMap::new();
        let mut history = Vec::new();
        for _ in 0..n {
            let t = q.pop(t0).unwrap();
            *served.entry(t.tenant.clone()).or_default() += t.input_tokens;
            let again = Ticket { item: 0, ..t };
            put(q, again, t0);
            history.push(served.clone());
        }
        history
    }

    #[test]
    fn equal_tenants_get_equal_token_service_whatever_their_request_sizes() {
        let t0 = Instant::now();
        let mut q = queue(100);
        let history = serve_backlogged(&mut q, &[("small", 1, 100), ("big", 1, 1000)], 2000, t0);
        for served in &history {
            let small = served.get("small").copied().unwrap_or(0);
            let big = served.get("big").copied().unwrap_or(0);
            assert!(small.abs_diff(big) <= 1000, "{small} vs {big}");
        }
        let last = history.last().unwrap();
        assert!(last["small"] > 90_000 && last["big"] > 90_000);
    }

    #[test]
    fn weights_set_the_shares() {
        let t0 = Instant::now();
        let mut q = queue(100);
        let history = serve_backlogged(&mut q, &[("gold", 2, 100), ("bronze", 1, 100)], 3000, t0);
        let last = history.last().unwrap();
        assert_eq!(last["gold"] + last["bronze"], 300_000);
        assert!(last["gold"].abs_diff(2 * last["bronze"]) <= 200, "{last:?}");
    }

    #[test]
    fn a_returning_tenant_shares_rather_than_monopolises() {
        let t0 = Instant::now();
        let mut q = queue(1000);
        let far = t0 + 3600 * SEC;
        serve_backlogged(&mut q, &[("a", 1, 100), ("c", 1, 100)], 1000, t0);
        // "b" was away while a and c were served 50 000 tokens each.
        for i in 0..50 {
            put(&mut q, ticket("b", Band::Normal, 100, far, i), t0);
        }
        assert_eq!(
            q.counter(Band::Normal, "b"),
            q.counter(Band::Normal, "a")
                .min(q.counter(Band::Normal, "c"))
        );
        let mut order = String::new();
        for _ in 0..30 {
            let t = q.pop(t0).unwrap();
            order.push_str(&t.tenant);
            if t.tenant != "b" {
                put(&mut q, Ticket { item: 0, ..t }, t0);
            }
        }
        // Round robin: every three pops serve each tenant once (ties go to the older ticket).
        for round in order.as_bytes().chunks(3) {
            let mut round = round.to_vec();
            round.sort_unstable();
            assert_eq!(round, b"abc", "{order}");
        }
    }

    #[test]
    fn an_idle_tenant_banks_no_credit_even_when_alone() {
        let t0 = Instant::now();
        let far = t0 + 3600 * SEC;
        let mut q = queue(100);
        for i in 0..100 {
            put(&mut q, ticket("a", Band::Normal, 100, far, i), t0);
        }
        while q.pop(t0).is_some() {}
        // Nobody is backlogged; b is lifted to the virtual time (a's last start), not 0.
        put(&mut q, ticket("b", Band::Normal, 100, far, 0), t0);
        assert_eq!(q.counter(Band::Normal, "b"), 9900.0);
        for i in 0..10 {
            put(&mut q, ticket("a", Band::Normal, 100, far, i), t0);
            put(&mut q, ticket("b", Band::Normal, 100, far, i), t0);
        }
        let order: String = std::iter::from_fn(|| q.pop(t0)).map(|t| t.tenant).collect();
        assert!(!order.contains("bbb"), "{order}");
    }

    #[test]
    fn output_charges_move_a_tenant_back() {
        let t0 = Instant::now();
        let far = t0 + 3600 * SEC;
        let mut q = queue(100);
        for i in 0..3 {
            put(&mut q, ticket("a", Band::Normal, 10, far, i), t0);
            put(&mut q, ticket("b", Band::Normal, 10, far, 10 + i), t0);
        }
        assert_eq!(q.pop(t0).unwrap().tenant, "a");
        q.charge_output("a", Band::Normal, w(2), 100);
        assert_eq!(q.counter(Band::Normal, "a"), 10.0 + 100.0);
        let order: String = (0..4).map(|_| q.pop(t0).unwrap().tenant).collect();
        assert_eq!(order, "bbba");
        // A tenant without a counter is charged from the band's virtual time.
        q.charge_output("x", Band::Normal, w(1), 5);
        assert_eq!(
            q.counter(Band::Normal, "x"),
            q.counter(Band::Normal, "nobody") + 10.0
        );
        q.charge_output("y", Band::Low, w(1), 0);
        // b, drained and passed by the virtual time (a's start), needs no counter.
        assert_eq!(
            q.counter(Band::Normal, "b"),
            q.counter(Band::Normal, "nobody")
        );
        assert_eq!(q.tracked_tenants(), 2);
    }

    #[test]
    fn overdue_tickets_are_never_popped_and_expire_returns_exactly_the_late_ones() {
        let t0 = Instant::now();
        let mut q = queue(100);
        put(&mut q, ticket("a", Band::High, 1, t0 + SEC, 1), t0);
        put(&mut q, ticket("a", Band::High, 1, t0 + 2 * SEC, 2), t0);
        put(&mut q, ticket("b", Band::Low, 1, t0 + 3 * SEC, 3), t0);
        put(&mut q, ticket("b", Band::Low, 1, t0 + 10 * SEC, 4), t0);
        assert_eq!(q.next_deadline(), Some(t0 + SEC));
        // At exactly its deadline a ticket can no longer start.
        assert_eq!(q.pop(t0 + 2 * SEC).map(|t| t.item), Some(3));
        assert_eq!(q.len(), 3, "overdue tickets are held until collected");
        assert_eq!(q.next_deadline(), Some(t0 + SEC));
        assert_eq!(items(q.expire(t0 + 2 * SEC, Duration::ZERO)), [1, 2]);
        assert_eq!(q.next_deadline(), Some(t0 + 10 * SEC));
        assert!(q.expire(t0 + 2 * SEC, 8 * SEC - MS).is_empty());
        assert_eq!(items(q.expire(t0 + 2 * SEC, 8 * SEC)), [4]);
        assert!(q.is_empty() && q.next_deadline().is_none());
        assert_eq!(q.band_len(Band::High) + q.band_len(Band::Low), 0);
    }

    #[test]
    fn a_ticket_pushed_past_its_deadline_comes_back_from_expire() {
        let t0 = Instant::now();
        let mut q = queue(10);
        put(&mut q, ticket("a", Band::Normal, 1, t0, 7), t0);
        assert!(q.pop(t0).is_none());
        assert_eq!(q.len(), 1);
        assert_eq!(items(q.expire(t0, Duration::ZERO)), [7]);
    }

    #[test]
    fn a_full_queue_sheds_the_newest_ticket_of_the_most_served_tenant_in_the_lowest_band() {
        let t0 = Instant::now();
        let far = t0 + 60 * SEC;
        let mut q = queue(4);
        put(&mut q, ticket("x", Band::Low, 10, far, 1), t0);
        put(&mut q, ticket("x", Band::Low, 10, far, 2), t0);
        put(&mut q, ticket("y", Band::Low, 10, far, 3), t0);
        put(&mut q, ticket("z", Band::Normal, 10, far, 4), t0);
        q.charge_output("x", Band::Low, w(1), 100);
        // Same band as the lowest held: the newcomer is refused.
        let refused = q.push(ticket("y", Band::Low, 10, far, 5), t0).unwrap_err();
        assert_eq!(refused.item, 5);
        let shed = q
            .push(ticket("z", Band::High, 10, far, 6), t0)
            .unwrap()
            .shed
            .unwrap();
        assert_eq!(shed.item, 2);
        let shed = q
            .push(ticket("z", Band::Normal, 10, far, 7), t0)
            .unwrap()
            .shed
            .unwrap();
        assert_eq!(shed.item, 1);
        let shed = q
            .push(ticket("z", Band::Critical, 10, far, 8), t0)
            .unwrap()
            .shed
            .unwrap();
        assert_eq!(shed.item, 3);
        assert_eq!(q.band_len(Band::Low), 0);
        assert_eq!(
            q.push(ticket("z", Band::Normal, 10, far, 9), t0)
                .unwrap_err()
                .item,
            9
        );
        assert_eq!(q.len(), 4);
    }

    #[test]
    fn cancel_removes_exactly_once() {
        let t0 = Instant::now();
        let mut q = queue(10);
        let a = put(&mut q, ticket("a", Band::Normal, 1, t0 + SEC, 1), t0);
        let b = put(&mut q, ticket("a", Band::Normal, 1, t0 + 5 * SEC, 2), t0);
        let c = put(&mut q, ticket("b", Band::Normal, 1, t0 + 5 * SEC, 3), t0);
        assert_eq!(q.cancel(b).map(|t| t.item), Some(2));
        assert!(q.cancel(b).is_none());
        // An overdue ticket can be cancelled too.
        assert_eq!(q.pop(t0 + 2 * SEC).map(|t| t.item), Some(3));
        assert!(q.cancel(c).is_none());
        assert_eq!(q.cancel(a).map(|t| t.item), Some(1));
        assert!(q.is_empty() && q.next_deadline().is_none());
        assert!(q.expire(t0 + 100 * SEC, Duration::ZERO).is_empty());
    }

    #[test]
    fn counters_of_departed_tenants_do_not_accumulate() {
        let t0 = Instant::now();
        let far = t0 + 3600 * SEC;
        let mut q = queue(10);
        for round in 0..10_000u64 {
            put(
                &mut q,
                ticket(&format!("bot{round}"), Band::Normal, 5, far, round),
                t0,
            );
            put(&mut q, ticket("steady", Band::Normal, 5, far, round), t0);
            q.pop(t0).unwrap();
            q.pop(t0).unwrap();
        }
        assert!(q.tracked_tenants() <= 3, "{}", q.tracked_tenants());
        // Idle counters above the virtual time are capped even when nothing advances it.
        for i in 0..5000u64 {
            q.charge_output(&format!("ghost{i}"), Band::Low, w(1), 1 + i);
        }
        assert!(q.tracked_tenants() <= MIN_IDLE_TRACKED + 3);
        assert_eq!(
            q.counter(Band::Low, "ghost4999"),
            2.0 * 5000.0,
            "the highest are kept"
        );
    }

    // ---- properties ----

    #[derive(Debug, Clone)]
    enum Op {
        Push {
            tenant: u8,
            band: u8,
            tokens: u64,
            life_ms: u64,
        },
        Pop,
        Cancel(usize),
        Expire {
            min_service_ms: u64,
        },
        Charge {
            tenant: u8,
            band: u8,
            tokens: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..5, 0u8..4, 0u64..50, 0u64..400).prop_map(|(tenant, band, tokens, life_ms)| Op::Push { tenant, band, tokens, life_ms }),
            4 => Just(Op::Pop),
            1 => any::<usize>().prop_map(Op::Cancel),
            1 => (0u64..100).prop_map(|min_service_ms| Op::Expire { min_service_ms }),
            1 => (0u8..5, 0u8..4, 0u64..50).prop_map(|(tenant, band, tokens)| Op::Charge { tenant, band, tokens }),
        ]
    }

    #[derive(Debug, Clone)]
    struct Model {
        band: Band,
        tenant: String,
        deadline: Instant,
    }

    /// Records that ticket `item` left the queue, which must have held it.
    fn leave(
        item: u64,
        held: &mut BTreeMap<u64, Model>,
        left: &mut HashSet<u64>,
    ) -> Result<Model, TestCaseError> {
        prop_assert!(left.insert(item), "ticket {item} left twice");
        held.remove(&item)
            .ok_or_else(|| TestCaseError::fail(format!("ticket {item} was not held")))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn behaves_like_a_naive_model(max in 1usize..12, steps in prop::collection::vec((op(), 0u64..60), 1..200)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut q = queue(max);
            let mut held: BTreeMap<u64, Model> = BTreeMap::new();
            let mut ids: Vec<(TicketId, u64)> = Vec::new();
            let mut left: HashSet<u64> = HashSet::new();
            let mut pushed = 0u64;
            for (op, dt) in steps {
                now += Duration::from_millis(dt);
                // Tickets that can still start, by band.
                let live = |held: &BTreeMap<u64, Model>, band: Band| held.values().any(|m| m.band == band && m.deadline > now);
                match op {
                    Op::Push { tenant, band, tokens, life_ms } => {
                        let band = Band::ALL[usize::from(band)];
                        let item = pushed;
                        pushed += 1;
                        let t = ticket(&format!("t{tenant}"), band, tokens, now + Duration::from_millis(life_ms), item);
                        let model = Model { band, tenant: t.tenant.clone(), deadline: t.deadline };
                        let full = held.len() >= max;
                        let lowest_live = Band::ALL.into_iter().find(|&b| live(&held, b));
                        match q.push(t, now) {
                            Ok(p) => {
                                match p.shed {
                                    Some(s) => {
                                        prop_assert!(full);
                                        prop_assert_eq!(Some(s.band), lowest_live);
                                        prop_assert!(s.band < band);
                                        leave(s.item, &mut held, &mut left)?;
                                    }
                                    None => prop_assert!(!full),
                                }
                                held.insert(item, model);
                                ids.push((p.id, item));
                            }
                            Err(t) => {
                                prop_assert!(full);
                                prop_assert!(lowest_live.is_none_or(|b| b >= band));
                                prop_assert_eq!(t.item, item);
                                left.insert(item);
                            }
                        }
                    }
                    Op::Pop => match q.pop(now) {
                        Some(t) => {
                            prop_assert!(t.deadline > now);
                            prop_assert!(!Band::ALL.into_iter().any(|b| b > t.band && live(&held, b)));
                            // First come, first served within the tenant and band.
                            let first = held.iter().find(|(_, m)| m.tenant == t.tenant && m.band == t.band && m.deadline > now).map(|(&i, _)| i);
                            prop_assert_eq!(first, Some(t.item));
                            leave(t.item, &mut held, &mut left)?;
                        }
                        None => prop_assert!(!Band::ALL.into_iter().any(|b| live(&held, b))),
                    },
                    Op::Cancel(pick) => {
                        if ids.is_empty() { continue; }
                        let (id, item) = ids[pick % ids.len()];
                        match q.cancel(id) {
                            Some(t) => {
                                prop_assert_eq!(t.item, item);
                                leave(item, &mut held, &mut left)?;
                            }
                            None => prop_assert!(!held.contains_key(&item)),
                        }
                    }
                    Op::Expire { min_service_ms } => {
                        let horizon = now + Duration::from_millis(min_service_ms);
                        let mut want: Vec<(Instant, u64)> = held.iter().filter(|(_, m)| m.deadline <= horizon).map(|(&i, m)| (m.deadline, i)).collect();
                        want.sort();
                        let got: Vec<(Instant, u64)> = q.expire(now, Duration::from_millis(min_service_ms)).into_iter().map(|t| (t.deadline, t.item)).collect();
                        prop_assert_eq!(&got, &want);
                        for (_, item) in got { leave(item, &mut held, &mut left)?; }
                    }
                    Op::Charge { tenant, band, tokens } => {
                        q.charge_output(&format!("t{tenant}"), Band::ALL[usize::from(band)], w(1), tokens);
                    }
                }
                prop_assert_eq!(q.len(), held.len());
                prop_assert!(q.len() <= max);
                for band in Band::ALL {
                    prop_assert_eq!(q.band_len(band), held.values().filter(|m| m.band == band).count());
                }
                let next = held.values().map(|m| m.deadline).min();
                prop_assert_eq!(q.next_deadline(), next);
            }
            // Drain: everything still held leaves now, and then every ticket has left once.
            for t in q.expire(now + 3600 * SEC, Duration::ZERO) { leave(t.item, &mut held, &mut left)?; }
            prop_assert!(held.is_empty() && q.is_empty());
            prop_assert_eq!(left.len() as u64, pushed);
        }

        /// With every tenant always backlogged at equal weight, counters stay within the
        /// largest single request's cost of each other (the VTC bound).
        #[test]
        fn counters_of_backlogged_tenants_stay_within_one_request(
            tenants in 2usize..6,
            requests in prop::collection::vec((0u64..2000, 0u64..500), 1..300),
        ) {
            let t0 = Instant::now();
            let far = t0 + 3600 * SEC;
            let mut q = queue(1000);
            let name = |i: usize| format!("t{i}");
            let mut largest = 0.0f64;
            let mut sizes = requests.iter().cycle();
            for i in 0..tenants {
                for _ in 0..2 {
                    let &(input, _) = sizes.next().unwrap();
                    put(&mut q, ticket(&name(i), Band::Normal, input, far, 0), t0);
                }
            }
            for &(_, output) in &requests {
                let t = q.pop(t0).unwrap();
                q.charge_output(&t.tenant, Band::Normal, w(1), output);
                largest = largest.max(t.input_tokens as f64 + 2.0 * output as f64);
                let &(input, _) = sizes.next().unwrap();
                put(&mut q, ticket(&t.tenant, Band::Normal, input, far, 0), t0);
                let counters: Vec<f64> = (0..tenants).map(|i| q.counter(Band::Normal, &name(i))).collect();
                let spread = counters.iter().fold(f64::MIN, |a, &b| a.max(b)) - counters.iter().fold(f64::MAX, |a, &b| a.min(b));
                prop_assert!(spread <= largest, "spread {spread} > {largest}: {counters:?}");
            }
        }
    }
}
