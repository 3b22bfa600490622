//! `cross_entropy`: mean over rows whose target is not `ignore_index`; forward saves each row's log-sum-exp.
//! The logits may come as blocks of classes side by side and as a chunk of the targets' rows
//! ([`Graph::cross_entropy_blocks`]): a decoder's output head over a vocabulary too large for one storage
//! binding never builds the whole [tokens, vocabulary] matrix. `linear_cross_entropy` goes further for a frozen
//! output head: the logits are a scratch of its forward pass, which also computes the input gradient for a loss
//! gradient of one; the gradient rule only scales it (no logits kept, none recomputed).

use rime_kernels::ops::cross_entropy::{self, Block};
use rime_kernels::ops::{elementwise, matmul};
use rime_kernels::DType;

use crate::error::{Error, Result};
use crate::exec::builder::{Builder, Phase, TRef};
use crate::graph::{shape_err, Graph, Op, Var};

impl Graph {
    /// Mean cross-entropy over rows whose target is not `ignore_index`; logits [N, V], targets \[N\] (I32).
    pub fn cross_entropy(&mut self, logits: Var, targets: Var, ignore_index: i32) -> Result<Var> {
        let (sl, st) = (self.shape(logits).to_vec(), self.shape(targets).to_vec());
        if sl.len() != 2 || st != [sl[0]] || self.node(targets).dtype != DType::I32 {
            return Err(shape_err(
                "cross_entropy",
                format!("logits {sl:?}, targets {st:?} ({:?})", self.node(targets).dtype),
            ));
        }
        Ok(self.push(
            Op::CrossEntropy { parts: vec![logits], targets, row0: 0, ignore_index },
            vec![1],
            DType::F32,
            "cross_entropy",
        ))
    }

    /// The share of rows `row0..row0 + n` in the mean cross-entropy over all of `targets` \[N\] (I32): the sum
    /// of their losses over the kept rows of all the targets, so the shares of chunks covering the targets add
    /// up to [`Graph::cross_entropy`] of the whole. `parts` [n, V_k] are the rows' logits over consecutive
    /// blocks of classes (an output head split by vocabulary rows), together the whole vocabulary.
    pub fn cross_entropy_blocks(&mut self, parts: &[Var], targets: Var, row0: usize, ignore_index: i32) -> Result<Var> {
        let st = self.shape(targets).to_vec();
        let shapes: Vec<Vec<usize>> = parts.iter().map(|&p| self.shape(p).to_vec()).collect();
        let n = shapes.first().and_then(|s| s.first()).copied().unwrap_or(0);
        let ok = !parts.is_empty()
            && shapes.iter().all(|s| s.len() == 2 && s[0] == n && s[1] > 0)
            && parts.iter().all(|&p| self.node(p).dtype == DType::F32)
            && st.len() == 1
            && row0 + n <= st[0]
            && self.node(targets).dtype == DType::I32;
        if !ok {
            return Err(shape_err(
                "cross_entropy_blocks",
                format!(
                    "parts {shapes:?} must be f32 [n, V_k] for rows {row0}.. of targets {st:?} ({:?})",
                    self.node(targets).dtype
                ),
            ));
        }
        Ok(self.push(
            Op::CrossEntropy { parts: parts.to_vec(), targets, row0, ignore_index },
            vec![1],
            DType::F32,
            "cross_entropy",
        ))
    }

