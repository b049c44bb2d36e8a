//! 3x3 convolutions (stride 1, padding 1) on the CPU by Winograd's minimal filtering
//! F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each 2x2 block of outputs (a *tile*) comes from the 4x4 block of input it sees, as
//! `Y = Aᵀ [Σ_ci (G g Gᵀ) ⊙ (Bᵀ d B)] A`: 16 products per input channel and tile where im2col
//! needs 36, so 2.25x fewer multiplications. The sum over input channels is 16 independent GEMMs,
//! one per position ξ of the 4x4 transforms: `M_ξ[co, tile] = Σ_ci U_ξ[co, ci] V_ξ[ci, tile]`.
//! 3x3 convolutions are 97% of the VAE decoder's multiplications and half of the UNet's.
//!
//! # f32 ([`conv3x3`])
//!
//! The transforms' coefficients are 0, ±1 and ±1/2: a value picks up a few more roundings but
//! nothing grows, so outputs stay as close to an exact convolution as im2col's (the tests hold
//! both to the same bound).
//!
//! The weights are transformed on each call (16/9 of the weight, shared by the tasks) rather
//! than kept from load: keeping them would add 0.8x the UNet's 2 GB of 3x3 weights to the
//! process's memory. Calls with few tiles (the UNet's 8x8 level, and its 16x16 level without
//! CFG) stay on im2col, where that transform would cost more than it saves.
//!
//! # bf16 ([`conv3x3_bf16`], on the packed kernels)
//!
//! The filters are transformed once at load and kept packed instead of the im2col packing
//! ([`PackedFilters`]: 16/9 of the bf16 weight, about 0.8 GB more for SD 2.1's UNet), so every
//! call of such a layer runs here, small ones with their tasks cut by output channel. The input
//! transform writes the packed B operands directly, a pair of channels at a time.
//!
//! The transformed filters and input are rounded to bf16 where im2col rounds the plain ones:
//! in a float64 simulation of a 256-channel SD layer, relative RMS error 0.0040 against 0.0024.
//! Whole images stay within the documented distance of f32 (measured: SD 2.1 at 512 px, mean
//! |diff| 1.41 levels against im2col's 1.13).
//!
//! `SD_CONV_WINOGRAD=0` turns both off (every convolution on im2col).
//!
//! # What is read on the way in ([`InputMap`])
//!
//! Both take the input as it is, or as `silu(x * scale[c] + shift[c])` per image and channel (a
//! resnet's group norm), or as its nearest-neighbour upsampling by 2 (an upsampler's input):
//! applied while the input rows are loaded for the transform, so the normalised or upsampled
//! copy of `x` (a full-size tensor, 0.6 GB at the VAE's last level at 768 px) is never made. The
//! values are those [`GroupNorm::forward_silu`](super::GroupNorm) and candle's
//! `upsample_nearest2d` write, bit for bit.

use std::sync::OnceLock;

use rayon::prelude::*;

use half::bf16;

use crate::cpu::bf16::{round_to_bf16, to_bf16, WeightValue};
use crate::cpu::blas::{gemm_f32, Operand, SendPtr};
use crate::cpu::packed;
use crate::cpu::simd::{simd_dispatch, MulAdd};
use crate::cpu::with_scratch;

use super::group_norm::{affine_with, ChannelAffine};

/// Positions of the 4x4 transforms (ξ), one GEMM each.
pub(super) const XI: usize = 16;

/// Fewest tiles (over the whole batch) for which the Winograd path pays for its weight
/// transform: below it the GEMMs are too short next to transforming a large weight. On the SD 2.1
/// UNet at 512 px with CFG (2 images), 128 tiles (from the 16x16 latent level up) and 256 (from
/// 32x32) measured level, and 32 (the 8x8 level too) was slower.
const MIN_TILES: usize = 128;

/// One task's transformed input and products, `16 (c_in + c_out)` values per tile, stay
/// within this many elements (16 MiB), as im2col's blocks do.
const TASK_ELEMS: usize = 4 << 20;

/// Sizes of one convolution; the output has the input's height and width.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub batch: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape {
    fn tiles_h(&self) -> usize {
        self.h.div_ceil(2)
    }
    fn tiles_w(&self) -> usize {
        self.w.div_ceil(2)
    }
}

/// What the convolution reads from its input `x` (see the module doc).
#[derive(Debug, Clone, Copy)]
pub(super) enum InputMap<'a> {
    /// `x` itself.
    Plain,
    /// `silu(x * scale + shift)`, one `scale` and `shift` per image and channel (a group norm
    /// and SiLU).
    NormSilu(&'a ChannelAffine),
    /// The nearest-neighbour upsampling of `x` by 2: `x` is `[batch, c_in, h / 2, w / 2]` for
    /// a [`Shape`] of `h x w`.
    Nearest2x,
}

impl InputMap<'_> {
    /// How channel `ci` of image `image` is read.
    fn channel(&self, image: usize, c_in: usize, ci: usize) -> Read {
        match self {
            InputMap::Plain => Read::Plain,
            InputMap::NormSilu(a) => {
                let i = image * c_in + ci;
                Read::NormSilu(a.scale[i], a.shift[i])
            }
            InputMap::Nearest2x => Read::Nearest2x,
        }
    }

    /// How many times larger (in height and width) the convolution's input is than `x`.
    pub(super) fn upsampling(&self) -> usize {
        match self {
            InputMap::Plain | InputMap::NormSilu(_) => 1,
            InputMap::Nearest2x => 2,
        }
    }

    /// The values of one input channel in `x`, for a convolution of `s`.
    fn plane_len(&self, s: &Shape) -> usize {
        (s.h / self.upsampling()) * (s.w / self.upsampling())
    }
}

