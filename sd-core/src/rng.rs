//! Torch-compatible random numbers: [`TorchGenerator`] reproduces `torch.Generator("cpu")` bit for
//! bit, and [`Generators`] reproduces diffusers' `randn_tensor(shape, generator=...)` with one
//! generator for the whole batch or one per batch element.
//!
//! # What is reproduced
//!
//! * `manual_seed(seed)`: torch seeds its mt19937 with the low 32 bits of the (64-bit) seed, so
//!   seeds `s` and `s + 2**32` give the same stream (torch still reports the full seed back).
//! * `torch.randn(n, generator=g)` for float32, **bit for bit**, for every `n`:
//!   * `n >= 16` takes torch's `normal_fill` path: `n` uniform floats with 24 random bits each,
//!     then Box-Muller on blocks of 16 (`u1 = 1 - x[j]`, `u2 = x[j + 8]`); when `n % 16 != 0`, the
//!     last 16 values are redrawn and transformed again. On x86-64 (the wheels' AVX2 kernel, which
//!     AVX-512 machines use too), `log` and `sincos` are the `avx_mathfun` polynomials, and GCC
//!     fused most of their multiply-adds into FMAs; [`TorchGenerator::randn`] is a scalar port of
//!     that exact instruction sequence (see `normal_fill_16`).
//!   * `n < 16` takes `at::normal_distribution<double>` per element: two 53-bit uniform doubles,
//!     `r = sqrt(-2 log1p(-u2))`, `theta = 2 pi u1`, returns `r cos(theta)` and keeps `r sin(theta)`
//!     in the generator for the next small draw, as torch does.
//! * `torch.rand(n)` (float32) and the raw `random()` / `random64()` draws.
//!
//! Torch on other CPUs (aarch64, or x86 without AVX2) uses a libm-based `normal_fill` whose values
//! differ in the last bits; this module reproduces the x86-64 (AVX2/AVX-512) results, which are
//! what diffusers users on x86 get.

use candle_core::{Device, Tensor};

use crate::{Error, Result};

const STATE_N: usize = 624;
const STATE_M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// torch's default CPU generator seed (`default_rng_seed_val`).
pub const TORCH_DEFAULT_SEED: u64 = 67_280_421_310_721;

