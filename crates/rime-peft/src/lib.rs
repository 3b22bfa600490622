//! rime-peft: parameter-efficient tuning methods as rewrites of a model graph, and the trainer.

pub mod adapter;
pub mod causal;
pub mod classifier;
pub mod ia3;
pub mod lora;
pub mod metrics;
pub mod plot;
pub mod prompt;
pub mod svfit;
pub mod trainer;

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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
