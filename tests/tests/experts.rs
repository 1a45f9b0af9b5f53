//! Tier 4: expert parallelism with real processes — frontends calling expert-shard
//! processes over loopback gRPC: the same greedy tokens as all-local for every MoE family
//! on 1, 2 and 3 shards; bf16 on the wire within tolerance; a killed shard routed around
//! (replica) or failing only the affected request (no replica) and recovering on restart;
//! a slow shard; placements (a missing expert refused, a changed file reloaded); and the
//! statuses a shard answers bad calls with.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_proto::expert::v1 as ep;
use switchyard_proto::expert::v1::expert_shard_client::ExpertShardClient;
use switchyard_proto::inference::v1::{
    self as pb, generate_stream_response::Event, inference_client::InferenceClient,
};
use switchyard_tests::process::TempDir;
use switchyard_tests::worker::fixture_model;
use switchyard_tests::{FrontendProcess, ShardProcess};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

/// Every fixture with routed experts (the dense llama/qwen2/qwen3 have none to shard).
const MOE_FIXTURES: [&str; 10] = [
    "mixtral",
    "qwen2_moe",
    "qwen2_moe_norm",
    "qwen3_moe",
    "olmoe",
    "olmoe_bf16",
    "deepseek_v2_greedy",
    "deepseek_v2_group",
    "deepseek_v3",
    "deepseek_v3_yarn",
];

const PROMPTS: [&str; 3] = ["The quick brown fox", "Mixture of experts", "a b c d e f g"];

fn num_experts(model: &Path) -> u32 {
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).expect("config"))
            .expect("json");
    ["n_routed_experts", "num_local_experts", "num_experts"]
        .iter()
        .find_map(|k| c.get(*k).and_then(serde_json::Value::as_u64))
        .expect("a MoE config") as u32
}

/// A placement file spreading every layer's experts evenly over `shards` shards, plus
/// `replicas_of_all` extra shards that hold everything.
fn placement(dir: &Path, name: &str, experts: u32, shards: u32, revision: &str) -> PathBuf {
    let entries: Vec<serde_json::Value> =
        switchyard_proto::worker_config::even_spread(experts, shards)
            .into_iter()
            .map(|r| serde_json::json!({"experts": {"*": format!("{}-{}", r.start, r.end - 1)}}))
            .collect();
    let path = dir.join(name);
    std::fs::write(
        &path,
        serde_json::json!({"revision": revision, "shards": entries}).to_string(),
    )
    .expect("write placement");
    path
}

async fn start_shards(model: &Path, file: &Path, count: u32, extra: &[&str]) -> Vec<ShardProcess> {
    let file = file.to_str().expect("utf-8 path").to_string();
    let starts = (0..count).map(|i| {
        let file = file.clone();
        async move {
            let index = i.to_string();
            let mut args = vec![
                "--placement",
                file.as_str(),
                "--shard-index",
                index.as_str(),
            ];
            args.extend_from_slice(extra);
            ShardProcess::start(model, &args).await
        }
    });
    futures::future::join_all(starts)
        .await
        .into_iter()
        .map(|s| s.expect("shard starts"))
        .collect()
}

fn addresses(shards: &[&ShardProcess]) -> String {
    shards
        .iter()
        .map(|s| s.address())
        .collect::<Vec<_>>()
        .join(",")
}

fn greedy(text: &str, max_tokens: u32) -> pb::GenerateRequest {
    switchyard_tests::worker::greedy_request(text, max_tokens)
}

async fn client(frontend: &FrontendProcess) -> InferenceClient<Channel> {
    InferenceClient::connect(frontend.endpoint())
        .await
        .expect("connect to the frontend")
}

/// The greedy tokens of every prompt, generated concurrently (one batch).
async fn generate_all(frontend: &FrontendProcess, max_tokens: u32) -> Vec<Vec<u32>> {
    let c = client(frontend).await;
    let calls = PROMPTS.iter().map(|p| {
        let mut c = c.clone();
        async move {
            c.generate(greedy(p, max_tokens))
                .await
                .expect("generate")
                .into_inner()
                .token_ids
        }
    });
    futures::future::join_all(calls).await
}

#[tokio::test]
async fn every_family_gives_the_same_greedy_tokens_on_one_two_and_three_shards() {
    let dir = TempDir::new("placements").expect("dir");
    for name in MOE_FIXTURES {
        let model = fixture_model(name);
        let local = FrontendProcess::start(&model, &[])
            .await
            .expect("local frontend");
        let want = generate_all(&local, 16).await;
        drop(local);
        for count in 1..=3u32 {
            let file = placement(
                dir.path(),
                &format!("{name}-{count}.json"),
                num_experts(&model),
                count,
                "t1",
            );
            let shards = start_shards(&model, &file, count, &[]).await;
            let refs: Vec<&ShardProcess> = shards.iter().collect();
            let frontend = FrontendProcess::start(&model, &["--expert-shards", &addresses(&refs)])
                .await
                .expect("frontend on shards");
            let got = generate_all(&frontend, 16).await;
            assert_eq!(got, want, "{name} on {count} shard(s)");
            // Every shard did its share of the work.
            for s in &shards {
                let series = format!(
                    "switchyard_expert_shard_rows_total{{shard=\"http://{}\"}}",
                    s.address()
                );
                let rows = frontend.metric(&series).await.unwrap_or(0.0);
                assert!(rows > 0.0, "{name}: shard {} served no rows", s.address());
            }
        }
    }
}

