//! Hugging Face `config.json` as the few numbers rime's model builders need, for the architectures rime knows
//! (BERT encoders, Llama decoders; Gemma 3 decoders from GGUF metadata), and a check that a checkpoint's
//! tensor shapes agree with them.

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;

use crate::error::{display, format_err, io_err, Error, Result};
use crate::safetensors::Checkpoint;

/// Model families rime can build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Bert,
    Llama,
    /// Gemma 3 text decoder (`Gemma3ForCausalLM`); read from GGUF files (see [`Gemma3Params`]).
    Gemma3,
}

impl Architecture {
    /// The `model_type` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Bert => "bert",
            Architecture::Llama => "llama",
            Architecture::Gemma3 => "gemma3",
        }
    }
}

/// What a Gemma 3 text decoder adds to the Llama hyper-parameters (transformers' `Gemma3TextConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Params {
    /// Size of one attention head (256 for Gemma 3 270M; not hidden_size / heads).
    pub head_dim: usize,
    /// Attention scores are scaled by 1/sqrt(query_pre_attn_scalar).
    pub query_pre_attn_scalar: f64,
    /// Keys a query of a sliding layer sees (itself included).
    pub sliding_window: usize,
    /// Every `sliding_window_pattern`-th layer (1-based) is a global layer; the others slide.
    pub sliding_window_pattern: usize,
    /// RoPE base of the sliding layers (the global layers use `rope_theta`).
    pub rope_local_base_freq: f64,
}

impl Gemma3Params {
    /// Whether layer `layer` (0-based) is a sliding-window layer, as transformers' default `layer_types`.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_window_pattern == 0 || !(layer + 1).is_multiple_of(self.sliding_window_pattern)
    }
}

/// The architecture hyper-parameters of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Equals `num_attention_heads` when the config does not say (no GQA).
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    /// BERT segment embeddings; 0 for Llama.
    pub type_vocab_size: usize,
    /// BERT LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Llama RMSNorm epsilon.
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub hidden_act: String,
    pub tie_word_embeddings: bool,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    /// HF allows one id or a list.
    pub eos_token_id: Vec<u32>,
    /// Set for [`Architecture::Gemma3`].
    pub gemma3: Option<Gemma3Params>,
}

impl ModelConfig {
    /// Reads `config.json` (or the `config.json` inside a folder).
    pub fn from_file(path: impl AsRef<Path>) -> Result<ModelConfig> {
        let path = path.as_ref();
        let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(io_err(&file, "cannot read"))?;
        Self::from_json_str(&text, &file)
    }

