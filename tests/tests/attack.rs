//! Tier 4: admission under attack, end to end — the `switchyard bench` scenarios (the
//! load generator's own code) against a real frontend process: `flood` (one tenant at
//! 50× its quota) and `h2-abuse` (rapid reset, header floods, connection floods), each
//! compared with the `baseline` run of the same legitimate traffic.

use std::path::Path;
use std::time::Duration;

use switchyard_cli::loadgen::{
    self, BenchConfig, Load, ProgressMode, Report, Scenario, ScenarioKind, Tenant, VocabRange,
    Workload,
};
use switchyard_proto::inference::v1::Priority;
use switchyard_tests::FrontendProcess;
use switchyard_tests::process::TempDir;
use switchyard_tests::worker::fixture_model;

const LEGIT: [(&str, &str); 3] = [
    ("team-a", "team-a-key-0123456789"),
    ("team-b", "team-b-key-0123456789"),
    ("team-c", "team-c-key-0123456789"),
];
const ATTACKER: (&str, &str) = ("attacker", "attacker-key-0123456789");

/// The tests of this file measure latency: they must not run at the same time.
static EXCLUSIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The legitimate tenants in tier `standard` (600 requests a minute each), the attacker in
/// tier `free` (12 a minute, burst 12); tokens unlimited.
async fn frontend(dir: &Path) -> FrontendProcess {
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).expect("dir");
    let mut lines: String = LEGIT
        .iter()
        .map(|(t, k)| format!("{t}:{k}:standard\n"))
        .collect();
    lines.push_str(&format!("{}:{}:free\n", ATTACKER.0, ATTACKER.1));
    std::fs::write(keys.join("tenants"), lines).expect("keys");
    let config = serde_json::json!({
        "apiKeysDir": keys,
        "tiers": [
            {"name": "standard", "priority": "normal", "weight": 1, "requestsPerMinute": 600},
            {"name": "free", "priority": "normal", "weight": 1, "requestsPerMinute": 12}
        ],
        "maxQueued": 64,
        "defaultDeadlineSeconds": 10
    });
    let path = dir.join("admission.json");
    std::fs::write(&path, config.to_string()).expect("config");
    FrontendProcess::start(
        &fixture_model("qwen3_moe"),
        &["--admission-config", path.to_str().expect("utf-8")],
    )
    .await
    .expect("frontend")
}

fn tenants(attacker: bool) -> Vec<Tenant> {
    LEGIT
        .iter()
        .chain(attacker.then_some(&ATTACKER))
        .map(|(t, k)| Tenant::parse(&format!("{t}:{k}:1")).expect("tenant"))
        .collect()
}

fn workload() -> Workload {
    Workload {
        model: String::new(),
        prompt_tokens: 128,
        prompt_tokens_jitter: 0,
        output_tokens: 8,
        vocab: VocabRange {
            start: 100,
            end: 300,
        },
        priority: Priority::Unspecified,
        shared_prefix: Vec::new(),
    }
}

/// Runs `kind` for `seconds` with the legitimate tenants at 6 requests/s in all (each
/// well under its quota of 10/s) and the attacker, if any, at 10 requests/s: 50× its
/// quota of 0.2/s. (The attack volume is kept at what a debug build on two cores, shared
/// with the attacker's own client, absorbs without the client itself starving the server;
/// `docs/benchmarks.md` has a release-build flood at 50 requests/s.)
async fn run(f: &FrontendProcess, kind: ScenarioKind, seconds: u64) -> Report {
    let (scenario, total) = Scenario::named(
        kind,
        tenants(kind == ScenarioKind::Flood),
        workload(),
        6.0,
        10.0,
    )
    .expect("scenario");
    let channel = switchyard_cli::client::connect(&f.endpoint())
        .await
        .expect("connect");
    loadgen::run_bench(
        vec![channel],
        BenchConfig {
            ttft_slo: None,
            scenario,
            load: Load::Open { rate: total },
            duration: Some(Duration::from_secs(seconds)),
            requests: None,
            warmup: Duration::from_millis(500),
            timeout: Duration::from_secs(10),
            seed: 7,
            progress: ProgressMode::Off,
            series: None,
            openai: None,
        },
        std::future::pending(),
    )
    .await
    .expect("bench")
}

/// The legitimate tenants' requests, successes and p99 TTFT (ms): the largest of their
/// p99s, the same measure with and without attackers.
fn legit(report: &Report) -> (u64, u64, f64) {
    let groups: Vec<_> = report
        .tenants
        .iter()
        .filter(|t| LEGIT.iter().any(|(n, _)| *n == t.name))
        .collect();
    let requests = groups.iter().map(|g| g.requests).sum();
    let ok = groups.iter().map(|g| g.ok).sum();
    let p99 = groups
        .iter()
        .filter_map(|g| g.ttft.as_ref().map(|t| t.p99_ms))
        .fold(0.0, f64::max);
    (requests, ok, p99)
}

