//! `dora_scale`: DoRA's g = m / ||W + scale·B·A||_row; the norm is detached (peft), so only m gets a gradient.

use rime_kernels::ops::dora;
use rime_kernels::DType;

use crate::error::Result;
use crate::exec::builder::{Builder, Phase, TRef};
use crate::graph::{shape_err, Graph, Op, Var};

impl Graph {
    /// DoRA's scale g = m / ||W + scale·B·A||_row for W [OC, C], A [R, C], B [OC, R], m \[OC\]: the factor that
    /// multiplies a DoRA layer's output row-wise (`mul` with g as the row operand). As in peft the norm is
    /// detached: backward reaches m only, never A or B.
    pub fn dora_scale(&mut self, w: Var, a: Var, b: Var, m: Var, scale: f32) -> Result<Var> {
        let (sw, sa, sb, sm) =
            (self.shape(w).to_vec(), self.shape(a).to_vec(), self.shape(b).to_vec(), self.shape(m).to_vec());
        let ok = sw.len() == 2
            && sa.len() == 2
            && sb.len() == 2
            && sa[1] == sw[1]
            && sb == [sw[0], sa[0]]
            && sm == [sw[0]]
            && self.node(w).dtype == DType::F32;
        if !ok {
            return Err(shape_err(
                "dora_scale",
                format!("W {sw:?} ({:?}, must be F32), A {sa:?}, B {sb:?}, m {sm:?}", self.node(w).dtype),
            ));
        }
        Ok(self.push(Op::DoraScale { w, a, b, m, scale }, vec![sw[0]], DType::F32, "dora_scale"))
    }
}

pub(crate) fn forward(bl: &mut Builder, v: Var, o: &TRef, [w, a, b, m]: [Var; 4], scale: f32) {
    let norm = bl.scratch(&o.shape);
    bl.save_aux(v, &[&norm]);
    let (wr, ar, br, mr) = (bl.v(w), bl.v(a), bl.v(b), bl.v(m));
    bl.call("dora_scale_forward", Phase::Forward, &[o, &norm, &wr, &ar, &br, &mr], move |d, t| {
        dora::dora_scale_forward(d, &t[0], &t[1], &t[2], &t[3], &t[4], &t[5], scale)
    });
}

pub(crate) fn backward(bl: &mut Builder, v: Var, dout: &TRef, m: Var) {
    if bl.needs(m) {
        let norm = bl.aux(v, 0);
        bl.grad_to(m, true, "dora_scale_backward", &[dout, &norm], |d, t, acc| {
            dora::dora_scale_backward(d, &t[0], &t[1], &t[2], acc)
        });
    }
}
