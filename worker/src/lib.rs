//! The Switchyard worker: one binary, two roles.
//!
//! ```text
//!   client ──gRPC──> frontend (attention, KV cache, router, shared experts)
//!                       │  per MoE layer: ExpertShard.Forward
//!                       ▼
//!                    expert shards (routed experts only, no per-request state)
//! ```
//!
//! - [`server`]: the gRPC server both roles run (health, reflection, the role's service).
//! - [`config`]: loading `worker.json`, the contract file the operator mounts.
//! - [`settings`]: each role's effective settings: defaults, worker.json, env, flags.
//! - [`telemetry`]: the gRPC status label, metric constructors and the `/metrics` server
//!   both roles use.
//!
//! The inference engine (model loading, MoE layers on candle, scheduling) and the role
//! services land in their own modules as they are built; see `docs/architecture.md`.

pub mod admission;
pub mod config;
pub mod engine;
pub mod experts;
pub mod frontend;
pub mod model;
pub mod server;
pub mod settings;
pub mod telemetry;
pub mod text;
