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
use crate::config::HeadKind;
use crate::ia3::Ia3Config;
use crate::lora::LoraConfig;
use crate::methods::{self, TuningMethod};
use crate::prompt::{PrefixConfig, PromptConfig};
use crate::svfit::SvfitConfig;
use crate::{Error, Result};

pub const HEAD_WEIGHT: &str = "head.weight";
pub const HEAD_BIAS: &str = "head.bias";
/// The [`HeadKind::Hf`] head's linear layer, as `BertForSequenceClassification` names it.
pub const HF_CLASSIFIER_WEIGHT: &str = "classifier.weight";
pub const HF_CLASSIFIER_BIAS: &str = "classifier.bias";
/// The input that picks the first token for [`HeadKind::Hf`]'s pooler: [B, 1, T], one-hot at position 0.
pub const FIRST_TOKEN: &str = "first_token_weights";
/// Constants of tanh written with the graph's ops (see [`tanh`]); frozen, never saved.
const TANH_IN: &str = "rime.tanh.in";
const TANH_OUT: &str = "rime.tanh.out";

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
    /// Ladder side-tuning: a narrow side network beside the frozen encoder ([`crate::lst`]); trained by
    /// [`crate::lst::LstTask`], not by the tasks that rewrite the encoder (they refuse it).
    Lst(crate::lst::LstConfig),
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

