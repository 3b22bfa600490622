//! Launchers for shaders/concat.wgsl: a block of columns written into, or read out of, a wider row-major
//! matrix (concatenation along the last axis and its gradient; the output head of a vocabulary split by rows). Seen as one
//! row, a matrix's chunk of rows is a column block: the graph's row slices use these kernels on such views.

use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::guard::{expect_f32, index_u32};
use crate::{Device, Dispatch, Spec, Tensor};

const FILE: &str = "concat.wgsl";
const WG: u32 = 64;

fn spec() -> Spec {
    Spec::new().constant("WG", WG as f64)
}

pub fn specs() -> Vec<(&'static str, Spec)> {
    vec![(FILE, spec())]
}

/// (rows, part width, whole width) of a part [.., w] and the whole [.., W] with the same leading dimensions.
fn dims(op: &'static str, part: &Tensor, whole: &Tensor, offset: usize) -> Result<(usize, usize, usize)> {
    expect_f32(op, "part", part)?;
    expect_f32(op, "whole", whole)?;
    let (w, total) = (part.last_dim(), whole.last_dim());
    let (pl, wl) = (&part.shape[..part.rank().saturating_sub(1)], &whole.shape[..whole.rank().saturating_sub(1)]);
    if part.rank() == 0 || pl != wl || offset + w > total {
        return Err(shape_err(
            op,
            format!("part {:?} at column {offset} does not fit whole {:?}", part.shape, whole.shape),
        ));
    }
    let n = pl.iter().product::<usize>();
    index_u32(op, "rows * width", n * total)?;
    Ok((n, w, total))
}

fn launch(
    dev: &Device,
    entry: &str,
    src: &Tensor,
    dst: &Tensor,
    d: (usize, usize, usize),
    off: usize,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let (n, w, total) = d;
    // place_cols without accumulating writes the whole destination
    let threads = if entry == "place_cols" && !accumulate { n * total } else { n * w };
    if threads == 0 {
        return Ok(Vec::new());
    }
    let p = words(&[n as u32, w as u32, total as u32, off as u32, accumulate as u32, 0, 0, 0]);
    Ok(vec![dev.dispatch(
        FILE,
        entry,
        &spec(),
        Some(&p),
        &[(1, src), (2, dst)],
        grid_1d((threads as u32).div_ceil(WG)),
    )?])
}

/// whole[.., offset..offset + w] = part[.., :] (part [.., w], whole [.., W], the same leading dimensions).
pub fn concat_cols(dev: &Device, whole: &Tensor, part: &Tensor, offset: usize) -> Result<Vec<Dispatch>> {
    let d = dims("concat_cols", part, whole, offset)?;
    launch(dev, "concat_cols", part, whole, d, offset, false)
}

/// part[.., :] = whole[.., offset..offset + w].
pub fn slice_cols(dev: &Device, part: &Tensor, whole: &Tensor, offset: usize) -> Result<Vec<Dispatch>> {
    let d = dims("slice_cols", part, whole, offset)?;
    launch(dev, "slice_cols", whole, part, d, offset, false)
}

/// whole[.., offset..offset + w] = part and zeros in the other columns, or with `accumulate`
/// whole[.., offset..offset + w] += part and the other columns left as they are.
pub fn place_cols(
    dev: &Device,
    whole: &Tensor,
    part: &Tensor,
    offset: usize,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let d = dims("place_cols", part, whole, offset)?;
    launch(dev, "place_cols", part, whole, d, offset, accumulate)
}
