//! diffusers' `VaeImageProcessor.preprocess` for PIL inputs: the init images and inpainting masks
//! of the edit pipelines to tensors, resized as Pillow resizes them (see `resample.rs`).

use candle_core::{Device, Tensor};
use image::{GrayImage, RgbImage};

use super::resample::resize_lanczos;
use crate::Result;

/// Pillow's `convert("L")` of an RGB image (ITU-R 601-2 luma in 16-bit fixed point, rounded),
/// which diffusers' mask processor applies; the `image` crate's own conversion differs.
pub fn to_luma(image: &RgbImage) -> GrayImage {
    let (w, h) = image.dimensions();
    let luma = image
        .pixels()
        .map(|p| {
            let [r, g, b] = p.0.map(u32::from);
            ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
        })
        .collect();
    GrayImage::from_raw(w, h, luma).expect("one byte per pixel")
}

/// diffusers' `get_default_height_width`: an image's size rounded down to a multiple of
/// `scale`, as `(height, width)`.
pub(crate) fn default_size(width: u32, height: u32, scale: usize) -> (usize, usize) {
    let round = |v: u32| v as usize - v as usize % scale;
    (round(height), round(width))
}

/// Bytes of `channels` per pixel, resized with Lanczos to `(height, width)` and scaled to [0, 1]
/// in f32 (`np.array(image).astype(np.float32) / 255.0`), channels first: `[channels, h, w]`.
fn to_unit_chw(
    pixels: &[u8],
    (src_w, src_h): (u32, u32),
    channels: usize,
    (height, width): (usize, usize),
) -> Vec<f32> {
    let resized =
        resize_lanczos(pixels, (src_w as usize, src_h as usize), channels, (width, height));
    let mut chw = vec![0f32; channels * height * width];
    for (i, &v) in resized.iter().enumerate() {
        let (pixel, c) = (i / channels, i % channels);
        chw[c * height * width + pixel] = f32::from(v) / 255.0;
    }
    chw
}

/// The image processor: RGB images resized to `(height, width)`, in [-1, 1] (`2x - 1`):
/// `[images, 3, height, width]`, f32.
pub fn preprocess_images(
    images: &[RgbImage],
    size: (usize, usize),
    device: &Device,
) -> Result<Tensor> {
    let mut data = Vec::with_capacity(images.len() * 3 * size.0 * size.1);
    for image in images {
        let unit = to_unit_chw(image.as_raw(), image.dimensions(), 3, size);
        data.extend(unit.into_iter().map(|v| 2.0 * v - 1.0));
    }
    Ok(Tensor::from_vec(data, (images.len(), 3, size.0, size.1), device)?)
}

/// The mask processor (`do_normalize=False, do_binarize=True, do_convert_grayscale=True`): the
/// mask resized to `(height, width)`, scaled to [0, 1] and binarised (below 0.5 is 0, else 1):
/// `[1, 1, height, width]`, f32; 1 marks the pixels to repaint.
pub fn preprocess_mask(mask: &GrayImage, size: (usize, usize), device: &Device) -> Result<Tensor> {
    let unit = to_unit_chw(mask.as_raw(), mask.dimensions(), 1, size);
    let binary: Vec<f32> = unit.into_iter().map(|v| if v < 0.5 { 0.0 } else { 1.0 }).collect();
    Ok(Tensor::from_vec(binary, (1, 1, size.0, size.1), device)?)
}

/// `torch.nn.functional.interpolate(x, size=(height, width), mode="nearest")` for `[n, c, h, w]`:
/// output pixel `i` takes input `min(floor(i * (in / out)), in - 1)` with the scale in f32, as
/// torch's `nearest_idx` (which special-cases equal and doubled sizes).
pub(crate) fn resize_nearest(x: &Tensor, (height, width): (usize, usize)) -> Result<Tensor> {
    let (_, _, in_h, in_w) = x.dims4()?;
    let source = |out: usize, input: usize| -> Tensor {
        let idx: Vec<u32> = (0..out)
            .map(|i| {
                if out == input {
                    i
                } else if out == 2 * input {
                    i >> 1
                } else {
                    let scale = input as f32 / out as f32;
                    ((i as f32 * scale).floor() as usize).min(input - 1)
                }
            })
            .map(|i| i as u32)
            .collect();
        Tensor::new(idx, x.device()).expect("a vector of indices")
    };
    let rows = x.index_select(&source(height, in_h), 2)?;
    Ok(rows.index_select(&source(width, in_w), 3)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pillow 13's `convert("L")` of the 7x5 pattern image of `resample.rs`'s tests.
    #[test]
    fn luma_matches_pillow() {
        let rgb = RgbImage::from_raw(7, 5, crate::pipeline::resample::tests::pattern()).unwrap();
        let expected: [u8; 35] = [
            43, 80, 117, 154, 191, 199, 86, 134, 171, 179, 216, 103, 63, 100, 196, 83, 43, 80, 117,
            154, 191, 60, 97, 134, 171, 179, 216, 103, 151, 188, 196, 83, 43, 80, 117,
        ];
        assert_eq!(to_luma(&rgb).as_raw().as_slice(), expected);
    }

    #[test]
    fn nearest_downsampling_takes_the_first_pixel_of_each_block() -> Result<()> {
        let x = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((1, 1, 4, 4))?;
        let y = resize_nearest(&x, (2, 2))?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [0.0, 2.0, 8.0, 10.0]);
        Ok(())
    }

    #[test]
    fn mask_is_binarised_at_half() -> Result<()> {
        let mask = GrayImage::from_raw(4, 1, vec![0, 127, 128, 255]).unwrap();
        let t = preprocess_mask(&mask, (1, 4), &Device::Cpu)?;
        assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, [0.0, 0.0, 1.0, 1.0]);
        Ok(())
    }
}
