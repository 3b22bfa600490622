//! Ladder side-tuning (LST; Sung, Cho and Bansal 2022) on a frozen BERT encoder, with a feature cache.
//!
//! **The side network.** With `H` the encoder's width, `L` its depth and `r` the [`LstConfig::reduction`], the
//! side network has width `d = H/r`, the encoder's number of attention heads (each `d/heads` wide; heads of 4
//! when that width is not a multiple of 4, which the attention kernel needs) and FFN width `F/r`. Its input is `s_0 = down_0(h_0)`, `h_0` the embeddings' output; then for every encoder
//! layer `l` that is not dropped ([`LstConfig::drop_layers`], the paper's layer dropping), with `h_{l+1}` the
//! output of encoder layer `l`:
//!
//! `u = μ_l · down_{l+1}(h_{l+1}) + (1 − μ_l) · s`, `μ_l = sigmoid(α_l / T)` (α_l starts at 0, T =
//! [`LstConfig::gate_temperature`], 0.1 as the paper), `s = side_layer_l(u)`,
//!
//! where `down_i` is a linear map H → d (torch.nn.Linear's default init, seeded) and `side_layer_l` has the
//! structure of a BERT layer (self-attention with the same mask, post-LN, GELU FFN) at width `d`.
//!
//! **Pruned init.** `side_layer_l` starts from encoder layer `l` pruned by the L1-norm rule: for each of the
//! six linear weights `W [out, in]`, the kept output rows are the `out'` rows with the largest L1 norm
//! `Σ_j |W[i, j]|` and the kept input columns the `in'` columns with the largest L1 norm `Σ_i |W[i, j]|`, each
//! chosen on `W` alone (ties to the lower index), kept in their original order (`out' × in'` is `d × d` for the
//! attention's four, `F/r × d` for `intermediate.dense`, `d × F/r` for `output.dense`). A bias keeps the
//! entries of its weight's kept rows; `attention.output.LayerNorm` keeps those of `attention.output.dense`'s
//! kept rows, `output.LayerNorm` those of `output.dense`'s ([`top_l1`], [`prune_layer`]).
//!
//! **Where the side output meets the task** (a choice; the paper feeds the side output to the LM head):
//! `h_L + up(s)`, `up` a linear d → H initialised to zero, then the mask-weighted mean pool and the linear head
//! of every classification method. Training starts at the frozen model with the head (the linear probe), and
//! no gradient enters the encoder: it runs forward-only, or not at all when its features are cached.
//!
//! **The feature cache.** The encoder is frozen, so each example's hidden states `h_i` (the ones the side
//! network reads: [`LstConfig::states`]) never change. They are computed once, rounded to f16, and kept in RAM
//! ([`FeatureCache::Memory`]) or in a file mapped into memory ([`FeatureCache::Dir`]; the page cache keeps it
//! in RAM when it fits), for the training and the eval split; every step and every evaluation then feeds the
//! side graph from the cache. Without a cache ([`FeatureCache::Off`]) each batch runs the encoder and its
//! states go through the same f16 rounding, so the side graph sees the same values either way (tested
//! bitwise). A cache folder holds `meta.json` (its fingerprint: the model files' hash, max_length, the states,
//! the width, the dtype, a hash of each split's token ids and labels) beside `train.f16` and `eval.f16`; it is
//! written atomically (data first, `meta.json` last, each through a temporary file and a rename), reused when
//! the fingerprint matches (a resumed run, a second run on the same data) and refused, naming what differs,
//! when it does not.
//!
//! **Departures from the other methods.** LST is not a rewrite of the encoder's linears (a `LinearHook`), so
//! it has its own task ([`LstTask`]) and its own evaluation graph ([`predict`], which the [`crate::Evaluator`]
//! calls for a `RIME_LST` adapter); the registry entry ([`crate::methods::lst`]) writes and reads its adapter
//! folder like any other method's. Only the mean-pool head is supported.
//!
//! [`side_output`] builds the side network on (cached) encoder states and returns its pooled output, for
//! losses other than classification (an embedding task).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use rand::{Rng, SeedableRng};
use rime_graph::{Executor, Graph, OptimConfig, ParamStore, Var};
use rime_io::dataset::{Dataset, LabelMap};
use rime_io::peft::{AdapterConfig, PeftAdapter};
use rime_kernels::{DType, Device};
use rime_models::bert::{self, BertConfig};
use serde_json::{json, Value};

use crate::classifier::{self, EvalMetrics};
use crate::classify::{encode, metrics_from_logits, open_model_as, ClassifySummary, Encoded};
use crate::config::{HeadKind, TrainConfig};
use crate::data::TextClassData;
use crate::methods::lst::Lst;
use crate::trainer::{bucket_by, Evaluation, Event, Metric, RunStats, Task};
use crate::{Error, Result};

/// The settings of ladder side-tuning.
#[derive(Debug, Clone, PartialEq)]
pub struct LstConfig {
    /// r: the side network is H/r wide (FFN F/r). Default 8.
    pub reduction: usize,
    /// Encoder layers (0-based) whose side layer, downsampler and gate are left out (the paper's layer
    /// dropping: e.g. every second layer). Default none.
    pub drop_layers: Vec<usize>,
    /// T in the gate μ = sigmoid(α / T). Default 0.1.
    pub gate_temperature: f32,
    /// The side network's attention heads; each must be a multiple of 4 wide (the attention kernel's head
    /// sizes). Default (None): the encoder's heads when each stays a multiple of 4 wide, else heads of 4
    /// (MiniLM at r = 8: 12 heads of 4).
    pub heads: Option<usize>,
    /// Dropout on each side layer's two sublayer outputs before their residual adds (BERT's hidden dropout),
    /// in training graphs only. Default 0.
    pub dropout: f32,
}

impl Default for LstConfig {
    fn default() -> Self {
        LstConfig { reduction: 8, drop_layers: vec![], gate_temperature: 0.1, heads: None, dropout: 0.0 }
    }
}

/// The side network's sizes.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SideDims {
    /// H, the encoder's width.
    pub hidden: usize,
    /// d = H / r.
    pub side: usize,
    pub heads: usize,
    /// F / r.
    pub intermediate: usize,
    /// L, the encoder's depth.
    pub layers: usize,
}

