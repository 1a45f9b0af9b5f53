//! Tier 5: Switchyard installed as a platform team would install it, on a real node.
//!
//! `helm install` the chart from this repository; the operator runs as two pods, one
//! leads, `helm test` passes. A ModelDeployment whose checkpoint comes from a PVC (a local
//! PersistentVolume) gets two frontends and two expert shards that pass their real gRPC
//! probes; a client outside the pods calls the Service's ClusterIP (through kube-proxy)
//! and gets exactly the tokens the same model gives in process, while the frontends find
//! the shards through the headless Service's DNS (CoreDNS). grpcurl, a third-party client,
//! lists the services by reflection and calls Generate. A shard pod deleted mid-stream
//! comes back and new requests succeed; a frontend pod killed (SIGKILL) mid-stream ends
//! its client's stream with an error within seconds (never a hang), calls retried through the Service succeed,
//! and the other frontend's accounting still holds; `kubectl scale` brings a third frontend that
//! serves, and back to one while 20 streams run cuts none of them (the stopping frontends
//! drain). The autoscaler, turned on in Shadow mode, recommends for a spike without
//! changing the count, and Active applies the recommendation; a legitimate spike of 12
//! callers gets a Panic decision to 3 frontends that serve, and back to 1 after the load
//! with no stream cut. Each new frontend's time to useful capacity (the scale write to its
//! first token served through the Service) is measured 5 times for the tiny model and for
//! a 0.5 B-parameter checkpoint. A tenant flooding at 50× its quota for 2 minutes buys no
//! frontend while another's requests all succeed at their usual TTFT, and a spike during
//! the flood buys what the spike alone buys; 50 tenants each at their quota (a sybil
//! flood) buy no more than their tier's budget, while a paid spike still scales. No API
//! key appears in any container log, Event or ModelDeployment. `helm uninstall` removes
//! the operator and its RBAC and leaves the CRD.
//!
//! One scenario, in order, because each step stands on the one before (the operator the
//! chart installed reconciles the deployment the later steps use). Each step prints how
//! long it took; the figures are in docs/benchmarks.md.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use switchyard_cli::loadgen::ScenarioKind;
use switchyard_operator::api::ModelDeployment;
use switchyard_proto::inference::v1 as pb;
use switchyard_proto::inference::v1::generate_stream_response::Event;
use switchyard_proto::inference::v1::inference_client::InferenceClient;
use switchyard_tests::control_plane::http_get;
use switchyard_tests::node::{NODE_NAME, ROOT};
use switchyard_tests::tools::tool;
use switchyard_tests::worker::fixture_model;
use switchyard_tests::{FrontendProcess, RealNode};
use tokio_stream::StreamExt as _;

const RELEASE: &str = "switchyard";
const RELEASE_NAMESPACE: &str = "switchyard-system";
const MD: &str = "tiny-moe";
const PROMPT: &str = "The switchyard sorts the cars onto";
const MAX_TOKENS: u32 = 24;
const POD_TIMEOUT: Duration = Duration::from_secs(180);

fn step(name: &str, since: Instant) {
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: {name} in {:.1}s",
        since.elapsed().as_secs_f64()
    );
}

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/switchyard")
}

fn greedy(max_tokens: u32) -> pb::GenerateRequest {
    switchyard_tests::worker::greedy_request(PROMPT, max_tokens)
}

/// The token ids a unary Generate returns from `endpoint`.
async fn generate(endpoint: &str) -> Result<Vec<u32>, String> {
    let mut client = InferenceClient::connect(endpoint.to_string())
        .await
        .map_err(|e| format!("connecting to {endpoint}: {e}"))?;
    let reply = client
        .generate(greedy(MAX_TOKENS))
        .await
        .map_err(|s| format!("Generate on {endpoint}: {s}"))?;
    Ok(reply.into_inner().token_ids)
}

/// The token ids a GenerateStream returns, or the status it ended with. Each call opens a
/// connection of its own (balanced by kube-proxy on its own). `pace` per token makes a
/// client that reads as it shows (e.g. 10 ms: about 100 tokens/s), so the stream stays in
/// flight for seconds whatever the server's speed.
async fn generate_stream(
    endpoint: &str,
    max_tokens: u32,
    pace: Duration,
    on_chunk: impl FnMut(usize),
) -> Result<Vec<u32>, String> {
    generate_stream_of(endpoint, greedy(max_tokens), pace, on_chunk).await
}

/// [`generate_stream`] of `request`.
async fn generate_stream_of(
    endpoint: &str,
    request: pb::GenerateRequest,
    pace: Duration,
    mut on_chunk: impl FnMut(usize),
) -> Result<Vec<u32>, String> {
    let mut client = InferenceClient::connect(endpoint.to_string())
        .await
        .map_err(|e| format!("connecting to {endpoint}: {e}"))?;
    let mut stream = client
        .generate_stream(request)
        .await
        .map_err(|s| format!("GenerateStream: {s}"))?
        .into_inner();
    let mut ids = Vec::new();
    while let Some(message) = stream.next().await {
        match message.map_err(|s| format!("stream ended with {s}"))?.event {
            Some(Event::Chunk(chunk)) => {
                let n = chunk.token_ids.len() as u32;
                ids.extend(chunk.token_ids);
                on_chunk(ids.len());
                tokio::time::sleep(pace * n).await;
            }
            Some(Event::Summary(_)) => return Ok(ids),
            None => {}
        }
    }
    Err("the stream ended without a summary".into())
}

/// Merge-patches `spec` into the ModelDeployment `MD`'s spec; `what` names the change if
/// the API refuses it.
async fn patch_spec(
    mds: &Api<ModelDeployment>,
    spec: serde_json::Value,
    what: &str,
) -> ModelDeployment {
    mds.patch(
        MD,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": spec})),
    )
    .await
    .unwrap_or_else(|e| panic!("patching {what}: {e}"))
}

/// A stream of 400 tokens through `endpoint`, read at about 100 tokens/s so it stays in
/// flight for seconds while a step injects a fault; its task ends with the tokens.
fn paced_stream(endpoint: &str) -> tokio::task::JoinHandle<Result<Vec<u32>, String>> {
    let endpoint = endpoint.to_string();
    tokio::spawn(
        async move { generate_stream(&endpoint, 400, Duration::from_millis(10), |_| {}).await },
    )
}

/// A unary Generate of `max_tokens` on `channel` with `key`.
async fn keyed_on(
    channel: tonic::transport::Channel,
    key: &str,
    max_tokens: u32,
) -> Result<Vec<u32>, tonic::Status> {
    let mut request = tonic::Request::new(greedy(max_tokens));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}")
            .parse()
            .map_err(|_| tonic::Status::internal("key"))?,
    );
    InferenceClient::new(channel)
        .generate(request)
        .await
        .map(|r| r.into_inner().token_ids)
}

/// A GenerateStream of `max_tokens` on `channel` with `key`, read to its summary; its
/// time to first token. `pace` per token keeps it in flight as a reading client would.
async fn keyed_stream_ttft(
    channel: tonic::transport::Channel,
    key: &str,
    max_tokens: u32,
    pace: Duration,
) -> Result<Duration, tonic::Status> {
    let mut request = tonic::Request::new(greedy(max_tokens));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}")
            .parse()
            .map_err(|_| tonic::Status::internal("key"))?,
    );
    let began = Instant::now();
    let mut stream = InferenceClient::new(channel)
        .generate_stream(request)
        .await?
        .into_inner();
    let mut first = None;
    while let Some(message) = stream.next().await {
        match message?.event {
            Some(Event::Chunk(chunk)) => {
                first.get_or_insert_with(|| began.elapsed());
                tokio::time::sleep(pace * chunk.token_ids.len() as u32).await;
            }
            Some(Event::Summary(_)) => {
                return first.ok_or_else(|| tonic::Status::internal("a summary without tokens"));
            }
            None => {}
        }
    }
    Err(tonic::Status::internal(
        "the stream ended without a summary",
    ))
}

/// How long each caller of a spike keeps streaming.
const SPIKE_FOR: Duration = Duration::from_secs(6);

/// One caller of a spike: GenerateStreams of 200 tokens, read as fast as they come, back
/// to back for [`SPIKE_FOR`], each on a connection of its own through `endpoint`, with
/// `key` when set: a closed loop that always has a request in the system. (A stream read
/// at a human pace leaves the server long before the reader is done; the tiny model
/// generates 200 tokens in a fraction of a second, so one stream per caller is a blip, not
/// a spike.) The streams it completed, or the first failure.
async fn spike_caller(endpoint: String, key: Option<&'static str>) -> Result<usize, String> {
    let began = Instant::now();
    let mut streams = 0;
    while began.elapsed() < SPIKE_FOR {
        match key {
            None => {
                let ids = generate_stream(&endpoint, 200, Duration::ZERO, |_| {}).await?;
                if ids.len() != 200 {
                    return Err(format!("{} of 200 tokens", ids.len()));
                }
            }
            Some(key) => {
                let channel = tonic::transport::Channel::from_shared(endpoint.clone())
                    .map_err(|e| e.to_string())?
                    .connect()
                    .await
                    .map_err(|e| e.to_string())?;
                keyed_stream_ttft(channel, key, 200, Duration::ZERO)
                    .await
                    .map_err(|s| s.to_string())?;
            }
        }
        streams += 1;
    }
    Ok(streams)
}

/// `tenants` (name, API key) as the load generator's tenants, of weight 1.
fn keyed_tenants(tenants: &[(&str, &str)]) -> Vec<switchyard_cli::loadgen::Tenant> {
    use switchyard_cli::loadgen::{ApiKey, Tenant};
    tenants
        .iter()
        .map(|(name, key)| Tenant {
            name: (*name).into(),
            api_key: Some(ApiKey::new(key).expect("a key")),
            weight: 1,
        })
        .collect()
}

/// Runs `scenario` open-loop at `rate` for `duration` against `endpoint` over four
/// connections, as `switchyard bench --connections 4` (kube-proxy balances connections,
/// not calls, so one HTTP/2 connection would pin every request to one frontend however
/// many there are), with a 30 s timeout per request and a per-second series.
async fn bench_over_four_connections(
    endpoint: &str,
    scenario: switchyard_cli::loadgen::Scenario,
    rate: f64,
    duration: Duration,
    seed: u64,
    replicas_command: Option<String>,
) -> switchyard_cli::loadgen::Report {
    use switchyard_cli::loadgen::{self, BenchConfig, Load};
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(
            switchyard_cli::client::connect(endpoint)
                .await
                .expect("a connection"),
        );
    }
    loadgen::run_bench(
        channels,
        BenchConfig {
            ttft_slo: None,
            scenario,
            load: Load::Open { rate },
            duration: Some(duration),
            requests: None,
            warmup: Duration::ZERO,
            timeout: Duration::from_secs(30),
            seed,
            progress: loadgen::ProgressMode::Off,
            series: Some(loadgen::SeriesOptions { replicas_command }),
            openai: None,
        },
        std::future::pending(),
    )
    .await
    .expect("the bench run")
}

/// Runs `switchyard bench --scenario KIND --series OUT` (the library behind it) against
/// `endpoint`: acme at 1 request/s, × 8 in the spike or the bursts (about 3× what one
/// frontend of the tiny MoE generates on this node), the attacker at 5/s; 256 tokens each. Returns the series it wrote.
async fn bench_series(
    endpoint: &str,
    kind: ScenarioKind,
    tenants: &[(&str, &str)],
    replicas_command: &str,
    out: &Path,
) -> Vec<switchyard_edge::series::Row> {
    bench_series_with_outcomes(endpoint, kind, tenants, replicas_command, out)
        .await
        .0
}

/// [`bench_series`], and how the requests ended (`N ok, M failed {errors}`).
async fn bench_series_with_outcomes(
    endpoint: &str,
    kind: ScenarioKind,
    tenants: &[(&str, &str)],
    replicas_command: &str,
    out: &Path,
) -> (Vec<switchyard_edge::series::Row>, String) {
    use switchyard_cli::loadgen::{self, Scenario, Shape};
    let duration = Duration::from_secs(60);
    let shape = match kind {
        ScenarioKind::Spike | ScenarioKind::FloodSpike => Shape::Spike {
            from: duration / 3,
            to: duration * 2 / 3,
            factor: 8.0,
        },
        ScenarioKind::Yoyo => Shape::Yoyo {
            period: Duration::from_secs(20),
            burst: Duration::from_secs(5),
            factor: 8.0,
        },
        _ => Shape::Steady,
    };
    let tenants = keyed_tenants(tenants);
    let workload = loadgen::Workload {
        model: String::new(),
        prompt_tokens: 16,
        prompt_tokens_jitter: 0,
        output_tokens: 256,
        vocab: loadgen::VocabRange {
            start: 100,
            end: 300,
        },
        priority: pb::Priority::Unspecified,
        shared_prefix: Vec::new(),
    };
    let (scenario, total) =
        Scenario::named_shaped(kind, tenants, workload, 1.0, 5.0, shape).expect("the scenario");
    let report = bench_over_four_connections(
        endpoint,
        scenario,
        total,
        duration,
        5,
        Some(replicas_command.to_string()),
    )
    .await;
    let rows = report.series.clone().expect("a series");
    let names: Vec<&str> = report.tenants.iter().map(|t| t.name.as_str()).collect();
    let stem = kind.name().replace('+', "-");
    std::fs::create_dir_all(out).expect("the series directory");
    std::fs::write(
        out.join(format!("{stem}.csv")),
        switchyard_edge::series::csv(&names, &rows),
    )
    .expect("writing the CSV");
    std::fs::write(
        out.join(format!("{stem}.svg")),
        switchyard_edge::series::svg(
            &format!("{}: measured on the real node (tiny MoE, CPU)", kind.name()),
            &names,
            &rows,
        ),
    )
    .expect("writing the SVG");
    let outcomes = format!(
        "{} ok, {} failed {:?}",
        report.total.ok, report.total.failed, report.total.errors
    );
    (rows, outcomes)
}

/// The UIDs of the pods of `selector`, terminating ones included, sorted.
async fn uids_of(client: &kube::Client, namespace: &str, selector: &str) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut uids: Vec<String> = pods
        .list(&ListParams::default().labels(selector))
        .await
        .expect("listing pods")
        .items
        .into_iter()
        .filter_map(|p| p.metadata.uid)
        .collect();
    uids.sort();
    uids
}

/// Polls the pods of `selector` until `remaining` are left; returns, per pod that went,
/// the time from when its deletion was first seen (the kubelet's SIGTERM follows at once)
/// to when it was gone: the drain the users' streams lived through.
async fn watch_drains(
    client: &kube::Client,
    namespace: &str,
    selector: &str,
    remaining: usize,
    timeout: Duration,
) -> Vec<(String, Duration)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut deleting: std::collections::BTreeMap<String, Instant> = Default::default();
    let mut gone = Vec::new();
    let until = Instant::now() + timeout;
    loop {
        let list = pods
            .list(&ListParams::default().labels(selector))
            .await
            .expect("listing pods");
        let names: Vec<String> = list
            .items
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        for pod in &list.items {
            if pod.metadata.deletion_timestamp.is_some()
                && let Some(name) = &pod.metadata.name
            {
                deleting.entry(name.clone()).or_insert_with(Instant::now);
            }
        }
        for (name, since) in &deleting {
            if !names.contains(name) && !gone.iter().any(|(n, _)| n == name) {
                gone.push((name.clone(), since.elapsed()));
            }
        }
        if names.len() == remaining && gone.len() == deleting.len() {
            return gone;
        }
        assert!(
            Instant::now() < until,
            "{} pod(s) of {selector} left after {timeout:?}, want {remaining}",
            names.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints, per pod, where its start-up time went: created → scheduled → container
/// started (sandbox, network, container; the images are already on the node) → Ready
/// (model load, and the wait for the next probe). Kubernetes keeps these times in whole
/// seconds. The figures are in docs/benchmarks.md.
async fn print_pod_timelines(client: &kube::Client, namespace: &str, selector: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let Ok(list) = pods.list(&ListParams::default().labels(selector)).await else {
        return;
    };
    let ms = |t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time| t.0.as_millisecond();
    for pod in list.items {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let Some(created) = pod.metadata.creation_timestamp.as_ref().map(ms) else {
            continue;
        };
        let status = pod.status.unwrap_or_default();
        let condition = |kind: &str| {
            status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == kind && c.status == "True")
                .and_then(|c| c.last_transition_time.as_ref().map(ms))
        };
        let started = status.container_statuses.iter().flatten().find_map(|c| {
            c.state
                .as_ref()?
                .running
                .as_ref()?
                .started_at
                .as_ref()
                .map(ms)
        });
        let span = |from: Option<i64>, to: Option<i64>| match (from, to) {
            (Some(a), Some(b)) => format!("{:.0}s", (b - a) as f64 / 1000.0),
            _ => "?".into(),
        };
        let scheduled = condition("PodScheduled");
        let ready = condition("Ready");
        let _ = writeln!(
            std::io::stderr(),
            "switchyard-tests: real node: pod {name}: scheduled {}, container started {}, Ready {} \
             (created to Ready {})",
            span(Some(created), scheduled),
            span(scheduled, started),
            span(started, ready),
            span(Some(created), ready)
        );
    }
}

/// Unix time now, in seconds.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One new frontend's way to useful capacity, in seconds after the decision (the write to
/// the scale subresource, as the autoscaler makes it): its pod scheduled and Ready (seen
/// by a 50 ms poll of the API), its process started, its weights loaded and its gRPC port
/// open (the worker's own clock, `switchyard_startup_timestamp_seconds`), and the first
/// token it served to a request that came through the Service
/// (`switchyard_first_token_timestamp_seconds`). The node's clock is the test's.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Capacity {
    scheduled: f64,
    started: f64,
    loaded: f64,
    listening: f64,
    ready: f64,
    first_token: f64,
}

impl Capacity {
    /// The per-step medians of `runs`.
    fn median(runs: &[Capacity]) -> Capacity {
        let m = |f: fn(&Capacity) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        Capacity {
            scheduled: m(|c| c.scheduled),
            started: m(|c| c.started),
            loaded: m(|c| c.loaded),
            listening: m(|c| c.listening),
            ready: m(|c| c.ready),
            first_token: m(|c| c.first_token),
        }
    }

    fn line(&self) -> String {
        format!(
            "scheduled {:.2}s, process started {:.2}s, weights loaded {:.2}s, port open {:.2}s, \
             Ready {:.2}s, first token served {:.2}s",
            self.scheduled, self.started, self.loaded, self.listening, self.ready, self.first_token
        )
    }
}

