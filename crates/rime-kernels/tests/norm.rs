mod common;
use common::*;
use rime_kernels::ops::norm::*;
use rime_kernels::ops::reduce::RowVariant;
use rime_kernels::{reference::norm as r, DType, Device, Tensor};

fn variants(d: &Device) -> Vec<RowVariant> {
    let mut v = vec![RowVariant::for_device(d), RowVariant::Shared(8), RowVariant::Shared(256)];
    v.dedup();
    v
}

/// Odd C runs f32 elements, C a multiple of 4 vec4.
const SHAPES: &[(usize, usize)] =
    &[(1, 1), (3, 17), (17, 3), (5, 127), (2, 1031), (127, 8), (1, 4), (3, 768), (2, 1028)];
const EPS: f32 = 1e-5;

fn up(x: &[f32], shape: &[usize]) -> Tensor {
    dev().upload_f32(x, shape).unwrap()
}
fn get(t: &Tensor) -> Vec<f32> {
    dev().download_f32(t).unwrap()
}
fn empty(shape: &[usize]) -> Tensor {
    dev().empty(shape, DType::F32).unwrap()
}

/// Rows with an offset so the mean matters.
fn input(rows: usize, c: usize, seed: u64) -> Vec<f32> {
    randn(seed, rows * c, 2.0).into_iter().map(|v| v + 0.7).collect()
}

#[test]
fn layernorm_matches_reference() {
    let d = dev();
    for v in variants(d) {
        for &(rows, c) in SHAPES {
            let x = input(rows, c, 1);
            let gamma = randn(2, c, 1.5);
            let beta = randn(3, c, 1.0);
            let (out, mean, rstd) = (empty(&[rows, c]), empty(&[rows]), empty(&[rows]));
            let ds = layernorm_forward_with(
                d,
                v,
                &out,
                &mean,
                &rstd,
                &up(&x, &[rows, c]),
                &up(&gamma, &[c]),
                &up(&beta, &[c]),
                EPS,
            );
            d.run(&ds.unwrap()).unwrap();
            let (wo, wm, wr) = r::layernorm_forward(&x, &gamma, &beta, EPS);
            let what = format!("layernorm {v:?} {rows}x{c}");
            assert_close(&(what.clone() + " out"), &get(&out), &wo, 1e-5, 1e-5);
            assert_close(&(what.clone() + " mean"), &get(&mean), &wm, 1e-6, 1e-6);
            assert_close(&(what + " rstd"), &get(&rstd), &wr, 1e-6, 1e-5);
        }
    }
}

#[test]
fn layernorm_backward_matches_reference() {
    let d = dev();
    for v in variants(d) {
        for &(rows, c) in SHAPES {
            let x = input(rows, c, 4);
            let gamma = randn(5, c, 1.5);
            let g = randn(6, rows * c, 1.0);
            let (_, mean, rstd) = r::layernorm_forward(&x, &gamma, &vec![0.0; c], EPS);
            let (xt, gt, mt, rt) = (up(&x, &[rows, c]), up(&g, &[rows, c]), up(&mean, &[rows]), up(&rstd, &[rows]));
            let dx = empty(&[rows, c]);
            d.run(&layernorm_backward_input_with(d, v, &dx, &gt, &xt, &mt, &rt, &up(&gamma, &[c])).unwrap()).unwrap();
            let what = format!("layernorm backward {v:?} {rows}x{c}");
            assert_close(
                &(what.clone() + " dx"),
                &get(&dx),
                &r::layernorm_backward_input(&g, &x, &mean, &rstd, &gamma),
                1e-5,
                1e-4,
            );
            let prev_g = randn(7, c, 1.0);
            let prev_b = randn(8, c, 1.0);
            for acc in [false, true] {
                let (dg, db) = (up(&prev_g, &[c]), up(&prev_b, &[c]));
                d.run(&layernorm_backward_weight_with(d, v, &dg, &db, &gt, &xt, &mt, &rt, acc).unwrap()).unwrap();
                let (wg, wb) =
                    r::layernorm_backward_weight(&g, &x, &mean, &rstd, c, acc.then_some((&prev_g[..], &prev_b[..])));
                let tol = 2e-6 * rows as f32;
                assert_close(&format!("{what} dgamma acc={acc}"), &get(&dg), &wg, tol, 1e-5);
                assert_close(&format!("{what} dbeta acc={acc}"), &get(&db), &wb, tol, 1e-5);
            }
        }
    }
}

#[test]
fn rmsnorm_matches_reference() {
    let d = dev();
    for v in variants(d) {
        for &(rows, c) in SHAPES {
            let x = input(rows, c, 9);
            let gamma = randn(10, c, 1.5);
            let (out, rstd) = (empty(&[rows, c]), empty(&[rows]));
            d.run(&rmsnorm_forward_with(d, v, &out, &rstd, &up(&x, &[rows, c]), &up(&gamma, &[c]), EPS).unwrap())
                .unwrap();
            let (wo, wr) = r::rmsnorm_forward(&x, &gamma, EPS);
            assert_close(&format!("rmsnorm {v:?} {rows}x{c} out"), &get(&out), &wo, 1e-5, 1e-5);
            assert_close(&format!("rmsnorm {v:?} {rows}x{c} rstd"), &get(&rstd), &wr, 1e-6, 1e-5);
        }
    }
}

