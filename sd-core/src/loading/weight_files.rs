//! Which weight files a diffusers component folder (`unet/`, `vae/`, `text_encoder/`) uses.
//!
//! This is a pure function over file names, shared by the local folder loader
//! ([`super::component_weight_paths`]) and the hub downloader ([`crate::hub`]), so both pick the
//! same files. Only safetensors are ever chosen: `.bin`, `.ckpt` and `.pt` files are ignored.
//!
//! The names follow diffusers' `_add_variant` (variant inserted before the last extension):
//!
//! | layout | plain | variant `fp16` |
//! |---|---|---|
//! | single file | `<stem>.safetensors` | `<stem>.fp16.safetensors` |
//! | sharded index | `<stem>.safetensors.index.json` | `<stem>.safetensors.index.fp16.json` |
//!
//! plus the legacy sharded-variant index `<stem>.safetensors.fp16.index.json` that diffusers
//! still accepts. Shards are whatever the index's `weight_map` names (usually
//! `<stem>-00001-of-00002.safetensors`, or `<stem>.fp16-00001-of-00002.safetensors`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The weight stem of the diffusers model components (`unet/`, `vae/`).
pub const DIFFUSERS_STEM: &str = "diffusion_pytorch_model";
/// The weight stem of the transformers model components (`text_encoder/`).
pub const TRANSFORMERS_STEM: &str = "model";
/// The variant stored in half precision, wanted when the run dtype is f16 or bf16, and the one
/// used as a last resort when a folder holds nothing else.
pub const FP16_VARIANT: &str = "fp16";

/// The weights chosen for one component, as file names relative to the component folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightFiles {
    /// One safetensors file holding every tensor.
    Single(String),
    /// A sharded checkpoint: the index (`*.safetensors.index*.json`) whose `weight_map` names the
    /// shards (read it with [`shard_files`] or [`read_shard_files`]).
    Sharded {
        /// The file name of the index.
        index: String,
    },
}

impl WeightFiles {
    /// The file this choice starts from: the single file or the index.
    pub fn file_name(&self) -> &str {
        match self {
            WeightFiles::Single(name) => name,
            WeightFiles::Sharded { index } => index,
        }
    }
}

/// The candidate names for one variant (`None`: the plain files), in order of preference.
/// Like diffusers, a sharded index wins over a single file of the same variant.
fn candidates(stem: &str, variant: Option<&str>) -> Vec<WeightFiles> {
    match variant {
        None => vec![
            WeightFiles::Sharded { index: format!("{stem}.safetensors.index.json") },
            WeightFiles::Single(format!("{stem}.safetensors")),
        ],
        Some(v) => vec![
            WeightFiles::Sharded { index: format!("{stem}.safetensors.index.{v}.json") },
            // Legacy naming of sharded variants, still accepted by diffusers.
            WeightFiles::Sharded { index: format!("{stem}.safetensors.{v}.index.json") },
            WeightFiles::Single(format!("{stem}.{v}.safetensors")),
        ],
    }
}

/// Chooses the weight files of a component folder from the names of the files it holds.
///
/// `available` are file names relative to the component folder (`diffusion_pytorch_model.safetensors`,
/// not `unet/diffusion_pytorch_model.safetensors`); `stem` is [`DIFFUSERS_STEM`] or
/// [`TRANSFORMERS_STEM`].
///
/// Order of preference:
/// - with `variant` (e.g. `Some("fp16")`): the variant's files, then the plain files;
/// - with no variant: the plain files;
/// - in both cases the fp16 variant last, so folders that only hold fp16 weights still load.
///
/// Within one variant a sharded index wins over a single file, as in diffusers. Returns `None`
/// when the folder holds no usable safetensors weights (e.g. only `.bin` or `.ckpt` files).
pub fn choose_weight_files(
    available: &[String],
    stem: &str,
    variant: Option<&str>,
) -> Option<WeightFiles> {
    let variant = variant.filter(|v| !v.is_empty());
    let mut order: Vec<Option<&str>> = Vec::with_capacity(3);
    if let Some(v) = variant {
        order.push(Some(v));
    }
    order.push(None);
    if variant != Some(FP16_VARIANT) {
        order.push(Some(FP16_VARIANT));
    }
    order
        .into_iter()
        .flat_map(|v| candidates(stem, v))
        .find(|c| available.iter().any(|a| a == c.file_name()))
}

#[derive(serde::Deserialize)]
struct SafetensorsIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// The shard files named by a sharded safetensors index (the contents of
/// `*.safetensors.index*.json`): the unique file names of its `weight_map`, sorted.
///
/// Shard names are relative to the folder of the index; a name that is empty, absolute or that
/// leaves that folder (`/`, `\`, `..`) is an error, as is an index without a `weight_map` or with
/// an empty one. Errors are [`Error::InvalidArgument`] (the contents do not carry a path; use
/// [`read_shard_files`] for errors that name the index file).
pub fn shard_files(index_json: &str) -> Result<Vec<String>> {
    parse_shards(index_json).map_err(|msg| Error::invalid(format!("safetensors index: {msg}")))
}

