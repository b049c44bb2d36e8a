//! The CPU matrix products behind the GEMM layers and the bf16 attention.
//!
//! Two backends for f32, chosen once per process:
//!
//! * **Intel MKL**, loaded at run time (`dlopen`) from the `mkl` wheel on PyPI or any MKL
//!   install: `cblas_sgemm`. Nothing links against MKL at build time, so the pure-Rust build is
//!   unchanged. The default on Intel CPUs.
//! * **builtin**: the `gemm` crate (the one candle uses), with its AVX-512 kernels. The default
//!   on other CPUs: MKL loads its generic kernels there, and on a Zen 4 box the builtin GEMM was
//!   faster in every stage (text encoder, UNet, VAE; BENCHMARKS.md).
//!
//! bf16 operands run on [`super::packed`] where the CPU has AMX or AVX512_BF16; MKL's
//! `cblas_gemm_bf16bf16f32` ([`gemm_bf16`]) is the fallback when those kernels are switched off.
//!
//! MKL runs with its sequential threading layer: the callers split the work over rayon's
//! threads themselves, so there is one thread pool in the process and `RAYON_NUM_THREADS` /
//! `--threads` govern all of it.
//!
//! Environment: `SD_CPU_GEMM=mkl|builtin` forces the f32 backend (`mkl` fails loudly if MKL
//! cannot be loaded; `builtin` also keeps MKL out of the process); `SD_MKL_LIB` names the library
//! file or its folder. Otherwise MKL is looked up by the dynamic loader's usual search and then in
//! `$VIRTUAL_ENV/lib`, `$CONDA_PREFIX/lib`, `~/.local/lib` (where `pip install --user mkl` puts
//! it) and `/usr/local/lib`.

use std::ffi::{c_char, c_int};
use std::path::PathBuf;
use std::sync::OnceLock;

use half::bf16;

/// The f32 GEMM backend of this process.
pub enum CpuGemm {
    Mkl(&'static Mkl),
    Builtin,
}

impl CpuGemm {
    /// `"mkl 2026.2"` or `"builtin"`, for logs and benchmark records.
    pub fn describe(&self) -> String {
        match self {
            CpuGemm::Mkl(mkl) => format!("mkl {}", mkl.version),
            CpuGemm::Builtin => "builtin".to_string(),
        }
    }
}

struct Selected {
    gemm: CpuGemm,
    /// Why this backend: the variable that forced it, or the CPU vendor.
    reason: String,
    /// What is wrong with `SD_CPU_GEMM`, if anything.
    request_error: Option<String>,
}

fn wanted_backend() -> String {
    std::env::var("SD_CPU_GEMM").unwrap_or_default().to_ascii_lowercase()
}

fn selected() -> &'static Selected {
    static SELECTED: OnceLock<Selected> = OnceLock::new();
    SELECTED.get_or_init(|| {
        let wanted = wanted_backend();
        let (gemm, reason) = match wanted.as_str() {
            "builtin" => (CpuGemm::Builtin, "SD_CPU_GEMM=builtin".to_string()),
            "mkl" => match mkl() {
                Ok(mkl) => (CpuGemm::Mkl(mkl), "SD_CPU_GEMM=mkl".to_string()),
                Err(e) => (CpuGemm::Builtin, format!("MKL: {e}")),
            },
            // MKL is not even loaded here.
            _ if !intel_cpu() => (
                CpuGemm::Builtin,
                "not an Intel CPU: MKL runs generic kernels there; SD_CPU_GEMM=mkl forces it"
                    .to_string(),
            ),
            _ => match mkl() {
                Ok(mkl) => (CpuGemm::Mkl(mkl), "Intel CPU with MKL".to_string()),
                Err(e) => (CpuGemm::Builtin, format!("Intel CPU without MKL: {e}")),
            },
        };
        let request_error = match wanted.as_str() {
            "mkl" => mkl()
                .err()
                .map(|reason| format!("SD_CPU_GEMM=mkl but MKL could not be loaded: {reason}")),
            "" | "builtin" => None,
            other => {
                Some(format!("SD_CPU_GEMM=`{other}` is not a backend (expected mkl or builtin)"))
            }
        };
        Selected { gemm, reason, request_error }
    })
}