/// Scales `md`'s frontends up by one, times the new pod's way to its first token served
/// through `endpoint` ([`Capacity`]), and scales back down (the pod drained and gone).
/// Requests of one token go to the Service every 100 ms throughout, each on a connection
/// of its own, so the new pod is sent work as soon as kube-proxy knows it: the load a
/// scale-up is for.
async fn time_to_capacity(
    client: &kube::Client,
    namespace: &str,
    md: &str,
    endpoint: &str,
) -> Capacity {
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = format!("app.kubernetes.io/instance={md},app.kubernetes.io/component=frontend");
    let names = |list: &[Pod]| -> std::collections::HashSet<String> {
        list.iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect()
    };
    let listed = || async {
        pods.list(&ListParams::default().labels(&selector))
            .await
            .expect("listing the frontends")
            .items
    };
    let before = names(&listed().await);
    let replicas = mds
        .get(md)
        .await
        .expect("the ModelDeployment")
        .spec
        .frontend
        .replicas;
    let traffic = {
        let endpoint = endpoint.to_string();
        tokio::spawn(async move {
            loop {
                let endpoint = endpoint.clone();
                tokio::spawn(async move {
                    if let Ok(mut c) = InferenceClient::connect(endpoint).await {
                        let _ = c.generate(greedy(1)).await;
                    }
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let t0 = unix_now();
    let scale = |n: i32| {
        let mds = mds.clone();
        async move {
            mds.patch_scale(
                md,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"replicas": n}})),
            )
            .await
            .expect("writing the scale subresource")
        }
    };
    scale(replicas + 1).await;
    let deadline = Instant::now() + POD_TIMEOUT;
    let mut scheduled = None;
    let (ready, ip) = loop {
        assert!(Instant::now() < deadline, "no new Ready frontend of {md}");
        let new = listed()
            .await
            .into_iter()
            .find(|p| !before.contains(p.metadata.name.as_deref().unwrap_or_default()));
        if let Some(pod) = new {
            let at = unix_now() - t0;
            if scheduled.is_none() && pod.spec.as_ref().is_some_and(|s| s.node_name.is_some()) {
                scheduled = Some(at);
            }
            if switchyard_tests::node::is_pod_ready(&pod) {
                break (
                    at,
                    pod.status.and_then(|s| s.pod_ip).expect("a Ready pod's IP"),
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let metrics = || {
        let ip = ip.clone();
        async move { http_get(&ip, 9090, "/metrics").await.unwrap_or_default() }
    };
    let text = metrics().await;
    let phase = |p: &str| {
        metric(
            &text,
            &format!("switchyard_startup_timestamp_seconds{{phase=\"{p}\"}}"),
        ) - t0
    };
    let (started, loaded, listening) = (phase("process"), phase("loaded"), phase("listening"));
    let first_token = loop {
        assert!(
            Instant::now() < deadline,
            "the new frontend {ip} of {md} served no request through the Service"
        );
        let first = metric(&metrics().await, "switchyard_first_token_timestamp_seconds");
        if first > 0.0 {
            break first - t0;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    traffic.abort();
    scale(replicas).await;
    loop {
        assert!(
            Instant::now() < deadline + POD_TIMEOUT,
            "{md} never back to {replicas} frontends"
        );
        if listed().await.len() == usize::try_from(replicas).unwrap_or_default() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Capacity {
        scheduled: scheduled.unwrap_or(ready),
        started,
        loaded,
        listening,
        ready,
        first_token,
    }
}

/// [`time_to_capacity`] 5 times, each run and the medians printed.
async fn capacity_runs(
    client: &kube::Client,
    namespace: &str,
    md: &str,
    endpoint: &str,
) -> Vec<Capacity> {
    let mut runs = Vec::new();
    for run in 1..=5 {
        let c = time_to_capacity(client, namespace, md, endpoint).await;
        let _ = writeln!(
            std::io::stderr(),
            "switchyard-tests: real node: capacity {md} run {run}: {}",
            c.line()
        );
        runs.push(c);
    }
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: capacity {md} median of 5: {}",
        Capacity::median(&runs).line()
    );
    runs
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The checkpoint directory on the node, readable by the pods' non-root user.
fn model_on_node(namespace: &str, fixture: &str) -> PathBuf {
    let dir = Path::new(ROOT)
        .join("volumes")
        .join(namespace)
        .join(fixture);
    std::fs::create_dir_all(&dir).expect("creating the volume directory");
    let fixture = fixture_model(fixture);
    for entry in std::fs::read_dir(&fixture).expect("reading the fixture") {
        let entry = entry.expect("fixture entry");
        if entry.file_type().expect("file type").is_file() {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copying the fixture");
        }
    }
    let _ = std::process::Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(Path::new(ROOT).join("volumes"))
        .status();
    let _ = std::process::Command::new("chmod")
        .args(["a+x", ROOT])
        .status();
    dir
}

fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a valid object")
}

async fn pod_ips(client: &kube::Client, namespace: &str, selector: &str) -> Vec<(String, String)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.list(&ListParams::default().labels(selector))
        .await
        .expect("listing pods")
        .items
        .into_iter()
        .filter(switchyard_tests::node::is_pod_ready)
        .filter_map(|p| Some((p.metadata.name?, p.status?.pod_ip?)))
        .collect()
}

/// What explains a step that failed through the Service: per pod of `selector`, its IP,
/// phase, readiness and whether it is terminating, and its log's last lines; then the
/// kernel's connection-tracking entries to `cluster_ip` (which pod each connection through
/// the Service went to).
async fn explain_service(
    client: &kube::Client,
    namespace: &str,
    selector: &str,
    cluster_ip: &str,
) -> String {
    use std::fmt::Write as _;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut out = String::new();
    let list = match pods.list(&ListParams::default().labels(selector)).await {
        Ok(list) => list.items,
        Err(e) => return format!("listing pods: {e}"),
    };
    for pod in list {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "--- pod {name}: ip {:?}, phase {:?}, ready {}, terminating {}",
            status.pod_ip,
            status.phase,
            switchyard_tests::node::is_pod_ready(&pod),
            pod.metadata.deletion_timestamp.is_some(),
        );
        let params = LogParams {
            tail_lines: Some(15),
            ..LogParams::default()
        };
        match pods.logs(&name, &params).await {
            Ok(text) => out.push_str(&text),
            Err(e) => {
                let _ = writeln!(out, "(no log: {e})");
            }
        }
    }
    match std::process::Command::new("conntrack")
        .args(["-L", "-d", cluster_ip])
        .output()
    {
        Ok(o) => {
            let _ = writeln!(
                out,
                "--- conntrack -L -d {cluster_ip}:\n{}",
                String::from_utf8_lossy(&o.stdout)
            );
        }
        Err(e) => {
            let _ = writeln!(out, "--- conntrack: {e}");
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_with_helm_it_serves_through_the_service_and_uninstalls_cleanly() {
    let node = RealNode::shared().await.expect("the real test node");
    let helm = tool("helm").expect("helm");
    let kubectl = tool("kubectl").expect("kubectl");
    let grpcurl = tool("grpcurl").expect("grpcurl");
    let client = node.control_plane().client().await.expect("client");
    let chart = chart_dir();
    let chart = chart.to_str().expect("a UTF-8 chart path");

    // 1. helm install: two operator pods, one leader, helm test passes.
    let t = Instant::now();
    node.run(
        &helm,
        &[
            "install",
            RELEASE,
            chart,
            "--namespace",
            RELEASE_NAMESPACE,
            "--create-namespace",
            "--wait",
            "--timeout",
            "3m",
        ],
    )
    .await
    .expect("helm install");
    let operator_selector =
        "app.kubernetes.io/name=switchyard,app.kubernetes.io/component=operator";
    node.wait_for_ready_pods(
        &client,
        RELEASE_NAMESPACE,
        operator_selector,
        2,
        POD_TIMEOUT,
    )
    .await
    .expect("two operator pods Ready");
    let operator_pods: Vec<String> = pod_ips(&client, RELEASE_NAMESPACE, operator_selector)
        .await
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    node.wait_for(
        &client,
        RELEASE_NAMESPACE,
        operator_selector,
        "an operator pod holding the leader Lease",
        POD_TIMEOUT,
        || {
            let leases = leases.clone();
            let operator_pods = operator_pods.clone();
            async move {
                let lease = leases
                    .get_opt(RELEASE)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("no Lease yet")?;
                let holder = lease
                    .spec
                    .and_then(|s| s.holder_identity)
                    .unwrap_or_default();
                if operator_pods.contains(&holder) {
                    Ok(true)
                } else {
                    Err(format!(
                        "Lease held by {holder:?}, not by {operator_pods:?}"
                    ))
                }
            }
        },
    )
    .await
    .expect("an operator pod leads");
    step("helm install to operator Ready and leading", t);
    print_pod_timelines(&client, RELEASE_NAMESPACE, operator_selector).await;
    let t = Instant::now();
    node.run(
        &helm,
        &[
            "test",
            RELEASE,
            "--namespace",
            RELEASE_NAMESPACE,
            "--timeout",
            "2m",
        ],
    )
    .await
    .expect("helm test");
    step("helm test", t);

    // 2. A checkpoint on a local PersistentVolume, claimed in the test's namespace.
    let ns = node.namespace("md").await.expect("namespace");
    let namespace = ns.name.as_str();
    let model_dir = model_on_node(namespace, "qwen3_moe");
    let pv_name = format!("{namespace}-model");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    pvs.create(
        &PostParams::default(),
        &from_json(serde_json::json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv_name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "switchyard-test-local",
                "local": {"path": model_dir.display().to_string()},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE_NAME]}
                ]}]}},
            },
        })),
    )
    .await
    .expect("creating the PersistentVolume");
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    pvcs.create(
        &PostParams::default(),
        &from_json(serde_json::json!({
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "models"},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "switchyard-test-local",
                "volumeName": pv_name,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        })),
    )
    .await
    .expect("creating the PersistentVolumeClaim");

    // 3. The ModelDeployment: no image given, so the operator's release default is used.
    let t = Instant::now();
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), namespace);
    mds.create(
        &PostParams::default(),
        &from_json(serde_json::json!({
            "apiVersion": "switchyard.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": MD},
            "spec": {
                "model": {"pvc": {"claimName": "models", "path": "/"}, "dtype": "f32"},
                "frontend": {"replicas": 2},
                "experts": {"shards": 2},
                "serving": {"maxBatchSize": 8},
            },
        })),
    )
    .await
    .expect("creating the ModelDeployment");
    let instance = format!("app.kubernetes.io/instance={MD}");
    node.wait_for(
        &client,
        namespace,
        &instance,
        "ModelDeployment Ready=True",
        POD_TIMEOUT,
        || {
            let mds = mds.clone();
            async move {
                let md = mds.get(MD).await.map_err(|e| e.to_string())?;
                let ready = md
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
                    .map(|c| (c.status.clone(), c.message.clone()));
                match ready {
                    Some((status, _)) if status == "True" => Ok(true),
                    Some((status, message)) => Err(format!("Ready={status}: {message}")),
                    None => Err("no Ready condition yet".into()),
                }
            }
        },
    )
    .await
    .expect("the ModelDeployment becomes Ready");
    let frontend_selector = format!("{instance},app.kubernetes.io/component=frontend");
    let shard_selector = format!("{instance},app.kubernetes.io/component=expert-shard");
    node.wait_for_ready_pods(&client, namespace, &frontend_selector, 2, POD_TIMEOUT)
        .await
        .expect("2 frontends Ready");
    node.wait_for_ready_pods(&client, namespace, &shard_selector, 2, POD_TIMEOUT)
        .await
        .expect("2 shards Ready");
    step(
        "ModelDeployment apply to Ready=True (2 frontends, 2 shards)",
        t,
    );
    print_pod_timelines(&client, namespace, &instance).await;

    // 4. Through the Service's ClusterIP (kube-proxy), the same tokens as in process.
    let reference = {
        let local = FrontendProcess::start(&fixture_model("qwen3_moe"), &["--dtype", "f32"])
            .await
            .expect("an in-process frontend on loopback");
        generate(&local.endpoint())
            .await
            .expect("in-process tokens")
    };
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let service = services.get(MD).await.expect("the client Service");
    let cluster_ip = service
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("the Service has a ClusterIP");
    let endpoint = format!("http://{cluster_ip}:50051");
    let t = Instant::now();
    let unary = generate(&endpoint)
        .await
        .expect("Generate through the Service");
    step("first Generate through the Service", t);
    assert_eq!(
        unary, reference,
        "the deployment gives the in-process tokens"
    );
    let streamed = generate_stream(&endpoint, MAX_TOKENS, Duration::ZERO, |_| {})
        .await
        .expect("GenerateStream through the Service");
    assert_eq!(
        streamed, reference,
        "streamed tokens equal the in-process ones"
    );
    // Several calls, so both frontends (kube-proxy picks at random) and both shards work.
    for _ in 0..6 {
        assert_eq!(generate(&endpoint).await.expect("Generate"), reference);
    }
    let shards = pod_ips(&client, namespace, &shard_selector).await;
    assert_eq!(shards.len(), 2, "{shards:?}");
    for (name, ip) in &shards {
        let text = http_get(ip, 9090, "/metrics").await.expect("shard metrics");
        let rows = metric(&text, "switchyard_shard_rows_total");
        assert!(
            rows > 0.0,
            "shard {name} found through the headless Service's DNS served no rows:\n{text}"
        );
    }

    // 5. grpcurl, a third-party client: reflection and a Generate through the Service.
    let target = format!("{cluster_ip}:50051");
    let listed = node
        .run(&grpcurl, &["-plaintext", &target, "list"])
        .await
        .expect("grpcurl list");
    assert!(listed.contains("switchyard.v1.Inference"), "{listed}");
    let body = format!(
        r#"{{"prompt": "{PROMPT}", "sampling": {{"max_tokens": {MAX_TOKENS}, "temperature": 0, "ignore_eos": true}}}}"#
    );
    let answer = node
        .run(
            &grpcurl,
            &[
                "-plaintext",
                "-d",
                &body,
                &target,
                "switchyard.v1.Inference/Generate",
            ],
        )
        .await
        .expect("grpcurl Generate");
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("grpcurl prints JSON");
    let ids: Vec<u32> = answer["tokenIds"]
        .as_array()
        .expect("tokenIds in the answer")
        .iter()
        .filter_map(|v| v.as_u64().map(|v| v as u32))
        .collect();
    assert_eq!(ids, reference, "grpcurl gets the same tokens: {answer}");

    // 6. A shard pod deleted mid-stream: the stream ends (tokens or a clear status, never
    // a hang), the StatefulSet restores the pod, and new requests succeed.
    let t = Instant::now();
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let victim = format!("{MD}-experts-1");
    let (deleted_tx, deleted_rx) = tokio::sync::oneshot::channel::<()>();
    let mut deleted_tx = Some(deleted_tx);
    let stream = generate_stream(&endpoint, 400, Duration::ZERO, |n| {
        if n == 5
            && let Some(tx) = deleted_tx.take()
        {
            let _ = tx.send(());
        }
    });
    let deleter = async {
        if deleted_rx.await.is_ok() {
            pods.delete(&victim, &DeleteParams::default().grace_period(0))
                .await
                .expect("deleting a shard pod");
        }
    };
    let (outcome, ()) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(stream, deleter)
    })
    .await
    .expect("the stream ends (with tokens or a status) after its shard is deleted");
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: the stream across the shard deletion ended with {}",
        match &outcome {
            Ok(ids) => format!("{} tokens", ids.len()),
            Err(e) => e.clone(),
        }
    );
    node.wait_for_ready_pods(&client, namespace, &shard_selector, 2, POD_TIMEOUT)
        .await
        .expect("the StatefulSet restores the shard");
    // Every frontend must find the shard again: each benches a failed shard with a backoff
    // of its own (up to 30 s), so ask each one directly, not through the Service.
    node.wait_for(
        &client,
        namespace,
        &instance,
        "every frontend to serve again after the shard came back",
        POD_TIMEOUT,
        || {
            let client = client.clone();
            let frontend_selector = frontend_selector.clone();
            let reference = reference.clone();
            async move {
                let frontends = pod_ips(&client, namespace, &frontend_selector).await;
                if frontends.len() != 2 {
                    return Err(format!("{} frontend(s) Ready", frontends.len()));
                }
                for (name, ip) in frontends {
                    let got = generate(&format!("http://{ip}:50051"))
                        .await
                        .map_err(|e| format!("frontend {name}: {e}"))?;
                    if got != reference {
                        return Err(format!("frontend {name}: different tokens {got:?}"));
                    }
                }
                Ok(true)
            }
        },
    )
    .await
    .expect("new requests succeed on every frontend");
    for _ in 0..4 {
        assert_eq!(
            generate(&endpoint)
                .await
                .expect("Generate through the Service"),
            reference
        );
    }
    check_every_frontends_accounting(&client, namespace, &frontend_selector, "a shard deleted")
        .await;
    step(
        "shard pod deleted mid-stream to requests succeeding again",
        t,
    );

    // 6b. A frontend pod killed mid-stream (deleted with grace 0: SIGKILL, no drain): the
    // client reading from it gets an error promptly, never a hang, and calls through the
    // Service succeed while the Deployment replaces the pod. The client reads at 50 tokens/s
    // with a 1 KiB HTTP/2 window, so the stream is still being generated when the pod dies
    // (with the default 64 KiB window all 400 tokens would already sit in its buffer).
    let t = Instant::now();
    let frontends = pod_ips(&client, namespace, &frontend_selector).await;
    let (victim, victim_ip) = frontends.first().cloned().expect("a Ready frontend");
    let survivor_ip = frontends
        .iter()
        .find(|(name, _)| *name != victim)
        .map(|(_, ip)| ip.clone())
        .expect("a second Ready frontend");
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{victim_ip}:50051"))
            .expect("an endpoint")
            .initial_stream_window_size(Some(1024))
            .initial_connection_window_size(Some(1024))
            .connect()
            .await
            .expect("connecting to the frontend");
        let mut stream = InferenceClient::new(channel)
            .generate_stream(greedy(400))
            .await
            .expect("the stream starts")
            .into_inner();
        let (mut tokens, mut kill_tx) = (0usize, Some(kill_tx));
        loop {
            match stream.next().await {
                Some(Ok(message)) => {
                    if let Some(Event::Chunk(chunk)) = message.event {
                        tokens += chunk.token_ids.len();
                        if tokens >= 5
                            && let Some(tx) = kill_tx.take()
                        {
                            let _ = tx.send(());
                        }
                        tokio::time::sleep(
                            Duration::from_millis(20) * chunk.token_ids.len() as u32,
                        )
                        .await;
                    }
                }
                Some(Err(status)) => return (tokens, Err(status), Instant::now()),
                None => return (tokens, Ok(()), Instant::now()),
            }
        }
    };
    let killer = async {
        kill_rx.await.expect("the stream reached 5 tokens");
        let at = Instant::now();
        pods.delete(&victim, &DeleteParams::default().grace_period(0))
            .await
            .expect("deleting a frontend pod");
        at
    };
    let ((tokens, ended, ended_at), killed_at) =
        tokio::time::timeout(Duration::from_secs(60), async {
            tokio::join!(reader, killer)
        })
        .await
        .expect("the stream from the killed frontend ends (an error, never a hang)");
    let status = ended.expect_err("a stream whose frontend was killed cannot finish");
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: frontend {victim} killed at token {tokens}: the client's \
         stream ended {:.2}s after the delete with {:?}: {}",
        ended_at.duration_since(killed_at).as_secs_f64(),
        status.code(),
        status.message()
    );
    // Through the Service, a client that retries succeeds.
    let retried = Instant::now();
    let mut failures = Vec::new();
    loop {
        match generate(&endpoint).await {
            Ok(ids) => {
                assert_eq!(ids, reference, "tokens through the Service after the kill");
                break;
            }
            Err(e) => failures.push(e),
        }
        assert!(
            retried.elapsed() < Duration::from_secs(60),
            "no call through the Service succeeded within 60 s of the kill: {failures:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: the first call through the Service after the kill \
         succeeded after {} failed call(s) {failures:?}",
        failures.len()
    );
    node.wait_for_ready_pods(&client, namespace, &frontend_selector, 2, POD_TIMEOUT)
        .await
        .expect("the Deployment replaces the killed frontend");
    // The frontend that lived through it still accounts for every request it admitted.
    let text = http_get(&survivor_ip, 9090, "/metrics")
        .await
        .expect("the surviving frontend's metrics");
    switchyard_tests::accounting::Accounting::parse(&text)
        .check()
        .expect("the surviving frontend's accounting");
    step(
        "a frontend pod killed mid-stream: its stream errs within seconds, retries served",
        t,
    );

    // 7. kubectl scale: a third frontend that serves.
    let t = Instant::now();
    let scale = |replicas: u32| {
        let (node, kubectl) = (&node, &kubectl);
        async move {
            node.run(
                kubectl,
                &[
                    "scale",
                    "-n",
                    namespace,
                    &format!("md/{MD}"),
                    &format!("--replicas={replicas}"),
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("kubectl scale to {replicas}: {e}"))
        }
    };
    scale(3).await;
    node.wait_for_ready_pods(&client, namespace, &frontend_selector, 3, POD_TIMEOUT)
        .await
        .expect("3 frontends Ready");
    for (name, ip) in pod_ips(&client, namespace, &frontend_selector).await {
        let got = generate(&format!("http://{ip}:50051"))
            .await
            .unwrap_or_else(|e| panic!("frontend {name} serves: {e}"));
        assert_eq!(got, reference, "frontend {name}");
    }
    step("kubectl scale to a third frontend serving", t);

    // 7b. Scale 3 → 1 while 20 streams run, each on its own connection through the
    // Service (so kube-proxy spreads them over all three frontends): every stream ends
    // with all its tokens; the two stopping frontends drain instead of cutting them.
    let t = Instant::now();
    const STREAMS: usize = 20;
    const DRAIN_TOKENS: u32 = 400;
    let started = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let streams: Vec<_> = (0..STREAMS)
        .map(|_| {
            let endpoint = endpoint.clone();
            let started = started.clone();
            tokio::spawn(async move {
                let began = Instant::now();
                let mut first = true;
                let result =
                    generate_stream(&endpoint, DRAIN_TOKENS, Duration::from_millis(10), |_| {
                        if std::mem::take(&mut first) {
                            started.add_permits(1);
                        }
                    })
                    .await;
                (result, began.elapsed())
            })
        })
        .collect();
    let _ = tokio::time::timeout(
        Duration::from_secs(60),
        started.acquire_many(STREAMS as u32),
    )
    .await
    .expect("every stream got its first token");
    let scaled_at = Instant::now();
    scale(1).await;
    let drains = watch_drains(&client, namespace, &frontend_selector, 1, POD_TIMEOUT).await;
    let mut cut = Vec::new();
    let mut lasted = Vec::new();
    let mut tokens = Vec::new();
    for (i, stream) in streams.into_iter().enumerate() {
        let (result, took) = stream.await.expect("the stream task");
        match result {
            Ok(ids) if ids.len() == DRAIN_TOKENS as usize => {
                lasted.push(took);
                tokens.push(ids);
            }
            Ok(ids) => cut.push(format!(
                "stream {i}: {} of {DRAIN_TOKENS} tokens",
                ids.len()
            )),
            Err(e) => cut.push(format!("stream {i}: {e}")),
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: scale 3 → 1 under {STREAMS} streams: {} cut; streams took \
         {:.1}–{:.1}s; drains (SIGTERM seen → pod gone): {}; the last pod gone {:.1}s after kubectl scale",
        cut.len(),
        lasted.iter().min().map_or(0.0, Duration::as_secs_f64),
        lasted.iter().max().map_or(0.0, Duration::as_secs_f64),
        drains
            .iter()
            .map(|(pod, d)| format!("{pod} {:.1}s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
        scaled_at.elapsed().as_secs_f64(),
    );
    assert!(cut.is_empty(), "streams cut by the scale-down: {cut:?}");
    assert_eq!(drains.len(), 2, "two frontends stopped: {drains:?}");
    assert!(
        tokens.windows(2).all(|w| w[0] == w[1]),
        "every greedy stream of the same prompt got the same tokens"
    );
    step("scale 3 → 1 under 20 streams, none cut", t);

    // 7c. A frontend-only change (a serving limit) rolls the frontend and leaves the
    // shards, and their loaded experts, alone.
    let t = Instant::now();
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let shards_before = uids_of(&client, namespace, &shard_selector).await;
    let frontends_before = uids_of(&client, namespace, &frontend_selector).await;
    let mds_api: Api<ModelDeployment> = Api::namespaced(client.clone(), namespace);
    mds_api
        .patch(
            MD,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"serving": {"maxBatchSize": 5}}})),
        )
        .await
        .expect("patching a serving limit");
    node.wait_for(
        &client,
        namespace,
        &instance,
        "the frontend replaced and Ready",
        POD_TIMEOUT,
        || {
            let (client, frontend_selector, frontends_before) = (
                client.clone(),
                frontend_selector.clone(),
                frontends_before.clone(),
            );
            async move {
                let ready = pod_ips(&client, namespace, &frontend_selector).await;
                let all = uids_of(&client, namespace, &frontend_selector).await;
                Ok(ready.len() == 1 && all.len() == 1 && !frontends_before.contains(&all[0]))
            }
        },
    )
    .await
    .expect("the frontend rolls for a serving limit");
    assert_eq!(
        uids_of(&client, namespace, &shard_selector).await,
        shards_before,
        "the shards were not restarted by a frontend-only change"
    );
    assert_eq!(
        generate(&endpoint).await.expect("Generate after the roll"),
        reference
    );
    step(
        "a frontend-only change rolls the frontend, not the shards",
        t,
    );

    // 7c2. A copy of a shard (experts.replicaShards: 1): a third shard pod holding shard
    // 0's experts, which the frontend finds through the headless Service and sends rows to,
    // with no pod restarted; then removed while a stream runs, and the stream completes.
    let t = Instant::now();
    let shards_before = uids_of(&client, namespace, &shard_selector).await;
    let frontends_before = uids_of(&client, namespace, &frontend_selector).await;
    let copies = |n: i32| {
        patch_spec(
            &mds_api,
            serde_json::json!({"experts": {"replicaShards": n}}),
            "experts.replicaShards",
        )
    };
    copies(1).await;
    node.wait_for_ready_pods(&client, namespace, &shard_selector, 3, POD_TIMEOUT)
        .await
        .expect("a third shard pod, the copy, Ready");
    let copy = format!("{MD}-experts-2");
    let copy_ip = pod_ips(&client, namespace, &shard_selector)
        .await
        .into_iter()
        .find(|(name, _)| *name == copy)
        .map(|(_, ip)| ip)
        .expect("the copy's IP");
    // One connection, as a client keeps (the per-address new-connection cap would reset a
    // loop that opened one per call).
    let mut one = InferenceClient::connect(endpoint.clone())
        .await
        .expect("a connection through the Service");
    let mut copy_rows = 0.0;
    while copy_rows == 0.0 {
        assert!(
            t.elapsed() < POD_TIMEOUT,
            "the frontend sent the copy no rows within {POD_TIMEOUT:?}"
        );
        let got = one
            .generate(greedy(MAX_TOKENS))
            .await
            .expect("Generate with the copy")
            .into_inner()
            .token_ids;
        assert_eq!(got, reference);
        let text = http_get(&copy_ip, 9090, "/metrics")
            .await
            .expect("copy metrics");
        copy_rows = metric(&text, "switchyard_shard_rows_total");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let found_after = t.elapsed();
    let shards_now = uids_of(&client, namespace, &shard_selector).await;
    assert!(
        shards_before.iter().all(|u| shards_now.contains(u)),
        "the shards were not restarted by a copy"
    );
    assert_eq!(
        uids_of(&client, namespace, &frontend_selector).await,
        frontends_before,
        "the frontend was not restarted by a copy"
    );
    step("a shard copy added and used, nothing restarted", t);

    // 7c3. A shard that answers slowly, with and without a copy (`slow_shards`).
    let t = Instant::now();
    slow_shards(node, &client, namespace, &frontend_selector, &endpoint).await;
    step(
        "a slow shard: routed around to its copy mid-stream; without one, UNAVAILABLE",
        t,
    );

    // 7c4. The copy removed while a stream runs.
    let t = Instant::now();
    let stream = paced_stream(&endpoint);
    tokio::time::sleep(Duration::from_secs(1)).await;
    copies(0).await;
    let removed = Instant::now();
    node.wait_for(
        &client,
        namespace,
        &shard_selector,
        "the copy gone",
        POD_TIMEOUT,
        || async { Ok(uids_of(&client, namespace, &shard_selector).await.len() == 2) },
    )
    .await
    .expect("the copy removed");
    let gone_after = removed.elapsed();
    let tokens = stream
        .await
        .expect("the stream task")
        .expect("the stream across the copy's removal");
    assert_eq!(tokens.len(), 400, "the stream across the copy's removal");
    assert_eq!(
        uids_of(&client, namespace, &frontend_selector).await,
        frontends_before,
        "the frontend was not restarted by removing the copy"
    );
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: shard copy: rows sent to it {:.1}s after the patch \
         ({copy_rows} so far); removed mid-stream, gone {:.1}s after the patch, the stream \
         ended with 400 tokens; nothing restarted",
        found_after.as_secs_f64(),
        gone_after.as_secs_f64(),
    );
    check_every_frontends_accounting(
        &client,
        namespace,
        &frontend_selector,
        "a shard copy removed",
    )
    .await;
    step(
        "the shard copy removed under a stream, nothing restarted",
        t,
    );

    // 7c5. Memory pressure on a frontend (`memory_pressure`).
    let t = Instant::now();
    memory_pressure(node, &client, namespace).await;
    step(
        "memory pressure: a frontend under a 64 MiB limit flooded, not OOM-killed",
        t,
    );

    // 7c6. The API server and etcd killed (SIGKILL, 3 s down) and started again while a
    // stream runs: the data plane needs no API (the stream ends with all its tokens, a call
    // through the Service during the outage is served), and afterwards the operator acts
    // on a change with one of each child, and every frontend's accounting holds.
    let t = Instant::now();
    let stream = paced_stream(&endpoint);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        generate(&endpoint).await
    };
    let (outage, during) =
        tokio::join!(node.control_plane().restart(Duration::from_secs(3)), during);
    let outage = outage.expect("restarting the API server and etcd");
    assert_eq!(
        during.expect("a call through the Service while the API server is down"),
        reference
    );
    let tokens = stream
        .await
        .expect("the stream task")
        .expect("the stream across the API server's restart");
    assert_eq!(
        tokens.len(),
        400,
        "the stream across the API server's restart"
    );
    let before = pod_ips(&client, namespace, &frontend_selector).await.len() as i32;
    let scale = |n: i32| {
        patch_spec(
            &mds_api,
            serde_json::json!({"frontend": {"replicas": n}}),
            "frontend.replicas after the restart",
        )
    };
    let changed = Instant::now();
    scale(before + 1).await;
    node.wait_for_ready_pods(
        &client,
        namespace,
        &frontend_selector,
        before as usize + 1,
        POD_TIMEOUT,
    )
    .await
    .expect("the operator acts on a change after the API server's restart");
    let acted_after = changed.elapsed();
    scale(before).await;
    node.wait_for(
        &client,
        namespace,
        &frontend_selector,
        "the frontends back to their count",
        POD_TIMEOUT,
        || async {
            Ok(uids_of(&client, namespace, &frontend_selector).await.len() == before as usize)
        },
    )
    .await
    .expect("the frontends back to their count");
    let one_of_each = ListParams::default().labels(&instance);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    assert_eq!(
        deployments
            .list(&one_of_each)
            .await
            .expect("Deployments")
            .items
            .len(),
        1,
        "one frontend Deployment after the restart"
    );
    assert_eq!(
        statefulsets
            .list(&one_of_each)
            .await
            .expect("StatefulSets")
            .items
            .len(),
        1,
        "one shard StatefulSet after the restart"
    );
    check_every_frontends_accounting(
        &client,
        namespace,
        &frontend_selector,
        "the API server's restart",
    )
    .await;
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: API server + etcd restart: unreachable {:.1}s; the \
         stream ended with 400 tokens, the call during the outage served; a scale to {} \
         acted on {:.1}s after the change",
        outage.as_secs_f64(),
        before + 1,
        acted_after.as_secs_f64()
    );
    step(
        "the API server and etcd restarted under a stream: served, then converged",
        t,
    );

    // 7c7. The operator's leader killed (grace 0) right after a change that rolls the
    // frontends, while a stream runs: the standby takes the Lease and finishes the
    // rollout (every frontend replaced, status.observedGeneration current, one
    // Deployment), and the stream ends with all its tokens (the old pod drains it).
    let t = Instant::now();
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let holder = || {
        let leases = leases.clone();
        async move {
            leases
                .get(RELEASE)
                .await
                .expect("the leader Lease")
                .spec
                .and_then(|s| s.holder_identity)
                .unwrap_or_default()
        }
    };
    let leader = holder().await;
    let frontends_before = uids_of(&client, namespace, &frontend_selector).await;
    let stream = paced_stream(&endpoint);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let generation = mds_api
        .patch(
            MD,
            &PatchParams::default(),
            // 7c set 5; the later steps were written for 4.
            &Patch::Merge(serde_json::json!({"spec": {"serving": {"maxBatchSize": 4}}})),
        )
        .await
        .expect("a change that rolls the frontends")
        .metadata
        .generation
        .expect("a generation");
    let operators: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let killed = Instant::now();
    operators
        .delete(&leader, &DeleteParams::default().grace_period(0))
        .await
        .expect("deleting the leader's pod");
    node.wait_for(
        &client,
        namespace,
        &instance,
        "a new leader finishing the rollout",
        POD_TIMEOUT,
        || {
            let (mds_api, holder, frontends_before) =
                (mds_api.clone(), &holder, frontends_before.clone());
            let (client, leader, frontend_selector) =
                (client.clone(), leader.clone(), frontend_selector.clone());
            async move {
                let now = holder().await;
                if now.is_empty() || now == leader {
                    return Err(format!("the Lease is held by {now:?}"));
                }
                let observed = mds_api
                    .get(MD)
                    .await
                    .map_err(|e| e.to_string())?
                    .status
                    .and_then(|s| s.observed_generation);
                if observed != Some(generation) {
                    return Err(format!("observedGeneration {observed:?} of {generation}"));
                }
                let all = uids_of(&client, namespace, &frontend_selector).await;
                let ready = pod_ips(&client, namespace, &frontend_selector).await;
                if all.iter().any(|u| frontends_before.contains(u))
                    || ready.len() != frontends_before.len()
                    || all.len() != frontends_before.len()
                {
                    return Err(format!(
                        "{} of {} frontend(s) replaced and Ready",
                        ready.len(),
                        frontends_before.len()
                    ));
                }
                Ok(true)
            }
        },
    )
    .await
    .expect("the standby takes the Lease and finishes the rollout");
    let finished_after = killed.elapsed();
    let tokens = stream
        .await
        .expect("the stream task")
        .expect("the stream across the rollout and the leader's death");
    assert_eq!(tokens.len(), 400, "the stream across the rollout");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    assert_eq!(
        deployments
            .list(&ListParams::default().labels(&instance))
            .await
            .expect("Deployments")
            .items
            .len(),
        1,
        "one frontend Deployment after the leader's death"
    );
    check_every_frontends_accounting(
        &client,
        namespace,
        &frontend_selector,
        "the leader's death mid-rollout",
    )
    .await;
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: leader {leader} killed right after a change: a new \
         leader ({}) finished the rollout {:.1}s after the kill; the stream ended with 400 \
         tokens",
        holder().await,
        finished_after.as_secs_f64()
    );
    step(
        "the operator's leader killed mid-rollout: the standby finished it, the stream served",
        t,
    );

    // 7c8. Experts placed where the load is (`balanced_placement`).
    let t = Instant::now();
    balanced_placement(
        node,
        &client,
        namespace,
        [&frontend_selector, &shard_selector],
        &endpoint,
    )
    .await;
    step(
        "experts moved to the measured load while streams ran, none failed, nothing restarted",
        t,
    );

    // 7e0. Shadow mode first: the autoscaler on in mode Shadow, the same spike as 7e below.
    // The recommendation (3, Panic) shows in status within about a second while the count
    // never moves; switched to Active mid-spike, the recommendation is applied. Then the
    // load ends and the count is back to 1 before 7e.
    let t = Instant::now();
    let autoscaling_spec = |mode: &str| {
        serde_json::json!({"spec": {"autoscaling": {
            "enabled": true,
            "mode": mode,
            "frontend": {"minReplicas": 1, "maxReplicas": 3},
            "targetQueueDepth": 4,
            "stableWindowSeconds": 10,
            "panicWindowSeconds": 2,
            "scaleDownDelaySeconds": 5,
            "pollIntervalMilliseconds": 250,
            // No API keys here: every caller is anonymous, whose demand may buy half of
            // maxReplicas by default; these are the test's own callers.
            "tierBudgets": [{"tier": "anonymous", "maxFrontendsPercent": 100}],
        }}})
    };
    mds_api
        .patch(
            MD,
            &PatchParams::default(),
            &Patch::Merge(autoscaling_spec("Shadow")),
        )
        .await
        .expect("the autoscaler on in Shadow");
    let frontend_workloads: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let shadow_state = || {
        let (mds_api, deployments) = (mds_api.clone(), frontend_workloads.clone());
        async move {
            let md = mds_api.get(MD).await.map_err(|e| e.to_string())?;
            let frontends = deployments
                .get(&format!("{MD}-frontend"))
                .await
                .map_err(|e| e.to_string())?;
            let a = md.status.and_then(|s| s.autoscaling);
            Ok::<_, String>((md.spec.frontend.replicas, frontends.spec.replicas, a))
        }
    };
    node.wait_for(
        &client,
        namespace,
        &instance,
        "the autoscaler polling in Shadow",
        POD_TIMEOUT,
        || async {
            let (_, _, a) = shadow_state().await?;
            Ok(a.is_some_and(|a| a.reporting_frontends == 1))
        },
    )
    .await
    .expect("Shadow polling");
    let spike_at = Instant::now();
    let shadow_spike: Vec<_> = (0..12)
        .map(|_| {
            let endpoint = endpoint.clone();
            tokio::spawn(spike_caller(endpoint, None))
        })
        .collect();
    let mut counts = std::collections::BTreeSet::new();
    let (recommended_after, recommendation) = loop {
        let (replicas, workload, a) = shadow_state().await.expect("status");
        counts.insert((replicas, workload));
        if let Some(a) = a.filter(|a| a.desired_frontends == 3) {
            break (spike_at.elapsed(), a);
        }
        assert!(
            spike_at.elapsed() < Duration::from_secs(30),
            "no recommendation within 30 s of the spike"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Held for 2 s more with the spike on: the count never moves in Shadow.
    while spike_at.elapsed() < recommended_after + Duration::from_secs(2) {
        let (replicas, workload, _) = shadow_state().await.expect("status");
        counts.insert((replicas, workload));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        vec![(1, Some(1))],
        "Shadow changed the count"
    );
    let shadowed = recommendation
        .decisions
        .last()
        .cloned()
        .expect("a decision");
    assert_eq!(
        (
            recommendation.reason.as_deref(),
            shadowed.applied,
            shadowed.to
        ),
        (Some("Panic"), false, 3),
        "{recommendation:?}"
    );
    mds_api
        .patch(
            MD,
            &PatchParams::default(),
            &Patch::Merge(autoscaling_spec("Active")),
        )
        .await
        .expect("the autoscaler to Active");
    let switched = Instant::now();
    let applied_after = loop {
        let (replicas, _, _) = shadow_state().await.expect("status");
        if replicas == 3 {
            break switched.elapsed();
        }
        assert!(
            switched.elapsed() < Duration::from_secs(30),
            "Active did not apply the recommendation of 3"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for caller in shadow_spike {
        caller
            .await
            .expect("the caller task")
            .expect("a spike caller");
    }
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: Shadow: recommendation of 3 (Panic) in status {:.2}s after \
         the spike began, the count held at 1; Active applied it {:.2}s after the switch",
        recommended_after.as_secs_f64(),
        applied_after.as_secs_f64(),
    );
    node.wait_for(
        &client,
        namespace,
        &frontend_selector,
        "back to 1 frontend after the Shadow step",
        POD_TIMEOUT,
        || async {
            let (replicas, workload, _) = shadow_state().await?;
            let pods = uids_of(&client, namespace, &frontend_selector).await;
            Ok(replicas == 1 && workload == Some(1) && pods.len() == 1)
        },
    )
    .await
    .expect("back to 1 frontend");
    step(
        "Shadow: a spike recommended, not applied; Active applied it; back to 1",
        t,
    );

    // 7e. The autoscaler, on a legitimate spike: 12 callers streaming back to back for 6 s (SPIKE_FOR), 3× what one frontend runs at
    // once (maxBatchSize 4, target 4 per frontend): a Panic decision to 3 frontends, seen
    // in status; the new frontends Ready and serving. When the load ends, back to 1 after
    // the delay while two slow streams run through the Service: none cut.
    let t = Instant::now();
    mds_api
        .patch(
            MD,
            &PatchParams::default(),
            &Patch::Merge(autoscaling_spec("Active")),
        )
        .await
        .expect("turning the autoscaler on");
    let autoscaling = || {
        let mds_api = mds_api.clone();
        async move {
            let md = mds_api.get(MD).await.map_err(|e| e.to_string())?;
            let a = md
                .status
                .and_then(|s| s.autoscaling)
                .ok_or("no status.autoscaling yet")?;
            Ok::<_, String>((md.spec.frontend.replicas, a))
        }
    };
    let polled = node
        .wait_for(
            &client,
            namespace,
            &instance,
            "the autoscaler polling the frontend",
            POD_TIMEOUT,
            || async {
                let (_, a) = autoscaling().await?;
                Ok(a.ready_frontends == 1 && a.reporting_frontends == 1)
            },
        )
        .await;
    if let Err(e) = polled {
        let operator = node
            .diagnose(&client, RELEASE_NAMESPACE, operator_selector)
            .await;
        panic!("the operator polls the frontend's /demand: {e}\n--- the operator:\n{operator}");
    }
    step("autoscaling on to the frontend's demand polled", t);

    let t = Instant::now();
    const SPIKE: usize = 12;
    let spike: Vec<_> = (0..SPIKE)
        .map(|_| {
            let endpoint = endpoint.clone();
            tokio::spawn(spike_caller(endpoint, None))
        })
        .collect();
    let scaled_after = loop {
        let (replicas, _) = autoscaling().await.expect("status");
        if replicas > 1 {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no scale-up within 60 s of a spike of {SPIKE} callers"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if let Err(e) = node
        .wait_for_ready_pods(&client, namespace, &frontend_selector, 3, POD_TIMEOUT)
        .await
    {
        let a = autoscaling().await;
        let operator = node
            .diagnose(&client, RELEASE_NAMESPACE, operator_selector)
            .await;
        panic!(
            "3 frontends Ready: {e}\n--- status.autoscaling: {a:?}\n--- the operator:\n{operator}"
        );
    }
    let ready_after = t.elapsed();
    for (name, ip) in pod_ips(&client, namespace, &frontend_selector).await {
        let got = generate(&format!("http://{ip}:50051"))
            .await
            .unwrap_or_else(|e| panic!("frontend {name} serves: {e}"));
        assert_eq!(got, reference, "frontend {name}");
    }
    let (replicas, a) = autoscaling().await.expect("status");
    // The streams open over a poll or two, so the climb from 1 to 3 may be one decision
    // or several; every step of it is a Panic scale-up, and it starts at 1 and ends at 3.
    let ups: Vec<_> = a
        .decisions
        .iter()
        .filter(|d| d.to > d.from)
        .cloned()
        .collect();
    let up = ups.last().cloned().expect("a scale-up decision in status");
    assert_eq!((replicas, ups[0].from, up.to), (3, 1, 3), "{a:?}");
    assert!(
        ups.iter()
            .all(|d| d.reason == "Panic" && d.role == "frontend"),
        "every step of the spike's scale-up is a frontend Panic decision: {a:?}"
    );
    // What the spike alone buys; 7f compares the flood + spike against it.
    let spike_alone = replicas;
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: spike of {SPIKE} callers: scale-up written {:.2}s after \
         the load began (poll 250 ms, panic window 2 s), 3 frontends Ready after {:.1}s; \
         decisions {ups:?}",
        scaled_after.as_secs_f64(),
        ready_after.as_secs_f64(),
    );
    let mut cut = Vec::new();
    for (i, stream) in spike.into_iter().enumerate() {
        match stream.await.expect("the stream task") {
            Ok(_) => {}
            Err(e) => cut.push(format!("spike caller {i}: {e}")),
        }
    }
    assert!(cut.is_empty(), "spike streams failed: {cut:?}");
    step(
        "a legitimate spike to a Panic scale-up and 3 frontends serving",
        t,
    );

    let t = Instant::now();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                generate_stream(&endpoint, 200, Duration::from_millis(100), |_| {}).await
            })
        })
        .collect();
    let drains = watch_drains(&client, namespace, &frontend_selector, 1, POD_TIMEOUT).await;
    for (i, stream) in slow.into_iter().enumerate() {
        match stream.await.expect("the stream task") {
            Ok(ids) if ids.len() == 200 => {}
            Ok(ids) => cut.push(format!("slow stream {i}: {} of 200 tokens", ids.len())),
            Err(e) => cut.push(format!("slow stream {i}: {e}")),
        }
    }
    let (replicas, a) = autoscaling().await.expect("status");
    let down = a.decisions.last().cloned().expect("a decision");
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: load ended: back to {replicas} frontend(s) {:.1}s later; \
         drains {drains:?}; decision {down:?}; {} streams cut",
        t.elapsed().as_secs_f64(),
        cut.len(),
    );
    assert!(
        cut.is_empty(),
        "streams cut by the autoscaled scale-down: {cut:?}"
    );
    assert_eq!((replicas, down.to), (1, 1), "{a:?}");
    // Off again: the count is the user's (the later steps scale by hand).
    mds_api
        .patch(
            MD,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"autoscaling": {"enabled": false}}})),
        )
        .await
        .expect("turning the autoscaler off");
    step("load ended to 1 frontend, no stream cut", t);

    // 7e2. Time to useful capacity, per new frontend: 5 times, the scale write → its pod
    // scheduled → process started → weights loaded → port open → Ready → the first token
    // it serves to a request through the Service; for this tiny MoE (2 shards) and for
    // the bench checkpoint (about 0.5 B parameters, f32, 1.8 GB, frontends only). The
    // figures are in docs/benchmarks.md (reported, not asserted).
    let t = Instant::now();
    let tiny = capacity_runs(&client, namespace, MD, &endpoint).await;
    // Each step follows the one before it, on every run.
    for c in &tiny {
        assert!(
            c.scheduled <= c.ready
                && c.started <= c.loaded
                && c.loaded <= c.listening
                && c.listening <= c.ready + 0.05
                && c.ready <= c.first_token + 0.05,
            "{c:?}"
        );
    }
    let bench_dir = Path::new(ROOT)
        .join("volumes")
        .join(namespace)
        .join("bench");
    let maker = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/switchyard-worker");
    assert!(
        maker.exists(),
        "{} is missing: hack/build-images.sh builds it (the images hold it)",
        maker.display()
    );
    let made = std::process::Command::new(&maker)
        .args(["make-checkpoint", "--shape", "bench", "--out"])
        .arg(&bench_dir)
        .output()
        .expect("running make-checkpoint");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let _ = std::process::Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&bench_dir)
        .status();
    mds_api
        .create(
            &PostParams::default(),
            &from_json(serde_json::json!({
                "apiVersion": "switchyard.dev/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": "bench"},
                "spec": {
                    "model": {"hostPath": {"path": bench_dir.display().to_string()}, "dtype": "f32"},
                },
            })),
        )
        .await
        .expect("creating the bench ModelDeployment");
    node.wait_for_ready_pods(
        &client,
        namespace,
        "app.kubernetes.io/instance=bench",
        1,
        POD_TIMEOUT,
    )
    .await
    .expect("the bench frontend Ready");
    let bench_ip = services
        .get("bench")
        .await
        .expect("the bench Service")
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("a ClusterIP");
    let bench_endpoint = format!("http://{bench_ip}:50051");
    capacity_runs(&client, namespace, "bench", &bench_endpoint).await;
    mds_api
        .delete("bench", &DeleteParams::default())
        .await
        .expect("deleting the bench ModelDeployment");
    node.wait_for(
        &client,
        namespace,
        "app.kubernetes.io/instance=bench",
        "the bench pods gone",
        POD_TIMEOUT,
        || async {
            let left = pods
                .list(&ListParams::default().labels("app.kubernetes.io/instance=bench"))
                .await
                .map_err(|e| e.to_string())?;
            Ok(left.items.is_empty())
        },
    )
    .await
    .expect("the bench pods gone");
    let _ = std::fs::remove_dir_all(&bench_dir);
    step(
        "time to useful capacity, 5 new frontends each of the tiny and the bench model",
        t,
    );

    // 7d. A dense checkpoint with no expert shards (frontends only), serving TLS from a
    // kubernetes.io/tls Secret, behind API keys from a Secret; the key Secret rotated
    // while the frontend runs: the new key works and the old one stops, within the
    // kubelet's volume refresh plus the reload period, without a restart.
    let t = Instant::now();
    let dense_dir = model_on_node(namespace, "qwen3");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let dense_host = format!("dense.{namespace}.svc");
    let pki_dir = switchyard_tests::process::TempDir::new("dense-tls").expect("dir");
    let (ca_dir, other_dir) = (pki_dir.path().join("ca"), pki_dir.path().join("other"));
    std::fs::create_dir_all(&ca_dir).expect("dir");
    std::fs::create_dir_all(&other_dir).expect("dir");
    let pki =
        switchyard_tests::pki::Pki::write_with_names(&ca_dir, std::slice::from_ref(&dense_host))
            .expect("a serving certificate for the dense Service");
    let other_ca = switchyard_tests::pki::Pki::write(&other_dir).expect("another CA");
    let read = |p: &Path| std::fs::read_to_string(p).expect("PEM");
    secrets
        .create(
            &PostParams::default(),
            &from_json(serde_json::json!({
                "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": "dense-tls"},
                "stringData": {"tls.crt": read(&pki.serving_cert), "tls.key": read(&pki.serving_key)},
            })),
        )
        .await
        .expect("creating the TLS Secret");
    let key_secret = |line: &str| -> Secret {
        from_json(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "dense-keys"},
            "stringData": {"tenants": line},
        }))
    };
    const OLD_KEY: &str = "old-key-0123456789abcdef";
    const NEW_KEY: &str = "new-key-0123456789abcdef";
    secrets
        .create(
            &PostParams::default(),
            &key_secret(&format!("acme:{OLD_KEY}\n")),
        )
        .await
        .expect("creating the key Secret");
    mds_api
        .create(
            &PostParams::default(),
            &from_json(serde_json::json!({
                "apiVersion": "switchyard.dev/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": "dense"},
                "spec": {
                    "model": {"hostPath": {"path": dense_dir.display().to_string()}, "dtype": "f32"},
                    "admission": {
                        "apiKeySecret": {"name": "dense-keys"},
                        "tiers": [{"name": "standard"}],
                        "defaultTier": "standard",
                    },
                    "serving": {"maxBatchSize": 4},
                    "tls": {"secretName": "dense-tls"},
                },
            })),
        )
        .await
        .expect("creating the dense ModelDeployment");
    let dense_selector = "app.kubernetes.io/instance=dense";
    node.wait_for_ready_pods(&client, namespace, dense_selector, 1, POD_TIMEOUT)
        .await
        .expect("the dense frontend Ready");
    let dense_pods = pods
        .list(&ListParams::default().labels(dense_selector))
        .await
        .expect("listing the dense pods")
        .items;
    assert_eq!(dense_pods.len(), 1, "frontends only: no shard pods");
    let dense_pod = dense_pods[0].metadata.name.clone().expect("a name");
    let statefulsets: Api<k8s_openapi::api::apps::v1::StatefulSet> =
        Api::namespaced(client.clone(), namespace);
    assert!(
        statefulsets
            .get_opt("dense-experts")
            .await
            .expect("reading")
            .is_none(),
        "no shard StatefulSet"
    );
    let (_, dense_ip) = pod_ips(&client, namespace, dense_selector)
        .await
        .pop()
        .expect("the dense frontend's IP");
    let dense_endpoint = format!("https://{dense_ip}:50051");
    let tls_channel = |ca: PathBuf| {
        let (endpoint, host) = (dense_endpoint.clone(), dense_host.clone());
        async move {
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(
                    std::fs::read(ca).map_err(|e| e.to_string())?,
                ))
                .domain_name(host);
            tonic::transport::Channel::from_shared(endpoint)
                .map_err(|e| e.to_string())?
                .tls_config(tls)
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| format!("{e:?}"))
        }
    };
    assert!(
        tls_channel(other_ca.serving_ca.clone()).await.is_err(),
        "a client trusting another CA is refused"
    );
    let ca = pki.serving_ca.clone();
    let keyed = |key: &'static str| {
        let channel = tls_channel(ca.clone());
        async move {
            let mut client =
                InferenceClient::new(channel.await.map_err(tonic::Status::unavailable)?);
            let mut request = tonic::Request::new(greedy(4));
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {key}").parse().expect("ascii"),
            );
            client
                .generate(request)
                .await
                .map(|r| r.into_inner().token_ids)
        }
    };
    let dense_tokens = keyed(OLD_KEY)
        .await
        .expect("the dense model serves over TLS with the key");
    assert_eq!(dense_tokens.len(), 4);
    // grpcurl, a third-party TLS client (Go's TLS stack), by the Service's DNS name.
    let listed = node
        .run(
            &grpcurl,
            &[
                "-cacert",
                pki.serving_ca.to_str().expect("utf-8"),
                "-servername",
                &dense_host,
                &format!("{dense_ip}:50051"),
                "list",
            ],
        )
        .await
        .expect("grpcurl over TLS");
    assert!(listed.contains("switchyard.v1.Inference"), "{listed}");
    assert_eq!(
        keyed(NEW_KEY).await.expect_err("not yet a key").code(),
        tonic::Code::Unauthenticated
    );
    step(
        "a dense ModelDeployment (no shards, TLS) to serving with an API key",
        t,
    );
    let t = Instant::now();
    secrets
        .replace(
            "dense-keys",
            &PostParams::default(),
            &key_secret(&format!("acme:{NEW_KEY}\n")),
        )
        .await
        .expect("rotating the key Secret");
    node.wait_for(
        &client,
        namespace,
        dense_selector,
        "the rotated key in use and the old one refused",
        POD_TIMEOUT,
        || async {
            let old = keyed(OLD_KEY).await;
            let new = keyed(NEW_KEY).await;
            match (&old, &new) {
                (Err(s), Ok(_)) if s.code() == tonic::Code::Unauthenticated => Ok(true),
                _ => Err(format!("old key: {old:?}, new key: {new:?}")),
            }
        },
    )
    .await
    .expect("the frontend picks up the rotated Secret");
    let pod = pods.get(&dense_pod).await.expect("the same pod");
    let restarts: i32 = pod
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default()
        .iter()
        .map(|c| c.restart_count)
        .sum();
    assert_eq!(restarts, 0, "picked up without a restart");
    step(
        "Secret rotated to the new key working and the old refused (same pod)",
        t,
    );

    // 7f. A flood buys no replicas: mallory (tier `free`, 6 requests a minute) sends 5 a
    // second, 50× its quota, for 2 minutes, to the MoE deployment of 7e (now with API
    // keys). For the first minute acme streams one request at a time: the autoscaler
    // (target 4 per frontend, up to 5) keeps 1 frontend, every acme request succeeds and
    // its p99 TTFT stays within 1.5× of its baseline. Then acme spikes as in 7e, the flood
    // still on: the frontends bought match what the spike alone bought in 7e.
    let t = Instant::now();
    const MALLORY_KEY: &str = "mallory-key-0123456789abcdef";
    let moe_before = uids_of(&client, namespace, &frontend_selector).await;
    // 50 more free keys for 7f2's sybil flood, idle until then.
    let sybil_key = |i: usize| format!("sybil-key-{i:02}-0123456789abcdef");
    let sybil_lines: String = (0..50)
        .map(|i| format!("sybil-{i:02}:{}:trial\n", sybil_key(i)))
        .collect();
    let mut moe_keys = key_secret(&format!(
        "acme:{NEW_KEY}:standard\nmallory:{MALLORY_KEY}:free\n{sybil_lines}"
    ));
    moe_keys.metadata.name = Some("moe-keys".into());
    secrets
        .create(&PostParams::default(), &moe_keys)
        .await
        .expect("the MoE deployment's key Secret");
    mds_api
        .patch(
            MD,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {
                "admission": {
                    "apiKeySecret": {"name": "moe-keys"},
                    "tiers": [
                        {"name": "standard"},
                        {"name": "free", "priority": "low", "requestsPerMinute": 6},
                        {"name": "trial", "priority": "low", "requestsPerMinute": 60},
                    ],
                    "defaultTier": "standard",
                },
                "autoscaling": {
                    "enabled": true,
                    "frontend": {"minReplicas": 1, "maxReplicas": 5},
                    "targetQueueDepth": 4,
                    "stableWindowSeconds": 10,
                    "panicWindowSeconds": 2,
                    "scaleDownDelaySeconds": 5,
                    "pollIntervalMilliseconds": 250,
                    // acme's paid tier is the default one here: unbounded, as a paid
                    // tier is (the default tier's default budget is half).
                    "tierBudgets": [{"tier": "standard", "maxFrontendsPercent": 100}],
                },
            }})),
        )
        .await
        .expect("API keys, a quota tier and up to 5 frontends on the MoE deployment");
    // The keys roll the frontend: wait for the new one to know mallory's key.
    node.wait_for(
        &client,
        namespace,
        &frontend_selector,
        "the MoE frontend rolled, Ready, with mallory's key",
        POD_TIMEOUT,
        || async {
            let ready = pod_ips(&client, namespace, &frontend_selector).await;
            let all = uids_of(&client, namespace, &frontend_selector).await;
            if ready.len() != 1 || all.len() != 1 || moe_before.contains(&all[0]) {
                return Err(format!("pods {all:?}, ready {ready:?}"));
            }
            let channel = tonic::transport::Channel::from_shared(endpoint.clone())
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            match keyed_on(channel, MALLORY_KEY, 4).await {
                Err(s) if s.code() == tonic::Code::Unauthenticated => {
                    Err("mallory's key not in use yet".into())
                }
                _ => Ok(true),
            }
        },
    )
    .await
    .expect("the MoE frontend with the keys");
    // One connection per tenant through the Service, as real clients keep (and as the
    // per-address connection rate cap expects).
    let connect = || async {
        tonic::transport::Channel::from_shared(endpoint.clone())
            .expect("the endpoint")
            .connect()
            .await
            .expect("a connection through the Service")
    };
    let acme = connect().await;
    let mallory = connect().await;
    let acme_ttft = |n: usize| {
        let acme = acme.clone();
        async move {
            let mut took = Vec::new();
            for _ in 0..n {
                let ttft = keyed_stream_ttft(acme.clone(), NEW_KEY, 8, Duration::ZERO)
                    .await
                    .unwrap_or_else(|s| panic!("an acme request failed: {s}"));
                took.push(ttft);
            }
            took.sort();
            took
        }
    };
    let baseline = acme_ttft(20).await;
    const FLOOD_FOR: Duration = Duration::from_secs(120);
    const STEADY_FOR: Duration = Duration::from_secs(60);
    // One clock for the flood, the watch and acme's phases.
    let flood_began = Instant::now();
    let flood = {
        let mallory = mallory.clone();
        tokio::spawn(async move {
            let began = flood_began;
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let mut calls = tokio::task::JoinSet::new();
            while began.elapsed() < FLOOD_FOR {
                tick.tick().await;
                calls.spawn(keyed_on(mallory.clone(), MALLORY_KEY, 64));
            }
            let (mut accepted, mut refused, mut other) = (0, 0, Vec::new());
            while let Some(call) = calls.join_next().await {
                match call.expect("a flood call") {
                    Ok(_) => accepted += 1,
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => refused += 1,
                    Err(s) => other.push(s.code()),
                }
            }
            (accepted, refused, other)
        })
    };
    // The most frontends asked for in each phase (flood alone, flood + spike), the most
    // demand the autoscaler saw in the first (all of it, the legitimate part), the last
    // status and the scale-up decisions of the second.
    // The first time the flood phase's legitimate demand passes 2, the frontends' own
    // reports, to say what it was.
    let watch = {
        let mds_api = mds_api.clone();
        let (client, namespace, selector) = (
            client.clone(),
            namespace.to_string(),
            frontend_selector.clone(),
        );
        tokio::spawn(async move {
            let began = flood_began;
            let mut most = [0, 0];
            let mut last = None;
            let mut seen = (0.0f64, 0.0f64);
            let mut ups = Vec::new();
            let mut reports = Vec::new();
            while began.elapsed() < FLOOD_FOR {
                if let Ok(md) = mds_api.get(MD).await {
                    let phase = usize::from(began.elapsed() >= STEADY_FOR);
                    most[phase] = most[phase].max(md.spec.frontend.replicas);
                    last = md.status.and_then(|s| s.autoscaling);
                    if let Some(a) = &last {
                        if phase == 0 {
                            let v = |s: &str| s.parse::<f64>().unwrap_or(0.0);
                            seen.0 = seen.0.max(v(&a.total_demand));
                            seen.1 = seen.1.max(v(&a.panic_demand));
                            if v(&a.panic_demand) > 2.0 && reports.is_empty() {
                                for (pod, ip) in pod_ips(&client, &namespace, &selector).await {
                                    let report = http_get(&ip, 9090, "/demand").await;
                                    reports.push(format!("{pod}: {report:?}"));
                                }
                            }
                        } else {
                            for d in a.decisions.iter().filter(|d| d.to > d.from) {
                                if !ups.contains(d) {
                                    ups.push(d.clone());
                                }
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (most, last, seen, ups, reports)
        })
    };
    let mut during = Vec::new();
    while flood_began.elapsed() < STEADY_FOR {
        during.extend(acme_ttft(1).await);
    }
    during.sort();
    // The spike of 7e, from acme: 12 callers, streams of 200 tokens read at 50/s, each on a
    // connection of its own through the Service.
    let spike: Vec<_> = (0..SPIKE)
        .map(|_| {
            let endpoint = endpoint.clone();
            tokio::spawn(spike_caller(endpoint, Some(NEW_KEY)))
        })
        .collect();
    for (i, stream) in spike.into_iter().enumerate() {
        if let Err(s) = stream.await.expect("the stream task") {
            cut.push(format!("flood+spike stream {i}: {s}"));
        }
    }
    let (accepted, refused, other) = flood.await.expect("the flood task");
    let (most, last, seen, ups, reports) = watch.await.expect("the watch task");
    let p99 = |v: &[Duration]| v[(v.len() * 99).div_ceil(100).max(1) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let last = last.expect("status.autoscaling during the flood");
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: flood of mallory (50× a 6/min quota, 2 min): {accepted} \
         accepted, {refused} refused, other {other:?}; frontends at most {} in the first \
         minute; acme {} streams, all served, p99 TTFT {:.1} ms during vs {:.1} ms before \
         (p50 {:.1} vs {:.1}); most demand seen: all {:.2}, legitimate (panic window) {:.2}; \
         then a spike of {SPIKE} acme callers in the flood: frontends at most {} (the spike \
         alone: {spike_alone}); scale-ups {ups:?}; spike streams failed: {cut:?}; the \
         frontends' reports when the flood's legitimate demand passed 2: {reports:?}",
        most[0],
        during.len(),
        ms(p99(&during)),
        ms(p99(&baseline)),
        ms(during[during.len() / 2]),
        ms(baseline[baseline.len() / 2]),
        seen.0,
        seen.1,
        most[1],
    );
    assert_eq!(most[0], 1, "the flood bought frontends: {last:?}");
    // What the autoscaler shows beside its signal: the flood's refusals, the KV cache.
    let refused = last
        .refused_per_second
        .as_deref()
        .and_then(|r| r.parse::<f64>().ok());
    assert!(
        refused.is_some_and(|r| r > 1.0),
        "status.autoscaling.refusedPerSecond during the flood: {last:?}"
    );
    assert!(
        last.kv_cache_used_percent.is_some() && last.tokens_per_second.is_some(),
        "{last:?}"
    );
    assert!(cut.is_empty(), "acme's spike streams failed: {cut:?}");
    assert!(
        other.is_empty(),
        "mallory's calls ended otherwise: {other:?}"
    );
    // 6 a minute for 2 minutes, and a burst of up to 6 at the start.
    assert!(
        accepted <= 20,
        "mallory got past its quota: {accepted} accepted"
    );
    // Noise allowance: 25 ms on top of 1.5×, for a 2-core machine running the client, the
    // control plane and the pod together.
    let allowed = p99(&baseline).mul_f64(1.5) + Duration::from_millis(25);
    assert!(
        p99(&during) <= allowed,
        "acme's p99 TTFT under the flood {:.1} ms > {:.1} ms (1.5× baseline + 25 ms)",
        ms(p99(&during)),
        ms(allowed),
    );
    assert!(
        most[1].abs_diff(spike_alone) <= 1,
        "flood + spike bought {} frontends, the spike alone {spike_alone}: {ups:?}",
        most[1]
    );
    step(
        "a 2 min flood at 50× quota to 0 frontends added, and with a spike, the spike's",
        t,
    );

    // 7f2. A sybil flood: 50 tenants of the `trial` tier, each at 100 % of its quota (60
    // a minute: a stream of 100 tokens every second, over 5 shared connections) for 2
    // minutes: legitimate one by one, 5 000 tokens/s together, several frontends' worth.
    // The trial tier's budget is 25 % of maxReplicas 5: 2 frontends. In the first minute
    // the count stays within 2 while the tier's demand is past its budget; in the second,
    // acme's spike (as in 7e) still gets its replicas on top.
    let t = Instant::now();
    // Back to 1 frontend (the scale-down delay and the windows), and the frontends scaled
    // away gone: on two cores, pods still draining their streams would slow the one left,
    // and its legitimate demand would rise with it (a CI run's next scenario asked for 4).
    let back_to_one = |what: &'static str| {
        let (pods, selector) = (client.clone(), frontend_selector.clone());
        node.wait_for(
            &client,
            namespace,
            &frontend_selector,
            what,
            POD_TIMEOUT,
            move || {
                let (client, selector) = (pods.clone(), selector.clone());
                async move {
                    let (replicas, _) = autoscaling().await?;
                    Ok(replicas == 1 && uids_of(&client, namespace, &selector).await.len() == 1)
                }
            },
        )
    };
    back_to_one("back to 1 frontend before the sybils")
        .await
        .expect("back to 1 frontend");
    mds_api
        .patch(
            MD,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"autoscaling": {"tierBudgets": [
                {"tier": "standard", "maxFrontendsPercent": 100},
                {"tier": "trial", "maxFrontendsPercent": 25},
            ]}}})),
        )
        .await
        .expect("the trial tier's budget");
    let sybils_end = Instant::now() + Duration::from_secs(120);
    let sybils_began = Instant::now();
    let mut shared = Vec::new();
    for _ in 0..5 {
        shared.push(
            tonic::transport::Channel::from_shared(endpoint.clone())
                .expect("the endpoint")
                .connect()
                .await
                .expect("a sybil connection through the Service"),
        );
    }
    let sybils: Vec<_> = (0..50)
        .map(|i| {
            let (channel, key) = (shared[i % shared.len()].clone(), sybil_key(i));
            tokio::spawn(async move {
                // Spread over the first second, then one a second.
                tokio::time::sleep(Duration::from_millis(20 * i as u64)).await;
                let (mut served, mut refused, mut other) = (0, 0, Vec::new());
                while Instant::now() < sybils_end {
                    let began = Instant::now();
                    let result =
                        keyed_stream_ttft(channel.clone(), &key, 100, Duration::ZERO).await;
                    match result {
                        Ok(_) => served += 1,
                        // Over quota (split over the frontends a caller reaches), shed when
                        // the queue is full, or past its deadline: admission's refusals.
                        Err(s)
                            if matches!(
                                s.code(),
                                tonic::Code::ResourceExhausted
                                    | tonic::Code::Unavailable
                                    | tonic::Code::DeadlineExceeded
                            ) =>
                        {
                            refused += 1
                        }
                        Err(s) => other.push(s.to_string()),
                    }
                    tokio::time::sleep(Duration::from_secs(1).saturating_sub(began.elapsed()))
                        .await;
                }
                (served, refused, other)
            })
        })
        .collect();
    // The count, the trial tier's demand and what it counted for (in the first minute),
    // every 250 ms.
    let watch = {
        let mds_api = mds_api.clone();
        let autoscaling = move || {
            let mds_api = mds_api.clone();
            async move {
                let md = mds_api.get(MD).await.map_err(|e| e.to_string())?;
                let a = md.status.and_then(|s| s.autoscaling).ok_or("no status")?;
                Ok::<_, String>((md.spec.frontend.replicas, a))
            }
        };
        tokio::spawn(async move {
            let began = Instant::now();
            let mut most = [0i32; 2];
            let (mut trial_most, mut trial_counted_most) = (0.0f64, 0.0f64);
            let mut ups = Vec::new();
            while Instant::now() < sybils_end {
                if let Ok((replicas, a)) = autoscaling().await {
                    let minute = usize::from(began.elapsed() >= Duration::from_secs(60));
                    most[minute] = most[minute].max(replicas);
                    let trial = a.tiers.iter().find(|t| t.tier == "trial");
                    if let (0, Some(trial)) = (minute, trial) {
                        let num = |s: &str| s.parse::<f64>().unwrap_or(0.0);
                        trial_most = trial_most.max(num(&trial.demand));
                        trial_counted_most = trial_counted_most.max(num(&trial.counted));
                    }
                    for d in a.decisions {
                        if d.to > d.from && !ups.contains(&d) {
                            ups.push(d);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (most, trial_most, trial_counted_most, ups)
        })
    };
    let conditions = || {
        let mds_api = mds_api.clone();
        async move {
            mds_api
                .get(MD)
                .await
                .ok()
                .and_then(|md| md.status)
                .map(|s| s.conditions)
                .unwrap_or_default()
        }
    };
    let mut tier_limited = None;
    while sybils_began.elapsed() < Duration::from_secs(60) {
        if tier_limited.is_none() {
            tier_limited = conditions()
                .await
                .into_iter()
                .find(|c| c.type_ == "ScalingLimited" && c.reason == "TierBudget");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The second minute: acme's spike, as in 7e, each stream on its own connection.
    let spike: Vec<_> = (0..12)
        .map(|_| {
            let endpoint = endpoint.clone();
            tokio::spawn(spike_caller(endpoint, Some(NEW_KEY)))
        })
        .collect();
    let mut spike_failed = Vec::new();
    for stream in spike {
        if let Err(s) = stream.await.expect("the spike task") {
            spike_failed.push(s.to_string());
        }
    }
    let (mut served, mut refused, mut other) = (0, 0, Vec::new());
    for sybil in sybils {
        let (s, r, o) = sybil.await.expect("a sybil task");
        (served, refused) = (served + s, refused + r);
        other.extend(o);
    }
    let (most, trial_most, trial_counted_most, ups) = watch.await.expect("the watch");
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: sybil flood (50 trial tenants at their quota, 2 min, \
         trial budget 2 frontends): {served} streams served, {refused} refused (over the quota \
         split over frontends, shed or expired), other {other:?}; frontends at most {} in the first minute, {} with \
         acme's spike in the second (the spike alone: {spike_alone}); in the first minute the trial \
         tier's demand up to {trial_most:.2}, counted up to {trial_counted_most:.2}; ScalingLimited: {:?}; \
         scale-ups {ups:?}; spike streams failed: {spike_failed:?}",
        most[0],
        most[1],
        tier_limited.as_ref().map(|c| &c.message),
    );
    assert!(
        most[0] <= 2,
        "the sybils bought {} frontends, their tier's budget is 2: {ups:?}",
        most[0]
    );
    assert!(
        most[1] >= spike_alone,
        "acme's spike during the sybil flood got {} frontends, alone it got {spike_alone}",
        most[1]
    );
    assert!(spike_failed.is_empty(), "{spike_failed:?}");
    assert!(
        other.is_empty(),
        "sybil calls ended otherwise than served or over quota: {other:?}"
    );
    assert!(
        tier_limited.is_some() && trial_most > trial_counted_most,
        "the trial tier's demand ({trial_most:.2}) never passed its budget ({trial_counted_most:.2}) in the first minute: the flood was too light to test it"
    );
    // 7g measures from 1 frontend.
    back_to_one("back to 1 frontend after the sybils")
        .await
        .expect("back to 1 frontend");
    step(
        "a 2 min sybil flood held to its tier's budget, a paid spike still scaled",
        t,
    );

    // 7g. The load generator tells the story: `switchyard bench --scenario flood+spike
    // --series` (the library behind it) against the MoE deployment, its replica column
    // read with kubectl every second. The flood alone (first third) buys no frontend, the
    // spike of acme (middle third, 8×) buys some, and the series is written as CSV and SVG
    // (to $SWITCHYARD_SERIES_DIR when set, which also runs spike, flood and yoyo for
    // docs/benchmarks.md).
    let t = Instant::now();
    let series_dir = std::env::var_os("SWITCHYARD_SERIES_DIR").map(PathBuf::from);
    let scratch = switchyard_tests::process::TempDir::new("series").expect("dir");
    let out = series_dir
        .clone()
        .unwrap_or_else(|| scratch.path().to_path_buf());
    let scenarios: &[ScenarioKind] = if series_dir.is_some() {
        &[
            ScenarioKind::Spike,
            ScenarioKind::Flood,
            ScenarioKind::FloodSpike,
            ScenarioKind::Yoyo,
        ]
    } else {
        &[ScenarioKind::FloodSpike]
    };
    let replicas_command = format!(
        "{} --kubeconfig {} -n {namespace} get modeldeployment {MD} -o \
         jsonpath='{{.spec.frontend.replicas}} {{.status.frontend.readyReplicas}}'",
        kubectl.display(),
        node.control_plane().kubeconfig().display(),
    );
    for &kind in scenarios {
        let rows = bench_series(
            &endpoint,
            kind,
            &[("acme", NEW_KEY), ("attacker", MALLORY_KEY)],
            &replicas_command,
            &out,
        )
        .await;
        // Back to one frontend before the next scenario (and helm uninstall).
        mds_api
            .patch_scale(
                MD,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"replicas": 1}})),
            )
            .await
            .expect("back to one frontend");
        if series_dir.is_some() {
            // Let the frontends drain and go before the next scenario.
            tokio::time::sleep(Duration::from_secs(20)).await;
        }
        if kind != ScenarioKind::FloodSpike {
            continue;
        }
        let third = rows.len() / 3;
        let most = |rows: &[switchyard_edge::series::Row]| {
            rows.iter().map(|r| r.desired).max().unwrap_or(0)
        };
        let attacked: f64 = rows.iter().map(|r| r.offered[1]).sum();
        let _ = writeln!(
            std::io::stderr(),
            "switchyard-tests: real node: bench flood+spike ({} s): frontends asked for at \
             most {} in the flood alone, {} with the spike; the attacker offered {attacked}; \
             series in {}",
            rows.len(),
            most(&rows[..third]),
            most(&rows[third..]),
            out.display(),
        );
        assert!(
            rows.iter().any(|r| r.desired > 0),
            "the replica command answered: {rows:?}"
        );
        assert_eq!(most(&rows[..third]), 1, "the flood alone bought frontends");
        assert!(
            most(&rows[third..]) >= 2,
            "the spike bought nothing: {rows:?}"
        );
    }
    step("switchyard bench flood+spike with its time series", t);

    // 7h. The shards scale on their own signal: with autoscaling.experts (a low target,
    // 10 %, for the tiny model's light experts), a minute of acme's spike makes the
    // autoscaler add shard copies (spec.experts.replicaShards), which it removes after.
    // The step prints what explains its outcome: the requests' outcomes, the frontends
    // ready, and how many shards answered the autoscaler's polls (it has read 0.17, 0.03
    // and 0.00 as the shards' busiest utilisation in runs of the same code).
    let t = Instant::now();
    mds_api
        .patch(
            MD,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"autoscaling": {
                "experts": {"minShards": 2, "maxShards": 4, "targetUtilizationPercent": 10},
            }}})),
        )
        .await
        .expect("expert-shard autoscaling on");
    let kind = ScenarioKind::Spike;
    // The shard side of the run: the busiest utilisation and the most shard pods the
    // autoscaler asked for.
    let shard_watch = {
        let mds_api = mds_api.clone();
        tokio::spawn(async move {
            let began = Instant::now();
            let (mut busiest, mut most) = (0.0f64, 0);
            let (mut fewest_reporting, mut most_reporting) = (i32::MAX, 0);
            let mut ups = Vec::new();
            while began.elapsed() < Duration::from_secs(62) {
                if let Ok(Some(a)) = mds_api
                    .get(MD)
                    .await
                    .map(|md| md.status.and_then(|s| s.autoscaling))
                {
                    busiest = busiest.max(
                        a.shard_utilization
                            .as_deref()
                            .and_then(|u| u.parse().ok())
                            .unwrap_or(0.0),
                    );
                    most = most.max(a.desired_shards.unwrap_or(0));
                    if let Some(n) = a.reporting_shards {
                        fewest_reporting = fewest_reporting.min(n);
                        most_reporting = most_reporting.max(n);
                    }
                    for d in a.decisions.iter().filter(|d| d.role == "expert-shard") {
                        if !ups.contains(d) {
                            ups.push(d.clone());
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            (busiest, most, ups, (fewest_reporting, most_reporting))
        })
    };
    // Beside the bench's one connection, a fresh connection every 5 s with one short
    // request: whether the Service serves new connections while the bench runs.
    let probes = {
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let began = Instant::now();
            let mut seen = Vec::new();
            while began.elapsed() < Duration::from_secs(60) {
                let at = began.elapsed().as_secs();
                let outcome = tokio::time::timeout(Duration::from_secs(10), async {
                    let channel = switchyard_cli::client::connect(&endpoint)
                        .await
                        .map_err(|e| e.to_string())?;
                    keyed_on(channel, NEW_KEY, 4)
                        .await
                        .map_err(|s| s.to_string())
                })
                .await;
                seen.push(match outcome {
                    Ok(Ok(_)) => format!("{at}s ok"),
                    Ok(Err(e)) => format!("{at}s {e}"),
                    Err(_) => format!("{at}s no answer in 10 s"),
                });
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            seen
        })
    };
    let (rows, outcomes) = bench_series_with_outcomes(
        &endpoint,
        kind,
        &[("acme", NEW_KEY)],
        &replicas_command,
        scratch.path(),
    )
    .await;
    let probes = probes.await.expect("the probes");
    let (busiest, most_shards, shard_ups, reporting) = shard_watch.await.expect("the shard watch");
    let ready = (
        rows.iter().map(|r| r.ready).min().unwrap_or(0),
        rows.iter().map(|r| r.ready).max().unwrap_or(0),
    );
    let seen = format!(
        "requests {outcomes}; frontends ready {}..{}; shards reporting to the autoscaler \
         {}..{}; shards' mean utilisation at most {busiest:.2}, shard pods asked for at \
         most {most_shards}; shard decisions {shard_ups:?}",
        ready.0, ready.1, reporting.0, reporting.1
    );
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: bench {}: {seen}",
        kind.name()
    );
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: a fresh connection every 5 s beside the bench: {probes:?}"
    );
    let copies_added = shard_ups.iter().any(|d| d.to > d.from);
    if !copies_added {
        let _ = writeln!(
            std::io::stderr(),
            "switchyard-tests: real node: the frontends after the bench:\n{}",
            explain_service(&client, namespace, &instance, &cluster_ip).await
        );
    }
    assert!(
        copies_added,
        "no shard copy added (target utilisation 0.10): {seen}"
    );
    mds_api
        .patch(
            MD,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {
                "autoscaling": {"experts": null},
                "experts": {"replicaShards": 0},
            }})),
        )
        .await
        .expect("expert-shard autoscaling off");
    step(
        "a minute of load to shard copies added by the autoscaler",
        t,
    );

    // 7i. No API key in what people and other tenants read: every container's log
    // (this run and the one before a restart) of the pods alive now in the test's and the
    // release's namespaces, every Event, and the ModelDeployments. Only the Secrets hold
    // the keys.
    let t = Instant::now();
    let mut keys: Vec<String> = vec![OLD_KEY.into(), NEW_KEY.into(), MALLORY_KEY.into()];
    keys.extend((0..50).map(sybil_key));
    let mut read: Vec<(String, String)> = Vec::new();
    for ns in [namespace, RELEASE_NAMESPACE] {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        for pod in pods.list(&ListParams::default()).await.expect("pods").items {
            let name = pod.metadata.name.clone().unwrap_or_default();
            for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
                for previous in [false, true] {
                    let params = LogParams {
                        container: Some(c.name.clone()),
                        previous,
                        ..LogParams::default()
                    };
                    if let Ok(text) = pods.logs(&name, &params).await {
                        let run = if previous { " (previous run)" } else { "" };
                        read.push((format!("log of {ns}/{name} {}{run}", c.name), text));
                    }
                }
            }
        }
    }
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::all(client.clone());
    let events = events.list(&ListParams::default()).await.expect("events");
    read.push((
        format!("{} Events", events.items.len()),
        serde_json::to_string(&events.items).expect("events as JSON"),
    ));
    let every_md: Api<ModelDeployment> = Api::all(client.clone());
    let every_md = every_md
        .list(&ListParams::default())
        .await
        .expect("ModelDeployments");
    read.push((
        "ModelDeployments (spec and status)".into(),
        serde_json::to_string(&every_md.items).expect("ModelDeployments as JSON"),
    ));
    let logs = read
        .iter()
        .filter(|(what, _)| what.starts_with("log of"))
        .count();
    assert!(
        logs >= 3,
        "the operator's and the workers' logs were read ({logs})"
    );
    for (what, text) in &read {
        for key in &keys {
            assert!(
                !text.contains(key.as_str()),
                "an API key ({}…) is in the {what}",
                &key[..4]
            );
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: {} API keys searched for in {logs} container logs, \
         {}: none found",
        keys.len(),
        read.iter()
            .filter(|(what, _)| !what.starts_with("log of"))
            .map(|(what, _)| what.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    step("no API key in any log, Event or ModelDeployment", t);

    // 8. helm uninstall: the operator and its RBAC go, the CRD stays.
    node.run(
        &helm,
        &[
            "uninstall",
            RELEASE,
            "--namespace",
            RELEASE_NAMESPACE,
            "--wait",
            "--timeout",
            "2m",
        ],
    )
    .await
    .expect("helm uninstall");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    let chart_labels = "app.kubernetes.io/instance=switchyard";
    node.wait_for(
        &client,
        RELEASE_NAMESPACE,
        operator_selector,
        "the operator and its RBAC to be gone",
        POD_TIMEOUT,
        || {
            let (deployments, accounts, roles, bindings) = (
                deployments.clone(),
                accounts.clone(),
                roles.clone(),
                bindings.clone(),
            );
            async move {
                let lp = ListParams::default().labels(chart_labels);
                let left = deployments
                    .list(&lp)
                    .await
                    .map_err(|e| e.to_string())?
                    .items
                    .len()
                    + accounts
                        .list(&lp)
                        .await
                        .map_err(|e| e.to_string())?
                        .items
                        .len()
                    + roles
                        .list(&lp)
                        .await
                        .map_err(|e| e.to_string())?
                        .items
                        .len()
                    + bindings
                        .list(&lp)
                        .await
                        .map_err(|e| e.to_string())?
                        .items
                        .len();
                if left == 0 {
                    Ok(true)
                } else {
                    Err(format!("{left} chart object(s) left"))
                }
            }
        },
    )
    .await
    .expect("helm uninstall removes the operator and its RBAC");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(
        crds.get_opt("modeldeployments.switchyard.dev")
            .await
            .expect("reading CRDs")
            .is_some(),
        "the CRD stays after helm uninstall (Helm's convention; docs/install.md says how to remove it)"
    );
}

/// A pod that never becomes Ready: the harness's timeout says why, with what a person
/// debugging it needs (the pod's events, its container's log, the kubelet's log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_pod_is_reported_with_its_events_its_log_and_the_kubelets_log() {
    let node = RealNode::shared().await.expect("the real test node");
    let ns = node.namespace("stuck").await.expect("namespace");
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    pods.create(
        &PostParams::default(),
        &from_json(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "crashes", "labels": {"app": "crashes"}},
            "spec": {
                "automountServiceAccountToken": false,
                "containers": [{
                    "name": "worker",
                    "image": node.images().worker,
                    "imagePullPolicy": "Never",
                    "args": ["--role", "frontend", "--model", "/no/such/checkpoint"],
                    // Without a probe, a running container counts as Ready until it exits.
                    "readinessProbe": {"grpc": {"port": 50051}, "periodSeconds": 2},
                }],
            },
        })),
    )
    .await
    .expect("creating the pod");
    let err = node
        .wait_for_ready_pods(
            &ns.client,
            &ns.name,
            "app=crashes",
            1,
            Duration::from_secs(20),
        )
        .await
        .expect_err("a pod whose worker cannot load its model never becomes Ready")
        .to_string();
    for wanted in [
        "1 Ready pod(s) matching \"app=crashes\"",
        "--- pod",
        "event Normal Started",
        "/no/such/checkpoint",
        "--- kubelet log",
    ] {
        assert!(err.contains(wanted), "the report lacks {wanted:?}:\n{err}");
    }
}