/// A CPU random generator that reproduces `torch.Generator("cpu").manual_seed(seed)` exactly:
/// the same mt19937 stream, the same `randn`/`rand` values, and the same cached normal sample
/// between small `randn` calls.
///
/// ```
/// use sd_core::rng::TorchGenerator;
/// let mut g = TorchGenerator::new(42);
/// let noise = g.randn(4 * 64 * 64); // == torch.randn(4*64*64, generator=torch.Generator().manual_seed(42))
/// assert_eq!(noise.len(), 4 * 64 * 64);
/// ```
#[derive(Clone)]
pub struct TorchGenerator {
    seed: u64,
    state: [u32; STATE_N],
    left: usize,
    next: usize,
    next_double_normal: Option<f64>,
    next_float_normal: Option<f32>,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("seed", &self.seed)
            .field("next", &self.next)
            .field("next_double_normal", &self.next_double_normal)
            .finish_non_exhaustive()
    }
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`. Python ints below zero are taken modulo 2^64 by
    /// torch; pass them as `seed as u64`.
    pub fn new(seed: u64) -> Self {
        let mut g = Self {
            seed,
            state: [0; STATE_N],
            left: 1,
            next: 0,
            next_double_normal: None,
            next_float_normal: None,
        };
        g.manual_seed(seed);
        g
    }

    /// Re-seeds in place (`g.manual_seed(seed)`), dropping any cached normal sample.
    pub fn manual_seed(&mut self, seed: u64) {
        self.seed = seed;
        self.next_double_normal = None;
        self.next_float_normal = None;
        self.state[0] = seed as u32; // torch keeps `seed & 0xffffffff`
        for j in 1..STATE_N {
            let prev = self.state[j - 1];
            self.state[j] =
                1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(j as u32);
        }
        self.left = 1;
        self.next = 0;
    }

    /// The seed given to [`new`](Self::new) / [`manual_seed`](Self::manual_seed) (`g.initial_seed()`).
    pub fn initial_seed(&self) -> u64 {
        self.seed
    }

    fn next_state(&mut self) {
        #[inline]
        fn twist(u: u32, v: u32) -> u32 {
            (((u & UPPER_MASK) | (v & LOWER_MASK)) >> 1) ^ if v & 1 != 0 { MATRIX_A } else { 0 }
        }
        let s = &mut self.state;
        for i in 0..STATE_N - STATE_M {
            s[i] = s[i + STATE_M] ^ twist(s[i], s[i + 1]);
        }
        for i in STATE_N - STATE_M..STATE_N - 1 {
            s[i] = s[i + STATE_M - STATE_N] ^ twist(s[i], s[i + 1]);
        }
        s[STATE_N - 1] = s[STATE_M - 1] ^ twist(s[STATE_N - 1], s[0]);
        self.left = STATE_N;
        self.next = 0;
    }

    /// One raw 32-bit draw (`CPUGeneratorImpl::random()`).
    #[inline]
    pub fn random(&mut self) -> u32 {
        self.left -= 1;
        if self.left == 0 {
            self.next_state();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// One raw 64-bit draw (`CPUGeneratorImpl::random64()`): two 32-bit draws, the first one is
    /// the high word.
    #[inline]
    pub fn random64(&mut self) -> u64 {
        let hi = self.random() as u64;
        let lo = self.random() as u64;
        (hi << 32) | lo
    }

    /// A float in [0, 1) with 24 random bits (`uniform_real_distribution<float>`).
    #[inline]
    fn uniform_f32(&mut self) -> f32 {
        (self.random() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// A double in [0, 1) with 53 random bits (`uniform_real_distribution<double>`).
    #[inline]
    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// One standard normal double from `at::normal_distribution<double>`, using and refilling the
    /// generator's cached second Box-Muller sample.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n, generator=g)` in float32, bit for bit (see the module docs for the two
    /// paths torch takes). Advances the generator exactly as torch does.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            normal_fill_16(block.try_into().expect("16 values"));
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for x in tail.iter_mut() {
                *x = self.uniform_f32();
            }
            normal_fill_16(tail.try_into().expect("16 values"));
        }
        data
    }

    /// `torch.rand(n, generator=g)` in float32: uniform in [0, 1) with 24 random bits.
    pub fn rand(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform_f32()).collect()
    }

    /// `torch.randn(shape, generator=g, dtype=torch.float32)` as a tensor on `device` (drawn on the
    /// CPU, then moved, as diffusers does with a CPU generator). Convert the result to f16/bf16 to
    /// get what torch draws in those dtypes: torch computes them in f32 and rounds.
    pub fn randn_tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        let data = self.randn(n);
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(device)?)
    }
}

