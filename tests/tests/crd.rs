//! Tier 2: the ModelDeployment CRD installed in the real API server, which validates and
//! defaults objects itself (OpenAPI schema + CEL).

use kube::api::{Api, DynamicObject, PostParams};
use kube::core::ApiResource;
use switchyard_operator::api::ModelDeployment;
use switchyard_tests::{ControlPlane, TestNamespace};

/// A namespace in a control plane that serves the checked-in ModelDeployment CRD.
async fn namespace_with_crd(prefix: &str) -> TestNamespace {
    let cp = ControlPlane::shared().await.unwrap();
    cp.install_crd(switchyard_tests::MODEL_DEPLOYMENT_CRD)
        .await
        .unwrap();
    cp.namespace(prefix).await.unwrap()
}

fn api(ns: &TestNamespace) -> Api<DynamicObject> {
    Api::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &ApiResource::erase::<ModelDeployment>(&()),
    )
}

fn object(yaml: &str) -> DynamicObject {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("test manifest is not YAML: {e}\n{yaml}"))
}

const VALID: &str = "
apiVersion: switchyard.dev/v1alpha1
kind: ModelDeployment
metadata: {name: md}
spec:
  image: switchyard/worker:test
  model: {pvc: {claimName: models}}
";

/// `VALID` with `path` (dotted, under spec) set to the YAML `value`.
fn valid_with(path: &str, value: &str) -> DynamicObject {
    let mut obj = object(VALID);
    let value: serde_json::Value = serde_yaml::from_str(value).unwrap();
    let mut at = &mut obj.data["spec"];
    let parts: Vec<&str> = path.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        if at.get(*part).is_none() {
            at[*part] = serde_json::json!({});
        }
        at = &mut at[*part];
    }
    at[*parts.last().unwrap()] = value;
    obj
}

#[tokio::test]
async fn examples_are_accepted_and_defaults_are_filled_in_by_the_api_server() {
    let ns = namespace_with_crd("crd-examples").await;
    let api = api(&ns);
    for file in ["minimal.yaml", "full.yaml"] {
        let path = format!("{}/../examples/{file}", env!("CARGO_MANIFEST_DIR"));
        let obj = object(&std::fs::read_to_string(&path).unwrap());
        api.create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("examples/{file} refused: {e}"));
    }
    let minimal = api.get("olmoe-tiny").await.unwrap();
    let spec = &minimal.data["spec"];
    assert_eq!(spec["frontend"]["replicas"], 1);
    assert_eq!(spec["experts"]["shards"], 1);
    assert_eq!(spec["experts"]["redundantExperts"], 0);
    assert_eq!(spec["serving"]["port"], 50051);
    assert_eq!(spec["serving"]["maxTokensPerRequest"], 4096);
    assert_eq!(spec["model"]["dtype"], "bf16");
    assert_eq!(spec["model"]["quantization"], "none");
    assert_eq!(spec["admission"]["queue"]["maxQueued"], 256);
}

