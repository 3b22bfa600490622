//! LoRA as a rewrite of a model graph: every target linear `x·Wᵀ + b` becomes the fused
//! `x·Wᵀ + s·(x·Aᵀ)·Bᵀ + b` with A [r, in], B [out, r] trainable and W frozen. Names follow peft
//! (`base_model.model.<module>.lora_A.weight`), so adapters move between rime and peft unchanged.
//!
//! The family, as peft has it: `lora_dropout` on the input of the low-rank path only (training graphs; a
//! fresh mask every step), DoRA (`use_dora`: the output scaled per feature by m / ||W + s·B·A||_row, the norm
//! detached, m trained from ||W||_row) and PiSSA init (A, B from the top-r singular triplets of W, the frozen
//! weight replaced by the residual W − s·B·A; saved converted to a plain rank-2r LoRA of the unmodified W).

use std::path::Path;

use rand::{Rng, SeedableRng};
use regex::Regex;
use rime_graph::{Graph, ParamStore, Var};
use rime_io::peft::{AdapterConfig, PeftAdapter};
use rime_kernels::Device;
use rime_models::LinearHook;

use super::{SavedTensor, TuningMethod};
use crate::{Error, Result};

/// peft's `peft_type` of a LoRA adapter (the whole family: rsLoRA, DoRA, PiSSA, dropout).
pub const PEFT_TYPE: &str = "LORA";

/// How the factors start (peft's `init_lora_weights`).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum LoraInit {
    /// peft's default (`init_lora_weights=True`): A kaiming-uniform (a=√5), B zero.
    #[default]
    Kaiming,
    /// A gaussian with std 1/r, B zero (peft's `init_lora_weights="gaussian"`).
    Gaussian,
    /// peft's `init_lora_weights="pissa"`: W = U S Vᵀ, A = diag(√(S_r/s))·Vᵀ_r, B = U_r·diag(√(S_r/s)), and the
    /// frozen weight becomes the residual W − s·B·A (the model's output is unchanged at init).
    Pissa,
}

impl LoraInit {
    pub fn parse(s: &str) -> Option<LoraInit> {
        match s {
            "kaiming" => Some(LoraInit::Kaiming),
            "gaussian" => Some(LoraInit::Gaussian),
            "pissa" => Some(LoraInit::Pissa),
            _ => None,
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            LoraInit::Kaiming => "kaiming",
            LoraInit::Gaussian => "gaussian",
            LoraInit::Pissa => "pissa",
        }
    }
}

/// The LoRA family's settings, as peft's `LoraConfig`; [`Default`] is peft's defaults (r 8, lora_alpha 8, no
/// dropout, kaiming init) with BERT's default targets (`query`, `value`, what peft picks for BERT).
#[derive(Debug, Clone)]
pub struct LoraConfig {
    /// Rank r of the factors A [r, in] and B [out, r] (peft `r`); at least 1.
    pub rank: usize,
    /// Scaling numerator: the low-rank path is scaled by alpha / r, or alpha / √r with `rslora` (peft
    /// `lora_alpha`); finite and non-zero.
    pub alpha: f32,
    /// Modules to adapt (peft `target_modules`): a module matches a name exactly or as a suffix after a dot
    /// (`query` matches `encoder.layer.0.attention.self.query`); an entry starting with `re:` is a regex searched
    /// in the full module name.
    pub targets: Vec<String>,
    /// rsLoRA: scale by alpha / √r instead of alpha / r (peft `use_rslora`).
    pub rslora: bool,
    /// How A and B start (peft `init_lora_weights`).
    pub init: LoraInit,
    /// Seeds the factors' initialization and the dropout masks (peft has no field; torch's global seed).
    pub seed: u64,
    /// Dropout probability on the input of the low-rank path while training, in [0, 1); a fresh mask every
    /// step, off at evaluation; 0 keeps the fused LoRA kernel (peft `lora_dropout`).
    pub dropout: f32,
    /// DoRA, weight-decomposed LoRA: each output feature scaled by a trained magnitude over the row norm of
    /// W + s·B·A (peft `use_dora`).
    pub dora: bool,
}

