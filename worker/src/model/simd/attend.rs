//! Decode attention on AVX-512: the query heads that share one KV head (a GQA group)
//! against that head's cached rows, `softmax(q · Kᵀ · scale) · V` for each.
//!
//! Every cached key and value row is read once for the whole group, not once per query
//! head. Scores are computed four query heads by four positions at a time (sixteen
//! accumulators, one lane-sum tree for all sixteen, [`super::x86::hsum16`]); the softmax
//! is 16 lanes wide with a polynomial `exp`; the weighted sum of values keeps four query
//! heads by up to 64 of their outputs in registers over one pass through the positions.
//!
//! Against the per-head loop it replaces (8-wide dot products, a lane sum per score, libm's
//! `expf` per position), attention's share of a bench-model decode step fell from 11 % to
//! about 5 % (bf16, batch 1) and from 7.9 % to 4.1 % (f32, batch 32; `docs/benchmarks.md`).
//! Head widths that are not a multiple of 16 keep that loop.

use super::Isa;

/// One KV head's cached rows, as the paged cache holds them: slot `s`'s row starts at
/// `s · stride + offset` in `k` and in `v`.
#[derive(Debug, Clone, Copy)]
pub struct Cached<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// The sequence's slots, in position order.
    pub slots: &'a [u32],
    /// Floats per slot (all KV heads).
    pub stride: usize,
    /// This KV head's first float in a slot.
    pub offset: usize,
}

impl Cached<'_> {
    /// Position `t`'s key and value rows, `hd` wide.
    #[inline(always)]
    pub fn rows(&self, t: usize, hd: usize) -> (&[f32], &[f32]) {
        let at = self.slots[t] as usize * self.stride + self.offset;
        (&self.k[at..at + hd], &self.v[at..at + hd])
    }
}

/// Whether [`attend`] runs on this CPU for heads `hd` wide.
pub fn available(hd: usize) -> bool {
    Isa::detect() >= Isa::Avx512 && hd > 0 && hd.is_multiple_of(16)
}

