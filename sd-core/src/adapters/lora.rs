//! LoRA files (`.safetensors`) in the diffusers/PEFT and kohya (sd-scripts, A1111) layouts, read
//! into [`LoraAdapter`]s whose layers are named by the module paths of our models.
//!
//! * diffusers/PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (older diffusers:
//!   `.lora.down.weight` / `.lora.up.weight`), optional `<module>.alpha`; text-encoder modules
//!   under `text_encoder.`, with or without `text_model.`.
//! * kohya: `lora_unet_<module with underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
//!   `lora_te_text_model_<module>`. Underscores are ambiguous (`to_out_0`, `conv_shortcut`), so
//!   the names are matched against the model's own module paths with dots made underscores.
//!
//! Keys in neither layout, or naming modules the model does not have, are an error
//! ([`Error::UnknownLoraKeys`]): a LoRA that silently loads half its layers gives a wrong
//! image without a word (diffusers only warns).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::nn::LoraLayer;
use crate::{Error, Result};

/// The models LoRA layers live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    TextEncoder,
    Unet,
}

/// One layer's low-rank update as the file stores it.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    /// `[rank, in]`, or `[rank, in, kh, kw]` for a convolution.
    pub down: Tensor,
    /// `[out, rank]`, or `[out, rank, 1, 1]`.
    pub up: Tensor,
    /// `alpha / rank` (rank = `down`'s first dimension), 1 without an alpha.
    pub scale: f64,
}

/// A LoRA file's layers, by component and module path of our models.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub name: String,
    /// The file it was read from (for the image metadata's name and hash).
    pub path: PathBuf,
    pub layers: BTreeMap<(Component, String), LoraWeights>,
}

/// The layers of one model that LoRAs can target, by module path.
#[derive(Debug, Default)]
pub struct ModelLayers {
    by_path: BTreeMap<String, LoraLayer>,
    /// kohya names (dots as underscores) to paths; `None` where two paths collide.
    by_kohya_name: HashMap<String, Option<String>>,
}

impl ModelLayers {
    /// `layers` as [`crate::nn::collect_layers`] returns them. Text-encoder paths lose their
    /// `text_model.` prefix (checkpoints come with and without it), as LoRA names do.
    pub fn new(layers: Vec<(String, LoraLayer)>) -> Self {
        let mut by_kohya_name = HashMap::new();
        let mut by_path = BTreeMap::new();
        for (path, layer) in layers {
            let path = strip_text_model(&path).to_string();
            by_kohya_name
                .entry(path.replace('.', "_"))
                .and_modify(|p| *p = None)
                .or_insert_with(|| Some(path.clone()));
            by_path.insert(path, layer);
        }
        Self { by_path, by_kohya_name }
    }

    pub fn get(&self, path: &str) -> Option<&LoraLayer> {
        self.by_path.get(path)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &LoraLayer)> {
        self.by_path.iter()
    }

    /// Our path for a module named as a file names it (kohya: with underscores).
    fn resolve(&self, module: &str, kohya: bool) -> Option<String> {
        let module = strip_text_model(module);
        if kohya {
            let name = module.strip_prefix("text_model_").unwrap_or(module);
            self.by_kohya_name.get(name).cloned().flatten()
        } else {
            self.by_path.contains_key(module).then(|| module.to_string())
        }
    }
}

fn strip_text_model(path: &str) -> &str {
    path.strip_prefix("text_model.").unwrap_or(path)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// `(component, module as the file names it, part, kohya naming)` of a LoRA key.
fn parse_key(key: &str) -> Option<(Component, &str, Part, bool)> {
    const PEFT: [(&str, Part); 5] = [
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    const KOHYA: [(&str, Part); 3] =
        [(".lora_down.weight", Part::Down), (".lora_up.weight", Part::Up), (".alpha", Part::Alpha)];
    let split = |rest: &'static [(&'static str, Part)], name: &str| -> Option<(usize, Part)> {
        rest.iter().find(|(suffix, _)| name.ends_with(suffix)).map(|&(s, p)| (s.len(), p))
    };
    let (component, rest, kohya) = if let Some(rest) = key.strip_prefix("lora_unet_") {
        (Component::Unet, rest, true)
    } else if let Some(rest) = key.strip_prefix("lora_te_") {
        (Component::TextEncoder, rest, true)
    } else if let Some(rest) = key.strip_prefix("unet.") {
        (Component::Unet, rest, false)
    } else if let Some(rest) = key.strip_prefix("text_encoder.") {
        (Component::TextEncoder, rest, false)
    } else {
        return None;
    };
    let (suffix, part) = if kohya { split(&KOHYA, rest)? } else { split(&PEFT, rest)? };
    Some((component, &rest[..rest.len() - suffix], part, kohya))
}

/// How many unknown keys an error lists.
const LISTED_KEYS: usize = 5;

