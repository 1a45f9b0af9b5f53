//! The shell around [`super::decide`]: one loop per ModelDeployment with
//! `spec.experts.placement.strategy: balanced` and shards, on the leader only.
//!
//! ```text
//!   every POLL:  frontends' GET /expert-load ─> loads (last minute, summed)
//!                shards' GET /load            ─> the revision each holds
//!   Measuring:   verdict(imbalance now, plan's) ── Move ─> write phase 1 (b<n+1>, draining),
//!                                                          event Rebalancing ─> Moving
//!   Moving:      confirmed(b<n+1>) by every shard pod and every frontend
//!                  ─> write phase 2 (no draining: the lost experts are freed),
//!                     event Rebalanced ─> Measuring
//!   status.placement.balanced, on change or every STATUS_EVERY (its own field manager)
//! ```
//!
//! The file lives in the ConfigMap `<md>-placement` (key `placement.json`), which the
//! shard pods mount (optional): written here by server-side apply, never by reconcile. A
//! loop that starts (a new leader, a restart) reads it back, and resumes a move it finds
//! in phase 1. Shards hold the even spread until the file exists: the loop writes it
//! (`b0`, the even spread written down) as soon as the frontends report the model's
//! layers. A change of `experts.shards` rolls no pod and is a move like any other,
//! started at once: phase 1 lists the larger count (the pods past a smaller count drain
//! everything), phase 2 the new one, and `status.placement.balanced.shards` keeps the
//! StatefulSet at the larger count until phase 2 is written.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Resource;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use switchyard_proto::worker_config::PLACEMENT_FILE;

use super::decide::{self, LoadReport, Placement, Policy, ShardReport, Verdict};
use crate::api::{
    BalancedPlacementStatus, HotExpertStatus, ModelDeployment, PlacementStrategyName, RebalanceSpec,
};
use crate::build::{self, Component, Names};
use crate::fleet::{self, Shared, poll_json, targets};

/// The placement loop's field manager (the ConfigMap's data, status.placement.balanced).
pub const FIELD_MANAGER: &str = "switchyard-placement";
/// How often the loads are read.
const POLL: Duration = Duration::from_secs(5);
/// Status is rewritten at least this often while nothing changes.
const STATUS_EVERY: Duration = Duration::from_secs(15);
/// Hottest experts listed in status.
const HOTTEST: usize = 5;

/// Keeps one loop per balanced ModelDeployment until `stopped` completes.
pub async fn run(shared: Shared, stopped: impl std::future::Future<Output = ()>) {
    fleet::supervise(
        shared,
        balanced,
        |shared, key, uid| tokio::spawn(placement_loop(shared, key, uid)),
        stopped,
    )
    .await;
}

fn balanced(md: &ModelDeployment) -> bool {
    md.spec.experts.placement.strategy == PlacementStrategyName::Balanced
        && md.spec.experts.shards > 0
}

/// [`RebalanceSpec`] as a [`Policy`].
pub fn policy(spec: &RebalanceSpec) -> Policy {
    let secs = |v: i32| Duration::from_secs(u64::try_from(v).unwrap_or(0));
    Policy {
        threshold: f64::from(spec.imbalance_percent) / 100.0,
        sustain: secs(spec.sustain_seconds),
        min_interval: secs(spec.min_interval_seconds),
    }
}

/// What a measurement leads to: hold (why), or move to a plan (its imbalance, and why).
enum Next {
    Hold(String),
    Move(Placement, f64, String),
}

/// A move under way: the placement written in phase 1, and how many shards that file
/// lists (the larger of the two counts when the count changes).
#[derive(Debug)]
struct Moving {
    revision: String,
    to: Placement,
    entries: usize,
    started: Instant,
}

