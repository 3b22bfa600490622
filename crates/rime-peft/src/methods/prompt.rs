//! Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021) for the encoder classifier, with
//! peft's semantics (`PROMPT_TUNING` / `PREFIX_TUNING`, task `SEQ_CLS`, one transformer submodule).
//!
//! - Prompt tuning trains a table [P, C] that peft concatenates in front of the word embeddings
//!   (`inputs_embeds`) before BertEmbeddings adds position and token-type embeddings: the virtual tokens take
//!   positions 0..P and token type 0, the real tokens positions P..P+T, and the attention mask gets P ones in
//!   front.
//! - Prefix tuning (no projection, peft's default) trains a table [P, L·2·C]; peft views it as
//!   [P, 2L, NH, HS] and splits `permute([2, 0, 3, 1, 4])` into pairs, so layer l's key prefix is column chunk
//!   2l and its value prefix chunk 2l+1. They go in front of that layer's projected keys and values (no
//!   position embedding of their own); queries stay the T real tokens, which BertModel places at positions
//!   P..P+T beside `past_key_values`; the mask gets P ones in front of the keys.
//!
//! In the store the prompt is `prompt_embeddings` [P, C] and the prefix is split into one [P, C] tensor per
//! layer and kind (`prefix.<l>.key`, `prefix.<l>.value`), so that each prepend reads a whole tensor; the saved
//! adapter holds peft's single `prompt_embeddings` tensor either way. rime's head pools the mask-weighted mean
//! of the real tokens only (virtual tokens never enter the pool).
//!
//! This file holds prompt tuning and what both share (the table's name, the adapter_config.json fields, reading
//! peft's table back); prefix tuning's own parts are in [`super::prefix`] (re-exported here).

use std::path::Path;

use rand::{Rng, SeedableRng};
use rime_graph::{Graph, ParamStore, Var};
use rime_io::peft::{AdapterConfig, PeftAdapter};
use rime_kernels::Device;
use rime_models::bert::BertConfig;
use rime_models::{LinearHook, VirtualTokens};

pub use super::prefix::{
    add_prefix, join_prefix, prefix_config, prefix_layers, prefix_name, split_prefix, to_peft_layout, Prefix,
    PrefixConfig, PrefixHook, PREFIX_TUNING,
};
use super::TuningMethod;
use crate::classifier::Method;
use crate::{Error, Result};

pub const PROMPT_TUNING: &str = "PROMPT_TUNING";
/// peft's key for both methods' table in adapter_model.safetensors (and rime's store name of the prompt).
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// How the soft prompt starts (peft's `prompt_tuning_init`; `TEXT` is not implemented).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PromptInit {
    /// Rows of the model's word embeddings at uniformly drawn token ids (peft's `RANDOM_DISCRETE`).
    RandomDiscrete,
    /// N(0, 1), torch.nn.Embedding's default (peft's `RANDOM`, peft's default).
    #[default]
    Random,
}

impl PromptInit {
    pub fn parse(s: &str) -> Option<PromptInit> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "random-discrete" | "vocab" => Some(PromptInit::RandomDiscrete),
            "random" | "normal" => Some(PromptInit::Random),
            _ => None,
        }
    }
    /// The value of peft's `prompt_tuning_init`.
    pub fn peft_name(self) -> &'static str {
        match self {
            PromptInit::RandomDiscrete => "RANDOM_DISCRETE",
            PromptInit::Random => "RANDOM",
        }
    }
}