    /// [`Graph::cross_entropy_blocks`] of the logits h·W_kᵀ of frozen weights `weights` [V_k, C] (an output
    /// head, whole or as row parts; f32, f16 or quantized) for h [n, C], the rows `row0..row0 + n` of
    /// `targets`, without keeping the logits: the forward pass computes them into a scratch, folds them into
    /// the loss share, and computes h's gradient for a loss gradient of one while it has them; the gradient
    /// rule scales that by the real one. Cheaper than the two ops it replaces by one product of the head per
    /// step (the logits are never recomputed) and lighter than keeping them. A trainable weight is refused
    /// when the graph is lowered (its gradient is not computed).
    pub fn linear_cross_entropy(
        &mut self,
        h: Var,
        weights: &[Var],
        targets: Var,
        row0: usize,
        ignore_index: i32,
    ) -> Result<Var> {
        let sh = self.shape(h).to_vec();
        let st = self.shape(targets).to_vec();
        let shapes: Vec<Vec<usize>> = weights.iter().map(|&w| self.shape(w).to_vec()).collect();
        let ok = sh.len() == 2
            && self.node(h).dtype == DType::F32
            && !weights.is_empty()
            && shapes.iter().all(|s| s.len() == 2 && s[0] > 0 && s[1] == sh[1])
            && st.len() == 1
            && row0 + sh[0] <= st[0]
            && self.node(targets).dtype == DType::I32;
        if !ok {
            return Err(shape_err(
                "linear_cross_entropy",
                format!(
                    "h {sh:?} (f32 [n, C]) and weights {shapes:?} ([V_k, C]) for rows {row0}.. of targets {st:?} ({:?})",
                    self.node(targets).dtype
                ),
            ));
        }
        Ok(self.push(
            Op::LinearCrossEntropy { h, weights: weights.to_vec(), targets, row0, ignore_index },
            vec![1],
            DType::F32,
            "linear_cross_entropy",
        ))
    }
}

/// Each block of `widths` classes: its first class, all the classes, its rows' first target row.
fn blocks_of(widths: &[usize], row0: usize) -> Vec<Block> {
    let classes: usize = widths.iter().sum();
    let mut offset = 0;
    widths
        .iter()
        .enumerate()
        .map(|(k, &w)| {
            let b = Block { row0, offset, classes, first: k == 0 };
            offset += w;
            b
        })
        .collect()
}

fn blocks(bl: &Builder, parts: &[Var], row0: usize) -> Vec<Block> {
    let widths: Vec<usize> = parts.iter().map(|&p| bl.g.shape(p)[1]).collect();
    blocks_of(&widths, row0)
}

pub(crate) fn forward(bl: &mut Builder, v: Var, o: &TRef, parts: &[Var], targets: Var, row0: usize, ignore: i32) {
    let n = bl.g.shape(parts[0])[0];
    let (lse, picked) = (bl.scratch(&[n]), bl.scratch(&[n]));
    bl.save_aux(v, &[&lse]);
    let tr = bl.v(targets);
    let bs = blocks(bl, parts, row0);
    for (&p, b) in parts.iter().zip(&bs) {
        let (pr, b) = (bl.v(p), *b);
        bl.call("cross_entropy_forward", Phase::Forward, &[&lse, &picked, &pr, &tr], move |d, t| {
            cross_entropy::cross_entropy_block_forward(d, &t[0], &t[1], &t[2], &t[3], b, ignore)
        });
    }
    let b = bs[0];
    bl.call("cross_entropy_forward_loss", Phase::Forward, &[o, &lse, &picked, &tr], move |d, t| {
        cross_entropy::cross_entropy_block_loss(d, &t[0], &t[1], &t[2], &t[3], b, ignore)
    });
}

pub(crate) fn backward(bl: &mut Builder, v: Var, dout: &TRef, parts: &[Var], targets: Var, row0: usize, ignore: i32) {
    let bs = blocks(bl, parts, row0);
    for (&p, b) in parts.iter().zip(bs) {
        if bl.needs(p) {
            let (pr, tr, lse) = (bl.v(p), bl.v(targets), bl.aux(v, 0));
            bl.grad_to(p, false, "cross_entropy_backward", &[dout, &pr, &lse, &tr], move |d, t, _| {
                cross_entropy::cross_entropy_block_backward(d, &t[0], &t[1], &t[2], &t[3], &t[4], b, ignore)
            });
        }
    }
}

