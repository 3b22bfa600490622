//! CPU reference for shaders/merge_sparse.wgsl, written after mergekit 0.1.5's `generalized_task_arithmetic`,
//! `sparsify`, `sce` and `linear` as torch runs them in float32 / float16 / bfloat16 (elementwise ops rounded
//! once, sums accumulated in f32 in row order and rounded once).

use crate::ops::merge_sparse::{Gta, Precision, SumOf};

fn sgn(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// out\[i] = round(x\[i] - base\[i]).
pub fn merge_delta_round_forward(out: &mut [f32], x: &[f32], base: &[f32], prec: Precision) {
    for ((o, &a), &b) in out.iter_mut().zip(x).zip(base) {
        *o = prec.round(a - b);
    }
}

/// See `ops::merge_sparse::merge_gta_forward`; `xs` [N + 1, L] with the base last.
pub fn merge_gta_forward(out: &mut [f32], xs: &[f32], weights: &[f32], g: Gta) {
    let (l, r) = (out.len(), |x: f32| g.prec.round(x));
    let w: Vec<f32> = weights.iter().map(|&x| r(x)).collect();
    let n = w.len();
    for (j, o) in out.iter_mut().enumerate() {
        let base = xs[n * l + j];
        let y: Vec<f32> = (0..n)
            .map(|i| {
                let d = xs[i * l + j];
                r(if g.raw { r(d - base) } else { d } * w[i])
            })
            .collect();
        let majority = if r(y.iter().fold(0.0, |a, b| a + b)) >= 0.0 { 1.0 } else { -1.0 };
        let (mut mixed, mut div) = (0.0f32, 0.0f32);
        for i in 0..n {
            if !g.consensus || sgn(y[i]) == majority {
                mixed += y[i];
                div += w[i];
            }
        }
        let (mut mixed, mut div) = (r(mixed), r(div));
        if (g.consensus && div == 0.0) || (!g.consensus && div.abs() < 1e-8) {
            div = 1.0;
        }
        if g.normalize {
            mixed = r(mixed / div);
        }
        if g.lambda != 1.0 {
            mixed = r(mixed * g.lambda);
        }
        *o = r(base + mixed);
    }
}

/// See `ops::merge_sparse::merge_linear_forward`.
pub fn merge_linear_forward(out: &mut [f32], xs: &[f32], weights: &[f32], normalize: bool, prec: Precision) {
    let l = out.len();
    let den: f32 = weights.iter().fold(0.0, |a, &b| a + b);
    for (j, o) in out.iter_mut().enumerate() {
        let mut s = 0.0f32;
        for (i, &w) in weights.iter().enumerate() {
            s = xs[i * l + j].mul_add(w, s);
        }
        if normalize {
            s /= den;
        }
        *o = prec.round(s);
    }
}

/// The sum `merge_sparse_sum_forward` computes (in f64 here: the kernel's f32 partial sums agree to rounding).
pub fn merge_sparse_sum_forward(x: &[f32], what: SumOf) -> f64 {
    x.iter()
        .map(|&v| match what {
            SumOf::Abs => v.abs() as f64,
            SumOf::Square(p) => p.round(v * v) as f64,
            SumOf::NonZero => (v != 0.0) as u8 as f64,
        })
        .sum()
}

/// See `ops::merge_sparse::merge_sparse_rescale_forward`; `acc` = [sum |x| before, after].
pub fn merge_sparse_rescale_forward(
    x: &mut [f32],
    mask: Option<&[f32]>,
    acc: [f32; 2],
    rescale: bool,
    work: Precision,
    prec: Precision,
) {
    let (before, after) = (work.round(acc[0]), work.round(acc[1]));
    let scale = (rescale && !(before < 1e-7 || after < 1e-7)).then(|| work.round(before / after));
    for (i, v) in x.iter_mut().enumerate() {
        let mut y = *v * mask.map_or(1.0, |m| m[i]);
        if let Some(s) = scale {
            y = work.round(y * s);
        }
        *v = prec.round(y);
    }
}

/// Positions of `keys` sorted by (|key|, index) descending (`index_ascending` false: lower index first among
/// equal magnitudes) or by the reverse of a stable ascending sort (`index_ascending` true).
fn order(keys: &[f32], index_ascending: bool) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..keys.len()).collect();
    idx.sort_by(|&a, &b| {
        let c = keys[b].abs().total_cmp(&keys[a].abs());
        c.then(if index_ascending { b.cmp(&a) } else { a.cmp(&b) })
    });
    idx
}

/// See `ops::merge_sparse::merge_band_mask_forward`: keep ranks [k2, k1) of the key order (rank 0 first).
pub fn merge_band_mask_forward(x: &mut [f32], keys: Option<&[f32]>, k1: usize, k2: usize, index_ascending: bool) {
    let idx = order(keys.unwrap_or(x), index_ascending);
    let mut keep = vec![false; x.len()];
    for &i in idx.iter().take(k1).skip(k2) {
        keep[i] = true;
    }
    for (v, k) in x.iter_mut().zip(keep) {
        if !k {
            *v = 0.0;
        }
    }
}

/// See `ops::merge_sparse::merge_della_mask_forward`.
pub fn merge_della_mask_forward(x: &mut [f32], uniform: &[f32], rows: usize, lo: f32, eps: f32) {
    let cols = x.len() / rows;
    for r in 0..rows {
        let row = &mut x[r * cols..(r + 1) * cols];
        let mut idx: Vec<usize> = (0..cols).collect();
        idx.sort_by(|&a, &b| row[a].abs().total_cmp(&row[b].abs()).then(a.cmp(&b)));
        for (j, &e) in idx.iter().enumerate() {
            let rank_norm = (j as f32 / (cols - 1) as f32).clamp(0.0, 1.0);
            let prob = lo + rank_norm * 2.0 * eps;
            if uniform[r * cols + e] >= prob || uniform[r * cols + e].is_nan() {
                row[e] = 0.0;
            }
        }
    }
}

/// See `ops::merge_sparse::merge_sce_var_forward`.
pub fn merge_sce_var_forward(out: &mut [f32], xs: &[f32], prec: Precision) {
    let l = out.len();
    let n = xs.len() / l;
    for (j, o) in out.iter_mut().enumerate() {
        let mean = (0..n).fold(0.0f32, |a, i| a + xs[i * l + j]) / n as f32;
        let v = (0..n).fold(0.0f32, |a, i| {
            let d = xs[i * l + j] - mean;
            a + d * d
        });
        *o = prec.round(v / n as f32);
    }
}

/// See `ops::merge_sparse::merge_sce_forward`.
pub fn merge_sce_forward(out: &mut [f32], xs: &[f32], weights: &[f32], prec: Precision) {
    let (l, r) = (out.len(), |x: f32| prec.round(x));
    let w: Vec<f32> = weights.iter().map(|&x| r(x)).collect();
    let n = w.len();
    for (j, o) in out.iter_mut().enumerate() {
        let majority = if r((0..n).fold(0.0f32, |a, i| a + xs[i * l + j])) >= 0.0 { 1.0 } else { -1.0 };
        let (mut merged, mut den) = (0.0f32, 0.0f32);
        for i in 0..n {
            let x = xs[i * l + j];
            if sgn(x) == majority {
                merged += r(x * w[i]);
                den += w[i];
            }
        }
        let den = r(den).max(r(1e-6));
        *o = r(xs[n * l + j] + r(r(merged) / den));
    }
}
