//! rime's NaN policy in the kernels: a non-finite input never turns into a number. For each kernel a model
//! runs, a NaN (or Inf) placed in one input row must make exactly the outputs that depend on it non-finite,
//! on the GPU (every variant this device runs) and in the CPU reference. Before this test, attention turned a
//! NaN score into probability 0 (`select(0, exp(s - m), s > NEG_BIG)`) and a NaN row into zeros, so NaN query
//! weights gave finite embeddings; relu turned NaN into 0.

mod common;
use common::*;
use rime_kernels::ops::{attention, cross_entropy, elementwise, embedding, matmul, norm, softmax};
use rime_kernels::reference as r;
use rime_kernels::{DType, Tensor};

fn up(x: &[f32], shape: &[usize]) -> Tensor {
    dev().upload_f32(x, shape).unwrap()
}

fn empty(shape: &[usize]) -> Tensor {
    dev().empty(shape, DType::F32).unwrap()
}

fn down(t: &Tensor) -> Vec<f32> {
    dev().download_f32(t).unwrap()
}

/// Per row of `width`: whether it holds a non-finite value, and whether all of it is non-finite.
fn rows(x: &[f32], width: usize) -> Vec<(bool, bool)> {
    x.chunks(width).map(|r| (r.iter().any(|v| !v.is_finite()), r.iter().all(|v| !v.is_finite()))).collect()
}

/// Asserts that exactly the rows in `bad` are entirely non-finite and the others entirely finite.
fn expect_rows(what: &str, x: &[f32], width: usize, bad: &[usize]) {
    for (i, (any, all)) in rows(x, width).into_iter().enumerate() {
        if bad.contains(&i) {
            assert!(all, "{what}: row {i} should be all NaN/Inf: {:?}", &x[i * width..(i + 1) * width]);
        } else {
            assert!(!any, "{what}: row {i} should be finite: {:?}", &x[i * width..(i + 1) * width]);
        }
    }
}

#[test]
fn attention_propagates_nan_queries_and_keys() {
    let d = r::attention::Dims { b: 1, t: 4, s: 4, nh: 2, nkv: 1, hs: 8 };
    let (qs, ks) = ([1, 4, 2, 8], [1, 4, 1, 8]);
    let scale = 0.3;
    let base = (randn(1, 64, 1.0), randn(2, 32, 1.0), randn(3, 32, 1.0));
    // (what, q, k, mask, rows [t * nh + h] that must be NaN)
    let mut q_nan = base.0.clone();
    q_nan[(2 + 1) * 8 + 5] = f32::NAN; // query t 1, head 1: output row t * nh + h = 3
    let mut k_nan = base.1.clone();
    k_nan[2 * 8 + 3] = f32::NAN; // key 2
    let all_nan = vec![f32::NAN; 64];
    let mask_key2 = vec![1.0, 1.0, 0.0, 1.0];
    type Case<'a> = (&'a str, &'a [f32], &'a [f32], Option<&'a [f32]>, Vec<usize>);
    let cases: Vec<Case> = vec![
        ("a NaN query element", &q_nan, &base.1, None, vec![3]),
        ("a NaN key, seen by every row", &base.0, &k_nan, None, (0..8).collect()),
        ("a NaN key the mask hides", &base.0, &k_nan, Some(&mask_key2), vec![]),
        ("all-NaN queries", &all_nan, &base.1, None, (0..8).collect()),
    ];
    for (what, q, k, mask, bad) in cases {
        let (out, lse) = r::attention::attention_forward(&d, q, k, &base.2, mask, false, scale);
        expect_rows(&format!("reference, {what}"), &out, 8, &bad);
        let _ = lse;
        for variant in [attention::Variant::Plain, attention::Variant::Subgroup] {
            let (o, l) = (empty(&qs), empty(&[1, 2, 4]));
            let m = mask.map(|m| up(m, &[1, 4]));
            let (qt, kt, vt) = (up(q, &qs), up(k, &ks), up(&base.2, &ks));
            let Ok(ds) =
                attention::attention_forward_variant(dev(), variant, &o, &l, &qt, &kt, &vt, m.as_ref(), false, scale)
            else {
                continue; // the subgroup kernels need subgroups
            };
            dev().run(&ds).unwrap();
            expect_rows(&format!("GPU {variant:?}, {what}"), &down(&o), 8, &bad);
        }
    }
}

