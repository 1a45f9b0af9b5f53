//! The builder, from the manifests in `examples/` (the same files users apply).

use k8s_openapi::api::core::v1::PodTemplateSpec;
use switchyard_proto::worker_config::{CONFIG_FILE, WorkerConfig};

use super::*;

fn example(file: &str) -> ModelDeployment {
    let path = format!("{}/../examples/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut md: ModelDeployment =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    // What the API server adds.
    md.metadata.namespace = Some("serving".into());
    md.metadata.uid = Some("0b5c2f1e-7a43-4e8e-9d0c-5f0a6e7b8c9d".into());
    md
}

/// The minimal example with expert shards (it has none: its frontends hold the model).
fn sharded(shards: i32) -> ModelDeployment {
    let mut md = example("minimal.yaml");
    md.spec.experts.shards = shards;
    md
}

fn shards(d: &Desired) -> &ExpertShards {
    d.experts.as_ref().expect("the shard objects")
}

fn pod(template: &PodTemplateSpec) -> &k8s_openapi::api::core::v1::PodSpec {
    template.spec.as_ref().unwrap()
}

#[test]
fn every_object_is_owned_labelled_and_in_the_deployment_namespace() {
    let md = example("minimal.yaml");
    let d = desired(&md, &Defaults::default()).unwrap();
    for object in d.objects() {
        let (meta, kind) = (
            object.meta(),
            format!("{} {}", object.kind(), object.name()),
        );
        assert_eq!(meta.namespace.as_deref(), Some("serving"), "{kind}");
        let owners = meta.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1, "{kind}");
        let owner = &owners[0];
        assert_eq!(owner.kind, "ModelDeployment", "{kind}");
        assert_eq!(owner.api_version, "switchyard.dev/v1alpha1", "{kind}");
        assert_eq!(owner.name, "olmoe-tiny", "{kind}");
        assert_eq!(owner.uid, md.metadata.uid.clone().unwrap(), "{kind}");
        assert_eq!(owner.controller, Some(true), "{kind}");
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/name"], "switchyard", "{kind}");
        assert_eq!(labels["app.kubernetes.io/instance"], "olmoe-tiny", "{kind}");
        assert_eq!(
            labels["app.kubernetes.io/managed-by"], FIELD_MANAGER,
            "{kind}"
        );
        assert_eq!(labels[MODEL_DEPLOYMENT_LABEL], "olmoe-tiny", "{kind}");
    }
    assert_eq!(
        d.frontend.metadata.name.as_deref(),
        Some("olmoe-tiny-frontend")
    );
    assert_eq!(
        d.client_service.metadata.name.as_deref(),
        Some("olmoe-tiny")
    );
    assert!(d.experts.is_none(), "the minimal example has no shards");
    let d = desired(&sharded(1), &Defaults::default()).unwrap();
    assert_eq!(
        shards(&d).statefulset.metadata.name.as_deref(),
        Some("olmoe-tiny-experts")
    );
    assert_eq!(
        Names::new(&md).unwrap().endpoint(md.spec.serving.port),
        "olmoe-tiny.serving.svc:50051"
    );
}

#[test]
fn objects_yields_every_owned_object_once_in_apply_order() {
    let md = example("full.yaml");
    let d = desired(&md, &Defaults::default()).unwrap();
    let objects: Vec<(&str, &str)> = d.objects().map(|o| (o.kind(), o.name())).collect();
    assert_eq!(
        objects,
        [
            ("ServiceAccount", "deepseek-v2-lite-worker"),
            ("ConfigMap", "deepseek-v2-lite-config"),
            ("Service", "deepseek-v2-lite"),
            ("Service", "deepseek-v2-lite-frontend-peers"),
            ("Service", "deepseek-v2-lite-experts"),
            ("Deployment", "deepseek-v2-lite-frontend"),
            ("StatefulSet", "deepseek-v2-lite-experts"),
            ("PodDisruptionBudget", "deepseek-v2-lite-frontend"),
            ("PodDisruptionBudget", "deepseek-v2-lite-experts"),
            ("NetworkPolicy", "deepseek-v2-lite-frontend"),
            ("NetworkPolicy", "deepseek-v2-lite-experts"),
        ]
    );
    assert_eq!(objects.len(), Desired::object_count(&md.spec));
    // Each object is a distinct field of Desired, not one field yielded twice.
    let fields: Vec<*const ObjectMeta> = d.objects().map(|o| o.meta() as *const _).collect();
    for (i, field) in fields.iter().enumerate() {
        assert!(
            !fields[..i].contains(field),
            "{:?} yielded twice",
            objects[i]
        );
    }
    // The API resource matches the kind, so a dynamic lookup finds the object.
    for object in d.objects() {
        assert_eq!(object.api_resource().kind, object.kind());
    }
}

