//! The shell around [`super::decide`]: one loop per ModelDeployment with
//! `spec.autoscaling.enabled`, on the leader only.
//!
//! ```text
//!   run(): every second, a loop for each ModelDeployment in the controller's cache that
//!          has autoscaling enabled; a loop whose object is disabled stops by itself and
//!          takes its status.autoscaling with it; one whose object is gone is stopped
//!   loop:  targets  ready frontend pods (a Pod reflector), their metrics port
//!          poll     sample::poll ─> sample::merge ─> history (stable window + delay)
//!          decide   decide(history, policy, current, now)
//!          write    a new count: PATCH /scale, an event, a decision in status
//!                   status.autoscaling + ScalingActive/ScalingLimited: on change, else
//!                   every STATUS_EVERY (server-side apply, its own field manager)
//! ```
//!
//! `current` is `spec.frontend.replicas`: replicas still starting count, so a spike does
//! not ask for them twice, and the scale-down delay protects them too. The autoscaler
//! writes it through the scale subresource, as an HPA would; reconcile rolls it out, and
//! frontends removed on scale-down drain (`spec.serving.drainSeconds`) without cutting a
//! stream.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};

use super::decide::ANONYMOUS;
use super::sample;
use super::{Decision, Policy, Reason, Sample, decide};
use crate::api::{
    AutoscalingMode, AutoscalingSpec, AutoscalingStatus, ModelDeployment, ModelDeploymentSpec,
    ScalingDecision, TierDemandStatus,
};
use crate::build::{Component, Names};
use crate::fleet::{self, targets};
pub use crate::fleet::{Shared, frontend_pods_selector, targets_in};

/// The autoscaler's field manager (status.autoscaling, its conditions, the scale writes).
pub const FIELD_MANAGER: &str = "switchyard-autoscaler";
/// `ScalingActive`: the frontends report demand and decisions are being made.
pub const SCALING_ACTIVE: &str = "ScalingActive";
/// `ScalingLimited`: a bound (min/max replicas, a scale rate) held the count back.
pub const SCALING_LIMITED: &str = "ScalingLimited";
/// Status is rewritten at least this often while nothing changes (signal values).
const STATUS_EVERY: Duration = Duration::from_secs(5);
/// Decisions kept in status.
const DECISIONS_KEPT: usize = 5;
/// The share of `frontend.maxReplicas` anonymous callers and the default tier may buy
/// when `autoscaling.tierBudgets` does not list them.
pub const DEFAULT_BUDGET_PERCENT: i32 = 50;
/// The worker's name for its built-in tier (no `admission.defaultTier`).
const BUILT_IN_TIER: &str = "default";

/// Keeps one loop running per enabled ModelDeployment until `stopped` completes.
pub async fn run(shared: Shared, stopped: impl std::future::Future<Output = ()>) {
    fleet::supervise(
        shared,
        |md| enabled(md).is_some(),
        |shared, key, uid| tokio::spawn(scale_loop(shared, key, uid)),
        stopped,
    )
    .await;
}

fn enabled(md: &ModelDeployment) -> Option<&AutoscalingSpec> {
    md.spec.autoscaling.as_ref().filter(|a| a.enabled)
}

/// The decision rules `spec` asks for.
pub fn policy(spec: &AutoscalingSpec) -> Policy {
    let secs = |s: i32| Duration::from_secs(u64::try_from(s).unwrap_or_default());
    Policy {
        target_per_replica: f64::from(spec.target_queue_depth.max(1)),
        stable_window: secs(spec.stable_window_seconds),
        panic_window: secs(spec.panic_window_seconds),
        panic_threshold: f64::from(spec.panic_threshold_percent) / 100.0,
        max_scale_up_rate: f64::from(spec.max_scale_up_rate),
        max_scale_down_rate: f64::from(spec.max_scale_down_rate),
        scale_down_delay: secs(spec.scale_down_delay_seconds),
        min: u32::try_from(spec.frontend.min_replicas).unwrap_or_default(),
        max: u32::try_from(spec.frontend.max_replicas).unwrap_or_default(),
        tier_budgets: BTreeMap::new(),
    }
}