impl Default for LoraConfig {
    fn default() -> LoraConfig {
        LoraConfig {
            rank: 8,
            alpha: 8.0,
            targets: vec!["query".into(), "value".into()],
            rslora: false,
            init: LoraInit::Kaiming,
            seed: 0,
            dropout: 0.0,
            dora: false,
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }

    /// Does this module name match the targets (peft: exact name or a suffix after a dot)?
    pub fn matches(&self, module: &str) -> bool {
        target_matches(&self.targets, module)
    }

    /// Refuse settings that cannot train, naming the config field ([`Error::Invalid`]).
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::invalid("rank", "0: must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid("lora_dropout", format!("{}: expected a probability in [0, 1)", self.dropout)));
        }
        if !self.alpha.is_finite() || self.alpha == 0.0 {
            return Err(Error::invalid("alpha", format!("{}: expected a finite, non-zero number", self.alpha)));
        }
        Ok(())
    }
}

/// Does a module name match any target (peft: exact name or a suffix after a dot; `re:<regex>` searches)?
pub fn target_matches(targets: &[String], module: &str) -> bool {
    targets.iter().any(|t| {
        if let Some(re) = t.strip_prefix("re:") {
            Regex::new(re).map(|r| r.is_match(module)).unwrap_or(false)
        } else {
            module == t || module.ends_with(&format!(".{t}"))
        }
    })
}

/// The 2-D weights `<module>.weight` of the model (not adapter tensors) whose module matches `targets`, with
/// their shapes; an error listing a few module names when none match.
pub fn find_targets(store: &ParamStore, targets: &[String]) -> Result<Vec<(String, Vec<usize>)>> {
    let modules: Vec<(String, Vec<usize>)> = store
        .iter()
        .filter_map(|(_, p)| p.name.strip_suffix(".weight").map(|m| (m.to_string(), p.tensor.shape.clone())))
        .filter(|(m, s)| s.len() == 2 && !m.starts_with("base_model.") && target_matches(targets, m))
        .collect();
    if modules.is_empty() {
        let some: Vec<String> = store
            .iter()
            .filter(|(_, p)| p.tensor.shape.len() == 2)
            .take(6)
            .map(|(_, p)| p.name.trim_end_matches(".weight").to_string())
            .collect();
        return Err(Error::invalid(
            "targets",
            format!("{targets:?} matched no linear layer; modules look like: {}", some.join(", ")),
        ));
    }
    Ok(modules)
}

/// peft's name of a LoRA factor for a module (`base_model.model.<module>.lora_A.weight`).
pub fn factor_name(module: &str, which: char) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

/// peft's saved name of a DoRA magnitude vector (`base_model.model.<module>.lora_magnitude_vector`: peft
/// stores `lora_magnitude_vector.default.weight` in memory and drops `.weight` and the adapter name on save).
pub fn magnitude_name(module: &str) -> String {
    format!("base_model.model.{module}.lora_magnitude_vector")
}

/// The frozen copy of a PiSSA factor's initial value (A0 / B0), kept to convert the trained adapter into a
/// LoRA of the unmodified base weight (never saved: it is recomputed from W).
pub fn pissa_init_name(module: &str, which: char) -> String {
    format!("base_model.model.{module}.lora_{which}.pissa_init")
}

/// The module of a factor name `base_model.model.<module>.lora_A.weight`.
fn module_of_factor(name: &str) -> Option<&str> {
    name.strip_prefix("base_model.model.")?.strip_suffix(".lora_A.weight")
}

