//! f32 3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(2x2, 3x3)
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each 2x2 block of outputs (a *tile*) comes from the 4x4 block of input it sees, as
//! `Y = Aᵀ [Σ_ci (G g Gᵀ) ⊙ (Bᵀ d B)] A`: 16 products per input channel and tile where im2col
//! needs 36, so 2.25x fewer multiplications. The sum over input channels is 16 independent GEMMs,
//! one per position ξ of the 4x4 transforms: `M_ξ[co, tile] = Σ_ci U_ξ[co, ci] V_ξ[ci, tile]`.
//! 3x3 convolutions are 97% of the VAE decoder's multiplications and half of the UNet's.
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
//! `SD_CONV_WINOGRAD=0` turns the path off (every convolution on im2col).

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::cpu::blas::{gemm_f32, Operand, SendPtr};
use crate::cpu::simd::{simd_dispatch, MulAdd};
use crate::cpu::with_scratch;

/// Positions of the 4x4 transforms (ξ), one GEMM each.
const XI: usize = 16;

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

/// Whether the Winograd path is on: unless `SD_CONV_WINOGRAD=0`.
pub(crate) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| !crate::runtime::switched_off("SD_CONV_WINOGRAD"))
}

/// What runs f32 3x3 convolutions, for `sd-cli --verbose` ([`crate::cpu::describe`]).
pub(crate) fn describe() -> String {
    if enabled() {
        format!(
            "f32 3x3 convolutions: Winograd F(2x2,3x3) from {MIN_TILES} tiles per call, \
             im2col below (SD_CONV_WINOGRAD=0 turns it off)"
        )
    } else {
        "f32 3x3 convolutions: im2col (SD_CONV_WINOGRAD=0)".to_string()
    }
}

/// Whether a convolution with this kernel, stride and padding on `batch` images of `h x w`
/// runs here.
pub(super) fn applies(kernel: (usize, usize), stride: usize, pad: usize, s: &Shape) -> bool {
    enabled() && kernel == (3, 3) && stride == 1 && pad == 1 && fits(s)
}

/// Enough tiles to pay for the weight transform, and one row of tiles within 4x a task's
/// budget (a task holds whole tile rows; SD's VAE at 2048 px is within 1x).
fn fits(s: &Shape) -> bool {
    s.batch * s.tiles_h() * s.tiles_w() >= MIN_TILES
        && XI * (s.c_in + s.c_out) * s.tiles_w() <= 4 * TASK_ELEMS
}

/// The convolution of `x` (`[batch, c_in, h, w]`) with `weight` (`[c_out, c_in, 3, 3]`) plus
/// `bias`, written to `out` (`[batch, c_out, h, w]`).
///
/// # Safety
/// `out` is valid for writes of `batch c_out h w` values and nothing else touches them meanwhile.
pub(super) unsafe fn conv3x3(
    x: &[f32],
    s: &Shape,
    weight: &[f32],
    bias: Option<&[f32]>,
    out: *mut f32,
) {
    let Shape { batch, c_in, c_out, h, w } = *s;
    assert!(x.len() >= batch * c_in * h * w && weight.len() >= c_out * c_in * 9);
    assert!(bias.is_none_or(|b| b.len() >= c_out));
    let u = transform_weights(weight, c_out, c_in);
    let (tiles_h, tiles_w) = (s.tiles_h(), s.tiles_w());
    // Tile rows per task: as many as the scratch budget allows, enough tasks for every thread,
    // and a multiple of 64 tiles where possible (the builtin GEMM's kernel takes 64 tiles at a
    // time; a remainder of 32 ran on its half-width kernel, 7% of a UNet step).
    let mut rows = (TASK_ELEMS / (XI * (c_in + c_out) * tiles_w)).clamp(1, tiles_h);
    while rows > 1 && batch * tiles_h.div_ceil(rows) < rayon::current_num_threads() {
        rows = rows.div_ceil(2);
    }
    let panel_rows = 64 / gcd(tiles_w, 64);
    if rows > panel_rows {
        rows -= rows % panel_rows;
    }
    let tasks: Vec<(usize, usize)> =
        (0..batch).flat_map(|b| (0..tiles_h).step_by(rows).map(move |t| (b, t))).collect();
    let out = SendPtr(out);
    tasks.par_iter().for_each(|&(b, ty0)| {
        let tile_rows = ty0..(ty0 + rows).min(tiles_h);
        let n = tile_rows.len() * tiles_w;
        let image = &x[b * c_in * h * w..][..c_in * h * w];
        with_scratch(0, XI * c_in * n, |v: &mut [f32]| {
            transform_input(image, s, tile_rows.clone(), v);
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
                // Safety: image `b`'s output rows of these tiles belong to this task alone.
                let image_out = unsafe { out.get().add(b * c_out * h * w) };
                unsafe { transform_output(m, s, bias, tile_rows, image_out) };
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
        unsafe { transform_filters(filters, dst, plane, co * c_in) }
    });
    // Safety: every (ξ, co, ci) was written above.
    unsafe { u.set_len(XI * plane) };
    u
}

/// The filters of one output channel (`[c_in, 3, 3]`) into `u[ξ plane + row + ci]`.
///
/// # Safety
/// `u` is valid for writes of those elements and nothing else writes them meanwhile.
unsafe fn transform_filters(filters: &[f32], u: SendPtr<f32>, plane: usize, row: usize) {
    simd_dispatch!(transform_filters_with(filters: &[f32], u: SendPtr<f32>, plane: usize, row: usize))
}

/// `G g Gᵀ` with `G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1]`, for 16 input channels at a time (one
/// vector lane each).
#[inline(always)]
fn transform_filters_with<S: MulAdd>(filters: &[f32], u: SendPtr<f32>, plane: usize, row: usize) {
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
        // g[k][lane]: tap k of filter ci0 + lane.
        let mut g = [[0f32; LANES]; 9];
        for (lane, filter) in filters[ci0 * 9..(ci0 + lanes) * 9].chunks_exact(9).enumerate() {
            for (k, &value) in filter.iter().enumerate() {
                g[k][lane] = value;
            }
        }
        // `G g` (4x3, down the columns), then `(G g) Gᵀ` along its rows.
        let cols: [[Lanes; 4]; 3] = std::array::from_fn(|j| expand(&g[j], &g[3 + j], &g[6 + j]));
        let [c0, c1, c2] = &cols;
        for (r, ((a, b), c)) in c0.iter().zip(c1).zip(c2).enumerate() {
            for (c, values) in expand(a, b, c).iter().enumerate() {
                // Safety: see `transform_filters`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        values.as_ptr(),
                        u.get().add((r * 4 + c) * plane + row + ci0),
                        lanes,
                    )
                };
            }
        }
    }
}

