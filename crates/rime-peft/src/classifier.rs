//! A sequence classifier on a frozen encoder: the checkpoint's weights (frozen), a tuning method's
//! trainable parts, and a linear head on the mask-weighted mean pool. Graphs are built per padded sequence
//! length (a few buckets), each with its own executor; all share the same parameters. The pool is the mean over
//! the real tokens only: soft-prompt tokens (prompt tuning) are in the encoder's sequence but not in the pool.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rime_graph::{Executor, Graph, OptimConfig, ParamStore, Var};
use rime_io::{Checkpoint, ModelConfig};
use rime_kernels::{DType, Device};
use rime_models::bert::{self, BertConfig};
use rime_models::{LinearHook, Plain, VirtualTokens};

use crate::adapter::{AdapterHook, AdapterMode, BottleneckConfig};
use crate::ia3::Ia3Hook;
use crate::lora::{LoraConfig, LoraHook};
use crate::prompt::{PrefixConfig, PrefixHook, PromptConfig, PromptHook};
use crate::svfit::{SvfitConfig, SvfitHook};
use crate::{Error, Result};

pub const HEAD_WEIGHT: &str = "head.weight";
pub const HEAD_BIAS: &str = "head.bias";

/// Which parts train.
#[derive(Debug, Clone)]
pub enum Method {
    Lora(LoraConfig),
    /// The head alone (linear probe).
    Probe,
    /// Singular values of the target weights.
    Svfit(SvfitConfig),
    /// Scaling vectors on these target modules (see [`crate::ia3::default_targets`]).
    Ia3 {
        targets: Vec<String>,
    },
    /// Bottleneck adapters after the attention and FFN sub-blocks.
    Adapter(BottleneckConfig),
    /// Trainable soft-prompt tokens in front of the input (see [`crate::prompt`]).
    Prompt(PromptConfig),
    /// Trainable key/value prefixes in every layer (see [`crate::prompt`]).
    Prefix(PrefixConfig),
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Lora(_) => "lora",
            Method::Probe => "probe",
            Method::Svfit(_) => "svfit",
            Method::Ia3 { .. } => "ia3",
            Method::Adapter(_) => "adapter",
            Method::Prompt(_) => "prompt",
            Method::Prefix(_) => "prefix",
        }
    }

    /// The method with the model's sizes filled in where it needs them (prompt and prefix tuning record the
    /// encoder's depth and heads in adapter_config.json).
    pub fn for_model(self, cfg: &BertConfig) -> Method {
        match self {
            Method::Prompt(c) => Method::Prompt(PromptConfig { layers: cfg.layers, heads: cfg.heads, ..c }),
            Method::Prefix(c) => Method::Prefix(PrefixConfig { layers: cfg.layers, heads: cfg.heads, ..c }),
            m => m,
        }
    }

    /// The virtual tokens this method adds to every sequence.
    pub fn virtual_tokens(&self) -> VirtualTokens {
        match self {
            Method::Prompt(c) => VirtualTokens { prompt: c.num_virtual_tokens, prefix: 0 },
            Method::Prefix(c) => VirtualTokens { prompt: 0, prefix: c.num_virtual_tokens },
            _ => VirtualTokens::default(),
        }
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
    Ok(match method {
        Method::Lora(l) => {
            let mods = crate::lora::add_lora(dev, store, l)?;
            let mut extra = String::new();
            if l.dora {
                extra.push_str(", DoRA");
            }
            if l.dropout > 0.0 {
                extra.push_str(&format!(", dropout {}", l.dropout));
            }
            if l.init != crate::lora::LoraInit::Kaiming {
                extra.push_str(&format!(", init {}", l.init.name()));
            }
            format!("LoRA r={} alpha={} on {} modules{extra}", l.rank, l.alpha, mods.len())
        }
        Method::Probe => "linear probe: the head alone".to_string(),
        Method::Svfit(c) => {
            let mods = crate::svfit::add_svfit(dev, store, c)?;
            let rs: Vec<usize> = mods.iter().map(|(_, r)| *r).collect();
            format!(
                "SVFit on {} modules, singular values kept: {} (min {}, max {})",
                mods.len(),
                rs.iter().sum::<usize>(),
                rs.iter().min().unwrap_or(&0),
                rs.iter().max().unwrap_or(&0)
            )
        }
        Method::Ia3 { targets } => {
            let (o, f) = crate::ia3::add_ia3(dev, store, targets)?;
            format!("IA3: {} output-scaled and {} input-scaled (FFN) modules", o.len(), f.len())
        }
        Method::Adapter(c) => {
            let n = crate::adapter::add_adapters(dev, store, c)?;
            format!("{} bottleneck adapters of size {} ({}, scale {})", n, c.size, c.mode.name(), c.scale)
        }
        Method::Prompt(c) => crate::prompt::add_prompt(dev, store, c)?,
        Method::Prefix(c) => crate::prompt::add_prefix(dev, store, c)?,
    })
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
    match method {
        Method::Lora(c) => Box::new(LoraHook { scale: c.scale(), dropout: c.dropout, seed: c.seed }),
        Method::Probe => Box::new(Plain),
        Method::Svfit(c) => Box::new(SvfitHook { targets: Some(c.targets.clone()) }),
        Method::Ia3 { targets } => Box::new(Ia3Hook { targets: Some(targets.clone()) }),
        Method::Adapter(c) => Box::new(AdapterHook { mode: c.mode, scale: c.scale, strict: true }),
        Method::Prompt(c) => Box::new(PromptHook { tokens: c.num_virtual_tokens }),
        Method::Prefix(c) => Box::new(PrefixHook { tokens: c.num_virtual_tokens }),
    }
}

