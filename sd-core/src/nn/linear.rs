//! `Linear`: `y = x W^T + b` over the last dimension.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use half::bf16;
use rayon::prelude::*;

use super::lora::{record, LoraLayer, LoraSlot};
use super::{param_dtype, task_count, use_cpu_kernels, Source};
use crate::cpu::bf16::to_bf16;
use crate::cpu::blas::{cpu_gemm, gemm_bf16, gemm_f32, CpuGemm, Operand};
use crate::cpu::packed;
use crate::cpu::{with_scratch, with_slice};
use crate::loading::{pack_into_cache, MappedF32, MappedHalf, PackedForm};

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    /// `[out]`, in [`param_dtype`].
    bias: Option<Tensor>,
    lora: LoraSlot<Weight, Linear>,
}

#[derive(Debug, Clone)]
pub(crate) enum Weight {
    /// `[out, in]`, in the builder's dtype: on other devices, and bf16 for MKL's bf16 GEMM.
    Dense(Tensor),
    /// An f32 CPU weight.
    F32(F32Weight),
    /// A bf16 CPU weight packed once for the packed bf16 GEMM, as the B operand `W^T`.
    Packed(Arc<packed::Packed>),
}

/// An f32 CPU weight `[out, in]`, read in place from the mapped file where it came from one.
///
/// The builtin GEMM multiplies `x W^T` with `W^T` as its B operand, which it packs per call:
/// from `[out, in]` by a gather at stride `in`, from the transpose `[in, out]` contiguously.
/// With few rows per task it computes `W x^T` instead (no gather: see [`FEW_ROWS`]); with more,
/// the transpose (`columns`) is made at the first such call and kept, so that neither loading
/// nor layers that only ever see few rows (the text encoder, cross-attention keys and values)
/// pay for it. MKL reads `[out, in]` as fast as anything and never needs it.
#[derive(Debug, Clone)]
pub(crate) struct F32Weight {
    values: Values,
    /// `(out, in)`.
    dims: (usize, usize),
    /// `[in, out]`, shared by the clones of a layer.
    columns: Arc<OnceLock<Vec<f32>>>,
}

#[derive(Debug, Clone)]
enum Values {
    Mapped(MappedF32),
    Owned(Arc<[f32]>),
}

impl std::ops::Deref for Values {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Values::Mapped(m) => m,
            Values::Owned(v) => v,
        }
    }
}

impl F32Weight {
    fn new(values: Values, dims: (usize, usize)) -> Self {
        Self { values, dims, columns: Arc::default() }
    }

    /// `[in, out]`, made on the first call (by all threads). The mapped `[out, in]` pages are
    /// dropped from memory then: they come back from the page cache if few-row calls need them.
    fn columns(&self) -> &[f32] {
        self.columns.get_or_init(|| {
            let (n, k) = self.dims;
            let columns = transposed(&self.values, n, k);
            if let Values::Mapped(m) = &self.values {
                m.release();
            }
            columns
        })
    }
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = Source::get(&vb, (out_dim, in_dim), "weight", packed_form(out_dim, in_dim))?;
    let bias = vb.get_with_hints_dtype(out_dim, "bias", Default::default(), param_dtype(&vb))?;
    Linear::from_source(weight, Some(bias)).map(|l| l.recorded(&vb))
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = Source::get(&vb, (out_dim, in_dim), "weight", packed_form(out_dim, in_dim))?;
    Linear::from_source(weight, None).map(|l| l.recorded(&vb))
}

/// A linear layer packs its weight `[n, k]` as one B operand.
fn packed_form(n: usize, k: usize) -> PackedForm {
    PackedForm { operands: 1, outer: n, k }
}

