//! `cross_entropy`: mean over rows whose target is not `ignore_index`; forward saves each row's log-sum-exp.
//! The logits may come as blocks of classes side by side and as a chunk of the targets' rows
//! ([`Graph::cross_entropy_blocks`]): a decoder's output head over a vocabulary too large for one storage
//! binding never builds the whole [tokens, vocabulary] matrix.

use rime_kernels::ops::cross_entropy::{self, Block};
use rime_kernels::DType;

use crate::error::Result;
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
}

/// Each part's block: its first class, all the classes, its rows' first target row.
fn blocks(bl: &Builder, parts: &[Var], row0: usize) -> Vec<Block> {
    let classes: usize = parts.iter().map(|&p| bl.g.shape(p)[1]).sum();
    let mut offset = 0;
    parts
        .iter()
        .enumerate()
        .map(|(k, &p)| {
            let b = Block { row0, offset, classes, first: k == 0 };
            offset += bl.g.shape(p)[1];
            b
        })
        .collect()
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
