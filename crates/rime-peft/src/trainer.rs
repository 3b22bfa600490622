//! The trainer: data → tokenized batches → steps on the GPU → evaluation each epoch, best-checkpoint
//! keeping, early stop, resume, metrics files. It reports progress through a callback and never prints.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rime_graph::{LrSchedule, OptimConfig, ParamStore};
use rime_io::dataset::{Columns, Dataset, LabelMap};
use rime_io::tokenizer::{Padding, Tokenizer};
use rime_io::{Checkpoint, ModelConfig};
use rime_kernels::Device;
use rime_models::bert::BertConfig;
use rime_models::LinearHook;

use crate::classifier::{self, EvalMetrics, Method, ShapeExec};
use crate::metrics;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub model: PathBuf,
    pub train: PathBuf,
    pub eval: Option<PathBuf>,
    pub columns: Columns,
    pub method: Method,
    pub epochs: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub batch_size: usize,
    pub max_length: usize,
    pub seed: u64,
    pub warmup_ratio: f32,
    pub schedule: String,
    pub max_grad_norm: Option<f32>,
    /// Stop after this many evaluations without improvement (None: never).
    pub patience: Option<usize>,
    /// Fraction of the training file held out for evaluation when no eval file is given.
    pub eval_fraction: f64,
    /// Save a resumable checkpoint every this many steps (and at each epoch end).
    pub save_every: usize,
    pub out: PathBuf,
    pub resume: bool,
    /// Stop after this many steps (for quick runs and tests).
    pub max_steps: Option<usize>,
    /// Run each step of `batch_size` rows as micro-batches of this many rows, accumulating gradients (the
    /// same update as the whole batch, with the activation memory of a micro-batch). None: the whole batch.
    pub micro_batch: Option<usize>,
    /// How the frozen linear weights are stored on the device: f32 (exact), f16 or bf16 (half the memory).
    pub weights: rime_kernels::DType,
}

/// What the trainer reports while it works.
#[derive(Debug, Clone)]
pub enum Event {
    Info(String),
    Warn(String),
    Start { steps: usize, examples: usize },
    Step { step: usize, epoch: usize, loss: f32, examples_per_s: f64, lr: f32 },
    Eval { epoch: usize, metrics: EvalMetrics, best: bool },
}

/// The result of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub method: String,
    pub eval_accuracy: f64,
    pub eval_macro_f1: f64,
    pub eval_loss: f64,
    pub best_epoch: usize,
    pub steps: usize,
    pub train_examples_per_s: f64,
    pub train_seconds: f64,
    pub trainable_params: usize,
    pub frozen_params: usize,
    pub labels: Vec<String>,
    pub dispatches_per_step: usize,
    pub memory: String,
}

/// Tokenized examples of one split.
pub struct Encoded {
    pub ids: Vec<Vec<u32>>,
    pub types: Vec<Vec<u32>>,
    pub labels: Vec<i32>,
}

pub fn encode(tok: &Tokenizer, ds: &Dataset, labels: Option<&LabelMap>) -> Result<(Encoded, usize)> {
    let texts = ds.texts();
    let pairs = ds.text_pairs();
    let enc = tok.encode_batch(&texts, pairs.as_deref(), Padding::Longest)?;
    let lens = enc.lengths();
    let t = enc.seq_len;
    let truncated = enc.truncated.iter().filter(|&&x| x).count();
    let mut out = Encoded { ids: vec![], types: vec![], labels: vec![] };
    for (r, &len) in lens.iter().enumerate() {
        out.ids.push(enc.input_ids[r * t..r * t + len].to_vec());
        out.types.push(enc.token_type_ids[r * t..r * t + len].to_vec());
    }
    out.labels = match labels {
        Some(m) => m.encode(ds)?.into_iter().map(|x| x as i32).collect(),
        None => vec![-100; lens.len()],
    };
    Ok((out, truncated))
}

/// The batches of one epoch, grouped by length as Hugging Face's `group_by_length`: shuffle, cut into
/// mega-batches of 50 batches, sort each by length, cut into batches, shuffle the batch order. Every example
/// is seen once per epoch; batches hold texts of similar length, so less compute goes to padding.
pub fn epoch_batches(enc: &Encoded, batch: usize, seed: u64) -> Vec<Vec<usize>> {
    let lens: Vec<usize> = enc.ids.iter().map(|x| x.len()).collect();
    batches_by_length(&lens, batch, seed)
}

