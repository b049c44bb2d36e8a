//! Flash attention on CUDA: the kernels of `kernels/flash_attn.cu`, compiled at run time by NVRTC
//! for the device's own architecture and run on candle's CUDA tensors as a custom op.
//!
//! * Inputs `[batch, heads, seq, head_dim]` in f16 or bf16; head dims 40, 64, 80, 128, 160
//!   (the UNets of SD 1.x/2.x) and 512 (the VAE's mid-block); any sequence lengths; causal or not.
//!   Scores, softmax and accumulation are f32 whatever the input type, so this is SD 2.x's
//!   "upcast attention" at the cost of half-precision attention (and memory that does not grow
//!   with `seq_q x seq_k`).
//! * Tensor cores (`mma.sync` m16n8k16, `ldmatrix`, `cp.async` double buffering): sm_80 and newer.
//!   Older devices, f32 inputs and other head dims take the reference path.
//! * The module is compiled once per process and architecture (a cubin for `sm_XY`, so no PTX JIT
//!   and no PTX-version question with the driver) and loaded once per CUDA context. The source
//!   includes no headers, so only libnvrtc (and its libnvrtc-builtins) is needed at run time.
//!
//! [`super::attention`] calls [`try_flash_attention`] for every CUDA tensor. `SD_CUDA_ATTENTION`
//! in the environment ([`AttentionSetting`]) turns the kernels off (`reference`, to compare; also
//! [`set_enabled`]`(false)`) or makes a fallback of f16/bf16 inputs to the reference path an error
//! (`require`, for the GPU check); [`fallback_count`] counts those fallbacks either way.
//!
//! The parts that need no GPU (the kernel table, launch geometry) are compiled in tests of the
//! default build too, where they are checked against the CUDA source.

/// The CUDA source of the kernels (also compiled by `scripts/ci/check-cuda-kernels.sh`).
pub const SOURCE: &str = include_str!("kernels/flash_attn.cu");

/// One kernel of the `FA_KERNEL(...)` table at the end of `kernels/flash_attn.cu` (per element
/// type). Keep the two tables in sync; a unit test compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSpec {
    pub head_dim: usize,
    /// Output columns per block (`head_dim`, or a divisor of it when the columns are split over
    /// `blockIdx.z`).
    pub dv: usize,
    pub warps: usize,
    /// Keys per tile.
    pub bc: usize,
}

pub const KERNELS: &[KernelSpec] = &[
    KernelSpec { head_dim: 40, dv: 40, warps: 4, bc: 64 },
    KernelSpec { head_dim: 64, dv: 64, warps: 4, bc: 64 },
    KernelSpec { head_dim: 80, dv: 80, warps: 4, bc: 64 },
    KernelSpec { head_dim: 128, dv: 128, warps: 4, bc: 64 },
    KernelSpec { head_dim: 160, dv: 160, warps: 4, bc: 32 },
    KernelSpec { head_dim: 512, dv: 128, warps: 2, bc: 16 },
];

/// The 16-bit element types the kernels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HalfType {
    F16,
    Bf16,
}

