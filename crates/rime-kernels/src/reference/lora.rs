//! CPU reference for the LoRA linear layer (ops::lora): plain loops with f64 accumulation over row-major
//! slices. Sizes are [`LoraDims`]: x [rows, C], w [OC, C] (f16/bf16 weights widened to f32 by the caller),
//! a [R, C], b [OC, R], h [rows, R], out [rows, OC].

#[derive(Debug, Clone, Copy)]
pub struct LoraDims {
    pub rows: usize,
    pub c: usize,
    pub oc: usize,
    pub r: usize,
}

/// (rows x inner) · (cols x inner)ᵀ in f64.
fn mul_t(x: &[f32], y: &[f32], rows: usize, inner: usize, cols: usize) -> Vec<f64> {
    let mut o = vec![0f64; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            o[i * cols + j] = (0..inner).map(|t| x[i * inner + t] as f64 * y[j * inner + t] as f64).sum();
        }
    }
    o
}

/// (out, h): h = x·Aᵀ, out = x·Wᵀ + scale·h·Bᵀ + bias.
pub fn lora_forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    a: &[f32],
    b: &[f32],
    scale: f32,
    d: &LoraDims,
) -> (Vec<f32>, Vec<f32>) {
    let h = mul_t(x, a, d.rows, d.c, d.r);
    let xw = mul_t(x, w, d.rows, d.c, d.oc);
    let h32: Vec<f32> = h.iter().map(|&v| v as f32).collect();
    let hb = mul_t(&h32, b, d.rows, d.r, d.oc);
    let out = (0..d.rows * d.oc)
        .map(|i| (xw[i] + scale as f64 * hb[i] + bias.map_or(0.0, |bb| bb[i % d.oc] as f64)) as f32)
        .collect();
    (out, h32)
}

/// dx = dout·W + scale·(dout·B)·A.
pub fn lora_backward_input(dout: &[f32], w: &[f32], a: &[f32], b: &[f32], scale: f32, d: &LoraDims) -> Vec<f32> {
    let mut dx = vec![0f32; d.rows * d.c];
    for i in 0..d.rows {
        let dh: Vec<f64> =
            (0..d.r).map(|r| (0..d.oc).map(|o| dout[i * d.oc + o] as f64 * b[o * d.r + r] as f64).sum()).collect();
        for c in 0..d.c {
            let base: f64 = (0..d.oc).map(|o| dout[i * d.oc + o] as f64 * w[o * d.c + c] as f64).sum();
            let low: f64 = (0..d.r).map(|r| dh[r] * a[r * d.c + c] as f64).sum();
            dx[i * d.c + c] = (base + scale as f64 * low) as f32;
        }
    }
    dx
}

/// (da, db): dB = scale·doutᵀ·h, dA = scale·(dout·B)ᵀ·x, summed over all rows. Accumulation over
/// micro-batches is the caller's elementwise sum.
pub fn lora_backward_weight(
    dout: &[f32],
    x: &[f32],
    h: &[f32],
    b: &[f32],
    scale: f32,
    d: &LoraDims,
) -> (Vec<f32>, Vec<f32>) {
    let s = scale as f64;
    let mut db = vec![0f32; d.oc * d.r];
    for o in 0..d.oc {
        for r in 0..d.r {
            let v: f64 = (0..d.rows).map(|i| dout[i * d.oc + o] as f64 * h[i * d.r + r] as f64).sum();
            db[o * d.r + r] = (s * v) as f32;
        }
    }
    let dh: Vec<f64> = (0..d.rows * d.r)
        .map(|ir| {
            let (i, r) = (ir / d.r, ir % d.r);
            (0..d.oc).map(|o| dout[i * d.oc + o] as f64 * b[o * d.r + r] as f64).sum()
        })
        .collect();
    let mut da = vec![0f32; d.r * d.c];
    for r in 0..d.r {
        for c in 0..d.c {
            let v: f64 = (0..d.rows).map(|i| dh[i * d.r + r] * x[i * d.c + c] as f64).sum();
            da[r * d.c + c] = (s * v) as f32;
        }
    }
    (da, db)
}
