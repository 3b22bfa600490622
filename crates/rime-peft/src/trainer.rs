//! One trainer over a [`Task`]: epochs of length-bucketed batches (micro-batches when asked), the schedule
//! and warmup, gradient clipping, the step log, an evaluation each epoch, best-adapter keeping, patience,
//! periodic checkpoints and resume, and the stop on a non-finite loss. A task (classification, causal LM, ...)
//! builds its graphs, feeds batches, evaluates and saves its adapter; everything else is here, once.
//!
//! Progress goes to a callback of [`Event`]s; the trainer never prints. The result is a value
//! ([`TrainResult`]: the task's summary, the log, the best adapter). Files are written only when the caller
//! gives an output folder (`best/` or `adapter/`, `checkpoint/`, `metrics.jsonl`, `metrics.json`,
//! `training.png`, `training.svg`), or later by [`TrainResult::save`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rime_graph::{Executor, OptimConfig, ParamStore, Var};
use rime_io::peft::PeftAdapter;
use rime_kernels::Device;
use serde_json::{json, Map, Value};

use crate::checkpoint::{self, State};
pub use crate::classifier::EvalMetrics;
pub use crate::classify::{
    encode, epoch_batches, evaluate_adapter, fit_logistic, make_batch, metrics_from_logits, open_model, open_model_as,
    probe_baseline, ClassifySummary, ClassifyTask, Encoded, Evaluator, Session,
};
pub use crate::config::{Schedule, TrainConfig, WeightStorage};
use crate::{Error, Result};

/// The summary of a classification run (the name it had before tasks).
pub type TrainSummary = ClassifySummary;

/// What the trainer reports while it works.
#[derive(Debug, Clone)]
pub enum Event {
    Info(String),
    Warn(String),
    Start { steps: usize, examples: usize },
    Step { step: usize, epoch: usize, loss: f32, examples_per_s: f64, lr: f32 },
    Eval { epoch: usize, metrics: EvalMetrics, best: bool },
}

/// The metric that picks the best adapter and drives early stopping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metric {
    /// Its name (`accuracy`, `eval_loss`); the checkpoint records `best_<name>`.
    pub name: &'static str,
    pub higher_is_better: bool,
}

/// One evaluation pass of a task.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub metrics: EvalMetrics,
    /// The value of the task's [`Metric`].
    pub score: f64,
    /// Named values for `metrics.jsonl` and the history (`eval_accuracy`, ...), in order.
    pub values: Vec<(String, f64)>,
}

/// What the shared loop measured, handed to [`Task::summary`].
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    pub steps: usize,
    pub best_epoch: Option<usize>,
    /// The best score (None when nothing was evaluated).
    pub best_score: Option<f64>,
    /// The best evaluation of this run, and the last.
    pub best: Option<Evaluation>,
    pub last: Option<Evaluation>,
    pub first_loss: f32,
    pub last_loss: f32,
    pub train_seconds: f64,
    pub train_examples_per_s: f64,
    pub dispatches_per_step: usize,
    pub memory: String,
}

