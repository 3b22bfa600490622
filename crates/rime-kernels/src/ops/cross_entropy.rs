//! Launchers for shaders/cross_entropy.wgsl: mean cross-entropy of logits [N, V] against targets \[N] (I32,
//! rows equal to ignore_index left out), saving the per-row log-sum-exp for the backward.
//!
//! The logits may also come as blocks ([`Block`]): a chunk of rows times a range of classes, as a decoder's
//! output head produces them when the whole [tokens, vocabulary] matrix would not fit one storage binding
//! (Gemma 3's 262,144 classes). Each block of a row chunk folds its log-sum-exp into the chunk's running one
//! ([`cross_entropy_block_forward`]); [`cross_entropy_block_loss`] then gives the chunk's share of the mean, and
//! [`cross_entropy_block_backward`] each block's gradient. [`cross_entropy_forward`] and
//! [`cross_entropy_backward`] are the one-block case.

use super::reduce::{row_specs, width_for, RowVariant};
use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::guard::{expect_f32, expect_nonempty, expect_one_value, index_u32};
use crate::{DType, Device, Dispatch, Spec, Tensor};

const FILE: &str = "cross_entropy.wgsl";

pub fn specs() -> Vec<(&'static str, Spec)> {
    row_specs(FILE)
}

/// Where a block of logits [n, v] sits in the whole problem: its rows are rows `row0..row0 + n` of the
/// targets, its columns classes `offset..offset + v` of `classes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub row0: usize,
    pub offset: usize,
    pub classes: usize,
    /// Whether this is the first block of its rows (it writes the running log-sum-exp instead of folding into
    /// it).
    pub first: bool,
}

impl Block {
    /// The whole problem as one block of `classes` columns.
    pub fn whole(classes: usize) -> Block {
        Block { row0: 0, offset: 0, classes, first: true }
    }
}

/// Checks a block of logits [n, v] against targets (I32) and a per-row tensor; returns the kernel's parameter
/// words and the element width.
fn params(
    op: &'static str,
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    b: Block,
    ignore: i32,
) -> Result<(Vec<u8>, u32)> {
    expect_f32(op, "logits", logits)?;
    expect_f32(op, "lse", lse)?;
    expect_nonempty(op, "logits", logits)?;
    if logits.rank() != 2 {
        return Err(shape_err(op, format!("logits {:?} must be [N, V]", logits.shape)));
    }
    let (n, v) = (logits.shape[0], logits.shape[1]);
    if targets.dtype != DType::I32 || targets.rank() != 1 || b.row0 + n > targets.numel() {
        return Err(shape_err(
            op,
            format!(
                "targets ({:?} {:?}) must be I32 holding rows {}..{} for logits {:?}",
                targets.dtype,
                targets.shape,
                b.row0,
                b.row0 + n,
                logits.shape
            ),
        ));
    }
    if b.offset + v > b.classes {
        return Err(shape_err(
            op,
            format!("logits {:?} at class {} run past the {} classes", logits.shape, b.offset, b.classes),
        ));
    }
    if lse.numel() != n {
        return Err(shape_err(op, format!("lse {:?} must hold N = {n} values (logits {:?})", lse.shape, logits.shape)));
    }
    index_u32(op, "numel", logits.numel())?;
    index_u32(op, "classes", b.classes)?;
    index_u32(op, "target rows", targets.numel())?;
    let width = width_for(v);
    Ok((block_words(n, v, width, b, targets.numel(), ignore), width))
}