/// [`epoch_batches`] over example lengths.
pub fn batches_by_length(lens: &[usize], batch: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.shuffle(&mut rng);
    let mut batches: Vec<Vec<usize>> = vec![];
    for mega in order.chunks(batch * 50) {
        let mut m = mega.to_vec();
        m.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
        batches.extend(m.chunks(batch).map(|c| c.to_vec()));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Sequence-length buckets: graphs are compiled per bucket.
pub(crate) fn bucket(len: usize, max_length: usize) -> usize {
    let b = len.div_ceil(32) * 32;
    b.clamp(8, max_length.max(8))
}

/// Pad rows `idx` of `enc` into a [b, t] batch; missing rows (a short last batch) are empty and ignored.
pub fn make_batch(enc: &Encoded, idx: &[usize], b: usize, t: usize) -> (Vec<u32>, Vec<u32>, Vec<u32>, Vec<i32>) {
    let mut ids = vec![0u32; b * t];
    let mut types = vec![0u32; b * t];
    let mut mask = vec![0u32; b * t];
    let mut labels = vec![-100i32; b];
    for (r, &i) in idx.iter().enumerate() {
        let n = enc.ids[i].len().min(t);
        ids[r * t..r * t + n].copy_from_slice(&enc.ids[i][..n]);
        types[r * t..r * t + n].copy_from_slice(&enc.types[i][..n]);
        for m in &mut mask[r * t..r * t + n] {
            *m = 1;
        }
        labels[r] = enc.labels[i];
    }
    (ids, types, mask, labels)
}

/// A model ready to train or evaluate: parameters on the device and graphs per length bucket.
pub struct Session<'d> {
    pub dev: &'d Device,
    pub store: ParamStore,
    pub cfg: BertConfig,
    pub prefix: String,
    pub hook: Box<dyn LinearHook>,
    pub batch: usize,
    pub max_length: usize,
    pub optim: Option<OptimConfig>,
    execs: HashMap<usize, ShapeExec>,
    /// When the training graphs hold dropout (LoRA dropout), evaluation runs forward-only graphs built with
    /// this hook instead, one per length bucket.
    pub eval_hook: Option<Box<dyn LinearHook>>,
    eval_execs: HashMap<usize, ShapeExec>,
}

impl<'d> Session<'d> {
    /// A forward-only session (evaluation, features) over parameters already in `store`.
    pub fn for_inference(
        dev: &'d Device,
        store: ParamStore,
        cfg: BertConfig,
        prefix: String,
        hook: Box<dyn LinearHook>,
        batch: usize,
        max_length: usize,
    ) -> Self {
        Session {
            dev,
            store,
            cfg,
            prefix,
            hook,
            batch,
            max_length,
            optim: None,
            execs: HashMap::new(),
            eval_hook: None,
            eval_execs: HashMap::new(),
        }
    }

    /// The executor that evaluates length bucket `t`: the training one, or a forward-only graph without
    /// dropout when [`Session::eval_hook`] is set.
    fn eval_exec(&mut self, t: usize) -> Result<&mut ShapeExec> {
        let Some(hook) = &self.eval_hook else { return self.exec(t) };
        if !self.eval_execs.contains_key(&t) {
            let se = classifier::build_exec(
                self.dev,
                &self.store,
                &self.cfg,
                &self.prefix,
                hook.as_ref(),
                self.batch,
                t,
                None,
            )?;
            self.eval_execs.insert(t, se);
        }
        Ok(self.eval_execs.get_mut(&t).expect("just inserted"))
    }

    pub fn exec(&mut self, t: usize) -> Result<&mut ShapeExec> {
        if !self.execs.contains_key(&t) {
            let donor = self.execs.values().next().map(|s| &s.exec);
            let se = classifier::build_exec_sharing(
                self.dev,
                &self.store,
                &self.cfg,
                &self.prefix,
                self.hook.as_ref(),
                self.batch,
                t,
                self.optim.clone(),
                donor,
            )?;
            self.execs.insert(t, se);
        }
        Ok(self.execs.get_mut(&t).expect("just inserted"))
    }

    /// Forward over a split: logits [n, classes] and pooled features [n, hidden].
    pub fn predict(&mut self, enc: &Encoded, mut progress: impl FnMut(usize)) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = enc.ids.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| enc.ids[i].len()); // similar lengths together: less padding
        let classes = self.store.get(self.store.id(classifier::HEAD_BIAS)?).tensor.shape[0];
        let hidden = self.cfg.hidden;
        let mut logits = vec![0f32; n * classes];
        let mut pooled = vec![0f32; n * hidden];
        let dev = self.dev;
        let (b, maxl) = (self.batch, self.max_length);
        for chunk in order.chunks(b) {
            let longest = chunk.iter().map(|&i| enc.ids[i].len()).max().unwrap_or(1);
            let t = bucket(longest, maxl);
            let se = self.eval_exec(t)?;
            let (ids, types, mask, labels) = make_batch(enc, chunk, b, t);
            classifier::feed(dev, se, &ids, &types, &mask, &labels)?;
            se.exec.forward(dev)?;
            let lg = se.exec.read(dev, se.logits)?;
            let pl = se.exec.read(dev, se.pooled)?;
            for (r, &i) in chunk.iter().enumerate() {
                logits[i * classes..(i + 1) * classes].copy_from_slice(&lg[r * classes..(r + 1) * classes]);
                pooled[i * hidden..(i + 1) * hidden].copy_from_slice(&pl[r * hidden..(r + 1) * hidden]);
            }
            progress(chunk.len());
        }
        Ok((logits, pooled))
    }

    pub fn evaluate(&mut self, enc: &Encoded, progress: impl FnMut(usize)) -> Result<EvalMetrics> {
        let (logits, _) = self.predict(enc, progress)?;
        let classes = logits.len() / enc.labels.len().max(1);
        Ok(metrics_from_logits(&logits, &enc.labels, classes))
    }
}

