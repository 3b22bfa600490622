//! A peft LoRA adapter on a Llama model's weights: checked against them once, then either applied by the
//! KV-cache decoder on the GPU (its factors uploaded beside the frozen weights; [`decode_tensors`]) or folded
//! into the weights on the CPU ([`fold_lora`]). The arithmetic (the scale of a module with `alpha_pattern`
//! and rsLoRA, W += s·B·A, DoRA's row rescale) is rime-io's [`rime_io::lora_math`], shared with rime-merge.
//!
//! On the GPU each adapted linear computes W·x + B'·(A·x) with B' = s·B (the module's scale applied once at
//! load); a DoRA module then scales each output feature by g = m / ||W + s·B·A||_row, which is constant at
//! inference (peft detaches the norm) and so computed once here. The decoder finds these tensors in the
//! [`rime_graph::ParamStore`] under [`factor_name`]'s names.

use std::path::Path;

use rime_io::lora_math::{add_scaled_product, dora_rescale_rows, dora_row_scale, LoraDims};
use rime_io::peft::PEFT_PREFIX;
use rime_io::{AdapterTensor, NamedTensor, PeftAdapter};

use crate::llama::{Error, Result};

/// What the decoder reads for one adapted module `module` (e.g. `model.layers.0.self_attn.q_proj`):
/// `A` [r, in], `sB` (s·B, [out, r]) and, for DoRA, `g` \[out\].
pub fn factor_name(module: &str, which: &str) -> String {
    format!("decode_lora.{module}.{which}")
}

/// One LoRA pair checked against the model: its factors, scale and (DoRA) magnitude.
struct Checked<'a> {
    module: String,
    /// Index of the adapted weight in the model's tensors.
    target: usize,
    a: &'a AdapterTensor,
    b: &'a AdapterTensor,
    dims: LoraDims,
    scale: f32,
    magnitude: Option<&'a AdapterTensor>,
}

fn model_err(dir: &Path, msg: String) -> Error {
    Error::Model { file: dir.join("adapter_config.json").display().to_string(), msg }
}

/// Every tensor of the adapter must be a LoRA factor, or a DoRA magnitude when `use_dora`.
fn check_tensor_kinds(adapter: &PeftAdapter, dir: &Path) -> Result<()> {
    for t in &adapter.tensors {
        let factor = t.name.contains(".lora_A.") || t.name.contains(".lora_B.");
        let magnitude = t.name.ends_with(".lora_magnitude_vector");
        if magnitude && !adapter.config.use_dora {
            return Err(model_err(dir, format!("use_dora is false but the adapter has `{}`", t.name)));
        }
        if !factor && !magnitude {
            return Err(model_err(
                dir,
                format!("`{}` is neither a LoRA factor nor a DoRA magnitude; a Llama adapter has only those", t.name),
            ));
        }
    }
    Ok(())
}

