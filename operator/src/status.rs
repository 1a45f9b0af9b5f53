//! Status, derived (purely) from the ModelDeployment and what its workloads report.
//!
//! ```text
//!   Deployment.status ─┐
//!   StatefulSet.status ┼─> derive() ─> ModelDeploymentStatus { counts, endpoint, placement,
//!   apply error? ──────┘                 conditions Ready / Progressing / Degraded }
//! ```
//!
//! [`apply`] is the one write: reconcile and the autoscaler each server-side apply their
//! own fields of status.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{ModelDeployment, ModelDeploymentStatus, PlacementSummary, RoleStatus};
use crate::build::{Component, Names, selector_string};

/// A condition of `md` at `now`; it keeps its previous transition time while its status
/// does not change (the autoscaler's conditions are made the same way).
pub fn condition(
    md: &ModelDeployment,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last_transition_time = md
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: md.metadata.generation,
        last_transition_time,
    }
}

/// Writes `status` (a part of the status object) as `field_manager`, by server-side
/// apply on the status subresource: reconcile and the autoscaler each own their fields.
pub async fn apply(
    client: &kube::Client,
    md: &ModelDeployment,
    field_manager: &str,
    status: serde_json::Value,
) -> kube::Result<()> {
    use kube::{Resource as _, ResourceExt as _};
    let api: kube::Api<ModelDeployment> =
        kube::Api::namespaced(client.clone(), &md.namespace().unwrap_or_default());
    let body = serde_json::json!({
        "apiVersion": ModelDeployment::api_version(&()),
        "kind": ModelDeployment::kind(&()),
        "status": status,
    });
    api.patch_status(
        &md.name_any(),
        &kube::api::PatchParams::apply(field_manager).force(),
        &kube::api::Patch::Apply(body),
    )
    .await
    .map(drop)
}

/// Condition types.
pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// What the last reconcile saw of the owned workloads.
#[derive(Debug, Clone, Default)]
pub struct Observed<'a> {
    pub frontend: Option<&'a Deployment>,
    pub experts: Option<&'a StatefulSet>,
    /// Why the last apply failed, if it did (becomes `Degraded`).
    pub apply_error: Option<String>,
    /// The placement revision written to the ConfigMap.
    pub placement_revision: Option<String>,
}

/// The status `md` should have. `now` stamps conditions whose status changed; unchanged
/// conditions keep their previous transition time.
pub fn derive(
    md: &ModelDeployment,
    names: &Names,
    observed: &Observed<'_>,
    now: Time,
) -> ModelDeploymentStatus {
    let generation = md.metadata.generation;
    let spec = &md.spec;

    let frontend_desired = spec.frontend.replicas;
    let (f_replicas, f_ready, f_updated, f_current) = observed
        .frontend
        .map(|d| {
            let s = d.status.clone().unwrap_or_default();
            let current =
                d.metadata.generation.is_some() && s.observed_generation == d.metadata.generation;
            (
                s.replicas.unwrap_or(0),
                s.ready_replicas.unwrap_or(0),
                s.updated_replicas.unwrap_or(0),
                current,
            )
        })
        .unwrap_or((0, 0, 0, false));
    // The shards and their copies (`replicaShards`): every pod of the StatefulSet.
    let shards_desired = md.shard_pods();
    let (e_replicas, e_ready, e_updated, e_current) = observed
        .experts
        .map(|s| {
            let st = s.status.clone().unwrap_or_default();
            let current =
                s.metadata.generation.is_some() && st.observed_generation == s.metadata.generation;
            (
                st.replicas,
                st.ready_replicas.unwrap_or(0),
                st.updated_replicas.unwrap_or(0),
                current,
            )
        })
        // No StatefulSet is what `experts.shards: 0` asks for.
        .unwrap_or((0, 0, 0, shards_desired == 0));

    let role = |replicas, ready, desired, component| RoleStatus {
        replicas,
        ready_replicas: ready,
        desired_replicas: desired,
        summary: Some(format!("{ready}/{desired}")),
        selector: Some(selector_string(names, component)),
    };

    let rolled_out = f_current
        && e_current
        && f_updated >= frontend_desired
        && e_updated >= shards_desired
        && f_replicas == frontend_desired
        && e_replicas == shards_desired;
    let all_ready = f_ready >= frontend_desired && e_ready >= shards_desired;

    let (ready, ready_reason, ready_message) = if let Some(err) = &observed.apply_error {
        (false, "ApplyFailed", err.clone())
    } else if frontend_desired == 0 {
        (
            false,
            "ScaledToZero",
            "spec.frontend.replicas is 0: no endpoint serves".to_string(),
        )
    } else if all_ready && rolled_out {
        (
            true,
            "AllReplicasReady",
            if shards_desired == 0 {
                format!("{f_ready} frontends ready (no expert shards)")
            } else {
                format!("{f_ready} frontends and {e_ready} expert shards ready")
            },
        )
    } else if shards_desired == 0 {
        (
            false,
            "ReplicasNotReady",
            format!("{f_ready}/{frontend_desired} frontends ready (no expert shards)"),
        )
    } else {
        // A frontend reports ready only while it reaches every shard, so missing shards
        // are the likely reason for unready frontends: say so.
        let why = if f_ready < frontend_desired && e_ready < shards_desired {
            "; frontends are not ready while expert shards are missing"
        } else {
            ""
        };
        (
            false,
            "ReplicasNotReady",
            format!(
                "{f_ready}/{frontend_desired} frontends and {e_ready}/{shards_desired} expert shards ready{why}"
            ),
        )
    };
    let (progressing, progressing_reason, progressing_message) = if rolled_out {
        (
            false,
            "RolloutComplete",
            "every pod runs the current spec".to_string(),
        )
    } else {
        (
            true,
            "RollingOut",
            format!(
                "{f_updated}/{frontend_desired} frontends and {e_updated}/{shards_desired} expert shards updated"
            ),
        )
    };
    let (degraded, degraded_reason, degraded_message) = match &observed.apply_error {
        Some(err) => (true, "ApplyFailed", err.clone()),
        None => (
            false,
            "AsExpected",
            "the owned objects match the spec".to_string(),
        ),
    };

    let condition = |type_: &str, status: bool, reason: &str, message: String| {
        condition(md, type_, status, reason, message, &now)
    };

    ModelDeploymentStatus {
        observed_generation: generation,
        conditions: vec![
            condition(READY, ready, ready_reason, ready_message),
            condition(
                PROGRESSING,
                progressing,
                progressing_reason,
                progressing_message,
            ),
            condition(DEGRADED, degraded, degraded_reason, degraded_message),
        ],
        frontend: role(f_replicas, f_ready, frontend_desired, Component::Frontend),
        experts: role(e_replicas, e_ready, shards_desired, Component::ExpertShard),
        endpoint: Some(names.endpoint(spec.serving.port)),
        placement: observed
            .placement_revision
            .clone()
            .map(|revision| PlacementSummary {
                revision,
                shards: shards_desired,
                // The placement loop's, written under its own field manager.
                balanced: None,
            }),
        // The autoscaler's, written by it under its own field manager.
        autoscaling: None,
    }
}

