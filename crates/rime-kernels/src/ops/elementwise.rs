//! Launchers for shaders/elementwise.wgsl: binary ops with row broadcasting, scaling, in-place accumulation,
//! activations (GELU exact and tanh, SiLU, ReLU) and seeded dropout, each with its gradient.

use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::guard::{expect_all_f32, expect_f32, expect_nonempty, index_u32};
use crate::{Device, Dispatch, Spec, Tensor};

const FILE: &str = "elementwise.wgsl";
const WG: u32 = 64;

pub fn specs() -> Vec<(&'static str, Spec)> {
    vec![(FILE, spec(1)), (FILE, spec(4))]
}

/// Elements per invocation: 4 (vec4 loads, about twice as fast on lavapipe) or 1.
fn spec(width: u32) -> Spec {
    let prelude = if width == 4 {
        "alias V = vec4<f32>;\nalias U = vec4<u32>;\n\
         fn lane_index(i: u32) -> U { return vec4<u32>(4u * i) + vec4<u32>(0u, 1u, 2u, 3u); }"
    } else {
        "alias V = f32;\nalias U = u32;\nfn lane_index(i: u32) -> U { return i; }"
    };
    Spec::new().prelude(prelude).constant("WG", WG as f64)
}

/// One dispatch over n elements (b holding nb of them); `per_column` runs one invocation per element of b
/// instead (the row reduction of mul_backward). vec4 elements when both sizes allow.
#[allow(clippy::too_many_arguments)]
fn launch(
    dev: &Device,
    entry: &str,
    n: u32,
    nb: u32,
    per_column: bool,
    flags: u32,
    s: u32,
    seed: u32,
    bindings: &[(u32, &Tensor)],
) -> Result<Dispatch> {
    let width = if (n | nb) & 3 == 0 { 4 } else { 1 };
    let (n, nb) = (n / width, nb / width);
    let threads = if per_column { nb } else { n };
    let w = words(&[n, nb, flags, s, seed, 0, 0, 0]);
    dev.dispatch(FILE, entry, &spec(width), Some(&w), bindings, grid_1d(threads.div_ceil(WG)))
}

fn same(op: &'static str, an: &str, a: &Tensor, bn: &str, b: &Tensor) -> Result<()> {
    if a.shape != b.shape {
        return Err(shape_err(op, format!("{an} {:?} and {bn} {:?} must have the same shape", a.shape, b.shape)));
    }
    Ok(())
}

/// b is either a's size (any shape of as many elements) or a row vector [N] (any shape of N elements, at most
/// one dim above 1) with N = a's last dim.
fn broadcast_len(op: &'static str, a: &Tensor, b: &Tensor) -> Result<u32> {
    if b.numel() == a.numel() {
        return index_u32(op, "numel", a.numel());
    }
    if b.numel() == a.last_dim() && b.shape.iter().filter(|&&d| d != 1).count() <= 1 {
        return index_u32(op, "N", b.numel());
    }
    Err(shape_err(
        op,
        format!("b {:?} is neither a's shape {:?} nor a row of its last dim {}", b.shape, a.shape, a.last_dim()),
    ))
}

fn binary(op: &'static str, dev: &Device, out: &Tensor, a: &Tensor, b: &Tensor) -> Result<Vec<Dispatch>> {
    expect_all_f32(op, &[("out", out), ("a", a), ("b", b)])?;
    expect_nonempty(op, "a", a)?;
    same(op, "out", out, "a", a)?;
    let nb = broadcast_len(op, a, b)?;
    let n = index_u32(op, "numel", a.numel())?;
    Ok(vec![launch(dev, op, n, nb, false, 0, 0, 0, &[(1, a), (2, b), (3, out)])?])
}

/// out = a + b (b: a's shape or \[N] broadcast over rows).
pub fn add_forward(dev: &Device, out: &Tensor, a: &Tensor, b: &Tensor) -> Result<Vec<Dispatch>> {
    binary("add_forward", dev, out, a, b)
}

/// out = a * b (b: a's shape or \[N] broadcast over rows).
pub fn mul_forward(dev: &Device, out: &Tensor, a: &Tensor, b: &Tensor) -> Result<Vec<Dispatch>> {
    binary("mul_forward", dev, out, a, b)
}

