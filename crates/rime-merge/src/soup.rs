//! Greedy model soups (Wortsman et al. 2022) of rime LoRA adapters with classification heads, as written by
//! `rime train` (its `best/` folder), text or image classifiers (`parameters: {task: image-classify}`). Candidates are ranked by held-out accuracy measured with rime's own
//! evaluation (`rime_peft::Evaluator` on `eval_data`); the best starts the soup and each next
//! candidate is kept when the soup with it scores at least the soup's accuracy so far. Every decision is
//! recorded in `merge_report.json` (`notes` and `decisions`).
//!
//! What a soup of adapters is: the uniform peft combination of the members (`combination: linear`, the
//! default: A' = Σ sqrt(s_i/n) A_i, B' = Σ sqrt(s_i/n) B_i, scale 1, as peft's `add_weighted_adapter` does;
//! its product holds cross terms B_i A_j), or `combination: cat`, whose product is exactly the mean of the
//! members' deltas s_i B_i A_i, i.e. the uniform soup of the folded models. Heads (`head.weight`,
//! `head.bias`) are averaged uniformly in both cases. The output folder is an adapter for `rime eval`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rime_io::peft::PeftAdapter;
use rime_io::Columns;
use rime_kernels::Device;
use serde::Serialize;

use crate::combine::{combine_adapters, Combination, CombineOptions};
use crate::config::MergeConfig;
use crate::engine::{write_report, MergeOptions, MergeReport};
use crate::output::Staging;
use crate::{Error, Result};

/// One step of the greedy selection.
#[derive(Debug, Clone, Serialize)]
pub struct SoupDecision {
    pub candidate: String,
    /// The candidate's own held-out accuracy.
    pub accuracy_alone: f64,
    /// Held-out accuracy of the soup with this candidate added (its own accuracy for the first).
    pub accuracy_with: f64,
    /// The soup's accuracy before this candidate (None for the first).
    pub accuracy_before: Option<f64>,
    pub kept: bool,
}

#[derive(Serialize)]
struct SoupReport<'a> {
    #[serde(flatten)]
    report: &'a MergeReport,
    eval_data: String,
    combination: &'static str,
    soup: Vec<String>,
    soup_accuracy: f64,
    decisions: Vec<SoupDecision>,
}

/// A path parameter: as given, else next to the config file.
pub(crate) fn resolve_file(cfg: &MergeConfig, key: &str) -> Result<PathBuf> {
    let file = cfg.source.display().to_string();
    let v = cfg.strings.get(key).ok_or_else(|| Error::Config {
        file: file.clone(),
        msg: format!("{} needs `parameters: {{{key}: FILE}}`", cfg.method.as_str()),
    })?;
    let p = PathBuf::from(v);
    if p.exists() {
        return Ok(p);
    }
    let q = cfg.source.parent().unwrap_or(Path::new(".")).join(v);
    if q.exists() {
        return Ok(q);
    }
    Err(Error::Config { file, msg: format!("parameters: {key} `{v}` not found (as a path or next to the config)") })
}

pub(crate) fn columns(cfg: &MergeConfig) -> Columns {
    let mut c = Columns::default();
    if let Some(t) = cfg.strings.get("text_column") {
        c.text = t.clone();
    }
    if let Some(l) = cfg.strings.get("label_column") {
        c.label = Some(l.clone());
    }
    c
}

pub(crate) fn num(cfg: &MergeConfig, key: &str, default: f64) -> f64 {
    cfg.numbers.get(key).copied().unwrap_or(default)
}

/// Each candidate must be an adapter folder with a head.
pub(crate) fn load_candidates(cfg: &MergeConfig) -> Result<(Vec<PeftAdapter>, Vec<PathBuf>)> {
    let mut ads = Vec::new();
    let mut paths = Vec::new();
    for m in cfg.task_models() {
        if !m.path.join(rime_io::peft::ADAPTER_CONFIG).is_file() {
            return Err(Error::Config {
                file: cfg.source.display().to_string(),
                msg: format!(
                    "model `{}`: {} works on rime adapters with a classification head (a `rime train` output folder \
                     such as best/, with adapter_config.json); full checkpoints carry no head to evaluate",
                    m.name,
                    cfg.method.as_str()
                ),
            });
        }
        let ad = PeftAdapter::load(&m.path)?;
        if ad.get("base_model.model.head.weight").is_none() {
            return Err(Error::Tensor {
                tensor: "base_model.model.head.weight".into(),
                msg: format!("missing in {}: the adapter has no classification head", m.path.display()),
            });
        }
        ads.push(ad);
        paths.push(m.path.clone());
    }
    Ok((ads, paths))
}