impl From<crate::lst::LstConfig> for Method {
    fn from(c: crate::lst::LstConfig) -> Method {
        Method::Lst(c)
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
            Method::Lst(c) => Box::new(methods::lst::Lst::new(c.clone())),
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

/// The head of the model in `store`: [`HeadKind::Mean`] when it holds `head.weight`, [`HeadKind::Hf`] when it
/// holds `classifier.weight` (and no `head.weight`); an error naming both otherwise.
pub fn head_kind(store: &ParamStore) -> Result<HeadKind> {
    if store.find(HEAD_WEIGHT).is_some() {
        Ok(HeadKind::Mean)
    } else if store.find(HF_CLASSIFIER_WEIGHT).is_some() {
        Ok(HeadKind::Hf)
    } else {
        Err(Error::Msg(format!(
            "no classification head: neither '{HEAD_WEIGHT}' (mean-pool head) nor '{HF_CLASSIFIER_WEIGHT}' \
             (BertForSequenceClassification's head)"
        )))
    }
}

/// The bias of the head in `store` (by [`head_kind`]).
fn head_bias_name(store: &ParamStore) -> Result<&'static str> {
    Ok(match head_kind(store)? {
        HeadKind::Mean => HEAD_BIAS,
        HeadKind::Hf => HF_CLASSIFIER_BIAS,
    })
}

/// How many classes the head in `store` scores (rows of its bias).
pub fn head_classes(store: &ParamStore) -> Result<usize> {
    let id = store.id(head_bias_name(store)?)?;
    Ok(store.get(id).tensor.shape[0])
}

/// A new trainable head of `kind` for `classes` labels on a model with hidden size `hidden` whose checkpoint
/// names start with `prefix`. [`HeadKind::Mean`] is [`init_head`]; [`HeadKind::Hf`] checks the checkpoint's
/// pooler (`pooler.dense.*`, kept frozen) and initializes `classifier` as transformers does (weight
/// N(0, 0.02), bias 0); a `classifier` the checkpoint already has (a `*ForSequenceClassification` checkpoint)
/// is replaced when its shape fits and refused otherwise.
pub fn init_head_of(
    dev: &Device,
    store: &mut ParamStore,
    kind: HeadKind,
    prefix: &str,
    hidden: usize,
    classes: usize,
    seed: u64,
) -> Result<()> {
    if kind == HeadKind::Mean {
        return init_head(dev, store, hidden, classes, seed);
    }
    for part in ["weight", "bias"] {
        let name = format!("{prefix}pooler.dense.{part}");
        if store.find(&name).is_none() {
            return Err(Error::Msg(format!(
                "the BertForSequenceClassification head reads the checkpoint's pooler, and this checkpoint has no \
                 '{name}': use the mean-pool head"
            )));
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x4ead);
    let w: Vec<f32> = (0..classes * hidden).map(|_| 0.02 * crate::methods::prompt::normal(&mut rng)).collect();
    let b = vec![0f32; classes];
    for (name, data, shape) in
        [(HF_CLASSIFIER_WEIGHT, w, vec![classes, hidden]), (HF_CLASSIFIER_BIAS, b, vec![classes])]
    {
        match store.find(name) {
            Some(id) => {
                let have = store.get(id).tensor.shape.clone();
                if have != shape {
                    return Err(Error::Msg(format!(
                        "the checkpoint's '{name}' has shape {have:?}; this run's {classes} labels need {shape:?}"
                    )));
                }
                dev.write_f32(&store.get(id).tensor, &data)?;
                store.set_trainable(id, true);
            }
            None => {
                store.add_f32(dev, name, &data, &shape, true)?;
            }
        }
    }
    add_tanh_constants(dev, store)
}

/// The frozen constants [`tanh`] multiplies by (added once).
pub fn add_tanh_constants(dev: &Device, store: &mut ParamStore) -> Result<()> {
    if store.find(TANH_IN).is_none() {
        store.add_f32(dev, TANH_IN, &[2.0, 0.0], &[1, 2], false)?;
    }
    if store.find(TANH_OUT).is_none() {
        store.add_f32(dev, TANH_OUT, &[1.0, -1.0], &[2, 1], false)?;
    }
    Ok(())
}

/// tanh of a [N, C] tensor with the graph's ops (it has no tanh): tanh(x) = σ(2x) − σ(−2x), where
/// (σ(2x), σ(−2x)) = softmax((2x, 0)); each element becomes a row (x) · [2, 0], softmax over the pair, · [1, −1]ᵀ.
/// Autodiff follows through matmul and softmax.
pub fn tanh(g: &mut Graph, store: &ParamStore, x: Var) -> Result<Var> {
    let shape = g.shape(x).to_vec();
    let n: usize = shape.iter().product();
    let col = g.reshape(x, &[n, 1])?;
    let tin = g.param(store, TANH_IN)?;
    let tout = g.param(store, TANH_OUT)?;
    let pair = g.matmul(col, tin)?;
    let sm = g.softmax(pair, None, false);
    let t = g.matmul(sm, tout)?;
    Ok(g.reshape(t, &shape)?)
}

/// The logits of `BertForSequenceClassification`'s head over the encoder's last hidden states [B, T, C]:
/// `classifier(tanh(pooler.dense(h[:, 0])))` (dropout is off at evaluation and, as in peft's default, the
/// first token is the sequence's first row: a soft prompt's first token under prompt tuning).
fn hf_logits(g: &mut Graph, store: &ParamStore, prefix: &str, hidden: Var) -> Result<Var> {
    let sh = g.shape(hidden).to_vec();
    let (b, t, c) = (sh[0], sh[1], sh[2]);
    let pick = g.input(FIRST_TOKEN, &[b, 1, t], DType::F32);
    let first = g.matmul(pick, hidden)?;
    let first = g.reshape(first, &[b, c])?;
    let pw = g.param(store, &format!("{prefix}pooler.dense.weight"))?;
    let pb = g.param(store, &format!("{prefix}pooler.dense.bias"))?;
    let d = g.linear(first, pw, Some(pb))?;
    let pooled = tanh(g, store, d)?;
    let cw = g.param(store, HF_CLASSIFIER_WEIGHT)?;
    let cb = g.param(store, HF_CLASSIFIER_BIAS)?;
    Ok(g.linear(pooled, cw, Some(cb))?)
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
    /// The head the logits come from (the feed picks the first token for [`HeadKind::Hf`]).
    pub head: HeadKind,
}

/// Build the classification graph for (b, t): encoder → mean pool → head → cross-entropy, or with a
/// [`HeadKind::Hf`] head in the store: encoder → first token → pooler → classifier → cross-entropy (`pooled`
/// stays the mean pool either way).
#[allow(clippy::too_many_arguments)]
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
    let head = head_kind(store)?;
    let logits = match head {
        HeadKind::Mean => {
            let hw = g.param(store, HEAD_WEIGHT)?;
            let hb = g.param(store, HEAD_BIAS)?;
            g.linear(enc.pooled, hw, Some(hb))?
        }
        HeadKind::Hf => hf_logits(&mut g, store, prefix, enc.last_hidden)?,
    };
    let labels = g.input("labels", &[b], DType::I32);
    let loss = g.cross_entropy(logits, labels, -100)?;
    let exec = Executor::new_sharing(dev, g, store, Some(loss), &[logits, enc.pooled], optim, donor)?;
    Ok(ShapeExec {
        exec,
        logits,
        loss,
        pooled: enc.pooled,
        batch: b,
        seq: t,
        virtual_tokens: hook.virtual_tokens(),
        head,
    })
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
    if se.head == HeadKind::Hf {
        let tx = pool.len() / b;
        let first: Vec<f32> = (0..b * tx).map(|i| if i % tx == 0 { 1.0 } else { 0.0 }).collect();
        ex.feed_f32(dev, FIRST_TOKEN, &first)?;
    }
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
/// under `modules_to_save`, `base` as `base_model_name_or_path`, `task_type: SEQ_CLS` and `labels` as
/// `rime_labels` (in rime.json). Tensor names are the ones peft writes (see [`to_peft_names`]).
pub fn save_method_adapter(
    dev: &Device,
    store: &ParamStore,
    method: &dyn TuningMethod,
    base: &str,
    labels: &[String],
    dir: &Path,
) -> Result<()> {
    let mut adapter = peft_adapter(dev, store, method, base)?;
    let config = &mut adapter.config;
    config.modules_to_save = match head_kind(store).unwrap_or_default() {
        HeadKind::Mean => vec!["head".into()],
        // What peft writes for task_type SEQ_CLS (its default modules_to_save).
        HeadKind::Hf => vec!["classifier".into(), "score".into()],
    };
    config.task_type = Some("SEQ_CLS".into());
    config.raw.insert("rime_labels".into(), serde_json::json!(labels));
    let tmp = dir.with_extension("tmp-write");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::Msg(format!("{}: {e}", tmp.display())))?;
    }
    adapter.save(&tmp)?;
    crate::checkpoint::replace_dir(&tmp, dir)
}

