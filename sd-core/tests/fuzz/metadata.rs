//! PNG `parameters` metadata (what `sd-cli generate --from` reads from a user's file): the
//! text chunks of corrupted PNGs, and A1111 infotexts with odd lines, quotes and values, through
//! `read_png_parameters`, `Infotext::parse` and `GenerationInfo::from_infotext`.

use std::io::Cursor;

use sd_core::metadata::{encode_png, read_png_parameters, GenerationInfo, Infotext};
use sd_core::Error;

use crate::harness::{fuzz, mutate_bytes, Rng};
use crate::tokenizer::random_prompt;

/// The infotext of a run with every setting we write.
fn base_text() -> String {
    let info = GenerationInfo {
        prompt: "a (red:1.2) cube, on a table".into(),
        negative_prompt: "blurry".into(),
        steps: Some(20),
        sampler: Some("DPM++ 2M".into()),
        schedule_type: Some("Karras".into()),
        cfg_scale: Some(7.5),
        seed: Some(42),
        size: Some((768, 512)),
        model_hash: Some("abcdef1234".into()),
        model: Some("sd2-tiny".into()),
        denoising_strength: Some(0.75),
        clip_skip: Some(2),
        prompt_syntax: Some("a1111".into()),
        scheduler: Some("dpm++2m-karras".into()),
        dtype: Some("f32".into()),
        batch_size: Some(2),
        batch_position: Some(1),
        guidance_rescale: Some(0.7),
        eta: Some(0.0),
        engine: Some("sd-rs".into()),
        loras: vec![("style".into(), 0.8)],
        lora_hashes: vec![("style".into(), "0123456789".into())],
    };
    info.to_infotext().to_text()
}

/// An infotext with edits: odd settings values, quotes left open, extra lines, odd text.
fn mutated_text(rng: &mut Rng, base: &str) -> String {
    const INSERTS: [&str; 22] = [
        "Steps: -1, ",
        "Steps: 99999999999999999999999, ",
        "Seed: 18446744073709551616, ",
        "Seed: -0, ",
        "CFG scale: nan, ",
        "CFG scale: 1e999, ",
        "Size: 99999999999999999999x1, ",
        "Size: x, ",
        "Size: 64x64x64, ",
        "Clip skip: 1.5, ",
        "Batch position: , ",
        "Model: \"unterminated, ",
        "Model: \"a\\\"b\", ",
        "Sampler: \"\\ud800\", ",
        "\nNegative prompt:",
        "Negative prompt: x\n",
        "\n",
        ", ",
        ": ",
        "\"",
        "\\",
        "\u{0}",
    ];
    let mut text = base.to_string();
    for _ in 0..1 + rng.below(4) {
        match rng.below(4) {
            0 => {
                let bytes = mutate_bytes(rng, text.as_bytes());
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            1 => text = random_prompt(rng) + "\n" + &text,
            _ => {
                let mut at = rng.below(text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                let insert = *rng.pick(&INSERTS);
                text.insert_str(at, insert);
            }
        }
    }
    if rng.one_in(50) {
        // A long settings line: many pairs, or one long value.
        text = match rng.below(2) {
            0 => "Steps: 1, ".repeat(5_000),
            _ => format!("a\nSteps: 1, Seed: 2, Model: {}", "x,".repeat(20_000)),
        };
    }
    text
}

/// A PNG holding `text` in a `tEXt`/`iTXt` (as we write it) or a `zTXt` chunk, sometimes with
/// its bytes edited (chunk lengths, CRCs, the signature). Also whether it is intact: it holds
/// `text` unedited (a text a chunk cannot hold, with NUL, is left out).
fn png_with(rng: &mut Rng, text: &str) -> (Vec<u8>, bool) {
    let image = image::RgbImage::from_pixel(3, 2, image::Rgb([1, 2, 3]));
    let mut intact = true;
    let mut bytes = if rng.one_in(3) && text.chars().all(|c| (c as u32) < 256 && c != '\0') {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(Cursor::new(&mut bytes), 3, 2);
        encoder.set_color(png::ColorType::Rgb);
        encoder.add_ztxt_chunk("parameters".into(), text.into()).expect("a zTXt chunk");
        let mut writer = encoder.write_header().expect("a header");
        writer.write_image_data(image.as_raw()).expect("pixels");
        writer.finish().expect("a PNG");
        bytes
    } else {
        match encode_png(&image, Some(text)) {
            Ok(bytes) => bytes,
            Err(_) => {
                intact = false;
                encode_png(&image, None).expect("a PNG")
            }
        }
    };
    if rng.one_in(3) {
        bytes = mutate_bytes(rng, &bytes);
        intact = false;
    }
    (bytes, intact)
}

/// Reads the text back and parses it: an unreadable PNG and a setting that does not parse are
/// `Error::InvalidArgument`; an intact PNG gives its text back unchanged.
fn check(png_bytes: &[u8], text: &str, intact: bool) -> Result<(), String> {
    let read = match read_png_parameters(png_bytes) {
        Ok(read) => read,
        Err(Error::InvalidArgument(_)) if !intact => None,
        Err(other) => return Err(format!("read_png_parameters: {other:?}")),
    };
    if intact && read.as_deref() != Some(text) {
        return Err(format!("read back {read:?}"));
    }
    for text in [Some(text), read.as_deref()].into_iter().flatten() {
        let parsed = Infotext::parse(text);
        match GenerationInfo::from_infotext(&parsed) {
            Ok(info) => {
                info.scheduler_name();
                // What we write from the settings must read back to the same settings (with
                // fewer than 3 the settings line is read as prompt text, as in A1111).
                if info.to_infotext().params.len() < 3 {
                    continue;
                }
                let again = Infotext::parse(&info.to_infotext().to_text());
                let info_again = GenerationInfo::from_infotext(&again)
                    .map_err(|e| format!("re-reading our own infotext: {e}"))?;
                let settings = |i: &GenerationInfo| {
                    (i.steps, i.seed, i.size, i.clip_skip, i.batch_size, i.scheduler.clone())
                };
                if settings(&info) != settings(&info_again) {
                    return Err(format!("settings changed: {info:?} -> {info_again:?}"));
                }
            }
            Err(Error::InvalidArgument(_)) => {}
            Err(other) => return Err(format!("from_infotext: {other:?}")),
        }
    }
    Ok(())
}

#[test]
fn png_parameters() {
    let base = base_text();
    let png = encode_png(&image::RgbImage::new(3, 2), Some(&base)).unwrap();
    check(&png, &base, true).expect("the base text reads back");
    fuzz(
        "png parameters",
        800,
        |rng| {
            let text = mutated_text(rng, &base);
            let (png, intact) = png_with(rng, &text);
            (text, png, intact)
        },
        |(text, png, _)| [text.as_bytes(), b"\n==> the PNG <==\n", png].concat(),
        |(text, png, intact)| check(png, text, *intact),
    );
}
