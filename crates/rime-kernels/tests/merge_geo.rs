mod common;
use common::*;
use rime_kernels::ops::merge_geo::*;
use rime_kernels::{reference::merge_geo as r, DType, Device, Tensor};

fn up(d: &Device, x: &[f32], shape: &[usize]) -> Tensor {
    d.upload_f32(x, shape).unwrap()
}

/// Rows [c0, c1) of each of the k stacked inputs `all` [k, l], stacked [k, c1 - c0].
fn chunk(all: &[f32], k: usize, l: usize, c0: usize, c1: usize) -> Vec<f32> {
    (0..k).flat_map(|i| all[i * l + c0..i * l + c1].to_vec()).collect()
}

/// Gram entries per vector, summed over slots in f64: [vectors][pairs].
fn reduce(gram: &[f32], layout: GeoLayout, l: usize, m: usize) -> Vec<Vec<f64>> {
    let slots = layout.slots(l);
    let vecs = layout.vectors(l);
    let mut out = vec![vec![0f64; m]; vecs];
    for s in 0..slots {
        let v = if vecs == 1 { 0 } else { s };
        for p in 0..m {
            out[v][p] += gram[(s * m + p) * 2] as f64 + gram[(s * m + p) * 2 + 1] as f64;
        }
    }
    out
}

/// The dot products in f64, straight from the definition.
fn direct(all: &[f32], k: usize, l: usize, layout: GeoLayout, sub: bool) -> Vec<Vec<f64>> {
    let nv = k - sub as usize;
    let vecs = layout.vectors(l);
    let at = |a: usize, g: usize| -> f64 {
        if sub {
            all[(a + 1) * l + g] as f64 - all[g] as f64
        } else {
            all[a * l + g] as f64
        }
    };
    let mut out = vec![vec![0f64; gram_pairs(nv)]; vecs];
    for g in 0..l {
        let v = match layout {
            GeoLayout::Whole { .. } => 0,
            GeoLayout::Rows { width } => g / width,
            GeoLayout::Cols { width } => g % width,
        };
        let mut p = 0;
        for x in 0..nv {
            for y in x..nv {
                out[v][p] += at(x, g) * at(y, g);
                p += 1;
            }
        }
    }
    out
}

