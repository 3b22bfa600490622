//! The CPU baselines: the `gemm` crate (the GEMM behind candle's CPU backend) on all of rayon's threads for
//! products, per-head `gemm` calls spread over the heads for attention, and a plain Rust loop (split over the
//! same threads) for the merge. They run on the same cores as lavapipe, one after the other, never together.

use gemm::Parallelism;
use rayon::prelude::*;

/// A strided f32 matrix view: element (i, j) at `rs * i + cs * j`.
#[derive(Clone, Copy)]
pub struct View {
    pub rs: usize,
    pub cs: usize,
}

/// A row-major matrix with `cols` columns.
pub fn row(cols: usize) -> View {
    View { rs: cols, cs: 1 }
}
/// The transpose of a row-major matrix with `cols` columns (x·Wᵀ reads W [N, K] as a K×N view).
pub fn trans(cols: usize) -> View {
    View { rs: 1, cs: cols }
}

fn span(v: View, rows: usize, cols: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        v.rs * (rows - 1) + v.cs * (cols - 1) + 1
    }
}

/// dst = (acc ? dst : 0) + scale · lhs·rhs, with lhs m×k and rhs k×n views. `threads` = 0: rayon's pool.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dv: View,
    acc: bool,
    lhs: &[f32],
    lv: View,
    rhs: &[f32],
    rv: View,
    scale: f32,
    par: Parallelism,
) {
    // The views are built by this crate's cases; a wrong one is a bug here, so fail loudly before the
    // unsafe call rather than read out of bounds.
    assert!(span(dv, m, n) <= dst.len(), "gemm dst view out of bounds");
    assert!(span(lv, m, k) <= lhs.len(), "gemm lhs view out of bounds");
    assert!(span(rv, k, n) <= rhs.len(), "gemm rhs view out of bounds");
    // SAFETY: every index the views reach is inside its slice (checked above); dst does not alias lhs/rhs
    // (distinct borrows).
    unsafe {
        gemm_raw(m, n, k, dst.as_mut_ptr(), dv, acc, lhs.as_ptr(), lv, rhs.as_ptr(), rv, scale, par);
    }
}

/// # Safety
/// The views must stay inside the allocations behind the pointers, and dst must not alias lhs or rhs.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dv: View,
    acc: bool,
    lhs: *const f32,
    lv: View,
    rhs: *const f32,
    rv: View,
    scale: f32,
    par: Parallelism,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dv.cs as isize,
            dv.rs as isize,
            acc,
            lhs,
            lv.cs as isize,
            lv.rs as isize,
            rhs,
            rv.cs as isize,
            rv.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        )
    }
}

pub fn all_threads() -> Parallelism {
    Parallelism::Rayon(0)
}

/// A raw pointer that may cross into rayon tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}
impl Shared {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Attention over [B, T, NH, HS] tensors, heads in parallel, each head's products through `gemm` on one
/// thread. Keeps lse [B, NH, T] for the backward.
pub struct Attention {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub hs: usize,
    pub scale: f32,
}

impl Attention {
    fn head_base(&self, bh: usize) -> usize {
        let (b, h) = (bh / self.nh, bh % self.nh);
        b * self.t * self.nh * self.hs + h * self.hs
    }

    /// out = softmax(scale·q·kᵀ + mask) v; mask [B, T] (1 keep, 0 pad).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(&self, out: &mut [f32], lse: &mut [f32], q: &[f32], k: &[f32], v: &[f32], mask: &[f32]) {
        let (t, c) = (self.t, self.nh * self.hs);
        let n = self.b * t * c;
        assert!(q.len() == n && k.len() == n && v.len() == n && out.len() == n, "attention sizes");
        assert!(lse.len() == self.b * self.nh * t && mask.len() == self.b * t, "attention sizes");
        let out_p = Shared(out.as_mut_ptr());
        lse.par_chunks_mut(t).enumerate().for_each(|(bh, lse_row)| {
            let base = self.head_base(bh);
            let b = bh / self.nh;
            let mut s = vec![0f32; t * t];
            let view = View { rs: c, cs: 1 };
            gemm_f32(
                t,
                t,
                self.hs,
                &mut s,
                row(t),
                false,
                &q[base..],
                view,
                &k[base..],
                trans(c),
                self.scale,
                Parallelism::None,
            );
            softmax_rows(&mut s, t, &mask[b * t..(b + 1) * t], Some(lse_row));
            // SAFETY: head `bh` writes only its own [T, HS] slice of out (rows c apart, starting at base),
            // which no other task touches; the span fits in out (checked by the sizes above).
            unsafe {
                gemm_raw(
                    t,
                    self.hs,
                    t,
                    out_p.get().add(base),
                    view,
                    false,
                    s.as_ptr(),
                    row(t),
                    v[base..].as_ptr(),
                    view,
                    1.0,
                    Parallelism::None,
                );
            }
        });
    }

