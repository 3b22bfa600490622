//! Llama decoder (SmolLM2, Llama 2/3 and friends): RMSNorm, rotary positions in the Hugging Face
//! "rotate_half" convention, SwiGLU feed-forward, grouped-query causal attention, optionally tied embeddings.
//! Parameter names are those of Hugging Face `LlamaForCausalLM` (`model.embed_tokens.weight`,
//! `model.layers.N.self_attn.q_proj.weight`, ..., `lm_head.weight`). [`build`] makes the training/eval graph
//! (forward and backward through the [`LinearHook`]); [`crate::generate`] runs the same model for generation
//! with a KV cache; both are [`define`], written once against [`LlamaOps`]. [`load_gguf`] reads a GGUF file
//! into a [`ParamStore`], with a peft LoRA adapter's factors beside the weights if given.

use std::path::{Path, PathBuf};

use rime_graph::{Graph, ParamStore, Var};
use rime_io::{GgufFile, ModelConfig, PeftAdapter, Tokenizer};
use rime_kernels::{DType, Device, QTensor, QType};

use crate::LinearHook;

/// Errors of loading and running a Llama model; each names the file, tensor or parameter at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] rime_io::Error),
    #[error(transparent)]
    Graph(#[from] rime_graph::Error),
    #[error(transparent)]
    Kernel(#[from] rime_kernels::Error),
    #[error("{file}: {msg}")]
    Model { file: String, msg: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub eps: f32,
    pub rope_theta: f32,
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads.max(1)
    }

    /// From a checkpoint's config (GGUF metadata or `config.json`); checks the head split.
    pub fn from_model_config(c: &ModelConfig) -> Result<LlamaConfig> {
        if c.architecture != rime_io::Architecture::Llama {
            return Err(Error::Invalid(format!("architecture {} is not llama", c.architecture.as_str())));
        }
        if c.hidden_act != "silu" {
            return Err(Error::Invalid(format!("hidden_act `{}`: the Llama builder implements silu", c.hidden_act)));
        }
        let cfg = LlamaConfig {
            hidden: c.hidden_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            intermediate: c.intermediate_size,
            vocab: c.vocab_size,
            max_positions: c.max_position_embeddings,
            eps: c.rms_norm_eps as f32,
            rope_theta: c.rope_theta as f32,
            tie_word_embeddings: c.tie_word_embeddings,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.heads == 0
            || self.kv_heads == 0
            || !self.hidden.is_multiple_of(self.heads)
            || !self.heads.is_multiple_of(self.kv_heads)
        {
            return Err(Error::Invalid(format!(
                "hidden {} / heads {} / kv heads {}: heads must divide hidden and kv heads must divide heads",
                self.hidden, self.heads, self.kv_heads
            )));
        }
        Ok(())
    }
}

/// The per-step input of a decoder graph: token ids [B, T] (U32). Positions are 0..T in every row.
pub const INPUT_IDS: &str = "input_ids";

/// One projection of a Llama layer (or the output head): its Hugging Face module name follows from it, and
/// the KV-cache decoder picks its output buffer by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    Head,
}

impl Proj {
    /// The module path under `model.layers.N.` (`lm_head` for the head).
    pub fn module(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
            Proj::Head => "lm_head",
        }
    }
}

/// The sub-block a residual add closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    Attention,
    Ffn,
}

impl Block {
    /// The name [`LinearHook::block_output`] receives.
    pub fn as_str(self) -> &'static str {
        match self {
            Block::Attention => "attention",
            Block::Ffn => "ffn",
        }
    }
}

