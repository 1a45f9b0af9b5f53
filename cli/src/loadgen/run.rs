//! Driving a benchmark: closed or open loop, warmup, stop conditions, progress, Ctrl-C.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_proto::inference::v1::GenerateRequest;
use switchyard_proto::inference::v1::generate_request::Input;
use switchyard_proto::inference::v1::inference_client::InferenceClient;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use super::call::measure_stream;
use super::report::{
    Aggregator, ProgressSnapshot, Report, RequestOutcome, RunInfo, format_progress,
};
use super::rng::Rng;
use super::schedule::{PoissonArrivals, WeightedSplit};
use super::series::{SeriesRecorder, replicas_from};
use super::workload::{ApiKey, InvalidInput, Scenario, Shape, Workload};

/// How requests are timed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// A fixed number of requests in flight: each finished request is replaced at once.
    Closed { concurrency: usize },
    /// Requests arrive as a Poisson process at `rate` per second, however many are in
    /// flight (an overloaded server sees its queue grow, as with real users).
    Open { rate: f64 },
}

/// How the progress line is written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    Off,
    /// One line per second (stderr is a file or a pipe).
    Lines,
    /// One line, rewritten in place every second (stderr is a terminal).
    InPlace,
}

/// Everything a benchmark run needs besides its connections.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub scenario: Scenario,
    pub load: Load,
    /// Stop sending new requests this long after the warmup. With `requests` too,
    /// whichever comes first.
    pub duration: Option<Duration>,
    /// Stop after sending this many measured requests.
    pub requests: Option<u64>,
    /// Requests sent during this time from the start are not counted.
    pub warmup: Duration,
    /// Per-request timeout: sent as the gRPC deadline and enforced by the client.
    pub timeout: Duration,
    /// Seeds prompts, the tenant split and arrival times.
    pub seed: u64,
    /// Count the successful requests whose TTFT is at most this (goodput).
    pub ttft_slo: Option<Duration>,
    pub progress: ProgressMode,
    /// Record the time series ([`Report::series`]).
    pub series: Option<SeriesOptions>,
    /// `Some(host:port)`: send the requests as streamed `POST /v1/completions` over
    /// HTTP/1.1 to that address instead of gRPC (the channels then only serve
    /// `ListModels` before the run).
    pub openai: Option<String>,
}

/// What the time series records besides the traffic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeriesOptions {
    /// A shell command printing the deployment's replicas (`DESIRED [READY]`), run every
    /// second ([`super::series::replicas_from`]).
    pub replicas_command: Option<String>,
}

impl BenchConfig {
    /// Checks what the types do not: positive concurrency, rate and timeout, a stop
    /// condition, and at least one tenant with a positive weight.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        match self.load {
            Load::Closed { concurrency: 0 } => {
                return Err(InvalidInput::new(
                    "--concurrency",
                    "0 requests in flight: give at least 1",
                ));
            }
            Load::Open { rate } if !(rate.is_finite() && rate > 0.0) => {
                return Err(InvalidInput::new(
                    "--rate",
                    format!("{rate}: give a positive number of requests per second"),
                ));
            }
            _ => {}
        }
        if self.duration.is_none() && self.requests.is_none() {
            return Err(InvalidInput::new(
                "--duration/--requests",
                "neither is given: the run would not end",
            ));
        }
        if self.requests == Some(0) || self.duration == Some(Duration::ZERO) {
            return Err(InvalidInput::new(
                "--duration/--requests",
                "zero: give a positive duration or request count",
            ));
        }
        if self.timeout.is_zero() {
            return Err(InvalidInput::new(
                "--timeout",
                "zero: give a positive duration",
            ));
        }
        if self.scenario.shape != Shape::Steady && !matches!(self.load, Load::Open { .. }) {
            return Err(InvalidInput::new(
                "--rate",
                format!(
                    "scenario {} changes the rate over time: give --rate (open loop)",
                    self.scenario.name
                ),
            ));
        }
        if self.scenario.tenants.iter().all(|t| t.tenant.weight == 0) {
            return Err(InvalidInput::new(
                "--tenants",
                "no tenant has a positive weight",
            ));
        }
        Ok(())
    }

    fn run_info(&self, connections: usize, interrupted: bool) -> RunInfo {
        let (mode, concurrency, rate) = match self.load {
            Load::Closed { concurrency } => ("closed", Some(concurrency), None),
            Load::Open { rate } => ("open", None, Some(rate)),
        };
        RunInfo {
            api: if self.openai.is_some() {
                "openai"
            } else {
                "grpc"
            },
            scenario: self.scenario.name.clone(),
            mode,
            concurrency,
            rate,
            connections,
            warmup_s: self.warmup.as_secs_f64(),
            interrupted,
        }
    }
}

