//! End-to-end merges of small random checkpoints written to a temporary folder, compared with plain-Rust
//! versions of mergekit 0.1.5's formulas; bad inputs must fail naming the culprit and leave no output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rime_io::{Checkpoint, Dtype, RawTensorOwned};
use rime_kernels::{Device, DeviceOptions};
use rime_merge::{fold_lora, merge, MergeConfig, MergeOptions};

fn dev() -> &'static Device {
    static D: OnceLock<Device> = OnceLock::new();
    D.get_or_init(|| Device::new(&DeviceOptions::default()).expect("a wgpu adapter (lavapipe on CPU machines)"))
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rime-merge-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Tensor names and shapes of the toy model; `pos` is an I64 tensor that must be copied, not merged.
const SHAPES: [(&str, &[usize]); 4] = [
    ("emb.weight", &[7, 5]),
    ("layer.0.attention.q.weight", &[5, 5]),
    ("layer.0.mlp.weight", &[3, 5]),
    ("norm.bias", &[5]),
];

fn randn(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// Writes a model folder with random tensors (seeded), config.json and vocab.txt.
fn write_model(dir: &Path, seed: u64, shapes: &[(&str, &[usize])]) -> BTreeMap<String, Vec<f32>> {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut raws = Vec::new();
    let mut vals = BTreeMap::new();
    for (n, s) in shapes {
        let v = randn(&mut rng, s.iter().product());
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
    std::fs::write(dir.join("vocab.txt"), "[PAD]\n").unwrap();
    vals
}

fn load(dir: &Path) -> BTreeMap<String, Vec<f32>> {
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

fn run(dir: &Path, yaml: &str, out: &str) -> rime_merge::Result<BTreeMap<String, Vec<f32>>> {
    let cfg_path = dir.join(format!("{out}.yaml"));
    std::fs::write(&cfg_path, yaml).unwrap();
    let cfg = MergeConfig::from_file(&cfg_path)?;
    let out = dir.join(out);
    let r = merge(dev(), &cfg, &out, &MergeOptions::default())?;
    assert!(r.bytes_read > 0 && r.bytes_written > 0 && r.seconds > 0.0);
    assert!(out.join("merge_report.json").is_file() && out.join("config.json").is_file());
    Ok(load(&out))
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w}");
    }
}

fn setup(tag: &str) -> (PathBuf, Vec<BTreeMap<String, Vec<f32>>>) {
    let d = tmpdir(tag);
    let ms = (0..4).map(|i| write_model(&d.join(format!("m{i}")), i as u64 + 1, &SHAPES)).collect();
    (d, ms)
}

#[test]
fn uniform_soup_of_identical_checkpoints_returns_it() {
    let d = tmpdir("soup");
    let a = write_model(&d.join("a"), 7, &SHAPES);
    std::fs::create_dir_all(d.join("b")).unwrap();
    std::fs::copy(d.join("a/model.safetensors"), d.join("b/model.safetensors")).unwrap();
    let y = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1.0}\n  - model: b\n    parameters: {weight: 1.0}\n  - model: a\n    parameters: {weight: 1.0}\n";
    let got = run(&d, y, "out").unwrap();
    for (n, v) in &a {
        close(n, &got[n], v, 1e-6);
    }
}

#[test]
fn task_arithmetic_weight_zero_returns_base() {
    let (d, ms) = setup("ta0");
    let y = "merge_method: task_arithmetic\nbase_model: m0\nmodels:\n  - model: m1\n    parameters: {weight: 0.0}\n  - model: m2\n    parameters: {weight: 0.0}\n";
    let got = run(&d, y, "out").unwrap();
    for (n, v) in &ms[0] {
        assert_eq!(&got[n], v, "{n}");
    }
}

// ---- plain-Rust mergekit formulas

fn mk_linear(xs: &[&[f32]], w: &[f32], normalize: bool) -> Vec<f32> {
    let s: f32 = w.iter().sum();
    (0..xs[0].len())
        .map(|j| xs.iter().zip(w).map(|(x, wi)| wi * x[j]).sum::<f32>() / if normalize { s } else { 1.0 })
        .collect()
}