/// The operations a Llama forward pass is made of. [`define`] writes the model once against them; the graph
/// builder (training and evaluation, [`build`]) and the KV-cache decoder ([`crate::generate::Decoder`])
/// implement them, so layer order, parameter names, norms, GQA and the tied head live in one place.
pub trait LlamaOps {
    /// A value of the forward pass (a graph variable, or a decoder buffer).
    type V: Copy;
    type E;
    /// Token embeddings [tokens, C] from the table `weight`.
    fn embed(&mut self, weight: &str) -> Result<Self::V, Self::E>;
    /// RMSNorm with the gain `weight` (the config's eps).
    fn rmsnorm(&mut self, x: Self::V, weight: &str) -> Result<Self::V, Self::E>;
    /// x·Wᵀ for module `module` with weight `weight` (plus whatever adapter the implementation applies).
    fn linear(&mut self, x: Self::V, module: &str, weight: &str, proj: Proj) -> Result<Self::V, Self::E>;
    /// Rotary positions on q [.., NH·HS] and k [.., NKV·HS], then causal grouped-query attention of layer
    /// `layer` (over the whole sequence, or over the KV cache the implementation keeps): [.., NH·HS].
    fn attention(&mut self, layer: usize, q: Self::V, k: Self::V, v: Self::V) -> Result<Self::V, Self::E>;
    /// silu(gate) · up, the FFN activation of layer `layer`.
    fn silu_mul(&mut self, layer: usize, gate: Self::V, up: Self::V) -> Result<Self::V, Self::E>;
    /// x + y, closing sub-block `block` of layer `layer` whose (normed) input was `block_in`.
    fn residual(
        &mut self,
        layer: usize,
        block: Block,
        x: Self::V,
        block_in: Self::V,
        y: Self::V,
    ) -> Result<Self::V, Self::E>;
    /// The final RMSNorm (the decoder applies it to the last position only).
    fn final_norm(&mut self, x: Self::V, weight: &str) -> Result<Self::V, Self::E>;
    /// Layer `layer` starts (the training graph opens a gradient-checkpoint segment here when asked).
    fn layer_start(&mut self, _layer: usize) {}
    /// Layer `layer` is complete.
    fn layer_end(&mut self, _layer: usize) {}
}

/// The Llama model, once: embeddings, `cfg.layers` pre-norm blocks (attention, SwiGLU FFN) and the final
/// norm, returning the normed hidden states; with `head`, the logits through `head` (`lm_head.weight` or the
/// tied embedding matrix).
pub fn define<O: LlamaOps>(ops: &mut O, cfg: &LlamaConfig, head: Option<&str>) -> Result<O::V, O::E> {
    let mut x = ops.embed("model.embed_tokens.weight")?;
    for l in 0..cfg.layers {
        ops.layer_start(l);
        let base = format!("model.layers.{l}.");
        let module = |p: Proj| format!("{base}{}", p.module());
        let lin = |ops: &mut O, x: O::V, p: Proj| ops.linear(x, &module(p), &format!("{}.weight", module(p)), p);
        let h = ops.rmsnorm(x, &format!("{base}input_layernorm.weight"))?;
        let q = lin(ops, h, Proj::Q)?;
        let k = lin(ops, h, Proj::K)?;
        let v = lin(ops, h, Proj::V)?;
        let a = ops.attention(l, q, k, v)?;
        let o = lin(ops, a, Proj::O)?;
        x = ops.residual(l, Block::Attention, x, h, o)?;
        let h2 = ops.rmsnorm(x, &format!("{base}post_attention_layernorm.weight"))?;
        let gate = lin(ops, h2, Proj::Gate)?;
        let up = lin(ops, h2, Proj::Up)?;
        let m = ops.silu_mul(l, gate, up)?;
        let d = lin(ops, m, Proj::Down)?;
        x = ops.residual(l, Block::Ffn, x, h2, d)?;
        ops.layer_end(l);
    }
    let h = ops.final_norm(x, "model.norm.weight")?;
    match head {
        Some(w) => ops.linear(h, Proj::Head.module(), w, Proj::Head),
        None => Ok(h),
    }
}

/// [`LlamaOps`] on the graph: the training and evaluation forward, `b` sequences of `t` tokens.
struct GraphOps<'a> {
    g: &'a mut Graph,
    store: &'a ParamStore,
    cfg: &'a LlamaConfig,
    hook: &'a dyn LinearHook,
    b: usize,
    t: usize,
    /// Each layer a gradient-checkpoint segment ([`Graph::checkpoint`]).
    checkpoint: bool,
}