/// Accuracy, macro-F1 and mean cross-entropy of logits against labels (rows with label < 0 skipped).
pub fn metrics_from_logits(logits: &[f32], labels: &[i32], classes: usize) -> EvalMetrics {
    let pred = metrics::argmax_rows(logits, classes);
    let mut p2 = vec![];
    let mut g2 = vec![];
    let mut loss = 0f64;
    for (i, &l) in labels.iter().enumerate() {
        if l < 0 {
            continue;
        }
        let row = &logits[i * classes..(i + 1) * classes];
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        loss += lse - row[l as usize] as f64;
        p2.push(pred[i]);
        g2.push(l as usize);
    }
    EvalMetrics {
        accuracy: metrics::accuracy(&p2, &g2),
        macro_f1: metrics::macro_f1(&p2, &g2, classes),
        loss: loss / g2.len().max(1) as f64,
        examples: g2.len(),
    }
}

/// Open the model: checkpoint, config, tokenizer; parameters uploaded frozen.
pub fn open_model(
    dev: &Device,
    model: &Path,
    max_length: usize,
) -> Result<(ParamStore, BertConfig, String, Tokenizer)> {
    open_model_as(dev, model, max_length, rime_kernels::DType::F32)
}

/// [`open_model`] with the frozen linear weights stored as `weights` (see [`classifier::load_frozen_as`]).
pub fn open_model_as(
    dev: &Device,
    model: &Path,
    max_length: usize,
    weights: rime_kernels::DType,
) -> Result<(ParamStore, BertConfig, String, Tokenizer)> {
    let cfg = ModelConfig::from_file(model)?;
    if cfg.architecture != rime_io::Architecture::Bert {
        return Err(Error::Msg(format!(
            "{}: sequence classification needs an encoder (BERT); this is {}",
            model.display(),
            cfg.architecture.as_str()
        )));
    }
    let ckpt = Checkpoint::open(model)?;
    cfg.check_checkpoint(&ckpt)?;
    let mut store = ParamStore::new();
    let prefix = classifier::load_frozen_as(dev, &mut store, &ckpt, weights)?;
    let tok_path = model.join("tokenizer.json");
    let mut tok = Tokenizer::from_file(&tok_path)?;
    tok.set_max_length(Some(max_length.min(cfg.max_position_embeddings)))?;
    Ok((store, classifier::bert_config(&cfg), prefix, tok))
}

/// The training and evaluation sets of a run: `--eval` when given, else a seeded held-out part of `--train`.
fn load_splits(cfg: &TrainConfig) -> Result<(Dataset, Dataset)> {
    let train_full = Dataset::load(&cfg.train, &cfg.columns)?;
    if train_full.is_empty() {
        return Err(Error::Msg(format!("{}: the training set is empty", cfg.train.display())));
    }
    Ok(match &cfg.eval {
        Some(p) => (train_full, Dataset::load(p, &cfg.columns)?),
        None => train_full.split(cfg.eval_fraction, cfg.seed)?,
    })
}

pub(crate) fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(v).unwrap_or_default())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))
}

