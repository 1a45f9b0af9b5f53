//! A real etcd + kube-apiserver on loopback, for tests that need the Kubernetes API.
//!
//! ```text
//!   ControlPlane::shared()  (once per test binary)
//!     ├─ TempDir: certs, kubeconfig, etcd data, logs
//!     ├─ etcd            http://127.0.0.1:<free>   (no fsync)
//!     └─ kube-apiserver  https://127.0.0.1:<free>  (RBAC, admin = system:masters cert)
//!   each test: ControlPlane::namespace("prefix") -> TestNamespace { client, name }
//! ```
//!
//! There is no controller-manager here: nothing garbage-collects, no Deployment gets pods,
//! and namespaces never finish deleting. Use [`crate::Cluster`] for that.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::OnceCell;

use crate::error::{HarnessError, Result};
use crate::pki::Pki;
use crate::process::{ManagedProcess, TempDir, free_port};
use crate::tools::tool;

const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(60);
// Generous: on 2 cores the API server competes with the test build and other tests.
const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(180);

/// Label put on every namespace the harness creates.
pub const TEST_NAMESPACE_LABEL: &str = "switchyard.dev/test";

/// The Service cluster-IP range of every test control plane (`--service-cluster-ip-range`).
pub const SERVICE_CIDR: &str = "10.0.0.0/24";
/// The cluster IP of the `kubernetes` Service: the first address of [`SERVICE_CIDR`].
pub const KUBERNETES_SERVICE_IP: &str = "10.0.0.1";

/// Where and how the API server listens. The default is loopback only, with no endpoint
/// for the `kubernetes` Service (nothing in-cluster needs it); the real test node puts the
/// API server on the node's own address so pods reach it through that Service.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// Bind and advertise address of the API server; the kubeconfig's server.
    pub address: std::net::IpAddr,
    /// Keep the `kubernetes` Service's endpoints pointing at `address` (a lease-based
    /// endpoint reconciler), so pods can use the in-cluster config.
    pub in_cluster_endpoint: bool,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self {
            address: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            in_cluster_endpoint: false,
        }
    }
}

/// How long the parts of a start took.
#[derive(Debug, Clone, Copy)]
pub struct StartupTimes {
    pub etcd: Duration,
    pub apiserver: Duration,
    pub total: Duration,
}

/// etcd and kube-apiserver, running until dropped (or until the test binary exits, for the
/// shared one).
#[derive(Debug)]
pub struct ControlPlane {
    // Field order is drop order: processes before the directory they write into. Behind a
    // lock so that a shared control plane (the real node's) can be restarted by a test.
    processes: tokio::sync::Mutex<Processes>,
    server: String,
    kubeconfig: PathBuf,
    pki: Pki,
    startup: StartupTimes,
    /// What [`ControlPlane::restart`] starts again: etcd's binary, arguments and client
    /// port, then kube-apiserver's binary and arguments.
    relaunch: Relaunch,
    dir: TempDir,
}

#[derive(Debug)]
struct Processes {
    apiserver: ManagedProcess,
    etcd: ManagedProcess,
    restarts: u32,
}

#[derive(Debug)]
struct Relaunch {
    etcd: (PathBuf, Vec<String>, u16),
    apiserver: (PathBuf, Vec<String>),
}

/// A fresh namespace for one test, and a client made in that test's runtime.
#[derive(Clone)]
pub struct TestNamespace {
    pub client: Client,
    pub name: String,
}

impl std::fmt::Debug for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNamespace")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

static SHARED: OnceCell<std::result::Result<ControlPlane, String>> = OnceCell::const_new();

