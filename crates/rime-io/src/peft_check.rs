//! The one validation layer where a peft adapter meets rime: what the adapter must satisfy on its own (checked
//! by [`PeftAdapter::load`] for every path that reads an adapter: train resume, eval, embed, decode, merge
//! fold/combine) and what it must satisfy against the model it is applied to ([`PeftAdapter::check_against`],
//! called by every path that applies one). peft refuses the same adapters; rime names the file, tensor and
//! field at fault instead of applying them with a wrong scale or silently skipping factors.

use std::path::Path;

use crate::error::{check_finite, display, Error, Result};
use crate::lora_math::pattern_lookup;
use crate::peft::{AdapterConfig, PeftAdapter, ADAPTER_CONFIG, PEFT_PREFIX};

/// The largest LoRA rank rime accepts in a config (larger than any layer of any model it loads).
pub const MAX_RANK: usize = 1 << 20;
/// The largest |lora_alpha| (and `alpha_pattern` value) rime accepts; peft's scales are O(1)–O(100).
pub const MAX_ALPHA: f64 = 1e6;

impl AdapterConfig {
    /// Range checks of the numeric fields (`r`, `lora_alpha`, `lora_dropout`, `rank_pattern`,
    /// `alpha_pattern`); `source` names the file in messages.
    pub fn check_values(&self, source: &Path) -> Result<()> {
        let err = |field: &str, msg: String| Error::Config { file: display(source), field: field.into(), msg };
        let rank_ok = |r: usize| r > 0 && r <= MAX_RANK;
        let alpha_ok = |a: f64| a.is_finite() && a.abs() <= MAX_ALPHA;
        if self.peft_type == "LORA" && !rank_ok(self.r) {
            return Err(err("r", format!("{} is outside 1..={MAX_RANK}", self.r)));
        }
        if !alpha_ok(self.lora_alpha) {
            return Err(err("lora_alpha", format!("{} is not a finite number within ±{MAX_ALPHA:e}", self.lora_alpha)));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(err("lora_dropout", format!("{} is outside [0, 1)", self.lora_dropout)));
        }
        if let Some((k, v)) = self.rank_pattern.iter().find(|(_, &v)| !rank_ok(v)) {
            return Err(err("rank_pattern", format!("`{k}`: {v} is outside 1..={MAX_RANK}")));
        }
        if let Some((k, v)) = self.alpha_pattern.iter().find(|(_, &v)| !alpha_ok(v)) {
            return Err(err("alpha_pattern", format!("`{k}`: {v} is not a finite number within ±{MAX_ALPHA:e}")));
        }
        Ok(())
    }

    /// The rank the config declares for `module`: its `rank_pattern` entry, else `r`.
    pub fn module_rank(&self, module: &str) -> usize {
        pattern_lookup(&self.rank_pattern, module).copied().unwrap_or(self.r)
    }

    /// Whether `target_modules` selects `module`: a list entry equal to the module path or to its last
    /// components, or `re:PATTERN` (rime's `--targets` form) matching it; a string (peft's regex form) matching
    /// the whole path; `all-linear` selects everything. An invalid pattern selects nothing.
    pub fn targets(&self, module: &str) -> bool {
        if let Some(re) = self.target_modules_regex() {
            return regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(module));
        }
        self.target_modules.iter().any(|t| target_entry_matches(t, module))
    }

    /// peft's regex form of `target_modules` (a string other than `all-linear`).
    fn target_modules_regex(&self) -> Option<&str> {
        match self.raw.get("target_modules") {
            Some(serde_json::Value::String(s)) if s != "all-linear" => Some(s),
            _ => None,
        }
    }
}

impl PeftAdapter {
    /// The checks of an adapter on its own, run by [`PeftAdapter::load`] (config values are checked when the
    /// config is parsed, [`AdapterConfig::check_values`]): at least one
    /// tensor, every tensor finite, each LoRA factor's rank equal to the declared `r` / `rank_pattern` entry,
    /// and a saved head with as many rows as `rime_labels` has labels.
    pub(crate) fn check_self(&self, dir: &Path, weights: &Path) -> Result<()> {
        let cfg_file = dir.join(ADAPTER_CONFIG);
        let rime_file = dir.join(crate::peft::RIME_JSON);
        let labels_file = if rime_file.is_file() { rime_file } else { cfg_file.clone() };
        if self.tensors.is_empty() {
            return Err(Error::Format { file: display(weights), msg: "the adapter holds no tensors".into() });
        }
        for t in &self.tensors {
            check_finite(&display(weights), &t.name, &t.data)?;
        }
        if self.config.peft_type == "LORA" {
            self.check_ranks(&cfg_file)?;
        }
        self.check_head(&labels_file)
    }

