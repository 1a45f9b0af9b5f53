//! Comparison against Python `transformers` on the committed checkpoints under
//! `worker/tests/fixtures/models/` (written by `hack/fixtures/generate.py`): token ids,
//! decoded text, special tokens, rendered chat templates and chat token ids must match the
//! references byte for byte. Every fixture listed here must exist; a missing file fails.

use std::path::PathBuf;

use serde_json::Value;

use super::{ChatMessage, IncrementalDecoder, Tokenizer};

/// Every fixture `generate.py` writes.
const FIXTURES: [&str; 9] = [
    "llama",
    "qwen2",
    "qwen3",
    "mixtral",
    "qwen2_moe",
    "qwen2_moe_norm",
    "qwen3_moe",
    "olmoe",
    "olmoe_bf16",
];

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

fn read_json(name: &str, file: &str) -> Value {
    let path = fixture_dir(name).join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make fixtures`)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("a list of ids")
        .iter()
        .map(|v| v.as_u64().expect("an id") as u32)
        .collect()
}

fn string(value: &Value) -> &str {
    value.as_str().expect("a string")
}

fn load(name: &str) -> Tokenizer {
    Tokenizer::load(&fixture_dir(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn tokenization_matches_transformers() {
    for name in FIXTURES {
        let tokenizer = load(name);
        let reference = read_json(name, "tokenize_reference.json");
        assert_eq!(
            tokenizer.vocab_size() as u64,
            reference["vocab_size_with_added_tokens"]
                .as_u64()
                .expect("vocab size"),
            "{name}: vocab size"
        );
        for (token, id) in reference["special_tokens"].as_object().expect("map") {
            assert_eq!(
                tokenizer.token_to_id(token),
                Some(id.as_u64().expect("id") as u32),
                "{name}: {token}"
            );
        }
        let special = tokenizer.special_tokens();
        for (key, ours) in [
            ("bos_token", &special.bos_token),
            ("eos_token", &special.eos_token),
            ("pad_token", &special.pad_token),
        ] {
            assert_eq!(ours.as_deref(), reference[key].as_str(), "{name}: {key}");
        }
        let eos = reference["eos_token"].as_str().expect("eos token");
        let eos_id = tokenizer.token_to_id(eos).expect("eos id");
        assert!(
            tokenizer.is_eos(eos_id),
            "{name}: {eos} must end generation"
        );

        for case in reference["cases"].as_array().expect("cases") {
            let text = string(&case["text"]);
            let with = ids(&case["ids_with_special_tokens"]);
            let without = ids(&case["ids_without_special_tokens"]);
            assert_eq!(
                tokenizer.encode(text, true).expect("encode"),
                with,
                "{name}: encode({text:?}, true)"
            );
            assert_eq!(
                tokenizer.encode(text, false).expect("encode"),
                without,
                "{name}: encode({text:?}, false)"
            );
            let tokens: Vec<String> = with
                .iter()
                .map(|&id| tokenizer.id_to_token(id).expect("token"))
                .collect();
            let expected_tokens: Vec<&str> = case["tokens_with_special_tokens"]
                .as_array()
                .expect("tokens")
                .iter()
                .map(string)
                .collect();
            assert_eq!(tokens, expected_tokens, "{name}: tokens of {text:?}");
            assert_eq!(
                tokenizer.decode(&with, false).expect("decode"),
                string(&case["decoded"]),
                "{name}: decode of {text:?}"
            );
            let skipped = string(&case["decoded_skip_special_tokens"]);
            assert_eq!(
                tokenizer.decode(&with, true).expect("decode"),
                skipped,
                "{name}: decode(skip_special_tokens) of {text:?}"
            );
            // Streaming gives the same text, one token at a time.
            let mut decoder = IncrementalDecoder::new();
            let mut streamed = String::new();
            for &id in &with {
                let delta = decoder.step(&tokenizer, id).expect("step");
                assert!(!delta.contains('\u{FFFD}'), "{name}: {delta:?} in {text:?}");
                streamed.push_str(&delta);
            }
            streamed.push_str(&decoder.finish(&tokenizer).expect("finish"));
            assert_eq!(streamed, skipped, "{name}: streamed decode of {text:?}");
        }
    }
}

#[test]
fn chat_templates_match_transformers() {
    for name in FIXTURES {
        let tokenizer = load(name);
        let template = tokenizer
            .chat_template()
            .unwrap_or_else(|| panic!("{name}: no chat template loaded"));
        let reference = read_json(name, "chat_reference.json");
        let cases = reference.as_array().expect("a list of cases");
        assert!(!cases.is_empty(), "{name}: no chat cases");
        for case in cases {
            let messages: Vec<ChatMessage> =
                serde_json::from_value(case["messages"].clone()).expect("messages");
            let add_generation_prompt = case["add_generation_prompt"].as_bool().expect("bool");
            let rendered = template
                .render(&messages, add_generation_prompt)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(rendered, string(&case["rendered"]), "{name}: {messages:?}");
            let chat_ids = tokenizer
                .encode_chat(&messages, add_generation_prompt)
                .expect("template")
                .expect("encode");
            assert_eq!(chat_ids, ids(&case["ids"]), "{name}: ids of {messages:?}");
        }
    }
}
