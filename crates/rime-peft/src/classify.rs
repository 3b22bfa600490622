//! Sequence classification on a frozen encoder: tokenized data, the [`Session`] that holds the model and
//! its graphs per length bucket, the [`ClassifyTask`] the trainer drives, the linear-probe baseline, and the
//! [`Evaluator`] that scores saved adapters (what rime-merge's soups use).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rime_graph::{Executor, OptimConfig, ParamStore, Var};
use rime_io::dataset::{Columns, Dataset, LabelMap};
use rime_io::peft::PeftAdapter;
use rime_io::tokenizer::{Padding, Tokenizer};
use rime_io::{Checkpoint, ModelConfig};
use rime_kernels::Device;
use rime_models::bert::BertConfig;
use rime_models::LinearHook;

use crate::classifier::{self, EvalMetrics, Method, ShapeExec};
use crate::config::TrainConfig;
use crate::data::TextClassData;
use crate::metrics;
use crate::trainer::{batches_by_length, bucket, Evaluation, Event, Metric, RunStats, Task};
use crate::{Error, Result};

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

    /// [`Session::exec`] with the parameters beside it.
    pub fn exec_and_store(&mut self, t: usize) -> Result<(&mut ShapeExec, &ParamStore)> {
        self.exec(t)?;
        Ok((self.execs.get_mut(&t).expect("just built"), &self.store))
    }

    /// Any built training graph (they share the optimizer state).
    pub fn any_exec(&self) -> Option<&ShapeExec> {
        self.execs.values().next()
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
        let classes = classifier::head_classes(&self.store)?;
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
    let (ckpt, cfg, tok) = open_encoder(model, max_length)?;
    let mut store = ParamStore::new();
    let prefix = classifier::load_frozen_as(dev, &mut store, &ckpt, weights)?;
    Ok((store, cfg, prefix, tok))
}

/// An encoder folder's checkpoint (mapped, checked against config.json), config and tokenizer (truncating at
/// `max_length`); nothing on the device yet.
fn open_encoder(model: &Path, max_length: usize) -> Result<(Checkpoint, BertConfig, Tokenizer)> {
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
    let mut tok = Tokenizer::from_file(model.join("tokenizer.json"))?;
    tok.set_max_length(Some(max_length.min(cfg.max_position_embeddings)))?;
    let bcfg = classifier::bert_config(&cfg);
    // Ids beyond the embedding table would index out of range on the GPU: refuse such a tokenizer here, for
    // training, evaluation and features alike.
    tok.set_vocab_limit(bcfg.vocab, "embeddings.word_embeddings.weight")?;
    Ok((ckpt, bcfg, tok))
}

/// The summary of a classification run (`metrics.json` without the history).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClassifySummary {
    pub method: String,
    /// Metrics of the best adapter (by accuracy) on the eval set.
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

impl ClassifySummary {
    /// The summary of a classification run of `method` with `(trainable, frozen)` parameters and `labels`.
    pub(crate) fn of_run(method: &str, run: &RunStats, params: (usize, usize), labels: Vec<String>) -> Self {
        let m = run.best.as_ref().or(run.last.as_ref()).map(|e| e.metrics.clone()).unwrap_or_default();
        ClassifySummary {
            method: method.into(),
            eval_accuracy: m.accuracy,
            eval_macro_f1: m.macro_f1,
            eval_loss: m.loss,
            best_epoch: run.best_epoch.unwrap_or(0),
            steps: run.steps,
            train_examples_per_s: run.train_examples_per_s,
            train_seconds: run.train_seconds,
            trainable_params: params.0,
            frozen_params: params.1,
            labels,
            dispatches_per_step: run.dispatches_per_step,
            memory: run.memory.clone(),
        }
    }
}

/// What [`ClassifyTask::prepare`] loads.
struct Loaded<'d> {
    sess: Session<'d>,
    train: Encoded,
    eval: Encoded,
    labels: Vec<String>,
    method: Method,
    trainable: usize,
    frozen: usize,
}

