//! Launchers for shaders/cache.wgsl: a KV cache written in place at a runtime position, and the mask of its
//! filled prefix. The position is a one-element U32 tensor read when the kernel runs, so a decode step's
//! dispatches are built once and replayed with only that tensor rewritten.

use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::guard::{expect_f32, index_u32};
use crate::{DType, Device, Dispatch, Spec, Tensor};

const FILE: &str = "cache.wgsl";
const WG: u32 = 64;

fn spec() -> Spec {
    Spec::new().constant("WG", WG as f64)
}

pub fn specs() -> Vec<(&'static str, Spec)> {
    vec![(FILE, spec())]
}

fn need_pos(op: &'static str, pos: &Tensor) -> Result<()> {
    if pos.dtype != DType::U32 || pos.numel() != 1 {
        return Err(shape_err(op, format!("pos {:?} ({:?}) must be one U32", pos.shape, pos.dtype)));
    }
    Ok(())
}

fn dispatch(dev: &Device, op: &'static str, p: [usize; 4], n: usize, bind: &[(u32, &Tensor)]) -> Result<Vec<Dispatch>> {
    let n = index_u32(op, "elements", n)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let params = words(&[p[0] as u32, p[1] as u32, p[2] as u32, p[3] as u32]);
    Ok(vec![dev.dispatch(FILE, op, &spec(), Some(&params), bind, grid_1d(n.div_ceil(WG)))?])
}

/// Rows pos..pos+T of cache [S, R] = src [T, R], pos read when the kernel runs; rows past S are dropped.
pub fn cache_write(dev: &Device, cache: &Tensor, src: &Tensor, pos: &Tensor) -> Result<Vec<Dispatch>> {
    const OP: &str = "cache_write";
    expect_f32(OP, "cache", cache)?;
    expect_f32(OP, "src", src)?;
    need_pos(OP, pos)?;
    if cache.rank() != 2 || src.rank() != 2 || cache.shape[1] != src.shape[1] || cache.texture.is_some() {
        return Err(shape_err(
            OP,
            format!("cache {:?} must be [S, R] (a plain buffer) and src {:?} [T, R]", cache.shape, src.shape),
        ));
    }
    let (s, t, r) = (cache.shape[0], src.shape[0], src.shape[1]);
    index_u32(OP, "cache elements", cache.numel())?;
    dispatch(dev, OP, [t, r, s, 1], t * r, &[(1, pos), (2, src), (3, cache)])
}

/// mask [B, S] = 1 where s < pos + t, else 0: the filled prefix of a cache after writing t rows at pos.
pub fn cache_mask(dev: &Device, mask: &Tensor, pos: &Tensor, t: usize) -> Result<Vec<Dispatch>> {
    const OP: &str = "cache_mask";
    expect_f32(OP, "mask", mask)?;
    need_pos(OP, pos)?;
    if mask.rank() != 2 {
        return Err(shape_err(OP, format!("mask {:?} must be [B, S]", mask.shape)));
    }
    let (b, s) = (mask.shape[0], mask.shape[1]);
    dispatch(dev, OP, [t, 0, s, b], b * s, &[(1, pos), (4, mask)])
}
