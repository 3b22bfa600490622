//! Combining several peft LoRA adapters into one, with the semantics of peft's
//! `LoraModel.add_weighted_adapter` (peft 0.17, negative weights supported):
//! - `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: A and B are merged separately. Adapter i
//!   weighs its A by sign(w_i s_i)·sqrt(|w_i s_i|) and its B by sqrt(|w_i s_i|) (s_i = its LoRA scale), and
//!   each stack goes through peft's `merge_utils` function of that name (TIES elects the sign on the trimmed,
//!   unweighted factors; DARE-TIES on the weighted rescaled ones). All adapters must share the rank.
//! - `cat`: A' = concat_rows(w_i s_i A_i), B' = concat_cols(B_i); rank = sum of ranks; exact.
//! - `svd`: ΔW = Σ (w_i s_i) · (s_i B_i A_i) (peft multiplies the delta, which already holds s_i, by
//!   w_i s_i again; rime keeps that), then B' = U_r diag(S_r), A' = V_rᵀ with r = `svd_rank` or the largest
//!   rank. rime computes the SVD exactly through the factors (ΔW = B_cat A_cat, two thin QRs and a Jacobi SVD
//!   of the small core), never forming ΔW; singular vectors are unique up to sign, the product B'A' is not.
//!
//! The new adapter is the first adapter's config with `r` and `lora_alpha` both set to the new rank (scale 1
//! unless rsLoRA), the union of target modules, and no rank/alpha patterns, as peft does. A module adapted by
//! only some adapters is combined from those (peft skips the others).
//!
//! Not defined by peft (it refuses several adapters that save the same module): tensors that are not LoRA
//! factors (rime's classification `head.weight` / `head.bias`, `modules_to_save` copies) are combined as the
//! weighted mean Σ w_i x_i / Σ w_i over the adapters that hold them; their labels (`rime_labels`) must agree.
//!
//! DARE's random drop uses rime's seeded mask (`dare_mask`, see the engine), not torch's generator.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rime_io::peft::{AdapterTensor, PeftAdapter};
use rime_kernels::ops::merge as k;
use rime_kernels::{DType, Device};

use crate::engine::{check_binding, dare, dare_mask, magnitude_trim, weighted_sum, write_report, MergeReport};
use crate::output::Staging;
use crate::{Error, Result};

/// peft's `combination_type` values rime implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    Linear,
    Cat,
    Svd,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
}

impl Combination {
    pub const ALL: [(&'static str, Combination); 7] = [
        ("linear", Combination::Linear),
        ("cat", Combination::Cat),
        ("svd", Combination::Svd),
        ("ties", Combination::Ties),
        ("dare_linear", Combination::DareLinear),
        ("dare_ties", Combination::DareTies),
        ("magnitude_prune", Combination::MagnitudePrune),
    ];

    pub fn parse(s: &str) -> Option<Combination> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, c)| *c)
    }

    pub fn as_str(self) -> &'static str {
        Self::ALL.iter().find(|(_, c)| *c == self).map(|(n, _)| *n).unwrap_or("?")
    }

    fn needs_density(self) -> bool {
        matches!(
            self,
            Combination::Ties | Combination::DareLinear | Combination::DareTies | Combination::MagnitudePrune
        )
    }
}

/// `add_weighted_adapter`'s options.
#[derive(Debug, Clone)]
pub struct CombineOptions {
    pub combination: Combination,
    /// Fraction kept, in (0, 1]; required by ties, dare_*, magnitude_prune.
    pub density: Option<f64>,
    /// `majority_sign_method`: true = "total" (peft's default), false = "frequency".
    pub majority_sign_total: bool,
    /// Rank of an `svd` combination (default: the largest input rank).
    pub svd_rank: Option<usize>,
    /// Seed of DARE's drop mask.
    pub seed: u64,
}

impl CombineOptions {
    pub fn new(combination: Combination) -> Self {
        CombineOptions { combination, density: None, majority_sign_total: true, svd_rank: None, seed: 0 }
    }
}