/// Sequence classification: a frozen encoder (a folder with config.json, safetensors and tokenizer.json), a
/// tuning method and a linear head on the mask-weighted mean pool, trained with cross-entropy; evaluated by
/// accuracy (higher is better), macro-F1 and loss. The adapter (peft layout, head under `modules_to_save`,
/// labels as `rime_labels`) goes to `best/`.
pub struct ClassifyTask<'d> {
    dev: &'d Device,
    model: PathBuf,
    method: Method,
    train: TextClassData,
    eval: Option<TextClassData>,
    loaded: Option<Loaded<'d>>,
}

static TEMP_ADAPTERS: AtomicUsize = AtomicUsize::new(0);

impl<'d> ClassifyTask<'d> {
    /// Train `method` on `train`; evaluate on `eval`, or on a seeded held-out part of `train`
    /// ([`TrainConfig::eval_fraction`]) when None.
    pub fn new(
        dev: &'d Device,
        model: impl Into<PathBuf>,
        method: Method,
        train: TextClassData,
        eval: Option<TextClassData>,
    ) -> Self {
        ClassifyTask { dev, model: model.into(), method, train, eval, loaded: None }
    }

    fn loaded(&self) -> Result<&Loaded<'d>> {
        self.loaded.as_ref().ok_or_else(|| Error::Msg("the classification task is not prepared".into()))
    }

    fn loaded_mut(&mut self) -> Result<&mut Loaded<'d>> {
        self.loaded.as_mut().ok_or_else(|| Error::Msg("the classification task is not prepared".into()))
    }

    /// The train and eval splits: `eval` when given, else a seeded held-out part of `train`.
    fn splits(&self, cfg: &TrainConfig, on: &mut dyn FnMut(Event)) -> Result<(Dataset, Dataset)> {
        splits(&self.train, self.eval.as_ref(), cfg, on)
    }
}

/// The training and evaluation sets of a text-classification task: `eval`, or a seeded held-out part of
/// `train` (`cfg.eval_fraction`), said in an event.
pub(crate) fn splits(
    train: &TextClassData,
    eval: Option<&TextClassData>,
    cfg: &TrainConfig,
    on: &mut dyn FnMut(Event),
) -> Result<(Dataset, Dataset)> {
    let train = train.dataset("train")?;
    Ok(match eval {
        Some(e) => (train, e.dataset("eval")?),
        None => {
            on(Event::Info(format!(
                "no eval set: holding out {:.0}% of {} for evaluation",
                cfg.eval_fraction * 100.0,
                train.path.display()
            )));
            train.split(cfg.eval_fraction, cfg.seed)?
        }
    })
}

