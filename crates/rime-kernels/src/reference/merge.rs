//! CPU reference for shaders/merge.wgsl, written after peft's `utils/merge_utils.py` and mergekit's
//! `slerp`. Stacked inputs are row-major [rows, L] slices.

/// out\[l] = sum_i weights\[i] * xs[i, l]; rows = weights.len().
pub fn merge_weighted_sum_forward(out: &mut [f32], xs: &[f32], weights: &[f32]) {
    let l = out.len();
    for (j, o) in out.iter_mut().enumerate() {
        let mut s = 0.0f32;
        for (i, &w) in weights.iter().enumerate() {
            s += w * xs[i * l + j];
        }
        *o = s;
    }
}

/// Keep the k = int(density * L) largest |x| of each row (lower index first among equal magnitudes), zero
/// the rest; density >= 1 keeps everything.
pub fn merge_magnitude_mask_forward(out: &mut [f32], xs: &[f32], rows: usize, density: f64) {
    let l = xs.len() / rows;
    let k = if density >= 1.0 { l } else { ((density * l as f64).floor() as usize).min(l) };
    out.fill(0.0);
    for r in 0..rows {
        let row = &xs[r * l..(r + 1) * l];
        let mut idx: Vec<usize> = (0..l).collect();
        idx.sort_by(|&a, &b| row[b].abs().total_cmp(&row[a].abs()).then(a.cmp(&b)));
        for &i in &idx[..k] {
            out[r * l + i] = row[i];
        }
    }
}

/// `merge_magnitude_mask_forward` in place.
pub fn merge_magnitude_mask_inplace_forward(xs: &mut [f32], rows: usize, density: f64) {
    let mut out = vec![0.0; xs.len()];
    merge_magnitude_mask_forward(&mut out, xs, rows, density);
    xs.copy_from_slice(&out);
}

fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// TIES sign election ("total": sign of the sum; else sign of the count of signs) on the rows as given or,
/// with `elect_weighted`, on the weighted rows; then the weighted mean of the agreeing rows (0 if none agree).
pub fn merge_ties_forward(
    out: &mut [f32],
    xs: &[f32],
    weights: &[f32],
    majority_sign_total: bool,
    elect_weighted: bool,
) {
    let l = out.len();
    for (j, o) in out.iter_mut().enumerate() {
        let col = |i: usize| xs[i * l + j];
        let elect = |i: usize| if elect_weighted { weights[i] * col(i) } else { col(i) };
        let s: f32 = (0..weights.len())
            .map(|i| if majority_sign_total { elect(i) } else { sign(elect(i)) })
            .fold(0.0, |a, b| a + b);
        let majority = if s >= 0.0 { 1.0 } else { -1.0 };
        let (mut acc, mut cnt) = (0.0f32, 0.0f32);
        for (i, &w) in weights.iter().enumerate() {
            if sign(elect(i)) == majority {
                acc += w * col(i);
                cnt += 1.0;
            }
        }
        *o = acc / cnt.max(1.0);
    }
}

/// mergekit's TIES consensus ("sum") and disjoint merge: y_i = weights\[i] * xs\[i]; the sign of sum_i y_i
/// elected (zero goes to +); out = sum of the agreeing y_i, divided by the sum of the agreeing weights when
/// `normalize` (1 where that sum is 0). Zeros never agree.
pub fn merge_ties_mergekit_forward(out: &mut [f32], xs: &[f32], weights: &[f32], normalize: bool) {
    let l = out.len();
    for (j, o) in out.iter_mut().enumerate() {
        let y = |i: usize| weights[i] * xs[i * l + j];
        let s: f32 = (0..weights.len()).map(y).fold(0.0, |a, b| a + b);
        let majority = if s >= 0.0 { 1.0 } else { -1.0 };
        let (mut acc, mut div) = (0.0f32, 0.0f32);
        for (i, &w) in weights.iter().enumerate() {
            if sign(y(i)) == majority {
                acc += y(i);
                div += w;
            }
        }
        *o = if normalize { acc / if div == 0.0 { 1.0 } else { div } } else { acc };
    }
}

/// out = xs * keep_mask / density.
pub fn merge_dare_forward(out: &mut [f32], xs: &[f32], keep_mask: &[f32], density: f32) {
    for ((o, &x), &m) in out.iter_mut().zip(xs).zip(keep_mask) {
        *o = (x * m) / density;
    }
}

/// mergekit `slerp(t, a, b)` in f32 (sums in f64): normalise copies, lerp when |dot| > 0.9995, else slerp the
/// originals with the angle of the normalised vectors.
pub fn merge_slerp_forward(out: &mut [f32], a: &[f32], b: &[f32], t: f32) {
    let norm = |v: &[f32]| (v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()) as f32;
    let (na, nb) = (norm(a), norm(b));
    let an: Vec<f32> = a.iter().map(|&x| if na > 1e-8 { x / na } else { x }).collect();
    let bn: Vec<f32> = b.iter().map(|&x| if nb > 1e-8 { x / nb } else { x }).collect();
    let dot = an.iter().zip(&bn).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() as f32;
    let (s0, s1) = if dot.abs() > 0.9995 {
        (1.0 - t, t)
    } else {
        let theta0 = dot.acos();
        let sin0 = theta0.sin();
        let theta_t = theta0 * t;
        ((theta0 - theta_t).sin() / sin0, theta_t.sin() / sin0)
    };
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = s0 * x + s1 * y;
    }
}
