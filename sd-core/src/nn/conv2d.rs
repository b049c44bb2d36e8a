//! `Conv2d` (NCHW, groups 1, dilation 1) as blocked im2col + GEMM.
//!
//! For each image and each block of output pixels, the `(C_in kh kw) x block` slice of the
//! im2col matrix is built in a per-task buffer (a few MiB, so it stays in L2) and multiplied by
//! the `[C_out, C_in kh kw]` weight straight into the output's columns. candle instead builds
//! the whole im2col matrix first: `kh kw` times the input, 1.2 GB for the last VAE block at
//! 512 px, written to memory and read back.
//!
//! With bf16 weights on a CPU with AMX or AVX512_BF16, the weight is packed for [`packed`] once,
//! and each task's im2col rows (one 256-pixel panel) are interleaved straight into the packed
//! layout.
//!
//! 3x3 convolutions with stride 1 and padding 1 go to [`winograd`] instead (2.25x fewer
//! multiplications): in f32 when the call has enough output tiles, in bf16 always (the layer
//! keeps its filters transformed from load). There, [`Conv2d::forward_norm_silu`] also applies
//! the resnet's group norm and SiLU as it reads the input, and [`Conv2d::forward_upsampled`] the
//! upsampler's nearest-neighbour upsampling, instead of reading a normalised or upsampled copy.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use half::bf16;
use rayon::prelude::*;

use super::group_norm::GroupNorm;
use super::lora::{record, LoraLayer, LoraSlot};
use super::{param_dtype, task_count, use_cpu_kernels, winograd, Source};
use crate::cpu::bf16::{to_bf16, to_bf16_par, WeightValue};
use crate::cpu::blas::{gemm_bf16, gemm_f32, Operand, SendPtr};
use crate::cpu::packed;
use crate::cpu::{with_scratch, with_slice};
use crate::loading::{pack_into_cache, MappedF32, MappedHalf, PackedForm};

#[derive(Debug, Clone, Copy, Default)]
pub struct Conv2dConfig {
    pub padding: usize,
    pub stride: usize,
}

#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Weight,
    /// `[out]`, in [`param_dtype`].
    bias: Option<Tensor>,
    cfg: Conv2dConfig,
    lora: LoraSlot<Weight, Conv2d>,
}

pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let dims = (out_channels, in_channels, kernel, kernel);
    let weight = Source::get(&vb, dims, "weight", packed_form(dims, cfg))?;
    let bias =
        vb.get_with_hints_dtype(out_channels, "bias", Default::default(), param_dtype(&vb))?;
    let conv = Conv2d::from_source(weight, Some(bias), cfg)?;
    record(vb.prefix(), || LoraLayer::Conv2d(conv.clone()));
    Ok(conv)
}

