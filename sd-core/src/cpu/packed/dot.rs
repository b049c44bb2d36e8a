//! The AVX512_BF16 micro-kernel: `VDPBF16PS` on the packed layout the AMX tiles read.
//!
//! One B tile row (16 columns, a pair of `k` each) fills a vector register, and one A pair (a
//! row's two `k` values, 32 bits) is broadcast from memory, so a `VDPBF16PS` adds the products of
//! one pair of `k` for 16 columns of one row. The 32x32 block of C is computed in four groups of
//! 8 rows by 32 columns: 16 accumulators, 2 B registers and the broadcast fit the 32 registers,
//! and each B load serves 8 rows. Measured at 81% of the instruction's peak on a 3x3 convolution
//! (Zen 4, BENCHMARKS.md).
//!
//! Accumulation runs along `k` in one register per output, each step rounded to f32 as
//! `VDPBF16PS` defines (the AMX tiles sum in another order: the results differ by f32 rounding).

/// Whether this CPU has AVX-512 with AVX512_BF16.
#[cfg(target_arch = "x86_64")]
pub(super) fn detect() -> bool {
    crate::cpu::simd::Isa::best().has_avx512_bf16()
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn detect() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
pub(super) use instructions::block;

#[cfg(target_arch = "x86_64")]
mod instructions {
    use std::arch::x86_64::*;
    use std::mem::transmute;

    use half::bf16;

    use super::super::{Init, BLOCK_ELEMS};

    /// Rows of C per group: 2 accumulators each.
    const ROWS: usize = 8;

    /// C block (32x32 f32 at `c`, row stride `ldc` floats) = init + the product of `steps` k
    /// blocks of A (`a`) and B (`b`). Meanwhile 256 bytes per step from `prefetch` on are
    /// fetched towards L2 (the next A chunk), as the AMX kernel does.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BF16 ([`super::detect`]); `a` and `b` hold `steps` packed blocks;
    /// `c` and the `init` sources are valid for the 32x32 block.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(in super::super) unsafe fn block(
        a: *const bf16,
        b: *const bf16,
        steps: usize,
        init: Init,
        c: *mut f32,
        ldc: usize,
        prefetch: *const bf16,
    ) {
        // Group g: rows 8g .. 8g + 8, which are rows r0 .. r0 + 8 of A's tile (and C's half) h.
        for group in 0..4 {
            let (h, r0) = (group / 2, (group % 2) * ROWS);
            let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
            if let Init::Load(from, stride) = init {
                // `from` holds the four 16x16 quarters of C: [top left, top right, bottom ...].
                for (i, acc) in acc.iter_mut().enumerate() {
                    let at = (r0 + i) * stride;
                    acc[0] = _mm512_loadu_ps(from[2 * h].byte_add(at));
                    acc[1] = _mm512_loadu_ps(from[2 * h + 1].byte_add(at));
                }
            }
            for step in 0..steps {
                // Row i's k pair p is 32-bit word 16 i + p; B's two tiles are 16 rows of 16 pairs.
                let a = a.add(step * BLOCK_ELEMS + h * 512 + r0 * 32) as *const i32;
                let b = b.add(step * BLOCK_ELEMS) as *const __m512i;
                _mm_prefetch::<_MM_HINT_T1>(prefetch.add((group * steps + step) * 32).cast());
                for p in 0..16 {
                    let b0: __m512bh = transmute(_mm512_loadu_si512(b.add(p)));
                    let b1: __m512bh = transmute(_mm512_loadu_si512(b.add(16 + p)));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let pair: __m512bh = transmute(_mm512_set1_epi32(*a.add(i * 16 + p)));
                        acc[0] = _mm512_dpbf16_ps(acc[0], pair, b0);
                        acc[1] = _mm512_dpbf16_ps(acc[1], pair, b1);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                let row = c.add((h * 16 + r0 + i) * ldc);
                _mm512_storeu_ps(row, acc[0]);
                _mm512_storeu_ps(row.add(16), acc[1]);
            }
        }
    }
}
