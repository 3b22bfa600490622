//! merge_sparse.wgsl against its plain-Rust reference, in the three compute precisions. Elementwise results
//! must match bit for bit (the kernels round exactly where the reference does).

mod common;
use common::*;
use rime_kernels::ops::merge::merge_topk_threshold_forward;
use rime_kernels::ops::merge_sparse::*;
use rime_kernels::{reference::merge_sparse as r, DType, Device, Tensor};

const PRECS: [Precision; 3] = [Precision::F32, Precision::F16, Precision::BF16];

fn up(d: &Device, x: &[f32]) -> Tensor {
    d.upload_f32(x, &[x.len()]).unwrap()
}

/// Small task-vector-like values (a float16 merge sees many subnormals and ties) with some exact zeros.
fn vals(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut x = randn(seed, n, scale);
    for v in x.iter_mut().step_by(11) {
        *v = 0.0;
    }
    x
}

fn bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits() || (*g == 0.0 && *w == 0.0), "{what}[{i}]: got {g:e}, want {w:e}");
    }
}

#[test]
fn rounding_matches_half_in_the_kernels() {
    // Through merge_delta_round_forward with base 0: every f32 class (normal, f16-subnormal, overflow, ties).
    let d = dev();
    let mut x: Vec<f32> = vals(1, 3000, 1.0);
    x.extend(vals(2, 3000, 1e-5));
    x.extend(vals(3, 1000, 1e5));
    x.extend([65504.0, 65519.0, 65520.0, -65520.0, 5.96e-8, 2.98e-8, 2.99e-8, 1.0 + 1.0 / 2048.0, 1e-40, -0.0]);
    x.extend((0..2000).map(|i| f32::from_bits(0x3f80_0000 + i * 0x1000)));
    let zero = vec![0.0; x.len()];
    for p in PRECS {
        let out = d.empty(&[x.len() + 3], DType::F32).unwrap();
        d.run(&merge_delta_round_forward(d, &out, 3, &up(d, &x), &up(d, &zero), p).unwrap()).unwrap();
        let got = d.download_f32(&out).unwrap();
        let want: Vec<f32> = x.iter().map(|&v| p.round(v)).collect();
        bits_eq(&format!("round {p:?}"), &got[3..], &want);
    }
}

#[test]
fn gta_and_linear_match_reference() {
    let d = dev();
    for &(n, l) in &[(1usize, 5usize), (3, 1000), (4, 77)] {
        let xs = vals(n as u64 + l as u64, (n + 1) * l, 0.05);
        let w: Vec<f32> = (0..n).map(|i| 0.3 + 0.4 * i as f32 - if i == 1 { 1.0 } else { 0.0 }).collect();
        for p in PRECS {
            let xs: Vec<f32> = xs.iter().map(|&v| p.round(v)).collect();
            let g = up(d, &xs);
            for (consensus, normalize, raw, lambda) in [
                (false, false, true, 1.0),
                (true, true, false, 1.0),
                (true, false, true, 0.7),
                (false, true, false, 1.3),
            ] {
                let cfg = Gta { consensus, normalize, raw, lambda, prec: p };
                let out = d.empty(&[l], DType::F32).unwrap();
                d.run(&merge_gta_forward(d, &out, &g, &w, cfg).unwrap()).unwrap();
                let mut want = vec![0.0; l];
                r::merge_gta_forward(&mut want, &xs, &w, cfg);
                bits_eq(&format!("gta {cfg:?} n={n} l={l}"), &d.download_f32(&out).unwrap(), &want);
            }
            for normalize in [false, true] {
                let xl = d.upload_f32(&xs[..n * l], &[n, l]).unwrap();
                let out = d.empty(&[l], DType::F32).unwrap();
                d.run(&merge_linear_forward(d, &out, &xl, &w, normalize, p).unwrap()).unwrap();
                let mut want = vec![0.0; l];
                r::merge_linear_forward(&mut want, &xs[..n * l], &w, normalize, p);
                // WGSL's fma need not be fused: the f32 sum may be an ulp off before the final rounding.
                let got = d.download_f32(&out).unwrap();
                let wsum: f32 = w.iter().sum();
                for (i, (g, want_i)) in got.iter().zip(&want).enumerate() {
                    // One unit in the last place of the compute dtype (a value next to a rounding boundary).
                    let rel = match p {
                        Precision::F32 => 0.0,
                        Precision::F16 => 1.0 / 1024.0,
                        Precision::BF16 => 1.0 / 128.0,
                    };
                    let ulp = want_i.abs() * rel;
                    let mag: f32 = (0..n).map(|k| (xs[k * l + i] * w[k]).abs()).sum::<f32>()
                        / if normalize { wsum.abs() } else { 1.0 };
                    let tol = (mag * 4e-7).max(ulp).max(1e-30);
                    assert!((g - want_i).abs() <= tol, "linear {p:?} n={n} [{i}]: got {g:e}, want {want_i:e}");
                }
            }
        }
    }
}