#[test]
fn without_shards_only_the_frontend_objects_are_built() {
    let md = example("minimal.yaml");
    assert_eq!(md.spec.experts.shards, 0, "an absent experts section");
    let d = desired(&md, &Defaults::default()).unwrap();
    let objects: Vec<(&str, &str)> = d.objects().map(|o| (o.kind(), o.name())).collect();
    assert_eq!(
        objects,
        [
            ("ServiceAccount", "olmoe-tiny-worker"),
            ("ConfigMap", "olmoe-tiny-config"),
            ("Service", "olmoe-tiny"),
            ("Service", "olmoe-tiny-frontend-peers"),
            ("Deployment", "olmoe-tiny-frontend"),
            ("PodDisruptionBudget", "olmoe-tiny-frontend"),
            ("NetworkPolicy", "olmoe-tiny-frontend"),
        ]
    );
    assert_eq!(objects.len(), Desired::object_count(&md.spec));
    let config: WorkerConfig =
        serde_json::from_str(&d.config.data.as_ref().unwrap()[CONFIG_FILE]).unwrap();
    assert_eq!(config.shards.count, 0, "the frontends hold every expert");
    // Every kind reconcile may prune is a kind that only the shards have.
    for resource in prunable_kinds() {
        let full = desired(&sharded(2), &Defaults::default()).unwrap();
        assert!(
            full.objects().any(|o| o.kind() == resource.kind),
            "{}",
            resource.kind
        );
    }
}

#[test]
fn pods_are_hardened_and_probed_on_grpc_health() {
    let md = sharded(1);
    let d = desired(&md, &Defaults::default()).unwrap();
    for (component, template) in [
        (Component::Frontend, &d.frontend.spec.template),
        (
            Component::ExpertShard,
            &shards(&d).statefulset.spec.template,
        ),
    ] {
        let spec = pod(template);
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(
            spec.service_account_name.as_deref(),
            Some("olmoe-tiny-worker")
        );
        let psc = spec.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let [c] = &spec.containers[..] else {
            panic!("one container")
        };
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        let liveness = c.liveness_probe.as_ref().unwrap().grpc.as_ref().unwrap();
        assert_eq!(
            (liveness.port, liveness.service.as_deref()),
            (50051, Some(""))
        );
        let readiness = c.readiness_probe.as_ref().unwrap().grpc.as_ref().unwrap();
        assert_eq!(readiness.service.as_deref(), Some(component.grpc_service()));
        // A new pod counts as capacity within a second of its port opening; a slow load
        // still has 30 minutes.
        let (startup, ready) = (
            c.startup_probe.as_ref().unwrap(),
            c.readiness_probe.as_ref().unwrap(),
        );
        assert_eq!(
            (
                startup.period_seconds,
                startup.failure_threshold,
                ready.period_seconds
            ),
            (Some(1), Some(1800), Some(1))
        );
        // The pod's labels include the selector, or the workload would never own its pods.
        let pod_labels = template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        for (k, v) in selector_labels(&Names::new(&md).unwrap(), component) {
            assert_eq!(pod_labels.get(&k), Some(&v), "{component:?} {k}");
        }
        let env: Vec<_> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert!(env.contains(&"SWITCHYARD_POD_NAME"), "{env:?}");
        assert_eq!(
            env.contains(&"SWITCHYARD_SHARD_INDEX"),
            component == Component::ExpertShard,
            "{env:?}"
        );
        assert!(
            c.resources.is_none(),
            "the minimal example asks for no resources"
        );
    }
    // The model PVC is mounted read-only at the checkpoint's sub-directory.
    let spec = pod(&d.frontend.spec.template);
    let model = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "model")
        .unwrap();
    assert_eq!(
        model.persistent_volume_claim.as_ref().unwrap().claim_name,
        "models"
    );
    let mounts = spec.containers[0].volume_mounts.as_ref().unwrap();
    let model_mount = mounts.iter().find(|m| m.name == "model").unwrap();
    assert_eq!(model_mount.sub_path.as_deref(), Some("olmoe-1b-7b"));
    assert_eq!(model_mount.read_only, Some(true));
}

