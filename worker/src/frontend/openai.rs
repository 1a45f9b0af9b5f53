//! The OpenAI-compatible HTTP API, beside gRPC on the same port and behind the same
//! admission pipeline.
//!
//! ```text
//!  HTTP/1.1 or h2 ─> Wire (outermost: gRPC-shaped answers → OpenAI's wire format)
//!                     └─ admission layers (count outcome, identify, request quota)
//!                         └─ OpenAi: route, decode JSON, refuse what is not supported,
//!                             map to a GenerateRequest ─> Frontend::admit ─> run ─> JSON / SSE
//! ```
//!
//! - `POST /v1/chat/completions`, `POST /v1/completions`: one choice, streamed as
//!   server-sent events ending in `data: [DONE]` when `stream` is true, with a usage chunk
//!   when `stream_options.include_usage` is.
//! - `GET /v1/models`, `GET /v1/models/{id}`.
//! - Errors are OpenAI's body, `{"error": {"message", "type", "param", "code"}}`, with
//!   401 (no or unknown key), 400 (a field out of range or not supported, named), 404
//!   (model, route), 429 (over quota, with `Retry-After` and `x-ratelimit-*`), 503 (shed,
//!   with `Retry-After`), 504 (deadline).
//!
//! Inside, everything speaks gRPC's [`Status`], so the admission layers, the outcome
//! counting and the engine path are the gRPC API's, unchanged: a handler's answer carries
//! `grpc-status` (in its headers, or in the trailers that end a stream), which
//! [`CountOutcome`](crate::admission::outcome) counts, and [`Wire`] then turns into HTTP.
//! Request and response bodies are `async-openai`'s types.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use async_openai::types::chat::{
    ChatChoice, ChatChoiceStream, ChatCompletionResponseMessage, ChatCompletionStreamResponseDelta,
    Choice, CompletionFinishReason, CompletionUsage, CreateChatCompletionRequest,
    CreateChatCompletionResponse, CreateChatCompletionStreamResponse, FinishReason, Prompt,
    PromptTokensDetails, Role,
};
use async_openai::types::completions::{CreateCompletionRequest, CreateCompletionResponse};
use async_openai::types::models::{ListModelResponse, Model};
use bytes::Bytes;
use futures::StreamExt as _;
use http_body::Frame;
use http_body_util::{BodyExt as _, Full, Limited, StreamBody};
use serde::Serialize;
use serde_json::Value;
use switchyard_proto::inference::v1 as pb;
use tokio::sync::mpsc;
use tonic::body::Body;
use tonic::{Code, Status};

use super::service::{Admitted, ChunkSink, Frontend};
use crate::admission::status::quota_metadata;

/// The routes served (axum's path syntax); every other path is gRPC's.
pub const ROUTES: [&str; 2] = ["/v1/{*route}", "/v1"];

/// The largest request body decoded (as the gRPC API's largest message).
const MAX_BODY_BYTES: usize = crate::server::FRONTEND_MAX_REQUEST_BYTES;

/// The HTTP API of `frontend`, behind `admission`'s layers and [`Wire`]: a service for
/// the [`ROUTES`].
pub fn service(
    frontend: Frontend,
    admission: &std::sync::Arc<crate::admission::Admission>,
    counter: std::sync::Arc<dyn crate::admission::StatusCounter>,
) -> Api {
    let created = unix_now();
    let inner = crate::admission::pipeline::layers(admission, counter)
        .service(OpenAi { frontend, created });
    Wire { inner }
}

/// The HTTP API's service stack ([`service`]).
pub type Api = Wire<
    crate::admission::outcome::CountOutcome<
        crate::admission::identity::Identify<crate::admission::pipeline::RequestQuota<OpenAi>>,
    >,
>;

fn unix_now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

/// The handlers: routes a request, answers with a gRPC-shaped response (see the module
/// docs).
#[derive(Debug, Clone)]
pub struct OpenAi {
    frontend: Frontend,
    /// When the model was loaded (`Model.created`).
    created: u32,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<B> tower::Service<http::Request<B>> for OpenAi
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            Ok(this
                .handle(request)
                .await
                .unwrap_or_else(|status| status.into_http()))
        })
    }
}

/// Which generation endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
}