/// A request chosen by the planner.
#[derive(Debug)]
struct Planned {
    tenant: usize,
    measured: bool,
    /// When it was due.
    at: Instant,
    request: GenerateRequest,
}

/// What the planner says at an arrival.
#[derive(Debug)]
enum Plan {
    Send(Box<Planned>),
    /// Not this one: the scenario's shape thins the tenant's arrivals now.
    Skip,
    Done,
}

/// Decides the next request: whose, what, and whether there is one at all.
#[derive(Debug)]
struct Planner {
    rng: Rng,
    split: WeightedSplit,
    workloads: Vec<Workload>,
    seq: u64,
    measured_sent: u64,
    requests: Option<u64>,
    warmup_end: Instant,
    end: Option<Instant>,
    done: bool,
    shape: Shape,
    /// Per tenant: legitimate (shaped), not an attacker.
    legit: Vec<bool>,
}

impl Planner {
    fn next(&mut self, now: Instant) -> Plan {
        if self.done || self.end.is_some_and(|end| now >= end) {
            self.done = true;
            return Plan::Done;
        }
        let tenant = self.split.next_index();
        if self.shape != Shape::Steady && self.legit.get(tenant).copied().unwrap_or(false) {
            // Thinning: arrivals come at the peak rate; keep factor / peak of them.
            let factor = self
                .shape
                .factor_at(now.saturating_duration_since(self.warmup_end));
            if self.rng.next_f64() >= factor / self.shape.peak() {
                return Plan::Skip;
            }
        }
        let measured = now >= self.warmup_end;
        if measured {
            if self
                .requests
                .is_some_and(|limit| self.measured_sent >= limit)
            {
                self.done = true;
                return Plan::Done;
            }
            self.measured_sent += 1;
        }
        self.seq += 1;
        let request = self.workloads[tenant].request(&mut self.rng, format!("bench-{}", self.seq));
        Plan::Send(Box::new(Planned {
            tenant,
            measured,
            at: now,
            request,
        }))
    }
}

/// Live counters for the progress line.
#[derive(Debug, Default)]
struct Counters {
    in_flight: AtomicU64,
    done_warmup: AtomicU64,
    done_measured: AtomicU64,
    failed: AtomicU64,
    output_tokens: AtomicU64,
    dispatch_done: AtomicBool,
}

#[derive(Debug)]
struct Shared {
    planner: Mutex<Planner>,
    counters: Counters,
    clients: Vec<InferenceClient<Channel>>,
    /// With `BenchConfig::openai`: the HTTP connections the requests go over instead.
    http: Option<super::openai::HttpPool>,
    next_client: AtomicUsize,
    keys: Vec<Option<ApiKey>>,
    timeout: Duration,
    outcomes: tokio::sync::mpsc::UnboundedSender<RequestOutcome>,
    series: Option<Mutex<SeriesRecorder>>,
}

impl Shared {
    fn plan(&self, now: Instant) -> Plan {
        let plan = self
            .planner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .next(now);
        match &plan {
            Plan::Done => self.counters.dispatch_done.store(true, Ordering::Relaxed),
            Plan::Send(p) => self.record(|s| s.sent(p.tenant, p.at)),
            Plan::Skip => {}
        }
        plan
    }

