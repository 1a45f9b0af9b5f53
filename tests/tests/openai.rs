//! Tier 4: the OpenAI-compatible HTTP API of a real `switchyard-worker --role frontend`
//! process, called by the official `openai` Python package (from PyPI, in a virtualenv
//! `hack/python-tools.sh` installs): models, chat completion, streaming with usage,
//! completions, a client that goes away mid-stream, 401, 400, 404 and 429 — and the same
//! greedy request answered alike over gRPC. And the prefix cache as the APIs report it:
//! a tenant's repeated prompt served from it, another tenant's never.

use std::path::{Path, PathBuf};
use std::time::Duration;

use switchyard_proto::inference::v1::{self as pb, inference_client::InferenceClient};
use switchyard_tests::FrontendProcess;
use switchyard_tests::process::TempDir;
use switchyard_tests::worker::fixture_model;

const KEY: &str = "acme-key-0123456789";
/// A tenant of tier `trickle`: 2 requests a minute.
const LIMITED_KEY: &str = "slow-key-0123456789";
const MODEL_ID: &str = "tiny";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The virtualenv's python with `openai` installed (cached by version after the first run).
fn python() -> PathBuf {
    let out = std::process::Command::new(repo().join("hack/python-tools.sh"))
        .output()
        .expect("run hack/python-tools.sh");
    assert!(
        out.status.success(),
        "hack/python-tools.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Tiers `free` (generous) and `trickle` (2 requests a minute).
fn admission_config(dir: &Path) -> PathBuf {
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).expect("keys dir");
    std::fs::write(
        keys.join("tenants"),
        format!("acme:{KEY}:free\nslow:{LIMITED_KEY}:trickle\n"),
    )
    .expect("keys");
    let config = serde_json::json!({
        "apiKeysDir": keys,
        "defaultTier": "free",
        "tiers": [
            {"name": "free", "priority": "normal", "weight": 1,
             "requestsPerMinute": 600, "tokensPerMinute": 1_000_000},
            {"name": "trickle", "priority": "normal", "weight": 1,
             "requestsPerMinute": 2, "tokensPerMinute": 1_000_000},
        ],
        "maxQueued": 64,
        "defaultDeadlineSeconds": 30,
    });
    let path = dir.join("admission.json");
    std::fs::write(&path, config.to_string()).expect("admission config");
    path
}

/// A frontend of the tiny MoE fixture with the tiers of [`admission_config`], and the
/// directory holding its configuration (removed when dropped).
async fn frontend(name: &str) -> (FrontendProcess, TempDir) {
    let dir = TempDir::new(name).expect("temp dir");
    let config = admission_config(dir.path());
    let frontend = FrontendProcess::start(
        &fixture_model("qwen3_moe"),
        &[
            "--model-id",
            MODEL_ID,
            "--admission-config",
            config.to_str().expect("utf-8"),
        ],
    )
    .await
    .expect("frontend");
    (frontend, dir)
}

/// The gRPC API's answer to the greedy request the script sends.
async fn grpc_text(frontend: &FrontendProcess, input: pb::generate_request::Input) -> String {
    let mut client = InferenceClient::connect(frontend.endpoint())
        .await
        .expect("connect");
    let mut request = tonic::Request::new(pb::GenerateRequest {
        model: MODEL_ID.into(),
        input: Some(input),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(12),
            temperature: Some(0.0),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {KEY}").parse().expect("ascii"),
    );
    client
        .generate(request)
        .await
        .expect("the gRPC request")
        .into_inner()
        .text
}

fn series(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn the_official_openai_client_talks_to_the_frontend() {
    let python = python();
    let (frontend, _dir) = frontend("openai").await;

    let script = repo().join("tests/python/openai_client.py");
    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .args([&frontend.endpoint(), KEY, LIMITED_KEY, MODEL_ID])
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("the script finishes within 5 minutes")
        .expect("run the script");
    assert!(
        out.status.success(),
        "openai_client.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the script's output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    eprintln!("switchyard-tests: openai client: {r:#}");

    assert_eq!(r["models"], serde_json::json!([MODEL_ID]));

    // The same greedy request over gRPC: the same text.
    let chat = pb::generate_request::Input::Chat(pb::ChatMessages {
        messages: vec![
            pb::ChatMessage {
                role: pb::Role::System as i32,
                content: "You are terse.".into(),
            },
            pb::ChatMessage {
                role: pb::Role::User as i32,
                content: "Name three colours.".into(),
            },
        ],
    });
    let grpc_chat = grpc_text(&frontend, chat).await;
    assert_eq!(r["chat"]["content"], grpc_chat.as_str());
    assert_eq!(r["chat"]["role"], "assistant");
    assert_eq!(r["chat"]["object"], "chat.completion");
    assert_eq!(r["chat"]["finish"], "length");
    let usage = &r["chat"]["usage"];
    assert_eq!(usage["completion_tokens"], 12);
    assert!(
        usage["prompt_tokens"].as_u64().is_some_and(|n| n > 0),
        "{usage}"
    );
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap_or(0) + 12)
    );
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);

    // Streamed: the same text, a finish reason, and the usage chunk; the same prompt a
    // second time, so its full blocks before the last token come from the prefix cache
    // (16 tokens a block).
    assert_eq!(r["stream"]["content"], grpc_chat.as_str());
    assert_eq!(r["stream"]["finish"], "length");
    let streamed = &r["stream"]["usage"];
    let prompt = usage["prompt_tokens"].as_u64().unwrap_or(0);
    assert_eq!(streamed["prompt_tokens"], prompt);
    assert_eq!(streamed["completion_tokens"], 12);
    assert_eq!(
        streamed["prompt_tokens_details"]["cached_tokens"],
        (prompt - 1) / 16 * 16,
        "{streamed}"
    );

    let completion = grpc_text(
        &frontend,
        pb::generate_request::Input::Prompt("The capital of France is".into()),
    )
    .await;
    assert_eq!(r["completion"]["text"], completion.as_str());

    // Errors: OpenAI's body and status codes.
    let e = &r["unauthenticated"];
    assert_eq!(e["status"], 401, "{e}");
    assert_eq!(e["body"]["code"], "invalid_api_key", "{e}");
    let e = &r["unsupported"];
    assert_eq!(e["status"], 400, "{e}");
    assert_eq!(e["body"]["param"], "n", "{e}");
    let e = &r["unknown_model"];
    assert_eq!(e["status"], 404, "{e}");
    assert_eq!(e["body"]["code"], "model_not_found", "{e}");
    assert_eq!(
        r["limited_ok"], 2,
        "the trickle tier's bucket holds 2 requests"
    );
    let e = &r["limited"];
    assert_eq!(e["status"], 429, "{e}");
    assert!(
        e["headers"]["retry-after"]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|s| s >= 1),
        "{e}"
    );
    assert!(
        e["headers"]["x-ratelimit-remaining-requests"].is_string(),
        "{e}"
    );
    assert!(
        e["body"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("request quota")),
        "{e}"
    );

    // One set of metrics: the HTTP calls are counted with the gRPC ones, the abandoned
    // stream as cancelled, the refusal as rejected.
    let metrics = frontend.metrics().await.expect("metrics");
    assert!(
        series(&metrics, "switchyard_requests_total{status=\"cancelled\"}") >= 1.0,
        "the stream the client left is cancelled"
    );
    assert_eq!(
        series(
            &metrics,
            "switchyard_admission_requests_total{outcome=\"rejected\",tenant=\"slow\",tier=\"trickle\"}"
        ),
        1.0
    );
    assert!(
        series(
            &metrics,
            "switchyard_admission_requests_total{outcome=\"completed\",tenant=\"acme\",tier=\"free\"}"
        ) >= 5.0
    );
}

/// `body` as the tenant of `key` sends it.
fn keyed(body: pb::GenerateRequest, key: &str) -> tonic::Request<pb::GenerateRequest> {
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("ascii"),
    );
    request
}

