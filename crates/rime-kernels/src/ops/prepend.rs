//! Launchers for shaders/prepend.wgsl: rows put in front of every sequence of a batch (soft prompts in front
//! of the word embeddings, prefix-tuning keys and values in front of a layer's own), and the two gradients.

use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::guard::{expect_f32, index_u32};
use crate::{Device, Dispatch, Spec, Tensor};

const FILE: &str = "prepend.wgsl";
const WG: u32 = 64;

fn spec() -> Spec {
    Spec::new().constant("WG", WG as f64)
}

pub fn specs() -> Vec<(&'static str, Spec)> {
    vec![(FILE, spec())]
}

/// (B, T, P, C) from x [B, T, C] and rows [P, C], checking dtypes and that the channels agree.
fn dims(op: &'static str, x_shape: &[usize], rows: &Tensor) -> Result<(usize, usize, usize, usize)> {
    expect_f32(op, "rows", rows)?;
    if x_shape.len() != 3 || rows.rank() != 2 || rows.shape[1] != x_shape[2] {
        return Err(shape_err(
            op,
            format!("x {x_shape:?} must be [B, T, C] and rows {:?} must be [P, C] with the same C", rows.shape),
        ));
    }
    Ok((x_shape[0], x_shape[1], rows.shape[0], x_shape[2]))
}

fn params(b: usize, t: usize, p: usize, c: usize, accumulate: bool) -> Vec<u8> {
    words(&[b as u32, t as u32, p as u32, c as u32, accumulate as u32, 0, 0, 0])
}

/// out [B, P+T, C] = rows [P, C] (the same for every batch entry) followed by x [B, T, C].
pub fn prepend_forward(dev: &Device, out: &Tensor, x: &Tensor, rows: &Tensor) -> Result<Vec<Dispatch>> {
    const OP: &str = "prepend_forward";
    expect_f32(OP, "x", x)?;
    expect_f32(OP, "out", out)?;
    let (b, t, p, c) = dims(OP, &x.shape, rows)?;
    if out.shape != [b, p + t, c] {
        return Err(shape_err(OP, format!("out {:?} must be [B, P+T, C] = [{b}, {}, {c}]", out.shape, p + t)));
    }
    let n = index_u32(OP, "B * (P+T) * C", out.numel())?;
    if n == 0 {
        return Ok(Vec::new());
    }
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &spec(),
        Some(&params(b, t, p, c, false)),
        &[(1, x), (2, rows), (3, out)],
        grid_1d(n.div_ceil(WG)),
    )?])
}

/// dx [B, T, C] = the last T rows of each sequence of dout [B, P+T, C] (overwritten).
pub fn prepend_backward_input(dev: &Device, dx: &Tensor, dout: &Tensor) -> Result<Vec<Dispatch>> {
    const OP: &str = "prepend_backward_input";
    expect_f32(OP, "dx", dx)?;
    expect_f32(OP, "dout", dout)?;
    if dx.rank() != 3
        || dout.rank() != 3
        || dout.shape[0] != dx.shape[0]
        || dout.shape[2] != dx.shape[2]
        || dout.shape[1] < dx.shape[1]
    {
        return Err(shape_err(
            OP,
            format!("dout {:?} must be [B, P+T, C] for dx {:?} [B, T, C]", dout.shape, dx.shape),
        ));
    }
    let (b, t, c) = (dx.shape[0], dx.shape[1], dx.shape[2]);
    let p = dout.shape[1] - t;
    let n = index_u32(OP, "B * T * C", dx.numel())?;
    index_u32(OP, "B * (P+T) * C", dout.numel())?;
    if n == 0 {
        return Ok(Vec::new());
    }
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &spec(),
        Some(&params(b, t, p, c, false)),
        &[(4, dout), (5, dx)],
        grid_1d(n.div_ceil(WG)),
    )?])
}

/// drows [P, C] (+)= the sum over the batch of the first P rows of dout [B, P+T, C]; `accumulate = false`
/// overwrites drows.
pub fn prepend_backward_weight(dev: &Device, drows: &Tensor, dout: &Tensor, accumulate: bool) -> Result<Vec<Dispatch>> {
    const OP: &str = "prepend_backward_weight";
    expect_f32(OP, "drows", drows)?;
    expect_f32(OP, "dout", dout)?;
    if drows.rank() != 2 || dout.rank() != 3 || dout.shape[2] != drows.shape[1] || dout.shape[1] < drows.shape[0] {
        return Err(shape_err(
            OP,
            format!("dout {:?} must be [B, P+T, C] and drows {:?} must be [P, C]", dout.shape, drows.shape),
        ));
    }
    let (b, p, c) = (dout.shape[0], drows.shape[0], drows.shape[1]);
    let t = dout.shape[1] - p;
    index_u32(OP, "B * (P+T) * C", dout.numel())?;
    let n = index_u32(OP, "P * C", drows.numel())?;
    if n == 0 {
        return Ok(Vec::new());
    }
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &spec(),
        Some(&params(b, t, p, c, accumulate)),
        &[(4, dout), (6, drows)],
        grid_1d(n.div_ceil(WG)),
    )?])
}
