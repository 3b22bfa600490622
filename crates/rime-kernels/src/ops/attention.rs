//! Launchers for shaders/attention.wgsl: fused multi-head attention (online-softmax forward that saves the
//! log-sum-exp, and a backward that recomputes the probabilities from it), with padding mask, causal mask
//! (aligned to the end of the keys, so T < S works for a KV cache) and grouped-query heads. Memory is linear in
//! the sequence length; the backward is deterministic (no atomics): one dispatch computes dQ (and the
//! D = rowsum(dO * O) scratch), a second computes dK and dV by iterating over queries. The `_window`
//! launchers add a sliding window to the causal rule (Gemma 3's local layers): query t sees key j iff
//! t + (S - T) - W < j <= t + (S - T).

use super::words;
use crate::error::{shape_err, Result};
use crate::gen;
use crate::guard::{expect_f32, expect_f32_shape};
use crate::{Device, Dispatch, Spec, Tensor};

const FILE: &str = "attention.wgsl";
/// Largest head size of the subgroup kernels (they keep up to four head vectors per invocation in registers).
pub const MAX_HEAD_SIZE: usize = 128;
/// Largest head size of the plain kernels (Gemma 3 uses 256); above [`MAX_HEAD_SIZE`] only they run.
pub const MAX_HEAD_SIZE_PLAIN: usize = 256;

/// Which kernels to launch. Both compute the same thing.
/// - `Subgroup`: workgroups of 8 lanes that share streamed rows through `subgroupBroadcast` (lavapipe, where
///   loads inside loops are per-lane scalar loops); needs SUBGROUP and subgroups of at least 8 lanes.
/// - `Plain`: one row per invocation, 64 per workgroup, every lane loading the same streamed row (a broadcast
///   load on a GPU); runs anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Subgroup,
    Plain,
}

impl Variant {
    /// `Subgroup` on a CPU adapter that supports it, else `Plain`.
    pub fn for_device(dev: &Device) -> Variant {
        if dev.is_cpu() && subgroups_usable(dev) {
            Variant::Subgroup
        } else {
            Variant::Plain
        }
    }

    /// [`Variant::for_device`] where the subgroup kernels apply (head size up to [`MAX_HEAD_SIZE`], no sliding
    /// window), else `Plain`.
    pub fn for_call(dev: &Device, head_size: usize, window: usize) -> Variant {
        if head_size <= MAX_HEAD_SIZE && window == 0 {
            Variant::for_device(dev)
        } else {
            Variant::Plain
        }
    }
    fn workgroup(self) -> u32 {
        match self {
            Variant::Subgroup => 8,
            Variant::Plain => 64,
        }
    }
    fn entry(self, base: &'static str) -> String {
        match self {
            Variant::Subgroup => format!("{base}_subgroup"),
            Variant::Plain => base.to_string(),
        }
    }
}

fn subgroups_usable(dev: &Device) -> bool {
    dev.has_subgroups() && dev.info().subgroup_min_size >= 8
}

/// The prelude: head size in vec4s; in the subgroup specialization also the lane-broadcast helpers and the
/// subgroup kernels generated for this head size (see `gen::attention`), so the plain one compiles
/// without subgroups.
fn spec(hs: usize, variant: Variant) -> Spec {
    let mut pre = format!("const HS4: u32 = {}u;\n", hs / 4);
    if variant == Variant::Subgroup {
        pre.push_str(&gen::attention::subgroup_prelude(hs));
    }
    Spec::new().prelude(pre).constant("WG", variant.workgroup() as f64)
}

pub fn specs() -> Vec<(&'static str, Spec)> {
    let mut v = Vec::new();
    for hs in (4..=MAX_HEAD_SIZE).step_by(4) {
        for variant in [Variant::Subgroup, Variant::Plain] {
            v.push((FILE, spec(hs, variant)));
        }
    }
    for hs in (MAX_HEAD_SIZE + 4..=MAX_HEAD_SIZE_PLAIN).step_by(4) {
        v.push((FILE, spec(hs, Variant::Plain)));
    }
    v
}

