//! `rope`: rotary position embedding of x [B, T, NH, HS] from position `pos_offset`; its gradient is the
//! inverse rotation.

use rime_kernels::ops::rope;

use crate::error::Result;
use crate::exec::builder::{Builder, Phase, TRef};
use crate::graph::{shape_err, Graph, Op, Var};
use crate::ops::unary::{backward_with, forward_with};

impl Graph {
    pub fn rope(&mut self, x: Var, pos_offset: u32, theta: f32) -> Result<Var> {
        if self.shape(x).len() != 4 {
            return Err(shape_err("rope", format!("x must be [B, T, NH, HS], got {:?}", self.shape(x))));
        }
        Ok(self.unary(Op::Rope { x, pos_offset, theta }, x))
    }

    /// [`Graph::rope`] with token 0 at the position held in `pos` (a \[1\] U32 input, see
    /// [`Graph::position_input`]) when the step runs: one built executor serves every decode step.
    pub fn rope_at(&mut self, x: Var, pos: Var, theta: f32) -> Result<Var> {
        if self.shape(x).len() != 4 {
            return Err(shape_err("rope_at", format!("x must be [B, T, NH, HS], got {:?}", self.shape(x))));
        }
        self.need_position("rope_at", pos)?;
        Ok(self.unary(Op::RopeAt { x, pos, theta }, x))
    }
}

pub(crate) fn forward(bl: &mut Builder, o: &TRef, x: Var, pos: u32, theta: f32) {
    forward_with(bl, "rope", o, x, move |d, o, x| rope::rope_forward(d, o, x, pos, theta));
}

pub(crate) fn backward(bl: &mut Builder, dout: &TRef, x: Var, pos: u32, theta: f32) {
    backward_with(bl, "rope_backward", x, dout, None, move |d, dx, dy, _| rope::rope_backward(d, dx, dy, pos, theta));
}

pub(crate) fn at_forward(bl: &mut Builder, o: &TRef, x: Var, pos: Var, theta: f32) {
    let (xr, pr) = (bl.v(x), bl.v(pos));
    bl.call("rope_at", Phase::Forward, &[o, &xr, &pr], move |d, t| {
        rope::rope_forward_at(d, &t[0], &t[1], &t[2], theta)
    });
}

pub(crate) fn at_backward(bl: &mut Builder, dout: &TRef, x: Var, pos: Var, theta: f32) {
    let pr = Some(bl.v(pos));
    backward_with(bl, "rope_backward_at", x, dout, pr, move |d, dx, dy, pos| {
        rope::rope_backward_at(d, dx, dy, pos.expect("position"), theta)
    });
}
