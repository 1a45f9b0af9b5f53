//! Tier 4 (first step): real gRPC over loopback — the worker's standard endpoints, and the
//! generated client and server code of both contracts talking to each other.

use std::net::SocketAddr;
use std::pin::Pin;

use futures::Stream;
use switchyard_cli::client;
use switchyard_proto::expert::v1 as expert;
use switchyard_proto::inference::v1 as inference;
use switchyard_worker::server::{self, Role};
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;

/// Starts a worker of `role` on a free loopback port; returns its address, a shutdown
/// trigger and the server task.
async fn start_worker(
    role: Role,
) -> (
    String,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), server::ServerError>>,
) {
    let listener = server::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server::serve(
        role,
        listener,
        None,
        server::ServeOptions {
            drain: server::DrainArgs { seconds: 0 },
            ..Default::default()
        },
        async {
            let _ = stopped.await;
        },
    ));
    (addr, stop, task)
}

#[tokio::test]
async fn both_roles_answer_health_checks_and_reflection() {
    for role in [Role::Frontend, Role::ExpertShard] {
        let (addr, stop, task) = start_worker(role).await;
        let channel = client::connect(&addr).await.unwrap();

        // Liveness: the process is up.
        assert_eq!(
            client::health(channel.clone(), "").await.unwrap(),
            ServingStatus::Serving,
            "{role}"
        );
        // Readiness: no engine has loaded a model, so the role's service is not serving.
        assert_eq!(
            client::health(channel.clone(), role.service_name())
                .await
                .unwrap(),
            ServingStatus::NotServing,
            "{role}"
        );
        // Unknown service names are NOT_FOUND, per the health protocol.
        match client::health(channel.clone(), "no.such.Service").await {
            Err(client::ClientError::Call { source, .. }) => {
                assert_eq!(source.code(), tonic::Code::NotFound, "{role}: {source}")
            }
            other => panic!("{role}: expected NOT_FOUND, got {other:?}"),
        }

        // Reflection advertises exactly what is served.
        assert_eq!(
            client::list_services(channel.clone()).await.unwrap(),
            [
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ],
            "{role}"
        );
        // ... and still hands out the schema of the Switchyard contracts.
        let files = file_containing_symbol(channel, role.service_name()).await;
        assert!(
            files
                .iter()
                .any(|f| f.contains(role.service_name().rsplit('.').next().unwrap())),
            "{role}: no descriptor for {} in {files:?}",
            role.service_name()
        );

        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
    }
}

/// Asks reflection v1 for the file defining `symbol`; returns the decoded files' names and
/// service names.
async fn file_containing_symbol(channel: tonic::transport::Channel, symbol: &str) -> Vec<String> {
    use prost::Message;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.to_string())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    files
        .file_descriptor_proto
        .iter()
        .map(|bytes| {
            let file = prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap();
            let services: Vec<_> = file.service.iter().filter_map(|s| s.name.clone()).collect();
            format!("{} {services:?}", file.name.unwrap_or_default())
        })
        .collect()
}

/// A stand-in frontend that "generates" the prompt reversed, one character per token: it
/// exercises the generated server traits and clients, not inference.
#[derive(Debug)]
struct ReversingFrontend;

fn prompt_of(request: &inference::GenerateRequest) -> Result<String, Status> {
    match &request.input {
        Some(inference::generate_request::Input::Prompt(p)) => Ok(p.clone()),
        _ => Err(Status::invalid_argument(
            "input: only `prompt` is supported here",
        )),
    }
}

