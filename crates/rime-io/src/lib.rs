//! rime-io reads and writes everything rime touches on disk, on the CPU only: safetensors checkpoints
//! (memory-mapped, sharded), GGUF files (dequantized to f32), Hugging Face `config.json`, tokenizers,
//! datasets (JSONL / CSV / TSV) and PEFT adapter folders. Bad input always ends in an [`Error`] that names the
//! file and the tensor, field or line at fault, never in a panic or a half-written file.

pub mod config;
pub mod dataset;
pub mod error;
pub mod gguf;
mod gguf_tokenizer;
pub mod image;
pub mod lora_math;
pub mod models;
pub mod onnx;
pub mod peft;
mod peft_check;
pub mod safetensors;
pub mod tokenizer;

pub use config::{Architecture, Gemma3Params, ModelConfig};
pub use dataset::{split_indices, Columns, Dataset, DatasetFormat, Example, LabelMap};
pub use error::{check_finite, Error, Result};
pub use gguf::{GgmlType, GgufFile, GgufTensorInfo, GgufValue, NamedTensor, RawNamedTensor};
pub use image::{image_folder, image_list, read_idx, read_idx_images, Fit, Idx, ImageFolder, Preprocess, RgbImage};
pub use lora_math::{add_scaled_product, dora_rescale_rows, dora_row_scale, pattern_lookup, LoraDims};
pub use models::{locate_model, models_dir};
pub use onnx::{OnnxFile, OnnxInitializer, OnnxNode};
pub use peft::{AdapterConfig, AdapterTensor, LoraPair, PeftAdapter};
pub use peft_check::{MAX_ALPHA, MAX_RANK};
pub use safetensors::{
    write_atomically, write_safetensors, write_safetensors_as, write_safetensors_raw, Checkpoint, Dtype, RawTensor,
    RawTensorOwned, StoreDtype, TensorInfo,
};
pub use tokenizer::{BatchEncoding, Padding, Tokenizer};
