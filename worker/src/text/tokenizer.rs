//! Loading a checkpoint's tokenizer and the text-related settings around it.
//!
//! A Hugging Face checkpoint spreads what we need over several files; this module reads
//! them once, the way Python `transformers` does, and keeps the answers:
//!
//! | file | required | what we take |
//! |---|---|---|
//! | `tokenizer.json` | yes | the tokenizer itself (`tokenizers` format) |
//! | `tokenizer_config.json` | no | `chat_template`, `bos_token`/`eos_token`/`pad_token`/`unk_token`, `add_bos_token`/`add_eos_token`, `model_max_length` |
//! | `special_tokens_map.json` | no | `bos_token`/`eos_token`/`pad_token`/`unk_token` (older checkpoints; wins, as in `transformers`) |
//! | `chat_template.jinja` | no | the chat template (wins over `tokenizer_config.json`'s, as in `transformers`) |
//! | `generation_config.json` | no | `eos_token_id`, `bos_token_id`, `pad_token_id`, sampling defaults |
//! | `config.json` | no | `eos_token_id`, `bos_token_id` as a fallback |
//!
//! **EOS.** Generation stops on any id of [`Tokenizer::eos_token_ids`]: the union of
//! `generation_config.json`'s `eos_token_id` (or, when that file has none, `config.json`'s)
//! and the id of `tokenizer_config.json`'s `eos_token`. Chat models often list several
//! (Llama 3: `<|end_of_text|>`, `<|eot_id|>`, `<|eom_id|>`), and `transformers`' `generate`
//! stops on all of them.
//!
//! **`add_bos_token`/`add_eos_token`.** `tokenizer.json`'s post-processor is authoritative:
//! it is what `transformers` runs for fast tokenizers, and checkpoints saved by
//! `transformers` store the flags' effect in it. We only act on a flag when the
//! post-processor does not already add that token (we find out by encoding the empty
//! string with special tokens at load): then `encode(.., add_special_tokens = true)`
//! prepends BOS / appends EOS itself. A flag that is `false` while the post-processor adds
//! the token is ignored; `LlamaTokenizerFast` would rewrite its post-processor in that
//! case, the generic `PreTrainedTokenizerFast` (Llama 3, DeepSeek, Qwen) would not, and
//! saved checkpoints do not disagree with themselves in practice.

use std::fmt;
use std::path::Path;

use serde_json::Value;

use super::TextError;
use super::chat::{ChatTemplate, TemplateTokens};

/// Sampling defaults a checkpoint ships in `generation_config.json`. Every field is
/// `None` when the file or the key is absent; applying them (e.g. `do_sample = false`
/// meaning greedy) is the caller's business.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub do_sample: Option<bool>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<u32>,
    pub max_length: Option<u32>,
}

/// One checkpoint's tokenizer plus the settings around it. Cheap to share behind an
/// `Arc`; every method takes `&self`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<ChatTemplate>,
    special: TemplateTokens,
    eos_token_ids: Vec<u32>,
    bos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
    /// BOS/EOS that `add_bos_token`/`add_eos_token` ask for and the post-processor does
    /// not add; `encode` adds them itself.
    extra_bos: Option<u32>,
    extra_eos: Option<u32>,
    model_max_length: Option<u64>,
    generation: GenerationDefaults,
}

