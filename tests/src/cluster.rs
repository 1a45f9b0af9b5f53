//! A control plane that also runs workloads: kube-controller-manager (Deployments get
//! ReplicaSets and pods, garbage collection works), kube-scheduler, and kwok, which plays
//! the kubelet for fake nodes that advertise `nvidia.com/gpu`.
//!
//! ```text
//!   Cluster::shared()  (once per test binary)
//!     ├─ ControlPlane (etcd + kube-apiserver)
//!     ├─ kube-controller-manager   ──┐
//!     ├─ kube-scheduler              ├─ all with the admin kubeconfig
//!     ├─ kwok (stages from the kwok module: nodes Ready, pods Running)
//!     └─ DEFAULT_GPU_NODES fake nodes in pool "default", GPUS_PER_DEFAULT_NODE GPUs each
//! ```
//!
//! Tests run in parallel against one cluster, so a test that depends on exact capacity
//! adds its own pool with [`Cluster::add_gpu_nodes`] and pins its pods there with
//! [`POOL_LABEL`] in a node selector.

use std::io::Write as _;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::OnceCell;

use crate::control_plane::{ControlPlane, TestNamespace};
use crate::error::{HarnessError, Result};
use crate::process::{ManagedProcess, free_port};
use crate::tools::{bin_dir, tool};

/// Annotation that puts a node under kwok's management.
pub const KWOK_NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";
/// Node label naming the pool a fake node belongs to.
pub const POOL_LABEL: &str = "switchyard.dev/test-pool";
/// The extended resource fake GPU nodes advertise.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
pub const DEFAULT_GPU_NODES: usize = 4;
pub const GPUS_PER_DEFAULT_NODE: u32 = 8;
const COMPONENT_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A control plane plus the controllers, scheduler and kwok.
#[derive(Debug)]
pub struct Cluster {
    // Drop order: the components before the control plane they talk to.
    kwok: ManagedProcess,
    scheduler: ManagedProcess,
    controller_manager: ManagedProcess,
    control_plane: ControlPlane,
}

static SHARED: OnceCell<std::result::Result<Cluster, String>> = OnceCell::const_new();

impl Cluster {
    /// The cluster of this test binary, started by the first test that asks for it.
    pub async fn shared() -> Result<&'static Cluster> {
        SHARED
            .get_or_init(|| async { Self::start().await.map_err(|e| e.to_string()) })
            .await
            .as_ref()
            .map_err(|e| HarnessError::SharedStartFailed(e.clone()))
    }

    /// Starts a private cluster with the default GPU node pool, and waits until the
    /// scheduler, the controller-manager and the nodes are ready.
    pub async fn start() -> Result<Self> {
        let started = Instant::now();
        let kwok_bin = tool("kwok")?;
        let kwok_stages = bin_dir().join("kwok-stages.yaml");
        if !kwok_stages.exists() {
            return Err(HarnessError::MissingTool {
                name: "kwok-stages.yaml".into(),
                path: kwok_stages,
            });
        }
        let control_plane = ControlPlane::start().await?;
        let kubeconfig = control_plane.kubeconfig().display().to_string();
        let dir = control_plane.dir().to_path_buf();
        let (controller_manager, scheduler) = start_controllers(&control_plane)?;
        let kwok_port = free_port()?;
        let kwok = ManagedProcess::start(
            "kwok",
            &kwok_bin,
            &[
                format!("--kubeconfig={kubeconfig}"),
                format!("--config={}", kwok_stages.display()),
                "--manage-all-nodes=false".into(),
                format!("--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake"),
                "--cidr=10.0.1.0/24".into(),
                "--node-ip=10.0.2.1".into(),
                "--node-lease-duration-seconds=40".into(),
                format!("--server-address=127.0.0.1:{kwok_port}"),
            ],
            dir.join("kwok.log"),
        )?;
        let cluster = Self {
            kwok,
            scheduler,
            controller_manager,
            control_plane,
        };
        let client = cluster.control_plane.client().await?;
        cluster
            .add_gpu_nodes(&client, "default", DEFAULT_GPU_NODES, GPUS_PER_DEFAULT_NODE)
            .await?;
        cluster.wait_for_default_service_account(&client).await?;
        let _ = writeln!(
            std::io::stderr(),
            "switchyard-tests: cluster ready in {:.1}s ({} kwok GPU nodes)",
            started.elapsed().as_secs_f64(),
            DEFAULT_GPU_NODES
        );
        Ok(cluster)
    }

    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    /// A fresh namespace with a client (see [`ControlPlane::namespace`]).
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace> {
        self.check_running()?;
        self.control_plane.namespace(prefix).await
    }

    /// Fails with the dead component's log if any part of the cluster has exited.
    pub fn check_running(&self) -> Result<()> {
        self.control_plane.check_running()?;
        self.controller_manager.check_running()?;
        self.scheduler.check_running()?;
        self.kwok.check_running()
    }

    /// Adds `count` fake nodes labelled `POOL_LABEL=<pool>`, each with `gpus` GPUs, and
    /// waits until kwok reports them Ready. Names are `kwok-<pool>-<i>`.
    pub async fn add_gpu_nodes(
        &self,
        client: &kube::Client,
        pool: &str,
        count: usize,
        gpus: u32,
    ) -> Result<Vec<String>> {
        let nodes: Api<Node> = Api::all(client.clone());
        let mut names = Vec::with_capacity(count);
        for i in 0..count {
            let name = format!("kwok-{pool}-{i}");
            nodes
                .create(&PostParams::default(), &fake_gpu_node(&name, pool, gpus))
                .await
                .map_err(HarnessError::kube(format!("creating node {name}")))?;
            names.push(name);
        }
        for name in &names {
            let nodes = nodes.clone();
            let name = name.clone();
            crate::control_plane::wait_until(&self.kwok, COMPONENT_READY_TIMEOUT, || {
                let nodes = nodes.clone();
                let name = name.clone();
                async move {
                    let node = nodes.get(&name).await.map_err(|e| e.to_string())?;
                    Ok(is_node_ready(&node))
                }
            })
            .await?;
        }
        Ok(names)
    }

    /// Pods need the `default` ServiceAccount, which the controller-manager creates; waiting
    /// for it in `default` shows the controller-manager works before any test relies on it.
    async fn wait_for_default_service_account(&self, client: &kube::Client) -> Result<()> {
        let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), "default");
        crate::control_plane::wait_until(&self.controller_manager, COMPONENT_READY_TIMEOUT, || {
            let accounts = accounts.clone();
            async move {
                accounts
                    .get_opt("default")
                    .await
                    .map(|sa| sa.is_some())
                    .map_err(|e| e.to_string())
            }
        })
        .await
    }
}

