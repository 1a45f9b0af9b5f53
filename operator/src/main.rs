//! `switchyard-operator`: the Switchyard Kubernetes operator.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, WatchStreamExt as _, reflector, watcher};
use switchyard_operator::api::ModelDeployment;
use switchyard_operator::autoscale;
use switchyard_operator::build::{DEFAULT_WORKER_IMAGE, Defaults, FIELD_MANAGER};
use switchyard_operator::leader::{Elector, LeaseConfig};
use switchyard_operator::metrics::{self, Metrics};
use switchyard_operator::reconcile::{self, Context};

/// How long in-flight reconciles may run after SIGTERM before the operator stops anyway
/// (well inside Kubernetes' default 30 s termination grace period).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The Switchyard operator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the ModelDeployment CustomResourceDefinition as YAML (for `kubectl apply -f -`).
    Crd,
    /// Run the controller (uses the in-cluster config, or KUBECONFIG / ~/.kube/config).
    Run(RunArgs),
    /// Simulate the autoscaler and an aggregate-queue-depth policy on the same scenario
    /// traces (a model, not a measurement): a table, and per scenario and policy a CSV
    /// time series and an SVG plot.
    Simulate(SimulateArgs),
    /// Exit 0 when an operator's readiness endpoint answers 200, else 1 with the reason
    /// (the Helm chart's `helm test` runs this against the operator's metrics Service).
    CheckReady(CheckReadyArgs),
    /// Plan a placement file from frontends' expert load (`GET /expert-load`), as the
    /// balanced placement would: the file on stdout (a shard's `--placement`), the
    /// imbalance of the even spread and of the plan on stderr.
    PlanPlacement(PlanPlacementArgs),
}

#[derive(Debug, clap::Args)]
struct PlanPlacementArgs {
    /// `GET /expert-load` reports, one per frontend; their loads are added up.
    #[arg(long = "load", value_name = "FILE", required = true)]
    loads: Vec<std::path::PathBuf>,
    /// Expert shards to place over.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
    shards: u32,
    /// Spare expert slots per MoE layer, over all shards (`spec.experts.redundantExperts`).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1024))]
    redundant_experts: u32,
    /// `balanced`, or `even-spread` (the operator's default layout, for comparison).
    #[arg(long, default_value = "balanced", value_parser = ["balanced", "even-spread"])]
    strategy: String,
    /// The revision written into the file.
    #[arg(long, default_value = "manual")]
    revision: String,
}

#[derive(Debug, clap::Args)]
struct SimulateArgs {
    /// Scenarios to run: spike, flood, flood+spike, yoyo (default: all four).
    #[arg(long, value_delimiter = ',')]
    scenario: Vec<String>,
    /// A ModelDeployment manifest whose `spec.autoscaling` sets the rules (default: the
    /// defaults, with targetQueueDepth 4 and maxReplicas 12).
    #[arg(long, value_name = "FILE")]
    manifest: Option<std::path::PathBuf>,
    /// Directory for `<scenario>-<policy>.csv` and `.svg` (default: none written).
    #[arg(long, value_name = "DIR")]
    out: Option<std::path::PathBuf>,
}

#[derive(Debug, clap::Args)]
struct CheckReadyArgs {
    /// `http://HOST:PORT/PATH` of the operator's `/readyz`.
    #[arg(long)]
    url: String,
    /// Seconds to keep trying before giving up.
    #[arg(long, default_value_t = 30)]
    timeout_seconds: u64,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "SWITCHYARD_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "SWITCHYARD_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Elect a leader among replicas on a coordination.k8s.io Lease.
    #[arg(long, env = "SWITCHYARD_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the Lease (default: `POD_NAMESPACE`, else the pod's ServiceAccount
    /// namespace, else `default`).
    #[arg(long, env = "SWITCHYARD_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(
        long,
        env = "SWITCHYARD_LEASE_NAME",
        default_value = "switchyard-operator"
    )]
    lease_name: String,
    /// Seconds a leader's lease lasts without renewal: how long a standby waits after the
    /// leader dies.
    #[arg(long, env = "SWITCHYARD_LEASE_DURATION_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=300))]
    lease_duration_seconds: u64,
    /// This replica's identity in the Lease (default: the pod name, else host name + pid).
    #[arg(long, env = "SWITCHYARD_IDENTITY")]
    identity: Option<String>,
    /// Log filter (`tracing_subscriber::EnvFilter` syntax).
    #[arg(long, env = "SWITCHYARD_LOG", default_value = "info")]
    log: String,
    /// Worker image for ModelDeployments that leave `spec.image` out (default: the worker
    /// image of this operator's release).
    #[arg(long, env = "SWITCHYARD_DEFAULT_WORKER_IMAGE", default_value = DEFAULT_WORKER_IMAGE)]
    default_worker_image: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    switchyard_edge::exit::exit_with(match Cli::parse().command {
        Command::Crd => {
            print!("{}", switchyard_operator::crd_yaml());
            Ok(())
        }
        Command::Run(args) => run(args).await,
        Command::CheckReady(args) => check_ready(args).await,
        Command::Simulate(args) => simulate(args),
        Command::PlanPlacement(args) => plan_placement(args),
    })
}

