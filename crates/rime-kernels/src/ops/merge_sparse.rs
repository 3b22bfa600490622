//! Launchers for shaders/merge_sparse.wgsl: mergekit 0.1.5's sparsifying task-vector merges (breadcrumbs,
//! DELLA, SCE, DARE's L1 rescale) and its dtype semantics. Every launcher takes the compute [`Precision`]:
//! values travel as f32 and are rounded to float16 / bfloat16 where mergekit's torch ops round when it computes
//! in that dtype. The recipes (see rime-merge's `sparse` module) compose them:
//! - task vectors: `merge_delta_round_forward` (model - base, rounded);
//! - sparsify in place: `merge_topk_threshold_forward` (ops::merge) + `merge_band_mask_forward` (magnitude,
//!   breadcrumbs, SCE's selection), `merge_della_mask_forward` (DELLA), `merge_sparse_rescale_forward` with a
//!   mask (DARE); then the L1 rescale: `merge_sparse_sum_forward` before and after, `merge_sparse_rescale_forward`;
//! - combine: `merge_gta_forward` (task arithmetic, TIES, DARE, breadcrumbs, DELLA), `merge_sce_forward`,
//!   `merge_linear_forward`.

use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::guard::{expect_f32, index_u32};
use crate::{DType, Device, Dispatch, Spec, Tensor};

const FILE: &str = "merge_sparse.wgsl";
const WG: u32 = 64;
const MAX_PARTS: usize = 4096;
const MIN_PER_PART: usize = 64;

pub fn specs() -> Vec<(&'static str, Spec)> {
    vec![(FILE, spec())]
}

fn spec() -> Spec {
    Spec::new().constant("WG", WG as f64)
}

/// The dtype a merge computes in (mergekit's `dtype`): values are f32 on the GPU, rounded to this precision
/// where torch would round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    F16,
    BF16,
}

impl Precision {
    pub fn code(self) -> u32 {
        match self {
            Precision::F32 => 0,
            Precision::F16 => 1,
            Precision::BF16 => 2,
        }
    }

    /// `x` rounded to this precision (round to nearest, ties to even), as f32.
    pub fn round(self, x: f32) -> f32 {
        match self {
            Precision::F32 => x,
            Precision::F16 => half::f16::from_f32(x).to_f32(),
            Precision::BF16 => half::bf16::from_f32(x).to_f32(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn params(l: usize, rows: usize, parts: usize, k: usize, a: u32, b: u32, c: u32, d: u32) -> Vec<u8> {
    words(&[l as u32, rows as u32, parts as u32, k as u32, a, b, c, d])
}

fn grid(n: usize) -> [u32; 3] {
    grid_1d((n as u32).div_ceil(WG))
}

fn numel(op: &'static str, what: &str, t: &Tensor) -> Result<usize> {
    expect_f32(op, what, t)?;
    index_u32(op, what, t.numel())?;
    Ok(t.numel())
}

fn want(op: &'static str, what: &str, t: &Tensor, n: usize) -> Result<()> {
    if numel(op, what, t)? != n {
        return Err(shape_err(op, format!("{what} {:?} must hold {n} elements", t.shape)));
    }
    Ok(())
}

/// out[at..at + L] = round(x - base), x and base of L elements: a task vector in the compute dtype, written
/// into a whole-tensor buffer at element `at`.
pub fn merge_delta_round_forward(
    dev: &Device,
    out: &Tensor,
    at: usize,
    x: &Tensor,
    base: &Tensor,
    prec: Precision,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_delta_round_forward";
    let l = numel(OP, "x", x)?;
    want(OP, "base", base, l)?;
    if numel(OP, "out", out)? < at + l {
        return Err(shape_err(OP, format!("out {:?} is too small for {l} elements at {at}", out.shape)));
    }
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &spec(),
        Some(&params(l, 1, 0, at, prec.code(), 0, 0, 0)),
        &[(1, out), (2, x), (8, base)],
        grid(l),
    )?])
}

/// How mergekit's `generalized_task_arithmetic` combines the task vectors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gta {
    /// TIES' sign consensus ("sum"): only the rows agreeing with the sign of the weighted sum count.
    pub consensus: bool,
    /// Divide by the (agreeing) weights' sum.
    pub normalize: bool,
    /// The rows are models, not task vectors: take round(x - base) first.
    pub raw: bool,
    pub lambda: f32,
    pub prec: Precision,
}