impl ControlPlane {
    /// The control plane of this test binary, started by the first test that asks for it.
    /// If that start failed, every later call fails at once with the same cause.
    pub async fn shared() -> Result<&'static ControlPlane> {
        SHARED
            .get_or_init(|| async { Self::start().await.map_err(|e| e.to_string()) })
            .await
            .as_ref()
            .map_err(|e| HarnessError::SharedStartFailed(e.clone()))
    }

    /// Starts a new, private control plane on loopback. Prints how long the start took.
    pub async fn start() -> Result<Self> {
        Self::start_with(&ControlPlaneOptions::default()).await
    }

    /// Starts a new, private control plane as `options` say.
    pub async fn start_with(options: &ControlPlaneOptions) -> Result<Self> {
        let started = Instant::now();
        let etcd_bin = tool("etcd")?;
        let apiserver_bin = tool("kube-apiserver")?;
        let dir = TempDir::new("cp")?;
        let pki = Pki::write_with_names(
            dir.path(),
            &[
                options.address.to_string(),
                KUBERNETES_SERVICE_IP.to_string(),
            ],
        )?;

        let etcd_port = free_port()?;
        let etcd_peer_port = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let etcd_args: Vec<String> = vec![
            "--name=switchyard-test".into(),
            format!("--data-dir={}", dir.path().join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=switchyard-test={peer_url}"),
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ];
        let etcd =
            ManagedProcess::start("etcd", &etcd_bin, &etcd_args, dir.path().join("etcd.log"))?;
        wait_for_etcd(&etcd, etcd_port).await?;
        let etcd_time = started.elapsed();

        let port = free_port()?;
        let server = format!("https://{}:{port}", options.address);
        let apiserver_args = apiserver_args(&etcd_url, port, dir.path(), &pki, options);
        let apiserver = ManagedProcess::start(
            "kube-apiserver",
            &apiserver_bin,
            &apiserver_args,
            dir.path().join("kube-apiserver.log"),
        )?;
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, pki.kubeconfig(&server)).map_err(HarnessError::io(format!(
            "writing {}",
            kubeconfig.display()
        )))?;
        let apiserver_started = Instant::now();
        wait_for_apiserver(&apiserver, &kubeconfig).await?;
        let startup = StartupTimes {
            etcd: etcd_time,
            apiserver: apiserver_started.elapsed(),
            total: started.elapsed(),
        };
        // Straight to stderr, past the test harness's output capture: this figure is
        // recorded in hack/README.md.
        let _ = writeln!(
            std::io::stderr(),
            "switchyard-tests: control plane ready in {:.1}s (etcd {:.1}s, kube-apiserver {:.1}s); files in {}",
            startup.total.as_secs_f64(),
            startup.etcd.as_secs_f64(),
            startup.apiserver.as_secs_f64(),
            dir.path().display()
        );
        Ok(Self {
            processes: tokio::sync::Mutex::new(Processes {
                apiserver,
                etcd,
                restarts: 0,
            }),
            server,
            kubeconfig,
            pki,
            startup,
            relaunch: Relaunch {
                etcd: (etcd_bin, etcd_args, etcd_port),
                apiserver: (apiserver_bin, apiserver_args),
            },
            dir,
        })
    }

    /// Kills kube-apiserver and etcd (SIGKILL, as a crashed machine would), waits `down`,
    /// then starts both again on the same ports, data and certificates, and waits until
    /// the API answers. Clients made before keep working: they reconnect. Returns how long
    /// the API was unreachable.
    pub async fn restart(&self, down: Duration) -> Result<Duration> {
        let mut p = self.processes.lock().await;
        let began = Instant::now();
        p.apiserver.kill();
        p.etcd.kill();
        tokio::time::sleep(down).await;
        p.restarts += 1;
        let n = p.restarts;
        let (etcd_bin, etcd_args, etcd_port) = &self.relaunch.etcd;
        p.etcd = ManagedProcess::start(
            "etcd",
            etcd_bin,
            etcd_args,
            self.dir.path().join(format!("etcd-restart-{n}.log")),
        )?;
        wait_for_etcd(&p.etcd, *etcd_port).await?;
        let (apiserver_bin, apiserver_args) = &self.relaunch.apiserver;
        p.apiserver = ManagedProcess::start(
            "kube-apiserver",
            apiserver_bin,
            apiserver_args,
            self.dir
                .path()
                .join(format!("kube-apiserver-restart-{n}.log")),
        )?;
        wait_for_apiserver(&p.apiserver, &self.kubeconfig).await?;
        Ok(began.elapsed())
    }

    /// A new client for the admin user. Make one per test: a client belongs to the tokio
    /// runtime it was made in, and each `#[tokio::test]` has its own.
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// Creates a namespace named `<prefix>-<random>` and returns it with a fresh client.
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace> {
        self.check_running()?;
        let client = self.client().await?;
        let namespace = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}-")),
                labels: Some([(TEST_NAMESPACE_LABEL.to_string(), "true".to_string())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let created = Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .map_err(HarnessError::kube(format!(
                "creating a namespace {prefix}-*"
            )))?;
        let name = created.metadata.name.ok_or_else(|| {
            HarnessError::Kubeconfig("the API server returned a namespace without a name".into())
        })?;
        Ok(TestNamespace { client, name })
    }

    /// Installs the CustomResourceDefinition in the YAML file at `path` unless it exists,
    /// and waits until the API server serves it (condition `Established`). Idempotent, so
    /// every test can call it.
    pub async fn install_crd(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let text = std::fs::read_to_string(path)
            .map_err(HarnessError::io(format!("reading {}", path.display())))?;
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text)
            .map_err(|e| HarnessError::Kubeconfig(format!("{}: not a CRD: {e}", path.display())))?;
        let name = crd.metadata.name.clone().unwrap_or_default();
        let crds: Api<CustomResourceDefinition> = Api::all(self.client().await?);
        match crds.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => return Err(HarnessError::kube(format!("creating CRD {name}"))(e)),
        }
        let processes = self.processes.lock().await;
        wait_until(&processes.apiserver, Duration::from_secs(60), || {
            let crds = crds.clone();
            let name = name.clone();
            async move {
                let crd = crds.get(&name).await.map_err(|e| e.to_string())?;
                Ok(crd.status.and_then(|s| s.conditions).is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                }))
            }
        })
        .await
    }

    /// Runs the built `kubectl` against this control plane.
    pub async fn kubectl(&self, args: &[&str]) -> Result<std::process::Output> {
        tokio::process::Command::new(tool("kubectl")?)
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args)
            .output()
            .await
            .map_err(HarnessError::io(format!(
                "running kubectl {}",
                args.join(" ")
            )))
    }

    /// Fails with the dead component's log if etcd or the API server has exited.
    /// (While a restart is under way, it is not checked.)
    pub fn check_running(&self) -> Result<()> {
        let Ok(p) = self.processes.try_lock() else {
            return Ok(());
        };
        p.etcd.check_running()?;
        p.apiserver.check_running()
    }

    /// `https://<address>:<port>` (`127.0.0.1` unless the options said otherwise).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// A kubeconfig file for kubectl, helm and the Go controllers.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    pub fn startup_times(&self) -> StartupTimes {
        self.startup
    }

    /// The directory holding this control plane's files and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn apiserver_args(
    etcd_url: &str,
    port: u16,
    dir: &Path,
    pki: &Pki,
    options: &ControlPlaneOptions,
) -> Vec<String> {
    let address = options.address;
    vec![
        format!("--etcd-servers={etcd_url}"),
        format!("--bind-address={address}"),
        format!("--advertise-address={address}"),
        // The `kubernetes` Service may not point at loopback: without a node, nothing
        // in-cluster needs it.
        format!(
            "--endpoint-reconciler-type={}",
            if options.in_cluster_endpoint {
                "lease"
            } else {
                "none"
            }
        ),
        format!("--secure-port={port}"),
        format!("--cert-dir={}", dir.join("apiserver-certs").display()),
        format!("--tls-cert-file={}", pki.serving_cert.display()),
        format!("--tls-private-key-file={}", pki.serving_key.display()),
        format!("--client-ca-file={}", pki.client_ca.display()),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!(
            "--service-account-key-file={}",
            pki.service_account_public_key.display()
        ),
        format!(
            "--service-account-signing-key-file={}",
            pki.service_account_key.display()
        ),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        "--allow-privileged=true".into(),
        // Logs and exec go to the kubelet at the node's IP: a node's hostname resolves
        // nowhere here, and the API server must not ask the machine's resolver for it.
        "--kubelet-preferred-address-types=InternalIP".into(),
        "--authorization-mode=RBAC".into(),
        "--profiling=false".into(),
    ]
}

