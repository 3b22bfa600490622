//! `rime embed` and `rime inspect` through the binary: embeddings against sentence-transformers' (the golden
//! `mean_pooled_l2` of ../shared/golden/minilm_forward.safetensors), batching that must not change a text's
//! embedding, and inspection of a model folder, a GGUF file, a peft adapter and corrupt files.

mod common;

use std::path::PathBuf;
use std::process::Output;

use common::{model_named as model, rime, tmp};
use rime_io::Checkpoint;
use serde_json::Value;

fn golden(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden").join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIPPED: golden {} not found (../shared/golden beside the checkout)", p.display());
        None
    }
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "rime failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Runs `rime embed --model m ARGS`, returns (text, embedding) per output line.
fn embed(m: &PathBuf, args: &[&str]) -> Vec<(String, Vec<f32>)> {
    let out = rime().arg("embed").arg("--model").arg(m).args(args).output().unwrap();
    ok(&out)
        .lines()
        .map(|l| {
            assert!(l.starts_with("{\"text\":"), "text comes first: {l:.80}");
            let v: Value = serde_json::from_str(l).unwrap();
            let e = v["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            (v["text"].as_str().unwrap().to_string(), e)
        })
        .collect()
}

fn norm(a: &[f32]) -> f32 {
    a.iter().map(|x| x * x).sum::<f32>().sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (norm(a) * norm(b))
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

fn golden_sentences(ck: &Checkpoint) -> Vec<String> {
    serde_json::from_str(&ck.metadata()["sentences"]).unwrap()
}

// Longer than 32 tokens: a batch holding it is padded to 64 positions, the short texts alone to 32 or less.
const LONG: &str = "The package arrived two days late, the box was crushed on one side, and although the cookies \
                    inside were mostly intact, several had broken into crumbs, which made the gift look careless \
                    when I handed it to my neighbour on her birthday.";

#[test]
fn embed_matches_sentence_transformers() {
    let (Some(g), Some(m)) = (golden("minilm_forward.safetensors"), model("all-minilm-l6-v2")) else { return };
    let ck = Checkpoint::open(&g).unwrap();
    let sentences = golden_sentences(&ck);
    assert_eq!(sentences.len(), 4);
    let want = ck.get_f32("mean_pooled_l2").unwrap();
    let h = want.len() / 4;
    let args: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let got = embed(&m, &args);
    assert_eq!(got.len(), 4);
    let mut worst = 0f32;
    for (r, (text, e)) in got.iter().enumerate() {
        assert_eq!(text, &sentences[r], "output in input order");
        assert_eq!(e.len(), h);
        let w = &want[r * h..(r + 1) * h];
        let cos = cosine(e, w);
        worst = worst.max(max_abs(e, w));
        assert!(cos >= 0.99999, "row {r} ({text:?}): cosine with sentence-transformers {cos}");
        assert!((norm(e) - 1.0).abs() < 1e-5, "row {r}: norm {}", norm(e));
    }
    eprintln!("embed vs sentence-transformers: max abs diff {worst:.3e}");
}

#[test]
fn one_text_alone_equals_the_same_text_in_a_batch() {
    let (Some(g), Some(m)) = (golden("minilm_forward.safetensors"), model("all-minilm-l6-v2")) else { return };
    let sentences = golden_sentences(&Checkpoint::open(&g).unwrap());
    let d = tmp("batch");
    let file = d.join("texts.txt");
    let mut lines: Vec<&str> = sentences.iter().map(String::as_str).collect();
    lines.insert(1, LONG);
    lines.insert(3, "");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let f = file.to_str().unwrap();
    // One batch of 5 (padded to the long text), batches of 2, and each of two texts alone.
    let batch = embed(&m, &["--file", f, "--batch-size", "8"]);
    let small = embed(&m, &["--file", f, "--batch-size", "2"]);
    assert_eq!(batch.len(), 5, "the empty line is skipped");
    assert_eq!(batch[1].0, LONG);
    assert_eq!(small.len(), 5);
    let mut worst = 0f32;
    for (a, b) in batch.iter().zip(&small) {
        assert_eq!(a.0, b.0);
        worst = worst.max(max_abs(&a.1, &b.1));
    }
    for text in ["short", sentences[0].as_str()] {
        let alone = embed(&m, &[text]);
        let inb = &batch.iter().find(|(t, _)| t == text).unwrap().1;
        let cos = cosine(&alone[0].1, inb);
        assert!(cos >= 0.99999, "{text:?}: cosine alone vs in a batch {cos}");
        worst = worst.max(max_abs(&alone[0].1, inb));
    }
    eprintln!("alone vs batched: max abs diff {worst:.3e}");
    assert!(worst < 1e-5, "padding leaks into embeddings: max abs diff {worst}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn no_normalize_gives_the_mean_pool() {
    let (Some(g), Some(m)) = (golden("minilm_forward.safetensors"), model("all-minilm-l6-v2")) else { return };
    let ck = Checkpoint::open(&g).unwrap();
    let sentences = golden_sentences(&ck);
    let want = ck.get_f32("mean_pooled").unwrap();
    let h = want.len() / 4;
    let got = embed(&m, &["--no-normalize", &sentences[0], &sentences[2]]);
    for (e, r) in got.iter().map(|x| &x.1).zip([0, 2]) {
        let w = &want[r * h..(r + 1) * h];
        assert!((norm(e) - 1.0).abs() > 0.01, "row {r}: --no-normalize still gives norm {}", norm(e));
        assert!((norm(e) - norm(w)).abs() < 1e-3 * norm(w), "row {r}: norm {} vs torch {}", norm(e), norm(w));
        assert!(cosine(e, w) >= 0.99999, "row {r}: cosine of mean_pooled {}", cosine(e, w));
    }
}

#[test]
fn embed_with_the_golden_lora_adapter() {
    let (Some(ad), Some(m)) = (golden("minilm_lora_peft_adapter"), model("all-minilm-l6-v2")) else { return };
    let text = "These gummy fruits taste great.";
    let base = embed(&m, &[text]);
    let tuned = embed(&m, &["--adapter", ad.to_str().unwrap(), text]);
    let cos = cosine(&base[0].1, &tuned[0].1);
    assert!((norm(&tuned[0].1) - 1.0).abs() < 1e-5);
    // Three AdamW steps at lr 1e-3 move B away from zero: the embedding moves, a little.
    assert!(cos < 0.999999 && cos > 0.9, "cosine base vs adapted {cos}");
    eprintln!("base vs adapted cosine {cos}");
}

#[test]
fn embed_bad_inputs_are_clear_errors() {
    let Some(m) = model("all-minilm-l6-v2") else { return };
    let d = tmp("bad-embed");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![], "no text"),
        (vec!["--file".into(), d.join("absent.txt").display().to_string()], "absent.txt"),
        (vec!["--adapter".into(), d.join("nope").display().to_string(), "x".into()], "nope"),
        (vec!["--batch-size".into(), "0".into(), "x".into()], "--batch-size"),
    ];
    for (args, needle) in cases {
        let out = rime().arg("embed").arg("--model").arg(&m).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: error should name {needle}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

fn inspect_json(path: &PathBuf) -> Value {
    let out = rime().arg("inspect").arg(path).arg("--json").output().unwrap();
    serde_json::from_str(&ok(&out)).unwrap()
}

fn tensor<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["tensors"].as_array().unwrap().iter().find(|t| t["name"] == name).unwrap_or_else(|| panic!("no {name}"))
}

fn sum_params(v: &Value) -> u64 {
    v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| !t["dtype"].as_str().unwrap().starts_with('I'))
        .map(|t| {
            let n: u64 = t["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).product();
            assert_eq!(t["parameters"].as_u64(), Some(n), "{}", t["name"]);
            n
        })
        .sum()
}

#[test]
fn inspect_minilm_folder() {
    let Some(m) = model("all-minilm-l6-v2") else { return };
    let v = inspect_json(&m);
    assert_eq!(v["format"], "safetensors");
    assert_eq!(v["architecture"]["model_type"], "bert");
    assert_eq!(v["architecture"]["num_hidden_layers"], 6);
    assert_eq!(v["tensor_count"], 104);
    assert_eq!(v["dtypes"]["F32"]["tensors"], 103);
    assert_eq!(v["dtypes"]["I64"]["tensors"], 1);
    // Hugging Face's BertModel.num_parameters() of all-MiniLM-L6-v2 (position_ids is a buffer).
    assert_eq!(v["parameters"], 22_713_216);
    assert_eq!(sum_params(&v), 22_713_216);
    assert_eq!(v["integer_buffers"], serde_json::json!(["embeddings.position_ids"]));
    let w = tensor(&v, "embeddings.word_embeddings.weight");
    assert_eq!(w["dtype"], "F32");
    assert_eq!(w["shape"], serde_json::json!([30522, 384]));
    assert!(v["rime"].as_str().unwrap().starts_with("can build it (bert)"), "{}", v["rime"]);
    // Natural order: layer.2 before layer.10 would matter for larger models; here 0..5 ascend.
    let names: Vec<&str> = v["tensors"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    let i0 = names.iter().position(|n| n.starts_with("encoder.layer.0.")).unwrap();
    let i5 = names.iter().position(|n| n.starts_with("encoder.layer.5.")).unwrap();
    assert!(i0 < i5);
    // Text output names the same facts; the safetensors file itself works too.
    let text = ok(&rime().arg("inspect").arg(m.join("model.safetensors")).output().unwrap());
    assert!(text.contains("parameters:   22713216"), "{text}");
    assert!(text.contains("model_type=bert"), "{text}");
    assert!(text.contains("encoder.layer.3.output.dense.weight"), "{text}");
}

#[test]
fn inspect_gguf_file() {
    let Some(g) = model("smollm2-135m-instruct.Q4_1.gguf") else { return };
    let v = inspect_json(&g);
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["architecture"]["model_type"], "llama");
    assert_eq!(v["architecture"]["block_count"], 30);
    assert_eq!(v["architecture"]["attention.head_count"], 9);
    assert_eq!(v["architecture"]["attention.head_count_kv"], 3);
    assert_eq!(v["architecture"]["vocab_size"], 49152);
    assert_eq!(v["tensor_count"], 272);
    assert_eq!(v["dtypes"]["Q4_1"]["tensors"], 210);
    assert_eq!(v["dtypes"]["Q8_0"]["tensors"], 1);
    assert_eq!(v["dtypes"]["F32"]["tensors"], 61);
    // SmolLM2-135M: 134,515,008 parameters (tied embeddings: no output.weight).
    assert_eq!(v["parameters"], 134_515_008);
    assert_eq!(sum_params(&v), 134_515_008);
    assert_eq!(tensor(&v, "token_embd.weight")["shape"], serde_json::json!([49152, 576]));
    assert_eq!(tensor(&v, "blk.0.attn_k.weight")["shape"], serde_json::json!([192, 576]));
    assert!(v["metadata"]["tokenizer.chat_template"].as_str().unwrap().contains("im_start"));
    assert!(v["metadata"]["tokenizer.ggml.tokens"].as_str().unwrap().contains("array of 49152"));
    let names: Vec<&str> = v["tensors"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    let i2 = names.iter().position(|n| n.starts_with("blk.2.")).unwrap();
    let i10 = names.iter().position(|n| n.starts_with("blk.10.")).unwrap();
    assert!(i2 < i10, "natural order of layers");
}

#[test]
fn inspect_golden_peft_adapter() {
    let Some(ad) = golden("minilm_lora_peft_adapter") else { return };
    let v = inspect_json(&ad);
    assert_eq!(v["format"], "peft_adapter");
    assert_eq!(v["peft"]["peft_type"], "LORA");
    assert_eq!(v["peft"]["r"], 8);
    assert_eq!(v["peft"]["lora_alpha"], 16.0);
    assert_eq!(v["peft"]["scale"], 2.0);
    assert_eq!(v["peft"]["target_modules"], serde_json::json!(["query", "value"]));
    assert_eq!(v["peft"]["lora_pairs"], 12);
    assert_eq!(v["architecture"]["base_model_name_or_path"], "sentence-transformers/all-MiniLM-L6-v2");
    assert_eq!(v["tensor_count"], 24);
    // 6 layers × {query, value} × (A [8, 384] + B [384, 8])
    assert_eq!(v["parameters"], 6 * 2 * 2 * 8 * 384);
    let a = tensor(&v, "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight");
    assert_eq!(a["shape"], serde_json::json!([8, 384]));
    // The config file itself points at the folder.
    let w = inspect_json(&ad.join("adapter_config.json"));
    assert_eq!(w["format"], "peft_adapter");
}

#[test]
fn inspect_corrupt_files_are_clear_errors() {
    let d = tmp("corrupt");
    let mut cases: Vec<(PathBuf, Vec<u8>)> = vec![
        (d.join("garbage.safetensors"), b"this is not a checkpoint at all, just text".to_vec()),
        (d.join("tiny.safetensors"), b"abc".to_vec()),
        (d.join("notes.txt"), b"hello world, nothing to see".to_vec()),
        (d.join("bad.gguf"), b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff".to_vec()),
    ];
    // A header claiming more tensor data than the file holds.
    let header = br#"{"w":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}}"#;
    let mut short = (header.len() as u64).to_le_bytes().to_vec();
    short.extend_from_slice(header);
    short.extend_from_slice(&[0u8; 16]);
    cases.push((d.join("short.safetensors"), short));
    if let Ok(m) = rime_io::locate_model("all-minilm-l6-v2") {
        let bytes = std::fs::read(m.join("model.safetensors")).unwrap();
        cases.push((d.join("truncated.safetensors"), bytes[..4096].to_vec()));
    }
    if let Ok(g) = rime_io::locate_model("smollm2-135m-instruct.Q4_1.gguf") {
        let mut f = std::fs::File::open(g).unwrap();
        let mut buf = vec![0u8; 4096];
        std::io::Read::read_exact(&mut f, &mut buf).unwrap();
        cases.push((d.join("truncated.gguf"), buf));
    }
    for (path, bytes) in &cases {
        std::fs::write(path, bytes).unwrap();
        let out = rime().arg("inspect").arg(path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {err}", path.display());
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(err.contains(name), "the error names the file {name}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(out.stdout.is_empty(), "nothing on stdout for {name}");
    }
    // A folder with nothing rime reads, and a missing path.
    for p in [d.join("empty"), d.join("missing")] {
        if p.ends_with("empty") {
            std::fs::create_dir_all(&p).unwrap();
        }
        let out = rime().arg("inspect").arg(&p).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(p.to_str().unwrap()), "{err}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn inspect_sharded_checkpoint_and_unknown_architecture() {
    let d = tmp("sharded");
    let meta = std::collections::BTreeMap::new();
    let a = [1f32; 12];
    let b = [2f32; 10];
    rime_io::write_safetensors(
        d.join("model-00001-of-00002.safetensors"),
        &[("layers.2.w".to_string(), vec![3, 4], &a[..])],
        &meta,
    )
    .unwrap();
    rime_io::write_safetensors_as(
        d.join("model-00002-of-00002.safetensors"),
        &[("layers.10.w".to_string(), vec![10], &b[..])],
        &meta,
        rime_io::StoreDtype::BF16,
    )
    .unwrap();
    let index = serde_json::json!({"metadata": {"total_size": 68}, "weight_map": {
        "layers.2.w": "model-00001-of-00002.safetensors", "layers.10.w": "model-00002-of-00002.safetensors"}});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::write(d.join("config.json"), r#"{"model_type": "mamba", "architectures": ["MambaForCausalLM"]}"#).unwrap();
    let v = inspect_json(&d);
    assert_eq!(v["format"], "safetensors");
    assert_eq!(v["files"].as_array().unwrap().len(), 2);
    assert_eq!(v["tensor_count"], 2);
    assert_eq!(v["parameters"], 22);
    assert_eq!(v["dtypes"]["BF16"]["tensors"], 1);
    assert_eq!(v["architecture"]["model_type"], "mamba");
    assert!(v["rime"].as_str().unwrap().contains("cannot build"), "{}", v["rime"]);
    assert_eq!(v["tensors"][0]["name"], "layers.2.w", "natural order");
    // A shard listed in the index but missing is an error naming it.
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    let out = rime().arg("inspect").arg(&d).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// A tiny BERT folder (config.json + model.safetensors) whose config is `config` and whose tensor `int_weight`,
/// if any, is stored as I32.
fn tiny_bert(dir: &std::path::Path, layers: u64, int_weight: Option<&str>) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 6, "max_position_embeddings": 16});
    let cfg = rime_io::ModelConfig::from_json_str(&config.to_string(), std::path::Path::new("c")).unwrap();
    let tensors: Vec<rime_io::RawTensorOwned> = cfg
        .expected_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let dtype = if int_weight == Some(name.as_str()) { rime_io::Dtype::I32 } else { rime_io::Dtype::F32 };
            rime_io::RawTensorOwned { name, dtype, shape, bytes: vec![0; 4 * n] }
        })
        .collect();
    rime_io::write_safetensors_raw(dir.join("model.safetensors"), &tensors, &Default::default()).unwrap();
    let mut config = config;
    config["num_hidden_layers"] = layers.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

#[test]
fn inspect_names_an_integer_weight_and_survives_a_huge_layer_count() {
    let d = tmp("inspect-bad-config");
    let q = "encoder.layer.0.attention.self.query.weight";
    tiny_bert(&d.join("int"), 1, Some(q));
    let v = inspect_json(&d.join("int"));
    let says = v["rime"].as_str().unwrap();
    assert!(says.contains(q) && says.contains("is I32") && !says.contains("can build it"), "{says}");
    tiny_bert(&d.join("huge"), 1_000_000_000_000, None);
    let v = inspect_json(&d.join("huge"));
    let says = v["rime"].as_str().unwrap();
    assert!(says.contains("num_hidden_layers") && says.contains("tensors for 1"), "{says}");
    let out = rime().arg("embed").arg("--model").arg(d.join("huge")).arg("x").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("num_hidden_layers") && !err.contains("memory allocation"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}