/// The logits of every weight into scratch (all live until the loss share is known), the loss share, and, when h
/// needs a gradient, dh for a loss gradient of one (saved for the gradient rule): per weight, dlogits into one
/// scratch sized for the widest block, then dh (+)= dlogits·W.
pub(crate) fn linear_forward(
    bl: &mut Builder,
    v: Var,
    o: &TRef,
    h: Var,
    weights: &[Var],
    targets: Var,
    (row0, ignore): (usize, i32),
) -> Result<()> {
    if let Some(&w) = weights.iter().find(|&&w| bl.is_train_param(w).is_some()) {
        return Err(Error::Invalid(format!(
            "linear_cross_entropy: weight `{}` is trainable; this op computes no weight gradient",
            bl.g.node(w).name
        )));
    }
    let (n, c) = (bl.g.shape(h)[0], bl.g.shape(h)[1]);
    let widths: Vec<usize> = weights.iter().map(|&w| bl.g.shape(w)[0]).collect();
    let bs = blocks_of(&widths, row0);
    let (hr, tr) = (bl.v(h), bl.v(targets));
    let (lse, picked) = (bl.scratch(&[n]), bl.scratch(&[n]));
    let mut logits = Vec::with_capacity(weights.len());
    for (&w, (&vk, &b)) in weights.iter().zip(widths.iter().zip(&bs)) {
        let (lr, wr) = (bl.scratch(&[n, vk]), bl.v(w));
        bl.call("matmul_forward", Phase::Forward, &[&lr, &hr, &wr], |d, t| {
            matmul::matmul_forward(d, &t[0], &t[1], &t[2], None, false, true)
        });
        bl.call("cross_entropy_forward", Phase::Forward, &[&lse, &picked, &lr, &tr], move |d, t| {
            cross_entropy::cross_entropy_block_forward(d, &t[0], &t[1], &t[2], &t[3], b, ignore)
        });
        logits.push(lr);
    }
    let b0 = bs[0];
    bl.call("cross_entropy_forward_loss", Phase::Forward, &[o, &lse, &picked, &tr], move |d, t| {
        cross_entropy::cross_entropy_block_loss(d, &t[0], &t[1], &t[2], &t[3], b0, ignore)
    });
    if !bl.training || !bl.needs(h) {
        return Ok(());
    }
    let dh = bl.scratch(&[n, c]);
    bl.save_aux(v, &[&dh]);
    let widest = widths.iter().copied().max().unwrap_or(0);
    let dl = bl.scratch(&[n, widest]);
    for (k, ((&w, lr), (&vk, &b))) in weights.iter().zip(&logits).zip(widths.iter().zip(&bs)).enumerate() {
        let (dlk, wr) = (dl.as_shape(&[n, vk]), bl.v(w));
        bl.call("cross_entropy_backward", Phase::Forward, &[&dlk, lr, &lse, &tr], move |d, t| {
            cross_entropy::cross_entropy_block_backward_unit(d, &t[0], &t[1], &t[2], &t[3], b, ignore)
        });
        bl.call("matmul_backward_input", Phase::Forward, &[&dh, &dlk, &wr], move |d, t| {
            matmul::matmul_backward_input_accumulate(d, &t[0], &t[1], &t[2], false, true, k > 0)
        });
    }
    Ok(())
}

/// dh = dout · (the forward's dh for a loss gradient of one), element by element (dout broadcast as [1] over
/// h seen as one column).
pub(crate) fn linear_backward(bl: &mut Builder, v: Var, dout: &TRef, h: Var) {
    if bl.needs(h) {
        let saved = bl.aux(v, 0);
        let col = [saved.shape.iter().product::<usize>(), 1];
        let saved = saved.as_shape(&col);
        bl.grad_to(h, false, "mul_forward", &[&saved, dout], move |d, t, _| {
            elementwise::mul_forward(d, &t[0].view(&col, DType::F32), &t[1], &t[2])
        });
    }
}