/// The shader's Params for a block of `n` rows of `v` classes read `width` at a time (the loss kernel reads
/// neither: v = width = 1 there, and `b.first` is ignored).
fn block_words(n: usize, v: usize, width: u32, b: Block, all_rows: usize, ignore: i32) -> Vec<u8> {
    words(&[
        n as u32,
        v as u32,
        ignore as u32,
        v as u32 / width,
        b.offset as u32,
        b.classes as u32,
        b.row0 as u32,
        all_rows as u32,
        b.first as u32,
        0,
        0,
        0,
    ])
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
    if targets.numel() != logits.shape.first().copied().unwrap_or(0) {
        return Err(shape_err(
            OP,
            format!("targets {:?} must hold one value per row of logits {:?}", targets.shape, logits.shape),
        ));
    }
    let v = logits.shape.get(1).copied().unwrap_or(0);
    // The picked target logits live in a scratch the dispatches' bind groups hold alive.
    let picked = dev.empty(&[lse.numel().max(1)], DType::F32)?;
    let b = Block::whole(v);
    let mut ds = cross_entropy_block_forward_with(dev, rv, lse, &picked, logits, targets, b, ignore_index)?;
    ds.extend(cross_entropy_block_loss_with(dev, rv, loss, lse, &picked, targets, b, ignore_index)?);
    Ok(ds)
}

/// Folds the block `logits` [n, v] at `b` into the running log-sum-exp `lse` \[n] of its rows (written when
/// `b.first`), and writes `picked` \[n] for the rows whose target is one of its classes.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_block_forward(
    dev: &Device,
    lse: &Tensor,
    picked: &Tensor,
    logits: &Tensor,
    targets: &Tensor,
    b: Block,
    ignore_index: i32,
) -> Result<Vec<Dispatch>> {
    cross_entropy_block_forward_with(dev, RowVariant::for_device(dev), lse, picked, logits, targets, b, ignore_index)
}

/// [`cross_entropy_block_forward`] with an explicit row variant.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_block_forward_with(
    dev: &Device,
    rv: RowVariant,
    lse: &Tensor,
    picked: &Tensor,
    logits: &Tensor,
    targets: &Tensor,
    b: Block,
    ignore_index: i32,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "cross_entropy_forward";
    rv.check(OP, dev)?;
    let (w, width) = params(OP, logits, targets, lse, b, ignore_index)?;
    expect_f32(OP, "picked", picked)?;
    if picked.numel() != lse.numel() {
        return Err(shape_err(OP, format!("picked {:?} must match lse {:?}", picked.shape, lse.shape)));
    }
    let n = logits.shape[0] as u32;
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &rv.spec_w(width),
        Some(&w),
        &[(1, logits), (2, targets), (3, lse), (8, logits), (9, picked)],
        grid_1d(n),
    )?])
}

/// loss \[1] = the share of the mean loss of the rows `b.row0..b.row0 + n` once every block of them has been
/// folded in: the sum over their kept rows of lse - picked, over the kept rows of all of `targets`. The shares of
/// row chunks covering the targets add up to the mean. Only `b.row0`, `b.classes` and n (from `lse`) matter.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_block_loss(
    dev: &Device,
    loss: &Tensor,
    lse: &Tensor,
    picked: &Tensor,
    targets: &Tensor,
    b: Block,
    ignore_index: i32,
) -> Result<Vec<Dispatch>> {
    cross_entropy_block_loss_with(dev, RowVariant::for_device(dev), loss, lse, picked, targets, b, ignore_index)
}

/// [`cross_entropy_block_loss`] with an explicit row variant.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_block_loss_with(
    dev: &Device,
    rv: RowVariant,
    loss: &Tensor,
    lse: &Tensor,
    picked: &Tensor,
    targets: &Tensor,
    b: Block,
    ignore_index: i32,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "cross_entropy_forward_loss";
    rv.check(OP, dev)?;
    scalar(OP, "loss", loss)?;
    expect_f32(OP, "picked", picked)?;
    expect_f32(OP, "lse", lse)?;
    let n = lse.numel();
    if picked.numel() != n || n == 0 || targets.dtype != DType::I32 || b.row0 + n > targets.numel() {
        return Err(shape_err(
            OP,
            format!(
                "lse {:?} and picked {:?} must hold the rows {}..{} of targets ({:?} {:?})",
                lse.shape,
                picked.shape,
                b.row0,
                b.row0 + n,
                targets.dtype,
                targets.shape
            ),
        ));
    }
    index_u32(OP, "classes", b.classes)?;
    index_u32(OP, "target rows", targets.numel())?;
    let w = block_words(n, 1, 1, Block { offset: 0, first: false, ..b }, targets.numel(), ignore_index);
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &rv.spec_w(1),
        Some(&w),
        &[(2, targets), (3, lse), (4, loss), (9, picked)],
        [1, 1, 1],
    )?])
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
    if targets.numel() != logits.shape.first().copied().unwrap_or(0) {
        return Err(shape_err(
            "cross_entropy_backward",
            format!("targets {:?} must hold one value per row of logits {:?}", targets.shape, logits.shape),
        ));
    }
    let b = Block::whole(logits.shape.get(1).copied().unwrap_or(0));
    cross_entropy_block_backward_with(dev, rv, dlogits, dloss, logits, lse, targets, b, ignore_index)
}

