//! Prometheus metrics of a frontend (served by [`crate::telemetry::serve_metrics`]).
//!
//! [`FrontendMetrics`] owns its own [`Registry`] (prefix `switchyard_`) and one typed handle
//! per metric; the server and the engine call its plainly named methods
//! ([`FrontendMetrics::observe_ttft`], [`FrontendMetrics::set_kv_blocks`], ...).
//! The HTTP server serves the whole registry, so a process may register more collectors.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `switchyard_requests_total` | counter | `status`: gRPC code, [`status_label`](crate::telemetry::status_label) |
//! | `switchyard_time_to_first_token_seconds` | histogram | |
//! | `switchyard_first_token_timestamp_seconds` | gauge (Unix time; 0 until then) | |
//! | `switchyard_inter_token_latency_seconds` | histogram | |
//! | `switchyard_request_duration_seconds` | histogram | |
//! | `switchyard_prompt_tokens_total` | counter | |
//! | `switchyard_generated_tokens_total` | counter | |
//! | `switchyard_running_sequences` | gauge | |
//! | `switchyard_waiting_sequences` | gauge | |
//! | `switchyard_kv_cache_blocks` | gauge | `state`: `used`, `free` |
//! | `switchyard_kv_cache_block_size_tokens` | gauge | |
//! | `switchyard_prefix_cache_queried_tokens_total` | counter | |
//! | `switchyard_prefix_cache_hit_tokens_total` | counter | |
//! | `switchyard_prefix_cache_evicted_blocks_total` | counter | |
//! | `switchyard_preemptions_total` | counter | |
//! | `switchyard_batch_size` | histogram | |
//! | `switchyard_batch_tokens` | histogram | |
//! | `switchyard_engine_step_duration_seconds` | histogram | |
//! | `switchyard_expert_tokens_total` | counter | `layer`, `expert` |
//! | `switchyard_expert_load_imbalance` | gauge: the busiest expert's routed tokens over the mean expert's in the last minute (`GET /expert-load` has the loads) | `layer` |
//! | `switchyard_expert_shard_imbalance` | gauge, with expert shards: the busiest shard's share of the layer's routed tokens over the mean shard's, in the last minute, on the placement the shards report | `layer` |

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::expert_load::{ExpertLoad, ExpertLoadReport};
use crate::telemetry::{ALL_CODES, counter, gauge, gauge_value, histogram, render, status_label};

/// Prefix of every metric name (`switchyard_requests_total`, ...).
pub const PREFIX: &str = "switchyard";

/// Time to first token: 1 ms to 5 minutes (queueing under load can take minutes).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
    3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// Inter-token latency: 1 ms to 2 s, finest around typical decode steps (10–100 ms).
pub const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0,
];

/// Whole-request duration: 10 ms to 20 minutes.
pub const REQUEST_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0,
    120.0, 180.0, 300.0, 600.0, 1200.0,
];

/// Sequences in one engine step: powers of two up to 1024.
pub const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Tokens in one engine step (decode tokens plus prefill chunks): powers of two up to 32768.
pub const BATCH_TOKENS_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0, 32768.0,
];

/// One engine step: 0.5 ms to 10 s.
pub const ENGINE_STEP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The metrics of one frontend process: a registry and a typed handle per metric.
///
/// Cheap to share (`Arc<FrontendMetrics>`); every method takes `&self` and only touches
/// atomics, except the first observation of each `(layer, expert)` pair, which creates
/// its series once.
#[derive(Debug)]
pub struct FrontendMetrics {
    registry: Registry,
    requests: IntCounterVec,
    /// One handle per status code, in [`ALL_CODES`] order (`tonic::Code as usize`).
    requests_by_code: Vec<IntCounter>,
    ttft: Histogram,
    /// When the first request got its first token (Unix time), set once.
    first_token: prometheus::Gauge,
    first_token_set: std::sync::Once,
    itl: Histogram,
    request_duration: Histogram,
    prompt_tokens: IntCounter,
    generated_tokens: IntCounter,
    running_sequences: IntGauge,
    waiting_sequences: IntGauge,
    kv_used: IntGauge,
    kv_free: IntGauge,
    kv_cached: IntGauge,
    kv_block_size: IntGauge,
    prefix_queried: IntCounter,
    prefix_hits: IntCounter,
    prefix_evicted: IntCounter,
    preemptions: IntCounter,
    batch_size: Histogram,
    batch_tokens: Histogram,
    engine_step: Histogram,
    expert_tokens: IntCounterVec,
    num_layers: usize,
    num_experts: usize,
    /// `num_layers * num_experts` lazily created series, indexed `layer * num_experts + expert`.
    expert_series: Vec<OnceLock<IntCounter>>,
    /// The last seconds' TTFTs, for the demand report's quantiles.
    recent_ttft: std::sync::Mutex<crate::recent::RecentLatencies>,
    /// Routed tokens per expert over the last minute, and when the imbalance gauges were
    /// last set from it.
    expert_window: std::sync::Mutex<(ExpertLoad, Option<std::time::Instant>)>,
    expert_imbalance: prometheus::GaugeVec,
    shard_imbalance: prometheus::GaugeVec,
    /// With expert shards: the shards, which say what each holds
    /// ([`Self::set_placement`]).
    placement: OnceLock<crate::experts::remote::RemoteExperts>,
}

