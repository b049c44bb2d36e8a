//! bf16 GEMM with the weights packed once at load, for the CPU bf16 mode, on one of two
//! micro-kernels ([`Kernel`]): AMX tiles ([`tiles`]) or AVX-512 `VDPBF16PS` ([`dot`]).
//!
//! MKL's `cblas_gemm_bf16bf16f32` repacks both operands into its own layout on every call:
//! 12-14% of a bf16 UNet step, most of it the same weights again and again; and on CPUs other
//! than Intel's it runs generic code, slower than f32. Here the weights are packed when the model
//! loads (same size as the plain bf16 weight) and the activations are written straight into the
//! packed layout by the op that produces them (im2col, bf16 conversion).
//!
//! # Layouts
//!
//! `C[m, n] = bias + A[m, k] B[k, n]`, both operands in blocks of 32 rows (A) or 32 columns (B)
//! by 32 `k`, zero-padded to whole blocks. Block `(i, kb)` starts at `(i * kblocks + kb) * 1024`
//! and holds two 16x32 tiles of 1 KiB:
//! - A ([`Packed::a_from_rows`], [`pack_a`], [`pack_a_f32`]): tile `h` row `r` = row
//!   `32 i + 16 h + r` of A, `k = 32 kb .. 32 kb + 32`.
//! - B ([`Packed::b_from_transposed`], [`pack_b_rows`], [`pack_b_transposed`]), in the
//!   pair-interleaved ("VNNI") layout that `TDPBF16PS` and `VDPBF16PS` read: tile `h` row `r`
//!   holds, for the 16 columns `j = 32 i + 16 h ..`, the pairs
//!   `(B[32 kb + 2r, j], B[32 kb + 2r + 1, j])`.
//!
//! Both kernels compute a 32x32 block of C from a run of `k` blocks; the driver walks `k` in
//! chunks so the A chunk stays in L1 and the B panel in L2.
//!
//! Packed weights are also kept on disk (`SD_WEIGHT_CACHE`, `loading/packed_cache.rs`): a change
//! to these layouts must bump `FORMAT` there (a test there pins them).
//!
//! # Choosing the kernel
//!
//! [`kernel`]: AMX tiles where the CPU and OS run them, unless `SD_CPU_AMX=0`; else
//! `VDPBF16PS` where the CPU has AVX512_BF16 (Zen 4, Cooper Lake), unless `SD_CPU_AVX512BF16=0`.

mod dot;
mod tiles;

use std::cell::RefCell;
use std::sync::Arc;

use half::bf16;

use super::bf16::{round_to_bf16, WeightValue};

/// Rows (A) or columns (B) per packed block, and `k` per block.
pub const BLOCK: usize = 32;
/// Elements of one packed block (two 16x32 tiles).
const BLOCK_ELEMS: usize = BLOCK * BLOCK;
/// `k` blocks per chunk: an A chunk of 32 rows is 32 KiB, so it stays in L1 while it meets every
/// B block of the panel.
const KC_BLOCKS: usize = 16;
/// B blocks per panel: 256 columns by one `k` chunk, 256 KiB, in L2.
const NC_BLOCKS: usize = 8;
/// Columns of B per panel. The whole A is read once per panel, so callers gain nothing from
/// handing one call more columns than this, and a B of this width stays in L2.
pub const PANEL: usize = NC_BLOCKS * BLOCK;

/// The micro-kernel that multiplies packed blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles (`TDPBF16PS`): Sapphire Rapids and later.
    AmxTiles,
    /// AVX-512 `VDPBF16PS` on vector registers: Zen 4 and later, Cooper Lake, Sapphire Rapids.
    Avx512Bf16,
}

impl Kernel {
    /// The kernels this CPU (and OS) can run, best first, whatever the switches say.
    pub fn supported() -> &'static [Kernel] {
        static SUPPORTED: std::sync::OnceLock<Vec<Kernel>> = std::sync::OnceLock::new();
        SUPPORTED.get_or_init(|| {
            let mut kernels = vec![];
            if tiles::detect() {
                kernels.push(Kernel::AmxTiles);
            }
            if dot::detect() {
                kernels.push(Kernel::Avx512Bf16);
            }
            kernels
        })
    }

    /// `"AMX tiles"` or `"AVX512_BF16"`, for logs and benchmark records.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::AmxTiles => "AMX tiles",
            Kernel::Avx512Bf16 => "AVX512_BF16",
        }
    }

    /// The variable that turns this kernel off when it says `0`.
    fn switch(self) -> &'static str {
        match self {
            Kernel::AmxTiles => "SD_CPU_AMX",
            Kernel::Avx512Bf16 => "SD_CPU_AVX512BF16",
        }
    }
}

/// The kernel of this process: the best [`Kernel::supported`] one that its switch does not turn
/// off (`SD_CPU_AMX=0`, `SD_CPU_AVX512BF16=0`). `None`: bf16 GEMMs go to MKL, if anywhere.
pub fn kernel() -> Option<Kernel> {
    static KERNEL: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        let on = |k: &&Kernel| !crate::runtime::switched_off(k.switch());
        Kernel::supported().iter().find(on).copied()
    })
}

