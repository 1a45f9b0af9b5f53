//! How many tokens each MoE layer routed to each of its experts over the last
//! [`WINDOW_SECONDS`], for placing experts where the load is (`GET /expert-load` on the
//! metrics port, and the `switchyard_expert_load_*` gauges).
//!
//! Counts go into one-second buckets; running totals over the window are kept beside
//! them, so adding a step's routes costs one increment per routed token and forgetting a
//! second costs one pass over that second's counts, whatever the window's length.
//! Every method takes `now`, so the tests drive the clock.

use std::time::Instant;

/// The window the loads cover, in seconds.
pub const WINDOW_SECONDS: u64 = 60;
/// Experts listed as the hottest of each layer in a report.
pub const TOP: usize = 8;

/// Routed tokens per `(layer, expert)` over a sliding window.
#[derive(Debug, Clone)]
pub struct ExpertLoad {
    layers: usize,
    experts: usize,
    origin: Instant,
    /// Per bucket: the second it holds (since `origin`) and its counts, `[layer, expert]`.
    buckets: Vec<(u64, Vec<u32>)>,
    /// The buckets' sums.
    totals: Vec<u64>,
}

/// One layer's load over the window.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerLoad {
    pub layer: usize,
    /// Routed tokens (a token counts once per expert it went to).
    pub tokens: u64,
    /// The busiest expert's load over the mean expert's: 1 when even.
    pub imbalance: f64,
    /// The [`TOP`] busiest experts, busiest first.
    pub top: Vec<HotExpert>,
    /// Tokens per expert, by expert id.
    pub load: Vec<u64>,
    /// With expert shards: the busiest shard's tokens over the mean shard's
    /// ([`shard_imbalance`], on the placement the shards report).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard_imbalance: Option<f64>,
}

/// One layer's shard imbalance: the busiest shard's routed tokens over the mean shard's,
/// each expert's tokens split evenly over the shards holding it (`holders[s]`: the experts
/// shard `s` holds in the layer; an expert no shard holds counts for none). 1 when even or
/// without load; `None` without shards.
pub fn shard_imbalance(load: &[u64], holders: &[std::collections::BTreeSet<u32>]) -> Option<f64> {
    if holders.is_empty() {
        return None;
    }
    let mut copies = vec![0_u32; load.len()];
    for &e in holders.iter().flatten() {
        if let Some(c) = copies.get_mut(e as usize) {
            *c += 1;
        }
    }
    let per_shard: Vec<f64> = holders
        .iter()
        .map(|held| {
            held.iter()
                .filter_map(|&e| {
                    Some(*load.get(e as usize)? as f64 / f64::from(copies[e as usize]))
                })
                .sum()
        })
        .collect();
    let mean = per_shard.iter().sum::<f64>() / per_shard.len() as f64;
    let busiest = per_shard.iter().copied().fold(0.0, f64::max);
    Some(if mean > 0.0 { busiest / mean } else { 1.0 })
}

/// An expert and its share of its layer's routed tokens.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HotExpert {
    pub expert: usize,
    pub share: f64,
}

