//! `y = x · Wᵀ` for a weight saved `[out, in]`, the one product every layer uses, with the
//! path chosen at run time by shape and device.
//!
//! Decode multiplies a few rows (one per sequence, or per sequence routed to an expert)
//! by a large weight, so it is bound by reading the weight once. candle's CPU GEMM tiles the
//! row dimension in blocks of dozens and pads the rest, and packs a transposed operand on
//! every call: measured on a 1280×1024 f32 weight (2 vCPU EPYC), `x · Wᵀ` took 600–970 µs
//! for 2–32 rows, against ~100 µs for one row. So:
//!
//! - up to [`SMALL_ROWS`] rows on a CPU with AVX2+FMA, in f32: a kernel that streams each
//!   weight row once and takes its dot product with every input row, four rows per pass
//!   (same weight: 72–116 µs for 1–4 rows, 446 µs for 8, against 104–560 µs);
//! - otherwise `(W · xᵀ)ᵀ`: the GEMM's long side runs over the weight's rows, which the CPU
//!   kernel tiles without padding waste (303 µs for 16 rows, 494 µs for 32 in the same
//!   measurement), and any device's BLAS handles it.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};

use super::simd;

/// Rows at most for the CPU small-batch kernel.
pub const SMALL_ROWS: usize = 8;

/// A weight matrix `[out, in]` as the engine holds it: dense in a candle dtype, or in one
/// of ggml's block-quantized types (`Q8_0`, `Q4_K`, ... as stored in a GGUF or quantized
/// at load), multiplied by candle's quantized kernels without widening the weight.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A plain tensor.
    Dense(Tensor),
    /// Block-quantized rows: each row is `in / block` blocks of the type.
    Quantized(Arc<QTensor>),
}

impl Weight {
    /// `[out, in]`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(t) => t.dims2(),
            Self::Quantized(q) => q.shape().dims2(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    /// The storage type as users read it: `f32`, `bf16`, `q8_0`, `q4_k`, ...
    pub fn type_name(&self) -> String {
        match self {
            Self::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Self::Quantized(q) => ggml_name(q.dtype()),
        }
    }

    /// Quantizes a dense `[out, in]` CPU tensor to `dtype`, held on `device`.
    pub fn quantize_onto(
        dense: &Tensor,
        dtype: GgmlDType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let q = if device.is_cpu() {
            QTensor::quantize(dense, dtype)?
        } else {
            QTensor::quantize_onto(dense, dtype, device)?
        };
        Ok(Self::Quantized(Arc::new(q)))
    }

    /// The weight as a dense tensor in `dtype` (dequantized if quantized).
    pub fn to_dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(t) => t.to_dtype(dtype),
            Self::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype),
        }
    }

    /// `a` then `b` as one matrix of `a.rows + b.rows` rows (the fused gate+up of an MLP);
    /// `None` when they are stored differently (two types, or dense and quantized), so the
    /// caller keeps them apart.
    pub fn cat_rows(a: &Self, b: &Self) -> Result<Option<Self>> {
        match (a, b) {
            (Self::Dense(a), Self::Dense(b)) if a.dtype() == b.dtype() => {
                Ok(Some(Self::Dense(Tensor::cat(&[a, b], 0)?.contiguous()?)))
            }
            (Self::Quantized(qa), Self::Quantized(qb)) if qa.dtype() == qb.dtype() => {
                let ((ra, ka), (rb, kb)) = (qa.shape().dims2()?, qb.shape().dims2()?);
                if ka != kb {
                    candle_core::bail!("cat_rows: widths {ka} and {kb} differ");
                }
                // Rows are whole blocks, stored one after the other: the fused matrix is the
                // two byte ranges end to end.
                let mut data = qa.data()?.into_owned();
                data.extend_from_slice(&qb.data()?);
                let storage = candle_core::quantized::QStorage::from_data(
                    std::borrow::Cow::Owned(data),
                    &qa.device(),
                    qa.dtype(),
                )?;
                Ok(Some(Self::Quantized(Arc::new(QTensor::new(
                    storage,
                    (ra + rb, ka),
                )?))))
            }
            _ => Ok(None),
        }
    }
}

