//! `sd-cli generate` end to end on the fixture models: images against diffusers' PNGs, file
//! naming, and one-line errors with a non-zero exit for bad input.

mod support;

use std::path::Path;
use std::process::Output;

use support::*;

/// Runs the CLI with the parameters of a fixture case and checks each image against diffusers'.
fn generate_case(case: &str) -> Output {
    let json = read_case(case);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let scheduler = json["scheduler"].as_str().unwrap();
    let mut args = generate_args(&json, &json["seed"], scheduler, &out);
    args.extend(["--num-images".into(), json["num_images_per_prompt"].to_string()]);
    let result = sd_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(result.status.success(), "{case}: {}", stderr(&result));
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(stdout.contains(&format!("seed {}", json["seed"])), "{case}: summary line: {stdout}");
    let n = json["num_images_per_prompt"].as_u64().unwrap();
    for i in 0..n {
        let (ours, theirs) = if n == 1 {
            (out.clone(), pipelines().join(format!("{case}.png")))
        } else {
            (dir.path().join(format!("out-{i}.png")), pipelines().join(format!("{case}-{i}.png")))
        };
        let (mean, max) = png_diff(&ours, &theirs);
        assert!(mean <= 0.5 && max <= 4, "{case} image {i}: mean |diff| {mean:.3}, max {max}");
    }
    result
}

#[test]
fn sd2_ddim_matches_diffusers() {
    let out = generate_case("sd2_ddim");
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
}

#[test]
fn sd2_euler_nonsquare_two_images_match_diffusers() {
    generate_case("sd2_euler");
}

#[test]
fn sd2_long_prompt_matches_diffusers() {
    let out = generate_case("sd2_long");
    assert!(stderr(&out).contains("warning: prompt longer than 77 tokens"), "{}", stderr(&out));
}

#[test]
fn sd1_fp16_only_folder_matches_diffusers() {
    generate_case("sd1_euler");
}

#[test]
fn sd1_ddim_matches_diffusers() {
    generate_case("sd1_ddim");
}

#[test]
fn without_seed_a_seed_is_printed_and_reproduces_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let model = pipelines().join("sd2-tiny").display().to_string();
    let a = dir.path().join("a.png").display().to_string();
    let first =
        sd_cli(&["generate", "--prompt", "x", "--model", &model, "--steps", "1", "--out", &a]);
    assert!(first.status.success(), "{}", stderr(&first));
    let stdout = String::from_utf8_lossy(&first.stdout);
    let seed = stdout
        .split_whitespace()
        .skip_while(|w| *w != "seed")
        .nth(1)
        .expect("seed printed")
        .to_string();
    let b = dir.path().join("b.png").display().to_string();
    let second = sd_cli(&[
        "generate", "--prompt", "x", "--model", &model, "--steps", "1", "--seed", &seed, "--out",
        &b,
    ]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

/// `--threads 1` gives the image of the default (all cores): the work is split differently,
/// the result is not meant to change beyond GEMM rounding.
#[test]
fn thread_count_does_not_change_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let model = pipelines().join("sd2-tiny").display().to_string();
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args =
            vec!["generate", "--prompt", "a cat", "--model", &model, "--steps", "2", "--seed", "7"];
        args.extend_from_slice(extra);
        let out_arg = out.display().to_string();
        args.extend(["--out", &out_arg]);
        let result = sd_cli(&args);
        assert!(result.status.success(), "{extra:?}: {}", stderr(&result));
        out
    };
    let (mean, max) = png_diff(&run("default.png", &[]), &run("one.png", &["--threads", "1"]));
    assert!(mean < 0.1 && max <= 1, "mean {mean}, max {max}");
}