/// Whether the packed GEMM runs in this process ([`kernel`] is some).
pub fn available() -> bool {
    kernel().is_some()
}

/// Blocks needed for `len` rows, columns or `k`.
pub fn blocks(len: usize) -> usize {
    len.div_ceil(BLOCK)
}

/// Elements of a packed operand with `outer` rows (A) or columns (B) and inner size `k`.
pub fn packed_len(outer: usize, k: usize) -> usize {
    blocks(outer) * blocks(k) * BLOCK_ELEMS
}

/// A 64-byte aligned view of `len` elements inside `buf` (which must hold `len + 32`), as tile
/// loads want whole cache lines.
pub fn aligned(buf: &mut [bf16], len: usize) -> &mut [bf16] {
    let skip = buf.as_ptr().align_offset(64);
    &mut buf[skip..skip + len]
}

/// A packed operand (the weights), 64-byte aligned: packed by this process, or read in place
/// from a file of packed weights ([`Self::mapped`]).
pub struct Packed {
    storage: Storage,
    /// Rows (A) or columns (B), unpadded.
    pub outer: usize,
    /// The inner dimension, unpadded.
    pub k: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([bf16; 32]);

enum Storage {
    Owned(Vec<Line>),
    /// `len` elements at `ptr`, inside a map of a file that `_map` keeps alive: read in place
    /// ([`Packed::mapped`]), or packed into the file as it was written ([`packing_into`]).
    Mapped {
        _map: Arc<dyn Send + Sync>,
        ptr: *const bf16,
        len: usize,
    },
}

// Safety: a mapped operand lives as long as `_map`, and nothing writes it once it is packed.
unsafe impl Send for Storage {}
unsafe impl Sync for Storage {}

/// Memory for one packed operand outside the heap: `len` bytes at `ptr` (page-aligned, writable,
/// in a map of a file that `owner` keeps alive). The weight cache hands these out so that the
/// first load packs straight into the cache file ([`packing_into`]).
pub(crate) struct Region {
    pub owner: Arc<dyn Send + Sync>,
    pub ptr: *mut u8,
    pub len: usize,
}

type RegionSource = Box<dyn FnMut(usize) -> Option<Region>>;

thread_local! {
    /// Where operands packed on this thread take their memory (see [`packing_into`]).
    static REGIONS: RefCell<Option<RegionSource>> = const { RefCell::new(None) };
}

/// Runs `f`, with every operand that [`Packed`]'s constructors pack on this thread built in
/// `regions(bytes)`' memory where it gives some (else on the heap).
pub(crate) fn packing_into<R>(
    regions: impl FnMut(usize) -> Option<Region> + 'static,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore(Option<RegionSource>);
    impl Drop for Restore {
        fn drop(&mut self) {
            REGIONS.with(|r| *r.borrow_mut() = self.0.take());
        }
    }
    let previous = REGIONS.with(|r| r.borrow_mut().replace(Box::new(regions)));
    let _restore = Restore(previous);
    f()
}

/// Memory for an operand of `lines` lines: a region from [`packing_into`]'s source, or a heap
/// vector (empty, with that capacity).
enum Memory {
    Heap(Vec<Line>),
    Region(Region),
}

impl Memory {
    fn new(lines: usize) -> Self {
        let bytes = lines * std::mem::size_of::<Line>();
        let region = REGIONS.with(|r| r.borrow_mut().as_mut().and_then(|source| source(bytes)));
        match region {
            Some(region) if region.len >= bytes && (region.ptr as usize).is_multiple_of(64) => {
                Memory::Region(region)
            }
            _ => Memory::Heap(Vec::with_capacity(lines)),
        }
    }

    fn start(&mut self) -> *mut Line {
        match self {
            Memory::Heap(lines) => lines.as_mut_ptr(),
            Memory::Region(region) => region.ptr.cast(),
        }
    }

    /// The storage, once all `lines` are written.
    ///
    /// # Safety
    /// Every one of the `lines` lines must have been written.
    unsafe fn into_storage(self, lines: usize) -> Storage {
        match self {
            Memory::Heap(mut vec) => {
                vec.set_len(lines);
                Storage::Owned(vec)
            }
            Memory::Region(Region { owner, ptr, .. }) => {
                Storage::Mapped { _map: owner, ptr: ptr.cast_const().cast(), len: lines * 32 }
            }
        }
    }
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Packed {{ outer: {}, k: {} }}", self.outer, self.k)
    }
}

impl Packed {
    /// Packs by all threads: `fill(i, block_row)` writes block row `i` (the `kblocks` blocks
    /// of rows or columns `32 i ..`), which starts zeroed. Zeroing each block row just before
    /// it is packed keeps the page faults and the fill parallel and in cache; without padding
    /// the fill writes every element and nothing is zeroed. (Asking for huge pages here made
    /// SD 2.1's bf16 load 0.8-3.1 s instead of 1.0-1.2 s: the kernel compacts memory for them
    /// when the page cache holds the model.)
    fn build(outer: usize, k: usize, fill: impl Fn(usize, &mut [bf16]) + Sync) -> Self {
        let [packed] = Self::build_many(outer, k, |i, [block_row]| fill(i, block_row));
        packed
    }

