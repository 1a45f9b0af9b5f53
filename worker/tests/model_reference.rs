//! Numerics against Python `transformers`: for every committed fixture checkpoint
//! (`tests/fixtures/models/<name>/`, made by `hack/fixtures/generate.py`), the logits of a
//! full prefill and of token-by-token decode through the paged KV cache match the
//! reference at every position, and 16 greedy tokens match exactly. The engine's batched
//! generation gives each prompt the same tokens as running it alone, and the same with the
//! prefix cache serving a shared prefix as without it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use switchyard_worker::engine::sampling::SamplingConfig;
use switchyard_worker::engine::{EngineConfig, EngineHandle, Event, GenerationRequest, NoObserver};
use switchyard_worker::model::LoadedModel;
use switchyard_worker::model::attention::{ForwardBatch, LogitRows, PagedKv, SeqStep};
use switchyard_worker::model::quant::Quantization;

/// f32 logits may differ from PyTorch's by summation order only.
const TOLERANCE_F32: f32 = 1e-4;
/// bf16 weights are upcast to f32 on both sides, so the same bound holds.
const BLOCK: usize = 4;

/// Every fixture the generator writes; a missing one fails the test.
const FIXTURES: &[&str] = &[
    "llama",
    "qwen2",
    "qwen3",
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

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

struct Reference {
    input_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy_prompt: Vec<u32>,
    greedy: Vec<u32>,
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .and_then(|t| t.to_vec1::<i64>())
        .expect("i64 ids")
        .into_iter()
        .map(|i| u32::try_from(i).expect("token id"))
        .collect()
}

fn reference(dir: &Path) -> Reference {
    let file = dir.join("reference.safetensors");
    let t = candle_core::safetensors::load(&file, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let get = |k: &str| {
        t.get(k)
            .unwrap_or_else(|| panic!("{}: no `{k}`", file.display()))
    };
    Reference {
        input_ids: ids(get("input_ids")),
        logits: get("logits").to_vec2::<f32>().expect("f32 [T, V] logits"),
        greedy_prompt: ids(get("greedy_prompt_ids")),
        greedy: ids(get("greedy_ids")),
    }
}

/// The device the fidelity checks run on: the CPU, or `SWITCHYARD_TEST_DEVICE` (`cuda:0`
/// with a `--features cuda` build; `hack/gpu-check.sh` sets it).
fn device() -> Device {
    let name = std::env::var("SWITCHYARD_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    switchyard_worker::model::parse_device(&name)
        .unwrap_or_else(|e| panic!("SWITCHYARD_TEST_DEVICE={name}: {e}"))
}

fn load(name: &str) -> LoadedModel {
    LoadedModel::load(
        &fixture_dir(name),
        Some(DType::F32),
        Quantization::Auto,
        &device(),
    )
    .unwrap_or_else(|e| panic!("loading fixture {name}: {e}"))
}

/// Runs `tokens` after `cached` tokens already in `kv`, returning every new row's logits.
fn run(
    model: &LoadedModel,
    kv: &PagedKv,
    blocks: &[u32],
    cached: usize,
    tokens: &[u32],
) -> Vec<Vec<f32>> {
    let step = SeqStep {
        tokens,
        cached,
        blocks,
        logits: LogitRows::All,
    };
    let batch = ForwardBatch::new(&[step], BLOCK, &device()).expect("batch");
    let (logits, _) = model
        .transformer
        .forward(std::slice::from_ref(&batch), kv)
        .expect("forward");
    logits.to_vec2::<f32>().expect("logits")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vocab size");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn kv_for(model: &LoadedModel, tokens: usize) -> (PagedKv, Vec<u32>) {
    let blocks = tokens.div_ceil(BLOCK) + 1;
    // Blocks in reverse order, so the test also proves the slot mapping (not identity).
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let kv = PagedKv::new(&model.config, blocks * BLOCK, DType::F32, &device()).expect("kv");
    (kv, table)
}

fn check_logits(name: &str) {
    check_against_reference(
        name,
        &load(name),
        &reference(&fixture_dir(name)),
        TOLERANCE_F32,
    );
}

/// Logits within tolerance at every position: full prefill, token by token through the
/// cache, and one chunked step, each `|Δlogit|` at most `tolerance`. `name` labels the
/// failures.
fn check_against_reference(name: &str, model: &LoadedModel, r: &Reference, tolerance: f32) {
    assert_eq!(r.logits.len(), r.input_ids.len());

    // Full prefill.
    let (kv, table) = kv_for(model, r.input_ids.len());
    let prefill = run(model, &kv, &table, 0, &r.input_ids);
    for (pos, (got, want)) in prefill.iter().zip(&r.logits).enumerate() {
        let d = max_diff(got, want);
        assert!(
            d <= tolerance,
            "{name}: prefill position {pos}: max |Δlogit| = {d}"
        );
    }

    // Token by token through the cache, plus one chunked step (prefill 3, then 2 at once).
    let (kv, table) = kv_for(model, r.input_ids.len());
    for (pos, want) in r.logits.iter().enumerate() {
        let got = run(model, &kv, &table, pos, &r.input_ids[pos..=pos]);
        let d = max_diff(&got[0], want);
        assert!(
            d <= tolerance,
            "{name}: decode position {pos}: max |Δlogit| = {d}"
        );
    }
    let (kv, table) = kv_for(model, r.input_ids.len());
    run(model, &kv, &table, 0, &r.input_ids[..3]);
    let got = run(model, &kv, &table, 3, &r.input_ids[3..5]);
    for (i, row) in got.iter().enumerate() {
        let d = max_diff(row, &r.logits[3 + i]);
        assert!(
            d <= tolerance,
            "{name}: chunked position {}: max |Δlogit| = {d}",
            3 + i
        );
    }
}

fn engine(model: &LoadedModel) -> EngineHandle {
    engine_with(model, true)
}

fn engine_with(model: &LoadedModel, prefix_cache: bool) -> EngineHandle {
    engine_sized(model, prefix_cache, 256, Arc::new(NoObserver))
}

fn engine_sized(
    model: &LoadedModel,
    prefix_cache: bool,
    kv_blocks: usize,
    observer: Arc<dyn switchyard_worker::engine::EngineObserver>,
) -> EngineHandle {
    // The engine takes the transformer by Arc; load a second copy for it.
    let m = LoadedModel::load(&model.dir, Some(DType::F32), Quantization::Auto, &device())
        .expect("reload");
    EngineHandle::start(
        Arc::new(m.transformer),
        EngineConfig {
            block_size: BLOCK,
            kv_blocks,
            max_running: 16,
            step_token_budget: 16,
            max_context: model.config.max_position_embeddings,
            overlap: false,
            prefix_cache,
        },
        observer,
    )
    .expect("engine")
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens,
        sampling: SamplingConfig::greedy(),
        stop_token_ids: Vec::new(),
        deadline: None,
        rank: 0,
        cache_salt: 0,
    }
}

async fn collect(rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> Vec<u32> {
    collect_cached(rx).await.0
}

/// The tokens, and how many prompt tokens came from the prefix cache.
async fn collect_cached(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> (Vec<u32>, usize) {
    let mut out = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { id, .. } => out.push(id),
            Event::Started { .. } => {}
            Event::Finished {
                cached_prompt_tokens,
                ..
            } => return (out, cached_prompt_tokens),
            Event::Failed { message, .. } => panic!("generation failed: {message}"),
        }
    }
    panic!("the engine dropped the sequence without finishing it")
}

async fn check_greedy_and_batching(name: &str) {
    let model = load(name);
    let r = reference(&fixture_dir(name));
    let engine = engine(&model);
    let alone = collect(
        engine
            .submit(greedy(r.greedy_prompt.clone(), 16))
            .expect("submit"),
    )
    .await;
    assert_eq!(
        alone, r.greedy,
        "{name}: greedy continuation differs from transformers"
    );

    // N different prompts at once (prefixes of the reference input, different lengths, so
    // the batch mixes prefill chunks and decodes) give each the tokens it gets alone.
    let prompts: Vec<Vec<u32>> = (0..5)
        .map(|i| r.input_ids[..r.input_ids.len() - i * 2].to_vec())
        .collect();
    // One by one, each prompt after the first finds the blocks of the prefix it shares
    // with the one before in the prefix cache; an engine without the cache computes
    // everything: the same tokens.
    let mut solo = Vec::new();
    let mut hits = 0;
    for p in &prompts {
        let (tokens, cached) =
            collect_cached(engine.submit(greedy(p.clone(), 8)).expect("submit")).await;
        solo.push(tokens);
        hits += cached;
    }
    assert!(
        hits > 0,
        "{name}: the repeated prefixes hit the prefix cache"
    );
    let uncached = engine_with(&model, false);
    let mut computed = Vec::new();
    for p in &prompts {
        computed.push(collect(uncached.submit(greedy(p.clone(), 8)).expect("submit")).await);
    }
    assert_eq!(
        solo, computed,
        "{name}: tokens with the prefix cache differ from tokens without it"
    );
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| engine.submit(greedy(p.clone(), 8)).expect("submit"))
        .collect();
    let mut together = Vec::new();
    for rx in receivers {
        together.push(collect(rx).await);
    }
    assert_eq!(
        together, solo,
        "{name}: batched generation differs from one-by-one"
    );
}

macro_rules! family_tests {
    ($($fixture:ident),* $(,)?) => {
        mod logits {
            $(#[test] fn $fixture() { super::check_logits(stringify!($fixture)); })*
        }
        mod greedy {
            $(#[tokio::test] async fn $fixture() { super::check_greedy_and_batching(stringify!($fixture)).await; })*
        }
        #[test]
        fn every_fixture_has_a_test() {
            let tested = [$(stringify!($fixture)),*];
            assert_eq!(tested.as_slice(), FIXTURES);
            for name in FIXTURES {
                assert!(fixture_dir(name).join("config.json").is_file(), "fixture {name} is missing");
            }
        }
    };
}

family_tests!(
    llama,
    qwen2,
    qwen3,
    mixtral,
    qwen2_moe,
    qwen2_moe_norm,
    qwen3_moe,
    olmoe,
    olmoe_bf16,
    deepseek_v2_greedy,
    deepseek_v2_group,
    deepseek_v3,
    deepseek_v3_yarn,
);

/// A copy of a fixture with `edit` applied to its config.json, or with a file removed.
fn broken_copy(
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
    remove: Option<&str>,
) -> PathBuf {
    // Tests run in parallel and may break the same fixture: one directory per copy.
    static COPIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let src = fixture_dir(name);
    let dst = std::env::temp_dir().join(format!(
        "switchyard-broken-{name}-{}-{n}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).expect("temp dir");
    for entry in std::fs::read_dir(&src).expect("fixture dir") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, dst.join(path.file_name().expect("name"))).expect("copy");
    }
    let config = dst.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).expect("config")).expect("json");
    edit(&mut json);
    std::fs::write(&config, json.to_string()).expect("write config");
    if let Some(file) = remove {
        std::fs::remove_file(dst.join(file)).expect("remove");
    }
    dst
}

/// Removes every tensor `strip` selects from the weight files of `dir` (and from the shard
/// index, if there is one); returns how many it removed.
fn strip_tensors(dir: &Path, strip: impl Fn(&str) -> bool) -> usize {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).expect("copy dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !(name.starts_with("model") && name.ends_with(".safetensors")) {
            continue;
        }
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("weights");
        let before = tensors.len();
        tensors.retain(|k, _| !strip(k));
        removed += before - tensors.len();
        candle_core::safetensors::save(&tensors, &path).expect("rewrite weights");
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&index).expect("index")).expect("json");
        if let Some(map) = json["weight_map"].as_object_mut() {
            map.retain(|k, _| !strip(k));
        }
        std::fs::write(&index, json.to_string()).expect("write index");
    }
    removed
}