/// Weights read in place from the mapped files (the default) and copied at load
/// (`SD_MAP_WEIGHTS=0`) give byte-identical images, in f32 and in bf16.
#[test]
fn mapped_and_copied_weights_give_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let model = pipelines().join("sd2-tiny").display().to_string();
    for dtype in ["f32", "bf16"] {
        let run = |name: &str, env: &[(&str, &str)]| {
            let out = dir.path().join(format!("{dtype}-{name}"));
            let out_arg = out.display().to_string();
            #[rustfmt::skip]
            let args = [
                "generate", "--prompt", "a cat", "--model", &model, "--steps", "2", "--seed", "7",
                "--dtype", dtype, "--verbose", "--out", &out_arg,
            ];
            let result = sd_cli_env(&args, env);
            let err = stderr(&result);
            assert!(result.status.success(), "{dtype} {env:?}: {err}");
            (std::fs::read(out).unwrap(), err)
        };
        let (mapped, says) = run("mapped.png", &[]);
        assert!(says.contains("f32 weights read in place from the mapped files"), "{says}");
        let (copied, says) = run("copied.png", &[("SD_MAP_WEIGHTS", "0")]);
        assert!(says.contains("weights copied at load"), "{says}");
        assert!(mapped == copied, "{dtype}");
    }
}

/// f32 3x3 convolutions on Winograd F(2x2,3x3) (the default) and on im2col
/// (`SD_CONV_WINOGRAD=0`) give the same image within one level, and `--verbose` says which ran.
#[test]
fn winograd_and_im2col_convolutions_give_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let model = pipelines().join("sd2-tiny").display().to_string();
    let run = |name: &str, env: &[(&str, &str)]| {
        let out = dir.path().join(name);
        let out_arg = out.display().to_string();
        #[rustfmt::skip]
        let args = [
            "generate", "--prompt", "a cat", "--model", &model, "--steps", "2", "--seed", "7",
            "--verbose", "--out", &out_arg,
        ];
        let result = sd_cli_env(&args, env);
        let err = stderr(&result);
        assert!(result.status.success(), "{env:?}: {err}");
        (out, err)
    };
    let (winograd, says) = run("winograd.png", &[]);
    assert!(says.contains("f32 3x3 convolutions: Winograd F(2x2,3x3)"), "{says}");
    let (im2col, says) = run("im2col.png", &[("SD_CONV_WINOGRAD", "0")]);
    assert!(says.contains("f32 3x3 convolutions: im2col"), "{says}");
    let (mean, max) = png_diff(&winograd, &im2col);
    assert!(max <= 1, "Winograd against im2col: mean {mean}, max {max}");
}

/// `--dtype bf16`: every bf16 GEMM this machine has (the packed kernel, the AVX512_BF16 kernel
/// with AMX switched off, MKL with both switched off) and both convolution algorithms of the
/// packed kernels (Winograd, im2col) stay within the documented distance of the f32 image, and
/// `--verbose` names the one that ran. (Not bit-equal to each other: a sum in another order can
/// flip an activation's bf16 rounding, which the next layers carry on.) With none (both off and
/// `SD_CPU_GEMM=builtin`) the run is refused with one line that says what to install; on a CPU
/// without bf16 hardware it runs f32 instead, and says so.
#[test]
fn bf16_kernels_stay_near_f32_and_none_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = pipelines().join("sd2-tiny").display().to_string();
    let run_in = |dtype: &str, name: &str, env: &[(&str, &str)]| {
        let out = dir.path().join(name).display().to_string();
        #[rustfmt::skip]
        let args = [
            "generate", "--prompt", "a cat", "--model", &model, "--steps", "2", "--seed", "7",
            "--dtype", dtype, "--verbose", "--out", &out,
        ];
        (sd_cli_env(&args, env), out)
    };
    let run = |name: &str, env: &[(&str, &str)]| run_in("bf16", name, env);
    let (f32_run, f32_png) = run_in("f32", "f32.png", &[]);
    assert!(f32_run.status.success(), "{}", stderr(&f32_run));
    let near_f32 = |png: &str, what: &str| {
        let (mean, max) = png_diff(Path::new(&f32_png), Path::new(png));
        assert!(mean < 2.0 && mean > 0.0, "{what} against f32: mean {mean}, max {max}");
    };
    let (default, default_png) = run("default.png", &[]);
    let err = stderr(&default);
    assert!(default.status.success(), "{err}");
    assert!(err.contains("f32 GEMM: "), "{err}");
    // No bf16 hardware (neither AMX nor AVX512_BF16): sd-core's own detection decides.
    if sd_core::cpu::packed::Kernel::supported().is_empty() {
        assert!(err.contains("running F32 instead of BF16"), "{err}");
        let (none, _) = run("none.png", &[("SD_CPU_GEMM", "builtin")]);
        assert!(none.status.success(), "{}", stderr(&none));
        return;
    }
    let kernel = if err.contains("bf16 GEMM: AMX tiles") { "AMX tiles" } else { "AVX512_BF16" };
    assert!(err.contains(&format!("bf16 GEMM: {kernel}, weights packed at load")), "{err}");
    assert!(err.contains("bf16 3x3 convolutions: Winograd F(2x2,3x3)"), "{err}");
    near_f32(&default_png, kernel);
    let others = [
        ("im2col.png", vec![("SD_CONV_WINOGRAD", "0")], "bf16 3x3 convolutions: im2col"),
        ("dot.png", vec![("SD_CPU_AMX", "0")], "bf16 GEMM: AVX512_BF16"),
        ("mkl.png", vec![("SD_CPU_AMX", "0"), ("SD_CPU_AVX512BF16", "0")], "bf16 GEMM: mkl"),
    ];
    for (name, env, says) in others {
        let (other, png) = run(name, &env);
        if !other.status.success() {
            // The AVX512_BF16 kernel on AMX machines without it, or MKL where CI has not installed it.
            assert!(std::env::var("SD_REQUIRE_MKL").is_err(), "{env:?}: {}", stderr(&other));
            continue;
        }
        assert!(stderr(&other).contains(says), "{env:?}: {}", stderr(&other));
        near_f32(&png, says);
    }
    let none_env = [("SD_CPU_AMX", "0"), ("SD_CPU_AVX512BF16", "0"), ("SD_CPU_GEMM", "builtin")];
    let (none, png) = run("none.png", &none_env);
    let err = stderr(&none);
    assert_eq!(none.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("bf16")
            && err.contains("AMX")
            && err.contains("SD_CPU_AVX512BF16=0")
            && err.contains("MKL")
            && err.contains("pip install"),
        "{err}"
    );
    assert!(!Path::new(&png).exists());
}

