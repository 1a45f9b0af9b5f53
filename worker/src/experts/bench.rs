//! `switchyard-worker bench-experts`: the time one MoE layer's routed experts take through
//! an [`ExpertBackend`] — on shards, dispatch + expert compute + combine as the engine
//! sees it — for batches of random hidden rows with random distinct top-k routes, uniform
//! or skewed (Zipf) as real routers are.

use crate::engine::bench::BenchError;
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::model::ModelConfig;
use crate::model::moe::{ExpertBackend, Routes};
use switchyard_edge::rng::Rng;

/// Latency of one batch size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerLatency {
    /// Rows per call.
    pub tokens: usize,
    /// Timed calls.
    pub iterations: usize,
    /// Median, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// Mean, microseconds.
    pub mean_us: f64,
}

/// How the bench's tokens pick their experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Routing {
    /// Every expert equally likely.
    Uniform,
    /// Expert of popularity rank r chosen with weight 1 / (r + 1)^s, the ranks a fixed
    /// permutation of the expert ids (so the hot experts are not simply the lowest ids,
    /// which the even spread would put on one shard).
    Zipf(f64),
}

/// `tokens` tokens' distinct top-`k` experts of `n`, drawn with `routing` from `seed`.
pub fn draw_routes(n: usize, k: usize, tokens: usize, routing: Routing, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    let k = k.min(n);
    let weights: Vec<f64> = match routing {
        Routing::Uniform => vec![1.0; n],
        Routing::Zipf(s) => {
            let mut order: Vec<usize> = (0..n).collect();
            let mut perm = Rng::new(0x5eed);
            for i in (1..n).rev() {
                order.swap(i, (perm.next_u64() % (i as u64 + 1)) as usize);
            }
            let mut w = vec![0.0; n];
            for (rank, &e) in order.iter().enumerate() {
                w[e] = 1.0 / ((rank + 1) as f64).powf(s);
            }
            w
        }
    };
    let mut experts = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        let mut row: Vec<u32> = Vec::with_capacity(k);
        while row.len() < k {
            let total: f64 = (0..n)
                .filter(|e| !row.contains(&(*e as u32)))
                .map(|e| weights[e])
                .sum();
            let mut x = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
            let mut pick = None;
            for e in (0..n).filter(|e| !row.contains(&(*e as u32))) {
                pick = Some(e);
                x -= weights[e];
                if x <= 0.0 {
                    break;
                }
            }
            row.extend(pick.map(|e| e as u32));
        }
        experts.extend(row);
    }
    experts
}

/// The routed tokens per expert that `routing` gives over `tokens` tokens, as a
/// frontend's `GET /expert-load` reports them for every MoE layer of `cfg` (the bench
/// routes every layer alike): what `switchyard-operator plan-placement` plans from.
pub fn load_report(cfg: &ModelConfig, routing: Routing, tokens: usize) -> serde_json::Value {
    let Some(moe) = cfg.moe.as_ref() else {
        return serde_json::json!({ "layers": [] });
    };
    let mut load = vec![0u64; moe.num_experts];
    for e in draw_routes(moe.num_experts, moe.top_k, tokens, routing, 1) {
        load[e as usize] += 1;
    }
    let layers: Vec<serde_json::Value> = moe
        .sparse_layers
        .iter()
        .enumerate()
        .filter(|(_, sparse)| **sparse)
        .map(|(layer, _)| serde_json::json!({ "layer": layer, "load": load }))
        .collect();
    serde_json::json!({ "layers": layers })
}

/// Times `iterations` calls (after 10 untimed ones) of the first MoE layer of `cfg` with
/// `tokens` rows each, routed as `routing` draws.
pub fn layer_latency(
    backend: &dyn ExpertBackend,
    cfg: &ModelConfig,
    tokens: usize,
    iterations: usize,
    routing: Routing,
) -> Result<LayerLatency, BenchError> {
    let moe = cfg
        .moe
        .as_ref()
        .ok_or_else(|| BenchError::Invalid("a dense model has no routed experts".into()))?;
    let layer = moe
        .sparse_layers
        .iter()
        .position(|s| *s)
        .ok_or_else(|| BenchError::Invalid("the model has no MoE layer".into()))?;
    let (n, k) = (moe.num_experts, moe.top_k);
    let xs = Tensor::randn(0f32, 1.0, (tokens.max(1), cfg.hidden_size), &Device::Cpu)?;
    let experts = draw_routes(n, k, tokens.max(1), routing, tokens as u64);
    let routes = Routes {
        top_k: k.min(n),
        weights: vec![1.0 / k as f32; experts.len()],
        experts,
    };
    let mut times = Vec::with_capacity(iterations);
    for i in 0..iterations.max(1) + 10 {
        let t = Instant::now();
        backend.forward(layer, &xs, &routes)?;
        if i >= 10 {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
    Ok(LayerLatency {
        tokens,
        iterations,
        p50_us: at(0.5),
        p99_us: at(0.99),
        mean_us: times.iter().sum::<f64>() / times.len().max(1) as f64,
    })
}
