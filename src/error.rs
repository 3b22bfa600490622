//! One error type for the facade. Every message names the file, tensor or argument at fault; none names a
//! command-line flag (the `rime` CLI maps [`Error::Invalid`]'s `argument` to its own flags).

/// Everything the facade can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No GPU (or no adapter matching a name), a kernel launch that was refused, a device fault.
    #[error(transparent)]
    Gpu(#[from] rime_kernels::Error),
    /// Building or running a graph (shapes, missing parameters, non-finite loss).
    #[error(transparent)]
    Graph(#[from] rime_graph::Error),
    /// Reading a checkpoint, config, tokenizer, adapter or dataset.
    #[error(transparent)]
    Io(#[from] rime_io::Error),
    /// A model architecture refused its config or weights.
    #[error(transparent)]
    Model(#[from] rime_models::llama::Error),
    /// Fine-tuning: a method's or trainer's configuration, the data, the adapter.
    #[error(transparent)]
    Tuning(#[from] rime_peft::Error),
    /// Merging: the merge config, its inputs, the output folder.
    #[error(transparent)]
    Merge(#[from] rime_merge::Error),
    /// A model's output (an embedding, logits) holds NaN or ±Inf: its weights or adapter overflow. The output is
    /// refused rather than handed on (loaders refuse non-finite weights already, so this is an overflow).
    #[error("{output} holds non-finite values ({detail}): the model's weights or adapter produce NaN/Inf")]
    NonFiniteOutput { output: String, detail: String },
    /// An argument of a facade call that cannot be used; `argument` is its name in this API.
    #[error("{argument}: {message}")]
    Invalid { argument: &'static str, message: String },
}

impl Error {
    pub(crate) fn invalid(argument: &'static str, message: impl Into<String>) -> Error {
        Error::Invalid { argument, message: message.into() }
    }
}

/// The facade's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
