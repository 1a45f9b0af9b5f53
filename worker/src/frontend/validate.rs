//! `GenerateRequest` → an engine request, or `INVALID_ARGUMENT` naming the field and what
//! it accepts. Pure: the model's limits come in as [`Limits`].

use std::time::Instant;

use switchyard_proto::inference::v1::{self as pb, generate_request::Input};
use tonic::Status;

use crate::engine::GenerationRequest;
use crate::engine::sampling::SamplingConfig;
use crate::text::{ChatMessage, GenerationDefaults, TextError, Tokenizer};

/// Most stop strings a request may carry, and the longest one.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_LEN: usize = 256;

/// What the served model accepts.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The model's id (`ListModels`); requests may name it or leave `model` empty.
    pub model_id: String,
    /// Prompt + output tokens at most.
    pub context_length: usize,
    /// Rows of the embedding: token ids must be below it.
    pub vocab_size: usize,
    /// `max_tokens` when a request leaves it unset (capped by the room left).
    pub default_max_tokens: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_per_request: usize,
}

/// A checked request: what the engine runs plus what the frontend applies itself.
#[derive(Debug, Clone)]
pub struct Checked {
    /// For the engine.
    pub engine: GenerationRequest,
    /// Stop strings, matched on the decoded text.
    pub stop: Vec<String>,
    /// The request id to echo (the client's, or a generated one).
    pub request_id: String,
}

fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

/// Checks `model` against the served one.
pub fn check_model(model: &str, limits: &Limits) -> Result<(), Status> {
    if model.is_empty() || model == limits.model_id {
        Ok(())
    } else {
        // The proto's contract: an unknown model is NOT_FOUND, naming the field.
        Err(Status::not_found(format!(
            "model: {model:?} is not served here; served: {:?} (or leave it empty)",
            limits.model_id
        )))
    }
}

/// The prompt token ids of a request's input.
pub fn prompt_ids(
    input: Option<&Input>,
    tokenizer: &Tokenizer,
    limits: &Limits,
    add_generation_prompt: bool,
) -> Result<Vec<u32>, Status> {
    let ids = match input {
        None => {
            return Err(invalid(
                "input",
                "one of prompt, token_ids or chat is required",
            ));
        }
        Some(Input::Prompt(text)) => {
            if text.is_empty() {
                return Err(invalid("prompt", "must not be empty"));
            }
            tokenizer
                .encode(text, true)
                .map_err(|e| Status::internal(format!("tokenizing the prompt: {e}")))?
        }
        Some(Input::TokenIds(t)) => {
            if t.ids.is_empty() {
                return Err(invalid("token_ids.ids", "must not be empty"));
            }
            if let Some((i, id)) = t
                .ids
                .iter()
                .enumerate()
                .find(|(_, id)| **id as usize >= limits.vocab_size)
            {
                return Err(invalid(
                    &format!("token_ids.ids[{i}]"),
                    format!("{id} is outside the vocabulary [0, {})", limits.vocab_size),
                ));
            }
            t.ids.clone()
        }
        Some(Input::Chat(chat)) => chat_ids(chat, tokenizer, add_generation_prompt)?,
    };
    if ids.is_empty() {
        return Err(invalid("prompt", "encodes to no tokens"));
    }
    if ids.len() >= limits.context_length {
        return Err(invalid(
            "prompt",
            format!(
                "{} tokens leave no room to generate in the context length {}",
                ids.len(),
                limits.context_length
            ),
        ));
    }
    Ok(ids)
}

