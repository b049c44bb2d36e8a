//! The LoRA hook of [`Linear`] and [`Conv2d`]: every layer holds a [`LoraSlot`], shared with the
//! pipeline's adapter registry ([`crate::adapters`]), that can hold a fused weight (used instead
//! of the layer's own, which is kept untouched) and low-rank terms added at forward time:
//! `y = layer(x) + sum_i factor_i * scale_i * up_i(down_i(x))`, as PEFT's `lora.Linear` /
//! `lora.Conv2d` compute it. An empty slot costs one uncontended read lock per forward.
//!
//! Layers built inside [`collect_layers`] are recorded with their module path, so that LoRA
//! files can name them.

use std::cell::RefCell;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use candle_core::{DType, Module, Result, Tensor};

use super::{Conv2d, Linear};

/// The LoRA state of one layer: `W` is the layer's weight type, `L` the layer type the low-rank
/// factors run as.
#[derive(Debug)]
pub struct LoraState<W, L> {
    /// The layer's weight with adapters fused in; `None` runs the layer's own weight.
    pub fused: Option<W>,
    /// The low-rank terms added at forward time (skipped while `fused` is set: fusing folds
    /// them into the weight).
    pub terms: Vec<LowRank<L>>,
}

impl<W, L> Default for LoraState<W, L> {
    fn default() -> Self {
        Self { fused: None, terms: Vec::new() }
    }
}

/// One adapter's low-rank update of a layer: `factor * scale * up(down(x))`.
#[derive(Debug, Clone)]
pub struct LowRank<L> {
    pub adapter: Arc<str>,
    /// `[rank, in]` (a convolution: `[rank, in, kh, kw]`, with the layer's stride and padding).
    pub down: L,
    /// `[out, rank]` (a convolution: 1x1).
    pub up: L,
    /// `up` and `down` as matrices `[out, rank]` and `[rank, in kh kw]`, for fusing.
    pub matrices: (Tensor, Tensor),
    /// `alpha / rank` (1 without an alpha), as kohya and PEFT scale.
    pub scale: f64,
    /// The adapter's weight times the run's scale; 0 for an inactive adapter (not computed).
    pub factor: f64,
}

/// A layer's LoRA state, shared between the layer and the adapter registry.
#[derive(Debug)]
pub struct LoraSlot<W, L>(Arc<RwLock<LoraState<W, L>>>);

impl<W, L> Default for LoraSlot<W, L> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<W, L> Clone for LoraSlot<W, L> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<W, L: Module> LoraSlot<W, L> {
    /// A poisoned lock only means a panic elsewhere while it was held; the state stays valid.
    pub fn read(&self) -> RwLockReadGuard<'_, LoraState<W, L>> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, LoraState<W, L>> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl<W, L: Module> LoraState<W, L> {
    /// Whether [`Self::add_terms`] adds anything (and so reads the layer's input).
    pub fn adds_terms(&self) -> bool {
        self.fused.is_none() && self.terms.iter().any(|t| t.factor != 0.0)
    }

    /// `ys + sum factor * scale * up(down(xs))` over the active terms (PEFT's order: the base
    /// output first, then each adapter's scaled update added).
    pub fn add_terms(&self, xs: &Tensor, mut ys: Tensor) -> Result<Tensor> {
        if self.fused.is_some() {
            return Ok(ys);
        }
        for term in self.terms.iter().filter(|t| t.factor != 0.0) {
            let update = term.up.forward(&term.down.forward(xs)?)?;
            ys = (ys + (update * (term.factor * term.scale))?)?;
        }
        Ok(ys)
    }
}

impl<W, L: Module> LoraSlot<W, L> {
    /// Sets every term's factor to `factor(adapter)`.
    fn set_factors(&self, factor: &dyn Fn(&str) -> f64) {
        for term in &mut self.write().terms {
            term.factor = factor(&term.adapter);
        }
    }

    /// Fuses the active terms into `weight_plus(delta)`, with `delta` the sum of their
    /// `factor * scale * up down` in f32 (PEFT's `get_delta_weight`); no-op without active terms.
    fn fuse(&self, weight_plus: impl FnOnce(&Tensor) -> Result<W>) -> Result<()> {
        let mut state = self.write();
        let mut delta: Option<Tensor> = None;
        for term in state.terms.iter().filter(|t| t.factor != 0.0) {
            let (up, down) = &term.matrices;
            let update = (up.to_dtype(DType::F32)?.matmul(&down.to_dtype(DType::F32)?)?
                * (term.factor * term.scale))?;
            delta = Some(match delta {
                Some(sum) => (sum + update)?,
                None => update,
            });
        }
        if let Some(delta) = delta {
            state.fused = Some(weight_plus(&delta)?);
        }
        Ok(())
    }
}

