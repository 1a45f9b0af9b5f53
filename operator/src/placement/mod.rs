//! Expert placement: which routed experts each expert shard holds.
//!
//! ```text
//!   frontends' /expert-load ─> run (leader) ─> decide (pure) ─> plan (pure)
//!                               │  poll, write <md>-placement, events, status
//!                               └─> shards re-read placement.json: make-before-break
//! ```
//!
//! - [`plan`]: one layer's placement from its experts' loads: the even spread, and the
//!   balanced packing of replicated experts (DeepSeek's EPLB).
//! - [`decide`]: the whole model's loads, plan and imbalance; when to move; the placement
//!   file of each phase of a move; whether every pod has taken a revision up.
//! - [`run`]: the loop per ModelDeployment with `experts.placement.strategy: balanced`.

pub mod decide;
pub mod plan;
pub mod run;

pub use plan::{LayerPlacement, PlanError, balanced, even_spread};