/// One ModelDeployment's loop; returns when it is gone, replaced or no longer balanced.
async fn placement_loop(shared: Shared, key: ObjectRef<ModelDeployment>, uid: String) {
    tracing::info!(deployment = %key, "placement loop started");
    let mut current: Option<(String, Placement)> = None;
    let mut moving: Option<Moving> = None;
    let mut resumed = false;
    let mut above_since: Option<Instant> = None;
    let mut last_move: Option<Instant> = None;
    let mut status = BalancedPlacementStatus {
        phase: "Measuring".into(),
        ..BalancedPlacementStatus::default()
    };
    let mut last_written: Option<(Instant, BalancedPlacementStatus)> = None;
    let mut tick = tokio::time::interval(POLL);
    loop {
        tick.tick().await;
        let Some(md) = fleet::current(&shared, &key, &uid) else {
            break;
        };
        let Ok(names) = Names::new(&md) else { break };
        let configmaps: Api<ConfigMap> = Api::namespaced(shared.client.clone(), &names.namespace);
        if !balanced(&md) {
            // Back to the even spread (or no shards): the file goes, and so does status.
            if let Err(e) = configmaps
                .delete(&names.placement, &DeleteParams::default())
                .await
                && !matches!(&e, kube::Error::Api(s) if s.code == 404)
            {
                tracing::warn!(error = %e, "could not delete the placement ConfigMap");
            }
            write_status(&shared, &md, None).await;
            break;
        }
        let shards = usize::try_from(md.spec.experts.shards).unwrap_or(0);
        let copies = usize::try_from(md.spec.experts.replica_shards).unwrap_or(0);
        let redundant = usize::try_from(md.spec.experts.redundant_experts).unwrap_or(0);
        let policy = policy(&md.spec.experts.placement.rebalance);

        // What the file says now: read once per loop (a new leader resumes from it).
        if !resumed {
            // Until the file could be read: status.placement.balanced.shards, which keeps
            // the shard pods a move still uses, is written only from what it says.
            let found = match configmaps.get_opt(&names.placement).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(deployment = %key, error = %e, "cannot read the placement ConfigMap yet");
                    continue;
                }
            };
            resumed = true;
            if let Some(cm) = found
                && let Some(text) = cm.data.as_ref().and_then(|d| d.get(PLACEMENT_FILE))
                && let Some(w) = decide::read_file(text)
            {
                tracing::info!(deployment = %key, revision = %w.revision, draining = w.draining, "resuming from the placement file");
                status.revision.clone_from(&w.revision);
                status.shards = i32::try_from(w.placement.shards).ok();
                if w.draining {
                    // Phase 1 of a move to fewer shards lists the ones it empties too.
                    let to = if w.placement.shards > shards {
                        w.placement.first(shards)
                    } else {
                        Some(w.placement.clone())
                    };
                    if let Some(to) = to {
                        moving = Some(Moving {
                            revision: w.revision.clone(),
                            entries: w.placement.shards,
                            to,
                            started: Instant::now(),
                        });
                    }
                }
                current = Some((w.revision, w.placement));
            }
        }

        let frontends = targets(&shared.pods, &names, Component::Frontend);
        let shard_pods = targets(&shared.pods, &names, Component::ExpertShard);
        let (f_poll, s_poll) = tokio::join!(
            poll_json::<LoadReport>(&frontends, "/expert-load", Duration::from_secs(2)),
            poll_json::<ShardReport>(&shard_pods, "/load", Duration::from_secs(2)),
        );
        let loads = decide::merge(&f_poll.reports);
        let now = Instant::now();

        // A move under way: finish it once every shard and frontend has the revision.
        if let Some(m) = &moving {
            let named: Vec<(String, LoadReport)> = frontends
                .iter()
                .map(|t| t.pod.clone())
                .zip(f_poll.reports.iter().cloned())
                .collect();
            let check = if !f_poll.failures.is_empty() || !s_poll.failures.is_empty() {
                Err(format!(
                    "not every pod answered: {}",
                    f_poll
                        .failures
                        .iter()
                        .chain(&s_poll.failures)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; ")
                ))
            } else if frontends.is_empty() {
                Err("no ready frontend to confirm the move".into())
            } else {
                decide::confirmed(&m.revision, m.entries + copies, &s_poll.reports, &named)
            };
            match check {
                Ok(()) => {
                    let body = decide::file(&m.revision, &m.to, None);
                    if let Err(e) = write_file(&shared, &md, &names, body).await {
                        status.message = Some(format!("writing the placement ConfigMap: {e}"));
                    } else {
                        let took = m.started.elapsed();
                        tracing::info!(deployment = %key, revision = %m.revision, seconds = took.as_secs_f64(), "placement move finished");
                        announce(
                            &shared,
                            &md,
                            "Rebalanced",
                            format!(
                                "placement {} in place on all {} shard pods after {:.1} s; the experts moved away are freed{}",
                                m.revision,
                                m.entries + copies,
                                took.as_secs_f64(),
                                if m.entries > m.to.shards {
                                    format!(", and the shard pods past {} go", m.to.shards)
                                } else {
                                    String::new()
                                }
                            ),
                        )
                        .await;
                        current = Some((m.revision.clone(), m.to.clone()));
                        status.shards = i32::try_from(m.to.shards).ok();
                        moving = None;
                        status.phase = "Measuring".into();
                        status.message = None;
                    }
                }
                Err(why) => {
                    status.phase = "Moving".into();
                    status.message = Some(format!("waiting: {why}"));
                }
            }
        }

        if moving.is_none() && !loads.is_empty() && current.is_none() {
            // No file yet: the even spread written down (b0), the base every move, and every
            // change of the shard count, starts from. The shards hold it already.
            match Placement::even(&loads, shards) {
                Ok(even) => {
                    match write_file(&shared, &md, &names, decide::file("b0", &even, None)).await {
                        Ok(()) => {
                            tracing::info!(deployment = %key, shards, "placement file written: the even spread (b0)");
                            status.revision = "b0".into();
                            status.shards = i32::try_from(shards).ok();
                            current = Some(("b0".into(), even));
                        }
                        Err(e) => {
                            status.message = Some(format!("writing the placement ConfigMap: {e}"));
                        }
                    }
                }
                Err(e) => status.message = Some(format!("cannot plan: {e}")),
            }
        }
        if moving.is_none()
            && !loads.is_empty()
            && let Some((here_revision, here)) = current.clone()
        {
            let measured = here.imbalance(&loads);
            status.imbalance = Some(format!("{measured:.3}"));
            status.slots_per_shard =
                i32::try_from(decide::slots(&loads, shards, redundant)).unwrap_or(i32::MAX);
            status.hottest = hottest(&loads, &here);
            if measured >= policy.threshold {
                above_since.get_or_insert(now);
            } else {
                above_since = None;
            }
            let tokens = decide::tokens_per_layer(&loads);
            let next = if here.shards != shards {
                // experts.shards changed: move at once, onto the plan for the new count (the
                // even spread of it while the load is too thin to plan from).
                let plan = if tokens >= decide::MIN_TOKENS_PER_LAYER {
                    Placement::balanced(&loads, shards, redundant).map(|(p, _)| p)
                } else {
                    Placement::even(&loads, shards)
                };
                match plan {
                    Ok(plan) => {
                        let imbalance = plan.imbalance(&loads);
                        Next::Move(
                            plan,
                            imbalance,
                            format!(
                                "experts.shards changed from {} to {shards}; imbalance {measured:.3}, the plan gives {imbalance:.3}",
                                here.shards
                            ),
                        )
                    }
                    Err(e) => Next::Hold(format!("cannot plan for {shards} shards: {e}")),
                }
            } else {
                // The plan is made only when the verdict needs it.
                let mut planned: Option<Result<(Placement, f64), String>> = None;
                let verdict = if tokens < decide::MIN_TOKENS_PER_LAYER {
                    Verdict::Hold(format!(
                        "{tokens:.0} routed tokens per MoE layer in the last minute: at least {} needed to plan",
                        decide::MIN_TOKENS_PER_LAYER
                    ))
                } else {
                    let plan = || match Placement::balanced(&loads, shards, redundant) {
                        Ok((plan, _)) => {
                            let imbalance = plan.imbalance(&loads);
                            planned = Some(Ok((plan, imbalance)));
                            imbalance
                        }
                        Err(e) => {
                            planned = Some(Err(format!("cannot plan: {e}")));
                            f64::INFINITY
                        }
                    };
                    decide::verdict(measured, plan, above_since, last_move, now, &policy)
                };
                match (verdict, planned) {
                    (_, Some(Err(why))) | (Verdict::Hold(why), _) => Next::Hold(why),
                    (Verdict::Move, Some(Ok((plan, imbalance)))) => {
                        let reason = format!(
                            "imbalance {measured:.3} ≥ {:.3} for {} s; the plan gives {imbalance:.3}",
                            policy.threshold,
                            above_since.map_or(0, |t| now.saturating_duration_since(t).as_secs())
                        );
                        Next::Move(plan, imbalance, reason)
                    }
                    (Verdict::Move, None) => Next::Hold("no plan was made".into()),
                }
            };
            match next {
                Next::Hold(why) => {
                    status.phase = if measured >= policy.threshold {
                        "Waiting".into()
                    } else {
                        "Measuring".into()
                    };
                    status.message = Some(why);
                }
                Next::Move(plan, planned_imbalance, reason) => {
                    let revision = format!("b{}", decide::move_number(&here_revision) + 1);
                    let entries = plan.shards.max(here.shards);
                    let body = decide::file(&revision, &plan, Some(&here));
                    match write_file(&shared, &md, &names, body).await {
                        Err(e) => {
                            status.message = Some(format!("writing the placement ConfigMap: {e}"));
                        }
                        Ok(()) => {
                            let moved = plan.gained_over(&here);
                            tracing::info!(deployment = %key, %revision, measured, planned = planned_imbalance, moved, from = here.shards, to = plan.shards, "moving experts");
                            announce(
                                &shared,
                                &md,
                                "Rebalancing",
                                format!(
                                    "placement {revision}: {reason}; {moved} (layer, expert) pairs load onto new shards, {} replicas beyond one per expert; shards keep what they lose until every shard and frontend has {revision}",
                                    plan.extra_replicas()
                                ),
                            )
                            .await;
                            status.revision.clone_from(&revision);
                            status.phase = "Moving".into();
                            status.imbalance_before = Some(format!("{measured:.3}"));
                            status.imbalance_after = Some(format!("{planned_imbalance:.3}"));
                            status.last_rebalance_time =
                                Some(Time(k8s_openapi::jiff::Timestamp::now()));
                            status.reason = Some(reason);
                            status.message = None;
                            status.hottest = hottest(&loads, &plan);
                            status.shards = i32::try_from(entries).ok();
                            last_move = Some(now);
                            above_since = None;
                            moving = Some(Moving {
                                revision,
                                to: plan,
                                entries,
                                started: now,
                            });
                        }
                    }
                }
            }
        } else if moving.is_none() && loads.is_empty() {
            status.imbalance = None;
            status.hottest.clear();
            status.message = Some(if frontends.is_empty() {
                "no ready frontend to read the expert load from".into()
            } else if !f_poll.failures.is_empty() {
                format!("reading the expert load: {}", f_poll.failures.join("; "))
            } else {
                "no routed tokens in the frontends' last minute".into()
            });
        }

        let due = last_written
            .as_ref()
            .is_none_or(|(at, s)| *s != status || at.elapsed() >= STATUS_EVERY);
        if due {
            write_status(&shared, &md, Some(&status)).await;
            last_written = Some((Instant::now(), status.clone()));
        }
    }
    tracing::info!(deployment = %key, "placement loop stopped");
}

