//! Tier 2: `switchyard-operator run` against the real API server: owned objects, updates,
//! repair, `kubectl scale`, leader election and restarts. (No controller-manager here, so
//! workloads get no pods; the cluster tests cover pods and garbage collection.)

use std::future::Future;
use std::io::Write as _;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use switchyard_operator::api::ModelDeployment;
use switchyard_operator::build::{Defaults, desired};
use switchyard_proto::worker_config::{CONFIG_FILE, WorkerConfig};
use switchyard_tests::{ControlPlane, OperatorProcess, TestNamespace};

const WAIT: Duration = Duration::from_secs(60);
const LEASE: Duration = Duration::from_secs(4);

async fn setup(prefix: &str) -> (&'static ControlPlane, TestNamespace) {
    let cp = ControlPlane::shared().await.unwrap();
    cp.install_crd(switchyard_tests::MODEL_DEPLOYMENT_CRD)
        .await
        .unwrap();
    let ns = cp.namespace(prefix).await.unwrap();
    (cp, ns)
}

fn example(file: &str) -> ModelDeployment {
    let path = format!("{}/../examples/{file}", env!("CARGO_MANIFEST_DIR"));
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Polls `f` every 200 ms until it yields `Some`, or panics naming `what`.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get<K>(ns: &TestNamespace, name: &str) -> Option<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(ns.client.clone(), &ns.name)
        .get_opt(name)
        .await
        .unwrap()
}

/// How many `K` objects carry the labels of the ModelDeployment `md`.
async fn children<K>(ns: &TestNamespace, md: &str) -> usize
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let lp = ListParams::default().labels(&format!("switchyard.dev/model-deployment={md}"));
    Api::<K>::namespaced(ns.client.clone(), &ns.name)
        .list(&lp)
        .await
        .unwrap()
        .items
        .len()
}

fn owned_by(meta: &kube::api::ObjectMeta, md: &ModelDeployment) -> bool {
    meta.owner_references.as_ref().is_some_and(|o| {
        o.len() == 1 && o[0].uid == md.uid().unwrap() && o[0].controller == Some(true)
    })
}

/// A JSON merge patch to the ModelDeployment `name`.
async fn merge_patch(ns: &TestNamespace, name: &str, patch: serde_json::Value) {
    Api::<ModelDeployment>::namespaced(ns.client.clone(), &ns.name)
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

async fn create(ns: &TestNamespace, md: &ModelDeployment) -> ModelDeployment {
    Api::<ModelDeployment>::namespaced(ns.client.clone(), &ns.name)
        .create(&PostParams::default(), md)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_examples_get_every_owned_object_and_a_status() {
    let (cp, ns) = setup("op-objects").await;
    let operator = OperatorProcess::start(cp, &ns.name, "op-a", LEASE)
        .await
        .unwrap();
    for file in ["minimal.yaml", "full.yaml"] {
        let md = create(&ns, &example(file)).await;
        let name = md.name_any();
        // What to look for comes from the builder's own list of owned objects.
        let expected = desired(&md, &Defaults::default()).unwrap();
        let ready = eventually(&format!("{file}: all owned objects"), || async {
            let mut metas = Vec::new();
            for object in expected.objects() {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(ns.client.clone(), &ns.name, &object.api_resource());
                metas.push(api.get_opt(object.name()).await.unwrap()?.metadata);
            }
            let sa = get::<ServiceAccount>(&ns, &format!("{name}-worker")).await?;
            let dep = get::<Deployment>(&ns, &format!("{name}-frontend")).await?;
            Some((metas, sa, dep))
        })
        .await;
        let (metas, sa, dep) = ready;
        let sts = get::<StatefulSet>(&ns, &format!("{name}-experts")).await;
        let headless = get::<Service>(&ns, &format!("{name}-experts")).await;
        if md.spec.experts.shards == 0 {
            assert!(
                sts.is_none() && headless.is_none(),
                "{file}: no shard objects without shards"
            );
        } else {
            let (sts, headless) = (sts.unwrap(), headless.unwrap());
            assert_eq!(sts.spec.replicas, Some(md.spec.experts.shards));
            assert_eq!(headless.spec.unwrap().cluster_ip.as_deref(), Some("None"));
        }
        for meta in &metas {
            assert!(
                owned_by(meta, &md),
                "{file}: {:?} not owned by {name}",
                meta.name
            );
            let labels = meta.labels.as_ref().unwrap();
            assert_eq!(
                labels["app.kubernetes.io/managed-by"],
                "switchyard-operator"
            );
            assert_eq!(labels["switchyard.dev/model-deployment"], name);
        }
        assert_eq!(sa.automount_service_account_token, Some(false));
        assert_eq!(dep.spec.replicas, Some(md.spec.frontend.replicas));
        let pod = dep.spec.template.spec.unwrap();
        let container = &pod.containers[0];
        assert_eq!(container.image.as_deref(), md.spec.image.as_deref());
        assert!(container.readiness_probe.as_ref().unwrap().grpc.is_some());
        assert_eq!(
            container
                .security_context
                .as_ref()
                .unwrap()
                .read_only_root_filesystem,
            Some(true)
        );
        assert_eq!(
            pod.security_context.unwrap().seccomp_profile.unwrap().type_,
            "RuntimeDefault"
        );

        // Status: no pods in this tier, so not Ready, but observed, with the endpoint.
        let status = eventually(&format!("{file}: status"), || async {
            let md = get::<ModelDeployment>(&ns, &name).await?;
            let status = md.status?;
            (status.observed_generation == md.metadata.generation).then_some(status)
        })
        .await;
        assert_eq!(
            status.endpoint.as_deref(),
            Some(format!("{name}.{}.svc:50051", ns.name).as_str())
        );
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason, "ReplicasNotReady");
        assert!(status.placement.is_some());
    }
    let metrics = operator.metrics().await.unwrap();
    assert!(
        metrics.contains("switchyard_operator_reconciles_total{result=\"success\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_operator_leader 1"),
        "{metrics}"
    );
    operator.check_running().unwrap();
}

#[tokio::test]
async fn spec_changes_roll_out_and_hand_edits_and_deletions_are_repaired() {
    let (cp, ns) = setup("op-update").await;
    let _operator = OperatorProcess::start(cp, &ns.name, "op-a", LEASE)
        .await
        .unwrap();
    let mut md = example("minimal.yaml");
    md.spec.experts.shards = 2;
    let md = create(&ns, &md).await;
    let name = md.name_any();
    let shards = |n: i32| {
        let ns = ns.clone();
        let name = name.clone();
        async move {
            let sts = get::<StatefulSet>(&ns, &format!("{name}-experts")).await?;
            let cm = get::<ConfigMap>(&ns, &format!("{name}-config")).await?;
            let config: WorkerConfig =
                serde_json::from_str(&cm.data.as_ref()?[CONFIG_FILE]).ok()?;
            (sts.spec.replicas == Some(n) && config.shards.count == n as u32).then_some(sts)
        }
    };
    let before = eventually("2 shards", || shards(2)).await;

    merge_patch(
        &ns,
        &name,
        serde_json::json!({"spec": {"image": "switchyard/worker:v2", "experts": {"shards": 3}}}),
    )
    .await;
    let after = eventually("3 shards in the StatefulSet and the placement", || {
        shards(3)
    })
    .await;
    let hash = |s: &StatefulSet| {
        s.spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()["switchyard.dev/config-hash"]
            .clone()
    };
    assert_ne!(
        hash(&before),
        hash(&after),
        "a new placement rolls the shards"
    );
    eventually("the new image on the frontends", || async {
        let dep = get::<Deployment>(&ns, &format!("{name}-frontend")).await?;
        let image = dep.spec.template.spec?.containers[0].image.clone()?;
        (image == "switchyard/worker:v2").then_some(())
    })
    .await;

    // A deleted child comes back.
    let configmaps: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);
    let old_uid = configmaps
        .get(&format!("{name}-config"))
        .await
        .unwrap()
        .uid();
    configmaps
        .delete(&format!("{name}-config"), &DeleteParams::default())
        .await
        .unwrap();
    eventually("the deleted ConfigMap recreated", || async {
        let cm = get::<ConfigMap>(&ns, &format!("{name}-config")).await?;
        (cm.uid() != old_uid).then_some(())
    })
    .await;

    // A hand edit is reverted.
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    deployments
        .patch(
            &format!("{name}-frontend"),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 7}})),
        )
        .await
        .unwrap();
    eventually("the hand-edited replicas restored", || async {
        let dep = get::<Deployment>(&ns, &format!("{name}-frontend")).await?;
        (dep.spec.replicas == Some(1)).then_some(())
    })
    .await;
}