/// Prompt tuning's settings, as peft's `PromptTuningConfig`. [`Default`]: peft's `RANDOM` init and the CLI's 20
/// virtual tokens (peft has no default count); `layers` and `heads` are the encoder's, which
/// [`crate::classifier::Method::for_model`] fills in.
#[derive(Debug, Clone)]
pub struct PromptConfig {
    /// Soft-prompt tokens P in front of every input, at least 1 (peft `num_virtual_tokens`); they take positions
    /// too, so P + the longest sequence must fit the model's max_position_embeddings.
    pub num_virtual_tokens: usize,
    /// How the prompt starts (peft `prompt_tuning_init`).
    pub init: PromptInit,
    /// Seeds the prompt's initialization.
    pub seed: u64,
    /// The encoder's depth (peft `num_layers`, recorded in adapter_config.json).
    pub layers: usize,
    /// The encoder's attention heads (peft `num_attention_heads`, recorded in adapter_config.json).
    pub heads: usize,
}

impl Default for PromptConfig {
    fn default() -> PromptConfig {
        PromptConfig { num_virtual_tokens: 20, init: PromptInit::Random, seed: 0, layers: 0, heads: 0 }
    }
}

/// N(0, 1) by Box-Muller.
pub(crate) fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// The token table of the model in `store` and its (rows, width): a BERT encoder's word embeddings (under `""`
/// or `bert.`), or for a ViT its CLS token ([1, 1, C]: width C, no rows to draw a random-discrete init from).
pub(super) fn word_embeddings(store: &ParamStore) -> Result<(rime_graph::ParamId, usize, usize)> {
    if let Some(id) = ["embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"]
        .iter()
        .find_map(|n| store.find(n))
    {
        let shape = &store.get(id).tensor.shape;
        return Ok((id, shape[0], shape[1]));
    }
    let cls = store.iter().find(|(_, p)| p.name.ends_with("embeddings.cls_token") && p.tensor.shape.len() == 3);
    match cls {
        Some((id, p)) => Ok((id, 0, p.tensor.shape[2])),
        None => {
            Err(Error::Msg("no embeddings.word_embeddings.weight or embeddings.cls_token: not a BERT or ViT".into()))
        }
    }
}

/// Encoder layers of the model in `store`: how many `encoder.layer.N.attention.*.key.weight` there are, from 0
/// (BERT's `[bert.]…attention.self.key`, a ViT's `[backbone.]…attention.attention.key`).
pub(super) fn encoder_layers(store: &ParamStore) -> usize {
    let has = |l: usize| {
        let layer = format!("encoder.layer.{l}.attention.");
        store.iter().any(|(_, p)| p.name.contains(&layer) && p.name.ends_with(".key.weight"))
    };
    (0..).take_while(|&l| has(l)).count()
}

pub(super) fn check_tokens(p: usize) -> Result<()> {
    if p == 0 {
        return Err(Error::invalid("num_virtual_tokens", "0: must be at least 1"));
    }
    Ok(())
}

/// Add the trainable prompt [P, C]. Returns a line describing it.
pub fn add_prompt(dev: &Device, store: &mut ParamStore, cfg: &PromptConfig) -> Result<String> {
    check_tokens(cfg.num_virtual_tokens)?;
    let (we, vocab, c) = word_embeddings(store)?;
    let p = cfg.num_virtual_tokens;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0x9e0b_7a11);
    let data: Vec<f32> = match cfg.init {
        PromptInit::RandomDiscrete if vocab == 0 => {
            return Err(Error::invalid(
                "prompt_init",
                "random-discrete draws prompt rows from a word-embedding table, which a vision model has not; \
                 use random (N(0, 1), as visual prompt tuning)",
            ))
        }
        PromptInit::RandomDiscrete => {
            let table = store.read_f32(dev, we)?;
            (0..p)
                .flat_map(|_| {
                    let id = rng.random_range(0..vocab);
                    table[id * c..(id + 1) * c].to_vec()
                })
                .collect()
        }
        PromptInit::Random => (0..p * c).map(|_| normal(&mut rng)).collect(),
    };
    store.add_f32(dev, PROMPT_EMBEDDINGS, &data, &[p, c], true)?;
    Ok(format!("prompt tuning: {p} virtual tokens of width {c} ({} init)", cfg.init.peft_name()))
}

