//! `softmax` over the last dim with an optional mask and causal masking; the gradient reads the output.

use rime_kernels::ops::softmax;

use crate::exec::builder::{Builder, Phase, TRef};
use crate::graph::{Graph, Op, Var};
use crate::ops::unary::backward_with;

impl Graph {
    pub fn softmax(&mut self, x: Var, mask: Option<Var>, causal: bool) -> Var {
        self.unary(Op::Softmax { x, mask, causal }, x)
    }
}

pub(crate) fn forward(bl: &mut Builder, o: &TRef, x: Var, mask: Option<Var>, causal: bool) {
    let (xr, mr) = (bl.v(x), mask.map(|m| bl.v(m)));
    bl.call_opt("softmax_forward", Phase::Forward, &[o, &xr], &[mr.as_ref()], move |d, t| {
        softmax::softmax_forward(d, &t[0], &t[1], t.opt(0), causal)
    });
}

pub(crate) fn backward(bl: &mut Builder, v: Var, dout: &TRef, x: Var) {
    let y = Some(bl.v(v));
    backward_with(bl, "softmax_backward", x, dout, y, |d, dx, dy, y| {
        softmax::softmax_backward(d, dx, dy, y.expect("saved output"))
    });
}
