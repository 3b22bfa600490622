//! rime-models: architectures as graph builders from a config. A model is built into a [`rime_graph::Graph`]
//! over parameters already in a [`rime_graph::ParamStore`] under their Hugging Face names; every linear layer
//! goes through a [`LinearHook`], which is how tuning methods (LoRA, IA3, adapters ...) rewrite the model
//! without the model knowing about them.

pub mod bert;
pub mod generate;
pub mod llama;

use rime_graph::{Graph, ParamStore, Result, Var};

/// Called for every linear layer of a model with its Hugging Face module name (e.g.
/// `encoder.layer.0.attention.self.query`). The default is the plain linear layer.
pub trait LinearHook {
    fn linear(&self, g: &mut Graph, store: &ParamStore, module: &str, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
        let _ = (store, module);
        g.linear(x, w, b)
    }
    /// Called on the output of the FFN activation of layer `layer` (IA3 scales it).
    fn ffn_activation(&self, g: &mut Graph, store: &ParamStore, layer: usize, h: Var) -> Result<Var> {
        let _ = (g, store, layer);
        Ok(h)
    }
    /// Called on the output of a transformer sub-block before its residual add (`attention` or `ffn`):
    /// bottleneck adapters live here.
    fn block_output(
        &self,
        g: &mut Graph,
        store: &ParamStore,
        layer: usize,
        block: &str,
        x_in: Var,
        y: Var,
    ) -> Result<Var> {
        let _ = (g, store, layer, block, x_in);
        Ok(y)
    }
}

/// No rewrite: the pretrained model as is.
pub struct Plain;
impl LinearHook for Plain {}
