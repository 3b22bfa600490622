//! Folding a peft LoRA adapter into its base checkpoint: W' = W + s * B A for every adapted module, with
//! s = alpha / r (alpha / sqrt(r) under rsLoRA; `rank_pattern` / `alpha_pattern` respected), transposed for
//! `fan_in_fan_out` weights. Every other base tensor is copied as stored; an adapter tensor that is not a LoRA
//! factor (e.g. a `modules_to_save` copy) replaces the base tensor of the same name. The rank-r product is
//! small next to the read and write of W and runs on the CPU, tensor by tensor, streamed into the output like
//! a merge. DoRA adapters (`use_dora`) fold to W' = m / ||W + s·B·A||_row ⊙ (W + s·B·A), m being the module's
//! `lora_magnitude_vector`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use rime_io::{Checkpoint, PeftAdapter};

use crate::engine::{plan_output, write_report, MergeOptions, MergeReport};
use crate::output::{copy_side_files, encode, write_shards, Staging};
use crate::{Error, OutDtype, Result};

/// peft's pattern lookup: a key matches a module whose path is the key or ends with `.key`.
fn pattern<'a, T>(m: &'a BTreeMap<String, T>, module: &str) -> Option<&'a T> {
    m.iter().find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}"))).map(|(_, v)| v)
}