/// `--quantization int4` on both sides: shards hold their experts in 4 bits (Q4_0 at the
/// fixture's 64-wide rows), the frontend holds its attention and head quantized too, and the
/// tokens are those of the same int4 model in one process. A shard holding other weights
/// (no quantization) is refused by identity rather than mixed in.
#[tokio::test]
async fn int4_experts_on_two_shards_give_the_in_process_int4_tokens() {
    let dir = TempDir::new("placements").expect("dir");
    let model = fixture_model("qwen3_moe");
    let int4 = ["--quantization", "int4"];
    let local = FrontendProcess::start(&model, &int4)
        .await
        .expect("local frontend");
    let want = generate_all(&local, 16).await;
    drop(local);
    let dense = FrontendProcess::start(&model, &[])
        .await
        .expect("dense frontend");
    assert_ne!(
        generate_all(&dense, 16).await,
        want,
        "int4 changes the tokens"
    );
    drop(dense);
    let file = placement(dir.path(), "int4.json", num_experts(&model), 2, "t1");
    let shards = start_shards(&model, &file, 2, &int4).await;
    for s in &shards {
        let log = std::fs::read_to_string(s.process().log_path()).unwrap_or_default();
        // gate+up rows are 64 wide (Q4_0); down rows are 40 wide, which no block divides.
        assert!(
            log.contains("routed experts: f32 ×8 q4_0 ×8"),
            "a shard logs its experts' types:\n{log}"
        );
    }
    let refs: Vec<&ShardProcess> = shards.iter().collect();
    let frontend = FrontendProcess::start(
        &model,
        &[
            "--expert-shards",
            &addresses(&refs),
            "--quantization",
            "int4",
        ],
    )
    .await
    .expect("frontend on int4 shards");
    assert_eq!(generate_all(&frontend, 16).await, want, "int4 on 2 shards");
    drop(frontend);
    // A frontend that holds dense weights does not use int4 shards: their identity differs,
    // so its requests fail UNAVAILABLE instead of mixing weights.
    let mismatched = FrontendProcess::start(
        &model,
        &[
            "--expert-shards",
            &addresses(&refs),
            "--expert-wait-secs",
            "1",
        ],
    )
    .await
    .expect("a frontend starts without its experts");
    let status = client(&mismatched)
        .await
        .generate(greedy(PROMPTS[0], 4))
        .await
        .expect_err("no shard serves its weights");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let log = mismatched.process().log_tail(200);
    assert!(
        log.contains("-f32-int4, not "),
        "the log names the mismatch:\n{log}"
    );
}

/// The bf16 wire: one MoE layer's routed output through two shard processes, against
/// the same experts in process, on random hidden rows.
#[tokio::test]
async fn bf16_on_the_wire_stays_within_tolerance_and_f32_is_exact() {
    use candle_core::{DType, Device, Tensor};
    use switchyard_worker::experts::remote::{RemoteExperts, RemoteOptions, ShardTargets};
    use switchyard_worker::model::checkpoint::Checkpoint;
    use switchyard_worker::model::layers::Precision;
    use switchyard_worker::model::moe::{ExpertBackend, LocalExperts, Routes};

    let name = "deepseek_v3";
    let model = fixture_model(name);
    let dir = TempDir::new("placements").expect("dir");
    let experts = num_experts(&model);
    let file = placement(dir.path(), "p.json", experts, 2, "t1");
    let shards = start_shards(&model, &file, 2, &[]).await;
    let cfg = switchyard_worker::model::config::load(&model).expect("config");
    let ckpt = Checkpoint::open(&model).expect("checkpoint");
    let identity = switchyard_worker::experts::identity(
        name,
        &ckpt,
        switchyard_worker::model::layers::Precision::uniform(DType::F32),
    )
    .expect("id");
    let local = LocalExperts::load(&cfg, &ckpt, Precision::uniform(DType::F32), &Device::Cpu)
        .expect("local experts");
    let layer = cfg
        .moe
        .as_ref()
        .and_then(|m| m.sparse_layers.iter().position(|s| *s))
        .expect("a MoE layer");
    let rows = 24;
    let xs = Tensor::randn(0f32, 1.0, (rows, cfg.hidden_size), &Device::Cpu).expect("xs");
    let top_k = 4;
    let routes = Routes {
        top_k,
        experts: (0..rows * top_k)
            .map(|i| ((i * 5 + i / top_k) as u32) % experts)
            .collect(),
        weights: (0..rows * top_k)
            .map(|i| 0.1 + (i % 7) as f32 * 0.1)
            .collect(),
    };
    // Distinct experts per row.
    for r in 0..rows {
        let mut e = routes.experts[r * top_k..(r + 1) * top_k].to_vec();
        e.sort_unstable();
        e.dedup();
        assert_eq!(e.len(), top_k, "row {r} repeats an expert");
    }
    let want = local.forward(layer, &xs, &routes).expect("local");
    let scale = want
        .abs()
        .and_then(|t| t.max_all())
        .and_then(|t| t.to_scalar::<f32>())
        .expect("max");
    let refs: Vec<&ShardProcess> = shards.iter().collect();
    for (wire, tolerance) in [(ep::Dtype::F32, 1e-6f32), (ep::Dtype::Bf16, 1e-2)] {
        let registry = prometheus::Registry::new();
        let remote = RemoteExperts::connect(
            &cfg,
            identity.clone(),
            RemoteOptions {
                targets: ShardTargets::parse(&addresses(&refs)).expect("targets"),
                wire,
                timeout: Duration::from_secs(10),
                refresh: Duration::from_secs(1),
                wait: Duration::from_secs(30),
            },
            &registry,
        )
        .await
        .expect("connect");
        let (xs2, routes2) = (xs.clone(), routes.clone());
        let got = tokio::task::spawn_blocking(move || remote.forward(layer, &xs2, &routes2))
            .await
            .expect("join")
            .expect("remote");
        let diff = (got - &want)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        assert!(
            diff <= tolerance * scale.max(1.0),
            "{wire:?}: max difference {diff} against outputs up to {scale}"
        );
    }
}

