//! `switchyard.v1.Inference` on top of the engine: requests are checked
//! ([`super::validate`]), tokenized, submitted, and the engine's token events turned into
//! text chunks (incremental detokenization, stop strings) and a summary.
//!
//! Calls arrive through the admission layers (`admission::pipeline`): identified, and for
//! generation within the request quota. Generation then validates its body and calls
//! `Admission::admit`, which charges it and gives it its place; nothing here counts
//! outcomes or refunds quota — the outcome layer and the reservation do.
//!
//! Every accepted request ends exactly once: a summary, or an error status. A client that
//! goes away (stream dropped, deadline) drops the engine receiver, which cancels the
//! sequence and frees its KV blocks before the next step.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::Stream;
use switchyard_proto::inference::v1::{self as pb, inference_server::Inference};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::metrics::FrontendMetrics;
use super::validate::{self, Checked, Limits};
use crate::admission::status::quota_metadata;
use crate::admission::tiers::priority_of;
use crate::admission::{Admission, Call, Cost, Reservation, Slot};
use crate::drain::Drain;
use crate::engine::{EngineHandle, Event, FinishReason, Occupancy, StepReport, SubmitError};
use crate::text::{IncrementalDecoder, StopMatcher, StopOutcome, Tokenizer};

/// The `Inference` service of one model.
#[derive(Debug, Clone)]
pub struct Frontend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    admission: Arc<Admission>,
    engine: EngineHandle,
    tokenizer: Arc<Tokenizer>,
    limits: Limits,
    info: pb::ModelInfo,
    metrics: Arc<FrontendMetrics>,
    next_seed: AtomicU64,
    /// Ends in-flight calls when the drain budget is spent.
    drain: Drain,
}