#[test]
fn softmax_and_cross_entropy_propagate_nan() {
    let mut x = randn(4, 3 * 8, 2.0);
    x[8 + 5] = f32::NAN;
    let want = r::softmax::softmax_forward(&x, 8, 3, None, false);
    expect_rows("reference softmax", &want, 8, &[1]);
    let o = empty(&[3, 8]);
    dev().run(&softmax::softmax_forward(dev(), &o, &up(&x, &[3, 8]), None, false).unwrap()).unwrap();
    expect_rows("GPU softmax", &down(&o), 8, &[1]);

    let targets = [1i32, 2, 3];
    let (loss, lse) = r::cross_entropy::cross_entropy_forward(&x, &targets, 8, -100);
    assert!(loss.is_nan() && lse[1].is_nan() && lse[0].is_finite(), "reference: {loss} {lse:?}");
    let t = dev().upload_bytes("targets", bytemuck::cast_slice(&targets), &[3], DType::I32).unwrap();
    let (l, s) = (empty(&[1]), empty(&[3]));
    dev().run(&cross_entropy::cross_entropy_forward(dev(), &l, &s, &up(&x, &[3, 8]), &t, -100).unwrap()).unwrap();
    let (loss, lse) = (down(&l), down(&s));
    assert!(loss[0].is_nan() && lse[1].is_nan() && lse[0].is_finite() && lse[2].is_finite(), "GPU: {loss:?} {lse:?}");
}

#[test]
fn norms_propagate_nan_inputs_and_inf_weights() {
    let c = 8;
    let clean = randn(5, 3 * c, 1.0);
    let mut x_nan = clean.clone();
    x_nan[2 * c + 1] = f32::NAN;
    let (gamma, beta) = (randn(6, c, 1.0), randn(7, c, 1.0));
    let mut g_inf = gamma.clone();
    g_inf[3] = f32::INFINITY;
    for (what, x, g, bad_rows) in [("a NaN input", &x_nan, &gamma, vec![2]), ("an Inf weight", &clean, &g_inf, vec![])]
    {
        let (out, _, _) = r::norm::layernorm_forward(x, g, &beta, 1e-5);
        let (o, mean, rstd) = (empty(&[3, c]), empty(&[3]), empty(&[3]));
        let ds =
            norm::layernorm_forward(dev(), &o, &mean, &rstd, &up(x, &[3, c]), &up(g, &[c]), &up(&beta, &[c]), 1e-5);
        dev().run(&ds.unwrap()).unwrap();
        let (rms, _) = r::norm::rmsnorm_forward(x, g, 1e-5);
        let (o2, rstd2) = (empty(&[3, c]), empty(&[3]));
        dev().run(&norm::rmsnorm_forward(dev(), &o2, &rstd2, &up(x, &[3, c]), &up(g, &[c]), 1e-5).unwrap()).unwrap();
        for (who, y) in [
            ("reference layernorm", out),
            ("GPU layernorm", down(&o)),
            ("reference rmsnorm", rms),
            ("GPU rmsnorm", down(&o2)),
        ] {
            if !bad_rows.is_empty() {
                expect_rows(&format!("{who}, {what}"), &y, c, &bad_rows);
            } else {
                // the Inf weight's column is non-finite in every row
                assert!((0..3).all(|i| !y[i * c + 3].is_finite()), "{who}: {y:?}");
                assert!((0..3).all(|i| y[i * c..(i + 1) * c].iter().enumerate().all(|(j, v)| j == 3 || v.is_finite())));
            }
        }
    }
}

