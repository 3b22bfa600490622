//! Ladder side-tuning for sentence embeddings: the side network of [`crate::lst`] trained with the embedding
//! task's loss ([`crate::embedding::loss_graph`]: MNRL with in-batch negatives, optionally Matryoshka).
//!
//! A batch of B pairs with k texts each (k = 2, or 3 with hard negatives) is one side graph
//! ([`crate::lst::side_output`]) over the k·B stacked rows `[anchors; positives; negatives]` (padded to one
//! length bucket), fed with the frozen encoder's states of every text; its pooled output (the mean pool of
//! `h_L + up(s)`) goes to the loss. No gradient enters the encoder. Every text of the pair data (each training
//! side, the eval queries and the eval corpus) has its encoder states from the feature cache
//! ([`FeatureCache`]: in RAM, or in a folder fingerprinted by the model and the token ids of each of these sets,
//! `train.anchor.f16`, `train.positive.f16`, `train.negative.f16`, `eval.query.f16`, `eval.corpus.f16`; a
//! folder of other data or of the classification task is refused), or from the encoder at every step
//! ([`FeatureCache::Off`], rounded to f16 the same way). Evaluation is retrieval at each dim on the side
//! network's pooled output (a forward-only side graph from the eval states). The adapter is a `RIME_LST` one
//! with `task_type` `FEATURE_EXTRACTION`, no head, and the trained dims (as [`crate::EmbedTask`]'s).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rime_graph::{Executor, Graph, OptimConfig, ParamStore, Var};
use rime_io::peft::PeftAdapter;
use rime_kernels::Device;

use crate::classifier;
use crate::classify::{empty_store, open_model_as, Encoded};
use crate::config::TrainConfig;
use crate::embedding::{
    add_loss_constants, eval_dims, from_values, loss_graph, mark_embedding_adapter, retrieval_evaluation,
    retrieval_metrics, split_pairs, tokenize_blocks, EmbedSummary, LossFeeds, MatryoshkaConfig, PairData, RetrievalSet,
};
use crate::lst::{
    add_parameters, cache_meta_sets, check_adapter, feed_side_inputs, model_fingerprint, open_or_build_sets,
    side_output, FeatureCache, FeatureSet, LstConfig, LstModel, LstSpec,
};
use crate::methods::lst::Lst;
use crate::trainer::{Evaluation, Event, Metric, RunStats, Task};
use crate::{Error, Result};

/// What [`LstEmbedTask::prepare`] loads.
struct Loaded<'d> {
    m: LstModel<'d>,
    /// The tokenized training sides (anchors, positives[, negatives]) and their features.
    blocks: Vec<Encoded>,
    block_f: Vec<Option<FeatureSet>>,
    eval: RetrievalSet,
    query_f: Option<FeatureSet>,
    corpus_f: Option<FeatureSet>,
    k: usize,
    dims: Vec<usize>,
    weights: Vec<f32>,
    eval_dims: Vec<usize>,
    /// Training graphs (k·rows rows) and forward-only eval graphs (rows rows) per bucket.
    train_execs: HashMap<usize, (Executor, Var)>,
    eval_execs: HashMap<usize, (Executor, Var)>,
    trainable: usize,
    frozen: usize,
}

/// Sentence-embedding fine-tuning by ladder side-tuning (see the module doc); the trainer drives it as any
/// [`Task`], its summary is the embedding task's.
pub struct LstEmbedTask<'d> {
    dev: &'d Device,
    model: PathBuf,
    cfg: LstConfig,
    cache: FeatureCache,
    train: PairData,
    eval: Option<PairData>,
    matryoshka: MatryoshkaConfig,
    loaded: Option<Loaded<'d>>,
}

impl<'d> LstEmbedTask<'d> {
    /// LST embeddings on `train` pairs, evaluated on `eval` (or a seeded held-out part of `train`); features
    /// cached in RAM.
    pub fn new(
        dev: &'d Device,
        model: impl Into<PathBuf>,
        cfg: LstConfig,
        train: PairData,
        eval: Option<PairData>,
    ) -> Self {
        LstEmbedTask {
            dev,
            model: model.into(),
            cfg,
            cache: FeatureCache::Memory,
            train,
            eval,
            matryoshka: MatryoshkaConfig::default(),
            loaded: None,
        }
    }

