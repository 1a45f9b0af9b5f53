//! The bench's second protocol: the same requests as streamed `POST /v1/completions`
//! over HTTP/1.1 keep-alive connections (what OpenAI clients send), timed like
//! [`super::call::measure_stream`], to compare the two APIs of one frontend.
//!
//! A minimal client on purpose: one request per connection at a time, a pool of idle
//! connections, chunked or length-delimited bodies, server-sent events. The usage chunk at
//! the end of the stream stands in for the gRPC summary.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use switchyard_proto::inference::v1::{
    FinishReason, GenerateRequest, GenerateSummary, Usage, generate_request,
};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use super::call::{CallError, Measurement};
use super::workload::ApiKey;

/// Idle keep-alive connections to one address.
#[derive(Debug)]
pub struct HttpPool {
    addr: String,
    idle: Mutex<Vec<BufReader<TcpStream>>>,
}

impl HttpPool {
    /// Connections to `addr` (`host:port`), made as needed.
    pub fn new(addr: &str) -> Self {
        Self {
            addr: addr.to_string(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// An idle connection (`true`: reused) or a new one.
    async fn take(&self) -> std::io::Result<(BufReader<TcpStream>, bool)> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        match idle {
            Some(c) => Ok((c, true)),
            None => Ok((self.connect().await?, false)),
        }
    }

    async fn connect(&self) -> std::io::Result<BufReader<TcpStream>> {
        let stream = TcpStream::connect(&self.addr).await?;
        stream.set_nodelay(true)?;
        Ok(BufReader::new(stream))
    }

    fn give_back(&self, c: BufReader<TcpStream>) {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(c);
    }
}

/// The request as `/v1/completions` JSON: token ids as the prompt, the same sampling.
fn body(request: &GenerateRequest) -> serde_json::Value {
    let prompt = match &request.input {
        Some(generate_request::Input::TokenIds(t)) => serde_json::json!(t.ids),
        Some(generate_request::Input::Prompt(p)) => serde_json::json!(p),
        _ => serde_json::json!(""),
    };
    let s = request.sampling.clone().unwrap_or_default();
    let mut body = serde_json::json!({
        "model": request.model,
        "prompt": prompt,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": s.ignore_eos,
    });
    for (field, value) in [
        ("max_tokens", s.max_tokens.map(serde_json::Value::from)),
        ("temperature", s.temperature.map(serde_json::Value::from)),
        ("top_p", s.top_p.map(serde_json::Value::from)),
        ("seed", s.seed.map(serde_json::Value::from)),
    ] {
        if let Some(v) = value {
            body[field] = v;
        }
    }
    body
}

/// The gRPC code an HTTP status stands for, as the bench reports errors.
fn code_of(status: u16) -> tonic::Code {
    match status {
        400 => tonic::Code::InvalidArgument,
        401 => tonic::Code::Unauthenticated,
        403 => tonic::Code::PermissionDenied,
        404 => tonic::Code::NotFound,
        429 => tonic::Code::ResourceExhausted,
        503 => tonic::Code::Unavailable,
        504 => tonic::Code::DeadlineExceeded,
        _ => tonic::Code::Internal,
    }
}

/// Streams `request` as `POST /v1/completions` and times it; `on_tokens` sees each event's
/// token count (one per event: the server sends an event per generated token).
pub async fn measure_completion(
    pool: &HttpPool,
    request: GenerateRequest,
    key: Option<&ApiKey>,
    timeout: Option<Duration>,
    mut on_tokens: impl FnMut(u64),
) -> Measurement {
    let mut m = Measurement::started(Instant::now());
    let call = exchange(pool, &request, key, &mut m, &mut on_tokens);
    let result = match timeout {
        Some(limit) => match tokio::time::timeout(limit, call).await {
            Ok(r) => r,
            Err(_) => Err(CallError::TimedOut(limit)),
        },
        None => call.await,
    };
    m.finish(result);
    m
}

async fn exchange(
    pool: &HttpPool,
    request: &GenerateRequest,
    key: Option<&ApiKey>,
    m: &mut Measurement,
    on_tokens: &mut impl FnMut(u64),
) -> Result<(), CallError> {
    let io = |e: std::io::Error| CallError::Status(tonic::Status::unavailable(e.to_string()));
    let (mut conn, mut reused) = pool.take().await.map_err(io)?;
    let payload = body(request).to_string();
    let auth = key
        .map(|k| format!("Authorization: {}\r\n", k.header()))
        .unwrap_or_default();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Accept: text/event-stream\r\n{auth}Content-Length: {}\r\n\r\n",
        pool.addr,
        payload.len()
    );
    let message = format!("{head}{payload}");
    // Status line and headers.
    let mut line = String::new();
    loop {
        let sent = conn.get_mut().write_all(message.as_bytes()).await;
        let read = match sent {
            Ok(()) => conn.read_line(&mut line).await,
            Err(e) => Err(e),
        };
        match read {
            Ok(n) if n > 0 => break,
            // A kept-alive connection the server closed while it was idle (llama-server
            // closes after every streamed response, though it answers `Keep-Alive`): the
            // request never reached it, so it goes once more on a new connection.
            _ if reused => {
                conn = pool.connect().await.map_err(io)?;
                reused = false;
            }
            Ok(_) => return Err(io(std::io::ErrorKind::UnexpectedEof.into())),
            Err(e) => return Err(io(e)),
        }
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io(std::io::Error::other(format!("bad status line {line:?}"))))?;
    let (mut chunked, mut length, mut close) = (false, None, false);
    loop {
        line.clear();
        conn.read_line(&mut line).await.map_err(io)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            match name.as_str() {
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "content-length" => length = value.parse::<usize>().ok(),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
    }
    let mut events = Events::default();
    let mut error = None;
    let mut feed = |bytes: &[u8], m: &mut Measurement| {
        for event in events.push(bytes) {
            handle(&event, m, on_tokens, &mut error);
        }
    };
    if chunked {
        loop {
            line.clear();
            conn.read_line(&mut line).await.map_err(io)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|e| io(std::io::Error::other(format!("chunk size {line:?}: {e}"))))?;
            if size == 0 {
                line.clear();
                conn.read_line(&mut line).await.map_err(io)?;
                break;
            }
            let mut chunk = vec![0; size + 2];
            conn.read_exact(&mut chunk).await.map_err(io)?;
            feed(&chunk[..size], m);
        }
    } else if let Some(n) = length {
        let mut all = vec![0; n];
        conn.read_exact(&mut all).await.map_err(io)?;
        feed(&all, m);
    }
    if status == 200 && !close {
        pool.give_back(conn);
    }
    if status != 200 {
        let text = events.rest();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        return Err(CallError::Status(tonic::Status::new(
            code_of(status),
            message,
        )));
    }
    match error {
        Some(status) => Err(CallError::Status(status)),
        None => Ok(()),
    }
}

/// What one event of the stream does to the measurement.
fn handle(
    data: &str,
    m: &mut Measurement,
    on_tokens: &mut impl FnMut(u64),
    error: &mut Option<tonic::Status>,
) {
    let now = Instant::now();
    if data == "[DONE]" {
        return;
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
        return;
    };
    if let Some(message) = v["error"]["message"].as_str() {
        let code = match v["error"]["code"].as_str() {
            Some("timeout") => tonic::Code::DeadlineExceeded,
            Some("overloaded") => tonic::Code::Unavailable,
            _ => tonic::Code::Internal,
        };
        *error = Some(tonic::Status::new(code, message));
        m.ended = now;
        return;
    }
    if let Some(choice) = v["choices"].as_array().and_then(|c| c.first()) {
        match choice["finish_reason"].as_str() {
            // A token's event (a token whose text is still incomplete UTF-8 has none:
            // the usage chunk's count is the exact one).
            None => {
                match m.last_token {
                    None => m.first_token = Some(now),
                    Some(previous) => m.itl.push((now - previous, 1)),
                }
                m.last_token = Some(now);
                on_tokens(1);
            }
            Some(reason) => {
                let f = if reason == "length" {
                    FinishReason::Length
                } else {
                    FinishReason::Stop
                };
                m.summary
                    .get_or_insert_with(GenerateSummary::default)
                    .finish_reason = f as i32;
            }
        }
    }
    if let Some(usage) = v.get("usage").filter(|u| !u.is_null()) {
        let n = |field: &str| u32::try_from(usage[field].as_u64().unwrap_or(0)).unwrap_or(0);
        let summary = m.summary.get_or_insert_with(GenerateSummary::default);
        summary.usage = Some(Usage {
            prompt_tokens: n("prompt_tokens"),
            cached_prompt_tokens: u32::try_from(
                usage["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0),
            )
            .unwrap_or(0),
            completion_tokens: n("completion_tokens"),
        });
        m.output_tokens = u64::from(n("completion_tokens"));
        m.ended = now;
    }
}

/// Splits a server-sent event stream into the `data:` payloads of whole events.
#[derive(Debug, Default)]
struct Events {
    buffer: Vec<u8>,
}

impl Events {
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                if let Some(data) = line.strip_prefix("data:") {
                    out.push(data.trim().to_string());
                }
            }
        }
        out
    }

    /// What is left that is not a whole event (an error body).
    fn rest(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.buffer)).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads() {
        let mut e = Events::default();
        assert!(e.push(b"data: {\"a\"").is_empty());
        assert_eq!(
            e.push(b": 1}\n\ndata: [DONE]\n\n"),
            ["{\"a\": 1}", "[DONE]"]
        );
    }

    #[test]
    fn the_usage_chunk_makes_the_summary() {
        let mut m = Measurement::started(Instant::now());
        let (mut n, mut error) = (0, None);
        for data in [
            r#"{"choices":[{"text":"a","index":0}]}"#,
            r#"{"choices":[{"text":"","index":0,"finish_reason":"length"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":8}}}"#,
            "[DONE]",
        ] {
            handle(data, &mut m, &mut |k| n += k, &mut error);
        }
        let s = m.summary.expect("summary");
        assert_eq!(s.finish_reason, FinishReason::Length as i32);
        assert_eq!(
            s.usage,
            Some(Usage {
                prompt_tokens: 9,
                cached_prompt_tokens: 8,
                completion_tokens: 2
            })
        );
        assert_eq!((m.output_tokens, n), (2, 1));
        assert!(error.is_none());
    }

    /// A server that answers one streamed completion per connection and then closes it,
    /// though it says `Keep-Alive` (what llama-server does): every request must still
    /// succeed, the reused connection's failure retried on a new one.
    #[tokio::test]
    async fn a_server_closing_kept_alive_connections_fails_no_request() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut socket = BufReader::new(socket);
                let mut length = 0;
                let mut line = String::new();
                loop {
                    line.clear();
                    socket.read_line(&mut line).await.unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line.trim_end().is_empty() {
                        break;
                    }
                }
                let mut body = vec![0; length];
                socket.read_exact(&mut body).await.unwrap();
                let events = concat!(
                    "data: {\"choices\":[{\"text\":\"a\",\"finish_reason\":null}]}\n\n",
                    "data: {\"choices\":[{\"text\":\"\",\"finish_reason\":\"length\"}],",
                    "\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\n\n",
                    "data: [DONE]\n\n"
                );
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                     Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n\
                     {:x}\r\n{events}\r\n0\r\n\r\n",
                    events.len()
                );
                socket.get_mut().write_all(reply.as_bytes()).await.unwrap();
                // Dropped: closed after one response.
            }
        });
        let pool = HttpPool::new(&addr);
        let request = GenerateRequest {
            input: Some(generate_request::Input::TokenIds(
                switchyard_proto::inference::v1::TokenIds { ids: vec![1, 2] },
            )),
            ..Default::default()
        };
        for _ in 0..3 {
            let m = measure_completion(&pool, request.clone(), None, None, |_| {}).await;
            assert!(m.result.is_ok(), "{:?}", m.result);
            assert_eq!(m.output_tokens, 1);
            // Let the server's close arrive before the connection is reused.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
