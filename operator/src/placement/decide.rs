//! The balanced placement's decisions, pure: the frontends' reports merged into loads, a
//! whole-model plan, its imbalance, whether to move, the placement file of each phase of
//! a move, and whether every shard and frontend has taken a revision up.
//!
//! ```text
//!  /expert-load × frontends ─ merge ─> Loads ─┬─ imbalance(current) ─┐
//!                                             └─ plan ─> imbalance ──┴─> verdict: Move | Hold(why)
//!  Move:  file(new, draining = old − new)  ── shards /load + frontends' view ── confirmed?
//!         ─> file(new)                        (the lost experts are freed)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::plan::{self, LayerPlacement, PlanError};

/// Routed tokens per MoE layer below which the load is too thin to plan from: the mean
/// over the layers, summed over the frontends, in their last-minute windows.
pub const MIN_TOKENS_PER_LAYER: f64 = 200.0;
/// A plan must lower the imbalance by at least this fraction to be worth a move.
pub const MIN_GAIN: f64 = 0.05;

/// One layer of a frontend's `GET /expert-load` (the worker's
/// `switchyard_worker::frontend::expert_load::LayerLoad`; this crate does not depend on
/// the worker).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LayerReport {
    /// Its decoder layer index.
    pub layer: usize,
    /// Routed tokens per expert id.
    pub load: Vec<u64>,
}

/// A shard as a frontend last saw it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardSeen {
    pub address: String,
    pub up: bool,
    #[serde(default)]
    pub placement_revision: String,
}

/// A frontend's `GET /expert-load`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    #[serde(default)]
    pub layers: Vec<LayerReport>,
    #[serde(default)]
    pub shards: Vec<ShardSeen>,
    /// The model's MoE layers and routed experts per layer (frontends with shards).
    #[serde(default)]
    pub moe_layers: Vec<usize>,
    #[serde(default)]
    pub experts: usize,
}

/// A shard's `GET /load`, the part read here.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardReport {
    pub shard_index: u32,
    #[serde(default)]
    pub placement_revision: String,
}

/// Routed tokens per expert, per MoE layer (decoder index), summed over the frontends.
pub type Loads = BTreeMap<usize, Vec<f64>>;

/// The reports' loads added up; a layer's expert count is the longest report of it. Every
/// MoE layer a frontend names is there, at zero when it routed nothing yet (the
/// placement can be written down before any traffic).
pub fn merge(reports: &[LoadReport]) -> Loads {
    let mut loads = Loads::new();
    for r in reports {
        for &l in &r.moe_layers {
            let sum = loads.entry(l).or_default();
            if sum.len() < r.experts {
                sum.resize(r.experts, 0.0);
            }
        }
        for l in &r.layers {
            let sum = loads.entry(l.layer).or_default();
            if sum.len() < l.load.len() {
                sum.resize(l.load.len(), 0.0);
            }
            for (s, &n) in sum.iter_mut().zip(&l.load) {
                *s += n as f64;
            }
        }
    }
    loads
}

/// Mean routed tokens per layer.
pub fn tokens_per_layer(loads: &Loads) -> f64 {
    let total: f64 = loads.values().flatten().sum();
    total / loads.len().max(1) as f64
}

/// A whole model's placement: per MoE layer, which experts each of `shards` holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub shards: usize,
    pub layers: BTreeMap<usize, LayerPlacement>,
}

impl Placement {
    /// The even spread of every layer in `loads` (what shards hold without a file).
    pub fn even(loads: &Loads, shards: usize) -> Result<Self, PlanError> {
        let layers = loads
            .iter()
            .map(|(&l, v)| Ok((l, plan::even_spread(v.len(), shards)?)))
            .collect::<Result<_, PlanError>>()?;
        Ok(Self { shards, layers })
    }