impl<'d> Task<'d> for ClassifyTask<'d> {
    type Summary = ClassifySummary;

    fn device(&self) -> &'d Device {
        self.dev
    }

    fn prepare(&mut self, cfg: &TrainConfig, on: &mut dyn FnMut(Event)) -> Result<Vec<usize>> {
        let dev = self.dev;
        let (train_ds, eval_ds) = self.splits(cfg, on)?;
        let labels = LabelMap::from_dataset(&train_ds)?;
        let (mut store, bcfg, prefix, tok) = open_model_as(dev, &self.model, cfg.max_length, cfg.weights.dtype()?)?;
        let method = self.method.clone().for_model(&bcfg);
        classifier::check_virtual_fit(method.virtual_tokens(), cfg.max_length.min(bcfg.max_positions), &bcfg)?;
        let (train, trunc) = encode(&tok, &train_ds, Some(&labels))?;
        let (eval, trunc_e) = encode(&tok, &eval_ds, Some(&labels))?;
        if trunc + trunc_e > 0 {
            on(Event::Warn(format!(
                "{} of {} texts are longer than max_length {} tokens and were truncated",
                trunc + trunc_e,
                train.ids.len() + eval.ids.len(),
                cfg.max_length
            )));
        }
        classifier::init_head_of(dev, &mut store, cfg.head, &prefix, bcfg.hidden, labels.len(), cfg.seed)?;
        on(Event::Info(classifier::prepare_method(dev, &mut store, &method)?));
        let trainable: usize = store.trainable().map(|(_, p)| p.tensor.numel()).sum();
        let frozen: usize = store.iter().filter(|(_, p)| !p.trainable).map(|(_, p)| p.tensor.numel()).sum();
        on(Event::Info(format!(
            "{}: {} trainable parameters, {} frozen ({:.3}%)",
            method.name(),
            trainable,
            frozen,
            100.0 * trainable as f64 / (trainable + frozen) as f64
        )));
        let mut sess =
            Session::for_inference(dev, store, bcfg, prefix, classifier::hook_for(&method), cfg.rows(), cfg.max_length);
        sess.eval_hook = classifier::eval_hook_for(&method);
        let lens = train.ids.iter().map(|x| x.len()).collect();
        let labels = labels.labels().to_vec();
        self.loaded = Some(Loaded { sess, train, eval, labels, method, trainable, frozen });
        Ok(lens)
    }

    fn compile(&mut self, optim: OptimConfig, rows: usize) -> Result<()> {
        let l = self.loaded_mut()?;
        l.sess.optim = Some(optim);
        l.sess.batch = rows;
        Ok(())
    }

    fn bucket(&self, longest: usize) -> usize {
        bucket(longest, self.loaded.as_ref().map_or(longest, |l| l.sess.max_length))
    }

    fn executor(&mut self, key: usize) -> Result<(&mut Executor, &ParamStore)> {
        let (se, store) = self.loaded_mut()?.sess.exec_and_store(key)?;
        Ok((&mut se.exec, store))
    }

    fn feed(&mut self, idx: &[usize], key: usize) -> Result<(&mut Executor, Var)> {
        let dev = self.dev;
        let l = self.loaded_mut()?;
        let (ids, types, mask, labels) = make_batch(&l.train, idx, l.sess.batch, key);
        let se = l.sess.exec(key)?;
        classifier::feed(dev, se, &ids, &types, &mask, &labels)?;
        Ok((&mut se.exec, se.loss))
    }

    fn any_executor(&self) -> Option<&Executor> {
        self.loaded.as_ref().and_then(|l| l.sess.any_exec()).map(|s| &s.exec)
    }

    fn store(&self) -> &ParamStore {
        match &self.loaded {
            Some(l) => &l.sess.store,
            None => empty_store(),
        }
    }

    fn evaluate(&mut self) -> Result<Option<Evaluation>> {
        let l = self.loaded_mut()?;
        let m = l.sess.evaluate(&l.eval, |_| {})?;
        let values = vec![
            ("eval_accuracy".into(), m.accuracy),
            ("eval_macro_f1".into(), m.macro_f1),
            ("eval_loss".into(), m.loss),
        ];
        Ok(Some(Evaluation { score: m.accuracy, metrics: m, values }))
    }

    fn metric(&self) -> Metric {
        Metric { name: "accuracy", higher_is_better: true }
    }

    fn adapter(&self) -> Result<PeftAdapter> {
        // The method files write adapters to folders; read one back through a temporary folder.
        let n = TEMP_ADAPTERS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("rime-adapter-{}-{n}", std::process::id()));
        self.save_adapter(&dir)?;
        let ad = PeftAdapter::load(&dir);
        std::fs::remove_dir_all(&dir).ok();
        Ok(ad?)
    }

    fn save_adapter(&self, dir: &Path) -> Result<()> {
        let l = self.loaded()?;
        let base = self.model.display().to_string();
        classifier::save_adapter(self.dev, &l.sess.store, &l.method, &base, &l.labels, dir)
    }

    fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let dev = self.dev;
        classifier::load_adapter(dev, &mut self.loaded_mut()?.sess.store, dir)?;
        Ok(())
    }

    fn adapter_folder(&self) -> &'static str {
        "best"
    }

    fn title(&self) -> String {
        let data = self.train.source().and_then(|p| p.file_name()).map(|f| f.to_string_lossy().into_owned());
        format!(
            "{} · {} · {}",
            self.model.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            self.method.name(),
            data.unwrap_or_else(|| format!("{} texts", self.train.len()))
        )
    }

    fn summary(&self, run: &RunStats) -> ClassifySummary {
        let l = self.loaded.as_ref();
        let params = l.map_or((0, 0), |l| (l.trainable, l.frozen));
        ClassifySummary::of_run(self.method.name(), run, params, l.map(|l| l.labels.clone()).unwrap_or_default())
    }
}

