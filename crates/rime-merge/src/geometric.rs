//! mergekit 0.1.5's geometric merges: `model_stock`, `nuslerp`, `multislerp` and `karcher`. Each is, per
//! vector (the whole tensor, each row, or each column), a linear combination of its inputs whose coefficients
//! depend only on the Gram matrix of the inputs (or of their task vectors x_i - base). So each tensor streams
//! twice through the GPU: `merge_gram_forward` chunk by chunk accumulates the Gram matrix (compensated sums),
//! the coefficients are computed here from it (a few numbers per vector, in f64), then `merge_blend_forward`
//! chunk by chunk writes the output. Memory stays at a chunk of each input plus the Gram sums.
//!
//! The formulas, as mergekit computes them (d_i = x_i - base when a base is used):
//! - model_stock (base required, two or more others): per vector (the whole tensor; each row along the last
//!   dimension with `filter_wise`), cos = mean over pairs i < j of clamp(d_i.d_j / max(|d_i||d_j|, 1e-6), -1, 1),
//!   t = N cos / (1 + (N - 1) cos) (0 where |1 + (N - 1) cos| < 1e-6), out = t * mean(x_i) + (1 - t) * base.
//! - nuslerp (exactly two others, base optional): t = w_2 / (w_1 + w_2) (0.5 when |w_1 + w_2| < 1e-6); the
//!   spherical interpolation of (d_1, d_2) (of (x_1, x_2) without base) with the angle of the normalised
//!   vectors (norms clamped at 1e-7), per vector: the whole tensor (`nuslerp_flatten`, default true), else
//!   each row along the last dimension, or each column (`nuslerp_row_wise`, torch's dim 0); the lerp
//!   (1 - t) d_1 + t d_2 where 1 - cos^2 <= 1e-16 in f32; plus the base.
//! - multislerp (one or more others, base optional): the whole tensor; u_i = d_i / (|d_i| + eps), weights w
//!   (divided by their sum with `normalize_weights`, default true), m = sum_i w_i u_i, the result
//!   m/|m| * sum_i w_i |d_i| (+ base). mergekit also adds a tangent term, sum_i w_i (u_i - (u_i.m̂) m̂) mapped
//!   back with the exponential map; that term is zero in exact arithmetic (its norm is rounding noise plus
//!   eps = 1e-8, where cos and sin(x)/x are 1 in f32); it is kept here through its Gram-matrix expression.
//!   With one model the result is that model; where |m| < eps two models are lerped with their weights and
//!   more are an error (as in mergekit).
//! - arcee_fusion (base + one model): see [`fusion`].
//! - karcher (one or more inputs, the base among them when given, alphas 1/K): the weighted Karcher mean on
//!   the unit sphere of the whole tensors (iterated up to `max_iter` times until the tangent norm is below
//!   `tol`), scaled by sum_i alpha_i |x_i|.

use rime_io::Dtype;
use rime_kernels::ops::merge_geo::{self as g, gram_pairs, BlendMode, GeoLayout};
use rime_kernels::{DType, Tensor};

use crate::config::{MergeConfig, Method, ModelEntry, Param};
use crate::engine::{read_back, TensorMerge};
use crate::output::TensorSink;
use crate::{Error, Result};

/// Methods this module merges.
pub(crate) fn handles(m: Method) -> bool {
    matches!(m, Method::ModelStock | Method::Nuslerp | Method::Multislerp | Method::Karcher | Method::ArceeFusion)
}

/// Whether the method reads its base as the origin of task vectors (and so puts it first among the inputs).
fn uses_base(cfg: &MergeConfig) -> bool {
    match cfg.method {
        Method::ModelStock | Method::ArceeFusion => true,
        Method::Nuslerp | Method::Multislerp => cfg.base.is_some(),
        _ => false,
    }
}

/// The inputs in the order the merge reads them: the base first when it is the origin, then the others;
/// karcher: the models as listed, then the base if it is not listed (mergekit's order).
pub(crate) fn entries(cfg: &MergeConfig) -> Vec<&ModelEntry> {
    if uses_base(cfg) {
        return cfg.base.iter().chain(cfg.task_models()).collect();
    }
    let mut v: Vec<&ModelEntry> = cfg.task_models();
    if cfg.method == Method::Karcher {
        v = cfg.models.iter().collect();
        if let Some(b) = &cfg.base {
            if cfg.task_models().len() == cfg.models.len() {
                v.push(b);
            }
        }
    }
    v
}