    /// `N` operands of the same size packed together, by all threads: `fill(i, block_rows)`
    /// writes block row `i` of each (so a producer that makes all `N` at once, the Winograd
    /// filter transform, runs once per block row). As [`Self::build`] otherwise.
    pub(crate) fn build_many<const N: usize>(
        outer: usize,
        k: usize,
        fill: impl Fn(usize, [&mut [bf16]; N]) + Sync,
    ) -> [Self; N] {
        use rayon::prelude::*;
        let (count, per_row) = (packed_len(outer, k) / 32, blocks(k) * BLOCK_ELEMS / 32);
        let padded = !outer.is_multiple_of(BLOCK) || !k.is_multiple_of(BLOCK);
        let mut memory: [Memory; N] = std::array::from_fn(|_| Memory::new(count));
        let starts: [super::blas::SendPtr<Line>; N] =
            std::array::from_fn(|j| super::blas::SendPtr(memory[j].start()));
        (0..count / per_row.max(1)).into_par_iter().for_each(|i| {
            let block_rows = starts.map(|start| {
                // Safety: block row `i` of each operand lies inside its capacity, and only this
                // task writes it. Zero bytes are a valid `Line`; the view is fully written by
                // `fill` where it is not zeroed.
                unsafe {
                    let chunk = start.get().add(i * per_row);
                    if padded {
                        std::ptr::write_bytes(chunk, 0, per_row);
                    }
                    std::slice::from_raw_parts_mut(chunk as *mut bf16, per_row * 32)
                }
            });
            fill(i, block_rows);
        });
        memory.map(|memory| {
            // Safety: every line was packed above, and zeroed first where the fill leaves
            // padding.
            let storage = unsafe { memory.into_storage(count) };
            Self { storage, outer, k }
        })
    }

    /// The operand of `outer` by `k` stored packed at byte `offset` of `map` (as
    /// [`Self::as_bytes`] wrote it), read in place; `None` where that run is not inside the map
    /// or not 64-byte aligned.
    pub fn mapped(map: &Arc<memmap2::Mmap>, offset: usize, outer: usize, k: usize) -> Option<Self> {
        let len = packed_len(outer, k);
        let bytes = map.get(offset..offset.checked_add(len * 2)?)?;
        if !(bytes.as_ptr() as usize).is_multiple_of(64) {
            return None;
        }
        let ptr = bytes.as_ptr().cast();
        Some(Self { storage: Storage::Mapped { _map: map.clone(), ptr, len }, outer, k })
    }

    pub fn as_slice(&self) -> &[bf16] {
        match &self.storage {
            // Safety: `Line` is 32 bf16 with no padding.
            Storage::Owned(lines) => unsafe {
                std::slice::from_raw_parts(lines.as_ptr() as *const bf16, lines.len() * 32)
            },
            // Safety: `ptr .. ptr + len` lies inside the map `_map` holds (checked in `mapped`).
            Storage::Mapped { ptr, len, .. } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
        }
    }

    /// The packed operand's bytes, as [`Self::mapped`] reads them back.
    pub fn as_bytes(&self) -> &[u8] {
        let values = self.as_slice();
        // Safety: any bf16 is 2 valid bytes.
        unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), values.len() * 2) }
    }

    /// A weight `[m, k]` (row-major; f32, f16 or bf16, rounded to bf16 as it is packed) as the
    /// A operand.
    pub fn a_from_rows<S: WeightValue>(w: &[S], m: usize, k: usize) -> Self {
        Self::build(m, k, |i, dst| pack_a_block(w, m, k, i, dst, S::to_bf16_slice))
    }

    /// A weight `[n, k]` (row-major, as `nn.Linear` stores it; f32, f16 or bf16, rounded to
    /// bf16 as it is packed) as the B operand `W^T`.
    pub fn b_from_transposed<S: WeightValue>(w: &[S], n: usize, k: usize) -> Self {
        Self::build(n, k, |i, dst| pack_b_transposed_block(w, n, k, i, dst))
    }

    /// The `[m, k]` weight [`Self::a_from_rows`] packed (for fusing LoRAs into packed layers).
    pub fn unpack_a_rows(&self) -> Vec<bf16> {
        self.unpack(|row, kk| (row, kk % BLOCK, kk / BLOCK, (row % BLOCK) / 16, row % 16))
    }

    /// The `[n, k]` weight [`Self::b_from_transposed`] packed.
    pub fn unpack_b_transposed(&self) -> Vec<bf16> {
        self.unpack(|col, kk| {
            (col, 2 * (col % 16) + kk % 2, kk / BLOCK, (col % BLOCK) / 16, kk % BLOCK / 2)
        })
    }

    /// Element `(outer, kk)` of the weight is at `tile_row(outer / 32, kb, kblocks, h, r) + lane`
    /// for `at(outer, kk) = (outer, lane, kb, h, r)`.
    fn unpack(
        &self,
        at: impl Fn(usize, usize) -> (usize, usize, usize, usize, usize),
    ) -> Vec<bf16> {
        let (kblocks, src) = (blocks(self.k), self.as_slice());
        (0..self.outer * self.k)
            .map(|e| {
                let (outer, lane, kb, h, r) = at(e / self.k, e % self.k);
                src[tile_row(outer / BLOCK, kb, kblocks, h, r) + lane]
            })
            .collect()
    }
}