/// Whether the CPU says it is Intel's (CPUID vendor "GenuineIntel").
fn intel_cpu() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let id = std::arch::x86_64::__cpuid(0);
        // The vendor string is EBX, EDX, ECX: "Genu" "ineI" "ntel".
        [id.ebx, id.edx, id.ecx] == [0x756e_6547, 0x4965_6e69, 0x6c65_746e]
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The f32 backend in use.
pub fn cpu_gemm() -> &'static CpuGemm {
    &selected().gemm
}

/// Why [`cpu_gemm`] is the backend it is, for `sd-cli --verbose` and benchmark records.
pub fn cpu_gemm_reason() -> &'static str {
    &selected().reason
}

/// MKL, loaded on first call; `Err` says why it cannot be used (not found, or
/// `SD_CPU_GEMM=builtin`).
pub fn mkl() -> Result<&'static Mkl, &'static str> {
    static MKL: OnceLock<Result<Mkl, String>> = OnceLock::new();
    MKL.get_or_init(|| match wanted_backend().as_str() {
        "builtin" => Err("SD_CPU_GEMM=builtin keeps MKL out".to_string()),
        _ => Mkl::load(),
    })
    .as_ref()
    .map_err(String::as_str)
}

/// `Err` when `SD_CPU_GEMM` names no backend, or asks for MKL and it could not be loaded.
pub fn check_requested_backend() -> Result<(), String> {
    selected().request_error.clone().map_or(Ok(()), Err)
}

const CBLAS_ROW_MAJOR: c_int = 101;
const CBLAS_NO_TRANS: c_int = 111;
const CBLAS_TRANS: c_int = 112;
const MKL_THREADING_SEQUENTIAL: c_int = 1;

type SgemmFn = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);
type GemmBf16Fn = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const u16,
    c_int,
    *const u16,
    c_int,
    f32,
    *mut f32,
    c_int,
);

pub struct Mkl {
    sgemm: SgemmFn,
    gemm_bf16: GemmBf16Fn,
    pub version: String,
    pub path: PathBuf,
    // Keeps the functions above valid for the life of the process.
    _lib: libloading::Library,
}

#[cfg(target_os = "linux")]
const LIB_NAMES: &[&str] = &["libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"];
#[cfg(target_os = "macos")]
const LIB_NAMES: &[&str] = &["libmkl_rt.2.dylib", "libmkl_rt.dylib"];
#[cfg(target_os = "windows")]
const LIB_NAMES: &[&str] = &["mkl_rt.2.dll", "mkl_rt.dll"];
#[cfg(not(any(target_os = "linux", target_os = "macos", target_os = "windows")))]
const LIB_NAMES: &[&str] = &[];

impl Mkl {
    fn candidates() -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Some(p) = std::env::var_os("SD_MKL_LIB").map(PathBuf::from) {
            if p.is_dir() {
                out.extend(LIB_NAMES.iter().map(|n| p.join(n)));
            } else {
                out.push(p);
            }
            return out;
        }
        // Bare names: the loader's own search (LD_LIBRARY_PATH, rpath, ld.so.cache).
        out.extend(LIB_NAMES.iter().map(PathBuf::from));
        let mut dirs: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
            .iter()
            .filter_map(std::env::var_os)
            .map(|p| PathBuf::from(p).join("lib"))
            .collect();
        if let Some(home) = std::env::var_os("HOME") {
            dirs.push(PathBuf::from(home).join(".local/lib"));
        }
        dirs.push(PathBuf::from("/usr/local/lib"));
        for d in dirs {
            out.extend(LIB_NAMES.iter().map(|n| d.join(n)));
        }
        out
    }

    fn load() -> Result<Self, String> {
        let mut tried = Vec::new();
        for path in Self::candidates() {
            // Safety: loading MKL runs its initialisers, which have no preconditions.
            match unsafe { libloading::Library::new(&path) } {
                Ok(lib) => return unsafe { Self::from_library(lib, path) },
                Err(_) => tried.push(path.display().to_string()),
            }
        }
        Err(format!(
            "libmkl_rt not found (tried {}); `pip install mkl` or set SD_MKL_LIB",
            tried.join(", ")
        ))
    }

    /// Safety: `lib` must be an MKL runtime library (the symbols have the signatures above).
    unsafe fn from_library(lib: libloading::Library, path: PathBuf) -> Result<Self, String> {
        let err = |e: libloading::Error| format!("{}: {e}", path.display());
        // The threading layer must be chosen before any other MKL call.
        let set_layer = lib
            .get::<unsafe extern "C" fn(c_int) -> c_int>(b"MKL_Set_Threading_Layer\0")
            .map_err(err)?;
        set_layer(MKL_THREADING_SEQUENTIAL);
        let sgemm = *lib.get::<SgemmFn>(b"cblas_sgemm\0").map_err(err)?;
        let gemm_bf16 = *lib.get::<GemmBf16Fn>(b"cblas_gemm_bf16bf16f32\0").map_err(err)?;
        let get_version = lib
            .get::<unsafe extern "C" fn(*mut c_char, c_int)>(b"mkl_get_version_string\0")
            .map_err(err)?;
        let mut buf = [0 as c_char; 256];
        get_version(buf.as_mut_ptr(), buf.len() as c_int);
        let full = std::ffi::CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
        // "Intel(R) oneAPI Math Kernel Library Version 2026.2-Product Build ..." -> "2026.2"
        let version = full
            .split_whitespace()
            .skip_while(|w| *w != "Version")
            .nth(1)
            .map(|v| v.split('-').next().unwrap_or(v).to_string())
            .unwrap_or(full);
        Ok(Self { sgemm, gemm_bf16, version, path, _lib: lib })
    }
}

