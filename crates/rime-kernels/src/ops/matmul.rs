//! Launchers for shaders/matmul.wgsl: batched matmul forward and both backwards, with transposes, a shared
//! (2-D) or batched right operand, an optional bias and f16/bf16 frozen weights. Every op is mapped onto one
//! strided product (`Gemm`), which LoRA reuses; the kernel is picked per call: on CPU adapters (lavapipe)
//! a vec4 team-tiled kernel when the layout allows it (forward, backward_input without trans_a, and weight
//! gradients, with 4-aligned sizes; subgroupBroadcast when the adapter's subgroups are 8 lanes), else the
//! general register-tiled kernel, which is also the choice on GPUs (measured faster there). Products with few
//! rows (M <= [`GEMV_MAX_M`]: decoding, short prompts) whose weight is K-contiguous (x·Wᵀ) go to the
//! matrix-vector kernels of shaders/gemv.wgsl on every adapter (see [`super::gemv`]).

use super::words;
use crate::error::{shape_err, Result};
use crate::guard::{expect_dtype, expect_f32, expect_shape, index_u32, FLOATS};
use crate::{DType, Device, Dispatch, QTensor, Spec, Tensor, TextureTwin};

const FILE: &str = "matmul.wgsl";
/// General kernel: workgroup of WGX x WGY invocations, each an 8x8 tile (GTM x GTN in the shader).
const WGX: u32 = 8;
const WGY: u32 = 8;
const GTM: usize = 8;
const GTN: usize = 8;
/// Tiled kernels: a team of 8 lanes (one workgroup) covers FTM rows and 8 * FTN columns.
const FTM: usize = 32;
const FTN: usize = 8;

/// `Variant::Auto` sends products of at most this many rows with a K-contiguous rhs to gemv.wgsl.
pub const GEMV_MAX_M: usize = 8;

/// Which kernel runs a product. `Auto` picks per device and layout; a forced variant the layout cannot use
/// falls back (TiledSubgroup -> Tiled -> General, GemvSubgroup -> Gemv -> General), so every variant is always correct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Auto,
    General,
    Tiled,
    TiledSubgroup,
    /// The matrix-vector kernels (gemv.wgsl) with plain loads of x.
    Gemv,
    /// [`Variant::Gemv`] sharing x through subgroupBroadcast (falls back to Gemv unless subgroups are 8 lanes).
    GemvSubgroup,
    /// The tiled nn / nt kernels reading a frozen f32 or f16 rhs through its texture twin
    /// ([`crate::Device::with_texture_twin`]); falls back to TiledSubgroup when the rhs has none or the layout
    /// does not match it.
    TiledTexture,
}

/// Where the tiled nn / nt kernels read rhs from: `rhs4_nn(column offset, row offset, k)` and
/// `rhs4_nt(row offset, n, k)` (see matmul.wgsl).
const RHS4_STORAGE: &str = "fn rhs4_nn(c: u32, rk: u32, k: u32) -> vec4<f32> { return load_rhs4(c + rk); }\n\
     fn rhs4_nt(ro: u32, n: u32, k: u32) -> vec4<f32> { return load_rhs4(ro + k); }";
const RHS4_TEXTURE: &str = "@group(0) @binding(8) var rhs_tex: texture_2d<f32>;\n\
     fn rhs4_nn(c: u32, rk: u32, k: u32) -> vec4<f32> { return textureLoad(rhs_tex, vec2<u32>(c >> 2u, k), 0); }\n\
     fn rhs4_nt(ro: u32, n: u32, k: u32) -> vec4<f32> { return textureLoad(rhs_tex, vec2<u32>(k >> 2u, n), 0); }";

