//! CPU reference for shaders/reduce.wgsl: sums over the last axis and over rows, accumulated in f64.

/// x [rows, n] -> \[rows].
pub fn sum_forward(x: &[f32], n: usize, mean: bool) -> Vec<f32> {
    x.chunks(n)
        .map(|r| {
            let s: f64 = r.iter().map(|&v| v as f64).sum();
            (if mean { s / n as f64 } else { s }) as f32
        })
        .collect()
}

/// x [rows, n] -> \[n]; `prev` is added when accumulating.
pub fn sum_rows_forward(x: &[f32], n: usize, mean: bool, prev: Option<&[f32]>) -> Vec<f32> {
    let rows = x.len() / n;
    (0..n)
        .map(|c| {
            let mut s: f64 = (0..rows).map(|r| x[r * n + c] as f64).sum();
            if mean {
                s /= rows as f64;
            }
            (s + prev.map_or(0.0, |p| p[c] as f64)) as f32
        })
        .collect()
}
