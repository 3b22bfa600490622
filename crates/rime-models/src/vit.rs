//! Vision transformers of the DINOv2 / ViT family: patch embedding (a stride-p convolution as unfold + matmul),
//! a CLS token, learned position embeddings interpolated to the input's patch grid, pre-norm blocks with optional
//! LayerScale, a GELU MLP and a final LayerNorm. Parameter names are those of Hugging Face `Dinov2Model`
//! (`embeddings.cls_token`, `embeddings.patch_embeddings.projection.weight`,
//! `encoder.layer.N.attention.attention.query.weight`, `encoder.layer.N.layer_scale1.lambda1`, `layernorm.weight`),
//! optionally under a prefix such as `backbone.`.
//!
//! The position table is stored for the pretraining grid (37×37 for DINOv2); [`interpolate_positions`] resizes
//! it on the CPU, bicubically as transformers does, once per input resolution, and [`add_positions`] puts the
//! result in the store beside the original under a name that carries the grid (`...position_embeddings@16x16`).

use rime_graph::{Error, Graph, ParamStore, Result, Var};
use rime_kernels::{DType, Device};

use crate::LinearHook;

#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub patch: usize,
    pub channels: usize,
    /// Side of the stored (pretraining) position grid: 37 for DINOv2 (518 / 14).
    pub grid: usize,
    pub eps: f32,
    /// Blocks scale their two branches by learned vectors (`layer_scale1.lambda1`, `layer_scale2.lambda1`).
    pub layer_scale: bool,
    /// `gelu` (erf) unless the config says a tanh form.
    pub gelu_tanh: bool,
}

impl VitConfig {
    /// DINOv2-S/14 (`facebook/dinov2-small`).
    pub fn dinov2_small() -> Self {
        VitConfig {
            hidden: 384,
            layers: 12,
            heads: 6,
            intermediate: 1536,
            patch: 14,
            channels: 3,
            grid: 37,
            eps: 1e-6,
            layer_scale: true,
            gelu_tanh: false,
        }
    }

    /// The patch grid (rows, columns) of an `h`×`w` image, or an error that says which sizes work.
    pub fn patch_grid(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let p = self.patch;
        if h == 0 || w == 0 || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            return Err(Error::Invalid(format!(
                "an input of {h}×{w} pixels is not a whole number of {p}×{p} patches; use sizes that are multiples \
                 of {p} (e.g. 224 = 16·{p})"
            )));
        }
        Ok((h / p, w / p))
    }
}

/// The per-batch inputs of a ViT graph, by name.
pub const PIXEL_VALUES: &str = "pixel_values";
pub const POSITION_IDS: &str = "position_ids";
/// Pooling weights [B, 1, 1 + N] that pick the CLS token, and [B, 1, 1 + N] that average the N patch tokens
/// (see [`pool_weights`]).
pub const CLS_WEIGHTS: &str = "cls_weights";
pub const MEAN_WEIGHTS: &str = "mean_weights";

/// Handles of a built ViT.
pub struct Vit {
    /// CLS + patch + position embeddings [B, 1 + N, C] (Hugging Face `hidden_states[0]`).
    pub embeddings: Var,
    /// The residual stream after each block [B, 1 + N, C] (`hidden_states[1..]`; with visual prompts
    /// [B, P + 1 + N, C], the prompt tokens first).
    pub layer_outputs: Vec<Var>,
    /// After the final LayerNorm [B, 1 + N, C] (`last_hidden_state`; prompt tokens first when there are any).
    pub last_hidden: Var,
    /// [B, C]: the CLS token of `last_hidden` (`pooler_output`).
    pub cls: Var,
    /// [B, C]: the mean of the patch tokens of `last_hidden`.
    pub patch_mean: Var,
}

fn p(g: &mut Graph, store: &ParamStore, prefix: &str, name: &str) -> Result<Var> {
    g.param(store, &format!("{prefix}{name}"))
}

