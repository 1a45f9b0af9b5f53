//! Tier 4: a real `switchyard-worker --role frontend` process serving a committed fixture
//! checkpoint, called over gRPC: generation (unary, streaming, chat), tokenization, every
//! invalid-argument case, cancellation freeing KV blocks, and KV-cache exhaustion.

use std::time::{Duration, Instant};

use switchyard_proto::inference::v1::{
    self as pb, generate_request::Input, generate_stream_response::Event,
    inference_client::InferenceClient,
};
use switchyard_tests::FrontendProcess;
use switchyard_tests::worker::fixture_model;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

const MODEL: &str = "qwen3_moe";

async fn client(frontend: &FrontendProcess) -> InferenceClient<Channel> {
    InferenceClient::connect(frontend.endpoint())
        .await
        .expect("connect to the frontend")
}

fn prompt(text: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(Input::Prompt(text.into())),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn chat(messages: &[(pb::Role, &str)]) -> Input {
    Input::Chat(pb::ChatMessages {
        messages: messages
            .iter()
            .map(|(role, content)| pb::ChatMessage {
                role: *role as i32,
                content: (*content).into(),
            })
            .collect(),
    })
}

/// A request with `input` and otherwise `prompt`'s settings.
fn with_input(input: Input, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(input),
        ..prompt("", max_tokens)
    }
}

