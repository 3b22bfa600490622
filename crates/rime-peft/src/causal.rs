//! Causal-LM fine-tuning of a Llama decoder with LoRA: next-token cross-entropy on the completion tokens
//! only (prompt tokens and padding are ignored), the frozen GGUF backbone dequantized to f32 on the device.
//! Data: JSONL/CSV/TSV with a completion column (`--text-column`) and optionally a prompt column
//! (`--text-pair-column`); without a prompt column every token of the text is a target.
//!
//! The loop is the classifier trainer's: batches grouped by length and padded to a length bucket (one graph
//! per bucket, all sharing parameters and optimizer state), warmup + decay, gradient clipping, evaluation each
//! epoch (completion loss and perplexity on `--eval` or a held-out part of `--train`), best-adapter keeping,
//! early stop, a resumable checkpoint, `metrics.jsonl` / `metrics.json` / `training.png`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rime_graph::{Executor, Graph, LrSchedule, OptimConfig, ParamStore, Var};
use rime_io::dataset::{Columns, Dataset};
use rime_kernels::{DType, Device};
use rime_models::llama::{self, LlamaConfig};

use crate::classifier::EvalMetrics;
use crate::lora::{LoraConfig, LoraHook};
use crate::trainer::{batches_by_length, bucket, checkpoint_note, write_json, Event, StepLog};
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct CausalConfig {
    pub model: PathBuf,
    pub train: PathBuf,
    /// Evaluation file; without it a seeded `eval_fraction` of `train` is held out (when that is at least one
    /// row and ten rows remain), else the run has no evaluation.
    pub eval: Option<PathBuf>,
    pub eval_fraction: f64,
    pub columns: Columns,
    pub lora: LoraConfig,
    pub epochs: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub batch_size: usize,
    pub max_length: usize,
    pub max_steps: Option<usize>,
    pub seed: u64,
    pub warmup_ratio: f32,
    /// constant, linear or cosine.
    pub schedule: String,
    pub max_grad_norm: Option<f32>,
    /// Stop after this many evaluations without a lower eval loss.
    pub patience: Option<usize>,
    /// Save a resumable checkpoint every this many steps (and at each epoch end); 0: epoch ends only.
    pub save_every: usize,
    pub resume: bool,
    pub out: PathBuf,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CausalSummary {
    pub steps: usize,
    pub first_loss: f32,
    pub last_loss: f32,
    /// Completion loss and perplexity of the best adapter on the eval set (None without one).
    pub eval_loss: Option<f64>,
    pub eval_perplexity: Option<f64>,
    pub best_epoch: Option<usize>,
    pub train_examples_per_s: f64,
    pub train_seconds: f64,
    pub trainable_params: usize,
    pub truncated: usize,
}

/// Token ids and targets of one example: targets[i] is the token after ids[i], or -100 where no loss is
/// taken. The bool says whether the text was cut at `max_len`.
fn example(
    tok: &rime_io::tokenizer::Tokenizer,
    prompt: Option<&str>,
    completion: &str,
    bos: Option<u32>,
    eos: Option<u32>,
    max_len: usize,
) -> Result<(Vec<u32>, Vec<i32>, bool)> {
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
    let cut = ids.len() > max_len + 1;
    ids.truncate(max_len + 1);
    counted.truncate(max_len + 1);
    let n = ids.len().saturating_sub(1);
    let targets: Vec<i32> = (0..n).map(|i| if counted[i + 1] { ids[i + 1] as i32 } else { -100 }).collect();
    ids.truncate(n);
    Ok((ids, targets, cut))
}

/// Tokenized examples that have at least one target token, and how many were cut at the maximum length.
fn encode_all(model: &llama::LlamaModel, ds: &Dataset, max_len: usize) -> Result<(Vec<(Vec<u32>, Vec<i32>)>, usize)> {
    let eos = model.eos_tokens.first().copied();
    let (mut data, mut cut) = (vec![], 0);
    for ex in &ds.examples {
        let (ids, t, c) = example(&model.tokenizer, ex.text_pair.as_deref(), &ex.text, model.bos_token, eos, max_len)?;
        cut += c as usize;
        if t.iter().any(|&x| x >= 0) {
            data.push((ids, t));
        }
    }
    Ok((data, cut))
}

/// One graph per padded length, all over the same parameters; the first one built owns the optimizer state
/// and the others share it.
struct Buckets {
    b: usize,
    max_length: usize,
    cfg: LlamaConfig,
    hook: LoraHook,
    /// None: forward-only graphs (evaluation without dropout).
    optim: Option<OptimConfig>,
    execs: HashMap<usize, (Executor, Var)>,
    first: Option<usize>,
}

impl Buckets {
    fn get(&mut self, dev: &Device, store: &ParamStore, t: usize) -> Result<&mut (Executor, Var)> {
        if !self.execs.contains_key(&t) {
            let (b, v) = (self.b, self.cfg.vocab);
            let mut g = Graph::new();
            let logits = llama::build(&mut g, store, &self.cfg, b, t, &self.hook)?;
            let flat = g.reshape(logits, &[b * t, v])?;
            let targets = g.input("targets", &[b * t], DType::I32);
            let loss = g.cross_entropy(flat, targets, -100)?;
            let donor = self.first.and_then(|f| self.execs.get(&f)).map(|(e, _)| e);
            let ex = Executor::new_sharing(dev, g, store, Some(loss), &[loss], self.optim.clone(), donor)?;
            self.execs.insert(t, (ex, loss));
            self.first.get_or_insert(t);
        }
        Ok(self.execs.get_mut(&t).expect("just inserted"))
    }

    /// The executor that owns the optimizer state (for checkpoints).
    fn owner(&self) -> Option<&Executor> {
        self.first.and_then(|f| self.execs.get(&f)).map(|(e, _)| e)
    }
}

/// Pad rows `idx` of `data` into a [b, t] batch (ids padded with `pad`, targets with -100).
fn make_batch(data: &[(Vec<u32>, Vec<i32>)], idx: &[usize], b: usize, t: usize, pad: u32) -> (Vec<u32>, Vec<i32>) {
    let mut ids = vec![pad; b * t];
    let mut tg = vec![-100i32; b * t];
    for (r, &i) in idx.iter().enumerate() {
        let (x, y) = &data[i];
        ids[r * t..r * t + x.len()].copy_from_slice(x);
        tg[r * t..r * t + y.len()].copy_from_slice(y);
    }
    (ids, tg)
}

/// Mean completion loss over every target token of `data` (forward only).
fn evaluate(
    dev: &Device,
    store: &ParamStore,
    buckets: &mut Buckets,
    data: &[(Vec<u32>, Vec<i32>)],
    pad: u32,
) -> Result<EvalMetrics> {
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by_key(|&i| data[i].0.len());
    let (b, maxl) = (buckets.b, buckets.max_length);
    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in order.chunks(b) {
        let t = bucket(chunk.iter().map(|&i| data[i].0.len()).max().unwrap_or(1), maxl);
        let (ids, tg) = make_batch(data, chunk, b, t, pad);
        let n = tg.iter().filter(|&&x| x >= 0).count();
        let (ex, loss) = buckets.get(dev, store, t)?;
        let loss = *loss;
        ex.feed_u32(dev, llama::INPUT_IDS, &ids)?;
        ex.feed_i32(dev, "targets", &tg)?;
        ex.forward(dev)?;
        let l = ex.read(dev, loss)?[0] as f64;
        sum += l * n as f64;
        count += n;
    }
    let loss = sum / count.max(1) as f64;
    Ok(EvalMetrics { accuracy: f64::NAN, macro_f1: f64::NAN, loss, examples: data.len() })
}

fn io_err(p: &Path, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("{}: {e}", p.display()))
}