#[test]
fn sums_and_rescale_match_reference() {
    let d = dev();
    for &l in &[1usize, 63, 5000, 300_000] {
        let x = vals(l as u64, l, 0.02);
        let mask: Vec<f32> = (0..l).map(|i| ((i * 7919) % 3 != 0) as u8 as f32).collect();
        for p in PRECS {
            let x: Vec<f32> = x.iter().map(|&v| p.round(v)).collect();
            let acc = d.empty(&[3], DType::F32).unwrap();
            let gx = up(d, &x);
            let masked: Vec<f32> = x.iter().zip(&mask).map(|(a, b)| a * b).collect();
            d.run(&merge_sparse_sum_forward(d, &acc, 0, &gx, SumOf::Abs).unwrap()).unwrap();
            d.run(&merge_sparse_sum_forward(d, &acc, 1, &up(d, &masked), SumOf::Abs).unwrap()).unwrap();
            d.run(&merge_sparse_sum_forward(d, &acc, 2, &gx, SumOf::Square(p)).unwrap()).unwrap();
            let a = d.download_f32(&acc).unwrap();
            let want = [
                r::merge_sparse_sum_forward(&x, SumOf::Abs),
                r::merge_sparse_sum_forward(&masked, SumOf::Abs),
                r::merge_sparse_sum_forward(&x, SumOf::Square(p)),
            ];
            for (g, w) in a.iter().zip(want) {
                assert!((*g as f64 - w).abs() <= 1e-5 * w.abs() + 1e-30, "sum {p:?} l={l}: {g} vs {w}");
            }
            let nz = d.empty(&[1], DType::F32).unwrap();
            d.run(&merge_sparse_sum_forward(d, &nz, 0, &gx, SumOf::NonZero).unwrap()).unwrap();
            assert_eq!(d.download_f32(&nz).unwrap()[0] as f64, r::merge_sparse_sum_forward(&x, SumOf::NonZero));
            for (work, rescale, use_mask) in [(Precision::F32, true, true), (p, true, false), (p, false, true)] {
                let gx = up(d, &x);
                let gm = up(d, &mask);
                d.run(&merge_sparse_rescale_forward(d, &gx, use_mask.then_some(&gm), &acc, rescale, work, p).unwrap())
                    .unwrap();
                let mut want = x.clone();
                r::merge_sparse_rescale_forward(
                    &mut want,
                    use_mask.then_some(&mask[..]),
                    [a[0], a[1]],
                    rescale,
                    work,
                    p,
                );
                bits_eq(&format!("rescale {p:?} {work:?} l={l}"), &d.download_f32(&gx).unwrap(), &want);
            }
        }
    }
}