impl Weight {
    /// A bf16 weight on a CPU with AMX or AVX512_BF16 is packed (from the mapped f32 values
    /// where the loader has them); an f32 CPU weight is kept as it came, mapped or not.
    fn new(source: Source) -> Result<Self> {
        let packs = source.packs();
        Ok(match source {
            Source::Cached { mut operands, .. } => Weight::Packed(Arc::new(operands.remove(0))),
            Source::Mapped { values, shape, dtype } if packs || dtype == DType::F32 => {
                let (n, k) = shape.dims2()?;
                if packs {
                    let [packed] = pack_into_cache(Some(values.name()), || {
                        [packed::Packed::b_from_transposed(&values, n, k)]
                    });
                    values.release();
                    Weight::Packed(Arc::new(packed))
                } else {
                    Weight::F32(F32Weight::new(Values::Mapped(values), (n, k)))
                }
            }
            Source::MappedHalf { values, shape } => {
                let (n, k) = shape.dims2()?;
                let [packed] = pack_into_cache(Some(values.name()), || {
                    [match &values {
                        MappedHalf::F16(w) => packed::Packed::b_from_transposed(w, n, k),
                        MappedHalf::Bf16(w) => packed::Packed::b_from_transposed(w, n, k),
                    }]
                });
                values.release();
                Weight::Packed(Arc::new(packed))
            }
            source @ Source::Mapped { .. } => {
                Weight::new(Source::Tensor(source.into_tensor()?, None))?
            }
            Source::Tensor(weight, name) if packs => {
                let (n, k) = weight.dims2()?;
                let [packed] = with_slice::<bf16, _>(&weight.contiguous()?, |w| {
                    pack_into_cache(name.as_deref(), || {
                        [packed::Packed::b_from_transposed(w, n, k)]
                    })
                })?;
                Weight::Packed(Arc::new(packed))
            }
            Source::Tensor(weight, _)
                if weight.dtype() == DType::F32 && weight.device().is_cpu() =>
            {
                let dims = weight.dims2()?;
                let values = weight.flatten_all()?.to_vec1::<f32>()?;
                Weight::F32(F32Weight::new(Values::Owned(values.into()), dims))
            }
            Source::Tensor(weight, _) => Weight::Dense(weight),
        })
    }

    /// `(out, in)` features.
    fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Weight::Dense(w) => w.dims2(),
            Weight::F32(w) => Ok(w.dims),
            Weight::Packed(p) => Ok((p.outer, p.k)),
        }
    }

    /// `[out, in]` as a tensor of the layer's dtype.
    fn tensor(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::F32(w) => Tensor::from_slice(&w.values, w.dims, &Device::Cpu),
            Weight::Packed(p) => {
                Tensor::from_vec(p.unpack_b_transposed(), (p.outer, p.k), &Device::Cpu)
            }
        }
    }
}

/// `w` `[rows, cols]` (row-major) transposed to `[cols, rows]`, in tiles over rayon's threads
/// (candle's strided copy took seconds for a whole model).
fn transposed(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 64;
    let mut out = vec![0f32; w.len()];
    // Each task writes a band of TILE output rows (input columns c0..c0 + TILE).
    out.par_chunks_mut(TILE * rows).enumerate().for_each(|(band, dst)| {
        let c0 = band * TILE;
        let band_cols = dst.len() / rows;
        for r0 in (0..rows).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                let src = &w[r * cols + c0..r * cols + c0 + band_cols];
                for (c, &v) in src.iter().enumerate() {
                    dst[c * rows + r] = v;
                }
            }
        }
    });
    out
}