/// The name of the position table interpolated to a `gh`×`gw` patch grid.
pub fn positions_name(prefix: &str, gh: usize, gw: usize) -> String {
    format!("{prefix}embeddings.position_embeddings@{gh}x{gw}")
}

/// Builds the ViT for `b` images of `h`×`w` pixels. The store must hold the position table for this
/// resolution ([`add_positions`]).
#[allow(clippy::too_many_arguments)]
pub fn build(
    g: &mut Graph,
    store: &ParamStore,
    cfg: &VitConfig,
    prefix: &str,
    b: usize,
    h: usize,
    w: usize,
    hook: &dyn LinearHook,
) -> Result<Vit> {
    let (gh, gw) = cfg.patch_grid(h, w)?;
    if !cfg.hidden.is_multiple_of(cfg.heads) {
        return Err(Error::Invalid(format!("hidden size {} is not a multiple of {} heads", cfg.hidden, cfg.heads)));
    }
    let (c, t) = (cfg.hidden, 1 + gh * gw);
    let x = g.input(PIXEL_VALUES, &[b, cfg.channels, h, w], DType::F32);
    let pos_ids = g.input(POSITION_IDS, &[b, t], DType::U32);
    let pw = p(g, store, prefix, "embeddings.patch_embeddings.projection.weight")?;
    let pb = p(g, store, prefix, "embeddings.patch_embeddings.projection.bias")?;
    let patches = g.patch_embed(x, pw, Some(pb), cfg.patch)?;
    let cls = p(g, store, prefix, "embeddings.cls_token")?;
    let cls = g.reshape(cls, &[1, c])?;
    let tokens = g.prepend(patches, cls)?;
    let table = g.param(store, &positions_name(prefix, gh, gw))?;
    let pos = g.embedding(pos_ids, table)?;
    let embeddings = g.add(tokens, pos)?;
    // Visual prompt tuning (VPT-shallow): prompt rows join the sequence after the embeddings, without position
    // embeddings. The blocks do not see token order, so they go in front ([prompts, CLS, patches]) and the
    // pooling weights skip them (see [`pool_weights`]).
    let prompts = hook.virtual_tokens().prompt;
    let x = hook.input_embeddings(g, store, embeddings)?;
    let t = t + prompts;
    if g.shape(x) != [b, t, c] {
        return Err(Error::Invalid(format!("input embeddings {:?}, expected [{b}, {t}, {c}]", g.shape(x))));
    }
    let cls_w = g.input(CLS_WEIGHTS, &[b, 1, t], DType::F32);
    let mean_w = g.input(MEAN_WEIGHTS, &[b, 1, t], DType::F32);

    let mut x = x;
    let mut layer_outputs = Vec::with_capacity(cfg.layers);
    for l in 0..cfg.layers {
        x = block(g, store, cfg, prefix, l, x, b, t, hook)?;
        layer_outputs.push(x);
    }
    let lw = p(g, store, prefix, "layernorm.weight")?;
    let lb = p(g, store, prefix, "layernorm.bias")?;
    let last_hidden = g.layernorm(x, lw, lb, cfg.eps)?;
    let cls = g.matmul(cls_w, last_hidden)?; // [B, 1, C]
    let cls = g.reshape(cls, &[b, c])?;
    let patch_mean = g.matmul(mean_w, last_hidden)?;
    let patch_mean = g.reshape(patch_mean, &[b, c])?;
    Ok(Vit { embeddings, layer_outputs, last_hidden, cls, patch_mean })
}