/// Renders and encodes chat messages with the checkpoint's template.
pub fn chat_ids(
    chat: &pb::ChatMessages,
    tokenizer: &Tokenizer,
    add_generation_prompt: bool,
) -> Result<Vec<u32>, Status> {
    if chat.messages.is_empty() {
        return Err(invalid("chat.messages", "must hold at least one message"));
    }
    let mut messages = Vec::with_capacity(chat.messages.len());
    for (i, m) in chat.messages.iter().enumerate() {
        let role = match pb::Role::try_from(m.role) {
            Ok(pb::Role::System) => "system",
            Ok(pb::Role::User) => "user",
            Ok(pb::Role::Assistant) => "assistant",
            Ok(pb::Role::Tool) => "tool",
            _ => {
                return Err(invalid(
                    &format!("chat.messages[{i}].role"),
                    "must be one of ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL",
                ));
            }
        };
        messages.push(ChatMessage::new(role, m.content.clone()));
    }
    match tokenizer.encode_chat(&messages, add_generation_prompt) {
        None => Err(Status::failed_precondition(
            "chat: this model's checkpoint has no chat template (tokenizer_config.json \
             chat_template); send `prompt` or `token_ids` instead",
        )),
        Some(Ok(ids)) => Ok(ids),
        Some(Err(TextError::TemplateRaised { message, .. })) => {
            Err(invalid("chat.messages", message))
        }
        Some(Err(e)) => Err(Status::internal(format!(
            "rendering the chat template: {e}"
        ))),
    }
}

/// Sampling settings: the request's, else the checkpoint's `generation_config.json`
/// defaults, else greedy.
pub fn sampling(
    params: Option<&pb::SamplingParams>,
    defaults: &GenerationDefaults,
    request_seed: u64,
) -> Result<SamplingConfig, Status> {
    let p = params.cloned().unwrap_or_default();
    let sampled_by_default = defaults.do_sample.unwrap_or(false);
    let config = SamplingConfig {
        temperature: p
            .temperature
            .or(if sampled_by_default {
                defaults.temperature
            } else {
                Some(0.0)
            })
            .unwrap_or(0.0),
        top_k: if p.top_k > 0 {
            p.top_k
        } else if sampled_by_default {
            defaults.top_k.unwrap_or(0)
        } else {
            0
        },
        top_p: p
            .top_p
            .or(if sampled_by_default {
                defaults.top_p
            } else {
                None
            })
            .unwrap_or(1.0),
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        presence_penalty: p.presence_penalty.unwrap_or(0.0),
        seed: p.seed.unwrap_or(request_seed),
    };
    config
        .validate()
        .map_err(|e| Status::invalid_argument(format!("sampling.{e}")))?;
    Ok(config)
}

/// Checks a whole request against `limits`.
pub fn check(
    req: &pb::GenerateRequest,
    tokenizer: &Tokenizer,
    limits: &Limits,
    deadline: Option<Instant>,
    request_seed: u64,
) -> Result<Checked, Status> {
    check_model(&req.model, limits)?;
    if pb::Priority::try_from(req.priority).is_err() {
        return Err(invalid(
            "priority",
            format!(
                "{} is not a priority; accepted: 0 (unspecified), 1 (low), 2 (normal), \
                 3 (high), 4 (critical)",
                req.priority
            ),
        ));
    }
    let prompt = prompt_ids(req.input.as_ref(), tokenizer, limits, true)?;
    let params = req.sampling.clone().unwrap_or_default();
    let room = limits.context_length - prompt.len();
    let max_tokens = match params.max_tokens {
        Some(0) => return Err(invalid("sampling.max_tokens", "must be at least 1")),
        Some(n) if n as usize > limits.max_tokens_per_request => {
            return Err(invalid(
                "sampling.max_tokens",
                format!(
                    "{n} exceeds this deployment's limit of {}",
                    limits.max_tokens_per_request
                ),
            ));
        }
        Some(n) if n as usize > room => {
            return Err(invalid(
                "sampling.max_tokens",
                format!(
                    "{n} exceeds the room left in the context: {} − {} prompt tokens = {room}",
                    limits.context_length,
                    prompt.len()
                ),
            ));
        }
        Some(n) => n as usize,
        None => {
            let default = tokenizer
                .generation_defaults()
                .max_new_tokens
                .map_or(limits.default_max_tokens, |n| n as usize);
            default.min(limits.max_tokens_per_request).min(room)
        }
    };
    if params.stop.len() > MAX_STOP_STRINGS {
        return Err(invalid(
            "sampling.stop",
            format!(
                "at most {MAX_STOP_STRINGS} stop strings (got {})",
                params.stop.len()
            ),
        ));
    }
    for (i, s) in params.stop.iter().enumerate() {
        if s.is_empty() || s.len() > MAX_STOP_LEN {
            return Err(invalid(
                &format!("sampling.stop[{i}]"),
                format!("must be 1 to {MAX_STOP_LEN} bytes long"),
            ));
        }
    }
    if let Some((i, id)) = params
        .stop_token_ids
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= limits.vocab_size)
    {
        return Err(invalid(
            &format!("sampling.stop_token_ids[{i}]"),
            format!("{id} is outside the vocabulary [0, {})", limits.vocab_size),
        ));
    }
    let sampling = sampling(
        req.sampling.as_ref(),
        tokenizer.generation_defaults(),
        request_seed,
    )?;
    let mut stop_token_ids = params.stop_token_ids.clone();
    if !params.ignore_eos {
        stop_token_ids.extend_from_slice(tokenizer.eos_token_ids());
    }
    let request_id = match &req.request_id {
        Some(id) if id.len() > 128 => {
            return Err(invalid("request_id", "at most 128 bytes"));
        }
        Some(id) => id.clone(),
        None => format!("req-{request_seed:016x}"),
    };
    Ok(Checked {
        engine: GenerationRequest {
            prompt,
            max_tokens,
            sampling,
            stop_token_ids,
            deadline,
            // Set from the admission slot when the request starts.
            rank: 0,
            // Set from the caller when the request starts.
            cache_salt: 0,
        },
        stop: params.stop,
        request_id,
    })
}