/// A row-major matrix operand: `rows x cols` with row stride `ld`, or its transpose when
/// `transposed` (then stored as `cols x rows`).
#[derive(Clone, Copy)]
pub struct Operand<'a, T> {
    pub data: &'a [T],
    pub ld: usize,
    pub transposed: bool,
}

impl<'a, T> Operand<'a, T> {
    pub fn new(data: &'a [T], ld: usize) -> Self {
        Self { data, ld, transposed: false }
    }
    pub fn t(data: &'a [T], ld: usize) -> Self {
        Self { data, ld, transposed: true }
    }
    /// Elements the operand spans for a `rows x cols` use.
    fn span(&self, rows: usize, cols: usize) -> usize {
        let (r, c) = if self.transposed { (cols, rows) } else { (rows, cols) };
        if r == 0 || c == 0 {
            0
        } else {
            (r - 1) * self.ld + c
        }
    }
}

fn check_dims<A, B>(m: usize, n: usize, k: usize, a: &Operand<A>, b: &Operand<B>, ldc: usize) {
    assert!(a.data.len() >= a.span(m, k), "gemm: lhs too short");
    assert!(b.data.len() >= b.span(k, n), "gemm: rhs too short");
    assert!(ldc >= n, "gemm: output row stride below its width");
    for v in [m, n, k, a.ld, b.ld, ldc] {
        assert!(v <= c_int::MAX as usize, "gemm: dimension {v} exceeds MKL's 32-bit integers");
    }
}

fn trans(op: bool) -> c_int {
    if op {
        CBLAS_TRANS
    } else {
        CBLAS_NO_TRANS
    }
}

/// `C = A B + beta C` for an `m x n` output with row stride `ldc`, on the calling thread.
///
/// # Safety
/// `c` must be valid for reads and writes of the `m x n` block with row stride `ldc`, and no
/// other thread may access that block during the call. (A raw pointer, because parallel
/// callers write disjoint column blocks of one matrix, which no slice can express.)
#[allow(clippy::too_many_arguments)] // cblas_sgemm's own arguments
pub unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    a: Operand<f32>,
    b: Operand<f32>,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    check_dims(m, n, k, &a, &b, ldc);
    if m == 0 || n == 0 {
        return;
    }
    match cpu_gemm() {
        CpuGemm::Mkl(mkl) => (mkl.sgemm)(
            CBLAS_ROW_MAJOR,
            trans(a.transposed),
            trans(b.transposed),
            m as c_int,
            n as c_int,
            k as c_int,
            1.0,
            a.data.as_ptr(),
            a.ld as c_int,
            b.data.as_ptr(),
            b.ld as c_int,
            beta,
            c,
            ldc as c_int,
        ),
        CpuGemm::Builtin => {
            // Row/column strides of each operand (the gemm crate takes both).
            let strides = |op: &Operand<f32>| {
                if op.transposed {
                    (op.ld as isize, 1)
                } else {
                    (1, op.ld as isize)
                }
            };
            let (a_cs, a_rs) = strides(&a);
            let (b_cs, b_rs) = strides(&b);
            // Safety: spans checked above, `c` by the caller; gemm computes dst = alpha dst + beta lhs rhs.
            {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c,
                    1,
                    ldc as isize,
                    beta != 0.0,
                    a.data.as_ptr(),
                    a_cs,
                    a_rs,
                    b.data.as_ptr(),
                    b_cs,
                    b_rs,
                    beta,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        }
    }
}