    /// The balanced plan of `loads` with `redundant` spare slots per layer, over all
    /// shards; returns it and the slots per shard.
    pub fn balanced(
        loads: &Loads,
        shards: usize,
        redundant: usize,
    ) -> Result<(Self, usize), PlanError> {
        let layers = loads
            .iter()
            .map(|(&l, v)| {
                Ok((
                    l,
                    plan::balanced(v, shards, layer_slots(v.len(), shards, redundant))?,
                ))
            })
            .collect::<Result<_, PlanError>>()?;
        Ok((Self { shards, layers }, slots(loads, shards, redundant)))
    }

    /// The busiest shard's load over the mean shard's, summed over the layers (each
    /// layer's busiest shard sets that layer's time): Σ max / Σ mean. Layers this
    /// placement does not cover count as evenly spread. 1.0 without load.
    pub fn imbalance(&self, loads: &Loads) -> f64 {
        let (mut busiest, mut mean) = (0.0, 0.0);
        for (l, v) in loads {
            let even;
            let p = match self.layers.get(l) {
                Some(p) if p.replicas.len() == v.len() => p,
                _ => match plan::even_spread(v.len(), self.shards) {
                    Ok(p) => {
                        even = p;
                        &even
                    }
                    Err(_) => continue,
                },
            };
            let per_shard = p.shard_loads(v);
            busiest += per_shard.iter().copied().fold(0.0, f64::max);
            mean += per_shard.iter().sum::<f64>() / per_shard.len().max(1) as f64;
        }
        if mean <= 0.0 { 1.0 } else { busiest / mean }
    }

    /// `(layer, expert)` pairs a shard holds in `self` but not in `old`, over all shards:
    /// what a move loads.
    pub fn gained_over(&self, old: &Placement) -> usize {
        self.layers
            .iter()
            .map(|(l, p)| {
                p.shards
                    .iter()
                    .enumerate()
                    .map(|(s, held)| {
                        let before = old.layers.get(l).and_then(|o| o.shards.get(s));
                        held.iter()
                            .filter(|e| before.is_none_or(|b| !b.contains(e)))
                            .count()
                    })
                    .sum::<usize>()
            })
            .sum()
    }

    /// The first `shards` shards of a phase-1 file read back ([`read_file`]): a move to
    /// fewer shards lists the ones it empties past the new count. `None` when one of those
    /// still holds an expert of its own (not a move this loop wrote).
    pub fn first(&self, shards: usize) -> Option<Placement> {
        if shards == 0 || shards > self.shards {
            return None;
        }
        let mut layers = BTreeMap::new();
        for (&l, p) in &self.layers {
            if p.shards.iter().skip(shards).any(|held| !held.is_empty()) {
                return None;
            }
            let kept = p.shards.iter().take(shards).cloned().collect();
            layers.insert(l, LayerPlacement::from_shards(kept, p.replicas.len()));
        }
        Some(Placement { shards, layers })
    }

    /// Replicas beyond one per expert, over all layers.
    pub fn extra_replicas(&self) -> usize {
        self.layers
            .values()
            .map(|p| {
                p.replicas
                    .iter()
                    .map(|r| r.len().saturating_sub(1))
                    .sum::<usize>()
            })
            .sum()
    }
}

/// Slots per shard for a layer of `experts` experts: ⌈(experts + redundant) / shards⌉.
fn layer_slots(experts: usize, shards: usize, redundant: usize) -> usize {
    (experts + redundant).div_ceil(shards.max(1))
}

/// Slots per shard of the widest layer in `loads` (what status reports).
pub fn slots(loads: &Loads, shards: usize, redundant: usize) -> usize {
    loads
        .values()
        .map(|v| layer_slots(v.len(), shards, redundant))
        .max()
        .unwrap_or(0)
}

/// When to move ([`crate::api::RebalanceSpec`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Imbalance (1.0 = perfect) from which a move is considered.
    pub threshold: f64,
    /// How long it must hold first.
    pub sustain: Duration,
    /// Least time between the starts of two moves.
    pub min_interval: Duration,
}

/// What the measurement says.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Move to the plan.
    Move,
    /// Keep the placement; why (for status).
    Hold(String),
}

