//! The merge loop: check that every input holds the same tensor names and shapes, plan the output, then for
//! each tensor read it from every input, merge it in the GPU merge kernels, and stream it into the output.
//! Formulas are mergekit 0.1.5's, in its dtype semantics (`dtype`: the compute dtype, inputs rounded to it on
//! load, every step rounded where torch rounds; see the `sparse` module):
//! - linear: sum_i w_i x_i (fused, f32), divided by sum_i w_i when `normalize` (`merge_linear_forward`);
//! - task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs(_ties), della(_linear): mergekit's generalized
//!   task arithmetic (`merge_gta_forward` after the sparsifying kernels), and sce (`merge_sce_forward`): see
//!   the `sparse` module;
//! - slerp: `merge_slerp_forward(base, other, t)`.
//!
//! Streaming: a tensor is processed in chunks of `chunk` elements (`DEFAULT_CHUNK`, or
//! [`merge_with_chunk`]): each chunk of each input is converted to f32 straight from the mapped file into a
//! stacked GPU buffer, merged, read back, encoded and written to the output file, and the mapped pages it came
//! from are released (`Checkpoint::release`), so that resident memory holds a chunk of each input, not the
//! models. All arithmetic runs in kernels. The methods that need whole-tensor statistics hold whole tensors on
//! the GPU: the sparsifying ones with density < 1 (top-k thresholds, ranks, L1 norms; the N sparsified task
//! vectors stay on the GPU, then the combine runs chunk by chunk), sce, and SLERP (the norms and dot of the two
//! inputs). Peak memory is therefore about (inputs + 1) x the largest tensor for those, and a few chunks
//! otherwise; their tensors must fit one storage binding each (splitting would change the result).
//!
//! DARE's keep-mask is drawn on the CPU: for model i (0-based among the task models) and tensor `name`, a
//! SplitMix64 stream seeded with `seed ^ fnv1a64(name) ^ (i + 1) * 0x9E3779B97F4A7C15` yields one u64 per
//! element in order; the element is kept when `(u >> 40) as f32 / 2^24 < density`.

use std::path::Path;
use std::time::Instant;

use rime_io::{Checkpoint, Dtype};
use rime_kernels::ops::merge as k;
use rime_kernels::ops::merge_sparse as k2;
use rime_kernels::{DType, Device, Tensor};
use serde::Serialize;

use crate::config::{MergeConfig, Method, ModelEntry, OutDtype, Param};
use crate::output::{copy_side_files, write_shards_streaming, Planned, Staging, TensorSink, DEFAULT_SHARD_SIZE};

/// Elements per streamed chunk (1 MiB of f32 per input).
pub const DEFAULT_CHUNK: usize = 1 << 18;
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
    merge_with_chunk(dev, cfg, out, opts, DEFAULT_CHUNK)
}

