//! The command line of `gpu_check`: sub-commands and options (see the module docs in `main.rs`).

use std::path::PathBuf;

/// The parsed command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Args {
    /// `compile`: only NVRTC-compile the kernels for `archs` (no GPU needed).
    pub compile: bool,
    pub archs: Vec<String>,
    pub kernels: bool,
    pub bench: bool,
    pub pipeline: bool,
    pub steps: usize,
    /// Image sizes in pixels: `bench` and `pipeline` run at each.
    pub sizes: Vec<usize>,
    /// `pipeline` runs in each; `bench` in each of them but f32 (which has no kernels).
    pub dtypes: Vec<String>,
    pub device: usize,
    pub tokenizer: PathBuf,
    pub work: Option<PathBuf>,
    pub keep: bool,
}

const USAGE: &str = "usage: gpu_check [all|kernels|bench|pipeline|compile]... [--steps N] \
    [--size PX,...] [--dtype f32,f16,bf16] [--device N] [--tokenizer DIR] [--work DIR] [--keep] \
    [--arch sm_80,sm_90]";

/// A comma-separated list, each item checked by `item`.
fn list<T>(
    name: &str,
    value: Option<&String>,
    item: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    let value = value.ok_or_else(|| format!("{name} needs a value"))?;
    value.split(',').map(|v| item(v).map_err(|e| format!("{name}: {e}"))).collect()
}

fn size(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(px) if px > 0 && px.is_multiple_of(64) => Ok(px),
        _ => Err(format!("`{v}` is not a positive multiple of 64")),
    }
}

fn dtype(v: &str) -> Result<String, String> {
    match v {
        "f32" | "f16" | "bf16" => Ok(v.to_string()),
        _ => Err(format!("`{v}` is not f32, f16 or bf16")),
    }
}

pub fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut args = Args {
        compile: false,
        archs: vec!["sm_80".into(), "sm_90".into()],
        kernels: false,
        bench: false,
        pipeline: false,
        steps: 4,
        sizes: vec![512, 768],
        dtypes: vec!["f32".into(), "f16".into(), "bf16".into()],
        device: 0,
        tokenizer: PathBuf::from("tests/fixtures/pipelines/sd2-tiny/tokenizer"),
        work: None,
        keep: false,
    };
    let mut it = argv.iter();
    let number = |name: &str, v: Option<&String>| -> Result<usize, String> {
        let v = v.ok_or_else(|| format!("{name} needs a value"))?;
        v.parse::<usize>().map_err(|_| format!("{name}: `{v}` is not a non-negative integer"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "all" => (args.kernels, args.bench, args.pipeline) = (true, true, true),
            "kernels" => args.kernels = true,
            "bench" => args.bench = true,
            "pipeline" => args.pipeline = true,
            "compile" => args.compile = true,
            "--arch" => {
                let v = it.next().ok_or("--arch needs a value")?;
                args.archs = v.split(',').map(str::to_string).collect();
                if args
                    .archs
                    .iter()
                    .any(|a| !a.starts_with("sm_") || a[3..].parse::<u32>().is_err())
                {
                    return Err(format!("--arch: `{v}` is not a list like sm_80,sm_90"));
                }
            }
            "--steps" => args.steps = number("--steps", it.next())?,
            "--size" => args.sizes = list("--size", it.next(), size)?,
            "--device" => args.device = number("--device", it.next())?,
            "--dtype" => args.dtypes = list("--dtype", it.next(), dtype)?,
            "--tokenizer" => {
                args.tokenizer = PathBuf::from(it.next().ok_or("--tokenizer needs a value")?)
            }
            "--work" => args.work = Some(PathBuf::from(it.next().ok_or("--work needs a value")?)),
            "--keep" => args.keep = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    if !(args.compile || args.kernels || args.bench || args.pipeline) {
        (args.kernels, args.bench, args.pipeline) = (true, true, true);
    }
    if args.steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Args, String> {
        parse_args(&s.split_whitespace().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn defaults_run_everything() {
        let a = parse("").unwrap();
        assert!(a.kernels && a.bench && a.pipeline);
        assert_eq!((a.steps, a.sizes.as_slice(), a.device, a.keep), (4, &[512, 768][..], 0, false));
        assert_eq!(a.dtypes, ["f32", "f16", "bf16"]);
        assert_eq!(a.tokenizer, PathBuf::from("tests/fixtures/pipelines/sd2-tiny/tokenizer"));
        assert_eq!(parse("all").unwrap(), a);
    }

    #[test]
    fn subcommands_and_options() {
        let a = parse(
            "kernels pipeline --steps 2 --size 512 --dtype bf16,f32 --device 1 --work /tmp/w \
             --keep --tokenizer tok",
        )
        .unwrap();
        assert!(a.kernels && !a.bench && a.pipeline);
        assert_eq!((a.steps, a.sizes.as_slice(), a.device, a.keep), (2, &[512][..], 1, true));
        assert_eq!(a.dtypes, ["bf16", "f32"]);
        assert_eq!(a.work, Some(PathBuf::from("/tmp/w")));
        assert_eq!(a.tokenizer, PathBuf::from("tok"));
    }

    #[test]
    fn compile_only() {
        let a = parse("compile --arch sm_86,sm_90").unwrap();
        assert!(a.compile && !a.kernels && !a.bench && !a.pipeline);
        assert_eq!(a.archs, vec!["sm_86".to_string(), "sm_90".to_string()]);
        assert_eq!(parse("compile").unwrap().archs, vec!["sm_80".to_string(), "sm_90".to_string()]);
    }

    #[test]
    fn bad_arguments_are_errors() {
        for bad in [
            "--steps",
            "--steps x",
            "--steps 0",
            "--size 700",
            "--size 0",
            "--size 512,",
            "--dtype f64",
            "--dtype f16,,bf16",
            "--frobnicate",
            "kernels --work",
        ] {
            assert!(parse(bad).is_err(), "{bad} should fail");
        }
        assert!(parse("--help").unwrap_err().starts_with("usage:"));
        for bad in ["compile --arch", "compile --arch 90", "compile --arch sm_x"] {
            assert!(parse(bad).is_err(), "{bad} should fail");
        }
    }
}