/// Row norms of W + s·B·A (W [out, in], A [r, in], B [out, r]) in f64: DoRA's initial magnitude.
pub fn row_norms(w: &[f32], a: &[f32], b: &[f32], out_f: usize, in_f: usize, r: usize, s: f32) -> Vec<f32> {
    (0..out_f)
        .map(|o| {
            (0..in_f)
                .map(|i| {
                    let low: f64 = (0..r).map(|k| b[o * r + k] as f64 * a[k * in_f + i] as f64).sum();
                    let v = w[o * in_f + i] as f64 + s as f64 * low;
                    v * v
                })
                .sum::<f64>()
                .sqrt() as f32
        })
        .collect()
}

/// PiSSA's factors of W [out, in] for rank r and scale s: (A [r, in], B [out, r], W − s·B·A).
pub fn pissa_factors(w: &[f32], out_f: usize, in_f: usize, r: usize, s: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (u, sv, vt) = crate::svd::svd(w, out_f, in_f);
    let k = out_f.min(in_f);
    let mut a = vec![0f32; r * in_f];
    let mut b = vec![0f32; out_f * r];
    for q in 0..r {
        let root = (sv[q] / s).max(0.0).sqrt();
        for i in 0..in_f {
            a[q * in_f + i] = root * vt[q * in_f + i];
        }
        for o in 0..out_f {
            b[o * r + q] = u[o * k + q] * root;
        }
    }
    let mut res = w.to_vec();
    for o in 0..out_f {
        for i in 0..in_f {
            let low: f64 = (0..r).map(|q| b[o * r + q] as f64 * a[q * in_f + i] as f64).sum();
            res[o * in_f + i] = (w[o * in_f + i] as f64 - s as f64 * low) as f32;
        }
    }
    (a, b, res)
}

/// Create A and B for every target linear of the model already in the store (weights named
/// `<module>.weight`). Returns the modules adapted; errors if none matched (listing a few candidates).
/// PiSSA rewrites the frozen weights and DoRA adds a magnitude vector per module (both read W back).
pub fn add_lora(dev: &Device, store: &mut ParamStore, cfg: &LoraConfig) -> Result<Vec<String>> {
    cfg.validate()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let modules = find_targets(store, &cfg.targets)?;
    let s = cfg.scale();
    for (m, shape) in &modules {
        let (out_f, in_f) = (shape[0], shape[1]);
        let r = cfg.rank;
        let (a, b) = match cfg.init {
            LoraInit::Kaiming => {
                let bound = 1.0 / (in_f as f32).sqrt();
                ((0..r * in_f).map(|_| rng.random_range(-bound..bound)).collect(), vec![0f32; out_f * r])
            }
            LoraInit::Gaussian => {
                let std = 1.0 / r as f32;
                ((0..r * in_f).map(|_| gaussian(&mut rng) * std).collect(), vec![0f32; out_f * r])
            }
            LoraInit::Pissa => {
                if r > out_f.min(in_f) {
                    return Err(Error::invalid(
                        "rank",
                        format!(
                            "{r} with init pissa: module '{m}' is [{out_f}, {in_f}], so at most {} singular vectors \
                             exist",
                            out_f.min(in_f)
                        ),
                    ));
                }
                let wid = store.id(&format!("{m}.weight"))?;
                if store.get(wid).tensor.dtype != rime_kernels::DType::F32 {
                    return Err(Error::invalid(
                        "init",
                        format!(
                            "pissa rewrites '{m}.weight' into its residual and needs it stored as F32, not {:?}",
                            store.get(wid).tensor.dtype
                        ),
                    ));
                }
                let w = store.read_f32(dev, wid)?;
                let (a, b, res) = pissa_factors(&w, out_f, in_f, r, s);
                dev.write_f32(&store.get(wid).tensor, &res)?;
                store.add_f32(dev, &pissa_init_name(m, 'A'), &a, &[r, in_f], false)?;
                store.add_f32(dev, &pissa_init_name(m, 'B'), &b, &[out_f, r], false)?;
                (a, b)
            }
        };
        if cfg.dora {
            // m0 = ||W + s·B·A||_row: the layer's output is unchanged at init (with PiSSA that is ||W||).
            let w = store.read_f32(dev, store.id(&format!("{m}.weight"))?)?;
            let mag = row_norms(&w, &a, &b, out_f, in_f, r, s);
            store.add_f32(dev, &magnitude_name(m), &mag, &[out_f], true)?;
        }
        store.add_f32(dev, &factor_name(m, 'A'), &a, &[r, in_f], true)?;
        store.add_f32(dev, &factor_name(m, 'B'), &b, &[out_f, r], true)?;
    }
    Ok(modules.into_iter().map(|(m, _)| m).collect())
}

