//! The settings of a generated image as A1111's `parameters` text ([`GenerationInfo`]), for the
//! PNG metadata that sd-cli and the Serve app write and that `sd-cli generate --from` replays.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{GenerateOutput, GenerateParams, StableDiffusionPipeline};
use crate::metadata::GenerationInfo;
use crate::prompt::PromptSyntax;
use crate::schedulers::{
    find_scheduler, OverrideValue, SchedulerConfig, SchedulerEntry, SCHEDULERS,
};
use crate::{Error, Result};

impl StableDiffusionPipeline {
    /// The settings that made image `index` of `out` (a run of `params` on this pipeline):
    /// everything `generate` needs to make it again, with A1111's names where A1111 has them.
    pub fn generation_info(
        &self,
        params: &GenerateParams,
        out: &GenerateOutput,
        index: usize,
    ) -> Result<GenerationInfo> {
        let image = out.images.get(index).ok_or_else(|| {
            Error::InvalidArgument(format!("image {index} of a run of {}", out.images.len()))
        })?;
        let per_prompt = params.num_images_per_prompt.max(1);
        let prompt = params.prompts.get(index / per_prompt).cloned().unwrap_or_default();
        let negative_prompt = match params.negative_prompts.as_deref() {
            Some([one]) => one.clone(),
            Some(list) => list.get(index / per_prompt).cloned().unwrap_or_default(),
            None => String::new(),
        };
        // One seed per image, or one generator for the whole batch (then the image's place in
        // the batch is part of what makes it).
        let batch = out.images.len();
        let (seed, batch_size, batch_position) = if out.seeds.len() == batch {
            (out.seeds[index], None, None)
        } else {
            (out.seeds[0], (batch > 1).then_some(batch), (batch > 1).then_some(index))
        };
        let entry = match params.scheduler.as_deref() {
            Some(name) => Some(find_scheduler(name)?),
            None => None,
        };
        // The config the run's scheduler was built from: a caller's (sd_py passes a scheduler as
        // its class name and config, e.g. `use_karras_sigmas` set) or the model's.
        let base = params.scheduler_config.as_ref().unwrap_or(&self.scheduler_config);
        let config = entry.map_or_else(|| base.clone(), |e| e.apply_overrides(base));
        let class = entry.map_or(self.scheduler_class.as_str(), |e| e.class_name);
        // A class name alone says nothing of its overrides: name the entry the config matches.
        let entry = entry.map(|e| matching_entry(e, &config));
        let (sampler, karras) = a1111_sampler(class, &config, entry);
        let nonzero = |v: f64| (v != 0.0).then_some(v);
        let (loras, lora_hashes) = self.lora_info(params.lora_scale)?;
        Ok(GenerationInfo {
            prompt,
            negative_prompt,
            steps: Some(params.num_inference_steps),
            sampler: Some(sampler),
            schedule_type: Some(if karras { "Karras" } else { "Automatic" }.to_string()),
            cfg_scale: Some(params.guidance_scale),
            seed: Some(seed),
            size: Some((image.width() as usize, image.height() as usize)),
            model_hash: Some(self.model_hash()?),
            model: Some(self.model_name()),
            denoising_strength: params.init_image.as_ref().map(|i| i.strength),
            // diffusers' clip_skip k is A1111's "Clip skip" k + 1 (1, the last layer, left out).
            clip_skip: params.clip_skip.filter(|&k| k > 0).map(|k| k + 1),
            prompt_syntax: (params.prompt_syntax == PromptSyntax::A1111).then(|| "a1111".into()),
            scheduler: Some(match entry {
                Some(e) => e.aliases.first().copied().unwrap_or(e.class_name).to_string(),
                None => class.to_string(),
            }),
            dtype: Some(self.dtype().as_str().to_string()),
            batch_size,
            batch_position,
            guidance_rescale: nonzero(params.guidance_rescale),
            eta: nonzero(params.eta),
            engine: Some(format!("sd-rs {}", env!("CARGO_PKG_VERSION"))),
            loras,
            lora_hashes,
        })
    }

