//! Bad peft adapters through every command that applies one (`rime embed --adapter`, `rime eval --adapter`,
//! `rime merge --fold-lora`): each ends in exit 1 with a message naming the tensor or field at fault, never a
//! silently different result (issue #13). The adapters are generated here from the golden peft adapter.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{model, rime, tmp, write_labelled};
use rime_io::PeftAdapter;

fn golden() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden/minilm_lora_peft_adapter");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIPPED: golden {} not found", p.display());
        None
    }
}

/// The bad adapters: (folder name, the needles their error must hold).
fn corpus(src: &Path, d: &Path) -> Vec<(PathBuf, Vec<String>)> {
    let good = PeftAdapter::load(src).unwrap();
    let mut out = Vec::new();
    // Factors for a layer MiniLM (6 layers) does not have.
    let mut a = good.clone();
    for t in &mut a.tensors {
        t.name = t.name.replace(".layer.0.", ".layer.9.");
    }
    a.tensors.sort_by(|x, y| x.name.cmp(&y.name));
    let p = d.join("layer9");
    a.save(&p).unwrap();
    out.push((p, vec!["encoder.layer.9.attention.self.query.lora_A.weight".into(), "does not have".into()]));
    // `r` disagreeing with the factors (rank 8): peft refuses it; it used to be applied with scale alpha/4.
    let mut a = good.clone();
    a.config.r = 4;
    let p = d.join("r4");
    a.save(&p).unwrap();
    out.push((p, vec!["`r`".into(), "rank 4".into(), "lora_A.weight".into()]));
    // target_modules naming no module of the model.
    let mut a = good.clone();
    a.config.target_modules = vec!["query".into(), "value".into(), "q_proj".into()];
    let p = d.join("q_proj");
    a.save(&p).unwrap();
    out.push((p, vec!["`target_modules`".into(), "`q_proj`".into()]));
    // Factors of modules target_modules does not select.
    let mut a = good.clone();
    a.config.target_modules = vec!["query".into()];
    let p = d.join("untargeted");
    a.save(&p).unwrap();
    out.push((p, vec!["attention.self.value".into(), "not selected by target_modules".into()]));
    // A NaN lora_B (rime never saves one; written directly).
    let p = d.join("nan");
    std::fs::create_dir_all(&p).unwrap();
    let nan = good.tensors[1].name.clone();
    let data: Vec<Vec<f32>> = good
        .tensors
        .iter()
        .map(|t| if t.name == nan { vec![f32::NAN; t.data.len()] } else { t.data.clone() })
        .collect();
    let list: Vec<(String, Vec<usize>, &[f32])> =
        good.tensors.iter().zip(&data).map(|(t, v)| (t.name.clone(), t.shape.clone(), v.as_slice())).collect();
    rime_io::write_safetensors(p.join("adapter_model.safetensors"), &list, &BTreeMap::new()).unwrap();
    std::fs::copy(src.join("adapter_config.json"), p.join("adapter_config.json")).unwrap();
    out.push((p, vec![nan, "non-finite".into()]));
    out
}

fn refused(args: &[&str], needles: &[String]) {
    let o = rime().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{args:?} must fail cleanly: {err}");
    for n in needles {
        assert!(err.contains(n.as_str()), "{args:?}: `{n}` missing from: {err}");
    }
}

#[test]
fn bad_adapters_are_refused_by_embed_eval_and_fold() {
    let (Some(src), Some(m)) = (golden(), model()) else { return };
    let d = tmp("adapter_faults");
    let data = d.join("data.jsonl");
    write_labelled(&data, 4, "great", "bad");
    let ms = m.to_str().unwrap();
    for (ad, needles) in corpus(&src, &d) {
        let a = ad.to_str().unwrap();
        refused(&["embed", "--model", ms, "--adapter", a, "some text"], &needles);
        refused(&["eval", "--model", ms, "--adapter", a, "--data", data.to_str().unwrap()], &needles);
        let out = d.join("folded");
        refused(&["merge", "--fold-lora", a, "--base", ms, "--out", out.to_str().unwrap()], &needles);
        assert!(!out.exists(), "{a}: a refused fold wrote {}", out.display());
    }
    std::fs::remove_dir_all(&d).ok();
}
