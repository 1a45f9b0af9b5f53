//! The optional Prometheus Operator PodMonitor (`spec.monitoring.podMonitor`): a
//! `monitoring.coreos.com/v1` object, so untyped. Reconcile applies it only where its CRD
//! is installed.

use kube::api::DynamicObject;
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

use super::{METRICS_PORT_NAME, Names};
use crate::api::ModelDeployment;

/// `monitoring.coreos.com/v1`, where the PodMonitor kind lives.
pub const POD_MONITOR_GROUP_VERSION: &str = "monitoring.coreos.com/v1";

/// The PodMonitor kind, for a dynamic `Api`.
pub fn pod_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PodMonitor"),
        "podmonitors",
    )
}

/// The PodMonitor `md` asks for, or `None` when `spec.monitoring.podMonitor.enabled` is
/// false. It selects both roles' pods (the instance label) and scrapes their `metrics`
/// port; `metadata` is the owned objects' (labels, owner reference).
pub fn pod_monitor(
    md: &ModelDeployment,
    names: &Names,
    metadata: kube::api::ObjectMeta,
) -> Option<DynamicObject> {
    let spec = &md.spec.monitoring.pod_monitor;
    if !spec.enabled {
        return None;
    }
    let mut object = DynamicObject::new(&names.deployment, &pod_monitor_resource());
    object.metadata = metadata;
    object.data = json!({
        "spec": {
            "selector": {"matchLabels": {
                "app.kubernetes.io/name": "switchyard",
                "app.kubernetes.io/instance": names.deployment,
            }},
            "podMetricsEndpoints": [{
                "port": METRICS_PORT_NAME,
                "path": "/metrics",
                "interval": spec.interval,
            }],
        }
    });
    Some(object)
}