/// Global parameters of each method with their defaults (mergekit's).
fn defaults(m: Method) -> &'static [(&'static str, f64)] {
    match m {
        Method::ModelStock => &[("filter_wise", 0.0)],
        Method::Nuslerp => &[("nuslerp_flatten", 1.0), ("nuslerp_row_wise", 0.0)],
        Method::Multislerp => &[("normalize_weights", 1.0), ("eps", 1e-8)],
        Method::Karcher => &[("max_iter", 10.0), ("tol", 1e-5)],
        _ => &[],
    }
}

fn number(cfg: &MergeConfig, key: &str) -> f64 {
    let d = defaults(cfg.method).iter().find(|(k, _)| *k == key).map(|(_, v)| *v).unwrap_or(0.0);
    cfg.numbers.get(key).copied().unwrap_or(d)
}

/// Checks the counts of inputs and the parameters of a geometric method.
pub(crate) fn check(cfg: &MergeConfig) -> Result<()> {
    let err = |msg: String| Error::Config { file: cfg.source.display().to_string(), msg };
    let name = cfg.method.as_str();
    for (k, &x) in &cfg.numbers {
        let ok = match k.as_str() {
            "filter_wise" | "nuslerp_flatten" | "nuslerp_row_wise" | "normalize_weights" => x == 0.0 || x == 1.0,
            "max_iter" => x >= 0.0 && x.fract() == 0.0,
            "eps" => x >= 0.0,
            _ => true,
        };
        if !ok {
            let want = match k.as_str() {
                "max_iter" => "a non-negative integer",
                "eps" => "a non-negative number",
                _ => "true or false",
            };
            return Err(err(format!("parameters: `{k}` {} must be {want} for {name}", crate::show(x))));
        }
    }
    let others = cfg.task_models();
    match cfg.method {
        Method::ModelStock if others.len() < 2 => {
            return Err(err(format!(
                "model_stock needs base_model and at least two other models under `models`; {} listed",
                others.len()
            )))
        }
        Method::Nuslerp if others.len() != 2 => {
            return Err(err(format!(
                "nuslerp interpolates exactly two models besides base_model; {} listed under `models`",
                others.len()
            )))
        }
        Method::Multislerp if others.is_empty() => {
            return Err(err("multislerp needs at least one model besides base_model under `models`".into()))
        }
        Method::ArceeFusion if others.len() != 1 => {
            return Err(err(format!(
                "arcee_fusion merges base_model and exactly one other model; {} listed under `models`",
                others.len()
            )))
        }
        Method::Karcher if cfg.models.is_empty() && cfg.base.is_none() => {
            return Err(err("karcher needs at least one model under `models`".into()))
        }
        _ => {}
    }
    if matches!(cfg.method, Method::Nuslerp | Method::Multislerp) {
        if let Some(m) = others.iter().find(|m| m.weight.is_none()) {
            return Err(err(format!(
                "model `{}`: {name} needs `weight` for every model besides base_model (per model or under \
                 `parameters`)",
                m.name
            )));
        }
    }
    Ok(())
}

fn flag(cfg: &MergeConfig, key: &str) -> bool {
    number(cfg, key) != 0.0
}

/// Index of the Gram entry (x, y) among `nv` vectors (upper triangle, row-major).
fn pair(nv: usize, x: usize, y: usize) -> usize {
    let (x, y) = if x <= y { (x, y) } else { (y, x) };
    x * (2 * nv - x + 1) / 2 + (y - x)
}

/// A symmetric Gram matrix of one vector.
struct Gram<'a> {
    nv: usize,
    e: &'a [f64],
}

impl Gram<'_> {
    fn at(&self, x: usize, y: usize) -> f64 {
        self.e[pair(self.nv, x, y)]
    }
    /// |sum_i c_i v_i|^2, clamped at 0 against rounding.
    fn quad(&self, c: &[f64]) -> f64 {
        let mut s = 0.0;
        for x in 0..self.nv {
            for y in 0..self.nv {
                s += c[x] * c[y] * self.at(x, y);
            }
        }
        s.max(0.0)
    }
    /// (sum_i c_i v_i) . v_y
    fn dot(&self, c: &[f64], y: usize) -> f64 {
        (0..self.nv).map(|x| c[x] * self.at(x, y)).sum()
    }
}

