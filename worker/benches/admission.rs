//! The admission layer's own cost: one GCRA quota check among 10 000 tenants, and one
//! fair-queue push + pop with 10 000 tickets of 1 000 tenants queued. Criterion reports
//! the mean; the p50/p99 of single operations (timed one by one over 200 000 of them)
//! are printed after it, since the target is a p99 (< 2 µs per check).

use std::time::{Duration, Instant};

use criterion::{Criterion, black_box};
use switchyard_worker::admission::fair_queue::{Band, FairQueue, QueueConfig, Ticket};
use switchyard_worker::admission::gcra::{Limit, Quotas, TierLimits};

const KEYS: usize = 10_000;
const TENANTS: usize = 1_000;
const QUEUED: usize = 10_000;

fn limits() -> TierLimits {
    TierLimits {
        requests: Limit::per_minute(6_000).ok(),
        tokens: Limit::per_minute(10_000_000).ok(),
    }
}

fn quotas(base: Instant) -> (Quotas<String>, Vec<String>) {
    let q = Quotas::new();
    let keys: Vec<String> = (0..KEYS).map(|i| format!("tenant-{i}")).collect();
    for k in &keys {
        let _ = q.check(k, &limits(), 100, base);
    }
    (q, keys)
}

fn queue(far: Instant) -> FairQueue<u64> {
    let mut q = FairQueue::new(QueueConfig {
        max_queued: QUEUED + 1,
        ..QueueConfig::default()
    });
    for i in 0..QUEUED {
        q.push(ticket(i, far));
    }
    q
}

fn ticket(i: usize, far: Instant) -> Ticket<u64> {
    Ticket {
        tenant: format!("tenant-{}", i % TENANTS),
        band: if i.is_multiple_of(10) {
            Band::High
        } else {
            Band::Normal
        },
        weight: 1 + (i % 3) as u32,
        input_tokens: 100 + (i % 50) as u64,
        deadline: far + Duration::from_millis(i as u64),
        item: i as u64,
    }
}

fn percentiles(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "{name}: p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?} over {} operations",
        at(0.5),
        at(0.99),
        at(0.999),
        samples[samples.len() - 1],
        samples.len()
    );
}

fn main() {
    let base = Instant::now();
    let far = base + Duration::from_secs(3600);
    let mut c = Criterion::default().configure_from_args();

    let (q, keys) = quotas(base);
    let mut i = 0usize;
    c.bench_function("quota check (10k tenants)", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            black_box(q.check(
                &keys[i],
                &limits(),
                100,
                base + Duration::from_millis(i as u64),
            ))
        })
    });
    let mut fq = queue(far);
    let mut n = QUEUED;
    c.bench_function("fair queue push + pop (10k queued, 1k tenants)", |b| {
        b.iter(|| {
            n += 1;
            fq.push(ticket(n, far));
            black_box(fq.pop())
        })
    });
    c.final_summary();

    let (q, keys) = quotas(base);
    let samples = (0..200_000usize)
        .map(|j| {
            let k = &keys[(j * 7919) % KEYS];
            let now = base + Duration::from_micros(j as u64 * 10);
            let t = Instant::now();
            black_box(q.check(k, &limits(), 100, now).is_ok());
            t.elapsed()
        })
        .collect();
    percentiles("quota check", samples);
    let mut fq = queue(far);
    let samples = (0..200_000usize)
        .map(|j| {
            let tk = ticket(QUEUED + j, far);
            let t = Instant::now();
            fq.push(tk);
            black_box(fq.pop());
            t.elapsed()
        })
        .collect();
    percentiles("fair queue push + pop", samples);
}