impl LstConfig {
    /// Refuse settings that make no side network for an encoder of `layers` layers.
    pub fn validate(&self, layers: usize) -> Result<()> {
        crate::config::at_least("reduction", self.reduction, 1)?;
        if !(self.gate_temperature.is_finite() && self.gate_temperature > 0.0) {
            return Err(Error::invalid("gate_temperature", format!("{}: must be above 0", self.gate_temperature)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid("dropout", format!("{}: expected a probability in [0, 1)", self.dropout)));
        }
        for (i, &l) in self.drop_layers.iter().enumerate() {
            if l >= layers {
                return Err(Error::invalid(
                    "drop_layers",
                    format!(
                        "has layer {l}; the model's layers are 0 to {} ({layers} layers)",
                        layers.saturating_sub(1)
                    ),
                ));
            }
            if self.drop_layers[..i].contains(&l) {
                return Err(Error::invalid("drop_layers", format!("has layer {l} twice")));
            }
        }
        Ok(())
    }

    /// The side network's sizes on the encoder `cfg`.
    pub fn dims(&self, cfg: &BertConfig) -> Result<SideDims> {
        self.validate(cfg.layers)?;
        let r = self.reduction;
        if !cfg.hidden.is_multiple_of(r) {
            return Err(Error::invalid(
                "reduction",
                format!("{r}: the model's width {} is not a multiple of it", cfg.hidden),
            ));
        }
        let side = cfg.hidden / r;
        if let Some(h) = self.heads {
            if h == 0 || !side.is_multiple_of(h) || !(side / h).is_multiple_of(4) {
                return Err(Error::invalid(
                    "heads",
                    format!(
                        "{h}: the side width {side} (the model's {} / reduction {r}) must split into {h} heads each a \
                         multiple of 4 wide (the attention kernel's head sizes){}",
                        cfg.hidden,
                        if side.is_multiple_of(4) {
                            format!("; heads that fit: {}", fitting_heads(side))
                        } else {
                            String::new()
                        }
                    ),
                ));
            }
        }
        // The encoder's heads when each stays a multiple of 4 wide (the attention kernel's head sizes), else
        // heads of 4.
        let heads = if let Some(h) = self.heads {
            h
        } else if side.is_multiple_of(cfg.heads) && (side / cfg.heads).is_multiple_of(4) {
            cfg.heads
        } else if side.is_multiple_of(4) {
            side / 4
        } else {
            return Err(Error::invalid(
                "reduction",
                format!(
                    "{r}: the side width {} / {r} = {side} splits neither into the model's {} attention heads nor into heads of 4 (attention head sizes are multiples of 4)",
                    cfg.hidden, cfg.heads
                ),
            ));
        };
        Ok(SideDims {
            hidden: cfg.hidden,
            side,
            heads,
            intermediate: (cfg.intermediate / r).max(1),
            layers: cfg.layers,
        })
    }

    /// The encoder layers that have a side layer, in order.
    pub fn kept_layers(&self, layers: usize) -> Vec<usize> {
        (0..layers).filter(|l| !self.drop_layers.contains(l)).collect()
    }

    /// The encoder states the side network reads (0: the embeddings' output, l + 1: layer l's), ascending:
    /// 0, each kept layer's output, and the last (the output adds `up(s)` to it).
    pub fn states(&self, layers: usize) -> Vec<usize> {
        let mut s: Vec<usize> = std::iter::once(0)
            .chain(self.kept_layers(layers).into_iter().map(|l| l + 1))
            .chain(std::iter::once(layers))
            .collect();
        s.sort_unstable();
        s.dedup();
        s
    }
}

/// The head counts that split `side` into heads a multiple of 4 wide, as a list for an error message.
fn fitting_heads(side: usize) -> String {
    (1..=side / 4)
        .filter(|h| side.is_multiple_of(*h) && (side / h).is_multiple_of(4))
        .map(|h| h.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Everything the side graph needs: the config, the sizes, the encoder's LayerNorm eps and GELU form, and the
/// store's name prefix (`bert.` or empty).
#[derive(Debug, Clone)]
pub struct LstSpec {
    pub cfg: LstConfig,
    pub dims: SideDims,
    pub eps: f32,
    pub gelu_tanh: bool,
    pub prefix: String,
    /// The head alone on the mean pool of the cached last state (the linear probe from the cache): no side
    /// network, saved as a `RIME_PROBE` adapter.
    pub head_only: bool,
}

impl LstSpec {
    pub fn new(cfg: LstConfig, bcfg: &BertConfig, prefix: &str) -> Result<LstSpec> {
        let dims = cfg.dims(bcfg)?;
        Ok(LstSpec {
            cfg,
            dims,
            eps: bcfg.eps,
            gelu_tanh: bcfg.gelu_tanh,
            prefix: prefix.to_string(),
            head_only: false,
        })
    }

    /// The linear probe on cached features: reads the last state only.
    pub fn probe(bcfg: &BertConfig, prefix: &str) -> LstSpec {
        let dims = SideDims { hidden: bcfg.hidden, side: 0, heads: 0, intermediate: 0, layers: bcfg.layers };
        LstSpec {
            cfg: LstConfig::default(),
            dims,
            eps: bcfg.eps,
            gelu_tanh: bcfg.gelu_tanh,
            prefix: prefix.to_string(),
            head_only: true,
        }
    }

    /// The store name of side-network tensor `rest` (`lst.layer.0.attention.self.query.weight`, ...).
    pub fn name(&self, rest: &str) -> String {
        format!("{}lst.{rest}", self.prefix)
    }

    pub fn states(&self) -> Vec<usize> {
        if self.head_only {
            return vec![self.dims.layers];
        }
        self.cfg.states(self.dims.layers)
    }
}

/// The graph input carrying encoder state `s` ([B, T, H]).
pub fn state_input(s: usize) -> String {
    format!("lst.h.{s}")
}

/// Side graphs are compiled per 16-token bucket (the encoder's are per 32): they are small, so twice as many
/// cost little memory, and a batch pads to within 15 tokens of its longest row instead of 31 (fine_foods with
/// length-grouped batches: 83 tokens a row on average instead of 89, against 76 unpadded).
const BUCKET: usize = 16;

const GATE_IN: &str = "rime.lst.gate_in";
const GATE_MU: &str = "rime.lst.mu";
const GATE_NMU: &str = "rime.lst.one_minus_mu";

/// The indices of the `keep` rows (`along_rows`) or columns of `w` [rows, cols] with the largest L1 norms
/// (ties to the lower index), ascending.
pub fn top_l1(w: &[f32], rows: usize, cols: usize, keep: usize, along_rows: bool) -> Vec<usize> {
    let n = if along_rows { rows } else { cols };
    let norms: Vec<f64> = (0..n)
        .map(|i| {
            if along_rows {
                w[i * cols..(i + 1) * cols].iter().map(|x| x.abs() as f64).sum()
            } else {
                (0..rows).map(|r| w[r * cols + i].abs() as f64).sum()
            }
        })
        .collect();
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]).then(a.cmp(&b)));
    idx.truncate(keep);
    idx.sort_unstable();
    idx
}

/// A side-layer tensor: (name relative to the layer, shape, values).
pub type PrunedTensor = (String, Vec<usize>, Vec<f32>);

/// The tensors of a side layer (names relative to the layer: `attention.self.query.weight`, ...) pruned from
/// encoder layer `layer` as the module doc says; `get` reads an encoder tensor by its name without prefix.
pub fn prune_layer(
    get: &mut dyn FnMut(&str) -> Result<Vec<f32>>,
    layer: usize,
    hidden: usize,
    intermediate: usize,
    d: &SideDims,
) -> Result<Vec<PrunedTensor>> {
    let base = format!("encoder.layer.{layer}.");
    let mut out = vec![];
    #[allow(clippy::too_many_arguments)]
    fn lin(
        get: &mut dyn FnMut(&str) -> Result<Vec<f32>>,
        out: &mut Vec<PrunedTensor>,
        base: &str,
        m: &str,
        out_f: usize,
        in_f: usize,
        ko: usize,
        ki: usize,
    ) -> Result<Vec<usize>> {
        let w = get(&format!("{base}{m}.weight"))?;
        let b = get(&format!("{base}{m}.bias"))?;
        if w.len() != out_f * in_f || b.len() != out_f {
            return Err(Error::Msg(format!(
                "{base}{m}: weight of {} values and bias of {}, expected [{out_f}, {in_f}] and [{out_f}]",
                w.len(),
                b.len()
            )));
        }
        let rows = top_l1(&w, out_f, in_f, ko, true);
        let cols = top_l1(&w, out_f, in_f, ki, false);
        let pw: Vec<f32> =
            rows.iter().flat_map(|&r| cols.iter().map(move |&c| (r, c))).map(|(r, c)| w[r * in_f + c]).collect();
        out.push((format!("{m}.weight"), vec![ko, ki], pw));
        out.push((format!("{m}.bias"), vec![ko], rows.iter().map(|&r| b[r]).collect()));
        Ok(rows)
    }
    let ln = |get: &mut dyn FnMut(&str) -> Result<Vec<f32>>, out: &mut Vec<_>, m: &str, rows: &[usize]| -> Result<()> {
        for part in ["weight", "bias"] {
            let v = get(&format!("{base}{m}.{part}"))?;
            if v.len() != hidden {
                return Err(Error::Msg(format!("{base}{m}.{part}: {} values, expected {hidden}", v.len())));
            }
            out.push((format!("{m}.{part}"), vec![rows.len()], rows.iter().map(|&r| v[r]).collect()));
        }
        Ok(())
    };
    let (h, f, s, fi) = (hidden, intermediate, d.side, d.intermediate);
    for m in ["attention.self.query", "attention.self.key", "attention.self.value"] {
        lin(get, &mut out, &base, m, h, h, s, s)?;
    }
    let ao = lin(get, &mut out, &base, "attention.output.dense", h, h, s, s)?;
    ln(get, &mut out, "attention.output.LayerNorm", &ao)?;
    lin(get, &mut out, &base, "intermediate.dense", f, h, fi, s)?;
    let o = lin(get, &mut out, &base, "output.dense", h, f, s, fi)?;
    ln(get, &mut out, "output.LayerNorm", &o)?;
    Ok(out)
}