#[test]
fn the_full_example_asks_for_gpus_and_mounts_api_keys_on_frontends_only() {
    let md = example("full.yaml");
    let d = desired(&md, &Defaults::default()).unwrap();
    assert_eq!(d.frontend.spec.replicas, Some(2));
    let experts = &shards(&d).statefulset;
    assert_eq!(experts.spec.replicas, Some(4));
    assert_eq!(
        experts.spec.service_name.as_deref(),
        Some("deepseek-v2-lite-experts")
    );
    for template in [&d.frontend.spec.template, &experts.spec.template] {
        let spec = pod(template);
        let limits = spec.containers[0]
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap();
        assert_eq!(limits["nvidia.com/gpu"].0, "1");
        assert_eq!(
            spec.tolerations.as_ref().unwrap()[0].key.as_deref(),
            Some("nvidia.com/gpu")
        );
        assert_eq!(
            spec.node_selector.as_ref().unwrap()["nvidia.com/gpu.present"],
            "true"
        );
    }
    let has_keys = |t: &PodTemplateSpec| {
        pod(t).volumes.as_ref().unwrap().iter().any(|v| {
            v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("deepseek-api-keys")
        })
    };
    assert!(has_keys(&d.frontend.spec.template));
    assert!(
        !has_keys(&experts.spec.template),
        "shards never see API keys"
    );

    let config: WorkerConfig =
        serde_json::from_str(&d.config.data.as_ref().unwrap()[CONFIG_FILE]).unwrap();
    assert_eq!(config.model.quantization, "int4");
    assert_eq!(config.model.quantization_group_size, Some(32));
    assert_eq!(config.shards.count, 4);
    assert_eq!(
        config.shards.service,
        "deepseek-v2-lite-experts.serving.svc"
    );
    assert_eq!(
        config.placement.file.as_deref(),
        Some("/etc/switchyard/placement/placement.json")
    );
    assert_eq!(config.admission.tiers.len(), 3);
    assert_eq!(config.admission.tiers[0].requests_per_minute, Some(60));
    assert_eq!(config.admission.tiers[2].requests_per_minute, None);
    assert_eq!(config.admission.default_tier.as_deref(), Some("free"));
    assert!(config.admission.api_keys_dir.is_some());
}

#[test]
fn shards_admit_only_this_deployments_frontends_on_the_grpc_port() {
    let md = sharded(1);
    let d = desired(&md, &Defaults::default()).unwrap();
    let names = Names::new(&md).unwrap();
    let rule = &shards(&d)
        .policy
        .spec
        .as_ref()
        .unwrap()
        .ingress
        .as_ref()
        .unwrap()[0];
    let from = rule.from.as_ref().unwrap();
    assert_eq!(from.len(), 1);
    assert_eq!(
        from[0].pod_selector.as_ref().unwrap().match_labels.as_ref(),
        Some(&selector_labels(&names, Component::Frontend))
    );
    assert!(from[0].namespace_selector.is_none(), "same namespace only");
    let ports = rule.ports.as_ref().unwrap();
    assert_eq!(ports[0].port, Some(IntOrString::Int(50051)));
    // Frontends accept anyone, but only on the gRPC port.
    let frontend_rule = &d
        .frontend_policy
        .spec
        .as_ref()
        .unwrap()
        .ingress
        .as_ref()
        .unwrap()[0];
    assert!(frontend_rule.from.is_none());
    assert_eq!(
        frontend_rule.ports.as_ref().unwrap()[0].port,
        Some(IntOrString::Int(50051))
    );
}

/// The config hash on a pod template.
fn template_hash(t: &PodTemplateSpec) -> String {
    t.metadata.as_ref().unwrap().annotations.as_ref().unwrap()[CONFIG_HASH_ANNOTATION].clone()
}

/// The config hashes on the two pod templates: (frontends, shards).
fn role_hashes(md: &ModelDeployment) -> (String, String) {
    let d = desired(md, &Defaults::default()).unwrap();
    (
        template_hash(&d.frontend.spec.template),
        template_hash(&shards(&d).statefulset.spec.template),
    )
}

