//! Launchers for shaders/convert.wgsl: f16/bf16 storage <-> f32 compute.

use super::{grid_1d, words};
use crate::error::Result;
use crate::guard::{dtype_err, expect_f32, expect_same_numel, index_u32};
use crate::{DType, Device, Dispatch, Spec, Tensor};

const FILE: &str = "convert.wgsl";
const WG: u32 = 64;

pub fn specs() -> Vec<(&'static str, Spec)> {
    vec![(FILE, spec())]
}

fn spec() -> Spec {
    Spec::new().constant("WG", WG as f64)
}

fn launch(dev: &Device, entry: &'static str, n: usize, bindings: &[(u32, &Tensor)]) -> Result<Dispatch> {
    let n = index_u32(entry, "the element count", n)?;
    dev.dispatch(FILE, entry, &spec(), Some(&words(&[n, 0, 0, 0])), bindings, grid_1d(n.div_ceil(2).div_ceil(WG)))
}

/// out (f32) = src (f16 or bf16), element for element.
pub fn convert_to_f32_forward(dev: &Device, out: &Tensor, src: &Tensor) -> Result<Vec<Dispatch>> {
    const OP: &str = "convert_to_f32_forward";
    expect_same_numel(OP, &[("src", src), ("out", out)])?;
    expect_f32(OP, "out", out)?;
    let entry = match src.dtype {
        DType::F16 => "convert_f16_to_f32_forward",
        DType::BF16 => "convert_bf16_to_f32_forward",
        _ => return Err(dtype_err(OP, "src", src, &[DType::F16, DType::BF16])),
    };
    Ok(vec![launch(dev, entry, src.numel(), &[(1, src), (2, out)])?])
}

/// out (f16 or bf16) = src (f32), rounding to nearest even.
pub fn convert_from_f32_forward(dev: &Device, out: &Tensor, src: &Tensor) -> Result<Vec<Dispatch>> {
    const OP: &str = "convert_from_f32_forward";
    expect_same_numel(OP, &[("src", src), ("out", out)])?;
    expect_f32(OP, "src", src)?;
    let entry = match out.dtype {
        DType::F16 => "convert_f32_to_f16_forward",
        DType::BF16 => "convert_f32_to_bf16_forward",
        _ => return Err(dtype_err(OP, "out", out, &[DType::F16, DType::BF16])),
    };
    Ok(vec![launch(dev, entry, src.numel(), &[(3, src), (4, out)])?])
}
