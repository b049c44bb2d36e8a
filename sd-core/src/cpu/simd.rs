//! Vectorised CPU kernels without `target-feature` flags: a kernel is a plain generic function,
//! `#[inline(always)]`, over the instruction set `S` it is compiled for ([`Avx512`], [`Avx2Fma`]
//! or [`Baseline`]), and [`simd_dispatch!`] calls the version for the running CPU. The compiler
//! vectorises the kernel's loops for each set; `S` supplies the multiply-add ([`MulAdd`]).
//!
//! Also here: [`exp_approx`], the branch-free `exp` the softmax, SiLU and GELU kernels share.

use std::sync::OnceLock;

/// `a * b + c`, fused into one instruction where the target has one, else two roundings (a
/// fused `mul_add` without hardware support is a slow library call).
pub(crate) trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// x86-64 with AVX-512 (F, VL, DQ, BW): 32 vector registers of 16 f32 lanes.
pub(crate) struct Avx512;
/// x86-64 with AVX2 and FMA: 16 vector registers of 8 f32 lanes.
pub(crate) struct Avx2Fma;
/// The baseline of the target: SSE2 on x86-64, NEON on aarch64.
pub(crate) struct Baseline;

impl MulAdd for Avx512 {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Avx2Fma {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Baseline {
    /// Fused on aarch64, where FMA is a baseline instruction.
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        if cfg!(target_arch = "aarch64") {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
}

/// The instruction sets of [`simd_dispatch!`], worst to best.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// An instruction set this CPU has. Only [`Isa::best`] (and, for tests, `Isa::all`) make one,
/// which is what makes [`simd_dispatch!`]'s calls of target-feature functions sound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Isa(Level);

impl Isa {
    /// The best instruction set of this CPU, detected once per process.
    pub(crate) fn best() -> Isa {
        static BEST: OnceLock<Level> = OnceLock::new();
        Isa(*BEST.get_or_init(detect))
    }

    /// Every instruction set this CPU has, to test each compiled version of a kernel.
    #[cfg(test)]
    pub(crate) fn all() -> Vec<Isa> {
        let mut all = vec![Isa(Level::Baseline)];
        #[cfg(target_arch = "x86_64")]
        {
            let best = Self::best().0;
            all.extend([Level::Avx2Fma, Level::Avx512].into_iter().filter(|&l| l <= best).map(Isa));
        }
        all
    }

    /// `"AVX-512"`, `"AVX2+FMA"` or `"baseline"`, for logs.
    pub(crate) fn describe(self) -> &'static str {
        match self.0 {
            Level::Baseline => "baseline",
            #[cfg(target_arch = "x86_64")]
            Level::Avx2Fma => "AVX2+FMA",
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => "AVX-512",
        }
    }

    /// Which set it is, for [`simd_dispatch!`].
    pub(crate) fn level(self) -> Level {
        self.0
    }

    /// For kernels written with AVX-512 intrinsics rather than through [`simd_dispatch!`].
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn has_avx512(self) -> bool {
        self.0 == Level::Avx512
    }

    /// AVX-512 with AVX512_BF16 (`VDPBF16PS`), for the packed bf16 GEMM.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn has_avx512_bf16(self) -> bool {
        self.has_avx512() && std::arch::is_x86_feature_detected!("avx512bf16")
    }
}

/// The CPU's brand string (CPUID leaves 0x80000002-4), e.g. "AMD EPYC 9R14", for logs.
pub(crate) fn cpu_name() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        if __cpuid(0x8000_0000).eax >= 0x8000_0004 {
            let bytes: Vec<u8> = (0x8000_0002..=0x8000_0004)
                .flat_map(|leaf| {
                    let r = __cpuid(leaf);
                    [r.eax, r.ebx, r.ecx, r.edx].into_iter().flat_map(u32::to_le_bytes)
                })
                .take_while(|&b| b != 0)
                .collect();
            return String::from_utf8_lossy(&bytes).trim().to_string();
        }
    }
    std::env::consts::ARCH.to_string()
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    use std::arch::is_x86_feature_detected as has;
    // Every feature the dispatch's functions enable.
    let avx2_fma = has!("avx2") && has!("fma");
    if avx2_fma && has!("avx512f") && has!("avx512vl") && has!("avx512dq") && has!("avx512bw") {
        Level::Avx512
    } else if avx2_fma {
        Level::Avx2Fma
    } else {
        Level::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Baseline
}

