//! The merge loop: check that every input holds the same tensor names and shapes, plan the output, then for
//! each tensor read it from every input, merge it (GPU kernels for the weighted sums, the magnitude top-k,
//! DARE's rescale and SLERP), and stream it into the output. Formulas are mergekit 0.1.5's:
//! - linear: sum_i w_i x_i, divided by sum_i w_i when `normalize`;
//! - task_arithmetic / dare_linear: base + lambda * sum_i w_i d_i (/ sum_i w_i when `normalize`), d_i = x_i - base;
//! - ties / dare_ties: d_i sparsified (top-k magnitude by `density` / DARE), y_i = w_i d_i, the sign elected per
//!   element as sign(sum_i y_i) (zero counts as +), then base + lambda * sum_i y_i [agree] (/ sum_i w_i [agree]
//!   when `normalize`, 1 where no row agrees);
//! - slerp: `merge_slerp_forward(base, other, t)`.
//!
//! The TIES election and disjoint sum run on the CPU: `merge_ties_forward` divides by the count of agreeing
//! rows (peft), while mergekit divides by the sum of their weights; the two agree only for equal weights.
//! The magnitude top-k (the expensive part) runs on the GPU.
//!
//! Large tensors: weighted sums and DARE are elementwise and run in column chunks that fit one storage
//! binding; TIES' top-k and SLERP's norms need a whole row at once, so a single model's tensor larger than
//! the binding limit is refused (chunking would change the result).
//!
//! DARE's keep-mask is drawn on the CPU: for model i (0-based among the task models) and tensor `name`, a
//! SplitMix64 stream seeded with `seed ^ fnv1a64(name) ^ (i + 1) * 0x9E3779B97F4A7C15` yields one u64 per
//! element in order; the element is kept when `(u >> 40) as f32 / 2^24 < density`.

use std::path::Path;
use std::time::Instant;

use rime_io::{Checkpoint, Dtype};
use rime_kernels::ops::merge as k;
use rime_kernels::{DType, Device};
use serde::Serialize;

use crate::config::{MergeConfig, Method, ModelEntry, OutDtype, Param};
use crate::output::{copy_side_files, encode, write_shards, Planned, Staging, DEFAULT_SHARD_SIZE};
use crate::{Error, Result};

/// How to write the output.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Replace an existing output folder.
    pub force: bool,
    /// Largest shard in bytes; above it the output is sharded with `model.safetensors.index.json`.
    pub shard_size: u64,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions { force: false, shard_size: DEFAULT_SHARD_SIZE }
    }
}

/// What a merge did; also written as `merge_report.json` in the output folder.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    pub method: String,
    pub inputs: Vec<String>,
    pub output: String,
    pub adapter: String,
    pub tensors: usize,
    /// Tensors copied unmerged (non-float, e.g. position_ids).
    pub copied: usize,
    /// Tensor bytes read from all inputs, as stored.
    pub bytes_read: u64,
    /// Bytes of the safetensors file(s) and index written.
    pub bytes_written: u64,
    /// From opening the inputs to the last tensor written and synced.
    pub seconds: f64,
    /// (bytes_read + bytes_written) / seconds / 1e9.
    pub gb_per_s: f64,
    pub side_files: Vec<String>,
    pub notes: Vec<String>,
}

