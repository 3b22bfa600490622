mod common;
use common::*;
use rime_kernels::ops::reduce::RowVariant;
use rime_kernels::ops::softmax::*;
use rime_kernels::{reference::softmax as r, DType, Device};

fn variants(d: &Device) -> Vec<RowVariant> {
    let mut v = vec![RowVariant::for_device(d), RowVariant::Shared(8), RowVariant::Shared(256)];
    v.dedup();
    v
}

/// [B, NH, T, S] shapes: odd sizes, T < S (a KV prefix), T == S, wide rows.
const SHAPES: &[[usize; 4]] = &[[1, 1, 1, 1], [2, 3, 5, 7], [3, 1, 17, 17], [1, 2, 3, 127], [2, 1, 4, 1031]];

/// A [B, S] mask with some zeros; batch 0 fully masked when `kill_first` (to exercise the all-masked rows).
fn make_mask(b: usize, s: usize, kill_first: bool) -> Vec<f32> {
    let mut m: Vec<f32> = randn(77, b * s, 1.0).into_iter().map(|v| if v > -0.6 { 1.0 } else { 0.0 }).collect();
    if kill_first {
        m[..s].iter_mut().for_each(|v| *v = 0.0);
    }
    m
}

#[test]
fn softmax_matches_reference() {
    let d = dev();
    for v in variants(d) {
        for &shape in SHAPES {
            let [b, _, t, s] = shape;
            let n: usize = shape.iter().product();
            let x = randn(n as u64, n, 6.0);
            let xt = d.upload_f32(&x, &shape).unwrap();
            let out = d.empty(&shape, DType::F32).unwrap();
            for (use_mask, causal) in [(false, false), (true, false), (false, true), (true, true)] {
                let m = make_mask(b, s, b > 1);
                let mt = d.upload_f32(&m, &[b, s]).unwrap();
                let mask = use_mask.then_some(&mt);
                d.run(&softmax_forward_with(d, v, &out, &xt, mask, causal).unwrap()).unwrap();
                let want = r::softmax_forward(&x, s, t, use_mask.then_some(&m[..]), causal);
                let what = format!("softmax {v:?} {shape:?} mask={use_mask} causal={causal}");
                assert_close(&what, &d.download_f32(&out).unwrap(), &want, 1e-6, 1e-5);
            }
        }
    }
}

#[test]
fn softmax_fully_masked_row_is_zero() {
    let d = dev();
    let x = d.upload_f32(&randn(3, 2 * 5, 1.0), &[2, 5]).unwrap();
    let mask = d.upload_f32(&[0.0; 10], &[2, 5]).unwrap();
    let out = d.empty(&[2, 5], DType::F32).unwrap();
    d.run(&softmax_forward(d, &out, &x, Some(&mask), false).unwrap()).unwrap();
    assert_eq!(d.download_f32(&out).unwrap(), vec![0.0; 10]);
}

#[test]
fn softmax_backward_matches_reference() {
    let d = dev();
    for v in variants(d) {
        for &shape in SHAPES {
            let [b, _, t, s] = shape;
            let n: usize = shape.iter().product();
            let x = randn(n as u64 + 1, n, 4.0);
            let y = r::softmax_forward(&x, s, t, Some(&make_mask(b, s, false)), true);
            let g = randn(n as u64 + 2, n, 1.0);
            let dx = d.empty(&shape, DType::F32).unwrap();
            let ds = softmax_backward_with(
                d,
                v,
                &dx,
                &d.upload_f32(&g, &shape).unwrap(),
                &d.upload_f32(&y, &shape).unwrap(),
            );
            d.run(&ds.unwrap()).unwrap();
            assert_close(
                &format!("softmax backward {v:?} {shape:?}"),
                &d.download_f32(&dx).unwrap(),
                &r::softmax_backward(&g, &y, s),
                1e-6,
                1e-5,
            );
        }
    }
}

#[test]
fn softmax_backward_matches_finite_differences() {
    // L = sum(g * softmax(x)); dL/dx = y * (g - <g, y>) per row, masked columns 0.
    let (b, t, s) = (2, 3, 6);
    let x = randn(5, b * t * s, 2.0);
    let g = randn(6, b * t * s, 1.0);
    let m = make_mask(b, s, false);
    let loss = |xx: &[f32]| {
        r::softmax_forward(xx, s, t, Some(&m), true).iter().zip(&g).map(|(&y, &w)| y as f64 * w as f64).sum::<f64>()
    };
    let fd = finite_diff(&x, 1e-3, loss);
    let y = r::softmax_forward(&x, s, t, Some(&m), true);
    assert_close("softmax backward vs fd", &r::softmax_backward(&g, &y, s), &fd, 2e-3, 2e-3);
}

#[test]
fn softmax_rejects_bad_shapes() {
    let d = dev();
    let x = d.empty(&[2, 3, 4], DType::F32).unwrap();
    let e = softmax_forward(d, &x, &x, Some(&d.empty(&[2, 3], DType::F32).unwrap()), false).err().unwrap().to_string();
    assert!(e.contains("softmax_forward") && e.contains("[2, 3]"), "{e}");
    assert!(softmax_forward(d, &d.empty(&[2, 12], DType::F32).unwrap(), &x, None, true).is_err());
    assert!(softmax_backward(d, &x, &d.empty(&[2, 3, 5], DType::F32).unwrap(), &x).is_err());
}

/// naga validation of this family's specializations (the shared test covers all files; this one runs alone).
#[test]
fn softmax_shaders_validate() {
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