/// `SD_WEIGHT_CACHE`: the first bf16 run writes one packed-weight file per component, the
/// next reads them without writing again, and both images are the uncached run's, byte for byte.
/// Unset, sd-cli keeps them in `$XDG_CACHE_HOME/sd-rs/packed`; `off` keeps none.
#[test]
fn the_weight_cache_is_written_once_and_changes_no_pixel() {
    if sd_core::cpu::packed::Kernel::supported().is_empty() {
        eprintln!("skipped: the packed bf16 GEMM needs AMX or AVX512_BF16");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = pipelines().join("sd2-tiny").display().to_string();
    let cache = dir.path().join("weight-cache");
    let args = |out: &Path| -> Vec<String> {
        #[rustfmt::skip]
        let args = [
            "generate", "--prompt", "a cat", "--model", &model, "--steps", "2", "--seed", "7",
            "--dtype", "bf16", "--verbose", "--out", out.to_str().unwrap(),
        ];
        args.map(String::from).to_vec()
    };
    let run = |name: &str, env: &[(&str, &str)]| {
        let out = dir.path().join(name);
        let args = args(&out);
        let run = sd_cli_env(&args.iter().map(String::as_str).collect::<Vec<_>>(), env);
        assert!(run.status.success(), "{}", stderr(&run));
        (stderr(&run), std::fs::read(out).unwrap())
    };
    let listing = |cache: &Path| {
        let mut files: Vec<_> = std::fs::read_dir(cache)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                (e.file_name().into_string().unwrap(), e.metadata().unwrap().modified().unwrap())
            })
            .collect();
        files.sort();
        files
    };
    let xdg = dir.path().join("xdg");
    let (err, uncached) = run("uncached.png", &[("XDG_CACHE_HOME", xdg.to_str().unwrap())]);
    assert!(
        err.contains("packed bf16 weights: packed at every load (SD_WEIGHT_CACHE is off)"),
        "{err}"
    );
    assert!(!xdg.join("sd-rs").join("packed").exists());
    let env = [("SD_WEIGHT_CACHE", cache.to_str().unwrap())];
    let (err, written) = run("written.png", &env);
    assert!(err.contains(&format!("packed bf16 weights: cached in {}", cache.display())), "{err}");
    assert!(written == uncached, "the run that writes the cache changed the image");
    let files = listing(&cache);
    let names: Vec<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    for (name, component) in names.iter().zip(["text_encoder", "unet", "vae"]) {
        assert!(name.starts_with(&format!("sd2-tiny-{component}-")) && name.ends_with(".sdpack"));
    }
    let (_, read) = run("read.png", &env);
    assert!(read == uncached, "the run that reads the cache changed the image");
    assert_eq!(listing(&cache), files, "the second run wrote the cache again");

    // SD_WEIGHT_CACHE unset: sd-cli's default folder, with the same files.
    let run_default = |name: &str, cache_home: &Path| {
        let out = dir.path().join(name);
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_sd-cli"))
            .args(args(&out))
            .env("HF_HUB_OFFLINE", "1")
            .env("XDG_CACHE_HOME", cache_home)
            .env_remove("SD_WEIGHT_CACHE")
            .output()
            .unwrap();
        assert!(run.status.success(), "{}", stderr(&run));
        (stderr(&run), std::fs::read(out).unwrap())
    };
    let (err, image) = run_default("default.png", &xdg);
    let default_cache = xdg.join("sd-rs").join("packed");
    let line = format!("packed bf16 weights: cached in {} (default", default_cache.display());
    assert!(err.contains(&line), "{err}");
    assert!(image == uncached);
    let names = |files: Vec<(String, _)>| -> Vec<String> {
        files.into_iter().map(|(name, _)| name).collect()
    };
    assert_eq!(names(listing(&default_cache)), names(files));

    // A default folder that cannot be made: the run is the same, with one line on stderr.
    let blocked = dir.path().join("blocked");
    std::fs::create_dir_all(&blocked).unwrap();
    std::fs::write(blocked.join("sd-rs"), b"a plain file").unwrap();
    let (err, image) = run_default("blocked.png", &blocked);
    assert!(image == uncached);
    let said: Vec<&str> = err.lines().filter(|l| l.starts_with("sd-core: weight cache")).collect();
    assert_eq!(said.len(), 1, "{err}");
    assert!(said[0].contains("cannot create it") && said[0].ends_with("loading without it"));
}

