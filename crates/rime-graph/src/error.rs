//! Errors of graph building and execution; each names the op, tensor or parameter at fault.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kernel(#[from] rime_kernels::Error),
    #[error("graph op {op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("parameter '{0}' not found in the store")]
    UnknownParam(String),
    #[error("input '{name}': {msg}")]
    Input { name: String, msg: String },
    #[error("{0}")]
    Invalid(String),
    #[error("optimizer state file {path}: {msg}")]
    State { path: String, msg: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
