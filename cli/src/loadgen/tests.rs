//! The load generator against a fake `Inference` server on loopback: measurement, error
//! accounting, tenants, both loops, warmup and interruption. Timing assertions are lower
//! bounds that follow from the fake's sleeps, never performance targets.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_proto::inference::v1::inference_server::{Inference, InferenceServer};
use switchyard_proto::inference::v1::{
    FinishReason, GenerateRequest, GenerateResponse, GenerateStreamResponse, GenerateSummary,
    ListModelsRequest, ListModelsResponse, ModelInfo, Priority, TokenChunk, TokenizeRequest,
    TokenizeResponse, Usage, generate_request, generate_stream_response,
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::*;

/// What the fake saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    authorization: Option<String>,
    prompt_tokens: usize,
    max_tokens: Option<u32>,
    ignore_eos: bool,
    request_id: Option<String>,
}

/// Streams `chunks` chunks of `tokens_per_chunk` tokens, `delay` apart, then a summary.
/// The model name picks a misbehaviour: `fail-mid` (INTERNAL after two chunks),
/// `no-summary`, `finish-error` (a summary with FINISH_REASON_ERROR), `slow` (sleeps 10 s
/// before anything). The key `bad` is UNAUTHENTICATED.
#[derive(Debug, Clone)]
struct Fake {
    chunks: u32,
    tokens_per_chunk: u32,
    delay: Duration,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Fake {
    fn new(chunks: u32, tokens_per_chunk: u32, delay: Duration) -> Self {
        Self {
            chunks,
            tokens_per_chunk,
            delay,
            seen: Arc::default(),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("not poisoned").clone()
    }

    fn admit(&self, request: &Request<GenerateRequest>) -> Result<usize, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let r = request.get_ref();
        let prompt_tokens = match &r.input {
            Some(generate_request::Input::TokenIds(ids)) => ids.ids.len(),
            Some(generate_request::Input::Prompt(text)) => text.split_whitespace().count(),
            Some(generate_request::Input::Chat(chat)) => chat.messages.len(),
            None => return Err(Status::invalid_argument("input: none given")),
        };
        let sampling = r.sampling.clone().unwrap_or_default();
        self.seen.lock().expect("not poisoned").push(Seen {
            authorization: authorization.clone(),
            prompt_tokens,
            max_tokens: sampling.max_tokens,
            ignore_eos: sampling.ignore_eos,
            request_id: r.request_id.clone(),
        });
        if authorization.as_deref() == Some("Bearer bad") {
            return Err(Status::unauthenticated("authorization: unknown key"));
        }
        Ok(prompt_tokens)
    }

    fn summary(
        &self,
        prompt_tokens: usize,
        completion: u32,
        reason: FinishReason,
    ) -> GenerateSummary {
        GenerateSummary {
            finish_reason: reason as i32,
            usage: Some(Usage {
                prompt_tokens: prompt_tokens as u32,
                cached_prompt_tokens: 0,
                completion_tokens: completion,
            }),
            request_id: "fake-1".into(),
            model: "fake".into(),
            error_message: if reason == FinishReason::Error {
                "a shard failed".into()
            } else {
                String::new()
            },
            ..GenerateSummary::default()
        }
    }
}

#[tonic::async_trait]
impl Inference for Fake {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let prompt_tokens = self.admit(&request)?;
        let n = self.chunks * self.tokens_per_chunk;
        Ok(Response::new(GenerateResponse {
            text: "x".repeat(n as usize),
            token_ids: (0..n).collect(),
            summary: Some(self.summary(prompt_tokens, n, FinishReason::Length)),
        }))
    }