#[test]
fn a_config_change_rolls_the_pods_and_a_replica_change_does_not() {
    let base = sharded(2);
    let mut scaled = base.clone();
    scaled.spec.frontend.replicas = 5;
    assert_eq!(role_hashes(&base), role_hashes(&scaled));
    let mut resharded = base.clone();
    resharded.spec.experts.shards = 3;
    let (before, after) = (role_hashes(&base), role_hashes(&resharded));
    assert_eq!(
        before.0, after.0,
        "frontends find the shards through the Service and ask each what it holds: they stay"
    );
    assert_ne!(before.1, after.1, "the even spread changed: shards roll");
    let mut unsharded = base.clone();
    unsharded.spec.experts.shards = 0;
    let d = desired(&unsharded, &Defaults::default()).unwrap();
    assert_ne!(
        before.0,
        template_hash(&d.frontend.spec.template),
        "frontends that now hold every expert roll"
    );
    let mut new_dtype = base.clone();
    new_dtype.spec.model.dtype = crate::api::Dtype::F16;
    let after = role_hashes(&new_dtype);
    assert!(
        before.0 != after.0 && before.1 != after.1,
        "both compute in the dtype"
    );
}

#[test]
fn shard_copies_are_more_pods_of_the_same_template_and_roll_nothing() {
    let base = sharded(2);
    let mut copied = base.clone();
    copied.spec.experts.replica_shards = 3;
    assert_eq!(
        role_hashes(&base),
        role_hashes(&copied),
        "adding copies restarts neither frontends nor shards"
    );
    let replicas = |md: &ModelDeployment| {
        let d = desired(md, &Defaults::default()).unwrap();
        shards(&d).statefulset.spec.replicas
    };
    assert_eq!((replicas(&base), replicas(&copied)), (Some(2), Some(5)));
}

