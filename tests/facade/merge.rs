//! `rime::merge`: merge configs built in code give what the same mergekit YAML gives, and the values the
//! methods define.

use std::path::Path;

use rime::merge::{self, MergeOptions};
use rime_io::Checkpoint;

use crate::common::*;

const NAMES: [&str; 2] = ["encoder.layer.0.weight", "encoder.layer.0.bias"];
const SHAPES: [&[usize]; 2] = [&[6, 5], &[6]];

/// A small checkpoint whose tensors are seeded values.
fn write_model(dir: &Path, seed: u64) -> Vec<Vec<f32>> {
    std::fs::create_dir_all(dir).unwrap();
    let vals: Vec<Vec<f32>> =
        SHAPES.iter().enumerate().map(|(i, s)| rnd(s.iter().product(), seed * 10 + i as u64)).collect();
    let bytes: Vec<Vec<u8>> = vals.iter().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(&str, safetensors::tensor::TensorView)> = NAMES
        .iter()
        .zip(SHAPES)
        .zip(&bytes)
        .map(|((n, s), b)| (*n, safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.to_vec(), b).unwrap()))
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    vals
}

fn read(dir: &Path) -> Vec<Vec<f32>> {
    let c = Checkpoint::open(dir).unwrap();
    NAMES.iter().map(|n| c.get_f32(n).unwrap()).collect()
}

#[test]
fn typed_configs_equal_yaml_and_the_definitions() {
    let dir = scratch("merge");
    let inputs: Vec<Vec<Vec<f32>>> = (0..3).map(|i| write_model(&dir.join(format!("m{i}")), i + 1)).collect();
    let paths: Vec<_> = (0..3).map(|i| dir.join(format!("m{i}"))).collect();
    let opts = MergeOptions::default();

    // Uniform soup = the element-wise mean.
    merge::run(gpu(), &merge::uniform_soup(&paths), &dir.join("soup"), &opts).unwrap();
    let soup = read(&dir.join("soup"));
    for (t, got) in soup.iter().enumerate() {
        let want: Vec<f32> = (0..got.len()).map(|e| inputs.iter().map(|m| m[t][e]).sum::<f32>() / 3.0).collect();
        assert!(max_diff(got, &want) < 1e-6, "soup of {}", NAMES[t]);
    }
    // The same soup from mergekit YAML is bit-identical.
    let yaml = format!(
        "merge_method: linear\nmodels:\n{}",
        paths
            .iter()
            .map(|p| format!("  - model: {}\n    parameters: {{weight: 1.0}}\n", p.display()))
            .collect::<String>()
    );
    let cfg_file = dir.join("soup.yaml");
    std::fs::write(&cfg_file, yaml).unwrap();
    merge::run(gpu(), &merge::MergeConfig::from_file(&cfg_file).unwrap(), &dir.join("soup_yaml"), &opts).unwrap();
    assert_eq!(read(&dir.join("soup_yaml")), soup);

    // Task arithmetic: base + λ Σ w (θ - base).
    let models = [(paths[1].clone(), 1.0), (paths[2].clone(), 0.5)];
    merge::run(gpu(), &merge::task_arithmetic(&paths[0], &models, 0.7), &dir.join("ta"), &opts).unwrap();
    for (t, got) in read(&dir.join("ta")).iter().enumerate() {
        let b = &inputs[0][t];
        let want: Vec<f32> =
            (0..got.len()).map(|e| b[e] + 0.7 * ((inputs[1][t][e] - b[e]) + 0.5 * (inputs[2][t][e] - b[e]))).collect();
        assert!(max_diff(got, &want) < 1e-5, "task arithmetic of {}", NAMES[t]);
    }

    // SLERP at t = 0 is the base; an existing output is not replaced without force.
    merge::run(gpu(), &merge::slerp(&paths[0], &paths[1], 0.0), &dir.join("slerp"), &opts).unwrap();
    assert!(max_diff(&read(&dir.join("slerp"))[0], &inputs[0][0]) < 1e-6);
    let again = merge::run(gpu(), &merge::slerp(&paths[0], &paths[1], 0.5), &dir.join("slerp"), &opts);
    assert!(again.is_err(), "an existing output folder was replaced without force");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_config_missing_inputs_is_refused() {
    let cfg = merge::task_arithmetic::<&str>("/nonexistent/base", &[], 1.0);
    let err = merge::run(gpu(), &cfg, &scratch("refused").join("out"), &MergeOptions::default()).unwrap_err();
    assert!(err.to_string().contains("needs at least one model besides base_model"), "{err}");
}
