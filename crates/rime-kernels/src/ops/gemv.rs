//! Launcher for shaders/gemv.wgsl: the matrix-vector kernels the matmul launcher picks for products with few
//! rows (decoding one token, short prompts). Any `Gemm` (the strided product of ops::matmul) with `kb == 1`
//! can run here: `gemv_vec` when the operands are K-contiguous with K % 8 = 0 (x·Wᵀ with a Linear weight, the
//! decoder's every projection and output head), else `gemv_scalar` (any strides). Each invocation owns GM rows
//! (1, 2, 4 or 8: the smallest that covers M, else 8 in several row blocks) and GC columns: 8 for one or two
//! rows, 4 for more (16 accumulators at most but for GM = 8; on lavapipe GC = 8 made 1-row f16 products up to
//! 1.5x faster and 4-row ones 1.5x slower).

use crate::error::Result;
use crate::ops::matmul::Gemm;
use crate::{DType, Device, Dispatch, Spec};

const FILE: &str = "gemv.wgsl";
/// Rows per invocation the specializations offer (GM in the shader).
const GMS: [usize; 4] = [1, 2, 4, 8];

/// Columns per invocation (GC in the shader) for GM rows.
fn columns_per_invocation(gm: usize) -> usize {
    if gm <= 2 {
        8
    } else {
        4
    }
}

fn rhs_prelude(dt: DType) -> &'static str {
    match dt {
        DType::F16 => {
            "@group(0) @binding(2) var<storage, read> rhs: array<u32>;\n\
             @group(0) @binding(6) var<storage, read> rhs8: array<vec4<u32>>;\n\
             fn load_rhs(i: u32) -> f32 { return unpack_f16(rhs[i >> 1u], i); }\n\
             fn load_rhs8(i: u32) -> array<vec4<f32>, 2> { let w = rhs8[i >> 3u]; \
             return array<vec4<f32>, 2>(vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)), \
             vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w))); }"
        }
        DType::BF16 => {
            "@group(0) @binding(2) var<storage, read> rhs: array<u32>;\n\
             @group(0) @binding(6) var<storage, read> rhs8: array<vec4<u32>>;\n\
             fn load_rhs(i: u32) -> f32 { return unpack_bf16(rhs[i >> 1u], i); }\n\
             fn bf2(w: u32) -> vec2<f32> { return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u)); }\n\
             fn load_rhs8(i: u32) -> array<vec4<f32>, 2> { let w = rhs8[i >> 3u]; \
             return array<vec4<f32>, 2>(vec4<f32>(bf2(w.x), bf2(w.y)), vec4<f32>(bf2(w.z), bf2(w.w))); }"
        }
        _ => {
            "@group(0) @binding(2) var<storage, read> rhs: array<f32>;\n\
             @group(0) @binding(6) var<storage, read> rhs4: array<vec4<f32>>;\n\
             fn load_rhs(i: u32) -> f32 { return rhs[i]; }\n\
             fn load_rhs8(i: u32) -> array<vec4<f32>, 2> { let j = i >> 2u; \
             return array<vec4<f32>, 2>(rhs4[j], rhs4[j + 1u]); }"
        }
    }
}

// x elements k0..k0+32 of one lhs row as eight vec4. With 8-lane subgroups lane l loads one vec4 and
// subgroupBroadcast (constant lanes, hence spelled out) hands all eight to every lane; without, each lane
// loads all eight. Only the subgroup spec mentions subgroups (a module that did would not build without SUBGROUP).
fn x_prelude(subgroup: bool) -> &'static str {
    if subgroup {
        "fn fetch_x(base: u32, k0: u32, lane: u32) -> array<vec4<f32>, 8> {\n\
         let v = lhs_x4(base, k0 + 4u * lane);\n\
         return array<vec4<f32>, 8>(\
         subgroupBroadcast(v, 0u), subgroupBroadcast(v, 1u), subgroupBroadcast(v, 2u), subgroupBroadcast(v, 3u), \
         subgroupBroadcast(v, 4u), subgroupBroadcast(v, 5u), subgroupBroadcast(v, 6u), subgroupBroadcast(v, 7u)); }"
    } else {
        "fn fetch_x(base: u32, k0: u32, lane: u32) -> array<vec4<f32>, 8> {\n\
         return array<vec4<f32>, 8>(\
         lhs_x4(base, k0), lhs_x4(base, k0 + 4u), lhs_x4(base, k0 + 8u), lhs_x4(base, k0 + 12u), \
         lhs_x4(base, k0 + 16u), lhs_x4(base, k0 + 20u), lhs_x4(base, k0 + 24u), lhs_x4(base, k0 + 28u)); }"
    }
}

