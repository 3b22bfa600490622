//! DoRA's scale kernel against the CPU reference on odd shapes (one workgroup per row, C below, at and
//! above the workgroup width), and its magnitude gradient against the reference and finite differences.

mod common;
use common::*;
use rime_kernels::ops::dora::*;
use rime_kernels::{reference::dora as r, DType, Tensor};

fn up(x: &[f32], shape: &[usize]) -> Tensor {
    dev().upload_f32(x, shape).unwrap()
}
fn get(t: &Tensor) -> Vec<f32> {
    dev().download_f32(t).unwrap()
}

/// (OC, C, R)
const SHAPES: &[(usize, usize, usize)] = &[(1, 1, 1), (3, 5, 2), (7, 64, 1), (5, 131, 4), (65, 9, 3)];

#[test]
fn dora_scale_matches_reference() {
    let d = dev();
    for &(oc, c, rk) in SHAPES {
        let (w, a, b) = (randn(1, oc * c, 1.0), randn(2, rk * c, 0.5), randn(3, oc * rk, 0.5));
        let m: Vec<f32> = randn(4, oc, 1.0).into_iter().map(|x| x + 2.0).collect();
        let scale = 1.7;
        let (g, norm) = (d.empty(&[oc], DType::F32).unwrap(), d.empty(&[oc], DType::F32).unwrap());
        let ds = dora_scale_forward(
            d,
            &g,
            &norm,
            &up(&w, &[oc, c]),
            &up(&a, &[rk, c]),
            &up(&b, &[oc, rk]),
            &up(&m, &[oc]),
            scale,
        )
        .unwrap();
        d.run(&ds).unwrap();
        let (wg, wn) = r::dora_scale_forward(&w, &a, &b, &m, scale, c);
        let what = format!("dora_scale_forward {oc}x{c} r={rk}");
        assert_close(&format!("{what} norm"), &get(&norm), &wn, 1e-5, 1e-5);
        assert_close(&format!("{what} g"), &get(&g), &wg, 1e-5, 1e-5);
        // With B = 0 the norm is W's own row norm (DoRA's initial magnitude).
        let zero = vec![0f32; oc * rk];
        let ds = dora_scale_forward(
            d,
            &g,
            &norm,
            &up(&w, &[oc, c]),
            &up(&a, &[rk, c]),
            &up(&zero, &[oc, rk]),
            &up(&m, &[oc]),
            scale,
        )
        .unwrap();
        d.run(&ds).unwrap();
        let rows: Vec<f32> = (0..oc).map(|o| w[o * c..(o + 1) * c].iter().map(|x| x * x).sum::<f32>().sqrt()).collect();
        assert_close(&format!("{what} norm of W"), &get(&norm), &rows, 1e-5, 1e-5);
    }
}

#[test]
fn dora_scale_backward_matches_reference_and_finite_differences() {
    let d = dev();
    for &(oc, c, rk) in SHAPES {
        let (w, a, b) = (randn(5, oc * c, 1.0), randn(6, rk * c, 0.5), randn(7, oc * rk, 0.5));
        let m: Vec<f32> = randn(8, oc, 1.0).into_iter().map(|x| x + 2.0).collect();
        let dg = randn(9, oc, 1.0);
        let (_, norm) = r::dora_scale_forward(&w, &a, &b, &m, 0.9, c);
        let dm = up(&randn(10, oc, 1.0), &[oc]);
        d.run(&dora_scale_backward(d, &dm, &up(&dg, &[oc]), &up(&norm, &[oc]), false).unwrap()).unwrap();
        let want = r::dora_scale_backward(&dg, &norm);
        assert_close(&format!("dora_scale_backward {oc}"), &get(&dm), &want, 1e-6, 1e-6);
        // d/dm Σ dg·g(m) = dg / norm, by central differences of the reference forward.
        let fd = finite_diff(&m, 1e-2, |mm| {
            let (g, _) = r::dora_scale_forward(&w, &a, &b, mm, 0.9, c);
            g.iter().zip(&dg).map(|(x, y)| *x as f64 * *y as f64).sum()
        });
        assert_close(&format!("dora_scale_backward {oc} vs finite differences"), &want, &fd, 1e-3, 1e-3);
        // Accumulating adds onto what was there.
        d.run(&dora_scale_backward(d, &dm, &up(&dg, &[oc]), &up(&norm, &[oc]), true).unwrap()).unwrap();
        let twice: Vec<f32> = want.iter().map(|x| 2.0 * x).collect();
        assert_close(&format!("dora_scale_backward {oc} accumulate"), &get(&dm), &twice, 1e-6, 1e-6);
    }
}

#[test]
fn dora_scale_rejects_mismatched_shapes() {
    let d = dev();
    let t = |s: &[usize]| d.zeros(s, DType::F32).unwrap();
    let e = dora_scale_forward(d, &t(&[3]), &t(&[3]), &t(&[3, 4]), &t(&[2, 5]), &t(&[3, 2]), &t(&[3]), 1.0)
        .err()
        .expect("a [2, 5] A for a [3, 4] W must be refused")
        .to_string();
    assert!(e.contains("dora_scale_forward") && e.contains("[2, 5]"), "{e}");
}