impl LlamaOps for GraphOps<'_> {
    type V = Var;
    type E = rime_graph::Error;

    fn embed(&mut self, weight: &str) -> rime_graph::Result<Var> {
        let ids = self.g.input(INPUT_IDS, &[self.b, self.t], DType::U32);
        let emb = self.g.param(self.store, weight)?;
        self.g.embedding(ids, emb) // [B, T, C]
    }

    fn rmsnorm(&mut self, x: Var, weight: &str) -> rime_graph::Result<Var> {
        let w = self.g.param(self.store, weight)?;
        self.g.rmsnorm(x, w, self.cfg.eps)
    }

    fn linear(&mut self, x: Var, module: &str, weight: &str, _: Proj) -> rime_graph::Result<Var> {
        let w = self.g.param(self.store, weight)?;
        let (store, an) = (self.store, crate::lora::factor_name(module, "A"));
        if store.find(&an).is_none() {
            return self.hook.linear(self.g, store, module, x, w, None);
        }
        // An adapter loaded for decoding (load_gguf with an adapter): the same W·x + sB·(A·x) (⊙ g).
        let a = self.g.param(store, &an)?;
        let sb = self.g.param(store, &crate::lora::factor_name(module, "sB"))?;
        let y = self.g.lora(x, w, None, a, sb, 1.0)?;
        match store.find(&crate::lora::factor_name(module, "g")) {
            Some(_) => {
                let gain = self.g.param(store, &crate::lora::factor_name(module, "g"))?;
                self.g.mul(y, gain)
            }
            None => Ok(y),
        }
    }

    fn attention(&mut self, _: usize, q: Var, k: Var, v: Var) -> rime_graph::Result<Var> {
        let (g, c) = (&mut *self.g, self.cfg);
        let (b, t, hs) = (self.b, self.t, c.head_dim());
        let q4 = g.reshape(q, &[b, t, c.heads, hs])?;
        let k4 = g.reshape(k, &[b, t, c.kv_heads, hs])?;
        let v4 = g.reshape(v, &[b, t, c.kv_heads, hs])?;
        let q4 = g.rope(q4, 0, c.rope_theta)?;
        let k4 = g.rope(k4, 0, c.rope_theta)?;
        let a = g.attention(q4, k4, v4, None, true, 1.0 / (hs as f32).sqrt())?;
        g.reshape(a, &[b, t, c.hidden])
    }

    fn silu_mul(&mut self, layer: usize, gate: Var, up: Var) -> rime_graph::Result<Var> {
        let gate = self.g.silu(gate);
        let m = self.g.mul(gate, up)?;
        self.hook.ffn_activation(self.g, self.store, layer, m)
    }

    fn residual(&mut self, layer: usize, block: Block, x: Var, block_in: Var, y: Var) -> rime_graph::Result<Var> {
        let y = self.hook.block_output(self.g, self.store, layer, block.as_str(), block_in, y)?;
        self.g.add(x, y)
    }

    fn final_norm(&mut self, x: Var, weight: &str) -> rime_graph::Result<Var> {
        self.rmsnorm(x, weight)
    }

    fn layer_start(&mut self, _layer: usize) {
        if self.checkpoint {
            self.g.checkpoint();
        }
    }

    fn layer_end(&mut self, _layer: usize) {
        if self.checkpoint {
            self.g.end_checkpoint();
        }
    }
}

fn check_graph(cfg: &LlamaConfig, t: usize) -> rime_graph::Result<()> {
    if t > cfg.max_positions {
        return Err(rime_graph::Error::Invalid(format!(
            "sequence length {t} exceeds max_position_embeddings {}",
            cfg.max_positions
        )));
    }
    cfg.validate().map_err(|e| rime_graph::Error::Invalid(e.to_string()))
}

