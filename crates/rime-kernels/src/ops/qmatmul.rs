//! Launchers for shaders/qmatmul.wgsl: the two products a frozen quantized weight W [N, K] ([`QTensor`], GGUF
//! blocks of Q8_0, Q4_0, Q4_1, Q5_0, Q4_K or Q6_K) takes part in, dequantized in registers:
//! - [`qmatmul_forward`]: y [M, N] (+)= x [M, K] · Wᵀ (+ bias [N]);
//! - [`qmatmul_backward_input`]: dx [M, K] (+)= dY [M, N] · W;
//! - [`qdequantize`]: W as f32, and the `_scratch` launchers that use it for large M.
//!
//! One module per (block type, row tile TM, x through subgroups or not): the type's dequantizer and the bodies
//! with TM rows written out come from a prelude generated at run time (src/gen/qmatmul.rs); every entry point
//! lives in every module. An invocation owns TM rows of the output and 4 columns (forward, k in steps of 32,
//! x shared by subgroupBroadcast when workgroups are one 8-lane subgroup, as on lavapipe) or 16 k values
//! (backward). The row tile is the matrix-vector path for M <= [`QGEMV_MAX_M`] (decoding, short prompts): TM is
//! the smallest of 1, 2, 4, 8 that covers M, so no row is computed twice; larger M runs the tiled path, blocks
//! of 8 rows (the last one clamped and its extra rows not stored). From [`QSCRATCH_MIN_M_FORWARD`] /
//! [`QSCRATCH_MIN_M_BACKWARD`] rows the `_scratch` launchers dequantize W into a caller's scratch and run the
//! f32 matmul instead (faster at training sizes). x and dY rows are leading dims of f32 tensors of any rank
//! ([..., K] and [..., N]); K must be a whole number of the type's blocks (32 or 256 values), which QTensor
//! guarantees.

use super::matmul::{matmul_forward_scaled, Variant};
use super::{grid_1d, words};
use crate::error::{shape_err, Result};
use crate::gen::qmatmul::{prelude, BACKWARD_K, FORWARD_COLS};
use crate::guard::{expect_f32, expect_f32_shape, index_u32};
use crate::qtensor::{QTensor, QType};
use crate::{DType, Device, Dispatch, Spec, Tensor};

const FILE: &str = "qmatmul.wgsl";
/// Row tiles the specializations offer.
const TMS: [usize; 4] = [1, 2, 4, 8];
/// The largest M that the matrix-vector path (a row tile covering all rows) serves.
pub const QGEMV_MAX_M: usize = 8;
/// From this many rows [`qmatmul_forward_scratch`] dequantizes W into the caller's scratch and runs the f32
/// matmul (on lavapipe, SmolLM2's MLP weights: the block kernel is faster at 16 rows, the scratch path at 32).
pub const QSCRATCH_MIN_M_FORWARD: usize = 24;
/// The same for [`qmatmul_backward_input_scratch`] (about even at 16 rows, the scratch path 2x faster at 32).
pub const QSCRATCH_MIN_M_BACKWARD: usize = 16;

fn spec(qtype: QType, tm: usize, wg: u32, subgroup: bool) -> Spec {
    Spec::new().prelude(prelude(qtype, tm, subgroup)).constant("WG", wg as f64)
}

pub fn specs() -> Vec<(&'static str, Spec)> {
    let mut v = Vec::new();
    for qt in QType::ALL {
        for tm in TMS {
            for sg in [false, true] {
                v.push((FILE, spec(qt, tm, 8, sg)));
            }
        }
    }
    v
}

/// Whether the forward body shares x through subgroupBroadcast: workgroups of 8 lanes that are one subgroup.
fn subgroup_x(dev: &Device, wg: u32) -> bool {
    wg == 8 && dev.has_subgroups() && dev.info().subgroup_min_size == 8 && dev.info().subgroup_max_size == 8
}

/// Rows per invocation for M rows: the smallest tile that covers M, else 8.
fn row_tile(m: usize) -> usize {
    TMS.into_iter().find(|&t| t >= m).unwrap_or(TMS[TMS.len() - 1])
}