#[test]
fn band_mask_matches_reference_with_ties() {
    let d = dev();
    let pool = [1.0f32, -1.0, 0.5, -0.5, 2.0, 0.0, -0.0, 0.25, 3.0];
    for &l in &[2usize, 9, 203, 4099, 70_000] {
        let x: Vec<f32> =
            (0..l).map(|i| pool[(i * 31 + i / 5) % pool.len()] * if i % 13 == 0 { 1.5 } else { 1.0 }).collect();
        let keys: Vec<f32> = vals(l as u64, l, 1.0).iter().map(|v| v * v).collect();
        for asc in [false, true] {
            for &(k1, k2) in &[(l, 0usize), (0, 0), (l / 2, 0), (l - 1, l / 3), (l, l / 4), (l / 3 + 1, 1)] {
                for use_keys in [false, true] {
                    let gx = up(d, &x);
                    let src = if use_keys { up(d, &keys) } else { up(d, &x) };
                    let (s1, s2) = (d.empty(&[2], DType::U32).unwrap(), d.empty(&[2], DType::U32).unwrap());
                    let xs = Tensor { shape: vec![1, l], ..src.clone() };
                    d.run(&merge_topk_threshold_forward(d, &s1, &xs, k1, asc).unwrap()).unwrap();
                    d.run(&merge_topk_threshold_forward(d, &s2, &xs, k2, asc).unwrap()).unwrap();
                    let keys_t = use_keys.then_some(&src);
                    d.run(&merge_band_mask_forward(d, &gx, keys_t, &s1, k1, &s2, k2, asc).unwrap()).unwrap();
                    let mut want = x.clone();
                    r::merge_band_mask_forward(&mut want, use_keys.then_some(&keys[..]), k1, k2, asc);
                    bits_eq(
                        &format!("band l={l} k1={k1} k2={k2} asc={asc} keys={use_keys}"),
                        &d.download_f32(&gx).unwrap(),
                        &want,
                    );
                }
            }
        }
    }
}

#[test]
fn della_mask_matches_reference() {
    let d = dev();
    for &(rows, cols) in &[(1usize, 2usize), (1, 1000), (7, 33), (64, 384), (3, 5000)] {
        let l = rows * cols;
        let mut x = vals(cols as u64, l, 1.0);
        x[1] = x[0]; // a tie
        let u: Vec<f32> = randn(99, l, 1.0).iter().map(|v| v.abs().fract()).collect();
        let gx = up(d, &x);
        d.run(&merge_della_mask_forward(d, &gx, &up(d, &u), rows, 0.35, 0.15).unwrap()).unwrap();
        let mut want = x.clone();
        r::merge_della_mask_forward(&mut want, &u, rows, 0.35, 0.15);
        bits_eq(&format!("della {rows}x{cols}"), &d.download_f32(&gx).unwrap(), &want);
    }
    let gx = up(d, &[1.0, 2.0]);
    assert!(merge_della_mask_forward(d, &gx, &up(d, &[0.5, 0.5]), 2, 0.3, 0.1).is_err(), "rows of one element");
}

#[test]
fn sce_kernels_match_reference() {
    let d = dev();
    for &(n, l) in &[(1usize, 7usize), (3, 1000), (4, 129)] {
        let xs = vals(l as u64 + 5, (n + 1) * l, 0.03);
        let w: Vec<f32> = (0..n).map(|i| 0.2 + 0.1 * i as f32).collect();
        for p in PRECS {
            let xs: Vec<f32> = xs.iter().map(|&v| p.round(v)).collect();
            let out = d.empty(&[l], DType::F32).unwrap();
            d.run(&merge_sce_var_forward(d, &out, &d.upload_f32(&xs[..n * l], &[n, l]).unwrap(), p).unwrap()).unwrap();
            let mut want = vec![0.0; l];
            r::merge_sce_var_forward(&mut want, &xs[..n * l], p);
            bits_eq(&format!("sce var {p:?}"), &d.download_f32(&out).unwrap(), &want);
            d.run(&merge_sce_forward(d, &out, &up(d, &xs), &w, p).unwrap()).unwrap();
            r::merge_sce_forward(&mut want, &xs, &w, p);
            bits_eq(&format!("sce {p:?} n={n}"), &d.download_f32(&out).unwrap(), &want);
        }
    }
}