impl Linear {
    /// A bf16 weight on a CPU with AMX or AVX512_BF16 is packed here (and the tensor dropped).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::from_source(Source::Tensor(weight, None), bias)
    }

    fn from_source(weight: Source, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self { weight: Weight::new(weight)?, bias, lora: LoraSlot::default() })
    }

    fn recorded(self, vb: &VarBuilder) -> Self {
        record(vb.prefix(), || LoraLayer::Linear(self.clone()));
        self
    }

    /// `(out, in)` features.
    pub fn dims(&self) -> Result<(usize, usize)> {
        self.weight.dims()
    }

    /// How the layer holds its weight: `dense`, `mapped`, `f32` (owned) or `packed` (for tests).
    #[cfg(test)]
    pub(crate) fn weight_kind(&self) -> &'static str {
        match self.weight {
            Weight::Dense(_) => "dense",
            Weight::F32(F32Weight { values: Values::Mapped(_), .. }) => "mapped",
            Weight::F32(_) => "f32",
            Weight::Packed { .. } => "packed",
        }
    }

    /// The layer's LoRA state (see [`super::lora`]).
    pub(crate) fn lora(&self) -> &LoraSlot<Weight, Linear> {
        &self.lora
    }

    /// The layer's own weight plus `delta` (`[out, in]`, f32), for fusing LoRAs: summed in f32,
    /// stored in the layer's dtype and packed as the layer's own weight is.
    pub(crate) fn weight_plus(&self, delta: &Tensor) -> Result<Weight> {
        let own = self.weight.tensor()?;
        let fused = (own.to_dtype(DType::F32)? + delta)?.to_dtype(own.dtype())?;
        Weight::new(Source::Tensor(fused, None))
    }

    /// `xs` through `weight` (the layer's own or a fused one) and the bias.
    fn forward_weight(&self, weight: &Weight, xs: &Tensor) -> Result<Tensor> {
        match weight {
            Weight::Dense(w) if !use_cpu_kernels(xs, w.dtype()) => {
                candle_nn::Linear::new(w.clone(), self.bias.clone()).forward(xs)
            }
            Weight::F32(_) if !use_cpu_kernels(xs, DType::F32) => {
                candle_nn::Linear::new(weight.tensor()?, self.bias.clone()).forward(xs)
            }
            Weight::Packed(_) if !use_cpu_kernels(xs, DType::BF16) => {
                candle_core::bail!("linear: weights packed for the CPU's bf16 GEMM take f32 CPU inputs, got {:?} on {:?}", xs.dtype(), xs.device())
            }
            _ => self.forward_cpu(weight, xs),
        }
    }

    fn forward_cpu(&self, weight: &Weight, xs: &Tensor) -> Result<Tensor> {
        let xs = xs.contiguous()?;
        let (n, k) = weight.dims()?;
        let mut out_dims = xs.dims().to_vec();
        let Some(last) = out_dims.last_mut() else { candle_core::bail!("linear: scalar input") };
        if *last != k {
            candle_core::bail!("linear: input has {} features, the weight expects {k}", *last);
        }
        *last = n;
        let m: usize = xs.dims()[..xs.rank() - 1].iter().product();
        if m == 0 || n == 0 || k == 0 {
            // Nothing to multiply (and no chunks to split the rows into): the bias, or zeros.
            return match &self.bias {
                Some(b) => b.to_dtype(DType::F32)?.broadcast_as(out_dims)?.contiguous(),
                None => Tensor::zeros(out_dims, DType::F32, &Device::Cpu),
            };
        }
        if let Weight::Packed(w) = weight {
            return Tensor::from_vec(self.forward_packed(&xs, w, m)?, out_dims, &Device::Cpu);
        }
        let mut out = vec![0f32; m * n];
        let beta = match &self.bias {
            Some(bias) => {
                let bias = bias.to_dtype(DType::F32)?;
                with_slice::<f32, _>(&bias, |b| {
                    out.par_chunks_mut(n).for_each(|row| row.copy_from_slice(b))
                })?;
                1.0
            }
            None => 0.0,
        };
        // Rows are split over the threads; each task multiplies its rows by the whole weight.
        let rows_per_task = m.div_ceil(task_count(m.div_ceil(8)));
        let columns = match weight {
            Weight::F32(w)
                if rows_per_task > FEW_ROWS && matches!(cpu_gemm(), CpuGemm::Builtin) =>
            {
                Some(w.columns())
            }
            _ => None,
        };
        with_slice::<f32, _>(&xs, |x| {
            let tasks = out.par_chunks_mut(rows_per_task * n).zip(x.par_chunks(rows_per_task * k));
            match weight {
                Weight::F32(w) => f32_rows(tasks, &w.values, columns, (n, k), beta),
                Weight::Dense(w) if w.dtype() == DType::BF16 => with_slice::<bf16, _>(w, |w| {
                    tasks.for_each(|(c, a)| {
                        with_scratch(0, a.len(), |a16: &mut [bf16]| {
                            to_bf16(a, a16);
                            // Safety: `c` is this task's own rows.
                            unsafe {
                                gemm_bf16(
                                    a.len() / k,
                                    n,
                                    k,
                                    Operand::new(a16, k),
                                    Operand::t(w, k),
                                    beta,
                                    c.as_mut_ptr(),
                                    n,
                                )
                            };
                        })
                    })
                })?,
                Weight::Dense(w) => {
                    with_slice::<f32, _>(w, |w| f32_rows(tasks, w, None, (n, k), beta))?
                }
                Weight::Packed(_) => unreachable!("handled above"),
            }
            Ok::<_, candle_core::Error>(())
        })??;
        Tensor::from_vec(out, out_dims, &Device::Cpu)
    }

    /// The packed path: rows split into tasks of whole packed blocks; each task packs its rows
    /// (rounding to bf16) and multiplies them by the packed weight, bias included.
    fn forward_packed(&self, xs: &Tensor, w: &packed::Packed, m: usize) -> Result<Vec<f32>> {
        let (n, k) = (w.outer, w.k);
        let bias = match &self.bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        let bias = bias.as_deref().map_or(packed::Bias::None, packed::Bias::Cols);
        // At most a panel of rows per task, so that the packed rows stay in L2 while every
        // panel of the weight passes them.
        let rows_per_task = m
            .div_ceil(task_count(packed::blocks(m)))
            .next_multiple_of(packed::BLOCK)
            .min(packed::PANEL);
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        with_slice::<f32, _>(xs, |x| {
            let c = out.spare_capacity_mut();
            c.par_chunks_mut(rows_per_task * n).zip(x.par_chunks(rows_per_task * k)).for_each(
                |(c, a)| {
                    let rows = a.len() / k;
                    let len = packed::packed_len(rows, k);
                    with_scratch(1, len + 32, |buf: &mut [bf16]| {
                        let rows_packed = packed::aligned(buf, len);
                        packed::pack_a_f32(a, rows, k, rows_packed);
                        // Safety: a packed kernel runs here (the weight was packed); `c` is this
                        // task's rows.
                        unsafe {
                            packed::gemm(
                                rows_packed,
                                rows,
                                w.as_slice(),
                                n,
                                k,
                                bias,
                                c.as_mut_ptr().cast(),
                                n,
                            )
                        };
                    })
                },
            )
        })?;
        // Safety: the tasks wrote every row.
        unsafe { out.set_len(m * n) };
        Ok(out)
    }
}

