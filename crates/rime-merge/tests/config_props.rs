//! Property tests of the merge YAML reader: arbitrary bytes and mutations of a valid config end in Ok or an
//! error naming the config, never a panic, hang or abort; whatever parses passes the value checks.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use rime_merge::MergeConfig;

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("rime-merge-props-{}", std::process::id()));
    for m in ["m0", "m1"] {
        std::fs::create_dir_all(d.join(m)).unwrap();
    }
    d
}

const VALID: &str = "merge_method: ties\nbase_model: m0\nmodels:\n  - model: m1\n    parameters: {weight: 0.5, density: 0.5}\nparameters: {normalize: true, lambda: 1.0}\ndtype: float16\n";

/// YAML fragments a hostile config might hold in place of a value.
fn yaml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<f64>().prop_map(|x| format!("{x:e}")),
        any::<i64>().prop_map(|x| x.to_string()),
        Just(".nan".to_string()),
        Just("-.inf".to_string()),
        Just("1e39".to_string()),
        Just("[{filter: q, value: 2}, {value: .nan}]".to_string()),
        Just("{a: [1, 2, {b: c}]}".to_string()),
        Just("~".to_string()),
        "[a-z_]{0,8}",
    ]
}

const KEYS: [&str; 9] =
    ["merge_method", "base_model", "weight", "density", "normalize", "lambda", "dtype", "t", "models"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn yaml_reader_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let d = dir();
        let _ = MergeConfig::from_yaml_str(&String::from_utf8_lossy(&bytes), &d.join("c.yaml"));
    }

    #[test]
    fn yaml_reader_never_panics_on_mutated_values(key in 0..KEYS.len(), v in yaml_value(), cut in 0..VALID.len()) {
        let d = dir();
        let k = KEYS[key];
        let text: String = VALID
            .lines()
            .map(|l| match l.find(&format!("{k}: ")) {
                Some(i) => format!("{}{k}: {v}", &l[..i]),
                None => l.replace(&format!("{k}: 0.5"), &format!("{k}: {v}")),
            })
            .collect::<Vec<_>>()
            .join("\n");
        if let Ok(c) = MergeConfig::from_yaml_str(&text, &d.join("c.yaml")) {
            prop_assert!(c.check_values().is_ok());
        }
        let _ = MergeConfig::from_yaml_str(&VALID[..cut], &d.join("c.yaml"));
    }
}

#[test]
fn an_alias_bomb_ends_quickly() {
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = i - 1;
        text.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"));
    }
    text.push_str("merge_method: linear\nmodels: [m0]\n");
    let t0 = std::time::Instant::now();
    let r = MergeConfig::from_yaml_str(&text, Path::new("bomb.yaml"));
    assert!(r.is_err(), "unknown keys a0.. must be refused");
    assert!(t0.elapsed().as_secs() < 10, "took {:?}", t0.elapsed());
}
