//! Causal-LM fine-tuning of a Llama decoder with LoRA: next-token cross-entropy on the completion tokens
//! only (prompt tokens and padding are ignored), the frozen GGUF backbone dequantized to f32 on the device.
//! Data: prompt/completion pairs ([`CausalData`]); without prompts every token of the text is a target.
//!
//! [`CausalTask`] is driven by the shared trainer ([`crate::trainer::train`]): batches grouped by length and
//! padded to a length bucket (one graph per bucket, all sharing parameters and optimizer state), evaluation
//! each epoch (completion loss and perplexity, lower is better) on the eval set or a held-out part of the
//! training data, the best adapter kept in `adapter/` (peft layout, task CAUSAL_LM).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rime_graph::{Executor, Graph, OptimConfig, ParamStore, Var};
use rime_io::dataset::Dataset;
use rime_io::peft::PeftAdapter;
use rime_kernels::{DType, Device};
use rime_models::llama::{self, LlamaConfig};

use crate::classifier::EvalMetrics;
use crate::config::{TrainConfig, WeightStorage};
use crate::data::CausalData;
use crate::lora::{LoraConfig, LoraHook};
use crate::trainer::{bucket, save_peft, Evaluation, Event, Metric, RunStats, Task};
use crate::{Error, Result};

/// The summary of a causal-LM run (`metrics.json` without the history, plus `"task": "causal-lm"`).
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
    /// The executor's memory report of a training graph (frozen weights, trainable parameters, gradients,
    /// optimizer state, activation peak, inputs).
    pub memory: String,
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

/// Token ids and their targets (-100 where unscored), one pair per example.
type Examples = Vec<(Vec<u32>, Vec<i32>)>;

/// Tokenized examples that have at least one target token, and how many were cut at the maximum length.
fn encode_all(model: &llama::LlamaModel, ds: &Dataset, max_len: usize) -> Result<(Examples, usize)> {
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
    /// Each decoder layer a gradient-checkpoint segment (training graphs).
    checkpoint: bool,
    execs: HashMap<usize, (Executor, Var)>,
    first: Option<usize>,
}

impl Buckets {
    fn get(&mut self, dev: &Device, store: &ParamStore, t: usize) -> Result<&mut (Executor, Var)> {
        if !self.execs.contains_key(&t) {
            let (b, v) = (self.b, self.cfg.vocab);
            let mut g = Graph::new();
            let logits = llama::build_with(&mut g, store, &self.cfg, b, t, &self.hook, self.checkpoint)?;
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

/// What [`CausalTask::prepare`] loads.
struct Loaded {
    model: llama::LlamaModel,
    pad: u32,
    data: Vec<(Vec<u32>, Vec<i32>)>,
    eval: Vec<(Vec<u32>, Vec<i32>)>,
    buckets: Buckets,
    /// With LoRA dropout the training graphs drop activations: evaluation gets its own graphs without it.
    eval_buckets: Option<Buckets>,
    trainable: usize,
    truncated: usize,
}

/// Causal-LM LoRA on a Llama GGUF (see the module doc).
pub struct CausalTask<'d> {
    dev: &'d Device,
    model: PathBuf,
    lora: LoraConfig,
    train: CausalData,
    eval: Option<CausalData>,
    loaded: Option<Loaded>,
}

impl<'d> CausalTask<'d> {
    /// Train LoRA (`lora.targets` are Llama module names, e.g. `q_proj`, `v_proj`) on `train`; evaluate on
    /// `eval`, or on a held-out part of `train` when it has enough rows, else not at all (the last adapter is
    /// kept).
    pub fn new(
        dev: &'d Device,
        model: impl Into<PathBuf>,
        lora: LoraConfig,
        train: CausalData,
        eval: Option<CausalData>,
    ) -> Self {
        CausalTask { dev, model: model.into(), lora, train, eval, loaded: None }
    }

    fn loaded(&self) -> Result<&Loaded> {
        self.loaded.as_ref().ok_or_else(|| Error::Msg("the causal-LM task is not prepared".into()))
    }

    fn loaded_mut(&mut self) -> Result<&mut Loaded> {
        self.loaded.as_mut().ok_or_else(|| Error::Msg("the causal-LM task is not prepared".into()))
    }

    fn splits(&self, cfg: &TrainConfig, on: &mut dyn FnMut(Event)) -> Result<(Dataset, Option<Dataset>)> {
        let full = self.train.dataset("train")?;
        let n = full.len() as f64;
        Ok(match &self.eval {
            Some(e) => (full, Some(e.dataset("eval")?)),
            None if (n * cfg.eval_fraction).round() >= 1.0 && n * (1.0 - cfg.eval_fraction) >= 10.0 => {
                on(Event::Info(format!(
                    "no eval set: holding out {:.0}% of {} for evaluation",
                    cfg.eval_fraction * 100.0,
                    full.path.display()
                )));
                let (t, e) = full.split(cfg.eval_fraction, cfg.seed)?;
                (t, Some(e))
            }
            None => {
                on(Event::Info(format!(
                    "no eval set and {} rows are too few to hold some out: no evaluation; the last adapter is kept",
                    full.len()
                )));
                (full, None)
            }
        })
    }

    /// The trained LoRA as a peft adapter: the LoRA-family config (DoRA magnitudes, PiSSA converted to a
    /// LoRA of the unmodified base) with the causal-LM task.
    fn adapter_value(&self) -> Result<PeftAdapter> {
        let (dev, store) = (self.dev, &self.loaded()?.model.store);
        let mut tensors = crate::classifier::trainable_tensors(dev, store)?;
        let mut acfg = crate::classifier::lora_adapter_config(dev, store, &self.lora, &mut tensors)?;
        acfg.task_type = Some("CAUSAL_LM".into());
        acfg.base_model_name_or_path = Some(self.model.display().to_string());
        let tensors =
            tensors.into_iter().map(|(name, shape, data)| rime_io::peft::AdapterTensor { name, shape, data }).collect();
        Ok(PeftAdapter::new(acfg, tensors))
    }
}

impl<'d> Task<'d> for CausalTask<'d> {
    type Summary = CausalSummary;

    fn device(&self) -> &'d Device {
        self.dev
    }

