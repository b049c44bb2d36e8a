//! Per-thread scratch buffers for the per-task temporaries of the CPU kernels (im2col blocks,
//! bf16 copies of activations, attention score blocks). Allocating and zero-filling them per
//! task cost 8% of a bf16 UNet step (memset of buffers that are overwritten anyway).

use std::cell::RefCell;

use half::bf16;

/// Plain values for which every bit pattern is valid, so raw bytes (a reused buffer, a mapped
/// file) can be viewed as them.
pub(crate) trait Pod: Copy + Send + Sync + 'static {}
impl Pod for f32 {}
impl Pod for bf16 {}
impl Pod for half::f16 {}

/// Independent buffers per thread; a kernel that needs two at once uses two slots.
pub(crate) const SLOTS: usize = 4;

thread_local! {
    static SCRATCH: [RefCell<Vec<u64>>; SLOTS] = const { [const { RefCell::new(Vec::new()) }; SLOTS] };
}

/// Runs `f` on this thread's buffer `slot`, at least `len` elements long. The contents are
/// whatever the last user left: callers write every element they read.
pub(crate) fn with_scratch<T: Pod, R>(slot: usize, len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    const { assert!(std::mem::align_of::<T>() <= 8 && std::mem::size_of::<T>() <= 8) };
    SCRATCH.with(|slots| {
        let mut buf = slots[slot].borrow_mut();
        let words = (len * std::mem::size_of::<T>()).div_ceil(8);
        if buf.len() < words {
            buf.resize(words, 0);
        }
        // Safety: the buffer is at least `len` T's long and 8-byte aligned; T is Pod, so any
        // bytes are a valid T; the RefCell borrow makes this view exclusive.
        let view = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut T, len) };
        f(view)
    })
}
