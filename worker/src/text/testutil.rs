//! Small tokenizers built in code for the unit tests (no network, no fixture files), and a
//! scratch directory that cleans up after itself.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

use super::Tokenizer;

/// GPT-2's byte-to-character table: printable Latin-1 bytes map to themselves, the rest to
/// U+0100 onwards, so every byte has a visible character in the vocabulary.
pub fn byte_to_char(byte: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(byte) {
        return char::from(byte);
    }
    let offset = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(256 + offset).expect("valid char")
}

fn byte_level_str(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| byte_to_char(b)).collect()
}

/// Ids of the byte-level tokenizer's special tokens (`tokenizers` numbers added tokens
/// after the model vocabulary, whatever ids the JSON says).
pub const ENDOFTEXT: u32 = 261;
pub const IM_START: u32 = 262;
pub const IM_END: u32 = 263;

fn added_token(id: u32, content: &str, special: bool) -> Value {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": !special, "special": special
    })
}

/// The `tokenizer.json` of a byte-level BPE tokenizer (GPT-2/Llama 3/Qwen family): one
/// token per byte (ids 0..=255 in byte order), a few merges (ids 256..=260), some of which
/// cut through or across multi-byte characters, and the special tokens [`ENDOFTEXT`],
/// [`IM_START`], [`IM_END`].
pub fn byte_level_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_to_char(b).to_string(), json!(b as u32));
    }
    // Merges as byte sequences: "h" + first byte of "é" (splits é); the last byte of
    // "日" + the first of "本" (crosses a character boundary); "ll"; "Ġo" "k".
    let merges: [(&[u8], &[u8]); 5] = [
        (b"h", &[0xC3]),
        (&[0xA5], &[0xE6]),
        (b"l", b"l"),
        (b" ", b"o"),
        (b" o", b"k"),
    ];
    let mut merge_list = Vec::new();
    for (id, (a, b)) in (256u32..).zip(merges) {
        let (a, b) = (byte_level_str(a), byte_level_str(b));
        vocab.insert(format!("{a}{b}"), json!(id));
        merge_list.push(json!([a, b]));
    }
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            added_token(ENDOFTEXT, "<|endoftext|>", true),
            added_token(IM_START, "<|im_start|>", true),
            added_token(IM_END, "<|im_end|>", true),
        ],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merge_list
        }
    })
}

/// The `tokenizer.json` of a SentencePiece-style BPE tokenizer (Llama 2/Mistral family):
/// `▁` for spaces, byte fallback `<0xNN>` tokens (ids 3..=258), a decoder that strips the
/// leading space of the text, and a post-processor that prepends `<s>`.
pub fn sentencepiece_json() -> Value {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<unk>".into(), json!(0));
    vocab.insert("<s>".into(), json!(1));
    vocab.insert("</s>".into(), json!(2));
    for b in 0..=255u32 {
        vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
    }
    let mut next_id = 259u32;
    let mut add = |vocab: &mut serde_json::Map<String, Value>, token: &str| {
        if !vocab.contains_key(token) {
            vocab.insert(token.to_string(), json!(next_id));
            next_id += 1;
        }
    };
    let mut merges = Vec::new();
    for c in ["▁", "H", "e", "l", "o", "w", "r", "d", "!"] {
        add(&mut vocab, c);
    }
    for word in ["▁Hello", "▁world"] {
        let chars: Vec<char> = word.chars().collect();
        let mut left = chars[0].to_string();
        for c in &chars[1..] {
            merges.push(json!([left.clone(), c.to_string()]));
            left.push(*c);
            add(&mut vocab, &left);
        }
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            added_token(0, "<unk>", true),
            added_token(1, "<s>", true),
            added_token(2, "</s>", true),
        ],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
        ]},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}
            ],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    })
}

fn build(json: &Value) -> Tokenizer {
    let inner = tokenizers::Tokenizer::from_str(&json.to_string()).expect("test tokenizer builds");
    Tokenizer::from_tokenizers(inner)
}

pub fn byte_level_tokenizer() -> Tokenizer {
    build(&byte_level_json())
}

pub fn sentencepiece_tokenizer() -> Tokenizer {
    build(&sentencepiece_json())
}

/// A fresh directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("switchyard-text-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) {
        std::fs::write(self.0.join(name), contents).expect("write test file");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