/// `experts.shards` 2 → 0: the shard StatefulSet, its Service, PDB and NetworkPolicy are
/// pruned (by label, only what the ModelDeployment controls); the frontend objects stay;
/// an object with the same label that the ModelDeployment does not control is left alone;
/// 0 → 1 brings the shard objects back.
#[tokio::test]
async fn dropping_the_shards_prunes_their_objects_and_only_those() {
    let (cp, ns) = setup("op-prune").await;
    let operator = OperatorProcess::start(cp, &ns.name, "op-a", LEASE)
        .await
        .unwrap();
    let mut md = example("minimal.yaml");
    md.spec.experts.shards = 2;
    let md = create(&ns, &md).await;
    let name = md.name_any();
    let experts = format!("{name}-experts");
    let shard_objects = |want: bool, what: &'static str| {
        let (ns, experts) = (ns.clone(), experts.clone());
        async move {
            for resource in switchyard_operator::build::prunable_kinds() {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(ns.client.clone(), &ns.name, &resource);
                eventually(&format!("{} {experts} {what}", resource.kind), || async {
                    let there = api.get_opt(&experts).await.unwrap().is_some();
                    (there == want).then_some(())
                })
                .await;
            }
        }
    };
    shard_objects(true, "created").await;
    // Someone else's object carrying this deployment's label: not ours to delete.
    let services: Api<Service> = Api::namespaced(ns.client.clone(), &ns.name);
    let stranger: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "not-owned", "labels": {"switchyard.dev/model-deployment": name}},
        "spec": {"ports": [{"port": 80}]},
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &stranger)
        .await
        .unwrap();

    merge_patch(
        &ns,
        &name,
        serde_json::json!({"spec": {"experts": {"shards": 0}}}),
    )
    .await;
    shard_objects(false, "pruned").await;
    assert!(
        get::<Deployment>(&ns, &format!("{name}-frontend"))
            .await
            .is_some()
    );
    assert!(
        get::<Service>(&ns, &name).await.is_some(),
        "the client Service stays"
    );
    assert!(
        get::<Service>(&ns, "not-owned").await.is_some(),
        "an object the ModelDeployment does not control is never pruned"
    );
    let cm = eventually("worker.json without shards", || async {
        let cm = get::<ConfigMap>(&ns, &format!("{name}-config")).await?;
        let config: WorkerConfig = serde_json::from_str(&cm.data.as_ref()?[CONFIG_FILE]).ok()?;
        (config.shards.count == 0).then_some(config)
    })
    .await;
    assert_eq!(cm.shards.count, 0);
    eventually(
        "managed_objects 7 (a deployment without shards)",
        || async {
            let metrics = operator.metrics().await.ok()?;
            metrics
                .contains("switchyard_operator_managed_objects 7")
                .then_some(())
        },
    )
    .await;

    merge_patch(
        &ns,
        &name,
        serde_json::json!({"spec": {"experts": {"shards": 1}}}),
    )
    .await;
    shard_objects(true, "back").await;
    operator.check_running().unwrap();
}

#[tokio::test]
async fn kubectl_scale_changes_the_frontend_deployment() {
    let (cp, ns) = setup("op-scale").await;
    let _operator = OperatorProcess::start(cp, &ns.name, "op-a", LEASE)
        .await
        .unwrap();
    let md = create(&ns, &example("minimal.yaml")).await;
    let name = md.name_any();
    // The scale subresource reads status.frontend.selector: wait for the first status.
    eventually("a first status", || async {
        get::<ModelDeployment>(&ns, &name).await?.status.map(|_| ())
    })
    .await;
    let output = cp
        .kubectl(&[
            "scale",
            &format!("md/{name}"),
            "--replicas=3",
            "-n",
            &ns.name,
        ])
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "kubectl scale failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    eventually("3 frontend replicas", || async {
        let dep = get::<Deployment>(&ns, &format!("{name}-frontend")).await?;
        (dep.spec.replicas == Some(3)).then_some(())
    })
    .await;
    let md = get::<ModelDeployment>(&ns, &name).await.unwrap();
    assert_eq!(md.spec.frontend.replicas, 3);

    // `kubectl get md` shows the printer columns.
    let output = cp
        .kubectl(&["get", "md", &name, "-n", &ns.name])
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "READY", "FRONTENDS", "SHARDS", "ENDPOINT", "AGE"],
        "{table}"
    );
    assert!(
        table.contains(&format!("{name}.{}.svc:50051", ns.name)),
        "{table}"
    );
}

async fn lease_holder(ns: &TestNamespace) -> Option<String> {
    get::<Lease>(ns, "switchyard-operator")
        .await?
        .spec?
        .holder_identity
}