/// `out[g] ← softmax(q[g] · Kᵀ · scale) · V` for every query head `g` of `q` (`[heads,
/// hd]`, all reading `kv`); `out` as `q`. `scores` is scratch, reused between calls. With
/// no cached position, `out` is zero. Panics unless [`available`]`(hd)`.
pub fn attend(
    q: &[f32],
    hd: usize,
    kv: Cached<'_>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    assert!(available(hd), "no AVX-512 attention for heads {hd} wide");
    assert!(
        q.len().is_multiple_of(hd) && out.len() == q.len(),
        "queries and outputs must be [heads, {hd}]"
    );
    // SAFETY: the CPU has AVX-512 F (`available`); the kernel takes slices.
    #[allow(unsafe_code)]
    unsafe {
        x86::attend(q, hd, kv, scale, scores, out)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Cached;
    use crate::model::simd::x86::hsum16;

    /// 16 lanes of `s` from `at` (`at + 16 <= s.len()`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load(s: &[f32], at: usize) -> __m512 {
        assert!(at + 16 <= s.len());
        // SAFETY: the 16 lanes are inside `s` (asserted).
        #[allow(unsafe_code)]
        unsafe {
            _mm512_loadu_ps(s.as_ptr().add(at))
        }
    }

    /// The lanes of `s` from `at` that are inside it (up to 16), and their mask.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load_part(s: &[f32], at: usize, fill: f32) -> (__m512, __mmask16) {
        let n = (s.len() - at).min(16);
        let m: __mmask16 = if n == 16 { u16::MAX } else { (1u16 << n) - 1 };
        // SAFETY: masked to the `n` lanes inside `s`; masked-off lanes are not read.
        #[allow(unsafe_code)]
        let v = unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(fill), m, s.as_ptr().add(at)) };
        (v, m)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn store_part(s: &mut [f32], at: usize, m: __mmask16, v: __m512) {
        debug_assert!(at + (m.count_ones() as usize) <= s.len());
        // SAFETY: `m` has the lanes `load_part` found inside `s` from `at`.
        #[allow(unsafe_code)]
        unsafe {
            _mm512_mask_storeu_ps(s.as_mut_ptr().add(at), m, v)
        }
    }

    /// Positions ahead of the one read that [`fetch`] asks for.
    const AHEAD: usize = 32;

    /// Asks for every cache line of `row`, into the cache level `HINT` names.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fetch<const HINT: i32>(row: &[f32]) {
        for at in (0..row.len()).step_by(16) {
            // SAFETY: a prefetch of an address inside `row`; it reads nothing into the
            // program.
            #[allow(unsafe_code)]
            unsafe {
                _mm_prefetch::<HINT>(row.as_ptr().add(at).cast::<i8>())
            }
        }
    }

    /// `e^x` on 16 lanes, within 3 ulp of the exact value for normal results (inputs
    /// below -104 give 0, NaN stays NaN): `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, a
    /// degree-6 polynomial for `e^r`, scaled by `2^n`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn exp(x: __m512) -> __m512 {
        // `max` returns its second operand when either is NaN: keep `x` second.
        let x = _mm512_min_ps(
            _mm512_set1_ps(88.7),
            _mm512_max_ps(_mm512_set1_ps(-104.0), x),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln 2 in two parts, the first exact in f32 with room for `n`'s bits.
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// `row ← softmax(row)`, 16 lanes at a time.
    #[target_feature(enable = "avx512f")]
    fn softmax(row: &mut [f32]) {
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for at in (0..row.len()).step_by(16) {
            m = _mm512_max_ps(m, load_part(row, at, f32::NEG_INFINITY).0);
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
        let mut sum = _mm512_setzero_ps();
        for at in (0..row.len()).step_by(16) {
            let (x, mask) = load_part(row, at, 0.0);
            let e = exp(_mm512_sub_ps(x, max));
            sum = _mm512_mask_add_ps(sum, mask, sum, e);
            store_part(row, at, mask, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        for at in (0..row.len()).step_by(16) {
            let (x, mask) = load_part(row, at, 0.0);
            store_part(row, at, mask, _mm512_mul_ps(x, inv));
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn attend(
        q: &[f32],
        hd: usize,
        kv: Cached<'_>,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let (nq, ctx, vecs) = (q.len() / hd, kv.slots.len(), hd / 16);
        out.fill(0.0);
        if nq == 0 || ctx == 0 {
            return;
        }
        scores.clear();
        scores.resize(nq * ctx, 0.0);
        // Scores: tiles of four query heads by four positions. A tile past the last head
        // or position repeats the last one and drops its results.
        for qb in (0..nq).step_by(4) {
            let mut qr = [&q[..0]; 4];
            for (g, r) in qr.iter_mut().enumerate() {
                let h = (qb + g).min(nq - 1);
                *r = &q[h * hd..(h + 1) * hd];
            }
            for tb in (0..ctx).step_by(4) {
                // The cache's rows are a slot apart (every KV head's row between them), so
                // the hardware prefetchers lose the stream at each page: ask for the rows
                // `AHEAD` positions on, and their values for the pass below (once, on the
                // first tile of heads).
                for t in (tb + AHEAD..tb + AHEAD + 4).take_while(|t| *t < ctx) {
                    let (kr, vr) = kv.rows(t, hd);
                    fetch::<_MM_HINT_T0>(kr);
                    if qb == 0 {
                        fetch::<_MM_HINT_T1>(vr);
                    }
                }
                let mut kr = [&q[..0]; 4];
                for (t, r) in kr.iter_mut().enumerate() {
                    *r = kv.rows((tb + t).min(ctx - 1), hd).0;
                }
                let mut a = [_mm512_setzero_ps(); 16];
                for d in 0..vecs {
                    // No `std::array::from_fn` in the kernels: see `simd::rows`.
                    let mut kvec = [_mm512_setzero_ps(); 4];
                    for (t, v) in kvec.iter_mut().enumerate() {
                        *v = load(kr[t], 16 * d);
                    }
                    for g in 0..4 {
                        let qv = load(qr[g], 16 * d);
                        for t in 0..4 {
                            a[g * 4 + t] = _mm512_fmadd_ps(qv, kvec[t], a[g * 4 + t]);
                        }
                    }
                }
                let mut lanes = [0f32; 16];
                // SAFETY: 16 f32 stored into a 16-element array.
                #[allow(unsafe_code)]
                unsafe {
                    _mm512_storeu_ps(lanes.as_mut_ptr(), hsum16(&a))
                };
                for g in 0..(nq - qb).min(4) {
                    for t in 0..(ctx - tb).min(4) {
                        scores[(qb + g) * ctx + tb + t] = lanes[g * 4 + t] * scale;
                    }
                }
            }
        }
        for row in scores.chunks_exact_mut(ctx) {
            softmax(row);
        }
        // Values: four query heads by up to four vectors of their outputs per pass.
        for qb in (0..nq).step_by(4) {
            for first in (0..vecs).step_by(4) {
                let at = (qb, first);
                match (vecs - first).min(4) {
                    1 => weigh::<1>(scores, nq, kv, hd, at, out),
                    2 => weigh::<2>(scores, nq, kv, hd, at, out),
                    3 => weigh::<3>(scores, nq, kv, hd, at, out),
                    _ => weigh::<4>(scores, nq, kv, hd, at, out),
                }
            }
        }
    }

    /// `out[qb + g][16·(first + d)..][..16] = Σ_t p[qb + g][t] · v[t][same lanes]` for
    /// `g < 4` and `d < DN`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn weigh<const DN: usize>(
        scores: &[f32],
        nq: usize,
        kv: Cached<'_>,
        hd: usize,
        (qb, first): (usize, usize),
        out: &mut [f32],
    ) {
        let ctx = kv.slots.len();
        let mut p = [&scores[..0]; 4];
        for (g, r) in p.iter_mut().enumerate() {
            let h = (qb + g).min(nq - 1);
            *r = &scores[h * ctx..(h + 1) * ctx];
        }
        let mut a = [[_mm512_setzero_ps(); DN]; 4];
        for t in 0..ctx {
            if t + AHEAD < ctx {
                fetch::<_MM_HINT_T0>(kv.rows(t + AHEAD, hd).1);
            }
            let vr = kv.rows(t, hd).1;
            let mut vv = [_mm512_setzero_ps(); DN];
            for (d, v) in vv.iter_mut().enumerate() {
                *v = load(vr, 16 * (first + d));
            }
            for (ag, pg) in a.iter_mut().zip(&p) {
                let pg = _mm512_set1_ps(pg[t]);
                for (ad, vd) in ag.iter_mut().zip(&vv) {
                    *ad = _mm512_fmadd_ps(pg, *vd, *ad);
                }
            }
        }
        for (g, ag) in a.iter().enumerate().take((nq - qb).min(4)) {
            let o = &mut out[(qb + g) * hd..(qb + g + 1) * hd];
            for (d, v) in ag.iter().enumerate() {
                let at = 16 * (first + d);
                assert!(at + 16 <= o.len());
                // SAFETY: the 16 lanes are inside `o` (asserted).
                #[allow(unsafe_code)]
                unsafe {
                    _mm512_storeu_ps(o.as_mut_ptr().add(at), *v)
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    //! Never called: [`super::available`] is false off x86-64.
    use super::Cached;

    pub(super) fn attend(
        _: &[f32],
        _: usize,
        _: Cached<'_>,
        _: f32,
        _: &mut Vec<f32>,
        _: &mut [f32],
    ) {
        unreachable!("no SIMD attention on this architecture")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::simd::tests::lcg;

    /// Against f64 sums of the same operands, for group sizes and context lengths that
    /// leave partial tiles, head widths of 1 to 8 vectors, and slots out of order in a
    /// cache with other KV heads between them.
    #[test]
    fn matches_a_plain_softmax_of_the_scores() {
        if !available(16) {
            return;
        }
        let mut seed = 3u64;
        let mut scores = Vec::new();
        for (hd, nq, ctx) in [
            (64, 4, 1),
            (64, 4, 37),
            (16, 1, 5),
            (32, 3, 16),
            (48, 5, 9),
            (128, 8, 70),
            (64, 2, 300),
        ] {
            let (kvh, head) = (3, 1);
            let stride = kvh * hd;
            let total = ctx + 5;
            let k: Vec<f32> = (0..total * stride).map(|_| lcg(&mut seed) * 2.0).collect();
            let v: Vec<f32> = (0..total * stride).map(|_| lcg(&mut seed)).collect();
            let q: Vec<f32> = (0..nq * hd).map(|_| lcg(&mut seed) * 2.0).collect();
            // Slots in a scrambled order, none repeated.
            let slots: Vec<u32> = (0..ctx).map(|t| ((t * 7 + 3) % total) as u32).collect();
            let kv = Cached {
                k: &k,
                v: &v,
                slots: &slots,
                stride,
                offset: head * hd,
            };
            let scale = 1.0 / (hd as f32).sqrt();
            let mut out = vec![f32::NAN; nq * hd];
            attend(&q, hd, kv, scale, &mut scores, &mut out);
            for g in 0..nq {
                let s: Vec<f64> = slots
                    .iter()
                    .map(|&sl| {
                        let at = sl as usize * stride + head * hd;
                        (0..hd)
                            .map(|i| f64::from(q[g * hd + i]) * f64::from(k[at + i]))
                            .sum::<f64>()
                            * f64::from(scale)
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for i in 0..hd {
                    let want: f64 = e
                        .iter()
                        .zip(&slots)
                        .map(|(p, &sl)| {
                            p / sum * f64::from(v[sl as usize * stride + head * hd + i])
                        })
                        .sum();
                    let got = f64::from(out[g * hd + i]);
                    assert!(
                        (got - want).abs() < 1e-5,
                        "hd {hd}, {nq} heads, ctx {ctx}: head {g} lane {i}: {got} vs {want}"
                    );
                }
            }
        }
        let mut out = vec![1.0; 64];
        let empty = Cached {
            k: &[],
            v: &[],
            slots: &[],
            stride: 64,
            offset: 0,
        };
        attend(&[0.5; 64], 64, empty, 1.0, &mut scores, &mut out);
        assert_eq!(out, vec![0.0; 64], "no position attends to nothing");
    }

    /// The vector `exp` within 3 ulp of f64's over the range a softmax feeds it, zero far
    /// below it, and NaN through.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_is_within_three_ulp() {
        use std::arch::x86_64::*;
        if !available(16) {
            return;
        }
        let mut xs: Vec<f32> = (0..200_000)
            .map(|i| -87.0 + i as f32 * (95.0 / 200_000.0))
            .collect();
        xs.extend([0.0, -0.0, -1e-8, 1e-8, -87.33, 88.0]);
        for chunk in xs.chunks(16) {
            let mut lanes = [0f32; 16];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let mut got = [0f32; 16];
            // SAFETY: AVX-512 F is available (checked above); 16-element arrays.
            #[allow(unsafe_code)]
            unsafe {
                let e = super::x86::exp(_mm512_loadu_ps(lanes.as_ptr()));
                _mm512_storeu_ps(got.as_mut_ptr(), e);
            }
            for (x, g) in chunk.iter().zip(got) {
                let want = f64::from(*x).exp();
                let w = want as f32;
                let ulp = f64::from(f32::from_bits(w.to_bits() + 1)) - f64::from(w);
                assert!(
                    (f64::from(g) - want).abs() <= 3.0 * ulp,
                    "exp({x}) = {g}, want {want}"
                );
            }
        }
        let mut special = [0f32; 16];
        special[..3].copy_from_slice(&[-200.0, f32::NEG_INFINITY, f32::NAN]);
        let mut got = [0f32; 16];
        // SAFETY: as above.
        #[allow(unsafe_code)]
        unsafe {
            let e = super::x86::exp(_mm512_loadu_ps(special.as_ptr()));
            _mm512_storeu_ps(got.as_mut_ptr(), e);
        }
        assert_eq!(&got[..2], &[0.0, 0.0]);
        assert!(got[2].is_nan());
    }
}
