//! `Conv2d` (NCHW, groups 1, dilation 1) as blocked im2col + GEMM.
//!
//! For each image and each block of output pixels, the `(C_in kh kw) x block` slice of the
//! im2col matrix is built in a per-task buffer (a few MiB, so it stays in L2) and multiplied by
//! the `[C_out, C_in kh kw]` weight straight into the output's columns. candle instead builds
//! the whole im2col matrix first: `kh kw` times the input, 1.2 GB for the last VAE block at
//! 512 px, written to memory and read back.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use half::bf16;
use rayon::prelude::*;

use super::blas::{gemm_bf16, gemm_f32, to_bf16_par, Operand, SendPtr};
use super::scratch::with_scratch;
use super::{param_dtype, task_count, use_cpu_kernels, with_slice};

#[derive(Debug, Clone, Copy, Default)]
pub struct Conv2dConfig {
    pub padding: usize,
    pub stride: usize,
}

#[derive(Debug, Clone)]
pub struct Conv2d {
    /// `[out, in, kh, kw]`, in the builder's dtype (bf16 for bf16 GEMMs on the CPU).
    weight: Tensor,
    /// `[out]`, in [`param_dtype`].
    bias: Option<Tensor>,
    cfg: Conv2dConfig,
}

pub fn conv2d(in_channels: usize, out_channels: usize, kernel: usize, cfg: Conv2dConfig, vb: VarBuilder) -> Result<Conv2d> {
    let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
    let bias = vb.get_with_hints_dtype(out_channels, "bias", Default::default(), param_dtype(&vb))?;
    Ok(Conv2d::new(weight, Some(bias), cfg))
}

/// Elements of one task's im2col block: 4 Mi (16 MiB in f32, 8 in bf16). Smaller blocks mean
/// more GEMM calls, each repacking the whole weight (measured: 1 Mi blocks and 4 tasks per
/// thread made the bf16 UNet step at 512 px 7.4 s instead of 5.9 s).
const BLOCK_ELEMS: usize = 4 << 20;

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    c_in: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    h_out: usize,
    w_out: usize,
}

impl Geometry {
    fn pixels(&self) -> usize {
        self.h_out * self.w_out
    }
    fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }
}

/// Writes the im2col rows for output pixels `p0 .. p0 + len` of one image: row `(ci, ky, kx)`
/// holds the input value each of those pixels sees through that kernel tap (0 in the padding).
/// Works along output rows: per row and tap, zeros left and right and one run of input in
/// between (a plain copy at stride 1).
fn im2col<T: Copy + Default>(x: &[T], g: &Geometry, p0: usize, len: usize, col: &mut [T]) {
    let (s, pad) = (g.stride as isize, g.pad as isize);
    let mut rows = col.chunks_exact_mut(len);
    for plane in x.chunks_exact(g.h * g.w).take(g.c_in) {
        for ky in 0..g.kh as isize {
            for kx in 0..g.kw as isize {
                let dst = rows.next().expect("im2col buffer holds c_in * kh * kw rows");
                // Output columns whose input column ox*s + kx - pad lies inside the image.
                let lo = ((pad - kx).max(0) as usize).div_ceil(g.stride);
                let hi = ((g.w as isize + pad - kx).max(0) as usize).div_ceil(g.stride).min(g.w_out);
                let mut j = 0;
                while j < len {
                    let (oy, ox0) = ((p0 + j) / g.w_out, (p0 + j) % g.w_out);
                    let run = (g.w_out - ox0).min(len - j);
                    let seg = &mut dst[j..j + run];
                    j += run;
                    let iy = oy as isize * s + ky - pad;
                    if iy < 0 || iy >= g.h as isize {
                        seg.fill(T::default());
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..][..g.w];
                    let a = lo.clamp(ox0, ox0 + run);
                    let b = hi.clamp(a, ox0 + run);
                    seg[..a - ox0].fill(T::default());
                    seg[b - ox0..].fill(T::default());
                    let first = (a as isize * s + kx - pad) as usize;
                    let inner = &mut seg[a - ox0..b - ox0];
                    if s == 1 {
                        inner.copy_from_slice(&src[first..first + inner.len()]);
                    } else {
                        for (i, d) in inner.iter_mut().enumerate() {
                            *d = src[first + i * g.stride];
                        }
                    }
                }
            }
        }
    }
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: Conv2dConfig) -> Self {
        let cfg = Conv2dConfig { stride: cfg.stride.max(1), ..cfg };
        Self { weight, bias, cfg }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    fn forward_cpu(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = xs.contiguous()?;
        let (batch, c_in, h, w) = xs.dims4()?;
        let (c_out, wc_in, kh, kw) = self.weight.dims4()?;
        if c_in != wc_in {
            candle_core::bail!("conv2d: input has {c_in} channels, the weight expects {wc_in}");
        }
        let (stride, pad) = (self.cfg.stride, self.cfg.padding);
        if h + 2 * pad < kh || w + 2 * pad < kw {
            candle_core::bail!("conv2d: input {h}x{w} (padding {pad}) smaller than the {kh}x{kw} kernel");
        }
        let g = Geometry { c_in, h, w, kh, kw, stride, pad, h_out: (h + 2 * pad - kh) / stride + 1, w_out: (w + 2 * pad - kw) / stride + 1 };
        let bias = match &self.bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        let mut out = vec![0f32; batch * c_out * g.pixels()];
        let plan = Plan::new(&g, batch, c_out, bias.as_deref(), SendPtr(out.as_mut_ptr()));
        let (k, pixels) = (g.k(), g.pixels());
        with_slice::<f32, _>(&xs, |x| match self.weight.dtype() {
            DType::BF16 => with_slice::<bf16, _>(&self.weight, |wt| {
                // Convert the input once, not once per kernel tap.
                let x16 = to_bf16_par(x);
                plan.run(&x16, |image, p0, len, beta, c| {
                    with_scratch(0, k * len, |col: &mut [bf16]| {
                        im2col(image, &g, p0, len, col);
                        // Safety: see `Plan::run`.
                        unsafe { gemm_bf16(c_out, len, k, Operand::new(wt, k), Operand::new(col, len), beta, c, pixels) };
                    })
                })
            }),
            _ => with_slice::<f32, _>(&self.weight, |wt| {
                let pointwise = kh == 1 && kw == 1 && stride == 1 && pad == 0;
                plan.run(x, |image, p0, len, beta, c| {
                    // Safety (both GEMMs): see `Plan::run`.
                    if pointwise {
                        unsafe { gemm_f32(c_out, len, k, Operand::new(wt, k), Operand::new(&image[p0..], pixels), beta, c, pixels) };
                    } else {
                        with_scratch(0, k * len, |col: &mut [f32]| {
                            im2col(image, &g, p0, len, col);
                            unsafe { gemm_f32(c_out, len, k, Operand::new(wt, k), Operand::new(col, len), beta, c, pixels) };
                        })
                    }
                })
            }),
        })??;
        Tensor::from_vec(out, (batch, c_out, g.h_out, g.w_out), &Device::Cpu)
    }
}