/// Streams `req`, calling `on_token` after each chunk; returns the token ids or the
/// status the stream ended with.
async fn stream_with(
    frontend: &FrontendProcess,
    req: pb::GenerateRequest,
    mut on_token: impl FnMut(usize),
) -> Result<Vec<u32>, tonic::Status> {
    let mut c = client(frontend).await;
    let mut stream = c.generate_stream(req).await?.into_inner();
    let mut ids = Vec::new();
    while let Some(msg) = stream.next().await {
        match msg?.event {
            Some(Event::Chunk(chunk)) => {
                ids.extend(chunk.token_ids);
                on_token(ids.len());
            }
            Some(Event::Summary(_)) => return Ok(ids),
            None => {}
        }
    }
    Err(tonic::Status::internal(
        "the stream ended without a summary",
    ))
}

#[tokio::test]
async fn a_killed_shard_with_a_replica_is_routed_around_mid_stream() {
    let model = fixture_model("qwen3_moe");
    let local = FrontendProcess::start(&model, &[]).await.expect("local");
    let req = greedy(PROMPTS[0], 200);
    let want = stream_with(&local, req.clone(), |_| {})
        .await
        .expect("local");
    drop(local);
    // Two replicas of everything.
    let a = ShardProcess::start(&model, &[]).await.expect("shard a");
    let b = ShardProcess::start(&model, &[]).await.expect("shard b");
    let frontend = FrontendProcess::start(
        &model,
        &[
            "--expert-shards",
            &addresses(&[&a, &b]),
            "--expert-timeout-ms",
            "2000",
        ],
    )
    .await
    .expect("frontend");
    let a = std::sync::Mutex::new(Some(a));
    let got = stream_with(&frontend, req, |n| {
        if n == 5 {
            // Mid-stream: the shard process dies (SIGKILL).
            if let Some(a) = a.lock().expect("lock").take() {
                a.process().kill();
            }
        }
    })
    .await
    .expect("the stream completes on the replica");
    assert_eq!(got, want, "same tokens as all-local");
    let served_by_b = frontend
        .metric(&format!(
            "switchyard_expert_shard_rows_total{{shard=\"http://{}\"}}",
            b.address()
        ))
        .await
        .unwrap_or(0.0);
    assert!(served_by_b > 0.0, "the replica took over");
}