/// Two operators in `ns`: `op-a`, started first and holding the lease, and `op-b`, the
/// standby.
async fn leader_and_standby(
    cp: &ControlPlane,
    ns: &TestNamespace,
) -> (OperatorProcess, OperatorProcess) {
    let first = OperatorProcess::start(cp, &ns.name, "op-a", LEASE)
        .await
        .unwrap();
    eventually("op-a to hold the lease", || async {
        (lease_holder(ns).await? == "op-a").then_some(())
    })
    .await;
    let second = OperatorProcess::start(cp, &ns.name, "op-b", LEASE)
        .await
        .unwrap();
    (first, second)
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over_when_it_dies() {
    let (cp, ns) = setup("op-leader").await;
    let (first, second) = leader_and_standby(cp, &ns).await;
    let md = create(&ns, &example("minimal.yaml")).await;
    let name = md.name_any();
    eventually("the leader's objects", || async {
        get::<Deployment>(&ns, &format!("{name}-frontend")).await
    })
    .await;
    let managers = |dep: &Deployment| -> Vec<String> {
        dep.metadata
            .managed_fields
            .iter()
            .flatten()
            .filter_map(|f| f.manager.clone())
            .collect()
    };
    let dep = get::<Deployment>(&ns, &format!("{name}-frontend"))
        .await
        .unwrap();
    assert_eq!(managers(&dep), ["switchyard-operator"]);
    let standby = second.metrics().await.unwrap();
    assert!(
        standby.contains("switchyard_operator_leader 0"),
        "{standby}"
    );
    assert!(
        !standby.contains("switchyard_operator_reconciles_total"),
        "the standby must not reconcile: {standby}"
    );

    // The leader dies without releasing its lease; the standby takes over after it expires.
    first.kill();
    let killed = tokio::time::Instant::now();
    eventually("op-b to take the lease", || async {
        (lease_holder(&ns).await? == "op-b").then_some(())
    })
    .await;
    let took = killed.elapsed();
    // Past the output capture: the figure goes in the closing notes.
    let _ = std::io::Write::write_fmt(
        &mut std::io::stderr(),
        format_args!(
            "leader failover: standby holds the lease {took:?} after the kill (lease {LEASE:?})\n"
        ),
    );
    assert!(
        took <= LEASE + Duration::from_secs(5),
        "takeover took {took:?}, lease is {LEASE:?}"
    );
    // ... and reconciles: a new object gets its children.
    let mut other = example("minimal.yaml");
    other.metadata.name = Some("after-failover".into());
    create(&ns, &other).await;
    eventually("the new leader's objects", || async {
        get::<Deployment>(&ns, "after-failover-frontend").await
    })
    .await;
    second.check_running().unwrap();
}

/// Chaos: the leader killed (SIGKILL, its lease not released) right after a spec change,
/// mid-rollout of it: the standby takes the lease and finishes the rollout (the new pod
/// template and config), with one of each child, all written by the operator's one field
/// manager, and the status observing the new generation.
#[tokio::test]
async fn a_leader_killed_mid_rollout_hands_the_rollout_to_the_standby() {
    let (cp, ns) = setup("op-rollout").await;
    let (first, second) = leader_and_standby(cp, &ns).await;
    let mut md = example("full.yaml");
    md.metadata.name = Some("rollout".into());
    create(&ns, &md).await;
    eventually("the first rollout", || async {
        get::<Deployment>(&ns, "rollout-frontend").await
    })
    .await;
    // The change: a new pod template (node selector) and a new worker config (batch size).
    merge_patch(
        &ns,
        "rollout",
        serde_json::json!({"spec": {
            "frontend": {"nodeSelector": {"chaos": "rollout"}},
            "serving": {"maxBatchSize": 96},
        }}),
    )
    .await;
    first.kill();
    let killed = tokio::time::Instant::now();
    let rolled_out = || async {
        let dep = get::<Deployment>(&ns, "rollout-frontend").await?;
        let selector = dep.spec.template.spec.as_ref()?.node_selector.clone()?;
        let cm = get::<ConfigMap>(&ns, "rollout-config").await?;
        let config: WorkerConfig =
            serde_json::from_str(cm.data.as_ref()?.get(CONFIG_FILE)?).ok()?;
        let md = get::<ModelDeployment>(&ns, "rollout").await?;
        let observed = md.status.as_ref()?.observed_generation;
        (selector.get("chaos").map(String::as_str) == Some("rollout")
            && config.serving.max_batch_size == 96
            && observed == md.metadata.generation)
            .then_some(dep)
    };
    let dep = eventually("the standby to finish the rollout", rolled_out).await;
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: the leader killed mid-rollout; the standby finished it {:.1}s \
         after the kill (lease {LEASE:?})",
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(lease_holder(&ns).await.as_deref(), Some("op-b"));
    assert_eq!(children::<Deployment>(&ns, "rollout").await, 1);
    assert_eq!(children::<StatefulSet>(&ns, "rollout").await, 1);
    assert_eq!(children::<ConfigMap>(&ns, "rollout").await, 1);
    let managers: Vec<String> = dep
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|f| f.manager.clone())
        .collect();
    assert_eq!(
        managers,
        ["switchyard-operator"],
        "one writer of the Deployment"
    );
    second.check_running().unwrap();
}

#[tokio::test]
async fn a_restarted_operator_converges_to_the_same_objects() {
    let (cp, ns) = setup("op-restart").await;
    let first = OperatorProcess::start(cp, &ns.name, "op-a", LEASE)
        .await
        .unwrap();
    let mut md = example("full.yaml");
    md.metadata.name = Some("restart".into());
    create(&ns, &md).await;
    let snapshot = || async {
        let dep = get::<Deployment>(&ns, "restart-frontend").await?;
        let sts = get::<StatefulSet>(&ns, "restart-experts").await?;
        let cm = get::<ConfigMap>(&ns, "restart-config").await?;
        Some((dep, sts, cm))
    };
    // Kill it as soon as the first objects exist: mid-reconcile, most likely.
    eventually("the first child", || async {
        get::<ServiceAccount>(&ns, "restart-worker").await
    })
    .await;
    first.kill();
    let _second = OperatorProcess::start(cp, &ns.name, "op-a", LEASE)
        .await
        .unwrap();
    let (dep, sts, cm) = eventually("every child after the restart", snapshot).await;

    // Exactly one of each, owned once, with the content the spec asks for.
    assert_eq!(children::<Deployment>(&ns, "restart").await, 1);
    assert_eq!(children::<StatefulSet>(&ns, "restart").await, 1);
    assert_eq!(dep.spec.replicas, Some(2));
    assert_eq!(sts.spec.replicas, Some(4));
    let config: WorkerConfig = serde_json::from_str(&cm.data.unwrap()[CONFIG_FILE]).unwrap();
    assert_eq!(config.shards.count, 4);
    assert_eq!(dep.owner_references().len(), 1);
}