/// ggml's name for a block type, lower-case (`q4_k`, `q8_0`).
pub fn ggml_name(dtype: GgmlDType) -> String {
    match dtype {
        GgmlDType::Q2K => "q2_k".into(),
        GgmlDType::Q3K => "q3_k".into(),
        GgmlDType::Q4K => "q4_k".into(),
        GgmlDType::Q5K => "q5_k".into(),
        GgmlDType::Q6K => "q6_k".into(),
        GgmlDType::Q8K => "q8_k".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// `xs` (`[rows, in]`) times `w` transposed, whatever `w`'s storage.
pub fn linear_w(xs: &Tensor, w: &Weight) -> Result<Tensor> {
    match w {
        Weight::Dense(t) => linear(xs, t),
        Weight::Quantized(q) => {
            let (rows, _) = xs.dims2()?;
            if rows == 0 {
                return Tensor::zeros((0, q.shape().dims2()?.0), xs.dtype(), xs.device());
            }
            if xs.dtype() == DType::F32
                && let Some(ys) = simd_cpu(xs, HeldRows::of(w), w.dims2()?)?
            {
                return Ok(ys);
            }
            if let Some(ys) = blocks_cpu(xs, q)? {
                return Ok(ys);
            }
            // candle's kernel quantizes the activations to the type's dot-product partner
            // (Q8_0 / Q8_K) per row and runs the integer dot products; activations stay f32.
            let ys =
                QMatMul::QTensor(q.clone()).forward(&xs.to_dtype(DType::F32)?.contiguous()?)?;
            ys.to_dtype(xs.dtype())
        }
    }
}

/// `xs` (`[rows, in]`) times `w` (`[out, in]`) transposed: `[rows, out]`.
pub fn linear(xs: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (rows, _) = xs.dims2()?;
    if rows == 0 {
        return Tensor::zeros((0, w.dim(0)?), xs.dtype(), xs.device());
    }
    if (rows <= SMALL_ROWS || simd::Isa::detect() >= simd::Isa::Avx512)
        && xs.device().is_cpu()
        && xs.dtype() == DType::F32
        && matches!(w.dtype(), DType::F32 | DType::BF16)
        && let Some(ys) = simd_cpu(xs, HeldRows::of_tensor(w), w.dims2()?)?
    {
        return Ok(ys);
    }
    // 16-bit weights with f32 activations (the CPU's bf16/f16 mode): widen for this product,
    // as candle's own CPU bf16 GEMM does internally.
    let w = if w.dtype() == xs.dtype() {
        w.clone()
    } else {
        w.to_dtype(xs.dtype())?
    };
    w.matmul(&xs.t()?)?.t()?.contiguous()
}

/// The block types the CPU multiplies with f32 activations (see [`blocks_cpu`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocks {
    /// f16 scale, 32 × i8.
    Q8_0,
    /// f16 scale, 32 × 4-bit (value − 8).
    Q4_0,
    /// f16 scale, f16 minimum, 32 × 4-bit.
    Q4_1,
}

impl Blocks {
    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            _ => None,
        }
    }

    /// Bytes of one 32-weight block.
    fn bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
        }
    }
}

/// `Q8_0`, `Q4_0` and `Q4_1` weights on a CPU without [`simd::blocks`]' integer kernels (no
/// AVX512-VNNI), with f32 activations, unquantized. candle's
/// kernels quantize the activations to 8 bits (on AVX-512, for rows of 256·n, with one
/// scale per 256 values) and have no SIMD kernel for `Q4_1`: on SmolLM2, int8 that way lost
/// 0.68 % of perplexity (llama.cpp's Q8_0: 0.28 %) and the shipped Q4_1 file decoded at
/// 21 tokens/s. Here each weight row is widened to f32 in L1 by an AVX2 routine and dotted
/// with every input row (few rows: decode, reading only the blocks' bytes), or the weight is
/// widened once and the f32 GEMM runs (many rows: prefill, where the product costs `rows`
/// times the widening). `None` when the type is not one of these or the CPU lacks AVX2.
fn blocks_cpu(xs: &Tensor, q: &QTensor) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    const BLOCK: usize = 32;
    let Some(kind) = Blocks::of(q.dtype()) else {
        return Ok(None);
    };
    if !xs.device().is_cpu() || xs.dtype() != DType::F32 || simd::Isa::detect() < simd::Isa::Avx2 {
        return Ok(None);
    }
    let (rows, k) = xs.dims2()?;
    let (n, wk) = q.shape().dims2()?;
    if wk != k || !k.is_multiple_of(BLOCK) {
        candle_core::bail!("linear: input width {k} but the {kind:?} weight is [{n}, {wk}]");
    }
    if rows > SMALL_ROWS {
        return Ok(Some(linear(xs, &q.dequantize(xs.device())?)?));
    }
    let data = q.data()?;
    let row_bytes = k / BLOCK * kind.bytes();
    if data.len() != n * row_bytes {
        candle_core::bail!(
            "{kind:?} weight [{n}, {k}]: {} bytes, expected {}",
            data.len(),
            n * row_bytes
        );
    }
    let x = xs.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    const CHUNK: usize = 64;
    let mut yt = vec![0f32; n * rows];
    yt.par_chunks_mut(CHUNK * rows)
        .zip(data.par_chunks(CHUNK * row_bytes))
        .for_each(|(out, w_rows)| {
            let mut row = vec![0f32; k];
            for (w, o) in w_rows
                .chunks_exact(row_bytes)
                .zip(out.chunks_exact_mut(rows))
            {
                kernel::widen(kind, w, &mut row);
                super::simd::x86::rows_dot(&x, rows, k, &row, o);
            }
        });
    Ok(Some(transposed(yt, rows, n, xs.device())?))
}

