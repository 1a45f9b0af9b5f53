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
    let mut state = LoopState::new(shared, key);
    let mut tick = tokio::time::interval(POLL);
    loop {
        tick.tick().await;
        let Some(md) = fleet::current(&state.shared, &state.key, &uid) else {
            break;
        };
        let Ok(names) = Names::new(&md) else { break };
        if !balanced(&md) {
            state.stop(&md, &names).await;
            break;
        }
        if state.round(&md, &names).await {
            state.report(&md).await;
        }
    }
    tracing::info!(deployment = %state.key, "placement loop stopped");
}

/// What one ModelDeployment's loop knows between rounds.
struct LoopState {
    shared: Shared,
    key: ObjectRef<ModelDeployment>,
    /// The placement file in force (its revision and what it says), once read or written.
    current: Option<(String, Placement)>,
    /// A move in phase 1.
    moving: Option<Moving>,
    /// Whether the file has been read back (a new leader resumes from it).
    resumed: bool,
    /// Since when the imbalance has been at or above the threshold.
    above_since: Option<Instant>,
    /// When the last move started.
    last_move: Option<Instant>,
    status: BalancedPlacementStatus,
    last_written: Option<(Instant, BalancedPlacementStatus)>,
}

/// The spec's numbers a round works with.
struct Round {
    shards: usize,
    copies: usize,
    redundant: usize,
    policy: Policy,
}

impl LoopState {
    fn new(shared: Shared, key: ObjectRef<ModelDeployment>) -> Self {
        Self {
            shared,
            key,
            current: None,
            moving: None,
            resumed: false,
            above_since: None,
            last_move: None,
            status: BalancedPlacementStatus {
                phase: "Measuring".into(),
                ..BalancedPlacementStatus::default()
            },
            last_written: None,
        }
    }

    /// Back to the even spread (or no shards): the file goes, and so does status.
    async fn stop(&self, md: &ModelDeployment, names: &Names) {
        let configmaps: Api<ConfigMap> =
            Api::namespaced(self.shared.client.clone(), &names.namespace);
        if let Err(e) = configmaps
            .delete(&names.placement, &DeleteParams::default())
            .await
            && !matches!(&e, kube::Error::Api(s) if s.code == 404)
        {
            tracing::warn!(error = %e, "could not delete the placement ConfigMap");
        }
        write_status(&self.shared, md, None).await;
    }

