mod common;
use common::*;
use rime_kernels::ops::reduce::*;
use rime_kernels::{reference::reduce as r, DType, Device};

/// Every row variant this device can run (the automatic choice first).
fn variants(d: &Device) -> Vec<RowVariant> {
    let mut v = vec![RowVariant::for_device(d), RowVariant::Shared(8), RowVariant::Shared(256)];
    v.dedup();
    v
}

/// N a multiple of 4 runs vec4 elements, odd N f32.
const SHAPES: &[(usize, usize)] = &[(1, 1), (3, 17), (17, 127), (5, 1000), (127, 3), (2, 4099), (1, 4), (9, 768)];

#[test]
fn sum_matches_reference() {
    let d = dev();
    for v in variants(d) {
        for &(rows, n) in SHAPES {
            let x = randn((rows * n) as u64, rows * n, 1.0);
            let xt = d.upload_f32(&x, &[rows, n]).unwrap();
            for mean in [false, true] {
                let out = d.empty(&[rows], DType::F32).unwrap();
                d.run(&sum_forward_with(d, v, &out, &xt, mean).unwrap()).unwrap();
                let want = r::sum_forward(&x, n, mean);
                assert_close(
                    &format!("sum {v:?} {rows}x{n} mean={mean}"),
                    &d.download_f32(&out).unwrap(),
                    &want,
                    1e-5 * (n as f32).sqrt(),
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn sum_rows_matches_reference() {
    let d = dev();
    for v in variants(d) {
        for &(rows, n) in SHAPES {
            let x = randn(1 + (rows * n) as u64, rows * n, 1.0);
            let xt = d.upload_f32(&x, &[rows, n]).unwrap();
            let prev = randn(9, n, 1.0);
            for (mean, acc) in [(false, false), (true, false), (false, true), (true, true)] {
                let out = d.upload_f32(&prev, &[n]).unwrap();
                d.run(&sum_rows_forward_with(d, v, &out, &xt, mean, acc).unwrap()).unwrap();
                let want = r::sum_rows_forward(&x, n, mean, acc.then_some(&prev[..]));
                let tol = 1e-5 * (rows as f32).sqrt();
                assert_close(
                    &format!("sum_rows {v:?} {rows}x{n} mean={mean} acc={acc}"),
                    &d.download_f32(&out).unwrap(),
                    &want,
                    tol,
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn sum_rejects_bad_shapes() {
    let d = dev();
    let x = d.empty(&[4, 6], DType::F32).unwrap();
    let e = sum_forward(d, &d.empty(&[5], DType::F32).unwrap(), &x, false).err().unwrap().to_string();
    assert!(e.contains("sum_forward") && e.contains("[4, 6]"), "{e}");
    let e = sum_rows_forward(d, &d.empty(&[4], DType::F32).unwrap(), &x, false, false).err().unwrap().to_string();
    assert!(e.contains("sum_rows_forward"), "{e}");
    assert!(sum_forward(d, &d.empty(&[4], DType::U32).unwrap(), &x, false).is_err());
}

#[test]
fn row_variant_on_lavapipe_is_one_subgroup_per_row() {
    let d = dev();
    let info = d.info();
    if d.is_cpu() && d.has_subgroups() && info.subgroup_min_size == info.subgroup_max_size {
        assert_eq!(RowVariant::for_device(d), RowVariant::Lanes(info.subgroup_min_size));
    }
    // A lanes variant that does not match the subgroup size is refused, not run wrongly.
    let x = d.empty(&[2, 3], DType::F32).unwrap();
    let out = d.empty(&[2], DType::F32).unwrap();
    assert!(sum_forward_with(d, RowVariant::Lanes(64), &out, &x, false).is_err());
    assert!(sum_forward_with(d, RowVariant::Shared(12), &out, &x, false).is_err());
}

/// naga validation of this family's specializations (the shared test covers all files; this one runs alone).
#[test]
fn reduce_shaders_validate() {
    validate(&specs());
}

fn validate(specs: &[(&'static str, rime_kernels::Spec)]) {
    for (file, spec) in specs {
        let src = rime_kernels::shaders::source_with_prelude(file, &spec.prelude).unwrap();
        let module =
            naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| panic!("{file}: {}", e.emit_to_string(&src)));
        let mut v = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all());
        let info = v.validate(&module).unwrap_or_else(|e| panic!("{file} ({spec:?}) invalid: {e:?}"));
        let consts: naga::back::PipelineConstants = spec.constants.iter().map(|(k, v)| (k.clone(), *v)).collect();
        naga::back::pipeline_constants::process_overrides(&module, &info, None, &consts).unwrap();
    }
}
