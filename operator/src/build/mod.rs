//! The pure half of reconciling: a `ModelDeployment` in, the objects it should own out.
//! No client, no I/O; unit-tested from the YAML fixtures in `operator/tests/fixtures/`.
//!
//! ```text
//!   ModelDeployment "<md>"                in apply order (Desired::objects)
//!   ├─ ServiceAccount  <md>-worker       no API token mounted
//!   ├─ ConfigMap       <md>-config       worker.json (the worker contract), placement
//!   ├─ Service         <md>              the client endpoint (gRPC, appProtocol h2c)
//!   ├─ Service         <md>-experts      * headless: shard discovery
//!   ├─ Deployment      <md>-frontend     frontends; the hash of worker.json rolls them
//!   ├─ StatefulSet     <md>-experts      * expert shards, pod index = shard index; the
//!   │                                      hash of the shards' part of worker.json rolls them
//!   ├─ PDB             <md>-frontend, <md>-experts *
//!   └─ NetworkPolicy   <md>-frontend (anyone → gRPC port), <md>-experts * (frontends only)
//!                                        * only with experts.shards ≥ 1
//!   (ConfigMap <md>-placement, the balanced placement's file: written by the placement
//!    loop, crate::placement::run, not here; the shard pods mount it, optional)
//! ```
//!
//! With `experts.shards: 0` the frontends hold the whole model (a dense checkpoint, or a
//! MoE small enough for one pod) and the `<md>-experts` objects are not built; reconcile
//! prunes them by label ([`prunable_kinds`]) when a spec drops its shards.
//!
//! Every object carries the standard labels and a controller owner reference to the
//! ModelDeployment, so deleting it garbage-collects everything.
//!
//! [`Desired::objects`] is the one list of owned objects: reconcile applies it in order,
//! the managed-objects metric counts it ([`Desired::object_count`]), and the tests walk
//! it. The kinds are listed once, in [`with_owned_kinds!`](crate::with_owned_kinds), which
//! makes [`Owned`] and the operator's `.owns()` watches.

mod config;
mod monitor;
mod pods;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount, ServicePort, ServiceSpec};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use crate::api::ModelDeployment;

pub use config::{config_hash, worker_config};
pub use monitor::{POD_MONITOR_GROUP_VERSION, pod_monitor_resource};

/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "switchyard-operator";
/// Label naming the owning ModelDeployment on every object and pod.
pub const MODEL_DEPLOYMENT_LABEL: &str = "switchyard.dev/model-deployment";
/// Pod-template annotation holding the digest of `worker.json`.
pub const CONFIG_HASH_ANNOTATION: &str = "switchyard.dev/config-hash";
/// Name of the gRPC port on containers and Services.
pub const GRPC_PORT_NAME: &str = "grpc";
/// Name and number of the workers' Prometheus port (`/metrics`, `/healthz`).
pub const METRICS_PORT_NAME: &str = "metrics";
/// See [`METRICS_PORT_NAME`].
pub const METRICS_PORT: i32 = 9090;

/// The worker image of this operator's own release: what pods run when a ModelDeployment
/// leaves `spec.image` out and the operator was given no `--default-worker-image`.
pub const DEFAULT_WORKER_IMAGE: &str = concat!(
    "ghcr.io/switchyard-dev/switchyard-worker:",
    env!("CARGO_PKG_VERSION")
);

/// Operator-wide settings the desired objects depend on (not part of any one spec).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// Image for ModelDeployments without `spec.image`.
    pub worker_image: String,
    /// The operator's own namespace, where the chart runs its pods: with autoscaling on
    /// and `spec.monitoring.scrapeFrom` restricting the metrics port, the frontends'
    /// NetworkPolicy also admits the operator's pods there (it polls `/demand`).
    pub operator_namespace: Option<String>,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            worker_image: DEFAULT_WORKER_IMAGE.to_string(),
            operator_namespace: None,
        }
    }
}

/// The two kinds of worker pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Frontend,
    ExpertShard,
}

impl Component {
    /// `app.kubernetes.io/component`, and the worker's `--role`.
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Frontend => "frontend",
            Component::ExpertShard => "expert-shard",
        }
    }

    /// The gRPC service the role serves: its readiness health key.
    pub fn grpc_service(self) -> &'static str {
        match self {
            Component::Frontend => "switchyard.v1.Inference",
            Component::ExpertShard => "switchyard.expert.v1.ExpertShard",
        }
    }
}