impl OpenAi {
    async fn handle<B>(&self, request: http::Request<B>) -> Result<http::Response<Body>, Status>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        let (parts, body) = request.into_parts();
        let path = parts.uri.path().trim_end_matches('/');
        let post = |endpoint| {
            if parts.method == http::Method::POST {
                Ok(endpoint)
            } else {
                Err(Status::unimplemented(format!(
                    "{path} accepts POST, not {}",
                    parts.method
                )))
            }
        };
        let endpoint = match path {
            "/v1/models" | "/v1/models/" => return self.models(&parts.method, None),
            "/v1/chat/completions" => post(Endpoint::Chat)?,
            "/v1/completions" => post(Endpoint::Completions)?,
            other => match other.strip_prefix("/v1/models/") {
                Some(id) => return self.models(&parts.method, Some(id)),
                None => {
                    return Err(Status::not_found(format!(
                        "no route {other}; served: POST /v1/chat/completions, \
                         POST /v1/completions, GET /v1/models"
                    )));
                }
            },
        };
        let json = read_json(body).await?;
        let (request, stream) = match endpoint {
            Endpoint::Chat => chat_request(json)?,
            Endpoint::Completions => completion_request(json)?,
        };
        let admitted = self
            .frontend
            .admit(&parts.extensions, None, &request)
            .await?;
        let answer = Answer {
            endpoint,
            id: match endpoint {
                Endpoint::Chat => format!("chatcmpl-{}", admitted.request_id()),
                Endpoint::Completions => format!("cmpl-{}", admitted.request_id()),
            },
            created: unix_now(),
            model: self.frontend.info().id.clone(),
        };
        match stream {
            None => self.unary(admitted, answer, started).await,
            Some(usage) => Ok(self.stream(admitted, answer, usage, started)),
        }
    }

    /// `GET /v1/models` (`id`: `None`) or `/v1/models/{id}`.
    fn models(
        &self,
        method: &http::Method,
        id: Option<&str>,
    ) -> Result<http::Response<Body>, Status> {
        if method != http::Method::GET {
            return Err(Status::unimplemented(format!(
                "/v1/models accepts GET, not {method}"
            )));
        }
        let model = Model {
            id: self.frontend.info().id.clone(),
            object: "model".into(),
            created: self.created,
            owned_by: "switchyard".into(),
            shutdown_date: None,
        };
        match id {
            None => Ok(json_response(
                &ListModelResponse {
                    object: "list".into(),
                    data: vec![model],
                },
                http::HeaderMap::new(),
            )),
            Some(id) if id == model.id => Ok(json_response(&model, http::HeaderMap::new())),
            Some(id) => Err(Status::not_found(format!(
                "model {id:?} is not served here; this deployment serves {:?}",
                model.id
            ))),
        }
    }

    /// Runs `admitted` to its end and answers with one JSON body.
    async fn unary(
        &self,
        admitted: Admitted,
        answer: Answer,
        started: Instant,
    ) -> Result<http::Response<Body>, Status> {
        let caller = admitted.caller().clone();
        let charged = *admitted.quota();
        let mut text = Text::default();
        let summary = self
            .frontend
            .run_until_gone(admitted, &mut text, std::future::pending(), started)
            .await?;
        let usage = usage(&summary);
        let finish = finish_reason(&summary);
        let mut headers = http::HeaderMap::new();
        let quota = self.frontend.admission().remaining_after(&caller, &charged);
        quota_headers(&mut headers, &quota);
        Ok(match answer.endpoint {
            Endpoint::Chat => {
                #[allow(deprecated)]
                let message = ChatCompletionResponseMessage {
                    content: Some(text.0),
                    refusal: None,
                    tool_calls: None,
                    annotations: None,
                    role: Role::Assistant,
                    function_call: None,
                    audio: None,
                };
                #[allow(deprecated)]
                let body = CreateChatCompletionResponse {
                    id: answer.id,
                    choices: vec![ChatChoice {
                        index: 0,
                        message,
                        finish_reason: Some(finish),
                        logprobs: None,
                    }],
                    created: answer.created,
                    model: answer.model,
                    service_tier: None,
                    system_fingerprint: None,
                    object: "chat.completion".into(),
                    usage: Some(usage),
                    metadata: None,
                    moderation: None,
                };
                json_response(&body, headers)
            }
            Endpoint::Completions => json_response(
                &CreateCompletionResponse {
                    id: answer.id,
                    choices: vec![Choice {
                        text: text.0,
                        index: 0,
                        logprobs: None,
                        finish_reason: Some(completion_finish(finish)),
                    }],
                    created: answer.created,
                    model: answer.model,
                    system_fingerprint: None,
                    object: "text_completion".into(),
                    usage: Some(usage),
                },
                headers,
            ),
        })
    }

    /// Answers at once with an event stream, and runs `admitted` into it; the stream ends
    /// with `data: [DONE]`, or an error event, then trailers that carry the call's status
    /// (for the outcome layer). The client going away cancels the request.
    fn stream(
        &self,
        admitted: Admitted,
        answer: Answer,
        include_usage: bool,
        started: Instant,
    ) -> http::Response<Body> {
        let mut headers = http::HeaderMap::new();
        quota_headers(&mut headers, admitted.quota());
        let (tx, rx) = mpsc::channel::<Frame<Bytes>>(64);
        let frontend = self.frontend.clone();
        tokio::spawn(async move {
            let mut sink = Events {
                tx: tx.clone(),
                answer,
                include_usage,
                started: false,
            };
            let result = frontend
                .run_until_gone(admitted, &mut sink, tx.closed(), started)
                .await;
            let status = match result {
                Ok(summary) => {
                    sink.finish(&summary).await;
                    Status::ok("")
                }
                Err(status) => {
                    let (_, body) = error_parts(&status);
                    let _ = tx.send(Frame::data(event(&body))).await;
                    status
                }
            };
            let mut trailers = http::HeaderMap::new();
            if let Ok(code) = http::HeaderValue::from_str(&(status.code() as i32).to_string()) {
                trailers.insert("grpc-status", code);
            }
            let _ = tx.send(Frame::trailers(trailers)).await;
        });
        let body =
            StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Status>));
        let mut response = http::Response::new(Body::new(body));
        *response.headers_mut() = headers;
        let h = response.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        h.insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-cache"),
        );
        response
    }
}