fn rhs_prelude(dt: DType) -> &'static str {
    match dt {
        DType::F16 => {
            "@group(0) @binding(2) var<storage, read> rhs: array<u32>;\n\
             @group(0) @binding(6) var<storage, read> rhs4: array<vec2<u32>>;\n\
             fn load_rhs(i: u32) -> f32 { return unpack_f16(rhs[i >> 1u], i); }\n\
             fn load_rhs4(i: u32) -> vec4<f32> { let w = rhs4[i >> 2u]; \
             return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)); }"
        }
        DType::BF16 => {
            "@group(0) @binding(2) var<storage, read> rhs: array<u32>;\n\
             @group(0) @binding(6) var<storage, read> rhs4: array<vec2<u32>>;\n\
             fn load_rhs(i: u32) -> f32 { return unpack_bf16(rhs[i >> 1u], i); }\n\
             fn load_rhs4(i: u32) -> vec4<f32> { let w = rhs4[i >> 2u]; \
             return vec4<f32>(bitcast<f32>(w.x << 16u), bitcast<f32>(w.x & 0xffff0000u), \
             bitcast<f32>(w.y << 16u), bitcast<f32>(w.y & 0xffff0000u)); }"
        }
        _ => {
            "@group(0) @binding(2) var<storage, read> rhs: array<f32>;\n\
             @group(0) @binding(6) var<storage, read> rhs4: array<vec4<f32>>;\n\
             fn load_rhs(i: u32) -> f32 { return rhs[i]; }\n\
             fn load_rhs4(i: u32) -> vec4<f32> { return rhs4[i >> 2u]; }"
        }
    }
}

// The lhs values a team shares: rows mrow0..mrow0+8 at k..k+3 (fetch_rows), or rows m0..m0+32 at one k for
// M-contiguous lhs (fetch_cols). With subgroups, lane l loads one vec4 and subgroupBroadcast (which needs a
// constant lane, hence spelled out) hands every lane all eight; without, each lane loads all eight. Only the subgroup spec mentions subgroups: a module that did would fail to
// build on adapters without SUBGROUP.
fn team_prelude(subgroup: bool) -> &'static str {
    if subgroup {
        "fn fetch_rows(lbase: u32, mrow0: u32, lane: u32, k: u32) -> array<vec4<f32>, 8> {\n\
         let v = lhs_row4(lbase, mrow0 + lane, k);\n\
         return array<vec4<f32>, 8>(\
         subgroupBroadcast(v, 0u), subgroupBroadcast(v, 1u), subgroupBroadcast(v, 2u), subgroupBroadcast(v, 3u), \
         subgroupBroadcast(v, 4u), subgroupBroadcast(v, 5u), subgroupBroadcast(v, 6u), subgroupBroadcast(v, 7u)); }\n\
         fn fetch_cols(base: u32, m0: u32, lane: u32) -> array<vec4<f32>, 8> {\n\
         let v = lhs_col4(base, m0 + 4u * lane);\n\
         return array<vec4<f32>, 8>(\
         subgroupBroadcast(v, 0u), subgroupBroadcast(v, 1u), subgroupBroadcast(v, 2u), subgroupBroadcast(v, 3u), \
         subgroupBroadcast(v, 4u), subgroupBroadcast(v, 5u), subgroupBroadcast(v, 6u), subgroupBroadcast(v, 7u)); }"
    } else {
        "fn fetch_rows(lbase: u32, mrow0: u32, lane: u32, k: u32) -> array<vec4<f32>, 8> {\n\
         return array<vec4<f32>, 8>(\
         lhs_row4(lbase, mrow0, k), lhs_row4(lbase, mrow0 + 1u, k), lhs_row4(lbase, mrow0 + 2u, k), \
         lhs_row4(lbase, mrow0 + 3u, k), lhs_row4(lbase, mrow0 + 4u, k), lhs_row4(lbase, mrow0 + 5u, k), \
         lhs_row4(lbase, mrow0 + 6u, k), lhs_row4(lbase, mrow0 + 7u, k)); }\n\
         fn fetch_cols(base: u32, m0: u32, lane: u32) -> array<vec4<f32>, 8> {\n\
         return array<vec4<f32>, 8>(\
         lhs_col4(base, m0), lhs_col4(base, m0 + 4u), lhs_col4(base, m0 + 8u), lhs_col4(base, m0 + 12u), \
         lhs_col4(base, m0 + 16u), lhs_col4(base, m0 + 20u), lhs_col4(base, m0 + 24u), lhs_col4(base, m0 + 28u)); }"
    }
}