#[test]
fn rmsnorm_backward_matches_reference() {
    let d = dev();
    for v in variants(d) {
        for &(rows, c) in SHAPES {
            let x = input(rows, c, 11);
            let gamma = randn(12, c, 1.5);
            let g = randn(13, rows * c, 1.0);
            let (_, rstd) = r::rmsnorm_forward(&x, &gamma, EPS);
            let (xt, gt, rt) = (up(&x, &[rows, c]), up(&g, &[rows, c]), up(&rstd, &[rows]));
            let dx = empty(&[rows, c]);
            d.run(&rmsnorm_backward_input_with(d, v, &dx, &gt, &xt, &rt, &up(&gamma, &[c])).unwrap()).unwrap();
            let what = format!("rmsnorm backward {v:?} {rows}x{c}");
            assert_close(
                &(what.clone() + " dx"),
                &get(&dx),
                &r::rmsnorm_backward_input(&g, &x, &rstd, &gamma),
                1e-5,
                1e-4,
            );
            let prev = randn(14, c, 1.0);
            for acc in [false, true] {
                let dg = up(&prev, &[c]);
                d.run(&rmsnorm_backward_weight_with(d, v, &dg, &gt, &xt, &rt, acc).unwrap()).unwrap();
                let wg = r::rmsnorm_backward_weight(&g, &x, &rstd, c, acc.then_some(&prev[..]));
                assert_close(&format!("{what} dgamma acc={acc}"), &get(&dg), &wg, 2e-6 * rows as f32, 1e-5);
            }
        }
    }
}

/// L = sum(g * norm(x)) and its gradients by central differences of the f64-accumulated reference.
#[test]
fn norm_backward_matches_finite_differences() {
    let (rows, c) = (3, 7);
    let x = input(rows, c, 15);
    let gamma = randn(16, c, 1.5);
    let beta = randn(17, c, 1.0);
    let g = randn(18, rows * c, 1.0);
    let dot = |y: &[f32]| y.iter().zip(&g).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
    let (tol, eps) = (2e-3, 1e-2);

    let (_, mean, rstd) = r::layernorm_forward(&x, &gamma, &beta, EPS);
    let fd = finite_diff(&x, eps, |xx| dot(&r::layernorm_forward(xx, &gamma, &beta, EPS).0));
    assert_close("layernorm dx vs fd", &r::layernorm_backward_input(&g, &x, &mean, &rstd, &gamma), &fd, tol, tol);
    let (dg, db) = r::layernorm_backward_weight(&g, &x, &mean, &rstd, c, None);
    let fd = finite_diff(&gamma, eps, |gg| dot(&r::layernorm_forward(&x, gg, &beta, EPS).0));
    assert_close("layernorm dgamma vs fd", &dg, &fd, tol, tol);
    let fd = finite_diff(&beta, eps, |bb| dot(&r::layernorm_forward(&x, &gamma, bb, EPS).0));
    assert_close("layernorm dbeta vs fd", &db, &fd, tol, tol);

    let (_, rstd) = r::rmsnorm_forward(&x, &gamma, EPS);
    let fd = finite_diff(&x, eps, |xx| dot(&r::rmsnorm_forward(xx, &gamma, EPS).0));
    assert_close("rmsnorm dx vs fd", &r::rmsnorm_backward_input(&g, &x, &rstd, &gamma), &fd, tol, tol);
    let fd = finite_diff(&gamma, eps, |gg| dot(&r::rmsnorm_forward(&x, gg, EPS).0));
    assert_close("rmsnorm dgamma vs fd", &r::rmsnorm_backward_weight(&g, &x, &rstd, c, None), &fd, tol, tol);
}

#[test]
fn norm_rejects_bad_shapes() {
    let d = dev();
    let x = empty(&[4, 6]);
    let e = layernorm_forward(d, &x, &empty(&[4]), &empty(&[4]), &x, &empty(&[5]), &empty(&[6]), EPS)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("layernorm_forward") && e.contains("gamma") && e.contains("[5]"), "{e}");
    assert!(rmsnorm_forward(d, &x, &empty(&[3]), &x, &empty(&[6]), EPS).is_err());
    assert!(rmsnorm_forward(d, &x, &empty(&[4]), &x, &empty(&[6]), -1.0).is_err());
    assert!(rmsnorm_backward_input(d, &empty(&[6, 4]), &x, &x, &empty(&[4]), &empty(&[6])).is_err());
    assert!(
        layernorm_backward_weight(d, &empty(&[6]), &empty(&[4]), &x, &x, &empty(&[4]), &empty(&[4]), false).is_err()
    );
}

/// naga validation of this family's specializations (the shared test covers all files; this one runs alone).
#[test]
fn norm_shaders_validate() {
    for (file, spec) in specs() {
        let src = rime_kernels::shaders::source_with_prelude(file, &spec.prelude).unwrap();
        let module =
            naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| panic!("{file}: {}", e.emit_to_string(&src)));
        let mut v = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all());
        let info = v.validate(&module).unwrap_or_else(|e| panic!("{file} ({spec:?}) invalid: {e:?}"));
        let consts: naga::back::PipelineConstants = spec.constants.iter().map(|(k, v)| (k.clone(), *v)).collect();
        naga::back::pipeline_constants::process_overrides(&module, &info, None, &consts).unwrap();
    }
}
