//! IA3 (Liu et al. 2022, "(IA)³"): learned vectors, initialised to ones, that rescale the outputs of the
//! attention key and value projections and the FFN activation (the input of the FFN's output linear).
//!
//! Layout as peft's IA3 (`peft_type` `IA3`): `base_model.model.<module>.ia3_l`, shape [out, 1] for an
//! output-scaled module and [1, in] for a feed-forward (input-scaled) one. As in peft, an output scale also
//! scales the bias. The saved `target_modules` / `feedforward_modules` list the full module names, so peft's
//! suffix matching picks exactly these modules (a bare `output.dense` would also catch
//! `attention.output.dense`).

use regex::Regex;
use rime_graph::{Graph, ParamStore, Var};
use rime_io::peft::AdapterConfig;
use rime_kernels::Device;
use rime_models::LinearHook;

use super::TuningMethod;
use crate::lora::find_targets;
use crate::Result;

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

/// IA3's settings, as peft's `IA3Config`; [`Default`] is peft's choice for BERT (key, value and the FFN
/// output linear, [`default_targets`]).
#[derive(Debug, Clone)]
pub struct Ia3Config {
    /// Modules to scale (peft `target_modules`): suffixes or `re:<regex>`, as
    /// [`crate::lora::LoraConfig::targets`]. BERT's FFN output linears (`encoder.layer.N.output.dense`) among
    /// them scale their input (peft `feedforward_modules`), the others their output.
    pub targets: Vec<String>,
}

impl Default for Ia3Config {
    fn default() -> Ia3Config {
        Ia3Config { targets: default_targets() }
    }
}

/// The rewrite: `y = (x·Wᵀ + b) ∘ l` for [out, 1] vectors, `y = (x ∘ l)·Wᵀ + b` for [1, in] ones.
/// With `targets`, a target module without its vector is an error (the vectors were never added).
pub struct Ia3Hook {
    pub targets: Option<Vec<String>>,
}

impl LinearHook for Ia3Hook {
    fn linear(
        &self,
        g: &mut Graph,
        store: &ParamStore,
        module: &str,
        x: Var,
        w: Var,
        b: Option<Var>,
    ) -> rime_graph::Result<Var> {
        let name = vector_name(module);
        let Some(id) = store.find(&name) else {
            super::refuse_missing_target(self.targets.as_deref(), module, "ia3 vector")?;
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

/// IA3 as a [`TuningMethod`].
pub struct Ia3 {
    config: Ia3Config,
    /// Training: a target module without its vector is an error. A loaded adapter: such modules stay plain.
    strict: bool,
}

impl Ia3 {
    pub fn new(config: Ia3Config) -> Ia3 {
        Ia3 { config, strict: true }
    }

    /// A saved IA3 adapter as it applies.
    pub fn from_adapter(a: &AdapterConfig) -> Result<Box<dyn TuningMethod>> {
        Ok(Box::new(Ia3 { config: Ia3Config { targets: a.target_modules.clone() }, strict: false }))
    }
}

impl TuningMethod for Ia3 {
    fn name(&self) -> &'static str {
        "ia3"
    }

    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn add_parameters(&self, dev: &Device, store: &mut ParamStore) -> Result<String> {
        let (o, f) = add_ia3(dev, store, &self.config.targets)?;
        Ok(format!("IA3: {} output-scaled and {} input-scaled (FFN) modules", o.len(), f.len()))
    }

    fn hook(&self) -> Box<dyn LinearHook> {
        Box::new(Ia3Hook { targets: self.strict.then(|| self.config.targets.clone()) })
    }

    /// The full names of the scaled modules as `target_modules`, the input-scaled ones also as
    /// `feedforward_modules`.
    fn adapter_config(&self, store: &ParamStore) -> Result<AdapterConfig> {
        let mods = super::modules_with(store, ".ia3_l");
        // rime-io writes `r` for every type and reads back only a positive one; IA3 ignores it.
        let mut a = AdapterConfig::lora(1, 0.0, mods.clone());
        a.peft_type = PEFT_TYPE.into();
        let ff: Vec<String> = mods.into_iter().filter(|m| is_feedforward(m)).collect();
        a.raw.insert("feedforward_modules".into(), serde_json::json!(ff));
        a.raw.insert("init_ia3_weights".into(), serde_json::json!(true));
        Ok(a)
    }

    fn is_method_tensor(&self, local: &str) -> bool {
        local.contains(".ia3_l")
    }
}
