//! The one error type of rime-io. Every variant names the file it came from and the tensor, field, column or
//! line at fault, so that a message read alone (in a CLI, in a CI log) says where to look.

use std::path::Path;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while reading or writing checkpoints, configs, tokenizers, datasets and adapters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused to read, write, map or rename a file.
    #[error("{file}: {action}: {source}")]
    Io {
        file: String,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a well-formed safetensors / GGUF / JSON file (truncated, bad header, bad offsets...).
    #[error("{file}: {msg}")]
    Format { file: String, msg: String },
    /// One tensor of a checkpoint is malformed or cannot be read as asked.
    #[error("{file}: tensor `{tensor}`: {msg}")]
    Tensor { file: String, tensor: String, msg: String },
    /// A tensor was asked for that the checkpoint does not hold.
    #[error("{file}: no tensor named `{tensor}` ({count} tensors there, e.g. {examples})")]
    MissingTensor { file: String, tensor: String, count: usize, examples: String },
    /// A checkpoint tensor's shape disagrees with what config.json implies.
    #[error("{file}: tensor `{tensor}` has shape {actual:?}, but the config implies {expected:?} ({why})")]
    ShapeMismatch { file: String, tensor: String, actual: Vec<usize>, expected: Vec<usize>, why: String },
    /// A config field (config.json, adapter_config.json, GGUF metadata key) is missing or invalid.
    #[error("{file}: field `{field}`: {msg}")]
    Config { file: String, field: String, msg: String },
    /// A GGUF tensor uses a quantization type that rime cannot dequantize.
    #[error("{file}: tensor `{tensor}` has GGUF type {ggml_type}, which rime cannot read (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K)")]
    UnsupportedGgufType { file: String, tensor: String, ggml_type: String },
    /// A dataset row is malformed; `line` is 1-based in the file.
    #[error("{file}: line {line}: {msg}")]
    DatasetLine { file: String, line: u64, msg: String },
    /// A dataset as a whole is unusable (empty, one class only...).
    #[error("{file}: {msg}")]
    Dataset { file: String, msg: String },
    /// The tokenizer could not be loaded or could not encode an input.
    #[error("{file}: tokenizer: {msg}")]
    Tokenizer { file: String, msg: String },
    /// A model looked up by name is not in the models folder.
    #[error("model `{name}` not found (looked in {searched}); run scripts/fetch-models.sh")]
    ModelNotFound { name: String, searched: String },
    /// A tensor holds NaN or ±Inf. rime's policy: non-finite values are never silently turned into numbers;
    /// loaders and merges refuse them, naming the tensor (see [`check_finite`]).
    #[error("{file}: tensor `{tensor}` holds {count} non-finite value(s) (first: {first} at flat index {index}); rime refuses NaN/Inf weights")]
    NonFinite { file: String, tensor: String, count: usize, first: f32, index: usize },
    /// The caller passed inconsistent arguments (e.g. a shape that does not match the data length).
    #[error("{file}: {msg}")]
    InvalidArgument { file: String, msg: String },
}

pub(crate) fn display(path: &Path) -> String {
    path.display().to_string()
}

pub(crate) fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io { file: display(path), action, source }
}

pub(crate) fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format { file: display(path), msg: msg.into() }
}

/// Refuses a tensor that holds NaN or ±Inf, naming `file` and `tensor`, the count and the first offender.
/// This is the one check every loader, adapter reader and merge output goes through (the NaN policy: non-finite
/// values propagate through the kernels, and are reported by name where tensors enter or leave rime).
pub fn check_finite(file: &str, tensor: &str, data: &[f32]) -> Result<()> {
    let Some(index) = data.iter().position(|x| !x.is_finite()) else { return Ok(()) };
    let count = data[index..].iter().filter(|x| !x.is_finite()).count();
    Err(Error::NonFinite { file: file.to_string(), tensor: tensor.to_string(), count, first: data[index], index })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_finite_names_the_tensor_and_counts() {
        assert!(check_finite("a.safetensors", "w", &[0.0, 1.0, -3.5]).is_ok());
        let e = check_finite("a.safetensors", "w", &[0.0, f32::NAN, 1.0, f32::INFINITY]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("a.safetensors") && msg.contains("`w`") && msg.contains("2 non-finite"), "{msg}");
        assert!(msg.contains("flat index 1"), "{msg}");
    }
}
