//! mergekit 0.1.5's geometric merges (model_stock, nuslerp, multislerp, karcher) and arcee_fusion end to end on small random
//! checkpoints, against plain-Rust re-writings of mergekit's code element for element in f32 (as torch runs
//! it on float32 tensors); bad parameters must fail naming the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rime_io::{Checkpoint, Dtype, RawTensorOwned};
use rime_kernels::{Device, DeviceOptions};
use rime_merge::{merge, merge_with_chunk, MergeConfig, MergeOptions};

fn dev() -> &'static Device {
    static D: OnceLock<Device> = OnceLock::new();
    D.get_or_init(|| Device::new(&DeviceOptions::default()).expect("a wgpu adapter (lavapipe on CPU machines)"))
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rime-geo-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The toy model: a 1-D tensor, small 2-D ones, a 3-D one, and one large enough (2800 elements) to be
/// summed in several partial slots and streamed in several chunks.
const SHAPES: [(&str, &[usize]); 5] = [
    ("emb.weight", &[7, 5]),
    ("layer.0.attention.q.weight", &[5, 5]),
    ("layer.0.mlp.weight", &[2, 3, 4]),
    ("norm.bias", &[5]),
    ("big.weight", &[40, 70]),
];

type Model = BTreeMap<String, Vec<f32>>;

/// model `seed`: `base` (if given) plus uniform noise of `amp`, or uniform in [-1, 1).
fn write_model(dir: &Path, seed: u64, base: Option<&Model>, amp: f32) -> Model {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut raws = Vec::new();
    let mut vals = BTreeMap::new();
    for (n, s) in SHAPES {
        let len: usize = s.iter().product();
        let v: Vec<f32> = (0..len)
            .map(|i| {
                let r = rng.random::<f32>() * 2.0 - 1.0;
                base.map_or(r, |b| b[n][i] + amp * r)
            })
            .collect();
        raws.push(RawTensorOwned {
            name: n.to_string(),
            dtype: Dtype::F32,
            shape: s.to_vec(),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        });
        vals.insert(n.to_string(), v);
    }
    raws.push(RawTensorOwned {
        name: "pos".into(),
        dtype: Dtype::I64,
        shape: vec![4],
        bytes: [0i64, 1, 2, 3].iter().flat_map(|x| x.to_le_bytes()).collect(),
    });
    rime_io::write_safetensors_raw(dir.join("model.safetensors"), &raws, &BTreeMap::new()).unwrap();
    std::fs::write(dir.join("config.json"), format!("{{\"seed\": {seed}}}")).unwrap();
    vals
}

/// m0 (the base), m1..m3 = m0 + noise of 0.3 (task vectors that are not colinear), and far (independent).
fn setup(tag: &str) -> (PathBuf, Vec<Model>) {
    let d = tmpdir(tag);
    let m0 = write_model(&d.join("m0"), 1, None, 0.0);
    let mut ms = vec![m0.clone()];
    for i in 1..4 {
        ms.push(write_model(&d.join(format!("m{i}")), i as u64 + 1, Some(&m0), 0.3));
    }
    ms.push(write_model(&d.join("far"), 9, None, 0.0));
    (d, ms)
}

fn load(dir: &Path) -> Model {
    let c = Checkpoint::open(dir).unwrap();
    let mut m = BTreeMap::new();
    for n in c.names() {
        if n != "pos" {
            m.insert(n.to_string(), c.get_f32(n).unwrap());
        }
    }
    assert_eq!(c.get_i64("pos").unwrap(), vec![0, 1, 2, 3], "non-float tensor copied");
    m
}

fn config(dir: &Path, yaml: &str, out: &str) -> rime_merge::Result<MergeConfig> {
    let p = dir.join(format!("{out}.yaml"));
    std::fs::write(&p, yaml).unwrap();
    MergeConfig::from_file(&p)
}

fn run(dir: &Path, yaml: &str, out: &str) -> rime_merge::Result<Model> {
    let cfg = config(dir, yaml, out)?;
    merge(dev(), &cfg, &dir.join(out), &MergeOptions::default())?;
    Ok(load(&dir.join(out)))
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w}");
    }
}

fn shape(name: &str) -> &'static [usize] {
    SHAPES.iter().find(|(n, _)| *n == name).unwrap().1
}