impl Frontend {
    /// Serves `engine`'s model under `info.id`.
    pub fn new(
        engine: EngineHandle,
        tokenizer: Arc<Tokenizer>,
        limits: Limits,
        info: pb::ModelInfo,
        metrics: Arc<FrontendMetrics>,
        admission: Arc<Admission>,
    ) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self {
            inner: Arc::new(Inner {
                admission,
                engine,
                tokenizer,
                limits,
                info,
                metrics,
                next_seed: AtomicU64::new(seed),
                drain: Drain::default(),
            }),
        }
    }

    /// What `ListModels` reports.
    pub fn info(&self) -> &pb::ModelInfo {
        &self.inner.info
    }

    /// Admission control, for the quota left after a call.
    pub(super) fn admission(&self) -> &Arc<Admission> {
        &self.inner.admission
    }

    /// The drain handle the server expires when the budget after SIGTERM is spent.
    pub fn drain(&self) -> &Drain {
        &self.inner.drain
    }

    /// Validates `body` ([`validate::check`]: a field out of range → `INVALID_ARGUMENT`
    /// naming it), then admits it ([`Admission::admit`]: charge, fair queue); a refusal's
    /// outcome is noted on the call for the outcome layer. `extensions` are the request's
    /// (the admission layers put the call's record there), `deadline` the client's. Every
    /// protocol the frontend speaks enters here.
    pub(super) async fn admit(
        &self,
        extensions: &http::Extensions,
        deadline: Option<Instant>,
        body: &pb::GenerateRequest,
    ) -> Result<Admitted, Status> {
        let call = Call::of(extensions)?;
        let seed = self
            .inner
            .next_seed
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        let checked = validate::check(
            body,
            &self.inner.tokenizer,
            &self.inner.limits,
            deadline,
            seed,
        )?;
        let cost = Cost {
            prompt: checked.engine.prompt.len() as u64,
            max_tokens: checked.engine.max_tokens as u64,
        };
        let reservation = self
            .inner
            .admission
            .admit(&call, cost, body.priority, checked.engine.deadline)
            .await?;
        Ok(Admitted {
            checked,
            reservation,
        })
    }

    /// [`Self::admit`] for a gRPC call: its deadline from `grpc-timeout`.
    async fn admit_grpc<T>(
        &self,
        request: &Request<T>,
        body: &pb::GenerateRequest,
    ) -> Result<Admitted, Status> {
        let deadline = validate::grpc_deadline(request.metadata(), Instant::now());
        self.admit(request.extensions(), deadline, body).await
    }

    /// Waits for the request's turn and runs it; the summary reports the band it ran in.
    pub(super) async fn run_admitted(
        &self,
        admitted: Admitted,
        out: &mut dyn ChunkSink,
    ) -> Result<pb::GenerateSummary, Status> {
        let Admitted {
            checked,
            reservation,
        } = admitted;
        let priority = priority_of(reservation.band());
        let mut checked = checked;
        checked.engine.cache_salt = cache_salt(&self.inner.info.id, &reservation.caller().key);
        let slot = reservation.start().await?;
        // The slot counts the tokens as they stream (usage, fair share, refund).
        self.run(checked, self.inner.info.id.clone(), priority, out, &slot)
            .await
    }

    /// [`Self::run_admitted`] until it ends, `gone` completes (the client went away:
    /// CANCELLED) or the drain budget is spent (UNAVAILABLE); counts the request's
    /// duration. Every protocol runs its requests through here.
    pub(super) async fn run_until_gone(
        &self,
        admitted: Admitted,
        out: &mut dyn ChunkSink,
        gone: impl std::future::Future<Output = ()>,
        started: Instant,
    ) -> Result<pb::GenerateSummary, Status> {
        let result = tokio::select! {
            r = self.run_admitted(admitted, out) => r,
            () = gone => Err(Status::cancelled("the client went away")),
            () = self.inner.drain.expired() => Err(Drain::status()),
        };
        self.inner
            .metrics
            .observe_request_duration(started.elapsed());
        result
    }

    /// Runs one checked request, sending chunks to `out` as they are ready; returns the
    /// summary, or the status the request ends with.
    async fn run(
        &self,
        checked: Checked,
        model: String,
        priority: i32,
        out: &mut dyn ChunkSink,
        slot: &Slot,
    ) -> Result<pb::GenerateSummary, Status> {
        let inner = &self.inner;
        let started = Instant::now();
        let prompt_tokens = checked.engine.prompt.len();
        let mut engine_request = checked.engine;
        engine_request.rank = slot.rank();
        let mut rx = inner.engine.submit(engine_request).map_err(|e| match e {
            SubmitError::Stopped => Status::unavailable("the engine has stopped"),
            other => Status::invalid_argument(other.to_string()),
        })?;
        inner.metrics.add_prompt_tokens(prompt_tokens as u64);
        let mut decoder = IncrementalDecoder::new();
        let mut stops = StopMatcher::new(&checked.stop);
        let mut index = 0u32;
        let mut first_token: Option<Instant> = None;
        let mut last_token = started;
        let mut completion = 0usize;
        let summary = |reason: pb::FinishReason,
                       completion: usize,
                       cached: usize,
                       queue: Duration,
                       first: Option<Instant>,
                       stop_sequence: Option<String>,
                       stop_token_id: Option<u32>| pb::GenerateSummary {
            finish_reason: reason as i32,
            usage: Some(pb::Usage {
                prompt_tokens: prompt_tokens as u32,
                cached_prompt_tokens: cached as u32,
                completion_tokens: completion as u32,
            }),
            timings: Some(pb::Timings {
                queue_time_us: queue.as_micros() as u64,
                time_to_first_token_us: first.map_or(0, |f| (f - started).as_micros() as u64),
                total_time_us: started.elapsed().as_micros() as u64,
            }),
            request_id: checked.request_id.clone(),
            model: model.clone(),
            priority,
            stop_sequence,
            stop_token_id,
            error_message: String::new(),
        };
        let mut queue_time = Duration::ZERO;
        let mut cached = 0usize;
        let detok = |e: crate::text::TextError| Status::internal(format!("detokenizing: {e}"));
        while let Some(event) = rx.recv().await {
            match event {
                Event::Started {
                    queue_time: q,
                    cached_prompt_tokens,
                } => {
                    queue_time = q;
                    cached = cached_prompt_tokens;
                    slot.cached_prompt(cached as u64);
                }
                Event::Token { id, stop, last } => {
                    let now = Instant::now();
                    match first_token {
                        None => {
                            first_token = Some(now);
                            inner.metrics.observe_ttft(now - started);
                        }
                        Some(_) => inner.metrics.observe_itl(now - last_token),
                    }
                    last_token = now;
                    inner.metrics.add_generated_tokens(1);
                    slot.generated(1);
                    completion += 1;
                    // A stop token's id is reported, its text is not part of the output.
                    let mut text = if stop {
                        String::new()
                    } else {
                        decoder.step(&inner.tokenizer, id).map_err(detok)?
                    };
                    if last || stop {
                        text.push_str(&decoder.finish(&inner.tokenizer).map_err(detok)?);
                    }
                    let (text, matched) = match stops.push(&text) {
                        StopOutcome::Continue(mut text) => {
                            if last || stop {
                                text.push_str(&stops.finish());
                            }
                            (text, None)
                        }
                        StopOutcome::Stopped { text, stop } => (text, Some(stop)),
                    };
                    let chunk = pb::TokenChunk {
                        text,
                        token_ids: vec![id],
                        index,
                    };
                    if !out.send(chunk).await {
                        return Err(Status::cancelled("the client went away"));
                    }
                    index += 1;
                    if let Some(stop) = matched {
                        // Dropping `rx` on return cancels the sequence in the engine.
                        return Ok(summary(
                            pb::FinishReason::Stop,
                            completion,
                            cached,
                            queue_time,
                            first_token,
                            Some(stop),
                            None,
                        ));
                    }
                }
                Event::Finished {
                    reason,
                    completion_tokens,
                    ..
                } => {
                    let (reason, stop_token) = match reason {
                        FinishReason::StopToken(id) => (pb::FinishReason::Stop, Some(id)),
                        FinishReason::Length => (pb::FinishReason::Length, None),
                        FinishReason::ContextLength => (pb::FinishReason::ContextLength, None),
                        FinishReason::Deadline => {
                            return Err(Status::deadline_exceeded(format!(
                                "the deadline passed after {completion_tokens} generated tokens \
                                 ({} ms in the queue)",
                                queue_time.as_millis()
                            )));
                        }
                    };
                    return Ok(summary(
                        reason,
                        completion_tokens,
                        cached,
                        queue_time,
                        first_token,
                        None,
                        stop_token,
                    ));
                }
                Event::Failed {
                    message,
                    unavailable,
                } => {
                    return Err(if unavailable {
                        Status::unavailable(message)
                    } else {
                        Status::internal(message)
                    });
                }
            }
        }
        Err(Status::internal(
            "the engine dropped the request without an answer",
        ))
    }
}

