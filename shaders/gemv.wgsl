// Matrix-vector products for small M (decoding one token, short prompts): the strided product of matmul.wgsl
//   out[b, m, n] = alpha * sum_k lhs[b, m, k] * rhs[b, k, n] (+ bias[n]) (+ out when accumulating)
// with the same Params (kb = 1), chosen by the matmul launcher when M is small. The tiled matmul gives each team
// 32 rows; with M = 1 it computes 31 wasted rows per useful one. Here each invocation owns GC columns (rows of a
// Linear weight: 4 or 8) and GM rows (1, 2, 4 or 8), both prelude consts, so every load of W feeds GM FMAs per
// element and every x load feeds GC columns; nothing is wasted but the clamped rows of a partial GM block.
//
// Two entry points, neither with workgroup memory or barriers:
//  * gemv_vec: rhs K-contiguous (x·Wᵀ, W [N, K]), lhs K-contiguous, K % 8 = 0 and 8-aligned W rows. W is read
//    eight k at a time through `load_rhs8` (two vec4 loads for f32, one vec4<u32> load of eight halves for
//    f16/bf16); x through `fetch_x` (prelude), 32 k per call: with 8-lane subgroups lane l loads one vec4 and
//    subgroupBroadcast hands it to the team, else every lane loads all eight. K past the last multiple of 32
//    runs in a tail loop with plain loads.
//  * gemv_scalar: any strides, one element per load (odd K, transposed operands).
// On lavapipe every storage load is a per-lane loop over its 32-bit components, so the kernel is bound by the
// loads of W by design (halves are read two per component). The tile is unrolled by hand (generated) because
// private arrays indexed in loops stay in memory there; rows r >= GM and columns c >= GC are computed from
// clamped addresses only in dead code, which the compiler removes (GM and GC are consts).
// Tuned for lavapipe; on GPUs it is correct and runs WG (override) invocations per workgroup without subgroups.

