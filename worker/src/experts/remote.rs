//! [`RemoteExperts`]: the frontend's [`ExpertBackend`] over expert-shard processes.
//!
//! ```text
//!  dispatch(layer, rows, routes)            (engine thread; returns at once)
//!    └─ task on the runtime: plan → one Forward per shard, all at once
//!         plan: an expert with one holder goes to it; a replicated one's rows, the
//!               most rows first, in pieces of at least 32 rows, each to the holder
//!               with the least outstanding work (rows in flight + rows planned), ties to the lowest address (a shard
//!               draining an expert, during a placement move, only when no shard holds
//!               it as its own)
//!         a call fails → that shard is benched (backoff) and its experts re-planned on
//!               the other holders; none left → Unavailable for the rows that need them
//!         a shard answers NOT_FOUND (its placement changed under this frontend) → it is
//!               asked `Describe` again at once, not benched, and the rows re-planned
//!  Pending::wait → partial sums added on the host in a fixed order (by smallest expert)
//!  refresh task: resolve DNS (optional), Describe each shard every `refresh`
//! ```
//!
//! Results do not depend on which copy of a whole shard served (`replicaShards`): copies
//! compute the same function, each shard sums its experts in ascending order, and the
//! frontend adds the shards' partial sums in the order of their smallest expert, whichever
//! shard it was. With per-expert replicas (the balanced placement) a row's experts can be
//! grouped over the shards differently from call to call, which changes only the rounding
//! of its sum (in f32, the last bits; the real-node move kept every greedy token).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use switchyard_proto::expert::v1 as pb;
use switchyard_proto::expert::v1::expert_shard_client::ExpertShardClient;
use tonic::transport::{Channel, Endpoint};

use super::{describe_identity, wire};
use crate::model::ModelConfig;
use crate::model::moe::{ExpertBackend, ExpertError, Pending, Routes};

/// Where the shards are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardTargets {
    /// Fixed gRPC addresses (`http://host:port`).
    Static(Vec<String>),
    /// Every address a DNS name resolves to (a headless Service), re-resolved on each
    /// refresh.
    Dns {
        /// The name.
        host: String,
        /// The shards' gRPC port.
        port: u16,
    },
}

impl ShardTargets {
    /// Parses `--expert-shards`: comma-separated addresses, or `dns:///NAME:PORT`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        if let Some(rest) = spec.strip_prefix("dns:///") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("{spec:?}: expected dns:///NAME:PORT"))?;
            let port = port
                .parse()
                .map_err(|_| format!("{spec:?}: {port:?} is not a port"))?;
            return Ok(Self::Dns {
                host: host.to_string(),
                port,
            });
        }
        let addrs: Vec<String> = spec
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| {
                if a.contains("://") {
                    a.to_string()
                } else {
                    format!("http://{a}")
                }
            })
            .collect();
        if addrs.is_empty() {
            return Err("expected at least one shard address (host:port, comma-separated) or dns:///NAME:PORT".into());
        }
        Ok(Self::Static(addrs))
    }
}

/// How the frontend talks to shards.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Where the shards are.
    pub targets: ShardTargets,
    /// The dtype hidden rows travel in.
    pub wire: pb::Dtype,
    /// Deadline of one `Forward` call.
    pub timeout: Duration,
    /// How often every shard is asked `Describe` (and DNS re-resolved).
    pub refresh: Duration,
    /// How long start-up waits for every routed expert to have a holder.
    pub wait: Duration,
}

/// The fewest rows of a replicated expert worth sending to one more of its holders.
const SPLIT_ROWS: usize = 32;

/// Routed experts on expert shards.
#[derive(Debug, Clone)]
pub struct RemoteExperts {
    inner: Arc<Inner>,
    rt: tokio::runtime::Handle,
}

#[derive(Debug)]
struct Inner {
    identity: pb::ModelIdentity,
    hidden: usize,
    moe_layers: Vec<usize>,
    num_experts: u32,
    opts: RemoteOptions,
    links: RwLock<Vec<Arc<Link>>>,
    metrics: RemoteMetrics,
}