/// Box-Muller on 16 uniforms in place, as torch's AVX2 `NormalFill16<float>` computes it (mean 0,
/// std 1). This is a lane-by-lane port of the compiled kernel in the torch 2.x x86-64 wheels:
/// `log256_ps` / `sincos256_ps` from `avx_mathfun.h`, with the multiply-adds GCC fused into FMA
/// instructions fused here too (`mul_add`) and the others kept as separate roundings.
fn normal_fill_16(data: &mut [f32; 16]) {
    #[inline(always)]
    fn c(bits: u32) -> f32 {
        f32::from_bits(bits)
    }
    // avx_mathfun constants, as stored in the binary.
    const LOG_P: [u32; 9] = [
        0x3d90_21bb, // 7.0376836292e-2
        0xbdeb_d1b8, // -1.1514610310e-1
        0x3def_251a, // 1.1676998740e-1
        0xbdfe_5d4f, // -1.2420140846e-1
        0x3e11_e9bf, // 1.4249322787e-1
        0xbe2a_ae50, // -1.6668057665e-1
        0x3e4c_ceac, // 2.0000714765e-1
        0xbe7f_fffc, // -2.4999993993e-1
        0x3eaa_aaaa, // 3.3333331174e-1
    ];
    const LOG_Q1: u32 = 0xb95e_8083; // -2.12194440e-4
    const LOG_Q2: u32 = 0x3f31_8000; // 0.693359375
    const SQRTHF: u32 = 0x3f35_04f3;
    const MIN_NORM_POS: u32 = 0x0080_0000;
    const TWO_PI: u32 = 0x40c9_0fdb; // (float)(2 * pi)
    const FOPI: u32 = 0x3fa2_f983; // 4 / pi
    const DP1: u32 = 0xbf49_0000; // -0.78515625
    const DP2: u32 = 0xb97d_a000; // -2.4187564849853515625e-4
    const DP3: u32 = 0xb322_2169; // -3.77489497744594108e-8
    const COSCOF: [u32; 3] = [0x37cc_f5ce, 0xbab6_061a, 0x3d2a_aaa5];
    const SINCOF: [u32; 3] = [0xb94c_a1f9, 0x3c08_839e, 0xbe2a_aaa3];

    for j in 0..8 {
        let u1 = 1.0f32 - data[j];
        let u2 = data[j + 8];

        // ---- log256_ps(u1) ----
        let invalid = u1 <= 0.0; // _CMP_LE_OS (never true here: u1 is in (0, 1])
        let mut x = u1.max(c(MIN_NORM_POS));
        let imm0 = ((x.to_bits() >> 23) as i32).wrapping_sub(0x7f);
        x = c((x.to_bits() & !0x7f80_0000) | 0.5f32.to_bits());
        let mut e = imm0 as f32 + 1.0;
        let mask = x < c(SQRTHF);
        let tmp = if mask { x } else { 0.0 };
        e -= if mask { 1.0 } else { 0.0 };
        x += -1.0;
        x += tmp;
        let z = x * x;
        let mut y = c(LOG_P[0]);
        for &p in &LOG_P[1..] {
            y = y.mul_add(x, c(p));
        }
        y *= x;
        y = y.mul_add(z, e * c(LOG_Q1));
        y = (-z).mul_add(0.5, y);
        x += y;
        let mut log = e.mul_add(c(LOG_Q2), x);
        if invalid {
            log = f32::NAN;
        }
        let radius = (log * -2.0).sqrt();

        // ---- sincos256_ps(2 pi u2) ----
        let theta = c(TWO_PI) * u2;
        let xa = c(theta.to_bits() & 0x7fff_ffff);
        let mut sign_sin = theta.to_bits() & 0x8000_0000;
        let scaled = xa * c(FOPI);
        // cvttps2dq: truncation; out-of-range gives i32::MIN (theta is in [0, 2 pi) here).
        let mut k = if scaled.is_finite() && scaled.abs() < 2_147_483_648.0 {
            scaled as i32
        } else {
            i32::MIN
        };
        k = k.wrapping_add(1) & !1;
        let kf = k as f32;
        sign_sin ^= ((k & 4) as u32) << 29;
        let poly_mask = k & 2 == 0;
        let mut xr = kf.mul_add(c(DP1), xa);
        xr = c(DP2).mul_add(kf, xr);
        xr = kf.mul_add(c(DP3), xr);
        let sign_cos = ((!k.wrapping_sub(2) & 4) as u32) << 29;
        let z = xr * xr;
        let half_z = z * 0.5;
        let mut yc = c(COSCOF[0]).mul_add(z, c(COSCOF[1]));
        yc = yc.mul_add(z, c(COSCOF[2]));
        yc *= z;
        yc = z.mul_add(yc, -half_z);
        yc += 1.0;
        let mut ys = c(SINCOF[0]).mul_add(z, c(SINCOF[1]));
        ys = ys.mul_add(z, c(SINCOF[2]));
        ys *= z;
        ys = xr.mul_add(ys, xr);
        // Blend with and/andnot and add the pieces, as the kernel does.
        let ysin2 = if poly_mask { ys } else { 0.0 };
        let ysin1 = if poly_mask { 0.0 } else { yc };
        let ys_rest = ys - ysin2;
        let yc_rest = yc - ysin1;
        let sin = c((ysin2 + ysin1).to_bits() ^ sign_sin);
        let cos = c((ys_rest + yc_rest).to_bits() ^ sign_cos);

        // fmadd(n, std = 1, mean = 0) == n + 0 exactly.
        data[j] = radius * cos + 0.0;
        data[j + 8] = radius * sin + 0.0;
    }
}

