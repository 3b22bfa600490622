//! IA3 (Liu et al. 2022, "(IA)³"): learned vectors, initialised to ones, that rescale the outputs of the
//! attention key and value projections and the FFN activation (the input of the FFN's output linear).
//!
//! Layout as peft's IA3 (`peft_type` `IA3`): `base_model.model.<module>.ia3_l`, shape [out, 1] for an
//! output-scaled module and [1, in] for a feed-forward (input-scaled) one. As in peft, an output scale also
//! scales the bias. The saved `target_modules` / `feedforward_modules` list the full module names, so peft's
//! suffix matching picks exactly these modules (a bare `output.dense` would also catch
//! `attention.output.dense`).

use regex::Regex;
use rime_graph::{Graph, ParamStore, Result, Var};
use rime_kernels::Device;
use rime_models::LinearHook;

use crate::lora::find_targets;

pub const PEFT_TYPE: &str = "IA3";

pub fn vector_name(module: &str) -> String {
    format!("base_model.model.{module}.ia3_l")
}

/// BERT's FFN output linear: `encoder.layer.N.output.dense` (not `attention.output.dense`).
pub fn is_feedforward(module: &str) -> bool {
    Regex::new(r"(^|\.)layer\.\d+\.output\.dense$").map(|r| r.is_match(module)).unwrap_or(false)
}

/// Add the scaling vectors (ones). `targets` as LoRA's; the BERT default is key, value and the FFN output
/// linear (`re:layer\.\d+\.output\.dense$`). Returns (output-scaled modules, input-scaled modules).
pub fn add_ia3(dev: &Device, store: &mut ParamStore, targets: &[String]) -> Result<(Vec<String>, Vec<String>)> {
    let modules = find_targets(store, targets)?;
    let (mut outs, mut ffs) = (Vec::new(), Vec::new());
    for (m, shape) in modules {
        if is_feedforward(&m) {
            store.add_f32(dev, &vector_name(&m), &vec![1.0; shape[1]], &[1, shape[1]], true)?;
            ffs.push(m);
        } else {
            store.add_f32(dev, &vector_name(&m), &vec![1.0; shape[0]], &[shape[0], 1], true)?;
            outs.push(m);
        }
    }
    Ok((outs, ffs))
}

pub fn default_targets() -> Vec<String> {
    vec!["key".into(), "value".into(), r"re:layer\.\d+\.output\.dense$".into()]
}

/// The rewrite: `y = (x·Wᵀ + b) ∘ l` for [out, 1] vectors, `y = (x ∘ l)·Wᵀ + b` for [1, in] ones.
/// With `targets`, a target module without its vector is an error (the vectors were never added).
pub struct Ia3Hook {
    pub targets: Option<Vec<String>>,
}

impl LinearHook for Ia3Hook {
    fn linear(&self, g: &mut Graph, store: &ParamStore, module: &str, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
        let name = vector_name(module);
        let Some(id) = store.find(&name) else {
            if self.targets.as_ref().is_some_and(|t| crate::lora::target_matches(t, module)) {
                return Err(rime_graph::Error::Invalid(format!(
                    "ia3 vector for '{module}' is not in the store: add it first (classifier::prepare_method)"
                )));
            }
            return g.linear(x, w, b);
        };
        let shape = store.get(id).tensor.shape.clone();
        let l = g.param(store, &name)?;
        let n: usize = shape.iter().product();
        let l = g.reshape(l, &[n])?;
        if shape[0] == 1 && is_feedforward(module) {
            let xs = g.mul(x, l)?;
            g.linear(xs, w, b)
        } else {
            let y = g.linear(x, w, b)?;
            g.mul(y, l)
        }
    }
}
