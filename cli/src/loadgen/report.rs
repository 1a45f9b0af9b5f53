//! Turning request outcomes into a benchmark report, and printing it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::call::{Measurement, finish_reason_name};
use super::stats::{LatencyHistogram, LatencySummary};

/// What one benchmark request came to, as the report needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutcome {
    /// Index of the tenant in the scenario.
    pub tenant: usize,
    /// Sent after the warmup: counted in the report.
    pub measured: bool,
    pub ended: Instant,
    /// The finish reason (`length`, `stop`, ...) of a successful request, or the error label
    /// (`unavailable`, `deadline_exceeded`, `no_summary`, `finish_reason_error`, ...).
    pub result: Result<String, String>,
    pub ttft: Option<Duration>,
    /// Per-token inter-token latencies with their weights (see [`Measurement::itl`]).
    pub itl: Vec<(Duration, u32)>,
    pub e2e: Duration,
    /// The prompt's tokens as the summary reports them (else as sent).
    pub prompt_tokens: u64,
    /// Of those, served from the server's prefix cache (the summary's usage).
    pub cached_prompt_tokens: u64,
    /// Tokens received.
    pub output_tokens: u64,
    /// A failed call's status carried `grpc-retry-pushback-ms` (the server said when to
    /// retry, or not to).
    pub pushback: bool,
}

impl RequestOutcome {
    /// The outcome of a measured call. `sent_prompt_tokens` counts the prompt when the
    /// call failed before its summary. A summary with `FINISH_REASON_ERROR` is a failure
    /// (`finish_reason_error`).
    pub fn from_measurement(
        tenant: usize,
        measured: bool,
        sent_prompt_tokens: u64,
        m: Measurement,
    ) -> Self {
        let finish = m
            .summary
            .as_ref()
            .map(|s| finish_reason_name(s.finish_reason));
        let result = match (&m.result, finish) {
            (Err(e), _) => Err(e.label().to_string()),
            (Ok(()), Some(reason)) if reason == "error" => Err("finish_reason_error".into()),
            (Ok(()), Some(reason)) => Ok(reason),
            (Ok(()), None) => Err("no_summary".into()),
        };
        let usage = m.summary.as_ref().and_then(|s| s.usage.as_ref());
        let prompt_tokens = usage.map_or(sent_prompt_tokens, |u| u64::from(u.prompt_tokens));
        let cached_prompt_tokens = usage.map_or(0, |u| u64::from(u.cached_prompt_tokens));
        let pushback = matches!(&m.result, Err(super::call::CallError::Status(s))
            if s.metadata().contains_key("grpc-retry-pushback-ms"));
        Self {
            pushback,
            tenant,
            measured,
            ended: m.ended,
            ttft: m.ttft(),
            e2e: m.e2e(),
            result,
            itl: m.itl,
            prompt_tokens,
            cached_prompt_tokens,
            output_tokens: m.output_tokens,
        }
    }
}

/// Counts and distributions of one group of requests (a tenant, or all).
#[derive(Debug, Clone, Default)]
struct GroupStats {
    ok: u64,
    failed: u64,
    errors: BTreeMap<String, u64>,
    finish_reasons: BTreeMap<String, u64>,
    prompt_tokens: u64,
    cached_prompt_tokens: u64,
    output_tokens: u64,
    ttft: LatencyHistogram,
    itl: LatencyHistogram,
    e2e: LatencyHistogram,
    failed_e2e: LatencyHistogram,
    failed_with_pushback: u64,
}

impl GroupStats {
    fn add(&mut self, o: &RequestOutcome) {
        match &o.result {
            Ok(reason) => {
                self.ok += 1;
                *self.finish_reasons.entry(reason.clone()).or_insert(0) += 1;
                self.prompt_tokens += o.prompt_tokens;
                self.cached_prompt_tokens += o.cached_prompt_tokens;
                self.output_tokens += o.output_tokens;
                if let Some(ttft) = o.ttft {
                    self.ttft.record(ttft);
                }
                for &(gap, tokens) in &o.itl {
                    self.itl.record_n(gap, u64::from(tokens));
                }
                self.e2e.record(o.e2e);
            }
            Err(label) => {
                self.failed += 1;
                *self.errors.entry(label.clone()).or_insert(0) += 1;
                self.failed_e2e.record(o.e2e);
                self.failed_with_pushback += u64::from(o.pushback);
            }
        }
    }

