//! mergekit's gradient lists, `slices` (passthrough layer stacking and merges over layer ranges),
//! `tokenizer_source` and `chat_template`, on small synthetic Llama- and BERT-shaped checkpoints, against
//! plain-Rust re-writings of mergekit 0.1.5's rules (`config.py: evaluate_setting`, `plan.py: plan_slice`,
//! `tokenizer/embed.py: PermutedVocabulary`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rime_io::{Checkpoint, Dtype, RawTensorOwned};
use rime_kernels::{Device, DeviceOptions};
use rime_merge::{merge, MergeConfig, MergeOptions, Param};

fn dev() -> &'static Device {
    static D: OnceLock<Device> = OnceLock::new();
    D.get_or_init(|| Device::new(&DeviceOptions::default()).expect("a wgpu adapter (lavapipe on CPU machines)"))
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rime-slices-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

type Model = BTreeMap<String, Vec<f32>>;

const H: usize = 4;

/// Tensor names and shapes of a tiny Llama (`model.layers.N.`) or BERT (`encoder.layer.N.`) with `layers`
/// layers and `vocab` tokens.
fn shapes(llama: bool, layers: usize, vocab: usize) -> Vec<(String, Vec<usize>)> {
    let mut v = Vec::new();
    if llama {
        v.push(("model.embed_tokens.weight".to_string(), vec![vocab, H]));
        for i in 0..layers {
            for s in ["self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight"] {
                v.push((format!("model.layers.{i}.{s}"), vec![H, H]));
            }
            v.push((format!("model.layers.{i}.input_layernorm.weight"), vec![H]));
        }
        v.push(("model.norm.weight".to_string(), vec![H]));
        v.push(("lm_head.weight".to_string(), vec![vocab, H]));
    } else {
        v.push(("embeddings.word_embeddings.weight".to_string(), vec![vocab, H]));
        v.push(("embeddings.LayerNorm.weight".to_string(), vec![H]));
        for i in 0..layers {
            for s in ["attention.self.query.weight", "attention.output.dense.weight", "output.dense.weight"] {
                v.push((format!("encoder.layer.{i}.{s}"), vec![H, H]));
            }
            v.push((format!("encoder.layer.{i}.output.LayerNorm.bias"), vec![H]));
        }
        v.push(("pooler.dense.weight".to_string(), vec![H, H]));
    }
    v
}

/// Writes a model folder (random tensors, config.json with the layer count and vocab size, and a
/// tokenizer.json holding `tokens` in id order).
fn write_model(dir: &Path, seed: u64, llama: bool, layers: usize, tokens: &[&str]) -> Model {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut raws = Vec::new();
    let mut vals = BTreeMap::new();
    for (n, s) in shapes(llama, layers, tokens.len()) {
        let v: Vec<f32> = (0..s.iter().product()).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        raws.push(RawTensorOwned {
            name: n.clone(),
            dtype: Dtype::F32,
            shape: s,
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        });
        vals.insert(n, v);
    }
    rime_io::write_safetensors_raw(dir.join("model.safetensors"), &raws, &BTreeMap::new()).unwrap();
    let arch = if llama { "llama" } else { "bert" };
    let cfg = format!(
        "{{\"model_type\": \"{arch}\", \"num_hidden_layers\": {layers}, \"hidden_size\": {H}, \"vocab_size\": {}}}",
        tokens.len()
    );
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let vocab: Vec<String> = tokens.iter().enumerate().map(|(i, t)| format!("\"{t}\": {i}")).collect();
    let tok = format!(
        "{{\"added_tokens\": [], \"model\": {{\"type\": \"WordLevel\", \"vocab\": {{{}}}, \"unk_token\": \"{}\"}}}}",
        vocab.join(", "),
        tokens[0]
    );
    std::fs::write(dir.join("tokenizer.json"), tok).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), "{\"chat_template\": \"{{ old }}\"}").unwrap();
    vals
}

fn load(dir: &Path) -> Model {
    let c = Checkpoint::open(dir).unwrap();
    c.names().iter().map(|n| (n.to_string(), c.get_f32(n).unwrap())).collect()
}

fn run(dir: &Path, yaml: &str, out: &str) -> rime_merge::Result<Model> {
    let cfg_path = dir.join(format!("{out}.yaml"));
    std::fs::write(&cfg_path, yaml).unwrap();
    let cfg = MergeConfig::from_file(&cfg_path)?;
    let out = dir.join(out);
    merge(dev(), &cfg, &out, &MergeOptions::default())?;
    assert!(!out.join(".rime-vocab").exists());
    Ok(load(&out))
}