/// `[rows, n]` from the weight-major `[n, rows]` products.
pub(super) fn transposed(
    yt: Vec<f32>,
    rows: usize,
    n: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    if rows == 1 {
        return Tensor::from_vec(yt, (1, n), device);
    }
    let mut y = vec![0f32; rows * n];
    for (o, col) in yt.chunks_exact(rows).enumerate() {
        for (r, v) in col.iter().enumerate() {
            y[r * n + o] = *v;
        }
    }
    Tensor::from_vec(y, (rows, n), device)
}

/// A CPU weight's rows as [`simd`] takes them (dense f32 or bf16, or one of the block types
/// of [`simd::blocks`]), its storage held for reading as long as this lives.
pub enum HeldRows<'a> {
    Dense {
        storage: candle_core::StorageRef<'a>,
        start: usize,
        len: usize,
    },
    Blocks(simd::blocks::Kind, &'a [u8]),
}

impl std::fmt::Debug for HeldRows<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dense { start, len, .. } => f
                .debug_struct("Dense")
                .field("start", start)
                .field("len", len)
                .finish_non_exhaustive(),
            Self::Blocks(kind, data) => f
                .debug_tuple("Blocks")
                .field(kind)
                .field(&data.len())
                .finish(),
        }
    }
}

impl<'a> HeldRows<'a> {
    /// `None` for a non-contiguous, non-CPU or other-dtype weight, or a block type without
    /// a kernel here (or a CPU without [`simd::blocks::available`]).
    pub fn of(w: &'a Weight) -> Option<Self> {
        match w {
            Weight::Dense(t) => Self::of_tensor(t),
            Weight::Quantized(q) => {
                let kind = block_kind(q.dtype())?;
                if !simd::blocks::available() || !q.device().is_cpu() {
                    return None;
                }
                match q.data().ok()? {
                    std::borrow::Cow::Borrowed(data) => Some(Self::Blocks(kind, data)),
                    std::borrow::Cow::Owned(_) => None,
                }
            }
        }
    }

    /// `None` for a non-contiguous, non-CPU or other-dtype tensor.
    pub fn of_tensor(t: &'a Tensor) -> Option<Self> {
        if !t.is_contiguous() || !matches!(t.dtype(), DType::F32 | DType::BF16) {
            return None;
        }
        let (storage, layout) = t.storage_and_layout();
        if !matches!(&*storage, candle_core::Storage::Cpu(_)) {
            return None;
        }
        Some(Self::Dense {
            start: layout.start_offset(),
            len: t.elem_count(),
            storage,
        })
    }

    /// The rows.
    pub fn rows(&self) -> simd::Rows<'_> {
        let (storage, start, len) = match self {
            Self::Blocks(kind, data) => return simd::Rows::Blocks(*kind, data),
            Self::Dense {
                storage,
                start,
                len,
            } => (storage, *start, *len),
        };
        let candle_core::Storage::Cpu(cpu) = &**storage else {
            unreachable!("`of` keeps CPU storage only")
        };
        match cpu {
            candle_core::CpuStorage::BF16(v) => simd::Rows::Bf16(&v[start..][..len]),
            candle_core::CpuStorage::F32(v) => simd::Rows::F32(&v[start..][..len]),
            _ => unreachable!("`of` keeps f32 and bf16 only"),
        }
    }
}

/// The environment variable that sends `Q8_0`, `Q4_0` and `Q4_1` weights to the integer
/// kernels too (`1`), as llama.cpp multiplies them: faster, at a small cost in accuracy.
pub const INT8_ACTIVATIONS_ENV: &str = "SWITCHYARD_INT8_ACTIVATIONS";

