//! Parity of `sd_core::rng` with torch's CPU generator, bit for bit. Fixtures come from
//! `scripts/fixtures/gen_rng_schedulers.py` (torch 2.15 on x86-64).

mod support;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use sd_core::rng::{Generators, TorchGenerator};
use support::{read_json_file, read_tensors, scheduler_fixtures};

struct Fixtures {
    tensors: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

fn load() -> Fixtures {
    let dir = scheduler_fixtures();
    let tensors = read_tensors(&dir.join("rng.safetensors"));
    Fixtures { tensors, meta: read_json_file(&dir.join("rng.json")) }
}

impl Fixtures {
    fn f32(&self, key: &str) -> Vec<f32> {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture tensor {key} missing"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }
    fn seeds(&self) -> Vec<u64> {
        self.meta["seeds"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
    }
    fn usizes(&self, key: &str) -> Vec<usize> {
        self.meta[key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect()
    }
}

/// Asserts bit equality and reports the first difference.
#[track_caller]
fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a.to_bits() != b.to_bits()) {
        let n = got.iter().zip(want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        panic!("{what}: {n} of {} values differ; first at {i}: got {:e} ({:#010x}), want {:e} ({:#010x})",
            got.len(), got[i], got[i].to_bits(), want[i], want[i].to_bits());
    }
}

/// `sum(bits[i] * (2i + 1)) mod 2^64`, as the fixture generator computes it.
fn checksum(v: &[f32]) -> u64 {
    v.iter().enumerate().fold(0u64, |acc, (i, x)| {
        acc.wrapping_add((x.to_bits() as u64).wrapping_mul(2 * i as u64 + 1))
    })
}

#[test]
fn mt19937_matches_the_standard_reference() {
    // C++ [rand.predef]: the 10000th output of a default-constructed mt19937 (seed 5489).
    let mut g = TorchGenerator::new(5489);
    let mut last = 0;
    for _ in 0..10000 {
        last = g.random();
    }
    assert_eq!(last, 4_123_659_995);
}

#[test]
fn randn_matches_torch_for_every_size_and_seed() {
    let fx = load();
    let limit = fx.meta["full_limit"].as_u64().unwrap() as usize;
    let head = fx.meta["head"].as_u64().unwrap() as usize;
    let mut checked = 0;
    for seed in fx.seeds() {
        for n in fx.usizes("sizes") {
            let got = TorchGenerator::new(seed).randn(n);
            let key = format!("randn/{seed}/{n}");
            if n <= limit {
                assert_bits(&key, &got, &fx.f32(&key));
            } else {
                assert_bits(&format!("{key} head"), &got[..head], &fx.f32(&format!("{key}/head")));
                assert_bits(
                    &format!("{key} tail"),
                    &got[n - head..],
                    &fx.f32(&format!("{key}/tail")),
                );
                let want: u64 = fx.meta["checksums"][&key].as_str().unwrap().parse().unwrap();
                assert_eq!(checksum(&got), want, "{key}: checksum of all bits");
            }
            checked += 1;
        }
    }
    assert!(checked >= 100);
}

#[test]
fn sequences_of_draws_continue_torch_stream() {
    let fx = load();
    for seed in fx.seeds() {
        let mut g = TorchGenerator::new(seed);
        for (i, n) in fx.usizes("sequence").into_iter().enumerate() {
            let key = format!("seq/{seed}/{i}");
            assert_bits(&key, &g.randn(n), &fx.f32(&key));
        }
    }
}

#[test]
fn shaped_rand_and_mixed_draws_match() {
    let fx = load();
    for seed in fx.seeds() {
        let t = TorchGenerator::new(seed).randn_tensor(&[2, 4, 6, 8], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 4, 6, 8]);
        assert_bits(
            "randn_shape",
            &t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &fx.f32(&format!("randn_shape/{seed}")),
        );

        assert_bits("rand", &TorchGenerator::new(seed).rand(37), &fx.f32(&format!("rand/{seed}")));

        let mut g = TorchGenerator::new(seed);
        let got: Vec<i64> = (0..21).map(|_| (g.random64() % ((1u64 << 63) - 1)) as i64).collect();
        let want = fx.tensors[&format!("randint63/{seed}")].to_vec1::<i64>().unwrap();
        assert_eq!(got, want, "randint63/{seed}: raw random64 draws (high word first)");

        let mut g = TorchGenerator::new(seed);
        let draws: Vec<Vec<f32>> =
            vec![g.rand(5), g.randn(3), g.rand(20), g.randn(1), g.randn(20), g.randn(1)];
        for (i, d) in draws.iter().enumerate() {
            let key = format!("mixed/{seed}/{i}");
            assert_bits(&key, d, &fx.f32(&key));
        }
    }
}

#[test]
fn generators_match_diffusers_randn_tensor() {
    let fx = load();
    for (name, shape) in [("latents", [3usize, 4, 4, 4]), ("small", [2, 3, 1, 1])] {
        let mut single = Generators::from_seeds(&[7], shape[0]).unwrap();
        let seeds = [7u64, 8, 9];
        let mut list = Generators::from_seeds(&seeds[..shape[0]], shape[0]).unwrap();
        assert_eq!(list.len(), shape[0]);
        for k in 0..2 {
            let got = single.randn(&shape, &Device::Cpu).unwrap();
            assert_eq!(got.dims(), &shape);
            let key = format!("randn_tensor/{name}/single/{k}");
            assert_bits(&key, &got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &fx.f32(&key));
            let got = list.randn(&shape, &Device::Cpu).unwrap();
            let key = format!("randn_tensor/{name}/list/{k}");
            assert_bits(&key, &got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &fx.f32(&key));
        }
    }
}

#[test]
fn seeds_use_their_low_32_bits_and_are_reported_whole() {
    let big = (1u64 << 32) + 5;
    let g = TorchGenerator::new(big);
    assert_eq!(g.initial_seed(), big);
    assert_eq!(TorchGenerator::new(big).randn(40), TorchGenerator::new(5).randn(40));
    assert_eq!(TorchGenerator::new(u64::MAX).randn(7), TorchGenerator::new(0xffff_ffff).randn(7));
}

#[test]
fn manual_seed_resets_the_stream_and_the_cached_normal() {
    let mut g = TorchGenerator::new(3);
    let first = g.randn(1); // caches the second Box-Muller value
    g.manual_seed(3);
    assert_eq!(g.randn(1), first, "a re-seeded generator must not return the cached value");
    let fresh = TorchGenerator::new(3).randn(2);
    let mut g = TorchGenerator::new(3);
    assert_eq!([g.randn(1), g.randn(1)].concat(), fresh, "the cached value is the next small draw");
    // The big-tensor path neither uses nor clears the cache.
    let mut a = TorchGenerator::new(9);
    let a1 = a.randn(1);
    let _ = a.randn(32);
    let a2 = a.randn(1);
    let mut b = TorchGenerator::new(9);
    let b12 = b.randn(2);
    assert_eq!(a1[0], b12[0]);
    assert_eq!(a2[0], b12[1]);
}

#[test]
fn generators_validate_counts() {
    assert!(Generators::from_seeds(&[], 1).is_err());
    assert!(Generators::from_seeds(&[1, 2], 3).is_err());
    assert!(matches!(Generators::from_seeds(&[1], 4).unwrap(), Generators::Single(_)));
    let mut two = Generators::from_seeds(&[1, 2], 2).unwrap();
    assert!(
        two.randn(&[3, 4], &Device::Cpu).is_err(),
        "two generators cannot draw a batch of three"
    );
    assert!(two.randn(&[], &Device::Cpu).is_err());
    // A list of one is a single generator, as in diffusers.
    let mut one = Generators::PerSample(vec![TorchGenerator::new(4)]);
    let a =
        one.randn(&[2, 8], &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a, TorchGenerator::new(4).randn(16));
}
