//! The bad-input corpus of the loaders: each case is built into a scratch folder from a tiny synthetic BERT or
//! Llama model (config.json + model.safetensors), opened and checked the way every rime entry point does
//! (`ModelConfig::from_file`, `Checkpoint::open`, `check_checkpoint`, `get_f32`), and must end in an error
//! naming the file and the tensor or field at fault.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rime_io::{Checkpoint, Dtype, ModelConfig, RawTensorOwned};
use serde_json::{json, Value};

/// A tiny BERT config: 2 layers, hidden 8, 2 heads, FFN 16, vocab 10, 16 positions.
fn bert_config() -> Value {
    json!({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 8, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 10, "max_position_embeddings": 16,
        "type_vocab_size": 2, "hidden_act": "gelu", "position_embedding_type": "absolute"})
}

/// A tiny Llama config: 2 layers, hidden 8, 2 heads (1 KV head), FFN 16, vocab 10, untied.
fn llama_config() -> Value {
    json!({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 16, "vocab_size": 10,
        "max_position_embeddings": 16, "hidden_act": "silu", "tie_word_embeddings": false})
}

/// The tensors `config` implies, filled with small finite values, as F32.
fn tensors_for(config: &Value) -> Vec<RawTensorOwned> {
    let cfg = ModelConfig::from_json_str(&config.to_string(), Path::new("config.json")).unwrap();
    cfg.expected_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let bytes = (0..n).flat_map(|i| ((i % 7) as f32 * 0.01).to_le_bytes()).collect();
            RawTensorOwned { name, dtype: Dtype::F32, shape, bytes }
        })
        .collect()
}

/// Writes a model folder `dir/name` from a config and tensors; returns the folder.
fn write_model(dir: &Path, name: &str, config: &Value, tensors: &[RawTensorOwned]) -> PathBuf {
    let m = dir.join(name);
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("config.json"), config.to_string()).unwrap();
    rime_io::write_safetensors_raw(m.join("model.safetensors"), tensors, &BTreeMap::new()).unwrap();
    m
}

/// What a loader does with a model folder: config, checkpoint, shapes and dtypes, then every float tensor.
fn load(m: &Path) -> rime_io::Result<()> {
    let cfg = ModelConfig::from_file(m)?;
    let ck = Checkpoint::open(m)?;
    cfg.check_checkpoint(&ck)?;
    for n in ck.names() {
        if ck.info(n)?.0.is_float() {
            ck.get_f32(n)?;
        }
    }
    Ok(())
}

fn load_err(m: &Path) -> String {
    match load(m) {
        Ok(()) => panic!("{}: loaded, expected an error", m.display()),
        Err(e) => e.to_string(),
    }
}

fn set(tensors: &mut [RawTensorOwned], name: &str, f: impl Fn(&mut RawTensorOwned)) {
    f(tensors.iter_mut().find(|t| t.name == name).unwrap_or_else(|| panic!("no {name}")))
}

fn with(config: &Value, key: &str, v: Value) -> Value {
    let mut c = config.clone();
    c[key] = v;
    c
}