/// Reads a sharded safetensors index file and returns its shard files (see [`shard_files`]), as
/// file names relative to the index's folder. Errors name the index file.
pub fn read_shard_files(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    parse_shards(&text).map_err(|msg| Error::config(index_path, msg))
}

/// Like [`read_shard_files`], but returns the full paths of the shards.
pub fn shard_paths(index_path: &Path) -> Result<Vec<PathBuf>> {
    let dir = index_path.parent().unwrap_or_else(|| Path::new(""));
    Ok(read_shard_files(index_path)?.into_iter().map(|s| dir.join(s)).collect())
}

fn parse_shards(index_json: &str) -> std::result::Result<Vec<String>, String> {
    let index: SafetensorsIndex =
        serde_json::from_str(index_json).map_err(|e| format!("not a safetensors index ({e})"))?;
    let shards: BTreeSet<String> = index.weight_map.into_values().collect();
    if shards.is_empty() {
        return Err("`weight_map` is empty".to_string());
    }
    for shard in &shards {
        let bad = shard.is_empty()
            || shard.contains('/')
            || shard.contains('\\')
            || shard == "."
            || shard == ".."
            || Path::new(shard).is_absolute();
        if bad {
            return Err(format!(
                "`weight_map` names `{shard}`, which is not a file name in the index's folder"
            ));
        }
    }
    Ok(shards.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn single(s: &str) -> Option<WeightFiles> {
        Some(WeightFiles::Single(s.to_string()))
    }

    fn sharded(s: &str) -> Option<WeightFiles> {
        Some(WeightFiles::Sharded { index: s.to_string() })
    }

    const U: &str = DIFFUSERS_STEM;

    #[test]
    fn plain_single_file() {
        let avail = names(&[
            "config.json",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.bin",
        ]);
        assert_eq!(
            choose_weight_files(&avail, U, None),
            single("diffusion_pytorch_model.safetensors")
        );
        // The variant is missing: fall back to the plain file.
        assert_eq!(
            choose_weight_files(&avail, U, Some("fp16")),
            single("diffusion_pytorch_model.safetensors")
        );
    }

    #[test]
    fn variant_preferred_when_asked_plain_otherwise() {
        let avail = names(&[
            "config.json",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.fp16.bin",
        ]);
        assert_eq!(
            choose_weight_files(&avail, U, Some("fp16")),
            single("diffusion_pytorch_model.fp16.safetensors")
        );
        assert_eq!(
            choose_weight_files(&avail, U, None),
            single("diffusion_pytorch_model.safetensors")
        );
        // An empty variant means no variant.
        assert_eq!(
            choose_weight_files(&avail, U, Some("")),
            single("diffusion_pytorch_model.safetensors")
        );
    }

    #[test]
    fn fp16_only_folder_loads_without_variant() {
        let avail = names(&["config.json", "diffusion_pytorch_model.fp16.safetensors"]);
        assert_eq!(
            choose_weight_files(&avail, U, None),
            single("diffusion_pytorch_model.fp16.safetensors")
        );
        // Another variant asked for, neither it nor plain files present: fp16 still loads.
        assert_eq!(
            choose_weight_files(&avail, U, Some("bf16")),
            single("diffusion_pytorch_model.fp16.safetensors")
        );
    }

    #[test]
    fn other_variant_preferred_over_plain() {
        let avail =
            names(&["model.safetensors", "model.bf16.safetensors", "model.fp16.safetensors"]);
        assert_eq!(
            choose_weight_files(&avail, TRANSFORMERS_STEM, Some("bf16")),
            single("model.bf16.safetensors")
        );
        assert_eq!(
            choose_weight_files(&avail, TRANSFORMERS_STEM, None),
            single("model.safetensors")
        );
    }

    #[test]
    fn never_bin_ckpt_or_pt() {
        let avail = names(&[
            "config.json",
            "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.bin",
            "diffusion_pytorch_model.bin.index.json",
            "diffusion_pytorch_model.ckpt",
            "diffusion_pytorch_model.pt",
            "v2-1_768-ema-pruned.ckpt",
        ]);
        assert_eq!(choose_weight_files(&avail, U, None), None);
        assert_eq!(choose_weight_files(&avail, U, Some("fp16")), None);
        assert_eq!(choose_weight_files(&[], U, None), None);
    }

    #[test]
    fn stems_do_not_mix() {
        let avail = names(&["model.safetensors"]);
        assert_eq!(choose_weight_files(&avail, U, None), None);
        assert_eq!(
            choose_weight_files(&avail, TRANSFORMERS_STEM, None),
            single("model.safetensors")
        );
        // A different stem that merely ends like ours is not ours.
        let avail = names(&["my_model.safetensors", "model.safetensors.bak"]);
        assert_eq!(choose_weight_files(&avail, TRANSFORMERS_STEM, None), None);
    }

    #[test]
    fn sharded_plain_and_variant() {
        let avail = names(&[
            "diffusion_pytorch_model.safetensors.index.json",
            "diffusion_pytorch_model-00001-of-00002.safetensors",
            "diffusion_pytorch_model-00002-of-00002.safetensors",
            "diffusion_pytorch_model.safetensors.index.fp16.json",
            "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        ]);
        assert_eq!(
            choose_weight_files(&avail, U, None),
            sharded("diffusion_pytorch_model.safetensors.index.json")
        );
        assert_eq!(
            choose_weight_files(&avail, U, Some("fp16")),
            sharded("diffusion_pytorch_model.safetensors.index.fp16.json")
        );
    }

    #[test]
    fn sharded_index_wins_over_single_of_same_variant() {
        let avail = names(&[
            "model.safetensors",
            "model.safetensors.index.json",
            "model-00001-of-00001.safetensors",
        ]);
        assert_eq!(
            choose_weight_files(&avail, TRANSFORMERS_STEM, None),
            sharded("model.safetensors.index.json")
        );
        // ...but the requested variant wins over a plain index.
        let avail = names(&["model.safetensors.index.json", "model.fp16.safetensors"]);
        assert_eq!(
            choose_weight_files(&avail, TRANSFORMERS_STEM, Some("fp16")),
            single("model.fp16.safetensors")
        );
    }

    #[test]
    fn legacy_variant_index_and_fp16_sharded_fallback() {
        let avail = names(&["diffusion_pytorch_model.safetensors.fp16.index.json"]);
        assert_eq!(
            choose_weight_files(&avail, U, Some("fp16")),
            sharded("diffusion_pytorch_model.safetensors.fp16.index.json")
        );
        assert_eq!(
            choose_weight_files(&avail, U, None),
            sharded("diffusion_pytorch_model.safetensors.fp16.index.json")
        );
        let avail = names(&["diffusion_pytorch_model.safetensors.index.fp16.json"]);
        assert_eq!(
            choose_weight_files(&avail, U, None),
            sharded("diffusion_pytorch_model.safetensors.index.fp16.json")
        );
    }

    #[test]
    fn diffusers_add_variant_naming() {
        // `_add_variant("diffusion_pytorch_model.safetensors.index.json", "fp16")` in diffusers
        // inserts the variant before the last extension.
        let c = candidates(U, Some("fp16"));
        assert_eq!(c[0].file_name(), "diffusion_pytorch_model.safetensors.index.fp16.json");
        assert_eq!(c[2].file_name(), "diffusion_pytorch_model.fp16.safetensors");
    }

    #[test]
    fn shard_files_unique_sorted() {
        let index = r#"{
            "metadata": {"total_size": 123},
            "weight_map": {
                "b.weight": "diffusion_pytorch_model-00002-of-00002.safetensors",
                "a.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
                "c.bias": "diffusion_pytorch_model-00002-of-00002.safetensors",
                "a.bias": "diffusion_pytorch_model-00001-of-00002.safetensors"
            }
        }"#;
        assert_eq!(
            shard_files(index).unwrap(),
            names(&[
                "diffusion_pytorch_model-00001-of-00002.safetensors",
                "diffusion_pytorch_model-00002-of-00002.safetensors"
            ])
        );
    }

    #[test]
    fn shard_files_errors() {
        for bad in [
            "not json",
            "{}",
            r#"{"weight_map": {}}"#,
            r#"{"weight_map": [1, 2]}"#,
            r#"{"weight_map": {"a": "../escape.safetensors"}}"#,
            r#"{"weight_map": {"a": "sub/dir.safetensors"}}"#,
            r#"{"weight_map": {"a": "/abs.safetensors"}}"#,
            r#"{"weight_map": {"a": ""}}"#,
        ] {
            let err = shard_files(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err}");
            assert!(err.to_string().contains("safetensors index"), "{err}");
        }
    }

    #[test]
    fn read_shard_files_names_the_file() {
        let dir = std::env::temp_dir().join(format!("sd-core-weight-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, r#"{"weight_map": {"x": "model-00001-of-00001.safetensors"}}"#)
            .unwrap();
        assert_eq!(shard_paths(&path).unwrap(), vec![dir.join("model-00001-of-00001.safetensors")]);
        std::fs::write(&path, "{").unwrap();
        let err = read_shard_files(&path).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
        assert!(err.to_string().contains("model.safetensors.index.json"), "{err}");
        let missing = dir.join("nope.index.json");
        assert!(matches!(read_shard_files(&missing), Err(Error::NotFound { .. })));
        std::fs::remove_dir_all(&dir).ok();
    }
}
