//! `layernorm` and `rmsnorm` over the last dim; forward saves mean/rstd (rstd) per row for the backward.

use rime_kernels::ops::norm;

use crate::error::Result;
use crate::exec::builder::{Builder, Phase, TRef};
use crate::graph::{shape_err, Graph, Op, Var};

impl Graph {
    pub fn layernorm(&mut self, x: Var, gamma: Var, beta: Var, eps: f32) -> Result<Var> {
        let c = *self.shape(x).last().unwrap_or(&0);
        if self.shape(gamma) != [c] || self.shape(beta) != [c] {
            return Err(shape_err(
                "layernorm",
                format!("x {:?}, gamma {:?}, beta {:?}", self.shape(x), self.shape(gamma), self.shape(beta)),
            ));
        }
        Ok(self.unary(Op::LayerNorm { x, gamma, beta, eps }, x))
    }
    pub fn rmsnorm(&mut self, x: Var, gamma: Var, eps: f32) -> Result<Var> {
        let c = *self.shape(x).last().unwrap_or(&0);
        if self.shape(gamma) != [c] {
            return Err(shape_err("rmsnorm", format!("x {:?}, gamma {:?}", self.shape(x), self.shape(gamma))));
        }
        Ok(self.unary(Op::RmsNorm { x, gamma, eps }, x))
    }
}

fn rows(bl: &Builder, x: Var) -> [usize; 1] {
    [bl.g.shape(x).iter().rev().skip(1).product::<usize>()]
}

pub(crate) fn layernorm_forward(bl: &mut Builder, v: Var, o: &TRef, [x, gamma, beta]: [Var; 3], eps: f32) {
    let rows = rows(bl, x);
    let (mean, rstd) = (bl.scratch(&rows), bl.scratch(&rows));
    bl.save_aux(v, &[&mean, &rstd]);
    let (xr, gr, br) = (bl.v(x), bl.v(gamma), bl.v(beta));
    bl.call("layernorm_forward", Phase::Forward, &[o, &mean, &rstd, &xr, &gr, &br], move |d, t| {
        norm::layernorm_forward(d, &t[0], &t[1], &t[2], &t[3], &t[4], &t[5], eps)
    });
}

/// gamma and beta come from one kernel (both accumulate or neither, else scratch outputs), x from another.
pub(crate) fn layernorm_backward(bl: &mut Builder, v: Var, dout: &TRef, [x, gamma, beta]: [Var; 3]) {
    let (xr, gr) = (bl.v(x), bl.v(gamma));
    let (mean, rstd) = (bl.aux(v, 0), bl.aux(v, 1));
    if bl.needs(gamma) || bl.needs(beta) {
        let tg = bl.target_or_scratch(gamma, true);
        let tb = bl.target_or_scratch(beta, true);
        let acc = tg.accumulate && tb.accumulate;
        let tg = if tg.accumulate && !acc { bl.scratch_target(gamma) } else { tg };
        let tb = if tb.accumulate && !acc { bl.scratch_target(beta) } else { tb };
        bl.call("layernorm_backward_weight", Phase::Backward, &[&tg.r, &tb.r, dout, &xr, &mean, &rstd], move |d, t| {
            norm::layernorm_backward_weight(d, &t[0], &t[1], &t[2], &t[3], &t[4], &t[5], acc)
        });
        bl.finish(&tg);
        bl.finish(&tb);
    }
    bl.grad_to(x, false, "layernorm_backward_input", &[dout, &xr, &mean, &rstd, &gr], |d, t, _| {
        norm::layernorm_backward_input(d, &t[0], &t[1], &t[2], &t[3], &t[4], &t[5])
    });
}

pub(crate) fn rmsnorm_forward(bl: &mut Builder, v: Var, o: &TRef, [x, gamma]: [Var; 2], eps: f32) {
    let rows = rows(bl, x);
    let rstd = bl.scratch(&rows);
    bl.save_aux(v, &[&rstd]);
    let (xr, gr) = (bl.v(x), bl.v(gamma));
    bl.call("rmsnorm_forward", Phase::Forward, &[o, &rstd, &xr, &gr], move |d, t| {
        norm::rmsnorm_forward(d, &t[0], &t[1], &t[2], &t[3], eps)
    });
}

pub(crate) fn rmsnorm_backward(bl: &mut Builder, v: Var, dout: &TRef, [x, gamma]: [Var; 2]) {
    let (xr, gr) = (bl.v(x), bl.v(gamma));
    let rstd = bl.aux(v, 0);
    bl.grad_to(gamma, true, "rmsnorm_backward_weight", &[dout, &xr, &rstd], |d, t, acc| {
        norm::rmsnorm_backward_weight(d, &t[0], &t[1], &t[2], &t[3], acc)
    });
    bl.grad_to(x, false, "rmsnorm_backward_input", &[dout, &xr, &rstd, &gr], |d, t, _| {
        norm::rmsnorm_backward_input(d, &t[0], &t[1], &t[2], &t[3], &t[4])
    });
}
