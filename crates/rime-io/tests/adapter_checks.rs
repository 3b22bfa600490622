//! The adapter validation layer (issue #13): a corpus of bad peft adapters, generated here from one small valid
//! adapter, each of which must be refused with a message naming the file and the tensor or field at fault.
//! Adapters peft refuses (a rank disagreeing with `r` / `rank_pattern`, absurd alpha) and adapters that would
//! silently compute something else (NaN factors, a head with more rows than labels, factors for modules the
//! model lacks, `target_modules` naming nothing) included.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rime_io::{write_safetensors, AdapterConfig, AdapterTensor, PeftAdapter};

const Q: &str = "base_model.model.layer.0.query";

/// A valid rank-2 LoRA on `layer.0.query` ([4, 3]) with a 2-label head.
fn valid() -> PeftAdapter {
    let t = |name: &str, shape: Vec<usize>| {
        let n = shape.iter().product::<usize>();
        AdapterTensor { name: name.into(), shape, data: (0..n).map(|i| i as f32 * 0.1 - 0.3).collect() }
    };
    let mut cfg = AdapterConfig::lora(2, 4.0, vec!["query".into()]);
    cfg.modules_to_save = vec!["head".into()];
    cfg.raw.insert("rime_labels".into(), serde_json::json!(["neg", "pos"]));
    PeftAdapter::new(
        cfg,
        vec![
            t(&format!("{Q}.lora_A.weight"), vec![2, 3]),
            t(&format!("{Q}.lora_B.weight"), vec![4, 2]),
            t("base_model.model.head.weight", vec![2, 4]),
            t("base_model.model.head.bias", vec![2]),
        ],
    )
}

/// The model the valid adapter fits: `layer.0.query` and `layer.0.key`, both [4, 3].
fn model() -> Vec<(String, Vec<usize>)> {
    vec![("layer.0.query.weight".into(), vec![4, 3]), ("layer.0.key.weight".into(), vec![4, 3])]
}

fn save(a: &PeftAdapter, name: &str) -> PathBuf {
    let dir = common::scratch(name);
    a.save(&dir).unwrap();
    dir
}

/// Rewrites one field of the saved adapter_config.json.
/// Sets `key` in adapter_config.json, or in rime.json for rime's own `rime_*` keys (where rime writes them).
fn set_field(dir: &Path, key: &str, v: serde_json::Value) {
    let p = dir.join(if key.starts_with("rime_") { "rime.json" } else { "adapter_config.json" });
    let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    j[key] = v;
    std::fs::write(&p, j.to_string()).unwrap();
}

fn load_err(dir: &Path) -> String {
    PeftAdapter::load(dir).expect_err("the adapter must be refused").to_string()
}

fn has(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "`{n}` missing from: {msg}");
    }
}

#[test]
fn the_valid_adapter_loads_and_fits_its_model() {
    let dir = save(&valid(), "valid");
    let a = PeftAdapter::load(&dir).unwrap();
    a.check_against(&dir, &model()).unwrap();
}

#[test]
fn rank_disagreeing_with_r_or_rank_pattern_is_refused() {
    let dir = save(&valid(), "bad_r");
    set_field(&dir, "r", serde_json::json!(4));
    has(&load_err(&dir), &["adapter_config.json", "`r`", "rank 4", &format!("{Q}.lora_A.weight"), "[2, 3]"]);

    let dir = save(&valid(), "bad_rank_pattern");
    set_field(&dir, "rank_pattern", serde_json::json!({"layer.0.query": 8}));
    has(&load_err(&dir), &["adapter_config.json", "`rank_pattern`", "rank 8"]);
    // A pattern that agrees with the factors is fine.
    set_field(&dir, "rank_pattern", serde_json::json!({"layer.0.query": 2}));
    PeftAdapter::load(&dir).unwrap();
}

#[test]
fn absurd_config_values_are_refused_naming_the_field() {
    for (key, v, field) in [
        ("r", serde_json::json!(1_000_000_000_000u64), "`r`"),
        ("lora_alpha", serde_json::json!(1e300), "`lora_alpha`"),
        ("lora_alpha", serde_json::json!(-1e7), "`lora_alpha`"),
        ("lora_dropout", serde_json::json!(1.5), "`lora_dropout`"),
        ("alpha_pattern", serde_json::json!({"query": 1e300}), "`alpha_pattern`"),
        ("rank_pattern", serde_json::json!({"query": 0}), "`rank_pattern`"),
    ] {
        let dir = save(&valid(), &format!("absurd_{key}"));
        set_field(&dir, key, v.clone());
        has(&load_err(&dir), &["adapter_config.json", field]);
    }
}

