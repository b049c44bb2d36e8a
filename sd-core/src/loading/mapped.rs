//! GEMM weights read straight from the memory-mapped weight file.
//!
//! Copying a weight into a tensor costs a fresh page (zeroed by the kernel) per 4 KiB and a
//! pass over memory; a layer that repacks the weight afterwards (the bf16 packed layout, the
//! builtin GEMM's transposed f32 layout) pays it twice. While [`build_component`] builds a
//! model, the layers ask [`mapped_f32`] for their weight first: an f32 weight stored as f32
//! comes back as a view into the map, which an f32 convolution keeps and multiplies from (no
//! copy at all, the pages load on first use as torch's mapped weights do) and a repacking layer
//! packs from once, then [`Mapped::release`]s. A layer that packs (bf16 on the packed kernels)
//! also reads f16 and bf16 weights in place ([`mapped_half`]: the fp16 variant, which bf16 runs
//! choose): converting them to a bf16 tensor first took about 2 GB of fresh memory for SD 2.1.
//!
//! A view keeps its file mapped; like every mmap-based loader we rely on the file not being
//! truncated while it is in use (replacing or deleting it is safe). Mapped pages are page cache:
//! under memory pressure the kernel may drop them and read them again when next used.
//! `SD_MAP_WEIGHTS=0` copies every weight into process memory at load instead ([`maps_weights`]).
//!
//! [`build_component`]: super::build_component

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Shape};
use candle_nn::VarBuilder;
use half::{bf16, f16};

use super::{display_name, release_pages, WeightStore};
use crate::cpu::Pod;

/// The values of one tensor inside a mapped weight file (`T` as stored: f32, or f16 and bf16
/// for packing), kept mapped while this lives.
pub struct Mapped<T> {
    /// Held for the mapping's lifetime, never read.
    _file: Arc<MmapedSafetensors>,
    ptr: *const T,
    len: usize,
    /// The tensor's full name in the file (the packed-weight cache's key for it).
    name: Arc<str>,
}

/// f32 values read in place (see the module docs).
pub type MappedF32 = Mapped<f32>;

/// f16 or bf16 values read in place, for a layer that packs them.
#[derive(Clone, Debug)]
pub enum MappedHalf {
    F16(Mapped<f16>),
    Bf16(Mapped<bf16>),
}

impl MappedHalf {
    /// The tensor's full name in its file.
    pub fn name(&self) -> &str {
        match self {
            MappedHalf::F16(v) => v.name(),
            MappedHalf::Bf16(v) => v.name(),
        }
    }

    /// See [`Mapped::release`].
    pub fn release(&self) {
        match self {
            MappedHalf::F16(v) => v.release(),
            MappedHalf::Bf16(v) => v.release(),
        }
    }
}

impl<T> Clone for Mapped<T> {
    fn clone(&self) -> Self {
        Self { _file: self._file.clone(), ptr: self.ptr, len: self.len, name: self.name.clone() }
    }
}

// Safety: the values are a read-only mapping that lives as long as `_file`; nothing writes them.
unsafe impl<T: Sync> Send for Mapped<T> {}
unsafe impl<T: Sync> Sync for Mapped<T> {}

impl<T> std::ops::Deref for Mapped<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // Safety: `ptr .. ptr + len` is an aligned run of `T` inside the mapping `_file` holds.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T> std::fmt::Debug for Mapped<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapped {{ name: {}, len: {} }}", self.name, self.len)
    }
}

impl<T> Mapped<T> {
    /// Drops this tensor's pages from the process's memory once a layer has copied it out
    /// (they stay in the page cache, and fault back in if touched again).
    pub fn release(&self) {
        // Safety: any value is `size_of::<T>()` valid bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(self.ptr.cast::<u8>(), std::mem::size_of_val::<[T]>(self))
        };
        release_pages(bytes);
    }

    /// The tensor's full name in its file.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Keeps the mapping alive for the returned view's owner.
    fn new(file: &Arc<MmapedSafetensors>, values: &[T], name: &str) -> Self {
        Self { _file: file.clone(), ptr: values.as_ptr(), len: values.len(), name: name.into() }
    }
}

thread_local! {
    /// The weights of the component [`build_component`](super::build_component) is building on
    /// this thread.
    static BUILDING: RefCell<Option<Arc<WeightStore>>> = const { RefCell::new(None) };
}

/// Makes `store` the one [`mapped_f32`] reads from on this thread while `f` runs.
pub(super) fn building<R>(store: Arc<WeightStore>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Arc<WeightStore>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            BUILDING.with(|b| *b.borrow_mut() = self.0.take());
        }
    }
    let _restore = Restore(BUILDING.with(|b| b.borrow_mut().replace(store)));
    f()
}

/// Whether GEMM weights are read in place: unless `SD_MAP_WEIGHTS=0` (a replica that wants no
/// page-ins after load, whatever the page cache does, pays a few seconds of load for it).
pub fn maps_weights() -> bool {
    !crate::runtime::switched_off("SD_MAP_WEIGHTS")
}