/// A training task: owns the model, its data and graphs; the [`train`] loop drives it. Graphs are keyed by
/// a padded length (`key`, from [`Task::bucket`]) and all share the parameters and optimizer state.
///
/// The next tasks fit as they are: an embedding task (contrastive pairs on an encoder) returns the pairs'
/// token lengths from `prepare`, builds a graph whose loss is the in-batch contrastive loss, and evaluates a
/// retrieval or similarity score (`Metric { name: "spearman", higher_is_better: true }`); an image task
/// returns equal lengths (one bucket), feeds pixel batches and evaluates accuracy. Neither touches the loop.
pub trait Task<'d> {
    /// What [`Task::summary`] returns (written as `metrics.json`).
    type Summary: serde::Serialize + Clone;

    fn device(&self) -> &'d Device;
    /// Load the model and data, add the method's parameters; returns the training examples' lengths (in
    /// tokens; an image task returns equal lengths). Called once, before everything else.
    fn prepare(&mut self, cfg: &TrainConfig, on: &mut dyn FnMut(Event)) -> Result<Vec<usize>>;
    /// Graphs built from now on have `rows` rows per batch and step with `optim`.
    fn compile(&mut self, optim: OptimConfig, rows: usize) -> Result<()>;
    /// The graph key of a batch whose longest example has `longest` tokens.
    fn bucket(&self, longest: usize) -> usize;
    /// The training graph of `key` (built on first use), with the parameters.
    fn executor(&mut self, key: usize) -> Result<(&mut Executor, &ParamStore)>;
    /// Feed the examples `idx` (at most `rows`) into the graph of `key`; returns it and its loss.
    fn feed(&mut self, idx: &[usize], key: usize) -> Result<(&mut Executor, Var)>;
    /// Any built training graph (they share the optimizer state), for checkpoints and reports.
    fn any_executor(&self) -> Option<&Executor>;
    fn store(&self) -> &ParamStore;
    /// Evaluate on the task's eval set; None when it has none.
    fn evaluate(&mut self) -> Result<Option<Evaluation>>;
    fn metric(&self) -> Metric;
    /// Whether [`TrainConfig::micro_batch_size`] applies (the loss is a mean over what
    /// [`Task::loss_weight`] counts).
    fn supports_micro_batches(&self) -> bool {
        true
    }
    /// What the loss of examples `idx` averages over: rows by default, a causal LM's scored tokens. With
    /// micro-batches, each one's gradient is scaled by its share of the batch's weight, so the update is the
    /// whole batch's.
    fn loss_weight(&self, idx: &[usize]) -> usize {
        idx.len()
    }
    /// Whether [`TrainConfig::gradient_checkpointing`] applies (a model whose frozen blocks it can recompute).
    fn supports_checkpointing(&self) -> bool {
        false
    }
    /// The trained adapter as a value.
    fn adapter(&self) -> Result<PeftAdapter>;
    /// Write the adapter folder (peft layout) at `dir`, atomically.
    fn save_adapter(&self, dir: &Path) -> Result<()>;
    /// Load a checkpoint's adapter back into the parameters (resume).
    fn load_adapter(&mut self, dir: &Path) -> Result<()>;
    /// The adapter's folder name in the output (`best`, `adapter`).
    fn adapter_folder(&self) -> &'static str;
    /// Model, method and data in a few words (the plot's title).
    fn title(&self) -> String;
    fn summary(&self, run: &RunStats) -> Self::Summary;
    /// `metrics.json` without the history.
    fn summary_json(&self, s: &Self::Summary) -> Value {
        serde_json::to_value(s).unwrap_or_default()
    }
}

/// The result of [`train`]: the task's summary, the log, and the best adapter (the last one when the task
/// has no eval set).
#[derive(Debug, Clone)]
pub struct TrainResult<S> {
    pub summary: S,
    /// `metrics.json`: the summary and the per-epoch history.
    pub metrics: Value,
    /// `metrics.jsonl`: one object per step (step, epoch, loss, lr, examples_per_s) and per evaluation.
    pub log: Vec<Value>,
    pub adapter: PeftAdapter,
    /// The adapter's folder name (`best`, `adapter`).
    pub adapter_folder: &'static str,
    /// The plot's title.
    pub title: String,
}

impl<S> TrainResult<S> {
    /// Write the adapter folder, `metrics.json`, `metrics.jsonl`, `training.png` and `training.svg` into `dir`.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        save_peft(&self.adapter, &dir.join(self.adapter_folder))?;
        write_json(&dir.join("metrics.json"), &self.metrics)?;
        let path = dir.join("metrics.jsonl");
        let text: String = self.log.iter().map(|v| format!("{v}\n")).collect();
        std::fs::write(&path, text).map_err(|e| io_err(&path, e))?;
        crate::plot::write_plots(&self.log, &self.title, dir)
    }
}

/// Write a peft adapter value to `dir` atomically (prompt-learning configs without LoRA fields, as peft).
pub fn save_peft(ad: &PeftAdapter, dir: &Path) -> Result<()> {
    let tmp = dir.with_extension("tmp-write");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    ad.save(&tmp)?;
    crate::checkpoint::replace_dir(&tmp, dir)
}

