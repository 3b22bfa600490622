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
//! of the folded models with averaged heads). Output: the merged model (model.safetensors, the base's config
//! and tokenizer), `head/` (a head-only adapter: `rime eval --model OUT --adapter OUT/head`),
//! `atlas_coefficients.json` and `merge_report.json`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rime_graph::ParamId;
use rime_io::Checkpoint;
use rime_kernels::Device;
use rime_peft::classify::{Encoded, GradientProbe, HEAD_BIAS, HEAD_WEIGHT};
use rime_peft::TextClassData;
use serde::Serialize;

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

/// Writes W_t = merged(λ_t) into the probe's parameters.
pub fn set_coefficients(probe: &GradientProbe, tensors: &[AtlasTensor], lam: &[Vec<f32>]) -> Result<()> {
    for (t, l) in tensors.iter().zip(lam) {
        probe.write(t.id, &t.merged(l)).map_err(perr)?;
    }
    Ok(())
}

/// Loss of the batch `idx` (padded to length `seq`) and dL/dλ `[tensor][k]` at the coefficients last set.
pub fn loss_and_grad(
    probe: &mut GradientProbe,
    tensors: &[AtlasTensor],
    enc: &Encoded,
    idx: &[usize],
    seq: usize,
) -> Result<(f32, Vec<Vec<f32>>)> {
    let ids: Vec<ParamId> = tensors.iter().map(|t| t.id).collect();
    let (loss, gw) = probe.loss_and_grads(enc, idx, seq, &ids).map_err(perr)?;
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

/// Adam on λ from `init` over `steps` batches of `enc` (shuffled with `seed`, padded to `seq`); leaves the
/// session holding the learned coefficients.
pub fn fit(
    probe: &mut GradientProbe,
    tensors: &[AtlasTensor],
    enc: &Encoded,
    init: Vec<Vec<f32>>,
    steps: usize,
    lr: f32,
    seed: u64,
    seq: usize,
) -> Result<AtlasFit> {
    let mut lam = init;
    let mut m: Vec<Vec<f32>> = lam.iter().map(|l| vec![0.0; l.len()]).collect();
    let mut v = m.clone();
    let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..enc.ids.len()).collect();
    let mut pos = order.len();
    let mut losses = Vec::with_capacity(steps);
    for step in 1..=steps {
        let b = probe.batch();
        if pos + b > order.len() {
            order.shuffle(&mut rng);
            pos = 0;
        }
        let idx: Vec<usize> = order[pos..(pos + b).min(order.len())].to_vec();
        pos += b;
        set_coefficients(probe, tensors, &lam)?;
        let (loss, g) = loss_and_grad(probe, tensors, enc, &idx, seq)?;
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
    set_coefficients(probe, tensors, &lam)?;
    Ok(AtlasFit { lambdas: lam, losses })
}

/// Mean loss over all of `enc` at the coefficients currently set (forward only, batches of the probe).
pub fn mean_loss(probe: &mut GradientProbe, enc: &Encoded) -> Result<f64> {
    Ok(probe.evaluate(enc).map_err(perr)?.loss)
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

fn encode_file(
    probe: &GradientProbe,
    cfg: &MergeConfig,
    path: &Path,
    labels: &[String],
    limit: usize,
) -> Result<Encoded> {
    let data = TextClassData::from_file(path, &columns(cfg)).map_err(perr)?;
    probe.encode(&data, labels, limit).map_err(perr)
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
/// others, filled with zeros by the caller).
fn task_vectors(
    ads: &[rime_io::PeftAdapter],
    paths: &[std::path::PathBuf],
    ck: &Checkpoint,
    prefix: &str,
    base: &Path,
) -> Result<BTreeMap<String, Vec<Vec<f32>>>> {
    let kk = ads.len();
    let mut taus: BTreeMap<String, Vec<Vec<f32>>> = BTreeMap::new();
    for (k, ad) in ads.iter().enumerate() {
        for p in ad.lora_pairs() {
            let target = format!("{prefix}{}.weight", p.module.strip_prefix(prefix).unwrap_or(&p.module));
            let (a, b) = match (ad.get(&p.a), ad.get(&p.b)) {
                (Some(a), Some(b)) => (a, b),
                _ => return Err(Error::Invalid(format!("{}: LoRA pair {} incomplete", paths[k].display(), p.module))),
            };
            let (_, wshape) = ck.info(&target).map_err(|_| Error::Tensor {
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

/// The heads: no base, head_t = Σ_k λ_k head_k (weight and bias, each its own tensor), added to the probe.
fn head_tensors(
    probe: &mut GradientProbe,
    ads: &[rime_io::PeftAdapter],
    paths: &[std::path::PathBuf],
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
        let id = probe
            .add_tensor(head, &hs[0].data, &shape)
            .map_err(|e| Error::Tensor { tensor: head.into(), msg: e.to_string() })?;
        tensors.push(AtlasTensor {
            name: head.to_string(),
            id,
            base: vec![0.0; hs[0].data.len()],
            taus: hs.iter().map(|h| h.data.clone()).collect(),
        });
    }
    Ok(tensors)
}

/// `head/` (a head-only adapter of the learned heads) and `atlas_coefficients.json` into `dir`.
fn write_head_and_coefficients(
    dir: &Path,
    out: &Path,
    probe: &GradientProbe,
    tensors: &[AtlasTensor],
    fitted: &AtlasFit,
    labels: &[String],
    paths: &[std::path::PathBuf],
) -> Result<()> {
    let heads: Vec<rime_io::AdapterTensor> = tensors
        .iter()
        .zip(&fitted.lambdas)
        .filter(|(t, _)| t.name == HEAD_WEIGHT || t.name == HEAD_BIAS)
        .map(|(t, l)| rime_io::AdapterTensor {
            name: format!("base_model.model.{}", t.name),
            shape: probe.shape(t.id).to_vec(),
            data: t.merged(l),
        })
        .collect();
    // r = 1 only because the adapter_config reader refuses r = 0; a head-only adapter has no low-rank part.
    let mut hcfg = rime_io::AdapterConfig::lora(1, 1.0, vec![]);
    hcfg.peft_type = "RIME_PROBE".into();
    hcfg.modules_to_save = vec!["head".into()];
    hcfg.task_type = Some("SEQ_CLS".into());
    hcfg.base_model_name_or_path = Some(out.display().to_string());
    hcfg.raw.insert("rime_labels".into(), serde_json::json!(labels));
    rime_io::PeftAdapter::new(hcfg, heads).save(dir.join("head"))?;
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

/// Runs aTLAS as `cfg` says (see the module doc) and writes `out`.
pub fn atlas(dev: &Device, cfg: &MergeConfig, out: &Path, opts: &MergeOptions) -> Result<MergeReport> {
    let t0 = Instant::now();
    let base = base_path(cfg)?;
    let train_path = resolve_file(cfg, "train_data")?;
    let eval_path = if cfg.strings.contains_key("eval_data") { Some(resolve_file(cfg, "eval_data")?) } else { None };
    let batch = num(cfg, "batch_size", 16.0).max(1.0) as usize;
    let max_length = num(cfg, "max_length", 64.0).max(8.0) as usize;
    let steps = num(cfg, "steps", 30.0).max(0.0) as usize;
    let lr = num(cfg, "lr", 0.05) as f32;
    let examples = num(cfg, "examples", 64.0).max(1.0) as usize;
    let (ads, paths) = load_candidates(cfg)?;
    let kk = ads.len();
    if kk == 0 {
        return Err(Error::Config { file: cfg.source.display().to_string(), msg: "atlas needs models".into() });
    }
    let labels = shared_labels(&ads, &paths)?;
    let mut probe = GradientProbe::open(dev, &base, batch, max_length).map_err(perr)?;
    let prefix = probe.prefix().to_string();
    let ck = Checkpoint::open(&base)?;
    let taus = task_vectors(&ads, &paths, &ck, &prefix, &base)?;
    let mut tensors = Vec::new();
    for (name, mut tv) in taus {
        let id = probe.train_tensor(&name).map_err(|e| Error::Tensor { tensor: name.clone(), msg: e.to_string() })?;
        let basev = ck.get_f32(&name)?;
        for t in tv.iter_mut().filter(|t| t.is_empty()) {
            *t = vec![0.0; basev.len()];
        }
        tensors.push(AtlasTensor { name, id, base: basev, taus: tv });
    }
    tensors.extend(head_tensors(&mut probe, &ads, &paths)?);
    let train = encode_file(&probe, cfg, &train_path, &labels, examples)?;
    let eval = match &eval_path {
        Some(p) => Some(encode_file(&probe, cfg, p, &labels, usize::MAX)?),
        None => None,
    };
    let init: Vec<Vec<f32>> = tensors.iter().map(|_| vec![1.0 / kk as f32; kk]).collect();
    set_coefficients(&probe, &tensors, &init)?;
    let train_loss_uniform = mean_loss(&mut probe, &train)?;
    let eval_accuracy_uniform = match &eval {
        Some(e) => Some(probe.evaluate(e).map_err(perr)?.accuracy),
        None => None,
    };
    let fitted = fit(&mut probe, &tensors, &train, init, steps, lr, cfg.seed, max_length)?;
    let train_loss_learned = mean_loss(&mut probe, &train)?;
    let eval_accuracy_learned = match &eval {
        Some(e) => Some(probe.evaluate(e).map_err(perr)?.accuracy),
        None => None,
    };

    // Write the merged model (streamed from the base, merged tensors replaced), the head and coefficients.
    let merged: BTreeMap<&str, (usize, &[f32])> =
        tensors.iter().enumerate().map(|(i, t)| (t.name.as_str(), (i, fitted.lambdas[i].as_slice()))).collect();
    let inputs: Vec<&Path> = std::iter::once(base.as_path()).chain(paths.iter().map(|p| p.as_path())).collect();
    let staging = Staging::new(out, opts.force, &inputs)?;
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
    let side_files = copy_side_files(&base, &staging.tmp)?;
    write_head_and_coefficients(&staging.tmp, out, &probe, &tensors, &fitted, &labels, &paths)?;
    let seconds = t0.elapsed().as_secs_f64();
    let mut notes = vec![format!(
        "aTLAS: {} tensors x {kk} task vectors, {steps} Adam steps (lr {lr}) on {} examples: train loss {:.4} (uniform) -> {:.4}",
        tensors.len(),
        train.ids.len(),
        train_loss_uniform,
        train_loss_learned
    )];
    if let (Some(u), Some(l)) = (eval_accuracy_uniform, eval_accuracy_learned) {
        notes.push(format!("aTLAS: eval accuracy {u:.4} (uniform) -> {l:.4} (learned)"));
    }
    notes.push(format!(
        "the merged model is {0}, with its classification head as an adapter in {0}/head",
        out.display()
    ));
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
        train_data: train_path.display().to_string(),
        examples: train.ids.len(),
        steps,
        lr,
        train_loss_uniform,
        train_loss_learned,
        eval_accuracy_uniform,
        eval_accuracy_learned,
    };
    write_report(&staging.tmp, &full)?;
    staging.commit()?;
    Ok(report)
}