/// Merges one tensor of `tm` with a geometric method.
pub(crate) fn merge_tensor(tm: &TensorMerge, sink: &mut TensorSink, dt: Dtype) -> Result<()> {
    let cfg = tm.cfg;
    let name = tm.name;
    let l = tm.l;
    let shape = tm.ckpts[0].info(tm.src[0])?.1.to_vec();
    let k = tm.ckpts.len();
    let whole = GeoLayout::Whole { parts: l.div_ceil(64).clamp(1, 4096) };
    let last = shape.last().copied().unwrap_or(1).max(1);
    let weights = || -> Result<Vec<f64>> {
        cfg.task_models()
            .iter()
            .map(|m| {
                m.weight.as_ref().and_then(|p: &Param| p.for_tensor(name)).ok_or_else(|| {
                    tm.terr(format!(
                        "model `{}`: no `weight` filter matches this tensor (add an entry without filter)",
                        m.name
                    ))
                })
            })
            .collect()
    };
    match cfg.method {
        Method::ModelStock => {
            let layout =
                if flag(cfg, "filter_wise") && shape.len() >= 2 { GeoLayout::Rows { width: last } } else { whole };
            let grams = gram_pass(tm, layout, true)?;
            let n = k - 1;
            let mut coef = vec![0f32; grams.len() * (k + 1)];
            for (v, e) in grams.iter().enumerate() {
                let gm = Gram { nv: n, e };
                let norms: Vec<f64> = (0..n).map(|i| gm.at(i, i).max(0.0).sqrt()).collect();
                let mut cos_sum = 0.0;
                let mut pairs = 0usize;
                for a in 0..n {
                    for b in a + 1..n {
                        cos_sum += (gm.at(a, b) / (norms[a] * norms[b]).max(1e-6)).clamp(-1.0, 1.0);
                        pairs += 1;
                    }
                }
                let cos = cos_sum / pairs as f64;
                let denom = 1.0 + (n as f64 - 1.0) * cos;
                let t = if denom.abs() < 1e-6 { 0.0 } else { (n as f64 * cos) / denom } as f32;
                coef[v * (k + 1)] = t;
                coef[v * (k + 1) + 1] = 1.0 - t;
            }
            blend_pass(tm, layout, &coef, BlendMode::Stock, sink, dt)
        }
        Method::Nuslerp => {
            let w = weights()?;
            let total = w[0] + w[1];
            let t = if total.abs() < 1e-6 { 0.5 } else { w[1] / total };
            let layout = if flag(cfg, "nuslerp_flatten") || shape.len() < 2 {
                whole
            } else if flag(cfg, "nuslerp_row_wise") {
                GeoLayout::Cols { width: l / shape[0].max(1) }
            } else {
                GeoLayout::Rows { width: last }
            };
            let base = uses_base(cfg);
            let grams = gram_pass(tm, layout, base)?;
            let mut coef = vec![0f32; grams.len() * (k + 1)];
            let at = k - 2; // first of the two models' coefficients
            for (v, e) in grams.iter().enumerate() {
                let gm = Gram { nv: 2, e };
                let n0 = gm.at(0, 0).max(0.0).sqrt().max(1e-7);
                let n1 = gm.at(1, 1).max(0.0).sqrt().max(1e-7);
                let cos = (gm.at(0, 1) / (n0 * n1)).clamp(-1.0, 1.0);
                let c32 = cos as f32;
                let c = &mut coef[v * (k + 1)..(v + 1) * (k + 1)];
                if 1.0f32 - c32 * c32 <= 1e-16 {
                    c[at] = (1.0 - t) as f32;
                    c[at + 1] = t as f32;
                    c[k] = 1.0;
                } else {
                    let th = cos.acos();
                    c[at] = ((1.0 - t) * th).sin() as f32;
                    c[at + 1] = (t * th).sin() as f32;
                    c[k] = th.sin() as f32;
                }
            }
            blend_pass(tm, layout, &coef, if base { BlendMode::Delta } else { BlendMode::Linear }, sink, dt)
        }
        Method::Multislerp => {
            let base = uses_base(cfg);
            let n = k - base as usize;
            let at = base as usize;
            let mut coef = vec![0f32; k + 1];
            coef[k] = 1.0;
            if n == 1 {
                // mergekit returns the one model as it is.
                coef[at] = 1.0;
                coef[0] = if base { 0.0 } else { 1.0 };
                return blend_pass(tm, whole, &coef, BlendMode::Linear, sink, dt);
            }
            let mut w: Vec<f32> = weights()?.iter().map(|&x| x as f32).collect();
            if flag(cfg, "normalize_weights") {
                let s: f32 = w.iter().sum();
                w.iter_mut().for_each(|x| *x /= s);
            }
            let w: Vec<f64> = w.iter().map(|&x| x as f64).collect();
            let eps = number(cfg, "eps");
            let grams = gram_pass(tm, whole, base)?;
            let gm = Gram { nv: n, e: &grams[0] };
            let norms: Vec<f64> = (0..n).map(|i| gm.at(i, i).max(0.0).sqrt()).collect();
            // m = sum_i alpha_i v_i with alpha_i = w_i / (|v_i| + eps).
            let alpha: Vec<f64> = (0..n).map(|i| w[i] / (norms[i] + eps)).collect();
            let mnorm = gm.quad(&alpha).sqrt();
            if mnorm < eps {
                if n != 2 {
                    return Err(tm.terr(
                        "multislerp: the weighted sum of the inputs' unit vectors is zero (antipodal inputs whose \
                         weights balance out); mergekit refuses this too: change the weights"
                            .into(),
                    ));
                }
                coef[at] = w[0] as f32;
                coef[at + 1] = w[1] as f32;
                return blend_pass(tm, whole, &coef, if base { BlendMode::Delta } else { BlendMode::Linear }, sink, dt);
            }
            // s = sum_i w_i (u_i . m/|m|); the tangent sum is m - s m/|m| = (1 - s/|m|) m.
            let s: f64 = (0..n).map(|i| w[i] * gm.dot(&alpha, i) / (norms[i] + eps) / mnorm).sum();
            let tangent = (1.0 - s / mnorm).abs() * mnorm;
            let tn = tangent + eps;
            let avg_norm: f64 = (0..n).map(|i| norms[i] * w[i]).sum();
            let f = (tn.cos() / mnorm + (1.0 - s / mnorm) * (tn.sin() / tn)) * avg_norm;
            for i in 0..n {
                coef[at + i] = (alpha[i] * f) as f32;
            }
            blend_pass(tm, whole, &coef, if base { BlendMode::Delta } else { BlendMode::Linear }, sink, dt)
        }
        Method::Karcher => {
            let mut coef = vec![0f32; k + 1];
            coef[k] = 1.0;
            if k == 1 {
                coef[0] = 1.0;
                return blend_pass(tm, whole, &coef, BlendMode::Linear, sink, dt);
            }
            let grams = gram_pass(tm, whole, false)?;
            let beta = karcher(&Gram { nv: k, e: &grams[0] }, number(cfg, "max_iter") as usize, number(cfg, "tol"));
            for i in 0..k {
                coef[i] = beta[i] as f32;
            }
            blend_pass(tm, whole, &coef, BlendMode::Linear, sink, dt)
        }
        Method::ArceeFusion => fusion(tm, if shape.is_empty() { 1 } else { last }, sink, dt),
        m => Err(tm.terr(format!("{} is not a geometric merge", m.as_str()))),
    }
}

