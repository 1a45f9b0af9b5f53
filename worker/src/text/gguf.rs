//! The tokenizer a GGUF file embeds (`tokenizer.ggml.*` metadata), rebuilt as the
//! Hugging Face tokenizer it was converted from.
//!
//! llama.cpp's converter stores the vocabulary, the BPE merges, each token's type and a
//! name for the pre-tokenizer (`tokenizer.ggml.pre`) rather than the pre-tokenizer itself.
//! We map the names whose Hugging Face pre-tokenizer we know exactly (the same split rules
//! llama.cpp applies for that name) and refuse the others by name, because a wrong split
//! gives other token ids and so another model's answers.
//!
//! | `tokenizer.ggml.pre` | pre-tokenizer |
//! |---|---|
//! | `smollm` | each digit alone, then GPT-2's byte-level split |
//! | `gpt-2`, `default` | GPT-2's byte-level split |
//! | `qwen2` | Qwen2's regex (digits one by one), byte-level, NFC normalisation |
//! | `llama-bpe` | Llama 3's regex (digits in threes), byte-level |
//!
//! Only `tokenizer.ggml.model = gpt2` (byte-level BPE) is read; SentencePiece (`llama`)
//! vocabularies are refused by name.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::json;

use super::TextError;

/// What the GGUF says about its tokenizer, beyond the `tokenizers` object.
#[derive(Debug)]
pub struct GgufTokenizer {
    /// The tokenizer.
    pub inner: tokenizers::Tokenizer,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id` and `eot_token_id` (llama.cpp ends generation on
    /// either).
    pub eos: Vec<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
    /// `<arch>.context_length`.
    pub context_length: Option<u64>,
}

const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizers` pre-tokenizer and normalizer for a `tokenizer.ggml.pre` name.
fn pipeline(pre: &str) -> Option<(serde_json::Value, serde_json::Value)> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    Some(match pre {
        "smollm" => (
            json!(null),
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
        ),
        "gpt-2" | "gpt2" | "default" => (json!(null), byte_level(true)),
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
        ),
        "llama-bpe" | "llama3" => (
            json!(null),
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}),
        ),
        _ => return None,
    })
}

/// Builds the tokenizer `content` (read from `file`) embeds.
pub fn tokenizer(file: &Path, content: &Content) -> Result<GgufTokenizer, TextError> {
    let field = |key: &str, found: String, expected: &'static str| TextError::Field {
        file: file.to_path_buf(),
        key: key.to_string(),
        found,
        expected,
    };
    let get = |key: &str| content.metadata.get(key);
    let string = |key: &str| -> Result<Option<String>, TextError> {
        match get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(field(key, format!("{v:?}"), "a string")),
        }
    };
    let id = |key: &str| -> Result<Option<u32>, TextError> {
        match get(key) {
            None => Ok(None),
            Some(Value::U32(v)) => Ok(Some(*v)),
            Some(Value::I32(v)) if *v >= 0 => Ok(Some(*v as u32)),
            Some(Value::U64(v)) => u32::try_from(*v)
                .map(Some)
                .map_err(|_| field(key, v.to_string(), "a token id")),
            Some(v) => Err(field(key, format!("{v:?}"), "a token id")),
        }
    };
    let flag = |key: &str| -> Result<Option<bool>, TextError> {
        match get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(field(key, format!("{v:?}"), "a boolean")),
        }
    };
    let strings = |key: &str| -> Result<Vec<String>, TextError> {
        let Some(Value::Array(items)) = get(key) else {
            return Err(field(key, "missing".into(), "an array of strings"));
        };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(field(
                    key,
                    format!("an element {other:?}"),
                    "an array of strings",
                )),
            })
            .collect()
    };

    let model = string("tokenizer.ggml.model")?.unwrap_or_default();
    if model != "gpt2" {
        return Err(field(
            "tokenizer.ggml.model",
            format!("{model:?}"),
            "\"gpt2\" (byte-level BPE; SentencePiece vocabularies are not read yet)",
        ));
    }
    let pre = string("tokenizer.ggml.pre")?.unwrap_or_else(|| "default".into());
    let Some((normalizer, pre_tokenizer)) = pipeline(&pre) else {
        return Err(field(
            "tokenizer.ggml.pre",
            format!("{pre:?}"),
            "one of smollm, gpt-2, default, qwen2, llama-bpe",
        ));
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<u32> = match get("tokenizer.ggml.token_type") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::I32(t) => *t as u32,
                Value::U32(t) => *t,
                _ => 1,
            })
            .collect(),
        _ => Vec::new(),
    };
    // llama.cpp's token types: 3 = control (special), 4 = user-defined (added, matched as
    // written). Both are matched whole in input text, as the Hugging Face tokenizer's
    // `added_tokens` are.
    let mut added = Vec::new();
    for (i, t) in types.iter().enumerate() {
        if matches!(t, 3 | 4) {
            added.push(json!({
                "id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": *t == 3,
            }));
        }
    }
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    });
    let inner = tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes()).map_err(|e| {
        TextError::Tokenizer {
            file: file.to_path_buf(),
            message: format!("the embedded vocabulary: {e}"),
        }
    })?;
    let mut eos = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(e) = id(key)?
            && !eos.contains(&e)
        {
            eos.push(e);
        }
    }
    let arch = string("general.architecture")?.unwrap_or_default();
    let context_length = match get(&format!("{arch}.context_length")) {
        Some(Value::U32(n)) => Some(u64::from(*n)),
        Some(Value::U64(n)) => Some(*n),
        _ => None,
    };
    Ok(GgufTokenizer {
        inner,
        chat_template: string("tokenizer.chat_template")?,
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos,
        pad: id("tokenizer.ggml.padding_token_id")?,
        unk: id("tokenizer.ggml.unknown_token_id")?,
        add_bos: flag("tokenizer.ggml.add_bos_token")?,
        add_eos: flag("tokenizer.ggml.add_eos_token")?,
        context_length,
    })
}