#[test]
fn the_balanced_placement_mounts_its_file_on_shards_and_its_moves_roll_nothing() {
    let base = sharded(2);
    let mut balanced = base.clone();
    balanced.spec.experts.placement.strategy = crate::api::PlacementStrategyName::Balanced;
    let d = desired(&balanced, &Defaults::default()).unwrap();
    let config: WorkerConfig =
        serde_json::from_str(&d.config.data.as_ref().unwrap()[CONFIG_FILE]).unwrap();
    assert_eq!(
        config.placement.strategy,
        switchyard_proto::worker_config::PlacementStrategy::Balanced
    );
    assert_eq!(
        config.placement.file.as_deref(),
        Some("/etc/switchyard/placement/placement.json")
    );
    let shard_pod = pod(&shards(&d).statefulset.spec.template);
    let volume = shard_pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "placement")
        .expect("the placement volume");
    let source = volume.config_map.as_ref().expect("a ConfigMap");
    assert_eq!(
        (source.name.as_str(), source.optional),
        ("olmoe-tiny-placement", Some(true)),
        "optional: shards start on the even spread before the first move"
    );
    let mounted = shard_pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "placement")
        .expect("mounted");
    assert_eq!(
        (mounted.mount_path.as_str(), mounted.sub_path.as_deref()),
        ("/etc/switchyard/placement", None),
        "a directory, not a sub-path: rewrites reach the running shard"
    );
    let frontend_pod = pod(&d.frontend.spec.template);
    assert!(
        !frontend_pod
            .volumes
            .iter()
            .flatten()
            .any(|v| v.name == "placement"),
        "frontends learn the placement from the shards"
    );
    // The strategy is a placement change (pods roll once); spare slots only change what
    // the operator plans, and reach the shards through the file.
    assert_ne!(role_hashes(&base).1, role_hashes(&balanced).1);
    let mut spare = balanced.clone();
    spare.spec.experts.redundant_experts = 4;
    assert_eq!(role_hashes(&balanced), role_hashes(&spare));
    // So does a new shard count: the operator moves experts through the file, and the
    // StatefulSet keeps the shards the file in force still uses.
    let replicas = |md: &ModelDeployment| {
        let d = desired(md, &Defaults::default()).unwrap();
        shards(&d).statefulset.spec.replicas
    };
    let mut fewer = balanced.clone();
    fewer.spec.experts.shards = 1;
    assert_eq!(role_hashes(&balanced), role_hashes(&fewer));
    assert_eq!(replicas(&fewer), Some(1), "no file yet: the spec's count");
    fewer.status = Some(crate::api::ModelDeploymentStatus {
        placement: Some(crate::api::PlacementSummary {
            balanced: Some(crate::api::BalancedPlacementStatus {
                shards: Some(2),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    fewer.spec.experts.replica_shards = 1;
    assert_eq!(
        replicas(&fewer),
        Some(3),
        "the file still spreads over 2: both stay until their experts moved, plus the copy"
    );
    let mut more = fewer.clone();
    more.spec.experts.shards = 4;
    assert_eq!(
        replicas(&more),
        Some(5),
        "more shards than the file: the spec's"
    );
    // The even spread mounts nothing.
    let d = desired(&base, &Defaults::default()).unwrap();
    assert!(
        !pod(&shards(&d).statefulset.spec.template)
            .volumes
            .iter()
            .flatten()
            .any(|v| v.name == "placement")
    );
}

#[test]
fn a_frontend_only_change_does_not_roll_the_shards() {
    let base = sharded(2);
    let (front, shard) = role_hashes(&base);
    let mut changes: Vec<(&str, ModelDeployment)> = Vec::new();
    let mut md = base.clone();
    md.spec.serving.max_batch_size = 8;
    changes.push(("serving.maxBatchSize", md));
    let mut md = base.clone();
    md.spec.serving.kv_cache_tokens = Some(4096);
    changes.push(("serving.kvCacheTokens", md));
    let mut md = base.clone();
    md.spec.admission.tiers.push(crate::api::Tier {
        name: "free".into(),
        priority: crate::api::Priority::Low,
        weight: 1,
        requests_per_minute: Some(60),
        tokens_per_minute: None,
        cached_prompt_token_percent: None,
    });
    changes.push(("admission.tiers", md));
    let mut md = base.clone();
    md.spec.admission.tiers.push(crate::api::Tier {
        name: "free".into(),
        priority: crate::api::Priority::Low,
        weight: 1,
        requests_per_minute: None,
        tokens_per_minute: Some(1000),
        cached_prompt_token_percent: Some(10),
    });
    changes.push(("admission.tiers[].cachedPromptTokenPercent", md));
    let mut md = base.clone();
    md.spec.admission.queue.max_queued = 9;
    changes.push(("admission.queue.maxQueued", md));
    let mut md = base.clone();
    md.spec.admission.quota_scope.mode = crate::api::QuotaScopeMode::Redis;
    md.spec.admission.quota_scope.redis = Some(crate::api::RedisSpec {
        address: "redis:6379".into(),
    });
    changes.push(("admission.quotaScope", md));
    for (field, md) in changes {
        let (f, s) = role_hashes(&md);
        assert_ne!(f, front, "{field} changes what frontends read: they roll");
        assert_eq!(
            s, shard,
            "{field} is not read by shards: they must not roll"
        );
    }
}

#[test]
fn an_object_not_from_the_api_server_is_refused() {
    let mut md = example("minimal.yaml");
    md.metadata.uid = None;
    assert_eq!(
        desired(&md, &Defaults::default()).unwrap_err(),
        BuildError::MissingMetadata("metadata.uid")
    );
    md.metadata.namespace = None;
    assert_eq!(
        desired(&md, &Defaults::default()).unwrap_err(),
        BuildError::MissingMetadata("metadata.namespace")
    );
}

#[test]
fn config_hash_is_stable() {
    // Pinned: a change here rolls every worker pod in every cluster on upgrade.
    assert_eq!(config_hash(""), "cbf29ce484222325");
    assert_eq!(config_hash("a"), "af63dc4c8601ec8c");
}

/// `quantization` and `quantizationGroupSize` reach the worker as written (the worker
/// refuses a group size other than 32 too).
#[test]
fn quantization_is_carried_into_the_worker_config() {
    for (q, name) in [
        (crate::api::Quantization::Int4, "int4"),
        (crate::api::Quantization::Int8, "int8"),
        (crate::api::Quantization::None, "none"),
    ] {
        let mut md = example("minimal.yaml");
        md.spec.model.quantization = q;
        md.spec.model.quantization_group_size = Some(crate::api::QuantizationGroupSize(32));
        let d = desired(&md, &Defaults::default()).unwrap();
        let config: WorkerConfig =
            serde_json::from_str(&d.config.data.as_ref().unwrap()[CONFIG_FILE]).unwrap();
        assert_eq!(config.model.quantization, name);
        assert_eq!(config.model.quantization_group_size, Some(32));
    }
}

#[test]
fn drain_seconds_sets_the_budget_and_the_grace_period_and_connection_caps_reach_frontends() {
    let mut md: ModelDeployment = sharded(1);
    md.spec = serde_json::from_value({
        let mut spec = serde_json::to_value(&md.spec).unwrap();
        spec["serving"]["drainSeconds"] = 45.into();
        spec["admission"]["connections"] = serde_json::json!({"maxPerAddress": 5000});
        spec
    })
    .unwrap();
    let d = desired(&md, &Defaults::default()).unwrap();
    let env = |t: &PodTemplateSpec, name: &str| {
        pod(t).containers[0]
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    let (f, s) = (
        &d.frontend.spec.template,
        &shards(&d).statefulset.spec.template,
    );
    for t in [f, s] {
        assert_eq!(env(t, "SWITCHYARD_DRAIN_SECONDS").as_deref(), Some("45"));
        assert_eq!(pod(t).termination_grace_period_seconds, Some(55));
    }
    assert_eq!(
        env(f, "SWITCHYARD_MAX_CONNECTIONS_PER_PEER").as_deref(),
        Some("5000")
    );
    assert_eq!(
        env(f, "SWITCHYARD_NEW_CONNECTIONS_BURST"),
        None,
        "unset caps keep the worker's default"
    );
    assert_eq!(
        env(s, "SWITCHYARD_MAX_CONNECTIONS_PER_PEER"),
        None,
        "shards are called by frontends only"
    );
}

#[test]
fn metrics_are_reachable_on_the_services_and_from_the_scrapers_only() {
    let mut md = sharded(1);
    md.spec.monitoring = serde_json::from_value(serde_json::json!({
        "scrapeFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "podMonitor": {"enabled": true}
    }))
    .unwrap();
    let d = desired(&md, &Defaults::default()).unwrap();
    let e = shards(&d);
    for service in [&d.client_service, &e.service] {
        let ports = service.spec.as_ref().unwrap().ports.as_ref().unwrap();
        let metrics = ports.iter().find(|p| p.name.as_deref() == Some("metrics"));
        assert_eq!(metrics.map(|p| p.port), Some(METRICS_PORT), "{ports:?}");
    }
    for policy in [&d.frontend_policy, &e.policy] {
        let rules = policy.spec.as_ref().unwrap().ingress.as_ref().unwrap();
        let scrape = rules
            .iter()
            .find(|r| r.ports.as_ref().unwrap()[0].port == Some(IntOrString::Int(METRICS_PORT)))
            .expect("a rule for the metrics port");
        let from = scrape.from.as_ref().expect("only the scrapers");
        assert_eq!(
            from[0]
                .namespace_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["kubernetes.io/metadata.name"],
            "monitoring"
        );
    }
    // With the operator's namespace known, its pods may poll the frontends' /demand and
    // the shards' /load on the metrics port too (its autoscaler, the KEDA endpoint).
    let defaults = Defaults {
        operator_namespace: Some("switchyard-system".into()),
        ..Defaults::default()
    };
    let a = desired(&md, &defaults).unwrap();
    let scrape_from = |p: &NetworkPolicy| {
        p.spec.as_ref().unwrap().ingress.as_ref().unwrap()[1]
            .from
            .clone()
            .unwrap()
    };
    let from = scrape_from(&a.frontend_policy);
    assert_eq!(from.len(), 2, "{from:?}");
    let operator = &from[1];
    assert_eq!(
        operator
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["kubernetes.io/metadata.name"],
        "switchyard-system"
    );
    assert_eq!(
        operator
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["app.kubernetes.io/component"],
        "operator"
    );
    assert_eq!(scrape_from(&shards(&a).policy).len(), 2);
    let monitor = d.pod_monitor.as_ref().expect("the PodMonitor");
    assert_eq!(
        monitor.data["spec"]["podMetricsEndpoints"][0]["interval"],
        "30s"
    );
    assert!(d.wants("PodMonitor", "olmoe-tiny"));
    // By default: any source may scrape, and no PodMonitor.
    let d = desired(&sharded(1), &Defaults::default()).unwrap();
    let rules = d
        .frontend_policy
        .spec
        .as_ref()
        .unwrap()
        .ingress
        .as_ref()
        .unwrap();
    assert!(rules.iter().any(|r| r.from.is_none()
        && r.ports.as_ref().unwrap()[0].port == Some(IntOrString::Int(METRICS_PORT))));
    assert!(d.pod_monitor.is_none());
    assert!(!d.wants("PodMonitor", "olmoe-tiny"));
}

#[test]
fn tls_mounts_the_secret_on_frontends_and_moves_their_probes_to_http() {
    let mut md = sharded(1);
    md.spec.tls = Some(crate::api::TlsSpec {
        secret_name: "olmoe-tls".into(),
    });
    let d = desired(&md, &Defaults::default()).unwrap();
    let front = pod(&d.frontend.spec.template);
    let volume = front
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "tls")
        .expect("the TLS volume");
    assert_eq!(
        volume.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("olmoe-tls")
    );
    let c = &front.containers[0];
    let env: Vec<_> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert!(env.contains(&"SWITCHYARD_TLS_CERT") && env.contains(&"SWITCHYARD_TLS_KEY"));
    let readiness = c.readiness_probe.as_ref().unwrap();
    assert!(
        readiness.grpc.is_none(),
        "the kubelet's gRPC probe cannot speak TLS"
    );
    let http = readiness.http_get.as_ref().unwrap();
    assert_eq!(http.path.as_deref(), Some("/readyz"));
    assert_eq!(http.port, IntOrString::String("metrics".into()));
    assert_eq!(
        c.liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/healthz")
    );
    let client_port = &d
        .client_service
        .spec
        .as_ref()
        .unwrap()
        .ports
        .as_ref()
        .unwrap()[0];
    assert_eq!(client_port.app_protocol, None, "not h2c under TLS");
    // Shards stay plaintext, probed on gRPC health.
    let e = shards(&d);
    let shard = pod(&e.statefulset.spec.template);
    assert!(
        shard
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .all(|v| v.name != "tls")
    );
    assert!(
        shard.containers[0]
            .readiness_probe
            .as_ref()
            .unwrap()
            .grpc
            .is_some()
    );
    let shard_port = &e.service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(
        shard_port.app_protocol.as_deref(),
        Some("kubernetes.io/h2c")
    );
}

#[test]
fn quotas_are_split_over_the_ready_frontends_by_default_or_shared_in_redis() {
    let md = example("minimal.yaml");
    let d = desired(&md, &Defaults::default()).unwrap();
    // A headless Service of the ready frontends only: what each counts its peers by.
    let peers = d.frontend_peers.spec.as_ref().unwrap();
    assert_eq!(peers.cluster_ip.as_deref(), Some("None"));
    assert_eq!(peers.publish_not_ready_addresses, Some(false));
    assert_eq!(
        peers.selector.as_ref(),
        d.frontend.spec.selector.match_labels.as_ref()
    );
    let config = |d: &Desired| -> WorkerConfig {
        serde_json::from_str(&d.config.data.as_ref().unwrap()[CONFIG_FILE]).unwrap()
    };
    let scope = config(&d).admission.quota_scope.expect("a quota scope");
    assert_eq!(scope.mode, "split");
    assert_eq!(scope.peers, "olmoe-tiny-frontend-peers.serving.svc");
    assert_eq!((scope.redis_address, scope.redis_key_prefix), (None, None));

    let mut md = example("minimal.yaml");
    md.spec.admission.quota_scope =
        serde_yaml::from_str("{mode: Redis, redis: {address: 'redis.platform.svc:6379'}}").unwrap();
    let scope = config(&desired(&md, &Defaults::default()).unwrap())
        .admission
        .quota_scope
        .unwrap();
    assert_eq!(scope.mode, "redis");
    assert_eq!(
        scope.redis_address.as_deref(),
        Some("redis.platform.svc:6379")
    );
    assert_eq!(
        scope.redis_key_prefix.as_deref(),
        Some("switchyard/serving/olmoe-tiny/"),
        "keys of one deployment cannot collide with another's"
    );
}
