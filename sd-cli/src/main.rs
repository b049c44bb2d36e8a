//! `sd-cli`: text-to-image, image-to-image and inpainting from the command line with sd-core.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use sd_core::hub::DEFAULT_MODEL_ID;
use sd_core::metadata::{encode_png, read_png_parameters, GenerationInfo, Infotext};
use sd_core::pipeline::{
    parse_device, parse_dtype, to_luma, GenerateParams, InitImage, LoadOptions, PromptSyntax,
    RunHooks, StableDiffusionPipeline, StepControl, StepProgress,
};

#[derive(Parser)]
#[command(
    name = "sd-cli",
    version,
    about = "Stable Diffusion 2.x text-to-image, image-to-image and inpainting, matched to HF diffusers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt, or edit an image (--image, --mask).
    Generate(Box<GenerateArgs>),
    /// List the scheduler names `--scheduler` accepts: A1111 name, short names, diffusers class and
    /// the config overrides each name applies.
    Schedulers,
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[arg(long, required_unless_present = "from")]
    prompt: Option<String>,
    #[arg(long)]
    negative_prompt: Option<String>,
    /// A hub model id or a local diffusers folder.
    #[arg(long, default_value = DEFAULT_MODEL_ID)]
    model: String,
    /// Image height in pixels (a multiple of 8); default: the model's native size, or with
    /// --image that image's height rounded down to a multiple of 8.
    #[arg(long)]
    height: Option<usize>,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    /// Rescale the guided prediction toward the text prediction's std (diffusers' guidance_rescale; 0 = off).
    #[arg(long, default_value_t = 0.0)]
    guidance_rescale: f64,
    /// DDIM's eta: 0 is deterministic DDIM, 1 adds DDPM-like noise (DDIM only).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Seed of the torch-compatible generator; drawn at random (and printed) when absent.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Scheduler (sampler): a diffusers class name (DPMSolverMultistepScheduler), a short name
    /// (dpmpp_2m_karras) or an A1111 name ("DPM++ 2M Karras"), case-insensitive; built from the
    /// model's scheduler config plus the name's overrides. `sd-cli schedulers` lists them all.
    /// Default: the model's own scheduler.
    #[arg(long, value_name = "NAME")]
    scheduler: Option<String>,
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU worker threads (default: RAYON_NUM_THREADS, else one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Print what runs the work (on stderr): the CPU and threads, the f32 GEMM backend and why,
    /// and the bf16 kernel.
    #[arg(long, short)]
    verbose: bool,
    /// Start from this image (image-to-image, or inpainting with --mask); it is resized to the
    /// output size as diffusers does (Lanczos).
    #[arg(long, value_name = "IN.png")]
    image: Option<PathBuf>,
    /// Inpainting: repaint the white pixels of this mask (the size of --image) and keep the rest.
    #[arg(long, value_name = "MASK.png")]
    mask: Option<PathBuf>,
    /// How much of --image to change, in (0, 1]: the share of the steps run from the image's
    /// noised latents. Default: 0.8 for image-to-image, 1.0 for inpainting.
    #[arg(long)]
    strength: Option<f64>,
    /// Apply a LoRA (.safetensors, diffusers/PEFT or kohya layout) with weight SCALE (default 1).
    /// Repeatable: each file is its own adapter. Applied unfused (added at each layer's forward
    /// as two small matmuls): loading copies no weight, while fusing would copy every targeted
    /// weight for a barely faster step.
    #[arg(long, value_name = "FILE[:SCALE]")]
    lora: Vec<String>,
    /// A textual-inversion embedding (.safetensors) to load, with the token that stands for it
    /// in prompts (default: the file's own token); repeatable.
    #[arg(long = "embedding", value_name = "FILE[:TOKEN]")]
    embeddings: Vec<String>,
    /// Encode the prompts with the output of the text encoder's layer n - N (diffusers'
    /// clip_skip; A1111's "clip skip" N + 1), for the prompt and the negative prompt.
    #[arg(long, value_name = "N")]
    clip_skip: Option<usize>,
    /// How prompts are read: plain (diffusers) or a1111 ((word:1.3), [word], BREAK, prompts
    /// longer than 75 tokens in chunks, as AUTOMATIC1111's webui).
    #[arg(long, default_value = "plain", value_parser = ["plain", "a1111"])]
    prompt_syntax: String,
    /// Output PNG; with --num-images K > 1 the files are FILE-0.png ... FILE-(K-1).png.
    #[arg(long)]
    out: PathBuf,
    /// Do not write the settings into the PNG. By default each PNG carries them in a
    /// `parameters` text chunk in AUTOMATIC1111's format (read by A1111, Civitai and
    /// `--from`).
    #[arg(long)]
    no_metadata: bool,
    /// Make an image again from the settings in its PNG metadata (ours or AUTOMATIC1111's):
    /// prompt, negative prompt, steps, sampler, CFG scale, seed, size, strength and ours
    /// (scheduler, dtype, batch). Options given on the command line override them; --model,
    /// --image and --mask are not stored and must be given again when needed.
    #[arg(long, value_name = "IMAGE.png")]
    from: Option<PathBuf>,
}

