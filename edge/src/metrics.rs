//! The HTTP endpoint every Switchyard server exposes, and the label of a gRPC status code.
//!
//! ```text
//!   GET /metrics   the registry (Prometheus text exposition format)
//!   GET /healthz   200 "ok" while the process runs
//!   GET /readyz    200 "ok" once ready, 503 "starting" before (only with a [`Readiness`])
//!   anything else  404 (405 for a method other than GET)
//! ```
//!
//! The metrics themselves belong to each binary (the operator's reconciles, a frontend's
//! tokens); this module knows no metric names.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{Encoder, Registry};

/// Every gRPC status code, in code order.
pub const ALL_CODES: [tonic::Code; 17] = [
    tonic::Code::Ok,
    tonic::Code::Cancelled,
    tonic::Code::Unknown,
    tonic::Code::InvalidArgument,
    tonic::Code::DeadlineExceeded,
    tonic::Code::NotFound,
    tonic::Code::AlreadyExists,
    tonic::Code::PermissionDenied,
    tonic::Code::ResourceExhausted,
    tonic::Code::FailedPrecondition,
    tonic::Code::Aborted,
    tonic::Code::OutOfRange,
    tonic::Code::Unimplemented,
    tonic::Code::Internal,
    tonic::Code::Unavailable,
    tonic::Code::DataLoss,
    tonic::Code::Unauthenticated,
];

/// The label of a gRPC status code: its canonical name in snake case (`ok`,
/// `invalid_argument`, `resource_exhausted`, ...). Used for `requests_total{status}` and by
/// the `switchyard` CLI, so client reports and server metrics name errors alike.
pub fn status_label(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "ok",
        tonic::Code::Cancelled => "cancelled",
        tonic::Code::Unknown => "unknown",
        tonic::Code::InvalidArgument => "invalid_argument",
        tonic::Code::DeadlineExceeded => "deadline_exceeded",
        tonic::Code::NotFound => "not_found",
        tonic::Code::AlreadyExists => "already_exists",
        tonic::Code::PermissionDenied => "permission_denied",
        tonic::Code::ResourceExhausted => "resource_exhausted",
        tonic::Code::FailedPrecondition => "failed_precondition",
        tonic::Code::Aborted => "aborted",
        tonic::Code::OutOfRange => "out_of_range",
        tonic::Code::Unimplemented => "unimplemented",
        tonic::Code::Internal => "internal",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::DataLoss => "data_loss",
        tonic::Code::Unauthenticated => "unauthenticated",
    }
}

/// `registry`'s current values in the Prometheus text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("encoding to a Vec cannot fail");
    // The text encoder writes UTF-8 only (names, label values and help are Rust strings).
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the process is ready to do its job, as `/readyz` reports it. Clones share the
/// flag; it starts not ready.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Sets what `/readyz` answers from now on.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Serves `GET /metrics` (`registry` in the text exposition format), `GET /healthz`
/// (200 `ok`) and, when `readiness` is given, `GET /readyz` on `listener` until `shutdown`
/// completes; other paths are 404, other methods 405. Connections already open when
/// `shutdown` completes finish their current request.
///
/// Returns `Ok(())` once `shutdown` completes. A failed `accept` (for example, too many
/// open files) is logged and retried after a short pause rather than ending the server,
/// so no error ends it today; the `Result` leaves room for ones that should.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    readiness: Option<Readiness>,
    extra: Vec<JsonEndpoint>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let registry = registry.clone();
        let readiness = readiness.clone();
        let extra = extra.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let path = request.uri().path().to_string();
                    let get = request.method() == Method::GET;
                    let endpoint = extra.iter().find(|e| match e.body {
                        JsonBody::Now(_) => path == e.path,
                        JsonBody::Under(_) => path.starts_with(e.path),
                    });
                    let answer = match endpoint {
                        Some(JsonEndpoint {
                            body: JsonBody::Now(body),
                            ..
                        }) if get => Answer::Ready(json_response(200, body())),
                        Some(JsonEndpoint {
                            path: p,
                            body: JsonBody::Under(body),
                        }) if get => Answer::Later(body(path[p.len()..].to_string())),
                        _ => Answer::Ready(route(&request, &registry, readiness.as_ref())),
                    };
                    async move {
                        Ok::<_, Infallible>(match answer {
                            Answer::Ready(response) => response,
                            Answer::Later(body) => {
                                let (status, body) = body.await;
                                json_response(status, body)
                            }
                        })
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

/// One more read-only endpoint answering JSON (the frontends' `/demand` and
/// `/expert-load`, the operator's `/autoscaling/...`), computed per request.
#[derive(Clone)]
pub struct JsonEndpoint {
    /// The path, e.g. `/demand`; with [`JsonBody::Under`], a prefix ending in `/`.
    pub path: &'static str,
    pub body: JsonBody,
}

/// A future answer: the HTTP status and the JSON body.
pub type JsonFuture = std::pin::Pin<Box<dyn Future<Output = (u16, String)> + Send>>;

/// How a [`JsonEndpoint`] answers.
#[derive(Clone)]
pub enum JsonBody {
    /// At once, 200, for exactly the path.
    Now(Arc<dyn Fn() -> String + Send + Sync>),
    /// For every path under the prefix: from the rest of the path, asynchronously.
    Under(Arc<dyn Fn(String) -> JsonFuture + Send + Sync>),
}

impl std::fmt::Debug for JsonBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Now(_) => "JsonBody::Now",
            Self::Under(_) => "JsonBody::Under",
        })
    }
}