/// Whether to move, given the imbalance `now` with the current placement, since when it
/// has been at or above the threshold, when the last move started, and the plan's
/// imbalance on the same loads: `planned` is called (the plan made) only once every other
/// condition holds, so a balanced load costs no planning.
pub fn verdict(
    now: f64,
    planned: impl FnOnce() -> f64,
    above_since: Option<Instant>,
    last_move: Option<Instant>,
    at: Instant,
    policy: &Policy,
) -> Verdict {
    if now < policy.threshold {
        return Verdict::Hold(format!(
            "imbalance {now:.3} is below the threshold {:.3}",
            policy.threshold
        ));
    }
    let held = above_since.map_or(Duration::ZERO, |t| at.saturating_duration_since(t));
    if held < policy.sustain {
        return Verdict::Hold(format!(
            "imbalance {now:.3} has held {} s of the {} s a move needs",
            held.as_secs(),
            policy.sustain.as_secs()
        ));
    }
    if let Some(last) = last_move {
        let since = at.saturating_duration_since(last);
        if since < policy.min_interval {
            return Verdict::Hold(format!(
                "imbalance {now:.3}, but the last move started {} s ago (rebalance.minIntervalSeconds: {})",
                since.as_secs(),
                policy.min_interval.as_secs()
            ));
        }
    }
    let planned = planned();
    if planned > now * (1.0 - MIN_GAIN) {
        return Verdict::Hold(format!(
            "imbalance {now:.3}, and the best plan gives {planned:.3}: not enough of a gain to move experts"
        ));
    }
    Verdict::Move
}

/// The placement file (`shards[i]`: shard i's experts per layer; every layer of
/// `placement` listed, `""` for none). With `old`, phase 1 of a move: each shard also
/// lists, as `draining`, what it holds in `old` and loses, so it keeps serving those
/// until the second write (without `old`) frees them. A move between shard counts lists
/// the larger count: a shard past the new count holds nothing of its own and drains all
/// it held; a shard past the old count held entry `i mod old count` (a pod reads entry
/// `i mod n` of a file of `n`) and drains what of it the plan does not give it.
pub fn file(revision: &str, placement: &Placement, old: Option<&Placement>) -> String {
    let entries = placement.shards.max(old.map_or(0, |o| o.shards));
    let shards: Vec<serde_json::Value> = (0..entries)
        .map(|s| {
            let mut experts = serde_json::Map::new();
            let mut draining = serde_json::Map::new();
            for (l, p) in &placement.layers {
                let held = p.shards.get(s).cloned().unwrap_or_default();
                let lost: BTreeSet<u32> = old
                    .and_then(|o| Some((o.layers.get(l)?, o.shards.max(1))))
                    .and_then(|(o, count)| o.shards.get(s % count))
                    .map(|o| o.difference(&held).copied().collect())
                    .unwrap_or_default();
                experts.insert(l.to_string(), ids(&held).into());
                if !lost.is_empty() {
                    draining.insert(l.to_string(), ids(&lost).into());
                }
            }
            let mut entry = serde_json::Map::new();
            entry.insert("experts".into(), experts.into());
            if !draining.is_empty() {
                entry.insert("draining".into(), draining.into());
            }
            entry.into()
        })
        .collect();
    let body = serde_json::json!({ "revision": revision, "shards": shards });
    serde_json::to_string_pretty(&body).unwrap_or_default()
}

/// `{0, 1, 2, 3, 7}` → `"0-3,7"`.
pub fn ids(set: &BTreeSet<u32>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(u32, u32)> = None;
    for &e in set {
        run = match run {
            Some((a, b)) if e == b + 1 => Some((a, e)),
            Some(r) => {
                out.push(range(r));
                Some((e, e))
            }
            None => Some((e, e)),
        };
    }
    out.extend(run.map(range));
    out.join(",")
}

fn range((a, b): (u32, u32)) -> String {
    if a == b {
        a.to_string()
    } else {
        format!("{a}-{b}")
    }
}