/// The whole report (`GET /expert-load`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExpertLoadReport {
    pub window_seconds: u64,
    /// Seconds of the window that have passed since the frontend started.
    pub covered_seconds: u64,
    /// Layers that routed tokens in the window.
    pub layers: Vec<LayerLoad>,
    /// The expert shards this frontend calls and the placement revision each reported
    /// when last asked (each second): the operator finishes moving experts only once
    /// every frontend sees every shard at the revision it wrote. Empty without shards.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<crate::experts::remote::ShardSeen>,
    /// With expert shards: the model's MoE layers and routed experts per layer, so the
    /// operator can write the placement down before any token has been routed. Empty
    /// and 0 without shards.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub moe_layers: Vec<usize>,
    #[serde(skip_serializing_if = "is_zero")]
    pub experts: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl ExpertLoad {
    pub fn new(layers: usize, experts: usize, now: Instant) -> Self {
        Self {
            layers,
            experts,
            origin: now,
            buckets: (0..WINDOW_SECONDS)
                .map(|_| (u64::MAX, Vec::new()))
                .collect(),
            totals: vec![0; layers * experts],
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }

    /// Drops the buckets that left the window by `now`.
    fn forget(&mut self, now: Instant) {
        let s = self.second(now);
        for (at, counts) in &mut self.buckets {
            if *at != u64::MAX && (*at > s || s - *at >= WINDOW_SECONDS) {
                for (t, c) in self.totals.iter_mut().zip(counts.iter()) {
                    *t -= u64::from(*c);
                }
                counts.iter_mut().for_each(|c| *c = 0);
                *at = u64::MAX;
            }
        }
    }

    /// Counts `experts` (each entry one token routed to that expert) for `layer` at `now`.
    /// Entries outside the shape are ignored.
    pub fn add(&mut self, now: Instant, layer: usize, experts: &[u32]) {
        if layer >= self.layers || experts.is_empty() {
            return;
        }
        let s = self.second(now);
        let i = (s % WINDOW_SECONDS) as usize;
        if self.buckets[i].0 != s {
            self.forget(now);
            let (at, counts) = &mut self.buckets[i];
            *at = s;
            counts.resize(self.layers * self.experts, 0);
        }
        let counts = &mut self.buckets[i].1[layer * self.experts..(layer + 1) * self.experts];
        let totals = &mut self.totals[layer * self.experts..(layer + 1) * self.experts];
        for &e in experts {
            let e = e as usize;
            if e < counts.len() {
                counts[e] = counts[e].saturating_add(1);
                totals[e] += 1;
            }
        }
    }

    /// The loads over the window ending at `now`.
    pub fn report(&mut self, now: Instant) -> ExpertLoadReport {
        self.forget(now);
        let layers = (0..self.layers)
            .filter_map(|layer| {
                let load = self.totals[layer * self.experts..(layer + 1) * self.experts].to_vec();
                let tokens: u64 = load.iter().sum();
                if tokens == 0 {
                    return None;
                }
                let max = load.iter().copied().max().unwrap_or(0);
                let mean = tokens as f64 / load.len() as f64;
                let mut order: Vec<usize> = (0..load.len()).collect();
                // Busiest first; equal loads by id, so the report is deterministic.
                order.sort_by(|a, b| load[*b].cmp(&load[*a]).then(a.cmp(b)));
                let top = order
                    .into_iter()
                    .take(TOP)
                    .filter(|e| load[*e] > 0)
                    .map(|expert| HotExpert {
                        expert,
                        share: load[expert] as f64 / tokens as f64,
                    })
                    .collect();
                Some(LayerLoad {
                    layer,
                    tokens,
                    imbalance: max as f64 / mean,
                    top,
                    load,
                    shard_imbalance: None,
                })
            })
            .collect();
        ExpertLoadReport {
            window_seconds: WINDOW_SECONDS,
            covered_seconds: self.second(now).saturating_add(1).min(WINDOW_SECONDS),
            layers,
            shards: Vec::new(),
            moe_layers: Vec::new(),
            experts: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn loads_cover_the_window_and_forget_older_seconds() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(s * 1000 + 500);
        let mut l = ExpertLoad::new(2, 4, t0);
        l.add(at(0), 1, &[0, 0, 0, 1]);
        l.add(at(30), 1, &[2, 0]);
        // Outside the shape: ignored.
        l.add(at(30), 2, &[0]);
        l.add(at(30), 0, &[9]);
        let r = l.report(at(30));
        assert_eq!(r.covered_seconds, 31);
        assert_eq!(r.layers.len(), 1, "layer 0 routed nothing");
        let layer = &r.layers[0];
        assert_eq!((layer.layer, layer.tokens), (1, 6));
        assert_eq!(layer.load, vec![4, 1, 1, 0]);
        // Busiest 4 of a mean 1.5.
        assert!((layer.imbalance - 4.0 / 1.5).abs() < 1e-12);
        assert_eq!(
            layer.top.iter().map(|h| h.expert).collect::<Vec<_>>(),
            vec![0, 1, 2],
            "busiest first, ties by id, idle experts left out"
        );
        assert!((layer.top[0].share - 4.0 / 6.0).abs() < 1e-12);
        // Second 0 leaves the window at 60; second 30 is still in it at 89.
        let r = l.report(at(60));
        assert_eq!(r.layers[0].load, vec![1, 0, 1, 0]);
        assert_eq!(r.covered_seconds, WINDOW_SECONDS);
        // A bucket reused by a later second starts from zero.
        l.add(at(90), 1, &[3]);
        assert_eq!(l.report(at(90)).layers[0].load, vec![0, 0, 0, 1]);
        assert!(l.report(at(200)).layers.is_empty());
    }

    #[test]
    fn the_shard_imbalance_splits_a_replicated_experts_tokens_over_its_holders() {
        use std::collections::BTreeSet;
        let load = [60, 20, 10, 10];
        // Even spread over 2: 80 against 20, a mean of 50.
        let even = [BTreeSet::from([0, 1]), BTreeSet::from([2, 3])];
        assert_eq!(shard_imbalance(&load, &even), Some(1.6));
        // Expert 0 on both: 30 + 20 = 50 and 30 + 10 + 10 = 50.
        let replicated = [BTreeSet::from([0, 1]), BTreeSet::from([0, 2, 3])];
        assert_eq!(shard_imbalance(&load, &replicated), Some(1.0));
        // A shard holding nothing of the layer still counts in the mean.
        let idle = [BTreeSet::from([0, 1, 2, 3]), BTreeSet::new()];
        assert_eq!(shard_imbalance(&load, &idle), Some(2.0));
        assert_eq!(shard_imbalance(&[0; 4], &even), Some(1.0));
        assert_eq!(shard_imbalance(&load, &[]), None);
    }

    #[test]
    fn an_even_load_has_imbalance_one() {
        let t0 = Instant::now();
        let mut l = ExpertLoad::new(1, 3, t0);
        l.add(t0, 0, &[0, 1, 2, 2, 1, 0]);
        assert_eq!(l.report(t0).layers[0].imbalance, 1.0);
    }
}
