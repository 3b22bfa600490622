mod common;
use common::*;
use rime_kernels::ops::elementwise::*;
use rime_kernels::{reference::elementwise as r, DType, Tensor};

/// Odd sizes run one element per invocation, multiples of 4 the vec4 specialization.
const SIZES: &[usize] = &[1, 3, 4, 17, 127, 128, 4096, 4099];

fn up(x: &[f32], shape: &[usize]) -> Tensor {
    dev().upload_f32(x, shape).unwrap()
}

fn get(t: &Tensor) -> Vec<f32> {
    dev().download_f32(t).unwrap()
}

fn empty(shape: &[usize]) -> Tensor {
    dev().empty(shape, DType::F32).unwrap()
}

/// (rows, N) pairs for broadcast tests.
const MATS: &[(usize, usize)] = &[(1, 1), (3, 17), (17, 3), (5, 127), (3, 16), (5, 128), (7, 4)];

#[test]
fn add_mul_matches_reference() {
    let d = dev();
    for &(rows, n) in MATS {
        let a = randn(1, rows * n, 2.0);
        let full = randn(2, rows * n, 2.0);
        let row = randn(3, n, 2.0);
        for b in [&full, &row] {
            let bt = up(b, &[b.len()]);
            let out = empty(&[rows, n]);
            d.run(&add_forward(d, &out, &up(&a, &[rows, n]), &bt).unwrap()).unwrap();
            assert_close("add", &get(&out), &r::add_forward(&a, b), 0.0, 0.0);
            d.run(&mul_forward(d, &out, &up(&a, &[rows, n]), &bt).unwrap()).unwrap();
            assert_close("mul", &get(&out), &r::mul_forward(&a, b), 0.0, 0.0);
        }
    }
    // More elements than one row of 65535 workgroups covers: the 2-D grid path.
    let n = 65535 * 64 + 3;
    let a = randn(4, n, 1.0);
    let b = randn(5, n, 1.0);
    let out = empty(&[n]);
    d.run(&add_forward(d, &out, &up(&a, &[n]), &up(&b, &[n])).unwrap()).unwrap();
    assert_close("add (2-D grid)", &get(&out), &r::add_forward(&a, &b), 0.0, 0.0);
    // The same with vec4 elements.
    let n = 65535 * 64 * 4 + 4;
    let a = randn(4, n, 1.0);
    let b = randn(5, n, 1.0);
    let out = empty(&[n]);
    d.run(&add_forward(d, &out, &up(&a, &[n]), &up(&b, &[n])).unwrap()).unwrap();
    assert_close("add (2-D grid, vec4)", &get(&out), &r::add_forward(&a, &b), 0.0, 0.0);
}

#[test]
fn mul_backward_matches_reference() {
    let d = dev();
    for &(rows, n) in MATS {
        let a = randn(6, rows * n, 2.0);
        let dout = randn(7, rows * n, 1.0);
        for b in [randn(8, rows * n, 2.0), randn(9, n, 2.0)] {
            let (da, db) = (empty(&[rows, n]), empty(&[b.len()]));
            let ds =
                mul_backward(d, Some(&da), Some(&db), &up(&dout, &[rows, n]), &up(&a, &[rows, n]), &up(&b, &[b.len()]));
            d.run(&ds.unwrap()).unwrap();
            let (wda, wdb) = r::mul_backward(&dout, &a, &b);
            assert_close("mul da", &get(&da), &wda, 1e-6, 1e-6);
            assert_close("mul db", &get(&db), &wdb, 1e-5 * rows as f32, 1e-5);
            // Only one of the two gradients.
            let db2 = empty(&[b.len()]);
            let ds =
                mul_backward(d, None, Some(&db2), &up(&dout, &[rows, n]), &up(&a, &[rows, n]), &up(&b, &[b.len()]));
            assert_eq!(ds.as_ref().unwrap().len(), 1);
            d.run(&ds.unwrap()).unwrap();
            assert_close("mul db only", &get(&db2), &wdb, 1e-5 * rows as f32, 1e-5);
        }
    }
}

#[test]
fn mul_backward_matches_finite_differences() {
    // L = sum(dout * a * b[bcast]); dL/db_j = sum_rows dout * a.
    let (rows, n) = (3, 5);
    let a = randn(10, rows * n, 1.0);
    let b = randn(11, n, 1.0);
    let dout = randn(12, rows * n, 1.0);
    let loss = |bb: &[f32]| r::mul_forward(&a, bb).iter().zip(&dout).map(|(&y, &g)| y as f64 * g as f64).sum::<f64>();
    let fd = finite_diff(&b, 1e-2, loss);
    assert_close("mul db vs fd", &r::mul_backward(&dout, &a, &b).1, &fd, 1e-3, 1e-3);
}

