//! mergekit's `slices`: the output is built from layer ranges of the inputs, slice after slice.
//!
//! ```yaml
//! slices:
//!   - sources:
//!       - {model: a, layer_range: [0, 4]}
//!   - sources:
//!       - {model: b, layer_range: [2, 6]}
//! merge_method: passthrough
//! ```
//!
//! As mergekit 0.1.5 plans it (`mergekit/plan.py`): the output's layers are numbered from 0 across the slices in
//! order; layer k of a slice merges layer `layer_range[0] + k` of each of its sources with the slice's method
//! and parameters (source > slice > global precedence), at gradient position `k / (n - 1)` (1 for a slice of
//! one layer). Tensors outside the layers are merged at position 0: those before the layers (embeddings) from
//! the first slice's sources, those after them (final norm, `lm_head`, pooler) from the last slice's sources.
//! config.json's layer count (`num_hidden_layers`, or `n_layer` / `num_layers`) becomes the sum of the slice
//! lengths; the other side files come from `base_model`, else the first slice's first source. (mergekit pairs
//! the last slice's sources with as many weights as the first slice has sources, so a last slice with more
//! sources than the first loses some there; rime merges all of them.)
//!
//! Layers are found by name: the first `.N.` component after `layers`, `layer`, `h` or `blocks`
//! (`model.layers.N.` for Llama, `encoder.layer.N.` for BERT); every input must hold the same layer tensors in
//! every layer and the same tensors outside them. A tensor outside the layers counts as "before" when its name
//! holds `embed`, `wte`, `wpe` or `position_ids`, else as "after" (mergekit takes this from its architecture
//! tables).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rime_io::Checkpoint;
use rime_kernels::Device;
use serde_json::Value;

use crate::config::{chain, MergeConfig, Method, ModelEntry, Param};
use crate::engine::{out_dtype, write_report, MergeOptions, MergeReport, TensorMerge};
use crate::output::{copy_side_files, write_shards_streaming, Planned, Staging};
use crate::{Error, Result};

/// One source of a slice: a model and the layers `[layer_range.0, layer_range.1)` it contributes.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceSource {
    /// The model, with its parameters already chained: source, then slice, then global.
    pub model: ModelEntry,
    pub layer_range: (usize, usize),
}

/// One output slice: its sources (all spanning the same number of layers) and the slice's own parameters
/// (`lambda`, `t`, `normalize`, ... for this slice; per-model ones are folded into the sources).
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    pub sources: Vec<SliceSource>,
    pub params: Vec<(String, Param)>,
}

impl Slice {
    fn layers(&self) -> usize {
        self.sources.first().map(|s| s.layer_range.1 - s.layer_range.0).unwrap_or(0)
    }
}

type ParseParams<'a> = dyn Fn(Option<&Value>, &str, &[&str]) -> Result<Vec<(String, Param)>> + 'a;