/// Offset of tile row `r` of half `h` of block `(i, kb)`.
#[inline(always)]
fn tile_row(i: usize, kb: usize, kblocks: usize, h: usize, r: usize) -> usize {
    (i * kblocks + kb) * BLOCK_ELEMS + h * 512 + r * 32
}

/// Block row `i` of `src` (`m` rows of `k`, row-major) as the A operand, into zeroed `dst`;
/// `copy(run, out)` moves (or rounds to bf16) one run of a row.
pub(crate) fn pack_a_block<S: Copy>(
    src: &[S],
    m: usize,
    k: usize,
    i: usize,
    dst: &mut [bf16],
    copy: impl Fn(&[S], &mut [bf16]),
) {
    let kblocks = blocks(k);
    for (r32, row) in (i * BLOCK..((i + 1) * BLOCK).min(m)).enumerate() {
        for kb in 0..kblocks {
            let (k0, at) = (kb * BLOCK, tile_row(0, kb, kblocks, r32 / 16, r32 % 16));
            if k - k0 >= 32 {
                // A constant length: an inlined 64-byte copy, not a call to memcpy.
                copy(&src[row * k + k0..][..32], &mut dst[at..at + 32]);
            } else {
                copy(&src[row * k + k0..row * k + k], &mut dst[at..at + k - k0]);
            }
        }
    }
}

/// Packs `src` (`m` rows of `k` bf16, row-major) as the A operand into `dst`.
pub fn pack_a(src: &[bf16], m: usize, k: usize, dst: &mut [bf16]) {
    pack_serial(m, k, dst, |i, block_row| {
        pack_a_block(src, m, k, i, block_row, |s, d: &mut [bf16]| d.copy_from_slice(s))
    })
}

/// Writes row `row` of an A operand with inner size `k` into packed `dst`, from `src`: the row's
/// `k` values zero-padded to whole blocks (`blocks(k) * 32` values). Lets a producer that makes A
/// a row at a time (the attention's softmax) write the packed layout directly.
pub fn write_a_row(dst: &mut [bf16], k: usize, row: usize, src: &[bf16]) {
    let kblocks = blocks(k);
    for (kb, run) in src[..kblocks * BLOCK].chunks_exact(BLOCK).enumerate() {
        let at = tile_row(row / BLOCK, kb, kblocks, (row % BLOCK) / 16, row % 16);
        dst[at..at + BLOCK].copy_from_slice(run);
    }
}

/// Writes rows `2 p` and `2 p + 1` of a B operand with `n` columns and inner size `k` into
/// packed `dst`, from f32 rows `lo` and `hi` (`n` values each) rounded to bf16; the columns
/// past `n` up to a whole block get zeros. Lets a producer that makes B two rows at a time (the
/// Winograd input transform) write the packed layout directly.
pub fn write_b_pair(dst: &mut [bf16], n: usize, k: usize, p: usize, lo: &[f32], hi: &[f32]) {
    super::simd::simd_dispatch!(write_b_pair_with(
        dst: &mut [bf16],
        n: usize,
        k: usize,
        p: usize,
        lo: &[f32],
        hi: &[f32]
    ))
}

#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // `simd_dispatch!` names it
fn write_b_pair_with<S>(dst: &mut [bf16], n: usize, k: usize, p: usize, lo: &[f32], hi: &[f32]) {
    let (kblocks, kb, r) = (blocks(k), 2 * p / BLOCK, p % 16);
    let full = n / 16;
    let groups = lo[..full * 16].chunks_exact(16).zip(hi[..full * 16].chunks_exact(16));
    for (c16, (lo, hi)) in groups.enumerate() {
        let at = tile_row(c16 / 2, kb, kblocks, c16 % 2, r);
        write_pairs(&mut dst[at..at + 32], lo, hi);
    }
    // The last partial group and the zero columns of the last block.
    for c16 in full..blocks(n) * 2 {
        let value = |v: &[f32], l: usize| if c16 * 16 + l < n { v[c16 * 16 + l] } else { 0.0 };
        let lo: [f32; 16] = std::array::from_fn(|l| value(lo, l));
        let hi: [f32; 16] = std::array::from_fn(|l| value(hi, l));
        let at = tile_row(c16 / 2, kb, kblocks, c16 % 2, r);
        write_pairs(&mut dst[at..at + 32], &lo, &hi);
    }
}

