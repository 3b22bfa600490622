//! Causal-LM fine-tuning of a Llama decoder with LoRA: next-token cross-entropy on the completion tokens
//! only (prompt tokens and padding are ignored), the frozen GGUF backbone dequantized to f32 on the device.
//! Data: JSONL/CSV/TSV with a completion column (`--text-column`) and optionally a prompt column
//! (`--text-pair-column`); without a prompt column every token of the text is a target.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rime_graph::{Executor, Graph, OptimConfig};
use rime_io::dataset::{Columns, Dataset};
use rime_kernels::{DType, Device};
use rime_models::llama;

use crate::lora::{LoraConfig, LoraHook};
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct CausalConfig {
    pub model: PathBuf,
    pub train: PathBuf,
    pub columns: Columns,
    pub lora: LoraConfig,
    pub epochs: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub batch_size: usize,
    pub max_length: usize,
    pub max_steps: Option<usize>,
    pub seed: u64,
    pub out: PathBuf,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CausalSummary {
    pub steps: usize,
    pub first_loss: f32,
    pub last_loss: f32,
    pub train_examples_per_s: f64,
    pub trainable_params: usize,
}

/// Token ids and targets of one example: targets[i] is the token after ids[i], or -100 where no loss is taken.
fn example(
    tok: &rime_io::tokenizer::Tokenizer,
    prompt: Option<&str>,
    completion: &str,
    bos: Option<u32>,
    eos: Option<u32>,
    max_len: usize,
) -> Result<(Vec<u32>, Vec<i32>)> {
    let mut ids: Vec<u32> = bos.into_iter().collect();
    let mut counted: Vec<bool> = vec![false; ids.len()];
    if let Some(p) = prompt {
        let p = tok.encode(p, false)?;
        counted.extend(std::iter::repeat_n(false, p.len()));
        ids.extend(p);
    }
    let c = tok.encode(completion, false)?;
    counted.extend(std::iter::repeat_n(true, c.len()));
    ids.extend(c);
    if let Some(e) = eos {
        ids.push(e);
        counted.push(true);
    }
    ids.truncate(max_len + 1);
    counted.truncate(max_len + 1);
    let n = ids.len().saturating_sub(1);
    let targets: Vec<i32> = (0..n).map(|i| if counted[i + 1] { ids[i + 1] as i32 } else { -100 }).collect();
    ids.truncate(n);
    Ok((ids, targets))
}

/// Fine-tune LoRA factors of a Llama GGUF model on text; writes a peft adapter (task CAUSAL_LM) to `out/adapter`.
pub fn train_causal(dev: &Device, cfg: &CausalConfig, mut on_step: impl FnMut(usize, f32)) -> Result<CausalSummary> {
    let ds = Dataset::load(&cfg.train, &cfg.columns)?;
    if ds.is_empty() {
        return Err(Error::Msg(format!("{}: the training set is empty", cfg.train.display())));
    }
    let mut model = llama::load_gguf(dev, &cfg.model, None, DType::F32).map_err(|e| Error::Msg(e.to_string()))?;
    let eos = model.eos_tokens.first().copied();
    let mut data = vec![];
    for ex in &ds.examples {
        let (ids, t) =
            example(&model.tokenizer, ex.text_pair.as_deref(), &ex.text, model.bos_token, eos, cfg.max_length)?;
        if t.iter().any(|&x| x >= 0) {
            data.push((ids, t));
        }
    }
    if data.is_empty() {
        return Err(Error::Msg(format!("{}: no example has a completion token to learn", cfg.train.display())));
    }
    let modules = crate::lora::add_lora(dev, &mut model.store, &cfg.lora)?;
    let trainable: usize = model.store.trainable().map(|(_, p)| p.tensor.numel()).sum();
    let (b, t) = (cfg.batch_size, cfg.max_length);
    let mut g = Graph::new();
    let logits = llama::build(&mut g, &model.store, &model.cfg, b, t, &LoraHook { scale: cfg.lora.scale() })?;
    let v = model.cfg.vocab;
    let flat = g.reshape(logits, &[b * t, v])?;
    let targets = g.input("targets", &[b * t], DType::I32);
    let loss = g.cross_entropy(flat, targets, -100)?;
    let mut ex =
        Executor::new(dev, g, &model.store, Some(loss), &[], Some(OptimConfig::adamw(cfg.lr, cfg.weight_decay)))?;
    let pad = eos.unwrap_or(0);
    let total = cfg.max_steps.unwrap_or(usize::MAX).min(data.len().div_ceil(b) * cfg.epochs);
    let (mut first, mut last, mut step) = (f32::NAN, f32::NAN, 0usize);
    let t0 = Instant::now();
    'outer: for epoch in 0..cfg.epochs {
        let mut order: Vec<usize> = (0..data.len()).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(cfg.seed.wrapping_add(epoch as u64)));
        for chunk in order.chunks(b) {
            if step >= total {
                break 'outer;
            }
            let mut ids = vec![pad; b * t];
            let mut tg = vec![-100i32; b * t];
            for (r, &i) in chunk.iter().enumerate() {
                let (x, y) = &data[i];
                ids[r * t..r * t + x.len()].copy_from_slice(x);
                tg[r * t..r * t + y.len()].copy_from_slice(y);
            }
            ex.feed_u32(dev, llama::INPUT_IDS, &ids)?;
            ex.feed_i32(dev, "targets", &tg)?;
            ex.step(dev)?;
            let l = ex.last_loss(dev)?.unwrap_or(f32::NAN);
            if !l.is_finite() {
                return Err(Error::Msg(format!("loss became {l} at step {step}; stopped (try a lower --lr)")));
            }
            if step == 0 {
                first = l;
            }
            last = l;
            on_step(step, l);
            step += 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    // The adapter in peft's layout for a LlamaForCausalLM: base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight
    let mut acfg = rime_io::peft::AdapterConfig::lora(cfg.lora.rank, cfg.lora.alpha as f64, cfg.lora.targets.clone());
    acfg.use_rslora = cfg.lora.rslora;
    acfg.task_type = Some("CAUSAL_LM".into());
    acfg.base_model_name_or_path = Some(cfg.model.display().to_string());
    let tensors = crate::classifier::trainable_tensors(dev, &model.store)?
        .into_iter()
        .map(|(name, shape, data)| rime_io::peft::AdapterTensor { name, shape, data })
        .collect();
    let dir: &Path = &cfg.out.join("adapter");
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::Msg(format!("{}: {e}", cfg.out.display())))?;
    rime_io::peft::PeftAdapter::new(acfg, tensors).save(dir)?;
    let _ = modules;
    Ok(CausalSummary {
        steps: step,
        first_loss: first,
        last_loss: last,
        train_examples_per_s: (step * b) as f64 / secs.max(1e-9),
        trainable_params: trainable,
    })
}
