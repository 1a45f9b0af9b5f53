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
//! model id, checkpoint content, weight dtype and quantization.

pub mod bench;
pub mod placement;
pub mod remote;
pub mod shard;
pub mod wire;

use switchyard_proto::expert::v1 as pb;

use crate::model::ModelError;
use crate::model::checkpoint::Checkpoint;
use crate::model::layers::Precision;
use crate::model::quant::Quantization;

/// The identity a frontend and its shards must share: `model_id`, and a fingerprint of the
/// checkpoint's content plus the dtype and quantization the experts' weights are held in
/// (both change their outputs): `<hash>-f32`, or `<hash>-f32-int4` when quantized (and
/// always with the setting for a GGUF, whose `auto` and `none` differ).
pub fn identity(
    model_id: &str,
    ckpt: &Checkpoint,
    precision: Precision,
) -> Result<pb::ModelIdentity, ModelError> {
    let weights = format!("{:?}", precision.weights).to_lowercase();
    // `auto` and `none` hold a safetensors checkpoint alike; a GGUF's differ.
    let held = match (precision.quant, ckpt.gguf().is_some()) {
        (Quantization::Auto | Quantization::None, false) => weights,
        (q, _) => format!("{weights}-{q}"),
    };
    Ok(pb::ModelIdentity {
        model_id: model_id.to_string(),
        fingerprint: format!("{:016x}-{held}", ckpt.fingerprint()?),
    })
}

/// `model_id/fingerprint`, for messages.
pub fn describe_identity(id: Option<&pb::ModelIdentity>) -> String {
    match id {
        Some(id) => format!("{}/{}", id.model_id, id.fingerprint),
        None => "(none)".into(),
    }
}
