//! Launchers for shaders/softmax.wgsl: masked (key mask and/or causal) softmax over the last axis and its
//! gradient, one workgroup per row (see [`RowVariant`]).

use super::reduce::{row_specs, RowVariant};
use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::guard::{expect_f32, expect_nonempty, index_u32};
use crate::{Device, Dispatch, Spec, Tensor};

const FILE: &str = "softmax.wgsl";

pub fn specs() -> Vec<(&'static str, Spec)> {
    row_specs(FILE)
}

/// out = softmax(x) over the last axis of x [B, .., T, S]. `mask` [B, S]: 1 keeps a column, 0 masks it
/// (as -inf). `causal`: column j of the row at position i of T is masked when j > i + (S - T). A row with
/// every column masked becomes zeros.
pub fn softmax_forward(
    dev: &Device,
    out: &Tensor,
    x: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
) -> Result<Vec<Dispatch>> {
    softmax_forward_with(dev, RowVariant::for_device(dev), out, x, mask, causal)
}

/// [`softmax_forward`] with an explicit row variant.
pub fn softmax_forward_with(
    dev: &Device,
    v: RowVariant,
    out: &Tensor,
    x: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "softmax_forward";
    v.check(OP, dev)?;
    expect_f32(OP, "x", x)?;
    expect_f32(OP, "out", out)?;
    expect_nonempty(OP, "x", x)?;
    if out.shape != x.shape {
        return Err(shape_err(OP, format!("out {:?} must have x's shape {:?}", out.shape, x.shape)));
    }
    let s = x.last_dim();
    let t = if x.rank() >= 2 { x.shape[x.rank() - 2] } else { 1 };
    let rows = x.rows();
    let mut flags = causal as u32 * 2;
    let mut rows_per_batch = rows;
    if let Some(m) = mask {
        expect_f32(OP, "mask", m)?;
        let b = x.shape[0];
        if x.rank() < 2 || m.shape != [b, s] {
            return Err(shape_err(
                OP,
                format!("mask {:?} must be [B, S] = [{b}, {s}] for x {:?} (rank >= 2)", m.shape, x.shape),
            ));
        }
        rows_per_batch = rows / b;
        flags |= 1;
    }
    let rows_u = index_u32(OP, "rows", rows)?;
    index_u32(OP, "numel", x.numel())?;
    let w = words(&[rows_u, s as u32, t as u32, rows_per_batch as u32, flags, 0, 0, 0]);
    // Without a mask, x stands in at the mask binding (read-only twice is allowed; the flag skips reads).
    let m = mask.unwrap_or(x);
    Ok(vec![dev.dispatch(FILE, OP, &v.spec(), Some(&w), &[(1, x), (2, out), (3, m)], grid_1d(rows_u))?])
}

/// dx = y * (dout - sum(dout * y)) row by row, y the forward output.
pub fn softmax_backward(dev: &Device, dx: &Tensor, dout: &Tensor, y: &Tensor) -> Result<Vec<Dispatch>> {
    softmax_backward_with(dev, RowVariant::for_device(dev), dx, dout, y)
}

/// [`softmax_backward`] with an explicit row variant.
pub fn softmax_backward_with(
    dev: &Device,
    v: RowVariant,
    dx: &Tensor,
    dout: &Tensor,
    y: &Tensor,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "softmax_backward";
    v.check(OP, dev)?;
    for (name, t) in [("dx", dx), ("dout", dout), ("y", y)] {
        expect_f32(OP, name, t)?;
    }
    expect_nonempty(OP, "y", y)?;
    if dx.shape != y.shape || dout.shape != y.shape {
        return Err(shape_err(OP, format!("dx {:?}, dout {:?} and y {:?} must match", dx.shape, dout.shape, y.shape)));
    }
    let rows = index_u32(OP, "rows", y.rows())?;
    index_u32(OP, "numel", y.numel())?;
    let w = words(&[rows, y.last_dim() as u32, 1, rows, 0, 0, 0, 0]);
    Ok(vec![dev.dispatch(FILE, OP, &v.spec(), Some(&w), &[(2, dx), (4, dout), (5, y)], grid_1d(rows))?])
}
