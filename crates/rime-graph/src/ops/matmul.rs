//! `matmul`: out = op(a)·op(b) (+ bias), and PyTorch's `linear` on top of it.

use rime_kernels::ops::matmul;
use rime_kernels::DType;

use crate::error::Result;
use crate::exec::builder::{Builder, Phase, TRef};
use crate::graph::{shape_err, Graph, Op, Var};

impl Graph {
    /// out = op(a)·op(b) (+ bias); b is 2-D (shared) or batched like a.
    pub fn matmul_ex(&mut self, a: Var, b: Var, bias: Option<Var>, ta: bool, tb: bool) -> Result<Var> {
        let (sa, sb) = (self.shape(a).to_vec(), self.shape(b).to_vec());
        if sa.len() < 2 || sb.len() < 2 {
            return Err(shape_err("matmul", format!("operands must be at least 2-D: {sa:?} · {sb:?}")));
        }
        let (m, k) = if ta { (sa[sa.len() - 1], sa[sa.len() - 2]) } else { (sa[sa.len() - 2], sa[sa.len() - 1]) };
        let (kb, n) = if tb { (sb[sb.len() - 1], sb[sb.len() - 2]) } else { (sb[sb.len() - 2], sb[sb.len() - 1]) };
        if k != kb {
            return Err(shape_err("matmul", format!("inner dimensions differ: {sa:?} (t={ta}) · {sb:?} (t={tb})")));
        }
        if sb.len() > 2 && sb[..sb.len() - 2] != sa[..sa.len() - 2] {
            return Err(shape_err("matmul", format!("batch dimensions differ: {sa:?} · {sb:?}")));
        }
        if let Some(bv) = bias {
            if self.shape(bv) != [n] {
                return Err(shape_err("matmul", format!("bias {:?} for {n} outputs", self.shape(bv))));
            }
        }
        let mut shape = sa[..sa.len() - 2].to_vec();
        shape.extend([m, n]);
        Ok(self.push(Op::Matmul { a, b, bias, ta, tb }, shape, DType::F32, "matmul"))
    }

    pub fn matmul(&mut self, a: Var, b: Var) -> Result<Var> {
        self.matmul_ex(a, b, None, false, false)
    }

    /// PyTorch Linear: x [.., C] · Wᵀ (W [OC, C]) + bias.
    pub fn linear(&mut self, x: Var, w: Var, bias: Option<Var>) -> Result<Var> {
        self.matmul_ex(x, w, bias, false, true)
    }
}

pub(crate) fn forward(b: &mut Builder, o: &TRef, x: Var, w: Var, bias: Option<Var>, ta: bool, tb: bool) {
    let (xr, wr, biasr) = (b.v(x), b.v(w), bias.map(|v| b.v(v)));
    b.call_opt("matmul_forward", Phase::Forward, &[o, &xr, &wr], &[biasr.as_ref()], move |d, a| {
        matmul::matmul_forward(d, &a[0], &a[1], &a[2], a.opt(0), ta, tb)
    });
}

/// da = dout·op(b)ᵀ-ish (the launcher handles the transposes), db accumulates, the bias gets the column sums.
pub(crate) fn backward(b: &mut Builder, dout: &TRef, x: Var, w: Var, bias: Option<Var>, ta: bool, tb: bool) {
    let (xr, wr) = (b.v(x), b.v(w));
    b.grad_to(x, false, "matmul_backward_input", &[dout, &wr], move |d, a, _| {
        matmul::matmul_backward_input(d, &a[0], &a[1], &a[2], ta, tb)
    });
    b.grad_to(w, true, "matmul_backward_weight", &[dout, &xr], move |d, a, acc| {
        matmul::matmul_backward_weight(d, &a[0], &a[2], &a[1], ta, tb, acc)
    });
    if let Some(bias) = bias.filter(|&v| b.needs(v)) {
        b.bias_grad(bias, dout);
    }
}
