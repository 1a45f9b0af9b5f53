//! Tier 4: a worker's life as the kubelet sees it, with real processes on loopback.
//!
//! Readiness means "can serve": a frontend whose expert shard is gone reports NOT_SERVING
//! on its readiness key (the gRPC health protocol the kubelet's probe speaks) and SERVING
//! again when the shard returns; one that gave up waiting for its shards at start-up does
//! not claim SERVING. SIGTERM drains: NOT_SERVING at once, in-flight streams run to their
//! end, the process exits 0; a stream still running when the drain budget is spent ends
//! with UNAVAILABLE saying why, not a cut connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_cli::client;
use switchyard_proto::inference::v1::{
    self as pb, generate_stream_response::Event, inference_client::InferenceClient,
};
use switchyard_tests::process::free_port;
use switchyard_tests::worker::fixture_model;
use switchyard_tests::{FrontendProcess, ShardProcess};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

const INFERENCE: &str = "switchyard.v1.Inference";

async fn channel(frontend: &FrontendProcess) -> Channel {
    Channel::from_shared(frontend.endpoint())
        .unwrap()
        .connect()
        .await
        .expect("connect to the frontend")
}

/// Polls the frontend's readiness key until it is `want`, or panics after `within`.
async fn wait_health(
    channel: &Channel,
    want: ServingStatus,
    within: Duration,
    what: &str,
) -> Duration {
    let started = Instant::now();
    loop {
        let got = client::health(channel.clone(), INFERENCE).await;
        if matches!(&got, Ok(s) if *s == want) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{what}: readiness still {got:?} after {within:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn greedy(max_tokens: u32) -> pb::GenerateRequest {
    switchyard_tests::worker::greedy_request("The quick brown fox", max_tokens)
}

/// A frontend whose routed experts are on one shard that takes `delay_ms` per call: each
/// token then takes about two calls' time (the fixture has two MoE layers), so a stream
/// is long enough to be in flight when the frontend is told to stop.
async fn slow_pair(delay_ms: u64, frontend_flags: &[&str]) -> (ShardProcess, FrontendProcess) {
    let model = fixture_model("qwen3_moe");
    let shard = ShardProcess::start(&model, &["--debug-forward-delay-ms", &delay_ms.to_string()])
        .await
        .expect("shard");
    let address = shard.address();
    let mut flags = vec!["--expert-shards", address.as_str()];
    flags.extend_from_slice(frontend_flags);
    let frontend = FrontendProcess::start(&model, &flags)
        .await
        .expect("frontend");
    (shard, frontend)
}

/// Runs a stream of `max_tokens`, calling `at_token` once when `n` tokens have come;
/// returns the tokens, or the status it ended with.
async fn stream(
    channel: Channel,
    max_tokens: u32,
    n: usize,
    at_token: impl FnOnce(),
) -> Result<usize, tonic::Status> {
    let mut c = InferenceClient::new(channel);
    let mut stream = c.generate_stream(greedy(max_tokens)).await?.into_inner();
    let (mut tokens, mut summary, mut hook) = (0, false, Some(at_token));
    while let Some(message) = stream.next().await {
        match message?.event {
            Some(Event::Chunk(chunk)) => {
                tokens += chunk.token_ids.len();
                if tokens >= n
                    && let Some(hook) = hook.take()
                {
                    hook();
                }
            }
            Some(Event::Summary(_)) => summary = true,
            None => {}
        }
    }
    assert!(
        summary,
        "a stream that ends without an error ends with its summary"
    );
    Ok(tokens)
}

/// SIGTERM to `frontend` on a blocking thread; resolves to its exit status.
fn terminate(
    frontend: &Arc<FrontendProcess>,
) -> tokio::task::JoinHandle<Option<std::process::ExitStatus>> {
    let frontend = frontend.clone();
    tokio::task::spawn_blocking(move || frontend.process().terminate(Duration::from_secs(30)))
}

#[tokio::test]
async fn readiness_follows_the_shards_and_a_frontend_that_gave_up_waiting_is_not_ready() {
    let model = fixture_model("qwen3_moe");
    let shard = ShardProcess::start(&model, &[]).await.expect("shard");
    let port = shard.port();
    let frontend = FrontendProcess::start(&model, &["--expert-shards", &shard.address()])
        .await
        .expect("frontend");
    let ch = channel(&frontend).await;
    wait_health(
        &ch,
        ServingStatus::Serving,
        Duration::from_secs(10),
        "with its shard",
    )
    .await;
    assert_eq!(
        client::health(ch.clone(), "").await.unwrap(),
        ServingStatus::Serving,
        "liveness: the process is up"
    );

    shard.process().kill();
    let took = wait_health(
        &ch,
        ServingStatus::NotServing,
        Duration::from_secs(10),
        "shard killed",
    )
    .await;
    eprintln!("readiness: NOT_SERVING {took:?} after the shard was killed");
    assert_eq!(
        client::health(ch.clone(), "").await.unwrap(),
        ServingStatus::Serving,
        "liveness stays SERVING: restarting the frontend would not bring the shard back"
    );
    let log = frontend.process().log_tail(200);
    assert!(
        log.contains("not ready: NOT_SERVING") && log.contains("no reachable expert shard"),
        "the frontend's log says why it is not ready:\n{log}"
    );

    let _shard = ShardProcess::start_on(port, &model, &[])
        .await
        .expect("restart the shard");
    let took = wait_health(
        &ch,
        ServingStatus::Serving,
        Duration::from_secs(40),
        "shard back",
    )
    .await;
    eprintln!("readiness: SERVING {took:?} after the shard came back");
    let mut c = InferenceClient::new(ch.clone());
    let reply = c
        .generate(greedy(4))
        .await
        .expect("serves again")
        .into_inner();
    assert_eq!(reply.token_ids.len(), 4);

    // Start-up: the shard never comes; after --expert-wait-secs the frontend serves its
    // gRPC endpoint (health, reflection) but does not claim it can serve.
    let nowhere = format!("127.0.0.1:{}", free_port().unwrap());
    let lonely = FrontendProcess::start(
        &model,
        &["--expert-shards", &nowhere, "--expert-wait-secs", "1"],
    )
    .await
    .expect("the frontend starts without its shard");
    let ch = channel(&lonely).await;
    for _ in 0..3 {
        assert_eq!(
            client::health(ch.clone(), INFERENCE).await.unwrap(),
            ServingStatus::NotServing,
            "gave up waiting for its shard: not ready"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn sigterm_turns_readiness_off_at_once_and_lets_in_flight_streams_finish() {
    // 60 tokens at about 2 × 25 ms each: a stream of about 3 s.
    let (_shard, frontend) = slow_pair(25, &["--drain-seconds", "20"]).await;
    let frontend = Arc::new(frontend);
    let ch = channel(&frontend).await;
    wait_health(
        &ch,
        ServingStatus::Serving,
        Duration::from_secs(10),
        "start",
    )
    .await;
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<Instant>();
    let exit = Arc::new(std::sync::Mutex::new(None));
    let mut signalled_tx = Some(signalled_tx);
    let streams = (0..4).map(|i| {
        let ch = ch.clone();
        let frontend = frontend.clone();
        let exit = exit.clone();
        let signalled_tx = if i == 0 { signalled_tx.take() } else { None };
        async move {
            let mut signalled_tx = signalled_tx;
            stream(ch, 60, 5, move || {
                if let Some(tx) = signalled_tx.take() {
                    *exit.lock().unwrap() = Some(terminate(&frontend));
                    let _ = tx.send(Instant::now());
                }
            })
            .await
        }
    });
    let health = async {
        let signalled = signalled_rx.await.expect("the first stream got 5 tokens");
        wait_health(
            &ch,
            ServingStatus::NotServing,
            Duration::from_secs(2),
            "after SIGTERM",
        )
        .await;
        signalled.elapsed()
    };
    let (results, not_serving_after) = tokio::join!(futures::future::join_all(streams), health);
    eprintln!("drain: readiness NOT_SERVING {not_serving_after:?} after SIGTERM");
    for (i, result) in results.into_iter().enumerate() {
        assert_eq!(
            result.unwrap_or_else(|e| panic!("stream {i} was cut by the shutdown: {e:?}")),
            60,
            "stream {i} got every token"
        );
    }
    let exit = exit.lock().unwrap().take().expect("SIGTERM was sent");
    let status = exit
        .await
        .unwrap()
        .expect("the frontend exits on its own after draining");
    assert!(status.success(), "a clean drain exits 0: {status:?}");
    let log = frontend.process().log_tail(50);
    assert!(log.contains("drained"), "{log}");
}

#[tokio::test]
async fn a_stream_still_running_when_the_drain_budget_is_spent_ends_with_unavailable() {
    // 400 tokens at about 2 × 20 ms each: 16 s, far past a 1 s budget.
    let (_shard, frontend) = slow_pair(20, &["--drain-seconds", "1"]).await;
    let frontend = Arc::new(frontend);
    let ch = channel(&frontend).await;
    let exit = Arc::new(std::sync::Mutex::new(None));
    let signalled = Arc::new(std::sync::Mutex::new(None));
    let result = {
        let (frontend, exit, signalled) = (frontend.clone(), exit.clone(), signalled.clone());
        stream(ch, 400, 3, move || {
            *exit.lock().unwrap() = Some(terminate(&frontend));
            *signalled.lock().unwrap() = Some(Instant::now());
        })
        .await
    };
    let ended_after = signalled
        .lock()
        .unwrap()
        .expect("SIGTERM was sent")
        .elapsed();
    let err = result.expect_err("the stream outlives the budget");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("shutting down") && err.message().contains("retry"),
        "the status says why and what to do: {}",
        err.message()
    );
    eprintln!("drain: a stream past a 1 s budget ended {ended_after:?} after SIGTERM");
    assert!(
        ended_after < Duration::from_secs(10),
        "ended at the budget, not at the stream's natural end: {ended_after:?}"
    );
    let exit = exit.lock().unwrap().take().unwrap();
    assert!(
        exit.await.unwrap().is_some(),
        "the frontend exits on its own, without a SIGKILL"
    );
}
