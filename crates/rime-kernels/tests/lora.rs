mod common;
use common::*;
use half::{bf16, f16};
use rime_kernels::ops::lora::*;
use rime_kernels::reference::lora::{self as r, LoraDims};
use rime_kernels::{DType, Device, Tensor};

/// f32 sums of up to K products of values in [-1, 1): rounding grows about linearly with K.
fn tol(k: usize) -> (f32, f32) {
    (1e-5 + 3e-6 * k as f32, 1e-4)
}

fn upload_as(d: &Device, x: &[f32], shape: &[usize], dt: DType) -> (Tensor, Vec<f32>) {
    match dt {
        DType::F16 => {
            let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            (d.upload_f16(&h, shape).unwrap(), h.iter().map(|v| v.to_f32()).collect())
        }
        DType::BF16 => {
            let h: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            (d.upload_bf16(&h, shape).unwrap(), h.iter().map(|v| v.to_f32()).collect())
        }
        _ => (d.upload_f32(x, shape).unwrap(), x.to_vec()),
    }
}

fn with_last(lead: &[usize], last: usize) -> Vec<usize> {
    let mut s = lead.to_vec();
    s.push(last);
    s
}

/// (leading dims of x, C, OC, R): odd sizes and 4-aligned ones (which take the tiled matmul on lavapipe).
const SHAPES: &[(&[usize], usize, usize, usize)] =
    &[(&[1], 1, 1, 1), (&[3], 17, 5, 2), (&[2, 3], 33, 127, 3), (&[17], 64, 36, 8), (&[2, 20], 48, 132, 4)];

fn dims_of(lead: &[usize], c: usize, oc: usize, r: usize) -> LoraDims {
    LoraDims { rows: lead.iter().product(), c, oc, r }
}

#[test]
fn lora_forward_matches_reference() {
    let d = dev();
    for (i, &(lead, c, oc, rk)) in SHAPES.iter().enumerate() {
        let dm = dims_of(lead, c, oc, rk);
        for (j, dt) in [DType::F32, DType::F16, DType::BF16].into_iter().enumerate() {
            let seed = (i * 10 + j) as u64;
            let with_bias = (i + j) % 2 == 0;
            let x = randn(seed, dm.rows * c, 1.0);
            let w = randn(seed + 1, oc * c, 1.0);
            let a = randn(seed + 2, rk * c, 1.0);
            let b = randn(seed + 3, oc * rk, 1.0);
            let bias = randn(seed + 4, oc, 1.0);
            let (tw, w_seen) = upload_as(d, &w, &[oc, c], dt);
            let tbias = d.upload_f32(&bias, &[oc]).unwrap();
            let out = d.empty(&with_last(lead, oc), DType::F32).unwrap();
            let h = d.empty(&with_last(lead, rk), DType::F32).unwrap();
            let ds = lora_forward(
                d,
                &out,
                &h,
                &d.upload_f32(&x, &with_last(lead, c)).unwrap(),
                &tw,
                with_bias.then_some(&tbias),
                &d.upload_f32(&a, &[rk, c]).unwrap(),
                &d.upload_f32(&b, &[oc, rk]).unwrap(),
                0.75,
            )
            .unwrap();
            d.run(&ds).unwrap();
            let (want, want_h) = r::lora_forward(&x, &w_seen, with_bias.then_some(&bias[..]), &a, &b, 0.75, &dm);
            let (at, rt) = tol(c + rk);
            let what = format!("{dt:?} bias={with_bias} {lead:?} {dm:?}");
            assert_close(&format!("lora out {what}"), &d.download_f32(&out).unwrap(), &want, at, rt);
            assert_close(&format!("lora h {what}"), &d.download_f32(&h).unwrap(), &want_h, at, rt);
        }
    }
}

