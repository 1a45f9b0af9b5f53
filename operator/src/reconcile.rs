//! The shell around [`crate::build`]: apply the desired objects, read back what the
//! workloads report, write status, record events.
//!
//! ```text
//!   Controller<ModelDeployment>  (+ .owns() watches on every child kind)
//!     └─ reconcile(md)
//!          1. build::desired(md, defaults)            pure
//!          2. server-side apply each child            field manager switchyard-operator, forced
//!             prune children the spec no longer needs  by label, only those md controls
//!          3. status::derive(md, workloads, error)    pure
//!          4. server-side apply status subresource
//!          5. events for changes and failures
//! ```
//!
//! Server-side apply with a forced field manager makes every reconcile idempotent: a
//! restarted operator, a deleted child and a hand edit all converge to the same objects.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::ModelDeployment;
use crate::build::{self, Desired, FIELD_MANAGER, Names, Owned};
use crate::metrics::Metrics;
use crate::status::{self, Observed};

/// What every reconcile needs.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Operator-wide settings the desired objects depend on.
    pub defaults: build::Defaults,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

/// Why a reconcile failed. The variant name is the `reason` label of the error metric.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building the desired objects: {0}")]
    Build(#[from] build::BuildError),
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading {kind} {name}: {source}")]
    Read {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting {kind} {name}, which the spec no longer needs: {source}")]
    Delete {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
}

impl Error {
    /// A short, stable name for metrics and event reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Build(_) => "Build",
            Error::Apply { .. } => "Apply",
            Error::Read { .. } => "Read",
            Error::Delete { .. } => "Delete",
            Error::Status(_) => "Status",
        }
    }
}

/// How often a converged object is looked at again even without a watch event.
const RESYNC: Duration = Duration::from_secs(300);

/// Reconciles one ModelDeployment.
pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&md, &ctx).await;
    let error_reason = result.as_ref().err().map(Error::reason);
    ctx.metrics
        .observe_reconcile(started.elapsed(), error_reason);
    result
}

async fn reconcile_inner(md: &ModelDeployment, ctx: &Context) -> Result<Action, Error> {
    let names = Names::new(md)?;
    let desired = build::desired(md, &ctx.defaults)?;
    let apply_result = apply_all(&ctx.client, &names.namespace, &desired).await;
    let apply_error = apply_result.as_ref().err().map(ToString::to_string);
    // The apply answers carry the workloads' status; read them only if it failed midway.
    let (frontend, experts) = match &apply_result {
        Ok((frontend, experts)) => (Some(frontend.clone()), experts.clone()),
        Err(_) => (
            get_opt::<Deployment>(&ctx.client, &names.namespace, &names.frontend).await?,
            get_opt::<StatefulSet>(&ctx.client, &names.namespace, &names.experts).await?,
        ),
    };
    if apply_result.is_ok() {
        let monitors = pod_monitors_installed(&ctx.client).await?;
        if let Some(monitor) = &desired.pod_monitor {
            if monitors {
                apply_dynamic(
                    &ctx.client,
                    &names.namespace,
                    monitor,
                    &build::pod_monitor_resource(),
                )
                .await?;
            } else {
                publish(
                    ctx,
                    md,
                    EventType::Warning,
                    "PodMonitorUnavailable",
                    format!(
                        "spec.monitoring.podMonitor.enabled is true but the PodMonitor CRD ({}) \
                         is not installed in this cluster: not created (install the Prometheus \
                         Operator, or scrape the pods' `metrics` port another way)",
                        build::POD_MONITOR_GROUP_VERSION
                    ),
                )
                .await;
            }
        }
        prune(ctx, md, &names, &desired, monitors).await?;
    }
    let observed = Observed {
        frontend: frontend.as_ref(),
        experts: experts.as_ref(),
        apply_error: apply_error.clone(),
        placement_revision: Some(desired.placement_revision.clone()),
    };
    let new_status = status::derive(
        md,
        &names,
        &observed,
        Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let changed = md.status.as_ref() != Some(&new_status);
    if changed {
        let generation_changed =
            md.status.as_ref().and_then(|s| s.observed_generation) != md.metadata.generation;
        write_status(&ctx.client, md, &new_status).await?;
        if generation_changed && apply_error.is_none() {
            publish(
                ctx,
                md,
                EventType::Normal,
                "Applied",
                format!(
                    "applied generation {}: {} frontend(s), {} expert shard(s){}",
                    md.metadata.generation.unwrap_or_default(),
                    md.spec.frontend.replicas,
                    md.spec.experts.shards,
                    match md.spec.experts.replica_shards {
                        0 => String::new(),
                        n => format!(" + {n} copies"),
                    }
                ),
            )
            .await;
        }
    }
    apply_result?;
    Ok(Action::requeue(RESYNC))
}

/// On failure: a warning event and a retry in 10 s (the error is also in the status when
/// it came from applying children).
pub fn error_policy(md: Arc<ModelDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(name = %md.name_any(), namespace = ?md.namespace(), %error, "reconcile failed");
    let ctx2 = ctx.clone();
    let md2 = md.clone();
    let reason = error.reason();
    let note = error.to_string();
    tokio::spawn(async move {
        publish(
            &ctx2,
            &md2,
            EventType::Warning,
            &format!("{reason}Failed"),
            note,
        )
        .await;
    });
    Action::requeue(Duration::from_secs(10))
}

async fn publish(
    ctx: &Context,
    md: &ModelDeployment,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &md.object_ref(&())).await {
        tracing::warn!(error = %e, "could not record an event");
    }
}

