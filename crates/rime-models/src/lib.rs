//! rime-models: architectures as graph builders from a config. A model is built into a [`rime_graph::Graph`]
//! over parameters already in a [`rime_graph::ParamStore`] under their Hugging Face names; every linear layer
//! goes through a [`LinearHook`], which is how tuning methods (LoRA, IA3, adapters ...) rewrite the model
//! without the model knowing about them.

pub mod bert;
pub mod generate;
pub mod llama;
pub mod lora;
pub mod vit;

use rime_graph::{Graph, ParamStore, Result, Var};

/// Virtual tokens a tuning method adds to an encoder's sequence (prompt and prefix tuning); none by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtualTokens {
    /// Soft-prompt rows in front of the word embeddings: they take positions 0..P and token type 0, and the
    /// real tokens positions P..P+T (peft's `inputs_embeds` concatenation before `BertEmbeddings`).
    pub prompt: usize,
    /// Rows in front of every layer's keys and values (after their projections); the queries stay the real
    /// tokens, which take positions P..P+T as Hugging Face's BertModel gives them beside `past_key_values`.
    pub prefix: usize,
}

impl VirtualTokens {
    /// Position of the first real token.
    pub fn offset(&self) -> usize {
        self.prompt + self.prefix
    }
}

/// Called for every linear layer of a model with its Hugging Face module name (e.g.
/// `encoder.layer.0.attention.self.query`). The default is the plain linear layer.
pub trait LinearHook {
    fn linear(&self, g: &mut Graph, store: &ParamStore, module: &str, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
        let _ = (store, module);
        g.linear(x, w, b)
    }
    /// Whether [`LinearHook::linear`] rewrites `module` (anything but the plain linear layer), given `store`.
    /// A model may take a faster path for a linear layer its hook leaves plain (the decoders' output head fused
    /// with the loss: `llama::build_loss`). The default, true, is the safe answer for a hook that does not say.
    fn rewrites(&self, store: &ParamStore, module: &str) -> bool {
        let _ = (store, module);
        true
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
    /// The virtual tokens the hooks below add (the encoder sizes its inputs by them).
    fn virtual_tokens(&self) -> VirtualTokens {
        VirtualTokens::default()
    }
    /// Called on the word embeddings [B, T, C] before position and token-type embeddings are added; returns
    /// [B, prompt + T, C] (soft prompts).
    fn input_embeddings(&self, g: &mut Graph, store: &ParamStore, e: Var) -> Result<Var> {
        let _ = (g, store);
        Ok(e)
    }
    /// Called on the keys and values [B, S, C] of layer `layer` after their projections; returns
    /// [B, prefix + S, C] each (prefix tuning).
    fn attention_kv(&self, g: &mut Graph, store: &ParamStore, layer: usize, k: Var, v: Var) -> Result<(Var, Var)> {
        let _ = (g, store, layer);
        Ok((k, v))
    }
}

/// No rewrite: the pretrained model as is.
pub struct Plain;
impl LinearHook for Plain {
    fn rewrites(&self, _: &ParamStore, _: &str) -> bool {
        false
    }
}