/// LoRA scale of `module` in adapter `ad` whose factor A has `r` rows.
fn module_scale(ad: &PeftAdapter, module: &str, r: usize) -> f64 {
    ad.config.module_scale(module, r)
}

/// The config rank of an adapter (peft: max of `r` and its rank pattern).
fn config_rank(ad: &PeftAdapter) -> usize {
    ad.config.rank_pattern.values().copied().fold(ad.config.r, usize::max)
}

/// Combines adapters loaded in memory; `names` label them in messages.
pub fn combine_adapters(
    dev: &Device,
    ads: &[PeftAdapter],
    names: &[String],
    weights: &[f64],
    opts: &CombineOptions,
) -> Result<PeftAdapter> {
    let inv = |msg: String| Error::Invalid(msg);
    if ads.is_empty() {
        return Err(inv("no adapters to combine".into()));
    }
    if weights.len() != ads.len() {
        return Err(inv(format!("{} weights for {} adapters", weights.len(), ads.len())));
    }
    if let Some(w) = weights.iter().find(|w| !(w.is_finite() && w.abs() <= f32::MAX as f64)) {
        let message = format!("{} is not a finite number within ±{:e} (f32)", crate::show(*w), f32::MAX);
        return Err(Error::Argument { argument: "weights", message });
    }
    for (ad, n) in ads.iter().zip(names) {
        if ad.config.peft_type != "LORA" {
            return Err(inv(format!("{n}: peft_type `{}`: only LORA adapters can be combined", ad.config.peft_type)));
        }
        if ad.config.use_dora {
            return Err(inv(format!("{n}: DoRA adapters cannot be combined (peft refuses them too)")));
        }
        if ad.lora_pairs().is_empty() {
            return Err(inv(format!("{n}: the adapter has no LoRA factors; there is nothing to combine from it")));
        }
    }
    // peft: a single adapter is always combined linearly.
    let comb = if ads.len() == 1 { Combination::Linear } else { opts.combination };
    let density = match (comb.needs_density(), opts.density) {
        (true, None) => return Err(inv(format!("combination `{}` needs a density in (0, 1]", comb.as_str()))),
        (true, Some(d)) if !(d > 0.0 && d <= 1.0) => {
            return Err(Error::Argument { argument: "density", message: format!("{d} is outside (0, 1]") })
        }
        (_, d) => d.unwrap_or(1.0),
    };
    let ranks: Vec<usize> = ads.iter().map(config_rank).collect();
    let new_rank = match comb {
        Combination::Cat => ranks.iter().sum(),
        Combination::Svd => opts.svd_rank.unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(0)),
        _ => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                return Err(inv(format!(
                    "combination `{}` needs adapters of the same rank; ranks are {ranks:?} ({})",
                    comb.as_str(),
                    names.join(", ")
                )));
            }
            ranks[0]
        }
    };
    if new_rank == 0 {
        return Err(inv("the combined adapter would have rank 0".into()));
    }
    // Labels of rime heads must agree.
    let labels: Vec<Option<&serde_json::Value>> = ads.iter().map(|a| a.config.raw.get("rime_labels")).collect();
    if let Some(i) = labels.iter().position(|l| *l != labels[0]) {
        return Err(inv(format!("{} and {} have different rime_labels", names[0], names[i])));
    }

    // module -> [(adapter index, A, B)]
    let mut modules: BTreeMap<String, Vec<(usize, &AdapterTensor, &AdapterTensor)>> = BTreeMap::new();
    let mut others: BTreeMap<String, Vec<(usize, &AdapterTensor)>> = BTreeMap::new();
    let mut module_names: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (i, ad) in ads.iter().enumerate() {
        for p in ad.lora_pairs() {
            let (a, b) = match (ad.get(&p.a), ad.get(&p.b)) {
                (Some(a), Some(b)) => (a, b),
                _ => return Err(inv(format!("{}: LoRA pair `{}` incomplete", names[i], p.module))),
            };
            module_names.entry(p.module.clone()).or_insert((p.a.clone(), p.b.clone()));
            modules.entry(p.module).or_default().push((i, a, b));
        }
        for t in &ad.tensors {
            if !(t.name.contains(".lora_A.") || t.name.contains(".lora_B.")) {
                others.entry(t.name.clone()).or_default().push((i, t));
            }
        }
    }
    let mut out: Vec<AdapterTensor> = Vec::new();
    for (module, list) in &modules {
        let (an, bn) = &module_names[module];
        let (fin, fout) = (list[0].1.shape[1], list[0].2.shape[0]);
        for (i, a, b) in list {
            if a.shape[1] != fin || b.shape[0] != fout {
                return Err(Error::Tensor {
                    tensor: an.clone(),
                    msg: format!(
                        "{}: factors A {:?} / B {:?} do not match {}'s A {:?} / B {:?}",
                        names[*i], a.shape, b.shape, names[list[0].0], list[0].1.shape, list[0].2.shape
                    ),
                });
            }
        }
        let scales: Vec<f64> = list.iter().map(|(i, a, _)| module_scale(&ads[*i], module, a.shape[0])).collect();
        let (a_new, b_new) = match comb {
            Combination::Cat => {
                let mut a_new = vec![0f32; new_rank * fin];
                let mut b_new = vec![0f32; fout * new_rank];
                let mut row = 0;
                for ((i, a, b), s) in list.iter().zip(&scales) {
                    let r = a.shape[0];
                    if row + r > new_rank {
                        return Err(Error::Tensor { tensor: an.clone(), msg: "ranks exceed the adapter ranks".into() });
                    }
                    let c = (weights[*i] * s) as f32;
                    for q in 0..r {
                        for j in 0..fin {
                            a_new[(row + q) * fin + j] = a.data[q * fin + j] * c;
                        }
                    }
                    for o in 0..fout {
                        for q in 0..r {
                            b_new[o * new_rank + row + q] = b.data[o * r + q];
                        }
                    }
                    row += r;
                }
                (a_new, b_new)
            }
            Combination::Svd => {
                let coef: Vec<f64> = list.iter().zip(&scales).map(|((i, _, _), s)| weights[*i] * s * s).collect();
                let facs: Vec<(&AdapterTensor, &AdapterTensor)> = list.iter().map(|(_, a, b)| (*a, *b)).collect();
                svd_combine(&facs, &coef, new_rank, fin, fout)
            }
            _ => {
                for (i, a, _) in list {
                    if a.shape[0] != new_rank {
                        return Err(Error::Tensor {
                            tensor: an.clone(),
                            msg: format!("{}: rank {} differs from {new_rank}", names[*i], a.shape[0]),
                        });
                    }
                }
                let ws: Vec<f64> = list.iter().zip(&scales).map(|((i, _, _), s)| weights[*i] * s).collect();
                let wa: Vec<f32> =
                    ws.iter().map(|w| (w.abs().sqrt() * if *w >= 0.0 { 1.0 } else { -1.0 }) as f32).collect();
                let wb: Vec<f32> = ws.iter().map(|w| w.abs().sqrt() as f32).collect();
                let sa: Vec<&[f32]> = list.iter().map(|(_, a, _)| a.data.as_slice()).collect();
                let sb: Vec<&[f32]> = list.iter().map(|(_, _, b)| b.data.as_slice()).collect();
                let idx: Vec<usize> = list.iter().map(|(i, _, _)| *i).collect();
                let masks = |name: &str, l: usize| -> Vec<Vec<f32>> {
                    idx.iter().map(|&i| dare_mask(opts.seed, name, i, l, density as f32)).collect()
                };
                let dare_like = matches!(comb, Combination::DareLinear | Combination::DareTies);
                let ma = if dare_like { Some(masks(an, sa[0].len())) } else { None };
                let mb = if dare_like { Some(masks(bn, sb[0].len())) } else { None };
                let total = opts.majority_sign_total;
                let a_new = combine_stack(dev, an, &sa, &wa, comb, density, total, ma.as_deref())?;
                let b_new = combine_stack(dev, bn, &sb, &wb, comb, density, total, mb.as_deref())?;
                (a_new, b_new)
            }
        };
        out.push(AdapterTensor { name: an.clone(), shape: vec![new_rank, fin], data: a_new });
        out.push(AdapterTensor { name: bn.clone(), shape: vec![fout, new_rank], data: b_new });
    }
    for (name, list) in &others {
        let shape = &list[0].1.shape;
        if let Some((i, t)) = list.iter().find(|(_, t)| &t.shape != shape) {
            return Err(Error::Tensor {
                tensor: name.clone(),
                msg: format!("shape {:?} in {} but {shape:?} in {}", t.shape, names[*i], names[list[0].0]),
            });
        }
        let wsum: f64 = list.iter().map(|(i, _)| weights[*i]).sum();
        if wsum.abs() < 1e-12 {
            return Err(Error::Tensor {
                tensor: name.clone(),
                msg: "the weights of the adapters holding this tensor sum to 0; its weighted mean is undefined".into(),
            });
        }
        let mut acc = vec![0f64; list[0].1.data.len()];
        for (i, t) in list {
            let w = weights[*i] / wsum;
            acc.iter_mut().zip(&t.data).for_each(|(a, x)| *a += w * *x as f64);
        }
        out.push(AdapterTensor {
            name: name.clone(),
            shape: shape.clone(),
            data: acc.iter().map(|&x| x as f32).collect(),
        });
    }
    let mut config = ads[0].config.clone();
    config.r = new_rank;
    config.lora_alpha = new_rank as f64;
    config.rank_pattern.clear();
    config.alpha_pattern.clear();
    let targets: BTreeSet<String> = ads.iter().flat_map(|a| a.config.target_modules.iter().cloned()).collect();
    config.target_modules = targets.into_iter().collect();
    Ok(PeftAdapter::new(config, out))
}

