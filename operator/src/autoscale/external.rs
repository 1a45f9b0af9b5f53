//! The demand signal for an external scaler: `GET /autoscaling/<namespace>/<name>` on the
//! operator's metrics port answers JSON that KEDA's `metrics-api` trigger reads as is
//! (`valueLocation: frontend.legitimateDemand`, `targetValue`: `targetQueueDepth`).
//!
//! ```text
//!   GET /autoscaling/<ns>/<name>
//!     the ModelDeployment (API) ─> its frontend and shard pods (API, ready ones)
//!     ─> sample::poll + merge (the same as the loop) ─> the tier budgets
//!     200  {"frontend": {"legitimateDemand": …, "desiredReplicas": …}, "tiers": {…}, …}
//!     404  no such ModelDeployment;  503  no frontend answered (hold, don't scale down)
//! ```
//!
//! Computed when asked, on any operator replica (the leader or a standby: nothing here
//! needs the loop's state), with or without `spec.autoscaling.enabled`: the numbers are
//! the last poll's, without windows, since the external scaler keeps its own (an HPA's
//! stabilisation window). Tier budgets and the target come from `spec.autoscaling` (its
//! defaults when absent).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt as _};
use serde::Serialize;

use super::run::{deployment_policy, targets_in};
use super::sample;
use crate::api::{AutoscalingMode, AutoscalingSpec, ModelDeployment};
use crate::build::{self, Component, Names};

/// The path prefix.
pub const PREFIX: &str = "/autoscaling/";
/// Each frontend's and shard's poll.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);

/// The answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalDemand {
    pub namespace: String,
    pub name: String,
    /// `spec.autoscaling.mode` while the operator's autoscaler is enabled; absent when
    /// it is off (the counts are the external scaler's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<AutoscalingMode>,
    /// `spec.autoscaling.targetQueueDepth`: the `targetValue` for
    /// `frontend.legitimateDemand`.
    pub target_queue_depth: i32,
    pub frontend: FrontendDemand,
    /// Per tier (anonymous callers as `anonymous`).
    pub tiers: BTreeMap<String, TierDemand>,
    /// With expert shards: what their utilisation asks for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_shards: Option<ShardDemand>,
}

/// The frontends' signal.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FrontendDemand {
    /// Requests in the system, each tenant up to its quota and each tier up to its
    /// budget: what to scale on.
    pub legitimate_demand: f64,
    /// All requests in the system, quota or not (shown, not to scale on).
    pub all_demand: f64,
    /// `ceil(legitimateDemand / targetQueueDepth)` within `autoscaling.frontend`'s bounds.
    pub desired_replicas: u32,
    pub ready: u32,
    pub reporting: u32,
}

/// One tier's part.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TierDemand {
    pub demand: f64,
    pub counted: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_frontends: Option<u32>,
}

/// The expert shards' signal.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardDemand {
    /// Shard pods (shards and copies) the busiest block's utilisation needs at the target.
    pub pods_needed: u32,
    pub ready: u32,
    pub reporting: u32,
}

/// Answers `GET {PREFIX}{rest}`: the HTTP status and the JSON body.
pub async fn answer(client: Client, rest: String) -> (u16, String) {
    let error = |status: u16, message: String| {
        (status, serde_json::json!({ "error": message }).to_string())
    };
    let mut parts = rest.split('/');
    let (Some(namespace), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return error(
            404,
            format!("expected {PREFIX}<namespace>/<name>, got {PREFIX}{rest}"),
        );
    };
    if namespace.is_empty() || name.is_empty() {
        return error(404, format!("expected {PREFIX}<namespace>/<name>"));
    }
    let md = match Api::<ModelDeployment>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
    {
        Ok(Some(md)) => md,
        Ok(None) => return error(404, format!("no ModelDeployment {namespace}/{name}")),
        Err(e) => {
            return error(
                502,
                format!("reading ModelDeployment {namespace}/{name}: {e}"),
            );
        }
    };
    let selector = format!(
        "{},{}={}",
        super::run::frontend_pods_selector(),
        build::MODEL_DEPLOYMENT_LABEL,
        md.name_any()
    );
    let pods = match Api::<Pod>::namespaced(client, namespace)
        .list(&ListParams::default().labels(&selector))
        .await
    {
        Ok(pods) => pods.items,
        Err(e) => return error(502, format!("listing the pods of {namespace}/{name}: {e}")),
    };
    match demand(&md, &pods).await {
        Ok(d) => (
            200,
            serde_json::to_string(&d).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")),
        ),
        Err(why) => error(503, why),
    }
}

/// What `md`'s ready pods among `pods` report now; an error when no frontend answers.
pub async fn demand(md: &ModelDeployment, pods: &[Pod]) -> Result<ExternalDemand, String> {
    let names = Names::new(md).map_err(|e| e.to_string())?;
    let enabled = md.spec.autoscaling.as_ref().filter(|a| a.enabled);
    let spec = md.spec.autoscaling.clone().unwrap_or_default();
    let (policy, budgets) = deployment_policy(&md.spec, &spec);

    let frontends = targets_in(pods.iter(), &names, Component::Frontend);
    let polled = sample::poll(&frontends, POLL_TIMEOUT).await;
    if polled.reports.is_empty() {
        return Err(if frontends.is_empty() {
            format!(
                "no ready frontend of {}/{} to poll: no signal (hold the count)",
                names.namespace, names.deployment
            )
        } else {
            format!(
                "no ready frontend answered /demand: no signal (hold the count): {}",
                polled.failures.join("; ")
            )
        });
    }
    let ready = u32::try_from(frontends.len()).unwrap_or(u32::MAX);
    let (sample, seen) = sample::merge(0, ready, &polled.reports);
    let legitimate = sample.counted(&policy.tier_budgets);
    let wanted = policy.replicas_for(legitimate);
    let tiers = sample
        .by_tier(&policy.tier_budgets)
        .into_iter()
        .map(|(tier, (demand, counted))| {
            let budget_frontends = budgets.get(tier).copied();
            (
                tier.to_string(),
                TierDemand {
                    demand,
                    counted,
                    budget_frontends,
                },
            )
        })
        .collect();
    let expert_shards = match u32::try_from(md.spec.experts.shards) {
        Ok(shards) if shards > 0 => {
            let targets = targets_in(pods.iter(), &names, Component::ExpertShard);
            let polled = sample::poll_shards(&targets, POLL_TIMEOUT).await;
            let target = f64::from(
                spec.experts
                    .clone()
                    .unwrap_or_default()
                    .target_utilization_percent,
            ) / 100.0;
            Some(ShardDemand {
                pods_needed: sample::pods_needed(&polled.reports, shards, target),
                ready: u32::try_from(targets.len()).unwrap_or(u32::MAX),
                reporting: u32::try_from(polled.reports.len()).unwrap_or(u32::MAX),
            })
        }
        _ => None,
    };
    Ok(ExternalDemand {
        namespace: names.namespace.clone(),
        name: names.deployment.clone(),
        mode: enabled.map(|a: &AutoscalingSpec| a.mode),
        target_queue_depth: spec.target_queue_depth,
        frontend: FrontendDemand {
            legitimate_demand: legitimate,
            all_demand: seen.total,
            desired_replicas: wanted.clamp(policy.min, policy.max.max(policy.min)),
            ready,
            reporting: sample.reporting,
        },
        tiers,
        expert_shards,
    })
}
