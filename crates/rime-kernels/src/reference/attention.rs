//! CPU reference for shaders/attention.wgsl: plain softmax attention that materialises the probabilities,
//! accumulating in f64. Same layouts and masking rules as the kernels: q/out [B, T, NH, HS], k/v [B, S, NKV,
//! HS], lse [B, NH, T], mask [B, S] (1 keep, 0 padding); causal lets query t see key j iff j <= t + (S - T);
//! query head h uses kv head h / (NH / NKV). A row that sees no key outputs zeros and lse = -inf. The
//! `_window` forms add a causal sliding window W: query t also needs j > t + (S - T) - W.

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub s: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hs: usize,
}

impl Dims {
    fn q_at(&self, b: usize, t: usize, h: usize) -> usize {
        ((b * self.t + t) * self.nh + h) * self.hs
    }
    fn k_at(&self, b: usize, j: usize, h: usize) -> usize {
        let kh = h / (self.nh / self.nkv);
        ((b * self.s + j) * self.nkv + kh) * self.hs
    }
    #[allow(clippy::too_many_arguments)]
    fn visible(&self, mask: Option<&[f32]>, causal: bool, window: usize, b: usize, t: usize, j: usize) -> bool {
        let kept = mask.is_none_or(|m| m[b * self.s + j] != 0.0);
        let last = t as i64 + self.s as i64 - self.t as i64;
        let in_causal = !causal || (j as i64) <= last;
        let in_window = !causal || window == 0 || (j as i64) > last - window as i64;
        kept && in_causal && in_window
    }
}

/// Probabilities of one (b, h, t) row over the keys (all zero when no key is visible) and the row's lse.
#[allow(clippy::too_many_arguments)]
fn probs(
    d: &Dims,
    q: &[f32],
    k: &[f32],
    mask: Option<&[f32]>,
    causal: bool,
    window: usize,
    scale: f32,
    b: usize,
    h: usize,
    t: usize,
) -> (Vec<f64>, f64) {
    let qa = d.q_at(b, t, h);
    let scores: Vec<Option<f64>> = (0..d.s)
        .map(|j| {
            d.visible(mask, causal, window, b, t, j).then(|| {
                let ka = d.k_at(b, j, h);
                scale as f64 * (0..d.hs).map(|c| q[qa + c] as f64 * k[ka + c] as f64).sum::<f64>()
            })
        })
        .collect();
    let mx = scores.iter().flatten().fold(f64::NEG_INFINITY, |a, &b| super::nan_max(a, b));
    if mx == f64::NEG_INFINITY {
        return (vec![0.0; d.s], f64::NEG_INFINITY);
    }
    let sum: f64 = scores.iter().flatten().map(|s| (s - mx).exp()).sum();
    let p = scores.iter().map(|s| s.map_or(0.0, |s| (s - mx).exp() / sum)).collect();
    (p, mx + sum.ln())
}

/// Returns (out [B, T, NH, HS], lse [B, NH, T]).
pub fn attention_forward(
    d: &Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    causal: bool,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    attention_forward_window(d, q, k, v, mask, causal, scale, 0)
}

/// [`attention_forward`] with a causal sliding window of `window` keys (0 = none).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_window(
    d: &Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    causal: bool,
    scale: f32,
    window: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0f32; d.b * d.t * d.nh * d.hs];
    let mut lse = vec![0f32; d.b * d.nh * d.t];
    for b in 0..d.b {
        for h in 0..d.nh {
            for t in 0..d.t {
                let (p, l) = probs(d, q, k, mask, causal, window, scale, b, h, t);
                lse[(b * d.nh + h) * d.t + t] = l as f32;
                let oa = d.q_at(b, t, h);
                for c in 0..d.hs {
                    let acc: f64 = (0..d.s).map(|j| p[j] * v[d.k_at(b, j, h) + c] as f64).sum();
                    out[oa + c] = acc as f32;
                }
            }
        }
    }
    (out, lse)
}

/// Returns (dq like q, dk like k, dv like v); the probabilities are recomputed from q and k.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    d: &Dims,
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    causal: bool,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    attention_backward_window(d, dout, q, k, v, mask, causal, scale, 0)
}

/// [`attention_backward`] with a causal sliding window of `window` keys (0 = none).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_window(
    d: &Dims,
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    causal: bool,
    scale: f32,
    window: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dq = vec![0f64; q.len()];
    let mut dk = vec![0f64; k.len()];
    let mut dv = vec![0f64; v.len()];
    for b in 0..d.b {
        for h in 0..d.nh {
            for t in 0..d.t {
                let (p, _) = probs(d, q, k, mask, causal, window, scale, b, h, t);
                let qa = d.q_at(b, t, h);
                // dP_j = dO . v_j; dS_j = P_j (dP_j - sum_i P_i dP_i); scores = scale * q . k_j.
                let dp: Vec<f64> = (0..d.s)
                    .map(|j| {
                        let va = d.k_at(b, j, h);
                        (0..d.hs).map(|c| dout[qa + c] as f64 * v[va + c] as f64).sum()
                    })
                    .collect();
                let dot: f64 = (0..d.s).map(|j| p[j] * dp[j]).sum();
                for j in 0..d.s {
                    let ka = d.k_at(b, j, h);
                    let ds = p[j] * (dp[j] - dot) * scale as f64;
                    for c in 0..d.hs {
                        dv[ka + c] += p[j] * dout[qa + c] as f64;
                        dq[qa + c] += ds * k[ka + c] as f64;
                        dk[ka + c] += ds * q[qa + c] as f64;
                    }
                }
            }
        }
    }
    let f = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect();
    (f(dq), f(dk), f(dv))
}
