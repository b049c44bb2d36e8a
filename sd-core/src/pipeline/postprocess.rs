//! diffusers' `VaeImageProcessor.postprocess`: the VAE's output to 8-bit RGB images.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// `[batch, 3, h, w]` in [-1, 1] to RGB images, computed in f32 exactly as diffusers'
/// postprocessing does: `clamp(x / 2 + 0.5, 0, 1) * 255`, rounded half to even (numpy's round).
pub fn to_rgb_images(decoded: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (b, c, h, w) = decoded.dims4()?;
    if c != 3 {
        return Err(Error::invalid(format!("expected 3 image channels, got {c}")));
    }
    let hwc = decoded.to_dtype(DType::F32)?.permute((0, 2, 3, 1))?.contiguous()?;
    let data = hwc.flatten_all()?.to_vec1::<f32>()?;
    let to_u8 = |x: f32| ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8;
    let per_image = h * w * 3;
    Ok(data
        .chunks_exact(per_image)
        .take(b)
        .map(|img| {
            let bytes = img.iter().map(|&x| to_u8(x)).collect();
            image::RgbImage::from_raw(w as u32, h as u32, bytes)
                .expect("buffer size matches dimensions")
        })
        .collect())
}
