//! Launchers for shaders/merge_geo.wgsl: the geometric merges of mergekit (model_stock, nuslerp, multislerp,
//! karcher). Each is, per vector (the whole tensor, each row, or each column), a linear combination of the
//! inputs with coefficients that depend only on the Gram matrix of the inputs (or of their task vectors), so
//! a merge streams twice over the stacked inputs: `merge_gram_forward` chunk by chunk (it accumulates), the
//! coefficients from the Gram matrix (a few numbers per vector, computed by the caller), then
//! `merge_blend_forward` chunk by chunk.

use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::guard::{expect_f32, index_u32};
use crate::{Device, Dispatch, Spec, Tensor};

const FILE: &str = "merge_geo.wgsl";
const WG: u32 = 64;
/// Most elements one invocation of `merge_gram_forward` sums (lavapipe ends a loop after 65535 iterations).
pub const MAX_LOOP: usize = 65535;

pub fn specs() -> Vec<(&'static str, Spec)> {
    vec![(FILE, spec())]
}

fn spec() -> Spec {
    Spec::new().constant("WG", WG as f64)
}

/// Which elements of a tensor of `numel` elements form one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeoLayout {
    /// The whole tensor is one vector; its Gram sums are split over `parts` strided partial sums (slots).
    Whole { parts: usize },
    /// Contiguous rows of `width` elements (torch's `dim=-1` on a tensor viewed as [numel / width, width]).
    Rows { width: usize },
    /// Columns: element g belongs to vector g % `width` (torch's `dim=0` on a tensor viewed as
    /// [numel / width, width]).
    Cols { width: usize },
}

impl GeoLayout {
    /// Gram slots of a tensor of `numel` elements: partial sums (Whole) or vectors.
    pub fn slots(self, numel: usize) -> usize {
        match self {
            GeoLayout::Whole { parts } => parts.max(1),
            GeoLayout::Rows { width } => numel / width.max(1),
            GeoLayout::Cols { width } => width,
        }
    }

    /// Vectors (coefficient rows) of a tensor of `numel` elements.
    pub fn vectors(self, numel: usize) -> usize {
        match self {
            GeoLayout::Whole { .. } => 1,
            _ => self.slots(numel),
        }
    }

    /// Chunk starts must be multiples of this (whole rows, or whole lines of columns).
    pub fn align(self) -> usize {
        match self {
            GeoLayout::Whole { .. } => 1,
            GeoLayout::Rows { width } | GeoLayout::Cols { width } => width.max(1),
        }
    }

    fn code(self) -> (u32, u32) {
        match self {
            GeoLayout::Whole { .. } => (0, 0),
            GeoLayout::Rows { width } => (1, width as u32),
            GeoLayout::Cols { width } => (2, width as u32),
        }
    }
}

/// Entries of the upper triangle of the Gram matrix of `v` vectors (pairs x <= y, row-major).
pub fn gram_pairs(v: usize) -> usize {
    v * (v + 1) / 2
}

/// How `merge_blend_forward` combines the K stacked rows with a vector's K + 1 coefficients c.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlendMode {
    /// (sum_k c\[k] x_k) / c\[K].
    Linear,
    /// x_0 + (sum_{k>=1} c\[k] (x_k - x_0)) / c\[K]: task vectors about the base in row 0.
    Delta,
    /// model_stock: c\[0] * mean(x_1..x_{K-1}) + c\[1] * x_0.
    Stock,
}

#[allow(clippy::too_many_arguments)]
fn params(
    n: usize,
    rows: usize,
    j: usize,
    a: u32,
    b: u32,
    cnt: u32,
    slot0: usize,
    sub: bool,
    more: [u32; 5],
) -> Vec<u8> {
    words(&[
        n as u32,
        rows as u32,
        j as u32,
        a,
        b,
        cnt,
        slot0 as u32,
        sub as u32,
        more[0],
        more[1],
        more[2],
        more[3],
        more[4],
        0,
        0,
        0,
    ])
}

fn stacked(op: &'static str, xs: &Tensor, min_rows: usize) -> Result<(usize, usize)> {
    expect_f32(op, "xs", xs)?;
    if xs.rank() != 2 || xs.shape[0] < min_rows {
        return Err(shape_err(op, format!("xs must be [K, n] with K >= {min_rows}, got shape {:?}", xs.shape)));
    }
    index_u32(op, "the element count of xs", xs.numel())?;
    Ok((xs.shape[0], xs.shape[1]))
}