/// The frozen constants of the gates (added once): `[1/T, 0]` and the two rows that spread μ and 1 − μ over
/// the side width.
pub fn add_constants(dev: &Device, store: &mut ParamStore, spec: &LstSpec) -> Result<()> {
    let d = spec.dims.side;
    let consts: [(&str, Vec<f32>, Vec<usize>); 3] = [
        (GATE_IN, vec![1.0 / spec.cfg.gate_temperature, 0.0], vec![1, 2]),
        (GATE_MU, (0..2 * d).map(|i| if i < d { 1.0 } else { 0.0 }).collect(), vec![2, d]),
        (GATE_NMU, (0..2 * d).map(|i| if i < d { 0.0 } else { 1.0 }).collect(), vec![2, d]),
    ];
    for (name, v, shape) in consts {
        match store.find(name) {
            Some(id) => dev.write_f32(&store.get(id).tensor, &v)?,
            None => {
                store.add_f32(dev, name, &v, &shape, false)?;
            }
        }
    }
    Ok(())
}

/// Add the side network (trainable) to a store holding the encoder: downsamplers, gates, pruned layers and the
/// zero upsampler; `get` reads the encoder's tensors (names without prefix). Returns a line describing it.
pub fn add_parameters(
    dev: &Device,
    store: &mut ParamStore,
    get: &mut dyn FnMut(&str) -> Result<Vec<f32>>,
    bcfg: &BertConfig,
    spec: &LstSpec,
    seed: u64,
) -> Result<String> {
    if spec.head_only {
        return Ok("probe: the head alone, on cached encoder features".into());
    }
    add_constants(dev, store, spec)?;
    let (h, d) = (spec.dims.hidden, spec.dims.side);
    let kept = spec.cfg.kept_layers(spec.dims.layers);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x15_7a11);
    let bound = 1.0 / (h as f32).sqrt();
    let mut n = 0usize;
    let mut add = |store: &mut ParamStore, name: String, v: &[f32], shape: &[usize]| -> Result<()> {
        n += v.len();
        store.add_f32(dev, &name, v, shape, true)?;
        Ok(())
    };
    for s in std::iter::once(0).chain(kept.iter().map(|l| l + 1)) {
        let w: Vec<f32> = (0..d * h).map(|_| rng.random_range(-bound..bound)).collect();
        let b: Vec<f32> = (0..d).map(|_| rng.random_range(-bound..bound)).collect();
        add(store, spec.name(&format!("down.{s}.weight")), &w, &[d, h])?;
        add(store, spec.name(&format!("down.{s}.bias")), &b, &[d])?;
    }
    for &l in &kept {
        add(store, spec.name(&format!("gate.{l}")), &[0.0], &[1, 1])?;
        for (m, shape, v) in prune_layer(get, l, bcfg.hidden, bcfg.intermediate, &spec.dims)? {
            add(store, spec.name(&format!("layer.{l}.{m}")), &v, &shape)?;
        }
    }
    add(store, spec.name("up.weight"), &vec![0.0; h * d], &[h, d])?;
    add(store, spec.name("up.bias"), &vec![0.0; h], &[h])?;
    Ok(format!(
        "lst: side network of {} layers at width {d} (reduction {}, {} heads, FFN {}), {n} parameters, gates at \
         temperature {}",
        kept.len(),
        spec.cfg.reduction,
        spec.dims.heads,
        spec.dims.intermediate,
        spec.cfg.gate_temperature
    ))
}

/// One side layer: a BERT layer at width d reading its tensors under `lst.layer.{l}.`.
#[allow(clippy::too_many_arguments)]
fn side_layer(
    g: &mut Graph,
    store: &ParamStore,
    spec: &LstSpec,
    l: usize,
    x: Var,
    mask: Var,
    b: usize,
    t: usize,
    dropout: f32,
) -> Result<Var> {
    let (d, nh) = (spec.dims.side, spec.dims.heads);
    let hs = d / nh;
    let base = spec.name(&format!("layer.{l}."));
    let lin = |g: &mut Graph, x: Var, m: &str| -> Result<Var> {
        let w = g.param(store, &format!("{base}{m}.weight"))?;
        let bias = g.param(store, &format!("{base}{m}.bias"))?;
        Ok(g.linear(x, w, Some(bias))?)
    };
    let ln = |g: &mut Graph, x: Var, m: &str| -> Result<Var> {
        let w = g.param(store, &format!("{base}{m}.weight"))?;
        let bias = g.param(store, &format!("{base}{m}.bias"))?;
        Ok(g.layernorm(x, w, bias, spec.eps)?)
    };
    let q = lin(g, x, "attention.self.query")?;
    let k = lin(g, x, "attention.self.key")?;
    let v = lin(g, x, "attention.self.value")?;
    let q4 = g.reshape(q, &[b, t, nh, hs])?;
    let k4 = g.reshape(k, &[b, t, nh, hs])?;
    let v4 = g.reshape(v, &[b, t, nh, hs])?;
    let a = g.attention(q4, k4, v4, Some(mask), false, 1.0 / (hs as f32).sqrt())?;
    let a = g.reshape(a, &[b, t, d])?;
    let o = lin(g, a, "attention.output.dense")?;
    // A seed per dropout site; the executor mixes in the step, so every step draws new masks.
    let o = g.dropout(o, dropout, 0x157d_0000 + 2 * l as u32);
    let r = g.add(o, x)?;
    let x1 = ln(g, r, "attention.output.LayerNorm")?;
    let i = lin(g, x1, "intermediate.dense")?;
    let i = g.gelu(i, spec.gelu_tanh);
    let o2 = lin(g, i, "output.dense")?;
    let o2 = g.dropout(o2, dropout, 0x157d_0001 + 2 * l as u32);
    let r2 = g.add(o2, x1)?;
    ln(g, r2, "output.LayerNorm")
}

/// Handles of a built side network.
pub struct SideOutput {
    /// [B, T, H]: h_L + up(s).
    pub last_hidden: Var,
    /// [B, H]: its mask-weighted mean over the tokens.
    pub pooled: Var,
}

/// Build the side network for `b` sequences of `t` tokens on the graph inputs [`state_input`]`(s)` ([B, T, H]
/// each, for `s` in [`LstSpec::states`]), `attention_mask` [B, T] and `pool_weights` [B, 1, T] (as the encoder
/// names them). The tensors are the store's ([`add_parameters`] or a loaded adapter). `dropout`: the side
/// layers' dropout probability (`spec.cfg.dropout` in a training graph, 0 in an evaluation one).
pub fn side_output(
    g: &mut Graph,
    store: &ParamStore,
    spec: &LstSpec,
    b: usize,
    t: usize,
    dropout: f32,
) -> Result<SideOutput> {
    let (h, d) = (spec.dims.hidden, spec.dims.side);
    let mut inputs = HashMap::new();
    for s in spec.states() {
        inputs.insert(s, g.input(&state_input(s), &[b, t, h], DType::F32));
    }
    let mask = g.input(bert::ATTENTION_MASK, &[b, t], DType::F32);
    let pool = g.input(bert::POOL_WEIGHTS, &[b, 1, t], DType::F32);
    if spec.head_only {
        let last = inputs[&spec.dims.layers];
        let pooled = g.matmul(pool, last)?;
        let pooled = g.reshape(pooled, &[b, h])?;
        return Ok(SideOutput { last_hidden: last, pooled });
    }
    let down = |g: &mut Graph, s: usize| -> Result<Var> {
        let w = g.param(store, &spec.name(&format!("down.{s}.weight")))?;
        let bias = g.param(store, &spec.name(&format!("down.{s}.bias")))?;
        Ok(g.linear(inputs[&s], w, Some(bias))?)
    };
    let mut x = down(g, 0)?;
    for l in spec.cfg.kept_layers(spec.dims.layers) {
        let dl = down(g, l + 1)?;
        let alpha = g.param(store, &spec.name(&format!("gate.{l}")))?;
        let gin = g.param(store, GATE_IN)?;
        let pair = g.matmul(alpha, gin)?; // [1, 2]: (α/T, 0)
        let sm = g.softmax(pair, None, false); // (μ, 1 − μ)
        let emu = g.param(store, GATE_MU)?;
        let enmu = g.param(store, GATE_NMU)?;
        let mu = g.matmul(sm, emu)?;
        let mu = g.reshape(mu, &[d])?;
        let nmu = g.matmul(sm, enmu)?;
        let nmu = g.reshape(nmu, &[d])?;
        let a = g.mul(dl, mu)?;
        let c = g.mul(x, nmu)?;
        let u = g.add(a, c)?;
        x = side_layer(g, store, spec, l, u, mask, b, t, dropout)?;
    }
    let uw = g.param(store, &spec.name("up.weight"))?;
    let ub = g.param(store, &spec.name("up.bias"))?;
    let up = g.linear(x, uw, Some(ub))?;
    let last = g.add(inputs[&spec.dims.layers], up)?;
    let pooled = g.matmul(pool, last)?;
    let pooled = g.reshape(pooled, &[b, h])?;
    Ok(SideOutput { last_hidden: last, pooled })
}

