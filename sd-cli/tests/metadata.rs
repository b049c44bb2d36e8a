//! The settings in every PNG (A1111's `parameters` text) and `generate --from`, which makes an
//! image again from them.

mod support;

use std::path::Path;

use sd_core::metadata::{read_png_parameters, GenerationInfo, Infotext};
use support::{pipelines, sd_cli_env, stderr};

/// sd-cli with the model-hash cache in a folder of this test process, not the user's.
fn sd_cli(args: &[&str]) -> std::process::Output {
    let cache = std::env::temp_dir().join(format!("sd-cli-metadata-{}", std::process::id()));
    sd_cli_env(args, &[("XDG_CACHE_HOME", cache.to_str().unwrap())])
}

fn model() -> String {
    pipelines().join("sd2-tiny").display().to_string()
}

fn run(args: &[&str]) {
    let out = sd_cli(args);
    assert!(out.status.success(), "sd-cli {args:?} failed: {}", stderr(&out));
}

fn settings(png: &Path) -> GenerationInfo {
    let bytes = std::fs::read(png).unwrap();
    let text = read_png_parameters(&bytes).unwrap().expect("a parameters chunk");
    GenerationInfo::from_infotext(&Infotext::parse(&text)).unwrap()
}

fn pixels(png: &Path) -> Vec<u8> {
    image::open(png).unwrap().to_rgb8().into_raw()
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

#[test]
fn pngs_carry_a1111_parameters_and_no_metadata_turns_them_off() {
    let dir = tempfile::tempdir().unwrap();
    let (m, out) = (model(), path(dir.path(), "a.png"));
    #[rustfmt::skip]
    run(&["generate", "--prompt", "a cat, on: a mat", "--negative-prompt", "blurry", "--model", &m,
        "--steps", "2", "--seed", "7", "--width", "64", "--height", "48",
        "--scheduler", "DPM++ 2M Karras", "--guidance-scale", "6", "--out", &out]);
    let text = read_png_parameters(&std::fs::read(&out).unwrap()).unwrap().unwrap();
    let (first, rest) = text.split_once('\n').unwrap();
    assert_eq!(first, "a cat, on: a mat");
    assert!(rest.starts_with("Negative prompt: blurry\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.0, Seed: 7, Size: 64x48, Model hash: "), "{text}");
    let info = settings(Path::new(&out));
    assert_eq!(info.model.as_deref(), Some("sd2-tiny"));
    assert_eq!(info.model_hash.as_ref().map(String::len), Some(10));
    assert_eq!(info.scheduler.as_deref(), Some("dpmpp_2m_karras"));
    assert_eq!(info.dtype.as_deref(), Some("f32"));
    assert_eq!(info.batch_size, None);

    let bare = path(dir.path(), "bare.png");
    #[rustfmt::skip]
    run(&["generate", "--prompt", "a cat", "--model", &m, "--steps", "1", "--seed", "7",
        "--width", "64", "--height", "48", "--no-metadata", "--out", &bare]);
    assert_eq!(read_png_parameters(&std::fs::read(&bare).unwrap()).unwrap(), None);
}

#[test]
fn from_remakes_our_image_exactly_even_from_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (m, out) = (model(), path(dir.path(), "batch.png"));
    #[rustfmt::skip]
    run(&["generate", "--prompt", "a red \"barn\", dusk", "--negative-prompt", "fog", "--model", &m,
        "--steps", "3", "--seed", "123", "--width", "48", "--height", "64",
        "--scheduler", "euler_a", "--guidance-scale", "5.5", "--guidance-rescale", "0.3",
        "--num-images", "2", "--out", &out]);
    let second = dir.path().join("batch-1.png");
    assert_eq!(settings(&second).batch_position, Some(1));
    let again = path(dir.path(), "again.png");
    run(&["generate", "--from", &second.display().to_string(), "--model", &m, "--out", &again]);
    assert_eq!(pixels(Path::new(&again)), pixels(&second), "the replay differs");
    assert_ne!(pixels(Path::new(&again)), pixels(&dir.path().join("batch-0.png")));
    assert_eq!(settings(Path::new(&again)), settings(&second));

    // A setting given on the command line wins over the image's.
    let other = path(dir.path(), "other.png");
    run(&["generate", "--from", &again, "--model", &m, "--seed", "124", "--out", &other]);
    assert_eq!(settings(Path::new(&other)).seed, Some(124));
    assert_ne!(pixels(Path::new(&other)), pixels(&second));
}

