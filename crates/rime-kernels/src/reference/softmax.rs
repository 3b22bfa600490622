//! CPU reference for shaders/softmax.wgsl, in f64.

/// x [rows, s] with `t` = size of the second-to-last axis and `rows_per_batch` rows per mask row;
/// mask [B, s] (0 = masked).
pub fn softmax_forward(x: &[f32], s: usize, t: usize, mask: Option<&[f32]>, causal: bool) -> Vec<f32> {
    let rows = x.len() / s;
    let rows_per_batch = mask.map_or(rows, |m| rows / (m.len() / s));
    let mut out = vec![0f32; x.len()];
    for r in 0..rows {
        let i = r % t;
        let keep = |j: usize| mask.is_none_or(|m| m[(r / rows_per_batch) * s + j] != 0.0) && !(causal && j + t > i + s);
        let row = &x[r * s..(r + 1) * s];
        let mx = (0..s).filter(|&j| keep(j)).map(|j| row[j] as f64).fold(f64::NEG_INFINITY, super::nan_max);
        if mx == f64::NEG_INFINITY {
            continue;
        }
        let sum: f64 = (0..s).filter(|&j| keep(j)).map(|j| (row[j] as f64 - mx).exp()).sum();
        for j in (0..s).filter(|&j| keep(j)) {
            out[r * s + j] = ((row[j] as f64 - mx).exp() / sum) as f32;
        }
    }
    out
}

pub fn softmax_backward(dout: &[f32], y: &[f32], s: usize) -> Vec<f32> {
    let mut dx = vec![0f32; y.len()];
    for r in 0..y.len() / s {
        let k = r * s..(r + 1) * s;
        let dot: f64 = dout[k.clone()].iter().zip(&y[k.clone()]).map(|(&a, &b)| a as f64 * b as f64).sum();
        for j in k {
            dx[j] = (y[j] as f64 * (dout[j] as f64 - dot)) as f32;
        }
    }
    dx
}