/// Chaos: kube-apiserver and etcd killed (SIGKILL) and started again while the operator
/// reconciles a new ModelDeployment. The operator rides the outage out (its lease outlives
/// it), converges to exactly one of each child, and its watches come back: a spec change
/// made after the restart is acted on.
#[tokio::test]
async fn the_operator_converges_through_an_api_server_and_etcd_restart() {
    let cp = ControlPlane::start().await.unwrap();
    cp.install_crd(switchyard_tests::MODEL_DEPLOYMENT_CRD)
        .await
        .unwrap();
    let ns = cp.namespace("outage").await.unwrap();
    let operator = OperatorProcess::start(&cp, &ns.name, "op-a", Duration::from_secs(30))
        .await
        .unwrap();
    let mut md = example("full.yaml");
    md.metadata.name = Some("outage".into());
    create(&ns, &md).await;
    eventually("the first child", || async {
        get::<ServiceAccount>(&ns, "outage-worker").await
    })
    .await;
    let outage = cp.restart(Duration::from_secs(2)).await.unwrap();
    let _ = writeln!(
        std::io::stderr(),
        "switchyard-tests: kube-apiserver and etcd unreachable for {:.1}s mid-reconcile",
        outage.as_secs_f64()
    );
    // A request on a connection the restart cut may fail once; the next one reconnects.
    let lenient = |name: &'static str| {
        let ns = ns.clone();
        async move {
            let dep = Api::<Deployment>::namespaced(ns.client.clone(), &ns.name)
                .get_opt(&format!("{name}-frontend"))
                .await
                .ok()
                .flatten()?;
            let sts = Api::<StatefulSet>::namespaced(ns.client.clone(), &ns.name)
                .get_opt(&format!("{name}-experts"))
                .await
                .ok()
                .flatten()?;
            Some((dep, sts))
        }
    };
    let (dep, sts) = eventually("every child after the restart", || lenient("outage")).await;
    assert_eq!(dep.spec.replicas, Some(2));
    assert_eq!(sts.spec.replicas, Some(4));
    assert_eq!(children::<Deployment>(&ns, "outage").await, 1);
    assert_eq!(children::<StatefulSet>(&ns, "outage").await, 1);
    assert_eq!(children::<ConfigMap>(&ns, "outage").await, 1);
    operator
        .check_running()
        .unwrap_or_else(|e| panic!("the operator exited in the outage: {e}"));

    // The watches are back: a change made now reaches the Deployment.
    merge_patch(
        &ns,
        "outage",
        serde_json::json!({"spec": {"frontend": {"nodeSelector": {"chaos": "after"}}}}),
    )
    .await;
    let changed = tokio::time::Instant::now();
    let deadline = changed + WAIT;
    loop {
        let acted = lenient("outage").await.is_some_and(|(dep, _)| {
            dep.spec
                .template
                .spec
                .as_ref()
                .and_then(|p| p.node_selector.as_ref())
                .is_some_and(|n| n.get("chaos").map(String::as_str) == Some("after"))
        });
        if acted {
            let _ = writeln!(
                std::io::stderr(),
                "switchyard-tests: a change made after the restart acted on in {:.1}s",
                changed.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a change made after the restart was not acted on in {WAIT:?}; the operator's log:\n{}",
            operator.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    operator.check_running().unwrap();
}

/// Sends SIGTERM; panics with the log unless the operator exits 0 within 20 s.
async fn terminate(operator: OperatorProcess) {
    let operator = std::sync::Arc::new(operator);
    let stopping = operator.clone();
    let status = tokio::task::spawn_blocking(move || stopping.terminate(Duration::from_secs(20)))
        .await
        .unwrap()
        .unwrap_or_else(|| {
            panic!(
                "the operator did not exit within 20 s of SIGTERM; log:\n{}",
                operator.log_tail(30)
            )
        });
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn sigterm_stops_the_leader_cleanly_and_releases_its_lease() {
    let (cp, ns) = setup("op-sigterm").await;
    let operator = OperatorProcess::start(cp, &ns.name, "op-a", LEASE)
        .await
        .unwrap();
    let md = create(&ns, &example("minimal.yaml")).await;
    eventually("the leader at work", || async {
        get::<Deployment>(&ns, &format!("{}-frontend", md.name_any())).await
    })
    .await;
    terminate(operator).await;
    // Released: a standby need not wait for the lease to expire.
    assert_eq!(lease_holder(&ns).await, None);
}

#[tokio::test]
async fn sigterm_right_after_start_up_does_not_hang() {
    // The cache has not synced yet: the case kube-runtime's graceful shutdown waits on.
    let (cp, ns) = setup("op-sigterm-early").await;
    let operator = OperatorProcess::start(cp, &ns.name, "op-a", LEASE)
        .await
        .unwrap();
    terminate(operator).await;
}

#[tokio::test]
async fn without_the_crd_the_operator_refuses_to_start_and_says_how_to_install_it() {
    // A private control plane: the shared one has the CRD.
    let cp = ControlPlane::start().await.unwrap();
    let ns = cp.namespace("no-crd").await.unwrap();
    let err = OperatorProcess::start(&cp, &ns.name, "op-a", LEASE)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("exited with exit status: 1"), "{err}");
    assert!(err.contains("modeldeployments.switchyard.dev"), "{err}");
    assert!(
        err.contains("kubectl apply -f crds/modeldeployment.yaml"),
        "{err}"
    );
}

/// The operator configures workers through `SWITCHYARD_*` variables in the pod templates;
/// a name the worker does not read would be a setting silently dropped. Every one the
/// builder writes (the full example, with every optional variable set) must be a
/// variable of some `switchyard-worker` flag.
#[test]
fn every_variable_the_operator_sets_is_one_the_worker_reads() {
    let worker = switchyard_tests::tools::workspace_binary("switchyard-worker").unwrap();
    let help = std::process::Command::new(worker)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let mut md = example("full.yaml");
    md.metadata.namespace = Some("serving".into());
    md.metadata.uid = Some("u".into());
    md.spec.admission.connections = serde_json::from_value(serde_json::json!({
        "maxPerAddress": 1000, "newPerSecond": 500, "newBurst": 2000
    }))
    .unwrap();
    md.spec.tls = Some(switchyard_operator::api::TlsSpec {
        secret_name: "tls".into(),
    });
    let d = desired(&md, &Defaults::default()).unwrap();
    let experts = &d.experts.as_ref().unwrap().statefulset;
    let mut seen = 0;
    for template in [&d.frontend.spec.template, &experts.spec.template] {
        for var in template.spec.as_ref().unwrap().containers[0]
            .env
            .iter()
            .flatten()
        {
            // Downward-API facts (pod name, IP, shard index) are read by name, not flags.
            if var.value_from.is_some() {
                continue;
            }
            assert!(
                help.contains(&format!("[env: {}=", var.name)),
                "the operator sets {} but no switchyard-worker flag reads it:\n{help}",
                var.name
            );
            seen += 1;
        }
    }
    assert!(seen >= 10, "only {seen} variables checked");
}

/// `spec.monitoring.podMonitor`: where the PodMonitor CRD is missing, a warning event says
/// it was not created; once the CRD is installed the next reconcile creates it, scraping
/// both roles' `metrics` port at the asked interval; turning it off deletes it.
#[tokio::test]
async fn a_pod_monitor_is_created_only_where_its_crd_exists_and_removed_when_turned_off() {
    let (cp, ns) = setup("op-monitor").await;
    let _operator = OperatorProcess::start(cp, &ns.name, "op-a", LEASE)
        .await
        .unwrap();
    let mut md = example("minimal.yaml");
    md.spec.monitoring.pod_monitor.enabled = true;
    md.spec.monitoring.pod_monitor.interval = "15s".into();
    let md = create(&ns, &md).await;
    let name = md.name_any();
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(ns.client.clone(), &ns.name);
    let warning = eventually("a PodMonitorUnavailable event", || async {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("PodMonitorUnavailable"))
    })
    .await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert!(
        warning
            .note
            .as_deref()
            .unwrap_or_default()
            .contains("not installed"),
        "{warning:?}"
    );

    let crd = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/podmonitor-crd.yaml");
    cp.install_crd(&crd).await.unwrap();
    let monitors: Api<DynamicObject> = Api::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &switchyard_operator::build::pod_monitor_resource(),
    );
    // Any change reconciles again; the interval is one the PodMonitor must then carry.
    merge_patch(
        &ns,
        &name,
        serde_json::json!({"spec": {"monitoring": {"podMonitor": {"interval": "20s"}}}}),
    )
    .await;
    let monitor = eventually("the PodMonitor", || async {
        let m = monitors.get_opt(&name).await.ok()??;
        (m.data["spec"]["podMetricsEndpoints"][0]["interval"] == "20s").then_some(m)
    })
    .await;
    assert!(owned_by(&monitor.metadata, &md), "{monitor:?}");
    let endpoint = &monitor.data["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(
        monitor.data["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
        name.as_str()
    );

    merge_patch(
        &ns,
        &name,
        serde_json::json!({"spec": {"monitoring": {"podMonitor": {"enabled": false}}}}),
    )
    .await;
    eventually("the PodMonitor deleted", || async {
        monitors.get_opt(&name).await.ok()?.is_none().then_some(())
    })
    .await;
}

/// A stand-in for a frontend's `/demand` (the tier-2 control plane runs no pods): serves
/// whatever report the test sets, on a loopback port the test's Pod object names.
struct DemandServer {
    port: u16,
    report: std::sync::Arc<std::sync::Mutex<serde_json::Value>>,
    polls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl DemandServer {
    async fn start() -> Self {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let report = std::sync::Arc::new(std::sync::Mutex::new(demand(&[])));
        let polls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (r, p) = (report.clone(), polls.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let body = r.lock().unwrap().to_string();
                p.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut request = [0u8; 1024];
                    let _ = stream.read(&mut request).await;
                    let answer = format!(
                        "HTTP/1.0 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        Self {
            port,
            report,
            polls,
        }
    }

    fn set(&self, tenants: &[(&str, usize, Option<f64>)]) {
        *self.report.lock().unwrap() = demand(tenants);
    }

    /// As [`Self::set`], each tenant in its own tier: (tenant, tier, requests, cap).
    fn set_tiered(&self, tenants: &[(String, &str, usize, Option<f64>)]) {
        *self.report.lock().unwrap() = tiered_demand(tenants);
    }

    /// Answers as expert shard `index` at `utilisation` (`/load`).
    fn set_load(&self, index: u32, utilisation: f64) {
        *self.report.lock().unwrap() = serde_json::json!({
            "shardIndex": index, "utilisation": utilisation, "inFlightRequests": 0,
            "queueDepth": 0, "rowsProcessedTotal": 1, "expertRowsProcessedTotal": 2,
        });
    }
}

/// A `/demand` report: (tenant, requests in the system, cap), all in tier `t`.
fn demand(tenants: &[(&str, usize, Option<f64>)]) -> serde_json::Value {
    let tenants: Vec<_> = tenants
        .iter()
        .map(|&(tenant, n, cap)| (tenant.to_string(), "t", n, cap))
        .collect();
    tiered_demand(&tenants)
}

/// A `/demand` report: (tenant, tier, requests in the system, cap).
fn tiered_demand(tenants: &[(String, &str, usize, Option<f64>)]) -> serde_json::Value {
    let running: usize = tenants.iter().map(|t| t.2).sum();
    serde_json::json!({
        "meanServiceSeconds": 1.0,
        "running": running,
        "queued": 0,
        "frontends": 1,
        "tenants": tenants.iter().map(|(tenant, tier, n, cap)| serde_json::json!({
            "tenant": tenant, "tier": tier, "queued": 0, "running": n, "cap": cap,
        })).collect::<Vec<_>>(),
    })
}

/// A Ready frontend Pod object of `md` at 127.0.0.1 whose metrics port is `port`.
async fn ready_frontend_pod(ns: &TestNamespace, md: &ModelDeployment, port: u16) {
    let names = switchyard_operator::build::Names::new(md).unwrap();
    // The labels the frontend Deployment gives its pods.
    let labels = desired(md, &Defaults::default())
        .unwrap()
        .frontend
        .spec
        .template
        .metadata
        .and_then(|m| m.labels)
        .unwrap();
    ready_pod(
        ns,
        md,
        &format!("{}-frontend-0", names.deployment),
        labels,
        port,
    )
    .await;
}

/// A Ready expert-shard Pod object `<md>-experts-<index>` at 127.0.0.1 whose metrics port
/// is `port`.
async fn ready_shard_pod(ns: &TestNamespace, md: &ModelDeployment, index: u32, port: u16) {
    let names = switchyard_operator::build::Names::new(md).unwrap();
    let labels = desired(md, &Defaults::default())
        .unwrap()
        .experts
        .expect("shards")
        .statefulset
        .spec
        .template
        .metadata
        .and_then(|m| m.labels)
        .unwrap();
    ready_pod(ns, md, &format!("{}-{index}", names.experts), labels, port).await;
}

/// A Ready Pod object `name` of `md` with `labels`, at 127.0.0.1, metrics on `port`.
async fn ready_pod(
    ns: &TestNamespace,
    md: &ModelDeployment,
    name: &str,
    labels: std::collections::BTreeMap<String, String>,
    port: u16,
) {
    use k8s_openapi::api::core::v1::Pod;
    let names = switchyard_operator::build::Names::new(md).unwrap();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels},
        // The operator's worker ServiceAccount (no controller-manager makes `default`).
        "spec": {"serviceAccountName": names.service_account, "automountServiceAccountToken": false,
            "containers": [{"name": "worker", "image": "x",
            "ports": [{"name": "metrics", "containerPort": port}]}]},
    }))
    .unwrap();
    eventually("the worker ServiceAccount", || async {
        get::<ServiceAccount>(ns, &names.service_account).await
    })
    .await;
    let pods = Api::<Pod>::namespaced(ns.client.clone(), &ns.name);
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    pods.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }})),
    )
    .await
    .unwrap();
}

