//! Bit-faithful emulations of the few numpy / torch routines the diffusers schedulers build their
//! schedules with. diffusers mixes float32 torch ops with float64 numpy ops; each function says
//! which precision it works in, and schedulers call them in the same order as diffusers does so
//! the schedules come out identical, not just close.

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
                .map(|i| if i < half { step.mul_add(i as f32, s) } else { (-step).mul_add((steps - 1 - i) as f32, e) })
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
                return if xv < xp[0] { left } else if xv > xp[0] { right } else { fp[0] };
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
