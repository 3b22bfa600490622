//! The exact thin SVD that SVFit and PiSSA split weights with (f64, Gram matrix + tridiagonal QL), on the CPU
//! once per target weight at setup.

/// Thin SVD of a row-major m×n matrix: returns (U [m, k] row-major, σ \[k\] descending, Vᵀ [k, n] row-major),
/// k = min(m, n), with U and V orthonormal (where σ = 0 too: the basis is completed) and ‖UΣVᵀ − W‖ at f32
/// precision.
///
/// How, in f64, on the short side (Wᵀ for a wide W): the Gram matrix G = AᵀA [n, n], its eigenvectors V by
/// Householder tridiagonalization and implicit-shift QL (EISPACK's tred2/tql2, rows contiguous), then
/// b_j = A·v_j, σ_j = ‖b_j‖, u_j = b_j/σ_j. Since V is orthonormal to f64 rounding, Σ_j b_j v_jᵀ = A exactly,
/// whatever the conditioning; squaring only costs accuracy in the small σ (absolute error about
/// √(n·ε)·σ_max ≈ f32 precision), and the u_j of σ_j < 1e-2·σ_max, whose orthogonality the squaring would
/// spoil, are re-orthogonalized (Gram–Schmidt twice) against the earlier ones, or replaced by a completion
/// of the basis where b_j is numerically in their span (rank-deficient W). O(mn·k + k³), about 10k³ flops
/// in all for a square matrix, in loops over contiguous f64 that vectorize (AVX2/FMA where the CPU has it).
pub fn svd(w: &[f32], m: usize, n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(w.len(), m * n, "svd: {} values for a {m}×{n} matrix", w.len());
    if m == 0 || n == 0 {
        return (Vec::new(), Vec::new(), Vec::new());
    }
    // A: the tall orientation, rows of length k = min(m, n); a = W (m ≥ n) or Wᵀ.
    let (rows, k) = (m.max(n), m.min(n));
    let mut a = vec![0f64; rows * k];
    if m >= n {
        a.iter_mut().zip(w).for_each(|(x, &y)| *x = y as f64);
    } else {
        for i in 0..m {
            for j in 0..n {
                a[j * k + i] = w[i * n + j] as f64;
            }
        }
    }
    // (left vectors of A as rows [k, rows], σ, right vectors of A as rows [k, k])
    let (ul, s, vr) = simd::svd_tall(&a, rows, k);
    let mut u = vec![0f32; m * k];
    let mut vt = vec![0f32; k * n];
    if m >= n {
        // U [m, k] = ulᵀ, Vᵀ = vr
        for r in 0..k {
            for i in 0..m {
                u[i * k + r] = ul[r * m + i] as f32;
            }
        }
        vt.iter_mut().zip(&vr).for_each(|(x, &y)| *x = y as f32);
    } else {
        // W = Aᵀ = V_A Σ U_Aᵀ: U [m, k] = vrᵀ, Vᵀ [k, n] = ul
        for r in 0..k {
            for i in 0..m {
                u[i * k + r] = vr[r * k + i] as f32;
            }
        }
        vt.iter_mut().zip(&ul).for_each(|(x, &y)| *x = y as f32);
    }
    (u, s.iter().map(|&x| x as f32).collect(), vt)
}

/// The f64 kernels of [`svd`], compiled twice: for the baseline target and, picked at run time, with
/// AVX2 + FMA (everything below `svd_tall` is `#[inline(always)]` so that it inherits the features).
mod simd {
    pub fn svd_tall(a: &[f64], m: usize, n: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { svd_tall_avx2(a, m, n) };
        }
        super::svd_tall_impl(a, m, n)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn svd_tall_avx2(a: &[f64], m: usize, n: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        super::svd_tall_impl(a, m, n)
    }
}