    fn record(&self, f: impl FnOnce(&mut SeriesRecorder)) {
        if let Some(series) = &self.series {
            f(&mut series
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner));
        }
    }

    /// Sends one request, times it, and hands its outcome to the aggregator.
    async fn execute(&self, planned: Planned) {
        let client = {
            let i = self.next_client.fetch_add(1, Ordering::Relaxed) % self.clients.len();
            self.clients[i].clone()
        };
        let prompt_tokens = match &planned.request.input {
            Some(Input::TokenIds(ids)) => ids.ids.len() as u64,
            _ => 0,
        };
        let counters = &self.counters;
        counters.in_flight.fetch_add(1, Ordering::Relaxed);
        let key = self.keys[planned.tenant].as_ref();
        let measurement = match &self.http {
            None => {
                measure_stream(client, planned.request, key, Some(self.timeout), |chunk| {
                    counters
                        .output_tokens
                        .fetch_add(chunk.token_ids.len() as u64, Ordering::Relaxed);
                })
                .await
            }
            Some(pool) => {
                super::openai::measure_completion(
                    pool,
                    planned.request,
                    key,
                    Some(self.timeout),
                    |n| {
                        counters.output_tokens.fetch_add(n, Ordering::Relaxed);
                    },
                )
                .await
            }
        };
        let outcome = RequestOutcome::from_measurement(
            planned.tenant,
            planned.measured,
            prompt_tokens,
            measurement,
        );
        self.record(|s| s.ended(planned.at, &outcome));
        counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        if outcome.result.is_err() {
            counters.failed.fetch_add(1, Ordering::Relaxed);
        }
        let done = if planned.measured {
            &counters.done_measured
        } else {
            &counters.done_warmup
        };
        done.fetch_add(1, Ordering::Relaxed);
        // The receiver lives until every request task has ended.
        let _ = self.outcomes.send(outcome);
    }
}

/// Runs the benchmark `config` describes over `channels` (requests take them in turn) and
/// reports on it. When `interrupt` completes first (Ctrl-C), no new requests are sent,
/// those in flight are cancelled and not counted, and the report covers what finished.
pub async fn run_bench(
    channels: Vec<Channel>,
    config: BenchConfig,
    interrupt: impl Future<Output = ()>,
) -> Result<Report, InvalidInput> {
    config.validate()?;
    if channels.is_empty() {
        return Err(InvalidInput::new("--connections", "0: give at least 1"));
    }
    let connections = channels.len();
    let start = Instant::now();
    let warmup_end = start + config.warmup;
    let end = config.duration.map(|d| warmup_end + d);
    let tenants = &config.scenario.tenants;

    let (outcomes, mut received) = tokio::sync::mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        planner: Mutex::new(Planner {
            rng: Rng::new(config.seed),
            split: WeightedSplit::new(&tenants.iter().map(|t| t.tenant.weight).collect::<Vec<_>>()),
            workloads: tenants.iter().map(|t| t.workload.clone()).collect(),
            seq: 0,
            measured_sent: 0,
            requests: config.requests,
            warmup_end,
            end,
            done: false,
            shape: config.scenario.shape,
            legit: tenants.iter().map(|t| !t.attacker).collect(),
        }),
        counters: Counters::default(),
        clients: channels.into_iter().map(InferenceClient::new).collect(),
        http: config.openai.as_deref().map(super::openai::HttpPool::new),
        next_client: AtomicUsize::new(0),
        keys: tenants.iter().map(|t| t.tenant.api_key.clone()).collect(),
        timeout: config.timeout,
        outcomes,
        series: config.series.as_ref().map(|_| {
            Mutex::new(SeriesRecorder::new(
                start,
                tenants.iter().map(|t| !t.attacker).collect(),
            ))
        }),
    });
    let watcher = config
        .series
        .as_ref()
        .and_then(|s| s.replicas_command.clone())
        .map(|command| tokio::spawn(watch_replicas(shared.clone(), command)));

    let mut aggregator = Aggregator::new(
        tenants
            .iter()
            .map(|t| (t.tenant.name.clone(), t.tenant.weight))
            .collect(),
        warmup_end,
    )
    .with_ttft_slo(config.ttft_slo);
    let collector = tokio::spawn(async move {
        while let Some(outcome) = received.recv().await {
            aggregator.add(&outcome);
        }
        aggregator
    });
    let progress = (config.progress != ProgressMode::Off).then(|| {
        tokio::spawn(progress_loop(
            shared.clone(),
            config.progress,
            start,
            warmup_end,
            config.requests,
        ))
    });

    let mut tasks = JoinSet::new();
    let interrupted = {
        let drive = drive(&shared, config.load, config.seed, start, &mut tasks);
        tokio::pin!(interrupt);
        tokio::select! {
            () = drive => false,
            () = &mut interrupt => true,
        }
    };
    tasks.shutdown().await;
    if let Some(watcher) = watcher {
        watcher.abort();
        let _ = watcher.await;
    }
    let series = shared.series.as_ref().map(|s| {
        s.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .rows()
    });
    if let Some(progress) = progress {
        progress.abort();
        let _ = progress.await;
        if config.progress == ProgressMode::InPlace {
            eprint!("\r\x1b[K");
        }
    }
    // The collector ends once the last sender (held by `shared`) is gone.
    drop(shared);
    let aggregator = collector
        .await
        .map_err(|e| InvalidInput::new("bench", format!("the result collector failed: {e}")))?;
    let mut report = aggregator.report(config.run_info(connections, interrupted));
    report.series = series;
    Ok(report)
}