/// The module for an rhs dtype, team flavour and rhs source (texture twin or storage).
fn spec(rhs: DType, subgroup: bool, texture: bool) -> Spec {
    Spec::new()
        .prelude(rhs_prelude(rhs))
        .prelude(if texture { RHS4_TEXTURE } else { RHS4_STORAGE })
        .prelude(team_prelude(subgroup))
        .constant("WGX", WGX as f64)
        .constant("WGY", WGY as f64)
}

pub fn specs() -> Vec<(&'static str, Spec)> {
    let mut v = Vec::new();
    for dt in [DType::F32, DType::F16, DType::BF16] {
        for sg in [false, true] {
            v.push((FILE, spec(dt, sg, false)));
        }
    }
    for dt in [DType::F32, DType::F16] {
        for sg in [false, true] {
            v.push((FILE, spec(dt, sg, true)));
        }
    }
    v
}

/// True when the adapter's subgroups are exactly the 8-lane teams the tiled kernel broadcasts within.
fn subgroups_of_8(dev: &Device) -> bool {
    dev.has_subgroups() && dev.info().subgroup_min_size == 8 && dev.info().subgroup_max_size == 8
}

/// One strided product `out[b, m, n] (+)= alpha * sum_{kb, k} lhs[b, kb, m, k] * rhs[b, kb, k, n] + bias[n]`,
/// all offsets in elements. lhs and out are f32; rhs may be f32, f16 or bf16.
pub(crate) struct Gemm<'a> {
    pub entry: &'static str,
    pub out: &'a Tensor,
    pub lhs: &'a Tensor,
    pub rhs: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub kb: usize,
    /// lhs strides: row m, reduction k, batch b, reduction batch kb.
    pub l: [usize; 4],
    /// rhs strides: reduction k, column n, batch b, reduction batch kb.
    pub r: [usize; 4],
    /// out strides: row m, column n, batch b.
    pub o: [usize; 3],
    pub alpha: f32,
    pub accumulate: bool,
}

/// The tiled kernel's operand layouts (see matmul.wgsl).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tiled {
    Nn,
    Nt,
    Tn,
}

impl Gemm<'_> {
    /// Which tiled kernel can run this product, if any.
    fn tiled_layout(&self) -> Option<Tiled> {
        let a4 = |x: usize| x & 3 == 0;
        // k > 0 also keeps every vec4 binding at least one element long.
        let common = self.kb == 1
            && self.k > 0
            && a4(self.n)
            && self.o[1] == 1
            && a4(self.o[0])
            && a4(self.o[2])
            && a4(self.l[2])
            && a4(self.r[2]);
        let rhs_nn = self.r[1] == 1 && a4(self.r[0]);
        if !common {
            None
        } else if self.l[1] == 1 && a4(self.l[0]) && a4(self.k) {
            if rhs_nn {
                Some(Tiled::Nn)
            } else if self.r[0] == 1 && a4(self.r[1]) {
                Some(Tiled::Nt)
            } else {
                None
            }
        } else if self.l[0] == 1 && a4(self.l[1]) && a4(self.m) && rhs_nn {
            Some(Tiled::Tn)
        } else {
            None
        }
    }

    /// The rhs texture twin, when the tiled kernel of `layout` can read this product's rhs from it: a shared
    /// (unbatched) rhs whose strides are the twin's row-major [rows, cols] and whose extent fits in it.
    fn texture_twin(&self, layout: Option<Tiled>) -> Option<&TextureTwin> {
        let tw = self.rhs.texture.as_deref()?;
        if tw.dtype != self.rhs.dtype || self.r[2] != 0 || self.kb != 1 {
            return None;
        }
        let fits = match layout? {
            // rhs[k, n] = twin[k][n]
            Tiled::Nn => self.r[1] == 1 && self.r[0] == tw.cols && self.k <= tw.rows && self.n <= tw.cols,
            // rhs[k, n] = twin[n][k]
            Tiled::Nt => self.r[0] == 1 && self.r[1] == tw.cols && self.n <= tw.rows && self.k <= tw.cols,
            Tiled::Tn => false,
        };
        fits.then_some(tw)
    }
}