/// One stack of equally shaped tensors (A or B of one module) through peft's `merge_utils` function for
/// `comb` (`linear` = `task_arithmetic`), on the GPU: `w` are the per-tensor weights, `masks` DARE's keep
/// masks (1 keep, 0 drop; required for dare_*), `majority_sign_total` peft's `majority_sign_method`.
#[allow(clippy::too_many_arguments)]
pub fn combine_stack(
    dev: &Device,
    name: &str,
    xs: &[&[f32]],
    w: &[f32],
    comb: Combination,
    density: f64,
    majority_sign_total: bool,
    masks: Option<&[Vec<f32>]>,
) -> Result<Vec<f32>> {
    let n = xs.len();
    if n == 0 || w.len() != n {
        return Err(Error::Tensor { tensor: name.into(), msg: format!("{n} tensors with {} weights", w.len()) });
    }
    let l = xs[0].len();
    if xs.iter().any(|x| x.len() != l) {
        return Err(Error::Tensor { tensor: name.into(), msg: "stacked tensors differ in size".into() });
    }
    check_binding(dev, name, n * l, "a LoRA factor stack must fit one binding")?;
    let prepped: Vec<Vec<f32>> = match comb {
        Combination::Ties | Combination::MagnitudePrune => {
            xs.iter().map(|x| magnitude_trim(dev, name, x, density)).collect::<Result<_>>()?
        }
        Combination::DareLinear | Combination::DareTies => {
            let masks = masks.filter(|m| m.len() == n && m.iter().all(|m| m.len() == l)).ok_or_else(|| {
                Error::Tensor { tensor: name.into(), msg: format!("DARE needs {n} keep masks of {l} elements") }
            })?;
            xs.iter().zip(masks).map(|(x, m)| dare(dev, name, x, m, density as f32)).collect::<Result<_>>()?
        }
        _ => xs.iter().map(|x| x.to_vec()).collect(),
    };
    let stacked = prepped.concat();
    match comb {
        Combination::Ties | Combination::DareTies => {
            let g = dev.upload_f32(&stacked, &[n, l])?;
            let out = dev.empty(&[l], DType::F32)?;
            let weighted = comb == Combination::DareTies;
            dev.run(&k::merge_ties_forward(dev, &out, &g, w, majority_sign_total, weighted)?)?;
            Ok(dev.download_f32(&out)?)
        }
        _ => weighted_sum(dev, name, &stacked, n, l, w),
    }
}