#[allow(clippy::too_many_arguments)]
fn block(
    g: &mut Graph,
    store: &ParamStore,
    cfg: &VitConfig,
    prefix: &str,
    l: usize,
    x: Var,
    b: usize,
    t: usize,
    hook: &dyn LinearHook,
) -> Result<Var> {
    let (c, nh) = (cfg.hidden, cfg.heads);
    let hs = c / nh;
    let base = format!("encoder.layer.{l}.");
    let lin = |g: &mut Graph, x: Var, m: &str| -> Result<Var> {
        let module = format!("{base}{m}");
        let w = p(g, store, prefix, &format!("{module}.weight"))?;
        let bias = p(g, store, prefix, &format!("{module}.bias"))?;
        hook.linear(g, store, &format!("{prefix}{module}"), x, w, Some(bias))
    };
    let norm = |g: &mut Graph, x: Var, n: &str| -> Result<Var> {
        let w = p(g, store, prefix, &format!("{base}{n}.weight"))?;
        let bias = p(g, store, prefix, &format!("{base}{n}.bias"))?;
        g.layernorm(x, w, bias, cfg.eps)
    };
    let scale = |g: &mut Graph, y: Var, n: &str| -> Result<Var> {
        if !cfg.layer_scale {
            return Ok(y);
        }
        let lambda = p(g, store, prefix, &format!("{base}{n}.lambda1"))?;
        g.mul(y, lambda)
    };
    let h = norm(g, x, "norm1")?;
    let q = lin(g, h, "attention.attention.query")?;
    let k = lin(g, h, "attention.attention.key")?;
    let v = lin(g, h, "attention.attention.value")?;
    let (k, v) = hook.attention_kv(g, store, l, k, v)?;
    let s = g.shape(k)[1];
    let q4 = g.reshape(q, &[b, t, nh, hs])?;
    let k4 = g.reshape(k, &[b, s, nh, hs])?;
    let v4 = g.reshape(v, &[b, s, nh, hs])?;
    let a = g.attention(q4, k4, v4, None, false, 1.0 / (hs as f32).sqrt())?;
    let a = g.reshape(a, &[b, t, c])?;
    let o = lin(g, a, "attention.output.dense")?;
    let o = hook.block_output(g, store, l, "attention", h, o)?;
    let o = scale(g, o, "layer_scale1")?;
    let x = g.add(o, x)?;
    let h = norm(g, x, "norm2")?;
    let f = lin(g, h, "mlp.fc1")?;
    let f = g.gelu(f, cfg.gelu_tanh);
    let f = hook.ffn_activation(g, store, l, f)?;
    let f = lin(g, f, "mlp.fc2")?;
    let f = hook.block_output(g, store, l, "ffn", h, f)?;
    let f = scale(g, f, "layer_scale2")?;
    g.add(f, x)
}

/// The position ids of `b` images with `t` tokens each: 0..t per image.
pub fn position_ids(b: usize, t: usize) -> Vec<u32> {
    (0..b).flat_map(|_| 0..t as u32).collect()
}

/// The two pooling inputs for `b` images of `t` tokens (CLS and patches) behind `prompts` prompt tokens:
/// ([`CLS_WEIGHTS`] one on the CLS token, [`MEAN_WEIGHTS`] 1/(t−1) on every patch token), each
/// [B, 1, prompts + t].
pub fn pool_weights(b: usize, t: usize, prompts: usize) -> (Vec<f32>, Vec<f32>) {
    let row = |f: &dyn Fn(usize) -> f32| (0..b).flat_map(|_| (0..prompts + t).map(f)).collect::<Vec<f32>>();
    let cls = row(&|i| if i == prompts { 1.0 } else { 0.0 });
    let mean = row(&|i| if i > prompts { 1.0 / (t - 1) as f32 } else { 0.0 });
    (cls, mean)
}

/// PyTorch's bicubic kernel (A = −0.75) weights of the four taps around a fractional offset `t` ∈ [0, 1).
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// For each output index along an axis of `inp` → `out` samples: the first tap and the four weights, as
/// `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` computes them from sizes (half-pixel
/// centres, no clamping of the source coordinate, taps clamped to the edge).
fn axis_taps(inp: usize, out: usize) -> Vec<(isize, [f64; 4])> {
    let scale = inp as f64 / out as f64;
    (0..out)
        .map(|d| {
            let src = (d as f64 + 0.5) * scale - 0.5;
            let f = src.floor();
            (f as isize - 1, cubic_weights(src - f))
        })
        .collect()
}

