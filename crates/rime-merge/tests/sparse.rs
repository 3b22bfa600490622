//! mergekit 0.1.5's sparsifying methods (breadcrumbs, DELLA, SCE), the `rescale` switch and the `dtype`
//! semantics, end to end on small random checkpoints, against plain-Rust re-implementations of mergekit's
//! formulas (sparsify.py, generalized_task_arithmetic.py, sce.py, linear.py); bad parameters fail naming the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use half::f16;
use rand::{Rng, SeedableRng};
use rime_io::{Checkpoint, Dtype, RawTensorOwned};
use rime_kernels::{Device, DeviceOptions};
use rime_merge::{dare_mask, merge, merge_uniforms, MergeConfig, MergeOptions};

fn dev() -> &'static Device {
    static D: OnceLock<Device> = OnceLock::new();
    D.get_or_init(|| Device::new(&DeviceOptions::default()).expect("a wgpu adapter (lavapipe on CPU machines)"))
}

const SHAPES: [(&str, &[usize]); 4] = [
    ("emb.weight", &[7, 5]),
    ("layer.0.attention.q.weight", &[5, 5]),
    ("layer.0.mlp.weight", &[30, 20]),
    ("norm.bias", &[5]),
];

type Model = BTreeMap<String, Vec<f32>>;

