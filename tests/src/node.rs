//! A real single-node Kubernetes cluster on this machine (test tier 5): the images we
//! build run as pods, with real probes, Services, DNS, Secrets and volumes.
//!
//! ```text
//!   RealNode::shared()  (once per test binary; root only)
//!     ├─ sweep           what a killed earlier run left (its owner pid is gone)
//!     ├─ bridge          swy-node0 10.0.16.1/24: the node's address; pods get 10.0.16.0/24;
//!     │                  10.0.0.0/24 (Services) routed to it, so the host reaches ClusterIPs
//!     ├─ ControlPlane    etcd + kube-apiserver on 10.0.16.1 (the `kubernetes` Service points
//!     │                  there) + kube-controller-manager + kube-scheduler
//!     ├─ containerd      own root, state and socket; CNI bridge + host-local; pause image
//!     ├─ images          worker, operator and pause OCI archives imported (hack/build-images.sh)
//!     ├─ kubelet         node "switchyard-node" (cgroupfs, cgroup v1 allowed)
//!     ├─ kube-proxy      iptables mode
//!     └─ CoreDNS         10.0.16.1:53, zone cluster.local (the pods' nameserver)
//! ```
//!
//! Everything it makes has a fixed name (the paths, bridge and chains below), so the same
//! sweep removes it at exit (an `at_exit` hook, after the processes are killed: also after
//! a panic) and, before the next start, whatever a killed run left: container processes,
//! mounts, network namespaces, the bridge, iptables chains, cgroups, sysctls. The machine
//! is assumed to run no other kubelet or CNI runtime. Nothing is routed off the machine:
//! pods have no path out (a FORWARD rule drops what leaves the bridge elsewhere) and every
//! address a test uses is on loopback or on the bridge.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Node, Pod, ServiceAccount};
use kube::api::{Api, ListParams, LogParams};
use tokio::sync::OnceCell;

use crate::cluster::start_controllers;
use crate::control_plane::{ControlPlane, ControlPlaneOptions, SERVICE_CIDR, TestNamespace};
use crate::error::{HarnessError, Result};
use crate::process::{ManagedProcess, at_exit, free_port};
use crate::tools::tool;

/// The node's name in the API.
pub const NODE_NAME: &str = "switchyard-node";
/// The node's address: the bridge's, and where the API server, kubelet and CoreDNS listen.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 16, 1);
/// Pod addresses (host-local IPAM on the bridge).
pub const POD_CIDR: &str = "10.0.16.0/24";
/// The Linux bridge the pods hang off.
pub const BRIDGE: &str = "swy-node0";
/// Persistent state of the node (containerd's images and snapshots, kubelet's pods).
pub const ROOT: &str = "/var/lib/switchyard-test-node";
/// Runtime state (sockets, containerd's state).
pub const RUN: &str = "/run/switchyard-test-node";
/// The CNI network's name (also the prefix of its cached results in /var/lib/cni).
const CNI_NETWORK: &str = "switchyard-node";
/// The iptables chain that keeps pod traffic on the machine.
const FORWARD_CHAIN: &str = "SWITCHYARD-NODE-FWD";
/// Chain prefixes the node's components create (kubelet and kube-proxy: KUBE-, CNI: CNI-).
const CHAIN_PREFIXES: [&str; 3] = ["KUBE-", "CNI-", "SWITCHYARD-NODE-"];
/// Sysctls the node changes (kubelet sets the kernel ones itself): restored by the sweep.
const SYSCTLS: [(&str, &str); 8] = [
    ("net/ipv4/ip_forward", "1"),
    ("net/bridge/bridge-nf-call-iptables", "1"),
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];
const COMPONENT_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The images the node has imported, as `hack/build-images.sh` tagged them.
#[derive(Debug, Clone)]
pub struct NodeImages {
    pub worker: String,
    pub operator: String,
    pub pause: String,
}

/// How long the parts of a start took (printed, and recorded in hack/README.md).
#[derive(Debug, Clone, Copy)]
pub struct NodeStartupTimes {
    pub sweep: Duration,
    pub control_plane: Duration,
    pub containerd: Duration,
    pub image_import: Duration,
    pub kubelet: Duration,
    pub proxy_and_dns: Duration,
    pub total: Duration,
}

/// A running single-node cluster.
#[derive(Debug)]
pub struct RealNode {
    // Drop order: node components before the control plane they talk to.
    coredns: ManagedProcess,
    kube_proxy: ManagedProcess,
    kubelet: ManagedProcess,
    containerd: ManagedProcess,
    scheduler: ManagedProcess,
    controller_manager: ManagedProcess,
    control_plane: ControlPlane,
    images: NodeImages,
    startup: NodeStartupTimes,
}

static SHARED: OnceCell<std::result::Result<RealNode, String>> = OnceCell::const_new();