/// Train a classifier. Returns the summary; writes adapter folders, metrics and a plot into `cfg.out`.
pub fn train(dev: &Device, cfg: &TrainConfig, on: &mut dyn FnMut(Event)) -> Result<TrainSummary> {
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::Msg(format!("{}: {e}", cfg.out.display())))?;
    if cfg.batch_size == 0 || cfg.epochs == 0 {
        return Err(Error::Msg("--batch-size and --epochs must be at least 1".into()));
    }
    let micro = cfg.micro_batch.unwrap_or(cfg.batch_size);
    if micro == 0 || micro > cfg.batch_size {
        return Err(Error::Msg(format!(
            "--micro-batch-size {micro} must be between 1 and --batch-size {}",
            cfg.batch_size
        )));
    }
    if cfg.eval.is_none() {
        on(Event::Info(format!(
            "no --eval file: holding out {:.0}% of {} for evaluation",
            cfg.eval_fraction * 100.0,
            cfg.train.display()
        )));
    }
    let (train_ds, eval_ds) = load_splits(cfg)?;
    let labels = LabelMap::from_dataset(&train_ds)?;
    let (mut store, bcfg, prefix, tok) = open_model_as(dev, &cfg.model, cfg.max_length, cfg.weights)?;
    let method = cfg.method.clone().for_model(&bcfg);
    classifier::check_virtual_fit(method.virtual_tokens(), cfg.max_length.min(bcfg.max_positions), &bcfg)?;
    let (train_enc, trunc) = encode(&tok, &train_ds, Some(&labels))?;
    let (eval_enc, trunc_e) = encode(&tok, &eval_ds, Some(&labels))?;
    if trunc + trunc_e > 0 {
        on(Event::Warn(format!(
            "{} of {} texts are longer than --max-length {} tokens and were truncated",
            trunc + trunc_e,
            train_enc.ids.len() + eval_enc.ids.len(),
            cfg.max_length
        )));
    }
    classifier::init_head(dev, &mut store, bcfg.hidden, labels.len(), cfg.seed)?;
    let info = classifier::prepare_method(dev, &mut store, &method)?;
    on(Event::Info(info));
    let steps_per_epoch = train_enc.ids.len().div_ceil(cfg.batch_size);
    let total = steps_per_epoch * cfg.epochs;
    let total = cfg.max_steps.map_or(total, |m| m.min(total));
    let warmup = (cfg.warmup_ratio * total as f32).round() as u64;
    let mut optim = OptimConfig::adamw(cfg.lr, cfg.weight_decay);
    optim.schedule = match cfg.schedule.as_str() {
        "constant" => LrSchedule::Constant,
        "cosine" => LrSchedule::Cosine { warmup, total: total as u64 },
        "linear" => LrSchedule::Linear { warmup, total: total as u64 },
        s => return Err(Error::Msg(format!("--schedule '{s}': expected constant, linear or cosine"))),
    };
    optim.max_grad_norm = cfg.max_grad_norm;
    let trainable: usize = store.trainable().map(|(_, p)| p.tensor.numel()).sum();
    let frozen: usize = store.iter().filter(|(_, p)| !p.trainable).map(|(_, p)| p.tensor.numel()).sum();
    on(Event::Info(format!(
        "{}: {} trainable parameters, {} frozen ({:.3}%)",
        cfg.method.name(),
        trainable,
        frozen,
        100.0 * trainable as f64 / (trainable + frozen) as f64
    )));
    let mut sess = Session {
        dev,
        store,
        cfg: bcfg,
        prefix,
        hook: classifier::hook_for(&method),
        batch: micro,
        max_length: cfg.max_length,
        optim: Some(optim.clone()),
        execs: HashMap::new(),
        eval_hook: classifier::eval_hook_for(&method),
        eval_execs: HashMap::new(),
    };
    let base_name = cfg.model.display().to_string();
    let label_names: Vec<String> = labels.labels().to_vec();

    // Resume: adapter tensors, optimizer state and counters from out/checkpoint.
    let ckpt_dir = cfg.out.join("checkpoint");
    let mut global_step = 0usize;
    let mut start_epoch = 0usize;
    let mut skip_in_epoch = 0usize;
    let mut best_acc = f64::NEG_INFINITY;
    let mut best_epoch = 0usize;
    let mut history: Vec<serde_json::Value> = vec![];
    if cfg.resume && ckpt_dir.join("state.json").exists() {
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(ckpt_dir.join("state.json"))
                .map_err(|e| Error::Msg(format!("{}: {e}", ckpt_dir.display())))?,
        )
        .map_err(|e| Error::Msg(format!("{}/state.json: {e}", ckpt_dir.display())))?;
        classifier::load_adapter(dev, &mut sess.store, &ckpt_dir.join("adapter"))?;
        global_step = state["global_step"].as_u64().unwrap_or(0) as usize;
        start_epoch = global_step / steps_per_epoch;
        skip_in_epoch = global_step % steps_per_epoch;
        best_acc = state["best_accuracy"].as_f64().unwrap_or(f64::NEG_INFINITY);
        best_epoch = state["best_epoch"].as_u64().unwrap_or(0) as usize;
        let t0 = bucket(train_enc.ids.iter().map(|x| x.len()).max().unwrap_or(8), cfg.max_length);
        sess.exec(t0)?;
        let se = sess.execs.get_mut(&t0).ok_or_else(|| Error::Msg("resume: no executor".into()))?;
        se.exec.load_optimizer_state(dev, &sess.store, &ckpt_dir.join("optimizer.safetensors"))?;
        on(Event::Info(format!("resumed from {} at step {global_step}", ckpt_dir.display())));
    } else if cfg.resume {
        on(Event::Warn(format!("--resume: no checkpoint in {}; starting fresh", ckpt_dir.display())));
    }

    let mut log = StepLog::open(&cfg.out, cfg.resume)?;
    on(Event::Start { steps: total, examples: train_enc.ids.len() });
    let mut in_flight: Option<InFlight> = None;
    let mut patience_left = cfg.patience;
    let mut stopped_early = false;
    let mut last_metrics = EvalMetrics::default();

    let save_checkpoint = |sess: &mut Session, step: usize, best_acc: f64, best_epoch: usize| -> Result<()> {
        // Never overwrite the last good checkpoint with diverged parameters.
        for (name, _, data) in classifier::trainable_tensors(sess.dev, &sess.store)? {
            if data.iter().any(|x| !x.is_finite()) {
                return Err(Error::Msg(format!(
                    "parameter '{name}' became non-finite after step {step}; stopped. {} Try a lower --lr.",
                    checkpoint_note(&cfg.out)
                )));
            }
        }
        let tmp = cfg.out.join("checkpoint.tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::Msg(format!("{}: {e}", tmp.display())))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::Msg(format!("{}: {e}", tmp.display())))?;
        classifier::save_adapter(sess.dev, &sess.store, &method, &base_name, &label_names, &tmp.join("adapter"))?;
        let dev = sess.dev;
        if let Some(se) = sess.execs.values().next() {
            se.exec.save_optimizer_state(dev, &sess.store, &tmp.join("optimizer.safetensors"))?;
        }
        write_json(
            &tmp.join("state.json"),
            &serde_json::json!({"global_step": step, "best_accuracy": best_acc, "best_epoch": best_epoch}),
        )?;
        if ckpt_dir.exists() {
            std::fs::remove_dir_all(&ckpt_dir).map_err(|e| Error::Msg(format!("{}: {e}", ckpt_dir.display())))?;
        }
        std::fs::rename(&tmp, &ckpt_dir).map_err(|e| Error::Msg(format!("{}: {e}", ckpt_dir.display())))?;
        Ok(())
    };

    'epochs: for epoch in start_epoch..cfg.epochs {
        let batches = epoch_batches(&train_enc, cfg.batch_size, cfg.seed.wrapping_add(epoch as u64));
        let mut hit_max = false;
        for (bi, chunk) in batches.iter().enumerate() {
            if epoch == start_epoch && bi < skip_in_epoch {
                continue;
            }
            if cfg.max_steps.is_some_and(|m| global_step >= m) {
                hit_max = true;
                break;
            }
            if micro < cfg.batch_size {
                // Gradient accumulation: each micro-batch on the graph of its own length bucket (they share
                // gradients and optimizer state), its loss gradient scaled by its share of the step's rows; the
                // update is applied after the last. Each micro-batch's loss is read when it is done.
                let n = chunk.len();
                let parts: Vec<&[usize]> = chunk.chunks(micro).collect();
                let mut loss = 0f64;
                for (i, part) in parts.iter().enumerate() {
                    let longest = part.iter().map(|&i| train_enc.ids[i].len()).max().unwrap_or(1);
                    let t = bucket(longest, cfg.max_length);
                    let se = sess.exec(t)?;
                    let (ids, types, mask, lab) = make_batch(&train_enc, part, micro, t);
                    classifier::feed(dev, se, &ids, &types, &mask, &lab)?;
                    se.exec.set_loss_scale(dev, part.len() as f32 / n as f32)?;
                    se.exec.step = global_step as u64;
                    let last = i + 1 == parts.len();
                    se.exec.micro_step(dev, i == 0, last)?;
                    let l = se.exec.read(dev, se.loss)?[0];
                    if last {
                        se.exec.last_loss(dev)?; // the staged copy of the same loss
                    }
                    loss += l as f64 * part.len() as f64 / n as f64;
                }
                let lr = cfg.lr * optim.schedule.factor(global_step as u64);
                log.step(on, loss as f32, global_step, epoch, n, lr)?;
            } else {
                let longest = chunk.iter().map(|&i| train_enc.ids[i].len()).max().unwrap_or(1);
                let t = bucket(longest, cfg.max_length);
                let se = sess.exec(t)?;
                let (ids, types, mask, lab) = make_batch(&train_enc, chunk, cfg.batch_size, t);
                classifier::feed(dev, se, &ids, &types, &mask, &lab)?;
                se.exec.step = global_step as u64;
                let out = se.exec.step(dev)?;
                let lr = cfg.lr * optim.schedule.factor(global_step as u64);
                // The previous step's loss is read now, while this step runs: from this executor's step output
                // when the bucket is the same, else from the executor that ran it (whose work was submitted
                // before this step's, so waiting for it does not stall the queue).
                let done = match in_flight.take() {
                    Some(p) if p.bucket == t => out.prev_loss.map(|l| (p, l)),
                    Some(p) => collect(&mut sess, dev, p)?,
                    None => None,
                };
                in_flight = Some(InFlight { bucket: t, step: global_step, epoch, examples: chunk.len(), lr });
                if let Some((p, l)) = done {
                    log.step(on, l, p.step, p.epoch, p.examples, p.lr)?;
                }
            }
            global_step += 1;
            if cfg.save_every > 0 && global_step.is_multiple_of(cfg.save_every) {
                if let Some((p, l)) = in_flight.take().map(|p| collect(&mut sess, dev, p)).transpose()?.flatten() {
                    log.step(on, l, p.step, p.epoch, p.examples, p.lr)?;
                }
                let t_save = Instant::now();
                save_checkpoint(&mut sess, global_step, best_acc, best_epoch)?;
                log.paused += t_save.elapsed();
            }
        }
        if let Some((p, l)) = in_flight.take().map(|p| collect(&mut sess, dev, p)).transpose()?.flatten() {
            log.step(on, l, p.step, p.epoch, p.examples, p.lr)?;
        }
        let t_eval = Instant::now();
        let m = sess.evaluate(&eval_enc, |_| {})?;
        let improved = m.accuracy > best_acc;
        if improved {
            best_acc = m.accuracy;
            best_epoch = epoch;
            classifier::save_adapter(dev, &sess.store, &method, &base_name, &label_names, &cfg.out.join("best"))?;
            patience_left = cfg.patience;
        } else if let Some(p) = patience_left.as_mut() {
            *p = p.saturating_sub(1);
        }
        history.push(serde_json::json!({"epoch": epoch, "eval_accuracy": m.accuracy, "eval_macro_f1": m.macro_f1, "eval_loss": m.loss}));
        log.line(&serde_json::json!({"epoch": epoch, "step": global_step, "eval_accuracy": m.accuracy, "eval_macro_f1": m.macro_f1, "eval_loss": m.loss}))?;
        on(Event::Eval { epoch, metrics: m.clone(), best: improved });
        last_metrics = m;
        save_checkpoint(&mut sess, global_step, best_acc, best_epoch)?;
        log.paused += t_eval.elapsed();
        if hit_max {
            break 'epochs;
        }
        if patience_left == Some(0) {
            on(Event::Info(format!("early stop: no improvement for {} evaluations", cfg.patience.unwrap_or(0))));
            stopped_early = true;
            break;
        }
    }
    let secs = log.train_seconds();
    let _ = stopped_early;
    // The best adapter's metrics are the run's result.
    let best = history.iter().find(|h| h["epoch"].as_u64() == Some(best_epoch as u64)).cloned();
    let (acc, f1, loss) = match &best {
        Some(b) => (
            b["eval_accuracy"].as_f64().unwrap_or(0.0),
            b["eval_macro_f1"].as_f64().unwrap_or(0.0),
            b["eval_loss"].as_f64().unwrap_or(0.0),
        ),
        None => (last_metrics.accuracy, last_metrics.macro_f1, last_metrics.loss),
    };
    let (dps, mem) = sess
        .execs
        .values()
        .next()
        .map(|s| (s.exec.dispatches_per_step(), s.exec.memory_report().to_string()))
        .unwrap_or_default();
    let summary = TrainSummary {
        method: cfg.method.name().into(),
        eval_accuracy: acc,
        eval_macro_f1: f1,
        eval_loss: loss,
        best_epoch,
        steps: global_step,
        train_examples_per_s: log.examples_done as f64 / secs.max(1e-9),
        train_seconds: secs,
        trainable_params: trainable,
        frozen_params: frozen,
        labels: label_names.clone(),
        dispatches_per_step: dps,
        memory: mem,
    };
    let mut v = serde_json::to_value(&summary).unwrap_or_default();
    v["history"] = serde_json::json!(history);
    write_json(&cfg.out.join("metrics.json"), &v)?;
    crate::plot::write_plot(log.path(), &cfg.out.join("training.png")).ok();
    Ok(summary)
}

