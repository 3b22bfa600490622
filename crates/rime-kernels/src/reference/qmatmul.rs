//! CPU versions of shaders/qmatmul.wgsl: GGUF blocks dequantized as ggml's `dequantize_row_*` does (an own
//! copy of rime-io's `dequantize_block_*`, which rime-kernels does not depend on; tests/qmatmul.rs checks the
//! two agree), then the products in f64.

use crate::qtensor::QType;

fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// ggml's get_scale_min_k4.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

fn block(qtype: QType, blk: &[u8], y: &mut Vec<f32>) {
    match qtype {
        QType::Q8_0 => {
            let d = f16(blk, 0);
            y.extend(blk[2..34].iter().map(|&q| (q as i8) as f32 * d));
        }
        QType::Q4_0 => {
            let d = f16(blk, 0);
            let qs = &blk[2..18];
            y.extend(qs.iter().map(|&q| ((q & 0xF) as i32 - 8) as f32 * d));
            y.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
        }
        QType::Q4_1 => {
            let (d, m) = (f16(blk, 0), f16(blk, 2));
            let qs = &blk[4..20];
            y.extend(qs.iter().map(|&q| (q & 0xF) as f32 * d + m));
            y.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
        }
        QType::Q5_0 => {
            let d = f16(blk, 0);
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            let qs = &blk[6..22];
            for half_i in 0..2 {
                y.extend(qs.iter().enumerate().map(|(j, &q)| {
                    let nib = if half_i == 0 { q & 0xF } else { q >> 4 } as u32;
                    let hi = (qh >> (j + 16 * half_i)) & 1;
                    ((nib | (hi << 4)) as i32 - 16) as f32 * d
                }));
            }
        }
        QType::Q4K => {
            let (d, min) = (f16(blk, 0), f16(blk, 2));
            let scales = &blk[4..16];
            for c in 0..4 {
                let q = &blk[16 + 32 * c..48 + 32 * c];
                for (is, shift) in [(2 * c, 0), (2 * c + 1, 4)] {
                    let (sc, m) = scale_min_k4(is, scales);
                    let (d1, m1) = (d * sc as f32, min * m as f32);
                    y.extend(q.iter().map(|&x| d1 * ((x >> shift) & 0xF) as f32 - m1));
                }
            }
        }
        QType::Q6K => {
            let d = f16(blk, 208);
            for e in 0..256 {
                let (h, qd, l) = (e / 128, (e / 32) % 4, e % 32);
                let ql = blk[h * 64 + l + 32 * (qd & 1)];
                let nib = if qd >= 2 { ql >> 4 } else { ql & 0xF };
                let hi = (blk[128 + h * 32 + l] >> (2 * qd)) & 3;
                let sc = blk[192 + h * 8 + l / 16 + 2 * qd] as i8 as f32;
                y.push(d * sc * (((nib | (hi << 4)) as i32) - 32) as f32);
            }
        }
    }
}

/// A weight [rows, cols] of `qtype` as f32, row-major; None when `bytes` is not `rows` rows of whole blocks.
pub fn dequantize(qtype: QType, bytes: &[u8], rows: usize, cols: usize) -> Option<Vec<f32>> {
    let bb = qtype.block().1;
    let row_bytes = qtype.row_bytes(cols)?;
    if bytes.len() != rows * row_bytes {
        return None;
    }
    let mut y = Vec::with_capacity(rows * cols);
    for blk in bytes.chunks_exact(bb) {
        block(qtype, blk, &mut y);
    }
    debug_assert_eq!(y.len(), rows * cols);
    Some(y)
}

/// y [m, n] = x [m, k] · wᵀ (+ bias[n]) (+ prev[m, n]), w [n, k] dequantized; f64 sums, in that order.
pub fn qmatmul_forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    prev: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
            if let Some(b) = bias {
                s += b[j] as f64;
            }
            if let Some(p) = prev {
                s += p[i * n + j] as f64;
            }
            y[i * n + j] = s as f32;
        }
    }
    y
}

/// dx [m, k] = dy [m, n] · w (+ prev[m, k]), w [n, k] dequantized; f64 sums.
pub fn qmatmul_backward_input(dy: &[f32], w: &[f32], prev: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut dx = vec![0.0; m * k];
    for i in 0..m {
        for t in 0..k {
            let mut s: f64 = (0..n).map(|j| dy[i * n + j] as f64 * w[j * k + t] as f64).sum();
            if let Some(p) = prev {
                s += p[i * k + t] as f64;
            }
            dx[i * k + t] = s as f32;
        }
    }
    dx
}