pub(crate) fn gemm(dev: &Device, g: &Gemm, variant: Variant) -> Result<Vec<Dispatch>> {
    if g.m == 0 || g.n == 0 || g.batch == 0 {
        return Ok(Vec::new());
    }
    let layout = g.tiled_layout();
    let twin = g.texture_twin(layout);
    let variant = match variant {
        Variant::Auto if g.m <= GEMV_MAX_M && g.r[0] == 1 && super::gemv::supports(g) && subgroups_of_8(dev) => {
            Variant::GemvSubgroup
        }
        Variant::Auto if g.m <= GEMV_MAX_M && g.r[0] == 1 && super::gemv::supports(g) => Variant::Gemv,
        Variant::Gemv | Variant::GemvSubgroup if !super::gemv::supports(g) => Variant::General,
        Variant::GemvSubgroup if !subgroups_of_8(dev) => Variant::Gemv,
        v @ (Variant::Gemv | Variant::GemvSubgroup) => v,
        Variant::Auto if dev.is_cpu() && twin.is_some() => Variant::TiledTexture,
        Variant::Auto if dev.is_cpu() && layout.is_some() && subgroups_of_8(dev) => Variant::TiledSubgroup,
        Variant::Auto if dev.is_cpu() && layout.is_some() => Variant::Tiled,
        Variant::Auto => Variant::General,
        _ if layout.is_none() => Variant::General,
        Variant::TiledTexture if twin.is_none() && subgroups_of_8(dev) => Variant::TiledSubgroup,
        Variant::TiledTexture if twin.is_none() => Variant::Tiled,
        Variant::TiledSubgroup if !subgroups_of_8(dev) => Variant::Tiled,
        v => v,
    };
    let u = |x: usize| index_u32("matmul", "a size or stride", x);
    let params = words(&[
        u(g.m)?,
        u(g.n)?,
        u(g.k)?,
        u(g.batch)?,
        u(g.l[0])?,
        u(g.l[1])?,
        u(g.l[2])?,
        u(g.l[3])?,
        u(g.r[0])?,
        u(g.r[1])?,
        u(g.r[2])?,
        u(g.r[3])?,
        u(g.o[0])?,
        u(g.o[1])?,
        u(g.o[2])?,
        u(g.kb)?,
        g.alpha.to_bits(),
        g.accumulate as u32,
        g.bias.is_some() as u32,
        0,
    ]);
    if matches!(variant, Variant::Gemv | Variant::GemvSubgroup) {
        return Ok(vec![super::gemv::gemv(dev, g, &params, variant == Variant::GemvSubgroup)?]);
    }
    let tex = if variant == Variant::TiledTexture { twin } else { None };
    let sg = variant == Variant::TiledSubgroup || (tex.is_some() && subgroups_of_8(dev));
    let sp = spec(g.rhs.dtype, sg, tex.is_some());
    let batch = u(g.batch)?;
    let d = match (variant, layout) {
        (Variant::Tiled | Variant::TiledSubgroup | Variant::TiledTexture, Some(layout)) => {
            // With a twin, texture binding 8 replaces the rhs buffer (binding 6), which the entry point then
            // does not read.
            let b: Vec<(u32, &Tensor)> = [(5, g.lhs), (6, g.rhs), (7, g.out), (4, g.bias.unwrap_or(g.lhs))]
                .into_iter()
                .filter(|&(i, _)| tex.is_none() || i != 6)
                .collect();
            let textures: Vec<(u32, &TextureTwin)> = tex.map(|tw| (8, tw)).into_iter().collect();
            let entry = match layout {
                Tiled::Nn => "matmul_tiled_nn",
                Tiled::Nt => "matmul_tiled_nt",
                Tiled::Tn => "matmul_tiled_tn",
            };
            let grid = [u(g.n.div_ceil(8 * FTN))?, u(g.m.div_ceil(FTM))?, batch];
            dev.dispatch_with_textures(FILE, entry, &sp, Some(&params), &b, &textures, grid)?
        }
        _ => {
            let b = [(1, g.lhs), (2, g.rhs), (3, g.out), (4, g.bias.unwrap_or(g.lhs))];
            let grid =
                [u(g.n.div_ceil(GTN).div_ceil(WGX as usize))?, u(g.m.div_ceil(GTM).div_ceil(WGY as usize))?, batch];
            dev.dispatch(FILE, g.entry, &sp, Some(&params), &b, grid)?
        }
    };
    Ok(vec![d])
}

