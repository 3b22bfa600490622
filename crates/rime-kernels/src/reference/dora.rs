//! CPU reference for ops::dora: DoRA's scale g = m / ||W + s·B·A||_row and its magnitude gradient, in f64.
//! w [OC, C], a [R, C], b [OC, R], m \[OC].

/// (g, norm): norm\[o] = ||W[o, :] + scale·B[o, :]·A||₂, g\[o] = m\[o] / norm\[o].
pub fn dora_scale_forward(w: &[f32], a: &[f32], b: &[f32], m: &[f32], scale: f32, c: usize) -> (Vec<f32>, Vec<f32>) {
    let oc = m.len();
    let r = b.len().checked_div(oc).unwrap_or(0);
    let mut g = vec![0f32; oc];
    let mut norm = vec![0f32; oc];
    for o in 0..oc {
        let mut q = 0f64;
        for i in 0..c {
            let low: f64 = (0..r).map(|k| b[o * r + k] as f64 * a[k * c + i] as f64).sum();
            let v = w[o * c + i] as f64 + scale as f64 * low;
            q += v * v;
        }
        norm[o] = q.sqrt() as f32;
        g[o] = (m[o] as f64 / q.sqrt()) as f32;
    }
    (g, norm)
}

/// dm = dg / norm (the norm is detached: A, B and W get nothing).
pub fn dora_scale_backward(dg: &[f32], norm: &[f32]) -> Vec<f32> {
    dg.iter().zip(norm).map(|(&d, &n)| d / n).collect()
}