fn main() -> ExitCode {
    // A panic is a bug, but the user still gets one line and an exit code, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        eprintln!("error: internal error: {msg}");
    }));
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match cli.command {
        Command::Generate(args) => {
            let given = matches.subcommand_matches("generate").expect("the generate subcommand");
            generate(*args, given)
        }
        Command::Schedulers => {
            print!("{}", schedulers_table());
            Ok(())
        }
    }));
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::from(101),
    }
}

/// The `sd-cli schedulers` table: one row per registry entry.
fn schedulers_table() -> String {
    use sd_core::schedulers::{OverrideValue, SCHEDULERS};
    let header = ["A1111 NAME", "SHORT NAMES", "DIFFUSERS CLASS", "CONFIG OVERRIDES"];
    let rows: Vec<[String; 4]> = SCHEDULERS
        .iter()
        .map(|e| {
            let overrides = e
                .overrides
                .iter()
                .map(|(k, v)| match v {
                    OverrideValue::Bool(b) => format!("{k}={b}"),
                    OverrideValue::Str(s) => format!("{k}={s}"),
                    OverrideValue::Float(f) => format!("{k}={f}"),
                })
                .collect::<Vec<_>>()
                .join(", ");
            let a1111 =
                if e.a1111_names.is_empty() { "-".to_string() } else { e.a1111_names.join(", ") };
            [a1111, e.aliases.join(", "), e.class_name.to_string(), overrides]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: [&str; 4]| -> String {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i == 3 {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(header);
    for r in &rows {
        out.push_str(&line([&r[0], &r[1], &r[2], &r[3]]));
    }
    out.push_str(
        "\nAny name in the first three columns works with --scheduler (case-insensitive; spaces, '-' and '_' are \
         ignored, '+' reads as 'p').\nThe scheduler is built from the model's scheduler_config.json (diffusers' \
         from_config) with the overrides on top;\na class name alone keeps the model's config as it is.\n",
    );
    out
}

fn one_line(e: &anyhow::Error) -> String {
    e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ").replace('\n', " ")
}

fn output_paths(out: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem =
        out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    let ext =
        out.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_else(|| "png".into());
    (0..n).map(|i| out.with_file_name(format!("{stem}-{i}.{ext}"))).collect()
}

/// Refuses an `--out` that cannot be written before the slow part: in a missing folder, a
/// folder itself, or with an extension that is no image format.
fn check_output(out: &Path, num_images: usize) -> anyhow::Result<()> {
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            anyhow::bail!("output folder {} does not exist", parent.display());
        }
    }
    if out.is_dir() {
        anyhow::bail!("--out {} is a directory, not an image file", out.display());
    }
    // The first file's name; the others differ only in their number. Images are PNGs (with
    // their settings in a text chunk).
    let first = &output_paths(out, num_images.clamp(1, 2))[0];
    if image::ImageFormat::from_path(first).ok() != Some(image::ImageFormat::Png) {
        anyhow::bail!("--out {}: not an image file name (e.g. out.png)", first.display());
    }
    Ok(())
}

/// The `--image`, `--mask` and `--strength` of an edit run, read and checked; `None` without
/// `--image`.
fn init_image(
    image: Option<&Path>,
    mask: Option<&Path>,
    strength: Option<f64>,
) -> anyhow::Result<Option<InitImage>> {
    let open = |path: &Path| {
        image::open(path).map_err(|e| anyhow::anyhow!("cannot read image {}: {e}", path.display()))
    };
    let Some(image) = image else {
        if mask.is_some() {
            anyhow::bail!("--mask needs --image (the image to inpaint)");
        }
        if strength.is_some() {
            anyhow::bail!("--strength needs --image (the image to start from)");
        }
        return Ok(None);
    };
    let image = open(image)?.to_rgb8();
    let mut init = match mask {
        // Pillow's `convert("L")`, as diffusers' mask processor, unless the mask is gray already.
        Some(path) => match open(path)? {
            image::DynamicImage::ImageLuma8(gray) => InitImage::with_mask(image, gray),
            other => InitImage::with_mask(image, to_luma(&other.to_rgb8())),
        },
        None => InitImage::new(image),
    };
    if let Some(strength) = strength {
        init.strength = strength;
    }
    Ok(Some(init))
}

/// `--lora FILE[:SCALE]` values, each loaded as adapter `lora<i>` and all made active.
fn load_loras(pipe: &StableDiffusionPipeline, loras: &[String]) -> anyhow::Result<()> {
    let mut active = Vec::with_capacity(loras.len());
    for (i, arg) in loras.iter().enumerate() {
        // A suffix that is not a number belongs to the path.
        let (file, scale) = match arg.rsplit_once(':').map(|(f, s)| (f, s.parse::<f64>())) {
            Some((file, Ok(scale))) => (file, scale),
            _ => (arg.as_str(), 1.0),
        };
        let name = format!("lora{i}");
        pipe.load_lora(Path::new(file), &name)?;
        active.push((name, scale));
    }
    Ok(pipe.set_adapters(&active)?)
}

/// `--embedding FILE[:TOKEN]`: the whole argument when it names a file, else split at the last
/// `:`.
fn embedding_arg(arg: &str) -> (&Path, Option<&str>) {
    match arg.rsplit_once(':') {
        Some((file, token)) if !Path::new(arg).is_file() && !file.is_empty() => {
            (Path::new(file), Some(token))
        }
        _ => (Path::new(arg), None),
    }
}

/// `--from`: fills every setting the command line leaves out from the image's metadata. Returns
/// the settings read (to check the model hash against) and, for an image from a batch drawn
/// with one seed, its place in that batch.
fn apply_replay(
    args: &mut GenerateArgs,
    given: &ArgMatches,
) -> anyhow::Result<Option<GenerationInfo>> {
    let Some(path) = args.from.clone() else { return Ok(None) };
    let bytes =
        std::fs::read(&path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let text = read_png_parameters(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        .ok_or_else(|| {
            anyhow::anyhow!("{} has no generation settings (no `parameters` text)", path.display())
        })?;
    let info = GenerationInfo::from_infotext(&Infotext::parse(&text))
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let unset = |id: &str| given.value_source(id) != Some(ValueSource::CommandLine);
    if unset("prompt") {
        args.prompt = Some(info.prompt.clone());
    }
    if unset("negative_prompt") && !info.negative_prompt.is_empty() {
        args.negative_prompt = Some(info.negative_prompt.clone());
    }
    if let (true, Some((w, h))) = (unset("width") && unset("height"), info.size) {
        (args.width, args.height) = (Some(w), Some(h));
    }
    macro_rules! fill {
        ($id:literal, $field:ident, $value:expr) => {
            if let (true, Some(v)) = (unset($id), $value) {
                args.$field = v;
            }
        };
    }
    fill!("steps", steps, info.steps);
    fill!("guidance_scale", guidance_scale, info.cfg_scale);
    fill!("guidance_rescale", guidance_rescale, info.guidance_rescale);
    fill!("eta", eta, info.eta);
    fill!("num_images", num_images, info.batch_size);
    fill!("dtype", dtype, info.dtype.clone());
    fill!("seed", seed, info.seed.map(Some));
    fill!("scheduler", scheduler, info.scheduler_name().map(Some));
    if unset("clip_skip") {
        // A1111's "Clip skip" N is diffusers' N - 1 (1: the last layer, no skip).
        args.clip_skip = info.clip_skip.filter(|&n| n > 1).map(|n| n - 1);
    }
    if unset("prompt_syntax") {
        // Ours say which syntax they used; A1111's prompts are always read with its syntax.
        let ours = info.engine.as_deref().is_some_and(|e| e.starts_with("sd-rs"));
        args.prompt_syntax = match (&info.prompt_syntax, ours) {
            (Some(syntax), _) => syntax.clone(),
            (None, true) => "plain".into(),
            (None, false) => "a1111".into(),
        };
    }
    if let (true, Some(strength)) = (unset("strength"), info.denoising_strength) {
        if args.image.is_none() {
            anyhow::bail!(
                "{} was made from an image (denoising strength {strength}): pass it with --image",
                path.display()
            );
        }
        args.strength = Some(strength);
    }
    Ok(Some(info))
}

fn generate(mut args: GenerateArgs, given: &ArgMatches) -> anyhow::Result<()> {
    let replayed = apply_replay(&mut args, given)?;
    // From a batch drawn with one seed, --from makes the whole batch and keeps its image.
    let keep_only = replayed
        .as_ref()
        .and_then(|i| i.batch_position)
        .filter(|_| given.value_source("num_images") != Some(ValueSource::CommandLine));
    let dtype = parse_dtype(&args.dtype)?;
    let device = parse_device(&args.device)?;
    sd_core::runtime::init_cpu(args.threads)?;
    // A command run again and again: keep the packed bf16 weights between runs (a first CPU
    // bf16 load writes them, about 3.4 GB for SD 2.1; later ones map them in a tenth of a
    // second). SD_WEIGHT_CACHE=DIR or =off overrides.
    sd_core::loading::set_default_weight_cache_dir(sd_core::loading::user_weight_cache_dir());
    if args.num_images == 0 {
        anyhow::bail!("--num-images must be at least 1");
    }
    check_output(&args.out, keep_only.map_or(args.num_images, |_| 1))?;
    let mut params = GenerateParams::new(args.prompt.unwrap_or_default());
    params.negative_prompts = args.negative_prompt.map(|n| vec![n]);
    params.height = args.height;
    params.width = args.width;
    params.num_inference_steps = args.steps;
    params.guidance_scale = args.guidance_scale;
    params.guidance_rescale = args.guidance_rescale;
    params.eta = args.eta;
    params.num_images_per_prompt = args.num_images;
    params.seeds = vec![args.seed.unwrap_or_else(sd_core::pipeline::random_seed)];
    params.scheduler = args.scheduler;
    params.init_image = init_image(args.image.as_deref(), args.mask.as_deref(), args.strength)?;
    params.clip_skip = args.clip_skip;
    params.prompt_syntax = args.prompt_syntax.parse()?;

    let started = Instant::now();
    let mut opts = LoadOptions { device, dtype, ..LoadOptions::default() };
    opts.hub.progress = true;
    let mut pipe = StableDiffusionPipeline::from_pretrained(&args.model, &opts)?;
    if pipe.dtype() != dtype {
        eprintln!(
            "note: running {:?} instead of {dtype:?}: this CPU has neither AMX nor AVX512_BF16, \
             where bf16 would be emulated and slower than f32",
            pipe.dtype()
        );
    }
    if args.verbose {
        match pipe.device().is_cpu() {
            true => {
                let weights = match sd_core::loading::maps_weights() {
                    true => "f32 weights read in place from the mapped files (SD_MAP_WEIGHTS=0 copies them)",
                    false => "weights copied at load (SD_MAP_WEIGHTS=0)",
                };
                let cpu = sd_core::cpu::describe(pipe.dtype());
                eprintln!("dtype {:?}\n{cpu}\n{weights}", pipe.dtype())
            }
            false => eprintln!("device {:?}, dtype {:?}", pipe.device(), pipe.dtype()),
        }
    }
    for embedding in &args.embeddings {
        let (file, token) = embedding_arg(embedding);
        pipe.load_textual_inversion(file, token)?;
    }
    // Check the scheduler name before the slow part.
    pipe.scheduler(params.scheduler.as_deref(), None)?;
    load_loras(&pipe, &args.lora)?;
    let load_time = started.elapsed();
    if let Some(info) = replayed.as_ref().filter(|i| !i.loras.is_empty() && args.lora.is_empty()) {
        let loras: Vec<String> = info.loras.iter().map(|(n, w)| format!("{n} ({w})")).collect();
        eprintln!(
            "warning: the image was made with LoRAs {}; pass them with --lora FILE:WEIGHT to make it again",
            loras.join(", ")
        );
    }
    if let Some(want) = replayed.as_ref().and_then(|i| i.model_hash.as_deref()) {
        let have = pipe.model_hash()?;
        if have != want {
            eprintln!(
                "warning: the image was made with model hash {want}; this model's is {have}, so \
                 the result will differ"
            );
        }
    }
    let prompts = params.prompts.iter().chain(params.negative_prompts.iter().flatten());
    for prompt in prompts.filter(|_| params.prompt_syntax == PromptSyntax::Plain) {
        let prompt = pipe.expand_multi_vector_tokens(prompt)?;
        if let Some(cut) = pipe.tokenizer.truncated_text(&prompt)? {
            let max = pipe.tokenizer.max_length();
            eprintln!("warning: prompt longer than {max} tokens; this part is ignored: {cut}");
        }
    }

    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:30}] {elapsed} (eta {eta})",
        )?
        .progress_chars("=> "),
    );
    let mut on_step_end = |p: &StepProgress, _: &mut _| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        StepControl::Continue
    };
    let hooks = RunHooks { on_step_end: Some(&mut on_step_end), ..Default::default() };
    let out = pipe.generate_with(&params, hooks);
    bar.finish_and_clear();
    let out = out?;

    let indices: Vec<usize> = match keep_only {
        Some(i) if i < out.images.len() => vec![i],
        Some(i) => {
            anyhow::bail!("the image is number {i} of its batch; the run made {}", out.images.len())
        }
        None => (0..out.images.len()).collect(),
    };
    let paths = output_paths(&args.out, indices.len());
    for (written, (&i, path)) in indices.iter().zip(&paths).enumerate() {
        let text = match args.no_metadata {
            true => None,
            false => Some(pipe.generation_info(&params, &out, i)?.to_infotext().to_text()),
        };
        let png = encode_png(&out.images[i], text.as_deref())?;
        if let Err(e) = std::fs::write(path, png) {
            // All the images or none: a failed run leaves no file behind.
            for path in &paths[..written] {
                let _ = std::fs::remove_file(path);
            }
            anyhow::bail!("{}: {e}", path.display());
        }
    }
    let t = out.timings;
    // The steps run: fewer than --steps with --strength below 1.
    let steps = bar.length().unwrap_or(1).max(1) as f64;
    println!(
        "seed {} | load {:.2}s | text encoder {:.2}s | denoise {:.2}s ({:.2}s/step) | vae decode {:.2}s | wrote {}",
        out.seeds[0],
        load_time.as_secs_f64(),
        t.text_encoder.as_secs_f64(),
        t.denoise.as_secs_f64(),
        t.denoise.as_secs_f64() / steps,
        t.vae_decode.as_secs_f64(),
        paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}
