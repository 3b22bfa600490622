//! The MiniLM tokenizer.json against the ids transformers produced for the golden forward pass, plus
//! truncation reporting and fixed padding.

mod common;

use rime_io::{Checkpoint, Padding, Tokenizer};

fn golden_sentences(ck: &Checkpoint, key: &str) -> Vec<String> {
    let raw = ck.metadata().get(key).expect("metadata key");
    serde_json::from_str(raw).expect("sentences are a JSON list")
}

#[test]
fn minilm_ids_match_the_golden_input_ids() {
    let Some(model) = common::model("all-minilm-l6-v2") else { return };
    let Some(golden) = common::golden_file("minilm_forward.safetensors") else { return };
    let g = Checkpoint::open(&golden).unwrap();
    let sentences = golden_sentences(&g, "sentences");
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let tok = Tokenizer::from_file(&model).unwrap();
    assert_eq!(tok.max_length(), Some(128), "tokenizer.json truncates at 128");
    let b = tok.encode_batch(&refs, None, Padding::Longest).unwrap();
    let (_, shape) = g.info("input_ids").unwrap();
    assert_eq!(&[b.batch, b.seq_len][..], shape);
    let as_i64 = |v: &[u32]| v.iter().map(|&x| x as i64).collect::<Vec<_>>();
    assert_eq!(as_i64(&b.input_ids), g.get_i64("input_ids").unwrap());
    assert_eq!(as_i64(&b.attention_mask), g.get_i64("attention_mask").unwrap());
    assert_eq!(as_i64(&b.token_type_ids), g.get_i64("token_type_ids").unwrap());
    assert!(!b.any_truncated());
    let row2 = &b.input_ids[2 * b.seq_len..2 * b.seq_len + b.lengths()[2]];
    assert_eq!(tok.decode(row2, true).unwrap(), "short");
}

#[test]
fn truncation_is_reported_per_row_and_fixed_padding_pads() {
    let Some(model) = common::model("all-minilm-l6-v2") else { return };
    let mut tok = Tokenizer::from_file(&model).unwrap();
    tok.set_max_length(Some(6)).unwrap();
    let b = tok
        .encode_batch(&["short", "this sentence is clearly longer than six tokens"], None, Padding::Fixed(8))
        .unwrap();
    assert_eq!((b.batch, b.seq_len), (2, 8));
    assert_eq!(b.truncated, vec![false, true]);
    assert!(b.any_truncated());
    assert_eq!(b.lengths(), vec![3, 6]);
    // [CLS] ... [SEP] survive truncation; padding is [PAD] = 0 with mask 0.
    assert_eq!(b.input_ids[8], 101);
    assert_eq!(b.input_ids[8 + 5], 102);
    assert_eq!(&b.input_ids[3..8], &[0, 0, 0, 0, 0]);
    assert_eq!(&b.attention_mask[..8], &[1, 1, 1, 0, 0, 0, 0, 0]);

    // Sentence pairs get token type 1 on the second text.
    tok.set_max_length(None).unwrap();
    let b = tok.encode_batch(&["a cat"], Some(&["a dog"]), Padding::Longest).unwrap();
    assert_eq!(b.token_type_ids, vec![0, 0, 0, 0, 1, 1, 1]);

    // A row longer than a fixed length without truncation is an error naming the tokenizer file.
    let e = tok.encode_batch(&["one two three four five six seven"], None, Padding::Fixed(4)).unwrap_err();
    assert!(e.to_string().contains("tokenizer.json") && e.to_string().contains("fixed padding length 4"), "{e}");
    let e = tok.encode_batch(&["a"], Some(&["b", "c"]), Padding::Longest).unwrap_err();
    assert!(e.to_string().contains("pair"), "{e}");
}

#[test]
fn missing_or_broken_tokenizer_file_is_an_error_naming_it() {
    let dir = common::scratch("tok_err");
    let e = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("not found"), "{e}");
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let e = Tokenizer::from_file(&dir).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}

/// A whitespace word-level tokenizer.json with `vocab`.
fn word_level(dir: &std::path::Path, vocab: serde_json::Value) -> std::path::PathBuf {
    let j = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[PAD]"}});
    let p = dir.join("tokenizer.json");
    std::fs::write(&p, j.to_string()).unwrap();
    p
}

#[test]
fn ids_beyond_the_embedding_table_are_refused_when_the_tokenizer_meets_the_model() {
    let dir = common::scratch("tok_limit");
    for big in [40_000u64, u32::MAX as u64] {
        let p = word_level(&dir, serde_json::json!({"[PAD]": 0, "a": 1, "b": 2, "big": big}));
        let mut tok = Tokenizer::from_file(&p).unwrap();
        // without a model the ids pass through
        assert_eq!(tok.encode_batch(&["a big"], None, Padding::Longest).unwrap().input_ids, [1, big as u32]);
        let e = tok.set_vocab_limit(30_522, "embeddings.word_embeddings.weight").unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()) && e.contains("\"big\"") && e.contains(&big.to_string()), "{e}");
        assert!(e.contains("30522 rows") && e.contains("`embeddings.word_embeddings.weight`"), "{e}");
    }
    let p = word_level(&dir, serde_json::json!({"[PAD]": 7, "a": 1}));
    let mut tok = Tokenizer::from_file(&p).unwrap();
    let e = tok.set_vocab_limit(5, "t").unwrap_err().to_string();
    assert!(e.contains("\"[PAD]\"") && e.contains("id 7"), "{e}");
    let p = word_level(&dir, serde_json::json!({"[PAD]": 0, "a": 1, "b": 2}));
    let mut tok = Tokenizer::from_file(&p).unwrap();
    tok.set_vocab_limit(3, "t").unwrap();
    assert_eq!(tok.encode_batch(&["b a", "a"], None, Padding::Longest).unwrap().input_ids, [2, 1, 1, 0]);
    std::fs::remove_dir_all(&dir).ok();
}
