//! Faults and bad input through `rime merge` (issue #13): merges of MiniLM killed with SIGKILL at random
//! moments leave nothing that looks complete (no `--out`, or the previous `--out` intact) and the next merge
//! removes their staging folders; an `--out` that is an input is refused; flags out of range name the flag;
//! the README's `--fold-lora` example works on the adapter `rime train` writes (its head lands in OUT/head).

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::{model, rime, tmp, train, write_labelled};

/// The config of a uniform soup of MiniLM with itself (~90 MB out).
fn soup_config(d: &Path, m: &Path) -> PathBuf {
    let p = d.join("soup.yaml");
    std::fs::write(&p, format!("merge_method: linear\nmodels: [{0}, {0}]\n", m.display())).unwrap();
    p
}

fn merge_cmd(cfg: &Path, out: &Path) -> std::process::Command {
    let mut c = rime();
    c.arg("merge").arg(cfg).arg("--out").arg(out).arg("--force");
    c
}

/// Entries of `d` made by merges into `out` (staging folders and backups).
fn staging(d: &Path) -> Vec<String> {
    std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".out.rime-merge-"))
        .collect()
}

/// A pseudo-random fraction in [0.05, 0.95) from the clock and `i` (each run kills at other moments).
fn fraction(i: u64) -> f64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    let x = (t ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    0.05 + 0.9 * ((x >> 11) as f64 / (1u64 << 53) as f64)
}

#[test]
fn killed_merges_leave_nothing_that_looks_complete() {
    let Some(m) = model() else { return };
    let d = tmp("merge_kill");
    let cfg = soup_config(&d, &m);
    let out = d.join("out");
    let t0 = Instant::now();
    let st = merge_cmd(&cfg, &out).output().unwrap();
    let full = t0.elapsed();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let reference = std::fs::read(out.join("model.safetensors")).unwrap();
    let mut had_out = true;
    for i in 0..4 {
        if i == 2 {
            // Two kills with no previous output, two over a previous output (replaced with --force).
            std::fs::remove_dir_all(&out).unwrap();
            had_out = false;
        }
        let mut child = merge_cmd(&cfg, &out).stdout(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(full.mul_f64(fraction(i)));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        match std::fs::read(out.join("model.safetensors")) {
            // Whatever --out holds is a complete model: the previous one or the finished new one.
            Ok(bytes) => assert!(bytes == reference, "kill {i} ({status}): a partial model.safetensors under --out"),
            Err(_) => {
                assert!(!out.exists(), "kill {i}: an --out folder without a model");
                assert!(!had_out || !staging(&d).is_empty(), "kill {i}: the previous --out was lost");
            }
        }
        had_out = out.exists();
    }
    // The next merge restores or cleans what the kills left, says so, and succeeds.
    let left = staging(&d);
    let st = merge_cmd(&cfg, &out).output().unwrap();
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(st.status.success(), "{err}");
    assert!(staging(&d).is_empty(), "left after the next merge: {:?}", staging(&d));
    assert!(left.is_empty() || err.contains("killed merge"), "{left:?} cleaned without a note: {err}");
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), reference);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn bad_merge_flags_and_outputs_name_the_culprit() {
    let Some(m) = model() else { return };
    let d = tmp("merge_bad");
    let cfg = soup_config(&d, &m);
    let run = |args: &[&str]| {
        let o = rime().arg("merge").args(args).output().unwrap();
        assert!(!o.status.success() && o.status.code() == Some(1), "{args:?} must fail cleanly");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let c = cfg.to_str().unwrap();
    let e = run(&[c, "--out", d.join("o").to_str().unwrap(), "--shard-size", "99999999999999999999999"]);
    assert!(e.contains("--shard-size") && e.contains("larger"), "{e}");
    // --out is the base model: refused even with --force, the model untouched.
    let before = std::fs::metadata(m.join("model.safetensors")).unwrap().len();
    let e = run(&[c, "--out", m.to_str().unwrap(), "--force"]);
    assert!(e.contains("is the input"), "{e}");
    assert_eq!(std::fs::metadata(m.join("model.safetensors")).unwrap().len(), before);
    assert!(!d.join("o").exists());
    std::fs::remove_dir_all(&d).ok();
}

/// README: `rime merge --fold-lora runs/lora --base MODEL --out merged` on what `rime train` wrote, then
/// `rime eval --model merged --adapter merged/head` gives the accuracy training measured.
#[test]
fn folding_a_trained_classifier_adapter_keeps_its_accuracy() {
    let Some(m) = model() else { return };
    let d = tmp("fold_trained");
    let data = d.join("train.jsonl");
    write_labelled(&data, 16, "great tasty snack, love it", "stale and bland, a waste");
    let run = d.join("run");
    let o = train(&m, &data, &run, &["--epochs", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let merged = d.join("merged");
    let o = rime()
        .args(["merge", "--fold-lora", run.join("best").to_str().unwrap(), "--base", m.to_str().unwrap()])
        .args(["--out", merged.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("head") && merged.join("head/adapter_model.safetensors").is_file(), "{err}");
    let eval = |model: &Path, adapter: &Path| -> f64 {
        let o = rime()
            .args(["eval", "--model", model.to_str().unwrap(), "--adapter", adapter.to_str().unwrap()])
            .args(["--data", data.to_str().unwrap(), "--json", "--max-length", "16", "--batch-size", "8"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["accuracy"].as_f64().unwrap()
    };
    let (adapted, folded) = (eval(&m, &run.join("best")), eval(&merged, &merged.join("head")));
    assert!((adapted - folded).abs() < 1e-9, "adapter {adapted} vs folded {folded}");
    std::fs::remove_dir_all(&d).ok();
}
