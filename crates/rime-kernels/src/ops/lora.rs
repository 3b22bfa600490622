//! Launchers for LoRA linear layers, y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ (+ bias) with W frozen (f32/f16/bf16) and A, B
//! trained. Each op is a short sequence of strided products run by shaders/matmul.wgsl (see
//! [`super::matmul`]): the rank-R products are tiny next to x·Wᵀ, and the low-rank term accumulates into the
//! same output in place, so a separate fused shader would save only one pass over the output.

use super::matmul::{gemm, Gemm, Variant};
use crate::error::{shape_err, Result};
use crate::guard::{expect_dtype, expect_f32, expect_shape, FLOATS};
use crate::{Device, Dispatch, Spec, Tensor};

/// No shader of its own: the products run on matmul.wgsl's specializations (declared there).
pub fn specs() -> Vec<(&'static str, Spec)> {
    Vec::new()
}

/// rows (product of x's leading dims), C (in), OC (out), R (rank), and the leading dims themselves.
struct Dims {
    lead: Vec<usize>,
    rows: usize,
    c: usize,
    oc: usize,
    r: usize,
}

fn with_last(lead: &[usize], last: usize) -> Vec<usize> {
    let mut s = lead.to_vec();
    s.push(last);
    s
}

/// Sizes from the input-side activation `xs` ([.., C]) and the LoRA factors a [R, C], b [OC, R].
fn dims(op: &'static str, xs: &Tensor, a: &Tensor, b: &Tensor) -> Result<Dims> {
    expect_f32(op, "a", a)?;
    expect_f32(op, "b", b)?;
    if xs.rank() < 1 || a.rank() != 2 || b.rank() != 2 {
        return Err(shape_err(
            op,
            format!("x {:?} needs >= 1 dim, a {:?} must be [R, C], b {:?} must be [OC, R]", xs.shape, a.shape, b.shape),
        ));
    }
    let c = xs.last_dim();
    let (r, oc) = (a.shape[0], b.shape[0]);
    if a.shape[1] != c || b.shape[1] != r {
        return Err(shape_err(
            op,
            format!(
                "x {:?}, a {:?} and b {:?} disagree: want a [R, C={c}] and b [OC, R={r}]",
                xs.shape, a.shape, b.shape
            ),
        ));
    }
    let lead = xs.shape[..xs.rank() - 1].to_vec();
    Ok(Dims { rows: lead.iter().product(), lead, c, oc, r })
}

fn weight_of(op: &'static str, w: &Tensor, d: &Dims) -> Result<()> {
    if !w.dtype.is_quantized() {
        expect_dtype(op, "w", w, FLOATS)?;
    }
    expect_shape(op, "w", w, &[d.oc, d.c])
}

/// A row-major product `out (+)= alpha * lhs · rhs` over `rows` rows, with explicit (row, reduction) strides
/// for lhs and (reduction, column) strides for rhs; out is contiguous [m, n].
#[allow(clippy::too_many_arguments)]
fn product<'a>(
    out: &'a Tensor,
    lhs: &'a Tensor,
    l: [usize; 2],
    rhs: &'a Tensor,
    r: [usize; 2],
    bias: Option<&'a Tensor>,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    accumulate: bool,
) -> Gemm<'a> {
    Gemm {
        entry: "matmul_forward",
        out,
        lhs,
        rhs,
        bias,
        batch: 1,
        m,
        n,
        k,
        kb: 1,
        l: [l[0], l[1], 0, 0],
        r: [r[0], r[1], 0, 0],
        o: [n, 1, 0],
        alpha,
        accumulate,
    }
}

