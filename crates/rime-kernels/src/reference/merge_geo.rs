//! CPU reference for shaders/merge_geo.wgsl (Gram accumulation and per-vector blends of the geometric
//! merges), element for element in the kernels' order of operations.

use crate::ops::merge_geo::{gram_pairs, BlendMode, GeoLayout};

fn vec_at(xs: &[f32], n: usize, sub: bool, a: usize, e: usize) -> f32 {
    if sub {
        xs[(a + 1) * n + e] - xs[e]
    } else {
        xs[a * n + e]
    }
}

/// Neumaier step: adds v to the compensated sum (s, c).
fn neumaier(s: &mut f32, c: &mut f32, v: f32) {
    let t = *s + v;
    if s.abs() >= v.abs() {
        *c += (*s - t) + v;
    } else {
        *c += (v - t) + *s;
    }
    *s = t;
}

/// Accumulates the chunk `xs` [k, n] (elements [offset, offset + n) of a tensor of `numel`) into `gram`
/// [slots, pairs, 2]; see `ops::merge_geo::merge_gram_forward`.
pub fn merge_gram_forward(gram: &mut [f32], xs: &[f32], k: usize, layout: GeoLayout, offset: usize, sub_base: bool) {
    let n = xs.len() / k;
    let nv = k - sub_base as usize;
    let m = gram_pairs(nv);
    let (j_count, a, b, cnt, slot0) = match layout {
        GeoLayout::Whole { parts } => (parts, 1, parts, usize::MAX, 0),
        GeoLayout::Rows { width } => (n / width, width, 1, width, offset / width),
        GeoLayout::Cols { width } => (width, 1, width, usize::MAX, 0),
    };
    let pairs: Vec<(usize, usize)> = (0..nv).flat_map(|x| (x..nv).map(move |y| (x, y))).collect();
    for j in 0..j_count {
        for (pi, &(x, y)) in pairs.iter().enumerate() {
            let (mut s, mut c) = (0f32, 0f32);
            let mut e = j * a;
            let mut i = 0;
            while i < cnt && e < n {
                neumaier(&mut s, &mut c, vec_at(xs, n, sub_base, x, e) * vec_at(xs, n, sub_base, y, e));
                e += b;
                i += 1;
            }
            let o = ((slot0 + j) * m + pi) * 2;
            let (s0, c0) = (gram[o], gram[o + 1]);
            let (mut t, mut cc) = (s0, c0 + c);
            neumaier(&mut t, &mut cc, s);
            gram[o] = t;
            gram[o + 1] = cc;
        }
    }
}

/// out \[n] = the blend of the chunk `xs` [k, n] (elements [offset, offset + n)) with `coef` [vectors, k + 1];
/// see `ops::merge_geo::merge_blend_forward`.
pub fn merge_blend_forward(
    out: &mut [f32],
    xs: &[f32],
    coef: &[f32],
    k: usize,
    layout: GeoLayout,
    offset: usize,
    mode: BlendMode,
) {
    let n = out.len();
    for (e, o) in out.iter_mut().enumerate() {
        let g = offset + e;
        let v = match layout {
            GeoLayout::Whole { .. } => 0,
            GeoLayout::Rows { width } => g / width,
            GeoLayout::Cols { width } => g % width,
        };
        let c = &coef[v * (k + 1)..(v + 1) * (k + 1)];
        let x = |r: usize| xs[r * n + e];
        *o = match mode {
            BlendMode::Stock => {
                let mut s = x(1);
                for r in 2..k {
                    s += x(r);
                }
                c[0] * (s / (k - 1) as f32) + c[1] * x(0)
            }
            BlendMode::Delta => {
                let mut s = 0f32;
                for (r, &cr) in c.iter().enumerate().take(k).skip(1) {
                    s += cr * (x(r) - x(0));
                }
                x(0) + s / c[k]
            }
            BlendMode::Linear => {
                let mut s = 0f32;
                for (r, &cr) in c[..k].iter().enumerate() {
                    s += cr * x(r);
                }
                s / c[k]
            }
        };
    }
}

/// arcee_fusion's per-row KL of the chunk `xs` [2, n] (base, model) into `kl` at row offset / width.
pub fn merge_fusion_kl_forward(kl: &mut [f32], xs: &[f32], width: usize, offset: usize) {
    let n = xs.len() / 2;
    let (b, x) = xs.split_at(n);
    for j in 0..n / width {
        let o = j * width;
        let (rx, rb) = (&x[o..o + width], &b[o..o + width]);
        let mx = rx.iter().fold(rx[0], |m, &v| m.max(v));
        let mb = rb.iter().fold(rb[0], |m, &v| m.max(v));
        let (mut sx, mut cx, mut sb, mut cb) = (0f32, 0f32, 0f32, 0f32);
        for i in 0..width {
            neumaier(&mut sx, &mut cx, (rx[i] - mx).exp());
            neumaier(&mut sb, &mut cb, (rb[i] - mb).exp());
        }
        let (dx, db) = (sx + cx, sb + cb);
        let (mut s, mut c) = (0f32, 0f32);
        for i in 0..width {
            let p = (rx[i] - mx).exp() / dx + 1e-8;
            let q = (rb[i] - mb).exp() / db + 1e-8;
            neumaier(&mut s, &mut c, p * (p / q).ln());
        }
        kl[offset / width + j] = s + c;
    }
}

/// arcee_fusion's importance |x - b| * kl\[row] of the chunk `xs` [2, n] into `importance` at offset.
pub fn merge_fusion_importance_forward(importance: &mut [f32], xs: &[f32], kl: &[f32], width: usize, offset: usize) {
    let n = xs.len() / 2;
    for e in 0..n {
        let g = offset + e;
        importance[g] = (xs[n + e] - xs[e]).abs() * kl[g / width];
    }
}

/// arcee_fusion's merge of the chunk `xs` [2, n]: b + (x - b) * (importance >= threshold).
pub fn merge_fusion_forward(out: &mut [f32], xs: &[f32], importance: &[f32], threshold: f32, offset: usize) {
    let n = out.len();
    for (e, o) in out.iter_mut().enumerate() {
        let keep = if importance[offset + e] >= threshold { 1.0 } else { 0.0 };
        *o = xs[e] + (xs[n + e] - xs[e]) * keep;
    }
}
