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

/// `Encoder` (and `rime embed`) applies every method rime trains, as evaluation does: for DoRA, IA3, bottleneck,
/// prompt and prefix adapters (trained a few steps at a high rate so they move), the embedding differs from the
/// base model's, and the adapter's own head applied to the unnormalized embeddings gives exactly the loss that
/// `finetune::evaluate` measures on the same texts.
#[test]
fn embed_applies_every_trainable_method() {
    use rime::finetune::{self, Method};
    let Some(model) = minilm() else { return };
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/fine_foods/train.jsonl"))
            .unwrap()
            .lines()
            .take(24)
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let texts: Vec<String> = rows.iter().map(|r| r["text"].as_str().unwrap().to_string()).collect();
    let labels: Vec<String> = rows.iter().map(|r| r["label"].as_str().unwrap().to_string()).collect();
    let data = finetune::TextClassData::new(texts.clone(), labels.clone());
    let cfg = finetune::TrainConfig {
        epochs: 1,
        batch_size: 8,
        lr: 3e-2,
        max_length: 48,
        save_every: 0,
        ..Default::default()
    };
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let raw = EncoderOptions { normalize: false, max_length: Some(48), ..Default::default() };
    let base = Encoder::load_with(gpu(), &model, raw.clone()).unwrap().embed(&refs).unwrap();
    let methods = [
        Method::Lora(finetune::LoraConfig { dora: true, ..Default::default() }),
        Method::Ia3 { targets: rime_peft::ia3::default_targets() },
        Method::Adapter(Default::default()),
        Method::Prompt(finetune::PromptConfig { num_virtual_tokens: 4, ..Default::default() }),
        Method::Prefix(finetune::PrefixConfig { num_virtual_tokens: 4, ..Default::default() }),
    ];
    for method in methods {
        let name = method.name();
        let run = finetune::classify(gpu(), &model, method, data.clone(), Some(data.clone()), &cfg, |_| {}).unwrap();
        let dir = scratch(&format!("embed-{name}"));
        run.save(&dir).unwrap();
        let adapter = dir.join("best");
        let opts = EncoderOptions { adapter: Some(adapter.clone()), ..raw.clone() };
        let emb = Encoder::load_with(gpu(), &model, opts).unwrap().embed(&refs).unwrap();
        let moved = (0..refs.len()).map(|r| max_diff(&emb[r], &base[r])).fold(0f32, f32::max);
        assert!(moved > 1e-4, "{name}: the adapter changed no embedding ({moved})");

        // The head on the embeddings reproduces evaluation's loss.
        let ad = rime_io::PeftAdapter::load(&adapter).unwrap();
        let names: Vec<String> = serde_json::from_value(ad.config.raw["rime_labels"].clone()).unwrap();
        // peft's layout: `base_model.model.head.*`, or `base_model.head.*` for prompt learning.
        let head = |t: &str| {
            ad.get(&format!("base_model.model.head.{t}"))
                .or_else(|| ad.get(&format!("base_model.head.{t}")))
                .unwrap_or_else(|| panic!("{name}: no head.{t} in the adapter"))
        };
        let (w, b) = (&head("weight").data, &head("bias").data);
        let (k, h) = (names.len(), emb[0].len());
        let mut loss = 0f64;
        for (e, l) in emb.iter().zip(&labels) {
            let logits: Vec<f64> =
                (0..k).map(|c| b[c] as f64 + (0..h).map(|j| w[c * h + j] as f64 * e[j] as f64).sum::<f64>()).collect();
            let m = logits.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + logits.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            loss += lse - logits[names.iter().position(|n| n == l).unwrap()];
        }
        loss /= emb.len() as f64;
        let m = finetune::evaluate(gpu(), &model, &adapter, &data, 8, 48).unwrap();
        assert!((loss - m.loss).abs() < 1e-4, "{name}: head on embeddings {loss} vs evaluation {}", m.loss);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// `EncoderOptions::dim`: the first D values of the pooled embedding, re-normalized (a Matryoshka prefix);
/// 0 and more than the hidden size are refused with the argument's name.
#[test]
fn dim_truncates_and_renormalizes() {
    let Some(model) = minilm() else { return };
    let texts = ["A man is eating food.", "The kids are frowning"];
    let raw = EncoderOptions { normalize: false, ..Default::default() };
    let full = Encoder::load_with(gpu(), &model, raw).unwrap().embed(&texts).unwrap();
    let opts = EncoderOptions { dim: Some(64), ..Default::default() };
    let mut enc = Encoder::load_with(gpu(), &model, opts).unwrap();
    assert_eq!((enc.dim(), enc.trained_dims()), (64, None));
    let cut = enc.embed(&texts).unwrap();
    for (c, f) in cut.iter().zip(&full) {
        assert_eq!(c.len(), 64);
        let n = f[..64].iter().map(|x| x * x).sum::<f32>().sqrt();
        let want: Vec<f32> = f[..64].iter().map(|x| x / n).collect();
        assert!(max_diff(c, &want) < 1e-6);
    }
    for bad in [0, 385] {
        let e = Encoder::load_with(gpu(), &model, EncoderOptions { dim: Some(bad), ..Default::default() });
        assert!(matches!(e, Err(rime::Error::Invalid { argument: "dim", .. })), "dim {bad}");
    }
}
