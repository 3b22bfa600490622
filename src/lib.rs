//! # rime
//!
//! Fine-tune and merge pretrained transformers on any GPU that wgpu reaches (Vulkan, Metal, DX12), or on none
//! through Mesa's CPU Vulkan driver (lavapipe). Every heavy operation is a hand-written WGSL kernel; the
//! backbone stays frozen and only small parts train (LoRA factors, singular values, adapters, prompts, heads).
//!
//! This crate is the library's front door; the crates below it (`rime-kernels`, `rime-graph`, `rime-io`,
//! `rime-models`, `rime-peft`, `rime-merge`) are its engine room and need not be known to use it:
//!
//! | you want to | use |
//! |---|---|
//! | pick a GPU, see its limits | [`Gpu`] |
//! | sentence embeddings (optionally through a peft adapter) | [`Encoder`] |
//! | image embeddings from a DINOv2 backbone | [`vision::ImageEncoder`] |
//! | generate text with a Llama-family GGUF model | [`Decoder`] |
//! | fine-tune (LoRA family, SVFit, IA3, adapters, prompt, prefix, probe) | [`finetune`] |
//! | merge checkpoints or adapters | [`merge`] |
//! | run single kernels (matmul, attention, merging) as an accelerator backend | [`kernels`] |
//!
//! ```
//! let gpu = rime::Gpu::new()?;
//! let mut encoder = rime::Encoder::load(&gpu, rime::models_dir().join("all-minilm-l6-v2"))?;
//! let v = encoder.embed(&["The food was great.", "Lovely meal!"])?;
//! assert_eq!(v[0].len(), 384);
//! # Ok::<(), rime::Error>(())
//! ```
//!
//! Every fallible call returns [`Error`], whose message names the file, tensor or argument at fault.

pub mod decoder;
pub mod encoder;
mod error;
pub mod finetune;
pub mod gpu;
pub mod kernels;
pub mod merge;
pub mod vision;

pub use decoder::Decoder;
pub use encoder::Encoder;
pub use error::{Error, Result};
pub use gpu::{Gpu, GpuInfo};

/// Where the real checkpoints are looked up: `$RIME_MODELS`, else `models/` of this repository (filled by
/// `scripts/fetch-models.sh`).
pub fn models_dir() -> std::path::PathBuf {
    rime_io::models_dir()
}