/// A pod's worker made slow the way a CPU-starved or swapping process is: stopped
/// (SIGSTOP) for `stopped`, then let run (SIGCONT) for `running`, in turns, until dropped;
/// then it runs on normally. The test owns the fault: no traffic control, no flag in the
/// worker. (Kept under the liveness probe's 30 s, so the kubelet does not restart it.)
struct Slowed {
    pids: Vec<i32>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Slowed {
    fn start(pod_uid: &str, stopped: Duration, running: Duration) -> Slowed {
        use std::sync::atomic::Ordering;
        let pids: Vec<i32> = switchyard_tests::node::pod_processes(pod_uid)
            .into_iter()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim_end() == "switchyard-work")
            })
            .collect();
        assert!(
            !pids.is_empty(),
            "no switchyard-worker process of pod {pod_uid} on this machine"
        );
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (pids, stop) = (pids.clone(), stop.clone());
            std::thread::spawn(move || {
                let nap = |d: Duration| {
                    let until = Instant::now() + d;
                    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    switchyard_tests::node::signal_processes(&pids, libc::SIGSTOP);
                    nap(stopped);
                    switchyard_tests::node::signal_processes(&pids, libc::SIGCONT);
                    nap(running);
                }
            })
        };
        Slowed {
            pids,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Slowed {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        switchyard_tests::node::signal_processes(&self.pids, libc::SIGCONT);
    }
}