/// A quantized right operand in a product other than x·Wᵀ and dY·W.
fn quantized_err(op: &'static str, b: &Tensor) -> crate::Error {
    shape_err(
        op,
        format!(
            "a quantized weight ({:?} {:?}) takes part only in x·Wᵀ (a linear layer) and dY·W (its input gradient), \
             not in this product",
            b.dtype, b.shape
        ),
    )
}

/// Sizes of one matmul: `batch_dims` of a, op(a) is [M, K], op(b) is [K, N].
struct Dims {
    batch_dims: Vec<usize>,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    b_batched: bool,
}

/// Read M, K (from a-shaped `a`) and K, N (from b-shaped `b`) honouring the transposes.
fn dims(op: &'static str, a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Dims> {
    let (ar, br) = (a.rank(), b.rank());
    if ar < 2 || br < 2 {
        return Err(shape_err(op, format!("a {:?} and b {:?} need at least 2 dims", a.shape, b.shape)));
    }
    let batch_dims = a.shape[..ar - 2].to_vec();
    let (m, k) = if ta { (a.shape[ar - 1], a.shape[ar - 2]) } else { (a.shape[ar - 2], a.shape[ar - 1]) };
    let (kb, n) = if tb { (b.shape[br - 1], b.shape[br - 2]) } else { (b.shape[br - 2], b.shape[br - 1]) };
    let b_batched = br > 2;
    if b_batched && b.shape[..br - 2] != batch_dims[..] {
        return Err(shape_err(
            op,
            format!("b {:?} must be 2-D or share a's batch dims {:?} (a {:?})", b.shape, batch_dims, a.shape),
        ));
    }
    if kb != k {
        return Err(shape_err(
            op,
            format!(
                "inner dims differ: a {:?} (trans_a={ta}) has K={k}, b {:?} (trans_b={tb}) has K={kb}",
                a.shape, b.shape
            ),
        ));
    }
    let batch = batch_dims.iter().product();
    Ok(Dims { batch_dims, batch, m, k, n, b_batched })
}

fn with_batch(d: &Dims, last: [usize; 2]) -> Vec<usize> {
    let mut s = d.batch_dims.clone();
    s.extend(last);
    s
}

/// out = op(a)·op(b) + bias. a: [..batch, M, K] ([.., K, M] if trans_a); b: [K, N] ([N, K] if trans_b),
/// 2-D (shared) or with a's batch dims; bias: \[N]; out: [..batch, M, N]. b may be f16/bf16.
///
/// A Linear layer, y = x·Wᵀ + bias with W [out features, in features], checked against [`reference`]:
/// ```
/// use rime_kernels::reference::matmul::{self as cpu, MatmulDims};
/// use rime_kernels::{ops::matmul::matmul_forward, DType, Device, DeviceOptions};
///
/// let dev = Device::new(&DeviceOptions::default())?;
/// let (m, k, n) = (3, 8, 5);
/// let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
/// let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
/// let bias = vec![0.5; n];
/// let (xt, wt, bt) = (dev.upload_f32(&x, &[m, k])?, dev.upload_f32(&w, &[n, k])?, dev.upload_f32(&bias, &[n])?);
/// let y = dev.empty(&[m, n], DType::F32)?;
/// // Launchers only build dispatches; `run` records them into one pass, submits and waits.
/// dev.run(&matmul_forward(&dev, &y, &xt, &wt, Some(&bt), false, true)?)?;
///
/// let d = MatmulDims { batch: 1, m, k, n, b_batched: false, trans_a: false, trans_b: true };
/// let want = cpu::matmul_forward(&x, &w, Some(&bias), &d);
/// let got = dev.download_f32(&y)?;
/// assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-4), "{got:?} vs {want:?}");
/// # Ok::<(), rime_kernels::Error>(())
/// ```
///
/// [`reference`]: crate::reference::matmul::matmul_forward
pub fn matmul_forward(
    dev: &Device,
    out: &Tensor,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    trans_a: bool,
    trans_b: bool,
) -> Result<Vec<Dispatch>> {
    matmul_forward_variant(dev, Variant::Auto, out, a, b, bias, trans_a, trans_b)
}

