//! Llama decoder (SmolLM2, Llama 2/3 and friends): RMSNorm, rotary positions in the Hugging Face
//! "rotate_half" convention, SwiGLU feed-forward, grouped-query causal attention, optionally tied embeddings.
//! Parameter names are those of Hugging Face `LlamaForCausalLM` (`model.embed_tokens.weight`,
//! `model.layers.N.self_attn.q_proj.weight`, ..., `lm_head.weight`). [`build`] makes the training/eval graph
//! (forward and backward through the [`LinearHook`]); [`crate::generate`] runs the same model for generation
//! with a KV cache. [`load_gguf`] reads a GGUF file into a [`ParamStore`], folding a peft LoRA adapter if given.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rime_graph::{Graph, ParamStore, Var};
use rime_io::{GgufFile, ModelConfig, PeftAdapter, Tokenizer};
use rime_kernels::{DType, Device};

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

fn p(g: &mut Graph, store: &ParamStore, name: &str) -> rime_graph::Result<Var> {
    g.param(store, name)
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
    if t > cfg.max_positions {
        return Err(rime_graph::Error::Invalid(format!(
            "sequence length {t} exceeds max_position_embeddings {}",
            cfg.max_positions
        )));
    }
    cfg.validate().map_err(|e| rime_graph::Error::Invalid(e.to_string()))?;
    let (c, nh, nkv) = (cfg.hidden, cfg.heads, cfg.kv_heads);
    let hs = cfg.head_dim();
    let ids = g.input(INPUT_IDS, &[b, t], DType::U32);
    let emb = p(g, store, "model.embed_tokens.weight")?;
    let mut x = g.embedding(ids, emb)?; // [B, T, C]
    for l in 0..cfg.layers {
        let base = format!("model.layers.{l}.");
        let lin = |g: &mut Graph, x: Var, m: &str| -> rime_graph::Result<Var> {
            let module = format!("{base}{m}");
            let w = p(g, store, &format!("{module}.weight"))?;
            hook.linear(g, store, &module, x, w, None)
        };
        let ln1 = p(g, store, &format!("{base}input_layernorm.weight"))?;
        let h = g.rmsnorm(x, ln1, cfg.eps)?;
        let q = lin(g, h, "self_attn.q_proj")?;
        let k = lin(g, h, "self_attn.k_proj")?;
        let v = lin(g, h, "self_attn.v_proj")?;
        let q4 = g.reshape(q, &[b, t, nh, hs])?;
        let k4 = g.reshape(k, &[b, t, nkv, hs])?;
        let v4 = g.reshape(v, &[b, t, nkv, hs])?;
        let q4 = g.rope(q4, 0, cfg.rope_theta)?;
        let k4 = g.rope(k4, 0, cfg.rope_theta)?;
        let a = g.attention(q4, k4, v4, None, true, 1.0 / (hs as f32).sqrt())?;
        let a = g.reshape(a, &[b, t, c])?;
        let o = lin(g, a, "self_attn.o_proj")?;
        let o = hook.block_output(g, store, l, "attention", h, o)?;
        x = g.add(x, o)?;
        let ln2 = p(g, store, &format!("{base}post_attention_layernorm.weight"))?;
        let h2 = g.rmsnorm(x, ln2, cfg.eps)?;
        let gate = lin(g, h2, "mlp.gate_proj")?;
        let up = lin(g, h2, "mlp.up_proj")?;
        let gate = g.silu(gate);
        let m = g.mul(gate, up)?;
        let m = hook.ffn_activation(g, store, l, m)?;
        let d = lin(g, m, "mlp.down_proj")?;
        let d = hook.block_output(g, store, l, "ffn", h2, d)?;
        x = g.add(x, d)?;
    }
    let norm = p(g, store, "model.norm.weight")?;
    g.rmsnorm(x, norm, cfg.eps)
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
    let h = build_hidden(g, store, cfg, b, t, hook)?;
    let w = p(g, store, lm_head_name(store, cfg))?;
    let logits = hook.linear(g, store, "lm_head", h, w, None)?;
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
    /// Modules an adapter was folded into.
    pub folded: Vec<String>,
    pub source: PathBuf,
}

/// peft's pattern lookup: a key matches a module whose path is the key or ends with `.key`.
fn pattern<'a, T>(m: &'a BTreeMap<String, T>, module: &str) -> Option<&'a T> {
    m.iter().find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}"))).map(|(_, v)| v)
}