#[tokio::test]
async fn without_a_replica_the_request_fails_unavailable_and_a_restart_recovers() {
    let model = fixture_model("qwen3_moe");
    let dir = TempDir::new("placements").expect("dir");
    let file = placement(dir.path(), "p.json", num_experts(&model), 2, "t1");
    let mut shards = start_shards(&model, &file, 2, &[]).await;
    let frontend = FrontendProcess::start(
        &model,
        &[
            "--expert-shards",
            &addresses(&shards.iter().collect::<Vec<_>>()),
            "--expert-timeout-ms",
            "2000",
        ],
    )
    .await
    .expect("frontend");
    let b = shards.pop().expect("shard b");
    let b_port = b.port();
    let b = std::sync::Mutex::new(Some(b));
    let started = Instant::now();
    let mut req = greedy(PROMPTS[0], 400);
    req.sampling.as_mut().expect("sampling").max_tokens = Some(400);
    let mut call = tonic::Request::new(req);
    call.set_timeout(Duration::from_secs(20));
    let mut c = client(&frontend).await;
    let result = async {
        let mut stream = c.generate_stream(call).await?.into_inner();
        let mut n = 0;
        while let Some(msg) = stream.next().await {
            if let Some(Event::Chunk(chunk)) = msg?.event {
                n += chunk.token_ids.len();
                if n >= 3
                    && let Some(b) = b.lock().expect("lock").take()
                {
                    b.process().kill();
                }
            }
        }
        Ok::<_, tonic::Status>(n)
    }
    .await;
    let err = result.expect_err("the request needs the dead shard's experts");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .contains("no reachable expert shard holds layer")
            && err.message().contains("expert(s)"),
        "the message names the missing experts: {}",
        err.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "ended within its deadline"
    );
    // The frontend itself is fine: other calls work.
    let mut c = client(&frontend).await;
    let models = c
        .list_models(pb::ListModelsRequest {})
        .await
        .expect("list models");
    assert_eq!(models.into_inner().models.len(), 1);
    // A restarted shard is found again and new requests succeed.
    let path = file.to_str().expect("utf-8");
    let _b = ShardProcess::start_on(b_port, &model, &["--placement", path, "--shard-index", "1"])
        .await
        .expect("restart shard b");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.generate(greedy(PROMPTS[1], 8)).await {
            Ok(r) => {
                assert_eq!(r.into_inner().token_ids.len(), 8);
                break;
            }
            Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("no recovery after the restart: {e:?}"),
        }
    }
}

#[tokio::test]
async fn shards_behind_a_dns_name_are_found() {
    let model = fixture_model("qwen3_moe");
    let shard = ShardProcess::start(&model, &[]).await.expect("shard");
    // `localhost` stands in for a headless Service's name: every address it resolves to
    // is a candidate shard (an IPv6 one with no listener is simply down).
    let spec = format!("dns:///localhost:{}", shard.port());
    let frontend = FrontendProcess::start(&model, &["--expert-shards", &spec])
        .await
        .expect("frontend");
    let got = generate_all(&frontend, 4).await;
    assert!(got.iter().all(|ids| ids.len() == 4), "{got:?}");
    let rows = frontend
        .metric(&format!(
            "switchyard_expert_shard_rows_total{{shard=\"http://127.0.0.1:{}\"}}",
            shard.port()
        ))
        .await
        .unwrap_or(0.0);
    assert!(rows > 0.0, "the shard found by name served the experts");
}

/// A shard past `--shard-count` copies block `index mod count` (what the operator's
/// `experts.replicaShards` runs): it holds shard 0's experts, the frontend sends it rows
/// like any holder without changing a token, and `GET /load` reports each shard's work.
#[tokio::test]
async fn a_copy_of_a_shard_holds_its_experts_serves_rows_and_reports_its_load() {
    let model = fixture_model("qwen3_moe");
    let shards = futures::future::join_all((0..3).map(|i| {
        let model = model.clone();
        async move {
            let index = i.to_string();
            ShardProcess::start(&model, &["--shard-count", "2", "--shard-index", &index])
                .await
                .expect("shard")
        }
    }))
    .await;
    let layers = |d: ep::DescribeResponse| {
        d.layers
            .into_iter()
            .map(|l| (l.layer, l.experts))
            .collect::<Vec<_>>()
    };
    let original = layers(describe(&mut shard_client(&shards[0]).await).await);
    let copy = describe(&mut shard_client(&shards[2]).await).await;
    assert_eq!(copy.shard_index, 2);
    assert_eq!(layers(copy), original, "shard 2 of 2 copies shard 0");

    let alone = FrontendProcess::start(&model, &[]).await.expect("frontend");
    let reference = generate_all(&alone, 6).await;
    let all: Vec<&ShardProcess> = shards.iter().collect();
    let frontend = FrontendProcess::start(&model, &["--expert-shards", &addresses(&all)])
        .await
        .expect("frontend");
    assert_eq!(generate_all(&frontend, 6).await, reference);

    // The frontend's expert load names the model's shape and, per layer, the shard
    // imbalance on what the shards hold: experts 0-3 on shards 0 and 2 (their tokens
    // split over both), 4-7 on shard 1.
    let body = frontend.http("/expert-load").await.expect("/expert-load");
    let report: serde_json::Value =
        serde_json::from_str(body.split_once("\r\n\r\n").map_or("", |(_, b)| b)).expect("JSON");
    assert_eq!(report["experts"], 8, "{report}");
    assert!(
        report["moeLayers"]
            .as_array()
            .is_some_and(|l| !l.is_empty()),
        "{report}"
    );
    let text = frontend.metrics().await.expect("/metrics");
    let layers = report["layers"].as_array().expect("layers");
    assert!(!layers.is_empty(), "tokens were routed: {report}");
    for layer in layers {
        let load: Vec<f64> = layer["load"]
            .as_array()
            .expect("load")
            .iter()
            .map(|v| v.as_f64().expect("a count"))
            .collect();
        let (copied, alone) = (
            load[..4].iter().sum::<f64>() / 2.0,
            load[4..].iter().sum::<f64>(),
        );
        let want = copied.max(alone) / ((2.0 * copied + alone) / 3.0);
        let got = layer["shardImbalance"].as_f64().expect("shardImbalance");
        assert!(
            (got - want).abs() < 1e-9,
            "layer {layer}: {got} against {want}"
        );
        let gauge = switchyard_tests::worker::metric_value(
            &text,
            &format!(
                "switchyard_expert_shard_imbalance{{layer=\"{}\"}}",
                layer["layer"]
            ),
        )
        .expect("the shard imbalance gauge");
        assert!((gauge - want).abs() < 1e-6, "gauge {gauge} against {want}");
    }

    for (i, shard) in shards.iter().enumerate() {
        let body = shard.http("/load").await.expect("/load");
        let (head, json) = body.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.contains("application/json"), "{head}");
        let load: serde_json::Value = serde_json::from_str(json).expect("JSON");
        assert_eq!(load["shardIndex"], i, "{load}");
        assert!(
            load["rowsProcessedTotal"].as_u64() > Some(0),
            "shard {i} served rows, the copy too: {load}"
        );
        let utilisation = load["utilisation"].as_f64().expect("utilisation");
        assert!((0.0..=1.0).contains(&utilisation), "{load}");
    }
}