/// The hook for evaluation and inference: [`hook_for`] without dropout; None when it is the same as
/// [`hook_for`] (so a training session can evaluate with its training graphs).
pub fn eval_hook_for(method: &Method) -> Option<Box<dyn LinearHook>> {
    match method {
        Method::Lora(c) if c.dropout > 0.0 => Some(Box::new(LoraHook::new(c.scale()))),
        _ => None,
    }
}

/// The hook for an adapter folder that [`load_adapter`] read (by its `peft_type`).
pub fn hook_for_adapter(cfg: &rime_io::peft::AdapterConfig) -> Result<Box<dyn LinearHook>> {
    Ok(match cfg.peft_type.as_str() {
        "LORA" => Box::new(LoraHook::new(cfg.scale() as f32)),
        "RIME_PROBE" => Box::new(Plain),
        crate::svfit::PEFT_TYPE => Box::new(SvfitHook { targets: None }),
        crate::ia3::PEFT_TYPE => Box::new(Ia3Hook { targets: None }),
        crate::adapter::PEFT_TYPE => {
            let mode = cfg.raw.get("adapter_mode").and_then(|v| v.as_str()).and_then(AdapterMode::parse);
            let scale = cfg.raw.get("adapter_scale").and_then(|v| v.as_f64());
            match (mode, scale) {
                (Some(mode), Some(scale)) => Box::new(AdapterHook { mode, scale: scale as f32, strict: false }),
                _ => {
                    return Err(Error::Msg(
                        "adapter_config.json of a RIME_BOTTLENECK adapter needs adapter_mode (serial|parallel) \
                         and adapter_scale"
                            .into(),
                    ))
                }
            }
        }
        t @ (crate::prompt::PROMPT_TUNING | crate::prompt::PREFIX_TUNING) => {
            let tokens = virtual_tokens_of(cfg)?;
            if t == crate::prompt::PROMPT_TUNING {
                Box::new(PromptHook { tokens })
            } else {
                Box::new(PrefixHook { tokens })
            }
        }
        t => {
            return Err(Error::Msg(format!(
                "adapter peft_type '{t}' is not supported (LORA, IA3, PROMPT_TUNING, PREFIX_TUNING, RIME_SVFIT, \
                 RIME_BOTTLENECK, RIME_PROBE)"
            )))
        }
    })
}

/// `num_virtual_tokens` of a PROMPT_TUNING / PREFIX_TUNING adapter_config.json.
fn virtual_tokens_of(cfg: &rime_io::peft::AdapterConfig) -> Result<usize> {
    cfg.raw.get("num_virtual_tokens").and_then(|v| v.as_u64()).filter(|&n| n > 0).map(|n| n as usize).ok_or_else(|| {
        Error::Msg(format!("adapter_config.json of a {} adapter needs a positive num_virtual_tokens", cfg.peft_type))
    })
}