#[tokio::test]
async fn a_flooding_tenant_is_refused_fast_and_the_others_keep_their_latency() {
    let _one_at_a_time = EXCLUSIVE.lock().await;
    let dir = TempDir::new("attack").expect("dir");
    let f = frontend(dir.path()).await;
    let baseline = run(&f, ScenarioKind::Baseline, 8).await;
    let flood = run(&f, ScenarioKind::Flood, 8).await;
    let (b_req, b_ok, b_p99) = legit(&baseline);
    let (f_req, f_ok, f_p99) = legit(&flood);
    eprintln!(
        "baseline: {b_ok}/{b_req} ok, p99 TTFT {b_p99:.1} ms; flood: {f_ok}/{f_req} ok, p99 TTFT {f_p99:.1} ms"
    );
    assert!(b_req > 0 && f_req > 0);
    assert_eq!(b_ok, b_req, "baseline: every legitimate request succeeds");
    assert!(
        f_ok as f64 >= 0.999 * f_req as f64,
        "legitimate success {f_ok}/{f_req} under the flood"
    );
    // Within 1.5× of the baseline, plus 10 ms: on TTFTs of 15–25 ms in a debug build, with
    // the attacker's client on the same two cores, each tenant's p99 (of ~17 samples) is
    // close to its maximum and one scheduling hiccup moves it by several ms. The
    // release-build figures (1.0× of baseline) are in docs/benchmarks.md.
    assert!(
        f_p99 <= 1.5 * b_p99 + 10.0,
        "legitimate p99 TTFT {f_p99:.1} ms against {b_p99:.1} ms at baseline"
    );
    let attacker = flood
        .tenants
        .iter()
        .find(|t| t.name == "attacker")
        .expect("attacker");
    eprintln!("attacker: {:?}", attacker.errors);
    assert!(attacker.ok > 0, "its quota's worth gets through");
    assert!(
        attacker.failed > attacker.ok * 5,
        "the excess is refused: {} ok, {} refused",
        attacker.ok,
        attacker.failed
    );
    assert_eq!(
        attacker.errors.get("resource_exhausted").copied(),
        Some(attacker.failed),
        "refused for quota, not shed or failed: {:?}",
        attacker.errors
    );
    assert_eq!(
        attacker.failed_with_pushback, attacker.failed,
        "every refusal says when to retry"
    );
    let refusal_p99 = attacker.failed_e2e.as_ref().map_or(0.0, |l| l.p99_ms);
    assert!(
        refusal_p99 < 1000.0,
        "refusals take {refusal_p99} ms at p99"
    );
}

#[tokio::test]
async fn http2_abuse_costs_the_attacker_its_connections_not_others_their_latency() {
    use switchyard_cli::loadgen::abuse;
    let _one_at_a_time = EXCLUSIVE.lock().await;
    let dir = TempDir::new("attack").expect("dir");
    let f = frontend(dir.path()).await;
    let baseline = run(&f, ScenarioKind::Baseline, 8).await;
    let target = f.endpoint().trim_start_matches("http://").to_string();
    let length = Duration::from_secs(9);
    let attack = {
        let target = target.clone();
        tokio::spawn(async move {
            tokio::join!(
                abuse::rapid_reset(&target, length),
                abuse::header_flood(&target, length),
                abuse::connection_flood(&target, 100, length),
            )
        })
    };
    let during = run(&f, ScenarioKind::H2Abuse, 8).await;
    let (reset, headers, conns) = attack.await.expect("attack");
    let (b_req, b_ok, b_p99) = legit(&baseline);
    let (d_req, d_ok, d_p99) = legit(&during);
    eprintln!(
        "baseline p99 TTFT {b_p99:.1} ms ({b_ok}/{b_req}); under abuse {d_p99:.1} ms ({d_ok}/{d_req})\n{reset:?}\n{headers:?}\n{conns:?}"
    );
    assert_eq!(d_ok, d_req, "every legitimate request succeeds");
    // Within 1.2× plus the same 10 ms noise allowance as the flood test.
    assert!(
        d_p99 <= 1.2 * b_p99 + 10.0,
        "legitimate p99 TTFT moved from {b_p99:.1} to {d_p99:.1} ms"
    );
    // Rapid reset: connections are closed after a bounded number of resets.
    assert!(reset.closed_by_server >= 1, "{reset:?}");
    assert!(
        reset.attempts / reset.connections.max(1) < 10_000,
        "resets per connection are bounded: {reset:?}"
    );
    // Oversized header lists never get through.
    assert!(
        headers.attempts > 0 && headers.closed_by_server == headers.attempts,
        "{headers:?}"
    );
    // Connections over the per-address cap (64) are closed on accept.
    assert!(conns.closed_by_server >= 100 - 64, "{conns:?}");
}
