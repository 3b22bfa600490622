mod common;
use common::*;
use rime_kernels::ops::rope::*;
use rime_kernels::{reference::rope as r, DType, Tensor};

fn get(t: &Tensor) -> Vec<f32> {
    dev().download_f32(t).unwrap()
}

/// [B, T, NH, HS] shapes: tiny, odd T/NH, Llama-like head sizes.
const SHAPES: &[[usize; 4]] = &[[1, 1, 1, 2], [2, 3, 5, 8], [1, 17, 3, 64], [2, 5, 2, 128], [1, 3, 1, 510]];

#[test]
fn rope_matches_reference() {
    // Positions up to ~4100 make angles of thousands of radians: the range reduction keeps the GPU within
    // 2e-6 of sin/cos evaluated in f64 at the same f32 angle.
    let d = dev();
    for &shape in SHAPES {
        let [_, t, nh, hs] = shape;
        let n: usize = shape.iter().product();
        let x = randn(n as u64, n, 2.0);
        let xt = d.upload_f32(&x, &shape).unwrap();
        let out = d.empty(&shape, DType::F32).unwrap();
        for (pos, theta) in [(0u32, 10000.0f32), (4093, 10000.0), (7, 500000.0)] {
            d.run(&rope_forward(d, &out, &xt, pos, theta).unwrap()).unwrap();
            let what = format!("rope {shape:?} pos={pos} theta={theta}");
            assert_close(&what, &get(&out), &r::rope_forward(&x, t, nh, hs, pos, theta), 2e-6, 1e-6);
            d.run(&rope_backward(d, &out, &xt, pos, theta).unwrap()).unwrap();
            assert_close(&(what + " backward"), &get(&out), &r::rope_backward(&x, t, nh, hs, pos, theta), 2e-6, 1e-6);
        }
    }
}

#[test]
fn rope_uses_rotate_half_layout() {
    // HS = 4, position 1, inv_freq = [1, 0.01]: x = e0 -> (cos 1, 0, sin 1, 0) as in HF's
    // q * cos + rotate_half(q) * sin; the interleaved layout would put sin 1 at index 1.
    let d = dev();
    let x = d.upload_f32(&[1.0, 0.0, 0.0, 0.0], &[1, 1, 1, 4]).unwrap();
    let out = d.empty(&[1, 1, 1, 4], DType::F32).unwrap();
    d.run(&rope_forward(d, &out, &x, 1, 10000.0).unwrap()).unwrap();
    assert_close("rotate_half", &get(&out), &[1f32.cos(), 0.0, 1f32.sin(), 0.0], 1e-6, 0.0);
    assert_eq!(inv_freq(4, 10000.0), vec![1.0, 0.01]);
}

#[test]
fn rope_backward_matches_finite_differences() {
    // RoPE is a rotation (linear): d/dx sum(g * rope(x)) = rope^T g = rope_backward(g).
    let (t, nh, hs) = (3, 2, 6);
    let x = randn(1, 2 * t * nh * hs, 1.0);
    let g = randn(2, x.len(), 1.0);
    let loss = |xx: &[f32]| {
        r::rope_forward(xx, t, nh, hs, 5, 10000.0).iter().zip(&g).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()
    };
    let fd = finite_diff(&x, 1e-2, loss);
    assert_close("rope backward vs fd", &r::rope_backward(&g, t, nh, hs, 5, 10000.0), &fd, 1e-4, 1e-4);
}

#[test]
fn rope_rejects_bad_shapes() {
    let d = dev();
    let odd = d.empty(&[1, 2, 3, 5], DType::F32).unwrap();
    let e = rope_forward(d, &odd, &odd, 0, 10000.0).err().unwrap().to_string();
    assert!(e.contains("rope_forward") && e.contains("head size 5"), "{e}");
    let x3 = d.empty(&[2, 3, 4], DType::F32).unwrap();
    assert!(rope_forward(d, &x3, &x3, 0, 10000.0).is_err());
    let x = d.empty(&[1, 2, 3, 4], DType::F32).unwrap();
    assert!(rope_backward(d, &d.empty(&[1, 2, 3, 8], DType::F32).unwrap(), &x, 0, 10000.0).is_err());
    assert!(rope_forward(d, &x, &x, 0, 0.5).is_err());
    let big = d.empty(&[1, 1, 1, 1024], DType::F32).unwrap();
    assert!(rope_forward(d, &big, &big, 0, 10000.0).is_err());
}

/// naga validation of this family's specializations (the shared test covers all files; this one runs alone).
#[test]
fn rope_shaders_validate() {
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

#[test]
fn rope_at_reads_the_position_when_it_runs_and_equals_rope_at_that_position() {
    // One set of dispatches, replayed with the position buffer rewritten: bit-identical to rope_forward /
    // rope_backward built with that position as a constant, and within 2e-6 of the reference.
    let d = dev();
    for &shape in SHAPES {
        let [_, t, nh, hs] = shape;
        let n: usize = shape.iter().product();
        let x = randn(n as u64 + 1, n, 2.0);
        let xt = d.upload_f32(&x, &shape).unwrap();
        let (out, want) = (d.empty(&shape, DType::F32).unwrap(), d.empty(&shape, DType::F32).unwrap());
        let pos = d.upload_u32(&[0], &[1]).unwrap();
        let fwd = rope_forward_at(d, &out, &xt, &pos, 10000.0).unwrap();
        let bwd = rope_backward_at(d, &out, &xt, &pos, 10000.0).unwrap();
        for p in [0u32, 1, 37, 4093] {
            d.queue().write_buffer(&pos.buffer, 0, bytemuck::cast_slice(&[p]));
            d.run(&fwd).unwrap();
            d.run(&rope_forward(d, &want, &xt, p, 10000.0).unwrap()).unwrap();
            let what = format!("rope_forward_at {shape:?} pos={p}");
            assert_eq!(get(&out), get(&want), "{what}: differs from rope_forward");
            assert_close(&what, &get(&out), &r::rope_forward_at(&x, t, nh, hs, &[p], 10000.0), 2e-6, 1e-6);
            d.run(&bwd).unwrap();
            d.run(&rope_backward(d, &want, &xt, p, 10000.0).unwrap()).unwrap();
            assert_eq!(get(&out), get(&want), "rope_backward_at {shape:?} pos={p}: differs from rope_backward");
            assert_close(&what, &get(&out), &r::rope_backward_at(&x, t, nh, hs, &[p], 10000.0), 2e-6, 1e-6);
        }
    }
    let x = d.empty(&[1, 2, 1, 4], DType::F32).unwrap();
    let bad = d.upload_f32(&[3.0], &[1]).unwrap();
    match rope_forward_at(d, &x, &x, &bad, 10000.0) {
        Ok(_) => panic!("accepted an f32 position"),
        Err(e) => assert!(e.to_string().contains("must be one U32"), "{e}"),
    }
}