#[derive(Debug)]
struct Link {
    addr: String,
    client: ExpertShardClient<Channel>,
    state: Mutex<LinkState>,
    /// Rows in flight to this shard.
    outstanding: AtomicU64,
}

#[derive(Debug, Default)]
struct LinkState {
    up: bool,
    /// Layer → the experts it holds.
    holds: Layered,
    /// Layer → experts served while a placement move hands them to other shards: used
    /// only when no up shard holds the expert.
    draining: Layered,
    revision: String,
    max_request_bytes: u64,
    last_error: String,
    /// Benched after a failed `Forward` until then.
    down_until: Option<Instant>,
    /// Consecutive failed calls (the bench doubles with each, up to 30 s).
    failures: u32,
}

/// Layer → expert ids, as a shard's `Describe` lists them: a plan looks up one layer's.
type Layered = HashMap<u32, HashSet<u32>>;

fn layered(layers: &[pb::LayerExperts]) -> Layered {
    layers
        .iter()
        .map(|l| (l.layer, l.experts.iter().copied().collect()))
        .collect()
}

fn has(set: &Layered, layer: u32, expert: u32) -> bool {
    set.get(&layer).is_some_and(|e| e.contains(&expert))
}

fn count(set: &Layered) -> usize {
    set.values().map(HashSet::len).sum()
}

/// One shard's answer for one layer: rows (of the dispatched batch) and their partial
/// sums, keyed by the smallest expert it computed (the fixed adding order).
#[derive(Debug)]
struct Part {
    key: u32,
    rows: Vec<u32>,
    data: Vec<f32>,
}

impl RemoteExperts {
    /// Connects to the shards of `cfg`'s model and waits (up to `opts.wait`) until every
    /// routed expert has a holder, logging progress; after that it serves anyway (the
    /// requests that need a missing expert fail with `UNAVAILABLE`) and keeps looking.
    pub async fn connect(
        cfg: &ModelConfig,
        identity: pb::ModelIdentity,
        opts: RemoteOptions,
        registry: &Registry,
    ) -> Result<Self, crate::StartError> {
        let moe = cfg.moe.as_ref().ok_or_else(|| {
            crate::StartError::invalid("a dense model has no routed experts to put on shards")
        })?;
        let inner = Arc::new(Inner {
            identity,
            hidden: cfg.hidden_size,
            moe_layers: moe
                .sparse_layers
                .iter()
                .enumerate()
                .filter(|(_, s)| **s)
                .map(|(l, _)| l)
                .collect(),
            num_experts: moe.num_experts as u32,
            opts,
            links: RwLock::new(Vec::new()),
            metrics: RemoteMetrics::new(registry)?,
        });
        inner.refresh().await;
        let started = Instant::now();
        let mut last_log = Instant::now();
        loop {
            let missing = inner.missing();
            if missing == 0 {
                break;
            }
            if started.elapsed() >= inner.opts.wait {
                tracing::warn!(
                    missing,
                    shards = %inner.describe_links(),
                    "serving without every routed expert: requests that need a missing one fail with UNAVAILABLE until a shard holding it is up"
                );
                break;
            }
            if last_log.elapsed() >= Duration::from_secs(5) {
                tracing::info!(missing, shards = %inner.describe_links(), "waiting for expert shards");
                last_log = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            inner.refresh().await;
        }
        tracing::info!(shards = %inner.describe_links(), "expert shards ready");
        let refresher = Arc::downgrade(&inner);
        tokio::spawn(async move {
            loop {
                let Some(inner) = refresher.upgrade() else {
                    return;
                };
                let every = inner.opts.refresh;
                inner.refresh().await;
                drop(inner);
                tokio::time::sleep(every).await;
            }
        });
        Ok(Self {
            inner,
            rt: tokio::runtime::Handle::current(),
        })
    }
}

/// A shard as a frontend last saw it (`GET /expert-load`'s `shards`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardSeen {
    /// Its address.
    pub address: String,
    /// Whether it answered the last `Describe` and is not benched.
    pub up: bool,
    /// The placement revision its last `Describe` reported.
    pub placement_revision: String,
}

