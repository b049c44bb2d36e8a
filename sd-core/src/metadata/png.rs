//! PNG files with the settings in a `parameters` text chunk, where A1111 puts them: `tEXt` when
//! the text is Latin-1, else `iTXt` (UTF-8), as Pillow's `PngInfo.add_text` chooses.

use std::io::Cursor;

use crate::{Error, Result};

/// The keyword of the chunk A1111 writes and reads.
pub const PARAMETERS_KEY: &str = "parameters";

/// Encodes `image` as a PNG (8-bit RGB, the compression `image::save` uses) with `parameters`
/// in a text chunk before the pixels when given.
pub fn encode_png(image: &image::RgbImage, parameters: Option<&str>) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let err = |e: png::EncodingError| Error::InvalidArgument(format!("encoding a PNG: {e}"));
    let mut encoder = png::Encoder::new(&mut bytes, image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Balanced);
    if let Some(text) = parameters {
        let (key, text) = (PARAMETERS_KEY.to_string(), text.to_string());
        if text.chars().all(|c| (c as u32) < 256) {
            encoder.add_text_chunk(key, text).map_err(err)?;
        } else {
            encoder.add_itxt_chunk(key, text).map_err(err)?;
        }
    }
    let mut writer = encoder.write_header().map_err(err)?;
    writer.write_image_data(image.as_raw()).map_err(err)?;
    writer.finish().map_err(err)?;
    Ok(bytes)
}

/// The `parameters` text of a PNG (from `tEXt`, `zTXt` or `iTXt`), `None` when it has none.
/// Reads only the chunks before the pixels, so a huge or corrupt image costs nothing.
pub fn read_png_parameters(png_bytes: &[u8]) -> Result<Option<String>> {
    let err = |e: png::DecodingError| Error::InvalidArgument(format!("not a readable PNG: {e}"));
    let reader = png::Decoder::new(Cursor::new(png_bytes)).read_info().map_err(err)?;
    let info = reader.info();
    let latin1 = info.uncompressed_latin1_text.iter().find(|c| c.keyword == PARAMETERS_KEY);
    if let Some(chunk) = latin1 {
        return Ok(Some(chunk.text.clone()));
    }
    if let Some(chunk) = info.compressed_latin1_text.iter().find(|c| c.keyword == PARAMETERS_KEY) {
        return chunk.get_text().map(Some).map_err(err);
    }
    if let Some(chunk) = info.utf8_text.iter().find(|c| c.keyword == PARAMETERS_KEY) {
        return chunk.get_text().map(Some).map_err(err);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> image::RgbImage {
        image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 7]))
    }

    #[test]
    fn latin1_and_utf8_texts_round_trip() {
        for text in ["a cat\nSteps: 4, Seed: 1, Size: 5x3", "ein Bär, café", "猫, Steps: 4"] {
            let bytes = encode_png(&image(), Some(text)).unwrap();
            assert_eq!(read_png_parameters(&bytes).unwrap().as_deref(), Some(text));
            let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
            assert_eq!(decoded, image(), "pixels unchanged");
        }
        let bytes = encode_png(&image(), Some("猫")).unwrap();
        assert!(bytes.windows(4).any(|w| w == b"iTXt"));
        let bytes = encode_png(&image(), Some("café")).unwrap();
        assert!(bytes.windows(4).any(|w| w == b"tEXt"));
    }

    #[test]
    fn no_text_and_not_a_png() {
        let bytes = encode_png(&image(), None).unwrap();
        assert_eq!(read_png_parameters(&bytes).unwrap(), None);
        let err = read_png_parameters(b"GIF89a...").unwrap_err();
        assert!(err.to_string().contains("not a readable PNG"), "{err}");
    }
}
