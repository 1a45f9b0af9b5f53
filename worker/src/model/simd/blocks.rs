//! Products of ggml block-quantized weights with activations quantized to 8 bits, on
//! integer dot products (`vpdpbusd`, AVX512-VNNI), as llama.cpp multiplies them.
//!
//! **Activations.** Each input row is quantized once per call in groups of 32 values: one
//! f32 scale `d = max|x| / 127` and 32 × i8 (`round(x / d)`), with the group's sum kept
//! beside it. That is llama.cpp's `Q8_0` activation format (for every weight type, where
//! llama.cpp takes one scale per 256 values for the k-quants), so the products lose no more
//! to quantizing the activations than llama.cpp's.
//!
//! **Weights, as stored.** Every supported type reads, per group of 32 weights, 32 unsigned
//! quants `u` (0..=255), a scale per 16 or 32 of them and, for some types, a minimum:
//! `w = s · (u − offset) + m`. Then, per group,
//! `Σ w·x = s · d · (Σ u·q − offset · Σ q) + m · d · Σ q`: `vpdpbusd` multiplies the
//! unsigned quants by the signed activations (32 products in four-wide integer sums), the
//! offset term is the same instruction against the constant offset, and the rest is f32:
//! - 32-value types: per group, on 256-bit registers, one conversion and two f32
//!   multiplies.
//! - 256-value types (`Q4_K`, `Q6_K`): two groups per 512-bit register. A block's scales
//!   are decoded once per weight row as one vector (a lane per 16 weights) and multiplied
//!   by the input row's eight group scales once per block; per pair of groups, one
//!   conversion, one lane permutation of those products and one multiply-add. The
//!   minimums of `Q4_K`'s eight groups are one multiply-add per block.
//!
//! Signed `Q8_0` quants become unsigned by adding 128 (a flip of the top bit) with offset
//! 128.
//!
//! | type | bytes / values | quants | offset | scale | minimum |
//! |---|---|---|---|---|---|
//! | `Q8_0` | 34 / 32 | i8 + 128 | 128 | f16 | — |
//! | `Q4_0` | 18 / 32 | 4-bit | 8 | f16 | — |
//! | `Q4_1` | 20 / 32 | 4-bit | 0 | f16 | f16 |
//! | `Q5_0` | 22 / 32 | 4-bit + 1 high bit | 16 | f16 | — |
//! | `Q4_K` | 144 / 256 | 4-bit | 0 | f16 × 6-bit per 32 | − f16 × 6-bit per 32 |
//! | `Q6_K` | 210 / 256 | 4-bit + 2 high bits | 32 | f16 × i8 per 16 | — |
//!
//! A group's sums go through the same operations whatever the tile, so a row's products do
//! not depend on the batch it is in.

/// A block-quantized weight type the kernels multiply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q4K,
    Q6K,
}

impl Kind {
    /// Values per stored block.
    pub fn values(self) -> usize {
        match self {
            Self::Q4K | Self::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes per stored block.
    pub fn bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q4K => 144,
            Self::Q6K => 210,
        }
    }

    /// Bytes of one row of `k` values (`k` a multiple of [`Kind::values`]).
    pub fn row_bytes(self, k: usize) -> usize {
        k / self.values() * self.bytes()
    }
}

/// Whether this CPU runs the kernels (AVX-512 F/BW/VL and VNNI, and F16C), detected once.
pub fn available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            has!("avx512f")
                && has!("avx512bw")
                && has!("avx512vl")
                && has!("avx512vnni")
                && has!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Input rows quantized in groups of 32: `q` `[rows, k]`, and per group its scale `d` and
/// `ds` = `d · Σ q`, `[rows, k / 32]`.
#[derive(Debug, Clone, Default)]
pub struct Acts {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub ds: Vec<f32>,
}

impl Acts {
    /// `x` (`[rows, k]`, `k` a multiple of 32) quantized. Needs [`available`].
    pub fn quantize(x: &[f32]) -> Self {
        assert!(x.len().is_multiple_of(32), "input not in groups of 32");
        assert!(available(), "quantized kernels need AVX512-VNNI");
        let groups = x.len() / 32;
        let mut a = Self {
            q: vec![0; x.len()],
            d: vec![0.0; groups],
            ds: vec![0.0; groups],
        };
        // SAFETY: `available()` checked the CPU's features.
        #[allow(unsafe_code)]
        unsafe {
            x86::quantize(x, &mut a)
        };
        a
    }