fn check_variant(op: &'static str, dev: &Device, variant: Variant, d: &Dims, window: usize) -> Result<()> {
    if variant == Variant::Subgroup && (d.hs > MAX_HEAD_SIZE || window > 0) {
        return Err(shape_err(
            op,
            format!(
                "the subgroup variant takes head sizes up to {MAX_HEAD_SIZE} and no sliding window (head size {},                  window {window}); use the plain variant",
                d.hs
            ),
        ));
    }
    if variant == Variant::Subgroup && !subgroups_usable(dev) {
        return Err(shape_err(
            op,
            format!(
                "the subgroup variant needs SUBGROUP and subgroups of at least 8 lanes; adapter '{}' has \
                 SUBGROUP = {}, subgroup size {}..{}",
                dev.info().name,
                dev.has_subgroups(),
                dev.info().subgroup_min_size,
                dev.info().subgroup_max_size
            ),
        ));
    }
    Ok(())
}

/// Sizes read from q [B, T, NH, HS] and k [B, S, NKV, HS].
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    s: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
}

fn dims(op: &'static str, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Dims> {
    expect_f32(op, "q", q)?;
    expect_f32(op, "k", k)?;
    if q.rank() != 4 || k.rank() != 4 {
        return Err(shape_err(
            op,
            format!("q {:?} must be [B, T, NH, HS] and k {:?} must be [B, S, NKV, HS]", q.shape, k.shape),
        ));
    }
    let d = Dims { b: q.shape[0], t: q.shape[1], s: k.shape[1], nh: q.shape[2], nkv: k.shape[2], hs: q.shape[3] };
    if k.shape[0] != d.b || k.shape[3] != d.hs {
        return Err(shape_err(op, format!("k {:?} does not match q {:?} in batch or head size", k.shape, q.shape)));
    }
    if d.b == 0 || d.t == 0 || d.s == 0 || d.nh == 0 || d.nkv == 0 {
        return Err(shape_err(op, format!("empty dimension in q {:?} or k {:?}", q.shape, k.shape)));
    }
    if d.hs == 0 || !d.hs.is_multiple_of(4) || d.hs > MAX_HEAD_SIZE_PLAIN {
        return Err(shape_err(
            op,
            format!(
                "head size {} (q {:?}) must be a positive multiple of 4 and at most {MAX_HEAD_SIZE_PLAIN}",
                d.hs, q.shape
            ),
        ));
    }
    if !d.nh.is_multiple_of(d.nkv) {
        return Err(shape_err(
            op,
            format!("{} query heads (q {:?}) is not a multiple of {} kv heads (k {:?})", d.nh, q.shape, d.nkv, k.shape),
        ));
    }
    expect_f32_shape(op, "v", v, &k.shape)?;
    if let Some(m) = mask {
        expect_f32_shape(op, "mask", m, &[d.b, d.s])?;
    }
    Ok(d)
}

fn params(d: &Dims, has_mask: bool, causal: bool, scale: f32, window: usize) -> Vec<u8> {
    words(&[
        d.b as u32,
        d.t as u32,
        d.s as u32,
        d.nh as u32,
        d.nkv as u32,
        causal as u32,
        has_mask as u32,
        scale.to_bits(),
        f32::NEG_INFINITY.to_bits(),
        window as u32,
        0,
        0,
    ])
}

fn grid(rows: usize, heads: usize, b: usize, hs: usize, variant: Variant) -> [u32; 3] {
    let per_group = match variant {
        Variant::Subgroup => 8 * gen::attention::rows_per_lane(hs) as u32,
        Variant::Plain => variant.workgroup(),
    };
    [(rows as u32).div_ceil(per_group), heads as u32, b as u32]
}