/// Train `task` as `cfg` says. With `out`, files are written there as the run goes (and a checkpoint makes
/// `cfg.resume` possible); without, nothing touches the disk.
///
/// The output folder: a non-empty one is refused ([`Error::OutputExists`]) unless `cfg.resume` or
/// `cfg.overwrite`; nothing is created in it before the settings, data and model are known good; a run that
/// fails before its first checkpoint leaves nothing of itself there (a folder it created is removed), one that
/// fails later keeps its checkpoint (the error says where) for a resume. Checkpoints are committed crash-safely
/// (see `checkpoint.rs`): after a kill at any point, a resume continues from the newest complete one, runs an
/// epoch end (evaluation) the kill skipped, and ends with the straight run's adapter and log. A finished run
/// is not resumed (`Error::Invalid { field: "resume" }`); non-finite parameters are never saved.
///
/// ```no_run
/// use rime_peft::classifier::Method;
/// use rime_peft::{ClassifyTask, Event, TextClassData, TrainConfig};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = rime_kernels::Device::new(&rime_kernels::DeviceOptions::default())?;
/// let texts = vec!["fresh and tasty".to_string(), "stale, broken seal".to_string()];
/// let labels = vec!["good".to_string(), "bad".to_string()];
/// let data = TextClassData::new(texts, labels);
/// let mut task = ClassifyTask::new(&dev, "models/all-minilm-l6-v2", Method::Probe, data.clone(), Some(data));
/// let cfg = TrainConfig { epochs: 3, ..TrainConfig::default() };
/// let mut accuracy_per_epoch = Vec::new();
/// let result = rime_peft::train(&mut task, &cfg, None, &mut |e| {
///     if let Event::Eval { metrics, .. } = e {
///         accuracy_per_epoch.push(metrics.accuracy);
///     }
/// })?;
/// assert_eq!(accuracy_per_epoch.len(), 3);
/// let best = result.summary.eval_accuracy; // the best epoch's, as kept in `result.adapter`
/// result.save("runs/example")?; // best/ (a peft adapter), metrics.json, metrics.jsonl, training.png/.svg
/// # Ok(())
/// # }
/// ```
pub fn train<'d, T: Task<'d> + ?Sized>(
    task: &mut T,
    cfg: &TrainConfig,
    out: Option<&Path>,
    on: &mut dyn FnMut(Event),
) -> Result<TrainResult<T::Summary>> {
    cfg.validate()?;
    if cfg.gradient_checkpointing && !task.supports_checkpointing() {
        return Err(Error::invalid(
            "gradient_checkpointing",
            "applies to causal-LM training (a decoder's frozen blocks); this task's graph has none to recompute",
        ));
    }
    if cfg.micro_batch_size.is_some_and(|m| m < cfg.batch_size) && !task.supports_micro_batches() {
        return Err(Error::invalid("micro_batch_size", "does not apply to this task; lower batch_size instead"));
    }
    if cfg.resume && out.is_none() {
        return Err(Error::invalid("resume", "needs an output folder (the checkpoint is read from it)"));
    }
    if let Some(o) = out {
        checkpoint::check_output(o, cfg.resume, cfg.overwrite)?;
    }
    let lens = task.prepare(cfg, on)?;
    if lens.is_empty() {
        return Err(Error::invalid("train", "has no example to learn from"));
    }
    let steps_per_epoch = lens.len().div_ceil(cfg.batch_size);
    let total = steps_per_epoch * cfg.epochs;
    let total = cfg.max_steps.map_or(total, |m| m.min(total));
    let optim = cfg.optimizer(total);
    task.compile(optim.clone(), cfg.rows())?;
    let longest = task.bucket(lens.iter().copied().max().unwrap_or(1));
    if let Err(e) = task.executor(longest) {
        return Err(batch_too_large(e, cfg));
    }
    let mut run = Run::new(task, cfg, out, optim, lens, total);
    let Some(o) = out else {
        run.epochs(on)?;
        return run.finish();
    };
    // Nothing is written before this point: the data, model and settings are known good, and a finished run
    // asked to resume has said so.
    let created = !o.exists();
    let resumed = if cfg.resume { run.resume(o, on)? } else { None };
    let r = run.open_outputs(o, resumed).and_then(|()| run.epochs(on));
    match r {
        Ok(()) => run.finish(),
        Err(e) => {
            checkpoint::clean_after_failure(o, created);
            Err(e)
        }
    }
}

/// A training graph that does not fit the device, said in terms of the batch (the rows of one graph) and
/// the largest batch that fits; other errors as they are.
pub(crate) fn batch_too_large(e: Error, cfg: &TrainConfig) -> Error {
    let field = if cfg.rows() < cfg.batch_size { "micro_batch_size" } else { "batch_size" };
    too_large_as(e, field, cfg.rows(), cfg.max_length)
}

