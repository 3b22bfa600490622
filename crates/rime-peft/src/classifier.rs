//! A sequence classifier on a frozen encoder: the checkpoint's weights (frozen), a tuning method's
//! trainable parts, and a linear head on the mask-weighted mean pool. Graphs are built per padded sequence
//! length (a few buckets), each with its own executor; all share the same parameters. The pool is the mean over
//! the real tokens only: soft-prompt tokens (prompt tuning) are in the encoder's sequence but not in the pool.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rime_graph::{Executor, Graph, OptimConfig, ParamStore, Var};
use rime_io::{Checkpoint, ModelConfig};
use rime_kernels::{DType, Device};
use rime_models::bert::{self, BertConfig};
use rime_models::{LinearHook, VirtualTokens};

use crate::adapter::BottleneckConfig;
use crate::ia3::Ia3Config;
use crate::lora::LoraConfig;
use crate::methods::{self, TuningMethod};
use crate::prompt::{PrefixConfig, PromptConfig};
use crate::svfit::SvfitConfig;
use crate::{Error, Result};

pub const HEAD_WEIGHT: &str = "head.weight";
pub const HEAD_BIAS: &str = "head.bias";

/// Which parts train beside the head: a tuning method and its config, as a front end chooses it. What each
/// method does lives in its file under [`crate::methods`]; [`Method::tuning`] gives its [`TuningMethod`].
#[derive(Debug, Clone)]
pub enum Method {
    /// The LoRA family: LoRA, rsLoRA, DoRA, PiSSA init, LoRA dropout ([`crate::methods::lora`]).
    Lora(LoraConfig),
    /// The head alone (linear probe, [`crate::methods::probe`]).
    Probe,
    /// Singular values of the target weights ([`crate::methods::svfit`]).
    Svfit(SvfitConfig),
    /// (IA)³ scaling vectors ([`crate::methods::ia3`]).
    Ia3 {
        /// As [`Ia3Config::targets`] (default [`crate::ia3::default_targets`]).
        targets: Vec<String>,
    },
    /// Bottleneck adapters after the attention and FFN sub-blocks ([`crate::methods::bottleneck`]).
    Adapter(BottleneckConfig),
    /// Trainable soft-prompt tokens in front of the input ([`crate::methods::prompt`]).
    Prompt(PromptConfig),
    /// Trainable key/value prefixes in every layer ([`crate::methods::prefix`]).
    Prefix(PrefixConfig),
}

impl From<LoraConfig> for Method {
    fn from(c: LoraConfig) -> Method {
        Method::Lora(c)
    }
}

impl From<SvfitConfig> for Method {
    fn from(c: SvfitConfig) -> Method {
        Method::Svfit(c)
    }
}

impl From<Ia3Config> for Method {
    fn from(c: Ia3Config) -> Method {
        Method::Ia3 { targets: c.targets }
    }
}

impl From<BottleneckConfig> for Method {
    fn from(c: BottleneckConfig) -> Method {
        Method::Adapter(c)
    }
}

impl From<PromptConfig> for Method {
    fn from(c: PromptConfig) -> Method {
        Method::Prompt(c)
    }
}

impl From<PrefixConfig> for Method {
    fn from(c: PrefixConfig) -> Method {
        Method::Prefix(c)
    }
}

impl Method {
    /// The method as a [`TuningMethod`]: the one place that looks at the variant.
    pub fn tuning(&self) -> Box<dyn TuningMethod> {
        match self {
            Method::Lora(c) => Box::new(methods::lora::Lora::new(c.clone())),
            Method::Probe => Box::new(methods::probe::Probe),
            Method::Svfit(c) => Box::new(methods::svfit::Svfit::new(c.clone())),
            Method::Ia3 { targets } => Box::new(methods::ia3::Ia3::new(Ia3Config { targets: targets.clone() })),
            Method::Adapter(c) => Box::new(methods::bottleneck::Bottleneck::new(c.clone())),
            Method::Prompt(c) => Box::new(methods::prompt::Prompt::new(c.clone())),
            Method::Prefix(c) => Box::new(methods::prefix::Prefix::new(c.clone())),
        }
    }

    /// rime's short name of the method (`lora`, `svfit`, `ia3`, `adapter`, `prompt`, `prefix`, `probe`).
    pub fn name(&self) -> &'static str {
        self.tuning().name()
    }

    /// The method with the model's sizes filled in where it needs them (prompt and prefix tuning record the
    /// encoder's depth and heads in adapter_config.json).
    pub fn for_model(self, cfg: &BertConfig) -> Method {
        self.tuning().for_model(cfg).unwrap_or(self)
    }

    /// The virtual tokens this method adds to every sequence.
    pub fn virtual_tokens(&self) -> VirtualTokens {
        self.tuning().virtual_tokens()
    }
}