/// Rows per task up to which the builtin GEMM computes `(W x^T)^T` rather than `x W^T`, with
/// `W` as the A operand, read along its rows. Measured on Zen 4 at SD's layer sizes: with 32 rows
/// per task it took 0.2-0.7x the time of `x W^T` gathering from `[out, in]` and 0.7-1.1x that of
/// `x W^T` on the transpose (which it spares making); with 128 rows, 1.04-1.08x the latter, and
/// more beyond (BENCHMARKS.md).
const FEW_ROWS: usize = 96;

/// `c = beta c + a W^T` for each task's rows `(c, a)`, for `w` `[n, k]` and, when the builtin
/// GEMM runs tasks of more than [`FEW_ROWS`], its transpose `columns`.
fn f32_rows<'a>(
    tasks: impl ParallelIterator<Item = (&'a mut [f32], &'a [f32])>,
    w: &[f32],
    columns: Option<&[f32]>,
    (n, k): (usize, usize),
    beta: f32,
) {
    let builtin = matches!(cpu_gemm(), CpuGemm::Builtin);
    tasks.for_each(|(c, a)| {
        let rows = a.len() / k;
        let w_t = match columns {
            Some(columns) => Operand::new(columns, n),
            None if !builtin || rows > FEW_ROWS => Operand::t(w, k),
            None => return few_rows(c, a, w, (n, k), beta),
        };
        // Safety: `c` is this task's own rows.
        unsafe { gemm_f32(rows, n, k, Operand::new(a, k), w_t, beta, c.as_mut_ptr(), n) }
    })
}