enum Answer {
    Ready(Response<Full<Bytes>>),
    Later(JsonFuture),
}

impl std::fmt::Debug for JsonEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonEndpoint")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn json_response(status: u16, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn route<B>(
    request: &Request<B>,
    registry: &Registry,
    readiness: Option<&Readiness>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let known =
        matches!(path, "/metrics" | "/healthz") || (path == "/readyz" && readiness.is_some());
    let (status, content_type, body): (StatusCode, &str, Vec<u8>) =
        match (request.method(), path, readiness) {
            (&Method::GET, "/metrics", _) => (
                StatusCode::OK,
                prometheus::TEXT_FORMAT,
                render(registry).into_bytes(),
            ),
            (&Method::GET, "/healthz", _) => (StatusCode::OK, "text/plain", b"ok".to_vec()),
            (&Method::GET, "/readyz", Some(r)) if r.is_ready() => {
                (StatusCode::OK, "text/plain", b"ok".to_vec())
            }
            (&Method::GET, "/readyz", Some(_)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                b"starting".to_vec(),
            ),
            _ if known => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                b"method not allowed: use GET".to_vec(),
            ),
            (_, _, None) => (
                StatusCode::NOT_FOUND,
                "text/plain",
                b"not found: try /metrics or /healthz".to_vec(),
            ),
            (_, _, Some(_)) => (
                StatusCode::NOT_FOUND,
                "text/plain",
                b"not found: try /metrics, /healthz or /readyz".to_vec(),
            ),
        };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn status_labels_cover_every_code_in_order() {
        for (i, code) in ALL_CODES.iter().enumerate() {
            assert_eq!(*code as usize, i);
        }
        assert_eq!(status_label(tonic::Code::Ok), "ok");
        assert_eq!(
            status_label(tonic::Code::ResourceExhausted),
            "resource_exhausted"
        );
    }

    async fn http_get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write request");
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .expect("read response");
        String::from_utf8(response).expect("utf-8 response")
    }

    #[tokio::test]
    async fn serves_metrics_healthz_and_404() {
        let registry = Registry::new_custom(Some("switchyard".into()), None).expect("registry");
        let generated = prometheus::IntCounter::new("generated_tokens_total", "Tokens generated")
            .expect("counter");
        registry
            .register(Box::new(generated.clone()))
            .expect("register");
        generated.inc_by(7);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, registry, None, Vec::new(), async move {
            let _ = stopped.await;
        }));

        let response = http_get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(
            response.contains("content-type: text/plain; version=0.0.4"),
            "{response}"
        );
        assert!(
            response.contains("switchyard_generated_tokens_total 7"),
            "{response}"
        );

        let response = http_get(
            addr,
            "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\nok"), "{response}");

        let response = http_get(
            addr,
            "GET /nope HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(response.starts_with("HTTP/1.1 404 "), "{response}");

        let response = http_get(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(response.starts_with("HTTP/1.1 405 "), "{response}");

        stop.send(()).expect("server still running");
        server
            .await
            .expect("server task")
            .expect("server ends cleanly");
    }

    #[tokio::test]
    async fn readyz_follows_readiness() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let readiness = Readiness::default();
        let server = tokio::spawn(serve(
            listener,
            Registry::new(),
            Some(readiness.clone()),
            Vec::new(),
            std::future::pending(),
        ));
        let get = "GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        let response = http_get(addr, get).await;
        assert!(response.starts_with("HTTP/1.1 503 "), "{response}");
        readiness.set(true);
        let response = http_get(addr, get).await;
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
        assert!(response.ends_with("\r\n\r\nok"), "{response}");
        server.abort();
    }
}