/// mergekit's generalized task arithmetic, out \[L]: `xs` [N + 1, L] holds N task vectors (or models, `raw`)
/// then the base; `weights` \[N] are rounded to the compute dtype here, as mergekit builds them in it. With
/// y_i = r(d_i w_i): consensus elects sign(r(sum_i y_i)) (zero counts +) and sums the agreeing y_i and w_i, else
/// all of them; the sums are rounded, a zero divisor (|divisor| < 1e-8 without consensus) becomes 1; then
/// mixed = r(mixed / divisor) when `normalize`, r(mixed * lambda) when lambda != 1, out = r(base + mixed).
pub fn merge_gta_forward(dev: &Device, out: &Tensor, xs: &Tensor, weights: &[f32], g: Gta) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_gta_forward";
    let l = numel(OP, "out", out)?;
    let n = weights.len();
    if n == 0 {
        return Err(shape_err(OP, "no task vectors"));
    }
    want(OP, "xs", xs, (n + 1) * l)?;
    let w: Vec<f32> = weights.iter().map(|&x| g.prec.round(x)).collect();
    let w = dev.upload_f32(&w, &[n])?;
    let flags = g.consensus as u32 | (g.normalize as u32) << 1 | (g.raw as u32) << 2 | ((g.lambda != 1.0) as u32) << 3;
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &spec(),
        Some(&params(l, n, 0, 0, g.prec.code(), flags, g.lambda.to_bits(), 0)),
        &[(1, out), (2, xs), (3, &w)],
        grid(l),
    )?])
}

/// mergekit's linear, out \[L] from `xs` [N, L]: s = sum_i fma(x_i, w_i, s) in f32 (torch's addcmul_ into an
/// f32 accumulator), divided by the f32 sum of the weights when `normalize`, rounded to the compute dtype.
/// WGSL's `fma` need not be fused (lavapipe's is not): there the f32 sum may differ from torch's by an ulp.
pub fn merge_linear_forward(
    dev: &Device,
    out: &Tensor,
    xs: &Tensor,
    weights: &[f32],
    normalize: bool,
    prec: Precision,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_linear_forward";
    let l = numel(OP, "out", out)?;
    let n = weights.len();
    if n == 0 {
        return Err(shape_err(OP, "no models"));
    }
    want(OP, "xs", xs, n * l)?;
    let den: f32 = weights.iter().fold(0.0, |a, &b| a + b);
    let w = dev.upload_f32(weights, &[n])?;
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &spec(),
        Some(&params(l, n, 0, 0, prec.code(), normalize as u32, den.to_bits(), 0)),
        &[(1, out), (2, xs), (3, &w)],
        grid(l),
    )?])
}

/// What `merge_sparse_sum_forward` adds up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SumOf {
    /// |x| (the L1 norm).
    Abs,
    /// round(x * x) in the given precision (SCE's squares).
    Square(Precision),
    /// 1 for each x != 0.
    NonZero,
}

