//! aTLAS (Zhang et al. 2024, "Knowledge composition using task vectors with learned anisotropic scaling"):
//! one coefficient per task vector per parameter tensor, learned on a few labelled examples while the base
//! and the task vectors stay frozen: W_t = base_t + Σ_k λ_{k,t} τ_{k,t}.
//!
//! The gradient comes from the graph executor's autodiff: the merged tensors W_t are the graph's *trainable*
//! parameters, so one forward+backward (`backward_only`, no optimizer update) yields dL/dW_t through
//! `matmul_backward_weight`; then dL/dλ_{k,t} = <dL/dW_t, τ_{k,t}> on the CPU, Adam updates λ, and W_t is
//! rewritten on the device. The optimizer the executor is built with is never stepped.
//!
//! Inputs (`merge_method: atlas`): `base_model` and rime LoRA adapters with heads (`rime train` outputs).
//! The task vector of adapter k on module t is its folded delta τ_{k,t} = s_k B_k A_k; the head has no base,
//! so head_t = Σ_k λ_{k,t} head_k (weight and bias, each its own tensor). λ starts at 1/K (the uniform soup
//! of the folded models with averaged heads). Output for text (`parameters: {task: classify}`, the default):
//! the merged model (model.safetensors, the base's config and tokenizer), `head/` (a head-only adapter to
//! evaluate on the merged model), `atlas_coefficients.json` and `merge_report.json`.
//!
//! Images (`parameters: {task: image-classify}`, `train_data` / `eval_data` an image folder, list or IDX images
//! file, `examples` / `eval_limit` their first N images): the backbone is usually an ONNX file, which rime does not
//! rewrite, so the result is an adapter instead of a model, exact all the same: B A of the learned merge is
//! peft's `cat` combination of the task vectors (A' = the A_k stacked, B' = the λ_{k,t} s_k B_k side by side,
//! rank Σ r_k, scale 1) with the learned head, the ingredients' `rime_image` settings and labels, evaluated on
//! the base like any image adapter.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rime_graph::ParamId;
use rime_io::Checkpoint;
use rime_kernels::Device;
use rime_peft::classifier::EvalMetrics;
use rime_peft::classify::{Encoded, GradientProbe, HEAD_BIAS, HEAD_WEIGHT};
use rime_peft::{ImageClassData, ImageGradientProbe, Pooling, TextClassData};
use serde::Serialize;

use crate::combine::{combine_adapters, Combination, CombineOptions};
use crate::config::MergeConfig;
use crate::engine::{plan_output, write_report, MergeOptions, MergeReport};
use crate::output::{copy_side_files, encode, write_shards, Staging};
use crate::soup::{base_path, columns, load_candidates, num, resolve_file};
use crate::{Error, Result};

/// One merged tensor: its parameter in the session, its frozen base and the K task vectors.
pub struct AtlasTensor {
    pub name: String,
    pub id: ParamId,
    pub base: Vec<f32>,
    pub taus: Vec<Vec<f32>>,
}

impl AtlasTensor {
    /// base + Σ_k λ_k τ_k.
    pub fn merged(&self, lam: &[f32]) -> Vec<f32> {
        let mut w = self.base.clone();
        for (tau, &l) in self.taus.iter().zip(lam) {
            w.iter_mut().zip(tau).for_each(|(x, t)| *x += l * t);
        }
        w
    }
}

fn perr(e: rime_peft::Error) -> Error {
    Error::Invalid(format!("aTLAS: {e}"))
}

/// What aTLAS fits its coefficients on: a frozen model whose merged tensors take gradients, and its labelled
/// training examples (and optionally held-out ones).
pub trait Objective {
    /// Examples per batch.
    fn batch(&self) -> usize;
    /// Training examples.
    fn examples(&self) -> usize;
    /// Overwrite a merged tensor on the device.
    fn write(&mut self, id: ParamId, data: &[f32]) -> Result<()>;
    /// Mean loss of the training examples `idx` (one batch) and dL/dW of each tensor in `ids`.
    fn loss_and_grads(&mut self, idx: &[usize], ids: &[ParamId]) -> Result<(f32, Vec<Vec<f32>>)>;
    /// Metrics on all training examples (forward only).
    fn train_metrics(&mut self) -> Result<EvalMetrics>;
    /// Metrics on the held-out examples, if there are any.
    fn eval_metrics(&mut self) -> Result<Option<EvalMetrics>>;
}