    fn report(
        &self,
        name: &str,
        weight: Option<u32>,
        seconds: f64,
        slo: Option<Duration>,
    ) -> GroupReport {
        let per_s = |n: u64| {
            if seconds > 0.0 {
                n as f64 / seconds
            } else {
                0.0
            }
        };
        GroupReport {
            name: name.to_string(),
            weight,
            requests: self.ok + self.failed,
            ok: self.ok,
            failed: self.failed,
            errors: self.errors.clone(),
            finish_reasons: self.finish_reasons.clone(),
            prompt_tokens: self.prompt_tokens,
            cached_prompt_tokens: self.cached_prompt_tokens,
            output_tokens: self.output_tokens,
            requests_per_s: per_s(self.ok),
            computed_prompt_tokens_per_s: per_s(self.prompt_tokens - self.cached_prompt_tokens),
            output_tokens_per_s: per_s(self.output_tokens),
            total_tokens_per_s: per_s(self.prompt_tokens + self.output_tokens),
            ttft: self.ttft.summary(),
            itl: self.itl.summary(),
            e2e: self.e2e.summary(),
            failed_with_pushback: self.failed_with_pushback,
            failed_e2e: self.failed_e2e.summary(),
            within_ttft_slo: slo.map(|d| self.ttft.count_at_most(d)),
            goodput_per_s: slo.map(|d| per_s(self.ttft.count_at_most(d))),
        }
    }
}

/// Collects outcomes as they come and makes the [`Report`].
#[derive(Debug, Clone)]
pub struct Aggregator {
    tenants: Vec<(String, u32)>,
    per_tenant: Vec<GroupStats>,
    total: GroupStats,
    measure_start: Instant,
    last_end: Option<Instant>,
    ttft_slo: Option<Duration>,
}

impl Aggregator {
    /// Counts the successful requests whose TTFT is at most `slo` (the goodput).
    pub fn with_ttft_slo(mut self, slo: Option<Duration>) -> Self {
        self.ttft_slo = slo;
        self
    }

    /// `tenants`: name and weight of each, in scenario order. `measure_start`: when the
    /// warmup ended (the start when there is none); throughput is over the time from it to
    /// the end of the last measured request.
    pub fn new(tenants: Vec<(String, u32)>, measure_start: Instant) -> Self {
        Self {
            per_tenant: vec![GroupStats::default(); tenants.len()],
            tenants,
            total: GroupStats::default(),
            measure_start,
            last_end: None,
            ttft_slo: None,
        }
    }

    /// Counts `outcome` unless it was a warmup request.
    pub fn add(&mut self, outcome: &RequestOutcome) {
        if !outcome.measured {
            return;
        }
        self.total.add(outcome);
        if let Some(group) = self.per_tenant.get_mut(outcome.tenant) {
            group.add(outcome);
        }
        if self.last_end.is_none_or(|end| outcome.ended > end) {
            self.last_end = Some(outcome.ended);
        }
    }

    /// The measured window: from the end of the warmup to the end of the last measured
    /// request (zero before any).
    pub fn window(&self) -> Duration {
        self.last_end.map_or(Duration::ZERO, |end| {
            end.saturating_duration_since(self.measure_start)
        })
    }

    /// The report, with `run` describing how the load was driven.
    pub fn report(&self, run: RunInfo) -> Report {
        let seconds = self.window().as_secs_f64();
        Report {
            run,
            duration_s: seconds,
            total: self.total.report("all", None, seconds, self.ttft_slo),
            tenants: self
                .tenants
                .iter()
                .zip(&self.per_tenant)
                .map(|((name, weight), stats)| {
                    stats.report(name, Some(*weight), seconds, self.ttft_slo)
                })
                .collect(),
            series: None,
        }
    }
}