/// The prefix cache's partition for the requests of `key` (a tenant, or an anonymous
/// caller's address) to `model`: a tenant reuses only
/// its own prompts' keys and values, so no one can tell from a time to first token what
/// another tenant sent.
fn cache_salt(model: &str, key: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (model, key).hash(&mut h);
    h.finish()
}

/// A validated request, charged, with its slot or place in the queue.
#[derive(Debug)]
pub(super) struct Admitted {
    checked: Checked,
    reservation: Reservation,
}

impl Admitted {
    /// The quota charged for it, as the caller saw it at admission.
    pub(super) fn quota(&self) -> &crate::admission::QuotaView {
        self.reservation.quota()
    }

    /// Who is calling.
    pub(super) fn caller(&self) -> &crate::admission::Caller {
        self.reservation.caller()
    }

    /// The request id the summary will echo.
    pub(super) fn request_id(&self) -> &str {
        &self.checked.request_id
    }
}

/// Where [`Frontend::run`] puts text chunks: the client's stream, or a buffer for the
/// unary call. `send` returns false once the receiver is gone.
#[tonic::async_trait]
pub(super) trait ChunkSink: Send {
    async fn send(&mut self, chunk: pb::TokenChunk) -> bool;
}

#[derive(Default)]
struct Collect {
    text: String,
    ids: Vec<u32>,
}

#[tonic::async_trait]
impl ChunkSink for Collect {
    async fn send(&mut self, chunk: pb::TokenChunk) -> bool {
        self.text.push_str(&chunk.text);
        self.ids.extend(chunk.token_ids);
        true
    }
}