/// Text classification: a [`GradientProbe`] over an encoder folder and tokenized examples, padded to `seq`.
pub struct TextObjective<'d> {
    pub probe: GradientProbe<'d>,
    pub train: Encoded,
    pub eval: Option<Encoded>,
    pub seq: usize,
}

impl Objective for TextObjective<'_> {
    fn batch(&self) -> usize {
        self.probe.batch()
    }
    fn examples(&self) -> usize {
        self.train.ids.len()
    }
    fn write(&mut self, id: ParamId, data: &[f32]) -> Result<()> {
        self.probe.write(id, data).map_err(perr)
    }
    fn loss_and_grads(&mut self, idx: &[usize], ids: &[ParamId]) -> Result<(f32, Vec<Vec<f32>>)> {
        self.probe.loss_and_grads(&self.train, idx, self.seq, ids).map_err(perr)
    }
    fn train_metrics(&mut self) -> Result<EvalMetrics> {
        self.probe.evaluate(&self.train).map_err(perr)
    }
    fn eval_metrics(&mut self) -> Result<Option<EvalMetrics>> {
        self.eval.as_ref().map(|e| self.probe.evaluate(e)).transpose().map_err(perr)
    }
}

/// Image classification: an [`ImageGradientProbe`] over a ViT and labelled images.
pub struct ImageObjective<'d> {
    pub probe: ImageGradientProbe<'d>,
    pub train: ImageClassData,
    pub eval: Option<ImageClassData>,
}

impl Objective for ImageObjective<'_> {
    fn batch(&self) -> usize {
        self.probe.batch()
    }
    fn examples(&self) -> usize {
        self.train.len()
    }
    fn write(&mut self, id: ParamId, data: &[f32]) -> Result<()> {
        self.probe.write(id, data).map_err(perr)
    }
    fn loss_and_grads(&mut self, idx: &[usize], ids: &[ParamId]) -> Result<(f32, Vec<Vec<f32>>)> {
        self.probe.loss_and_grads(&self.train, idx, ids).map_err(perr)
    }
    fn train_metrics(&mut self) -> Result<EvalMetrics> {
        self.probe.evaluate(&self.train).map_err(perr)
    }
    fn eval_metrics(&mut self) -> Result<Option<EvalMetrics>> {
        self.eval.as_ref().map(|e| self.probe.evaluate(e)).transpose().map_err(perr)
    }
}

/// Writes W_t = merged(λ_t) into the objective's model.
pub fn set_coefficients(obj: &mut dyn Objective, tensors: &[AtlasTensor], lam: &[Vec<f32>]) -> Result<()> {
    for (t, l) in tensors.iter().zip(lam) {
        obj.write(t.id, &t.merged(l))?;
    }
    Ok(())
}

/// Loss of the training batch `idx` and dL/dλ `[tensor][k]` at the coefficients last set.
pub fn loss_and_grad(obj: &mut dyn Objective, tensors: &[AtlasTensor], idx: &[usize]) -> Result<(f32, Vec<Vec<f32>>)> {
    let ids: Vec<ParamId> = tensors.iter().map(|t| t.id).collect();
    let (loss, gw) = obj.loss_and_grads(idx, &ids)?;
    let mut grads = Vec::with_capacity(tensors.len());
    for (t, g) in tensors.iter().zip(gw) {
        grads.push(
            t.taus
                .iter()
                .map(|tau| tau.iter().zip(&g).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() as f32)
                .collect(),
        );
    }
    Ok((loss, grads))
}

/// Result of [`fit`].
pub struct AtlasFit {
    pub lambdas: Vec<Vec<f32>>,
    /// Loss of each step's batch, before its update.
    pub losses: Vec<f32>,
}