/// [`INT8_ACTIVATIONS_ENV`] as set: unset or `0` is off, `1` on; anything else is an error
/// naming it (the worker checks it at start).
pub fn int8_activations_setting() -> std::result::Result<bool, String> {
    match std::env::var(INT8_ACTIVATIONS_ENV).as_deref() {
        Err(_) | Ok("0") => Ok(false),
        Ok("1") => Ok(true),
        Ok(other) => Err(format!(
            "{INT8_ACTIVATIONS_ENV}={other:?}: accepted values are 0 (f32 activations for \
             Q8_0/Q4_0/Q4_1 weights, the default) and 1 (8-bit activations, llama.cpp's \
             numerics)"
        )),
    }
}

/// The [`simd::blocks`] kernel for a ggml type, if it takes one. The k-quants and `Q5_0`
/// always do (the alternative, candle's kernels, quantizes the activations too, with one
/// scale per 256). `Q8_0`, `Q4_0` and `Q4_1` keep f32 activations ([`blocks_cpu`]) unless
/// [`INT8_ACTIVATIONS_ENV`] is `1`: on SmolLM2 the 8-bit activations cost +0.36 % of
/// perplexity at `int8` and change greedy answers (exactly to llama.cpp's on the same file).
fn block_kind(dtype: GgmlDType) -> Option<simd::blocks::Kind> {
    use simd::blocks::Kind;
    static INT8: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let int8 = *INT8.get_or_init(|| int8_activations_setting().unwrap_or(false));
    Some(match dtype {
        GgmlDType::Q8_0 if int8 => Kind::Q8_0,
        GgmlDType::Q4_0 if int8 => Kind::Q4_0,
        GgmlDType::Q4_1 if int8 => Kind::Q4_1,
        GgmlDType::Q5_0 => Kind::Q5_0,
        GgmlDType::Q4K => Kind::Q4K,
        GgmlDType::Q6K => Kind::Q6K,
        _ => return None,
    })
}