/// acc\[slot] = sum over the L elements of `x` of [`SumOf`], in f32 (strided partial sums, then one ordered sum).
pub fn merge_sparse_sum_forward(
    dev: &Device,
    acc: &Tensor,
    slot: usize,
    x: &Tensor,
    what: SumOf,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_sparse_sum_forward";
    let l = numel(OP, "x", x)?;
    if numel(OP, "acc", acc)? <= slot {
        return Err(shape_err(OP, format!("acc {:?} has no slot {slot}", acc.shape)));
    }
    let parts = l.div_ceil(MIN_PER_PART).clamp(1, MAX_PARTS);
    let sums = dev.empty(&[parts], DType::F32)?;
    let (a, b) = match what {
        SumOf::Abs => (0, 0),
        SumOf::Square(p) => (1, p.code()),
        SumOf::NonZero => (2, 0),
    };
    let ps = params(l, 1, parts, slot, a, b, 0, 0);
    Ok(vec![
        dev.dispatch(FILE, "merge_sparse_partial_forward", &spec(), Some(&ps), &[(2, x), (9, &sums)], grid(parts))?,
        dev.dispatch(FILE, "merge_sparse_accum_forward", &spec(), Some(&ps), &[(9, &sums), (10, acc)], [1, 1, 1])?,
    ])
}

/// mergekit's `rescaled_masked_tensor` in place on `x` \[L]: x * mask (when given, 0/1 values), then with
/// `rescale` (L1): x = r_w(x * r_w(r_w(acc\[0]) / r_w(acc\[1]))) in the `work` precision unless either norm is
/// below 1e-7 (acc\[0]: sum |x| before masking, acc\[1]: after); finally rounded to `prec`.
pub fn merge_sparse_rescale_forward(
    dev: &Device,
    x: &Tensor,
    mask: Option<&Tensor>,
    acc: &Tensor,
    rescale: bool,
    work: Precision,
    prec: Precision,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_sparse_rescale_forward";
    let l = numel(OP, "x", x)?;
    if numel(OP, "acc", acc)? < 2 {
        return Err(shape_err(OP, "acc must hold the two norms"));
    }
    // The layout binds every slot the kernel names: an unused mask is a one-element stand-in.
    let dummy = dev.empty(&[1], DType::F32)?;
    if let Some(m) = mask {
        want(OP, "mask", m, l)?;
    }
    let binds = vec![(1, x), (10, acc), (5, mask.unwrap_or(&dummy))];
    let flags = mask.is_some() as u32 | (rescale as u32) << 1;
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &spec(),
        Some(&params(l, 1, 0, 0, prec.code(), work.code(), flags, 0)),
        &binds,
        grid(l),
    )?])
}

/// In place on `x` \[L]: keep the elements whose key is among the top `k1` (threshold `state1`, from
/// `merge_topk_threshold_forward` with the same `index_ascending`) and not among the top `k2` (`state2`), zero
/// the rest. Keys are taken from `keys` \[L] when given (SCE's variances), else from `x`.
#[allow(clippy::too_many_arguments)]
pub fn merge_band_mask_forward(
    dev: &Device,
    x: &Tensor,
    keys: Option<&Tensor>,
    state1: &Tensor,
    k1: usize,
    state2: &Tensor,
    k2: usize,
    index_ascending: bool,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_band_mask_forward";
    let l = numel(OP, "x", x)?;
    for (n, s) in [("state1", state1), ("state2", state2)] {
        if s.dtype != DType::U32 || s.numel() < 2 {
            return Err(shape_err(OP, format!("{n} must be u32 [2], got {:?} {:?}", s.dtype, s.shape)));
        }
    }
    let dummy = dev.empty(&[1], DType::F32)?;
    if let Some(k) = keys {
        want(OP, "keys", k, l)?;
    }
    let binds = vec![(1, x), (6, state1), (11, state2), (8, keys.unwrap_or(&dummy))];
    let a = index_ascending as u32 | (keys.is_some() as u32) << 1;
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &spec(),
        Some(&params(l, 1, 0, 0, a, 0, (k1 == 0) as u32, (k2 == 0) as u32)),
        &binds,
        grid(l),
    )?])
}