/// Each Ready frontend's name and `/metrics` text.
async fn frontend_metrics(
    client: &kube::Client,
    namespace: &str,
    selector: &str,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, ip) in pod_ips(client, namespace, selector).await {
        if let Ok(text) = http_get(&ip, 9090, "/metrics").await {
            out.push((name, text));
        }
    }
    out
}

/// Every Ready frontend's accounting invariant holds (`accepted = ended + queued +
/// running`): nothing admitted was lost in the fault just injected.
async fn check_every_frontends_accounting(
    client: &kube::Client,
    namespace: &str,
    selector: &str,
    after: &str,
) {
    // Every live frontend, Ready or not: the invariant does not depend on readiness, and
    // a frontend can turn unready for a moment right after a shard fault (one missed
    // Describe of a shard just resumed) while its metrics port serves on.
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let live: Vec<(String, String)> = pods
        .list(&ListParams::default().labels(selector))
        .await
        .expect("listing frontend pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| Some((p.metadata.name?, p.status?.pod_ip?)))
        .collect();
    let mut frontends = Vec::new();
    for (name, ip) in live {
        if let Ok(text) = http_get(&ip, 9090, "/metrics").await {
            frontends.push((name, text));
        }
    }
    assert!(!frontends.is_empty(), "no frontend's metrics after {after}");
    for (name, text) in frontends {
        switchyard_tests::accounting::Accounting::parse(&text)
            .check()
            .unwrap_or_else(|e| panic!("frontend {name}'s accounting after {after}: {e}"));
    }
}

/// How long [`wait_shards_up`]'s state must hold: more than a readiness probe's
/// failureThreshold × period (3 × 1 s), so that a verdict the kubelet reaches late (a
/// shard's probes that timed out while it was stopped, counted after it runs again) has
/// come and gone before the next step relies on the Service.
const SETTLE: Duration = Duration::from_secs(4);

/// Waits until the fleet has settled after a shard fault, for [`SETTLE`] without a break:
/// every shard pod Ready (the frontends find shards through the Ready-only headless
/// Service, so a shard the kubelet still counts unready drops out of their view), every
/// frontend pod Ready and answering `/readyz` 200 itself (its pod condition can lag), and
/// each frontend counting `shards` expert shards up (reachable, not benched):
/// `switchyard_expert_shard_up` is 1 for each. (A frontend reports not ready while some
/// expert has no reachable holder.)
async fn wait_shards_up(
    node: &RealNode,
    client: &kube::Client,
    namespace: &str,
    frontend_selector: &str,
    shards: usize,
) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let shard_selector = frontend_selector.replace(
        "app.kubernetes.io/component=frontend",
        "app.kubernetes.io/component=expert-shard",
    );
    let held_since = std::cell::Cell::new(None::<Instant>);
    let state = || {
        let (pods, shard_selector) = (pods.clone(), shard_selector.clone());
        async move {
            let live = |selector: String| {
                let pods = pods.clone();
                async move {
                    let items = pods
                        .list(&ListParams::default().labels(&selector))
                        .await
                        .map_err(|e| e.to_string())?
                        .items;
                    Ok::<_, String>(
                        items
                            .into_iter()
                            .filter(|p| p.metadata.deletion_timestamp.is_none())
                            .collect::<Vec<_>>(),
                    )
                }
            };
            let shard_pods = live(shard_selector).await?;
            if let Some(p) = shard_pods
                .iter()
                .find(|p| !switchyard_tests::node::is_pod_ready(p))
            {
                return Err(format!(
                    "shard pod {} not Ready",
                    p.metadata.name.as_deref().unwrap_or("?")
                ));
            }
            let frontends = live(frontend_selector.to_string()).await?;
            if frontends.is_empty() {
                return Err("no frontend pod".into());
            }
            for p in frontends {
                let name = p.metadata.name.clone().unwrap_or_default();
                if !switchyard_tests::node::is_pod_ready(&p) {
                    return Err(format!("frontend {name} not Ready"));
                }
                let ip = p.status.and_then(|s| s.pod_ip).unwrap_or_default();
                let readyz = http_get(&ip, 9090, "/readyz").await?;
                if !readyz.starts_with("HTTP/1.1 200") && !readyz.starts_with("HTTP/1.0 200") {
                    return Err(format!(
                        "frontend {name}'s /readyz: {}",
                        readyz.lines().last().unwrap_or_default()
                    ));
                }
                let text = http_get(&ip, 9090, "/metrics").await?;
                let up = text
                    .lines()
                    .filter(|l| l.starts_with("switchyard_expert_shard_up{"))
                    .filter(|l| l.ends_with(" 1"))
                    .count();
                if up != shards {
                    return Err(format!("frontend {name}: {up} of {shards} shards up"));
                }
            }
            Ok(())
        }
    };
    node.wait_for(
        client,
        namespace,
        frontend_selector,
        "every pod Ready, every frontend counting every shard up, for 4 s",
        POD_TIMEOUT,
        || {
            let now = state();
            let held_since = &held_since;
            async move {
                match now.await {
                    Ok(()) => {
                        let since = held_since.get().unwrap_or_else(Instant::now);
                        held_since.set(Some(since));
                        Ok(since.elapsed() >= SETTLE)
                    }
                    Err(why) => {
                        held_since.set(None);
                        Err(why)
                    }
                }
            }
        },
    )
    .await
    .expect("every pod Ready, every frontend counting every shard up");
}

