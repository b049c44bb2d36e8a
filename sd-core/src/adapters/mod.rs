//! Adapters on a loaded pipeline: textual inversion embeddings ([`textual_inversion`]) and LoRAs
//! ([`lora`]), applied to the text encoder and UNet layers through their
//! [LoRA slots](crate::nn::lora).
//!
//! [`Adapters`] keeps which LoRAs are loaded and active (with diffusers' per-adapter weights),
//! and whether they are fused. Unfused, each run sets every layer's factors to `adapter weight x
//! run scale` before it starts and holds the registry for its duration, so runs of one pipeline
//! with adapters loaded are serialized, and each run chooses its scale; without adapters (or
//! with them fused) runs share the registry and go in parallel.

pub mod lora;
pub mod textual_inversion;

use std::path::PathBuf;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use lora::{Component, LoraAdapter, ModelLayers};

use crate::{Error, Result};

/// The LoRA state of a pipeline.
#[derive(Debug)]
pub struct Adapters {
    text_encoder: ModelLayers,
    unet: ModelLayers,
    state: RwLock<State>,
}

/// A layer: its model and module path.
type LayerId = (Component, String);

#[derive(Debug)]
struct Loaded {
    name: Arc<str>,
    path: PathBuf,
    /// The layers it has terms in.
    layers: Vec<LayerId>,
}

#[derive(Debug, Default)]
struct State {
    /// Loaded adapters, in load order.
    loaded: Vec<Loaded>,
    /// diffusers' active adapters and their weights.
    active: Vec<(String, f64)>,
    /// The `fuse` scale while the active adapters are fused into the weights.
    fused: Option<f64>,
}

/// Holds a pipeline's adapters for the duration of a run (see the module docs).
#[must_use]
pub struct AdapterRun<'a> {
    _guard: RunGuard<'a>,
}

