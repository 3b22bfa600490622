//! The tuning-method trait and its registry: every `Method` maps to a registered `peft_type` whose loader gives
//! back the same method, an unknown `peft_type` is refused with the list of known ones, the configs' defaults are
//! peft's, and bad settings name the config field (never a CLI flag).

use rime_io::peft::AdapterConfig;
use rime_peft::adapter::BottleneckConfig;
use rime_peft::classifier::{self, Method};
use rime_peft::ia3::Ia3Config;
use rime_peft::lora::{LoraConfig, LoraInit};
use rime_peft::methods::{self, REGISTRY};
use rime_peft::prompt::{PrefixConfig, PromptConfig, PromptInit};
use rime_peft::svfit::SvfitConfig;

mod common;
use common::*;

fn every_method() -> Vec<Method> {
    vec![
        Method::Lora(LoraConfig::default()),
        Method::Probe,
        Method::Svfit(SvfitConfig::default()),
        Method::Ia3 { targets: Ia3Config::default().targets },
        Method::Adapter(BottleneckConfig::default()),
        Method::Prompt(PromptConfig::default()),
        Method::Prefix(PrefixConfig::default()),
        Method::Lst(rime_peft::lst::LstConfig::default()),
    ]
}

/// adapter_config.json of a saved adapter of this type, with the fields its loader needs.
fn saved_config(peft_type: &str) -> AdapterConfig {
    let mut a = AdapterConfig::lora(4, 8.0, vec!["query".into()]);
    a.peft_type = peft_type.into();
    a.raw.insert("num_virtual_tokens".into(), serde_json::json!(5));
    a.raw.insert("adapter_mode".into(), serde_json::json!("parallel"));
    a.raw.insert("adapter_scale".into(), serde_json::json!(4.0));
    for (k, v) in [
        ("lst_reduction", 8),
        ("lst_side_hidden", 48),
        ("lst_side_heads", 12),
        ("lst_side_intermediate", 192),
        ("lst_layers", 6),
        ("lst_hidden", 384),
    ] {
        a.raw.insert(k.into(), serde_json::json!(v));
    }
    a.raw.insert("lst_gate_temperature".into(), serde_json::json!(0.1));
    a
}

#[test]
fn every_method_is_registered_by_its_peft_type() {
    let mut types: Vec<&str> = REGISTRY.iter().map(|r| r.peft_type).collect();
    types.sort();
    types.dedup();
    assert_eq!(types.len(), REGISTRY.len(), "a peft_type registered twice");
    let names = ["lora", "probe", "svfit", "ia3", "adapter", "prompt", "prefix", "lst"];
    for (m, name) in every_method().iter().zip(names) {
        let t = m.tuning();
        assert_eq!((m.name(), t.name()), (name, name));
        assert!(types.contains(&t.peft_type()), "{name}: {} is not in the registry", t.peft_type());
        let loaded = methods::from_adapter(&saved_config(t.peft_type())).unwrap();
        assert_eq!((loaded.name(), loaded.peft_type()), (name, t.peft_type()));
        // A loaded adapter evaluates without dropout: its hook is its evaluation hook.
        assert!(loaded.eval_hook().is_none(), "{name}");
    }
    assert_eq!(types.len(), names.len(), "a registered method without a Method variant");
}

#[test]
fn loaded_methods_keep_what_the_config_says() {
    let vt = |t: &str| methods::from_adapter(&saved_config(t)).unwrap().virtual_tokens();
    assert_eq!((vt("PROMPT_TUNING").prompt, vt("PROMPT_TUNING").prefix), (5, 0));
    assert_eq!((vt("PREFIX_TUNING").prompt, vt("PREFIX_TUNING").prefix), (0, 5));
    assert_eq!(vt("LORA").offset(), 0);
    let mut bad = saved_config("PROMPT_TUNING");
    bad.raw.remove("num_virtual_tokens");
    let e = methods::from_adapter(&bad).err().unwrap().to_string();
    assert!(e.contains("num_virtual_tokens"), "{e}");
    let mut bad = saved_config("RIME_BOTTLENECK");
    bad.raw.insert("adapter_mode".into(), serde_json::json!("sideways"));
    let e = methods::from_adapter(&bad).err().unwrap().to_string();
    assert!(e.contains("adapter_mode"), "{e}");
}

#[test]
fn unknown_peft_type_lists_the_known_ones() {
    let e = classifier::hook_for_adapter(&saved_config("LOHA")).err().unwrap().to_string();
    assert!(e.contains("'LOHA'"), "{e}");
    for r in REGISTRY {
        assert!(e.contains(r.peft_type), "{e} should list {}", r.peft_type);
    }
}

#[test]
fn defaults_are_peft_defaults() {
    let l = LoraConfig::default();
    assert_eq!((l.rank, l.alpha, l.dropout, l.rslora, l.dora), (8, 8.0, 0.0, false, false));
    assert_eq!(l.init, LoraInit::Kaiming);
    assert_eq!(l.targets, ["query", "value"]);
    assert!(l.validate().is_ok());
    assert_eq!(PromptConfig::default().init, PromptInit::Random);
    assert_eq!(Ia3Config::default().targets, rime_peft::ia3::default_targets());
    let s = SvfitConfig::default();
    assert_eq!((s.rank, s.energy), (8, None));
}

#[test]
fn bad_settings_name_the_config_field() {
    let d = dev();
    let lora = |f: fn(&mut LoraConfig)| {
        let mut c = LoraConfig { rank: 2, ..LoraConfig::default() };
        f(&mut c);
        Method::Lora(c)
    };
    let cases: Vec<(Method, &str)> = vec![
        (lora(|c| c.rank = 0), "rank"),
        (lora(|c| c.alpha = f32::NAN), "alpha"),
        (lora(|c| c.dropout = -0.5), "lora_dropout"),
        (lora(|c| c.targets = vec!["nowhere".into()]), "targets"),
        (lora(|c| (c.init, c.rank) = (LoraInit::Pissa, 99)), "rank"),
        (Method::Svfit(SvfitConfig { rank: 0, ..SvfitConfig::default() }), "rank"),
        (Method::Svfit(SvfitConfig { energy: Some(1.5), ..SvfitConfig::default() }), "svfit_energy"),
        (Method::Ia3 { targets: vec!["nowhere".into()] }, "targets"),
        (Method::Adapter(BottleneckConfig { size: 0, ..BottleneckConfig::default() }), "adapter_size"),
        (Method::Prompt(PromptConfig { num_virtual_tokens: 0, ..PromptConfig::default() }), "num_virtual_tokens"),
        (Method::Prefix(PrefixConfig { num_virtual_tokens: 0, ..PrefixConfig::default() }), "num_virtual_tokens"),
    ];
    for (m, field) in cases {
        let mut st = tiny_store(d);
        let e = classifier::prepare_method(d, &mut st, &m).unwrap_err();
        match &e {
            rime_peft::Error::Invalid { field: f, .. } => assert_eq!(*f, field, "{}: {e}", m.name()),
            other => panic!("{}: expected Error::Invalid naming {field}, got {other}", m.name()),
        }
        assert!(e.to_string().starts_with(field) && !e.to_string().contains("--"), "{}: {e}", m.name());
    }
}