fn config_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w}");
    }
}

/// mergekit 0.1.5's `evaluate_setting` for a list of numbers, as Python computes it.
fn mk_gradient(values: &[f64], t: f64) -> f64 {
    let scaled = t * (values.len() - 1) as f64;
    let i0 = scaled.trunc() as usize;
    let i1 = (values.len() - 1).min(i0 + 1);
    let frac = scaled - i0 as f64;
    (1.0 - frac) * values[i0] + frac * values[i1]
}

/// mergekit's `t` of a tensor when `models` are merged whole: layer i of L at i / (L - 1) (1 for L = 1),
/// everything else at 0.
fn mk_t(name: &str, layers: usize) -> f64 {
    let parts: Vec<&str> = name.split('.').collect();
    for i in 1..parts.len() {
        if ["layers", "layer"].contains(&parts[i - 1]) {
            if let Ok(n) = parts[i].parse::<usize>() {
                return if layers > 1 { n as f64 / (layers - 1) as f64 } else { 1.0 };
            }
        }
    }
    0.0
}

#[test]
fn gradient_values_are_mergekits() {
    for v in [vec![0.0, 1.0], vec![0.2, 0.9, 0.1], vec![1.0, 0.5, 0.3, 0.7, 0.0], vec![0.4]] {
        for k in 0..=20 {
            let t = k as f64 / 20.0;
            let got = Param::Gradient(v.clone()).at("x", t).unwrap();
            assert_eq!(got, mk_gradient(&v, t), "{v:?} at {t}");
        }
    }
    // A filter's value may itself be a gradient; `*` and no filter match everything; no match gives None.
    let p = Param::Filtered(vec![
        (Some("attn".into()), Param::Gradient(vec![0.0, 1.0])),
        (Some("*".into()), Param::Num(0.5)),
    ]);
    assert_eq!(p.at("model.layers.3.self_attn.q_proj.weight", 0.25), Some(0.25));
    assert_eq!(p.at("model.norm.weight", 0.25), Some(0.5));
    let q = Param::Filtered(vec![(Some("mlp".into()), Param::Num(2.0))]);
    assert_eq!(q.at("model.norm.weight", 0.0), None);
    // A model-level filter that does not match falls back to the global value (mergekit's scopes).
    assert_eq!(q.clone().or_else(Some(Param::Num(7.0))).at("model.norm.weight", 0.0), Some(7.0));
    assert_eq!(q.or_else(Some(Param::Num(7.0))).at("x.mlp.y", 0.0), Some(2.0));
}

#[test]
fn gradient_lists_over_llama_layers() {
    let d = tmpdir("grad-llama");
    let toks = ["a", "b", "c", "d", "e"];
    let a = write_model(&d.join("a"), 1, true, 4, &toks);
    let b = write_model(&d.join("b"), 2, true, 4, &toks);
    let y = "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: [0.0, 1.0]\n  - model: b\n    parameters:\n      weight: [{filter: self_attn, value: [1.0, 0.25, 0.0]}, {value: 0.5}]\nparameters: {normalize: false}\n";
    let got = run(&d, y, "out").unwrap();
    assert_eq!(got.len(), a.len());
    for (n, x) in &a {
        let t = mk_t(n, 4);
        let wa = mk_gradient(&[0.0, 1.0], t) as f32;
        let wb = if n.contains("self_attn") { mk_gradient(&[1.0, 0.25, 0.0], t) } else { 0.5 } as f32;
        let want: Vec<f32> = x.iter().zip(&b[n]).map(|(p, q)| wa * p + wb * q).collect();
        close(n, &got[n], &want);
    }
}

#[test]
fn gradient_lists_over_bert_layers_task_arithmetic() {
    let d = tmpdir("grad-bert");
    let toks = ["[PAD]", "x", "y"];
    let base = write_model(&d.join("base"), 3, false, 3, &toks);
    let m1 = write_model(&d.join("m1"), 4, false, 3, &toks);
    let y = "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: m1\n    parameters: {weight: [0.2, 1.0, 0.6]}\nparameters:\n  lambda: [{filter: attention, value: [1.0, 2.0]}, {value: 1.5}]\n";
    let got = run(&d, y, "out").unwrap();
    for (n, x) in &base {
        let t = mk_t(n, 3);
        let w = mk_gradient(&[0.2, 1.0, 0.6], t) as f32;
        let lambda = if n.contains("attention") { mk_gradient(&[1.0, 2.0], t) } else { 1.5 } as f32;
        // mergekit: base + lambda * w * (m1 - base) (normalize false).
        let want: Vec<f32> = x.iter().zip(&m1[n]).map(|(b, m)| b + lambda * (w * (m - b))).collect();
        close(n, &got[n], &want);
    }
}

