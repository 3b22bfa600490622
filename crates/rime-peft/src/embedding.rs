//! Sentence-embedding fine-tuning: contrastive training on (anchor, positive[, hard negative]) pairs with
//! in-batch negatives (sentence-transformers' `MultipleNegativesRankingLoss`: cross-entropy over scaled
//! cosine similarities, scale 20), optionally as a Matryoshka loss (Kusupati et al.: the same loss on nested
//! prefixes of the embedding, summed with weights), and retrieval evaluation (recall@1, recall@10, MRR) at
//! every nested dimension.
//!
//! The training graph of a batch of B examples with k texts each (k = 2, or 3 with hard negatives): one
//! encoder pass over the stacked rows `[anchors; positives; negatives]` (k·B rows padded to one length
//! bucket), the mean pool [kB, H], the anchor rows [B, H] and the candidate rows [(k−1)B, H] picked by
//! matmuls with fed 0/1 selection matrices; for each dim d the first d columns (a matmul with a frozen
//! prefix identity [H, d]), each row scaled to unit length (an RMS norm with a frozen gamma of 1/√d: x/‖x‖ up to
//! an eps of 1e-24 under the square root, as `F.normalize`'s 1e-12 floor on ‖x‖), scores 20·aₙ·cₙᵀ [B, (k−1)B]
//! plus a fed additive mask (−1e9 on the columns of a short batch's missing rows), and
//! `loss_d = cross_entropy(scores, arange(B))` (a missing anchor row's target is ignored). The loss is
//! Σ w_d · loss_d. A short last batch thus gives exactly the loss of its rows alone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rime_graph::{Executor, Graph, OptimConfig, ParamStore, Var};
use rime_io::peft::PeftAdapter;
use rime_io::tokenizer::{Padding, Tokenizer};
use rime_kernels::{DType, Device};
use rime_models::bert::{self, BertConfig};
use rime_models::{LinearHook, VirtualTokens};
use serde::Serialize;

use crate::classifier::{self, EvalMetrics, Method};
use crate::classify::{empty_store, make_batch, open_model_as, Encoded};
use crate::config::TrainConfig;
use crate::methods::TuningMethod;
use crate::trainer::{bucket, Evaluation, Event, Metric, RunStats, Task};
use crate::{Error, Result};

/// sentence-transformers' `MultipleNegativesRankingLoss` default scale (a temperature of 0.05).
pub const SCALE: f32 = 20.0;
/// The additive mask on the score columns of a short batch's missing candidate rows.
pub const MASKED: f32 = -1e9;
/// Fed inputs of the loss graph: anchor selection [B, kB], candidate selection [(k−1)B, kB], the column mask
/// [B, (k−1)B] and the targets [B] (i32).
pub const ANCHOR_ROWS: &str = "rime.embed.anchor_rows";
pub const CANDIDATE_ROWS: &str = "rime.embed.candidate_rows";
pub const COLUMN_MASK: &str = "rime.embed.column_mask";
pub const TARGETS: &str = "rime.embed.targets";
/// The adapter config field that records the trained Matryoshka dims (a `rime_*` key: saved in `rime.json`
/// beside adapter_config.json, where peft's config classes do not see it).
pub const DIMS_FIELD: &str = "rime_matryoshka_dims";
/// peft's task type of a head-less encoder adapter.
pub const TASK_TYPE: &str = "FEATURE_EXTRACTION";

/// Which columns of a JSONL / CSV / TSV file hold the pair. Default: `anchor`, `positive`, `negative`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairColumns {
    pub anchor: String,
    pub positive: String,
    /// The hard-negative column, read when the file has it (every row then needs one); None: never read.
    pub negative: Option<String>,
}

impl Default for PairColumns {
    fn default() -> Self {
        PairColumns { anchor: "anchor".into(), positive: "positive".into(), negative: Some("negative".into()) }
    }
}

/// (anchor, positive) pairs, optionally with a hard negative each, in memory or read from a file (rows then
/// remember their lines, and errors name the file and line).
#[derive(Debug, Clone, Default)]
pub struct PairData {
    pub anchors: Vec<String>,
    pub positives: Vec<String>,
    /// One hard negative per pair, when the data has them.
    pub negatives: Option<Vec<String>>,
    source: Option<PathBuf>,
    lines: Vec<u64>,
    /// The column names (for messages): anchor, positive, negative.
    names: [String; 3],
}

impl PairData {
    /// Pairs from memory (checked when training starts: same counts, no empty side).
    pub fn new(anchors: Vec<String>, positives: Vec<String>) -> PairData {
        PairData {
            anchors,
            positives,
            names: ["anchor".into(), "positive".into(), "negative".into()],
            ..Default::default()
        }
    }

    /// The same pairs with one hard negative each.
    pub fn with_negatives(mut self, negatives: Vec<String>) -> PairData {
        self.negatives = Some(negatives);
        self
    }

