//! Launchers for shaders/convert.wgsl: f16/bf16 storage <-> f32 compute.

use super::{grid_1d, words};
use crate::error::{Error, Result};
use crate::{DType, Device, Dispatch, Spec, Tensor};

const FILE: &str = "convert.wgsl";
const WG: u32 = 64;

pub fn specs() -> Vec<(&'static str, Spec)> {
    vec![(FILE, spec())]
}

fn spec() -> Spec {
    Spec::new().constant("WG", WG as f64)
}

fn launch(dev: &Device, entry: &str, n: usize, bindings: &[(u32, &Tensor)]) -> Result<Dispatch> {
    let words_needed = n.div_ceil(2) as u32;
    dev.dispatch(FILE, entry, &spec(), Some(&words(&[n as u32, 0, 0, 0])), bindings, grid_1d(words_needed.div_ceil(WG)))
}

fn check(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.numel() != b.numel() {
        return Err(Error::Shape { op, msg: format!("{:?} -> {:?}: element counts differ", a.shape, b.shape) });
    }
    Ok(())
}

/// out (f32) = src (f16 or bf16), element for element.
pub fn convert_to_f32_forward(dev: &Device, out: &Tensor, src: &Tensor) -> Result<Vec<Dispatch>> {
    check("convert_to_f32_forward", src, out)?;
    if out.dtype != DType::F32 {
        return Err(Error::DType { op: "convert_to_f32_forward", got: out.dtype, expected: "F32 output" });
    }
    let entry = match src.dtype {
        DType::F16 => "convert_f16_to_f32_forward",
        DType::BF16 => "convert_bf16_to_f32_forward",
        d => return Err(Error::DType { op: "convert_to_f32_forward", got: d, expected: "F16 or BF16 input" }),
    };
    Ok(vec![launch(dev, entry, src.numel(), &[(1, src), (2, out)])?])
}

/// out (f16 or bf16) = src (f32), rounding to nearest even.
pub fn convert_from_f32_forward(dev: &Device, out: &Tensor, src: &Tensor) -> Result<Vec<Dispatch>> {
    check("convert_from_f32_forward", src, out)?;
    if src.dtype != DType::F32 {
        return Err(Error::DType { op: "convert_from_f32_forward", got: src.dtype, expected: "F32 input" });
    }
    let entry = match out.dtype {
        DType::F16 => "convert_f32_to_f16_forward",
        DType::BF16 => "convert_f32_to_bf16_forward",
        d => return Err(Error::DType { op: "convert_from_f32_forward", got: d, expected: "F16 or BF16 output" }),
    };
    Ok(vec![launch(dev, entry, src.numel(), &[(3, src), (4, out)])?])
}