/// [`merge`] streaming `chunk` elements of each input at a time (at least 1; lowered where a stack of
/// chunks would exceed the device's storage binding limit). The result does not depend on it.
pub fn merge_with_chunk(
    dev: &Device,
    cfg: &MergeConfig,
    out: &Path,
    opts: &MergeOptions,
    chunk: usize,
) -> Result<MergeReport> {
    cfg.check_values()?;
    match cfg.method {
        Method::GreedySoup => return crate::soup::greedy_soup(dev, cfg, out, opts),
        Method::Atlas => return crate::atlas::atlas(dev, cfg, out, opts),
        _ => {}
    }
    if !cfg.layout.slices.is_empty() {
        return crate::slices::merge_slices(dev, cfg, out, opts, chunk);
    }
    let t0 = Instant::now();
    // Inputs in order: the base first (task-vector methods, slerp), then the contributing models.
    let entries: Vec<&ModelEntry> = match cfg.method {
        Method::Linear => cfg.models.iter().collect(),
        m if crate::geometric::handles(m) => crate::geometric::entries(cfg),
        _ => cfg.base.iter().chain(cfg.task_models()).collect(),
    };
    let ckpts = entries.iter().map(|e| Checkpoint::open(&e.path)).collect::<std::result::Result<Vec<_>, _>>()?;
    let paths: Vec<&Path> = entries.iter().map(|e| e.path.as_path()).collect();
    let vocab = crate::tokenizer::Vocab::prepare(cfg, &paths, &entries[0].path)?;
    // With a tokenizer_source, vocabulary tensors may differ in rows: they are re-indexed before merging.
    let rows_may_differ = |n: &str| vocab.is_some() && crate::tokenizer::is_vocab_tensor(n);
    check_same_tensors(&ckpts, &rows_may_differ)?;
    let mut plan = plan_output(&ckpts[0], cfg.dtype)?;
    if let Some(v) = &vocab {
        for p in plan.iter_mut().filter(|p| rows_may_differ(&p.name) && !p.shape.is_empty()) {
            p.shape[0] = v.rows();
        }
    }
    let base_at = cfg.base.as_ref().and_then(|b| paths.iter().position(|p| canon(p) == canon(&b.path)));
    // Gradient lists: a layer tensor's position is its layer index over the model's layers (mergekit turns
    // `models` into one slice of all layers); other tensors sit at 0.
    let nlayers = crate::slices::layer_count(&ckpts[0]);
    let refs: Vec<&Checkpoint> = ckpts.iter().collect();
    let inputs: Vec<&Path> = entries.iter().map(|e| e.path.as_path()).collect();
    let staging = Staging::new(out, opts.force, &inputs)?;
    let mut bytes_read = 0u64;
    let mut copied = 0usize;
    let ntensors = plan.len();
    // Rows stacked at once: the inputs, plus one (the base) for the methods that add it at the end.
    let rows = ckpts.len() as u64 + 1;
    let chunk = (chunk.max(1) as u64).min((dev.max_binding() / 4 / rows).max(1)) as usize;
    let bytes_written = write_shards_streaming(&staging.tmp, plan, opts.shard_size, |p, sink| {
        let (dtype, _) = ckpts[0].info(&p.name)?;
        if !dtype.is_float() {
            let raw = ckpts[0].get_raw(&p.name)?;
            bytes_read += raw.bytes.len() as u64;
            copied += 1;
            sink.write_bytes(raw.bytes)?;
            ckpts[0].release(&p.name, ..)?;
            return Ok(());
        }
        for c in &ckpts {
            bytes_read += c.get_raw(&p.name)?.bytes.len() as u64;
        }
        let rcfg = cfg.at_tensor(&p.name, &[], crate::slices::layer_position(&p.name, nlayers));
        let src = vec![p.name.as_str(); refs.len()];
        let ins: Vec<(&Checkpoint, &str)> = refs.iter().map(|c| (*c, p.name.as_str())).collect();
        let permuted =
            crate::tokenizer::maybe_permute(vocab.as_ref(), &p.name, &ins, base_at, &staging.tmp.join(VOCAB_DIR))?;
        let prefs: Vec<&Checkpoint> = permuted.iter().flatten().collect();
        let prec = precision_of(rcfg.compute_dtype, if permuted.is_some() { &prefs } else { &refs }, &src)?;
        let t = TensorMerge {
            dev,
            cfg: &rcfg,
            ckpts: if permuted.is_some() { &prefs } else { &refs },
            src: &src,
            name: &p.name,
            l: p.shape.iter().product(),
            chunk,
            prec,
        };
        t.run(sink, p.dtype)?;
        for c in &ckpts {
            c.release(&p.name, ..)?;
        }
        Ok(())
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    remove_vocab_dir(&staging.tmp)?;
    let mut side_files = copy_side_files(&entries[0].path, &staging.tmp)?;
    side_files.extend(crate::tokenizer::finish(cfg, vocab.as_ref(), &entries[0].path, &paths, &staging.tmp)?);
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
        notes: cfg.notes.iter().chain(&staging.notes).cloned().collect(),
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

/// Where re-indexed vocabulary tensors are written during a merge (inside the staging folder).
pub(crate) const VOCAB_DIR: &str = ".rime-vocab";

/// Removes [`VOCAB_DIR`] from the staging folder before it is committed.
pub(crate) fn remove_vocab_dir(tmp: &Path) -> Result<()> {
    let d = tmp.join(VOCAB_DIR);
    if d.exists() {
        std::fs::remove_dir_all(&d)
            .map_err(|e| Error::Output { path: d.display().to_string(), msg: format!("cannot remove: {e}") })?;
    }
    Ok(())
}

fn canon(p: &Path) -> std::path::PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Every checkpoint must hold the reference's tensor names with the same shapes (the first axis excepted
/// where `rows_may_differ`).
pub(crate) fn check_same_tensors(ckpts: &[Checkpoint], rows_may_differ: &dyn Fn(&str) -> bool) -> Result<()> {
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
            let differ = if rows_may_differ(n) { a.get(1..) != b.get(1..) } else { a != b };
            if differ {
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
        plan.push(Planned { name: n.to_string(), dtype: out_dtype(dt, dtype), shape: shape.to_vec() });
    }
    Ok(plan)
}

/// The stored type of an output tensor: `dtype` for float tensors when given, else as stored.
pub(crate) fn out_dtype(dt: Dtype, dtype: Option<OutDtype>) -> Dtype {
    if !dt.is_float() {
        return dt;
    }
    match dtype {
        Some(OutDtype::F32) => Dtype::F32,
        Some(OutDtype::F16) => Dtype::F16,
        Some(OutDtype::BF16) => Dtype::BF16,
        None => dt,
    }
}

fn param(p: &Option<Param>, tensor: &str, default: f64) -> f64 {
    p.as_ref().and_then(|p| p.for_tensor(tensor)).unwrap_or(default)
}

/// One tensor of a streamed merge: `ckpts[0]` is the base for every method but linear (and passthrough);
/// `cfg` holds this tensor's parameters as numbers ([`MergeConfig::at_tensor`]).
pub(crate) struct TensorMerge<'a> {
    pub dev: &'a Device,
    pub cfg: &'a MergeConfig,
    pub ckpts: &'a [&'a Checkpoint],
    /// The tensor's name in each input (they differ when `slices` take different layers).
    pub src: &'a [&'a str],
    /// The output tensor's name.
    pub name: &'a str,
    /// Elements of the tensor.
    pub l: usize,
    pub chunk: usize,
    /// The compute dtype (mergekit's `dtype`): inputs are rounded to it on load.
    pub prec: k2::Precision,
}

