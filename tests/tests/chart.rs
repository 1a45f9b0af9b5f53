//! The Helm chart (`charts/switchyard`): it lints, carries the generated CRD, renders
//! objects a real API server accepts (Pod Security `restricted` included), refuses bad
//! values by name, and grants the operator exactly the permissions its code uses.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Output;

use serde::Deserialize;
use serde_json::Value;
use switchyard_tests::ControlPlane;
use switchyard_tests::process::TempDir;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/switchyard");
const RELEASE: &str = "sy";

/// Values that turn every optional part of the chart on.
const EVERYTHING: &[&str] = &[
    "serviceMonitor.enabled=true",
    "serviceMonitor.interval=15s",
    "serviceMonitor.scrapeTimeout=10s",
    "serviceMonitor.labels.release=prometheus",
    "workerImage=registry.example.com/switchyard/worker:0.1.0",
    "image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    "imagePullSecrets[0].name=regcred",
    "podAnnotations.example\\.com/team=ml",
    "nodeSelector.kubernetes\\.io/os=linux",
    "tolerations[0].key=dedicated",
    "tolerations[0].operator=Equal",
    "tolerations[0].value=ops",
    "tolerations[0].effect=NoSchedule",
    "priorityClassName=system-cluster-critical",
    "podDisruptionBudget.maxUnavailable=50%",
    "leaderElection.leaseName=switchyard-leader",
    "leaderElection.leaseDurationSeconds=30",
    "logLevel=info\\,switchyard_operator=debug",
    "serviceAccount.annotations.example\\.com/role=operator",
];