/// The classification graph of the side network for (b, t): side output → mean pool → head → cross-entropy.
pub struct SideExec {
    pub exec: Executor,
    pub logits: Var,
    pub loss: Var,
    pub pooled: Var,
    pub batch: usize,
    pub seq: usize,
}

/// Build [`SideExec`] (sharing the optimizer state of `donor`, another bucket's graph): a training graph with
/// the config's dropout when `optim` is given, else an evaluation graph without dropout.
pub fn build_side_exec(
    dev: &Device,
    store: &ParamStore,
    spec: &LstSpec,
    b: usize,
    t: usize,
    optim: Option<OptimConfig>,
    donor: Option<&Executor>,
) -> Result<SideExec> {
    let mut g = Graph::new();
    let dropout = if optim.is_some() { spec.cfg.dropout } else { 0.0 };
    let so = side_output(&mut g, store, spec, b, t, dropout)?;
    let hw = g.param(store, classifier::HEAD_WEIGHT)?;
    let hb = g.param(store, classifier::HEAD_BIAS)?;
    let logits = g.linear(so.pooled, hw, Some(hb))?;
    let labels = g.input("labels", &[b], DType::I32);
    let loss = g.cross_entropy(logits, labels, -100)?;
    let exec = Executor::new_sharing(dev, g, store, Some(loss), &[logits, so.pooled], optim, donor)?;
    Ok(SideExec { exec, logits, loss, pooled: so.pooled, batch: b, seq: t })
}

/// Feed a side graph of `rows` rows and `t` tokens ([`side_output`]): the state buffers (one [rows, t, H] per
/// state of [`LstSpec::states`], in order) and the 0/1 token mask [rows, t], with the mask and pool weights
/// derived from it.
pub fn feed_side_inputs(
    dev: &Device,
    ex: &Executor,
    spec: &LstSpec,
    bufs: &[Vec<f32>],
    mask: &[u32],
    rows: usize,
    t: usize,
) -> Result<()> {
    let (_, maskf, pool) = bert::aux_inputs(mask, rows, t);
    for (s, buf) in spec.states().iter().zip(bufs) {
        ex.feed_f32(dev, &state_input(*s), buf)?;
    }
    ex.feed_f32(dev, bert::ATTENTION_MASK, &maskf)?;
    ex.feed_f32(dev, bert::POOL_WEIGHTS, &pool)?;
    Ok(())
}

/// Per-example encoder states, f16, in one buffer: example `i` holds `states × len_i × H` values (state-major,
/// then token, then channel).
pub struct FeatureSet {
    /// The encoder states held per token, in order (a superset of what a run reads is fine).
    stored: Vec<usize>,
    lens: Vec<usize>,
    offsets: Vec<usize>,
    data: FeatureData,
}

enum FeatureData {
    Mem(Vec<u16>),
    Map(memmap2::Mmap),
}

impl FeatureSet {
    fn layout(lens: &[usize], per_token: usize) -> Vec<usize> {
        let mut off = Vec::with_capacity(lens.len() + 1);
        let mut acc = 0usize;
        off.push(0);
        for &l in lens {
            acc += l * per_token;
            off.push(acc);
        }
        off
    }

    /// Examples held.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Bytes of the f16 values.
    pub fn bytes(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0) * 2
    }

    /// The mean over example `i`'s tokens of encoder state `state` (width `h`), from the f16 values.
    pub fn mean_of(&self, i: usize, state: usize, h: usize) -> Result<Vec<f32>> {
        let s =
            self.stored.iter().position(|&x| x == state).ok_or_else(|| {
                Error::Msg(format!("feature cache: holds encoder states {:?}, not {state}", self.stored))
            })?;
        let mut ex = Vec::new();
        self.example_into(i, &mut ex)?;
        let len = self.lens[i];
        let mut out = vec![0f32; h];
        for j in 0..len {
            for (o, x) in out.iter_mut().zip(&ex[(s * len + j) * h..(s * len + j + 1) * h]) {
                *o += x;
            }
        }
        out.iter_mut().for_each(|o| *o /= len.max(1) as f32);
        Ok(out)
    }

    /// Example `i`'s values as f32 into `out` (resized); the conversion is half's slice conversion (F16C
    /// where the CPU has it).
    fn example_into(&self, i: usize, out: &mut Vec<f32>) -> Result<()> {
        if i + 1 >= self.offsets.len() {
            return Err(Error::Msg(format!(
                "feature cache: example {i} asked of a cache of {} examples",
                self.offsets.len().saturating_sub(1)
            )));
        }
        let (a, b) = (self.offsets[i], self.offsets[i + 1]);
        let bits: &[u16] = match &self.data {
            FeatureData::Mem(v) => &v[a..b],
            FeatureData::Map(m) => {
                // SAFETY: any two bytes are a valid u16; align_to hands back only the aligned middle, checked
                // whole below (the map is page-aligned and every offset even). The file is little-endian, as
                // the machines rime runs on.
                let (pre, mid, post) = unsafe { m[2 * a..2 * b].align_to::<u16>() };
                if !pre.is_empty() || !post.is_empty() {
                    return Err(Error::Msg("feature cache: a misaligned map".into()));
                }
                mid
            }
        };
        out.resize(b - a, 0.0);
        bits.reinterpret_cast::<f16>().convert_to_f32_slice(out);
        Ok(())
    }
}

/// Where the encoder's features are kept between steps.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum FeatureCache {
    /// No cache: every step and evaluation runs the encoder (its states rounded to f16 as the cache would).
    Off,
    /// In RAM (f16), for this run only.
    #[default]
    Memory,
    /// In files under this folder (f16, memory-mapped), reused by a later run or a resume when its
    /// fingerprint matches, refused when it does not.
    Dir(PathBuf),
}

/// The encoder, the side network and their graphs per length bucket (training and evaluation share them).
pub struct LstModel<'d> {
    pub dev: &'d Device,
    pub store: ParamStore,
    pub bcfg: BertConfig,
    pub spec: LstSpec,
    pub rows: usize,
    pub max_length: usize,
    pub optim: Option<OptimConfig>,
    backbone: HashMap<usize, (Executor, Vec<Var>)>,
    side: HashMap<usize, SideExec>,
    /// Evaluation graphs, built only when the training graphs have dropout (else those serve).
    eval_side: HashMap<usize, SideExec>,
}

impl<'d> LstModel<'d> {
    pub fn new(
        dev: &'d Device,
        store: ParamStore,
        bcfg: BertConfig,
        spec: LstSpec,
        rows: usize,
        max_length: usize,
    ) -> Self {
        LstModel {
            dev,
            store,
            bcfg,
            spec,
            rows,
            max_length,
            optim: None,
            backbone: HashMap::new(),
            side: HashMap::new(),
            eval_side: HashMap::new(),
        }
    }

    /// The optimizer of the training graphs built from now on; `rows` must be the rows this model was made for.
    pub fn set_optim(&mut self, optim: OptimConfig, rows: usize) -> Result<()> {
        if rows != self.rows {
            return Err(Error::Msg(format!("lst: compiled for {rows} rows, prepared for {}", self.rows)));
        }
        self.optim = Some(optim);
        Ok(())
    }

    /// The sequence bucket of a batch whose longest example has `longest` tokens (`longest` itself before a
    /// model is loaded).
    pub fn bucket_of(m: Option<&LstModel>, longest: usize) -> usize {
        bucket_by(longest, m.map_or(longest, |m| m.max_length), BUCKET)
    }

    /// The side graph of bucket `t` (built on first use, sharing the optimizer state).
    pub fn side(&mut self, t: usize) -> Result<&mut SideExec> {
        if !self.side.contains_key(&t) {
            let donor = self.side.values().next().map(|s| &s.exec);
            let se = build_side_exec(self.dev, &self.store, &self.spec, self.rows, t, self.optim.clone(), donor)?;
            self.side.insert(t, se);
        }
        Ok(self.side.get_mut(&t).expect("just inserted"))
    }

    /// The graph that evaluates bucket `t`: the training graph, or without dropout when that has it.
    fn eval_graph(&mut self, t: usize) -> Result<&mut SideExec> {
        if self.spec.cfg.dropout == 0.0 || self.optim.is_none() {
            return self.side(t);
        }
        if !self.eval_side.contains_key(&t) {
            let se = build_side_exec(self.dev, &self.store, &self.spec, self.rows, t, None, None)?;
            self.eval_side.insert(t, se);
        }
        Ok(self.eval_side.get_mut(&t).expect("just inserted"))
    }

