//! `switchyard-worker bench-experts`: the time one MoE layer's routed experts take through
//! an [`ExpertBackend`] — on shards, dispatch + expert compute + combine as the engine
//! sees it — for batches of random hidden rows with random distinct top-k routes.

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

/// Times `iterations` calls (after 10 untimed ones) of the first MoE layer of `cfg` with
/// `tokens` rows each.
pub fn layer_latency(
    backend: &dyn ExpertBackend,
    cfg: &ModelConfig,
    tokens: usize,
    iterations: usize,
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
    let mut rng = Rng::new(tokens as u64);
    let mut experts = Vec::with_capacity(tokens * k);
    for _ in 0..tokens.max(1) {
        let mut row: Vec<u32> = Vec::with_capacity(k);
        while row.len() < k.min(n) {
            let e = (rng.next_u64() % n as u64) as u32;
            if !row.contains(&e) {
                row.push(e);
            }
        }
        experts.extend(row);
    }
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