/// [`rime_kernels::Error::TooLarge`] of a graph of `rows` rows as a refusal of `field`, with the most rows
/// that fit (tensors grow in proportion to the rows).
pub(crate) fn too_large_as(e: Error, field: &'static str, rows: usize, max_length: usize) -> Error {
    let kernel = match &e {
        Error::Kernel(k) => Some(k),
        Error::Graph(rime_graph::Error::Kernel(k)) => Some(k),
        _ => None,
    };
    let Some(rime_kernels::Error::TooLarge { bytes, limit, .. }) = kernel else { return e };
    let fits = (rows as u128 * *limit as u128 / (*bytes).max(1) as u128) as usize;
    let advice = match fits {
        0 => format!("even one row does not fit; lower max_length ({max_length})"),
        n => format!("at most {n} rows fit"),
    };
    Error::invalid(
        field,
        format!(
            "{rows}: a batch of {rows} rows needs a tensor of {bytes} bytes, more than this GPU's largest buffer \
             binding ({limit} bytes); {advice}"
        ),
    )
}

/// The state of a run between steps.
struct Run<'a, 'd, T: Task<'d> + ?Sized> {
    dev: &'d Device,
    task: &'a mut T,
    cfg: &'a TrainConfig,
    out: Option<&'a Path>,
    log: StepLog,
    optim: OptimConfig,
    lens: Vec<usize>,
    total: usize,
    steps_per_epoch: usize,
    step: usize,
    metric: Metric,
    best_score: f64,
    best_epoch: Option<usize>,
    best: Option<Evaluation>,
    last: Option<Evaluation>,
    best_adapter: Option<PeftAdapter>,
    patience_left: Option<usize>,
    /// The step at which the last epoch end (evaluation, best adapter, patience) ran.
    eval_step: Option<usize>,
    stopped_early: bool,
    in_flight: Option<InFlight>,
    history: Vec<Value>,
}

/// A submitted step whose loss has not been read yet.
struct InFlight {
    key: usize,
    step: usize,
    epoch: usize,
    examples: usize,
    lr: f32,
}