enum RunGuard<'a> {
    Shared { _state: RwLockReadGuard<'a, State> },
    Exclusive { _state: RwLockWriteGuard<'a, State> },
}

impl Adapters {
    pub fn new(text_encoder: ModelLayers, unet: ModelLayers) -> Self {
        Self { text_encoder, unet, state: RwLock::default() }
    }

    pub fn layers(&self, component: Component) -> &ModelLayers {
        match component {
            Component::TextEncoder => &self.text_encoder,
            Component::Unet => &self.unet,
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a LoRA's terms to its layers (no copy of the base weights) and makes it the only
    /// active adapter, with weight 1, as diffusers' `load_lora_weights` does.
    pub fn load(&self, adapter: LoraAdapter) -> Result<()> {
        let mut state = self.write();
        if state.fused.is_some() {
            return Err(Error::invalid("LoRAs are fused: unfuse them before loading another"));
        }
        if state.is_loaded(&adapter.name) {
            return Err(Error::invalid(format!("an adapter named `{}` is loaded", adapter.name)));
        }
        let name: Arc<str> = adapter.name.as_str().into();
        let mut layers = Vec::with_capacity(adapter.layers.len());
        for ((component, path), weights) in adapter.layers {
            let layer = self.layers(component).get(&path).expect("the loader resolved it");
            layer.add_term(&name, &weights.down, &weights.up, weights.scale)?;
            layers.push((component, path));
        }
        state.loaded.push(Loaded { name, path: adapter.path, layers });
        state.active = vec![(adapter.name, 1.0)];
        Ok(())
    }

    /// The loaded adapters' names, in load order.
    pub fn names(&self) -> Vec<String> {
        self.read().loaded.iter().map(|a| a.name.to_string()).collect()
    }

    /// The active adapters and their weights.
    pub fn active(&self) -> Vec<(String, f64)> {
        self.read().active.clone()
    }

    /// What a run at LoRA scale `scale` applies: each active adapter with a nonzero weight, its
    /// file and its weight times the scale (the fusing scale instead while fused).
    pub fn applied(&self, scale: Option<f64>) -> Vec<(String, PathBuf, f64)> {
        let state = self.read();
        let scale = state.fused.or(scale).unwrap_or(1.0);
        state
            .active
            .iter()
            .filter_map(|(name, weight)| {
                let loaded = state.loaded.iter().find(|a| &*a.name == name)?;
                let weight = weight * scale;
                (weight != 0.0).then(|| (name.clone(), loaded.path.clone(), weight))
            })
            .collect()
    }

    pub fn is_fused(&self) -> bool {
        self.read().fused.is_some()
    }

    /// The scale the active adapters were fused at, if fused.
    pub fn fused_scale(&self) -> Option<f64> {
        self.read().fused
    }

    /// diffusers' `set_adapters(names, adapter_weights)`: only these run, with these weights.
    pub fn set_active(&self, adapters: &[(String, f64)]) -> Result<()> {
        let mut state = self.write();
        if state.fused.is_some() {
            return Err(Error::invalid("LoRAs are fused: unfuse them before changing adapters"));
        }
        for (name, weight) in adapters {
            if !state.is_loaded(name) {
                let loaded: Vec<&str> = state.loaded.iter().map(|a| &*a.name).collect();
                return Err(Error::invalid(format!(
                    "no adapter named `{name}` is loaded (loaded: {loaded:?})"
                )));
            }
            if !weight.is_finite() {
                return Err(Error::invalid(format!("adapter `{name}`: weight {weight}")));
            }
        }
        state.active = adapters.to_vec();
        Ok(())
    }

    /// diffusers' `fuse_lora(lora_scale)`: the active adapters, at their weights times `scale`,
    /// are added into copies of their layers' weights; the original weights are kept, so
    /// [`Self::unfuse`] restores them bit for bit. Runs then ignore their LoRA scale.
    pub fn fuse(&self, scale: f64) -> Result<()> {
        let mut state = self.write();
        if state.fused.is_some() {
            return Err(Error::invalid("LoRAs are fused already"));
        }
        self.set_factors(&state, scale);
        for (component, path) in Self::touched(&state) {
            self.layers(component).get(&path).expect("loaded").fuse()?;
        }
        state.fused = Some(scale);
        Ok(())
    }

    /// diffusers' `unfuse_lora`: every layer runs its original weight again (a no-op when
    /// nothing is fused), also those of adapters unloaded since fusing.
    pub fn unfuse(&self) {
        let mut state = self.write();
        for (_, layer) in self.text_encoder.iter().chain(self.unet.iter()) {
            layer.slot().unfuse();
        }
        state.fused = None;
    }

    /// Removes adapters (all with `None`), as diffusers' `delete_adapters` /
    /// `unload_lora_weights`; fused weights stay fused until [`Self::unfuse`].
    pub fn unload(&self, names: Option<&[String]>) -> Result<()> {
        let mut state = self.write();
        if let Some(names) = names {
            if let Some(name) = names.iter().find(|n| !state.is_loaded(n)) {
                return Err(Error::invalid(format!("no adapter named `{name}` is loaded")));
            }
        }
        let unload = |name: &str| names.is_none_or(|names| names.iter().any(|n| n == name));
        for adapter in state.loaded.iter().filter(|a| unload(&a.name)) {
            for (component, path) in &adapter.layers {
                let layer = self.layers(*component).get(path).expect("loaded");
                layer.slot().remove_adapter(&adapter.name);
            }
        }
        state.loaded.retain(|a| !unload(&a.name));
        state.active.retain(|(name, _)| !unload(name));
        Ok(())
    }

    /// Takes the adapters for a run at LoRA scale `scale` (diffusers' `cross_attention_kwargs
    /// ["scale"]`, default 1): exclusively, with every layer's factors set, when unfused
    /// adapters are loaded; shared otherwise. `generate` takes it itself: hold it only around
    /// stage-level calls (`encode_prompts`, the models), never around `generate` (a deadlock).
    pub fn begin_run(&self, scale: Option<f64>) -> AdapterRun<'_> {
        let state = self.read();
        if state.loaded.is_empty() || state.fused.is_some() {
            return AdapterRun { _guard: RunGuard::Shared { _state: state } };
        }
        drop(state);
        let state = self.write();
        self.set_factors(&state, scale.unwrap_or(1.0));
        AdapterRun { _guard: RunGuard::Exclusive { _state: state } }
    }

    fn set_factors(&self, state: &State, scale: f64) {
        let factor = |adapter: &str| {
            state.active.iter().find(|(name, _)| name == adapter).map_or(0.0, |(_, w)| w * scale)
        };
        for (component, path) in Self::touched(state) {
            self.layers(component).get(&path).expect("loaded").slot().set_factors(&factor);
        }
    }

    /// Every layer some loaded adapter has terms in, once.
    fn touched(state: &State) -> std::collections::BTreeSet<LayerId> {
        state.loaded.iter().flat_map(|a| a.layers.iter().cloned()).collect()
    }
}

impl State {
    fn is_loaded(&self, name: &str) -> bool {
        self.loaded.iter().any(|a| &*a.name == name)
    }
}
