//! Tier 4: tier quotas shared by several frontends (`admission.quotaScope`). Three frontend
//! processes of the tiny fixture model serve one tenant, which offers five times its
//! request quota, spread over all three, for a measured window. Without a quota scope each
//! frontend would admit the whole quota (three times it together); with one, the three
//! together admit what one frontend alone would: `redis` exactly (one GCRA in Redis, here
//! a `redis-server` of the test's own), `split` to within the rounding of ⌈quota ÷ 3⌉.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use switchyard_proto::inference::v1::{self as pb, inference_client::InferenceClient};
use switchyard_tests::process::TempDir;
use switchyard_tests::worker::{fixture_model, greedy_request};
use switchyard_tests::{FrontendProcess, RedisServer};
use tonic::transport::Channel;

const KEY: &str = "acme-key-0123456789";
/// The tier's request quota a minute: a bucket of 60, then one a second.
const QUOTA: u64 = 60;
/// The measured window.
const WINDOW: Duration = Duration::from_secs(20);
/// Offered load, as a multiple of the quota's rate.
const OFFERED: u64 = 5;
/// Three addresses that count three frontends (`peers` resolves each).
const PEERS: &str = "127.0.0.1,127.0.0.2,127.0.0.3";

/// Tier `free`: `QUOTA` requests a minute and a token quota that never binds (so both
/// buckets are charged and refunded); the key `KEY` is tenant `acme`.
fn admission_config(dir: &Path, scope: serde_json::Value) -> PathBuf {
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).expect("keys dir");
    std::fs::write(keys.join("tenants"), format!("acme:{KEY}:free\n")).expect("keys");
    let config = serde_json::json!({
        "apiKeysDir": keys,
        "defaultTier": "free",
        "tiers": [{"name": "free", "priority": "normal", "weight": 1,
                   "requestsPerMinute": QUOTA, "tokensPerMinute": 1_000_000}],
        "maxQueued": 256,
        "defaultDeadlineSeconds": 30,
        "quotaScope": scope,
    });
    let path = dir.join("admission.json");
    std::fs::write(&path, config.to_string()).expect("admission config");
    path
}

/// `body` as tenant `acme` sends it.
fn authorized(body: pb::GenerateRequest) -> tonic::Request<pb::GenerateRequest> {
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {KEY}").parse().expect("ascii"),
    );
    request
}