/// A prompt whose greedy continuation routes unevenly over the fixture's experts: on the
/// even spread over 2 shards the busiest shard carries about 1.45× the mean, the balanced
/// plan with 2 spare slots about 1.01× (measured in process on the qwen3_moe fixture).
const SKEWED_PROMPT: &str = "0 1 2 3 4 5 6 7 8 9";

/// Step 7c8: the balanced placement, driven by the operator. The ModelDeployment switches
/// to `experts.placement.strategy: balanced` with 2 spare slots (the pods roll once, onto
/// the even spread); then streams of a prompt that routes unevenly run back to back. The
/// operator reads the frontends' expert load, writes placement b1 (phase 1: each shard
/// loads what it gains and keeps what it loses), waits until every shard and frontend has
/// it, and writes phase 2. Every stream, those across the move included, ends with the
/// tokens it gives on the even spread; no pod restarts; status.placement.balanced and two
/// Events tell the move. Then `experts.shards` goes 2 → 3 → 2 under streams: two more
/// moves (b2, b3), no frontend and no staying shard restarted, the third pod removed only
/// once b3 is in place. Back on the even spread the placement ConfigMap and status go.
async fn balanced_placement(
    node: &RealNode,
    client: &kube::Client,
    namespace: &str,
    [frontend_selector, shard_selector]: [&str; 2],
    endpoint: &str,
) {
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), namespace);
    let request = || switchyard_tests::worker::greedy_request(SKEWED_PROMPT, 200);
    let rolled = |selector: &str, before: Vec<String>, count: usize| {
        let (client, selector) = (client.clone(), selector.to_string());
        move || {
            let (client, selector, before) = (client.clone(), selector.clone(), before.clone());
            async move {
                let ready = pod_ips(&client, namespace, &selector).await;
                let all = uids_of(&client, namespace, &selector).await;
                Ok(ready.len() == count
                    && all.len() == count
                    && all.iter().all(|u| !before.contains(u)))
            }
        }
    };
    // Waits until every pod of both roles was replaced (the same count, all Ready).
    let wait_rolled = |shards: Vec<String>, frontends: Vec<String>, onto: &'static str| {
        let rolled = &rolled;
        async move {
            for (selector, before, role) in [
                (shard_selector, shards, "shards"),
                (frontend_selector, frontends, "frontend"),
            ] {
                let what = format!("the {role} rolled onto {onto}");
                let count = before.len();
                node.wait_for(
                    client,
                    namespace,
                    selector,
                    &what,
                    POD_TIMEOUT,
                    rolled(selector, before, count),
                )
                .await
                .expect(&what);
            }
        }
    };
    let (frontends, shards) = (
        uids_of(client, namespace, frontend_selector).await,
        uids_of(client, namespace, shard_selector).await,
    );
    // A threshold no load reaches first: no move until the streams run (the frontends
    // still hold earlier steps' load, and the first stream's must not move experts before
    // the streams that are to span the move have started).
    let threshold = |percent: i32| {
        serde_json::json!({"experts": {"redundantExperts": 2, "placement": {
            "strategy": "balanced",
            "rebalance": {"imbalancePercent": percent, "sustainSeconds": 0, "minIntervalSeconds": 600},
        }}})
    };
    patch_spec(&mds, threshold(10_000), "experts.placement").await;
    wait_rolled(shards, frontends, "the balanced strategy").await;
    wait_shards_up(node, client, namespace, frontend_selector, 2).await;
    let (frontends, shards) = (
        uids_of(client, namespace, frontend_selector).await,
        uids_of(client, namespace, shard_selector).await,
    );
    // Unpaced streams: their tokens/s before, during and after the move is the dip.
    let timed = || async {
        let t = Instant::now();
        let got = generate_stream_of(endpoint, request(), Duration::ZERO, |_| {}).await;
        (got, t.elapsed())
    };
    let rate = |took: Duration| 200.0 / took.as_secs_f64();
    let (want, took) = timed().await;
    let want = want.expect("the skewed prompt on the even spread");
    let mut rates_before = vec![rate(took)];
    for _ in 0..2 {
        let (got, took) = timed().await;
        assert_eq!(got.as_ref(), Ok(&want), "the even spread, again");
        rates_before.push(rate(took));
    }

    // The move, watched from status while the streams run; the threshold is lowered (no
    // pod rolls for it) once the first stream is under way.
    let balanced = |md: &ModelDeployment| {
        md.status
            .as_ref()
            .and_then(|s| s.placement.as_ref())
            .and_then(|p| p.balanced.clone())
    };
    let started = Instant::now();
    let watch = {
        let mds = mds.clone();
        tokio::spawn(async move {
            let (mut moving, mut done) = (None, None);
            while done.is_none() && started.elapsed() < POD_TIMEOUT {
                if let Ok(md) = mds.get(MD).await
                    && let Some(b) = balanced(&md)
                    && b.revision == "b1"
                {
                    if b.phase == "Moving" {
                        moving.get_or_insert(started.elapsed());
                    } else {
                        done = Some(started.elapsed());
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (moving, done)
        })
    };
    let lower = {
        let mds = mds.clone();
        let spec = threshold(110);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            patch_spec(&mds, spec, "experts.placement.rebalance.imbalancePercent").await;
            started.elapsed()
        })
    };
    let mut streams = Vec::new();
    while !watch.is_finished() || streams.is_empty() {
        let from = started.elapsed();
        let got = generate_stream_of(endpoint, request(), Duration::ZERO, |_| {})
            .await
            .unwrap_or_else(|e| panic!("stream {} during the placement move: {e}", streams.len()));
        assert_eq!(
            got,
            want,
            "stream {}: the tokens of the even spread",
            streams.len()
        );
        streams.push((from, started.elapsed()));
    }
    let lowered = lower.await.expect("the threshold lowered");
    let (moving, done) = watch.await.expect("the status watch");
    let done = done.unwrap_or_else(|| {
        panic!("placement b1 not in place within {POD_TIMEOUT:?} (seen moving at {moving:?})")
    });
    let moving = moving.unwrap_or(done);
    let across = streams
        .iter()
        .filter(|(from, to)| *from < done && *to > moving)
        .count();
    assert!(
        across > 0,
        "no stream ran during the move ({moving:?}..{done:?}): {streams:?}"
    );
    let rates_during: Vec<f64> = streams
        .iter()
        .filter(|(from, to)| *from < done && *to > moving)
        .map(|(from, to)| rate(*to - *from))
        .collect();
    let mut rates_after = Vec::new();
    for _ in 0..3 {
        let (got, took) = timed().await;
        assert_eq!(got.as_ref(), Ok(&want), "on placement b1");
        rates_after.push(rate(took));
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };

    // What the move left: the file in phase 2, every shard at b1, nothing restarted.
    let md = mds.get(MD).await.expect("the ModelDeployment");
    let b = balanced(&md).expect("status.placement.balanced");
    let figure = |v: &Option<String>| -> f64 {
        v.as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let (before, after) = (figure(&b.imbalance_before), figure(&b.imbalance_after));
    assert!(
        before > 1.1 && after < before,
        "imbalance {before} → {after}: {b:?}"
    );
    assert_eq!(b.slots_per_shard, 5, "⌈(8 experts + 2) / 2⌉");
    assert!(
        !b.hottest.is_empty() && b.last_rebalance_time.is_some() && b.reason.is_some(),
        "{b:?}"
    );
    let configmaps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), namespace);
    let file = configmaps
        .get(&format!("{MD}-placement"))
        .await
        .expect("the placement ConfigMap")
        .data
        .and_then(|d| d.get("placement.json").cloned())
        .expect("placement.json");
    let file: serde_json::Value = serde_json::from_str(&file).expect("the placement file");
    assert_eq!(file["revision"], "b1");
    assert!(
        file["shards"]
            .as_array()
            .is_some_and(|s| s.len() == 2 && s.iter().all(|e| e.get("draining").is_none())),
        "phase 2: nothing left draining: {file}"
    );
    for (name, ip) in pod_ips(client, namespace, shard_selector).await {
        let load = http_get(&ip, 9090, "/load").await.expect("a shard's /load");
        assert!(
            load.contains("\"placementRevision\":\"b1\""),
            "shard {name} holds b1: {load}"
        );
    }
    assert_eq!(
        uids_of(client, namespace, shard_selector).await,
        shards,
        "no shard restarted"
    );
    assert_eq!(
        uids_of(client, namespace, frontend_selector).await,
        frontends,
        "no frontend restarted"
    );
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), namespace);
    let reasons: Vec<String> = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={MD}")))
        .await
        .expect("events")
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    for reason in ["Rebalancing", "Rebalanced"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no {reason} Event: {reasons:?}"
        );
    }
    check_every_frontends_accounting(client, namespace, frontend_selector, "a placement move")
        .await;
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: balanced placement: imbalance {before} → {after}; \
         threshold lowered {:.1}s, b1 seen moving {:.1}s and in place {:.1}s into the streams; \
         {} streams of 200 tokens, {across} across the move, all with the even \
         spread's tokens; nothing restarted; tokens/s of one stream (median): {:.0} before, \
         {:.0} during, {:.0} after the move",
        lowered.as_secs_f64(),
        moving.as_secs_f64(),
        done.as_secs_f64(),
        streams.len(),
        median(&rates_before),
        median(&rates_during),
        median(&rates_after),
    );

    // A new shard count under the balanced placement is a move, not a roll: 2 → 3 → 2
    // shards while streams run back to back. Every stream keeps the even spread's
    // tokens; no frontend restarts, nor any shard pod that stays; the third pod comes as
    // a copy, takes its own experts in b2, and goes only after b3 has moved them away.
    for (to, revision) in [(3_usize, "b2"), (2, "b3")] {
        let t = Instant::now();
        let (frontends, shards) = (
            uids_of(client, namespace, frontend_selector).await,
            uids_of(client, namespace, shard_selector).await,
        );
        patch_spec(
            &mds,
            serde_json::json!({"experts": {"shards": to}}),
            "experts.shards",
        )
        .await;
        let (mut streams, mut while_moving, mut pods_seen) = (0, 0, shards.len());
        loop {
            let got = generate_stream_of(endpoint, request(), Duration::ZERO, |_| {})
                .await
                .unwrap_or_else(|e| panic!("stream {streams} while the shards go to {to}: {e}"));
            assert_eq!(got, want, "stream {streams} while the shards go to {to}");
            streams += 1;
            let b = balanced(&mds.get(MD).await.expect("the ModelDeployment"));
            let pods = uids_of(client, namespace, shard_selector).await.len();
            pods_seen = pods_seen.max(pods);
            if b.as_ref().is_some_and(|b| b.phase == "Moving") {
                while_moving += 1;
            }
            if b.as_ref().is_some_and(|b| {
                b.revision == revision && b.phase != "Moving" && b.shards == Some(to as i32)
            }) && pods == to
                && pod_ips(client, namespace, shard_selector).await.len() == to
            {
                break;
            }
            assert!(
                t.elapsed() < POD_TIMEOUT,
                "the shards not moved to {to} within {POD_TIMEOUT:?}: {b:?}, {pods} shard pods"
            );
        }
        let took = t.elapsed();
        let shards_now = uids_of(client, namespace, shard_selector).await;
        let (fewer, more) = if to > shards.len() {
            (&shards, &shards_now)
        } else {
            (&shards_now, &shards)
        };
        assert!(
            fewer.iter().all(|u| more.contains(u)),
            "no shard pod that stays restarted (before {shards:?}, after {shards_now:?})"
        );
        assert_eq!(
            uids_of(client, namespace, frontend_selector).await,
            frontends,
            "no frontend restarted for a new shard count"
        );
        assert!(
            while_moving > 0,
            "no stream ran while {revision} moved ({streams} streams)"
        );
        for (name, ip) in pod_ips(client, namespace, shard_selector).await {
            let load = http_get(&ip, 9090, "/load").await.expect("a shard's /load");
            assert!(
                load.contains(&format!("\"placementRevision\":\"{revision}\"")),
                "shard {name} holds {revision}: {load}"
            );
        }
        wait_shards_up(node, client, namespace, frontend_selector, to).await;
        let _ = writeln!(
            std::io::stderr(),
            "switchyard-tests: real node: balanced placement: experts.shards → {to} moved \
             ({revision}) in {:.1}s under {streams} streams ({while_moving} while moving), \
             all with the even spread's tokens; at most {pods_seen} shard pods; no frontend \
             and no staying shard restarted",
            took.as_secs_f64()
        );
    }

    // Back to the even spread: the pods roll once more, the file and the status go.
    let (frontends, shards) = (
        uids_of(client, namespace, frontend_selector).await,
        uids_of(client, namespace, shard_selector).await,
    );
    patch_spec(
        &mds,
        serde_json::json!({"experts": {"redundantExperts": 0, "placement": {"strategy": "evenSpread"}}}),
        "experts.placement back to evenSpread",
    )
    .await;
    wait_rolled(shards, frontends, "the even spread").await;
    node.wait_for(
        client,
        namespace,
        shard_selector,
        "the placement ConfigMap and status.placement.balanced gone",
        POD_TIMEOUT,
        || {
            let (configmaps, mds) = (configmaps.clone(), mds.clone());
            async move {
                let cm = configmaps
                    .get_opt(&format!("{MD}-placement"))
                    .await
                    .map_err(|e| e.to_string())?;
                let md = mds.get(MD).await.map_err(|e| e.to_string())?;
                Ok(cm.is_none() && balanced(&md).is_none())
            }
        },
    )
    .await
    .expect("the placement ConfigMap and status gone");
    wait_shards_up(node, client, namespace, frontend_selector, 2).await;
    let back = generate_stream_of(endpoint, request(), Duration::ZERO, |_| {})
        .await
        .expect("the skewed prompt back on the even spread");
    assert_eq!(back, want);
}

