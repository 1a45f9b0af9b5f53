//! One streamed generation, timed from the client's side: the measurement both
//! `switchyard generate` and `switchyard bench` make.

use std::time::{Duration, Instant};

use switchyard_proto::inference::v1::inference_client::InferenceClient;
use switchyard_proto::inference::v1::{
    FinishReason, GenerateRequest, GenerateSummary, TokenChunk, generate_stream_response,
};
use tonic::transport::Channel;

use super::workload::{ApiKey, authorize};
use switchyard_edge::metrics::status_label;

/// Why a streamed call did not end with a summary.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The server (or the transport) ended the call with a non-OK status.
    #[error("{}", describe_status(.0))]
    Status(tonic::Status),
    /// The client-side timeout passed first.
    #[error("deadline_exceeded: no answer within the {0:?} timeout")]
    TimedOut(Duration),
    /// The stream closed with status OK but without the summary the API promises.
    #[error("internal: the stream ended without a summary (a server bug)")]
    NoSummary,
}

impl CallError {
    /// The label a report counts this error under: the gRPC code in snake case
    /// (`unavailable`, `resource_exhausted`, ...; a client-side timeout is
    /// `deadline_exceeded`), or `no_summary`.
    pub fn label(&self) -> &'static str {
        match self {
            CallError::Status(status) => status_label(status.code()),
            CallError::TimedOut(_) => status_label(tonic::Code::DeadlineExceeded),
            CallError::NoSummary => "no_summary",
        }
    }
}

/// A status as `code: message` (`unavailable: queue full`), plus the retry hint the server
/// gave with `resource_exhausted` (`retry-after` seconds), if any.
pub fn describe_status(status: &tonic::Status) -> String {
    let mut line = format!("{}: {}", status_label(status.code()), status.message());
    if let Some(after) = status
        .metadata()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
    {
        line.push_str(&format!(" (retry after {after} s)"));
    }
    line
}

/// A finish reason as reports name it: `stop`, `length`, `context_length`, `cancelled`,
/// `error`, or `unknown(N)` for a value this client does not know.
pub fn finish_reason_name(value: i32) -> String {
    match FinishReason::try_from(value) {
        Ok(reason) => reason
            .as_str_name()
            .trim_start_matches("FINISH_REASON_")
            .to_ascii_lowercase(),
        Err(_) => format!("unknown({value})"),
    }
}

/// What the client saw of one `GenerateStream` call.
#[derive(Debug)]
pub struct Measurement {
    /// Just before the call was made.
    pub sent: Instant,
    /// When the first chunk carrying tokens arrived.
    pub first_token: Option<Instant>,
    /// When the last chunk carrying tokens arrived.
    pub last_token: Option<Instant>,
    /// When the summary arrived, or the call failed.
    pub ended: Instant,
    /// Inter-token latency: for each chunk after the first, the gap since the previous
    /// chunk divided by the chunk's tokens, and that token count (the weight of the value).
    pub itl: Vec<(Duration, u32)>,
    /// Tokens received in chunks.
    pub output_tokens: u64,
    /// The summary, when the stream delivered one.
    pub summary: Option<GenerateSummary>,
    /// `Ok` when the stream ended with a summary and status OK.
    pub result: Result<(), CallError>,
}

impl Measurement {
    /// A call sent at `sent`, nothing received yet.
    pub fn started(sent: Instant) -> Self {
        Self {
            sent,
            first_token: None,
            last_token: None,
            ended: sent,
            itl: Vec::new(),
            output_tokens: 0,
            summary: None,
            result: Ok(()),
        }
    }

    /// Ends the measurement with how the call ended: `Ok` only with a summary; a failed
    /// call ends now.
    pub fn finish(&mut self, result: Result<(), CallError>) {
        self.result = match result {
            Ok(()) if self.summary.is_none() => Err(CallError::NoSummary),
            other => other,
        };
        if self.result.is_err() {
            self.ended = Instant::now();
        }
    }

    /// Time to first token, from sending the request.
    pub fn ttft(&self) -> Option<Duration> {
        self.first_token.map(|t| t - self.sent)
    }

    /// End-to-end latency, from sending the request to the summary (or the failure).
    pub fn e2e(&self) -> Duration {
        self.ended - self.sent
    }

    /// Decode rate: tokens after the first per second between the first and the last
    /// token chunk. `None` with fewer than two chunks' worth of timing.
    pub fn decode_tokens_per_s(&self) -> Option<f64> {
        let span = (self.last_token? - self.first_token?).as_secs_f64();
        let after_first: u64 = self.itl.iter().map(|&(_, n)| u64::from(n)).sum();
        (span > 0.0 && after_first > 0).then(|| after_first as f64 / span)
    }
}

/// Calls `GenerateStream` with `request`, the API key's `authorization` entry and, when
/// given, a timeout (sent as the gRPC deadline and enforced on the client too), and times
/// it. `on_chunk` sees every chunk as it arrives.
pub async fn measure_stream(
    mut client: InferenceClient<Channel>,
    request: GenerateRequest,
    key: Option<&ApiKey>,
    timeout: Option<Duration>,
    mut on_chunk: impl FnMut(&TokenChunk),
) -> Measurement {
    let mut request = tonic::Request::new(request);
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    authorize(&mut request, key);
    let mut m = Measurement::started(Instant::now());
    let call = async {
        let mut stream = client.generate_stream(request).await?.into_inner();
        while let Some(message) = stream.message().await? {
            let now = Instant::now();
            match message.event {
                Some(generate_stream_response::Event::Chunk(chunk)) => {
                    let tokens = u32::try_from(chunk.token_ids.len()).unwrap_or(u32::MAX);
                    if tokens > 0 {
                        match m.last_token {
                            None => m.first_token = Some(now),
                            Some(previous) => m.itl.push(((now - previous) / tokens, tokens)),
                        }
                        m.last_token = Some(now);
                        m.output_tokens += u64::from(tokens);
                    }
                    on_chunk(&chunk);
                }
                Some(generate_stream_response::Event::Summary(summary)) => {
                    m.ended = now;
                    m.summary = Some(summary);
                }
                None => {}
            }
        }
        Ok::<(), tonic::Status>(())
    };
    let result = match timeout {
        Some(limit) => match tokio::time::timeout(limit, call).await {
            Ok(result) => result.map_err(CallError::Status),
            Err(_) => Err(CallError::TimedOut(limit)),
        },
        None => call.await.map_err(CallError::Status),
    };
    m.finish(result);
    m
}