fn sub(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Index lists of the vectors: the whole tensor, rows along the last dimension, or (torch's dim 0) columns.
fn vectors(shape: &[usize], how: &str) -> Vec<Vec<usize>> {
    let l: usize = shape.iter().product();
    match how {
        "rows" if shape.len() >= 2 => {
            let c = shape[shape.len() - 1];
            (0..l / c).map(|r| (r * c..(r + 1) * c).collect()).collect()
        }
        "cols" if shape.len() >= 2 => {
            let s = l / shape[0];
            (0..s).map(|v| (0..shape[0]).map(|k| k * s + v).collect()).collect()
        }
        _ => vec![(0..l).collect()],
    }
}

fn gather(x: &[f32], idx: &[usize]) -> Vec<f32> {
    idx.iter().map(|&i| x[i]).collect()
}

/// mergekit `model_stock_merge_method`.
fn mk_model_stock(w0: &[f32], ws: &[&Vec<f32>], shape: &[usize], filter_wise: bool) -> Vec<f32> {
    let mut out = vec![0f32; w0.len()];
    for idx in vectors(shape, if filter_wise { "rows" } else { "whole" }) {
        let b = gather(w0, &idx);
        let xs: Vec<Vec<f32>> = ws.iter().map(|w| gather(w, &idx)).collect();
        let offs: Vec<Vec<f32>> = xs.iter().map(|x| sub(x, &b)).collect();
        let mut cos = Vec::new();
        for a in 0..offs.len() {
            for c in a + 1..offs.len() {
                let np = (norm(&offs[a]) * norm(&offs[c])).max(1e-6);
                cos.push((dot(&offs[a], &offs[c]) / np).clamp(-1.0, 1.0));
            }
        }
        let cos_theta = cos.iter().sum::<f32>() / cos.len() as f32;
        let n = ws.len() as f32;
        let denom = 1.0 + (n - 1.0) * cos_theta;
        let t = if denom.abs() < 1e-6 { 0.0 } else { n * cos_theta / denom };
        for (j, &i) in idx.iter().enumerate() {
            let avg = xs.iter().fold(0f32, |s, x| s + x[j]) / n;
            out[i] = t * avg + (1.0 - t) * b[j];
        }
    }
    out
}

/// mergekit `nuslerp` (t from the weights as the method computes it in Python floats).
fn mk_nuslerp(t: f64, v0: &[f32], v1: &[f32], shape: &[usize], how: &str) -> Vec<f32> {
    let mut out = vec![0f32; v0.len()];
    let (t1, t0) = (t as f32, (1.0 - t) as f32);
    for idx in vectors(shape, how) {
        let (a, b) = (gather(v0, &idx), gather(v1, &idx));
        let (na, nb) = (norm(&a).max(1e-7), norm(&b).max(1e-7));
        let cos = a.iter().zip(&b).map(|(x, y)| (x / na) * (y / nb)).sum::<f32>().clamp(-1.0, 1.0);
        let colinear = 1.0 - cos * cos <= 1e-16;
        let theta = if colinear { 0f32 } else { cos }.acos();
        let st = theta.sin();
        for (j, &i) in idx.iter().enumerate() {
            out[i] = if colinear {
                t0 * a[j] + t1 * b[j]
            } else {
                ((t0 * theta).sin() * a[j] + (t1 * theta).sin() * b[j]) / st
            };
        }
    }
    out
}

/// mergekit `multislerp`.
fn mk_multislerp(xs: &[&Vec<f32>], base: Option<&Vec<f32>>, w: &[f32], normalize: bool, eps: f32) -> Vec<f32> {
    if xs.len() == 1 {
        return xs[0].clone();
    }
    let ts: Vec<Vec<f32>> = xs.iter().map(|x| base.map_or(x.to_vec(), |b| sub(x, b))).collect();
    let s: f32 = w.iter().sum();
    let w: Vec<f32> = if normalize { w.iter().map(|x| x / s).collect() } else { w.to_vec() };
    let norms: Vec<f32> = ts.iter().map(|t| norm(t)).collect();
    let units: Vec<Vec<f32>> = ts.iter().zip(&norms).map(|(t, n)| t.iter().map(|x| x / (n + eps)).collect()).collect();
    let l = ts[0].len();
    let mean: Vec<f32> = (0..l).map(|j| units.iter().zip(&w).fold(0f32, |s, (u, wi)| s + u[j] * wi)).collect();
    let mn = norm(&mean);
    assert!(mn >= eps, "test data: the fallbacks are not exercised here");
    let mean: Vec<f32> = mean.iter().map(|x| x / mn).collect();
    let dots: Vec<f32> = units.iter().map(|u| dot(u, &mean)).collect();
    let tr: Vec<f32> =
        (0..l).map(|j| (0..ts.len()).fold(0f32, |s, i| s + (units[i][j] - dots[i] * mean[j]) * w[i])).collect();
    let tn = norm(&tr) + eps;
    let avg: f32 = norms.iter().zip(&w).map(|(n, wi)| n * wi).sum();
    (0..l)
        .map(|j| {
            let r = (mean[j] * tn.cos() + tr[j] * (tn.sin() / tn)) * avg;
            base.map_or(r, |b| r + b[j])
        })
        .collect()
}

/// mergekit `karcher_merge_tensors` with alphas 1/K.
fn mk_karcher(xs: &[&Vec<f32>], max_iter: usize, tol: f32) -> Vec<f32> {
    let k = xs.len();
    if k == 1 {
        return xs[0].clone();
    }
    let alpha = 1.0 / k as f64;
    let norms: Vec<f32> = xs.iter().map(|x| norm(x)).collect();
    let units: Vec<Vec<f32>> = xs
        .iter()
        .zip(&norms)
        .map(|(x, &n)| if n == 0.0 { vec![0.0; x.len()] } else { x.iter().map(|v| v / n).collect() })
        .collect();
    let valid: Vec<usize> = (0..k).filter(|&i| norms[i] > tol).collect();
    let a: Vec<f32> = valid.iter().map(|_| (alpha / (alpha * valid.len() as f64)) as f32).collect();
    let l = xs[0].len();
    let mut mean = vec![0f32; l];
    for (j, &i) in valid.iter().enumerate() {
        for e in 0..l {
            mean[e] += a[j] * units[i][e];
        }
    }
    let mn = norm(&mean);
    mean = if mn < tol { units[valid[0]].clone() } else { mean.iter().map(|x| x / mn).collect() };
    for _ in 0..max_iter {
        let mut tangent = vec![0f32; l];
        for (j, &i) in valid.iter().enumerate() {
            let d = dot(&mean, &units[i]).clamp(-1.0, 1.0);
            let theta = d.acos();
            if theta < tol {
                continue;
            }
            for e in 0..l {
                tangent[e] += a[j] * (theta / theta.sin()) * (units[i][e] - d * mean[e]);
            }
        }
        let tn = norm(&tangent);
        if tn < tol {
            break;
        }
        mean = (0..l).map(|e| tn.cos() * mean[e] + tn.sin() * (tangent[e] / tn)).collect();
        let un = norm(&mean);
        if un > tol {
            mean.iter_mut().for_each(|x| *x /= un);
        }
    }
    let scale: f32 = norms.iter().map(|n| alpha as f32 * n).sum();
    mean.iter().map(|x| scale * x).collect()
}

/// mergekit `arcee_fusion_merge_method` (tensors under 1M elements: exact quantiles, no sampling).
fn mk_arcee_fusion(b: &[f32], x: &[f32], shape: &[usize]) -> Vec<f32> {
    let mut imp = vec![0f32; b.len()];
    for idx in vectors(shape, "rows") {
        let soft = |v: &[f32]| -> Vec<f32> {
            let m = v.iter().fold(f32::MIN, |a, &y| a.max(y));
            let s: f32 = v.iter().map(|y| (y - m).exp()).sum();
            v.iter().map(|y| (y - m).exp() / s + 1e-8).collect()
        };
        let (p, q) = (soft(&gather(x, &idx)), soft(&gather(b, &idx)));
        let kl: f32 = p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum();
        for &i in &idx {
            imp[i] = (x[i] - b[i]).abs() * kl;
        }
    }
    let mut sorted = imp.clone();
    sorted.sort_by(f32::total_cmp);
    let at = |q: f32| sorted[(q * (sorted.len() - 1) as f32) as usize];
    let thr = at(0.5) + 1.5 * (at(0.75) - at(0.25));
    (0..b.len()).map(|i| b[i] + (x[i] - b[i]) * if imp[i] >= thr { 1.0 } else { 0.0 }).collect()
}

#[test]
fn arcee_fusion_matches_mergekit() {
    let (d, ms) = setup("fusion");
    let got = run(&d, "merge_method: arcee_fusion\nbase_model: m0\nmodels: [m0, m1]\n", "out").unwrap();
    let mut kept = 0;
    for n in ms[0].keys() {
        let want = mk_arcee_fusion(&ms[0][n], &ms[1][n], shape(n));
        close(n, &got[n], &want, 1e-6);
        kept += want.iter().zip(&ms[0][n]).filter(|(w, b)| w != b).count();
    }
    assert!(kept > 0, "some changes are kept");
    let e = run(&d, "merge_method: arcee_fusion\nbase_model: m0\nmodels: [m1, m2]\n", "two").unwrap_err().to_string();
    assert!(e.contains("arcee_fusion") && e.contains("exactly one"), "{e}");
    let e = run(&d, "merge_method: arcee_fusion\nbase_model: m0\nmodels: [m1]\nparameters: {t: 0.5}\n", "t")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`t`"), "{e}");
}

#[test]
fn model_stock_matches_mergekit() {
    let (d, ms) = setup("stock");
    for fw in [false, true] {
        let y = format!(
            "merge_method: model_stock\nbase_model: m0\nmodels: [m1, m2, m3]\nparameters: {{filter_wise: {fw}}}\n"
        );
        let got = run(&d, &y, &format!("out{fw}")).unwrap();
        for n in ms[0].keys() {
            let want = mk_model_stock(&ms[0][n], &[&ms[1][n], &ms[2][n], &ms[3][n]], shape(n), fw);
            close(&format!("{n} filter_wise={fw}"), &got[n], &want, 1e-5);
        }
        // Streaming in small chunks (several per tensor, whole rows with filter_wise) gives the same result.
        let cfg = config(&d, &y, &format!("chunk{fw}")).unwrap();
        merge_with_chunk(dev(), &cfg, &d.join(format!("chunk{fw}")), &MergeOptions::default(), 150).unwrap();
        let chunked = load(&d.join(format!("chunk{fw}")));
        for n in ms[0].keys() {
            close(&format!("{n} chunked filter_wise={fw}"), &chunked[n], &got[n], 1e-6);
        }
    }
    // Two models: one pair.
    let got = run(&d, "merge_method: model_stock\nbase_model: m0\nmodels: [m0, m1, m2]\n", "two").unwrap();
    for n in ms[0].keys() {
        close(n, &got[n], &mk_model_stock(&ms[0][n], &[&ms[1][n], &ms[2][n]], shape(n), false), 1e-5);
    }
}

#[test]
fn nuslerp_matches_mergekit() {
    let (d, ms) = setup("nuslerp");
    let cases = [
        ("{}", "whole"),
        ("{nuslerp_flatten: false}", "rows"),
        ("{nuslerp_flatten: false, nuslerp_row_wise: true}", "cols"),
        ("{nuslerp_row_wise: true}", "whole"),
    ];
    for (i, (params, how)) in cases.iter().enumerate() {
        // With a base: the task vectors are interpolated; weights per tensor.
        let y = format!(
            "merge_method: nuslerp\nbase_model: m0\nparameters: {params}\nmodels:\n  - model: m1\n    parameters: \
             {{weight: [{{filter: mlp, value: 2.0}}, {{value: 0.3}}]}}\n  - model: m2\n    parameters: {{weight: 0.7}}\n"
        );
        let got = run(&d, &y, &format!("base{i}")).unwrap();
        for n in ms[0].keys() {
            let w1 = if n.contains("mlp") { 2.0 } else { 0.3 };
            let t = 0.7 / (w1 + 0.7);
            let r = mk_nuslerp(t, &sub(&ms[1][n], &ms[0][n]), &sub(&ms[2][n], &ms[0][n]), shape(n), how);
            let want: Vec<f32> = r.iter().zip(&ms[0][n]).map(|(x, b)| b + x).collect();
            close(&format!("{n} base {params}"), &got[n], &want, 1e-5);
        }
        // Without a base: the models themselves.
        let y = format!(
            "merge_method: nuslerp\nparameters: {params}\nmodels:\n  - model: m1\n    parameters: {{weight: 1.0}}\n  - \
             model: far\n    parameters: {{weight: 3.0}}\n"
        );
        let got = run(&d, &y, &format!("nobase{i}")).unwrap();
        for n in ms[0].keys() {
            close(&format!("{n} {params}"), &got[n], &mk_nuslerp(0.75, &ms[1][n], &ms[4][n], shape(n), how), 1e-5);
        }
    }
    // Weights summing to 0: t = 0.5. The same model twice: colinear, the lerp, which returns it.
    let y = "merge_method: nuslerp\nmodels:\n  - model: m1\n    parameters: {weight: 1.0}\n  - model: m1\n    parameters: {weight: -1.0}\n";
    let got = run(&d, y, "colinear").unwrap();
    for n in ms[0].keys() {
        close(n, &got[n], &ms[1][n], 1e-6);
    }
}

#[test]
fn multislerp_matches_mergekit() {
    let (d, ms) = setup("multislerp");
    let y = "merge_method: multislerp\nbase_model: m0\nmodels:\n  - model: m1\n    parameters: {weight: 0.5}\n  - model: m2\n    parameters: {weight: 0.3}\n  - model: m3\n    parameters: {weight: 0.2}\n";
    let got = run(&d, y, "base").unwrap();
    for n in ms[0].keys() {
        let want = mk_multislerp(&[&ms[1][n], &ms[2][n], &ms[3][n]], Some(&ms[0][n]), &[0.5, 0.3, 0.2], true, 1e-8);
        close(n, &got[n], &want, 1e-5);
    }
    let y = "merge_method: multislerp\nparameters: {normalize_weights: false, eps: 1e-6}\nmodels:\n  - model: m1\n    parameters: {weight: 2.0}\n  - model: far\n    parameters: {weight: 0.5}\n";
    let got = run(&d, y, "nobase").unwrap();
    for n in ms[0].keys() {
        let want = mk_multislerp(&[&ms[1][n], &ms[4][n]], None, &[2.0, 0.5], false, 1e-6);
        close(n, &got[n], &want, 1e-5);
    }
    // One model: returned as it is.
    let got = run(
        &d,
        "merge_method: multislerp\nbase_model: m0\nmodels:\n  - model: m2\n    parameters: {weight: 0.4}\n",
        "one",
    )
    .unwrap();
    for n in ms[0].keys() {
        assert_eq!(got[n], ms[2][n], "{n}");
    }
}

#[test]
fn karcher_matches_mergekit() {
    let (d, ms) = setup("karcher");
    // The base is one of the inputs (appended after the listed models, as mergekit orders them).
    let got = run(&d, "merge_method: karcher\nbase_model: m0\nmodels: [m1, m2, far]\n", "base").unwrap();
    for n in ms[0].keys() {
        close(n, &got[n], &mk_karcher(&[&ms[1][n], &ms[2][n], &ms[4][n], &ms[0][n]], 10, 1e-5), 1e-5);
    }
    let y = "merge_method: karcher\nparameters: {max_iter: 3, tol: 1e-3}\nmodels: [m1, far]\n";
    let got = run(&d, y, "nobase").unwrap();
    for n in ms[0].keys() {
        close(n, &got[n], &mk_karcher(&[&ms[1][n], &ms[4][n]], 3, 1e-3), 1e-5);
    }
    let got = run(&d, "merge_method: karcher\nmodels: [m3]\n", "one").unwrap();
    for n in ms[0].keys() {
        assert_eq!(got[n], ms[3][n], "{n}");
    }
}

#[test]
fn geometric_bad_parameters_name_the_key() {
    let (d, _) = setup("bad");
    let cases: [(&str, &[&str]); 9] = [
        ("merge_method: model_stock\nbase_model: m0\nmodels: [m1]\n", &["model_stock", "two other models"]),
        ("merge_method: model_stock\nmodels: [m1, m2]\n", &["base_model"]),
        (
            "merge_method: model_stock\nbase_model: m0\nmodels: [m1, m2]\nparameters: {filter_wise: 2}\n",
            &["filter_wise"],
        ),
        (
            "merge_method: model_stock\nbase_model: m0\nmodels: [m1, m2]\nparameters: {lambda: 2}\n",
            &["lambda", "filter_wise"],
        ),
        ("merge_method: nuslerp\nmodels:\n  - model: m1\n    parameters: {weight: 1}\n", &["nuslerp", "exactly two"]),
        (
            "merge_method: nuslerp\nmodels:\n  - model: m1\n    parameters: {weight: 1}\n  - model: m2\n",
            &["`m2`", "weight"],
        ),
        (
            "merge_method: multislerp\nparameters: {normalize_weights: 0.5, weight: 1}\nmodels: [m1, m2]\n",
            &["normalize_weights"],
        ),
        ("merge_method: karcher\nmodels: [m1, m2]\nparameters: {max_iter: -1}\n", &["max_iter"]),
        ("merge_method: karcher\nmodels: [m1, m2]\nparameters: {max_iter: [{value: 2}]}\n", &["max_iter"]),
    ];
    for (i, (y, words)) in cases.iter().enumerate() {
        let e = run(&d, y, &format!("out{i}")).unwrap_err().to_string();
        for w in words.iter() {
            assert!(e.contains(w), "case {i}: {e:?} should name {w}");
        }
        assert!(!d.join(format!("out{i}")).exists(), "no output left behind");
    }
    // A per-tensor weight with no matching filter fails naming the tensor and the model.
    let y = "merge_method: nuslerp\nmodels:\n  - model: m1\n    parameters: {weight: [{filter: mlp, value: 1}]}\n  - model: m2\n    parameters: {weight: 1}\n";
    let e = run(&d, y, "nofilter").unwrap_err().to_string();
    assert!(e.contains("`m1`") && e.contains("weight") && e.contains("tensor"), "{e}");
    assert!(!d.join("nofilter").exists());
}