/// Trainable tensors under their peft names, for saving an adapter. Prompt and prefix tables keep their own
/// names (see [`save_adapter`] for how a prefix is written).
pub fn trainable_tensors(dev: &Device, store: &ParamStore) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>> {
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
    tensors: &mut Vec<(String, Vec<usize>, Vec<f32>)>,
) -> Result<rime_io::peft::AdapterConfig> {
    let mut a = rime_io::peft::AdapterConfig::lora(c.rank, c.alpha as f64, c.targets.clone());
    a.use_rslora = c.rslora;
    a.use_dora = c.dora;
    a.lora_dropout = c.dropout as f64;
    let init = if c.init == crate::lora::LoraInit::Gaussian {
        serde_json::json!("gaussian")
    } else {
        // PiSSA is saved converted to a LoRA that peft loads with init_lora_weights=True.
        serde_json::json!(true)
    };
    a.raw.insert("init_lora_weights".into(), init);
    if c.init == crate::lora::LoraInit::Pissa {
        // peft's save_pretrained(path_initial_model_for_weight_conversion=...): rank 2r, alpha 2·alpha
        // (·√2 with rsLoRA) so the scale stays alpha/r; the factors are converted here.
        crate::lora::pissa_to_lora(dev, store, tensors)?;
        a.r = 2 * c.rank;
        a.lora_alpha = if c.rslora { c.alpha as f64 * 2f64.sqrt() } else { 2.0 * c.alpha as f64 };
        a.raw.insert(
            "rime_pissa".into(),
            serde_json::json!(format!(
                "trained with init_lora_weights=\"pissa\" (r={}, lora_alpha={}) on residual weights; saved \
                 converted to a rank-{} LoRA of the unmodified base: lora_A = [A; A0], lora_B = [B, -B0]",
                c.rank,
                c.alpha,
                2 * c.rank
            )),
        );
    }
    Ok(a)
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
    let mut tensors = trainable_tensors(dev, store)?;
    if let Method::Svfit(_) = method {
        // U and V are frozen but part of the adapter (see crate::svfit).
        for (id, p) in store.iter() {
            if p.name.ends_with(".svfit_U") || p.name.ends_with(".svfit_V") {
                tensors.push((p.name.clone(), p.tensor.shape.clone(), store.read_f32(dev, id)?));
            }
        }
    }
    let module_of = |suffix: &str| -> Vec<String> {
        store
            .iter()
            .filter_map(|(_, p)| p.name.strip_suffix(suffix))
            .map(|m| m.trim_start_matches("base_model.model.").to_string())
            .collect()
    };
    let mut config = match method {
        Method::Lora(c) => lora_adapter_config(dev, store, c, &mut tensors)?,
        Method::Probe => {
            // r = 1 only because the adapter_config reader refuses r = 0; a probe has no low-rank part.
            let mut a = rime_io::peft::AdapterConfig::lora(1, 1.0, vec![]);
            a.peft_type = "RIME_PROBE".into();
            a
        }
        Method::Svfit(c) => {
            let mut a = rime_io::peft::AdapterConfig::lora(c.rank, 0.0, module_of(".svfit_sigma"));
            a.peft_type = crate::svfit::PEFT_TYPE.into();
            for (_, p) in store.iter() {
                if let Some(m) = p.name.strip_suffix(".svfit_sigma") {
                    a.rank_pattern.insert(m.trim_start_matches("base_model.model.").to_string(), p.tensor.numel());
                }
            }
            a.raw.insert("svfit_energy".into(), serde_json::json!(c.energy));
            a
        }
        Method::Ia3 { .. } => {
            let mods = module_of(".ia3_l");
            // rime-io writes `r` for every type and reads back only a positive one; IA3 ignores it.
            let mut a = rime_io::peft::AdapterConfig::lora(1, 0.0, mods.clone());
            a.peft_type = crate::ia3::PEFT_TYPE.into();
            let ff: Vec<String> = mods.into_iter().filter(|m| crate::ia3::is_feedforward(m)).collect();
            a.raw.insert("feedforward_modules".into(), serde_json::json!(ff));
            a.raw.insert("init_ia3_weights".into(), serde_json::json!(true));
            a
        }
        Method::Prompt(c) => crate::prompt::prompt_config(store, c)?,
        Method::Prefix(c) => crate::prompt::prefix_config(store, c)?,
        Method::Adapter(c) => {
            let mut a = rime_io::peft::AdapterConfig::lora(c.size, 0.0, module_of(".down.weight"));
            a.peft_type = crate::adapter::PEFT_TYPE.into();
            a.raw.insert("adapter_size".into(), serde_json::json!(c.size));
            a.raw.insert("adapter_mode".into(), serde_json::json!(c.mode.name()));
            a.raw.insert("adapter_scale".into(), serde_json::json!(c.scale));
            a.raw.insert("adapter_activation".into(), serde_json::json!("relu"));
            a
        }
    };
    config.modules_to_save = vec!["head".into()];
    config.base_model_name_or_path = Some(base.to_string());
    config.task_type = Some("SEQ_CLS".into());
    config.raw.insert("rime_labels".into(), serde_json::json!(labels));
    let prompt_learning = matches!(method, Method::Prompt(_) | Method::Prefix(_));
    if prompt_learning {
        crate::prompt::to_peft_layout(&mut tensors)?;
    }
    let adapter = rime_io::peft::PeftAdapter::new(
        config,
        tensors.into_iter().map(|(name, shape, data)| rime_io::peft::AdapterTensor { name, shape, data }).collect(),
    );
    let tmp = dir.with_extension("tmp-write");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::Msg(format!("{}: {e}", tmp.display())))?;
    }
    adapter.save(&tmp)?;
    if prompt_learning {
        crate::prompt::drop_lora_fields(&tmp.join("adapter_config.json"))?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::Msg(format!("{}: {e}", dir.display())))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::Msg(format!("{}: {e}", dir.display())))?;
    Ok(())
}