/// Refuse a run whose virtual tokens and longest sequence do not fit the model's position table.
pub fn check_virtual_fit(vt: VirtualTokens, max_length: usize, cfg: &BertConfig) -> Result<()> {
    let p = vt.offset();
    if p > 0 && p + max_length > cfg.max_positions {
        return Err(Error::invalid(
            "num_virtual_tokens",
            format!(
                "{p} + max_length {max_length} = {} exceeds the model's {} positions (max_position_embeddings); \
                 lower one of them (max_length {} fits)",
                p + max_length,
                cfg.max_positions,
                cfg.max_positions.saturating_sub(p)
            ),
        ));
    }
    Ok(())
}

/// Add a method's trainable (and frozen helper) tensors to a store holding the model; SVFit also rewrites
/// the target weights into W_rest. Returns a line describing what was added.
pub fn prepare_method(dev: &Device, store: &mut ParamStore, method: &Method) -> Result<String> {
    method.tuning().add_parameters(dev, store)
}

pub fn bert_config(cfg: &ModelConfig) -> BertConfig {
    BertConfig {
        hidden: cfg.hidden_size,
        layers: cfg.num_hidden_layers,
        heads: cfg.num_attention_heads,
        intermediate: cfg.intermediate_size,
        vocab: cfg.vocab_size,
        max_positions: cfg.max_position_embeddings,
        type_vocab: cfg.type_vocab_size,
        eps: cfg.layer_norm_eps as f32,
        gelu_tanh: cfg.hidden_act != "gelu",
    }
}

/// Upload every float tensor of a checkpoint as a frozen f32 parameter under its own name.
/// A `bert.` prefix (BertForSequenceClassification checkpoints) is kept; the returned prefix says which.
pub fn load_frozen(dev: &Device, store: &mut ParamStore, ckpt: &Checkpoint) -> Result<String> {
    load_frozen_as(dev, store, ckpt, DType::F32)
}

/// [`load_frozen`] with the encoder's linear weights (2-D `*.weight` outside the embeddings: every matrix a
/// matmul reads as its weight operand) stored as `weights` (f32, f16 or bf16); everything else stays f32.
pub fn load_frozen_as(dev: &Device, store: &mut ParamStore, ckpt: &Checkpoint, weights: DType) -> Result<String> {
    for name in ckpt.names() {
        let (dtype, _) = ckpt.info(name)?;
        if !dtype.is_float() {
            continue; // e.g. embeddings.position_ids (I64)
        }
        let (_, shape) = ckpt.info(name)?;
        let shape = shape.to_vec();
        let data = ckpt.get_f32(name)?;
        let linear = shape.len() == 2 && name.ends_with(".weight") && !name.contains("embeddings.");
        match weights {
            DType::F16 if linear => {
                let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                store.add(name, dev.upload_f16(&h, &shape)?, false)?;
            }
            DType::BF16 if linear => {
                let h: Vec<half::bf16> = data.iter().map(|&x| half::bf16::from_f32(x)).collect();
                store.add(name, dev.upload_bf16(&h, &shape)?, false)?;
            }
            _ => {
                store.add_f32(dev, name, &data, &shape, false)?;
            }
        }
    }
    store.add_texture_twins(dev)?;
    let prefix = if ckpt.contains("bert.embeddings.word_embeddings.weight") { "bert." } else { "" };
    if !ckpt.contains(&format!("{prefix}embeddings.word_embeddings.weight")) {
        return Err(Error::Msg(format!(
            "{}: no embeddings.word_embeddings.weight: not a BERT encoder checkpoint",
            ckpt.path().display()
        )));
    }
    Ok(prefix.to_string())
}

/// torch.nn.Linear's default init: weight and bias uniform in ±1/√in.
pub fn init_head(dev: &Device, store: &mut ParamStore, hidden: usize, classes: usize, seed: u64) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x4ead);
    let bound = 1.0 / (hidden as f32).sqrt();
    let w: Vec<f32> = (0..classes * hidden).map(|_| rng.random_range(-bound..bound)).collect();
    let b: Vec<f32> = (0..classes).map(|_| rng.random_range(-bound..bound)).collect();
    store.add_f32(dev, HEAD_WEIGHT, &w, &[classes, hidden], true)?;
    store.add_f32(dev, HEAD_BIAS, &b, &[classes], true)?;
    Ok(())
}