    /// Read `path` (.jsonl, .csv or .tsv). A missing anchor or positive column, or an empty side, is an error
    /// naming the file and line; the negative column is read when [`PairColumns::negative`] names one the file
    /// has (the header of a CSV/TSV, the keys of a JSONL file's first row).
    pub fn from_file(path: impl AsRef<Path>, columns: &PairColumns) -> Result<PairData> {
        use rime_io::dataset::{Columns, Dataset};
        let path = path.as_ref();
        let cols = Columns { text: columns.anchor.clone(), text_pair: Some(columns.positive.clone()), label: None };
        let ds = Dataset::load(path, &cols)?;
        let negatives = match &columns.negative {
            Some(n) if ds.columns.iter().any(|c| c == n) => {
                let nc = Columns { text: n.clone(), text_pair: None, label: None };
                let nd = Dataset::load(path, &nc)?;
                if nd.len() != ds.len() {
                    return Err(Error::Msg(format!(
                        "{}: {} rows with column `{n}` but {} with `{}`",
                        path.display(),
                        nd.len(),
                        ds.len(),
                        columns.anchor
                    )));
                }
                Some(nd.examples.into_iter().map(|e| e.text).collect())
            }
            _ => None,
        };
        let data = PairData {
            lines: ds.examples.iter().map(|e| e.line).collect(),
            anchors: ds.examples.iter().map(|e| e.text.clone()).collect(),
            positives: ds.examples.into_iter().map(|e| e.text_pair.unwrap_or_default()).collect(),
            negatives,
            source: Some(path.to_path_buf()),
            names: [
                columns.anchor.clone(),
                columns.positive.clone(),
                columns.negative.clone().unwrap_or_else(|| "negative".into()),
            ],
        };
        data.check("train")?;
        Ok(data)
    }

    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    /// Whether every pair has a hard negative.
    pub fn has_negatives(&self) -> bool {
        self.negatives.is_some()
    }

    /// The file the pairs were read from.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// Where row `i` is, for messages: `FILE: line N` or `<name in memory>: row N`.
    fn at(&self, name: &str, i: usize) -> String {
        match &self.source {
            Some(p) => format!("{}: line {}", p.display(), self.lines.get(i).copied().unwrap_or(i as u64 + 1)),
            None => format!("<{name} pairs in memory>: row {}", i + 1),
        }
    }

    /// The data's name in messages: its file, or `<name pairs in memory>`.
    fn label(&self, name: &str) -> String {
        match &self.source {
            Some(p) => p.display().to_string(),
            None => format!("<{name} pairs in memory>"),
        }
    }

    /// Same counts on every side, at least one pair, no empty text.
    pub fn check(&self, name: &'static str) -> Result<()> {
        let n = self.anchors.len();
        if n == 0 {
            return Err(Error::invalid(name, format!("{}: has no pairs", self.label(name))));
        }
        let sides: [(&str, Option<&Vec<String>>); 3] = [
            ("anchors", Some(&self.anchors)),
            ("positives", Some(&self.positives)),
            ("negatives", self.negatives.as_ref()),
        ];
        for (what, v) in sides {
            if let Some(v) = v.filter(|v| v.len() != n) {
                return Err(Error::invalid(name, format!("{}: {n} anchors but {} {what}", self.label(name), v.len())));
            }
        }
        for i in 0..n {
            let mut texts = vec![(&self.names[0], &self.anchors[i]), (&self.names[1], &self.positives[i])];
            if let Some(neg) = &self.negatives {
                texts.push((&self.names[2], &neg[i]));
            }
            for (col, t) in texts {
                if t.trim().is_empty() {
                    return Err(Error::Msg(format!(
                        "{}: empty text in column `{col}` (every side needs one)",
                        self.at(name, i)
                    )));
                }
            }
        }
        Ok(())
    }

    /// The rows `idx`, in that order.
    fn pick(&self, idx: &[usize]) -> PairData {
        PairData {
            anchors: idx.iter().map(|&i| self.anchors[i].clone()).collect(),
            positives: idx.iter().map(|&i| self.positives[i].clone()).collect(),
            negatives: self.negatives.as_ref().map(|n| idx.iter().map(|&i| n[i].clone()).collect()),
            source: self.source.clone(),
            lines: idx.iter().map(|&i| self.lines.get(i).copied().unwrap_or(i as u64 + 1)).collect(),
            names: self.names.clone(),
        }
    }

    /// A seeded held-out split (train, eval), as [`rime_io::dataset::split_indices`].
    pub fn split(&self, eval_fraction: f64, seed: u64) -> Result<(PairData, PairData)> {
        if !(eval_fraction > 0.0 && eval_fraction < 1.0) {
            return Err(Error::invalid("eval_fraction", format!("{eval_fraction}: must be strictly between 0 and 1")));
        }
        if self.len() < 2 {
            return Err(Error::invalid(
                "eval",
                format!("{}: cannot split {} pair(s) into train and eval", self.label("train"), self.len()),
            ));
        }
        let (tr, ev) = rime_io::dataset::split_indices(self.len(), eval_fraction, seed);
        Ok((self.pick(&tr), self.pick(&ev)))
    }
}

/// The Matryoshka loss: nested prefix dims of the embedding, each with a weight. Default (no dims): the full
/// hidden size alone, which is plain MNRL.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MatryoshkaConfig {
    /// Strictly increasing, each in 1..=hidden. Empty: `[hidden]`.
    pub dims: Vec<usize>,
    /// One weight per dim (finite, ≥ 0, not all 0). Empty: 1 each (sentence-transformers' default).
    pub weights: Vec<f32>,
}

impl MatryoshkaConfig {
    /// Dims with equal weights.
    pub fn dims(dims: Vec<usize>) -> MatryoshkaConfig {
        MatryoshkaConfig { dims, weights: vec![] }
    }

