//! `cross_entropy`: mean over rows whose target is not `ignore_index`; forward saves each row's log-sum-exp.

use rime_kernels::ops::cross_entropy;
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
        Ok(self.push(Op::CrossEntropy { logits, targets, ignore_index }, vec![1], DType::F32, "cross_entropy"))
    }
}

pub(crate) fn forward(bl: &mut Builder, v: Var, o: &TRef, logits: Var, targets: Var, ignore: i32) {
    let n = bl.g.shape(logits)[0];
    let lse = bl.scratch(&[n]);
    bl.save_aux(v, &[&lse]);
    let (lr, tr) = (bl.v(logits), bl.v(targets));
    bl.call("cross_entropy_forward", Phase::Forward, &[o, &lse, &lr, &tr], move |d, t| {
        cross_entropy::cross_entropy_forward(d, &t[0], &t[1], &t[2], &t[3], ignore)
    });
}

pub(crate) fn backward(bl: &mut Builder, v: Var, dout: &TRef, logits: Var, targets: Var, ignore: i32) {
    if bl.needs(logits) {
        let (lr, tr, lse) = (bl.v(logits), bl.v(targets), bl.aux(v, 0));
        bl.grad_to(logits, false, "cross_entropy_backward", &[dout, &lr, &lse, &tr], move |d, t, _| {
            cross_entropy::cross_entropy_backward(d, &t[0], &t[1], &t[2], &t[3], &t[4], ignore)
        });
    }
}
