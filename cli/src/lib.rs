//! The client side of Switchyard: what the `switchyard` CLI runs, kept out of the server
//! crates so the worker does not build a load generator and the CLI does not build an
//! inference engine.
//!
//! ```text
//!   switchyard (src/main.rs) ──> client   health, reflection      ──gRPC──> any worker
//!                            └─> loadgen  generate, bench, abuse  ──gRPC──> Inference
//! ```
//!
//! - [`client`]: calls to a worker's standard endpoints (health, reflection).
//! - [`loadgen`]: one timed streaming call, and the load generator built on it.
//!
//! It depends on `switchyard-proto` (the wire contract) and `switchyard-edge` (error line,
//! gRPC status labels shared with the server's metrics, the seeded PRNG) only.

pub mod client;
pub mod loadgen;
