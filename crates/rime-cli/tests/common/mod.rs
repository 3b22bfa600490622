//! Helpers shared by the CLI test binaries (each binary uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `rime` binary under test.
pub fn rime() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rime"))
}

/// A fetched model folder or GGUF file by name, or None after saying SKIPPED.
pub fn model_named(name: &str) -> Option<PathBuf> {
    match rime_io::locate_model(name) {
        Ok(p) => Some(p),
        Err(_) => {
            eprintln!("SKIPPED: model {name} not found, run scripts/fetch-models.sh");
            None
        }
    }
}

/// all-MiniLM-L6-v2, or None (SKIPPED) before scripts/fetch-models.sh.
pub fn model() -> Option<PathBuf> {
    model_named("all-minilm-l6-v2")
}

/// A fresh, empty folder under the system temp dir, unique to this process and `name`.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rime-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A JSONL file of `n` rows alternating a "great" text and an "other" text (numbered so rows differ).
pub fn write_labelled(path: &Path, n: usize, great: &str, other: &str) {
    let rows: Vec<String> = (0..n)
        .map(|i| {
            let (t, l) = if i % 2 == 0 { (great, "great") } else { (other, "other") };
            serde_json::json!({"text": format!("{t} {i}"), "label": l}).to_string()
        })
        .collect();
    std::fs::write(path, rows.join("\n")).unwrap();
}

/// `rime train` of `model` on `data` (also its eval set), batch 8, max length 16, lr 5e-3, into `out`, plus
/// `extra` flags.
pub fn train(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    rime()
        .args(["train", "--model", model.to_str().unwrap(), "--train", data.to_str().unwrap(), "--eval"])
        .arg(data)
        .args(["--batch-size", "8", "--max-length", "16", "--lr", "5e-3", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// The largest |difference| between the tensors of two runs' `checkpoint/adapter` folders, which must hold the
/// same tensor names.
pub fn checkpoint_diff(a: &Path, b: &Path) -> f32 {
    checkpoint_diffs(a, b).into_iter().fold(0f32, f32::max)
}

/// Every element's |difference| between the checkpointed adapters of two runs, in a fixed order.
pub fn checkpoint_diffs(a: &Path, b: &Path) -> Vec<f32> {
    let load = |dir: &Path| {
        let ad = rime_io::peft::PeftAdapter::load(dir.join("checkpoint/adapter")).unwrap();
        let mut t: Vec<(String, Vec<f32>)> = ad.tensors.into_iter().map(|t| (t.name, t.data)).collect();
        t.sort_by(|x, y| x.0.cmp(&y.0));
        t
    };
    let (x, y) = (load(a), load(b));
    let names = |t: &[(String, Vec<f32>)]| t.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&x), names(&y), "{} and {} hold different tensors", a.display(), b.display());
    x.iter().zip(&y).flat_map(|((_, p), (_, q))| p.iter().zip(q).map(|(u, v)| (u - v).abs())).collect()
}

/// The losses of the `step N: loss L, ...` lines a `rime train` run writes to stderr, in order.
pub fn step_losses(stderr: &str) -> Vec<f32> {
    stderr
        .lines()
        .filter_map(|l| {
            l.strip_prefix("step ")
                .and_then(|r| r.split("loss ").nth(1))
                .and_then(|x| x.split(',').next()?.trim().parse().ok())
        })
        .collect()
}