/// The parameters of a task that has not loaded its model.
pub(crate) fn empty_store() -> &'static ParamStore {
    static EMPTY: std::sync::OnceLock<ParamStore> = std::sync::OnceLock::new();
    EMPTY.get_or_init(ParamStore::new)
}

/// The linear-probe baseline: mean-pooled features of the frozen model for the train and eval sets (one
/// forward pass each on the GPU), then a logistic-regression head trained on the CPU (full-batch Adam,
/// 300 iterations, lr 1e-2, weight decay 1e-4). The splits are the trainer's (`eval`, or the held-out part
/// of `train`). Returns eval metrics.
pub fn probe_baseline(
    dev: &Device,
    model: &Path,
    train: &TextClassData,
    eval: Option<&TextClassData>,
    cfg: &TrainConfig,
) -> Result<EvalMetrics> {
    cfg.validate()?;
    let train_full = train.dataset("train")?;
    let (train_ds, eval_ds) = match eval {
        Some(e) => (train_full, e.dataset("eval")?),
        None => train_full.split(cfg.eval_fraction, cfg.seed)?,
    };
    let labels = LabelMap::from_dataset(&train_ds)?;
    let (mut store, bcfg, prefix, tok) = open_model_as(dev, model, cfg.max_length, cfg.weights.dtype()?)?;
    let (tr, _) = encode(&tok, &train_ds, Some(&labels))?;
    let (ev, _) = encode(&tok, &eval_ds, Some(&labels))?;
    classifier::init_head(dev, &mut store, bcfg.hidden, labels.len(), cfg.seed)?;
    let hidden = bcfg.hidden;
    let plain = Box::new(rime_models::Plain);
    let mut sess = Session::for_inference(dev, store, bcfg, prefix, plain, cfg.batch_size, cfg.max_length);
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

/// Multinomial logistic regression by full-batch Adam (decoupled weight decay); returns (W `[k, d]`, b `[k]`).
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

/// Scores saved classification adapters (a folder with a head, as [`ClassifyTask`] or peft writes it: labels
/// from `rime_labels`, else `LABEL_0`.. by the head's rows) on labelled data. The model's checkpoint is mapped and its tokenizer read once; each adapter gets freshly
/// uploaded frozen weights, so no adapter sees another's tensors.
pub struct Evaluator<'d> {
    dev: &'d Device,
    ckpt: Checkpoint,
    cfg: BertConfig,
    tok: Tokenizer,
    batch: usize,
    max_length: usize,
}