/// What every response of one request repeats.
#[derive(Debug, Clone)]
struct Answer {
    endpoint: Endpoint,
    id: String,
    created: u32,
    model: String,
}

/// The unary answer's text.
#[derive(Default)]
struct Text(String);

#[tonic::async_trait]
impl ChunkSink for Text {
    async fn send(&mut self, chunk: pb::TokenChunk) -> bool {
        self.0.push_str(&chunk.text);
        true
    }
}

/// A stream's events: a chunk per piece of text (the first with the role), then the
/// finish chunk, the usage chunk if asked for, and `[DONE]`.
struct Events {
    tx: mpsc::Sender<Frame<Bytes>>,
    answer: Answer,
    include_usage: bool,
    started: bool,
}

impl Events {
    /// The event for one choice's `text` (`finish`: the last one) or, with neither, the
    /// usage chunk.
    fn chunk(
        &self,
        text: Option<String>,
        finish: Option<FinishReason>,
        usage: Option<CompletionUsage>,
    ) -> Bytes {
        let a = &self.answer;
        match a.endpoint {
            Endpoint::Chat => {
                #[allow(deprecated)]
                let delta = ChatCompletionStreamResponseDelta {
                    content: text,
                    function_call: None,
                    tool_calls: None,
                    role: (!self.started).then_some(Role::Assistant),
                    refusal: None,
                    audio: None,
                };
                let choices = if usage.is_some() {
                    Vec::new()
                } else {
                    vec![ChatChoiceStream {
                        index: 0,
                        delta,
                        finish_reason: finish,
                        logprobs: None,
                    }]
                };
                #[allow(deprecated)]
                let chunk = CreateChatCompletionStreamResponse {
                    id: a.id.clone(),
                    choices,
                    created: a.created,
                    model: a.model.clone(),
                    service_tier: None,
                    system_fingerprint: None,
                    object: "chat.completion.chunk".into(),
                    usage,
                    obfuscation: None,
                    moderation: None,
                };
                event(&chunk)
            }
            Endpoint::Completions => {
                let choices = if usage.is_some() {
                    Vec::new()
                } else {
                    vec![Choice {
                        text: text.unwrap_or_default(),
                        index: 0,
                        logprobs: None,
                        finish_reason: finish.map(completion_finish),
                    }]
                };
                event(&CreateCompletionResponse {
                    id: a.id.clone(),
                    choices,
                    created: a.created,
                    model: a.model.clone(),
                    system_fingerprint: None,
                    object: "text_completion".into(),
                    usage,
                })
            }
        }
    }