/// Adam on λ from `init` over `steps` batches of the training examples (shuffled with `seed`); leaves the
/// model holding the learned coefficients.
pub fn fit(
    obj: &mut dyn Objective,
    tensors: &[AtlasTensor],
    init: Vec<Vec<f32>>,
    steps: usize,
    lr: f32,
    seed: u64,
) -> Result<AtlasFit> {
    let mut lam = init;
    let mut m: Vec<Vec<f32>> = lam.iter().map(|l| vec![0.0; l.len()]).collect();
    let mut v = m.clone();
    let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..obj.examples()).collect();
    let mut pos = order.len();
    let mut losses = Vec::with_capacity(steps);
    for step in 1..=steps {
        let b = obj.batch();
        if pos + b > order.len() {
            order.shuffle(&mut rng);
            pos = 0;
        }
        let idx: Vec<usize> = order[pos..(pos + b).min(order.len())].to_vec();
        pos += b;
        set_coefficients(obj, tensors, &lam)?;
        let (loss, g) = loss_and_grad(obj, tensors, &idx)?;
        if !loss.is_finite() {
            return Err(Error::Invalid(format!("aTLAS: loss is {loss} at step {step}")));
        }
        losses.push(loss);
        let (c1, c2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
        for t in 0..lam.len() {
            for k in 0..lam[t].len() {
                let gk = g[t][k];
                m[t][k] = b1 * m[t][k] + (1.0 - b1) * gk;
                v[t][k] = b2 * v[t][k] + (1.0 - b2) * gk * gk;
                lam[t][k] -= lr * (m[t][k] / c1) / ((v[t][k] / c2).sqrt() + eps);
            }
        }
    }
    set_coefficients(obj, tensors, &lam)?;
    Ok(AtlasFit { lambdas: lam, losses })
}

/// Mean loss over all training examples at the coefficients currently set (forward only).
pub fn mean_loss(obj: &mut dyn Objective) -> Result<f64> {
    Ok(obj.train_metrics()?.loss)
}

#[derive(Serialize)]
struct AtlasReport<'a> {
    #[serde(flatten)]
    report: &'a MergeReport,
    train_data: String,
    examples: usize,
    steps: usize,
    lr: f32,
    train_loss_uniform: f64,
    train_loss_learned: f64,
    eval_accuracy_uniform: Option<f64>,
    eval_accuracy_learned: Option<f64>,
}

/// The labels every candidate shares (`rime_labels`).
fn shared_labels(ads: &[rime_io::PeftAdapter], paths: &[std::path::PathBuf]) -> Result<Vec<String>> {
    let labels: Vec<String> = ads[0]
        .config
        .raw
        .get("rime_labels")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
        .unwrap_or_default();
    for (a, p) in ads.iter().zip(paths) {
        if a.config.raw.get("rime_labels") != ads[0].config.raw.get("rime_labels") {
            return Err(Error::Invalid(format!("{}: rime_labels differ from {}", p.display(), paths[0].display())));
        }
    }
    Ok(labels)
}

/// Task vectors per base tensor: the folded deltas s·B·A of every adapter that adapts it (empty for the
/// others, filled with zeros by the caller). `shape` gives a base tensor's shape, None when the base lacks it.
fn task_vectors(
    ads: &[rime_io::PeftAdapter],
    paths: &[std::path::PathBuf],
    shape: &dyn Fn(&str) -> Option<Vec<usize>>,
    prefix: &str,
    base: &Path,
) -> Result<BTreeMap<String, Vec<Vec<f32>>>> {
    let kk = ads.len();
    let mut taus: BTreeMap<String, Vec<Vec<f32>>> = BTreeMap::new();
    for (k, ad) in ads.iter().enumerate() {
        for p in ad.lora_pairs() {
            let target = target_name(prefix, &p.module);
            let (a, b) = match (ad.get(&p.a), ad.get(&p.b)) {
                (Some(a), Some(b)) => (a, b),
                _ => return Err(Error::Invalid(format!("{}: LoRA pair {} incomplete", paths[k].display(), p.module))),
            };
            let wshape = shape(&target).ok_or_else(|| Error::Tensor {
                tensor: target.clone(),
                msg: format!("adapted in {} but not in the base {}", paths[k].display(), base.display()),
            })?;
            let (r, fin, fout) = (a.shape[0], a.shape[1], b.shape[0]);
            if wshape != [fout, fin] {
                return Err(Error::Tensor {
                    tensor: target,
                    msg: format!("base {wshape:?} but B A is [{fout}, {fin}]"),
                });
            }
            let s = ad.config.scale() as f32;
            let mut d = vec![0f32; fout * fin];
            for o in 0..fout {
                for q in 0..r {
                    let bv = s * b.data[o * r + q];
                    let arow = &a.data[q * fin..(q + 1) * fin];
                    d[o * fin..(o + 1) * fin].iter_mut().zip(arow).for_each(|(x, y)| *x += bv * y);
                }
            }
            let e = taus.entry(target).or_insert_with(|| vec![Vec::new(); kk]);
            e[k] = d;
        }
    }
    Ok(taus)
}

