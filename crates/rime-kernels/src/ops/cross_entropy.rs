//! Launchers for shaders/cross_entropy.wgsl: mean cross-entropy of logits [N, V] against targets \[N] (I32,
//! rows equal to ignore_index left out), saving the per-row log-sum-exp for the backward.

use super::reduce::{row_specs, width_for, RowVariant};
use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::guard::{expect_f32, expect_nonempty, expect_one_value, index_u32};
use crate::{DType, Device, Dispatch, Spec, Tensor};

const FILE: &str = "cross_entropy.wgsl";

pub fn specs() -> Vec<(&'static str, Spec)> {
    row_specs(FILE)
}

/// Checks logits [N, V], targets [N] (I32), a per-row tensor; returns (N, V).
fn dims(op: &'static str, logits: &Tensor, targets: &Tensor, lse: &Tensor) -> Result<(u32, u32)> {
    expect_f32(op, "logits", logits)?;
    expect_f32(op, "lse", lse)?;
    expect_nonempty(op, "logits", logits)?;
    if logits.rank() != 2 {
        return Err(shape_err(op, format!("logits {:?} must be [N, V]", logits.shape)));
    }
    let (n, v) = (logits.shape[0], logits.shape[1]);
    if targets.dtype != DType::I32 || targets.numel() != n {
        return Err(shape_err(
            op,
            format!(
                "targets ({:?} {:?}) must be I32 [{n}] for logits {:?}",
                targets.dtype, targets.shape, logits.shape
            ),
        ));
    }
    if lse.numel() != n {
        return Err(shape_err(op, format!("lse {:?} must hold N = {n} values (logits {:?})", lse.shape, logits.shape)));
    }
    index_u32(op, "numel", logits.numel())?;
    Ok((n as u32, v as u32))
}

fn scalar(op: &'static str, name: &str, t: &Tensor) -> Result<()> {
    expect_f32(op, name, t)?;
    expect_one_value(op, name, t)
}

/// loss \[1] = mean over rows whose target != ignore_index of lse - logits\[target] (0 when no row is kept);
/// lse \[N] is saved for the backward. A kept target outside [0, V) cannot be seen by the launcher: it makes
/// the loss NaN.
pub fn cross_entropy_forward(
    dev: &Device,
    loss: &Tensor,
    lse: &Tensor,
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: i32,
) -> Result<Vec<Dispatch>> {
    cross_entropy_forward_with(dev, RowVariant::for_device(dev), loss, lse, logits, targets, ignore_index)
}

/// [`cross_entropy_forward`] with an explicit row variant.
pub fn cross_entropy_forward_with(
    dev: &Device,
    rv: RowVariant,
    loss: &Tensor,
    lse: &Tensor,
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: i32,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "cross_entropy_forward";
    rv.check(OP, dev)?;
    let (n, v) = dims(OP, logits, targets, lse)?;
    scalar(OP, "loss", loss)?;
    let width = width_for(v as usize);
    let w = words(&[n, v, ignore_index as u32, v / width]);
    let spec = rv.spec_w(width);
    Ok(vec![
        dev.dispatch(FILE, OP, &spec, Some(&w), &[(1, logits), (3, lse)], grid_1d(n))?,
        dev.dispatch(
            FILE,
            "cross_entropy_forward_loss",
            &spec,
            Some(&w),
            &[(2, targets), (3, lse), (4, loss), (8, logits)],
            [1, 1, 1],
        )?,
    ])
}

/// dlogits = dloss / kept_rows * (softmax(logits) - onehot(target)) on kept rows, 0 on ignored rows.
pub fn cross_entropy_backward(
    dev: &Device,
    dlogits: &Tensor,
    dloss: &Tensor,
    logits: &Tensor,
    lse: &Tensor,
    targets: &Tensor,
    ignore_index: i32,
) -> Result<Vec<Dispatch>> {
    cross_entropy_backward_with(dev, RowVariant::for_device(dev), dlogits, dloss, logits, lse, targets, ignore_index)
}

/// [`cross_entropy_backward`] with an explicit row variant.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_backward_with(
    dev: &Device,
    rv: RowVariant,
    dlogits: &Tensor,
    dloss: &Tensor,
    logits: &Tensor,
    lse: &Tensor,
    targets: &Tensor,
    ignore_index: i32,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "cross_entropy_backward";
    rv.check(OP, dev)?;
    let (n, v) = dims(OP, logits, targets, lse)?;
    scalar(OP, "dloss", dloss)?;
    expect_f32(OP, "dlogits", dlogits)?;
    if dlogits.shape != logits.shape {
        return Err(shape_err(OP, format!("dlogits {:?} must have logits' shape {:?}", dlogits.shape, logits.shape)));
    }
    // dloss / kept rows lives on the GPU (dloss may be produced by an earlier kernel); the scratch word is
    // held alive by the dispatches' bind groups.
    let scale = dev.empty(&[1], DType::F32)?;
    let width = width_for(v as usize);
    let w = words(&[n, v, ignore_index as u32, v / width]);
    let spec = rv.spec_w(width);
    Ok(vec![
        dev.dispatch(
            FILE,
            "cross_entropy_backward_scale",
            &spec,
            Some(&w),
            &[(2, targets), (5, dloss), (7, &scale)],
            [1, 1, 1],
        )?,
        dev.dispatch(
            FILE,
            OP,
            &spec,
            Some(&w),
            &[(1, logits), (2, targets), (3, lse), (6, dlogits), (7, &scale)],
            grid_1d(n),
        )?,
    ])
}