/// A placement file written by [`file`], read back (an operator that restarts or takes
/// over the lead resumes from it): its revision, the placement, and whether it is phase 1
/// of a move (some shard still drains). `experts` per layer come from `loads` when known,
/// else from the highest id held.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub revision: String,
    pub placement: Placement,
    pub draining: bool,
}

/// Reads a placement file back; `None` for one it cannot read (it is then replaced by the
/// next move).
pub fn read_file(text: &str) -> Option<Written> {
    #[derive(Deserialize)]
    struct File {
        revision: String,
        shards: Vec<Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        experts: BTreeMap<String, String>,
        #[serde(default)]
        draining: BTreeMap<String, String>,
    }
    let f: File = serde_json::from_str(text).ok()?;
    let shards = f.shards.len();
    let mut sets: BTreeMap<usize, Vec<BTreeSet<u32>>> = BTreeMap::new();
    let mut draining = false;
    for (s, entry) in f.shards.iter().enumerate() {
        draining |= !entry.draining.is_empty();
        for (layer, list) in &entry.experts {
            let layer: usize = layer.parse().ok()?;
            let held = parse_ids(list)?;
            sets.entry(layer)
                .or_insert_with(|| vec![BTreeSet::new(); shards])[s] = held;
        }
    }
    let layers = sets
        .into_iter()
        .map(|(l, per_shard)| {
            let experts = per_shard
                .iter()
                .flatten()
                .max()
                .map_or(0, |&m| m as usize + 1);
            (l, LayerPlacement::from_shards(per_shard, experts))
        })
        .collect();
    Some(Written {
        revision: f.revision,
        placement: Placement { shards, layers },
        draining,
    })
}

fn parse_ids(list: &str) -> Option<BTreeSet<u32>> {
    let mut out = BTreeSet::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if b < a || b - a > 1 << 20 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => {
                out.insert(part.parse().ok()?);
            }
        }
    }
    Some(out)
}