/// [`matmul_forward`] with the kernel forced (tests run every variant).
#[allow(clippy::too_many_arguments)]
pub fn matmul_forward_variant(
    dev: &Device,
    variant: Variant,
    out: &Tensor,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    trans_a: bool,
    trans_b: bool,
) -> Result<Vec<Dispatch>> {
    matmul_forward_scaled(dev, variant, out, a, b, bias, trans_a, trans_b, 1.0, false)
}

/// out = alpha * op(a)·op(b) + bias (+ out when `accumulate`): [`matmul_forward`] with the product scaled and
/// optionally added to what out holds, and the kernel chosen by `variant`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_forward_scaled(
    dev: &Device,
    variant: Variant,
    out: &Tensor,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    trans_a: bool,
    trans_b: bool,
    alpha: f32,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "matmul_forward";
    if let Some(w) = QTensor::from_tensor(b) {
        if trans_a || !trans_b || alpha != 1.0 {
            return Err(quantized_err(OP, b));
        }
        return super::qmatmul::linear_forward(dev, out, a, &w, bias, accumulate);
    }
    expect_f32(OP, "a", a)?;
    expect_f32(OP, "out", out)?;
    expect_dtype(OP, "b", b, FLOATS)?;
    let d = dims(OP, a, b, trans_a, trans_b)?;
    expect_shape(OP, "out", out, &with_batch(&d, [d.m, d.n]))?;
    if let Some(bias) = bias {
        expect_f32(OP, "bias", bias)?;
        expect_shape(OP, "bias", bias, &[d.n])?;
    }
    let (m, k, n) = (d.m, d.k, d.n);
    let l = if trans_a { [1, m, m * k, 0] } else { [k, 1, m * k, 0] };
    let r = if trans_b { [1, k, k * n, 0] } else { [n, 1, k * n, 0] };
    let mut g = Gemm {
        entry: OP,
        out,
        lhs: a,
        rhs: b,
        bias,
        batch: d.batch,
        m,
        n,
        k,
        kb: 1,
        l,
        r,
        o: [n, 1, m * n],
        alpha,
        accumulate,
    };
    if !d.b_batched {
        g.r[2] = 0;
        // A shared weight and contiguous rows: the batch is just more rows.
        if !trans_a {
            g.m = d.batch * m;
            g.batch = 1;
        }
    }
    gemm(dev, &g, variant)
}

/// da = dout·op(b)ᵀ, laid out like a (transposed back when trans_a). dout: [..batch, M, N]; b as in forward.
pub fn matmul_backward_input(
    dev: &Device,
    da: &Tensor,
    dout: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
) -> Result<Vec<Dispatch>> {
    matmul_backward_input_variant(dev, Variant::Auto, da, dout, b, trans_a, trans_b)
}

/// [`matmul_backward_input`] with the kernel forced.
pub fn matmul_backward_input_variant(
    dev: &Device,
    variant: Variant,
    da: &Tensor,
    dout: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
) -> Result<Vec<Dispatch>> {
    backward_input(dev, variant, da, dout, b, (trans_a, trans_b), false)
}

/// [`matmul_backward_input`] added to what da holds when `accumulate` (the input gradient of a product split
/// into parts, such as an output head split by rows).
pub fn matmul_backward_input_accumulate(
    dev: &Device,
    da: &Tensor,
    dout: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    backward_input(dev, Variant::Auto, da, dout, b, (trans_a, trans_b), accumulate)
}