/// da = dout * b; db = dout * a, summed over rows when b was broadcast. Either gradient may be skipped.
pub fn mul_backward(
    dev: &Device,
    da: Option<&Tensor>,
    db: Option<&Tensor>,
    dout: &Tensor,
    a: &Tensor,
    b: &Tensor,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "mul_backward";
    expect_all_f32(OP, &[("dout", dout), ("a", a), ("b", b)])?;
    expect_nonempty(OP, "a", a)?;
    same(OP, "dout", dout, "a", a)?;
    let nb = broadcast_len(OP, a, b)?;
    let n = index_u32(OP, "numel", a.numel())?;
    let mut ds = Vec::new();
    if let Some(da) = da {
        expect_f32(OP, "da", da)?;
        same(OP, "da", da, "a", a)?;
        ds.push(launch(dev, "mul_forward", n, nb, false, 0, 0, 0, &[(1, dout), (2, b), (3, da)])?);
    }
    if let Some(db) = db {
        expect_f32(OP, "db", db)?;
        same(OP, "db", db, "b", b)?;
        if nb == n {
            ds.push(launch(dev, "mul_forward", n, n, false, 0, 0, 0, &[(1, dout), (2, a), (3, db)])?);
        } else {
            ds.push(launch(dev, "mul_backward", n, nb, true, 0, 0, 0, &[(1, a), (2, dout), (3, db)])?);
        }
    }
    Ok(ds)
}

/// out = s * a.
pub fn scale_forward(dev: &Device, out: &Tensor, a: &Tensor, s: f32) -> Result<Vec<Dispatch>> {
    const OP: &str = "scale_forward";
    expect_all_f32(OP, &[("out", out), ("a", a)])?;
    expect_nonempty(OP, "a", a)?;
    same(OP, "out", out, "a", a)?;
    let n = index_u32(OP, "numel", a.numel())?;
    Ok(vec![launch(dev, OP, n, n, false, 0, s.to_bits(), 0, &[(1, a), (3, out)])?])
}

/// acc += alpha * b (gradient accumulation, residual adds); b: acc's shape or \[N] broadcast over rows.
pub fn add_inplace_forward(dev: &Device, acc: &Tensor, b: &Tensor, alpha: f32) -> Result<Vec<Dispatch>> {
    const OP: &str = "add_inplace_forward";
    expect_all_f32(OP, &[("acc", acc), ("b", b)])?;
    expect_nonempty(OP, "acc", acc)?;
    let nb = broadcast_len(OP, acc, b)?;
    let n = index_u32(OP, "numel", acc.numel())?;
    Ok(vec![launch(dev, OP, n, nb, false, 0, alpha.to_bits(), 0, &[(2, b), (4, acc)])?])
}

fn unary(op: &'static str, dev: &Device, out: &Tensor, x: &Tensor, flags: u32) -> Result<Vec<Dispatch>> {
    expect_all_f32(op, &[("out", out), ("x", x)])?;
    expect_nonempty(op, "x", x)?;
    same(op, "out", out, "x", x)?;
    let n = index_u32(op, "numel", x.numel())?;
    Ok(vec![launch(dev, op, n, n, false, flags, 0, 0, &[(1, x), (3, out)])?])
}

fn unary_backward(
    op: &'static str,
    dev: &Device,
    dx: &Tensor,
    dout: &Tensor,
    x: &Tensor,
    flags: u32,
) -> Result<Vec<Dispatch>> {
    expect_all_f32(op, &[("dx", dx), ("dout", dout), ("x", x)])?;
    expect_nonempty(op, "x", x)?;
    same(op, "dx", dx, "x", x)?;
    same(op, "dout", dout, "x", x)?;
    let n = index_u32(op, "numel", x.numel())?;
    Ok(vec![launch(dev, op, n, n, false, flags, 0, 0, &[(1, x), (2, dout), (3, dx)])?])
}

/// out = gelu(x): exact x * Phi(x) (PyTorch's default) or, with `tanh_approx`, the tanh form.
pub fn gelu_forward(dev: &Device, out: &Tensor, x: &Tensor, tanh_approx: bool) -> Result<Vec<Dispatch>> {
    unary("gelu_forward", dev, out, x, tanh_approx as u32)
}