/// One compiled graph for a fixed (batch, seq_len).
pub struct ShapeExec {
    pub exec: Executor,
    pub logits: Var,
    pub loss: Var,
    pub pooled: Var,
    pub batch: usize,
    pub seq: usize,
    /// Virtual tokens of the method (the feed extends positions, types, mask and pool weights by them).
    pub virtual_tokens: VirtualTokens,
}

/// Build the classification graph for (b, t): encoder → mean pool → head → cross-entropy.
pub fn build_exec(
    dev: &Device,
    store: &ParamStore,
    cfg: &BertConfig,
    prefix: &str,
    hook: &dyn LinearHook,
    b: usize,
    t: usize,
    optim: Option<OptimConfig>,
) -> Result<ShapeExec> {
    build_exec_sharing(dev, store, cfg, prefix, hook, b, t, optim, None)
}

/// [`build_exec`] sharing the optimizer state of `donor` (the same model compiled for another length bucket).
#[allow(clippy::too_many_arguments)]
pub fn build_exec_sharing(
    dev: &Device,
    store: &ParamStore,
    cfg: &BertConfig,
    prefix: &str,
    hook: &dyn LinearHook,
    b: usize,
    t: usize,
    optim: Option<OptimConfig>,
    donor: Option<&Executor>,
) -> Result<ShapeExec> {
    let mut g = Graph::new();
    let enc = bert::build(&mut g, store, cfg, prefix, b, t, hook)?;
    let hw = g.param(store, HEAD_WEIGHT)?;
    let hb = g.param(store, HEAD_BIAS)?;
    let logits = g.linear(enc.pooled, hw, Some(hb))?;
    let labels = g.input("labels", &[b], DType::I32);
    let loss = g.cross_entropy(logits, labels, -100)?;
    let exec = Executor::new_sharing(dev, g, store, Some(loss), &[logits, enc.pooled], optim, donor)?;
    Ok(ShapeExec { exec, logits, loss, pooled: enc.pooled, batch: b, seq: t, virtual_tokens: hook.virtual_tokens() })
}

/// Feed one tokenized batch (rows beyond `n_real` are padding rows: empty mask, ignored label).
pub fn feed(dev: &Device, se: &ShapeExec, ids: &[u32], types: &[u32], mask: &[u32], labels: &[i32]) -> Result<()> {
    let (b, t) = (se.batch, se.seq);
    let (types, pos, maskf, pool) = bert::virtual_inputs(types, mask, b, t, se.virtual_tokens);
    let ex = &se.exec;
    ex.feed_u32(dev, bert::INPUT_IDS, ids)?;
    ex.feed_u32(dev, bert::TOKEN_TYPE_IDS, &types)?;
    ex.feed_u32(dev, bert::POSITION_IDS, &pos)?;
    ex.feed_f32(dev, bert::ATTENTION_MASK, &maskf)?;
    ex.feed_f32(dev, bert::POOL_WEIGHTS, &pool)?;
    ex.feed_i32(dev, "labels", labels)?;
    Ok(())
}

/// The hook a method rewrites the encoder with for training (LoRA dropout included).
pub fn hook_for(method: &Method) -> Box<dyn LinearHook> {
    method.tuning().hook()
}

/// The hook for evaluation and inference: [`hook_for`] without dropout; None when it is the same as
/// [`hook_for`] (so a training session can evaluate with its training graphs).
pub fn eval_hook_for(method: &Method) -> Option<Box<dyn LinearHook>> {
    method.tuning().eval_hook()
}

/// The hook for an adapter folder that [`load_adapter`] read (by its `peft_type`, see [`methods::REGISTRY`]).
pub fn hook_for_adapter(cfg: &rime_io::peft::AdapterConfig) -> Result<Box<dyn LinearHook>> {
    Ok(methods::from_adapter(cfg)?.hook())
}

/// Trainable tensors under their peft names, for saving an adapter. Prompt and prefix tables keep their own
/// names (see [`save_adapter`] for how a prefix is written).
pub fn trainable_tensors(dev: &Device, store: &ParamStore) -> Result<Vec<methods::SavedTensor>> {
    let mut out = Vec::new();
    for (id, p) in store.trainable() {
        let name = if p.name.starts_with("base_model.model.") || crate::prompt::is_virtual_table(&p.name) {
            p.name.clone()
        } else {
            format!("base_model.model.{}", p.name)
        };
        out.push((name, p.tensor.shape.clone(), store.read_f32(dev, id)?));
    }
    Ok(out)
}