/// `plan-placement`: the loads added up, planned, the file printed.
fn plan_placement(args: PlanPlacementArgs) -> anyhow::Result<()> {
    use switchyard_operator::placement::decide::{self, LoadReport, Placement};
    let mut reports = Vec::new();
    for path in &args.loads {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("--load {}", path.display()))?;
        let report: LoadReport = serde_json::from_str(&text)
            .with_context(|| format!("--load {}: not a GET /expert-load report", path.display()))?;
        reports.push(report);
    }
    let loads = decide::merge(&reports);
    anyhow::ensure!(
        !loads.is_empty(),
        "--load: the reports list no MoE layer with routed tokens"
    );
    let shards = args.shards as usize;
    let even = Placement::even(&loads, shards).map_err(|e| anyhow::anyhow!("--shards: {e}"))?;
    let (plan, slots) = if args.strategy == "balanced" {
        Placement::balanced(&loads, shards, args.redundant_experts as usize)
            .map_err(|e| anyhow::anyhow!("--shards / --redundant-experts: {e}"))?
    } else {
        let slots = loads
            .values()
            .map(|v| v.len().div_ceil(shards))
            .max()
            .unwrap_or(0);
        (even.clone(), slots)
    };
    eprintln!(
        "{} MoE layer(s), {:.0} routed tokens per layer; {shards} shards × {slots} slots: \
         imbalance (busiest shard / mean) {:.3} on the even spread, {:.3} with this plan \
         ({} replicas beyond one per expert)",
        loads.len(),
        decide::tokens_per_layer(&loads),
        even.imbalance(&loads),
        plan.imbalance(&loads),
        plan.extra_replicas()
    );
    println!("{}", decide::file(&args.revision, &plan, None));
    Ok(())
}

/// `simulate`: both policies over each scenario; the table on stdout.
fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    use switchyard_operator::autoscale::sim::{self, PolicyKind};
    let spec = match &args.manifest {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--manifest {}", path.display()))?;
            let md: ModelDeployment = serde_yaml::from_str(&text)
                .with_context(|| format!("--manifest {}: not a ModelDeployment", path.display()))?;
            md.spec
                .autoscaling
                .with_context(|| format!("--manifest {}: no spec.autoscaling", path.display()))?
        }
        None => serde_json::from_value(serde_json::json!({
            "enabled": true,
            "frontend": {"minReplicas": 1, "maxReplicas": 12},
            "targetQueueDepth": 4,
        }))?,
    };
    let policy = autoscale::run::policy(&spec);
    let names: Vec<String> = if args.scenario.is_empty() {
        sim::SCENARIOS.iter().map(|s| s.to_string()).collect()
    } else {
        args.scenario.clone()
    };
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("--out {}", dir.display()))?;
    }
    println!(
        "| scenario | policy | replicas bought by the flood | spike: decision after (s) | legit p99 TTFT (s) | legit refused or unserved | replica-minutes | direction reversals | most replicas |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    // flood+spike: the flood's share is what it adds to the spike alone.
    let spike_alone =
        |kind| sim::scenario("spike").map(|s| sim::simulate(&s, kind, &policy).1.max_replicas);
    for name in &names {
        let scenario = sim::scenario(name).map_err(|e| anyhow::anyhow!("--scenario {e}"))?;
        for kind in [PolicyKind::Legitimate, PolicyKind::Aggregate] {
            let (rows, s) = sim::simulate(&scenario, kind, &policy);
            let or_dash = |v: Option<String>| v.unwrap_or_else(|| "–".into());
            let bought = match name.as_str() {
                "flood+spike" => spike_alone(kind)
                    .ok()
                    .map(|alone| (i64::from(s.max_replicas) - i64::from(alone)).to_string()),
                _ => s.bought_by_attack.map(|b| b.to_string()),
            };
            println!(
                "| {} | {} | {} | {} | {:.1} | {} | {:.1} | {} | {} |",
                s.scenario,
                kind.name(),
                or_dash(bought),
                or_dash(s.spike_decision_s.map(|d| format!("{d:.1}"))),
                s.legit_p99_ttft_s,
                s.legit_failed,
                s.replica_minutes,
                s.reversals,
                s.max_replicas,
            );
            if let Some(dir) = &args.out {
                let stem = format!("{}-{}", name.replace('+', "-"), kind.name());
                let names: Vec<&str> = scenario.tenants.iter().map(|t| t.name).collect();
                let csv = dir.join(format!("{stem}.csv"));
                std::fs::write(&csv, switchyard_edge::series::csv(&names, &rows))
                    .with_context(|| format!("writing {}", csv.display()))?;
                let svg = dir.join(format!("{stem}.svg"));
                let title = format!("{name}: {} policy (simulated)", kind.name());
                std::fs::write(&svg, switchyard_edge::series::svg(&title, &names, &rows))
                    .with_context(|| format!("writing {}", svg.display()))?;
            }
        }
    }
    Ok(())
}