/// Applies every child in [`Desired::objects`] order (config before the pods that mount
/// it), and returns the two workloads as the API server answered (with their status; no
/// StatefulSet with `experts.shards: 0`).
async fn apply_all(
    client: &Client,
    namespace: &str,
    d: &Desired,
) -> Result<(Deployment, Option<StatefulSet>), Error> {
    let (mut frontend, mut experts) = (None, None);
    for object in d.objects() {
        // Exhaustive on purpose: a kind added to `with_owned_kinds!` must be handled here.
        match object {
            Owned::ServiceAccount(o) => drop(apply(client, namespace, o).await?),
            Owned::ConfigMap(o) => drop(apply(client, namespace, o).await?),
            Owned::Service(o) => drop(apply(client, namespace, o).await?),
            Owned::Deployment(o) => frontend = Some(apply(client, namespace, o).await?),
            Owned::StatefulSet(o) => experts = Some(apply(client, namespace, o).await?),
            Owned::PodDisruptionBudget(o) => drop(apply(client, namespace, o).await?),
            Owned::NetworkPolicy(o) => drop(apply(client, namespace, o).await?),
        }
    }
    Ok((
        frontend.expect("Desired::objects yields the frontend Deployment"),
        experts,
    ))
}

/// Deletes what `md` owns of the [`build::prunable_kinds`] that `desired` no longer has
/// (the shard objects after `experts.shards` went to 0). Found by the
/// [`build::MODEL_DEPLOYMENT_LABEL`] and kept only if `md` is their controller, so an
/// object someone else made with the same label is never touched.
async fn prune(
    ctx: &Context,
    md: &ModelDeployment,
    names: &Names,
    desired: &Desired,
    pod_monitors: bool,
) -> Result<(), Error> {
    let uid = md.metadata.uid.as_deref().unwrap_or_default();
    let selector = format!("{}={}", build::MODEL_DEPLOYMENT_LABEL, names.deployment);
    let mut kinds = build::prunable_kinds().to_vec();
    if pod_monitors {
        kinds.push(build::pod_monitor_resource());
    }
    for resource in kinds {
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &names.namespace, &resource);
        let listed = api
            .list_metadata(&ListParams::default().labels(&selector))
            .await
            .map_err(|source| Error::Read {
                kind: resource.kind.clone(),
                name: selector.clone(),
                source,
            })?;
        for object in listed.items {
            let name = object.name_any();
            let controlled = object
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.controller == Some(true) && o.uid == uid);
            if !controlled || desired.wants(&resource.kind, &name) {
                continue;
            }
            let params = DeleteParams {
                preconditions: object.metadata.uid.clone().map(|uid| Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::background()
            };
            match api.delete(&name, &params).await {
                Ok(_) => {}
                // Already gone (garbage collection, or a second reconcile): nothing to do.
                Err(kube::Error::Api(status)) if status.code == 404 => continue,
                Err(source) => {
                    return Err(Error::Delete {
                        kind: resource.kind.clone(),
                        name,
                        source,
                    });
                }
            }
            tracing::info!(kind = %resource.kind, %name, "pruned an object the spec no longer needs");
            publish(
                ctx,
                md,
                EventType::Normal,
                "Pruned",
                format!(
                    "deleted {} {name}: the spec no longer needs it",
                    resource.kind
                ),
            )
            .await;
        }
    }
    Ok(())
}

async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    // Server-side apply needs apiVersion and kind in the body; typed objects omit them.
    let mut body = serde_json::to_value(object).expect("k8s objects serialize");
    body["apiVersion"] = K::api_version(&()).into();
    body["kind"] = K::kind(&()).into();
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(|source| Error::Apply {
            kind: K::kind(&()).to_string(),
            name,
            source,
        })
}

/// Whether the cluster serves PodMonitors (the Prometheus Operator's CRD is installed).
/// Asked on every reconcile: one discovery GET, and a CRD installed later is picked up.
async fn pod_monitors_installed(client: &Client) -> Result<bool, Error> {
    match client
        .list_api_group_resources(build::POD_MONITOR_GROUP_VERSION)
        .await
    {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == "podmonitors")),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(source) => Err(Error::Read {
            kind: "APIResourceList".into(),
            name: build::POD_MONITOR_GROUP_VERSION.into(),
            source,
        }),
    }
}

/// Server-side apply of an untyped object (the PodMonitor).
async fn apply_dynamic(
    client: &Client,
    namespace: &str,
    object: &DynamicObject,
    resource: &kube::core::ApiResource,
) -> Result<(), Error> {
    let name = object.metadata.name.clone().unwrap_or_default();
    let mut body = serde_json::to_value(object).expect("objects serialize");
    body["apiVersion"] = resource.api_version.clone().into();
    body["kind"] = resource.kind.clone().into();
    Api::<DynamicObject>::namespaced_with(client.clone(), namespace, resource)
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map(drop)
        .map_err(|source| Error::Apply {
            kind: resource.kind.clone(),
            name,
            source,
        })
}

async fn get_opt<K>(client: &Client, namespace: &str, name: &str) -> Result<Option<K>, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|source| Error::Read {
            kind: K::kind(&()).to_string(),
            name: name.to_string(),
            source,
        })
}

async fn write_status(
    client: &Client,
    md: &ModelDeployment,
    status: &crate::api::ModelDeploymentStatus,
) -> Result<(), Error> {
    let status = serde_json::to_value(status).expect("a status always serializes");
    status::apply(client, md, FIELD_MANAGER, status)
        .await
        .map_err(Error::Status)
}