/// Why desired objects could not be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BuildError {
    /// The object lacks something the API server always sets; it was not read from it.
    #[error("ModelDeployment has no {0}: it must come from the API server")]
    MissingMetadata(&'static str),
}

/// Names of the owned objects, derived from the ModelDeployment's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub deployment: String,
    pub namespace: String,
    pub frontend: String,
    pub client_service: String,
    /// Headless Service of the ready frontends: how each counts its peers (quota scope).
    pub frontend_peers: String,
    pub experts: String,
    pub config: String,
    /// The balanced placement's file, written by the placement loop (not reconcile).
    pub placement: String,
    pub service_account: String,
}

impl Names {
    pub fn new(md: &ModelDeployment) -> Result<Self, BuildError> {
        let name = md
            .metadata
            .name
            .clone()
            .ok_or(BuildError::MissingMetadata("metadata.name"))?;
        let namespace = md
            .metadata
            .namespace
            .clone()
            .ok_or(BuildError::MissingMetadata("metadata.namespace"))?;
        Ok(Self {
            frontend: format!("{name}-frontend"),
            client_service: name.clone(),
            frontend_peers: format!("{name}-frontend-peers"),
            experts: format!("{name}-experts"),
            config: format!("{name}-config"),
            placement: format!("{name}-placement"),
            service_account: format!("{name}-worker"),
            deployment: name,
            namespace,
        })
    }

    /// `<service>.<namespace>.svc:<port>`: what clients dial.
    pub fn endpoint(&self, port: i32) -> String {
        format!("{}.{}.svc:{port}", self.client_service, self.namespace)
    }
}

/// Everything one ModelDeployment owns; [`Desired::objects`] walks it in apply order.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub service_account: ServiceAccount,
    pub config: ConfigMap,
    pub frontend: Deployment,
    pub client_service: Service,
    /// Headless, ready frontends only: each frontend resolves it to count the live
    /// frontends it splits quotas with (`admission.quotaScope`).
    pub frontend_peers: Service,
    pub frontend_pdb: PodDisruptionBudget,
    pub frontend_policy: NetworkPolicy,
    /// The expert-shard objects; `None` with `experts.shards: 0` (the frontends hold the
    /// whole model), and reconcile prunes any left from an earlier spec.
    pub experts: Option<ExpertShards>,
    /// The PodMonitor, when `spec.monitoring.podMonitor.enabled` (untyped: not a
    /// Kubernetes kind, and not in [`Desired::objects`]; reconcile applies it where its
    /// CRD is installed).
    pub pod_monitor: Option<kube::api::DynamicObject>,
    /// The placement revision written into `worker.json` (reported in status).
    pub placement_revision: String,
}

/// The objects that exist only while `experts.shards` is at least 1.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertShards {
    pub statefulset: StatefulSet,
    /// Headless: shard discovery.
    pub service: Service,
    pub pdb: PodDisruptionBudget,
    pub policy: NetworkPolicy,
}

/// Calls `$then!` with every kind a ModelDeployment owns, as `Variant => type` pairs:
/// the one list of kinds that [`Owned`] and the operator's `.owns()` watches are made from.
///
/// A macro, not a function or an iterator: each kind is its own Rust type, and
/// `Controller::owns::<K>` takes it as a type parameter, so the watches cannot be made by
/// iterating over values. Adding a kind here adds an [`Owned`] variant, whose exhaustive
/// matches (reconcile's apply) then fail to compile until they handle it.
#[macro_export]
macro_rules! with_owned_kinds {
    ($then:ident) => {
        $then! {
            ServiceAccount => ::k8s_openapi::api::core::v1::ServiceAccount,
            ConfigMap => ::k8s_openapi::api::core::v1::ConfigMap,
            Service => ::k8s_openapi::api::core::v1::Service,
            Deployment => ::k8s_openapi::api::apps::v1::Deployment,
            StatefulSet => ::k8s_openapi::api::apps::v1::StatefulSet,
            PodDisruptionBudget => ::k8s_openapi::api::policy::v1::PodDisruptionBudget,
            NetworkPolicy => ::k8s_openapi::api::networking::v1::NetworkPolicy,
        }
    };
}

