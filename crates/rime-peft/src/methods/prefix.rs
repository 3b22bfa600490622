//! Prefix tuning (Li & Liang 2021) with peft's semantics (`PREFIX_TUNING`, no projection): trainable key and
//! value tokens in front of every layer's keys and values. The layout, shared with prompt tuning, is described
//! in [`super::prompt`].

use std::path::Path;

use rand::SeedableRng;
use rime_graph::{Graph, ParamStore, Var};
use rime_io::peft::{AdapterConfig, PeftAdapter};
use rime_kernels::Device;
use rime_models::bert::BertConfig;
use rime_models::{LinearHook, VirtualTokens};

use super::prompt::{
    check_tokens, config_for, encoder_layers, from_peft_layout, normal, virtual_tokens_of, word_embeddings,
    PROMPT_EMBEDDINGS,
};
use super::{SavedTensor, TuningMethod};
use crate::classifier::Method;
use crate::{Error, Result};

pub const PREFIX_TUNING: &str = "PREFIX_TUNING";

/// Prefix tuning's settings, as peft's `PrefixTuningConfig` without projection. [`Default`]: the CLI's 20
/// virtual tokens (peft has no default count); `layers` and `heads` are the encoder's, which
/// [`crate::classifier::Method::for_model`] fills in.
#[derive(Debug, Clone)]
pub struct PrefixConfig {
    /// Key/value tokens P in front of every layer's keys and values, at least 1 (peft `num_virtual_tokens`);
    /// the real tokens take positions after them, so P + the longest sequence must fit the model's
    /// max_position_embeddings.
    pub num_virtual_tokens: usize,
    /// Seeds the tables' initialization (N(0, 1), as peft's embedding).
    pub seed: u64,
    /// The encoder's depth: one key and one value table [P, C] per layer (peft `num_layers`).
    pub layers: usize,
    /// The encoder's attention heads (peft `num_attention_heads`, recorded in adapter_config.json).
    pub heads: usize,
}

impl Default for PrefixConfig {
    fn default() -> PrefixConfig {
        PrefixConfig { num_virtual_tokens: 20, seed: 0, layers: 0, heads: 0 }
    }
}

pub fn prefix_name(layer: usize, value: bool) -> String {
    format!("prefix.{layer}.{}", if value { "value" } else { "key" })
}

/// Add the trainable prefixes, N(0, 1) as peft's `torch.nn.Embedding(P, L·2·C)`: one [P, C] key and value
/// table per layer. Returns a line describing them.
pub fn add_prefix(dev: &Device, store: &mut ParamStore, cfg: &PrefixConfig) -> Result<String> {
    check_tokens(cfg.num_virtual_tokens)?;
    let layers = cfg.layers;
    if layers == 0 || encoder_layers(store) < layers {
        return Err(Error::Msg(format!(
            "prefix tuning for {layers} layers, but the model has no encoder.layer.{}: set the method's layers \
             from the model config (Method::for_model)",
            layers.saturating_sub(1)
        )));
    }
    let (_, _, c) = word_embeddings(store)?;
    let p = cfg.num_virtual_tokens;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0x9ef1_c0de);
    // Drawn row by row of peft's [P, L·2·C] table, so a seed gives the same table whichever way it is stored.
    let full: Vec<f32> = (0..p * layers * 2 * c).map(|_| normal(&mut rng)).collect();
    for (chunk, data) in split_prefix(&full, p, layers, c).into_iter().enumerate() {
        store.add_f32(dev, &prefix_name(chunk / 2, chunk % 2 == 1), &data, &[p, c], true)?;
    }
    Ok(format!("prefix tuning: {p} virtual key/value tokens in each of {layers} layers"))
}

/// peft's table [P, L·2·C] → 2L tables [P, C] in chunk order (layer 0 key, layer 0 value, layer 1 key, ...).
pub fn split_prefix(full: &[f32], p: usize, layers: usize, c: usize) -> Vec<Vec<f32>> {
    let w = layers * 2 * c;
    (0..2 * layers).map(|j| (0..p).flat_map(|r| full[r * w + j * c..r * w + (j + 1) * c].to_vec()).collect()).collect()
}

/// The inverse of [`split_prefix`].
pub fn join_prefix(chunks: &[Vec<f32>], p: usize, c: usize) -> Vec<f32> {
    let mut full = Vec::with_capacity(p * chunks.len() * c);
    for r in 0..p {
        for ch in chunks {
            full.extend_from_slice(&ch[r * c..(r + 1) * c]);
        }
    }
    full
}

/// Number of layers of prefix tables in the store (0: none).
pub fn prefix_layers(store: &ParamStore) -> usize {
    (0..).take_while(|&l| store.find(&prefix_name(l, false)).is_some()).count()
}

/// Key and value prefixes in every layer.
pub struct PrefixHook {
    pub tokens: usize,
}