    pub fn any_side(&self) -> Option<&SideExec> {
        self.side.values().next()
    }

    /// The encoder's states of examples `idx` of `enc` (at most `rows`), run as one batch padded to bucket
    /// `t`, each example's rounded to f16 in the [`FeatureSet`] layout.
    pub fn features(&mut self, enc: &Encoded, idx: &[usize], t: usize) -> Result<Vec<Vec<f16>>> {
        let (dev, b, h) = (self.dev, self.rows, self.bcfg.hidden);
        let states = self.spec.states();
        if !self.backbone.contains_key(&t) {
            let mut g = Graph::new();
            let e = bert::build(&mut g, &self.store, &self.bcfg, &self.spec.prefix, b, t, &rime_models::Plain)?;
            let outs: Vec<Var> = states.iter().map(|&s| e.hidden_states[s]).collect();
            let ex = Executor::new(dev, g, &self.store, None, &outs, None)?;
            self.backbone.insert(t, (ex, outs));
        }
        let (ex, outs) = self.backbone.get_mut(&t).expect("just inserted");
        let (ids, types, mask, _) = crate::classify::make_batch(enc, idx, b, t);
        let (pos, maskf, pool) = bert::aux_inputs(&mask, b, t);
        ex.feed_u32(dev, bert::INPUT_IDS, &ids)?;
        ex.feed_u32(dev, bert::TOKEN_TYPE_IDS, &types)?;
        ex.feed_u32(dev, bert::POSITION_IDS, &pos)?;
        ex.feed_f32(dev, bert::ATTENTION_MASK, &maskf)?;
        ex.feed_f32(dev, bert::POOL_WEIGHTS, &pool)?;
        ex.forward(dev)?;
        let read: Vec<Vec<f32>> = outs.iter().map(|&v| ex.read(dev, v)).collect::<Result<_, _>>()?;
        Ok(idx
            .iter()
            .enumerate()
            .map(|(r, &i)| {
                let len = enc.ids[i].len().min(t);
                let mut v = vec![f16::ZERO; read.len() * len * h];
                for (k, st) in read.iter().enumerate() {
                    v[k * len * h..(k + 1) * len * h].convert_from_f32_slice(&st[r * t * h..(r * t + len) * h]);
                }
                v
            })
            .collect())
    }

    /// The side graph's inputs for examples `idx` of `enc` (at most `rows`) in `rows` rows padded to bucket
    /// `t`: one buffer [rows, t, H] per state of [`LstSpec::states`] (in that order) and the 0/1 token mask
    /// [rows, t]; states from `cache`, or from the encoder (rounded to f16 as the cache is) when None.
    pub fn side_inputs(
        &mut self,
        enc: &Encoded,
        idx: &[usize],
        t: usize,
        cache: Option<&FeatureSet>,
    ) -> Result<(Vec<Vec<f32>>, Vec<u32>)> {
        let (b, h) = (self.rows, self.bcfg.hidden);
        if idx.len() > b {
            return Err(Error::Msg(format!("lst: a batch of {} examples in a graph of {b} rows", idx.len())));
        }
        let ns = self.spec.states().len();
        let mut bufs = vec![vec![0f32; b * t * h]; ns];
        let mut mask = vec![0u32; b * t];
        let fresh = match cache {
            Some(_) => None,
            None => Some(self.features(enc, idx, t)?),
        };
        let wanted = self.spec.states();
        // Where each state the graph reads sits among the states an example holds.
        let (held, pos): (usize, Vec<usize>) = match cache {
            Some(c) => {
                let pos = wanted
                    .iter()
                    .map(|s| {
                        c.stored.iter().position(|x| x == s).ok_or_else(|| {
                            Error::Msg(format!("feature cache: holds encoder states {:?}, not {s}", c.stored))
                        })
                    })
                    .collect::<Result<_>>()?;
                (c.stored.len(), pos)
            }
            None => (ns, (0..ns).collect()),
        };
        let mut ex = Vec::new();
        for (r, &i) in idx.iter().enumerate() {
            let len = enc.ids[i].len().min(t);
            match (&fresh, cache) {
                (Some(f), _) => {
                    ex.resize(f[r].len(), 0.0);
                    f[r].convert_to_f32_slice(&mut ex);
                }
                (None, Some(c)) => c.example_into(i, &mut ex)?,
                (None, None) => unreachable!("one of them is set"),
            }
            if ex.len() != held * len * h {
                return Err(Error::Msg(format!(
                    "feature cache: example {i} has {} values, expected {} ({held} states × {len} tokens × {h})",
                    ex.len(),
                    held * len * h
                )));
            }
            for (buf, &s) in bufs.iter_mut().zip(&pos) {
                buf[r * t * h..(r * t + len) * h].copy_from_slice(&ex[s * len * h..(s + 1) * len * h]);
            }
            mask[r * t..r * t + len].fill(1);
        }
        Ok((bufs, mask))
    }

    /// Feed examples `idx` of `enc` into the training graph of bucket `t`: states from `cache`, or from the
    /// encoder when None.
    pub fn feed(
        &mut self,
        enc: &Encoded,
        idx: &[usize],
        t: usize,
        cache: Option<&FeatureSet>,
    ) -> Result<&mut SideExec> {
        self.feed_graph(enc, idx, t, cache, false)
    }

    /// [`LstModel::feed`] into the training graph, or the evaluation graph when `eval`.
    fn feed_graph(
        &mut self,
        enc: &Encoded,
        idx: &[usize],
        t: usize,
        cache: Option<&FeatureSet>,
        eval: bool,
    ) -> Result<&mut SideExec> {
        let (bufs, mask) = self.side_inputs(enc, idx, t, cache)?;
        let mut labels = vec![-100i32; self.rows];
        for (r, &i) in idx.iter().enumerate() {
            labels[r] = enc.labels[i];
        }
        let (dev, rows, spec) = (self.dev, self.rows, self.spec.clone());
        let se = if eval { self.eval_graph(t)? } else { self.side(t)? };
        feed_side_inputs(dev, &se.exec, &spec, &bufs, &mask, rows, t)?;
        se.exec.feed_i32(dev, "labels", &labels)?;
        Ok(se)
    }

    /// The examples of `enc` in evaluation order: by length (stable), in batches of `rows`, each with its
    /// bucket. The feature cache is built in the same batches, so evaluation from the cache and from the
    /// encoder see the same values.
    pub fn batches(&self, enc: &Encoded) -> Vec<(Vec<usize>, usize)> {
        let mut order: Vec<usize> = (0..enc.ids.len()).collect();
        order.sort_by_key(|&i| enc.ids[i].len());
        order
            .chunks(self.rows)
            .map(|c| {
                let longest = c.iter().map(|&i| enc.ids[i].len()).max().unwrap_or(1);
                (c.to_vec(), bucket_by(longest, self.max_length, BUCKET))
            })
            .collect()
    }

    /// Logits [n, classes] over `enc`, in order (forward only).
    pub fn predict(&mut self, enc: &Encoded, cache: Option<&FeatureSet>) -> Result<Vec<f32>> {
        let classes = classifier::head_classes(&self.store)?;
        let mut logits = vec![0f32; enc.ids.len() * classes];
        let dev = self.dev;
        for (chunk, t) in self.batches(enc) {
            let se = self.feed_graph(enc, &chunk, t, cache, true)?;
            se.exec.forward(dev)?;
            let lg = se.exec.read(dev, se.logits)?;
            for (r, &i) in chunk.iter().enumerate() {
                logits[i * classes..(i + 1) * classes].copy_from_slice(&lg[r * classes..(r + 1) * classes]);
            }
        }
        Ok(logits)
    }

    /// The encoder's states of every example of `enc` into a sink, batch by batch ([`LstModel::batches`]).
    fn each_feature(&mut self, enc: &Encoded, sink: &mut dyn FnMut(usize, &[f16]) -> Result<()>) -> Result<()> {
        for (chunk, t) in self.batches(enc) {
            for (i, f) in chunk.iter().zip(self.features(enc, &chunk, t)?) {
                sink(*i, &f)?;
            }
        }
        Ok(())
    }

    fn per_token(&self) -> usize {
        self.spec.states().len() * self.bcfg.hidden
    }