macro_rules! owned_enum {
    ($($kind:ident => $ty:path),* $(,)?) => {
        /// One object of [`Desired`], borrowed, tagged with its kind.
        #[derive(Debug, Clone, Copy, PartialEq)]
        pub enum Owned<'a> {
            $($kind(&'a $ty),)*
        }

        impl<'a> Owned<'a> {
            /// The object's `kind`, as the API server spells it.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(Owned::$kind(_) => <$ty as k8s_openapi::Resource>::KIND,)*
                }
            }

            /// The object's metadata.
            pub fn meta(&self) -> &'a ObjectMeta {
                match self {
                    $(Owned::$kind(object) => &object.metadata,)*
                }
            }

            /// Group, version, kind and plural, for a dynamic `Api` (tests look objects
            /// up with it).
            pub fn api_resource(&self) -> kube::core::ApiResource {
                match self {
                    $(Owned::$kind(_) => kube::core::ApiResource::erase::<$ty>(&()),)*
                }
            }
        }
    };
}

with_owned_kinds!(owned_enum);

impl<'a> Owned<'a> {
    /// `metadata.name`; the builder always sets it.
    pub fn name(&self) -> &'a str {
        self.meta().name.as_deref().unwrap_or_default()
    }
}

impl Desired {
    /// Every owned object, once, in apply order: the ServiceAccount and the ConfigMap
    /// before the workloads that use them, the Services before the pods they front.
    pub fn objects(&self) -> impl Iterator<Item = Owned<'_>> {
        // Destructured without `..`, so a new field fails to compile until it is listed.
        let Desired {
            service_account,
            config,
            frontend,
            client_service,
            frontend_peers,
            frontend_pdb,
            frontend_policy,
            experts,
            pod_monitor: _,
            placement_revision: _,
        } = self;
        let shards = |f: fn(&ExpertShards) -> Owned<'_>| experts.as_ref().map(f);
        [
            Some(Owned::ServiceAccount(service_account)),
            Some(Owned::ConfigMap(config)),
            Some(Owned::Service(client_service)),
            Some(Owned::Service(frontend_peers)),
            shards(|e| Owned::Service(&e.service)),
            Some(Owned::Deployment(frontend)),
            shards(|e| Owned::StatefulSet(&e.statefulset)),
            Some(Owned::PodDisruptionBudget(frontend_pdb)),
            shards(|e| Owned::PodDisruptionBudget(&e.pdb)),
            Some(Owned::NetworkPolicy(frontend_policy)),
            shards(|e| Owned::NetworkPolicy(&e.policy)),
        ]
        .into_iter()
        .flatten()
    }

    /// How many objects [`Desired::objects`] yields for `spec`, without building them
    /// (the managed-objects metric).
    pub fn object_count(spec: &crate::api::ModelDeploymentSpec) -> usize {
        if spec.experts.shards > 0 { 11 } else { 7 }
    }
}

impl Desired {
    /// Whether the object `kind`/`name` is desired (the PodMonitor included).
    pub fn wants(&self, kind: &str, name: &str) -> bool {
        self.objects().any(|o| o.kind() == kind && o.name() == name)
            || self
                .pod_monitor
                .as_ref()
                .is_some_and(|m| kind == "PodMonitor" && m.metadata.name.as_deref() == Some(name))
    }
}

/// The kinds a spec change can make unneeded (the expert-shard objects when
/// `experts.shards` becomes 0): reconcile lists these by the
/// [`MODEL_DEPLOYMENT_LABEL`] and deletes the ones it owns that [`Desired`] no longer has.
/// The PodMonitor ([`pod_monitor_resource`]) is pruned the same way where its CRD exists.
pub fn prunable_kinds() -> [kube::core::ApiResource; 4] {
    use kube::core::ApiResource;
    [
        ApiResource::erase::<StatefulSet>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<PodDisruptionBudget>(&()),
        ApiResource::erase::<NetworkPolicy>(&()),
    ]
}