/// Every second, the replicas `command` reports, into the series. A failing command is
/// said once on stderr and retried each second (a kubectl hiccup costs a point, not the
/// run).
async fn watch_replicas(shared: Arc<Shared>, command: String) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut said = false;
    loop {
        ticks.tick().await;
        let at = Instant::now();
        let command = command.clone();
        let answer = tokio::task::spawn_blocking(move || replicas_from(&command))
            .await
            .unwrap_or_else(|e| Err(format!("the replica command's task failed: {e}")));
        match answer {
            Ok((desired, ready)) => shared.record(|s| s.replicas(at, desired, ready)),
            Err(why) if !said => {
                said = true;
                eprintln!("bench: --replicas-command: {why} (retrying every second)");
            }
            Err(_) => {}
        }
    }
}

/// Sends requests until the planner says stop, then waits for those in flight.
async fn drive(
    shared: &Arc<Shared>,
    load: Load,
    seed: u64,
    start: Instant,
    tasks: &mut JoinSet<()>,
) {
    match load {
        Load::Closed { concurrency } => {
            for _ in 0..concurrency {
                let shared = shared.clone();
                tasks.spawn(async move {
                    // Closed loops are never shaped (validated), so never skip.
                    while let Plan::Send(planned) = shared.plan(Instant::now()) {
                        shared.execute(*planned).await;
                    }
                });
            }
        }
        Load::Open { rate } => {
            // Arrival times have their own stream, so the schedule does not depend on the
            // workload's draws.
            for offset in PoissonArrivals::new(rate, seed ^ 0x5EED_A441_7A15_0000) {
                let at = start + offset;
                tokio::time::sleep_until(at.into()).await;
                let planned = match shared.plan(at) {
                    Plan::Send(planned) => planned,
                    Plan::Skip => continue,
                    Plan::Done => break,
                };
                let shared = shared.clone();
                tasks.spawn(async move { shared.execute(*planned).await });
                while tasks.try_join_next().is_some() {}
            }
        }
    }
    while tasks.join_next().await.is_some() {}
}

async fn progress_loop(
    shared: Arc<Shared>,
    mode: ProgressMode,
    start: Instant,
    warmup_end: Instant,
    target: Option<u64>,
) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut last_tokens = 0;
    let mut last_at = Instant::now();
    loop {
        ticks.tick().await;
        let c = &shared.counters;
        let now = Instant::now();
        let tokens = c.output_tokens.load(Ordering::Relaxed);
        let dt = now.duration_since(last_at).as_secs_f64();
        let warmup = now < warmup_end;
        let snapshot = ProgressSnapshot {
            elapsed: now - start,
            phase: if c.dispatch_done.load(Ordering::Relaxed) {
                "draining"
            } else if warmup {
                "warmup"
            } else {
                "running"
            },
            done: if warmup {
                c.done_warmup.load(Ordering::Relaxed)
            } else {
                c.done_measured.load(Ordering::Relaxed)
            },
            target,
            in_flight: c.in_flight.load(Ordering::Relaxed),
            tokens_per_s: if dt > 0.0 {
                (tokens - last_tokens) as f64 / dt
            } else {
                0.0
            },
            errors: c.failed.load(Ordering::Relaxed),
        };
        last_tokens = tokens;
        last_at = now;
        let line = format_progress(&snapshot);
        match mode {
            ProgressMode::InPlace => eprint!("\r{line}\x1b[K"),
            _ => eprintln!("{line}"),
        }
    }
}