impl HalfType {
    pub fn from_dtype(dtype: candle_core::DType) -> Option<Self> {
        match dtype {
            candle_core::DType::F16 => Some(Self::F16),
            candle_core::DType::BF16 => Some(Self::Bf16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    /// The define that restricts the source to this type's kernels.
    #[cfg(feature = "cuda")]
    fn only_define(self) -> &'static str {
        match self {
            Self::F16 => "-DSD_FA_ONLY_F16",
            Self::Bf16 => "-DSD_FA_ONLY_BF16",
        }
    }
}

impl KernelSpec {
    pub fn for_head_dim(head_dim: usize) -> Option<&'static KernelSpec> {
        KERNELS.iter().find(|k| k.head_dim == head_dim)
    }

    /// The kernel's symbol, e.g. `sd_flash_attn_bf16_d64`.
    pub fn name(&self, ty: HalfType) -> String {
        format!("sd_flash_attn_{}_d{}", ty.name(), self.head_dim)
    }

    /// Query rows per block.
    pub fn block_rows(&self) -> usize {
        16 * self.warps
    }

    pub fn threads(&self) -> usize {
        32 * self.warps
    }

    fn split(&self) -> bool {
        self.dv < self.head_dim
    }

    /// Dynamic shared memory per block in bytes (`FaGeom` in the CUDA source).
    pub fn smem_bytes(&self) -> usize {
        let dp = self.head_dim.div_ceil(16) * 16;
        let dvp = if self.split() { self.dv } else { dp };
        let (sq, sv) = (dp + 8, dvp + 8);
        2 * (self.block_rows() * sq + 2 * self.bc * sq + 2 * self.bc * sv)
    }

    /// The launch grid for `batch * heads` slices of `seq_q` queries.
    pub fn grid(&self, batch_heads: usize, seq_q: usize) -> (usize, usize, usize) {
        let z = if self.split() { self.head_dim / self.dv } else { 1 };
        (seq_q.div_ceil(self.block_rows()), batch_heads, z)
    }
}

/// The kernels read rows with 16-byte copies: the last dimension contiguous, every other
/// stride and the start offset multiples of 8 elements ([`is_kernel_layout`]). Anything else is
/// copied into a fresh tensor first (offset 0, contiguous): `Tensor::copy` would keep the
/// layout, offset included, and `contiguous` returns a contiguous view as it is.
pub fn kernel_layout(t: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    if is_kernel_layout(t.layout()) {
        Ok(t.clone())
    } else {
        t.force_contiguous()
    }
}

/// Whether the kernels can read a `[batch, heads, seq, head_dim]` tensor of this layout as it is.
pub fn is_kernel_layout(layout: &candle_core::Layout) -> bool {
    let stride = layout.stride();
    stride.len() == 4
        && stride[3] == 1
        && stride[..3].iter().all(|s| s.is_multiple_of(8))
        && layout.start_offset().is_multiple_of(8)
}

/// What `SD_CUDA_ATTENTION` asks of the attention of f16/bf16 CUDA tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionSetting {
    /// Unset (or any other value): the kernels where they take the inputs, else the reference
    /// path with a note on stderr.
    Kernels,
    /// `reference`: always the reference path (to compare).
    Reference,
    /// `require`: the kernels, and an error where they would fall back to the reference path.
    Require,
}

impl AttentionSetting {
    pub fn from_env_value(value: Option<&str>) -> Self {
        match value {
            Some(v) if v.eq_ignore_ascii_case("reference") => Self::Reference,
            Some(v) if v.eq_ignore_ascii_case("require") => Self::Require,
            _ => Self::Kernels,
        }
    }
}

#[cfg(feature = "cuda")]
pub use imp::*;

