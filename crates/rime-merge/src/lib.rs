//! rime-merge combines checkpoints without training: model soups (`linear`), task arithmetic, TIES, DARE
//! (`dare_linear`, `dare_ties`), SLERP and passthrough, read from a mergekit-shaped YAML config (gradient lists,
//! `slices` with layer ranges, `tokenizer_source` and `chat_template` included: see `slices`, `tokenizer`), and
//! the folding of a peft LoRA adapter into its base. It streams: one tensor name at a time, in chunks of
//! `DEFAULT_CHUNK` elements, is converted from every mapped input straight into a stacked GPU buffer, run through the merge kernels of
//! `rime_kernels::ops::merge`, read back and written, and the input pages it came from are released; peak
//! memory stays near a few chunks per input, or (inputs + 1) x the largest tensor for TIES with density < 1
//! and SLERP, which need whole-tensor statistics (see `engine`). The output folder is built under a temporary
//! sibling name and renamed into place at the end: a failed merge leaves no output folder behind.
//!
//! mergekit's geometric merges (`model_stock`, `nuslerp`, `multislerp`, `karcher`) and `arcee_fusion` run on the
//! kernels of `rime_kernels::ops::merge_geo`, streaming each tensor twice (statistics, then the merge).

pub mod atlas;
mod combine;
pub mod config;
mod engine;
mod geometric;
mod lora;
mod output;
pub mod slices;
mod soup;
mod sparse;
pub mod tokenizer;

pub use combine::{combine_adapters, combine_lora, combine_stack, Combination, CombineOptions};
pub use config::{Layout, MergeConfig, Method, ModelEntry, OutDtype, Param};
pub use engine::{dare_mask, merge, merge_uniforms, merge_with_chunk, MergeOptions, MergeReport, DEFAULT_CHUNK};
pub use lora::fold_lora;
pub use output::{parse_size, DEFAULT_SHARD_SIZE};
pub use soup::{greedy_soup, SoupDecision};

/// A number as a message shows it: `1e39` rather than forty digits.
pub(crate) fn show(x: f64) -> String {
    if x != 0.0 && !(1e-4..1e6).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can stop a merge. Each message names the config file, model, tensor or path at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The merge config is malformed or asks for something rime does not do.
    #[error("{file}: {msg}")]
    Config { file: String, msg: String },
    /// The inputs disagree (tensor names, shapes) or a tensor cannot be merged as asked.
    #[error("tensor `{tensor}`: {msg}")]
    Tensor { tensor: String, msg: String },
    /// The output folder exists and `force` was not given, or cannot be created / renamed.
    #[error("{path}: {msg}")]
    Output { path: String, msg: String },
    /// The output folder exists (or appeared while merging) and [`MergeOptions::force`] was not set.
    #[error("{path}: {when}; not replaced unless forced (MergeOptions::force)")]
    OutputExists { path: String, when: &'static str },
    /// An invalid argument (e.g. a shard size that does not parse).
    #[error("{0}")]
    Invalid(String),
    /// A library argument out of range, named as the library spells it (`weights`, `density`, `shard_size`);
    /// a front end maps the name to its own (the CLI prints `--weights`).
    #[error("{argument}: {message}")]
    Argument { argument: &'static str, message: String },
    /// Reading a checkpoint, config or adapter failed.
    #[error(transparent)]
    Io(#[from] rime_io::Error),
    /// A kernel launch or the device failed.
    #[error("GPU: {0}")]
    Kernel(#[from] rime_kernels::Error),
}
