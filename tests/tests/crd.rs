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
    // No shards: the frontends hold the whole model (a dense checkpoint needs nothing else).
    assert_eq!(spec["experts"]["shards"], 0);
    assert_eq!(spec["experts"]["redundantExperts"], 0);
    assert_eq!(spec["experts"]["placement"]["strategy"], "evenSpread");
    assert_eq!(spec["serving"]["port"], 50051);
    assert_eq!(spec["serving"]["maxTokensPerRequest"], 4096);
    assert_eq!(spec["model"]["dtype"], "bf16");
    assert_eq!(spec["model"]["quantization"], "auto");
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
    (
        "negative shards",
        "experts.shards",
        "-1",
        "spec.experts.shards",
    ),
    (
        "too many shards",
        "experts.shards",
        "257",
        "spec.experts.shards",
    ),
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
        "a tier budget for a tier admission does not have",
        "autoscaling",
        "{tierBudgets: [{tier: gold, maxFrontendsPercent: 10}]}",
        "spec.autoscaling.tierBudgets",
    ),
    (
        "a tier budget over 100 %",
        "autoscaling",
        "{tierBudgets: [{tier: anonymous, maxFrontendsPercent: 101}]}",
        "spec.autoscaling.tierBudgets[0].maxFrontendsPercent",
    ),
    (
        "an unknown autoscaling mode",
        "autoscaling",
        "{mode: Passive}",
        "spec.autoscaling.mode",
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
        "a group size without int8 or int4",
        "model",
        "{pvc: {claimName: models}, quantizationGroupSize: 32}",
        "spec.model.quantizationGroupSize",
    ),
    (
        "a group size the quantized types do not have",
        "model",
        "{pvc: {claimName: models}, quantization: int4, quantizationGroupSize: 128}",
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
    (
        "shard copies without shards",
        "experts",
        "{shards: 0, replicaShards: 2}",
        "spec.experts.replicaShards",
    ),
    (
        "spare expert slots without the balanced placement",
        "experts.redundantExperts",
        "8",
        "spec.experts.redundantExperts",
    ),
    (
        "a rebalance threshold at perfect balance",
        "experts",
        "{shards: 2, placement: {strategy: balanced, rebalance: {imbalancePercent: 100}}}",
        "spec.experts.placement.rebalance.imbalancePercent",
    ),
    (
        "an unknown placement strategy",
        "experts",
        "{shards: 2, placement: {strategy: random}}",
        "spec.experts.placement.strategy",
    ),
    (
        "expert-shard autoscaling without shards to copy",
        "autoscaling",
        "{enabled: true, frontend: {minReplicas: 1, maxReplicas: 4}, experts: {minShards: 1, maxShards: 2}}",
        "spec.autoscaling.experts",
    ),
    (
        "scale to zero (no activator)",
        "autoscaling",
        "{frontend: {minReplicas: 0, maxReplicas: 4}}",
        "spec.autoscaling.frontend.minReplicas",
    ),
    (
        "a panic threshold that panics at the current count",
        "autoscaling",
        "{panicThresholdPercent: 100}",
        "spec.autoscaling.panicThresholdPercent",
    ),
    (
        "a poll interval below 100 ms",
        "autoscaling",
        "{pollIntervalMilliseconds: 50}",
        "spec.autoscaling.pollIntervalMilliseconds",
    ),
    (
        "Redis quotas without an address",
        "admission",
        "{quotaScope: {mode: Redis}}",
        "spec.admission.quotaScope.redis",
    ),
    (
        "a Redis address without Redis quotas",
        "admission",
        "{quotaScope: {redis: {address: 'redis:6379'}}}",
        "spec.admission.quotaScope.redis",
    ),
    (
        "a Redis address without a port",
        "admission",
        "{quotaScope: {mode: Redis, redis: {address: redis}}}",
        "spec.admission.quotaScope.redis.address",
    ),
];

