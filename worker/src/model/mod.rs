//! Hugging Face checkpoints on candle: loading and running the supported families.
//!
//! ```text
//!  <dir>/config.json ──config::load──> ModelConfig ─┐
//!  <dir>/*.safetensors ──Checkpoint::open (mmap)────┼──> Transformer::load ─┐
//!                      └─ LocalExperts::load ───────┘   (+ ExpertBackend)  │
//!  engine: ForwardBatch (flat tokens, slots) + PagedKv ──> Transformer::forward ──> logits
//! ```
//!
//! - [`family`]: each supported family declared once: attention and q/k norm kinds,
//!   required biases, tensor names, expert layouts, shared expert, router defaults.
//! - [`config`]: `config.json` → [`ModelConfig`], resolved against the family's declaration.
//! - [`checkpoint`]: the weight files, memory-mapped, tensors by name with shape checks, and
//!   [`checkpoint::Weights`], the prefix view every loader reads through.
//! - [`layers`]: linear, RMSNorm, SwiGLU MLP, rotary tables.
//! - [`matmul`]: `x · Wᵀ`, with a CPU kernel for the few-row products of decode.
//! - [`attention`]: attention over the paged KV cache; the flat batch layout.
//! - [`mla`]: DeepSeek's multi-head latent attention over a cache of latents.
//! - [`router`]: the routing rules and [`router::Routes`] (pure, a leaf module).
//! - [`moe`]: the [`moe::ExpertBackend`] trait, its in-process implementation, the MoE block.
//! - [`pages`]: the loaded weights moved onto 2 MB pages, and the KV cache advised to them.
//! - [`transformer`]: the decoder stack.
//! - [`demo`]: the deterministic random checkpoint `make demo` runs.
//!
//! Every error a checkpoint can cause names the file, the key and what was expected; a
//! tensor the family requires and the checkpoint lacks is named, never skipped.

pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod demo;
pub mod family;
pub mod gguf;
pub mod layers;
pub mod matmul;
pub mod mla;
pub mod moe;
pub mod pages;
pub mod perplexity;
pub mod quant;
pub mod router;
mod simd;
pub mod transformer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

pub use config::ModelConfig;
pub use family::Family;
pub use transformer::Transformer;

/// Why a checkpoint could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("{}: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A JSON file did not parse.
    #[error("{}: not valid JSON: {message}", file.display())]
    Json {
        /// The file.
        file: PathBuf,
        /// serde's message, with line and column.
        message: String,
    },
    /// A config key is missing or out of range.
    #[error("{}: `{key}` must be {expected}", file.display())]
    Config {
        /// The file.
        file: PathBuf,
        /// The key, dotted for nested ones.
        key: String,
        /// What would be accepted.
        expected: String,
    },
    /// Something the checkpoint asks for is not implemented.
    #[error("{}: unsupported {what}", file.display())]
    Unsupported {
        /// The file (or directory).
        file: PathBuf,
        /// What, and what is supported.
        what: String,
    },
    /// A tensor the architecture needs is not in any weight file.
    #[error("{}: tensor `{name}` is missing (expected shape {expected})", dir.display())]
    MissingTensor {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape it should have.
        expected: String,
    },
    /// A tensor the family's declaration (with config.json) says the architecture does
    /// not have: reading it would change the numbers, ignoring it would be silently wrong.
    #[error("{}: tensor `{name}` is not expected: {why}", dir.display())]
    UnexpectedTensor {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The tensor name.
        name: String,
        /// What the declaration says instead.
        why: String,
    },
    /// A tensor has the wrong shape for the config.
    #[error("{}: tensor `{name}` has shape {found}, config.json implies {expected}", file.display())]
    TensorShape {
        /// The weight file.
        file: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape the config implies.
        expected: String,
        /// The saved shape.
        found: String,
    },
    /// A tensor could not be read or converted.
    #[error("{}: tensor `{name}`: {message}", file.display())]
    Tensor {
        /// The weight file.
        file: PathBuf,
        /// The tensor name.
        name: String,
        /// candle's message.
        message: String,
    },
}

