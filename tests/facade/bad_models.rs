//! The encoder facade on a tiny synthetic BERT folder (config.json, model.safetensors, a word-level
//! tokenizer.json) made bad one way at a time: each case is refused with an error naming the file and the
//! tensor, field or text, never an embedding computed from it.

use std::path::{Path, PathBuf};

use rime::{Encoder, Error};
use serde_json::{json, Value};

use crate::common::*;

fn config() -> Value {
    json!({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 6, "max_position_embeddings": 16,
        "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12})
}

fn tokenizer(vocab: Value) -> Value {
    json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}})
}

fn vocab() -> Value {
    json!({"[PAD]": 0, "[UNK]": 1, "a": 2, "man": 3, "eats": 4, "food": 5})
}

/// Writes the folder; `edit` may change any tensor (name, data) before it is written.
fn write(name: &str, cfg_json: &Value, vocab: Value, edit: impl Fn(&str, &mut Vec<f32>)) -> PathBuf {
    let dir = scratch(name);
    std::fs::write(dir.join("config.json"), cfg_json.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer(vocab).to_string()).unwrap();
    let cfg = rime_io::ModelConfig::from_json_str(&config().to_string(), Path::new("c")).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = cfg
        .expected_shapes()
        .into_iter()
        .enumerate()
        .map(|(i, (n, s))| {
            let mut d = rnd(s.iter().product(), i as u64 + 1);
            if n.contains("LayerNorm.weight") {
                d.iter_mut().for_each(|x| *x = 1.0 + 0.1 * *x);
            }
            edit(&n, &mut d);
            (n, s, d)
        })
        .collect();
    let refs: Vec<(String, Vec<usize>, &[f32])> =
        tensors.iter().map(|(n, s, d)| (n.clone(), s.clone(), &d[..])).collect();
    rime_io::write_safetensors(dir.join("model.safetensors"), &refs, &Default::default()).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match Encoder::load(gpu(), dir) {
        Ok(_) => panic!("{}: loaded, expected an error", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_tiny_bert_folder_embeds_and_each_bad_variant_is_refused_by_name() {
    let ok = write("tiny-ok", &config(), vocab(), |_, _| {});
    let v = Encoder::load(gpu(), &ok).unwrap().embed(&["a man eats food", "food"]).unwrap();
    assert!(v.len() == 2 && v.iter().flatten().all(|x| x.is_finite()));

    // a token id beyond the 6-row embedding table
    for big in [40_000u64, u32::MAX as u64] {
        let mut voc = vocab();
        voc["food"] = json!(big);
        let e = load_err(&write("tiny-ids", &config(), voc, |_, _| {}));
        assert!(e.contains("tokenizer.json") && e.contains("\"food\"") && e.contains(&big.to_string()), "{e}");
        assert!(e.contains("6 rows") && e.contains("embeddings.word_embeddings.weight"), "{e}");
    }
    // NaN query weights and an Inf LayerNorm weight: named at load, not blamed on a text
    for (tensor, bad) in
        [("encoder.layer.0.attention.self.query.weight", f32::NAN), ("embeddings.LayerNorm.weight", f32::INFINITY)]
    {
        let e = load_err(&write("tiny-nan", &config(), vocab(), |n, d| {
            if n == tensor {
                d[3] = bad
            }
        }));
        assert!(
            e.contains("model.safetensors") && e.contains(&format!("`{tensor}`")) && e.contains("non-finite"),
            "{e}"
        );
    }
    // an activation rime does not compute
    let mut relu = config();
    relu["hidden_act"] = json!("relu");
    let e = load_err(&write("tiny-relu", &relu, vocab(), |_, _| {}));
    assert!(e.contains("config.json") && e.contains("`hidden_act`") && e.contains("relu"), "{e}");
    let _ = std::fs::remove_dir_all(ok);
}

#[test]
fn weights_that_overflow_give_an_error_not_an_embedding() {
    // finite weights whose sums overflow f32: the LayerNorm mean of the embeddings is Inf, x - mean -Inf, and
    // its product with rstd 0 NaN (as in PyTorch)
    let dir = write("tiny-overflow", &config(), vocab(), |n, d| {
        if n == "embeddings.word_embeddings.weight" {
            d.iter_mut().for_each(|x| *x = 3e38);
        }
    });
    let mut enc = Encoder::load(gpu(), &dir).unwrap();
    match enc.embed(&["a man", "food"]) {
        Err(Error::NonFiniteOutput { output, .. }) => assert!(output.contains("text 0"), "{output}"),
        other => panic!("expected NonFiniteOutput, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(dir);
}
