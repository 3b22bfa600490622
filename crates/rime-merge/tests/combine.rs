//! LoRA adapter combination (peft's `add_weighted_adapter`) on small random adapters, against plain-Rust
//! versions of peft's formulas, and the factor merges against the golden peft results.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rime_io::peft::{AdapterConfig, AdapterTensor, PeftAdapter};
use rime_kernels::{Device, DeviceOptions};
use rime_merge::{combine_adapters, combine_lora, combine_stack, dare_mask, Combination, CombineOptions};

fn dev() -> &'static Device {
    static D: OnceLock<Device> = OnceLock::new();
    D.get_or_init(|| Device::new(&DeviceOptions::default()).expect("a wgpu adapter (lavapipe on CPU machines)"))
}

const MODULES: [(&str, usize, usize); 2] =
    [("encoder.layer.0.attention.self.query", 6, 5), ("encoder.layer.0.attention.self.value", 6, 7)];

fn adapter(seed: u64, r: usize, alpha: f64) -> PeftAdapter {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rn = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect() };
    let mut ts = Vec::new();
    for (m, fin, fout) in MODULES {
        ts.push(AdapterTensor {
            name: format!("base_model.model.{m}.lora_A.weight"),
            shape: vec![r, fin],
            data: rn(r * fin),
        });
        ts.push(AdapterTensor {
            name: format!("base_model.model.{m}.lora_B.weight"),
            shape: vec![fout, r],
            data: rn(fout * r),
        });
    }
    ts.push(AdapterTensor { name: "base_model.model.head.weight".into(), shape: vec![2, 6], data: rn(12) });
    let mut cfg = AdapterConfig::lora(r, alpha, vec!["query".into(), "value".into()]);
    cfg.raw.insert("rime_labels".into(), serde_json::json!(["neg", "pos"]));
    PeftAdapter::new(cfg, ts)
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("adapter{i}")).collect()
}

fn get<'a>(a: &'a PeftAdapter, name: &str) -> &'a [f32] {
    &a.get(name).unwrap_or_else(|| panic!("{name} missing")).data
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * scale, "{what}[{i}]: got {g}, want {w}");
    }
}

/// peft merge_utils.prune(method="magnitude"): keep the int(density * n) largest |x| (no ties in random data).
fn cpu_prune(x: &[f32], density: f64) -> Vec<f32> {
    let k = (density * x.len() as f64) as usize;
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].abs().total_cmp(&x[a].abs()));
    let mut out = vec![0.0; x.len()];
    for &i in &idx[..k] {
        out[i] = x[i];
    }
    out
}

/// peft ties / dare_ties tail: sign election on `elect` rows, disjoint merge of weighted rows.
fn cpu_disjoint(xs: &[Vec<f32>], w: &[f32], total: bool, elect_weighted: bool) -> Vec<f32> {
    let l = xs[0].len();
    (0..l)
        .map(|j| {
            let e: Vec<f32> = xs.iter().zip(w).map(|(x, &wi)| if elect_weighted { wi * x[j] } else { x[j] }).collect();
            let s: f32 =
                if total { e.iter().sum() } else { e.iter().map(|v| v.signum() * (*v != 0.0) as i32 as f32).sum() };
            let maj = if s >= 0.0 { 1.0 } else { -1.0 };
            let (mut num, mut cnt) = (0.0f32, 0.0f32);
            for (i, ev) in e.iter().enumerate() {
                if *ev != 0.0 && ev.signum() == maj {
                    num += w[i] * xs[i][j];
                    cnt += 1.0;
                }
            }
            num / cnt.max(1.0)
        })
        .collect()
}

