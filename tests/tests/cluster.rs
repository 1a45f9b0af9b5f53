//! Tier 3: controller-manager, scheduler and kwok GPU nodes on the real API server.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodTemplateSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use switchyard_tests::Cluster;
use switchyard_tests::cluster::{GPU_RESOURCE, POOL_LABEL, kwok_toleration};

const WAIT: Duration = Duration::from_secs(120);

fn gpu_deployment(name: &str, pool: &str, replicas: i32) -> Deployment {
    let labels: BTreeMap<String, String> = [("app".to_string(), name.to_string())].into();
    Deployment {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        spec: DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    node_selector: Some([(POOL_LABEL.to_string(), pool.to_string())].into()),
                    tolerations: Some(vec![kwok_toleration()]),
                    containers: vec![Container {
                        name: "worker".into(),
                        image: Some("switchyard/worker:test".into()),
                        resources: Some(ResourceRequirements {
                            limits: Some([(GPU_RESOURCE.to_string(), Quantity("1".into()))].into()),
                            ..ResourceRequirements::default()
                        }),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The scheduler's reason for not placing a pod, if it has given one.
fn unschedulable_message(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find_map(|c| {
            (c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable"))
            .then(|| c.message.clone().unwrap_or_default())
        })
}

/// Polls `f` every 250 ms until it returns `Some`, or panics after `WAIT` with `what` and
/// the pods as they were last seen.
async fn eventually<T>(pods: &Api<Pod>, what: &str, mut f: impl FnMut(&[Pod]) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let list = pods.list(&ListParams::default()).await.unwrap().items;
        if let Some(value) = f(&list) {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            let seen: Vec<_> = list
                .iter()
                .map(|p| {
                    (
                        p.metadata.name.clone(),
                        phase(p).to_string(),
                        p.status.clone(),
                    )
                })
                .collect();
            panic!("timed out after {WAIT:?} waiting for {what}; pods: {seen:#?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn gpu_pods_run_on_kwok_nodes_until_gpus_run_out_and_are_garbage_collected() {
    let cluster = Cluster::shared().await.unwrap();
    let ns = cluster.namespace("gpu-deploy").await.unwrap();
    // Two nodes with one GPU each, for this test alone.
    let pool = ns.name.clone();
    let nodes = cluster
        .add_gpu_nodes(&ns.client, &pool, 2, 1)
        .await
        .unwrap();

    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    deployments
        .create(&PostParams::default(), &gpu_deployment("experts", &pool, 2))
        .await
        .unwrap();

    let placed = eventually(&pods, "2 Running and Ready pods", |pods| {
        let running: Vec<_> = pods
            .iter()
            .filter(|p| phase(p) == "Running" && is_ready(p))
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        (running.len() == 2).then_some(running)
    })
    .await;
    let mut placed_sorted = placed.clone();
    placed_sorted.sort();
    assert_eq!(placed_sorted, nodes, "one GPU pod per one-GPU node");

    // A third replica has no GPU left in the pool.
    deployments
        .patch(
            "experts",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    let message = eventually(&pods, "a third pod Pending as Unschedulable", |pods| {
        let pending: Vec<_> = pods.iter().filter(|p| phase(p) == "Pending").collect();
        let running = pods.iter().filter(|p| phase(p) == "Running").count();
        match pending.as_slice() {
            [pod] if running == 2 => unschedulable_message(pod),
            _ => None,
        }
    })
    .await;
    assert!(
        message.contains(&format!("Insufficient {GPU_RESOURCE}")),
        "the scheduler should blame the GPUs: {message}"
    );

    // Deleting the Deployment deletes its ReplicaSet and pods through garbage collection.
    deployments
        .delete("experts", &DeleteParams::background())
        .await
        .unwrap();
    eventually(&pods, "every pod garbage-collected", |pods| {
        pods.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn default_pool_nodes_advertise_gpus() {
    let cluster = Cluster::shared().await.unwrap();
    let client = cluster.control_plane().client().await.unwrap();
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client);
    let list = nodes
        .list(&ListParams::default().labels(&format!("{POOL_LABEL}=default")))
        .await
        .unwrap();
    assert_eq!(
        list.items.len(),
        switchyard_tests::cluster::DEFAULT_GPU_NODES
    );
    for node in list.items {
        let allocatable = node.status.and_then(|s| s.allocatable).unwrap();
        assert_eq!(
            allocatable[GPU_RESOURCE].0,
            switchyard_tests::cluster::GPUS_PER_DEFAULT_NODE.to_string()
        );
    }
}

#[tokio::test]
async fn a_model_deployment_runs_on_kwok_gpu_nodes_becomes_ready_and_is_garbage_collected() {
    use switchyard_operator::api::ModelDeployment;
    let cluster = Cluster::shared().await.unwrap();
    let cp = cluster.control_plane();
    cp.install_crd(switchyard_tests::MODEL_DEPLOYMENT_CRD)
        .await
        .unwrap();
    let ns = cluster.namespace("md-cluster").await.unwrap();
    let _operator =
        switchyard_tests::OperatorProcess::start(cp, &ns.name, "op", Duration::from_secs(4))
            .await
            .unwrap();
    let md: ModelDeployment = serde_yaml::from_str(
        "
apiVersion: switchyard.dev/v1alpha1
kind: ModelDeployment
metadata: {name: gpu-md}
spec:
  image: switchyard/worker:test
  model: {hostPath: {path: /models/tiny}}
  frontend:
    replicas: 2
    resources: {limits: {nvidia.com/gpu: '1'}}
    nodeSelector: {switchyard.dev/test-pool: default}
    tolerations: [{key: kwok.x-k8s.io/node, operator: Exists, effect: NoSchedule}]
  experts:
    shards: 2
    resources: {limits: {nvidia.com/gpu: '1'}}
    nodeSelector: {switchyard.dev/test-pool: default}
    tolerations: [{key: kwok.x-k8s.io/node, operator: Exists, effect: NoSchedule}]
",
    )
    .unwrap();
    let mds: Api<ModelDeployment> = Api::namespaced(ns.client.clone(), &ns.name);
    mds.create(&PostParams::default(), &md).await.unwrap();

    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    eventually(&pods, "4 Running GPU pods on kwok nodes", |pods| {
        let running = pods
            .iter()
            .filter(|p| phase(p) == "Running" && is_ready(p))
            .filter(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .is_some_and(|n| n.starts_with("kwok-default-"))
            })
            .count();
        (running == 4).then_some(())
    })
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let md = mds.get("gpu-md").await.unwrap();
        let ready = md
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.clone());
        if ready.as_deref() == Some("True") {
            let status = md.status.unwrap();
            assert_eq!(status.frontend.summary.as_deref(), Some("2/2"));
            assert_eq!(status.experts.summary.as_deref(), Some("2/2"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Ready never became True: {:?}",
            md.status
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    mds.delete("gpu-md", &DeleteParams::background())
        .await
        .unwrap();
    eventually(&pods, "every pod garbage-collected", |pods| {
        pods.is_empty().then_some(())
    })
    .await;
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    let configmaps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(ns.client.clone(), &ns.name);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deployments
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len()
            + configmaps
                .list(&ListParams::default().labels("switchyard.dev/model-deployment=gpu-md"))
                .await
                .unwrap()
                .items
                .len();
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} owned objects left"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