    /// Rows `r..r + n` of `k` values.
    pub fn rows(&self, r: usize, n: usize, k: usize) -> ActRows<'_> {
        let g = k / 32;
        ActRows {
            q: &self.q[r * k..(r + n) * k],
            d: &self.d[r * g..(r + n) * g],
            ds: &self.ds[r * g..(r + n) * g],
        }
    }
}

/// Some rows of an [`Acts`].
#[derive(Debug, Clone, Copy)]
pub struct ActRows<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub ds: &'a [f32],
}

/// One tile: `acc[c][j]` = input row `j` of `x` (1 to 4 rows) · weight row `c` of `w`
/// (`nr` rows of `kind`, 1 to 4), `k` values each.
pub fn tile(kind: Kind, x: ActRows<'_>, w: &[u8], nr: usize, k: usize, acc: &mut [[f32; 4]; 4]) {
    debug_assert!(available());
    // SAFETY: `Acts::quantize` (the only way to get `x`) asserted `available()`; the kernel
    // reads the slices it is given, with bounds checks.
    #[allow(unsafe_code)]
    unsafe {
        x86::tile(kind, x, w, nr, k, acc)
    }
}

/// Per group of 32 weights (two, for the 256-value types) and input row: one `vpdpbusd`
/// (and one for the offset, shared by the tile's weight rows), then the f32 work the
/// module's documentation lists; a stored block's scales are decoded once per weight row.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{ActRows, Acts, Kind};

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub fn quantize(x: &[f32], a: &mut Acts) {
        for (g, (xs, q)) in x.chunks_exact(32).zip(a.q.chunks_exact_mut(32)).enumerate() {
            // SAFETY: two 16-lane loads inside a 32-value chunk.
            #[allow(unsafe_code)]
            let (lo, hi) = unsafe {
                (
                    _mm512_loadu_ps(xs.as_ptr()),
                    _mm512_loadu_ps(xs.as_ptr().add(16)),
                )
            };
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            let d = amax / 127.0;
            let id = _mm512_set1_ps(if d == 0.0 { 0.0 } else { 1.0 / d });
            // Round to nearest (even): the default rounding mode.
            let (ql, qh) = (
                _mm512_cvtps_epi32(_mm512_mul_ps(lo, id)),
                _mm512_cvtps_epi32(_mm512_mul_ps(hi, id)),
            );
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(ql, qh));
            // SAFETY: two 16-byte stores inside a 32-byte chunk.
            #[allow(unsafe_code)]
            unsafe {
                _mm_storeu_si128(q.as_mut_ptr().cast(), _mm512_cvtsepi32_epi8(ql));
                _mm_storeu_si128(q.as_mut_ptr().add(16).cast(), _mm512_cvtsepi32_epi8(qh));
            }
            a.d[g] = d;
            a.ds[g] = d * sum as f32;
        }
    }

    /// How a 32-value type's stored blocks read: the unsigned quants, the scale and the
    /// minimum.
    trait Block {
        const KIND: Kind;
        /// Subtracted from every quant.
        const OFFSET: u8;
        /// Whether blocks have a minimum.
        const MINS: bool;
        /// The block's scale and minimum (0 unless `MINS`).
        ///
        /// # Safety
        /// The CPU has AVX-512 F/BW/VL, VNNI and F16C.
        #[allow(unsafe_code)]
        unsafe fn scales(b: &[u8]) -> (f32, f32);
        /// The block's 32 quants.
        ///
        /// # Safety
        /// As for `scales`.
        #[allow(unsafe_code)]
        unsafe fn quants(b: &[u8]) -> __m256i;
    }

    /// How a 256-value type's stored blocks read, two groups of 32 (64 weights, one 512-bit
    /// register) at a time.
    trait Super {
        const KIND: Kind;
        /// Subtracted from every quant.
        const OFFSET: u8;
        /// Whether groups have a minimum.
        const MINS: bool;
        /// The block's scales, one per 16 weights (lane `2g + h`: half `h` of group `g`),
        /// and its eight groups' minimums (zeros unless `MINS`).
        ///
        /// # Safety
        /// The CPU has AVX-512 F/BW/VL, VNNI and F16C.
        #[allow(unsafe_code)]
        unsafe fn scales(b: &[u8]) -> (__m512, __m256);
        /// Groups `2i` and `2i + 1`'s 64 quants.
        ///
        /// # Safety
        /// As for `scales`.
        #[allow(unsafe_code)]
        unsafe fn pair(b: &[u8], i: usize) -> __m512i;
    }

    /// The f16 at `b[at..at + 2]` (F16C, inline: `half`'s conversion checks the CPU's
    /// features on every call).
    #[inline]
    #[target_feature(enable = "f16c")]
    fn f16(b: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([b[at], b[at + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    /// 32 one-byte values (quants or activations) of `b` from `at`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    fn load32<T: Copy>(b: &[T], at: usize) -> __m256i {
        const { assert!(std::mem::size_of::<T>() == 1, "32 one-byte values") };
        let s = &b[at..at + 32];
        // SAFETY: 32 bytes inside `b` (the slice above is bounds-checked).
        #[allow(unsafe_code)]
        unsafe {
            _mm256_loadu_si256(s.as_ptr().cast())
        }
    }

    /// 64 one-byte values of `b` from `at`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    fn load64<T: Copy>(b: &[T], at: usize) -> __m512i {
        const { assert!(std::mem::size_of::<T>() == 1, "64 one-byte values") };
        let s = &b[at..at + 64];
        // SAFETY: 64 bytes inside `b`.
        #[allow(unsafe_code)]
        unsafe {
            _mm512_loadu_si512(s.as_ptr().cast())
        }
    }

    /// 8 values of `v` from `at`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    fn load8(v: &[f32], at: usize) -> __m256 {
        let v = &v[at..at + 8];
        // SAFETY: 8 f32 inside `v` (the slice above is bounds-checked).
        #[allow(unsafe_code)]
        unsafe {
            _mm256_loadu_ps(v.as_ptr())
        }
    }

    /// The 32 bytes of `b` from `at` in both halves of a 512-bit register.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    fn twice32(b: &[u8], at: usize) -> __m512i {
        _mm512_broadcast_i64x4(load32(b, at))
    }

    /// 16-bit shift counts: `lo` in the low 256 bits, `hi` in the high.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    fn counts(lo: i16, hi: i16) -> __m512i {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_set1_epi16(lo)),
            _mm256_set1_epi16(hi),
        )
    }

    /// 16 bytes of packed nibbles: the low nibbles as quants 0..16, the high as 16..32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    fn nibbles16(b: &[u8], at: usize) -> __m256i {
        let s = &b[at..at + 16];
        // SAFETY: 16 bytes inside `b`.
        #[allow(unsafe_code)]
        let v = unsafe { _mm_loadu_si128(s.as_ptr().cast()) };
        let low = _mm_set1_epi8(0x0f);
        _mm256_set_m128i(
            _mm_and_si128(_mm_srli_epi16::<4>(v), low),
            _mm_and_si128(v, low),
        )
    }

    /// Declares a 32-value block type with one f16 scale at byte 0 (and a minimum at byte
    /// 2 for `mins`), whose quants `$quants(b)` reads.
    macro_rules! block32 {
        ($name:ident, $kind:ident, $offset:expr, $mins:expr, |$b:ident| $quants:expr) => {
            struct $name;
            impl Block for $name {
                const KIND: Kind = Kind::$kind;
                const OFFSET: u8 = $offset;
                const MINS: bool = $mins;
                #[inline]
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
                #[allow(unsafe_code)]
                unsafe fn scales(b: &[u8]) -> (f32, f32) {
                    (f16(b, 0), if $mins { f16(b, 2) } else { 0.0 })
                }
                #[inline]
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
                #[allow(unsafe_code)]
                unsafe fn quants($b: &[u8]) -> __m256i {
                    $quants
                }
            }
        };
    }

    // i8 + 128 as u8: the top bit flipped.
    block32!(Q8_0, Q8_0, 128, false, |b| _mm256_xor_si256(
        load32(b, 2),
        _mm256_set1_epi8(i8::MIN)
    ));
    block32!(Q4_0, Q4_0, 8, false, |b| nibbles16(b, 2));
    block32!(Q4_1, Q4_1, 0, true, |b| nibbles16(b, 4));
    // Bit j of the 32-bit `qh` at byte 2 is quant j's fifth bit.
    block32!(Q5_0, Q5_0, 16, false, |b| _mm256_or_si256(
        nibbles16(b, 6),
        _mm256_and_si256(
            _mm256_movm_epi8(u32::from_le_bytes([b[2], b[3], b[4], b[5]])),
            _mm256_set1_epi8(0x10)
        )
    ));

    struct Q4K;
    impl Super for Q4K {
        const KIND: Kind = Kind::Q4K;
        const OFFSET: u8 = 0;
        const MINS: bool = true;
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
        #[allow(unsafe_code)]
        unsafe fn scales(b: &[u8]) -> (__m512, __m256) {
            let (d, dmin) = (f16(b, 0), f16(b, 2));
            // ggml's 6-bit scales and minimums of the 8 groups, 12 bytes from byte 4:
            // groups 0..4 in the low 6 bits of bytes 0..4 (scales) and 4..8 (minimums);
            // groups 4..8 in the nibbles of bytes 8..12 with their top 2 bits in the top
            // bits of bytes 0..8.
            let word = |i: usize| u32::from_le_bytes([b[4 + i], b[5 + i], b[6 + i], b[7 + i]]);
            let (w0, w1, w2) = (word(0), word(4), word(8));
            let (six, four, two) = (0x3f3f_3f3fu32, 0x0f0f_0f0fu32, 0x0303_0303u32);
            let bytes =
                |lo: u32, hi: u32| _mm_cvtsi64_si128((u64::from(hi) << 32 | u64::from(lo)) as i64);
            let scales = bytes(w0 & six, (w2 & four) | (((w0 >> 6) & two) << 4));
            let mins = bytes(w1 & six, ((w2 >> 4) & four) | (((w1 >> 6) & two) << 4));
            // Each group's scale for both of its halves.
            let s = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(scales, scales)));
            let m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mins));
            (
                _mm512_mul_ps(s, _mm512_set1_ps(d)),
                _mm256_mul_ps(m, _mm256_set1_ps(-dmin)),
            )
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
        #[allow(unsafe_code)]
        unsafe fn pair(b: &[u8], i: usize) -> __m512i {
            // Groups 2i and 2i + 1 are the low and high nibbles of bytes 32i..32i + 32.
            let v = _mm512_srlv_epi16(twice32(b, 16 + 32 * i), counts(0, 4));
            _mm512_and_si512(v, _mm512_set1_epi8(0x0f))
        }
    }

    struct Q6K;
    impl Super for Q6K {
        const KIND: Kind = Kind::Q6K;
        const OFFSET: u8 = 32;
        const MINS: bool = false;
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
        #[allow(unsafe_code)]
        unsafe fn scales(b: &[u8]) -> (__m512, __m256) {
            // One i8 scale per 16 weights from byte 192, in order, times the f16 at 208.
            let s = &b[192..208];
            // SAFETY: 16 bytes inside `b`.
            let v = unsafe { _mm_loadu_si128(s.as_ptr().cast()) };
            let s = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
            (
                _mm512_mul_ps(s, _mm512_set1_ps(f16(b, 208))),
                _mm256_setzero_ps(),
            )
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
        #[allow(unsafe_code)]
        unsafe fn pair(b: &[u8], i: usize) -> __m512i {
            // In each half `h` of 128 weights (pairs 2h and 2h + 1): groups 0 and 1 are the
            // low nibbles of `ql` bytes 64h..64h + 64, groups 2 and 3 their high nibbles;
            // the two high bits of group p are bits 2p, 2p + 1 of `qh` bytes
            // 128 + 32h..128 + 32h + 32.
            let (h, upper) = (i / 2, i % 2 == 1);
            let low = load64(b, 64 * h);
            let qh = twice32(b, 128 + 32 * h);
            let (low, high) = if upper {
                (
                    _mm512_srli_epi16::<4>(low),
                    _mm512_srlv_epi16(qh, counts(0, 2)),
                )
            } else {
                (low, _mm512_sllv_epi16(qh, counts(4, 2)))
            };
            _mm512_or_si512(
                _mm512_and_si512(low, _mm512_set1_epi8(0x0f)),
                _mm512_and_si512(high, _mm512_set1_epi8(0x30)),
            )
        }
    }

    macro_rules! sized {
        ($kernel:ident, $b:ty, $mr:expr, $nr:expr, ($($arg:expr),*)) => {
            match ($mr, $nr) {
                (1, 1) => $kernel::<$b, 1, 1>($($arg),*),
                (1, 2) => $kernel::<$b, 1, 2>($($arg),*),
                (1, 3) => $kernel::<$b, 1, 3>($($arg),*),
                (1, 4) => $kernel::<$b, 1, 4>($($arg),*),
                (2, 1) => $kernel::<$b, 2, 1>($($arg),*),
                (2, 2) => $kernel::<$b, 2, 2>($($arg),*),
                (2, 3) => $kernel::<$b, 2, 3>($($arg),*),
                (2, 4) => $kernel::<$b, 2, 4>($($arg),*),
                (3, 1) => $kernel::<$b, 3, 1>($($arg),*),
                (3, 2) => $kernel::<$b, 3, 2>($($arg),*),
                (3, 3) => $kernel::<$b, 3, 3>($($arg),*),
                (3, 4) => $kernel::<$b, 3, 4>($($arg),*),
                (4, 1) => $kernel::<$b, 4, 1>($($arg),*),
                (4, 2) => $kernel::<$b, 4, 2>($($arg),*),
                (4, 3) => $kernel::<$b, 4, 3>($($arg),*),
                (4, 4) => $kernel::<$b, 4, 4>($($arg),*),
                (mr, nr) => panic!("tile {mr}x{nr}: rows and weight rows must be 1 to 4"),
            }
        };
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub fn tile(
        kind: Kind,
        x: ActRows<'_>,
        w: &[u8],
        nr: usize,
        k: usize,
        acc: &mut [[f32; 4]; 4],
    ) {
        let mr = x.q.len() / k;
        match kind {
            Kind::Q8_0 => sized!(kernel32, Q8_0, mr, nr, (x, w, k, acc)),
            Kind::Q4_0 => sized!(kernel32, Q4_0, mr, nr, (x, w, k, acc)),
            Kind::Q4_1 => sized!(kernel32, Q4_1, mr, nr, (x, w, k, acc)),
            Kind::Q5_0 => sized!(kernel32, Q5_0, mr, nr, (x, w, k, acc)),
            Kind::Q4K => sized!(kernel256, Q4K, mr, nr, (x, w, k, acc)),
            Kind::Q6K => sized!(kernel256, Q6K, mr, nr, (x, w, k, acc)),
        }
    }

    /// Asks for the cache line holding `s[at]`, if `at` is inside `s`.
    #[inline(always)]
    fn prefetch(s: &[u8], at: usize) {
        if at < s.len() {
            // SAFETY: a prefetch of an address inside `s`; it reads nothing into the program.
            #[allow(unsafe_code)]
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(s.as_ptr().add(at).cast::<i8>())
            }
        }
    }

    /// A tile of a 32-value type: per group and input row, `vpdpbusd`, a conversion and
    /// two f32 multiplies on 256-bit registers.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    fn kernel32<B: Block, const MR: usize, const NR: usize>(
        x: ActRows<'_>,
        w: &[u8],
        k: usize,
        acc: &mut [[f32; 4]; 4],
    ) {
        let bytes = B::KIND.bytes();
        let row_bytes = B::KIND.row_bytes(k);
        let wr = crate::model::simd::rows::<u8, NR>(w, row_bytes);
        let next = &w[(NR * row_bytes).min(w.len())..];
        let gk = k / 32;
        let offset = _mm256_set1_epi8(B::OFFSET as i8);
        let mut a = [[_mm256_setzero_ps(); MR]; NR];
        let mut mins = [[0f32; MR]; NR];
        for g in 0..gk {
            let at = g * bytes;
            let mut xq = [_mm256_setzero_si256(); MR];
            let mut xo = [_mm256_setzero_si256(); MR];
            let mut xd = [_mm256_setzero_ps(); MR];
            for j in 0..MR {
                xq[j] = load32(x.q, (j * gk + g) * 32);
                xd[j] = _mm256_set1_ps(x.d[j * gk + g]);
                if B::OFFSET != 0 {
                    xo[j] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), offset, xq[j]);
                }
            }
            for c in 0..NR {
                prefetch(next, c * row_bytes + at);
                let b = &wr[c][at..at + bytes];
                // SAFETY: this function's features are those `scales` and `quants` need.
                #[allow(unsafe_code)]
                let ((s, m), u) = unsafe { (B::scales(b), B::quants(b)) };
                let sc = _mm256_set1_ps(s);
                for j in 0..MR {
                    let mut dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, xq[j]);
                    if B::OFFSET != 0 {
                        dot = _mm256_sub_epi32(dot, xo[j]);
                    }
                    let v = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), xd[j]);
                    a[c][j] = _mm256_fmadd_ps(v, sc, a[c][j]);
                    if B::MINS {
                        mins[c][j] = m.mul_add(x.ds[j * gk + g], mins[c][j]);
                    }
                }
            }
        }
        for c in 0..NR {
            for j in 0..MR {
                acc[c][j] = hsum8(a[c][j]) + mins[c][j];
            }
        }
    }

    /// A tile of a 256-value type, two groups per 512-bit register: per pair of groups and
    /// input row, `vpdpbusd`, a conversion, the pair's scales and one multiply-add.
    ///
    /// The pair's scales are the block's weight scales times the row's activation scales,
    /// lane by lane, permuted to the pair's lanes. Small tiles multiply once per block and
    /// permute per pair; tiles of more than 8 products would hold too many registers that
    /// way, so they permute the two factors per pair and multiply then. Lane-wise products
    /// commute with the permutation: both give the same bits, so a row's products still do
    /// not depend on its batch.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    fn kernel256<B: Super, const MR: usize, const NR: usize>(
        x: ActRows<'_>,
        w: &[u8],
        k: usize,
        acc: &mut [[f32; 4]; 4],
    ) {
        let small = MR * NR <= 8;
        let bytes = B::KIND.bytes();
        let row_bytes = B::KIND.row_bytes(k);
        let wr = crate::model::simd::rows::<u8, NR>(w, row_bytes);
        let next = &w[(NR * row_bytes).min(w.len())..];
        let gk = k / 32;
        let offset = _mm512_set1_epi8(B::OFFSET as i8);
        // Lane 2g + h (a scale per half group) from activation scale g.
        let halves = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
        let mut a = [[_mm512_setzero_ps(); MR]; NR];
        for blk in 0..k / 256 {
            let at = blk * bytes;
            // The row's eight group scales, spread to the weight scales' lanes, and (for
            // the minimums) its eight `d · Σ q`.
            let mut xd = [_mm512_setzero_ps(); MR];
            let mut xs = [_mm256_setzero_ps(); MR];
            for j in 0..MR {
                let at = j * gk + blk * 8;
                xd[j] = _mm512_permutexvar_ps(halves, _mm512_castps256_ps512(load8(x.d, at)));
                if B::MINS {
                    xs[j] = load8(x.ds, at);
                }
            }
            let mut ws = [_mm512_setzero_ps(); NR];
            let mut sc = [[_mm512_setzero_ps(); MR]; NR];
            for c in 0..NR {
                // Every cache line of the next tile's block (a block spans up to four).
                for line in (0..bytes).step_by(64) {
                    prefetch(next, c * row_bytes + at + line);
                }
                // SAFETY: this function's features are those `scales` needs.
                #[allow(unsafe_code)]
                let (s, m) = unsafe { B::scales(&wr[c][at..at + bytes]) };
                ws[c] = s;
                for j in 0..MR {
                    if small {
                        sc[c][j] = _mm512_mul_ps(s, xd[j]);
                    }
                    if B::MINS {
                        // The eight groups' minimums times `d · Σ q`, into the low lanes.
                        a[c][j] = _mm512_fmadd_ps(
                            _mm512_zextps256_ps512(m),
                            _mm512_zextps256_ps512(xs[j]),
                            a[c][j],
                        );
                    }
                }
            }
            for i in 0..4 {
                // Lane l of a pair's sums is half (l / 4) % 2 of group 2i + l / 8: scale
                // lane 4i + l / 4.
                let q = 4 * i as i32;
                let pick = _mm512_set_epi32(
                    q + 3,
                    q + 3,
                    q + 3,
                    q + 3,
                    q + 2,
                    q + 2,
                    q + 2,
                    q + 2,
                    q + 1,
                    q + 1,
                    q + 1,
                    q + 1,
                    q,
                    q,
                    q,
                    q,
                );
                let mut xq = [_mm512_setzero_si512(); MR];
                let mut xo = [_mm512_setzero_si512(); MR];
                let mut xp = [_mm512_setzero_ps(); MR];
                for j in 0..MR {
                    xq[j] = load64(x.q, (j * gk + blk * 8 + 2 * i) * 32);
                    if B::OFFSET != 0 {
                        xo[j] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, xq[j]);
                    }
                    if !small {
                        xp[j] = _mm512_permutexvar_ps(pick, xd[j]);
                    }
                }
                for c in 0..NR {
                    // SAFETY: this function's features are those `pair` needs.
                    #[allow(unsafe_code)]
                    let u = unsafe { B::pair(&wr[c][at..at + bytes], i) };
                    let wp = if small {
                        _mm512_setzero_ps()
                    } else {
                        _mm512_permutexvar_ps(pick, ws[c])
                    };
                    for j in 0..MR {
                        let mut dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, xq[j]);
                        if B::OFFSET != 0 {
                            dot = _mm512_sub_epi32(dot, xo[j]);
                        }
                        let s = if small {
                            _mm512_permutexvar_ps(pick, sc[c][j])
                        } else {
                            _mm512_mul_ps(wp, xp[j])
                        };
                        a[c][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, a[c][j]);
                    }
                }
            }
        }
        for c in 0..NR {
            for j in 0..MR {
                acc[c][j] = _mm512_reduce_add_ps(a[c][j]);
            }
        }
    }

    /// The sum of 8 lanes, always in the same order.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl")]
    fn hsum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    //! Never called: [`super::available`] is false off x86-64.
    use super::{ActRows, Acts, Kind};

    pub fn quantize(_: &[f32], _: &mut Acts) {
        unreachable!("no quantized kernels on this architecture")
    }
    pub fn tile(_: Kind, _: ActRows<'_>, _: &[u8], _: usize, _: usize, _: &mut [[f32; 4]; 4]) {
        unreachable!("no quantized kernels on this architecture")
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::super::{Isa, Rows, product};
    use super::*;

    const KINDS: [(Kind, GgmlDType); 6] = [
        (Kind::Q8_0, GgmlDType::Q8_0),
        (Kind::Q4_0, GgmlDType::Q4_0),
        (Kind::Q4_1, GgmlDType::Q4_1),
        (Kind::Q5_0, GgmlDType::Q5_0),
        (Kind::Q4K, GgmlDType::Q4K),
        (Kind::Q6K, GgmlDType::Q6K),
    ];

    /// Random `[n, k]` weights quantized by candle (ggml's reference quantizers): the bytes
    /// and the weights they stand for.
    fn weights(n: usize, k: usize, t: GgmlDType, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let dev = Device::Cpu;
        let mut state = seed;
        let v: Vec<f32> = (0..n * k)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        let w = Tensor::from_vec(v, (n, k), &dev).expect("weights");
        let q = QTensor::quantize(&w, t).expect("quantize");
        let bytes = q.data().expect("data").into_owned();
        let dense = q.dequantize(&dev).expect("dequantize");
        (
            bytes,
            dense.flatten_all().expect("flat").to_vec1().expect("vec"),
        )
    }

    /// Every type, against f64 sums of the weights as stored (dequantized by candle) and the
    /// activations as quantized: the same products up to f32 rounding, at shapes with
    /// partial tiles, partial bands and several blocks of input rows.
    #[test]
    fn every_type_matches_a_plain_sum_of_what_it_stores() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-VNNI");
            return;
        }
        let mut seed = 3u64;
        for (kind, t) in KINDS {
            // 640 and 96: a last pass over fewer than eight groups.
            for (rows, n, k) in [
                (1, 1, 256usize),
                (3, 67, 512),
                (9, 130, 256),
                (70, 5, 768),
                (2, 3, 640),
                (5, 4, 96),
            ] {
                if !k.is_multiple_of(kind.values()) {
                    continue;
                }
                seed += 1;
                let (bytes, w) = weights(n, k, t, seed);
                assert_eq!(bytes.len(), n * kind.row_bytes(k), "{kind:?} bytes");
                let x: Vec<f32> = (0..rows * k)
                    .map(|i| ((i * 7919 + seed as usize) % 1000) as f32 / 500.0 - 1.0)
                    .collect();
                let acts = Acts::quantize(&x);
                let got = product(&x, rows, k, Rows::Blocks(kind, &bytes), Isa::detect())
                    .expect("a kernel");
                for r in 0..rows {
                    for o in 0..n {
                        let want: f64 = (0..k)
                            .map(|i| {
                                let xq = f64::from(acts.q[r * k + i])
                                    * f64::from(acts.d[(r * k + i) / 32]);
                                xq * f64::from(w[o * k + i])
                            })
                            .sum();
                        let g = f64::from(got[r * n + o]);
                        assert!(
                            (g - want).abs() < 1e-4 * (k as f64).sqrt() * want.abs().max(1.0),
                            "{kind:?} {rows}x{n}x{k} at ({r}, {o}): {g} vs {want} (diff {})",
                            g - want
                        );
                    }
                }
                // And within what rounding the activations can cost of the f32 product:
                // each is off by at most half its group's step.
                for (ro, g) in got.iter().enumerate() {
                    let (r, o) = (ro / n, ro % n);
                    let (mut exact, mut bound) = (0f64, 1e-4);
                    for i in 0..k {
                        let wi = f64::from(w[o * k + i]);
                        exact += f64::from(x[r * k + i]) * wi;
                        bound += wi.abs() * f64::from(acts.d[(r * k + i) / 32]) / 2.0;
                    }
                    assert!(
                        (f64::from(*g) - exact).abs() <= bound,
                        "{kind:?}: {g} vs {exact}, more than {bound} apart"
                    );
                }
            }
        }
    }

    /// A row's products do not depend on the batch around it, bit for bit.
    #[test]
    fn a_rows_products_do_not_depend_on_its_batch() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-VNNI");
            return;
        }
        let (rows, n, k) = (7, 9, 512);
        for (kind, t) in KINDS {
            let (bytes, _) = weights(n, k, t, 5);
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 31) % 97) as f32 / 48.0 - 1.0)
                .collect();
            let w = Rows::Blocks(kind, &bytes);
            let all = product(&x, rows, k, w, Isa::detect()).expect("a kernel");
            for r in 0..rows {
                let one = product(&x[r * k..(r + 1) * k], 1, k, w, Isa::detect()).expect("one");
                assert_eq!(one, all[r * n..(r + 1) * n], "{kind:?} row {r}");
            }
        }
    }

    #[test]
    fn an_all_zero_group_quantizes_to_zeros() {
        if !available() {
            return;
        }
        let mut x = vec![0f32; 64];
        x[40] = -2.54;
        let a = Acts::quantize(&x);
        assert_eq!(a.d[0], 0.0);
        assert!(a.q[..32].iter().all(|q| *q == 0));
        assert_eq!(a.q[40], -127);
        assert!((a.d[1] - 0.02).abs() < 1e-6);
        assert!((a.ds[1] + 2.54).abs() < 1e-5);
    }
}
