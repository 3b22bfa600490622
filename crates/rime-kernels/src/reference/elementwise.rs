//! CPU reference for shaders/elementwise.wgsl. Activations are computed in f64 from an independent erf
//! (power series / continued fraction), so the GPU's erf approximation is checked, not copied.

use crate::ops::elementwise::dropout_threshold;

/// b has a's length or is a row \[N] broadcast over the rows of a.
pub fn add_forward(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().enumerate().map(|(i, &x)| x + b[i % b.len()]).collect()
}

pub fn mul_forward(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().enumerate().map(|(i, &x)| x * b[i % b.len()]).collect()
}

/// (da, db); db has b's length (summed over rows when b was broadcast).
pub fn mul_backward(dout: &[f32], a: &[f32], b: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let da = mul_forward(dout, b);
    let mut db = vec![0f64; b.len()];
    for i in 0..a.len() {
        db[i % b.len()] += dout[i] as f64 * a[i] as f64;
    }
    (da, db.into_iter().map(|v| v as f32).collect())
}

pub fn scale_forward(a: &[f32], s: f32) -> Vec<f32> {
    a.iter().map(|&x| x * s).collect()
}

pub fn add_inplace_forward(acc: &mut [f32], b: &[f32], alpha: f32) {
    let nb = b.len();
    for (i, v) in acc.iter_mut().enumerate() {
        *v += alpha * b[i % nb];
    }
}

/// erf in f64: Maclaurin series for |x| <= 2.5 (cancellation costs < 3 digits there), continued fraction
/// for erfc beyond.
pub fn erf64(x: f64) -> f64 {
    let z = x.abs();
    let r = if z <= 2.5 {
        let mut term = z;
        let mut sum = z;
        let mut k = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            k += 1.0;
            term *= -z * z / k;
            sum += term / (2.0 * k + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(z) = exp(-z^2)/sqrt(pi) * 1/(z + (1/2)/(z + 1/(z + (3/2)/(z + ...)))), evaluated bottom up.
        let mut f = z;
        for k in (1..=80).rev() {
            f = z + (k as f64 / 2.0) / f;
        }
        1.0 - (-z * z).exp() / (std::f64::consts::PI.sqrt() * f)
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

fn phi(x: f64) -> f64 {
    0.5 * (1.0 + erf64(x / std::f64::consts::SQRT_2))
}

const SQRT_2_OVER_PI: f64 = 0.7978845608028654;

fn gelu64(x: f64, tanh_approx: bool) -> f64 {
    if tanh_approx {
        0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
    } else {
        x * phi(x)
    }
}

fn gelu_grad64(x: f64, tanh_approx: bool) -> f64 {
    if tanh_approx {
        let t = (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh();
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
    } else {
        phi(x) + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
    }
}

pub fn gelu_forward(x: &[f32], tanh_approx: bool) -> Vec<f32> {
    x.iter().map(|&v| gelu64(v as f64, tanh_approx) as f32).collect()
}

pub fn gelu_backward(dout: &[f32], x: &[f32], tanh_approx: bool) -> Vec<f32> {
    x.iter().zip(dout).map(|(&v, &d)| (d as f64 * gelu_grad64(v as f64, tanh_approx)) as f32).collect()
}

fn sigmoid64(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn silu_forward(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| (v as f64 * sigmoid64(v as f64)) as f32).collect()
}

pub fn silu_backward(dout: &[f32], x: &[f32]) -> Vec<f32> {
    x.iter()
        .zip(dout)
        .map(|(&v, &d)| {
            let s = sigmoid64(v as f64);
            (d as f64 * s * (1.0 + v as f64 * (1.0 - s))) as f32
        })
        .collect()
}

pub fn relu_forward(x: &[f32]) -> Vec<f32> {
    // not f32::max, which turns NaN into 0: NaN in, NaN out
    x.iter().map(|&v| if v < 0.0 { 0.0 } else { v }).collect()
}

pub fn relu_backward(dout: &[f32], x: &[f32]) -> Vec<f32> {
    x.iter()
        .zip(dout)
        .map(|(&v, &d)| {
            if v.is_nan() {
                v
            } else if v > 0.0 {
                d
            } else {
                0.0
            }
        })
        .collect()
}

/// The shader's lowbias32 hash.
pub fn hash_u32(v: u32) -> u32 {
    let mut h = v;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846ca68b);
    h ^= h >> 16;
    h
}

/// Whether dropout keeps element i for this seed.
pub fn dropout_keep(i: u32, p: f32, seed: u32) -> bool {
    let (thr, _) = dropout_threshold(p);
    (hash_u32(i ^ hash_u32(seed ^ 0x9e37_79b9)) >> 8) >= thr
}

pub fn dropout_forward(x: &[f32], p: f32, seed: u32) -> Vec<f32> {
    let (_, scale) = dropout_threshold(p);
    x.iter().enumerate().map(|(i, &v)| if dropout_keep(i as u32, p, seed) { v * scale } else { 0.0 }).collect()
}

pub fn dropout_backward(dout: &[f32], p: f32, seed: u32) -> Vec<f32> {
    dropout_forward(dout, p, seed)
}