fn mk_magnitude(d: &[f32], density: f64) -> Vec<f32> {
    let k = (density * d.len() as f64) as usize;
    let mut idx: Vec<usize> = (0..d.len()).collect();
    idx.sort_by(|&a, &b| d[b].abs().total_cmp(&d[a].abs()).then(a.cmp(&b)));
    let mut out = vec![0.0; d.len()];
    for &i in &idx[..k] {
        out[i] = d[i];
    }
    out
}

/// generalized_task_arithmetic: deltas (already sparsified), weights, sign consensus "sum" or none.
fn mk_gta(base: &[f32], deltas: &[Vec<f32>], w: &[f32], consensus: bool, normalize: bool, lambda: f32) -> Vec<f32> {
    (0..base.len())
        .map(|j| {
            let y: Vec<f32> = deltas.iter().zip(w).map(|(d, wi)| d[j] * wi).collect();
            let (mixed, div) = if consensus {
                let sign = if y.iter().sum::<f32>() >= 0.0 { 1.0 } else { -1.0 };
                let mask: Vec<bool> = y.iter().map(|v| *v != 0.0 && v.signum() == sign).collect();
                let m: f32 = y.iter().zip(&mask).filter(|(_, k)| **k).map(|(v, _)| v).sum();
                let dv: f32 = w.iter().zip(&mask).filter(|(_, k)| **k).map(|(v, _)| v).sum();
                (m, if dv == 0.0 { 1.0 } else { dv })
            } else {
                let s: f32 = w.iter().sum();
                (y.iter().sum(), if s.abs() < 1e-8 { 1.0 } else { s })
            };
            base[j] + lambda * if normalize { mixed / div } else { mixed }
        })
        .collect()
}

/// mergekit's `slerp` in f32, as numpy runs it on float32 arrays (acos near 1 is ill-conditioned, so the
/// comparison allows 1e-4).
fn mk_slerp(a: &[f32], b: &[f32], t: f32) -> Vec<f32> {
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let (na, nb) = (norm(a), norm(b));
    let dot: f32 = a.iter().zip(b).map(|(x, y)| (x / na) * (y / nb)).sum();
    let (s0, s1) = if dot.abs() > 0.9995 {
        (1.0 - t, t)
    } else {
        let th = dot.acos();
        (((1.0 - t) * th).sin() / th.sin(), (t * th).sin() / th.sin())
    };
    a.iter().zip(b).map(|(x, y)| s0 * x + s1 * y).collect()
}

fn delta(x: &[f32], b: &[f32]) -> Vec<f32> {
    x.iter().zip(b).map(|(a, c)| a - c).collect()
}

#[test]
fn linear_matches_mergekit() {
    let (d, ms) = setup("linear");
    let y = "merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 0.5}\n  - model: m2\n    parameters:\n      weight: [{filter: attention, value: 2.0}, {value: 0.25}]\n  - model: m3\n    parameters: {weight: 1.5}\n";
    let got = run(&d, y, "out").unwrap();
    for n in ms[0].keys() {
        let w2 = if n.contains("attention") { 2.0 } else { 0.25 };
        let want = mk_linear(&[&ms[1][n], &ms[2][n], &ms[3][n]], &[0.5, w2, 1.5], true);
        close(n, &got[n], &want, 1e-6);
    }
    // normalize: false
    let y = "merge_method: linear\nparameters: {normalize: false}\nmodels:\n  - model: m1\n    parameters: {weight: 0.5}\n  - model: m2\n    parameters: {weight: 0.7}\n";
    let got = run(&d, y, "out2").unwrap();
    for n in ms[0].keys() {
        close(n, &got[n], &mk_linear(&[&ms[1][n], &ms[2][n]], &[0.5, 0.7], false), 1e-6);
    }
}

#[test]
fn task_arithmetic_matches_mergekit() {
    let (d, ms) = setup("ta");
    let y = "merge_method: task_arithmetic\nbase_model: m0\nparameters: {lambda: 0.8}\nmodels:\n  - model: m0\n  - model: m1\n    parameters: {weight: 0.5}\n  - model: m2\n    parameters: {weight: -0.3}\n  - model: m3\n    parameters: {weight: 1.0}\n";
    let got = run(&d, y, "out").unwrap();
    for n in ms[0].keys() {
        let b = &ms[0][n];
        let ds: Vec<Vec<f32>> = (1..4).map(|i| delta(&ms[i][n], b)).collect();
        close(n, &got[n], &mk_gta(b, &ds, &[0.5, -0.3, 1.0], false, false, 0.8), 1e-5);
    }
}

