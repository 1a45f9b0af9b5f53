//! `switchyard generate`: building one request from the flags, and presenting its answer.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use switchyard_proto::inference::v1::{
    ChatMessage, ChatMessages, GenerateRequest, GenerateResponse, GenerateSummary, Priority, Role,
    SamplingParams, generate_request,
};

use super::call::{Measurement, finish_reason_name};
use super::workload::InvalidInput;

/// The prompt of a `generate` request.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Plain text, no chat template.
    Prompt(String),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// What `switchyard generate` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Empty: the deployment's only model.
    pub model: String,
    pub input: Input,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    /// 0: no top-k filter.
    pub top_k: u32,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub priority: Priority,
}

impl GenerateOptions {
    /// The `GenerateRequest` these options describe; unset options leave the server's
    /// defaults.
    pub fn request(&self) -> GenerateRequest {
        let input = match &self.input {
            Input::Prompt(text) => generate_request::Input::Prompt(text.clone()),
            Input::Chat(messages) => generate_request::Input::Chat(ChatMessages {
                messages: messages.clone(),
            }),
        };
        GenerateRequest {
            model: self.model.clone(),
            input: Some(input),
            sampling: Some(SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
                max_tokens: self.max_tokens,
                stop: self.stop.clone(),
                ..SamplingParams::default()
            }),
            priority: self.priority as i32,
            request_id: None,
        }
    }
}

/// Parses a chat role: `system`, `user`, `assistant` or `tool`.
pub fn parse_role(s: &str) -> Result<Role, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "system" => Ok(Role::System),
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        "tool" => Ok(Role::Tool),
        _ => Err(format!(
            "role {s:?} is not one of system, user, assistant, tool"
        )),
    }
}

/// The name a role has in chat templates (`user`, ...).
pub fn role_name(role: i32) -> &'static str {
    match Role::try_from(role) {
        Ok(Role::System) => "system",
        Ok(Role::User) => "user",
        Ok(Role::Assistant) => "assistant",
        Ok(Role::Tool) => "tool",
        _ => "unspecified",
    }
}

#[derive(Deserialize)]
struct MessageEntry {
    role: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MessagesFile {
    List(Vec<MessageEntry>),
    Object { messages: Vec<MessageEntry> },
}

/// Parses a `--messages` file: a JSON array of `{"role": ..., "content": ...}` objects, or
/// an object with such an array under `"messages"` (the OpenAI request shape; other fields
/// are ignored). `source` names the file in errors.
pub fn parse_messages_json(text: &str, source: &str) -> Result<Vec<ChatMessage>, InvalidInput> {
    const FORM: &str = "expected a JSON array of {\"role\": \"system\"|\"user\"|\"assistant\"|\
                        \"tool\", \"content\": \"...\"} objects, or {\"messages\": [...]}";
    let file: MessagesFile = serde_json::from_str(text)
        .map_err(|e| InvalidInput::new(source, format!("{e}: {FORM}")))?;
    let entries = match file {
        MessagesFile::List(entries) | MessagesFile::Object { messages: entries } => entries,
    };
    if entries.is_empty() {
        return Err(InvalidInput::new(source, format!("no messages: {FORM}")));
    }
    entries
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            let role = parse_role(&entry.role)
                .map_err(|e| InvalidInput::new(format!("{source} message {}", i + 1), e))?;
            Ok(ChatMessage {
                role: role as i32,
                content: entry.content,
            })
        })
        .collect()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// The one-line summary `generate` prints to stderr after a streamed answer: finish reason,
/// token counts, time to first token and decode rate as the client measured them, total
/// time, and the request id.
pub fn summary_line(summary: &GenerateSummary, m: &Measurement) -> String {
    let usage = summary.usage.unwrap_or_default();
    let mut parts = vec![format!(
        "finish {}",
        finish_reason_name(summary.finish_reason)
    )];
    if let Some(stop) = &summary.stop_sequence {
        parts[0].push_str(&format!(" (stop string {stop:?})"));
    } else if let Some(token) = summary.stop_token_id {
        parts[0].push_str(&format!(" (stop token {token})"));
    }
    let mut prompt = format!("prompt {} tokens", usage.prompt_tokens);
    if usage.cached_prompt_tokens > 0 {
        prompt.push_str(&format!(" ({} cached)", usage.cached_prompt_tokens));
    }
    parts.push(prompt);
    parts.push(format!("completion {} tokens", usage.completion_tokens));
    if let Some(ttft) = m.ttft() {
        parts.push(format!("TTFT {}", ms(ttft)));
    }
    if let Some(rate) = m.decode_tokens_per_s() {
        parts.push(format!("{rate:.1} tokens/s"));
    }
    parts.push(format!("total {:.3} s", m.e2e().as_secs_f64()));
    if !summary.request_id.is_empty() {
        parts.push(format!("request {}", summary.request_id));
    }
    if !summary.error_message.is_empty() {
        parts.push(format!("error: {}", summary.error_message));
    }
    parts.join(", ")
}