    /// dq, dk, dv from dout, recomputing the probabilities from lse (as a fused kernel does).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        mask: &[f32],
    ) {
        let (t, c, hs) = (self.t, self.nh * self.hs, self.hs);
        let n = self.b * t * c;
        for x in [&*dq, &*dk, &*dv, dout, q, k, v, out] {
            assert!(x.len() == n, "attention backward sizes");
        }
        let (dq_p, dk_p, dv_p) = (Shared(dq.as_mut_ptr()), Shared(dk.as_mut_ptr()), Shared(dv.as_mut_ptr()));
        (0..self.b * self.nh).into_par_iter().for_each(|bh| {
            let base = self.head_base(bh);
            let b = bh / self.nh;
            let view = View { rs: c, cs: 1 };
            let mrow = &mask[b * t..(b + 1) * t];
            let mut p = vec![0f32; t * t];
            let mut dp = vec![0f32; t * t];
            gemm_f32(
                t,
                t,
                hs,
                &mut p,
                row(t),
                false,
                &q[base..],
                view,
                &k[base..],
                trans(c),
                self.scale,
                Parallelism::None,
            );
            let l = &lse[bh * t..(bh + 1) * t];
            for i in 0..t {
                for j in 0..t {
                    let x = &mut p[i * t + j];
                    *x = if mrow[j] != 0.0 { (*x - l[i]).exp() } else { 0.0 };
                }
            }
            // dP = dO·Vᵀ
            gemm_f32(
                t,
                t,
                hs,
                &mut dp,
                row(t),
                false,
                &dout[base..],
                view,
                &v[base..],
                trans(c),
                1.0,
                Parallelism::None,
            );
            // dS = P ∘ (dP − rowsum(dO ∘ O)), with the softmax scale folded into dQ and dK below.
            for i in 0..t {
                let r = base + i * c;
                let d: f32 = (0..hs).map(|e| dout[r + e] * out[r + e]).sum();
                for j in 0..t {
                    dp[i * t + j] = p[i * t + j] * (dp[i * t + j] - d);
                }
            }
            // SAFETY: head `bh` writes only its own [T, HS] slices of dq, dk, dv (rows c apart from base).
            unsafe {
                // dV = Pᵀ·dO
                gemm_raw(
                    t,
                    hs,
                    t,
                    dv_p.get().add(base),
                    view,
                    false,
                    p.as_ptr(),
                    trans(t),
                    dout[base..].as_ptr(),
                    view,
                    1.0,
                    Parallelism::None,
                );
                // dQ = scale·dS·K
                gemm_raw(
                    t,
                    hs,
                    t,
                    dq_p.get().add(base),
                    view,
                    false,
                    dp.as_ptr(),
                    row(t),
                    k[base..].as_ptr(),
                    view,
                    self.scale,
                    Parallelism::None,
                );
                // dK = scale·dSᵀ·Q
                gemm_raw(
                    t,
                    hs,
                    t,
                    dk_p.get().add(base),
                    view,
                    false,
                    dp.as_ptr(),
                    trans(t),
                    q[base..].as_ptr(),
                    view,
                    self.scale,
                    Parallelism::None,
                );
            }
        });
    }
}

/// Row-wise softmax of a [T, T] block in place with a key mask; the log-sum-exp of each row into `lse`.
fn softmax_rows(s: &mut [f32], t: usize, mask: &[f32], lse: Option<&mut [f32]>) {
    let mut lse = lse;
    for i in 0..t {
        let row = &mut s[i * t..(i + 1) * t];
        let mut m = f32::NEG_INFINITY;
        for (x, &keep) in row.iter().zip(mask) {
            if keep != 0.0 && *x > m {
                m = *x;
            }
        }
        let mut sum = 0f32;
        for (x, &keep) in row.iter_mut().zip(mask) {
            *x = if keep != 0.0 { (*x - m).exp() } else { 0.0 };
            sum += *x;
        }
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        for x in row.iter_mut() {
            *x *= inv;
        }
        if let Some(l) = lse.as_deref_mut() {
            l[i] = m + sum.ln();
        }
    }
}

/// out = Σ w[i]·xs[i], a plain loop over chunks of the same threads.
pub fn weighted_sum(out: &mut [f32], xs: &[Vec<f32>], w: &[f32]) {
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, o)| {
        let start = ci * CHUNK;
        let end = start + o.len();
        for x in o.iter_mut() {
            *x = 0.0;
        }
        for (xi, &wi) in xs.iter().zip(w) {
            for (x, &v) in o.iter_mut().zip(&xi[start..end]) {
                *x += wi * v;
            }
        }
    });
}