/// A PNG written by AUTOMATIC1111 (its text only: no keys of ours) gives the image that the
/// same settings give on the command line.
#[test]
fn from_reads_a1111_settings() {
    let dir = tempfile::tempdir().unwrap();
    let a1111 = dir.path().join("a1111.png");
    let text = "a lighthouse, (storm:1.2)\nNegative prompt: text\nSteps: 2, Sampler: DPM++ 2M, \
                Schedule type: Karras, CFG scale: 7, Seed: 99, Size: 56x40, Model hash: \
                0123456789, Model: v2-1_768-ema-pruned, Version: v1.10.1";
    let mut bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut bytes, 1, 1);
    enc.set_color(png::ColorType::Rgb);
    enc.add_text_chunk("parameters".into(), text.into()).unwrap();
    enc.write_header().unwrap().write_image_data(&[0, 0, 0]).unwrap();
    std::fs::write(&a1111, bytes).unwrap();

    let (m, replay, direct) = (model(), path(dir.path(), "r.png"), path(dir.path(), "d.png"));
    let out = sd_cli(&[
        "generate",
        "--from",
        &a1111.display().to_string(),
        "--model",
        &m,
        "--out",
        &replay,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("model hash 0123456789"), "no warning: {}", stderr(&out));
    #[rustfmt::skip]
    run(&["generate", "--prompt", "a lighthouse, (storm:1.2)", "--negative-prompt", "text",
        "--model", &m, "--steps", "2", "--scheduler", "dpmpp_2m_karras", "--guidance-scale", "7",
        "--seed", "99", "--width", "56", "--height", "40", "--out", &direct]);
    assert_eq!(pixels(Path::new(&replay)), pixels(Path::new(&direct)));
}

#[test]
fn from_refuses_what_it_cannot_replay() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let bare = path(dir.path(), "bare.png");
    #[rustfmt::skip]
    run(&["generate", "--prompt", "a cat", "--model", &m, "--steps", "1", "--seed", "1",
        "--width", "32", "--height", "32", "--no-metadata", "--out", &bare]);
    let cases: [(&str, &str); 3] = [
        (&bare, "has no generation settings"),
        ("/nonexistent/x.png", "cannot read /nonexistent/x.png"),
        (&m, "cannot read"),
    ];
    for (from, want) in cases {
        let out = sd_cli(&["generate", "--from", from, "--model", &m, "--out", &bare]);
        assert_eq!(out.status.code(), Some(1), "{from}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{from}: {}", stderr(&out));
    }
    // Settings of an image-to-image run need the image again.
    let edit = dir.path().join("edit.png");
    let text = "x\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 32x32, \
                Denoising strength: 0.5";
    std::fs::write(
        &edit,
        sd_core::metadata::encode_png(&image::RgbImage::new(1, 1), Some(text)).unwrap(),
    )
    .unwrap();
    let out =
        sd_cli(&["generate", "--from", &edit.display().to_string(), "--model", &m, "--out", &bare]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("pass it with --image"), "{}", stderr(&out));
}

#[test]
fn the_model_hash_is_the_unet_files_sha256_and_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let model = support::copy_model("sd2-tiny", dir.path());
    let unet = model.join("unet/diffusion_pytorch_model.safetensors");
    let out = path(dir.path(), "a.png");
    let m = model.display().to_string();
    let run_cached = || {
        #[rustfmt::skip]
        let r = sd_cli_env(
            &["generate", "--prompt", "x", "--model", &m, "--steps", "1", "--seed", "1",
              "--width", "32", "--height", "32", "--out", &out],
            &[("XDG_CACHE_HOME", cache.to_str().unwrap())],
        );
        assert!(r.status.success(), "{}", stderr(&r));
        settings(Path::new(&out)).model_hash.unwrap()
    };
    // The fixture's UNet file: `sha256sum` gives 8f8e20ad9d4195...
    assert_eq!(run_cached(), "8f8e20ad9d");
    // The second run takes the digest from the cache: a planted one shows through.
    let cache_file = cache.join("sd-rs/model-hashes.json");
    let text = std::fs::read_to_string(&cache_file).unwrap();
    assert!(text.contains("8f8e20ad9d419532bf7ecde78e4877605d26d251ebe9e458b56af39cd4c749f3"));
    std::fs::write(&cache_file, text.replace("8f8e20ad9d4195", "feedfacecafe00")).unwrap();
    assert_eq!(run_cached(), "feedfaceca");
    // A rewritten file (a new mtime) is hashed again.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&unet, std::fs::read(&unet).unwrap()).unwrap();
    assert_eq!(run_cached(), "8f8e20ad9d");
}
