//! Launchers for shaders/norm.wgsl: LayerNorm and RMSNorm over the last axis (x [rows, C], gamma/beta \[C]),
//! saving mean / rstd \[rows] for the backward, with separate input and weight gradients so a frozen norm
//! never computes dgamma.

use super::reduce::{row_specs, width_for, RowVariant};
use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::guard::{expect_f32, expect_nonempty, index_u32};
use crate::{Device, Dispatch, Spec, Tensor};

const FILE: &str = "norm.wgsl";

pub fn specs() -> Vec<(&'static str, Spec)> {
    row_specs(FILE)
}

/// Checks dtypes and shapes; returns (rows, C).
fn dims(
    op: &'static str,
    x: &Tensor,
    same_as_x: &[(&str, &Tensor)],
    per_row: &[(&str, &Tensor)],
    per_channel: &[(&str, &Tensor)],
) -> Result<(u32, u32)> {
    expect_f32(op, "x", x)?;
    expect_nonempty(op, "x", x)?;
    let (rows, c) = (x.rows(), x.last_dim());
    for (name, t) in same_as_x {
        expect_f32(op, name, t)?;
        if t.shape != x.shape {
            return Err(shape_err(op, format!("{name} {:?} must have x's shape {:?}", t.shape, x.shape)));
        }
    }
    for (name, t) in per_row {
        expect_f32(op, name, t)?;
        if t.numel() != rows {
            return Err(shape_err(
                op,
                format!("{name} {:?} must hold one value per row of x {:?} ({rows})", t.shape, x.shape),
            ));
        }
    }
    for (name, t) in per_channel {
        expect_f32(op, name, t)?;
        if t.numel() != c {
            return Err(shape_err(op, format!("{name} {:?} must hold C = {c} values (x {:?})", t.shape, x.shape)));
        }
    }
    index_u32(op, "numel", x.numel())?;
    Ok((rows as u32, c as u32))
}

/// The specialization for rows of c channels, and the number of elements (f32 or vec4) per row.
fn element_spec(v: RowVariant, c: u32) -> (Spec, u32) {
    let w = width_for(c as usize);
    (v.spec_w(w), c / w)
}

fn check_eps(op: &'static str, eps: f32) -> Result<()> {
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(shape_err(op, format!("eps {eps} must be finite and >= 0")));
    }
    Ok(())
}

/// out = (x - mean) * rstd * gamma + beta per row; mean and rstd \[rows] are saved for the backward.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    dev: &Device,
    out: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Vec<Dispatch>> {
    layernorm_forward_with(dev, RowVariant::for_device(dev), out, mean, rstd, x, gamma, beta, eps)
}

/// [`layernorm_forward`] with an explicit row variant.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward_with(
    dev: &Device,
    v: RowVariant,
    out: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "layernorm_forward";
    v.check(OP, dev)?;
    check_eps(OP, eps)?;
    let (rows, c) =
        dims(OP, x, &[("out", out)], &[("mean", mean), ("rstd", rstd)], &[("gamma", gamma), ("beta", beta)])?;
    let (spec, cv) = element_spec(v, c);
    let w = words(&[rows, c, eps.to_bits(), 0, cv, 0, 0, 0]);
    let b = [(1, x), (2, gamma), (3, beta), (4, out), (5, mean), (6, rstd)];
    Ok(vec![dev.dispatch(FILE, OP, &spec, Some(&w), &b, grid_1d(rows))?])
}

/// dx from dout and the saved mean / rstd.
pub fn layernorm_backward_input(
    dev: &Device,
    dx: &Tensor,
    dout: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    gamma: &Tensor,
) -> Result<Vec<Dispatch>> {
    layernorm_backward_input_with(dev, RowVariant::for_device(dev), dx, dout, x, mean, rstd, gamma)
}

/// [`layernorm_backward_input`] with an explicit row variant.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_input_with(
    dev: &Device,
    v: RowVariant,
    dx: &Tensor,
    dout: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    gamma: &Tensor,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "layernorm_backward_input";
    v.check(OP, dev)?;
    let (rows, c) = dims(OP, x, &[("dx", dx), ("dout", dout)], &[("mean", mean), ("rstd", rstd)], &[("gamma", gamma)])?;
    let (spec, cv) = element_spec(v, c);
    let w = words(&[rows, c, 0, 0, cv, 0, 0, 0]);
    let b = [(1, x), (2, gamma), (4, dx), (7, dout), (8, mean), (9, rstd)];
    Ok(vec![dev.dispatch(FILE, OP, &spec, Some(&w), &b, grid_1d(rows))?])
}

/// dgamma = sum over rows of dout * xhat, dbeta = sum of dout; `accumulate` adds to the existing values.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_weight(
    dev: &Device,
    dgamma: &Tensor,
    dbeta: &Tensor,
    dout: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    layernorm_backward_weight_with(dev, RowVariant::for_device(dev), dgamma, dbeta, dout, x, mean, rstd, accumulate)
}

