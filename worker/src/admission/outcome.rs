//! How a call ended, counted exactly once, by one layer.
//!
//! [`CountOutcome`] is the outermost admission layer. It opens the call's record ([`Call`],
//! in the request's extensions) and counts the call when it ends:
//!
//! ```text
//!  response headers carry grpc-status (a refusal, "trailers-only") ─┐
//!  the body's trailers carry grpc-status (a reply, a stream's end) ─┼─> count once:
//!  the call or its body is dropped first (the client went away) ────┘   status, outcome
//! ```
//!
//! It counts the status in `switchyard_requests_total{status}` (through a
//! [`StatusCounter`]) and, for the RPCs whose [`Policy`] says so, the tenant's [`Outcome`]
//! in `switchyard_admission_requests_total`. No handler counts anything itself.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::Frame;
use tonic::body::Body;
use tonic::{Code, Status};

use super::Admission;
use super::identity::Caller;
use super::pipeline::Policy;

/// How a request ended, counted once per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A summary was sent.
    Completed,
    /// Over quota (`RESOURCE_EXHAUSTED`).
    Rejected,
    /// No or unknown API key (`UNAUTHENTICATED`).
    Unauthenticated,
    /// A field out of range (`INVALID_ARGUMENT`, `NOT_FOUND` for the model).
    Invalid,
    /// Overload: the queue was full, or the request was evicted for a higher band
    /// (`UNAVAILABLE` with pushback).
    Shed,
    /// Its deadline passed, queued or running (`DEADLINE_EXCEEDED`).
    Expired,
    /// The client went away.
    Cancelled,
    /// The server failed it (`INTERNAL`, or `UNAVAILABLE` from missing experts).
    Failed,
}

impl Outcome {
    /// Every outcome, for metrics.
    pub const ALL: [Outcome; 8] = [
        Outcome::Completed,
        Outcome::Rejected,
        Outcome::Unauthenticated,
        Outcome::Invalid,
        Outcome::Shed,
        Outcome::Expired,
        Outcome::Cancelled,
        Outcome::Failed,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Rejected => "rejected",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Invalid => "invalid",
            Outcome::Shed => "shed",
            Outcome::Expired => "expired",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "failed",
        }
    }

    /// The outcome a final status code means, unless the call noted a more precise one
    /// ([`Call::refuse`]: a shed request is `UNAVAILABLE`, as a failed one is).
    pub fn of_code(code: Code) -> Self {
        match code {
            Code::Ok => Outcome::Completed,
            Code::Cancelled => Outcome::Cancelled,
            Code::DeadlineExceeded => Outcome::Expired,
            Code::InvalidArgument | Code::NotFound | Code::OutOfRange => Outcome::Invalid,
            Code::Unauthenticated => Outcome::Unauthenticated,
            Code::ResourceExhausted => Outcome::Rejected,
            _ => Outcome::Failed,
        }
    }
}

/// A refusal: the status to answer with (metadata included) and how it is counted.
#[derive(Debug)]
pub struct Rejection {
    /// The status, with `grpc-retry-pushback-ms`, `retry-after` and quota metadata where
    /// they apply.
    pub status: Status,
    /// How the request is counted.
    pub outcome: Outcome,
}

/// One call's record, shared through the request's extensions by the admission layers,
/// `admit` and the handler: who is calling (once identified), and how the call ended where
/// its status alone does not say.
#[derive(Debug, Clone, Default)]
pub struct Call(Arc<CallRecord>);

#[derive(Debug, Default)]
struct CallRecord {
    caller: OnceLock<Caller>,
    outcome: Mutex<Option<Outcome>>,
}

impl Call {
    /// The record of the call `extensions` belong to, opened by [`CountOutcome`]. Missing
    /// only if the service is served without the admission layers, which is a bug.
    pub fn of(extensions: &http::Extensions) -> Result<Call, Status> {
        extensions.get::<Call>().cloned().ok_or_else(|| {
            Status::internal("the call did not pass admission (the service is served without it)")
        })
    }

    /// The identified caller; `None` before identification, or when it refused the call.
    pub fn caller(&self) -> Option<&Caller> {
        self.0.caller.get()
    }

    /// The caller identified, as the request's extensions also carry it.
    pub(crate) fn identified(&self, caller: Caller) {
        let _ = self.0.caller.set(caller);
    }

    /// The status to answer `rejection` with; its outcome is noted for the count.
    pub fn refuse(&self, rejection: Rejection) -> Status {
        *self.lock() = Some(rejection.outcome);
        rejection.status
    }