/// Spare expert slots act only with the balanced placement, and are refused saying so
/// without it, not accepted and ignored; the balanced placement's defaults fill in.
#[tokio::test]
async fn spare_expert_slots_need_the_balanced_placement_whose_defaults_fill_in() {
    let ns = namespace_with_crd("crd-unbuilt").await;
    let api = api(&ns);
    let mut obj = valid_with("experts", "{shards: 2, redundantExperts: 1}");
    obj.metadata.name = Some("unbuilt-0".into());
    match api.create(&PostParams::default(), &obj).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(
                status.message.contains(
                    "experts.redundantExperts needs experts.placement.strategy: balanced"
                ),
                "{}",
                status.message
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let mut obj = valid_with(
        "experts",
        "{shards: 2, redundantExperts: 2, placement: {strategy: balanced}}",
    );
    obj.metadata.name = Some("balanced".into());
    let created = api
        .create(&PostParams::default(), &obj)
        .await
        .expect("spare slots with the balanced placement");
    let r = &created.data["spec"]["experts"]["placement"]["rebalance"];
    assert_eq!(
        (
            r["imbalancePercent"].as_i64(),
            r["sustainSeconds"].as_i64(),
            r["minIntervalSeconds"].as_i64()
        ),
        (Some(115), Some(30), Some(300)),
        "{r}"
    );
    // Their inert defaults are accepted, and so is the frontend autoscaler.
    let mut obj = valid_with(
        "autoscaling",
        "{enabled: false, frontend: {minReplicas: 1, maxReplicas: 4}}",
    );
    obj.metadata.name = Some("unbuilt-off".into());
    api.create(&PostParams::default(), &obj)
        .await
        .expect("defaults accepted");
    let mut obj = valid_with(
        "autoscaling",
        "{enabled: true, frontend: {minReplicas: 1, maxReplicas: 4}}",
    );
    obj.metadata.name = Some("autoscaled".into());
    let created = api
        .create(&PostParams::default(), &obj)
        .await
        .expect("frontend autoscaling accepted");
    let a = &created.data["spec"]["autoscaling"];
    assert_eq!(
        (
            a["panicWindowSeconds"].as_i64(),
            a["panicThresholdPercent"].as_i64(),
            a["pollIntervalMilliseconds"].as_i64()
        ),
        (Some(2), Some(200), Some(500)),
        "the defaults: a 2 s panic window, 2× threshold, polled every 500 ms"
    );
    assert_eq!(a["mode"], "Active", "the default mode");
    // In Shadow the count is someone else's (the user's, an HPA's, KEDA's): it may lie
    // outside the bounds, and budgets may name anonymous callers.
    let mut obj = valid_with(
        "autoscaling",
        "{enabled: true, mode: Shadow, frontend: {minReplicas: 2, maxReplicas: 4}, \
         tierBudgets: [{tier: anonymous, maxFrontendsPercent: 0}]}",
    );
    obj.metadata.name = Some("shadow".into());
    api.create(&PostParams::default(), &obj)
        .await
        .expect("Shadow with the count outside the bounds accepted");
}

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

/// Every field of the CRD (spec and status, at any depth) is named by some test — a Rust
/// test source of the workspace, or an example manifest the tests apply — so a field
/// cannot be added without a test that touches it. (Issue 15: no field without an effect.)
#[test]
fn every_crd_field_is_referenced_by_a_test() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let crd: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("crds/modeldeployment.yaml")).expect("crds/"),
    )
    .expect("CRD YAML");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
    let mut fields = Vec::new();
    // Kubernetes' own types, passed to the pods as they are: their name is checked, not
    // every field Kubernetes defines inside them.
    const KUBERNETES_TYPES: &[&str] = &[
        "affinity",
        "tolerations",
        "resources",
        "topologySpreadConstraints",
        "conditions",
        // NetworkPolicyPeer, copied into the NetworkPolicies' metrics rule.
        "scrapeFrom",
    ];
    fn walk(node: &serde_json::Value, path: &str, out: &mut Vec<(String, String)>) {
        if let Some(props) = node["properties"].as_object() {
            for (name, child) in props {
                let here = format!("{path}.{name}");
                out.push((here.clone(), name.clone()));
                if !KUBERNETES_TYPES.contains(&name.as_str()) {
                    walk(child, &here, out);
                }
            }
        }
        walk_items(node, path, out);
    }
    fn walk_items(node: &serde_json::Value, path: &str, out: &mut Vec<(String, String)>) {
        if node["items"].is_object() {
            walk(&node["items"], &format!("{path}[]"), out);
        }
        if node["additionalProperties"].is_object() {
            walk(&node["additionalProperties"], &format!("{path}{{}}"), out);
        }
    }
    for top in ["spec", "status"] {
        walk(&schema[top], top, &mut fields);
    }
    assert!(fields.len() > 50, "the walk found only {}", fields.len());
    // What the tests contain: every .rs file under tests/ and operator/src/ (their test
    // modules), and the example manifests the tests apply.
    let mut corpus = String::new();
    let mut stack = vec![
        root.join("tests/tests"),
        root.join("tests/src"),
        root.join("operator/src"),
        root.join("examples"),
    ];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs" || e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                // In operator/src only the test modules count (a `tests.rs` file, or what
                // follows `#[cfg(test)]`), not the types themselves.
                let in_operator = path.starts_with(root.join("operator/src"));
                let test_file = path.file_name().is_some_and(|n| n == "tests.rs");
                let text = match text.find("#[cfg(test)]") {
                    _ if in_operator && test_file => text,
                    Some(i) if in_operator => text[i..].to_string(),
                    _ if path.starts_with(root.join("operator/src")) => String::new(),
                    _ => text,
                };
                corpus.push_str(&text);
            }
        }
    }
    let snake = |name: &str| {
        let mut out = String::new();
        for c in name.chars() {
            if c.is_ascii_uppercase() {
                out.push('_');
                out.push(c.to_ascii_lowercase());
            } else {
                out.push(c);
            }
        }
        out
    };
    let unreferenced: Vec<&String> = fields
        .iter()
        .filter(|(_, name)| !corpus.contains(name.as_str()) && !corpus.contains(&snake(name)))
        .map(|(path, _)| path)
        .collect();
    assert!(
        unreferenced.is_empty(),
        "CRD fields no test names: {unreferenced:?}"
    );
}