    /// The dims and weights for a model of `hidden` dims, checked.
    pub fn resolve(&self, hidden: usize) -> Result<(Vec<usize>, Vec<f32>)> {
        let dims = if self.dims.is_empty() { vec![hidden] } else { self.dims.clone() };
        let list = |v: &[usize]| v.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
        for (i, &d) in dims.iter().enumerate() {
            if d == 0 || d > hidden {
                return Err(Error::invalid(
                    "matryoshka_dims",
                    format!("{}: dim {d} is outside 1..={hidden} (the model's hidden size)", list(&dims)),
                ));
            }
            if i > 0 && d <= dims[i - 1] {
                return Err(Error::invalid(
                    "matryoshka_dims",
                    format!("{}: must be strictly increasing ({} then {d})", list(&dims), dims[i - 1]),
                ));
            }
        }
        let weights = if self.weights.is_empty() { vec![1.0; dims.len()] } else { self.weights.clone() };
        if weights.len() != dims.len() {
            return Err(Error::invalid(
                "matryoshka_weights",
                format!(
                    "has {} values for {} dims ({}); give one weight per dim",
                    weights.len(),
                    dims.len(),
                    list(&dims)
                ),
            ));
        }
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) || weights.iter().all(|&w| w == 0.0) {
            return Err(Error::invalid(
                "matryoshka_weights",
                format!("{weights:?}: must be finite, >= 0 and not all 0"),
            ));
        }
        Ok((dims, weights))
    }
}

/// The dims an evaluation reports: the trained dims, the powers of two from 32 below the hidden size, and
/// the hidden size (for MiniLM: 32, 64, 128, 256, 384, plus any other trained dim).
pub fn eval_dims(trained: &[usize], hidden: usize) -> Vec<usize> {
    let mut d: Vec<usize> = trained.iter().copied().filter(|&d| d >= 1 && d <= hidden).collect();
    let mut p = 32;
    while p < hidden {
        d.push(p);
        p *= 2;
    }
    d.push(hidden);
    d.sort_unstable();
    d.dedup();
    d
}

/// The frozen constants of the loss for `dims` of a `hidden`-wide embedding: a prefix identity [H, d] per dim
/// below H and a gamma of 1/√d per dim (added once; never trained or saved).
pub fn add_loss_constants(dev: &Device, store: &mut ParamStore, hidden: usize, dims: &[usize]) -> Result<()> {
    for &d in dims {
        if d < hidden && store.find(&prefix_name(d)).is_none() {
            let mut p = vec![0f32; hidden * d];
            for j in 0..d {
                p[j * d + j] = 1.0;
            }
            store.add_f32(dev, &prefix_name(d), &p, &[hidden, d], false)?;
        }
        if store.find(&gamma_name(d)).is_none() {
            store.add_f32(dev, &gamma_name(d), &vec![1.0 / (d as f32).sqrt(); d], &[d], false)?;
        }
    }
    Ok(())
}

fn prefix_name(d: usize) -> String {
    format!("rime.embed.prefix.{d}")
}

fn gamma_name(d: usize) -> String {
    format!("rime.embed.gamma.{d}")
}

/// The MNRL (+ Matryoshka) loss over `pooled` [k·b, H] (rows: b anchors, b positives, b negatives when k = 3)
/// as the module doc says; needs [`add_loss_constants`] for `dims`, and the feeds of [`LossFeeds`].
pub fn loss_graph(
    g: &mut Graph,
    store: &ParamStore,
    pooled: Var,
    b: usize,
    k: usize,
    dims: &[usize],
    weights: &[f32],
) -> Result<Var> {
    let h = g.shape(pooled)[1];
    let c = (k - 1) * b;
    let sa = g.input(ANCHOR_ROWS, &[b, k * b], DType::F32);
    let sc = g.input(CANDIDATE_ROWS, &[c, k * b], DType::F32);
    let mask = g.input(COLUMN_MASK, &[b, c], DType::F32);
    let targets = g.input(TARGETS, &[b], DType::I32);
    let a = g.matmul(sa, pooled)?;
    let cand = g.matmul(sc, pooled)?;
    let mut total: Option<Var> = None;
    for (&d, &w) in dims.iter().zip(weights) {
        let (ad, cd) = if d < h {
            let p = g.param(store, &prefix_name(d))?;
            (g.matmul(a, p)?, g.matmul(cand, p)?)
        } else {
            (a, cand)
        };
        let gamma = g.param(store, &gamma_name(d))?;
        // x·(1/√d)/√(‖x‖²/d + eps) = x/√(‖x‖² + d·eps): d·eps = 1e-24, F.normalize's floor of 1e-12 on ‖x‖.
        let eps = 1e-24 / d as f32;
        let an = g.rmsnorm(ad, gamma, eps)?;
        let cn = g.rmsnorm(cd, gamma, eps)?;
        let s = g.matmul_ex(an, cn, None, false, true)?;
        let s = g.scale(s, SCALE);
        let s = g.add(s, mask)?;
        let l = g.cross_entropy(s, targets, -100)?;
        let l = g.scale(l, w);
        total = Some(match total {
            Some(t) => g.add(t, l)?,
            None => l,
        });
    }
    total.ok_or_else(|| Error::invalid("matryoshka_dims", "is empty"))
}

/// The fed inputs of [`loss_graph`] for a batch of `n` real examples in a graph of `b` (n ≤ b) with `k` texts each.
#[derive(Debug, Clone, PartialEq)]
pub struct LossFeeds {
    pub anchor_rows: Vec<f32>,
    pub candidate_rows: Vec<f32>,
    pub column_mask: Vec<f32>,
    pub targets: Vec<i32>,
}

