mod common;
use common::*;
use half::{bf16, f16};
use rime_kernels::{ops::convert::*, reference::convert as r, DType};

#[test]
fn convert_roundtrip_matches_reference() {
    let d = dev();
    for &n in &[1usize, 3, 17, 127, 4096 + 3] {
        let x = randn(n as u64, n, 70000.0 / (n as f32)); // odd sizes, values spanning f16's range
        let src = d.upload_f32(&x, &[n]).unwrap();
        // f32 -> f16 -> f32
        let h = d.empty(&[n], DType::F16).unwrap();
        let back = d.empty(&[n], DType::F32).unwrap();
        let mut ds = convert_from_f32_forward(d, &h, &src).unwrap();
        ds.extend(convert_to_f32_forward(d, &back, &h).unwrap());
        d.run(&ds).unwrap();
        let want: Vec<f32> = r::convert_to_f32_forward_f16(&r::convert_from_f32_forward_f16(&x));
        assert_close("f16 roundtrip", &d.download_f32(&back).unwrap(), &want, 0.0, 0.0);
        // f32 -> bf16 -> f32
        let b = d.empty(&[n], DType::BF16).unwrap();
        let mut ds = convert_from_f32_forward(d, &b, &src).unwrap();
        ds.extend(convert_to_f32_forward(d, &back, &b).unwrap());
        d.run(&ds).unwrap();
        let want: Vec<f32> = r::convert_to_f32_forward_bf16(&r::convert_from_f32_forward_bf16(&x));
        assert_close("bf16 roundtrip", &d.download_f32(&back).unwrap(), &want, 0.0, 0.0);
    }
}

#[test]
fn convert_uploaded_half_matches_reference() {
    let d = dev();
    let x = randn(7, 33, 3.0);
    let hf: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let bf: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let out = d.empty(&[33], DType::F32).unwrap();
    d.run(&convert_to_f32_forward(d, &out, &d.upload_f16(&hf, &[33]).unwrap()).unwrap()).unwrap();
    assert_close("f16 upload", &d.download_f32(&out).unwrap(), &r::convert_to_f32_forward_f16(&hf), 0.0, 0.0);
    d.run(&convert_to_f32_forward(d, &out, &d.upload_bf16(&bf, &[33]).unwrap()).unwrap()).unwrap();
    assert_close("bf16 upload", &d.download_f32(&out).unwrap(), &r::convert_to_f32_forward_bf16(&bf), 0.0, 0.0);
}

#[test]
fn convert_rejects_wrong_dtype_and_shape() {
    let d = dev();
    let a = d.empty(&[4], DType::F32).unwrap();
    let b = d.empty(&[5], DType::F16).unwrap();
    assert!(convert_to_f32_forward(d, &a, &a).is_err());
    let e = convert_from_f32_forward(d, &b, &a).err().unwrap().to_string();
    assert!(e.contains("element counts"), "{e}");
}