/// Step 7c3: a shard that answers slowly. With shard 0's copy up, shard 0's own pod is
/// slowed (6 s stopped, 0.2 s running) under a stream: the frontend misses its 5 s expert
/// deadline, benches the slow pod and goes on with the copy, so the stream ends with the
/// tokens it gives without the fault. Then shard 1, which has no copy, is slowed: a
/// request ends UNAVAILABLE within seconds instead of hanging. Both run normally again
/// and every frontend counts all three shard pods up.
async fn slow_shards(
    node: &RealNode,
    client: &kube::Client,
    namespace: &str,
    frontend_selector: &str,
    endpoint: &str,
) {
    const STOPPED: Duration = Duration::from_secs(6);
    const RUNNING: Duration = Duration::from_millis(200);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let uid = |name: String| {
        let pods = pods.clone();
        async move {
            pods.get(&name)
                .await
                .expect("a shard pod")
                .metadata
                .uid
                .expect("its uid")
        }
    };
    let failovers = || async {
        frontend_metrics(client, namespace, frontend_selector)
            .await
            .iter()
            .map(|(_, text)| metric(text, "switchyard_expert_failovers_total"))
            .sum::<f64>()
    };
    let want = generate_stream(endpoint, 400, Duration::ZERO, |_| {})
        .await
        .expect("the stream without a fault");
    let before = failovers().await;
    let shard0 = uid(format!("{MD}-experts-0")).await;
    let (slow_tx, slow_rx) = tokio::sync::oneshot::channel::<()>();
    let mut slow_tx = Some(slow_tx);
    let started = Instant::now();
    let stream = generate_stream(endpoint, 400, Duration::ZERO, |n| {
        if n >= 5
            && let Some(tx) = slow_tx.take()
        {
            let _ = tx.send(());
        }
    });
    let slower = async {
        slow_rx
            .await
            .ok()
            .map(|()| Slowed::start(&shard0, STOPPED, RUNNING))
    };
    let (got, slowed) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(stream, slower)
    })
    .await
    .expect("the stream across a slow shard with a copy ends");
    let took = started.elapsed();
    assert!(slowed.is_some(), "the stream reached 5 tokens");
    drop(slowed);
    let got = got.expect("the stream across a slow shard with a copy");
    assert_eq!(got, want, "the tokens across a slow shard with a copy");
    let routed_around = failovers().await - before;
    assert!(
        routed_around >= 1.0,
        "a frontend routed around the slow shard ({routed_around} failovers)"
    );
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: shard 0 slowed under a stream, its copy up: 400 tokens \
         as without the fault in {:.1}s, {routed_around} Forward call(s) failed over",
        took.as_secs_f64()
    );
    wait_shards_up(node, client, namespace, frontend_selector, 3).await;

    let shard1 = uid(format!("{MD}-experts-1")).await;
    let slowed = Slowed::start(&shard1, STOPPED, RUNNING);
    let started = Instant::now();
    let mut call = tonic::Request::new(greedy(MAX_TOKENS));
    call.set_timeout(Duration::from_secs(60));
    let outcome = tokio::time::timeout(Duration::from_secs(90), async {
        InferenceClient::connect(endpoint.to_string())
            .await
            .expect("connecting through the Service")
            .generate(call)
            .await
    })
    .await
    .expect("a call needing a slow shard with no copy ends");
    let took = started.elapsed();
    drop(slowed);
    let status = outcome.expect_err("shard 1 has no copy: a call cannot finish while it is slow");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        took < Duration::from_secs(30),
        "UNAVAILABLE came {took:?} after the call (the expert deadline is 5 s)"
    );
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: shard 1 (no copy) slowed: the call ended {:?} after \
         {:.1}s: {}",
        status.code(),
        took.as_secs_f64(),
        status.message()
    );
    wait_shards_up(node, client, namespace, frontend_selector, 3).await;
    check_every_frontends_accounting(client, namespace, frontend_selector, "a slow shard").await;
}