impl LossFeeds {
    pub fn new(n: usize, b: usize, k: usize) -> LossFeeds {
        let (rows, c) = (k * b, (k - 1) * b);
        let mut anchor_rows = vec![0f32; b * rows];
        for i in 0..n {
            anchor_rows[i * rows + i] = 1.0;
        }
        let mut candidate_rows = vec![0f32; c * rows];
        let mut column_mask = vec![0f32; b * c];
        for j in 0..c {
            if j % b < n {
                candidate_rows[j * rows + b + j] = 1.0;
            } else {
                for i in 0..b {
                    column_mask[i * c + j] = MASKED;
                }
            }
        }
        let targets = (0..b).map(|i| if i < n { i as i32 } else { -100 }).collect();
        LossFeeds { anchor_rows, candidate_rows, column_mask, targets }
    }

    pub fn feed(&self, dev: &Device, ex: &Executor) -> Result<()> {
        ex.feed_f32(dev, ANCHOR_ROWS, &self.anchor_rows)?;
        ex.feed_f32(dev, CANDIDATE_ROWS, &self.candidate_rows)?;
        ex.feed_f32(dev, COLUMN_MASK, &self.column_mask)?;
        ex.feed_i32(dev, TARGETS, &self.targets)?;
        Ok(())
    }
}

/// Retrieval scores at one dim.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RetrievalMetrics {
    pub dim: usize,
    pub recall_at_1: f64,
    pub recall_at_10: f64,
    pub mrr: f64,
}

/// Retrieval of `queries` [q, H] against `corpus` [c, H] (row-major, H = `hidden`), query i's answer being
/// corpus row `gold[i]`: for each dim d, both truncated to their first d values and scaled to unit length
/// (x / max(‖x‖, 1e-12)), cosine scores, the answer's 0-based rank = the number of corpus rows scoring
/// strictly higher; recall@1, recall@10 and the mean reciprocal rank over the full ranking (the protocol of
/// scripts/st_mnrl_baseline.py). Deterministic (f64 sums in a fixed order).
pub fn retrieval_metrics(
    queries: &[f32],
    corpus: &[f32],
    hidden: usize,
    gold: &[usize],
    dims: &[usize],
) -> Vec<RetrievalMetrics> {
    let norm = |rows: &[f32], d: usize| -> Vec<f64> {
        let mut out = Vec::with_capacity(rows.len() / hidden * d);
        for r in rows.chunks(hidden) {
            let n = r[..d].iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt().max(1e-12);
            out.extend(r[..d].iter().map(|&x| x as f64 / n));
        }
        out
    };
    let mut out = Vec::new();
    for &d in dims {
        let (q, c) = (norm(queries, d), norm(corpus, d));
        let (mut r1, mut r10, mut rr) = (0f64, 0f64, 0f64);
        for (i, &g) in gold.iter().enumerate() {
            let qi = &q[i * d..(i + 1) * d];
            let score = |j: usize| -> f64 { qi.iter().zip(&c[j * d..(j + 1) * d]).map(|(a, b)| a * b).sum() };
            let sg = score(g);
            let rank = (0..c.len() / d).filter(|&j| j != g && score(j) > sg).count();
            r1 += (rank < 1) as u8 as f64;
            r10 += (rank < 10) as u8 as f64;
            rr += 1.0 / (rank as f64 + 1.0);
        }
        let n = gold.len().max(1) as f64;
        out.push(RetrievalMetrics { dim: d, recall_at_1: r1 / n, recall_at_10: r10 / n, mrr: rr / n });
    }
    out
}

/// The retrieval set of held-out pairs: queries = the anchors, corpus = the distinct positives (first
/// occurrence order), gold = each anchor's positive in the corpus.
pub fn retrieval_set(data: &PairData) -> (Vec<String>, Vec<String>, Vec<usize>) {
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut corpus = Vec::new();
    let mut gold = Vec::new();
    for p in &data.positives {
        let next = corpus.len();
        let i = *index.entry(p.as_str()).or_insert(next);
        if i == next {
            corpus.push(p.clone());
        }
        gold.push(i);
    }
    (data.anchors.clone(), corpus, gold)
}

/// A task's [`Evaluation`] of per-dim retrieval metrics over `examples` queries: MRR at the full dim (the last)
/// is the score; the shared metrics record carries recall@1 at the full dim as `accuracy` and MRR as `macro_f1`
/// (see [`EmbedSummary`] for the real names); there is no eval loss.
pub(crate) fn retrieval_evaluation(m: &[RetrievalMetrics], examples: usize) -> Result<Evaluation> {
    let full = m.last().copied().ok_or_else(|| Error::Msg("no eval dim".into()))?;
    let metrics = EvalMetrics { accuracy: full.recall_at_1, macro_f1: full.mrr, loss: f64::NAN, examples };
    Ok(Evaluation { metrics, score: full.mrr, values: metric_values(m) })
}

/// Metric names in `metrics.jsonl` and the history: `eval_mrr` (the full dim: what picks the best adapter),
/// and per dim D `eval_recall@1@D`, `eval_recall@10@D`, `eval_mrr@D`.
pub fn metric_values(m: &[RetrievalMetrics]) -> Vec<(String, f64)> {
    let mut v = Vec::new();
    if let Some(full) = m.last() {
        v.push(("eval_mrr".into(), full.mrr));
    }
    for r in m {
        v.push((format!("eval_recall@1@{}", r.dim), r.recall_at_1));
        v.push((format!("eval_recall@10@{}", r.dim), r.recall_at_10));
        v.push((format!("eval_mrr@{}", r.dim), r.mrr));
    }
    v
}

