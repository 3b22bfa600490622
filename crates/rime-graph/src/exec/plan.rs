//! The memory plan: every non-planned slot (parameters, their gradients, optimizer state, inputs, fixed
//! scalars) gets its own buffer; planned slots (activations, activation gradients, scratch) live from their
//! first to their last call and reuse freed buffers of the same size.

use std::collections::HashMap;

use rime_kernels::{DType, Device, Tensor};

use super::builder::{Call, Kind, Slot};
use crate::error::Result;

/// Bytes held per category.
#[derive(Debug, Clone, Default)]
pub struct MemoryReport {
    pub frozen_weights: u64,
    pub trainable_params: u64,
    pub gradients: u64,
    /// Gradient bytes held for frozen parameters (always zero: the point of a frozen backbone).
    pub frozen_gradients: u64,
    pub optimizer_state: u64,
    pub activation_peak: u64,
    /// Inputs fed per step and persistent state (KV caches).
    pub inputs: u64,
}

impl MemoryReport {
    pub fn total(&self) -> u64 {
        self.frozen_weights
            + self.trainable_params
            + self.gradients
            + self.optimizer_state
            + self.activation_peak
            + self.inputs
    }
}

impl std::fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let row = |f: &mut std::fmt::Formatter<'_>, name: &str, b: u64| {
            writeln!(f, "{name:<20}{b:>14} bytes {:>11.3} MiB", b as f64 / (1024.0 * 1024.0))
        };
        row(f, "frozen weights", self.frozen_weights)?;
        row(f, "trainable params", self.trainable_params)?;
        row(f, "gradients", self.gradients)?;
        row(f, "  of frozen weights", self.frozen_gradients)?;
        row(f, "optimizer state", self.optimizer_state)?;
        row(f, "activation peak", self.activation_peak)?;
        row(f, "inputs", self.inputs)?;
        write!(f, "{:<20}{:>14} bytes {:>11.3} MiB", "total", self.total(), self.total() as f64 / (1024.0 * 1024.0))
    }
}

/// Give every slot a buffer; `keep` are slots that must outlive the step (outputs, the loss).
pub(crate) fn plan(dev: &Device, slots: &mut [Slot], calls: &[Call], keep: &[usize]) -> Result<MemoryReport> {
    let (first, last) = liveness(slots.len(), calls, keep);
    let mut report = MemoryReport::default();
    allocate_fixed(dev, slots, &mut report)?;
    report.activation_peak = allocate_planned(dev, slots, calls.len(), &first, &last)?;
    report.frozen_gradients = 0;
    Ok(report)
}

/// First and last call touching each slot; kept slots live forever.
fn liveness(ns: usize, calls: &[Call], keep: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let mut first = vec![usize::MAX; ns];
    let mut last = vec![0usize; ns];
    for (ci, c) in calls.iter().enumerate() {
        for s in c.slots() {
            first[s] = first[s].min(ci);
            last[s] = last[s].max(ci);
        }
    }
    for &s in keep {
        last[s] = usize::MAX;
    }
    (first, last)
}

/// Non-planned slots get their own buffers (unless shared from a donor already), counted in the report.
fn allocate_fixed(dev: &Device, slots: &mut [Slot], report: &mut MemoryReport) -> Result<()> {
    for s in slots.iter_mut() {
        let bytes = s.bytes;
        match s.kind {
            Kind::FrozenParam => report.frozen_weights += bytes,
            Kind::TrainParam => report.trainable_params += bytes,
            Kind::ParamGrad => report.gradients += bytes,
            Kind::OptState => report.optimizer_state += bytes,
            Kind::Input | Kind::State => report.inputs += bytes,
            Kind::Fixed | Kind::Planned => {}
        }
        if s.tensor.is_none() && s.kind != Kind::Planned {
            s.tensor = Some(dev.zeros(&[(bytes / 4) as usize], DType::F32)?);
        }
    }
    Ok(())
}

/// Walk the calls in order, taking a free buffer of the right size or a new one at a slot's first call and
/// freeing it after its last. Returns the bytes allocated (buffers are never released during the plan, so
/// that is the peak).
fn allocate_planned(dev: &Device, slots: &mut [Slot], n_calls: usize, first: &[usize], last: &[usize]) -> Result<u64> {
    let mut frees_at: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut by_first: HashMap<usize, Vec<usize>> = HashMap::new();
    for s in 0..slots.len() {
        if slots[s].kind != Kind::Planned || first[s] == usize::MAX {
            continue; // never used (e.g. a scratch of a pruned branch)
        }
        by_first.entry(first[s]).or_default().push(s);
        if last[s] != usize::MAX {
            frees_at.entry(last[s]).or_default().push(s);
        }
    }
    let mut free: HashMap<u64, Vec<Tensor>> = HashMap::new();
    let mut live_bytes = 0u64;
    for ci in 0..n_calls {
        for &s in by_first.get(&ci).map(|v| v.as_slice()).unwrap_or(&[]) {
            let bytes = slots[s].bytes;
            let t = match free.get_mut(&bytes).and_then(|v| v.pop()) {
                Some(t) => t,
                None => {
                    live_bytes += bytes;
                    dev.empty(&[(bytes / 4) as usize], DType::F32)?
                }
            };
            slots[s].tensor = Some(t);
        }
        for &s in frees_at.get(&ci).map(|v| v.as_slice()).unwrap_or(&[]) {
            if let Some(t) = slots[s].tensor.clone() {
                free.entry(slots[s].bytes).or_default().push(t);
            }
        }
    }
    Ok(live_bytes)
}
