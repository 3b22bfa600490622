//! `add` and `mul`: elementwise over equal shapes, or with the second operand a row broadcast over the last
//! dim (a bias, a per-channel scale such as DoRA's g or ViT's LayerScale).

use rime_kernels::ops::elementwise;
use rime_kernels::DType;

use crate::error::Result;
use crate::exec::builder::{Builder, Phase, TRef};
use crate::graph::{shape_err, Graph, Op, Var};

impl Graph {
    fn same_or_row(&self, op: &'static str, a: Var, b: Var) -> Result<Vec<usize>> {
        let (sa, sb) = (self.shape(a), self.shape(b));
        let ok = sa == sb || (sb.len() == 1 && sa.last() == sb.last());
        if !ok {
            return Err(shape_err(op, format!("{sa:?} with {sb:?} (same shape or a row of the last dim)")));
        }
        Ok(sa.to_vec())
    }

    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let s = self.same_or_row("add", a, b)?;
        Ok(self.push(Op::Add { a, b }, s, DType::F32, "add"))
    }
    pub fn mul(&mut self, a: Var, b: Var) -> Result<Var> {
        let s = self.same_or_row("mul", a, b)?;
        Ok(self.push(Op::Mul { a, b }, s, DType::F32, "mul"))
    }
}

pub(crate) fn add_forward(bl: &mut Builder, o: &TRef, a: Var, b: Var) {
    let (ar, br) = (bl.v(a), bl.v(b));
    bl.call("add_forward", Phase::Forward, &[o, &ar, &br], |d, t| elementwise::add_forward(d, &t[0], &t[1], &t[2]));
}

/// Each addend gets the output gradient: a broadcast row its column sums; the first addend may take over
/// the output gradient's buffer (nothing reads it later); otherwise it is copied or added in.
pub(crate) fn add_backward(bl: &mut Builder, v: Var, dout: &TRef, a: Var, b: Var) {
    for (k, x) in [a, b].into_iter().enumerate() {
        if !bl.needs(x) {
            continue;
        }
        if bl.g.shape(x).len() == 1 && bl.g.shape(x) != bl.g.shape(v) {
            bl.bias_grad(x, dout);
            continue;
        }
        let alias_ok = k == 0 && !bl.grad_ref.contains_key(&x) && bl.is_train_param(x).is_none();
        if alias_ok {
            let r = dout.as_shape(bl.g.shape(x));
            bl.grad_ref.insert(x, r);
            continue;
        }
        let t = bl.target(x, true);
        let acc = t.accumulate;
        let name = if acc { "add_inplace" } else { "scale_forward" };
        bl.call(name, Phase::Backward, &[&t.r, dout], move |d, r| {
            if acc {
                elementwise::add_inplace_forward(d, &r[0], &r[1], 1.0)
            } else {
                elementwise::scale_forward(d, &r[0], &r[1], 1.0)
            }
        });
    }
}

pub(crate) fn mul_forward(bl: &mut Builder, o: &TRef, a: Var, b: Var) {
    let (ar, br) = (bl.v(a), bl.v(b));
    bl.call("mul_forward", Phase::Forward, &[o, &ar, &br], |d, t| elementwise::mul_forward(d, &t[0], &t[1], &t[2]));
}

/// One kernel writes both gradients (a broadcast row's summed over rows); either may be absent.
pub(crate) fn mul_backward(bl: &mut Builder, dout: &TRef, a: Var, b: Var) {
    let (ar, br) = (bl.v(a), bl.v(b));
    let ta = bl.needs(a).then(|| bl.target(a, false));
    let tb = bl.needs(b).then(|| bl.target(b, false));
    let opt = [ta.as_ref().map(|t| &t.r), tb.as_ref().map(|t| &t.r)];
    bl.call_opt("mul_backward", Phase::Backward, &[dout, &ar, &br], &opt, |d, t| {
        elementwise::mul_backward(d, t.opt(0), t.opt(1), &t[0], &t[1], &t[2])
    });
    for t in [ta, tb].iter().flatten() {
        bl.finish(t);
    }
}
