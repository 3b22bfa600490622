//! SVFit: each target weight is split once by its SVD, W = U_r diag(σ) V_rᵀ + W_rest, and only the r
//! singular values σ train. The rewrite is `y = x·W_restᵀ + b + ((x·V_r) ∘ σ)·U_rᵀ`; W_rest replaces W in
//! the store (same buffer, no extra copy of the backbone), U_r and V_r are frozen.
//!
//! Adapter layout (peft_type `RIME_SVFIT`, peft's folder and key scheme): per module
//! `base_model.model.<module>.svfit_sigma` [r] (trained), `.svfit_U` [out, r] and `.svfit_V` [r, in] (rows are
//! the right singular vectors). U and V are saved so that the adapter does not depend on how an SVD routine
//! picks signs; loading recomputes W_rest = W − Σ_i (u_iᵀ W v_i) u_i v_iᵀ from the base weight, which is
//! also a no-op on a weight that is already W_rest (resume).

use rime_graph::{Graph, ParamStore, Result, Var};
use rime_kernels::Device;
use rime_models::LinearHook;

use crate::lora::find_targets;

#[derive(Debug, Clone)]
pub struct SvfitConfig {
    /// Singular values kept per module (ignored when `energy` is set).
    pub rank: usize,
    /// Keep the fewest singular values whose squared sum reaches this fraction of the total.
    pub energy: Option<f32>,
    /// Module-name suffixes or `re:<regex>` (as LoRA's).
    pub targets: Vec<String>,
}

pub const PEFT_TYPE: &str = "RIME_SVFIT";

pub fn sigma_name(module: &str) -> String {
    format!("base_model.model.{module}.svfit_sigma")
}
pub fn u_name(module: &str) -> String {
    format!("base_model.model.{module}.svfit_U")
}
pub fn v_name(module: &str) -> String {
    format!("base_model.model.{module}.svfit_V")
}

/// Thin SVD of a row-major m×n matrix by one-sided Jacobi (Hestenes) in f64: returns (U [m, k] row-major,
/// σ [k] descending, Vᵀ [k, n] row-major), k = min(m, n). Accurate to f64 rounding; O(mn·min(m,n)) per
/// sweep, fine for the few hundred-wide matrices of an encoder's attention, done once per run.
pub fn svd(w: &[f32], m: usize, n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    if m < n {
        // W = (Wᵀ)ᵀ = (U' S V'ᵀ)ᵀ = V' S U'ᵀ
        let mut wt = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                wt[j * m + i] = w[i * n + j];
            }
        }
        let (u2, s, vt2) = svd(&wt, n, m);
        let k = m;
        // U = V' = (V'ᵀ)ᵀ: vt2 is [k, m] → U [m, k]
        let mut u = vec![0f32; m * k];
        for a in 0..k {
            for i in 0..m {
                u[i * k + a] = vt2[a * m + i];
            }
        }
        // Vᵀ = U'ᵀ: u2 is [n, k] → Vᵀ [k, n]
        let mut vt = vec![0f32; k * n];
        for j in 0..n {
            for a in 0..k {
                vt[a * n + j] = u2[j * k + a];
            }
        }
        return (u, s, vt);
    }
    // Columns of A (m×n, m ≥ n) and of V (n×n), each contiguous.
    let mut a: Vec<Vec<f64>> = (0..n).map(|j| (0..m).map(|i| w[i * n + j] as f64).collect()).collect();
    let mut v: Vec<Vec<f64>> = (0..n).map(|j| (0..n).map(|i| if i == j { 1.0 } else { 0.0 }).collect()).collect();
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>();
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let alpha = dot(&a[p], &a[p]);
                let beta = dot(&a[q], &a[q]);
                let gamma = dot(&a[p], &a[q]);
                if gamma.abs() <= 1e-12 * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                let (lo, hi) = a.split_at_mut(q);
                for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
                    let (xp, yq) = (*x, *y);
                    *x = c * xp - s * yq;
                    *y = s * xp + c * yq;
                }
                let (lo, hi) = v.split_at_mut(q);
                for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
                    let (xp, yq) = (*x, *y);
                    *x = c * xp - s * yq;
                    *y = s * xp + c * yq;
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let sig: Vec<f64> = a.iter().map(|col| dot(col, col).sqrt()).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| sig[y].total_cmp(&sig[x]));
    let k = n;
    let mut u = vec![0f32; m * k];
    let mut s = vec![0f32; k];
    let mut vt = vec![0f32; k * n];
    for (r, &j) in order.iter().enumerate() {
        s[r] = sig[j] as f32;
        for i in 0..m {
            // A zero singular value has no direction; any unit vector would do, zero keeps W_rest exact.
            u[i * k + r] = if sig[j] > 0.0 { (a[j][i] / sig[j]) as f32 } else { 0.0 };
        }
        for i in 0..n {
            vt[r * n + i] = v[j][i] as f32;
        }
    }
    (u, s, vt)
}

/// How many singular values to keep: `rank` (capped at k), or the fewest reaching `energy` of Σσ².
pub fn choose_rank(s: &[f32], rank: usize, energy: Option<f32>) -> usize {
    match energy {
        Some(e) => {
            let total: f64 = s.iter().map(|x| (*x as f64).powi(2)).sum();
            let mut acc = 0f64;
            for (i, x) in s.iter().enumerate() {
                acc += (*x as f64).powi(2);
                if acc >= e as f64 * total {
                    return i + 1;
                }
            }
            s.len()
        }
        None => rank.min(s.len()),
    }
}