/// The move number of a revision `b<n>` (0 for anything else).
pub fn move_number(revision: &str) -> u64 {
    revision
        .strip_prefix('b')
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Whether revision `revision` has been taken up everywhere: every one of the `pods`
/// shard pods answered `/load` with it, and every frontend sees at least `pods` shards up,
/// each at it. `Err` says who is behind.
pub fn confirmed(
    revision: &str,
    pods: usize,
    shards: &[ShardReport],
    frontends: &[(String, LoadReport)],
) -> Result<(), String> {
    let holding = shards
        .iter()
        .filter(|s| s.placement_revision == revision)
        .count();
    if holding < pods {
        let behind: Vec<String> = shards
            .iter()
            .filter(|s| s.placement_revision != revision)
            .map(|s| format!("shard {} at {:?}", s.shard_index, s.placement_revision))
            .collect();
        return Err(format!(
            "{holding} of {pods} shard pods report {revision}{}",
            if behind.is_empty() {
                String::new()
            } else {
                format!(" ({})", behind.join(", "))
            }
        ));
    }
    for (pod, report) in frontends {
        let up: Vec<&ShardSeen> = report.shards.iter().filter(|s| s.up).collect();
        let at = up
            .iter()
            .filter(|s| s.placement_revision == revision)
            .count();
        if at < pods || at < up.len() {
            return Err(format!(
                "frontend {pod} sees {at} of {} up shards at {revision} ({pods} shard pods)",
                up.len()
            ));
        }
    }
    Ok(())
}

/// The `n` hottest experts over all layers, by share of their layer's tokens: `(layer,
/// expert, share, shards holding it)`.
pub fn hottest(loads: &Loads, placement: &Placement, n: usize) -> Vec<(usize, u32, f64, Vec<u32>)> {
    let mut all: Vec<(usize, u32, f64, Vec<u32>)> = Vec::new();
    for (&l, v) in loads {
        let total: f64 = v.iter().sum();
        if total <= 0.0 {
            continue;
        }
        for (e, &x) in v.iter().enumerate() {
            let holders = placement
                .layers
                .get(&l)
                .and_then(|p| p.replicas.get(e))
                .cloned()
                .unwrap_or_default();
            all.push((l, e as u32, x / total, holders));
        }
    }
    all.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
    all.truncate(n);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(layers: &[(usize, &[u64])]) -> LoadReport {
        LoadReport {
            layers: layers
                .iter()
                .map(|(l, v)| LayerReport {
                    layer: *l,
                    load: v.to_vec(),
                })
                .collect(),
            shards: Vec::new(),
            moe_layers: Vec::new(),
            experts: 0,
        }
    }

    fn policy() -> Policy {
        Policy {
            threshold: 1.15,
            sustain: Duration::from_secs(30),
            min_interval: Duration::from_secs(300),
        }
    }

    #[test]
    fn frontends_loads_add_up_per_layer_and_expert() {
        let loads = merge(&[
            report(&[(1, &[1, 2, 3, 4]), (3, &[0, 0, 8, 0])]),
            report(&[(1, &[10, 0, 0, 0])]),
        ]);
        assert_eq!(loads[&1], vec![11.0, 2.0, 3.0, 4.0]);
        assert_eq!(loads[&3], vec![0.0, 0.0, 8.0, 0.0]);
        assert_eq!(tokens_per_layer(&loads), 14.0);
    }

    #[test]
    fn a_skewed_load_is_measured_imbalanced_and_the_plan_fixes_it() {
        // Expert 0 takes most tokens: with the even spread, shard 0 carries it alone.
        let loads: Loads = [(1, vec![60.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 10.0])].into();
        let even = Placement::even(&loads, 2).expect("even");
        let before = even.imbalance(&loads);
        assert!((before - 75.0 / 50.0).abs() < 1e-9, "{before}");
        let (plan, slots) = Placement::balanced(&loads, 2, 2).expect("plan");
        assert_eq!(slots, 5);
        let after = plan.imbalance(&loads);
        assert!(after < 1.01, "{after}");
        assert_eq!(
            plan.layers[&1].replicas[0],
            vec![0, 1],
            "the hot expert is on both"
        );
        assert_eq!(plan.extra_replicas(), 1);
        assert!(plan.gained_over(&even) > 0);
    }

    #[test]
    fn the_imbalance_weighs_each_layer_by_its_load() {
        // Layer 1 perfectly even, layer 2 all on shard 0: Σmax / Σmean = (10+10)/(10+5).
        let loads: Loads = [(1, vec![5.0, 5.0, 5.0, 5.0]), (2, vec![5.0, 5.0, 0.0, 0.0])].into();
        let even = Placement::even(&loads, 2).expect("even");
        assert!((even.imbalance(&loads) - 20.0 / 15.0).abs() < 1e-9);
        assert_eq!(even.imbalance(&Loads::new()), 1.0);
    }

    #[test]
    fn a_move_waits_for_the_threshold_the_sustain_the_interval_and_a_real_gain() {
        let p = policy();
        let t0 = Instant::now();
        let at = t0 + Duration::from_secs(1000);
        let hold = |v: Verdict, what: &str| match v {
            Verdict::Hold(why) => assert!(why.contains(what), "{why}"),
            Verdict::Move => panic!("moved; expected a hold on {what}"),
        };
        hold(
            verdict(1.1, || 1.0, Some(t0), None, at, &p),
            "below the threshold",
        );
        hold(
            verdict(
                1.5,
                || 1.0,
                Some(at - Duration::from_secs(10)),
                None,
                at,
                &p,
            ),
            "has held 10 s of the 30 s",
        );
        hold(
            verdict(
                1.5,
                || 1.0,
                Some(t0),
                Some(at - Duration::from_secs(60)),
                at,
                &p,
            ),
            "the last move started 60 s ago",
        );
        hold(
            verdict(1.5, || 1.45, Some(t0), None, at, &p),
            "not enough of a gain",
        );
        assert_eq!(verdict(1.5, || 1.0, Some(t0), None, at, &p), Verdict::Move);
        // Below the threshold nothing is planned.
        hold(
            verdict(
                1.1,
                || panic!("planned below the threshold"),
                Some(t0),
                None,
                at,
                &p,
            ),
            "below the threshold",
        );
        assert_eq!(
            verdict(
                1.5,
                || 1.0,
                Some(t0),
                Some(at - Duration::from_secs(300)),
                at,
                &p
            ),
            Verdict::Move
        );
    }

    #[test]
    fn the_file_lists_every_layer_and_phase_one_drains_what_each_shard_loses() {
        let loads: Loads = [(1, vec![60.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 10.0])].into();
        let even = Placement::even(&loads, 2).expect("even");
        let (plan, _) = Placement::balanced(&loads, 2, 2).expect("plan");
        let moving = file("b1", &plan, Some(&even));
        let v: serde_json::Value = serde_json::from_str(&moving).expect("json");
        assert_eq!(v["revision"], "b1");
        for s in 0..2 {
            let held =
                parse_ids(v["shards"][s]["experts"]["1"].as_str().expect("list")).expect("ids");
            assert_eq!(held, plan.layers[&1].shards[s]);
            let lost: BTreeSet<u32> = even.layers[&1].shards[s]
                .difference(&held)
                .copied()
                .collect();
            let drained = v["shards"][s]["draining"]["1"]
                .as_str()
                .map(|l| parse_ids(l).expect("ids"))
                .unwrap_or_default();
            assert_eq!(drained, lost, "shard {s}");
        }
        let read = read_file(&moving).expect("reads back");
        assert_eq!((read.revision.as_str(), read.draining), ("b1", true));
        assert_eq!(read.placement, plan);
        let done = read_file(&file("b1", &plan, None)).expect("reads back");
        assert!(!done.draining);
        assert_eq!(done.placement, plan);
        assert_eq!(move_number("b12"), 12);
        assert_eq!(move_number("0123abcd"), 0);
        assert_eq!(read_file("{not json"), None);
    }

    #[test]
    fn ids_are_written_as_ranges() {
        let set: BTreeSet<u32> = [0, 1, 2, 3, 7, 9, 10].into();
        assert_eq!(ids(&set), "0-3,7,9-10");
        assert_eq!(parse_ids(&ids(&set)), Some(set));
        assert_eq!(ids(&BTreeSet::new()), "");
    }

    #[test]
    fn a_move_is_confirmed_only_when_every_shard_and_every_frontend_has_it() {
        let shard = |i: u32, r: &str| ShardReport {
            shard_index: i,
            placement_revision: r.into(),
        };
        let seen = |revs: &[(&str, bool)]| LoadReport {
            layers: Vec::new(),
            shards: revs
                .iter()
                .enumerate()
                .map(|(i, (r, up))| ShardSeen {
                    address: format!("s{i}"),
                    up: *up,
                    placement_revision: (*r).into(),
                })
                .collect(),
            moe_layers: Vec::new(),
            experts: 0,
        };
        let both = [shard(0, "b2"), shard(1, "b2")];
        let err = confirmed("b2", 2, &[shard(0, "b2"), shard(1, "b1")], &[]).unwrap_err();
        assert!(
            err.contains("1 of 2 shard pods") && err.contains("shard 1 at \"b1\""),
            "{err}"
        );
        assert!(
            confirmed("b2", 2, &both[..1], &[]).is_err(),
            "a pod that did not answer"
        );
        let err = confirmed(
            "b2",
            2,
            &both,
            &[("f0".into(), seen(&[("b2", true), ("b1", true)]))],
        )
        .unwrap_err();
        assert!(err.contains("frontend f0 sees 1 of 2"), "{err}");
        // A frontend that has not found both shards yet is behind too.
        assert!(
            confirmed(
                "b2",
                2,
                &both,
                &[("f0".into(), seen(&[("b2", true), ("", false)]))]
            )
            .is_err()
        );
        assert_eq!(
            confirmed(
                "b2",
                2,
                &both,
                &[(
                    "f0".into(),
                    seen(&[("b2", true), ("b2", true), ("", false)])
                )]
            ),
            Ok(())
        );
    }

    #[test]
    fn the_hottest_experts_are_listed_with_their_holders() {
        let loads: Loads = [(1, vec![60.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 10.0])].into();
        let (plan, _) = Placement::balanced(&loads, 2, 2).expect("plan");
        let hot = hottest(&loads, &plan, 2);
        assert_eq!(hot[0], (1, 0, 0.6, vec![0, 1]));
        assert_eq!((hot[1].1, hot[1].2), (7, 0.1));
    }

    #[test]
    fn idle_moe_layers_are_merged_at_zero() {
        let mut idle = report(&[]);
        idle.moe_layers = vec![1, 3];
        idle.experts = 4;
        let loads = merge(&[idle, report(&[(3, &[1, 0, 0, 2])])]);
        assert_eq!(loads[&1], vec![0.0; 4]);
        assert_eq!(loads[&3], vec![1.0, 0.0, 0.0, 2.0]);
        assert_eq!(tokens_per_layer(&loads), 1.5);
        let even = Placement::even(&loads, 2).expect("even");
        assert_eq!(even.imbalance(&merge(&[report(&[])])), 1.0);
        assert_eq!(even.layers[&1].shards[1], BTreeSet::from([2, 3]));
    }

    /// A change of the shard count is a move: phase 1 lists the larger count, every pod
    /// keeps (draining) what it held, and the file read back gives the new placement.
    #[test]
    fn a_move_between_shard_counts_keeps_every_expert_held_in_phase_one() {
        let loads = merge(&[report(&[(0, &[5, 1, 1, 1, 1, 1]), (2, &[1; 6])])]);
        let two = Placement::even(&loads, 2).expect("two");
        let three = Placement::even(&loads, 3).expect("three");
        let held = |text: &str, shard: usize, layer: &str| -> (String, String) {
            let v: serde_json::Value = serde_json::from_str(text).expect("json");
            let e = &v["shards"][shard];
            (
                e["experts"][layer].as_str().unwrap_or("").to_string(),
                e["draining"][layer].as_str().unwrap_or("").to_string(),
            )
        };
        // 2 → 3: shard 2 (until now a copy of entry 2 mod 2 = 0) gains 4-5 and drains 0-2.
        let grow = file("b1", &three, Some(&two));
        assert_eq!(held(&grow, 0, "0"), ("0-1".into(), "2".into()));
        assert_eq!(held(&grow, 1, "0"), ("2-3".into(), "4-5".into()));
        assert_eq!(held(&grow, 2, "0"), ("4-5".into(), "0-2".into()));
        // 3 → 2: three entries; shard 2 holds nothing of its own and drains all it held.
        let shrink = file("b2", &two, Some(&three));
        let w = read_file(&shrink).expect("read back");
        assert_eq!((w.placement.shards, w.draining), (3, true));
        assert_eq!(held(&shrink, 2, "2"), (String::new(), "4-5".into()));
        assert_eq!(held(&shrink, 1, "2"), ("3-5".into(), "2".into()));
        // Every expert of every layer is held (as its own or draining) by some entry.
        for layer in ["0", "2"] {
            let mut all = BTreeSet::new();
            for s in 0..3 {
                let (own, drain) = held(&shrink, s, layer);
                all.extend(parse_ids(&own).expect("ids"));
                all.extend(parse_ids(&drain).expect("ids"));
            }
            assert_eq!(all, (0..6).collect::<BTreeSet<u32>>(), "layer {layer}");
        }
        // A loop resuming phase 1 finds the 2-shard target in the first 2 entries.
        assert_eq!(w.placement.first(2).expect("first two").layers, two.layers);
        // Not a move this loop wrote: an entry past the count still holds its own.
        assert!(read_file(&grow).expect("grow").placement.first(2).is_none());
        // Phase 2 lists the new count only.
        let w = read_file(&file("b2", &two, None)).expect("phase 2");
        assert_eq!((w.placement.shards, w.draining), (2, false));
    }
}
