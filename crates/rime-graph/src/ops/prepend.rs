//! `prepend`: rows [P, C] in front of every sequence of x [B, T, C] (soft prompts, prefix keys and values).

use rime_kernels::ops::prepend;
use rime_kernels::DType;

use crate::error::Result;
use crate::exec::builder::{Builder, Phase, TRef};
use crate::graph::{shape_err, Graph, Op, Var};

impl Graph {
    /// x [B, T, C] with rows [P, C] put in front of every sequence: [B, P+T, C] (soft prompts, prefix keys and
    /// values). The gradient of x is the last T rows of the output's; that of rows the batch sum of the first P.
    pub fn prepend(&mut self, x: Var, rows: Var) -> Result<Var> {
        let (sx, sr) = (self.shape(x).to_vec(), self.shape(rows).to_vec());
        if sx.len() != 3 || sr.len() != 2 || sr[1] != sx[2] {
            return Err(shape_err("prepend", format!("x {sx:?} must be [B, T, C] and rows {sr:?} [P, C]")));
        }
        Ok(self.push(Op::Prepend { x, rows }, vec![sx[0], sr[0] + sx[1], sx[2]], DType::F32, "prepend"))
    }
}

pub(crate) fn forward(bl: &mut Builder, o: &TRef, x: Var, rows: Var) {
    let (xr, rr) = (bl.v(x), bl.v(rows));
    bl.call("prepend_forward", Phase::Forward, &[o, &xr, &rr], |d, t| prepend::prepend_forward(d, &t[0], &t[1], &t[2]));
}

pub(crate) fn backward(bl: &mut Builder, dout: &TRef, x: Var, rows: Var) {
    bl.grad_to(x, false, "prepend_backward_input", &[dout], |d, t, _| prepend::prepend_backward_input(d, &t[0], &t[1]));
    bl.grad_to(rows, true, "prepend_backward_weight", &[dout], |d, t, acc| {
        prepend::prepend_backward_weight(d, &t[0], &t[1], acc)
    });
}
