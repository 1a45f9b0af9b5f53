//! What the leader's per-ModelDeployment loops share (the autoscaler,
//! [`crate::autoscale::run`], and the placement loop, [`crate::placement::run`]): the
//! client and caches, a supervisor that keeps one loop per ModelDeployment that wants one,
//! the ready pods to poll, and a poll of a JSON endpoint on every one of them at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};

use crate::api::ModelDeployment;
use crate::build::{self, Component, METRICS_PORT, METRICS_PORT_NAME, Names};
use crate::metrics::Metrics;

/// What every loop shares.
#[derive(Clone)]
pub struct Shared {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// The controller's ModelDeployment cache.
    pub deployments: Store<ModelDeployment>,
    /// Frontend and expert-shard pods of every ModelDeployment in scope.
    pub pods: Store<Pod>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// Label selector of the pods [`Shared::pods`] must hold: every Switchyard frontend and
/// expert-shard pod (pods do not carry `managed-by`: the operator manages their
/// workloads, not them; each carries its ModelDeployment's label and its component, which
/// [`targets`] filters on).
pub fn frontend_pods_selector() -> String {
    format!(
        "app.kubernetes.io/name=switchyard,app.kubernetes.io/component in ({},{}),{}",
        Component::Frontend.as_str(),
        Component::ExpertShard.as_str(),
        build::MODEL_DEPLOYMENT_LABEL
    )
}

/// Keeps one loop (started by `start`) running per ModelDeployment for which `wanted`
/// holds, until `stopped` completes. A loop stops by itself when its object no longer
/// wants it (clearing what it wrote); one whose object is gone or replaced is stopped here.
pub async fn supervise(
    shared: Shared,
    wanted: fn(&ModelDeployment) -> bool,
    start: fn(Shared, ObjectRef<ModelDeployment>, String) -> tokio::task::JoinHandle<()>,
    stopped: impl std::future::Future<Output = ()>,
) {
    let mut loops: HashMap<ObjectRef<ModelDeployment>, (String, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    let supervise = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let deployments = shared.deployments.state();
            // A loop stops by itself when its object is disabled (clearing its status);
            // one whose object is gone or replaced is stopped here.
            let present: HashMap<_, _> = deployments
                .iter()
                .map(|md| (ObjectRef::from_obj(&**md), md.uid().unwrap_or_default()))
                .collect();
            loops.retain(|key, (uid, handle)| {
                let keep = !handle.is_finished() && present.get(key) == Some(uid);
                if !keep {
                    handle.abort();
                }
                keep
            });
            let enabled = deployments
                .iter()
                .filter(|md| wanted(md))
                .map(|md| (ObjectRef::from_obj(&**md), md.uid().unwrap_or_default()));
            for (key, uid) in enabled {
                loops.entry(key.clone()).or_insert_with(|| {
                    let task = start(shared.clone(), key.clone(), uid.clone());
                    (uid, task)
                });
            }
        }
    };
    tokio::select! {
        () = supervise => {}
        () = stopped => {}
    }
    for (_, (_, handle)) in loops {
        handle.abort();
    }
}

/// The ModelDeployment a loop was started for, from the cache: `None` once it is gone or
/// replaced by another object of the same name (another `uid`).
pub fn current(
    shared: &Shared,
    key: &ObjectRef<ModelDeployment>,
    uid: &str,
) -> Option<Arc<ModelDeployment>> {
    shared
        .deployments
        .get(key)
        .filter(|md| md.uid().as_deref() == Some(uid))
}

/// The ready pods of `component` of the ModelDeployment `names` names, by name.
pub fn targets(pods: &Store<Pod>, names: &Names, component: Component) -> Vec<Target> {
    targets_in(pods.state().iter().map(|p| &**p), names, component)
}

/// [`targets`] among `pods`.
pub fn targets_in<'a>(
    pods: impl Iterator<Item = &'a Pod>,
    names: &Names,
    component: Component,
) -> Vec<Target> {
    let mut targets: Vec<Target> = pods
        .filter(|p| p.namespace().as_deref() == Some(names.namespace.as_str()))
        .filter(|p| p.labels().get(build::MODEL_DEPLOYMENT_LABEL) == Some(&names.deployment))
        .filter(|p| {
            p.labels()
                .get("app.kubernetes.io/component")
                .map(String::as_str)
                == Some(component.as_str())
        })
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let status = p.status.as_ref()?;
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let ip = status.pod_ip.as_ref().filter(|_| ready)?;
            let port = p
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .flat_map(|c| c.ports.iter().flatten())
                .find(|port| port.name.as_deref() == Some(METRICS_PORT_NAME))
                .map_or(METRICS_PORT, |port| port.container_port);
            let host = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.clone()
            };
            Some(Target {
                pod: p.name_any(),
                authority: format!("{host}:{port}"),
            })
        })
        .collect();
    targets.sort_by(|a, b| a.pod.cmp(&b.pod));
    targets
}

/// A ready frontend to poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub pod: String,
    /// `ip:port` of its metrics port.
    pub authority: String,
}

/// The answers of one poll.
#[derive(Debug)]
pub struct Poll<R> {
    pub reports: Vec<R>,
    /// `pod: why` for each pod that did not answer usefully.
    pub failures: Vec<String>,
}

/// GETs `path` on every target at once (each has `timeout`) and parses the JSON answers.
pub async fn poll_json<R: serde::de::DeserializeOwned>(
    targets: &[Target],
    path: &str,
    timeout: Duration,
) -> Poll<R> {
    let answers = futures::future::join_all(targets.iter().map(|t| async move {
        let result = match crate::http::get(&t.authority, path, timeout).await {
            Ok((200, body)) => {
                serde_json::from_slice::<R>(&body).map_err(|e| format!("unreadable {path}: {e}"))
            }
            Ok((status, _)) => Err(format!("{path} answered HTTP {status}")),
            Err(e) => Err(format!("{path} at {}: {e}", t.authority)),
        };
        result.map_err(|why| format!("{}: {why}", t.pod))
    }))
    .await;
    let mut poll = Poll {
        reports: Vec::new(),
        failures: Vec::new(),
    };
    for answer in answers {
        match answer {
            Ok(report) => poll.reports.push(report),
            Err(why) => poll.failures.push(why),
        }
    }
    poll
}
