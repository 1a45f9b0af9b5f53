//! The engine's one product, `x · Wᵀ` (`model::matmul::linear`), against candle's own
//! CPU matmul on the same operands, for the bench model's shapes (hidden 1024, expert
//! width 768, vocabulary 32 000) at the row counts decode and prefill meet: 1 (one
//! sequence), 4 and 8 (an expert's share at batch 16–32), 32 and 128 (prefill).
//!
//! The same shapes in `Q4_K` and `Q6_K` (the types of a Q4_K_M file's experts): the
//! engine's product (`linear_w`, its integer kernels where the CPU has AVX512-VNNI)
//! against candle's quantized matmul on the same blocks.
//!
//! `cargo bench -p switchyard-worker --bench products` (RAYON_NUM_THREADS sets threads).

use std::time::Duration;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, black_box};
use switchyard_worker::model::matmul::{Weight, linear, linear_w};

fn products(c: &mut Criterion) {
    let dev = Device::Cpu;
    for (name, n, k) in [
        ("gate_up", 1536, 1024),
        ("down", 1024, 768),
        ("lm_head", 32000, 1024),
    ] {
        let w32 = Tensor::randn(0f32, 0.05, (n, k), &dev).expect("weight");
        for dtype in [DType::F32, DType::BF16] {
            let w = w32.to_dtype(dtype).expect("dtype");
            let mut g = c.benchmark_group(format!("{name}_{n}x{k}_{dtype:?}"));
            g.measurement_time(Duration::from_secs(2))
                .warm_up_time(Duration::from_millis(500));
            for rows in [1usize, 4, 8, 32, 128] {
                if name == "lm_head" && rows > 8 {
                    continue;
                }
                let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).expect("input");
                g.throughput(Throughput::Elements((rows * n * k) as u64));
                g.bench_with_input(BenchmarkId::new("switchyard", rows), &x, |b, x| {
                    b.iter(|| black_box(linear(x, &w).expect("linear")))
                });
                g.bench_with_input(BenchmarkId::new("candle", rows), &x, |b, x| {
                    b.iter(|| {
                        let wf = w.to_dtype(DType::F32).expect("widen");
                        black_box(x.matmul(&wf.t().expect("t")).expect("matmul"))
                    })
                });
            }
            g.finish();
        }
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let w = Weight::quantize_onto(&w32, dtype, &dev).expect("quantize");
            let Weight::Quantized(q) = &w else {
                unreachable!("quantize_onto gives blocks")
            };
            let candle = QMatMul::QTensor(q.clone());
            let mut g = c.benchmark_group(format!("{name}_{n}x{k}_{dtype:?}"));
            g.measurement_time(Duration::from_secs(2))
                .warm_up_time(Duration::from_millis(500));
            for rows in [1usize, 4, 8, 32] {
                if name == "lm_head" && rows > 8 {
                    continue;
                }
                let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).expect("input");
                g.throughput(Throughput::Elements((rows * n * k) as u64));
                g.bench_with_input(BenchmarkId::new("switchyard", rows), &x, |b, x| {
                    b.iter(|| black_box(linear_w(x, &w).expect("linear_w")))
                });
                g.bench_with_input(BenchmarkId::new("candle", rows), &x, |b, x| {
                    b.iter(|| black_box(candle.forward(x).expect("qmatmul")))
                });
            }
            g.finish();
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    products(&mut c);
    c.final_summary();
}