/// [`layernorm_backward_weight`] with an explicit row variant (it sets the workgroup size).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_weight_with(
    dev: &Device,
    v: RowVariant,
    dgamma: &Tensor,
    dbeta: &Tensor,
    dout: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "layernorm_backward_weight";
    v.check(OP, dev)?;
    let (rows, c) =
        dims(OP, x, &[("dout", dout)], &[("mean", mean), ("rstd", rstd)], &[("dgamma", dgamma), ("dbeta", dbeta)])?;
    let (spec, cv) = element_spec(v, c);
    let w = words(&[rows, c, 0, accumulate as u32, cv, 0, 0, 0]);
    let b = [(1, x), (7, dout), (8, mean), (9, rstd), (10, dgamma), (11, dbeta)];
    Ok(vec![dev.dispatch(FILE, OP, &spec, Some(&w), &b, grid_1d(cv.div_ceil(v.wg())))?])
}

/// out = x * rstd * gamma (Llama's RMSNorm); rstd \[rows] is saved for the backward.
pub fn rmsnorm_forward(
    dev: &Device,
    out: &Tensor,
    rstd: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    eps: f32,
) -> Result<Vec<Dispatch>> {
    rmsnorm_forward_with(dev, RowVariant::for_device(dev), out, rstd, x, gamma, eps)
}

/// [`rmsnorm_forward`] with an explicit row variant.
pub fn rmsnorm_forward_with(
    dev: &Device,
    v: RowVariant,
    out: &Tensor,
    rstd: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    eps: f32,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "rmsnorm_forward";
    v.check(OP, dev)?;
    check_eps(OP, eps)?;
    let (rows, c) = dims(OP, x, &[("out", out)], &[("rstd", rstd)], &[("gamma", gamma)])?;
    let (spec, cv) = element_spec(v, c);
    let w = words(&[rows, c, eps.to_bits(), 0, cv, 0, 0, 0]);
    let b = [(1, x), (2, gamma), (4, out), (6, rstd)];
    Ok(vec![dev.dispatch(FILE, OP, &spec, Some(&w), &b, grid_1d(rows))?])
}

pub fn rmsnorm_backward_input(
    dev: &Device,
    dx: &Tensor,
    dout: &Tensor,
    x: &Tensor,
    rstd: &Tensor,
    gamma: &Tensor,
) -> Result<Vec<Dispatch>> {
    rmsnorm_backward_input_with(dev, RowVariant::for_device(dev), dx, dout, x, rstd, gamma)
}

/// [`rmsnorm_backward_input`] with an explicit row variant.
pub fn rmsnorm_backward_input_with(
    dev: &Device,
    v: RowVariant,
    dx: &Tensor,
    dout: &Tensor,
    x: &Tensor,
    rstd: &Tensor,
    gamma: &Tensor,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "rmsnorm_backward_input";
    v.check(OP, dev)?;
    let (rows, c) = dims(OP, x, &[("dx", dx), ("dout", dout)], &[("rstd", rstd)], &[("gamma", gamma)])?;
    let (spec, cv) = element_spec(v, c);
    let w = words(&[rows, c, 0, 0, cv, 0, 0, 0]);
    let b = [(1, x), (2, gamma), (4, dx), (7, dout), (9, rstd)];
    Ok(vec![dev.dispatch(FILE, OP, &spec, Some(&w), &b, grid_1d(rows))?])
}

/// dgamma = sum over rows of dout * x * rstd; `accumulate` adds to the existing values.
pub fn rmsnorm_backward_weight(
    dev: &Device,
    dgamma: &Tensor,
    dout: &Tensor,
    x: &Tensor,
    rstd: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    rmsnorm_backward_weight_with(dev, RowVariant::for_device(dev), dgamma, dout, x, rstd, accumulate)
}

/// [`rmsnorm_backward_weight`] with an explicit row variant (it sets the workgroup size).
pub fn rmsnorm_backward_weight_with(
    dev: &Device,
    v: RowVariant,
    dgamma: &Tensor,
    dout: &Tensor,
    x: &Tensor,
    rstd: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "rmsnorm_backward_weight";
    v.check(OP, dev)?;
    let (rows, c) = dims(OP, x, &[("dout", dout)], &[("rstd", rstd)], &[("dgamma", dgamma)])?;
    let (spec, cv) = element_spec(v, c);
    let w = words(&[rows, c, 0, accumulate as u32, cv, 0, 0, 0]);
    let b = [(1, x), (7, dout), (9, rstd), (10, dgamma)];
    Ok(vec![dev.dispatch(FILE, OP, &spec, Some(&w), &b, grid_1d(cv.div_ceil(v.wg())))?])
}
