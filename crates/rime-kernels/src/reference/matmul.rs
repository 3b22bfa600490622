//! CPU reference for shaders/matmul.wgsl: plain loops with f64 accumulation over row-major slices. Sizes are
//! passed as [`MatmulDims`]; a is [batch, M, K] ([batch, K, M] if trans_a), b is [K, N] ([N, K] if trans_b),
//! shared across the batch or (b_batched) one per batch entry, out is [batch, M, N]. f16/bf16 weights are
//! given here already widened to f32.

/// Sizes and layout of one (batched) matmul.
#[derive(Debug, Clone, Copy)]
pub struct MatmulDims {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub b_batched: bool,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl MatmulDims {
    fn a_at(&self, a: &[f32], bi: usize, m: usize, k: usize) -> f64 {
        let base = bi * self.m * self.k;
        (if self.trans_a { a[base + k * self.m + m] } else { a[base + m * self.k + k] }) as f64
    }
    fn b_index(&self, bi: usize, k: usize, n: usize) -> usize {
        let base = if self.b_batched { bi * self.k * self.n } else { 0 };
        if self.trans_b {
            base + n * self.k + k
        } else {
            base + k * self.n + n
        }
    }
    fn a_index(&self, bi: usize, m: usize, k: usize) -> usize {
        let base = bi * self.m * self.k;
        if self.trans_a {
            base + k * self.m + m
        } else {
            base + m * self.k + k
        }
    }
    /// Elements of b (per batch entry times batch when b_batched).
    pub fn b_len(&self) -> usize {
        self.k * self.n * if self.b_batched { self.batch } else { 1 }
    }
}

/// out[b, m, n] = sum_k op(a)[b, m, k] · op(b)[k, n] + bias\[n].
pub fn matmul_forward(a: &[f32], b: &[f32], bias: Option<&[f32]>, d: &MatmulDims) -> Vec<f32> {
    let mut out = vec![0f32; d.batch * d.m * d.n];
    for bi in 0..d.batch {
        for m in 0..d.m {
            for n in 0..d.n {
                let mut s = bias.map_or(0.0, |b| b[n] as f64);
                for k in 0..d.k {
                    s += d.a_at(a, bi, m, k) * b[d.b_index(bi, k, n)] as f64;
                }
                out[(bi * d.m + m) * d.n + n] = s as f32;
            }
        }
    }
    out
}

/// da (laid out like a) = dout · op(b)ᵀ.
pub fn matmul_backward_input(dout: &[f32], b: &[f32], d: &MatmulDims) -> Vec<f32> {
    let mut da = vec![0f32; d.batch * d.m * d.k];
    for bi in 0..d.batch {
        for m in 0..d.m {
            for k in 0..d.k {
                let mut s = 0f64;
                for n in 0..d.n {
                    s += dout[(bi * d.m + m) * d.n + n] as f64 * b[d.b_index(bi, k, n)] as f64;
                }
                da[d.a_index(bi, m, k)] = s as f32;
            }
        }
    }
    da
}

/// db (laid out like b) = op(a)ᵀ · dout, summed over the batch when b is shared. Accumulation over
/// micro-batches is the caller's elementwise sum.
pub fn matmul_backward_weight(a: &[f32], dout: &[f32], d: &MatmulDims) -> Vec<f32> {
    let mut db = vec![0f64; d.b_len()];
    for bi in 0..d.batch {
        for k in 0..d.k {
            for n in 0..d.n {
                let mut s = 0f64;
                for m in 0..d.m {
                    s += d.a_at(a, bi, m, k) * dout[(bi * d.m + m) * d.n + n] as f64;
                }
                db[d.b_index(bi, k, n)] += s;
            }
        }
    }
    db.into_iter().map(|x| x as f32).collect()
}