pub fn gelu_backward(dev: &Device, dx: &Tensor, dout: &Tensor, x: &Tensor, tanh_approx: bool) -> Result<Vec<Dispatch>> {
    unary_backward("gelu_backward", dev, dx, dout, x, tanh_approx as u32)
}

/// out = x * sigmoid(x).
pub fn silu_forward(dev: &Device, out: &Tensor, x: &Tensor) -> Result<Vec<Dispatch>> {
    unary("silu_forward", dev, out, x, 0)
}

pub fn silu_backward(dev: &Device, dx: &Tensor, dout: &Tensor, x: &Tensor) -> Result<Vec<Dispatch>> {
    unary_backward("silu_backward", dev, dx, dout, x, 0)
}

pub fn relu_forward(dev: &Device, out: &Tensor, x: &Tensor) -> Result<Vec<Dispatch>> {
    unary("relu_forward", dev, out, x, 0)
}

/// dx = dout where x > 0, else 0.
pub fn relu_backward(dev: &Device, dx: &Tensor, dout: &Tensor, x: &Tensor) -> Result<Vec<Dispatch>> {
    unary_backward("relu_backward", dev, dx, dout, x, 0)
}

/// The drop threshold as a 24-bit fraction and the scale of kept values: element i is kept when the top 24
/// bits of its hash are >= threshold, i.e. with probability 1 - p. Shared with the CPU reference.
pub fn dropout_threshold(p: f32) -> (u32, f32) {
    let thr = (p as f64 * (1u64 << 24) as f64).ceil().clamp(0.0, (1u64 << 24) as f64) as u32;
    let scale = if p >= 1.0 { 0.0 } else { 1.0 / (1.0 - p) };
    (thr, scale)
}

fn dropout(op: &'static str, dev: &Device, out: &Tensor, x: &Tensor, p: f32, seed: u32) -> Result<Vec<Dispatch>> {
    expect_all_f32(op, &[("out", out), ("input", x)])?;
    expect_nonempty(op, "input", x)?;
    same(op, "out", out, "input", x)?;
    if !(0.0..=1.0).contains(&p) {
        return Err(shape_err(op, format!("dropout probability {p} is outside [0, 1]")));
    }
    let n = index_u32(op, "numel", x.numel())?;
    let (thr, scale) = dropout_threshold(p);
    Ok(vec![launch(dev, op, n, n, false, thr, scale.to_bits(), seed, &[(1, x), (3, out)])?])
}

/// out = x * keep / (1 - p), keep drawn from a hash of (seed, element index): the same seed in backward
/// regenerates the mask, so none is stored.
pub fn dropout_forward(dev: &Device, out: &Tensor, x: &Tensor, p: f32, seed: u32) -> Result<Vec<Dispatch>> {
    dropout("dropout_forward", dev, out, x, p, seed)
}

/// dx = dout * keep / (1 - p) with the forward's seed.
pub fn dropout_backward(dev: &Device, dx: &Tensor, dout: &Tensor, p: f32, seed: u32) -> Result<Vec<Dispatch>> {
    dropout("dropout_backward", dev, dx, dout, p, seed)
}

/// Byte offset of `seed` in the `Params` of elementwise.wgsl (n, nb, flags, s, seed, ...).
const SEED_OFFSET: u64 = 16;

/// Point a built dropout dispatch (forward or backward) at another mask: rewrite the seed in its parameters
/// (queued before the next submit). The executor calls this once per step so that every step draws a fresh
/// mask while forward and backward of one step share it.
pub fn dropout_set_seed(dev: &Device, d: &Dispatch, seed: u32) -> Result<()> {
    let op = "dropout_set_seed";
    if d.label != "dropout_forward" && d.label != "dropout_backward" {
        return Err(shape_err(op, format!("dispatch '{}' is not a dropout", d.label)));
    }
    let buf = d.params_buffer().ok_or_else(|| shape_err(op, "dropout dispatch without parameters"))?;
    dev.queue().write_buffer(buf, SEED_OFFSET, &seed.to_le_bytes());
    Ok(())
}
