//! `rime train --task embedding` and `rime embed --dim` through the binary: bad flags and data name the flag,
//! file and line; a tiny run on SNLI triplets writes a head-less FEATURE_EXTRACTION adapter with its dims, and
//! `rime embed --dim` truncates and re-normalizes with it (a warning for an untrained dim). SKIPPED without
//! all-MiniLM-L6-v2.

mod common;

use std::path::Path;
use std::process::Output;

use common::{model, rime, tmp};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The first `n` rows of a demo file, written to `dest`.
fn head(src: &str, n: usize, dest: &Path) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/snli_demo").join(src);
    let text = std::fs::read_to_string(p).unwrap();
    let rows: Vec<&str> = text.lines().take(n).collect();
    std::fs::write(dest, rows.join("\n")).unwrap();
}

fn train(m: &Path, data: &Path, eval: &Path, out: &Path, extra: &[&str]) -> Output {
    rime()
        .args(["train", "--task", "embedding", "--model", m.to_str().unwrap(), "--train"])
        .arg(data)
        .arg("--eval")
        .arg(eval)
        .args(["--batch-size", "8", "--max-length", "32", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn refused(o: &Output, want: &[&str]) {
    let e = stderr(o);
    assert!(!o.status.success(), "expected a refusal, got success:\n{e}");
    for w in want {
        assert!(e.contains(w), "stderr lacks {w:?}:\n{e}");
    }
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn bad_embedding_flags_and_data_name_the_flag_file_and_line() {
    let Some(m) = model() else { return };
    let dir = tmp("embed-bad");
    let (data, out) = (dir.join("pairs.jsonl"), dir.join("out"));
    head("train.jsonl", 16, &data);
    refused(
        &train(&m, &data, &data, &out, &["--matryoshka", "64,32"]),
        &["--matryoshka 64,32: must be strictly increasing"],
    );
    refused(&train(&m, &data, &data, &out, &["--matryoshka", "32,x"]), &["--matryoshka 32,x: 'x' is not a number"]);
    refused(&train(&m, &data, &data, &out, &["--matryoshka", "32,999"]), &["--matryoshka", "999", "384"]);
    refused(
        &train(&m, &data, &data, &out, &["--matryoshka", "32,64", "--matryoshka-weights", "1"]),
        &["--matryoshka-weights has 1 values for 2 dims"],
    );
    refused(
        &train(&m, &data, &data, &out, &["--matryoshka-weights", "1"]),
        &["--matryoshka-weights needs --matryoshka"],
    );
    refused(&train(&m, &data, &data, &out, &["--method", "probe"]), &["--method probe", "no head"]);
    refused(&train(&m, &data, &data, &out, &["--feature-cache", "memory"]), &["--feature-cache", "--task embedding"]);
    refused(&train(&m, &data, &data, &out, &["--no-feature-cache"]), &["--no-feature-cache", "--task embedding"]);
    let few = dir.join("few.jsonl");
    head("train.jsonl", 5, &few);
    refused(&train(&m, &few, &data, &out, &[]), &["--batch-size 8", "5 training pairs", "few.jsonl"]);
    refused(
        &train(&m, &data, &data, &out, &["--negative-column", "hard"]),
        &["--negative-column hard", "no column `hard`"],
    );
    refused(&train(&m, &data, &data, &out, &["--micro-batch-size", "4"]), &["--micro-batch-size"]);
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"anchor\": \"a\", \"positive\": \"b\"}\n{\"anchor\": \"\", \"positive\": \"c\"}\n")
        .unwrap();
    refused(&train(&m, &bad, &data, &out, &[]), &["bad.jsonl: line 2", "`anchor`"]);
    std::fs::write(&bad, "{\"query\": \"a\", \"positive\": \"b\"}\n").unwrap();
    refused(&train(&m, &bad, &data, &out, &[]), &["bad.jsonl", "line 1", "anchor"]);
    assert!(!out.exists(), "a refused run leaves no output folder");
    let o = rime().args(["embed", "--model", m.to_str().unwrap(), "--dim", "0", "x"]).output().unwrap();
    refused(&o, &["--dim", "0", "1..=384"]);
    let o = rime().args(["embed", "--model", m.to_str().unwrap(), "--dim", "385", "x"]).output().unwrap();
    refused(&o, &["--dim", "385"]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_tiny_matryoshka_run_then_embed_with_a_trained_dim() {
    let Some(m) = model() else { return };
    let dir = tmp("embed-run");
    let (data, eval, out) = (dir.join("train.jsonl"), dir.join("test.jsonl"), dir.join("out"));
    head("train.jsonl", 16, &data);
    head("test.jsonl", 16, &eval);
    let o = train(&m, &data, &eval, &out, &["--matryoshka", "32,384", "--lr", "1e-3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("frozen model") && text.contains("tuned (best epoch)") && text.contains("MRR"), "{text}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("best/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "FEATURE_EXTRACTION");
    let rj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("best/rime.json")).unwrap()).unwrap();
    assert_eq!(rj["rime_matryoshka_dims"], serde_json::json!([32, 384]));
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert!(metrics["eval_mrr"].as_f64().is_some_and(f64::is_finite), "{metrics}");
    assert_eq!(metrics["baseline_frozen"].as_array().map(Vec::len), Some(5));
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(log.contains("\"eval_mrr@32\"") && log.contains("\"eval_recall@10@384\""), "{log}");
    let adapter = out.join("best");
    let embed = |dim: &str| {
        rime()
            .args(["embed", "--model", m.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--dim", dim])
            .arg("A man is eating food.")
            .output()
            .unwrap()
    };
    let o = embed("32");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    let e: Vec<f64> = v["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(e.len(), 32);
    assert!((e.iter().map(|x| x * x).sum::<f64>().sqrt() - 1.0).abs() < 1e-5);
    let o = embed("64");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--dim 64 is not one of the dims the adapter was trained with [32, 384]"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A ladder side-tuning adapter trained by `--task classify --method lst` is a side network beside the encoder:
/// `rime embed --adapter` runs it (its pooled output, as for a classification LoRA adapter) instead of refusing.
#[test]
fn embed_runs_a_classification_ladder_side_tuning_adapter() {
    let Some(m) = model() else { return };
    let dir = tmp("embed-lst");
    let (data, out) = (dir.join("train.jsonl"), dir.join("out"));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fine_foods/train.jsonl");
    let text = std::fs::read_to_string(src).unwrap();
    std::fs::write(&data, text.lines().take(24).collect::<Vec<_>>().join("\n")).unwrap();
    let o = rime()
        .args(["train", "--method", "lst", "--model", m.to_str().unwrap(), "--train"])
        .arg(&data)
        .arg("--eval")
        .arg(&data)
        .args(["--epochs", "1", "--batch-size", "8", "--max-length", "32", "--no-feature-cache", "--no-baseline"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let best = out.join("best");
    let cfg = std::fs::read_to_string(best.join("adapter_config.json")).unwrap();
    assert!(cfg.contains("RIME_LST"), "{cfg}");
    let o = rime().args(["embed", "--model", m.to_str().unwrap(), "--adapter"]).arg(&best).arg("x").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    let e: Vec<f64> = v["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(e.len(), 384);
    assert!((e.iter().map(|x| x * x).sum::<f64>().sqrt() - 1.0).abs() < 1e-5);
    std::fs::remove_dir_all(&dir).ok();
}

/// `--task embedding --method lst`: the side network trains on the embedding loss from cached encoder states
/// (in the run's feature_cache folder); a RIME_LST FEATURE_EXTRACTION adapter with its dims, which `rime embed`
/// embeds through (the Encoder builds the side network).
#[test]
fn an_lst_embedding_run_writes_a_feature_extraction_lst_adapter() {
    let Some(m) = model() else { return };
    let dir = tmp("embed-lst-train");
    let (data, eval, out) = (dir.join("train.jsonl"), dir.join("test.jsonl"), dir.join("out"));
    head("train.jsonl", 16, &data);
    head("test.jsonl", 16, &eval);
    let o = train(&m, &data, &eval, &out, &["--method", "lst", "--matryoshka", "32,384", "--epochs", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("lst embedding") && text.contains("tuned (best epoch)"), "{text}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("best/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "FEATURE_EXTRACTION");
    assert_eq!(cfg["peft_type"], "RIME_LST");
    let rj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("best/rime.json")).unwrap()).unwrap();
    assert_eq!(rj["rime_matryoshka_dims"], serde_json::json!([32, 384]));
    assert!(out.join("feature_cache/meta.json").is_file() && out.join("feature_cache/train.anchor.f16").is_file());
    // `rime embed` runs the side network: a unit vector of the trained dim, unlike the base model's.
    let best = out.join("best");
    let embed = |adapter: Option<&Path>| {
        let mut c = rime();
        c.args(["embed", "--model", m.to_str().unwrap(), "--dim", "32"]);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(a);
        }
        let o = c.arg("A man is eating food.").output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
        v["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<f64>>()
    };
    let (tuned, base) = (embed(Some(&best)), embed(None));
    assert_eq!(tuned.len(), 32);
    assert!((tuned.iter().map(|x| x * x).sum::<f64>().sqrt() - 1.0).abs() < 1e-5);
    assert!(tuned.iter().zip(&base).any(|(a, b)| (a - b).abs() > 1e-4), "the LST adapter changed nothing");
    std::fs::remove_dir_all(&dir).ok();
}
