//! Streaming detokenization: generated token ids in, text deltas out.
//!
//! Decoding each token on its own is wrong twice over:
//!
//! - byte-level BPE (GPT-2, Llama 3, Qwen, DeepSeek) and SentencePiece byte fallback can
//!   split one UTF-8 character over several tokens, so a lone token decodes to U+FFFD;
//! - some decoders depend on the neighbours: SentencePiece's (Llama 2, Mistral) drops the
//!   leading space of the *first* token, so `"▁world"` alone is `"world"` but after
//!   `"▁Hello"` it is `" world"`.
//!
//! [`IncrementalDecoder`] uses the prefix-offset/read-offset technique of Hugging Face's
//! text-generation-inference and vLLM: decode a short window of recent ids twice, with and
//! without the newest ones, and emit the difference. The window starts one step back
//! (`prefix_offset`), so context-dependent decoders see a left neighbour; text is only
//! emitted up to the last complete character, and a trailing U+FFFD (an incomplete
//! character) is held back until the next tokens complete it or [`finish`] flushes it.
//! Special tokens are skipped, as `decode(.., skip_special_tokens = true)` does.
//!
//! Invariant (tested): the concatenation of all deltas plus `finish()` equals
//! `tokenizer.decode(all_ids, true)` for the tokenizers we ship with.
//!
//! [`finish`]: IncrementalDecoder::finish

use super::{TextError, Tokenizer};

/// A held-back incomplete character cannot need more than this many further tokens (a
/// UTF-8 character is at most 4 bytes and every byte token carries at least one); past
/// this the U+FFFD is a real invalid byte sequence in the output, and holding it would
/// only make the decode window, and each step's cost, grow without bound.
const MAX_HELD_TOKENS: usize = 8;

const REPLACEMENT: char = '\u{FFFD}';

/// Per-sequence streaming decoder state. It holds no tokenizer: pass the same one to
/// every call.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    /// Ids from the start of the current decode window onwards.
    ids: Vec<u32>,
    /// Index into `ids` where the not-yet-final tokens start; `ids[..read]` is the
    /// window's left context, already emitted.
    read: usize,
    /// `decode(ids[..read])`, the text the window's left context decodes to.
    prefix_text: String,
    /// Bytes of text beyond `prefix_text` already emitted while a character was incomplete.
    emitted: usize,
}

impl IncrementalDecoder {
    /// A decoder for a sequence whose output starts from nothing: the first token decodes
    /// as it would at the start of a text (`decode(output_ids)` semantics).
    pub fn new() -> IncrementalDecoder {
        IncrementalDecoder::default()
    }

    /// A decoder whose output continues `context` (e.g. the prompt's last ids), so the
    /// first generated token decodes as it does mid-text (a SentencePiece `"▁Hi"` after a
    /// prompt gives `" Hi"`). Only the last few ids matter.
    pub fn with_context(
        tokenizer: &Tokenizer,
        context: &[u32],
    ) -> Result<IncrementalDecoder, TextError> {
        // Enough left context for any decoder we know of (they look at most one token
        // back); a handful more guards against multi-token byte sequences.
        const CONTEXT: usize = 6;
        let ids = context[context.len().saturating_sub(CONTEXT)..].to_vec();
        let prefix_text = tokenizer.decode(&ids, true)?;
        Ok(IncrementalDecoder {
            read: ids.len(),
            ids,
            prefix_text,
            emitted: 0,
        })
    }

    /// Adds one generated id and returns the text it completes (often empty: a special
    /// token, or part of a character).
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TextError> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids, true)?;
        let new = new_text(&text, &self.prefix_text);
        let held = self.ids.len() - self.read;
        let incomplete = new.ends_with(REPLACEMENT) && held <= MAX_HELD_TOKENS;
        let stable_end = if incomplete {
            new.trim_end_matches(REPLACEMENT).len()
        } else {
            new.len()
        };
        let delta = new
            .get(self.emitted.min(stable_end)..stable_end)
            .unwrap_or_default()
            .to_string();
        if incomplete {
            self.emitted = self.emitted.max(stable_end);
        } else {
            // Everything up to here is final: slide the window so its left context is
            // the tokens just emitted.
            self.ids.drain(..self.read);
            self.read = self.ids.len();
            self.prefix_text = tokenizer.decode(&self.ids, true)?;
            self.emitted = 0;
        }
        Ok(delta)
    }

    /// Flushes whatever is held back (an incomplete character at the end of generation
    /// comes out as U+FFFD, as `decode` would print it) and resets the decoder.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, TextError> {
        let rest = if self.ids.len() > self.read {
            let text = tokenizer.decode(&self.ids, true)?;
            let new = new_text(&text, &self.prefix_text);
            new.get(self.emitted.min(new.len())..)
                .unwrap_or_default()
                .to_string()
        } else {
            String::new()
        };
        *self = IncrementalDecoder::default();
        Ok(rest)
    }
}