/// The base tensor a LoRA module adapts (`module` as peft names it, without `base_model.model.`).
fn target_name(prefix: &str, module: &str) -> String {
    format!("{prefix}{}.weight", module.strip_prefix(prefix).unwrap_or(module))
}

/// The heads: no base, head_t = Σ_k λ_k head_k (weight and bias, each its own tensor), added to the model by
/// `add` (name, first adapter's values, shape).
fn head_tensors(
    ads: &[rime_io::PeftAdapter],
    paths: &[std::path::PathBuf],
    add: AddTensor,
) -> Result<Vec<AtlasTensor>> {
    let mut tensors = Vec::new();
    for head in [HEAD_WEIGHT, HEAD_BIAS] {
        let full = format!("base_model.model.{head}");
        let hs: Vec<&rime_io::AdapterTensor> = ads
            .iter()
            .zip(paths)
            .map(|(a, p)| {
                a.get(&full)
                    .ok_or_else(|| Error::Tensor { tensor: full.clone(), msg: format!("missing in {}", p.display()) })
            })
            .collect::<Result<_>>()?;
        let shape = hs[0].shape.clone();
        if let Some(h) = hs.iter().find(|h| h.shape != shape) {
            return Err(Error::Tensor { tensor: full, msg: format!("shapes {:?} and {shape:?} differ", h.shape) });
        }
        let id = add(head, &hs[0].data, &shape)?;
        tensors.push(AtlasTensor {
            name: head.to_string(),
            id,
            base: vec![0.0; hs[0].data.len()],
            taus: hs.iter().map(|h| h.data.clone()).collect(),
        });
    }
    Ok(tensors)
}

/// The learned heads, named as in an adapter.
fn learned_heads(tensors: &[AtlasTensor], fitted: &AtlasFit, shapes: &[Vec<usize>]) -> Vec<rime_io::AdapterTensor> {
    tensors
        .iter()
        .zip(&fitted.lambdas)
        .zip(shapes)
        .filter(|((t, _), _)| t.name == HEAD_WEIGHT || t.name == HEAD_BIAS)
        .map(|((t, l), shape)| rime_io::AdapterTensor {
            name: format!("base_model.model.{}", t.name),
            shape: shape.clone(),
            data: t.merged(l),
        })
        .collect()
}

/// `atlas_coefficients.json` into `dir`.
fn write_coefficients(
    dir: &Path,
    tensors: &[AtlasTensor],
    fitted: &AtlasFit,
    paths: &[std::path::PathBuf],
) -> Result<()> {
    let coefs: BTreeMap<&str, &[f32]> =
        tensors.iter().zip(&fitted.lambdas).map(|(t, l)| (t.name.as_str(), l.as_slice())).collect();
    let cj = serde_json::json!({
        "task_vectors": paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "coefficients": coefs,
        "step_losses": fitted.losses,
    });
    let cpath = dir.join("atlas_coefficients.json");
    std::fs::write(&cpath, serde_json::to_string_pretty(&cj).map_err(|e| Error::Invalid(e.to_string()))?)
        .map_err(|e| Error::Output { path: cpath.display().to_string(), msg: format!("cannot write: {e}") })?;
    Ok(())
}

/// `head/` (a head-only adapter of the learned heads) into `dir`.
fn write_head(dir: &Path, out: &Path, heads: Vec<rime_io::AdapterTensor>, labels: &[String]) -> Result<()> {
    // r = 1 only because the adapter_config reader refuses r = 0; a head-only adapter has no low-rank part.
    let mut hcfg = rime_io::AdapterConfig::lora(1, 1.0, vec![]);
    hcfg.peft_type = "RIME_PROBE".into();
    hcfg.modules_to_save = vec!["head".into()];
    hcfg.task_type = Some("SEQ_CLS".into());
    hcfg.base_model_name_or_path = Some(out.display().to_string());
    hcfg.raw.insert("rime_labels".into(), serde_json::json!(labels));
    rime_io::PeftAdapter::new(hcfg, heads).save(dir.join("head"))?;
    Ok(())
}

