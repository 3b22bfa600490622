//! Launchers for shaders/merge.wgsl: the arithmetic of model merging with peft's `add_weighted_adapter` and
//! mergekit semantics. Inputs are stacked: `xs` [N, ...] holds N task vectors (or models) of one tensor,
//! each row flattened to L elements. The recipes compose these launchers:
//! - task arithmetic / soups: `merge_weighted_sum_forward(xs, w)`;
//! - magnitude_prune: `merge_magnitude_mask_forward(xs, d)` then `merge_weighted_sum_forward`;
//! - TIES: `merge_magnitude_mask_forward(xs, d)` then `merge_ties_forward(trimmed, w, method, false)` (peft),
//!   or `merge_ties_mergekit_forward(trimmed, w, normalize)` (mergekit); `merge_magnitude_mask_inplace_forward`
//!   trims without a second buffer of the tensor's size;
//! - dare_linear / dare_ties: `merge_dare_forward(xs, mask, d)` then the weighted sum /
//!   `merge_ties_forward(rescaled, w, method, true)`;
//! - SLERP: `merge_slerp_forward(a, b, t)`.

use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::guard::{expect_all_f32, expect_f32, expect_same_numel, index_u32};
use crate::{DType, Device, Dispatch, Spec, Tensor};

const FILE: &str = "merge.wgsl";
const WG: u32 = 64;
/// Most partial results a strided first reduction stage writes per row.
const MAX_PARTS: usize = 4096;
/// Fewest elements one first-stage invocation visits.
const MIN_PER_PART: usize = 64;
/// Bits of the top-k key fixed per counting pass (radix select), and the histogram buckets that takes.
const DIGIT: u32 = 4;
const BUCKETS: usize = 1 << DIGIT;

pub fn specs() -> Vec<(&'static str, Spec)> {
    vec![(FILE, spec())]
}

fn spec() -> Spec {
    Spec::new().constant("WG", WG as f64)
}

#[allow(clippy::too_many_arguments)]
fn params(l: usize, rows: usize, parts: usize, k: usize, a: u32, b: u32, c: u32, d: u32) -> Vec<u8> {
    words(&[l as u32, rows as u32, parts as u32, k as u32, a, b, c, d])
}

/// (N, L) of a stacked input: N = shape[0], L = the rest flattened.
fn stacked(op: &'static str, xs: &Tensor) -> Result<(usize, usize)> {
    expect_f32(op, "xs", xs)?;
    if xs.rank() < 2 || xs.shape[0] == 0 {
        return Err(shape_err(op, format!("xs must be stacked [N, ...] with N >= 1, got shape {:?}", xs.shape)));
    }
    let n = xs.shape[0];
    let l = xs.numel() / n;
    index_u32(op, "the element count of xs", xs.numel())?;
    Ok((n, l))
}

fn check_out(op: &'static str, out: &Tensor, want: usize, what: &str, xs: &Tensor) -> Result<()> {
    expect_f32(op, "out", out)?;
    if out.numel() != want {
        return Err(shape_err(
            op,
            format!("out {:?} must hold {want} elements ({what} of xs {:?})", out.shape, xs.shape),
        ));
    }
    Ok(())
}

fn check_weights(op: &'static str, weights: &[f32], n: usize, xs: &Tensor) -> Result<()> {
    if weights.len() != n {
        return Err(shape_err(op, format!("{} weights for {n} stacked inputs (xs {:?})", weights.len(), xs.shape)));
    }
    Ok(())
}

fn parts_for(l: usize) -> usize {
    l.div_ceil(MIN_PER_PART).clamp(1, MAX_PARTS)
}

