//! The one error type of the kernel layer: every variant names the adapter, tensor, shader or op at fault.

/// Errors of device selection, tensor handling and kernel launches.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no GPU adapter found (wgpu saw none on Vulkan, Metal, DX12 or GL). On Linux without a GPU install the \
         CPU Vulkan driver: `apt-get install -y mesa-vulkan-drivers libvulkan1`"
    )]
    NoAdapter,
    /// `source_name` says where the name came from: the requested GPU name (`DeviceOptions::adapter`) or the
    /// RIME_ADAPTER environment variable.
    #[error("no GPU adapter's name contains '{wanted}' ({source_name}); adapters seen: {seen}")]
    AdapterNotFound { wanted: String, source_name: String, seen: String },
    #[error("requesting a device from adapter '{adapter}' failed: {msg}")]
    RequestDevice { adapter: String, msg: String },
    #[error(
        "tensor '{name}' needs {bytes} bytes, more than this adapter's max storage binding of {limit} bytes; \
         split it (e.g. by rows) before uploading"
    )]
    TooLarge { name: String, bytes: u64, limit: u64 },
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("{op}: tensor dtype is {got:?}, expected {expected}")]
    DType { op: &'static str, got: crate::DType, expected: &'static str },
    #[error("shader {file} entry {entry}: {msg}")]
    Shader { file: String, entry: String, msg: String },
    #[error("GPU error during {what}: {msg}")]
    Gpu { what: String, msg: String },
    #[error("unknown shader file '{0}'")]
    UnknownShader(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorthand for shape errors inside launchers.
pub(crate) fn shape_err(op: &'static str, msg: impl Into<String>) -> Error {
    Error::Shape { op, msg: msg.into() }
}