/// Parses a dtype name as users write it (`f32`, `bf16`, `float16`, `auto`...); `auto`
/// means f32 on CPU, where candle has no fast bf16 GEMM, and the checkpoint's own dtype on
/// GPUs.
pub fn parse_dtype(name: &str, device: &Device) -> Result<Option<DType>, String> {
    Ok(Some(match name.to_ascii_lowercase().as_str() {
        "" | "auto" => {
            return Ok(if device.is_cpu() {
                Some(DType::F32)
            } else {
                None
            });
        }
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" | "half" => DType::F16,
        other => {
            return Err(format!(
                "dtype {other:?}: expected one of auto, f32, bf16, f16"
            ));
        }
    }))
}

/// The compute device for `--device`.
pub fn parse_device(name: &str) -> Result<Device, crate::StartError> {
    let open = |result: candle_core::Result<Device>| {
        result.map_err(|source| crate::StartError::Device {
            name: name.to_string(),
            source,
        })
    };
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" | "" => open(Device::cuda_if_available(0)),
        other => {
            let ordinal = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| {
                    crate::StartError::invalid(format!(
                        "--device {other:?}: expected auto, cpu or cuda:<ordinal>"
                    ))
                })?;
            open(Device::new_cuda(ordinal))
        }
    }
}

/// A checkpoint loaded for serving: its config and the model.
#[derive(Debug)]
pub struct LoadedModel {
    /// Where it was loaded from.
    pub dir: PathBuf,
    /// The architecture.
    pub config: ModelConfig,
    /// The model.
    pub transformer: Transformer,
    /// The dtypes found in the weight files.
    pub saved_dtypes: Vec<String>,
    /// The weights' move onto 2 MB pages, running (CPU only; see [`pages`]).
    pub pages: Option<pages::Backing>,
}

impl LoadedModel {
    /// Loads `dir` (a checkpoint directory or a `.gguf` file) with every expert local.
    /// `dtype` `None` keeps the checkpoint's own. On the CPU a 16-bit dtype applies to the
    /// weight matrices only; activations are f32 (see [`layers::Precision`]). `quant` says
    /// how weight matrices are stored ([`quant`]).
    pub fn load(
        dir: &Path,
        dtype: Option<DType>,
        quant: quant::Quantization,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::load_with(dir, dtype, quant, device, |config, ckpt, precision| {
            Ok(Arc::new(moe::LocalExperts::load(
                config, ckpt, precision, device,
            )?))
        })
    }

    /// Loads `dir` with the routed experts run by the backend `experts` builds (from the
    /// config, the checkpoint and the precision); the routed experts' weights are read
    /// only if it reads them.
    pub fn load_with(
        dir: &Path,
        dtype: Option<DType>,
        quant: quant::Quantization,
        device: &Device,
        experts: impl FnOnce(
            &ModelConfig,
            &checkpoint::Checkpoint,
            layers::Precision,
        ) -> Result<Arc<dyn moe::ExpertBackend>, ModelError>,
    ) -> Result<Self, ModelError> {
        let config = config::load(dir)?;
        let ckpt = checkpoint::Checkpoint::open(dir)?;
        let dtype = match dtype {
            Some(d) => d,
            None => saved_dtype(&config, &ckpt),
        };
        let precision = precision_for(dtype, device).with_quant(quant);
        let experts = experts(&config, &ckpt, precision)?;
        let transformer = Transformer::load(&config, &ckpt, experts, precision, device)?;
        let pages = device
            .is_cpu()
            .then(|| pages::in_background("the model's weights"));
        Ok(Self {
            pages,
            dir: dir.to_path_buf(),
            saved_dtypes: ckpt.saved_dtypes().into_iter().collect(),
            config,
            transformer,
        })
    }
}

/// Weights in `dtype`; activations in f32 on the CPU (no fast 16-bit GEMM there), else in
/// `dtype` too.
pub fn precision_for(dtype: DType, device: &Device) -> layers::Precision {
    if device.is_cpu() {
        layers::Precision {
            weights: dtype,
            acts: DType::F32,
            quant: quant::Quantization::Auto,
        }
    } else {
        layers::Precision::uniform(dtype).with_quant(quant::Quantization::Auto)
    }
}

/// The dtype the checkpoint's config (or its files) say the weights are in.
pub fn saved_dtype(config: &ModelConfig, ckpt: &checkpoint::Checkpoint) -> DType {
    let name = config.saved_dtype.clone().unwrap_or_default();
    match name.as_str() {
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        "float32" => DType::F32,
        _ if ckpt.saved_dtypes().contains("bf16") => DType::BF16,
        _ => DType::F32,
    }
}