/// The part of `text` after `prefix`. Decoding a longer window should only ever extend
/// the shorter one's text; should a decoder break that, we fall back to the part after
/// the common prefix (on a character boundary) rather than fail the request.
fn new_text<'t>(text: &'t str, prefix: &str) -> &'t str {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest;
    }
    let common = text
        .char_indices()
        .zip(prefix.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| text.len().min(prefix.len()));
    let mut cut = common;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[cut..]
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{byte_level_tokenizer, sentencepiece_tokenizer};
    use super::*;

    fn stream(tokenizer: &Tokenizer, ids: &[u32]) -> Vec<String> {
        let mut decoder = IncrementalDecoder::new();
        let mut deltas: Vec<String> = ids
            .iter()
            .map(|&id| decoder.step(tokenizer, id).expect("step"))
            .collect();
        deltas.push(decoder.finish(tokenizer).expect("finish"));
        deltas
    }

    #[test]
    fn multibyte_characters_token_by_token() {
        let tokenizer = byte_level_tokenizer();
        let text = "héllo 日本 🙂 ok";
        let ids = tokenizer.encode(text, false).expect("encode");
        // The test is only meaningful if some token splits a character.
        assert!(
            tokenizer
                .token_strings(&ids)
                .expect("token strings")
                .iter()
                .any(|s| s.contains(REPLACEMENT)),
            "the test tokenizer should split multi-byte characters"
        );
        assert!(ids.len() > text.chars().count());
        let deltas = stream(&tokenizer, &ids);
        for delta in &deltas {
            assert!(
                !delta.contains(REPLACEMENT),
                "delta {delta:?} in {deltas:?}"
            );
        }
        assert_eq!(
            deltas.concat(),
            tokenizer.decode(&ids, true).expect("decode")
        );
        assert_eq!(deltas.concat(), text);
    }

    #[test]
    fn emoji_arrives_whole() {
        let tokenizer = byte_level_tokenizer();
        let ids = tokenizer.encode("🙂", false).expect("encode");
        assert_eq!(ids.len(), 4, "one token per byte");
        let deltas = stream(&tokenizer, &ids);
        assert_eq!(deltas, ["", "", "", "🙂", ""]);
    }

    #[test]
    fn incomplete_tail_flushed_at_finish() {
        let tokenizer = byte_level_tokenizer();
        let ids = tokenizer.encode("a🙂", false).expect("encode");
        let mut decoder = IncrementalDecoder::new();
        let mut out = String::new();
        // Stop two bytes into the emoji.
        for &id in &ids[..3] {
            out.push_str(&decoder.step(&tokenizer, id).expect("step"));
        }
        assert_eq!(out, "a");
        assert_eq!(decoder.finish(&tokenizer).expect("finish"), "\u{FFFD}");
    }

    #[test]
    fn genuinely_invalid_bytes_are_not_held_forever() {
        let tokenizer = byte_level_tokenizer();
        // A lone continuation byte repeated: never becomes a character.
        let continuation = tokenizer.encode("é", false).expect("encode")[1];
        let mut decoder = IncrementalDecoder::new();
        let mut out = String::new();
        for _ in 0..(MAX_HELD_TOKENS + 3) {
            out.push_str(&decoder.step(&tokenizer, continuation).expect("step"));
        }
        out.push_str(&decoder.finish(&tokenizer).expect("finish"));
        let full = tokenizer
            .decode(&[continuation; MAX_HELD_TOKENS + 3], true)
            .expect("decode");
        assert_eq!(out, full);
    }

    #[test]
    fn context_dependent_decoder() {
        let tokenizer = sentencepiece_tokenizer();
        let hello = tokenizer.token_to_id("▁Hello").expect("vocab");
        let world = tokenizer.token_to_id("▁world").expect("vocab");
        let bang = tokenizer.token_to_id("!").expect("vocab");
        // Alone, each word token loses its leading space.
        assert_eq!(tokenizer.decode(&[world], true).expect("decode"), "world");
        let ids = [hello, world, bang, world];
        let deltas = stream(&tokenizer, &ids);
        assert_eq!(deltas, ["Hello", " world", "!", " world", ""]);
        assert_eq!(
            deltas.concat(),
            tokenizer.decode(&ids, true).expect("decode")
        );
    }

    #[test]
    fn byte_fallback_characters() {
        let tokenizer = sentencepiece_tokenizer();
        let hello = tokenizer.token_to_id("▁Hello").expect("vocab");
        // "日" = E6 97 A5 as three byte-fallback tokens.
        let bytes: Vec<u32> = ["<0xE6>", "<0x97>", "<0xA5>"]
            .iter()
            .map(|t| tokenizer.token_to_id(t).expect("vocab"))
            .collect();
        let ids = [hello, bytes[0], bytes[1], bytes[2], hello];
        let deltas = stream(&tokenizer, &ids);
        assert_eq!(deltas, ["Hello", "", "", "日", " Hello", ""]);
    }

    #[test]
    fn special_tokens_are_skipped() {
        let tokenizer = byte_level_tokenizer();
        let eos = tokenizer.token_to_id("<|im_end|>").expect("special");
        let mut ids = tokenizer.encode("hi", false).expect("encode");
        ids.push(eos);
        ids.extend(tokenizer.encode(" there", false).expect("encode"));
        assert_eq!(stream(&tokenizer, &ids).concat(), "hi there");
    }

    #[test]
    fn continues_a_prompt() {
        let tokenizer = sentencepiece_tokenizer();
        let hello = tokenizer.token_to_id("▁Hello").expect("vocab");
        let world = tokenizer.token_to_id("▁world").expect("vocab");
        let mut decoder = IncrementalDecoder::with_context(&tokenizer, &[hello]).expect("ctx");
        assert_eq!(decoder.step(&tokenizer, world).expect("step"), " world");
        assert_eq!(decoder.finish(&tokenizer).expect("finish"), "");
    }
}