    /// Where the encoder's features are kept.
    pub fn with_cache(mut self, cache: FeatureCache) -> Self {
        self.cache = cache;
        self
    }

    /// Train with the Matryoshka loss on these dims (and weights).
    pub fn with_matryoshka(mut self, m: MatryoshkaConfig) -> Self {
        self.matryoshka = m;
        self
    }

    fn loaded(&self) -> Result<&Loaded<'d>> {
        self.loaded.as_ref().ok_or_else(|| Error::Msg("the LST embedding task is not prepared".into()))
    }

    fn loaded_mut(&mut self) -> Result<&mut Loaded<'d>> {
        self.loaded.as_mut().ok_or_else(|| Error::Msg("the LST embedding task is not prepared".into()))
    }

    fn adapter_value(&self) -> Result<PeftAdapter> {
        let l = self.loaded()?;
        let method = Lst { cfg: l.m.spec.cfg.clone(), dims: Some(l.m.spec.dims.clone()) };
        let mut ad = classifier::peft_adapter(self.dev, &l.m.store, &method, &self.model.display().to_string())?;
        mark_embedding_adapter(&mut ad, &l.dims, &l.weights);
        Ok(ad)
    }
}

/// A saved `RIME_LST` adapter's side network beside the frozen encoder, forward only: the embeddings it gives
/// (what [`crate::embedding::evaluate_retrieval`] and `rime::Encoder` use for an LST adapter). The encoder's
/// states are rounded to f16 as in training.
pub struct SideEncoder<'d> {
    m: LstModel<'d>,
    execs: HashMap<usize, (Executor, Var)>,
}

impl<'d> SideEncoder<'d> {
    /// `store` holds the encoder and the adapter's tensors (loaded by [`classifier::load_adapter`]); `acfg` is
    /// the adapter's config. Texts run in batches of `batch`, buckets up to `max_length`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dev: &'d Device,
        mut store: ParamStore,
        bcfg: &rime_models::bert::BertConfig,
        prefix: &str,
        acfg: &rime_io::peft::AdapterConfig,
        batch: usize,
        max_length: usize,
    ) -> Result<SideEncoder<'d>> {
        let (cfg, dims) = crate::methods::lst::read_config(acfg)?;
        let spec = LstSpec::new(cfg, bcfg, prefix)?;
        if spec.dims != dims {
            return Err(Error::Msg(format!(
                "this LST adapter was made for a side network {dims:?}; the model makes {:?} (another model?)",
                spec.dims
            )));
        }
        crate::lst::add_constants(dev, &mut store, &spec)?;
        let m = LstModel::new(dev, store, bcfg.clone(), spec, batch.max(1), max_length);
        Ok(SideEncoder { m, execs: HashMap::new() })
    }

    /// Pooled side outputs [n, H] of the tokenized texts `enc`, in order (not normalized).
    pub fn embed(&mut self, enc: &Encoded) -> Result<Vec<f32>> {
        embed(&mut self.m, &mut self.execs, enc, None)
    }

    pub fn hidden(&self) -> usize {
        self.m.bcfg.hidden
    }
}