#[test]
fn passthrough_slices_stack_llama_layers() {
    let d = tmpdir("stack");
    let toks = ["a", "b", "c"];
    let a = write_model(&d.join("a"), 5, true, 4, &toks);
    let b = write_model(&d.join("b"), 6, true, 4, &toks);
    let y = "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n  - sources:\n      - model: b\n        layer_range: [1, 4]\n        parameters:\n          scale: [{filter: o_proj, value: 0.0}, {value: [1.0, 3.0]}]\nmerge_method: passthrough\ndtype: float32\n";
    let got = run(&d, y, "out").unwrap();
    // mergekit's plan: out layers 0,1 = a 0,1; out 2,3,4 = b 1,2,3 at t = 0, 0.5, 1; embeddings from the first
    // slice's source, final norm and lm_head from the last slice's.
    let mut want: Model = BTreeMap::new();
    want.insert("model.embed_tokens.weight".into(), a["model.embed_tokens.weight"].clone());
    for n in ["model.norm.weight", "lm_head.weight"] {
        // post weights at t = 0 through the last slice's scale.
        want.insert(n.into(), b[n].iter().map(|x| x * 1.0).collect());
    }
    let sfx = ["self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"];
    for (o, (m, l, t)) in [(&a, 0, None), (&a, 1, None), (&b, 1, Some(0.0)), (&b, 2, Some(0.5)), (&b, 3, Some(1.0))]
        .into_iter()
        .enumerate()
    {
        for s in sfx {
            let x = &m[&format!("model.layers.{l}.{s}")];
            let scale = match t {
                None => 1.0,
                Some(_) if s.contains("o_proj") => 0.0,
                Some(t) => mk_gradient(&[1.0, 3.0], t) as f32,
            };
            want.insert(format!("model.layers.{o}.{s}"), x.iter().map(|v| v * scale).collect());
        }
    }
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (n, w) in &want {
        close(n, &got[n], w);
    }
    let cfg = config_json(&d.join("out"));
    assert_eq!(cfg["num_hidden_layers"], 5);
    assert_eq!(cfg["model_type"], "llama");
}

#[test]
fn linear_over_slices_uses_each_sources_layers() {
    let d = tmpdir("slice-linear");
    let toks = ["[PAD]", "x"];
    let a = write_model(&d.join("a"), 7, false, 4, &toks);
    let b = write_model(&d.join("b"), 8, false, 4, &toks);
    let y = "merge_method: linear\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 3]}\n      - {model: b, layer_range: [1, 4], parameters: {weight: 0.25}}\n    parameters:\n      weight: [1.0, 0.0]\nparameters: {normalize: false}\n";
    let got = run(&d, y, "out").unwrap();
    for o in 0..3 {
        let t = o as f64 / 2.0;
        let wa = mk_gradient(&[1.0, 0.0], t) as f32;
        for s in ["attention.self.query.weight", "output.LayerNorm.bias"] {
            let n = format!("encoder.layer.{o}.{s}");
            let want: Vec<f32> =
                a[&n].iter().zip(&b[&format!("encoder.layer.{}.{s}", o + 1)]).map(|(x, y)| wa * x + 0.25 * y).collect();
            close(&n, &got[&n], &want);
        }
    }
    // Outside the layers: t = 0, the same names from both.
    for n in ["embeddings.word_embeddings.weight", "pooler.dense.weight"] {
        let want: Vec<f32> = a[n].iter().zip(&b[n]).map(|(x, y)| x + 0.25 * y).collect();
        close(n, &got[n], &want);
    }
    assert!(!got.contains_key("encoder.layer.3.output.dense.weight"));
    assert_eq!(config_json(&d.join("out"))["num_hidden_layers"], 3);
}

#[test]
fn passthrough_of_one_model_scales() {
    let d = tmpdir("pt-models");
    let toks = ["a", "b"];
    let a = write_model(&d.join("a"), 9, true, 3, &toks);
    let y = "merge_method: passthrough\nmodels:\n  - model: a\n    parameters: {scale: [2.0, 0.0]}\n";
    let got = run(&d, y, "out").unwrap();
    for (n, x) in &a {
        let s = mk_gradient(&[2.0, 0.0], mk_t(n, 3)) as f32;
        close(n, &got[n], &x.iter().map(|v| v * s).collect::<Vec<_>>());
    }
    let y = "merge_method: passthrough\nmodels:\n  - model: a\n";
    assert_eq!(run(&d, y, "out2").unwrap(), a);
}