/// How a benchmark was run, as its report states it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunInfo {
    /// `grpc` (`GenerateStream`) or `openai` (streamed `POST /v1/completions`).
    pub api: &'static str,
    /// The scenario's name.
    pub scenario: String,
    /// `closed` (fixed concurrency) or `open` (Poisson arrivals at a rate).
    pub mode: &'static str,
    /// Closed loop: requests kept in flight.
    pub concurrency: Option<usize>,
    /// Open loop: mean arrivals per second.
    pub rate: Option<f64>,
    /// gRPC connections (HTTP/2 channels) the requests were spread over.
    pub connections: usize,
    pub warmup_s: f64,
    /// Stopped early by Ctrl-C: the report covers the requests that finished before.
    pub interrupted: bool,
}

/// The result of a benchmark: every figure for all requests, and per tenant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub run: RunInfo,
    /// The measured window throughput is computed over (see [`Aggregator::window`]).
    pub duration_s: f64,
    pub total: GroupReport,
    pub tenants: Vec<GroupReport>,
    /// One row a second, when the run recorded its time series (`--series`).
    #[serde(skip)]
    pub series: Option<Vec<switchyard_edge::series::Row>>,
}

/// The figures of one group of measured requests (all of them, or one tenant's).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupReport {
    /// Tenant name, or `all`.
    pub name: String,
    /// The tenant's weight (absent for `all`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Finished measured requests: `ok + failed`.
    pub requests: u64,
    /// Ended with a summary whose finish reason is not `error`.
    pub ok: u64,
    pub failed: u64,
    /// Failed requests by error label.
    pub errors: BTreeMap<String, u64>,
    /// Successful requests by finish reason.
    pub finish_reasons: BTreeMap<String, u64>,
    /// Prompt and output tokens of successful requests.
    pub prompt_tokens: u64,
    /// Of the prompt tokens, those the server's prefix cache served.
    pub cached_prompt_tokens: u64,
    pub output_tokens: u64,
    /// Successful requests, their output tokens, and their prompt plus output tokens, per
    /// second of the measured window.
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub total_tokens_per_s: f64,
    /// Prompt tokens the server computed (not from its prefix cache) per second.
    pub computed_prompt_tokens_per_s: f64,
    /// Time to first token of successful requests.
    pub ttft: Option<LatencySummary>,
    /// Inter-token latency, one sample per token after the first.
    pub itl: Option<LatencySummary>,
    /// End-to-end latency of successful requests.
    pub e2e: Option<LatencySummary>,
    /// Failed requests whose status carried a retry pushback.
    pub failed_with_pushback: u64,
    /// How long failed requests took to fail (a refusal should be fast).
    pub failed_e2e: Option<LatencySummary>,
    /// With a TTFT objective (`--ttft-slo`): successful requests whose TTFT met it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub within_ttft_slo: Option<u64>,
    /// Those per second of the measured window: the goodput.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goodput_per_s: Option<f64>,
}