/// A PiSSA adapter as peft's `path_initial_model_for_weight_conversion` writes it: a plain LoRA of the
/// unmodified W with ΔW = s·(B·A − B0·A0), i.e. A' = [A; A0] [2r, in] and B' = [B, −B0] [out, 2r], rank 2r
/// and alpha doubled (×√2 under rsLoRA) so the scale stays s. `tensors` are (name, shape, data) as saved;
/// the factors are replaced in place. Errors if a PiSSA initial copy is missing.
pub fn pissa_to_lora(dev: &Device, store: &ParamStore, tensors: &mut [SavedTensor]) -> Result<()> {
    let modules: Vec<String> = tensors.iter().filter_map(|(n, _, _)| module_of_factor(n).map(String::from)).collect();
    for m in modules {
        let init = |w: char| -> Result<Vec<f32>> {
            let id = store.find(&pissa_init_name(&m, w)).ok_or_else(|| {
                Error::Msg(format!("PiSSA adapter: no initial {w} for module '{m}' to convert against"))
            })?;
            Ok(store.read_f32(dev, id)?)
        };
        let (a0, b0) = (init('A')?, init('B')?);
        for t in tensors.iter_mut() {
            if t.0 == factor_name(&m, 'A') {
                let (r, in_f) = (t.1[0], t.1[1]);
                t.2.extend_from_slice(&a0);
                t.1 = vec![2 * r, in_f];
            } else if t.0 == factor_name(&m, 'B') {
                let (out_f, r) = (t.1[0], t.1[1]);
                let mut b2 = Vec::with_capacity(out_f * 2 * r);
                for o in 0..out_f {
                    b2.extend_from_slice(&t.2[o * r..(o + 1) * r]);
                    b2.extend(b0[o * r..(o + 1) * r].iter().map(|v| -v));
                }
                t.2 = b2;
                t.1 = vec![out_f, 2 * r];
            }
        }
    }
    Ok(())
}

/// Undo [`pissa_to_lora`] when a converted adapter is loaded back into a PiSSA store (resume): the first r
/// rows of A' and columns of B' are the trained factors; the rest must equal this store's initial factors,
/// else the adapter was trained from another base. Returns the factor to load.
pub fn lora_to_pissa(
    dev: &Device,
    store: &ParamStore,
    name: &str,
    shape: &[usize],
    data: &[f32],
) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
    let Some(rest) = name.strip_prefix("base_model.model.") else { return Ok(None) };
    let (m, which) = match (rest.strip_suffix(".lora_A.weight"), rest.strip_suffix(".lora_B.weight")) {
        (Some(m), _) => (m, 'A'),
        (_, Some(m)) => (m, 'B'),
        _ => return Ok(None),
    };
    let Some(id) = store.find(&pissa_init_name(m, which)) else { return Ok(None) };
    let init = store.read_f32(dev, id)?;
    let ishape = store.get(id).tensor.shape.clone();
    let mismatch = || {
        Error::Msg(format!(
            "'{name}' {shape:?} is not a converted PiSSA factor of this base (initial factor {ishape:?} differs)"
        ))
    };
    let (trained, fixed): (Vec<f32>, Vec<f32>) = if which == 'A' {
        if shape != [2 * ishape[0], ishape[1]] {
            return Err(mismatch());
        }
        (data[..init.len()].to_vec(), data[init.len()..].to_vec())
    } else {
        let (out_f, r) = (ishape[0], ishape[1]);
        if shape != [out_f, 2 * r] {
            return Err(mismatch());
        }
        let mut t = Vec::with_capacity(out_f * r);
        let mut f = Vec::with_capacity(out_f * r);
        for o in 0..out_f {
            t.extend_from_slice(&data[o * 2 * r..o * 2 * r + r]);
            f.extend(data[o * 2 * r + r..(o + 1) * 2 * r].iter().map(|v| -v));
        }
        (t, f)
    };
    let tol = 1e-5 * init.iter().fold(1f32, |a, v| a.max(v.abs()));
    if fixed.iter().zip(&init).any(|(x, y)| (x - y).abs() > tol) {
        return Err(mismatch());
    }
    Ok(Some((ishape, trained)))
}

