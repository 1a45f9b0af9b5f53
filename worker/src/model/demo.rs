//! The built-in demo checkpoint: a small Qwen3-MoE-shaped model with deterministic random
//! weights, written once into a cache directory in the real Hugging Face layout so the
//! demo exercises the same loading code as any downloaded checkpoint.
//!
//! Its weights are random: it streams well-formed tokens that mean nothing. The tokenizer
//! is byte-level (256 byte tokens, no merges, plus ChatML's special tokens), so any text
//! round-trips.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use switchyard_edge::rng::Rng;

/// Bump when the generated files change, so old caches are not reused.
const VERSION: &str = "v2";

/// Shape of the demo model.
#[derive(Debug, Clone, Copy)]
pub struct DemoShape {
    /// Residual width.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Routed experts per layer.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Width of one expert.
    pub expert_ff: usize,
    /// Rows of the embedding (at least the tokenizer's 259).
    pub vocab: usize,
    /// Bias the random model towards letters and spaces, so its (meaningless) output is
    /// readable text instead of invalid UTF-8.
    pub readable: bool,
}

/// The shape `make demo` uses: about 14 M parameters, quick on two CPU cores.
pub const DEMO: DemoShape = DemoShape {
    hidden: 256,
    layers: 4,
    heads: 8,
    kv_heads: 2,
    head_dim: 32,
    experts: 16,
    top_k: 4,
    expert_ff: 256,
    vocab: 320,
    readable: true,
};

/// The benchmark shape (`docs/benchmarks.md`): OLMoE's proportions scaled down to about
/// 0.5 B parameters — 16 experts, top-4, vocabulary 32 000.
pub const BENCH: DemoShape = DemoShape {
    hidden: 1024,
    layers: 12,
    heads: 16,
    kv_heads: 4,
    head_dim: 64,
    experts: 16,
    top_k: 4,
    expert_ff: 768,
    vocab: 32_000,
    readable: false,
};

/// The expert-parallel benchmark shape (`docs/benchmarks.md`): one MoE layer at hidden
/// 2048 with 64 experts, top-8, like the DeepEP low-latency setting, and experts only 16
/// wide so that a call's time is dispatch and combine rather than expert arithmetic.
pub const EP_BENCH: DemoShape = DemoShape {
    hidden: 2048,
    layers: 1,
    heads: 16,
    kv_heads: 4,
    head_dim: 128,
    experts: 64,
    top_k: 8,
    expert_ff: 16,
    vocab: 512,
    readable: false,
};

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Returns the demo checkpoint directory under `cache`, generating it on first use.
pub fn ensure(cache: &Path) -> std::io::Result<PathBuf> {
    let dir = cache.join(format!("demo-qwen3-moe-{VERSION}"));
    if dir.join("model.safetensors").is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(cache)?;
    // Write into a temporary sibling and rename, so an interrupted run leaves no half model.
    let tmp = cache.join(format!(".demo-{}-{}", VERSION, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    write(&tmp, &DEMO).map_err(|e| std::io::Error::other(e.to_string()))?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process won the race: use its copy.
        Err(_) if dir.join("model.safetensors").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e),
    }
}

/// Why a demo or bench checkpoint could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The shape asked for cannot make a working model.
    #[error("{0}")]
    Shape(String),
    /// A file could not be written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A tensor could not be made or saved.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// A JSON file could not be encoded.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Writes a complete checkpoint of `shape` into `dir`.
