//! SVFit: each target weight is split once by its SVD, W = U_r diag(σ) V_rᵀ + W_rest, and only the r
//! singular values σ train. The rewrite is `y = x·W_restᵀ + b + ((x·V_r) ∘ σ)·U_rᵀ`; W_rest replaces W in
//! the store (same buffer, no extra copy of the backbone), U_r and V_r are frozen.
//!
//! Adapter layout (peft_type `RIME_SVFIT`, peft's folder and key scheme): per module
//! `base_model.model.<module>.svfit_sigma` \[r\] (trained), `.svfit_U` [out, r] and `.svfit_V` [r, in] (rows are
//! the right singular vectors). U and V are saved so that the adapter does not depend on how an SVD routine
//! picks signs; loading recomputes W_rest = W − Σ_i (u_iᵀ W v_i) u_i v_iᵀ from the base weight, which is
//! also a no-op on a weight that is already W_rest (resume).

use rime_graph::{Graph, ParamStore, Var};
use rime_io::peft::AdapterConfig;
use rime_kernels::Device;
use rime_models::LinearHook;

use super::{SavedTensor, TuningMethod};
use crate::lora::find_targets;
pub use crate::svd::svd;
use crate::{Error, Result};

/// SVFit's settings (peft has no SVFit; [`Default`] is the CLI's: 8 singular values on `query` and `value`).
#[derive(Debug, Clone)]
pub struct SvfitConfig {
    /// Singular values kept (and trained) per module, at least 1; ignored when `energy` is set (written as
    /// `r`, with the count per module in `rank_pattern`).
    pub rank: usize,
    /// Keep, per module, the fewest singular values whose squared sum reaches this fraction of the total, in
    /// (0, 1] (`svfit_energy` in adapter_config.json).
    pub energy: Option<f32>,
    /// Modules to split (`target_modules`): suffixes or `re:<regex>`, as [`crate::lora::LoraConfig::targets`].
    pub targets: Vec<String>,
}

impl Default for SvfitConfig {
    fn default() -> SvfitConfig {
        SvfitConfig { rank: 8, energy: None, targets: vec!["query".into(), "value".into()] }
    }
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
            return Err(Error::invalid("svfit_energy", format!("{e}: expected a fraction in (0, 1]")));
        }
    } else if cfg.rank == 0 {
        return Err(Error::invalid("rank", "0: svfit needs at least one singular value"));
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
            return Err(Error::Msg(format!(
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
    fn linear(
        &self,
        g: &mut Graph,
        store: &ParamStore,
        module: &str,
        x: Var,
        w: Var,
        b: Option<Var>,
    ) -> rime_graph::Result<Var> {
        let sn = sigma_name(module);
        if store.find(&sn).is_none() {
            super::refuse_missing_target(self.targets.as_deref(), module, "svfit tensors")?;
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

/// SVFit as a [`TuningMethod`].
pub struct Svfit {
    config: SvfitConfig,
    /// Training: a target module without σ is an error. A loaded adapter: such modules stay plain.
    strict: bool,
}

impl Svfit {
    pub fn new(config: SvfitConfig) -> Svfit {
        Svfit { config, strict: true }
    }

    /// A saved SVFit adapter as it applies (its U and V come from the folder).
    pub fn from_adapter(a: &AdapterConfig) -> Result<Box<dyn TuningMethod>> {
        let energy = a.raw.get("svfit_energy").and_then(|v| v.as_f64()).map(|e| e as f32);
        let config = SvfitConfig { rank: a.r, energy, targets: a.target_modules.clone() };
        Ok(Box::new(Svfit { config, strict: false }))
    }
}

impl TuningMethod for Svfit {
    fn name(&self) -> &'static str {
        "svfit"
    }

    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn add_parameters(&self, dev: &Device, store: &mut ParamStore) -> Result<String> {
        let mods = add_svfit(dev, store, &self.config)?;
        let rs: Vec<usize> = mods.iter().map(|(_, r)| *r).collect();
        Ok(format!(
            "SVFit on {} modules, singular values kept: {} (min {}, max {})",
            mods.len(),
            rs.iter().sum::<usize>(),
            rs.iter().min().unwrap_or(&0),
            rs.iter().max().unwrap_or(&0)
        ))
    }

    fn hook(&self) -> Box<dyn LinearHook> {
        Box::new(SvfitHook { targets: self.strict.then(|| self.config.targets.clone()) })
    }

    /// `r` is the configured rank; `rank_pattern` the singular values kept per module.
    fn adapter_config(&self, store: &ParamStore) -> Result<AdapterConfig> {
        let mut a = AdapterConfig::lora(self.config.rank, 0.0, super::modules_with(store, ".svfit_sigma"));
        a.peft_type = PEFT_TYPE.into();
        for (_, p) in store.iter() {
            if let Some(m) = p.name.strip_suffix(".svfit_sigma") {
                a.rank_pattern.insert(m.trim_start_matches("base_model.model.").to_string(), p.tensor.numel());
            }
        }
        a.raw.insert("svfit_energy".into(), serde_json::json!(self.config.energy));
        Ok(a)
    }

    /// U and V are frozen but part of the adapter.
    fn write_tensors(&self, dev: &Device, store: &ParamStore, tensors: &mut Vec<SavedTensor>) -> Result<()> {
        for (id, p) in store.iter() {
            if p.name.ends_with(".svfit_U") || p.name.ends_with(".svfit_V") {
                tensors.push((p.name.clone(), p.tensor.shape.clone(), store.read_f32(dev, id)?));
            }
        }
        Ok(())
    }

    fn is_method_tensor(&self, local: &str) -> bool {
        local.contains(".svfit_")
    }

    fn loads_frozen(&self, name: &str) -> bool {
        name.ends_with(".svfit_U") || name.ends_with(".svfit_V")
    }

    fn after_load(&self, dev: &Device, store: &ParamStore) -> Result<()> {
        restore_rest(dev, store).map(|_| ())
    }
}