/// What the adapter registry does to a layer's slot, whatever the layer's kind.
pub trait SlotOps {
    fn set_factors(&self, factor: &dyn Fn(&str) -> f64);
    /// Drops the fused weight: the layer runs its own, untouched, weight again.
    fn unfuse(&self);
    fn remove_adapter(&self, adapter: &str);
}

impl<W, L: Module> SlotOps for LoraSlot<W, L> {
    fn set_factors(&self, factor: &dyn Fn(&str) -> f64) {
        LoraSlot::set_factors(self, factor)
    }

    fn unfuse(&self) {
        self.write().fused = None;
    }

    fn remove_adapter(&self, adapter: &str) {
        self.write().terms.retain(|t| &*t.adapter != adapter);
    }
}

/// A layer a LoRA can target.
#[derive(Debug, Clone)]
pub enum LoraLayer {
    Linear(Linear),
    Conv2d(Conv2d),
}

impl LoraLayer {
    pub fn slot(&self) -> &dyn SlotOps {
        match self {
            LoraLayer::Linear(l) => l.lora(),
            LoraLayer::Conv2d(c) => c.lora(),
        }
    }

    /// Adds `adapter`'s update `scale * up(down(x))` (inactive until its factor is set).
    /// `down` and `up` are the file's tensors, of shapes the loader checked against the layer.
    pub fn add_term(
        &self,
        adapter: &Arc<str>,
        down: &Tensor,
        up: &Tensor,
        scale: f64,
    ) -> Result<()> {
        let rank = down.dim(0)?;
        let up_matrix = up.reshape((up.dim(0)?, rank))?;
        let down_matrix = down.reshape((rank, down.elem_count() / rank))?;
        let matrices = (up_matrix.clone(), down_matrix.clone());
        let adapter = adapter.clone();
        match self {
            LoraLayer::Linear(l) => l.lora().write().terms.push(LowRank {
                adapter,
                down: Linear::new(down_matrix, None)?,
                up: Linear::new(up_matrix, None)?,
                matrices,
                scale,
                factor: 0.0,
            }),
            LoraLayer::Conv2d(c) => {
                let (_, c_in, kh, kw) = c.dims()?;
                c.lora().write().terms.push(LowRank {
                    adapter,
                    down: Conv2d::new(
                        down_matrix.reshape((rank, c_in, kh, kw))?,
                        None,
                        c.config(),
                    )?,
                    up: Conv2d::new(
                        up_matrix.reshape((up.dim(0)?, rank, 1, 1))?,
                        None,
                        Default::default(),
                    )?,
                    matrices,
                    scale,
                    factor: 0.0,
                })
            }
        }
        Ok(())
    }

    /// Fuses the active terms into a copy of the layer's weight (see [`LoraSlot::fuse`]).
    pub fn fuse(&self) -> Result<()> {
        match self {
            LoraLayer::Linear(l) => l.lora().fuse(|delta| l.weight_plus(delta)),
            LoraLayer::Conv2d(c) => c.lora().fuse(|delta| c.weight_plus(delta)),
        }
    }
}

thread_local! {
    static COLLECTED: RefCell<Option<Vec<(String, LoraLayer)>>> = const { RefCell::new(None) };
}

/// Runs `build` (a model constructor) and returns the layers it built through [`super::linear`]
/// and [`super::conv2d`], with their module paths (the builder's prefix). Collection is per
/// thread and per call: nothing is kept after it returns.
pub fn collect_layers<T>(build: impl FnOnce() -> T) -> (T, Vec<(String, LoraLayer)>) {
    let outer = COLLECTED.with(|c| c.replace(Some(Vec::new())));
    let built = build();
    let layers = COLLECTED.with(|c| c.replace(outer)).unwrap_or_default();
    (built, layers)
}

/// Records a layer for the enclosing [`collect_layers`], if any.
pub(super) fn record(path: String, layer: impl FnOnce() -> LoraLayer) {
    COLLECTED.with(|c| {
        if let Some(layers) = c.borrow_mut().as_mut() {
            layers.push((path, layer()));
        }
    })
}