pub fn write(dir: &Path, shape: &DemoShape) -> Result<(), DemoError> {
    if shape.vocab < 256 + SPECIALS.len() {
        return Err(DemoError::Shape(format!(
            "vocab {} must hold the {} byte-level and special tokens",
            shape.vocab,
            256 + SPECIALS.len()
        )));
    }
    std::fs::create_dir_all(dir)?;
    let s = shape;
    let config = serde_json::json!({
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.expert_ff * 2,
        "moe_intermediate_size": s.expert_ff,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "num_experts": s.experts,
        "num_experts_per_tok": s.top_k,
        "norm_topk_prob": true,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": 256,
        "eos_token_id": 258,
    });
    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("generation_config.json"),
        &serde_json::json!({"eos_token_id": [258, 256], "bos_token_id": 256}),
    )?;
    write_json(&dir.join("tokenizer.json"), &byte_level_tokenizer())?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "bos_token": null,
            "model_max_length": 4096,
            "chat_template": CHATML,
        }),
    )?;
    std::fs::write(
        dir.join("README.md"),
        "Switchyard demo checkpoint: a Qwen3-MoE-shaped model with DETERMINISTIC RANDOM \
         weights, generated by switchyard-worker. Its output is meaningless.\n",
    )?;

    let mut rng = Rng::new(0x5eed_0f57_17c4_u64);
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    let mut put =
        |name: String, shape: &[usize], std: f32, rng: &mut Rng| -> Result<(), DemoError> {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|_| normal(rng) * std).collect();
            t.insert(name, Tensor::from_vec(data, shape, &dev)?);
            Ok(())
        };
    let ones = |n: usize| Tensor::ones(n, DType::F32, &Device::Cpu);
    let (d, hd) = (s.hidden, s.head_dim);
    put(
        "model.embed_tokens.weight".into(),
        &[s.vocab, d],
        1.0,
        &mut rng,
    )?;
    put("lm_head.weight".into(), &[s.vocab, d], 0.05, &mut rng)?;
    let mut norms = vec![("model.norm.weight".to_string(), d)];
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        let w = 1.0 / (d as f32).sqrt();
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[s.heads * hd, d],
            w,
            &mut rng,
        )?;
        put(
            format!("{p}.self_attn.k_proj.weight"),
            &[s.kv_heads * hd, d],
            w,
            &mut rng,
        )?;
        put(
            format!("{p}.self_attn.v_proj.weight"),
            &[s.kv_heads * hd, d],
            w,
            &mut rng,
        )?;
        put(
            format!("{p}.self_attn.o_proj.weight"),
            &[d, s.heads * hd],
            w,
            &mut rng,
        )?;
        // A sharp router, so tokens clearly prefer some experts (as trained ones do).
        put(
            format!("{p}.mlp.gate.weight"),
            &[s.experts, d],
            4.0 * w,
            &mut rng,
        )?;
        for e in 0..s.experts {
            let q = format!("{p}.mlp.experts.{e}");
            put(
                format!("{q}.gate_proj.weight"),
                &[s.expert_ff, d],
                w,
                &mut rng,
            )?;
            put(
                format!("{q}.up_proj.weight"),
                &[s.expert_ff, d],
                w,
                &mut rng,
            )?;
            let wd = 1.0 / (s.expert_ff as f32).sqrt();
            put(
                format!("{q}.down_proj.weight"),
                &[d, s.expert_ff],
                wd,
                &mut rng,
            )?;
        }
        norms.push((format!("{p}.input_layernorm.weight"), d));
        norms.push((format!("{p}.post_attention_layernorm.weight"), d));
        norms.push((format!("{p}.self_attn.q_norm.weight"), hd));
        norms.push((format!("{p}.self_attn.k_norm.weight"), hd));
    }
    for (name, n) in norms {
        t.insert(name, ones(n)?);
    }
    if s.readable {
        make_readable(&mut t, s)?;
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    Ok(())
}