    fn prepare(&mut self, cfg: &TrainConfig, on: &mut dyn FnMut(Event)) -> Result<Vec<usize>> {
        if cfg.head != crate::config::HeadKind::Mean {
            return Err(Error::invalid(
                "head",
                "a causal language model has no BertForSequenceClassification head (hf)",
            ));
        }
        let weights = match cfg.weights {
            WeightStorage::F32 => llama::GgufWeights::F32,
            WeightStorage::F16 => llama::GgufWeights::F16,
            WeightStorage::Quantized => llama::GgufWeights::Quantized,
            WeightStorage::BF16 => {
                return Err(Error::invalid("weights", "bf16: a GGUF decoder's weights are f32, f16 or quantized (q)"))
            }
        };
        let (train_ds, eval_ds) = self.splits(cfg, on)?;
        let dev = self.dev;
        let mut model =
            llama::load_gguf_with(dev, &self.model, None, weights).map_err(|e| Error::Msg(e.to_string()))?;
        model.store.add_texture_twins(dev)?;
        let (wbytes, qbytes, twins) = model.store.iter().fold((0u64, 0u64, 0u64), |(a, q, t), (_, p)| {
            let tw = p.tensor.texture.as_ref().map_or(0, |tw| (tw.rows * tw.cols * tw.dtype.size()) as u64);
            (a + p.tensor.bytes(), q + if p.tensor.dtype.is_quantized() { p.tensor.bytes() } else { 0 }, t + tw)
        });
        on(Event::Info(format!(
            "weights: {:.1} MB on the device ({:.1} MB of it in GGUF blocks){}{}",
            wbytes as f64 / 1e6,
            qbytes as f64 / 1e6,
            match twins {
                0 => String::new(),
                t => format!(", plus {:.1} MB of texture twins", t as f64 / 1e6),
            },
            match dev.dequant_scratch_bytes() {
                0 => String::new(),
                s => format!(", plus a {:.1} MB dequantization scratch", s as f64 / 1e6),
            }
        )));
        let pad = model.eos_tokens.first().copied().unwrap_or(0);
        let (data, cut) = encode_all(&model, &train_ds, cfg.max_length)?;
        let (eval, cut_e) = match &eval_ds {
            Some(e) => encode_all(&model, e, cfg.max_length)?,
            None => (vec![], 0),
        };
        if data.is_empty() {
            return Err(Error::Msg(format!("{}: no example has a completion token to learn", train_ds.path.display())));
        }
        if eval_ds.is_some() && eval.is_empty() {
            return Err(Error::Msg("the eval set has no example with a completion token".into()));
        }
        if cut + cut_e > 0 {
            on(Event::Warn(format!(
                "{} of {} examples are longer than max_length {} tokens and were truncated",
                cut + cut_e,
                data.len() + eval.len(),
                cfg.max_length
            )));
        }
        let modules = crate::lora::add_lora(dev, &mut model.store, &self.lora)?;
        let trainable: usize = model.store.trainable().map(|(_, p)| p.tensor.numel()).sum();
        on(Event::Info(format!(
            "LoRA r={} alpha={} on {} modules: {trainable} trainable parameters",
            self.lora.rank,
            self.lora.alpha,
            modules.len()
        )));
        let buckets = |hook: LoraHook, checkpoint: bool| Buckets {
            b: cfg.batch_size,
            max_length: cfg.max_length,
            cfg: model.cfg.clone(),
            hook,
            optim: None,
            checkpoint,
            execs: HashMap::new(),
            first: None,
        };
        let l = &self.lora;
        let hook = LoraHook { scale: l.scale(), dropout: l.dropout, seed: l.seed };
        let train_buckets = buckets(hook, cfg.gradient_checkpointing);
        let eval_buckets = (l.dropout > 0.0).then(|| buckets(LoraHook::new(l.scale()), false));
        let lens = data.iter().map(|(x, _)| x.len()).collect();
        let truncated = cut + cut_e;
        self.loaded =
            Some(Loaded { model, pad, data, eval, buckets: train_buckets, eval_buckets, trainable, truncated });
        Ok(lens)
    }