fn gaussian(rng: &mut impl Rng) -> f32 {
    // Box-Muller
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// The graph rewrite: target linears whose factors are in the store become fused LoRA ops; with a DoRA
/// magnitude in the store, DoRA layers. `dropout` > 0 (training graphs only) puts dropout on the low-rank
/// path's input, composed from plain ops; `seed` keeps runs reproducible.
pub struct LoraHook {
    pub scale: f32,
    pub dropout: f32,
    pub seed: u64,
}

impl LoraHook {
    /// The inference rewrite (no dropout).
    pub fn new(scale: f32) -> LoraHook {
        LoraHook { scale, dropout: 0.0, seed: 0 }
    }

    /// A dropout seed per module, so that the modules of a step draw different masks.
    pub fn module_seed(&self, module: &str) -> u32 {
        let mut h = 0xcbf2_9ce4_8422_2325u64 ^ self.seed;
        for byte in module.bytes() {
            h = (h ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
        }
        (h ^ (h >> 32)) as u32
    }
}

impl LinearHook for LoraHook {
    fn rewrites(&self, store: &ParamStore, module: &str) -> bool {
        store.find(&factor_name(module, 'A')).is_some() && store.find(&factor_name(module, 'B')).is_some()
    }

    fn linear(
        &self,
        g: &mut Graph,
        store: &ParamStore,
        module: &str,
        x: Var,
        w: Var,
        b: Option<Var>,
    ) -> rime_graph::Result<Var> {
        let (an, bn) = (factor_name(module, 'A'), factor_name(module, 'B'));
        if store.find(&an).is_none() || store.find(&bn).is_none() {
            return g.linear(x, w, b);
        }
        let a = g.param(store, &an)?;
        let bf = g.param(store, &bn)?;
        let s = self.scale;
        let xd = (self.dropout > 0.0).then(|| g.dropout(x, self.dropout, self.module_seed(module)));
        let mn = magnitude_name(module);
        if store.find(&mn).is_some() {
            // DoRA (peft's DoraLinearLayer): y = g ⊙ (x̃·Wᵀ + s·(x̃·Aᵀ)·Bᵀ) + (x − x̃)·Wᵀ + b with
            // g = m / ||W + s·B·A||_row detached and x̃ the dropped-out input (x itself without dropout).
            let mag = g.param(store, &mn)?;
            let scale = g.dora_scale(w, a, bf, mag, s)?;
            let t = g.lora(xd.unwrap_or(x), w, None, a, bf, s)?;
            let y = g.mul(t, scale)?;
            return match xd {
                None => match b {
                    Some(bias) => g.add(y, bias),
                    None => Ok(y),
                },
                Some(xd) => {
                    let base = g.linear(x, w, b)?;
                    let dropped = g.linear(xd, w, None)?;
                    let dropped = g.scale(dropped, -1.0);
                    let y = g.add(y, dropped)?;
                    g.add(base, y)
                }
            };
        }
        match xd {
            None => g.lora(x, w, b, a, bf, s),
            Some(xd) => {
                // peft: y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ.
                let base = g.linear(x, w, b)?;
                let h = g.linear(xd, a, None)?;
                let low = g.linear(h, bf, None)?;
                let low = g.scale(low, s);
                g.add(base, low)
            }
        }
    }
}

/// peft-compatible names without the adapter name (`.default`) that peft keeps in memory.
pub fn strip_adapter_name(name: &str) -> String {
    name.replace(".default.weight", ".weight")
}

#[allow(unused)]
fn _regex_ok() -> bool {
    Regex::new("x").is_ok()
}

/// The LoRA family as a [`TuningMethod`].
pub struct Lora {
    config: LoraConfig,
    /// The low-rank path's scale: [`LoraConfig::scale`], or for a loaded adapter its config's (computed in f64).
    scale: f32,
}

impl Lora {
    pub fn new(config: LoraConfig) -> Lora {
        let scale = config.scale();
        Lora { config, scale }
    }

    /// A saved LoRA adapter as it applies (no dropout).
    pub fn from_adapter(a: &AdapterConfig) -> Result<Box<dyn TuningMethod>> {
        let config = LoraConfig {
            rank: a.r,
            alpha: a.lora_alpha as f32,
            targets: a.target_modules.clone(),
            rslora: a.use_rslora,
            dora: a.use_dora,
            ..LoraConfig::default()
        };
        Ok(Box::new(Lora { config, scale: a.scale() as f32 }))
    }
}

impl TuningMethod for Lora {
    fn name(&self) -> &'static str {
        "lora"
    }

    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn add_parameters(&self, dev: &Device, store: &mut ParamStore) -> Result<String> {
        let l = &self.config;
        let mods = add_lora(dev, store, l)?;
        let mut extra = String::new();
        if l.dora {
            extra.push_str(", DoRA");
        }
        if l.dropout > 0.0 {
            extra.push_str(&format!(", dropout {}", l.dropout));
        }
        if l.init != LoraInit::Kaiming {
            extra.push_str(&format!(", init {}", l.init.name()));
        }
        Ok(format!("LoRA r={} alpha={} on {} modules{extra}", l.rank, l.alpha, mods.len()))
    }

    fn hook(&self) -> Box<dyn LinearHook> {
        Box::new(LoraHook { scale: self.scale, dropout: self.config.dropout, seed: self.config.seed })
    }

    fn eval_hook(&self) -> Option<Box<dyn LinearHook>> {
        (self.config.dropout > 0.0).then(|| Box::new(LoraHook::new(self.scale)) as Box<dyn LinearHook>)
    }

    /// rsLoRA, DoRA, dropout and init as peft writes them; a PiSSA run is described as the rank-2r LoRA that
    /// [`TuningMethod::write_tensors`] converts it to (peft's `path_initial_model_for_weight_conversion`).
    fn adapter_config(&self, _store: &ParamStore) -> Result<AdapterConfig> {
        let c = &self.config;
        let mut a = AdapterConfig::lora(c.rank, c.alpha as f64, c.targets.clone());
        a.use_rslora = c.rslora;
        a.use_dora = c.dora;
        a.lora_dropout = c.dropout as f64;
        let init = if c.init == LoraInit::Gaussian {
            serde_json::json!("gaussian")
        } else {
            // PiSSA is saved converted to a LoRA that peft loads with init_lora_weights=True.
            serde_json::json!(true)
        };
        a.raw.insert("init_lora_weights".into(), init);
        if c.init == LoraInit::Pissa {
            // peft's save_pretrained(path_initial_model_for_weight_conversion=...): rank 2r, alpha 2·alpha
            // (·√2 with rsLoRA) so the scale stays alpha/r; the factors are converted by write_tensors.
            a.r = 2 * c.rank;
            a.lora_alpha = if c.rslora { c.alpha as f64 * 2f64.sqrt() } else { 2.0 * c.alpha as f64 };
            a.raw.insert(
                "rime_pissa".into(),
                serde_json::json!(format!(
                    "trained with init_lora_weights=\"pissa\" (r={}, lora_alpha={}) on residual weights; saved \
                     converted to a rank-{} LoRA of the unmodified base: lora_A = [A; A0], lora_B = [B, -B0]",
                    c.rank,
                    c.alpha,
                    2 * c.rank
                )),
            );
        }
        Ok(a)
    }

    /// PiSSA factors become a plain LoRA of the unmodified base ([`pissa_to_lora`]).
    fn write_tensors(&self, dev: &Device, store: &ParamStore, tensors: &mut Vec<SavedTensor>) -> Result<()> {
        if self.config.init == LoraInit::Pissa {
            pissa_to_lora(dev, store, tensors)?;
        }
        Ok(())
    }

    /// DoRA magnitudes must agree with `use_dora`; a converted PiSSA adapter loaded back into a PiSSA store
    /// (resume) splits into the trained factors ([`lora_to_pissa`]).
    fn read_tensors(&self, dev: &Device, store: &ParamStore, ad: &mut PeftAdapter, dir: &Path) -> Result<()> {
        check_dora(ad, dir)?;
        ad.check_against(dir, &model_weights(store))?;
        for t in &mut ad.tensors {
            let pissa = lora_to_pissa(dev, store, &t.name, &t.shape, &t.data)
                .map_err(|e| Error::Msg(format!("{}: {e}", dir.display())))?;
            if let Some((shape, data)) = pissa {
                t.shape = shape;
                t.data = data;
            }
        }
        Ok(())
    }

    fn is_method_tensor(&self, local: &str) -> bool {
        local.contains(".lora_")
    }
}

/// The model's weights in `store` (name, shape), adapter parameters left out: what an adapter is checked
/// against ([`PeftAdapter::check_against`]).
pub(crate) fn model_weights(store: &ParamStore) -> Vec<(String, Vec<usize>)> {
    store
        .iter()
        .filter(|(_, p)| !p.name.starts_with(rime_io::peft::PEFT_PREFIX) && !p.name.contains(".lora_"))
        .map(|(_, p)| (p.name.clone(), p.tensor.shape.clone()))
        .collect()
}

/// A LoRA adapter's DoRA magnitudes agree with `use_dora`: one `lora_magnitude_vector` per adapted module
/// when set, none otherwise; fan_in_fan_out layers (GPT-2 Conv1D) are not DoRA layers rime can build.
fn check_dora(ad: &PeftAdapter, dir: &Path) -> Result<()> {
    let mags: Vec<&str> = ad
        .tensors
        .iter()
        .filter_map(|t| t.name.strip_suffix(".lora_magnitude_vector"))
        .map(|m| m.strip_prefix("base_model.model.").unwrap_or(m))
        .collect();
    let cfg = dir.join("adapter_config.json");
    if !ad.config.use_dora {
        if let Some(m) = mags.first() {
            return Err(Error::Msg(format!(
                "{}: use_dora is false but the adapter has a DoRA magnitude for '{m}'",
                cfg.display()
            )));
        }
        return Ok(());
    }
    if ad.config.fan_in_fan_out {
        return Err(Error::Msg(format!("{}: use_dora with fan_in_fan_out is not supported", cfg.display())));
    }
    for p in ad.lora_pairs() {
        if !mags.contains(&p.module.as_str()) {
            return Err(Error::Msg(format!(
                "{}: use_dora is true but module '{}' has no lora_magnitude_vector in {}",
                cfg.display(),
                p.module,
                rime_io::peft::ADAPTER_WEIGHTS
            )));
        }
    }
    Ok(())
}