    /// The feature set of `enc` in RAM.
    pub fn features_in_memory(&mut self, enc: &Encoded) -> Result<FeatureSet> {
        let lens: Vec<usize> = enc.ids.iter().map(|x| x.len()).collect();
        let offsets = FeatureSet::layout(&lens, self.per_token());
        let mut data = vec![0u16; offsets[lens.len()]];
        self.each_feature(enc, &mut |i, f| {
            data[offsets[i]..offsets[i + 1]].copy_from_slice(HalfFloatSliceExt::reinterpret_cast(f));
            Ok(())
        })?;
        Ok(FeatureSet { stored: self.spec.states(), lens, offsets, data: FeatureData::Mem(data) })
    }

    /// The feature set of `enc` written to `path` (through `path.tmp` and a rename) and mapped.
    fn features_to_file(&mut self, enc: &Encoded, path: &Path) -> Result<FeatureSet> {
        let lens: Vec<usize> = enc.ids.iter().map(|x| x.len()).collect();
        let offsets = FeatureSet::layout(&lens, self.per_token());
        let bytes = offsets[lens.len()] * 2;
        let tmp = path.with_extension("f16.tmp");
        let err = |e: std::io::Error| Error::Msg(format!("feature cache {}: {e}", tmp.display()));
        {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(err)?;
            f.set_len(bytes as u64).map_err(err)?;
            if bytes > 0 {
                // SAFETY: the file was just created by this process and is not resized while mapped.
                let mut m = unsafe { memmap2::MmapMut::map_mut(&f) }.map_err(err)?;
                self.each_feature(enc, &mut |i, f| {
                    let bits: &[u16] = f.reinterpret_cast();
                    for (d, x) in m[2 * offsets[i]..2 * offsets[i + 1]].chunks_exact_mut(2).zip(bits) {
                        d.copy_from_slice(&x.to_le_bytes());
                    }
                    Ok(())
                })?;
                m.flush().map_err(err)?;
            }
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, path).map_err(|e| Error::Msg(format!("feature cache {}: {e}", path.display())))?;
        map_features(path, self.spec.states(), lens, offsets)
    }
}

fn map_features(path: &Path, stored: Vec<usize>, lens: Vec<usize>, offsets: Vec<usize>) -> Result<FeatureSet> {
    let err = |e: std::io::Error| Error::Msg(format!("feature cache {}: {e}", path.display()));
    let f = std::fs::File::open(path).map_err(err)?;
    let want = offsets.last().copied().unwrap_or(0) as u64 * 2;
    let have = f.metadata().map_err(err)?.len();
    if have != want {
        return Err(Error::Msg(format!(
            "feature cache {}: {have} bytes, its meta.json implies {want} (a damaged cache: delete the folder)",
            path.display()
        )));
    }
    if want == 0 {
        return Ok(FeatureSet { stored, lens, offsets, data: FeatureData::Mem(vec![]) });
    }
    // SAFETY: the cache file is only ever replaced by rename, never written in place, while a run maps it.
    let m = unsafe { memmap2::Mmap::map(&f) }.map_err(err)?;
    Ok(FeatureSet { stored, lens, offsets, data: FeatureData::Map(m) })
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= b as u64;
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

/// A hash of the model folder's weights, config and tokenizer (`*.safetensors`, `config.json`,
/// `tokenizer.json`, by name and content), as 16 hex digits.
pub fn model_fingerprint(model: &Path) -> Result<String> {
    let rd = std::fs::read_dir(model).map_err(|e| Error::Msg(format!("{}: {e}", model.display())))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            n.ends_with(".safetensors") || n == "config.json" || n == "tokenizer.json"
        })
        .collect();
    files.sort();
    let mut h = FNV0;
    for p in files {
        let f = std::fs::File::open(&p).map_err(|e| Error::Msg(format!("{}: {e}", p.display())))?;
        fnv(&mut h, p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        if f.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
            continue;
        }
        // SAFETY: read-only map of a model file for hashing.
        let m = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::Msg(format!("{}: {e}", p.display())))?;
        // 8 bytes at a time: the hash is only a fingerprint.
        for c in m.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            h ^= u64::from_le_bytes(w);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    Ok(format!("{h:016x}"))
}

/// A hash of a split's token ids, token types and labels, with its size.
pub fn data_fingerprint(enc: &Encoded) -> String {
    let mut h = FNV0;
    for (i, (ids, ty)) in enc.ids.iter().zip(&enc.types).enumerate() {
        fnv(&mut h, &(ids.len() as u32).to_le_bytes());
        ids.iter().for_each(|x| fnv(&mut h, &x.to_le_bytes()));
        ty.iter().for_each(|x| fnv(&mut h, &x.to_le_bytes()));
        fnv(&mut h, &enc.labels[i].to_le_bytes());
    }
    format!("{}:{h:016x}", enc.ids.len())
}

/// The fingerprint a cache folder's meta.json records.
fn cache_meta(model_hash: &str, max_length: usize, spec: &LstSpec, train: &Encoded, eval: &Encoded) -> Value {
    cache_meta_sets(model_hash, max_length, spec, &[("train", train), ("eval", eval)])
}

/// The fingerprint of a cache folder holding the named `sets` (each kept in `<name>.f16`): the model's hash,
/// max_length, the width, the states and each set's [`data_fingerprint`] under its name.
pub fn cache_meta_sets(model_hash: &str, max_length: usize, spec: &LstSpec, sets: &[(&str, &Encoded)]) -> Value {
    let mut v = json!({
        "format": "rime-lst-feature-cache 1",
        "dtype": "f16",
        "model": model_hash,
        "max_length": max_length,
        "hidden": spec.dims.hidden,
        "states": spec.states(),
    });
    for (name, enc) in sets {
        v[*name] = json!(data_fingerprint(enc));
    }
    v
}

/// Open the cache in `dir` when its fingerprint matches `meta`, build it when there is none; refuse one whose
/// fingerprint differs, naming the field. Returns (train, eval, built).
fn open_or_build(
    m: &mut LstModel,
    dir: &Path,
    meta: &Value,
    train: &Encoded,
    eval: &Encoded,
) -> Result<(FeatureSet, FeatureSet, bool)> {
    let (mut v, built) = open_or_build_sets(m, dir, meta, &[("train", train), ("eval", eval)])?;
    let ev = v.pop().ok_or_else(|| Error::Msg("feature cache: no eval set".into()))?;
    let tr = v.pop().ok_or_else(|| Error::Msg("feature cache: no train set".into()))?;
    Ok((tr, ev, built))
}

/// [`open_or_build`] for any named sets (`meta` from [`cache_meta_sets`] on the same sets): each set's
/// features in `<dir>/<name>.f16`, in the order of `sets`. A folder whose meta.json lacks one of the names (a
/// cache of another task or data) is refused like one whose fingerprint differs. Returns (sets, built).
pub fn open_or_build_sets(
    m: &mut LstModel,
    dir: &Path,
    meta: &Value,
    sets: &[(&str, &Encoded)],
) -> Result<(Vec<FeatureSet>, bool)> {
    let meta_path = dir.join("meta.json");
    if meta_path.is_file() {
        let text =
            std::fs::read_to_string(&meta_path).map_err(|e| Error::Msg(format!("{}: {e}", meta_path.display())))?;
        let have: Value = serde_json::from_str(&text).map_err(|e| {
            Error::Msg(format!("{}: not JSON ({e}); a damaged cache: delete the folder", meta_path.display()))
        })?;
        if let Some(obj) = meta.as_object() {
            for (k, want) in obj {
                if k == "states" {
                    continue; // any superset of the states read serves (below)
                }
                if have.get(k) != Some(want) {
                    let what = match k.as_str() {
                        "model" => "model (its weights, config or tokenizer differ)".to_string(),
                        "train" => "training set".to_string(),
                        "eval" => "eval set".to_string(),
                        other if sets.iter().any(|(n, _)| *n == other) => format!("data set ({other})"),
                        other => other.to_string(),
                    };
                    return Err(Error::Msg(format!(
                        "feature cache {}: made for another {what} ({} there, {} here); not reused. Delete the \
                         folder or give another cache folder",
                        dir.display(),
                        have.get(k).map_or("nothing".into(), |v| v.to_string()),
                        want
                    )));
                }
            }
        }
        let stored: Vec<usize> = have["states"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_u64().map(|x| x as usize)).collect())
            .unwrap_or_default();
        if let Some(s) = m.spec.states().iter().find(|s| !stored.contains(s)) {
            return Err(Error::Msg(format!(
                "feature cache {}: holds encoder states {stored:?} and this run reads state {s} (another set of \
                 layers: drop_layers); not reused. Delete the folder or give another cache folder",
                dir.display()
            )));
        }
        let per = stored.len() * m.bcfg.hidden;
        let mut out = Vec::with_capacity(sets.len());
        for (name, enc) in sets {
            let lens: Vec<usize> = enc.ids.iter().map(|x| x.len()).collect();
            let off = FeatureSet::layout(&lens, per);
            out.push(map_features(&dir.join(format!("{name}.f16")), stored.clone(), lens, off)?);
        }
        return Ok((out, false));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::Msg(format!("feature cache {}: {e}", dir.display())))?;
    let mut out = Vec::with_capacity(sets.len());
    for (name, enc) in sets {
        out.push(m.features_to_file(enc, &dir.join(format!("{name}.f16")))?);
    }
    let tmp = dir.join("meta.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(meta).unwrap_or_default())
        .and_then(|_| std::fs::rename(&tmp, &meta_path))
        .map_err(|e| Error::Msg(format!("feature cache {}: {e}", meta_path.display())))?;
    Ok((out, true))
}

