//! The Hugging Face sequence-classification head (`HeadKind::Hf`, BertForSequenceClassification's pooler +
//! classifier) on a tiny random BERT: logits against a plain-Rust pooler and classifier over the encoder's
//! first token, gradients against finite differences, the saved tensor names against the ones real peft writes
//! (fixture made by scripts/peft_seq_cls_keys.py), and loading adapters in peft's layouts (labels from the
//! head's shape when the adapter has none).

mod common;
use common::*;

use std::collections::BTreeMap;

use rime_graph::ParamStore;
use rime_peft::classifier::{self, Method};
use rime_peft::ia3::Ia3Config;
use rime_peft::lora::LoraConfig;
use rime_peft::prompt::{PrefixConfig, PromptConfig, PromptInit};
use rime_peft::HeadKind;

const C: usize = 8;

/// The tiny BERT of [`tiny_store`] without its mean-pool head, plus a random pooler and a 3-class
/// BertForSequenceClassification head (random weights, so that every logit depends on them).
fn hf_store() -> ParamStore {
    let d = dev();
    let base = tiny_store(d);
    let mut st = ParamStore::new();
    for (id, p) in base.iter() {
        if !p.name.starts_with("head.") {
            st.add_f32(d, &p.name, &base.read_f32(d, id).unwrap(), &p.tensor.shape, false).unwrap();
        }
    }
    st.add_f32(d, "pooler.dense.weight", &rnd(900, C * C, 0.5), &[C, C], false).unwrap();
    st.add_f32(d, "pooler.dense.bias", &rnd(901, C, 0.1), &[C], false).unwrap();
    classifier::init_head_of(d, &mut st, HeadKind::Hf, "", C, 3, 7).unwrap();
    let w = st.id(classifier::HF_CLASSIFIER_WEIGHT).unwrap();
    d.write_f32(&st.get(w).tensor, &rnd(902, 3 * C, 0.6)).unwrap();
    let b = st.id(classifier::HF_CLASSIFIER_BIAS).unwrap();
    d.write_f32(&st.get(b).tensor, &rnd(903, 3, 0.2)).unwrap();
    st
}

fn read(st: &ParamStore, name: &str) -> Vec<f32> {
    st.read_f32(dev(), st.id(name).unwrap()).unwrap()
}

/// y [n, o] = x [n, i] · W[o, i]ᵀ + b
fn linear(x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let (o, i) = (b.len(), w.len() / b.len());
    x.chunks(i).flat_map(|r| (0..o).map(|j| b[j] + (0..i).map(|k| w[j * i + k] * r[k]).sum::<f32>())).collect()
}

#[test]
fn hf_head_is_pooler_tanh_classifier_on_the_first_token() {
    let d = dev();
    let hf = hf_store();
    let mut se = exec(d, &hf, &Method::Probe, None);
    assert_eq!(se.head, HeadKind::Hf);
    se.exec.forward(d).unwrap();
    let got = se.exec.read(d, se.logits).unwrap();
    // The same encoder with the mean-pool head, its pool weights one-hot on position 0: `pooled` is h[:, 0].
    let mean = tiny_store(d);
    let mut me = exec(d, &mean, &Method::Probe, None);
    let first: Vec<f32> = (0..B * T).map(|i| if i % T == 0 { 1.0 } else { 0.0 }).collect();
    me.exec.feed_f32(d, rime_models::bert::POOL_WEIGHTS, &first).unwrap();
    me.exec.forward(d).unwrap();
    let h0 = me.exec.read(d, me.pooled).unwrap();
    let pooled: Vec<f32> = linear(&h0, &read(&hf, "pooler.dense.weight"), &read(&hf, "pooler.dense.bias"))
        .into_iter()
        .map(f32::tanh)
        .collect();
    let want = linear(&pooled, &read(&hf, "classifier.weight"), &read(&hf, "classifier.bias"));
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("hf head logits vs plain Rust: max |diff| {diff:.2e}");
    assert!(diff < 1e-5, "hf head logits differ from the reference by {diff}: {got:?} vs {want:?}");
    // Mean pool features are unchanged by the head.
    let mut probe = exec(d, &mean, &Method::Probe, None);
    probe.exec.forward(d).unwrap();
    se.exec.forward(d).unwrap();
    assert_eq!(se.exec.read(d, se.pooled).unwrap(), probe.exec.read(d, probe.pooled).unwrap());
}