/// How one input channel is read: [`InputMap`] for a channel.
#[derive(Debug, Clone, Copy)]
enum Read {
    Plain,
    NormSilu(f32, f32),
    Nearest2x,
}

/// Whether the Winograd path is on: unless `SD_CONV_WINOGRAD=0`.
pub(crate) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| !crate::runtime::switched_off("SD_CONV_WINOGRAD"))
}

/// What runs 3x3 convolutions in `dtype` (f32 or bf16 on the packed kernels), for
/// `sd-cli --verbose` ([`crate::cpu::describe`]).
pub(crate) fn describe(dtype: candle_core::DType) -> String {
    match (dtype, enabled()) {
        (candle_core::DType::BF16, true) => "bf16 3x3 convolutions: Winograd F(2x2,3x3), filters \
             transformed at load (SD_CONV_WINOGRAD=0 turns it off)"
            .to_string(),
        (_, true) => format!(
            "f32 3x3 convolutions: Winograd F(2x2,3x3) from {MIN_TILES} tiles per call, \
             im2col below (SD_CONV_WINOGRAD=0 turns it off)"
        ),
        (dtype, false) => {
            format!("{} 3x3 convolutions: im2col (SD_CONV_WINOGRAD=0)", dtype.as_str())
        }
    }
}

/// Whether a layer with this kernel, stride and padding is one Winograd computes: 3x3, stride 1,
/// padding 1, with the path switched on. A bf16 layer on the packed kernels then keeps its
/// filters transformed for [`conv3x3_bf16`] (all its calls run there, whatever their size).
pub(super) fn takes(kernel: (usize, usize), stride: usize, pad: usize) -> bool {
    enabled() && kernel == (3, 3) && stride == 1 && pad == 1
}

/// Whether an f32 convolution with this kernel, stride and padding, of shape `s`, runs here
/// ([`conv3x3`]): a layer Winograd [`takes`], in a call with enough tiles.
pub(super) fn applies(kernel: (usize, usize), stride: usize, pad: usize, s: &Shape) -> bool {
    takes(kernel, stride, pad) && fits(s)
}

/// Enough tiles to pay for the weight transform.
fn fits(s: &Shape) -> bool {
    s.batch * s.tiles_h() * s.tiles_w() >= MIN_TILES
}

/// The convolution of `x` (`[batch, c_in, h, w]`) with `weight` (`[c_out, c_in, 3, 3]`) plus
/// `bias`, written to `out` (`[batch, c_out, h, w]`).
///
/// # Safety
/// `out` is valid for writes of `batch c_out h w` values and nothing else touches them meanwhile.
pub(super) unsafe fn conv3x3(
    x: &[f32],
    input: InputMap,
    s: &Shape,
    weight: &[f32],
    bias: Option<&[f32]>,
    out: *mut f32,
) {
    let Shape { batch, c_in, c_out, .. } = *s;
    let plane = input.plane_len(s);
    assert!(x.len() >= batch * c_in * plane && weight.len() >= c_out * c_in * 9);
    assert!(bias.is_none_or(|b| b.len() >= c_out));
    let u = transform_weights(weight, c_out, c_in);
    // The builtin GEMM's kernel takes 64 tiles at a time; a remainder of 32 ran on its
    // half-width kernel, 7% of a UNet step.
    let tasks = plan(s, XI * (c_in + c_out), 64);
    let out = SendPtr(out);
    tasks.par_iter().for_each(|task| {
        let (n, b) = (task.tiles(), task.images.start);
        let image = &x[b * c_in * plane..][..c_in * plane];
        with_scratch(0, XI * c_in * n, |v: &mut [f32]| {
            transform_input(image, input, b, s, task, v);
            with_scratch(1, XI * c_out * n, |m: &mut [f32]| {
                for xi in 0..XI {
                    let u = &u[xi * c_out * c_in..][..c_out * c_in];
                    let v = &v[xi * c_in * n..][..c_in * n];
                    // Safety: `m`'s slab ξ is this task's own `c_out x n` block.
                    unsafe {
                        gemm_f32(
                            c_out,
                            n,
                            c_in,
                            Operand::new(u, c_in),
                            Operand::new(v, n),
                            0.0,
                            m[xi * c_out * n..].as_mut_ptr(),
                            n,
                        )
                    };
                }
                // Safety: image `b`'s output pixels of these tiles belong to this task alone.
                let image_out = unsafe { out.get().add(b * c_out * s.h * s.w) };
                unsafe { transform_output(m, s, bias, task, b, image_out) };
            })
        })
    });
}

/// A block of tiles: tile rows `rows` by tile columns `cols` of each image of `images`, for the
/// output channels `outs`. Its transformed input and products are laid out
/// `[16, channels, tiles]`, tile `(ty, tx)` of image `b` at
/// `(b - images.start) per_image + (ty - rows.start) cols.len() + tx - cols.start`.
#[derive(Debug, Clone, PartialEq)]
struct Task {
    images: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    outs: std::ops::Range<usize>,
}

impl Task {
    fn per_image(&self) -> usize {
        self.rows.len() * self.cols.len()
    }
    fn tiles(&self) -> usize {
        self.images.len() * self.per_image()
    }
}