    /// Parses config.json text; `source` names it in messages.
    pub fn from_json_str(text: &str, source: &Path) -> Result<ModelConfig> {
        let json: Value = serde_json::from_str(text).map_err(|e| format_err(source, format!("not valid JSON: {e}")))?;
        let obj = json.as_object().ok_or_else(|| format_err(source, "config is not a JSON object"))?;
        let file = display(source);
        let cfg_err = |field: &str, msg: String| Error::Config { file: file.clone(), field: field.to_string(), msg };

        let model_type = obj.get("model_type").and_then(Value::as_str).unwrap_or("");
        let archs: Vec<&str> = obj
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let architecture = match model_type {
            "bert" => Architecture::Bert,
            "llama" => Architecture::Llama,
            _ => {
                if archs.iter().any(|a| a.starts_with("Bert")) {
                    Architecture::Bert
                } else if archs.iter().any(|a| a.starts_with("Llama")) {
                    Architecture::Llama
                } else {
                    return Err(cfg_err(
                        "model_type",
                        format!(
                            "unknown architecture (model_type `{model_type}`, architectures {archs:?}); rime supports bert and llama"
                        ),
                    ));
                }
            }
        };

        let usize_field = |name: &str| -> Result<Option<usize>> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .map(Some)
                    .ok_or_else(|| cfg_err(name, format!("expected a non-negative integer, found {v}"))),
            }
        };
        let required = |name: &str| -> Result<usize> {
            match usize_field(name)? {
                Some(0) => Err(cfg_err(name, "must be positive, found 0".into())),
                Some(x) => Ok(x),
                None => Err(cfg_err(name, "missing".into())),
            }
        };
        let f64_field = |name: &str, default: f64| -> Result<f64> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v.as_f64().ok_or_else(|| cfg_err(name, format!("expected a number, found {v}"))),
            }
        };
        let id_field = |name: &str| -> Result<Vec<u32>> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        v.as_u64()
                            .and_then(|x| u32::try_from(x).ok())
                            .ok_or_else(|| cfg_err(name, format!("expected token ids, found {v}")))
                    })
                    .collect(),
                Some(v) => v
                    .as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .map(|x| vec![x])
                    .ok_or_else(|| cfg_err(name, format!("expected a token id, found {v}"))),
            }
        };

        let hidden_size = required("hidden_size")?;
        let num_hidden_layers = required("num_hidden_layers")?;
        let num_attention_heads = required("num_attention_heads")?;
        let num_key_value_heads = usize_field("num_key_value_heads")?.unwrap_or(num_attention_heads);
        let intermediate_size = required("intermediate_size")?;
        let vocab_size = required("vocab_size")?;
        let max_position_embeddings = usize_field("max_position_embeddings")?.unwrap_or(match architecture {
            Architecture::Bert => 512,
            Architecture::Llama | Architecture::Gemma3 => 2048,
        });
        let type_vocab_size = match architecture {
            Architecture::Bert => usize_field("type_vocab_size")?.unwrap_or(2),
            Architecture::Llama | Architecture::Gemma3 => usize_field("type_vocab_size")?.unwrap_or(0),
        };
        if hidden_size % num_attention_heads != 0 {
            return Err(cfg_err(
                "num_attention_heads",
                format!("{num_attention_heads} does not divide hidden_size {hidden_size}"),
            ));
        }
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(cfg_err(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let hidden_act = match obj.get("hidden_act").or_else(|| obj.get("hidden_activation")) {
            None | Some(Value::Null) => match architecture {
                Architecture::Bert => "gelu".to_string(),
                Architecture::Llama => "silu".to_string(),
                Architecture::Gemma3 => "gelu_pytorch_tanh".to_string(),
            },
            Some(Value::String(s)) => s.clone(),
            Some(v) => return Err(cfg_err("hidden_act", format!("expected a string, found {v}"))),
        };
        let tie_word_embeddings = match obj.get("tie_word_embeddings") {
            None | Some(Value::Null) => true, // transformers' PretrainedConfig default
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(cfg_err("tie_word_embeddings", format!("expected true/false, found {v}"))),
        };
        refuse_unimplemented(obj, architecture, &hidden_act, hidden_size / num_attention_heads, &cfg_err)?;
        let pad = id_field("pad_token_id")?;
        let bos = id_field("bos_token_id")?;
        Ok(ModelConfig {
            architecture,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            intermediate_size,
            vocab_size,
            max_position_embeddings,
            type_vocab_size,
            layer_norm_eps: f64_field("layer_norm_eps", 1e-12)?,
            rms_norm_eps: f64_field("rms_norm_eps", 1e-6)?,
            rope_theta: f64_field("rope_theta", 10000.0)?,
            hidden_act,
            tie_word_embeddings,
            pad_token_id: pad.first().copied(),
            bos_token_id: bos.first().copied(),
            eos_token_id: id_field("eos_token_id")?,
            gemma3: None,
        })
    }

    /// Size of one attention head (Gemma 3 states it; otherwise hidden_size / num_attention_heads).
    pub fn head_dim(&self) -> usize {
        match &self.gemma3 {
            Some(g) => g.head_dim,
            None => self.hidden_size / self.num_attention_heads,
        }
    }

    /// The tensors this config implies with their PyTorch shapes, in Hugging Face names without a model
    /// prefix (BERT: `embeddings.word_embeddings.weight`...; Llama: `model.embed_tokens.weight`...).
    /// Biases and norms are included; `lm_head.weight` only when embeddings are not tied.
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        let mut push = |n: String, s: Vec<usize>| out.push((n, s));
        match self.architecture {
            Architecture::Bert => {
                push("embeddings.word_embeddings.weight".into(), vec![v, h]);
                push("embeddings.position_embeddings.weight".into(), vec![self.max_position_embeddings, h]);
                push("embeddings.token_type_embeddings.weight".into(), vec![self.type_vocab_size, h]);
                push("embeddings.LayerNorm.weight".into(), vec![h]);
                push("embeddings.LayerNorm.bias".into(), vec![h]);
                for l in 0..self.num_hidden_layers {
                    let p = format!("encoder.layer.{l}");
                    for m in
                        ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]
                    {
                        push(format!("{p}.{m}.weight"), vec![h, h]);
                        push(format!("{p}.{m}.bias"), vec![h]);
                    }
                    push(format!("{p}.attention.output.LayerNorm.weight"), vec![h]);
                    push(format!("{p}.attention.output.LayerNorm.bias"), vec![h]);
                    push(format!("{p}.intermediate.dense.weight"), vec![i, h]);
                    push(format!("{p}.intermediate.dense.bias"), vec![i]);
                    push(format!("{p}.output.dense.weight"), vec![h, i]);
                    push(format!("{p}.output.dense.bias"), vec![h]);
                    push(format!("{p}.output.LayerNorm.weight"), vec![h]);
                    push(format!("{p}.output.LayerNorm.bias"), vec![h]);
                }
            }
            Architecture::Llama => {
                let kv = self.num_key_value_heads * self.head_dim();
                push("model.embed_tokens.weight".into(), vec![v, h]);
                for l in 0..self.num_hidden_layers {
                    let p = format!("model.layers.{l}");
                    push(format!("{p}.self_attn.q_proj.weight"), vec![h, h]);
                    push(format!("{p}.self_attn.k_proj.weight"), vec![kv, h]);
                    push(format!("{p}.self_attn.v_proj.weight"), vec![kv, h]);
                    push(format!("{p}.self_attn.o_proj.weight"), vec![h, h]);
                    push(format!("{p}.mlp.gate_proj.weight"), vec![i, h]);
                    push(format!("{p}.mlp.up_proj.weight"), vec![i, h]);
                    push(format!("{p}.mlp.down_proj.weight"), vec![h, i]);
                    push(format!("{p}.input_layernorm.weight"), vec![h]);
                    push(format!("{p}.post_attention_layernorm.weight"), vec![h]);
                }
                push("model.norm.weight".into(), vec![h]);
                if !self.tie_word_embeddings {
                    push("lm_head.weight".into(), vec![v, h]);
                }
            }
            Architecture::Gemma3 => {
                let hd = self.head_dim();
                let (q, kv) = (self.num_attention_heads * hd, self.num_key_value_heads * hd);
                push("model.embed_tokens.weight".into(), vec![v, h]);
                for l in 0..self.num_hidden_layers {
                    let p = format!("model.layers.{l}");
                    push(format!("{p}.self_attn.q_proj.weight"), vec![q, h]);
                    push(format!("{p}.self_attn.k_proj.weight"), vec![kv, h]);
                    push(format!("{p}.self_attn.v_proj.weight"), vec![kv, h]);
                    push(format!("{p}.self_attn.o_proj.weight"), vec![h, q]);
                    push(format!("{p}.self_attn.q_norm.weight"), vec![hd]);
                    push(format!("{p}.self_attn.k_norm.weight"), vec![hd]);
                    push(format!("{p}.mlp.gate_proj.weight"), vec![i, h]);
                    push(format!("{p}.mlp.up_proj.weight"), vec![i, h]);
                    push(format!("{p}.mlp.down_proj.weight"), vec![h, i]);
                    for n in [
                        "input_layernorm",
                        "post_attention_layernorm",
                        "pre_feedforward_layernorm",
                        "post_feedforward_layernorm",
                    ] {
                        push(format!("{p}.{n}.weight"), vec![h]);
                    }
                }
                push("model.norm.weight".into(), vec![h]);
                if !self.tie_word_embeddings {
                    push("lm_head.weight".into(), vec![v, h]);
                }
            }
        }
        out
    }

    /// Checks that every tensor the config implies exists with the implied shape, and that the checkpoint holds
    /// no tensor the model would not use (other than the ones [`is_known_unused`] lists: a config with fewer
    /// layers than the checkpoint, or tied embeddings beside an `lm_head.weight`, is refused naming the unused
    /// tensors). `shape_of` looks a name up in the checkpoint; `names` lists what the checkpoint has; `file`
    /// names the checkpoint. A BERT checkpoint may prefix its names with `bert.`. The layer count is checked
    /// against the checkpoint before anything is sized by it (a `num_hidden_layers` of 10^12 is an error, not
    /// an allocation).
    pub fn check_shapes(
        &self,
        file: &Path,
        names: &[&str],
        shape_of: &dyn Fn(&str) -> Option<Vec<usize>>,
    ) -> Result<()> {
        let prefix = self.prefix_in(shape_of);
        self.check_layer_count(file, names.len(), prefix, shape_of)?;
        let expected = self.expected_shapes();
        for (name, expected) in &expected {
            let (name, expected) = (name.as_str(), expected.clone());
            let full = format!("{prefix}{name}");
            match shape_of(&full) {
                None => return Err(crate::safetensors::missing_tensor(file, &full, names.to_vec())),
                Some(actual) if actual != expected => {
                    return Err(Error::ShapeMismatch {
                        file: display(file),
                        tensor: full,
                        actual,
                        expected,
                        why: self.shape_reason(name),
                    })
                }
                Some(_) => {}
            }
        }
        let used: HashSet<String> = expected.into_iter().map(|(n, _)| format!("{prefix}{n}")).collect();
        self.refuse_unused(file, names, &used)
    }

    /// `bert.` when a BERT checkpoint keeps its encoder under that prefix (BertFor... checkpoints), else "".
    fn prefix_in(&self, shape_of: &dyn Fn(&str) -> Option<Vec<usize>>) -> &'static str {
        match self.architecture {
            Architecture::Bert
                if shape_of("embeddings.word_embeddings.weight").is_none()
                    && shape_of("bert.embeddings.word_embeddings.weight").is_some() =>
            {
                "bert."
            }
            _ => "",
        }
    }

    /// The name of a layer's first tensor (its query projection).
    fn layer_probe(&self, prefix: &str, layer: usize) -> String {
        match self.architecture {
            Architecture::Bert => format!("{prefix}encoder.layer.{layer}.attention.self.query.weight"),
            Architecture::Llama | Architecture::Gemma3 => {
                format!("{prefix}model.layers.{layer}.self_attn.q_proj.weight")
            }
        }
    }

    /// Refuses a `num_hidden_layers` the checkpoint cannot hold (each layer has at least 9 tensors) before the
    /// per-layer tensor list is built, naming the first layer the checkpoint lacks.
    fn check_layer_count(
        &self,
        file: &Path,
        n_tensors: usize,
        prefix: &str,
        shape_of: &dyn Fn(&str) -> Option<Vec<usize>>,
    ) -> Result<()> {
        let layers = self.num_hidden_layers;
        let Some(last) = layers.checked_sub(1) else { return Ok(()) };
        let fits = layers.checked_mul(9).is_some_and(|n| n <= n_tensors);
        if fits && shape_of(&self.layer_probe(prefix, last)).is_some() {
            return Ok(());
        }
        let bound = layers.min(n_tensors / 9 + 1);
        let have = (0..bound).find(|&l| shape_of(&self.layer_probe(prefix, l)).is_none()).unwrap_or(bound);
        Err(Error::Config {
            file: display(file),
            field: "num_hidden_layers".into(),
            msg: format!(
                "config says {layers} layers, but the checkpoint has tensors for {have} (no `{}`)",
                self.layer_probe(prefix, have)
            ),
        })
    }

    /// Refuses checkpoint tensors that no part of the model reads, naming them (up to 5) and their count.
    fn refuse_unused(&self, file: &Path, names: &[&str], used: &HashSet<String>) -> Result<()> {
        let mut unused: Vec<&str> =
            names.iter().copied().filter(|n| !used.contains(*n) && !is_known_unused(self.architecture, n)).collect();
        if unused.is_empty() {
            return Ok(());
        }
        unused.sort_unstable();
        let shown: Vec<String> = unused.iter().take(5).map(|n| format!("`{n}`")).collect();
        let more = if unused.len() > 5 { format!(" and {} more", unused.len() - 5) } else { String::new() };
        Err(Error::Tensor {
            file: display(file),
            tensor: unused[0].to_string(),
            msg: format!(
                "{} checkpoint tensor(s) that this config's {} model ({} layers) does not use: {}{more} \
                 (a config with fewer layers than the checkpoint, or tie_word_embeddings beside an lm_head?)",
                unused.len(),
                self.architecture.as_str(),
                self.num_hidden_layers,
                shown.join(", ")
            ),
        })
    }

    /// [`ModelConfig::check_shapes`] against a safetensors checkpoint; also refuses a tensor the model uses
    /// that is not stored as a float type (an I32 weight is named as such, not reported as missing).
    pub fn check_checkpoint(&self, ckpt: &Checkpoint) -> Result<()> {
        let names = ckpt.names();
        self.check_shapes(ckpt.path(), &names, &|n| ckpt.info(n).ok().map(|(_, s)| s.to_vec()))?;
        for name in names {
            let (dtype, _) = ckpt.info(name)?;
            if !dtype.is_float() && !is_known_unused(self.architecture, name) {
                return Err(Error::Tensor {
                    file: display(ckpt.file_of(name)?),
                    tensor: name.to_string(),
                    msg: format!("is {dtype}; rime needs a float type (F32, F16, BF16 or F64) for a model weight"),
                });
            }
        }
        Ok(())
    }

    fn shape_reason(&self, name: &str) -> String {
        let c = self;
        if name.contains("word_embeddings") || name.contains("embed_tokens") || name == "lm_head.weight" {
            format!("vocab_size {}, hidden_size {}", c.vocab_size, c.hidden_size)
        } else if name.contains("position_embeddings") {
            format!("max_position_embeddings {}, hidden_size {}", c.max_position_embeddings, c.hidden_size)
        } else if name.contains("token_type") {
            format!("type_vocab_size {}, hidden_size {}", c.type_vocab_size, c.hidden_size)
        } else if name.contains("q_norm.") || name.contains("k_norm.") {
            format!("head_dim {}", c.head_dim())
        } else if name.contains("q_proj") || name.contains("o_proj") {
            format!(
                "num_attention_heads {} × head_dim {}, hidden_size {}",
                c.num_attention_heads,
                c.head_dim(),
                c.hidden_size
            )
        } else if name.contains("k_proj") || name.contains("v_proj") {
            format!(
                "num_key_value_heads {} × head_dim {}, hidden_size {}",
                c.num_key_value_heads,
                c.head_dim(),
                c.hidden_size
            )
        } else if name.contains("intermediate") || name.contains("mlp") || name.contains("output.dense") {
            format!("intermediate_size {}, hidden_size {}", c.intermediate_size, c.hidden_size)
        } else {
            format!("hidden_size {}", c.hidden_size)
        }
    }
}