/// How a bf16 layer of weight `dims` packs it: Winograd's 16 transformed operands
/// `[out, in]`, or one `[out, in kh kw]` for im2col.
fn packed_form(dims: (usize, usize, usize, usize), cfg: Conv2dConfig) -> PackedForm {
    let (c_out, c_in, kh, kw) = dims;
    match winograd::takes((kh, kw), cfg.stride.max(1), cfg.padding) {
        true => PackedForm { operands: winograd::XI, outer: c_out, k: c_in },
        false => PackedForm { operands: 1, outer: c_out, k: c_in * kh * kw },
    }
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
fn im2col<T: Copy + Default>(x: &[T], g: &Geometry, p0: usize, len: usize, col: &mut [T]) {
    for (tap, row) in col.chunks_exact_mut(len).take(g.k()).enumerate() {
        im2col_row(x, g, p0, tap, row);
    }
}

/// One im2col row: kernel tap `tap = (ci kh + ky) kw + kx` for output pixels `p0 ..
/// p0 + dst.len()`. Works along output rows: per row, zeros left and right and one run of
/// input in between (a plain copy at stride 1).
fn im2col_row<T: Copy + Default>(x: &[T], g: &Geometry, p0: usize, tap: usize, dst: &mut [T]) {
    let (s, pad) = (g.stride as isize, g.pad as isize);
    let (ci, ky, kx) = (tap / (g.kh * g.kw), (tap / g.kw % g.kh) as isize, (tap % g.kw) as isize);
    let plane = &x[ci * g.h * g.w..][..g.h * g.w];
    // Output columns whose input column ox*s + kx - pad lies inside the image.
    let lo = ((pad - kx).max(0) as usize).div_ceil(g.stride);
    let hi = ((g.w as isize + pad - kx).max(0) as usize).div_ceil(g.stride).min(g.w_out);
    let len = dst.len();
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

#[derive(Debug, Clone)]
pub(crate) enum Weight {
    /// `[out, in, kh, kw]`, in the builder's dtype (bf16 for bf16 GEMMs on the CPU).
    Dense(Tensor),
    /// `[out, in, kh, kw]` f32 values read in place from the mapped weight file.
    Mapped { values: MappedF32, dims: (usize, usize, usize, usize) },
    /// A bf16 CPU weight packed once for the packed bf16 GEMM, as the A operand `[out, in kh kw]`.
    Packed { weight: Arc<packed::Packed>, dims: (usize, usize, usize, usize) },
    /// A bf16 CPU 3x3 (stride 1, padding 1) weight transformed for Winograd and packed once.
    Winograd(Arc<winograd::PackedFilters>),
}

impl Weight {
    /// A bf16 weight on a CPU with AMX or AVX512_BF16 is packed (from the mapped f32 values
    /// where the loader has them): transformed for Winograd where the layer is a 3x3 one with
    /// stride 1 and padding 1 and [`winograd::enabled`], else for im2col. Mapped f32 values are
    /// used in place.
    fn new(source: Source, cfg: Conv2dConfig) -> Result<Self> {
        let packs = source.packs();
        Ok(match source {
            Source::Cached { operands, shape } => {
                match <[packed::Packed; winograd::XI]>::try_from(operands) {
                    Ok(u) => Weight::Winograd(Arc::new(winograd::PackedFilters::from_operands(u))),
                    Err(mut one) => {
                        Weight::Packed { weight: Arc::new(one.remove(0)), dims: shape.dims4()? }
                    }
                }
            }
            Source::Mapped { values, shape, .. } if packs => {
                let weight = Weight::pack(&values, Some(values.name()), shape.dims4()?, cfg);
                values.release();
                weight
            }
            Source::Mapped { values, shape, dtype: DType::F32 } => {
                Weight::Mapped { values, dims: shape.dims4()? }
            }
            Source::MappedHalf { values, shape } => {
                let (dims, name) = (shape.dims4()?, Some(values.name()));
                let weight = match &values {
                    MappedHalf::F16(w) => Weight::pack(w, name, dims, cfg),
                    MappedHalf::Bf16(w) => Weight::pack(w, name, dims, cfg),
                };
                values.release();
                weight
            }
            source @ Source::Mapped { .. } => {
                Weight::new(Source::Tensor(source.into_tensor()?, None), cfg)?
            }
            Source::Tensor(weight, name) if packs => {
                let dims = weight.dims4()?;
                let weight = weight.to_dtype(DType::BF16)?.contiguous()?;
                with_slice::<bf16, _>(&weight, |w| Weight::pack(w, name.as_deref(), dims, cfg))?
            }
            Source::Tensor(weight, _) => Weight::Dense(weight),
        })
    }

    /// The packed form of weight `w` (`dims`; f32, f16 or bf16 values, rounded to bf16 as they
    /// are packed), also written to the packed-weight cache as the loader's weight `name`.
    fn pack<S: WeightValue>(
        w: &[S],
        name: Option<&str>,
        dims: (usize, usize, usize, usize),
        cfg: Conv2dConfig,
    ) -> Self {
        let (c_out, c_in, kh, kw) = dims;
        if winograd::takes((kh, kw), cfg.stride, cfg.padding) {
            let u = pack_into_cache(name, || {
                winograd::PackedFilters::new(w, c_out, c_in).into_operands()
            });
            return Weight::Winograd(Arc::new(winograd::PackedFilters::from_operands(u)));
        }
        let k = c_in * kh * kw;
        let [packed] = pack_into_cache(name, || [packed::Packed::a_from_rows(w, c_out, k)]);
        Weight::Packed { weight: Arc::new(packed), dims }
    }

    fn dims(&self) -> Result<(usize, usize, usize, usize)> {
        match self {
            Weight::Dense(w) => w.dims4(),
            Weight::Mapped { dims, .. } | Weight::Packed { dims, .. } => Ok(*dims),
            Weight::Winograd(f) => Ok((f.c_out, f.c_in, 3, 3)),
        }
    }

    /// `[out, in, kh, kw]` as a tensor of the layer's dtype.
    fn tensor(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Mapped { values, dims } => Tensor::from_slice(values, *dims, &Device::Cpu),
            Weight::Packed { weight, dims } => {
                Tensor::from_vec(weight.unpack_a_rows(), *dims, &Device::Cpu)
            }
            Weight::Winograd(f) => {
                Tensor::from_vec(f.filters(), self.dims()?, &Device::Cpu)?.to_dtype(DType::BF16)
            }
        }
    }
}

impl Conv2d {
    /// A bf16 weight on a CPU with AMX or AVX512_BF16 is packed here (and the tensor dropped).
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: Conv2dConfig) -> Result<Self> {
        Self::from_source(Source::Tensor(weight, None), bias, cfg)
    }

    fn from_source(weight: Source, bias: Option<Tensor>, cfg: Conv2dConfig) -> Result<Self> {
        let cfg = Conv2dConfig { stride: cfg.stride.max(1), ..cfg };
        Ok(Self { weight: Weight::new(weight, cfg)?, bias, cfg, lora: LoraSlot::default() })
    }

    /// `(out, in, kh, kw)`.
    pub fn dims(&self) -> Result<(usize, usize, usize, usize)> {
        self.weight.dims()
    }

    pub fn config(&self) -> Conv2dConfig {
        self.cfg
    }

    /// How the layer holds its weight: `dense`, `mapped`, `packed` or `winograd` (for tests).
    #[cfg(test)]
    pub(crate) fn weight_kind(&self) -> &'static str {
        match self.weight {
            Weight::Dense(_) => "dense",
            Weight::Mapped { .. } => "mapped",
            Weight::Packed { .. } => "packed",
            Weight::Winograd(_) => "winograd",
        }
    }

    /// The layer's LoRA state (see [`super::lora`]).
    pub(crate) fn lora(&self) -> &LoraSlot<Weight, Conv2d> {
        &self.lora
    }

    /// The layer's own weight plus `delta` (`[out, in kh kw]`, f32), for fusing LoRAs: summed in
    /// f32, stored in the layer's dtype and packed as the layer's own weight is.
    pub(crate) fn weight_plus(&self, delta: &Tensor) -> Result<Weight> {
        let own = self.weight.tensor()?;
        let delta = delta.reshape(own.shape())?;
        let fused = (own.to_dtype(DType::F32)? + delta)?.to_dtype(own.dtype())?;
        Weight::new(Source::Tensor(fused, None), self.cfg)
    }

    fn forward_weight(&self, weight: &Weight, xs: &Tensor) -> Result<Tensor> {
        let mapped;
        let weight = match weight {
            Weight::Dense(w) if !use_cpu_kernels(xs, w.dtype()) => w,
            Weight::Mapped { .. } if !use_cpu_kernels(xs, DType::F32) => {
                mapped = weight.tensor()?;
                &mapped
            }
            Weight::Packed { .. } | Weight::Winograd(_) if !use_cpu_kernels(xs, DType::BF16) => {
                candle_core::bail!("conv2d: weights packed for the CPU's bf16 GEMM take f32 CPU inputs, got {:?} on {:?}", xs.dtype(), xs.device())
            }
            _ => return self.forward_cpu(weight, xs, winograd::InputMap::Plain),
        };
        let cfg = candle_nn::Conv2dConfig {
            padding: self.cfg.padding,
            stride: self.cfg.stride,
            ..Default::default()
        };
        candle_nn::Conv2d::new(weight.clone(), self.bias.clone(), cfg).forward(xs)
    }

    /// `self.forward(&norm.forward_silu(xs))`: the resnet's `conv(silu(group_norm(x)))`. Where
    /// the convolution runs on [`winograd`] (and no unfused LoRA reads the normalised input),
    /// the norm and SiLU are applied as the input is read, so no normalised copy of `xs` is made
    /// (a full-size tensor); the output is the same, bit for bit.
    pub fn forward_norm_silu(&self, norm: &GroupNorm, xs: &Tensor) -> Result<Tensor> {
        let lora = self.lora.read();
        let weight = lora.fused.as_ref().unwrap_or(&self.weight);
        if !lora.adds_terms() && self.runs_winograd(weight, xs, winograd::InputMap::Plain)? {
            if let Some(affine) = norm.channel_affine(xs)? {
                return self.forward_cpu(weight, xs, winograd::InputMap::NormSilu(&affine));
            }
        }
        drop(lora);
        self.forward(&norm.forward_silu(xs)?)
    }

    /// `self.forward(&xs.upsample_nearest2d(2 h, 2 w))`: an upsampler's convolution. Where it
    /// runs on [`winograd`] (and no unfused LoRA reads the upsampled input), the upsampling is
    /// read inside the input transform, so the upsampled copy of `xs` (4x its size) is never
    /// made; the output is the same, bit for bit.
    pub fn forward_upsampled(&self, xs: &Tensor) -> Result<Tensor> {
        let lora = self.lora.read();
        let weight = lora.fused.as_ref().unwrap_or(&self.weight);
        let input = winograd::InputMap::Nearest2x;
        if !lora.adds_terms() && self.runs_winograd(weight, xs, input)? {
            return self.forward_cpu(weight, xs, input);
        }
        drop(lora);
        let (_, _, h, w) = xs.dims4()?;
        self.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)
    }

    /// Whether [`Self::forward_cpu`] runs `xs`, read as `input` says (its upsampling is what
    /// matters here), on one of the [`winograd`] paths.
    fn runs_winograd(
        &self,
        weight: &Weight,
        xs: &Tensor,
        input: winograd::InputMap,
    ) -> Result<bool> {
        let on_cpu = match weight {
            Weight::Dense(w) => use_cpu_kernels(xs, w.dtype()),
            Weight::Mapped { .. } => use_cpu_kernels(xs, DType::F32),
            Weight::Packed { .. } | Weight::Winograd(_) => use_cpu_kernels(xs, DType::BF16),
        };
        let (Ok((batch, c_in, h, w)), Ok((c_out, _, kh, kw))) = (xs.dims4(), weight.dims()) else {
            return Ok(false);
        };
        let up = input.upsampling();
        let shape = winograd::Shape { batch, c_in, c_out, h: up * h, w: up * w };
        Ok(on_cpu && on_winograd(weight, (kh, kw), self.cfg, &shape))
    }

    /// The convolution on the CPU kernels, of `xs` as `input` says (anything but
    /// [`winograd::InputMap::Plain`] only where [`on_winograd`]).
    fn forward_cpu(
        &self,
        weight: &Weight,
        xs: &Tensor,
        input: winograd::InputMap,
    ) -> Result<Tensor> {
        let xs = xs.contiguous()?;
        let (batch, c_in, h, w) = xs.dims4()?;
        // The convolution's input is `xs` upsampled where `input` says so.
        let (h, w) = (input.upsampling() * h, input.upsampling() * w);
        let (c_out, wc_in, kh, kw) = weight.dims()?;
        if c_in != wc_in {
            candle_core::bail!("conv2d: input has {c_in} channels, the weight expects {wc_in}");
        }
        let (stride, pad) = (self.cfg.stride, self.cfg.padding);
        if h + 2 * pad < kh || w + 2 * pad < kw {
            candle_core::bail!(
                "conv2d: input {h}x{w} (padding {pad}) smaller than the {kh}x{kw} kernel"
            );
        }
        let g = Geometry {
            c_in,
            h,
            w,
            kh,
            kw,
            stride,
            pad,
            h_out: (h + 2 * pad - kh) / stride + 1,
            w_out: (w + 2 * pad - kw) / stride + 1,
        };
        let bias = match &self.bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        let (k, pixels) = (g.k(), g.pixels());
        let shape = winograd::Shape { batch, c_in, c_out, h, w };
        let winograd = on_winograd(weight, (kh, kw), self.cfg, &shape);
        if !winograd && !matches!(input, winograd::InputMap::Plain) {
            candle_core::bail!(
                "conv2d: a normalised or upsampled input is read on the Winograd path only"
            );
        }
        // Every element is written by the tasks below (bias or GEMM); the length is set after.
        let len = batch * c_out * pixels;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        match weight {
            Weight::Winograd(filters) => {
                let bias = bias.as_deref();
                // Safety: `out` has room for the whole output, written only here; the filters
                // were packed, so the packed kernel runs.
                with_slice::<f32, _>(&xs, |x| unsafe {
                    winograd::conv3x3_bf16(x, input, &shape, filters, bias, out.as_mut_ptr())
                })?;
            }
            Weight::Packed { weight, .. } => {
                // One panel of columns per task: the packed block then stays in L2, and the
                // weight is read once per panel whatever the block size.
                let plan = Plan::new(
                    &g,
                    batch,
                    c_out,
                    None,
                    (packed::BLOCK, packed::PANEL),
                    SendPtr(out.as_mut_ptr()),
                );
                let bias = bias.as_deref().map_or(packed::Bias::None, packed::Bias::Rows);
                // The task's `len` output pixels from `p0` on: their `k` im2col rows, made by
                // `row(tap, dst)`, packed and multiplied into `c`.
                let task = |len: usize, c: *mut f32, row: &dyn Fn(usize, &mut [bf16])| {
                    let cols = packed::packed_len(len, k);
                    with_scratch(1, cols + 32, |buf: &mut [bf16]| {
                        let cols = packed::aligned(buf, cols);
                        packed::pack_b_rows(len, k, cols, row);
                        // Safety: a packed kernel runs here (the weight was packed); see
                        // `Plan::run`.
                        unsafe {
                            packed::gemm(weight.as_slice(), c_out, cols, len, k, bias, c, pixels)
                        };
                    })
                };
                let pointwise = kh == 1 && kw == 1 && stride == 1 && pad == 0;
                with_slice::<f32, _>(&xs, |x| {
                    if pointwise {
                        // Each input value is read once (one tap): rounded as it is packed,
                        // without a bf16 copy of the whole input (0.3 GB at the VAE's last
                        // level at 768 px).
                        plan.run(x, |image, p0, len, _, c| {
                            task(len, c, &|ci, row| to_bf16(&image[ci * pixels + p0..][..len], row))
                        })
                    } else {
                        // Converted once, not once per kernel tap.
                        let x16 = to_bf16_par(x);
                        plan.run(&x16, |image, p0, len, _, c| {
                            task(len, c, &|tap, row| im2col_row(image, &g, p0, tap, row))
                        })
                    }
                })?
            }
            Weight::Dense(_) | Weight::Mapped { .. } if winograd => {
                let bias = bias.as_deref();
                with_slice::<f32, _>(&xs, |x| match weight {
                    Weight::Mapped { values, .. } => {
                        // Safety: `out` has room for the whole output, written only here.
                        let out = out.as_mut_ptr();
                        unsafe { winograd::conv3x3(x, input, &shape, values, bias, out) };
                        Ok(())
                    }
                    Weight::Dense(dense) => with_slice::<f32, _>(dense, |wt| {
                        // Safety: as above.
                        unsafe { winograd::conv3x3(x, input, &shape, wt, bias, out.as_mut_ptr()) }
                    }),
                    Weight::Packed { .. } | Weight::Winograd(_) => unreachable!("handled above"),
                })??;
            }
            Weight::Dense(_) | Weight::Mapped { .. } => {
                let plan = Plan::new(
                    &g,
                    batch,
                    c_out,
                    bias.as_deref(),
                    (1, usize::MAX),
                    SendPtr(out.as_mut_ptr()),
                );
                let pointwise = kh == 1 && kw == 1 && stride == 1 && pad == 0;
                with_slice::<f32, _>(&xs, |x| match weight {
                    Weight::Mapped { values, .. } => {
                        plan.run_f32(x, values, &g, pointwise);
                        Ok(())
                    }
                    Weight::Dense(dense) if dense.dtype() == DType::BF16 => {
                        with_slice::<bf16, _>(dense, |wt| {
                            // Convert the input once, not once per kernel tap.
                            let x16 = to_bf16_par(x);
                            plan.run(&x16, |image, p0, len, beta, c| {
                                with_scratch(0, k * len, |col: &mut [bf16]| {
                                    im2col(image, &g, p0, len, col);
                                    // Safety: see `Plan::run`.
                                    unsafe {
                                        gemm_bf16(
                                            c_out,
                                            len,
                                            k,
                                            Operand::new(wt, k),
                                            Operand::new(col, len),
                                            beta,
                                            c,
                                            pixels,
                                        )
                                    };
                                })
                            })
                        })
                    }
                    Weight::Dense(dense) => {
                        with_slice::<f32, _>(dense, |wt| plan.run_f32(x, wt, &g, pointwise))
                    }
                    Weight::Packed { .. } | Weight::Winograd(_) => unreachable!("handled above"),
                })??;
            }
        }
        // Safety: the tasks covered every pixel of every channel of every image.
        unsafe { out.set_len(len) };
        Tensor::from_vec(out, (batch, c_out, g.h_out, g.w_out), &Device::Cpu)
    }
}