fn expect_err(d: &Path, yaml: &str, needles: &[&str]) {
    let e = run(d, yaml, "bad").expect_err(yaml).to_string();
    for n in needles {
        assert!(e.contains(n), "{e}\n  should name {n}");
    }
    assert!(!d.join("bad").exists());
}

#[test]
fn bad_slices_are_refused_naming_the_key() {
    let d = tmpdir("bad");
    write_model(&d.join("a"), 1, true, 4, &["a", "b"]);
    write_model(&d.join("b"), 2, true, 2, &["a", "b"]);
    write_model(&d.join("bert"), 3, false, 4, &["a", "b"]);
    let one = |m: &str, r: &str| {
        format!("merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {m}, layer_range: {r}}}\n")
    };
    expect_err(&d, &one("a", "[2, 6]"), &["slices[0].sources[0]", "layer_range [2, 6]", "4 layers"]);
    expect_err(&d, &one("a", "[2, 2]"), &["slices[0].sources[0]", "empty"]);
    expect_err(&d, &one("a", "[3, 1]"), &["layer_range [3, 1]"]);
    expect_err(&d, &one("a", "[1]"), &["layer_range must be"]);
    expect_err(
        &d,
        "merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n  - sources:\n      - {model: bert, layer_range: [0, 2]}\n",
        &["different architectures"],
    );
    expect_err(
        &d,
        "merge_method: linear\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n      - {model: b, layer_range: [0, 1]}\n",
        &["slices[0]", "different numbers of layers"],
    );
    expect_err(
        &d,
        "merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n      - {model: b, layer_range: [0, 2]}\n",
        &["slices[0]", "exactly one source"],
    );
    expect_err(
        &d,
        "merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2], layers: 3}\n",
        &["slices[0].sources[0]", "unknown key `layers`"],
    );
    expect_err(&d, "merge_method: passthrough\nslices:\n  - sorces: []\n", &["slices[0]", "unknown key `sorces`"]);
    expect_err(
        &d,
        "merge_method: task_arithmetic\nbase_model: b\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n",
        &["slices[0]", "base_model `b` is not among"],
    );
    expect_err(
        &d,
        "merge_method: linear\nmodels: [a]\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n",
        &["either `models` or `slices`"],
    );
    expect_err(&d, "merge_method: passthrough\nmodels: [a, b]\n", &["passthrough takes exactly one model"]);
    expect_err(
        &d,
        "merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2], parameters: {weight: 1}}\n",
        &["slices[0].sources[0]", "unknown parameter `weight`"],
    );
    expect_err(
        &d,
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: []}\n",
        &["`weight` is an empty list"],
    );
    expect_err(
        &d,
        "merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters: {weight: 1, density: [0.5, 1.5]}\n",
        &["density 1.5"],
    );
}

