//! Weight files: safetensors headers (length field, JSON, dtypes, shapes, offsets), truncated and
//! corrupted files, and sharded indexes, through the loader the pipeline uses
//! (`WeightStore` + `build_component`).

use std::path::Path;

use candle_core::{DType, Device};
use sd_core::loading::weight_files::shard_files;
use sd_core::loading::{build_component, WeightStore};
use sd_core::pipeline::StableDiffusionPipeline;
use sd_core::Error;
use serde_json::{json, Value};

use crate::harness::{fuzz, junk_value, mutate_bytes, mutate_json, Rng};
use crate::support::pipelines;

/// A small valid file: every dtype the loader converts, a non-converted one, an empty tensor.
fn base_tensors() -> (serde_json::Map<String, Value>, Vec<u8>) {
    let tensors: [(&str, &str, Vec<usize>, usize); 6] = [
        ("a.f32", "F32", vec![2, 3], 4),
        ("b.f16", "F16", vec![4], 2),
        ("c.bf16", "BF16", vec![2, 2], 2),
        ("d.i64", "I64", vec![3], 8),
        ("e.u8", "U8", vec![5], 1),
        ("f.empty", "F32", vec![0, 3], 4),
    ];
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut data = Vec::new();
    for (name, dtype, shape, size) in tensors {
        let len = shape.iter().product::<usize>() * size;
        let start = data.len();
        // Small values in every dtype (the low bytes of an f32/f16/bf16 1.0-ish pattern).
        data.extend((0..len).map(|i| if i % size == size - 1 { 0x3c } else { i as u8 }));
        let offsets = [start, data.len()];
        header
            .insert(name.into(), json!({"dtype": dtype, "shape": shape, "data_offsets": offsets}));
    }
    (header, data)
}