impl<'a, 'd, T: Task<'d> + ?Sized> Run<'a, 'd, T> {
    /// A run at step 0 of `total` over examples of lengths `lens`.
    fn new(
        task: &'a mut T,
        cfg: &'a TrainConfig,
        out: Option<&'a Path>,
        optim: OptimConfig,
        lens: Vec<usize>,
        total: usize,
    ) -> Self {
        let metric = task.metric();
        Run {
            dev: task.device(),
            task,
            cfg,
            out,
            log: StepLog::new(out),
            optim,
            steps_per_epoch: lens.len().div_ceil(cfg.batch_size),
            lens,
            total,
            step: 0,
            best_score: if metric.higher_is_better { f64::NEG_INFINITY } else { f64::INFINITY },
            metric,
            best_epoch: None,
            best: None,
            last: None,
            best_adapter: None,
            patience_left: cfg.patience,
            eval_step: None,
            stopped_early: false,
            in_flight: None,
            history: vec![],
        }
    }

    /// Adapter tensors, optimizer state and counters from the newest complete checkpoint in `out` (after a
    /// crash it may be a staged one); None when there is none. A run that had finished is refused, with
    /// nothing touched.
    fn resume(&mut self, out: &Path, on: &mut dyn FnMut(Event)) -> Result<Option<State>> {
        let Some(dir) = checkpoint::recover(out, self.metric.name)? else {
            on(Event::Warn(format!("resume: no checkpoint in {}; starting fresh", out.display())));
            return Ok(None);
        };
        checkpoint::recover_dir(&out.join(self.task.adapter_folder()))?;
        let st = State::read(&dir, self.metric.name)?;
        // Finished and its results written (a crash between the last checkpoint and metrics.json resumes to
        // write them).
        let done = st.stopped_early || (st.global_step >= self.total && st.eval_step == Some(st.global_step));
        if done && out.join("metrics.json").is_file() {
            return Err(Error::invalid(
                "resume",
                format!(
                    "finds the run in {} finished (step {} of {}{}); its results stay in metrics.json and {}/ \
                     (raise epochs or max_steps to train further)",
                    out.display(),
                    st.global_step,
                    self.total,
                    if st.stopped_early { ", stopped early" } else { "" },
                    self.task.adapter_folder()
                ),
            ));
        }
        if st.eval_step.is_some_and(|e| e > st.global_step) {
            return Err(Error::Msg(format!(
                "{}: eval_step {:?} is after global_step {} (a damaged checkpoint)",
                dir.join("state.json").display(),
                st.eval_step,
                st.global_step
            )));
        }
        self.task.load_adapter(&dir.join("adapter"))?;
        let key = self.task.bucket(self.lens.iter().copied().max().unwrap_or(8));
        let dev = self.dev;
        let (ex, store) = self.task.executor(key)?;
        ex.load_optimizer_state(dev, store, &dir.join("optimizer.safetensors"))?;
        self.step = st.global_step;
        if let Some(b) = st.best_score {
            self.best_score = b;
        }
        self.best_epoch = st.best_epoch;
        self.stopped_early = st.stopped_early;
        self.eval_step = st.eval_step;
        self.patience_left = st.patience_left;
        self.history = st.history.clone();
        self.best = st.best.clone();
        self.last = st.last.clone();
        on(Event::Info(format!("resumed from {} at step {}", dir.display(), self.step)));
        Ok(Some(st))
    }

    /// Create the output folder (clearing a previous run's files when overwriting) and open `metrics.jsonl`
    /// (continued at the checkpoint's end when resuming).
    fn open_outputs(&mut self, out: &Path, resumed: Option<State>) -> Result<()> {
        if self.cfg.overwrite && !self.cfg.resume {
            checkpoint::clear_outputs(out)?;
        }
        std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
        self.log.open(out, resumed.map(|s| s.log_bytes))
    }

    /// The epochs from where the run stands: a resumed run first finishes the epoch it was in (its
    /// evaluation too, when the checkpoint was taken after its last step and before its evaluation).
    fn epochs(&mut self, on: &mut dyn FnMut(Event)) -> Result<()> {
        on(Event::Start { steps: self.total, examples: self.lens.len() });
        let spe = self.steps_per_epoch;
        let (mut start, mut skip) = (self.step / spe, self.step % spe);
        if skip == 0 && self.step > 0 && self.eval_step != Some(self.step) {
            // Checkpointed after an epoch's last step, before its end: that end runs first.
            (start, skip) = (start - 1, spe);
        }
        if self.stopped_early || (self.step >= self.total && self.eval_step == Some(self.step)) {
            return Ok(()); // resumed after the last epoch end: only the results are left to write
        }
        for epoch in start..self.cfg.epochs {
            self.epoch(epoch, if epoch == start { skip } else { 0 }, on)?;
            let stop = self.end_epoch(epoch, on)?;
            if stop || self.step >= self.total {
                break;
            }
        }
        Ok(())
    }

    /// The batches of one epoch (the first `skip` were done before a resume).
    fn epoch(&mut self, epoch: usize, skip: usize, on: &mut dyn FnMut(Event)) -> Result<()> {
        let batches = batches_by_length(&self.lens, self.cfg.batch_size, self.cfg.seed.wrapping_add(epoch as u64));
        for chunk in batches.iter().skip(skip) {
            if self.step >= self.total {
                break;
            }
            if self.cfg.rows() < self.cfg.batch_size {
                self.micro_step(epoch, chunk, on)?;
            } else {
                self.full_step(epoch, chunk, on)?;
            }
            self.step += 1;
            if self.cfg.save_every > 0 && self.step.is_multiple_of(self.cfg.save_every) && self.out.is_some() {
                self.flush(on)?;
                let t = Instant::now();
                self.checkpoint()?;
                self.log.paused += t.elapsed();
            }
        }
        self.flush(on)
    }

    fn key_of(&self, idx: &[usize]) -> usize {
        self.task.bucket(idx.iter().map(|&i| self.lens[i]).max().unwrap_or(1))
    }

    fn lr(&self) -> f32 {
        self.cfg.lr * self.optim.schedule.factor(self.step as u64)
    }

    /// One step on the whole batch. Its loss is read during the next step: from this graph's step output when
    /// the bucket is the same, else from the graph that ran it (submitted before, so waiting does not stall).
    fn full_step(&mut self, epoch: usize, chunk: &[usize], on: &mut dyn FnMut(Event)) -> Result<()> {
        let key = self.key_of(chunk);
        let (dev, step, lr) = (self.dev, self.step, self.lr());
        let (ex, _) = self.task.feed(chunk, key)?;
        ex.step = step as u64;
        let out = ex.step(dev)?;
        let done = match self.in_flight.take() {
            Some(p) if p.key == key => out.prev_loss.map(|l| (p, l)),
            Some(p) => self.collect(p)?,
            None => None,
        };
        self.in_flight = Some(InFlight { key, step, epoch, examples: chunk.len(), lr });
        if let Some((p, l)) = done {
            self.log.step(on, l, p.step, p.epoch, p.examples, p.lr)?;
        }
        Ok(())
    }

    /// Gradient accumulation: each micro-batch on the graph of its own bucket (they share gradients and
    /// optimizer state), its loss gradient scaled by its share of the rows; the update follows the last.
    fn micro_step(&mut self, epoch: usize, chunk: &[usize], on: &mut dyn FnMut(Event)) -> Result<()> {
        let (dev, step, n) = (self.dev, self.step, chunk.len());
        let parts: Vec<&[usize]> = chunk.chunks(self.cfg.rows()).collect();
        let total = self.task.loss_weight(chunk).max(1) as f64;
        let mut loss = 0f64;
        for (i, part) in parts.iter().enumerate() {
            let share = self.task.loss_weight(part) as f64 / total;
            let key = self.key_of(part);
            let (ex, loss_var) = self.task.feed(part, key)?;
            ex.set_loss_scale(dev, share as f32)?;
            ex.step = step as u64;
            let last = i + 1 == parts.len();
            ex.micro_step(dev, i == 0, last)?;
            let l = ex.read(dev, loss_var)?[0];
            if last {
                ex.last_loss(dev)?; // the staged copy of the same loss
            }
            loss += l as f64 * share;
        }
        let lr = self.lr();
        self.log.step(on, loss as f32, step, epoch, n, lr)
    }

    /// Wait for an in-flight step's loss on the graph that ran it.
    fn collect(&mut self, p: InFlight) -> Result<Option<(InFlight, f32)>> {
        let dev = self.dev;
        let (ex, _) = self.task.executor(p.key)?;
        Ok(ex.last_loss(dev)?.map(|l| (p, l)))
    }

    /// Log the in-flight step, if any.
    fn flush(&mut self, on: &mut dyn FnMut(Event)) -> Result<()> {
        if let Some(p) = self.in_flight.take() {
            if let Some((p, l)) = self.collect(p)? {
                self.log.step(on, l, p.step, p.epoch, p.examples, p.lr)?;
            }
        }
        Ok(())
    }

    /// Evaluate, keep the best adapter, checkpoint; true when patience has run out.
    fn end_epoch(&mut self, epoch: usize, on: &mut dyn FnMut(Event)) -> Result<bool> {
        let t = Instant::now();
        match self.task.evaluate()? {
            Some(ev) => {
                let improved =
                    if self.metric.higher_is_better { ev.score > self.best_score } else { ev.score < self.best_score };
                if improved {
                    self.best_score = ev.score;
                    self.best_epoch = Some(epoch);
                    self.keep_adapter()?;
                    self.patience_left = self.cfg.patience;
                    self.best = Some(ev.clone());
                } else if let Some(p) = self.patience_left.as_mut() {
                    *p = p.saturating_sub(1);
                }
                let mut row = Map::new();
                row.insert("epoch".into(), json!(epoch));
                row.insert("step".into(), json!(self.step));
                for (k, v) in &ev.values {
                    row.insert(k.clone(), json!(v));
                }
                self.log.line(Value::Object(row.clone()))?;
                self.history.push(Value::Object(row));
                on(Event::Eval { epoch, metrics: ev.metrics.clone(), best: improved });
                self.last = Some(ev);
            }
            None => self.keep_adapter()?,
        }
        self.eval_step = Some(self.step);
        self.stopped_early = self.patience_left == Some(0);
        if self.out.is_some() {
            self.checkpoint()?;
        }
        self.log.paused += t.elapsed();
        if self.stopped_early {
            let n = self.cfg.patience.unwrap_or(0);
            on(Event::Info(format!("early stop: no better {} for {n} evaluations", self.metric.name)));
            return Ok(true);
        }
        Ok(false)
    }

    /// The adapter as it is now becomes the kept one (written to the output folder when there is one); never
    /// one with non-finite parameters.
    fn keep_adapter(&mut self) -> Result<()> {
        self.check_finite()?;
        self.best_adapter = Some(match self.out {
            Some(o) => {
                let dir = o.join(self.task.adapter_folder());
                self.task.save_adapter(&dir)?;
                PeftAdapter::load(&dir)?
            }
            None => self.task.adapter()?,
        });
        Ok(())
    }

    /// Stop, naming the parameter and the step, when a trainable parameter is NaN or ±Inf (nothing of it is
    /// saved: not as the best adapter, not as a checkpoint).
    fn check_finite(&self) -> Result<()> {
        for (name, _, d) in crate::classifier::trainable_tensors(self.dev, self.task.store())? {
            if let Err(e) = rime_io::check_finite("the trained parameters", &name, &d) {
                let note = self.out.map_or("No checkpoint is kept without an output folder.".into(), checkpoint_note);
                return Err(Error::Msg(format!(
                    "parameter '{name}' became non-finite after step {}; stopped, nothing of it saved ({e}). {note} \
                     Try a lower learning rate (lr).",
                    self.step,
                )));
            }
        }
        Ok(())
    }

    /// The counters a checkpoint records.
    fn state(&self) -> State {
        State {
            global_step: self.step,
            best_score: self.best_score.is_finite().then_some(self.best_score),
            best_epoch: self.best_epoch,
            eval_step: self.eval_step,
            patience_left: self.patience_left,
            stopped_early: self.stopped_early,
            log_bytes: self.log.bytes,
            history: self.history.clone(),
            best: self.best.clone(),
            last: self.last.clone(),
        }
    }

    /// `out/checkpoint`: adapter, optimizer state and counters, committed crash-safely
    /// ([`crate::checkpoint`]); never over the last good one with non-finite parameters.
    fn checkpoint(&mut self) -> Result<()> {
        let Some(out) = self.out else { return Ok(()) };
        self.check_finite()?;
        let state = self.state().to_json(self.metric.name);
        let (task, dev) = (&*self.task, self.dev);
        checkpoint::write(out, &state, |tmp| {
            task.save_adapter(&tmp.join("adapter"))?;
            if let Some(ex) = task.any_executor() {
                ex.save_optimizer_state(dev, task.store(), &tmp.join("optimizer.safetensors"))?;
            }
            Ok(())
        })
    }

    fn finish(self) -> Result<TrainResult<T::Summary>> {
        let secs = self.log.train_seconds();
        let (dispatches_per_step, memory) = self
            .task
            .any_executor()
            .map(|e| (e.dispatches_per_step(), e.memory_report().to_string()))
            .unwrap_or_default();
        let stats = RunStats {
            steps: self.step,
            best_epoch: self.best_epoch,
            best_score: self.best_score.is_finite().then_some(self.best_score),
            best: self.best,
            last: self.last,
            first_loss: self.log.first_loss,
            last_loss: self.log.last_loss,
            train_seconds: secs,
            train_examples_per_s: self.log.examples_done as f64 / secs.max(1e-9),
            dispatches_per_step,
            memory,
        };
        let summary = self.task.summary(&stats);
        let mut metrics = self.task.summary_json(&summary);
        metrics["history"] = json!(self.history);
        let title = self.task.title();
        let adapter_folder = self.task.adapter_folder();
        let adapter = match (self.best_adapter, self.out) {
            (Some(a), _) => a,
            // Resumed after the best epoch: the kept adapter is on disk (never the current parameters).
            (None, Some(o)) if o.join(adapter_folder).exists() => PeftAdapter::load(o.join(adapter_folder))?,
            (None, Some(o)) if self.best_epoch.is_some() => {
                return Err(Error::Msg(format!(
                    "{}: the best adapter (epoch {}) is missing; it was removed since the checkpoint",
                    o.join(adapter_folder).display(),
                    self.best_epoch.unwrap_or(0)
                )))
            }
            (None, _) => self.task.adapter()?,
        };
        if let Some(o) = self.out {
            // The plot is a convenience: a failure to draw it never fails the run. metrics.json comes last: a
            // run whose checkpoint says finished and that has it is complete (a resume refuses it).
            crate::plot::write_plots(&self.log.lines, &title, o).ok();
            write_json(&o.join("metrics.json"), &metrics)?;
        }
        Ok(TrainResult { summary, metrics, log: self.log.lines, adapter, adapter_folder, title })
    }
}