    /// The finish chunk, the usage chunk when asked for, and `[DONE]`.
    async fn finish(&mut self, summary: &pb::GenerateSummary) {
        let finish = self.chunk(None, Some(finish_reason(summary)), None);
        let _ = self.tx.send(Frame::data(finish)).await;
        if self.include_usage {
            let usage = self.chunk(None, None, Some(usage(summary)));
            let _ = self.tx.send(Frame::data(usage)).await;
        }
        let _ = self
            .tx
            .send(Frame::data(Bytes::from_static(b"data: [DONE]\n\n")))
            .await;
    }
}

#[tonic::async_trait]
impl ChunkSink for Events {
    async fn send(&mut self, chunk: pb::TokenChunk) -> bool {
        // A stop token adds no text: no event for it.
        if chunk.text.is_empty() && self.started {
            return !self.tx.is_closed();
        }
        let event = self.chunk(Some(chunk.text), None, None);
        self.started = true;
        // A full buffer (slow reader) waits rather than dropping tokens.
        self.tx.send(Frame::data(event)).await.is_ok()
    }
}

/// One server-sent event carrying `value` as JSON.
fn event(value: &impl Serialize) -> Bytes {
    let mut out = b"data: ".to_vec();
    // Serializing these types cannot fail (no maps with non-string keys).
    let _ = serde_json::to_writer(&mut out, value);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn json_response(value: &impl Serialize, headers: http::HeaderMap) -> http::Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = http::Response::new(Body::new(
        Full::new(Bytes::from(body)).map_err(|never: Infallible| match never {}),
    ));
    *response.headers_mut() = headers;
    let h = response.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    // Complete in its headers: the outcome layer counts it now.
    h.insert("grpc-status", http::HeaderValue::from_static("0"));
    response
}

fn quota_headers(headers: &mut http::HeaderMap, quota: &crate::admission::QuotaView) {
    let mut md = tonic::metadata::MetadataMap::new();
    quota_metadata(&mut md, quota);
    headers.extend(md.into_headers());
}

fn usage(summary: &pb::GenerateSummary) -> CompletionUsage {
    let u = summary.usage.unwrap_or_default();
    CompletionUsage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details: Some(PromptTokensDetails {
            audio_tokens: None,
            cached_tokens: Some(u.cached_prompt_tokens),
            text_tokens: None,
            image_tokens: None,
            cache_write_tokens: None,
        }),
        completion_tokens_details: None,
    }
}

fn finish_reason(summary: &pb::GenerateSummary) -> FinishReason {
    match pb::FinishReason::try_from(summary.finish_reason) {
        Ok(pb::FinishReason::Length | pb::FinishReason::ContextLength) => FinishReason::Length,
        _ => FinishReason::Stop,
    }
}

fn completion_finish(finish: FinishReason) -> CompletionFinishReason {
    match finish {
        FinishReason::Length => CompletionFinishReason::Length,
        _ => CompletionFinishReason::Stop,
    }
}

/// The body as JSON, at most [`MAX_BODY_BYTES`].
async fn read_json<B>(body: B) -> Result<Value, Status>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let bytes = Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            Status::invalid_argument(format!(
                "request body: {e} (at most {MAX_BODY_BYTES} bytes)"
            ))
        })?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| Status::invalid_argument(format!("request body: not valid JSON: {e}")))
}

/// A field's value unless absent or `null`.
fn given<'a>(json: &'a Value, field: &str) -> Option<&'a Value> {
    json.get(field).filter(|v| !v.is_null())
}