    /// Each LoRA pair's rank (rows of A) against the config: `rank_pattern` when a key matches, else `r`.
    fn check_ranks(&self, cfg_file: &Path) -> Result<()> {
        for p in self.lora_pairs() {
            let Some(a) = self.get(&p.a) else { continue };
            let want = self.config.module_rank(&p.module);
            if a.shape.first() != Some(&want) {
                let field =
                    if pattern_lookup(&self.config.rank_pattern, &p.module).is_some() { "rank_pattern" } else { "r" };
                return Err(Error::Config {
                    file: display(cfg_file),
                    field: field.into(),
                    msg: format!(
                        "declares rank {want} for `{}`, but tensor `{}` has shape {:?} (rank {}); peft refuses this too",
                        p.module,
                        p.a,
                        a.shape,
                        a.shape.first().copied().unwrap_or(0)
                    ),
                });
            }
        }
        Ok(())
    }

    /// A classification head saved with the adapter (`head.*`, or `classifier.*` as peft saves
    /// BertForSequenceClassification's; under `base_model.model.` or, prompt learning, `base_model.`) has one
    /// row per label of `rime_labels` when the config lists them.
    fn check_head(&self, cfg_file: &Path) -> Result<()> {
        let Some(labels) = self.config.raw.get("rime_labels").and_then(|v| v.as_array()) else { return Ok(()) };
        for t in &self.tensors {
            let name = t.name.replace(".modules_to_save.default", "");
            let local = name.strip_prefix(PEFT_PREFIX).or_else(|| name.strip_prefix("base_model.")).unwrap_or(&name);
            let head = matches!(local, "head.weight" | "head.bias" | "classifier.weight" | "classifier.bias");
            if head && t.shape.first() != Some(&labels.len()) {
                return Err(Error::Config {
                    file: display(cfg_file),
                    field: "rime_labels".into(),
                    msg: format!(
                        "{} labels, but the head tensor `{}` has shape {:?} ({} rows): one row per label",
                        labels.len(),
                        t.name,
                        t.shape,
                        t.shape.first().copied().unwrap_or(0)
                    ),
                });
            }
        }
        Ok(())
    }

    /// The checks of an adapter against the model it is applied to; `weights` lists the model's weight tensors
    /// (name, shape) as the caller names them (HF names: `encoder.layer.0.attention.self.query.weight`).
    /// Every LoRA pair must adapt a `<module>.weight` of the model with the shape B·A gives and be selected by
    /// `target_modules`; every `target_modules` entry must select some module of the model. `dir` is the
    /// adapter folder (named in messages).
    pub fn check_against(&self, dir: &Path, weights: &[(String, Vec<usize>)]) -> Result<()> {
        let wfile = display(&dir.join(crate::peft::ADAPTER_WEIGHTS));
        let tensor_err = |tensor: &str, msg: String| Error::Tensor { file: wfile.clone(), tensor: tensor.into(), msg };
        for p in self.lora_pairs() {
            let (Some(a), Some(b)) = (self.get(&p.a), self.get(&p.b)) else { continue };
            let target = format!("{}.weight", p.module);
            let Some((_, shape)) = weights.iter().find(|(n, _)| *n == target) else {
                return Err(tensor_err(
                    &p.a,
                    format!("adapts `{target}`, which the model does not have (an adapter for another model?)"),
                ));
            };
            let d = crate::lora_math::LoraDims::of(&a.shape, &b.shape);
            let want = d.weight_shape(self.config.fan_in_fan_out);
            if shape.as_slice() != want {
                return Err(tensor_err(&p.a, format!("B·A is {want:?} but the model's `{target}` is {shape:?}")));
            }
            if !self.config.targets(&p.module) {
                return Err(tensor_err(
                    &p.a,
                    format!("module `{}` is not selected by target_modules {:?}", p.module, self.config.target_modules),
                ));
            }
        }
        self.check_targets_exist(dir, weights)
    }

    /// Every `target_modules` entry names at least one module of the model (list form only).
    fn check_targets_exist(&self, dir: &Path, weights: &[(String, Vec<usize>)]) -> Result<()> {
        if self.config.peft_type != "LORA" || self.config.target_modules_regex().is_some() {
            return Ok(());
        }
        let modules: Vec<&str> = weights.iter().filter_map(|(n, _)| n.strip_suffix(".weight")).collect();
        for t in &self.config.target_modules {
            if t == "all-linear" {
                continue;
            }
            if !modules.iter().any(|m| target_entry_matches(t, m)) {
                return Err(Error::Config {
                    file: display(&dir.join(ADAPTER_CONFIG)),
                    field: "target_modules".into(),
                    msg: format!("`{t}` names no module of the model (e.g. {})", examples(&modules)),
                });
            }
        }
        Ok(())
    }
}

/// One `target_modules` list entry against a module path (see [`AdapterConfig::targets`]).
fn target_entry_matches(t: &str, module: &str) -> bool {
    match t.strip_prefix("re:") {
        Some(re) => regex::Regex::new(re).is_ok_and(|r| r.is_match(module)),
        None => t == "all-linear" || module == t || module.ends_with(&format!(".{t}")),
    }
}

fn examples(modules: &[&str]) -> String {
    let mut v: Vec<&str> = modules.iter().filter_map(|m| m.rsplit('.').next()).collect();
    v.sort_unstable();
    v.dedup();
    v.truncate(6);
    v.join(", ")
}