/// Pooled side outputs [n, H] of every text of `enc`, in order, through forward-only side graphs of
/// `m.rows` rows per bucket (built on first use into `execs`).
fn embed(
    m: &mut LstModel,
    execs: &mut HashMap<usize, (Executor, Var)>,
    enc: &Encoded,
    cache: Option<&FeatureSet>,
) -> Result<Vec<f32>> {
    let (dev, h, rows) = (m.dev, m.bcfg.hidden, m.rows);
    let mut out = vec![0f32; enc.ids.len() * h];
    for (chunk, t) in m.batches(enc) {
        let (bufs, mask) = m.side_inputs(enc, &chunk, t, cache)?;
        if let std::collections::hash_map::Entry::Vacant(slot) = execs.entry(t) {
            let mut g = Graph::new();
            let so = side_output(&mut g, &m.store, &m.spec, rows, t, 0.0)?;
            let ex = Executor::new(dev, g, &m.store, None, &[so.pooled], None)?;
            slot.insert((ex, so.pooled));
        }
        let (ex, pooled) = execs.get_mut(&t).expect("just built");
        feed_side_inputs(dev, ex, &m.spec, &bufs, &mask, rows, t)?;
        ex.forward(dev)?;
        let p = ex.read(dev, *pooled)?;
        for (r, &i) in chunk.iter().enumerate() {
            out[i * h..(i + 1) * h].copy_from_slice(&p[r * h..(r + 1) * h]);
        }
    }
    if let Some(i) = out.iter().position(|x| !x.is_finite()) {
        return Err(Error::Msg(format!(
            "the embedding of text {} holds a non-finite value ({}) at dimension {}",
            i / h,
            out[i],
            i % h
        )));
    }
    Ok(out)
}

const SIDES: [&str; 3] = ["train.anchor", "train.positive", "train.negative"];

