//! CPU reference for shaders/concat.wgsl: column blocks of row-major matrices.

/// The parts [n, w_i] side by side: [n, Σ w_i].
pub fn concat_cols(parts: &[(&[f32], usize)], n: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for r in 0..n {
        for &(p, w) in parts {
            out.extend_from_slice(&p[r * w..(r + 1) * w]);
        }
    }
    out
}

/// Columns offset..offset + w of whole [n, total].
pub fn slice_cols(whole: &[f32], n: usize, total: usize, offset: usize, w: usize) -> Vec<f32> {
    (0..n).flat_map(|r| whole[r * total + offset..r * total + offset + w].iter().copied()).collect()
}

/// whole [n, total] with part [n, w] placed at columns offset..offset + w: added there when `accumulate`,
/// otherwise written there with zeros in the other columns.
pub fn place_cols(whole: &mut [f32], part: &[f32], n: usize, total: usize, offset: usize, accumulate: bool) {
    let w = part.len() / n.max(1);
    for r in 0..n {
        for j in 0..total {
            let k = r * total + j;
            let inside = j >= offset && j < offset + w;
            match (inside, accumulate) {
                (true, true) => whole[k] += part[r * w + j - offset],
                (true, false) => whole[k] = part[r * w + j - offset],
                (false, false) => whole[k] = 0.0,
                (false, true) => {}
            }
        }
    }
}