    /// The LoRAs a run at `scale` applies, as A1111 names them (the file's stem), with their
    /// weights, and their hashes (the first 10 hex digits of the file's SHA-256, cached as the
    /// model hash's).
    #[allow(clippy::type_complexity)]
    fn lora_info(&self, scale: Option<f64>) -> Result<(Vec<(String, f64)>, Vec<(String, String)>)> {
        let applied = self.adapters.applied(scale);
        if applied.is_empty() {
            return Ok((vec![], vec![]));
        }
        let mut cache = HashCache::load();
        let (mut loras, mut hashes) = (vec![], vec![]);
        for (adapter, path, weight) in applied {
            let name = path.file_stem().map_or(adapter, |s| s.to_string_lossy().into_owned());
            let digest = cache.file_digest(&path)?;
            hashes.push((name.clone(), digest[..10].to_string()));
            loras.push((name, weight));
        }
        cache.save();
        Ok((loras, hashes))
    }

    /// The model's name in the metadata: `org/name` for a model from the hub cache
    /// (`.../models--org--name/snapshots/<rev>`), else the folder's name.
    pub fn model_name(&self) -> String {
        let hub_repo = self.folder.ancestors().find_map(|p| {
            let name = p.file_name()?.to_str()?;
            name.strip_prefix("models--").map(|repo| repo.replacen("--", "/", 1))
        });
        hub_repo.unwrap_or_else(|| {
            self.folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        })
    }

    /// A1111's "Model hash" for a diffusers folder: the first 10 hex digits of the SHA-256 of
    /// the UNet weight files (in order), as A1111 hashes a checkpoint file. Hashing SD 2.1's
    /// 3.5 GB UNet takes about 4 s here, so the digest of each file is kept in a cache keyed by
    /// path, size and modification time (`$XDG_CACHE_HOME/sd-rs/model-hashes.json`, else
    /// `~/.cache/...`), as A1111 keeps its `cache.json`, and once per pipeline.
    pub fn model_hash(&self) -> Result<String> {
        if let Some(hash) = self.model_hash.get() {
            return Ok(hash.clone());
        }
        let mut cache = HashCache::load();
        let digests = self
            .unet_weights
            .iter()
            .map(|path| cache.file_digest(path))
            .collect::<Result<Vec<_>>>()?;
        cache.save();
        // One file: its own digest, as A1111's; shards: the digest of their digests.
        let digest = match digests.as_slice() {
            [one] => one.clone(),
            _ => hex(&Sha256::digest(digests.concat().as_bytes())),
        };
        Ok(self.model_hash.get_or_init(|| digest[..10].to_string()).clone())
    }
}

/// `entry`, or when it has no overrides, the entry of its class with the most overrides that
/// `config` all has: `dpmpp_2m_karras` for DPMSolverMultistepScheduler with
/// `use_karras_sigmas: true`.
fn matching_entry(
    entry: &'static SchedulerEntry,
    config: &SchedulerConfig,
) -> &'static SchedulerEntry {
    if !entry.overrides.is_empty() {
        return entry;
    }
    let holds =
        |(k, v): &(&str, OverrideValue)| config.get(k) == Some(&serde_json::Value::from(*v));
    SCHEDULERS
        .iter()
        .filter(|e| e.class_name == entry.class_name && !e.overrides.is_empty())
        .filter(|e| e.overrides.iter().all(holds))
        .max_by_key(|e| e.overrides.len())
        .unwrap_or(entry)
}