/// One tile row of pairs: `dst[2 l] = lo[l]`, `dst[2 l + 1] = hi[l]`, rounded to bf16. Written
/// as one 32-bit lane per pair (the `lo` value in its low half) so that it vectorises; a
/// plain function, not a closure, so that it is compiled with its caller's target features.
#[inline(always)]
fn write_pairs(dst: &mut [bf16], lo: &[f32], hi: &[f32]) {
    let bits = |v: f32| round_to_bf16(v).to_bits() as u32;
    let mut row = [0u32; 16];
    for ((r, &lo), &hi) in row.iter_mut().zip(lo).zip(hi) {
        *r = bits(hi) << 16 | bits(lo);
    }
    for (d, v) in dst.chunks_exact_mut(2).zip(row) {
        d[0] = bf16::from_bits(v as u16);
        d[1] = bf16::from_bits((v >> 16) as u16);
    }
}

/// Packs `W^T` as the B operand into `dst`, for `w` of `n` rows of `k` bf16.
pub fn pack_b_transposed(w: &[bf16], n: usize, k: usize, dst: &mut [bf16]) {
    pack_serial(n, k, dst, |i, block_row| pack_b_transposed_block(w, n, k, i, block_row))
}

/// Runs a block-row packer over `dst` on this thread, zeroing first where there is padding.
fn pack_serial(outer: usize, k: usize, dst: &mut [bf16], fill: impl Fn(usize, &mut [bf16])) {
    if packed_len(outer, k) == 0 {
        return;
    }
    for (i, block_row) in
        dst[..packed_len(outer, k)].chunks_exact_mut(blocks(k) * BLOCK_ELEMS).enumerate()
    {
        if !outer.is_multiple_of(BLOCK) || !k.is_multiple_of(BLOCK) {
            block_row.fill(bf16::ZERO);
        }
        fill(i, block_row);
    }
}

/// Packs `src` (`m` rows of `k` f32, row-major) as the A operand into `dst`, rounding to bf16.
pub fn pack_a_f32(src: &[f32], m: usize, k: usize, dst: &mut [bf16]) {
    pack_serial(m, k, dst, |i, block_row| {
        pack_a_block(src, m, k, i, block_row, super::bf16::to_bf16)
    })
}

/// Block row `i` of `W^T` as the B operand, for `w` of `n` rows of `k` (B's columns are W's
/// rows), into zeroed `dst`: tile row `r` of column `j` is the pair `w[j][2r], w[j][2r + 1]`,
/// each through `to_bf16`. Reads each weight row once, in order, and scatters its pairs down
/// the tiles of this block row (which stay in L2: `k / 32` KiB).
fn pack_b_transposed_block<S: WeightValue>(
    w: &[S],
    n: usize,
    k: usize,
    i: usize,
    dst: &mut [bf16],
) {
    let kblocks = blocks(k);
    let mut rounded = [bf16::ZERO; BLOCK];
    for j in i * BLOCK..((i + 1) * BLOCK).min(n) {
        let (h, lane) = ((j % BLOCK) / 16, 2 * (j % 16));
        for (kb, src) in w[j * k..][..k].chunks(BLOCK).enumerate() {
            let run = &mut rounded[..src.len()];
            S::to_bf16_slice(src, run);
            let tile = &mut dst[tile_row(0, kb, kblocks, h, 0)..][..512];
            let mut pairs = run.chunks_exact(2);
            for (row, pair) in tile.chunks_exact_mut(32).zip(&mut pairs) {
                row[lane] = pair[0];
                row[lane + 1] = pair[1];
            }
            if let [last] = pairs.remainder() {
                tile[(run.len() / 2) * 32 + lane] = *last;
            }
        }
    }
}

