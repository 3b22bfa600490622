//! `lora`: x·Wᵀ + scale·(x·Aᵀ)·Bᵀ (+ bias) over a frozen W, fused; forward saves h = x·Aᵀ for the backward.

use rime_kernels::ops::lora;
use rime_kernels::DType;

use crate::error::{Error, Result};
use crate::exec::builder::{Builder, Phase, TRef};
use crate::graph::{shape_err, Graph, Op, Var};

impl Graph {
    /// Linear plus a low-rank update: x·Wᵀ + scale·(x·Aᵀ)·Bᵀ (+ bias), A [R, C], B [OC, R].
    pub fn lora(&mut self, x: Var, w: Var, bias: Option<Var>, a: Var, b: Var, scale: f32) -> Result<Var> {
        let (sx, sw, sa, sb) =
            (self.shape(x).to_vec(), self.shape(w).to_vec(), self.shape(a).to_vec(), self.shape(b).to_vec());
        let c = *sx.last().unwrap_or(&0);
        let ok = sw.len() == 2 && sw[1] == c && sa.len() == 2 && sa[1] == c && sb.len() == 2;
        if !ok || sb[0] != sw[0] || sb[1] != sa[0] {
            return Err(shape_err("lora", format!("x {sx:?}, W {sw:?}, A {sa:?}, B {sb:?}")));
        }
        let mut shape = sx[..sx.len() - 1].to_vec();
        shape.push(sw[0]);
        Ok(self.push(Op::Lora { x, w, bias, a, b, scale }, shape, DType::F32, "lora"))
    }
}

/// The factors and scale of one LoRA node.
pub(crate) struct Lora {
    pub x: Var,
    pub w: Var,
    pub bias: Option<Var>,
    pub a: Var,
    pub b: Var,
    pub scale: f32,
}

pub(crate) fn forward(bl: &mut Builder, v: Var, o: &TRef, l: Lora) {
    let mut h_shape = o.shape[..o.shape.len() - 1].to_vec();
    h_shape.push(bl.g.shape(l.a)[0]);
    let h = bl.scratch(&h_shape);
    bl.save_aux(v, &[&h]);
    let (xr, wr, ar, br, biasr) = (bl.v(l.x), bl.v(l.w), bl.v(l.a), bl.v(l.b), l.bias.map(|z| bl.v(z)));
    let scale = l.scale;
    bl.call_opt("lora_forward", Phase::Forward, &[o, &h, &xr, &wr, &ar, &br], &[biasr.as_ref()], move |d, a| {
        lora::lora_forward(d, &a[0], &a[1], &a[2], &a[3], a.opt(0), &a[4], &a[5], scale)
    });
}

pub(crate) fn backward(bl: &mut Builder, v: Var, dout: &TRef, l: Lora) -> Result<()> {
    if bl.needs(l.w) {
        return Err(Error::Invalid(format!(
            "lora on '{}': the base weight is trainable; LoRA trains A and B over a frozen W",
            bl.g.node(l.w).name
        )));
    }
    let (xr, wr, ar, br) = (bl.v(l.x), bl.v(l.w), bl.v(l.a), bl.v(l.b));
    let h = bl.aux(v, 0);
    let dh = bl.scratch(&h.shape);
    let scale = l.scale;
    if bl.needs(l.a) || bl.needs(l.b) {
        let ta = bl.target_or_scratch(l.a, true);
        let tb = bl.target_or_scratch(l.b, true);
        if ta.accumulate != tb.accumulate {
            return Err(Error::Invalid("lora: A and B gradients must both accumulate or neither".into()));
        }
        let acc = ta.accumulate;
        bl.call("lora_backward_weight", Phase::Backward, &[&ta.r, &tb.r, &dh, dout, &xr, &h, &br], move |d, a| {
            lora::lora_backward_weight(d, &a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6], scale, acc)
        });
        bl.finish(&ta);
        bl.finish(&tb);
    }
    if bl.needs(l.x) {
        let t = bl.target(l.x, false);
        bl.call("lora_backward_input", Phase::Backward, &[&t.r, &dh, dout, &wr, &ar, &br], move |d, a| {
            lora::lora_backward_input(d, &a[0], &a[1], &a[2], &a[3], &a[4], &a[5], scale)
        });
        bl.finish(&t);
    }
    if let Some(bias) = l.bias.filter(|&z| bl.needs(z)) {
        bl.bias_grad(bias, dout);
    }
    Ok(())
}