/// The parallel work of one convolution: tasks `(image, first output pixel)` of `block` pixels.
struct Plan<'a> {
    tasks: Vec<(usize, usize)>,
    block: usize,
    pixels: usize,
    image_len: usize,
    c_out: usize,
    bias: Option<&'a [f32]>,
    out: SendPtr<f32>,
}

impl<'a> Plan<'a> {
    fn new(g: &Geometry, batch: usize, c_out: usize, bias: Option<&'a [f32]>, out: SendPtr<f32>) -> Self {
        let pixels = g.pixels();
        // As many pixels per block as the im2col budget allows, and enough blocks to keep
        // every thread busy.
        let mut block = (BLOCK_ELEMS / g.k()).clamp(16, pixels.max(16));
        let wanted = task_count(batch * pixels.div_ceil(16));
        while block > 16 && batch * pixels.div_ceil(block) < wanted {
            block = block.div_ceil(2);
        }
        let tasks = (0..batch).flat_map(|b| (0..pixels).step_by(block).map(move |p0| (b, p0))).collect();
        Self { tasks, block, pixels, image_len: g.c_in * g.h * g.w, c_out, bias, out }
    }

    /// Runs `gemm(image, p0, len, beta, c)` for every task after writing the bias into its
    /// output block; `c` points at the task's first output element (row stride `pixels`).
    ///
    /// Safety of the GEMMs: task `(b, p0)` alone touches columns `p0 .. p0 + len` of image
    /// `b`'s output rows, and the output outlives the parallel loop.
    fn run<T: Sync>(&self, x: &[T], gemm: impl Fn(&[T], usize, usize, f32, *mut f32) + Sync) {
        self.tasks.par_iter().for_each(|&(b, p0)| {
            let len = self.block.min(self.pixels - p0);
            let image = &x[b * self.image_len..][..self.image_len];
            // Safety: inside `out` (b < batch, p0 < pixels); see above for exclusivity.
            let c = unsafe { self.out.get().add(b * self.c_out * self.pixels + p0) };
            let beta = match self.bias {
                Some(bias) => {
                    for (co, &v) in bias.iter().enumerate() {
                        // Safety: row `co` of this task's block.
                        unsafe { std::slice::from_raw_parts_mut(c.add(co * self.pixels), len) }.fill(v);
                    }
                    1.0
                }
                None => 0.0,
            };
            gemm(image, p0, len, beta, c);
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if use_cpu_kernels(xs, self.weight.dtype()) {
            return self.forward_cpu(xs);
        }
        let cfg = candle_nn::Conv2dConfig { padding: self.cfg.padding, stride: self.cfg.stride, ..Default::default() };
        candle_nn::Conv2d::new(self.weight.clone(), self.bias.clone(), cfg).forward(xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 9) % 2000) as f32 / 1000.0 - 1.0).collect()
    }

    /// Against candle's own convolution, for the shapes SD uses and odd ones.
    #[test]
    fn matches_candle_conv() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, ci, co, h, w, k, stride, pad) in &[
            (2, 5, 7, 9, 11, 3, 1, 1),
            (1, 4, 6, 10, 7, 3, 2, 0),
            (2, 3, 8, 8, 8, 3, 2, 1),
            (2, 16, 9, 13, 5, 1, 1, 0),
            (1, 3, 4, 40, 41, 3, 1, 1),
        ] {
            let x = Tensor::from_vec(values(b * ci * h * w, 1), (b, ci, h, w), &dev)?;
            let wt = Tensor::from_vec(values(co * ci * k * k, 2), (co, ci, k, k), &dev)?;
            let bias = Tensor::from_vec(values(co, 3), co, &dev)?;
            let cfg = Conv2dConfig { padding: pad, stride };
            let ours = Conv2d::new(wt.clone(), Some(bias.clone()), cfg).forward(&x)?;
            let theirs = candle_nn::Conv2d::new(wt, Some(bias), candle_nn::Conv2dConfig { padding: pad, stride, ..Default::default() }).forward(&x)?;
            assert_eq!(ours.dims(), theirs.dims());
            let diff = (ours - theirs)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "{b} {ci} {co} {h} {w} {k} {stride} {pad}: {diff}");
        }
        Ok(())
    }
}