/// [`metric_values`] read back.
pub(crate) fn from_values(values: &[(String, f64)], dims: &[usize]) -> Vec<RetrievalMetrics> {
    let get = |k: String| values.iter().find(|(n, _)| *n == k).map_or(f64::NAN, |(_, v)| *v);
    dims.iter()
        .map(|&d| RetrievalMetrics {
            dim: d,
            recall_at_1: get(format!("eval_recall@1@{d}")),
            recall_at_10: get(format!("eval_recall@10@{d}")),
            mrr: get(format!("eval_mrr@{d}")),
        })
        .collect()
}

/// Tokenize single texts (token types zero).
pub(crate) fn tokenize(tok: &Tokenizer, texts: &[String]) -> Result<(Encoded, usize)> {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let enc = tok.encode_batch(&refs, None, Padding::Longest)?;
    let t = enc.seq_len;
    let mut out = Encoded { ids: vec![], types: vec![], labels: vec![-100; texts.len()] };
    for (r, len) in enc.lengths().into_iter().enumerate() {
        out.ids.push(enc.input_ids[r * t..r * t + len].to_vec());
        out.types.push(vec![0; len]);
    }
    Ok((out, enc.truncated.iter().filter(|&&x| x).count()))
}

/// Feed an encoder graph's inputs for `rows` rows padded to `t` (ids, types, 0/1 mask row-major).
#[allow(clippy::too_many_arguments)]
fn feed_encoder(
    dev: &Device,
    ex: &Executor,
    ids: &[u32],
    types: &[u32],
    mask: &[u32],
    rows: usize,
    t: usize,
    vt: VirtualTokens,
) -> Result<()> {
    let (types, pos, maskf, pool) = bert::virtual_inputs(types, mask, rows, t, vt);
    ex.feed_u32(dev, bert::INPUT_IDS, ids)?;
    ex.feed_u32(dev, bert::TOKEN_TYPE_IDS, &types)?;
    ex.feed_u32(dev, bert::POSITION_IDS, &pos)?;
    ex.feed_f32(dev, bert::ATTENTION_MASK, &maskf)?;
    ex.feed_f32(dev, bert::POOL_WEIGHTS, &pool)?;
    Ok(())
}

/// Forward-only encoders per length bucket that return the mean pool: embeddings of tokenized texts.
struct Embedder {
    batch: usize,
    max_length: usize,
    execs: HashMap<usize, (Executor, Var)>,
}

impl Embedder {
    fn new(batch: usize, max_length: usize) -> Embedder {
        Embedder { batch, max_length, execs: HashMap::new() }
    }

    /// Mean-pooled embeddings [n, H] of `enc`, in order.
    #[allow(clippy::too_many_arguments)]
    fn embed(
        &mut self,
        dev: &Device,
        store: &ParamStore,
        cfg: &BertConfig,
        prefix: &str,
        hook: &dyn LinearHook,
        enc: &Encoded,
    ) -> Result<Vec<f32>> {
        let n = enc.ids.len();
        let h = cfg.hidden;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| enc.ids[i].len());
        let mut out = vec![0f32; n * h];
        let b = self.batch;
        for chunk in order.chunks(b) {
            let longest = chunk.iter().map(|&i| enc.ids[i].len()).max().unwrap_or(1);
            let t = bucket(longest, self.max_length);
            if let std::collections::hash_map::Entry::Vacant(slot) = self.execs.entry(t) {
                let mut g = Graph::new();
                let e = bert::build(&mut g, store, cfg, prefix, b, t, hook)?;
                let ex = Executor::new(dev, g, store, None, &[e.pooled], None)?;
                slot.insert((ex, e.pooled));
            }
            let (ex, pooled) = self.execs.get_mut(&t).expect("just built");
            let (ids, types, mask, _) = make_batch(enc, chunk, b, t);
            feed_encoder(dev, ex, &ids, &types, &mask, b, t, hook.virtual_tokens())?;
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
}

/// The tokenized held-out retrieval set.
pub(crate) struct RetrievalSet {
    pub(crate) queries: Encoded,
    pub(crate) corpus: Encoded,
    pub(crate) gold: Vec<usize>,
}

impl RetrievalSet {
    pub(crate) fn new(tok: &Tokenizer, data: &PairData) -> Result<(RetrievalSet, usize)> {
        let (q, c, gold) = retrieval_set(data);
        let (queries, t1) = tokenize(tok, &q)?;
        let (corpus, t2) = tokenize(tok, &c)?;
        Ok((RetrievalSet { queries, corpus, gold }, t1 + t2))
    }