impl RemoteExperts {
    /// Every shard this frontend knows, as last described.
    pub fn shards_seen(&self) -> Vec<ShardSeen> {
        self.inner
            .links()
            .iter()
            .map(|l| {
                let s = l.lock();
                ShardSeen {
                    address: l.addr.clone(),
                    up: s.up,
                    placement_revision: s.revision.clone(),
                }
            })
            .collect()
    }

    /// Per MoE layer, the experts each up shard serves: what it holds as its own, and
    /// what it drains that no up shard holds as its own (as calls are planned).
    pub fn holders(&self) -> BTreeMap<usize, Vec<BTreeSet<u32>>> {
        let links = self.inner.links();
        let states: Vec<_> = links.iter().map(|l| l.lock()).collect();
        let up: Vec<_> = states.iter().filter(|s| s.up).collect();
        self.inner
            .moe_layers
            .iter()
            .map(|&layer| {
                let l = layer as u32;
                let owned: HashSet<u32> = up
                    .iter()
                    .filter_map(|s| s.holds.get(&l))
                    .flatten()
                    .copied()
                    .collect();
                let per_shard = up
                    .iter()
                    .map(|s| {
                        let mut held: BTreeSet<u32> =
                            s.holds.get(&l).into_iter().flatten().copied().collect();
                        held.extend(
                            s.draining
                                .get(&l)
                                .into_iter()
                                .flatten()
                                .filter(|e| !owned.contains(e)),
                        );
                        held
                    })
                    .collect();
                (layer, per_shard)
            })
            .collect()
    }

    /// The model's MoE layers (decoder indices) and routed experts per layer.
    pub fn shape(&self) -> (Vec<usize>, usize) {
        (
            self.inner.moe_layers.clone(),
            self.inner.num_experts as usize,
        )
    }

    /// `Err(why)` while some routed expert has no reachable holder (requests that need
    /// it would fail): what the frontend's readiness reports.
    pub fn readiness(&self) -> Result<(), String> {
        match self.inner.missing() {
            0 => Ok(()),
            missing => Err(format!(
                "{missing} routed (layer, expert) pair(s) have no reachable expert shard; shards: {}",
                self.inner.describe_links()
            )),
        }
    }
}

