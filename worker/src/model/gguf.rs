//! GGUF checkpoints (llama.cpp's single-file format): the architecture from the metadata,
//! the tensors under their Hugging Face names, quantized tensors kept quantized.
//!
//! A `.gguf` file is one more [`super::checkpoint::Checkpoint`] source: the loaders ask
//! for `model.layers.3.self_attn.q_proj.weight` whatever the file calls it, so every
//! family declaration, shape check and error message is the one the safetensors path
//! uses. What differs, and is handled here:
//!
//! - **Names.** `blk.<l>.attn_q.weight` is `model.layers.<l>.self_attn.q_proj.weight`, and
//!   so on ([`hf_name`]). A tensor the table does not know is refused with its name: an
//!   unread tensor would be a silently different model.
//! - **Config.** The `<arch>.*` metadata keys become the `config.json` keys
//!   [`super::config::resolve`] checks ([`GgufFile::config`]); a missing key is named.
//! - **Rotary layout.** llama.cpp's converter permutes the rows of a `llama` model's
//!   `q_proj`/`k_proj` so that each head's rotary pairs are adjacent (its "normal" rope);
//!   the engine rotates half-split pairs as transformers does, so rows are put back on
//!   load ([`unpermute_rows`]). Rows are whole blocks, so this works on quantized data.
//! - **Experts.** `ffn_{gate,up,down}_exps` hold every expert of a layer as one
//!   `[experts, rows, cols]` tensor; expert `e` is read as the byte range of entry `e`, so a
//!   shard reads only its experts.
//!
//! Supported architectures: `llama`, `qwen2`, `qwen3`, `qwen3moe`. `deepseek2` is refused:
//! current llama.cpp converters split MLA's `kv_b_proj` into per-head `attn_k_b`/`attn_v_b`
//! (transposed), which do not map one-to-one onto the safetensors tensors the MLA loader
//! reads. Llama 3.1-style `rope_freqs` tensors are refused too (the scaling parameters are
//! not in the metadata).

use std::collections::HashMap;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use super::ModelError;

/// Whether `path` is a GGUF file (by its magic bytes, so a file mounted under another
/// name counts) rather than a checkpoint directory.
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

/// Reads a GGUF file's header (metadata and tensor index, not the data).
pub fn read_content(path: &Path) -> Result<Content, ModelError> {
    let mut f = std::fs::File::open(path).map_err(|source| ModelError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    let unreadable = |message: String| ModelError::Tensor {
        file: path.to_path_buf(),
        name: String::new(),
        message: format!("not a readable GGUF file: {message}"),
    };
    // candle's reader divides by `general.alignment` unchecked: a header is input, so a
    // panic in reading it is an error about the file, not the process's end.
    let content = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut f)))
        .map_err(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            unreadable(format!(
                "its header made the reader fail ({why}); check general.alignment and the counts"
            ))
        })?
        .map_err(|e| unreadable(e.to_string()))?;
    // Every tensor's bytes inside the file, so that no size read from the header is
    // allocated or iterated before the file is known to back it.
    let len = f
        .metadata()
        .map_err(|source| ModelError::Io {
            file: path.to_path_buf(),
            source,
        })?
        .len();
    for (name, info) in &content.tensor_infos {
        let bytes = tensor_bytes(info.shape.dims(), info.ggml_dtype);
        let end = bytes.and_then(|b| {
            content
                .tensor_data_offset
                .checked_add(info.offset)?
                .checked_add(b)
        });
        if end.is_none_or(|end| end > len) {
            return Err(ModelError::Tensor {
                file: path.to_path_buf(),
                name: name.clone(),
                message: format!(
                    "GGUF tensor of shape {:?} ({:?}) at data offset {} does not fit in the \
                     file's {len} bytes",
                    info.shape.dims(),
                    info.ggml_dtype,
                    info.offset
                ),
            });
        }
    }
    Ok(content)
}

/// Bytes of a tensor of `dims` stored as `dtype`; `None` when that overflows or its rows
/// are not whole blocks.
fn tensor_bytes(dims: &[usize], dtype: GgmlDType) -> Option<u64> {
    let cols = *dims.last()?;
    if !cols.is_multiple_of(dtype.block_size()) {
        return None;
    }
    let elems = dims.iter().try_fold(1usize, |a, d| a.checked_mul(*d))?;
    (elems / dtype.block_size())
        .checked_mul(dtype.type_size())
        .map(|b| b as u64)
}

