//! `rope`: rotary position embedding of x [B, T, NH, HS] from position `pos_offset`; its gradient is the
//! inverse rotation.

use rime_kernels::ops::rope;

use crate::error::Result;
use crate::exec::builder::{Builder, TRef};
use crate::graph::{shape_err, Graph, Op, Var};
use crate::ops::unary::{backward_with, forward_with};

impl Graph {
    pub fn rope(&mut self, x: Var, pos_offset: u32, theta: f32) -> Result<Var> {
        if self.shape(x).len() != 4 {
            return Err(shape_err("rope", format!("x must be [B, T, NH, HS], got {:?}", self.shape(x))));
        }
        Ok(self.unary(Op::Rope { x, pos_offset, theta }, x))
    }
}

pub(crate) fn forward(bl: &mut Builder, o: &TRef, x: Var, pos: u32, theta: f32) {
    forward_with(bl, "rope", o, x, move |d, o, x| rope::rope_forward(d, o, x, pos, theta));
}

pub(crate) fn backward(bl: &mut Builder, dout: &TRef, x: Var, pos: u32, theta: f32) {
    backward_with(bl, "rope_backward", x, dout, None, move |d, dx, dy, _| rope::rope_backward(d, dx, dy, pos, theta));
}