/// `c = beta c + a W^T` as `(W a^T)^T`, through a transposed product in this thread's scratch.
fn few_rows(c: &mut [f32], a: &[f32], w: &[f32], (n, k): (usize, usize), beta: f32) {
    let rows = a.len() / k;
    with_scratch(0, n * rows, |c_t: &mut [f32]| {
        // Safety: `c_t` is this thread's scratch, `n x rows`.
        unsafe {
            gemm_f32(n, rows, k, Operand::new(w, k), Operand::t(a, k), 0.0, c_t.as_mut_ptr(), rows)
        };
        for (r, c_row) in c.chunks_exact_mut(n).enumerate() {
            for (j, v) in c_row.iter_mut().enumerate() {
                *v = beta * *v + c_t[j * rows + r];
            }
        }
    })
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let lora = self.lora.read();
        let ys = self.forward_weight(lora.fused.as_ref().unwrap_or(&self.weight), xs)?;
        lora.add_terms(xs, ys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_values::{bf16_gemms, values};

    /// bf16 weights (the packed kernel where the CPU has one, else MKL) against an f32 product of
    /// the same bf16-rounded values, for row counts and feature sizes that cut the packed blocks,
    /// more rows than one task takes, with and without bias.
    #[test]
    fn bf16_weights_match_rounded_f32() -> Result<()> {
        if !bf16_gemms() {
            return Ok(());
        }
        let dev = Device::Cpu;
        for &(rows, k, n) in &[(2, 320, 1280), (77, 64, 96), (600, 96, 40), (33, 1100, 64)] {
            let x = Tensor::from_vec(values(rows * k, 1), (1, rows, k), &dev)?
                .to_dtype(DType::BF16)?
                .to_dtype(DType::F32)?;
            let w = Tensor::from_vec(values(n * k, 2), (n, k), &dev)?.to_dtype(DType::BF16)?;
            let bias = Tensor::from_vec(values(n, 3), n, &dev)?;
            for bias in [Some(bias), None] {
                let ours = Linear::new(w.clone(), bias.clone())?.forward(&x)?;
                let theirs = candle_nn::Linear::new(w.to_dtype(DType::F32)?, bias).forward(&x)?;
                assert_eq!(ours.dims(), &[1, rows, n]);
                let scale = theirs.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                let diff = (ours - theirs)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                // f32 rounding of sums of k products, in another order: the AVX512_BF16 kernel
                // sums along k in one register, which drifts most on these correlated values.
                assert!(diff < 1e-5 * (1.0 + scale), "{rows}x{k}x{n}: {diff} (|max| {scale})");
            }
        }
        Ok(())
    }

    /// f32 weights on this process's GEMM (scripts/test.sh runs the lib tests again on the other
    /// backend) against candle's product, for the text encoder's short inputs (the builtin GEMM's
    /// `W x^T` path) and more rows than one task takes; the weight comes back as `[out, in]` for
    /// LoRA fusing.
    #[test]
    fn f32_weights_match_candle_on_either_gemm() -> Result<()> {
        let dev = Device::Cpu;
        for &(rows, k, n) in &[(154, 64, 96), (2, 320, 1280), (600, 96, 40), (1, 7, 3)] {
            let x = Tensor::from_vec(values(rows * k, 1), (1, rows, k), &dev)?;
            let w = Tensor::from_vec(values(n * k, 2), (n, k), &dev)?;
            let bias = Tensor::from_vec(values(n, 3), n, &dev)?;
            for bias in [Some(bias), None] {
                let layer = Linear::new(w.clone(), bias.clone())?;
                assert_eq!(layer.dims()?, (n, k));
                let round_trip = (layer.weight.tensor()? - &w)?.abs()?.flatten_all()?.max(0)?;
                assert_eq!(round_trip.to_scalar::<f32>()?, 0.0);
                let ours = layer.forward(&x)?;
                let theirs = candle_nn::Linear::new(w.clone(), bias).forward(&x)?;
                assert_eq!(ours.dims(), theirs.dims());
                let diff = (ours - theirs)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(diff < 1e-6 * k as f32 + 1e-5, "{rows}x{k}x{n}: {diff}");
            }
        }
        Ok(())
    }

    /// No rows, or no input features: an empty output, or the bias, without a panic.
    #[test]
    fn degenerate_sizes_give_bias_or_nothing() -> Result<()> {
        if !bf16_gemms() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let bias = Tensor::from_vec(values(32, 3), 32, &dev)?;
        for (rows, k) in [(0usize, 64usize), (3, 0)] {
            let w = Tensor::zeros((32, k), DType::BF16, &dev)?;
            let x = Tensor::zeros((1, rows, k), DType::F32, &dev)?;
            let out = Linear::new(w, Some(bias.clone()))?.forward(&x)?;
            assert_eq!(out.dims(), &[1, rows, 32]);
            for row in out.squeeze(0)?.to_vec2::<f32>()? {
                assert_eq!(row, bias.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }
}