/// A submitted step whose loss has not been read yet.
struct InFlight {
    bucket: usize,
    step: usize,
    epoch: usize,
    examples: usize,
    lr: f32,
}

/// Wait for an in-flight step's loss on the executor that ran it.
fn collect(sess: &mut Session, dev: &Device, p: InFlight) -> Result<Option<(InFlight, f32)>> {
    let se = sess.execs.get_mut(&p.bucket).ok_or_else(|| Error::Msg(format!("no executor for length {}", p.bucket)))?;
    Ok(se.exec.last_loss(dev)?.map(|l| (p, l)))
}

/// Per-step loss reporting shared by the trainers: `metrics.jsonl` (appended to on resume), the NaN stop that
/// names the step and the last good checkpoint, examples/s over training time (evaluation and checkpoints
/// excluded) and the [`Event::Step`] callback.
pub(crate) struct StepLog {
    jsonl: std::fs::File,
    path: PathBuf,
    out: PathBuf,
    t_start: Instant,
    /// Time spent evaluating and checkpointing, excluded from the throughput.
    pub paused: std::time::Duration,
    pub examples_done: usize,
    last_good: Option<usize>,
}

impl StepLog {
    pub(crate) fn open(out: &Path, resume: bool) -> Result<StepLog> {
        let path = out.join("metrics.jsonl");
        let jsonl = std::fs::OpenOptions::new()
            .create(true)
            .append(resume)
            .write(true)
            .truncate(!resume)
            .open(&path)
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
        Ok(StepLog {
            jsonl,
            path,
            out: out.to_path_buf(),
            t_start: Instant::now(),
            paused: std::time::Duration::ZERO,
            examples_done: 0,
            last_good: None,
        })
    }

