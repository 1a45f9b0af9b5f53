//! Expert parallelism: routed experts served by expert-shard processes, called by
//! frontends once per MoE layer over gRPC (`switchyard.expert.v1.ExpertShard`).
//!
//! ```text
//!  frontend (engine thread)                                   expert shards
//!   MoeBlock::dispatch ── RemoteExperts::dispatch ──Forward──> shard::ShardService
//!     route rows → pick a holder per (layer, expert)           │ holds its placement's
//!     one RPC per shard, all at once; reroute on failure       │ experts only (LocalExperts)
//!   Pending::wait ── partial sums added in a fixed order <─────┘ Σ weight · expert(row)
//!   refresh task: Describe every shard → who holds what, who is up
//! ```
//!
//! - [`placement`]: which experts a shard holds (a placement file, the operator's even
//!   spread, or all of them).
//! - [`wire`]: hidden rows as packed f32/bf16/f16 bytes.
//! - [`shard`]: the expert-shard role: the `ExpertShard` service and its metrics.
//! - [`remote`]: [`remote::RemoteExperts`], the frontend's [`crate::model::moe::ExpertBackend`]
//!   over shards: discovery, holder choice by outstanding work, failover, metrics.
//!
//! A shard and a frontend only work together when their [`identity`] is equal: the same
//! model id, checkpoint content and weight dtype.

pub mod bench;
pub mod placement;
pub mod remote;
pub mod shard;
pub mod wire;

use candle_core::DType;
use switchyard_proto::expert::v1 as pb;

use crate::model::ModelError;
use crate::model::checkpoint::Checkpoint;

/// The identity a frontend and its shards must share: `model_id`, and a fingerprint of the
/// checkpoint's content plus the dtype the experts' weights are held in (which changes
/// their outputs).
pub fn identity(
    model_id: &str,
    ckpt: &Checkpoint,
    weights: DType,
) -> Result<pb::ModelIdentity, ModelError> {
    Ok(pb::ModelIdentity {
        model_id: model_id.to_string(),
        fingerprint: format!(
            "{:016x}-{}",
            ckpt.fingerprint()?,
            format!("{weights:?}").to_lowercase()
        ),
    })
}

/// `model_id/fingerprint`, for messages.
pub fn describe_identity(id: Option<&pb::ModelIdentity>) -> String {
    match id {
        Some(id) => format!("{}/{}", id.model_id, id.fingerprint),
        None => "(none)".into(),
    }
}