fn cpu_stack(xs: &[Vec<f32>], w: &[f32], comb: Combination, d: f64, total: bool, masks: &[Vec<f32>]) -> Vec<f32> {
    let l = xs[0].len();
    let wsum =
        |ys: &[Vec<f32>]| -> Vec<f32> { (0..l).map(|j| ys.iter().zip(w).map(|(y, wi)| wi * y[j]).sum()).collect() };
    let dare = || -> Vec<Vec<f32>> {
        xs.iter().zip(masks).map(|(x, m)| x.iter().zip(m).map(|(a, k)| a * k / d as f32).collect()).collect()
    };
    match comb {
        Combination::Linear => wsum(xs),
        Combination::MagnitudePrune => wsum(&xs.iter().map(|x| cpu_prune(x, d)).collect::<Vec<_>>()),
        Combination::Ties => cpu_disjoint(&xs.iter().map(|x| cpu_prune(x, d)).collect::<Vec<_>>(), w, total, false),
        Combination::DareLinear => wsum(&dare()),
        Combination::DareTies => cpu_disjoint(&dare(), w, total, true),
        _ => unreachable!(),
    }
}

/// Product B A [fout, fin] of a combined module, scaled by the adapter's own scale.
fn delta(a: &PeftAdapter, module: &str, fin: usize, fout: usize) -> Vec<f32> {
    let r = a.config.r;
    let av = get(a, &format!("base_model.model.{module}.lora_A.weight"));
    let bv = get(a, &format!("base_model.model.{module}.lora_B.weight"));
    let s = a.config.scale() as f32;
    let mut d = vec![0f32; fout * fin];
    for o in 0..fout {
        for i in 0..fin {
            d[o * fin + i] = s * (0..r).map(|q| bv[o * r + q] * av[q * fin + i]).sum::<f32>();
        }
    }
    d
}

#[test]
fn combine_factor_types_match_peft_formulas() {
    let d = dev();
    // Different alphas: the scale enters each adapter's weight; one negative weight (peft puts its sign on A).
    let ads = vec![adapter(1, 4, 8.0), adapter(2, 4, 4.0), adapter(3, 4, 16.0)];
    let weights = [0.5, -0.3, 0.2];
    for comb in [
        Combination::Linear,
        Combination::Ties,
        Combination::DareLinear,
        Combination::DareTies,
        Combination::MagnitudePrune,
    ] {
        for total in [true, false] {
            let mut opts = CombineOptions::new(comb);
            opts.density = Some(0.5);
            opts.majority_sign_total = total;
            opts.seed = 7;
            let got = combine_adapters(d, &ads, &names(3), &weights, &opts).unwrap();
            assert_eq!(got.config.r, 4);
            assert_eq!(got.config.lora_alpha, 4.0, "peft sets lora_alpha = new rank");
            for (m, _, _) in MODULES {
                for (which, sign_on) in [("lora_A", true), ("lora_B", false)] {
                    let name = format!("base_model.model.{m}.{which}.weight");
                    let xs: Vec<Vec<f32>> = ads.iter().map(|a| get(a, &name).to_vec()).collect();
                    let w: Vec<f32> = ads
                        .iter()
                        .zip(weights)
                        .map(|(a, wi)| {
                            let ws = wi * a.config.scale();
                            (ws.abs().sqrt() * if sign_on && ws < 0.0 { -1.0 } else { 1.0 }) as f32
                        })
                        .collect();
                    let masks: Vec<Vec<f32>> = (0..3).map(|i| dare_mask(7, &name, i, xs[0].len(), 0.5)).collect();
                    let want = cpu_stack(&xs, &w, comb, 0.5, total, &masks);
                    close(&format!("{comb:?} total={total} {name}"), get(&got, &name), &want, 1e-6);
                }
            }
            // The head is the weighted mean (0.5 x0 - 0.3 x1 + 0.2 x2) / 0.4.
            let h: Vec<f32> = (0..12)
                .map(|j| {
                    ads.iter()
                        .zip(weights)
                        .map(|(a, w)| w as f32 * get(a, "base_model.model.head.weight")[j])
                        .sum::<f32>()
                        / 0.4
                })
                .collect();
            close("head", get(&got, "base_model.model.head.weight"), &h, 1e-5);
        }
    }
}

#[test]
fn combine_linear_of_one_adapter_keeps_its_delta() {
    // peft: one adapter is combined linearly, sqrt(w s) on both factors: B'A' = w s B A with scale 1.
    let ads = vec![adapter(4, 3, 6.0)];
    let got = combine_adapters(dev(), &ads, &names(1), &[1.0], &CombineOptions::new(Combination::Ties)).unwrap();
    for (m, fin, fout) in MODULES {
        close(m, &delta(&got, m, fin, fout), &delta(&ads[0], m, fin, fout), 1e-5);
    }
}