/// The frontends each bounded tier's demand may buy: `autoscaling.tierBudgets` (a share
/// of `frontend.maxReplicas`, rounded up), with [`DEFAULT_BUDGET_PERCENT`] for anonymous
/// callers and the default tier where it does not list them. Unlisted others: unbounded.
pub fn tier_budgets(md: &ModelDeploymentSpec, spec: &AutoscalingSpec) -> BTreeMap<String, u32> {
    let max = u32::try_from(spec.frontend.max_replicas).unwrap_or_default();
    let frontends = |percent: i32| {
        (max * u32::try_from(percent.clamp(0, 100)).unwrap_or_default()).div_ceil(100)
    };
    let default_tier = md
        .admission
        .default_tier
        .clone()
        .unwrap_or_else(|| BUILT_IN_TIER.into());
    let mut budgets: BTreeMap<String, u32> = [ANONYMOUS.to_string(), default_tier]
        .into_iter()
        .map(|tier| (tier, frontends(DEFAULT_BUDGET_PERCENT)))
        .collect();
    for b in &spec.tier_budgets {
        budgets.insert(b.tier.clone(), frontends(b.max_frontends_percent));
    }
    budgets
}

/// [`policy`] for `md`, with its tier budgets in requests (frontends × target), and the
/// budgets in frontends.
pub fn deployment_policy(
    md: &ModelDeploymentSpec,
    spec: &AutoscalingSpec,
) -> (Policy, BTreeMap<String, u32>) {
    let mut policy = policy(spec);
    let budgets = tier_budgets(md, spec);
    policy.tier_budgets = budgets
        .iter()
        .map(|(tier, &n)| (tier.clone(), f64::from(n) * policy.target_per_replica))
        .collect();
    (policy, budgets)
}

/// Per tier of `sample`: its demand, what it counts for, and its budget in frontends.
pub fn tiers_status(
    sample: &Sample,
    policy: &Policy,
    budgets: &BTreeMap<String, u32>,
) -> Vec<TierDemandStatus> {
    sample
        .by_tier(&policy.tier_budgets)
        .into_iter()
        .map(|(tier, (demand, counted))| TierDemandStatus {
            tier: tier.to_string(),
            demand: decimal(demand),
            counted: decimal(counted),
            budget_frontends: budgets
                .get(tier)
                .map(|&n| i32::try_from(n).unwrap_or(i32::MAX)),
        })
        .collect()
}