impl RealNode {
    /// The node of this test binary, started by the first test that asks for it.
    pub async fn shared() -> Result<&'static RealNode> {
        SHARED
            .get_or_init(|| async { Self::start().await.map_err(|e| e.to_string()) })
            .await
            .as_ref()
            .map_err(|e| HarnessError::SharedStartFailed(e.clone()))
    }

    async fn start() -> Result<Self> {
        let started = Instant::now();
        let tools = preflight()?;
        let images = read_images_env()?;

        take_ownership()?;
        let sweep = started.elapsed();
        // From here on, whatever happens, the exit hook removes what was made.
        at_exit("real-node", sweep_node);
        setup_network()?;

        let t = Instant::now();
        let control_plane = ControlPlane::start_with(&ControlPlaneOptions {
            address: IpAddr::V4(NODE_IP),
            in_cluster_endpoint: true,
        })
        .await?;
        let (controller_manager, scheduler) = start_controllers(&control_plane)?;
        let control_plane_time = t.elapsed();
        let kubeconfig = control_plane.kubeconfig().to_path_buf();
        let logs = control_plane.dir().to_path_buf();

        let t = Instant::now();
        let containerd = start_containerd(&images, &logs).await?;
        let containerd_time = t.elapsed();

        let t = Instant::now();
        import_images().await?;
        let image_import = t.elapsed();

        let t = Instant::now();
        let kubelet = start_kubelet(&tools.kubelet, &kubeconfig, &logs, &control_plane)?;
        let client = control_plane.client().await?;
        wait_for_node_ready(&kubelet, &client).await?;
        let kubelet_time = t.elapsed();

        let t = Instant::now();
        let kube_proxy = start_kube_proxy(&tools.kube_proxy, &kubeconfig, &logs).await?;
        let coredns = start_coredns(&tools.coredns, &kubeconfig, &logs).await?;
        wait_for_default_service_account(&controller_manager, &client).await?;
        let proxy_and_dns = t.elapsed();

        let startup = NodeStartupTimes {
            sweep,
            control_plane: control_plane_time,
            containerd: containerd_time,
            image_import,
            kubelet: kubelet_time,
            proxy_and_dns,
            total: started.elapsed(),
        };
        let _ = writeln!(
            std::io::stderr(),
            "switchyard-tests: real node ready in {:.1}s (sweep {:.1}s, control plane {:.1}s, \
             containerd {:.1}s, image import {:.1}s, kubelet to node Ready {:.1}s, kube-proxy + \
             CoreDNS {:.1}s); logs in {}",
            startup.total.as_secs_f64(),
            startup.sweep.as_secs_f64(),
            startup.control_plane.as_secs_f64(),
            startup.containerd.as_secs_f64(),
            startup.image_import.as_secs_f64(),
            startup.kubelet.as_secs_f64(),
            startup.proxy_and_dns.as_secs_f64(),
            logs.display()
        );
        Ok(Self {
            coredns,
            kube_proxy,
            kubelet,
            containerd,
            scheduler,
            controller_manager,
            control_plane,
            images,
            startup,
        })
    }

    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    /// A fresh namespace with a client (see [`ControlPlane::namespace`]).
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace> {
        self.check_running()?;
        self.control_plane.namespace(prefix).await
    }

    pub fn images(&self) -> &NodeImages {
        &self.images
    }

    pub fn startup_times(&self) -> NodeStartupTimes {
        self.startup
    }

    /// The kubelet's log file (its tail is part of every pod diagnosis).
    pub fn kubelet_log(&self) -> &Path {
        self.kubelet.log_path()
    }

    /// Fails with the dead component's log if any part of the node has exited.
    pub fn check_running(&self) -> Result<()> {
        self.control_plane.check_running()?;
        for p in [
            &self.controller_manager,
            &self.scheduler,
            &self.containerd,
            &self.kubelet,
            &self.kube_proxy,
            &self.coredns,
        ] {
            p.check_running()?;
        }
        Ok(())
    }

    /// Runs `program args...` with `KUBECONFIG` set to the admin kubeconfig (helm, kubectl,
    /// grpcurl); fails with its output if it exits non-zero.
    pub async fn run(&self, program: &Path, args: &[&str]) -> Result<String> {
        let output = tokio::process::Command::new(program)
            .env("KUBECONFIG", self.control_plane.kubeconfig())
            .env(
                "HELM_CACHE_HOME",
                self.control_plane.dir().join("helm/cache"),
            )
            .env(
                "HELM_CONFIG_HOME",
                self.control_plane.dir().join("helm/config"),
            )
            .env("HELM_DATA_HOME", self.control_plane.dir().join("helm/data"))
            .args(args)
            .output()
            .await
            .map_err(HarnessError::io(format!(
                "running {} {}",
                program.display(),
                args.join(" ")
            )))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            Ok(stdout)
        } else {
            Err(HarnessError::CommandFailed {
                command: format!("{} {}", program.display(), args.join(" ")),
                status: output.status.to_string(),
                output: format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)),
            })
        }
    }

    /// What a person debugging a stuck pod looks at first: for every pod in `namespace`
    /// (matching `selector`, if given), its phase, conditions and container states, its
    /// events, the tail of its containers' logs (and of the previous run's, after a
    /// restart); then the tail of the kubelet's log.
    pub async fn diagnose(&self, client: &kube::Client, namespace: &str, selector: &str) -> String {
        let mut out = String::new();
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let events: Api<Event> = Api::namespaced(client.clone(), namespace);
        let list = match pods.list(&ListParams::default().labels(selector)).await {
            Ok(list) => list.items,
            Err(e) => {
                out.push_str(&format!("(listing pods in {namespace} failed: {e})\n"));
                Vec::new()
            }
        };
        if list.is_empty() {
            out.push_str(&format!(
                "no pods in namespace {namespace} match {selector:?}\n"
            ));
        }
        for pod in &list {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let status = pod.status.clone().unwrap_or_default();
            out.push_str(&format!(
                "--- pod {namespace}/{name}: phase {}\n",
                status.phase.as_deref().unwrap_or("?")
            ));
            for c in status.conditions.iter().flatten() {
                out.push_str(&format!(
                    "  condition {}={} {}\n",
                    c.type_,
                    c.status,
                    c.message.as_deref().unwrap_or("")
                ));
            }
            for cs in status.container_statuses.iter().flatten() {
                let state = serde_json::to_string(&cs.state).unwrap_or_default();
                out.push_str(&format!(
                    "  container {}: ready={} restarts={} state={state}\n",
                    cs.name, cs.ready, cs.restart_count
                ));
            }
            let selector = format!("involvedObject.name={name}");
            if let Ok(list) = events.list(&ListParams::default().fields(&selector)).await {
                for e in list.items {
                    out.push_str(&format!(
                        "  event {} {}: {}\n",
                        e.type_.as_deref().unwrap_or(""),
                        e.reason.as_deref().unwrap_or(""),
                        e.message.as_deref().unwrap_or("")
                    ));
                }
            }
            let containers = pod
                .spec
                .as_ref()
                .map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
                .unwrap_or_else(Vec::<String>::new);
            for container in containers {
                for previous in [true, false] {
                    let params = LogParams {
                        container: Some(container.clone()),
                        tail_lines: Some(25),
                        previous,
                        ..LogParams::default()
                    };
                    match pods.logs(&name, &params).await {
                        Ok(text) => out.push_str(&format!(
                            "  {} log of {container} (last 25 lines):\n{text}\n",
                            if previous { "previous" } else { "current" }
                        )),
                        Err(e) if !previous => {
                            out.push_str(&format!("  log of {container}: unavailable ({e})\n"))
                        }
                        Err(_) => {}
                    }
                }
            }
        }
        out.push_str(&format!(
            "--- kubelet log (last 30 lines of {}):\n{}\n",
            self.kubelet.log_path().display(),
            self.kubelet.log_tail(30)
        ));
        out
    }

    /// Polls `check` every 250 ms for up to `timeout`; on timeout fails with `what`, the
    /// last reason `check` gave, and [`RealNode::diagnose`] of the pods in `namespace`
    /// matching `selector`.
    pub async fn wait_for<F, Fut>(
        &self,
        client: &kube::Client,
        namespace: &str,
        selector: &str,
        what: &str,
        timeout: Duration,
        check: F,
    ) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<bool, String>>,
    {
        let period = Duration::from_millis(250);
        match crate::control_plane::poll(timeout, period, || self.check_running(), check).await? {
            Ok(()) => Ok(()),
            Err(last) => Err(HarnessError::Stuck {
                what: what.to_string(),
                timeout,
                last,
                diagnosis: self.diagnose(client, namespace, selector).await,
            }),
        }
    }

    /// Waits until `count` pods matching `selector` in `namespace` are Ready (and no other
    /// pod matching it is left), with a diagnosis on timeout.
    pub async fn wait_for_ready_pods(
        &self,
        client: &kube::Client,
        namespace: &str,
        selector: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<()> {
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let what = format!("{count} Ready pod(s) matching {selector:?} in {namespace}");
        self.wait_for(client, namespace, selector, &what, timeout, || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels(selector))
                    .await
                    .map_err(|e| e.to_string())?;
                let live: Vec<&Pod> = list
                    .items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .collect();
                let ready = live.iter().filter(|p| is_pod_ready(p)).count();
                if ready == count && live.len() == count {
                    Ok(true)
                } else {
                    Err(format!("{ready} of {} live pod(s) Ready", live.len()))
                }
            }
        })
        .await
    }
}