pub(crate) async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| HarnessError::Kubeconfig(format!("{}: {e}", path.display())))?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .map_err(|e| HarnessError::Kubeconfig(format!("{}: {e}", path.display())))?;
    Client::try_from(config).map_err(HarnessError::kube("building a client"))
}

/// Polls `check` every 100 ms until it returns `Ok(true)`, failing early if `process` dies.
pub(crate) async fn wait_until<F, Fut>(
    process: &ManagedProcess,
    timeout: Duration,
    check: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<bool, String>>,
{
    let period = Duration::from_millis(100);
    match poll(timeout, period, || process.check_running(), check).await? {
        Ok(()) => Ok(()),
        Err(last) => Err(HarnessError::NotReady {
            component: process.name().to_string(),
            timeout,
            reason: last,
            log: process.log_path().to_path_buf(),
            log_tail: process.log_tail(15),
        }),
    }
}

/// Calls `check` every `period` until it returns `Ok(true)` (`Ok(Ok(()))`) or `timeout`
/// passes (`Ok(Err(the last reason check gave))`); `alive` runs before each check and its
/// error ends the wait at once (a component that died).
pub(crate) async fn poll<A, F, Fut>(
    timeout: Duration,
    period: Duration,
    mut alive: A,
    mut check: F,
) -> Result<std::result::Result<(), String>>
where
    A: FnMut() -> Result<()>,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<bool, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("not checked yet");
    loop {
        alive()?;
        match check().await {
            Ok(true) => return Ok(Ok(())),
            Ok(false) => {}
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            return Ok(Err(last));
        }
        tokio::time::sleep(period).await;
    }
}

