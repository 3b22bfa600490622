//! rime's kernels for a program that uses the GPU as an accelerator: upload tensors, run a kernel, read the
//! result back. The functions here are named as the WGSL entry points in `shaders/` and as their plain-Rust
//! references in [`reference`](mod@reference) (the oracle the tests compare against); each allocates its output, runs at
//! once and returns it. For several kernels in one submit, or to reuse output buffers, build the dispatches
//! with [`raw`] and run them with `gpu.device().run(&dispatches)`.
//!
//! ```
//! use rime::{kernels, Gpu};
//! let gpu = Gpu::new()?;
//! let a = gpu.upload(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])?; // [M=2, K=3]
//! let w = gpu.upload(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], &[2, 3])?; // a Linear weight [N=2, K=3]
//! let y = kernels::matmul_forward(&gpu, &a, &w, None, false, true)?; // a · wᵀ
//! assert_eq!(gpu.download(&y)?, vec![1.0, 6.0, 4.0, 15.0]);
//! # Ok::<(), rime::Error>(())
//! ```

pub use rime_kernels::ops as raw;
pub use rime_kernels::reference;
pub use rime_kernels::{DType, Tensor};

use crate::{Error, Gpu, Result};

fn dims2(name: &'static str, t: &Tensor) -> Result<()> {
    if t.shape.len() < 2 {
        return Err(Error::invalid(name, format!("shape {:?}: expected at least 2 dimensions", t.shape)));
    }
    Ok(())
}

/// `op(a) · op(b) + bias` ([`raw::matmul::matmul_forward`]): a [..batch, M, K] ([.., K, M] when `trans_a`),
/// b [K, N] ([N, K] when `trans_b`, as a PyTorch `Linear` weight), bias \[N\]; returns [..batch, M, N] (f32).
/// b may be f16 or bf16.
pub fn matmul_forward(
    gpu: &Gpu,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    trans_a: bool,
    trans_b: bool,
) -> Result<Tensor> {
    dims2("a", a)?;
    dims2("b", b)?;
    let r = a.shape.len();
    let m = if trans_a { a.shape[r - 1] } else { a.shape[r - 2] };
    let n = if trans_b { b.shape[b.shape.len() - 2] } else { b.shape[b.shape.len() - 1] };
    let mut shape = a.shape[..r - 2].to_vec();
    shape.extend([m, n]);
    let dev = gpu.device();
    let out = dev.empty(&shape, DType::F32)?;
    dev.run(&raw::matmul::matmul_forward(dev, &out, a, b, bias, trans_a, trans_b)?)?;
    Ok(out)
}

/// Scaled dot-product attention ([`raw::attention::attention_forward`]): `softmax(scale · q kᵀ + masks) v`
/// per head. q [B, T, heads, head_dim]; k, v [B, S, kv_heads, head_dim] (grouped-query attention when
/// kv_heads < heads); `mask` [B, S] with 1 = keep, 0 = padding; `causal`: query t sees key j ≤ t + S − T.
/// Returns the output [B, T, heads, head_dim] and the log-sum-exp of each row [B, heads, T] (what the backward
/// needs).
pub fn attention_forward(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    if q.shape.len() != 4 {
        return Err(Error::invalid("q", format!("shape {:?}: expected [B, T, heads, head_dim]", q.shape)));
    }
    let dev = gpu.device();
    let out = dev.empty(&q.shape, DType::F32)?;
    let lse = dev.empty(&[q.shape[0], q.shape[2], q.shape[1]], DType::F32)?;
    dev.run(&raw::attention::attention_forward(dev, &out, &lse, q, k, v, mask, causal, scale)?)?;
    Ok((out, lse))
}

/// `Σᵢ weights[i] · xs[i]` over the rows of `xs` [N, L] ([`raw::merge::merge_weighted_sum_forward`]): model
/// soups and task arithmetic. Returns \[L\].
pub fn merge_weighted_sum_forward(gpu: &Gpu, xs: &Tensor, weights: &[f32]) -> Result<Tensor> {
    dims2("xs", xs)?;
    let dev = gpu.device();
    let out = dev.empty(&[xs.numel() / xs.shape[0]], DType::F32)?;
    dev.run(&raw::merge::merge_weighted_sum_forward(dev, &out, xs, weights)?)?;
    Ok(out)
}

/// mergekit's spherical interpolation of two tensors at `t` ([`raw::merge::merge_slerp_forward`]); returns a
/// tensor shaped as `a`.
pub fn merge_slerp_forward(gpu: &Gpu, a: &Tensor, b: &Tensor, t: f32) -> Result<Tensor> {
    let dev = gpu.device();
    let out = dev.empty(&a.shape, DType::F32)?;
    dev.run(&raw::merge::merge_slerp_forward(dev, &out, a, b, t)?)?;
    Ok(out)
}
