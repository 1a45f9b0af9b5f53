//! What counting expert load costs a decode step (`frontend::metrics`): one step's routes of
//! a DeepSeek-V3-sized model (58 MoE layers of 256 experts, top-8) at batch 1 and 32,
//! through `FrontendMetrics` as the engine's observer calls it: the cumulative
//! `expert_tokens_total` counters and the last minute's window.
//!
//! `cargo bench -p switchyard-worker --bench expert_load`

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, black_box};
use switchyard_worker::frontend::FrontendMetrics;

const LAYERS: usize = 58;
const EXPERTS: usize = 256;
const TOP_K: usize = 8;

fn routes(batch: usize, seed: &mut u64) -> Vec<Vec<u32>> {
    (0..LAYERS)
        .map(|_| {
            (0..batch * TOP_K)
                .map(|_| {
                    *seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((*seed >> 33) % EXPERTS as u64) as u32
                })
                .collect()
        })
        .collect()
}

fn expert_load(c: &mut Criterion) {
    let metrics = FrontendMetrics::new(LAYERS + 3, EXPERTS);
    let mut seed = 1u64;
    let mut g = c.benchmark_group("expert_load_per_step");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for batch in [1usize, 32] {
        let steps: Vec<Vec<Vec<u32>>> = (0..64).map(|_| routes(batch, &mut seed)).collect();
        let mut i = 0;
        g.bench_with_input(BenchmarkId::new("batch", batch), &batch, |b, _| {
            b.iter(|| {
                let now = Instant::now();
                for (layer, experts) in steps[i % steps.len()].iter().enumerate() {
                    metrics.add_recent_routes(now, layer + 3, black_box(experts));
                    let mut counts = [0u64; EXPERTS];
                    for &e in experts {
                        counts[e as usize] += 1;
                    }
                    metrics.add_layer_expert_tokens(layer + 3, &counts);
                }
                i += 1;
            })
        });
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    expert_load(&mut c);
    c.final_summary();
}
