mod common;
use common::*;
use rime_kernels::ops::patch::*;
use rime_kernels::{reference::patch as r, DType, Tensor};

fn get(t: &Tensor) -> Vec<f32> {
    dev().download_f32(t).unwrap()
}

/// (B, C, H, W, p): odd sizes, several C and p, one patch, a border that Conv2d drops (H or W not a multiple
/// of p), a grid larger than one workgroup.
const SHAPES: &[(usize, usize, usize, usize, usize)] = &[
    (1, 1, 1, 1, 1),
    (2, 3, 4, 4, 2),
    (1, 3, 9, 15, 3),
    (3, 1, 7, 5, 5),
    (2, 5, 11, 13, 4),
    (1, 2, 16, 16, 16),
    (2, 3, 32, 24, 8),
];

#[test]
fn patch_unfold_matches_reference() {
    let d = dev();
    for &(b, c, h, w, p) in SHAPES {
        let x = randn(1, b * c * h * w, 1.0);
        let shape = unfolded_shape(&[b, c, h, w], p).unwrap();
        assert_eq!(shape, [b, (h / p) * (w / p), c * p * p]);
        let out = d.upload_f32(&randn(2, shape.iter().product(), 1.0), &shape).unwrap(); // overwritten
        d.run(&patch_unfold(d, &out, &d.upload_f32(&x, &[b, c, h, w]).unwrap(), p).unwrap()).unwrap();
        // a permutation: exact
        let what = format!("patch_unfold {b}x{c}x{h}x{w} p={p}");
        assert_close(&what, &get(&out), &r::patch_unfold(&x, b, c, h, w, p), 0.0, 0.0);
    }
}

#[test]
fn patch_unfold_backward_matches_reference() {
    let d = dev();
    for &(b, c, h, w, p) in SHAPES {
        let shape = unfolded_shape(&[b, c, h, w], p).unwrap();
        let g = randn(3, shape.iter().product(), 1.0);
        let dx = d.upload_f32(&randn(4, b * c * h * w, 1.0), &[b, c, h, w]).unwrap(); // overwritten
        d.run(&patch_unfold_backward(d, &dx, &d.upload_f32(&g, &shape).unwrap(), p).unwrap()).unwrap();
        let what = format!("patch_unfold_backward {b}x{c}x{h}x{w} p={p}");
        assert_close(&what, &get(&dx), &r::patch_unfold_backward(&g, b, c, h, w, p), 0.0, 0.0);
    }
}

#[test]
fn the_reference_is_a_permutation_and_its_backward_the_inverse() {
    // Distinct values: every x element lands in the output exactly once when p divides H and W.
    let (b, c, h, w, p) = (2, 3, 6, 9, 3);
    let x: Vec<f32> = (0..b * c * h * w).map(|i| i as f32).collect();
    let u = r::patch_unfold(&x, b, c, h, w, p);
    let mut sorted = u.clone();
    sorted.sort_by(f32::total_cmp);
    assert_eq!(sorted, x);
    assert_eq!(r::patch_unfold_backward(&u, b, c, h, w, p), x);
    // Patch 1 of image 0 starts at column p of row 0, channel 0; its second element is the next column.
    let k = c * p * p;
    assert_eq!((u[k], u[k + 1], u[k + p]), (p as f32, (p + 1) as f32, (w + p) as f32));
}

fn err(r: rime_kernels::Result<Vec<rime_kernels::Dispatch>>) -> String {
    match r {
        Ok(_) => panic!("accepted a bad shape"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn patch_unfold_rejects_bad_shapes() {
    let d = dev();
    let x = d.empty(&[1, 3, 4, 4], DType::F32).unwrap();
    let bad_out = d.empty(&[1, 4, 11], DType::F32).unwrap();
    let e = err(patch_unfold(d, &bad_out, &x, 2));
    assert!(e.contains("patch_unfold") && e.contains("[1, 4, 12]"), "{e}");
    let e = err(patch_unfold(d, &bad_out, &x, 5));
    assert!(e.contains("patch size 5"), "{e}");
    let flat = d.empty(&[3, 16], DType::F32).unwrap();
    assert!(err(patch_unfold_backward(d, &flat, &bad_out, 2)).contains("[B, C, H, W]"));
}