/// The ready, running `component` pods of `names`' deployment, with their metrics
/// address (the container port named `metrics`, else the default one).
/// One ModelDeployment's loop; returns when it is gone, replaced or disabled.
async fn scale_loop(shared: Shared, key: ObjectRef<ModelDeployment>, uid: String) {
    let started = Instant::now();
    let now_ms = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut history: VecDeque<Sample> = VecDeque::new();
    // A count written and not yet seen in the cache: (count, when).
    let mut pending: Option<(i32, Instant)> = None;
    let mut last_status: Option<(Instant, AutoscalingStatus, bool, String)> = None;
    let mut shard_scaler = ShardScaler::default();
    // In Shadow: the count last recommended, which the next decision starts from (as the
    // written count would in Active); switching to Active applies it.
    let mut recommended: Option<i32> = None;
    tracing::info!(deployment = %key, "autoscaler started");
    loop {
        let tick = Instant::now();
        let Some(md) = fleet::current(&shared, &key, &uid) else {
            break;
        };
        let Some(spec) = enabled(&md).cloned() else {
            clear_status(&shared.client, &md).await;
            break;
        };
        let Ok(names) = Names::new(&md) else { break };
        let interval =
            Duration::from_millis(u64::try_from(spec.poll_interval_milliseconds).unwrap_or(500));
        let (policy, budgets) = deployment_policy(&md.spec, &spec);
        let shadow = spec.mode == AutoscalingMode::Shadow;

        let targets = targets(&shared.pods, &names, Component::Frontend);
        let polled = sample::poll(&targets, interval.min(Duration::from_secs(1))).await;
        let at = now_ms();
        let (sample, seen) = sample::merge(
            at,
            u32::try_from(targets.len()).unwrap_or(u32::MAX),
            &polled.reports,
        );
        let labels = [names.namespace.as_str(), names.deployment.as_str()];
        shared
            .metrics
            .autoscaler_poll_failures
            .with_label_values(&labels)
            .inc_by(polled.failures.len() as u64);
        if let Some(first) = polled.failures.first() {
            tracing::debug!(deployment = %key, failures = polled.failures.len(), first = %first, "frontends did not report demand");
        }
        // No answer at all is no information, not zero demand.
        if sample.reporting > 0 {
            history.push_back(sample.clone());
        }
        let keep = policy.stable_window + policy.scale_down_delay + Duration::from_secs(1);
        while history
            .front()
            .is_some_and(|s| s.at_ms + (keep.as_millis() as u64) < at)
        {
            history.pop_front();
        }

        let spec_replicas = md.spec.frontend.replicas;
        let current = match pending {
            Some((count, since)) if spec_replicas != count && since.elapsed() < STATUS_EVERY => {
                count
            }
            _ => {
                pending = None;
                spec_replicas
            }
        };
        let basis = recommended.take().unwrap_or(current);
        let decision = decide(
            history.make_contiguous(),
            &policy,
            u32::try_from(basis).unwrap_or_default(),
            at,
        );
        let desired = i32::try_from(decision.desired).unwrap_or(i32::MAX);
        shared
            .metrics
            .autoscaler_desired
            .with_label_values(&labels)
            .set(i64::from(desired));
        shared
            .metrics
            .autoscaler_demand
            .with_label_values(&[labels[0], labels[1], "stable"])
            .set(decision.stable_demand);
        shared
            .metrics
            .autoscaler_demand
            .with_label_values(&[labels[0], labels[1], "panic"])
            .set(decision.panic_demand);
        shared
            .metrics
            .autoscaler_demand
            .with_label_values(&[labels[0], labels[1], "all"])
            .set(seen.total);

        let mut decisions = last_status
            .as_ref()
            .map(|(_, s, _, _)| s.decisions.clone())
            .or_else(|| {
                md.status
                    .as_ref()
                    .and_then(|s| s.autoscaling.as_ref())
                    .map(|a| a.decisions.clone())
            })
            .unwrap_or_default();
        let mut changed = false;
        if shadow {
            if desired != basis {
                changed = true;
                let mut record = record(basis, desired, &decision, seen.total);
                record.applied = false;
                publish(&shared, &md, record, &policy, &mut decisions).await;
            }
            recommended = Some(desired);
        } else if desired != current {
            match scale(&shared.client, &md, desired).await {
                Ok(()) => {
                    changed = true;
                    pending = Some((desired, Instant::now()));
                    let record = record(current, desired, &decision, seen.total);
                    publish(&shared, &md, record, &policy, &mut decisions).await;
                }
                Err(e) => {
                    tracing::warn!(deployment = %key, error = %e, from = current, to = desired, "could not scale the frontends");
                }
            }
        }

        let written = changed && !shadow;
        let shards = shard_scaler
            .step(&shared, &md, &spec, at, &mut decisions)
            .await;

        changed |= shards.as_ref().is_some_and(|s| s.changed);

        let status = AutoscalingStatus {
            mode: Some(spec.mode),
            reason: Some(format!("{:?}", decision.reason)),
            tiers: tiers_status(&sample, &policy, &budgets),
            desired_shards: shards.as_ref().map(|s| s.desired),
            current_shards: shards.as_ref().map(|s| s.current),
            reporting_shards: shards.as_ref().map(|s| s.reporting),
            shard_utilization: shards.as_ref().map(|s| decimal(s.utilization)),
            desired_frontends: desired,
            current_frontends: if written { desired } else { current },
            ready_frontends: i32::try_from(targets.len()).unwrap_or(i32::MAX),
            reporting_frontends: i32::try_from(sample.reporting).unwrap_or(i32::MAX),
            stable_demand: decimal(decision.stable_demand),
            panic_demand: decimal(decision.panic_demand),
            total_demand: decimal(seen.total),
            refused_per_second: Some(decimal(seen.refused_per_second)),
            tokens_per_second: Some(decimal(seen.tokens_per_second)),
            kv_cache_used_percent: seen
                .kv_used_percent
                .map(|p| i32::try_from(p).unwrap_or(100)),
            ttft_p99_seconds: seen.ttft_p99_seconds.map(|s| format!("{s:.3}")),
            sampled_at: Some(Time(k8s_openapi::jiff::Timestamp::now())),
            decisions,
        };
        let active = sample.reporting > 0;
        let limited = limited_message(&decision, &policy, &sample);
        let due = match &last_status {
            None => true,
            Some((when, previous, was_active, was_limited)) => {
                changed
                    || when.elapsed() >= STATUS_EVERY
                    || *was_active != active
                    || *was_limited != limited
                    || previous.ready_frontends != status.ready_frontends
                    || previous.desired_frontends != status.desired_frontends
                    || previous.desired_shards != status.desired_shards
            }
        };
        if due {
            if last_status
                .as_ref()
                .is_none_or(|(_, _, was, _)| *was != active)
            {
                tracing::info!(deployment = %key, ready = targets.len(), reporting = sample.reporting, "demand signal {}", if active { "active" } else { "lost: holding the count" });
            }
            let failures = (!active).then(|| polled.failures.join("; "));
            match write_status(&shared.client, &md, &status, failures, &limited, shadow).await {
                Ok(()) => last_status = Some((Instant::now(), status, active, limited)),
                Err(e) => {
                    tracing::warn!(deployment = %key, error = %e, "could not write status.autoscaling")
                }
            }
        }
        tokio::time::sleep(interval.saturating_sub(tick.elapsed())).await;
    }
    tracing::info!(deployment = %key, "autoscaler stopped");
}