    /// One round: read the file back (once), poll the pods, finish a move, write the
    /// base file, measure and maybe move. `false` when the round could not run (the
    /// file could not be read back yet): nothing is reported then.
    async fn round(&mut self, md: &ModelDeployment, names: &Names) -> bool {
        let spec = &md.spec.experts;
        let round = Round {
            shards: usize::try_from(spec.shards).unwrap_or(0),
            copies: usize::try_from(spec.replica_shards).unwrap_or(0),
            redundant: usize::try_from(spec.redundant_experts).unwrap_or(0),
            policy: policy(&spec.placement.rebalance),
        };
        if !self.resumed && !self.resume(names, round.shards).await {
            return false;
        }
        let frontends = targets(&self.shared.pods, names, Component::Frontend);
        let shard_pods = targets(&self.shared.pods, names, Component::ExpertShard);
        let (f_poll, s_poll) = tokio::join!(
            poll_json::<LoadReport>(&frontends, "/expert-load", Duration::from_secs(2)),
            poll_json::<ShardReport>(&shard_pods, "/load", Duration::from_secs(2)),
        );
        let loads = decide::merge(&f_poll.reports);
        if self.moving.is_some() {
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
                let named: Vec<(String, LoadReport)> = frontends
                    .iter()
                    .map(|t| t.pod.clone())
                    .zip(f_poll.reports.iter().cloned())
                    .collect();
                self.moving.as_ref().map_or(Ok(()), |m| {
                    decide::confirmed(
                        &m.revision,
                        m.entries + round.copies,
                        &s_poll.reports,
                        &named,
                    )
                })
            };
            self.finish_move(md, names, check, round.copies).await;
        }
        if self.moving.is_some() {
            return true;
        }
        if loads.is_empty() {
            self.status.imbalance = None;
            self.status.hottest.clear();
            self.status.message = Some(if frontends.is_empty() {
                "no ready frontend to read the expert load from".into()
            } else if !f_poll.failures.is_empty() {
                format!("reading the expert load: {}", f_poll.failures.join("; "))
            } else {
                "no routed tokens in the frontends' last minute".into()
            });
            return true;
        }
        if self.current.is_none() {
            self.write_base(md, names, &loads, round.shards).await;
        }
        if let Some((revision, here)) = self.current.clone() {
            self.measure(md, names, &loads, (&revision, &here), &round)
                .await;
        }
        true
    }

    /// Reads the file back once: its placement is the one in force, and a move found in
    /// phase 1 is resumed. `false` while the ConfigMap cannot be read (until then
    /// status.placement.balanced.shards, which keeps the shard pods a move still uses,
    /// is not written).
    async fn resume(&mut self, names: &Names, shards: usize) -> bool {
        let configmaps: Api<ConfigMap> =
            Api::namespaced(self.shared.client.clone(), &names.namespace);
        let found = match configmaps.get_opt(&names.placement).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(deployment = %self.key, error = %e, "cannot read the placement ConfigMap yet");
                return false;
            }
        };
        self.resumed = true;
        let Some(w) = found
            .as_ref()
            .and_then(|cm| cm.data.as_ref()?.get(PLACEMENT_FILE))
            .and_then(|text| decide::read_file(text))
        else {
            return true;
        };
        tracing::info!(deployment = %self.key, revision = %w.revision, draining = w.draining, "resuming from the placement file");
        self.status.revision.clone_from(&w.revision);
        self.status.shards = i32::try_from(w.placement.shards).ok();
        if w.draining {
            // Phase 1 of a move to fewer shards lists the ones it empties too.
            let to = if w.placement.shards > shards {
                w.placement.first(shards)
            } else {
                Some(w.placement.clone())
            };
            if let Some(to) = to {
                self.moving = Some(Moving {
                    revision: w.revision.clone(),
                    entries: w.placement.shards,
                    to,
                    started: Instant::now(),
                });
            }
        }
        self.current = Some((w.revision, w.placement));
        true
    }

    /// Phase 2 of the move under way once `check` (every shard and frontend has its
    /// revision) holds: the file without `draining`, an Event, the move over.
    async fn finish_move(
        &mut self,
        md: &ModelDeployment,
        names: &Names,
        check: Result<(), String>,
        copies: usize,
    ) {
        let Some(m) = &self.moving else { return };
        if let Err(why) = check {
            self.status.phase = "Moving".into();
            self.status.message = Some(format!("waiting: {why}"));
            return;
        }
        let body = decide::file(&m.revision, &m.to, None);
        if let Err(e) = write_file(&self.shared, md, names, body).await {
            self.status.message = Some(format!("writing the placement ConfigMap: {e}"));
            return;
        }
        let took = m.started.elapsed();
        tracing::info!(deployment = %self.key, revision = %m.revision, seconds = took.as_secs_f64(), "placement move finished");
        let gone = if m.entries > m.to.shards {
            format!(", and the shard pods past {} go", m.to.shards)
        } else {
            String::new()
        };
        announce(
            &self.shared,
            md,
            "Rebalanced",
            format!(
                "placement {} in place on all {} shard pods after {:.1} s; the experts moved away are freed{gone}",
                m.revision,
                m.entries + copies,
                took.as_secs_f64(),
            ),
        )
        .await;
        self.status.shards = i32::try_from(m.to.shards).ok();
        self.status.phase = "Measuring".into();
        self.status.message = None;
        self.current = self.moving.take().map(|m| (m.revision, m.to));
    }

    /// No file yet: the even spread written down (b0), the base every move, and every
    /// change of the shard count, starts from. The shards hold it already.
    async fn write_base(
        &mut self,
        md: &ModelDeployment,
        names: &Names,
        loads: &decide::Loads,
        shards: usize,
    ) {
        let even = match Placement::even(loads, shards) {
            Ok(even) => even,
            Err(e) => {
                self.status.message = Some(format!("cannot plan: {e}"));
                return;
            }
        };
        match write_file(&self.shared, md, names, decide::file("b0", &even, None)).await {
            Ok(()) => {
                tracing::info!(deployment = %self.key, shards, "placement file written: the even spread (b0)");
                self.status.revision = "b0".into();
                self.status.shards = i32::try_from(shards).ok();
                self.current = Some(("b0".into(), even));
            }
            Err(e) => {
                self.status.message = Some(format!("writing the placement ConfigMap: {e}"));
            }
        }
    }

    /// The imbalance of the placement in force on `loads`, and a move when the spec's
    /// shard count differs from it or the verdict says so.
    async fn measure(
        &mut self,
        md: &ModelDeployment,
        names: &Names,
        loads: &decide::Loads,
        (here_revision, here): (&str, &Placement),
        round: &Round,
    ) {
        let now = Instant::now();
        let measured = here.imbalance(loads);
        self.status.imbalance = Some(format!("{measured:.3}"));
        self.status.slots_per_shard =
            i32::try_from(decide::slots(loads, round.shards, round.redundant)).unwrap_or(i32::MAX);
        self.status.hottest = hottest(loads, here);
        if measured >= round.policy.threshold {
            self.above_since.get_or_insert(now);
        } else {
            self.above_since = None;
        }
        match self.next(loads, here, measured, round, now) {
            Next::Hold(why) => {
                self.status.phase = if measured >= round.policy.threshold {
                    "Waiting".into()
                } else {
                    "Measuring".into()
                };
                self.status.message = Some(why);
            }
            Next::Move(plan, planned, reason) => {
                let revision = format!("b{}", decide::move_number(here_revision) + 1);
                let body = decide::file(&revision, &plan, Some(here));
                if let Err(e) = write_file(&self.shared, md, names, body).await {
                    self.status.message = Some(format!("writing the placement ConfigMap: {e}"));
                    return;
                }
                let moved = plan.gained_over(here);
                tracing::info!(deployment = %self.key, %revision, measured, planned, moved, from = here.shards, to = plan.shards, "moving experts");
                announce(
                    &self.shared,
                    md,
                    "Rebalancing",
                    format!(
                        "placement {revision}: {reason}; {moved} (layer, expert) pairs load onto new shards, {} replicas beyond one per expert; shards keep what they lose until every shard and frontend has {revision}",
                        plan.extra_replicas()
                    ),
                )
                .await;
                let entries = plan.shards.max(here.shards);
                self.status = BalancedPlacementStatus {
                    revision: revision.clone(),
                    phase: "Moving".into(),
                    imbalance_before: Some(format!("{measured:.3}")),
                    imbalance_after: Some(format!("{planned:.3}")),
                    last_rebalance_time: Some(Time(k8s_openapi::jiff::Timestamp::now())),
                    reason: Some(reason),
                    message: None,
                    hottest: hottest(loads, &plan),
                    shards: i32::try_from(entries).ok(),
                    ..self.status.clone()
                };
                self.last_move = Some(now);
                self.above_since = None;
                self.moving = Some(Moving {
                    revision,
                    to: plan,
                    entries,
                    started: now,
                });
            }
        }
    }

    /// Whether to move from `here`: at once onto the plan for a new shard count;
    /// otherwise when the verdict says so (the plan is made only when it needs it).
    fn next(
        &self,
        loads: &decide::Loads,
        here: &Placement,
        measured: f64,
        round: &Round,
        now: Instant,
    ) -> Next {
        let shards = round.shards;
        let tokens = decide::tokens_per_layer(loads);
        if here.shards != shards {
            // experts.shards changed: the plan for the new count (the even spread of it
            // while the load is too thin to plan from).
            let plan = if tokens >= decide::MIN_TOKENS_PER_LAYER {
                Placement::balanced(loads, shards, round.redundant).map(|(p, _)| p)
            } else {
                Placement::even(loads, shards)
            };
            return match plan {
                Ok(plan) => {
                    let imbalance = plan.imbalance(loads);
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
            };
        }
        if tokens < decide::MIN_TOKENS_PER_LAYER {
            return Next::Hold(format!(
                "{tokens:.0} routed tokens per MoE layer in the last minute: at least {} needed to plan",
                decide::MIN_TOKENS_PER_LAYER
            ));
        }
        let mut planned: Option<Result<(Placement, f64), String>> = None;
        let plan = || match Placement::balanced(loads, shards, round.redundant) {
            Ok((plan, _)) => {
                let imbalance = plan.imbalance(loads);
                planned = Some(Ok((plan, imbalance)));
                imbalance
            }
            Err(e) => {
                planned = Some(Err(format!("cannot plan: {e}")));
                f64::INFINITY
            }
        };
        let verdict = decide::verdict(
            measured,
            plan,
            self.above_since,
            self.last_move,
            now,
            &round.policy,
        );
        match (verdict, planned) {
            (_, Some(Err(why))) | (Verdict::Hold(why), _) => Next::Hold(why),
            (Verdict::Move, Some(Ok((plan, imbalance)))) => {
                let reason = format!(
                    "imbalance {measured:.3} ≥ {:.3} for {} s; the plan gives {imbalance:.3}",
                    round.policy.threshold,
                    self.above_since
                        .map_or(0, |t| now.saturating_duration_since(t).as_secs())
                );
                Next::Move(plan, imbalance, reason)
            }
            (Verdict::Move, None) => Next::Hold("no plan was made".into()),
        }
    }

    /// Writes status.placement.balanced when it changed, or every [`STATUS_EVERY`].
    async fn report(&mut self, md: &ModelDeployment) {
        let due = self
            .last_written
            .as_ref()
            .is_none_or(|(at, s)| *s != self.status || at.elapsed() >= STATUS_EVERY);
        if due {
            write_status(&self.shared, md, Some(&self.status)).await;
            self.last_written = Some((Instant::now(), self.status.clone()));
        }
    }
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