/// Refuses every field of `json` that is set (not `null`) and neither in `accepted` nor
/// at a value that asks for nothing (`neutral`: the field and the only value allowed).
fn refuse_unsupported(
    json: &Value,
    accepted: &[&str],
    neutral: &[(&str, Value)],
) -> Result<(), Status> {
    let Some(object) = json.as_object() else {
        return Err(Status::invalid_argument(
            "request body: must be a JSON object",
        ));
    };
    for (field, value) in object {
        if value.is_null() || accepted.contains(&field.as_str()) {
            continue;
        }
        match neutral.iter().find(|(name, _)| name == field) {
            Some((_, allowed)) if same(allowed, value) => continue,
            Some((_, allowed)) => {
                return Err(Status::invalid_argument(format!(
                    "{field}: only {allowed} is supported (got {value})"
                )));
            }
            None => {
                return Err(Status::invalid_argument(format!(
                    "{field}: not supported by this server; supported fields: {}",
                    accepted.join(", ")
                )));
            }
        }
    }
    Ok(())
}

/// Equal JSON values, numbers by value (`0` and `0.0` alike).
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// The sampling fields both endpoints share, and the extensions vLLM also takes.
const SAMPLING_FIELDS: [&str; 12] = [
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "presence_penalty",
    "top_k",
    "repetition_penalty",
    "ignore_eos",
];

/// Extensions beyond OpenAI's fields (vLLM's names).
#[derive(Debug, Default, serde::Deserialize)]
struct Extensions {
    top_k: Option<u32>,
    repetition_penalty: Option<f32>,
    ignore_eos: Option<bool>,
    stop_token_ids: Option<Vec<u32>>,
}

/// The fields the user may only set to "nothing".
fn neutral_fields() -> Vec<(&'static str, Value)> {
    vec![
        ("n", Value::from(1)),
        ("frequency_penalty", Value::from(0)),
        ("logprobs", Value::from(false)),
        ("echo", Value::from(false)),
        ("best_of", Value::from(1)),
        ("response_format", serde_json::json!({"type": "text"})),
        ("store", Value::from(false)),
    ]
}

/// Reads `json` as `T` (without copying the document), the message naming what is wrong.
fn parse<T: serde::de::DeserializeOwned>(json: &Value) -> Result<T, Status> {
    T::deserialize(json).map_err(|e| Status::invalid_argument(format!("request body: {e}")))
}

/// The fields both endpoints map the same way, as their typed requests hold them.
struct Common {
    model: String,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<async_openai::types::chat::StopConfiguration>,
    presence_penalty: Option<f32>,
    stream: Option<bool>,
    stream_options: Option<async_openai::types::chat::ChatCompletionStreamOptions>,
}

/// The generation request for `input` with `c`'s sampling (and the extensions in `json`),
/// and whether to stream (`Some(include_usage)`).
fn generation(
    json: &Value,
    c: Common,
    input: pb::generate_request::Input,
) -> Result<(pb::GenerateRequest, Option<bool>), Status> {
    use async_openai::types::chat::StopConfiguration;
    let Common {
        model,
        max_tokens,
        temperature,
        top_p,
        seed,
        stop,
        presence_penalty,
        stream,
        stream_options,
    } = c;
    let ext: Extensions = parse(json)?;
    if let Some(options) = given(json, "stream_options") {
        if stream != Some(true) {
            return Err(Status::invalid_argument(
                "stream_options: only allowed when stream is true",
            ));
        }
        if given(options, "include_obfuscation").is_some_and(|v| v != &Value::from(false)) {
            return Err(Status::invalid_argument(
                "stream_options.include_obfuscation: not supported",
            ));
        }
    }
    let seed = seed
        .map(|s| {
            u64::try_from(s)
                .map_err(|_| Status::invalid_argument(format!("seed: {s} is negative; 0 or more")))
        })
        .transpose()?;
    let params = pb::SamplingParams {
        temperature,
        top_k: ext.top_k.unwrap_or(0),
        top_p,
        seed,
        max_tokens,
        stop: match stop {
            None => Vec::new(),
            Some(StopConfiguration::String(s)) => vec![s],
            Some(StopConfiguration::StringArray(v)) => v,
        },
        stop_token_ids: ext.stop_token_ids.unwrap_or_default(),
        ignore_eos: ext.ignore_eos.unwrap_or(false),
        repetition_penalty: ext.repetition_penalty,
        presence_penalty,
    };
    let include_usage = stream_options.and_then(|o| o.include_usage);
    let stream = (stream == Some(true)).then_some(include_usage.unwrap_or(false));
    let request = pb::GenerateRequest {
        model,
        input: Some(input),
        sampling: Some(params),
        priority: 0,
        request_id: None,
    };
    Ok((request, stream))
}