    type GenerateStreamStream = ReceiverStream<Result<GenerateStreamResponse, Status>>;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let prompt_tokens = self.admit(&request)?;
        let model = request.get_ref().model.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let fake = self.clone();
        tokio::spawn(async move {
            if model == "slow" {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            let mut index = 0;
            for i in 0..fake.chunks {
                tokio::time::sleep(fake.delay).await;
                if model == "fail-mid" && i == 2 {
                    let _ = tx.send(Err(Status::internal("the engine failed"))).await;
                    return;
                }
                let chunk = TokenChunk {
                    text: "x".repeat(fake.tokens_per_chunk as usize),
                    token_ids: (index..index + fake.tokens_per_chunk).collect(),
                    index,
                };
                index += fake.tokens_per_chunk;
                let event = generate_stream_response::Event::Chunk(chunk);
                if tx
                    .send(Ok(GenerateStreamResponse { event: Some(event) }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if model == "no-summary" {
                return;
            }
            let reason = if model == "finish-error" {
                FinishReason::Error
            } else {
                FinishReason::Length
            };
            let summary = fake.summary(prompt_tokens, index, reason);
            let event = generate_stream_response::Event::Summary(summary);
            let _ = tx
                .send(Ok(GenerateStreamResponse { event: Some(event) }))
                .await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn tokenize(
        &self,
        _request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn list_models(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        Ok(Response::new(ListModelsResponse {
            models: vec![ModelInfo {
                id: "fake".into(),
                vocab_size: 50_000,
                context_length: 4096,
                max_tokens_per_request: 1024,
                ..ModelInfo::default()
            }],
        }))
    }
}

/// Serves `fake` on a loopback port and returns a channel to it.
async fn serve(fake: Fake) -> Channel {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    // Without TCP_NODELAY, Nagle's algorithm holds a chunk back until the previous one is
    // acknowledged (a delayed ACK: ~40 ms on loopback), and chunks arrive in pairs.
    let incoming = futures::StreamExt::map(TcpListenerStream::new(listener), |conn| {
        if let Ok(stream) = &conn {
            let _ = stream.set_nodelay(true);
        }
        conn
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(InferenceServer::new(fake))
            .serve_with_incoming(incoming),
    );
    crate::client::connect(&format!("http://{addr}"))
        .await
        .expect("connect to the fake")
}

fn workload(model: &str) -> Workload {
    Workload {
        model: model.into(),
        prompt_tokens: 32,
        prompt_tokens_jitter: 0,
        output_tokens: 10,
        vocab: VocabRange {
            start: 1000,
            end: 2000,
        },
        priority: Priority::Unspecified,
        shared_prefix: Vec::new(),
    }
}

fn tenant(name: &str, key: &str, weight: u32) -> Tenant {
    Tenant {
        name: name.into(),
        api_key: Some(ApiKey::new(key).expect("valid key")),
        weight,
    }
}

fn config(scenario: Scenario, load: Load, requests: Option<u64>) -> BenchConfig {
    BenchConfig {
        ttft_slo: None,
        scenario,
        load,
        duration: None,
        requests,
        warmup: Duration::ZERO,
        timeout: Duration::from_secs(30),
        seed: 1,
        progress: ProgressMode::Off,
        series: None,
        openai: None,
    }
}

fn never() -> impl Future<Output = ()> {
    std::future::pending()
}

#[tokio::test]
async fn measure_stream_times_chunks() {
    let delay = Duration::from_millis(20);
    let channel = serve(Fake::new(5, 2, delay)).await;
    let mut texts = String::new();
    let request = workload("").request(&mut rng::Rng::new(1), "r".into());
    let key = ApiKey::new("good").expect("valid");
    let m = measure_stream(
        switchyard_proto::inference::v1::inference_client::InferenceClient::new(channel),
        request,
        Some(&key),
        Some(Duration::from_secs(10)),
        |chunk| texts.push_str(&chunk.text),
    )
    .await;
    assert!(m.result.is_ok(), "{:?}", m.result);
    assert_eq!(texts.len(), 10);
    assert_eq!(m.output_tokens, 10);
    assert!(m.ttft().expect("a first token") >= delay);
    // Four gaps after the first chunk, two tokens each, each token half a gap.
    assert_eq!(m.itl.len(), 4, "{:?} ttft {:?}", m.itl, m.ttft());
    for &(per_token, tokens) in &m.itl {
        assert_eq!(tokens, 2);
        assert!(per_token >= delay / 2, "{:?} ttft {:?}", m.itl, m.ttft());
    }
    assert!(m.e2e() >= delay * 5);
    let summary = m.summary.as_ref().expect("summary");
    assert_eq!(summary.usage.map(|u| u.prompt_tokens), Some(32));
    assert!(m.decode_tokens_per_s().is_some());
}

#[tokio::test]
async fn closed_loop_splits_tenants_and_counts_errors() {
    let fake = Fake::new(5, 2, Duration::from_millis(2));
    let channel = serve(fake.clone()).await;
    let scenario = Scenario::uniform(
        vec![tenant("good", "good", 2), tenant("rejected", "bad", 1)],
        workload(""),
    );
    let report = run_bench(
        vec![channel],
        config(scenario, Load::Closed { concurrency: 3 }, Some(12)),
        never(),
    )
    .await
    .expect("runs");

    let t = &report.total;
    assert_eq!((t.requests, t.ok, t.failed), (12, 8, 4));
    assert_eq!(t.errors.get("unauthenticated"), Some(&4));
    assert_eq!(t.finish_reasons.get("length"), Some(&8));
    assert_eq!((t.prompt_tokens, t.output_tokens), (8 * 32, 8 * 10));
    assert_eq!(t.ttft.as_ref().map(|s| s.count), Some(8));
    // Tokens after each request's first chunk: 4 chunks of 2.
    assert_eq!(t.itl.as_ref().map(|s| s.count), Some(8 * 8));
    assert_eq!(t.e2e.as_ref().map(|s| s.count), Some(8));
    assert!(report.duration_s > 0.0 && t.output_tokens_per_s > 0.0);

    let good = &report.tenants[0];
    assert_eq!((good.name.as_str(), good.ok, good.failed), ("good", 8, 0));
    let rejected = &report.tenants[1];
    assert_eq!((rejected.ok, rejected.failed), (0, 4));
    assert_eq!(rejected.ttft, None);

    let seen = fake.seen();
    assert_eq!(seen.len(), 12);
    let with = |key: &str| {
        seen.iter()
            .filter(|s| s.authorization.as_deref() == Some(key))
            .count()
    };
    assert_eq!((with("Bearer good"), with("Bearer bad")), (8, 4));
    assert!(seen.iter().all(|s| {
        s.prompt_tokens == 32
            && s.max_tokens == Some(10)
            && s.ignore_eos
            && s.request_id
                .as_deref()
                .is_some_and(|id| id.starts_with("bench-"))
    }));

    let text = format_report(&report);
    assert!(
        text.contains("requests: 8 ok, 4 failed (unauthenticated 4)"),
        "{text}"
    );
    assert!(
        text.contains("errors of rejected: unauthenticated 4"),
        "{text}"
    );
}

#[tokio::test]
async fn open_loop_sends_the_requested_count_over_several_connections() {
    let fake = Fake::new(3, 1, Duration::from_millis(1));
    let channels = vec![serve(fake.clone()).await, serve(fake.clone()).await];
    let scenario = Scenario::uniform(
        vec![Tenant {
            name: "anon".into(),
            api_key: None,
            weight: 1,
        }],
        workload(""),
    );
    let report = run_bench(
        channels,
        config(scenario, Load::Open { rate: 200.0 }, Some(10)),
        never(),
    )
    .await
    .expect("runs");
    assert_eq!((report.total.ok, report.total.failed), (10, 0));
    assert_eq!(report.run.mode, "open");
    assert_eq!(report.run.connections, 2);
    assert!(fake.seen().iter().all(|s| s.authorization.is_none()));
}

#[tokio::test]
async fn every_failure_has_its_label() {
    let fake = Fake::new(4, 1, Duration::from_millis(1));
    let channel = serve(fake).await;
    for (model, label) in [
        ("fail-mid", "internal"),
        ("no-summary", "no_summary"),
        ("finish-error", "finish_reason_error"),
        ("slow", "deadline_exceeded"),
    ] {
        let scenario = Scenario::uniform(vec![tenant("t", "good", 1)], workload(model));
        let mut config = config(scenario, Load::Closed { concurrency: 2 }, Some(2));
        config.timeout = Duration::from_millis(200);
        let report = run_bench(vec![channel.clone()], config, never())
            .await
            .expect("runs");
        assert_eq!(report.total.failed, 2, "{model}");
        assert_eq!(
            report.total.errors.get(label),
            Some(&2),
            "{model}: {:?}",
            report.total.errors
        );
        assert_eq!(
            report.total.output_tokens, 0,
            "{model}: failed requests add no tokens"
        );
    }
}

#[tokio::test]
async fn warmup_requests_are_sent_but_not_counted() {
    let fake = Fake::new(2, 1, Duration::from_millis(10));
    let channel = serve(fake.clone()).await;
    let scenario = Scenario::uniform(vec![tenant("t", "good", 1)], workload(""));
    let mut config = config(scenario, Load::Closed { concurrency: 2 }, None);
    config.warmup = Duration::from_millis(150);
    config.duration = Some(Duration::from_millis(200));
    let report = run_bench(vec![channel], config, never())
        .await
        .expect("runs");
    let sent = fake.seen().len() as u64;
    assert!(report.total.ok > 0);
    // Each request takes at least 20 ms, so the warmup sent some with 2 in flight.
    assert!(
        sent > report.total.requests,
        "{sent} sent, {} counted",
        report.total.requests
    );
    assert_eq!(report.run.warmup_s, 0.15);
    // Measured requests were all sent within the 200 ms window; the last may end later.
    assert!(report.duration_s >= 0.02);
}

#[tokio::test]
async fn interrupt_stops_early_and_reports_what_finished() {
    let fake = Fake::new(1, 1, Duration::from_millis(1));
    let channel = serve(fake).await;
    let scenario = Scenario::uniform(vec![tenant("t", "good", 1)], workload("slow"));
    let started = std::time::Instant::now();
    let report = run_bench(
        vec![channel],
        config(scenario, Load::Closed { concurrency: 4 }, Some(100)),
        tokio::time::sleep(Duration::from_millis(200)),
    )
    .await
    .expect("runs");
    assert!(report.run.interrupted);
    assert_eq!(
        report.total.requests, 0,
        "in-flight requests are not counted"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the slow calls were cancelled"
    );
}

#[tokio::test]
async fn invalid_configs_are_refused_before_sending() {
    let fake = Fake::new(1, 1, Duration::ZERO);
    let channel = serve(fake.clone()).await;
    let scenario = Scenario::uniform(vec![tenant("t", "good", 1)], workload(""));
    for (config, flag) in [
        (
            config(scenario.clone(), Load::Closed { concurrency: 0 }, Some(1)),
            "--concurrency",
        ),
        (
            config(scenario.clone(), Load::Open { rate: 0.0 }, Some(1)),
            "--rate",
        ),
        (
            config(scenario.clone(), Load::Closed { concurrency: 1 }, None),
            "--duration/--requests",
        ),
    ] {
        let e = run_bench(vec![channel.clone()], config, never())
            .await
            .expect_err("invalid");
        assert_eq!(e.what, flag);
    }
    assert!(fake.seen().is_empty());
}

/// `spike` over a real (fake) server: the legitimate tenant's arrivals thin to the base
/// rate outside the spike and reach the factor within it, the attacker's stay at its rate
/// and are refused; the series has a row a second with the replicas a command printed.
#[tokio::test]
async fn a_shaped_scenario_thins_legitimate_arrivals_and_records_its_series() {
    use super::workload::{ScenarioKind, Shape};
    let fake = Fake::new(1, 1, Duration::from_millis(1));
    let channel = serve(fake).await;
    let duration = Duration::from_secs(3);
    let shape = Shape::Spike {
        from: Duration::from_secs(1),
        to: Duration::from_secs(2),
        factor: 4.0,
    };
    let (scenario, total) = Scenario::named_shaped(
        ScenarioKind::FloodSpike,
        vec![tenant("acme", "good", 1), tenant("attacker", "bad", 1)],
        workload(""),
        20.0,
        30.0,
        shape,
    )
    .expect("a scenario");
    assert_eq!(total, 20.0 * 4.0 + 30.0, "arrivals at the peak rate");
    let mut config = config(scenario, Load::Open { rate: total }, None);
    config.duration = Some(duration);
    config.series = Some(super::SeriesOptions {
        replicas_command: Some("echo 2 1".into()),
    });
    let report = run_bench(vec![channel], config, never())
        .await
        .expect("runs");
    let rows = report.series.expect("a series");
    assert!(rows.len() >= 3, "{rows:?}");
    let acme: Vec<f64> = rows.iter().take(3).map(|r| r.offered[0]).collect();
    let attacker: Vec<f64> = rows.iter().take(3).map(|r| r.offered[1]).collect();
    // Poisson counts: 20 ± 3σ outside, 80 ± 3σ within.
    assert!((5.0..=35.0).contains(&acme[0]), "{acme:?}");
    assert!((53.0..=107.0).contains(&acme[1]), "{acme:?}");
    assert!((5.0..=35.0).contains(&acme[2]), "{acme:?}");
    assert!(
        attacker.iter().all(|&n| (13.0..=47.0).contains(&n)),
        "{attacker:?}"
    );
    // The attacker's key is refused (unauthenticated): only acme's requests count as accepted.
    let accepted: f64 = rows.iter().map(|r| r.accepted).sum();
    let offered_acme: f64 = rows.iter().map(|r| r.offered[0]).sum();
    assert_eq!(accepted, offered_acme);
    assert!(
        rows.iter().skip(1).all(|r| (r.desired, r.ready) == (2, 1)),
        "{rows:?}"
    );
    assert!(rows[1].legit_p99_ttft > 0.0, "{rows:?}");
}