impl<'d> Evaluator<'d> {
    /// The encoder folder `model`, evaluated in batches of `batch` rows of at most `max_length` tokens.
    pub fn new(dev: &'d Device, model: &Path, batch: usize, max_length: usize) -> Result<Evaluator<'d>> {
        crate::config::at_least("batch_size", batch, 1)?;
        crate::config::check_max_length(max_length)?;
        let (ckpt, cfg, tok) = open_encoder(model, max_length)?;
        Ok(Evaluator { dev, ckpt, cfg, tok, batch, max_length })
    }

    /// Accuracy, macro-F1 and loss of the adapter folder `adapter` on `data`.
    pub fn evaluate(&self, adapter: &Path, data: &TextClassData) -> Result<EvalMetrics> {
        Ok(self.predict(adapter, data)?.metrics)
    }

    /// The adapter folder's logits on every row of `data` (in order), its labels and the metrics.
    pub fn predict(&self, adapter: &Path, data: &TextClassData) -> Result<Predictions> {
        let dev = self.dev;
        let mut store = ParamStore::new();
        let prefix = classifier::load_frozen_as(dev, &mut store, &self.ckpt, rime_kernels::DType::F32)?;
        let (acfg, labels) = classifier::load_adapter(dev, &mut store, adapter)?;
        if let Err(e) = classifier::head_kind(&store) {
            return Err(Error::Msg(format!("{}: {e} in this adapter or the model", adapter.display())));
        }
        let ds = data.dataset("data")?;
        // An adapter without label names (peft's, named LABEL_i by its head) scores data whose labels are the
        // class ids 0..n-1, as Hugging Face datasets store them.
        let unnamed = labels.iter().enumerate().all(|(i, l)| *l == format!("LABEL_{i}"));
        let ids = ds.examples.iter().all(|e| e.label.as_deref().is_some_and(|l| l.parse::<usize>().is_ok()));
        let map = if unnamed && ids {
            LabelMap::from_labels((0..labels.len()).map(|i| i.to_string()).collect())
        } else {
            LabelMap::from_labels(labels.clone())
        };
        let (enc, _) = encode(&self.tok, &ds, Some(&map))?;
        if acfg.peft_type == crate::methods::lst::PEFT_TYPE {
            // Ladder side-tuning: its own graph beside the encoder (crate::lst).
            let logits = crate::lst::predict(dev, store, &self.cfg, &prefix, &acfg, &enc, self.batch, self.max_length)
                .map_err(|e| crate::trainer::too_large_as(e, "batch_size", self.batch, self.max_length))?;
            let classes = labels.len().max(1);
            let metrics = metrics_from_logits(&logits, &enc.labels, classes);
            return Ok(Predictions { logits: logits.chunks(classes).map(|r| r.to_vec()).collect(), labels, metrics });
        }
        let hook: Box<dyn LinearHook> = classifier::hook_for_adapter(&acfg)?;
        let cfg = self.cfg.clone();
        classifier::check_virtual_fit(hook.virtual_tokens(), self.max_length.min(cfg.max_positions), &cfg)?;
        let mut sess = Session::for_inference(dev, store, cfg, prefix, hook, self.batch, self.max_length);
        let (logits, _) = sess
            .predict(&enc, |_| {})
            .map_err(|e| crate::trainer::too_large_as(e, "batch_size", self.batch, self.max_length))?;
        let classes = labels.len().max(1);
        let metrics = metrics_from_logits(&logits, &enc.labels, classes);
        Ok(Predictions { logits: logits.chunks(classes).map(|r| r.to_vec()).collect(), labels, metrics })
    }
}

/// What [`Evaluator::predict`] returns.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Predictions {
    /// One row of logits per example, in the data's order.
    pub logits: Vec<Vec<f32>>,
    /// The class names, in the logits' column order.
    pub labels: Vec<String>,
    pub metrics: EvalMetrics,
}

/// Evaluate a saved adapter (any method, with its head) on a labelled file.
pub fn evaluate_adapter(
    dev: &Device,
    model: &Path,
    adapter: &Path,
    data: &Path,
    columns: &Columns,
    batch: usize,
    max_length: usize,
) -> Result<EvalMetrics> {
    let ev = Evaluator::new(dev, model, batch, max_length)?;
    ev.evaluate(adapter, &TextClassData::from_file(data, columns)?)
}

pub use crate::classifier::{HEAD_BIAS, HEAD_WEIGHT};

/// A frozen classifier in which chosen tensors take gradients without being stepped: the interface of merge
/// methods that learn coefficients on labelled examples (aTLAS). Tensors of the model are made trainable
/// by name, others (a head) added; [`GradientProbe::loss_and_grads`] runs forward and backward on a batch
/// and returns dL/dW for the tensors asked; [`GradientProbe::evaluate`] scores a split.
pub struct GradientProbe<'d> {
    sess: Session<'d>,
    tok: Option<Tokenizer>,
}

