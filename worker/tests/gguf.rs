//! GGUF checkpoints: a committed safetensors fixture written out as a GGUF file the way
//! llama.cpp lays one out (its tensor names, `[experts, rows, cols]` expert tensors,
//! `Q8_0` matrices where rows allow), then loaded through the GGUF path and compared with
//! the safetensors path holding the same `Q8_0` weights (`quantization: int8`): the logits
//! must be the same, so the name map, the config from metadata and the expert slicing are
//! right. A missing tensor and a missing metadata key are errors that name them. And the
//! real model (SmolLM2) against `transformers` loading the same GGUF: the same token ids,
//! chat prompt and logits within 1e-4, the tolerance of the safetensors fixtures.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use switchyard_worker::model::LoadedModel;
use switchyard_worker::model::attention::{ForwardBatch, LogitRows, PagedKv, SeqStep};
use switchyard_worker::model::checkpoint::Checkpoint;
use switchyard_worker::model::quant::Quantization;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

/// `t` in `dtype` when its rows are whole blocks of it, else f32 (as llama.cpp's converter
/// falls back).
fn store(t: &Tensor, dtype: GgmlDType) -> QTensor {
    let cols = *t.dims().last().expect("rank");
    let dtype = if cols.is_multiple_of(dtype.block_size()) {
        dtype
    } else {
        GgmlDType::F32
    };
    QTensor::quantize(t, dtype).expect("quantize")
}

/// Writes the qwen3_moe fixture as a GGUF file at `out`, leaving out `skip_tensor` and
/// `skip_key`.
fn write_qwen3_moe_gguf(out: &Path, skip_tensor: Option<&str>, skip_key: Option<&str>) {
    let dir = fixture("qwen3_moe");
    let ckpt = Checkpoint::open(&dir).expect("fixture");
    let get = |name: &str| ckpt.load(name, DType::F32, &Device::Cpu).expect(name);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut put = |name: String, t: QTensor| tensors.push((name, t));
    put(
        "token_embd.weight".into(),
        store(&get("model.embed_tokens.weight"), GgmlDType::F32),
    );
    put(
        "output_norm.weight".into(),
        store(&get("model.norm.weight"), GgmlDType::F32),
    );
    put(
        "output.weight".into(),
        store(&get("lm_head.weight"), GgmlDType::Q8_0),
    );
    for l in 0..2 {
        let hf = |leaf: &str| format!("model.layers.{l}.{leaf}");
        let blk = |leaf: &str| format!("blk.{l}.{leaf}");
        for (from, to, dtype) in [
            ("input_layernorm.weight", "attn_norm.weight", GgmlDType::F32),
            (
                "post_attention_layernorm.weight",
                "ffn_norm.weight",
                GgmlDType::F32,
            ),
            ("self_attn.q_proj.weight", "attn_q.weight", GgmlDType::Q8_0),
            ("self_attn.k_proj.weight", "attn_k.weight", GgmlDType::Q8_0),
            ("self_attn.v_proj.weight", "attn_v.weight", GgmlDType::Q8_0),
            (
                "self_attn.o_proj.weight",
                "attn_output.weight",
                GgmlDType::Q8_0,
            ),
            (
                "self_attn.q_norm.weight",
                "attn_q_norm.weight",
                GgmlDType::F32,
            ),
            (
                "self_attn.k_norm.weight",
                "attn_k_norm.weight",
                GgmlDType::F32,
            ),
            ("mlp.gate.weight", "ffn_gate_inp.weight", GgmlDType::F32),
        ] {
            put(blk(to), store(&get(&hf(from)), dtype));
        }
        // transformers v5 fuses gate and up per expert: `[experts, 2·ff, d]`, gate first.
        let gate_up = get(&hf("mlp.experts.gate_up_proj"));
        let ff = gate_up.dim(1).expect("dim") / 2;
        let gate = gate_up
            .narrow(1, 0, ff)
            .and_then(|t| t.contiguous())
            .expect("gate");
        let up = gate_up
            .narrow(1, ff, ff)
            .and_then(|t| t.contiguous())
            .expect("up");
        put(blk("ffn_gate_exps.weight"), store(&gate, GgmlDType::Q8_0));
        put(blk("ffn_up_exps.weight"), store(&up, GgmlDType::Q8_0));
        put(
            blk("ffn_down_exps.weight"),
            store(&get(&hf("mlp.experts.down_proj")), GgmlDType::Q8_0),
        );
    }
    tensors.retain(|(n, _)| Some(n.as_str()) != skip_tensor);
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("qwen3moe".into())),
        ("qwen3moe.block_count", Value::U32(2)),
        ("qwen3moe.context_length", Value::U32(512)),
        ("qwen3moe.embedding_length", Value::U32(64)),
        ("qwen3moe.feed_forward_length", Value::U32(96)),
        ("qwen3moe.attention.head_count", Value::U32(4)),
        ("qwen3moe.attention.head_count_kv", Value::U32(2)),
        ("qwen3moe.attention.key_length", Value::U32(8)),
        (
            "qwen3moe.attention.layer_norm_rms_epsilon",
            Value::F32(1e-6),
        ),
        ("qwen3moe.rope.freq_base", Value::F32(1_000_000.0)),
        ("qwen3moe.expert_count", Value::U32(8)),
        ("qwen3moe.expert_used_count", Value::U32(4)),
        ("qwen3moe.expert_feed_forward_length", Value::U32(40)),
        ("qwen3moe.vocab_size", Value::U32(380)),
    ]
    .into_iter()
    .filter(|(k, _)| Some(*k) != skip_key)
    .collect();
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut f = std::fs::File::create(out).expect("create");
    gguf_file::write(&mut f, &meta, &refs).expect("write gguf");
}