#[test]
fn ties_matches_mergekit() {
    let (d, ms) = setup("ties");
    let y = "merge_method: ties\nbase_model: m0\nparameters: {int8_mask: true}\nmodels:\n  - model: m1\n    parameters: {weight: 0.5, density: 0.5}\n  - model: m2\n    parameters: {weight: 0.3, density: 0.7}\n  - model: m3\n    parameters: {weight: 1.0, density: 0.4}\ndtype: float32\n";
    let got = run(&d, y, "out").unwrap();
    for n in ms[0].keys() {
        let b = &ms[0][n];
        let ds: Vec<Vec<f32>> =
            [(1, 0.5), (2, 0.7), (3, 0.4)].iter().map(|&(i, dn)| mk_magnitude(&delta(&ms[i][n], b), dn)).collect();
        close(n, &got[n], &mk_gta(b, &ds, &[0.5, 0.3, 1.0], true, true, 1.0), 1e-5);
    }
}

#[test]
fn dare_matches_mergekit_with_the_documented_mask() {
    let (d, ms) = setup("dare");
    for (method, consensus) in [("dare_linear", false), ("dare_ties", true)] {
        let y = format!("merge_method: {method}\nbase_model: m0\nparameters: {{seed: 42}}\nmodels:\n  - model: m1\n    parameters: {{weight: 0.6, density: 0.5}}\n  - model: m2\n    parameters: {{weight: 0.4, density: 0.8}}\n");
        let got = run(&d, &y, method).unwrap();
        for n in ms[0].keys() {
            let b = &ms[0][n];
            let ds: Vec<Vec<f32>> = [(1usize, 0.5f32), (2, 0.8)]
                .iter()
                .enumerate()
                .map(|(i, &(m, dn))| {
                    let mask = rime_merge::dare_mask(42, n, i, b.len(), dn);
                    // mergekit 0.1.5 rescales to the L1 norm of the task vector before the drop.
                    let dv = delta(&ms[m][n], b);
                    let masked: Vec<f32> = dv.iter().zip(&mask).map(|(x, k)| x * k).collect();
                    let before: f32 = dv.iter().map(|x| x.abs()).sum();
                    let after: f32 = masked.iter().map(|x| x.abs()).sum();
                    masked.iter().map(|x| if after < 1e-7 { *x } else { x * (before / after) }).collect()
                })
                .collect();
            close(n, &got[n], &mk_gta(b, &ds, &[0.6, 0.4], consensus, false, 1.0), 1e-5);
        }
    }
}

#[test]
fn slerp_matches_mergekit() {
    let (d, ms) = setup("slerp");
    let y = "merge_method: slerp\nbase_model: m0\nmodels:\n  - model: m0\n  - model: m1\nparameters:\n  t: [{filter: mlp, value: 0.7}, {value: 0.3}]\n";
    let got = run(&d, y, "out").unwrap();
    for n in ms[0].keys() {
        let t = if n.contains("mlp") { 0.7 } else { 0.3 };
        close(n, &got[n], &mk_slerp(&ms[0][n], &ms[1][n], t), 1e-4);
    }
}

