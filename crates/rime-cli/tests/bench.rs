//! `rime bench` smoke runs on toy shapes (hidden `--tiny`): every case prints one JSON object with the fields
//! scripts read. Never asserts on time, only that the numbers exist and are positive and finite.

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_rime")).arg("bench").args(args).output().unwrap();
    assert!(out.status.success(), "rime bench {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn positive(v: &Value, key: &str) -> f64 {
    let x = v[key].as_f64().unwrap_or_else(|| panic!("{key} missing or not a number in {v}"));
    assert!(x.is_finite() && x > 0.0, "{key} = {x} in {v}");
    x
}

fn check_common(v: &Value) -> &'static str {
    for key in ["name", "shape", "baseline", "adapter", "timing"] {
        assert!(v[key].as_str().is_some_and(|s| !s.is_empty()), "{key} missing in {v}");
    }
    let unit = if v.get("gflops").is_some() { "gflops" } else { "gbps" };
    let rime = positive(v, unit);
    let base = positive(v, &format!("baseline_{unit}"));
    let ratio = positive(v, "ratio");
    assert!((ratio - rime / base).abs() <= 1e-3 * ratio.max(1.0) + 1e-4, "ratio {ratio} != {rime}/{base}");
    unit
}

#[test]
fn bench_matmul_quick_json_has_the_fields() {
    let rows = bench(&["matmul", "--quick", "--json", "--tiny"]);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for v in &rows {
        assert_eq!(check_common(v), "gflops");
        assert!(v["name"].as_str().unwrap().starts_with("matmul_"), "{v}");
    }
}

#[test]
fn bench_all_cases_report_json() {
    let rows = bench(&["all", "--json", "--tiny", "--runs", "1"]);
    let names: Vec<&str> = rows.iter().filter_map(|v| v["name"].as_str()).collect();
    for want in ["attention_forward", "attention_backward", "lora_minilm_query", "merge_weighted_sum"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for v in &rows {
        check_common(v);
    }
    let merge = rows.iter().find(|v| v["name"] == "merge_weighted_sum").unwrap();
    assert!(merge.get("gbps").is_some() && merge.get("baseline_gbps").is_some(), "{merge}");
    let step = rows.iter().find(|v| v["name"] == "train_step_minilm_lora").expect("train-step case");
    positive(step, "examples_per_s");
    positive(step, "baseline_examples_per_s");
    let share = step["outside_kernels_share"].as_f64().expect("outside_kernels_share");
    assert!((0.0..=1.0).contains(&share), "{share}");
    assert!(step["loss"].as_f64().is_some_and(f64::is_finite), "{step}");
    assert!(step["dispatches_per_step"].as_u64().is_some_and(|n| n > 0), "{step}");
    // Where the device has timestamps (lavapipe does), the per-kernel profile covers every dispatch once.
    if let Some(rows) = step.get("profile").and_then(|p| p.as_array()) {
        let calls: u64 = rows.iter().map(|r| r["calls"].as_u64().unwrap()).sum();
        assert_eq!(calls, step["dispatches_per_step"].as_u64().unwrap(), "{step}");
        let share: f64 = rows.iter().map(|r| r["share"].as_f64().unwrap()).sum();
        assert!((share - 1.0).abs() < 0.01, "shares sum to {share}");
        assert!(rows.iter().any(|r| r["kernel"].as_str().unwrap().starts_with("matmul")), "{step}");
    }
}

#[test]
fn bench_rejects_an_unknown_case() {
    let out = Command::new(env!("CARGO_BIN_EXE_rime")).args(["bench", "convolution"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("convolution") && err.contains("matmul"), "{err}");
}