/// Writes rows `2r` and `2r + 1` of `k` block `kb` of the B operand into every column block:
/// `lo` and `hi` are those two rows of B, zero-padded to whole blocks.
fn interleave(lo: &[bf16], hi: &[bf16], kb: usize, r: usize, kblocks: usize, dst: &mut [bf16]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::Isa::best().has_avx512() {
        // Safety: the CPU has AVX-512 (F and BW among it).
        return unsafe { interleave_avx512(lo, hi, kb, r, kblocks, dst) };
    }
    for (c16, (lo, hi)) in lo.chunks_exact(16).zip(hi.chunks_exact(16)).enumerate() {
        let d = &mut dst[tile_row(c16 / 2, kb, kblocks, c16 % 2, r)..][..32];
        for ((d, &a), &b) in d.chunks_exact_mut(2).zip(lo).zip(hi) {
            d[0] = a;
            d[1] = b;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn interleave_avx512(
    lo: &[bf16],
    hi: &[bf16],
    kb: usize,
    r: usize,
    kblocks: usize,
    dst: &mut [bf16],
) {
    use std::arch::x86_64::*;
    for (c16, (lo, hi)) in lo.chunks_exact(16).zip(hi.chunks_exact(16)).enumerate() {
        let d = &mut dst[tile_row(c16 / 2, kb, kblocks, c16 % 2, r)..][..32];
        // Each 32-bit lane: the `lo` value in its low half, the `hi` value in its high half.
        let a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(lo.as_ptr().cast()));
        let b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(hi.as_ptr().cast()));
        _mm512_storeu_si512(d.as_mut_ptr().cast(), _mm512_or_si512(a, _mm512_slli_epi32::<16>(b)));
    }
}

/// Packs B from its rows: `row(kk, out)` writes row `kk` of B (`n` columns) into `out`. Lets
/// im2col write the tile layout without a row-major copy of the whole block in between.
pub fn pack_b_rows(n: usize, k: usize, dst: &mut [bf16], mut row: impl FnMut(usize, &mut [bf16])) {
    let (kblocks, nblocks) = (blocks(k), blocks(n));
    let width = nblocks * BLOCK;
    super::scratch::with_scratch(2, 2 * width, |pair: &mut [bf16]| {
        let (lo, hi) = pair.split_at_mut(width);
        lo[n..].fill(bf16::ZERO);
        hi[n..].fill(bf16::ZERO);
        for kp in 0..kblocks * BLOCK / 2 {
            let (k0, k1) = (2 * kp, 2 * kp + 1);
            if k0 < k {
                row(k0, &mut lo[..n])
            } else {
                lo[..n].fill(bf16::ZERO)
            }
            if k1 < k {
                row(k1, &mut hi[..n])
            } else {
                hi[..n].fill(bf16::ZERO)
            }
            interleave(lo, hi, k0 / BLOCK, kp % 16, kblocks, dst);
        }
    })
}

/// What C starts from.
#[derive(Clone, Copy)]
pub enum Bias<'a> {
    None,
    /// One value per row of C (a convolution's output channel).
    Rows(&'a [f32]),
    /// One value per column of C (a linear layer's output feature).
    Cols(&'a [f32]),
}

/// `C = bias + A B` for packed `a` (`m` rows) and `b` (`n` columns) with `k` inner; `c` has row
/// stride `ldc` and receives exactly `m x n` values.
///
/// Runs on this process's [`kernel`].
///
/// # Safety
/// [`available`] returned true; `a` and `b` are packed for these sizes and 64-byte aligned; `c`
/// is valid for writes of rows `0..m`, columns `0..n` at stride `ldc`, and nothing else touches
/// them meanwhile.
#[allow(clippy::too_many_arguments)] // a GEMM's operands, sizes, bias and output
pub unsafe fn gemm(
    a: &[bf16],
    m: usize,
    b: &[bf16],
    n: usize,
    k: usize,
    bias: Bias,
    c: *mut f32,
    ldc: usize,
) {
    let kernel = kernel().expect("the packed bf16 GEMM called where no kernel runs");
    gemm_on(kernel, a, m, b, n, k, bias, c, ldc)
}

/// [`gemm`] on a given kernel (the tests run each one this CPU has).
///
/// # Safety
/// As for [`gemm`], with `kernel` one of [`Kernel::supported`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_on(
    kernel: Kernel,
    a: &[bf16],
    m: usize,
    b: &[bf16],
    n: usize,
    k: usize,
    bias: Bias,
    c: *mut f32,
    ldc: usize,
) {
    let (mblocks, nblocks, kblocks) = (blocks(m), blocks(n), blocks(k));
    assert!(
        a.len() >= mblocks * kblocks * BLOCK_ELEMS && b.len() >= nblocks * kblocks * BLOCK_ELEMS
    );
    debug_assert!(
        (a.as_ptr() as usize).is_multiple_of(64) && (b.as_ptr() as usize).is_multiple_of(64)
    );
    if let Bias::Rows(v) = bias {
        assert!(v.len() >= m);
    }
    if let Bias::Cols(v) = bias {
        assert!(v.len() >= n);
    }
    BIAS_TABLE.with(|table| {
        let bias = BiasSource::new(&mut table.borrow_mut(), bias, mblocks, nblocks);
        gemm_blocks(kernel, a.as_ptr(), m, b.as_ptr(), n, kblocks, bias, c, ldc)
    })
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_blocks(
    kernel: Kernel,
    a: *const bf16,
    m: usize,
    b: *const bf16,
    n: usize,
    kblocks: usize,
    bias: BiasSource,
    c: *mut f32,
    ldc: usize,
) {
    let (mblocks, nblocks) = (blocks(m), blocks(n));
    let (full_m, full_n) = (m / BLOCK, n / BLOCK);
    let block = |i: usize, kb: usize| i * kblocks * BLOCK_ELEMS + kb * BLOCK_ELEMS;
    // C block (32x32 at `c`, row stride `ldc`) = init + `steps` k blocks of A times B, while
    // the next A chunk is fetched from `prefetch` on.
    let block_product = |a, b, steps, init, c, ldc, prefetch| match kernel {
        Kernel::AmxTiles => tiles::block(a, b, steps, init, c, ldc, prefetch),
        Kernel::Avx512Bf16 => dot::block(a, b, steps, init, c, ldc, prefetch),
    };
    if kernel == Kernel::AmxTiles {
        tiles::configure();
    }
    // Whole 32x32 blocks of C, in place: k in chunks, C carried through memory between them.
    for nc in (0..full_n).step_by(NC_BLOCKS) {
        // At least one chunk, so that with k = 0 the blocks still receive the bias.
        for kc in (0..kblocks.max(1)).step_by(KC_BLOCKS) {
            let steps = KC_BLOCKS.min(kblocks.saturating_sub(kc));
            for mi in 0..full_m {
                // The next A chunk (`steps` blocks), an eighth per block of the panel.
                let next = a.add(block((mi + 1).min(full_m - 1), kc));
                for (q, ni) in (nc..full_n.min(nc + NC_BLOCKS)).enumerate() {
                    let cp = c.add(mi * BLOCK * ldc + ni * BLOCK);
                    let init = if kc > 0 { Init::from_c(cp, ldc) } else { bias.init(mi, ni) };
                    block_product(
                        a.add(block(mi, kc)),
                        b.add(block(ni, kc)),
                        steps,
                        init,
                        cp,
                        ldc,
                        next.add(q * steps * 128),
                    );
                }
            }
        }
    }
    // Blocks cut by the edges of C: whole k at once into a 32x32 buffer, then the part inside.
    let mut edge = EdgeBuffer([0.0; BLOCK_ELEMS]);
    for mi in 0..mblocks {
        for ni in 0..nblocks {
            if mi < full_m && ni < full_n {
                continue;
            }
            let cp = edge.0.as_mut_ptr();
            let a = a.add(block(mi, 0));
            block_product(a, b.add(block(ni, 0)), kblocks, bias.init(mi, ni), cp, BLOCK, a);
            let rows = (m - mi * BLOCK).min(BLOCK);
            let cols = (n - ni * BLOCK).min(BLOCK);
            for r in 0..rows {
                std::ptr::copy_nonoverlapping(
                    cp.add(r * BLOCK),
                    c.add((mi * BLOCK + r) * ldc + ni * BLOCK),
                    cols,
                );
            }
        }
    }
    if kernel == Kernel::AmxTiles {
        tiles::release();
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_on(
    _: Kernel,
    _: &[bf16],
    _: usize,
    _: &[bf16],
    _: usize,
    _: usize,
    _: Bias,
    _: *mut f32,
    _: usize,
) {
    unreachable!("the packed kernels are only detected on x86_64")
}

#[repr(C, align(64))]
struct EdgeBuffer([f32; BLOCK_ELEMS]);

/// Where the four C tiles of a block start from: zero, or loads from four addresses (row
/// stride in bytes; 0 repeats one row).
#[derive(Clone, Copy)]
enum Init {
    Zero,
    Load([*const f32; 4], usize),
}

impl Init {
    unsafe fn from_c(c: *const f32, ldc: usize) -> Self {
        Init::Load([c, c.add(16), c.add(16 * ldc), c.add(16 * ldc + 16)], ldc * 4)
    }
}

thread_local! {
    /// The bias of the current call, laid out as tile sources.
    static BIAS_TABLE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The bias laid out once per call so that each block's C tiles load it directly: a column
/// bias zero-padded to whole blocks (one row of 16, loaded with stride 0), or a row bias with
/// each row's value spread over 16 columns (`[rows, 16]`, stride 64 bytes).
#[derive(Clone, Copy)]
enum BiasSource {
    None,
    Rows(*const f32),
    Cols(*const f32),
}

impl BiasSource {
    fn new(table: &mut Vec<f32>, bias: Bias, mblocks: usize, nblocks: usize) -> Self {
        // 16 spare floats to reach a 64-byte boundary.
        let fill = |table: &mut Vec<f32>, len: usize, value: &dyn Fn(usize) -> f32| {
            table.clear();
            table.resize(len + 16, 0.0);
            let skip = table.as_ptr().align_offset(64);
            for (i, t) in table[skip..skip + len].iter_mut().enumerate() {
                *t = value(i);
            }
            table[skip..].as_ptr()
        };
        let at = |v: &[f32], i: usize| v.get(i).copied().unwrap_or(0.0);
        match bias {
            Bias::None => Self::None,
            Bias::Cols(v) => Self::Cols(fill(table, nblocks * BLOCK, &|i| at(v, i))),
            Bias::Rows(v) => Self::Rows(fill(table, mblocks * BLOCK * 16, &|i| at(v, i / 16))),
        }
    }

    /// Where block `(mi, ni)` of C starts from.
    unsafe fn init(self, mi: usize, ni: usize) -> Init {
        match self {
            Self::None => Init::Zero,
            Self::Cols(p) => {
                let p = p.add(ni * BLOCK);
                Init::Load([p, p.add(16), p, p.add(16)], 0)
            }
            Self::Rows(p) => {
                let p = p.add(mi * BLOCK * 16);
                Init::Load([p, p, p.add(16 * 16), p.add(16 * 16)], 64)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values::values as vals;
    use super::*;

    /// Unpacking gives back the packed weight, for sizes that cut the blocks.
    #[test]
    fn unpack_inverts_pack() {
        for (outer, k) in [(1, 1), (33, 65), (64, 32), (17, 100)] {
            let w = bf(&vals(outer * k, 5));
            assert_eq!(Packed::a_from_rows(&w, outer, k).unpack_a_rows(), w);
            assert_eq!(Packed::b_from_transposed(&w, outer, k).unpack_b_transposed(), w);
        }
    }

    fn bf(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|&x| bf16::from_f32(x)).collect()
    }

    fn reference(a: &[bf16], b_t: &[bf16], m: usize, n: usize, k: usize, bias: Bias) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 =
                    (0..k).map(|kk| a[i * k + kk].to_f64() * b_t[j * k + kk].to_f64()).sum();
                let base = match bias {
                    Bias::None => 0.0,
                    Bias::Rows(v) => v[i],
                    Bias::Cols(v) => v[j],
                };
                c[i * n + j] = base + dot as f32;
            }
        }
        c
    }

    fn packed_scratch(len: usize) -> Vec<bf16> {
        vec![bf16::ZERO; len + 32]
    }

    /// Writing B two f32 rows at a time gives the layout `pack_b_rows` makes from the
    /// bf16-rounded rows, padding included (over a buffer that held other values).
    #[test]
    fn write_b_pair_matches_pack_b_rows() {
        for (n, k) in [(1, 1), (16, 2), (45, 37), (64, 64), (100, 70)] {
            let b = vals(n * k, 9); // row kk of B: b[kk * n..][..n]
            let len = packed_len(n, k);
            let mut expected = vec![bf16::ZERO; len];
            pack_b_rows(n, k, &mut expected, |kk, out| {
                for (o, &v) in out.iter_mut().zip(&b[kk * n..][..n]) {
                    *o = bf16::from_f32(v);
                }
            });
            let mut ours = vec![bf16::from_f32(7.0); len];
            let zeros = vec![0f32; n];
            for p in 0..blocks(k) * BLOCK / 2 {
                let row = |kk: usize| if kk < k { &b[kk * n..][..n] } else { &zeros[..] };
                write_b_pair(&mut ours, n, k, p, row(2 * p), row(2 * p + 1));
            }
            assert_eq!(ours, expected, "{n} {k}");
        }
    }

    /// Every kernel this CPU has, packing path and bias kind against a plain f64 product, with
    /// edges in m, n and k and more than one k chunk (k > 512) and column panel (n > 256).
    #[test]
    fn products_match_reference() {
        let kernels = Kernel::supported();
        if !kernels.contains(&Kernel::AmxTiles) {
            assert!(
                std::env::var("SD_REQUIRE_AMX").is_err(),
                "SD_REQUIRE_AMX is set but AMX is not available"
            );
        }
        if kernels.is_empty() {
            eprintln!("skipped: neither AMX nor AVX512_BF16 on this machine");
            return;
        }
        for &(m, n, k) in &[
            (32, 32, 32),
            (64, 96, 64),
            (45, 37, 70),
            (70, 300, 600),
            (5, 3, 7),
            (96, 320, 1100),
            (64, 64, 0),
        ] {
            let a = bf(&vals(m * k, 1));
            let b_t = bf(&vals(n * k, 2)); // B^T: n rows of k
            let rb = vals(m, 3);
            let cb = vals(n, 4);
            for (&kernel, bias) in kernels.iter().flat_map(|kernel| {
                [Bias::None, Bias::Rows(&rb), Bias::Cols(&cb)].map(|bias| (kernel, bias))
            }) {
                let expected = reference(&a, &b_t, m, n, k, bias);
                // A from bf16 rows, B from B^T (the linear weight path).
                let pa = Packed::a_from_rows(&a, m, k);
                let pb = Packed::b_from_transposed(&b_t, n, k);
                let ldc = n + 3;
                let mut c = vec![f32::NAN; m * ldc];
                unsafe {
                    gemm_on(
                        kernel,
                        pa.as_slice(),
                        m,
                        pb.as_slice(),
                        n,
                        k,
                        bias,
                        c.as_mut_ptr(),
                        ldc,
                    )
                };
                // A from f32 rows, B from its rows (the linear input and im2col paths).
                let a32: Vec<f32> = a.iter().map(|v| v.to_f32()).collect();
                let mut sa = packed_scratch(packed_len(m, k));
                let sa = aligned(&mut sa, packed_len(m, k));
                pack_a_f32(&a32, m, k, sa);
                let mut sb = packed_scratch(packed_len(n, k));
                let sb = aligned(&mut sb, packed_len(n, k));
                pack_b_rows(n, k, sb, |kk, out| {
                    for (j, o) in out.iter_mut().enumerate() {
                        *o = b_t[j * k + kk];
                    }
                });
                let mut c2 = vec![f32::NAN; m * n];
                unsafe { gemm_on(kernel, sa, m, sb, n, k, bias, c2.as_mut_ptr(), n) };
                for i in 0..m {
                    for j in 0..n {
                        let e = expected[i * n + j];
                        let tol = 1e-4 * (1.0 + e.abs());
                        assert!(
                            (c[i * ldc + j] - e).abs() < tol,
                            "{kernel:?} {m}x{n}x{k} [{i},{j}]: {} vs {e}",
                            c[i * ldc + j]
                        );
                        assert!(
                            (c2[i * n + j] - e).abs() < tol,
                            "{kernel:?} {m}x{n}x{k} [{i},{j}]: {} vs {e}",
                            c2[i * n + j]
                        );
                    }
                    // Columns past n are left alone.
                    assert!(c[i * ldc + n].is_nan());
                }
            }
        }
    }
}