/// `C = A B + beta C` with bf16 operands and f32 accumulation, on MKL (the callers check
/// [`mkl`] when the model is built).
///
/// # Safety
/// As for [`gemm_f32`].
#[allow(clippy::too_many_arguments)] // cblas_gemm_bf16bf16f32's own arguments
pub unsafe fn gemm_bf16(
    m: usize,
    n: usize,
    k: usize,
    a: Operand<bf16>,
    b: Operand<bf16>,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    check_dims(m, n, k, &a, &b, ldc);
    if m == 0 || n == 0 {
        return;
    }
    let mkl = mkl().expect("bf16 GEMM without MKL; the model builder refuses bf16 without it");
    (mkl.gemm_bf16)(
        CBLAS_ROW_MAJOR,
        trans(a.transposed),
        trans(b.transposed),
        m as c_int,
        n as c_int,
        k as c_int,
        1.0,
        a.data.as_ptr() as *const u16,
        a.ld as c_int,
        b.data.as_ptr() as *const u16,
        b.ld as c_int,
        beta,
        c,
        ldc as c_int,
    )
}

/// A raw pointer that may cross rayon's thread boundary; each task writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// A method, so closures capture the whole wrapper rather than its non-`Send` field.
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(
        m: usize,
        n: usize,
        k: usize,
        a: &dyn Fn(usize, usize) -> f32,
        b: &dyn Fn(usize, usize) -> f32,
    ) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a(i, p) as f64 * b(p, j) as f64).sum::<f64>() as f32;
            }
        }
        c
    }

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32
                    / 500.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn f32_products_match_naive_for_every_layout() {
        let (m, n, k) = (37, 53, 29);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = vals(m * k + 5, 1);
            let b = vals(k * n + 7, 2);
            let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
            let av = |i: usize, p: usize| if ta { a[p * lda + i] } else { a[i * lda + p] };
            let bv = |p: usize, j: usize| if tb { b[j * ldb + p] } else { b[p * ldb + j] };
            let want = naive(m, n, k, &av, &bv);
            // Output with a wider row stride and beta = 1 on a prefilled value.
            let ldc = n + 3;
            let mut c = vec![0.5f32; m * ldc];
            unsafe {
                gemm_f32(
                    m,
                    n,
                    k,
                    Operand { data: &a, ld: lda, transposed: ta },
                    Operand { data: &b, ld: ldb, transposed: tb },
                    1.0,
                    c.as_mut_ptr(),
                    ldc,
                )
            };
            for i in 0..m {
                for j in 0..n {
                    assert!(
                        (c[i * ldc + j] - 0.5 - want[i * n + j]).abs() < 1e-4,
                        "{ta} {tb} ({i},{j})"
                    );
                }
                assert_eq!(c[i * ldc + n], 0.5, "padding untouched");
            }
        }
    }

    #[test]
    fn bf16_products_accumulate_in_f32() {
        if let Err(reason) = mkl() {
            assert!(std::env::var("SD_REQUIRE_MKL").is_err(), "SD_REQUIRE_MKL set but {reason}");
            return;
        }
        let (m, n, k) = (33, 40, 300);
        let a: Vec<bf16> = vals(m * k, 3).into_iter().map(bf16::from_f32).collect();
        let b: Vec<bf16> = vals(n * k, 4).into_iter().map(bf16::from_f32).collect();
        let want = naive(m, n, k, &|i, p| a[i * k + p].to_f32(), &|p, j| b[j * k + p].to_f32());
        let mut c = vec![0f32; m * n];
        unsafe {
            gemm_bf16(m, n, k, Operand::new(&a, k), Operand::t(&b, k), 0.0, c.as_mut_ptr(), n)
        };
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-3, "{x} vs {y}");
        }
    }
}