/// Whether a pod's `Ready` condition is true.
pub fn is_pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The kubelet's cgroup of the pod with `uid` in the cgroup v1 hierarchy of `controller`
/// (`memory`, `pids`, …): `/sys/fs/cgroup/<controller>/kubepods[/<qos>]/pod<uid>`.
/// `None` when the pod has none on this node (gone, or not started yet).
pub fn pod_cgroup(controller: &str, uid: &str) -> Option<PathBuf> {
    fn find(dir: &Path, name: &str, depth: usize) -> Option<PathBuf> {
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if entry.file_name().to_str() == Some(name) {
                return Some(entry.path());
            }
            if depth > 0
                && let Some(found) = find(&entry.path(), name, depth - 1)
            {
                return Some(found);
            }
        }
        None
    }
    let root = Path::new("/sys/fs/cgroup")
        .join(controller)
        .join("kubepods");
    // kubepods/pod<uid> (Guaranteed) or kubepods/<qos>/pod<uid>.
    find(&root, &format!("pod{uid}"), 1)
}

/// Every process of the pod with `uid` (its containers' and its sandbox's), found by its
/// cgroup: the node's containers run as processes of this machine.
pub fn pod_processes(uid: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    if let Some(dir) = pod_cgroup("pids", uid).or_else(|| pod_cgroup("memory", uid)) {
        collect_cgroup_procs(&dir, &mut pids);
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The pod addresses (`ip:port`) kube-proxy's iptables rules send connections to
/// `namespace/service`'s port `port_name` to, now. kube-proxy writes them a moment after
/// the EndpointSlice changes; a connection opened before that stays on the endpoints of
/// the rules it met.
pub fn proxied_endpoints(namespace: &str, service: &str, port_name: &str) -> Vec<String> {
    let Ok(out) = Command::new("iptables-save").args(["-t", "nat"]).output() else {
        return Vec::new();
    };
    let marker = format!("\"{namespace}/{service}:{port_name} -> ");
    let mut found: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A KUBE-SVC-"))
        .filter_map(|l| {
            let rest = &l[l.find(&marker)? + marker.len()..];
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Sends `signal` (`libc::SIGSTOP`, `libc::SIGCONT`, …) to each of `pids`; a pid already
/// gone is skipped.
pub fn signal_processes(pids: &[i32], signal: i32) {
    for &pid in pids {
        // SAFETY: kill(2) on the node's processes this test found; no memory is shared.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// The Go-built node binaries.
struct NodeTools {
    kubelet: PathBuf,
    kube_proxy: PathBuf,
    coredns: PathBuf,
}

/// Every piece the node needs, or an error naming the missing one and the `make` target
/// that provides it. Nothing is skipped silently.
fn preflight() -> Result<NodeTools> {
    // SAFETY: geteuid(2) has no preconditions.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(HarnessError::MissingNodeRuntime {
            what: "root".into(),
            hint: "the real-node tests run kubelet, containerd and iptables: run them as root \
                   (CI and the development machines do)"
                .into(),
        });
    }
    let runtime_hint =
        "install the node runtime with `make node-runtime` (hack/install-node-runtime.sh)";
    for (name, path) in [
        ("containerd", "/usr/bin/containerd"),
        (
            "containerd-shim-runc-v2",
            "/usr/bin/containerd-shim-runc-v2",
        ),
        ("ctr", "/usr/bin/ctr"),
        ("runc", "/usr/sbin/runc"),
        ("CNI bridge plugin", "/usr/lib/cni/bridge"),
        ("CNI host-local plugin", "/usr/lib/cni/host-local"),
        ("CNI loopback plugin", "/usr/lib/cni/loopback"),
        ("iptables", "/usr/sbin/iptables"),
        ("iptables-save", "/usr/sbin/iptables-save"),
        ("iptables-restore", "/usr/sbin/iptables-restore"),
        ("conntrack", "/usr/sbin/conntrack"),
        ("ip", "/usr/sbin/ip"),
    ] {
        if !Path::new(path).exists() {
            return Err(HarnessError::MissingNodeRuntime {
                what: format!("{name} ({path})"),
                hint: runtime_hint.into(),
            });
        }
    }
    Ok(NodeTools {
        kubelet: tool("kubelet")?,
        kube_proxy: tool("kube-proxy")?,
        coredns: tool("coredns")?,
    })
}

/// `images.env` written by hack/build-images.sh.
fn images_env_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("SWITCHYARD_IMAGES_DIR") {
        return PathBuf::from(dir).join("images.env");
    }
    crate::tools::cache_dir().join("images/images.env")
}

fn read_images_env() -> Result<NodeImages> {
    let path = images_env_path();
    let missing = |what: String| HarnessError::MissingNodeRuntime {
        what,
        hint: "build the images with `make images` (hack/build-images.sh)".into(),
    };
    let text =
        std::fs::read_to_string(&path).map_err(|e| missing(format!("{} ({e})", path.display())))?;
    let get = |key: &str| -> Result<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim().trim_matches('"').to_string())
            .ok_or_else(|| missing(format!("{key} in {}", path.display())))
    };
    for key in ["WORKER_ARCHIVE", "OPERATOR_ARCHIVE", "PAUSE_ARCHIVE"] {
        let archive = get(key)?;
        if !Path::new(&archive).exists() {
            return Err(missing(format!("{key} {archive}")));
        }
    }
    Ok(NodeImages {
        worker: get("WORKER_IMAGE")?,
        operator: get("OPERATOR_IMAGE")?,
        pause: get("PAUSE_IMAGE")?,
    })
}

fn archives() -> Result<Vec<String>> {
    let text = std::fs::read_to_string(images_env_path())
        .map_err(HarnessError::io("reading images.env"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.ends_with("_ARCHIVE"))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .collect())
}

/// Claims the node's fixed paths for this process, sweeping what a dead owner left.
fn take_ownership() -> Result<()> {
    let owner = Path::new(ROOT).join("owner");
    if let Ok(text) = std::fs::read_to_string(&owner)
        && let Ok(pid) = text.trim().parse::<i32>()
        && pid != std::process::id() as i32
        && crate::process::process_exists(pid)
    {
        return Err(HarnessError::MissingNodeRuntime {
            what: format!("the real test node ({ROOT})"),
            hint: format!(
                "it is in use by process {pid}, another test run; wait for it or kill it"
            ),
        });
    }
    let started = Instant::now();
    sweep_node();
    if started.elapsed() > Duration::from_millis(500) {
        let _ = writeln!(
            std::io::stderr(),
            "switchyard-tests: swept the leftovers of an earlier real-node run in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
    for dir in [ROOT, RUN] {
        std::fs::create_dir_all(dir).map_err(HarnessError::io(format!("creating {dir}")))?;
    }
    std::fs::write(&owner, std::process::id().to_string())
        .map_err(HarnessError::io(format!("writing {}", owner.display())))
}

fn run_cmd(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(HarnessError::io(format!("running {program}")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(HarnessError::CommandFailed {
            command: format!("{program} {}", args.join(" ")),
            status: output.status.to_string(),
            output: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// The bridge with the node's address, a route for the Service range onto it, the FORWARD
/// rule that keeps pod traffic on the machine, and the sysctls the node needs (their
/// previous values saved for the sweep to restore).
fn setup_network() -> Result<()> {
    let mut saved = String::new();
    for (key, _) in SYSCTLS {
        if let Ok(value) = std::fs::read_to_string(Path::new("/proc/sys").join(key)) {
            saved.push_str(&format!("{key}={}\n", value.trim()));
        }
    }
    std::fs::write(Path::new(ROOT).join("sysctls"), saved)
        .map_err(HarnessError::io("saving the sysctls the node changes"))?;
    for (key, value) in &SYSCTLS[..2] {
        std::fs::write(Path::new("/proc/sys").join(key), value)
            .map_err(HarnessError::io(format!("setting sysctl {key}={value}")))?;
    }
    let address = format!("{NODE_IP}/24");
    run_cmd("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    run_cmd("ip", &["addr", "add", &address, "dev", BRIDGE])?;
    run_cmd("ip", &["link", "set", BRIDGE, "up"])?;
    let src = NODE_IP.to_string();
    run_cmd(
        "ip",
        &["route", "add", SERVICE_CIDR, "dev", BRIDGE, "src", &src],
    )?;
    run_cmd("iptables", &["-N", FORWARD_CHAIN])?;
    run_cmd(
        "iptables",
        &[
            "-A",
            FORWARD_CHAIN,
            "-i",
            BRIDGE,
            "!",
            "-o",
            BRIDGE,
            "-j",
            "DROP",
        ],
    )?;
    run_cmd("iptables", &["-I", "FORWARD", "1", "-j", FORWARD_CHAIN])?;
    Ok(())
}

async fn start_containerd(images: &NodeImages, logs: &Path) -> Result<ManagedProcess> {
    let root = Path::new(ROOT);
    let cni_conf = root.join("cni/net.d");
    std::fs::create_dir_all(&cni_conf).map_err(HarnessError::io("creating the CNI config dir"))?;
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{
                    "subnet": POD_CIDR,
                    "gateway": NODE_IP.to_string(),
                    "rangeStart": "10.0.16.10",
                    "rangeEnd": "10.0.16.250",
                }]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": root.join("cni/ipam").display().to_string(),
            },
        }],
    });
    std::fs::write(
        cni_conf.join("10-switchyard.conflist"),
        conflist.to_string(),
    )
    .map_err(HarnessError::io("writing the CNI config"))?;
    let config = format!(
        r#"version = 2
root = "{ROOT}/containerd"
state = "{RUN}/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{RUN}/containerd.sock"

[ttrpc]
  address = "{RUN}/containerd-ttrpc.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{ROOT}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # Required here: the machine lacks CAP_SYS_RESOURCE to lower oom_score_adj
  # (without it every sandbox fails: "can't get final child's PID from pipe: EOF").
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf}"
"#,
        pause = images.pause,
        cni_conf = cni_conf.display(),
    );
    let config_path = root.join("containerd.toml");
    std::fs::write(&config_path, config).map_err(HarnessError::io("writing containerd.toml"))?;
    let containerd = ManagedProcess::start(
        "containerd",
        Path::new("/usr/bin/containerd"),
        &["--config".into(), config_path.display().to_string()],
        logs.join("containerd.log"),
    )?;
    crate::control_plane::wait_until(&containerd, COMPONENT_READY_TIMEOUT, || async {
        let out = Command::new("ctr")
            .args(["--address", &containerd_socket(), "version"])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(true)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    })
    .await?;
    Ok(containerd)
}

fn containerd_socket() -> String {
    format!("{RUN}/containerd.sock")
}

async fn import_images() -> Result<()> {
    for archive in archives()? {
        let socket = containerd_socket();
        let output = tokio::process::Command::new("ctr")
            .args([
                "--address",
                &socket,
                "--namespace",
                "k8s.io",
                "images",
                "import",
                &archive,
            ])
            .output()
            .await
            .map_err(HarnessError::io("running ctr images import"))?;
        if !output.status.success() {
            return Err(HarnessError::CommandFailed {
                command: format!("ctr images import {archive}"),
                status: output.status.to_string(),
                output: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
    }
    Ok(())
}

fn start_kubelet(
    binary: &Path,
    kubeconfig: &Path,
    logs: &Path,
    control_plane: &ControlPlane,
) -> Result<ManagedProcess> {
    let root = Path::new(ROOT);
    let resolv = root.join("resolv.conf");
    // The pods' resolv.conf gets the cluster DNS and search path from the kubelet; the
    // host's own resolvers are no business of the pods (nothing off the machine is reachable).
    std::fs::write(&resolv, "").map_err(HarnessError::io("writing resolv.conf"))?;
    let port = free_port()?;
    let healthz_port = free_port()?;
    let config = format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# Required on these machines: they are cgroup v1 hosts, which 1.37 refuses by default.
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://{socket}
address: {NODE_IP}
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz_port}
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
  x509:
    clientCAFile: {client_ca}
authorization:
  mode: AlwaysAllow
clusterDomain: cluster.local
clusterDNS: ["{NODE_IP}"]
resolvConf: {resolv}
podLogsDir: {ROOT}/pod-logs
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
# Images are imported, never pulled: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
failSwapOn: false
# The kubelet sets vm.overcommit_memory, kernel.panic and friends itself; the harness
# saved their values first and the sweep restores them.
protectKernelDefaults: false
syncFrequency: 10s
"#,
        socket = containerd_socket(),
        client_ca = control_plane.pki().client_ca.display(),
        resolv = resolv.display(),
    );
    let config_path = root.join("kubelet.yaml");
    std::fs::write(&config_path, config).map_err(HarnessError::io("writing kubelet.yaml"))?;
    ManagedProcess::start(
        "kubelet",
        binary,
        &[
            format!("--config={}", config_path.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--hostname-override={NODE_NAME}"),
            format!("--node-ip={NODE_IP}"),
            format!("--root-dir={ROOT}/kubelet"),
            format!("--cert-dir={ROOT}/kubelet-pki"),
        ],
        logs.join("kubelet.log"),
    )
}

async fn wait_for_node_ready(kubelet: &ManagedProcess, client: &kube::Client) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    crate::control_plane::wait_until(kubelet, COMPONENT_READY_TIMEOUT, || {
        let nodes = nodes.clone();
        async move {
            let Some(node) = nodes.get_opt(NODE_NAME).await.map_err(|e| e.to_string())? else {
                return Err(format!("node {NODE_NAME} not registered yet"));
            };
            let ready = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
            match ready {
                Some(c) if c.status == "True" => Ok(true),
                Some(c) => Err(format!(
                    "node Ready={}: {}",
                    c.status,
                    c.message.as_deref().unwrap_or("")
                )),
                None => Err("node has no Ready condition yet".into()),
            }
        }
    })
    .await
}

async fn start_kube_proxy(binary: &Path, kubeconfig: &Path, logs: &Path) -> Result<ManagedProcess> {
    let healthz = free_port()?;
    let metrics = free_port()?;
    let config = format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {NODE_NAME}
mode: iptables
clusterCIDR: {POD_CIDR}
healthzBindAddress: 127.0.0.1:{healthz}
metricsBindAddress: 127.0.0.1:{metrics}
nodePortAddresses: ["{NODE_IP}/32"]
# Leave the machine's conntrack table settings alone (0 = do not change).
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  localhostNodePorts: false
  minSyncPeriod: 0s
  syncPeriod: 30s
"#,
        kubeconfig = kubeconfig.display(),
    );
    let config_path = Path::new(ROOT).join("kube-proxy.yaml");
    std::fs::write(&config_path, config).map_err(HarnessError::io("writing kube-proxy.yaml"))?;
    let proxy = ManagedProcess::start(
        "kube-proxy",
        binary,
        &[format!("--config={}", config_path.display())],
        logs.join("kube-proxy.log"),
    )?;
    crate::control_plane::wait_until(&proxy, COMPONENT_READY_TIMEOUT, || async move {
        let response = crate::control_plane::http_get_plain(healthz, "/healthz").await?;
        Ok(response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200"))
    })
    .await?;
    Ok(proxy)
}

async fn start_coredns(binary: &Path, kubeconfig: &Path, logs: &Path) -> Result<ManagedProcess> {
    let ready = free_port()?;
    let corefile = format!(
        r#".:53 {{
    bind {NODE_IP}
    errors
    ready 127.0.0.1:{ready}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} switchyard-test
        pods insecure
        ttl 5
    }}
}}
"#,
        kubeconfig = kubeconfig.display(),
    );
    let path = Path::new(ROOT).join("Corefile");
    std::fs::write(&path, corefile).map_err(HarnessError::io("writing the Corefile"))?;
    let coredns = ManagedProcess::start(
        "coredns",
        binary,
        &["-conf".into(), path.display().to_string()],
        logs.join("coredns.log"),
    )?;
    crate::control_plane::wait_until(&coredns, COMPONENT_READY_TIMEOUT, || async move {
        let response = crate::control_plane::http_get_plain(ready, "/ready").await?;
        Ok(response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200"))
    })
    .await?;
    Ok(coredns)
}

