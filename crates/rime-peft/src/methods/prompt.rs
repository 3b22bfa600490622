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

use rand::{Rng, SeedableRng};
use rime_graph::{Graph, ParamStore, Result, Var};
use rime_kernels::Device;
use rime_models::{LinearHook, VirtualTokens};

pub const PROMPT_TUNING: &str = "PROMPT_TUNING";
pub const PREFIX_TUNING: &str = "PREFIX_TUNING";
/// peft's key for both methods' table in adapter_model.safetensors (and rime's store name of the prompt).
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// How the soft prompt starts (peft's `prompt_tuning_init`; `TEXT` is not implemented).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptInit {
    /// Rows of the model's word embeddings at uniformly drawn token ids (peft's `RANDOM_DISCRETE`).
    RandomDiscrete,
    /// N(0, 1), torch.nn.Embedding's default (peft's `RANDOM`).
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

/// `layers` and `heads` are the encoder's (written to adapter_config.json as peft's num_layers and
/// num_attention_heads); [`crate::classifier::Method::for_model`] fills them.
#[derive(Debug, Clone)]
pub struct PromptConfig {
    pub num_virtual_tokens: usize,
    pub init: PromptInit,
    pub seed: u64,
    pub layers: usize,
    pub heads: usize,
}

/// As [`PromptConfig`]; the prefix tables are [P, C] per layer for `layers` layers.
#[derive(Debug, Clone)]
pub struct PrefixConfig {
    pub num_virtual_tokens: usize,
    pub seed: u64,
    pub layers: usize,
    pub heads: usize,
}

/// N(0, 1) by Box-Muller.
fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

pub fn prefix_name(layer: usize, value: bool) -> String {
    format!("prefix.{layer}.{}", if value { "value" } else { "key" })
}

/// (hidden size, vocabulary size) of the BERT encoder in `store` under `prefix` (`""` or `bert.`).
fn word_embeddings(store: &ParamStore) -> Result<(rime_graph::ParamId, usize, usize)> {
    let id = ["embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"]
        .iter()
        .find_map(|n| store.find(n))
        .ok_or_else(|| rime_graph::Error::Invalid("no embeddings.word_embeddings.weight: not a BERT encoder".into()))?;
    let shape = &store.get(id).tensor.shape;
    Ok((id, shape[0], shape[1]))
}

