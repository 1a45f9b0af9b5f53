//! Switchyard's integration and end-to-end tests, and the harness they stand on.
//!
//! ```text
//!   tools      where hack/build-control-plane.sh put etcd, kube-apiserver, kwok, ...
//!   process    child processes: death signal, logs, cleanup at exit, temp dirs
//!   pki        throwaway CAs and certificates, the admin kubeconfig
//!   control_plane  ControlPlane: etcd + kube-apiserver        (tier 2 tests)
//!   cluster        Cluster: + controller-manager, scheduler,  (tier 3 tests)
//!                  kwok with fake nvidia.com/gpu nodes
//!   node           RealNode: a real single-node cluster —   (tier 5 tests)
//!                  kubelet, kube-proxy, CoreDNS, containerd — running our images
//!   operator   switchyard-operator as a child process, one namespace each
//!   worker     switchyard-worker frontends and expert shards as child processes
//!   redis      redis-server on a loopback port (quotas shared by frontends)
//!   accounting the frontend's accounting invariant, read from its /metrics
//! ```
//!
//! Each test binary under `tests/` starts at most one control plane (or cluster), on first
//! use, and shares it between its tests; every test takes its own namespace. Everything the
//! harness starts is killed, and its files removed, when the test binary exits — also after
//! a panic, and (for processes) even when the binary itself is killed.

pub mod accounting;
pub mod cluster;
pub mod control_plane;
pub mod error;
pub mod node;
pub mod operator;
pub mod pki;
pub mod process;
pub mod redis;
pub mod tools;
pub mod worker;

pub use cluster::Cluster;
pub use control_plane::{ControlPlane, TestNamespace};
pub use error::{HarnessError, Result};
pub use node::RealNode;

/// The checked-in ModelDeployment CRD (`crds/modeldeployment.yaml`), for
/// [`ControlPlane::install_crd`].
pub const MODEL_DEPLOYMENT_CRD: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/modeldeployment.yaml");
pub use operator::OperatorProcess;
pub use redis::RedisServer;
pub use worker::{FrontendProcess, ShardProcess};
