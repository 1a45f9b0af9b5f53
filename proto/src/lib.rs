//! Switchyard's gRPC contracts: the `.proto` files under `proto/proto/` and the
//! prost/tonic code generated from them (messages, clients and servers).
//!
//! ```text
//!   client                     frontend                                    expert shards
//!     │ switchyard.v1.Inference    │ switchyard.expert.v1.ExpertShard           │
//!     │── Generate, Tokenize, ────>│── Forward: layer, hidden rows, ───────────>│ routed experts
//!     │   ListModels               │   (expert, weight) routes per row          │ only; no
//!     │<─ GenerateStream chunks ───│<─ per row: weighted sum of its experts ────│ per-request
//!     │                            │── Describe ───────────────────────────────>│ state
//!     │                            │<─ model, held (layer, expert) pairs, load ─│
//! ```
//!
//! - [`inference::v1`] (`switchyard.v1`): the public API a deployment's frontends serve.
//! - [`expert::v1`] (`switchyard.expert.v1`): the internal API frontends use to run routed
//!   experts on expert shards, which keep no per-request state.
//! - [`FILE_DESCRIPTOR_SET`]: both files (with their comments) encoded for gRPC server
//!   reflection.
//!
//! The comments in the `.proto` files are the API reference; they are copied onto the
//! generated Rust items. The code is generated at build time by `build.rs` with `protox`
//! (a Rust protobuf compiler), so no system `protoc` is needed.
//!
//! Besides generated code, this crate has [`expert::v1::Tensor`] validation
//! ([`expert::v1::TensorError`]), which shards need to check hidden rows before touching
//! their bytes, and [`worker_config`]: the file the operator mounts into every worker pod,
//! the third contract between the two halves of the system.
//!
//! The two packages do not import each other, and must not: prost refers to another
//! package by a relative module path that assumes modules named after the packages,
//! while here they are `inference::v1` and `expert::v1`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod tensor;
pub mod worker_config;

/// The public inference API, `switchyard.v1.Inference`, and its messages.
pub mod inference {
    pub mod v1 {
        //! Package `switchyard.v1`: generation, tokenization and model listing.
        //!
        //! Clients use [`inference_client::InferenceClient`]; frontends implement
        //! [`inference_server::Inference`] and serve it with
        //! [`inference_server::InferenceServer`].
        // Generated code: its docs are the .proto comments, its style is prost's.
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("switchyard.v1");
    }
}

/// The internal frontend → expert-shard API, `switchyard.expert.v1.ExpertShard`, and its
/// messages.
pub mod expert {
    pub mod v1 {
        //! Package `switchyard.expert.v1`: running routed experts for one MoE layer
        //! (`Forward`) and reporting what a shard holds (`Describe`).
        //!
        //! Frontends use [`expert_shard_client::ExpertShardClient`]; shards implement
        //! [`expert_shard_server::ExpertShard`] and serve it with
        //! [`expert_shard_server::ExpertShardServer`]. Hidden rows travel as [`Tensor`]s
        //! whose `data` is a [`Bytes`](crate::Bytes), so re-sending a request to a replica
        //! does not copy it; [`Tensor::matrix_shape`] checks them.
        // Generated code: its docs are the .proto comments, its style is prost's.
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("switchyard.expert.v1");

        pub use crate::tensor::TensorError;
    }
}

/// The byte buffer type of [`expert::v1::Tensor::data`].
pub use prost::bytes::Bytes;

/// Encoded `google.protobuf.FileDescriptorSet` of both `.proto` files (and anything they
/// import), with source comments, for `tonic_reflection`'s
/// `register_encoded_file_descriptor_set`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/switchyard_descriptor_set.bin"));

#[cfg(test)]
mod tests;