/// Folds the adapter folder `adapter` into the checkpoint `base` (folder or file) and writes `out`.
pub fn fold_lora(
    adapter: &Path,
    base: &Path,
    out: &Path,
    dtype: Option<OutDtype>,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let t0 = Instant::now();
    let ad = PeftAdapter::load(adapter)?;
    let afile = adapter.join("adapter_config.json").display().to_string();
    let cerr = |msg: String| Error::Config { file: afile.clone(), msg };
    if ad.config.peft_type != "LORA" {
        return Err(cerr(format!("peft_type `{}`: only LORA adapters can be folded", ad.config.peft_type)));
    }
    let dora = ad.config.use_dora;
    if dora && ad.config.fan_in_fan_out {
        return Err(cerr("use_dora with fan_in_fan_out: rime folds DoRA only for [out, in] weights".into()));
    }
    let ck = Checkpoint::open(base)?;
    // base tensor name -> (A, B, scale, DoRA magnitude)
    let mut folds: BTreeMap<String, (String, String, f32, Option<String>)> = BTreeMap::new();
    let mut replaced: BTreeMap<String, String> = BTreeMap::new();
    let pairs = ad.lora_pairs();
    for p in &pairs {
        let target = format!("{}.weight", p.module);
        let a = ad.get(&p.a).ok_or_else(|| cerr(format!("missing `{}`", p.a)))?;
        let b = ad.get(&p.b).ok_or_else(|| cerr(format!("missing `{}`", p.b)))?;
        if !ck.contains(&target) {
            return Err(Error::Tensor {
                tensor: target,
                msg: format!("adapted by `{}` in {} but not in the base {}", p.a, adapter.display(), base.display()),
            });
        }
        let (_, wshape) = ck.info(&target)?;
        let (r, fin, fout) = (a.shape[0], a.shape[1], b.shape[0]);
        let want = if ad.config.fan_in_fan_out { [fin, fout] } else { [fout, fin] };
        if wshape != want {
            return Err(Error::Tensor {
                tensor: target,
                msg: format!("base shape {wshape:?} in {} but B A of `{}` is {want:?}", base.display(), p.module),
            });
        }
        let alpha = pattern(&ad.config.alpha_pattern, &p.module).copied().unwrap_or(ad.config.lora_alpha);
        let scale = if ad.config.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        let mag = if dora {
            let name = format!("{}{}.lora_magnitude_vector", rime_io::peft::PEFT_PREFIX, p.module);
            let m = ad.get(&name).ok_or_else(|| cerr(format!("use_dora: no `{name}` for module `{}`", p.module)))?;
            if m.shape != [fout] {
                return Err(cerr(format!("`{name}` has shape {:?}, expected [{fout}]", m.shape)));
            }
            Some(name)
        } else {
            None
        };
        folds.insert(target, (p.a.clone(), p.b.clone(), scale as f32, mag));
    }
    for t in &ad.tensors {
        if t.name.contains(".lora_A.") || t.name.contains(".lora_B.") {
            continue;
        }
        if t.name.ends_with(".lora_magnitude_vector") {
            if !dora {
                return Err(cerr(format!("use_dora is false but the adapter has `{}`", t.name)));
            }
            continue;
        }
        let stripped = t.name.strip_prefix(rime_io::peft::PEFT_PREFIX).unwrap_or(&t.name);
        let stripped = stripped.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".");
        match ck.info(&stripped) {
            Ok((_, s)) if s == t.shape.as_slice() => {
                replaced.insert(stripped, t.name.clone());
            }
            _ => {
                return Err(Error::Tensor {
                    tensor: t.name.clone(),
                    msg: format!(
                        "adapter tensor in {} is neither a LoRA factor nor a copy of a base tensor of {}",
                        adapter.display(),
                        base.display()
                    ),
                })
            }
        }
    }
    let plan = plan_output(&ck, dtype)?;
    let ntensors = plan.len();
    let staging = Staging::new(out, opts.force)?;
    let mut bytes_read = 0u64;
    let mut copied = 0usize;
    let fan = ad.config.fan_in_fan_out;
    let bytes_written = write_shards(&staging.tmp, plan, opts.shard_size, |p| {
        let raw = ck.get_raw(&p.name)?;
        bytes_read += raw.bytes.len() as u64;
        if let Some(src) = replaced.get(&p.name) {
            let t = ad.get(src).ok_or_else(|| Error::Invalid(format!("adapter tensor `{src}` vanished")))?;
            return Ok(encode(&t.data, p.dtype));
        }
        let Some((an, bn, s, mag)) = folds.get(&p.name) else {
            if raw.dtype == p.dtype {
                copied += 1;
                return Ok(raw.bytes.to_vec());
            }
            return Ok(encode(&ck.get_f32(&p.name)?, p.dtype));
        };
        let (a, b) = match (ad.get(an), ad.get(bn)) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err(Error::Invalid(format!("adapter tensors `{an}` / `{bn}` vanished"))),
        };
        let mut w = ck.get_f32(&p.name)?;
        let (r, fin, fout) = (a.shape[0], a.shape[1], b.shape[0]);
        for o in 0..fout {
            for i in 0..fin {
                let mut acc = 0.0f32;
                for q in 0..r {
                    acc += b.data[o * r + q] * a.data[q * fin + i];
                }
                let idx = if fan { i * fout + o } else { o * fin + i };
                w[idx] += s * acc;
            }
        }
        if let Some(mn) = mag {
            // DoRA: each row of W + sBA rescaled to the trained magnitude (fan_in_fan_out refused above).
            let m = ad.get(mn).ok_or_else(|| Error::Invalid(format!("adapter tensor `{mn}` vanished")))?;
            for (o, row) in w.chunks_mut(fin).enumerate() {
                let norm = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
                let g = (m.data[o] as f64 / norm) as f32;
                row.iter_mut().for_each(|v| *v *= g);
            }
        }
        Ok(encode(&w, p.dtype))
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    let side_files = copy_side_files(base, &staging.tmp)?;
    let report = MergeReport {
        method: "fold_lora".into(),
        inputs: vec![base.display().to_string(), adapter.display().to_string()],
        output: out.display().to_string(),
        adapter: "cpu".into(),
        tensors: ntensors,
        copied,
        bytes_read,
        bytes_written,
        seconds,
        gb_per_s: (bytes_read + bytes_written) as f64 / seconds.max(1e-9) / 1e9,
        side_files,
        notes: vec![format!(
            "{} {} modules folded, {} tensors replaced from the adapter",
            folds.len(),
            if dora { "DoRA" } else { "LoRA" },
            replaced.len()
        )],
    };
    write_report(&staging.tmp, &report)?;
    staging.commit()?;
    Ok(report)
}