fn summary_json(summary: &GenerateSummary) -> serde_json::Value {
    let usage = summary.usage.unwrap_or_default();
    let timings = summary.timings.unwrap_or_default();
    let priority = Priority::try_from(summary.priority).map_or_else(
        |_| format!("unknown({})", summary.priority),
        |p| {
            p.as_str_name()
                .trim_start_matches("PRIORITY_")
                .to_ascii_lowercase()
        },
    );
    json!({
        "finish_reason": finish_reason_name(summary.finish_reason),
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "cached_prompt_tokens": usage.cached_prompt_tokens,
            "completion_tokens": usage.completion_tokens,
        },
        "timings": {
            "queue_time_us": timings.queue_time_us,
            "time_to_first_token_us": timings.time_to_first_token_us,
            "total_time_us": timings.total_time_us,
        },
        "request_id": summary.request_id,
        "model": summary.model,
        "priority": priority,
        "stop_sequence": summary.stop_sequence,
        "stop_token_id": summary.stop_token_id,
        "error_message": summary.error_message,
    })
}

/// The object `generate --json` prints: `text`, `token_ids`, `summary` (finish reason,
/// usage, the server's timings, ids), and `latency_ms` as the client measured it.
pub fn response_json(response: &GenerateResponse, latency: Duration) -> serde_json::Value {
    json!({
        "text": response.text,
        "token_ids": response.token_ids,
        "summary": response.summary.as_ref().map(summary_json),
        "latency_ms": latency.as_secs_f64() * 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_proto::inference::v1::{FinishReason, Timings, Usage};

    #[test]
    fn options_become_a_request() {
        let options = GenerateOptions {
            model: "m".into(),
            input: Input::Chat(vec![ChatMessage {
                role: Role::User as i32,
                content: "hi".into(),
            }]),
            max_tokens: Some(5),
            temperature: Some(0.0),
            top_k: 40,
            top_p: None,
            seed: Some(7),
            stop: vec!["\n\n".into()],
            priority: Priority::High,
        };
        let r = options.request();
        assert_eq!(r.model, "m");
        assert_eq!(r.priority, Priority::High as i32);
        let Some(generate_request::Input::Chat(chat)) = &r.input else {
            panic!("chat input expected: {r:?}");
        };
        assert_eq!(chat.messages[0].content, "hi");
        let s = r.sampling.expect("sampling");
        assert_eq!(
            (s.max_tokens, s.temperature, s.top_k, s.top_p, s.seed),
            (Some(5), Some(0.0), 40, None, Some(7))
        );
        assert_eq!(s.stop, ["\n\n"]);
        assert!(!s.ignore_eos);
    }

    #[test]
    fn messages_files_in_both_shapes() {
        let list =
            r#"[{"role": "system", "content": "be brief"}, {"role": "User", "content": "hi"}]"#;
        let messages = parse_messages_json(list, "m.json").expect("valid");
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].role, Role::System as i32);
        assert_eq!(messages[1].role, Role::User as i32);
        let object =
            r#"{"model": "x", "messages": [{"role": "assistant", "content": "ok", "name": "a"}]}"#;
        let messages = parse_messages_json(object, "m.json").expect("valid");
        assert_eq!(messages[0].role, Role::Assistant as i32);

        let e = parse_messages_json(r#"[{"role": "bot", "content": "x"}]"#, "m.json")
            .expect_err("bad role");
        assert_eq!(
            e.to_string(),
            "m.json message 1: role \"bot\" is not one of system, user, assistant, tool"
        );
        let e = parse_messages_json("[]", "m.json").expect_err("empty");
        assert!(
            e.to_string().starts_with("m.json: no messages: expected"),
            "{e}"
        );
        let e = parse_messages_json("{\"x\": 1}", "m.json").expect_err("shape");
        assert!(e.to_string().contains("expected a JSON array"), "{e}");
    }

    fn summary() -> GenerateSummary {
        GenerateSummary {
            finish_reason: FinishReason::Length as i32,
            usage: Some(Usage {
                prompt_tokens: 12,
                cached_prompt_tokens: 4,
                completion_tokens: 3,
            }),
            timings: Some(Timings {
                queue_time_us: 5,
                time_to_first_token_us: 50,
                total_time_us: 90,
            }),
            request_id: "r-1".into(),
            model: "m".into(),
            priority: Priority::Normal as i32,
            stop_sequence: None,
            stop_token_id: None,
            error_message: String::new(),
        }
    }

    #[test]
    fn summary_line_has_the_figures() {
        let sent = std::time::Instant::now();
        let at = |ms| sent + Duration::from_millis(ms);
        let m = Measurement {
            sent,
            first_token: Some(at(100)),
            last_token: Some(at(300)),
            ended: at(310),
            itl: vec![
                (Duration::from_millis(100), 1),
                (Duration::from_millis(50), 2),
            ],
            output_tokens: 4,
            summary: None,
            result: Ok(()),
        };
        assert_eq!(
            summary_line(&summary(), &m),
            "finish length, prompt 12 tokens (4 cached), completion 3 tokens, TTFT 100.0 ms, \
             15.0 tokens/s, total 0.310 s, request r-1"
        );
    }

    #[test]
    fn response_json_shape() {
        let response = GenerateResponse {
            text: "abc".into(),
            token_ids: vec![1, 2, 3],
            summary: Some(summary()),
        };
        let v = response_json(&response, Duration::from_millis(250));
        assert_eq!(v["text"], "abc");
        assert_eq!(v["token_ids"], json!([1, 2, 3]));
        assert_eq!(v["summary"]["finish_reason"], "length");
        assert_eq!(v["summary"]["priority"], "normal");
        assert_eq!(v["summary"]["usage"]["completion_tokens"], 3);
        assert_eq!(v["summary"]["timings"]["total_time_us"], 90);
        assert_eq!(v["latency_ms"], 250.0);
    }
}