/// Where a Hugging Face tensor name is in the file.
#[derive(Debug, Clone)]
struct Mapped {
    /// The GGUF tensor.
    gguf: String,
    /// The shape as the loaders see it (row-major, `[out, in]`).
    shape: Vec<usize>,
    /// Entry of the first dimension (one expert of a fused `_exps` tensor).
    entry: Option<usize>,
    /// `Some(head_dim)` when the rows are in llama.cpp's rotary order.
    permuted_heads: Option<usize>,
}

/// An open GGUF checkpoint.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    arch: String,
    names: HashMap<String, Mapped>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("arch", &self.arch)
            .field("tensors", &self.content.tensor_infos.len())
            .finish_non_exhaustive()
    }
}

/// The GGUF architectures read, and the `model_type` each is.
const ARCHITECTURES: [(&str, &str); 4] = [
    ("llama", "llama"),
    ("qwen2", "qwen2"),
    ("qwen3", "qwen3"),
    ("qwen3moe", "qwen3_moe"),
];

impl GgufFile {
    /// Reads the header of `path` and maps every tensor to its Hugging Face name.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let content = read_content(path)?;
        let arch = string(path, &content, "general.architecture")?;
        if !ARCHITECTURES.iter().any(|(a, _)| *a == arch) {
            let why = if arch == "deepseek2" {
                " (its MLA tensors attn_k_b/attn_v_b do not map onto kv_b_proj; convert the \
                 safetensors checkpoint instead)"
            } else {
                ""
            };
            return Err(ModelError::Unsupported {
                file: path.to_path_buf(),
                what: format!(
                    "GGUF architecture {arch:?}{why}; supported: {}",
                    ARCHITECTURES.map(|(a, _)| a).join(", ")
                ),
            });
        }
        let head_dim = if arch == "llama" {
            let heads = count(path, &content, &format!("{arch}.attention.head_count"))?;
            let d = count(path, &content, &format!("{arch}.embedding_length"))?;
            Some(
                content
                    .metadata
                    .get(&format!("{arch}.rope.dimension_count"))
                    .and_then(|v| v.to_u32().ok())
                    .map_or(d / heads.max(1), |v| v as usize),
            )
        } else {
            None
        };
        let mut names = HashMap::new();
        for (gguf, info) in &content.tensor_infos {
            let shape = info.shape.dims().to_vec();
            let Some(hf) = hf_name(gguf) else {
                return Err(ModelError::Unsupported {
                    file: path.to_path_buf(),
                    what: format!(
                        "GGUF tensor `{gguf}`: not a tensor of the {arch} architecture this \
                         engine maps{}",
                        if gguf.starts_with("rope_freqs") {
                            " (Llama 3.1-style rope_freqs scaling is not supported)"
                        } else {
                            ""
                        }
                    ),
                });
            };
            let permuted = |name: &str| {
                head_dim.filter(|_| {
                    name.ends_with("self_attn.q_proj.weight")
                        || name.ends_with("self_attn.k_proj.weight")
                        || name.ends_with("self_attn.q_proj.bias")
                        || name.ends_with("self_attn.k_proj.bias")
                })
            };
            match hf {
                HfName::One(name) => {
                    let permuted_heads = permuted(&name);
                    names.insert(
                        name,
                        Mapped {
                            gguf: gguf.clone(),
                            shape,
                            entry: None,
                            permuted_heads,
                        },
                    );
                }
                HfName::PerExpert { prefix, suffix } => {
                    let Some((&experts, rest)) = shape.split_first() else {
                        continue;
                    };
                    for e in 0..experts {
                        names.insert(
                            format!("{prefix}.{e}.{suffix}"),
                            Mapped {
                                gguf: gguf.clone(),
                                shape: rest.to_vec(),
                                entry: Some(e),
                                permuted_heads: None,
                            },
                        );
                    }
                }
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            arch,
            names,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header (metadata, tensor index).
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// Whether the loaders' name `name` is in the file.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// The shape of `name` as the loaders see it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.names.get(name).map(|m| m.shape.as_slice())
    }

    /// How `name` is stored (`F32`, `Q4_1`, ...).
    pub fn stored_type(&self, name: &str) -> Option<GgmlDType> {
        let m = self.names.get(name)?;
        self.content.tensor_infos.get(&m.gguf).map(|i| i.ggml_dtype)
    }

    /// The storage types in the file, as users read them (`q4_1`, `f32`).
    pub fn saved_types(&self) -> Vec<String> {
        let mut types: Vec<String> = self
            .content
            .tensor_infos
            .values()
            .map(|i| super::matmul::ggml_name(i.ggml_dtype))
            .collect();
        types.sort();
        types.dedup();
        types
    }

    /// `name` as stored (quantized or not), rows in the engine's order, on `device`.
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor, ModelError> {
        let m = self
            .names
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                dir: self.path.clone(),
                name: name.to_string(),
                expected: "a tensor of this architecture".into(),
            })?;
        let wrap = |message: String| ModelError::Tensor {
            file: self.path.clone(),
            name: format!("{name} (GGUF `{}`)", m.gguf),
            message,
        };
        let info = &self.content.tensor_infos[&m.gguf];
        let dtype = info.ggml_dtype;
        let (block, type_size) = (dtype.block_size(), dtype.type_size());
        let cols = *m.shape.last().unwrap_or(&0);
        if !cols.is_multiple_of(block) {
            return Err(wrap(format!(
                "rows of {cols} values are not whole {block}-value blocks"
            )));
        }
        // `read_content` checked that the whole tensor fits in the file, so a part of it
        // does too.
        let bytes = tensor_bytes(&m.shape, dtype)
            .ok_or_else(|| wrap("its size overflows".into()))? as usize;
        let start = self.content.tensor_data_offset
            + info.offset
            + m.entry.unwrap_or(0) as u64 * bytes as u64;
        let mut data = vec![0u8; bytes];
        let mut f = std::fs::File::open(&self.path).map_err(|source| ModelError::Io {
            file: self.path.clone(),
            source,
        })?;
        f.seek(SeekFrom::Start(start))
            .and_then(|_| f.read_exact(&mut data))
            .map_err(|e| wrap(format!("reading {bytes} bytes at offset {start}: {e}")))?;
        if let Some(head_dim) = m.permuted_heads {
            let row_bytes = cols / block * type_size;
            data = unpermute_rows(&data, row_bytes, head_dim).map_err(wrap)?;
        }
        let storage = QStorage::from_data(std::borrow::Cow::Owned(data), device, dtype)
            .map_err(|e| wrap(e.to_string()))?;
        QTensor::new(storage, m.shape.clone()).map_err(|e| wrap(e.to_string()))
    }

    /// `name` as a dense tensor in `dtype` on `device` (dequantized if stored quantized).
    pub fn dense(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor, ModelError> {
        let q = self.qtensor(name, &Device::Cpu)?;
        let wrap = |e: candle_core::Error| ModelError::Tensor {
            file: self.path.clone(),
            name: name.to_string(),
            message: e.to_string(),
        };
        q.dequantize(&Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .and_then(|t| t.to_device(device))
            .map_err(wrap)
    }

    /// The `config.json` keys the metadata gives, for [`super::config::resolve`].
    pub fn config_json(&self) -> Result<serde_json::Value, ModelError> {
        let (path, c, arch) = (&self.path, &self.content, self.arch.as_str());
        let key = |k: &str| format!("{arch}.{k}");
        let model_type = ARCHITECTURES
            .iter()
            .find(|(a, _)| *a == arch)
            .map(|(_, t)| *t)
            .unwrap_or_default();
        let mut j = serde_json::Map::new();
        let mut put = |k: &str, v: serde_json::Value| {
            j.insert(k.to_string(), v);
        };
        put("model_type", model_type.into());
        put("hidden_act", "silu".into());
        put(
            "hidden_size",
            count(path, c, &key("embedding_length"))?.into(),
        );
        put(
            "num_hidden_layers",
            count(path, c, &key("block_count"))?.into(),
        );
        put(
            "num_attention_heads",
            count(path, c, &key("attention.head_count"))?.into(),
        );
        if let Some(kv) = optional_count(path, c, &key("attention.head_count_kv"))? {
            put("num_key_value_heads", kv.into());
        }
        if let Some(hd) = optional_count(path, c, &key("attention.key_length"))? {
            put("head_dim", hd.into());
        }
        if let Some(ff) = optional_count(path, c, &key("feed_forward_length"))? {
            put("intermediate_size", ff.into());
        }
        put(
            "max_position_embeddings",
            count(path, c, &key("context_length"))?.into(),
        );
        put(
            "rms_norm_eps",
            float(path, c, &key("attention.layer_norm_rms_epsilon"))?.into(),
        );
        if let Some(theta) = optional_float(path, c, &key("rope.freq_base"))? {
            put("rope_theta", theta.into());
        }
        match c.metadata.get(&key("rope.scaling.type")) {
            None => {}
            Some(v) => {
                let kind = v
                    .to_string()
                    .map_err(|_| bad(path, &key("rope.scaling.type"), "a string"))?;
                if kind != "none" {
                    let factor = float(path, c, &key("rope.scaling.factor"))?;
                    let mut s = serde_json::json!({"rope_type": kind, "factor": factor});
                    if let Some(orig) =
                        optional_count(path, c, &key("rope.scaling.original_context_length"))?
                    {
                        s["original_max_position_embeddings"] = orig.into();
                    }
                    put("rope_scaling", s);
                }
            }
        }
        let vocab = match optional_count(path, c, &key("vocab_size"))? {
            Some(v) => v,
            None => self
                .shape("model.embed_tokens.weight")
                .and_then(|s| s.first().copied())
                .ok_or_else(|| bad(path, &key("vocab_size"), "present (or token_embd.weight)"))?,
        };
        put("vocab_size", vocab.into());
        put(
            "tie_word_embeddings",
            (!self.contains("lm_head.weight")).into(),
        );
        if let Some(experts) = optional_count(path, c, &key("expert_count"))? {
            put("num_experts", experts.into());
            put(
                "num_experts_per_tok",
                count(path, c, &key("expert_used_count"))?.into(),
            );
            put(
                "moe_intermediate_size",
                count(path, c, &key("expert_feed_forward_length"))?.into(),
            );
            // llama.cpp renormalises Qwen3-MoE's top-k weights, as its config.json says.
            put("norm_topk_prob", true.into());
        }
        for (gguf, hf) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ] {
            if let Some(id) = optional_count(path, c, gguf)? {
                put(hf, id.into());
            }
        }
        Ok(serde_json::Value::Object(j))
    }
}