/// out \[L] = sum_i weights\[i] * xs\[i] (model soups, task arithmetic, dare_linear after `merge_dare_forward`).
///
/// A uniform soup of three checkpoints' copies of one tensor, stacked as xs [3, L]:
/// ```
/// use rime_kernels::{ops::merge::merge_weighted_sum_forward, DType, Device, DeviceOptions};
///
/// let dev = Device::new(&DeviceOptions::default())?;
/// let xs = dev.upload_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], &[3, 3])?;
/// let out = dev.empty(&[3], DType::F32)?;
/// dev.run(&merge_weighted_sum_forward(&dev, &out, &xs, &[1.0 / 3.0; 3])?)?;
/// let got = dev.download_f32(&out)?;
/// assert!(got.iter().zip([4.0, 5.0, 6.0]).all(|(g, w)| (g - w).abs() < 1e-5), "{got:?}");
/// # Ok::<(), rime_kernels::Error>(())
/// ```
pub fn merge_weighted_sum_forward(dev: &Device, out: &Tensor, xs: &Tensor, weights: &[f32]) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_weighted_sum_forward";
    let (n, l) = stacked(OP, xs)?;
    check_out(OP, out, l, "one row", xs)?;
    check_weights(OP, weights, n, xs)?;
    let w = dev.upload_f32(weights, &[n])?;
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &spec(),
        Some(&params(l, n, 0, 0, 0, 0, 0, 0)),
        &[(1, out), (2, xs), (3, &w)],
        grid_1d((l as u32).div_ceil(WG)),
    )?])
}

/// peft's magnitude pruning of each row: keep the k = int(density * L) largest |x| of the row, zero the rest
/// (density >= 1 keeps everything, as peft's `prune` does). `density` is f64 so that k matches Python's
/// `int(density * numel)` exactly. Ties at the threshold keep exactly k like torch.topk, preferring the lower
/// index (torch leaves the choice among equal values unspecified). out and xs have the same shape.
pub fn merge_magnitude_mask_forward(dev: &Device, out: &Tensor, xs: &Tensor, density: f64) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_magnitude_mask_forward";
    let (n, l) = stacked(OP, xs)?;
    check_out(OP, out, n * l, "all", xs)?;
    magnitude(dev, OP, Some(out), xs, density)
}

/// `merge_magnitude_mask_forward` in place: the dropped elements of `xs` [N, ...] are set to 0, so that
/// trimming a tensor needs no second buffer of its size.
pub fn merge_magnitude_mask_inplace_forward(dev: &Device, xs: &Tensor, density: f64) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_magnitude_mask_inplace_forward";
    stacked(OP, xs)?;
    magnitude(dev, OP, None, xs, density)
}

/// The counting passes of the top-k and the final masking: into `out`, or in place when `out` is None.
fn magnitude(dev: &Device, op: &'static str, out: Option<&Tensor>, xs: &Tensor, density: f64) -> Result<Vec<Dispatch>> {
    let (n, l) = stacked(op, xs)?;
    if density.is_nan() || density < 0.0 {
        return Err(shape_err(op, format!("density must be >= 0, got {density}")));
    }
    let k = if density >= 1.0 { l } else { ((density * l as f64).floor() as usize).min(l) };
    let grid = grid_1d(((n * l) as u32).div_ceil(WG));
    let state = dev.empty(&[2 * n], DType::U32)?;
    let (keep_all, keep_none) = (k >= l, k == 0);
    let mut ds = Vec::new();
    if !keep_all && !keep_none {
        threshold_passes(dev, &mut ds, xs, &state, k, false)?;
    }
    let pm = params(l, n, 0, k, 0, 0, keep_all as u32, keep_none as u32);
    ds.push(match out {
        Some(out) => dev.dispatch(FILE, op, &spec(), Some(&pm), &[(1, out), (2, xs), (6, &state)], grid)?,
        None => dev.dispatch(FILE, op, &spec(), Some(&pm), &[(1, xs), (6, &state)], grid)?,
    });
    Ok(ds)
}

/// TIES sign election and disjoint merge (peft `calculate_majority_sign_mask` + `disjoint_merge`), out \[L].
/// `xs` are the trimmed (or DARE-rescaled) task vectors before weighting. The sign is elected per element by
/// `majority_sign_total` (sign of the sum) or else by the count of signs, zero going to +; the rows whose
/// sign agrees are multiplied by `weights` and averaged (0 where none agree). `elect_weighted` says whether
/// the election and the agreement test see `xs` as given (false: peft's `ties`, and the golden
/// `ties_d0.4_*`) or the weighted rows `weights[i] * xs[i]` (true: the golden `dare_ties_d0.6_total`).
pub fn merge_ties_forward(
    dev: &Device,
    out: &Tensor,
    xs: &Tensor,
    weights: &[f32],
    majority_sign_total: bool,
    elect_weighted: bool,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_ties_forward";
    let (n, l) = stacked(OP, xs)?;
    check_out(OP, out, l, "one row", xs)?;
    check_weights(OP, weights, n, xs)?;
    let w = dev.upload_f32(weights, &[n])?;
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &spec(),
        Some(&params(l, n, 0, 0, majority_sign_total as u32, elect_weighted as u32, 0, 0)),
        &[(1, out), (2, xs), (3, &w)],
        grid_1d((l as u32).div_ceil(WG)),
    )?])
}