/// Keeps hidden dimension 0 at a large positive value through the whole network (every
/// embedding has it, no layer writes to it), then gives each token an LM-head weight on it
/// from English letter frequencies: printable letters, spaces and punctuation win, other
/// bytes never do. Everything else stays random.
fn make_readable(t: &mut HashMap<String, Tensor>, s: &DemoShape) -> Result<(), DemoError> {
    let mut edit = |name: &str, f: &dyn Fn(&mut [f32], usize)| -> Result<(), DemoError> {
        let old = t
            .remove(name)
            .ok_or_else(|| DemoError::Shape(format!("no tensor {name} to edit")))?;
        let shape = old.dims().to_vec();
        let cols = shape.get(1).copied().unwrap_or(1);
        let mut data = old.flatten_all()?.to_vec1::<f32>()?;
        f(&mut data, cols);
        t.insert(
            name.to_string(),
            Tensor::from_vec(data, shape, &Device::Cpu)?,
        );
        Ok(())
    };
    edit("model.embed_tokens.weight", &|w, cols| {
        w.chunks_mut(cols).for_each(|row| row[0] = 10.0)
    })?;
    let zero_row0 = |w: &mut [f32], cols: usize| w[..cols].iter_mut().for_each(|x| *x = 0.0);
    for l in 0..s.layers {
        edit(
            &format!("model.layers.{l}.self_attn.o_proj.weight"),
            &zero_row0,
        )?;
        for e in 0..s.experts {
            edit(
                &format!("model.layers.{l}.mlp.experts.{e}.down_proj.weight"),
                &zero_row0,
            )?;
        }
    }
    // Relative frequencies (per mille) of letters in English text, then space and a few
    // punctuation marks.
    const LETTERS: &[u8; 26] = b"etaoinshrdlcumwfgypbvkjxqz";
    const FREQ: [f32; 26] = [
        127.0, 91.0, 82.0, 75.0, 70.0, 67.0, 63.0, 61.0, 60.0, 43.0, 40.0, 28.0, 28.0, 24.0, 24.0,
        22.0, 20.0, 20.0, 19.0, 15.0, 10.0, 8.0, 2.0, 2.0, 1.0, 1.0,
    ];
    edit("lm_head.weight", &|w, cols| {
        for (id, row) in w.chunks_mut(cols).enumerate() {
            let byte = u8::try_from(id).ok();
            let freq = match byte {
                Some(b' ') => 180.0,
                Some(b'.' | b',') => 12.0,
                Some(b) => LETTERS
                    .iter()
                    .position(|l| *l == b)
                    .map_or(0.0, |i| FREQ[i]),
                None => 0.0,
            };
            // ≈ log-frequency on a dimension that is ≈ +8.5 after the final norm.
            row[0] = if freq > 0.0 {
                0.25 * f32::ln(freq)
            } else {
                -4.0
            };
        }
    })
}

/// Adds one random tensor (name, shape, standard deviation) to a checkpoint being written.
type PutTensor<'a> = dyn FnMut(String, &[usize], f32) -> Result<(), DemoError> + 'a;