/// Truncated SVD of ΔW = Σ_i coef_i B_i A_i [fout, fin], computed through the factors. Returns (A' [r, fin],
/// B' [fout, r]) with B' = U_r diag(S_r), A' = V_rᵀ (columns beyond the rank of ΔW are zero).
fn svd_combine(
    facs: &[(&AdapterTensor, &AdapterTensor)],
    coef: &[f64],
    r: usize,
    fin: usize,
    fout: usize,
) -> (Vec<f32>, Vec<f32>) {
    let big: usize = facs.iter().map(|(a, _)| a.shape[0]).sum();
    // Bc [fout, big] (column-major columns), Ac^T [fin, big]: column q of Ac^T is row q of A times coef.
    let mut bcols: Vec<Vec<f64>> = Vec::with_capacity(big);
    let mut acols: Vec<Vec<f64>> = Vec::with_capacity(big);
    for ((a, b), c) in facs.iter().zip(coef) {
        let ri = a.shape[0];
        for q in 0..ri {
            bcols.push((0..fout).map(|o| b.data[o * ri + q] as f64).collect());
            acols.push((0..fin).map(|j| a.data[q * fin + j] as f64 * c).collect());
        }
    }
    let (qb, rb) = thin_qr(bcols);
    let (qa, ra) = thin_qr(acols);
    // M = Rb Ra^T [big, big]
    let mut m = vec![0f64; big * big];
    for i in 0..big {
        for j in 0..big {
            m[i * big + j] = (0..big).map(|q| rb[i * big + q] * ra[j * big + q]).sum();
        }
    }
    let (um, s, vm) = jacobi_svd(&m, big);
    let mut a_new = vec![0f32; r * fin];
    let mut b_new = vec![0f32; fout * r];
    for c in 0..r.min(big) {
        // U column c = Qb um[:, c]; V column c = Qa vm[:, c].
        for o in 0..fout {
            let u: f64 = (0..big).map(|q| qb[q][o] * um[q * big + c]).sum();
            b_new[o * r + c] = (u * s[c]) as f32;
        }
        for j in 0..fin {
            let v: f64 = (0..big).map(|q| qa[q][j] * vm[q * big + c]).sum();
            a_new[c * fin + j] = v as f32;
        }
    }
    (a_new, b_new)
}