/// `check-ready`: polls `args.url` until it answers 200 or the timeout passes.
async fn check_ready(args: CheckReadyArgs) -> anyhow::Result<()> {
    let rest = args.url.strip_prefix("http://").with_context(|| {
        format!(
            "--url {:?}: only http://HOST:PORT/PATH is supported",
            args.url
        )
    })?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let path = format!("/{path}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_seconds);
    loop {
        let answer = switchyard_operator::http::get(authority, &path, Duration::from_secs(5)).await;
        let last = match answer.map(|(status, _)| status) {
            Ok(200) => {
                println!("{} answered 200", args.url);
                return Ok(());
            }
            Ok(status) => format!("{} answered HTTP {status}", args.url),
            Err(e) => format!("{}: {e}", args.url),
        };
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("not ready after {} s: {last}", args.timeout_seconds);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    switchyard_edge::logging::init(&args.log)?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        std::env::var("POD_NAME").unwrap_or_else(|_| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "switchyard-operator".into());
            format!("{host}-{}", std::process::id())
        })
    });
    let lease_namespace = switchyard_operator::leader::lease_namespace(
        args.lease_namespace.clone(),
        std::env::var("POD_NAMESPACE").ok(),
        std::path::Path::new(switchyard_operator::leader::SERVICE_ACCOUNT_NAMESPACE_FILE),
    );
    tracing::info!(
        namespace = args.namespace.as_deref().unwrap_or("(all)"),
        metrics_addr = %args.metrics_addr,
        leader_election = args.leader_election,
        lease = %format!("{lease_namespace}/{}", args.lease_name),
        lease_duration_seconds = args.lease_duration_seconds,
        default_worker_image = %args.default_worker_image,
        %identity,
        "starting switchyard-operator"
    );

    let client = kube::Client::try_default().await.context(
        "connecting to the Kubernetes API (in-cluster config, KUBECONFIG or ~/.kube/config)",
    )?;
    let mds: Api<ModelDeployment> = scoped(&client, args.namespace.as_deref());
    check_crd_installed(&mds).await?;

    let metrics = Arc::new(Metrics::new());
    let listener = metrics::bind(args.metrics_addr).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    // The demand signal for KEDA: on every replica, computed when asked.
    let external = {
        let client = client.clone();
        switchyard_edge::metrics::JsonEndpoint {
            path: autoscale::external::PREFIX,
            body: switchyard_edge::metrics::JsonBody::Under(Arc::new(move |rest| {
                Box::pin(autoscale::external::answer(client.clone(), rest))
            })),
        }
    };
    tokio::spawn(metrics::serve(
        listener,
        metrics.clone(),
        vec![external],
        stopped(),
    ));
    tokio::spawn(async move {
        switchyard_edge::signal::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let elector = args.leader_election.then(|| {
        let duration = Duration::from_secs(args.lease_duration_seconds);
        Elector::new(
            client.clone(),
            LeaseConfig {
                namespace: lease_namespace,
                name: args.lease_name.clone(),
                identity: identity.clone(),
                duration,
                renew_every: duration / 3,
                retry_every: Duration::from_secs(2).min(duration / 3),
            },
        )
    });
    if let Some(elector) = &elector {
        // A standby is healthy and ready: it is doing its job by waiting.
        metrics.set_ready(true);
        tracing::info!("waiting to become the leader");
        tokio::select! {
            () = elector.acquire() => {}
            () = stopped() => return Ok(()),
        }
        tracing::info!("became the leader");
        metrics.leader.set(1);
    }

    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(identity.clone()),
            },
        ),
        metrics: metrics.clone(),
        defaults: Defaults {
            worker_image: args.default_worker_image.clone(),
            operator_namespace: std::env::var("POD_NAMESPACE").ok(),
        },
    });
    let ns = args.namespace.as_deref();
    let owned =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=switchyard-operator");
    // Every watch backs off on its own and keeps its errors (see `own_backoff`). The
    // ModelDeployments' watch fills the controller's cache.
    let (cache, cache_writer) = reflector::store::<ModelDeployment>();
    let controller = Controller::for_stream(
        own_backoff(
            "ModelDeployment",
            watcher(mds, watcher::Config::default())
                .default_backoff()
                .reflect(cache_writer)
                .applied_objects(),
        ),
        cache,
    );
    // One watch per owned kind, from the one list in `build` (a macro: each kind is a type
    // parameter, which no iterator over values can supply).
    macro_rules! owns_every_kind {
        ($($kind:ident => $ty:path),* $(,)?) => {
            controller$(.owns_stream(own_backoff(
                stringify!($kind),
                watcher(scoped::<kube::core::PartialObjectMeta<$ty>>(&client, ns), owned.clone())
                    .default_backoff()
                    .touched_objects(),
            )))*
        };
    }
    let controller =
        switchyard_operator::with_owned_kinds!(owns_every_kind).graceful_shutdown_on(stopped());
    let store = controller.store();
    metrics.set_ready(true);
    // kube-runtime's graceful shutdown waits for the cache's first sync, which never comes
    // once shutdown has cut the watches: a SIGTERM during start-up would hang until the
    // kubelet's SIGKILL. So: once shutdown is requested, stop at once if the cache was not
    // ready yet (nothing can be in flight), else give in-flight reconciles SHUTDOWN_GRACE.
    let cache = store.clone();
    let stuck_shutdown = {
        let stopped = stopped();
        async move {
            stopped.await;
            let ready = tokio::time::timeout(Duration::ZERO, cache.wait_until_ready())
                .await
                .is_ok();
            if ready {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
                tracing::warn!(
                    "in-flight reconciles did not finish within {SHUTDOWN_GRACE:?}; stopping anyway"
                );
            }
        }
    };
    // The autoscaler (leader only, like reconcile): its own watch on frontend pods, and
    // the controller's cache of ModelDeployments.
    let (pods, pods_writer) = reflector::store::<Pod>();
    let pod_watch = reflector(
        pods_writer,
        watcher(
            scoped::<Pod>(&client, ns),
            watcher::Config::default().labels(&autoscale::run::frontend_pods_selector()),
        ),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|event| {
        if let Err(e) = event {
            tracing::debug!(error = %e, "frontend pod watch");
        }
        std::future::ready(())
    });
    tokio::spawn(pod_watch);
    let shared = |controller: &str| switchyard_operator::fleet::Shared {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: controller.into(),
                instance: Some(identity.clone()),
            },
        ),
        metrics: metrics.clone(),
        deployments: store.clone(),
        pods: pods.clone(),
    };
    tokio::spawn(autoscale::run::run(
        shared(autoscale::run::FIELD_MANAGER),
        stopped(),
    ));
    // The balanced expert placement (leader only): the same caches.
    tokio::spawn(switchyard_operator::placement::run::run(
        shared(switchyard_operator::placement::run::FIELD_MANAGER),
        stopped(),
    ));

    let run = controller
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| {
            metrics.set_managed(store.state().iter().map(|md| &md.spec));
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
            std::future::ready(())
        });

    let run = async {
        tokio::select! {
            () = run => {}
            () = stuck_shutdown => {}
        }
    };
    match &elector {
        None => run.await,
        Some(elector) => {
            tokio::select! {
                () = run => {}
                () = elector.hold() => {
                    metrics.leader.set(0);
                    anyhow::bail!("lost the leader lease {}; exiting so only one replica reconciles", elector.config().name);
                }
            }
            elector.release().await;
            metrics.leader.set(0);
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// A watch whose errors stay with it. kube-runtime's `Controller` puts one backoff on the
/// merged stream of all its watches, so any watch's error pauses every watch, and the
/// pauses grow: after an API server restart each of the eight watches meets `410 Gone` on
/// its first re-watch, one after the other, and the operator heard nothing for minutes
/// (test `the_operator_converges_through_an_api_server_and_etcd_restart`). Here each watch
/// has its own backoff (`default_backoff`, client-go's reflector's: 0.8 s doubling to
/// 30 s, reset by any event), its errors are logged, and the controller sees only objects.
fn own_backoff<K: Send + 'static>(
    watch: &'static str,
    stream: impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static {
    stream.filter_map(move |item| {
        std::future::ready(match item {
            Ok(object) => Some(Ok(object)),
            Err(e) => {
                tracing::info!(watch, error = %e, "watch error; this watch retries after its backoff");
                None
            }
        })
    })
}

/// An API for `K` in the watched namespace, or in all of them.
fn scoped<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Fails with what to do when the ModelDeployment CRD is missing.
async fn check_crd_installed(mds: &Api<ModelDeployment>) -> anyhow::Result<()> {
    match mds.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => anyhow::bail!(
            "the ModelDeployment CRD (modeldeployments.switchyard.dev) is not installed in this cluster: \
             install it with `kubectl apply -f crds/modeldeployment.yaml` \
             (or `switchyard-operator crd | kubectl apply -f -`), then start the operator again"
        ),
        Err(e) => Err(e).context("listing ModelDeployments to check that the CRD is installed"),
    }
}