fn helm(args: &[&str]) -> Output {
    let helm = switchyard_tests::tools::tool("helm").unwrap();
    std::process::Command::new(&helm)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {} {}: {e}", helm.display(), args.join(" ")))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `helm template` with `--set` values, in `namespace`; panics with helm's message on failure.
fn render(namespace: &str, sets: &[&str]) -> String {
    let output = helm(&template_args(namespace, sets));
    assert!(
        output.status.success(),
        "helm template {sets:?} failed:\n{}",
        text(&output)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn template_args<'a>(namespace: &'a str, sets: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["template", RELEASE, CHART, "--namespace", namespace];
    for set in sets {
        args.extend(["--set", set]);
    }
    args
}

/// The rendered objects, as JSON values (empty documents left out).
fn objects(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("rendered YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name_suffix: &str) -> Option<&'a Value> {
    objects.iter().find(|o| {
        o["kind"] == kind
            && o["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with(name_suffix))
    })
}

fn kinds(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"]).replace('"', ""))
        .collect()
}

#[test]
fn helm_lint_strict_passes_with_defaults_and_with_every_option() {
    let output = helm(&["lint", "--strict", CHART]);
    assert!(
        output.status.success(),
        "helm lint --strict failed:\n{}",
        text(&output)
    );
    let mut args = vec!["lint", "--strict", CHART];
    for set in EVERYTHING {
        args.extend(["--set", set]);
    }
    let output = helm(&args);
    assert!(
        output.status.success(),
        "helm lint --strict with every option failed:\n{}",
        text(&output)
    );
}

#[test]
fn the_charts_crd_is_the_generated_crd() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let generated = std::fs::read(root.join("crds/modeldeployment.yaml")).unwrap();
    let in_chart =
        std::fs::read(root.join("charts/switchyard/crds/modeldeployment.yaml")).unwrap_or_default();
    assert!(
        generated == in_chart,
        "charts/switchyard/crds/modeldeployment.yaml differs from crds/modeldeployment.yaml: \
         copy it (`cp crds/modeldeployment.yaml charts/switchyard/crds/modeldeployment.yaml`) and commit both"
    );
}

/// A ServiceMonitor CRD with the part of the Prometheus Operator schema the chart uses (same
/// types and patterns), so the API server checks the rendered ServiceMonitor strictly.
const SERVICE_MONITOR_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          required: [spec]
          properties:
            apiVersion: {type: string}
            kind: {type: string}
            metadata: {type: object}
            spec:
              type: object
              required: [selector]
              properties:
                selector:
                  type: object
                  properties:
                    matchLabels: {type: object, additionalProperties: {type: string}}
                namespaceSelector:
                  type: object
                  properties:
                    any: {type: boolean}
                    matchNames: {type: array, items: {type: string}}
                endpoints:
                  type: array
                  items:
                    type: object
                    properties:
                      port: {type: string}
                      path: {type: string}
                      scheme: {type: string, enum: [http, https, HTTP, HTTPS]}
                      interval: {type: string, pattern: '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'}
                      scrapeTimeout: {type: string, pattern: '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'}
"#;

#[tokio::test]
async fn rendered_objects_pass_a_server_side_dry_run_under_pod_security_restricted() {
    let cp = ControlPlane::shared().await.unwrap();
    cp.install_crd(switchyard_tests::MODEL_DEPLOYMENT_CRD)
        .await
        .unwrap();
    let dir = TempDir::new("chart").unwrap();
    let service_monitor_crd = dir.path().join("servicemonitor-crd.yaml");
    std::fs::write(&service_monitor_crd, SERVICE_MONITOR_CRD).unwrap();
    cp.install_crd(&service_monitor_crd).await.unwrap();

    let ns = cp.namespace("chart").await.unwrap();
    // What the chart promises: the operator runs in a namespace that enforces `restricted`.
    // `warn` too, so a Deployment whose pods would be refused shows up as a warning.
    let output = cp
        .kubectl(&[
            "label",
            "namespace",
            &ns.name,
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/warn=restricted",
        ])
        .await
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    // The `helm test` Pod runs as the namespace's `default` ServiceAccount, which a real
    // cluster's controller-manager creates; this control plane has none, so create it.
    let output = cp
        .kubectl(&["create", "serviceaccount", "default", "-n", &ns.name])
        .await
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));

    let watch_ns = format!("watchNamespace={}", ns.name);
    let mut everything = EVERYTHING.to_vec();
    everything.push(&watch_ns);
    let cases: [(&str, &[&str]); 3] = [
        ("defaults", &[]),
        ("every option, one watched namespace", &everything),
        (
            "one replica without leader election, no PDB",
            &[
                "replicaCount=1",
                "leaderElection.enabled=false",
                "podDisruptionBudget.enabled=false",
            ],
        ),
    ];
    for (what, sets) in cases {
        let yaml = render(&ns.name, sets);
        let rendered = objects(&yaml);
        let file = dir.path().join("rendered.yaml");
        std::fs::write(&file, &yaml).unwrap();
        let output = cp
            .kubectl(&[
                "apply",
                "--dry-run=server",
                "-n",
                &ns.name,
                "-f",
                file.to_str().unwrap(),
            ])
            .await
            .unwrap();
        let out = text(&output);
        assert!(
            output.status.success(),
            "{what}: the API server refused the rendered chart:\n{out}\n--- rendered ---\n{yaml}"
        );
        assert!(
            !out.contains("Warning"),
            "{what}: the API server warned (Pod Security?):\n{out}"
        );
        // Every rendered object was sent (kubectl prints one line per object).
        let accepted = out
            .lines()
            .filter(|l| l.contains("(server dry run)"))
            .count();
        assert_eq!(
            accepted,
            rendered.len(),
            "{what}: {:?} rendered, kubectl said:\n{out}",
            kinds(&rendered)
        );
    }
}

#[test]
fn bad_values_are_refused_naming_the_value() {
    // (--set, what the message must contain)
    let cases: &[(&str, &str)] = &[
        ("replicaCount=-1", "/replicaCount"),
        ("replicaCount=two", "/replicaCount"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("image.tag=a:b", "/image/tag"),
        ("image.digest=sha256:abc", "/image/digest"),
        ("imagee.tag=x", "'imagee' not allowed"),
        ("image.pulPolicy=Always", "'pulPolicy' not allowed"),
        ("workerImage=Not An Image", "/workerImage"),
        ("watchNamespace=Bad_Namespace", "/watchNamespace"),
        (
            "leaderElection.leaseDurationSeconds=1",
            "/leaderElection/leaseDurationSeconds",
        ),
        (
            "leaderElection.leaseDurationSeconds=301",
            "/leaderElection/leaseDurationSeconds",
        ),
        ("metrics.port=80", "/metrics/port"),
        ("resources.requests.cpu=lots", "/resources/requests/cpu"),
        ("resources.limit.cpu=1", "'limit' not allowed"),
        ("tolerations[0].operator=Maybe", "/tolerations/0/operator"),
        (
            "podDisruptionBudget.maxUnavailable=0",
            "/podDisruptionBudget/maxUnavailable",
        ),
        (
            "podDisruptionBudget.maxUnavailable=150%",
            "/podDisruptionBudget/maxUnavailable",
        ),
        ("serviceMonitor.interval=10x", "/serviceMonitor/interval"),
        ("serviceMonitor.enabled=yes", "/serviceMonitor/enabled"),
        // Checked by the templates rather than the schema.
        ("leaderElection.enabled=false", "leaderElection.enabled"),
        ("serviceAccount.create=false", "serviceAccount.name"),
    ];
    let mut failures = Vec::new();
    for (set, expected) in cases {
        let output = helm(&template_args("default", &[set]));
        let message = text(&output);
        if output.status.success() {
            failures.push(format!("--set {set}: accepted"));
        } else if !message.contains(expected) {
            failures.push(format!(
                "--set {set}: refused, but the message does not name {expected:?}:\n{message}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `(apiGroup, resource, verb)` triples of a Role or ClusterRole, one per grant.
fn grants(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap_or_else(|| panic!("not a list: {v}"))
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    for rule in role["rules"].as_array().unwrap() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    out.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    out
}

/// What the operator's code calls (see the comments in templates/_helpers.tpl,
/// `switchyard.managerRules`). A change here is a deliberate change to its permissions.
fn expected_operator_grants() -> BTreeSet<(String, String, String)> {
    let owned: &[(&str, &str)] = &[
        ("apps", "deployments"),
        ("apps", "statefulsets"),
        ("", "services"),
        ("", "configmaps"),
        ("", "serviceaccounts"),
        ("policy", "poddisruptionbudgets"),
        ("networking.k8s.io", "networkpolicies"),
    ];
    let mut expected: Vec<(&str, &str, &str)> = vec![
        ("switchyard.dev", "modeldeployments", "get"),
        ("switchyard.dev", "modeldeployments", "list"),
        ("switchyard.dev", "modeldeployments", "watch"),
        // The autoscaler's shard copies (spec.experts.replicaShards).
        ("switchyard.dev", "modeldeployments", "patch"),
        ("switchyard.dev", "modeldeployments/status", "patch"),
        // blockOwnerDeletion under OwnerReferencesPermissionEnforcement.
        ("switchyard.dev", "modeldeployments/finalizers", "update"),
        ("events.k8s.io", "events", "create"),
        ("events.k8s.io", "events", "patch"),
        // The autoscaler: the scale subresource, and the frontend pods it polls.
        ("switchyard.dev", "modeldeployments/scale", "patch"),
        ("", "pods", "get"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        // The placement loop: the balanced placement's ConfigMap goes when the strategy
        // returns to evenSpread (placement/run.rs).
        ("", "configmaps", "delete"),
    ];
    for (group, resource) in owned {
        for verb in ["get", "list", "watch", "create", "patch"] {
            expected.push((group, resource, verb));
        }
    }
    let mut grants: BTreeSet<(String, String, String)> = expected
        .into_iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
        .collect();
    // reconcile.rs prune, over build::prunable_kinds.
    for resource in switchyard_operator::build::prunable_kinds() {
        grants.insert((resource.group, resource.plural, "delete".to_string()));
    }
    // spec.monitoring.podMonitor: apply, and prune when turned off.
    let monitor = switchyard_operator::build::pod_monitor_resource();
    for verb in ["list", "create", "patch", "delete"] {
        grants.insert((
            monitor.group.clone(),
            monitor.plural.clone(),
            verb.to_string(),
        ));
    }
    grants
}

#[test]
fn rbac_grants_exactly_what_the_operator_uses() {
    let rendered = objects(&render("switchyard-system", &[]));
    let cluster_role = find(&rendered, "ClusterRole", "switchyard")
        .unwrap_or_else(|| panic!("no ClusterRole in {:?}", kinds(&rendered)));
    assert_eq!(grants(cluster_role), expected_operator_grants());
    assert!(
        cluster_role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r.get("resourceNames").is_none() && r.get("nonResourceURLs").is_none()),
        "{cluster_role}"
    );
    let binding = find(&rendered, "ClusterRoleBinding", "switchyard").unwrap();
    assert_eq!(binding["roleRef"]["name"], cluster_role["metadata"]["name"]);
    let deployment = find(&rendered, "Deployment", "switchyard").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        binding["subjects"][0]["name"], pod["serviceAccountName"],
        "the ClusterRoleBinding binds the operator's ServiceAccount"
    );
    assert_eq!(binding["subjects"][0]["namespace"], "switchyard-system");

    // Leader election: create any Lease (create cannot be limited by name), get and
    // update only the one the operator is told to use, in the release namespace.
    let lease_role = find(&rendered, "Role", "-leader-election").unwrap();
    assert_eq!(lease_role["metadata"]["namespace"], "switchyard-system");
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let lease_name = args
        .iter()
        .find_map(|a| a.strip_prefix("--lease-name="))
        .unwrap_or_else(|| panic!("no --lease-name in {args:?}"));
    assert!(
        args.contains(&"--lease-namespace=switchyard-system"),
        "{args:?}"
    );
    let rules = lease_role["rules"].as_array().unwrap();
    let mut lease_grants = BTreeSet::new();
    for rule in rules {
        assert_eq!(
            rule["apiGroups"],
            serde_json::json!(["coordination.k8s.io"])
        );
        assert_eq!(rule["resources"], serde_json::json!(["leases"]));
        let names = rule.get("resourceNames").map(Value::to_string);
        for verb in rule["verbs"].as_array().unwrap() {
            lease_grants.insert((verb.as_str().unwrap().to_string(), names.clone()));
        }
    }
    let named = Some(serde_json::json!([lease_name]).to_string());
    assert_eq!(
        lease_grants,
        BTreeSet::from([
            ("create".to_string(), None),
            ("get".to_string(), named.clone()),
            ("update".to_string(), named),
        ])
    );

    // With one watched namespace, the same grants as a Role there, and nothing cluster-wide.
    let rendered = objects(&render("switchyard-system", &["watchNamespace=models"]));
    assert!(
        find(&rendered, "ClusterRole", "").is_none()
            && find(&rendered, "ClusterRoleBinding", "").is_none(),
        "{:?}",
        kinds(&rendered)
    );
    let role = rendered
        .iter()
        .find(|o| o["kind"] == "Role" && o["metadata"]["namespace"] == "models")
        .unwrap_or_else(|| panic!("no Role in models: {:?}", kinds(&rendered)));
    assert_eq!(grants(role), expected_operator_grants());
}

#[test]
fn the_operator_pod_is_wired_to_the_operators_flags_probes_and_test_hook() {
    let rendered = objects(&render("switchyard-system", &[]));
    let deployment = find(&rendered, "Deployment", "switchyard").unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["args"][0], "run");
    assert!(
        container["args"]
            .as_array()
            .unwrap()
            .contains(&Value::from("--leader-election=true"))
    );
    assert_eq!(
        container["image"],
        "ghcr.io/switchyard-dev/switchyard-operator:0.1.0"
    );
    for (env, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let var = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == env)
            .unwrap_or_else(|| panic!("no {env} in {}", container["env"]));
        assert_eq!(var["valueFrom"]["fieldRef"]["fieldPath"], field);
    }
    assert_eq!(container["ports"][0]["name"], "metrics");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "metrics");

    // The metrics Service selects the operator pods, and the test hook calls it.
    let service = find(&rendered, "Service", "-metrics").unwrap();
    assert_eq!(service["spec"]["ports"][0]["name"], "metrics");
    assert_eq!(service["spec"]["ports"][0]["port"], 8080);
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod_labels[key], value, "selector {key}");
    }
    let hook = find(&rendered, "Pod", "-test-ready").unwrap();
    assert_eq!(hook["metadata"]["annotations"]["helm.sh/hook"], "test");
    assert_eq!(hook["spec"]["restartPolicy"], "Never");
    let url = format!(
        "http://{}.switchyard-system.svc:8080/readyz",
        service["metadata"]["name"].as_str().unwrap()
    );
    assert_eq!(
        hook["spec"]["containers"][0]["args"],
        serde_json::json!(["check-ready", "--url", url])
    );

    // `workerImage` becomes --default-worker-image; empty leaves the operator's default.
    assert!(
        !container["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str().unwrap().starts_with("--default-worker-image")),
        "{}",
        container["args"]
    );
    let rendered = objects(&render(
        "switchyard-system",
        &["workerImage=registry.example.com/worker:1"],
    ));
    let args = &find(&rendered, "Deployment", "switchyard").unwrap()["spec"]["template"]["spec"]["containers"]
        [0]["args"];
    assert!(
        args.as_array().unwrap().contains(&Value::from(
            "--default-worker-image=registry.example.com/worker:1"
        )),
        "{args}"
    );
}