async fn wait_for_etcd(etcd: &ManagedProcess, port: u16) -> Result<()> {
    wait_until(etcd, ETCD_READY_TIMEOUT, || async move {
        let body = http_get_plain(port, "/health").await?;
        Ok(body.contains(r#""health":"true""#))
    })
    .await
}

async fn wait_for_apiserver(apiserver: &ManagedProcess, kubeconfig: &Path) -> Result<()> {
    let client = client_from_kubeconfig(kubeconfig).await?;
    wait_until(apiserver, APISERVER_READY_TIMEOUT, || {
        let client = client.clone();
        async move {
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .map_err(|e| e.to_string())?;
            match client.request_text(request).await {
                Ok(body) => Ok(body.trim() == "ok"),
                Err(e) => Err(format!("GET /readyz: {e}")),
            }
        }
    })
    .await
}

/// A minimal HTTP/1.0 GET against 127.0.0.1 (etcd's plain-HTTP health endpoint).
pub(crate) async fn http_get_plain(port: u16, path: &str) -> std::result::Result<String, String> {
    http_get("127.0.0.1", port, path).await
}

/// A minimal HTTP/1.0 GET against `host:port` (health and metrics endpoints, on loopback
/// or on a pod's address): the whole response, status line included.
pub async fn http_get(host: &str, port: u16, path: &str) -> std::result::Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .map_err(|_| format!("GET {path}: no answer within 5s"))?
        .map_err(|e| e.to_string())?;
    Ok(response)
}