#[test]
fn lora_backward_matches_reference() {
    let d = dev();
    for (i, &(lead, c, oc, rk)) in SHAPES.iter().enumerate() {
        let dm = dims_of(lead, c, oc, rk);
        let dt = [DType::F32, DType::F16, DType::BF16][i % 3];
        let seed = 100 + i as u64 * 10;
        let dout = randn(seed, dm.rows * oc, 1.0);
        let x = randn(seed + 1, dm.rows * c, 1.0);
        let h = randn(seed + 2, dm.rows * rk, 1.0);
        let w = randn(seed + 3, oc * c, 1.0);
        let a = randn(seed + 4, rk * c, 1.0);
        let b = randn(seed + 5, oc * rk, 1.0);
        let (prev_a, prev_b) = (randn(seed + 6, rk * c, 1.0), randn(seed + 7, oc * rk, 1.0));
        let (tw, w_seen) = upload_as(d, &w, &[oc, c], dt);
        let tdout = d.upload_f32(&dout, &with_last(lead, oc)).unwrap();
        let tx = d.upload_f32(&x, &with_last(lead, c)).unwrap();
        let th = d.upload_f32(&h, &with_last(lead, rk)).unwrap();
        let ta = d.upload_f32(&a, &[rk, c]).unwrap();
        let tb = d.upload_f32(&b, &[oc, rk]).unwrap();
        let dh = d.empty(&with_last(lead, rk), DType::F32).unwrap();
        let what = format!("{dt:?} {lead:?} {dm:?}");

        let dx = d.empty(&with_last(lead, c), DType::F32).unwrap();
        d.run(&lora_backward_input(d, &dx, &dh, &tdout, &tw, &ta, &tb, 0.5).unwrap()).unwrap();
        let (at, rt) = tol(oc);
        let want_dx = r::lora_backward_input(&dout, &w_seen, &a, &b, 0.5, &dm);
        assert_close(&format!("lora dx {what}"), &d.download_f32(&dx).unwrap(), &want_dx, at, rt);

        let (want_da, want_db) = r::lora_backward_weight(&dout, &x, &h, &b, 0.5, &dm);
        let (at, rt) = tol(dm.rows * oc);
        for accumulate in [false, true] {
            let da = d.upload_f32(&prev_a, &[rk, c]).unwrap();
            let db = d.upload_f32(&prev_b, &[oc, rk]).unwrap();
            d.run(&lora_backward_weight(d, &da, &db, &dh, &tdout, &tx, &th, &tb, 0.5, accumulate).unwrap()).unwrap();
            let add = |w: &[f32], p: &[f32]| -> Vec<f32> {
                if accumulate {
                    w.iter().zip(p).map(|(w, p)| w + p).collect()
                } else {
                    w.to_vec()
                }
            };
            assert_close(
                &format!("lora da acc={accumulate} {what}"),
                &d.download_f32(&da).unwrap(),
                &add(&want_da, &prev_a),
                at,
                rt,
            );
            assert_close(
                &format!("lora db acc={accumulate} {what}"),
                &d.download_f32(&db).unwrap(),
                &add(&want_db, &prev_b),
                at,
                rt,
            );
        }
    }
}