/// llama.cpp's name for a dense model's Hugging Face tensor.
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").expect("a layer tensor");
    let (layer, part) = rest.split_once('.').expect("layer.part");
    let (stem, leaf) = part.rsplit_once('.').expect("stem.leaf");
    let to = match stem {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{layer}.{to}.{leaf}")
}

/// Writes a dense fixture (`qwen2`, `qwen3`) as a GGUF file of architecture `arch`, with
/// every matrix Q8_0 where its rows allow, and the metadata its config.json implies.
fn write_dense_gguf(name: &str, arch: &str, out: &Path) {
    let dir = fixture(name);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config"))
            .expect("json");
    let ckpt = Checkpoint::open(&dir).expect("fixture");
    let header = std::fs::read(dir.join("model.safetensors")).expect("weights");
    let len = u64::from_le_bytes(header[..8].try_into().expect("len")) as usize;
    let index: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header[8..8 + len]).expect("header");
    let mut tensors = Vec::new();
    for hf in index.keys().filter(|k| *k != "__metadata__") {
        let t = ckpt.load(hf, DType::F32, &Device::Cpu).expect("tensor");
        let dtype = if t.rank() == 2 && !hf.contains("embed_tokens") {
            GgmlDType::Q8_0
        } else {
            GgmlDType::F32
        };
        tensors.push((gguf_name(hf), store(&t, dtype)));
    }
    let u = |k: &str| Value::U32(config[k].as_u64().expect(k) as u32);
    let theta = config["rope_theta"]
        .as_f64()
        .or_else(|| config["rope_parameters"]["rope_theta"].as_f64())
        .expect("rope_theta");
    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        (format!("{arch}.block_count"), u("num_hidden_layers")),
        (
            format!("{arch}.context_length"),
            u("max_position_embeddings"),
        ),
        (format!("{arch}.embedding_length"), u("hidden_size")),
        (
            format!("{arch}.feed_forward_length"),
            u("intermediate_size"),
        ),
        (
            format!("{arch}.attention.head_count"),
            u("num_attention_heads"),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            u("num_key_value_heads"),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(config["rms_norm_eps"].as_f64().expect("eps") as f32),
        ),
        (format!("{arch}.rope.freq_base"), Value::F32(theta as f32)),
        (format!("{arch}.vocab_size"), u("vocab_size")),
    ];
    if config["head_dim"].is_u64() {
        metadata.push((format!("{arch}.attention.key_length"), u("head_dim")));
    }
    // Linear rope scaling, as llama.cpp's converter writes it (qwen2's fixture has it).
    let scaling = &config["rope_scaling"];
    if scaling["rope_type"].as_str().or(scaling["type"].as_str()) == Some("linear") {
        metadata.push((
            format!("{arch}.rope.scaling.type"),
            Value::String("linear".into()),
        ));
        metadata.push((
            format!("{arch}.rope.scaling.factor"),
            Value::F32(scaling["factor"].as_f64().expect("factor") as f32),
        ));
    }
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut f = std::fs::File::create(out).expect("create");
    gguf_file::write(&mut f, &meta, &refs).expect("write gguf");
}

