//! The residual sum that ends every resnet block, written into the block's own output.
//!
//! `shortcut + h` as a candle op makes a third full-size tensor while both operands are alive
//! (0.3 GB at the VAE's last level at 768 px, at the block's peak). `h` is the block's fresh
//! output, so the sum can go there.

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

/// `h + shortcut`, the values of `shortcut + h` (f32 addition commutes, bit for bit). On the
/// CPU in f32 the sum is written into `h`, which must be a tensor the caller alone holds (a
/// layer's output); elsewhere it is candle's sum.
pub fn add_residual(h: Tensor, shortcut: &Tensor) -> Result<Tensor> {
    let in_place = h.device().is_cpu()
        && (h.dtype(), shortcut.dtype()) == (DType::F32, DType::F32)
        && h.shape() == shortcut.shape()
        && h.is_contiguous()
        && shortcut.is_contiguous();
    if !in_place {
        return h + shortcut;
    }
    h.inplace_op2(shortcut, &AddAssign)?;
    Ok(h)
}

struct AddAssign;

impl InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "add-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (CpuStorage::F32(dst), CpuStorage::F32(src)) = (s1, s2) else {
            candle_core::bail!("add-residual: f32 tensors only");
        };
        let (Some((d0, d1)), Some((s0, s1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("add-residual: contiguous tensors only");
        };
        const CHUNK: usize = 1 << 16;
        dst[d0..d1].par_chunks_mut(CHUNK).zip(src[s0..s1].par_chunks(CHUNK)).for_each(|(d, s)| {
            for (d, &s) in d.iter_mut().zip(s) {
                *d += s;
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_values::{same_bits, values};
    use candle_core::Device;

    /// The same bits as `shortcut + h`, written into `h`'s storage (no new tensor); strided and
    /// mismatched operands go to candle's sum.
    #[test]
    fn adds_into_the_output_with_the_sums_bits() -> Result<()> {
        let dev = Device::Cpu;
        let (h, shortcut) = (
            Tensor::from_vec(values(2 * 3 * 70_000, 1), (2, 3, 70_000), &dev)?,
            Tensor::from_vec(values(2 * 3 * 70_000, 2), (2, 3, 70_000), &dev)?,
        );
        let expected = (&shortcut + &h)?;
        let before = h.clone();
        let sum = add_residual(h, &shortcut)?;
        same_bits(&sum, &expected, "the sum")?;
        // `before` shares `h`'s storage: it sees the sum, so nothing new was allocated for it.
        same_bits(&before, &expected, "h's storage")?;
        // A transposed shortcut is not contiguous: candle's sum, same values as candle's.
        let square = Tensor::from_vec(values(64, 3), (8, 8), &dev)?;
        let original = square.copy()?;
        let other = Tensor::from_vec(values(64, 4), (8, 8), &dev)?.t()?;
        let expected = (&other + &square)?;
        same_bits(&add_residual(square.clone(), &other)?, &expected, "strided")?;
        same_bits(&square, &original, "h of the strided sum")
    }
}