/// The trainable parts in `store` as a peft adapter value for `method`: the method's tensors under the names
/// peft writes ([`to_peft_names`]) and its adapter_config.json fields, `base` as `base_model_name_or_path`; no
/// task type. [`save_method_adapter`] adds a classification head's fields, the embedding task its own.
pub fn peft_adapter(
    dev: &Device,
    store: &ParamStore,
    method: &dyn TuningMethod,
    base: &str,
) -> Result<rime_io::peft::PeftAdapter> {
    let mut tensors = trainable_tensors(dev, store)?;
    method.write_tensors(dev, store, &mut tensors)?;
    let mut config = method.adapter_config(store)?;
    let head = head_kind(store).unwrap_or_default();
    to_peft_names(&mut tensors, head, store_prefix(store), is_prompt_learning(method.peft_type()));
    config.base_model_name_or_path = Some(base.to_string());
    Ok(rime_io::peft::PeftAdapter::new(
        config,
        tensors.into_iter().map(|(name, shape, data)| rime_io::peft::AdapterTensor { name, shape, data }).collect(),
    ))
}

/// Whether a `peft_type` is one of peft's prompt-learning methods, whose saved modules (the head) peft names
/// `base_model.<module>` rather than `base_model.model.<module>`.
pub fn is_prompt_learning(peft_type: &str) -> bool {
    matches!(peft_type, crate::prompt::PROMPT_TUNING | crate::prompt::PREFIX_TUNING)
}

/// The checkpoint-name prefix of the encoder in `store`: `bert.` for a `BertFor*` checkpoint, else empty.
pub fn store_prefix(store: &ParamStore) -> &'static str {
    if store.find("bert.embeddings.word_embeddings.weight").is_some() {
        "bert."
    } else {
        ""
    }
}

/// Whether a tensor name (without peft's prefix) belongs to a classification head.
fn is_head_tensor(local: &str) -> bool {
    local.starts_with("head.") || local.starts_with("classifier.")
}

const PEFT_PREFIX: &str = rime_io::peft::PEFT_PREFIX;