/// qwen2 (q/k/v biases, linear rope scaling, a separate head) and qwen3 (per-head q/k
/// norms, a tied head) as GGUF files give the logits of their safetensors, both at int8.
#[test]
fn dense_ggufs_load_as_their_safetensors() {
    let dir = tempdir();
    for (name, arch) in [("qwen2", "qwen2"), ("qwen3", "qwen3")] {
        let file = dir.join(format!("{name}.gguf"));
        write_dense_gguf(name, arch, &file);
        // int8 on both sides: the GGUF's Q8_0 matrices are kept, its f32 (tied) head is
        // quantized as the safetensors' is.
        let gguf = LoadedModel::load(&file, Some(DType::F32), Quantization::Int8, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let st = LoadedModel::load(
            &fixture(name),
            Some(DType::F32),
            Quantization::Int8,
            &Device::Cpu,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(gguf.config.family, st.config.family, "{name}");
        assert_eq!(gguf.config.rope_scaling, st.config.rope_scaling, "{name}");
        assert_eq!(gguf.config.qkv_bias, st.config.qkv_bias, "{name}");
        assert_eq!(
            gguf.config.tie_word_embeddings, st.config.tie_word_embeddings,
            "{name}"
        );
        assert_eq!(
            gguf.transformer.describe_weights(),
            st.transformer.describe_weights(),
            "{name}"
        );
        let tokens = [3u32, 17, 200, 5, 99, 42, 7];
        for (ra, rb) in logits(&gguf, &tokens).iter().zip(&logits(&st, &tokens)) {
            for (x, y) in ra.iter().zip(rb) {
                assert!((x - y).abs() < 1e-4, "{name}: {x} vs {y}");
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn logits(model: &LoadedModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    const BLOCK: usize = 16;
    let blocks: Vec<u32> = (0..tokens.len().div_ceil(BLOCK) as u32).collect();
    let kv = PagedKv::new(
        &model.config,
        blocks.len() * BLOCK,
        DType::F32,
        &Device::Cpu,
    )
    .expect("kv");
    let step = SeqStep {
        tokens,
        cached: 0,
        blocks: &blocks,
        logits: LogitRows::All,
    };
    let batch = ForwardBatch::new(&[step], BLOCK, &Device::Cpu).expect("batch");
    let (l, _) = model
        .transformer
        .forward(std::slice::from_ref(&batch), &kv)
        .expect("forward");
    l.to_vec2::<f32>().expect("logits")
}

#[test]
fn a_gguf_loads_as_the_same_model_as_its_safetensors_with_the_same_q8_0_weights() {
    let dir = tempdir();
    let file = dir.join("qwen3-moe-tiny.gguf");
    write_qwen3_moe_gguf(&file, None, None);
    let gguf = LoadedModel::load(&file, Some(DType::F32), Quantization::Auto, &Device::Cpu)
        .expect("the GGUF loads");
    let st = LoadedModel::load(
        &fixture("qwen3_moe"),
        Some(DType::F32),
        Quantization::Int8,
        &Device::Cpu,
    )
    .expect("the safetensors load");
    // The metadata resolved to the config.json's architecture.
    let mut want = st.config.clone();
    want.saved_dtype = None;
    want.bos_token_id = None;
    want.eos_token_ids = Vec::new();
    // GGUF stores the epsilon as an f32 (as llama.cpp computes with it).
    want.rms_norm_eps = f64::from(1e-6f32);
    assert_eq!(gguf.config, want);
    assert_eq!(
        gguf.transformer.describe_weights(),
        st.transformer.describe_weights(),
        "both hold the same types"
    );
    let held = gguf.transformer.describe_weights();
    assert!(held.contains("routed experts: f32 ×16 q8_0 ×16"), "{held}");
    // The bytes a decode step reads (the bench's bandwidth figure) count the experts as
    // held, whether the types came from the file or from the quantization setting.
    let per_step = |m: &LoadedModel| m.transformer.weight_bytes_per_step(2);
    assert_eq!(per_step(&gguf), per_step(&st));
    let tokens = [3u32, 17, 200, 5, 99, 42, 7, 311, 12];
    let (a, b) = (logits(&gguf, &tokens), logits(&st, &tokens));
    for (ra, rb) in a.iter().zip(&b) {
        for (x, y) in ra.iter().zip(rb) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }
    // `none` dequantizes the stored Q8_0 tensors: the same values in f32, computed without
    // quantizing the activations, so close to (not equal to) the quantized run.
    let dense = LoadedModel::load(&file, Some(DType::F32), Quantization::None, &Device::Cpu)
        .expect("dequantized");
    assert!(!dense.transformer.describe_weights().contains("q8_0"));
    assert!(per_step(&dense) > per_step(&gguf));
    let c = logits(&dense, &tokens);
    let worst = a
        .iter()
        .flatten()
        .zip(c.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = c.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        worst < 0.05 * scale,
        "dequantized run differs by {worst} (logits up to {scale})"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_gguf_missing_a_tensor_or_a_metadata_key_names_it() {
    let dir = tempdir();
    let file = dir.join("no-q.gguf");
    write_qwen3_moe_gguf(&file, Some("blk.1.attn_q.weight"), None);
    let e = LoadedModel::load(&file, Some(DType::F32), Quantization::Auto, &Device::Cpu)
        .expect_err("a tensor is missing");
    assert!(
        e.to_string()
            .contains("model.layers.1.self_attn.q_proj.weight"),
        "{e}"
    );
    let file = dir.join("no-heads.gguf");
    write_qwen3_moe_gguf(&file, None, Some("qwen3moe.attention.head_count"));
    let e = LoadedModel::load(&file, Some(DType::F32), Quantization::Auto, &Device::Cpu)
        .expect_err("a key is missing");
    assert!(
        e.to_string().contains("qwen3moe.attention.head_count"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-gguf-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// SmolLM2-135M-Instruct's GGUF (`hack/fetch-model.sh`; `make test` fetches it first):
/// the tokens, the chat prompt and the logits of the GGUF path against Python
/// `transformers` loading the same file (`gguf_file=`, dequantized to f32;
/// `hack/fixtures/gguf_reference.py` wrote the reference).
#[test]
fn smollm2_matches_transformers_loading_the_same_gguf() {
    use switchyard_worker::text::{ChatMessage, Tokenizer};
    let out = std::process::Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../hack/fetch-model.sh"
        ))
        .output()
        .expect("run hack/fetch-model.sh");
    assert!(
        out.status.success(),
        "hack/fetch-model.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").trim());
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("../gguf/smollm2_reference.json")).expect("reference"),
    )
    .expect("json");
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    };
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("float") as f32)
            .collect()
    };

    let tokenizer = Tokenizer::load(&file).expect("the GGUF's tokenizer");
    let prompt = reference["prompt"].as_str().expect("prompt");
    let tokens = tokenizer.encode(prompt, false).expect("encode");
    assert_eq!(
        tokens,
        ids(&reference["input_ids"]),
        "token ids for {prompt:?}"
    );
    let chat = tokenizer
        .chat_template()
        .expect("the GGUF's chat template")
        .render(
            &[ChatMessage::new("user", "What is the capital of France?")],
            true,
        )
        .expect("render");
    assert_eq!(chat, reference["chat_prompt"].as_str().expect("chat"));

    let model = LoadedModel::load(&file, Some(DType::F32), Quantization::None, &Device::Cpu)
        .expect("SmolLM2 loads");
    let got = logits(&model, &tokens);
    let fixed = ids(&reference["fixed_ids"]);
    let mut worst = 0f32;
    for (p, (row, want)) in got
        .iter()
        .zip(reference["positions"].as_array().expect("positions"))
        .enumerate()
    {
        for (ids_key, values_key) in [("top_ids", "top_logits"), ("fixed_ids", "fixed_logits")] {
            let which = if ids_key == "fixed_ids" {
                fixed.clone()
            } else {
                ids(&want[ids_key])
            };
            for (id, value) in which.iter().zip(floats(&want[values_key])) {
                let diff = (row[*id as usize] - value).abs();
                worst = worst.max(diff);
                assert!(
                    diff < 1e-4,
                    "position {p}, token {id}: {} vs transformers {value}",
                    row[*id as usize]
                );
            }
        }
        // The most likely next token is transformers'.
        let argmax = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32);
        assert_eq!(
            argmax,
            ids(&want["top_ids"]).first().copied(),
            "position {p}"
        );
    }
    eprintln!("SmolLM2 GGUF logits: largest difference from transformers {worst:e}");
}

/// A GGUF file's header is input from whoever made the file: any byte of it changed, or the
/// file cut short anywhere, must give an error naming the file (or load, when the change is
/// harmless), never a panic, an abort or an allocation the file cannot back. The data
/// section is left alone: changed weights are still weights.
mod corrupt_headers {
    use super::*;
    use proptest::prelude::*;

    fn valid() -> &'static (Vec<u8>, usize) {
        static VALID: std::sync::OnceLock<(Vec<u8>, usize)> = std::sync::OnceLock::new();
        VALID.get_or_init(|| {
            let dir = tempdir().join("corrupt-headers-source");
            std::fs::create_dir_all(&dir).expect("dir");
            let file = dir.join("valid.gguf");
            write_qwen3_moe_gguf(&file, None, None);
            let bytes = std::fs::read(&file).expect("read");
            let content =
                gguf_file::Content::read(&mut std::io::Cursor::new(&bytes)).expect("valid");
            (bytes, content.tensor_data_offset as usize)
        })
    }

    fn load(bytes: &[u8], case: u64) -> Result<(), String> {
        let dir = tempdir().join("corrupt-headers");
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join(format!("case-{case}.gguf"));
        std::fs::write(&file, bytes).expect("write");
        let loaded = LoadedModel::load(&file, Some(DType::F32), Quantization::Auto, &Device::Cpu);
        let _ = std::fs::remove_file(&file);
        match loaded {
            Ok(_) => Ok(()),
            Err(e) => {
                let message = e.to_string();
                assert!(
                    message.contains(&file.display().to_string()),
                    "the error names the file: {message}"
                );
                Err(message)
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn a_changed_header_byte_is_an_error_or_harmless(at in any::<prop::sample::Index>(), value in any::<u8>(), case in any::<u64>()) {
            let (bytes, header) = valid();
            let mut bytes = bytes.clone();
            bytes[at.index(*header)] = value;
            let _ = load(&bytes, case);
        }

        #[test]
        fn a_header_cut_short_is_an_error(at in any::<prop::sample::Index>(), case in any::<u64>()) {
            let (bytes, header) = valid();
            let cut = &bytes[..at.index(*header)];
            prop_assert!(load(cut, case).is_err());
        }
    }

    /// Found by the test above: a `general.alignment` of 0 made candle's reader divide by
    /// zero.
    #[test]
    fn an_alignment_of_zero_is_an_error() {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes()); // tensors
        b.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
        let key = b"general.alignment";
        b.extend_from_slice(&(key.len() as u64).to_le_bytes());
        b.extend_from_slice(key);
        b.extend_from_slice(&4u32.to_le_bytes()); // u32
        b.extend_from_slice(&0u32.to_le_bytes());
        let message = load(&b, u64::MAX).expect_err("an error");
        assert!(message.contains("alignment"), "{message}");
    }
}