/// Folds a peft LoRA adapter into `tensors` (HF names, f32): W += s · B · A for each adapted module, s =
/// alpha / r (alpha / sqrt(r) with rsLoRA, `alpha_pattern` respected); DoRA adapters (`use_dora`) then rescale
/// each row to m / ||W + s·B·A||_row with the module's `lora_magnitude_vector`. Returns the adapted modules.
pub fn fold_lora(tensors: &mut [rime_io::NamedTensor], adapter: &PeftAdapter, dir: &Path) -> Result<Vec<String>> {
    let file = dir.join("adapter_config.json").display().to_string();
    let cfg = &adapter.config;
    if cfg.peft_type != "LORA" {
        return Err(Error::Model {
            file,
            msg: format!("peft_type `{}`: only LORA adapters are folded", cfg.peft_type),
        });
    }
    if cfg.use_dora && cfg.fan_in_fan_out {
        return Err(Error::Model { file, msg: "use_dora with fan_in_fan_out is not supported".into() });
    }
    let mut done = Vec::new();
    for pair in adapter.lora_pairs() {
        let target = format!("{}.weight", pair.module);
        let missing = |n: &str| Error::Model { file: file.clone(), msg: format!("missing tensor `{n}`") };
        let a = adapter.get(&pair.a).ok_or_else(|| missing(&pair.a))?;
        let b = adapter.get(&pair.b).ok_or_else(|| missing(&pair.b))?;
        let w = tensors.iter_mut().find(|t| t.0 == target).ok_or_else(|| Error::Model {
            file: file.clone(),
            msg: format!("`{}` adapts `{target}`, which the model does not have", pair.a),
        })?;
        let (r, fin, fout) = (a.shape[0], a.shape[1], b.shape[0]);
        let (rows, cols) = if cfg.fan_in_fan_out { (fin, fout) } else { (fout, fin) };
        if w.1 != [rows, cols] {
            return Err(Error::Model {
                file: file.clone(),
                msg: format!("`{target}` is {:?} but B·A of `{}` is [{fout}, {fin}]", w.1, pair.module),
            });
        }
        let alpha = pattern(&cfg.alpha_pattern, &pair.module).copied().unwrap_or(cfg.lora_alpha);
        let s = if cfg.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 } as f32;
        // delta[o, i] = s Σ_k B[o, k] A[k, i]
        for o in 0..fout {
            for k in 0..r {
                let bok = s * b.data[o * r + k];
                if bok == 0.0 {
                    continue;
                }
                let arow = &a.data[k * fin..(k + 1) * fin];
                for (i, &aki) in arow.iter().enumerate() {
                    let idx = if cfg.fan_in_fan_out { i * fout + o } else { o * fin + i };
                    w.2[idx] += bok * aki;
                }
            }
        }
        if cfg.use_dora {
            let mn = format!("{}.lora_magnitude_vector", pair.a.trim_end_matches(".lora_A.weight"));
            let m = adapter.get(&mn).ok_or_else(|| missing(&mn))?;
            if m.shape != [fout] {
                return Err(Error::Model {
                    file: file.clone(),
                    msg: format!("`{mn}` has shape {:?}, expected [{fout}]", m.shape),
                });
            }
            for (o, row) in w.2.chunks_mut(fin).enumerate() {
                let norm = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
                let g = (m.data[o] as f64 / norm) as f32;
                row.iter_mut().for_each(|v| *v *= g);
            }
        }
        done.push(pair.module.clone());
    }
    Ok(done)
}

/// Reads a Llama GGUF file: weights dequantized and uploaded (matrices as `weight_dtype`, F32 or F16; norms
/// always F32), frozen, under Hugging Face names; tokenizer, chat template and special tokens from the metadata.
/// `adapter`: a peft LoRA folder folded into the weights before upload.
pub fn load_gguf(dev: &Device, path: &Path, adapter: Option<&Path>, weight_dtype: DType) -> Result<LlamaModel> {
    let file = GgufFile::open(path)?;
    let mc = file.model_config()?;
    let cfg = LlamaConfig::from_model_config(&mc)
        .map_err(|e| Error::Model { file: path.display().to_string(), msg: e.to_string() })?;
    let mut tensors = file.load_hf(&mc)?;
    let folded = match adapter {
        Some(dir) => {
            let ad = PeftAdapter::load(dir)?;
            fold_lora(&mut tensors, &ad, dir)?
        }
        None => Vec::new(),
    };
    let mut store = ParamStore::new();
    for (name, shape, data) in tensors {
        let t = if weight_dtype == DType::F16 && shape.len() == 2 {
            let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
            dev.upload_bytes(&name, bytemuck::cast_slice(&h), &shape, DType::F16)?
        } else {
            dev.upload_bytes(&name, bytemuck::cast_slice(&data), &shape, DType::F32)?
        };
        store.add(&name, t, false)?;
    }
    let tokenizer = file.tokenizer()?;
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