/// The expert-shard half of a loop (`autoscaling.experts`): the shards' `/load`, the pods
/// their busiest experts need ([`sample::pods_needed`]), [`decide`] with the same windows
/// and rates, and `spec.experts.replicaShards` written to match.
#[derive(Debug, Default)]
struct ShardScaler {
    history: VecDeque<Sample>,
    /// A count written and not yet seen in the cache: (count, when).
    pending: Option<(i32, Instant)>,
    /// In Shadow: the count last recommended (as for the frontends).
    recommended: Option<i32>,
}

/// What the shard half saw and did, for status.
#[derive(Debug)]
struct ShardView {
    desired: i32,
    current: i32,
    reporting: i32,
    /// Mean utilisation of the reporting shards.
    utilization: f64,
    changed: bool,
}

impl ShardScaler {
    /// One poll of the shards of `md` (whose `autoscaling.experts` is `spec.experts`);
    /// `None` when it has no shards or no shard autoscaling.
    async fn step(
        &mut self,
        shared: &Shared,
        md: &ModelDeployment,
        spec: &AutoscalingSpec,
        at: u64,
        decisions: &mut Vec<ScalingDecision>,
    ) -> Option<ShardView> {
        let experts = spec.experts.as_ref()?;
        let shards = u32::try_from(md.spec.experts.shards)
            .ok()
            .filter(|&n| n > 0)?;
        let names = &Names::new(md).ok()?;
        let targets = targets(&shared.pods, names, Component::ExpertShard);
        let interval =
            Duration::from_millis(u64::try_from(spec.poll_interval_milliseconds).unwrap_or(500));
        let polled = sample::poll_shards(&targets, interval.min(Duration::from_secs(1))).await;
        let target = f64::from(experts.target_utilization_percent) / 100.0;
        let needed = sample::pods_needed(&polled.reports, shards, target);
        let reporting = u32::try_from(polled.reports.len()).unwrap_or(u32::MAX);
        let utilization = if polled.reports.is_empty() {
            0.0
        } else {
            polled.reports.iter().map(|l| l.utilisation).sum::<f64>() / f64::from(reporting)
        };
        if reporting > 0 {
            // The signal in pods: decide() with a target of 1 per pod.
            self.history.push_back(Sample {
                at_ms: at,
                ready: u32::try_from(targets.len()).unwrap_or(u32::MAX),
                reporting,
                tenants: vec![super::TenantDemand {
                    tier: String::new(),
                    demand: f64::from(needed),
                    cap: None,
                }],
            });
        }
        let mut policy = policy(spec);
        policy.target_per_replica = 1.0;
        policy.min = u32::try_from(experts.min_shards).unwrap_or(1).max(shards);
        policy.max = u32::try_from(experts.max_shards)
            .unwrap_or(1)
            .max(policy.min);
        let keep = policy.stable_window + policy.scale_down_delay + Duration::from_secs(1);
        while self
            .history
            .front()
            .is_some_and(|s| s.at_ms + (keep.as_millis() as u64) < at)
        {
            self.history.pop_front();
        }
        let spec_pods = md.spec.experts.shards + md.spec.experts.replica_shards;
        let current = match self.pending {
            Some((count, since)) if spec_pods != count && since.elapsed() < STATUS_EVERY => count,
            _ => {
                self.pending = None;
                spec_pods
            }
        };
        let shadow = spec.mode == AutoscalingMode::Shadow;
        let basis = self.recommended.take().unwrap_or(current);
        let decision = decide(
            self.history.make_contiguous(),
            &policy,
            u32::try_from(basis).unwrap_or_default(),
            at,
        );
        let desired = i32::try_from(decision.desired).unwrap_or(i32::MAX);
        let labels = [names.namespace.as_str(), names.deployment.as_str()];
        shared
            .metrics
            .autoscaler_desired_shards
            .with_label_values(&labels)
            .set(i64::from(desired));
        let mut changed = false;
        if shadow {
            if desired != basis {
                changed = true;
                let mut record = record(basis, desired, &decision, f64::from(needed));
                record.role = Component::ExpertShard.as_str().into();
                record.applied = false;
                publish(shared, md, record, &policy, decisions).await;
            }
            self.recommended = Some(desired);
        } else if desired != current {
            match copies(&shared.client, md, desired - md.spec.experts.shards).await {
                Ok(()) => {
                    changed = true;
                    self.pending = Some((desired, Instant::now()));
                    let mut record = record(current, desired, &decision, f64::from(needed));
                    record.role = Component::ExpertShard.as_str().into();
                    publish(shared, md, record, &policy, decisions).await;
                }
                Err(e) => {
                    tracing::warn!(deployment = %names.deployment, error = %e, from = current, to = desired, "could not scale the expert shards");
                }
            }
        }
        Some(ShardView {
            desired,
            current: if changed && !shadow { desired } else { current },
            reporting: i32::try_from(reporting).unwrap_or(i32::MAX),
            utilization,
            changed,
        })
    }
}