fn file_bytes(header: &str, length_field: u64, data: &[u8]) -> Vec<u8> {
    let mut out = length_field.to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// One entry's field set to a lie: a dtype the loader may not know, a shape whose size does not
/// match (or overflows), offsets reversed, past the end or overlapping.
fn lie(rng: &mut Rng, header: &mut serde_json::Map<String, Value>, data_len: usize) {
    let names: Vec<String> = header.keys().filter(|k| *k != "__metadata__").cloned().collect();
    let entry = header.get_mut(rng.pick(&names)).and_then(Value::as_object_mut).expect("an entry");
    let big = 1u64 << (30 + rng.below(34));
    match rng.below(3) {
        0 => {
            let dtypes = [
                "F64", "F32", "F16", "BF16", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64",
                "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64", "f32",
                "",
            ];
            entry.insert("dtype".into(), json!(rng.pick(&dtypes)));
        }
        1 => {
            let shapes = [
                json!([]),
                json!([0]),
                json!([1]),
                json!([3, 2]),
                json!([big]),
                json!([big, big]),
                json!([u64::MAX, 2]),
                json!([usize::MAX]),
                json!([-1]),
                json!([2.5]),
                json!(["2"]),
                json!([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 6]),
            ];
            entry.insert("shape".into(), rng.pick(&shapes).clone());
        }
        _ => {
            let (a, b) = (rng.below(data_len + 8), rng.below(data_len + 8));
            let offsets = [
                json!([b, a]),
                json!([a, a]),
                json!([0, data_len + 1]),
                json!([data_len, data_len + 24]),
                json!([0, big]),
                json!([u64::MAX - 1, u64::MAX]),
                json!([-8, 16]),
                json!([0]),
                json!([0, 8, 16]),
                json!("0-8"),
            ];
            entry.insert("data_offsets".into(), rng.pick(&offsets).clone());
        }
    }
}

/// A file of `base` (header, data) with lies in the header, a JSON edit, a wrong length field,
/// truncation, byte edits, or a junk header.
fn mutated_weight_file(rng: &mut Rng, base: &(serde_json::Map<String, Value>, Vec<u8>)) -> Vec<u8> {
    let (mut header, mut data) = base.clone();
    let valid = |h: &serde_json::Map<String, Value>, d: &[u8]| {
        let text = Value::Object(h.clone()).to_string();
        file_bytes(&text, text.len() as u64, d)
    };
    match rng.below(6) {
        0 => {
            for _ in 0..1 + rng.below(2) {
                lie(rng, &mut header, data.len());
            }
            valid(&header, &data)
        }
        1 => {
            let mutated = mutate_json(rng, &Value::Object(header));
            let text = mutated.to_string();
            file_bytes(&text, text.len() as u64, &data)
        }
        2 => {
            let text = Value::Object(header).to_string();
            let lengths = [
                0,
                1,
                2,
                7,
                text.len() as u64 - 1,
                text.len() as u64 + 1,
                text.len() as u64 + data.len() as u64,
                text.len() as u64 + data.len() as u64 + 1,
                100_000_001,
                u32::MAX as u64,
                u64::MAX,
                u64::MAX - 7,
            ];
            file_bytes(&text, *rng.pick(&lengths), &data)
        }
        3 => {
            let bytes = valid(&header, &data);
            bytes[..rng.below(bytes.len())].to_vec()
        }
        4 => {
            if rng.one_in(2) {
                let len = 1 + rng.below(16);
                data.extend(rng.bytes(len));
            }
            let bytes = valid(&header, &data);
            mutate_bytes(rng, &bytes)
        }
        _ => {
            // A header of junk JSON of the right length.
            let text = junk_value(rng, 3).to_string();
            file_bytes(&text, text.len() as u64, &data)
        }
    }
}

/// Opens `path` as the pipeline does and reads every tensor (checked and unchecked shapes, f32
/// and bf16); every failure must be an `Error::Weights` naming a file.
fn load_all(path: &Path, dtype: DType) -> Result<(), String> {
    let store = match WeightStore::open(&[path.to_path_buf()]) {
        Ok(store) => store,
        Err(Error::Weights { .. }) => return Ok(()),
        Err(other) => return Err(format!("open: not Error::Weights: {other:?}")),
    };
    let names: Vec<String> = store.tensor_names().map(str::to_string).collect();
    let dir = path.parent().expect("a folder");
    let result = build_component(dir, store, dtype, &Device::Cpu, |vb| {
        for name in &names {
            let tensor = vb.get_unchecked(name)?;
            vb.get(tensor.shape().clone(), name)?;
            vb.get((1, 2), name).ok();
        }
        Ok(())
    });
    match result {
        Ok(()) | Err(Error::Weights { .. }) => Ok(()),
        Err(other) => Err(format!("load: not Error::Weights: {other:?}")),
    }
}

#[test]
fn safetensors_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let (header, data) = base_tensors();
    let text = Value::Object(header).to_string();
    std::fs::write(&path, file_bytes(&text, text.len() as u64, &data)).unwrap();
    load_all(&path, DType::F32).expect("the unmutated file loads");

    let base = base_tensors();
    fuzz(
        "safetensors",
        600,
        |rng| mutated_weight_file(rng, &base),
        Vec::clone,
        |bytes| {
            std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
            load_all(&path, DType::F32)?;
            load_all(&path, DType::BF16)
        },
    );
}

fn base_index() -> Value {
    json!({
        "metadata": {"total_size": 24},
        "weight_map": {
            "a.f32": "model-00001-of-00002.safetensors",
            "b.f16": "model-00002-of-00002.safetensors",
            "c.bf16": "model-00002-of-00002.safetensors"
        }
    })
}