/// The soft prompt in front of the word embeddings.
pub struct PromptHook {
    pub tokens: usize,
}

impl LinearHook for PromptHook {
    fn virtual_tokens(&self) -> VirtualTokens {
        VirtualTokens { prompt: self.tokens, prefix: 0 }
    }
    fn input_embeddings(&self, g: &mut Graph, store: &ParamStore, e: Var) -> rime_graph::Result<Var> {
        let p = g.param(store, PROMPT_EMBEDDINGS)?;
        if g.shape(p)[0] != self.tokens {
            return Err(rime_graph::Error::Invalid(format!(
                "{PROMPT_EMBEDDINGS} has {} rows, the config says {} virtual tokens",
                g.shape(p)[0],
                self.tokens
            )));
        }
        g.prepend(e, p)
    }
}

/// Whether a store name is a prompt or prefix table (saved without peft's `base_model.model.` prefix).
pub fn is_virtual_table(name: &str) -> bool {
    name == PROMPT_EMBEDDINGS || (name.starts_with("prefix.") && (name.ends_with(".key") || name.ends_with(".value")))
}

pub(super) fn config_for(
    store: &ParamStore,
    peft_type: &str,
    p: usize,
    layers: usize,
    heads: usize,
) -> Result<AdapterConfig> {
    let (_, _, c) = word_embeddings(store)?;
    if layers == 0 || heads == 0 {
        return Err(Error::Msg(format!(
            "{peft_type}: num_layers {layers} / num_attention_heads {heads} unset (Method::for_model fills them)"
        )));
    }
    // `r` = 1 only to build the config; `AdapterConfig::to_json` leaves the LoRA fields out for prompt learning.
    let mut a = AdapterConfig::lora(1, 0.0, vec![]);
    a.peft_type = peft_type.into();
    for (k, v) in [
        ("num_virtual_tokens", serde_json::json!(p)),
        ("token_dim", serde_json::json!(c)),
        ("num_transformer_submodules", serde_json::json!(1)),
        ("num_attention_heads", serde_json::json!(heads)),
        ("num_layers", serde_json::json!(layers)),
        ("revision", serde_json::Value::Null),
    ] {
        a.raw.insert(k.into(), v);
    }
    Ok(a)
}

/// adapter_config.json fields of a PROMPT_TUNING adapter (peft's PromptTuningConfig).
pub fn prompt_config(store: &ParamStore, cfg: &PromptConfig) -> Result<AdapterConfig> {
    let mut a = config_for(store, PROMPT_TUNING, cfg.num_virtual_tokens, cfg.layers, cfg.heads)?;
    a.raw.insert("prompt_tuning_init".into(), serde_json::json!(cfg.init.peft_name()));
    for k in ["prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"] {
        a.raw.insert(k.into(), serde_json::Value::Null);
    }
    Ok(a)
}