/// The learned merge as one LoRA adapter: peft's `cat` combination of the ingredients (weights 1: A' = the
/// s_k A_k stacked, B' = the B_k side by side), each adapter's block of A' rows then scaled by its learned λ_{k,t}
/// of that module, and the learned head in place of the combination's averaged one.
fn merged_adapter(
    dev: &Device,
    ads: &[rime_io::PeftAdapter],
    paths: &[std::path::PathBuf],
    prefix: &str,
    tensors: &[AtlasTensor],
    fitted: &AtlasFit,
    heads: Vec<rime_io::AdapterTensor>,
) -> Result<rime_io::PeftAdapter> {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let opts = CombineOptions::new(Combination::Cat);
    let mut merged = combine_adapters(dev, ads, &names, &vec![1.0; ads.len()], &opts)?;
    let lam: BTreeMap<&str, &[f32]> =
        tensors.iter().zip(&fitted.lambdas).map(|(t, l)| (t.name.as_str(), l.as_slice())).collect();
    for p in merged.lora_pairs() {
        let l = lam.get(target_name(prefix, &p.module).as_str()).ok_or_else(|| Error::Tensor {
            tensor: p.a.clone(),
            msg: "combined, but aTLAS learned no coefficients for it".into(),
        })?;
        let a = merged.tensors.iter_mut().find(|t| t.name == p.a).expect("a LoRA pair's A is in the adapter");
        let fin = a.shape[1];
        let mut row = 0;
        for (k, ad) in ads.iter().enumerate() {
            let Some(ak) = ad.get(&p.a) else { continue };
            let rk = ak.shape[0];
            a.data[row * fin..(row + rk) * fin].iter_mut().for_each(|x| *x *= l[k]);
            row += rk;
        }
    }
    for h in heads {
        match merged.tensors.iter_mut().find(|t| t.name == h.name) {
            Some(t) => *t = h,
            None => merged.tensors.push(h),
        }
    }
    Ok(merged)
}

/// The training and held-out examples, as `parameters:` names them.
struct Examples {
    train_path: std::path::PathBuf,
    eval_path: Option<std::path::PathBuf>,
    limit: usize,
    eval_limit: usize,
}

/// Runs aTLAS as `cfg` says (see the module doc) and writes `out`.
pub fn atlas(dev: &Device, cfg: &MergeConfig, out: &Path, opts: &MergeOptions) -> Result<MergeReport> {
    let t0 = Instant::now();
    let base = base_path(cfg)?;
    let ex = Examples {
        train_path: resolve_file(cfg, "train_data")?,
        eval_path: if cfg.strings.contains_key("eval_data") { Some(resolve_file(cfg, "eval_data")?) } else { None },
        limit: num(cfg, "examples", 64.0).max(1.0) as usize,
        eval_limit: cfg.numbers.get("eval_limit").map_or(usize::MAX, |n| *n as usize),
    };
    let batch = num(cfg, "batch_size", 16.0).max(1.0) as usize;
    let (ads, paths) = load_candidates(cfg)?;
    if ads.is_empty() {
        return Err(Error::Config { file: cfg.source.display().to_string(), msg: "atlas needs models".into() });
    }
    let labels = shared_labels(&ads, &paths)?;
    let run = Run { dev, cfg, out, opts, t0, inputs: (&base, &ads, &paths, &labels), ex, batch };
    match cfg.strings.get("task").map(String::as_str) {
        None | Some("classify") => atlas_text(&run),
        Some("image-classify") => atlas_images(&run),
        Some(t) => Err(Error::Config {
            file: cfg.source.display().to_string(),
            msg: format!("parameters: task `{t}`: expected classify or image-classify"),
        }),
    }
}

/// Adds a trainable tensor to the model (name, values, shape).
type AddTensor<'a> = &'a mut dyn FnMut(&str, &[f32], &[usize]) -> Result<ParamId>;
/// Marks a model tensor trainable; returns its id and base values.
type TrainTensor<'a> = &'a mut dyn FnMut(&str) -> Result<(ParamId, Vec<f32>)>;