impl fmt::Debug for Tokenizer {
    // The inner tokenizer's own Debug prints the whole vocabulary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_token_ids", &self.eos_token_ids)
            .field("bos_token_id", &self.bos_token_id)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Reads the tokenizer files of the checkpoint in `dir` (see the module docs for which),
    /// or the tokenizer a `.gguf` file embeds ([`super::gguf`]).
    pub fn load(dir: &Path) -> Result<Tokenizer, TextError> {
        if crate::model::gguf::is_gguf(dir) {
            return Self::from_gguf(dir);
        }
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(TextError::MissingFile {
                file: tokenizer_path,
                what: "a checkpoint needs tokenizer.json (the Hugging Face `tokenizers` \
                       format); slow-tokenizer files alone are not supported",
            });
        }
        // Parse as JSON ourselves first: `tokenizers` reports malformed JSON without the
        // file name, and we want the line and column.
        let bytes = read_file(&tokenizer_path)?;
        parse_json(&tokenizer_path, &bytes)?;
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TextError::Tokenizer {
                file: tokenizer_path.clone(),
                message: e.to_string(),
            })?;

        let tc_path = dir.join("tokenizer_config.json");
        let tokenizer_config = read_optional_json(&tc_path)?;
        let gc_path = dir.join("generation_config.json");
        let generation_config = read_optional_json(&gc_path)?;
        let mc_path = dir.join("config.json");
        let model_config = read_optional_json(&mc_path)?;

        let mut special = TemplateTokens::default();
        let mut add_bos = None;
        let mut add_eos = None;
        let mut model_max_length = None;
        let mut config_template = None;
        if let Some(tc) = &tokenizer_config {
            let file = tc_path.as_path();
            special.bos_token = token_string(file, tc, "bos_token")?;
            special.eos_token = token_string(file, tc, "eos_token")?;
            special.pad_token = token_string(file, tc, "pad_token")?;
            special.unk_token = token_string(file, tc, "unk_token")?;
            add_bos = opt_bool(file, tc, "add_bos_token")?;
            add_eos = opt_bool(file, tc, "add_eos_token")?;
            model_max_length = opt_max_length(file, tc, "model_max_length")?;
            config_template = chat_template_source(file, tc)?;
        }
        // Older checkpoints keep the special tokens in special_tokens_map.json;
        // `transformers` applies it after tokenizer_config.json, so it wins.
        let stm_path = dir.join("special_tokens_map.json");
        if let Some(stm) = read_optional_json(&stm_path)? {
            let file = stm_path.as_path();
            for (key, slot) in [
                ("bos_token", &mut special.bos_token),
                ("eos_token", &mut special.eos_token),
                ("pad_token", &mut special.pad_token),
                ("unk_token", &mut special.unk_token),
            ] {
                if let Some(token) = token_string(file, &stm, key)? {
                    *slot = Some(token);
                }
            }
        }

        // Newer checkpoints keep the template in its own file; `transformers` prefers it.
        let jinja_path = dir.join("chat_template.jinja");
        let template_source = if jinja_path.is_file() {
            let bytes = read_file(&jinja_path)?;
            let text = String::from_utf8(bytes).map_err(|_| TextError::Field {
                file: jinja_path.clone(),
                key: "(file contents)".into(),
                found: "not valid UTF-8".into(),
                expected: "a UTF-8 Jinja template",
            })?;
            Some((text, jinja_path.display().to_string()))
        } else {
            config_template.map(|t| (t, format!("{} (`chat_template`)", tc_path.display())))
        };
        let chat_template = template_source
            .map(|(source, origin)| ChatTemplate::new(&source, origin, special.clone()))
            .transpose()?;

        let mut generation = GenerationDefaults::default();
        let mut eos_token_ids = Vec::new();
        let mut bos_token_id = None;
        let mut pad_token_id = None;
        if let Some(gc) = &generation_config {
            let file = gc_path.as_path();
            eos_token_ids = id_list(file, gc, "eos_token_id")?;
            bos_token_id = id_list(file, gc, "bos_token_id")?.first().copied();
            pad_token_id = id_list(file, gc, "pad_token_id")?.first().copied();
            generation = GenerationDefaults {
                temperature: opt_f32(file, gc, "temperature")?,
                top_p: opt_f32(file, gc, "top_p")?,
                top_k: opt_u32(file, gc, "top_k")?,
                do_sample: opt_bool(file, gc, "do_sample")?,
                repetition_penalty: opt_f32(file, gc, "repetition_penalty")?,
                max_new_tokens: opt_u32(file, gc, "max_new_tokens")?,
                max_length: opt_u32(file, gc, "max_length")?,
            };
        }
        if let Some(mc) = &model_config {
            let file = mc_path.as_path();
            if eos_token_ids.is_empty() {
                eos_token_ids = id_list(file, mc, "eos_token_id")?;
            }
            if bos_token_id.is_none() {
                bos_token_id = id_list(file, mc, "bos_token_id")?.first().copied();
            }
        }
        // A special token string that is not in the vocabulary is kept for the template
        // (it is only text there) but gives no id.
        let lookup = |token: &Option<String>| token.as_deref().and_then(|t| inner.token_to_id(t));
        let config_eos = lookup(&special.eos_token);
        if let Some(id) = config_eos
            && !eos_token_ids.contains(&id)
        {
            eos_token_ids.push(id);
        }
        let config_bos = lookup(&special.bos_token);
        bos_token_id = bos_token_id.or(config_bos);
        pad_token_id = pad_token_id.or_else(|| lookup(&special.pad_token));

        let mut tokenizer = Tokenizer {
            inner,
            chat_template,
            special,
            eos_token_ids,
            bos_token_id,
            pad_token_id,
            extra_bos: None,
            extra_eos: None,
            model_max_length,
            generation,
        };
        tokenizer.resolve_add_flags(add_bos, add_eos, config_bos, config_eos)?;
        Ok(tokenizer)
    }

    /// The tokenizer, chat template and special tokens a GGUF file embeds.
    pub fn from_gguf(file: &Path) -> Result<Tokenizer, TextError> {
        let content = crate::model::gguf::read_content(file).map_err(|e| TextError::Tokenizer {
            file: file.to_path_buf(),
            message: e.to_string(),
        })?;
        let g = super::gguf::tokenizer(file, &content)?;
        let text = |id: Option<u32>| id.and_then(|i| g.inner.id_to_token(i));
        let special = TemplateTokens {
            bos_token: text(g.bos),
            eos_token: text(g.eos.first().copied()),
            unk_token: text(g.unk),
            pad_token: text(g.pad),
        };
        let chat_template = g
            .chat_template
            .as_deref()
            .map(|source| {
                ChatTemplate::new(
                    source,
                    format!("{} (`tokenizer.chat_template`)", file.display()),
                    special.clone(),
                )
            })
            .transpose()?;
        let mut tokenizer = Tokenizer {
            inner: g.inner,
            chat_template,
            special,
            eos_token_ids: g.eos.clone(),
            bos_token_id: g.bos,
            pad_token_id: g.pad,
            extra_bos: None,
            extra_eos: None,
            model_max_length: g.context_length,
            generation: GenerationDefaults::default(),
        };
        tokenizer.resolve_add_flags(g.add_bos, g.add_eos, g.bos, g.eos.first().copied())?;
        Ok(tokenizer)
    }

    /// Wraps an already built `tokenizers` tokenizer with no checkpoint settings (no chat
    /// template, no EOS ids, no defaults). For tools and tests.
    pub fn from_tokenizers(inner: tokenizers::Tokenizer) -> Tokenizer {
        Tokenizer {
            inner,
            chat_template: None,
            special: TemplateTokens::default(),
            eos_token_ids: Vec::new(),
            bos_token_id: None,
            pad_token_id: None,
            extra_bos: None,
            extra_eos: None,
            model_max_length: None,
            generation: GenerationDefaults::default(),
        }
    }

    /// Decides whether `encode` must add BOS/EOS itself (see the module docs).
    fn resolve_add_flags(
        &mut self,
        add_bos: Option<bool>,
        add_eos: Option<bool>,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<(), TextError> {
        if add_bos != Some(true) && add_eos != Some(true) {
            return Ok(());
        }
        let added = self.encode_raw("", true)?;
        if add_bos == Some(true)
            && let Some(bos) = bos
            && added.first() != Some(&bos)
        {
            self.extra_bos = Some(bos);
        }
        if add_eos == Some(true)
            && let Some(eos) = eos
            && added.last() != Some(&eos)
        {
            self.extra_eos = Some(eos);
        }
        Ok(())
    }

    fn encode_raw(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TextError> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TextError::Encode {
                message: e.to_string(),
            })
    }

    /// Token ids for `text`. With `add_special_tokens` the checkpoint's BOS/EOS
    /// convention applies (plain completions); chat prompts use `false` because the
    /// template already wrote them, exactly as `transformers`' `apply_chat_template` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TextError> {
        let mut ids = self.encode_raw(text, add_special_tokens)?;
        if add_special_tokens {
            if let Some(bos) = self.extra_bos {
                ids.insert(0, bos);
            }
            if let Some(eos) = self.extra_eos {
                ids.push(eos);
            }
        }
        Ok(ids)
    }

    /// Renders `messages` with the chat template and encodes the result without adding
    /// special tokens (the template writes them). `None` when the checkpoint has no template.
    pub fn encode_chat(
        &self,
        messages: &[super::ChatMessage],
        add_generation_prompt: bool,
    ) -> Option<Result<Vec<u32>, TextError>> {
        let template = self.chat_template.as_ref()?;
        Some(
            template
                .render(messages, add_generation_prompt)
                .and_then(|text| self.encode(&text, false)),
        )
    }

    /// Text for `ids`. Ids outside the vocabulary are skipped, as `tokenizers` does.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TextError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TextError::Decode {
                message: e.to_string(),
            })
    }

    /// Each id decoded on its own (what a client shows next to a logprob), e.g. `" Hello"`
    /// rather than the vocabulary entry `"ĠHello"`. A token holding part of a UTF-8
    /// character decodes to U+FFFD here; use [`IncrementalDecoder`](super::IncrementalDecoder)
    /// for the text itself.
    pub fn token_strings(&self, ids: &[u32]) -> Result<Vec<String>, TextError> {
        ids.iter().map(|&id| self.decode(&[id], false)).collect()
    }

    /// The raw vocabulary entry for `id` (e.g. `"ĠHello"`), `None` outside the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary entry or added token.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens. The model's embedding table may be larger
    /// (padded); logits past this size decode to nothing.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids that end generation (see the module docs); may be empty.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token_id
    }

    /// The special token strings from `tokenizer_config.json` (also given to the template).
    pub fn special_tokens(&self) -> &TemplateTokens {
        &self.special
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    pub fn generation_defaults(&self) -> &GenerationDefaults {
        &self.generation
    }

    /// `tokenizer_config.json`'s `model_max_length`; `None` when absent or set to the
    /// "no limit" sentinel `transformers` writes (1e30).
    pub fn model_max_length(&self) -> Option<u64> {
        self.model_max_length
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TextError> {
    std::fs::read(path).map_err(|source| TextError::Io {
        file: path.to_path_buf(),
        source,
    })
}

fn parse_json(path: &Path, bytes: &[u8]) -> Result<Value, TextError> {
    serde_json::from_slice(bytes).map_err(|e| TextError::Json {
        file: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })
}

fn read_optional_json(path: &Path) -> Result<Option<Value>, TextError> {
    match std::fs::read(path) {
        Ok(bytes) => parse_json(path, &bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TextError::Io {
            file: path.to_path_buf(),
            source,
        }),
    }
}

/// A short description of a JSON value for error messages.
fn describe(value: &Value) -> String {
    let mut text = value.to_string();
    if text.len() > 80 {
        let mut cut = 77;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    let kind = match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    format!("{kind} ({text})")
}

fn field_error(file: &Path, key: &str, value: &Value, expected: &'static str) -> TextError {
    TextError::Field {
        file: file.to_path_buf(),
        key: key.to_string(),
        found: describe(value),
        expected,
    }
}

/// Present and not `null`.
fn get<'v>(object: &'v Value, key: &str) -> Option<&'v Value> {
    object.get(key).filter(|v| !v.is_null())
}

/// A special token: a string, or an `AddedToken` object `{"content": "...", ...}`.
fn token_string(file: &Path, object: &Value, key: &str) -> Result<Option<String>, TextError> {
    const EXPECTED: &str = "a string, an object with a string \"content\" (AddedToken), or null";
    match get(object, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v @ Value::Object(map)) => match map.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(field_error(file, key, v, EXPECTED)),
        },
        Some(v) => Err(field_error(file, key, v, EXPECTED)),
    }
}

