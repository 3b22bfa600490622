#![allow(dead_code)]
//! Helpers shared by rime-models' tests.

use rime_graph::{Graph, ParamStore, Result, Var};
use rime_models::LinearHook;

/// LoRA through the hook on the decoder-layer projections whose names end with one of `modules`:
/// x·Wᵀ + s·(x·Aᵀ)·Bᵀ, A and B read from the store as `{module}.lora_A.weight` / `lora_B.weight`.
pub struct ModuleLora {
    pub scale: f32,
    pub modules: &'static [&'static str],
}

impl LinearHook for ModuleLora {
    fn rewrites(&self, _: &ParamStore, module: &str) -> bool {
        module.contains("layers.") && self.modules.iter().any(|m| module.ends_with(m))
    }
    fn linear(&self, g: &mut Graph, store: &ParamStore, module: &str, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
        if !self.rewrites(store, module) {
            return g.linear(x, w, b);
        }
        let a = g.param(store, &format!("{module}.lora_A.weight"))?;
        let bb = g.param(store, &format!("{module}.lora_B.weight"))?;
        g.lora(x, w, b, a, bb, self.scale)
    }
}