/// A GGUF tensor's name as the loaders know it.
enum HfName {
    One(String),
    /// Every expert of a layer in one tensor: `<prefix>.<e>.<suffix>` for each entry.
    PerExpert {
        prefix: String,
        suffix: String,
    },
}

/// The Hugging Face name of GGUF tensor `gguf`, or `None` when it is not one this engine
/// maps.
fn hf_name(gguf: &str) -> Option<HfName> {
    let (stem, leaf) = gguf.rsplit_once('.')?;
    if !matches!(leaf, "weight" | "bias") {
        return None;
    }
    let top = match stem {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(top) = top {
        return Some(HfName::One(format!("{top}.{leaf}")));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let prefix = format!("model.layers.{layer}");
    let one = |p: &str| Some(HfName::One(format!("{prefix}.{p}.{leaf}")));
    let experts = |proj: &str| {
        Some(HfName::PerExpert {
            prefix: format!("{prefix}.mlp.experts"),
            suffix: format!("{proj}.{leaf}"),
        })
    };
    match part {
        "attn_norm" => one("input_layernorm"),
        "ffn_norm" => one("post_attention_layernorm"),
        "attn_q" => one("self_attn.q_proj"),
        "attn_k" => one("self_attn.k_proj"),
        "attn_v" => one("self_attn.v_proj"),
        "attn_output" => one("self_attn.o_proj"),
        "attn_q_norm" => one("self_attn.q_norm"),
        "attn_k_norm" => one("self_attn.k_norm"),
        "ffn_gate" => one("mlp.gate_proj"),
        "ffn_up" => one("mlp.up_proj"),
        "ffn_down" => one("mlp.down_proj"),
        "ffn_gate_inp" => one("mlp.gate"),
        "ffn_gate_exps" => experts("gate_proj"),
        "ffn_up_exps" => experts("up_proj"),
        "ffn_down_exps" => experts("down_proj"),
        _ => None,
    }
}

/// Puts the rows of a llama.cpp-permuted `q_proj`/`k_proj` (each head's rotary pairs
/// adjacent: row `2i + half`) back in transformers' order (row `half · d/2 + i`).
/// `data` is whole rows of `row_bytes` each.
pub fn unpermute_rows(data: &[u8], row_bytes: usize, head_dim: usize) -> Result<Vec<u8>, String> {
    if row_bytes == 0 || !data.len().is_multiple_of(row_bytes) {
        return Err("the data is not whole rows".into());
    }
    let rows = data.len() / row_bytes;
    if head_dim == 0 || !head_dim.is_multiple_of(2) || !rows.is_multiple_of(head_dim) {
        return Err(format!(
            "{rows} rows are not whole heads of {head_dim} (even) rows"
        ));
    }
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for r in 0..rows {
        let (head, within) = (r / head_dim, r % head_dim);
        let (part, i) = (within / half, within % half);
        let src = head * head_dim + 2 * i + part;
        out[r * row_bytes..(r + 1) * row_bytes]
            .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    Ok(out)
}

fn bad(path: &Path, key: &str, expected: &str) -> ModelError {
    ModelError::Config {
        file: path.to_path_buf(),
        key: key.to_string(),
        expected: expected.to_string(),
    }
}

fn string(path: &Path, c: &Content, key: &str) -> Result<String, ModelError> {
    c.metadata
        .get(key)
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| bad(path, key, "a string (the GGUF metadata key is missing)"))
}

fn as_count(v: &Value) -> Option<usize> {
    match v {
        Value::U8(x) => Some(*x as usize),
        Value::U16(x) => Some(*x as usize),
        Value::U32(x) => Some(*x as usize),
        Value::U64(x) => usize::try_from(*x).ok(),
        Value::I8(x) => usize::try_from(*x).ok(),
        Value::I16(x) => usize::try_from(*x).ok(),
        Value::I32(x) => usize::try_from(*x).ok(),
        Value::I64(x) => usize::try_from(*x).ok(),
        _ => None,
    }
}

fn optional_count(path: &Path, c: &Content, key: &str) -> Result<Option<usize>, ModelError> {
    match c.metadata.get(key) {
        None => Ok(None),
        Some(v) => as_count(v)
            .map(Some)
            .ok_or_else(|| bad(path, key, "a non-negative integer")),
    }
}

fn count(path: &Path, c: &Content, key: &str) -> Result<usize, ModelError> {
    optional_count(path, c, key)?
        .ok_or_else(|| bad(path, key, "an integer (the GGUF metadata key is missing)"))
}

fn optional_float(path: &Path, c: &Content, key: &str) -> Result<Option<f64>, ModelError> {
    match c.metadata.get(key) {
        None => Ok(None),
        Some(Value::F32(x)) => Ok(Some(f64::from(*x))),
        Some(Value::F64(x)) => Ok(Some(*x)),
        Some(v) => as_count(v)
            .map(|n| Some(n as f64))
            .ok_or_else(|| bad(path, key, "a number")),
    }
}

fn float(path: &Path, c: &Content, key: &str) -> Result<f64, ModelError> {
    optional_float(path, c, key)?
        .ok_or_else(|| bad(path, key, "a number (the GGUF metadata key is missing)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_the_loaders_names() {
        let one = |g: &str| match hf_name(g) {
            Some(HfName::One(n)) => n,
            _ => panic!("{g} did not map to one name"),
        };
        assert_eq!(one("token_embd.weight"), "model.embed_tokens.weight");
        assert_eq!(one("output.weight"), "lm_head.weight");
        assert_eq!(
            one("blk.7.attn_q.bias"),
            "model.layers.7.self_attn.q_proj.bias"
        );
        assert_eq!(
            one("blk.0.ffn_norm.weight"),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            one("blk.2.ffn_gate_inp.weight"),
            "model.layers.2.mlp.gate.weight"
        );
        match hf_name("blk.3.ffn_down_exps.weight") {
            Some(HfName::PerExpert { prefix, suffix }) => {
                assert_eq!(
                    (prefix.as_str(), suffix.as_str()),
                    ("model.layers.3.mlp.experts", "down_proj.weight")
                );
            }
            _ => panic!("experts"),
        }
        for unknown in [
            "rope_freqs.weight",
            "blk.1.attn_kv_a_mqa.weight",
            "blk.x.attn_q.weight",
        ] {
            assert!(hf_name(unknown).is_none(), "{unknown}");
        }
    }

    #[test]
    fn unpermuting_inverts_llama_cpps_permutation() {
        // Two heads of 4 rows, one byte per row. llama.cpp's converter writes row
        // `head·4 + 2i + half` from transformers' row `head·4 + half·2 + i`.
        let hf: Vec<u8> = (0..8).collect();
        let mut gguf = vec![0u8; 8];
        for head in 0..2 {
            for half in 0..2 {
                for i in 0..2 {
                    gguf[head * 4 + 2 * i + half] = hf[head * 4 + half * 2 + i];
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, 1, 4).expect("rows"), hf);
        assert!(unpermute_rows(&gguf, 1, 3).is_err());
    }
}