/// The status of condition `type_`, if present.
pub fn condition_status<'a>(status: &'a ModelDeploymentStatus, type_: &str) -> Option<&'a str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{DeploymentStatus, StatefulSetStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn md() -> ModelDeployment {
        let mut md: ModelDeployment = serde_yaml::from_str(
            "
apiVersion: switchyard.dev/v1alpha1
kind: ModelDeployment
metadata: {name: md, namespace: ns, generation: 3, uid: u}
spec:
  image: w
  model: {pvc: {claimName: m}}
  frontend: {replicas: 2}
  experts: {shards: 3}
",
        )
        .unwrap();
        md.status = None;
        md
    }

    fn deployment(
        generation: i64,
        observed: i64,
        replicas: i32,
        ready: i32,
        updated: i32,
    ) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                generation: Some(generation),
                ..ObjectMeta::default()
            },
            status: Some(DeploymentStatus {
                observed_generation: Some(observed),
                replicas: Some(replicas),
                ready_replicas: Some(ready),
                updated_replicas: Some(updated),
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        }
    }

    fn statefulset(
        generation: i64,
        observed: i64,
        replicas: i32,
        ready: i32,
        updated: i32,
    ) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                generation: Some(generation),
                ..ObjectMeta::default()
            },
            status: Some(StatefulSetStatus {
                observed_generation: Some(observed),
                replicas,
                ready_replicas: Some(ready),
                updated_replicas: Some(updated),
                ..StatefulSetStatus::default()
            }),
            ..StatefulSet::default()
        }
    }

    fn time(s: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap())
    }

    #[test]
    fn all_ready_and_rolled_out_is_ready() {
        let md = md();
        let names = Names::new(&md).unwrap();
        let d = deployment(1, 1, 2, 2, 2);
        let s = statefulset(1, 1, 3, 3, 3);
        let observed = Observed {
            frontend: Some(&d),
            experts: Some(&s),
            ..Observed::default()
        };
        let status = derive(&md, &names, &observed, time(100));
        assert_eq!(condition_status(&status, READY), Some("True"));
        assert_eq!(condition_status(&status, PROGRESSING), Some("False"));
        assert_eq!(condition_status(&status, DEGRADED), Some("False"));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.frontend.summary.as_deref(), Some("2/2"));
        assert_eq!(status.experts.summary.as_deref(), Some("3/3"));
        assert_eq!(status.endpoint.as_deref(), Some("md.ns.svc:50051"));
        assert_eq!(
            status.frontend.selector.as_deref(),
            Some(
                "app.kubernetes.io/component=frontend,app.kubernetes.io/instance=md,app.kubernetes.io/name=switchyard"
            )
        );
    }

    #[test]
    fn a_workload_that_has_not_seen_its_new_spec_is_progressing_not_ready() {
        let md = md();
        let names = Names::new(&md).unwrap();
        let d = deployment(2, 1, 2, 2, 2);
        let s = statefulset(1, 1, 3, 3, 3);
        let observed = Observed {
            frontend: Some(&d),
            experts: Some(&s),
            ..Observed::default()
        };
        let status = derive(&md, &names, &observed, time(100));
        assert_eq!(condition_status(&status, READY), Some("False"));
        assert_eq!(condition_status(&status, PROGRESSING), Some("True"));
    }

    #[test]
    fn missing_shards_are_reported_with_counts() {
        let md = md();
        let names = Names::new(&md).unwrap();
        let d = deployment(1, 1, 2, 2, 2);
        let s = statefulset(1, 1, 3, 1, 3);
        let observed = Observed {
            frontend: Some(&d),
            experts: Some(&s),
            ..Observed::default()
        };
        let status = derive(&md, &names, &observed, time(100));
        let ready = status.conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason, "ReplicasNotReady");
        assert!(
            ready.message.contains("1/3 expert shards"),
            "{}",
            ready.message
        );
        // What the spec asks for, beside what is there.
        assert_eq!(status.experts.desired_replicas, md.spec.experts.shards);
        assert_eq!(status.frontend.desired_replicas, md.spec.frontend.replicas);
    }

    #[test]
    fn frontends_unready_while_shards_are_missing_are_reported_with_why() {
        let md = md();
        let names = Names::new(&md).unwrap();
        let d = deployment(1, 1, 2, 0, 2);
        let s = statefulset(1, 1, 3, 2, 3);
        let observed = Observed {
            frontend: Some(&d),
            experts: Some(&s),
            ..Observed::default()
        };
        let ready = derive(&md, &names, &observed, time(100))
            .conditions
            .into_iter()
            .find(|c| c.type_ == READY)
            .unwrap();
        assert!(
            ready.message.contains("0/2 frontends")
                && ready.message.contains("2/3 expert shards")
                && ready.message.contains("while expert shards are missing"),
            "{}",
            ready.message
        );
    }

    #[test]
    fn without_shards_ready_frontends_are_ready_and_no_statefulset_is_expected() {
        let mut md = md();
        md.spec.experts.shards = 0;
        let names = Names::new(&md).unwrap();
        let d = deployment(1, 1, 2, 2, 2);
        let observed = Observed {
            frontend: Some(&d),
            experts: None,
            ..Observed::default()
        };
        let status = derive(&md, &names, &observed, time(100));
        assert_eq!(condition_status(&status, READY), Some("True"));
        assert_eq!(condition_status(&status, PROGRESSING), Some("False"));
        let ready = status.conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(ready.message, "2 frontends ready (no expert shards)");
        assert_eq!(status.experts.summary.as_deref(), Some("0/0"));
    }

    #[test]
    fn an_apply_error_is_degraded_and_transition_times_only_move_on_change() {
        let mut md = md();
        let names = Names::new(&md).unwrap();
        let d = deployment(1, 1, 2, 2, 2);
        let s = statefulset(1, 1, 3, 3, 3);
        let ok = Observed {
            frontend: Some(&d),
            experts: Some(&s),
            ..Observed::default()
        };
        md.status = Some(derive(&md, &names, &ok, time(100)));
        let failing = Observed {
            apply_error: Some("forbidden".into()),
            ..ok.clone()
        };
        let status = derive(&md, &names, &failing, time(200));
        let get = |t: &str| {
            status
                .conditions
                .iter()
                .find(|c| c.type_ == t)
                .unwrap()
                .clone()
        };
        assert_eq!(get(DEGRADED).status, "True");
        assert_eq!(get(DEGRADED).message, "forbidden");
        assert_eq!(get(DEGRADED).last_transition_time, time(200));
        assert_eq!(
            get(PROGRESSING).last_transition_time,
            time(100),
            "unchanged"
        );
    }

    #[test]
    fn zero_frontends_is_not_ready_with_a_reason() {
        let mut md = md();
        md.spec.frontend.replicas = 0;
        let names = Names::new(&md).unwrap();
        let status = derive(&md, &names, &Observed::default(), time(1));
        let ready = status.conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(ready.reason, "ScaledToZero");
    }
}