async fn wait_for_default_service_account(
    controller_manager: &ManagedProcess,
    client: &kube::Client,
) -> Result<()> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    crate::control_plane::wait_until(controller_manager, COMPONENT_READY_TIMEOUT, || {
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

/// Removes everything the node makes, in the order that lets each step succeed: container
/// processes, mounts and network namespaces, iptables chains, the bridge, cgroups, the
/// sysctls, the directories. Safe to run when there is nothing to remove; errors are
/// ignored (best effort: a later sweep tries again).
pub fn sweep_node() {
    kill_node_processes();
    unmount_node_mounts();
    for table in ["iptables", "ip6tables"] {
        sweep_iptables(table);
    }
    let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
    remove_cgroups();
    restore_sysctls();
    let _ = std::fs::remove_dir_all(RUN);
    let _ = std::fs::remove_dir_all(ROOT);
    if let Ok(entries) = std::fs::read_dir("/var/lib/cni/results") {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(CNI_NETWORK) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Container shims of the node's containerd and every process in the kubelet's cgroups.
fn kill_node_processes() {
    let socket = containerd_socket();
    let mut pids = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline);
            let ours = cmdline.contains(&socket)
                || cmdline.contains(&format!("{ROOT}/"))
                || cmdline.contains(&format!("{RUN}/"));
            if ours && pid != std::process::id() as i32 {
                pids.push(pid);
            }
        }
    }
    for hierarchy in cgroup_hierarchies() {
        collect_cgroup_procs(&hierarchy.join("kubepods"), &mut pids);
    }
    for &pid in &pids {
        // SAFETY: kill(2) on processes of the node; an already-gone pid is harmless.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    if !pids.is_empty() {
        // Give the kernel a moment to tear them down before their mounts and cgroups go.
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|&p| is_running(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether `pid` is a live process (a zombie waiting for a reaper is not).
fn is_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn cgroup_hierarchies() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        for entry in entries.flatten() {
            out.push(entry.path());
        }
    }
    out.push(PathBuf::from("/sys/fs/cgroup"));
    out
}

fn collect_cgroup_procs(dir: &Path, pids: &mut Vec<i32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_cgroup_procs(&entry.path(), pids);
            }
        }
    }
}