    #[allow(clippy::too_many_arguments)]
    fn score(
        &self,
        emb: &mut Embedder,
        dev: &Device,
        store: &ParamStore,
        cfg: &BertConfig,
        prefix: &str,
        hook: &dyn LinearHook,
        dims: &[usize],
    ) -> Result<Vec<RetrievalMetrics>> {
        let q = emb.embed(dev, store, cfg, prefix, hook, &self.queries)?;
        let c = emb.embed(dev, store, cfg, prefix, hook, &self.corpus)?;
        Ok(retrieval_metrics(&q, &c, cfg.hidden, &self.gold, dims))
    }
}

/// Retrieval scores of the model in `model` (BERT folder), with the adapter folder `adapter` applied or
/// frozen (None: the "frozen" row of a comparison), on held-out `data` at each of `dims` (empty: [`eval_dims`]
/// of the adapter's trained dims), in batches of `batch` texts of at most `max_length` tokens. A `RIME_LST`
/// adapter embeds through its side network ([`crate::lst_embed::SideEncoder`]).
pub fn evaluate_retrieval(
    dev: &Device,
    model: &Path,
    adapter: Option<&Path>,
    data: &PairData,
    dims: &[usize],
    batch: usize,
    max_length: usize,
) -> Result<Vec<RetrievalMetrics>> {
    crate::config::at_least("batch_size", batch, 1)?;
    crate::config::check_max_length(max_length)?;
    data.check("eval")?;
    let (mut store, cfg, prefix, tok) = open_model_as(dev, model, max_length, DType::F32)?;
    let (hook, trained, lst) = match adapter {
        Some(dir) => {
            let (acfg, _) = classifier::load_adapter(dev, &mut store, dir)?;
            let lst = acfg.peft_type == crate::methods::lst::PEFT_TYPE;
            (classifier::hook_for_adapter(&acfg)?, trained_dims(&acfg), lst.then_some(acfg))
        }
        None => (classifier::hook_for(&Method::Probe), None, None),
    };
    classifier::check_virtual_fit(hook.virtual_tokens(), max_length.min(cfg.max_positions), &cfg)?;
    let dims = if dims.is_empty() { eval_dims(&trained.unwrap_or_default(), cfg.hidden) } else { dims.to_vec() };
    if let Some(&d) = dims.iter().find(|&&d| d == 0 || d > cfg.hidden) {
        return Err(Error::invalid("dims", format!("{d}: outside 1..={} (the model's hidden size)", cfg.hidden)));
    }
    let (set, _) = RetrievalSet::new(&tok, data)?;
    if let Some(acfg) = lst {
        // A ladder side-tuning adapter: the side network's pooled output (the encoder's linears are untouched).
        let mut side = crate::lst_embed::SideEncoder::new(dev, store, &cfg, &prefix, &acfg, batch, max_length)
            .map_err(|e| {
                Error::Msg(format!("{}: {e}", adapter.map(|p| p.display().to_string()).unwrap_or_default()))
            })?;
        let q = side.embed(&set.queries)?;
        let c = side.embed(&set.corpus)?;
        return Ok(retrieval_metrics(&q, &c, cfg.hidden, &set.gold, &dims));
    }
    let mut emb = Embedder::new(batch, max_length);
    set.score(&mut emb, dev, &store, &cfg, &prefix, hook.as_ref(), &dims)
}

/// The trained Matryoshka dims an adapter records ([`DIMS_FIELD`]), if any.
pub fn trained_dims(cfg: &rime_io::peft::AdapterConfig) -> Option<Vec<usize>> {
    let a = cfg.raw.get(DIMS_FIELD)?.as_array()?;
    a.iter().map(|v| v.as_u64().map(|x| x as usize)).collect()
}

/// The summary of an embedding run (`metrics.json` without the history).
#[derive(Debug, Clone, Serialize)]
pub struct EmbedSummary {
    pub method: String,
    /// The trained dims and their weights.
    pub matryoshka_dims: Vec<usize>,
    pub matryoshka_weights: Vec<f32>,
    /// MRR at the full dim of the kept adapter (the best epoch's).
    pub eval_mrr: f64,
    /// Retrieval of the kept adapter at each evaluated dim.
    pub retrieval: Vec<RetrievalMetrics>,
    pub eval_queries: usize,
    pub eval_corpus: usize,
    pub hard_negatives: bool,
    pub best_epoch: usize,
    pub steps: usize,
    pub first_loss: f32,
    pub last_loss: f32,
    pub train_examples_per_s: f64,
    pub train_seconds: f64,
    pub trainable_params: usize,
    pub frozen_params: usize,
    pub dispatches_per_step: usize,
    pub memory: String,
}

/// The train and eval pairs of an embedding run: `eval`, or a held-out part of `train`; refused when the
/// training pairs are fewer than a batch (in-batch negatives need full batches).
pub(crate) fn split_pairs(
    train: &PairData,
    eval: Option<&PairData>,
    cfg: &TrainConfig,
    on: &mut dyn FnMut(Event),
) -> Result<(PairData, PairData)> {
    train.check("train")?;
    let (train, eval) = match eval {
        Some(e) => {
            e.check("eval")?;
            (train.clone(), e.clone())
        }
        None => {
            on(Event::Info(format!(
                "no eval set: holding out {:.0}% of {} for evaluation",
                cfg.eval_fraction * 100.0,
                train.label("train")
            )));
            train.split(cfg.eval_fraction, cfg.seed)?
        }
    };
    if train.len() < cfg.batch_size {
        return Err(Error::invalid(
            "batch_size",
            format!(
                "{}: more than the {} training pairs of {} (in-batch negatives need full batches); lower it",
                cfg.batch_size,
                train.len(),
                train.label("train")
            ),
        ));
    }
    Ok((train, eval))
}

/// The tokenized sides of the training pairs, in the order the loss stacks them: anchors, positives and the
/// hard negatives when there are; with the number of truncated texts.
pub(crate) fn tokenize_blocks(tok: &Tokenizer, train: &PairData) -> Result<(Vec<Encoded>, usize)> {
    let mut blocks = vec![];
    let mut truncated = 0;
    let mut sides = vec![&train.anchors, &train.positives];
    if let Some(n) = &train.negatives {
        sides.push(n);
    }
    for side in sides {
        let (e, t) = tokenize(tok, side)?;
        truncated += t;
        blocks.push(e);
    }
    Ok((blocks, truncated))
}

/// Make a method's adapter value an embedding adapter: no head, `task_type` [`TASK_TYPE`], the trained dims
/// ([`DIMS_FIELD`]) and their weights.
pub(crate) fn mark_embedding_adapter(ad: &mut PeftAdapter, dims: &[usize], weights: &[f32]) {
    ad.config.task_type = Some(TASK_TYPE.into());
    ad.config.modules_to_save = vec![];
    ad.config.raw.insert(DIMS_FIELD.into(), serde_json::json!(dims));
    ad.config.raw.insert("rime_matryoshka_weights".into(), serde_json::json!(weights));
}

/// A model ready to train: what [`EmbedTask::prepare`] loads.
struct Loaded {
    store: ParamStore,
    cfg: BertConfig,
    prefix: String,
    hook: Box<dyn LinearHook>,
    eval_hook: Box<dyn LinearHook>,
    method: Method,
    /// Texts per example (2, or 3 with hard negatives).
    k: usize,
    rows: usize,
    max_length: usize,
    optim: Option<OptimConfig>,
    execs: HashMap<usize, (Executor, Var)>,
    blocks: Vec<Encoded>,
    eval: RetrievalSet,
    embedder: Embedder,
    dims: Vec<usize>,
    weights: Vec<f32>,
    eval_dims: Vec<usize>,
    trainable: usize,
    frozen: usize,
}

/// Contrastive fine-tuning of an encoder for sentence embeddings ([`crate::train`] drives it): any tuning
/// method but [`Method::Probe`] (which has no head here to train) and [`Method::Lst`] (refused: its side network
/// trains in [`crate::lst_embed::LstEmbedTask`]), MNRL with in-batch negatives (and hard
/// negatives when the data has them), optionally Matryoshka; evaluation each epoch by retrieval on held-out
/// pairs; a head-less peft adapter (`task_type: FEATURE_EXTRACTION`, the trained dims in
/// `rime_matryoshka_dims`). Its [`Event::Eval`] carries recall@1 at the full dim as `accuracy` and the MRR as
/// `macro_f1` (there is no eval loss: NaN); the named per-dim values are in the log ([`metric_values`]).
pub struct EmbedTask<'d> {
    dev: &'d Device,
    model: PathBuf,
    method: Method,
    train: PairData,
    eval: Option<PairData>,
    matryoshka: MatryoshkaConfig,
    loaded: Option<Loaded>,
}