fn mutated_index(rng: &mut Rng) -> Vec<u8> {
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00003-of-00002.safetensors",
        "",
        ".",
        "..",
        "../model-00001-of-00002.safetensors",
        "/etc/passwd",
        "C:\\x.safetensors",
        "a\0b",
        "model.safetensors.index.json",
        "dir",
    ];
    let mut index = base_index();
    match rng.below(3) {
        0 => {
            let map = index["weight_map"].as_object_mut().expect("weight_map");
            let key = format!("x{}", rng.below(4));
            map.insert(key, json!(rng.pick(&names)));
            serde_json::to_vec(&index).expect("json")
        }
        1 => serde_json::to_vec(&mutate_json(rng, &index)).expect("json"),
        _ => mutate_bytes(rng, &serde_json::to_vec(&index).expect("json")),
    }
}

#[test]
fn sharded_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let (header, data) = base_tensors();
    let text = Value::Object(header).to_string();
    for shard in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        std::fs::write(dir.path().join(shard), file_bytes(&text, text.len() as u64, &data))
            .unwrap();
    }
    std::fs::create_dir(dir.path().join("dir")).unwrap();
    let index_path = dir.path().join("model.safetensors.index.json");

    fuzz("sharded index", 400, mutated_index, Vec::clone, |bytes| {
        if let Ok(text) = std::str::from_utf8(bytes) {
            match shard_files(text) {
                Ok(_) | Err(Error::InvalidArgument(_)) => {}
                Err(other) => return Err(format!("shard_files: {other:?}")),
            }
        }
        std::fs::write(&index_path, bytes).map_err(|e| e.to_string())?;
        match WeightStore::open_component(dir.path(), "model", None) {
            Ok(_)
            | Err(Error::Config { .. } | Error::NotFound { .. } | Error::Weights { .. })
            | Err(Error::Io { .. }) => Ok(()),
            Err(other) => Err(format!("open_component: {other:?}")),
        }
    });
}

/// A fixture safetensors file as (header without `__metadata__` kept, data).
fn read_base(path: &Path) -> (serde_json::Map<String, Value>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// Textual-inversion embeddings (diffusers' one-tensor and A1111's `string_to_param.*`
/// layouts) with the weight-file mutations, loaded into the fixture pipeline with and without a
/// token: every failure an `Error::Weights` (unreadable file) or `Error::InvalidArgument` (wrong
/// layout, shape, size or token), and a refused load leaves the pipeline able to encode.
#[test]
fn textual_inversion_files() {
    let text = crate::support::fixtures().join("text");
    let bases = [
        read_base(&text.join("ti_a1111.safetensors")),
        read_base(&text.join("ti_emb_params.safetensors")),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("embedding.safetensors");
    let load = || {
        StableDiffusionPipeline::from_folder(
            &pipelines().join("sd2-tiny"),
            DType::F32,
            &Device::Cpu,
            None,
        )
        .unwrap()
    };
    let pipe = std::cell::RefCell::new(load());
    let tokens =
        [None, Some("<x>"), Some(""), Some(" "), Some("a"), Some("<|endoftext|>"), Some("<x> <y>")];
    fuzz(
        "textual inversion",
        300,
        |rng| {
            let base = rng.pick(&bases);
            (mutated_weight_file(rng, base), *rng.pick(&tokens))
        },
        |(bytes, token)| [format!("token {token:?}\n").into_bytes(), bytes.clone()].concat(),
        |(bytes, token)| {
            std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
            let loaded = pipe.borrow_mut().load_textual_inversion(&path, *token);
            match loaded {
                // Loaded: the next case starts from a fresh pipeline (the token is taken now).
                Ok(tokens) => {
                    let prompt = tokens.join(" ");
                    let encoded = pipe.borrow().encode_prompts(&[prompt]);
                    *pipe.borrow_mut() = load();
                    encoded.map(|_| ()).map_err(|e| format!("encode with {tokens:?}: {e}"))
                }
                Err(Error::Weights { .. } | Error::InvalidArgument(_)) => {
                    let encoded = pipe.borrow().encode_prompts(&["a cat".to_string()]);
                    encoded.map(|_| ()).map_err(|e| format!("encode after a refused load: {e}"))
                }
                Err(other) => Err(format!("load_textual_inversion: {other:?}")),
            }
        },
    );
}