    fn compile(&mut self, optim: OptimConfig, rows: usize) -> Result<()> {
        let l = self.loaded_mut()?;
        l.buckets.optim = Some(optim);
        l.buckets.b = rows;
        if let Some(e) = &mut l.eval_buckets {
            e.b = rows;
        }
        Ok(())
    }

    fn bucket(&self, longest: usize) -> usize {
        bucket(longest, self.loaded.as_ref().map_or(longest, |l| l.buckets.max_length))
    }

    fn executor(&mut self, key: usize) -> Result<(&mut Executor, &ParamStore)> {
        let dev = self.dev;
        let l = self.loaded_mut()?;
        let (ex, _) = l.buckets.get(dev, &l.model.store, key)?;
        Ok((ex, &l.model.store))
    }

    fn feed(&mut self, idx: &[usize], key: usize) -> Result<(&mut Executor, Var)> {
        let dev = self.dev;
        let l = self.loaded_mut()?;
        let (ids, tg) = make_batch(&l.data, idx, l.buckets.b, key, l.pad);
        let (ex, loss) = l.buckets.get(dev, &l.model.store, key)?;
        ex.feed_u32(dev, llama::INPUT_IDS, &ids)?;
        ex.feed_i32(dev, "targets", &tg)?;
        Ok((ex, *loss))
    }

    fn any_executor(&self) -> Option<&Executor> {
        self.loaded.as_ref().and_then(|l| l.buckets.owner())
    }

    fn store(&self) -> &ParamStore {
        match &self.loaded {
            Some(l) => &l.model.store,
            None => crate::classify::empty_store(),
        }
    }

    fn evaluate(&mut self) -> Result<Option<Evaluation>> {
        let dev = self.dev;
        let l = self.loaded_mut()?;
        if l.eval.is_empty() {
            return Ok(None);
        }
        let buckets = l.eval_buckets.as_mut().unwrap_or(&mut l.buckets);
        let m = evaluate(dev, &l.model.store, buckets, &l.eval, l.pad)?;
        let values = vec![("eval_loss".into(), m.loss), ("eval_perplexity".into(), m.loss.exp())];
        Ok(Some(Evaluation { score: m.loss, metrics: m, values }))
    }

    fn metric(&self) -> Metric {
        Metric { name: "eval_loss", higher_is_better: false }
    }

    fn supports_checkpointing(&self) -> bool {
        true
    }

    /// The loss is the mean over the scored (completion) tokens of the batch.
    fn loss_weight(&self, idx: &[usize]) -> usize {
        self.loaded
            .as_ref()
            .map_or(idx.len(), |l| idx.iter().map(|&i| l.data[i].1.iter().filter(|&&t| t != -100).count()).sum())
    }

    fn adapter(&self) -> Result<PeftAdapter> {
        self.adapter_value()
    }

    fn save_adapter(&self, dir: &Path) -> Result<()> {
        save_peft(&self.adapter_value()?, dir)
    }

    fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let dev = self.dev;
        crate::classifier::load_adapter(dev, &mut self.loaded_mut()?.model.store, dir)?;
        Ok(())
    }

    fn adapter_folder(&self) -> &'static str {
        "adapter"
    }

    fn title(&self) -> String {
        let data = self.train.source().and_then(|p| p.file_name()).map(|f| f.to_string_lossy().into_owned());
        format!(
            "{} · LoRA r={} · {}",
            self.model.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            self.lora.rank,
            data.unwrap_or_else(|| format!("{} texts", self.train.len()))
        )
    }

    fn summary(&self, run: &RunStats) -> CausalSummary {
        let l = self.loaded.as_ref();
        CausalSummary {
            steps: run.steps,
            first_loss: run.first_loss,
            last_loss: run.last_loss,
            eval_loss: run.best_score,
            eval_perplexity: run.best_score.map(f64::exp),
            best_epoch: run.best_epoch,
            train_examples_per_s: run.train_examples_per_s,
            train_seconds: run.train_seconds,
            trainable_params: l.map_or(0, |l| l.trainable),
            truncated: l.map_or(0, |l| l.truncated),
            memory: run.memory.clone(),
        }
    }

    fn summary_json(&self, s: &CausalSummary) -> serde_json::Value {
        let mut v = serde_json::to_value(s).unwrap_or_default();
        v["task"] = serde_json::json!("causal-lm");
        v
    }
}