struct Params {
    m: u32, n: u32, k: u32, batch: u32,
    l_sm: u32, l_sk: u32, l_sb: u32, l_skb: u32,
    r_sk: u32, r_sn: u32, r_sb: u32, r_skb: u32,
    o_sm: u32, o_sn: u32, o_sb: u32, kb: u32,
    alpha: u32, accumulate: u32, has_bias: u32, _p1: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> lhs: array<f32>;
// binding 2: rhs (prelude), read by load_rhs
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// Bound to some read-only tensor when there is no bias (a binding an entry point uses must be bound).
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read> lhs4: array<vec4<f32>>;
// binding 6: rhs in groups of eight (prelude), read by load_rhs8

override WG: u32 = 8u;

fn bias_at(n: u32) -> f32 {
    if (p.has_bias != 0u) { return bias[n]; }
    return 0.0;
}

fn store1(b: u32, m: u32, n: u32, v: f32) {
    if (m >= p.m || n >= p.n) { return; }
    let o = b * p.o_sb + m * p.o_sm + n * p.o_sn;
    var r = bitcast<f32>(p.alpha) * v + bias_at(n);
    if (p.accumulate != 0u) { r += out[o]; }
    out[o] = r;
}

fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// lhs elements base + k .. base + k + 3, k clamped to the row (K >= 8); used by the prelude's fetch_x.
fn lhs_x4(base: u32, k: u32) -> vec4<f32> {
    return lhs4[(base + min(k, p.k - 4u)) >> 2u];
}

fn gemv_vec(wid: vec3<u32>, lane: u32) {
    let n0 = (wid.x * WG + lane) * GC;
    let m0 = wid.y * GM;
    let b = wid.z;
    let xr0 = b * p.l_sb + min(m0 + 0u, p.m - 1u) * p.l_sm;
    let xr1 = b * p.l_sb + min(m0 + 1u, p.m - 1u) * p.l_sm;
    let xr2 = b * p.l_sb + min(m0 + 2u, p.m - 1u) * p.l_sm;
    let xr3 = b * p.l_sb + min(m0 + 3u, p.m - 1u) * p.l_sm;
    let xr4 = b * p.l_sb + min(m0 + 4u, p.m - 1u) * p.l_sm;
    let xr5 = b * p.l_sb + min(m0 + 5u, p.m - 1u) * p.l_sm;
    let xr6 = b * p.l_sb + min(m0 + 6u, p.m - 1u) * p.l_sm;
    let xr7 = b * p.l_sb + min(m0 + 7u, p.m - 1u) * p.l_sm;
    let wr0 = b * p.r_sb + min(n0 + 0u, p.n - 1u) * p.r_sn;
    let wr1 = b * p.r_sb + min(n0 + 1u, p.n - 1u) * p.r_sn;
    let wr2 = b * p.r_sb + min(n0 + 2u, p.n - 1u) * p.r_sn;
    let wr3 = b * p.r_sb + min(n0 + 3u, p.n - 1u) * p.r_sn;
    let wr4 = b * p.r_sb + min(n0 + 4u, p.n - 1u) * p.r_sn;
    let wr5 = b * p.r_sb + min(n0 + 5u, p.n - 1u) * p.r_sn;
    let wr6 = b * p.r_sb + min(n0 + 6u, p.n - 1u) * p.r_sn;
    let wr7 = b * p.r_sb + min(n0 + 7u, p.n - 1u) * p.r_sn;
    var a0_0 = vec4<f32>(0.0); var a0_1 = vec4<f32>(0.0); var a0_2 = vec4<f32>(0.0); var a0_3 = vec4<f32>(0.0); var a0_4 = vec4<f32>(0.0); var a0_5 = vec4<f32>(0.0); var a0_6 = vec4<f32>(0.0); var a0_7 = vec4<f32>(0.0);
    var a1_0 = vec4<f32>(0.0); var a1_1 = vec4<f32>(0.0); var a1_2 = vec4<f32>(0.0); var a1_3 = vec4<f32>(0.0); var a1_4 = vec4<f32>(0.0); var a1_5 = vec4<f32>(0.0); var a1_6 = vec4<f32>(0.0); var a1_7 = vec4<f32>(0.0);
    var a2_0 = vec4<f32>(0.0); var a2_1 = vec4<f32>(0.0); var a2_2 = vec4<f32>(0.0); var a2_3 = vec4<f32>(0.0); var a2_4 = vec4<f32>(0.0); var a2_5 = vec4<f32>(0.0); var a2_6 = vec4<f32>(0.0); var a2_7 = vec4<f32>(0.0);
    var a3_0 = vec4<f32>(0.0); var a3_1 = vec4<f32>(0.0); var a3_2 = vec4<f32>(0.0); var a3_3 = vec4<f32>(0.0); var a3_4 = vec4<f32>(0.0); var a3_5 = vec4<f32>(0.0); var a3_6 = vec4<f32>(0.0); var a3_7 = vec4<f32>(0.0);
    var a4_0 = vec4<f32>(0.0); var a4_1 = vec4<f32>(0.0); var a4_2 = vec4<f32>(0.0); var a4_3 = vec4<f32>(0.0); var a4_4 = vec4<f32>(0.0); var a4_5 = vec4<f32>(0.0); var a4_6 = vec4<f32>(0.0); var a4_7 = vec4<f32>(0.0);
    var a5_0 = vec4<f32>(0.0); var a5_1 = vec4<f32>(0.0); var a5_2 = vec4<f32>(0.0); var a5_3 = vec4<f32>(0.0); var a5_4 = vec4<f32>(0.0); var a5_5 = vec4<f32>(0.0); var a5_6 = vec4<f32>(0.0); var a5_7 = vec4<f32>(0.0);
    var a6_0 = vec4<f32>(0.0); var a6_1 = vec4<f32>(0.0); var a6_2 = vec4<f32>(0.0); var a6_3 = vec4<f32>(0.0); var a6_4 = vec4<f32>(0.0); var a6_5 = vec4<f32>(0.0); var a6_6 = vec4<f32>(0.0); var a6_7 = vec4<f32>(0.0);
    var a7_0 = vec4<f32>(0.0); var a7_1 = vec4<f32>(0.0); var a7_2 = vec4<f32>(0.0); var a7_3 = vec4<f32>(0.0); var a7_4 = vec4<f32>(0.0); var a7_5 = vec4<f32>(0.0); var a7_6 = vec4<f32>(0.0); var a7_7 = vec4<f32>(0.0);
    let kfull = p.k & ~31u;
    for (var k0 = 0u; k0 < kfull; k0 += 32u) {
        let x0 = fetch_x(xr0, k0, lane);
        let x1 = fetch_x(xr1, k0, lane);
        let x2 = fetch_x(xr2, k0, lane);
        let x3 = fetch_x(xr3, k0, lane);
        let x4 = fetch_x(xr4, k0, lane);
        let x5 = fetch_x(xr5, k0, lane);
        let x6 = fetch_x(xr6, k0, lane);
        let x7 = fetch_x(xr7, k0, lane);
        { let k = k0 + 0u;
          let w0 = load_rhs8(wr0 + k);
          let w1 = load_rhs8(wr1 + k);
          let w2 = load_rhs8(wr2 + k);
          let w3 = load_rhs8(wr3 + k);
          let w4 = load_rhs8(wr4 + k);
          let w5 = load_rhs8(wr5 + k);
          let w6 = load_rhs8(wr6 + k);
          let w7 = load_rhs8(wr7 + k);
          {
              let xa = x0[0]; let xb = x0[1];
              a0_0 = fma(xb, w0[1], fma(xa, w0[0], a0_0));
              a0_1 = fma(xb, w1[1], fma(xa, w1[0], a0_1));
              a0_2 = fma(xb, w2[1], fma(xa, w2[0], a0_2));
              a0_3 = fma(xb, w3[1], fma(xa, w3[0], a0_3));
              a0_4 = fma(xb, w4[1], fma(xa, w4[0], a0_4));
              a0_5 = fma(xb, w5[1], fma(xa, w5[0], a0_5));
              a0_6 = fma(xb, w6[1], fma(xa, w6[0], a0_6));
              a0_7 = fma(xb, w7[1], fma(xa, w7[0], a0_7));
          }
          if (GM > 1u) {
              let xa = x1[0]; let xb = x1[1];
              a1_0 = fma(xb, w0[1], fma(xa, w0[0], a1_0));
              a1_1 = fma(xb, w1[1], fma(xa, w1[0], a1_1));
              a1_2 = fma(xb, w2[1], fma(xa, w2[0], a1_2));
              a1_3 = fma(xb, w3[1], fma(xa, w3[0], a1_3));
              a1_4 = fma(xb, w4[1], fma(xa, w4[0], a1_4));
              a1_5 = fma(xb, w5[1], fma(xa, w5[0], a1_5));
              a1_6 = fma(xb, w6[1], fma(xa, w6[0], a1_6));
              a1_7 = fma(xb, w7[1], fma(xa, w7[0], a1_7));
          }
          if (GM > 2u) {
              let xa = x2[0]; let xb = x2[1];
              a2_0 = fma(xb, w0[1], fma(xa, w0[0], a2_0));
              a2_1 = fma(xb, w1[1], fma(xa, w1[0], a2_1));
              a2_2 = fma(xb, w2[1], fma(xa, w2[0], a2_2));
              a2_3 = fma(xb, w3[1], fma(xa, w3[0], a2_3));
              a2_4 = fma(xb, w4[1], fma(xa, w4[0], a2_4));
              a2_5 = fma(xb, w5[1], fma(xa, w5[0], a2_5));
              a2_6 = fma(xb, w6[1], fma(xa, w6[0], a2_6));
              a2_7 = fma(xb, w7[1], fma(xa, w7[0], a2_7));
          }
          if (GM > 3u) {
              let xa = x3[0]; let xb = x3[1];
              a3_0 = fma(xb, w0[1], fma(xa, w0[0], a3_0));
              a3_1 = fma(xb, w1[1], fma(xa, w1[0], a3_1));
              a3_2 = fma(xb, w2[1], fma(xa, w2[0], a3_2));
              a3_3 = fma(xb, w3[1], fma(xa, w3[0], a3_3));
              a3_4 = fma(xb, w4[1], fma(xa, w4[0], a3_4));
              a3_5 = fma(xb, w5[1], fma(xa, w5[0], a3_5));
              a3_6 = fma(xb, w6[1], fma(xa, w6[0], a3_6));
              a3_7 = fma(xb, w7[1], fma(xa, w7[0], a3_7));
          }
          if (GM > 4u) {
              let xa = x4[0]; let xb = x4[1];
              a4_0 = fma(xb, w0[1], fma(xa, w0[0], a4_0));
              a4_1 = fma(xb, w1[1], fma(xa, w1[0], a4_1));
              a4_2 = fma(xb, w2[1], fma(xa, w2[0], a4_2));
              a4_3 = fma(xb, w3[1], fma(xa, w3[0], a4_3));
              a4_4 = fma(xb, w4[1], fma(xa, w4[0], a4_4));
              a4_5 = fma(xb, w5[1], fma(xa, w5[0], a4_5));
              a4_6 = fma(xb, w6[1], fma(xa, w6[0], a4_6));
              a4_7 = fma(xb, w7[1], fma(xa, w7[0], a4_7));
          }
          if (GM > 5u) {
              let xa = x5[0]; let xb = x5[1];
              a5_0 = fma(xb, w0[1], fma(xa, w0[0], a5_0));
              a5_1 = fma(xb, w1[1], fma(xa, w1[0], a5_1));
              a5_2 = fma(xb, w2[1], fma(xa, w2[0], a5_2));
              a5_3 = fma(xb, w3[1], fma(xa, w3[0], a5_3));
              a5_4 = fma(xb, w4[1], fma(xa, w4[0], a5_4));
              a5_5 = fma(xb, w5[1], fma(xa, w5[0], a5_5));
              a5_6 = fma(xb, w6[1], fma(xa, w6[0], a5_6));
              a5_7 = fma(xb, w7[1], fma(xa, w7[0], a5_7));
          }
          if (GM > 6u) {
              let xa = x6[0]; let xb = x6[1];
              a6_0 = fma(xb, w0[1], fma(xa, w0[0], a6_0));
              a6_1 = fma(xb, w1[1], fma(xa, w1[0], a6_1));
              a6_2 = fma(xb, w2[1], fma(xa, w2[0], a6_2));
              a6_3 = fma(xb, w3[1], fma(xa, w3[0], a6_3));
              a6_4 = fma(xb, w4[1], fma(xa, w4[0], a6_4));
              a6_5 = fma(xb, w5[1], fma(xa, w5[0], a6_5));
              a6_6 = fma(xb, w6[1], fma(xa, w6[0], a6_6));
              a6_7 = fma(xb, w7[1], fma(xa, w7[0], a6_7));
          }
          if (GM > 7u) {
              let xa = x7[0]; let xb = x7[1];
              a7_0 = fma(xb, w0[1], fma(xa, w0[0], a7_0));
              a7_1 = fma(xb, w1[1], fma(xa, w1[0], a7_1));
              a7_2 = fma(xb, w2[1], fma(xa, w2[0], a7_2));
              a7_3 = fma(xb, w3[1], fma(xa, w3[0], a7_3));
              a7_4 = fma(xb, w4[1], fma(xa, w4[0], a7_4));
              a7_5 = fma(xb, w5[1], fma(xa, w5[0], a7_5));
              a7_6 = fma(xb, w6[1], fma(xa, w6[0], a7_6));
              a7_7 = fma(xb, w7[1], fma(xa, w7[0], a7_7));
          }
        }
        { let k = k0 + 8u;
          let w0 = load_rhs8(wr0 + k);
          let w1 = load_rhs8(wr1 + k);
          let w2 = load_rhs8(wr2 + k);
          let w3 = load_rhs8(wr3 + k);
          let w4 = load_rhs8(wr4 + k);
          let w5 = load_rhs8(wr5 + k);
          let w6 = load_rhs8(wr6 + k);
          let w7 = load_rhs8(wr7 + k);
          {
              let xa = x0[2]; let xb = x0[3];
              a0_0 = fma(xb, w0[1], fma(xa, w0[0], a0_0));
              a0_1 = fma(xb, w1[1], fma(xa, w1[0], a0_1));
              a0_2 = fma(xb, w2[1], fma(xa, w2[0], a0_2));
              a0_3 = fma(xb, w3[1], fma(xa, w3[0], a0_3));
              a0_4 = fma(xb, w4[1], fma(xa, w4[0], a0_4));
              a0_5 = fma(xb, w5[1], fma(xa, w5[0], a0_5));
              a0_6 = fma(xb, w6[1], fma(xa, w6[0], a0_6));
              a0_7 = fma(xb, w7[1], fma(xa, w7[0], a0_7));
          }
          if (GM > 1u) {
              let xa = x1[2]; let xb = x1[3];
              a1_0 = fma(xb, w0[1], fma(xa, w0[0], a1_0));
              a1_1 = fma(xb, w1[1], fma(xa, w1[0], a1_1));
              a1_2 = fma(xb, w2[1], fma(xa, w2[0], a1_2));
              a1_3 = fma(xb, w3[1], fma(xa, w3[0], a1_3));
              a1_4 = fma(xb, w4[1], fma(xa, w4[0], a1_4));
              a1_5 = fma(xb, w5[1], fma(xa, w5[0], a1_5));
              a1_6 = fma(xb, w6[1], fma(xa, w6[0], a1_6));
              a1_7 = fma(xb, w7[1], fma(xa, w7[0], a1_7));
          }
          if (GM > 2u) {
              let xa = x2[2]; let xb = x2[3];
              a2_0 = fma(xb, w0[1], fma(xa, w0[0], a2_0));
              a2_1 = fma(xb, w1[1], fma(xa, w1[0], a2_1));
              a2_2 = fma(xb, w2[1], fma(xa, w2[0], a2_2));
              a2_3 = fma(xb, w3[1], fma(xa, w3[0], a2_3));
              a2_4 = fma(xb, w4[1], fma(xa, w4[0], a2_4));
              a2_5 = fma(xb, w5[1], fma(xa, w5[0], a2_5));
              a2_6 = fma(xb, w6[1], fma(xa, w6[0], a2_6));
              a2_7 = fma(xb, w7[1], fma(xa, w7[0], a2_7));
          }
          if (GM > 3u) {
              let xa = x3[2]; let xb = x3[3];
              a3_0 = fma(xb, w0[1], fma(xa, w0[0], a3_0));
              a3_1 = fma(xb, w1[1], fma(xa, w1[0], a3_1));
              a3_2 = fma(xb, w2[1], fma(xa, w2[0], a3_2));
              a3_3 = fma(xb, w3[1], fma(xa, w3[0], a3_3));
              a3_4 = fma(xb, w4[1], fma(xa, w4[0], a3_4));
              a3_5 = fma(xb, w5[1], fma(xa, w5[0], a3_5));
              a3_6 = fma(xb, w6[1], fma(xa, w6[0], a3_6));
              a3_7 = fma(xb, w7[1], fma(xa, w7[0], a3_7));
          }
          if (GM > 4u) {
              let xa = x4[2]; let xb = x4[3];
              a4_0 = fma(xb, w0[1], fma(xa, w0[0], a4_0));
              a4_1 = fma(xb, w1[1], fma(xa, w1[0], a4_1));
              a4_2 = fma(xb, w2[1], fma(xa, w2[0], a4_2));
              a4_3 = fma(xb, w3[1], fma(xa, w3[0], a4_3));
              a4_4 = fma(xb, w4[1], fma(xa, w4[0], a4_4));
              a4_5 = fma(xb, w5[1], fma(xa, w5[0], a4_5));
              a4_6 = fma(xb, w6[1], fma(xa, w6[0], a4_6));
              a4_7 = fma(xb, w7[1], fma(xa, w7[0], a4_7));
          }
          if (GM > 5u) {
              let xa = x5[2]; let xb = x5[3];
              a5_0 = fma(xb, w0[1], fma(xa, w0[0], a5_0));
              a5_1 = fma(xb, w1[1], fma(xa, w1[0], a5_1));
              a5_2 = fma(xb, w2[1], fma(xa, w2[0], a5_2));
              a5_3 = fma(xb, w3[1], fma(xa, w3[0], a5_3));
              a5_4 = fma(xb, w4[1], fma(xa, w4[0], a5_4));
              a5_5 = fma(xb, w5[1], fma(xa, w5[0], a5_5));
              a5_6 = fma(xb, w6[1], fma(xa, w6[0], a5_6));
              a5_7 = fma(xb, w7[1], fma(xa, w7[0], a5_7));
          }
          if (GM > 6u) {
              let xa = x6[2]; let xb = x6[3];
              a6_0 = fma(xb, w0[1], fma(xa, w0[0], a6_0));
              a6_1 = fma(xb, w1[1], fma(xa, w1[0], a6_1));
              a6_2 = fma(xb, w2[1], fma(xa, w2[0], a6_2));
              a6_3 = fma(xb, w3[1], fma(xa, w3[0], a6_3));
              a6_4 = fma(xb, w4[1], fma(xa, w4[0], a6_4));
              a6_5 = fma(xb, w5[1], fma(xa, w5[0], a6_5));
              a6_6 = fma(xb, w6[1], fma(xa, w6[0], a6_6));
              a6_7 = fma(xb, w7[1], fma(xa, w7[0], a6_7));
          }
          if (GM > 7u) {
              let xa = x7[2]; let xb = x7[3];
              a7_0 = fma(xb, w0[1], fma(xa, w0[0], a7_0));
              a7_1 = fma(xb, w1[1], fma(xa, w1[0], a7_1));
              a7_2 = fma(xb, w2[1], fma(xa, w2[0], a7_2));
              a7_3 = fma(xb, w3[1], fma(xa, w3[0], a7_3));
              a7_4 = fma(xb, w4[1], fma(xa, w4[0], a7_4));
              a7_5 = fma(xb, w5[1], fma(xa, w5[0], a7_5));
              a7_6 = fma(xb, w6[1], fma(xa, w6[0], a7_6));
              a7_7 = fma(xb, w7[1], fma(xa, w7[0], a7_7));
          }
        }
        { let k = k0 + 16u;
          let w0 = load_rhs8(wr0 + k);
          let w1 = load_rhs8(wr1 + k);
          let w2 = load_rhs8(wr2 + k);
          let w3 = load_rhs8(wr3 + k);
          let w4 = load_rhs8(wr4 + k);
          let w5 = load_rhs8(wr5 + k);
          let w6 = load_rhs8(wr6 + k);
          let w7 = load_rhs8(wr7 + k);
          {
              let xa = x0[4]; let xb = x0[5];
              a0_0 = fma(xb, w0[1], fma(xa, w0[0], a0_0));
              a0_1 = fma(xb, w1[1], fma(xa, w1[0], a0_1));
              a0_2 = fma(xb, w2[1], fma(xa, w2[0], a0_2));
              a0_3 = fma(xb, w3[1], fma(xa, w3[0], a0_3));
              a0_4 = fma(xb, w4[1], fma(xa, w4[0], a0_4));
              a0_5 = fma(xb, w5[1], fma(xa, w5[0], a0_5));
              a0_6 = fma(xb, w6[1], fma(xa, w6[0], a0_6));
              a0_7 = fma(xb, w7[1], fma(xa, w7[0], a0_7));
          }
          if (GM > 1u) {
              let xa = x1[4]; let xb = x1[5];
              a1_0 = fma(xb, w0[1], fma(xa, w0[0], a1_0));
              a1_1 = fma(xb, w1[1], fma(xa, w1[0], a1_1));
              a1_2 = fma(xb, w2[1], fma(xa, w2[0], a1_2));
              a1_3 = fma(xb, w3[1], fma(xa, w3[0], a1_3));
              a1_4 = fma(xb, w4[1], fma(xa, w4[0], a1_4));
              a1_5 = fma(xb, w5[1], fma(xa, w5[0], a1_5));
              a1_6 = fma(xb, w6[1], fma(xa, w6[0], a1_6));
              a1_7 = fma(xb, w7[1], fma(xa, w7[0], a1_7));
          }
          if (GM > 2u) {
              let xa = x2[4]; let xb = x2[5];
              a2_0 = fma(xb, w0[1], fma(xa, w0[0], a2_0));
              a2_1 = fma(xb, w1[1], fma(xa, w1[0], a2_1));
              a2_2 = fma(xb, w2[1], fma(xa, w2[0], a2_2));
              a2_3 = fma(xb, w3[1], fma(xa, w3[0], a2_3));
              a2_4 = fma(xb, w4[1], fma(xa, w4[0], a2_4));
              a2_5 = fma(xb, w5[1], fma(xa, w5[0], a2_5));
              a2_6 = fma(xb, w6[1], fma(xa, w6[0], a2_6));
              a2_7 = fma(xb, w7[1], fma(xa, w7[0], a2_7));
          }
          if (GM > 3u) {
              let xa = x3[4]; let xb = x3[5];
              a3_0 = fma(xb, w0[1], fma(xa, w0[0], a3_0));
              a3_1 = fma(xb, w1[1], fma(xa, w1[0], a3_1));
              a3_2 = fma(xb, w2[1], fma(xa, w2[0], a3_2));
              a3_3 = fma(xb, w3[1], fma(xa, w3[0], a3_3));
              a3_4 = fma(xb, w4[1], fma(xa, w4[0], a3_4));
              a3_5 = fma(xb, w5[1], fma(xa, w5[0], a3_5));
              a3_6 = fma(xb, w6[1], fma(xa, w6[0], a3_6));
              a3_7 = fma(xb, w7[1], fma(xa, w7[0], a3_7));
          }
          if (GM > 4u) {
              let xa = x4[4]; let xb = x4[5];
              a4_0 = fma(xb, w0[1], fma(xa, w0[0], a4_0));
              a4_1 = fma(xb, w1[1], fma(xa, w1[0], a4_1));
              a4_2 = fma(xb, w2[1], fma(xa, w2[0], a4_2));
              a4_3 = fma(xb, w3[1], fma(xa, w3[0], a4_3));
              a4_4 = fma(xb, w4[1], fma(xa, w4[0], a4_4));
              a4_5 = fma(xb, w5[1], fma(xa, w5[0], a4_5));
              a4_6 = fma(xb, w6[1], fma(xa, w6[0], a4_6));
              a4_7 = fma(xb, w7[1], fma(xa, w7[0], a4_7));
          }
          if (GM > 5u) {
              let xa = x5[4]; let xb = x5[5];
              a5_0 = fma(xb, w0[1], fma(xa, w0[0], a5_0));
              a5_1 = fma(xb, w1[1], fma(xa, w1[0], a5_1));
              a5_2 = fma(xb, w2[1], fma(xa, w2[0], a5_2));
              a5_3 = fma(xb, w3[1], fma(xa, w3[0], a5_3));
              a5_4 = fma(xb, w4[1], fma(xa, w4[0], a5_4));
              a5_5 = fma(xb, w5[1], fma(xa, w5[0], a5_5));
              a5_6 = fma(xb, w6[1], fma(xa, w6[0], a5_6));
              a5_7 = fma(xb, w7[1], fma(xa, w7[0], a5_7));
          }
          if (GM > 6u) {
              let xa = x6[4]; let xb = x6[5];
              a6_0 = fma(xb, w0[1], fma(xa, w0[0], a6_0));
              a6_1 = fma(xb, w1[1], fma(xa, w1[0], a6_1));
              a6_2 = fma(xb, w2[1], fma(xa, w2[0], a6_2));
              a6_3 = fma(xb, w3[1], fma(xa, w3[0], a6_3));
              a6_4 = fma(xb, w4[1], fma(xa, w4[0], a6_4));
              a6_5 = fma(xb, w5[1], fma(xa, w5[0], a6_5));
              a6_6 = fma(xb, w6[1], fma(xa, w6[0], a6_6));
              a6_7 = fma(xb, w7[1], fma(xa, w7[0], a6_7));
          }
          if (GM > 7u) {
              let xa = x7[4]; let xb = x7[5];
              a7_0 = fma(xb, w0[1], fma(xa, w0[0], a7_0));
              a7_1 = fma(xb, w1[1], fma(xa, w1[0], a7_1));
              a7_2 = fma(xb, w2[1], fma(xa, w2[0], a7_2));
              a7_3 = fma(xb, w3[1], fma(xa, w3[0], a7_3));
              a7_4 = fma(xb, w4[1], fma(xa, w4[0], a7_4));
              a7_5 = fma(xb, w5[1], fma(xa, w5[0], a7_5));
              a7_6 = fma(xb, w6[1], fma(xa, w6[0], a7_6));
              a7_7 = fma(xb, w7[1], fma(xa, w7[0], a7_7));
          }
        }
        { let k = k0 + 24u;
          let w0 = load_rhs8(wr0 + k);
          let w1 = load_rhs8(wr1 + k);
          let w2 = load_rhs8(wr2 + k);
          let w3 = load_rhs8(wr3 + k);
          let w4 = load_rhs8(wr4 + k);
          let w5 = load_rhs8(wr5 + k);
          let w6 = load_rhs8(wr6 + k);
          let w7 = load_rhs8(wr7 + k);
          {
              let xa = x0[6]; let xb = x0[7];
              a0_0 = fma(xb, w0[1], fma(xa, w0[0], a0_0));
              a0_1 = fma(xb, w1[1], fma(xa, w1[0], a0_1));
              a0_2 = fma(xb, w2[1], fma(xa, w2[0], a0_2));
              a0_3 = fma(xb, w3[1], fma(xa, w3[0], a0_3));
              a0_4 = fma(xb, w4[1], fma(xa, w4[0], a0_4));
              a0_5 = fma(xb, w5[1], fma(xa, w5[0], a0_5));
              a0_6 = fma(xb, w6[1], fma(xa, w6[0], a0_6));
              a0_7 = fma(xb, w7[1], fma(xa, w7[0], a0_7));
          }
          if (GM > 1u) {
              let xa = x1[6]; let xb = x1[7];
              a1_0 = fma(xb, w0[1], fma(xa, w0[0], a1_0));
              a1_1 = fma(xb, w1[1], fma(xa, w1[0], a1_1));
              a1_2 = fma(xb, w2[1], fma(xa, w2[0], a1_2));
              a1_3 = fma(xb, w3[1], fma(xa, w3[0], a1_3));
              a1_4 = fma(xb, w4[1], fma(xa, w4[0], a1_4));
              a1_5 = fma(xb, w5[1], fma(xa, w5[0], a1_5));
              a1_6 = fma(xb, w6[1], fma(xa, w6[0], a1_6));
              a1_7 = fma(xb, w7[1], fma(xa, w7[0], a1_7));
          }
          if (GM > 2u) {
              let xa = x2[6]; let xb = x2[7];
              a2_0 = fma(xb, w0[1], fma(xa, w0[0], a2_0));
              a2_1 = fma(xb, w1[1], fma(xa, w1[0], a2_1));
              a2_2 = fma(xb, w2[1], fma(xa, w2[0], a2_2));
              a2_3 = fma(xb, w3[1], fma(xa, w3[0], a2_3));
              a2_4 = fma(xb, w4[1], fma(xa, w4[0], a2_4));
              a2_5 = fma(xb, w5[1], fma(xa, w5[0], a2_5));
              a2_6 = fma(xb, w6[1], fma(xa, w6[0], a2_6));
              a2_7 = fma(xb, w7[1], fma(xa, w7[0], a2_7));
          }
          if (GM > 3u) {
              let xa = x3[6]; let xb = x3[7];
              a3_0 = fma(xb, w0[1], fma(xa, w0[0], a3_0));
              a3_1 = fma(xb, w1[1], fma(xa, w1[0], a3_1));
              a3_2 = fma(xb, w2[1], fma(xa, w2[0], a3_2));
              a3_3 = fma(xb, w3[1], fma(xa, w3[0], a3_3));
              a3_4 = fma(xb, w4[1], fma(xa, w4[0], a3_4));
              a3_5 = fma(xb, w5[1], fma(xa, w5[0], a3_5));
              a3_6 = fma(xb, w6[1], fma(xa, w6[0], a3_6));
              a3_7 = fma(xb, w7[1], fma(xa, w7[0], a3_7));
          }
          if (GM > 4u) {
              let xa = x4[6]; let xb = x4[7];
              a4_0 = fma(xb, w0[1], fma(xa, w0[0], a4_0));
              a4_1 = fma(xb, w1[1], fma(xa, w1[0], a4_1));
              a4_2 = fma(xb, w2[1], fma(xa, w2[0], a4_2));
              a4_3 = fma(xb, w3[1], fma(xa, w3[0], a4_3));
              a4_4 = fma(xb, w4[1], fma(xa, w4[0], a4_4));
              a4_5 = fma(xb, w5[1], fma(xa, w5[0], a4_5));
              a4_6 = fma(xb, w6[1], fma(xa, w6[0], a4_6));
              a4_7 = fma(xb, w7[1], fma(xa, w7[0], a4_7));
          }
          if (GM > 5u) {
              let xa = x5[6]; let xb = x5[7];
              a5_0 = fma(xb, w0[1], fma(xa, w0[0], a5_0));
              a5_1 = fma(xb, w1[1], fma(xa, w1[0], a5_1));
              a5_2 = fma(xb, w2[1], fma(xa, w2[0], a5_2));
              a5_3 = fma(xb, w3[1], fma(xa, w3[0], a5_3));
              a5_4 = fma(xb, w4[1], fma(xa, w4[0], a5_4));
              a5_5 = fma(xb, w5[1], fma(xa, w5[0], a5_5));
              a5_6 = fma(xb, w6[1], fma(xa, w6[0], a5_6));
              a5_7 = fma(xb, w7[1], fma(xa, w7[0], a5_7));
          }
          if (GM > 6u) {
              let xa = x6[6]; let xb = x6[7];
              a6_0 = fma(xb, w0[1], fma(xa, w0[0], a6_0));
              a6_1 = fma(xb, w1[1], fma(xa, w1[0], a6_1));
              a6_2 = fma(xb, w2[1], fma(xa, w2[0], a6_2));
              a6_3 = fma(xb, w3[1], fma(xa, w3[0], a6_3));
              a6_4 = fma(xb, w4[1], fma(xa, w4[0], a6_4));
              a6_5 = fma(xb, w5[1], fma(xa, w5[0], a6_5));
              a6_6 = fma(xb, w6[1], fma(xa, w6[0], a6_6));
              a6_7 = fma(xb, w7[1], fma(xa, w7[0], a6_7));
          }
          if (GM > 7u) {
              let xa = x7[6]; let xb = x7[7];
              a7_0 = fma(xb, w0[1], fma(xa, w0[0], a7_0));
              a7_1 = fma(xb, w1[1], fma(xa, w1[0], a7_1));
              a7_2 = fma(xb, w2[1], fma(xa, w2[0], a7_2));
              a7_3 = fma(xb, w3[1], fma(xa, w3[0], a7_3));
              a7_4 = fma(xb, w4[1], fma(xa, w4[0], a7_4));
              a7_5 = fma(xb, w5[1], fma(xa, w5[0], a7_5));
              a7_6 = fma(xb, w6[1], fma(xa, w6[0], a7_6));
              a7_7 = fma(xb, w7[1], fma(xa, w7[0], a7_7));
          }
        }
    }
    for (var k = kfull; k < p.k; k += 8u) {
        let w0 = load_rhs8(wr0 + k);
        let w1 = load_rhs8(wr1 + k);
        let w2 = load_rhs8(wr2 + k);
        let w3 = load_rhs8(wr3 + k);
        let w4 = load_rhs8(wr4 + k);
        let w5 = load_rhs8(wr5 + k);
        let w6 = load_rhs8(wr6 + k);
        let w7 = load_rhs8(wr7 + k);
        {
            let xa = lhs4[(xr0 + k) >> 2u]; let xb = lhs4[(xr0 + k + 4u) >> 2u];
            a0_0 = fma(xb, w0[1], fma(xa, w0[0], a0_0));
            a0_1 = fma(xb, w1[1], fma(xa, w1[0], a0_1));
            a0_2 = fma(xb, w2[1], fma(xa, w2[0], a0_2));
            a0_3 = fma(xb, w3[1], fma(xa, w3[0], a0_3));
            a0_4 = fma(xb, w4[1], fma(xa, w4[0], a0_4));
            a0_5 = fma(xb, w5[1], fma(xa, w5[0], a0_5));
            a0_6 = fma(xb, w6[1], fma(xa, w6[0], a0_6));
            a0_7 = fma(xb, w7[1], fma(xa, w7[0], a0_7));
        }
        if (GM > 1u) {
            let xa = lhs4[(xr1 + k) >> 2u]; let xb = lhs4[(xr1 + k + 4u) >> 2u];
            a1_0 = fma(xb, w0[1], fma(xa, w0[0], a1_0));
            a1_1 = fma(xb, w1[1], fma(xa, w1[0], a1_1));
            a1_2 = fma(xb, w2[1], fma(xa, w2[0], a1_2));
            a1_3 = fma(xb, w3[1], fma(xa, w3[0], a1_3));
            a1_4 = fma(xb, w4[1], fma(xa, w4[0], a1_4));
            a1_5 = fma(xb, w5[1], fma(xa, w5[0], a1_5));
            a1_6 = fma(xb, w6[1], fma(xa, w6[0], a1_6));
            a1_7 = fma(xb, w7[1], fma(xa, w7[0], a1_7));
        }
        if (GM > 2u) {
            let xa = lhs4[(xr2 + k) >> 2u]; let xb = lhs4[(xr2 + k + 4u) >> 2u];
            a2_0 = fma(xb, w0[1], fma(xa, w0[0], a2_0));
            a2_1 = fma(xb, w1[1], fma(xa, w1[0], a2_1));
            a2_2 = fma(xb, w2[1], fma(xa, w2[0], a2_2));
            a2_3 = fma(xb, w3[1], fma(xa, w3[0], a2_3));
            a2_4 = fma(xb, w4[1], fma(xa, w4[0], a2_4));
            a2_5 = fma(xb, w5[1], fma(xa, w5[0], a2_5));
            a2_6 = fma(xb, w6[1], fma(xa, w6[0], a2_6));
            a2_7 = fma(xb, w7[1], fma(xa, w7[0], a2_7));
        }
        if (GM > 3u) {
            let xa = lhs4[(xr3 + k) >> 2u]; let xb = lhs4[(xr3 + k + 4u) >> 2u];
            a3_0 = fma(xb, w0[1], fma(xa, w0[0], a3_0));
            a3_1 = fma(xb, w1[1], fma(xa, w1[0], a3_1));
            a3_2 = fma(xb, w2[1], fma(xa, w2[0], a3_2));
            a3_3 = fma(xb, w3[1], fma(xa, w3[0], a3_3));
            a3_4 = fma(xb, w4[1], fma(xa, w4[0], a3_4));
            a3_5 = fma(xb, w5[1], fma(xa, w5[0], a3_5));
            a3_6 = fma(xb, w6[1], fma(xa, w6[0], a3_6));
            a3_7 = fma(xb, w7[1], fma(xa, w7[0], a3_7));
        }
        if (GM > 4u) {
            let xa = lhs4[(xr4 + k) >> 2u]; let xb = lhs4[(xr4 + k + 4u) >> 2u];
            a4_0 = fma(xb, w0[1], fma(xa, w0[0], a4_0));
            a4_1 = fma(xb, w1[1], fma(xa, w1[0], a4_1));
            a4_2 = fma(xb, w2[1], fma(xa, w2[0], a4_2));
            a4_3 = fma(xb, w3[1], fma(xa, w3[0], a4_3));
            a4_4 = fma(xb, w4[1], fma(xa, w4[0], a4_4));
            a4_5 = fma(xb, w5[1], fma(xa, w5[0], a4_5));
            a4_6 = fma(xb, w6[1], fma(xa, w6[0], a4_6));
            a4_7 = fma(xb, w7[1], fma(xa, w7[0], a4_7));
        }
        if (GM > 5u) {
            let xa = lhs4[(xr5 + k) >> 2u]; let xb = lhs4[(xr5 + k + 4u) >> 2u];
            a5_0 = fma(xb, w0[1], fma(xa, w0[0], a5_0));
            a5_1 = fma(xb, w1[1], fma(xa, w1[0], a5_1));
            a5_2 = fma(xb, w2[1], fma(xa, w2[0], a5_2));
            a5_3 = fma(xb, w3[1], fma(xa, w3[0], a5_3));
            a5_4 = fma(xb, w4[1], fma(xa, w4[0], a5_4));
            a5_5 = fma(xb, w5[1], fma(xa, w5[0], a5_5));
            a5_6 = fma(xb, w6[1], fma(xa, w6[0], a5_6));
            a5_7 = fma(xb, w7[1], fma(xa, w7[0], a5_7));
        }
        if (GM > 6u) {
            let xa = lhs4[(xr6 + k) >> 2u]; let xb = lhs4[(xr6 + k + 4u) >> 2u];
            a6_0 = fma(xb, w0[1], fma(xa, w0[0], a6_0));
            a6_1 = fma(xb, w1[1], fma(xa, w1[0], a6_1));
            a6_2 = fma(xb, w2[1], fma(xa, w2[0], a6_2));
            a6_3 = fma(xb, w3[1], fma(xa, w3[0], a6_3));
            a6_4 = fma(xb, w4[1], fma(xa, w4[0], a6_4));
            a6_5 = fma(xb, w5[1], fma(xa, w5[0], a6_5));
            a6_6 = fma(xb, w6[1], fma(xa, w6[0], a6_6));
            a6_7 = fma(xb, w7[1], fma(xa, w7[0], a6_7));
        }
        if (GM > 7u) {
            let xa = lhs4[(xr7 + k) >> 2u]; let xb = lhs4[(xr7 + k + 4u) >> 2u];
            a7_0 = fma(xb, w0[1], fma(xa, w0[0], a7_0));
            a7_1 = fma(xb, w1[1], fma(xa, w1[0], a7_1));
            a7_2 = fma(xb, w2[1], fma(xa, w2[0], a7_2));
            a7_3 = fma(xb, w3[1], fma(xa, w3[0], a7_3));
            a7_4 = fma(xb, w4[1], fma(xa, w4[0], a7_4));
            a7_5 = fma(xb, w5[1], fma(xa, w5[0], a7_5));
            a7_6 = fma(xb, w6[1], fma(xa, w6[0], a7_6));
            a7_7 = fma(xb, w7[1], fma(xa, w7[0], a7_7));
        }
    }
    {
        store1(b, m0 + 0u, n0 + 0u, hsum(a0_0)); store1(b, m0 + 0u, n0 + 1u, hsum(a0_1)); store1(b, m0 + 0u, n0 + 2u, hsum(a0_2)); store1(b, m0 + 0u, n0 + 3u, hsum(a0_3));
        if (GC > 4u) { store1(b, m0 + 0u, n0 + 4u, hsum(a0_4)); store1(b, m0 + 0u, n0 + 5u, hsum(a0_5)); store1(b, m0 + 0u, n0 + 6u, hsum(a0_6)); store1(b, m0 + 0u, n0 + 7u, hsum(a0_7)); }
    }
    if (GM > 1u) {
        store1(b, m0 + 1u, n0 + 0u, hsum(a1_0)); store1(b, m0 + 1u, n0 + 1u, hsum(a1_1)); store1(b, m0 + 1u, n0 + 2u, hsum(a1_2)); store1(b, m0 + 1u, n0 + 3u, hsum(a1_3));
        if (GC > 4u) { store1(b, m0 + 1u, n0 + 4u, hsum(a1_4)); store1(b, m0 + 1u, n0 + 5u, hsum(a1_5)); store1(b, m0 + 1u, n0 + 6u, hsum(a1_6)); store1(b, m0 + 1u, n0 + 7u, hsum(a1_7)); }
    }
    if (GM > 2u) {
        store1(b, m0 + 2u, n0 + 0u, hsum(a2_0)); store1(b, m0 + 2u, n0 + 1u, hsum(a2_1)); store1(b, m0 + 2u, n0 + 2u, hsum(a2_2)); store1(b, m0 + 2u, n0 + 3u, hsum(a2_3));
        if (GC > 4u) { store1(b, m0 + 2u, n0 + 4u, hsum(a2_4)); store1(b, m0 + 2u, n0 + 5u, hsum(a2_5)); store1(b, m0 + 2u, n0 + 6u, hsum(a2_6)); store1(b, m0 + 2u, n0 + 7u, hsum(a2_7)); }
    }
    if (GM > 3u) {
        store1(b, m0 + 3u, n0 + 0u, hsum(a3_0)); store1(b, m0 + 3u, n0 + 1u, hsum(a3_1)); store1(b, m0 + 3u, n0 + 2u, hsum(a3_2)); store1(b, m0 + 3u, n0 + 3u, hsum(a3_3));
        if (GC > 4u) { store1(b, m0 + 3u, n0 + 4u, hsum(a3_4)); store1(b, m0 + 3u, n0 + 5u, hsum(a3_5)); store1(b, m0 + 3u, n0 + 6u, hsum(a3_6)); store1(b, m0 + 3u, n0 + 7u, hsum(a3_7)); }
    }
    if (GM > 4u) {
        store1(b, m0 + 4u, n0 + 0u, hsum(a4_0)); store1(b, m0 + 4u, n0 + 1u, hsum(a4_1)); store1(b, m0 + 4u, n0 + 2u, hsum(a4_2)); store1(b, m0 + 4u, n0 + 3u, hsum(a4_3));
        if (GC > 4u) { store1(b, m0 + 4u, n0 + 4u, hsum(a4_4)); store1(b, m0 + 4u, n0 + 5u, hsum(a4_5)); store1(b, m0 + 4u, n0 + 6u, hsum(a4_6)); store1(b, m0 + 4u, n0 + 7u, hsum(a4_7)); }
    }
    if (GM > 5u) {
        store1(b, m0 + 5u, n0 + 0u, hsum(a5_0)); store1(b, m0 + 5u, n0 + 1u, hsum(a5_1)); store1(b, m0 + 5u, n0 + 2u, hsum(a5_2)); store1(b, m0 + 5u, n0 + 3u, hsum(a5_3));
        if (GC > 4u) { store1(b, m0 + 5u, n0 + 4u, hsum(a5_4)); store1(b, m0 + 5u, n0 + 5u, hsum(a5_5)); store1(b, m0 + 5u, n0 + 6u, hsum(a5_6)); store1(b, m0 + 5u, n0 + 7u, hsum(a5_7)); }
    }
    if (GM > 6u) {
        store1(b, m0 + 6u, n0 + 0u, hsum(a6_0)); store1(b, m0 + 6u, n0 + 1u, hsum(a6_1)); store1(b, m0 + 6u, n0 + 2u, hsum(a6_2)); store1(b, m0 + 6u, n0 + 3u, hsum(a6_3));
        if (GC > 4u) { store1(b, m0 + 6u, n0 + 4u, hsum(a6_4)); store1(b, m0 + 6u, n0 + 5u, hsum(a6_5)); store1(b, m0 + 6u, n0 + 6u, hsum(a6_6)); store1(b, m0 + 6u, n0 + 7u, hsum(a6_7)); }
    }
    if (GM > 7u) {
        store1(b, m0 + 7u, n0 + 0u, hsum(a7_0)); store1(b, m0 + 7u, n0 + 1u, hsum(a7_1)); store1(b, m0 + 7u, n0 + 2u, hsum(a7_2)); store1(b, m0 + 7u, n0 + 3u, hsum(a7_3));
        if (GC > 4u) { store1(b, m0 + 7u, n0 + 4u, hsum(a7_4)); store1(b, m0 + 7u, n0 + 5u, hsum(a7_5)); store1(b, m0 + 7u, n0 + 6u, hsum(a7_6)); store1(b, m0 + 7u, n0 + 7u, hsum(a7_7)); }
    }
}

fn gemv_scalar(wid: vec3<u32>, lane: u32) {
    let n0 = (wid.x * WG + lane) * GC;
    let m0 = wid.y * GM;
    let b = wid.z;
    let xr0 = b * p.l_sb + min(m0 + 0u, p.m - 1u) * p.l_sm;
    let xr1 = b * p.l_sb + min(m0 + 1u, p.m - 1u) * p.l_sm;
    let xr2 = b * p.l_sb + min(m0 + 2u, p.m - 1u) * p.l_sm;
    let xr3 = b * p.l_sb + min(m0 + 3u, p.m - 1u) * p.l_sm;
    let xr4 = b * p.l_sb + min(m0 + 4u, p.m - 1u) * p.l_sm;
    let xr5 = b * p.l_sb + min(m0 + 5u, p.m - 1u) * p.l_sm;
    let xr6 = b * p.l_sb + min(m0 + 6u, p.m - 1u) * p.l_sm;
    let xr7 = b * p.l_sb + min(m0 + 7u, p.m - 1u) * p.l_sm;
    let wr0 = b * p.r_sb + min(n0 + 0u, p.n - 1u) * p.r_sn;
    let wr1 = b * p.r_sb + min(n0 + 1u, p.n - 1u) * p.r_sn;
    let wr2 = b * p.r_sb + min(n0 + 2u, p.n - 1u) * p.r_sn;
    let wr3 = b * p.r_sb + min(n0 + 3u, p.n - 1u) * p.r_sn;
    let wr4 = b * p.r_sb + min(n0 + 4u, p.n - 1u) * p.r_sn;
    let wr5 = b * p.r_sb + min(n0 + 5u, p.n - 1u) * p.r_sn;
    let wr6 = b * p.r_sb + min(n0 + 6u, p.n - 1u) * p.r_sn;
    let wr7 = b * p.r_sb + min(n0 + 7u, p.n - 1u) * p.r_sn;
    var a0_0 = 0.0; var a0_1 = 0.0; var a0_2 = 0.0; var a0_3 = 0.0; var a0_4 = 0.0; var a0_5 = 0.0; var a0_6 = 0.0; var a0_7 = 0.0;
    var a1_0 = 0.0; var a1_1 = 0.0; var a1_2 = 0.0; var a1_3 = 0.0; var a1_4 = 0.0; var a1_5 = 0.0; var a1_6 = 0.0; var a1_7 = 0.0;
    var a2_0 = 0.0; var a2_1 = 0.0; var a2_2 = 0.0; var a2_3 = 0.0; var a2_4 = 0.0; var a2_5 = 0.0; var a2_6 = 0.0; var a2_7 = 0.0;
    var a3_0 = 0.0; var a3_1 = 0.0; var a3_2 = 0.0; var a3_3 = 0.0; var a3_4 = 0.0; var a3_5 = 0.0; var a3_6 = 0.0; var a3_7 = 0.0;
    var a4_0 = 0.0; var a4_1 = 0.0; var a4_2 = 0.0; var a4_3 = 0.0; var a4_4 = 0.0; var a4_5 = 0.0; var a4_6 = 0.0; var a4_7 = 0.0;
    var a5_0 = 0.0; var a5_1 = 0.0; var a5_2 = 0.0; var a5_3 = 0.0; var a5_4 = 0.0; var a5_5 = 0.0; var a5_6 = 0.0; var a5_7 = 0.0;
    var a6_0 = 0.0; var a6_1 = 0.0; var a6_2 = 0.0; var a6_3 = 0.0; var a6_4 = 0.0; var a6_5 = 0.0; var a6_6 = 0.0; var a6_7 = 0.0;
    var a7_0 = 0.0; var a7_1 = 0.0; var a7_2 = 0.0; var a7_3 = 0.0; var a7_4 = 0.0; var a7_5 = 0.0; var a7_6 = 0.0; var a7_7 = 0.0;
    for (var k = 0u; k < p.k; k++) {
        let lk = k * p.l_sk;
        let rk = k * p.r_sk;
        let w0 = load_rhs(wr0 + rk);
        let w1 = load_rhs(wr1 + rk);
        let w2 = load_rhs(wr2 + rk);
        let w3 = load_rhs(wr3 + rk);
        let w4 = load_rhs(wr4 + rk);
        let w5 = load_rhs(wr5 + rk);
        let w6 = load_rhs(wr6 + rk);
        let w7 = load_rhs(wr7 + rk);
        { let x = lhs[xr0 + lk]; a0_0 = fma(x, w0, a0_0); a0_1 = fma(x, w1, a0_1); a0_2 = fma(x, w2, a0_2); a0_3 = fma(x, w3, a0_3); a0_4 = fma(x, w4, a0_4); a0_5 = fma(x, w5, a0_5); a0_6 = fma(x, w6, a0_6); a0_7 = fma(x, w7, a0_7); }
        if (GM > 1u) { let x = lhs[xr1 + lk]; a1_0 = fma(x, w0, a1_0); a1_1 = fma(x, w1, a1_1); a1_2 = fma(x, w2, a1_2); a1_3 = fma(x, w3, a1_3); a1_4 = fma(x, w4, a1_4); a1_5 = fma(x, w5, a1_5); a1_6 = fma(x, w6, a1_6); a1_7 = fma(x, w7, a1_7); }
        if (GM > 2u) { let x = lhs[xr2 + lk]; a2_0 = fma(x, w0, a2_0); a2_1 = fma(x, w1, a2_1); a2_2 = fma(x, w2, a2_2); a2_3 = fma(x, w3, a2_3); a2_4 = fma(x, w4, a2_4); a2_5 = fma(x, w5, a2_5); a2_6 = fma(x, w6, a2_6); a2_7 = fma(x, w7, a2_7); }
        if (GM > 3u) { let x = lhs[xr3 + lk]; a3_0 = fma(x, w0, a3_0); a3_1 = fma(x, w1, a3_1); a3_2 = fma(x, w2, a3_2); a3_3 = fma(x, w3, a3_3); a3_4 = fma(x, w4, a3_4); a3_5 = fma(x, w5, a3_5); a3_6 = fma(x, w6, a3_6); a3_7 = fma(x, w7, a3_7); }
        if (GM > 4u) { let x = lhs[xr4 + lk]; a4_0 = fma(x, w0, a4_0); a4_1 = fma(x, w1, a4_1); a4_2 = fma(x, w2, a4_2); a4_3 = fma(x, w3, a4_3); a4_4 = fma(x, w4, a4_4); a4_5 = fma(x, w5, a4_5); a4_6 = fma(x, w6, a4_6); a4_7 = fma(x, w7, a4_7); }
        if (GM > 5u) { let x = lhs[xr5 + lk]; a5_0 = fma(x, w0, a5_0); a5_1 = fma(x, w1, a5_1); a5_2 = fma(x, w2, a5_2); a5_3 = fma(x, w3, a5_3); a5_4 = fma(x, w4, a5_4); a5_5 = fma(x, w5, a5_5); a5_6 = fma(x, w6, a5_6); a5_7 = fma(x, w7, a5_7); }
        if (GM > 6u) { let x = lhs[xr6 + lk]; a6_0 = fma(x, w0, a6_0); a6_1 = fma(x, w1, a6_1); a6_2 = fma(x, w2, a6_2); a6_3 = fma(x, w3, a6_3); a6_4 = fma(x, w4, a6_4); a6_5 = fma(x, w5, a6_5); a6_6 = fma(x, w6, a6_6); a6_7 = fma(x, w7, a6_7); }
        if (GM > 7u) { let x = lhs[xr7 + lk]; a7_0 = fma(x, w0, a7_0); a7_1 = fma(x, w1, a7_1); a7_2 = fma(x, w2, a7_2); a7_3 = fma(x, w3, a7_3); a7_4 = fma(x, w4, a7_4); a7_5 = fma(x, w5, a7_5); a7_6 = fma(x, w6, a7_6); a7_7 = fma(x, w7, a7_7); }
    }
    {
        store1(b, m0 + 0u, n0 + 0u, a0_0); store1(b, m0 + 0u, n0 + 1u, a0_1); store1(b, m0 + 0u, n0 + 2u, a0_2); store1(b, m0 + 0u, n0 + 3u, a0_3);
        if (GC > 4u) { store1(b, m0 + 0u, n0 + 4u, a0_4); store1(b, m0 + 0u, n0 + 5u, a0_5); store1(b, m0 + 0u, n0 + 6u, a0_6); store1(b, m0 + 0u, n0 + 7u, a0_7); }
    }
    if (GM > 1u) {
        store1(b, m0 + 1u, n0 + 0u, a1_0); store1(b, m0 + 1u, n0 + 1u, a1_1); store1(b, m0 + 1u, n0 + 2u, a1_2); store1(b, m0 + 1u, n0 + 3u, a1_3);
        if (GC > 4u) { store1(b, m0 + 1u, n0 + 4u, a1_4); store1(b, m0 + 1u, n0 + 5u, a1_5); store1(b, m0 + 1u, n0 + 6u, a1_6); store1(b, m0 + 1u, n0 + 7u, a1_7); }
    }
    if (GM > 2u) {
        store1(b, m0 + 2u, n0 + 0u, a2_0); store1(b, m0 + 2u, n0 + 1u, a2_1); store1(b, m0 + 2u, n0 + 2u, a2_2); store1(b, m0 + 2u, n0 + 3u, a2_3);
        if (GC > 4u) { store1(b, m0 + 2u, n0 + 4u, a2_4); store1(b, m0 + 2u, n0 + 5u, a2_5); store1(b, m0 + 2u, n0 + 6u, a2_6); store1(b, m0 + 2u, n0 + 7u, a2_7); }
    }
    if (GM > 3u) {
        store1(b, m0 + 3u, n0 + 0u, a3_0); store1(b, m0 + 3u, n0 + 1u, a3_1); store1(b, m0 + 3u, n0 + 2u, a3_2); store1(b, m0 + 3u, n0 + 3u, a3_3);
        if (GC > 4u) { store1(b, m0 + 3u, n0 + 4u, a3_4); store1(b, m0 + 3u, n0 + 5u, a3_5); store1(b, m0 + 3u, n0 + 6u, a3_6); store1(b, m0 + 3u, n0 + 7u, a3_7); }
    }
    if (GM > 4u) {
        store1(b, m0 + 4u, n0 + 0u, a4_0); store1(b, m0 + 4u, n0 + 1u, a4_1); store1(b, m0 + 4u, n0 + 2u, a4_2); store1(b, m0 + 4u, n0 + 3u, a4_3);
        if (GC > 4u) { store1(b, m0 + 4u, n0 + 4u, a4_4); store1(b, m0 + 4u, n0 + 5u, a4_5); store1(b, m0 + 4u, n0 + 6u, a4_6); store1(b, m0 + 4u, n0 + 7u, a4_7); }
    }
    if (GM > 5u) {
        store1(b, m0 + 5u, n0 + 0u, a5_0); store1(b, m0 + 5u, n0 + 1u, a5_1); store1(b, m0 + 5u, n0 + 2u, a5_2); store1(b, m0 + 5u, n0 + 3u, a5_3);
        if (GC > 4u) { store1(b, m0 + 5u, n0 + 4u, a5_4); store1(b, m0 + 5u, n0 + 5u, a5_5); store1(b, m0 + 5u, n0 + 6u, a5_6); store1(b, m0 + 5u, n0 + 7u, a5_7); }
    }
    if (GM > 6u) {
        store1(b, m0 + 6u, n0 + 0u, a6_0); store1(b, m0 + 6u, n0 + 1u, a6_1); store1(b, m0 + 6u, n0 + 2u, a6_2); store1(b, m0 + 6u, n0 + 3u, a6_3);
        if (GC > 4u) { store1(b, m0 + 6u, n0 + 4u, a6_4); store1(b, m0 + 6u, n0 + 5u, a6_5); store1(b, m0 + 6u, n0 + 6u, a6_6); store1(b, m0 + 6u, n0 + 7u, a6_7); }
    }
    if (GM > 7u) {
        store1(b, m0 + 7u, n0 + 0u, a7_0); store1(b, m0 + 7u, n0 + 1u, a7_1); store1(b, m0 + 7u, n0 + 2u, a7_2); store1(b, m0 + 7u, n0 + 3u, a7_3);
        if (GC > 4u) { store1(b, m0 + 7u, n0 + 4u, a7_4); store1(b, m0 + 7u, n0 + 5u, a7_5); store1(b, m0 + 7u, n0 + 6u, a7_6); store1(b, m0 + 7u, n0 + 7u, a7_7); }
    }
}

// One invocation per GC columns and GM rows; WG invocations per workgroup (8 = one lavapipe subgroup, which
// fetch_x's broadcasts need). grid: (ceil(N / (WG * GC)), ceil(M / GM), batch).
@compute @workgroup_size(WG)
fn gemv_vec_entry(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    gemv_vec(wid, lid);
}
@compute @workgroup_size(WG)
fn gemv_scalar_entry(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    gemv_scalar(wid, lid);
}