fn load_error(dir: &Path) -> String {
    let err = LoadedModel::load(dir, Some(DType::F32), Quantization::Auto, &Device::Cpu)
        .expect_err("must not load");
    let _ = std::fs::remove_dir_all(dir);
    err.to_string()
}

#[test]
fn malformed_checkpoints_fail_with_the_file_the_key_and_the_expectation() {
    // The config disagrees with the weights: the tensor, its file and both shapes.
    let dir = broken_copy("mixtral", |c| c["num_key_value_heads"] = 2.into(), None);
    let e = load_error(&dir);
    assert!(
        e.contains("model-0000") && e.contains("k_proj.weight") && e.contains("[32, 64]"),
        "{e}"
    );
    // A tensor is missing: its name and expected shape.
    let dir = broken_copy("qwen3", |c| c["tie_word_embeddings"] = false.into(), None);
    let e = load_error(&dir);
    assert!(
        e.contains("lm_head.weight") && e.contains("tie_word_embeddings"),
        "{e}"
    );
    // An unsupported family, and a bad value.
    let dir = broken_copy("olmoe", |c| c["model_type"] = "gpt_neox".into(), None);
    let e = load_error(&dir);
    assert!(
        e.contains("config.json") && e.contains("\"gpt_neox\"") && e.contains("supported"),
        "{e}"
    );
    let dir = broken_copy("olmoe", |c| c["num_experts_per_tok"] = 9.into(), None);
    let e = load_error(&dir);
    assert!(
        e.contains("num_experts_per_tok") && e.contains("at most"),
        "{e}"
    );
    // No weights at all.
    let dir = broken_copy("qwen2", |_| {}, Some("model.safetensors"));
    let e = load_error(&dir);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn bf16_weights_on_the_cpu_match_the_reference() {
    // olmoe_bf16's reference was computed from its bf16 weights upcast to f32. A CPU
    // without AVX512-BF16 multiplies exactly that (f32 arithmetic, bf16 storage). One with
    // it multiplies bf16 pairs (`vdpbf16ps`, as llama.cpp and PyTorch do): each product's
    // inputs are rounded to bf16 (8 significant bits, relative error ≤ 2⁻⁹) and summed in
    // f32, which moves these logits (|logit| up to ~10) by a few hundredths, not more.
    #[cfg(target_arch = "x86_64")]
    let bf16_pairs = std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512bw");
    #[cfg(not(target_arch = "x86_64"))]
    let bf16_pairs = false;
    let tolerance = if bf16_pairs { 0.05 } else { TOLERANCE_F32 };
    let name = "olmoe_bf16";
    let model = LoadedModel::load(
        &fixture_dir(name),
        Some(DType::BF16),
        Quantization::Auto,
        &Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("loading {name} as bf16: {e}"));
    assert_eq!(model.transformer.precision().weights, DType::BF16);
    assert_eq!(model.transformer.dtype(), DType::F32);
    check_against_reference(
        &format!("{name} (bf16 weights)"),
        &model,
        &reference(&fixture_dir(name)),
        tolerance,
    );
}

/// A Qwen2 checkpoint without its q/k/v biases used to load (biases were read only when
/// present) and compute wrong logits; the family declares them, so now it fails and names
/// the first missing one, whichever projection and layer it is.
#[test]
fn qwen2_without_qkv_biases_fails_naming_the_bias() {
    let dir = broken_copy("qwen2", |_| {}, None);
    let removed = strip_tensors(&dir, |k| k.ends_with("_proj.bias"));
    assert_eq!(removed, 6, "q, k and v biases of 2 layers");
    let e = load_error(&dir);
    assert!(
        e.contains("tensor `model.layers.0.self_attn.q_proj.bias` is missing"),
        "{e}"
    );
    let dir = broken_copy("qwen2", |_| {}, None);
    strip_tensors(&dir, |k| k == "model.layers.1.self_attn.v_proj.bias");
    let e = load_error(&dir);
    assert!(
        e.contains("tensor `model.layers.1.self_attn.v_proj.bias` is missing"),
        "{e}"
    );
    // Qwen2-MoE declares the same biases (transformers v5's `qkv_bias`, true by default).
    let dir = broken_copy("qwen2_moe", |_| {}, None);
    strip_tensors(&dir, |k| k == "model.layers.0.self_attn.k_proj.bias");
    let e = load_error(&dir);
    assert!(
        e.contains("tensor `model.layers.0.self_attn.k_proj.bias` is missing"),
        "{e}"
    );
}

/// A Qwen3 checkpoint without its q/k norms used to load as if the family had none (the
/// kind was guessed from the tensor's presence and shape); now it fails naming the norm.
#[test]
fn qwen3_without_qk_norms_fails_naming_the_norm() {
    let dir = broken_copy("qwen3", |_| {}, None);
    let removed = strip_tensors(&dir, |k| {
        k.ends_with("q_norm.weight") || k.ends_with("k_norm.weight")
    });
    assert_eq!(removed, 4, "q and k norms of 2 layers");
    let e = load_error(&dir);
    assert!(
        e.contains("tensor `model.layers.0.self_attn.q_norm.weight` is missing"),
        "{e}"
    );
    let dir = broken_copy("qwen3_moe", |_| {}, None);
    strip_tensors(&dir, |k| k == "model.layers.1.self_attn.k_norm.weight");
    let e = load_error(&dir);
    assert!(
        e.contains("tensor `model.layers.1.self_attn.k_norm.weight` is missing"),
        "{e}"
    );
}

/// The rest of what families declare is required too: Qwen2-MoE's shared-expert gate
/// (once optional, so a checkpoint without it ran the shared expert ungated), DeepSeek-V3's
/// correction bias, and routed experts in one of the family's declared layouts.
#[test]
fn other_declared_tensors_are_required_by_name() {
    let dir = broken_copy("qwen2_moe", |_| {}, None);
    strip_tensors(&dir, |k| k.ends_with("shared_expert_gate.weight"));
    let e = load_error(&dir);
    assert!(
        e.contains("tensor `model.layers.0.mlp.shared_expert_gate.weight` is missing"),
        "{e}"
    );
    let dir = broken_copy("deepseek_v3", |_| {}, None);
    strip_tensors(&dir, |k| k.ends_with("e_score_correction_bias"));
    let e = load_error(&dir);
    assert!(
        e.contains("tensor `model.layers.1.mlp.gate.e_score_correction_bias` is missing"),
        "{e}"
    );
    // Mixtral (sharded, with an index): no layout matches, and the message names both.
    let dir = broken_copy("mixtral", |_| {}, None);
    strip_tensors(&dir, |k| {
        k.starts_with("model.layers.0.block_sparse_moe.experts.0.")
    });
    let e = load_error(&dir);
    assert!(
        e.contains("tensor `model.layers.0.block_sparse_moe.experts.0.w1.weight` is missing")
            && e.contains("model.layers.0.mlp.experts.gate_up_proj"),
        "{e}"
    );
}

/// Biases follow the declaration both ways: Llama's depend on `attention_bias`. Qwen2's
/// weights read as Llama fail on the q/k/v biases Llama does not expect by default, and
/// with `attention_bias: true` on the `o_proj` bias Qwen2 never has.
#[test]
fn biases_follow_the_declaration_both_ways() {
    let dir = broken_copy("qwen2", |c| c["model_type"] = "llama".into(), None);
    let e = load_error(&dir);
    assert!(
        e.contains("tensor `model.layers.0.self_attn.q_proj.bias` is not expected")
            && e.contains("attention_bias"),
        "{e}"
    );
    let dir = broken_copy(
        "qwen2",
        |c| {
            c["model_type"] = "llama".into();
            c["attention_bias"] = true.into();
        },
        None,
    );
    let e = load_error(&dir);
    assert!(
        e.contains("tensor `model.layers.0.self_attn.o_proj.bias` is missing"),
        "{e}"
    );
}

/// A higher-rank sequence runs alone: lower ranks pause (keeping their cache) until it is
/// done, then finish with exactly the tokens they get alone.
#[tokio::test]
async fn a_higher_rank_runs_alone_and_lower_ranks_resume_unchanged() {
    let name = "qwen3_moe";
    let model = load(name);
    let r = reference(&fixture_dir(name));
    let engine = engine(&model);
    let prompt = r.input_ids.clone();
    let solo_low = collect(engine.submit(greedy(prompt.clone(), 8)).expect("submit")).await;
    let solo_high = collect(engine.submit(greedy(prompt.clone(), 12)).expect("submit")).await;
    // Three low ones (8 tokens) and then a high one (12): sharing each step, the low ones
    // would end first; with the high one running alone, it ends first.
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (label, rank, tokens) in [
        ("low", 0u8, 8),
        ("low", 0, 8),
        ("low", 0, 8),
        ("high", 3, 12),
    ] {
        let rx = engine
            .submit(GenerationRequest {
                rank,
                ..greedy(prompt.clone(), tokens)
            })
            .expect("submit");
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let out = collect(rx).await;
            order.lock().expect("order").push(label);
            (label, out)
        }));
    }
    for t in tasks {
        let (label, out) = t.await.expect("join");
        let want = if label == "high" {
            &solo_high
        } else {
            &solo_low
        };
        assert_eq!(&out, want, "{label}: pausing changed the output");
    }
    let order = order.lock().expect("order").clone();
    assert_eq!(order.first(), Some(&"high"), "{order:?}");
}

