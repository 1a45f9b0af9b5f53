//! The safetensors files of a checkpoint directory: found, memory-mapped, indexed by tensor
//! name, and read with shape checks that name the file and the key.
//!
//! `model.safetensors`, or shards listed by `model.safetensors.index.json`, or (as some
//! repositories ship) several `*.safetensors` with no index. Files are mapped, not read:
//! only the tensors the model asks for are touched, each copied once into device memory in
//! the dtype the engine computes in.
//!
//! Loaders read through [`Weights`], the checkpoint seen from a name prefix (candle's
//! `VarBuilder::pp`): `layer.pp("self_attn").pp("q_proj").matrix("weight", …)` reads
//! `model.layers.<l>.self_attn.q_proj.weight`, in the dtype and on the device it carries.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::ModelError;
use super::gguf::{GgufFile, is_gguf};
use super::layers::Precision;
use super::matmul::Weight;
use super::quant::{Plan, Role};

/// The weight files of one checkpoint: a directory of safetensors, or one GGUF file.
pub struct Checkpoint {
    /// The directory, or the `.gguf` file.
    dir: PathBuf,
    /// The mapped safetensors files (none for a GGUF).
    files: Option<MmapedSafetensors>,
    /// The weight files, in a stable order.
    paths: Vec<PathBuf>,
    /// Tensor name → the file that holds it (for messages) and its shape.
    index: HashMap<String, (PathBuf, Vec<usize>)>,
    /// The GGUF file, when the checkpoint is one.
    gguf: Option<GgufFile>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("tensors", &self.index.len())
            .field("gguf", &self.gguf.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: HashMap<String, String>,
}

impl Checkpoint {
    /// Maps the weight files of `dir`, or reads the header of a `.gguf` file.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        if is_gguf(dir) {
            let gguf = GgufFile::open(dir)?;
            return Ok(Self {
                dir: dir.to_path_buf(),
                files: None,
                paths: vec![dir.to_path_buf()],
                index: HashMap::new(),
                gguf: Some(gguf),
            });
        }
        let files = weight_files(dir)?;
        let mapped = map_files(&files)?;
        let mut index = HashMap::new();
        for file in &files {
            // Each file's own header is the truth about what it holds.
            let bytes = std::fs::File::open(file).map_err(|source| ModelError::Io {
                file: file.clone(),
                source,
            })?;
            for (name, shape) in read_header(file, bytes)? {
                index.insert(name, (file.clone(), shape));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files: Some(mapped),
            paths: files,
            index,
            gguf: None,
        })
    }

    /// The GGUF file, when the checkpoint is one.
    pub fn gguf(&self) -> Option<&GgufFile> {
        self.gguf.as_ref()
    }

    /// How `name` is stored when it is a quantized GGUF tensor (`None`: dense, or a
    /// safetensors checkpoint).
    pub fn stored_quantized(&self, name: &str) -> Option<GgmlDType> {
        self.gguf
            .as_ref()
            .and_then(|g| g.stored_type(name))
            .filter(|t| !matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16))
    }

    /// `name` as the GGUF stores it, checked to have `shape`.
    pub fn quantized(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<QTensor, ModelError> {
        self.checked(name, shape, None)?;
        let gguf = self.gguf.as_ref().ok_or_else(|| ModelError::Unsupported {
            file: self.dir.clone(),
            what: format!("tensor `{name}`: quantized tensors come from GGUF files"),
        })?;
        gguf.qtensor(name, device)
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        match &self.gguf {
            Some(g) => g.contains(name),
            None => self.index.contains_key(name),
        }
    }

    /// Reads `name`, checks it has `shape`, converts it to `dtype` on `device`.
    pub fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        self.checked(name, shape, None)?;
        self.load(name, dtype, device)
    }

    /// The file holding `name` once it is known to have `shape` (and, with `entry`, that
    /// many entries along its first dimension).
    fn checked(
        &self,
        name: &str,
        shape: &[usize],
        entry: Option<usize>,
    ) -> Result<&PathBuf, ModelError> {
        if let Some(g) = &self.gguf {
            // The GGUF map names each expert of an `_exps` tensor on its own (the
            // per-expert layout), so there are no fused entries to read here.
            let Some(saved) = g.shape(name).filter(|_| entry.is_none()) else {
                return Err(ModelError::MissingTensor {
                    dir: self.dir.clone(),
                    name: name.to_string(),
                    expected: format!("{shape:?}"),
                });
            };
            if saved != shape {
                return Err(ModelError::TensorShape {
                    file: self.dir.clone(),
                    name: name.to_string(),
                    expected: format!("{shape:?}"),
                    found: format!("{saved:?}"),
                });
            }
            return Ok(&self.dir);
        }
        let Some((file, saved)) = self.index.get(name) else {
            return Err(ModelError::MissingTensor {
                dir: self.dir.clone(),
                name: name.to_string(),
                expected: format!("{shape:?}"),
            });
        };
        let entry_ok = entry.is_none_or(|e| e < shape.first().copied().unwrap_or(0));
        if saved.as_slice() != shape || !entry_ok {
            let reading = entry.map_or_else(String::new, |e| format!(" (reading entry {e})"));
            return Err(ModelError::TensorShape {
                file: file.clone(),
                name: name.to_string(),
                expected: format!("{shape:?}{reading}"),
                found: format!("{saved:?}"),
            });
        }
        Ok(file)
    }

    /// Reads entry `index` of the first dimension of `name` (one expert of a fused
    /// `[experts, …]` tensor), checking the whole tensor has `shape`; the other entries
    /// are not read, so a shard holding a few experts holds only their bytes.
    pub fn tensor_row(
        &self,
        name: &str,
        shape: &[usize],
        index: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        let file = self.checked(name, shape, Some(index))?;
        let wrap = |e: candle_core::Error| ModelError::Tensor {
            file: file.clone(),
            name: name.to_string(),
            message: e.to_string(),
        };
        let view = self.files()?.get(name).map_err(wrap)?;
        let saved_dtype = DType::try_from(view.dtype()).map_err(wrap)?;
        let row_shape = &shape[1..];
        let row_bytes = row_shape.iter().product::<usize>() * saved_dtype.size_in_bytes();
        let data = view
            .data()
            .get(index * row_bytes..(index + 1) * row_bytes)
            .ok_or_else(|| {
                wrap(candle_core::Error::Msg(
                    "the data is shorter than the shape".into(),
                ))
            })?;
        let tensor =
            Tensor::from_raw_buffer(data, saved_dtype, row_shape, &Device::Cpu).map_err(wrap)?;
        let tensor = if tensor.dtype() == dtype {
            tensor
        } else {
            tensor.to_dtype(dtype).map_err(wrap)?
        };
        tensor.to_device(device).map_err(wrap)
    }

    /// A 64-bit fingerprint of the checkpoint's content: `config.json`, and for every weight
    /// file its length, its whole header (names, shapes, dtypes, offsets) and 64 KiB read
    /// at 17 evenly spaced offsets. Reading a sample rather than every byte keeps it to
    /// milliseconds on a terabyte checkpoint, yet it changes when a file is replaced by one
    /// with other weights. Frontends and expert shards compare fingerprints so that they
    /// never combine experts of different checkpoints.
    pub fn fingerprint(&self) -> Result<u64, ModelError> {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let mut hash = Fnv1a::default();
        if self.gguf.is_none() {
            let config = self.dir.join("config.json");
            hash.write(&std::fs::read(&config).map_err(|source| ModelError::Io {
                file: config.clone(),
                source,
            })?);
        }
        const SAMPLE: u64 = 64 << 10;
        for path in &self.paths {
            let io = |source| ModelError::Io {
                file: path.clone(),
                source,
            };
            let mut f = std::fs::File::open(path).map_err(io)?;
            let len = f.metadata().map_err(io)?.len();
            hash.write(&len.to_le_bytes());
            let mut header_len = [0u8; 8];
            f.read_exact(&mut header_len).map_err(io)?;
            // A GGUF's header is sampled like its data (it starts at offset 0).
            let header_len = if self.gguf.is_some() {
                0
            } else {
                u64::from_le_bytes(header_len).min(len)
            };
            let mut header = Vec::new();
            (&mut f)
                .take(header_len)
                .read_to_end(&mut header)
                .map_err(io)?;
            hash.write(&header);
            let mut buf = Vec::with_capacity(SAMPLE as usize);
            for i in 0..=16u64 {
                let at = len.saturating_sub(SAMPLE) * i / 16;
                f.seek(SeekFrom::Start(at)).map_err(io)?;
                buf.clear();
                (&mut f).take(SAMPLE).read_to_end(&mut buf).map_err(io)?;
                hash.write(&buf);
            }
        }
        Ok(hash.0)
    }

    /// Reads `name` whatever its shape (the caller checks it), in `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor, ModelError> {
        if let Some(g) = &self.gguf {
            return g.dense(name, dtype, device);
        }
        let file = self
            .index
            .get(name)
            .map(|(f, _)| f.clone())
            .unwrap_or_else(|| self.dir.clone());
        let wrap = |e: candle_core::Error| ModelError::Tensor {
            file: file.clone(),
            name: name.to_string(),
            message: e.to_string(),
        };
        // Convert on the CPU side first when the device differs, so a bf16 file becomes an
        // f32 device tensor without a device round trip.
        let tensor = self.files()?.load(name, &Device::Cpu).map_err(wrap)?;
        let tensor = if tensor.dtype() == dtype {
            tensor
        } else {
            tensor.to_dtype(dtype).map_err(wrap)?
        };
        tensor.to_device(device).map_err(wrap)
    }

    /// The dtypes the weight files hold (for the start-up log and `ListModels`).
    pub fn saved_dtypes(&self) -> BTreeSet<String> {
        match (&self.gguf, &self.files) {
            (Some(g), _) => g.saved_types().into_iter().collect(),
            (None, Some(files)) => files
                .tensors()
                .iter()
                .map(|(_, view)| format!("{:?}", view.dtype()).to_lowercase())
                .collect(),
            (None, None) => BTreeSet::new(),
        }
    }

    fn files(&self) -> Result<&MmapedSafetensors, ModelError> {
        self.files.as_ref().ok_or_else(|| ModelError::Unsupported {
            file: self.dir.clone(),
            what: "safetensors access to a GGUF checkpoint".into(),
        })
    }
}