/// The decoder up to the final RMSNorm: hidden states [B, T, C] for `b` sequences of `t` tokens (causal; a
/// right-padded batch is fine since no real token attends to a later pad).
pub fn build_hidden(
    g: &mut Graph,
    store: &ParamStore,
    cfg: &LlamaConfig,
    b: usize,
    t: usize,
    hook: &dyn LinearHook,
) -> rime_graph::Result<Var> {
    check_graph(cfg, t)?;
    define(&mut GraphOps { g, store, cfg, hook, b, t, checkpoint: false }, cfg, None)
}

/// The name of the output projection: `lm_head.weight`, or the embedding matrix when tied.
pub fn lm_head_name(store: &ParamStore, cfg: &LlamaConfig) -> &'static str {
    if cfg.tie_word_embeddings || store.find("lm_head.weight").is_none() {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    }
}

/// The decoder with its language-model head: logits [B, T, V].
pub fn build(
    g: &mut Graph,
    store: &ParamStore,
    cfg: &LlamaConfig,
    b: usize,
    t: usize,
    hook: &dyn LinearHook,
) -> rime_graph::Result<Var> {
    build_with(g, store, cfg, b, t, hook, false)
}

/// [`build`], with each decoder layer a gradient-checkpoint segment when `checkpoint` ([`Graph::checkpoint`]:
/// a training executor keeps the layer boundaries and recomputes each layer's activations for its backward).
pub fn build_with(
    g: &mut Graph,
    store: &ParamStore,
    cfg: &LlamaConfig,
    b: usize,
    t: usize,
    hook: &dyn LinearHook,
    checkpoint: bool,
) -> rime_graph::Result<Var> {
    check_graph(cfg, t)?;
    let ops = &mut GraphOps { g, store, cfg, hook, b, t, checkpoint };
    let logits = define(ops, cfg, Some(lm_head_name(store, cfg)))?;
    Ok(g.name(logits, "logits"))
}

/// A Llama model on the device, with what generation needs from its file.
pub struct LlamaModel {
    pub cfg: LlamaConfig,
    pub store: ParamStore,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<u32>,
    pub eos_tokens: Vec<u32>,
    /// Modules the adapter adapts (applied on the GPU by the decoder, not folded; the name is historical).
    pub folded: Vec<String>,
    pub source: PathBuf,
}

pub use crate::lora::fold_lora;

/// How a GGUF's frozen weights are held on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GgufWeights {
    /// Every tensor dequantized to f32 (exact against a dequantize-then-multiply reference).
    #[default]
    F32,
    /// Matrices dequantized and rounded to f16 (half the memory of f32); norms f32.
    F16,
    /// Matrices kept in the file's block types where the kernels read them (Q8_0, Q4_0, Q4_1, Q5_0, Q4_K,
    /// Q6_K: [`DType::Q`]), dequantized inside the matmul and embedding kernels; other types (F16, BF16, F32
    /// matrices, norms) dequantized to f32.
    Quantized,
}

impl GgufWeights {
    /// `f32`, `f16` or `q`.
    pub fn parse(s: &str) -> Option<GgufWeights> {
        match s {
            "f32" => Some(GgufWeights::F32),
            "f16" => Some(GgufWeights::F16),
            "q" | "quantized" => Some(GgufWeights::Quantized),
            _ => None,
        }
    }
}

/// Reads a Llama GGUF file: weights dequantized and uploaded (matrices as `weight_dtype`, F32 or F16; norms
/// always F32), frozen, under Hugging Face names; tokenizer, chat template and special tokens from the metadata.
/// `adapter`: a peft LoRA folder whose factors are uploaded beside the weights (see [`crate::lora`]); the
/// weights themselves stay the base model's, and both the decoder and [`build`] apply the adapter on the GPU.
pub fn load_gguf(dev: &Device, path: &Path, adapter: Option<&Path>, weight_dtype: DType) -> Result<LlamaModel> {
    let weights = if weight_dtype == DType::F16 { GgufWeights::F16 } else { GgufWeights::F32 };
    load_gguf_with(dev, path, adapter, weights)
}