/// The batches of one epoch over example lengths, grouped by length as Hugging Face's `group_by_length`:
/// shuffle, cut into mega-batches of 50 batches, sort each by length, cut into batches, shuffle the batch
/// order. Every example is seen once per epoch; batches hold examples of similar length (less padding).
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

/// Sequence-length buckets: graphs are compiled per bucket (multiples of 32 tokens).
pub fn bucket(len: usize, max_length: usize) -> usize {
    bucket_by(len, max_length, 32)
}

/// Buckets of `step` tokens: `len` rounded up to a multiple of `step`, within [8, max_length].
pub fn bucket_by(len: usize, max_length: usize, step: usize) -> usize {
    let b = len.div_ceil(step.max(1)) * step.max(1);
    b.clamp(8, max_length.max(8))
}

pub(crate) fn io_err(p: &Path, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("{}: {e}", p.display()))
}

pub(crate) fn write_json(path: &Path, v: &Value) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(v).unwrap_or_default())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| io_err(path, e))
}

/// Per-step loss reporting: the log lines (kept in memory; appended to `metrics.jsonl` when there is an
/// output folder, continuing it on resume), the stop on a non-finite loss that names the step and the last
/// good checkpoint, examples/s over training time (evaluation and checkpoints excluded) and the
/// [`Event::Step`] callback.
pub(crate) struct StepLog {
    jsonl: Option<(std::fs::File, PathBuf)>,
    out: Option<PathBuf>,
    t_start: Instant,
    /// Time spent evaluating and checkpointing, excluded from the throughput.
    pub paused: std::time::Duration,
    pub examples_done: usize,
    last_good: Option<usize>,
    pub lines: Vec<Value>,
    /// Bytes of `metrics.jsonl` written (a checkpoint records them; a resume cuts the file back to them).
    pub bytes: u64,
    pub first_loss: f32,
    pub last_loss: f32,
}