/// Resizes a position table [1 + g·g, C] (CLS row first, then the g×g grid row-major) to a gh×gw grid,
/// bicubically (transformers' `interpolate_pos_encoding` for DINOv2 and ViT); the CLS row is kept. Computed in
/// f64.
pub fn interpolate_positions(table: &[f32], g: usize, c: usize, gh: usize, gw: usize) -> Vec<f32> {
    assert_eq!(table.len(), (1 + g * g) * c, "position table is not [1 + {g}², {c}]");
    let mut out = Vec::with_capacity((1 + gh * gw) * c);
    out.extend_from_slice(&table[..c]);
    if (gh, gw) == (g, g) {
        out.extend_from_slice(&table[c..]);
        return out;
    }
    let grid = &table[c..];
    let at = |y: isize, x: isize, ch: usize| -> f64 {
        let (y, x) = (y.clamp(0, g as isize - 1) as usize, x.clamp(0, g as isize - 1) as usize);
        grid[(y * g + x) * c + ch] as f64
    };
    let (ty, tx) = (axis_taps(g, gh), axis_taps(g, gw));
    for &(y0, wy) in &ty {
        for &(x0, wx) in &tx {
            for ch in 0..c {
                let mut s = 0.0;
                for (i, wyi) in wy.iter().enumerate() {
                    let row: f64 =
                        wx.iter().enumerate().map(|(j, wxj)| wxj * at(y0 + i as isize, x0 + j as isize, ch)).sum();
                    s += wyi * row;
                }
                out.push(s as f32);
            }
        }
    }
    out
}

/// Puts the position table for a `gh`×`gw` grid in the store (frozen), computed from the stored
/// `embeddings.position_embeddings` [1, 1 + grid², C]; does nothing if it is there already.
pub fn add_positions(
    dev: &Device,
    store: &mut ParamStore,
    cfg: &VitConfig,
    prefix: &str,
    stored: &[f32],
    gh: usize,
    gw: usize,
) -> Result<()> {
    let name = positions_name(prefix, gh, gw);
    if store.find(&name).is_some() {
        return Ok(());
    }
    let c = cfg.hidden;
    if stored.len() != (1 + cfg.grid * cfg.grid) * c {
        return Err(Error::Invalid(format!(
            "{prefix}embeddings.position_embeddings has {} values; a {}×{} grid of width {c} plus CLS needs {}",
            stored.len(),
            cfg.grid,
            cfg.grid,
            (1 + cfg.grid * cfg.grid) * c
        )));
    }
    let table = interpolate_positions(stored, cfg.grid, c, gh, gw);
    store.add_f32(dev, &name, &table, &[1 + gh * gw, c], false)?;
    Ok(())
}

/// Every parameter of `Dinov2Model` for this config (without the unused `mask_token`), Hugging Face names and
/// shapes, in a fixed order.
pub fn param_shapes(cfg: &VitConfig) -> Vec<(String, Vec<usize>)> {
    let (c, f, pch) = (cfg.hidden, cfg.intermediate, cfg.patch);
    let mut v: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.cls_token".into(), vec![1, 1, c]),
        ("embeddings.position_embeddings".into(), vec![1, 1 + cfg.grid * cfg.grid, c]),
        ("embeddings.patch_embeddings.projection.weight".into(), vec![c, cfg.channels, pch, pch]),
        ("embeddings.patch_embeddings.projection.bias".into(), vec![c]),
    ];
    for l in 0..cfg.layers {
        let b = format!("encoder.layer.{l}.");
        let mut push = |n: &str, s: Vec<usize>| v.push((format!("{b}{n}"), s));
        push("norm1.weight", vec![c]);
        push("norm1.bias", vec![c]);
        for m in [
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
        ] {
            push(&format!("{m}.weight"), vec![c, c]);
            push(&format!("{m}.bias"), vec![c]);
        }
        if cfg.layer_scale {
            push("layer_scale1.lambda1", vec![c]);
            push("layer_scale2.lambda1", vec![c]);
        }
        push("norm2.weight", vec![c]);
        push("norm2.bias", vec![c]);
        push("mlp.fc1.weight", vec![f, c]);
        push("mlp.fc1.bias", vec![f]);
        push("mlp.fc2.weight", vec![c, f]);
        push("mlp.fc2.bias", vec![c]);
    }
    v.push(("layernorm.weight".into(), vec![c]));
    v.push(("layernorm.bias".into(), vec![c]));
    v
}