/// A DeepSeek-V2-Lite-proportioned checkpoint scaled to fit a small machine (about 0.45 B
/// parameters): MLA with kv_lora_rank 256, 32 routed experts (top-4) plus 2 shared, the
/// first layer dense, vocabulary 32 000. Random weights, the byte-level demo tokenizer.
pub fn write_deepseek_bench(dir: &Path) -> Result<(), DemoError> {
    let (d, layers, heads, vocab) = (1024usize, 8usize, 8usize, 32_000usize);
    let (kv_lora, nope, rope, v) = (256usize, 64usize, 32usize, 64usize);
    let (experts, top_k, shared, ff, dense_ff) = (32usize, 4usize, 2usize, 512usize, 2816usize);
    std::fs::create_dir_all(dir)?;
    write_json(
        &dir.join("config.json"),
        &serde_json::json!({
            "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "vocab_size": vocab, "hidden_size": d, "intermediate_size": dense_ff,
            "moe_intermediate_size": ff, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads,
            "n_routed_experts": experts, "n_shared_experts": shared,
            "num_experts_per_tok": top_k, "first_k_dense_replace": 1, "moe_layer_freq": 1,
            "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": false,
            "routed_scaling_factor": 1.0, "q_lora_rank": null, "kv_lora_rank": kv_lora,
            "qk_nope_head_dim": nope, "qk_rope_head_dim": rope, "v_head_dim": v,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 8192,
            "tie_word_embeddings": false, "hidden_act": "silu", "torch_dtype": "float32",
            "bos_token_id": 256, "eos_token_id": 258,
        }),
    )?;
    write_json(&dir.join("tokenizer.json"), &byte_level_tokenizer())?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({"eos_token": "<|im_end|>", "chat_template": CHATML}),
    )?;
    let mut rng = Rng::new(0xdee9_5eed);
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    let mut put = |name: String, shape: &[usize], std: f32| -> Result<(), DemoError> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| normal(&mut rng) * std).collect();
        t.insert(name, Tensor::from_vec(data, shape, &dev)?);
        Ok(())
    };
    let w = 1.0 / (d as f32).sqrt();
    put("model.embed_tokens.weight".into(), &[vocab, d], 1.0)?;
    put("lm_head.weight".into(), &[vocab, d], 0.05)?;
    let mut norms = vec![("model.norm.weight".to_string(), d)];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[heads * (nope + rope), d],
            w,
        )?;
        put(
            format!("{p}.self_attn.kv_a_proj_with_mqa.weight"),
            &[kv_lora + rope, d],
            w,
        )?;
        put(
            format!("{p}.self_attn.kv_b_proj.weight"),
            &[heads * (nope + v), kv_lora],
            1.0 / (kv_lora as f32).sqrt(),
        )?;
        put(format!("{p}.self_attn.o_proj.weight"), &[d, heads * v], w)?;
        norms.push((format!("{p}.self_attn.kv_a_layernorm.weight"), kv_lora));
        norms.push((format!("{p}.input_layernorm.weight"), d));
        norms.push((format!("{p}.post_attention_layernorm.weight"), d));
        let mlp =
            |put: &mut PutTensor<'_>, prefix: String, width: usize| -> Result<(), DemoError> {
                put(format!("{prefix}.gate_proj.weight"), &[width, d], w)?;
                put(format!("{prefix}.up_proj.weight"), &[width, d], w)?;
                put(
                    format!("{prefix}.down_proj.weight"),
                    &[d, width],
                    1.0 / (width as f32).sqrt(),
                )
            };
        if l == 0 {
            mlp(&mut put, format!("{p}.mlp"), dense_ff)?;
        } else {
            put(format!("{p}.mlp.gate.weight"), &[experts, d], 4.0 * w)?;
            for e in 0..experts {
                mlp(&mut put, format!("{p}.mlp.experts.{e}"), ff)?;
            }
            mlp(&mut put, format!("{p}.mlp.shared_experts"), ff * shared)?;
        }
    }
    for (name, n) in norms {
        t.insert(name, Tensor::ones(n, DType::F32, &Device::Cpu)?);
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), DemoError> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)?;
    Ok(())
}

/// ChatML, as Qwen checkpoints ship it (without tools).
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// GPT-2's reversible byte → printable character map, which byte-level BPE vocabularies use.
fn byte_to_char() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0u32;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}

fn byte_level_tokenizer() -> serde_json::Value {
    let chars = byte_to_char();
    let vocab: serde_json::Map<String, serde_json::Value> = chars
        .iter()
        .enumerate()
        .map(|(id, c)| (c.to_string(), id.into()))
        .collect();
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []}
    })
}

/// Uniform in (0, 1) from 24 random bits (the demo weights' own recipe: changing it changes
/// every generated checkpoint).
fn uniform(rng: &mut Rng) -> f32 {
    ((rng.next_u64() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
}

/// Standard normal by Box–Muller.
fn normal(rng: &mut Rng) -> f32 {
    let (u1, u2) = (uniform(rng), uniform(rng));
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection() {
        let chars = byte_to_char();
        let set: std::collections::HashSet<char> = chars.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(chars[b'A' as usize], 'A');
        assert_eq!(chars[b' ' as usize], 'Ġ');
        assert_eq!(chars[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn tokenizer_round_trips_any_text() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let json = serde_json::to_string(&byte_level_tokenizer())?;
        let tok: tokenizers::Tokenizer =
            json.parse().map_err(|e: tokenizers::Error| e.to_string())?;
        let text = "héllo wörld 日本 🙂\n<|im_end|>";
        let ids = tok
            .encode(text, false)
            .map_err(|e| e.to_string())?
            .get_ids()
            .to_vec();
        assert_eq!(ids.last(), Some(&258), "special token recognised: {ids:?}");
        assert_eq!(tok.decode(&ids, false).map_err(|e| e.to_string())?, text);
        Ok(())
    }
}