/// DELLA's drop (mergekit `della_magprune` before its rescale), in place on `x` [rows, cols]: within each row,
/// the element of 0-based ascending rank j by (|x|, index) is kept when u < lo + (j / (cols - 1)) * 2 * eps,
/// u being its entry of `uniform` (draws in [0, 1)). The ranks come from a bitonic sort per row on the GPU.
pub fn merge_della_mask_forward(
    dev: &Device,
    x: &Tensor,
    uniform: &Tensor,
    rows: usize,
    lo: f32,
    eps: f32,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_della_mask_forward";
    let l = numel(OP, "x", x)?;
    want(OP, "uniform", uniform, l)?;
    if rows == 0 || l % rows != 0 || l / rows < 2 {
        return Err(shape_err(OP, format!("x {:?} must split into {rows} rows of at least 2 elements", x.shape)));
    }
    let cols = l / rows;
    let pw = cols.next_power_of_two();
    index_u32(OP, "the padded sort buffer", rows * pw)?;
    let idx = dev.empty(&[rows * pw], DType::U32)?;
    let g = grid(rows * pw);
    let mut ds = vec![dev.dispatch(
        FILE,
        "merge_della_sort_init_forward",
        &spec(),
        Some(&params(l, rows, pw, cols, 0, 0, 0, 0)),
        &[(6, &idx)],
        g,
    )?];
    let mut k = 2;
    while k <= pw {
        let mut j = k / 2;
        while j >= 1 {
            let ps = params(l, rows, pw, cols, k as u32, j as u32, 0, 0);
            ds.push(dev.dispatch(
                FILE,
                "merge_della_sort_step_forward",
                &spec(),
                Some(&ps),
                &[(2, x), (6, &idx)],
                g,
            )?);
            j /= 2;
        }
        k *= 2;
    }
    ds.push(dev.dispatch(
        FILE,
        OP,
        &spec(),
        Some(&params(l, rows, pw, cols, 0, 0, lo.to_bits(), eps.to_bits())),
        &[(1, x), (5, uniform), (6, &idx)],
        grid(l),
    )?);
    Ok(ds)
}

/// SCE's selection statistic, out \[L] = round(population variance over the N rows of `xs` [N, L]).
pub fn merge_sce_var_forward(dev: &Device, out: &Tensor, xs: &Tensor, prec: Precision) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_sce_var_forward";
    let l = numel(OP, "out", out)?;
    let n = numel(OP, "xs", xs)? / l.max(1);
    if n == 0 || n * l != xs.numel() {
        return Err(shape_err(OP, format!("xs {:?} must be [N, {l}]", xs.shape)));
    }
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &spec(),
        Some(&params(l, n, 0, 0, prec.code(), 0, 0, 0)),
        &[(1, out), (2, xs)],
        grid(l),
    )?])
}

/// SCE's combine, out \[L] from `xs` [N + 1, L] (selected task vectors, then the base) and the task-vector
/// weights (rounded here): signs elected by round(sum_i tv_i), the erased weights ew_i = w_i where sign(tv_i)
/// agrees, out = r(base + r(r(sum_i r(tv_i ew_i)) / max(r(sum_i ew_i), r(1e-6)))).
pub fn merge_sce_forward(
    dev: &Device,
    out: &Tensor,
    xs: &Tensor,
    weights: &[f32],
    prec: Precision,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_sce_forward";
    let l = numel(OP, "out", out)?;
    let n = weights.len();
    if n == 0 {
        return Err(shape_err(OP, "no task vectors"));
    }
    want(OP, "xs", xs, (n + 1) * l)?;
    let w: Vec<f32> = weights.iter().map(|&x| prec.round(x)).collect();
    let w = dev.upload_f32(&w, &[n])?;
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &spec(),
        Some(&params(l, n, 0, 0, prec.code(), prec.round(1e-6).to_bits(), 0, 0)),
        &[(1, out), (2, xs), (3, &w)],
        grid(l),
    )?])
}