/// Cuts the tiles into tasks of at most `TASK_ELEMS / per_tile` tiles (`per_tile`: a tile's
/// scratch elements): whole rows of tiles where one fits, else parts of one row; enough tasks
/// for every thread; and a multiple of `align` tiles where the sizes allow.
fn plan(s: &Shape, per_tile: usize, align: usize) -> Vec<Task> {
    let (batch, tiles_h, tiles_w, c_out) = (s.batch, s.tiles_h(), s.tiles_w(), s.c_out);
    let budget = (TASK_ELEMS / per_tile).max(align);
    if tiles_w > budget {
        let width = budget - budget % align;
        return (0..batch)
            .flat_map(|image| (0..tiles_h).map(move |ty| (image, ty)))
            .flat_map(|(image, ty)| {
                (0..tiles_w).step_by(width).map(move |tx| Task {
                    images: image..image + 1,
                    rows: ty..ty + 1,
                    cols: tx..(tx + width).min(tiles_w),
                    outs: 0..c_out,
                })
            })
            .collect();
    }
    let mut rows = (budget / tiles_w).clamp(1, tiles_h);
    while rows > 1 && batch * tiles_h.div_ceil(rows) < rayon::current_num_threads() {
        rows = rows.div_ceil(2);
    }
    let aligned_rows = align / gcd(tiles_w, align);
    if rows > aligned_rows {
        rows -= rows % aligned_rows;
    }
    (0..batch)
        .flat_map(|image| {
            (0..tiles_h).step_by(rows).map(move |ty| Task {
                images: image..image + 1,
                rows: ty..(ty + rows).min(tiles_h),
                cols: 0..tiles_w,
                outs: 0..c_out,
            })
        })
        .collect()
}

/// For calls with at most one packed panel of tiles over the whole batch (the UNet's lowest
/// levels): every task takes all the tiles of all the images, and a share of the output
/// channels (whole blocks of `align`). Cut by image instead, a task's GEMMs would have half-empty
/// column blocks (16 tiles of a 32-column block at the 8x8 level) and each would read all the
/// filters.
fn plan_by_channels(s: &Shape, align: usize) -> Vec<Task> {
    let (tiles_h, tiles_w) = (s.tiles_h(), s.tiles_w());
    let share = s.c_out.div_ceil(rayon::current_num_threads()).next_multiple_of(align);
    (0..s.c_out)
        .step_by(share)
        .map(|co| Task {
            images: 0..s.batch,
            rows: 0..tiles_h,
            cols: 0..tiles_w,
            outs: co..(co + share).min(s.c_out),
        })
        .collect()
}

/// A bf16 layer's filters, transformed once at load (`U_ξ = G g Gᵀ` of the bf16 weight, rounded to
/// bf16) and packed as the packed GEMM's A operand, `[c_out, c_in]` per ξ: 16/9 of the plain
/// bf16 weight.
pub(crate) struct PackedFilters {
    u: [packed::Packed; XI],
    pub c_out: usize,
    pub c_in: usize,
}

impl std::fmt::Debug for PackedFilters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedFilters {{ c_out: {}, c_in: {} }}", self.c_out, self.c_in)
    }
}

impl PackedFilters {
    /// From the weight `[c_out, c_in, 3, 3]` (f32, f16 or bf16), rounded to bf16 before the
    /// transform (so a mapped weight and the bf16 tensor of it give the same layer). Each block
    /// of 32 output channels is transformed into a per-thread scratch and packed from there, so
    /// the only new memory is the packed filters.
    pub(crate) fn new<S: WeightValue>(weight: &[S], c_out: usize, c_in: usize) -> Self {
        assert!(weight.len() >= c_out * c_in * 9);
        let u = packed::Packed::build_many(c_out, c_in, |block, dst: [&mut [bf16]; XI]| {
            let first = block * packed::BLOCK;
            let rows = packed::BLOCK.min(c_out - first);
            let plane = rows * c_in;
            let mut converted = Vec::new();
            with_scratch(0, XI * plane, |u: &mut [f32]| {
                let out = SendPtr(u.as_mut_ptr());
                for (co, filters) in
                    weight[first * c_in * 9..][..plane * 9].chunks(c_in * 9).enumerate()
                {
                    let filters = S::as_f32(filters, &mut converted);
                    // Safety: `u` holds the `[16, rows, c_in]` transforms of this block.
                    unsafe { transform_filters(filters, true, out, plane, co * c_in) };
                }
                for (xi, dst) in dst.into_iter().enumerate() {
                    let u = &u[xi * plane..][..plane];
                    packed::pack_a_block(u, rows, c_in, 0, dst, to_bf16);
                }
            })
        });
        Self { u, c_out, c_in }
    }

    /// The 16 packed operands `U_ξ` (for the packed-weight cache).
    pub(crate) fn into_operands(self) -> [packed::Packed; XI] {
        self.u
    }

    /// Filters from their 16 packed operands, as [`Self::into_operands`] gave them.
    pub(crate) fn from_operands(u: [packed::Packed; XI]) -> Self {
        let (c_out, c_in) = (u[0].outer, u[0].k);
        Self { u, c_out, c_in }
    }

