//! Fuzz tests of every parser that reads outside input (issue 14): weight files, JSON configs,
//! tokenizer files and prompts. Each target runs a fixed number of seeded cases (the same inputs
//! on every run; `SD_FUZZ_CASES=N` runs N times as many) and fails on any panic or untyped
//! error, printing the input so that it can become a regression case. See docs/testing.md.

#[path = "../support/mod.rs"]
mod support;

mod harness;
mod models;
mod safetensors;
mod schedulers;
mod tokenizer;
