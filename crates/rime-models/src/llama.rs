//! Llama decoder (SmolLM2, Llama 2/3 and friends): RMSNorm, rotary positions in the Hugging Face
//! "rotate_half" convention, SwiGLU feed-forward, grouped-query causal attention, optionally tied embeddings.
//! Parameter names are those of Hugging Face `LlamaForCausalLM` (`model.embed_tokens.weight`,
//! `model.layers.N.self_attn.q_proj.weight`, ..., `lm_head.weight`). [`build`] makes the training/eval graph
//! (forward and backward through the [`LinearHook`]); [`crate::generate`] runs the same model for generation
//! with a KV cache; both are [`define`], written once against [`LlamaOps`]. [`load_gguf`] reads a GGUF file
//! into a [`ParamStore`], with a peft LoRA adapter's factors beside the weights if given.
//!
//! Gemma 3 (`Gemma3ForCausalLM`) is the same definition with [`LlamaConfig::gemma`] set: the embeddings scaled
//! by √hidden, RMSNorm of q and k per head, norms after attention and after the MLP as well as before them
//! (`pre_feedforward_layernorm` takes the place of Llama's `post_attention_layernorm`, which Gemma applies to
//! the attention output), a GELU-tanh gated MLP, scores scaled by 1/√query_pre_attn_scalar, and on the
//! sliding layers a causal window with their own RoPE base. Gemma's RMSNorm computes x·(1 + w); the store
//! holds the 1 + w llama.cpp writes into GGUF files, so the norm is the same kernel as Llama's.

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
    /// Set for a Gemma 3 decoder (see the module docs); None for Llama.
    pub gemma: Option<GemmaConfig>,
}