pub(crate) fn base_path(cfg: &MergeConfig) -> Result<PathBuf> {
    cfg.base.as_ref().map(|b| b.path.clone()).ok_or_else(|| Error::Config {
        file: cfg.source.display().to_string(),
        msg: format!("{} needs `base_model` (the model the adapters were trained on)", cfg.method.as_str()),
    })
}

fn peft_err(e: rime_peft::Error) -> Error {
    Error::Invalid(format!("evaluation: {e}"))
}

/// Scores candidate adapters on the held-out data: texts through rime-peft's [`rime_peft::Evaluator`], or images
/// (`parameters: {task: image-classify}`, `eval_data` an image folder or IDX images file, `eval_limit` its first
/// N images) through [`rime_peft::image::evaluate_adapter`].
enum Scorer<'d> {
    Text(Box<(rime_peft::Evaluator<'d>, rime_peft::TextClassData)>),
    Image { dev: &'d Device, base: PathBuf, data: rime_peft::ImageClassData, batch: usize },
}

impl<'d> Scorer<'d> {
    fn new(
        dev: &'d Device,
        cfg: &MergeConfig,
        base: &Path,
        eval: &Path,
        batch: usize,
        max_length: usize,
    ) -> Result<Self> {
        match cfg.strings.get("task").map(String::as_str) {
            None | Some("classify") => {
                let evaluator = rime_peft::Evaluator::new(dev, base, batch, max_length).map_err(peft_err)?;
                let data = rime_peft::TextClassData::from_file(eval, &columns(cfg)).map_err(peft_err)?;
                Ok(Scorer::Text(Box::new((evaluator, data))))
            }
            Some("image-classify") => {
                let mut data = rime_peft::ImageClassData::from_path(eval).map_err(peft_err)?;
                if let Some(n) = cfg.numbers.get("eval_limit") {
                    data = data.take(*n as usize);
                }
                Ok(Scorer::Image { dev, base: base.to_path_buf(), data, batch })
            }
            Some(t) => Err(Error::Config {
                file: cfg.source.display().to_string(),
                msg: format!("parameters: task `{t}`: expected classify or image-classify"),
            }),
        }
    }

    fn accuracy(&self, adapter: &Path) -> Result<f64> {
        let m = match self {
            Scorer::Text(t) => t.0.evaluate(adapter, &t.1),
            Scorer::Image { dev, base, data, batch } => {
                rime_peft::image::evaluate_adapter(dev, base, adapter, data, *batch)
            }
        };
        m.map(|m| m.accuracy).map_err(peft_err)
    }
}

/// `parameters: combination`: linear (the default) or cat.
fn combination_of(cfg: &MergeConfig) -> Result<Combination> {
    Ok(match cfg.strings.get("combination").map(String::as_str) {
        None | Some("linear") => Combination::Linear,
        Some("cat") => Combination::Cat,
        Some(c) => {
            return Err(Error::Config {
                file: cfg.source.display().to_string(),
                msg: format!("parameters: combination `{c}`: greedy_soup averages with `linear` or `cat`"),
            })
        }
    })
}

/// One line per greedy decision, for the report.
fn soup_notes(decisions: &[SoupDecision]) -> Vec<String> {
    decisions
        .iter()
        .map(|d| match d.accuracy_before {
            None => format!("greedy_soup: start with {} (held-out accuracy {:.4})", d.candidate, d.accuracy_alone),
            Some(b) => format!(
                "greedy_soup: {} {} (alone {:.4}; soup {:.4} -> {:.4} with it)",
                if d.kept { "add" } else { "skip" },
                d.candidate,
                d.accuracy_alone,
                b,
                d.accuracy_with
            ),
        })
        .collect()
}

/// Runs greedy_soup as `cfg` says and writes the soup adapter to `out`.
pub fn greedy_soup(dev: &Device, cfg: &MergeConfig, out: &Path, opts: &MergeOptions) -> Result<MergeReport> {
    let t0 = Instant::now();
    let base = base_path(cfg)?;
    let eval = resolve_file(cfg, "eval_data")?;
    let batch = num(cfg, "batch_size", 32.0).max(1.0) as usize;
    let max_length = num(cfg, "max_length", 128.0).max(8.0) as usize;
    let combination = combination_of(cfg)?;
    let (ads, paths) = load_candidates(cfg)?;
    if ads.is_empty() {
        return Err(Error::Config {
            file: cfg.source.display().to_string(),
            msg: "greedy_soup needs at least one candidate under `models`".into(),
        });
    }
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let bytes_read: u64 = ads.iter().flat_map(|a| a.tensors.iter()).map(|t| t.data.len() as u64 * 4).sum();
    let inputs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let staging = Staging::new(out, opts.force, &inputs)?;
    let scratch = staging.tmp.join(".candidate");
    let scorer = Scorer::new(dev, cfg, &base, &eval, batch, max_length)?;
    let evaluate = |dir: &Path| -> Result<f64> { scorer.accuracy(dir) };
    let soup_of = |members: &[usize]| -> Result<PeftAdapter> {
        let sel: Vec<PeftAdapter> = members.iter().map(|&i| ads[i].clone()).collect();
        let nm: Vec<String> = members.iter().map(|&i| names[i].clone()).collect();
        let w = vec![1.0 / members.len() as f64; members.len()];
        combine_adapters(dev, &sel, &nm, &w, &CombineOptions::new(combination))
    };
    let mut alone = Vec::new();
    for p in &paths {
        alone.push(evaluate(p)?);
    }
    let mut order: Vec<usize> = (0..ads.len()).collect();
    order.sort_by(|&a, &b| alone[b].total_cmp(&alone[a]));
    let mut soup = vec![order[0]];
    let mut best = alone[order[0]];
    let mut decisions = vec![SoupDecision {
        candidate: names[order[0]].clone(),
        accuracy_alone: best,
        accuracy_with: best,
        accuracy_before: None,
        kept: true,
    }];
    for &c in &order[1..] {
        let mut trial = soup.clone();
        trial.push(c);
        let cand = soup_of(&trial)?;
        if scratch.exists() {
            let _ = std::fs::remove_dir_all(&scratch);
        }
        cand.save(&scratch)?;
        let acc = evaluate(&scratch)?;
        let kept = acc >= best;
        decisions.push(SoupDecision {
            candidate: names[c].clone(),
            accuracy_alone: alone[c],
            accuracy_with: acc,
            accuracy_before: Some(best),
            kept,
        });
        if kept {
            soup = trial;
            best = acc;
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let result = soup_of(&soup)?;
    result.save(&staging.tmp)?;
    let bytes_written =
        std::fs::metadata(staging.tmp.join(rime_io::peft::ADAPTER_WEIGHTS)).map(|m| m.len()).unwrap_or(0);
    let mut notes = soup_notes(&decisions);
    notes.extend(staging.notes.iter().cloned());
    let seconds = t0.elapsed().as_secs_f64();
    let report = MergeReport {
        method: "greedy_soup".into(),
        inputs: names.clone(),
        output: out.display().to_string(),
        adapter: dev.info().name.clone(),
        tensors: result.tensors.len(),
        copied: 0,
        bytes_read,
        bytes_written,
        seconds,
        gb_per_s: (bytes_read + bytes_written) as f64 / seconds.max(1e-9) / 1e9,
        side_files: vec![],
        notes,
    };
    let full = SoupReport {
        report: &report,
        eval_data: eval.display().to_string(),
        combination: combination.as_str(),
        soup: soup.iter().map(|&i| names[i].clone()).collect(),
        soup_accuracy: best,
        decisions,
    };
    write_report(&staging.tmp, &full)?;
    staging.commit()?;
    Ok(report)
}