/// The name of weight `name` of `vb` in the weight files.
pub(crate) fn full_name(vb: &VarBuilder, name: &str) -> String {
    let prefix = vb.prefix();
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Weight `name` of `vb` as a view into its mapped file, where that can stand in for
/// `vb.get(shape, name)`: while a component is being built from mapped files, for a CPU builder
/// of dtype f32 or bf16 (bf16 builders are the packed GEMM's, which packs from f32), and a tensor
/// stored as aligned f32. `Ok(None)` means "use `vb.get`"; a wrong shape is the same error.
pub(crate) fn mapped_f32(
    vb: &VarBuilder,
    shape: impl Into<Shape>,
    name: &str,
) -> candle_core::Result<Option<MappedF32>> {
    if !matches!(vb.dtype(), DType::F32 | DType::BF16) {
        return Ok(None);
    }
    mapped(vb, shape.into(), name, safetensors::Dtype::F32)
}

/// As [`mapped_f32`], for a weight stored as f16 or bf16, which only a layer that packs it
/// reads in place (`packs`: a bf16 builder on the packed kernels); others convert it to a tensor.
pub(crate) fn mapped_half(
    vb: &VarBuilder,
    shape: impl Into<Shape>,
    name: &str,
    packs: bool,
) -> candle_core::Result<Option<MappedHalf>> {
    if !packs {
        return Ok(None);
    }
    let shape = shape.into();
    if let Some(values) = mapped(vb, shape.clone(), name, safetensors::Dtype::F16)? {
        return Ok(Some(MappedHalf::F16(values)));
    }
    Ok(mapped(vb, shape, name, safetensors::Dtype::BF16)?.map(MappedHalf::Bf16))
}

/// Weight `name` of `vb` as a view of `T`, where it is stored as `stored` (`T`'s dtype), aligned,
/// and the component is being built from mapped files on the CPU.
fn mapped<T: Pod>(
    vb: &VarBuilder,
    shape: Shape,
    name: &str,
    stored: safetensors::Dtype,
) -> candle_core::Result<Option<Mapped<T>>> {
    if !vb.device().is_cpu() || !maps_weights() {
        return Ok(None);
    }
    let Some(store) = BUILDING.with(|b| b.borrow().clone()) else { return Ok(None) };
    let full = full_name(vb, name);
    let Some((path, file, view)) = store.view(&full) else { return Ok(None) };
    if view.dtype() != stored {
        return Ok(None);
    }
    let Some(values) = super::as_values::<T>(view.data()) else { return Ok(None) };
    if view.shape() != shape.dims() {
        candle_core::bail!(
            "{}: tensor `{full}` has shape {:?}, expected {:?}",
            display_name(path),
            view.shape(),
            shape.dims()
        )
    }
    Ok(Some(Mapped::new(file, values, &full)))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module, Tensor};

    use super::*;
    use crate::cpu::test_values::values;
    use crate::loading::build_component;
    use crate::nn::{conv2d, linear, Conv2dConfig};

    /// A weight file with an f32 linear layer `lin` (`[40, 96]`), a 3x3 convolution `conv`
    /// (`[8, 4, 3, 3]`), a bf16 linear layer `half` (`[16, 32]`), and f16 copies of the first
    /// two's shapes (`lin16`, `conv16`), each with an f32 bias.
    fn weight_file(dir: &std::path::Path) -> std::path::PathBuf {
        let dev = Device::Cpu;
        let t = |dims: &[usize], seed| {
            Tensor::from_vec(values(dims.iter().product(), seed), dims, &dev).unwrap()
        };
        let tensors = [
            ("lin.weight", t(&[40, 96], 1)),
            ("lin.bias", t(&[40], 2)),
            ("conv.weight", t(&[8, 4, 3, 3], 3)),
            ("conv.bias", t(&[8], 4)),
            ("half.weight", t(&[16, 32], 5).to_dtype(DType::BF16).unwrap()),
            ("half.bias", t(&[16], 6)),
            ("lin16.weight", t(&[40, 96], 9).to_dtype(DType::F16).unwrap()),
            ("lin16.bias", t(&[40], 10)),
            ("conv16.weight", t(&[8, 4, 3, 3], 11).to_dtype(DType::F16).unwrap()),
            ("conv16.bias", t(&[8], 12)),
        ];
        let path = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors.into_iter().collect(), &path).unwrap();
        path
    }

    fn store(path: &std::path::Path) -> WeightStore {
        WeightStore::open(&[path.to_path_buf()]).unwrap()
    }

    /// Inside `build_component` f32 weights come back mapped, bf16 ones (and builders of other
    /// dtypes) do not, unless the layer packs them; outside it nothing is mapped.
    #[test]
    fn only_stored_f32_weights_inside_a_build_are_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let path = weight_file(dir.path());
        let found = build_component(dir.path(), store(&path), DType::F32, &Device::Cpu, |vb| {
            Ok([
                mapped_f32(&vb.pp("lin"), (40, 96), "weight")?.map(|m| m.to_vec()),
                mapped_f32(&vb.pp("half"), (16, 32), "weight")?.map(|m| m.to_vec()),
                mapped_f32(&vb.to_dtype(DType::F16).pp("lin"), (40, 96), "weight")?
                    .map(|m| m.to_vec()),
            ])
        })
        .unwrap();
        assert_eq!(found[0].as_deref(), Some(&values(40 * 96, 1)[..]));
        assert_eq!(found[1], None);
        assert_eq!(found[2], None);
        // f16 and bf16 weights are mapped for a layer that packs them (a bf16 builder), as such.
        let found = build_component(dir.path(), store(&path), DType::BF16, &Device::Cpu, |vb| {
            let half = |name: &str, shape: (usize, usize), packs| {
                mapped_half(&vb.pp(name), shape, "weight", packs)
            };
            Ok([
                half("lin16", (40, 96), true)?,
                half("half", (16, 32), true)?,
                half("lin", (40, 96), true)?,
                half("lin16", (40, 96), false)?,
            ])
        })
        .unwrap();
        let to_f32 = |v: &[f32], dtype| {
            let t = Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
        };
        let Some(MappedHalf::F16(lin16)) = &found[0] else { panic!("{:?}", found[0]) };
        let lin16: Vec<f32> = lin16.iter().map(|v| v.to_f32()).collect();
        assert_eq!(lin16, to_f32(&values(40 * 96, 9), DType::F16));
        let Some(MappedHalf::Bf16(half)) = &found[1] else { panic!("{:?}", found[1]) };
        let half: Vec<f32> = half.iter().map(|v| v.to_f32()).collect();
        assert_eq!(half, to_f32(&values(16 * 32, 5), DType::BF16));
        assert!(found[2].is_none() && found[3].is_none());
        let vb = store(&path).into_var_builder(DType::F32, &Device::Cpu);
        assert!(mapped_f32(&vb.pp("lin"), (40, 96), "weight").unwrap().is_none());
    }

    /// A mapped weight of the wrong shape is the loader's usual error, naming file and tensor.
    #[test]
    fn a_wrong_shape_names_the_file_and_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = weight_file(dir.path());
        let err = build_component(dir.path(), store(&path), DType::F32, &Device::Cpu, |vb| {
            linear(95, 40, vb.pp("lin"))
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(
                "model.safetensors: tensor `lin.weight` has shape [40, 96], expected [40, 95]"
            ),
            "{err}"
        );
    }

    /// Layers built from mapped weights (used in place in f32, packed from f32, f16 or bf16 in
    /// bf16) give exactly what layers built from copied tensors give, after the store is gone.
    #[test]
    fn mapped_layers_match_copied_ones_and_outlive_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = weight_file(dir.path());
        let dev = Device::Cpu;
        let x = Tensor::from_vec(values(3 * 96, 7), (3, 96), &dev).unwrap();
        let img = Tensor::from_vec(values(2 * 4 * 6 * 5, 8), (2, 4, 6, 5), &dev).unwrap();
        let cfg = Conv2dConfig { padding: 1, stride: 1 };
        let dtypes: &[DType] = if crate::cpu::packed::available() {
            &[DType::F32, DType::BF16]
        } else {
            &[DType::F32]
        };
        for &dtype in dtypes {
            let build = |vb: VarBuilder| {
                let (lin, conv) =
                    (linear(96, 40, vb.pp("lin"))?, conv2d(4, 8, 3, cfg, vb.pp("conv"))?);
                let halves = [linear(96, 40, vb.pp("lin16"))?, linear(32, 16, vb.pp("half"))?];
                Ok((lin, conv, halves, conv2d(4, 8, 3, cfg, vb.pp("conv16"))?))
            };
            let (lin, conv, halves, conv16) =
                build_component(dir.path(), store(&path), dtype, &dev, build).unwrap();
            let (lin_copied, conv_copied, halves_copied, conv16_copied) =
                build(store(&path).into_var_builder(dtype, &dev)).unwrap();
            // bf16 3x3 layers keep Winograd's transform where it is on.
            let (kind, conv_kind) = match dtype {
                DType::F32 => ("mapped", "mapped"),
                _ if crate::nn::winograd::enabled() => ("packed", "winograd"),
                _ => ("packed", "packed"),
            };
            assert_eq!((lin.weight_kind(), conv.weight_kind()), (kind, conv_kind));
            let copied = if dtype == DType::F32 { "dense" } else { conv_kind };
            assert_eq!(conv_copied.weight_kind(), copied);
            let x32 = x.narrow(1, 0, 32).unwrap();
            for (ours, theirs) in [
                (lin.forward(&x).unwrap(), lin_copied.forward(&x).unwrap()),
                (conv.forward(&img).unwrap(), conv_copied.forward(&img).unwrap()),
                (halves[0].forward(&x).unwrap(), halves_copied[0].forward(&x).unwrap()),
                (halves[1].forward(&x32).unwrap(), halves_copied[1].forward(&x32).unwrap()),
                (conv16.forward(&img).unwrap(), conv16_copied.forward(&img).unwrap()),
            ] {
                let diff = (ours - theirs).unwrap().abs().unwrap().flatten_all().unwrap();
                assert_eq!(diff.max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0, "{dtype:?}");
            }
        }
    }
}