#[test]
fn bad_input_gives_one_line_errors() {
    let model = pipelines().join("sd2-tiny");
    let err = expect_error(&model, &["--height", "65"]);
    assert!(err.contains("height") && err.contains("multiple of 8"), "{err}");
    let err = expect_error(&model, &["--steps", "0"]);
    assert!(err.contains("num_inference_steps"), "{err}");
    let err = expect_error(&model, &["--scheduler", "warp-drive"]);
    assert!(
        err.contains("warp-drive")
            && err.contains("EulerDiscreteScheduler")
            && err.contains("ddim"),
        "{err}"
    );
    let err = expect_error(&model, &["--dtype", "f64"]);
    assert!(err.contains("f64"), "{err}");
    let err = expect_error(&model, &["--threads", "0"]);
    assert!(err.contains("--threads"), "{err}");
    // Far above the cores: refused at once instead of spawning (100 000 threads hung).
    let err = expect_error(&model, &["--threads", "100000"]);
    assert!(err.contains("--threads 100000 is far above") && err.contains("cores"), "{err}");
    let missing = pipelines().join("no-such-model");
    let err = expect_error(&missing, &[]);
    assert!(err.contains("no-such-model"), "{err}");
}

#[test]
fn truncated_weights_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model("sd2-tiny", dir.path());
    let weights = model.join("unet/diffusion_pytorch_model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&weights).unwrap().set_len(len / 2).unwrap();
    let err = expect_error(&model, &[]);
    assert!(err.contains("diffusion_pytorch_model.safetensors") && err.contains("unet"), "{err}");
}

#[test]
fn config_with_missing_key_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model("sd2-tiny", dir.path());
    let config = model.join("unet/config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("block_out_channels");
    std::fs::write(&config, json.to_string()).unwrap();
    let err = expect_error(&model, &[]);
    assert!(err.contains("unet/config.json") && err.contains("block_out_channels"), "{err}");
}

#[test]
fn mis_shaped_tensor_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model("sd2-tiny", dir.path());
    let config = model.join("unet/config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["cross_attention_dim"] = serde_json::json!(48);
    std::fs::write(&config, json.to_string()).unwrap();
    let err = expect_error(&model, &[]);
    assert!(err.contains("to_k.weight") && err.contains("expected"), "{err}");
}