/// Σ x_i y_i with 8 independent partial sums (so that it vectorizes).
#[inline(always)]
fn dot(x: &[f64], y: &[f64]) -> f64 {
    let len = x.len().min(y.len());
    let (x, y) = (&x[..len], &y[..len]);
    let mut acc = [0f64; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let mut tail = 0f64;
    for (p, q) in xc.remainder().iter().zip(yc.remainder()) {
        tail += p * q;
    }
    for (p, q) in xc.zip(yc) {
        for l in 0..8 {
            acc[l] += p[l] * q[l];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// The dots of x with four rows y0..y3 at once (x is read once).
#[inline(always)]
fn dot4(x: &[f64], y0: &[f64], y1: &[f64], y2: &[f64], y3: &[f64]) -> [f64; 4] {
    let len = x.len();
    let (y0, y1, y2, y3) = (&y0[..len], &y1[..len], &y2[..len], &y3[..len]);
    let mut acc = [[0f64; 4]; 4];
    let full = len / 4 * 4;
    for o in (0..full).step_by(4) {
        let xs = &x[o..o + 4];
        for (r, y) in [y0, y1, y2, y3].into_iter().enumerate() {
            let ys = &y[o..o + 4];
            for l in 0..4 {
                acc[r][l] += xs[l] * ys[l];
            }
        }
    }
    let mut out = [0f64; 4];
    for (r, y) in [y0, y1, y2, y3].into_iter().enumerate() {
        let mut t = (acc[r][0] + acc[r][2]) + (acc[r][1] + acc[r][3]);
        for o in full..len {
            t += x[o] * y[o];
        }
        out[r] = t;
    }
    out
}

/// out[j] = x · ys[j·len ..][..len] for each j < out.len().
#[inline(always)]
fn dots(x: &[f64], ys: &[f64], len: usize, out: &mut [f64]) {
    let cnt = out.len();
    let full = cnt / 4 * 4;
    for j in (0..full).step_by(4) {
        let r = |t: usize| &ys[(j + t) * len..(j + t + 1) * len];
        out[j..j + 4].copy_from_slice(&dot4(&x[..len], r(0), r(1), r(2), r(3)));
    }
    for j in full..cnt {
        out[j] = dot(&x[..len], &ys[j * len..(j + 1) * len]);
    }
}

/// y += a·x
#[inline(always)]
fn axpy(a: f64, x: &[f64], y: &mut [f64]) {
    for (q, p) in y.iter_mut().zip(x) {
        *q += a * p;
    }
}

/// Gram–Schmidt twice of v against the rows q [cnt, len] (orthonormal); returns (‖v‖ before, after the
/// first pass, after the second).
#[inline(always)]
fn orthogonalize(v: &mut [f64], q: &[f64], cnt: usize, coef: &mut [f64]) -> (f64, f64, f64) {
    let len = v.len();
    let n0 = dot(v, v).sqrt();
    let mut pass = || {
        dots(v, q, len, &mut coef[..cnt]);
        for (r, &c) in coef[..cnt].iter().enumerate() {
            axpy(-c, &q[r * len..(r + 1) * len], v);
        }
        dot(v, v).sqrt()
    };
    let n1 = pass();
    let n2 = pass();
    (n0, n1, n2)
}

/// Eigen-decomposition of the symmetric g [n, n] (row-major, overwritten): returns the eigenvalues d, and
/// g holds the eigenvector of d[j] in row j. EISPACK's tred2 + tql2 (as in JAMA), with the matrix stored
/// transposed (JAMA's V[r][c] is z[c·n + r]) so that every inner loop runs along a contiguous row.
#[inline(always)]
fn sym_eig(z: &mut [f64], n: usize) -> Vec<f64> {
    let mut d = vec![0f64; n];
    let mut e = vec![0f64; n];
    tridiagonalize(z, n, &mut d, &mut e);
    tridiagonal_ql(z, n, &mut d, &mut e);
    d
}

/// EISPACK's tred2 (see [`sym_eig`]): Householder reduction of z to the tridiagonal (d, e), the
/// transformations accumulated in z.
#[inline(always)]
fn tridiagonalize(z: &mut [f64], n: usize, d: &mut [f64], e: &mut [f64]) {
    for j in 0..n {
        d[j] = z[j * n + n - 1];
    }
    // Householder reduction to tridiagonal form.
    for i in (1..n).rev() {
        let scale: f64 = d[..i].iter().map(|x| x.abs()).sum();
        let mut h = 0f64;
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = z[j * n + i - 1];
                z[j * n + i] = 0.0;
                z[i * n + j] = 0.0;
            }
        } else {
            for x in &mut d[..i] {
                *x /= scale;
                h += *x * *x;
            }
            let f = d[i - 1];
            let g = if f > 0.0 { -h.sqrt() } else { h.sqrt() };
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            e[..i].iter_mut().for_each(|x| *x = 0.0);
            for j in 0..i {
                let f = d[j];
                z[i * n + j] = f;
                let row = &z[j * n..j * n + i];
                let g = e[j] + row[j] * f + dot(&row[j + 1..], &d[j + 1..i]);
                axpy(f, &row[j + 1..], &mut e[j + 1..i]);
                e[j] = g;
            }
            let mut f = 0f64;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                let (f, g) = (d[j], e[j]);
                let row = &mut z[j * n..j * n + i];
                for ((x, &ek), &dk) in row[j..].iter_mut().zip(&e[j..i]).zip(&d[j..i]) {
                    *x -= f * ek + g * dk;
                }
                d[j] = z[j * n + i - 1];
                z[j * n + i] = 0.0;
            }
        }
        d[i] = h;
    }
    // Accumulate the transformations.
    for i in 0..n - 1 {
        z[i * n + n - 1] = z[i * n + i];
        z[i * n + i] = 1.0;
        let h = d[i + 1];
        let (lo, hi) = z.split_at_mut((i + 1) * n);
        let hv = &mut hi[..i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = hv[k] / h;
            }
            for j in 0..=i {
                let row = &mut lo[j * n..j * n + i + 1];
                let g = dot(hv, row);
                axpy(-g, &d[..=i], row);
            }
        }
        hv.iter_mut().for_each(|x| *x = 0.0);
    }
    for j in 0..n {
        d[j] = z[j * n + n - 1];
        z[j * n + n - 1] = 0.0;
    }
    z[(n - 1) * n + n - 1] = 1.0;
}