/// `V_ξ[ci, tile] = (Bᵀ d B)_ξ` for the tiles of `tile_rows` (all tile columns) of one image,
/// laid out `[16, c_in, n]`, with `Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]` and `d` the
/// tile's 4x4 input (rows and columns from 2 ty - 1 and 2 tx - 1, zero outside the image).
fn transform_input(image: &[f32], s: &Shape, tile_rows: std::ops::Range<usize>, v: &mut [f32]) {
    simd_dispatch!(transform_input_with(
        image: &[f32],
        s: &Shape,
        tile_rows: std::ops::Range<usize>,
        v: &mut [f32]
    ))
}

#[inline(always)]
fn transform_input_with<S: MulAdd>(
    image: &[f32],
    s: &Shape,
    tile_rows: std::ops::Range<usize>,
    v: &mut [f32],
) {
    let (c_in, h, w, tw) = (s.c_in, s.h, s.w, s.tiles_w());
    let n = tile_rows.len() * tw;
    // The input rows these tiles see, 2 ty0 - 1 ..= 2 ty1: each is transformed along its
    // columns once (`d B`, four values per tile column: `rows[r][j][tx]`), and tile row ty
    // combines rows 2 (ty - ty0) .. + 4 of them.
    let first_row = 2 * tile_rows.start;
    let row_count = 2 * tile_rows.len() + 2;
    let mut padded = vec![0f32; 2 * tw + 2];
    let mut rows = vec![0f32; row_count * 4 * tw];
    for ci in 0..c_in {
        let plane = &image[ci * h * w..][..h * w];
        for (r, row_t) in rows.chunks_exact_mut(4 * tw).enumerate() {
            // Padded input row `first_row + r - 1`: padded[x + 1] = input[x], zero outside.
            let iy = (first_row + r).wrapping_sub(1);
            if iy < h {
                padded[1..=w].copy_from_slice(&plane[iy * w..][..w]);
                padded[0] = 0.0;
                padded[w + 1..].fill(0.0);
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
        for ty in 0..tile_rows.len() {
            let col = ty * tw;
            for j in 0..4 {
                let row = |r: usize| &rows[((2 * ty + r) * 4 + j) * tw..][..tw];
                let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
                // Slabs ξ = 4 i + j for i = 0..4, at a stride of 4 slabs; split so the loop
                // has no bounds checks and vectorises.
                let stride = 4 * c_in * n;
                let (v0, rest) = v[j * c_in * n + ci * n + col..].split_at_mut(stride);
                let (v1, rest) = rest.split_at_mut(stride);
                let (v2, v3) = rest.split_at_mut(stride);
                let outs =
                    v0[..tw].iter_mut().zip(&mut v1[..tw]).zip(&mut v2[..tw]).zip(&mut v3[..tw]);
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
}

/// `Y = Aᵀ M A + bias` for the tiles of `tile_rows` of one image, with
/// `Aᵀ = [1 1 1 0; 0 1 -1 -1]`, written to the output rows those tiles cover (clipped at an odd
/// height or width).
///
/// # Safety
/// `out` is the image's `[c_out, h, w]` output, and the rows of `tile_rows` are this caller's.
unsafe fn transform_output(
    m: &[f32],
    s: &Shape,
    bias: Option<&[f32]>,
    tile_rows: std::ops::Range<usize>,
    out: *mut f32,
) {
    let out = SendPtr(out);
    simd_dispatch!(transform_output_with(
        m: &[f32],
        s: &Shape,
        bias: Option<&[f32]>,
        tile_rows: std::ops::Range<usize>,
        out: SendPtr<f32>
    ))
}

#[inline(always)]
fn transform_output_with<S: MulAdd>(
    m: &[f32],
    s: &Shape,
    bias: Option<&[f32]>,
    tile_rows: std::ops::Range<usize>,
    out: SendPtr<f32>,
) {
    let (c_out, h, w, tw) = (s.c_out, s.h, s.w, s.tiles_w());
    let n = tile_rows.len() * tw;
    // `Aᵀ M` of a tile row: its top row (m0 + m1 + m2, rows of M) and bottom row
    // (m1 - m2 - m3), four columns each, `rows[(row * 4 + j) * tw + tx]`.
    let mut rows = vec![0f32; 8 * tw];
    for co in 0..c_out {
        let b = bias.map_or(0.0, |b| b[co]);
        for ty in tile_rows.clone() {
            let col = (ty - tile_rows.start) * tw;
            let mm = |xi: usize| &m[xi * c_out * n + co * n + col..][..tw];
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
                // Safety: row `oy` of channel `co` lies in this caller's rows (see above).
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(out.get().add((co * h + oy) * w), w) };
                let (r0, r1, r2, r3) = (&r[..tw], &r[tw..2 * tw], &r[2 * tw..3 * tw], &r[3 * tw..]);
                let pairs = w / 2;
                for (tx, pair) in dst.chunks_exact_mut(2).enumerate() {
                    pair[0] = r0[tx] + r1[tx] + r2[tx] + b;
                    pair[1] = r1[tx] - r2[tx] - r3[tx] + b;
                }
                if w % 2 == 1 {
                    dst[w - 1] = r0[pairs] + r1[pairs] + r2[pairs] + b;
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

    /// Against candle's f32 convolution, for sizes that cut tiles (odd heights and widths),
    /// batches, one and many channels and several tasks per image.
    #[test]
    fn matches_candle_conv() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for &(batch, c_in, c_out, h, w) in &[
            (1, 1, 1, 4, 4),
            (2, 3, 5, 7, 9),
            (1, 8, 4, 33, 32),
            (2, 16, 24, 40, 41),
            (1, 64, 32, 64, 64),
        ] {
            let s = Shape { batch, c_in, c_out, h, w };
            let x = values(batch * c_in * h * w, 1);
            let weight = values(c_out * c_in * 9, 2);
            let bias = values(c_out, 3);
            let mut out = vec![f32::NAN; batch * c_out * h * w];
            // Safety: `out` has room for the whole output.
            unsafe { conv3x3(&x, &s, &weight, Some(&bias), out.as_mut_ptr()) };
            let theirs = candle_nn::Conv2d::new(
                Tensor::from_vec(weight, (c_out, c_in, 3, 3), &dev)?,
                Some(Tensor::from_vec(bias, c_out, &dev)?),
                candle_nn::Conv2dConfig { padding: 1, ..Default::default() },
            )
            .forward(&Tensor::from_vec(x, (batch, c_in, h, w), &dev)?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
            let diff = out.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "{batch} {c_in} {c_out} {h} {w}: {diff}");
        }
        Ok(())
    }

    /// Small calls (the UNet's 8x8 level) and rows too wide for a task's scratch stay on im2col.
    #[test]
    fn takes_large_enough_calls_only() {
        let shape = |batch, c, h, w| Shape { batch, c_in: c, c_out: c, h, w };
        assert!(fits(&shape(2, 1280, 16, 16)));
        assert!(!fits(&shape(2, 1280, 8, 8)));
        assert!(!fits(&shape(1, 1280, 16, 16)));
        // The VAE decoder's last blocks at 2048 px, and a 16384 px wide strip.
        assert!(fits(&shape(1, 128, 2048, 2048)));
        assert!(!fits(&shape(1, 128, 64, 16384)));
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