impl StepLog {
    /// A log with nothing on disk yet (see [`StepLog::open`]).
    pub(crate) fn new(out: Option<&Path>) -> StepLog {
        StepLog {
            jsonl: None,
            out: out.map(Path::to_path_buf),
            t_start: Instant::now(),
            paused: std::time::Duration::ZERO,
            examples_done: 0,
            last_good: None,
            lines: vec![],
            bytes: 0,
            first_loss: f32::NAN,
            last_loss: f32::NAN,
        }
    }

    /// Write the log to `out/metrics.jsonl` from now on: a new file, or (resuming) the file cut back to its
    /// first `keep` bytes (the lines of the checkpointed steps), whose lines are read back.
    pub(crate) fn open(&mut self, out: &Path, keep: Option<u64>) -> Result<()> {
        let path = out.join("metrics.jsonl");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        let keep = keep.unwrap_or(0);
        let len = f.metadata().map_err(|e| io_err(&path, e))?.len();
        if len < keep {
            return Err(Error::Msg(format!(
                "{}: holds {len} bytes, fewer than the {keep} its checkpoint recorded (cut or replaced since)",
                path.display()
            )));
        }
        f.set_len(keep).map_err(|e| io_err(&path, e))?;
        let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
        for (i, line) in text.lines().enumerate() {
            let v: Value = serde_json::from_str(line)
                .map_err(|e| io_err(&path, format!("line {}: not JSON ({e}); the log was damaged", i + 1)))?;
            if let (Some(step), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) {
                if self.first_loss.is_nan() {
                    self.first_loss = loss as f32;
                }
                self.last_loss = loss as f32;
                self.last_good = Some(step as usize);
            }
            self.lines.push(v);
        }
        self.bytes = keep;
        self.jsonl = Some((f, path));
        Ok(())
    }