    /// One line of metrics.jsonl (evaluations).
    pub(crate) fn line(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.jsonl, "{v}").map_err(|e| Error::Msg(format!("{}: {e}", self.path.display())))
    }

    /// Seconds spent training (wall time less [`StepLog::paused`]).
    pub(crate) fn train_seconds(&self) -> f64 {
        (self.t_start.elapsed() - self.paused).as_secs_f64()
    }

    /// The loss of step `step` over `examples` rows: stop on a non-finite loss, else log and report it.
    pub(crate) fn step(
        &mut self,
        on: &mut dyn FnMut(Event),
        loss: f32,
        step: usize,
        epoch: usize,
        examples: usize,
        lr: f32,
    ) -> Result<()> {
        if !loss.is_finite() {
            return Err(Error::Msg(format!(
                "loss became {loss} at step {step} (last finite loss at step {}); stopped. {} Try a lower --lr.",
                self.last_good.map_or("none".into(), |s| s.to_string()),
                checkpoint_note(&self.out)
            )));
        }
        self.last_good = Some(step);
        self.examples_done += examples;
        let eps = self.examples_done as f64 / self.train_seconds().max(1e-9);
        self.line(&serde_json::json!({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "examples_per_s": eps}))?;
        on(Event::Step { step, epoch, loss, examples_per_s: eps, lr });
        Ok(())
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// The linear-probe baseline: mean-pooled features of the frozen model for the train and eval sets (one
/// forward pass each on the GPU), then a logistic-regression head trained on the CPU (full-batch Adam,
/// 300 iterations, lr 1e-2, weight decay 1e-4). Returns eval metrics.
pub fn probe_baseline(dev: &Device, cfg: &TrainConfig) -> Result<EvalMetrics> {
    let (train_ds, eval_ds) = load_splits(cfg)?;
    let labels = LabelMap::from_dataset(&train_ds)?;
    let (mut store, bcfg, prefix, tok) = open_model_as(dev, &cfg.model, cfg.max_length, cfg.weights)?;
    let (tr, _) = encode(&tok, &train_ds, Some(&labels))?;
    let (ev, _) = encode(&tok, &eval_ds, Some(&labels))?;
    classifier::init_head(dev, &mut store, bcfg.hidden, labels.len(), cfg.seed)?;
    let hidden = bcfg.hidden;
    let mut sess =
        Session::for_inference(dev, store, bcfg, prefix, Box::new(rime_models::Plain), cfg.batch_size, cfg.max_length);
    let (_, ftr) = sess.predict(&tr, |_| {})?;
    let (_, fev) = sess.predict(&ev, |_| {})?;
    let k = labels.len();
    let (w, b) = fit_logistic(&ftr, &tr.labels, hidden, k, 300, 1e-2, 1e-4);
    let logits: Vec<f32> = fev
        .chunks(hidden)
        .flat_map(|x| {
            (0..k).map(|c| b[c] + (0..hidden).map(|j| w[c * hidden + j] * x[j]).sum::<f32>()).collect::<Vec<_>>()
        })
        .collect();
    Ok(metrics_from_logits(&logits, &ev.labels, k))
}

/// Multinomial logistic regression by full-batch Adam (decoupled weight decay); returns (W [k, d], b [k]).
pub fn fit_logistic(x: &[f32], y: &[i32], d: usize, k: usize, iters: usize, lr: f32, wd: f32) -> (Vec<f32>, Vec<f32>) {
    let n = y.len();
    let mut w = vec![0f32; k * d];
    let mut b = vec![0f32; k];
    let (mut mw, mut vw, mut mb, mut vb) = (vec![0f32; k * d], vec![0f32; k * d], vec![0f32; k], vec![0f32; k]);
    let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    for it in 1..=iters {
        let mut gw = vec![0f32; k * d];
        let mut gb = vec![0f32; k];
        for i in 0..n {
            if y[i] < 0 {
                continue;
            }
            let xi = &x[i * d..(i + 1) * d];
            let z: Vec<f32> = (0..k).map(|c| b[c] + (0..d).map(|j| w[c * d + j] * xi[j]).sum::<f32>()).collect();
            let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = z.iter().map(|v| (v - m).exp()).collect();
            let s: f32 = e.iter().sum();
            for c in 0..k {
                let g = e[c] / s - if c as i32 == y[i] { 1.0 } else { 0.0 };
                gb[c] += g / n as f32;
                for j in 0..d {
                    gw[c * d + j] += g * xi[j] / n as f32;
                }
            }
        }
        let (c1, c2) = (1.0 - b1.powi(it as i32), 1.0 - b2.powi(it as i32));
        for (p, (g, (m, v))) in w.iter_mut().zip(gw.iter().zip(mw.iter_mut().zip(vw.iter_mut()))) {
            *p -= lr * wd * *p;
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
        }
        for (p, (g, (m, v))) in b.iter_mut().zip(gb.iter().zip(mb.iter_mut().zip(vb.iter_mut()))) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
        }
    }
    (w, b)
}

