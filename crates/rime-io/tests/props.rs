//! Property tests of the parsers: arbitrary bytes and mutated valid files (flipped bytes, truncations, huge
//! counts and offsets) given to the safetensors, config.json, tokenizer.json and dataset readers always end in
//! Ok or an Error: never a panic, a hang or an allocation abort. Case counts stay modest (seconds in CI).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proptest::collection::vec;
use proptest::prelude::*;
use rime_io::{Checkpoint, Columns, Dataset, DatasetFormat, ModelConfig, Tokenizer};
use serde_json::{json, Value};

fn config() -> ProptestConfig {
    ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() }
}

/// One scratch file per test (cases run one after another within a test).
fn file(test: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rime-io-props-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A small valid safetensors file: three F32 tensors and metadata.
fn valid_safetensors() -> Vec<u8> {
    let p = file("valid", "v.safetensors");
    let a = [1.0f32, 2.0, 3.0, 4.0];
    let tensors = vec![
        ("a".to_string(), vec![2, 2], &a[..]),
        ("b.weight".to_string(), vec![3], &a[..3]),
        ("c".to_string(), vec![0], &a[..0]),
    ];
    let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
    rime_io::write_safetensors(&p, &tensors, &meta).unwrap();
    std::fs::read(&p).unwrap()
}

/// Byte-level damage to a valid file.
#[derive(Debug, Clone)]
enum Damage {
    Flip(usize, u8),
    Truncate(usize),
    /// Overwrites 8 bytes at a position with a (possibly huge) little-endian integer.
    Number(usize, u64),
    /// Inserts ASCII text (digits, brackets, quotes) at a position.
    Insert(usize, String),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Damage::Flip(i, b)),
        any::<usize>().prop_map(Damage::Truncate),
        (any::<usize>(), prop_oneof![any::<u64>(), Just(u64::MAX), Just(1 << 40)])
            .prop_map(|(i, n)| Damage::Number(i, n)),
        (any::<usize>(), "[0-9\\[\\]{}\",:e.-]{1,24}").prop_map(|(i, s)| Damage::Insert(i, s)),
    ]
}