/// `spec.experts.replicaShards = count` (a merge patch of that one field).
async fn copies(client: &Client, md: &ModelDeployment, count: i32) -> kube::Result<()> {
    api(client, md)
        .patch(
            &md.name_any(),
            &writes(),
            &Patch::Merge(serde_json::json!({ "spec": { "experts": { "replicaShards": count } } })),
        )
        .await
        .map(drop)
}

/// The namespaced API of `md`.
fn api(client: &Client, md: &ModelDeployment) -> Api<ModelDeployment> {
    Api::namespaced(client.clone(), &md.namespace().unwrap_or_default())
}

/// The autoscaler's writes: under [`FIELD_MANAGER`].
fn writes() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// Two decimals: status and events are read by people.
fn decimal(v: f64) -> String {
    format!("{v:.2}")
}

fn record(from: i32, to: i32, decision: &Decision, total: f64) -> ScalingDecision {
    ScalingDecision {
        time: Time(k8s_openapi::jiff::Timestamp::now()),
        applied: true,
        role: Component::Frontend.as_str().into(),
        from,
        to,
        reason: format!("{:?}", decision.reason),
        stable_demand: decimal(decision.stable_demand),
        panic_demand: decimal(decision.panic_demand),
        total_demand: decimal(total),
    }
}