fn remove_cgroups() {
    for hierarchy in cgroup_hierarchies() {
        remove_cgroup_tree(&hierarchy.join("kubepods"));
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    // cgroup directories are removed with rmdir(2) (their files are not real files).
    let _ = std::fs::remove_dir(dir);
}

/// Unmounts (lazily, deepest first) every mount under the node's directories, and the
/// network namespaces the CNI made for its pods, then removes those namespaces' files.
fn unmount_node_mounts() {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut targets: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(ROOT) || p.starts_with(RUN) || is_cni_netns(p))
        .collect();
    targets.sort_by_key(|p| std::cmp::Reverse(p.len()));
    targets.dedup();
    for target in &targets {
        let Ok(c) = std::ffi::CString::new(target.as_str()) else {
            continue;
        };
        // SAFETY: umount2(2) with a valid NUL-terminated path; failure is ignored.
        #[allow(unsafe_code)]
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if is_cni_netns(&entry.path().to_string_lossy()) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

fn is_cni_netns(path: &str) -> bool {
    ["/run/netns/cni-", "/var/run/netns/cni-"]
        .iter()
        .any(|p| path.starts_with(p))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && let Ok(code) = u8::from_str_radix(&raw[i + 1..i + 4], 8)
        {
            out.push(code as char);
            i += 4;
            continue;
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

/// Deletes the node's chains (kubelet's and kube-proxy's `KUBE-*`, the CNI's `CNI-*`, the
/// harness's own) from every table, and the rules in other chains that jump to them.
fn sweep_iptables(family: &str) {
    let Ok(out) = Command::new(format!("{family}-save")).output() else {
        return;
    };
    let input = iptables_sweep_script(&String::from_utf8_lossy(&out.stdout));
    if input.is_empty() {
        return;
    }
    let Ok(mut child) = Command::new(format!("{family}-restore"))
        .arg("--noflush")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return;
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    let _ = child.wait();
}

fn is_node_chain(chain: &str) -> bool {
    CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p))
}

/// The `iptables-restore --noflush` input that removes the node's chains from the
/// `iptables-save` output `saved`; empty when there is nothing to remove.
pub fn iptables_sweep_script(saved: &str) -> String {
    let mut script = String::new();
    let mut table: Option<&str> = None;
    let mut chains: Vec<&str> = Vec::new();
    let mut deletes: Vec<String> = Vec::new();
    let mut flush = |table: Option<&str>, chains: &mut Vec<&str>, deletes: &mut Vec<String>| {
        if let Some(table) = table
            && (!chains.is_empty() || !deletes.is_empty())
        {
            script.push_str(&format!("*{table}\n"));
            for d in deletes.iter() {
                script.push_str(d);
                script.push('\n');
            }
            for c in chains.iter() {
                script.push_str(&format!(":{c} - [0:0]\n"));
            }
            for c in chains.iter() {
                script.push_str(&format!("-X {c}\n"));
            }
            script.push_str("COMMIT\n");
        }
        chains.clear();
        deletes.clear();
    };
    for line in saved.lines() {
        if let Some(name) = line.strip_prefix('*') {
            flush(table, &mut chains, &mut deletes);
            table = Some(name.trim());
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or("");
            if is_node_chain(chain) {
                chains.push(chain);
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("");
            let jumps_to_ours = rule
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| (w[0] == "-j" || w[0] == "-g") && is_node_chain(w[1]));
            if !is_node_chain(chain) && jumps_to_ours {
                deletes.push(format!("-D {rule}"));
            }
        } else if line.trim() == "COMMIT" {
            flush(table, &mut chains, &mut deletes);
            table = None;
        }
    }
    script
}

fn restore_sysctls() {
    let Ok(saved) = std::fs::read_to_string(Path::new(ROOT).join("sysctls")) else {
        return;
    };
    for line in saved.lines() {
        if let Some((key, value)) = line.split_once('=') {
            let _ = std::fs::write(Path::new("/proc/sys").join(key), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_script_deletes_node_chains_and_the_jumps_to_them_only() {
        let saved = "\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKERISH - [0:0]
:KUBE-SERVICES - [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -j DOCKERISH
-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A KUBE-SERVICES -j RETURN
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:SWITCHYARD-NODE-FWD - [0:0]
-A FORWARD -j SWITCHYARD-NODE-FWD
-A SWITCHYARD-NODE-FWD -i swy-node0 ! -o swy-node0 -j DROP
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
COMMIT
";
        let script = iptables_sweep_script(saved);
        assert_eq!(
            script,
            "\
*nat
-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-D OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
:KUBE-SERVICES - [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
-X KUBE-SERVICES
-X CNI-HOSTPORT-DNAT
COMMIT
*filter
-D FORWARD -j SWITCHYARD-NODE-FWD
:SWITCHYARD-NODE-FWD - [0:0]
-X SWITCHYARD-NODE-FWD
COMMIT
"
        );
        assert_eq!(
            iptables_sweep_script("*mangle\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"),
            ""
        );
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/a\\040b/c"), "/a b/c");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path("/end\\"), "/end\\");
    }
}
