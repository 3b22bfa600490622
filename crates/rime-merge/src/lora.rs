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

use rime_io::{add_scaled_product, dora_rescale_rows, Checkpoint, LoraDims, PeftAdapter};

use crate::engine::{plan_output, write_report, MergeOptions, MergeReport};
use crate::output::{copy_side_files, encode, write_shards, Staging};
use crate::{Error, OutDtype, Result};

/// Folds the adapter folder `adapter` into the checkpoint `base` (folder or file) and writes `out`.
pub fn fold_lora(
    adapter: &Path,
    base: &Path,
    out: &Path,
    dtype: Option<OutDtype>,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let t0 = Instant::now();
    let mut ad = PeftAdapter::load(adapter)?;
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
    // A BertForSequenceClassification adapter (peft names its encoder `bert.`) on a bare BertModel checkpoint.
    if !ck.contains("bert.embeddings.word_embeddings.weight") && ck.contains("embeddings.word_embeddings.weight") {
        ad.rebase_modules("bert.", "");
    }
    let weights = ck
        .names()
        .into_iter()
        .map(|n| Ok((n.to_string(), ck.info(n)?.1.to_vec())))
        .collect::<std::result::Result<Vec<_>, rime_io::Error>>()?;
    ad.check_against(adapter, &weights)?;
    // base tensor name -> (A, B, scale, DoRA magnitude)
    let mut folds: BTreeMap<String, (String, String, f32, Option<String>)> = BTreeMap::new();
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
        let d = LoraDims::of(&a.shape, &b.shape);
        let (r, fout) = (d.r, d.fan_out);
        let want = d.weight_shape(ad.config.fan_in_fan_out);
        if wshape != want {
            return Err(Error::Tensor {
                tensor: target,
                msg: format!("base shape {wshape:?} in {} but B A of `{}` is {want:?}", base.display(), p.module),
            });
        }
        let scale = ad.config.module_scale(&p.module, r);
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
    let (replaced, head) = replaced_tensors(&ad, &ck, adapter, base)?;
    let plan = plan_output(&ck, dtype)?;
    let ntensors = plan.len();
    let staging = Staging::new(out, opts.force, &[base, adapter])?;
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
        let d = LoraDims::of(&a.shape, &b.shape);
        add_scaled_product(&mut w, &a.data, &b.data, d, *s, fan);
        if let Some(mn) = mag {
            // DoRA: each row of W + sBA rescaled to the trained magnitude (fan_in_fan_out refused above).
            let m = ad.get(mn).ok_or_else(|| Error::Invalid(format!("adapter tensor `{mn}` vanished")))?;
            dora_rescale_rows(&mut w, &m.data, d.fan_in);
        }
        Ok(encode(&w, p.dtype))
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    let side_files = copy_side_files(base, &staging.tmp)?;
    let mut notes = vec![format!(
        "{} {} modules folded, {} tensors replaced from the adapter",
        folds.len(),
        if dora { "DoRA" } else { "LoRA" },
        replaced.len()
    )];
    notes.extend(staging.notes.iter().cloned());
    if !head.is_empty() {
        write_head(&ad, &head, &staging.tmp, out)?;
        notes.push(format!(
            "the adapter's classification head ({}) is not part of the base model: written to {} \
             (rime eval --model {} --adapter {})",
            head.join(", "),
            out.join(HEAD_DIR).display(),
            out.display(),
            out.join(HEAD_DIR).display()
        ));
    }
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
        notes,
    };
    write_report(&staging.tmp, &report)?;
    staging.commit()?;
    Ok(report)
}

/// Adapter tensors that are neither LoRA factors nor DoRA magnitudes: `modules_to_save` copies of base tensors
/// (the base tensor each replaces -> its adapter name), and the tensors of a saved module the base does not
/// have (a classification head: `modules_to_save` lists its module), returned by adapter name to be written
/// beside the model. Anything else is an error.
fn replaced_tensors(
    ad: &PeftAdapter,
    ck: &Checkpoint,
    adapter: &Path,
    base: &Path,
) -> Result<(BTreeMap<String, String>, Vec<String>)> {
    let afile = adapter.join("adapter_config.json").display().to_string();
    let cerr = |msg: String| Error::Config { file: afile.clone(), msg };
    let dora = ad.config.use_dora;
    let mut replaced = BTreeMap::new();
    let mut head = Vec::new();
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
            Err(_) if is_saved_module(ad, &stripped) => head.push(t.name.clone()),
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
    Ok((replaced, head))
}

/// Folder, inside the output, of a folded adapter's classification head.
pub const HEAD_DIR: &str = "head";

/// Whether `tensor` (peft prefix stripped) belongs to a module listed in `modules_to_save`.
fn is_saved_module(ad: &PeftAdapter, tensor: &str) -> bool {
    ad.config.modules_to_save.iter().any(|m| tensor.starts_with(&format!("{m}.")) || tensor.contains(&format!(".{m}.")))
}

/// Writes the head tensors `names` of `ad` as a head-only adapter (`RIME_PROBE`, the adapter's labels) in
/// `dir/head`: what `rime eval --model OUT --adapter OUT/head` reads.
fn write_head(ad: &PeftAdapter, names: &[String], dir: &Path, out: &Path) -> Result<()> {
    let tensors: Vec<rime_io::AdapterTensor> = names.iter().filter_map(|n| ad.get(n)).cloned().collect();
    // r = 1 only because the adapter_config reader needs a rank; a head-only adapter has no low-rank part.
    let mut cfg = rime_io::AdapterConfig::lora(1, 1.0, vec![]);
    cfg.peft_type = "RIME_PROBE".into();
    cfg.modules_to_save = ad.config.modules_to_save.clone();
    cfg.task_type = ad.config.task_type.clone().or(Some("SEQ_CLS".into()));
    cfg.base_model_name_or_path = Some(out.display().to_string());
    if let Some(l) = ad.config.raw.get("rime_labels") {
        cfg.raw.insert("rime_labels".into(), l.clone());
    }
    rime_io::PeftAdapter::new(cfg, tensors).save(dir.join(HEAD_DIR))?;
    Ok(())
}