#[test]
fn merge_gram_matches_reference_and_definition() {
    let d = dev();
    for &(k, rows, width) in &[(2usize, 1usize, 1usize), (3, 4, 5), (4, 7, 33), (3, 64, 300), (2, 3, 60_000)] {
        let l = rows * width;
        let all = randn((k * 31 + l) as u64, k * l, 1.0);
        let one = GeoLayout::Whole { parts: if l <= MAX_LOOP { 1 } else { 4 } };
        let layouts = [one, GeoLayout::Whole { parts: 37 }, GeoLayout::Rows { width }, GeoLayout::Cols { width }];
        for layout in layouts {
            for sub in [false, true] {
                let nv = k - sub as usize;
                let m = gram_pairs(nv);
                let size = layout.slots(l) * m * 2;
                let gram = d.zeros(&[size], DType::F32).unwrap();
                let mut want = vec![0f32; size];
                // Two chunks at an aligned split (the second accumulates onto the first).
                let split = (rows / 2) * width;
                for (c0, c1) in [(0, split), (split, l)] {
                    if c1 == c0 {
                        continue;
                    }
                    let xs = chunk(&all, k, l, c0, c1);
                    let t = up(d, &xs, &[k, c1 - c0]);
                    d.run(&merge_gram_forward(d, &gram, &t, layout, c0, l, sub).unwrap()).unwrap();
                    r::merge_gram_forward(&mut want, &xs, k, layout, c0, sub);
                }
                let got = d.download_f32(&gram).unwrap();
                let what = format!("gram k={k} {rows}x{width} {layout:?} sub={sub}");
                let (g, w) = (reduce(&got, layout, l, m), reduce(&want, layout, l, m));
                let exact = direct(&all, k, l, layout, sub);
                for v in 0..g.len() {
                    for p in 0..m {
                        let scale = 1.0 + exact[v][p].abs();
                        assert!(
                            (g[v][p] - w[v][p]).abs() <= 1e-6 * scale,
                            "{what} v{v} p{p}: {} vs ref {}",
                            g[v][p],
                            w[v][p]
                        );
                        assert!(
                            (g[v][p] - exact[v][p]).abs() <= 1e-6 * scale,
                            "{what} v{v} p{p}: {} vs f64 {}",
                            g[v][p],
                            exact[v][p]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn merge_blend_matches_reference() {
    let d = dev();
    for &(k, rows, width) in &[(2usize, 1usize, 1usize), (3, 4, 5), (4, 7, 33), (3, 64, 300)] {
        let l = rows * width;
        let all = randn((k * 7 + l) as u64, k * l, 1.0);
        for layout in [GeoLayout::Whole { parts: 5 }, GeoLayout::Rows { width }, GeoLayout::Cols { width }] {
            let vecs = layout.vectors(l);
            let mut coef = randn(l as u64 + 3, vecs * (k + 1), 1.0);
            for v in 0..vecs {
                coef[v * (k + 1) + k] += 2.0; // divisors away from 0
            }
            let ct = up(d, &coef, &[vecs, k + 1]);
            for mode in [BlendMode::Linear, BlendMode::Delta, BlendMode::Stock] {
                let split = (rows / 2) * width;
                for (c0, c1) in [(0, split), (split, l)] {
                    if c1 == c0 {
                        continue;
                    }
                    let xs = chunk(&all, k, l, c0, c1);
                    let out = d.empty(&[c1 - c0], DType::F32).unwrap();
                    d.run(&merge_blend_forward(d, &out, &up(d, &xs, &[k, c1 - c0]), &ct, layout, c0, l, mode).unwrap())
                        .unwrap();
                    let mut want = vec![0f32; c1 - c0];
                    r::merge_blend_forward(&mut want, &xs, &coef, k, layout, c0, mode);
                    let what = format!("blend k={k} {rows}x{width} {layout:?} {mode:?} [{c0}, {c1})");
                    assert_close(&what, &d.download_f32(&out).unwrap(), &want, 1e-6, 1e-6);
                }
            }
        }
    }
    // Hand value, Stock: 0.5 * mean(2, 4) + 0.25 * 8 = 3.5.
    let xs = up(d, &[8.0, 2.0, 4.0], &[3, 1]);
    let out = d.empty(&[1], DType::F32).unwrap();
    let coef = up(d, &[0.5, 0.25, 0.0, 0.0], &[1, 4]);
    d.run(&merge_blend_forward(d, &out, &xs, &coef, GeoLayout::Whole { parts: 1 }, 0, 1, BlendMode::Stock).unwrap())
        .unwrap();
    assert_eq!(d.download_f32(&out).unwrap(), vec![3.5]);
}

#[test]
fn merge_geo_launchers_refuse_bad_shapes() {
    let d = dev();
    let xs = d.empty(&[3, 10], DType::F32).unwrap();
    let gram = d.zeros(&[6 * 2], DType::F32).unwrap();
    let w = GeoLayout::Whole { parts: 1 };
    assert!(merge_gram_forward(d, &gram, &xs, w, 0, 10, false).is_ok());
    // wrong gram size, chunk outside the tensor, misaligned row chunk, width not dividing the tensor
    assert!(merge_gram_forward(d, &gram, &xs, w, 0, 10, true).is_err());
    assert!(merge_gram_forward(d, &gram, &xs, w, 5, 10, false).is_err());
    let g2 = d.zeros(&[4 * 6 * 2], DType::F32).unwrap();
    assert!(merge_gram_forward(d, &g2, &xs, GeoLayout::Rows { width: 4 }, 0, 16, false).is_err());
    assert!(merge_gram_forward(d, &g2, &xs, GeoLayout::Cols { width: 4 }, 0, 10, false).is_err());
    // one invocation would sum more than MAX_LOOP elements
    let long = d.empty(&[1, MAX_LOOP + 1], DType::F32).unwrap();
    let g1 = d.zeros(&[2], DType::F32).unwrap();
    let g2 = d.zeros(&[4], DType::F32).unwrap();
    assert!(merge_gram_forward(d, &g1, &long, w, 0, MAX_LOOP + 1, false).is_err());
    assert!(merge_gram_forward(d, &g2, &long, GeoLayout::Whole { parts: 2 }, 0, MAX_LOOP + 1, false).is_ok());
    let out = d.empty(&[10], DType::F32).unwrap();
    let coef = d.empty(&[3], DType::F32).unwrap();
    assert!(merge_blend_forward(d, &out, &xs, &coef, w, 0, 10, BlendMode::Linear).is_err());
    let one = d.empty(&[1, 10], DType::F32).unwrap();
    let coef2 = d.empty(&[2], DType::F32).unwrap();
    assert!(merge_blend_forward(d, &out, &one, &coef2, w, 0, 10, BlendMode::Delta).is_err());
    assert!(merge_blend_forward(d, &out, &one, &coef2, w, 0, 10, BlendMode::Linear).is_ok());
}

#[test]
fn merge_fusion_matches_reference() {
    let d = dev();
    for &(rows, width) in &[(1usize, 1usize), (3, 5), (7, 33), (64, 300), (2, 20_000)] {
        let l = rows * width;
        let b = randn(l as u64, l, 2.0);
        let x: Vec<f32> = b.iter().zip(randn(l as u64 + 1, l, 0.5)).map(|(u, v)| u + v).collect();
        let all: Vec<f32> = b.iter().chain(&x).copied().collect();
        let kl = d.zeros(&[rows], DType::F32).unwrap();
        let imp = d.zeros(&[l], DType::F32).unwrap();
        let (mut kl_want, mut imp_want) = (vec![0f32; rows], vec![0f32; l]);
        let split = (rows / 2) * width;
        let chunks = [(0, split), (split, l)];
        for &(c0, c1) in chunks.iter().filter(|(a, b)| b > a) {
            let xs = chunk(&all, 2, l, c0, c1);
            let t = up(d, &xs, &[2, c1 - c0]);
            d.run(&merge_fusion_kl_forward(d, &kl, &t, width, c0, l).unwrap()).unwrap();
            d.run(&merge_fusion_importance_forward(d, &imp, &t, &kl, width, c0).unwrap()).unwrap();
            r::merge_fusion_kl_forward(&mut kl_want, &xs, width, c0);
            r::merge_fusion_importance_forward(&mut imp_want, &xs, &kl_want, width, c0);
        }
        let what = format!("fusion {rows}x{width}");
        assert_close(&format!("{what} kl"), &d.download_f32(&kl).unwrap(), &kl_want, 1e-6, 1e-4);
        let imp_got = d.download_f32(&imp).unwrap();
        assert_close(&format!("{what} importance"), &imp_got, &imp_want, 1e-6, 1e-4);
        // The threshold at the median keeps about half; the reference is fed the kernel's importance.
        let mut s = imp_got.clone();
        s.sort_by(f32::total_cmp);
        let thr = s[s.len() / 2];
        for &(c0, c1) in chunks.iter().filter(|(a, b)| b > a) {
            let xs = chunk(&all, 2, l, c0, c1);
            let out = d.empty(&[c1 - c0], DType::F32).unwrap();
            d.run(&merge_fusion_forward(d, &out, &up(d, &xs, &[2, c1 - c0]), &imp, thr, c0).unwrap()).unwrap();
            let mut want = vec![0f32; c1 - c0];
            r::merge_fusion_forward(&mut want, &xs, &imp_got, thr, c0);
            assert_eq!(d.download_f32(&out).unwrap(), want, "{what} fusion [{c0}, {c1})");
        }
    }
    // Hand value: equal rows have KL 0 (within rounding), so no importance; a row of two where the model moves
    // one logit by ln 3: p = (3/4, 1/4), q = (1/2, 1/2), KL = 3/4 ln(3/2) + 1/4 ln(1/2).
    let xs = up(d, &[0.0, 0.0, 3f32.ln(), 0.0], &[2, 2]);
    let kl = d.zeros(&[1], DType::F32).unwrap();
    d.run(&merge_fusion_kl_forward(d, &kl, &xs, 2, 0, 2).unwrap()).unwrap();
    let want = 0.75 * 1.5f32.ln() + 0.25 * 0.5f32.ln();
    assert_close("fusion kl hand", &d.download_f32(&kl).unwrap(), &[want], 1e-6, 1e-5);
    // Rows too long for one invocation's three loops.
    let long = d.empty(&[2, MAX_LOOP], DType::F32).unwrap();
    let kl1 = d.zeros(&[1], DType::F32).unwrap();
    assert!(merge_fusion_kl_forward(d, &kl1, &long, MAX_LOOP, 0, MAX_LOOP).is_err());
}