/// mergekit's `karcher_merge_tensors` with alphas 1/K, on the Gram matrix: the coefficients c with
/// result = sum_i c_i x_i.
fn karcher(gm: &Gram, max_iter: usize, tol: f64) -> Vec<f64> {
    let k = gm.nv;
    let alpha = 1.0 / k as f64;
    let norms: Vec<f64> = (0..k).map(|i| gm.at(i, i).max(0.0).sqrt()).collect();
    // unit_i = x_i / |x_i| as coefficients (0 for a zero tensor).
    let unit = |i: usize| -> Vec<f64> {
        let mut c = vec![0.0; k];
        if norms[i] != 0.0 {
            c[i] = 1.0 / norms[i];
        }
        c
    };
    let valid: Vec<usize> = (0..k).filter(|&i| norms[i] > tol).collect();
    if valid.is_empty() {
        return vec![0.0; k];
    }
    let a_sum: f64 = valid.iter().map(|_| alpha).sum();
    let a: Vec<f64> = valid.iter().map(|_| alpha / a_sum).collect();
    let mut mean = vec![0.0; k];
    for (j, &i) in valid.iter().enumerate() {
        mean[i] += a[j] / norms[i];
    }
    let mn = gm.quad(&mean).sqrt();
    if mn < tol {
        mean = unit(valid[0]);
    } else {
        mean.iter_mut().for_each(|x| *x /= mn);
    }
    for _ in 0..max_iter {
        let mut tangent = vec![0.0; k];
        for (j, &i) in valid.iter().enumerate() {
            let dot = (gm.dot(&mean, i) / norms[i]).clamp(-1.0, 1.0);
            let theta = dot.acos();
            if theta < tol {
                continue;
            }
            let f = a[j] * (theta / theta.sin());
            let u = unit(i);
            for x in 0..k {
                tangent[x] += f * (u[x] - dot * mean[x]);
            }
        }
        let tn = gm.quad(&tangent).sqrt();
        if tn < tol {
            break;
        }
        for x in 0..k {
            mean[x] = tn.cos() * mean[x] + tn.sin() * (tangent[x] / tn);
        }
        let un = gm.quad(&mean).sqrt();
        if un > tol {
            mean.iter_mut().for_each(|x| *x /= un);
        }
    }
    let scale: f64 = norms.iter().map(|n| alpha * n).sum();
    mean.iter().map(|x| scale * x).collect()
}