fn lora() -> Method {
    Method::Lora(LoraConfig {
        rank: 2,
        alpha: 4.0,
        targets: vec!["query".into(), "value".into()],
        ..Default::default()
    })
}

#[test]
fn hf_head_gradients_match_finite_differences() {
    let d = dev();
    let mut st = hf_store();
    classifier::prepare_method(d, &mut st, &lora()).unwrap();
    perturb(d, &st);
    let mut se = exec(d, &st, &lora(), Some(rime_graph::OptimConfig::adamw(0.0, 0.0)));
    let n = check_grads(d, &st, &mut se);
    assert!(n >= 3 * 10, "checked {n} coordinates");
    // The pooler stays frozen (peft's SEQ_CLS default trains `classifier` only).
    let trainable: Vec<String> = st.trainable().map(|(_, p)| p.name.clone()).collect();
    assert!(trainable.contains(&"classifier.weight".to_string()));
    assert!(!trainable.iter().any(|n| n.contains("pooler")), "{trainable:?}");
}

fn fixture() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/peft_seq_cls_keys.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn methods() -> Vec<(&'static str, Method)> {
    let cfg = tiny_cfg();
    vec![
        ("lora", lora()),
        (
            "dora",
            Method::Lora(LoraConfig {
                rank: 2,
                alpha: 4.0,
                targets: vec!["query".into(), "value".into()],
                dora: true,
                ..Default::default()
            }),
        ),
        ("ia3", Method::from(Ia3Config { targets: vec!["key".into(), "value".into(), "output.dense".into()] })),
        (
            "prompt",
            Method::Prompt(PromptConfig {
                num_virtual_tokens: 3,
                init: PromptInit::Random,
                seed: 1,
                layers: 0,
                heads: 0,
            })
            .for_model(&cfg),
        ),
        (
            "prefix",
            Method::Prefix(PrefixConfig { num_virtual_tokens: 3, seed: 2, layers: 0, heads: 0 }).for_model(&cfg),
        ),
    ]
}

fn save(method: &Method, tag: &str) -> (ParamStore, std::path::PathBuf) {
    let d = dev();
    let mut st = hf_store();
    classifier::prepare_method(d, &mut st, method).unwrap();
    perturb(d, &st);
    let dir = std::env::temp_dir().join(format!("rime-hf-head-{tag}-{}", std::process::id()));
    classifier::save_adapter(d, &st, method, "tiny", &["a".into(), "b".into(), "c".into()], &dir).unwrap();
    (st, dir)
}

