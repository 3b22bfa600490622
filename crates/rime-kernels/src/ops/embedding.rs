//! Launchers for shaders/embedding.wgsl: token embedding lookup from an f32, f16 or bf16 table and its
//! deterministic scatter-add gradient.

use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::guard::{expect_dtype, expect_f32, index_u32, FLOATS};
use crate::{DType, Device, Dispatch, Spec, Tensor};

const FILE: &str = "embedding.wgsl";
const WG: u32 = 64;

fn spec(table: DType) -> Spec {
    let (ty, load) = match table {
        DType::F16 => ("u32", "unpack_f16(table[i >> 1u], i)"),
        DType::BF16 => ("u32", "unpack_bf16(table[i >> 1u], i)"),
        _ => ("f32", "table[i]"),
    };
    Spec::new()
        .prelude(format!(
            "@group(0) @binding(2) var<storage, read> table: array<{ty}>;\nfn load_w(i: u32) -> f32 {{ return {load}; }}"
        ))
        .constant("WG", WG as f64)
}

pub fn specs() -> Vec<(&'static str, Spec)> {
    vec![(FILE, spec(DType::F32)), (FILE, spec(DType::F16)), (FILE, spec(DType::BF16))]
}

fn check_ids(op: &'static str, ids: &Tensor) -> Result<usize> {
    expect_dtype(op, "ids", ids, &[DType::U32, DType::I32])?;
    Ok(ids.numel())
}

/// out [N, C] = rows of table [V, C] (f32, f16 or bf16) picked by ids \[N] (U32). An id >= V (or a negative
/// I32 id) yields a zero row: the launcher cannot read ids, so out-of-range ids are not reported here.
pub fn embedding_forward(dev: &Device, out: &Tensor, ids: &Tensor, table: &Tensor) -> Result<Vec<Dispatch>> {
    embedding_forward_offset(dev, out, ids, table, 0)
}

/// [`embedding_forward`] for a table holding rows `offset..offset + V` of a larger vocabulary (a table split by
/// rows): out row i is table row ids[i] - offset, zero when ids[i] is outside that range. Summing the outputs
/// of every part gives the lookup in the whole table.
pub fn embedding_forward_offset(
    dev: &Device,
    out: &Tensor,
    ids: &Tensor,
    table: &Tensor,
    offset: u32,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "embedding_forward";
    if let Some(w) = crate::QTensor::from_tensor(table) {
        return super::qmatmul::qembedding_forward_offset(dev, out, &ids.reshape(&[ids.numel()])?, &w, offset);
    }
    let n = check_ids(OP, ids)?;
    expect_dtype(OP, "table", table, FLOATS)?;
    if table.rank() != 2 {
        return Err(shape_err(OP, format!("table {:?} must be [V, C]", table.shape)));
    }
    let (v, c) = (table.shape[0], table.shape[1]);
    expect_f32(OP, "out", out)?;
    if out.shape != [n, c] {
        return Err(shape_err(
            OP,
            format!("out {:?} must be [N, C] = [{n}, {c}] (ids {:?}, table {:?})", out.shape, ids.shape, table.shape),
        ));
    }
    if n == 0 || c == 0 {
        return Ok(Vec::new());
    }
    let total = index_u32(OP, "N * C", n * c)?;
    index_u32(OP, "V * C", v * c)?;
    let w = words(&[n as u32, c as u32, v as u32, offset]);
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &spec(table.dtype),
        Some(&w),
        &[(1, ids), (2, table), (3, out)],
        grid_1d(total.div_ceil(WG)),
    )?])
}

/// dtable [V, C] (+)= scatter of dout [N, C] by ids; `accumulate = false` zeroes dtable first. Ids >= V are
/// skipped, matching the forward's zero rows.
pub fn embedding_backward(
    dev: &Device,
    dtable: &Tensor,
    dout: &Tensor,
    ids: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    embedding_backward_offset(dev, dtable, dout, ids, accumulate, 0)
}

/// [`embedding_backward`] for a table holding rows `offset..offset + V` (see [`embedding_forward_offset`]).
pub fn embedding_backward_offset(
    dev: &Device,
    dtable: &Tensor,
    dout: &Tensor,
    ids: &Tensor,
    accumulate: bool,
    offset: u32,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "embedding_backward";
    let n = check_ids(OP, ids)?;
    expect_f32(OP, "dtable", dtable)?;
    expect_f32(OP, "dout", dout)?;
    if dtable.rank() != 2 {
        return Err(shape_err(OP, format!("dtable {:?} must be [V, C]", dtable.shape)));
    }
    let (v, c) = (dtable.shape[0], dtable.shape[1]);
    if dout.shape != [n, c] {
        return Err(shape_err(
            OP,
            format!(
                "dout {:?} must be [N, C] = [{n}, {c}] (ids {:?}, dtable {:?})",
                dout.shape, ids.shape, dtable.shape
            ),
        ));
    }
    let vc = index_u32(OP, "V * C", v * c)?;
    index_u32(OP, "N * C", n * c)?;
    let w = words(&[n as u32, c as u32, v as u32, offset]);
    let s = spec(DType::F32);
    let mut ds = Vec::new();
    if !accumulate && vc > 0 {
        ds.push(dev.dispatch(
            FILE,
            "embedding_backward_zero",
            &s,
            Some(&w),
            &[(5, dtable)],
            grid_1d(vc.div_ceil(WG)),
        )?);
    }
    if n > 0 && c > 0 {
        ds.push(dev.dispatch(
            FILE,
            OP,
            &s,
            Some(&w),
            &[(1, ids), (4, dout), (5, dtable)],
            grid_1d((c as u32).div_ceil(WG)),
        )?);
    }
    Ok(ds)
}