/// Merges as `cfg` says into the folder `out`.
pub fn merge(dev: &Device, cfg: &MergeConfig, out: &Path, opts: &MergeOptions) -> Result<MergeReport> {
    match cfg.method {
        Method::GreedySoup => return crate::soup::greedy_soup(dev, cfg, out, opts),
        Method::Atlas => return crate::atlas::atlas(dev, cfg, out, opts),
        _ => {}
    }
    let t0 = Instant::now();
    // Inputs in order: the base first (task-vector methods, slerp), then the contributing models.
    let entries: Vec<&ModelEntry> = match cfg.method {
        Method::Linear => cfg.models.iter().collect(),
        _ => cfg.base.iter().chain(cfg.task_models()).collect(),
    };
    let ckpts = entries.iter().map(|e| Checkpoint::open(&e.path)).collect::<std::result::Result<Vec<_>, _>>()?;
    check_same_tensors(&ckpts)?;
    let plan = plan_output(&ckpts[0], cfg.dtype)?;
    let staging = Staging::new(out, opts.force)?;
    let mut bytes_read = 0u64;
    let mut copied = 0usize;
    let ntensors = plan.len();
    let bytes_written = write_shards(&staging.tmp, plan, opts.shard_size, |p| {
        let (dtype, _) = ckpts[0].info(&p.name)?;
        if !dtype.is_float() {
            let raw = ckpts[0].get_raw(&p.name)?;
            bytes_read += raw.bytes.len() as u64;
            copied += 1;
            return Ok(raw.bytes.to_vec());
        }
        let mut xs = Vec::with_capacity(ckpts.len());
        for c in &ckpts {
            bytes_read += c.get_raw(&p.name)?.bytes.len() as u64;
            xs.push(c.get_f32(&p.name)?);
        }
        let merged = merge_tensor(dev, cfg, &p.name, xs)?;
        Ok(encode(&merged, p.dtype))
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    let side_files = copy_side_files(&entries[0].path, &staging.tmp)?;
    let report = MergeReport {
        method: cfg.method.as_str().into(),
        inputs: entries.iter().map(|e| e.path.display().to_string()).collect(),
        output: out.display().to_string(),
        adapter: dev.info().name.clone(),
        tensors: ntensors,
        copied,
        bytes_read,
        bytes_written,
        seconds,
        gb_per_s: (bytes_read + bytes_written) as f64 / seconds.max(1e-9) / 1e9,
        side_files,
        notes: cfg.notes.clone(),
    };
    write_report(&staging.tmp, &report)?;
    staging.commit()?;
    Ok(report)
}

pub(crate) fn write_report(dir: &Path, report: &impl Serialize) -> Result<()> {
    let path = dir.join("merge_report.json");
    let text = serde_json::to_string_pretty(report).map_err(|e| Error::Invalid(e.to_string()))?;
    std::fs::write(&path, text)
        .map_err(|e| Error::Output { path: path.display().to_string(), msg: format!("cannot write: {e}") })
}

/// Every checkpoint must hold the reference's tensor names with the same shapes.
pub(crate) fn check_same_tensors(ckpts: &[Checkpoint]) -> Result<()> {
    let r = &ckpts[0];
    let rnames = r.names();
    for c in &ckpts[1..] {
        let names = c.names();
        if let Some(n) = rnames.iter().find(|n| !c.contains(n)) {
            return Err(Error::Tensor {
                tensor: n.to_string(),
                msg: format!("in {} but not in {}", r.path().display(), c.path().display()),
            });
        }
        if let Some(n) = names.iter().find(|n| !r.contains(n)) {
            return Err(Error::Tensor {
                tensor: n.to_string(),
                msg: format!("in {} but not in {}", c.path().display(), r.path().display()),
            });
        }
        for n in &rnames {
            let (_, a) = r.info(n)?;
            let (_, b) = c.info(n)?;
            if a != b {
                return Err(Error::Tensor {
                    tensor: n.to_string(),
                    msg: format!("shape {a:?} in {} but {b:?} in {}", r.path().display(), c.path().display()),
                });
            }
        }
    }
    Ok(())
}

pub(crate) fn plan_output(reference: &Checkpoint, dtype: Option<OutDtype>) -> Result<Vec<Planned>> {
    let mut plan = Vec::new();
    for n in reference.names() {
        let (dt, shape) = reference.info(n)?;
        let out = if !dt.is_float() {
            dt
        } else {
            match dtype {
                Some(OutDtype::F32) => Dtype::F32,
                Some(OutDtype::F16) => Dtype::F16,
                Some(OutDtype::BF16) => Dtype::BF16,
                None => dt,
            }
        };
        plan.push(Planned { name: n.to_string(), dtype: out, shape: shape.to_vec() });
    }
    Ok(plan)
}

fn param(p: &Option<Param>, tensor: &str, default: f64) -> f64 {
    p.as_ref().and_then(|p| p.for_tensor(tensor)).unwrap_or(default)
}

/// Merges one tensor; `xs[0]` is the base for every method but linear.
fn merge_tensor(dev: &Device, cfg: &MergeConfig, name: &str, mut xs: Vec<Vec<f32>>) -> Result<Vec<f32>> {
    let l = xs[0].len();
    let terr = |msg: String| Error::Tensor { tensor: name.to_string(), msg };
    let lambda = cfg.lambda.for_tensor(name).unwrap_or(1.0) as f32;
    match cfg.method {
        Method::Linear => {
            let mut w: Vec<f32> = cfg.models.iter().map(|m| param(&m.weight, name, 1.0) as f32).collect();
            if cfg.normalize {
                let s: f32 = w.iter().sum();
                if s.abs() < 1e-12 {
                    return Err(terr(format!("linear weights {w:?} sum to 0; set `normalize: false`")));
                }
                w.iter_mut().for_each(|x| *x /= s);
            }
            let stacked: Vec<f32> = xs.concat();
            drop(xs);
            weighted_sum(dev, name, &stacked, w.len(), l, &w)
        }
        Method::Slerp => {
            let t = cfg
                .t
                .as_ref()
                .and_then(|t| t.for_tensor(name))
                .ok_or_else(|| terr("no `t` filter matches this tensor (add an entry without filter)".into()))?;
            check_binding(dev, name, l, "slerp needs the whole tensor for its norms")?;
            let a = dev.upload_f32(&xs[0], &[l])?;
            let b = dev.upload_f32(&xs[1], &[l])?;
            let out = dev.empty(&[l], DType::F32)?;
            dev.run(&k::merge_slerp_forward(dev, &out, &a, &b, t as f32)?)?;
            Ok(dev.download_f32(&out)?)
        }
        m => {
            let base = xs.remove(0);
            let models = cfg.task_models();
            let w: Vec<f32> = models.iter().map(|m| param(&m.weight, name, 1.0) as f32).collect();
            let dens: Vec<f64> = models.iter().map(|m| param(&m.density, name, 1.0)).collect();
            if let Some(d) = dens.iter().find(|d| !(**d > 0.0 && **d <= 1.0)) {
                return Err(terr(format!("density {d} is outside (0, 1]")));
            }
            // Task vectors, sparsified per model.
            let mut deltas: Vec<Vec<f32>> =
                xs.into_iter().map(|x| x.iter().zip(&base).map(|(a, b)| a - b).collect()).collect();
            for (i, d) in deltas.iter_mut().enumerate() {
                match m {
                    Method::Ties if dens[i] < 1.0 => *d = magnitude_trim(dev, name, d, dens[i])?,
                    Method::DareLinear | Method::DareTies if dens[i] < 1.0 => {
                        let mask = dare_mask(cfg.seed, name, i, l, dens[i] as f32);
                        *d = dare(dev, name, d, &mask, dens[i] as f32)?;
                    }
                    _ => {}
                }
            }
            let mixed = if matches!(m, Method::Ties | Method::DareTies) {
                ties_consensus(&deltas, &w, cfg.normalize)
            } else {
                let mut ws = w.clone();
                if cfg.normalize {
                    let s: f32 = ws.iter().sum();
                    let div = if s.abs() < 1e-8 { 1.0 } else { s };
                    ws.iter_mut().for_each(|x| *x /= div);
                }
                let stacked = deltas.concat();
                drop(deltas);
                weighted_sum(dev, name, &stacked, ws.len(), l, &ws)?
            };
            Ok(base.iter().zip(&mixed).map(|(b, d)| b + lambda * d).collect())
        }
    }
}

pub(crate) fn check_binding(dev: &Device, name: &str, l: usize, why: &str) -> Result<()> {
    if (l as u64) * 4 > dev.max_binding() {
        return Err(Error::Tensor {
            tensor: name.to_string(),
            msg: format!(
                "{l} elements ({} bytes as f32) exceed the device's storage binding limit of {} bytes; {why}, and \
                 splitting it would change the result",
                l * 4,
                dev.max_binding()
            ),
        });
    }
    Ok(())
}

/// Column chunk width so that `rows` stacked f32 rows fit one binding.
fn chunk_cols(dev: &Device, rows: usize, l: usize) -> usize {
    let max = (dev.max_binding() / 4 / rows.max(1) as u64).min(u32::MAX as u64 / rows.max(1) as u64) as usize;
    // Keep chunks a multiple of 64 elements (workgroup size) when they split.
    if l <= max {
        l
    } else {
        (max / 64 * 64).max(1)
    }
}

/// out [L] = sum_i w[i] * rows[i] on the GPU, in column chunks when [N, L] exceeds one binding.
pub(crate) fn weighted_sum(dev: &Device, _name: &str, rows: &[f32], n: usize, l: usize, w: &[f32]) -> Result<Vec<f32>> {
    let cols = chunk_cols(dev, n, l);
    if cols == l {
        let xs = dev.upload_f32(rows, &[n, l])?;
        let out = dev.empty(&[l], DType::F32)?;
        dev.run(&k::merge_weighted_sum_forward(dev, &out, &xs, w)?)?;
        return Ok(dev.download_f32(&out)?);
    }
    let mut res = Vec::with_capacity(l);
    let mut c0 = 0;
    while c0 < l {
        let c1 = (c0 + cols).min(l);
        let mut chunk = Vec::with_capacity(n * (c1 - c0));
        for i in 0..n {
            chunk.extend_from_slice(&rows[i * l + c0..i * l + c1]);
        }
        let xs = dev.upload_f32(&chunk, &[n, c1 - c0])?;
        let out = dev.empty(&[c1 - c0], DType::F32)?;
        dev.run(&k::merge_weighted_sum_forward(dev, &out, &xs, w)?)?;
        res.extend(dev.download_f32(&out)?);
        c0 = c1;
    }
    Ok(res)
}

/// Keeps the int(density * L) largest |x| of one task vector (mergekit's `magnitude`, no rescale).
pub(crate) fn magnitude_trim(dev: &Device, name: &str, d: &[f32], density: f64) -> Result<Vec<f32>> {
    let l = d.len();
    check_binding(dev, name, l, "TIES' top-k by magnitude needs the whole tensor at once")?;
    let xs = dev.upload_f32(d, &[1, l])?;
    let out = dev.empty(&[1, l], DType::F32)?;
    dev.run(&k::merge_magnitude_mask_forward(dev, &out, &xs, density)?)?;
    Ok(dev.download_f32(&out)?)
}

/// DARE: d * mask / density, elementwise, in chunks that fit one binding.
pub(crate) fn dare(dev: &Device, _name: &str, d: &[f32], mask: &[f32], density: f32) -> Result<Vec<f32>> {
    let l = d.len();
    let cols = chunk_cols(dev, 1, l);
    let mut res = Vec::with_capacity(l);
    let mut c0 = 0;
    while c0 < l {
        let c1 = (c0 + cols).min(l);
        let w = c1 - c0;
        let xs = dev.upload_f32(&d[c0..c1], &[1, w])?;
        let m = dev.upload_f32(&mask[c0..c1], &[1, w])?;
        let out = dev.empty(&[1, w], DType::F32)?;
        dev.run(&k::merge_dare_forward(dev, &out, &xs, &m, density)?)?;
        res.extend(dev.download_f32(&out)?);
        c0 = c1;
    }
    Ok(res)
}

fn fnv1a64(s: &str) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// DARE keep-mask (1 keep, 0 drop) for task model `i` of tensor `name`; see the module doc.
pub fn dare_mask(seed: u64, name: &str, i: usize, l: usize, density: f32) -> Vec<f32> {
    let mut state = seed ^ fnv1a64(name) ^ (i as u64 + 1).wrapping_mul(0x9E3779B97F4A7C15);
    (0..l)
        .map(|_| {
            state = state.wrapping_add(0x9E3779B97F4A7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            let u = (z >> 40) as f32 / (1u64 << 24) as f32;
            if u < density {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}

/// mergekit's sign consensus ("sum") and disjoint merge over weighted deltas y_i = w_i d_i.
fn ties_consensus(deltas: &[Vec<f32>], w: &[f32], normalize: bool) -> Vec<f32> {
    let l = deltas[0].len();
    let mut out = vec![0.0f32; l];
    for (j, o) in out.iter_mut().enumerate() {
        let s: f32 = deltas.iter().zip(w).map(|(d, &wi)| wi * d[j]).sum();
        let majority = if s >= 0.0 { 1.0 } else { -1.0 };
        let (mut num, mut div) = (0.0f32, 0.0f32);
        for (d, &wi) in deltas.iter().zip(w) {
            let y = wi * d[j];
            if y != 0.0 && (y > 0.0) == (majority > 0.0) {
                num += y;
                div += wi;
            }
        }
        *o = if normalize { num / if div == 0.0 { 1.0 } else { div } } else { num };
    }
    out
}