fn hottest(loads: &decide::Loads, placement: &Placement) -> Vec<HotExpertStatus> {
    decide::hottest(loads, placement, HOTTEST)
        .into_iter()
        .map(|(layer, expert, share, shards)| HotExpertStatus {
            layer: i32::try_from(layer).unwrap_or(i32::MAX),
            expert: i32::try_from(expert).unwrap_or(i32::MAX),
            share: format!("{share:.3}"),
            shards: shards
                .into_iter()
                .map(|s| i32::try_from(s).unwrap_or(i32::MAX))
                .collect(),
        })
        .collect()
}

/// Server-side applies the ConfigMap `<md>-placement` with `placement.json` = `body`.
async fn write_file(
    shared: &Shared,
    md: &ModelDeployment,
    names: &Names,
    body: String,
) -> kube::Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(shared.client.clone(), &names.namespace);
    let owner = md.controller_owner_ref(&());
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": names.placement,
            "namespace": names.namespace,
            "labels": build::labels(names, None),
            "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
        },
        "data": { PLACEMENT_FILE: body },
    });
    api.patch(
        &names.placement,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(cm),
    )
    .await
    .map(drop)
}

/// An event on the ModelDeployment.
async fn announce(shared: &Shared, md: &ModelDeployment, reason: &str, note: String) {
    let event = Event {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(note),
        action: "Rebalance".into(),
        secondary: None,
    };
    if let Err(e) = shared.recorder.publish(&event, &md.object_ref(&())).await {
        tracing::warn!(error = %e, "could not record an event");
    }
}

/// Server-side applies status.placement.balanced (`None`: removes it).
async fn write_status(
    shared: &Shared,
    md: &ModelDeployment,
    status: Option<&BalancedPlacementStatus>,
) {
    let body = match status {
        Some(s) => serde_json::json!({ "placement": { "balanced": s } }),
        None => serde_json::json!({}),
    };
    if let Err(e) = crate::status::apply(&shared.client, md, FIELD_MANAGER, body).await {
        tracing::warn!(error = %e, "could not write status.placement.balanced");
    }
}