/// `POST /v1/chat/completions`'s body as a generation request, and whether to stream.
fn chat_request(json: Value) -> Result<(pb::GenerateRequest, Option<bool>), Status> {
    let mut accepted = SAMPLING_FIELDS.to_vec();
    accepted.extend([
        "messages",
        "max_completion_tokens",
        "stop_token_ids",
        "user",
        "safety_identifier",
    ]);
    refuse_unsupported(&json, &accepted, &neutral_fields())?;
    let messages = chat_messages(given(&json, "messages"))?;
    let req: CreateChatCompletionRequest = parse(&json)?;
    #[allow(deprecated)]
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(a), Some(b)) if a != b => {
            return Err(Status::invalid_argument(format!(
                "max_completion_tokens: {a} and max_tokens: {b} disagree; set one"
            )));
        }
        (a, b) => a.or(b),
    };
    #[allow(deprecated)]
    let seed = req.seed;
    let common = Common {
        model: req.model,
        max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed,
        stop: req.stop,
        presence_penalty: req.presence_penalty,
        stream: req.stream,
        stream_options: req.stream_options,
    };
    let input = pb::generate_request::Input::Chat(pb::ChatMessages { messages });
    generation(&json, common, input)
}

/// `messages`: each a role and text content (a string, or text parts).
fn chat_messages(messages: Option<&Value>) -> Result<Vec<pb::ChatMessage>, Status> {
    let Some(Value::Array(messages)) = messages else {
        return Err(Status::invalid_argument(
            "messages: required, a list of {\"role\", \"content\"} objects",
        ));
    };
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |name: &str| format!("messages[{i}].{name}");
            let role = match given(m, "role").and_then(Value::as_str) {
                Some("system" | "developer") => pb::Role::System,
                Some("user") => pb::Role::User,
                Some("assistant") => pb::Role::Assistant,
                other => {
                    return Err(Status::invalid_argument(format!(
                        "{}: {other:?} is not supported; accepted: system, developer, user, \
                         assistant (no tool calling)",
                        field("role")
                    )));
                }
            };
            if let Some(object) = m.as_object() {
                for (key, value) in object {
                    if !value.is_null() && key != "role" && key != "content" {
                        return Err(Status::invalid_argument(format!(
                            "{}: not supported; a message has a role and text content",
                            field(key)
                        )));
                    }
                }
            }
            let content = match given(m, "content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (
                            given(part, "type").and_then(Value::as_str),
                            given(part, "text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(Status::invalid_argument(format!(
                                    "{}[{j}]: {kind:?} parts are not supported; only text",
                                    field("content")
                                )));
                            }
                        }
                    }
                    text
                }
                None if role == pb::Role::Assistant => String::new(),
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "{}: required, a string or a list of text parts",
                        field("content")
                    )));
                }
            };
            Ok(pb::ChatMessage {
                role: role as i32,
                content,
            })
        })
        .collect()
}

/// `POST /v1/completions`'s body as a generation request, and whether to stream.
fn completion_request(json: Value) -> Result<(pb::GenerateRequest, Option<bool>), Status> {
    let mut accepted = SAMPLING_FIELDS.to_vec();
    accepted.extend(["prompt", "stop_token_ids", "user"]);
    refuse_unsupported(&json, &accepted, &neutral_fields())?;
    let req: CreateCompletionRequest = parse(&json)?;
    let input = match req.prompt {
        Prompt::String(s) => pb::generate_request::Input::Prompt(s),
        Prompt::StringArray(mut v) if v.len() == 1 => {
            pb::generate_request::Input::Prompt(v.remove(0))
        }
        Prompt::IntegerArray(ids) => pb::generate_request::Input::TokenIds(pb::TokenIds { ids }),
        Prompt::ArrayOfIntegerArray(mut v) if v.len() == 1 => {
            pb::generate_request::Input::TokenIds(pb::TokenIds { ids: v.remove(0) })
        }
        _ => {
            return Err(Status::invalid_argument(
                "prompt: one prompt per request (a string or a list of token ids); send \
                 several requests for several prompts",
            ));
        }
    };
    let common = Common {
        model: req.model,
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: req.stop,
        presence_penalty: req.presence_penalty,
        stream: req.stream,
        stream_options: req.stream_options,
    };
    generation(&json, common, input)
}

