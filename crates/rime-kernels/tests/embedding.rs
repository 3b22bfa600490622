mod common;
use common::*;
use half::{bf16, f16};
use rime_kernels::ops::embedding::*;
use rime_kernels::{reference::embedding as r, DType, Tensor};

fn get(t: &Tensor) -> Vec<f32> {
    dev().download_f32(t).unwrap()
}

/// (N, V, C): odd sizes, an odd C so f16/bf16 rows start mid-word.
const SHAPES: &[(usize, usize, usize)] = &[(1, 1, 1), (3, 5, 17), (17, 4, 3), (127, 33, 8), (9, 2, 1031)];

/// Ids with repeats and one out-of-range id (row of zeros / skipped in backward).
fn ids(n: usize, v: usize, seed: u64) -> Vec<u32> {
    let mut r = rng(seed);
    (0..n)
        .map(|i| if i == n / 2 && n > 2 { v as u32 + 3 } else { rand::Rng::random_range(&mut r, 0..v as u32) })
        .collect()
}

#[test]
fn embedding_matches_reference() {
    let d = dev();
    for &(n, v, c) in SHAPES {
        let table = randn((v * c) as u64, v * c, 2.0);
        let id = ids(n, v, 1);
        let idt = d.upload_u32(&id, &[n]).unwrap();
        let out = d.empty(&[n, c], DType::F32).unwrap();
        // f32 table
        d.run(&embedding_forward(d, &out, &idt, &d.upload_f32(&table, &[v, c]).unwrap()).unwrap()).unwrap();
        assert_close(
            &format!("embedding f32 {n}x{v}x{c}"),
            &get(&out),
            &r::embedding_forward(&id, &table, c),
            0.0,
            0.0,
        );
        // f16 and bf16 tables: exactly the rounded values.
        let h: Vec<f16> = table.iter().map(|&x| f16::from_f32(x)).collect();
        d.run(&embedding_forward(d, &out, &idt, &d.upload_f16(&h, &[v, c]).unwrap()).unwrap()).unwrap();
        let hf: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
        assert_close(&format!("embedding f16 {n}x{v}x{c}"), &get(&out), &r::embedding_forward(&id, &hf, c), 0.0, 0.0);
        let b: Vec<bf16> = table.iter().map(|&x| bf16::from_f32(x)).collect();
        d.run(&embedding_forward(d, &out, &idt, &d.upload_bf16(&b, &[v, c]).unwrap()).unwrap()).unwrap();
        let bf: Vec<f32> = b.iter().map(|x| x.to_f32()).collect();
        assert_close(&format!("embedding bf16 {n}x{v}x{c}"), &get(&out), &r::embedding_forward(&id, &bf, c), 0.0, 0.0);
    }
}

#[test]
fn embedding_backward_matches_reference() {
    let d = dev();
    for &(n, v, c) in SHAPES {
        let id = ids(n, v, 2);
        let g = randn(3, n * c, 1.0);
        let prev = randn(4, v * c, 1.0);
        for acc in [false, true] {
            let dt = d.upload_f32(&prev, &[v, c]).unwrap();
            let ds =
                embedding_backward(d, &dt, &d.upload_f32(&g, &[n, c]).unwrap(), &d.upload_u32(&id, &[n]).unwrap(), acc);
            d.run(&ds.unwrap()).unwrap();
            let base = if acc { prev.clone() } else { vec![0.0; v * c] };
            let want = r::embedding_backward(&g, &id, &base, c);
            // Same order of additions as the reference (ids in order), so only the f32 rounding differs.
            assert_close(&format!("embedding backward {n}x{v}x{c} acc={acc}"), &get(&dt), &want, 1e-6, 1e-6);
        }
    }
}

#[test]
fn embedding_backward_matches_finite_differences() {
    // L = sum(g * table[ids]); dL/dtable[v] = sum of g rows whose id is v (a linear map).
    let (n, v, c) = (6, 3, 4);
    let id = ids(n, v, 5);
    let table = randn(6, v * c, 1.0);
    let g = randn(7, n * c, 1.0);
    let loss =
        |t: &[f32]| r::embedding_forward(&id, t, c).iter().zip(&g).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
    let fd = finite_diff(&table, 1e-2, loss);
    assert_close("embedding backward vs fd", &r::embedding_backward(&g, &id, &vec![0.0; v * c], c), &fd, 1e-4, 1e-4);
}

#[test]
fn embedding_rejects_bad_shapes() {
    let d = dev();
    let table = d.empty(&[5, 4], DType::F32).unwrap();
    let idt = d.upload_u32(&[0, 1, 2], &[3]).unwrap();
    let e = embedding_forward(d, &d.empty(&[3, 5], DType::F32).unwrap(), &idt, &table).err().unwrap().to_string();
    assert!(e.contains("embedding_forward") && e.contains("[3, 5]"), "{e}");
    let f = d.empty(&[3], DType::F32).unwrap();
    assert!(embedding_forward(d, &d.empty(&[3, 4], DType::F32).unwrap(), &f, &table).is_err());
    assert!(embedding_backward(d, &table, &d.empty(&[2, 4], DType::F32).unwrap(), &idt, false).is_err());
    assert!(embedding_backward(
        d,
        &d.empty(&[5, 4], DType::F16).unwrap(),
        &d.empty(&[3, 4], DType::F32).unwrap(),
        &idt,
        false
    )
    .is_err());
}

/// naga validation of this family's specializations (the shared test covers all files; this one runs alone).
#[test]
fn embedding_shaders_validate() {
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