fn spec(rhs: DType, subgroup: bool, gm: usize, wg: u32) -> Spec {
    let gc = columns_per_invocation(gm);
    Spec::new()
        .prelude(rhs_prelude(rhs))
        .prelude(x_prelude(subgroup))
        .prelude(format!("const GM: u32 = {gm}u;\nconst GC: u32 = {gc}u;"))
        .constant("WG", wg as f64)
}

pub fn specs() -> Vec<(&'static str, Spec)> {
    let mut v = Vec::new();
    for dt in [DType::F32, DType::F16, DType::BF16] {
        for sg in [false, true] {
            for gm in GMS {
                v.push((FILE, spec(dt, sg, gm, 8)));
            }
        }
    }
    v
}

/// True when the operands allow `gemv_vec`'s eight-wide loads (all offsets in elements; bindings start at 0).
fn vec_layout(g: &Gemm) -> bool {
    let a = |x: usize, m: usize| x.is_multiple_of(m);
    g.kb == 1
        && g.k > 0
        && a(g.k, 8)
        && g.l[1] == 1
        && g.r[0] == 1
        && a(g.l[0], 4)
        && a(g.l[2], 4)
        && a(g.r[1], 8)
        && a(g.r[2], 8)
}

/// Whether [`gemv`] can run this product (the reduction batch kb must be 1).
pub(crate) fn supports(g: &Gemm) -> bool {
    g.kb == 1
}

/// Rows per invocation for M rows: the smallest block that covers M, else the largest.
fn rows_per_invocation(m: usize) -> usize {
    GMS.into_iter().find(|&gm| gm >= m).unwrap_or(GMS[GMS.len() - 1])
}

/// The dispatch of one product through gemv.wgsl; `subgroup` asks for fetch_x's broadcasts (the caller checks
/// that the adapter's subgroups are 8 lanes). Callers check [`supports`].
pub(crate) fn gemv(dev: &Device, g: &Gemm, params: &[u8], subgroup: bool) -> Result<Dispatch> {
    let vec = vec_layout(g);
    let gm = rows_per_invocation(g.m);
    // 8 lanes (one lavapipe subgroup) on CPU adapters, where a workgroup runs as one SIMD batch; more
    // invocations per workgroup on GPUs, whose lanes here are independent.
    let wg: u32 = if dev.is_cpu() || (vec && subgroup) { 8 } else { 64 };
    let sp = spec(g.rhs.dtype, vec && subgroup, gm, wg);
    let bias = g.bias.unwrap_or(g.lhs);
    let grid = [
        (g.n.div_ceil(columns_per_invocation(gm)).div_ceil(wg as usize)) as u32,
        g.m.div_ceil(gm) as u32,
        g.batch as u32,
    ];
    if vec {
        dev.dispatch(FILE, "gemv_vec_entry", &sp, Some(params), &[(5, g.lhs), (6, g.rhs), (3, g.out), (4, bias)], grid)
    } else {
        dev.dispatch(
            FILE,
            "gemv_scalar_entry",
            &sp,
            Some(params),
            &[(1, g.lhs), (2, g.rhs), (3, g.out), (4, bias)],
            grid,
        )
    }
}
