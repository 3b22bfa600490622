//! CPU reference for shaders/norm.wgsl, in f64. x is [rows, c].

/// (out, mean, rstd).
pub fn layernorm_forward(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = gamma.len();
    let (mut out, mut mean, mut rstd) = (vec![0f32; x.len()], vec![], vec![]);
    for (r, row) in x.chunks(c).enumerate() {
        let mu = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = row.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / c as f64;
        let rs = 1.0 / (var + eps as f64).sqrt();
        for j in 0..c {
            out[r * c + j] = ((row[j] as f64 - mu) * rs * gamma[j] as f64 + beta[j] as f64) as f32;
        }
        mean.push(mu as f32);
        rstd.push(rs as f32);
    }
    (out, mean, rstd)
}

pub fn layernorm_backward_input(dout: &[f32], x: &[f32], mean: &[f32], rstd: &[f32], gamma: &[f32]) -> Vec<f32> {
    let c = gamma.len();
    let mut dx = vec![0f32; x.len()];
    for r in 0..x.len() / c {
        let (mu, rs) = (mean[r] as f64, rstd[r] as f64);
        let xhat = |j: usize| (x[r * c + j] as f64 - mu) * rs;
        let dn = |j: usize| dout[r * c + j] as f64 * gamma[j] as f64;
        let a = (0..c).map(dn).sum::<f64>() / c as f64;
        let b = (0..c).map(|j| dn(j) * xhat(j)).sum::<f64>() / c as f64;
        for j in 0..c {
            dx[r * c + j] = (rs * (dn(j) - a - xhat(j) * b)) as f32;
        }
    }
    dx
}

/// (dgamma, dbeta), added to `prev` when given.
pub fn layernorm_backward_weight(
    dout: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
    prev: Option<(&[f32], &[f32])>,
) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / c;
    let mut g: Vec<f64> = prev.map_or(vec![0.0; c], |p| p.0.iter().map(|&v| v as f64).collect());
    let mut b: Vec<f64> = prev.map_or(vec![0.0; c], |p| p.1.iter().map(|&v| v as f64).collect());
    for r in 0..rows {
        for j in 0..c {
            let k = r * c + j;
            g[j] += dout[k] as f64 * (x[k] as f64 - mean[r] as f64) * rstd[r] as f64;
            b[j] += dout[k] as f64;
        }
    }
    (g.into_iter().map(|v| v as f32).collect(), b.into_iter().map(|v| v as f32).collect())
}

/// (out, rstd).
pub fn rmsnorm_forward(x: &[f32], gamma: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let c = gamma.len();
    let (mut out, mut rstd) = (vec![0f32; x.len()], vec![]);
    for (r, row) in x.chunks(c).enumerate() {
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / c as f64;
        let rs = 1.0 / (ms + eps as f64).sqrt();
        for j in 0..c {
            out[r * c + j] = (row[j] as f64 * rs * gamma[j] as f64) as f32;
        }
        rstd.push(rs as f32);
    }
    (out, rstd)
}

pub fn rmsnorm_backward_input(dout: &[f32], x: &[f32], rstd: &[f32], gamma: &[f32]) -> Vec<f32> {
    let c = gamma.len();
    let mut dx = vec![0f32; x.len()];
    for r in 0..x.len() / c {
        let rs = rstd[r] as f64;
        let xhat = |j: usize| x[r * c + j] as f64 * rs;
        let dn = |j: usize| dout[r * c + j] as f64 * gamma[j] as f64;
        let b = (0..c).map(|j| dn(j) * xhat(j)).sum::<f64>() / c as f64;
        for j in 0..c {
            dx[r * c + j] = (rs * (dn(j) - xhat(j) * b)) as f32;
        }
    }
    dx
}

#[allow(clippy::needless_range_loop)]
pub fn rmsnorm_backward_weight(dout: &[f32], x: &[f32], rstd: &[f32], c: usize, prev: Option<&[f32]>) -> Vec<f32> {
    let mut g: Vec<f64> = prev.map_or(vec![0.0; c], |p| p.iter().map(|&v| v as f64).collect());
    for r in 0..x.len() / c {
        for j in 0..c {
            let k = r * c + j;
            g[j] += dout[k] as f64 * x[k] as f64 * rstd[r] as f64;
        }
    }
    g.into_iter().map(|v| v as f32).collect()
}
