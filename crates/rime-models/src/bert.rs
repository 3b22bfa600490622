//! BERT encoder (MiniLM and friends): absolute positions, token types, erf GELU, post-LayerNorm.
//! Parameter names are those of Hugging Face `BertModel` (`embeddings.word_embeddings.weight`,
//! `encoder.layer.N.attention.self.query.weight`, ...), optionally under a prefix such as `bert.`.

use rime_graph::{Error, Graph, ParamStore, Result, Var};
use rime_kernels::DType;

use crate::{LinearHook, VirtualTokens};

#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub type_vocab: usize,
    pub eps: f32,
    /// `gelu` (erf) or `gelu_new`/`gelu_pytorch_tanh` (tanh form).
    pub gelu_tanh: bool,
}

/// The per-step inputs of an encoder graph, by name.
pub const INPUT_IDS: &str = "input_ids";
pub const TOKEN_TYPE_IDS: &str = "token_type_ids";
pub const POSITION_IDS: &str = "position_ids";
pub const ATTENTION_MASK: &str = "attention_mask";
/// Mean-pooling weights [B, 1, T]: mask / number of real tokens (zero on virtual prompt tokens).
pub const POOL_WEIGHTS: &str = "pool_weights";

/// Handles of a built encoder.
pub struct Encoder {
    /// [B, T, C]
    pub last_hidden: Var,
    /// [B, C], mask-weighted mean over tokens (sentence-transformers pooling, before normalisation)
    pub pooled: Var,
    /// [B, T, C] per depth: the embeddings' output (index 0), then each layer's output (index l + 1; the last
    /// is `last_hidden`). Ladder side-tuning reads them.
    pub hidden_states: Vec<Var>,
}

fn p(g: &mut Graph, store: &ParamStore, prefix: &str, name: &str) -> Result<Var> {
    g.param(store, &format!("{prefix}{name}"))
}

/// Build the encoder for a batch of `b` sequences of `t` tokens. With virtual tokens (see
/// [`LinearHook::virtual_tokens`]) the inputs other than `input_ids` cover them too: token types, positions
/// and pooling weights [B, prompt + T], the attention mask [B, prefix + prompt + T] (see [`virtual_inputs`]).
pub fn build(
    g: &mut Graph,
    store: &ParamStore,
    cfg: &BertConfig,
    prefix: &str,
    b: usize,
    t: usize,
    hook: &dyn LinearHook,
) -> Result<Encoder> {
    let vt = hook.virtual_tokens();
    if t + vt.offset() > cfg.max_positions {
        return Err(Error::Invalid(if vt.offset() == 0 {
            format!("sequence length {t} exceeds max_position_embeddings {}", cfg.max_positions)
        } else {
            format!(
                "{} virtual tokens + sequence length {t} = {} exceeds max_position_embeddings {}",
                vt.offset(),
                t + vt.offset(),
                cfg.max_positions
            )
        }));
    }
    if !cfg.hidden.is_multiple_of(cfg.heads) {
        return Err(Error::Invalid(format!(
            "hidden_size {} is not a multiple of num_attention_heads {}",
            cfg.hidden, cfg.heads
        )));
    }
    let (c, nh) = (cfg.hidden, cfg.heads);
    let hs = c / nh;
    // tx: rows through the encoder (prompt + real tokens); s: keys per layer (prefix + tx).
    let tx = vt.prompt + t;
    let s = vt.prefix + tx;
    let ids = g.input(INPUT_IDS, &[b, t], DType::U32);
    let tt = g.input(TOKEN_TYPE_IDS, &[b, tx], DType::U32);
    let pos = g.input(POSITION_IDS, &[b, tx], DType::U32);
    let mask = g.input(ATTENTION_MASK, &[b, s], DType::F32);
    let pool_w = g.input(POOL_WEIGHTS, &[b, 1, tx], DType::F32);

    let we = p(g, store, prefix, "embeddings.word_embeddings.weight")?;
    let pe = p(g, store, prefix, "embeddings.position_embeddings.weight")?;
    let te = p(g, store, prefix, "embeddings.token_type_embeddings.weight")?;
    let e1 = g.embedding(ids, we)?;
    let e1 = hook.input_embeddings(g, store, e1)?;
    if g.shape(e1) != [b, tx, c] {
        return Err(Error::Invalid(format!("input embeddings {:?}, expected [{b}, {tx}, {c}]", g.shape(e1))));
    }
    let e2 = g.embedding(pos, pe)?;
    let e3 = g.embedding(tt, te)?;
    let e = g.add(e1, e2)?;
    let e = g.add(e, e3)?;
    let lg = p(g, store, prefix, "embeddings.LayerNorm.weight")?;
    let lb = p(g, store, prefix, "embeddings.LayerNorm.bias")?;
    let mut x = g.layernorm(e, lg, lb, cfg.eps)?;
    let mut hidden_states = vec![x];

    for l in 0..cfg.layers {
        let base = format!("encoder.layer.{l}.");
        let lin = |g: &mut Graph, x: Var, m: &str| -> Result<Var> {
            let module = format!("{base}{m}");
            let w = p(g, store, prefix, &format!("{module}.weight"))?;
            let bias = p(g, store, prefix, &format!("{module}.bias"))?;
            hook.linear(g, store, &format!("{prefix}{module}"), x, w, Some(bias))
        };
        let q = lin(g, x, "attention.self.query")?;
        let k = lin(g, x, "attention.self.key")?;
        let v = lin(g, x, "attention.self.value")?;
        let (k, v) = hook.attention_kv(g, store, l, k, v)?;
        let q4 = g.reshape(q, &[b, tx, nh, hs])?;
        let k4 = g.reshape(k, &[b, s, nh, hs])?;
        let v4 = g.reshape(v, &[b, s, nh, hs])?;
        let a = g.attention(q4, k4, v4, Some(mask), false, 1.0 / (hs as f32).sqrt())?;
        let a = g.reshape(a, &[b, tx, c])?;
        let o = lin(g, a, "attention.output.dense")?;
        let o = hook.block_output(g, store, l, "attention", x, o)?;
        let r = g.add(o, x)?;
        let ln_w = p(g, store, prefix, &format!("{base}attention.output.LayerNorm.weight"))?;
        let ln_b = p(g, store, prefix, &format!("{base}attention.output.LayerNorm.bias"))?;
        let x1 = g.layernorm(r, ln_w, ln_b, cfg.eps)?;
        let i = lin(g, x1, "intermediate.dense")?;
        let i = g.gelu(i, cfg.gelu_tanh);
        let i = hook.ffn_activation(g, store, l, i)?;
        let o2 = lin(g, i, "output.dense")?;
        let o2 = hook.block_output(g, store, l, "ffn", x1, o2)?;
        let r2 = g.add(o2, x1)?;
        let ln_w = p(g, store, prefix, &format!("{base}output.LayerNorm.weight"))?;
        let ln_b = p(g, store, prefix, &format!("{base}output.LayerNorm.bias"))?;
        x = g.layernorm(r2, ln_w, ln_b, cfg.eps)?;
        hidden_states.push(x);
    }
    let pooled = g.matmul(pool_w, x)?; // [B, 1, C]
    let pooled = g.reshape(pooled, &[b, c])?;
    Ok(Encoder { last_hidden: x, pooled, hidden_states })
}