/// What [`LstTask::prepare`] loads.
struct Loaded<'d> {
    m: LstModel<'d>,
    train: Encoded,
    eval: Encoded,
    train_f: Option<FeatureSet>,
    eval_f: Option<FeatureSet>,
    labels: Vec<String>,
    trainable: usize,
    frozen: usize,
}

static TEMP_ADAPTERS: AtomicUsize = AtomicUsize::new(0);

/// Sequence classification by ladder side-tuning on a frozen encoder (see the module doc): the trainer drives
/// it as any [`Task`]; the adapter (`peft_type` `RIME_LST`) goes to `best/`.
pub struct LstTask<'d> {
    dev: &'d Device,
    model: PathBuf,
    cfg: LstConfig,
    cache: FeatureCache,
    train: TextClassData,
    eval: Option<TextClassData>,
    loaded: Option<Loaded<'d>>,
    /// The linear probe from the cache ([`LstTask::probe`]).
    head_only: bool,
}

impl<'d> LstTask<'d> {
    /// LST on `train`, evaluated on `eval` (or a seeded held-out part of `train`); features cached in RAM.
    pub fn new(
        dev: &'d Device,
        model: impl Into<PathBuf>,
        cfg: LstConfig,
        train: TextClassData,
        eval: Option<TextClassData>,
    ) -> Self {
        LstTask {
            dev,
            model: model.into(),
            cfg,
            cache: FeatureCache::Memory,
            train,
            eval,
            loaded: None,
            head_only: false,
        }
    }

    /// The linear probe (the head alone on the mean pool of the encoder's last state) trained from the feature
    /// cache: the encoder runs once per example, not once per epoch. Its features are the cache's f16 values, so
    /// it departs from [`crate::ClassifyTask`]'s probe by f16 rounding of the last state. Any LST cache folder of
    /// the same model and data serves it (it holds the last state). The adapter is a plain `RIME_PROBE` one.
    pub fn probe(
        dev: &'d Device,
        model: impl Into<PathBuf>,
        train: TextClassData,
        eval: Option<TextClassData>,
    ) -> Self {
        LstTask { head_only: true, ..LstTask::new(dev, model, LstConfig::default(), train, eval) }
    }

    /// Where the encoder's features are kept.
    pub fn with_cache(mut self, cache: FeatureCache) -> Self {
        self.cache = cache;
        self
    }

    fn loaded(&self) -> Result<&Loaded<'d>> {
        self.loaded.as_ref().ok_or_else(|| Error::Msg("the LST task is not prepared".into()))
    }

    fn loaded_mut(&mut self) -> Result<&mut Loaded<'d>> {
        self.loaded.as_mut().ok_or_else(|| Error::Msg("the LST task is not prepared".into()))
    }

    fn name(&self) -> &'static str {
        if self.head_only {
            "probe"
        } else {
            "lst"
        }
    }

    fn method(&self) -> Result<Lst> {
        let l = self.loaded()?;
        Ok(Lst { cfg: l.m.spec.cfg.clone(), dims: Some(l.m.spec.dims.clone()) })
    }

    fn splits(&self, cfg: &TrainConfig, on: &mut dyn FnMut(Event)) -> Result<(Dataset, Dataset)> {
        crate::classify::splits(&self.train, self.eval.as_ref(), cfg, on)
    }
}

impl<'d> Task<'d> for LstTask<'d> {
    type Summary = ClassifySummary;

    fn device(&self) -> &'d Device {
        self.dev
    }

    fn prepare(&mut self, cfg: &TrainConfig, on: &mut dyn FnMut(Event)) -> Result<Vec<usize>> {
        let dev = self.dev;
        if cfg.head != HeadKind::Mean {
            return Err(Error::invalid("head", "lst supports the mean-pool head only"));
        }
        let (train_ds, eval_ds) = self.splits(cfg, on)?;
        let labels = LabelMap::from_dataset(&train_ds)?;
        let (mut store, bcfg, prefix, tok) = open_model_as(dev, &self.model, cfg.max_length, cfg.weights.dtype()?)?;
        let spec = if self.head_only {
            LstSpec::probe(&bcfg, &prefix)
        } else {
            LstSpec::new(self.cfg.clone(), &bcfg, &prefix)?
        };
        let (train, trunc) = encode(&tok, &train_ds, Some(&labels))?;
        let (eval, trunc_e) = encode(&tok, &eval_ds, Some(&labels))?;
        if trunc + trunc_e > 0 {
            on(Event::Warn(format!(
                "{} of {} texts are longer than max_length {} tokens and were truncated",
                trunc + trunc_e,
                train.ids.len() + eval.ids.len(),
                cfg.max_length
            )));
        }
        classifier::init_head(dev, &mut store, bcfg.hidden, labels.len(), cfg.seed)?;
        let ckpt = rime_io::Checkpoint::open(&self.model)?;
        let mut get = |n: &str| -> Result<Vec<f32>> { Ok(ckpt.get_f32(&format!("{prefix}{n}"))?) };
        on(Event::Info(add_parameters(dev, &mut store, &mut get, &bcfg, &spec, cfg.seed)?));
        let trainable: usize = store.trainable().map(|(_, p)| p.tensor.numel()).sum();
        let frozen: usize = store.iter().filter(|(_, p)| !p.trainable).map(|(_, p)| p.tensor.numel()).sum();
        on(Event::Info(format!(
            "{}: {trainable} trainable parameters, {frozen} frozen ({:.3}%)",
            self.name(),
            100.0 * trainable as f64 / (trainable + frozen) as f64
        )));
        let mut m = LstModel::new(dev, store, bcfg, spec, cfg.rows(), cfg.max_length);
        let t0 = Instant::now();
        let n = train.ids.len() + eval.ids.len();
        let (train_f, eval_f) = match &self.cache {
            FeatureCache::Off => (None, None),
            FeatureCache::Memory => {
                let (a, b) = (m.features_in_memory(&train)?, m.features_in_memory(&eval)?);
                on(Event::Info(format!(
                    "feature cache: {n} examples' encoder states in RAM ({:.1} MB f16) in {:.1} s",
                    (a.bytes() + b.bytes()) as f64 / 1e6,
                    t0.elapsed().as_secs_f64()
                )));
                (Some(a), Some(b))
            }
            FeatureCache::Dir(dir) => {
                let meta = cache_meta(&model_fingerprint(&self.model)?, cfg.max_length, &m.spec, &train, &eval);
                let (a, b, built) = open_or_build(&mut m, dir, &meta, &train, &eval)?;
                on(Event::Info(format!(
                    "feature cache {}: {n} examples' encoder states ({:.1} MB f16) {} in {:.1} s",
                    dir.display(),
                    (a.bytes() + b.bytes()) as f64 / 1e6,
                    if built { "computed and written" } else { "reused (fingerprint matches)" },
                    t0.elapsed().as_secs_f64()
                )));
                (Some(a), Some(b))
            }
        };
        let lens = train.ids.iter().map(|x| x.len()).collect();
        let labels = labels.labels().to_vec();
        self.loaded = Some(Loaded { m, train, eval, train_f, eval_f, labels, trainable, frozen });
        Ok(lens)
    }

    fn compile(&mut self, optim: OptimConfig, rows: usize) -> Result<()> {
        self.loaded_mut()?.m.set_optim(optim, rows)
    }

    fn bucket(&self, longest: usize) -> usize {
        LstModel::bucket_of(self.loaded.as_ref().map(|l| &l.m), longest)
    }

    fn executor(&mut self, key: usize) -> Result<(&mut Executor, &ParamStore)> {
        let l = self.loaded_mut()?;
        l.m.side(key)?;
        let m = &mut l.m;
        Ok((&mut m.side.get_mut(&key).expect("just built").exec, &m.store))
    }

    fn feed(&mut self, idx: &[usize], key: usize) -> Result<(&mut Executor, Var)> {
        let l = self.loaded_mut()?;
        let se = l.m.feed(&l.train, idx, key, l.train_f.as_ref())?;
        Ok((&mut se.exec, se.loss))
    }

    fn any_executor(&self) -> Option<&Executor> {
        self.loaded.as_ref().and_then(|l| l.m.any_side()).map(|s| &s.exec)
    }

    fn store(&self) -> &ParamStore {
        match &self.loaded {
            Some(l) => &l.m.store,
            None => crate::classify::empty_store(),
        }
    }

    fn evaluate(&mut self) -> Result<Option<Evaluation>> {
        let l = self.loaded_mut()?;
        let logits = l.m.predict(&l.eval, l.eval_f.as_ref())?;
        let classes = l.labels.len().max(1);
        let m = metrics_from_logits(&logits, &l.eval.labels, classes);
        let values = vec![
            ("eval_accuracy".into(), m.accuracy),
            ("eval_macro_f1".into(), m.macro_f1),
            ("eval_loss".into(), m.loss),
        ];
        Ok(Some(Evaluation { score: m.accuracy, metrics: m, values }))
    }

    fn metric(&self) -> Metric {
        Metric { name: "accuracy", higher_is_better: true }
    }

    fn adapter(&self) -> Result<PeftAdapter> {
        let n = TEMP_ADAPTERS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("rime-lst-adapter-{}-{n}", std::process::id()));
        self.save_adapter(&dir)?;
        let ad = PeftAdapter::load(&dir);
        std::fs::remove_dir_all(&dir).ok();
        Ok(ad?)
    }

    fn save_adapter(&self, dir: &Path) -> Result<()> {
        let l = self.loaded()?;
        let base = self.model.display().to_string();
        if self.head_only {
            let probe = crate::methods::probe::Probe;
            return classifier::save_method_adapter(self.dev, &l.m.store, &probe, &base, &l.labels, dir);
        }
        classifier::save_method_adapter(self.dev, &l.m.store, &self.method()?, &base, &l.labels, dir)
    }

    fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let dev = self.dev;
        let (acfg, _) = classifier::load_adapter(dev, &mut self.loaded_mut()?.m.store, dir)?;
        if self.head_only {
            return Ok(());
        }
        check_adapter(&acfg, &self.loaded()?.m.spec, dir)
    }

    fn adapter_folder(&self) -> &'static str {
        "best"
    }

    fn title(&self) -> String {
        let data = self.train.source().and_then(|p| p.file_name()).map(|f| f.to_string_lossy().into_owned());
        format!(
            "{} · {} · {}",
            self.model.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            self.name(),
            data.unwrap_or_else(|| format!("{} texts", self.train.len()))
        )
    }

    fn summary(&self, run: &RunStats) -> ClassifySummary {
        let l = self.loaded.as_ref();
        let params = l.map_or((0, 0), |l| (l.trainable, l.frozen));
        ClassifySummary::of_run(self.name(), run, params, l.map(|l| l.labels.clone()).unwrap_or_default())
    }
}

