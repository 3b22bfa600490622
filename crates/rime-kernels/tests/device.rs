//! Device-level behaviour: adapter choice by name, oversize tensors refused clearly, uploads and reshapes
//! that do not fit their shape.

mod common;
use common::*;
use rime_kernels::{DType, Device, DeviceOptions, Error};

#[test]
fn unknown_adapter_name_lists_the_adapters_seen() {
    let e = Device::new(&DeviceOptions { adapter: Some("no-such-gpu-xyz".into()) }).err().expect("must fail");
    let msg = e.to_string();
    assert!(matches!(e, Error::AdapterNotFound { .. }), "{msg}");
    assert!(msg.contains("no-such-gpu-xyz") && msg.contains("the requested GPU name"), "{msg}");
    assert!(!msg.contains("--"), "a library message names no CLI flag: {msg}");
    assert!(msg.contains(&dev().info().name), "the message lists the adapters seen: {msg}");
}

#[test]
fn adapter_chosen_by_name_substring() {
    let name = dev().info().name.clone();
    let part: String = name.chars().take(4).collect::<String>().to_uppercase();
    let d = Device::new(&DeviceOptions { adapter: Some(part) }).unwrap();
    assert_eq!(d.info().name, name);
}

#[test]
fn tensors_beyond_the_binding_limit_are_refused_with_a_clear_error() {
    let d = dev();
    let n = (d.max_binding() / 4 + 1) as usize;
    let e = d.empty(&[n], DType::F32).expect_err("must be refused");
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("max storage binding"), "{e}");
}

#[test]
fn upload_and_reshape_check_element_counts() {
    let d = dev();
    assert!(d.upload_f32(&[1.0, 2.0, 3.0], &[2, 2]).is_err());
    let t = d.upload_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap();
    assert!(t.reshape(&[4, 2]).is_err());
    let r = t.reshape(&[3, 2]).unwrap();
    assert_eq!(d.download_f32(&r).unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    // f16 with an odd element count round-trips through its padded buffer.
    let h: Vec<half::f16> = (0..5).map(|i| half::f16::from_f32(i as f32)).collect();
    let th = d.upload_f16(&h, &[5]).unwrap();
    assert_eq!(d.download_bytes(&th).unwrap().len(), 10);
}