/// A ViT loaded into a store: its config, the prefix its tensors are under, the stored position table (kept
/// on the CPU to interpolate for new resolutions) and what was left out of the file.
pub struct VitModel {
    pub cfg: VitConfig,
    pub store: ParamStore,
    pub prefix: String,
    pub positions: Vec<f32>,
    /// Tensors of the file that are not part of the backbone (e.g. a task head), by name.
    pub ignored: Vec<String>,
}

/// Infers a DINOv2 config from tensor shapes (ONNX files carry no config.json). Heads are hidden / 64, as in
/// every DINOv2 size (S/14: 6, B/14: 12, L/14: 16, g/14: 24).
fn infer_config(shapes: &std::collections::HashMap<String, Vec<usize>>, prefix: &str) -> Result<VitConfig> {
    let get = |n: &str| -> Result<&Vec<usize>> {
        shapes
            .get(&format!("{prefix}{n}"))
            .ok_or_else(|| Error::Invalid(format!("no tensor `{prefix}{n}`: not a DINOv2/ViT checkpoint")))
    };
    let proj = get("embeddings.patch_embeddings.projection.weight")?.clone();
    let pos = get("embeddings.position_embeddings")?.clone();
    let fc1 = get("encoder.layer.0.mlp.fc1.weight")?.clone();
    let (hidden, channels, patch) = match proj[..] {
        [o, c, p1, p2] if p1 == p2 => (o, c, p1),
        _ => {
            return Err(Error::Invalid(format!(
                "{prefix}embeddings.patch_embeddings.projection.weight has shape {proj:?}, not [C, channels, p, p]"
            )))
        }
    };
    let cells = pos.get(1).copied().unwrap_or(0).saturating_sub(1);
    let grid = (cells as f64).sqrt().round() as usize;
    if pos.len() != 3 || grid * grid != cells || pos[2] != hidden {
        return Err(Error::Invalid(format!(
            "{prefix}embeddings.position_embeddings has shape {pos:?}, not [1, 1 + g², {hidden}]"
        )));
    }
    let layers = (0..).take_while(|l| shapes.contains_key(&format!("{prefix}encoder.layer.{l}.norm1.weight"))).count();
    let layer_scale = shapes.contains_key(&format!("{prefix}encoder.layer.0.layer_scale1.lambda1"));
    if !hidden.is_multiple_of(64) {
        return Err(Error::Invalid(format!("width {hidden} is not a multiple of DINOv2's head size 64")));
    }
    Ok(VitConfig {
        hidden,
        layers,
        heads: hidden / 64,
        intermediate: fc1[0],
        patch,
        channels,
        grid,
        eps: 1e-6,
        layer_scale,
        gelu_tanh: false,
    })
}

/// Loads the DINOv2 backbone of an ONNX file (Hugging Face names restored by [`rime_io::OnnxFile::hf_tensors`];
/// the backbone may sit under a prefix such as `backbone.`, which is found from the patch-embedding tensor).
/// Heads are hidden / 64 as in every DINOv2 size (ONNX files carry no config).
pub fn load_onnx(dev: &Device, path: &std::path::Path) -> Result<VitModel> {
    let io = |e: rime_io::Error| Error::Invalid(e.to_string());
    let file = rime_io::OnnxFile::open(path).map_err(io)?;
    let tensors = file.hf_tensors().map_err(io)?;
    let prefix = find_prefix(&tensors, path)?;
    let shapes = tensors.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect();
    let cfg = infer_config(&shapes, &prefix)?;
    from_tensors(dev, tensors, cfg, prefix, path)
}

