//! Launchers for shaders/optim.wgsl: the AdamW and SGD parameter updates and gradient-norm clipping of the
//! training step. Per-step scalars come from the GPU tensor `hyper` \[8] = [lr, beta1, beta2, eps,
//! weight_decay, 1-beta1^t, 1-beta2^t, grad_scale] (for SGD, hyper\[1] is the momentum), so a recorded step
//! replays without any readback; `clip_scale_forward` writes grad_scale on the GPU.

use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::guard::{expect_all_f32, expect_f32, expect_one_value, expect_same_numel, index_u32};
use crate::{DType, Device, Dispatch, Spec, Tensor};

const FILE: &str = "optim.wgsl";
const WG: u32 = 64;
/// Most partial sums the first reduction stage writes; the single-invocation second stage folds them.
const MAX_PARTS: usize = 4096;
/// Fewest elements one first-stage invocation sums (keeps tiny tensors to one or a few partials).
const MIN_PER_PART: usize = 64;

pub fn specs() -> Vec<(&'static str, Spec)> {
    vec![(FILE, spec())]
}

fn spec() -> Spec {
    Spec::new().constant("WG", WG as f64)
}

fn check_hyper(op: &'static str, hyper: &Tensor) -> Result<()> {
    expect_f32(op, "hyper", hyper)?;
    if hyper.numel() != 8 {
        return Err(shape_err(
            op,
            format!(
                "hyper must have 8 elements [lr, b1, b2, eps, wd, bc1, bc2, grad_scale], got shape {:?}",
                hyper.shape
            ),
        ));
    }
    Ok(())
}

fn params(n: usize, parts: usize, accumulate: bool, max_norm: f32) -> Vec<u8> {
    words(&[n as u32, parts as u32, accumulate as u32, max_norm.to_bits()])
}

/// One AdamW step in place on `param`, `m` (exp_avg) and `v` (exp_avg_sq), as torch.optim.AdamW:
/// g = grad*grad_scale; param *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2 v + (1-b2) g²;
/// param -= (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps). `m` and `v` start at zero.
pub fn adamw_update(
    dev: &Device,
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    hyper: &Tensor,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "adamw_update";
    let ts = [("param", param), ("grad", grad), ("m", m), ("v", v)];
    expect_all_f32(OP, &ts)?;
    let n = expect_same_numel(OP, &ts)?;
    check_hyper(OP, hyper)?;
    index_u32(OP, "the element count", n)?;
    let groups = (n as u32).div_ceil(WG);
    Ok(vec![dev.dispatch(
        FILE,
        "adamw_update",
        &spec(),
        Some(&params(n, 0, false, 0.0)),
        &[(1, param), (2, grad), (3, m), (4, v), (5, hyper)],
        grid_1d(groups),
    )?])
}

/// One SGD step with momentum in place (torch.optim.SGD, dampening 0, nesterov off): hyper\[0] = lr,
/// hyper\[1] = momentum, hyper\[4] = weight decay, hyper\[7] = grad scale. `momentum_buf` must start at zero.
pub fn sgd_update(
    dev: &Device,
    param: &Tensor,
    grad: &Tensor,
    momentum_buf: &Tensor,
    hyper: &Tensor,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "sgd_update";
    let ts = [("param", param), ("grad", grad), ("momentum_buf", momentum_buf)];
    expect_all_f32(OP, &ts)?;
    let n = expect_same_numel(OP, &ts)?;
    check_hyper(OP, hyper)?;
    index_u32(OP, "the element count", n)?;
    let groups = (n as u32).div_ceil(WG);
    Ok(vec![dev.dispatch(
        FILE,
        "sgd_update",
        &spec(),
        Some(&params(n, 0, false, 0.0)),
        &[(1, param), (2, grad), (3, momentum_buf), (5, hyper)],
        grid_1d(groups),
    )?])
}

/// acc\[0] = sum(grad²), or acc\[0] += sum(grad²) when `accumulate` (to sum over all trainable tensors).
/// Two dispatches with a fixed summation order, so the result is deterministic.
pub fn grad_sumsq_forward(dev: &Device, acc: &Tensor, grad: &Tensor, accumulate: bool) -> Result<Vec<Dispatch>> {
    const OP: &str = "grad_sumsq_forward";
    expect_f32(OP, "acc", acc)?;
    expect_f32(OP, "grad", grad)?;
    expect_one_value(OP, "acc", acc)?;
    let n = grad.numel();
    index_u32(OP, "the element count", n)?;
    let parts = n.div_ceil(MIN_PER_PART).clamp(1, MAX_PARTS);
    let partial = dev.empty(&[parts], DType::F32)?;
    let p = params(n, parts, accumulate, 0.0);
    Ok(vec![
        dev.dispatch(
            FILE,
            "grad_sumsq_forward",
            &spec(),
            Some(&p),
            &[(2, grad), (6, &partial)],
            grid_1d((parts as u32).div_ceil(WG)),
        )?,
        dev.dispatch(FILE, "grad_sumsq_finish_forward", &spec(), Some(&p), &[(6, &partial), (7, acc)], [1, 1, 1])?,
    ])
}

/// hyper\[7] = min(1, max_norm / (sqrt(acc\[0]) + 1e-6)), the coefficient torch.nn.utils.clip_grad_norm_
/// multiplies gradients by; the optimizer kernels apply it as they read each gradient.
pub fn clip_scale_forward(dev: &Device, hyper: &Tensor, acc: &Tensor, max_norm: f32) -> Result<Vec<Dispatch>> {
    const OP: &str = "clip_scale_forward";
    check_hyper(OP, hyper)?;
    expect_f32(OP, "acc", acc)?;
    expect_one_value(OP, "acc", acc)?;
    if !max_norm.is_finite() || max_norm <= 0.0 {
        return Err(shape_err(OP, format!("max_norm must be positive and finite, got {max_norm}")));
    }
    Ok(vec![dev.dispatch(
        FILE,
        "clip_scale_forward",
        &spec(),
        Some(&params(0, 0, false, max_norm)),
        &[(7, acc), (8, hyper)],
        [1, 1, 1],
    )?])
}