/// Column chunk width for `layout`: a multiple of its alignment whose stack of the inputs fits one binding.
fn step(tm: &TensorMerge, layout: GeoLayout) -> Result<usize> {
    let align = layout.align();
    let k = tm.ckpts.len() as u64;
    let step = (tm.chunk / align).max(1) * align;
    if step as u64 * k * 4 > tm.dev.max_binding() {
        return Err(tm.terr(format!(
            "a row of {align} elements of {k} inputs exceeds the device's storage binding limit of {} bytes",
            tm.dev.max_binding()
        )));
    }
    Ok(step)
}

fn ranges(l: usize, step: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..l.div_ceil(step).max(1)).map(move |i| (i * step, ((i + 1) * step).min(l)))
}

/// The Gram matrices of every vector of the tensor (f64, summed over slots): [vectors][pairs].
fn gram_pass(tm: &TensorMerge, layout: GeoLayout, sub_base: bool) -> Result<Vec<Vec<f64>>> {
    let (dev, l) = (tm.dev, tm.l);
    let k = tm.ckpts.len();
    let m = gram_pairs(k - sub_base as usize);
    let slots = layout.slots(l);
    if let GeoLayout::Rows { width } = layout {
        if width > g::MAX_LOOP {
            return Err(tm.terr(format!(
                "{}: rows of {width} elements are longer than the {} one GPU invocation sums (lavapipe ends loops \
                 after that many iterations)",
                tm.cfg.method.as_str(),
                g::MAX_LOOP
            )));
        }
    }
    let gram = dev.zeros(&[slots * m * 2], DType::F32)?;
    let rows: Vec<usize> = (0..k).collect();
    for (c0, c1) in ranges(l, step(tm, layout)?) {
        let xs = tm.stack(&rows, c0, c1)?;
        dev.run(&g::merge_gram_forward(dev, &gram, &xs, layout, c0, l, sub_base)?)?;
    }
    let raw = dev.download_f32(&gram)?;
    let vecs = layout.vectors(l);
    let mut out = vec![vec![0f64; m]; vecs];
    for s in 0..slots {
        let v = if vecs == 1 { 0 } else { s };
        for p in 0..m {
            out[v][p] += raw[(s * m + p) * 2] as f64 + raw[(s * m + p) * 2 + 1] as f64;
        }
    }
    Ok(out)
}