/// A [`Checkpoint`] seen from a name prefix, with the dtypes and the device its tensors
/// are read into: what every loader takes instead of hand-built names.
#[derive(Debug, Clone)]
pub struct Weights<'a> {
    ckpt: &'a Checkpoint,
    prefix: String,
    precision: Precision,
    device: &'a Device,
}

impl<'a> Weights<'a> {
    /// The whole checkpoint (no prefix).
    pub fn new(ckpt: &'a Checkpoint, precision: Precision, device: &'a Device) -> Self {
        Self {
            ckpt,
            prefix: String::new(),
            precision,
            device,
        }
    }

    /// The same view one level down: `pp("model").pp("norm")` is `model.norm`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        Self {
            prefix: self.name(&name.to_string()),
            ..self.clone()
        }
    }

    /// The same view with other dtypes (the router reads its gate in f32).
    pub fn with_precision(&self, precision: Precision) -> Self {
        Self {
            precision,
            ..self.clone()
        }
    }

    /// The full name of `leaf` under this prefix.
    pub fn name(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.prefix)
        }
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The dtypes tensors are read in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The device tensors are read onto.
    pub fn device(&self) -> &'a Device {
        self.device
    }

    /// The checkpoint.
    pub fn checkpoint(&self) -> &'a Checkpoint {
        self.ckpt
    }

    /// Whether `leaf` exists under this prefix.
    pub fn contains(&self, leaf: &str) -> bool {
        self.ckpt.contains(&self.name(leaf))
    }

    /// A weight matrix, checked to have `shape`, held as the precision's quantization
    /// setting says for the body of the model ([`super::quant`]).
    pub fn matrix(&self, leaf: &str, shape: &[usize]) -> Result<Weight, ModelError> {
        self.matrix_as(leaf, shape, Role::Body)
    }

    /// A weight matrix of `role`, checked to have `shape`: the stored quantized tensor, a
    /// dense one in the `weights` dtype, or one quantized at load.
    pub fn matrix_as(&self, leaf: &str, shape: &[usize], role: Role) -> Result<Weight, ModelError> {
        let name = self.name(leaf);
        let stored = self.ckpt.stored_quantized(&name);
        let cols = shape.last().copied().unwrap_or(0);
        match super::quant::plan(self.precision.quant, role, stored, cols) {
            Plan::Keep => Ok(Weight::Quantized(std::sync::Arc::new(
                self.ckpt.quantized(&name, shape, self.device)?,
            ))),
            Plan::Dense => Ok(Weight::Dense(self.ckpt.tensor(
                &name,
                shape,
                self.precision.weights,
                self.device,
            )?)),
            Plan::Quantize(to) => {
                // From the stored values in f32 (a bf16 or re-quantized tensor loses nothing
                // more on the way), quantized on the CPU, then moved to the device.
                let dense = self.ckpt.tensor(&name, shape, DType::F32, &Device::Cpu)?;
                Weight::quantize_onto(&dense, to, self.device).map_err(|e| self.error(leaf, e))
            }
        }
    }

    /// Any other tensor (norms, biases, embeddings: the `acts` dtype), checked to have
    /// `shape`.
    pub fn vector(&self, leaf: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        self.ckpt
            .tensor(&self.name(leaf), shape, self.precision.acts, self.device)
    }

    /// Entry `index` of a fused `[n, …]` weight (`weights` dtype); see
    /// [`Checkpoint::tensor_row`].
    pub fn matrix_row(
        &self,
        leaf: &str,
        shape: &[usize],
        index: usize,
    ) -> Result<Weight, ModelError> {
        let cols = shape.last().copied().unwrap_or(0);
        // Fused expert tensors come from safetensors: dense, or quantized at load.
        match super::quant::plan(self.precision.quant, Role::Body, None, cols) {
            Plan::Quantize(to) => {
                let dense = self.ckpt.tensor_row(
                    &self.name(leaf),
                    shape,
                    index,
                    DType::F32,
                    &Device::Cpu,
                )?;
                Weight::quantize_onto(&dense, to, self.device).map_err(|e| self.error(leaf, e))
            }
            _ => Ok(Weight::Dense(self.ckpt.tensor_row(
                &self.name(leaf),
                shape,
                index,
                self.precision.weights,
                self.device,
            )?)),
        }
    }

    /// `leaf` as host f32 values, checked to have `shape`.
    pub fn host_f32(&self, leaf: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let name = self.name(leaf);
        self.ckpt
            .tensor(&name, shape, DType::F32, &Device::Cpu)?
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| self.error(leaf, e))
    }

    /// A candle error while building something from `leaf`, naming it.
    pub fn error(&self, leaf: &str, e: candle_core::Error) -> ModelError {
        ModelError::Tensor {
            file: self.ckpt.dir.clone(),
            name: self.name(leaf),
            message: e.to_string(),
        }
    }
}