/// Tensor names as peft saves them for the model class the head implies: the head under
/// `base_model.model.<head>` (`base_model.<head>` for prompt learning); with [`HeadKind::Hf`] the encoder's
/// tensors under `base_model.model.bert.` (`PeftModel(BertForSequenceClassification)`), with
/// [`HeadKind::Mean`] under the checkpoint's own names (`PeftModel(BertModel)` for an encoder-only checkpoint).
/// Prompt tables (`prompt_embeddings`) keep their name.
pub fn to_peft_names(tensors: &mut [methods::SavedTensor], head: HeadKind, prefix: &str, prompt_learning: bool) {
    for (name, _, _) in tensors.iter_mut() {
        if crate::prompt::is_virtual_table(name) {
            continue;
        }
        let local = name.strip_prefix(PEFT_PREFIX).unwrap_or(name).to_string();
        *name = if is_head_tensor(&local) {
            format!("{}{local}", if prompt_learning { "base_model." } else { PEFT_PREFIX })
        } else if head == HeadKind::Hf && prefix.is_empty() {
            format!("{PEFT_PREFIX}bert.{local}")
        } else {
            format!("{PEFT_PREFIX}{local}")
        };
    }
}

/// The inverse of [`to_peft_names`] for any layout peft writes: `base_model.model.<name>` and (prompt
/// learning) `base_model.<name>`, with or without `.modules_to_save.default`, the encoder under `bert.` or
/// bare; names become `base_model.model.<store name>` (the encoder's under the store's own prefix, see
/// [`store_prefix`]). Prompt tables and names outside `base_model.` stay as they are.
pub fn to_store_names(ad: &mut rime_io::peft::PeftAdapter, store: &ParamStore) {
    let prefix = store_prefix(store);
    let bert = store.find("embeddings.word_embeddings.weight").is_some() || !prefix.is_empty();
    for t in &mut ad.tensors {
        if crate::prompt::is_virtual_table(&t.name) || !t.name.starts_with("base_model.") {
            continue;
        }
        let name = t.name.replace(".modules_to_save.default", "");
        let local = name.strip_prefix(PEFT_PREFIX).or_else(|| name.strip_prefix("base_model.")).unwrap_or(&name);
        let local = if is_head_tensor(local) || !bert {
            local.to_string()
        } else {
            format!("{prefix}{}", local.strip_prefix("bert.").unwrap_or(local))
        };
        t.name = format!("{PEFT_PREFIX}{local}");
    }
    ad.tensors.sort_by(|a, b| a.name.cmp(&b.name));
}

/// Load an adapter folder's tensors into the store: existing trainable parameters are overwritten,
/// missing ones (e.g. LoRA factors on a fresh store) are added (trainable, or frozen where the method says so).
/// The method is the adapter's `peft_type` (see [`methods::REGISTRY`]); names may be in any layout peft writes
/// ([`to_store_names`]). Returns the adapter's config and labels: `rime_labels` when the adapter has them,
/// else `LABEL_0`, `LABEL_1`, ... (transformers' default names) for as many classes as the head has; none
/// without a head.
pub fn load_adapter(
    dev: &Device,
    store: &mut ParamStore,
    dir: &Path,
) -> Result<(rime_io::peft::AdapterConfig, Vec<String>)> {
    let mut ad = rime_io::peft::PeftAdapter::load(dir)?;
    to_store_names(&mut ad, store);
    let method = methods::from_adapter(&ad.config).map_err(|e| Error::Msg(format!("{}: {e}", dir.display())))?;
    method.read_tensors(dev, store, &mut ad, dir)?;
    for t in &ad.tensors {
        let local = t.name.strip_prefix(PEFT_PREFIX).unwrap_or(&t.name);
        // Method tensors (LoRA factors, SVFit, IA3 vectors, bottleneck adapters) keep peft's full name in the
        // store; the head and other saved modules their own.
        let name = if method.is_method_tensor(local) { t.name.clone() } else { local.to_string() };
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
    if store.find(HEAD_WEIGHT).is_none() && store.find(HF_CLASSIFIER_WEIGHT).is_some() {
        let prefix = store_prefix(store);
        for part in ["weight", "bias"] {
            let name = format!("{prefix}pooler.dense.{part}");
            if store.find(&name).is_none() {
                return Err(Error::Msg(format!(
                    "{}: the adapter's head is BertForSequenceClassification's 'classifier', which reads the \
                     pooler, and the model has no '{name}'",
                    dir.display()
                )));
            }
        }
        add_tanh_constants(dev, store)?;
    }
    let mut labels: Vec<String> = ad
        .config
        .raw
        .get("rime_labels")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
        .unwrap_or_default();
    if labels.is_empty() {
        if let Ok(n) = head_classes(store) {
            labels = (0..n).map(|i| format!("LABEL_{i}")).collect();
        }
    }
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
