//! LoRA as a rewrite of a model graph: every target linear `x·Wᵀ + b` becomes the fused
//! `x·Wᵀ + s·(x·Aᵀ)·Bᵀ + b` with A [r, in], B [out, r] trainable and W frozen. Names follow peft
//! (`base_model.model.<module>.lora_A.weight`), so adapters move between rime and peft unchanged.

use rand::{Rng, SeedableRng};
use regex::Regex;
use rime_graph::{Graph, ParamStore, Result, Var};
use rime_kernels::Device;
use rime_models::LinearHook;

#[derive(Debug, Clone, PartialEq)]
pub enum LoraInit {
    /// peft's default: A kaiming-uniform (a=√5), B zero.
    Kaiming,
    /// A gaussian with std 1/r, B zero (peft's `init_lora_weights="gaussian"`).
    Gaussian,
}

#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    /// Module-name suffixes (`query`, `value`) or, when it starts with `re:`, a regex over the full name.
    pub targets: Vec<String>,
    pub rslora: bool,
    pub init: LoraInit,
    pub seed: u64,
}

impl LoraConfig {
    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }

    /// Does this module name match the targets (peft: exact name or a suffix after a dot)?
    pub fn matches(&self, module: &str) -> bool {
        target_matches(&self.targets, module)
    }
}

/// Does a module name match any target (peft: exact name or a suffix after a dot; `re:<regex>` searches)?
pub fn target_matches(targets: &[String], module: &str) -> bool {
    targets.iter().any(|t| {
        if let Some(re) = t.strip_prefix("re:") {
            Regex::new(re).map(|r| r.is_match(module)).unwrap_or(false)
        } else {
            module == t || module.ends_with(&format!(".{t}"))
        }
    })
}

/// The 2-D weights `<module>.weight` of the model (not adapter tensors) whose module matches `targets`, with
/// their shapes; an error listing a few module names when none match.
pub fn find_targets(store: &ParamStore, targets: &[String]) -> Result<Vec<(String, Vec<usize>)>> {
    let modules: Vec<(String, Vec<usize>)> = store
        .iter()
        .filter_map(|(_, p)| p.name.strip_suffix(".weight").map(|m| (m.to_string(), p.tensor.shape.clone())))
        .filter(|(m, s)| s.len() == 2 && !m.starts_with("base_model.") && target_matches(targets, m))
        .collect();
    if modules.is_empty() {
        let some: Vec<String> = store
            .iter()
            .filter(|(_, p)| p.tensor.shape.len() == 2)
            .take(6)
            .map(|(_, p)| p.name.trim_end_matches(".weight").to_string())
            .collect();
        return Err(rime_graph::Error::Invalid(format!(
            "--targets {targets:?} matched no linear layer; modules look like: {}",
            some.join(", ")
        )));
    }
    Ok(modules)
}

/// peft's name of a LoRA factor for a module (`base_model.model.<module>.lora_A.weight`).
pub fn factor_name(module: &str, which: char) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

/// Create A and B for every target linear of the model already in the store (weights named
/// `<module>.weight`). Returns the modules adapted; errors if none matched (listing a few candidates).
pub fn add_lora(dev: &Device, store: &mut ParamStore, cfg: &LoraConfig) -> Result<Vec<String>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let modules = find_targets(store, &cfg.targets)?;
    for (m, shape) in &modules {
        let (out_f, in_f) = (shape[0], shape[1]);
        let a: Vec<f32> = match cfg.init {
            LoraInit::Kaiming => {
                let bound = 1.0 / (in_f as f32).sqrt();
                (0..cfg.rank * in_f).map(|_| rng.random_range(-bound..bound)).collect()
            }
            LoraInit::Gaussian => {
                let std = 1.0 / cfg.rank as f32;
                (0..cfg.rank * in_f).map(|_| gaussian(&mut rng) * std).collect()
            }
        };
        let b = vec![0f32; out_f * cfg.rank];
        store.add_f32(dev, &factor_name(m, 'A'), &a, &[cfg.rank, in_f], true)?;
        store.add_f32(dev, &factor_name(m, 'B'), &b, &[out_f, cfg.rank], true)?;
    }
    Ok(modules.into_iter().map(|(m, _)| m).collect())
}

fn gaussian(rng: &mut impl Rng) -> f32 {
    // Box-Muller
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// The graph rewrite: target linears whose factors are in the store become fused LoRA ops.
pub struct LoraHook {
    pub scale: f32,
}

impl LinearHook for LoraHook {
    fn linear(&self, g: &mut Graph, store: &ParamStore, module: &str, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
        let (an, bn) = (factor_name(module, 'A'), factor_name(module, 'B'));
        if store.find(&an).is_some() && store.find(&bn).is_some() {
            let a = g.param(store, &an)?;
            let bf = g.param(store, &bn)?;
            g.lora(x, w, b, a, bf, self.scale)
        } else {
            g.linear(x, w, b)
        }
    }
}

/// peft-compatible names without the adapter name (`.default`) that peft keeps in memory.
pub fn strip_adapter_name(name: &str) -> String {
    name.replace(".default.weight", ".weight")
}

#[allow(unused)]
fn _regex_ok() -> bool {
    Regex::new("x").is_ok()
}