/// EISPACK's tql2 (see [`sym_eig`]): implicit-shift QL on the tridiagonal (d, e), leaving the eigenvalues in d
/// and rotating z's rows into the eigenvectors. The rotations do not depend on z: they are recorded and applied
/// to z later, many sweeps per pass over a cache-sized block of its columns.
#[inline(always)]
fn tridiagonal_ql(z: &mut [f64], n: usize, d: &mut [f64], e: &mut [f64]) {
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let (mut f, mut tst1) = (0f64, 0f64);
    let eps = f64::EPSILON;
    let mut rots = Rotations { cs: Vec::new(), sweeps: Vec::new() };
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            for _iter in 0..200 {
                let g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let h = g - d[l];
                for x in &mut d[l + 2..n] {
                    *x -= h;
                }
                f += h;
                p = d[m];
                let (mut c, mut c2, mut c3) = (1f64, 1f64, 1f64);
                let el1 = e[l + 1];
                let (mut s, mut s2) = (0f64, 0f64);
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    let g = c * e[i];
                    let h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    rots.cs.push((c, s));
                }
                rots.sweeps.push((l, m));
                if rots.cs.len() >= 1 << 20 {
                    rots.apply(z, n);
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                // Also stops on a NaN (the comparison is false then).
                if e[l].abs().partial_cmp(&(eps * tst1)) != Some(std::cmp::Ordering::Greater) {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    rots.apply(z, n);
}

/// QL sweeps waiting to be applied to z: sweep (l, m) rotates rows i, i+1 for i = m−1 down to l,
/// (x, y) ← (c·x − s·y, s·x + c·y), taking its (c, s) in that order from `cs`.
struct Rotations {
    cs: Vec<(f64, f64)>,
    sweeps: Vec<(usize, usize)>,
}

impl Rotations {
    /// Applies and forgets the recorded sweeps: a panel of columns of z (which stays in cache) takes all of
    /// them, 16 columns at a time carried down each chain in registers, then the next panel.
    #[inline(always)]
    fn apply(&mut self, z: &mut [f64], n: usize) {
        const B: usize = 16;
        let panel = (65536 / n / B * B).clamp(B, 512);
        for p0 in (0..n).step_by(panel) {
            let pend = (p0 + panel).min(n);
            let mut at = 0;
            for &(l, m) in &self.sweeps {
                let cs = &self.cs[at..at + (m - l)];
                at += m - l;
                for k0 in (p0..pend).step_by(B) {
                    let w = B.min(pend - k0);
                    let mut carry = [0f64; B];
                    carry[..w].copy_from_slice(&z[m * n + k0..m * n + k0 + w]);
                    for (i, &(c, s)) in (l..m).rev().zip(cs) {
                        let (lo, hi) = z.split_at_mut((i + 1) * n);
                        let x = &lo[i * n + k0..i * n + k0 + w];
                        let y = &mut hi[k0..k0 + w];
                        for t in 0..w {
                            let (xv, yv) = (x[t], carry[t]);
                            y[t] = s * xv + c * yv;
                            carry[t] = c * xv - s * yv;
                        }
                    }
                    z[l * n + k0..l * n + k0 + w].copy_from_slice(&carry[..w]);
                }
            }
        }
        self.cs.clear();
        self.sweeps.clear();
    }
}

/// [`svd`] of a tall a [m, n] (m ≥ n, row-major): (left vectors as rows [n, m], σ [n], right vectors as
/// rows [n, n]), σ descending.
#[inline(always)]
fn svd_tall_impl(a: &[f64], m: usize, n: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    // G = AᵀA, over blocks of rows of A whose columns are copied out contiguous (a panel that stays in
    // cache); the lower triangle is summed, then mirrored.
    let blk = (32768 / n).clamp(16, 512);
    let mut panel = vec![0f64; n * blk];
    let mut g = vec![0f64; n * n];
    let mut row = vec![0f64; n];
    for i0 in (0..m).step_by(blk) {
        let w = blk.min(m - i0);
        for t in 0..w {
            for p in 0..n {
                panel[p * w + t] = a[(i0 + t) * n + p];
            }
        }
        for p in 0..n {
            dots(&panel[p * w..(p + 1) * w], &panel, w, &mut row[..=p]);
            axpy(1.0, &row[..=p], &mut g[p * n..p * n + p + 1]);
        }
    }
    for p in 0..n {
        for q in 0..p {
            g[q * n + p] = g[p * n + q];
        }
    }
    let lam = sym_eig(&mut g, n);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| lam[y].total_cmp(&lam[x]));
    let mut v = vec![0f64; n * n];
    for (r, &j) in order.iter().enumerate() {
        v[r * n..(r + 1) * n].copy_from_slice(&g[j * n..(j + 1) * n]);
    }
    drop(g);
    // B = A·V, its columns b_j (rows of ub) are σ_j u_j; over blocks of rows of A that stay in cache.
    let mut ub = vec![0f64; n * m];
    for i0 in (0..m).step_by(blk) {
        let w = blk.min(m - i0);
        for j in 0..n {
            dots(&v[j * n..(j + 1) * n], &a[i0 * n..(i0 + w) * n], n, &mut ub[j * m + i0..j * m + i0 + w]);
        }
    }
    let norms: Vec<f64> = (0..n).map(|j| dot(&ub[j * m..(j + 1) * m], &ub[j * m..(j + 1) * m]).sqrt()).collect();
    let smax = norms.iter().fold(0f64, |x, &y| x.max(y));
    let mut sig = vec![0f64; n];
    let mut coef = vec![0f64; n];
    // Σ_{l<j} u_l[i]², to pick the standard basis vector farthest from the span when completing it.
    let mut rowsq: Option<Vec<f64>> = None;
    let mut b0 = vec![0f64; m];
    for j in 0..n {
        let (done, rest) = ub.split_at_mut(j * m);
        let b = &mut rest[..m];
        if norms[j] >= 1e-2 * smax && smax > 0.0 {
            b.iter_mut().for_each(|x| *x /= norms[j]);
            sig[j] = norms[j];
            continue;
        }
        b0.copy_from_slice(b);
        let (n0, n1, n2) = orthogonalize(b, done, j, &mut coef);
        // Twice is enough unless the second pass also cancelled most of it: then b is in the span of the
        // earlier u (up to rounding), σ_j is negligible, and u_j completes the basis instead.
        if n0 > 0.0 && n2 > 0.5 * n1 && n2 > 1e-6 * n0 {
            b.iter_mut().for_each(|x| *x /= n2);
        } else {
            let rs = rowsq.get_or_insert_with(|| {
                let mut rs = vec![0f64; m];
                for l in 0..j {
                    for (x, &y) in rs.iter_mut().zip(&done[l * m..(l + 1) * m]) {
                        *x += y * y;
                    }
                }
                rs
            });
            let pick = (0..m).min_by(|&x, &y| rs[x].total_cmp(&rs[y])).unwrap_or(0);
            b.iter_mut().for_each(|x| *x = 0.0);
            b[pick] = 1.0;
            let (_, _, nn) = orthogonalize(b, done, j, &mut coef);
            b.iter_mut().for_each(|x| *x /= nn);
        }
        // σ_j = u_jᵀ A v_j, made ≥ 0 by the sign of u_j.
        let sj = dot(b, &b0);
        if sj < 0.0 {
            b.iter_mut().for_each(|x| *x = -*x);
        }
        sig[j] = sj.abs();
        if let Some(rs) = rowsq.as_mut() {
            for (x, &y) in rs.iter_mut().zip(b.iter()) {
                *x += y * y;
            }
        }
    }
    // The σ of re-orthogonalized columns moved by rounding: sort again (stable).
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| sig[y].total_cmp(&sig[x]));
    if order.iter().enumerate().all(|(r, &j)| r == j) {
        return (ub, sig, v);
    }
    let mut u2 = vec![0f64; n * m];
    let mut v2 = vec![0f64; n * n];
    let mut s2 = vec![0f64; n];
    for (r, &j) in order.iter().enumerate() {
        u2[r * m..(r + 1) * m].copy_from_slice(&ub[j * m..(j + 1) * m]);
        v2[r * n..(r + 1) * n].copy_from_slice(&v[j * n..(j + 1) * n]);
        s2[r] = sig[j];
    }
    (u2, s2, v2)
}