/// The adapter_config of a LoRA-family run (rsLoRA, DoRA, dropout, init), converting the tensors of a PiSSA
/// run in place to a rank-2r LoRA of the unmodified base (peft's `path_initial_model_for_weight_conversion`).
pub fn lora_adapter_config(
    dev: &Device,
    store: &ParamStore,
    c: &crate::lora::LoraConfig,
    tensors: &mut Vec<methods::SavedTensor>,
) -> Result<rime_io::peft::AdapterConfig> {
    let lora = methods::lora::Lora::new(c.clone());
    let config = lora.adapter_config(store)?;
    lora.write_tensors(dev, store, tensors)?;
    Ok(config)
}

/// Write the trainable parts as a peft adapter folder (atomically: a temp folder renamed into place).
pub fn save_adapter(
    dev: &Device,
    store: &ParamStore,
    method: &Method,
    base: &str,
    labels: &[String],
    dir: &Path,
) -> Result<()> {
    save_method_adapter(dev, store, method.tuning().as_ref(), base, labels, dir)
}

/// [`save_adapter`] for any [`TuningMethod`]: the method's tensors and adapter_config.json fields, the head
/// under `modules_to_save`, `base` as `base_model_name_or_path` and `labels` as `rime_labels`.
pub fn save_method_adapter(
    dev: &Device,
    store: &ParamStore,
    method: &dyn TuningMethod,
    base: &str,
    labels: &[String],
    dir: &Path,
) -> Result<()> {
    let mut tensors = trainable_tensors(dev, store)?;
    method.write_tensors(dev, store, &mut tensors)?;
    let mut config = method.adapter_config(store)?;
    config.modules_to_save = vec!["head".into()];
    config.base_model_name_or_path = Some(base.to_string());
    config.task_type = Some("SEQ_CLS".into());
    config.raw.insert("rime_labels".into(), serde_json::json!(labels));
    let adapter = rime_io::peft::PeftAdapter::new(
        config,
        tensors.into_iter().map(|(name, shape, data)| rime_io::peft::AdapterTensor { name, shape, data }).collect(),
    );
    let tmp = dir.with_extension("tmp-write");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::Msg(format!("{}: {e}", tmp.display())))?;
    }
    adapter.save(&tmp)?;
    crate::checkpoint::replace_dir(&tmp, dir)
}

/// Load an adapter folder's tensors into the store: existing trainable parameters are overwritten,
/// missing ones (e.g. LoRA factors on a fresh store) are added (trainable, or frozen where the method says so).
/// The method is the adapter's `peft_type` (see [`methods::REGISTRY`]). Returns the adapter's labels.
pub fn load_adapter(
    dev: &Device,
    store: &mut ParamStore,
    dir: &Path,
) -> Result<(rime_io::peft::AdapterConfig, Vec<String>)> {
    let mut ad = rime_io::peft::PeftAdapter::load(dir)?;
    let method = methods::from_adapter(&ad.config).map_err(|e| Error::Msg(format!("{}: {e}", dir.display())))?;
    method.read_tensors(dev, store, &mut ad, dir)?;
    for t in &ad.tensors {
        let local = t.name.strip_prefix("base_model.model.").unwrap_or(&t.name);
        // Method tensors (LoRA factors, SVFit, IA3 vectors, bottleneck adapters) keep peft's full name in the
        // store; the head and other saved modules their own.
        let name =
            if method.is_method_tensor(local) { t.name.clone() } else { local.replace(".modules_to_save.default", "") };
        match store.find(&name) {
            Some(id) => {
                let p = store.get(id);
                if p.tensor.shape != t.shape {
                    return Err(Error::Msg(format!(
                        "{}: tensor '{}' has shape {:?}, the model expects {:?}",
                        dir.display(),
                        t.name,
                        t.shape,
                        p.tensor.shape
                    )));
                }
                dev.write_f32(&p.tensor, &t.data)?;
            }
            None => {
                store.add_f32(dev, &name, &t.data, &t.shape, !method.loads_frozen(&name))?;
            }
        }
    }
    method.after_load(dev, store)?;
    let labels: Vec<String> = ad
        .config
        .raw
        .get("rime_labels")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
        .unwrap_or_default();
    Ok((ad.config, labels))
}

/// Metrics of one evaluation pass.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EvalMetrics {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub loss: f64,
    pub examples: usize,
}
