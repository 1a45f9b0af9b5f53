//! Tier 2: the real kube-apiserver + etcd, through kube-rs.

use k8s_openapi::api::core::v1::{ConfigMap, Service, ServicePort, ServiceSpec};
use kube::api::{Api, ObjectMeta, PostParams};
use switchyard_tests::ControlPlane;

fn configmap(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..ConfigMap::default()
    }
}

/// The `Invalid` (422) status the API server returns, or a panic naming what came instead.
fn expect_invalid(result: Result<impl std::fmt::Debug, kube::Error>) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "expected 422 Invalid, got {status:?}");
            assert_eq!(status.reason, "Invalid", "{status:?}");
            *status
        }
        other => panic!("expected the API server to refuse the object, got {other:?}"),
    }
}

#[tokio::test]
async fn namespace_and_configmap_round_trip_through_the_real_api_server() {
    let cp = ControlPlane::shared().await.unwrap();
    let ns = cp.namespace("configmap").await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);

    let created = api
        .create(
            &PostParams::default(),
            &configmap("placement", &[("shards", "2")]),
        )
        .await
        .unwrap();
    assert_eq!(
        created.metadata.namespace.as_deref(),
        Some(ns.name.as_str())
    );
    assert!(
        created.metadata.uid.is_some(),
        "the server assigns a uid: {created:?}"
    );

    let read = api.get("placement").await.unwrap();
    assert_eq!(read.data.unwrap()["shards"], "2");
}

#[tokio::test]
async fn a_malformed_object_is_refused_with_a_message_naming_the_field() {
    let cp = ControlPlane::shared().await.unwrap();
    let ns = cp.namespace("validation").await.unwrap();

    // Object names must be DNS subdomains.
    let configmaps: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);
    let status = expect_invalid(
        configmaps
            .create(&PostParams::default(), &configmap("Not_A_DNS_Name", &[]))
            .await,
    );
    assert!(status.message.contains("metadata.name"), "{status:?}");

    // A port must be 1..=65535.
    let services: Api<Service> = Api::namespaced(ns.client.clone(), &ns.name);
    let service = Service {
        metadata: ObjectMeta {
            name: Some("grpc".into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort {
                port: 70000,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let status = expect_invalid(services.create(&PostParams::default(), &service).await);
    assert!(status.message.contains("spec.ports[0].port"), "{status:?}");
    let details = status
        .details
        .expect("an Invalid status carries field details");
    assert!(
        details
            .causes
            .iter()
            .any(|c| c.field == "spec.ports[0].port"),
        "{details:?}"
    );
}

#[tokio::test]
async fn the_api_server_reports_the_pinned_kubernetes_version() {
    let cp = ControlPlane::shared().await.unwrap();
    let client = cp.client().await.unwrap();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
    assert_eq!(version.minor, "37", "{version:?}");
    assert!(version.git_version.starts_with("v1.37."), "{version:?}");
}