/// Whether [`Conv2d::forward_cpu`] runs a call of this shape on [`winograd`]: always with filters
/// transformed at load (bf16), and for f32 weights where [`winograd::applies`]. Dense bf16
/// weights (MKL's bf16 GEMM) and packed ones stay on im2col.
fn on_winograd(
    weight: &Weight,
    kernel: (usize, usize),
    cfg: Conv2dConfig,
    shape: &winograd::Shape,
) -> bool {
    match weight {
        Weight::Winograd(_) => true,
        Weight::Packed { .. } => false,
        Weight::Dense(w) if w.dtype() != DType::F32 => false,
        Weight::Dense(_) | Weight::Mapped { .. } => {
            winograd::applies(kernel, cfg.stride, cfg.padding, shape)
        }
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
    /// The f32 convolution: `[c_out, k]` weight `wt` times each block's im2col columns, or
    /// times the input pixels themselves for a `pointwise` (1x1, stride 1, no padding) kernel.
    fn run_f32(&self, x: &[f32], wt: &[f32], g: &Geometry, pointwise: bool) {
        let (k, pixels) = (g.k(), g.pixels());
        self.run(x, |image, p0, len, beta, c| {
            // Safety (both GEMMs): see `Plan::run`.
            if pointwise {
                unsafe {
                    gemm_f32(
                        self.c_out,
                        len,
                        k,
                        Operand::new(wt, k),
                        Operand::new(&image[p0..], pixels),
                        beta,
                        c,
                        pixels,
                    )
                };
            } else {
                with_scratch(0, k * len, |col: &mut [f32]| {
                    im2col(image, g, p0, len, col);
                    unsafe {
                        gemm_f32(
                            self.c_out,
                            len,
                            k,
                            Operand::new(wt, k),
                            Operand::new(col, len),
                            beta,
                            c,
                            pixels,
                        )
                    };
                })
            }
        })
    }

    /// Blocks of at most `max_block` pixels (and `BLOCK_ELEMS` im2col elements), a multiple
    /// of `align` but the last of an image, for GEMMs that work in blocks of columns. With
    /// `bias`, `run` writes it into the output before the GEMM.
    fn new(
        g: &Geometry,
        batch: usize,
        c_out: usize,
        bias: Option<&'a [f32]>,
        (align, max_block): (usize, usize),
        out: SendPtr<f32>,
    ) -> Self {
        let pixels = g.pixels();
        let min = align.max(16);
        // As many pixels per block as the im2col budget allows, and enough blocks to keep
        // every thread busy.
        let mut block = (BLOCK_ELEMS / g.k()).min(max_block).clamp(min, pixels.max(min));
        let wanted = task_count(batch * pixels.div_ceil(min));
        while block > min && batch * pixels.div_ceil(block) < wanted {
            block = block.div_ceil(2);
        }
        let block = block.next_multiple_of(align);
        let tasks =
            (0..batch).flat_map(|b| (0..pixels).step_by(block).map(move |p0| (b, p0))).collect();
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
                        unsafe { std::slice::from_raw_parts_mut(c.add(co * self.pixels), len) }
                            .fill(v);
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
        let lora = self.lora.read();
        let ys = self.forward_weight(lora.fused.as_ref().unwrap_or(&self.weight), xs)?;
        lora.add_terms(xs, ys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_values::{bf16_gemms, same_bits, values};

    /// `(batch, c_in, c_out, h, w, kernel, stride, pad)`.
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

    /// Our convolution with weights of `dtype` against candle's f32 one on the same values:
    /// for bf16 the input and weight are rounded to bf16 first, so the products are exact in
    /// f32 and only the summation order differs.
    fn check_against_candle(cases: &[Case], dtype: DType) -> Result<()> {
        let dev = Device::Cpu;
        for &(b, ci, co, h, w, k, stride, pad) in cases {
            let round = |t: Tensor| {
                if dtype == DType::F32 {
                    Ok(t)
                } else {
                    t.to_dtype(dtype)?.to_dtype(DType::F32)
                }
            };
            let x = round(Tensor::from_vec(values(b * ci * h * w, 1), (b, ci, h, w), &dev)?)?;
            let wt = Tensor::from_vec(values(co * ci * k * k, 2), (co, ci, k, k), &dev)?
                .to_dtype(dtype)?;
            let bias = Tensor::from_vec(values(co, 3), co, &dev)?;
            let cfg = Conv2dConfig { padding: pad, stride };
            let ours = Conv2d::new(wt.clone(), Some(bias.clone()), cfg)?.forward(&x)?;
            let theirs = candle_nn::Conv2d::new(
                wt.to_dtype(DType::F32)?,
                Some(bias),
                candle_nn::Conv2dConfig { padding: pad, stride, ..Default::default() },
            )
            .forward(&x)?;
            assert_eq!(ours.dims(), theirs.dims());
            let diff = (ours - theirs)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "{dtype:?} {b} {ci} {co} {h} {w} {k} {stride} {pad}: {diff}");
        }
        Ok(())
    }

    /// Against candle's own convolution, for the shapes SD uses and odd ones.
    #[test]
    fn matches_candle_conv() -> Result<()> {
        let cases = [
            (2, 5, 7, 9, 11, 3, 1, 1),
            (1, 4, 6, 10, 7, 3, 2, 0),
            (2, 3, 8, 8, 8, 3, 2, 1),
            (2, 16, 9, 13, 5, 1, 1, 0),
            (1, 3, 4, 40, 41, 3, 1, 1),
        ];
        check_against_candle(&cases, DType::F32)
    }

    /// bf16 weights on im2col (the packed kernel where the CPU has one, else MKL). Shapes cut the
    /// packed blocks in every dimension (channels, pixels, k), with strides, padding and 1x1.
    /// (3x3 layers with stride 1 and padding 1 go to Winograd, tested in [`winograd`].)
    #[test]
    fn bf16_weights_match_rounded_f32() -> Result<()> {
        if !bf16_gemms() {
            return Ok(());
        }
        let cases = [
            (2, 5, 7, 9, 11, 3, 1, 0),
            (1, 40, 64, 16, 16, 3, 1, 2),
            (2, 36, 96, 13, 9, 3, 2, 1),
            (1, 64, 33, 20, 20, 1, 1, 0),
            (2, 32, 32, 24, 24, 3, 2, 0),
        ];
        check_against_candle(&cases, DType::BF16)
    }

    /// `forward_norm_silu` gives `forward(silu(norm(x)))` bit for bit: where the norm is read on
    /// the way into the Winograd paths (f32 with enough tiles; bf16 with its tasks cut by tiles
    /// and, for small calls, by output channel), and where it falls back to the normalised copy
    /// (f32 calls with few tiles, 1x1 and strided layers, and a layer with an unfused LoRA term,
    /// which reads the normalised input too). Odd sizes cover the clipped edge tiles.
    #[test]
    fn norm_read_on_the_way_in_matches_the_normalised_copy() -> Result<()> {
        let dev = Device::Cpu;
        let (c_in, c_out, groups) = (8, 6, 4);
        let norm = {
            let gamma = Tensor::from_vec(values(c_in, 11), c_in, &dev)?;
            let beta = Tensor::from_vec(values(c_in, 12), c_in, &dev)?;
            let tensors = [("weight".to_string(), gamma), ("bias".to_string(), beta)];
            let vb = VarBuilder::from_tensors(tensors.into_iter().collect(), DType::F32, &dev);
            super::super::group_norm(groups, c_in, 1e-6, vb)?
        };
        // (batch, h, w, kernel, stride, pad, the call runs on Winograd in f32)
        let cases = [
            (2, 24, 24, 3, 1, 1, true),
            (1, 45, 37, 3, 1, 1, true),
            (2, 6, 7, 3, 1, 1, false),
            (2, 24, 24, 1, 1, 0, false),
            (2, 24, 24, 3, 2, 1, false),
        ];
        for dtype in winograd_dtypes() {
            for &(b, h, w, k, stride, pad, f32_winograd) in &cases {
                // Per-image offsets, so each image has its own statistics.
                let offsets =
                    Tensor::from_vec(vec![0.5f32, -2.0][..b].to_vec(), (b, 1, 1, 1), &dev)?;
                let x = Tensor::from_vec(values(b * c_in * h * w, 13), (b, c_in, h, w), &dev)?
                    .broadcast_add(&offsets)?;
                let wt =
                    Tensor::from_vec(values(c_out * c_in * k * k, 14), (c_out, c_in, k, k), &dev)?
                        .to_dtype(dtype)?;
                let bias = Tensor::from_vec(values(c_out, 15), c_out, &dev)?;
                let conv = Conv2d::new(wt, Some(bias), Conv2dConfig { padding: pad, stride })?;
                let fused = conv.runs_winograd(&conv.weight, &x, winograd::InputMap::Plain)?;
                let expected_fused =
                    if dtype == DType::F32 { f32_winograd } else { k == 3 && stride == 1 };
                assert_eq!(fused, expected_fused, "{dtype:?} {b}x{h}x{w} k{k} s{stride}");
                let expected = conv.forward(&norm.forward_silu(&x)?)?;
                let ours = conv.forward_norm_silu(&norm, &x)?;
                same_bits(&ours, &expected, &format!("{dtype:?} {b}x{h}x{w} k{k} s{stride}"))?;
            }
        }
        // An unfused LoRA term reads the normalised input: the same result as the copy.
        let conv = conv_with_lora_term(c_in, c_out)?;
        let x = Tensor::from_vec(values(2 * c_in * 24 * 24, 19), (2, c_in, 24, 24), &dev)?;
        let normalised = norm.forward_silu(&x)?;
        let expected = conv.forward(&normalised)?;
        let without = conv.forward_weight(&conv.weight, &normalised)?;
        assert!(same_bits(&without, &expected, "").is_err(), "the LoRA term adds nothing");
        same_bits(&conv.forward_norm_silu(&norm, &x)?, &expected, "with an unfused LoRA")
    }

    /// `forward_upsampled` gives `forward(upsample_nearest2d(x, 2h, 2w))` bit for bit: where the
    /// upsampling is read inside the Winograd input transform (odd source sizes included), and
    /// where it falls back to the upsampled copy (f32 calls with few tiles, strided layers, an
    /// unfused LoRA term).
    #[test]
    fn upsampling_read_on_the_way_in_matches_the_upsampled_copy() -> Result<()> {
        let dev = Device::Cpu;
        let (c_in, c_out) = (8, 6);
        // (batch, source h, source w, stride, the call runs on Winograd in f32)
        let cases = [
            (2, 12, 12, 1, true),
            (1, 23, 19, 1, true),
            (1, 7, 9, 1, false),
            (2, 12, 12, 2, false),
        ];
        for dtype in winograd_dtypes() {
            for &(b, h, w, stride, f32_winograd) in &cases {
                let x = Tensor::from_vec(values(b * c_in * h * w, 21), (b, c_in, h, w), &dev)?;
                let wt = Tensor::from_vec(values(c_out * c_in * 9, 22), (c_out, c_in, 3, 3), &dev)?
                    .to_dtype(dtype)?;
                let bias = Tensor::from_vec(values(c_out, 23), c_out, &dev)?;
                let conv = Conv2d::new(wt, Some(bias), Conv2dConfig { padding: 1, stride })?;
                let what = format!("{dtype:?} {b}x{h}x{w} s{stride}");
                let fused = conv.runs_winograd(&conv.weight, &x, winograd::InputMap::Nearest2x)?;
                let expected_fused = if dtype == DType::F32 { f32_winograd } else { stride == 1 };
                assert_eq!(fused, expected_fused, "{what}");
                let expected = conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
                same_bits(&conv.forward_upsampled(&x)?, &expected, &what)?;
            }
        }
        let conv = conv_with_lora_term(c_in, c_out)?;
        let x = Tensor::from_vec(values(2 * c_in * 12 * 12, 24), (2, c_in, 12, 12), &dev)?;
        let expected = conv.forward(&x.upsample_nearest2d(24, 24)?)?;
        same_bits(&conv.forward_upsampled(&x)?, &expected, "with an unfused LoRA")
    }

    /// f32, and bf16 where its Winograd path runs here (packed kernels, Winograd switched on).
    fn winograd_dtypes() -> Vec<DType> {
        if packed::available() && winograd::enabled() {
            vec![DType::F32, DType::BF16]
        } else {
            eprintln!("bf16 cases skipped: they need the packed bf16 GEMM and Winograd");
            vec![DType::F32]
        }
    }

    /// A 3x3 f32 layer with one active, unfused LoRA term (which reads the layer's input).
    fn conv_with_lora_term(c_in: usize, c_out: usize) -> Result<Conv2d> {
        let dev = Device::Cpu;
        let same = Conv2dConfig { padding: 1, stride: 1 };
        let wt = Tensor::from_vec(values(c_out * c_in * 9, 16), (c_out, c_in, 3, 3), &dev)?;
        let conv = Conv2d::new(wt, None, same)?;
        let down = Tensor::from_vec(values(2 * c_in * 9, 17), (2, c_in, 3, 3), &dev)?;
        let up = Tensor::from_vec(values(c_out * 2, 18), (c_out, 2, 1, 1), &dev)?;
        conv.lora().write().terms.push(super::super::lora::LowRank {
            adapter: std::sync::Arc::from("a"),
            down: Conv2d::new(down.clone(), None, same)?,
            up: Conv2d::new(up.clone(), None, Conv2dConfig::default())?,
            matrices: (up.reshape((c_out, 2))?, down.reshape((2, c_in * 9))?),
            scale: 1.0,
            factor: 0.5,
        });
        Ok(conv)
    }

    /// bf16 3x3 layers with stride 1 and padding 1 hold their weight transformed for Winograd
    /// where the packed kernels run (and it is not switched off), and their filters come back
    /// for LoRA fusing: a fused layer gives what a layer of the summed weight gives, within bf16
    /// rounding.
    #[test]
    fn bf16_3x3_layers_keep_winograd_filters() -> Result<()> {
        if !packed::available() || !winograd::enabled() {
            eprintln!("skipped: needs the packed bf16 GEMM and Winograd switched on");
            return Ok(());
        }
        let dev = Device::Cpu;
        let wt =
            Tensor::from_vec(values(6 * 4 * 9, 2), (6, 4, 3, 3), &dev)?.to_dtype(DType::BF16)?;
        let same = Conv2dConfig { padding: 1, stride: 1 };
        let conv = Conv2d::new(wt.clone(), None, same)?;
        assert_eq!(conv.weight_kind(), "winograd");
        assert_eq!(conv.dims()?, (6, 4, 3, 3));
        let back = conv.weight.tensor()?.to_dtype(DType::F32)?;
        let diff = (back - wt.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?;
        assert!(diff.to_scalar::<f32>()? <= 4.0 / 256.0);
        // A LoRA fused into it: the filters recovered, plus the delta, transformed again.
        let delta = (Tensor::from_vec(values(6 * 36, 5), (6, 36), &dev)? * 0.1)?;
        let fused = conv.weight_plus(&delta)?;
        assert!(matches!(fused, Weight::Winograd(_)));
        let x = Tensor::from_vec(values(2 * 4 * 5 * 7, 6), (2, 4, 5, 7), &dev)?;
        let sum = (wt.to_dtype(DType::F32)? + delta.reshape((6, 4, 3, 3))?)?;
        let expected = Conv2d::new(sum.to_dtype(DType::BF16)?, None, same)?.forward(&x)?;
        let diff = (conv.forward_weight(&fused, &x)? - &expected)?.abs()?.flatten_all()?;
        let scale = expected.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let diff = diff.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 0.02 * scale, "fused LoRA: {diff} (outputs up to {scale})");
        let strided = Conv2d::new(wt, None, Conv2dConfig { padding: 1, stride: 2 })?;
        assert_eq!(strided.weight_kind(), "packed");
        Ok(())
    }
}