fn write_model(dir: &Path, seed: u64, base: Option<&Model>) -> Model {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut raws, mut vals) = (Vec::new(), BTreeMap::new());
    for (n, s) in SHAPES {
        let v: Vec<f32> = (0..s.iter().product::<usize>())
            .map(|j| {
                let b = base.map_or(0.0, |b| b[n][j]);
                let amp = if base.is_some() { 0.02 } else { 1.0 };
                b + (rng.random::<f32>() * 2.0 - 1.0) * amp
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
    rime_io::write_safetensors_raw(dir.join("model.safetensors"), &raws, &BTreeMap::new()).unwrap();
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    vals
}

fn setup(tag: &str) -> (PathBuf, Vec<Model>) {
    let d = std::env::temp_dir().join(format!("rime-sparse-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let base = write_model(&d.join("m0"), 1, None);
    let mut ms = vec![base.clone()];
    for i in 1..4 {
        ms.push(write_model(&d.join(format!("m{i}")), i as u64 + 1, Some(&base)));
    }
    (d, ms)
}

fn run(dir: &Path, yaml: &str, out: &str) -> rime_merge::Result<(Model, Vec<String>)> {
    let cfg_path = dir.join(format!("{out}.yaml"));
    std::fs::write(&cfg_path, yaml).unwrap();
    let cfg = MergeConfig::from_file(&cfg_path)?;
    let r = merge(dev(), &cfg, &dir.join(out), &MergeOptions { force: true, ..Default::default() })?;
    let c = Checkpoint::open(dir.join(out)).unwrap();
    Ok((c.names().iter().map(|n| (n.to_string(), c.get_f32(n).unwrap())).collect(), r.notes))
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w}");
    }
}

// ---- mergekit's formulas, re-written in plain Rust (f32)

fn delta(x: &[f32], b: &[f32]) -> Vec<f32> {
    x.iter().zip(b).map(|(a, c)| a - c).collect()
}

/// sparsify.rescaled_masked_tensor with the L1 norm.
fn rescaled(t: &[f32], masked: Vec<f32>, rescale: bool) -> Vec<f32> {
    let before: f32 = t.iter().map(|x| x.abs()).sum();
    let after: f32 = masked.iter().map(|x| x.abs()).sum();
    if !rescale || before < 1e-7 || after < 1e-7 {
        return masked;
    }
    masked.iter().map(|x| x * (before / after)).collect()
}

/// sparsify.magnitude: the max(1, int(density L)) largest |x| (lower index first among equal ones).
fn mk_magnitude(d: &[f32], density: f64, rescale: bool) -> Vec<f32> {
    let k = ((density * d.len() as f64) as usize).max(1);
    let mut idx: Vec<usize> = (0..d.len()).collect();
    idx.sort_by(|&a, &b| d[b].abs().total_cmp(&d[a].abs()).then(a.cmp(&b)));
    let mut m = vec![0.0; d.len()];
    for &i in &idx[..k] {
        m[i] = d[i];
    }
    rescaled(d, m, rescale)
}

/// sparsify.magnitude_outliers: ascending sort of |x|, keep positions [n_bot, n_bot + int(density L)).
fn mk_outliers(d: &[f32], density: f64, gamma: f64, rescale: bool) -> Vec<f32> {
    let n = d.len();
    let target = (density * n as f64) as usize;
    let n_top = (gamma * n as f64) as usize;
    let n_bot = n.saturating_sub(target + n_top);
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| d[a].abs().total_cmp(&d[b].abs()).then(a.cmp(&b)));
    let mut m = vec![0.0; n];
    for &i in &idx[n_bot..n_bot + target] {
        m[i] = d[i];
    }
    rescaled(d, m, rescale)
}

/// sparsify.della_magprune with the uniforms `u` standing for torch.bernoulli's draws.
fn mk_della(d: &[f32], cols: usize, density: f64, eps: f64, u: &[f32], rescale: bool) -> Vec<f32> {
    let mut m = d.to_vec();
    for r in 0..d.len() / cols {
        let row = &d[r * cols..(r + 1) * cols];
        let mut idx: Vec<usize> = (0..cols).collect();
        idx.sort_by(|&a, &b| row[a].abs().total_cmp(&row[b].abs()).then(a.cmp(&b)));
        for (j, &e) in idx.iter().enumerate() {
            let p = (density - eps) as f32 + (j as f32 / (cols - 1) as f32) * 2.0 * eps as f32;
            if u[r * cols + e] >= p {
                m[r * cols + e] = 0.0;
            }
        }
    }
    rescaled(d, m, rescale)
}

fn mk_dare(d: &[f32], mask: &[f32], rescale: bool) -> Vec<f32> {
    rescaled(d, d.iter().zip(mask).map(|(x, k)| x * k).collect(), rescale)
}

/// generalized_task_arithmetic's combine.
fn mk_gta(base: &[f32], ds: &[Vec<f32>], w: &[f32], consensus: bool, normalize: bool, lambda: f32) -> Vec<f32> {
    (0..base.len())
        .map(|j| {
            let y: Vec<f32> = ds.iter().zip(w).map(|(d, wi)| d[j] * wi).collect();
            let sign = if y.iter().sum::<f32>() >= 0.0 { 1.0 } else { -1.0 };
            let agree: Vec<bool> = y.iter().map(|v| !consensus || (*v != 0.0 && v.signum() == sign)).collect();
            let mixed: f32 = y.iter().zip(&agree).filter(|(_, a)| **a).map(|(v, _)| v).sum();
            let div: f32 = w.iter().zip(&agree).filter(|(_, a)| **a).map(|(v, _)| v).sum();
            let div = if (consensus && div == 0.0) || (!consensus && div.abs() < 1e-8) { 1.0 } else { div };
            let mixed = if normalize { mixed / div } else { mixed };
            base[j] + mixed * lambda
        })
        .collect()
}

/// sce.sce_merge.
fn mk_sce(base: &[f32], ds: &[Vec<f32>], topk: f64) -> Vec<f32> {
    let (n, l) = (ds.len(), base.len());
    let mut tv = ds.to_vec();
    if topk < 1.0 {
        let var: Vec<f32> = (0..l)
            .map(|j| {
                let mean = ds.iter().map(|d| d[j]).sum::<f32>() / n as f32;
                ds.iter().map(|d| (d[j] - mean) * (d[j] - mean)).sum::<f32>() / n as f32
            })
            .collect();
        let nonzero = var.iter().filter(|v| **v != 0.0).count();
        let k = (nonzero as f32 * topk as f32) as usize;
        let mut idx: Vec<usize> = (0..l).collect();
        idx.sort_by(|&a, &b| var[b].total_cmp(&var[a]).then(a.cmp(&b)));
        let mut keep = vec![false; l];
        idx[..k].iter().for_each(|&i| keep[i] = true);
        for t in tv.iter_mut() {
            t.iter_mut().zip(&keep).for_each(|(x, k)| *x = if *k { *x } else { 0.0 });
        }
    }
    let means: Vec<f32> = tv.iter().map(|t| t.iter().map(|x| x * x).sum::<f32>() / l as f32).collect();
    let total: f32 = means.iter().sum();
    let w: Vec<f32> =
        if total.abs() < 1e-6 { vec![1.0 / n as f32; n] } else { means.iter().map(|m| m / total).collect() };
    (0..l)
        .map(|j| {
            let sign = if tv.iter().map(|t| t[j]).sum::<f32>() >= 0.0 { 1.0 } else { -1.0 };
            let (mut merged, mut den) = (0.0f32, 0.0f32);
            for i in 0..n {
                if tv[i][j] != 0.0 && tv[i][j].signum() == sign {
                    merged += tv[i][j] * w[i];
                    den += w[i];
                }
            }
            base[j] + merged / den.max(1e-6)
        })
        .collect()
}

fn cols(n: &str) -> usize {
    SHAPES.iter().find(|(m, _)| *m == n).map(|(_, s)| *s.last().unwrap()).unwrap()
}

#[test]
fn breadcrumbs_match_mergekit() {
    let (d, ms) = setup("bc");
    for (method, consensus, rescale) in
        [("breadcrumbs", false, false), ("breadcrumbs_ties", true, false), ("breadcrumbs", false, true)]
    {
        let y = format!("merge_method: {method}\nbase_model: m0\nparameters: {{rescale: {rescale}, lambda: 0.9}}\nmodels:\n  - model: m1\n    parameters: {{weight: 0.5, density: 0.6, gamma: 0.1}}\n  - model: m2\n    parameters: {{weight: 0.7, density: 0.3}}\n  - model: m3\n    parameters: {{weight: 0.4, density: 0.9, gamma: 0.2}}\n");
        let (got, _) = run(&d, &y, method).unwrap();
        for n in ms[0].keys() {
            let b = &ms[0][n];
            let ds: Vec<Vec<f32>> = [(1, 0.6, 0.1), (2, 0.3, 0.01), (3, 0.9, 0.2)]
                .iter()
                .map(|&(i, dn, g)| mk_outliers(&delta(&ms[i][n], b), dn, g, rescale))
                .collect();
            close(&format!("{method} {n}"), &got[n], &mk_gta(b, &ds, &[0.5, 0.7, 0.4], consensus, false, 0.9), 1e-6);
        }
    }
}

#[test]
fn della_matches_mergekit_with_rimes_draws() {
    let (d, ms) = setup("della");
    for (method, consensus, normalize, rescale) in
        [("della", true, true, true), ("della_linear", false, false, true), ("della", true, true, false)]
    {
        let y = format!("merge_method: {method}\nbase_model: m0\nparameters: {{seed: 5, rescale: {rescale}}}\nmodels:\n  - model: m1\n    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.2}}\n  - model: m2\n    parameters: {{weight: 0.8, density: 0.7}}\n");
        let (got, _) = run(&d, &y, method).unwrap();
        for n in ms[0].keys() {
            let b = &ms[0][n];
            let ds: Vec<Vec<f32>> = [(1usize, 0.5, 0.2), (2, 0.7, 0.15)]
                .iter()
                .enumerate()
                .map(|(i, &(m, dn, e))| {
                    let u = merge_uniforms(5, n, i, b.len());
                    mk_della(&delta(&ms[m][n], b), cols(n), dn, e, &u, rescale)
                })
                .collect();
            close(&format!("{method} {n}"), &got[n], &mk_gta(b, &ds, &[0.5, 0.8], consensus, normalize, 1.0), 1e-5);
        }
    }
}

#[test]
fn dare_rescale_is_mergekits_l1_rescale_and_can_be_off() {
    let (d, ms) = setup("dare");
    for (method, consensus, rescale) in [("dare_linear", false, true), ("dare_ties", true, false)] {
        let y = format!("merge_method: {method}\nbase_model: m0\nparameters: {{seed: 42, rescale: {rescale}}}\nmodels:\n  - model: m1\n    parameters: {{weight: 0.6, density: 0.5}}\n  - model: m2\n    parameters: {{weight: 0.4, density: 0.8}}\n");
        let (got, _) = run(&d, &y, method).unwrap();
        for n in ms[0].keys() {
            let b = &ms[0][n];
            let ds: Vec<Vec<f32>> = [(1usize, 0.5f32), (2, 0.8)]
                .iter()
                .enumerate()
                .map(|(i, &(m, dn))| mk_dare(&delta(&ms[m][n], b), &dare_mask(42, n, i, b.len(), dn), rescale))
                .collect();
            close(&format!("{method} {n}"), &got[n], &mk_gta(b, &ds, &[0.6, 0.4], consensus, false, 1.0), 1e-5);
        }
    }
}

#[test]
fn ties_with_rescale_matches_mergekit() {
    let (d, ms) = setup("tiesr");
    let y = "merge_method: ties\nbase_model: m0\nparameters: {rescale: true}\nmodels:\n  - model: m1\n    parameters: {weight: 0.5, density: 0.3}\n  - model: m2\n    parameters: {weight: 1.0, density: 0.01}\n";
    let (got, _) = run(&d, y, "out").unwrap();
    for n in ms[0].keys() {
        let b = &ms[0][n];
        let ds = vec![mk_magnitude(&delta(&ms[1][n], b), 0.3, true), mk_magnitude(&delta(&ms[2][n], b), 0.01, true)];
        close(n, &got[n], &mk_gta(b, &ds, &[0.5, 1.0], true, true, 1.0), 1e-5);
    }
}

#[test]
fn sce_matches_mergekit() {
    let (d, ms) = setup("sce");
    for topk in [1.0, 0.4] {
        let y = format!("merge_method: sce\nbase_model: m0\nparameters: {{select_topk: {topk}, int8_mask: true}}\nmodels: [m1, m2, m3]\n");
        let (got, notes) = run(&d, &y, "out").unwrap();
        assert!(notes.iter().any(|n| n.contains("int8_mask: no effect")), "{notes:?}");
        for n in ms[0].keys() {
            let b = &ms[0][n];
            let ds: Vec<Vec<f32>> = (1..4).map(|i| delta(&ms[i][n], b)).collect();
            close(&format!("sce {topk} {n}"), &got[n], &mk_sce(b, &ds, topk), 1e-5);
        }
    }
}

/// mergekit with `dtype: float16`: inputs rounded on load, every torch op rounded to float16 (sums accumulate
/// in f32 and round once, scalars multiply in f32).
#[test]
fn float16_compute_matches_mergekits_rounding() {
    let (d, ms) = setup("f16");
    let r = |x: f32| f16::from_f32(x).to_f32();
    let y = "merge_method: ties\nbase_model: m0\ndtype: float16\nout_dtype: float32\nparameters: {lambda: 0.8}\nmodels:\n  - model: m1\n    parameters: {weight: 0.3, density: 0.5}\n  - model: m2\n    parameters: {weight: 0.9, density: 0.7}\n";
    let (got, _) = run(&d, y, "ties").unwrap();
    let y2 = "merge_method: task_arithmetic\nbase_model: m0\ndtype: float16\nout_dtype: float32\nmodels:\n  - model: m1\n    parameters: {weight: 0.3}\n  - model: m2\n    parameters: {weight: 0.9}\n";
    let (got2, _) = run(&d, y2, "ta").unwrap();
    for n in ms[0].keys() {
        let b: Vec<f32> = ms[0][n].iter().map(|&x| r(x)).collect();
        let w = [r(0.3), r(0.9)];
        for (consensus, dens, out) in [(true, [0.5, 0.7], &got), (false, [1.0, 1.0], &got2)] {
            let ds: Vec<Vec<f32>> = (0..2)
                .map(|i| {
                    let dv: Vec<f32> = ms[i + 1][n].iter().zip(&b).map(|(&x, &c)| r(r(x) - c)).collect();
                    let m = mk_magnitude(&dv, dens[i], false);
                    m.iter().map(|x| r(x * w[i])).collect()
                })
                .collect();
            let want: Vec<f32> = (0..b.len())
                .map(|j| {
                    let s = r(ds[0][j] + ds[1][j]);
                    let sign = if s >= 0.0 { 1.0 } else { -1.0 };
                    let agree = |i: usize| !consensus || (ds[i][j] != 0.0 && ds[i][j].signum() == sign);
                    let mixed = r((0..2).filter(|&i| agree(i)).map(|i| ds[i][j]).sum::<f32>());
                    let div = r((0..2).filter(|&i| agree(i)).map(|i| w[i]).sum::<f32>());
                    let mut m = mixed;
                    if consensus {
                        // ties normalises (mergekit's default); task_arithmetic does not.
                        m = r(m / if div == 0.0 { 1.0 } else { div });
                        m = r(m * 0.8);
                    }
                    r(b[j] + m)
                })
                .collect();
            assert_eq!(out[n], want, "{n} consensus={consensus}");
        }
    }
}

#[test]
fn float16_inputs_compute_in_float16_without_dtype() {
    // All inputs stored as float16 and no `dtype`: mergekit computes in float16 (the inputs' common type).
    let d = std::env::temp_dir().join(format!("rime-sparse-test-h-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let mut vals = Vec::new();
    for (i, seed) in [3u64, 4].iter().enumerate() {
        let dir = d.join(format!("h{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(*seed);
        let v: Vec<f16> = (0..64).map(|_| f16::from_f32(rng.random::<f32>() * 0.01)).collect();
        let raw = RawTensorOwned {
            name: "w".into(),
            dtype: Dtype::F16,
            shape: vec![64],
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        rime_io::write_safetensors_raw(dir.join("model.safetensors"), &[raw], &BTreeMap::new()).unwrap();
        vals.push(v);
    }
    let y = "merge_method: task_arithmetic\nbase_model: h0\nparameters: {lambda: 0.7}\nmodels:\n  - model: h1\n    parameters: {weight: 0.35}\n";
    let (got, _) = run(&d, y, "out").unwrap();
    assert_eq!(Checkpoint::open(d.join("out")).unwrap().info("w").unwrap().0, Dtype::F16);
    let r = |x: f32| f16::from_f32(x).to_f32();
    let want: Vec<f32> = (0..64)
        .map(|j| {
            let (b, x) = (vals[0][j].to_f32(), vals[1][j].to_f32());
            r(b + r(r(r(x - b) * r(0.35)) * 0.7))
        })
        .collect();
    assert_eq!(got["w"], want);
}

/// The merge must fail with a message naming every `needles` entry.
fn bad(d: &Path, yaml: &str, needles: &[&str]) {
    let e = run(d, yaml, "bad_out").expect_err(yaml).to_string();
    for n in needles {
        assert!(e.contains(n), "error `{e}` should name `{n}`");
    }
}

#[test]
fn bad_parameters_name_the_key() {
    let (d, _) = setup("bad");
    let m = "base_model: m0\nmodels:\n  - model: m1\n    parameters: {weight: 1.0, density: 0.5";
    bad(&d, &format!("merge_method: breadcrumbs\n{m}, gamma: 1.5}}\n"), &["gamma", "1.5", "[0, 1]"]);
    bad(&d, &format!("merge_method: della\n{m}, epsilon: 0.6}}\n"), &["epsilon", "0.6", "density", "m1"]);
    bad(&d, &format!("merge_method: della\n{m}, gamma: 0.1}}\n"), &["unknown parameter `gamma`", "della"]);
    bad(&d, &format!("merge_method: ties\n{m}, epsilon: 0.1}}\n"), &["unknown parameter `epsilon`"]);
    bad(
        &d,
        "merge_method: sce\nbase_model: m0\nparameters: {select_topk: 2}\nmodels: [m1]\n",
        &["select_topk", "[0, 1]"],
    );
    bad(
        &d,
        "merge_method: sce\nbase_model: m0\nmodels:\n  - model: m1\n    parameters: {weight: 1.0}\n",
        &["unknown parameter `weight`", "sce"],
    );
    bad(
        &d,
        "merge_method: dare_ties\nbase_model: m0\nparameters: {rescale: [{value: 1}]}\nmodels: [m1]\n",
        &["rescale"],
    );
    bad(&d, "merge_method: breadcrumbs\nbase_model: m0\ndtype: float8\nmodels: [m1]\n", &["dtype", "float8"]);
}