fn backward_input(
    dev: &Device,
    variant: Variant,
    da: &Tensor,
    dout: &Tensor,
    b: &Tensor,
    (trans_a, trans_b): (bool, bool),
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "matmul_backward_input";
    if let Some(w) = QTensor::from_tensor(b) {
        if trans_a || !trans_b {
            return Err(quantized_err(OP, b));
        }
        return super::qmatmul::linear_backward_input(dev, da, dout, &w, accumulate);
    }
    expect_f32(OP, "da", da)?;
    expect_f32(OP, "dout", dout)?;
    expect_dtype(OP, "b", b, FLOATS)?;
    let d = dims(OP, da, b, trans_a, trans_b)?;
    expect_shape(OP, "dout", dout, &with_batch(&d, [d.m, d.n]))?;
    let (m, k, n) = (d.m, d.k, d.n);
    // Product dims: rows M, columns K, reduction N. rhs(n, k) = op(b)[k, n].
    let r = if trans_b { [k, 1, k * n, 0] } else { [1, n, k * n, 0] };
    let o = if trans_a { [1, m, m * k] } else { [k, 1, m * k] };
    let mut g = Gemm {
        entry: OP,
        out: da,
        lhs: dout,
        rhs: b,
        bias: None,
        batch: d.batch,
        m,
        n: k,
        k: n,
        kb: 1,
        l: [n, 1, m * n, 0],
        r,
        o,
        alpha: 1.0,
        accumulate,
    };
    if !d.b_batched {
        g.r[2] = 0;
        if !trans_a {
            g.m = d.batch * m;
            g.batch = 1;
        }
    }
    gemm(dev, &g, variant)
}

/// db (+)= op(a)ᵀ·dout in b's layout ([K, N], or [N, K] if trans_b), summed over the batch when db is 2-D.
pub fn matmul_backward_weight(
    dev: &Device,
    db: &Tensor,
    a: &Tensor,
    dout: &Tensor,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    matmul_backward_weight_variant(dev, Variant::Auto, db, a, dout, trans_a, trans_b, accumulate)
}

/// [`matmul_backward_weight`] with the kernel forced.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward_weight_variant(
    dev: &Device,
    variant: Variant,
    db: &Tensor,
    a: &Tensor,
    dout: &Tensor,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "matmul_backward_weight";
    expect_f32(OP, "db", db)?;
    expect_f32(OP, "a", a)?;
    expect_f32(OP, "dout", dout)?;
    let d = dims(OP, a, db, trans_a, trans_b)?;
    expect_shape(OP, "dout", dout, &with_batch(&d, [d.m, d.n]))?;
    let (m, k, n) = (d.m, d.k, d.n);
    // Reduction over M (and the batch when db is shared). op(a)[m, k] at a_m * m + a_k * k.
    let (a_m, a_k) = if trans_a { (1, m) } else { (k, 1) };
    let mut g = if trans_b {
        // db [N, K] = doutᵀ · op(a): rows N, columns K, so db's rows stay contiguous.
        Gemm {
            entry: OP,
            out: db,
            lhs: dout,
            rhs: a,
            bias: None,
            batch: d.batch,
            m: n,
            n: k,
            k: m,
            kb: 1,
            l: [1, n, m * n, m * n],
            r: [a_m, a_k, m * k, m * k],
            o: [k, 1, k * n],
            alpha: 1.0,
            accumulate,
        }
    } else {
        // db [K, N] = op(a)ᵀ · dout: rows K, columns N.
        Gemm {
            entry: OP,
            out: db,
            lhs: a,
            rhs: dout,
            bias: None,
            batch: d.batch,
            m: k,
            n,
            k: m,
            kb: 1,
            l: [a_k, a_m, m * k, m * k],
            r: [n, 1, m * n, m * n],
            o: [n, 1, k * n],
            alpha: 1.0,
            accumulate,
        }
    };
    if !d.b_batched {
        g.batch = 1;
        if trans_a {
            g.kb = d.batch;
        } else {
            // Contiguous rows: the batch sum is one longer reduction.
            g.k = d.batch * m;
        }
    }
    gemm(dev, &g, variant)
}