/// Step 7c5: memory pressure on a frontend. A frontend-only ModelDeployment whose frontend
/// may use 64 MiB (`resources.limits.memory`) and batch up to 512 sequences: its KV cache
/// is sized from the container's limit, less the reserve for one step and the requests it
/// holds (fewer tokens than 512 full-context sequences), and a flood of 640 requests of
/// 400 prompt + 100 new tokens (over 6 connections), more than the cache holds and more
/// than the engine and the queue take (512 + 64), fills it: the engine preempts, the
/// queue's bound refuses the rest. The frontend is not OOM-killed (no OOM kill in its
/// cgroup, its container never restarts); every request ends served or with an explicit
/// UNAVAILABLE or DEADLINE_EXCEEDED; the accounting holds and it serves afterwards.
async fn memory_pressure(node: &RealNode, client: &kube::Client, namespace: &str) {
    use pb::generate_request::Input;
    const NAME: &str = "pressure";
    const LIMIT_MIB: u64 = 64;
    const BATCH: u64 = 512;
    // The fixture's max_position_embeddings.
    const CONTEXT: f64 = 512.0;
    const REQUESTS: usize = 640;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), namespace);
    mds.create(
        &PostParams::default(),
        &from_json(serde_json::json!({
            "apiVersion": "switchyard.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": NAME},
            "spec": {
                "model": {"pvc": {"claimName": "models", "path": "/"}, "dtype": "f32"},
                "frontend": {
                    "replicas": 1,
                    "resources": {"limits": {"memory": format!("{LIMIT_MIB}Mi")}},
                },
                "experts": {"shards": 0},
                "serving": {"maxBatchSize": BATCH, "maxBatchTokens": 512},
                "admission": {"queue": {"maxQueued": 64}},
            },
        })),
    )
    .await
    .expect("creating the memory-limited ModelDeployment");
    let selector =
        format!("app.kubernetes.io/instance={NAME},app.kubernetes.io/component=frontend");
    node.wait_for_ready_pods(client, namespace, &selector, 1, POD_TIMEOUT)
        .await
        .expect("the memory-limited frontend Ready");
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("listing the frontend")
        .items
        .into_iter()
        .find(switchyard_tests::node::is_pod_ready)
        .expect("the Ready frontend");
    let (name, uid) = (
        pod.metadata.name.clone().expect("name"),
        pod.metadata.uid.clone().expect("uid"),
    );
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("its IP");
    let sized = pods
        .logs(&name, &LogParams::default())
        .await
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("KV cache sized"))
        .unwrap_or("(no sizing line in the log)")
        .to_string();
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: memory pressure: {sized}"
    );
    let scrape = || async { http_get(&ip, 9090, "/metrics").await.unwrap_or_default() };
    let text = scrape().await;
    let blocks = metric(&text, "switchyard_kv_cache_blocks{state=\"free\"}")
        + metric(&text, "switchyard_kv_cache_blocks{state=\"used\"}");
    let kv_tokens = blocks * metric(&text, "switchyard_kv_cache_block_size_tokens");
    assert!(
        kv_tokens > 0.0 && kv_tokens < BATCH as f64 * CONTEXT,
        "the KV cache ({kv_tokens} tokens) is sized from the {LIMIT_MIB} MiB limit, below \
         {BATCH} full-context sequences"
    );

    let endpoint = format!("http://{ip}:50051");
    // At most 128 streams a connection (the frontend's HTTP/2 limit).
    let mut channels = Vec::new();
    for _ in 0..6 {
        channels.push(
            tonic::transport::Channel::from_shared(endpoint.clone())
                .expect("an endpoint")
                .connect()
                .await
                .expect("connecting to the frontend"),
        );
    }
    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (ip, flooding) = (ip.clone(), flooding.clone());
        tokio::spawn(async move {
            let mut fullest: f64 = 0.0;
            while flooding.load(std::sync::atomic::Ordering::Relaxed) {
                let text = http_get(&ip, 9090, "/metrics").await.unwrap_or_default();
                let used = metric(&text, "switchyard_kv_cache_blocks{state=\"used\"}");
                let free = metric(&text, "switchyard_kv_cache_blocks{state=\"free\"}");
                if used + free > 0.0 {
                    fullest = fullest.max(used / (used + free));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            fullest
        })
    };
    let started = Instant::now();
    let calls = (0..REQUESTS).map(|i| {
        let mut c = InferenceClient::new(channels[i % channels.len()].clone());
        async move {
            let mut call = tonic::Request::new(pb::GenerateRequest {
                // Distinct prompts: the prefix cache shares no block between them.
                input: Some(Input::TokenIds(pb::TokenIds {
                    ids: (0..400).map(|j| ((i * 7 + j) % 370) as u32).collect(),
                })),
                sampling: Some(pb::SamplingParams {
                    max_tokens: Some(100),
                    temperature: Some(0.0),
                    ignore_eos: true,
                    ..Default::default()
                }),
                ..Default::default()
            });
            call.set_timeout(Duration::from_secs(120));
            c.generate(call)
                .await
                .map(|r| r.into_inner().token_ids.len())
        }
    });
    let outcomes = tokio::time::timeout(Duration::from_secs(300), futures::future::join_all(calls))
        .await
        .expect("every request of the flood ends");
    let took = started.elapsed();
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    let fullest = watcher.await.expect("the KV watcher");
    let mut tally: std::collections::BTreeMap<String, usize> = Default::default();
    let mut unexplained = Vec::new();
    for outcome in &outcomes {
        let key = match outcome {
            Ok(100) => "OK".to_string(),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::ResourceExhausted
                ) =>
            {
                format!("{:?}", s.code())
            }
            other => {
                unexplained.push(format!("{other:?}"));
                "unexplained".to_string()
            }
        };
        *tally.entry(key).or_default() += 1;
    }
    let served = tally.get("OK").copied().unwrap_or(0);
    let text = scrape().await;
    let preemptions = metric(&text, "switchyard_preemptions_total");
    let cgroup =
        switchyard_tests::node::pod_cgroup("memory", &uid).expect("the frontend's memory cgroup");
    let read = |file: &str| std::fs::read_to_string(cgroup.join(file)).unwrap_or_default();
    let peak_mib = read("memory.max_usage_in_bytes")
        .trim()
        .parse::<u64>()
        .unwrap_or(0) as f64
        / (1u64 << 20) as f64;
    let oom_kills: u64 = read("memory.oom_control")
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        .unwrap_or(0);
    let restarts: i32 = pods
        .get(&name)
        .await
        .expect("the frontend after the flood")
        .status
        .and_then(|s| s.container_statuses)
        .map(|c| c.iter().map(|c| c.restart_count).sum())
        .unwrap_or(0);
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: real node: memory pressure: KV cache {kv_tokens} tokens under a \
         {LIMIT_MIB} MiB limit; {REQUESTS} requests in {:.1}s: {tally:?}; KV at most {:.0} % \
         used, {preemptions} preemption(s); cgroup peak {peak_mib:.1} MiB, {oom_kills} OOM \
         kill(s), {restarts} restart(s)",
        took.as_secs_f64(),
        fullest * 100.0,
    );
    assert_eq!(
        oom_kills, 0,
        "the kernel OOM-killed in the frontend's cgroup"
    );
    assert_eq!(restarts, 0, "the frontend's container restarted");
    assert!(served > 0, "the flood was served in part: {tally:?}");
    let refused = tally.get("Unavailable").copied().unwrap_or(0)
        + tally.get("ResourceExhausted").copied().unwrap_or(0);
    assert!(
        refused > 0,
        "the queue's bound refused what the engine and the queue could not take: {tally:?}"
    );
    assert!(
        fullest >= 0.9 || preemptions >= 1.0,
        "the flood filled the KV cache (at most {:.0} % used, {preemptions} preemptions)",
        fullest * 100.0
    );
    switchyard_tests::accounting::Accounting::parse(&text)
        .check()
        .expect("the frontend's accounting after the flood");
    assert_eq!(
        generate(&endpoint)
            .await
            .expect("a request after the flood")
            .len(),
        MAX_TOKENS as usize
    );
    mds.delete(NAME, &DeleteParams::default())
        .await
        .expect("deleting the memory-limited ModelDeployment");
    node.wait_for(
        client,
        namespace,
        &selector,
        "the memory-limited frontend gone",
        POD_TIMEOUT,
        || async {
            Ok(pods
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(|e| e.to_string())?
                .items
                .is_empty())
        },
    )
    .await
    .expect("the memory-limited frontend removed");
}

