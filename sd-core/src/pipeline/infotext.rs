//! The settings of a generated image as A1111's `parameters` text ([`GenerationInfo`]), for the
//! PNG metadata that sd-cli and the Serve app write and that `sd-cli generate --from` replays.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{GenerateOutput, GenerateParams, StableDiffusionPipeline};
use crate::metadata::GenerationInfo;
use crate::schedulers::{find_scheduler, SchedulerEntry, SCHEDULERS};
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
        let (sampler, karras) = self.a1111_sampler(entry);
        let nonzero = |v: f64| (v != 0.0).then_some(v);
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
            clip_skip: None,
            scheduler: Some(match entry {
                Some(e) => e.aliases.first().copied().unwrap_or(e.class_name).to_string(),
                None => self.scheduler_class.clone(),
            }),
            dtype: Some(self.dtype().as_str().to_string()),
            batch_size,
            batch_position,
            guidance_rescale: nonzero(params.guidance_rescale),
            eta: nonzero(params.eta),
            engine: Some(format!("sd-rs {}", env!("CARGO_PKG_VERSION"))),
        })
    }

    /// A1111's sampler name for a registry entry (`None`: the model's own scheduler) and whether
    /// it uses Karras sigmas (A1111's "Schedule type: Karras").
    fn a1111_sampler(&self, entry: Option<&SchedulerEntry>) -> (String, bool) {
        let class = entry.map_or(self.scheduler_class.as_str(), |e| e.class_name);
        let config = match entry {
            Some(e) => e.apply_overrides(&self.scheduler_config),
            None => self.scheduler_config.clone(),
        };
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
        let path = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|dir| dir.join("sd-rs").join("model-hashes.json"));
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