/// Checks that a chunk of `n` elements at `offset` of a tensor of `numel` elements fits `layout`.
fn check_chunk(op: &'static str, layout: GeoLayout, offset: usize, n: usize, numel: usize) -> Result<()> {
    index_u32(op, "the tensor's element count", numel)?;
    if offset + n > numel {
        return Err(shape_err(
            op,
            format!("chunk [{offset}, {}) is outside the tensor of {numel} elements", offset + n),
        ));
    }
    match layout {
        GeoLayout::Whole { parts: 0 } => Err(shape_err(op, "Whole layout needs parts >= 1")),
        GeoLayout::Rows { width } | GeoLayout::Cols { width } if width == 0 || !numel.is_multiple_of(width) => {
            Err(shape_err(op, format!("vector width {width} does not divide the tensor's {numel} elements")))
        }
        GeoLayout::Rows { width } | GeoLayout::Cols { width } if !offset.is_multiple_of(width) => {
            Err(shape_err(op, format!("chunk offset {offset} is not a multiple of the vector width {width}")))
        }
        GeoLayout::Rows { width } if !n.is_multiple_of(width) => {
            Err(shape_err(op, format!("chunk of {n} elements does not hold whole rows of {width}")))
        }
        _ => Ok(()),
    }
}

/// Accumulates the Gram matrix of the vectors in the chunk `xs` [K, n] (elements [offset, offset + n) of a
/// tensor of `numel` elements) into `gram` [slots, pairs, 2] (compensated sum and its compensation; zero it
/// before the first chunk). With `sub_base` the vectors are the task vectors x_k - x_0 (k >= 1), else the
/// K rows. Pairs (x, y), x <= y, row-major (see [`gram_pairs`]); slots as [`GeoLayout::slots`]. The Gram
/// entry of a vector is the sum of its slots' sum + compensation (Whole: over all parts). One invocation sums at
/// most [`MAX_LOOP`] elements of the chunk (n / parts, the row width, or n / width): more is an error.
pub fn merge_gram_forward(
    dev: &Device,
    gram: &Tensor,
    xs: &Tensor,
    layout: GeoLayout,
    offset: usize,
    numel: usize,
    sub_base: bool,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_gram_forward";
    let (k, n) = stacked(OP, xs, 1 + sub_base as usize)?;
    check_chunk(OP, layout, offset, n, numel)?;
    expect_f32(OP, "gram", gram)?;
    let m = gram_pairs(k - sub_base as usize);
    let slots = layout.slots(numel);
    if gram.numel() != slots * m * 2 {
        return Err(shape_err(
            OP,
            format!("gram {:?} must hold {slots} slots x {m} pairs x 2 = {} values", gram.shape, slots * m * 2),
        ));
    }
    let (j, a, b, cnt, slot0) = match layout {
        GeoLayout::Whole { parts } => (parts, 1, parts as u32, u32::MAX, 0),
        GeoLayout::Rows { width } => (n / width, width as u32, 1, width as u32, offset / width),
        GeoLayout::Cols { width } => (width, 1, width as u32, u32::MAX, 0),
    };
    // Elements one invocation visits: lavapipe (llvmpipe) ends any loop after 65535 iterations.
    let per = match layout {
        GeoLayout::Whole { parts } => n.div_ceil(parts),
        GeoLayout::Rows { width } => width,
        GeoLayout::Cols { width } => n.div_ceil(width),
    };
    if per > MAX_LOOP {
        return Err(shape_err(
            OP,
            format!("{layout:?} over a chunk of {n} elements makes one invocation sum {per} > {MAX_LOOP} elements"),
        ));
    }
    let groups = (j as u32).div_ceil(WG);
    if groups > 65535 || m > 65535 {
        return Err(shape_err(OP, format!("{j} vectors x {m} pairs exceed one dispatch grid")));
    }
    if j == 0 || n == 0 {
        return Ok(Vec::new());
    }
    let p = params(n, k, j, a, b, cnt, slot0, sub_base, [0, 0, 0, 0, m as u32]);
    Ok(vec![dev.dispatch(FILE, OP, &spec(), Some(&p), &[(2, xs), (3, gram)], [groups, m as u32, 1])?])
}

/// out \[n] = the blend (see [`BlendMode`]) of the chunk `xs` [K, n] (elements [offset, offset + n) of a
/// tensor of `numel` elements) with each element's vector's coefficients, `coef` [vectors, K + 1].
#[allow(clippy::too_many_arguments)]
pub fn merge_blend_forward(
    dev: &Device,
    out: &Tensor,
    xs: &Tensor,
    coef: &Tensor,
    layout: GeoLayout,
    offset: usize,
    numel: usize,
    mode: BlendMode,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_blend_forward";
    let min = if mode == BlendMode::Linear { 1 } else { 2 };
    let (k, n) = stacked(OP, xs, min)?;
    check_chunk(OP, layout, offset, n, numel)?;
    expect_f32(OP, "out", out)?;
    expect_f32(OP, "coef", coef)?;
    if out.numel() != n {
        return Err(shape_err(OP, format!("out {:?} must hold the chunk's {n} elements", out.shape)));
    }
    let want = layout.vectors(numel) * (k + 1);
    if coef.numel() != want {
        return Err(shape_err(OP, format!("coef {:?} must hold {want} values (vectors x (K + 1))", coef.shape)));
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let (code, width) = layout.code();
    let mode = match mode {
        BlendMode::Linear => 0,
        BlendMode::Delta => 1,
        BlendMode::Stock => 2,
    };
    let p = params(n, k, 0, 0, 0, 0, 0, false, [mode, code, width, offset as u32, 0]);
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &spec(),
        Some(&p),
        &[(1, out), (2, xs), (4, coef)],
        grid_1d((n as u32).div_ceil(WG)),
    )?])
}

