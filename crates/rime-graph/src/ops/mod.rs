//! One rule per op. Each file holds an op's graph-builder method (its shape checks), its forward lowering and
//! its gradient rule, written against [`crate::exec::builder::Builder`]. The two matches below only route a
//! node to its file. Adding an op: its `Op` variant (with `name` and `inputs`) in `graph.rs`, a file here, and
//! one arm in each match. Ops whose output is not a fresh activation (inputs, parameters, state, views)
//! also say where it lives, in `storage.rs`.

mod attention;
mod binary;
mod cache;
mod concat;
mod cross_entropy;
mod dora;
mod embedding;
mod lora;
mod matmul;
mod norm;
mod patch;
mod prepend;
mod reshape;
mod rope;
mod softmax;
mod storage;
mod unary;

use crate::error::Result;
use crate::exec::builder::{Builder, TRef};
use crate::graph::{Op, Var};

pub(crate) use storage::storage;

/// Emit the forward kernels of node `v` writing `o` (storage ops, inputs, parameters and views, have none).
pub(crate) fn forward(b: &mut Builder, v: Var, o: &TRef) -> Result<()> {
    let op = b.g.node(v).op.clone();
    match op {
        Op::Input | Op::Param(_) | Op::Reshape { .. } | Op::State => {}
        Op::Matmul { a, b: w, bias, ta, tb } => matmul::forward(b, o, a, w, bias, ta, tb),
        Op::Lora { x, w, bias, a, b: bm, scale } => lora::forward(b, v, o, lora::Lora { x, w, bias, a, b: bm, scale }),
        Op::DoraScale { w, a, b: bm, m, scale } => dora::forward(b, v, o, [w, a, bm, m], scale),
        Op::Add { a, b: c } => binary::add_forward(b, o, a, c),
        Op::Mul { a, b: c } => binary::mul_forward(b, o, a, c),
        Op::Scale { .. } | Op::Gelu { .. } | Op::Silu { .. } | Op::Relu { .. } | Op::Dropout { .. } => {
            unary::forward(b, o, &op)
        }
        Op::Rope { x, pos_offset, theta } => rope::forward(b, o, x, pos_offset, theta),
        Op::LayerNorm { x, gamma, beta, eps } => norm::layernorm_forward(b, v, o, [x, gamma, beta], eps),
        Op::RmsNorm { x, gamma, eps } => norm::rmsnorm_forward(b, v, o, [x, gamma], eps),
        Op::Embedding { ids, table, offset } => embedding::forward(b, o, ids, table, offset),
        Op::ConcatLast { parts } => concat::forward(b, o, &parts),
        Op::Attention { q, k, v: vv, mask, causal, scale, window } => {
            attention::forward(b, v, o, attention::Attn { qkv: [q, k, vv], mask, causal, scale, window })
        }
        Op::Softmax { x, mask, causal } => softmax::forward(b, o, x, mask, causal),
        Op::CrossEntropy { parts, targets, row0, ignore_index } => {
            cross_entropy::forward(b, v, o, &parts, targets, row0, ignore_index)
        }
        Op::LinearCrossEntropy { h, weights, targets, row0, ignore_index } => {
            cross_entropy::linear_forward(b, v, o, h, &weights, targets, (row0, ignore_index))?
        }
        Op::Rows { x, start } => concat::rows_forward(b, o, x, start),
        Op::Prepend { x, rows } => prepend::forward(b, o, x, rows),
        Op::PatchUnfold { x, p } => patch::forward(b, o, x, p),
        Op::CacheWrite { src, pos, .. } => cache::write_forward(b, o, src, pos),
        Op::CacheMask { pos, t } => cache::mask_forward(b, o, pos, t),
        Op::RopeAt { x, pos, theta } => rope::at_forward(b, o, x, pos, theta),
    }
    Ok(())
}

/// Emit the gradient kernels of node `v` given its output's gradient `dout`.
pub(crate) fn backward(b: &mut Builder, v: Var, dout: &TRef) -> Result<()> {
    let op = b.g.node(v).op.clone();
    match op {
        Op::Input | Op::Param(_) | Op::State | Op::CacheMask { .. } => {}
        Op::Reshape { x } => reshape::backward(b, dout, x),
        Op::Matmul { a, b: w, bias, ta, tb } => matmul::backward(b, dout, a, w, bias, ta, tb),
        Op::Lora { x, w, bias, a, b: bm, scale } => {
            lora::backward(b, v, dout, lora::Lora { x, w, bias, a, b: bm, scale })?
        }
        Op::DoraScale { m, .. } => dora::backward(b, v, dout, m),
        Op::Add { a, b: c } => binary::add_backward(b, v, dout, a, c),
        Op::Mul { a, b: c } => binary::mul_backward(b, dout, a, c),
        Op::Scale { .. } | Op::Gelu { .. } | Op::Silu { .. } | Op::Relu { .. } | Op::Dropout { .. } => {
            unary::backward(b, dout, &op)
        }
        Op::Rope { x, pos_offset, theta } => rope::backward(b, dout, x, pos_offset, theta),
        Op::LayerNorm { x, gamma, beta, .. } => norm::layernorm_backward(b, v, dout, [x, gamma, beta]),
        Op::RmsNorm { x, gamma, .. } => norm::rmsnorm_backward(b, v, dout, [x, gamma]),
        Op::Embedding { ids, table, offset } => embedding::backward(b, dout, ids, table, offset),
        Op::ConcatLast { parts } => concat::backward(b, dout, &parts),
        Op::Attention { q, k, v: vv, mask, causal, scale, window } => {
            attention::backward(b, v, dout, attention::Attn { qkv: [q, k, vv], mask, causal, scale, window })
        }
        Op::Softmax { x, .. } => softmax::backward(b, v, dout, x),
        Op::CrossEntropy { parts, targets, row0, ignore_index } => {
            cross_entropy::backward(b, v, dout, &parts, targets, row0, ignore_index)
        }
        Op::LinearCrossEntropy { h, .. } => cross_entropy::linear_backward(b, v, dout, h),
        Op::Rows { x, start } => concat::rows_backward(b, dout, x, start),
        Op::Prepend { x, rows } => prepend::backward(b, dout, x, rows),
        Op::PatchUnfold { x, p } => patch::backward(b, dout, x, p),
        Op::CacheWrite { .. } => cache::write_backward(b, v)?,
        Op::RopeAt { x, pos, theta } => rope::at_backward(b, dout, x, pos, theta),
    }
    Ok(())
}