#[test]
fn the_synthetic_models_load() {
    let dir = common::scratch("bad_ok");
    for (name, c) in [("bert", bert_config()), ("llama", llama_config())] {
        let mut t = tensors_for(&c);
        if name == "bert" {
            // known-harmless extras: the pooler and the position-id buffer
            t.extend(tensors_for(&c).into_iter().filter(|x| x.name == "embeddings.LayerNorm.bias").map(|mut x| {
                x.name = "pooler.dense.bias".into();
                x
            }));
            t.push(RawTensorOwned {
                name: "embeddings.position_ids".into(),
                dtype: Dtype::I64,
                shape: vec![1],
                bytes: vec![0; 8],
            });
        }
        load(&write_model(&dir, name, &c, &t)).unwrap();
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sizes_from_the_config_are_checked_before_anything_is_allocated() {
    let dir = common::scratch("bad_sizes");
    let t = tensors_for(&bert_config());
    for (key, v) in [("num_hidden_layers", json!(1_000_000_000_000u64)), ("num_hidden_layers", json!(u64::MAX))] {
        let m = write_model(&dir, "bert", &with(&bert_config(), key, v), &t);
        let e = load_err(&m);
        assert!(
            e.contains("num_hidden_layers") && e.contains("tensors for 2") && e.contains("encoder.layer.2."),
            "{e}"
        );
    }
    for (key, v, tensor) in [
        ("hidden_size", json!(1u64 << 40), "word_embeddings"),
        ("vocab_size", json!(1u64 << 50), "word_embeddings"),
        ("intermediate_size", json!(1u64 << 40), "intermediate.dense"),
        ("max_position_embeddings", json!(1u64 << 40), "position_embeddings"),
    ] {
        let m = write_model(&dir, "bert", &with(&bert_config(), key, v), &t);
        let e = load_err(&m);
        assert!(e.contains(tensor) && e.contains(key), "{key}: {e}");
    }
    let tl = tensors_for(&llama_config());
    let m = write_model(&dir, "llama", &with(&llama_config(), "num_hidden_layers", json!(1u64 << 60)), &tl);
    let e = load_err(&m);
    assert!(e.contains("num_hidden_layers") && e.contains("model.layers.2.self_attn.q_proj.weight"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn unimplemented_config_fields_are_refused_by_name() {
    let p = Path::new("/m/config.json");
    let cases = [
        (with(&bert_config(), "hidden_act", json!("relu")), "hidden_act"),
        (with(&bert_config(), "hidden_act", json!("gelu_fast")), "hidden_act"),
        (with(&bert_config(), "hidden_act", json!("no-such-activation")), "hidden_act"),
        (with(&bert_config(), "position_embedding_type", json!("relative_key")), "position_embedding_type"),
        (with(&bert_config(), "position_embedding_type", json!("relative_key_query")), "position_embedding_type"),
        (with(&bert_config(), "is_decoder", json!(true)), "is_decoder"),
        (with(&bert_config(), "add_cross_attention", json!(true)), "add_cross_attention"),
        (with(&llama_config(), "hidden_act", json!("gelu")), "hidden_act"),
        (with(&llama_config(), "rope_scaling", json!({"rope_type": "linear", "factor": 2.0})), "rope_scaling"),
        (with(&llama_config(), "rope_scaling", json!({"type": "dynamic", "factor": 2.0})), "rope_scaling"),
        (with(&llama_config(), "rope_scaling", json!({"rope_type": "llama3", "factor": 8.0})), "rope_scaling"),
        (with(&llama_config(), "attention_bias", json!(true)), "attention_bias"),
        (with(&llama_config(), "mlp_bias", json!(true)), "mlp_bias"),
        (with(&llama_config(), "head_dim", json!(16)), "head_dim"),
    ];
    for (c, field) in cases {
        let e = ModelConfig::from_json_str(&c.to_string(), p).unwrap_err().to_string();
        assert!(e.contains("/m/config.json") && e.contains(&format!("`{field}`")), "{field}: {e}");
    }
    // what is implemented stays accepted
    for c in [
        with(&bert_config(), "hidden_act", json!("gelu_new")),
        with(&bert_config(), "hidden_act", json!("gelu_pytorch_tanh")),
        with(&bert_config(), "is_decoder", json!(false)),
        with(&llama_config(), "rope_scaling", json!(null)),
        with(&llama_config(), "rope_scaling", json!({"rope_type": "default"})),
        with(&llama_config(), "attention_bias", json!(false)),
        with(&llama_config(), "head_dim", json!(4)),
    ] {
        ModelConfig::from_json_str(&c.to_string(), p).unwrap();
    }
}

#[test]
fn checkpoint_tensors_the_model_does_not_use_are_refused_by_name() {
    let dir = common::scratch("bad_unused");
    // a 1-layer config over a 2-layer checkpoint
    let m =
        write_model(&dir, "bert", &with(&bert_config(), "num_hidden_layers", json!(1)), &tensors_for(&bert_config()));
    let e = load_err(&m);
    assert!(e.contains("model.safetensors") && e.contains("16 checkpoint tensor(s)"), "{e}");
    assert!(e.contains("`encoder.layer.1.attention.output.LayerNorm.bias`") && e.contains("11 more"), "{e}");
    // tied embeddings beside an lm_head
    let m = write_model(
        &dir,
        "llama",
        &with(&llama_config(), "tie_word_embeddings", json!(true)),
        &tensors_for(&llama_config()),
    );
    let e = load_err(&m);
    assert!(e.contains("`lm_head.weight`") && e.contains("tie_word_embeddings"), "{e}");
    // a stray tensor
    let mut t = tensors_for(&bert_config());
    t.push(RawTensorOwned {
        name: "encoder.layer.0.extra".into(),
        dtype: Dtype::F32,
        shape: vec![1],
        bytes: vec![0; 4],
    });
    let e = load_err(&write_model(&dir, "stray", &bert_config(), &t));
    assert!(e.contains("`encoder.layer.0.extra`"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_weight_stored_as_an_integer_is_named_with_its_dtype() {
    let dir = common::scratch("bad_dtype");
    let mut t = tensors_for(&bert_config());
    set(&mut t, "encoder.layer.0.attention.self.query.weight", |x| x.dtype = Dtype::I32);
    let e = load_err(&write_model(&dir, "bert", &bert_config(), &t));
    assert!(e.contains("model.safetensors") && e.contains("`encoder.layer.0.attention.self.query.weight`"), "{e}");
    assert!(e.contains("is I32") && e.contains("float type"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn non_finite_weights_are_refused_where_they_enter() {
    let dir = common::scratch("bad_nan");
    type Edit = Box<dyn Fn(&mut RawTensorOwned)>;
    let cases: [(&str, Edit); 4] = [
        (
            "encoder.layer.0.attention.self.query.weight",
            Box::new(|x| x.bytes[4..8].copy_from_slice(&f32::NAN.to_le_bytes())),
        ),
        ("embeddings.LayerNorm.weight", Box::new(|x| x.bytes[..4].copy_from_slice(&f32::INFINITY.to_le_bytes()))),
        (
            "embeddings.word_embeddings.weight",
            Box::new(|x| x.bytes = x.bytes.chunks(4).flat_map(|_| f32::NAN.to_le_bytes()).collect()),
        ),
        // an F64 value beyond f32's range becomes Inf on conversion
        (
            "encoder.layer.1.output.dense.bias",
            Box::new(|x| {
                x.dtype = Dtype::F64;
                x.bytes =
                    (0..x.bytes.len() / 4).flat_map(|i| if i == 3 { 1e39f64 } else { 0.5 }.to_le_bytes()).collect();
            }),
        ),
    ];
    for (name, f) in cases {
        let mut t = tensors_for(&bert_config());
        set(&mut t, name, f);
        let e = load_err(&write_model(&dir, "bert", &bert_config(), &t));
        assert!(e.contains("model.safetensors") && e.contains(&format!("`{name}`")) && e.contains("non-finite"), "{e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_header_of_100k_extra_tensors_loads_in_linear_time() {
    let dir = common::scratch("bad_many");
    let mut t = tensors_for(&bert_config());
    let n = 100_000;
    t.extend((0..n).map(|i| RawTensorOwned {
        name: format!("extra.{i}"),
        dtype: Dtype::F32,
        shape: vec![0],
        bytes: vec![],
    }));
    let m = write_model(&dir, "bert", &bert_config(), &t);
    let ck = Checkpoint::open(&m).unwrap();
    assert_eq!(ck.len(), t.len());
    assert_eq!(ck.info("extra.99999").unwrap().1, &[0]);
    let e = load_err(&m);
    assert!(e.contains(&format!("{n} checkpoint tensor(s)")) && e.contains("`extra.0`"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_real_minilm_with_bad_configs() {
    let Some(src) = common::model("all-minilm-l6-v2") else { return };
    let dir = common::scratch("bad_minilm");
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let base: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    for (key, v, want) in [
        ("num_hidden_layers", json!(5), "`encoder.layer.5.attention.output.LayerNorm.bias`"),
        ("num_hidden_layers", json!(1_000_000_000_000u64), "tensors for 6"),
        ("hidden_act", json!("relu"), "`hidden_act`"),
    ] {
        std::fs::write(dir.join("config.json"), with(&base, key, v).to_string()).unwrap();
        let e = ModelConfig::from_file(&dir).and_then(|c| c.check_checkpoint(&Checkpoint::open(&dir)?)).unwrap_err();
        assert!(e.to_string().contains(want), "{key}: {e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