#[test]
fn non_finite_factors_are_refused_naming_the_tensor() {
    let a = valid();
    let dir = common::scratch("nan_b");
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> =
        a.tensors.iter().map(|t| (t.name.clone(), t.shape.clone(), t.data.as_slice())).collect();
    let nan = [f32::NAN; 8];
    let b = tensors.iter_mut().find(|t| t.0.contains("lora_B")).unwrap();
    b.2 = &nan;
    write_safetensors(dir.join("adapter_model.safetensors"), &tensors, &BTreeMap::new()).unwrap();
    std::fs::write(dir.join("adapter_config.json"), a.config.to_json().to_string()).unwrap();
    has(&load_err(&dir), &["adapter_model.safetensors", &format!("{Q}.lora_B.weight"), "8 non-finite"]);
    // rime never writes one either.
    let mut bad = valid();
    bad.tensors[1].data[0] = f32::INFINITY;
    let out = common::scratch("nan_save");
    let e = bad.save(out.join("a")).unwrap_err().to_string();
    has(&e, &["non-finite", &bad.tensors[1].name]);
    assert!(!out.join("a").exists(), "a refused adapter must leave no folder");
}

#[test]
fn a_head_with_more_rows_than_labels_is_refused() {
    let dir = save(&valid(), "head_rows");
    set_field(&dir, "rime_labels", serde_json::json!(["neg"]));
    has(&load_err(&dir), &["rime.json", "`rime_labels`", "1 labels", "base_model.model.head."]);
}

#[test]
fn a_tensorless_adapter_is_refused() {
    let mut a = valid();
    a.tensors.clear();
    let dir = save(&a, "empty");
    has(&load_err(&dir), &["adapter_model.safetensors", "no tensors"]);
}

#[test]
fn factors_must_fit_the_model_and_target_modules() {
    let dir = save(&valid(), "fit");
    let a = PeftAdapter::load(&dir).unwrap();
    // Factors for a layer the model does not have: an error naming the tensor, never skipped.
    let other = vec![("layer.1.query.weight".to_string(), vec![4, 3])];
    has(&a.check_against(&dir, &other).unwrap_err().to_string(), &[&format!("{Q}.lora_A.weight"), "does not have"]);
    // The adapted weight has another shape.
    let wrong = vec![("layer.0.query.weight".to_string(), vec![3, 4])];
    has(&a.check_against(&dir, &wrong).unwrap_err().to_string(), &["layer.0.query.weight", "[3, 4]"]);
    // target_modules naming no module of the model.
    let mut b = a.clone();
    b.config.target_modules = vec!["query".into(), "q_proj".into()];
    has(&b.check_against(&dir, &model()).unwrap_err().to_string(), &["`target_modules`", "`q_proj`", "query"]);
    // Factors of a module target_modules does not select.
    b.config.target_modules = vec!["key".into()];
    has(&b.check_against(&dir, &model()).unwrap_err().to_string(), &["not selected by target_modules", "lora_A"]);
    // all-linear selects everything.
    b.config.target_modules = vec!["all-linear".into()];
    b.check_against(&dir, &model()).unwrap();
}

#[test]
fn regex_target_modules_select_like_peft_and_rime() {
    let dir = save(&valid(), "regex_targets");
    let mut a = PeftAdapter::load(&dir).unwrap();
    // rime's `--targets re:...` entries (a search) and peft's string form (a whole-path match).
    a.config.target_modules = vec!["re:layer\\.0\\.(query|key)".into()];
    a.check_against(&dir, &model()).unwrap();
    a.config.target_modules = vec!["re:value$".into()];
    let e = a.check_against(&dir, &model()).unwrap_err().to_string();
    assert!(e.contains("not selected"), "{e}");
    a.config.raw.insert("target_modules".into(), serde_json::json!(".*query"));
    a.check_against(&dir, &model()).unwrap();
    a.config.raw.insert("target_modules".into(), serde_json::json!("query"));
    let e = a.check_against(&dir, &model()).unwrap_err().to_string();
    assert!(e.contains("not selected"), "{e}");
}

/// rime's own settings go to rime.json, so adapter_config.json holds only what peft's config class knows (peft
/// warns on every other key); loading merges them back; the same key set differently in both files is refused;
/// an IA3 config carries no LoRA fields.
#[test]
fn rime_settings_live_in_rime_json_beside_a_clean_peft_config() {
    let dir = save(&valid(), "rime_json");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert!(cfg.as_object().unwrap().keys().all(|k| !k.starts_with("rime_")), "{cfg}");
    let rime: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("rime.json")).unwrap()).unwrap();
    assert_eq!(rime, serde_json::json!({"rime_labels": ["neg", "pos"]}));
    assert_eq!(PeftAdapter::load(&dir).unwrap().config.raw["rime_labels"], serde_json::json!(["neg", "pos"]));

    // An older adapter with the labels in adapter_config.json: the same value loads, another is refused.
    let p = dir.join("adapter_config.json");
    let mut old = cfg.clone();
    old["rime_labels"] = serde_json::json!(["neg", "pos"]);
    std::fs::write(&p, old.to_string()).unwrap();
    PeftAdapter::load(&dir).unwrap();
    old["rime_labels"] = serde_json::json!(["pos", "neg"]);
    std::fs::write(&p, old.to_string()).unwrap();
    has(&load_err(&dir), &["rime.json", "`rime_labels` differs", "adapter_config.json"]);

    let mut ia3 = AdapterConfig::lora(1, 1.0, vec!["query".into()]);
    ia3.peft_type = "IA3".into();
    let j = ia3.to_json();
    for k in ["r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias"] {
        assert!(j.get(k).is_none(), "IA3 config has `{k}`: {j}");
    }
    assert_eq!(j["target_modules"], serde_json::json!(["query"]));
}
