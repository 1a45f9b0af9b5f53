//! Client-side calls to a worker's standard endpoints (health, reflection), shared by the
//! `switchyard` CLI and the tests.

use std::time::Duration;

use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// Why a call to a worker failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0:?} is not a valid address: expected a URI like http://127.0.0.1:50051")]
    Address(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{call} failed: {source}")]
    Call {
        call: &'static str,
        #[source]
        source: tonic::Status,
    },
    #[error("the server's reflection service answered a list request with something else")]
    UnexpectedReflectionAnswer,
}

/// How often an HTTP/2 ping checks the connection, and how long its answer may take.
/// Behind a Kubernetes Service, a connection made to a pod just before it goes away can
/// outlive the pod: its IP vanishes without a reset, and every call on it would wait for
/// its deadline. With pings, such a connection is found dead within about 15 s and the
/// channel connects again (to a live pod).
pub const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(5));

/// How long one attempt to connect may take, the first and every reconnect after. Without
/// it an attempt whose packets go nowhere (an address whose pod is gone: no reset comes)
/// waits for the kernel to give up, about two minutes of SYN retries, and every call
/// queued on the channel waits with it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `addr` (`http://host:port`), with HTTP/2 keepalive pings ([`KEEPALIVE`])
/// and at most [`CONNECT_TIMEOUT`] per attempt to connect.
pub async fn connect(addr: &str) -> Result<Channel, ClientError> {
    connect_within(addr, CONNECT_TIMEOUT).await
}

/// [`connect`], each attempt to connect bounded by `connect_timeout`.
pub async fn connect_within(addr: &str, connect_timeout: Duration) -> Result<Channel, ClientError> {
    let endpoint =
        Channel::from_shared(addr.to_string()).map_err(|_| ClientError::Address(addr.into()))?;
    endpoint
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(KEEPALIVE.0)
        .keep_alive_timeout(KEEPALIVE.1)
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        })
}

/// `grpc.health.v1.Health/Check` for `service` ("" = the whole server).
pub async fn health(channel: Channel, service: &str) -> Result<ServingStatus, ClientError> {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|source| ClientError::Call {
            call: "grpc.health.v1.Health/Check",
            source,
        })?;
    Ok(response.into_inner().status())
}

/// The services the server advertises through `grpc.reflection.v1`, sorted.
pub async fn list_services(channel: Channel) -> Result<Vec<String>, ClientError> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let call = "grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::once(request))
        .await
        .map_err(|source| ClientError::Call { call, source })?
        .into_inner();
    let answer = responses
        .message()
        .await
        .map_err(|source| ClientError::Call { call, source })?
        .and_then(|r| r.message_response);
    match answer {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            Ok(names)
        }
        Some(MessageResponse::ErrorResponse(e)) => Err(ClientError::Call {
            call,
            source: tonic::Status::new(tonic::Code::from(e.error_code), e.error_message),
        }),
        _ => Err(ClientError::UnexpectedReflectionAnswer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener whose accept queue is full drops every further SYN: on loopback, the
    /// same black hole as an address whose pod is gone. The attempt gives up after the
    /// connect timeout instead of the kernel's two minutes.
    #[tokio::test]
    async fn an_attempt_to_connect_that_gets_no_answer_ends_at_the_connect_timeout() {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let addr = socket.local_addr().expect("addr");
        let listener = socket.listen(0).expect("listen");
        // Fill the accept queue (never accepted); the next SYNs are dropped.
        let mut held = Vec::new();
        for _ in 0..2 {
            if let Ok(Ok(c)) = tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                held.push(c);
            }
        }
        assert!(!held.is_empty(), "no connection was queued");
        let result = tokio::time::timeout(
            Duration::from_secs(20),
            connect_within(&format!("http://{addr}"), Duration::from_millis(300)),
        )
        .await
        .expect("the attempt ended on its own, not at the test's 20 s");
        let err = result.expect_err("nothing accepted the connection");
        assert!(
            matches!(err, ClientError::Connect { .. }),
            "a connect error: {err}"
        );
        drop(listener);
    }
}