/// The deadline a client set with the `grpc-timeout` header (`<digits><unit>`), if any.
pub fn grpc_deadline(metadata: &tonic::metadata::MetadataMap, now: Instant) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    now.checked_add(crate::admission::outcome::grpc_timeout(value)?)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn grpc_timeout_units() {
        let now = Instant::now();
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("grpc-timeout", "250m".parse().expect("ascii"));
        assert_eq!(
            grpc_deadline(&md, now),
            Some(now + Duration::from_millis(250))
        );
        md.insert("grpc-timeout", "3S".parse().expect("ascii"));
        assert_eq!(grpc_deadline(&md, now), Some(now + Duration::from_secs(3)));
        md.insert("grpc-timeout", "x".parse().expect("ascii"));
        assert_eq!(grpc_deadline(&md, now), None);
    }

    /// The limits the property tests check requests against.
    fn fuzz_limits() -> Limits {
        Limits {
            model_id: "demo".into(),
            context_length: 64,
            vocab_size: 300,
            default_max_tokens: 8,
            max_tokens_per_request: 32,
        }
    }

    fn any_request() -> impl proptest::strategy::Strategy<Value = pb::GenerateRequest> {
        use proptest::option::of;
        use proptest::prelude::*;
        let float = prop_oneof![
            any::<f32>(),
            Just(f32::NAN),
            Just(f32::INFINITY),
            -2.0f32..4.0
        ];
        let input = prop_oneof![
            "[ -~]{0,24}".prop_map(Input::Prompt),
            proptest::collection::vec(prop_oneof![0u32..300, any::<u32>()], 0..40)
                .prop_map(|ids| Input::TokenIds(pb::TokenIds { ids })),
            proptest::collection::vec((-1i32..6, "[ -~]{0,12}"), 0..4).prop_map(|m| {
                Input::Chat(pb::ChatMessages {
                    messages: m
                        .into_iter()
                        .map(|(role, content)| pb::ChatMessage { role, content })
                        .collect(),
                })
            }),
        ];
        let sampling = (
            (
                of(float.clone()),
                any::<u32>(),
                of(float.clone()),
                of(any::<u64>()),
            ),
            (
                of(prop_oneof![0u32..64, any::<u32>()]),
                proptest::collection::vec("[ -~]{0,6}", 0..3),
                proptest::collection::vec(any::<u32>(), 0..3),
                any::<bool>(),
                of(float.clone()),
                of(float),
            ),
        )
            .prop_map(
                |(
                    (temperature, top_k, top_p, seed),
                    (
                        max_tokens,
                        stop,
                        stop_token_ids,
                        ignore_eos,
                        repetition_penalty,
                        presence_penalty,
                    ),
                )| pb::SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    seed,
                    max_tokens,
                    stop,
                    stop_token_ids,
                    ignore_eos,
                    repetition_penalty,
                    presence_penalty,
                },
            );
        (
            prop_oneof![Just(String::new()), Just("demo".to_string()), "[ -~]{0,8}"],
            of(input),
            of(sampling),
            -2i32..8,
            of("[ -~]{0,70}"),
        )
            .prop_map(|(model, input, sampling, priority, request_id)| {
                pb::GenerateRequest {
                    model,
                    input,
                    sampling,
                    priority,
                    request_id,
                }
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, ..Default::default() })]

        /// Any request: accepted within the limits, or refused with a message that names
        /// the field; never a panic.
        #[test]
        fn any_request_is_checked_or_refused_by_name(req in any_request()) {
            let tokenizer = crate::text::testutil::byte_level_tokenizer();
            let limits = fuzz_limits();
            match check(&req, &tokenizer, &limits, None, 7) {
                Ok(c) => {
                    let e = &c.engine;
                    proptest::prop_assert!(e.prompt.len() + e.max_tokens <= limits.context_length);
                    proptest::prop_assert!(e.prompt.iter().all(|t| (*t as usize) < limits.vocab_size));
                    proptest::prop_assert!(e.max_tokens >= 1 && e.max_tokens <= 32);
                }
                Err(s) => {
                    let m = s.message();
                    proptest::prop_assert!(
                        matches!(
                            s.code(),
                            tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition
                        ),
                        "{:?}: {}", s.code(), m
                    );
                    proptest::prop_assert!(m.contains(':') || m.contains("model"), "unnamed: {}", m);
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, ..Default::default() })]

        /// Any bytes on the wire: a request's encoding truncated, with bytes overwritten
        /// or inserted, or plain random bytes. Decoding refuses them or yields a request
        /// that is checked like any other; never a panic, and no allocation beyond the
        /// input's size.
        #[test]
        fn any_wire_bytes_decode_and_check_or_are_refused(
            req in any_request(),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
            edits in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>(), proptest::prelude::any::<bool>()),
                0..6,
            ),
            random in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            use prost::Message as _;
            let mut bytes = req.encode_to_vec();
            if !bytes.is_empty() {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            for (at, byte, insert) in edits {
                let i = at.index(bytes.len() + 1);
                if insert || i == bytes.len() {
                    bytes.insert(i, byte);
                } else {
                    bytes[i] = byte;
                }
            }
            let tokenizer = crate::text::testutil::byte_level_tokenizer();
            let limits = fuzz_limits();
            for wire in [bytes.as_slice(), random.as_slice()] {
                if let Ok(decoded) = pb::GenerateRequest::decode(wire) {
                    // What was decoded came from the bytes: nothing larger than them.
                    proptest::prop_assert!(decoded.encoded_len() <= 2 * wire.len() + 16);
                    match check(&decoded, &tokenizer, &limits, None, 7) {
                        Ok(c) => proptest::prop_assert!(
                            c.engine.prompt.len() + c.engine.max_tokens <= limits.context_length
                        ),
                        Err(s) => proptest::prop_assert!(matches!(
                            s.code(),
                            tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition
                        ), "{:?}: {}", s.code(), s.message()),
                    }
                }
            }
        }
    }

    #[test]
    fn unknown_model_names_the_served_one() {
        let limits = Limits {
            model_id: "demo".into(),
            context_length: 16,
            vocab_size: 10,
            default_max_tokens: 4,
            max_tokens_per_request: 8,
        };
        assert!(check_model("", &limits).is_ok());
        let e = check_model("gpt", &limits).expect_err("unknown");
        assert_eq!(e.code(), tonic::Code::NotFound, "the proto's contract");
        assert!(e.message().contains("\"demo\""), "{}", e.message());
    }
}
