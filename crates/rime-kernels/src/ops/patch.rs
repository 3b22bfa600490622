//! Launchers for shaders/patch.wgsl: ViT patch embedding's im2col (stride = kernel = p) and its inverse.

use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::guard::{expect_f32, index_u32};
use crate::{Device, Dispatch, Spec, Tensor};

const FILE: &str = "patch.wgsl";
const WG: u32 = 64;

fn spec() -> Spec {
    Spec::new().constant("WG", WG as f64)
}

pub fn specs() -> Vec<(&'static str, Spec)> {
    vec![(FILE, spec())]
}

/// (B, C, H, W) of an image batch and the patch grid (Hp, Wp) for patch size p, checked.
fn dims(op: &'static str, x_shape: &[usize], p: usize) -> Result<([usize; 4], usize, usize)> {
    if x_shape.len() != 4 || p == 0 || x_shape[2] < p || x_shape[3] < p {
        return Err(shape_err(op, format!("x {x_shape:?} must be [B, C, H, W] with H, W >= patch size {p} >= 1")));
    }
    let d = [x_shape[0], x_shape[1], x_shape[2], x_shape[3]];
    Ok((d, d[2] / p, d[3] / p))
}

/// The output shape of [`patch_unfold`]: [B, Hp·Wp, C·p·p].
pub fn unfolded_shape(x_shape: &[usize], p: usize) -> Result<Vec<usize>> {
    let ([b, c, _, _], hp, wp) = dims("patch_unfold", x_shape, p)?;
    Ok(vec![b, hp * wp, c * p * p])
}

fn launch(
    dev: &Device,
    op: &'static str,
    image: [usize; 4],
    p: usize,
    n: usize,
    bind: &[(u32, &Tensor)],
) -> Result<Vec<Dispatch>> {
    let [b, c, h, w] = image;
    let n = index_u32(op, "elements", n)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let params = words(&[b as u32, c as u32, h as u32, w as u32, p as u32, (h / p) as u32, (w / p) as u32, 0]);
    Ok(vec![dev.dispatch(FILE, op, &spec(), Some(&params), bind, grid_1d(n.div_ceil(WG)))?])
}

/// out [B, Hp·Wp, C·p·p] = the p×p patches of x [B, C, H, W], row-major over the grid, each flattened
/// (c, dy, dx) like a Conv2d weight [OC, C, p, p]; a border narrower than p is dropped, as Conv2d does.
pub fn patch_unfold(dev: &Device, out: &Tensor, x: &Tensor, p: usize) -> Result<Vec<Dispatch>> {
    const OP: &str = "patch_unfold";
    expect_f32(OP, "x", x)?;
    expect_f32(OP, "out", out)?;
    let (image, _, _) = dims(OP, &x.shape, p)?;
    let want = unfolded_shape(&x.shape, p)?;
    if out.shape != want {
        return Err(shape_err(OP, format!("out {:?} must be [B, Hp·Wp, C·p·p] = {want:?}", out.shape)));
    }
    index_u32(OP, "x elements", x.numel())?;
    launch(dev, OP, image, p, out.numel(), &[(1, x), (2, out)])
}

/// dx [B, C, H, W] = the inverse permutation of dout [B, Hp·Wp, C·p·p] (zero on a dropped border; overwritten).
pub fn patch_unfold_backward(dev: &Device, dx: &Tensor, dout: &Tensor, p: usize) -> Result<Vec<Dispatch>> {
    const OP: &str = "patch_unfold_backward";
    expect_f32(OP, "dx", dx)?;
    expect_f32(OP, "dout", dout)?;
    let (image, _, _) = dims(OP, &dx.shape, p)?;
    let want = unfolded_shape(&dx.shape, p)?;
    if dout.shape != want {
        return Err(shape_err(OP, format!("dout {:?} must be [B, Hp·Wp, C·p·p] = {want:?}", dout.shape)));
    }
    index_u32(OP, "dout elements", dout.numel())?;
    launch(dev, OP, image, p, dx.numel(), &[(3, dout), (4, dx)])
}