/// Load an adapter folder's tensors into the store: existing trainable parameters are overwritten,
/// missing ones (e.g. LoRA factors on a fresh store) are added (trainable). Returns the adapter's labels.
pub fn load_adapter(
    dev: &Device,
    store: &mut ParamStore,
    dir: &Path,
) -> Result<(rime_io::peft::AdapterConfig, Vec<String>)> {
    let mut ad = rime_io::peft::PeftAdapter::load(dir)?;
    if matches!(ad.config.peft_type.as_str(), crate::prompt::PROMPT_TUNING | crate::prompt::PREFIX_TUNING) {
        crate::prompt::from_peft_layout(store, &mut ad, dir)?;
    }
    if ad.config.peft_type == "LORA" {
        check_dora(&ad, dir)?;
    }
    for t in &ad.tensors {
        // A converted PiSSA adapter loaded back into a PiSSA store (resume) splits into the trained factors.
        let pissa = crate::lora::lora_to_pissa(dev, store, &t.name, &t.shape, &t.data)
            .map_err(|e| Error::Msg(format!("{}: {e}", dir.display())))?;
        let (shape, data) = match &pissa {
            Some((s, d)) => (s, d),
            None => (&t.shape, &t.data),
        };
        let local = t.name.strip_prefix("base_model.model.").unwrap_or(&t.name);
        // LoRA factors keep peft's full name in the store; the head and other saved modules their own.
        // Method tensors (LoRA factors, SVFit, IA3 vectors, bottleneck adapters) keep peft's full name in the
        // store; the head and other saved modules their own.
        let method_tensor = [".lora_", ".svfit_", ".ia3_l", ".adapter."].iter().any(|k| local.contains(k));
        let name = if method_tensor { t.name.clone() } else { local.replace(".modules_to_save.default", "") };
        // SVFit's singular vectors stay frozen.
        let trainable = !(name.ends_with(".svfit_U") || name.ends_with(".svfit_V"));
        match store.find(&name) {
            Some(id) => {
                let p = store.get(id);
                if &p.tensor.shape != shape {
                    return Err(Error::Msg(format!(
                        "{}: tensor '{}' has shape {:?}, the model expects {:?}",
                        dir.display(),
                        t.name,
                        shape,
                        p.tensor.shape
                    )));
                }
                dev.write_f32(&p.tensor, data)?;
            }
            None => {
                store.add_f32(dev, &name, data, shape, trainable)?;
            }
        }
    }
    if ad.config.peft_type == crate::svfit::PEFT_TYPE {
        crate::svfit::restore_rest(dev, store)?;
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

/// A LoRA adapter's DoRA magnitudes agree with `use_dora`: one `lora_magnitude_vector` per adapted module
/// when set, none otherwise; fan_in_fan_out layers (GPT-2 Conv1D) are not DoRA layers rime can build.
fn check_dora(ad: &rime_io::peft::PeftAdapter, dir: &Path) -> Result<()> {
    let mags: Vec<&str> = ad
        .tensors
        .iter()
        .filter_map(|t| t.name.strip_suffix(".lora_magnitude_vector"))
        .map(|m| m.strip_prefix("base_model.model.").unwrap_or(m))
        .collect();
    let cfg = dir.join("adapter_config.json");
    if !ad.config.use_dora {
        if let Some(m) = mags.first() {
            return Err(Error::Msg(format!(
                "{}: use_dora is false but the adapter has a DoRA magnitude for '{m}'",
                cfg.display()
            )));
        }
        return Ok(());
    }
    if ad.config.fan_in_fan_out {
        return Err(Error::Msg(format!("{}: use_dora with fan_in_fan_out is not supported", cfg.display())));
    }
    for p in ad.lora_pairs() {
        if !mags.contains(&p.module.as_str()) {
            return Err(Error::Msg(format!(
                "{}: use_dora is true but module '{}' has no lora_magnitude_vector in {}",
                cfg.display(),
                p.module,
                rime_io::peft::ADAPTER_WEIGHTS
            )));
        }
    }
    Ok(())
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