/// Three frontends with `config`, started together; returns once each counts three.
async fn three_frontends(config: &Path) -> Vec<FrontendProcess> {
    let config = config.to_str().expect("utf-8");
    // Generous for a loaded 2-core machine: a Redis call that misses it is decided
    // locally, which this test must not see.
    let args = [
        "--admission-config",
        config,
        "--quota-redis-timeout-ms",
        "250",
    ];
    let model = fixture_model("qwen3_moe");
    let (a, b, c) = tokio::join!(
        FrontendProcess::start(&model, &args),
        FrontendProcess::start(&model, &args),
        FrontendProcess::start(&model, &args),
    );
    let frontends = vec![
        a.expect("frontend"),
        b.expect("frontend"),
        c.expect("frontend"),
    ];
    for f in &frontends {
        let started = Instant::now();
        while f.metric("switchyard_admission_quota_frontends").await != Some(3.0) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the frontend never counted 3 peers:\n{}",
                f.process().log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    frontends
}

/// What the tenant got in the window.
#[derive(Debug, Default)]
struct Tally {
    accepted: u64,
    refused: u64,
    /// Accepted per frontend.
    by_frontend: [u64; 3],
    /// Anything but OK or RESOURCE_EXHAUSTED.
    other: Vec<String>,
}

/// Offers `OFFERED` × the quota's rate for `WINDOW`, round-robin over `frontends`, each
/// request on its own schedule (a slow reply does not slow the offer).
async fn offer(frontends: &[FrontendProcess]) -> Tally {
    let mut clients = Vec::new();
    for f in frontends {
        clients.push(
            InferenceClient::<Channel>::connect(f.endpoint())
                .await
                .expect("connect"),
        );
    }
    let count = OFFERED * QUOTA * WINDOW.as_secs() / 60;
    let every = WINDOW / u32::try_from(count).expect("count");
    let start = tokio::time::Instant::now();
    let mut calls = Vec::new();
    for i in 0..count {
        tokio::time::sleep_until(start + every * u32::try_from(i).expect("i")).await;
        let which = (i % 3) as usize;
        let mut client = clients[which].clone();
        calls.push(tokio::spawn(async move {
            let request = authorized(greedy_request("hello there", 1));
            (which, client.generate(request).await.map(drop))
        }));
    }
    let mut tally = Tally::default();
    for call in calls {
        let (which, result) = call.await.expect("the call's task");
        match result {
            Ok(()) => {
                tally.accepted += 1;
                tally.by_frontend[which] += 1;
            }
            Err(s) if s.code() == tonic::Code::ResourceExhausted => tally.refused += 1,
            Err(s) => tally.other.push(format!("{:?}: {}", s.code(), s.message())),
        }
    }
    tally
}

/// The bucket plus the window's refill: what one frontend alone admits from a full bucket
/// under this offer. Asserts the tally is within 10 % of it (of the refill, above) and
/// returns the ratio.
fn assert_within_quota(mode: &str, tally: &Tally) -> f64 {
    assert!(tally.other.is_empty(), "{mode}: {:?}", tally.other);
    let burst = QUOTA as f64;
    let refill = QUOTA as f64 * WINDOW.as_secs_f64() / 60.0;
    let allowed = burst + refill;
    let accepted = tally.accepted as f64;
    let ratio = accepted / allowed;
    eprintln!(
        "quotas ({mode}): accepted {} of {} offered (per frontend {:?}) in {WINDOW:?}; one \
         frontend alone: {allowed}; ratio {ratio:.3}, past the bucket {:.3} of the rate",
        tally.accepted,
        tally.accepted + tally.refused,
        tally.by_frontend,
        (accepted - burst) / refill,
    );
    assert!(
        accepted <= burst + 1.1 * refill,
        "{mode}: {tally:?} is over the quota (bucket {burst} + 1.1 × {refill})"
    );
    assert!(
        accepted >= 0.9 * allowed,
        "{mode}: {tally:?} is under 0.9 × {allowed}"
    );
    ratio
}

#[tokio::test]
async fn in_redis_mode_three_frontends_together_admit_one_quota() {
    let redis = RedisServer::start().await.expect("redis-server");
    let dir = TempDir::new("quotas").expect("dir");
    let prefix = format!("switchyard/test-{}/", std::process::id());
    let config = admission_config(
        dir.path(),
        serde_json::json!({
            "mode": "redis",
            "peers": PEERS,
            "redisAddress": redis.address(),
            "redisKeyPrefix": prefix,
        }),
    );
    let frontends = three_frontends(&config).await;
    let tally = offer(&frontends).await;
    let mut fallbacks = 0.0;
    for f in &frontends {
        fallbacks += f
            .metric("switchyard_admission_quota_fallbacks_total")
            .await
            .expect("the fallback counter");
    }
    assert_eq!(
        fallbacks, 0.0,
        "Redis decided every request (else this measured split mode)"
    );
    assert_within_quota("redis", &tally);
    // The state is Redis's, under the deployment's prefix: the request bucket's TAT lies
    // ahead while the bucket refills (the token bucket, far from spent, is full again
    // within milliseconds, and a full bucket has no key).
    let key = format!("{prefix}acme/requests");
    assert_eq!(
        redis.query(&["EXISTS", &key]).await.expect("EXISTS"),
        ":1",
        "{key}"
    );
    // Redis gone: a request is decided by the frontend's split share (whose bucket this
    // frontend never used), at once, and counted.
    redis.process().kill();
    // Past the wait Redis last gave this tenant (one request a second): until then the
    // frontend refuses it without asking, exactly as Redis would.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut client = InferenceClient::connect(frontends[0].endpoint())
        .await
        .expect("connect");
    let started = Instant::now();
    client
        .generate(authorized(greedy_request("hello there", 1)))
        .await
        .expect("decided locally, not refused for Redis being away");
    assert!(started.elapsed() < Duration::from_secs(2), "no hang");
    assert_eq!(
        frontends[0]
            .metric("switchyard_admission_quota_fallbacks_total")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn in_split_mode_each_of_three_frontends_admits_a_third() {
    let dir = TempDir::new("quotas").expect("dir");
    let config = admission_config(
        dir.path(),
        serde_json::json!({"mode": "split", "peers": PEERS}),
    );
    let frontends = three_frontends(&config).await;
    let tally = offer(&frontends).await;
    assert_within_quota("split", &tally);
    // Each enforced ⌈60 ÷ 3⌉ = 20 a minute: its share of the bucket and the refill.
    for (f, accepted) in frontends.iter().zip(tally.by_frontend) {
        assert!(
            (20..=28).contains(&accepted),
            "{accepted} accepted by {}",
            f.endpoint()
        );
    }
}
