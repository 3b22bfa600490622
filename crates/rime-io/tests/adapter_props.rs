//! Property tests of the peft adapter readers: arbitrary bytes and mutations of a valid adapter_config.json /
//! adapter_model.safetensors end in Ok or an error, never a panic, hang or abort.

mod common;

use std::path::Path;

use proptest::prelude::*;
use rime_io::{AdapterConfig, AdapterTensor, PeftAdapter};

fn valid_adapter() -> PeftAdapter {
    let mut cfg = AdapterConfig::lora(2, 4.0, vec!["query".into()]);
    cfg.rank_pattern.insert("layer.0.query".into(), 2);
    cfg.alpha_pattern.insert("layer.0.query".into(), 8.0);
    let t = |name: &str, shape: Vec<usize>| AdapterTensor {
        name: name.into(),
        data: vec![0.25; shape.iter().product()],
        shape,
    };
    PeftAdapter::new(
        cfg,
        vec![
            t("base_model.model.layer.0.query.lora_A.weight", vec![2, 3]),
            t("base_model.model.layer.0.query.lora_B.weight", vec![4, 2]),
        ],
    )
}

/// JSON values a hostile config might hold.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_filter("JSON numbers are finite", |x| x.is_finite()).prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
        prop::collection::vec(".{0,6}", 0..3).prop_map(serde_json::Value::from),
        Just(serde_json::json!({"query": -1})),
        Just(serde_json::json!({"query": 1e308})),
    ]
}

const KEYS: [&str; 12] = [
    "peft_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "fan_in_fan_out",
    "use_rslora",
    "use_dora",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "rime_labels",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn config_parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = AdapterConfig::from_json_str(&text, Path::new("adapter_config.json"));
    }

    #[test]
    fn config_parser_never_panics_on_mutated_fields(key in 0..KEYS.len(), v in json_value()) {
        let mut j = valid_adapter().config.to_json();
        j[KEYS[key]] = v;
        if let Ok(c) = AdapterConfig::from_json_str(&j.to_string(), Path::new("adapter_config.json")) {
            // Whatever parses has values the arithmetic can use.
            prop_assert!(c.lora_alpha.is_finite());
            let _ = c.module_scale("layer.0.query", c.module_rank("layer.0.query").max(1));
        }
    }

    #[test]
    fn adapter_loader_never_panics_on_mutated_weights(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in prop::option::of(any::<prop::sample::Index>()),
        key in 0..KEYS.len(),
        v in json_value(),
    ) {
        let dir = common::scratch("prop_adapter");
        let a = valid_adapter();
        a.save(&dir).unwrap();
        let w = dir.join("adapter_model.safetensors");
        let mut bytes = std::fs::read(&w).unwrap();
        for (i, b) in &edits {
            let at = i.index(bytes.len());
            bytes[at] = *b;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        std::fs::write(&w, &bytes).unwrap();
        let _ = PeftAdapter::load(&dir);
        // A mutated config over the valid weights.
        a.save(&dir).unwrap();
        let mut j = a.config.to_json();
        j[KEYS[key]] = v;
        std::fs::write(dir.join("adapter_config.json"), j.to_string()).unwrap();
        if let Ok(b) = PeftAdapter::load(&dir) {
            let model = vec![("layer.0.query.weight".to_string(), vec![4, 3])];
            let _ = b.check_against(&dir, &model);
        }
    }
}