/// What a Gemma 3 decoder changes in [`define`].
#[derive(Debug, Clone, PartialEq)]
pub struct GemmaConfig {
    /// Size of one attention head (not hidden / heads).
    pub head_dim: usize,
    /// Scores are scaled by 1/√query_pre_attn_scalar.
    pub query_pre_attn_scalar: f32,
    /// Keys a query of a sliding layer sees, itself included.
    pub sliding_window: usize,
    /// Per layer: true for a sliding-window layer.
    pub sliding: Vec<bool>,
    /// RoPE base of the sliding layers (the others use [`LlamaConfig::rope_theta`]).
    pub rope_local_theta: f32,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        match &self.gemma {
            Some(g) => g.head_dim,
            None => self.hidden / self.heads.max(1),
        }
    }

    /// Width of the attention output, heads × head size (the hidden size for Llama).
    pub fn attn_width(&self) -> usize {
        self.heads * self.head_dim()
    }

    /// The attention score scale.
    pub fn attn_scale(&self) -> f32 {
        match &self.gemma {
            Some(g) => 1.0 / g.query_pre_attn_scalar.sqrt(),
            None => 1.0 / (self.head_dim() as f32).sqrt(),
        }
    }

    /// The sliding window of layer `layer` (0 = full causal attention).
    pub fn window(&self, layer: usize) -> usize {
        match &self.gemma {
            Some(g) if g.sliding.get(layer).copied().unwrap_or(false) => g.sliding_window,
            _ => 0,
        }
    }

    /// The RoPE base of layer `layer`.
    pub fn rope_theta_at(&self, layer: usize) -> f32 {
        match &self.gemma {
            Some(g) if g.sliding.get(layer).copied().unwrap_or(false) => g.rope_local_theta,
            _ => self.rope_theta,
        }
    }

    /// From a checkpoint's config (GGUF metadata or `config.json`); checks the head split.
    pub fn from_model_config(c: &ModelConfig) -> Result<LlamaConfig> {
        let gemma = match (c.architecture, &c.gemma3) {
            (rime_io::Architecture::Llama, _) => None,
            (rime_io::Architecture::Gemma3, Some(g)) => Some(GemmaConfig {
                head_dim: g.head_dim,
                query_pre_attn_scalar: g.query_pre_attn_scalar as f32,
                sliding_window: g.sliding_window,
                sliding: (0..c.num_hidden_layers).map(|l| g.is_sliding(l)).collect(),
                rope_local_theta: g.rope_local_base_freq as f32,
            }),
            (a, _) => {
                return Err(Error::Invalid(format!(
                    "architecture {} is not a decoder rime builds (llama, gemma3)",
                    a.as_str()
                )))
            }
        };
        let act = if gemma.is_some() { "gelu_pytorch_tanh" } else { "silu" };
        if c.hidden_act != act {
            return Err(Error::Invalid(format!("hidden_act `{}`: the builder implements {act}", c.hidden_act)));
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
            gemma,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if let Some(g) = &self.gemma {
            if g.head_dim == 0 || g.sliding.len() != self.layers || g.query_pre_attn_scalar <= 0.0 {
                return Err(Error::Invalid(format!(
                    "gemma: head_dim {}, {} layer kinds for {} layers, query_pre_attn_scalar {}",
                    g.head_dim,
                    g.sliding.len(),
                    self.layers,
                    g.query_pre_attn_scalar
                )));
            }
        }
        if self.heads == 0
            || self.kv_heads == 0
            || (self.gemma.is_none() && !self.hidden.is_multiple_of(self.heads))
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
    /// gelu_tanh(gate) · up, Gemma's FFN activation of layer `layer`.
    fn gelu_mul(&mut self, layer: usize, gate: Self::V, up: Self::V) -> Result<Self::V, Self::E>;
    /// x · s (Gemma's embedding scale; `x` is the embedding output).
    fn scale(&mut self, x: Self::V, s: f32) -> Result<Self::V, Self::E>;
    /// RMSNorm of each head of q [.., heads·HS] or k with the gain `weight` [HS] (Gemma's q_norm/k_norm);
    /// `heads` tells q (the query heads) from k (the kv heads).
    fn head_norm(&mut self, layer: usize, x: Self::V, weight: &str, heads: usize) -> Result<Self::V, Self::E>;
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
/// tied embedding matrix). With [`LlamaConfig::gemma`], Gemma 3's block (see the module docs).
pub fn define<O: LlamaOps>(ops: &mut O, cfg: &LlamaConfig, head: Option<&str>) -> Result<O::V, O::E> {
    let gemma = cfg.gemma.is_some();
    let mut x = ops.embed("model.embed_tokens.weight")?;
    if gemma {
        // transformers: embed_scale = hidden_size ** 0.5, a Python float cast to the weights' f32
        x = ops.scale(x, (cfg.hidden as f64).sqrt() as f32)?;
    }
    for l in 0..cfg.layers {
        ops.layer_start(l);
        let base = format!("model.layers.{l}.");
        let module = |p: Proj| format!("{base}{}", p.module());
        let lin = |ops: &mut O, x: O::V, p: Proj| ops.linear(x, &module(p), &format!("{}.weight", module(p)), p);
        let h = ops.rmsnorm(x, &format!("{base}input_layernorm.weight"))?;
        let mut q = lin(ops, h, Proj::Q)?;
        let mut k = lin(ops, h, Proj::K)?;
        let v = lin(ops, h, Proj::V)?;
        if gemma {
            q = ops.head_norm(l, q, &format!("{base}self_attn.q_norm.weight"), cfg.heads)?;
            k = ops.head_norm(l, k, &format!("{base}self_attn.k_norm.weight"), cfg.kv_heads)?;
        }
        let a = ops.attention(l, q, k, v)?;
        let mut o = lin(ops, a, Proj::O)?;
        if gemma {
            o = ops.rmsnorm(o, &format!("{base}post_attention_layernorm.weight"))?;
        }
        x = ops.residual(l, Block::Attention, x, h, o)?;
        let ffn_norm = if gemma { "pre_feedforward_layernorm" } else { "post_attention_layernorm" };
        let h2 = ops.rmsnorm(x, &format!("{base}{ffn_norm}.weight"))?;
        let gate = lin(ops, h2, Proj::Gate)?;
        let up = lin(ops, h2, Proj::Up)?;
        let m = if gemma { ops.gelu_mul(l, gate, up)? } else { ops.silu_mul(l, gate, up)? };
        let mut d = lin(ops, m, Proj::Down)?;
        if gemma {
            d = ops.rmsnorm(d, &format!("{base}post_feedforward_layernorm.weight"))?;
        }
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
        if self.store.find(weight).is_none() {
            if let Some(parts) = row_parts(self.store, weight) {
                // a table split by rows: each part looks up its own ids, the others give zero rows
                let mut sum: Option<Var> = None;
                for (name, offset) in parts {
                    let p = self.g.param(self.store, &name)?;
                    let e = self.g.embedding_offset(ids, p, offset)?;
                    sum = Some(match sum {
                        Some(s) => self.g.add(s, e)?,
                        None => e,
                    });
                }
                return sum.ok_or_else(|| rime_graph::Error::Invalid(format!("`{weight}` has no row parts")));
            }
        }
        let emb = self.g.param(self.store, weight)?;
        self.g.embedding(ids, emb) // [B, T, C]
    }

    fn rmsnorm(&mut self, x: Var, weight: &str) -> rime_graph::Result<Var> {
        let w = self.g.param(self.store, weight)?;
        self.g.rmsnorm(x, w, self.cfg.eps)
    }

    fn linear(&mut self, x: Var, module: &str, weight: &str, _: Proj) -> rime_graph::Result<Var> {
        if self.store.find(weight).is_none() {
            if let Some(parts) = row_parts(self.store, weight) {
                // a weight split by rows (an output head over a large vocabulary): the products side by side
                if self.store.find(&crate::lora::factor_name(module, "A")).is_some() {
                    return Err(rime_graph::Error::Invalid(format!(
                        "`{module}`: an adapter on a weight split by rows (`{weight}`) is not supported"
                    )));
                }
                let mut ys = Vec::with_capacity(parts.len());
                for (name, _) in parts {
                    let w = self.g.param(self.store, &name)?;
                    ys.push(self.g.linear(x, w, None)?);
                }
                return self.g.concat_last(&ys);
            }
        }
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

    fn attention(&mut self, layer: usize, q: Var, k: Var, v: Var) -> rime_graph::Result<Var> {
        let (g, c) = (&mut *self.g, self.cfg);
        let (b, t, hs) = (self.b, self.t, c.head_dim());
        let q4 = g.reshape(q, &[b, t, c.heads, hs])?;
        let k4 = g.reshape(k, &[b, t, c.kv_heads, hs])?;
        let v4 = g.reshape(v, &[b, t, c.kv_heads, hs])?;
        let theta = c.rope_theta_at(layer);
        let q4 = g.rope(q4, 0, theta)?;
        let k4 = g.rope(k4, 0, theta)?;
        let a = g.attention_window(q4, k4, v4, None, true, c.attn_scale(), c.window(layer))?;
        g.reshape(a, &[b, t, c.attn_width()])
    }

    fn silu_mul(&mut self, layer: usize, gate: Var, up: Var) -> rime_graph::Result<Var> {
        let gate = self.g.silu(gate);
        let m = self.g.mul(gate, up)?;
        self.hook.ffn_activation(self.g, self.store, layer, m)
    }

    fn gelu_mul(&mut self, layer: usize, gate: Var, up: Var) -> rime_graph::Result<Var> {
        let gate = self.g.gelu(gate, true);
        let m = self.g.mul(gate, up)?;
        self.hook.ffn_activation(self.g, self.store, layer, m)
    }

    fn scale(&mut self, x: Var, s: f32) -> rime_graph::Result<Var> {
        Ok(self.g.scale(x, s))
    }

    fn head_norm(&mut self, _: usize, x: Var, weight: &str, heads: usize) -> rime_graph::Result<Var> {
        let (b, t, hs) = (self.b, self.t, self.cfg.head_dim());
        let x4 = self.g.reshape(x, &[b, t, heads, hs])?;
        let y = self.rmsnorm(x4, weight)?;
        self.g.reshape(y, &[b, t, heads * hs])
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

/// The name of part `k` of a weight split by rows ([`upload_split`]).
pub fn row_part_name(name: &str, k: usize) -> String {
    format!("{name}#rows{k}")
}

/// The parts of a weight split by rows and the first row of each, if `store` holds it that way.
pub fn row_parts(store: &ParamStore, name: &str) -> Option<Vec<(String, u32)>> {
    let mut out = Vec::new();
    let mut offset = 0usize;
    while let Some(id) = store.find(&row_part_name(name, out.len())) {
        let rows = store.get(id).tensor.shape.first().copied().unwrap_or(0);
        out.push((row_part_name(name, out.len()), u32::try_from(offset).ok()?));
        offset += rows;
    }
    (!out.is_empty()).then_some(out)
}

/// Uploads a frozen matrix [rows, cols] (f32 `data`, stored as `dtype`) into `store` as `name`, or, when it is
/// larger than one storage binding of `dev` (Gemma's 262,144 × 640 embedding on lavapipe's 128 MiB), as parts
/// of whole rows named by [`row_part_name`]; the graph and the decoder then gather and multiply part by part.
pub fn upload_split(
    dev: &Device,
    store: &mut ParamStore,
    name: &str,
    shape: &[usize],
    data: &[f32],
    dtype: DType,
) -> Result<()> {
    let elem = if dtype == DType::F16 { 2 } else { 4 };
    let upload = |n: &str, shape: &[usize], d: &[f32]| -> Result<rime_kernels::Tensor> {
        Ok(if dtype == DType::F16 {
            let h: Vec<half::f16> = d.iter().map(|&x| half::f16::from_f32(x)).collect();
            dev.upload_bytes(n, bytemuck::cast_slice(&h), shape, DType::F16)?
        } else {
            dev.upload_bytes(n, bytemuck::cast_slice(d), shape, DType::F32)?
        })
    };
    let bytes = (data.len() * elem) as u64;
    if shape.len() != 2 || bytes <= dev.max_binding() {
        store.add(name, upload(name, shape, data)?, false)?;
        return Ok(());
    }
    let (rows, cols) = (shape[0], shape[1]);
    let per = (dev.max_binding() as usize / (cols * elem).max(1)).max(1);
    for (k, start) in (0..rows).step_by(per).enumerate() {
        let end = (start + per).min(rows);
        let part = row_part_name(name, k);
        store.add(&part, upload(&part, &[end - start, cols], &data[start * cols..end * cols])?, false)?;
    }
    Ok(())
}

/// [`upload_split`] for a quantized matrix [rows, cols] of `qtype` given as its GGUF bytes: whole rows (whole
/// blocks) per part when it is larger than one storage binding.
#[allow(clippy::too_many_arguments)]
fn upload_quantized_split(
    dev: &Device,
    store: &mut ParamStore,
    name: &str,
    qtype: QType,
    rows: usize,
    cols: usize,
    bytes: &[u8],
) -> Result<()> {
    let row_bytes = bytes.len() / rows.max(1);
    if (bytes.len() as u64) <= dev.max_binding() {
        store.add(name, QTensor::upload_named(dev, name, qtype, rows, cols, bytes)?.to_tensor(), false)?;
        return Ok(());
    }
    let per = (dev.max_binding() as usize / row_bytes.max(1)).max(1);
    for (k, start) in (0..rows).step_by(per).enumerate() {
        let end = (start + per).min(rows);
        let part = row_part_name(name, k);
        let q =
            QTensor::upload_named(dev, &part, qtype, end - start, cols, &bytes[start * row_bytes..end * row_bytes])?;
        store.add(&part, q.to_tensor(), false)?;
    }
    Ok(())
}

/// The name of the output projection: `lm_head.weight`, or the embedding matrix when tied.
pub fn lm_head_name(store: &ParamStore, cfg: &LlamaConfig) -> &'static str {
    if cfg.tie_word_embeddings
        || (store.find("lm_head.weight").is_none() && row_parts(store, "lm_head.weight").is_none())
    {
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

/// The most f32 logits a chunk of [`build_loss`] holds (its `max_block` as the trainer sets it, when a storage
/// binding allows more): 8M values, 32 MiB. Measured on lavapipe, Gemma 3 at 2 × 256 tokens with `--weights q`
/// and gradient checkpointing, two steps: 66.2 s and an activation peak of 127 MiB at 8M values, 64.2 s and
/// 295 MiB at 32M (with the head's blocks as checkpoint segments instead of fused with the loss: 79.9 s and
/// 213 MiB).
pub const LOSS_BLOCK_VALUES: usize = 8 << 20;

/// The decoder's mean next-token loss over `targets` [B·T] (I32; -100 marks positions without a target), for
/// training and evaluation graphs, without the whole logits matrix [B·T, vocab].
///
/// When `hook` leaves the output head plain (it [`LinearHook::rewrites`] no `lm_head`, and no adapter for it is
/// loaded), the tokens go through the head a chunk of rows at a time ([`Graph::rows`]) into
/// [`Graph::linear_cross_entropy`] over the head's weight (or its row parts, see [`upload_split`]), at most
/// `max_block` logits per chunk (one storage binding of the device, in f32 values, or less): each chunk's logits
/// live only inside its forward pass, which also computes the chunk's hidden-state gradient for a unit loss
/// gradient, so a training step neither keeps nor recomputes them (Gemma 3's 262,144-way head at 8 × 256 tokens:
/// 2 GiB of logits otherwise). With an adapter on the head, the logits come from the hook's linear layer: whole
/// when they fit `max_block` ([`build_with`] and [`Graph::cross_entropy`]), otherwise a chunk of rows at a time
/// as blocks of the vocabulary ([`Graph::cross_entropy_blocks`]), each chunk a gradient-checkpoint segment that
/// the backward recomputes.
#[allow(clippy::too_many_arguments)]
pub fn build_loss(
    g: &mut Graph,
    store: &ParamStore,
    cfg: &LlamaConfig,
    (b, t): (usize, usize),
    hook: &dyn LinearHook,
    checkpoint: bool,
    targets: Var,
    max_block: usize,
) -> rime_graph::Result<Var> {
    let head = lm_head_name(store, cfg);
    let parts = match row_parts(store, head) {
        Some(p) if store.find(head).is_none() => p.into_iter().map(|(name, _)| name).collect(),
        _ => vec![head.to_string()],
    };
    let n = b * t;
    let rows_of = |p: &String| store.find(p).map_or(0, |id| store.get(id).tensor.shape[0]);
    let widest = parts.iter().map(rows_of).max().unwrap_or(0);
    let vocab: usize = parts.iter().map(rows_of).sum();
    let module = Proj::Head.module();
    let adapted = hook.rewrites(store, module) || store.find(&crate::lora::factor_name(module, "A")).is_some();
    if adapted && parts.len() == 1 && n * widest <= max_block {
        let logits = build_with(g, store, cfg, b, t, hook, checkpoint)?;
        let flat = g.reshape(logits, &[n, cfg.vocab])?;
        return g.cross_entropy(flat, targets, -100);
    }
    if adapted && parts.len() > 1 {
        return Err(rime_graph::Error::Invalid(format!(
            "`{module}`: an adapter on a weight split by rows (`{head}`) is not supported"
        )));
    }
    check_graph(cfg, t)?;
    let ops = &mut GraphOps { g, store, cfg, hook, b, t, checkpoint };
    let h = define(ops, cfg, None)?;
    let h = g.reshape(h, &[n, cfg.hidden])?;
    let ws = parts.iter().map(|p| g.param(store, p)).collect::<rime_graph::Result<Vec<_>>>()?;
    // Fused, a chunk's logits of every part live at once; through the hook, one part's at a time.
    let rows = chunk_rows(n, max_block / if adapted { widest } else { vocab }.max(1));
    let mut loss: Option<Var> = None;
    for r0 in (0..n).step_by(rows) {
        let share = if adapted {
            g.checkpoint();
            let hc = g.rows(h, r0, rows.min(n - r0))?;
            let logits = hook.linear(g, store, module, hc, ws[0], None)?;
            let share = g.cross_entropy_blocks(&[logits], targets, r0, -100)?;
            g.end_checkpoint();
            share
        } else {
            let hc = if rows >= n { h } else { g.rows(h, r0, rows.min(n - r0))? };
            g.linear_cross_entropy(hc, &ws, targets, r0, -100)?
        };
        loss = Some(match loss {
            Some(l) => g.add(l, share)?,
            None => share,
        });
    }
    loss.ok_or_else(|| rime_graph::Error::Invalid("a loss over no tokens".into()))
}

/// Rows per chunk when `n` rows are taken at most `most` at a time: equal chunks.
fn chunk_rows(n: usize, most: usize) -> usize {
    let chunks = n.div_ceil(most.max(1));
    n.div_ceil(chunks.max(1)).max(1)
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
            match (qtype, &t.shape[..]) {
                (Some(q), &[rows, cols]) => {
                    if rows * cols <= rime_kernels::ops::qmatmul::SCRATCH_MAX_VALUES {
                        largest = largest.max(rows * cols);
                    }
                    upload_quantized_split(dev, &mut store, &t.name, q, rows, cols, &t.bytes)?;
                }
                _ => {
                    let data = rime_io::gguf::dequantize(t.ggml_type, &t.bytes, t.shape.iter().product()).ok_or_else(
                        || Error::Model {
                            file: path.display().to_string(),
                            msg: format!("tensor `{}` has GGUF type {}, which rime cannot read", t.name, t.ggml_type),
                        },
                    )?;
                    upload_split(dev, &mut store, &t.name, &t.shape, &data, DType::F32)?;
                }
            }
        }
        // One scratch for every large product (the output head and any weight above SCRATCH_MAX_VALUES are
        // read from their blocks).
        let fits = DType::F32.storage_bytes(largest) <= dev.max_binding();
        if largest > 0 && fits {
            dev.reserve_dequant_scratch(largest)?;
        }
    } else {
        for (name, shape, data) in tensors {
            let dtype = if weights == GgufWeights::F16 && shape.len() == 2 { DType::F16 } else { DType::F32 };
            upload_split(dev, &mut store, &name, &shape, &data, dtype)?;
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