/// Streams the blend of the inputs with `coef` [vectors, K + 1] into the sink.
fn blend_pass(
    tm: &TensorMerge,
    layout: GeoLayout,
    coef: &[f32],
    mode: BlendMode,
    sink: &mut TensorSink,
    dt: Dtype,
) -> Result<()> {
    let (dev, l) = (tm.dev, tm.l);
    let k = tm.ckpts.len();
    if let Some(i) = coef.iter().position(|c| !c.is_finite()) {
        return Err(tm.terr(format!(
            "{}: a merge coefficient is not finite ({} of vector {}); an input holds Inf or NaN, or its values \
             overflow f32",
            tm.cfg.method.as_str(),
            coef[i],
            i / (k + 1)
        )));
    }
    let ct: Tensor = dev.upload_f32(coef, &[coef.len() / (k + 1), k + 1])?;
    let rows: Vec<usize> = (0..k).collect();
    for (c0, c1) in ranges(l, step(tm, layout)?) {
        let xs = tm.stack(&rows, c0, c1)?;
        let out = dev.empty(&[c1 - c0], DType::F32)?;
        dev.run(&g::merge_blend_forward(dev, &out, &xs, &ct, layout, c0, l, mode)?)?;
        sink.write_f32(&read_back(dev, &out, 0, c1 - c0)?, dt)?;
    }
    Ok(())
}

/// mergekit's `arcee_fusion`: importance = |x - b| * KL(softmax(x) + 1e-8 || softmax(b) + 1e-8) per row
/// (along the last dimension), threshold = median + 1.5 (q3 - q1) of the importance, out = b + (x - b) where the
/// importance reaches the threshold, b elsewhere. The quantiles are order statistics sorted[int(q (L - 1))]
/// (q in f32, as mergekit indexes); mergekit picks them from all elements up to 1M and from 1M random
/// (unseeded) samples above, rime always from all elements. The KL and importance run on the GPU chunk by
/// chunk into a whole-tensor importance buffer; the three order statistics are selected on the CPU from it
/// (`select_nth_unstable`); the masked merge streams.
fn fusion(tm: &TensorMerge, width: usize, sink: &mut TensorSink, dt: Dtype) -> Result<()> {
    let (dev, name, l) = (tm.dev, tm.name, tm.l);
    if 3 * width > g::MAX_LOOP {
        return Err(tm.terr(format!(
            "arcee_fusion: rows of {width} elements are longer than the {} one GPU invocation handles (lavapipe \
             ends loops after 65535 iterations)",
            g::MAX_LOOP / 3
        )));
    }
    crate::engine::check_binding(dev, name, l, "arcee_fusion's quantiles need the whole importance at once")?;
    let kl = dev.zeros(&[l / width], DType::F32)?;
    let imp = dev.zeros(&[l], DType::F32)?;
    let step = step(tm, GeoLayout::Rows { width })?;
    for (c0, c1) in ranges(l, step) {
        let xs = tm.stack(&[0, 1], c0, c1)?;
        dev.run(&g::merge_fusion_kl_forward(dev, &kl, &xs, width, c0, l)?)?;
        dev.run(&g::merge_fusion_importance_forward(dev, &imp, &xs, &kl, width, c0)?)?;
    }
    let mut v = dev.download_f32(&imp)?;
    if v.iter().any(|x| x.is_nan()) {
        return Err(tm.terr("arcee_fusion: the importance has NaN (an input holds Inf or NaN)".into()));
    }
    let mut pick = |q: f32| -> f32 {
        let i = ((q * (l - 1) as f32) as usize).min(l - 1);
        *v.select_nth_unstable_by(i, |a, b| a.total_cmp(b)).1
    };
    let (q1, median, q3) = (pick(0.25), pick(0.5), pick(0.75));
    let threshold = median + 1.5 * (q3 - q1);
    for (c0, c1) in ranges(l, step) {
        let xs = tm.stack(&[0, 1], c0, c1)?;
        let out = dev.empty(&[c1 - c0], DType::F32)?;
        dev.run(&g::merge_fusion_forward(dev, &out, &xs, &imp, threshold, c0)?)?;
        sink.write_f32(&read_back(dev, &out, 0, c1 - c0)?, dt)?;
    }
    Ok(())
}
