//! `patch_unfold`: ViT's patch embedding im2col, x [B, C, H, W] -> [B, (H/p)·(W/p), C·p·p] with the last axis
//! ordered as a Conv2d weight [OC, C, p, p] flattens. A permutation; its gradient is the inverse one.

use rime_kernels::ops::patch;
use rime_kernels::DType;

use crate::error::Result;
use crate::exec::builder::{Builder, Phase, TRef};
use crate::graph::{shape_err, Graph, Op, Var};
use crate::ops::unary::backward_with;

impl Graph {
    /// The p×p patches of x [B, C, H, W] (row-major over the grid), each flattened (c, dy, dx):
    /// [B, (H/p)·(W/p), C·p·p]. A border narrower than p is dropped, as Conv2d with stride p does.
    pub fn patch_unfold(&mut self, x: Var, p: usize) -> Result<Var> {
        let sx = self.shape(x).to_vec();
        if self.node(x).dtype != DType::F32 {
            return Err(shape_err("patch_unfold", format!("x must be F32, got {:?}", self.node(x).dtype)));
        }
        let shape = patch::unfolded_shape(&sx, p).map_err(|_| {
            shape_err("patch_unfold", format!("x {sx:?} must be [B, C, H, W] with H, W >= patch size {p} >= 1"))
        })?;
        Ok(self.push(Op::PatchUnfold { x, p }, shape, DType::F32, "patch_unfold"))
    }

    /// ViT's patch embedding, Conv2d(C, OC, kernel = stride = p) over x [B, C, H, W] as patches ·
    /// Wᵀ (+ bias) with the weight w [OC, C, p, p] viewed as [OC, C·p·p]: [B, (H/p)·(W/p), OC].
    pub fn patch_embed(&mut self, x: Var, w: Var, bias: Option<Var>, p: usize) -> Result<Var> {
        let sw = self.shape(w).to_vec();
        let c = self.shape(x).get(1).copied().unwrap_or(0);
        if sw.len() != 4 || sw[1] != c || sw[2] != p || sw[3] != p {
            return Err(shape_err("patch_embed", format!("weight {sw:?} must be [OC, {c}, {p}, {p}]")));
        }
        let patches = self.patch_unfold(x, p)?;
        let w2 = self.reshape(w, &[sw[0], c * p * p])?;
        self.linear(patches, w2, bias)
    }
}

pub(crate) fn forward(bl: &mut Builder, o: &TRef, x: Var, p: usize) {
    let xr = bl.v(x);
    bl.call("patch_unfold", Phase::Forward, &[o, &xr], move |d, t| patch::patch_unfold(d, &t[0], &t[1], p));
}

pub(crate) fn backward(bl: &mut Builder, dout: &TRef, x: Var, p: usize) {
    backward_with(bl, "patch_unfold_backward", x, dout, None, move |d, dx, dy, _| {
        patch::patch_unfold_backward(d, dx, dy, p)
    });
}