#[test]
fn sharded_float16_output_reads_back() {
    let (d, ms) = setup("shard");
    let cfg_path = d.join("c.yaml");
    std::fs::write(&cfg_path, "merge_method: linear\ndtype: float16\nmodels: [m1, m2]\n").unwrap();
    let cfg = MergeConfig::from_file(&cfg_path).unwrap();
    let out = d.join("out");
    merge(dev(), &cfg, &out, &MergeOptions { force: false, shard_size: 100 }).unwrap();
    assert!(out.join("model.safetensors.index.json").is_file());
    let c = Checkpoint::open(&out).unwrap();
    assert_eq!(c.info("emb.weight").unwrap().0, Dtype::F16);
    assert_eq!(c.info("pos").unwrap().0, Dtype::I64);
    let got = load(&out);
    for n in ms[0].keys() {
        close(n, &got[n], &mk_linear(&[&ms[1][n], &ms[2][n]], &[1.0, 1.0], true), 1e-3);
    }
    // An existing output is refused without force, replaced with it.
    let e = merge(dev(), &cfg, &out, &MergeOptions::default()).unwrap_err().to_string();
    assert!(e.contains("exists") && e.contains("MergeOptions::force") && !e.contains("--"), "{e}");
    merge(dev(), &cfg, &out, &MergeOptions { force: true, shard_size: 1 << 30 }).unwrap();
    assert!(out.join("model.safetensors").is_file() && !out.join("model.safetensors.index.json").exists());
}

/// The merge must fail with a message holding every `needles` entry, and no output folder (or leftover
/// temporary folder) may remain.
fn bad(d: &Path, yaml: &str, needles: &[&str]) {
    let out = d.join("bad_out");
    let e = run(d, yaml, "bad_out").expect_err(yaml).to_string();
    for n in needles {
        assert!(e.contains(n), "error `{e}` should name `{n}`");
    }
    assert!(!out.exists(), "{e}: output folder left behind");
    let leftovers: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("rime-merge-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary folder left: {leftovers:?}");
}

#[test]
fn bad_inputs_name_the_culprit_and_leave_no_output() {
    let (d, _) = setup("bad");
    let mut other: Vec<(&str, &[usize])> = SHAPES.to_vec();
    other[3] = ("norm.bias", &[6]);
    write_model(&d.join("wrongshape"), 9, &other);
    other[3] = ("final_norm.bias", &[5]);
    write_model(&d.join("wrongname"), 9, &other);
    bad(&d, "merge_method: linear\nmodels: [m1, wrongshape]\n", &["norm.bias", "[5]", "[6]", "wrongshape"]);
    bad(&d, "merge_method: linear\nmodels: [m1, wrongname]\n", &["norm.bias", "wrongname"]);
    bad(&d, "merge_method: ties\nmodels: [m1, m2]\n", &["base_model", "ties"]);
    bad(&d, "merge_method: frankenmerge\nmodels: [m1]\n", &["frankenmerge"]);
    bad(&d, "merge_method: linear\nparameters: {lambda: 2}\nmodels: [m1]\n", &["lambda", "linear"]);
    bad(
        &d,
        "merge_method: ties\nbase_model: m0\nmodels:\n  - model: m1\n    parameters: {density: 0, weight: 1}\n",
        &["density", "m1", "(0, 1]"],
    );
    bad(&d, "merge_method: dare_ties\nbase_model: m0\nparameters: {density: 1.5}\nmodels: [m1]\n", &["density", "1.5"]);
    bad(&d, "merge_method: linear\nmodels:\n  - model: m1\n    parameters: {wieght: 1}\n", &["wieght"]);
    bad(&d, "merge_method: linear\nmodels: [m1, nowhere]\n", &["nowhere"]);
    bad(&d, "merge_method: slerp\nbase_model: m0\nmodels: [m1, m2]\nparameters: {t: 0.5}\n", &["slerp", "2 others"]);
    bad(&d, "merge_method: linear\nmodels: [m1]\ndtype: float8\n", &["float8"]);
}