/// Evaluate a saved adapter (LoRA or probe, with its head) on a labelled file.
pub fn evaluate_adapter(
    dev: &Device,
    model: &Path,
    adapter: &Path,
    data: &Path,
    columns: &Columns,
    batch: usize,
    max_length: usize,
) -> Result<EvalMetrics> {
    let (mut store, bcfg, prefix, tok) = open_model(dev, model, max_length)?;
    let (acfg, labels) = classifier::load_adapter(dev, &mut store, adapter)?;
    if labels.is_empty() || store.find(classifier::HEAD_WEIGHT).is_none() {
        return Err(Error::Msg(format!(
            "{}: no classification head (head.weight) and labels (rime_labels) in this adapter",
            adapter.display()
        )));
    }
    let ds = Dataset::load(data, columns)?;
    let map = LabelMap::from_labels(labels);
    let (enc, _) = encode(&tok, &ds, Some(&map))?;
    let hook: Box<dyn LinearHook> = classifier::hook_for_adapter(&acfg)?;
    classifier::check_virtual_fit(hook.virtual_tokens(), max_length.min(bcfg.max_positions), &bcfg)?;
    let mut sess = Session::for_inference(dev, store, bcfg, prefix, hook, batch, max_length);
    sess.evaluate(&enc, |_| {})
}

/// Where the last good checkpoint is, for error messages.
pub(crate) fn checkpoint_note(out: &Path) -> String {
    let dir = out.join("checkpoint");
    match std::fs::read_to_string(dir.join("state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    {
        Some(v) => format!("The last good checkpoint (step {}) is kept in {}.", v["global_step"], dir.display()),
        None => format!("No checkpoint was saved before it in {} (see --save-every).", out.display()),
    }
}