impl TensorMerge<'_> {
    pub(crate) fn terr(&self, msg: String) -> Error {
        Error::Tensor { tensor: self.name.to_string(), msg }
    }

    /// Chunk ranges [c0, c1) covering the tensor.
    pub(crate) fn chunks(&self) -> impl Iterator<Item = (usize, usize)> {
        let (l, c) = (self.l, self.chunk);
        (0..l.div_ceil(c).max(1)).map(move |i| (i * c, ((i + 1) * c).min(l)))
    }

    /// Elements [c0, c0 + buf.len()) of input `k` as f32, rounded to the compute dtype (mergekit loads in
    /// `dtype`); the mapped pages they came from are released.
    pub(crate) fn read(&self, k: usize, c0: usize, buf: &mut [f32]) -> Result<()> {
        let (ck, name) = (self.ckpts[k], self.src[k]);
        ck.read_f32_into(name, c0, buf)?;
        if self.prec != k2::Precision::F32 {
            buf.iter_mut().for_each(|x| *x = self.prec.round(*x));
        }
        let size = ck.info(name)?.0.size();
        ck.release(name, c0 * size..(c0 + buf.len()) * size)?;
        Ok(())
    }

    /// A GPU tensor [rows.len(), c1 - c0] whose row r holds elements [c0, c1) of input rows[r].
    pub(crate) fn stack(&self, rows: &[usize], c0: usize, c1: usize) -> Result<Tensor> {
        let n = c1 - c0;
        let t = self.dev.empty(&[rows.len(), n], DType::F32)?;
        let mut buf = vec![0f32; n];
        for (r, &k) in rows.iter().enumerate() {
            self.read(k, c0, &mut buf)?;
            write_at(self.dev, &t, r * n, &buf);
        }
        Ok(t)
    }

    /// out [n] = sum_r w[r] * xs[r] (the weighted-sum kernel).
    fn weighted(&self, xs: &Tensor, w: &[f32]) -> Result<Tensor> {
        let out = self.dev.empty(&[xs.shape[1]], DType::F32)?;
        self.dev.run(&k::merge_weighted_sum_forward(self.dev, &out, xs, w)?)?;
        Ok(out)
    }

    pub fn run(&self, sink: &mut TensorSink, dt: Dtype) -> Result<()> {
        let (cfg, name, dev) = (self.cfg, self.name, self.dev);
        match cfg.method {
            Method::Passthrough => {
                // mergekit: the tensor, or the tensor times `scale`.
                let scale = cfg.models.first().and_then(|m| m.scale.as_ref()).and_then(|s| s.for_tensor(name));
                if scale.is_none() && self.ckpts[0].info(self.src[0])?.0 == dt {
                    let raw = self.ckpts[0].get_raw(self.src[0])?;
                    sink.write_bytes(raw.bytes)?;
                    return Ok(());
                }
                let w = [scale.unwrap_or(1.0) as f32];
                for (c0, c1) in self.chunks() {
                    let out = self.weighted(&self.stack(&[0], c0, c1)?, &w)?;
                    sink.write_f32(&read_back(dev, &out, 0, c1 - c0)?, dt)?;
                }
                Ok(())
            }
            Method::Linear => {
                let w: Vec<f32> = cfg.models.iter().map(|m| param(&m.weight, name, 1.0) as f32).collect();
                if cfg.normalize {
                    let s: f32 = w.iter().sum();
                    if s.abs() < 1e-12 {
                        return Err(self.terr(format!("linear weights {w:?} sum to 0; set `normalize: false`")));
                    }
                }
                // mergekit: sum_i w_i x_i (fused, in f32), / sum_i w_i, rounded to the compute dtype.
                let rows: Vec<usize> = (0..w.len()).collect();
                for (c0, c1) in self.chunks() {
                    let xs = self.stack(&rows, c0, c1)?;
                    let out = dev.empty(&[c1 - c0], DType::F32)?;
                    dev.run(&k2::merge_linear_forward(dev, &out, &xs, &w, cfg.normalize, self.prec)?)?;
                    sink.write_f32(&read_back(dev, &out, 0, c1 - c0)?, dt)?;
                }
                Ok(())
            }
            m if m.is_gta() => self.gta(sink, dt),
            Method::Sce => self.sce(sink, dt),
            Method::Slerp => {
                let t = cfg.t.as_ref().and_then(|t| t.for_tensor(name)).ok_or_else(|| {
                    self.terr("no `t` filter matches this tensor (add an entry without filter)".into())
                })?;
                let l = self.l;
                check_binding(dev, name, l, "slerp needs the whole tensor for its norms")?;
                let a = dev.empty(&[l], DType::F32)?;
                let b = dev.empty(&[l], DType::F32)?;
                let mut buf = Vec::new();
                for (c0, c1) in self.chunks() {
                    buf.resize(c1 - c0, 0.0);
                    for (k, dst) in [(0, &a), (1, &b)] {
                        self.read(k, c0, &mut buf)?;
                        write_at(dev, dst, c0, &buf);
                    }
                    flush(dev)?;
                }
                let out = dev.empty(&[l], DType::F32)?;
                dev.run(&k::merge_slerp_forward(dev, &out, &a, &b, t as f32)?)?;
                drop((a, b));
                for (c0, c1) in self.chunks() {
                    sink.write_f32(&read_back(dev, &out, c0, c1 - c0)?, dt)?;
                }
                Ok(())
            }
            m if crate::geometric::handles(m) => crate::geometric::merge_tensor(self, sink, dt),
            m => Err(self.terr(format!("merge_method `{}` is not a streamed tensor merge", m.as_str()))),
        }
    }
}

