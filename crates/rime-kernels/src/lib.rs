//! rime-kernels: the wgpu device, GPU tensors, the pipeline cache and the WGSL kernel library.
//!
//! Every kernel lives in `shaders/<family>.wgsl` with forward and backward entry points side by side.
//! Each entry point has a Rust launcher in `ops::<family>` (same name) that checks shapes and returns
//! [`Dispatch`]es, and a plain-Rust CPU version of the same name in [`reference`](mod@reference), the test
//! oracle. Launchers never submit: they return dispatches that a caller records into one pass
//! ([`Device::run`] for one-off use, the graph executor for a whole training step). The unrolled WGSL
//! (attention's subgroup kernels, the register tiles of matmul.wgsl and gemv.wgsl) is written by Rust
//! generators in `src/gen`.

mod device;
mod error;
mod gen;
mod guard;
pub mod ops;
mod pipeline;
mod qtensor;
pub mod reference;
pub mod shaders;
mod tensor;

pub use device::{AdapterReport, Device, DeviceOptions};
pub use error::{Error, Result};
pub use pipeline::{Dispatch, Spec};
pub use qtensor::{QTensor, QType};
pub use tensor::{DType, Tensor, TextureTwin};
pub use wgpu;