/// Every parameter of `BertModel` for this config, Hugging Face names and PyTorch shapes, in a fixed order
/// (embeddings, then per layer the six linears' weight and bias, then the two LayerNorms). Random-weight
/// models for tests and benchmarks fill these; a checkpoint's tensors can be checked against them.
pub fn param_shapes(cfg: &BertConfig) -> Vec<(String, Vec<usize>)> {
    let (c, f) = (cfg.hidden, cfg.intermediate);
    let mut v: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![cfg.vocab, c]),
        ("embeddings.position_embeddings.weight".into(), vec![cfg.max_positions, c]),
        ("embeddings.token_type_embeddings.weight".into(), vec![cfg.type_vocab, c]),
        ("embeddings.LayerNorm.weight".into(), vec![c]),
        ("embeddings.LayerNorm.bias".into(), vec![c]),
    ];
    for l in 0..cfg.layers {
        let p = format!("encoder.layer.{l}.");
        for (m, out_f, in_f) in [
            ("attention.self.query", c, c),
            ("attention.self.key", c, c),
            ("attention.self.value", c, c),
            ("attention.output.dense", c, c),
            ("intermediate.dense", f, c),
            ("output.dense", c, f),
        ] {
            v.push((format!("{p}{m}.weight"), vec![out_f, in_f]));
            v.push((format!("{p}{m}.bias"), vec![out_f]));
        }
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            v.push((format!("{p}{ln}.weight"), vec![c]));
            v.push((format!("{p}{ln}.bias"), vec![c]));
        }
    }
    v
}

/// Per-step inputs for a batch already tokenized and padded to `t`: ids, token types and the 0/1 mask,
/// row-major [B, T]. Returns (position_ids, attention mask as f32, pooling weights).
pub fn aux_inputs(mask: &[u32], b: usize, t: usize) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
    let pos: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
    let maskf: Vec<f32> = mask.iter().map(|&m| if m != 0 { 1.0 } else { 0.0 }).collect();
    let mut pool = vec![0f32; b * t];
    for r in 0..b {
        let n: f32 = maskf[r * t..(r + 1) * t].iter().sum();
        // sentence-transformers clamps the token count at 1e-9
        for j in 0..t {
            pool[r * t + j] = maskf[r * t + j] / n.max(1e-9);
        }
    }
    (pos, maskf, pool)
}

/// Per-step inputs of an encoder with virtual tokens, from a batch tokenized and padded to `t` (types and
/// the 0/1 mask row-major [B, T]). Returns (token types [B, prompt+T]: zeros in front, positions [B, prompt+T]
/// counting from `prefix`, attention mask [B, prefix+prompt+T]: ones in front, pooling weights
/// [B, prompt+T]: the mean over the real tokens only). With no virtual tokens this is [`aux_inputs`].
pub fn virtual_inputs(
    types: &[u32],
    mask: &[u32],
    b: usize,
    t: usize,
    vt: VirtualTokens,
) -> (Vec<u32>, Vec<u32>, Vec<f32>, Vec<f32>) {
    let (_, maskf, pool) = aux_inputs(mask, b, t);
    let (np, nk) = (vt.prompt, vt.prefix + vt.prompt);
    let te = np + t;
    let mut tt = Vec::with_capacity(b * te);
    let mut m = Vec::with_capacity(b * (nk + t));
    let mut pw = Vec::with_capacity(b * te);
    for r in 0..b {
        tt.extend(std::iter::repeat_n(0u32, np).chain(types[r * t..(r + 1) * t].iter().copied()));
        m.extend(std::iter::repeat_n(1f32, nk).chain(maskf[r * t..(r + 1) * t].iter().copied()));
        pw.extend(std::iter::repeat_n(0f32, np).chain(pool[r * t..(r + 1) * t].iter().copied()));
    }
    let pos: Vec<u32> = (0..b).flat_map(|_| (vt.prefix as u32)..(vt.prefix + te) as u32).collect();
    (tt, pos, m, pw)
}
