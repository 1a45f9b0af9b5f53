//! The CPU's dense products `yᵀ = W · xᵀ` for weights saved `[out, in]` (f32 or bf16) and
//! f32 activations, chosen at run time by what the CPU has ([`Isa`]).
//!
//! Both operands are row-major with the reduction dimension `k` contiguous, so each output
//! is a dot product of two contiguous rows. The kernels work on tiles of up to four input
//! rows by four weight rows: sixteen vector accumulators, each loaded weight vector feeds
//! four FMAs and each loaded input vector four, so the loop is bound by the FMA units rather
//! than by loads. A task takes a band of weight rows; within it, a tile of four weight rows
//! (16 KiB of f32 at `k` = 1024, half that in bf16) stays in L1 while every block of four
//! input rows passes over it, and input rows are taken 64 at a time so they stay in L2.
//!
//! - `Avx512Bf16` (AVX512-BF16, e.g. AMD Zen 4, Intel Sapphire Rapids): bf16 weights are
//!   multiplied as stored by `vdpbf16ps`, two products per f32 lane, against the
//!   activations rounded to bf16 once per call (as a bf16 model computes them); f32 weights
//!   as below.
//! - `Avx512` (AVX-512F/BW): f32 FMAs on 16 lanes; bf16 weights widened in registers (a
//!   16-bit shift), activations kept in f32.
//! - `Avx2` (AVX2+FMA): 8 lanes, one weight row at a time against up to four input rows,
//!   bf16 rows widened into an L1 buffer first.
//! - `None`: the caller falls back to candle's GEMM.
//!
//! Block-quantized weights ([`Rows::Blocks`]) take [`blocks`]' integer kernels, on CPUs with
//! AVX512-VNNI, against activations quantized to 8 bits once per call.

pub mod attend;
pub mod blocks;

use half::bf16;

/// The instruction sets the kernels use, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// No kernel here: use candle's GEMM.
    None,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512 F and BW.
    Avx512,
    /// AVX-512 F, BW and BF16.
    Avx512Bf16,
}

impl Isa {
    /// What this CPU runs (detected once).
    pub fn detect() -> Self {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(detect)
    }

    /// The paths this CPU can run, for tests that compare them.
    #[cfg(test)]
    pub fn all_available() -> Vec<Self> {
        [Self::Avx2, Self::Avx512, Self::Avx512Bf16]
            .into_iter()
            .filter(|i| *i <= Self::detect())
            .collect()
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    use std::arch::is_x86_feature_detected as has;
    if !(has!("avx2") && has!("fma")) {
        Isa::None
    } else if !(has!("avx512f") && has!("avx512bw")) {
        Isa::Avx2
    } else if has!("avx512bf16") {
        Isa::Avx512Bf16
    } else {
        Isa::Avx512
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::None
}

/// A weight's rows as stored.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    /// ggml blocks of `kind`, each row `k / kind.values()` of them.
    Blocks(blocks::Kind, &'a [u8]),
}

impl<'a> Rows<'a> {
    /// Rows of `k` values held.
    fn n(&self, k: usize) -> usize {
        match self {
            Self::F32(w) => w.len() / k,
            Self::Bf16(w) => w.len() / k,
            Self::Blocks(kind, w) => w.len() / kind.row_bytes(k),
        }
    }

    /// Whether they are whole rows of `k` values.
    fn whole(&self, k: usize) -> bool {
        match self {
            Self::F32(w) => w.len().is_multiple_of(k),
            Self::Bf16(w) => w.len().is_multiple_of(k),
            Self::Blocks(kind, w) => {
                k.is_multiple_of(kind.values()) && w.len().is_multiple_of(kind.row_bytes(k))
            }
        }
    }

    /// Rows `first..first + n`.
    fn slice(&self, first: usize, n: usize, k: usize) -> Rows<'a> {
        match *self {
            Self::F32(w) => Self::F32(&w[first * k..(first + n) * k]),
            Self::Bf16(w) => Self::Bf16(&w[first * k..(first + n) * k]),
            Self::Blocks(kind, w) => {
                let b = kind.row_bytes(k);
                Self::Blocks(kind, &w[first * b..(first + n) * b])
            }
        }
    }
}

/// Weight rows per parallel task: a multiple of the tile's four.
const BAND: usize = 64;
/// Input rows per pass over a band (kept in L2).
const ROW_BLOCK: usize = 64;

/// One product of a batch of them: `x` `[rows, k]` by the weight rows `w` `[n, k]`.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    pub x: &'a [f32],
    pub rows: usize,
    pub k: usize,
    pub w: Rows<'a>,
}

impl Job<'_> {
    fn n(&self) -> usize {
        self.w.n(self.k)
    }
}

/// A job's activations as its kernel takes them.
enum Input {
    /// As given (f32).
    F32,
    /// Rounded to bf16, for `vdpbf16ps`.
    Bf16(Vec<bf16>),
    /// Quantized to 8 bits, for block-quantized weights.
    Blocks(blocks::Acts),
}