#[test]
fn combine_cat_is_exact_sum_of_weighted_deltas() {
    let ads = vec![adapter(5, 2, 4.0), adapter(6, 3, 3.0)];
    let w = [0.7, -1.5];
    // Ranks differ: linear refuses, cat sums the ranks.
    let e = combine_adapters(dev(), &ads, &names(2), &w, &CombineOptions::new(Combination::Linear)).unwrap_err();
    assert!(e.to_string().contains("same rank"), "{e}");
    let got = combine_adapters(dev(), &ads, &names(2), &w, &CombineOptions::new(Combination::Cat)).unwrap();
    assert_eq!(got.config.r, 5);
    for (m, fin, fout) in MODULES {
        let want: Vec<f32> = (0..fin * fout)
            .map(|j| ads.iter().zip(w).map(|(a, wi)| wi as f32 * delta(a, m, fin, fout)[j]).sum())
            .collect();
        close(m, &delta(&got, m, fin, fout), &want, 1e-5);
    }
}

#[test]
fn combine_svd_matches_truncated_svd_of_peft_delta() {
    let ads = vec![adapter(7, 2, 4.0), adapter(8, 2, 2.0)];
    let w = [0.6, 0.4];
    // peft's ΔW = Σ (w_i s_i) (s_i B_i A_i).
    let peft_delta = |m: &str, fin: usize, fout: usize| -> Vec<f32> {
        (0..fin * fout)
            .map(|j| ads.iter().zip(w).map(|(a, wi)| (wi * a.config.scale()) as f32 * delta(a, m, fin, fout)[j]).sum())
            .collect()
    };
    // Rank 4 = rank of ΔW: exact.
    let mut opts = CombineOptions::new(Combination::Svd);
    opts.svd_rank = Some(4);
    let got = combine_adapters(dev(), &ads, &names(2), &w, &opts).unwrap();
    assert_eq!((got.config.r, got.config.lora_alpha), (4, 4.0));
    for (m, fin, fout) in MODULES {
        close(&format!("svd exact {m}"), &delta(&got, m, fin, fout), &peft_delta(m, fin, fout), 1e-5);
    }
    // Rank 1: the best rank-1 approximation, found here by power iteration on the dense ΔW.
    opts.svd_rank = Some(1);
    let got = combine_adapters(dev(), &ads, &names(2), &w, &opts).unwrap();
    for (m, fin, fout) in MODULES {
        let dw = peft_delta(m, fin, fout);
        let mut v = vec![1f64; fin];
        for _ in 0..500 {
            let u: Vec<f64> = (0..fout).map(|o| (0..fin).map(|i| dw[o * fin + i] as f64 * v[i]).sum()).collect();
            let nv: Vec<f64> = (0..fin).map(|i| (0..fout).map(|o| dw[o * fin + i] as f64 * u[o]).sum()).collect();
            let n = nv.iter().map(|x| x * x).sum::<f64>().sqrt();
            v = nv.iter().map(|x| x / n).collect();
        }
        let u: Vec<f64> = (0..fout).map(|o| (0..fin).map(|i| dw[o * fin + i] as f64 * v[i]).sum()).collect();
        let want: Vec<f32> = (0..fout * fin).map(|j| (u[j / fin] * v[j % fin]) as f32).collect();
        close(&format!("svd rank 1 {m}"), &delta(&got, m, fin, fout), &want, 1e-4);
        // A' rows are unit vectors (Vh), as torch's.
        let a = get(&got, &format!("base_model.model.{m}.lora_A.weight"));
        let n: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5, "Vh row norm {n}");
    }
}