#[tokio::test]
async fn a_slow_shard_fails_over_or_fails_fast() {
    let model = fixture_model("qwen3_moe");
    let local = FrontendProcess::start(&model, &[]).await.expect("local");
    let want = stream_with(&local, greedy(PROMPTS[2], 12), |_| {})
        .await
        .expect("local");
    drop(local);
    let slow = ShardProcess::start(&model, &["--debug-forward-delay-ms", "3000"])
        .await
        .expect("slow shard");
    let fast = ShardProcess::start(&model, &[]).await.expect("fast shard");
    // With a fast replica: the slow one is benched after one missed deadline.
    let frontend = FrontendProcess::start(
        &model,
        &[
            "--expert-shards",
            &addresses(&[&slow, &fast]),
            "--expert-timeout-ms",
            "300",
        ],
    )
    .await
    .expect("frontend");
    let started = Instant::now();
    let got = stream_with(&frontend, greedy(PROMPTS[2], 12), |_| {})
        .await
        .expect("fails over");
    assert_eq!(got, want);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    drop(frontend);
    // Alone: the request fails fast, it does not hang.
    let frontend = FrontendProcess::start(
        &model,
        &[
            "--expert-shards",
            &slow.address(),
            "--expert-timeout-ms",
            "300",
        ],
    )
    .await
    .expect("frontend");
    let started = Instant::now();
    let mut call = tonic::Request::new(greedy(PROMPTS[2], 12));
    call.set_timeout(Duration::from_secs(30));
    let err = client(&frontend)
        .await
        .generate(call)
        .await
        .expect_err("only a slow shard");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_placement_naming_an_expert_the_checkpoint_lacks_stops_the_shard() {
    let model = fixture_model("qwen3_moe");
    let dir = TempDir::new("placements").expect("dir");
    let path = dir.path().join("bad.json");
    std::fs::write(
        &path,
        r#"{"revision": "r1", "shards": [{"experts": {"*": "0-3,8"}}]}"#,
    )
    .expect("write");
    let binary = switchyard_tests::tools::workspace_binary("switchyard-worker").expect("binary");
    let out = std::process::Command::new(binary)
        .args(["--role", "expert-shard", "--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0", "--model"])
        .arg(&model)
        .arg("--placement")
        .arg(&path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("expert 8 does not exist") && stderr.contains("(0-7)"),
        "{stderr}"
    );
}

/// A qwen3_moe shard whose placement file (returned, in `dir`) gives it experts 0-3.
async fn shard_holding_0_to_3() -> (TempDir, PathBuf, ShardProcess) {
    let dir = TempDir::new("placements").expect("dir");
    let path = dir.path().join("p.json");
    std::fs::write(
        &path,
        r#"{"revision": "r1", "shards": [{"experts": {"*": "0-3"}}]}"#,
    )
    .expect("write");
    let shard = ShardProcess::start(
        &fixture_model("qwen3_moe"),
        &["--placement", path.to_str().expect("utf-8")],
    )
    .await
    .expect("shard");
    (dir, path, shard)
}

async fn describe(c: &mut ExpertShardClient<Channel>) -> ep::DescribeResponse {
    c.describe(ep::DescribeRequest {})
        .await
        .expect("describe")
        .into_inner()
}

async fn shard_client(s: &ShardProcess) -> ExpertShardClient<Channel> {
    ExpertShardClient::connect(format!("http://{}", s.address()))
        .await
        .expect("connect to the shard")
}

#[tokio::test]
async fn a_changed_placement_file_is_reloaded_and_describe_reports_it() {
    let (_dir, path, shard) = shard_holding_0_to_3().await;
    let mut c = shard_client(&shard).await;
    let d = describe(&mut c).await;
    assert_eq!(d.placement_revision, "r1");
    assert!(
        d.layers.iter().all(|l| l.experts == [0, 1, 2, 3]),
        "{:?}",
        d.layers
    );
    std::fs::write(
        &path,
        r#"{"revision": "r2", "shards": [{"experts": {"*": "2-7"}}]}"#,
    )
    .expect("rewrite");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = describe(&mut c).await;
        if d.placement_revision == "r2" {
            assert!(
                d.layers.iter().all(|l| l.experts == [2, 3, 4, 5, 6, 7]),
                "{:?}",
                d.layers
            );
            assert_eq!(
                shard.metric("switchyard_shard_experts_held").await,
                Some(12.0)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new placement was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Issue 19's online move: two shards swap their halves of every layer's experts in two
/// revisions of the placement file (first the new sets with the lost experts draining,
/// then without them) while greedy streams run back to back. No stream fails and each
/// ends with the all-local tokens; `Describe` shows the draining set during the move, and
/// the experts are served by their new shards after it.
#[tokio::test]
async fn experts_move_between_shards_while_streams_run_and_none_fails() {
    let model = fixture_model("qwen3_moe");
    let experts = num_experts(&model);
    let half = experts / 2;
    let local = FrontendProcess::start(&model, &[]).await.expect("local");
    let want = generate_all(&local, 48).await;
    drop(local);
    let dir = TempDir::new("placements").expect("dir");
    let file = placement(dir.path(), "p.json", experts, 2, "r1");
    // A little latency per call, so that the streams span the move. Shard 1 starts a
    // second after shard 0: each re-reads the file every 2 s from its start, so shard 0
    // takes up the new revision about a second before shard 1. Without `draining`, shard
    // 0's lost experts would have no holder for that second.
    let path = file.to_str().expect("utf-8 path");
    let mut shards = Vec::new();
    for index in ["0", "1"] {
        if index == "1" {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let args = [
            "--placement",
            path,
            "--shard-index",
            index,
            "--debug-forward-delay-ms",
            "2",
        ];
        shards.push(
            ShardProcess::start(&model, &args)
                .await
                .expect("shard starts"),
        );
    }
    let frontend = FrontendProcess::start(
        &model,
        &["--expert-shards", &addresses(&[&shards[0], &shards[1]])],
    )
    .await
    .expect("frontend");
    let (low, high) = (format!("0-{}", half - 1), format!("{half}-{}", experts - 1));
    let write = |revision: &str, draining: bool| {
        let entry = |own: &str, lost: &str| {
            if draining {
                serde_json::json!({"experts": {"*": own}, "draining": {"*": lost}})
            } else {
                serde_json::json!({"experts": {"*": own}})
            }
        };
        let text = serde_json::json!({"revision": revision,
            "shards": [entry(&high, &low), entry(&low, &high)]});
        std::fs::write(&file, text.to_string()).expect("rewrite the placement");
    };
    let mut clients = Vec::new();
    for s in &shards {
        clients.push(shard_client(s).await);
    }
    let wait_for = |revision: &'static str, mut clients: Vec<ExpertShardClient<Channel>>| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut ds = Vec::new();
            for c in &mut clients {
                ds.push(describe(c).await);
            }
            if ds.iter().all(|d| d.placement_revision == revision) {
                return (ds, clients);
            }
            assert!(
                Instant::now() < deadline,
                "the shards did not load {revision}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let done = std::sync::atomic::AtomicBool::new(false);
    let streams = async {
        let mut rounds = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) || rounds < 2 {
            let c = client(&frontend).await;
            let calls = PROMPTS.iter().map(|p| {
                let c = c.clone();
                async move {
                    let mut c = c;
                    let mut stream = c.generate_stream(greedy(p, 48)).await?.into_inner();
                    let mut ids = Vec::new();
                    while let Some(msg) = stream.next().await {
                        if let Some(Event::Chunk(chunk)) = msg?.event {
                            ids.extend(chunk.token_ids);
                        }
                    }
                    Ok::<_, tonic::Status>(ids)
                }
            });
            for (i, got) in futures::future::join_all(calls)
                .await
                .into_iter()
                .enumerate()
            {
                let got =
                    got.unwrap_or_else(|s| panic!("round {rounds}, prompt {i} failed: {s:?}"));
                assert_eq!(got, want[i], "round {rounds}, prompt {i}: tokens changed");
            }
            rounds += 1;
        }
        rounds
    };
    let mover = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        write("r2", true);
        let (ds, clients) = wait_for("r2", clients).await;
        for (i, d) in ds.iter().enumerate() {
            let (own, lost) = if i == 0 {
                (half..experts, 0..half)
            } else {
                (0..half, half..experts)
            };
            assert!(
                d.layers
                    .iter()
                    .all(|l| l.experts == own.clone().collect::<Vec<_>>()),
                "shard {i} advertises its new set: {:?}",
                d.layers
            );
            assert!(
                !d.draining.is_empty()
                    && d.draining
                        .iter()
                        .all(|l| l.experts == lost.clone().collect::<Vec<_>>()),
                "shard {i} drains what it loses: {:?}",
                d.draining
            );
        }
        // The frontend asks every shard each second: two rounds, then the old sets go.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        write("r3", false);
        let (ds, _) = wait_for("r3", clients).await;
        assert!(ds.iter().all(|d| d.draining.is_empty()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        ds
    };
    let (rounds, at_r3) = tokio::join!(streams, mover);
    assert!(rounds >= 3, "streams ran across the move ({rounds} rounds)");
    let text = frontend.metrics().await.expect("metrics");
    let accounting = switchyard_tests::accounting::Accounting::parse(&text);
    accounting.check().expect("the accounting invariant");
    assert_eq!(
        accounting.ended(None),
        (rounds * PROMPTS.len()) as f64,
        "every stream completed: {accounting:?}"
    );
    // After the move, shard 0 serves the high half: its rows for them grow.
    let after = describe(&mut shard_client(&shards[0]).await).await;
    let rows = |d: &ep::DescribeResponse| -> u64 {
        d.layers
            .iter()
            .flat_map(|l| l.rows_processed_total.iter())
            .sum()
    };
    let served: u64 = rows(&after);
    assert!(served > 0, "shard 0 served its new experts: {at_r3:?}");
    assert_eq!(
        shards[0].metric("switchyard_shard_experts_held").await,
        Some(f64::from(half) * after.layers.len() as f64)
    );
}

#[tokio::test]
async fn a_shard_answers_bad_calls_with_clear_statuses() {
    let (_dir, _, shard) = shard_holding_0_to_3().await;
    let mut c = shard_client(&shard).await;
    let d = describe(&mut c).await;
    let hidden = d.hidden_size as usize;
    let identity = d.model.clone().expect("identity");
    let layer = d.layers[0].layer;
    let rows = |n: usize, width: usize| {
        switchyard_worker::experts::wire::encode_f32(
            &vec![0.5; n * width],
            n,
            width,
            ep::Dtype::F32,
        )
    };
    let route = |expert: u32| ep::RowRoutes {
        routes: vec![ep::ExpertRoute {
            expert,
            weight: 1.0,
        }],
    };
    let ok = ep::ForwardRequest {
        model: Some(identity.clone()),
        layer,
        hidden: Some(rows(2, hidden)),
        routes: vec![route(0), route(3)],
    };
    let out = c
        .forward(ok.clone())
        .await
        .expect("a valid call")
        .into_inner();
    assert_eq!(out.output.expect("output").shape, vec![2, hidden as u64]);
    let cases: Vec<(&str, ep::ForwardRequest, tonic::Code, &str)> = vec![
        (
            "other model",
            ep::ForwardRequest {
                model: Some(ep::ModelIdentity {
                    model_id: "other".into(),
                    fingerprint: identity.fingerprint.clone(),
                }),
                ..ok.clone()
            },
            tonic::Code::FailedPrecondition,
            "model: this shard serves",
        ),
        (
            "not held",
            ep::ForwardRequest {
                routes: vec![route(0), route(5)],
                ..ok.clone()
            },
            tonic::Code::NotFound,
            "expert 5 (routes[1]): not held",
        ),
        (
            "wrong width",
            ep::ForwardRequest {
                hidden: Some(rows(2, hidden + 1)),
                ..ok.clone()
            },
            tonic::Code::InvalidArgument,
            "hidden: rows of width",
        ),
        (
            "routes count",
            ep::ForwardRequest {
                routes: vec![route(0)],
                ..ok.clone()
            },
            tonic::Code::InvalidArgument,
            "routes: 1 entries for 2 rows",
        ),
        (
            "no model",
            ep::ForwardRequest {
                model: None,
                ..ok.clone()
            },
            tonic::Code::InvalidArgument,
            "model: required",
        ),
        (
            "nan weight",
            ep::ForwardRequest {
                routes: vec![
                    route(0),
                    ep::RowRoutes {
                        routes: vec![ep::ExpertRoute {
                            expert: 1,
                            weight: f32::NAN,
                        }],
                    },
                ],
                ..ok.clone()
            },
            tonic::Code::InvalidArgument,
            "routes[1].routes[0].weight: NaN is not finite",
        ),
    ];
    for (what, req, code, message) in cases {
        let err = c.forward(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(err.message().contains(message), "{what}: {}", err.message());
    }
}

/// Only the sequences that need an unavailable expert fail; the others in the same
/// batches finish with their all-local tokens. Real experts, with one `(layer, expert)`
/// made unreachable.
#[tokio::test]
async fn only_the_sequences_that_need_a_missing_expert_fail() {
    use candle_core::{Device, Tensor};
    use switchyard_worker::engine::sampling::SamplingConfig;
    use switchyard_worker::engine::{
        EngineConfig, EngineHandle, EngineObserver, Event, GenerationRequest, Occupancy, StepReport,
    };
    use switchyard_worker::model::LoadedModel;
    use switchyard_worker::model::moe::{
        ExpertBackend, ExpertError, LocalExperts, Pending, Routes,
    };
    use switchyard_worker::model::quant::Quantization;

    #[derive(Debug)]
    struct Missing {
        inner: LocalExperts,
        layer: usize,
        expert: u32,
    }
    impl ExpertBackend for Missing {
        fn dispatch(
            &self,
            layer: usize,
            xs: &Tensor,
            routes: &Routes,
        ) -> Result<Pending, ExpertError> {
            if layer == self.layer {
                let rows: Vec<u32> = routes
                    .pairs()
                    .filter(|p| p.1 == self.expert)
                    .map(|p| p.0)
                    .collect();
                if !rows.is_empty() {
                    return Err(ExpertError::Unavailable {
                        rows,
                        message: format!("layer {layer} expert {} is unreachable", self.expert),
                    });
                }
            }
            self.inner.dispatch(layer, xs, routes)
        }
    }
    /// Records which (layer, expert) pairs a run used.
    #[derive(Default)]
    struct Used(std::sync::Mutex<std::collections::BTreeSet<(usize, u32)>>);
    impl EngineObserver for Used {
        fn step(&self, r: &StepReport<'_>) {
            let mut used = self.0.lock().expect("lock");
            for (l, routes) in r.routes {
                used.extend(routes.experts.iter().map(|&e| (*l, e)));
            }
        }
        fn occupancy(&self, _: Occupancy) {}
    }

    let model = fixture_model("qwen3_moe");
    let engine = |backend: Option<(usize, u32)>, observer: Arc<dyn EngineObserver>| {
        let loaded = LoadedModel::load_with(
            &model,
            None,
            Quantization::Auto,
            &Device::Cpu,
            |cfg, ckpt, p| {
                let inner = LocalExperts::load(cfg, ckpt, p, &Device::Cpu)?;
                Ok(match backend {
                    Some((layer, expert)) => Arc::new(Missing {
                        inner,
                        layer,
                        expert,
                    }),
                    None => Arc::new(inner),
                })
            },
        )
        .expect("load");
        EngineHandle::start(
            Arc::new(loaded.transformer),
            EngineConfig {
                block_size: 16,
                kv_blocks: 64,
                max_running: 8,
                step_token_budget: 64,
                max_context: 512,
                overlap: false,
                prefix_cache: true,
            },
            observer,
        )
        .expect("engine")
    };
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|i| (0..5).map(|j| (i * 37 + j * 11) % 200 + 3).collect())
        .collect();
    let request = |p: &Vec<u32>| GenerationRequest {
        prompt: p.clone(),
        max_tokens: 8,
        sampling: SamplingConfig::greedy(),
        stop_token_ids: Vec::new(),
        deadline: None,
        rank: 0,
        cache_salt: 0,
    };
    async fn run(
        engine: &EngineHandle,
        req: GenerationRequest,
    ) -> Result<Vec<u32>, (String, bool)> {
        let mut rx = engine.submit(req).expect("submit");
        let mut ids = Vec::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Token { id, .. } => ids.push(id),
                Event::Finished { .. } => return Ok(ids),
                Event::Failed {
                    message,
                    unavailable,
                } => return Err((message, unavailable)),
                Event::Started { .. } => {}
            }
        }
        Err(("dropped".into(), false))
    }
    // Alone, all-local: each prompt's tokens and the experts it used.
    let mut alone = Vec::new();
    for p in &prompts {
        let used = Arc::new(Used::default());
        let e = engine(None, used.clone());
        let ids = run(&e, request(p)).await.expect("local run");
        let set = used.0.lock().expect("lock").clone();
        alone.push((ids, set));
    }
    // An expert some prompts use and others do not.
    let candidates: std::collections::BTreeSet<(usize, u32)> =
        alone.iter().flat_map(|(_, s)| s.iter().copied()).collect();
    let (layer, expert) = candidates
        .into_iter()
        .find(|k| {
            let users = alone.iter().filter(|(_, s)| s.contains(k)).count();
            users > 0 && users < alone.len()
        })
        .expect("an expert used by some prompts only");
    let e = engine(Some((layer, expert)), Arc::new(Used::default()));
    let results = futures::future::join_all(prompts.iter().map(|p| run(&e, request(p)))).await;
    for ((want, used), got) in alone.iter().zip(results) {
        if used.contains(&(layer, expert)) {
            let (message, unavailable) = got.expect_err("needs the missing expert");
            assert!(unavailable && message.contains("unreachable"), "{message}");
        } else {
            assert_eq!(&got.expect("unaffected"), want);
        }
    }
}
