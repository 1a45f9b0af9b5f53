//! Everything between strings and token ids for one checkpoint directory.
//!
//! The model only ever sees token ids; clients only ever see text. This module owns the
//! translation both ways and nothing else (no model weights, no scheduling):
//!
//! - [`tokenizer`]: [`Tokenizer::load`] reads a checkpoint directory the way Python
//!   `transformers` does (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`,
//!   `special_tokens_map.json`, `generation_config.json`, `config.json`) and answers
//!   encode/decode, the EOS/BOS ids and the checkpoint's sampling defaults.
//! - [`chat`]: [`ChatTemplate`] renders a conversation with the checkpoint's Jinja chat
//!   template, byte for byte as `transformers`' `apply_chat_template` does.
//! - [`detokenize`]: [`IncrementalDecoder`] turns generated ids into text deltas for
//!   streaming, never splitting a UTF-8 character.
//! - [`stop`]: [`StopMatcher`] cuts the streamed text at the first user stop string,
//!   holding back only what could still become one.
//!
//! Errors from all of them are one [`TextError`], whose messages name the file, the key
//! and what would have been accepted, because most of them reach an operator who is
//! looking at a checkpoint directory.

pub mod chat;
pub mod detokenize;
pub mod gguf;
pub mod stop;
pub mod tokenizer;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
pub(crate) mod testutil;

use std::path::PathBuf;

pub use chat::{ChatMessage, ChatTemplate, TemplateTokens};
pub use detokenize::IncrementalDecoder;
pub use stop::{StopMatcher, StopOutcome};
pub use tokenizer::{GenerationDefaults, Tokenizer};

/// Why loading a checkpoint's text files, encoding, decoding or rendering failed.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file that must exist is absent.
    #[error("{file} not found: {what}")]
    MissingFile { file: PathBuf, what: &'static str },

    /// A file exists but could not be read.
    #[error("reading {file}: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file does not parse; `line`/`column` point into the file.
    #[error("{file}: malformed JSON at line {line}, column {column}: {message}")]
    Json {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },

    /// A JSON key holds a value of the wrong shape.
    #[error("{file}: `{key}` is {found}; expected {expected}")]
    Field {
        file: PathBuf,
        key: String,
        found: String,
        expected: &'static str,
    },

    /// `tokenizer.json` parsed as JSON but the `tokenizers` library rejected it.
    #[error("{file}: not a usable Hugging Face tokenizer: {message}")]
    Tokenizer { file: PathBuf, message: String },

    /// The chat template does not compile. `origin` names the file it came from.
    #[error("chat template from {origin} does not compile: {message}")]
    TemplateSyntax { origin: String, message: String },

    /// Rendering failed for a reason other than the template's own `raise_exception`.
    #[error("rendering the chat template from {origin}: {message}")]
    TemplateRender { origin: String, message: String },

    /// The template called `raise_exception(message)`: the conversation is not one the
    /// model's template accepts (e.g. "Conversation roles must alternate").
    #[error("{message}")]
    TemplateRaised { origin: String, message: String },

    /// `tokenizers` failed to encode the text.
    #[error("encoding text: {message}")]
    Encode { message: String },

    /// `tokenizers` failed to decode the ids.
    #[error("decoding token ids: {message}")]
    Decode { message: String },
}