impl<'d> Task<'d> for LstEmbedTask<'d> {
    type Summary = EmbedSummary;

    fn device(&self) -> &'d Device {
        self.dev
    }

    fn prepare(&mut self, cfg: &TrainConfig, on: &mut dyn FnMut(Event)) -> Result<Vec<usize>> {
        let dev = self.dev;
        let (train, eval) = split_pairs(&self.train, self.eval.as_ref(), cfg, on)?;
        let (mut store, bcfg, prefix, tok) = open_model_as(dev, &self.model, cfg.max_length, cfg.weights.dtype()?)?;
        let (dims, weights) = self.matryoshka.resolve(bcfg.hidden)?;
        let spec = LstSpec::new(self.cfg.clone(), &bcfg, &prefix)?;
        let (blocks, truncated) = tokenize_blocks(&tok, &train)?;
        let (eval_set, te) = RetrievalSet::new(&tok, &eval)?;
        if truncated + te > 0 {
            on(Event::Warn(format!(
                "{} texts are longer than max_length {} tokens and were truncated",
                truncated + te,
                cfg.max_length
            )));
        }
        add_loss_constants(dev, &mut store, bcfg.hidden, &dims)?;
        let ckpt = rime_io::Checkpoint::open(&self.model)?;
        let mut get = |n: &str| -> Result<Vec<f32>> { Ok(ckpt.get_f32(&format!("{prefix}{n}"))?) };
        on(Event::Info(add_parameters(dev, &mut store, &mut get, &bcfg, &spec, cfg.seed)?));
        let trainable: usize = store.trainable().map(|(_, p)| p.tensor.numel()).sum();
        let frozen: usize = store.iter().filter(|(_, p)| !p.trainable).map(|(_, p)| p.tensor.numel()).sum();
        let k = blocks.len();
        on(Event::Info(format!(
            "lst: {trainable} trainable parameters, {frozen} frozen; {} {} pairs, {} eval queries over {} distinct \
             positives; matryoshka dims {dims:?}",
            train.len(),
            if k == 3 { "(anchor, positive, negative)" } else { "(anchor, positive)" },
            eval_set.gold.len(),
            eval_set.corpus.ids.len(),
        )));
        let eval_dims = eval_dims(&dims, bcfg.hidden);
        let mut m = LstModel::new(dev, store, bcfg, spec, cfg.rows(), cfg.max_length);
        let t0 = Instant::now();
        let mut sets: Vec<(&str, &Encoded)> = blocks.iter().enumerate().map(|(i, b)| (SIDES[i], b)).collect();
        sets.push(("eval.query", &eval_set.queries));
        sets.push(("eval.corpus", &eval_set.corpus));
        let n: usize = sets.iter().map(|(_, e)| e.ids.len()).sum();
        let mut feats: Vec<Option<FeatureSet>> = match &self.cache {
            FeatureCache::Off => sets.iter().map(|_| None).collect(),
            FeatureCache::Memory => {
                let v = sets.iter().map(|(_, e)| m.features_in_memory(e).map(Some)).collect::<Result<Vec<_>>>()?;
                let bytes: usize = v.iter().flatten().map(|f| f.bytes()).sum();
                on(Event::Info(format!(
                    "feature cache: {n} texts' encoder states in RAM ({:.1} MB f16) in {:.1} s",
                    bytes as f64 / 1e6,
                    t0.elapsed().as_secs_f64()
                )));
                v
            }
            FeatureCache::Dir(dir) => {
                let meta = cache_meta_sets(&model_fingerprint(&self.model)?, cfg.max_length, &m.spec, &sets);
                let (v, built) = open_or_build_sets(&mut m, dir, &meta, &sets)?;
                let bytes: usize = v.iter().map(|f| f.bytes()).sum();
                on(Event::Info(format!(
                    "feature cache {}: {n} texts' encoder states ({:.1} MB f16) {} in {:.1} s",
                    dir.display(),
                    bytes as f64 / 1e6,
                    if built { "computed and written" } else { "reused (fingerprint matches)" },
                    t0.elapsed().as_secs_f64()
                )));
                v.into_iter().map(Some).collect()
            }
        };
        let corpus_f = feats.pop().flatten();
        let query_f = feats.pop().flatten();
        let lens: Vec<usize> =
            (0..train.len()).map(|i| blocks.iter().map(|b| b.ids[i].len()).max().unwrap_or(1)).collect();
        self.loaded = Some(Loaded {
            m,
            blocks,
            block_f: feats,
            eval: eval_set,
            query_f,
            corpus_f,
            k,
            dims,
            weights,
            eval_dims,
            train_execs: HashMap::new(),
            eval_execs: HashMap::new(),
            trainable,
            frozen,
        });
        Ok(lens)
    }

    fn compile(&mut self, optim: OptimConfig, rows: usize) -> Result<()> {
        self.loaded_mut()?.m.set_optim(optim, rows)
    }

    fn bucket(&self, longest: usize) -> usize {
        LstModel::bucket_of(self.loaded.as_ref().map(|l| &l.m), longest)
    }

    fn executor(&mut self, key: usize) -> Result<(&mut Executor, &ParamStore)> {
        let dev = self.dev;
        let l = self.loaded_mut()?;
        if !l.train_execs.contains_key(&key) {
            let (b, k) = (l.m.rows, l.k);
            let mut g = Graph::new();
            let so = side_output(&mut g, &l.m.store, &l.m.spec, k * b, key, l.m.spec.cfg.dropout)?;
            let loss = loss_graph(&mut g, &l.m.store, so.pooled, b, k, &l.dims, &l.weights)?;
            let donor = l.train_execs.values().next().map(|(e, _)| e);
            let ex = Executor::new_sharing(dev, g, &l.m.store, Some(loss), &[], l.m.optim.clone(), donor)?;
            l.train_execs.insert(key, (ex, loss));
        }
        let (ex, _) = l.train_execs.get_mut(&key).expect("just built");
        Ok((ex, &l.m.store))
    }

    fn feed(&mut self, idx: &[usize], key: usize) -> Result<(&mut Executor, Var)> {
        let dev = self.dev;
        self.executor(key)?;
        let l = self.loaded_mut()?;
        let (b, k) = (l.m.rows, l.k);
        if idx.len() > b {
            return Err(Error::Msg(format!("a batch of {} examples in a graph of {b}", idx.len())));
        }
        // Each side's rows in its own block of b rows: [anchors; positives; negatives].
        let mut bufs: Vec<Vec<f32>> = vec![];
        let mut mask = vec![];
        for (block, f) in l.blocks.iter().zip(&l.block_f) {
            let (bs, ms) = l.m.side_inputs(block, idx, key, f.as_ref())?;
            if bufs.is_empty() {
                bufs = bs;
            } else {
                bufs.iter_mut().zip(bs).for_each(|(a, x)| a.extend(x));
            }
            mask.extend(ms);
        }
        let spec = l.m.spec.clone();
        let (ex, loss) = l.train_execs.get_mut(&key).expect("built above");
        feed_side_inputs(dev, ex, &spec, &bufs, &mask, k * b, key)?;
        LossFeeds::new(idx.len(), b, k).feed(dev, ex)?;
        Ok((ex, *loss))
    }

    fn any_executor(&self) -> Option<&Executor> {
        self.loaded.as_ref().and_then(|l| l.train_execs.values().next()).map(|(e, _)| e)
    }

    fn store(&self) -> &ParamStore {
        match &self.loaded {
            Some(l) => &l.m.store,
            None => empty_store(),
        }
    }

    fn evaluate(&mut self) -> Result<Option<Evaluation>> {
        let l = self.loaded_mut()?;
        let q = embed(&mut l.m, &mut l.eval_execs, &l.eval.queries, l.query_f.as_ref())?;
        let c = embed(&mut l.m, &mut l.eval_execs, &l.eval.corpus, l.corpus_f.as_ref())?;
        let m = retrieval_metrics(&q, &c, l.m.bcfg.hidden, &l.eval.gold, &l.eval_dims);
        Ok(Some(retrieval_evaluation(&m, l.eval.gold.len())?))
    }

    fn metric(&self) -> Metric {
        Metric { name: "eval_mrr", higher_is_better: true }
    }

    fn supports_micro_batches(&self) -> bool {
        false // in-batch negatives: the loss of a batch is not a mean over its parts
    }

    fn adapter(&self) -> Result<PeftAdapter> {
        self.adapter_value()
    }

    fn save_adapter(&self, dir: &Path) -> Result<()> {
        crate::trainer::save_peft(&self.adapter_value()?, dir)
    }

    fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let dev = self.dev;
        let (acfg, _) = classifier::load_adapter(dev, &mut self.loaded_mut()?.m.store, dir)?;
        check_adapter(&acfg, &self.loaded()?.m.spec, dir)
    }

    fn adapter_folder(&self) -> &'static str {
        "best"
    }

    fn title(&self) -> String {
        let data = self.train.source().and_then(|p| p.file_name()).map(|f| f.to_string_lossy().into_owned());
        let dims = self.loaded.as_ref().map(|l| l.dims.clone()).unwrap_or_default();
        format!(
            "{} · lst · embedding{} · {}",
            self.model.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            if dims.len() > 1 { " (matryoshka)" } else { "" },
            data.unwrap_or_else(|| format!("{} pairs", self.train.len()))
        )
    }

    fn summary(&self, run: &RunStats) -> EmbedSummary {
        let l = self.loaded.as_ref();
        let eval_dims = l.map(|l| l.eval_dims.clone()).unwrap_or_default();
        let retrieval =
            run.best.as_ref().or(run.last.as_ref()).map(|e| from_values(&e.values, &eval_dims)).unwrap_or_default();
        EmbedSummary {
            method: "lst".into(),
            matryoshka_dims: l.map(|l| l.dims.clone()).unwrap_or_default(),
            matryoshka_weights: l.map(|l| l.weights.clone()).unwrap_or_default(),
            eval_mrr: retrieval.last().map_or(f64::NAN, |r| r.mrr),
            retrieval,
            eval_queries: l.map_or(0, |l| l.eval.gold.len()),
            eval_corpus: l.map_or(0, |l| l.eval.corpus.ids.len()),
            hard_negatives: l.is_some_and(|l| l.k == 3),
            best_epoch: run.best_epoch.unwrap_or(0),
            steps: run.steps,
            first_loss: run.first_loss,
            last_loss: run.last_loss,
            train_examples_per_s: run.train_examples_per_s,
            train_seconds: run.train_seconds,
            trainable_params: l.map_or(0, |l| l.trainable),
            frozen_params: l.map_or(0, |l| l.frozen),
            dispatches_per_step: run.dispatches_per_step,
            memory: run.memory.clone(),
        }
    }
}
