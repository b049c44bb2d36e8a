//! `Tensor::contiguous` for CPU f32 tensors, on every thread.
//!
//! candle copies a strided layout on one thread. The UNet's transformers move between the image
//! layout and tokens and split and merge attention heads, about 4% of a bf16 step at 512 px, and
//! meanwhile the other threads waited. Values are moved, never changed.

use candle_core::{DType, Result, Storage, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Elements per parallel task: enough to outweigh the task, few enough to spread.
const TASK_ELEMS: usize = 1 << 14;

/// `t` laid out contiguously: a parallel copy for a strided CPU f32 tensor, else
/// [`Tensor::contiguous`] (which returns `t` itself when it is contiguous already).
pub fn contiguous(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() || !t.device().is_cpu() || t.dtype() != DType::F32 || t.elem_count() == 0 {
        return t.contiguous();
    }
    let view = View::new(t.dims(), t.stride());
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { unreachable!("checked: a CPU tensor") };
    let src = &cpu.as_slice::<f32>()?[layout.start_offset()..];
    let mut out: Vec<f32> = Vec::with_capacity(t.elem_count());
    let rows_per_task = (TASK_ELEMS / view.cols).max(1);
    out.spare_capacity_mut()[..t.elem_count()]
        .par_chunks_mut(rows_per_task * view.cols)
        .enumerate()
        .for_each(|(task, dst)| view.copy_rows(src, task * rows_per_task, dst));
    // Safety: the tasks above wrote every element.
    unsafe { out.set_len(t.elem_count()) };
    Tensor::from_vec(out, t.dims(), t.device())
}

/// A strided layout as rows of `cols` elements: `outer` dims (with their strides) then one
/// row dim and one column dim, after merging the dims that are contiguous with each other.
struct View {
    outer: Vec<(usize, usize)>,
    rows: usize,
    row_stride: usize,
    cols: usize,
    col_stride: usize,
}

impl View {
    fn new(dims: &[usize], strides: &[usize]) -> Self {
        // Dims of size 1 say nothing; a dim whose stride is the next one's extent merges into it.
        let mut merged: Vec<(usize, usize)> = vec![];
        for (&d, &s) in dims.iter().zip(strides).filter(|(&d, _)| d != 1) {
            match merged.last_mut() {
                Some(last) if last.1 == s * d => *last = (last.0 * d, s),
                _ => merged.push((d, s)),
            }
        }
        while merged.len() < 2 {
            merged.insert(0, (1, 0));
        }
        let (cols, col_stride) = merged.pop().expect("two dims");
        let (rows, row_stride) = merged.pop().expect("one dim");
        Self { outer: merged, rows, row_stride, cols, col_stride }
    }

    /// Where row `row` (counted over the outer dims too) starts in the source.
    fn row_start(&self, row: usize) -> usize {
        let (mut outer_index, mut at) = (row / self.rows, (row % self.rows) * self.row_stride);
        for &(d, s) in self.outer.iter().rev() {
            at += (outer_index % d) * s;
            outer_index /= d;
        }
        at
    }

    /// Writes whole rows from `first` on into `dst`.
    fn copy_rows(&self, src: &[f32], first: usize, dst: &mut [MaybeUninit<f32>]) {
        let rows = dst.len() / self.cols;
        if self.col_stride == 1 {
            for (r, out) in dst.chunks_exact_mut(self.cols).enumerate() {
                let from = &src[self.row_start(first + r)..][..self.cols];
                for (o, &v) in out.iter_mut().zip(from) {
                    o.write(v);
                }
            }
            return;
        }
        // Columns outer where rows are adjacent in the source (a transpose): each column of
        // the task is then one contiguous read.
        let mut r = 0;
        while r < rows {
            let start = self.row_start(first + r);
            let run = if self.row_stride == 1 {
                (self.rows - (first + r) % self.rows).min(rows - r)
            } else {
                1
            };
            for c in 0..self.cols {
                let column = &src[start + c * self.col_stride..];
                for i in 0..run {
                    dst[(r + i) * self.cols + c].write(column[i * self.row_stride]);
                }
            }
            r += run;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every permutation the models use, and odd ones, give candle's own copy exactly.
    #[test]
    fn matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, (2 * 3 * 5 * 7) as f32, &dev)?.reshape((2, 3, 5, 7))?;
        let big =
            Tensor::arange(0f32, (2 * 40 * 9 * 1000) as f32, &dev)?.reshape((2, 40, 9, 1000))?;
        for t in [&x, &big] {
            for perm in [(0, 2, 3, 1), (0, 3, 1, 2), (0, 2, 1, 3), (3, 2, 1, 0), (1, 0, 3, 2)] {
                let p = t.permute(perm)?;
                let ours = contiguous(&p)?;
                assert!(ours.is_contiguous());
                assert_eq!(ours.dims(), p.dims());
                let (a, b) =
                    (ours.flatten_all()?.to_vec1::<f32>()?, p.flatten_all()?.to_vec1::<f32>()?);
                assert!(a == b, "{perm:?} of {:?}", t.dims());
            }
        }
        // A narrowed view (offset and gaps), a broadcast (stride 0), and a 1-D strided view.
        let narrowed = big.narrow(3, 10, 500)?.transpose(1, 2)?;
        let broadcast = x.narrow(0, 0, 1)?.broadcast_as((4, 3, 5, 7))?;
        let strided = x.flatten_all()?.reshape((105, 2))?.narrow(1, 1, 1)?.squeeze(1)?;
        let empty = Tensor::zeros((3, 0, 4), DType::F32, &dev)?.transpose(0, 2)?;
        assert_eq!(contiguous(&empty)?.dims(), [4, 0, 3]);
        for t in [narrowed, broadcast, strided] {
            let (a, b) = (
                contiguous(&t)?.flatten_all()?.to_vec1::<f32>()?,
                t.flatten_all()?.to_vec1::<f32>()?,
            );
            assert!(a == b, "{:?} {:?}", t.dims(), t.stride());
        }
        Ok(())
    }
}
