//! The shared trainer on the real MiniLM with in-memory data: a run without an output folder writes nothing
//! and returns the adapter as a value; the same run with a folder writes the CLI's files, and its adapter is
//! the value's, tensor for tensor (the run is seeded and deterministic); `TrainResult::save` writes the same
//! files later; bad configs name their field.

mod common;

use rime_peft::classifier::Method;
use rime_peft::lora::{LoraConfig, LoraInit};
use rime_peft::{ClassifyTask, Error, Event, TextClassData, TrainConfig};

fn model() -> Option<std::path::PathBuf> {
    match rime_io::locate_model("all-minilm-l6-v2") {
        Ok(p) => Some(p),
        Err(_) => {
            eprintln!("SKIPPED: all-minilm-l6-v2 not found, run scripts/fetch-models.sh");
            None
        }
    }
}

fn data(n: usize) -> TextClassData {
    let (mut texts, mut labels) = (vec![], vec![]);
    for i in 0..n {
        let good = i % 2 == 0;
        texts.push(if good { format!("lovely fresh tasty snack {i}") } else { format!("stale broken bag {i}") });
        labels.push(if good { "pos" } else { "neg" }.to_string());
    }
    TextClassData::new(texts, labels)
}

fn lora() -> Method {
    Method::Lora(LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec!["query".into(), "value".into()],
        rslora: false,
        init: LoraInit::Kaiming,
        seed: 0,
        dropout: 0.0,
        dora: false,
    })
}

fn cfg() -> TrainConfig {
    TrainConfig { batch_size: 8, max_length: 16, epochs: 2, lr: 5e-3, save_every: 0, ..TrainConfig::default() }
}