/// Modified Gram-Schmidt on columns: Q columns (a dependent column becomes zero) and R [n, n] row-major,
/// so that column j = Σ_q Q_q R[q, j].
fn thin_qr(mut cols: Vec<Vec<f64>>) -> (Vec<Vec<f64>>, Vec<f64>) {
    let n = cols.len();
    let mut r = vec![0f64; n * n];
    let scale: f64 = cols.iter().map(|c| c.iter().map(|x| x * x).sum::<f64>()).fold(0.0, f64::max).sqrt();
    for j in 0..n {
        for q in 0..j {
            let d: f64 = cols[q].iter().zip(&cols[j]).map(|(a, b)| a * b).sum();
            r[q * n + j] = d;
            let (lo, hi) = cols.split_at_mut(j);
            hi[0].iter_mut().zip(&lo[q]).for_each(|(x, y)| *x -= d * y);
        }
        let norm = cols[j].iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm <= 1e-13 * scale.max(1e-300) {
            cols[j].iter_mut().for_each(|x| *x = 0.0);
        } else {
            r[j * n + j] = norm;
            cols[j].iter_mut().for_each(|x| *x /= norm);
        }
    }
    (cols, r)
}

/// One-sided Jacobi SVD of a square [n, n] row-major matrix: (U [n, n], S [n] descending, V [n, n]),
/// row-major with singular vectors in columns.
fn jacobi_svd(m: &[f64], n: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut a = m.to_vec();
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..60 {
        let mut off = 0f64;
        for p in 0..n {
            for q in p + 1..n {
                let (mut alpha, mut beta, mut gamma) = (0f64, 0f64, 0f64);
                for i in 0..n {
                    alpha += a[i * n + p] * a[i * n + p];
                    beta += a[i * n + q] * a[i * n + q];
                    gamma += a[i * n + p] * a[i * n + q];
                }
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                off = off.max(gamma.abs() / (alpha * beta).sqrt());
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let t = if zeta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for i in 0..n {
                    let (x, y) = (a[i * n + p], a[i * n + q]);
                    a[i * n + p] = c * x - s * y;
                    a[i * n + q] = s * x + c * y;
                    let (x, y) = (v[i * n + p], v[i * n + q]);
                    v[i * n + p] = c * x - s * y;
                    v[i * n + q] = s * x + c * y;
                }
            }
        }
        if off < 1e-15 {
            break;
        }
    }
    let mut sv: Vec<(f64, usize)> =
        (0..n).map(|j| ((0..n).map(|i| a[i * n + j] * a[i * n + j]).sum::<f64>().sqrt(), j)).collect();
    sv.sort_by(|x, y| y.0.total_cmp(&x.0));
    let mut u = vec![0f64; n * n];
    let mut vs = vec![0f64; n * n];
    let mut s = vec![0f64; n];
    for (c, &(sig, j)) in sv.iter().enumerate() {
        s[c] = sig;
        for i in 0..n {
            u[i * n + c] = if sig > 0.0 { a[i * n + j] / sig } else { 0.0 };
            vs[i * n + c] = v[i * n + j];
        }
    }
    (u, s, vs)
}