/// A token id or list of token ids (`eos_token_id` is either).
fn id_list(file: &Path, object: &Value, key: &str) -> Result<Vec<u32>, TextError> {
    const EXPECTED: &str = "a token id (integer >= 0), a list of token ids, or null";
    let as_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match get(object, key) {
        None => Ok(Vec::new()),
        Some(v @ Value::Array(items)) => {
            let mut ids = Vec::with_capacity(items.len());
            for item in items {
                let id = as_id(item).ok_or_else(|| field_error(file, key, v, EXPECTED))?;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            Ok(ids)
        }
        Some(v) => as_id(v)
            .map(|id| vec![id])
            .ok_or_else(|| field_error(file, key, v, EXPECTED)),
    }
}

fn opt_bool(file: &Path, object: &Value, key: &str) -> Result<Option<bool>, TextError> {
    match get(object, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(field_error(file, key, v, "true, false or null")),
    }
}

fn opt_f32(file: &Path, object: &Value, key: &str) -> Result<Option<f32>, TextError> {
    match get(object, key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .map(|x| Some(x as f32))
            .ok_or_else(|| field_error(file, key, v, "a number or null")),
    }
}

fn opt_u32(file: &Path, object: &Value, key: &str) -> Result<Option<u32>, TextError> {
    match get(object, key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| field_error(file, key, v, "an integer in [0, 4294967295] or null")),
    }
}