// loss = sum(out ⊙ g) with out = x·Wᵀ + s·(x·Aᵀ)·Bᵀ: dloss/dx = g·W + s·(g·B)·A, dloss/dB = s·gᵀ·(x·Aᵀ),
// dloss/dA = s·(g·B)ᵀ·x. Finite differences of the f64-accumulated reference forward.
#[test]
fn lora_backward_matches_finite_differences() {
    let d = dev();
    let dm = LoraDims { rows: 4, c: 5, oc: 6, r: 3 };
    let s = 0.8f32;
    let x = randn(1, dm.rows * dm.c, 1.0);
    let w = randn(2, dm.oc * dm.c, 1.0);
    let a = randn(3, dm.r * dm.c, 1.0);
    let b = randn(4, dm.oc * dm.r, 1.0);
    let g = randn(5, dm.rows * dm.oc, 1.0);
    let loss = |x: &[f32], a: &[f32], b: &[f32]| -> f64 {
        let (out, _) = r::lora_forward(x, &w, None, a, b, s, &dm);
        out.iter().zip(&g).map(|(o, g)| *o as f64 * *g as f64).sum()
    };
    let fd_x = finite_diff(&x, 1e-2, |v| loss(v, &a, &b));
    let fd_a = finite_diff(&a, 1e-2, |v| loss(&x, v, &b));
    let fd_b = finite_diff(&b, 1e-2, |v| loss(&x, &a, v));
    let (_, h) = r::lora_forward(&x, &w, None, &a, &b, s, &dm);
    assert_close("reference dx vs fd", &r::lora_backward_input(&g, &w, &a, &b, s, &dm), &fd_x, 2e-3, 2e-3);
    let (ref_da, ref_db) = r::lora_backward_weight(&g, &x, &h, &b, s, &dm);
    assert_close("reference da vs fd", &ref_da, &fd_a, 2e-3, 2e-3);
    assert_close("reference db vs fd", &ref_db, &fd_b, 2e-3, 2e-3);

    let t = |v: &[f32], s: &[usize]| d.upload_f32(v, s).unwrap();
    let (tx, tw, ta, tb, tg) = (t(&x, &[4, 5]), t(&w, &[6, 5]), t(&a, &[3, 5]), t(&b, &[6, 3]), t(&g, &[4, 6]));
    let out = d.empty(&[4, 6], DType::F32).unwrap();
    let th = d.empty(&[4, 3], DType::F32).unwrap();
    let dh = d.empty(&[4, 3], DType::F32).unwrap();
    let dx = d.empty(&[4, 5], DType::F32).unwrap();
    let da = d.empty(&[3, 5], DType::F32).unwrap();
    let db = d.empty(&[6, 3], DType::F32).unwrap();
    let mut ds = lora_forward(d, &out, &th, &tx, &tw, None, &ta, &tb, s).unwrap();
    ds.extend(lora_backward_input(d, &dx, &dh, &tg, &tw, &ta, &tb, s).unwrap());
    ds.extend(lora_backward_weight(d, &da, &db, &dh, &tg, &tx, &th, &tb, s, false).unwrap());
    d.run(&ds).unwrap();
    assert_close("gpu dx vs fd", &d.download_f32(&dx).unwrap(), &fd_x, 2e-3, 2e-3);
    assert_close("gpu da vs fd", &d.download_f32(&da).unwrap(), &fd_a, 2e-3, 2e-3);
    assert_close("gpu db vs fd", &d.download_f32(&db).unwrap(), &fd_b, 2e-3, 2e-3);
}

#[test]
fn lora_rejects_bad_shapes() {
    let d = dev();
    let f = |s: &[usize]| d.empty(s, DType::F32).unwrap();
    let err = |r: rime_kernels::Result<Vec<rime_kernels::Dispatch>>| r.err().expect("an error").to_string();
    // a's C differs from x's
    let e =
        err(lora_forward(d, &f(&[2, 6]), &f(&[2, 3]), &f(&[2, 5]), &f(&[6, 5]), None, &f(&[3, 4]), &f(&[6, 3]), 1.0));
    assert!(e.contains("lora_forward") && e.contains("disagree"), "{e}");
    // w shape
    let e =
        err(lora_forward(d, &f(&[2, 6]), &f(&[2, 3]), &f(&[2, 5]), &f(&[5, 6]), None, &f(&[3, 5]), &f(&[6, 3]), 1.0));
    assert!(e.contains("w is [5, 6]"), "{e}");
    // h shape
    let e =
        err(lora_forward(d, &f(&[2, 6]), &f(&[2, 4]), &f(&[2, 5]), &f(&[6, 5]), None, &f(&[3, 5]), &f(&[6, 3]), 1.0));
    assert!(e.contains("h is [2, 4]"), "{e}");
    // trainable factors must be f32
    let ah = d.empty(&[3, 5], DType::F16).unwrap();
    assert!(lora_forward(d, &f(&[2, 6]), &f(&[2, 3]), &f(&[2, 5]), &f(&[6, 5]), None, &ah, &f(&[6, 3]), 1.0).is_err());
    let e =
        err(lora_backward_input(d, &f(&[2, 5]), &f(&[2, 3]), &f(&[2, 7]), &f(&[6, 5]), &f(&[3, 5]), &f(&[6, 3]), 1.0));
    assert!(e.contains("lora_backward_input") && e.contains("dout"), "{e}");
    let e = err(lora_backward_weight(
        d,
        &f(&[3, 5]),
        &f(&[6, 4]),
        &f(&[2, 3]),
        &f(&[2, 6]),
        &f(&[2, 5]),
        &f(&[2, 3]),
        &f(&[6, 3]),
        1.0,
        false,
    ));
    assert!(e.contains("lora_backward_weight") && e.contains("db"), "{e}");
}