/// The OpenAI status, and error body, of a gRPC status.
fn error_parts(status: &Status) -> (http::StatusCode, Value) {
    use http::StatusCode as S;
    let message = status.message();
    let (code, kind, short) = match status.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            (S::BAD_REQUEST, "invalid_request_error", None)
        }
        Code::NotFound if message.starts_with("model") => (
            S::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
        ),
        Code::NotFound => (S::NOT_FOUND, "invalid_request_error", Some("not_found")),
        Code::Unauthenticated => (
            S::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        Code::PermissionDenied => (S::FORBIDDEN, "permission_error", None),
        Code::ResourceExhausted => (
            S::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some("rate_limit_exceeded"),
        ),
        Code::Unavailable => (S::SERVICE_UNAVAILABLE, "server_error", Some("overloaded")),
        Code::DeadlineExceeded => (S::GATEWAY_TIMEOUT, "server_error", Some("timeout")),
        // The client is gone; nginx's "client closed request".
        Code::Cancelled => (
            S::from_u16(499).unwrap_or(S::BAD_REQUEST),
            "server_error",
            Some("cancelled"),
        ),
        Code::Unimplemented => (
            S::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            Some("method_not_allowed"),
        ),
        _ => (S::INTERNAL_SERVER_ERROR, "server_error", None),
    };
    // "sampling.max_tokens: …" → the field, as this API names it.
    let message = message.strip_prefix("sampling.").unwrap_or(message);
    let param = (code == S::BAD_REQUEST)
        .then(|| message.split_once(": ").map(|(field, _)| field))
        .flatten()
        .filter(|f| {
            !f.is_empty()
                && f.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.[]".contains(c))
        });
    let body = serde_json::json!({"error": {
        "message": message,
        "type": kind,
        "param": param,
        "code": short,
    }});
    (code, body)
}

/// Headers of a refusal worth passing on: when to retry, the quota, how to authenticate.
fn pass_on(name: &str) -> bool {
    name == "retry-after" || name == "www-authenticate" || name.starts_with("x-ratelimit-")
}

/// The outermost layer of the HTTP API: answers carrying a failed `grpc-status` become
/// OpenAI's error body with its HTTP status; a success loses its gRPC headers and
/// trailers.
#[derive(Debug, Clone)]
pub struct Wire<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Wire<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = self.inner.call(request);
        Box::pin(async move { Ok(to_http(response.await?)) })
    }
}

