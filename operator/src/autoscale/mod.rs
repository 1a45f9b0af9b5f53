//! The autoscaler (issue 16): frontends sized by *legitimate* demand, polled from the
//! frontends themselves, sub-second.
//!
//! ```text
//!   every pollIntervalMilliseconds, per ModelDeployment with autoscaling.enabled
//!   (leader only):
//!     sample  GET /demand on every ready frontend pod (metrics port), in parallel
//!             └─ per tenant: queued + running requests admitted within quota, and
//!                the most its quota can keep in the system (cap)
//!     decide  decide(history, policy, current, now)              pure, unit-tested
//!     write   a new count ─> PATCH modeldeployments/scale (spec.frontend.replicas);
//!             reconcile rolls it out; drain keeps every stream on scale-down
//!             status.autoscaling, ScalingActive / ScalingLimited, an event per change,
//!             switchyard_operator_autoscaler_* metrics
//! ```
//!
//! KPA-shaped (Knative's stable and panic windows), with one difference that is the point:
//! the signal is *legitimate* demand. A tenant counts for at most what its quota lets it
//! keep in the system, so a flood buys nothing, while a spike of in-quota callers is seen
//! within the panic window:
//!
//! ```text
//!   legitimate(sample) = Σ tenants min(demand, quota cap)     refused and over-quota = 0
//!   stable  = mean legitimate over the stable window   → ceil(stable / target)
//!   panic   = mean legitimate over the panic window    → ceil(panic / target)
//!   panicking while, within the last stable window, panic desired ≥ threshold × ready
//!     (then: the panic window's peak so far, never below the current count)
//!   scale-down: only to the highest count either window wanted over the last
//!     scale-down delay (so periodic bursts keep their replicas: no Yo-Yo)
//!   rates: at most up_rate × current up, current / down_rate down; then min..max
//! ```
//!
//! - [`decide`]: the decision core, pure.
//! - [`sample`]: one poll of the frontends, merged into a [`Sample`].
//! - [`run`]: the loop per ModelDeployment and the writer (scale, status, events, metrics).
//! - [`external`]: the same signal for KEDA or any external scaler
//!   (`GET /autoscaling/<namespace>/<name>`).
//! - [`sim`]: a deterministic simulation comparing ours with an aggregate-queue-depth
//!   policy on the same trace (`switchyard-operator simulate`).

pub mod decide;
pub mod external;
pub mod run;
pub mod sample;
pub mod sim;

pub use decide::{Decision, Policy, Reason, Sample, TenantDemand, decide};