/// Lays out rows as columns: the first `left` columns left-aligned, the rest right-aligned,
/// two spaces apart.
fn table(rows: &[Vec<String>], left: usize) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            let pad = widths[c].saturating_sub(cell.chars().count());
            if c < left {
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad));
            } else {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn counts(map: &BTreeMap<String, u64>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ms(summary: &Option<LatencySummary>, pick: fn(&LatencySummary) -> f64) -> String {
    summary
        .as_ref()
        .map_or_else(|| "-".to_string(), |s| format!("{:.2}", pick(s)))
}

/// The report as people read it: the run, request counts and errors, throughput, a
/// latency table, and a table per tenant when there are several.
pub fn format_report(report: &Report) -> String {
    let run = &report.run;
    let total = &report.total;
    let mut out = String::new();
    let load = match (run.mode, run.concurrency, run.rate) {
        ("closed", Some(c), _) => format!("closed loop, concurrency {c}"),
        ("open", _, Some(r)) => format!("open loop, Poisson arrivals at {r} req/s"),
        (mode, _, _) => format!("{mode} loop"),
    };
    let connections = if run.connections == 1 {
        "1 connection".to_string()
    } else {
        format!("{} connections", run.connections)
    };
    let _ = writeln!(out, "scenario {}: {load}, {connections}", run.scenario);
    let mut window = format!("measured {:.2} s", report.duration_s);
    if run.warmup_s > 0.0 {
        let _ = write!(window, " after {:.1} s of warmup", run.warmup_s);
    }
    if run.interrupted {
        window.push_str(" (interrupted: partial results)");
    }
    let _ = writeln!(out, "{window}");
    let mut requests = format!("requests: {} ok, {} failed", total.ok, total.failed);
    if !total.errors.is_empty() {
        let _ = write!(requests, " ({})", counts(&total.errors));
    }
    let _ = writeln!(out, "{requests}");
    if !total.finish_reasons.is_empty() {
        let _ = writeln!(out, "finish reasons: {}", counts(&total.finish_reasons));
    }
    let _ = writeln!(
        out,
        "throughput: {:.2} req/s, {:.1} output tok/s, {:.1} total tok/s",
        total.requests_per_s, total.output_tokens_per_s, total.total_tokens_per_s
    );
    let cached = if total.cached_prompt_tokens > 0 {
        format!(
            " ({} from the prefix cache, {:.1}%; {:.1} computed prompt tok/s)",
            total.cached_prompt_tokens,
            100.0 * total.cached_prompt_tokens as f64 / total.prompt_tokens as f64,
            total.computed_prompt_tokens_per_s
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "tokens: {} prompt{cached}, {} output",
        total.prompt_tokens, total.output_tokens
    );
    if let (Some(met), Some(goodput)) = (total.within_ttft_slo, total.goodput_per_s) {
        let _ = writeln!(
            out,
            "goodput: {goodput:.2} req/s ({met} of {} requests met the TTFT objective)",
            total.requests
        );
    }
    out.push('\n');

    let mut rows = vec![
        [
            "latency (ms)",
            "mean",
            "p50",
            "p90",
            "p99",
            "max",
            "samples",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for (name, summary) in [
        ("TTFT", &total.ttft),
        ("ITL", &total.itl),
        ("E2E", &total.e2e),
    ] {
        rows.push(vec![
            name.to_string(),
            ms(summary, |s| s.mean_ms),
            ms(summary, |s| s.p50_ms),
            ms(summary, |s| s.p90_ms),
            ms(summary, |s| s.p99_ms),
            ms(summary, |s| s.max_ms),
            summary
                .as_ref()
                .map_or_else(|| "0".to_string(), |s| s.count.to_string()),
        ]);
    }
    out.push_str(&table(&rows, 1));

    if report.tenants.len() > 1 {
        out.push('\n');
        let mut rows = vec![
            [
                "tenant",
                "weight",
                "ok",
                "failed",
                "req/s",
                "out tok/s",
                "TTFT p50",
                "TTFT p99",
                "ITL p50",
                "ITL p99",
                "E2E p50",
                "E2E p99",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for t in &report.tenants {
            rows.push(vec![
                t.name.clone(),
                t.weight.map_or_else(String::new, |w| w.to_string()),
                t.ok.to_string(),
                t.failed.to_string(),
                format!("{:.2}", t.requests_per_s),
                format!("{:.1}", t.output_tokens_per_s),
                ms(&t.ttft, |s| s.p50_ms),
                ms(&t.ttft, |s| s.p99_ms),
                ms(&t.itl, |s| s.p50_ms),
                ms(&t.itl, |s| s.p99_ms),
                ms(&t.e2e, |s| s.p50_ms),
                ms(&t.e2e, |s| s.p99_ms),
            ]);
        }
        out.push_str(&table(&rows, 1));
        for t in report.tenants.iter().filter(|t| !t.errors.is_empty()) {
            let _ = writeln!(
                out,
                "errors of {}: {} ({} with retry pushback; failed in p50 {} ms, p99 {} ms)",
                t.name,
                counts(&t.errors),
                t.failed_with_pushback,
                ms(&t.failed_e2e, |s| s.p50_ms),
                ms(&t.failed_e2e, |s| s.p99_ms)
            );
        }
    }
    out
}

/// What the progress line shows.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressSnapshot {
    pub elapsed: Duration,
    /// `warmup`, `running` or `draining` (no new requests; waiting for those in flight).
    pub phase: &'static str,
    /// Finished requests: all during the warmup, measured ones after.
    pub done: u64,
    /// The `--requests` target, if any.
    pub target: Option<u64>,
    pub in_flight: u64,
    /// Output tokens received per second since the previous line.
    pub tokens_per_s: f64,
    /// Failed requests so far, warmup included.
    pub errors: u64,
}

/// The progress line: `[  12.0s] running  done 340/1000  in flight 8  1234.5 tok/s  errors 0`.
pub fn format_progress(p: &ProgressSnapshot) -> String {
    let done = match p.target {
        Some(target) if p.phase != "warmup" => format!("{}/{target}", p.done),
        _ => p.done.to_string(),
    };
    format!(
        "[{:>7.1}s] {:<8}  done {done}  in flight {}  {:.1} tok/s  errors {}",
        p.elapsed.as_secs_f64(),
        p.phase,
        p.in_flight,
        p.tokens_per_s,
        p.errors
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(
        base: Instant,
        tenant: usize,
        end_ms: u64,
        result: Result<&str, &str>,
        ttft_ms: u64,
    ) -> RequestOutcome {
        RequestOutcome {
            pushback: false,
            tenant,
            measured: true,
            ended: base + Duration::from_millis(end_ms),
            result: result.map(String::from).map_err(String::from),
            ttft: Some(Duration::from_millis(ttft_ms)),
            itl: vec![
                (Duration::from_millis(10), 2),
                (Duration::from_millis(20), 1),
            ],
            e2e: Duration::from_millis(ttft_ms + 40),
            prompt_tokens: 100,
            cached_prompt_tokens: 0,
            output_tokens: 4,
        }
    }

    fn sample_report() -> Report {
        let base = Instant::now();
        let mut agg = Aggregator::new(vec![("a".into(), 3), ("b".into(), 1)], base);
        agg.add(&outcome(base, 0, 1000, Ok("length"), 100));
        agg.add(&outcome(base, 0, 1500, Ok("length"), 200));
        agg.add(&outcome(base, 1, 2000, Ok("stop"), 300));
        agg.add(&outcome(base, 1, 1200, Err("unavailable"), 0));
        // Warmup requests are not counted, even late ones.
        let mut warm = outcome(base, 0, 9000, Ok("length"), 1);
        warm.measured = false;
        agg.add(&warm);
        assert_eq!(agg.window(), Duration::from_secs(2));
        agg.report(RunInfo {
            api: "grpc",
            scenario: "uniform".into(),
            mode: "closed",
            concurrency: Some(4),
            rate: None,
            connections: 1,
            warmup_s: 5.0,
            interrupted: false,
        })
    }

    #[test]
    fn aggregates_totals_tenants_and_throughput() {
        let r = sample_report();
        assert_eq!(r.duration_s, 2.0);
        let t = &r.total;
        assert_eq!((t.requests, t.ok, t.failed), (4, 3, 1));
        assert_eq!(t.errors, BTreeMap::from([("unavailable".into(), 1)]));
        assert_eq!(
            t.finish_reasons,
            BTreeMap::from([("length".into(), 2), ("stop".into(), 1)])
        );
        assert_eq!((t.prompt_tokens, t.output_tokens), (300, 12));
        assert_eq!(t.requests_per_s, 1.5);
        assert_eq!(t.output_tokens_per_s, 6.0);
        assert_eq!(t.total_tokens_per_s, 156.0);
        let ttft = t.ttft.as_ref().expect("ttft");
        assert_eq!(
            (ttft.count, ttft.p50_ms, ttft.max_ms, ttft.mean_ms),
            (3, 200.0, 300.0, 200.0)
        );
        // Three requests × (10 ms twice, 20 ms once).
        let itl = t.itl.as_ref().expect("itl");
        assert_eq!((itl.count, itl.p50_ms, itl.p90_ms), (9, 10.0, 20.0));
        assert_eq!(t.e2e.as_ref().map(|s| s.max_ms), Some(340.0));

        let a = &r.tenants[0];
        assert_eq!(
            (a.name.as_str(), a.weight, a.ok, a.failed),
            ("a", Some(3), 2, 0)
        );
        assert_eq!(a.requests_per_s, 1.0);
        let b = &r.tenants[1];
        assert_eq!((b.ok, b.failed), (1, 1));
        assert_eq!(b.ttft.as_ref().map(|s| s.p50_ms), Some(300.0));
    }

    #[test]
    fn failed_summaries_and_empty_runs() {
        let base = Instant::now();
        let agg = Aggregator::new(vec![("x".into(), 1)], base);
        assert_eq!(agg.window(), Duration::ZERO);
        let r = agg.report(RunInfo {
            api: "grpc",
            scenario: "s".into(),
            mode: "open",
            concurrency: None,
            rate: Some(2.0),
            connections: 2,
            warmup_s: 0.0,
            interrupted: true,
        });
        assert_eq!(r.total.requests_per_s, 0.0);
        assert_eq!(r.total.ttft, None);
        let text = format_report(&r);
        assert!(
            text.contains("open loop, Poisson arrivals at 2 req/s, 2 connections"),
            "{text}"
        );
        assert!(text.contains("(interrupted: partial results)"), "{text}");
        assert!(text.contains("TTFT             -"), "{text}");
    }

    #[test]
    fn human_report_has_every_figure() {
        let text = format_report(&sample_report());
        let expected = "\
scenario uniform: closed loop, concurrency 4, 1 connection
measured 2.00 s after 5.0 s of warmup
requests: 3 ok, 1 failed (unavailable 1)
finish reasons: length 2, stop 1
throughput: 1.50 req/s, 6.0 output tok/s, 156.0 total tok/s
tokens: 300 prompt, 12 output

latency (ms)    mean     p50     p90     p99     max  samples
TTFT          200.00  200.00  300.00  300.00  300.00        3
ITL            13.33   10.00   20.00   20.00   20.00        9
E2E           240.00  240.00  340.00  340.00  340.00        3

tenant  weight  ok  failed  req/s  out tok/s  TTFT p50  TTFT p99  ITL p50  ITL p99  E2E p50  E2E p99
a            3   2       0   1.00        4.0    100.00    200.00    10.00    20.00   140.00   240.00
b            1   1       1   0.50        2.0    300.00    300.00    10.00    20.00   340.00   340.00
errors of b: unavailable 1 (0 with retry pushback; failed in p50 40.00 ms, p99 40.00 ms)
";
        assert_eq!(text, expected);
    }

    #[test]
    fn json_report_is_flat_and_named() {
        let value = serde_json::to_value(sample_report()).expect("serializable");
        assert_eq!(value["mode"], "closed");
        assert_eq!(value["concurrency"], 4);
        assert_eq!(value["total"]["ok"], 3);
        assert_eq!(value["total"]["errors"]["unavailable"], 1);
        assert_eq!(value["total"]["ttft"]["p99_ms"], 300.0);
        assert_eq!(value["tenants"][1]["name"], "b");
        assert_eq!(value["tenants"][1]["weight"], 1);
        assert!(value["total"].get("weight").is_none());
    }

    #[test]
    fn progress_line() {
        let mut p = ProgressSnapshot {
            elapsed: Duration::from_millis(12_040),
            phase: "running",
            done: 340,
            target: Some(1000),
            in_flight: 8,
            tokens_per_s: 1234.54,
            errors: 2,
        };
        assert_eq!(
            format_progress(&p),
            "[   12.0s] running   done 340/1000  in flight 8  1234.5 tok/s  errors 2"
        );
        p.phase = "warmup";
        assert_eq!(
            format_progress(&p),
            "[   12.0s] warmup    done 340  in flight 8  1234.5 tok/s  errors 2"
        );
    }
}