/// Folding the golden peft adapter (r 8, alpha 16: scale 2) into the real MiniLM equals W + 2 B A.
#[test]
fn fold_lora_matches_cpu_on_minilm() {
    let Ok(base) = rime_io::locate_model("all-minilm-l6-v2") else {
        eprintln!("skipped: models/all-minilm-l6-v2 not present");
        return;
    };
    let adapter =
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/minilm_lora_peft_adapter"));
    let d = tmpdir("lora");
    let out = d.join("folded");
    let r = fold_lora(&adapter, &base, &out, None, &MergeOptions::default()).unwrap();
    assert!(r.notes[0].starts_with("12 LoRA modules"), "{:?}", r.notes);
    assert!(out.join("tokenizer.json").is_file() && out.join("config.json").is_file());
    let ad = rime_io::PeftAdapter::load(&adapter).unwrap();
    let b = Checkpoint::open(&base).unwrap();
    let o = Checkpoint::open(&out).unwrap();
    assert_eq!(b.names(), o.names());
    let pairs = ad.lora_pairs();
    for p in &pairs {
        let name = format!("{}.weight", p.module);
        let (a, bb) = (ad.get(&p.a).unwrap(), ad.get(&p.b).unwrap());
        let (rk, fin, fout) = (a.shape[0], a.shape[1], bb.shape[0]);
        let w = b.get_f32(&name).unwrap();
        let want: Vec<f32> = (0..fout * fin)
            .map(|idx| {
                let (oo, i) = (idx / fin, idx % fin);
                w[idx] + 2.0 * (0..rk).map(|q| bb.data[oo * rk + q] * a.data[q * fin + i]).sum::<f32>()
            })
            .collect();
        close(&name, &o.get_f32(&name).unwrap(), &want, 1e-6);
    }
    let untouched = "encoder.layer.0.attention.self.key.weight";
    assert_eq!(b.get_raw(untouched).unwrap().bytes, o.get_raw(untouched).unwrap().bytes);
}

/// The streamed path in chunks of 3 elements (every tensor of the toy model spans several chunks, none a
/// multiple of 3) gives exactly what one chunk per tensor gives, for every method.
#[test]
fn chunked_merge_equals_unchunked() {
    let (d, _) = setup("chunk");
    let configs = [
        ("linear", "merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 0.5}\n  - model: m2\n    parameters: {weight: 0.3}\n  - model: m3\n    parameters: {weight: 0.2}\n"),
        ("ta", "merge_method: task_arithmetic\nbase_model: m0\nparameters: {lambda: 0.8, normalize: true}\nmodels:\n  - model: m1\n    parameters: {weight: 0.5}\n  - model: m2\n    parameters: {weight: -0.3}\n  - model: m3\n"),
        ("ties", "merge_method: ties\nbase_model: m0\nmodels:\n  - model: m1\n    parameters: {weight: 0.5, density: 0.5}\n  - model: m2\n    parameters: {weight: 0.3, density: 0.7}\n  - model: m3\n    parameters: {weight: 1.0, density: 1.0}\n"),
        ("ties_dense", "merge_method: ties\nbase_model: m0\nparameters: {lambda: 0.7}\nmodels:\n  - model: m1\n    parameters: {weight: 0.5}\n  - model: m2\n    parameters: {weight: 0.3}\n"),
        ("dare_linear", "merge_method: dare_linear\nbase_model: m0\nparameters: {seed: 3}\nmodels:\n  - model: m1\n    parameters: {weight: 0.6, density: 0.5}\n  - model: m2\n    parameters: {weight: 0.4, density: 0.8}\n"),
        ("dare_ties", "merge_method: dare_ties\nbase_model: m0\nparameters: {seed: 3}\nmodels:\n  - model: m1\n    parameters: {weight: 0.6, density: 0.5}\n  - model: m2\n    parameters: {weight: 0.4, density: 0.8}\ndtype: float16\n"),
        ("slerp", "merge_method: slerp\nbase_model: m0\nmodels:\n  - model: m0\n  - model: m1\nparameters: {t: 0.3}\n"),
    ];
    for (tag, yaml) in configs {
        let cfg_path = d.join(format!("{tag}.yaml"));
        std::fs::write(&cfg_path, yaml).unwrap();
        let cfg = MergeConfig::from_file(&cfg_path).unwrap();
        let (whole, chunked) = (d.join(format!("{tag}_whole")), d.join(format!("{tag}_chunked")));
        rime_merge::merge_with_chunk(dev(), &cfg, &whole, &MergeOptions::default(), usize::MAX).unwrap();
        rime_merge::merge_with_chunk(dev(), &cfg, &chunked, &MergeOptions::default(), 3).unwrap();
        let (a, b) = (load(&whole), load(&chunked));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{tag}");
        for (n, v) in &a {
            assert_eq!(v, &b[n], "{tag}: {n} differs between one chunk and chunks of 3");
            assert!(v.iter().any(|x| *x != 0.0), "{tag}: {n} is all zeros");
        }
    }
}
