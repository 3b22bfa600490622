//! End to end through the `rime` binary: info, a short fine-tune then eval of its adapter, and bad inputs
//! that must end in a clear error (never a panic).

mod common;

use std::path::PathBuf;

use common::{checkpoint_diff, checkpoint_diffs, model, rime, step_losses, tmp, train, write_labelled};

/// A one-epoch LoRA fine-tune on `data` (also its eval set) with `rime train`; returns its best/ adapter.
fn train_tiny(m: &std::path::Path, data: &std::path::Path, out: &std::path::Path, seed: &str) -> PathBuf {
    let o = train(m, data, out, &["--seed", seed]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out.join("best")
}

#[test]
fn info_shows_an_adapter_and_passes_self_check() {
    let out = rime().args(["info", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["chosen"]["name"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(v["self_check"]["ok"], true);
    // CPU adapters read frozen weights through texture twins, and the self-check then runs that path too.
    let twins = v["chosen"]["texture_twins"].as_bool().unwrap();
    assert_eq!(
        twins,
        v["chosen"]["cpu_adapter"].as_bool().unwrap() && std::env::var("RIME_TEXTURE_TWINS").as_deref() != Ok("0")
    );
    assert_eq!(v["self_check"]["detail"].as_str().unwrap().contains("texture twin"), twins);
}

#[test]
fn train_then_eval_a_lora_adapter() {
    let Some(m) = model() else { return };
    let d = tmp("train");
    let data = d.join("train.jsonl");
    write_labelled(&data, 24, "great tasty snack, love it", "stale and bland, a waste");
    let out = d.join("run");
    let st = rime()
        .args([
            "train",
            "--model",
            m.to_str().unwrap(),
            "--train",
            data.to_str().unwrap(),
            "--eval",
            data.to_str().unwrap(),
        ])
        .args([
            "--batch-size",
            "8",
            "--max-length",
            "16",
            "--epochs",
            "1",
            "--lr",
            "5e-3",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    for f in [
        "best/adapter_config.json",
        "best/adapter_model.safetensors",
        "metrics.json",
        "metrics.jsonl",
        "checkpoint/state.json",
        "training.png",
        "training.svg",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let svg = std::fs::read_to_string(out.join("training.svg")).unwrap();
    assert!(svg.contains("training loss") && svg.contains("eval accuracy"), "the plot has labelled axes");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    for k in ["eval_accuracy", "eval_macro_f1", "eval_loss", "train_examples_per_s"] {
        assert!(metrics[k].is_number(), "metrics.json lacks {k}");
    }
    let ev = rime()
        .args(["eval", "--model", m.to_str().unwrap(), "--adapter", out.join("best").to_str().unwrap()])
        .args(["--data", data.to_str().unwrap(), "--json", "--max-length", "16", "--batch-size", "8"])
        .output()
        .unwrap();
    assert!(ev.status.success(), "{}", String::from_utf8_lossy(&ev.stderr));
    let e: serde_json::Value = serde_json::from_slice(&ev.stdout).unwrap();
    let acc = e["accuracy"].as_f64().unwrap();
    for (batch, needle) in [("0", "--batch-size 0"), ("100000", "rows fit")] {
        let bad = rime()
            .args(["eval", "--model", m.to_str().unwrap(), "--adapter", out.join("best").to_str().unwrap()])
            .args(["--data", data.to_str().unwrap(), "--max-length", "16", "--batch-size", batch])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(!bad.status.success() && err.contains(needle) && !err.contains("panicked"), "{err}");
    }
    assert!(
        (acc - metrics["eval_accuracy"].as_f64().unwrap()).abs() < 1e-9,
        "eval of the saved adapter {acc} vs training's {}",
        metrics["eval_accuracy"]
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn bad_inputs_give_clear_errors() {
    let Some(m) = model() else { return };
    let d = tmp("bad");
    let empty = d.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let wrong = d.join("wrong.csv");
    std::fs::write(&wrong, "review,stars\n\"good\",5\n\"bad\",1\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--train".into(), empty.display().to_string()], "empty"),
        (vec!["--train".into(), wrong.display().to_string()], "review"),
        (vec!["--train".into(), wrong.display().to_string(), "--method".into(), "nope".into()], "--method"),
        (vec!["--train".into(), d.join("missing.jsonl").display().to_string()], "missing.jsonl"),
    ];
    // Settings no run can use name their flag (NaN never turns clipping off), and leave no --out behind.
    let good = d.join("good.jsonl");
    write_labelled(&good, 8, "crunchy", "soggy");
    let flag = |f: &str, v: &str| vec!["--train".to_string(), good.display().to_string(), f.into(), v.into()];
    let cases = cases.into_iter().chain([
        (flag("--max-grad-norm", "nan"), "--max-grad-norm"),
        (flag("--max-grad-norm", "-1"), "--max-grad-norm"),
        (flag("--warmup-ratio", "NaN"), "--warmup-ratio"),
        (flag("--warmup-ratio", "-1"), "--warmup-ratio"),
        (flag("--lr", "-1e-3"), "--lr"),
        (flag("--lr", "nan"), "--lr"),
        (flag("--max-length", "1"), "--max-length"),
        (flag("--epochs", "0"), "--epochs"),
        (flag("--eval-fraction", "1"), "--eval-fraction"),
        (flag("--batch-size", "100000"), "rows fit"),
    ]);
    for (args, needle) in cases {
        let o = rime()
            .args(["train", "--model", m.to_str().unwrap(), "--out", d.join("o").to_str().unwrap()])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: error should mention {needle}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert!(!d.join("o").exists(), "{args:?}: a failed run left its --out folder");
    }
    std::fs::remove_dir_all(&d).ok();
}

/// An interrupted run resumes from its checkpoint: steps continue from where the checkpoint left off, and the
/// resumed run ends with the same parameters as an uninterrupted one (deterministic, seeded).
#[test]
fn interrupted_training_resumes_from_its_checkpoint() {
    let Some(m) = model() else { return };
    let d = tmp("resume");
    let data = d.join("train.jsonl");
    write_labelled(&data, 32, "lovely fresh and tasty", "broken seal, stale");
    let run = |out: &std::path::Path, extra: &[&str]| {
        let o = rime()
            .args(["train", "--model", m.to_str().unwrap(), "--train", data.to_str().unwrap(), "--eval"])
            .arg(data.to_str().unwrap())
            .args(["--batch-size", "8", "--max-length", "16", "--epochs", "1", "--save-every", "1", "--out"])
            .arg(out.to_str().unwrap())
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let full = d.join("full");
    run(&full, &[]);
    let part = d.join("part");
    run(&part, &["--max-steps", "2"]);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(part.join("checkpoint/state.json")).unwrap()).unwrap();
    assert_eq!(state["global_step"], 2);
    let log = run(&part, &["--resume"]);
    assert!(log.contains("resumed from"), "{log}");
    let steps: Vec<u64> = std::fs::read_to_string(part.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["loss"].is_number())
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert_eq!(steps, vec![0, 1, 2, 3], "every step logged once across the interruption");
    let diff = checkpoint_diff(&full, &part);
    assert!(diff < 1e-5, "resumed run differs from the uninterrupted one by {diff}");
    std::fs::remove_dir_all(&d).ok();
}

/// greedy_soup over two adapters written by `rime train`: every candidate gets a logged decision, the soup's
/// held-out accuracy is at least the best candidate's, and the soup adapter evaluates with `rime eval`.
#[test]
fn greedy_soup_of_trained_adapters_logs_decisions_and_evaluates() {
    let Some(m) = model() else { return };
    let d = tmp("soup");
    let data = d.join("data.jsonl");
    write_labelled(&data, 24, "delicious, will buy again", "tasteless and overpriced");
    let adapters: Vec<PathBuf> =
        ["1", "2"].iter().map(|seed| train_tiny(&m, &data, &d.join(format!("ft{seed}")), seed)).collect();
    let yaml = format!(
        "merge_method: greedy_soup\nbase_model: {}\nmodels:\n  - model: {}\n  - model: {}\nparameters:\n  eval_data: {}\n  max_length: 16\n  batch_size: 8\n",
        m.display(),
        adapters[0].display(),
        adapters[1].display(),
        data.display()
    );
    let cfg = d.join("soup.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let soup = d.join("soup");
    let o = rime().args(["merge", cfg.to_str().unwrap(), "--out", soup.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(soup.join("merge_report.json")).unwrap()).unwrap();
    let decisions = report["decisions"].as_array().expect("decisions in merge_report.json");
    assert_eq!(decisions.len(), 2, "one decision per candidate: {report}");
    let best_alone = decisions.iter().filter_map(|x| x["accuracy_alone"].as_f64()).fold(0.0, f64::max);
    let soup_acc = report["soup_accuracy"].as_f64().unwrap();
    assert!(soup_acc >= best_alone - 1e-12, "greedy soup never lowers held-out accuracy: {soup_acc} < {best_alone}");
    let ev = rime()
        .args(["eval", "--model", m.to_str().unwrap(), "--adapter", soup.to_str().unwrap(), "--data"])
        .arg(data.to_str().unwrap())
        .args(["--json", "--max-length", "16", "--batch-size", "8"])
        .output()
        .unwrap();
    assert!(ev.status.success(), "{}", String::from_utf8_lossy(&ev.stderr));
    let e: serde_json::Value = serde_json::from_slice(&ev.stdout).unwrap();
    assert!((e["accuracy"].as_f64().unwrap() - soup_acc).abs() < 1e-9, "rime eval of the soup {e} vs {soup_acc}");
    std::fs::remove_dir_all(&d).ok();
}

/// aTLAS over two trained adapters: learns coefficients (written to atlas_coefficients.json), writes a merged
/// model plus a head adapter, and that pair evaluates with `rime eval`.
#[test]
fn atlas_over_trained_adapters_writes_a_model_that_evaluates() {
    let Some(m) = model() else { return };
    let d = tmp("atlas");
    let data = d.join("data.jsonl");
    write_labelled(&data, 16, "crunchy and sweet", "soggy, mouldy");
    let adapters: Vec<PathBuf> =
        ["3", "4"].iter().map(|seed| train_tiny(&m, &data, &d.join(format!("ft{seed}")), seed)).collect();
    let yaml = format!(
        "merge_method: atlas\nbase_model: {}\nmodels:\n  - model: {}\n  - model: {}\nparameters:\n  train_data: {}\n  eval_data: {}\n  steps: 2\n  examples: 8\n  batch_size: 8\n  max_length: 16\n",
        m.display(),
        adapters[0].display(),
        adapters[1].display(),
        data.display(),
        data.display()
    );
    let cfg = d.join("atlas.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let out = d.join("merged");
    let o = rime().args(["merge", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in
        ["model.safetensors", "config.json", "tokenizer.json", "atlas_coefficients.json", "head/adapter_config.json"]
    {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let ev = rime()
        .args(["eval", "--model", out.to_str().unwrap(), "--adapter", out.join("head").to_str().unwrap(), "--data"])
        .arg(data.to_str().unwrap())
        .args(["--json", "--max-length", "16", "--batch-size", "8"])
        .output()
        .unwrap();
    assert!(ev.status.success(), "{}", String::from_utf8_lossy(&ev.stderr));
    let e: serde_json::Value = serde_json::from_slice(&ev.stdout).unwrap();
    assert!(e["accuracy"].as_f64().is_some());
    std::fs::remove_dir_all(&d).ok();
}

/// A diverging run (absurd learning rate) stops with an error that names the step and the kept checkpoint.
#[test]
fn diverging_loss_stops_and_names_the_step() {
    let Some(m) = model() else { return };
    let d = tmp("nan");
    let data = d.join("d.jsonl");
    std::fs::write(&data, "{\"text\":\"good\",\"label\":\"a\"}\n{\"text\":\"bad\",\"label\":\"b\"}\n".repeat(2))
        .unwrap();
    let o = rime()
        .args(["train", "--model", m.to_str().unwrap(), "--train", data.to_str().unwrap(), "--eval"])
        .arg(data.to_str().unwrap())
        .args(["--lr", "1e30", "--max-grad-norm", "0", "--batch-size", "2", "--max-length", "8", "--epochs", "3"])
        .args(["--save-every", "1", "--out"])
        .arg(d.join("run").to_str().unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("at step") && err.contains("checkpoint") && !err.contains("panicked"), "{err}");
    assert!(d.join("run/checkpoint/state.json").exists(), "the last good checkpoint is kept");
    std::fs::remove_dir_all(&d).ok();
}

/// Causal-LM LoRA on SmolLM2: on one repeated prompt/completion pair the completion loss falls, and the
/// adapter it writes (peft layout, CAUSAL_LM) loads into `rime generate --adapter`.
#[test]
fn causal_lm_lora_learns_and_its_adapter_generates() {
    let gguf = match rime_io::models_dir().join("smollm2-135m-instruct.Q4_1.gguf") {
        p if p.exists() => p,
        _ => {
            eprintln!("SKIPPED: SmolLM2 GGUF not found, run scripts/fetch-models.sh");
            return;
        }
    };
    let d = tmp("clm");
    let data = d.join("d.jsonl");
    let row = serde_json::json!({"prompt": "Say the secret word.", "completion": "The secret word is pumpernickel."})
        .to_string();
    std::fs::write(&data, [row.as_str(); 4].join("\n")).unwrap();
    let out = d.join("run");
    let o = rime()
        .args(["train", "--task", "causal-lm", "--model", gguf.to_str().unwrap(), "--train", data.to_str().unwrap()])
        .args([
            "--text-column",
            "completion",
            "--text-pair-column",
            "prompt",
            "--batch-size",
            "2",
            "--max-length",
            "24",
        ])
        .args(["--epochs", "3", "--lr", "3e-3", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let losses = step_losses(&err);
    assert_eq!(losses.len(), 6, "{err}");
    assert!(losses[5] < 0.5 * losses[0], "completion loss should fall on a repeated example: {losses:?}");
    let cfg = std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap();
    assert!(cfg.contains("CAUSAL_LM") && cfg.contains("q_proj"), "{cfg}");
    let g = rime()
        .args(["generate", "--model", gguf.to_str().unwrap(), "--adapter", out.join("adapter").to_str().unwrap()])
        .args(["--prompt", "Say the secret word.", "--max-new-tokens", "4"])
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    std::fs::remove_dir_all(&d).ok();
}

/// QLoRA-style: `--weights q` trains LoRA on SmolLM2 with its Q4_1 / Q8_0 blocks held as they are; the
/// per-step losses follow the f32 run's (the same dequantized values, multiplied in another order), the run
/// reports the weight bytes, and `rime generate --weights q --adapter` decodes with the adapter.
#[test]
fn causal_lm_lora_on_quantized_weights_follows_the_f32_run() {
    let gguf = match rime_io::models_dir().join("smollm2-135m-instruct.Q4_1.gguf") {
        p if p.exists() => p,
        _ => {
            eprintln!("SKIPPED: SmolLM2 GGUF not found, run scripts/fetch-models.sh");
            return;
        }
    };
    let d = tmp("clm_q");
    let data = d.join("d.jsonl");
    let row = |p: &str, c: &str| serde_json::json!({"prompt": p, "completion": c}).to_string();
    let rows = [row("Say the secret word.", "The secret word is pumpernickel."), row("Name a colour.", "Teal.")];
    std::fs::write(&data, rows.join("\n")).unwrap();
    let run = |weights: &str| {
        let out = d.join(weights);
        let o = rime()
            .args([
                "train",
                "--task",
                "causal-lm",
                "--model",
                gguf.to_str().unwrap(),
                "--train",
                data.to_str().unwrap(),
            ])
            .args(["--text-column", "completion", "--text-pair-column", "prompt", "--batch-size", "2"])
            .args(["--max-length", "24", "--epochs", "3", "--lr", "3e-3", "--weights", weights])
            .args(["--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        let losses = step_losses(&err);
        (err, losses, out)
    };
    let (_, lf, _) = run("f32");
    let (err, lq, out) = run("q");
    assert!(err.contains("weights:") && err.contains("in GGUF blocks"), "{err}");
    assert_eq!(lq.len(), 3, "{err}");
    for (a, b) in lf.iter().zip(&lq) {
        assert!((a - b).abs() <= 1e-3 * a.abs().max(1.0), "f32 losses {lf:?}, quantized {lq:?}");
    }
    assert!(lq[2] < lq[0], "the loss falls: {lq:?}");
    let g = rime()
        .args(["generate", "--model", gguf.to_str().unwrap(), "--weights", "q"])
        .args(["--adapter", out.join("adapter").to_str().unwrap(), "--prompt", "Say the secret word."])
        .args(["--max-new-tokens", "3"])
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    std::fs::remove_dir_all(&d).ok();
}

/// QLoRA on the second decoder: Gemma 3 270M held quantized, chat data (two conversations through its chat
/// template), gradient checkpointing, and a batch of 2 × 48 tokens whose loss goes over the head's row parts a
/// chunk of tokens at a time (the whole [96, 262,144] logits are never built): the loss falls over three epochs,
/// the adapter is written in peft's layout, and `rime generate --weights q --adapter` decodes with it.
#[test]
fn causal_lm_chat_lora_on_quantized_gemma() {
    let gguf = match rime_io::models_dir().join("gemma-3-270m-q4_k_m.gguf") {
        p if p.exists() => p,
        _ => {
            eprintln!("SKIPPED: Gemma 3 270M GGUF not found, run scripts/fetch-models.sh");
            return;
        }
    };
    let d = tmp("clm_gemma_q");
    let data = d.join("chat.jsonl");
    let conv = |q: &str, a: &str| {
        serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            .to_string()
    };
    let rows = [conv("What is the secret word?", "The secret word is pumpernickel."), conv("Name a colour.", "Teal.")];
    std::fs::write(&data, rows.join("\n")).unwrap();
    let out = d.join("run");
    let o = rime()
        .args(["train", "--task", "causal-lm", "--model", gguf.to_str().unwrap(), "--train", data.to_str().unwrap()])
        .args(["--batch-size", "2", "--max-length", "48", "--epochs", "3", "--lr", "3e-3", "--weights", "q"])
        .args(["--gradient-checkpointing", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    assert!(err.contains("in GGUF blocks"), "{err}");
    let losses = step_losses(&err);
    assert_eq!(losses.len(), 3, "{err}");
    assert!(losses.iter().all(|l| l.is_finite()) && losses[2] < losses[0], "the loss falls: {losses:?}");
    let adapter = out.join("adapter");
    assert!(adapter.join("adapter_model.safetensors").exists() && adapter.join("adapter_config.json").exists());
    let g = rime()
        .args(["generate", "--model", gguf.to_str().unwrap(), "--weights", "q", "--chat"])
        .args(["--adapter", adapter.to_str().unwrap(), "--prompt", "What is the secret word?"])
        .args(["--max-new-tokens", "3"])
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    std::fs::remove_dir_all(&d).ok();
}

/// Causal-LM gradient accumulation: micro-batches of one row weigh by their scored tokens (completions of 9
/// and 2 tokens here), so `--batch-size 2 --micro-batch-size 1` logs the losses and writes the adapter of the
/// whole-batch run (up to f32 summation order).
#[test]
fn causal_lm_micro_batches_give_the_whole_batch_update() {
    let gguf = match rime_io::models_dir().join("smollm2-135m-instruct.Q4_1.gguf") {
        p if p.exists() => p,
        _ => {
            eprintln!("SKIPPED: SmolLM2 GGUF not found, run scripts/fetch-models.sh");
            return;
        }
    };
    let d = tmp("clm_micro");
    let data = d.join("d.jsonl");
    let row = |p: &str, c: &str| serde_json::json!({"prompt": p, "completion": c}).to_string();
    let rows = [row("Say the secret word.", "The secret word is pumpernickel, said the baker."), row("Yes?", "No.")];
    std::fs::write(&data, rows.join("\n")).unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = d.join(name);
        let o = rime()
            .args([
                "train",
                "--task",
                "causal-lm",
                "--model",
                gguf.to_str().unwrap(),
                "--train",
                data.to_str().unwrap(),
            ])
            .args(["--text-column", "completion", "--text-pair-column", "prompt", "--batch-size", "2"])
            .args(["--max-length", "24", "--epochs", "2", "--lr", "3e-3", "--out", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        step_losses(&err)
    };
    let whole = run("whole", &[]);
    let micro = run("micro", &["--micro-batch-size", "1"]);
    assert_eq!(whole.len(), 2);
    for (a, b) in whole.iter().zip(&micro) {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "whole-batch losses {whole:?}, micro-batches {micro:?}");
    }
    // Adam moves a parameter by about lr (3e-3) a step wherever its gradient is nonzero: a micro-batch
    // weighed by rows instead of tokens, or lost, would move a sizeable share of the adapter by a sizeable
    // fraction of that. Adam also turns the sign of a gradient element within rounding of zero into a whole
    // step, so a few elements may differ by up to 2 lr (measured: 60 of 460,800 here; in a similar run the
    // elements that differed had first moments of 1e-9..2e-7 against a median of 1.4e-5).
    let diffs = checkpoint_diffs(&d.join("whole"), &d.join("micro"));
    let off = diffs.iter().filter(|&&x| x > 2e-4).count();
    let worst = diffs.iter().copied().fold(0f32, f32::max);
    assert!(
        off * 1000 < diffs.len() && worst <= 2.5 * 3e-3,
        "micro-batched adapter differs from the whole batch's in {off} of {} elements by more than 2e-4 (worst {worst})",
        diffs.len()
    );
    std::fs::remove_dir_all(&d).ok();
}

/// `--gradient-checkpointing` recomputes each layer for its backward, LoRA dropout masks included: the run
/// ends with bitwise the adapter of the run that keeps every activation.
#[test]
fn causal_lm_gradient_checkpointing_gives_the_same_adapter() {
    let gguf = match rime_io::models_dir().join("smollm2-135m-instruct.Q4_1.gguf") {
        p if p.exists() => p,
        _ => {
            eprintln!("SKIPPED: SmolLM2 GGUF not found, run scripts/fetch-models.sh");
            return;
        }
    };
    let d = tmp("clm_ckpt");
    let data = d.join("d.jsonl");
    let row = |p: &str, c: &str| serde_json::json!({"prompt": p, "completion": c}).to_string();
    std::fs::write(&data, [row("Say the secret word.", "Pumpernickel."), row("Yes?", "No, never.")].join("\n"))
        .unwrap();
    let run = |name: &str, extra: &[&str]| {
        let o = rime()
            .args([
                "train",
                "--task",
                "causal-lm",
                "--model",
                gguf.to_str().unwrap(),
                "--train",
                data.to_str().unwrap(),
            ])
            .args(["--text-column", "completion", "--text-pair-column", "prompt", "--batch-size", "2"])
            .args(["--max-length", "16", "--epochs", "2", "--lr", "3e-3", "--lora-dropout", "0.2"])
            .args(["--out", d.join(name).to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run("plain", &[]);
    run("ckpt", &["--gradient-checkpointing"]);
    assert_eq!(checkpoint_diff(&d.join("plain"), &d.join("ckpt")), 0.0);
    std::fs::remove_dir_all(&d).ok();
}

/// Causal-LM training evaluates each epoch on --eval (completion loss, perplexity, best adapter kept), and a
/// run stopped after 2 steps then resumed from its checkpoint ends with the same adapter as a straight run,
/// with the whole LoRA family on: DoRA, PiSSA init (saved converted, split back on resume) and dropout.
#[test]
fn causal_lm_evaluates_and_resumes_to_the_same_adapter() {
    let gguf = match rime_io::models_dir().join("smollm2-135m-instruct.Q4_1.gguf") {
        p if p.exists() => p,
        _ => {
            eprintln!("SKIPPED: SmolLM2 GGUF not found, run scripts/fetch-models.sh");
            return;
        }
    };
    let d = tmp("clm_resume");
    let row = |p: &str, c: &str| serde_json::json!({"prompt": p, "completion": c}).to_string();
    let train = d.join("train.jsonl");
    let rows = [
        row("Colour of the sky?", "Blue."),
        row("Colour of grass?", "Green, mostly."),
        row("Colour of snow?", "White."),
        row("Colour of coal?", "Black as night."),
    ];
    std::fs::write(&train, rows.join("\n")).unwrap();
    let eval = d.join("eval.jsonl");
    std::fs::write(&eval, [row("Colour of milk?", "White."), row("Colour of blood?", "Red.")].join("\n")).unwrap();
    let run = |out: &std::path::Path, extra: &[&str]| {
        let o = rime()
            .args(["train", "--task", "causal-lm", "--model", gguf.to_str().unwrap()])
            .args(["--train", train.to_str().unwrap(), "--eval", eval.to_str().unwrap()])
            .args(["--text-column", "completion", "--text-pair-column", "prompt", "--batch-size", "2"])
            .args(["--max-length", "16", "--epochs", "2", "--lr", "2e-3", "--out", out.to_str().unwrap()])
            // Layer 0's q_proj and v_proj only: PiSSA's SVDs of all 60 targets would dominate the test's time.
            .args(["--targets", r"re:layers\.0\.self_attn\.(q|v)_proj$"])
            .args(["--dora", "--init", "pissa", "--lora-dropout", "0.1"])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        err
    };
    let straight = d.join("straight");
    let err = run(&straight, &[]);
    assert!(err.contains("epoch 0: eval loss") && err.contains("perplexity"), "{err}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(straight.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["steps"], 4, "{m}");
    let el = m["eval_loss"].as_f64().expect("eval_loss");
    assert!(el.is_finite() && el > 0.0 && (m["eval_perplexity"].as_f64().unwrap() - el.exp()).abs() < 1e-6 * el.exp());
    assert_eq!(m["history"].as_array().unwrap().len(), 2, "{m}");
    assert!(straight.join("training.png").exists());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(straight.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["use_dora"], true, "{cfg}");
    assert_eq!(cfg["r"], 16, "PiSSA is saved as a rank-2r LoRA of the unmodified base: {cfg}");
    assert_eq!(cfg["task_type"], "CAUSAL_LM", "{cfg}");
    let g = rime()
        .args(["generate", "--model", gguf.to_str().unwrap(), "--adapter", straight.join("adapter").to_str().unwrap()])
        .args(["--prompt", "Colour of the sky?", "--max-new-tokens", "2"])
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));

    let resumed = d.join("resumed");
    run(&resumed, &["--max-steps", "2"]);
    let state = std::fs::read_to_string(resumed.join("checkpoint/state.json")).unwrap();
    assert!(state.contains("\"global_step\": 2"), "{state}");
    let err = run(&resumed, &["--resume"]);
    assert!(err.contains("resumed from") && err.contains("at step 2"), "{err}");
    let worst = checkpoint_diff(&straight, &resumed);
    assert!(worst < 1e-5, "resumed run differs from the straight run by {worst}");
    std::fs::remove_dir_all(&d).ok();
}

/// `--micro-batch-size 3` runs each step of 8 rows as micro-batches of 3, 3 and 2 rows, on graphs of
/// different length buckets (short and long texts), and ends with the same adapter as whole batches.
#[test]
fn micro_batches_give_the_same_adapter_as_whole_batches() {
    let Some(m) = model() else { return };
    let d = tmp("micro");
    let data = d.join("d.jsonl");
    let long = "a crunchy, sweet and salty snack that my whole family enjoyed over the holidays, \
                with a lovely aroma and a fresh taste that lasted for weeks after opening the bag";
    let rows: Vec<String> = (0..16)
        .map(|i| {
            let text = if i % 3 == 0 { format!("{long} {i}") } else { format!("stale {i}") };
            serde_json::json!({"text": text, "label": if i % 2 == 0 { "great" } else { "other" }}).to_string()
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let run = |out: &str, extra: &[&str]| {
        let o = rime()
            .args(["train", "--model", m.to_str().unwrap(), "--train", data.to_str().unwrap(), "--eval"])
            .arg(&data)
            .args(["--batch-size", "8", "--max-length", "64", "--lr", "5e-3", "--max-steps", "2", "--out"])
            .arg(d.join(out))
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let losses: Vec<f64> = std::fs::read_to_string(d.join(out).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
            .collect::<Vec<f64>>();
        losses
    };
    let (lw, lm) = (run("whole", &[]), run("micro", &["--micro-batch-size", "3"]));
    // The step losses: the first is before any update (the row-weighted mean of the micro-batch losses).
    assert_eq!(lw.len(), 2, "{lw:?}");
    for (a, b) in lw.iter().zip(&lm) {
        assert!((a - b).abs() < 1e-5, "step losses {lw:?} vs micro-batched {lm:?}");
    }
    // Adam's first updates are about ±lr wherever a gradient is nonzero, so rounding in near-zero gradients
    // moves a parameter by a small fraction of lr (5e-3); a lost micro-batch would move them by about lr.
    let worst = checkpoint_diff(&d.join("whole"), &d.join("micro"));
    assert!(worst < 2e-4, "micro-batched adapter differs from whole batches by {worst}");
    let bad = train(&m, &data, &d.join("bad"), &["--micro-batch-size", "9"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("--micro-batch-size"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}