    /// The `[c_out, c_in, 3, 3]` filters back from the transform (for fusing LoRAs), within the
    /// transform's bf16 rounding: `g = P U Pᵀ` with `P = [1 0 0 0; 0 1 -1 0; 0 0 0 1]`, as
    /// `P G` is the 3x3 identity.
    #[allow(clippy::needless_range_loop)] // `e` indexes all 16 transforms at once
    pub(crate) fn filters(&self) -> Vec<f32> {
        let u: Vec<Vec<bf16>> = self.u.iter().map(|p| p.unpack_a_rows()).collect();
        let mut g = Vec::with_capacity(self.c_out * self.c_in * 9);
        // Filter `e` (`co c_in + ci`) is element `e` of each `U_ξ`.
        for e in 0..self.c_out * self.c_in {
            let at = |r: usize, c: usize| u[r * 4 + c][e].to_f32();
            let row = |r: usize| [at(r, 0), at(r, 1) - at(r, 2), at(r, 3)];
            let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
            g.extend(r0);
            g.extend((0..3).map(|c| r1[c] - r2[c]));
            g.extend(r3);
        }
        g
    }
}

/// The bf16 convolution of `x` (`[batch, c_in, h, w]`, f32) with `filters` plus `bias`, written
/// to `out` (`[batch, c_out, h, w]`): the input transform in f32, rounded to bf16 as it is
/// packed, the 16 products on the packed kernel, the output transform in f32.
///
/// # Safety
/// As for [`conv3x3`]; and the packed GEMM runs in this process (the filters were packed).
pub(super) unsafe fn conv3x3_bf16(
    x: &[f32],
    input: InputMap,
    s: &Shape,
    filters: &PackedFilters,
    bias: Option<&[f32]>,
    out: *mut f32,
) {
    let Shape { batch, c_in, c_out, h, w } = *s;
    let plane_len = input.plane_len(s);
    assert!(x.len() >= batch * c_in * plane_len);
    assert!((filters.c_out, filters.c_in) == (c_out, c_in));
    assert!(bias.is_none_or(|b| b.len() >= c_out));
    let tasks = if batch * s.tiles_h() * s.tiles_w() <= packed::PANEL {
        plan_by_channels(s, packed::BLOCK)
    } else {
        // Scratch per tile: V packed in bf16 (half an f32 per value), and M.
        plan(s, XI * (c_in.div_ceil(2) + c_out), packed::BLOCK)
    };
    let padded_pairs = packed::blocks(c_in) * packed::BLOCK / 2;
    let out = SendPtr(out);
    tasks.par_iter().for_each(|task| {
        let (n, per_image, outs) = (task.tiles(), task.per_image(), task.outs.len());
        let b_len = packed::packed_len(n, c_in);
        with_scratch(3, XI * b_len + 32, |buf: &mut [bf16]| {
            // `V_ξ` as the B operand `[c_in, tiles]` of GEMM ξ, a pair of channels at a time:
            // both are transformed into `pair` (`[16, 2, n]`, in cache) and written into the
            // packed layout, rounded to bf16 (zero for the padding channels).
            let b = packed::aligned(buf, XI * b_len);
            let mut rows = InputRows::new(task);
            with_scratch(0, XI * 2 * n, |pair: &mut [f32]| {
                for p in 0..padded_pairs {
                    for (c, ci) in [2 * p, 2 * p + 1].into_iter().enumerate() {
                        for (i, image) in task.images.clone().enumerate() {
                            let v = &mut pair[c * n + i * per_image..];
                            if ci < c_in {
                                let plane = &x[(image * c_in + ci) * plane_len..][..plane_len];
                                let read = input.channel(image, c_in, ci);
                                rows.transform(plane, read, s, task, v, 2 * n);
                            } else {
                                for xi in 0..XI {
                                    v[2 * xi * n..][..per_image].fill(0.0);
                                }
                            }
                        }
                    }
                    for (b, v) in b.chunks_exact_mut(b_len).zip(pair.chunks_exact(2 * n)) {
                        packed::write_b_pair(b, n, c_in, p, &v[..n], &v[n..]);
                    }
                }
            });
            with_scratch(1, XI * outs * n, |m: &mut [f32]| {
                // The rows `outs` of each `U_ξ` (whole blocks: `outs` starts on one).
                let first_block = packed::packed_len(task.outs.start, c_in);
                for (xi, b) in b.chunks_exact(b_len).enumerate() {
                    // Safety: the packed GEMM runs (see above); `m`'s slab ξ is this task's
                    // own `outs x n` block.
                    unsafe {
                        packed::gemm(
                            &filters.u[xi].as_slice()[first_block..],
                            outs,
                            b,
                            n,
                            c_in,
                            packed::Bias::None,
                            m[xi * outs * n..].as_mut_ptr(),
                            n,
                        )
                    };
                }
                for image in task.images.clone() {
                    // Safety: the output pixels of these tiles and channels belong to this task.
                    let image_out = unsafe { out.get().add(image * c_out * h * w) };
                    unsafe { transform_output(m, s, bias, task, image, image_out) };
                }
            })
        })
    });
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `U_ξ[co, ci] = (G g Gᵀ)_ξ` for every filter `g = weight[co, ci]`, laid out `[16, c_out, c_in]`.
fn transform_weights(weight: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let plane = c_out * c_in;
    let mut u: Vec<f32> = Vec::with_capacity(XI * plane);
    let dst = SendPtr(u.as_mut_ptr());
    weight[..plane * 9].par_chunks(c_in * 9).enumerate().for_each(|(co, filters)| {
        // Safety: writes (ξ, co, ci) for this `co` only, inside the capacity.
        unsafe { transform_filters(filters, false, dst, plane, co * c_in) }
    });
    // Safety: every (ξ, co, ci) was written above.
    unsafe { u.set_len(XI * plane) };
    u
}

/// The filters of one output channel (`[c_in, 3, 3]`, each tap rounded to bf16 first if
/// `round`) into `u[ξ plane + row + ci]`.
///
/// # Safety
/// `u` is valid for writes of those elements and nothing else writes them meanwhile.
unsafe fn transform_filters(
    filters: &[f32],
    round: bool,
    u: SendPtr<f32>,
    plane: usize,
    row: usize,
) {
    simd_dispatch!(transform_filters_with(
        filters: &[f32],
        round: bool,
        u: SendPtr<f32>,
        plane: usize,
        row: usize
    ))
}

/// `G g Gᵀ` with `G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1]`, for 16 input channels at a time (one
/// vector lane each).
#[inline(always)]
fn transform_filters_with<S: MulAdd>(
    filters: &[f32],
    round: bool,
    u: SendPtr<f32>,
    plane: usize,
    row: usize,
) {
    const LANES: usize = 16;
    type Lanes = [f32; LANES];
    let expand = |a: &Lanes, b: &Lanes, c: &Lanes| -> [Lanes; 4] {
        [
            *a,
            std::array::from_fn(|l| (a[l] + b[l] + c[l]) * 0.5),
            std::array::from_fn(|l| (a[l] - b[l] + c[l]) * 0.5),
            *c,
        ]
    };
    let c_in = filters.len() / 9;
    for ci0 in (0..c_in).step_by(LANES) {
        let lanes = LANES.min(c_in - ci0);
        // The 16 filters, rounded in one contiguous (vectorised) pass where asked, then
        // g[k][lane]: tap k of filter ci0 + lane.
        let mut taps = [0f32; 9 * LANES];
        if lanes == LANES {
            // A constant length: an inlined copy, not a call to memcpy.
            taps.copy_from_slice(&filters[ci0 * 9..][..9 * LANES]);
        } else {
            taps[..9 * lanes].copy_from_slice(&filters[ci0 * 9..(ci0 + lanes) * 9]);
        }
        if round {
            for t in &mut taps {
                *t = f32::from_bits((round_to_bf16(*t).to_bits() as u32) << 16);
            }
        }
        let mut g = [[0f32; LANES]; 9];
        for (lane, filter) in taps.chunks_exact(9).enumerate() {
            for (k, &value) in filter.iter().enumerate() {
                g[k][lane] = value;
            }
        }
        // `G g` (4x3, down the columns), then `(G g) Gᵀ` along its rows.
        let cols: [[Lanes; 4]; 3] = std::array::from_fn(|j| expand(&g[j], &g[3 + j], &g[6 + j]));
        let [c0, c1, c2] = &cols;
        for (r, ((a, b), c)) in c0.iter().zip(c1).zip(c2).enumerate() {
            for (c, values) in expand(a, b, c).iter().enumerate() {
                let dst = u.get().wrapping_add((r * 4 + c) * plane + row + ci0);
                // Safety: see `transform_filters`. A constant length where it can be (an
                // inlined store rather than a call to memcpy).
                unsafe {
                    if lanes == LANES {
                        std::ptr::copy_nonoverlapping(values.as_ptr(), dst, LANES)
                    } else {
                        std::ptr::copy_nonoverlapping(values.as_ptr(), dst, lanes)
                    }
                };
            }
        }
    }
}

/// `V_ξ[ci, tile] = (Bᵀ d B)_ξ` for the tiles of `task`, laid out `[16, c_in, tiles]` (see
/// [`Task`]), with `Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]` and `d` the tile's 4x4 input
/// (rows and columns from 2 ty - 1 and 2 tx - 1, zero outside the image). `x` holds the
/// channels of image `image`, read as `input` says.
fn transform_input(
    x: &[f32],
    input: InputMap,
    image: usize,
    s: &Shape,
    task: &Task,
    v: &mut [f32],
) {
    let (n, plane) = (task.tiles(), input.plane_len(s));
    let mut rows = InputRows::new(task);
    for ci in 0..s.c_in {
        let read = input.channel(image, s.c_in, ci);
        rows.transform(&x[ci * plane..][..plane], read, s, task, &mut v[ci * n..], s.c_in * n);
    }
}

/// Scratch of the input transform of one channel: a padded input row, and the column
/// transforms of the rows a task's tiles see.
struct InputRows {
    padded: Vec<f32>,
    rows: Vec<f32>,
}

impl InputRows {
    fn new(task: &Task) -> Self {
        let tw = task.cols.len();
        Self {
            padded: vec![0f32; 2 * tw + 2],
            rows: vec![0f32; (2 * task.rows.len() + 2) * 4 * tw],
        }
    }

    /// `V_ξ` of one channel (`plane`, read as `read` says: `h x w` values, or half of each
    /// upsampled) for the tiles of `task`: tile `t` of ξ goes to `v[ξ stride + t]`.
    fn transform(
        &mut self,
        plane: &[f32],
        read: Read,
        s: &Shape,
        task: &Task,
        v: &mut [f32],
        stride: usize,
    ) {
        let scratch = self;
        simd_dispatch!(transform_channel(
            plane: &[f32],
            read: Read,
            s: &Shape,
            task: &Task,
            scratch: &mut InputRows,
            v: &mut [f32],
            stride: usize
        ))
    }
}

#[inline(always)]
fn transform_channel<S: MulAdd>(
    plane: &[f32],
    read: Read,
    s: &Shape,
    task: &Task,
    scratch: &mut InputRows,
    v: &mut [f32],
    stride: usize,
) {
    let (padded, rows) = (&mut scratch.padded[..], &mut scratch.rows[..]);
    let (h, w) = (s.h, s.w);
    let tw = task.cols.len();
    // The input rows these tiles see, 2 ty0 - 1 ..= 2 ty1: each is transformed along its
    // columns once (`d B`, four values per tile column: `rows[r][j][tx]`), and tile row ty
    // combines rows 2 (ty - ty0) .. + 4 of them.
    let first_row = 2 * task.rows.start;
    // padded[x] = input column 2 tx0 - 1 + x, zero outside the image: the image's columns
    // `lo .. hi` go to padded[at ..].
    let lo = (2 * task.cols.start).saturating_sub(1);
    let hi = (2 * task.cols.end + 1).min(w);
    let at = lo + 1 - 2 * task.cols.start;
    for (r, row_t) in rows.chunks_exact_mut(4 * tw).enumerate() {
        let iy = (first_row + r).wrapping_sub(1);
        if iy < h {
            // The padding stays zero: it pads the normalised or upsampled input.
            padded[..at].fill(0.0);
            let dst = &mut padded[at..at + hi - lo];
            match read {
                Read::Plain => dst.copy_from_slice(&plane[iy * w + lo..iy * w + hi]),
                Read::NormSilu(scale, shift) => {
                    affine_with::<S>(&plane[iy * w + lo..iy * w + hi], dst, scale, shift, true)
                }
                Read::Nearest2x => {
                    let src = &plane[iy / 2 * (w / 2)..][..w / 2];
                    for (d, x) in dst.iter_mut().zip(lo..hi) {
                        *d = src[x / 2];
                    }
                }
            }
            padded[at + hi - lo..].fill(0.0);
        } else {
            padded.fill(0.0);
        }
        let (t0, rest) = row_t.split_at_mut(tw);
        let (t1, rest) = rest.split_at_mut(tw);
        let (t2, t3) = rest.split_at_mut(tw);
        // Tile column tx sees padded[2 tx .. 2 tx + 4] = (d0, d1, d2, d3). Pairs and zips
        // rather than indices, so the loop has no bounds checks and vectorises.
        let pairs = padded[..2 * tw].chunks_exact(2).zip(padded[2..].chunks_exact(2));
        let outs = t0.iter_mut().zip(t1.iter_mut()).zip(t2.iter_mut()).zip(t3.iter_mut());
        for ((((t0, t1), t2), t3), (lo, hi)) in outs.zip(pairs) {
            let (d0, d1, d2, d3) = (lo[0], lo[1], hi[0], hi[1]);
            *t0 = d0 - d2;
            *t1 = d1 + d2;
            *t2 = d2 - d1;
            *t3 = d1 - d3;
        }
    }
    // `Bᵀ` down the columns: V[i][j] from rows 2 (ty - ty0) + 0..4, column part j.
    for ty in 0..task.rows.len() {
        let col = ty * tw;
        for j in 0..4 {
            let row = |r: usize| &rows[((2 * ty + r) * 4 + j) * tw..][..tw];
            let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
            // Slabs ξ = 4 i + j for i = 0..4, at a stride of 4 slabs; split so the loop has no
            // bounds checks and vectorises.
            let (v0, rest) = v[j * stride + col..].split_at_mut(4 * stride);
            let (v1, rest) = rest.split_at_mut(4 * stride);
            let (v2, v3) = rest.split_at_mut(4 * stride);
            let outs = v0[..tw].iter_mut().zip(&mut v1[..tw]).zip(&mut v2[..tw]).zip(&mut v3[..tw]);
            let ins = r0.iter().zip(r1).zip(r2).zip(r3);
            for ((((v0, v1), v2), v3), (((&r0, &r1), &r2), &r3)) in outs.zip(ins) {
                *v0 = r0 - r2;
                *v1 = r1 + r2;
                *v2 = r2 - r1;
                *v3 = r1 - r3;
            }
        }
    }
}

/// `Y = Aᵀ M A + bias` for image `image`'s tiles of `task` (`m`: `[16, outs, tiles]`), with
/// `Aᵀ = [1 1 1 0; 0 1 -1 -1]`, written to the output pixels those tiles cover (clipped at an
/// odd height or width) in the channels `task.outs`.
///
/// # Safety
/// `out` is the image's `[c_out, h, w]` output, and those pixels are this caller's.
unsafe fn transform_output(
    m: &[f32],
    s: &Shape,
    bias: Option<&[f32]>,
    task: &Task,
    image: usize,
    out: *mut f32,
) {
    let out = SendPtr(out);
    simd_dispatch!(transform_output_with(
        m: &[f32],
        s: &Shape,
        bias: Option<&[f32]>,
        task: &Task,
        image: usize,
        out: SendPtr<f32>
    ))
}

#[inline(always)]
fn transform_output_with<S: MulAdd>(
    m: &[f32],
    s: &Shape,
    bias: Option<&[f32]>,
    task: &Task,
    image: usize,
    out: SendPtr<f32>,
) {
    let (h, w) = (s.h, s.w);
    let (tw, n, outs) = (task.cols.len(), task.tiles(), task.outs.len());
    let first = (image - task.images.start) * task.per_image();
    // The output columns of these tiles: `x0 .. x0 + width`.
    let x0 = 2 * task.cols.start;
    let width = (2 * task.cols.end).min(w) - x0;
    // `Aᵀ M` of a tile row: its top row (m0 + m1 + m2, rows of M) and bottom row
    // (m1 - m2 - m3), four columns each, `rows[(row * 4 + j) * tw + tx]`.
    let mut rows = vec![0f32; 8 * tw];
    for (row, co) in task.outs.clone().enumerate() {
        let b = bias.map_or(0.0, |b| b[co]);
        for ty in task.rows.clone() {
            let col = first + (ty - task.rows.start) * tw;
            let mm = |xi: usize| &m[xi * outs * n + row * n + col..][..tw];
            let (top, bottom) = rows.split_at_mut(4 * tw);
            for j in 0..4 {
                let (m0, m1, m2, m3) = (mm(j), mm(4 + j), mm(8 + j), mm(12 + j));
                let top = &mut top[j * tw..][..tw];
                let bottom = &mut bottom[j * tw..][..tw];
                for tx in 0..tw {
                    top[tx] = m0[tx] + m1[tx] + m2[tx];
                    bottom[tx] = m1[tx] - m2[tx] - m3[tx];
                }
            }
            // `(Aᵀ M) A` along the columns, into the output rows 2 ty and 2 ty + 1.
            for (dy, r) in rows.chunks_exact(4 * tw).enumerate() {
                let oy = 2 * ty + dy;
                if oy >= h {
                    break;
                }
                // Safety: these pixels of row `oy` of channel `co` are this caller's (see
                // above).
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(out.get().add((co * h + oy) * w + x0), width)
                };
                let (r0, r1, r2, r3) = (&r[..tw], &r[tw..2 * tw], &r[2 * tw..3 * tw], &r[3 * tw..]);
                let pairs = width / 2;
                for (tx, pair) in dst.chunks_exact_mut(2).enumerate() {
                    pair[0] = r0[tx] + r1[tx] + r2[tx] + b;
                    pair[1] = r1[tx] - r2[tx] - r3[tx] + b;
                }
                if width % 2 == 1 {
                    dst[width - 1] = r0[pairs] + r1[pairs] + r2[pairs] + b;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_values::values;
    use candle_core::{Device, Module, Tensor};

    /// Test input, weight and bias for a convolution of shape `s`.
    fn inputs(s: &Shape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let Shape { batch, c_in, c_out, h, w } = *s;
        (values(batch * c_in * h * w, 1), values(c_out * c_in * 9, 2), values(c_out, 3))
    }

    /// candle's f32 convolution (padding 1) of `x` with `weight` plus `bias`, flattened.
    fn candle_conv(
        x: &[f32],
        weight: &[f32],
        bias: &[f32],
        s: &Shape,
    ) -> candle_core::Result<Vec<f32>> {
        let (dev, Shape { batch, c_in, c_out, h, w }) = (Device::Cpu, *s);
        candle_nn::Conv2d::new(
            Tensor::from_vec(weight.to_vec(), (c_out, c_in, 3, 3), &dev)?,
            Some(Tensor::from_vec(bias.to_vec(), c_out, &dev)?),
            candle_nn::Conv2dConfig { padding: 1, ..Default::default() },
        )
        .forward(&Tensor::from_vec(x.to_vec(), (batch, c_in, h, w), &dev)?)?
        .flatten_all()?
        .to_vec1::<f32>()
    }

    /// Against candle's f32 convolution, for sizes that cut tiles (odd heights and widths),
    /// batches, one and many channels and several tasks per image.
    #[test]
    fn matches_candle_conv() -> candle_core::Result<()> {
        for &(batch, c_in, c_out, h, w) in &[
            (1, 1, 1, 4, 4),
            (2, 3, 5, 7, 9),
            (1, 8, 4, 33, 32),
            (2, 16, 24, 40, 41),
            (1, 64, 32, 64, 64),
            // A row of tiles wider than a task's scratch: tasks take parts of rows.
            (1, 32, 32, 3, 8201),
        ] {
            let s = Shape { batch, c_in, c_out, h, w };
            let (x, weight, bias) = inputs(&s);
            let mut out = vec![f32::NAN; batch * c_out * h * w];
            // Safety: `out` has room for the whole output.
            unsafe { conv3x3(&x, InputMap::Plain, &s, &weight, Some(&bias), out.as_mut_ptr()) };
            let theirs = candle_conv(&x, &weight, &bias, &s)?;
            let diff = out.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "{batch} {c_in} {c_out} {h} {w}: {diff}");
        }
        Ok(())
    }

    /// The bf16 path against the exact convolution with the layer's f32 weight: its error is
    /// bf16 rounding of the transformed filters and input, at most 3x that of multiplying the
    /// bf16-rounded input and weight directly (im2col's; 1.5-2.9x on these values, 1.7x in a
    /// float64 simulation of an SD layer), for sizes that cut tiles, packed blocks (channels not
    /// a multiple of 32) and rows of tiles.
    #[test]
    fn bf16_stays_near_the_exact_convolution() -> candle_core::Result<()> {
        if !packed::available() {
            eprintln!("skipped: the packed bf16 GEMM needs AMX or AVX512_BF16");
            return Ok(());
        }
        let round =
            |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect() };
        let rms = |a: &[f32], b: &[f32]| {
            (a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.len() as f64)
                .sqrt()
        };
        for &(batch, c_in, c_out, h, w) in &[
            (1, 1, 1, 4, 4),
            (2, 5, 7, 9, 11),
            (1, 40, 64, 16, 16),
            (2, 33, 48, 24, 23),
            (1, 32, 32, 3, 8201),
            // The UNet's lowest level: tasks by output channels, both images in each.
            (2, 64, 96, 8, 8),
        ] {
            let s = Shape { batch, c_in, c_out, h, w };
            let (x, weight, bias) = inputs(&s);
            let filters = PackedFilters::new(&round(&weight), c_out, c_in);
            let mut ours = vec![f32::NAN; batch * c_out * h * w];
            // Safety: `ours` has room for the whole output; the packed GEMM runs.
            unsafe {
                conv3x3_bf16(&x, InputMap::Plain, &s, &filters, Some(&bias), ours.as_mut_ptr())
            };
            let exact = candle_conv(&x, &weight, &bias, &s)?;
            let direct = candle_conv(&round(&x), &round(&weight), &bias, &s)?;
            let (err, direct_err) = (rms(&ours, &exact), rms(&direct, &exact));
            let scale = rms(&exact, &vec![0.0; exact.len()]);
            assert!(err < 0.012 * scale, "{batch} {c_in} {c_out} {h} {w}: {err} (scale {scale})");
            assert!(
                err <= 3.0 * direct_err,
                "{batch} {c_in} {c_out} {h} {w}: {err} against im2col's {direct_err}"
            );
        }
        Ok(())
    }

    /// The filters come back from their transform within its bf16 rounding; the corner taps,
    /// which the transform copies, exactly.
    #[test]
    fn filters_come_back_from_the_transform() {
        let (c_out, c_in) = (5, 37);
        let weight: Vec<f32> =
            values(c_out * c_in * 9, 6).iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let back = PackedFilters::new(&weight, c_out, c_in).filters();
        for (i, (&b, &g)) in back.iter().zip(&weight).enumerate() {
            let tap = i % 9;
            if [0, 2, 6, 8].contains(&tap) {
                assert_eq!(b, g, "{i}");
            } else {
                assert!((b - g).abs() <= 4.0 / 256.0, "{i}: {b} vs {g}");
            }
        }
    }

    /// Small calls (the UNet's 8x8 level) stay on im2col.
    #[test]
    fn takes_large_enough_calls_only() {
        let shape = |batch, c, h, w| Shape { batch, c_in: c, c_out: c, h, w };
        assert!(fits(&shape(2, 1280, 16, 16)));
        assert!(!fits(&shape(2, 1280, 8, 8)));
        assert!(!fits(&shape(1, 1280, 16, 16)));
        assert!(fits(&shape(1, 128, 64, 16384)));
    }

    /// Tasks cover every tile once, within the scratch budget: whole rows of tiles where one
    /// fits (a multiple of `align` tiles where possible), else parts of a row.
    #[test]
    fn tasks_cover_every_tile_once() {
        for &(batch, c, h, w, align) in &[
            (2, 320, 64, 64, 64),
            (1, 128, 512, 512, 32),
            (1, 128, 1023, 1025, 32),
            (1, 256, 8, 40000, 64),
            (2, 1280, 16, 16, 32),
            (1, 4, 1, 1, 64),
        ] {
            let s = Shape { batch, c_in: c, c_out: c, h, w };
            let per_tile = XI * 2 * c;
            let tasks = plan(&s, per_tile, align);
            let mut seen = vec![0u8; batch * s.tiles_h() * s.tiles_w()];
            for t in &tasks {
                assert!(t.tiles() * per_tile <= TASK_ELEMS.max(align * per_tile), "{t:?}");
                assert_eq!((t.images.len(), t.outs.clone()), (1, 0..c), "{t:?}");
                for ty in t.rows.clone() {
                    for tx in t.cols.clone() {
                        seen[(t.images.start * s.tiles_h() + ty) * s.tiles_w() + tx] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{batch} {c} {h} {w}");
            assert!(tasks.len() >= rayon::current_num_threads().min(seen.len()));
        }
        // Small calls by channels: every tile of every image, whole blocks of channels.
        let s = Shape { batch: 2, c_in: 64, c_out: 96, h: 8, w: 8 };
        let tasks = plan_by_channels(&s, 32);
        let outs: Vec<(usize, usize)> = tasks.iter().map(|t| (t.outs.start, t.outs.end)).collect();
        let two = rayon::current_num_threads() > 1;
        assert_eq!(outs, if two { vec![(0, 64), (64, 96)] } else { vec![(0, 96)] });
        assert!(tasks.iter().all(|t| t.tiles() == 32 && t.images == (0..2)));
        // 40000 px wide: rows cut into parts of whole 64-tile groups.
        let s = Shape { batch: 1, c_in: 256, c_out: 256, h: 8, w: 40000 };
        let tasks = plan(&s, XI * 512, 64);
        assert!(tasks.iter().all(|t| t.rows.len() == 1 && t.cols.start % 64 == 0));
    }

    /// The weight transform against `G g Gᵀ` written out as matrix products, for a channel
    /// count that leaves a partial vector.
    #[test]
    fn weight_transform_is_g_g_gt() {
        let (c_out, c_in) = (3, 21);
        let weight = values(c_out * c_in * 9, 4);
        let u = transform_weights(&weight, c_out, c_in);
        let gm = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
        for (co, ci) in (0..c_out).flat_map(|co| (0..c_in).map(move |ci| (co, ci))) {
            let g = &weight[(co * c_in + ci) * 9..][..9];
            for (r, c) in (0..4).flat_map(|r| (0..4).map(move |c| (r, c))) {
                let mut expected = 0f32;
                for (a, b) in (0..3).flat_map(|a| (0..3).map(move |b| (a, b))) {
                    expected += gm[r][a] * g[a * 3 + b] * gm[c][b];
                }
                let ours = u[(r * 4 + c) * c_out * c_in + co * c_in + ci];
                assert!(
                    (ours - expected).abs() < 1e-6,
                    "{co} {ci} ({r}, {c}): {ours} vs {expected}"
                );
            }
        }
    }
}