/// mergekit's TIES sign election and disjoint merge (`generalized_task_arithmetic` with `consensus_method:
/// sum`), out \[L]: with y_i = weights\[i] * xs\[i], the sign of sum_i y_i is elected per element (zero goes to +),
/// and out = sum_i y_i [sign(y_i) = elected], divided by sum_i weights\[i] [sign(y_i) = elected] when
/// `normalize` (by 1 where that sum is 0). It differs from peft's `merge_ties_forward` in the divisor (the sum
/// of the agreeing weights, not their count) whenever the weights differ.
pub fn merge_ties_mergekit_forward(
    dev: &Device,
    out: &Tensor,
    xs: &Tensor,
    weights: &[f32],
    normalize: bool,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_ties_mergekit_forward";
    let (n, l) = stacked(OP, xs)?;
    check_out(OP, out, l, "one row", xs)?;
    check_weights(OP, weights, n, xs)?;
    let w = dev.upload_f32(weights, &[n])?;
    let divisor = if normalize { 1 } else { 2 };
    Ok(vec![dev.dispatch(
        FILE,
        "merge_ties_forward",
        &spec(),
        Some(&params(l, n, 0, 0, 1, 1, divisor, 0)),
        &[(1, out), (2, xs), (3, &w)],
        grid_1d((l as u32).div_ceil(WG)),
    )?])
}

/// DARE's rescaled random pruning with a given keep-mask (0/1 values, e.g. a Bernoulli(density) draw):
/// out = xs * keep_mask / density, element for element (peft `random_pruning(rescale=True)`).
pub fn merge_dare_forward(
    dev: &Device,
    out: &Tensor,
    xs: &Tensor,
    keep_mask: &Tensor,
    density: f32,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_dare_forward";
    let (n, l) = stacked(OP, xs)?;
    check_out(OP, out, n * l, "all", xs)?;
    expect_f32(OP, "keep_mask", keep_mask)?;
    if keep_mask.numel() != n * l {
        return Err(shape_err(OP, format!("keep_mask {:?} must match xs {:?}", keep_mask.shape, xs.shape)));
    }
    if density.is_nan() || density <= 0.0 || density > 1.0 {
        return Err(shape_err(OP, format!("density must be in (0, 1], got {density}")));
    }
    Ok(vec![dev.dispatch(
        FILE,
        OP,
        &spec(),
        Some(&params(n * l, n, 0, 0, density.to_bits(), 0, 0, 0)),
        &[(1, out), (2, xs), (5, keep_mask)],
        grid_1d(((n * l) as u32).div_ceil(WG)),
    )?])
}

/// mergekit's SLERP of two tensors at `t`: the angle comes from the normalised vectors, the interpolation
/// applies to the originals; nearly colinear inputs (|cos| > 0.9995) are lerped. Three dispatches (partial
/// dot products, coefficients, blend); nothing is read back.
pub fn merge_slerp_forward(dev: &Device, out: &Tensor, a: &Tensor, b: &Tensor, t: f32) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_slerp_forward";
    let ts = [("a", a), ("b", b), ("out", out)];
    expect_all_f32(OP, &ts)?;
    let l = expect_same_numel(OP, &ts)?;
    index_u32(OP, "the element count of a", l)?;
    let parts = parts_for(l);
    let sums = dev.empty(&[3 * parts], DType::F32)?;
    let coef = dev.empty(&[2], DType::F32)?;
    let p = params(l, 1, parts, 0, t.to_bits(), 0, 0, 0);
    Ok(vec![
        dev.dispatch(
            FILE,
            "merge_slerp_partial_forward",
            &spec(),
            Some(&p),
            &[(2, a), (8, b), (9, &sums)],
            grid_1d((parts as u32).div_ceil(WG)),
        )?,
        dev.dispatch(FILE, "merge_slerp_coef_forward", &spec(), Some(&p), &[(9, &sums), (10, &coef)], [1, 1, 1])?,
        dev.dispatch(
            FILE,
            OP,
            &spec(),
            Some(&p),
            &[(1, out), (2, a), (8, b), (10, &coef)],
            grid_1d((l as u32).div_ceil(WG)),
        )?,
    ])
}