/// out = softmax(scale * q k^T + masks) v per head, lse = log-sum-exp of the scaled, masked scores.
/// q [B, T, NH, HS]; k, v [B, S, NKV, HS] with NH % NKV == 0 (head h uses kv head h / (NH/NKV)); out [B, T, NH, HS];
/// lse [B, NH, T]. mask [B, S]: 1 = keep, 0 = padding. causal: query t sees key j iff j <= t + (S - T).
/// A query row that sees no key gets zeros in out and -inf in lse.
///
/// Causal self-attention over 6 tokens, 4 query heads sharing 2 kv heads, checked against [`reference`]:
/// ```
/// use rime_kernels::reference::attention::{self as cpu, Dims};
/// use rime_kernels::{ops::attention::attention_forward, DType, Device, DeviceOptions};
///
/// let dev = Device::new(&DeviceOptions::default())?;
/// let d = Dims { b: 1, t: 6, s: 6, nh: 4, nkv: 2, hs: 16 };
/// let fill = |n: usize, f: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * f).sin()).collect() };
/// let (q, k, v) = (fill(d.t * d.nh * d.hs, 0.3), fill(d.s * d.nkv * d.hs, 0.7), fill(d.s * d.nkv * d.hs, 1.1));
/// let qt = dev.upload_f32(&q, &[d.b, d.t, d.nh, d.hs])?;
/// let kt = dev.upload_f32(&k, &[d.b, d.s, d.nkv, d.hs])?;
/// let vt = dev.upload_f32(&v, &[d.b, d.s, d.nkv, d.hs])?;
/// let out = dev.empty(&[d.b, d.t, d.nh, d.hs], DType::F32)?;
/// let lse = dev.empty(&[d.b, d.nh, d.t], DType::F32)?;
/// let scale = 1.0 / (d.hs as f32).sqrt();
/// dev.run(&attention_forward(&dev, &out, &lse, &qt, &kt, &vt, None, true, scale)?)?;
///
/// let (want, _) = cpu::attention_forward(&d, &q, &k, &v, None, true, scale);
/// let got = dev.download_f32(&out)?;
/// assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-4), "{got:?} vs {want:?}");
/// # Ok::<(), rime_kernels::Error>(())
/// ```
///
/// [`reference`]: crate::reference::attention::attention_forward
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    dev: &Device,
    out: &Tensor,
    lse: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f32,
) -> Result<Vec<Dispatch>> {
    let variant = Variant::for_call(dev, q.shape.last().copied().unwrap_or(0), 0);
    attention_forward_variant(dev, variant, out, lse, q, k, v, mask, causal, scale)
}

/// [`attention_forward`] with a sliding window: with `causal`, query t sees key j iff
/// t + (S - T) - window < j <= t + (S - T) (at most `window` keys, itself included; 0 = no window). A window
/// needs `causal`. Runs the plain kernels.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_window(
    dev: &Device,
    out: &Tensor,
    lse: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f32,
    window: usize,
) -> Result<Vec<Dispatch>> {
    let variant = Variant::for_call(dev, q.shape.last().copied().unwrap_or(0), window);
    forward_impl(dev, variant, out, lse, q, k, v, mask, causal, scale, window)
}

fn check_window(op: &'static str, causal: bool, window: usize) -> Result<()> {
    if window > 0 && !causal {
        return Err(shape_err(op, format!("a sliding window ({window}) needs causal attention")));
    }
    if window > u32::MAX as usize {
        return Err(shape_err(op, format!("sliding window {window} does not fit 32 bits")));
    }
    Ok(())
}

/// [`attention_forward`] with an explicit kernel variant (tests run both).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_variant(
    dev: &Device,
    variant: Variant,
    out: &Tensor,
    lse: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f32,
) -> Result<Vec<Dispatch>> {
    forward_impl(dev, variant, out, lse, q, k, v, mask, causal, scale, 0)
}