/// `xs` times `w`'s rows `held` (`[n, k]`) on [`simd`]'s kernels: dense f32/bf16 weights
/// with one of [`simd::Isa`]'s, block-quantized ones with [`simd::blocks`]' against
/// activations quantized to 8 bits per 32 values. `None` when the CPU has no such kernel or
/// the weight is not held as they take it.
fn simd_cpu(
    xs: &Tensor,
    held: Option<HeldRows<'_>>,
    (n, wk): (usize, usize),
) -> Result<Option<Tensor>> {
    let isa = simd::Isa::detect();
    let Some(held) = held.filter(|_| isa != simd::Isa::None && xs.device().is_cpu()) else {
        return Ok(None);
    };
    let (rows, k) = xs.dims2()?;
    if wk != k {
        candle_core::bail!("linear: input width {k} but the weight is [{n}, {wk}]");
    }
    let x = xs.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let Some(y) = simd::product(&x, rows, k, held.rows(), isa) else {
        return Ok(None);
    };
    Ok(Some(Tensor::from_vec(y, (rows, n), xs.device())?))
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    /// One row of 32-weight blocks of `kind` widened to f32 into `out`.
    #[allow(unsafe_code)]
    pub fn widen(kind: super::Blocks, row: &[u8], out: &mut [f32]) {
        debug_assert!(super::simd::Isa::detect() >= super::simd::Isa::Avx2);
        // SAFETY: as for `rows_dot`: the routine only needs AVX2 and FMA, which every caller
        // checked with `simd::Isa::detect() >= Avx2` first; it takes slices.
        unsafe { widen_avx2(kind, row, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn widen_avx2(kind: super::Blocks, row: &[u8], out: &mut [f32]) {
        use super::Blocks;
        let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        match kind {
            Blocks::Q8_0 => {
                for (b, o) in row.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                    let d = f16(b);
                    for (v, q) in o.iter_mut().zip(&b[2..34]) {
                        *v = d * f32::from(*q as i8);
                    }
                }
            }
            // ggml's 4-bit layout: byte j holds weight j (low nibble) and j + 16 (high).
            Blocks::Q4_0 => {
                for (b, o) in row.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
                    let d = f16(b);
                    let (lo, hi) = o.split_at_mut(16);
                    for ((l, h), q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[2..18]) {
                        *l = d * (f32::from(q & 0x0f) - 8.0);
                        *h = d * (f32::from(q >> 4) - 8.0);
                    }
                }
            }
            Blocks::Q4_1 => {
                for (b, o) in row.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
                    let (d, m) = (f16(b), f16(&b[2..]));
                    let (lo, hi) = o.split_at_mut(16);
                    for ((l, h), q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[4..20]) {
                        *l = d.mul_add(f32::from(q & 0x0f), m);
                        *h = d.mul_add(f32::from(q >> 4), m);
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    pub fn widen(_: super::Blocks, _: &[u8], _: &mut [f32]) {}
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn reference(xs: &Tensor, w: &Tensor) -> Vec<Vec<f32>> {
        xs.matmul(&w.t().expect("t"))
            .expect("matmul")
            .to_vec2()
            .expect("vec")
    }

    /// Quantized weights: the product matches the dequantized weight's within what
    /// quantizing the activations to 8 bits costs (candle's kernels do, as llama.cpp's), and
    /// fusing two quantized matrices by rows changes nothing.
    #[test]
    fn quantized_products_match_the_dequantized_weights() -> Result<()> {
        let dev = Device::Cpu;
        for (rows, n, k) in [(1, 64, 576), (3, 96, 256), (8, 130, 512), (37, 64, 1536)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
            for t in [
                GgmlDType::Q8_0,
                GgmlDType::Q4_0,
                GgmlDType::Q4_1,
                GgmlDType::Q4K,
            ] {
                if k % t.block_size() != 0 {
                    continue;
                }
                let q = Weight::quantize_onto(&w, t, &dev)?;
                let dense = q.to_dense(candle_core::DType::F32)?;
                let want = reference(&x, &dense);
                let got = linear_w(&x, &q)?.to_vec2::<f32>()?;
                let scale = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
                for (g, r) in got.iter().flatten().zip(want.iter().flatten()) {
                    assert!(
                        (g - r).abs() < 0.02 * scale,
                        "{t:?} {rows}x{n}x{k}: {g} vs {r}"
                    );
                }
                let twice = Weight::quantize_onto(&(&w * 2.0)?, t, &dev)?;
                let fused = Weight::cat_rows(&q, &twice)?.expect("same type");
                let apart = Tensor::cat(&[linear_w(&x, &q)?, linear_w(&x, &twice)?], 1)?;
                let diff = (linear_w(&x, &fused)? - apart)?.abs()?.max_all()?;
                assert_eq!(diff.to_scalar::<f32>()?, 0.0, "{t:?}: fused rows");
                assert!(
                    q.bytes() < n * k * 4 / 3,
                    "{t:?} holds fewer bytes than f32"
                );
            }
        }
        // Two storage types do not fuse.
        let a = Weight::quantize_onto(
            &Tensor::ones((2, 64), candle_core::DType::F32, &dev)?,
            GgmlDType::Q8_0,
            &dev,
        )?;
        let b = Weight::Dense(Tensor::ones((2, 64), candle_core::DType::F32, &dev)?);
        assert!(Weight::cat_rows(&a, &b)?.is_none());
        Ok(())
    }

    #[test]
    fn both_paths_match_a_plain_matmul() -> Result<()> {
        let dev = Device::Cpu;
        // Odd sizes: a partial chunk of weight rows, a dot-product tail.
        let w32 = Tensor::randn(0f32, 1.0, (131, 200), &dev)?;
        // bf16 weights: compared with the same rounded weights in f32 (and, where the CPU
        // multiplies bf16 pairs, the activations rounded to bf16 too).
        let w16 = w32.to_dtype(candle_core::DType::BF16)?;
        let w16_as_32 = w16.to_dtype(candle_core::DType::F32)?;
        let pairs = simd::Isa::detect() == simd::Isa::Avx512Bf16;
        for (w, exact) in [(&w32, &w32), (&w16, &w16_as_32)] {
            for rows in [1, 2, 5, 8, 9, 33, 130] {
                let xs = Tensor::randn(0f32, 1.0, (rows, 200), &dev)?;
                let got = linear(&xs, w)?.to_vec2::<f32>()?;
                let xs_as_used = if pairs && w.dtype() == candle_core::DType::BF16 {
                    xs.to_dtype(candle_core::DType::BF16)?
                        .to_dtype(candle_core::DType::F32)?
                } else {
                    xs.clone()
                };
                let want = reference(&xs_as_used, exact);
                for (g, r) in got.iter().flatten().zip(want.iter().flatten()) {
                    assert!(
                        (g - r).abs() < 1e-3,
                        "{:?} rows {rows}: {g} vs {r}",
                        w.dtype()
                    );
                }
            }
        }
        Ok(())
    }
}