impl<'d> EmbedTask<'d> {
    pub fn new(
        dev: &'d Device,
        model: impl AsRef<Path>,
        method: Method,
        train: PairData,
        eval: Option<PairData>,
    ) -> EmbedTask<'d> {
        EmbedTask {
            dev,
            model: model.as_ref().to_path_buf(),
            method,
            train,
            eval,
            matryoshka: MatryoshkaConfig::default(),
            loaded: None,
        }
    }

    /// Train with the Matryoshka loss on these dims (and weights).
    pub fn with_matryoshka(mut self, m: MatryoshkaConfig) -> Self {
        self.matryoshka = m;
        self
    }

    fn loaded(&self) -> Result<&Loaded> {
        self.loaded.as_ref().ok_or_else(|| Error::Msg("the embedding task is not prepared".into()))
    }

    fn loaded_mut(&mut self) -> Result<&mut Loaded> {
        self.loaded.as_mut().ok_or_else(|| Error::Msg("the embedding task is not prepared".into()))
    }

    /// The adapter value: the method's tensors under peft's names, no head, `task_type: FEATURE_EXTRACTION`,
    /// the trained dims.
    fn adapter_value(&self) -> Result<PeftAdapter> {
        let l = self.loaded()?;
        let tuning: Box<dyn TuningMethod> = l.method.tuning();
        let mut ad = classifier::peft_adapter(self.dev, &l.store, tuning.as_ref(), &self.model.display().to_string())?;
        mark_embedding_adapter(&mut ad, &l.dims, &l.weights);
        Ok(ad)
    }
}

