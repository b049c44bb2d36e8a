//! Bit-faithful emulations of the few numpy / torch routines the diffusers schedulers build their
//! schedules with. diffusers mixes float32 torch ops with float64 numpy ops; each function says
//! which precision it works in, and schedulers call them in the same order as diffusers does so
//! the schedules come out identical, not just close. The solvers' small numeric routines (scipy's
//! `quad`, torch's `linalg.solve`) are here too.

use crate::{Error, Result};

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU, bit for bit: `start` and
/// `end` are rounded to f32, `step = (end - start) / (steps - 1)` in f32, and element `i` is
/// `fma(step, i, start)` in the first half and `fma(-step, steps - 1 - i, end)` in the second.
pub fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    match steps {
        0 => vec![],
        1 => vec![s],
        _ => {
            let step = (e - s) / (steps - 1) as f32;
            let half = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < half {
                        step.mul_add(i as f32, s)
                    } else {
                        (-step).mul_add((steps - 1 - i) as f32, e)
                    }
                })
                .collect()
        }
    }
}

/// `torch.cumprod(x, 0)` for a float32 CPU tensor: torch accumulates in double and rounds each
/// partial product to float.
pub fn torch_cumprod_f32(x: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    x.iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in float64, as numpy computes it (`i * step + start`, with the
/// last value set to `stop` exactly).
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return vec![];
    }
    let div = num - 1;
    let delta = stop - start;
    let mut y: Vec<f64> = if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            (0..num).map(|i| i as f64 / div as f64 * delta + start).collect()
        } else {
            (0..num).map(|i| i as f64 * step + start).collect()
        }
    } else {
        (0..num).map(|i| i as f64 * delta + start).collect()
    };
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` in float64, as numpy fills it: length
/// `ceil((stop - start) / step)`, `y[0] = start`, `y[1] = start + step`, then
/// `y[i] = start + i * (y[1] - y[0])`.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 || !len.is_finite() {
        return vec![];
    }
    let len = len as usize;
    let mut y = Vec::with_capacity(len);
    y.push(start);
    if len > 1 {
        let second = start + step;
        y.push(second);
        let delta = second - start;
        for i in 2..len {
            y.push(start + i as f64 * delta);
        }
    }
    y
}

/// `np.interp(x, xp, fp)` in float64 for increasing `xp` (numpy's algorithm, including its exact
/// hits and end clamping).
pub fn np_interp(x: &[f64], xp: &[f64], fp: &[f64]) -> Vec<f64> {
    assert_eq!(xp.len(), fp.len(), "np_interp: xp and fp differ in length");
    let n = xp.len();
    assert!(n > 0, "np_interp: empty xp");
    let (left, right) = (fp[0], fp[n - 1]);
    x.iter()
        .map(|&xv| {
            if xv.is_nan() {
                return xv;
            }
            if n == 1 {
                return if xv < xp[0] {
                    left
                } else if xv > xp[0] {
                    right
                } else {
                    fp[0]
                };
            }
            if xv < xp[0] {
                return left;
            }
            if xv > xp[n - 1] {
                return right;
            }
            // j: the last index with xp[j] <= xv.
            let j = xp.partition_point(|&v| v <= xv).saturating_sub(1);
            if j == n - 1 {
                return fp[j];
            }
            if xp[j] == xv {
                return fp[j];
            }
            let slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j]);
            let mut r = slope * (xv - xp[j]) + fp[j];
            if r.is_nan() {
                r = slope * (xv - xp[j + 1]) + fp[j + 1];
                if r.is_nan() && fp[j] == fp[j + 1] {
                    r = fp[j];
                }
            }
            r
        })
        .collect()
}

/// `x.round()` of numpy: round half to even.
pub fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.log` of a float32 value as numpy computes it on x86-64 with AVX2 or AVX-512, bit for bit:
/// not the correctly rounded logarithm but numpy's SIMD rational approximation (up to 3.83 ulp
/// off; about 7% of values differ from `f32::ln`). diffusers calls it on float32 sigmas
/// (`np.log(sigmas)` in the sigma-to-timestep conversion, DEIS's coefficients), where cancellation
/// can turn a last-bit difference into a visible one.
///
/// The algorithm: `x = m * 2^e` with `m` in `[0.5, 1)`; if `m <= sqrt(1/2)`, `m = 2m` and
/// `e -= 1`; then `log(x) = P(m - 1) / Q(m - 1) + e * ln 2` with degree-5 polynomials evaluated by
/// fused multiply-adds.
#[allow(clippy::excessive_precision)] // numpy's constants, as published
pub fn np_log_f32(x: f32) -> f32 {
    const P: [f32; 6] = [
        0.0,
        9.999999999999998702108587802745220279693603515625e-01,
        2.112677543073053063722373231295403093099594116210937500e+00,
        1.480000633576506585156563387915957719087600708007812500e+00,
        3.808837741388407308125449015916092321276664733886718750e-01,
        2.589979117907922693523945627516985498368740081787109375e-02,
    ];
    const Q: [f32; 6] = [
        1.0,
        2.612677543073109236910752298653824254870414733886718750e+00,
        2.453006071784736363091258070187177509069442749023437500e+00,
        9.864942958519418960339917272754898294806480407714843750e-01,
        1.546476374983906719538025143127353000640869140625000000e-01,
        5.875095403124574342950358089902140554785728454589843750e-03,
    ];
    const LN2: f32 = std::f32::consts::LN_2;
    if x.is_nan() {
        return f32::NAN;
    }
    if x < 0.0 {
        return -f32::NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x == f32::INFINITY {
        return f32::INFINITY;
    }
    // frexp: x = m * 2^e, m in [0.5, 1) (subnormals normalized first).
    let (mut bits, mut e) = (x.to_bits(), 0i32);
    if bits >> 23 == 0 {
        bits = (x * (1u64 << 25) as f32).to_bits();
        e -= 25;
    }
    e += ((bits >> 23) & 0xff) as i32 - 126;
    let mut m = f32::from_bits((bits & 0x807f_ffff) | 0x3f00_0000);
    let mut e = e as f32;
    if m <= std::f32::consts::FRAC_1_SQRT_2 {
        m += m;
        e -= 1.0;
    }
    let m = m - 1.0;
    let mut num = P[5].mul_add(m, P[4]);
    let mut den = Q[5].mul_add(m, Q[4]);
    for k in (0..4).rev() {
        num = num.mul_add(m, P[k]);
        den = den.mul_add(m, Q[k]);
    }
    e.mul_add(LN2, num / den)
}

/// `scipy.integrate.quad(f, a, b)` for the polynomials LMS integrates: one 21-point
/// Gauss-Kronrod rule (exact for them, and what QUADPACK returns when its error estimate passes
/// at once), summed in QUADPACK's order.
#[allow(clippy::excessive_precision)] // QUADPACK's constants, as published
pub(crate) fn gauss_kronrod_21(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    const XGK: [f64; 11] = [
        0.995657163025808080735527280689003,
        0.973906528517171720077964012084452,
        0.930157491355708226001207180059508,
        0.865063366688984510732096688423493,
        0.780817726586416897063717578345042,
        0.679409568299024406234327365114874,
        0.562757134668604683339000099272694,
        0.433395394129247190799265943165784,
        0.294392862701460198131126603103866,
        0.148874338981631210884826001129720,
        0.0,
    ];
    const WGK: [f64; 11] = [
        0.011694638867371874278064396062192,
        0.032558162307964727478818972459390,
        0.054755896574351996031381300244580,
        0.075039674810919952767043140916190,
        0.093125454583697605535065465083366,
        0.109387158802297641899210590325805,
        0.123491976262065851077208092339718,
        0.134709217311473325928054001771707,
        0.142775938577060080797094273138717,
        0.147739104901338491374841515972068,
        0.149445554002916905664936468389821,
    ];
    let centr = 0.5 * (a + b);
    let hlgth = 0.5 * (b - a);
    let mut resk = WGK[10] * f(centr);
    for j in [1, 3, 5, 7, 9, 0, 2, 4, 6, 8] {
        let absc = hlgth * XGK[j];
        resk += WGK[j] * (f(centr - absc) + f(centr + absc));
    }
    resk * hlgth
}

/// `torch.linalg.solve(a, b)` for a small float32 system: Gaussian elimination with partial
/// pivoting (LAPACK's `getrf` + `getrs` order), in float32.
#[allow(clippy::needless_range_loop)] // row/column indices, as in LAPACK
pub(crate) fn solve_f32(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Result<Vec<f32>> {
    let n = b.len();
    for k in 0..n {
        // isamax: the first largest magnitude.
        let mut p = k;
        for i in k + 1..n {
            if a[i][k].abs() > a[p][k].abs() {
                p = i;
            }
        }
        if a[p][k] == 0.0 || !a[p][k].is_finite() {
            return Err(Error::invalid("singular or non-finite system in the solver coefficients"));
        }
        a.swap(k, p);
        b.swap(k, p);
        let inv = 1.0 / a[k][k];
        for i in k + 1..n {
            a[i][k] *= inv;
        }
        for j in k + 1..n {
            for i in k + 1..n {
                a[i][j] -= a[i][k] * a[k][j];
            }
        }
    }
    // getrs: L y = P b (unit lower), then U x = y, column by column as strsm does.
    for k in 0..n {
        for i in k + 1..n {
            b[i] -= b[k] * a[i][k];
        }
    }
    for k in (0..n).rev() {
        b[k] /= a[k][k];
        for i in 0..k {
            b[i] -= b[k] * a[i][k];
        }
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn np_log_f32_special_values_and_accuracy() {
        assert_eq!(np_log_f32(1.0), 0.0);
        assert_eq!(np_log_f32(0.0), f32::NEG_INFINITY);
        assert_eq!(np_log_f32(-0.0), f32::NEG_INFINITY);
        assert_eq!(np_log_f32(f32::INFINITY), f32::INFINITY);
        assert!(np_log_f32(-1.0).is_nan() && np_log_f32(f32::NAN).is_nan());
        // Values numpy 2.4 gives on AVX-512 (0.70710677 is one not correctly rounded: 0xbeb17219).
        for (x, want) in [
            (14.614647f32, 0x402b_a649u32),
            (0.029167533, 0xc062_3882),
            (2.0, 0x3f31_7218),
            (1e-30, 0xc28a_27b5),
            (0.70710677, 0xbeb1_7218),
            (3e-39, 0xc2b1_6788),
            (123456.78, 0x413b_940e),
        ] {
            assert_eq!(np_log_f32(x).to_bits(), want, "np.log({x:e})");
        }
        // Within 4 ulp of the true logarithm everywhere, subnormals included.
        for i in 0..20000u32 {
            let x = f32::from_bits(0x0000_1000 + i.wrapping_mul(104_729) % 0x7f00_0000);
            let exact = (x as f64).ln();
            let got = np_log_f32(x) as f64;
            assert!(
                (got - exact).abs() <= 4.0 * f32::EPSILON as f64 * exact.abs().max(1e-30) + 1e-37,
                "{x:e}: {got} vs {exact}"
            );
        }
    }
}