/// out = x·Wᵀ + scale·h·Bᵀ (+ bias) and h = x·Aᵀ (kept for backward).
/// x: [.., C]; w: [OC, C]; bias: \[OC]; a: [R, C]; b: [OC, R]; out: [.., OC]; h: [.., R].
#[allow(clippy::too_many_arguments)]
pub fn lora_forward(
    dev: &Device,
    out: &Tensor,
    h: &Tensor,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f32,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "lora_forward";
    let d = dims(OP, x, a, b)?;
    weight_of(OP, w, &d)?;
    for (what, t) in [("x", x), ("out", out), ("h", h)] {
        expect_f32(OP, what, t)?;
    }
    expect_shape(OP, "out", out, &with_last(&d.lead, d.oc))?;
    expect_shape(OP, "h", h, &with_last(&d.lead, d.r))?;
    if let Some(bias) = bias {
        expect_f32(OP, "bias", bias)?;
        expect_shape(OP, "bias", bias, &[d.oc])?;
    }
    let (rows, c, oc, r) = (d.rows, d.c, d.oc, d.r);
    let mut v = gemm(dev, &product(h, x, [c, 1], a, [1, c], None, (rows, r, c), 1.0, false), Variant::Auto)?;
    match crate::QTensor::from_tensor(w) {
        Some(qw) => v.extend(super::qmatmul::linear_forward(dev, out, x, &qw, bias, false)?),
        None => {
            v.extend(gemm(dev, &product(out, x, [c, 1], w, [1, c], bias, (rows, oc, c), 1.0, false), Variant::Auto)?)
        }
    }
    v.extend(gemm(dev, &product(out, h, [r, 1], b, [1, r], None, (rows, oc, r), scale, true), Variant::Auto)?);
    Ok(v)
}

/// dx = dout·W + scale·(dout·B)·A, with dout·B left in dh_tmp. dout: [.., OC]; dx: [.., C]; dh_tmp: [.., R].
#[allow(clippy::too_many_arguments)]
pub fn lora_backward_input(
    dev: &Device,
    dx: &Tensor,
    dh_tmp: &Tensor,
    dout: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f32,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "lora_backward_input";
    let d = dims(OP, dx, a, b)?;
    weight_of(OP, w, &d)?;
    for (what, t) in [("dx", dx), ("dout", dout), ("dh_tmp", dh_tmp)] {
        expect_f32(OP, what, t)?;
    }
    expect_shape(OP, "dout", dout, &with_last(&d.lead, d.oc))?;
    expect_shape(OP, "dh_tmp", dh_tmp, &with_last(&d.lead, d.r))?;
    let (rows, c, oc, r) = (d.rows, d.c, d.oc, d.r);
    let mut v = gemm(dev, &product(dh_tmp, dout, [oc, 1], b, [r, 1], None, (rows, r, oc), 1.0, false), Variant::Auto)?;
    match crate::QTensor::from_tensor(w) {
        Some(qw) => v.extend(super::qmatmul::linear_backward_input(dev, dx, dout, &qw, false)?),
        None => {
            v.extend(gemm(dev, &product(dx, dout, [oc, 1], w, [c, 1], None, (rows, c, oc), 1.0, false), Variant::Auto)?)
        }
    }
    v.extend(gemm(dev, &product(dx, dh_tmp, [r, 1], a, [c, 1], None, (rows, c, r), scale, true), Variant::Auto)?);
    Ok(v)
}

/// dB (+)= scale·doutᵀ·h and dA (+)= scale·(dout·B)ᵀ·x, summed over all rows; dout·B is recomputed into
/// dh_tmp. da: [R, C]; db: [OC, R]; dout: [.., OC]; x: [.., C]; h, dh_tmp: [.., R].
#[allow(clippy::too_many_arguments)]
pub fn lora_backward_weight(
    dev: &Device,
    da: &Tensor,
    db: &Tensor,
    dh_tmp: &Tensor,
    dout: &Tensor,
    x: &Tensor,
    h: &Tensor,
    b: &Tensor,
    scale: f32,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "lora_backward_weight";
    let d = dims(OP, x, da, b)?;
    for (what, t) in [("db", db), ("dh_tmp", dh_tmp), ("dout", dout), ("x", x), ("h", h)] {
        expect_f32(OP, what, t)?;
    }
    expect_shape(OP, "db", db, &[d.oc, d.r])?;
    expect_shape(OP, "dout", dout, &with_last(&d.lead, d.oc))?;
    expect_shape(OP, "h", h, &with_last(&d.lead, d.r))?;
    expect_shape(OP, "dh_tmp", dh_tmp, &with_last(&d.lead, d.r))?;
    let (rows, c, oc, r) = (d.rows, d.c, d.oc, d.r);
    let mut v =
        gemm(dev, &product(db, dout, [1, oc], h, [r, 1], None, (oc, r, rows), scale, accumulate), Variant::Auto)?;
    v.extend(gemm(dev, &product(dh_tmp, dout, [oc, 1], b, [r, 1], None, (rows, r, oc), 1.0, false), Variant::Auto)?);
    v.extend(gemm(dev, &product(da, dh_tmp, [1, r], x, [c, 1], None, (r, c, rows), scale, accumulate), Variant::Auto)?);
    Ok(v)
}