#[test]
fn tokenizer_source_reindexes_embedding_rows() {
    let d = tmpdir("tok");
    // a: [x, y, z]; b: [y, x, w]. Output vocabulary = a's (base) or b's (model: b).
    let a = write_model(&d.join("a"), 11, true, 2, &["x", "y", "z"]);
    let b = write_model(&d.join("b"), 12, true, 2, &["y", "x", "w"]);
    let row = |m: &Model, n: &str, r: usize| m[n][r * H..(r + 1) * H].to_vec();
    let add = |p: Vec<f32>, q: Vec<f32>| p.iter().zip(&q).map(|(x, y)| x + y).collect::<Vec<f32>>();
    let y = "merge_method: linear\nbase_model: a\nmodels:\n  - model: a\n  - model: b\nparameters: {normalize: false}\ntokenizer_source: base\n";
    let got = run(&d, y, "out").unwrap();
    for n in ["model.embed_tokens.weight", "lm_head.weight"] {
        // x: a0 + b1; y: a1 + b0; z: only a has it, so b's row is a's: 2 a2.
        let want =
            [add(row(&a, n, 0), row(&b, n, 1)), add(row(&a, n, 1), row(&b, n, 0)), add(row(&a, n, 2), row(&a, n, 2))]
                .concat();
        close(n, &got[n], &want);
    }
    close("norm", &got["model.norm.weight"], &add(a["model.norm.weight"].clone(), b["model.norm.weight"].clone()));
    assert_eq!(config_json(&d.join("out"))["vocab_size"], 3);
    let tj = std::fs::read_to_string(d.join("out/tokenizer.json")).unwrap();
    assert!(tj.contains("\"z\": 2"), "{tj}");

    let y = "merge_method: linear\nbase_model: a\nmodels:\n  - model: a\n  - model: b\nparameters: {normalize: false}\ntokenizer:\n  source: b\n  pad_to_multiple_of: 4\n";
    let got = run(&d, y, "out-b").unwrap();
    let n = "model.embed_tokens.weight";
    // y: a1 + b0; x: a0 + b1; w: only b has it: 2 b2; row 3 (padding): the mean of the three rows.
    let rows =
        [add(row(&a, n, 1), row(&b, n, 0)), add(row(&a, n, 0), row(&b, n, 1)), add(row(&b, n, 2), row(&b, n, 2))];
    let mean: Vec<f32> = (0..H).map(|j| rows.iter().map(|r| r[j]).sum::<f32>() / 3.0).collect();
    close(n, &got[n], &[rows.concat(), mean].concat());
    assert_eq!(config_json(&d.join("out-b"))["vocab_size"], 4);
    assert!(std::fs::read_to_string(d.join("out-b/tokenizer.json")).unwrap().contains("\"w\": 2"));

    let y = "merge_method: linear\nbase_model: a\nmodels: [a, b]\ntokenizer_source: union\n";
    expect_err(&d, y, &["tokenizer_source", "union"]);
    let y = "merge_method: linear\nmodels: [a, b]\ntokenizer_source: base\ntokenizer: {source: base}\n";
    expect_err(&d, y, &["not both"]);
    // union over equal vocabularies is that vocabulary.
    write_model(&d.join("a2"), 13, true, 2, &["x", "y", "z"]);
    let y = "merge_method: linear\nbase_model: a\nmodels: [a, a2]\ntokenizer_source: union\n";
    run(&d, y, "out-u").unwrap();
}

#[test]
fn chat_template_is_written_as_transformers_saves_it() {
    let d = tmpdir("chat");
    write_model(&d.join("a"), 1, true, 2, &["x", "y"]);
    let y = "merge_method: passthrough\nmodels: [a]\nchat_template: chatml\n";
    run(&d, y, "out").unwrap();
    let t = std::fs::read_to_string(d.join("out/chat_template.jinja")).unwrap();
    assert!(t.starts_with("{% for message in messages %}") && t.contains("<|im_start|>"), "{t}");
    let tc = std::fs::read_to_string(d.join("out/tokenizer_config.json")).unwrap();
    assert!(!tc.contains("chat_template"), "{tc}");
    let y = "merge_method: passthrough\nmodels: [a]\nchat_template: \"{% for m in messages %}{{ m.content }}{% endfor %}\"\n";
    run(&d, y, "out2").unwrap();
    let t = std::fs::read_to_string(d.join("out2/chat_template.jinja")).unwrap();
    assert_eq!(t, "{% for m in messages %}{{ m.content }}{% endfor %}");
    let y = "merge_method: passthrough\nmodels: [a]\nchat_template: auto\n";
    run(&d, y, "out3").unwrap();
    assert_eq!(std::fs::read_to_string(d.join("out3/chat_template.jinja")).unwrap(), "{{ old }}");
    expect_err(&d, "merge_method: passthrough\nmodels: [a]\nchat_template: chatmlx\n", &["chat_template: chatmlx"]);
}

/// mergekit's own examples (`scripts/mergekit_examples/`, adapted to local folder names) run on synthetic
/// Llama folders of the same names, all six of them.
#[test]
fn mergekits_examples_run() {
    let d = tmpdir("examples");
    let toks = ["<unk>", "a", "b", "c"];
    for (i, m) in ["lbase", "l1", "l2", "l3"].iter().enumerate() {
        write_model(&d.join(m), 20 + i as u64, true, 4, &toks);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/mergekit_examples");
    let mut ran = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "yml") {
            continue;
        }
        let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
        let yaml = std::fs::read_to_string(&p).unwrap();
        let got = run(&d, &yaml, &stem).unwrap_or_else(|e| panic!("{stem}: {e}"));
        assert!(got.contains_key("model.layers.0.self_attn.q_proj.weight"), "{stem}");
        ran += 1;
    }
    assert_eq!(ran, 6, "mergekit has six examples");
    let stacked = config_json(&d.join("orcamini-platy-44layer"));
    assert_eq!(stacked["num_hidden_layers"], 5);
}
