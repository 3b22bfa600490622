//! One-input elementwise ops: `scale`, `gelu`, `silu`, `relu`, `dropout` (and the builder's generic shape rule).

use rime_kernels::ops::elementwise;
use rime_kernels::{DType, Device, Tensor};

use crate::exec::builder::{Builder, KResult, Phase, TRef};
use crate::graph::{Graph, Op, Var};

impl Graph {
    /// An op whose output has x's shape.
    pub(crate) fn unary(&mut self, op: Op, x: Var) -> Var {
        let sh = self.shape(x).to_vec();
        let name = op.name();
        self.push(op, sh, DType::F32, name)
    }
    pub fn scale(&mut self, x: Var, s: f32) -> Var {
        let sh = self.shape(x).to_vec();
        self.push(Op::Scale { x, s }, sh, DType::F32, "scale")
    }
    pub fn gelu(&mut self, x: Var, tanh: bool) -> Var {
        self.unary(Op::Gelu { x, tanh }, x)
    }
    pub fn silu(&mut self, x: Var) -> Var {
        self.unary(Op::Silu { x }, x)
    }
    pub fn relu(&mut self, x: Var) -> Var {
        self.unary(Op::Relu { x }, x)
    }
    /// Dropout with probability p. `seed` tells dropouts of one graph apart; the executor mixes it with the step
    /// (see [`crate::dropout_seed`]) so each training step draws a fresh mask, shared by that step's forward and
    /// backward. Build evaluation graphs without dropout.
    pub fn dropout(&mut self, x: Var, p: f32, seed: u32) -> Var {
        if p <= 0.0 {
            return x;
        }
        self.unary(Op::Dropout { x, p, seed }, x)
    }
}

/// Forward of a one-input op: `f(dev, out, x)`.
pub(crate) fn forward_with(
    bl: &mut Builder,
    name: &'static str,
    o: &TRef,
    x: Var,
    f: impl Fn(&Device, &Tensor, &Tensor) -> KResult + 'static,
) -> usize {
    let xr = bl.v(x);
    bl.call(name, Phase::Forward, &[o, &xr], move |d, t| f(d, &t[0], &t[1]))
}

/// Backward of a one-input op: `f(dev, dx, dout, saved)`, `saved` being x or the output when the rule needs it.
pub(crate) fn backward_with(
    bl: &mut Builder,
    name: &'static str,
    x: Var,
    dout: &TRef,
    saved: Option<TRef>,
    f: impl Fn(&Device, &Tensor, &Tensor, Option<&Tensor>) -> KResult + 'static,
) -> Option<usize> {
    let has_saved = saved.is_some();
    let reads: Vec<&TRef> = [Some(dout), saved.as_ref()].into_iter().flatten().collect();
    bl.grad_to(x, false, name, &reads, move |d, t, _| f(d, &t[0], &t[1], has_saved.then(|| &t[2])))
}

pub(crate) fn forward(bl: &mut Builder, o: &TRef, op: &Op) {
    match *op {
        Op::Scale { x, s } => forward_with(bl, "scale", o, x, move |d, o, x| elementwise::scale_forward(d, o, x, s)),
        Op::Gelu { x, tanh } => forward_with(bl, "gelu", o, x, move |d, o, x| elementwise::gelu_forward(d, o, x, tanh)),
        Op::Silu { x } => forward_with(bl, "silu", o, x, elementwise::silu_forward),
        Op::Relu { x } => forward_with(bl, "relu", o, x, elementwise::relu_forward),
        Op::Dropout { x, p, seed } => {
            let ci = forward_with(bl, "dropout", o, x, move |d, o, x| elementwise::dropout_forward(d, o, x, p, seed));
            bl.calls[ci].reseed = Some(seed);
            ci
        }
        _ => return,
    };
}

pub(crate) fn backward(bl: &mut Builder, dout: &TRef, op: &Op) {
    match *op {
        Op::Scale { x, s } => backward_with(bl, "scale_forward", x, dout, None, move |d, dx, dy, _| {
            elementwise::scale_forward(d, dx, dy, s)
        }),
        Op::Gelu { x, tanh } => {
            let xr = Some(bl.v(x));
            backward_with(bl, "gelu_backward", x, dout, xr, move |d, dx, dy, x| {
                elementwise::gelu_backward(d, dx, dy, x.expect("saved x"), tanh)
            })
        }
        Op::Silu { x } => {
            let xr = Some(bl.v(x));
            backward_with(bl, "silu_backward", x, dout, xr, |d, dx, dy, x| {
                elementwise::silu_backward(d, dx, dy, x.expect("saved x"))
            })
        }
        Op::Relu { x } => {
            let xr = Some(bl.v(x));
            backward_with(bl, "relu_backward", x, dout, xr, |d, dx, dy, x| {
                elementwise::relu_backward(d, dx, dy, x.expect("saved x"))
            })
        }
        Op::Dropout { x, p, seed } => {
            let ci = backward_with(bl, "dropout_backward", x, dout, None, move |d, dx, dy, _| {
                elementwise::dropout_backward(d, dx, dy, p, seed)
            });
            if let Some(ci) = ci {
                bl.calls[ci].reseed = Some(seed);
            }
            ci
        }
        _ => None,
    };
}
