//! CPU reference for shaders/cross_entropy.wgsl, in f64. logits [n, v], targets \[n].

/// (loss, lse). Rows whose target is ignore_index are left out; the loss is 0 when none is kept.
pub fn cross_entropy_forward(logits: &[f32], targets: &[i32], v: usize, ignore_index: i32) -> (f32, Vec<f32>) {
    let mut lse = Vec::new();
    let (mut sum, mut kept) = (0f64, 0usize);
    for (r, row) in logits.chunks(v).enumerate() {
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| super::nan_max(a, b as f64));
        let l = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        lse.push(l as f32);
        let t = targets[r];
        if t != ignore_index {
            kept += 1;
            sum += l - row[t as usize] as f64;
        }
    }
    let loss = if kept == 0 { 0.0 } else { sum / kept as f64 };
    (loss as f32, lse)
}

pub fn cross_entropy_backward(
    dloss: f32,
    logits: &[f32],
    lse: &[f32],
    targets: &[i32],
    v: usize,
    ignore_index: i32,
) -> Vec<f32> {
    let kept = targets.iter().filter(|&&t| t != ignore_index).count();
    let mut d = vec![0f32; logits.len()];
    if kept == 0 {
        return d;
    }
    let g = dloss as f64 / kept as f64;
    for (r, &t) in targets.iter().enumerate() {
        if t == ignore_index {
            continue;
        }
        for j in 0..v {
            let k = r * v + j;
            let onehot = if j as i32 == t { 1.0 } else { 0.0 };
            d[k] = (g * ((logits[k] as f64 - lse[r] as f64).exp() - onehot)) as f32;
        }
    }
    d
}
