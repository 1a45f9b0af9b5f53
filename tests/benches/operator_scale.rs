//! Operator scale benchmark: apply N ModelDeployments at once to a real etcd +
//! kube-apiserver with `switchyard-operator run` watching, and measure how long each takes
//! to converge (all 10 children exist and the status describes the current generation),
//! the total, the operator's peak RSS, and then single-object convergence on an idle
//! operator.
//!
//! `cargo bench -p switchyard-tests --bench operator_scale [-- N [IDLE_SAMPLES]]`
//! (defaults 200 and 20). Prints a Markdown table for docs/benchmarks.md.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, Resource};
use switchyard_operator::api::ModelDeployment;
use switchyard_tests::{ControlPlane, OperatorProcess};

const CHILDREN: usize = 10;
const POLL: Duration = Duration::from_millis(250);
const LIMIT: Duration = Duration::from_secs(600);

fn model_deployment(name: &str) -> ModelDeployment {
    let mut md: ModelDeployment = serde_yaml::from_str(include_str!("../../examples/full.yaml"))
        .expect("examples/full.yaml parses");
    md.metadata.name = Some(name.to_string());
    md
}

/// Owned-object counts per ModelDeployment name, from metadata-only lists.
async fn children(client: &Client, ns: &str) -> BTreeMap<String, usize> {
    let lp = ListParams::default().labels("app.kubernetes.io/managed-by=switchyard-operator");
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    macro_rules! tally {
        ($($kind:ty),*) => {$(
            let list = Api::<$kind>::namespaced(client.clone(), ns)
                .list_metadata(&lp)
                .await
                .expect("listing owned objects");
            for item in list.items {
                if let Some(owner) = item
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("switchyard.dev/model-deployment"))
                {
                    *count.entry(owner.clone()).or_default() += 1;
                }
            }
        )*};
    }
    tally!(
        ServiceAccount,
        ConfigMap,
        Deployment,
        Service,
        StatefulSet,
        PodDisruptionBudget,
        NetworkPolicy
    );
    count
}

/// Names whose status describes their current generation.
async fn observed(client: &Client, ns: &str) -> BTreeSet<String> {
    Api::<ModelDeployment>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("listing ModelDeployments")
        .items
        .into_iter()
        .filter(|md| {
            md.status.as_ref().and_then(|s| s.observed_generation) == md.metadata.generation
        })
        .filter_map(|md| md.meta().name.clone())
        .collect()
}

async fn converged(client: &Client, ns: &str) -> BTreeSet<String> {
    let counts = children(client, ns).await;
    observed(client, ns)
        .await
        .into_iter()
        .filter(|name| counts.get(name).copied().unwrap_or(0) >= CHILDREN)
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(label: &str, mut samples: Vec<Duration>) -> String {
    samples.sort();
    format!(
        "| {label} | {} | {:.2} s | {:.2} s | {:.2} s |",
        samples.len(),
        percentile(&samples, 50.0).as_secs_f64(),
        percentile(&samples, 99.0).as_secs_f64(),
        samples.last().copied().unwrap_or_default().as_secs_f64(),
    )
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; take the first two numbers among the arguments.
    let numbers: Vec<usize> = std::env::args().filter_map(|a| a.parse().ok()).collect();
    let n = numbers.first().copied().unwrap_or(200);
    let idle_samples = numbers.get(1).copied().unwrap_or(20);

    let cp = ControlPlane::start().await.expect("control plane");
    cp.install_crd(switchyard_tests::MODEL_DEPLOYMENT_CRD)
        .await
        .expect("CRD");
    let ns = cp.namespace("bench").await.expect("namespace");
    let operator = OperatorProcess::start(&cp, &ns.name, "bench", Duration::from_secs(15))
        .await
        .expect("operator");
    let client = ns.client.clone();
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    eprintln!("applying {n} ModelDeployments at once...");

    let started = Instant::now();
    let created: BTreeMap<String, Duration> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let name = format!("md-{i:04}");
                api.create(&PostParams::default(), &model_deployment(&name))
                    .await
                    .expect("create");
                (name, started.elapsed())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    eprintln!(
        "created {n} in {:.1}s; waiting for convergence...",
        started.elapsed().as_secs_f64()
    );

    let mut done: BTreeMap<String, Duration> = BTreeMap::new();
    let mut last_report = Instant::now();
    while done.len() < n {
        assert!(
            started.elapsed() < LIMIT,
            "not converged after {LIMIT:?}: {}/{n}",
            done.len()
        );
        let now = started.elapsed();
        for name in converged(&client, &ns.name).await {
            done.entry(name).or_insert(now);
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "  {}/{n} converged after {:.0}s",
                done.len(),
                now.as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(POLL).await;
    }
    let total = started.elapsed();
    let burst: Vec<Duration> = done
        .iter()
        .map(|(name, at)| at.saturating_sub(created[name]))
        .collect();
    let burst_rss = operator.peak_rss_kib();

    eprintln!("idle: {idle_samples} single objects, one at a time...");
    let mut idle = Vec::new();
    for i in 0..idle_samples {
        let name = format!("idle-{i:03}");
        let t = Instant::now();
        api.create(&PostParams::default(), &model_deployment(&name))
            .await
            .expect("create");
        loop {
            if converged(&client, &ns.name).await.contains(&name) {
                break;
            }
            assert!(t.elapsed() < LIMIT, "{name} never converged");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        idle.push(t.elapsed());
    }
    let rss = operator.peak_rss_kib();
    operator.check_running().expect("the operator survived");

    println!("| what | objects | p50 | p99 | max |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "{}",
        summary(&format!("{n} applied at once: create → converged"), burst)
    );
    println!(
        "{}",
        summary("idle, one at a time: create → converged", idle)
    );
    println!();
    println!(
        "all {n} converged {:.1} s after the first create; operator peak RSS {} MiB after the burst, {} MiB at the end",
        total.as_secs_f64(),
        burst_rss.map_or("?".into(), |k| (k / 1024).to_string()),
        rss.map_or("?".into(), |k| (k / 1024).to_string()),
    );
}
