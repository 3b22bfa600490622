mod common;
use common::*;
use rime_kernels::ops::prepend::*;
use rime_kernels::{reference::prepend as r, DType, Tensor};

fn get(t: &Tensor) -> Vec<f32> {
    dev().download_f32(t).unwrap()
}

/// (B, T, P, C): odd sizes, a single row or token, P larger than T.
const SHAPES: &[(usize, usize, usize, usize)] =
    &[(1, 1, 1, 1), (2, 3, 5, 7), (3, 17, 2, 8), (1, 4, 20, 33), (5, 9, 3, 130)];

#[test]
fn prepend_matches_reference() {
    let d = dev();
    for &(b, t, p, c) in SHAPES {
        let x = randn(1, b * t * c, 1.0);
        let rows = randn(2, p * c, 1.0);
        let out = d.empty(&[b, p + t, c], DType::F32).unwrap();
        let ds =
            prepend_forward(d, &out, &d.upload_f32(&x, &[b, t, c]).unwrap(), &d.upload_f32(&rows, &[p, c]).unwrap());
        d.run(&ds.unwrap()).unwrap();
        // a copy: exact
        assert_close(
            &format!("prepend {b}x{t}x{p}x{c}"),
            &get(&out),
            &r::prepend_forward(&x, &rows, b, t, c),
            0.0,
            0.0,
        );
    }
}

#[test]
fn prepend_backward_matches_reference() {
    let d = dev();
    for &(b, t, p, c) in SHAPES {
        let g = randn(3, b * (p + t) * c, 1.0);
        let gt = d.upload_f32(&g, &[b, p + t, c]).unwrap();
        let dx = d.upload_f32(&randn(4, b * t * c, 1.0), &[b, t, c]).unwrap(); // overwritten
        d.run(&prepend_backward_input(d, &dx, &gt).unwrap()).unwrap();
        assert_close(
            &format!("prepend dx {b}x{t}x{p}x{c}"),
            &get(&dx),
            &r::prepend_backward_input(&g, b, p, c),
            0.0,
            0.0,
        );
        let prev = randn(5, p * c, 1.0);
        for acc in [false, true] {
            let dr = d.upload_f32(&prev, &[p, c]).unwrap();
            d.run(&prepend_backward_weight(d, &dr, &gt, acc).unwrap()).unwrap();
            let base = if acc { prev.clone() } else { vec![0.0; p * c] };
            // Same order of additions as the reference (batch in order), so only f32 rounding differs.
            assert_close(
                &format!("prepend drows {b}x{t}x{p}x{c} acc={acc}"),
                &get(&dr),
                &r::prepend_backward_weight(&g, &base, b, c),
                1e-6,
                1e-6,
            );
        }
    }
}

#[test]
fn prepend_backward_matches_finite_differences() {
    // L = sum(g * prepend(x, rows)) is linear: dL/dx = the last T rows of g, dL/drows = the batch sum of
    // the first P rows of g.
    let (b, t, p, c) = (3, 4, 2, 5);
    let x = randn(6, b * t * c, 1.0);
    let rows = randn(7, p * c, 1.0);
    let g = randn(8, b * (p + t) * c, 1.0);
    let dot = |o: Vec<f32>| o.iter().zip(&g).map(|(&a, &w)| a as f64 * w as f64).sum::<f64>();
    let fx = finite_diff(&x, 1e-2, |x| dot(r::prepend_forward(x, &rows, b, t, c)));
    let fr = finite_diff(&rows, 1e-2, |rw| dot(r::prepend_forward(&x, rw, b, t, c)));
    assert_close("prepend dx vs fd", &r::prepend_backward_input(&g, b, p, c), &fx, 1e-4, 1e-4);
    assert_close("prepend drows vs fd", &r::prepend_backward_weight(&g, &vec![0.0; p * c], b, c), &fr, 1e-4, 1e-4);
}

#[test]
fn prepend_rejects_bad_shapes() {
    let d = dev();
    let x = d.empty(&[2, 3, 4], DType::F32).unwrap();
    let rows = d.empty(&[5, 4], DType::F32).unwrap();
    let e = prepend_forward(d, &d.empty(&[2, 7, 4], DType::F32).unwrap(), &x, &rows).err().unwrap().to_string();
    assert!(e.contains("prepend_forward") && e.contains("[2, 8, 4]"), "{e}");
    let narrow = d.empty(&[5, 3], DType::F32).unwrap();
    assert!(prepend_forward(d, &d.empty(&[2, 8, 4], DType::F32).unwrap(), &x, &narrow).is_err());
    assert!(prepend_backward_input(d, &x, &d.empty(&[2, 2, 4], DType::F32).unwrap()).is_err());
    assert!(prepend_backward_weight(d, &rows, &d.empty(&[2, 4, 4], DType::F32).unwrap(), false).is_err());
    let half = d.empty(&[5, 4], DType::F16).unwrap();
    assert!(prepend_forward(d, &d.empty(&[2, 8, 4], DType::F32).unwrap(), &x, &half).is_err());
}

/// naga validation of this family's specializations (the shared test covers all files; this one runs alone).
#[test]
fn prepend_shaders_validate() {
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