/// Parses the `slices` list (parameters through `parse_params`, model names through `resolve`).
pub(crate) fn parse(
    v: &Value,
    method: Method,
    allowed_global: &[&str],
    parse_params: &ParseParams,
    gparams: &[(String, Param)],
    resolve: &dyn Fn(&str, &str) -> Result<PathBuf>,
    err: &dyn Fn(String) -> Error,
) -> Result<Vec<Slice>> {
    let list = v.as_array().ok_or_else(|| err(format!("`slices` must be a list of {{sources: [...]}}, found {v}")))?;
    if list.is_empty() {
        return Err(err("`slices` is empty".into()));
    }
    let get = |ps: &[(String, Param)], k: &str| ps.iter().find(|(n, _)| n == k).map(|(_, p)| p.clone());
    let mut out = Vec::new();
    for (i, s) in list.iter().enumerate() {
        let o = s.as_object().ok_or_else(|| err(format!("slices[{i}]: expected {{sources: [...]}}, found {s}")))?;
        for k in o.keys() {
            match k.as_str() {
                "sources" | "parameters" => {}
                "base_model" | "residual_weight" => {
                    return Err(err(format!("slices[{i}]: `{k}` is not supported (give base_model at the top level)")))
                }
                _ => return Err(err(format!("slices[{i}]: unknown key `{k}` (known: sources, parameters)"))),
            }
        }
        let sp = parse_params(o.get("parameters"), &format!("slices[{i}] parameters"), allowed_global)?;
        let srcs = match o.get("sources") {
            Some(Value::Array(a)) if !a.is_empty() => a,
            Some(v) => return Err(err(format!("slices[{i}]: `sources` must be a non-empty list, found {v}"))),
            None => return Err(err(format!("slices[{i}]: `sources` is missing"))),
        };
        let mut sources = Vec::new();
        for (j, src) in srcs.iter().enumerate() {
            let at = format!("slices[{i}].sources[{j}]");
            let so = src
                .as_object()
                .ok_or_else(|| err(format!("{at}: expected {{model, layer_range, parameters}}, found {src}")))?;
            if let Some(k) = so.keys().find(|k| !["model", "layer_range", "parameters"].contains(&k.as_str())) {
                return Err(err(format!("{at}: unknown key `{k}` (known: model, layer_range, parameters)")));
            }
            let name = so
                .get("model")
                .and_then(Value::as_str)
                .ok_or_else(|| err(format!("{at}: `model` is missing or not a string")))?;
            let path = resolve(name, &at)?;
            let range = match so.get("layer_range") {
                Some(Value::Array(a)) if a.len() == 2 && a.iter().all(|x| x.as_u64().is_some()) => {
                    let (a, b) = (a[0].as_u64().unwrap_or(0) as usize, a[1].as_u64().unwrap_or(0) as usize);
                    if a >= b {
                        return Err(err(format!(
                            "{at} (`{name}`): layer_range [{a}, {b}] is empty (it takes layers a..b, b excluded)"
                        )));
                    }
                    (a, b)
                }
                Some(v) => {
                    return Err(err(format!(
                        "{at} (`{name}`): layer_range must be [first, end] (two non-negative integers), found {v}"
                    )))
                }
                None => return Err(err(format!("{at} (`{name}`): `layer_range` is missing"))),
            };
            let p = parse_params(so.get("parameters"), &format!("{at} (`{name}`) parameters"), method.model_params())?;
            let pick = |k: &str| chain(chain(get(&p, k), get(&sp, k)), get(gparams, k));
            sources.push(SliceSource {
                model: ModelEntry {
                    name: name.to_string(),
                    path,
                    weight: pick("weight"),
                    density: pick("density"),
                    scale: pick("scale"),
                    gamma: pick("gamma"),
                    epsilon: pick("epsilon"),
                },
                layer_range: range,
            });
        }
        let lens: Vec<usize> = sources.iter().map(|s| s.layer_range.1 - s.layer_range.0).collect();
        if lens.iter().any(|&l| l != lens[0]) {
            return Err(err(format!(
                "slices[{i}]: the sources span different numbers of layers ({lens:?}); every source of a slice must \
                 give the same number"
            )));
        }
        out.push(Slice { sources, params: sp });
    }
    Ok(out)
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Checks each slice's sources against its method (called by `MergeConfig::check_inputs`).
pub(crate) fn check(cfg: &MergeConfig) -> Result<()> {
    let err = |msg: String| Error::Config { file: cfg.source.display().to_string(), msg };
    if !cfg.models.is_empty() {
        return Err(err("give either `models` or `slices`, not both (as mergekit)".into()));
    }
    let base = cfg.base.as_ref().map(|b| canon(&b.path));
    for (i, s) in cfg.layout.slices.iter().enumerate() {
        let n = s.sources.len();
        let has_base = base.as_ref().is_some_and(|b| s.sources.iter().any(|x| &canon(&x.model.path) == b));
        let others = s.sources.iter().filter(|x| Some(canon(&x.model.path)) != base).count();
        let m = cfg.method.as_str();
        match cfg.method {
            Method::Passthrough if n != 1 => {
                return Err(err(format!(
                    "slices[{i}]: passthrough takes exactly one source per slice, {n} given (stack layers with one \
                     slice per source)"
                )))
            }
            Method::Passthrough | Method::Linear => {}
            _ if !has_base => {
                return Err(err(format!(
                    "slices[{i}]: merge_method `{m}` merges model - base, and base_model `{}` is not among this \
                     slice's sources (list it with the layer_range to use)",
                    cfg.base.as_ref().map(|b| b.name.as_str()).unwrap_or("?")
                )))
            }
            Method::Slerp if others != 1 => {
                return Err(err(format!(
                    "slices[{i}]: slerp interpolates base_model and exactly one other source; {others} others listed"
                )))
            }
            _ if others == 0 => {
                return Err(err(format!("slices[{i}]: `{m}` needs at least one source besides base_model")))
            }
            _ => {}
        }
        if let Some(x) = s.sources.iter().filter(|x| Some(canon(&x.model.path)) == base).nth(1) {
            return Err(err(format!("slices[{i}]: base_model `{}` is listed twice", x.model.name)));
        }
    }
    Ok(())
}

/// Splits `prefix.N.rest` where the component before `N` is `layers`, `layer`, `h` or `blocks`:
/// (`prefix.` , N, `rest`).
pub(crate) fn split_layer(name: &str) -> Option<(String, usize, String)> {
    let parts: Vec<&str> = name.split('.').collect();
    for i in 1..parts.len().saturating_sub(1) {
        if ["layers", "layer", "h", "blocks"].contains(&parts[i - 1]) {
            if let Ok(n) = parts[i].parse::<usize>() {
                if !parts[i].is_empty() && parts[i].bytes().all(|b| b.is_ascii_digit()) {
                    return Some((format!("{}.", parts[..i].join(".")), n, parts[i + 1..].join(".")));
                }
            }
        }
    }
    None
}

/// Layers of a checkpoint: one more than the largest layer index in its tensor names (0 without layers).
pub(crate) fn layer_count(c: &Checkpoint) -> usize {
    c.names().iter().filter_map(|n| split_layer(n)).map(|(_, i, _)| i + 1).max().unwrap_or(0)
}

/// A tensor's gradient position in a model merged whole: layer i of L sits at i / (L - 1) (1 when L is 1),
/// tensors outside the layers at 0 (mergekit's `models` form: one slice of all layers).
pub fn layer_position(name: &str, layers: usize) -> f64 {
    match split_layer(name) {
        Some((_, i, _)) if layers > 1 => i as f64 / (layers - 1) as f64,
        Some(_) => 1.0,
        None => 0.0,
    }
}

/// Before the layers (embeddings) or after them (norm, head, pooler).
fn is_pre(name: &str) -> bool {
    ["embed", "wte", "wpe", "position_ids"].iter().any(|k| name.contains(k))
}

/// How a checkpoint's tensors are laid out: one layer stack.
#[derive(Debug, PartialEq)]
struct Arch {
    prefix: String,
    layers: usize,
    /// Tensor names within a layer (after `prefix.N.`), the same set in every layer.
    suffixes: BTreeSet<String>,
    pre: Vec<String>,
    post: Vec<String>,
}

impl Arch {
    fn of(c: &Checkpoint) -> Result<Arch> {
        let file = c.path().display().to_string();
        let err = |msg: String| Error::Config { file: file.clone(), msg };
        let mut prefix: Option<String> = None;
        let mut per: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
        let (mut pre, mut post) = (Vec::new(), Vec::new());
        for n in c.names() {
            match split_layer(n) {
                Some((p, i, rest)) => {
                    if let Some(q) = &prefix {
                        if *q != p {
                            return Err(err(format!(
                                "tensor `{n}`: a second layer stack (`{p}N.` besides `{q}N.`); slices take one"
                            )));
                        }
                    }
                    prefix = Some(p);
                    per.entry(i).or_default().insert(rest);
                }
                None if is_pre(n) => pre.push(n.to_string()),
                None => post.push(n.to_string()),
            }
        }
        let prefix = prefix.ok_or_else(|| err("no layers found (no `layers.N.` / `layer.N.` tensors)".into()))?;
        let layers = per.keys().max().map(|m| m + 1).unwrap_or(0);
        let first = per.get(&0).cloned().unwrap_or_default();
        for i in 0..layers {
            let got = per.get(&i).cloned().unwrap_or_default();
            if got != first {
                let odd = got.symmetric_difference(&first).next().cloned().unwrap_or_default();
                return Err(err(format!(
                    "layer {i} does not hold the same tensors as layer 0 (`{prefix}{i}.{odd}` / `{prefix}0.{odd}`)"
                )));
            }
        }
        pre.sort();
        post.sort();
        Ok(Arch { prefix, layers, suffixes: first, pre, post })
    }
}

/// One output tensor: which slice it comes from, its gradient position, and its name in each source.
struct Item {
    slice: usize,
    t: f64,
    names: Vec<String>,
}

/// The `slices` merge (see the module doc).
pub(crate) fn merge_slices(
    dev: &Device,
    cfg: &MergeConfig,
    out: &Path,
    opts: &MergeOptions,
    chunk: usize,
) -> Result<MergeReport> {
    let t0 = Instant::now();
    let file = cfg.source.display().to_string();
    let err = |msg: String| Error::Config { file: file.clone(), msg };
    let slices = &cfg.layout.slices;
    // Each distinct model opened once.
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut ckpts: Vec<Checkpoint> = Vec::new();
    let mut archs: Vec<Arch> = Vec::new();
    let mut index: Vec<Vec<usize>> = Vec::new();
    for (i, s) in slices.iter().enumerate() {
        let mut row = Vec::new();
        for (j, src) in s.sources.iter().enumerate() {
            let c = canon(&src.model.path);
            let k = match paths.iter().position(|p| *p == c) {
                Some(k) => k,
                None => {
                    let ck = Checkpoint::open(&src.model.path)?;
                    archs.push(Arch::of(&ck)?);
                    ckpts.push(ck);
                    paths.push(c);
                    paths.len() - 1
                }
            };
            let (a, b) = src.layer_range;
            if b > archs[k].layers {
                return Err(err(format!(
                    "slices[{i}].sources[{j}] (`{}`): layer_range [{a}, {b}] goes beyond the model's {} layers",
                    src.model.name, archs[k].layers
                )));
            }
            row.push(k);
        }
        index.push(row);
    }
    // Same architecture everywhere (mergekit reads one architecture for all inputs).
    let a0 = &archs[0];
    for (k, a) in archs.iter().enumerate().skip(1) {
        let same = a.prefix == a0.prefix && a.suffixes == a0.suffixes && a.pre == a0.pre && a.post == a0.post;
        if !same {
            let what = if a.prefix != a0.prefix {
                format!("layers under `{}N.` and `{}N.`", a0.prefix, a.prefix)
            } else if a.suffixes != a0.suffixes {
                let odd = a.suffixes.symmetric_difference(&a0.suffixes).next().cloned().unwrap_or_default();
                format!("layer tensor `{odd}` in one only")
            } else {
                let (x, y): (BTreeSet<&String>, BTreeSet<&String>) =
                    (a0.pre.iter().chain(&a0.post).collect(), a.pre.iter().chain(&a.post).collect());
                format!("tensor `{}` in one only", x.symmetric_difference(&y).next().map(|s| s.as_str()).unwrap_or(""))
            };
            return Err(err(format!(
                "the sources are of different architectures: {} and {} ({what})",
                paths[0].display(),
                paths[k].display()
            )));
        }
    }
    let base = cfg.base.as_ref().map(|b| canon(&b.path));
    // The plan: pre tensors from slice 0, layers slice by slice, post tensors from the last slice.
    let mut items: BTreeMap<String, Item> = BTreeMap::new();
    let last = slices.len() - 1;
    for (n, si) in a0.pre.iter().map(|n| (n, 0)).chain(a0.post.iter().map(|n| (n, last))) {
        items.insert(n.clone(), Item { slice: si, t: 0.0, names: vec![n.clone(); slices[si].sources.len()] });
    }
    let mut o = 0usize;
    for (si, s) in slices.iter().enumerate() {
        let len = s.layers();
        for k in 0..len {
            let t = if len > 1 { k as f64 / (len - 1) as f64 } else { 1.0 };
            for suf in &a0.suffixes {
                let names = s.sources.iter().map(|x| format!("{}{}.{suf}", a0.prefix, x.layer_range.0 + k)).collect();
                items.insert(format!("{}{o}.{suf}", a0.prefix), Item { slice: si, t, names });
            }
            o += 1;
        }
    }
    let total_layers = o;
    let donor = cfg.base.as_ref().map(|b| b.path.clone()).unwrap_or_else(|| slices[0].sources[0].model.path.clone());
    let inputs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let vocab = crate::tokenizer::Vocab::prepare(cfg, &inputs, &donor)?;
    let is_vocab = |n: &str| vocab.is_some() && crate::tokenizer::is_vocab_tensor(n);
    let mut plan = Vec::new();
    for (n, it) in &items {
        let ck = &ckpts[index[it.slice][0]];
        let (dt, shape) = ck.info(&it.names[0])?;
        let mut shape = shape.to_vec();
        if let (Some(v), true) = (&vocab, is_vocab(n) && !shape.is_empty()) {
            shape[0] = v.rows();
        }
        plan.push(Planned { name: n.clone(), dtype: out_dtype(dt, cfg.dtype), shape });
    }
    // Per slice: the config the engine sees (its sources as `models`, the slice's parameters over the global
    // ones) and the order of inputs (base first for the task-vector methods).
    let mut scfgs = Vec::new();
    let mut orders = Vec::new();
    let mut bases = Vec::new();
    for s in slices {
        let mut c = cfg.clone();
        c.layout.slices = Vec::new();
        c.models = s.sources.iter().map(|x| x.model.clone()).collect();
        let sget = |k: &str| s.params.iter().find(|(n, _)| n == k).map(|(_, p)| p.clone());
        c.lambda = chain(sget("lambda"), Some(cfg.lambda.clone())).unwrap_or(Param::Num(1.0));
        c.t = chain(sget("t"), cfg.t.clone());
        if let Some(Param::Num(x)) = sget("normalize") {
            c.normalize = x != 0.0;
        }
        let is_base = |j: &usize| Some(canon(&s.sources[*j].model.path)) == base;
        let all: Vec<usize> = (0..s.sources.len()).collect();
        let order: Vec<usize> = match cfg.method {
            Method::Linear | Method::Passthrough => all,
            _ => all.iter().copied().filter(is_base).chain(all.iter().copied().filter(|j| !is_base(j))).collect(),
        };
        bases.push(order.iter().position(is_base));
        scfgs.push(c);
        orders.push(order);
    }
    let staging = Staging::new(out, opts.force, &inputs)?;
    let mut bytes_read = 0u64;
    let mut copied = 0usize;
    let ntensors = plan.len();
    let rows = slices.iter().map(|s| s.sources.len()).max().unwrap_or(1) as u64 + 1;
    let chunk = (chunk.max(1) as u64).min((dev.max_binding() / 4 / rows).max(1)) as usize;
    let bytes_written = write_shards_streaming(&staging.tmp, plan, opts.shard_size, |p, sink| {
        let it = &items[&p.name];
        let order = &orders[it.slice];
        let cks: Vec<&Checkpoint> = order.iter().map(|&j| &ckpts[index[it.slice][j]]).collect();
        let src: Vec<&str> = order.iter().map(|&j| it.names[j].as_str()).collect();
        let (_, shape0) = cks[0].info(src[0])?;
        let shape0 = shape0.to_vec();
        for (c, n) in cks.iter().zip(&src) {
            let (_, shape) = c.info(n)?;
            let differ = if is_vocab(&p.name) { shape.get(1..) != shape0.get(1..) } else { shape != shape0.as_slice() };
            if differ {
                return Err(Error::Tensor {
                    tensor: n.to_string(),
                    msg: format!(
                        "shape {shape:?} in {} but {:?} in {} (merged into `{}`)",
                        c.path().display(),
                        shape0,
                        cks[0].path().display(),
                        p.name
                    ),
                });
            }
            bytes_read += c.get_raw(n)?.bytes.len() as u64;
        }
        let (dt0, _) = cks[0].info(src[0])?;
        if !dt0.is_float() {
            copied += 1;
            sink.write_bytes(cks[0].get_raw(src[0])?.bytes)?;
        } else {
            let names: Vec<&str> = it.names.iter().map(|s| s.as_str()).collect();
            let rcfg = scfgs[it.slice].at_tensor(&p.name, &names, it.t);
            let l = p.shape.iter().product();
            let ins: Vec<(&Checkpoint, &str)> = cks.iter().copied().zip(src.iter().copied()).collect();
            let base_at = bases[it.slice];
            let dir = staging.tmp.join(crate::engine::VOCAB_DIR);
            let permuted = crate::tokenizer::maybe_permute(vocab.as_ref(), &p.name, &ins, base_at, &dir)?;
            let prefs: Vec<&Checkpoint> = permuted.iter().flatten().collect();
            let pnames = vec![p.name.as_str(); prefs.len()];
            let (cs, ss) = if permuted.is_some() { (&prefs[..], &pnames[..]) } else { (&cks[..], &src[..]) };
            let prec = crate::engine::precision_of(rcfg.compute_dtype, cs, ss)?;
            TensorMerge { dev, cfg: &rcfg, ckpts: cs, src: ss, name: &p.name, l, chunk, prec }.run(sink, p.dtype)?;
        }
        for (c, n) in cks.iter().zip(&src) {
            c.release(n, ..)?;
        }
        Ok(())
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    crate::engine::remove_vocab_dir(&staging.tmp)?;
    let mut side_files = copy_side_files(&donor, &staging.tmp)?;
    set_layer_count(&staging.tmp.join("config.json"), total_layers)?;
    side_files.extend(crate::tokenizer::finish(cfg, vocab.as_ref(), &donor, &inputs, &staging.tmp)?);
    let mut notes = cfg.notes.clone();
    notes.push(format!("{} slices, {total_layers} output layers", slices.len()));
    notes.extend(staging.notes.iter().cloned());
    let report = MergeReport {
        method: cfg.method.as_str().into(),
        inputs: paths.iter().map(|p| p.display().to_string()).collect(),
        output: out.display().to_string(),
        adapter: dev.info().name.clone(),
        tensors: ntensors,
        copied,
        bytes_read,
        bytes_written,
        seconds,
        gb_per_s: (bytes_read + bytes_written) as f64 / seconds.max(1e-9) / 1e9,
        side_files,
        notes,
    };
    write_report(&staging.tmp, &report)?;
    staging.commit()?;
    Ok(report)
}

/// Sets the layer count in a copied config.json (`num_hidden_layers`, `n_layer` or `num_layers`, whichever it
/// has); nothing when there is no config.json.
fn set_layer_count(path: &Path, layers: usize) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let oerr = |msg: String| Error::Output { path: path.display().to_string(), msg };
    let text = std::fs::read_to_string(path).map_err(|e| oerr(format!("cannot read: {e}")))?;
    let mut v: Value = serde_json::from_str(&text).map_err(|e| oerr(format!("not valid JSON: {e}")))?;
    let o = v.as_object_mut().ok_or_else(|| oerr("config.json is not a JSON object".into()))?;
    let keys: Vec<&str> =
        ["num_hidden_layers", "n_layer", "num_layers"].into_iter().filter(|k| o.contains_key(*k)).collect();
    if keys.is_empty() {
        return Err(oerr(
            "config.json has no layer count (num_hidden_layers, n_layer, num_layers) to set for the sliced model"
                .into(),
        ));
    }
    for k in keys {
        o.insert(k.to_string(), Value::from(layers));
    }
    let text = serde_json::to_string_pretty(&v).map_err(|e| oerr(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| oerr(format!("cannot write: {e}")))
}