/// Split every target weight of the store: W becomes W_rest in place, σ (trainable), U and V (frozen) are
/// added. Returns (module, r) for each module.
pub fn add_svfit(dev: &Device, store: &mut ParamStore, cfg: &SvfitConfig) -> Result<Vec<(String, usize)>> {
    if let Some(e) = cfg.energy {
        if !(e > 0.0 && e <= 1.0) {
            return Err(rime_graph::Error::Invalid(format!("--svfit-energy {e}: expected a fraction in (0, 1]")));
        }
    } else if cfg.rank == 0 {
        return Err(rime_graph::Error::Invalid("--rank 0: svfit needs at least one singular value".into()));
    }
    let modules = find_targets(store, &cfg.targets)?;
    let mut out = Vec::new();
    for (m, shape) in modules {
        let (o, i) = (shape[0], shape[1]);
        let wid = store.id(&format!("{m}.weight"))?;
        let w = store.read_f32(dev, wid)?;
        let (u, s, vt) = svd(&w, o, i);
        let k = s.len();
        let r = choose_rank(&s, cfg.rank, cfg.energy);
        let ur: Vec<f32> = (0..o).flat_map(|row| u[row * k..row * k + r].to_vec()).collect();
        let vr: Vec<f32> = vt[..r * i].to_vec();
        let sr: Vec<f32> = s[..r].to_vec();
        let rest = remove_span(&w, o, i, &ur, &vr, r);
        dev.write_f32(&store.get(wid).tensor, &rest)?;
        store.add_f32(dev, &u_name(&m), &ur, &[o, r], false)?;
        store.add_f32(dev, &v_name(&m), &vr, &[r, i], false)?;
        store.add_f32(dev, &sigma_name(&m), &sr, &[r], true)?;
        out.push((m, r));
    }
    Ok(out)
}

/// W − Σ_i (u_iᵀ W v_i) u_i v_iᵀ for U [o, r], V [r, i] (rows v_i).
pub fn remove_span(w: &[f32], o: usize, i: usize, u: &[f32], v: &[f32], r: usize) -> Vec<f32> {
    let mut rest: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    for a in 0..r {
        // σ0 = u_aᵀ W v_a on the current rest (the directions are orthogonal, so the order does not matter)
        let mut wv = vec![0f64; o];
        for (row, acc) in wv.iter_mut().enumerate() {
            *acc = (0..i).map(|c| rest[row * i + c] * v[a * i + c] as f64).sum();
        }
        let s0: f64 = (0..o).map(|row| u[row * r + a] as f64 * wv[row]).sum();
        for row in 0..o {
            let ur = u[row * r + a] as f64 * s0;
            for c in 0..i {
                rest[row * i + c] -= ur * v[a * i + c] as f64;
            }
        }
    }
    rest.into_iter().map(|x| x as f32).collect()
}

/// After loading an adapter: turn each adapted module's weight into W_rest using the adapter's U and V.
pub fn restore_rest(dev: &Device, store: &ParamStore) -> Result<usize> {
    let mut n = 0;
    let modules: Vec<String> = store
        .iter()
        .filter_map(|(_, p)| p.name.strip_suffix(".svfit_sigma"))
        .filter_map(|m| m.strip_prefix("base_model.model."))
        .map(String::from)
        .collect();
    for m in modules {
        let wid = store.id(&format!("{m}.weight"))?;
        let (uid, vid) = (store.id(&u_name(&m))?, store.id(&v_name(&m))?);
        let (o, i) = (store.get(wid).tensor.shape[0], store.get(wid).tensor.shape[1]);
        let r = store.get(uid).tensor.shape[1];
        if store.get(uid).tensor.shape != [o, r] || store.get(vid).tensor.shape != [r, i] {
            return Err(rime_graph::Error::Invalid(format!(
                "svfit adapter for '{m}': U {:?} and V {:?} do not fit the weight [{o}, {i}]",
                store.get(uid).tensor.shape,
                store.get(vid).tensor.shape
            )));
        }
        let w = store.read_f32(dev, wid)?;
        let rest = remove_span(&w, o, i, &store.read_f32(dev, uid)?, &store.read_f32(dev, vid)?, r);
        dev.write_f32(&store.get(wid).tensor, &rest)?;
        n += 1;
    }
    Ok(n)
}

/// The rewrite: modules with a `svfit_sigma` in the store get the low-rank σ path beside W_rest. With
/// `targets`, a target module without σ is an error (the method's tensors were never added).
pub struct SvfitHook {
    pub targets: Option<Vec<String>>,
}

impl LinearHook for SvfitHook {
    fn linear(&self, g: &mut Graph, store: &ParamStore, module: &str, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
        let sn = sigma_name(module);
        if store.find(&sn).is_none() {
            if self.targets.as_ref().is_some_and(|t| crate::lora::target_matches(t, module)) {
                return Err(rime_graph::Error::Invalid(format!(
                    "svfit tensors for '{module}' are not in the store: add them first (classifier::prepare_method)"
                )));
            }
            return g.linear(x, w, b);
        }
        let base = g.linear(x, w, b)?;
        let v = g.param(store, &v_name(module))?;
        let u = g.param(store, &u_name(module))?;
        let sigma = g.param(store, &sn)?;
        let h = g.linear(x, v, None)?; // [.., r] = x·V_r
        let h = g.mul(h, sigma)?;
        let d = g.linear(h, u, None)?; // [.., out]
        g.add(base, d)
    }
}