/// See [`Wire`].
fn to_http(response: http::Response<Body>) -> http::Response<Body> {
    match Status::from_header_map(response.headers()) {
        Some(status) if status.code() != Code::Ok => {
            let (code, body) = error_parts(&status);
            let mut out = json_response(&body, http::HeaderMap::new());
            *out.status_mut() = code;
            out.headers_mut().remove("grpc-status");
            for (name, value) in response.headers() {
                if pass_on(name.as_str()) {
                    out.headers_mut().insert(name.clone(), value.clone());
                }
            }
            out
        }
        _ => {
            let (mut parts, body) = response.into_parts();
            parts.headers.remove("grpc-status");
            parts.headers.remove("grpc-message");
            // Data only: the trailers were for the outcome layer.
            let data = body.into_data_stream().map(|r| r.map(Frame::data));
            http::Response::from_parts(parts, Body::new(StreamBody::new(data)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any JSON, shallow or nested, with the fields both endpoints read at any value.
    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            "[ -~]{0,12}".prop_map(Value::from),
        ];
        let value = leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        const FIELDS: [&str; 16] = [
            "model",
            "messages",
            "prompt",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "stop",
            "stream",
            "stream_options",
            "seed",
            "n",
            "top_k",
            "logprobs",
            "stop_token_ids",
            "ignore_eos",
        ];
        proptest::collection::vec((proptest::sample::select(&FIELDS[..]), value), 0..8).prop_map(
            |fields| {
                Value::Object(
                    fields
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                )
            },
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 1000, ..Default::default() })]

        /// Any request body: a generation request, or INVALID_ARGUMENT whose message names
        /// what is wrong (a field, or the body); never a panic.
        #[test]
        fn any_body_maps_or_is_refused_by_name(json in any_json()) {
            for result in [chat_request(json.clone()), completion_request(json)] {
                if let Err(status) = result {
                    proptest::prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
                    let m = status.message();
                    proptest::prop_assert!(
                        m.contains(':') && !m.trim().is_empty(),
                        "unnamed: {}", m
                    );
                }
            }
        }
    }

    #[test]
    fn unsupported_fields_are_refused_by_name() {
        let refused = |json: Value| {
            chat_request(json)
                .expect_err("refused")
                .message()
                .to_string()
        };
        let base =
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let with = |k: &str, v: Value| {
            let mut j = base.clone();
            j[k] = v;
            j
        };
        assert!(refused(with("n", 2.into())).starts_with("n: only 1"));
        assert!(refused(with("tools", serde_json::json!([]))).starts_with("tools: not supported"));
        assert!(refused(with("logprobs", true.into())).starts_with("logprobs:"));
        assert!(refused(with("frobnicate", 1.into())).starts_with("frobnicate: not supported"));
        assert!(
            refused(with(
                "stream_options",
                serde_json::json!({"include_usage": true})
            ))
            .starts_with("stream_options: only allowed when stream")
        );
        assert!(refused(with("seed", (-1).into())).starts_with("seed:"));
        let image = serde_json::json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]);
        assert!(refused(with("messages", image)).starts_with("messages[0].content[0]"));
        let tool = serde_json::json!([{"role": "tool", "content": "x", "tool_call_id": "1"}]);
        assert!(refused(with("messages", tool)).starts_with("messages[0].role"));
        // Neutral values and nulls pass; the sampling fields map one to one.
        let ok = serde_json::json!({
            "model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "n": 1, "logprobs": false, "tools": null, "max_completion_tokens": 7, "temperature": 0.0,
            "top_p": 0.5, "seed": 3, "stop": "x", "stream": true, "stream_options": {"include_usage": true},
            "top_k": 4, "ignore_eos": true,
        });
        let (r, stream) = chat_request(ok).expect("accepted");
        assert_eq!(stream, Some(true));
        let s = r.sampling.expect("sampling");
        assert_eq!(
            (
                s.max_tokens,
                s.temperature,
                s.top_p,
                s.seed,
                s.stop.as_slice(),
                s.top_k,
                s.ignore_eos
            ),
            (
                Some(7),
                Some(0.0),
                Some(0.5),
                Some(3),
                &["x".to_string()][..],
                4,
                true
            )
        );
        let Some(pb::generate_request::Input::Chat(chat)) = r.input else {
            panic!("chat input")
        };
        assert_eq!(chat.messages.len(), 2);
        assert_eq!(chat.messages[1].content, "hi");
    }

    #[test]
    fn completions_take_one_prompt() {
        let one = serde_json::json!({"model": "m", "prompt": [1, 2, 3], "max_tokens": 4});
        let (r, stream) = completion_request(one).expect("accepted");
        assert_eq!(stream, None);
        assert!(
            matches!(r.input, Some(pb::generate_request::Input::TokenIds(t)) if t.ids == [1, 2, 3])
        );
        let two = serde_json::json!({"model": "m", "prompt": ["a", "b"]});
        assert!(
            completion_request(two)
                .expect_err("refused")
                .message()
                .starts_with("prompt:")
        );
        let echo = serde_json::json!({"model": "m", "prompt": "a", "echo": true});
        assert!(
            completion_request(echo)
                .expect_err("refused")
                .message()
                .starts_with("echo:")
        );
    }

    #[test]
    fn refusals_become_openai_errors_with_their_headers() {
        let mut status = Status::resource_exhausted("request quota of tier \"free\" exhausted");
        status
            .metadata_mut()
            .insert("retry-after", "3".parse().expect("ascii"));
        status.metadata_mut().insert(
            "x-ratelimit-remaining-requests",
            "0".parse().expect("ascii"),
        );
        let response = to_http(status.into_http());
        assert_eq!(response.status(), http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "3");
        assert_eq!(response.headers()["x-ratelimit-remaining-requests"], "0");
        assert!(response.headers().get("grpc-status").is_none());
        let (code, body) = error_parts(&Status::invalid_argument(
            "sampling.max_tokens: must be at least 1",
        ));
        assert_eq!(code, http::StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["param"], "max_tokens");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let (code, body) = error_parts(&Status::unauthenticated("no API key"));
        assert_eq!(code, http::StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"]["code"], "invalid_api_key");
    }
}