/// `kernel::<S>(args)` for the best instruction set `S` of this CPU, compiled with its target
/// features (the kernel must be `#[inline(always)]` so that it is compiled into that call):
/// `simd_dispatch!(kernel(x: &[f32], y: &mut [f32]) -> f32)`, the arguments written with their
/// types. `simd_dispatch!(isa => kernel(...))` runs the version for the given [`Isa`].
///
/// Closures do not inherit target features, so a kernel that spreads its work over rayon's
/// threads dispatches inside each task.
macro_rules! simd_dispatch {
    ($kernel:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?) => {
        $crate::cpu::simd::simd_dispatch!(
            $crate::cpu::simd::Isa::best() => $kernel($($arg: $ty),*) $(-> $ret)?
        )
    };
    ($isa:expr => $kernel:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?) => {{
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
        unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
            $kernel::<$crate::cpu::simd::Avx512>($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2_fma($($arg: $ty),*) $(-> $ret)? {
            $kernel::<$crate::cpu::simd::Avx2Fma>($($arg),*)
        }
        match $crate::cpu::simd::Isa::level($isa) {
            // Safety (both calls): an `Isa` names an instruction set this CPU has.
            #[cfg(target_arch = "x86_64")]
            $crate::cpu::simd::Level::Avx512 => unsafe { avx512($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            $crate::cpu::simd::Level::Avx2Fma => unsafe { avx2_fma($($arg),*) },
            $crate::cpu::simd::Level::Baseline => {
                $kernel::<$crate::cpu::simd::Baseline>($($arg),*)
            }
        }
    }};
}
pub(crate) use simd_dispatch;

/// `e^x` for `x <= 0`, within about 2 ulp; branch-free so loops over it vectorise.
///
/// Cephes' `expf`: `x = n ln2 + r` with `|r| <= ln2/2`, a degree-6 polynomial for `e^r`, and
/// `2^n` built in the exponent bits. Arguments below -87 (where `e^x` is below f32's normal
/// range) give about `1e-38` instead of a denormal or zero: negligible next to the row's
/// maximum, whose exponential is 1.
#[inline(always)]
pub(crate) fn exp_approx<A: MulAdd>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer, which lands in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let t = A::mul_add(x, LOG2E, ROUND);
    let n = t - ROUND;
    let r = A::mul_add(-n, LN2_LO, A::mul_add(-n, LN2_HI, x));
    let mut p = 1.987_569_1e-4f32;
    p = A::mul_add(p, r, 1.398_199_9e-3);
    p = A::mul_add(p, r, 8.333_452e-3);
    p = A::mul_add(p, r, 4.166_579_6e-2);
    p = A::mul_add(p, r, 1.666_666_5e-1);
    p = A::mul_add(p, r, 0.5);
    let e = A::mul_add(p, r * r, r) + 1.0;
    let n = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    e * f32::from_bits(((n + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fused and (on x86-64) unfused multiply-adds.
    #[test]
    fn exp_approx_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let e = (x as f64).exp();
            worst = worst.max(((exp_approx::<Baseline>(x) as f64) - e).abs() / e);
            worst = worst.max(((exp_approx::<Avx2Fma>(x) as f64) - e).abs() / e);
            x += 0.001;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_approx::<Baseline>(0.0), 1.0);
        assert!(exp_approx::<Baseline>(f32::NEG_INFINITY) < 1e-37);
    }

    /// The dispatch runs the version it names, and every version of a kernel gives its answer.
    #[test]
    fn dispatch_runs_each_instruction_set() {
        #[inline(always)]
        fn sum_products<S: MulAdd>(a: &[f32], b: &[f32]) -> f32 {
            a.iter().zip(b).fold(0.0, |acc, (&x, &y)| S::mul_add(x, y, acc))
        }
        let (a, b): (&[f32], &[f32]) = (&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]);
        for isa in Isa::all() {
            assert_eq!(simd_dispatch!(isa => sum_products(a: &[f32], b: &[f32]) -> f32), 32.0);
        }
        assert_eq!(simd_dispatch!(sum_products(a: &[f32], b: &[f32]) -> f32), 32.0);
    }
}