#[test]
fn in_memory_run_returns_the_adapter_and_writes_nothing_until_saved() {
    let Some(m) = model() else { return };
    let d = common::dev();
    let mut events = 0;
    let mut task = ClassifyTask::new(d, &m, lora(), data(16), Some(data(8)));
    let r = rime_peft::train(&mut task, &cfg(), None, &mut |_| events += 1).unwrap();
    assert!(events > 4, "events were reported");
    assert_eq!(r.summary.steps, 4);
    assert_eq!(r.summary.labels, vec!["neg".to_string(), "pos".to_string()]);
    assert!(r.adapter.get("base_model.model.head.weight").is_some(), "the head is in the adapter");
    assert!(r.adapter.tensors.iter().any(|t| t.name.contains("lora_A")), "LoRA factors are in the adapter");
    assert_eq!(r.log.iter().filter(|v| v["loss"].is_number()).count(), 4);
    assert_eq!(r.metrics["history"].as_array().map(Vec::len), Some(2));

    // The same run with an output folder: the CLI's files, and the same adapter.
    let dir = std::env::temp_dir().join(format!("rime-trainer-test-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let mut task = ClassifyTask::new(d, &m, lora(), data(16), Some(data(8)));
    let r2 = rime_peft::train(&mut task, &cfg(), Some(&dir), &mut |_| {}).unwrap();
    for f in ["best/adapter_config.json", "best/adapter_model.safetensors", "checkpoint/state.json"] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    for f in ["metrics.json", "metrics.jsonl", "training.png", "training.svg"] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    assert_eq!(r.adapter.tensors.len(), r2.adapter.tensors.len());
    for (a, b) in r.adapter.tensors.iter().zip(&r2.adapter.tensors) {
        assert_eq!((&a.name, &a.data), (&b.name, &b.data), "the runs differ in {}", a.name);
    }
    let saved = dir.join("saved");
    r.save(&saved).unwrap();
    for f in ["best/adapter_model.safetensors", "metrics.json", "metrics.jsonl", "training.png", "training.svg"] {
        assert!(saved.join(f).exists(), "save: {f} missing");
    }
    let back = rime_io::peft::PeftAdapter::load(saved.join("best")).unwrap();
    assert_eq!(back.tensors.len(), r.adapter.tensors.len());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_settings_name_their_field() {
    let Some(m) = model() else { return };
    let d = common::dev();
    let cases: Vec<(TrainConfig, &str)> = vec![
        (TrainConfig { batch_size: 0, ..cfg() }, "batch_size"),
        (TrainConfig { micro_batch_size: Some(9), ..cfg() }, "micro_batch_size"),
        (TrainConfig { resume: true, ..cfg() }, "resume"),
    ];
    for (c, field) in cases {
        let mut task = ClassifyTask::new(d, &m, lora(), data(16), None);
        match rime_peft::train(&mut task, &c, None, &mut |_| {}) {
            Err(Error::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected Error::Invalid, got {:?}", other.map(|r| r.summary)),
        }
    }
    let bad = TextClassData::new(vec!["a".into(), "b".into()], vec!["x".into()]);
    let mut task = ClassifyTask::new(d, &m, lora(), bad, None);
    assert!(matches!(
        rime_peft::train(&mut task, &cfg(), None, &mut |_| {}),
        Err(Error::Invalid { field: "train", .. })
    ));
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("rime-trainer-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    d
}

/// A batch whose graph exceeds the device's largest buffer binding is refused by the argument (batch_size),
/// with the rows that fit, before anything is written.
#[test]
fn oversized_batch_names_batch_size_and_what_fits() {
    let Some(m) = model() else { return };
    let d = common::dev();
    let out = tmp("huge");
    let mut task = ClassifyTask::new(d, &m, lora(), data(16), Some(data(8)));
    let c = TrainConfig { batch_size: 1 << 20, ..cfg() };
    match rime_peft::train(&mut task, &c, Some(&out), &mut |_| {}) {
        Err(Error::Invalid { field: "batch_size", message }) => assert!(message.contains("at most"), "{message}"),
        other => panic!("expected a batch_size refusal, got {:?}", other.map(|r| r.summary)),
    }
    assert!(!out.exists(), "a refused run creates no output folder");
}

/// The output folder: a non-empty one is refused without resume or overwrite; overwrite replaces the run's
/// files and nothing else; a run that fails before its first checkpoint leaves nothing behind; a finished
/// run is not resumed and its results are not touched.
#[test]
fn output_folder_is_never_clobbered_and_failures_leave_nothing() {
    let Some(m) = model() else { return };
    let d = common::dev();
    let out = tmp("out");
    std::fs::create_dir_all(out.join("best")).unwrap();
    std::fs::write(out.join("best/mine.txt"), "kept").unwrap();
    let mut task = ClassifyTask::new(d, &m, lora(), data(16), Some(data(8)));
    let r = rime_peft::train(&mut task, &cfg(), Some(&out), &mut |_| {});
    assert!(matches!(r, Err(Error::OutputExists { .. })), "{:?}", r.map(|r| r.summary));
    assert!(out.join("best/mine.txt").exists());
    let c = TrainConfig { overwrite: true, ..cfg() };
    let mut task = ClassifyTask::new(d, &m, lora(), data(16), Some(data(8)));
    rime_peft::train(&mut task, &c, Some(&out), &mut |_| {}).unwrap();
    assert!(out.join("best/adapter_model.safetensors").exists() && !out.join("best/mine.txt").exists());

    // Finished: a resume says so and leaves metrics.json as it was.
    let before = std::fs::read(out.join("metrics.json")).unwrap();
    let c = TrainConfig { resume: true, ..cfg() };
    let mut task = ClassifyTask::new(d, &m, lora(), data(16), Some(data(8)));
    match rime_peft::train(&mut task, &c, Some(&out), &mut |_| {}) {
        Err(Error::Invalid { field: "resume", message }) => assert!(message.contains("finished"), "{message}"),
        other => panic!("expected a refusal to resume a finished run, got {:?}", other.map(|r| r.summary)),
    }
    assert_eq!(std::fs::read(out.join("metrics.json")).unwrap(), before, "metrics.json is untouched");
    // Killed after the last checkpoint, before metrics.json: the resume only writes the results.
    std::fs::remove_file(out.join("metrics.json")).unwrap();
    let mut task = ClassifyTask::new(d, &m, lora(), data(16), Some(data(8)));
    let mut steps = 0;
    let r = rime_peft::train(&mut task, &c, Some(&out), &mut |e| steps += matches!(e, Event::Step { .. }) as usize);
    let r = r.unwrap();
    assert_eq!((steps, r.summary.steps), (0, 4), "no step is run again");
    let again: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    let first: serde_json::Value = serde_json::from_slice(&before).unwrap();
    assert_eq!((&again["history"], &again["eval_accuracy"]), (&first["history"], &first["eval_accuracy"]));
    // More epochs than it had: it continues (from the end of epoch 2), and the summary is not zeros.
    let c = TrainConfig { resume: true, epochs: 3, ..cfg() };
    let mut task = ClassifyTask::new(d, &m, lora(), data(16), Some(data(8)));
    let r = rime_peft::train(&mut task, &c, Some(&out), &mut |_| {}).unwrap();
    assert_eq!(r.summary.steps, 6);
    assert_eq!(r.metrics["history"].as_array().map(Vec::len), Some(3), "{}", r.metrics);
    assert!(r.summary.eval_accuracy > 0.0);
    std::fs::remove_dir_all(&out).ok();

    // Diverging before any checkpoint: an error, and no output folder.
    let c = TrainConfig { lr: 1e30, max_grad_norm: None, ..cfg() };
    let mut task = ClassifyTask::new(d, &m, lora(), data(16), Some(data(8)));
    let e = rime_peft::train(&mut task, &c, Some(&out), &mut |_| {}).map(|r| r.summary).unwrap_err();
    assert!(e.to_string().contains("non-finite") || e.to_string().contains("loss became"), "{e}");
    assert!(!out.exists(), "a failed run without a checkpoint leaves nothing: {:?}", std::fs::read_dir(&out).ok());
}
