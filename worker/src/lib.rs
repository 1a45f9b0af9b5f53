//! The Switchyard worker: one binary, two roles.
//!
//! ```text
//!   client ──gRPC──> frontend (attention, KV cache, router, shared experts)
//!                       │  per MoE layer: ExpertShard.Forward
//!                       ▼
//!                    expert shards (routed experts only, no per-request state)
//! ```
//!
//! - [`model`]: checkpoints, the declared model families, layers, routers, MoE blocks.
//! - [`engine`]: the engine thread (continuous batching, paged KV cache, sampling).
//! - [`text`]: tokenizer, chat templates, incremental detokenizer, stop strings.
//! - [`experts`]: the expert-shard role and the remote expert backend frontends use.
//! - [`admission`]: the whole admission policy, in the order `admission::pipeline` draws.
//! - [`frontend`]: the `Inference` service, its request checks and metrics.
//! - [`server`]: the gRPC server both roles run (health, reflection, the role's service).
//! - [`drain`]: stopping on SIGTERM without cutting in-flight calls off.
//! - [`tls`]: TLS on the client endpoint, certificates re-read when they rotate.
//! - [`config`]: loading `worker.json`, the contract file the operator mounts.
//! - [`settings`]: each role's effective settings: defaults, worker.json, env, flags.
//! - [`error`]: why a worker could not start ([`StartError`]), naming the input.
//! - [`recent`]: rates and latency quantiles over the last seconds, for live reports.
//! - [`telemetry`]: the gRPC status label, metric constructors and the `/metrics` server
//!   both roles use.
//!
//! The client side (the `switchyard` CLI and its load generator) is the `switchyard-cli`
//! crate; what every binary shares at its edge is `switchyard-edge`.

pub mod admission;
pub mod config;
pub mod drain;
pub mod engine;
pub mod error;
pub mod experts;
pub mod frontend;
pub mod model;
pub mod recent;
pub mod server;
pub mod settings;
pub mod telemetry;
pub mod text;
pub mod tls;

pub use error::StartError;
