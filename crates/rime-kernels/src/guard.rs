//! The checks the launchers share, in one place. Each failure is an [`Error::Shape`] of the op that names the
//! tensor at fault, what it is and what was expected (the graph executor adds the node's name to it).

use crate::error::{shape_err, Error, Result};
use crate::{DType, Tensor};

/// The element types a weight operand (matmul's b, LoRA's w, an embedding table) may be stored in.
pub(crate) const FLOATS: &[DType] = &[DType::F32, DType::F16, DType::BF16];

/// "F32", "F32 or F16", "F32, F16 or BF16".
fn one_of(allowed: &[DType]) -> String {
    let names: Vec<String> = allowed.iter().map(|d| format!("{d:?}")).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    }
}

/// The error for `t` (called `name`) not being stored as one of `allowed`.
pub(crate) fn dtype_err(op: &'static str, name: &str, t: &Tensor, allowed: &[DType]) -> Error {
    shape_err(op, format!("{name} must be {}, got {:?} of shape {:?}", one_of(allowed), t.dtype, t.shape))
}

/// `t` is stored as one of `allowed`.
pub(crate) fn expect_dtype(op: &'static str, name: &str, t: &Tensor, allowed: &[DType]) -> Result<()> {
    if !allowed.contains(&t.dtype) {
        return Err(dtype_err(op, name, t, allowed));
    }
    Ok(())
}

/// `t` is F32.
pub(crate) fn expect_f32(op: &'static str, name: &str, t: &Tensor) -> Result<()> {
    expect_dtype(op, name, t, &[DType::F32])
}

/// Every `(name, tensor)` is F32.
pub(crate) fn expect_all_f32(op: &'static str, ts: &[(&str, &Tensor)]) -> Result<()> {
    ts.iter().try_for_each(|(name, t)| expect_f32(op, name, t))
}

/// `t` has exactly the shape `want`.
pub(crate) fn expect_shape(op: &'static str, name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.shape != want {
        return Err(shape_err(op, format!("{name} is {:?}, expected {want:?}", t.shape)));
    }
    Ok(())
}

/// `t` is F32 of exactly the shape `want`.
pub(crate) fn expect_f32_shape(op: &'static str, name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    expect_f32(op, name, t)?;
    expect_shape(op, name, t, want)
}

/// `t` has at least one dimension and one element.
pub(crate) fn expect_nonempty(op: &'static str, name: &str, t: &Tensor) -> Result<()> {
    if t.numel() == 0 || t.rank() == 0 {
        return Err(shape_err(op, format!("{name} of shape {:?} is empty or a scalar", t.shape)));
    }
    Ok(())
}

/// `t` holds exactly one value (any shape).
pub(crate) fn expect_one_value(op: &'static str, name: &str, t: &Tensor) -> Result<()> {
    if t.numel() != 1 {
        return Err(shape_err(op, format!("{name} {:?} must hold one value", t.shape)));
    }
    Ok(())
}

/// All `(name, tensor)` hold as many elements as the first; returns that count.
pub(crate) fn expect_same_numel(op: &'static str, ts: &[(&str, &Tensor)]) -> Result<usize> {
    let n = ts.first().map_or(0, |(_, t)| t.numel());
    if ts.iter().any(|(_, t)| t.numel() != n) {
        let shapes: Vec<String> = ts.iter().map(|(name, t)| format!("{name} {:?}", t.shape)).collect();
        return Err(shape_err(op, format!("element counts differ: {}", shapes.join(", "))));
    }
    Ok(n)
}

/// A count a shader indexes with as u32 (`what` says which): it must fit.
pub(crate) fn index_u32(op: &'static str, what: &str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| shape_err(op, format!("{what} = {n} exceeds u32 indexing")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_lists_read_as_words() {
        assert_eq!(one_of(&[DType::F32]), "F32");
        assert_eq!(one_of(&[DType::F16, DType::BF16]), "F16 or BF16");
        assert_eq!(one_of(FLOATS), "F32, F16 or BF16");
    }

    #[test]
    fn index_u32_refuses_counts_past_u32() {
        assert_eq!(index_u32("op", "n", 7).unwrap(), 7);
        let e = index_u32("op", "rows", u32::MAX as usize + 1).unwrap_err().to_string();
        assert!(e.starts_with("op: rows = 4294967296"), "{e}");
    }
}
