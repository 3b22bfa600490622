//! `rime train --method lora` with --lora-dropout, --dora and --init pissa end to end on MiniLM: the saved
//! adapter (DoRA magnitudes, PiSSA converted to a rank-2r LoRA of the unmodified model) evaluates with
//! `rime eval` to exactly the accuracy training reported (evaluation without dropout), `rime merge
//! --fold-lora` folds it, and bad flags end in errors that name them.

mod common;

use std::path::Path;

use common::{model, rime, tmp, train, write_labelled};

fn write_data(path: &Path, n: usize) {
    write_labelled(path, n, "great tasty snack, love it", "stale and bland");
}

#[test]
fn dora_pissa_and_dropout_train_save_and_evaluate() {
    let Some(m) = model() else { return };
    let d = tmp("train");
    let data = d.join("train.jsonl");
    write_data(&data, 16);
    let out = d.join("run");
    let st = train(&m, &data, &out, &["--rank", "4", "--dora", "--init", "pissa", "--lora-dropout", "0.1"]);
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(st.status.success(), "{err}");
    assert!(err.contains("DoRA") && err.contains("dropout 0.1") && err.contains("init pissa"), "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("best/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["use_dora"], true);
    assert_eq!(cfg["r"], 8, "PiSSA is saved as a rank-2r LoRA");
    assert_eq!(cfg["lora_alpha"], 32);
    assert!((cfg["lora_dropout"].as_f64().unwrap() - 0.1).abs() < 1e-6);
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let ev = rime()
        .args(["eval", "--model", m.to_str().unwrap(), "--adapter", out.join("best").to_str().unwrap()])
        .args(["--data", data.to_str().unwrap(), "--json", "--max-length", "16", "--batch-size", "8"])
        .output()
        .unwrap();
    assert!(ev.status.success(), "{}", String::from_utf8_lossy(&ev.stderr));
    let e: serde_json::Value = serde_json::from_slice(&ev.stdout).unwrap();
    for k in ["accuracy", "loss"] {
        let (a, b) = (e[k].as_f64().unwrap(), metrics[format!("eval_{k}")].as_f64().unwrap());
        assert!((a - b).abs() < 1e-4, "rime eval {k} {a} vs training's {b}");
    }
    // Folding the DoRA adapter (without its classification head, which the base model lacks) into the base:
    // W' = m / ||W + s·B·A||_row ⊙ (W + s·B·A), checked on one module against the formula.
    let mut ad = rime_io::PeftAdapter::load(out.join("best")).unwrap();
    ad.tensors.retain(|t| !t.name.contains(".head."));
    ad.config.modules_to_save.clear();
    let lora_only = d.join("lora_only");
    rime_io::PeftAdapter::new(ad.config.clone(), ad.tensors.clone()).save(&lora_only).unwrap();
    let folded = d.join("folded");
    let f = rime()
        .args(["merge", "--fold-lora", lora_only.to_str().unwrap(), "--base", m.to_str().unwrap()])
        .args(["--out", folded.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stderr));
    let module = "encoder.layer.0.attention.self.query";
    let get = |n: &str| ad.get(&format!("base_model.model.{module}.{n}")).unwrap().clone();
    let (a, b, mag) = (get("lora_A.weight"), get("lora_B.weight"), get("lora_magnitude_vector"));
    let w = rime_io::Checkpoint::open(&m).unwrap().get_f32(&format!("{module}.weight")).unwrap();
    let got = rime_io::Checkpoint::open(&folded).unwrap().get_f32(&format!("{module}.weight")).unwrap();
    let (r, fin) = (a.shape[0], a.shape[1]);
    let s = (ad.config.lora_alpha / r as f64) as f32;
    for o in 0..b.shape[0] {
        let row: Vec<f32> = (0..fin)
            .map(|i| w[o * fin + i] + s * (0..r).map(|k| b.data[o * r + k] * a.data[k * fin + i]).sum::<f32>())
            .collect();
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        for i in 0..fin {
            let want = mag.data[o] / norm * row[i];
            assert!((got[o * fin + i] - want).abs() < 1e-4, "folded [{o}, {i}]: {} vs {want}", got[o * fin + i]);
        }
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn bad_lora_flags_name_the_flag() {
    let Some(m) = model() else { return };
    let d = tmp("bad");
    let data = d.join("train.jsonl");
    write_data(&data, 8);
    for (extra, needle) in [
        (vec!["--init", "pissa", "--rank", "500"], "--rank 500"),
        (vec!["--lora-dropout", "1.5"], "--lora-dropout"),
        (vec!["--init", "svd"], "--init"),
        (vec!["--weights", "f8"], "--weights f8"),
        (vec!["--weights", "f16", "--dora"], "--weights f16"),
    ] {
        let o = train(&m, &data, &d.join("o"), &extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} should fail");
        assert!(err.contains(needle), "{extra:?}: error should mention {needle}: {err}");
        assert!(!err.contains("panicked"), "{extra:?} panicked: {err}");
    }
    std::fs::remove_dir_all(&d).ok();
}

/// `--weights f16` trains with half-precision frozen weights and ends within f16's precision of the f32 run.
#[test]
fn f16_frozen_weights_train_close_to_f32() {
    let Some(m) = model() else { return };
    let d = tmp("f16");
    let data = d.join("train.jsonl");
    write_data(&data, 16);
    let loss = |w: &str| {
        let o = train(&m, &data, &d.join(w), &["--weights", w]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join(w).join("metrics.json")).unwrap()).unwrap();
        v["eval_loss"].as_f64().unwrap()
    };
    let (a, b) = (loss("f32"), loss("f16"));
    assert!((a - b).abs() < 1e-2 * a.abs().max(1.0), "eval loss f32 {a} vs f16 {b}");
    std::fs::remove_dir_all(&d).ok();
}