#[test]
fn scale_and_add_inplace_matches_reference() {
    let d = dev();
    for &n in SIZES {
        let a = randn(13, n, 3.0);
        let out = empty(&[n]);
        d.run(&scale_forward(d, &out, &up(&a, &[n]), -0.37).unwrap()).unwrap();
        assert_close("scale", &get(&out), &r::scale_forward(&a, -0.37), 0.0, 0.0);
        let mut acc = randn(14, n, 1.0);
        let b = randn(15, n, 1.0);
        let acct = up(&acc, &[n]);
        d.run(&add_inplace_forward(d, &acct, &up(&b, &[n]), 0.5).unwrap()).unwrap();
        r::add_inplace_forward(&mut acc, &b, 0.5);
        assert_close("add_inplace", &get(&acct), &acc, 1e-7, 1e-7);
    }
    // Broadcast row into [3, 17].
    let mut acc = randn(16, 51, 1.0);
    let b = randn(17, 17, 1.0);
    let acct = up(&acc, &[3, 17]);
    d.run(&add_inplace_forward(d, &acct, &up(&b, &[17]), 1.0).unwrap()).unwrap();
    r::add_inplace_forward(&mut acc, &b, 1.0);
    assert_close("add_inplace bcast", &get(&acct), &acc, 1e-7, 1e-7);
}

#[test]
fn reference_erf_matches_known_values() {
    // math.erf (CPython, correctly rounded libm) at these points.
    let known = [
        (0.1, 0.1124629160182849),
        (0.5, 0.5204998778130465),
        (1.0, 0.8427007929497149),
        (2.0, 0.9953222650189527),
        (2.5, 0.999593047982555),
        (2.6, 0.9997639655834707),
        (3.0, 0.9999779095030014),
        (4.0, 0.9999999845827421),
        (5.5, 0.9999999999999927),
        (-1.7, -0.9837904585907745),
    ];
    for (x, want) in known {
        assert!((r::erf64(x) - want).abs() < 1e-14, "erf({x}) = {} vs {want}", r::erf64(x));
    }
}

/// x spread over [-8, 8] plus a dense sweep of the region where erf bends.
fn activation_inputs(n: usize) -> Vec<f32> {
    let mut x = randn(20, n, 8.0);
    x.extend((0..2000).map(|i| -5.0 + i as f32 * 0.005));
    x
}

type Fwd = fn(&rime_kernels::Device, &Tensor, &Tensor) -> rime_kernels::Result<Vec<rime_kernels::Dispatch>>;
type Bwd = fn(&rime_kernels::Device, &Tensor, &Tensor, &Tensor) -> rime_kernels::Result<Vec<rime_kernels::Dispatch>>;

fn gelu_exact(d: &rime_kernels::Device, o: &Tensor, x: &Tensor) -> rime_kernels::Result<Vec<rime_kernels::Dispatch>> {
    gelu_forward(d, o, x, false)
}
fn gelu_tanh(d: &rime_kernels::Device, o: &Tensor, x: &Tensor) -> rime_kernels::Result<Vec<rime_kernels::Dispatch>> {
    gelu_forward(d, o, x, true)
}
fn gelu_exact_b(
    d: &rime_kernels::Device,
    dx: &Tensor,
    g: &Tensor,
    x: &Tensor,
) -> rime_kernels::Result<Vec<rime_kernels::Dispatch>> {
    gelu_backward(d, dx, g, x, false)
}
fn gelu_tanh_b(
    d: &rime_kernels::Device,
    dx: &Tensor,
    g: &Tensor,
    x: &Tensor,
) -> rime_kernels::Result<Vec<rime_kernels::Dispatch>> {
    gelu_backward(d, dx, g, x, true)
}

type RefFwd = fn(&[f32]) -> Vec<f32>;
type RefBwd = fn(&[f32], &[f32]) -> Vec<f32>;

fn activations() -> Vec<(&'static str, Fwd, Bwd, RefFwd, RefBwd)> {
    vec![
        (
            "gelu",
            gelu_exact as Fwd,
            gelu_exact_b as Bwd,
            |x| r::gelu_forward(x, false),
            |g, x| r::gelu_backward(g, x, false),
        ),
        ("gelu_tanh", gelu_tanh, gelu_tanh_b, |x| r::gelu_forward(x, true), |g, x| r::gelu_backward(g, x, true)),
        ("silu", silu_forward, silu_backward, r::silu_forward, r::silu_backward),
        ("relu", relu_forward, relu_backward, r::relu_forward, r::relu_backward),
    ]
}