fn summary(completion_tokens: u32) -> inference::GenerateSummary {
    inference::GenerateSummary {
        finish_reason: inference::FinishReason::Stop as i32,
        usage: Some(inference::Usage {
            prompt_tokens: completion_tokens,
            cached_prompt_tokens: 0,
            completion_tokens,
        }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl inference::inference_server::Inference for ReversingFrontend {
    async fn generate(
        &self,
        request: Request<inference::GenerateRequest>,
    ) -> Result<Response<inference::GenerateResponse>, Status> {
        let prompt = prompt_of(request.get_ref())?;
        let text: String = prompt.chars().rev().collect();
        let token_ids = text.chars().map(u32::from).collect();
        Ok(Response::new(inference::GenerateResponse {
            summary: Some(summary(prompt.chars().count() as u32)),
            text,
            token_ids,
        }))
    }

    type GenerateStreamStream =
        Pin<Box<dyn Stream<Item = Result<inference::GenerateStreamResponse, Status>> + Send>>;

    async fn generate_stream(
        &self,
        request: Request<inference::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        use inference::generate_stream_response::Event;
        let prompt = prompt_of(request.get_ref())?;
        let n = prompt.chars().count() as u32;
        let mut events: Vec<_> = prompt
            .chars()
            .rev()
            .enumerate()
            .map(|(i, c)| {
                Ok(inference::GenerateStreamResponse {
                    event: Some(Event::Chunk(inference::TokenChunk {
                        text: c.to_string(),
                        token_ids: vec![u32::from(c)],
                        index: i as u32,
                    })),
                })
            })
            .collect();
        events.push(Ok(inference::GenerateStreamResponse {
            event: Some(Event::Summary(summary(n))),
        }));
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    async fn tokenize(
        &self,
        _: Request<inference::TokenizeRequest>,
    ) -> Result<Response<inference::TokenizeResponse>, Status> {
        Err(Status::unimplemented("not in this stand-in"))
    }

    async fn list_models(
        &self,
        _: Request<inference::ListModelsRequest>,
    ) -> Result<Response<inference::ListModelsResponse>, Status> {
        Ok(Response::new(inference::ListModelsResponse {
            models: vec![inference::ModelInfo {
                id: "tiny-moe".into(),
                model_type: "mixtral".into(),
                num_experts: 8,
                experts_per_token: 2,
                ..Default::default()
            }],
        }))
    }
}

/// A stand-in shard whose every expert is the identity: each output row is its input row
/// times the sum of the row's routing weights (f32 only).
#[derive(Debug)]
struct IdentityShard;

#[tonic::async_trait]
impl expert::expert_shard_server::ExpertShard for IdentityShard {
    async fn forward(
        &self,
        request: Request<expert::ForwardRequest>,
    ) -> Result<Response<expert::ForwardResponse>, Status> {
        let request = request.into_inner();
        let hidden = request
            .hidden
            .ok_or_else(|| Status::invalid_argument("hidden: required"))?;
        let [rows, width] = hidden.shape[..] else {
            return Err(Status::invalid_argument(
                "hidden.shape: expected [rows, hidden]",
            ));
        };
        if request.routes.len() as u64 != rows {
            return Err(Status::invalid_argument("routes: one entry per row"));
        }
        let values: Vec<f32> = hidden
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut out = Vec::with_capacity(hidden.data.len());
        for (row, routes) in values.chunks(width as usize).zip(&request.routes) {
            let scale: f32 = routes.routes.iter().map(|r| r.weight).sum();
            for v in row {
                out.extend_from_slice(&(v * scale).to_le_bytes());
            }
        }
        Ok(Response::new(expert::ForwardResponse {
            output: Some(expert::Tensor {
                data: out.into(),
                ..hidden
            }),
            compute_time_us: None,
        }))
    }

    async fn describe(
        &self,
        _: Request<expert::DescribeRequest>,
    ) -> Result<Response<expert::DescribeResponse>, Status> {
        Err(Status::unimplemented("not in this stand-in"))
    }
}

#[tokio::test]
async fn generated_clients_and_servers_of_both_contracts_interoperate() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(inference::inference_server::InferenceServer::new(
                ReversingFrontend,
            ))
            .add_service(expert::expert_shard_server::ExpertShardServer::new(
                IdentityShard,
            ))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );
    let channel = client::connect(&addr).await.unwrap();

    let mut frontend = inference::inference_client::InferenceClient::new(channel.clone());
    let request = inference::GenerateRequest {
        input: Some(inference::generate_request::Input::Prompt("abc".into())),
        ..Default::default()
    };
    let unary = frontend
        .generate(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unary.text, "cba");
    assert_eq!(unary.token_ids, [99, 98, 97]);
    let summary = unary.summary.unwrap();
    assert_eq!(summary.finish_reason(), inference::FinishReason::Stop);
    assert_eq!(summary.usage.unwrap().completion_tokens, 3);

    let mut stream = frontend
        .generate_stream(request)
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    let mut finished = None;
    while let Some(message) = stream.message().await.unwrap() {
        match message.event.unwrap() {
            inference::generate_stream_response::Event::Chunk(chunk) => {
                assert!(finished.is_none(), "a chunk after the summary");
                text.push_str(&chunk.text);
            }
            inference::generate_stream_response::Event::Summary(s) => finished = Some(s),
        }
    }
    assert_eq!(text, "cba");
    assert_eq!(
        finished.unwrap().finish_reason(),
        inference::FinishReason::Stop
    );

    let bad = frontend
        .generate(inference::GenerateRequest::default())
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        frontend
            .list_models(inference::ListModelsRequest {})
            .await
            .unwrap()
            .into_inner()
            .models[0]
            .id,
        "tiny-moe"
    );

    let mut shard = expert::expert_shard_client::ExpertShardClient::new(channel);
    let rows: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0];
    let response = shard
        .forward(expert::ForwardRequest {
            model: None,
            layer: 1,
            hidden: Some(expert::Tensor {
                dtype: expert::Dtype::F32 as i32,
                shape: vec![2, 2],
                data: rows
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>()
                    .into(),
            }),
            routes: vec![
                expert::RowRoutes {
                    routes: vec![expert::ExpertRoute {
                        expert: 0,
                        weight: 0.5,
                    }],
                },
                expert::RowRoutes {
                    routes: vec![
                        expert::ExpertRoute {
                            expert: 1,
                            weight: 0.25,
                        },
                        expert::ExpertRoute {
                            expert: 3,
                            weight: 0.75,
                        },
                    ],
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let output = response.output.unwrap();
    assert_eq!(output.shape, [2, 2]);
    let values: Vec<f32> = output
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(values, [0.5, 1.0, 3.0, 4.0]);

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