/// The autoscaler end to end against the real API server: it polls the frontend's
/// `/demand`, scales up on legitimate demand within the panic window, not on a flood over
/// quota, back down after the delay, and shows each decision in status, events and
/// metrics; turned off, it leaves the count and its status alone.
#[tokio::test]
async fn the_autoscaler_scales_on_legitimate_demand_and_shows_its_decisions() {
    let (cp, ns) = setup("op-autoscale").await;
    let operator = OperatorProcess::start(cp, &ns.name, "op-a", LEASE)
        .await
        .unwrap();
    let frontend = DemandServer::start().await;
    let mut md = example("minimal.yaml");
    md.spec.autoscaling = Some(
        serde_json::from_value(serde_json::json!({
            "enabled": true,
            "frontend": {"minReplicas": 1, "maxReplicas": 4},
            "targetQueueDepth": 5,
            "stableWindowSeconds": 6,
            "panicWindowSeconds": 2,
            "scaleDownDelaySeconds": 3,
            "pollIntervalMilliseconds": 200,
        }))
        .unwrap(),
    );
    let md = create(&ns, &md).await;
    let name = md.name_any();
    // No frontend yet: no signal, the count held, and status says so.
    let held = eventually("ScalingActive=False without frontends", || async {
        let status = get::<ModelDeployment>(&ns, &name).await?.status?;
        let active = status
            .conditions
            .iter()
            .find(|c| c.type_ == "ScalingActive")?;
        (active.status == "False").then(|| (active.reason.clone(), status.autoscaling))
    })
    .await;
    assert_eq!(held.0, "NoSignal", "{held:?}");
    ready_frontend_pod(&ns, &md, frontend.port).await;
    let autoscaling = |want: &'static str| {
        let (ns, name) = (ns.clone(), name.clone());
        async move {
            eventually(want, || async {
                let md = get::<ModelDeployment>(&ns, &name).await?;
                let status = md.status?;
                let a = status.autoscaling.clone()?;
                Some((md.spec.frontend.replicas, a, status.conditions))
            })
            .await
        }
    };

    // Polled and active, at the minimum.
    eventually("the frontend polled", || async {
        let a = get::<ModelDeployment>(&ns, &name)
            .await?
            .status?
            .autoscaling?;
        (a.reporting_frontends == 1).then_some(())
    })
    .await;
    let (replicas, a, conditions) = autoscaling("status.autoscaling").await;
    assert_eq!(
        (
            replicas,
            a.desired_frontends,
            a.current_frontends,
            a.ready_frontends
        ),
        (1, 1, 1, 1),
        "{a:?}"
    );
    assert!(a.sampled_at.is_some(), "{a:?}");
    let active = conditions.iter().find(|c| c.type_ == "ScalingActive");
    assert_eq!(
        active.map(|c| c.status.as_str()),
        Some("True"),
        "{conditions:?}"
    );
    assert!(frontend.polls.load(std::sync::atomic::Ordering::Relaxed) > 0);

    // A flood: one tenant with 200 requests in the system and a quota worth 2: nothing.
    // (Status is rewritten every 5 s while nothing changes: wait for the flood in it,
    // then a panic window more.)
    frontend.set(&[("flood", 200, Some(2.0)), ("legit", 1, Some(10.0))]);
    eventually("the flood in status.autoscaling.totalDemand", || async {
        let a = get::<ModelDeployment>(&ns, &name)
            .await?
            .status?
            .autoscaling?;
        (a.total_demand == "201.00").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let md_now = get::<ModelDeployment>(&ns, &name).await.unwrap();
    assert_eq!(md_now.spec.frontend.replicas, 1, "a flood bought replicas");
    let a = md_now.status.unwrap().autoscaling.unwrap();
    assert_eq!(
        a.stable_demand.parse::<f64>().map(|d| d <= 3.0),
        Ok(true),
        "{a:?}"
    );
    assert!(a.decisions.is_empty(), "{a:?}");

    // A legitimate spike: 12 more in-quota requests (14 counted, target 5): 3 frontends.
    let spike = std::time::Instant::now();
    frontend.set(&[("flood", 200, Some(2.0)), ("legit", 12, Some(20.0))]);
    let scaled = eventually("3 frontends", || async {
        let md = get::<ModelDeployment>(&ns, &name).await?;
        (md.spec.frontend.replicas == 3).then_some(md)
    })
    .await;
    let reaction = spike.elapsed();
    eventually("the frontend Deployment at 3", || async {
        let dep = get::<Deployment>(&ns, &format!("{name}-frontend")).await?;
        (dep.spec.replicas == Some(3)).then_some(())
    })
    .await;
    let (_, a, _) = autoscaling("the decision in status").await;
    // The panic window's mean ramps up as samples come in: 1 → 2 → 3, or 1 → 3 at once.
    let (first, up) = (
        a.decisions.first().expect("a decision"),
        a.decisions.last().unwrap(),
    );
    assert_eq!(
        (first.from, up.to, up.reason.as_str()),
        (1, 3, "Panic"),
        "{a:?}"
    );
    eprintln!("spike to scale-up write: {reaction:?}; decision {up:?}");
    drop(scaled);

    // The load ends: after the scale-down delay and the stable window, back to 1.
    frontend.set(&[]);
    eventually("back to 1 frontend", || async {
        let md = get::<ModelDeployment>(&ns, &name).await?;
        (md.spec.frontend.replicas == 1).then_some(())
    })
    .await;
    let down = eventually("the scale-down in status", || async {
        let a = get::<ModelDeployment>(&ns, &name)
            .await?
            .status?
            .autoscaling?;
        a.decisions.last().filter(|d| d.to == 1).cloned()
    })
    .await;
    assert!(down.from > 1, "{down:?}");

    // Events and metrics say the same.
    let events = cp
        .kubectl(&["get", "events", "-n", &ns.name, "-o", "json"])
        .await
        .unwrap();
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(
        events.contains("ScaledUp") && events.contains("ScaledDown"),
        "{events}"
    );
    assert!(
        events.contains("frontends 1 → ") && events.contains("→ 1 (down"),
        "{events}"
    );
    let metrics = operator.metrics().await.unwrap();
    assert!(
        metrics
            .contains("switchyard_operator_autoscaler_decisions_total{deployment=\"olmoe-tiny\""),
        "{metrics}"
    );

    // Turned off: the count is the user's again and status.autoscaling goes away.
    merge_patch(
        &ns,
        &name,
        serde_json::json!({"spec": {"autoscaling": {"enabled": false}}}),
    )
    .await;
    eventually("status.autoscaling removed", || async {
        let md = get::<ModelDeployment>(&ns, &name).await?;
        md.status?.autoscaling.is_none().then_some(())
    })
    .await;
    frontend.set(&[("legit", 40, None)]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let md_now = get::<ModelDeployment>(&ns, &name).await.unwrap();
    assert_eq!(md_now.spec.frontend.replicas, 1, "scaled while disabled");
}

/// Expert shards scale on their own signal: the autoscaler polls each shard's `/load`, a
/// saturated shard gets a copy (`spec.experts.replicaShards`, so the StatefulSet grows by
/// one), status and events say so, and the copy goes when the load does.
#[tokio::test]
async fn the_autoscaler_copies_a_busy_shard_and_removes_the_copy_when_it_idles() {
    let (cp, ns) = setup("op-autoscale-shards").await;
    let _operator = OperatorProcess::start(cp, &ns.name, "op-s", LEASE)
        .await
        .unwrap();
    let mut md = example("minimal.yaml");
    md.spec.experts.shards = 2;
    md.spec.autoscaling = Some(
        serde_json::from_value(serde_json::json!({
            "enabled": true,
            "frontend": {"minReplicas": 1, "maxReplicas": 4},
            "experts": {"minShards": 2, "maxShards": 4, "targetUtilizationPercent": 70},
            "stableWindowSeconds": 6,
            "panicWindowSeconds": 2,
            "scaleDownDelaySeconds": 3,
            "pollIntervalMilliseconds": 200,
        }))
        .unwrap(),
    );
    let md = create(&ns, &md).await;
    let name = md.name_any();
    let shards = [DemandServer::start().await, DemandServer::start().await];
    for (i, shard) in shards.iter().enumerate() {
        let i = u32::try_from(i).unwrap();
        shard.set_load(i, 0.1);
        ready_shard_pod(&ns, &md, i, shard.port).await;
    }
    eventually("both shards polled", || async {
        let a = get::<ModelDeployment>(&ns, &name)
            .await?
            .status?
            .autoscaling?;
        (a.reporting_shards == Some(2) && a.desired_shards == Some(2)).then_some(())
    })
    .await;

    // Shard 1 saturated: its experts need 2 holders at 70 %: pod 3 copies shard 1, so
    // 4 pods (pod 2 copies shard 0 on the way).
    shards[1].set_load(1, 1.0);
    let scaled = eventually("replicaShards 2", || async {
        let md = get::<ModelDeployment>(&ns, &name).await?;
        (md.spec.experts.replica_shards == 2).then_some(md)
    })
    .await;
    eventually("the shard StatefulSet at 4", || async {
        let sts = get::<StatefulSet>(&ns, &format!("{name}-experts")).await?;
        (sts.spec.replicas == Some(4)).then_some(())
    })
    .await;
    let a = eventually("the decision in status", || async {
        let a = get::<ModelDeployment>(&ns, &name)
            .await?
            .status?
            .autoscaling?;
        (a.desired_shards == Some(4) && a.current_shards == Some(4)).then_some(a)
    })
    .await;
    assert!(
        a.shard_utilization.is_some() && a.reporting_shards >= Some(2),
        "{a:?}"
    );
    let up = a
        .decisions
        .iter()
        .rev()
        .find(|d| d.role == "expert-shard")
        .expect("a shard decision");
    assert_eq!((up.from, up.to), (2, 4), "{a:?}");
    assert_eq!(
        scaled.spec.frontend.replicas, 1,
        "the frontends are not scaled by shard load"
    );

    // Idle again: after the delay and the stable window, the copies go.
    shards[1].set_load(1, 0.0);
    eventually("replicaShards back to 0", || async {
        let md = get::<ModelDeployment>(&ns, &name).await?;
        (md.spec.experts.replica_shards == 0).then_some(())
    })
    .await;
}

/// Shadow mode against the real API server: under a legitimate spike the recommendation
/// and its reason reach status within 2 s while the count never changes; switching to
/// Active applies it. Then a sybil flood (50 free tenants, each at its quota) buys only
/// the free tier's budget, and says so in ScalingLimited.
#[tokio::test]
async fn shadow_mode_recommends_without_scaling_and_tier_budgets_bound_a_sybil_flood() {
    let (cp, ns) = setup("op-shadow").await;
    let operator = OperatorProcess::start(cp, &ns.name, "op-s", LEASE)
        .await
        .unwrap();
    let frontend = DemandServer::start().await;
    let mut md = example("minimal.yaml");
    md.spec.admission = serde_json::from_value(serde_json::json!({
        "defaultTier": "free",
        "tiers": [{"name": "free", "requestsPerMinute": 6}, {"name": "pro"}],
    }))
    .unwrap();
    md.spec.autoscaling = Some(
        serde_json::from_value(serde_json::json!({
            "enabled": true,
            "mode": "Shadow",
            "frontend": {"minReplicas": 1, "maxReplicas": 8},
            "targetQueueDepth": 5,
            "stableWindowSeconds": 6,
            "panicWindowSeconds": 2,
            "scaleDownDelaySeconds": 3,
            "pollIntervalMilliseconds": 200,
            "tierBudgets": [{"tier": "free", "maxFrontendsPercent": 25}],
        }))
        .unwrap(),
    );
    let md = create(&ns, &md).await;
    let name = md.name_any();
    ready_frontend_pod(&ns, &md, frontend.port).await;
    eventually("the frontend polled in Shadow", || async {
        let status = get::<ModelDeployment>(&ns, &name).await?.status?;
        let active = status
            .conditions
            .iter()
            .find(|c| c.type_ == "ScalingActive")?;
        (active.reason == "Shadow" && status.autoscaling?.reporting_frontends == 1).then_some(())
    })
    .await;

    // A legitimate spike: 14 pro requests, target 5: 3 frontends recommended, none made.
    let spike = std::time::Instant::now();
    frontend.set_tiered(&[("acme".into(), "pro", 14, None)]);
    let a = eventually("the recommendation in status", || async {
        let a = get::<ModelDeployment>(&ns, &name)
            .await?
            .status?
            .autoscaling?;
        (a.desired_frontends == 3).then_some(a)
    })
    .await;
    let seen_after = spike.elapsed();
    let last = a.decisions.last().expect("a recommended decision");
    assert_eq!(
        (
            a.mode,
            a.reason.as_deref(),
            a.current_frontends,
            last.applied,
            last.to
        ),
        (
            Some(switchyard_operator::api::AutoscalingMode::Shadow),
            Some("Panic"),
            1,
            false,
            3
        ),
        "{a:?}"
    );
    eprintln!("shadow: the recommendation in status {seen_after:?} after the spike");
    assert!(
        seen_after < Duration::from_secs(2) + Duration::from_millis(500),
        "the recommendation took {seen_after:?} (poll 200 ms; allowing 500 ms for the test's own reads)"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let now = get::<ModelDeployment>(&ns, &name).await.unwrap();
    assert_eq!(now.spec.frontend.replicas, 1, "Shadow changed the count");
    let deployment = get::<Deployment>(&ns, &format!("{name}-frontend"))
        .await
        .unwrap();
    assert_eq!(deployment.spec.replicas, Some(1));
    let events = cp
        .kubectl(&["get", "events", "-n", &ns.name, "-o", "json"])
        .await
        .unwrap();
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(
        events.contains("RecommendScaleUp") && events.contains("shadow, not applied"),
        "{events}"
    );
    assert!(!events.contains("\"ScaledUp\""), "{events}");
    let metrics = operator.metrics().await.unwrap();
    assert!(metrics.contains("mode=\"Shadow\""), "{metrics}");

    // Switching to Active applies the current recommendation.
    merge_patch(
        &ns,
        &name,
        serde_json::json!({"spec": {"autoscaling": {"mode": "Active"}}}),
    )
    .await;
    eventually("Active applies the recommendation", || async {
        let md = get::<ModelDeployment>(&ns, &name).await?;
        (md.spec.frontend.replicas == 3).then_some(())
    })
    .await;

    // The load ends: back to 1 after the windows and the delay.
    frontend.set(&[]);
    eventually("back to 1 frontend", || async {
        let md = get::<ModelDeployment>(&ns, &name).await?;
        (md.spec.frontend.replicas == 1).then_some(())
    })
    .await;

    // The sybil flood: 50 free tenants, each at 100 % of its quota (cap 0.5 requests in
    // the system each: 25 in all, 5 frontends' worth), and nothing else. The free tier's
    // budget is 25 % of 8 = 2 frontends: the count goes up to 2, not to 5.
    let sybils: Vec<(String, &str, usize, Option<f64>)> = (0..50)
        .map(|i| (format!("sybil-{i}"), "free", 1, Some(0.5)))
        .collect();
    frontend.set_tiered(&sybils);
    let md_now = eventually("the count at the free tier's budget", || async {
        let md = get::<ModelDeployment>(&ns, &name).await?;
        (md.spec.frontend.replicas == 2).then_some(md)
    })
    .await;
    // It stays there (the windows see only the capped demand).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let md_now = get::<ModelDeployment>(&ns, &name)
        .await
        .filter(|md| md.spec.frontend.replicas == 2)
        .unwrap_or_else(|| panic!("the sybils bought more than 2: {md_now:?}"));
    let status = md_now.status.unwrap();
    let a = status.autoscaling.unwrap();
    let free = a.tiers.iter().find(|t| t.tier == "free").expect("free");
    assert_eq!(
        (
            free.demand.as_str(),
            free.counted.as_str(),
            free.budget_frontends
        ),
        ("25.00", "10.00", Some(2)),
        "{a:?}"
    );
    let limited = eventually("ScalingLimited=TierBudget", || async {
        let status = get::<ModelDeployment>(&ns, &name).await?.status?;
        status
            .conditions
            .into_iter()
            .find(|c| c.type_ == "ScalingLimited" && c.reason == "TierBudget")
    })
    .await;
    assert!(limited.message.contains("tier free"), "{limited:?}");
    // A paid spike during the flood still gets its frontends: 20 pro requests on top.
    let mut both = sybils.clone();
    both.push(("acme".into(), "pro", 20, None));
    frontend.set_tiered(&both);
    eventually(
        "the pro spike's 4 frontends on top of the free tier's 2",
        || async {
            let md = get::<ModelDeployment>(&ns, &name).await?;
            (md.spec.frontend.replicas == 6).then_some(())
        },
    )
    .await;
    drop(operator);
}

/// `GET path` on the operator's metrics port: the status and the JSON body.
async fn read(operator: &OperatorProcess, path: String) -> (u16, serde_json::Value) {
    let response = operator.http(&path).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap())
}

/// The KEDA ScaledObject in docs/autoscaling.md against the real operator's endpoint: its
/// `metrics-api` trigger's `valueLocation` resolves to the legitimate demand, its URL is
/// the endpoint's shape for its scale target, and its target is the queue depth.
#[tokio::test]
async fn the_keda_trigger_in_the_docs_reads_the_operators_endpoint() {
    let (_cp, ns) = setup("op-keda").await;
    // A standby answers too: start two, the second stands by.
    let first = OperatorProcess::start(_cp, &ns.name, "op-k1", LEASE)
        .await
        .unwrap();
    let standby = OperatorProcess::start(_cp, &ns.name, "op-k2", LEASE)
        .await
        .unwrap();
    let frontend = DemandServer::start().await;
    // Autoscaling off: KEDA owns the count; the endpoint still answers.
    let md = create(&ns, &example("minimal.yaml")).await;
    let name = md.name_any();

    // The documented ScaledObject.
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/autoscaling.md"),
    )
    .unwrap();
    let scaled_object: serde_json::Value = docs
        .split("```yaml")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .find(|block| block.contains("kind: ScaledObject"))
        .map(|block| serde_yaml::from_str(block).expect("the ScaledObject parses"))
        .expect("docs/autoscaling.md has a ScaledObject");
    let target = &scaled_object["spec"]["scaleTargetRef"];
    assert_eq!(
        (target["apiVersion"].as_str(), target["kind"].as_str()),
        (Some("switchyard.dev/v1alpha1"), Some("ModelDeployment"))
    );
    let trigger = &scaled_object["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "metrics-api");
    let meta = &trigger["metadata"];
    let url = meta["url"].as_str().unwrap();
    let path = format!(
        "/autoscaling/{}/{}",
        scaled_object["metadata"]["namespace"].as_str().unwrap(),
        target["name"].as_str().unwrap()
    );
    assert!(
        url.ends_with(&path)
            && url.starts_with("http://switchyard-metrics.switchyard-system.svc:8080/"),
        "{url} is the chart's metrics Service and {path}"
    );
    assert_eq!(
        meta["targetValue"].as_str(),
        Some(
            switchyard_operator::api::AutoscalingSpec::default()
                .target_queue_depth
                .to_string()
                .as_str()
        )
    );
    let location = meta["valueLocation"].as_str().unwrap();
    let resolve = |doc: &serde_json::Value| {
        location
            .split('.')
            .fold(doc.clone(), |v, key| v[key].clone())
            .as_f64()
    };

    let ours = format!("/autoscaling/{}/{name}", ns.name);
    // No ready frontend: 503, no signal (not zero demand).
    let (status, body) = read(&first, ours.clone()).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no ready frontend")
    );
    let (status, body) = read(&first, format!("/autoscaling/{}/nope", ns.name)).await;
    assert_eq!(status, 404, "{body}");

    // Demand: a flood over quota and legitimate callers.
    ready_frontend_pod(&ns, &md, frontend.port).await;
    frontend.set(&[("flood", 200, Some(2.0)), ("legit", 12, None)]);
    for operator in [&first, &standby] {
        let (status, body) = read(operator, ours.clone()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(resolve(&body), Some(14.0), "{location} in {body}");
        assert_eq!(body["frontend"]["allDemand"], 212.0, "{body}");
        assert_eq!(body["frontend"]["desiredReplicas"], 3, "{body}");
        assert_eq!(body["targetQueueDepth"], 5, "{body}");
        assert!(body.get("mode").is_none(), "autoscaling is off: {body}");
    }
}