#[cfg(test)]
thread_local! {
    /// The unit tests run the GPU workgroup size on lavapipe through this.
    static WG_OVERRIDE: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// 8 lanes (one lavapipe subgroup, which runs a workgroup as one SIMD batch) on CPU adapters, 64 on GPUs.
fn workgroup(dev: &Device) -> u32 {
    #[cfg(test)]
    if let Some(wg) = WG_OVERRIDE.with(|c| c.get()) {
        return wg;
    }
    if dev.is_cpu() {
        8
    } else {
        64
    }
}

/// M, the rows of `t` viewed as [M, last]: `t` must be f32 with last dim `last`.
fn rows_of(op: &'static str, name: &str, t: &Tensor, last: usize, last_name: &str) -> Result<usize> {
    expect_f32(op, name, t)?;
    if t.rank() == 0 || t.last_dim() != last {
        return Err(shape_err(op, format!("{name} {:?} must end in {last_name} = {last}", t.shape)));
    }
    Ok(t.rows())
}

fn params(op: &'static str, m: usize, w: &QTensor, has_bias: bool, accumulate: bool) -> Result<Vec<u8>> {
    params_at(op, m, w, has_bias, accumulate, 0)
}

/// [`params`] with a table's first row (`row0`: `qembedding`'s row offset in a table split by rows).
fn params_at(op: &'static str, m: usize, w: &QTensor, has_bias: bool, accumulate: bool, row0: u32) -> Result<Vec<u8>> {
    let u = |what: &str, x: usize| index_u32(op, what, x);
    // Byte offsets of W and element offsets of x, y, dx, dY must fit in u32.
    u("the weight's byte count", w.rows * w.row_bytes())?;
    u("the element count of x / dx", m * w.cols)?;
    u("the element count of y / dY", m * w.rows)?;
    Ok(words(&[
        u("M", m)?,
        u("N", w.rows)?,
        u("K", w.cols)?,
        u("the row bytes", w.row_bytes())?,
        has_bias as u32,
        accumulate as u32,
        row0,
        0,
    ]))
}

/// out [M, N] (+)= x [M, K] · Wᵀ (+ bias [N]), W [N, K] quantized; x and out f32 with any leading dims
/// (x [..., K], out [..., N], the same rows). With `accumulate` the product is added to out (after the bias).
pub fn qmatmul_forward(
    dev: &Device,
    out: &Tensor,
    x: &Tensor,
    w: &QTensor,
    bias: Option<&Tensor>,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "qmatmul_forward";
    let m = rows_of(OP, "x", x, w.cols, "K (the weight's columns)")?;
    let mo = rows_of(OP, "out", out, w.rows, "N (the weight's rows)")?;
    if mo != m {
        return Err(shape_err(OP, format!("out {:?} has {mo} rows, x {:?} has {m}", out.shape, x.shape)));
    }
    if let Some(b) = bias {
        expect_f32_shape(OP, "bias", b, &[w.rows])?;
    }
    if m == 0 {
        return Ok(Vec::new());
    }
    let tm = row_tile(m);
    let wg = workgroup(dev);
    let grid = [
        index_u32(OP, "the column groups", w.rows.div_ceil(FORWARD_COLS).div_ceil(wg as usize))?,
        index_u32(OP, "the row blocks", m.div_ceil(tm))?,
        1,
    ];
    let p = params(OP, m, w, bias.is_some(), accumulate)?;
    let bindings = [(1, x), (2, &w.words), (3, out), (4, bias.unwrap_or(x))];
    let sp = spec(w.qtype, tm, wg, subgroup_x(dev, wg));
    Ok(vec![dev.dispatch(FILE, "qmatmul_forward", &sp, Some(&p), &bindings, grid)?])
}

/// dx [M, K] (+)= dY [M, N] · W, W [N, K] quantized: the input gradient of [`qmatmul_forward`]. dY and dx f32
/// with any leading dims (dY [..., N], dx [..., K], the same rows); with `accumulate` added to dx.
pub fn qmatmul_backward_input(
    dev: &Device,
    dx: &Tensor,
    dy: &Tensor,
    w: &QTensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "qmatmul_backward_input";
    let m = rows_of(OP, "dy", dy, w.rows, "N (the weight's rows)")?;
    let mx = rows_of(OP, "dx", dx, w.cols, "K (the weight's columns)")?;
    if mx != m {
        return Err(shape_err(OP, format!("dx {:?} has {mx} rows, dy {:?} has {m}", dx.shape, dy.shape)));
    }
    if m == 0 {
        return Ok(Vec::new());
    }
    let tm = row_tile(m);
    let wg = workgroup(dev);
    let grid = [
        index_u32(OP, "the k groups", w.cols.div_ceil(BACKWARD_K).div_ceil(wg as usize))?,
        index_u32(OP, "the row blocks", m.div_ceil(tm))?,
        1,
    ];
    let p = params(OP, m, w, false, accumulate)?;
    let bindings = [(2, &w.words), (5, dy), (6, dx)];
    Ok(vec![dev.dispatch(FILE, "qmatmul_backward_input", &spec(w.qtype, tm, wg, false), Some(&p), &bindings, grid)?])
}

/// out [N, K] (f32, at least N * K elements; the first N * K are written) = W dequantized, 32 values per
/// invocation (K is a multiple of 32) with the kernels' own `deq8`.
pub fn qdequantize(dev: &Device, out: &Tensor, w: &QTensor) -> Result<Vec<Dispatch>> {
    const OP: &str = "qdequantize";
    expect_f32(OP, "out", out)?;
    if out.numel() < w.rows * w.cols {
        return Err(shape_err(
            OP,
            format!("out {:?} holds fewer than the weight's {} x {} values", out.shape, w.rows, w.cols),
        ));
    }
    let wg = workgroup(dev);
    let groups = index_u32(OP, "the workgroup count", (w.rows * w.cols / 32).div_ceil(wg as usize))?;
    let p = params(OP, 0, w, false, false)?;
    let bindings = [(2, &w.words), (6, out)];
    Ok(vec![dev.dispatch(FILE, "qdequantize", &spec(w.qtype, 1, wg, false), Some(&p), &bindings, grid_1d(groups))?])
}

/// out [M, K] (f32) = the rows `ids` [M] (u32) of W [N, K] dequantized: an embedding lookup in a quantized
/// table (an id outside [0, N) gives a zero row, as [`super::embedding::embedding_forward`] does). `out` may
/// have any leading dims ([..., K], M rows).
pub fn qembedding_forward(dev: &Device, out: &Tensor, ids: &Tensor, w: &QTensor) -> Result<Vec<Dispatch>> {
    qembedding_forward_offset(dev, out, ids, w, 0)
}

/// [`qembedding_forward`] for a table holding rows `offset..offset + N` of a larger vocabulary (a table split
/// by rows, as `embedding_forward_offset`): out row i is table row ids[i] - offset, zero outside that range.
pub fn qembedding_forward_offset(
    dev: &Device,
    out: &Tensor,
    ids: &Tensor,
    w: &QTensor,
    offset: u32,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "qembedding_forward";
    let m = rows_of(OP, "out", out, w.cols, "K (the table's columns)")?;
    crate::guard::expect_dtype(OP, "ids", ids, &[DType::U32, DType::I32])?;
    if ids.numel() != m {
        return Err(shape_err(OP, format!("ids {:?} for out {:?}: one id per row", ids.shape, out.shape)));
    }
    if m == 0 {
        return Ok(Vec::new());
    }
    let wg = workgroup(dev);
    let groups = index_u32(OP, "the workgroup count", (m * w.cols / 32).div_ceil(wg as usize))?;
    let p = params_at(OP, m, w, false, false, offset)?;
    let bindings = [(2, &w.words), (6, out), (7, ids)];
    Ok(vec![dev.dispatch(FILE, "qembedding", &spec(w.qtype, 1, wg, false), Some(&p), &bindings, grid_1d(groups))?])
}

/// The largest weight (values) that the matmul launchers dequantize into the device's scratch before a large
/// product: 8M values (32 MB of f32), above every projection of the decoders rime loads. A larger one (an
/// embedding table used as the output head: SmolLM2's 28M values, Gemma 3's 168M) is read from its blocks,
/// so that the scratch never costs a sizeable share of the f32 weights the quantization saved. (Splitting
/// SmolLM2's head into four parts of this size, each dequantized into the scratch for the tiled matmul, made a
/// training step at 2 × 256 tokens 1.3× slower on lavapipe: 50.6 / 46.8 s against 38.7 / 36.0 s for three steps,
/// alternating, 5 Dec 2026.)
pub const SCRATCH_MAX_VALUES: usize = 8 << 20;

/// The device's dequantization scratch for a product of `m` rows with `w`, when the `_scratch` path would
/// use it: from `min_m` rows, for a weight of at most [`SCRATCH_MAX_VALUES`] values.
fn device_scratch(dev: &Device, w: &QTensor, m: usize, min_m: usize) -> Result<Option<Tensor>> {
    let elems = w.rows * w.cols;
    if m < min_m || elems > SCRATCH_MAX_VALUES || DType::F32.storage_bytes(elems) > dev.max_binding() {
        return Ok(None);
    }
    dev.dequant_scratch(elems).map(Some)
}

/// x [.., K] · Wᵀ (+ bias) with a quantized W, as the matmul launchers route it: the block kernels for few
/// rows, else W dequantized into the device's scratch and the f32 matmul.
pub(crate) fn linear_forward(
    dev: &Device,
    out: &Tensor,
    x: &Tensor,
    w: &QTensor,
    bias: Option<&Tensor>,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let m = x.numel() / w.cols.max(1);
    match device_scratch(dev, w, m, QSCRATCH_MIN_M_FORWARD)? {
        Some(s) => qmatmul_forward_scratch(dev, out, x, w, bias, accumulate, &s),
        None => qmatmul_forward(dev, out, x, w, bias, accumulate),
    }
}

/// dY [.., N] · W with a quantized W (the input gradient of [`linear_forward`]), routed as it is.
pub(crate) fn linear_backward_input(
    dev: &Device,
    dx: &Tensor,
    dy: &Tensor,
    w: &QTensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let m = dy.numel() / w.rows.max(1);
    match device_scratch(dev, w, m, QSCRATCH_MIN_M_BACKWARD)? {
        Some(s) => qmatmul_backward_input_scratch(dev, dx, dy, w, accumulate, &s),
        None => qmatmul_backward_input(dev, dx, dy, w, accumulate),
    }
}

/// The scratch weight view [N, K] after checking `scratch` (f32, at least N * K elements).
fn scratch_view(op: &'static str, scratch: &Tensor, w: &QTensor) -> Result<Tensor> {
    expect_f32(op, "scratch", scratch)?;
    if scratch.numel() < w.rows * w.cols {
        return Err(shape_err(
            op,
            format!(
                "scratch {:?} holds fewer than the weight's {} x {} values (one scratch of the largest weight \
                 serves every layer)",
                scratch.shape, w.rows, w.cols
            ),
        ));
    }
    Ok(scratch.view(&[w.rows, w.cols], DType::F32))
}

/// [`qmatmul_forward`], except that products of at least [`QSCRATCH_MIN_M_FORWARD`] rows dequantize W into `scratch`
/// (f32, at least N * K elements, overwritten; the caller shares one among all layers, since dispatches run in
/// order) and run the f32 matmul (its tiled kernels), which on lavapipe is 2-3x faster than reading the blocks
/// per row tile at training sizes (README, "Quantized weights on the GPU (kernels)"). The weight stays quantized at rest.
#[allow(clippy::too_many_arguments)]
pub fn qmatmul_forward_scratch(
    dev: &Device,
    out: &Tensor,
    x: &Tensor,
    w: &QTensor,
    bias: Option<&Tensor>,
    accumulate: bool,
    scratch: &Tensor,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "qmatmul_forward";
    let m = rows_of(OP, "x", x, w.cols, "K (the weight's columns)")?;
    if m < QSCRATCH_MIN_M_FORWARD {
        return qmatmul_forward(dev, out, x, w, bias, accumulate);
    }
    let wf = scratch_view(OP, scratch, w)?;
    let mut ds = qdequantize(dev, &wf, w)?;
    ds.extend(matmul_forward_scaled(dev, Variant::Auto, out, x, &wf, bias, false, true, 1.0, accumulate)?);
    Ok(ds)
}

/// [`qmatmul_backward_input`] with [`qmatmul_forward_scratch`]'s large-M path (W dequantized into `scratch`,
/// then the f32 matmul dY · W).
pub fn qmatmul_backward_input_scratch(
    dev: &Device,
    dx: &Tensor,
    dy: &Tensor,
    w: &QTensor,
    accumulate: bool,
    scratch: &Tensor,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "qmatmul_backward_input";
    let m = rows_of(OP, "dy", dy, w.rows, "N (the weight's rows)")?;
    if m < QSCRATCH_MIN_M_BACKWARD {
        return qmatmul_backward_input(dev, dx, dy, w, accumulate);
    }
    let wf = scratch_view(OP, scratch, w)?;
    let mut ds = qdequantize(dev, &wf, w)?;
    ds.extend(matmul_forward_scaled(dev, Variant::Auto, dx, dy, &wf, None, false, false, 1.0, accumulate)?);
    Ok(ds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::qmatmul as r;
    use crate::DeviceOptions;
    use rand::{Rng, SeedableRng};

    /// The GPU workgroup size (64, several workgroups per row block in both products and the dequantizer) on
    /// whatever adapter runs the tests, against the reference (tolerance as tests/qmatmul.rs explains).
    #[test]
    fn gpu_workgroup_size_matches_reference() {
        let Ok(dev) = Device::new(&DeviceOptions::default()) else { return };
        WG_OVERRIDE.with(|c| c.set(Some(64)));
        let mut g = rand::rngs::StdRng::seed_from_u64(5);
        for (qtype, n, k) in [(QType::Q4K, 300, 1280), (QType::Q5_0, 261, 1088)] {
            let (bs, bb) = qtype.block();
            let mut bytes: Vec<u8> = (0..n * k / bs * bb).map(|_| g.random::<u8>()).collect();
            for blk in bytes.chunks_exact_mut(bb) {
                // Finite f16 scales in [2^-10, 2^-4): exponent field 5..11, any mantissa.
                for o in [0, 2] {
                    let h: u16 = ((g.random_range(5u16..11)) << 10) | g.random_range(0u16..1024);
                    blk[o..o + 2].copy_from_slice(&h.to_le_bytes());
                }
            }
            let w = r::dequantize(qtype, &bytes, n, k).unwrap();
            let qw = QTensor::upload(&dev, qtype, n, k, &bytes).unwrap();
            let m = 37;
            let x: Vec<f32> = (0..m * k).map(|_| g.random_range(-1.0..1.0)).collect();
            let dy: Vec<f32> = (0..m * n).map(|_| g.random_range(-1.0..1.0)).collect();
            let u = 1.0 / (1u64 << 24) as f64;
            let close = |what: &str, got: Vec<f32>, want: Vec<f32>, terms: usize, abs: Vec<f64>| {
                for (i, ((a, b), s)) in got.iter().zip(&want).zip(&abs).enumerate() {
                    let tol = (terms + 4) as f64 * u * s + (b.abs() as f64) * u;
                    assert!(((a - b).abs() as f64) <= tol, "{what} {qtype}: index {i}: got {a}, want {b}");
                }
            };
            let tx = dev.upload_f32(&x, &[m, k]).unwrap();
            let ty = dev.zeros(&[m, n], crate::DType::F32).unwrap();
            dev.run(&qmatmul_forward(&dev, &ty, &tx, &qw, None, false).unwrap()).unwrap();
            let abs: Vec<f64> = (0..m * n)
                .map(|i| (0..k).map(|t| (x[i / n * k + t] as f64 * w[i % n * k + t] as f64).abs()).sum())
                .collect();
            let want = r::qmatmul_forward(&x, &w, None, None, m, n, k);
            close("forward", dev.download_f32(&ty).unwrap(), want, k, abs);
            let tdy = dev.upload_f32(&dy, &[m, n]).unwrap();
            let tdx = dev.zeros(&[m, k], crate::DType::F32).unwrap();
            dev.run(&qmatmul_backward_input(&dev, &tdx, &tdy, &qw, false).unwrap()).unwrap();
            let abs: Vec<f64> = (0..m * k)
                .map(|i| (0..n).map(|j| (dy[i / k * n + j] as f64 * w[j * k + i % k] as f64).abs()).sum())
                .collect();
            let want = r::qmatmul_backward_input(&dy, &w, None, m, n, k);
            close("backward", dev.download_f32(&tdx).unwrap(), want, n, abs);
            let tw = dev.zeros(&[n, k], crate::DType::F32).unwrap();
            dev.run(&qdequantize(&dev, &tw, &qw).unwrap()).unwrap();
            let big = w.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
            let got = dev.download_f32(&tw).unwrap();
            for (i, (a, b)) in got.iter().zip(&w).enumerate() {
                assert!(((a - b).abs() as f64) <= 2.0 * u * big, "dequantize {qtype}: index {i}: got {a}, want {b}");
            }
        }
        WG_OVERRIDE.with(|c| c.set(None));
    }
}