#[cfg(feature = "cuda")]
mod imp {
    use std::collections::hash_map::Entry;
    use std::collections::HashMap;
    use std::ffi::{CStr, CString};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        sys, CudaContext, CudaFunction, CudaModule, CudaSlice, DeviceRepr, LaunchConfig,
        PushKernelArg,
    };
    use candle_core::cuda_backend::cudarc::nvrtc;
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{
        bail, CpuStorage, CudaDevice, CudaStorage, DType, Device, Layout, Result, Shape, Tensor,
    };

    use super::{kernel_layout, AttentionSetting, HalfType, KernelSpec, SOURCE};
    use crate::attention::AttentionOptions;

    static ENABLED: AtomicBool = AtomicBool::new(true);
    static FALLBACKS: AtomicUsize = AtomicUsize::new(0);

    /// `SD_CUDA_ATTENTION`, read once per process.
    pub fn setting() -> AttentionSetting {
        static SETTING: OnceLock<AttentionSetting> = OnceLock::new();
        *SETTING.get_or_init(|| {
            AttentionSetting::from_env_value(std::env::var("SD_CUDA_ATTENTION").ok().as_deref())
        })
    }

    /// Turns the CUDA kernels on or off for [`super::super::attention`] (they are on by default
    /// unless `SD_CUDA_ATTENTION=reference` is set). [`flash_attention`] ignores this switch.
    pub fn set_enabled(on: bool) {
        ENABLED.store(on, Ordering::Relaxed);
    }

    pub fn is_enabled() -> bool {
        setting() != AttentionSetting::Reference && ENABLED.load(Ordering::Relaxed)
    }

    /// How many attention calls on f16/bf16 CUDA tensors took the reference path while the
    /// kernels were enabled (since the process started). f32 takes it by design and is not
    /// counted.
    pub fn fallback_count() -> usize {
        FALLBACKS.load(Ordering::Relaxed)
    }

    /// What compiling the kernels for one architecture took.
    #[derive(Debug, Clone)]
    pub struct CompileReport {
        pub arch: String,
        pub ty: HalfType,
        pub compile_time: Duration,
        pub cubin_bytes: usize,
        /// NVRTC's log (warnings); empty when clean.
        pub log: String,
    }

    struct Compiled {
        cubin: Arc<Vec<u8>>,
        report: CompileReport,
    }

    struct Cache {
        /// (arch, type) -> cubin: NVRTC runs once per process and architecture.
        compiled: HashMap<(String, HalfType), std::result::Result<Arc<Compiled>, String>>,
        /// (context, type) -> module: loaded once per CUDA context.
        modules: HashMap<(usize, HalfType), Arc<CudaModule>>,
        /// (context, type, head_dim) -> function with its shared-memory limit raised.
        functions: HashMap<(usize, HalfType, usize), CudaFunction>,
    }

    fn cache() -> &'static Mutex<Cache> {
        static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
        CACHE.get_or_init(|| {
            Mutex::new(Cache {
                compiled: HashMap::new(),
                modules: HashMap::new(),
                functions: HashMap::new(),
            })
        })
    }

    fn context_of(dev: &CudaDevice) -> Arc<CudaContext> {
        dev.cuda_stream().context().clone()
    }

    /// `sm_XY` of the device, or an error below sm_80 (the kernels use sm_80 instructions).
    pub fn device_arch(dev: &CudaDevice) -> Result<String> {
        let (major, minor) = context_of(dev).compute_capability().w()?;
        if major < 8 {
            bail!("sd-core's CUDA attention needs compute capability 8.0 or newer, this device has {major}.{minor}")
        }
        Ok(format!("sm_{major}{minor}"))
    }

    /// Compiles `SOURCE` for `arch` (e.g. `sm_90`) with NVRTC into a cubin. Needs no GPU.
    pub fn compile_cubin(arch: &str, ty: HalfType) -> Result<(Vec<u8>, CompileReport)> {
        let started = Instant::now();
        let src = CString::new(SOURCE).expect("the CUDA source has no NUL byte");
        let name = CString::new("flash_attn.cu").expect("no NUL");
        let options = [
            format!("--gpu-architecture={arch}"),
            "--std=c++17".to_string(),
            ty.only_define().to_string(),
        ];
        let prog = nvrtc::result::create_program(&src, Some(name.as_c_str()))
            .map_err(|e| candle_core::Error::Msg(format!("nvrtc: {e:?}")))?;
        let log = || -> String {
            match unsafe { nvrtc::result::get_program_log(prog) } {
                Ok(raw) => {
                    unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().trim().to_string()
                }
                Err(e) => format!("(no log: {e:?})"),
            }
        };
        let outcome = (|| {
            if let Err(e) = unsafe { nvrtc::result::compile_program(prog, &options) } {
                bail!("NVRTC failed to compile {} for {arch}: {e:?}\n{}", ty.name(), log())
            }
            let mut size = 0usize;
            unsafe { nvrtc::sys::nvrtcGetCUBINSize(prog, &mut size) }
                .result()
                .map_err(|e| candle_core::Error::Msg(format!("nvrtcGetCUBINSize: {e:?}")))?;
            let mut cubin = vec![0u8; size];
            unsafe { nvrtc::sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) }
                .result()
                .map_err(|e| candle_core::Error::Msg(format!("nvrtcGetCUBIN: {e:?}")))?;
            let report = CompileReport {
                arch: arch.to_string(),
                ty,
                compile_time: started.elapsed(),
                cubin_bytes: size,
                log: log(),
            };
            Ok((cubin, report))
        })();
        let _ = unsafe { nvrtc::result::destroy_program(prog) };
        outcome
    }

    fn compiled_for(cache: &mut Cache, arch: &str, ty: HalfType) -> Result<Arc<Compiled>> {
        let entry = cache.compiled.entry((arch.to_string(), ty)).or_insert_with(|| {
            compile_cubin(arch, ty)
                .map(|(cubin, report)| Arc::new(Compiled { cubin: Arc::new(cubin), report }))
                .map_err(|e| e.to_string())
        });
        match entry {
            Ok(c) => Ok(c.clone()),
            Err(e) => bail!("{e}"),
        }
    }

    /// Compiles (once per process and architecture) and loads (once per context) the kernels of
    /// one element type for `dev`; returns the compile report. [`flash_attention`] does this on
    /// first use; call it to pay the compile time up front or to see errors.
    pub fn prepare(dev: &CudaDevice, ty: HalfType) -> Result<CompileReport> {
        let arch = device_arch(dev)?;
        let mut cache = cache().lock().unwrap_or_else(|p| p.into_inner());
        let compiled = compiled_for(&mut cache, &arch, ty)?;
        let ctx = context_of(dev);
        let key = (ctx.cu_ctx() as usize, ty);
        if let Entry::Vacant(slot) = cache.modules.entry(key) {
            let module =
                ctx.load_module(nvrtc::Ptx::from_binary(compiled.cubin.as_ref().clone())).w()?;
            slot.insert(module);
        }
        Ok(compiled.report.clone())
    }

    fn function(dev: &CudaDevice, ty: HalfType, spec: &KernelSpec) -> Result<CudaFunction> {
        let ctx = context_of(dev);
        let ctx_key = ctx.cu_ctx() as usize;
        {
            let cache = cache().lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = cache.functions.get(&(ctx_key, ty, spec.head_dim)) {
                return Ok(f.clone());
            }
        }
        prepare(dev, ty)?;
        let mut cache = cache().lock().unwrap_or_else(|p| p.into_inner());
        let module = cache.modules.get(&(ctx_key, ty)).expect("prepare loaded the module").clone();
        let func = module.load_function(&spec.name(ty)).w()?;
        let smem = spec.smem_bytes();
        let limit = ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .w()? as usize;
        if smem > limit {
            bail!(
                "{} needs {smem} bytes of shared memory per block, the device allows {limit}",
                spec.name(ty)
            )
        }
        func.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
        cache.functions.insert((ctx_key, ty, spec.head_dim), func.clone());
        Ok(func)
    }

    /// Whether the kernels take these inputs (before any layout fix-up): CUDA tensors of one
    /// 16-bit type, `[b, h, seq, d]` with a supported `d`, `v` of the same width.
    pub fn supports(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
        let Device::Cuda(_) = q.device() else { return false };
        let (Ok((b, h, _, d)), Ok((kb, kh, sk, kd)), Ok((vb, vh, vs, vd))) =
            (q.dims4(), k.dims4(), v.dims4())
        else {
            return false;
        };
        HalfType::from_dtype(q.dtype()).is_some()
            && k.dtype() == q.dtype()
            && v.dtype() == q.dtype()
            && (kb, kh, kd) == (b, h, d)
            && (vb, vh, vs, vd) == (b, h, sk, d)
            && KernelSpec::for_head_dim(d).is_some()
            && b * h <= 65535
    }

    /// The dispatch of [`super::super::attention`]: the kernel's result, or `None` for the
    /// reference path: by design for inputs that are not f16/bf16 CUDA tensors or with the
    /// kernels switched off; as a fallback ([`fall_back`]) for a shape they do not take, a device
    /// older than sm_80 or NVRTC unavailable.
    pub fn try_flash_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        opts: AttentionOptions,
    ) -> Result<Option<Tensor>> {
        let Device::Cuda(dev) = q.device() else { return Ok(None) };
        let Some(ty) = HalfType::from_dtype(q.dtype()) else { return Ok(None) };
        if !is_enabled() {
            return Ok(None);
        }
        if !supports(q, k, v) {
            return fall_back(format!(
                "the CUDA flash-attention kernels do not take q {:?}, k {:?}, v {:?} ({:?})",
                q.dims(),
                k.dims(),
                v.dims(),
                q.dtype()
            ));
        }
        if let Err(e) = prepare(dev, ty) {
            return fall_back(format!("CUDA flash attention unavailable: {e}"));
        }
        flash_attention(q, k, v, opts).map(Some)
    }

    /// The reference path for inputs the kernels should have taken: counted
    /// ([`fallback_count`]), reported once on stderr, an error under `SD_CUDA_ATTENTION=require`.
    fn fall_back(reason: String) -> Result<Option<Tensor>> {
        FALLBACKS.fetch_add(1, Ordering::Relaxed);
        if setting() == AttentionSetting::Require {
            bail!("{reason} (SD_CUDA_ATTENTION=require forbids the reference path)")
        }
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            eprintln!("sd-core: {reason}; using the reference attention path");
        }
        Ok(None)
    }

    /// Flash attention with the CUDA kernels; errors for inputs they do not take (see
    /// [`supports`]). Computes in f32 whatever `opts.upcast` says.
    pub fn flash_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        opts: AttentionOptions,
    ) -> Result<Tensor> {
        if !supports(q, k, v) {
            bail!(
                "CUDA flash attention takes f16/bf16 CUDA tensors [b, h, seq, d] with d in {:?}, got q {:?} {:?}, k {:?}, v {:?} on {:?}",
                super::KERNELS.iter().map(|k| k.head_dim).collect::<Vec<_>>(),
                q.dims(),
                q.dtype(),
                k.dims(),
                v.dims(),
                q.device().location()
            )
        }
        let (b, h, seq_q, d) = q.dims4()?;
        if seq_q == 0 || b * h == 0 {
            return Tensor::zeros((b, h, seq_q, d), q.dtype(), q.device());
        }
        let (q, k, v) = (kernel_layout(q)?, kernel_layout(k)?, kernel_layout(v)?);
        q.apply_op3_no_bwd(&k, &v, &FlashAttnOp { scale: opts.scale as f32, causal: opts.causal })
    }

    struct FlashAttnOp {
        scale: f32,
        causal: bool,
    }

    impl candle_core::CustomOp3 for FlashAttnOp {
        fn name(&self) -> &'static str {
            "sd-flash-attention"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("sd-flash-attention runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            ql: &Layout,
            k: &CudaStorage,
            kl: &Layout,
            v: &CudaStorage,
            vl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = q.device().clone();
            let slice = match q.dtype() {
                DType::F16 => candle_core::cuda_backend::CudaStorageSlice::F16(
                    self.launch::<half::f16>(&dev, HalfType::F16, q, ql, k, kl, v, vl)?,
                ),
                DType::BF16 => candle_core::cuda_backend::CudaStorageSlice::BF16(
                    self.launch::<half::bf16>(&dev, HalfType::Bf16, q, ql, k, kl, v, vl)?,
                ),
                other => bail!("sd-flash-attention: unsupported dtype {other:?}"),
            };
            let (b, h, seq_q, d) = ql.shape().dims4()?;
            Ok((CudaStorage { slice, device: dev }, Shape::from((b, h, seq_q, d))))
        }
    }

    impl FlashAttnOp {
        #[allow(clippy::too_many_arguments)]
        fn launch<T: CudaDType + DeviceRepr>(
            &self,
            dev: &CudaDevice,
            ty: HalfType,
            q: &CudaStorage,
            ql: &Layout,
            k: &CudaStorage,
            kl: &Layout,
            v: &CudaStorage,
            vl: &Layout,
        ) -> Result<CudaSlice<T>> {
            let (b, h, seq_q, d) = ql.shape().dims4()?;
            let seq_k = kl.shape().dims4()?.2;
            let Some(spec) = KernelSpec::for_head_dim(d) else {
                bail!("sd-flash-attention: head_dim {d} has no kernel")
            };
            for (name, l) in [("q", ql), ("k", kl), ("v", vl)] {
                if !super::is_kernel_layout(l) {
                    let s = l.stride();
                    bail!("sd-flash-attention: {name} has strides {s:?} at offset {}; need unit last stride and multiples of 8", l.start_offset())
                }
            }
            let func = function(dev, ty, spec)?;
            let qs = q.as_cuda_slice::<T>()?.slice(ql.start_offset()..);
            let ks = k.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
            let vs = v.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
            // SAFETY: every element is written by the kernel (rows < seq_q, columns < d).
            let out = unsafe { dev.alloc::<T>(b * h * seq_q * d)? };
            let (gx, gy, gz) = spec.grid(b * h, seq_q);
            let cfg = LaunchConfig {
                grid_dim: (gx as u32, gy as u32, gz as u32),
                block_dim: (spec.threads() as u32, 1, 1),
                shared_mem_bytes: spec.smem_bytes() as u32,
            };
            let (seq_q_i, seq_k_i, heads_i) = (seq_q as i32, seq_k as i32, h as i32);
            let st = |l: &Layout| -> [i64; 3] {
                [l.stride()[0] as i64, l.stride()[1] as i64, l.stride()[2] as i64]
            };
            let (qst, kst, vst) = (st(ql), st(kl), st(vl));
            let scale_log2 = self.scale * std::f32::consts::LOG2_E;
            let causal = self.causal as i32;
            let stream = dev.cuda_stream();
            let mut builder = stream.launch_builder(&func);
            builder.arg(&qs).arg(&ks).arg(&vs).arg(&out);
            builder.arg(&seq_q_i).arg(&seq_k_i).arg(&heads_i);
            builder.arg(&qst[0]).arg(&qst[1]).arg(&qst[2]);
            builder.arg(&kst[0]).arg(&kst[1]).arg(&kst[2]);
            builder.arg(&vst[0]).arg(&vst[1]).arg(&vst[2]);
            builder.arg(&scale_log2).arg(&causal);
            // SAFETY: the argument list matches the kernel's signature (FA_KERNEL in the source).
            unsafe { builder.launch(cfg) }.w()?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `FA_KERNEL(name, type, D, DV, WARPS, BC)` lines of the CUDA source.
    fn source_table() -> Vec<(String, String, usize, usize, usize, usize)> {
        SOURCE
            .lines()
            .filter_map(|l| l.strip_prefix("FA_KERNEL("))
            .map(|l| {
                let f: Vec<&str> = l.trim_end_matches(')').split(',').map(str::trim).collect();
                assert_eq!(f.len(), 6, "bad FA_KERNEL line: {l}");
                let n = |i: usize| f[i].parse::<usize>().unwrap();
                (f[0].to_string(), f[1].to_string(), n(2), n(3), n(4), n(5))
            })
            .collect()
    }

    #[test]
    fn rust_table_matches_the_cuda_source() {
        let table = source_table();
        assert_eq!(table.len(), 2 * KERNELS.len(), "{table:?}");
        for ty in [HalfType::F16, HalfType::Bf16] {
            let tag = match ty {
                HalfType::F16 => "FaF16",
                HalfType::Bf16 => "FaBf16",
            };
            for spec in KERNELS {
                let row = table
                    .iter()
                    .find(|r| r.0 == spec.name(ty))
                    .unwrap_or_else(|| panic!("{} missing from the source", spec.name(ty)));
                assert_eq!(
                    (row.1.as_str(), row.2, row.3, row.4, row.5),
                    (tag, spec.head_dim, spec.dv, spec.warps, spec.bc),
                    "{}",
                    spec.name(ty)
                );
            }
        }
    }

    /// Views the kernels cannot read as they are become fresh, aligned tensors with the same
    /// values; aligned views are passed through. On the CPU: the function is device-agnostic.
    #[test]
    fn kernel_layout_realigns_offsets_and_strides() -> candle_core::Result<()> {
        use candle_core::{Device, Tensor};
        let arange = |n: usize| Tensor::arange(0f32, n as f32, &Device::Cpu);
        let base = arange(2 * 3 * 5 * 16)?.reshape((2, 3, 5, 16))?;
        // Contiguous views of a longer buffer, starting 3 rows in (offset 48) or 1 element in.
        let view_at =
            |offset| arange(2000)?.narrow(0, offset, 2 * 3 * 4 * 16)?.reshape((2, 3, 4, 16));
        let (row_offset, odd_offset) = (view_at(48)?, view_at(1)?);
        // Head dim 16 out of rows of 20: a sequence stride that is not a multiple of 8.
        let odd_stride = arange(2 * 3 * 5 * 20)?.reshape((2, 3, 5, 20))?.narrow(3, 0, 16)?;
        let cases = [
            ("contiguous", &base, true),
            ("aligned offset", &row_offset, true),
            ("heads and seq swapped", &base.transpose(1, 2)?, true),
            ("unaligned offset", &odd_offset, false),
            ("unaligned stride", &odd_stride, false),
        ];
        assert!(odd_offset.is_contiguous() && odd_offset.layout().start_offset() == 1);
        for (name, t, as_it_is) in cases {
            assert_eq!(is_kernel_layout(t.layout()), as_it_is, "{name}");
            let k = kernel_layout(t)?;
            assert!(is_kernel_layout(k.layout()), "{name}: {:?}", k.layout());
            assert_eq!(k.dims(), t.dims(), "{name}");
            let values = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            assert_eq!(values(&k)?, values(t)?, "{name}");
        }
        Ok(())
    }

    #[test]
    fn attention_setting_from_the_environment() {
        use AttentionSetting::*;
        for (value, setting) in [
            (None, Kernels),
            (Some(""), Kernels),
            (Some("kernels"), Kernels),
            (Some("reference"), Reference),
            (Some("Reference"), Reference),
            (Some("require"), Require),
            (Some("REQUIRE"), Require),
        ] {
            assert_eq!(AttentionSetting::from_env_value(value), setting, "{value:?}");
        }
    }

    #[test]
    fn geometry() {
        for spec in KERNELS {
            // Under the 99 KiB opt-in limit of sm_86/sm_89 (sm_80: 163 KiB, sm_90: 227 KiB).
            assert!(spec.smem_bytes() <= 99 * 1024, "{spec:?}: {} bytes", spec.smem_bytes());
            assert_eq!(spec.head_dim % 8, 0);
            assert_eq!(spec.head_dim % spec.dv, 0);
            assert_eq!(spec.bc % 16, 0);
        }
        let d64 = KernelSpec::for_head_dim(64).unwrap();
        assert_eq!(d64.smem_bytes(), 2 * (64 * 72 + 2 * 64 * 72 + 2 * 64 * 72));
        assert_eq!(d64.grid(10, 9216), (144, 10, 1));
        assert_eq!(d64.grid(2, 77), (2, 2, 1));
        let d40 = KernelSpec::for_head_dim(40).unwrap();
        assert_eq!(d40.smem_bytes(), 2 * (64 * 56 + 2 * 64 * 56 + 2 * 64 * 56));
        let d512 = KernelSpec::for_head_dim(512).unwrap();
        assert_eq!(d512.grid(1, 9216), (288, 1, 4));
        assert_eq!(d512.smem_bytes(), 2 * (32 * 520 + 2 * 16 * 520 + 2 * 16 * 136));
        assert!(KernelSpec::for_head_dim(96).is_none());
        assert_eq!(d512.name(HalfType::Bf16), "sd_flash_attn_bf16_d512");
    }
}