#[test]
fn saved_names_are_the_ones_peft_writes_for_seq_cls() {
    let fx = fixture();
    for (tag, method) in methods() {
        let (_, dir) = save(&method, tag);
        let ad = rime_io::peft::PeftAdapter::load(&dir).unwrap();
        let got: BTreeMap<String, Vec<usize>> = ad.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
        let want: BTreeMap<String, Vec<usize>> = serde_json::from_value(fx[tag]["keys"].clone()).unwrap();
        assert_eq!(got, want, "{tag}: rime's names and shapes vs peft's");
        assert_eq!(ad.config.task_type.as_deref(), Some("SEQ_CLS"));
        assert_eq!(ad.config.modules_to_save, ["classifier", "score"], "{tag}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Logits of a store with a loaded adapter, on the tiny batch.
fn logits_after_load(dir: &std::path::Path, store: &mut ParamStore) -> (Vec<f32>, Vec<String>) {
    let d = dev();
    let (cfg, labels) = classifier::load_adapter(d, store, dir).unwrap();
    let hook = classifier::hook_for_adapter(&cfg).unwrap();
    let mut se =
        classifier::build_exec(d, store, &tiny_cfg(), classifier::store_prefix(store), hook.as_ref(), B, T, None)
            .unwrap();
    let (ids, types, mask, l) = batch();
    classifier::feed(d, &se, &ids, &types, &mask, &l).unwrap();
    se.exec.forward(d).unwrap();
    (se.exec.read(d, se.logits).unwrap(), labels)
}

/// The frozen model of [`hf_store`] (encoder and pooler), no head: what `rime eval` starts from.
fn frozen_base(prefix: &str) -> ParamStore {
    let d = dev();
    let hf = hf_store();
    let mut st = ParamStore::new();
    for (id, p) in hf.iter() {
        if !p.trainable && !p.name.starts_with("rime.") {
            st.add_f32(d, &format!("{prefix}{}", p.name), &hf.read_f32(d, id).unwrap(), &p.tensor.shape, false)
                .unwrap();
        }
    }
    st
}

#[test]
fn peft_layouts_load_with_labels_from_the_head() {
    let d = dev();
    for (tag, method) in methods() {
        let (st, dir) = save(&method, &format!("load-{tag}"));
        let mut se = exec(d, &st, &method, None);
        se.exec.forward(d).unwrap();
        let want = se.exec.read(d, se.logits).unwrap();
        // As rime wrote it: labels from rime.json.
        let (got, labels) = logits_after_load(&dir, &mut frozen_base(""));
        assert_eq!(labels, ["a", "b", "c"]);
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "{tag}: logits after load differ by {diff}");
        // As peft writes it (no rime.json): labels LABEL_i from the head's rows, same logits; and on a
        // BertForSequenceClassification checkpoint (names under `bert.`).
        std::fs::remove_file(dir.join("rime.json")).unwrap();
        for prefix in ["", "bert."] {
            let (got, labels) = logits_after_load(&dir, &mut frozen_base(prefix));
            assert_eq!(labels, ["LABEL_0", "LABEL_1", "LABEL_2"], "{tag}");
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-5, "{tag} (prefix '{prefix}'): logits after load differ by {diff}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// peft's layout for a bare `BertModel` (`base_model.model.encoder...`, no `bert.`), with rime's mean-pool head
/// named as peft names a saved module of a prompt-learning model (`base_model.head.*`).
#[test]
fn bare_model_layout_and_missing_head() {
    let d = dev();
    let method = lora();
    let mut st = tiny_store(d);
    classifier::prepare_method(d, &mut st, &method).unwrap();
    perturb(d, &st);
    let mut se = exec(d, &st, &method, None);
    se.exec.forward(d).unwrap();
    let want = se.exec.read(d, se.logits).unwrap();
    let dir = std::env::temp_dir().join(format!("rime-hf-head-bare-{}", std::process::id()));
    classifier::save_adapter(d, &st, &method, "tiny", &["a".into(), "b".into(), "c".into()], &dir).unwrap();
    let mut ad = rime_io::peft::PeftAdapter::load(&dir).unwrap();
    let names: Vec<&str> = ad.tensors.iter().map(|t| t.name.as_str()).collect();
    assert!(names.contains(&"base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"), "{names:?}");
    assert!(names.contains(&"base_model.model.head.weight"), "{names:?}");
    assert_eq!(ad.config.modules_to_save, ["head"]);
    let fresh = || {
        let mut f = ParamStore::new();
        let base = tiny_store(d);
        for (id, p) in base.iter() {
            if !p.name.starts_with("head.") {
                f.add_f32(d, &p.name, &base.read_f32(d, id).unwrap(), &p.tensor.shape, false).unwrap();
            }
        }
        f
    };
    let (got, labels) = logits_after_load(&dir, &mut fresh());
    assert_eq!(labels, ["a", "b", "c"]);
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-5, "logits after load differ by {diff}");
    // Without the head: loading works (e.g. for embeddings), the classifier has no head and says so.
    ad.tensors.retain(|t| !t.name.contains("head."));
    ad.config.raw.remove("rime_labels");
    ad.save(&dir).unwrap();
    let mut f = fresh();
    let (_, labels) = classifier::load_adapter(d, &mut f, &dir).unwrap();
    assert!(labels.is_empty());
    let e = classifier::head_kind(&f).unwrap_err().to_string();
    assert!(e.contains("head.weight") && e.contains("classifier.weight"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hf_head_needs_the_pooler() {
    let d = dev();
    let mut st = ParamStore::new();
    st.add_f32(d, "embeddings.word_embeddings.weight", &[0.0; 16], &[2, 8], false).unwrap();
    let e = classifier::init_head_of(d, &mut st, HeadKind::Hf, "", 8, 2, 0).unwrap_err().to_string();
    assert!(e.contains("pooler.dense.weight"), "{e}");
}