/// The compute precision of one tensor: the config's `dtype`, else the inputs' stored float type
/// ([`crate::sparse::precision`]), read from each input's own tensor name.
pub(crate) fn precision_of(compute: Option<OutDtype>, ckpts: &[&Checkpoint], src: &[&str]) -> Result<k2::Precision> {
    let stored = ckpts.iter().zip(src).map(|(c, n)| Ok(c.info(n)?.0)).collect::<Result<Vec<_>>>()?;
    Ok(crate::sparse::precision(compute, &stored))
}

/// Queues `vals` into `t` at element `at` (carried out before the next submit).
pub(crate) fn write_at(dev: &Device, t: &Tensor, at: usize, vals: &[f32]) {
    dev.queue().write_buffer(&t.buffer, (at * 4) as u64, bytemuck::cast_slice(vals));
}

/// Submits the queued writes and waits, so that their staging copies are freed before the next ones.
fn flush(dev: &Device) -> Result<()> {
    dev.queue().submit([]);
    Ok(dev.wait()?)
}

/// Copies `n` elements of `src` from element `from` into `dst` at element `to` (queued).
pub(crate) fn copy_at(dev: &Device, src: &Tensor, from: usize, dst: &Tensor, to: usize, n: usize) {
    let mut enc = dev.wgpu_device().create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(&src.buffer, (from * 4) as u64, &dst.buffer, (to * 4) as u64, (n * 4) as u64);
    dev.queue().submit([enc.finish()]);
}

