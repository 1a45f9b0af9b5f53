//! What the Switchyard binaries (`switchyard-operator`, `switchyard-worker`, `switchyard`)
//! share at their edge, in a crate light enough for each of them: no candle, no tokenizers,
//! no kube.
//!
//! ```text
//!   switchyard-operator ─┐
//!   switchyard-worker ───┼──> switchyard-edge   (and switchyard-proto, the wire contract)
//!   switchyard (CLI) ────┘
//! ```
//!
//! - [`exit`]: how an error reaches the person who ran the command (one line of causes).
//! - [`logging`]: where a server's logs go (stderr, the `--log` filter).
//! - [`signal`]: when a server stops (SIGTERM or Ctrl-C).
//! - [`metrics`]: the `/metrics`, `/healthz` (and `/readyz`) HTTP endpoint, and the label
//!   a gRPC status code gets in server metrics and client reports alike.
//! - [`rng`]: the seeded PRNG behind reproducible workloads, sampler seeds and demo weights.
//! - [`series`]: the autoscaling time series (CSV and SVG) the simulation and the load
//!   generator write.

pub mod exit;
pub mod logging;
pub mod metrics;
pub mod rng;
pub mod series;
pub mod signal;