#[tonic::async_trait]
impl ChunkSink for mpsc::Sender<Result<pb::GenerateStreamResponse, Status>> {
    async fn send(&mut self, chunk: pb::TokenChunk) -> bool {
        // A full buffer (slow reader) waits rather than dropping tokens.
        mpsc::Sender::send(
            self,
            Ok(pb::GenerateStreamResponse {
                event: Some(pb::generate_stream_response::Event::Chunk(chunk)),
            }),
        )
        .await
        .is_ok()
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for Frontend {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let started = Instant::now();
        let body = request.get_ref().clone();
        let admitted = self.admit_grpc(&request, &body).await?;
        let caller = admitted.reservation.caller().clone();
        let charged = *admitted.reservation.quota();
        let mut collected = Collect::default();
        let summary = self
            .run_until_gone(admitted, &mut collected, std::future::pending(), started)
            .await?;
        let mut response = Response::new(pb::GenerateResponse {
            text: collected.text,
            token_ids: collected.ids,
            summary: Some(summary),
        });
        // After the slot's refund: what the caller may spend next.
        let quota = self.inner.admission.remaining_after(&caller, &charged);
        quota_metadata(response.metadata_mut(), &quota);
        Ok(response)
    }

    type GenerateStreamStream = ChunkStream;

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let started = Instant::now();
        let body = request.get_ref().clone();
        let admitted = self.admit_grpc(&request, &body).await?;
        let quota = *admitted.reservation.quota();
        let (tx, rx) = mpsc::channel::<Result<pb::GenerateStreamResponse, Status>>(64);
        let this = self.clone();
        tokio::spawn(async move {
            let mut sink = tx.clone();
            // The client dropping the stream must cancel even while nothing is produced
            // (queued, or prefilling), not only at the next token.
            let result = this
                .run_until_gone(admitted, &mut sink, tx.closed(), started)
                .await;
            let message = result.map(|summary| pb::GenerateStreamResponse {
                event: Some(pb::generate_stream_response::Event::Summary(summary)),
            });
            let _ = tx.send(message).await;
        });
        let mut response =
            Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as ChunkStream);
        quota_metadata(response.metadata_mut(), &quota);
        Ok(response)
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let body = request.into_inner();
        let inner = &self.inner;
        validate::check_model(&body.model, &inner.limits)?;
        let ids = match body.input {
            None => Err(Status::invalid_argument(
                "input: one of text or chat is required",
            )),
            Some(pb::tokenize_request::Input::Text(text)) => inner
                .tokenizer
                .encode(&text, body.add_special_tokens.unwrap_or(true))
                .map_err(|e| Status::internal(format!("tokenizing: {e}"))),
            Some(pb::tokenize_request::Input::Chat(chat)) => validate::chat_ids(
                &chat,
                &inner.tokenizer,
                body.add_generation_prompt.unwrap_or(true),
            ),
        }?;
        let token_strings = if body.return_token_strings {
            inner
                .tokenizer
                .token_strings(&ids)
                .map_err(|e| Status::internal(format!("decoding: {e}")))?
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::TokenizeResponse {
            token_ids: ids,
            token_strings,
            model: inner.info.id.clone(),
        }))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(pb::ListModelsResponse {
            models: vec![self.inner.info.clone()],
        }))
    }
}

impl crate::engine::EngineObserver for FrontendMetrics {
    fn step(&self, report: &StepReport<'_>) {
        self.observe_step(
            report.sequences as u64,
            report.tokens as u64,
            report.duration,
        );
        let now = std::time::Instant::now();
        for (layer, routes) in report.routes {
            self.add_recent_routes(now, *layer, &routes.experts);
            let mut counts: Vec<u64> = Vec::new();
            for &e in &routes.experts {
                let e = e as usize;
                if counts.len() <= e {
                    counts.resize(e + 1, 0);
                }
                counts[e] += 1;
            }
            for (expert, n) in counts.into_iter().enumerate().filter(|(_, n)| *n > 0) {
                self.add_expert_tokens(*layer, expert, n);
            }
        }
    }

    fn occupancy(&self, o: Occupancy) {
        self.set_sequences(o.running as u64, o.waiting as u64);
        self.set_kv_blocks(o.kv_used as u64, o.kv_free as u64);
        self.set_prefix_cache(o.kv_cached as u64, o.cache, o.preemptions);
    }
}
