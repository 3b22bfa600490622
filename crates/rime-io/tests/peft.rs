//! The golden peft adapter read and written back unchanged, and the config's typed fields.

mod common;

use rime_io::{AdapterConfig, Checkpoint, PeftAdapter};

#[test]
fn golden_peft_adapter_round_trips_keys_shapes_values_and_config() {
    let Some(src) = common::golden_file("minilm_lora_peft_adapter") else { return };
    let a = PeftAdapter::load(&src).unwrap();
    assert_eq!(a.config.peft_type, "LORA");
    assert_eq!((a.config.r, a.config.lora_alpha, a.config.scale()), (8, 16.0, 2.0));
    assert_eq!(a.config.target_modules, vec!["query", "value"]);
    assert_eq!(a.tensors.len(), 24);
    let pairs = a.lora_pairs();
    assert_eq!(pairs.len(), 12);
    assert_eq!(pairs[0].module, "encoder.layer.0.attention.self.query");
    assert_eq!(a.get(&pairs[0].a).unwrap().shape, vec![8, 384]);
    assert_eq!(a.get(&pairs[0].b).unwrap().shape, vec![384, 8]);

    let dir = common::scratch("peft_roundtrip");
    a.save(&dir).unwrap();

    // Same keys, shapes, dtypes and bit-identical values as peft wrote.
    let orig = Checkpoint::open(src.join("adapter_model.safetensors")).unwrap();
    let back = Checkpoint::open(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(orig.names(), back.names());
    assert_eq!(orig.metadata(), back.metadata());
    for n in orig.names() {
        let (o, b) = (orig.get_raw(n).unwrap(), back.get_raw(n).unwrap());
        assert_eq!((o.dtype, o.shape), (b.dtype, b.shape), "{n}");
        assert_eq!(o.bytes, b.bytes, "{n}");
    }
    // The config keeps every field peft wrote, with the same values.
    let read = |p: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (oc, bc) = (read(src.join("adapter_config.json")), read(dir.join("adapter_config.json")));
    assert_eq!(oc, bc);
    // And a second round trip is a fixed point.
    let again = PeftAdapter::load(&dir).unwrap();
    assert_eq!(again, a);
}

#[test]
fn new_adapter_config_has_peft_fields_and_bad_configs_name_the_field() {
    let c = AdapterConfig::lora(4, 8.0, vec!["q_proj".into(), "v_proj".into()]);
    let j = c.to_json();
    assert_eq!(j["peft_type"], "LORA");
    assert_eq!(j["r"], 4);
    assert_eq!(j["lora_alpha"], 8);
    assert_eq!(j["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    assert_eq!(j["inference_mode"], true);
    let back = AdapterConfig::from_json_str(&j.to_string(), std::path::Path::new("x.json")).unwrap();
    assert_eq!((back.r, back.lora_alpha, back.scale()), (4, 8.0, 2.0));

    let p = std::path::Path::new("/a/adapter_config.json");
    let e = AdapterConfig::from_json_str(r#"{"peft_type":"LORA","r":0}"#, p).unwrap_err().to_string();
    assert!(e.contains("/a/adapter_config.json") && e.contains("`r`"), "{e}");
    let e = AdapterConfig::from_json_str(r#"{"r":8}"#, p).unwrap_err().to_string();
    assert!(e.contains("peft_type") && e.contains("missing"), "{e}");
    let e =
        AdapterConfig::from_json_str(r#"{"peft_type":"LORA","r":8,"target_modules":[1]}"#, p).unwrap_err().to_string();
    assert!(e.contains("target_modules"), "{e}");
}

#[test]
fn adapter_with_an_unpaired_factor_is_an_error_naming_it() {
    let Some(src) = common::golden_file("minilm_lora_peft_adapter") else { return };
    let mut a = PeftAdapter::load(&src).unwrap();
    let removed = a.tensors.remove(1).name;
    let dir = common::scratch("peft_unpaired");
    a.save(&dir).unwrap();
    let e = PeftAdapter::load(&dir).unwrap_err().to_string();
    assert!(e.contains("adapter_model.safetensors") && e.contains(&removed), "{e}");
    // A missing folder names the config file.
    let e = PeftAdapter::load(dir.join("nope")).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
}