/// Why a bound or a tier's budget holds the count back, or "" when none does.
fn limited_message(decision: &Decision, policy: &Policy, sample: &Sample) -> String {
    let bound = bound_message(decision, policy);
    let tiers: Vec<String> = sample
        .by_tier(&policy.tier_budgets)
        .into_iter()
        .filter(|(_, (demand, counted))| counted + 1e-9 < *demand)
        .map(|(tier, (demand, counted))| {
            format!(
                "tier {tier} at its budget (autoscaling.tierBudgets: {} frontends): its demand {demand:.2} counts as {counted:.2}",
                (counted / policy.target_per_replica.max(1e-9)).round()
            )
        })
        .collect();
    [bound, tiers.join("; ")]
        .into_iter()
        .filter(|m| !m.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why `min`, `max` or a rate holds the count back, or "".
fn bound_message(decision: &Decision, policy: &Policy) -> String {
    match decision.reason {
        Reason::Bounded if decision.desired >= policy.max => format!(
            "at autoscaling.frontend.maxReplicas ({}): demand wants more",
            policy.max
        ),
        Reason::Bounded => format!(
            "at autoscaling.frontend.minReplicas ({}): demand wants fewer",
            policy.min
        ),
        Reason::RateLimited => format!(
            "held to {} by maxScaleUpRate / maxScaleDownRate",
            decision.desired
        ),
        _ => String::new(),
    }
}

/// `spec.frontend.replicas = count`, through the scale subresource.
async fn scale(client: &Client, md: &ModelDeployment, count: i32) -> kube::Result<()> {
    api(client, md)
        .patch_scale(
            &md.name_any(),
            &writes(),
            &Patch::Merge(serde_json::json!({ "spec": { "replicas": count } })),
        )
        .await
        .map(drop)
}

/// A change written: its event, its count in the metrics, and its place in the last
/// [`DECISIONS_KEPT`] decisions of status.
async fn publish(
    shared: &Shared,
    md: &ModelDeployment,
    record: ScalingDecision,
    policy: &Policy,
    decisions: &mut Vec<ScalingDecision>,
) {
    announce(shared, md, &record, policy).await;
    shared
        .metrics
        .autoscaler_decisions
        .with_label_values(&[
            md.namespace().unwrap_or_default().as_str(),
            md.name_any().as_str(),
            &record.reason,
            if record.applied { "Active" } else { "Shadow" },
        ])
        .inc();
    decisions.push(record);
    let excess = decisions.len().saturating_sub(DECISIONS_KEPT);
    decisions.drain(..excess);
}

/// An event for each change, with the signal behind it.
async fn announce(shared: &Shared, md: &ModelDeployment, d: &ScalingDecision, policy: &Policy) {
    let direction = if d.to > d.from { "up" } else { "down" };
    let shadow = if d.applied {
        ""
    } else {
        "shadow, not applied: "
    };
    let event = Event {
        type_: EventType::Normal,
        reason: match (d.applied, d.to > d.from) {
            (true, true) => "ScaledUp",
            (true, false) => "ScaledDown",
            (false, true) => "RecommendScaleUp",
            (false, false) => "RecommendScaleDown",
        }
        .into(),
        note: Some(
            shadow.to_string()
                + &if d.role == Component::ExpertShard.as_str() {
                    format!(
                        "expert-shard pods {} → {} ({direction}, {}): the busiest experts need {} pods now, {} over the last {} s, {} over {} s (at the target utilisation)",
                        d.from,
                        d.to,
                        d.reason,
                        d.total_demand,
                        d.panic_demand,
                        policy.panic_window.as_secs(),
                        d.stable_demand,
                        policy.stable_window.as_secs(),
                    )
                } else {
                    format!(
                        "frontends {} → {} ({direction}, {}): legitimate demand {} over the last {} s, {} over {} s; target {} per frontend; all demand {}",
                        d.from,
                        d.to,
                        d.reason,
                        d.panic_demand,
                        policy.panic_window.as_secs(),
                        d.stable_demand,
                        policy.stable_window.as_secs(),
                        policy.target_per_replica,
                        d.total_demand,
                    )
                },
        ),
        action: "Autoscale".into(),
        secondary: None,
    };
    if let Err(e) = shared.recorder.publish(&event, &md.object_ref(&())).await {
        tracing::warn!(error = %e, "could not record an event");
    }
}

fn condition(
    md: &ModelDeployment,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
) -> Condition {
    crate::status::condition(
        md,
        type_,
        status,
        reason,
        message,
        &Time(k8s_openapi::jiff::Timestamp::now()),
    )
}

/// Server-side applies status.autoscaling and the two conditions, under
/// [`FIELD_MANAGER`] (reconcile owns the rest of status).
async fn write_status(
    client: &Client,
    md: &ModelDeployment,
    status: &AutoscalingStatus,
    failures: Option<String>,
    limited: &str,
    shadow: bool,
) -> kube::Result<()> {
    let active = match failures {
        None if shadow => condition(
            md,
            SCALING_ACTIVE,
            true,
            "Shadow",
            format!(
                "{} of {} ready frontends report demand; mode Shadow: recommendations only, no count is changed",
                status.reporting_frontends, status.ready_frontends
            ),
        ),
        None => condition(
            md,
            SCALING_ACTIVE,
            true,
            "Polling",
            format!(
                "{} of {} ready frontends report demand",
                status.reporting_frontends, status.ready_frontends
            ),
        ),
        Some(failures) => condition(
            md,
            SCALING_ACTIVE,
            false,
            "NoSignal",
            if status.ready_frontends == 0 {
                "no ready frontend to poll: the count is held".to_string()
            } else {
                format!("no ready frontend answered /demand: the count is held ({failures})")
            },
        ),
    };
    let limited = if limited.is_empty() {
        condition(
            md,
            SCALING_LIMITED,
            false,
            "WithinBounds",
            "the count is what demand wants".into(),
        )
    } else {
        // A bound first, then the tiers at their budgets (see `limited_message`).
        let reason = if limited.starts_with("tier ") {
            "TierBudget"
        } else {
            "Bounded"
        };
        condition(md, SCALING_LIMITED, true, reason, limited.to_string())
    };
    apply_status(
        client,
        md,
        serde_json::json!({ "autoscaling": status, "conditions": [active, limited] }),
    )
    .await
}

/// Gives up status.autoscaling and the autoscaler's conditions (autoscaling turned off).
async fn clear_status(client: &Client, md: &ModelDeployment) {
    if let Err(e) = apply_status(client, md, serde_json::json!({})).await {
        tracing::warn!(error = %e, "could not clear status.autoscaling");
    }
}

async fn apply_status(
    client: &Client,
    md: &ModelDeployment,
    status: serde_json::Value,
) -> kube::Result<()> {
    crate::status::apply(client, md, FIELD_MANAGER, status).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_autoscaling_field_reaches_the_policy() {
        let spec: AutoscalingSpec = serde_json::from_value(serde_json::json!({
            "enabled": true,
            "frontend": {"minReplicas": 2, "maxReplicas": 9},
            "targetQueueDepth": 7,
            "stableWindowSeconds": 30,
            "panicWindowSeconds": 3,
            "panicThresholdPercent": 150,
            "maxScaleUpRate": 4,
            "maxScaleDownRate": 3,
            "scaleDownDelaySeconds": 45,
            "pollIntervalMilliseconds": 250,
        }))
        .unwrap();
        assert_eq!(
            policy(&spec),
            Policy {
                target_per_replica: 7.0,
                stable_window: Duration::from_secs(30),
                panic_window: Duration::from_secs(3),
                panic_threshold: 1.5,
                max_scale_up_rate: 4.0,
                max_scale_down_rate: 3.0,
                scale_down_delay: Duration::from_secs(45),
                min: 2,
                max: 9,
                tier_budgets: BTreeMap::new(),
            }
        );
        // The defaults: KPA's, but a 2 s panic window and a 10× scale-up rate.
        let p = policy(&AutoscalingSpec::default());
        assert_eq!(
            (p.panic_window, p.panic_threshold, p.max_scale_up_rate),
            (Duration::from_secs(2), 2.0, 10.0)
        );
    }

    #[test]
    fn a_bound_that_holds_the_count_is_named() {
        let p = policy(&AutoscalingSpec::default());
        let at = |desired, reason| Decision {
            desired,
            reason,
            stable_demand: 0.0,
            panic_demand: 0.0,
        };
        let quiet = Sample {
            at_ms: 0,
            ready: 1,
            reporting: 1,
            tenants: vec![],
        };
        let limited = |d, p: &Policy| limited_message(&d, p, &quiet);
        assert!(limited(at(4, Reason::Bounded), &p).contains("maxReplicas (4)"));
        assert!(limited(at(1, Reason::Bounded), &p).contains("minReplicas (1)"));
        assert!(limited(at(3, Reason::RateLimited), &p).contains("maxScaleUpRate"));
        assert_eq!(limited(at(3, Reason::Panic), &p), "");

        // A tier over its budget is named, with its budget and what it counts for.
        let md: ModelDeploymentSpec = serde_json::from_value(serde_json::json!({
            "model": {"hostPath": {"path": "/m"}},
            "admission": {"apiKeySecret": {"name": "k"}, "defaultTier": "free",
                "tiers": [{"name": "free"}, {"name": "pro"}]},
        }))
        .unwrap();
        let (p, budgets) = deployment_policy(&md, &AutoscalingSpec::default());
        let tenant = |tier: &str, demand| crate::autoscale::TenantDemand {
            tier: tier.into(),
            demand,
            cap: None,
        };
        let sybils = Sample {
            tenants: vec![tenant("free", 30.0), tenant("pro", 30.0)],
            ..quiet
        };
        let message = limited_message(&at(3, Reason::Stable), &p, &sybils);
        assert_eq!(
            message,
            "tier free at its budget (autoscaling.tierBudgets: 2 frontends): its demand 30.00 counts as 10.00"
        );
        let tiers = tiers_status(&sybils, &p, &budgets);
        assert_eq!(
            (tiers[0].budget_frontends, tiers[1].budget_frontends),
            (Some(2), None),
            "{tiers:?}"
        );
    }

    #[test]
    fn tier_budgets_default_to_half_for_anonymous_callers_and_the_default_tier() {
        let md = |admission: serde_json::Value| -> ModelDeploymentSpec {
            serde_json::from_value(serde_json::json!({
                "model": {"hostPath": {"path": "/m"}}, "admission": admission,
            }))
            .unwrap()
        };
        let spec = |budgets: serde_json::Value| -> AutoscalingSpec {
            serde_json::from_value(serde_json::json!({
                "frontend": {"maxReplicas": 5}, "tierBudgets": budgets,
            }))
            .unwrap()
        };
        // No keys: everyone is anonymous, in the built-in tier; 50 % of 5 is 3.
        let budgets = tier_budgets(&md(serde_json::json!({})), &spec(serde_json::json!([])));
        assert_eq!(
            budgets,
            [("anonymous".into(), 3), ("default".into(), 3)].into()
        );
        // Listed tiers take their share (0 %: never adds one); others stay unbounded.
        let budgets = tier_budgets(
            &md(
                serde_json::json!({"defaultTier": "free", "tiers": [{"name": "free"}, {"name": "pro"}]}),
            ),
            &spec(serde_json::json!([
                {"tier": "free", "maxFrontendsPercent": 20},
                {"tier": "anonymous", "maxFrontendsPercent": 0},
            ])),
        );
        assert_eq!(
            budgets,
            [("anonymous".into(), 0), ("free".into(), 1)].into()
        );
    }
}