/// peft 0.21.2 results in shared/golden/merge_reference.safetensors, through the stack merge the adapter
/// combination uses (the golden file's task vectors as three stacked factors), within 1e-6.
#[test]
fn combine_stack_matches_peft_golden() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/merge_reference.safetensors");
    let ck = rime_io::Checkpoint::open(path).unwrap_or_else(|e| panic!("golden file {path}: {e}"));
    let tv = ck.get_f32("task_vectors").unwrap();
    let w = ck.get_f32("weights").unwrap();
    let mask = ck.get_f32("dare_mask_keep0.6").unwrap();
    let l = tv.len() / 3;
    let xs: Vec<&[f32]> = tv.chunks(l).collect();
    let masks: Vec<Vec<f32>> = mask.chunks(l).map(|c| c.to_vec()).collect();
    let d = dev();
    for (golden, comb, density, total) in [
        ("task_arithmetic", Combination::Linear, 1.0, true),
        ("magnitude_prune_d0.3", Combination::MagnitudePrune, 0.3, true),
        ("ties_d0.4_total", Combination::Ties, 0.4, true),
        ("ties_d0.4_frequency", Combination::Ties, 0.4, false),
        ("dare_linear_d0.6", Combination::DareLinear, 0.6, true),
        ("dare_ties_d0.6_total", Combination::DareTies, 0.6, true),
    ] {
        let got = combine_stack(d, golden, &xs, &w, comb, density, total, Some(&masks)).unwrap();
        let want = ck.get_f32(golden).unwrap();
        for (i, (g, x)) in got.iter().zip(&want).enumerate() {
            assert!((g - x).abs() <= 1e-6, "{golden}[{i}]: {g} vs {x}");
        }
    }
}

#[test]
fn combine_lora_writes_a_peft_folder_and_refuses_bad_input() {
    let root = std::env::temp_dir().join(format!("rime-combine-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let dirs: Vec<PathBuf> = (0..3).map(|i| root.join(format!("a{i}"))).collect();
    for (i, p) in dirs.iter().enumerate() {
        adapter(10 + i as u64, 4, 8.0).save(p).unwrap();
    }
    let out = root.join("out");
    let mut opts = CombineOptions::new(Combination::Ties);
    opts.density = Some(0.4);
    let rep = combine_lora(dev(), &dirs, &[0.5, 0.3, 0.2], &opts, &out, false).unwrap();
    assert_eq!(rep.method, "lora_ties");
    let back = PeftAdapter::load(&out).unwrap();
    assert_eq!(back.config.r, 4);
    assert_eq!(back.config.raw.get("rime_labels"), Some(&serde_json::json!(["neg", "pos"])));
    assert!(out.join("merge_report.json").is_file());
    // Existing output without force.
    let e = combine_lora(dev(), &dirs, &[0.5, 0.3, 0.2], &opts, &out, false).unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");
    // Density missing / out of range, weight count.
    let out2 = root.join("out2");
    let e = combine_lora(dev(), &dirs, &[0.5, 0.3, 0.2], &CombineOptions::new(Combination::Ties), &out2, false)
        .unwrap_err();
    assert!(e.to_string().contains("density"), "{e}");
    opts.density = Some(1.5);
    let e = combine_lora(dev(), &dirs, &[0.5, 0.3, 0.2], &opts, &out2, false).unwrap_err();
    assert!(e.to_string().contains("outside (0, 1]"), "{e}");
    let e =
        combine_lora(dev(), &dirs, &[0.5, 0.5], &CombineOptions::new(Combination::Linear), &out2, false).unwrap_err();
    assert!(e.to_string().contains("2 weights for 3"), "{e}");
    assert!(!out2.exists(), "a failed combination leaves no output");
    // Factors whose shapes disagree are named.
    let mut bad = adapter(20, 4, 8.0);
    bad.tensors.retain(|t| !t.name.contains("value"));
    let m = "encoder.layer.0.attention.self.query";
    for t in bad.tensors.iter_mut().filter(|t| t.name.contains(m) && t.name.contains("lora_A")) {
        t.shape = vec![4, 3];
        t.data.truncate(12);
    }
    let e = combine_adapters(
        dev(),
        &[adapter(21, 4, 8.0), bad],
        &names(2),
        &[1.0, 1.0],
        &CombineOptions::new(Combination::Linear),
    )
    .unwrap_err();
    assert!(e.to_string().contains("query.lora_A"), "{e}");
    let _ = std::fs::remove_dir_all(&root);
    let _unused: BTreeMap<(), ()> = BTreeMap::new();
}
