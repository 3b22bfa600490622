//! Launchers for shaders/dora.wgsl: DoRA's per-output-feature scale g = m / ||W + s·B·A||_row (the norm
//! detached, as peft does) and the magnitude's gradient dm = dg / norm.

use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::guard::{expect_f32, expect_f32_shape, index_u32};
use crate::{Device, Dispatch, Spec, Tensor};

const FILE: &str = "dora.wgsl";
const WG: u32 = 64;

pub fn specs() -> Vec<(&'static str, Spec)> {
    vec![(FILE, spec())]
}

fn spec() -> Spec {
    Spec::new().constant("WG", WG as f64)
}

/// g \[OC] = m / norm, norm \[OC] = ||W + scale·B·A|| over each row (saved for the backward).
/// w: [OC, C] (f32); a: [R, C]; b: [OC, R]; m: \[OC].
#[allow(clippy::too_many_arguments)]
pub fn dora_scale_forward(
    dev: &Device,
    g: &Tensor,
    norm: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    m: &Tensor,
    scale: f32,
) -> Result<Vec<Dispatch>> {
    let op = "dora_scale_forward";
    expect_f32(op, "w", w)?;
    if w.rank() != 2 || a.rank() != 2 {
        return Err(shape_err(op, format!("w {:?} must be [OC, C] and a {:?} [R, C]", w.shape, a.shape)));
    }
    let (oc, c, r) = (w.shape[0], w.shape[1], a.shape[0]);
    if oc == 0 || c == 0 || r == 0 {
        return Err(shape_err(op, format!("empty operand: w {:?}, a {:?}", w.shape, a.shape)));
    }
    expect_f32_shape(op, "a", a, &[r, c])?;
    expect_f32_shape(op, "b", b, &[oc, r])?;
    for (name, t) in [("m", m), ("g", g), ("norm", norm)] {
        expect_f32_shape(op, name, t, &[oc])?;
    }
    index_u32(op, "numel", w.numel().max(a.numel()).max(b.numel()))?;
    let wd = words(&[oc as u32, c as u32, r as u32, scale.to_bits(), 0, 0, 0, 0]);
    let bind = [(1, w), (2, a), (3, b), (4, m), (5, g), (6, norm)];
    Ok(vec![dev.dispatch(FILE, op, &spec(), Some(&wd), &bind, grid_1d(oc as u32))?])
}

/// dm \[OC] = dg / norm, added into dm when `accumulate` (gradient accumulation over uses).
pub fn dora_scale_backward(
    dev: &Device,
    dm: &Tensor,
    dg: &Tensor,
    norm: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let op = "dora_scale_backward";
    expect_f32(op, "dm", dm)?;
    if dm.rank() != 1 || dm.numel() == 0 {
        return Err(shape_err(op, format!("dm {:?} must be a non-empty [OC]", dm.shape)));
    }
    let oc = dm.shape[0];
    expect_f32_shape(op, "dg", dg, &[oc])?;
    expect_f32_shape(op, "norm", norm, &[oc])?;
    let wd = words(&[oc as u32, 0, 0, 0, accumulate as u32, 0, 0, 0]);
    let bind = [(7, dg), (8, norm), (9, dm)];
    Ok(vec![dev.dispatch(FILE, op, &spec(), Some(&wd), &bind, grid_1d((oc as u32).div_ceil(WG)))?])
}
