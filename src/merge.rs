//! Merging without training: model soups, task arithmetic, TIES, DARE and SLERP over checkpoints (streamed
//! tensor by tensor through the GPU's merge kernels), greedy soups and aTLAS over adapters, and LoRA adapters
//! folded into their base or combined as peft's `add_weighted_adapter`.
//!
//! A merge is a [`MergeConfig`]: built in code with the functions here, or read from a mergekit-shaped YAML
//! file with [`MergeConfig::from_file`]. [`run`] writes the merged checkpoint as a folder.
//!
//! ```
//! use rime::{merge, Gpu};
//! let gpu = Gpu::new()?;
//! // A soup of MiniLM with itself is MiniLM again (a real soup lists fine-tuned variants of one base).
//! let minilm = rime::models_dir().join("all-minilm-l6-v2");
//! let out = std::env::temp_dir().join(format!("rime-doc-soup-{}", std::process::id()));
//! let cfg = merge::uniform_soup(&[&minilm, &minilm]);
//! let report = merge::run(&gpu, &cfg, &out, &merge::MergeOptions::default())?;
//! assert_eq!(report.tensors, 104); // every tensor of the checkpoint
//! # std::fs::remove_dir_all(&out).ok();
//! # Ok::<(), rime::Error>(())
//! ```

use std::path::{Path, PathBuf};

pub use rime_merge::{
    parse_size, Combination, CombineOptions, MergeConfig, MergeOptions, MergeReport, Method, ModelEntry, OutDtype,
    Param,
};

use crate::{Gpu, Result};

fn entry(path: impl AsRef<Path>, weight: Option<f64>, density: Option<f64>) -> ModelEntry {
    let path = path.as_ref();
    ModelEntry {
        name: path.display().to_string(),
        path: path.to_path_buf(),
        weight: weight.map(Param::Num),
        density: density.map(Param::Num),
        scale: None,
        gamma: None,
        epsilon: None,
    }
}

fn config(method: Method, base: Option<ModelEntry>, models: Vec<ModelEntry>) -> MergeConfig {
    MergeConfig {
        source: PathBuf::from("<merge config built in code>"),
        method,
        base,
        models,
        normalize: matches!(method, Method::Linear | Method::Ties),
        lambda: Param::Num(1.0),
        t: None,
        seed: 0,
        dtype: None,
        compute_dtype: None,
        rescale: method.default_rescale(),
        select_topk: 1.0,
        notes: Vec::new(),
        strings: Default::default(),
        numbers: Default::default(),
        layout: Default::default(),
    }
}

/// The uniform model soup: the element-wise mean of the checkpoints (mergekit `linear`, equal weights).
pub fn uniform_soup<P: AsRef<Path>>(models: &[P]) -> MergeConfig {
    config(Method::Linear, None, models.iter().map(|m| entry(m, Some(1.0), None)).collect())
}

/// A weighted average of checkpoints, `Σ wᵢ θᵢ / Σ wᵢ` (mergekit `linear`, `normalize: true`).
pub fn linear<P: AsRef<Path>>(models: &[(P, f64)]) -> MergeConfig {
    config(Method::Linear, None, models.iter().map(|(m, w)| entry(m, Some(*w), None)).collect())
}

/// Task arithmetic: `θ_base + λ Σ wᵢ (θᵢ − θ_base)`.
pub fn task_arithmetic<P: AsRef<Path>>(base: impl AsRef<Path>, models: &[(P, f64)], lambda: f64) -> MergeConfig {
    let mut c = config(
        Method::TaskArithmetic,
        Some(entry(base, None, None)),
        models.iter().map(|(m, w)| entry(m, Some(*w), None)).collect(),
    );
    c.lambda = Param::Num(lambda);
    c
}

/// TIES: each task vector trimmed to its `density` largest magnitudes, signs elected, agreeing values averaged.
pub fn ties<P: AsRef<Path>>(base: impl AsRef<Path>, models: &[(P, f64)], density: f64, lambda: f64) -> MergeConfig {
    let mut c = config(
        Method::Ties,
        Some(entry(base, None, None)),
        models.iter().map(|(m, w)| entry(m, Some(*w), Some(density))).collect(),
    );
    c.lambda = Param::Num(lambda);
    c
}

/// DARE: each task vector keeps a random `density` of its elements, rescaled to its L1 norm before the drop (as
/// mergekit 0.1.5 rescales, about 1/density); with `ties`, then
/// TIES' sign election (mergekit `dare_ties`), else a weighted sum (`dare_linear`). The drop masks follow `seed`.
pub fn dare<P: AsRef<Path>>(
    base: impl AsRef<Path>,
    models: &[(P, f64)],
    density: f64,
    ties: bool,
    seed: u64,
) -> MergeConfig {
    let method = if ties { Method::DareTies } else { Method::DareLinear };
    let mut c = config(
        method,
        Some(entry(base, None, None)),
        models.iter().map(|(m, w)| entry(m, Some(*w), Some(density))).collect(),
    );
    c.seed = seed;
    c
}

/// Spherical interpolation from `base` (t = 0) to `other` (t = 1), tensor by tensor.
pub fn slerp(base: impl AsRef<Path>, other: impl AsRef<Path>, t: f64) -> MergeConfig {
    let mut c = config(Method::Slerp, Some(entry(&base, None, None)), vec![entry(other, None, None)]);
    c.t = Some(Param::Num(t));
    c
}

/// Runs a merge into the folder `out` (built under a temporary name and renamed at the end; an existing
/// folder is replaced only with [`MergeOptions::force`]).
pub fn run(gpu: &Gpu, cfg: &MergeConfig, out: &Path, opts: &MergeOptions) -> Result<MergeReport> {
    cfg.check_inputs()?;
    Ok(rime_merge::merge(gpu.device(), cfg, out, opts)?)
}

/// Folds a peft LoRA (or DoRA) adapter into its base checkpoint, `W + s·B·A`, and writes a full checkpoint.
pub fn fold_lora(
    adapter: &Path,
    base: &Path,
    out: &Path,
    dtype: Option<OutDtype>,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    Ok(rime_merge::fold_lora(adapter, base, out, dtype, opts)?)
}

/// Combines LoRA adapters into one adapter folder as peft's `add_weighted_adapter` does (`cat` of equal
/// weights 1/n is the uniform soup of the adapters; `svd`, `ties`, `dare_*`, `magnitude_prune` as in peft).
pub fn combine_lora(
    gpu: &Gpu,
    adapters: &[PathBuf],
    weights: &[f64],
    opts: &CombineOptions,
    out: &Path,
    force: bool,
) -> Result<MergeReport> {
    Ok(rime_merge::combine_lora(gpu.device(), adapters, weights, opts, out, force)?)
}