type Inputs<'a> = (&'a Path, &'a [rime_io::PeftAdapter], &'a [std::path::PathBuf], &'a [String]);

/// One aTLAS merge: where it runs, what it reads (base, adapters, their paths, their labels) and writes.
struct Run<'a> {
    dev: &'a Device,
    cfg: &'a MergeConfig,
    out: &'a Path,
    opts: &'a MergeOptions,
    t0: Instant,
    inputs: Inputs<'a>,
    ex: Examples,
    batch: usize,
}

/// The merged tensors (one per adapted base tensor, zeros for an adapter that leaves it alone) and the heads.
fn atlas_tensors(
    (base, ads, paths, _): Inputs,
    prefix: &str,
    shape: &dyn Fn(&str) -> Option<Vec<usize>>,
    train: TrainTensor,
    add: AddTensor,
) -> Result<Vec<AtlasTensor>> {
    let taus = task_vectors(ads, paths, shape, prefix, base)?;
    let mut tensors = Vec::new();
    for (name, mut tv) in taus {
        let (id, basev) = train(&name)?;
        for t in tv.iter_mut().filter(|t| t.is_empty()) {
            *t = vec![0.0; basev.len()];
        }
        tensors.push(AtlasTensor { name, id, base: basev, taus: tv });
    }
    tensors.extend(head_tensors(ads, paths, add)?);
    Ok(tensors)
}

/// Uniform start, metrics, Adam on λ, metrics again.
struct Fitted {
    fit: AtlasFit,
    train_loss_uniform: f64,
    train_loss_learned: f64,
    eval_accuracy_uniform: Option<f64>,
    eval_accuracy_learned: Option<f64>,
}

fn run_fit(obj: &mut dyn Objective, tensors: &[AtlasTensor], k: usize, cfg: &MergeConfig) -> Result<Fitted> {
    let steps = num(cfg, "steps", 30.0).max(0.0) as usize;
    let lr = num(cfg, "lr", 0.05) as f32;
    let init: Vec<Vec<f32>> = tensors.iter().map(|_| vec![1.0 / k as f32; k]).collect();
    set_coefficients(obj, tensors, &init)?;
    let train_loss_uniform = mean_loss(obj)?;
    let eval_accuracy_uniform = obj.eval_metrics()?.map(|m| m.accuracy);
    let fit = fit(obj, tensors, init, steps, lr, cfg.seed)?;
    let train_loss_learned = mean_loss(obj)?;
    let eval_accuracy_learned = obj.eval_metrics()?.map(|m| m.accuracy);
    Ok(Fitted { fit, train_loss_uniform, train_loss_learned, eval_accuracy_uniform, eval_accuracy_learned })
}