/// Checks a chunk `xs` [2, n] (base, model) of whole rows of `width` at `offset` of a tensor of `numel`.
fn fusion_chunk(op: &'static str, xs: &Tensor, width: usize, offset: usize, numel: usize) -> Result<usize> {
    let (k, n) = stacked(op, xs, 2)?;
    if k != 2 {
        return Err(shape_err(op, format!("xs must be [2, n] (base, model), got {:?}", xs.shape)));
    }
    check_chunk(op, GeoLayout::Rows { width }, offset, n, numel)?;
    Ok(n)
}

/// arcee_fusion's per-row KL(softmax(x) + 1e-8 || softmax(b) + 1e-8) of the chunk `xs` [2, n] (row 0 the base
/// b, row 1 the model x; whole rows of `width`, elements [offset, offset + n) of a tensor of `numel`) into
/// `kl` [numel / width] at row offset / width. A row is summed by one invocation in three loops, so `width`
/// is at most [`MAX_LOOP`] / 3.
pub fn merge_fusion_kl_forward(
    dev: &Device,
    kl: &Tensor,
    xs: &Tensor,
    width: usize,
    offset: usize,
    numel: usize,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_fusion_kl_forward";
    let n = fusion_chunk(OP, xs, width, offset, numel)?;
    expect_f32(OP, "kl", kl)?;
    if kl.numel() != numel / width {
        return Err(shape_err(OP, format!("kl {:?} must hold the tensor's {} rows", kl.shape, numel / width)));
    }
    if 3 * width > MAX_LOOP {
        return Err(shape_err(
            OP,
            format!("rows of {width} elements exceed {} (three loops of one invocation)", MAX_LOOP / 3),
        ));
    }
    let j = n / width;
    if j == 0 {
        return Ok(Vec::new());
    }
    let p = params(n, 2, j, 0, 0, 0, offset / width, false, [0, 1, width as u32, offset as u32, 0]);
    Ok(vec![dev.dispatch(FILE, OP, &spec(), Some(&p), &[(2, xs), (3, kl)], grid_1d((j as u32).div_ceil(WG)))?])
}

/// arcee_fusion's importance |x - b| * kl\[row] of the chunk `xs` [2, n] into `importance` [numel] at
/// [offset, offset + n).
pub fn merge_fusion_importance_forward(
    dev: &Device,
    importance: &Tensor,
    xs: &Tensor,
    kl: &Tensor,
    width: usize,
    offset: usize,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_fusion_importance_forward";
    expect_f32(OP, "importance", importance)?;
    expect_f32(OP, "kl", kl)?;
    let numel = importance.numel();
    let n = fusion_chunk(OP, xs, width, offset, numel)?;
    if kl.numel() != numel / width {
        return Err(shape_err(OP, format!("kl {:?} must hold the tensor's {} rows", kl.shape, numel / width)));
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let p = params(n, 2, 0, 0, 0, 0, 0, false, [0, 1, width as u32, offset as u32, 0]);
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &spec(),
        Some(&p),
        &[(1, importance), (2, xs), (4, kl)],
        grid_1d((n as u32).div_ceil(WG)),
    )?])
}

/// arcee_fusion's merge of the chunk `xs` [2, n]: out \[n] = b + (x - b) * (importance >= threshold), with the
/// importance of the whole tensor, `importance` [numel], read at [offset, offset + n).
pub fn merge_fusion_forward(
    dev: &Device,
    out: &Tensor,
    xs: &Tensor,
    importance: &Tensor,
    threshold: f32,
    offset: usize,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_fusion_forward";
    expect_f32(OP, "out", out)?;
    expect_f32(OP, "importance", importance)?;
    let numel = importance.numel();
    let n = fusion_chunk(OP, xs, 1, offset, numel)?;
    if out.numel() != n {
        return Err(shape_err(OP, format!("out {:?} must hold the chunk's {n} elements", out.shape)));
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let p = params(n, 2, 0, threshold.to_bits(), 0, 0, 0, false, [0, 0, 1, offset as u32, 0]);
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &spec(),
        Some(&p),
        &[(1, out), (2, xs), (4, importance)],
        grid_1d((n as u32).div_ceil(WG)),
    )?])
}