#[test]
fn activations_propagate_nan() {
    let x = [f32::NAN, -1.0, 0.5, f32::NAN, 3.0, -f32::NAN, 0.0, 2.0];
    let nan_at = |y: &[f32]| y.iter().map(|v| v.is_nan()).collect::<Vec<_>>();
    let want: Vec<bool> = x.iter().map(|v| v.is_nan()).collect();
    let xt = up(&x, &[8]);
    let dout = [1.0f32; 8];
    let dt = up(&dout, &[8]);
    let gpu = |f: &dyn Fn(&Tensor) -> Vec<rime_kernels::Dispatch>| {
        let o = empty(&[8]);
        dev().run(&f(&o)).unwrap();
        down(&o)
    };
    for tanh in [false, true] {
        assert_eq!(nan_at(&r::elementwise::gelu_forward(&x, tanh)), want, "reference gelu tanh={tanh}");
        assert_eq!(nan_at(&gpu(&|o| elementwise::gelu_forward(dev(), o, &xt, tanh).unwrap())), want, "GPU gelu {tanh}");
        assert_eq!(nan_at(&r::elementwise::gelu_backward(&dout, &x, tanh)), want, "reference gelu' {tanh}");
        assert_eq!(nan_at(&gpu(&|o| elementwise::gelu_backward(dev(), o, &dt, &xt, tanh).unwrap())), want, "GPU gelu'");
    }
    assert_eq!(nan_at(&r::elementwise::silu_forward(&x)), want, "reference silu");
    assert_eq!(nan_at(&gpu(&|o| elementwise::silu_forward(dev(), o, &xt).unwrap())), want, "GPU silu");
    assert_eq!(nan_at(&r::elementwise::relu_forward(&x)), want, "reference relu");
    assert_eq!(nan_at(&gpu(&|o| elementwise::relu_forward(dev(), o, &xt).unwrap())), want, "GPU relu");
    assert_eq!(nan_at(&r::elementwise::relu_backward(&dout, &x)), want, "reference relu'");
    assert_eq!(nan_at(&gpu(&|o| elementwise::relu_backward(dev(), o, &dt, &xt).unwrap())), want, "GPU relu'");
}

#[test]
fn matmul_and_embedding_propagate_nan() {
    let (m, k, n) = (3, 8, 8);
    let mut a = randn(8, m * k, 1.0);
    a[k + 2] = f32::NAN;
    let b = randn(9, k * n, 1.0);
    let d = r::matmul::MatmulDims { batch: 1, m, k, n, b_batched: false, trans_a: false, trans_b: false };
    expect_rows("reference matmul", &r::matmul::matmul_forward(&a, &b, None, &d), n, &[1]);
    use matmul::Variant as V;
    for v in [V::Auto, V::General, V::Tiled, V::TiledSubgroup, V::Gemv, V::GemvSubgroup] {
        for rows_m in [1usize, m] {
            let o = empty(&[rows_m, n]);
            let at = up(&a[..rows_m * k], &[rows_m, k]);
            let Ok(ds) = matmul::matmul_forward_variant(dev(), v, &o, &at, &up(&b, &[k, n]), None, false, false) else {
                continue;
            };
            dev().run(&ds).unwrap();
            let bad: &[usize] = if rows_m > 1 { &[1] } else { &[] };
            expect_rows(&format!("GPU matmul {v:?} m={rows_m}"), &down(&o), n, bad);
        }
    }
    let mut table = randn(10, 4 * 8, 1.0);
    table[2 * 8..3 * 8].fill(f32::NAN);
    let ids = [0u32, 2, 3];
    expect_rows("reference embedding", &r::embedding::embedding_forward(&ids, &table, 8), 8, &[1]);
    let o = empty(&[3, 8]);
    let it = dev().upload_u32(&ids, &[3]).unwrap();
    dev().run(&embedding::embedding_forward(dev(), &o, &it, &up(&table, &[4, 8])).unwrap()).unwrap();
    expect_rows("GPU embedding", &down(&o), 8, &[1]);
}
