//! A sequence classifier on a frozen encoder: the checkpoint's weights (frozen), a tuning method's
//! trainable parts, and a linear head on the mask-weighted mean pool. Graphs are built per padded sequence
//! length (a few buckets), each with its own executor; all share the same parameters.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rime_graph::{Executor, Graph, OptimConfig, ParamStore, Var};
use rime_io::{Checkpoint, ModelConfig};
use rime_kernels::{DType, Device};
use rime_models::bert::{self, BertConfig};
use rime_models::{LinearHook, Plain};

use crate::lora::{LoraConfig, LoraHook};
use crate::{Error, Result};

pub const HEAD_WEIGHT: &str = "head.weight";
pub const HEAD_BIAS: &str = "head.bias";

/// Which parts train.
#[derive(Debug, Clone)]
pub enum Method {
    Lora(LoraConfig),
    /// The head alone (linear probe).
    Probe,
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Lora(_) => "lora",
            Method::Probe => "probe",
        }
    }
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
    for name in ckpt.names() {
        let (dtype, _) = ckpt.info(name)?;
        if !dtype.is_float() {
            continue; // e.g. embeddings.position_ids (I64)
        }
        let (_, shape) = ckpt.info(name)?;
        let shape = shape.to_vec();
        let data = ckpt.get_f32(name)?;
        store.add_f32(dev, name, &data, &shape, false)?;
    }
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
    let mut g = Graph::new();
    let enc = bert::build(&mut g, store, cfg, prefix, b, t, hook)?;
    let hw = g.param(store, HEAD_WEIGHT)?;
    let hb = g.param(store, HEAD_BIAS)?;
    let logits = g.linear(enc.pooled, hw, Some(hb))?;
    let labels = g.input("labels", &[b], DType::I32);
    let loss = g.cross_entropy(logits, labels, -100)?;
    let exec = Executor::new(dev, g, store, Some(loss), &[logits, enc.pooled], optim)?;
    Ok(ShapeExec { exec, logits, loss, pooled: enc.pooled, batch: b, seq: t })
}

/// Feed one tokenized batch (rows beyond `n_real` are padding rows: empty mask, ignored label).
pub fn feed(dev: &Device, se: &ShapeExec, ids: &[u32], types: &[u32], mask: &[u32], labels: &[i32]) -> Result<()> {
    let (b, t) = (se.batch, se.seq);
    let (pos, maskf, pool) = bert::aux_inputs(mask, b, t);
    let ex = &se.exec;
    ex.feed_u32(dev, bert::INPUT_IDS, ids)?;
    ex.feed_u32(dev, bert::TOKEN_TYPE_IDS, types)?;
    ex.feed_u32(dev, bert::POSITION_IDS, &pos)?;
    ex.feed_f32(dev, bert::ATTENTION_MASK, &maskf)?;
    ex.feed_f32(dev, bert::POOL_WEIGHTS, &pool)?;
    ex.feed_i32(dev, "labels", labels)?;
    Ok(())
}

/// The hook a method rewrites the encoder with.
pub fn hook_for(method: &Method) -> Box<dyn LinearHook> {
    match method {
        Method::Lora(c) => Box::new(LoraHook { scale: c.scale() }),
        Method::Probe => Box::new(Plain),
    }
}

/// Trainable tensors under their peft names, for saving an adapter.
pub fn trainable_tensors(dev: &Device, store: &ParamStore) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>> {
    let mut out = Vec::new();
    for (id, p) in store.trainable() {
        let name = if p.name.starts_with("base_model.model.") { p.name.clone() } else { format!("base_model.model.{}", p.name) };
        out.push((name, p.tensor.shape.clone(), store.read_f32(dev, id)?));
    }
    Ok(out)
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
    let tensors = trainable_tensors(dev, store)?;
    let mut config = match method {
        Method::Lora(c) => {
            let mut a = rime_io::peft::AdapterConfig::lora(c.rank, c.alpha as f64, c.targets.clone());
            a.use_rslora = c.rslora;
            a
        }
        Method::Probe => {
            let mut a = rime_io::peft::AdapterConfig::lora(0, 0.0, vec![]);
            a.peft_type = "RIME_PROBE".into();
            a
        }
    };
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
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::Msg(format!("{}: {e}", dir.display())))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::Msg(format!("{}: {e}", dir.display())))?;
    Ok(())
}

/// Load an adapter folder's tensors into the store: existing trainable parameters are overwritten,
/// missing ones (e.g. LoRA factors on a fresh store) are added (trainable). Returns the adapter's labels.
pub fn load_adapter(dev: &Device, store: &mut ParamStore, dir: &Path) -> Result<(rime_io::peft::AdapterConfig, Vec<String>)> {
    let ad = rime_io::peft::PeftAdapter::load(dir)?;
    for t in &ad.tensors {
        let local = t.name.strip_prefix("base_model.model.").unwrap_or(&t.name);
        // LoRA factors keep peft's full name in the store; the head and other saved modules their own.
        let name = if local.contains(".lora_") { t.name.clone() } else { local.replace(".modules_to_save.default", "") };
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
                store.add_f32(dev, &name, &t.data, &t.shape, true)?;
            }
        }
    }
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

#[allow(dead_code)]
fn _unused(_: BTreeMap<String, String>) {}