/// Starts kube-controller-manager and kube-scheduler against `control_plane` (no leader
/// election, loopback-only serving ports): Deployments get pods, pods get nodes, garbage
/// collection runs, ServiceAccounts get tokens.
pub(crate) fn start_controllers(
    control_plane: &ControlPlane,
) -> Result<(ManagedProcess, ManagedProcess)> {
    let kcm_bin = tool("kube-controller-manager")?;
    let scheduler_bin = tool("kube-scheduler")?;
    let dir = control_plane.dir().to_path_buf();
    let kubeconfig = control_plane.kubeconfig().display().to_string();
    let pki = control_plane.pki().clone();

    let kcm_port = free_port()?;
    let controller_manager = ManagedProcess::start(
        "kube-controller-manager",
        &kcm_bin,
        &[
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={kcm_port}"),
            format!("--cert-dir={}", dir.join("kcm-certs").display()),
            format!(
                "--service-account-private-key-file={}",
                pki.service_account_key.display()
            ),
            format!("--root-ca-file={}", pki.serving_ca.display()),
            "--use-service-account-credentials=false".into(),
            "--profiling=false".into(),
        ],
        dir.join("kube-controller-manager.log"),
    )?;
    let scheduler_port = free_port()?;
    let scheduler = ManagedProcess::start(
        "kube-scheduler",
        &scheduler_bin,
        &[
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={scheduler_port}"),
            format!("--cert-dir={}", dir.join("scheduler-certs").display()),
            "--profiling=false".into(),
        ],
        dir.join("kube-scheduler.log"),
    )?;
    Ok((controller_manager, scheduler))
}

/// The toleration a pod needs to run on the harness's fake nodes.
pub fn kwok_toleration() -> Toleration {
    Toleration {
        key: Some(KWOK_NODE_ANNOTATION.into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Toleration::default()
    }
}

fn fake_gpu_node(name: &str, pool: &str, gpus: u32) -> Node {
    let capacity: std::collections::BTreeMap<String, Quantity> = [
        ("cpu", "32".to_string()),
        ("memory", "256Gi".to_string()),
        ("pods", "110".to_string()),
        (GPU_RESOURCE, gpus.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Quantity(v)))
    .collect();
    let labels = [
        ("kubernetes.io/hostname", name),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
        ("type", "kwok"),
        ("nvidia.com/gpu.present", "true"),
        (POOL_LABEL, pool),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            annotations: Some([(KWOK_NODE_ANNOTATION.to_string(), "fake".to_string())].into()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: Some(vec![Taint {
                key: KWOK_NODE_ANNOTATION.into(),
                value: Some("fake".into()),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        }),
        status: Some(NodeStatus {
            allocatable: Some(capacity.clone()),
            capacity: Some(capacity),
            ..NodeStatus::default()
        }),
    }
}

fn is_node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}