/// Reads a LoRA file and names its layers by our module paths (`layers` of each component).
/// Tensors are loaded in `dtype` on `device`; the base model is not touched.
pub fn read_lora_file<'a>(
    path: &Path,
    name: &str,
    layers: impl Fn(Component) -> &'a ModelLayers,
    dtype: DType,
    device: &Device,
) -> Result<LoraAdapter> {
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if matches!(extension.as_str(), "pt" | "pth" | "bin" | "ckpt") {
        return Err(Error::Weights {
            path: path.to_path_buf(),
            msg: "pickle files (.pt/.pth/.bin/.ckpt) are not loaded: unpickling can run arbitrary \
                  code; convert the LoRA to .safetensors"
                .into(),
        });
    }
    if !path.is_file() {
        return Err(Error::NotFound { path: path.to_path_buf() });
    }
    let weights_error = |msg: String| Error::Weights { path: path.to_path_buf(), msg };
    let tensors = candle_core::safetensors::load(path, device)
        .map_err(|e| weights_error(format!("not a valid safetensors file: {e}")))?;

    // (component, our path) -> [down, up, alpha] keys
    let mut parts: BTreeMap<(Component, String), [Option<&str>; 3]> = BTreeMap::new();
    let mut unknown: Vec<&str> = Vec::new();
    for key in tensors.keys() {
        let resolved = parse_key(key).and_then(|(component, module, part, kohya)| {
            Some((component, layers(component).resolve(module, kohya)?, part))
        });
        match resolved {
            Some((component, path, part)) => {
                parts.entry((component, path)).or_default()[part as usize] = Some(key)
            }
            None => unknown.push(key),
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        let count = unknown.len();
        let keys = unknown.into_iter().take(LISTED_KEYS).map(String::from).collect();
        return Err(Error::UnknownLoraKeys { path: path.to_path_buf(), count, keys });
    }
    if parts.is_empty() {
        return Err(weights_error("no LoRA layers in this file".into()));
    }

    let mut out = BTreeMap::new();
    for ((component, module), [down, up, alpha]) in parts {
        let missing = |what: &str| weights_error(format!("`{module}` has no {what} weight"));
        let (down_key, up_key) =
            (down.ok_or_else(|| missing("down"))?, up.ok_or_else(|| missing("up"))?);
        let down = tensors[down_key].to_dtype(dtype)?;
        let up = tensors[up_key].to_dtype(dtype)?;
        let rank = down.dims().first().copied().unwrap_or(0);
        let alpha = match alpha {
            Some(key) => Some(tensors[key].to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?),
            None => None,
        };
        let scale = match alpha.as_deref() {
            None => 1.0,
            Some(&[alpha]) if rank > 0 => alpha / rank as f64,
            Some(_) => return Err(weights_error(format!("`{module}.alpha` is not one number"))),
        };
        let layer = layers(component).get(&module).expect("resolved above");
        check_shapes(layer, &down, &up, down_key, up_key).map_err(weights_error)?;
        out.insert((component, module), LoraWeights { down, up, scale });
    }
    Ok(LoraAdapter { name: name.to_string(), path: path.to_path_buf(), layers: out })
}

/// The factors' shapes against the layer's: `down` `[rank, in(, kh, kw)]`, `up` `[out, rank(, 1,
/// 1)]`. A linear layer also takes 1x1-conv-shaped factors (kohya saves `proj_in` that way).
fn check_shapes(
    layer: &LoraLayer,
    down: &Tensor,
    up: &Tensor,
    down_key: &str,
    up_key: &str,
) -> std::result::Result<(), String> {
    let (out_dim, in_dims) = match layer {
        LoraLayer::Linear(l) => {
            let (o, i) = l.dims().map_err(|e| e.to_string())?;
            (o, vec![i])
        }
        LoraLayer::Conv2d(c) => {
            let (o, i, kh, kw) = c.dims().map_err(|e| e.to_string())?;
            (o, vec![i, kh, kw])
        }
    };
    let trim = |dims: &[usize]| -> Vec<usize> {
        match (layer, dims) {
            (LoraLayer::Linear(_), [a, b, 1, 1]) => vec![*a, *b],
            (LoraLayer::Conv2d(_), [a, b]) if in_dims[1..] == [1, 1] => vec![*a, *b, 1, 1],
            _ => dims.to_vec(),
        }
    };
    let rank = down.dims().first().copied().unwrap_or(0);
    let mut expected_down = vec![rank];
    expected_down.extend(&in_dims);
    let mut expected_up = vec![out_dim, rank];
    if in_dims.len() == 3 {
        expected_up.extend([1, 1]);
    }
    for (key, found, expected) in
        [(down_key, down.dims(), expected_down), (up_key, up.dims(), expected_up)]
    {
        if trim(found) != expected {
            return Err(format!("tensor `{key}` has shape {found:?}, expected {expected:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_both_layouts_parse() {
        use Component::*;
        let cases = [
            (
                "unet.mid_block.resnets.0.conv1.lora_A.weight",
                (Unet, "mid_block.resnets.0.conv1", Part::Down, false),
            ),
            (
                "text_encoder.encoder.layers.0.mlp.fc1.lora_B.weight",
                (TextEncoder, "encoder.layers.0.mlp.fc1", Part::Up, false),
            ),
            ("unet.a.to_q.lora.down.weight", (Unet, "a.to_q", Part::Down, false)),
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
                (Unet, "down_blocks_0_attentions_0_proj_in", Part::Alpha, true),
            ),
            (
                "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight",
                (TextEncoder, "text_model_encoder_layers_1_mlp_fc2", Part::Up, true),
            ),
        ];
        for (key, expected) in cases {
            assert_eq!(parse_key(key), Some(expected), "{key}");
        }
        for key in ["lora_unet_x.dora_scale", "vae.decoder.lora_A.weight", "unet.x.lora_A.bias"] {
            assert_eq!(parse_key(key), None, "{key}");
        }
    }
}