/// Loads a Hugging Face DINOv2 folder (`config.json` with `model_type: dinov2`, safetensors weights, as
/// `facebook/dinov2-small` ships; `Dinov2Model` names, or under `dinov2.` for `Dinov2ForImageClassification`).
pub fn load_safetensors(dev: &Device, dir: &std::path::Path) -> Result<VitModel> {
    let io = |e: rime_io::Error| Error::Invalid(e.to_string());
    let cfg_path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&cfg_path).map_err(|e| Error::Invalid(format!("{}: {e}", cfg_path.display())))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: not JSON ({e})", cfg_path.display())))?;
    let ckpt = rime_io::Checkpoint::open(dir).map_err(io)?;
    let mut tensors = Vec::new();
    for name in ckpt.names() {
        let (_, shape) = ckpt.info(name).map_err(io)?;
        tensors.push((name.to_string(), shape.to_vec(), ckpt.get_f32(name).map_err(io)?));
    }
    let prefix = find_prefix(&tensors, dir)?;
    let cfg = config_from_json(&json, &cfg_path)?;
    from_tensors(dev, tensors, cfg, prefix, dir)
}

/// A DINOv2 config.json, refusing what rime does not compute (another model type, activation, SwiGLU MLP).
fn config_from_json(j: &serde_json::Value, path: &std::path::Path) -> Result<VitConfig> {
    let bad = |field: &str, msg: String| Error::Invalid(format!("{}: field `{field}`: {msg}", path.display()));
    let model_type = j["model_type"].as_str().unwrap_or("");
    if model_type != "dinov2" {
        return Err(bad(
            "model_type",
            format!("`{model_type}`: rime's ViT loader reads `dinov2` folders (or the ONNX file)"),
        ));
    }
    let num = |field: &str, default: Option<u64>| -> Result<usize> {
        match (j.get(field).and_then(|v| v.as_u64()), default) {
            (Some(v), _) if v > 0 && v < 1 << 20 => Ok(v as usize),
            (None, Some(d)) => Ok(d as usize),
            _ => Err(bad(
                field,
                format!("{}: expected a positive integer", j.get(field).unwrap_or(&serde_json::Value::Null)),
            )),
        }
    };
    let act = j["hidden_act"].as_str().unwrap_or("gelu");
    let gelu_tanh = match act {
        "gelu" => false,
        "gelu_new" | "gelu_pytorch_tanh" => true,
        other => return Err(bad("hidden_act", format!("`{other}`: rime computes gelu (erf) or its tanh forms"))),
    };
    if j["use_swiglu_ffn"].as_bool() == Some(true) {
        return Err(bad(
            "use_swiglu_ffn",
            "true: rime's DINOv2 has the GELU MLP (the giant SwiGLU variant is not supported)".into(),
        ));
    }
    let hidden = num("hidden_size", None)?;
    let (image, patch) = (num("image_size", Some(518))?, num("patch_size", Some(14))?);
    let mlp_ratio = j["mlp_ratio"].as_f64().unwrap_or(4.0);
    Ok(VitConfig {
        hidden,
        layers: num("num_hidden_layers", None)?,
        heads: num("num_attention_heads", None)?,
        intermediate: (hidden as f64 * mlp_ratio).round() as usize,
        patch,
        channels: num("num_channels", Some(3))?,
        grid: image / patch,
        eps: j["layer_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
        layer_scale: true,
        gelu_tanh,
    })
}

/// The prefix the backbone's tensors sit under, from the patch-embedding tensor's name.
fn find_prefix(tensors: &[(String, Vec<usize>, Vec<f32>)], path: &std::path::Path) -> Result<String> {
    let marker = "embeddings.patch_embeddings.projection.weight";
    Ok(tensors
        .iter()
        .find_map(|(n, _, _)| n.strip_suffix(marker))
        .ok_or_else(|| Error::Invalid(format!("{}: no `*{marker}`: not a DINOv2/ViT model", path.display())))?
        .to_string())
}

/// Uploads the backbone. Every tensor the config implies must be there with its shape, finite; other tensors
/// under the prefix are an error (except DINOv2's unused `mask_token`), tensors outside it (a task head) are
/// listed in [`VitModel::ignored`].
fn from_tensors(
    dev: &Device,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    cfg: VitConfig,
    prefix: String,
    path: &std::path::Path,
) -> Result<VitModel> {
    let io = |e: rime_io::Error| Error::Invalid(e.to_string());
    let want: std::collections::HashMap<String, Vec<usize>> =
        param_shapes(&cfg).into_iter().map(|(n, s)| (format!("{prefix}{n}"), s)).collect();
    let mut store = ParamStore::new();
    let (mut ignored, mut positions) = (Vec::new(), Vec::new());
    for (name, shape, data) in tensors {
        let Some(expected) = want.get(&name) else {
            let unused = name == format!("{prefix}embeddings.mask_token");
            if name.starts_with(&prefix) && !unused {
                return Err(Error::Invalid(format!(
                    "{}: tensor `{name}` is not part of a {}-layer ViT",
                    path.display(),
                    cfg.layers
                )));
            }
            ignored.push(name);
            continue;
        };
        if &shape != expected {
            return Err(Error::Invalid(format!(
                "{}: tensor `{name}` has shape {shape:?}, expected {expected:?}",
                path.display()
            )));
        }
        rime_io::check_finite(&path.display().to_string(), &name, &data).map_err(io)?;
        if name.ends_with("embeddings.position_embeddings") {
            positions = data.clone();
        }
        store.add_f32(dev, &name, &data, &shape, false)?;
    }
    if let Some(missing) = want.keys().find(|n| store.find(n).is_none()) {
        return Err(Error::Invalid(format!("{}: tensor `{missing}` is missing", path.display())));
    }
    Ok(VitModel { cfg, store, prefix, positions, ignored })
}

/// Loads a DINOv2 backbone from either form: a Hugging Face folder ([`load_safetensors`]) or an ONNX file
/// ([`load_onnx`]).
pub fn load(dev: &Device, path: &std::path::Path) -> Result<VitModel> {
    if path.is_dir() {
        load_safetensors(dev, path)
    } else {
        load_onnx(dev, path)
    }
}

/// What [`load_onnx`] would build from `path`, without a device: the config and the backbone's prefix, after
/// checking that every tensor the config implies is there with its shape (for `rime inspect`).
pub fn onnx_config(path: &std::path::Path) -> Result<(VitConfig, String)> {
    let io = |e: rime_io::Error| Error::Invalid(e.to_string());
    let file = rime_io::OnnxFile::open(path).map_err(io)?;
    let tensors = file.hf_tensors().map_err(io)?;
    let prefix = find_prefix(&tensors, path)?;
    let shapes: std::collections::HashMap<String, Vec<usize>> = tensors.into_iter().map(|(n, s, _)| (n, s)).collect();
    let cfg = infer_config(&shapes, &prefix)?;
    for (name, want) in param_shapes(&cfg) {
        let name = format!("{prefix}{name}");
        match shapes.get(&name) {
            Some(s) if *s == want => {}
            Some(s) => return Err(Error::Invalid(format!("tensor `{name}` has shape {s:?}, expected {want:?}"))),
            None => return Err(Error::Invalid(format!("tensor `{name}` is missing"))),
        }
    }
    Ok((cfg, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubic_weights_sum_to_one_and_interpolate_exactly_at_taps() {
        for t in [0.0, 0.25, 0.5, 0.9] {
            let w = cubic_weights(t);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        assert_eq!(cubic_weights(0.0), [0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn same_grid_is_identity_and_constant_grid_stays_constant() {
        let (g, c) = (3, 2);
        let table: Vec<f32> = (0..(1 + g * g) * c).map(|i| i as f32).collect();
        assert_eq!(interpolate_positions(&table, g, c, 3, 3), table);
        let flat = vec![0.5f32; (1 + g * g) * c];
        let out = interpolate_positions(&flat, g, c, 5, 2);
        assert_eq!(out.len(), (1 + 10) * c);
        assert!(out.iter().all(|&x| (x - 0.5).abs() < 1e-6));
    }
}