fn apply(mut b: Vec<u8>, ds: &[Damage]) -> Vec<u8> {
    for d in ds {
        let n = b.len().max(1);
        match d {
            Damage::Flip(i, v) if !b.is_empty() => b[i % n] = *v,
            Damage::Truncate(i) => b.truncate(i % n),
            Damage::Number(i, v) if b.len() >= 8 => {
                let at = i % (b.len() - 7);
                b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            Damage::Insert(i, s) => {
                let at = i % n.min(b.len() + 1).max(1);
                b.splice(at.min(b.len())..at.min(b.len()), s.bytes());
            }
            _ => {}
        }
    }
    b
}

/// Opens a checkpoint and reads every tensor as the loaders do; any outcome but a panic is fine.
fn read_checkpoint(p: &Path) {
    if let Ok(ck) = Checkpoint::open(p) {
        for n in ck.names() {
            let _ = ck.get_f32(n);
            let _ = ck.get_i64(n);
        }
    }
}

fn tiny_bert_config() -> Value {
    json!({"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 16, "vocab_size": 10, "max_position_embeddings": 16, "type_vocab_size": 2})
}

/// A value a hostile config might hold in a size field.
fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u64>().prop_map(|x| json!(x)),
        any::<i64>().prop_map(|x| json!(x)),
        any::<f64>().prop_map(|x| json!(x)),
        Just(json!(u64::MAX)),
        Just(json!(1_000_000_000_000u64)),
        Just(json!(0)),
        Just(Value::Null),
        "[a-z_]{0,12}".prop_map(|s| json!(s)),
        Just(json!(true)),
        Just(json!([1, 2])),
        Just(json!({"rope_type": "linear"})),
    ]
}

const FIELDS: [&str; 14] = [
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "hidden_act",
    "model_type",
    "rope_scaling",
    "head_dim",
    "eos_token_id",
    "position_embedding_type",
];

fn word_level_tokenizer() -> Value {
    json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[PAD]": 0, "a": 1, "b": 2}, "unk_token": "[PAD]"}})
}

/// Every truncation of a tokenizer.json is an error naming the file, never a panic (tokenizers 0.22 panics on a
/// syntax error inside its `decoder` object; rime checks the JSON first). Exhaustive over cut points.
#[test]
fn every_truncated_tokenizer_is_an_error() {
    let full = word_level_tokenizer().to_string().into_bytes();
    let p = file("tok_cut", "tokenizer.json");
    for cut in 0..full.len() {
        std::fs::write(&p, &full[..cut]).unwrap();
        let e = Tokenizer::from_file(&p).expect_err("a truncated file is refused");
        assert!(e.to_string().contains("tokenizer.json"), "cut {cut}: {e}");
    }
    std::fs::write(&p, &full).unwrap();
    Tokenizer::from_file(&p).expect("the whole file loads");
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn safetensors_arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..256)) {
        let p = file("st_any", "x.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        read_checkpoint(&p);
    }

    #[test]
    fn safetensors_damaged_files_never_panic(ds in vec(damage(), 1..4)) {
        let p = file("st_damaged", "x.safetensors");
        std::fs::write(&p, apply(valid_safetensors(), &ds)).unwrap();
        read_checkpoint(&p);
    }

    #[test]
    fn config_arbitrary_text_never_panics(text in ".{0,200}") {
        let _ = ModelConfig::from_json_str(&text, Path::new("config.json"));
    }

    #[test]
    fn config_hostile_fields_never_panic_or_allocate(fields in vec((0..FIELDS.len(), json_value()), 1..4)) {
        let mut c = tiny_bert_config();
        for (i, v) in fields {
            c[FIELDS[i]] = v;
        }
        if let Ok(cfg) = ModelConfig::from_json_str(&c.to_string(), Path::new("config.json")) {
            // against the 2-layer checkpoint's names: sizes are checked before the tensor list is built
            let good = ModelConfig::from_json_str(&tiny_bert_config().to_string(), Path::new("c")).unwrap();
            let shapes: BTreeMap<String, Vec<usize>> = good.expected_shapes().into_iter().collect();
            let names: Vec<&str> = shapes.keys().map(String::as_str).collect();
            let _ = cfg.check_shapes(Path::new("m.safetensors"), &names, &|n| shapes.get(n).cloned());
        }
    }

    #[test]
    fn tokenizer_damaged_files_never_panic(ds in vec(damage(), 0..3), text in "[ab ]{0,12}") {
        let p = file("tok", "tokenizer.json");
        std::fs::write(&p, apply(word_level_tokenizer().to_string().into_bytes(), &ds)).unwrap();
        if let Ok(mut tok) = Tokenizer::from_file(&p) {
            let _ = tok.set_vocab_limit(3, "t");
            let _ = tok.encode_batch(&[&text], None, rime_io::Padding::Longest);
        }
    }

    #[test]
    fn dataset_readers_never_panic(bytes in vec(any::<u8>(), 0..200), damaged in vec(damage(), 0..3)) {
        let valid: [(&str, DatasetFormat, &[u8]); 3] = [
            ("d.jsonl", DatasetFormat::Jsonl, b"{\"text\": \"a b\", \"label\": \"x\"}\n{\"text\": \"c\", \"label\": 1}\n"),
            ("d.csv", DatasetFormat::Csv, b"text,label\n\"a, b\",x\nc,y\n"),
            ("d.tsv", DatasetFormat::Tsv, b"text\tlabel\na b\tx\nc\ty\n"),
        ];
        for (name, fmt, good) in valid {
            let p = file("data", name);
            for content in [bytes.clone(), apply(good.to_vec(), &damaged)] {
                std::fs::write(&p, &content).unwrap();
                let _ = Dataset::load_as(&p, fmt, &Columns::default());
            }
        }
    }
}
