//! Launchers for shaders/rope.wgsl: rotary position embedding in the Hugging Face Llama "rotate_half"
//! convention, x [B, T, NH, HS], token t at position pos_offset + t, inv_freq_i = theta^(-2i/HS).

use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::guard::{expect_f32, expect_nonempty, index_u32};
use crate::{Device, Dispatch, Spec, Tensor};

const FILE: &str = "rope.wgsl";
const WG: u32 = 64;
/// The uniform block holds 64 vec4 of inverse frequencies.
pub const MAX_HEAD_SIZE: usize = 512;

fn spec() -> Spec {
    Spec::new().constant("WG", WG as f64)
}

pub fn specs() -> Vec<(&'static str, Spec)> {
    vec![(FILE, spec())]
}

/// inv_freq as transformers computes it in float32: 1 / theta ** (arange(0, HS, 2).float() / HS).
pub fn inv_freq(hs: usize, theta: f32) -> Vec<f32> {
    (0..hs / 2)
        .map(|i| {
            let e = (2 * i) as f32 / hs as f32;
            1.0f32 / ((theta as f64).powf(e as f64) as f32)
        })
        .collect()
}

/// Where token 0's position comes from: a constant, or a one-element U32 tensor read when the kernel runs.
enum Pos<'a> {
    Const(u32),
    Buf(&'a Tensor),
}

fn launch(op: &'static str, dev: &Device, out: &Tensor, x: &Tensor, pos: Pos, theta: f32) -> Result<Vec<Dispatch>> {
    expect_f32(op, "input", x)?;
    expect_f32(op, "output", out)?;
    expect_nonempty(op, "input", x)?;
    if x.rank() != 4 || out.shape != x.shape {
        return Err(shape_err(
            op,
            format!("input {:?} and output {:?} must both be [B, T, NH, HS]", x.shape, out.shape),
        ));
    }
    let (t, nh, hs) = (x.shape[1], x.shape[2], x.shape[3]);
    if hs % 2 != 0 || hs > MAX_HEAD_SIZE {
        return Err(shape_err(
            op,
            format!("head size {hs} (x {:?}) must be even and at most {MAX_HEAD_SIZE}", x.shape),
        ));
    }
    if !(theta > 1.0 && theta.is_finite()) {
        return Err(shape_err(op, format!("theta {theta} must be finite and > 1")));
    }
    let pairs = index_u32(op, "pairs", x.numel() / 2)?;
    let pos_offset = match pos {
        Pos::Const(p) => p,
        Pos::Buf(b) => {
            if b.dtype != crate::DType::U32 || b.numel() != 1 {
                return Err(shape_err(op, format!("pos {:?} ({:?}) must be one U32", b.shape, b.dtype)));
            }
            0
        }
    };
    let last = pos_offset as u64 + t as u64;
    if last > 1 << 24 {
        return Err(shape_err(op, format!("positions up to {last} exceed f32's exact integers")));
    }
    let mut w = vec![pairs, t as u32, nh as u32, hs as u32, pos_offset, 0, 0, 0];
    let mut f: Vec<u32> = inv_freq(hs, theta).iter().map(|v| v.to_bits()).collect();
    f.resize(MAX_HEAD_SIZE / 2, 0);
    w.extend(f);
    let grid = grid_1d(pairs.div_ceil(WG));
    match pos {
        Pos::Const(_) => Ok(vec![dev.dispatch(FILE, op, &spec(), Some(&words(&w)), &[(1, x), (2, out)], grid)?]),
        Pos::Buf(b) => {
            Ok(vec![dev.dispatch(FILE, op, &spec(), Some(&words(&w)), &[(1, x), (2, out), (3, b)], grid)?])
        }
    }
}

/// out = x rotated: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) with x1 = x[.., :HS/2], x2 = x[.., HS/2:].
pub fn rope_forward(dev: &Device, out: &Tensor, x: &Tensor, pos_offset: u32, theta: f32) -> Result<Vec<Dispatch>> {
    launch("rope_forward", dev, out, x, Pos::Const(pos_offset), theta)
}

/// dx = the inverse (transposed) rotation of dout.
pub fn rope_backward(dev: &Device, dx: &Tensor, dout: &Tensor, pos_offset: u32, theta: f32) -> Result<Vec<Dispatch>> {
    launch("rope_backward", dev, dx, dout, Pos::Const(pos_offset), theta)
}

/// [`rope_forward`] with token 0 at the position held in `pos` (one U32, read when the kernel runs): one
/// recorded dispatch serves every decode step. Positions must stay below 2^24 (f32's exact integers).
pub fn rope_forward_at(dev: &Device, out: &Tensor, x: &Tensor, pos: &Tensor, theta: f32) -> Result<Vec<Dispatch>> {
    launch("rope_forward_at", dev, out, x, Pos::Buf(pos), theta)
}

/// [`rope_backward`] with token 0 at the position held in `pos`.
pub fn rope_backward_at(dev: &Device, dx: &Tensor, dout: &Tensor, pos: &Tensor, theta: f32) -> Result<Vec<Dispatch>> {
    launch("rope_backward_at", dev, dx, dout, Pos::Buf(pos), theta)
}