/// Fine-tune LoRA factors of a Llama GGUF model on text. Writes into `cfg.out`: `adapter/` (peft layout, task
/// CAUSAL_LM; the best by eval loss when there is an eval set, else the last), `checkpoint/` (adapter,
/// optimizer state, step: `--resume` continues), `metrics.jsonl`, `metrics.json` and `training.png`.
pub fn train_causal(dev: &Device, cfg: &CausalConfig, on: &mut dyn FnMut(Event)) -> Result<CausalSummary> {
    if cfg.batch_size == 0 || cfg.epochs == 0 {
        return Err(Error::Msg("--batch-size and --epochs must be at least 1".into()));
    }
    let full = Dataset::load(&cfg.train, &cfg.columns)?;
    if full.is_empty() {
        return Err(Error::Msg(format!("{}: the training set is empty", cfg.train.display())));
    }
    let (train_ds, eval_ds) = match &cfg.eval {
        Some(p) => (full, Some(Dataset::load(p, &cfg.columns)?)),
        None if (full.len() as f64 * cfg.eval_fraction).round() >= 1.0
            && full.len() as f64 * (1.0 - cfg.eval_fraction) >= 10.0 =>
        {
            on(Event::Info(format!(
                "no --eval file: holding out {:.0}% of {} for evaluation",
                cfg.eval_fraction * 100.0,
                cfg.train.display()
            )));
            let (t, e) = full.split(cfg.eval_fraction, cfg.seed)?;
            (t, Some(e))
        }
        None => {
            on(Event::Info(format!(
                "no --eval file and {} rows are too few to hold some out: no evaluation; the last adapter is kept",
                full.len()
            )));
            (full, None)
        }
    };
    let mut model = llama::load_gguf(dev, &cfg.model, None, DType::F32).map_err(|e| Error::Msg(e.to_string()))?;
    model.store.add_texture_twins(dev)?;
    let pad = model.eos_tokens.first().copied().unwrap_or(0);
    let (data, cut) = encode_all(&model, &train_ds, cfg.max_length)?;
    let (eval_data, cut_e) = match &eval_ds {
        Some(e) => encode_all(&model, e, cfg.max_length)?,
        None => (vec![], 0),
    };
    if data.is_empty() {
        return Err(Error::Msg(format!("{}: no example has a completion token to learn", cfg.train.display())));
    }
    if eval_ds.is_some() && eval_data.is_empty() {
        return Err(Error::Msg("the eval set has no example with a completion token".into()));
    }
    if cut + cut_e > 0 {
        on(Event::Warn(format!(
            "{} of {} examples are longer than --max-length {} tokens and were truncated",
            cut + cut_e,
            data.len() + eval_data.len(),
            cfg.max_length
        )));
    }
    let modules = crate::lora::add_lora(dev, &mut model.store, &cfg.lora)?;
    let trainable: usize = model.store.trainable().map(|(_, p)| p.tensor.numel()).sum();
    on(Event::Info(format!(
        "LoRA r={} alpha={} on {} modules: {trainable} trainable parameters",
        cfg.lora.rank,
        cfg.lora.alpha,
        modules.len()
    )));

    let b = cfg.batch_size;
    let steps_per_epoch = data.len().div_ceil(b);
    let total = cfg.max_steps.map_or(steps_per_epoch * cfg.epochs, |m| m.min(steps_per_epoch * cfg.epochs));
    let warmup = (cfg.warmup_ratio * total as f32).round() as u64;
    let mut optim = OptimConfig::adamw(cfg.lr, cfg.weight_decay);
    optim.schedule = match cfg.schedule.as_str() {
        "constant" => LrSchedule::Constant,
        "cosine" => LrSchedule::Cosine { warmup, total: total as u64 },
        "linear" => LrSchedule::Linear { warmup, total: total as u64 },
        s => return Err(Error::Msg(format!("--schedule '{s}': expected constant, linear or cosine"))),
    };
    optim.max_grad_norm = cfg.max_grad_norm;
    let hook = LoraHook { scale: cfg.lora.scale(), dropout: cfg.lora.dropout, seed: cfg.lora.seed };
    let mut buckets = Buckets {
        b,
        max_length: cfg.max_length,
        cfg: model.cfg.clone(),
        hook,
        optim: Some(optim.clone()),
        execs: HashMap::new(),
        first: None,
    };
    // With LoRA dropout the training graphs drop activations: evaluation gets its own graphs without it.
    let mut eval_buckets = (cfg.lora.dropout > 0.0).then(|| Buckets {
        b,
        max_length: cfg.max_length,
        cfg: model.cfg.clone(),
        hook: LoraHook::new(cfg.lora.scale()),
        optim: None,
        execs: HashMap::new(),
        first: None,
    });
    let lens: Vec<usize> = data.iter().map(|(x, _)| x.len()).collect();

    let out = &cfg.out;
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    let ckpt_dir = out.join("checkpoint");
    let (mut global_step, mut best_loss, mut best_epoch) = (0usize, f64::INFINITY, None::<usize>);
    if cfg.resume && ckpt_dir.join("state.json").exists() {
        let text = std::fs::read_to_string(ckpt_dir.join("state.json")).map_err(|e| io_err(&ckpt_dir, e))?;
        let state: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| io_err(&ckpt_dir.join("state.json"), e))?;
        crate::classifier::load_adapter(dev, &mut model.store, &ckpt_dir.join("adapter"))?;
        global_step = state["global_step"].as_u64().unwrap_or(0) as usize;
        best_loss = state["best_eval_loss"].as_f64().unwrap_or(f64::INFINITY);
        best_epoch = state["best_epoch"].as_u64().map(|e| e as usize);
        let t0 = bucket(lens.iter().copied().max().unwrap_or(8), cfg.max_length);
        let (ex, _) = buckets.get(dev, &model.store, t0)?;
        ex.load_optimizer_state(dev, &model.store, &ckpt_dir.join("optimizer.safetensors"))?;
        on(Event::Info(format!("resumed from {} at step {global_step}", ckpt_dir.display())));
    } else if cfg.resume {
        on(Event::Warn(format!("--resume: no checkpoint in {}; starting fresh", ckpt_dir.display())));
    }
    // Atomic: written beside `dir`, then renamed over it. The config is the classifier's LoRA-family one
    // (DoRA magnitudes, PiSSA converted to a LoRA of the unmodified base), with the causal-LM task.
    let save_adapter = |store: &ParamStore, dir: &Path| -> Result<()> {
        let mut tensors = crate::classifier::trainable_tensors(dev, store)?;
        let mut acfg = crate::classifier::lora_adapter_config(dev, store, &cfg.lora, &mut tensors)?;
        acfg.task_type = Some("CAUSAL_LM".into());
        acfg.base_model_name_or_path = Some(cfg.model.display().to_string());
        let tensors =
            tensors.into_iter().map(|(name, shape, data)| rime_io::peft::AdapterTensor { name, shape, data }).collect();
        let tmp = dir.with_extension("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
        }
        rime_io::peft::PeftAdapter::new(acfg, tensors).save(&tmp)?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| io_err(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| io_err(dir, e))
    };
    let save_checkpoint =
        |store: &ParamStore, owner: Option<&Executor>, step: usize, best: f64, best_epoch: Option<usize>| {
            for (name, _, d) in crate::classifier::trainable_tensors(dev, store)? {
                if d.iter().any(|x| !x.is_finite()) {
                    return Err(Error::Msg(format!(
                        "parameter '{name}' became non-finite after step {step}; stopped. {} Try a lower --lr.",
                        checkpoint_note(out)
                    )));
                }
            }
            let tmp = out.join("checkpoint.tmp");
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
            }
            std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
            save_adapter(store, &tmp.join("adapter"))?;
            if let Some(ex) = owner {
                ex.save_optimizer_state(dev, store, &tmp.join("optimizer.safetensors"))?;
            }
            let best = if best.is_finite() { serde_json::json!(best) } else { serde_json::Value::Null };
            write_json(
                &tmp.join("state.json"),
                &serde_json::json!({"global_step": step, "best_eval_loss": best, "best_epoch": best_epoch}),
            )?;
            if ckpt_dir.exists() {
                std::fs::remove_dir_all(&ckpt_dir).map_err(|e| io_err(&ckpt_dir, e))?;
            }
            std::fs::rename(&tmp, &ckpt_dir).map_err(|e| io_err(&ckpt_dir, e))
        };

    let mut log = StepLog::open(out, cfg.resume)?;
    on(Event::Start { steps: total, examples: data.len() });
    let (mut first, mut last) = (f32::NAN, f32::NAN);
    let mut patience_left = cfg.patience;
    let mut history: Vec<serde_json::Value> = vec![];
    let start_epoch = global_step / steps_per_epoch;
    let skip = global_step % steps_per_epoch;
    'epochs: for epoch in start_epoch..cfg.epochs {
        let batches = batches_by_length(&lens, b, cfg.seed.wrapping_add(epoch as u64));
        let mut hit_max = false;
        for (bi, chunk) in batches.iter().enumerate() {
            if epoch == start_epoch && bi < skip {
                continue;
            }
            if global_step >= total {
                hit_max = true;
                break;
            }
            let t = bucket(chunk.iter().map(|&i| lens[i]).max().unwrap_or(1), cfg.max_length);
            let (ids, tg) = make_batch(&data, chunk, b, t, pad);
            let (ex, _) = buckets.get(dev, &model.store, t)?;
            ex.feed_u32(dev, llama::INPUT_IDS, &ids)?;
            ex.feed_i32(dev, "targets", &tg)?;
            ex.step = global_step as u64;
            ex.step(dev)?;
            // Steps of a decoder take seconds here: reading the loss right away costs nothing measurable.
            let l = ex.last_loss(dev)?.unwrap_or(f32::NAN);
            let lr = cfg.lr * optim.schedule.factor(global_step as u64);
            log.step(on, l, global_step, epoch, chunk.len(), lr)?;
            if first.is_nan() {
                first = l;
            }
            last = l;
            global_step += 1;
            if cfg.save_every > 0 && global_step % cfg.save_every == 0 {
                let t_save = Instant::now();
                save_checkpoint(&model.store, buckets.owner(), global_step, best_loss, best_epoch)?;
                log.paused += t_save.elapsed();
            }
        }
        let t_eval = Instant::now();
        if !eval_data.is_empty() {
            let m = evaluate(dev, &model.store, eval_buckets.as_mut().unwrap_or(&mut buckets), &eval_data, pad)?;
            let improved = m.loss < best_loss;
            if improved {
                best_loss = m.loss;
                best_epoch = Some(epoch);
                save_adapter(&model.store, &out.join("adapter"))?;
                patience_left = cfg.patience;
            } else if let Some(p) = patience_left.as_mut() {
                *p = p.saturating_sub(1);
            }
            let row = serde_json::json!({"epoch": epoch, "step": global_step, "eval_loss": m.loss, "eval_perplexity": m.loss.exp()});
            log.line(&row)?;
            history.push(row);
            on(Event::Eval { epoch, metrics: m, best: improved });
        } else {
            save_adapter(&model.store, &out.join("adapter"))?;
        }
        save_checkpoint(&model.store, buckets.owner(), global_step, best_loss, best_epoch)?;
        log.paused += t_eval.elapsed();
        if hit_max || global_step >= total {
            break 'epochs;
        }
        if patience_left == Some(0) {
            on(Event::Info(format!("early stop: no lower eval loss for {} evaluations", cfg.patience.unwrap_or(0))));
            break;
        }
    }
    let secs = log.train_seconds();
    let eval_loss = best_loss.is_finite().then_some(best_loss);
    let summary = CausalSummary {
        steps: global_step,
        first_loss: first,
        last_loss: last,
        eval_loss,
        eval_perplexity: eval_loss.map(f64::exp),
        best_epoch,
        train_examples_per_s: log.examples_done as f64 / secs.max(1e-9),
        train_seconds: secs,
        trainable_params: trainable,
        truncated: cut + cut_e,
    };
    let mut v = serde_json::to_value(&summary).unwrap_or_default();
    v["task"] = serde_json::json!("causal-lm");
    v["history"] = serde_json::json!(history);
    write_json(&out.join("metrics.json"), &v)?;
    crate::plot::write_plot(log.path(), &out.join("training.png")).ok();
    Ok(summary)
}
