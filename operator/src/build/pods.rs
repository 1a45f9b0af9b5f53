//! The pod template both roles share: hardened, probed on the worker's gRPC health, with
//! the config file, the model volume and the downward-API facts mounted.

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, GRPCAction, HTTPGetAction, HostPathVolumeSource, ImageVolumeSource,
    ObjectFieldSelector, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use switchyard_proto::worker_config::{
    API_KEYS_DIR, CONFIG_DIR, CONFIG_FILE, ENV_POD_IP, ENV_POD_NAME, ENV_POD_NAMESPACE,
    ENV_SHARD_INDEX, MODEL_MOUNT, PLACEMENT_DIR, TLS_DIR,
};

use super::{
    CONFIG_HASH_ANNOTATION, Component, Defaults, GRPC_PORT_NAME, METRICS_PORT, METRICS_PORT_NAME,
    Names, labels,
};
use crate::api::{ModelDeployment, PlacementStrategyName, PodSettings, PullPolicy};

/// The non-root user the worker runs as (the distroless `nonroot` user).
const RUN_AS: i64 = 65532;

pub fn template(
    md: &ModelDeployment,
    defaults: &Defaults,
    names: &Names,
    component: Component,
    config_hash: &str,
) -> PodTemplateSpec {
    let spec = &md.spec;
    let settings: &PodSettings = match component {
        Component::Frontend => &spec.frontend.pod,
        Component::ExpertShard => &spec.experts.pod,
    };
    let port = spec.serving.port;

    let mut env = vec![
        field_env(ENV_POD_NAME, "metadata.name"),
        field_env(ENV_POD_NAMESPACE, "metadata.namespace"),
        field_env(ENV_POD_IP, "status.podIP"),
        plain_env("SWITCHYARD_ROLE", component.as_str()),
        plain_env("SWITCHYARD_LISTEN", &format!("0.0.0.0:{port}")),
        plain_env(
            "SWITCHYARD_METRICS_LISTEN",
            &format!("0.0.0.0:{METRICS_PORT}"),
        ),
        plain_env("SWITCHYARD_CONFIG", &format!("{CONFIG_DIR}/{CONFIG_FILE}")),
    ];
    env.push(plain_env(
        "SWITCHYARD_DRAIN_SECONDS",
        &spec.serving.drain_seconds.to_string(),
    ));
    if component == Component::Frontend {
        let caps = &spec.admission.connections;
        for (name, value) in [
            ("SWITCHYARD_MAX_CONNECTIONS_PER_PEER", caps.max_per_address),
            (
                "SWITCHYARD_NEW_CONNECTIONS_PER_PEER_PER_SECOND",
                caps.new_per_second,
            ),
            ("SWITCHYARD_NEW_CONNECTIONS_BURST", caps.new_burst),
        ] {
            if let Some(value) = value {
                env.push(plain_env(name, &value.to_string()));
            }
        }
    }
    if component == Component::ExpertShard {
        // Kubernetes labels StatefulSet pods with their ordinal.
        env.push(field_env(
            ENV_SHARD_INDEX,
            "metadata.labels['apps.kubernetes.io/pod-index']",
        ));
    }

    let (model_volume, model_sub_path) = model_volume(md);
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config.clone(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        model_volume,
        // The root filesystem is read-only; scratch space goes here.
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        mount("config", CONFIG_DIR, None),
        mount("model", MODEL_MOUNT, model_sub_path),
        mount("tmp", "/tmp", None),
    ];
    // The balanced placement's file: optional, so shards start on the even spread before
    // the operator has written one; a volume (not a sub-path) so rewrites reach them.
    if component == Component::ExpertShard
        && spec.experts.placement.strategy == PlacementStrategyName::Balanced
    {
        volumes.push(Volume {
            name: "placement".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.placement.clone(),
                optional: Some(true),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(mount("placement", PLACEMENT_DIR, None));
    }
    if let (Component::Frontend, Some(secret)) = (component, &spec.admission.api_key_secret) {
        volumes.push(secret_volume("api-keys", &secret.name));
        mounts.push(mount("api-keys", API_KEYS_DIR, None));
    }
    // TLS on the client endpoint: frontends only (shards are reached by frontends alone).
    let tls = match (component, &spec.tls) {
        (Component::Frontend, Some(tls)) => Some(tls),
        _ => None,
    };
    if let Some(tls) = tls {
        volumes.push(secret_volume("tls", &tls.secret_name));
        mounts.push(mount("tls", TLS_DIR, None));
        env.push(plain_env(
            "SWITCHYARD_TLS_CERT",
            &format!("{TLS_DIR}/tls.crt"),
        ));
        env.push(plain_env(
            "SWITCHYARD_TLS_KEY",
            &format!("{TLS_DIR}/tls.key"),
        ));
    }

    // gRPC health on the gRPC port; with TLS there, which the kubelet's gRPC probe cannot
    // speak, the metrics port's /healthz (the process) and /readyz (the same readiness).
    let probe = |service: &str, period: i32, failures: i32| Probe {
        grpc: tls.is_none().then(|| GRPCAction {
            port,
            service: Some(service.to_string()),
            mode: None,
        }),
        http_get: tls.is_some().then(|| HTTPGetAction {
            port: IntOrString::String(METRICS_PORT_NAME.into()),
            path: Some(
                if service.is_empty() {
                    "/healthz"
                } else {
                    "/readyz"
                }
                .into(),
            ),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    };

    let container = Container {
        name: "worker".into(),
        image: Some(
            spec.image
                .clone()
                .unwrap_or_else(|| defaults.worker_image.clone()),
        ),
        image_pull_policy: spec.image_pull_policy.map(pull_policy),
        ports: Some(vec![
            ContainerPort {
                name: Some(GRPC_PORT_NAME.into()),
                container_port: port,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some(METRICS_PORT_NAME.into()),
                container_port: METRICS_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        env: Some(env),
        resources: settings.resources.clone(),
        volume_mounts: Some(mounts),
        // Liveness: the process answers; readiness: the role's engine has its model.
        // Capacity counts from the moment the port opens: the startup probe looks every
        // second (a 10 s period cost up to 10 s per new pod), and so does readiness, which
        // the kubelet only starts probing once the startup probe has passed.
        liveness_probe: Some(probe("", 10, 3)),
        readiness_probe: Some(probe(component.grpc_service(), 1, 3)),
        // Loading a large checkpoint takes minutes; give it up to 30 of them.
        startup_probe: Some(probe("", 1, 1800)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };

    let mut metadata_labels = labels(names, Some(component));
    metadata_labels.retain(|k, _| k != "app.kubernetes.io/managed-by");
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(metadata_labels),
            annotations: Some(
                [(CONFIG_HASH_ANNOTATION.to_string(), config_hash.to_string())].into(),
            ),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(names.service_account.clone()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS),
                run_as_group: Some(RUN_AS),
                fs_group: Some(RUN_AS),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            // The drain (SIGTERM → in-flight calls finish) plus the worker's own 2 s
            // hard stop and exit, so the kubelet's SIGKILL never comes first.
            termination_grace_period_seconds: Some(i64::from(spec.serving.drain_seconds) + 10),
            containers: vec![container],
            volumes: Some(volumes),
            node_selector: (!settings.node_selector.is_empty())
                .then(|| settings.node_selector.clone()),
            tolerations: (!settings.tolerations.is_empty()).then(|| settings.tolerations.clone()),
            affinity: settings.affinity.clone(),
            ..PodSpec::default()
        }),
    }
}

/// The `model` volume and the sub-path of the checkpoint inside it.
fn model_volume(md: &ModelDeployment) -> (Volume, Option<String>) {
    let model = &md.spec.model;
    let mut volume = Volume {
        name: "model".into(),
        ..Volume::default()
    };
    let sub_path = |path: &str| Some(path.trim_matches('/').to_string()).filter(|p| !p.is_empty());
    let mut checkpoint_dir = None;
    if let Some(pvc) = &model.pvc {
        volume.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
            claim_name: pvc.claim_name.clone(),
            read_only: Some(true),
        });
        checkpoint_dir = sub_path(&pvc.path);
    } else if let Some(host) = &model.host_path {
        volume.host_path = Some(HostPathVolumeSource {
            path: host.path.clone(),
            type_: Some("Directory".into()),
        });
    } else if let Some(image) = &model.image {
        volume.image = Some(ImageVolumeSource {
            reference: Some(image.reference.clone()),
            pull_policy: image.pull_policy.map(pull_policy),
        });
        checkpoint_dir = sub_path(&image.path);
    }
    (volume, checkpoint_dir)
}

/// A Secret as a volume, readable by the worker's group only.
fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str, sub_path: Option<String>) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(name != "tmp"),
        sub_path,
        ..VolumeMount::default()
    }
}

fn pull_policy(policy: PullPolicy) -> String {
    match policy {
        PullPolicy::Always => "Always",
        PullPolicy::IfNotPresent => "IfNotPresent",
        PullPolicy::Never => "Never",
    }
    .into()
}

fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}