/// Combines adapter folders and writes the result as a peft adapter folder `out` (with merge_report.json).
pub fn combine_lora(
    dev: &Device,
    adapters: &[PathBuf],
    weights: &[f64],
    opts: &CombineOptions,
    out: &Path,
    force: bool,
) -> Result<MergeReport> {
    let t0 = Instant::now();
    let ads = adapters.iter().map(PeftAdapter::load).collect::<std::result::Result<Vec<_>, _>>()?;
    let names: Vec<String> = adapters.iter().map(|p| p.display().to_string()).collect();
    let bytes_read: u64 = ads.iter().flat_map(|a| a.tensors.iter()).map(|t| t.data.len() as u64 * 4).sum();
    let inputs: Vec<&Path> = adapters.iter().map(|p| p.as_path()).collect();
    let staging = Staging::new(out, force, &inputs)?;
    let combined = combine_adapters(dev, &ads, &names, weights, opts)?;
    combined.save(&staging.tmp)?;
    let bytes_written =
        std::fs::metadata(staging.tmp.join(rime_io::peft::ADAPTER_WEIGHTS)).map(|m| m.len()).unwrap_or(0);
    let seconds = t0.elapsed().as_secs_f64();
    let mut notes = vec![format!(
        "peft add_weighted_adapter `{}`: rank {}, weights {weights:?}",
        opts.combination.as_str(),
        combined.config.r
    )];
    if let Some(d) = opts.density {
        notes.push(format!(
            "density {d}, majority sign {}",
            if opts.majority_sign_total { "total" } else { "frequency" }
        ));
    }
    notes.extend(staging.notes.iter().cloned());
    let report = MergeReport {
        method: format!("lora_{}", opts.combination.as_str()),
        inputs: names,
        output: out.display().to_string(),
        adapter: dev.info().name.clone(),
        tensors: combined.tensors.len(),
        copied: 0,
        bytes_read,
        bytes_written,
        seconds,
        gb_per_s: (bytes_read + bytes_written) as f64 / seconds.max(1e-9) / 1e9,
        side_files: vec![],
        notes,
    };
    write_report(&staging.tmp, &report)?;
    staging.commit()?;
    Ok(report)
}