/// Checkpoint tensors that rime's models do not read by design, so their presence is no error: BERT's pooler,
/// position-id buffer, pre-training heads (`cls.*`) and task heads (`classifier.*`) of `BertFor...`
/// checkpoints; Llama's cached rotary frequencies (`*.rotary_emb.inv_freq`, recomputed from `rope_theta`).
pub fn is_known_unused(architecture: Architecture, name: &str) -> bool {
    match architecture {
        Architecture::Bert => {
            let n = name.strip_prefix("bert.").unwrap_or(name);
            n.starts_with("pooler.")
                || n == "embeddings.position_ids"
                || name.starts_with("cls.")
                || name.starts_with("classifier.")
        }
        Architecture::Llama | Architecture::Gemma3 => name.ends_with(".rotary_emb.inv_freq"),
    }
}

/// BERT activations rime computes: `gelu` (erf form) and the tanh form under its two Hugging Face names.
pub const BERT_ACTIVATIONS: [&str; 3] = ["gelu", "gelu_new", "gelu_pytorch_tanh"];

/// Refuses config fields that change the model in ways rime does not implement (instead of computing another
/// model silently): an activation other than the ones the builder computes, relative position embeddings, a
/// BERT decoder or cross-attention, Llama rope scaling, projection biases or a head size apart from
/// hidden_size / num_attention_heads.
fn refuse_unimplemented(
    obj: &serde_json::Map<String, Value>,
    architecture: Architecture,
    hidden_act: &str,
    head_dim: usize,
    cfg_err: &dyn Fn(&str, String) -> Error,
) -> Result<()> {
    let is_true = |k: &str| obj.get(k) == Some(&Value::Bool(true));
    match architecture {
        Architecture::Bert => {
            if !BERT_ACTIVATIONS.contains(&hidden_act) {
                return Err(cfg_err(
                    "hidden_act",
                    format!("`{hidden_act}` is not implemented; rime's BERT computes {BERT_ACTIVATIONS:?}"),
                ));
            }
            match obj.get("position_embedding_type") {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) if s == "absolute" => {}
                Some(v) => {
                    return Err(cfg_err(
                        "position_embedding_type",
                        format!("{v} is not implemented; rime's BERT uses absolute positions"),
                    ))
                }
            }
            for k in ["is_decoder", "add_cross_attention"] {
                if is_true(k) {
                    return Err(cfg_err(k, "true is not implemented; rime's BERT is a bidirectional encoder".into()));
                }
            }
        }
        Architecture::Llama => {
            if hidden_act != "silu" {
                return Err(cfg_err(
                    "hidden_act",
                    format!("`{hidden_act}` is not implemented; rime's Llama computes silu"),
                ));
            }
            for k in ["attention_bias", "mlp_bias"] {
                if is_true(k) {
                    return Err(cfg_err(k, "true is not implemented; rime's Llama projections have no bias".into()));
                }
            }
            refuse_rope_scaling(obj.get("rope_scaling"), cfg_err)?;
            if let Some(v) = obj.get("head_dim").filter(|v| !v.is_null()) {
                if v.as_u64() != Some(head_dim as u64) {
                    return Err(cfg_err(
                        "head_dim",
                        format!(
                            "{v} differs from hidden_size / num_attention_heads = {head_dim}, which rime's Llama uses"
                        ),
                    ));
                }
            }
        }
        Architecture::Gemma3 => {
            return Err(cfg_err("model_type", "gemma3 is read from GGUF files only".into()));
        }
    }
    Ok(())
}

/// `rope_scaling`: absent, null or the `default` kind; every other kind (linear, dynamic, yarn, llama3...)
/// changes the positions in a way rime's rotary kernel does not compute.
fn refuse_rope_scaling(v: Option<&Value>, cfg_err: &dyn Fn(&str, String) -> Error) -> Result<()> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(()) };
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str);
    if kind == Some("default") {
        return Ok(());
    }
    Err(cfg_err("rope_scaling", format!("{v} is not implemented; rime's Llama applies unscaled rotary positions")))
}