impl LinearHook for PrefixHook {
    fn virtual_tokens(&self) -> VirtualTokens {
        VirtualTokens { prompt: 0, prefix: self.tokens }
    }
    fn attention_kv(
        &self,
        g: &mut Graph,
        store: &ParamStore,
        layer: usize,
        k: Var,
        v: Var,
    ) -> rime_graph::Result<(Var, Var)> {
        let pk = g.param(store, &prefix_name(layer, false))?;
        let pv = g.param(store, &prefix_name(layer, true))?;
        if g.shape(pk)[0] != self.tokens {
            return Err(rime_graph::Error::Invalid(format!(
                "{} has {} rows, the config says {} virtual tokens",
                prefix_name(layer, false),
                g.shape(pk)[0],
                self.tokens
            )));
        }
        Ok((g.prepend(k, pk)?, g.prepend(v, pv)?))
    }
}

/// adapter_config.json fields of a PREFIX_TUNING adapter (peft's PrefixTuningConfig, no projection).
pub fn prefix_config(store: &ParamStore, cfg: &PrefixConfig) -> Result<AdapterConfig> {
    let mut a = config_for(store, PREFIX_TUNING, cfg.num_virtual_tokens, cfg.layers, cfg.heads)?;
    let (_, _, c) = word_embeddings(store)?;
    a.raw.insert("encoder_hidden_size".into(), serde_json::json!(c));
    a.raw.insert("prefix_projection".into(), serde_json::json!(false));
    Ok(a)
}

/// Replace the per-layer prefix tables among the tensors to save by peft's one `prompt_embeddings`
/// [P, L·2·C] (the prompt table is already under that name).
pub fn to_peft_layout(tensors: &mut Vec<SavedTensor>) -> Result<()> {
    let mut chunks: Vec<(usize, bool, Vec<usize>, Vec<f32>)> = Vec::new();
    tensors.retain(|(name, shape, data)| {
        let Some(rest) = name.strip_prefix("prefix.") else { return true };
        let (l, kind) = rest.split_once('.').unwrap_or((rest, ""));
        match (l.parse::<usize>(), kind) {
            (Ok(l), "key" | "value") => {
                chunks.push((l, kind == "value", shape.clone(), data.clone()));
                false
            }
            _ => true,
        }
    });
    if chunks.is_empty() {
        return Ok(());
    }
    chunks.sort_by_key(|(l, v, _, _)| (*l, *v));
    let (p, c) = (chunks[0].2[0], chunks[0].2[1]);
    let complete = chunks.iter().enumerate().all(|(j, (l, v, s, _))| *l == j / 2 && *v == (j % 2 == 1) && s == &[p, c]);
    if !complete {
        return Err(Error::Msg(format!(
            "prefix tables are not one [{p}, {c}] key and value per layer 0..{}",
            chunks.len() / 2
        )));
    }
    let data: Vec<Vec<f32>> = chunks.into_iter().map(|(_, _, _, d)| d).collect();
    let w = data.len() * c;
    tensors.push((PROMPT_EMBEDDINGS.into(), vec![p, w], join_prefix(&data, p, c)));
    Ok(())
}

/// Prefix tuning as a [`TuningMethod`].
pub struct Prefix {
    config: PrefixConfig,
}

impl Prefix {
    pub fn new(config: PrefixConfig) -> Prefix {
        Prefix { config }
    }

    /// A saved PREFIX_TUNING adapter as it applies (its table is split by [`from_peft_layout`]).
    pub fn from_adapter(a: &AdapterConfig) -> Result<Box<dyn TuningMethod>> {
        let config = PrefixConfig { num_virtual_tokens: virtual_tokens_of(a)?, ..PrefixConfig::default() };
        Ok(Box::new(Prefix { config }))
    }
}

impl TuningMethod for Prefix {
    fn name(&self) -> &'static str {
        "prefix"
    }

    fn peft_type(&self) -> &'static str {
        PREFIX_TUNING
    }

    fn virtual_tokens(&self) -> VirtualTokens {
        VirtualTokens { prompt: 0, prefix: self.config.num_virtual_tokens }
    }

    fn for_model(&self, cfg: &BertConfig) -> Option<Method> {
        Some(Method::Prefix(PrefixConfig { layers: cfg.layers, heads: cfg.heads, ..self.config.clone() }))
    }

    fn add_parameters(&self, dev: &Device, store: &mut ParamStore) -> Result<String> {
        add_prefix(dev, store, &self.config)
    }

    fn hook(&self) -> Box<dyn LinearHook> {
        Box::new(PrefixHook { tokens: self.config.num_virtual_tokens })
    }

    fn adapter_config(&self, store: &ParamStore) -> Result<AdapterConfig> {
        prefix_config(store, &self.config)
    }

    /// The per-layer tables become peft's one `prompt_embeddings` [P, L·2·C].
    fn write_tensors(&self, _dev: &Device, _store: &ParamStore, tensors: &mut Vec<SavedTensor>) -> Result<()> {
        to_peft_layout(tensors)
    }

    fn read_tensors(&self, _dev: &Device, store: &ParamStore, ad: &mut PeftAdapter, dir: &Path) -> Result<()> {
        from_peft_layout(store, ad, dir)
    }
}