/// Refuse an adapter whose LST settings differ from the run's (a resume into another configuration).
pub(crate) fn check_adapter(acfg: &AdapterConfig, spec: &LstSpec, dir: &Path) -> Result<()> {
    let (cfg, dims) = crate::methods::lst::read_config(acfg)?;
    // The head count is compared as resolved (in `dims`): the adapter records it, a run may leave it to the
    // default rule.
    let same = LstConfig { heads: spec.cfg.heads, ..cfg.clone() } == spec.cfg;
    if !same || dims != spec.dims {
        return Err(Error::Msg(format!(
            "{}: an LST adapter with {cfg:?} {dims:?}; this run has {:?} {:?}",
            dir.display(),
            spec.cfg,
            spec.dims
        )));
    }
    Ok(())
}

/// Logits [n, classes] of a loaded `RIME_LST` adapter (its tensors and head in `store`, beside the frozen
/// encoder) over `enc`, in order: the encoder runs in batches of `batch` sorted by length, its states rounded
/// to f16 as in training. What [`crate::Evaluator`] calls for an LST adapter.
#[allow(clippy::too_many_arguments)]
pub fn predict(
    dev: &Device,
    mut store: ParamStore,
    bcfg: &BertConfig,
    prefix: &str,
    acfg: &AdapterConfig,
    enc: &Encoded,
    batch: usize,
    max_length: usize,
) -> Result<Vec<f32>> {
    let (cfg, dims) = crate::methods::lst::read_config(acfg)?;
    let spec = LstSpec::new(cfg, bcfg, prefix)?;
    if spec.dims != dims {
        return Err(Error::Msg(format!(
            "this LST adapter was made for a side network {dims:?}; the model makes {:?} (another model?)",
            spec.dims
        )));
    }
    add_constants(dev, &mut store, &spec)?;
    let mut m = LstModel::new(dev, store, bcfg.clone(), spec, batch, max_length);
    m.predict(enc, None)
}

/// Metrics of logits against `enc`'s labels.
pub fn metrics(logits: &[f32], enc: &Encoded, classes: usize) -> EvalMetrics {
    metrics_from_logits(logits, &enc.labels, classes)
}

/// The linear-probe baseline ([`crate::classify::probe_baseline`]) with its features from the feature cache:
/// the mean over the tokens of the cached (f16) last encoder state instead of a forward pass per example, so a
/// second run (or an LST run's cache folder of the same model and data) skips the encoder. [`FeatureCache::Off`]
/// is the plain baseline. The numbers move by the f16 rounding of the last state.
pub fn probe_baseline_cached(
    dev: &Device,
    model: &Path,
    train: &TextClassData,
    eval: Option<&TextClassData>,
    cfg: &TrainConfig,
    cache: &FeatureCache,
) -> Result<EvalMetrics> {
    if *cache == FeatureCache::Off {
        return crate::classify::probe_baseline(dev, model, train, eval, cfg);
    }
    cfg.validate()?;
    let train_full = train.dataset("train")?;
    let (train_ds, eval_ds) = match eval {
        Some(e) => (train_full, e.dataset("eval")?),
        None => train_full.split(cfg.eval_fraction, cfg.seed)?,
    };
    let labels = LabelMap::from_dataset(&train_ds)?;
    let (store, bcfg, prefix, tok) = open_model_as(dev, model, cfg.max_length, cfg.weights.dtype()?)?;
    let (tr, _) = encode(&tok, &train_ds, Some(&labels))?;
    let (ev, _) = encode(&tok, &eval_ds, Some(&labels))?;
    let spec = LstSpec::probe(&bcfg, &prefix);
    let h = bcfg.hidden;
    let mut m = LstModel::new(dev, store, bcfg, spec, cfg.batch_size, cfg.max_length);
    let (ftr, fev) = match cache {
        FeatureCache::Dir(dir) => {
            let meta = cache_meta(&model_fingerprint(model)?, cfg.max_length, &m.spec, &tr, &ev);
            let (a, b, _) = open_or_build(&mut m, dir, &meta, &tr, &ev)?;
            (a, b)
        }
        _ => (m.features_in_memory(&tr)?, m.features_in_memory(&ev)?),
    };
    let last = m.spec.dims.layers;
    let pooled = |f: &FeatureSet| -> Result<Vec<f32>> {
        let mut v = Vec::with_capacity(f.len() * h);
        for i in 0..f.len() {
            v.extend(f.mean_of(i, last, h)?);
        }
        Ok(v)
    };
    let (xtr, xev) = (pooled(&ftr)?, pooled(&fev)?);
    let k = labels.len();
    let (w, b) = crate::classify::fit_logistic(&xtr, &tr.labels, h, k, 300, 1e-2, 1e-4);
    let logits: Vec<f32> = xev
        .chunks(h)
        .flat_map(|x| (0..k).map(|c| b[c] + (0..h).map(|j| w[c * h + j] * x[j]).sum::<f32>()).collect::<Vec<_>>())
        .collect();
    Ok(metrics_from_logits(&logits, &ev.labels, k))
}