/// [`load_gguf`] with the weights held as `weights` says. With [`GgufWeights::Quantized`] the matrices keep
/// their GGUF bytes on the device (q/k rows reordered whole to Hugging Face's order); the dequantization
/// scratch the large products share is reserved for the largest of them ([`Device::reserve_dequant_scratch`]).
pub fn load_gguf_with(dev: &Device, path: &Path, adapter: Option<&Path>, weights: GgufWeights) -> Result<LlamaModel> {
    let file = GgufFile::open(path)?;
    let mc = file.model_config()?;
    let cfg = LlamaConfig::from_model_config(&mc)
        .map_err(|e| Error::Model { file: path.display().to_string(), msg: e.to_string() })?;
    let mut store = ParamStore::new();
    // The adapter's checks (and DoRA's magnitudes) read the f32 weights; a quantized load without an adapter
    // never dequantizes the matrices.
    let tensors = if weights != GgufWeights::Quantized || adapter.is_some() { file.load_hf(&mc)? } else { vec![] };
    let (factors, folded) = match adapter {
        Some(dir) => crate::lora::decode_tensors(&tensors, &PeftAdapter::load(dir)?, dir)?,
        None => (Vec::new(), Vec::new()),
    };
    if weights == GgufWeights::Quantized {
        drop(tensors);
        let mut largest = 0;
        for t in file.load_hf_raw(&mc)? {
            let qtype = QType::ALL.into_iter().find(|q| q.name() == t.ggml_type.to_string());
            let tensor = match (qtype, &t.shape[..]) {
                (Some(q), &[rows, cols]) => {
                    if rows * cols <= rime_kernels::ops::qmatmul::SCRATCH_MAX_VALUES {
                        largest = largest.max(rows * cols);
                    }
                    QTensor::upload_named(dev, &t.name, q, rows, cols, &t.bytes)?.to_tensor()
                }
                _ => {
                    let data = rime_io::gguf::dequantize(t.ggml_type, &t.bytes, t.shape.iter().product()).ok_or_else(
                        || Error::Model {
                            file: path.display().to_string(),
                            msg: format!("tensor `{}` has GGUF type {}, which rime cannot read", t.name, t.ggml_type),
                        },
                    )?;
                    dev.upload_bytes(&t.name, bytemuck::cast_slice(&data), &t.shape, DType::F32)?
                }
            };
            store.add(&t.name, tensor, false)?;
        }
        // One scratch for every large product (the output head and any weight above SCRATCH_MAX_VALUES are
        // read from their blocks).
        let fits = DType::F32.storage_bytes(largest) <= dev.max_binding();
        if largest > 0 && fits {
            dev.reserve_dequant_scratch(largest)?;
        }
    } else {
        for (name, shape, data) in tensors {
            let t = if weights == GgufWeights::F16 && shape.len() == 2 {
                let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                dev.upload_bytes(&name, bytemuck::cast_slice(&h), &shape, DType::F16)?
            } else {
                dev.upload_bytes(&name, bytemuck::cast_slice(&data), &shape, DType::F32)?
            };
            store.add(&name, t, false)?;
        }
    }
    // the adapter's factors stay f32: the LoRA products read them as such
    for (name, shape, data) in factors {
        let t = dev.upload_bytes(&name, bytemuck::cast_slice(&data), &shape, DType::F32)?;
        store.add(&name, t, false)?;
    }
    let mut tokenizer = file.tokenizer()?;
    tokenizer.set_vocab_limit(cfg.vocab, "model.embed_tokens.weight")?;
    Ok(LlamaModel {
        cfg,
        store,
        tokenizer,
        chat_template: file.chat_template().map(str::to_string),
        bos_token: mc.bos_token_id,
        eos_tokens: mc.eos_token_id.clone(),
        folded,
        source: path.to_path_buf(),
    })
}