impl<'d> Task<'d> for EmbedTask<'d> {
    type Summary = EmbedSummary;

    fn device(&self) -> &'d Device {
        self.dev
    }

    fn prepare(&mut self, cfg: &TrainConfig, on: &mut dyn FnMut(Event)) -> Result<Vec<usize>> {
        if matches!(self.method, Method::Probe) {
            return Err(Error::invalid(
                "method",
                "probe trains a classification head only, and an embedding task has no head: nothing would train; \
                 choose lora, svfit, ia3, adapter, prompt or prefix",
            ));
        }
        if matches!(self.method, Method::Lst(_)) {
            // The side network is not a rewrite of the encoder's linears: its own task builds it.
            return Err(Error::invalid(
                "method",
                "lst (ladder side-tuning) trains a side network beside the encoder, which this task does not \
                 build: run it with rime_peft::lst_embed::LstEmbedTask (rime::finetune::embedding_in does)",
            ));
        }
        let dev = self.dev;
        let (train, eval) = split_pairs(&self.train, self.eval.as_ref(), cfg, on)?;
        let (mut store, bcfg, prefix, tok) = open_model_as(dev, &self.model, cfg.max_length, cfg.weights.dtype()?)?;
        let (dims, weights) = self.matryoshka.resolve(bcfg.hidden)?;
        let method = self.method.clone().for_model(&bcfg);
        classifier::check_virtual_fit(method.virtual_tokens(), cfg.max_length.min(bcfg.max_positions), &bcfg)?;
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
        on(Event::Info(classifier::prepare_method(dev, &mut store, &method)?));
        let trainable: usize = store.trainable().map(|(_, p)| p.tensor.numel()).sum();
        let frozen: usize = store.iter().filter(|(_, p)| !p.trainable).map(|(_, p)| p.tensor.numel()).sum();
        let k = blocks.len();
        on(Event::Info(format!(
            "{}: {} trainable parameters, {} frozen; {} {} pairs, {} eval queries over {} distinct positives; \
             matryoshka dims {:?}",
            method.name(),
            trainable,
            frozen,
            train.len(),
            if k == 3 { "(anchor, positive, negative)" } else { "(anchor, positive)" },
            eval_set.gold.len(),
            eval_set.corpus.ids.len(),
            dims
        )));
        let lens: Vec<usize> =
            (0..train.len()).map(|i| blocks.iter().map(|b| b.ids[i].len()).max().unwrap_or(1)).collect();
        let hook = classifier::hook_for(&method);
        let eval_hook = classifier::eval_hook_for(&method).unwrap_or_else(|| classifier::hook_for(&method));
        let eval_dims = eval_dims(&dims, bcfg.hidden);
        let rows = cfg.rows();
        self.loaded = Some(Loaded {
            store,
            cfg: bcfg,
            prefix,
            hook,
            eval_hook,
            method,
            k,
            rows,
            max_length: cfg.max_length,
            optim: None,
            execs: HashMap::new(),
            blocks,
            eval: eval_set,
            embedder: Embedder::new(k * rows, cfg.max_length),
            dims,
            weights,
            eval_dims,
            trainable,
            frozen,
        });
        Ok(lens)
    }

    fn compile(&mut self, optim: OptimConfig, rows: usize) -> Result<()> {
        let l = self.loaded_mut()?;
        l.optim = Some(optim);
        l.rows = rows;
        Ok(())
    }

    fn bucket(&self, longest: usize) -> usize {
        bucket(longest, self.loaded.as_ref().map_or(longest, |l| l.max_length))
    }

    fn executor(&mut self, key: usize) -> Result<(&mut Executor, &ParamStore)> {
        let dev = self.dev;
        let l = self.loaded_mut()?;
        if !l.execs.contains_key(&key) {
            let mut g = Graph::new();
            let enc = bert::build(&mut g, &l.store, &l.cfg, &l.prefix, l.k * l.rows, key, l.hook.as_ref())?;
            let loss = loss_graph(&mut g, &l.store, enc.pooled, l.rows, l.k, &l.dims, &l.weights)?;
            let donor = l.execs.values().next().map(|(e, _)| e);
            let ex = Executor::new_sharing(dev, g, &l.store, Some(loss), &[], l.optim.clone(), donor)?;
            l.execs.insert(key, (ex, loss));
        }
        let (ex, _) = l.execs.get_mut(&key).expect("just built");
        Ok((ex, &l.store))
    }

    fn feed(&mut self, idx: &[usize], key: usize) -> Result<(&mut Executor, Var)> {
        let dev = self.dev;
        self.executor(key)?;
        let l = self.loaded_mut()?;
        let (b, k) = (l.rows, l.k);
        if idx.len() > b {
            return Err(Error::Msg(format!("a batch of {} examples in a graph of {b}", idx.len())));
        }
        let (mut ids, mut types, mut mask) = (vec![], vec![], vec![]);
        for block in &l.blocks {
            let (i, t, m, _) = make_batch(block, idx, b, key);
            ids.extend(i);
            types.extend(t);
            mask.extend(m);
        }
        let vt = l.hook.virtual_tokens();
        let (ex, loss) = l.execs.get_mut(&key).expect("built above");
        feed_encoder(dev, ex, &ids, &types, &mask, k * b, key, vt)?;
        LossFeeds::new(idx.len(), b, k).feed(dev, ex)?;
        Ok((ex, *loss))
    }

    fn any_executor(&self) -> Option<&Executor> {
        self.loaded.as_ref().and_then(|l| l.execs.values().next()).map(|(e, _)| e)
    }

    fn store(&self) -> &ParamStore {
        match &self.loaded {
            Some(l) => &l.store,
            None => empty_store(),
        }
    }

    fn evaluate(&mut self) -> Result<Option<Evaluation>> {
        let dev = self.dev;
        let l = self.loaded_mut()?;
        let m = l.eval.score(&mut l.embedder, dev, &l.store, &l.cfg, &l.prefix, l.eval_hook.as_ref(), &l.eval_dims)?;
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
        classifier::load_adapter(dev, &mut self.loaded_mut()?.store, dir)?;
        Ok(())
    }

    fn adapter_folder(&self) -> &'static str {
        "best"
    }

    fn title(&self) -> String {
        let data = self.train.source().and_then(|p| p.file_name()).map(|f| f.to_string_lossy().into_owned());
        let dims = self.loaded.as_ref().map(|l| l.dims.clone()).unwrap_or_default();
        format!(
            "{} · {} · embedding{} · {}",
            self.model.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            self.method.name(),
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
            method: self.method.name().into(),
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