/// The radix-select passes of the top-k: `state` [2N] (u32) gets each row's threshold key (hi, lo) such that
/// exactly k keys of the row are at or above it. Keys are (|x| bits, L-1-index), or (|x| bits, index) with
/// `index_ascending` (equal magnitudes then rank in ascending index order, as a stable ascending sort lists them).
fn threshold_passes(
    dev: &Device,
    ds: &mut Vec<Dispatch>,
    xs: &Tensor,
    state: &Tensor,
    k: usize,
    index_ascending: bool,
) -> Result<()> {
    let (n, l) = (xs.shape[0], xs.numel() / xs.shape[0]);
    let parts = parts_for(l);
    let counts = dev.empty(&[n * parts * BUCKETS], DType::U32)?;
    let lo_bits = if l <= 1 { 0 } else { 32 - ((l - 1) as u32).leading_zeros() };
    let rows_groups = [(n as u32).div_ceil(WG), 1, 1];
    let p0 = params(l, n, parts, k, 0, 0, 0, 0);
    ds.push(dev.dispatch(FILE, "merge_magnitude_init_forward", &spec(), Some(&p0), &[(6, state)], rows_groups)?);
    let count_grid = [(parts as u32).div_ceil(WG), n as u32, 1];
    // Digits of at most DIGIT bits, most significant first: the 31 bits of |x|, then the index bits.
    let mut steps = Vec::new();
    for (word, bits) in [(0u32, 31u32), (1, lo_bits)] {
        let mut top = bits;
        while top > 0 {
            let w = top.min(DIGIT);
            steps.push((word, top - w, w));
            top -= w;
        }
    }
    for (word, shift, width) in steps {
        let ps = params(l, n, parts, k, word, shift, width, index_ascending as u32);
        ds.push(dev.dispatch(
            FILE,
            "merge_magnitude_count_forward",
            &spec(),
            Some(&ps),
            &[(2, xs), (6, state), (7, &counts)],
            count_grid,
        )?);
        ds.push(dev.dispatch(
            FILE,
            "merge_magnitude_select_forward",
            &spec(),
            Some(&ps),
            &[(6, state), (7, &counts)],
            rows_groups,
        )?);
    }
    Ok(())
}

/// The threshold of the top-`k` keys of each row of `xs` [N, ...] into `state` ([2N] u32, as
/// `merge_band_mask_forward` of merge_sparse.wgsl reads it). Keys are (|x| bits, L-1-index): larger magnitudes
/// first, then lower indices; with `index_ascending`, (|x| bits, index): among equal magnitudes the higher index
/// ranks first, which makes the order of keys the reverse of a stable ascending sort of |x|. k = 0 or k >= L
/// leaves state 0 (every key is at or above it; the mask kernel takes k = 0 as a flag).
pub fn merge_topk_threshold_forward(
    dev: &Device,
    state: &Tensor,
    xs: &Tensor,
    k: usize,
    index_ascending: bool,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "merge_topk_threshold_forward";
    let (n, l) = stacked(OP, xs)?;
    if state.dtype != DType::U32 || state.numel() != 2 * n {
        return Err(shape_err(OP, format!("state must be u32 [2 * {n}], got {:?} {:?}", state.dtype, state.shape)));
    }
    let mut ds = Vec::new();
    if k == 0 || k >= l {
        let p0 = params(l, n, 1, k, 0, 0, 0, 0);
        ds.push(dev.dispatch(
            FILE,
            "merge_magnitude_init_forward",
            &spec(),
            Some(&p0),
            &[(6, state)],
            [(n as u32).div_ceil(WG), 1, 1],
        )?);
    } else {
        threshold_passes(dev, &mut ds, xs, state, k, index_ascending)?;
    }
    Ok(ds)
}
