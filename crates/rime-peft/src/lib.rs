//! rime-peft: parameter-efficient tuning methods as rewrites of a model graph, and one trainer over tasks
//! (classification, causal LM): [`train`] drives a [`Task`] with a [`TrainConfig`].
//!
//! Each method is one file under [`methods`] implementing [`methods::TuningMethod`] (its parameters, its graph
//! rewrite for training and evaluation, its adapter folder in peft's layout); [`methods::REGISTRY`] finds a
//! saved adapter's method by its `peft_type`. [`classifier`] trains them beside a classification head.

pub mod causal;
mod checkpoint;
pub mod classifier;
pub mod classify;
pub mod config;
pub mod data;
pub mod embedding;
mod fault;
pub mod image;
pub mod lst;
pub mod lst_embed;
pub mod methods;
pub mod metrics;
pub mod plot;
pub mod svd;
pub mod trainer;

// The method modules under their former paths (`rime_peft::lora::LoraConfig`, ...).
pub use methods::bottleneck as adapter;
pub use methods::{ia3, lora, prompt, svfit};

/// Errors of the tuning layer; wraps the lower crates' errors, which name their files and tensors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Graph(#[from] rime_graph::Error),
    #[error(transparent)]
    Io(#[from] rime_io::Error),
    #[error(transparent)]
    Kernel(#[from] rime_kernels::Error),
    #[error("{0}")]
    Msg(String),
    /// A configuration value the library refuses. `field` is the field's name in the library's own config
    /// types (`rank`, `lora_dropout`, `batch_size`, `num_virtual_tokens`, `eval`, ...), never a CLI flag: a
    /// front end maps it to its own spelling (the CLI prints `--rank`). The message reads after the field:
    /// `rank 0: must be at least 1` is `{ field: "rank", message: "0: must be at least 1" }`.
    #[error("{field} {message}")]
    Invalid { field: &'static str, message: String },
    /// The output folder holds files (a previous run's, or the user's) and the run was asked neither to
    /// resume it ([`TrainConfig::resume`]) nor to overwrite it ([`TrainConfig::overwrite`]).
    #[error(
        "{}: the output folder exists and is not empty; not replaced (set overwrite to replace it, or resume to \
         continue its run)",
        path.display()
    )]
    OutputExists { path: std::path::PathBuf },
}

impl Error {
    /// [`Error::Invalid`] for `field`.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Error {
        Error::Invalid { field, message: message.into() }
    }
}

pub use causal::{CausalSummary, CausalTask};
pub use classify::{ClassifySummary, ClassifyTask, Evaluator, Predictions};
pub use config::{HeadKind, Schedule, TrainConfig, WeightStorage};
pub use data::{CausalData, TextClassData};
pub use embedding::{EmbedSummary, EmbedTask, MatryoshkaConfig, PairColumns, PairData, RetrievalMetrics};
pub use image::{Augment, ImageClassData, ImageClassifyTask, ImageGradientProbe, Pooling};
pub use trainer::{train, Event, Metric, Task, TrainResult};

pub type Result<T, E = Error> = std::result::Result<T, E>;
