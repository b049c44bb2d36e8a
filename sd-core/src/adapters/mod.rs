//! Adapters loaded on top of a pipeline's weights.

pub mod textual_inversion;