/// The random source of a pipeline run, as diffusers' `generator=` argument: one
/// [`TorchGenerator`] for the whole batch, or one per batch element.
///
/// `randn(shape)` matches diffusers' `randn_tensor(shape, generator=...)`: with one generator the
/// whole tensor is drawn at once; with a list, sample `i` is drawn from generator `i` with shape
/// `[1, shape[1..]]` and the samples are concatenated. Schedulers that add noise draw from the
/// same object, so the stream continues exactly as in diffusers.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // built once per run; boxing would only add an indirection
pub enum Generators {
    /// `generator=torch.Generator().manual_seed(seed)`.
    Single(TorchGenerator),
    /// `generator=[torch.Generator().manual_seed(s) for s in seeds]`, one per batch element.
    PerSample(Vec<TorchGenerator>),
}

impl Generators {
    /// One generator for the whole batch.
    pub fn from_seed(seed: u64) -> Self {
        Generators::Single(TorchGenerator::new(seed))
    }

    /// One seed: a single generator for the whole batch; `batch` seeds: one generator per batch
    /// element (a list of one is treated as a single generator, as diffusers does). Any other count
    /// is an error.
    pub fn from_seeds(seeds: &[u64], batch: usize) -> Result<Self> {
        match seeds.len() {
            0 => Err(Error::invalid("at least one seed is required")),
            1 => Ok(Self::from_seed(seeds[0])),
            n if n == batch => {
                Ok(Generators::PerSample(seeds.iter().map(|&s| TorchGenerator::new(s)).collect()))
            }
            n => Err(Error::invalid(format!(
                "{n} seeds for a batch of {batch}; give one seed, or one per batch element"
            ))),
        }
    }

    /// The number of generators (1 for [`Generators::Single`]).
    pub fn len(&self) -> usize {
        match self {
            Generators::Single(_) => 1,
            Generators::PerSample(g) => g.len(),
        }
    }

    /// True for an empty [`Generators::PerSample`] list (which cannot draw anything).
    pub fn is_empty(&self) -> bool {
        matches!(self, Generators::PerSample(g) if g.is_empty())
    }

    /// diffusers' `randn_tensor(shape, generator=self)` in float32, on `device`. With one generator
    /// per sample, `shape[0]` generators are used (an error if there are fewer; extra ones are left
    /// untouched, as in diffusers).
    pub fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        match self {
            Generators::Single(g) => g.randn_tensor(shape, device),
            Generators::PerSample(gens) if gens.len() == 1 => gens[0].randn_tensor(shape, device),
            Generators::PerSample(gens) => {
                let batch = *shape.first().ok_or_else(|| {
                    Error::invalid("per-sample generators need a batch dimension")
                })?;
                if gens.len() < batch {
                    return Err(Error::invalid(format!(
                        "{} generators for a batch of {batch}",
                        gens.len()
                    )));
                }
                let mut one = shape.to_vec();
                one[0] = 1;
                let per = one.iter().product::<usize>();
                let mut data = Vec::with_capacity(per * batch);
                for g in gens.iter_mut().take(batch) {
                    data.extend(g.randn(per));
                }
                Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(device)?)
            }
        }
    }
}

impl From<TorchGenerator> for Generators {
    fn from(g: TorchGenerator) -> Self {
        Generators::Single(g)
    }
}