fn atlas_text(run: &Run) -> Result<MergeReport> {
    let Run { dev, cfg, out, opts, inputs, ref ex, batch, .. } = *run;
    let (base, ads, paths, labels) = inputs;
    let max_length = num(cfg, "max_length", 64.0).max(8.0) as usize;
    let mut probe = GradientProbe::open(dev, base, batch, max_length).map_err(perr)?;
    let prefix = probe.prefix().to_string();
    let ck = Checkpoint::open(base)?;
    let shape = |n: &str| ck.info(n).ok().map(|(_, s)| s.to_vec());
    let tensors = {
        let probe = std::cell::RefCell::new(&mut probe);
        let mut train = |n: &str| -> Result<(ParamId, Vec<f32>)> {
            let id = probe
                .borrow_mut()
                .train_tensor(n)
                .map_err(|e| Error::Tensor { tensor: n.into(), msg: e.to_string() })?;
            Ok((id, ck.get_f32(n)?))
        };
        let mut add = |n: &str, d: &[f32], s: &[usize]| -> Result<ParamId> {
            probe.borrow_mut().add_tensor(n, d, s).map_err(|e| Error::Tensor { tensor: n.into(), msg: e.to_string() })
        };
        atlas_tensors(inputs, &prefix, &shape, &mut train, &mut add)?
    };
    let tokenize = |probe: &GradientProbe, path: &Path, limit: usize| -> Result<Encoded> {
        let data = TextClassData::from_file(path, &columns(cfg)).map_err(perr)?;
        probe.encode(&data, labels, limit).map_err(perr)
    };
    let train = tokenize(&probe, &ex.train_path, ex.limit)?;
    let eval = ex.eval_path.as_ref().map(|p| tokenize(&probe, p, ex.eval_limit)).transpose()?;
    let mut obj = TextObjective { probe, train, eval, seq: max_length };
    let fitted = run_fit(&mut obj, &tensors, ads.len(), cfg)?;
    let shapes: Vec<Vec<usize>> = tensors.iter().map(|t| obj.probe.shape(t.id).to_vec()).collect();

    // Write the merged model (streamed from the base, merged tensors replaced), the head and coefficients.
    let merged: BTreeMap<&str, (usize, &[f32])> =
        tensors.iter().enumerate().map(|(i, t)| (t.name.as_str(), (i, fitted.fit.lambdas[i].as_slice()))).collect();
    let staging = staging(out, opts, base, paths)?;
    let plan = plan_output(&ck, None)?;
    let ntensors = plan.len();
    let mut bytes_read = 0u64;
    let bytes_written = write_shards(&staging.tmp, plan, opts.shard_size, |p| {
        let raw = ck.get_raw(&p.name)?;
        bytes_read += raw.bytes.len() as u64;
        match merged.get(p.name.as_str()) {
            Some((i, lam)) => Ok(encode(&tensors[*i].merged(lam), p.dtype)),
            None => Ok(raw.bytes.to_vec()),
        }
    })?;
    let side_files = copy_side_files(base, &staging.tmp)?;
    write_head(&staging.tmp, out, learned_heads(&tensors, &fitted.fit, &shapes), labels)?;
    write_coefficients(&staging.tmp, &tensors, &fitted.fit, paths)?;
    let note =
        format!("the merged model is {0}, with its classification head as an adapter in {0}/head", out.display());
    let io = (ntensors, bytes_read, bytes_written, side_files);
    finish(run, &tensors, &fitted, obj.train.ids.len(), io, note, staging)
}

fn atlas_images(run: &Run) -> Result<MergeReport> {
    let Run { dev, cfg, out, opts, inputs, ref ex, batch, .. } = *run;
    let (base, ads, paths, labels) = inputs;
    // Every ingredient must have been trained at the same input size and pooling.
    let image = ads[0].config.raw.get(rime_peft::image::IMAGE_KEY);
    if let Some(i) = ads.iter().position(|a| a.config.raw.get(rime_peft::image::IMAGE_KEY) != image) {
        return Err(Error::Invalid(format!(
            "{} and {}: image settings (`{}`) differ",
            paths[0].display(),
            paths[i].display(),
            rime_peft::image::IMAGE_KEY
        )));
    }
    let size = image.and_then(|v| v["size"].as_u64()).map_or(224, |s| s as usize);
    let pooling = match image.and_then(|v| v["pooling"].as_str()) {
        Some("mean") => Pooling::PatchMean,
        _ => Pooling::Cls,
    };
    let load = |path: &Path, limit: usize| -> Result<ImageClassData> {
        let d = ImageClassData::from_path(path).map_err(perr)?.take(limit);
        if d.classes != labels {
            return Err(Error::Invalid(format!(
                "{}: classes {:?}, but the adapters' labels are {labels:?}",
                path.display(),
                d.classes
            )));
        }
        Ok(d)
    };
    let train = load(&ex.train_path, ex.limit)?;
    let eval = ex.eval_path.as_ref().map(|p| load(p, ex.eval_limit)).transpose()?;
    let mut probe = ImageGradientProbe::open(dev, base, batch, size, pooling).map_err(perr)?;
    let prefix = probe.prefix().to_string();
    let tensors = {
        let probe = std::cell::RefCell::new(&mut probe);
        let shape = |n: &str| {
            let p = probe.borrow();
            p.find(n).map(|id| p.shape(id).to_vec())
        };
        let mut train = |n: &str| -> Result<(ParamId, Vec<f32>)> {
            let mut p = probe.borrow_mut();
            let id = p.train_tensor(n).map_err(|e| Error::Tensor { tensor: n.into(), msg: e.to_string() })?;
            Ok((id, p.read(id).map_err(perr)?))
        };
        let mut add = |n: &str, d: &[f32], s: &[usize]| -> Result<ParamId> {
            probe.borrow_mut().add_tensor(n, d, s).map_err(|e| Error::Tensor { tensor: n.into(), msg: e.to_string() })
        };
        atlas_tensors(inputs, &prefix, &shape, &mut train, &mut add)?
    };
    let mut obj = ImageObjective { probe, train, eval };
    let fitted = run_fit(&mut obj, &tensors, ads.len(), cfg)?;
    let shapes: Vec<Vec<usize>> = tensors.iter().map(|t| obj.probe.shape(t.id).to_vec()).collect();
    let heads = learned_heads(&tensors, &fitted.fit, &shapes);
    let mut merged = merged_adapter(dev, ads, paths, &prefix, &tensors, &fitted.fit, heads)?;
    merged.config.base_model_name_or_path = Some(base.display().to_string());
    let staging = staging(out, opts, base, paths)?;
    merged.save(&staging.tmp)?;
    write_coefficients(&staging.tmp, &tensors, &fitted.fit, paths)?;
    let note = format!(
        "the merge is the LoRA adapter {} (rank {}), evaluated on the base model as any image adapter",
        out.display(),
        merged.config.r
    );
    let written = merged.tensors.iter().map(|t| t.data.len() as u64 * 4).sum();
    let io = (merged.tensors.len(), 0, written, vec![]);
    finish(run, &tensors, &fitted, obj.train.len(), io, note, staging)
}