    /// One line of the log.
    pub(crate) fn line(&mut self, v: Value) -> Result<()> {
        use std::io::Write;
        if let Some((f, path)) = &mut self.jsonl {
            let line = format!("{v}\n");
            f.write_all(line.as_bytes()).map_err(|e| io_err(path, e))?;
            self.bytes += line.len() as u64;
        }
        self.lines.push(v);
        Ok(())
    }

    /// Seconds spent training (wall time less [`StepLog::paused`]).
    pub(crate) fn train_seconds(&self) -> f64 {
        (self.t_start.elapsed().saturating_sub(self.paused)).as_secs_f64()
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
            let note = match &self.out {
                Some(o) => checkpoint_note(o),
                None => "No checkpoint is kept without an output folder.".into(),
            };
            return Err(Error::Msg(format!(
                "loss became {loss} at step {step} (last finite loss at step {}); stopped. {note} Try a lower \
                 learning rate (lr).",
                self.last_good.map_or("none".into(), |s| s.to_string()),
            )));
        }
        self.last_good = Some(step);
        if self.first_loss.is_nan() {
            self.first_loss = loss;
        }
        self.last_loss = loss;
        self.examples_done += examples;
        let eps = self.examples_done as f64 / self.train_seconds().max(1e-9);
        self.line(json!({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "examples_per_s": eps}))?;
        on(Event::Step { step, epoch, loss, examples_per_s: eps, lr });
        Ok(())
    }
}

/// Where the last good checkpoint is, for error messages.
pub(crate) fn checkpoint_note(out: &Path) -> String {
    let dir = out.join("checkpoint");
    match std::fs::read_to_string(dir.join("state.json")).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok()) {
        Some(v) => format!("The last good checkpoint (step {}) is kept in {}.", v["global_step"], dir.display()),
        None => format!("No checkpoint was saved before it in {} (see save_every).", out.display()),
    }
}