/// Builds the desired objects of `md`.
pub fn desired(md: &ModelDeployment, defaults: &Defaults) -> Result<Desired, BuildError> {
    let names = Names::new(md)?;
    let owner = md
        .controller_owner_ref(&())
        .ok_or(BuildError::MissingMetadata("metadata.uid"))?;
    let spec = &md.spec;
    let port = spec.serving.port;
    let config = worker_config(md, &names);
    let placement_revision = config.placement.revision.clone();
    let config_json =
        serde_json::to_string_pretty(&config).expect("the worker config always serializes to JSON");
    // Each role rolls only when what it reads changes: frontends all of worker.json but
    // the shard count (`WorkerConfig::frontend_contract`), shards their part of it
    // (`WorkerConfig::shard_contract`).
    let frontend_hash = config_hash(&config.frontend_contract().to_string());
    let shard_hash = config_hash(&config.shard_contract().to_string());
    let meta = |name: &str, component: Option<Component>| {
        object_meta(name, &names, component, owner.clone())
    };

    let frontend_selector = selector_labels(&names, Component::Frontend);
    let experts_selector = selector_labels(&names, Component::ExpertShard);

    let config_map = ConfigMap {
        metadata: meta(&names.config, None),
        data: Some(
            [(
                switchyard_proto::worker_config::CONFIG_FILE.to_string(),
                config_json,
            )]
            .into(),
        ),
        ..ConfigMap::default()
    };

    let frontend = Deployment {
        metadata: meta(&names.frontend, Some(Component::Frontend)),
        spec: DeploymentSpec {
            replicas: Some(spec.frontend.replicas),
            selector: label_selector(&frontend_selector),
            template: pods::template(md, defaults, &names, Component::Frontend, &frontend_hash),
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    };

    let statefulset = StatefulSet {
        metadata: meta(&names.experts, Some(Component::ExpertShard)),
        spec: StatefulSetSpec {
            // The copies (replicaShards) are more pods of the same template: changing
            // their number rolls nothing. A balanced placement keeps the shards its file
            // still uses (`ModelDeployment::shard_pods`).
            replicas: Some(md.shard_pods()),
            selector: label_selector(&experts_selector),
            service_name: Some(names.experts.clone()),
            // Shards keep no per-request state: start and replace them all at once.
            pod_management_policy: Some("Parallel".into()),
            template: pods::template(md, defaults, &names, Component::ExpertShard, &shard_hash),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    };

    let grpc_port = ServicePort {
        name: Some(GRPC_PORT_NAME.into()),
        port,
        target_port: Some(IntOrString::String(GRPC_PORT_NAME.into())),
        protocol: Some("TCP".into()),
        // HTTP/2 in the clear; with TLS, no standard name exists for gRPC over TLS.
        app_protocol: spec.tls.is_none().then(|| "kubernetes.io/h2c".into()),
        ..ServicePort::default()
    };
    let metrics_port = ServicePort {
        name: Some(METRICS_PORT_NAME.into()),
        port: METRICS_PORT,
        target_port: Some(IntOrString::String(METRICS_PORT_NAME.into())),
        protocol: Some("TCP".into()),
        app_protocol: Some("http".into()),
        ..ServicePort::default()
    };
    let client_service = Service {
        metadata: meta(&names.client_service, Some(Component::Frontend)),
        spec: Some(ServiceSpec {
            selector: Some(frontend_selector.clone()),
            ports: Some(vec![grpc_port.clone(), metrics_port.clone()]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let frontend_peers = Service {
        metadata: meta(&names.frontend_peers, Some(Component::Frontend)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(frontend_selector.clone()),
            // Ready frontends only: a starting or draining one takes no share.
            publish_not_ready_addresses: Some(false),
            ports: Some(vec![metrics_port.clone()]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let experts_service = Service {
        metadata: meta(&names.experts, Some(Component::ExpertShard)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(experts_selector.clone()),
            // Shards serve plaintext whatever spec.tls says (only frontends reach them).
            ports: Some(vec![
                ServicePort {
                    app_protocol: Some("kubernetes.io/h2c".into()),
                    ..grpc_port
                },
                metrics_port,
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };

    let pdb = |name: &str, component, selector: &BTreeMap<String, String>| PodDisruptionBudget {
        metadata: meta(name, Some(component)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(label_selector(selector)),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    };

    let grpc_only = || NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    };
    // The metrics port, from `spec.monitoring.scrapeFrom` (empty: any source).
    let scrapes = || NetworkPolicyIngressRule {
        ports: Some(vec![NetworkPolicyPort {
            port: Some(IntOrString::Int(METRICS_PORT)),
            protocol: Some("TCP".into()),
            ..NetworkPolicyPort::default()
        }]),
        from: (!spec.monitoring.scrape_from.is_empty())
            .then(|| spec.monitoring.scrape_from.clone()),
    };
    // The operator polls the frontends' `/demand` and the shards' `/load` on the metrics
    // port (its autoscaler, and the KEDA endpoint with or without it): where scrapers
    // are restricted, the operator's pods (the chart's labels) may reach it too.
    let operator_scrapes = || {
        let mut rule = scrapes();
        if let (Some(from), Some(ns)) = (rule.from.as_mut(), defaults.operator_namespace.as_ref()) {
            from.push(NetworkPolicyPeer {
                namespace_selector: Some(label_selector(
                    &[("kubernetes.io/metadata.name".to_string(), ns.clone())].into(),
                )),
                pod_selector: Some(label_selector(
                    &[
                        (
                            "app.kubernetes.io/part-of".to_string(),
                            "switchyard".to_string(),
                        ),
                        (
                            "app.kubernetes.io/component".to_string(),
                            "operator".to_string(),
                        ),
                    ]
                    .into(),
                )),
                ..NetworkPolicyPeer::default()
            });
        }
        rule
    };
    let frontend_policy = NetworkPolicy {
        metadata: meta(&names.frontend, Some(Component::Frontend)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(label_selector(&frontend_selector)),
            policy_types: Some(vec!["Ingress".into()]),
            // Clients (any pod, any namespace) reach the gRPC port; scrapers the metrics
            // port; nothing else.
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    ports: Some(vec![grpc_only()]),
                    from: None,
                },
                operator_scrapes(),
            ]),
            ..NetworkPolicySpec::default()
        }),
    };
    let experts_policy = NetworkPolicy {
        metadata: meta(&names.experts, Some(Component::ExpertShard)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(label_selector(&experts_selector)),
            policy_types: Some(vec!["Ingress".into()]),
            // Only this deployment's frontends reach the shards' gRPC port; scrapers the
            // metrics port.
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    ports: Some(vec![grpc_only()]),
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(label_selector(&frontend_selector)),
                        ..NetworkPolicyPeer::default()
                    }]),
                },
                operator_scrapes(),
            ]),
            ..NetworkPolicySpec::default()
        }),
    };

    let experts = (spec.experts.shards > 0).then(|| ExpertShards {
        statefulset,
        service: experts_service,
        pdb: pdb(&names.experts, Component::ExpertShard, &experts_selector),
        policy: experts_policy,
    });
    Ok(Desired {
        service_account: ServiceAccount {
            metadata: meta(&names.service_account, None),
            automount_service_account_token: Some(false),
            ..ServiceAccount::default()
        },
        config: config_map,
        frontend,
        client_service,
        frontend_peers,
        frontend_pdb: pdb(&names.frontend, Component::Frontend, &frontend_selector),
        frontend_policy,
        experts,
        pod_monitor: monitor::pod_monitor(md, &names, meta(&names.deployment, None)),
        placement_revision,
    })
}

/// The labels every owned object carries.
pub fn labels(names: &Names, component: Option<Component>) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = [
        ("app.kubernetes.io/name", "switchyard"),
        ("app.kubernetes.io/instance", names.deployment.as_str()),
        ("app.kubernetes.io/managed-by", FIELD_MANAGER),
        (MODEL_DEPLOYMENT_LABEL, names.deployment.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if let Some(component) = component {
        labels.insert(
            "app.kubernetes.io/component".into(),
            component.as_str().into(),
        );
    }
    labels
}

/// The labels that select one role's pods (a subset of [`labels`] that never changes).
pub fn selector_labels(names: &Names, component: Component) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "switchyard"),
        ("app.kubernetes.io/instance", names.deployment.as_str()),
        ("app.kubernetes.io/component", component.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// `k=v,k=v` form of [`selector_labels`], as the scale subresource reports it.
pub fn selector_string(names: &Names, component: Component) -> String {
    selector_labels(names, component)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn label_selector(labels: &BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels.clone()),
        ..LabelSelector::default()
    }
}

fn object_meta(
    name: &str,
    names: &Names,
    component: Option<Component>,
    owner: OwnerReference,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(names.namespace.clone()),
        labels: Some(labels(names, component)),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    }
}

#[cfg(test)]
mod tests;