/// Turn a loaded PROMPT_TUNING / PREFIX_TUNING adapter's `prompt_embeddings` into rime's store layout,
/// checking it against the config and the model: the prompt keeps its name ([P, C]); a prefix [P, L·2·C] becomes
/// the per-layer tables.
pub fn from_peft_layout(store: &ParamStore, ad: &mut PeftAdapter, dir: &Path) -> Result<()> {
    let (_, _, c) = word_embeddings(store)?;
    let bad = |msg: String| Error::Msg(format!("{}: {msg}", dir.display()));
    let raw = &ad.config.raw;
    let get = |k: &str| raw.get(k).and_then(|v| v.as_u64()).map(|x| x as usize);
    let p = get("num_virtual_tokens").filter(|&p| p > 0).ok_or_else(|| bad("no positive num_virtual_tokens".into()))?;
    if let Some(dim) = get("token_dim") {
        if dim != c {
            return Err(bad(format!("token_dim {dim}, but the model's hidden size is {c} (another base model?)")));
        }
    }
    let prefix = ad.config.peft_type == PREFIX_TUNING;
    let layers = if prefix {
        let l = get("num_layers").ok_or_else(|| bad("a PREFIX_TUNING config without num_layers".into()))?;
        if encoder_layers(store) != l {
            return Err(bad(format!("num_layers {l} differs from the model's number of encoder layers")));
        }
        if raw.get("prefix_projection").and_then(|v| v.as_bool()) == Some(true) {
            return Err(bad("prefix_projection = true (an MLP over the prefix) is not supported".into()));
        }
        l
    } else {
        0
    };
    let i = ad
        .tensors
        .iter()
        .position(|t| t.name == PROMPT_EMBEDDINGS)
        .ok_or_else(|| bad(format!("no '{PROMPT_EMBEDDINGS}' tensor in adapter_model.safetensors")))?;
    let want = if prefix { vec![p, layers * 2 * c] } else { vec![p, c] };
    if ad.tensors[i].shape != want {
        return Err(bad(format!(
            "'{PROMPT_EMBEDDINGS}' has shape {:?}, expected {want:?} (num_virtual_tokens {p}, hidden size {c}{})",
            ad.tensors[i].shape,
            if prefix { format!(", {layers} layers × key and value") } else { String::new() }
        )));
    }
    if prefix {
        let t = ad.tensors.remove(i);
        for (j, data) in split_prefix(&t.data, p, layers, c).into_iter().enumerate() {
            ad.tensors.push(rime_io::peft::AdapterTensor {
                name: prefix_name(j / 2, j % 2 == 1),
                shape: vec![p, c],
                data,
            });
        }
    }
    Ok(())
}

/// `num_virtual_tokens` of a PROMPT_TUNING / PREFIX_TUNING adapter_config.json.
pub(super) fn virtual_tokens_of(cfg: &AdapterConfig) -> Result<usize> {
    cfg.raw.get("num_virtual_tokens").and_then(|v| v.as_u64()).filter(|&n| n > 0).map(|n| n as usize).ok_or_else(|| {
        Error::Msg(format!("adapter_config.json of a {} adapter needs a positive num_virtual_tokens", cfg.peft_type))
    })
}

/// Prompt tuning as a [`TuningMethod`].
pub struct Prompt {
    config: PromptConfig,
}

impl Prompt {
    pub fn new(config: PromptConfig) -> Prompt {
        Prompt { config }
    }

    /// A saved PROMPT_TUNING adapter as it applies (its table is read by [`from_peft_layout`]).
    pub fn from_adapter(a: &AdapterConfig) -> Result<Box<dyn TuningMethod>> {
        let config = PromptConfig { num_virtual_tokens: virtual_tokens_of(a)?, ..PromptConfig::default() };
        Ok(Box::new(Prompt { config }))
    }
}

impl TuningMethod for Prompt {
    fn name(&self) -> &'static str {
        "prompt"
    }

    fn peft_type(&self) -> &'static str {
        PROMPT_TUNING
    }

    fn virtual_tokens(&self) -> VirtualTokens {
        VirtualTokens { prompt: self.config.num_virtual_tokens, prefix: 0 }
    }

    fn for_model(&self, cfg: &BertConfig) -> Option<Method> {
        Some(Method::Prompt(PromptConfig { layers: cfg.layers, heads: cfg.heads, ..self.config.clone() }))
    }

    fn add_parameters(&self, dev: &Device, store: &mut ParamStore) -> Result<String> {
        add_prompt(dev, store, &self.config)
    }

    fn hook(&self) -> Box<dyn LinearHook> {
        Box::new(PromptHook { tokens: self.config.num_virtual_tokens })
    }

    fn adapter_config(&self, store: &ParamStore) -> Result<AdapterConfig> {
        prompt_config(store, &self.config)
    }

    fn read_tensors(&self, _dev: &Device, store: &ParamStore, ad: &mut PeftAdapter, dir: &Path) -> Result<()> {
        from_peft_layout(store, ad, dir)
    }
}