fn staging(out: &Path, opts: &MergeOptions, base: &Path, paths: &[std::path::PathBuf]) -> Result<Staging> {
    let inputs: Vec<&Path> = std::iter::once(base).chain(paths.iter().map(|p| p.as_path())).collect();
    Staging::new(out, opts.force, &inputs)
}

/// The report (`merge_report.json` with the fit's numbers), then the staging folder moved to `out`.
fn finish(
    run: &Run,
    tensors: &[AtlasTensor],
    fitted: &Fitted,
    examples: usize,
    (ntensors, bytes_read, bytes_written, side_files): (usize, u64, u64, Vec<String>),
    note: String,
    staging: Staging,
) -> Result<MergeReport> {
    let Run { dev, cfg, out, t0, ref ex, .. } = *run;
    let (base, ads, paths, _) = run.inputs;
    let steps = num(cfg, "steps", 30.0).max(0.0) as usize;
    let lr = num(cfg, "lr", 0.05) as f32;
    let seconds = t0.elapsed().as_secs_f64();
    let mut notes = vec![format!(
        "aTLAS: {} tensors x {} task vectors, {steps} Adam steps (lr {lr}) on {examples} examples: train loss {:.4} (uniform) -> {:.4}",
        tensors.len(),
        ads.len(),
        fitted.train_loss_uniform,
        fitted.train_loss_learned
    )];
    if let (Some(u), Some(l)) = (fitted.eval_accuracy_uniform, fitted.eval_accuracy_learned) {
        notes.push(format!("aTLAS: eval accuracy {u:.4} (uniform) -> {l:.4} (learned)"));
    }
    notes.push(note);
    notes.extend(staging.notes.iter().cloned());
    let report = MergeReport {
        method: "atlas".into(),
        inputs: std::iter::once(base.display().to_string())
            .chain(paths.iter().map(|p| p.display().to_string()))
            .collect(),
        output: out.display().to_string(),
        adapter: dev.info().name.clone(),
        tensors: ntensors,
        copied: 0,
        bytes_read,
        bytes_written,
        seconds,
        gb_per_s: (bytes_read + bytes_written) as f64 / seconds.max(1e-9) / 1e9,
        side_files,
        notes,
    };
    let full = AtlasReport {
        report: &report,
        train_data: ex.train_path.display().to_string(),
        examples,
        steps,
        lr,
        train_loss_uniform: fitted.train_loss_uniform,
        train_loss_learned: fitted.train_loss_learned,
        eval_accuracy_uniform: fitted.eval_accuracy_uniform,
        eval_accuracy_learned: fitted.eval_accuracy_learned,
    };
    write_report(&staging.tmp, &full)?;
    staging.commit()?;
    Ok(report)
}