/// `y[r · n + o] = x[r] · w[o]` for `x` `[rows, k]` and `w` `[n, k]`, on `isa` (at most
/// [`Isa::detect`]), parallel over bands of weight rows. `None` when `isa` is `None`, or
/// the weight is block-quantized and the CPU lacks [`blocks::available`].
pub fn product(x: &[f32], rows: usize, k: usize, w: Rows<'_>, isa: Isa) -> Option<Vec<f32>> {
    products(&[Job { x, rows, k, w }], isa).map(|mut v| v.remove(0))
}

/// Several products in one parallel region (the experts of a MoE layer: one fork and join
/// for all of them, and both cores busy even when each expert has few weight rows): the
/// bands of every job form one list of tasks. Each result as [`product`]'s.
pub fn products(jobs: &[Job<'_>], isa: Isa) -> Option<Vec<Vec<f32>>> {
    use rayon::prelude::*;
    assert!(isa <= Isa::detect(), "{isa:?} is not available on this CPU");
    let quantized = jobs.iter().any(|j| matches!(j.w, Rows::Blocks(..)));
    if isa == Isa::None || (quantized && !blocks::available()) {
        return None;
    }
    for j in jobs {
        assert_eq!(
            j.x.len(),
            j.rows * j.k,
            "input is not [{}, {}]",
            j.rows,
            j.k
        );
        assert!(
            j.k > 0 && j.w.whole(j.k),
            "weight rows are not {} wide",
            j.k
        );
    }
    // bf16 pairs multiply bf16 inputs, and quantized weights 8-bit inputs: each job's rows
    // converted once.
    let inputs: Vec<Input> = jobs
        .iter()
        .map(|j| match (isa, j.w) {
            (Isa::Avx512Bf16, Rows::Bf16(_)) => {
                let mut xb = vec![bf16::ZERO; j.x.len()];
                // SAFETY: `isa` is at most what the CPU has (asserted above).
                #[allow(unsafe_code)]
                unsafe {
                    x86::round_bf16(j.x, &mut xb)
                };
                Input::Bf16(xb)
            }
            (_, Rows::Blocks(..)) if j.rows > 0 => Input::Blocks(blocks::Acts::quantize(j.x)),
            _ => Input::F32,
        })
        .collect();
    let mut tasks = Vec::new();
    for (i, (j, input)) in jobs.iter().zip(&inputs).enumerate() {
        if j.rows == 0 {
            continue;
        }
        for first in (0..j.n()).step_by(BAND) {
            tasks.push((i, input, first, BAND.min(j.n() - first)));
        }
    }
    // Each band's `[rows, band]` block, then copied into its rows of the result: the copies
    // are contiguous, and the tasks share nothing.
    let blocks: Vec<(usize, usize, Vec<f32>)> = tasks
        .into_par_iter()
        .map(|(i, input, first, nb)| {
            let mut out = vec![0f32; jobs[i].rows * nb];
            band(&jobs[i], input, first, &mut out, isa);
            (i, first, out)
        })
        .collect();
    let mut outs: Vec<Vec<f32>> = jobs.iter().map(|j| vec![0f32; j.n() * j.rows]).collect();
    for (i, first, block) in blocks {
        let (n, nb) = (jobs[i].n(), block.len() / jobs[i].rows);
        for (dst, src) in outs[i].chunks_exact_mut(n).zip(block.chunks_exact(nb)) {
            dst[first..first + nb].copy_from_slice(src);
        }
    }
    Some(outs)
}

/// One band of `job`'s weight rows from `first`, into `out` (`[job.rows, band rows]`).
fn band(job: &Job<'_>, input: &Input, first: usize, out: &mut [f32], isa: Isa) {
    let (x, rows, k) = (job.x, job.rows, job.k);
    let n = out.len() / rows;
    let w = job.w.slice(first, n, k);
    match (isa, w, input) {
        (Isa::None, ..) => unreachable!("`products` returns early"),
        (_, Rows::Blocks(kind, w), Input::Blocks(xq)) => {
            let b = kind.row_bytes(k);
            // `Q4_K` / `Q6_K`: four weight rows per tile even for one input row, four
            // independent sums instead of one chain of multiply-adds (batch 1 on the
            // Q4_K_M bench model: 181 -> 202-242 tokens/s). Dense rows and the 32-value
            // types keep one: their kernels wait on memory, and four streams measured
            // slower there (bf16 batch 1: 112 -> 101; Q8_0: 147 -> 138).
            let few = if kind.values() == 256 { 4 } else { 1 };
            tiles(rows, n, out, few, |r, mr, o, nr, acc| {
                blocks::tile(kind, xq.rows(r, mr, k), &w[o * b..], nr, k, acc)
            })
        }
        (_, Rows::Blocks(..), _) => unreachable!("`products` quantizes the input"),
        (Isa::Avx2, w, _) => avx2_band(x, rows, k, w, out),
        // One input row (a dense product at batch 1): the one-by-one tile's arithmetic, row
        // after row in one loop, without a tile call and its accumulator through memory per
        // weight row. BF16 batch 1 on the bench model, both paths interleaved in one
        // process: +3 % with the row loop timed first, +9 % with it second. The sums are
        // the tile's, so a row's result still does not depend on its batch.
        // SAFETY: `products` asserted `isa <= Isa::detect()`: AVX512-BF16 for the first,
        // AVX-512 F/BW for the second; both take slices and check their bounds.
        #[allow(unsafe_code)]
        (Isa::Avx512Bf16, Rows::Bf16(w), Input::Bf16(xb)) if rows == 1 => unsafe {
            x86::each_row_dpbf16(xb, w, k, out)
        },
        #[allow(unsafe_code)]
        (_, Rows::F32(w), _) if rows == 1 => unsafe { x86::each_row_f32(x, w, k, out) },
        (Isa::Avx512Bf16, Rows::Bf16(w), Input::Bf16(xb)) => {
            tiles(rows, n, out, 1, |r, mr, o, nr, acc| {
                // SAFETY: `products` asserted `isa <= Isa::detect()`, so the CPU has
                // AVX512-BF16; `tiles` keeps rows `r..r + mr` and `o..o + nr` in bounds.
                #[allow(unsafe_code)]
                unsafe {
                    x86::tile_dpbf16(&xb[r * k..(r + mr) * k], &w[o * k..], nr, k, acc)
                }
            })
        }
        (_, Rows::Bf16(w), _) => tiles(rows, n, out, 1, |r, mr, o, nr, acc| {
            // SAFETY: as above, with AVX-512 F/BW.
            #[allow(unsafe_code)]
            unsafe {
                x86::tile_bf16_widen(&x[r * k..(r + mr) * k], &w[o * k..], nr, k, acc)
            }
        }),
        (_, Rows::F32(w), _) => tiles(rows, n, out, 1, |r, mr, o, nr, acc| {
            // SAFETY: as above, with AVX-512 F.
            #[allow(unsafe_code)]
            unsafe {
                x86::tile_f32(&x[r * k..(r + mr) * k], &w[o * k..], nr, k, acc)
            }
        }),
    }
}

/// Walks one band of `n` weight rows in tiles of up to 4 × 4, input rows `ROW_BLOCK` at a
/// time; `tile(r, mr, o, nr, acc)` fills `acc[c][j]` with `x[r + j] · w[o + c]`. For one
/// or two input rows, tiles take `few` weight rows (1 to 4).
fn tiles(
    rows: usize,
    n: usize,
    out: &mut [f32],
    few: usize,
    mut tile: impl FnMut(usize, usize, usize, usize, &mut [[f32; 4]; 4]),
) {
    debug_assert_eq!(out.len(), n * rows);
    debug_assert!((1..=4).contains(&few));
    let mut acc = [[0f32; 4]; 4];
    for block in (0..rows).step_by(ROW_BLOCK) {
        let block_end = (block + ROW_BLOCK).min(rows);
        let step = if rows <= 2 { few } else { 4 };
        for o in (0..n).step_by(step) {
            let nr = (n - o).min(step);
            for r in (block..block_end).step_by(4) {
                let mr = (block_end - r).min(4);
                tile(r, mr, o, nr, &mut acc);
                for (c, col) in acc.iter().enumerate().take(nr) {
                    for (j, v) in col.iter().enumerate().take(mr) {
                        out[(r + j) * n + o + c] = *v;
                    }
                }
            }
        }
    }
}

/// The first `N` rows of a `[rows, len]` slice, for the kernels. A loop, not
/// `std::array::from_fn`: its closure, compiled with a kernel's target features, would not
/// be inlined into it (a call per tile, every value through memory).
#[inline(always)]
fn rows<T, const N: usize>(s: &[T], len: usize) -> [&[T]; N] {
    let mut r = [&s[..0]; N];
    for (j, r) in r.iter_mut().enumerate() {
        *r = &s[j * len..(j + 1) * len];
    }
    r
}

/// The AVX2 path for one band: each weight row (widened to f32 in an L1 buffer when bf16)
/// against the input rows, four at a time.
fn avx2_band(x: &[f32], rows: usize, k: usize, w: Rows<'_>, out: &mut [f32]) {
    // rows_dot gives `[band, rows]`; the band is small, so transpose it here.
    let mut yt = vec![0f32; out.len()];
    avx2_band_t(x, rows, k, w, &mut yt);
    let n = out.len() / rows;
    for (o, col) in yt.chunks_exact(rows).enumerate() {
        for (r, v) in col.iter().enumerate() {
            out[r * n + o] = *v;
        }
    }
}

fn avx2_band_t(x: &[f32], rows: usize, k: usize, w: Rows<'_>, out: &mut [f32]) {
    match w {
        Rows::F32(w) => x86::rows_dot(x, rows, k, w, out),
        Rows::Bf16(w) => {
            let mut row = vec![0f32; k];
            for (src, y) in w.chunks_exact(k).zip(out.chunks_exact_mut(rows)) {
                for (d, s) in row.iter_mut().zip(src) {
                    *d = s.to_f32();
                }
                x86::rows_dot(x, rows, k, &row, y);
            }
        }
        Rows::Blocks(..) => unreachable!("`band` takes block kernels first"),
    }
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use std::arch::x86_64::*;

    use half::bf16;

    /// Calls `$kernel::<MR, NR>` for the runtime tile size, so that each size is its own
    /// fully unrolled function whose sixteen accumulators stay in registers.
    macro_rules! sized {
        ($kernel:ident, $mr:expr, $nr:expr, ($($arg:expr),*)) => {
            match ($mr, $nr) {
                (1, 1) => $kernel::<1, 1>($($arg),*),
                (1, 2) => $kernel::<1, 2>($($arg),*),
                (1, 3) => $kernel::<1, 3>($($arg),*),
                (1, 4) => $kernel::<1, 4>($($arg),*),
                (2, 1) => $kernel::<2, 1>($($arg),*),
                (2, 2) => $kernel::<2, 2>($($arg),*),
                (2, 3) => $kernel::<2, 3>($($arg),*),
                (2, 4) => $kernel::<2, 4>($($arg),*),
                (3, 1) => $kernel::<3, 1>($($arg),*),
                (3, 2) => $kernel::<3, 2>($($arg),*),
                (3, 3) => $kernel::<3, 3>($($arg),*),
                (3, 4) => $kernel::<3, 4>($($arg),*),
                (4, 1) => $kernel::<4, 1>($($arg),*),
                (4, 2) => $kernel::<4, 2>($($arg),*),
                (4, 3) => $kernel::<4, 3>($($arg),*),
                (4, 4) => $kernel::<4, 4>($($arg),*),
                (mr, nr) => panic!("tile {mr}x{nr}: rows and weight rows must be 1 to 4"),
            }
        };
    }

    /// One tile, `x.len() / k` input rows by `w.len() / k` weight rows (each 1 to 4), f32
    /// on 16 lanes.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub fn tile_f32(x: &[f32], w: &[f32], nr: usize, k: usize, acc: &mut [[f32; 4]; 4]) {
        sized!(f32_tile, x.len() / k, nr, (x, w, k, acc))
    }

    /// As [`tile_f32`] for bf16 weights, widened in registers (bf16 is the top half of an
    /// f32); activations stay f32.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub fn tile_bf16_widen(x: &[f32], w: &[bf16], nr: usize, k: usize, acc: &mut [[f32; 4]; 4]) {
        sized!(widen_tile, x.len() / k, nr, (x, w, k, acc))
    }

    /// bf16 activations by bf16 weights with `vdpbf16ps`: 32 products per instruction,
    /// summed pairwise into 16 f32 lanes.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub fn tile_dpbf16(x: &[bf16], w: &[bf16], nr: usize, k: usize, acc: &mut [[f32; 4]; 4]) {
        sized!(dpbf16_tile, x.len() / k, nr, (x, w, k, acc))
    }

    /// `out[o] = x · w[o]` for one input row `x` and every weight row of `w`, each summed
    /// as a one-by-one tile sums it: `$step` values per `$fma(acc, x, w, i)`, the next
    /// weight row prefetched, [`hsum1`] at the end.
    macro_rules! each_row {
        ($x:expr, $w:expr, $k:expr, $out:expr, $step:expr, $fma:expr) => {{
            let (x, w, k) = ($x, $w, $k);
            let x = &x[..k];
            for (o, y) in $out.iter_mut().enumerate() {
                let wr = &w[o * k..(o + 1) * k];
                let next = &w[((o + 1) * k).min(w.len())..];
                let mut a = _mm512_setzero_ps();
                for i in (0..k).step_by($step) {
                    prefetch(next, i);
                    a = $fma(a, x, wr, i);
                }
                *y = hsum1(a);
            }
        }};
    }

    /// [`each_row!`] on bf16 pairs (`vdpbf16ps`), as [`dpbf16_tile`] for one by one.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub fn each_row_dpbf16(x: &[bf16], w: &[bf16], k: usize, out: &mut [f32]) {
        each_row!(x, w, k, out, 32, |a, x, wr, i| _mm512_dpbf16_ps(
            a,
            load_bf16(x, i),
            load_bf16(wr, i)
        ))
    }

    /// [`each_row!`] in f32, as [`f32_tile`] for one by one.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub fn each_row_f32(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
        each_row!(x, w, k, out, 16, |a, x, wr, i| _mm512_fmadd_ps(
            load_f32(x, i),
            load_f32(wr, i),
            a
        ))
    }

    /// `x` rounded to bf16 (to nearest, ties to even, as `half::bf16::from_f32`), 16 at a
    /// time by `vcvtneps2bf16`, which flushes subnormal inputs to zero.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub fn round_bf16(x: &[f32], out: &mut [bf16]) {
        assert_eq!(x.len(), out.len());
        for (i, o) in out.chunks_mut(16).enumerate() {
            let v = load_f32(x, 16 * i);
            let b: __m256i = bh_bits(_mm512_cvtneps_pbh(v));
            let m: __mmask16 = if o.len() == 16 {
                u16::MAX
            } else {
                (1u16 << o.len()) - 1
            };
            // SAFETY: masked to the `o.len()` lanes inside `o`.
            #[allow(unsafe_code)]
            unsafe {
                _mm256_mask_storeu_epi16(o.as_mut_ptr().cast(), m, b)
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn bh_bits(v: __m256bh) -> __m256i {
        // SAFETY: the same 256 bits, read as the integers they hold.
        #[allow(unsafe_code)]
        unsafe {
            std::mem::transmute::<__m256bh, __m256i>(v)
        }
    }

    /// 16 f32 lanes of `s` from `at`, the lanes past `s`'s end zero.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn load_f32(s: &[f32], at: usize) -> __m512 {
        if at + 16 <= s.len() {
            // SAFETY: the 16 lanes are inside `s`.
            #[allow(unsafe_code)]
            unsafe {
                _mm512_loadu_ps(s.as_ptr().add(at))
            }
        } else {
            let m: __mmask16 = (1u16 << (s.len() - at)) - 1;
            // SAFETY: masked to the lanes inside `s`; masked-off lanes are not read.
            #[allow(unsafe_code)]
            unsafe {
                _mm512_maskz_loadu_ps(m, s.as_ptr().add(at))
            }
        }
    }

    /// 16 bf16 of `s` from `at` widened to f32, the lanes past `s`'s end zero.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn load_bf16_as_f32(s: &[bf16], at: usize) -> __m512 {
        let m: __mmask16 = if at + 16 <= s.len() {
            u16::MAX
        } else {
            (1u16 << (s.len() - at)) - 1
        };
        // SAFETY: masked to the lanes inside `s`; masked-off lanes are not read.
        #[allow(unsafe_code)]
        let h = unsafe { _mm256_maskz_loadu_epi16(m, s.as_ptr().add(at).cast::<i16>()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    /// 32 bf16 of `s` from `at`, the lanes past `s`'s end zero.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn load_bf16(s: &[bf16], at: usize) -> __m512bh {
        let v = if at + 32 <= s.len() {
            // SAFETY: the 32 lanes are inside `s`.
            #[allow(unsafe_code)]
            unsafe {
                _mm512_loadu_si512(s.as_ptr().add(at).cast::<__m512i>())
            }
        } else {
            let m: __mmask32 = (1u32 << (s.len() - at)) - 1;
            // SAFETY: masked to the lanes inside `s`; masked-off lanes are not read.
            #[allow(unsafe_code)]
            unsafe {
                _mm512_maskz_loadu_epi16(m, s.as_ptr().add(at).cast::<i16>())
            }
        };
        // SAFETY: the same 512 bits, read as the bf16 vector they hold.
        #[allow(unsafe_code)]
        unsafe {
            std::mem::transmute::<__m512i, __m512bh>(v)
        }
    }

    /// `acc[c][j]` = the sum of `a[c][j]`'s 16 lanes, all 16 of a tile as one tree of lane
    /// shuffles and adds (about 45 instructions, against about 8 per
    /// `_mm512_reduce_add_ps`). Every tile size goes through the same tree (absent
    /// accumulators as zeros), so an output's sum is the same whatever tile, and so
    /// whatever batch, it was computed in.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn sums<const MR: usize, const NR: usize>(a: &[[__m512; MR]; NR], acc: &mut [[f32; 4]; 4]) {
        if MR * NR == 1 {
            acc[0][0] = hsum1(a[0][0]);
            return;
        }
        let mut v = [_mm512_setzero_ps(); 16];
        for c in 0..NR {
            for j in 0..MR {
                v[c * 4 + j] = a[c][j];
            }
        }
        let mut lanes = [0f32; 16];
        // SAFETY: 16 f32 stored into a 16-element array.
        #[allow(unsafe_code)]
        unsafe {
            _mm512_storeu_ps(lanes.as_mut_ptr(), hsum16(&v))
        };
        for (i, l) in lanes.iter().enumerate() {
            acc[i / 4][i % 4] = *l;
        }
    }

    /// The sum of `v`'s lanes in exactly the order [`hsum16`] adds them (floating-point
    /// addition commutes, so only the grouping must match): within each 128-bit block
    /// `(l0 + l2) + (l1 + l3)`, then `(b0 + b1) + (b2 + b3)` over the blocks. Eight
    /// instructions for a one-by-one tile (a dense weight row at batch 1), where the whole
    /// tree would take about 45 for one useful sum.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn hsum1(v: __m512) -> f32 {
        let t = _mm512_add_ps(v, _mm512_permute_ps::<0b01_00_11_10>(v));
        let u = _mm512_add_ps(t, _mm512_permute_ps::<0b10_11_00_01>(t));
        let w = _mm512_add_ps(u, _mm512_shuffle_f32x4::<0b10_11_00_01>(u, u));
        let z = _mm512_add_ps(w, _mm512_shuffle_f32x4::<0b01_00_11_10>(w, w));
        _mm512_cvtss_f32(z)
    }

    /// Lane `i` of the result is the sum of `v[i]`'s lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn hsum16(v: &[__m512; 16]) -> __m512 {
        // Loops rather than `std::array::from_fn`: its closure would carry AVX-512 and so
        // could not be inlined into it, leaving a call per tile with every vector in memory.
        // Pairs: per 128-bit block, [a0+a2, b0+b2, a1+a3, b1+b3].
        let mut s1 = [_mm512_setzero_ps(); 8];
        for (p, s) in s1.iter_mut().enumerate() {
            let (a, b) = (v[2 * p], v[2 * p + 1]);
            *s = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        }
        // Quads: per block, the block sums of v[4q], v[4q + 1], v[4q + 2], v[4q + 3].
        let mut s2 = [_mm512_setzero_ps(); 4];
        for (q, s) in s2.iter_mut().enumerate() {
            let (c, d) = (_mm512_castps_pd(s1[2 * q]), _mm512_castps_pd(s1[2 * q + 1]));
            *s = _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(c, d)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)),
            );
        }
        // Across the four blocks: block q of the result holds quad q's totals.
        let fold = |x: __m512, y: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(x, y),
                _mm512_shuffle_f32x4::<0xDD>(x, y),
            )
        };
        fold(fold(s2[0], s2[1]), fold(s2[2], s2[3]))
    }

    /// Asks for the cache line holding `s[at]`, if `at` is inside `s`.
    #[inline(always)]
    fn prefetch<T>(s: &[T], at: usize) {
        if at < s.len() {
            // SAFETY: a prefetch of an address inside `s`; it reads nothing into the program.
            #[allow(unsafe_code)]
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(s.as_ptr().add(at).cast::<i8>())
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    fn f32_tile<const MR: usize, const NR: usize>(
        x: &[f32],
        w: &[f32],
        k: usize,
        acc: &mut [[f32; 4]; 4],
    ) {
        let (xr, wr) = (super::rows::<f32, MR>(x, k), super::rows::<f32, NR>(w, k));
        let next = &w[(NR * k).min(w.len())..];
        let mut a = [[_mm512_setzero_ps(); MR]; NR];
        for i in (0..k).step_by(16) {
            let mut xv = [_mm512_setzero_ps(); MR];
            for j in 0..MR {
                xv[j] = load_f32(xr[j], i);
            }
            for c in 0..NR {
                prefetch(next, c * k + i);
                let wv = load_f32(wr[c], i);
                for j in 0..MR {
                    a[c][j] = _mm512_fmadd_ps(xv[j], wv, a[c][j]);
                }
            }
        }
        sums(&a, acc);
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    fn widen_tile<const MR: usize, const NR: usize>(
        x: &[f32],
        w: &[bf16],
        k: usize,
        acc: &mut [[f32; 4]; 4],
    ) {
        let (xr, wr) = (super::rows::<f32, MR>(x, k), super::rows::<bf16, NR>(w, k));
        let next = &w[(NR * k).min(w.len())..];
        let mut a = [[_mm512_setzero_ps(); MR]; NR];
        for i in (0..k).step_by(16) {
            let mut xv = [_mm512_setzero_ps(); MR];
            for j in 0..MR {
                xv[j] = load_f32(xr[j], i);
            }
            for c in 0..NR {
                if i % 32 == 0 {
                    prefetch(next, c * k + i);
                }
                let wv = load_bf16_as_f32(wr[c], i);
                for j in 0..MR {
                    a[c][j] = _mm512_fmadd_ps(xv[j], wv, a[c][j]);
                }
            }
        }
        sums(&a, acc);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn dpbf16_tile<const MR: usize, const NR: usize>(
        x: &[bf16],
        w: &[bf16],
        k: usize,
        acc: &mut [[f32; 4]; 4],
    ) {
        let (xr, wr) = (super::rows::<bf16, MR>(x, k), super::rows::<bf16, NR>(w, k));
        let next = &w[(NR * k).min(w.len())..];
        let mut a = [[_mm512_setzero_ps(); MR]; NR];
        for i in (0..k).step_by(32) {
            let mut xv = [_mm512_cvtne2ps_pbh(_mm512_setzero_ps(), _mm512_setzero_ps()); MR];
            for j in 0..MR {
                xv[j] = load_bf16(xr[j], i);
            }
            for c in 0..NR {
                prefetch(next, c * k + i);
                let wv = load_bf16(wr[c], i);
                for j in 0..MR {
                    a[c][j] = _mm512_dpbf16_ps(a[c][j], xv[j], wv);
                }
            }
        }
        sums(&a, acc);
    }

    /// `out[o · rows + r] = x[r] · w_rows[o]` for every weight row `o` of `w_rows`.
    pub fn rows_dot(x: &[f32], rows: usize, k: usize, w_rows: &[f32], out: &mut [f32]) {
        debug_assert!(super::Isa::detect() >= super::Isa::Avx2);
        // SAFETY: `rows_dot_avx2` only needs AVX2 and FMA, which every caller checked with
        // `Isa::detect()` first; it takes slices, so there is no other contract.
        #[allow(unsafe_code)]
        unsafe {
            rows_dot_avx2(x, rows, k, w_rows, out)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn rows_dot_avx2(x: &[f32], rows: usize, k: usize, w_rows: &[f32], out: &mut [f32]) {
        for (w, o) in w_rows.chunks_exact(k).zip(out.chunks_exact_mut(rows)) {
            // Four input rows per pass: each loaded weight vector feeds four FMAs.
            let mut r = 0;
            while r + 4 <= rows {
                let d = dot4(
                    [
                        &x[r * k..(r + 1) * k],
                        &x[(r + 1) * k..(r + 2) * k],
                        &x[(r + 2) * k..(r + 3) * k],
                        &x[(r + 3) * k..(r + 4) * k],
                    ],
                    w,
                );
                o[r..r + 4].copy_from_slice(&d);
                r += 4;
            }
            for (rr, y) in o.iter_mut().enumerate().skip(r) {
                *y = dot1(&x[rr * k..(rr + 1) * k], w);
            }
        }
    }

    /// Four dot products against one weight row, 16 lanes per input row.
    #[inline(always)]
    fn dot4(x: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
        const L: usize = 16;
        let (mut s0, mut s1, mut s2, mut s3) = ([0f32; L], [0f32; L], [0f32; L], [0f32; L]);
        let chunks = w
            .chunks_exact(L)
            .zip(x[0].chunks_exact(L))
            .zip(x[1].chunks_exact(L))
            .zip(x[2].chunks_exact(L))
            .zip(x[3].chunks_exact(L));
        for ((((wc, a), b), c), d) in chunks {
            for j in 0..L {
                s0[j] = a[j].mul_add(wc[j], s0[j]);
                s1[j] = b[j].mul_add(wc[j], s1[j]);
                s2[j] = c[j].mul_add(wc[j], s2[j]);
                s3[j] = d[j].mul_add(wc[j], s3[j]);
            }
        }
        let n = w.len() / L * L;
        let tail = |xr: &[f32]| -> f32 { xr[n..].iter().zip(&w[n..]).map(|(p, q)| p * q).sum() };
        [
            s0.iter().sum::<f32>() + tail(x[0]),
            s1.iter().sum::<f32>() + tail(x[1]),
            s2.iter().sum::<f32>() + tail(x[2]),
            s3.iter().sum::<f32>() + tail(x[3]),
        ]
    }

    /// One row's dot product in exactly [`dot4`]'s order of operations (16 lane sums, then
    /// the tail), so a row's result does not depend on whether it was one of four.
    #[inline(always)]
    fn dot1(x: &[f32], w: &[f32]) -> f32 {
        const L: usize = 16;
        let mut s = [0f32; L];
        for (wc, a) in w.chunks_exact(L).zip(x.chunks_exact(L)) {
            for j in 0..L {
                s[j] = a[j].mul_add(wc[j], s[j]);
            }
        }
        let n = w.len() / L * L;
        s.iter().sum::<f32>() + x[n..].iter().zip(&w[n..]).map(|(p, q)| p * q).sum::<f32>()
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub mod x86 {
    //! Never called: [`super::Isa::detect`] is `None` off x86-64.
    use half::bf16;

    pub fn tile_f32(_: &[f32], _: &[f32], _: usize, _: usize, _: &mut [[f32; 4]; 4]) {
        unreachable!("no SIMD kernels on this architecture")
    }
    pub fn tile_bf16_widen(_: &[f32], _: &[bf16], _: usize, _: usize, _: &mut [[f32; 4]; 4]) {
        unreachable!("no SIMD kernels on this architecture")
    }
    pub fn tile_dpbf16(_: &[bf16], _: &[bf16], _: usize, _: usize, _: &mut [[f32; 4]; 4]) {
        unreachable!("no SIMD kernels on this architecture")
    }
    pub fn each_row_dpbf16(_: &[bf16], _: &[bf16], _: usize, _: &mut [f32]) {
        unreachable!("no SIMD kernels on this architecture")
    }
    pub fn each_row_f32(_: &[f32], _: &[f32], _: usize, _: &mut [f32]) {
        unreachable!("no SIMD kernels on this architecture")
    }
    pub fn round_bf16(_: &[f32], _: &mut [bf16]) {
        unreachable!("no SIMD kernels on this architecture")
    }
    pub fn rows_dot(_: &[f32], _: usize, _: usize, _: &[f32], _: &mut [f32]) {
        unreachable!("no SIMD kernels on this architecture")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1), for the kernels' tests.
    pub(super) fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Every path this CPU has, at shapes with partial tiles, partial bands, more than one
    /// block of input rows and a tail of `k` shorter than a vector, against f64 sums of the
    /// same operands (bf16 weights as rounded; the `vdpbf16ps` path also rounds the inputs).
    #[test]
    fn every_path_matches_a_plain_sum() {
        let mut seed = 7u64;
        for (rows, n, k) in [
            (1, 1, 1),
            (1, 67, 200),
            (3, 131, 31),
            (8, 64, 256),
            (70, 9, 100),
            (5, 260, 1040),
        ] {
            let x: Vec<f32> = (0..rows * k).map(|_| lcg(&mut seed)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
            for isa in Isa::all_available() {
                for (weights, bf) in [(Rows::F32(&w), false), (Rows::Bf16(&wb), true)] {
                    let got = product(&x, rows, k, weights, isa).expect("a kernel");
                    let dp = bf && isa == Isa::Avx512Bf16;
                    for o in 0..n {
                        for r in 0..rows {
                            let want: f64 = (0..k)
                                .map(|i| {
                                    let (mut a, mut b) = (x[r * k + i], w[o * k + i]);
                                    if bf {
                                        b = wb[o * k + i].to_f32();
                                    }
                                    if dp {
                                        a = bf16::from_f32(a).to_f32();
                                    }
                                    f64::from(a) * f64::from(b)
                                })
                                .sum();
                            let g = got[r * n + o];
                            assert!(
                                (f64::from(g) - want).abs() < 1e-4 * (k as f64).sqrt(),
                                "{isa:?} bf16={bf} {rows}x{n}x{k} at ({r}, {o}): {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The vector rounding is `half`'s, bit for bit (ties, infinities, NaN), except that
    /// the instruction flushes subnormal inputs (below 1.2e-38) to zero.
    #[test]
    fn bf16_rounding_matches_half() {
        if Isa::detect() < Isa::Avx512Bf16 {
            return;
        }
        let mut seed = 5u64;
        let mut x: Vec<f32> = (0..1000).map(|_| lcg(&mut seed) * 1e3).collect();
        x.extend([
            0.0,
            -0.0,
            1.0 + f32::EPSILON * 64.0,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::MIN_POSITIVE / 3.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
        ]);
        let mut got = vec![bf16::ZERO; x.len()];
        // SAFETY: the CPU has AVX512-BF16 (checked above).
        #[allow(unsafe_code)]
        unsafe {
            x86::round_bf16(&x, &mut got)
        };
        for (v, g) in x.iter().zip(&got) {
            let want = if v.is_subnormal() {
                bf16::from_f32(0.0f32.copysign(*v))
            } else {
                bf16::from_f32(*v)
            };
            assert_eq!(g.to_bits(), want.to_bits(), "{v:e}");
        }
        let mut nan = [bf16::ZERO];
        #[allow(unsafe_code)]
        unsafe {
            x86::round_bf16(&[f32::NAN], &mut nan)
        };
        assert!(nan[0].is_nan());
    }

    #[test]
    fn no_rows_or_no_weights_give_an_empty_product() {
        for isa in Isa::all_available() {
            assert_eq!(product(&[], 0, 4, Rows::F32(&[1.0; 8]), isa), Some(vec![]));
            assert_eq!(product(&[1.0; 4], 1, 4, Rows::F32(&[]), isa), Some(vec![]));
        }
        assert_eq!(
            product(&[1.0; 4], 1, 4, Rows::F32(&[1.0; 4]), Isa::None),
            None
        );
    }

    /// A row's products do not depend on the batch around it (tile position, block of
    /// rows, partial tiles): bit for bit, on every path.
    #[test]
    fn a_rows_products_do_not_depend_on_its_batch() {
        let mut seed = 11u64;
        let (rows, n, k) = (7, 9, 300);
        let x: Vec<f32> = (0..rows * k).map(|_| lcg(&mut seed)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
        let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
        for isa in Isa::all_available() {
            for weights in [Rows::F32(&w), Rows::Bf16(&wb)] {
                let all = product(&x, rows, k, weights, isa).expect("a kernel");
                for r in 0..rows {
                    let one = product(&x[r * k..(r + 1) * k], 1, k, weights, isa).expect("one");
                    assert_eq!(one, all[r * n..(r + 1) * n], "{isa:?} row {r}");
                }
            }
        }
    }
}
