//! `rime::Encoder` against the golden MiniLM forward (PyTorch), and an adapter applied on the GPU against the
//! same adapter folded into the weights.

use rime::encoder::{cosine, EncoderOptions};
use rime::{merge, Encoder};
use rime_io::Checkpoint;

use crate::common::*;

/// The golden sentences, recovered from the stored token ids (and checked to tokenize back to them).
fn golden_texts(golden: &Checkpoint) -> Vec<String> {
    let ids = golden.get_i64("input_ids").unwrap();
    let mask = golden.get_i64("attention_mask").unwrap();
    let tok = rime_io::Tokenizer::from_file(minilm().unwrap().join("tokenizer.json")).unwrap();
    let t = 25;
    (0..4)
        .map(|r| {
            let row: Vec<u32> = (0..t).filter(|&j| mask[r * t + j] != 0).map(|j| ids[r * t + j] as u32).collect();
            let text = tok.decode(&row, true).unwrap();
            assert_eq!(tok.encode(&text, true).unwrap(), row, "sentence {r} does not tokenize back to its ids");
            text
        })
        .collect()
}

#[test]
fn embeddings_match_pytorch() {
    let Some(model) = minilm() else { return };
    let golden = Checkpoint::open(golden("minilm_forward.safetensors")).unwrap();
    let mut enc = Encoder::load(gpu(), &model).unwrap();
    assert_eq!(enc.dim(), 384);
    let texts = golden_texts(&golden);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let got = enc.embed(&refs).unwrap();
    let want = golden.get_f32("mean_pooled_l2").unwrap();
    for (r, v) in got.iter().enumerate() {
        let w = &want[r * 384..(r + 1) * 384];
        let c = cosine(v, w);
        assert!(c >= 0.99999, "sentence {r}: cosine {c} with PyTorch's embedding");
        assert!(max_diff(v, w) < 1e-4, "sentence {r}: max diff {}", max_diff(v, w));
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "not normalized: {norm}");
    }
    // Batches of 1 give the same vectors as one batch of 4 (padding does not leak into the pool).
    let mut one = Encoder::load_with(gpu(), &model, EncoderOptions { batch_size: 1, ..Default::default() }).unwrap();
    for (r, t) in refs.iter().enumerate() {
        let v = one.embed(&[t]).unwrap();
        assert!(max_diff(&v[0], &got[r]) < 1e-5, "sentence {r} alone differs by {}", max_diff(&v[0], &got[r]));
    }
}

#[test]
fn adapter_on_the_gpu_equals_the_folded_model() {
    let Some(model) = minilm() else { return };
    let adapter = golden("minilm_lora_peft_adapter");
    let texts = ["I loved this snack, will buy again.", "Stale and overpriced.", "ok"];
    let opts = EncoderOptions { adapter: Some(adapter.clone()), ..Default::default() };
    let applied = Encoder::load_with(gpu(), &model, opts).unwrap().embed(&texts).unwrap();
    let base = Encoder::load(gpu(), &model).unwrap().embed(&texts).unwrap();

    let dir = scratch("folded");
    let folded_model = dir.join("model");
    merge::fold_lora(&adapter, &model, &folded_model, None, &merge::MergeOptions::default()).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "sentence_bert_config.json"] {
        if model.join(f).exists() {
            std::fs::copy(model.join(f), folded_model.join(f)).unwrap();
        }
    }
    let folded = Encoder::load(gpu(), &folded_model).unwrap().embed(&texts).unwrap();
    for r in 0..texts.len() {
        let d = max_diff(&applied[r], &folded[r]);
        assert!(d < 2e-5, "text {r}: adapter applied vs folded differ by {d}");
        assert!(max_diff(&applied[r], &base[r]) > 1e-3, "text {r}: the adapter changed nothing");
    }
    let _ = std::fs::remove_dir_all(dir);
}
