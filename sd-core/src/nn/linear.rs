//! `Linear`: `y = x W^T + b` over the last dimension.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use half::bf16;
use rayon::prelude::*;

use super::blas::{gemm_bf16, gemm_f32, to_bf16, Operand};
use super::scratch::with_scratch;
use super::{param_dtype, task_count, use_cpu_kernels, with_slice};

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, in the builder's dtype (bf16 for bf16 GEMMs on the CPU).
    weight: Tensor,
    /// `[out]`, in [`param_dtype`].
    bias: Option<Tensor>,
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get_with_hints_dtype(out_dim, "bias", Default::default(), param_dtype(&vb))?;
    Ok(Linear::new(weight, Some(bias)))
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(vb.get((out_dim, in_dim), "weight")?, None))
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Whether this layer multiplies in bf16 on the CPU (a model loaded in bf16 there); the
    /// attention next to it follows suit.
    pub fn bf16_on_cpu(&self) -> bool {
        self.weight.device().is_cpu() && self.weight.dtype() == DType::BF16
    }

    fn forward_cpu(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = xs.contiguous()?;
        let (n, k) = self.weight.dims2()?;
        let mut out_dims = xs.dims().to_vec();
        let Some(last) = out_dims.last_mut() else { candle_core::bail!("linear: scalar input") };
        if *last != k {
            candle_core::bail!("linear: input has {} features, the weight expects {k}", *last);
        }
        *last = n;
        let m = xs.elem_count() / k;
        let mut out = vec![0f32; m * n];
        let beta = match &self.bias {
            Some(bias) => {
                let bias = bias.to_dtype(DType::F32)?;
                with_slice::<f32, _>(&bias, |b| out.par_chunks_mut(n).for_each(|row| row.copy_from_slice(b)))?;
                1.0
            }
            None => 0.0,
        };
        // Rows are split over the threads; each task multiplies its rows by the whole weight.
        let rows_per_task = m.div_ceil(task_count(m.div_ceil(8)));
        with_slice::<f32, _>(&xs, |x| {
            let tasks = out.par_chunks_mut(rows_per_task * n).zip(x.par_chunks(rows_per_task * k));
            // Safety (both GEMMs): `c` is this task's own rows.
            match self.weight.dtype() {
                DType::BF16 => with_slice::<bf16, _>(&self.weight, |w| {
                    tasks.for_each(|(c, a)| {
                        with_scratch(0, a.len(), |a16: &mut [bf16]| {
                            to_bf16(a, a16);
                            unsafe { gemm_bf16(a.len() / k, n, k, Operand::new(a16, k), Operand::t(w, k), beta, c.as_mut_ptr(), n) };
                        })
                    })
                }),
                _ => with_slice::<f32, _>(&self.weight, |w| {
                    tasks.for_each(|(c, a)| unsafe {
                        gemm_f32(a.len() / k, n, k, Operand::new(a, k), Operand::t(w, k), beta, c.as_mut_ptr(), n)
                    })
                }),
            }
        })??;
        Tensor::from_vec(out, out_dims, &Device::Cpu)
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if use_cpu_kernels(xs, self.weight.dtype()) {
            self.forward_cpu(xs)
        } else {
            candle_nn::Linear::new(self.weight.clone(), self.bias.clone()).forward(xs)
        }
    }
}
