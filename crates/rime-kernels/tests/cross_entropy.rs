mod common;
use common::*;
use rime_kernels::ops::cross_entropy::*;
use rime_kernels::ops::reduce::RowVariant;
use rime_kernels::{reference::cross_entropy as r, DType, Device, Tensor};

fn variants(d: &Device) -> Vec<RowVariant> {
    let mut v = vec![RowVariant::for_device(d), RowVariant::Shared(8), RowVariant::Shared(256)];
    v.dedup();
    v
}

const IGNORE: i32 = -100;
/// Odd V runs f32 elements, V a multiple of 4 vec4.
const SHAPES: &[(usize, usize)] =
    &[(1, 1), (3, 17), (17, 3), (5, 127), (4, 4099), (130, 33), (1, 4), (3, 128), (4, 4096)];

fn up(x: &[f32], shape: &[usize]) -> Tensor {
    dev().upload_f32(x, shape).unwrap()
}
fn up_i32(x: &[i32]) -> Tensor {
    dev().upload_bytes("targets", bytemuck::cast_slice(x), &[x.len()], DType::I32).unwrap()
}
fn get(t: &Tensor) -> Vec<f32> {
    dev().download_f32(t).unwrap()
}
fn empty(shape: &[usize]) -> Tensor {
    dev().empty(shape, DType::F32).unwrap()
}

/// Targets with every third row ignored (unless there is only one row).
fn targets(n: usize, v: usize, seed: u64) -> Vec<i32> {
    let mut r = rng(seed);
    (0..n).map(|i| if n > 1 && i % 3 == 1 { IGNORE } else { rand::Rng::random_range(&mut r, 0..v as i32) }).collect()
}

#[test]
fn cross_entropy_matches_reference() {
    let d = dev();
    for rv in variants(d) {
        for &(n, v) in SHAPES {
            let x = randn((n * v) as u64, n * v, 8.0);
            let t = targets(n, v, 3);
            let (loss, lse) = (empty(&[1]), empty(&[n]));
            d.run(&cross_entropy_forward_with(d, rv, &loss, &lse, &up(&x, &[n, v]), &up_i32(&t), IGNORE).unwrap())
                .unwrap();
            let (wl, wlse) = r::cross_entropy_forward(&x, &t, v, IGNORE);
            let what = format!("cross_entropy {rv:?} {n}x{v}");
            assert_close(&(what.clone() + " lse"), &get(&lse), &wlse, 1e-5, 1e-6);
            assert_close(&(what + " loss"), &get(&loss), &[wl], 1e-5, 1e-5);
        }
    }
}

#[test]
fn cross_entropy_all_ignored_is_zero() {
    let d = dev();
    let (loss, lse) = (empty(&[1]), empty(&[3]));
    let x = up(&randn(1, 12, 1.0), &[3, 4]);
    d.run(&cross_entropy_forward(d, &loss, &lse, &x, &up_i32(&[IGNORE; 3]), IGNORE).unwrap()).unwrap();
    assert_eq!(get(&loss), vec![0.0]);
    let dl = empty(&[3, 4]);
    d.run(&cross_entropy_backward(d, &dl, &up(&[1.0], &[1]), &x, &lse, &up_i32(&[IGNORE; 3]), IGNORE).unwrap())
        .unwrap();
    assert_eq!(get(&dl), vec![0.0; 12]);
}

#[test]
fn cross_entropy_out_of_range_target_gives_nan_loss() {
    let d = dev();
    let (loss, lse) = (empty(&[1]), empty(&[2]));
    let x = up(&randn(2, 8, 1.0), &[2, 4]);
    d.run(&cross_entropy_forward(d, &loss, &lse, &x, &up_i32(&[1, 4]), IGNORE).unwrap()).unwrap();
    assert!(get(&loss)[0].is_nan());
}

#[test]
fn cross_entropy_backward_matches_reference() {
    let d = dev();
    for rv in variants(d) {
        for &(n, v) in SHAPES {
            let x = randn((n * v) as u64 + 1, n * v, 8.0);
            let t = targets(n, v, 4);
            let (_, lse) = r::cross_entropy_forward(&x, &t, v, IGNORE);
            let dl = empty(&[n, v]);
            let ds = cross_entropy_backward_with(
                d,
                rv,
                &dl,
                &up(&[0.7], &[1]),
                &up(&x, &[n, v]),
                &up(&lse, &[n]),
                &up_i32(&t),
                IGNORE,
            );
            d.run(&ds.unwrap()).unwrap();
            let want = r::cross_entropy_backward(0.7, &x, &lse, &t, v, IGNORE);
            assert_close(&format!("cross_entropy backward {rv:?} {n}x{v}"), &get(&dl), &want, 1e-6, 1e-5);
        }
    }
}

#[test]
fn cross_entropy_backward_matches_finite_differences() {
    // d loss / d logits = (softmax - onehot) / kept rows, ignored rows 0.
    let (n, v) = (4, 6);
    let x = randn(5, n * v, 3.0);
    let t = targets(n, v, 6);
    let (_, lse) = r::cross_entropy_forward(&x, &t, v, IGNORE);
    let fd = finite_diff(&x, 1e-2, |xx| r::cross_entropy_forward(xx, &t, v, IGNORE).0 as f64);
    assert_close(
        "cross_entropy backward vs fd",
        &r::cross_entropy_backward(1.0, &x, &lse, &t, v, IGNORE),
        &fd,
        2e-3,
        2e-3,
    );
}

#[test]
fn cross_entropy_rejects_bad_shapes() {
    let d = dev();
    let x = empty(&[3, 5]);
    let e =
        cross_entropy_forward(d, &empty(&[1]), &empty(&[3]), &x, &up_i32(&[0, 1]), IGNORE).err().unwrap().to_string();
    assert!(e.contains("cross_entropy_forward") && e.contains("targets"), "{e}");
    let u = d.upload_u32(&[0, 1, 2], &[3]).unwrap();
    assert!(cross_entropy_forward(d, &empty(&[1]), &empty(&[3]), &x, &u, IGNORE).is_err());
    assert!(cross_entropy_forward(d, &empty(&[2]), &empty(&[3]), &x, &up_i32(&[0, 1, 2]), IGNORE).is_err());
    assert!(cross_entropy_backward(d, &empty(&[5, 3]), &empty(&[1]), &x, &empty(&[3]), &up_i32(&[0, 1, 2]), IGNORE)
        .is_err());
}

/// naga validation of this family's specializations (the shared test covers all files; this one runs alone).
#[test]
fn cross_entropy_shaders_validate() {
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
