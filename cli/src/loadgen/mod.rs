//! The client side of `switchyard generate` and `switchyard bench`: one timed streaming
//! call, and a load generator built on it.
//!
//! ```text
//!   Scenario (tenants × Workload) ─┐
//!   Load (closed: N in flight │ open: Poisson at R/s) ─┤ run_bench ── Channel(s) ──> Inference
//!   stop: duration / requests, warmup, timeout ────────┘     │        GenerateStream
//!                                              RequestOutcome per call (measure_stream)
//!                                                            ▼
//!                                        Aggregator ─> Report ─> format_report / JSON
//! ```
//!
//! - [`workload`]: tenants (`NAME:KEY[:WEIGHT]`), synthetic token-id prompts of exact
//!   length, [`Scenario`]; flag parsers ([`parse_duration`], [`VocabRange`]).
//! - [`schedule`]: Poisson arrival times and the weighted split between tenants.
//! - [`call`]: [`measure_stream`], one `GenerateStream` call timed by the client.
//! - [`openai`]: the same call as a streamed `POST /v1/completions` over HTTP/1.1
//!   (`--api openai`), to compare the frontend's two APIs.
//! - [`stats`]: latency distributions with exact nearest-rank percentiles.
//! - [`report`]: aggregation per tenant, the human table and the JSON report.
//! - [`run`]: [`run_bench`], which drives it all.
//! - [`series`]: the per-second time series of a run (`--series`): offered and accepted
//!   load, replicas, legitimate p99 TTFT.
//! - [`generate`]: request building and output formatting for `switchyard generate`.
//! - [`rng`]: the seeded PRNG behind prompts and arrivals.
//! - [`abuse`]: the `h2-abuse` scenario's attackers (rapid reset, header and connection
//!   floods).
//!
//! Measurement definitions (also in `docs/cli.md`): TTFT runs from just before the call to
//! the first chunk carrying tokens; each later chunk's gap since the previous one, divided
//! by its token count, is the inter-token latency of each of its tokens; end-to-end runs to
//! the summary. Latencies and token throughput count successful requests only; requests
//! sent during the warmup are not counted at all.

pub mod abuse;
pub mod call;
pub mod generate;
pub mod openai;
pub mod report;
pub use switchyard_edge::rng;
pub mod run;
pub mod schedule;
pub mod series;
pub mod stats;
pub mod workload;

pub use call::{CallError, Measurement, describe_status, finish_reason_name, measure_stream};
pub use report::{Aggregator, GroupReport, Report, RequestOutcome, RunInfo, format_report};
pub use run::{BenchConfig, Load, ProgressMode, SeriesOptions, run_bench};
pub use stats::{LatencyHistogram, LatencySummary};
pub use workload::{
    ApiKey, InvalidInput, Scenario, ScenarioKind, Shape, Tenant, TenantLoad, VocabRange, Workload,
    parse_duration, parse_priority, parse_tenant_file, parse_tenant_list,
};

#[cfg(test)]
mod tests;