/// The weight files of `dir`, in a stable order.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
            file: index.clone(),
            source,
        })?;
        let parsed: IndexFile = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            file: index.clone(),
            message: e.to_string(),
        })?;
        let names: BTreeSet<String> = parsed.weight_map.into_values().collect();
        let mut files = Vec::new();
        for name in names {
            let path = dir.join(&name);
            if !path.is_file() {
                return Err(ModelError::Config {
                    file: index.clone(),
                    key: "weight_map".into(),
                    expected: format!("files that exist in {} (missing: {name})", dir.display()),
                });
            }
            files.push(path);
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ModelError::Io {
            file: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        // Only `model*.safetensors`: repositories also ship other safetensors files
        // (`consolidated.safetensors`, adapters) that are not this layout's weights.
        .filter(|p| {
            p.extension().is_some_and(|x| x == "safetensors")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("model"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Unsupported {
            file: dir.to_path_buf(),
            what: "a directory without weights: expected model.safetensors, or shards listed \
                   in model.safetensors.index.json (PyTorch .bin checkpoints are not read)"
                .into(),
        });
    }
    Ok(files)
}

#[allow(unsafe_code)]
fn map_files(files: &[PathBuf]) -> Result<MmapedSafetensors, ModelError> {
    // SAFETY: the files are mapped read-only; candle copies each tensor out of the map when
    // it is loaded. The contract mmap asks of us is that nobody truncates or rewrites the
    // files while they are mapped: checkpoints are read-only volumes in a pod, and the
    // README says not to rewrite a checkpoint under a running worker.
    unsafe { MmapedSafetensors::multi(files) }.map_err(|e| ModelError::Tensor {
        file: files.first().cloned().unwrap_or_default(),
        name: String::new(),
        message: format!("not a valid safetensors file: {e}"),
    })
}

/// Tensor names and shapes from a safetensors header (8-byte length + JSON), without
/// reading the data.
fn read_header(file: &Path, mut f: std::fs::File) -> Result<Vec<(String, Vec<usize>)>, ModelError> {
    use std::io::Read as _;
    let io = |source| ModelError::Io {
        file: file.to_path_buf(),
        source,
    };
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(ModelError::Tensor {
            file: file.to_path_buf(),
            name: String::new(),
            message: format!("header of {len} bytes: not a safetensors file"),
        });
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(io)?;
    let parsed: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| ModelError::Json {
            file: file.to_path_buf(),
            message: format!("safetensors header: {e}"),
        })?;
    Ok(parsed
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .map(|(name, info)| {
            let shape = info
                .get("shape")
                .and_then(|s| s.as_array())
                .map(|dims| {
                    dims.iter()
                        .filter_map(|d| d.as_u64())
                        .map(|d| d as usize)
                        .collect()
                })
                .unwrap_or_default();
            (name, shape)
        })
        .collect())
}

/// FNV-1a, 64-bit: a hash whose value is fixed by its definition (unlike std's), so every
/// build computes the same fingerprint.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}