#[tokio::test]
async fn a_tenant_reuses_its_own_prompt_prefix_and_never_another_tenants() {
    let (frontend, _dir) = frontend("prefix-cache").await;
    let mut client = InferenceClient::connect(frontend.endpoint())
        .await
        .expect("connect");
    // 50 prompt tokens: 3 full blocks of 16 before the last token.
    let prompt: Vec<u32> = (0..50).map(|i| (i * 7 + 3) % 200).collect();
    let request = || pb::GenerateRequest {
        input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds {
            ids: prompt.clone(),
        })),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(4),
            temperature: Some(0.0),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut generate = async |key: &str| {
        let reply = client
            .generate(keyed(request(), key))
            .await
            .expect("generate")
            .into_inner();
        let usage = reply.summary.and_then(|s| s.usage).expect("usage");
        (reply.token_ids, usage.cached_prompt_tokens)
    };
    let (first, cached_first) = generate(KEY).await;
    let (again, cached_again) = generate(KEY).await;
    let (other, cached_other) = generate(LIMITED_KEY).await;
    assert_eq!(cached_first, 0, "nothing cached yet");
    assert_eq!(cached_again, 48, "the same tenant's 3 full blocks");
    assert_eq!(
        cached_other, 0,
        "another tenant's same prompt computes its own blocks"
    );
    assert_eq!(first, again, "the same tokens from cached blocks");
    assert_eq!(first, other);

    // The cache's own counters: 3 lookups of 48 tokens, one hit; each tenant holds its
    // own 3 blocks (of the 53 tokens whose keys and values were computed, 3 full blocks).
    let metrics = frontend.metrics().await.expect("metrics");
    assert_eq!(
        series(&metrics, "switchyard_prefix_cache_queried_tokens_total"),
        144.0
    );
    assert_eq!(
        series(&metrics, "switchyard_prefix_cache_hit_tokens_total"),
        48.0
    );
    assert_eq!(
        series(&metrics, "switchyard_kv_cache_blocks{state=\"cached\"}"),
        6.0,
        "3 blocks for each of the two tenants"
    );
    // Usage per tenant: cached and computed prompt tokens apart.
    let tokens = |tenant: &str, kind: &str| {
        series(
            &metrics,
            &format!("switchyard_tenant_tokens_total{{kind=\"{kind}\",tenant=\"{tenant}\"}}"),
        )
    };
    assert_eq!(tokens("acme", "cached_prompt"), 48.0);
    assert_eq!(tokens("acme", "prompt"), 100.0 - 48.0);
    assert_eq!(tokens("slow", "cached_prompt"), 0.0);
    assert_eq!(tokens("slow", "prompt"), 50.0);
}