/// Each case: a change to a valid manifest, and the field the API server must name.
const INVALID: &[(&str, &str, &str, &str)] = &[
    // (what, spec path, YAML value, field named in the message)
    (
        "negative replicas",
        "frontend.replicas",
        "-1",
        "spec.frontend.replicas",
    ),
    ("zero shards", "experts.shards", "0", "spec.experts.shards"),
    (
        "unknown quantization",
        "model.quantization",
        "int3",
        "spec.model.quantization",
    ),
    ("unknown dtype", "model.dtype", "fp8", "spec.model.dtype"),
    ("no model source", "model", "{dtype: bf16}", "spec.model"),
    (
        "two model sources",
        "model",
        "{pvc: {claimName: models}, hostPath: {path: /models}}",
        "spec.model",
    ),
    (
        "a request quota of 0",
        "admission",
        "{tiers: [{name: free, requestsPerMinute: 0}]}",
        "spec.admission.tiers[0].requestsPerMinute",
    ),
    (
        "a token quota of 0",
        "admission",
        "{tiers: [{name: free, tokensPerMinute: 0}]}",
        "spec.admission.tiers[0].tokensPerMinute",
    ),
    (
        "an unknown tier reference",
        "admission",
        "{defaultTier: gold, tiers: [{name: silver}]}",
        "spec.admission.defaultTier",
    ),
    (
        "a default tier without tiers",
        "admission",
        "{defaultTier: gold}",
        "spec.admission.defaultTier",
    ),
    (
        "two tiers with one name",
        "admission",
        "{tiers: [{name: free}, {name: free}]}",
        "spec.admission.tiers[1]",
    ),
    (
        "an API-key Secret without tiers",
        "admission",
        "{apiKeySecret: {name: keys}}",
        "spec.admission.tiers",
    ),
    (
        "autoscaling min > max",
        "autoscaling",
        "{frontend: {minReplicas: 5, maxReplicas: 2}}",
        "spec.autoscaling.frontend.minReplicas",
    ),
    (
        "replicas outside the autoscaling bounds",
        "autoscaling",
        "{enabled: true, frontend: {minReplicas: 2, maxReplicas: 4}}",
        "spec.frontend.replicas",
    ),
    (
        "a panic window as long as the stable window",
        "autoscaling",
        "{stableWindowSeconds: 30, panicWindowSeconds: 30}",
        "spec.autoscaling.panicWindowSeconds",
    ),
    (
        "a privileged port",
        "serving.port",
        "80",
        "spec.serving.port",
    ),
    (
        "the workers' metrics port as the gRPC port",
        "serving.port",
        "9090",
        "spec.serving.port",
    ),
    (
        "a request limit above the context length",
        "serving",
        "{maxContextLength: 1024, maxTokensPerRequest: 2048}",
        "spec.serving.maxTokensPerRequest",
    ),
    (
        "a group size without int4",
        "model",
        "{pvc: {claimName: models}, quantizationGroupSize: 64}",
        "spec.model.quantizationGroupSize",
    ),
    (
        "an unsupported group size",
        "model",
        "{pvc: {claimName: models}, quantization: int4, quantizationGroupSize: 100}",
        "spec.model.quantizationGroupSize",
    ),
    (
        "a relative model path",
        "model",
        "{pvc: {claimName: models, path: models/x}}",
        "spec.model.pvc.path",
    ),
    (
        "a '..' segment in a model path",
        "model",
        "{hostPath: {path: /models/../etc}}",
        "spec.model.hostPath.path",
    ),
    ("an empty image", "image", "''", "spec.image"),
];

#[tokio::test]
async fn invalid_manifests_are_refused_with_a_message_naming_the_field() {
    let ns = namespace_with_crd("crd-invalid").await;
    let api = api(&ns);
    let mut failures = Vec::new();
    for (i, (what, path, value, field)) in INVALID.iter().enumerate() {
        let mut obj = valid_with(path, value);
        obj.metadata.name = Some(format!("invalid-{i}"));
        match api.create(&PostParams::default(), &obj).await {
            Err(kube::Error::Api(status)) if status.code == 422 => {
                if !status.message.contains(field) {
                    failures.push(format!(
                        "{what}: message does not name {field}: {}",
                        status.message
                    ));
                }
            }
            Err(e) => failures.push(format!(
                "{what}: expected 422 Invalid naming {field}, got {e}"
            )),
            Ok(_) => failures.push(format!("{what}: accepted, expected refusal naming {field}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The base manifest itself is fine, so each refusal above is due to its one change.
    let created = api
        .create(&PostParams::default(), &object(VALID))
        .await
        .unwrap();
    assert_eq!(
        created.data["spec"]["model"]["pvc"]["path"], "/",
        "default model path"
    );
}

#[tokio::test]
async fn a_manifest_without_a_model_is_refused_and_one_without_an_image_is_accepted() {
    let ns = namespace_with_crd("crd-required").await;
    let obj = object(
        "
apiVersion: switchyard.dev/v1alpha1
kind: ModelDeployment
metadata: {name: empty}
spec: {}
",
    );
    match api(&ns).create(&PostParams::default(), &obj).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(status.message.contains("spec.model"), "{}", status.message);
            assert!(!status.message.contains("spec.image"), "{}", status.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // spec.image is optional: the operator fills in the worker image of its own release.
    let obj = object(
        "
apiVersion: switchyard.dev/v1alpha1
kind: ModelDeployment
metadata: {name: no-image}
spec: {model: {pvc: {claimName: models}}}
",
    );
    let created = api(&ns)
        .create(&PostParams::default(), &obj)
        .await
        .expect("a manifest without spec.image is accepted");
    assert!(
        created.data["spec"].get("image").is_none(),
        "{:?}",
        created.data
    );
}
