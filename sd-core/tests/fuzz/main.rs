//! Fuzz tests of every parser that reads outside input (issue 14): weight files, JSON configs,
//! tokenizer files, textual-inversion embeddings, prompts (plain and A1111 syntax) and PNG
//! metadata. Each target runs a fixed number of seeded cases (the same inputs on every run;
//! `SD_FUZZ_CASES=N` runs N times as many) and fails on any panic or untyped error, printing the
//! input and saving it to a file so that it can become a regression case. See docs/testing.md.

#[path = "../support/mod.rs"]
mod support;

mod harness;
mod metadata;
mod models;
mod prompt_syntax;
mod safetensors;
mod schedulers;
mod tokenizer;