/// The gradient of the mean loss (over the kept rows of all of `targets`) with respect to the block `logits`
/// at `b`: dloss / kept rows * (softmax - onehot) on its kept rows, from the rows' full log-sum-exp `lse`.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_block_backward(
    dev: &Device,
    dlogits: &Tensor,
    dloss: &Tensor,
    logits: &Tensor,
    lse: &Tensor,
    targets: &Tensor,
    b: Block,
    ignore_index: i32,
) -> Result<Vec<Dispatch>> {
    let rv = RowVariant::for_device(dev);
    cross_entropy_block_backward_with(dev, rv, dlogits, dloss, logits, lse, targets, b, ignore_index)
}

/// [`cross_entropy_block_backward`] with an explicit row variant.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_block_backward_with(
    dev: &Device,
    rv: RowVariant,
    dlogits: &Tensor,
    dloss: &Tensor,
    logits: &Tensor,
    lse: &Tensor,
    targets: &Tensor,
    b: Block,
    ignore_index: i32,
) -> Result<Vec<Dispatch>> {
    scalar("cross_entropy_backward", "dloss", dloss)?;
    block_backward(dev, rv, dlogits, Some(dloss), logits, lse, targets, b, ignore_index)
}

/// [`cross_entropy_block_backward`] for a loss gradient of one: dlogits = (softmax - onehot) / kept rows. The
/// caller multiplies what it derives from it by the real loss gradient later (a frozen output head's input
/// gradient, computed in the forward pass so that its logits need not be kept or recomputed).
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_block_backward_unit(
    dev: &Device,
    dlogits: &Tensor,
    logits: &Tensor,
    lse: &Tensor,
    targets: &Tensor,
    b: Block,
    ignore_index: i32,
) -> Result<Vec<Dispatch>> {
    block_backward(dev, RowVariant::for_device(dev), dlogits, None, logits, lse, targets, b, ignore_index)
}

#[allow(clippy::too_many_arguments)]
fn block_backward(
    dev: &Device,
    rv: RowVariant,
    dlogits: &Tensor,
    dloss: Option<&Tensor>,
    logits: &Tensor,
    lse: &Tensor,
    targets: &Tensor,
    b: Block,
    ignore_index: i32,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "cross_entropy_backward";
    rv.check(OP, dev)?;
    let (w, width) = params(OP, logits, targets, lse, b, ignore_index)?;
    expect_f32(OP, "dlogits", dlogits)?;
    if dlogits.shape != logits.shape {
        return Err(shape_err(OP, format!("dlogits {:?} must have logits' shape {:?}", dlogits.shape, logits.shape)));
    }
    // dloss / kept rows lives on the GPU (dloss may be produced by an earlier kernel); the scratch word is
    // held alive by the dispatches' bind groups.
    let scale = dev.empty(&[1], DType::F32)?;
    let spec = rv.spec_w(width);
    let n = logits.shape[0] as u32;
    let scale_dispatch = match dloss {
        Some(dl) => dev.dispatch(
            FILE,
            "cross_entropy_backward_scale",
            &spec,
            Some(&w),
            &[(2, targets), (5, dl), (7, &scale)],
            [1, 1, 1],
        )?,
        None => dev.dispatch(
            FILE,
            "cross_entropy_backward_unit_scale",
            &spec,
            Some(&w),
            &[(2, targets), (7, &scale)],
            [1, 1, 1],
        )?,
    };
    Ok(vec![
        scale_dispatch,
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
