//! CPU reference for shaders/prepend.wgsl: x [b, t, c], rows [p, c], out [b, p + t, c].

pub fn prepend_forward(x: &[f32], rows: &[f32], b: usize, t: usize, c: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(b * (rows.len() + t * c));
    for bi in 0..b {
        out.extend_from_slice(rows);
        out.extend_from_slice(&x[bi * t * c..(bi + 1) * t * c]);
    }
    out
}

/// dx: the last t rows of every sequence of dout.
pub fn prepend_backward_input(dout: &[f32], b: usize, p: usize, c: usize) -> Vec<f32> {
    let s = dout.len() / (b * c).max(1);
    (0..b).flat_map(|bi| dout[(bi * s + p) * c..(bi + 1) * s * c].iter().copied()).collect()
}

/// drows after adding the batch sum of the first p rows of dout into `prev` (zeros when not accumulating).
pub fn prepend_backward_weight(dout: &[f32], prev: &[f32], b: usize, c: usize) -> Vec<f32> {
    let s = dout.len() / (b * c).max(1);
    let mut d = prev.to_vec();
    for bi in 0..b {
        for (k, v) in d.iter_mut().enumerate() {
            *v += dout[bi * s * c + k];
        }
    }
    d
}