/// A1111's sampler name for a run of `class` with `config` (`entry`: its registry entry, if
/// known) and whether it uses Karras sigmas (A1111's "Schedule type: Karras").
fn a1111_sampler(
    class: &str,
    config: &SchedulerConfig,
    entry: Option<&SchedulerEntry>,
) -> (String, bool) {
    let karras = matches!(config.get("use_karras_sigmas"), Some(serde_json::Value::Bool(true)));
    // The entry's own A1111 name, else the plain entry of its class ("euler_karras" is
    // A1111's "Euler" with the Karras schedule), else its short name or class.
    let named = |e: &SchedulerEntry| e.a1111_names.first().map(|n| n.to_string());
    let name = entry
        .and_then(named)
        .or_else(|| {
            SCHEDULERS
                .iter()
                .filter(|e| e.class_name == class && e.overrides.is_empty())
                .find_map(named)
        })
        .or_else(|| entry.and_then(|e| e.aliases.first()).map(|a| a.to_string()))
        .unwrap_or_else(|| class.to_string());
    let name = name.strip_suffix(" Karras").map(str::to_string).unwrap_or(name);
    (name, karras)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 digests of weight files by path, valid while their size and mtime stay the same.
struct HashCache {
    path: Option<PathBuf>,
    entries: serde_json::Map<String, serde_json::Value>,
    changed: bool,
}

impl HashCache {
    fn load() -> Self {
        let path = crate::loading::sd_rs_cache_dir().map(|dir| dir.join("model-hashes.json"));
        let entries = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        Self { path, entries, changed: false }
    }

    /// The hex SHA-256 of `file`, from the cache when its size and mtime match.
    fn file_digest(&mut self, file: &Path) -> Result<String> {
        let meta = std::fs::metadata(file).map_err(|e| Error::io(file, e))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        let key = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
        let key = key.display().to_string();
        let stamp = serde_json::json!({ "size": meta.len(), "mtime_ns": mtime });
        if let Some(entry) = self.entries.get(&key) {
            if entry.get("stamp") == Some(&stamp) {
                if let Some(sha) = entry.get("sha256").and_then(|v| v.as_str()) {
                    return Ok(sha.to_string());
                }
            }
        }
        let mut hasher = Sha256::new();
        hash_file(file, &mut hasher)?;
        let sha = hex(&hasher.finalize());
        self.entries.insert(key, serde_json::json!({ "stamp": stamp, "sha256": sha }));
        self.changed = true;
        Ok(sha)
    }

    /// Writes the cache back; a cache that cannot be written only costs time later.
    fn save(&self) {
        let Some(path) = self.path.as_ref().filter(|_| self.changed) else { return };
        let text = serde_json::Value::Object(self.entries.clone()).to_string();
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = path.parent().map_or(Ok(()), std::fs::create_dir_all).is_ok()
            && std::fs::write(&tmp, text).is_ok()
            && std::fs::rename(&tmp, path).is_ok();
        if !written {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

fn hash_file(path: &Path, hasher: &mut Sha256) -> Result<()> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> SchedulerConfig {
        SchedulerConfig::from_json_str(json).unwrap()
    }

    #[test]
    fn a_class_name_with_a_karras_config_is_named_as_its_karras_entry() {
        // What sd_py passes for `scheduler_from_name("DPM++ 2M Karras", ...)`.
        let class = find_scheduler("DPMSolverMultistepScheduler").unwrap();
        let karras = config(r#"{"use_karras_sigmas": true}"#);
        let entry = matching_entry(class, &karras);
        assert_eq!(entry.aliases.first(), Some(&"dpmpp_2m_karras"));
        assert_eq!(
            a1111_sampler(entry.class_name, &karras, Some(entry)),
            ("DPM++ 2M".to_string(), true)
        );
        let sde = config(r#"{"use_karras_sigmas": true, "algorithm_type": "sde-dpmsolver++"}"#);
        let entry = matching_entry(class, &sde);
        assert_eq!(entry.a1111_names.first(), Some(&"DPM++ 2M SDE Karras"));
        assert_eq!(
            a1111_sampler(entry.class_name, &sde, Some(entry)),
            ("DPM++ 2M SDE".to_string(), true)
        );
        // A plain config, or an entry named with its overrides, stays as it is.
        assert!(std::ptr::eq(matching_entry(class, &config("{}")), class));
        let named = find_scheduler("Euler").unwrap();
        assert!(std::ptr::eq(matching_entry(named, &config("{}")), named));
        let euler_karras = matching_entry(named, &karras);
        assert_eq!(euler_karras.aliases.first(), Some(&"euler_karras"));
        assert_eq!(
            a1111_sampler("EulerDiscreteScheduler", &karras, Some(euler_karras)),
            ("Euler".to_string(), true)
        );
    }
}