/// Reads `n` f32 elements of `t` from element `at` back to the CPU (waits for the GPU).
pub(crate) fn read_back(dev: &Device, t: &Tensor, at: usize, n: usize) -> Result<Vec<f32>> {
    let size = (n.max(1) * 4) as u64;
    let staging = dev.wgpu_device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("rime merge readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = dev.wgpu_device().create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(&t.buffer, (at * 4) as u64, &staging, 0, (n * 4) as u64);
    dev.queue().submit([enc.finish()]);
    let bytes = dev.map_read(&staging)?;
    Ok(bytes[..n * 4].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
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

/// DARE's keep-mask stream for task model `i` of tensor `name` (see the module doc), drawn chunk by chunk.
struct DareStream {
    state: u64,
    density: f32,
}

impl DareStream {
    fn new(seed: u64, name: &str, i: usize, density: f32) -> Self {
        DareStream { state: seed ^ fnv1a64(name) ^ (i as u64 + 1).wrapping_mul(0x9E3779B97F4A7C15), density }
    }

    /// The next uniform draw in [0, 1) (24 bits).
    fn uniform(&mut self) -> f32 {
        self.state = self.state.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    /// The next `out.len()` mask values (1 keep, 0 drop).
    fn fill(&mut self, out: &mut [f32]) {
        for o in out {
            *o = if self.uniform() < self.density { 1.0 } else { 0.0 };
        }
    }
}

/// DARE keep-mask (1 keep, 0 drop) for task model `i` of tensor `name`; see the module doc.
pub fn dare_mask(seed: u64, name: &str, i: usize, l: usize, density: f32) -> Vec<f32> {
    let mut out = vec![0.0; l];
    DareStream::new(seed, name, i, density).fill(&mut out);
    out
}

/// The uniform draws in [0, 1) behind [`dare_mask`] (u < density keeps), which DELLA compares with its
/// rank-dependent keep probabilities.
pub fn merge_uniforms(seed: u64, name: &str, i: usize, l: usize) -> Vec<f32> {
    let mut st = DareStream::new(seed, name, i, 0.0);
    (0..l).map(|_| st.uniform()).collect()
}