/// `model_max_length`: an integer, or the huge "unlimited" sentinel (`int(1e30)`, which
/// JSON parsers read as a float) that we turn into `None`.
fn opt_max_length(file: &Path, object: &Value, key: &str) -> Result<Option<u64>, TextError> {
    match get(object, key) {
        None => Ok(None),
        Some(v) => {
            if let Some(n) = v.as_u64() {
                return Ok(Some(n));
            }
            match v.as_f64() {
                Some(x) if x >= u64::MAX as f64 => Ok(None),
                Some(x) if x >= 0.0 && x.fract() == 0.0 => Ok(Some(x as u64)),
                _ => Err(field_error(file, key, v, "a non-negative integer or null")),
            }
        }
    }
}

/// `chat_template`: a string, or a list of `{"name", "template"}` of which we take
/// `default` (the others, e.g. `tool_use`, `rag`, serve requests we do not support).
fn chat_template_source(file: &Path, object: &Value) -> Result<Option<String>, TextError> {
    const KEY: &str = "chat_template";
    const EXPECTED: &str = "a template string, or a list of {\"name\": string, \"template\": \
                            string} objects containing one named \"default\"";
    match get(object, KEY) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v @ Value::Array(items)) => {
            let mut names = Vec::new();
            for item in items {
                let name = item.get("name").and_then(Value::as_str);
                let template = item.get("template").and_then(Value::as_str);
                match (name, template) {
                    (Some("default"), Some(template)) => return Ok(Some(template.to_string())),
                    (Some(name), Some(_)) => names.push(name.to_string()),
                    _ => return Err(field_error(file, KEY, v, EXPECTED)),
                }
            }
            Err(TextError::Field {
                file: file.to_path_buf(),
                key: KEY.into(),
                found: format!("a list of templates named {names:?} with none named \"default\""),
                expected: EXPECTED,
            })
        }
        Some(v) => Err(field_error(file, KEY, v, EXPECTED)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::ChatMessage;
    use super::super::testutil::{
        ENDOFTEXT, IM_END, IM_START, TempDir, byte_level_json, sentencepiece_json,
    };
    use super::*;

    fn dir_with(tokenizer: &serde_json::Value, files: &[(&str, &str)]) -> TempDir {
        let dir = TempDir::new();
        dir.write("tokenizer.json", tokenizer.to_string());
        for (name, contents) in files {
            dir.write(name, contents);
        }
        dir
    }

    fn load(dir: &TempDir) -> Tokenizer {
        match Tokenizer::load(dir.path()) {
            Ok(t) => t,
            Err(e) => panic!("load failed: {e}"),
        }
    }

    fn load_err(dir: &TempDir) -> String {
        match Tokenizer::load(dir.path()) {
            Ok(t) => panic!("expected an error, loaded {t:?}"),
            Err(e) => e.to_string(),
        }
    }

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn tokenizer_json_alone() {
        let dir = dir_with(&byte_level_json(), &[]);
        let t = load(&dir);
        assert!(t.chat_template().is_none());
        assert!(t.eos_token_ids().is_empty());
        assert_eq!(t.bos_token_id(), None);
        assert_eq!(t.generation_defaults(), &GenerationDefaults::default());
        assert_eq!(t.vocab_size(), 256 + 5 + 3);
        let ids = t.encode("hello ok", true).expect("encode");
        assert_eq!(t.decode(&ids, false).expect("decode"), "hello ok");
        assert_eq!(t.id_to_token(256 + 3).as_deref(), Some("Ġo"));
        assert_eq!(
            t.token_strings(&t.encode(" ok", false).expect("encode"))
                .expect("strings"),
            [" ok"]
        );
    }

    #[test]
    fn full_checkpoint() {
        let tokenizer_config = format!(
            r#"{{
                "bos_token": null,
                "eos_token": {{"__type": "AddedToken", "content": "<|im_end|>", "lstrip": false}},
                "pad_token": "<|endoftext|>",
                "model_max_length": 131072,
                "chat_template": {}
            }}"#,
            serde_json::Value::from(CHATML)
        );
        let generation_config = r#"{
            "bos_token_id": 261, "eos_token_id": [261, 261], "do_sample": true,
            "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
            "max_new_tokens": 2048, "transformers_version": "4.45.0"
        }"#;
        let config = r#"{"eos_token_id": 299, "bos_token_id": 298}"#;
        let dir = dir_with(
            &byte_level_json(),
            &[
                ("tokenizer_config.json", &tokenizer_config),
                ("generation_config.json", generation_config),
                ("config.json", config),
            ],
        );
        let t = load(&dir);
        // generation_config's ids, then tokenizer_config's eos_token; config.json unused.
        assert_eq!(t.eos_token_ids(), [ENDOFTEXT, IM_END]);
        assert!(t.is_eos(IM_END) && !t.is_eos(299));
        assert_eq!(t.bos_token_id(), Some(ENDOFTEXT));
        assert_eq!(t.pad_token_id(), Some(ENDOFTEXT));
        assert_eq!(t.model_max_length(), Some(131_072));
        assert_eq!(
            t.generation_defaults(),
            &GenerationDefaults {
                temperature: Some(0.7),
                top_p: Some(0.8),
                top_k: Some(20),
                do_sample: Some(true),
                repetition_penalty: Some(1.05),
                max_new_tokens: Some(2048),
                max_length: None,
            }
        );
        assert_eq!(t.special_tokens().eos_token.as_deref(), Some("<|im_end|>"));

        let messages = [ChatMessage::new("user", "hi")];
        let rendered = t
            .chat_template()
            .expect("template")
            .render(&messages, true)
            .expect("render");
        assert_eq!(
            rendered,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        // Special tokens written by the template become single ids; nothing is added.
        let ids = t
            .encode_chat(&messages, true)
            .expect("template")
            .expect("encode");
        assert_eq!(ids.first(), Some(&IM_START));
        assert_eq!(ids.iter().filter(|&&id| id == IM_END).count(), 1);
        assert_eq!(ids, t.encode(&rendered, false).expect("encode"));
        assert_eq!(t.decode(&ids, false).expect("decode"), rendered);
    }

    #[test]
    fn config_json_is_the_eos_fallback() {
        let dir = dir_with(
            &byte_level_json(),
            &[
                (
                    "config.json",
                    r#"{"eos_token_id": [261, 263], "bos_token_id": 262}"#,
                ),
                ("generation_config.json", r#"{"temperature": 0.6}"#),
            ],
        );
        let t = load(&dir);
        assert_eq!(t.eos_token_ids(), [ENDOFTEXT, IM_END]);
        assert_eq!(t.bos_token_id(), Some(IM_START));
        assert_eq!(t.generation_defaults().temperature, Some(0.6));
    }

    #[test]
    fn named_templates_pick_default() {
        let config = serde_json::json!({
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "default {{ messages | length }}"}
            ]
        });
        let dir = dir_with(
            &byte_level_json(),
            &[("tokenizer_config.json", &config.to_string())],
        );
        let t = load(&dir);
        let template = t.chat_template().expect("template");
        assert_eq!(template.render(&[], false).expect("render"), "default 0");
        assert!(
            template
                .origin()
                .ends_with("tokenizer_config.json (`chat_template`)")
        );

        let config = serde_json::json!({
            "chat_template": [{"name": "tool_use", "template": "tools"}]
        });
        let dir = dir_with(
            &byte_level_json(),
            &[("tokenizer_config.json", &config.to_string())],
        );
        let err = load_err(&dir);
        assert!(err.contains("tokenizer_config.json"), "{err}");
        assert!(err.contains("\"tool_use\""), "{err}");
        assert!(err.contains("named \"default\""), "{err}");
    }

    #[test]
    fn chat_template_jinja_wins() {
        let config = serde_json::json!({"chat_template": "from config"});
        let dir = dir_with(
            &byte_level_json(),
            &[
                ("tokenizer_config.json", &config.to_string()),
                ("chat_template.jinja", "from file\n"),
            ],
        );
        let t = load(&dir);
        let template = t.chat_template().expect("template");
        assert_eq!(template.render(&[], false).expect("render"), "from file");
        assert!(template.origin().ends_with("chat_template.jinja"));
    }

    #[test]
    fn template_syntax_error_names_the_file() {
        let dir = dir_with(&byte_level_json(), &[("chat_template.jinja", "{% if %}")]);
        let err = load_err(&dir);
        assert!(err.contains("chat_template.jinja"), "{err}");
        assert!(err.contains("does not compile"), "{err}");
    }

    #[test]
    fn malformed_json_names_file_and_line() {
        let dir = dir_with(
            &byte_level_json(),
            &[(
                "generation_config.json",
                "{\n  \"temperature\": 0.7,\n  oops\n}",
            )],
        );
        let err = load_err(&dir);
        assert!(err.contains("generation_config.json"), "{err}");
        assert!(err.contains("line 3"), "{err}");

        let dir = TempDir::new();
        dir.write("tokenizer.json", "{\"model\": ");
        let err = load_err(&dir);
        assert!(
            err.contains("tokenizer.json: malformed JSON at line 1"),
            "{err}"
        );
    }

    #[test]
    fn wrong_shapes_name_key_and_accepted_values() {
        let dir = dir_with(
            &byte_level_json(),
            &[("generation_config.json", r#"{"eos_token_id": "</s>"}"#)],
        );
        let err = load_err(&dir);
        assert!(err.contains("generation_config.json"), "{err}");
        assert!(err.contains("`eos_token_id`"), "{err}");
        assert!(
            err.contains("a token id (integer >= 0), a list of token ids"),
            "{err}"
        );

        let dir = dir_with(
            &byte_level_json(),
            &[("tokenizer_config.json", r#"{"eos_token": {"id": 3}}"#)],
        );
        let err = load_err(&dir);
        assert!(
            err.contains("`eos_token`") && err.contains("AddedToken"),
            "{err}"
        );

        let dir = dir_with(
            &byte_level_json(),
            &[("tokenizer_config.json", r#"{"add_bos_token": "yes"}"#)],
        );
        let err = load_err(&dir);
        assert!(
            err.contains("`add_bos_token`") && err.contains("true, false or null"),
            "{err}"
        );
    }

    #[test]
    fn missing_and_unusable_tokenizer_json() {
        let dir = TempDir::new();
        let err = load_err(&dir);
        assert!(err.contains("tokenizer.json not found"), "{err}");

        let dir = TempDir::new();
        dir.write("tokenizer.json", r#"{"model": {"type": "Nope"}}"#);
        let err = load_err(&dir);
        assert!(err.contains("not a usable Hugging Face tokenizer"), "{err}");
    }

    #[test]
    fn add_bos_token_defers_to_the_post_processor() {
        // The post-processor already prepends <s>: the flag must not add a second one.
        let dir = dir_with(
            &sentencepiece_json(),
            &[(
                "tokenizer_config.json",
                r#"{"add_bos_token": true, "add_eos_token": false, "bos_token": "<s>", "eos_token": "</s>"}"#,
            )],
        );
        let t = load(&dir);
        let ids = t.encode("Hello world", true).expect("encode");
        let hello = t.token_to_id("▁Hello").expect("vocab");
        let world = t.token_to_id("▁world").expect("vocab");
        assert_eq!(ids, [1, hello, world]);
        assert_eq!(
            t.encode("Hello world", false).expect("encode"),
            [hello, world]
        );
        assert_eq!(t.eos_token_ids(), [2]);
        assert_eq!(t.bos_token_id(), Some(1));

        // A post-processor that adds nothing: the flags are honoured by `encode`.
        let dir = dir_with(
            &byte_level_json(),
            &[(
                "tokenizer_config.json",
                r#"{"add_bos_token": true, "add_eos_token": true, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}"#,
            )],
        );
        let t = load(&dir);
        let plain = t.encode("ok", false).expect("encode");
        let mut expected = vec![IM_START];
        expected.extend(&plain);
        expected.push(IM_END);
        assert_eq!(t.encode("ok", true).expect("encode"), expected);
    }

    #[test]
    fn special_tokens_map_overrides() {
        let dir = dir_with(
            &byte_level_json(),
            &[
                ("tokenizer_config.json", r#"{"eos_token": "<|endoftext|>"}"#),
                (
                    "special_tokens_map.json",
                    r#"{"eos_token": {"content": "<|im_end|>", "special": true}}"#,
                ),
            ],
        );
        let t = load(&dir);
        assert_eq!(t.special_tokens().eos_token.as_deref(), Some("<|im_end|>"));
        assert_eq!(t.eos_token_ids(), [IM_END]);
    }

    #[test]
    fn unlimited_model_max_length() {
        let dir = dir_with(
            &byte_level_json(),
            &[(
                "tokenizer_config.json",
                r#"{"model_max_length": 1000000000000000019884624838656}"#,
            )],
        );
        assert_eq!(load(&dir).model_max_length(), None);
    }
}