    /// The outcome noted by a refusal, if any.
    pub(crate) fn noted(&self) -> Option<Outcome> {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Outcome>> {
        self.0
            .outcome
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Where the outcome layer counts every call's final status
/// (`switchyard_requests_total{status}` on a frontend).
pub trait StatusCounter: Send + Sync + 'static {
    /// Counts one finished call with its final status.
    fn count_status(&self, code: Code);
}

/// Counts one call once: at its final status, or as cancelled when dropped first.
struct Tally {
    call: Call,
    policy: Policy,
    counter: Arc<dyn StatusCounter>,
    admission: Arc<Admission>,
    /// The client's deadline (`grpc-timeout`), if it set one.
    deadline: Option<Instant>,
    counted: bool,
}

impl Tally {
    /// `ended`: the final status code; `None` when the call was dropped before it — by its
    /// client going away (`CANCELLED`), or at its deadline (`DEADLINE_EXCEEDED`, expired:
    /// the client's timer or the server's `grpc-timeout` ended it).
    fn count(&mut self, ended: Option<Code>) {
        if std::mem::replace(&mut self.counted, true) {
            return;
        }
        let dropped = || match self.deadline {
            Some(d) if Instant::now() + DEADLINE_SLACK >= d => Code::DeadlineExceeded,
            _ => Code::Cancelled,
        };
        let code = ended.unwrap_or_else(dropped);
        self.counter.count_status(code);
        if self.policy.counts_outcome {
            let noted = self.call.noted();
            let outcome = match ended {
                None => Outcome::of_code(code),
                Some(code) => noted.unwrap_or(Outcome::of_code(code)),
            };
            // Expired without a refusal: it was admitted to run, and ran out of time.
            if outcome == Outcome::Expired && noted.is_none() {
                self.admission.record_deadline_miss();
            }
            self.admission.record(self.call.caller(), outcome);
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.count(None);
    }
}

/// A `grpc-timeout` header value (`<digits><unit>`, the gRPC wire format) as a duration.
pub fn grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A call dropped this close to its deadline, or after it, went away because of it: the
/// client's timer and the server's run on either side of the same transit time.
const DEADLINE_SLACK: Duration = Duration::from_millis(10);

/// How long before a call's deadline the outcome layer answers `DEADLINE_EXCEEDED` for a
/// reply that is not ready, so that it answers before tonic's `grpc-timeout` timer does.
pub(super) const REPLY_MARGIN: Duration = Duration::from_millis(5);

/// The final status a response's headers or trailers carry, if they carry one.
fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(value.trim().parse().ok()?))
}

/// The layer that makes [`CountOutcome`] services.
#[derive(Clone)]
pub struct CountOutcomeLayer {
    admission: Arc<Admission>,
    counter: Arc<dyn StatusCounter>,
}

impl std::fmt::Debug for CountOutcomeLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountOutcomeLayer").finish_non_exhaustive()
    }
}

impl CountOutcomeLayer {
    /// Counts statuses into `counter` and tenants' outcomes into `admission`'s metrics.
    pub fn new(admission: Arc<Admission>, counter: Arc<dyn StatusCounter>) -> Self {
        Self { admission, counter }
    }
}

impl<S> tower::Layer<S> for CountOutcomeLayer {
    type Service = CountOutcome<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CountOutcome {
            inner,
            admission: self.admission.clone(),
            counter: self.counter.clone(),
        }
    }
}

/// Opens each call's [`Call`] record and counts the call once when it ends.
#[derive(Clone)]
pub struct CountOutcome<S> {
    inner: S,
    admission: Arc<Admission>,
    counter: Arc<dyn StatusCounter>,
}

impl<S> std::fmt::Debug for CountOutcome<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountOutcome").finish_non_exhaustive()
    }
}

/// A boxed response future, as every admission layer returns.
pub type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for CountOutcome<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let call = Call::default();
        request.extensions_mut().insert(call.clone());
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| grpc_timeout(v.to_str().ok()?))
            .and_then(|t| Instant::now().checked_add(t));
        let mut tally = Tally {
            call,
            policy: Policy::of(request.uri().path()),
            counter: self.counter.clone(),
            admission: self.admission.clone(),
            deadline,
            counted: false,
        };
        let response = self.inner.call(request);
        // Answer DEADLINE_EXCEEDED ourselves just before the deadline, as the proto says:
        // tonic's own `grpc-timeout` timer, a little later, would answer CANCELLED.
        let reply_by = deadline.map(|d| d.checked_sub(REPLY_MARGIN).unwrap_or(d));
        // Dropped before the response (a unary call whose client went away): the tally's
        // drop counts it cancelled (or expired, at its deadline).
        Box::pin(async move {
            let response = match reply_by {
                None => response.await?,
                Some(at) => match tokio::time::timeout_at(at.into(), response).await {
                    Ok(response) => response?,
                    Err(_) => {
                        tally.count(Some(Code::DeadlineExceeded));
                        return Ok(Status::deadline_exceeded(
                            "the deadline passed before the request finished",
                        )
                        .into_http());
                    }
                },
            };
            let response = conform(response);
            Ok::<_, Infallible>(match grpc_status(response.headers()) {
                Some(code) => {
                    tally.count(Some(code));
                    response
                }
                None => response.map(|body| Body::new(CountedBody { inner: body, tally })),
            })
        })
    }
}

/// Keeps a refusal made by the transport, before any handler ran, within the protocol's
/// list of status codes: a request body that does not decode (a string that is not
/// UTF-8, a malformed message: tonic answers `INTERNAL`) or is over the size limit (tonic
/// answers `OUT_OF_RANGE`) is the client's error, `INVALID_ARGUMENT` naming the request.
/// No handler answers either code itself, so nothing else is rewritten.
fn conform(response: http::Response<Body>) -> http::Response<Body> {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    let message = status.message();
    let fix = match status.code() {
        Code::OutOfRange => {
            format!("request: the message is too large ({message}); send a shorter prompt")
        }
        Code::Internal if message.starts_with("failed to decode Protobuf message") => {
            format!("request: not a valid message: {message}")
        }
        _ => return response,
    };
    Status::invalid_argument(fix).into_http()
}

/// A response body that counts its call at its trailers, or as cancelled when dropped
/// before them (a stream whose client went away).
struct CountedBody {
    inner: Body,
    tally: Tally,
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = grpc_status(trailers).unwrap_or(Code::Unknown);
                    self.tally.count(Some(code));
                }
            }
            Poll::Ready(Some(Err(status))) => {
                let code = status.code();
                self.tally.count(Some(code));
            }
            // Ended without trailers: not a gRPC reply.
            Poll::Ready(None) => self.tally.count(Some(Code::Unknown)),
            Poll::Pending => {}
        }
        polled
    }

    // Never reports its end early: `tonic::body::Body::new` would drop an empty body, and
    // with it the tally, at once.
    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