impl Inner {
    fn links(&self) -> Vec<Arc<Link>> {
        self.links
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// `(layer, expert)` pairs without an up holder.
    fn missing(&self) -> usize {
        let links = self.links();
        let states: Vec<_> = links.iter().map(|l| l.lock()).collect();
        let mut missing = 0;
        for &layer in &self.moe_layers {
            for e in 0..self.num_experts {
                let layer = layer as u32;
                if !states
                    .iter()
                    .any(|s| s.up && (has(&s.holds, layer, e) || has(&s.draining, layer, e)))
                {
                    missing += 1;
                }
            }
        }
        missing
    }

    fn describe_links(&self) -> String {
        let links = self.links();
        if links.is_empty() {
            return "none found".into();
        }
        links
            .iter()
            .map(|l| {
                let s = l.lock();
                if s.up {
                    format!("{} up ({} experts)", l.addr, count(&s.holds))
                } else {
                    format!("{} down ({})", l.addr, s.last_error)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Re-resolves the targets and asks every shard what it holds.
    async fn refresh(&self) {
        let addrs = match &self.opts.targets {
            ShardTargets::Static(a) => a.clone(),
            ShardTargets::Dns { host, port } => {
                match tokio::net::lookup_host((host.as_str(), *port)).await {
                    Ok(found) => {
                        let mut a: Vec<String> = found.map(|sa| format!("http://{sa}")).collect();
                        a.sort();
                        a.dedup();
                        a
                    }
                    Err(e) => {
                        tracing::warn!(%host, error = %e, "cannot resolve the expert shards' name; keeping the shards known");
                        self.links().iter().map(|l| l.addr.clone()).collect()
                    }
                }
            }
        };
        let links = {
            let mut links = self
                .links
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            links.retain(|l| {
                let kept = addrs.contains(&l.addr);
                if !kept {
                    // Gone from discovery (a pod replaced, with a new address): its `up`
                    // series goes too, or it would read 1 for a shard no longer called.
                    let _ = self.metrics.up.remove_label_values(&[l.addr.as_str()]);
                }
                kept
            });
            for a in &addrs {
                if links.iter().any(|l| &l.addr == a) {
                    continue;
                }
                match Endpoint::from_shared(a.clone()) {
                    Ok(ep) => {
                        let channel = ep
                            .connect_timeout(Duration::from_secs(1))
                            .tcp_nodelay(true)
                            .connect_lazy();
                        links.push(Arc::new(Link {
                            addr: a.clone(),
                            client: ExpertShardClient::new(channel)
                                .max_decoding_message_size(usize::MAX)
                                .max_encoding_message_size(usize::MAX),
                            state: Mutex::new(LinkState::default()),
                            outstanding: AtomicU64::new(0),
                        }));
                    }
                    Err(e) => tracing::error!(addr = %a, error = %e, "not a valid shard address"),
                }
            }
            links.sort_by(|a, b| a.addr.cmp(&b.addr));
            links.clone()
        };
        let calls = links
            .iter()
            .map(|l| async move { (l, Self::describe(l).await) });
        for (link, answer) in futures::future::join_all(calls).await {
            self.apply(link, answer);
        }
    }

    /// One shard's `Describe`, bounded to 2 s.
    async fn describe(link: &Link) -> Result<pb::DescribeResponse, String> {
        let mut req = tonic::Request::new(pb::DescribeRequest {});
        req.set_timeout(Duration::from_secs(2));
        match tokio::time::timeout(Duration::from_secs(2), link.client.clone().describe(req)).await
        {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Err("Describe timed out".into()),
        }
    }

    /// What a shard's `Describe` answer says of it: up or down, what it holds.
    fn apply(&self, link: &Link, answer: Result<pb::DescribeResponse, String>) {
        let mut s = link.lock();
        let was_up = s.up;
        let benched = s.down_until.is_some_and(|t| Instant::now() < t);
        match answer {
            Ok(d) => {
                if d.model.as_ref() != Some(&self.identity) {
                    s.up = false;
                    s.last_error = format!(
                        "serves {}, not {}",
                        describe_identity(d.model.as_ref()),
                        describe_identity(Some(&self.identity))
                    );
                } else {
                    s.holds = layered(&d.layers);
                    s.draining = layered(&d.draining);
                    s.revision = d.placement_revision;
                    s.max_request_bytes = d.max_request_bytes;
                    s.up = !benched;
                    if !benched {
                        s.last_error.clear();
                    }
                }
            }
            Err(why) => {
                s.up = false;
                s.last_error = why;
            }
        }
        self.metrics
            .up
            .with_label_values(&[&link.addr])
            .set(i64::from(s.up));
        if was_up != s.up {
            if s.up {
                tracing::info!(shard = %link.addr, experts = count(&s.holds), revision = %s.revision, "expert shard up");
            } else {
                tracing::warn!(shard = %link.addr, reason = %s.last_error, "expert shard down");
            }
        }
    }

    /// Runs one layer's routed experts for `pairs` (row, expert, weight) of the `rows ×
    /// hidden` f32 matrix `host`, failing over between holders.
    async fn run_layer(
        self: Arc<Self>,
        layer: usize,
        host: Arc<Vec<f32>>,
        pairs: Vec<(u32, u32, f32)>,
    ) -> Result<Vec<Part>, ExpertError> {
        let mut todo = pairs;
        let mut excluded: HashSet<String> = HashSet::new();
        let mut parts = Vec::new();
        let links = self.links();
        for _ in 0..=links.len() {
            let links = self.links();
            let (plan, missing) = self.plan(layer, &links, &todo, &excluded);
            if !missing.is_empty() {
                return Err(self.unavailable(layer, &todo, &missing, &links));
            }
            let calls = plan
                .into_iter()
                .map(|(link, pairs)| self.call(layer, link, &host, pairs));
            let mut retry = Vec::new();
            for (link, result) in futures::future::join_all(calls).await {
                match result {
                    Ok(part) => parts.push(part),
                    // The shard no longer serves an expert it was thought to hold: its
                    // placement moved. What it holds now decides the next plan.
                    Err((status, pairs)) if status.code() == tonic::Code::NotFound => {
                        tracing::info!(shard = %link.addr, error = %status.message(), "expert shard's placement changed; asking it again");
                        let answer = Self::describe(&link).await;
                        self.apply(&link, answer);
                        self.metrics
                            .failovers
                            .with_label_values(&[&link.addr])
                            .inc();
                        retry.extend(pairs);
                    }
                    Err((status, pairs)) => {
                        self.bench(&link, &status);
                        self.metrics
                            .failovers
                            .with_label_values(&[&link.addr])
                            .inc();
                        excluded.insert(link.addr.clone());
                        retry.extend(pairs);
                    }
                }
            }
            if retry.is_empty() {
                return Ok(parts);
            }
            todo = retry;
        }
        Err(self.unavailable(layer, &todo, &BTreeSet::new(), &self.links()))
    }

    /// Picks holders for the rows of `pairs`: among up, not excluded shards holding each
    /// expert, the only one, or (replicated experts, the most rows first, row by row) the
    /// one with the least outstanding plus already planned rows. Returns the pairs per
    /// chosen shard, and the experts with no holder.
    #[allow(clippy::type_complexity)]
    fn plan(
        &self,
        layer: usize,
        links: &[Arc<Link>],
        pairs: &[(u32, u32, f32)],
        excluded: &HashSet<String>,
    ) -> (Vec<(Arc<Link>, Vec<(u32, u32, f32)>)>, BTreeSet<u32>) {
        let mut by_expert: BTreeMap<u32, Vec<(u32, u32, f32)>> = BTreeMap::new();
        for &p in pairs {
            by_expert.entry(p.1).or_default().push(p);
        }
        let layer = layer as u32;
        // Per usable shard: the experts of this layer it holds, and those it drains.
        let usable: Vec<(usize, HashSet<u32>, HashSet<u32>)> = links
            .iter()
            .enumerate()
            .filter(|(_, l)| !excluded.contains(&l.addr))
            .filter_map(|(i, l)| {
                let s = l.lock();
                let of_layer = |set: &Layered| set.get(&layer).cloned().unwrap_or_default();
                s.up.then(|| (i, of_layer(&s.holds), of_layer(&s.draining)))
            })
            .collect();
        let mut planned = vec![0u64; links.len()];
        let mut out: BTreeMap<usize, Vec<(u32, u32, f32)>> = BTreeMap::new();
        let mut missing = BTreeSet::new();
        let load =
            |i: usize, planned: &[u64]| links[i].outstanding.load(Ordering::Relaxed) + planned[i];
        // Experts with one holder go there; replicated ones after, the most rows first, in
        // pieces of at least SPLIT_ROWS rows, each piece to the holder with the least
        // outstanding plus planned rows: the rows of a hot expert are split over its
        // replicas as the balanced placement assumes and fill in around what the other
        // experts put on each shard, while an expert with few rows goes whole to one holder
        // (each holder that computes an expert reads all of its weights, which costs as
        // much as a few dozen rows on a CPU).
        let mut replicated: Vec<(u32, Vec<(u32, u32, f32)>, Vec<usize>)> = Vec::new();
        for (expert, ps) in by_expert {
            let holders: Vec<usize> = usable
                .iter()
                .filter(|(_, holds, _)| holds.contains(&expert))
                .map(|(i, _, _)| *i)
                .collect();
            let holders = if holders.is_empty() {
                usable
                    .iter()
                    .filter(|(_, _, draining)| draining.contains(&expert))
                    .map(|(i, _, _)| *i)
                    .collect()
            } else {
                holders
            };
            match holders.as_slice() {
                [] => {
                    missing.insert(expert);
                }
                [i] => {
                    planned[*i] += ps.len() as u64;
                    out.entry(*i).or_default().extend(ps);
                }
                _ => replicated.push((expert, ps, holders)),
            }
        }
        replicated.sort_by_key(|(expert, ps, _)| (std::cmp::Reverse(ps.len()), *expert));
        for (_, ps, holders) in replicated {
            let pieces = (ps.len() / SPLIT_ROWS).clamp(1, holders.len());
            let size = ps.len().div_ceil(pieces);
            for piece in ps.chunks(size) {
                let i = holders
                    .iter()
                    .copied()
                    .min_by_key(|&i| (load(i, &planned), i))
                    .unwrap_or(holders[0]);
                planned[i] += piece.len() as u64;
                out.entry(i).or_default().extend_from_slice(piece);
            }
        }
        let plan = out
            .into_iter()
            .map(|(i, ps)| (links[i].clone(), ps))
            .collect();
        (plan, missing)
    }

    fn unavailable(
        &self,
        layer: usize,
        todo: &[(u32, u32, f32)],
        missing: &BTreeSet<u32>,
        links: &[Arc<Link>],
    ) -> ExpertError {
        let experts: BTreeSet<u32> = if missing.is_empty() {
            todo.iter().map(|p| p.1).collect()
        } else {
            missing.clone()
        };
        let rows: BTreeSet<u32> = todo
            .iter()
            .filter(|p| experts.contains(&p.1))
            .map(|p| p.0)
            .collect();
        let list = experts
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let shards = if links.is_empty() {
            "no shards found".to_string()
        } else {
            self.describe_links()
        };
        ExpertError::Unavailable {
            rows: rows.into_iter().collect(),
            message: format!(
                "no reachable expert shard holds layer {layer} expert(s) {list} (shards: {shards})"
            ),
        }
    }

    /// Benches a shard after a failed call: no traffic until a later `Describe`
    /// succeeds and the backoff (1 s, doubling per consecutive failure, at most 30 s) has
    /// passed.
    fn bench(&self, link: &Link, status: &tonic::Status) {
        let mut s = link.lock();
        s.failures = s.failures.saturating_add(1);
        let backoff = Duration::from_secs(1 << s.failures.saturating_sub(1).min(5))
            .min(Duration::from_secs(30));
        s.down_until = Some(Instant::now() + backoff);
        s.up = false;
        s.last_error = format!("{:?}: {}", status.code(), status.message());
        self.metrics.up.with_label_values(&[&link.addr]).set(0);
        tracing::warn!(shard = %link.addr, code = ?status.code(), error = %status.message(), backoff_ms = backoff.as_millis() as u64, "expert shard call failed; routing around it");
    }

    /// One `Forward` to `link` for `pairs`; on failure, the status and the pairs to
    /// re-plan.
    async fn call(
        &self,
        layer: usize,
        link: Arc<Link>,
        host: &[f32],
        pairs: Vec<(u32, u32, f32)>,
    ) -> (
        Arc<Link>,
        Result<Part, (tonic::Status, Vec<(u32, u32, f32)>)>,
    ) {
        let h = self.hidden;
        // The rows this shard needs, ascending, and each one's routes.
        let mut routes: BTreeMap<u32, Vec<pb::ExpertRoute>> = BTreeMap::new();
        for &(row, expert, weight) in &pairs {
            routes
                .entry(row)
                .or_default()
                .push(pb::ExpertRoute { expert, weight });
        }
        let rows: Vec<u32> = routes.keys().copied().collect();
        let routes: Vec<Vec<pb::ExpertRoute>> = routes.into_values().collect();
        // Rows per call within the shard's message limit (prefill chunks of a large model
        // can exceed it), sent one after another: still one call in flight per shard.
        let per_row = h * self.opts.wire.size_bytes().unwrap_or(4)
            + 16 * (pairs.len() / rows.len().max(1) + 1);
        let limit = link.lock().max_request_bytes as usize;
        let chunk = if limit == 0 {
            rows.len()
        } else {
            (limit * 9 / 10 / per_row).max(1)
        };
        let key = pairs.iter().map(|p| p.1).min().unwrap_or(0);
        let n = rows.len() as u64;
        link.outstanding.fetch_add(n, Ordering::Relaxed);
        let started = Instant::now();
        let mut values = Vec::with_capacity(rows.len() * h);
        let mut sent = 0;
        let mut received = 0;
        let mut failure = None;
        for (rs, routes) in rows.chunks(chunk).zip(routes.chunks(chunk)) {
            let mut data = Vec::with_capacity(rs.len() * h);
            for &r in rs {
                data.extend_from_slice(&host[r as usize * h..][..h]);
            }
            let hidden = wire::encode_f32(&data, rs.len(), h, self.opts.wire);
            sent += hidden.data.len() as u64;
            let request = pb::ForwardRequest {
                model: Some(self.identity.clone()),
                layer: layer as u32,
                hidden: Some(hidden),
                routes: routes
                    .iter()
                    .map(|r| pb::RowRoutes { routes: r.clone() })
                    .collect(),
            };
            match self.forward_once(&link, request, rs.len()).await {
                Ok((v, bytes)) => {
                    values.extend(v);
                    received += bytes;
                }
                Err(status) => {
                    failure = Some(status);
                    break;
                }
            }
        }
        link.outstanding.fetch_sub(n, Ordering::Relaxed);
        let m = &self.metrics;
        if let Some(status) = failure {
            return (link, Err((status, pairs)));
        }
        m.latency
            .with_label_values(&[&link.addr])
            .observe(started.elapsed().as_secs_f64());
        m.bytes_sent.with_label_values(&[&link.addr]).inc_by(sent);
        m.bytes_received
            .with_label_values(&[&link.addr])
            .inc_by(received);
        m.expert_rows
            .with_label_values(&[&link.addr])
            .inc_by(pairs.len() as u64);
        link.lock().failures = 0;
        (
            link,
            Ok(Part {
                key,
                rows,
                data: values,
            }),
        )
    }

    /// One `Forward` call with its deadline; the output's values and byte size.
    async fn forward_once(
        &self,
        link: &Link,
        request: pb::ForwardRequest,
        n: usize,
    ) -> Result<(Vec<f32>, u64), tonic::Status> {
        let h = self.hidden;
        let mut req = tonic::Request::new(request);
        req.set_timeout(self.opts.timeout);
        // The client-side timeout bounds the call even if the shard ignores grpc-timeout.
        let answer = tokio::time::timeout(self.opts.timeout, link.client.clone().forward(req))
            .await
            .unwrap_or_else(|_| {
                Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {} ms",
                    self.opts.timeout.as_millis()
                )))
            });
        let code = match &answer {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.metrics
            .calls
            .with_label_values(&[&link.addr, crate::telemetry::status_label(code)])
            .inc();
        let out = answer?
            .into_inner()
            .output
            .ok_or_else(|| tonic::Status::internal("the shard answered without an output"))?;
        if out.shape != [n as u64, h as u64] {
            return Err(tonic::Status::internal(format!(
                "the shard's output has shape {:?}, expected [{n}, {h}]",
                out.shape
            )));
        }
        let values = wire::decode_f32(&out)
            .map_err(|e| tonic::Status::internal(format!("the shard's output: {e}")))?;
        Ok((values, out.data.len() as u64))
    }
}

impl Link {
    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ExpertBackend for RemoteExperts {
    fn dispatch(&self, layer: usize, xs: &Tensor, routes: &Routes) -> Result<Pending, ExpertError> {
        let (rows, hidden) = xs.dims2()?;
        let host = Arc::new(xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        let pairs: Vec<(u32, u32, f32)> = routes.pairs().collect();
        let (device, dtype) = (xs.device().clone(), xs.dtype());
        let task = self
            .rt
            .spawn(self.inner.clone().run_layer(layer, host, pairs));
        let rt = self.rt.clone();
        Ok(Pending::Waiting(Box::new(move || {
            let mut parts = rt.block_on(task).map_err(|e| {
                ExpertError::Compute(candle_core::Error::Msg(format!(
                    "the expert dispatch task failed: {e}"
                )))
            })??;
            // A fixed adding order, whichever shards answered.
            parts.sort_by_key(|p| p.key);
            let mut out = vec![0f32; rows * hidden];
            for p in parts {
                for (i, &r) in p.rows.iter().enumerate() {
                    let dst = &mut out[r as usize * hidden..][..hidden];
                    for (o, x) in dst.iter_mut().zip(&p.data[i * hidden..][..hidden]) {
                        *o += x;
                    }
                }
            }
            Ok(Tensor::from_vec(out, (rows, hidden), &device)?.to_dtype(dtype)?)
        })))
    }

    fn is_remote(&self) -> bool {
        true
    }
}

/// The frontend's metrics about shards, registered into its registry.
///
/// | metric | type | labels |
/// | --- | --- | --- |
/// | `switchyard_expert_rpc_duration_seconds` | histogram | `shard` |
/// | `switchyard_expert_rpcs_total` | counter | `shard`, `status` |
/// | `switchyard_expert_rpc_bytes_sent_total`, `_received_total` | counter | `shard` |
/// | `switchyard_expert_shard_rows_total` | counter | `shard`: (token, expert) pairs served |
/// | `switchyard_expert_failovers_total` | counter | `shard`: calls rerouted away from it |
/// | `switchyard_expert_shard_up` | gauge | `shard` |
#[derive(Debug, Clone)]
struct RemoteMetrics {
    latency: HistogramVec,
    calls: IntCounterVec,
    bytes_sent: IntCounterVec,
    bytes_received: IntCounterVec,
    expert_rows: IntCounterVec,
    failovers: IntCounterVec,
    up: IntGaugeVec,
}

impl RemoteMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let shard = &["shard"];
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "expert_rpc_duration_seconds",
                "Time of one successful ExpertShard.Forward call as the frontend sees it (dispatch + compute + combine transport)",
            )
            .buckets(vec![
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0,
            ]),
            shard,
        )?;
        let calls = IntCounterVec::new(
            Opts::new(
                "expert_rpcs_total",
                "ExpertShard.Forward calls, by shard and gRPC status",
            ),
            &["shard", "status"],
        )?;
        let bytes_sent = IntCounterVec::new(
            Opts::new(
                "expert_rpc_bytes_sent_total",
                "Hidden-row bytes sent to each shard",
            ),
            shard,
        )?;
        let bytes_received = IntCounterVec::new(
            Opts::new(
                "expert_rpc_bytes_received_total",
                "Partial-sum bytes received from each shard",
            ),
            shard,
        )?;
        let expert_rows = IntCounterVec::new(
            Opts::new(
                "expert_shard_rows_total",
                "(token, expert) pairs each shard computed",
            ),
            shard,
        )?;
        let failovers = IntCounterVec::new(
            Opts::new(
                "expert_failovers_total",
                "Forward calls that failed and whose experts were re-planned on other holders",
            ),
            shard,
        )?;
        let up = IntGaugeVec::new(
            Opts::new(
                "expert_shard_up",
                "1 while a shard is reachable, serves this model and is not benched",
            ),
            shard,
        )?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(calls.clone()))?;
        registry.register(Box::new(bytes_sent.clone()))?;
        registry.register(Box::new(bytes_received.clone()))?;
        registry.register(Box::new(expert_rows.clone()))?;
        registry.register(Box::new(failovers.clone()))?;
        registry.register(Box::new(up.clone()))?;
        Ok(Self {
            latency,
            calls,
            bytes_sent,
            bytes_received,
            expert_rows,
            failovers,
            up,
        })
    }
}