#[allow(clippy::too_many_arguments)]
fn forward_impl(
    dev: &Device,
    variant: Variant,
    out: &Tensor,
    lse: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f32,
    window: usize,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "attention_forward";
    let d = dims(OP, q, k, v, mask)?;
    expect_f32_shape(OP, "out", out, &q.shape)?;
    expect_f32_shape(OP, "lse", lse, &[d.b, d.nh, d.t])?;
    check_window(OP, causal, window)?;
    check_variant(OP, dev, variant, &d, window)?;
    let m = mask.unwrap_or(k);
    Ok(vec![dev.dispatch(
        FILE,
        &variant.entry("attention_forward"),
        &spec(d.hs, variant),
        Some(&params(&d, mask.is_some(), causal, scale, window)),
        &[(1, q), (2, k), (3, v), (4, m), (5, out), (6, lse)],
        grid(d.t, d.nh, d.b, d.hs, variant),
    )?])
}

/// Gradients of [`attention_forward`]: dq like q; dk, dv like k, v (summed over the query heads sharing a kv
/// head). All three are overwritten. `out` and `lse` are the forward's outputs; delta_tmp [B, NH, T] is scratch.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dev: &Device,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    delta_tmp: &Tensor,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f32,
) -> Result<Vec<Dispatch>> {
    attention_backward_window(dev, dq, dk, dv, delta_tmp, dout, q, k, v, out, lse, mask, causal, scale, 0)
}

/// Gradients of [`attention_forward_window`] (see [`attention_backward`]).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_window(
    dev: &Device,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    delta_tmp: &Tensor,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f32,
    window: usize,
) -> Result<Vec<Dispatch>> {
    backward_impl(
        dev,
        Variant::for_call(dev, q.shape.last().copied().unwrap_or(0), window),
        dq,
        dk,
        dv,
        delta_tmp,
        dout,
        q,
        k,
        v,
        out,
        lse,
        mask,
        causal,
        scale,
        window,
    )
}

/// [`attention_backward`] with an explicit kernel variant (tests run both).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_variant(
    dev: &Device,
    variant: Variant,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    delta_tmp: &Tensor,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f32,
) -> Result<Vec<Dispatch>> {
    backward_impl(dev, variant, dq, dk, dv, delta_tmp, dout, q, k, v, out, lse, mask, causal, scale, 0)
}

#[allow(clippy::too_many_arguments)]
fn backward_impl(
    dev: &Device,
    variant: Variant,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    delta_tmp: &Tensor,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f32,
    window: usize,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "attention_backward";
    let d = dims(OP, q, k, v, mask)?;
    expect_f32_shape(OP, "dq", dq, &q.shape)?;
    expect_f32_shape(OP, "dk", dk, &k.shape)?;
    expect_f32_shape(OP, "dv", dv, &k.shape)?;
    expect_f32_shape(OP, "dout", dout, &q.shape)?;
    expect_f32_shape(OP, "out", out, &q.shape)?;
    expect_f32_shape(OP, "lse", lse, &[d.b, d.nh, d.t])?;
    expect_f32_shape(OP, "delta_tmp", delta_tmp, &[d.b, d.nh, d.t])?;
    check_window(OP, causal, window)?;
    check_variant(OP, dev, variant, &d, window)?;
    let m = mask.unwrap_or(k);
    let sp = spec(d.hs, variant);
    let pr = params(&d, mask.is_some(), causal, scale, window);
    let query = dev.dispatch(
        FILE,
        &variant.entry("attention_backward_query"),
        &sp,
        Some(&pr),
        &[(1, q), (2, k), (3, v), (4, m), (7, dout), (8, out), (9, lse), (10, delta_tmp), (12, dq)],
        grid(d.t, d.nh, d.b, d.hs, variant),
    )?;
    let key_value = dev.dispatch(
        FILE,
        &variant.entry("attention_backward_key_value"),
        &sp,
        Some(&pr),
        &[(1, q), (2, k), (3, v), (4, m), (7, dout), (9, lse), (11, delta_tmp), (13, dk), (14, dv)],
        grid(d.s, d.nkv, d.b, d.hs, variant),
    )?;
    Ok(vec![query, key_value])
}