fn check_tokens(p: usize) -> Result<()> {
    if p == 0 {
        return Err(rime_graph::Error::Invalid("--num-virtual-tokens must be at least 1".into()));
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

/// Add the trainable prefixes, N(0, 1) as peft's `torch.nn.Embedding(P, L·2·C)`: one [P, C] key and value
/// table per layer. Returns a line describing them.
pub fn add_prefix(dev: &Device, store: &mut ParamStore, cfg: &PrefixConfig) -> Result<String> {
    check_tokens(cfg.num_virtual_tokens)?;
    let layers = cfg.layers;
    if layers == 0
        || store.find(&format!("encoder.layer.{}.attention.self.key.weight", layers - 1)).is_none()
            && store.find(&format!("bert.encoder.layer.{}.attention.self.key.weight", layers - 1)).is_none()
    {
        return Err(rime_graph::Error::Invalid(format!(
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

/// The soft prompt in front of the word embeddings.
pub struct PromptHook {
    pub tokens: usize,
}

impl LinearHook for PromptHook {
    fn virtual_tokens(&self) -> VirtualTokens {
        VirtualTokens { prompt: self.tokens, prefix: 0 }
    }
    fn input_embeddings(&self, g: &mut Graph, store: &ParamStore, e: Var) -> Result<Var> {
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

/// Key and value prefixes in every layer.
pub struct PrefixHook {
    pub tokens: usize,
}

impl LinearHook for PrefixHook {
    fn virtual_tokens(&self) -> VirtualTokens {
        VirtualTokens { prompt: 0, prefix: self.tokens }
    }
    fn attention_kv(&self, g: &mut Graph, store: &ParamStore, layer: usize, k: Var, v: Var) -> Result<(Var, Var)> {
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

/// Whether a store name is a prompt or prefix table (saved without peft's `base_model.model.` prefix).
pub fn is_virtual_table(name: &str) -> bool {
    name == PROMPT_EMBEDDINGS || (name.starts_with("prefix.") && (name.ends_with(".key") || name.ends_with(".value")))
}

fn config_for(
    store: &ParamStore,
    peft_type: &str,
    p: usize,
    layers: usize,
    heads: usize,
) -> Result<rime_io::peft::AdapterConfig> {
    let (_, _, c) = word_embeddings(store)?;
    if layers == 0 || heads == 0 {
        return Err(rime_graph::Error::Invalid(format!(
            "{peft_type}: num_layers {layers} / num_attention_heads {heads} unset (Method::for_model fills them)"
        )));
    }
    // rime-io writes `r` and the other LoRA fields for every type; drop_lora_fields removes them afterwards.
    let mut a = rime_io::peft::AdapterConfig::lora(1, 0.0, vec![]);
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
pub fn prompt_config(store: &ParamStore, cfg: &PromptConfig) -> Result<rime_io::peft::AdapterConfig> {
    let mut a = config_for(store, PROMPT_TUNING, cfg.num_virtual_tokens, cfg.layers, cfg.heads)?;
    a.raw.insert("prompt_tuning_init".into(), serde_json::json!(cfg.init.peft_name()));
    for k in ["prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"] {
        a.raw.insert(k.into(), serde_json::Value::Null);
    }
    Ok(a)
}

/// adapter_config.json fields of a PREFIX_TUNING adapter (peft's PrefixTuningConfig, no projection).
pub fn prefix_config(store: &ParamStore, cfg: &PrefixConfig) -> Result<rime_io::peft::AdapterConfig> {
    let mut a = config_for(store, PREFIX_TUNING, cfg.num_virtual_tokens, cfg.layers, cfg.heads)?;
    let (_, _, c) = word_embeddings(store)?;
    a.raw.insert("encoder_hidden_size".into(), serde_json::json!(c));
    a.raw.insert("prefix_projection".into(), serde_json::json!(false));
    Ok(a)
}

/// Replace the per-layer prefix tables among the tensors to save by peft's one `prompt_embeddings`
/// [P, L·2·C] (the prompt table is already under that name).
pub fn to_peft_layout(tensors: &mut Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<()> {
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
        return Err(rime_graph::Error::Invalid(format!(
            "prefix tables are not one [{p}, {c}] key and value per layer 0..{}",
            chunks.len() / 2
        )));
    }
    let data: Vec<Vec<f32>> = chunks.into_iter().map(|(_, _, _, d)| d).collect();
    let w = data.len() * c;
    tensors.push((PROMPT_EMBEDDINGS.into(), vec![p, w], join_prefix(&data, p, c)));
    Ok(())
}

/// Remove the LoRA-only fields rime-io writes for every adapter type from a prompt-learning config, so the
/// file is what peft writes for PROMPT_TUNING / PREFIX_TUNING.
pub fn drop_lora_fields(path: &std::path::Path) -> Result<()> {
    let err = |e: String| rime_graph::Error::Invalid(format!("{}: {e}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    if let Some(m) = v.as_object_mut() {
        for k in [
            "r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "fan_in_fan_out",
            "use_rslora",
            "use_dora",
            "bias",
            "rank_pattern",
            "alpha_pattern",
        ] {
            m.remove(k);
        }
    }
    let out = serde_json::to_string_pretty(&v).map_err(|e| err(e.to_string()))?;
    std::fs::write(path, out).map_err(|e| err(e.to_string()))
}

/// Turn a loaded PROMPT_TUNING / PREFIX_TUNING adapter's `prompt_embeddings` into rime's store layout,
/// checking it against the config and the model: the prompt keeps its name ([P, C]); a prefix [P, L·2·C] becomes
/// the per-layer tables.
pub fn from_peft_layout(store: &ParamStore, ad: &mut rime_io::peft::PeftAdapter, dir: &std::path::Path) -> Result<()> {
    let (_, _, c) = word_embeddings(store)?;
    let bad = |msg: String| rime_graph::Error::Invalid(format!("{}: {msg}", dir.display()));
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
        if store.find(&format!("encoder.layer.{l}.attention.self.key.weight")).is_some()
            || (0..l).any(|i| {
                store.find(&format!("encoder.layer.{i}.attention.self.key.weight")).is_none()
                    && store.find(&format!("bert.encoder.layer.{i}.attention.self.key.weight")).is_none()
            })
        {
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