impl<'d> GradientProbe<'d> {
    /// The encoder folder `model` (frozen, f32), batches of `batch` rows of at most `max_length` tokens.
    pub fn open(dev: &'d Device, model: &Path, batch: usize, max_length: usize) -> Result<GradientProbe<'d>> {
        crate::config::at_least("batch_size", batch, 1)?;
        crate::config::check_max_length(max_length)?;
        let (store, cfg, prefix, tok) = open_model(dev, model, max_length)?;
        let sess = Session::for_inference(dev, store, cfg, prefix, Box::new(rime_models::Plain), batch, max_length);
        Ok(Self::from_session(sess, Some(tok)))
    }

    /// A probe over a session already holding its parameters (tests build small ones).
    pub fn from_session(mut sess: Session<'d>, tok: Option<Tokenizer>) -> GradientProbe<'d> {
        // The optimizer makes the executor build the backward pass; it is never stepped.
        sess.optim = Some(OptimConfig::adamw(0.0, 0.0));
        GradientProbe { sess, tok }
    }

    /// The checkpoint's tensor-name prefix (`bert.` or empty).
    pub fn prefix(&self) -> &str {
        &self.sess.prefix
    }

    /// Rows per batch.
    pub fn batch(&self) -> usize {
        self.sess.batch
    }

    /// Make the model tensor `name` take gradients.
    pub fn train_tensor(&mut self, name: &str) -> Result<rime_graph::ParamId> {
        let id = self.sess.store.id(name)?;
        self.sess.store.set_trainable(id, true);
        Ok(id)
    }

    /// Add a tensor that takes gradients (e.g. `head.weight`).
    pub fn add_tensor(&mut self, name: &str, data: &[f32], shape: &[usize]) -> Result<rime_graph::ParamId> {
        Ok(self.sess.store.add_f32(self.sess.dev, name, data, shape, true)?)
    }

    pub fn shape(&self, id: rime_graph::ParamId) -> &[usize] {
        &self.sess.store.get(id).tensor.shape
    }

    /// Overwrite a tensor's values on the device.
    pub fn write(&self, id: rime_graph::ParamId, data: &[f32]) -> Result<()> {
        Ok(self.sess.dev.write_f32(&self.sess.store.get(id).tensor, data)?)
    }

    /// Tokenize `data` with `labels` (in class-id order), keeping at most `limit` rows.
    pub fn encode(&self, data: &TextClassData, labels: &[String], limit: usize) -> Result<Encoded> {
        let tok = self.tok.as_ref().ok_or_else(|| Error::Msg("this probe has no tokenizer".into()))?;
        let (mut enc, _) = encode(tok, &data.dataset("data")?, Some(&LabelMap::from_labels(labels.to_vec())))?;
        enc.ids.truncate(limit);
        enc.types.truncate(limit);
        enc.labels.truncate(limit);
        Ok(enc)
    }

    /// Mean loss of the batch `idx` of `enc` (padded to length `seq`) and dL/dW of each tensor in `ids`.
    pub fn loss_and_grads(
        &mut self,
        enc: &Encoded,
        idx: &[usize],
        seq: usize,
        ids: &[rime_graph::ParamId],
    ) -> Result<(f32, Vec<Vec<f32>>)> {
        let (dev, b) = (self.sess.dev, self.sess.batch);
        let se = self.sess.exec(seq)?;
        let (tok, types, mask, labels) = make_batch(enc, idx, b, seq);
        classifier::feed(dev, se, &tok, &types, &mask, &labels)?;
        se.exec.backward_only(dev)?;
        let loss = se.exec.read(dev, se.loss)?[0];
        let grads = ids.iter().map(|&id| se.exec.read_param_grad(dev, id)).collect::<Result<Vec<_>, _>>()?;
        Ok((loss, grads))
    }

    /// Accuracy, macro-F1 and loss on `enc` (forward only).
    pub fn evaluate(&mut self, enc: &Encoded) -> Result<EvalMetrics> {
        self.sess.evaluate(enc, |_| {})
    }
}
