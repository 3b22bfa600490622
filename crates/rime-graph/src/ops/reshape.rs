//! `reshape`: a view of the same buffer; the gradient is the output gradient seen with x's shape.

use rime_kernels::ops::elementwise;

use crate::error::Result;
use crate::exec::builder::{Builder, Phase, TRef};
use crate::graph::{shape_err, Graph, Op, Var};

impl Graph {
    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Result<Var> {
        let n: usize = shape.iter().product();
        let have: usize = self.shape(x).iter().product();
        if n != have {
            return Err(shape_err("reshape", format!("{:?} -> {shape:?}", self.shape(x))));
        }
        let dt = self.node(x).dtype;
        Ok(self.push(Op::Reshape { x }, shape.to_vec(), dt, "reshape"))
    }
}

/// The first gradient of x takes over dout's buffer; later ones (or a parameter's) are added in.
pub(crate) fn backward(bl: &mut Builder, dout: &TRef, x: Var) {
    if !bl.needs(x) {
        return;
    }
    let as_x = dout.as_shape(bl.g.shape(x));
    if !bl.grad_ref.contains_key(&x) && bl.is_train_param(x).is_none() {
        bl.grad_ref.insert(x, as_x);
        return;
    }
    let t = bl.target(x, true);
    bl.call("add_inplace", Phase::Backward, &[&t.r, &as_x], |d, a| {
        elementwise::add_inplace_forward(d, &a[0], &a[1], 1.0)
    });
}
