//! The engine's CPU inner loops, in a crate of their own so that they are compiled with
//! optimisations even in debug builds (`[profile.dev.package.switchyard-kernels]`): the
//! tests serve real models through them, and unoptimised they are tens of times slower,
//! while the rest of the worker keeps the fast-to-build debug profile.
//!
//! - [`rows_dot`]: each weight row dotted with a few input rows (the decode matmul), AVX2+FMA.
//! - [`widen`]: one row of ggml blocks (`Q8_0`, `Q4_0`, `Q4_1`) widened to f32, AVX2.
//!
//! Both are selected at run time ([`available`]); on other CPUs callers take another path.

/// The ggml block types [`widen`] reads.
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
    /// Bytes of one 32-weight block.
    pub fn bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::Blocks;
    /// Whether this CPU runs the kernel.
    pub fn available() -> bool {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }

    /// One row of 32-weight blocks of `kind` widened to f32 into `out`.
    #[allow(unsafe_code)]
    pub fn widen(kind: Blocks, row: &[u8], out: &mut [f32]) {
        debug_assert!(available());
        // SAFETY: as for `rows_dot`: the routine only needs AVX2 and FMA, which every caller
        // checked with `available()` first; it takes slices.
        unsafe { widen_avx2(kind, row, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn widen_avx2(kind: Blocks, row: &[u8], out: &mut [f32]) {
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

    /// `out[o · rows + r] = x[r] · w_rows[o]` for every weight row `o` of `w_rows`.
    #[allow(unsafe_code)]
    pub fn rows_dot(x: &[f32], rows: usize, k: usize, w_rows: &[f32], out: &mut [f32]) {
        debug_assert!(available());
        // SAFETY: `rows_dot_avx2` only needs the CPU to support AVX2 and FMA, which
        // `available()` checked at run time before any caller gets here (`small_rows_cpu`
        // returns early otherwise). It takes slices, so there is no other contract.
        unsafe { rows_dot_avx2(x, rows, k, w_rows, out) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn rows_dot_avx2(x: &[f32], rows: usize, k: usize, w_rows: &[f32], out: &mut [f32]) {
        for (w, o) in w_rows.chunks_exact(k).zip(out.chunks_exact_mut(rows)) {
            // Four input rows per pass: each loaded weight vector feeds four FMAs, so the
            // loop is bound by FMA throughput rather than by loads.
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
                *y = dot(&x[rr * k..(rr + 1) * k], w);
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

    /// Eight independent FMA accumulators of eight lanes each, so the loop is not bound by
    /// one accumulator's latency; compiled with AVX2+FMA where it is inlined.
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 64];
        let (ca, cb) = (a.chunks_exact(64), b.chunks_exact(64));
        let mut tail = 0f32;
        for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
            tail = x.mul_add(*y, tail);
        }
        for (x, y) in ca.zip(cb) {
            for i in 0..64 {
                acc[i] = x[i].mul_add(y[i], acc[i]);
            }
        }
        let mut lanes = [0f32; 8];
        for chunk in acc.chunks_exact(8) {
            for i in 0..8 {
                lanes[i] += chunk[i];
            }
        }
        lanes.iter().sum::<f32>() + tail
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    use super::Blocks;
    pub fn available() -> bool {
        false
    }

    pub fn rows_dot(_: &[f32], _: usize, _: usize, _: &[f32], _: &mut [f32]) {}

    pub fn widen(_: Blocks, _: &[u8], _: &mut [f32]) {}
}

pub use imp::{available, rows_dot, widen};

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block type widens to `scale · q (+ min)` in ggml's layout (byte j holds
    /// weights j and j + 16 for the 4-bit types).
    #[test]
    fn blocks_widen_to_their_values() {
        if !available() {
            return;
        }
        let d = half::f16::from_f32(0.5).to_le_bytes();
        let m = half::f16::from_f32(-1.0).to_le_bytes();
        let mut q8 = d.to_vec();
        q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut q40 = d.to_vec();
        q40.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut q41 = [d, m].concat();
        q41.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = [0f32; 32];
        widen(Blocks::Q8_0, &q8, &mut out);
        assert!(
            out.iter()
                .enumerate()
                .all(|(i, v)| *v == 0.5 * (i as f32 - 16.0))
        );
        widen(Blocks::Q4_0, &q40, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], 0.5 * (j as f32 - 8.0));
            assert_eq!(out[j + 16], 0.5 * ((15 - j) as f32 - 8.0));
        }
        widen(Blocks::Q4_1, &q41, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], 0.5 * j as f32 - 1.0);
            assert_eq!(out[j + 16], 0.5 * (15 - j) as f32 - 1.0);
        }
        assert_eq!(Blocks::Q4_1.bytes(), q41.len());
    }
}