/// One worker process on the node, found by its executable's name.
#[derive(Debug, Clone, PartialEq)]
struct WorkerProcess {
    pid: u32,
    role: String,
    rss_kib: u64,
}

/// Every `switchyard-worker` process on this machine (the pods' containers run as host
/// processes), with its role (`SWITCHYARD_ROLE`, which the operator sets) and resident
/// memory.
fn worker_processes() -> Vec<WorkerProcess> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        // The kernel keeps 15 characters of the name.
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim_end() != "switchyard-work" {
            continue;
        }
        let environ = std::fs::read(dir.join("environ")).unwrap_or_default();
        let role = environ
            .split(|b| *b == 0)
            .find_map(|kv| kv.strip_prefix(b"SWITCHYARD_ROLE="))
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .unwrap_or_else(|| "?".into());
        let rss_kib = std::fs::read_to_string(dir.join("status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        found.push(WorkerProcess { pid, role, rss_kib });
    }
    found.sort_by_key(|p| p.pid);
    found
}

/// The median of the non-zero values (0 = no sample), or 0.
fn median_nonzero(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.filter(|x| *x > 0.0).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `make soak`: `SWITCHYARD_SOAK_MINUTES` (default 30) of mixed load on the real node:
/// acme's legitimate requests (2/s, about 40 % of two frontends) beside an attacker at 5/s
/// against a 6/min quota, on a ModelDeployment of 2 frontends and 2 expert shards (the
/// operator as a process). It reports each worker process's resident memory after the
/// warm-up (a sixth of the run, at most 5 minutes) and at the end, acme's TTFT in the first
/// and last sixth after the warm-up (the median of each second's p99), and every
/// frontend's accounting; it fails on more than 5 % memory growth, on any of acme's
/// requests not served, on a worker restarted, or on the accounting. Not in `make test`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak of 30 minutes by default: make soak"]
async fn soak_mixed_load_keeps_memory_flat_serves_every_legitimate_request_and_accounts_for_all() {
    use switchyard_cli::loadgen::{self, Scenario, Shape};
    const ACME_KEY: &str = "soak-acme-0123456789abcdef";
    const ATTACKER_KEY: &str = "soak-attacker-0123456789abcdef";
    let minutes: u64 = std::env::var("SWITCHYARD_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .filter(|m| *m > 0)
        .unwrap_or(30);
    let duration = Duration::from_secs(minutes * 60);
    let warmup = (duration / 6).min(Duration::from_secs(300));
    let report_line = |text: String| {
        let _ = writeln!(std::io::stderr(), "switchyard-tests: soak: {text}");
    };

    let node = RealNode::shared().await.expect("the real test node");
    let cp = node.control_plane();
    cp.install_crd(switchyard_tests::MODEL_DEPLOYMENT_CRD)
        .await
        .expect("the CRD");
    let ns = node.namespace("soak").await.expect("namespace");
    let namespace = ns.name.as_str();
    let client = ns.client.clone();
    let _operator =
        switchyard_tests::OperatorProcess::start(cp, namespace, "soak", Duration::from_secs(15))
            .await
            .expect("the operator");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    secrets
        .create(
            &PostParams::default(),
            &from_json(serde_json::json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "soak-keys"},
                "stringData": {"tenants":
                    format!("acme:{ACME_KEY}:standard\nattacker:{ATTACKER_KEY}:free\n")},
            })),
        )
        .await
        .expect("the key Secret");
    let model = model_on_node(namespace, "qwen3_moe");
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), namespace);
    mds.create(
        &PostParams::default(),
        &from_json(serde_json::json!({
            "apiVersion": "switchyard.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "soak"},
            "spec": {
                "image": node.images().worker,
                "imagePullPolicy": "Never",
                "model": {"hostPath": {"path": model.display().to_string()}, "dtype": "f32"},
                "frontend": {"replicas": 2},
                "experts": {"shards": 2},
                "serving": {"maxBatchSize": 8},
                "admission": {
                    "apiKeySecret": {"name": "soak-keys"},
                    "tiers": [
                        {"name": "standard"},
                        {"name": "free", "priority": "low", "requestsPerMinute": 6},
                    ],
                    "defaultTier": "standard",
                },
            },
        })),
    )
    .await
    .expect("the ModelDeployment");
    let frontends = "app.kubernetes.io/instance=soak,app.kubernetes.io/component=frontend";
    let shards = "app.kubernetes.io/instance=soak,app.kubernetes.io/component=expert-shard";
    node.wait_for_ready_pods(&client, namespace, frontends, 2, POD_TIMEOUT)
        .await
        .expect("2 frontends Ready");
    node.wait_for_ready_pods(&client, namespace, shards, 2, POD_TIMEOUT)
        .await
        .expect("2 shards Ready");
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let cluster_ip = services
        .get("soak")
        .await
        .expect("the client Service")
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("a ClusterIP");
    let endpoint = format!("http://{cluster_ip}:50051");
    // Connect only once kube-proxy's rules list both frontends: it balances connections,
    // and ones opened while its rules list one (they follow the EndpointSlice by a
    // moment) all stay on that one for the whole run.
    node.wait_for(
        &client,
        namespace,
        frontends,
        "kube-proxy's rules for the client Service listing 2 frontends",
        POD_TIMEOUT,
        || async move {
            let listed = switchyard_tests::node::proxied_endpoints(namespace, "soak", "grpc");
            if listed.len() >= 2 {
                Ok(true)
            } else {
                Err(format!("kube-proxy sends to {listed:?}"))
            }
        },
    )
    .await
    .expect("kube-proxy sends to both frontends");
    let workers_at_start = worker_processes();
    report_line(format!(
        "{minutes} min against 2 frontends and 2 shards; worker processes {:?}",
        workers_at_start
    ));

    // Memory every 30 s while the load runs.
    let sampler = tokio::spawn(async move {
        let began = Instant::now();
        let mut samples = Vec::new();
        loop {
            samples.push((began.elapsed(), worker_processes()));
            if began.elapsed() >= duration {
                return samples;
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    });
    let tenants = keyed_tenants(&[("acme", ACME_KEY), ("attacker", ATTACKER_KEY)]);
    let workload = loadgen::Workload {
        model: String::new(),
        prompt_tokens: 32,
        prompt_tokens_jitter: 16,
        output_tokens: 128,
        vocab: loadgen::VocabRange {
            start: 100,
            end: 300,
        },
        priority: pb::Priority::Unspecified,
        shared_prefix: Vec::new(),
    };
    let (scenario, total) = Scenario::named_shaped(
        ScenarioKind::Flood,
        tenants,
        workload,
        2.0,
        5.0,
        Shape::Steady,
    )
    .expect("the scenario");
    let report = bench_over_four_connections(&endpoint, scenario, total, duration, 7, None).await;
    let samples = sampler.await.expect("the memory samples");

    // Memory: each process after the warm-up and at the end.
    let after_warmup = samples
        .iter()
        .find(|(at, _)| *at >= warmup)
        .map(|(_, p)| p.clone())
        .unwrap_or_default();
    let at_end = samples.last().map(|(_, p)| p.clone()).unwrap_or_default();
    let mut growth = Vec::new();
    for p in &after_warmup {
        match at_end.iter().find(|q| q.pid == p.pid) {
            Some(q) => growth.push((
                p.role.clone(),
                p.pid,
                p.rss_kib,
                q.rss_kib,
                (q.rss_kib as f64 - p.rss_kib as f64) / p.rss_kib.max(1) as f64 * 100.0,
            )),
            None => panic!("worker {} ({}) is gone by the end", p.pid, p.role),
        }
    }
    for (role, pid, from, to, percent) in &growth {
        report_line(format!(
            "{role} (pid {pid}): {:.1} MiB after the warm-up, {:.1} MiB at the end: {percent:+.2} %",
            *from as f64 / 1024.0,
            *to as f64 / 1024.0,
        ));
    }
    // Latency drift: acme's TTFT, the median of each second's p99, first and last sixth
    // after the warm-up.
    let rows = report.series.clone().unwrap_or_default();
    let skip = warmup.as_secs() as usize;
    let measured = rows.get(skip..).unwrap_or_default();
    let sixth = (measured.len() / 6).max(1);
    let first = median_nonzero(measured.iter().take(sixth).map(|r| r.legit_p99_ttft));
    let last = median_nonzero(measured.iter().rev().take(sixth).map(|r| r.legit_p99_ttft));
    let acme = report
        .tenants
        .iter()
        .find(|t| t.name == "acme")
        .expect("acme's report");
    let attacker = report
        .tenants
        .iter()
        .find(|t| t.name == "attacker")
        .expect("the attacker's report");
    report_line(format!(
        "acme: {} requests, {} ok, {} failed {:?}, TTFT p50 {:.1} ms p99 {:.1} ms; its p99 \
         TTFT per second, median over the first sixth after the warm-up {:.1} ms, over the \
         last sixth {:.1} ms; the attacker: {} ok, {} refused {:?}",
        acme.requests,
        acme.ok,
        acme.failed,
        acme.errors,
        acme.ttft.as_ref().map_or(0.0, |t| t.p50_ms),
        acme.ttft.as_ref().map_or(0.0, |t| t.p99_ms),
        first * 1000.0,
        last * 1000.0,
        attacker.ok,
        attacker.failed,
        attacker.errors,
    ));
    // The accounting, once the last requests are done.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (name, ip) in pod_ips(&client, namespace, frontends).await {
        let text = http_get(&ip, 9090, "/metrics")
            .await
            .expect("a frontend's metrics");
        let accounting = switchyard_tests::accounting::Accounting::parse(&text);
        report_line(format!(
            "{name}: {:.0} admitted, accounting {:?}",
            accounting.accepted_total().abs(),
            accounting.check()
        ));
        accounting
            .check()
            .unwrap_or_else(|e| panic!("{name}'s accounting: {e}"));
    }
    let restarted: Vec<_> = workers_at_start
        .iter()
        .filter(|p| !at_end.iter().any(|q| q.pid == p.pid))
        .collect();
    assert!(
        restarted.is_empty(),
        "workers gone or restarted: {restarted:?}"
    );
    assert_eq!(
        acme.failed, 0,
        "acme's requests not served: {:?}",
        acme.errors
    );
    assert!(acme.ok > 0, "acme got nothing served");
    for (role, pid, _, _, percent) in &growth {
        assert!(
            *percent < 5.0,
            "{role} (pid {pid}) grew {percent:.2} % after the warm-up"
        );
    }
}