impl FrontendMetrics {
    /// Creates the metrics of a frontend serving a model with `num_layers` decoder layers and
    /// `num_experts` routed experts per MoE layer (both 0 for a dense model). The expert
    /// counter's `layer` and `expert` labels only ever take values below these, so its
    /// series are bounded by the model's size.
    pub fn new(num_layers: usize, num_experts: usize) -> Self {
        let registry = Registry::new_custom(Some(PREFIX.into()), None)
            .expect("static registry options are valid");

        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Finished Inference requests, by gRPC status code (ok, invalid_argument, ...)",
            ),
            &["status"],
        )
        .expect("static metric options are valid");
        // Every code's series exists from the start, so rate() and absent() behave.
        let requests_by_code = ALL_CODES
            .iter()
            .map(|&code| requests.with_label_values(&[status_label(code)]))
            .collect();
        let ttft = histogram(
            "time_to_first_token_seconds",
            "Time from receiving a request to its first generated token (queueing and prefill)",
            TTFT_BUCKETS,
        );
        let first_token = prometheus::Gauge::new(
            "first_token_timestamp_seconds",
            "When this frontend's first request got its first token (Unix time; 0 until then)",
        )
        .expect("static metric options are valid");
        let itl = histogram(
            "inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request",
            ITL_BUCKETS,
        );
        let request_duration = histogram(
            "request_duration_seconds",
            "Time from receiving a request to its end, whatever the outcome",
            REQUEST_DURATION_BUCKETS,
        );
        let prompt_tokens = counter("prompt_tokens_total", "Prompt tokens of admitted requests");
        let generated_tokens = counter(
            "generated_tokens_total",
            "Tokens generated; its rate is the output tokens per second",
        );
        let running_sequences = gauge(
            "running_sequences",
            "Sequences in the running batch (prefilling or decoding)",
        );
        let waiting_sequences = gauge(
            "waiting_sequences",
            "Admitted sequences waiting for the scheduler",
        );
        let kv_blocks = IntGaugeVec::new(
            Opts::new(
                "kv_cache_blocks",
                "KV cache blocks, by state: used (held by sequences) + free = the cache; \
                 cached: in the prefix cache, held or not",
            ),
            &["state"],
        )
        .expect("static metric options are valid");
        let kv_used = kv_blocks.with_label_values(&["used"]);
        let kv_free = kv_blocks.with_label_values(&["free"]);
        let kv_cached = kv_blocks.with_label_values(&["cached"]);
        let prefix_queried = counter(
            "prefix_cache_queried_tokens_total",
            "Prompt tokens looked up in the prefix cache (the full blocks before each prompt's \
             last token)",
        );
        let prefix_hits = counter(
            "prefix_cache_hit_tokens_total",
            "Prompt tokens whose keys and values came from the prefix cache",
        );
        let prefix_evicted = counter(
            "prefix_cache_evicted_blocks_total",
            "Cached KV blocks evicted to make room",
        );
        let kv_block_size = gauge(
            "kv_cache_block_size_tokens",
            "Tokens held by one KV cache block",
        );
        let batch_size = histogram(
            "batch_size",
            "Sequences in one engine step",
            BATCH_SIZE_BUCKETS,
        );
        let batch_tokens = histogram(
            "batch_tokens",
            "Tokens computed in one engine step (decode tokens plus prefill tokens)",
            BATCH_TOKENS_BUCKETS,
        );
        let engine_step = histogram(
            "engine_step_duration_seconds",
            "Wall time of one engine step (one forward pass of the batch and sampling)",
            ENGINE_STEP_BUCKETS,
        );
        let expert_tokens = IntCounterVec::new(
            Opts::new(
                "expert_tokens_total",
                "Tokens routed to each routed expert, by decoder layer and expert index",
            ),
            &["layer", "expert"],
        )
        .expect("static metric options are valid");

        let preemptions = counter(
            "preemptions_total",
            "Sequences taken out of the batch because the KV cache ran short (recomputed \
             when blocks free up)",
        );
        let expert_imbalance = prometheus::GaugeVec::new(
            Opts::new(
                "expert_load_imbalance",
                "Routed tokens of the busiest expert over the mean expert's, per decoder layer, \
                 in the last minute (1 when even; GET /expert-load has the loads)",
            ),
            &["layer"],
        )
        .expect("static metric options are valid");
        let shard_imbalance = prometheus::GaugeVec::new(
            Opts::new(
                "expert_shard_imbalance",
                "With expert shards: routed tokens of the busiest shard over the mean shard's, \
                 per decoder layer, in the last minute, each expert's tokens split evenly over \
                 the shards holding it (1 when even)",
            ),
            &["layer"],
        )
        .expect("static metric options are valid");
        let collectors: [Box<dyn Collector>; 21] = [
            Box::new(expert_imbalance.clone()),
            Box::new(shard_imbalance.clone()),
            Box::new(preemptions.clone()),
            Box::new(prefix_queried.clone()),
            Box::new(prefix_hits.clone()),
            Box::new(prefix_evicted.clone()),
            Box::new(requests.clone()),
            Box::new(ttft.clone()),
            Box::new(first_token.clone()),
            Box::new(itl.clone()),
            Box::new(request_duration.clone()),
            Box::new(prompt_tokens.clone()),
            Box::new(generated_tokens.clone()),
            Box::new(running_sequences.clone()),
            Box::new(waiting_sequences.clone()),
            Box::new(kv_blocks),
            Box::new(kv_block_size.clone()),
            Box::new(batch_size.clone()),
            Box::new(batch_tokens.clone()),
            Box::new(engine_step.clone()),
            Box::new(expert_tokens.clone()),
        ];
        for collector in collectors {
            registry
                .register(collector)
                .expect("each metric is registered once");
        }
        let series = num_layers.saturating_mul(num_experts);
        Self {
            registry,
            requests,
            requests_by_code,
            ttft,
            first_token,
            first_token_set: std::sync::Once::new(),
            itl,
            request_duration,
            prompt_tokens,
            generated_tokens,
            running_sequences,
            waiting_sequences,
            kv_used,
            kv_free,
            kv_cached,
            kv_block_size,
            prefix_queried,
            prefix_hits,
            prefix_evicted,
            preemptions,
            batch_size,
            batch_tokens,
            engine_step,
            expert_tokens,
            num_layers,
            num_experts,
            expert_series: (0..series).map(|_| OnceLock::new()).collect(),
            recent_ttft: Default::default(),
            expert_window: std::sync::Mutex::new((
                ExpertLoad::new(num_layers, num_experts, std::time::Instant::now()),
                None,
            )),
            expert_imbalance,
            shard_imbalance,
            placement: OnceLock::new(),
        }
    }

    /// The expert shards (what each holds): [`Self::expert_load`] then reports each
    /// layer's shard imbalance. Set once; later calls are ignored.
    pub fn set_placement(&self, shards: crate::experts::remote::RemoteExperts) {
        let _ = self.placement.set(shards);
    }

    /// The registry holding every metric, for [`crate::telemetry::serve_metrics`] (a clone shares it).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The current values in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        render(&self.registry)
    }

    /// Counts one finished request with its final gRPC status.
    pub fn count_request(&self, code: tonic::Code) {
        match self.requests_by_code.get(code as usize) {
            Some(counter) => counter.inc(),
            None => self.requests.with_label_values(&[status_label(code)]).inc(),
        }
    }

    /// Time from receiving a request to its first generated token.
    pub fn observe_ttft(&self, ttft: Duration) {
        self.ttft.observe(ttft.as_secs_f64());
        self.first_token_set
            .call_once(|| self.first_token.set(crate::telemetry::unix_now()));
        self.recent_ttft
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(std::time::Instant::now(), ttft);
    }

    /// TTFT quantiles over the last [`crate::recent::WINDOW_SECONDS`]; `None` when no
    /// request got its first token in it.
    pub fn recent_ttft(&self) -> Option<crate::recent::Quantiles> {
        self.recent_ttft
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .quantiles(std::time::Instant::now())
    }

    /// KV cache blocks in use and free, as last set.
    pub fn kv_use(&self) -> crate::admission::demand::KvUse {
        crate::admission::demand::KvUse {
            used_blocks: u64::try_from(self.kv_used.get()).unwrap_or(0),
            free_blocks: u64::try_from(self.kv_free.get()).unwrap_or(0),
        }
    }

    /// Time between two consecutive tokens of one request. For tokens produced together
    /// (a step that yielded several), call it once per token with the gap divided among them.
    pub fn observe_itl(&self, gap: Duration) {
        self.itl.observe(gap.as_secs_f64());
    }

    /// Time from receiving a request to its end, whatever its status.
    pub fn observe_request_duration(&self, took: Duration) {
        self.request_duration.observe(took.as_secs_f64());
    }

    /// Adds the prompt tokens of an admitted request.
    pub fn add_prompt_tokens(&self, tokens: u64) {
        self.prompt_tokens.inc_by(tokens);
    }

    /// Adds newly generated tokens.
    pub fn add_generated_tokens(&self, tokens: u64) {
        self.generated_tokens.inc_by(tokens);
    }

    /// Sequences running and waiting, as the scheduler sees them now.
    pub fn set_sequences(&self, running: u64, waiting: u64) {
        self.running_sequences.set(gauge_value(running));
        self.waiting_sequences.set(gauge_value(waiting));
    }

    /// KV cache blocks in use and free.
    pub fn set_kv_blocks(&self, used: u64, free: u64) {
        self.kv_used.set(gauge_value(used));
        self.kv_free.set(gauge_value(free));
    }

    /// The prefix cache's size and its counters so far (monotonic; only the growth is
    /// added).
    pub fn set_prefix_cache(
        &self,
        cached_blocks: u64,
        c: crate::engine::kv_cache::CacheCounters,
        preemptions: u64,
    ) {
        self.kv_cached.set(gauge_value(cached_blocks));
        for (counter, total) in [
            (&self.preemptions, preemptions),
            (&self.prefix_queried, c.queried_tokens),
            (&self.prefix_hits, c.hit_tokens),
            (&self.prefix_evicted, c.evicted_blocks),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    /// Tokens per KV cache block (set once the cache is allocated).
    pub fn set_kv_block_size(&self, tokens: u64) {
        self.kv_block_size.set(gauge_value(tokens));
    }

    /// One engine step: how many sequences and tokens it computed, and how long it took.
    pub fn observe_step(&self, sequences: u64, tokens: u64, took: Duration) {
        // Batch sizes stay far below 2^53, so the conversions are exact.
        self.batch_size.observe(sequences as f64);
        self.batch_tokens.observe(tokens as f64);
        self.engine_step.observe(took.as_secs_f64());
    }

    /// Adds `tokens` routed to `expert` of decoder layer `layer`. A pair outside the shape
    /// given to [`FrontendMetrics::new`] is ignored (it would be a bug in the caller, and must
    /// not grow the label set).
    pub fn add_expert_tokens(&self, layer: usize, expert: usize, tokens: u64) {
        if layer >= self.num_layers || expert >= self.num_experts || tokens == 0 {
            return;
        }
        let series = self.expert_series[layer * self.num_experts + expert].get_or_init(|| {
            self.expert_tokens
                .with_label_values(&[layer.to_string(), expert.to_string()])
        });
        series.inc_by(tokens);
    }

    /// Counts one step's routes of `layer` (`experts`: one entry per routed token) in the
    /// last minute's window, and sets the imbalance gauges unless they were set in the
    /// last second.
    pub fn add_recent_routes(&self, now: std::time::Instant, layer: usize, experts: &[u32]) {
        let last = {
            let mut w = self
                .expert_window
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            w.0.add(now, layer, experts);
            w.1
        };
        if last.is_none_or(|t| now.saturating_duration_since(t).as_secs() >= 1) {
            self.expert_load(now);
        }
    }

    /// The routed tokens per expert over the last minute (`GET /expert-load`); sets the
    /// imbalance gauges from it.
    pub fn expert_load(&self, now: std::time::Instant) -> ExpertLoadReport {
        let report = {
            let mut w = self
                .expert_window
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            w.1 = Some(now);
            w.0.report(now)
        };
        let mut report = report;
        if let Some(shards) = self.placement.get() {
            let placement = shards.holders();
            for l in &mut report.layers {
                l.shard_imbalance = placement
                    .get(&l.layer)
                    .and_then(|holders| super::expert_load::shard_imbalance(&l.load, holders));
            }
        }
        self.expert_imbalance.reset();
        self.shard_imbalance.reset();
        for l in &report.layers {
            let layer = l.layer.to_string();
            self.expert_imbalance
                .with_label_values(&[layer.as_str()])
                .set(l.imbalance);
            if let Some(s) = l.shard_imbalance {
                self.shard_imbalance
                    .with_label_values(&[layer.as_str()])
                    .set(s);
            }
        }
        report
    }

    /// Adds one layer's routing counts at once: `tokens[e]` tokens went to expert `e`.
    /// Entries past the model's expert count are ignored, as in
    /// [`FrontendMetrics::add_expert_tokens`].
    pub fn add_layer_expert_tokens(&self, layer: usize, tokens: &[u64]) {
        for (expert, &count) in tokens.iter().enumerate() {
            self.add_expert_tokens(layer, expert, count);
        }
    }
}

/// The admission pipeline's outcome layer counts every `Inference` call's final status
/// here, once.
impl crate::admission::StatusCounter for FrontendMetrics {
    fn count_status(&self, code: tonic::Code) {
        self.count_request(code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_names_and_labels() {
        let m = FrontendMetrics::new(4, 8);
        m.count_request(tonic::Code::Ok);
        m.count_request(tonic::Code::Ok);
        m.count_request(tonic::Code::InvalidArgument);
        m.observe_ttft(Duration::from_millis(120));
        m.observe_itl(Duration::from_millis(20));
        m.observe_request_duration(Duration::from_secs(2));
        m.add_prompt_tokens(100);
        m.add_generated_tokens(64);
        m.set_sequences(3, 5);
        m.set_kv_blocks(40, 60);
        m.set_kv_block_size(16);
        m.observe_step(3, 130, Duration::from_millis(25));
        m.add_expert_tokens(1, 7, 10);
        m.add_layer_expert_tokens(2, &[0, 3]);
        // Outside the model's shape: ignored.
        m.add_expert_tokens(4, 0, 1);
        m.add_expert_tokens(0, 8, 1);

        let text = m.render();
        for expected in [
            "switchyard_requests_total{status=\"ok\"} 2",
            "switchyard_requests_total{status=\"invalid_argument\"} 1",
            "switchyard_requests_total{status=\"unavailable\"} 0",
            "switchyard_time_to_first_token_seconds_bucket{le=\"0.15\"} 1",
            "switchyard_time_to_first_token_seconds_count 1",
            "switchyard_inter_token_latency_seconds_bucket{le=\"0.02\"} 1",
            "switchyard_request_duration_seconds_sum 2",
            "switchyard_prompt_tokens_total 100",
            "switchyard_generated_tokens_total 64",
            "switchyard_running_sequences 3",
            "switchyard_waiting_sequences 5",
            "switchyard_kv_cache_blocks{state=\"used\"} 40",
            "switchyard_kv_cache_blocks{state=\"free\"} 60",
            "switchyard_kv_cache_block_size_tokens 16",
            "switchyard_batch_size_bucket{le=\"4\"} 1",
            "switchyard_batch_tokens_sum 130",
            "switchyard_engine_step_duration_seconds_count 1",
            "switchyard_expert_tokens_total{expert=\"7\",layer=\"1\"} 10",
            "switchyard_expert_tokens_total{expert=\"1\",layer=\"2\"} 3",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        // Zero counts and out-of-shape pairs create no series.
        assert!(!text.contains("expert=\"0\",layer=\"2\""), "{text}");
        assert!(!text.contains("layer=\"4\""), "{text}");
        assert!(!text.contains("expert=\"8\""), "{text}");
    }
}