#[test]
fn activations_match_reference() {
    // Exact GELU within 1e-6 (absolute, plus 1e-6 relative for the large-|x| identity region) of the f64
    // erf, i.e. of PyTorch's float32 exact GELU to within its own rounding.
    let d = dev();
    for (name, fwd, bwd, rf, rb) in activations() {
        for &n in SIZES {
            let x = activation_inputs(n);
            let m = x.len();
            let g = randn(21, m, 1.0);
            let (out, dx) = (empty(&[m]), empty(&[m]));
            d.run(&fwd(d, &out, &up(&x, &[m])).unwrap()).unwrap();
            assert_close(&format!("{name} forward n={n}"), &get(&out), &rf(&x), 1e-6, 1e-6);
            d.run(&bwd(d, &dx, &up(&g, &[m]), &up(&x, &[m])).unwrap()).unwrap();
            assert_close(&format!("{name} backward n={n}"), &get(&dx), &rb(&g, &x), 2e-6, 2e-6);
        }
    }
}

#[test]
fn activations_match_finite_differences() {
    for (name, _, _, rf, rb) in activations() {
        // Keep away from relu's kink.
        let x: Vec<f32> = randn(22, 64, 4.0).into_iter().map(|v| if v.abs() < 0.05 { v + 0.1 } else { v }).collect();
        let g = randn(23, 64, 1.0);
        let loss = |xx: &[f32]| rf(xx).iter().zip(&g).map(|(&y, &w)| y as f64 * w as f64).sum::<f64>();
        let fd = finite_diff(&x, 1e-2, loss);
        assert_close(&format!("{name} backward vs fd"), &rb(&g, &x), &fd, 2e-3, 2e-3);
    }
}

#[test]
fn dropout_matches_reference() {
    let d = dev();
    for &n in &[1usize, 16, 17, 127, 10007, 10008] {
        for (p, seed) in [(0.0f32, 1u32), (0.1, 7), (0.5, 12345), (1.0, 3)] {
            let x = randn(24, n, 1.0);
            let out = empty(&[n]);
            d.run(&dropout_forward(d, &out, &up(&x, &[n]), p, seed).unwrap()).unwrap();
            let want = r::dropout_forward(&x, p, seed);
            assert_close(&format!("dropout p={p} n={n}"), &get(&out), &want, 0.0, 0.0);
            let g = randn(25, n, 1.0);
            let dx = empty(&[n]);
            d.run(&dropout_backward(d, &dx, &up(&g, &[n]), p, seed).unwrap()).unwrap();
            assert_close(
                &format!("dropout backward p={p} n={n}"),
                &get(&dx),
                &r::dropout_backward(&g, p, seed),
                0.0,
                0.0,
            );
            if n >= 10007 {
                let kept = (0..n as u32).filter(|&i| r::dropout_keep(i, p, seed)).count() as f32 / n as f32;
                assert!((kept - (1.0 - p)).abs() < 0.02, "p={p}: kept fraction {kept}");
            }
        }
    }
    // Different seeds give different masks.
    let a: Vec<bool> = (0..256).map(|i| r::dropout_keep(i, 0.5, 1)).collect();
    let b: Vec<bool> = (0..256).map(|i| r::dropout_keep(i, 0.5, 2)).collect();
    assert_ne!(a, b);
}

#[test]
fn dropout_matches_finite_differences() {
    // Dropout is linear: d/dx sum(g * dropout(x)) = g * keep / (1 - p).
    let x = randn(26, 40, 1.0);
    let g = randn(27, 40, 1.0);
    let loss =
        |xx: &[f32]| r::dropout_forward(xx, 0.3, 9).iter().zip(&g).map(|(&y, &w)| y as f64 * w as f64).sum::<f64>();
    let fd = finite_diff(&x, 1e-2, loss);
    assert_close("dropout vs fd", &r::dropout_backward(&g, 0.3, 9), &fd, 1e-4, 1e-4);
}

#[test]
fn elementwise_rejects_bad_shapes() {
    let d = dev();
    let a = empty(&[3, 4]);
    let e = add_forward(d, &a, &a, &empty(&[5])).err().unwrap().to_string();
    assert!(e.contains("add_forward") && e.contains("[5]"), "{e}");
    assert!(mul_forward(d, &empty(&[12]), &a, &a).is_err());
    assert!(gelu_forward(d, &empty(&[4, 3]), &a, false).is_err());
    assert!(relu_backward(d, &a, &empty(&[3, 5]), &a).is_err());
    assert!(dropout_forward(d, &a, &a, 1.5, 0).is_err());
    assert!(add_inplace_forward(d, &a, &empty(&[3]), 1.0).is_err());
    assert!(mul_backward(d, None, Some(&empty(&[3])), &a, &a, &empty(&[4])).is_err());
    assert!(scale_forward(d, &a, &d.empty(&[3, 4], DType::U32).unwrap(), 1.0).is_err());
}

/// naga validation of this family's specializations (the shared test covers all files; this one runs alone).
#[test]
fn elementwise_shaders_validate() {
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