/// Streams `req`; returns the concatenated text, token ids and the summary.
async fn stream_all(
    client: &mut InferenceClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<(String, Vec<u32>, pb::GenerateSummary), tonic::Status> {
    let mut stream = client.generate_stream(req).await?.into_inner();
    let (mut text, mut ids) = (String::new(), Vec::new());
    while let Some(msg) = stream.next().await {
        match msg?.event {
            Some(Event::Chunk(c)) => {
                text.push_str(&c.text);
                ids.extend(c.token_ids);
            }
            Some(Event::Summary(s)) => return Ok((text, ids, s)),
            None => panic!("an empty stream message"),
        }
    }
    panic!("the stream ended without a summary")
}

#[tokio::test]
async fn generation_unary_streaming_chat_tokenize_and_models() {
    let frontend = FrontendProcess::start(&fixture_model(MODEL), &["--model-id", "tiny"])
        .await
        .expect("frontend");
    let mut c = client(&frontend).await;

    let models = c
        .list_models(pb::ListModelsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(models.models.len(), 1);
    let info = &models.models[0];
    assert_eq!(
        (info.id.as_str(), info.model_type.as_str()),
        ("tiny", "qwen3_moe")
    );
    assert!(info.num_experts > 0 && info.experts_per_token > 0 && info.has_chat_template);

    // Unary and streaming give the same greedy tokens and text.
    let unary = c
        .generate(prompt("The quick brown fox", 12))
        .await
        .expect("generate")
        .into_inner();
    let summary = unary.summary.clone().expect("summary");
    assert_eq!(summary.finish_reason, pb::FinishReason::Length as i32);
    let usage = summary.usage.expect("usage");
    assert_eq!(usage.completion_tokens, 12);
    assert_eq!(unary.token_ids.len(), 12);
    let (text, ids, s) = stream_all(&mut c, prompt("The quick brown fox", 12))
        .await
        .expect("stream");
    assert_eq!(ids, unary.token_ids);
    assert_eq!(text, unary.text);
    assert_eq!(s.usage.expect("usage").prompt_tokens, usage.prompt_tokens);
    let timings = s.timings.expect("timings");
    assert!(
        timings.time_to_first_token_us > 0
            && timings.total_time_us >= timings.time_to_first_token_us
    );

    // A stop token ends generation: its id is the last of `token_ids` and counted, its text
    // is not returned.
    let k = (1..ids.len())
        .find(|&k| !ids[..k].contains(&ids[k]))
        .expect("a token not seen before it");
    let mut stopping = prompt("The quick brown fox", 12);
    stopping.sampling.as_mut().expect("sampling").stop_token_ids = vec![ids[k]];
    let stopped = c
        .generate(stopping.clone())
        .await
        .expect("stop token")
        .into_inner();
    let s = stopped.summary.expect("summary");
    assert_eq!(s.finish_reason, pb::FinishReason::Stop as i32);
    assert_eq!(s.stop_token_id, Some(ids[k]));
    assert_eq!(stopped.token_ids, ids[..=k].to_vec());
    assert_eq!(s.usage.expect("usage").completion_tokens as usize, k + 1);
    let (streamed_text, streamed_ids, _) = stream_all(&mut c, stopping).await.expect("stream");
    assert_eq!(
        (streamed_text, streamed_ids),
        (stopped.text.clone(), stopped.token_ids.clone())
    );
    assert!(
        text.starts_with(&stopped.text),
        "{text:?} vs {:?}",
        stopped.text
    );

    // Token ids in, and a seeded sampled generation is reproducible.
    let mut seeded = pb::GenerateRequest {
        input: Some(Input::TokenIds(pb::TokenIds {
            ids: ids[..4].to_vec(),
        })),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(10),
            temperature: Some(0.9),
            top_p: Some(0.95),
            top_k: 50,
            seed: Some(7),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let a = c
        .generate(seeded.clone())
        .await
        .expect("seeded")
        .into_inner();
    let b = c
        .generate(seeded.clone())
        .await
        .expect("seeded")
        .into_inner();
    assert_eq!(a.token_ids, b.token_ids, "same seed, same tokens");
    seeded.request_id = Some("mine".into());
    let named = c.generate(seeded).await.expect("named").into_inner();
    assert_eq!(named.summary.expect("summary").request_id, "mine");

    // Chat: rendered with the checkpoint's template; Tokenize agrees with what was run.
    let messages = [
        (pb::Role::System, "Be brief."),
        (pb::Role::User, "Hello there"),
    ];
    let tokenized = c
        .tokenize(pb::TokenizeRequest {
            input: Some(pb::tokenize_request::Input::Chat(pb::ChatMessages {
                messages: messages
                    .iter()
                    .map(|(r, t)| pb::ChatMessage {
                        role: *r as i32,
                        content: (*t).into(),
                    })
                    .collect(),
            })),
            return_token_strings: true,
            ..Default::default()
        })
        .await
        .expect("tokenize chat")
        .into_inner();
    assert_eq!(tokenized.token_ids.len(), tokenized.token_strings.len());
    let mut chat_req = prompt("", 5);
    chat_req.input = Some(chat(&messages));
    let reply = c.generate(chat_req).await.expect("chat").into_inner();
    assert_eq!(
        reply
            .summary
            .expect("summary")
            .usage
            .expect("usage")
            .prompt_tokens as usize,
        tokenized.token_ids.len()
    );

    // Tokenize text round trip.
    let t = c
        .tokenize(pb::TokenizeRequest {
            input: Some(pb::tokenize_request::Input::Text("hello world".into())),
            add_special_tokens: Some(false),
            return_token_strings: true,
            ..Default::default()
        })
        .await
        .expect("tokenize")
        .into_inner();
    assert_eq!(t.token_strings.concat(), "hello world");

    // Stop strings end the generation and are not returned.
    let mut full = prompt("The quick brown fox", 12);
    let whole = c
        .generate(full.clone())
        .await
        .expect("generate")
        .into_inner()
        .text;
    // A stop string from the middle of that text: two characters, not all whitespace.
    let chars: Vec<char> = whole.chars().collect();
    let stop: String = (2..chars.len().saturating_sub(1))
        .map(|i| chars[i..i + 2].iter().collect::<String>())
        .find(|s| !s.trim().is_empty() && !whole[..whole.find(s.as_str()).unwrap_or(0)].is_empty())
        .unwrap_or_else(|| panic!("no usable stop string in {whole:?}"));
    full.sampling.as_mut().expect("sampling").stop = vec![stop.clone()];
    let cut = c.generate(full).await.expect("stopped").into_inner();
    let s = cut.summary.expect("summary");
    assert_eq!(
        s.finish_reason,
        pb::FinishReason::Stop as i32,
        "{whole:?} stop {stop:?}"
    );
    assert_eq!(s.stop_sequence.as_deref(), Some(stop.as_str()));
    assert!(
        whole.starts_with(&cut.text) && !cut.text.contains(&stop),
        "{whole:?} → {:?}",
        cut.text
    );
    assert!(
        cut.token_ids.len() < 12,
        "generation ended at the stop string"
    );
}

/// `GET /expert-load` on the metrics port: every token a MoE layer forwarded, counted once
/// per expert it went to, over the last minute; the same totals as the cumulative
/// `expert_tokens_total` counters, and the imbalance gauge beside them.
#[tokio::test]
async fn the_expert_load_report_counts_every_routed_token() {
    let frontend = FrontendProcess::start(&fixture_model(MODEL), &[])
        .await
        .expect("frontend");
    let report = |response: String| -> serde_json::Value {
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response}"))
    };
    let idle = report(frontend.http("/expert-load").await.expect("/expert-load"));
    assert_eq!(idle["windowSeconds"], 60, "{idle}");
    assert_eq!(
        idle["layers"],
        serde_json::json!([]),
        "nothing routed yet: {idle}"
    );

    let mut c = client(&frontend).await;
    let info = c
        .list_models(pb::ListModelsRequest {})
        .await
        .expect("list")
        .into_inner()
        .models[0]
        .clone();
    let out = c
        .generate(prompt("The quick brown fox", 6))
        .await
        .expect("generate")
        .into_inner();
    let usage = out.summary.expect("summary").usage.expect("usage");
    // The prompt, then each generated token but the last, went through every layer.
    let forwarded = u64::from(usage.prompt_tokens + usage.completion_tokens - 1);
    let routed = forwarded * u64::from(info.experts_per_token);

    let r = report(frontend.http("/expert-load").await.expect("/expert-load"));
    let layers = r["layers"].as_array().expect("layers");
    assert!(!layers.is_empty(), "{r}");
    let metrics = frontend.metrics().await.expect("metrics");
    for layer in layers {
        let l = layer["layer"].as_u64().expect("layer");
        let load: Vec<u64> = layer["load"]
            .as_array()
            .expect("load")
            .iter()
            .map(|v| v.as_u64().expect("count"))
            .collect();
        assert_eq!(load.len(), info.num_experts as usize, "{layer}");
        assert_eq!(layer["tokens"].as_u64(), Some(routed), "layer {l}: {layer}");
        assert_eq!(load.iter().sum::<u64>(), routed, "layer {l}: {layer}");
        for (e, n) in load.iter().enumerate() {
            let counter = switchyard_tests::worker::metric_value(
                &metrics,
                &format!("switchyard_expert_tokens_total{{expert=\"{e}\",layer=\"{l}\"}}"),
            )
            .unwrap_or(0.0);
            assert_eq!(counter as u64, *n, "layer {l} expert {e}");
        }
        let max = *load.iter().max().expect("experts");
        let mean = routed as f64 / load.len() as f64;
        let imbalance = layer["imbalance"].as_f64().expect("imbalance");
        assert!((imbalance - max as f64 / mean).abs() < 1e-9, "{layer}");
        let gauge = switchyard_tests::worker::metric_value(
            &metrics,
            &format!("switchyard_expert_load_imbalance{{layer=\"{l}\"}}"),
        );
        assert!(
            gauge.is_some_and(|g| (g - imbalance).abs() < 1e-9),
            "{gauge:?} vs {imbalance}"
        );
        let top = layer["top"].as_array().expect("top");
        assert_eq!(
            top[0]["share"].as_f64(),
            Some(max as f64 / routed as f64),
            "the busiest expert first: {layer}"
        );
    }
}

#[tokio::test]
async fn the_cli_streams_and_prints_json_against_a_real_frontend() {
    let frontend = FrontendProcess::start(&fixture_model(MODEL), &[])
        .await
        .expect("frontend");
    let cli = switchyard_tests::tools::workspace_binary("switchyard").expect("switchyard CLI");
    let run = |args: &[&str]| {
        std::process::Command::new(&cli)
            .args(["--addr", &frontend.endpoint()])
            .args(args)
            .output()
            .expect("run the CLI")
    };
    let out = run(&["generate", "--json", "--max-tokens", "6", "The router"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(
        json["token_ids"].as_array().map(Vec::len),
        Some(6),
        "{json}"
    );
    let streamed = run(&["generate", "--max-tokens", "6", "The router"]);
    assert!(streamed.status.success());
    assert_eq!(
        String::from_utf8_lossy(&streamed.stdout).trim_end(),
        json["text"].as_str().expect("text").trim_end()
    );
    // A server-side refusal: non-zero exit, the status and the field on stderr.
    let bad = run(&["generate", "--model", "nope", "x"]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("not_found") && stderr.contains("model"),
        "{stderr}"
    );
}

/// Every RPC's outcome is counted once, by the admission pipeline's outcome layer: lookups
/// (`ListModels`, `Tokenize`) too, which no handler counts by hand.
#[tokio::test]
async fn list_models_and_tokenize_successes_are_counted() {
    let frontend = FrontendProcess::start(&fixture_model(MODEL), &[])
        .await
        .expect("frontend");
    let ok = "switchyard_requests_total{status=\"ok\"}";
    assert_eq!(frontend.metric(ok).await.unwrap_or(0.0), 0.0);
    let mut c = client(&frontend).await;
    for _ in 0..2 {
        c.list_models(pb::ListModelsRequest {})
            .await
            .expect("list models");
    }
    assert_eq!(frontend.metric(ok).await, Some(2.0), "ListModels successes");
    c.tokenize(pb::TokenizeRequest {
        input: Some(pb::tokenize_request::Input::Text("hello".into())),
        ..Default::default()
    })
    .await
    .expect("tokenize");
    let err = c
        .tokenize(pb::TokenizeRequest::default())
        .await
        .expect_err("no input");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(frontend.metric(ok).await, Some(3.0));
    assert_eq!(
        frontend
            .metric("switchyard_requests_total{status=\"invalid_argument\"}")
            .await,
        Some(1.0)
    );
    // Lookups are not generation: no tenant outcome, nothing accepted.
    let text = frontend.metrics().await.expect("metrics");
    assert!(
        !text.contains("switchyard_admission_requests_total{"),
        "{text}"
    );
}

#[tokio::test]
async fn the_operators_worker_json_configures_the_frontend() {
    use switchyard_operator::build::{Names, worker_config};
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/minimal.yaml");
    let mut md: switchyard_operator::api::ModelDeployment =
        serde_yaml::from_str(&std::fs::read_to_string(example).expect("example")).expect("yaml");
    md.metadata.namespace = Some("default".into());
    let mut config = worker_config(&md, &Names::new(&md).expect("names"));
    config.model.path = fixture_model(MODEL).display().to_string();
    config.serving.max_tokens_per_request = 32;
    config.serving.max_context_length = Some(128);
    // No shard processes here (tests/experts.rs runs those): the frontend holds every
    // expert itself, as it does when the deployment has no shards.
    config.shards.count = 0;
    let dir = std::env::temp_dir().join(format!("switchyard-worker-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("worker.json");
    std::fs::write(&path, serde_json::to_string(&config).expect("json")).expect("write");
    let frontend = FrontendProcess::start_with(&["--config".into(), path.clone().into()])
        .await
        .expect("frontend");
    let mut c = client(&frontend).await;
    let info = c
        .list_models(pb::ListModelsRequest {})
        .await
        .expect("list")
        .into_inner()
        .models;
    assert_eq!(
        info[0].id, config.deployment,
        "the model id is the deployment's name"
    );
    assert_eq!(
        (info[0].max_tokens_per_request, info[0].context_length),
        (32, 128)
    );
    let err = c
        .generate(prompt("hello", 33))
        .await
        .expect_err("over the limit");
    assert!(
        err.message().starts_with("sampling.max_tokens:"),
        "{}",
        err.message()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn every_invalid_argument_names_its_field() {
    let frontend =
        FrontendProcess::start(&fixture_model(MODEL), &["--max-tokens-per-request", "64"])
            .await
            .expect("frontend");
    let mut c = client(&frontend).await;
    let models = c
        .list_models(pb::ListModelsRequest {})
        .await
        .expect("list")
        .into_inner();
    let info = models.models[0].clone();
    let context = info.context_length;
    let sampling = |f: &dyn Fn(&mut pb::SamplingParams)| {
        let mut r = prompt("hello", 4);
        f(r.sampling.as_mut().expect("sampling"));
        r
    };
    let long_ids = vec![5u32; context as usize];
    let cases: Vec<(&str, pb::GenerateRequest, &str)> = vec![
        ("no input", pb::GenerateRequest::default(), "input"),
        ("empty prompt", prompt("", 4), "prompt"),
        (
            "max_tokens 0",
            sampling(&|s| s.max_tokens = Some(0)),
            "sampling.max_tokens",
        ),
        (
            "max_tokens over the limit",
            sampling(&|s| s.max_tokens = Some(65)),
            "sampling.max_tokens",
        ),
        (
            "temperature negative",
            sampling(&|s| s.temperature = Some(-0.5)),
            "sampling.temperature",
        ),
        (
            "temperature NaN",
            sampling(&|s| s.temperature = Some(f32::NAN)),
            "sampling.temperature",
        ),
        (
            "top_p zero",
            sampling(&|s| s.top_p = Some(0.0)),
            "sampling.top_p",
        ),
        (
            "top_p above one",
            sampling(&|s| s.top_p = Some(1.5)),
            "sampling.top_p",
        ),
        (
            "repetition penalty zero",
            sampling(&|s| s.repetition_penalty = Some(0.0)),
            "sampling.repetition_penalty",
        ),
        (
            "empty stop string",
            sampling(&|s| s.stop = vec![String::new()]),
            "sampling.stop[0]",
        ),
        (
            "stop token outside vocab",
            sampling(&|s| s.stop_token_ids = vec![info.vocab_size]),
            "sampling.stop_token_ids[0]",
        ),
        (
            "unknown model",
            pb::GenerateRequest {
                model: "nope".into(),
                ..prompt("hello", 4)
            },
            "model",
        ),
        (
            "token id outside vocab",
            with_input(
                Input::TokenIds(pb::TokenIds {
                    ids: vec![1, info.vocab_size + 3],
                }),
                4,
            ),
            "token_ids.ids[1]",
        ),
        (
            "empty token ids",
            with_input(Input::TokenIds(pb::TokenIds { ids: vec![] }), 4),
            "token_ids.ids",
        ),
        (
            "prompt longer than the context",
            with_input(Input::TokenIds(pb::TokenIds { ids: long_ids }), 4),
            "prompt",
        ),
        (
            "max_tokens beyond the context",
            with_input(
                Input::TokenIds(pb::TokenIds {
                    ids: vec![5; context as usize - 10],
                }),
                40,
            ),
            "sampling.max_tokens",
        ),
        (
            "no chat messages",
            with_input(Input::Chat(pb::ChatMessages { messages: vec![] }), 4),
            "chat.messages",
        ),
        (
            "chat role unset",
            with_input(chat(&[(pb::Role::Unspecified, "hi")]), 4),
            "chat.messages[0].role",
        ),
    ];
    for (what, req, field) in cases {
        let err = c.generate(req.clone()).await.expect_err(what);
        // The proto's contract: an unknown model is NOT_FOUND, the rest INVALID_ARGUMENT.
        let code = if what == "unknown model" {
            tonic::Code::NotFound
        } else {
            tonic::Code::InvalidArgument
        };
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{what}: message should name `{field}`: {:?}",
            err.message()
        );
        // The streaming call checks the same way, before any stream starts.
        let err = c.generate_stream(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what} (stream): {err:?}");
    }
    let counted = frontend
        .metric("switchyard_requests_total{status=\"invalid_argument\"}")
        .await
        .expect("request counter");
    assert!(counted >= 34.0, "invalid requests are counted: {counted}");
    let not_found = frontend
        .metric("switchyard_requests_total{status=\"not_found\"}")
        .await;
    assert_eq!(
        not_found,
        Some(2.0),
        "the unknown model, unary and streaming"
    );
}

/// Waits until the frontend reports no KV blocks in use; fails after 10 s naming `after`.
async fn wait_for_free_kv(frontend: &FrontendProcess, after: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let used = frontend
            .metric("switchyard_kv_cache_blocks{state=\"used\"}")
            .await
            .expect("kv metric");
        if used == 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "KV blocks still held 10 s after {after}: {used}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn cancelling_a_stream_frees_its_kv_blocks() {
    let frontend = FrontendProcess::start(&fixture_model(MODEL), &["--kv-block-size", "16"])
        .await
        .expect("frontend");
    let mut c = client(&frontend).await;
    let used = "switchyard_kv_cache_blocks{state=\"used\"}";
    let mut stream = c
        .generate_stream(prompt("Once upon a time", 200))
        .await
        .expect("stream")
        .into_inner();
    // Blocks are taken as the sequence grows: after 40 tokens (≈5 prompt + 40) it holds 3.
    for _ in 0..40 {
        let message = stream.next().await.expect("a message").expect("ok");
        assert!(matches!(message.event, Some(Event::Chunk(_))));
    }
    let held = frontend.metric(used).await.expect("kv metric");
    assert!(
        held >= 3.0,
        "40 tokens of a 200-token stream hold at least 3 blocks of 16: {held}"
    );
    drop(stream);
    wait_for_free_kv(&frontend, "cancelling").await;
    let cancelled = frontend
        .metric("switchyard_requests_total{status=\"cancelled\"}")
        .await;
    assert_eq!(cancelled, Some(1.0), "the cancelled stream is counted once");

    // A deadline (`grpc-timeout`) that passes mid-generation ends the request and frees its
    // blocks just the same. The client's own timer and the server's fire together, so the
    // caller sees DEADLINE_EXCEEDED or CANCELLED.
    let mut late = tonic::Request::new(prompt("Once upon a time", 480));
    late.set_timeout(Duration::from_millis(100));
    let err = c.generate(late).await.expect_err("deadline");
    assert!(
        matches!(
            err.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
    wait_for_free_kv(&frontend, "the deadline").await;
}

#[tokio::test]
async fn an_exhausted_kv_cache_preempts_and_every_request_completes() {
    // 3 blocks of 16 tokens: each request below grows to 3 (≈5 prompt + 40 output). Blocks
    // are taken as sequences grow, so two start at once; when the cache runs short the
    // newer is preempted and recomputed later, and every request completes.
    let frontend = FrontendProcess::start(
        &fixture_model(MODEL),
        &["--kv-cache-tokens", "48", "--kv-block-size", "16"],
    )
    .await
    .expect("frontend");
    let c = client(&frontend).await;
    let calls: Vec<_> = (0..3)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move { c.generate(prompt(&format!("request {i}"), 40)).await })
        })
        .collect();
    for call in calls {
        let reply = call.await.expect("task").expect("generate").into_inner();
        assert_eq!(reply.token_ids.len(), 40);
    }
    let metrics = frontend.metrics().await.expect("metrics");
    let preemptions = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("switchyard_preemptions_total ")?
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(0.0);
    assert!(preemptions >= 1.0, "the cache ran short: {preemptions}");
    // Too big for the whole cache: refused up front, not queued forever.
    let err = client(&frontend)
        .await
        .generate(prompt("x", 60))
        .await
        .expect_err("too big");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("KV-cache blocks"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_deepseek_v3_checkpoint_streams_like_any_other_family() {
    // MLA with a latent cache, sigmoid router with correction bias and groups.
    let frontend = FrontendProcess::start(&fixture_model("deepseek_v3"), &[])
        .await
        .expect("frontend");
    let mut c = client(&frontend).await;
    let info = c
        .list_models(pb::ListModelsRequest {})
        .await
        .expect("list")
        .into_inner()
        .models;
    assert_eq!(info[0].model_type, "deepseek_v3");
    let (text, ids, summary) = stream_all(&mut c, prompt("Once upon a time", 16))
        .await
        .expect("stream");
    assert_eq!(ids.len(), 16);
    assert_eq!(summary.finish_reason, pb::FinishReason::Length as i32);
    let unary = c
        .generate(prompt("Once upon a time", 16))
        .await
        .expect("unary")
        .into_inner();
    assert_eq!((unary.text, unary.token_ids), (text, ids));
    wait_for_free_kv(&frontend, "the generations").await;
}
