//! Pillow's `Image.resize(size, resample=LANCZOS)` for 8-bit images, bit for bit (Pillow's
//! `ImagingResample` in `src/libImaging/Resample.c`), so that image inputs are resized exactly as
//! diffusers' `VaeImageProcessor` resizes them: two separable passes (horizontal, then
//! vertical), each skipped when its side keeps its size, with coefficients computed in double,
//! normalised, and applied in 22-bit fixed point.

/// Lanczos-3, Pillow's `lanczos_filter`: `sinc(x) * sinc(x / 3)` on [-3, 3).
fn lanczos(x: f64) -> f64 {
    let sinc = |x: f64| {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    };
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

const LANCZOS_SUPPORT: f64 = 3.0;

/// Fractional bits of the fixed-point coefficients: 32 bits less 8 for the result and 2 for the
/// overshoot of the filter's negative lobes (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The taps of one output pixel: the first input index and fixed-point weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for resizing a side of `in_size`
/// pixels to `out_size`.
fn taps(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = LANCZOS_SUPPORT * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero; the bounds are then clamped to the image.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> =
                (xmin..xmax).map(|x| lanczos((x as f64 - center + 0.5) / filter_scale)).collect();
            let total: f64 = raw.iter().sum();
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let fixed = w * f64::from(1u32 << PRECISION_BITS);
                    (if w < 0.0 { fixed - 0.5 } else { fixed + 0.5 }) as i32
                })
                .collect();
            Taps { start: xmin, weights }
        })
        .collect()
}

/// Pillow's `clip8`: a fixed-point sum back to a byte.
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One pass over `src` (`width x height` pixels of `channels` interleaved bytes), resampling
/// rows (`horizontal`) or columns to `out` pixels with `taps`.
fn resample_pass(
    src: &[u8],
    (width, height): (usize, usize),
    channels: usize,
    taps: &[Taps],
    horizontal: bool,
) -> Vec<u8> {
    let (out_w, out_h) = if horizontal { (taps.len(), height) } else { (width, taps.len()) };
    let mut out = vec![0u8; out_w * out_h * channels];
    for y in 0..out_h {
        for x in 0..out_w {
            let tap = if horizontal { &taps[x] } else { &taps[y] };
            for c in 0..channels {
                let mut sum: i32 = 1 << (PRECISION_BITS - 1);
                for (k, &w) in tap.weights.iter().enumerate() {
                    let (sx, sy) = if horizontal { (tap.start + k, y) } else { (x, tap.start + k) };
                    sum += i32::from(src[(sy * width + sx) * channels + c]) * w;
                }
                out[(y * out_w + x) * channels + c] = clip8(sum);
            }
        }
    }
    out
}

/// Resizes `width x height` pixels of `channels` interleaved bytes (1 for L, 3 for RGB) to
/// `out_width x out_height` as Pillow's `resize(..., Image.LANCZOS)`; the same size is a copy.
pub(crate) fn resize_lanczos(
    pixels: &[u8],
    (width, height): (usize, usize),
    channels: usize,
    (out_width, out_height): (usize, usize),
) -> Vec<u8> {
    let mut pixels = pixels.to_vec();
    let mut width = width;
    if out_width != width {
        pixels = resample_pass(&pixels, (width, height), channels, &taps(width, out_width), true);
        width = out_width;
    }
    if out_height != height {
        pixels =
            resample_pass(&pixels, (width, height), channels, &taps(height, out_height), false);
    }
    pixels
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn same_size_is_a_copy() {
        let pixels: Vec<u8> = (0..4 * 3 * 3).map(|v| (v * 7 % 256) as u8).collect();
        assert_eq!(resize_lanczos(&pixels, (4, 3), 3, (4, 3)), pixels);
    }

    #[test]
    fn constant_image_stays_constant() {
        let pixels = vec![200u8; 13 * 11];
        let out = resize_lanczos(&pixels, (13, 11), 1, (8, 16));
        assert_eq!(out, vec![200u8; 8 * 16]);
    }

    /// Values from Pillow 13: a ramp `Image.frombytes("L", (6, 1), ...)` resized to 4 and 9
    /// pixels, and the RGB image of [`pattern`] (7x5) resized to 4x6, with `Image.LANCZOS`.
    #[test]
    fn matches_pillow() {
        let ramp = [0u8, 50, 100, 150, 200, 250];
        assert_eq!(resize_lanczos(&ramp, (6, 1), 1, (4, 1)), [13, 86, 164, 237]);
        assert_eq!(
            resize_lanczos(&ramp, (6, 1), 1, (9, 1)),
            [0, 19, 60, 93, 125, 157, 190, 231, 253]
        );
        assert_eq!(resize_lanczos(&pattern(), (7, 5), 3, (4, 6)), PILLOW_PATTERN_TO_4X6);
    }

    /// `bytes((x * 37 + y * 91 + c * 53) % 256 for y in range(5) for x in range(7) for c in
    /// range(3))`: a 7x5 RGB image.
    pub(crate) fn pattern() -> Vec<u8> {
        let mut px = vec![];
        for y in 0..5 {
            for x in 0..7 {
                for c in 0..3 {
                    px.push(((x * 37 + y * 91 + c * 53) % 256) as u8);
                }
            }
        }
        px
    }

    #[rustfmt::skip]
    const PILLOW_PATTERN_TO_4X6: [u8; 72] = [
        11, 62, 110, 70, 117, 201, 140, 222, 217, 218, 123, 48, 66, 132, 212, 167, 233, 93, 197,
        132, 97, 73, 77, 112, 198, 162, 117, 106, 118, 57, 103, 86, 133, 61, 146, 243, 135, 97,
        44, 32, 48, 178, 93, 199, 155, 209, 184, 164, 34, 107, 172, 130, 165, 191, 151, 191, 72,
        184, 123, 66, 125, 198, 239, 208, 168, 68, 61, 21, 94, 33, 117, 176,
    ];
}