/// The adapter's LoRA pairs against the model's tensors (HF names): each adapted weight present with the
/// shape B·A gives, scales from the config.
fn check<'a>(tensors: &[NamedTensor], adapter: &'a PeftAdapter, dir: &Path) -> Result<Vec<Checked<'a>>> {
    let cfg = &adapter.config;
    if cfg.peft_type != "LORA" {
        return Err(model_err(
            dir,
            format!("peft_type `{}`: only LORA adapters apply to a Llama model", cfg.peft_type),
        ));
    }
    if cfg.use_dora && cfg.fan_in_fan_out {
        return Err(model_err(dir, "use_dora with fan_in_fan_out is not supported".into()));
    }
    let weights: Vec<(String, Vec<usize>)> = tensors.iter().map(|t| (t.0.clone(), t.1.clone())).collect();
    adapter.check_against(dir, &weights)?;
    let mut out = Vec::new();
    for pair in adapter.lora_pairs() {
        let missing = |n: &str| model_err(dir, format!("missing tensor `{n}`"));
        let a = adapter.get(&pair.a).ok_or_else(|| missing(&pair.a))?;
        let b = adapter.get(&pair.b).ok_or_else(|| missing(&pair.b))?;
        let weight = format!("{}.weight", pair.module);
        let target = tensors
            .iter()
            .position(|t| t.0 == weight)
            .ok_or_else(|| model_err(dir, format!("`{}` adapts `{weight}`, which the model does not have", pair.a)))?;
        let dims = LoraDims::of(&a.shape, &b.shape);
        let want = dims.weight_shape(cfg.fan_in_fan_out);
        if tensors[target].1 != want {
            return Err(model_err(
                dir,
                format!("`{weight}` is {:?} but B·A of `{}` is {want:?}", tensors[target].1, pair.module),
            ));
        }
        let magnitude = if cfg.use_dora {
            let mn = format!("{PEFT_PREFIX}{}.lora_magnitude_vector", pair.module);
            let m = adapter.get(&mn).ok_or_else(|| missing(&mn))?;
            if m.shape != [dims.fan_out] {
                return Err(model_err(dir, format!("`{mn}` has shape {:?}, expected [{}]", m.shape, dims.fan_out)));
            }
            Some(m)
        } else {
            None
        };
        let scale = cfg.module_scale(&pair.module, dims.r) as f32;
        out.push(Checked { module: pair.module.clone(), target, a, b, dims, scale, magnitude });
    }
    Ok(out)
}

/// Folds a peft LoRA adapter into `tensors` (HF names, f32): W += s · B · A for each adapted module, s =
/// alpha / r (alpha / sqrt(r) with rsLoRA, `alpha_pattern` respected); DoRA adapters (`use_dora`) then rescale
/// each row to m / ||W + s·B·A||_row with the module's `lora_magnitude_vector`. Returns the adapted modules.
/// Other tensors of the adapter (a classification head under `modules_to_save`) are not folded; the caller
/// decides what they mean (the decoder refuses them, see [`decode_tensors`]).
pub fn fold_lora(tensors: &mut [NamedTensor], adapter: &PeftAdapter, dir: &Path) -> Result<Vec<String>> {
    let fan = adapter.config.fan_in_fan_out;
    let checked = check(tensors, adapter, dir)?;
    for c in &checked {
        let w = &mut tensors[c.target].2;
        add_scaled_product(w, &c.a.data, &c.b.data, c.dims, c.scale, fan);
        if let Some(m) = c.magnitude {
            dora_rescale_rows(w, &m.data, c.dims.fan_in);
        }
    }
    Ok(checked.into_iter().map(|c| c.module).collect())
}

/// The tensors through which the decoder applies `adapter` on the GPU (see the module docs and
/// [`factor_name`]), and the adapted modules. `tensors` are the model's weights (HF names, f32), unchanged.
pub fn decode_tensors(
    tensors: &[NamedTensor],
    adapter: &PeftAdapter,
    dir: &Path,
) -> Result<(Vec<NamedTensor>, Vec<String>)> {
    check_tensor_kinds(adapter, dir)?;
    if adapter.config.fan_in_fan_out {
        return Err(model_err(
            dir,
            "fan_in_fan_out is for Conv1D weights stored [in, out]; a Llama model's linear weights are [out, in]"
                .into(),
        ));
    }
    let checked = check(tensors, adapter, dir)?;
    let mut out = Vec::with_capacity(3 * checked.len());
    for c in &checked {
        let sb: Vec<f32> = c.b.data.iter().map(|&x| c.scale * x).collect();
        out.push((factor_name(&c.module, "A"), c.a.shape.clone(), c.a.data.clone()));
        out.push((factor_name(&c.module, "sB"), c.b.shape.clone(), sb));
        if let Some(m) = c.magnitude {
            let mut w = tensors[c.target].2.clone();
            add_scaled_product(&mut w, &c.a.data, &c.b.data, c.dims, c.scale, false);
            out.push((factor_name(&c.module, "g"), vec![c.dims.fan_out], dora_row_scale(&w, &m.data, c.dims.fan_in)));
        }
    }
    Ok((out, checked.into_iter().map(|c| c.module).collect()))
}