/// Records the most preemptions the engine reported.
#[derive(Default)]
struct Preemptions(std::sync::atomic::AtomicU64);

impl switchyard_worker::engine::EngineObserver for Preemptions {
    fn step(&self, _: &switchyard_worker::engine::StepReport<'_>) {}
    fn occupancy(&self, o: switchyard_worker::engine::Occupancy) {
        self.0
            .fetch_max(o.preemptions, std::sync::atomic::Ordering::Relaxed);
    }
}

#[tokio::test]
async fn a_burst_of_long_prompts_past_the_cache_finishes_with_the_same_tokens() {
    for (name, prefix_cache) in [
        ("qwen3_moe", true),
        ("qwen3_moe", false),
        ("deepseek_v3", true),
    ] {
        let model = load(name);
        let r = reference(&fixture_dir(name));
        // 8 prompts of 36 tokens, 28 new tokens each: 16 blocks of 4 a sequence, 128 for
        // the burst, in a cache of 40. Blocks are taken as sequences grow, so more run at
        // once than their whole budgets would allow; when the cache runs short the newest
        // sequence is preempted and recomputed later.
        let prompts: Vec<Vec<u32>> = (0..8)
            .map(|i| {
                r.input_ids
                    .iter()
                    .cycle()
                    .skip(i)
                    .take(36)
                    .copied()
                    .collect()
            })
            .collect();
        let roomy = engine_with(&model, false);
        let mut alone = Vec::new();
        for p in &prompts {
            alone.push(collect(roomy.submit(greedy(p.clone(), 28)).expect("submit")).await);
        }
        let observer = Arc::new(Preemptions::default());
        let tight = engine_sized(&model, prefix_cache, 40, observer.clone());
        let receivers: Vec<_> = prompts
            .iter()
            .map(|p| tight.submit(greedy(p.clone(), 28)).expect("submit"))
            .collect();
        let mut burst = Vec::new();
        for rx in receivers {
            burst.push(collect(rx).await);
        }
        assert_eq!(
            burst, alone,
            "{name} (prefix cache {prefix_cache}): preempted and recomputed sequences changed"
        );
        let preemptions = observer.0.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            preemptions > 0,
            "{name}: the burst did not outgrow the cache, so nothing was tested"
        );
        eprintln!("{name} (prefix cache {prefix_cache}): {preemptions} preemptions");
    }
}

/// The offline greedy tool (`switchyard-worker greedy`, the cross-check against llama.cpp
/// in `make bench-llamacpp`) picks the reference's tokens too, on a dense and two MoE
/// families.
#[test]
fn the_greedy_tool_picks_the_references_tokens() {
    for name in ["llama", "qwen3_moe", "deepseek_v3"] {
        let model = load(name);
        let r = reference(&fixture_dir(name));
        let picked = switchyard_worker::model::perplexity::greedy(
            &model.transformer,
            &r.greedy_prompt,
            r.greedy.len(),
        )
        .expect("greedy");
        assert_eq!(picked, r.greedy, "{name}: greedy tool against transformers");
    }
}
