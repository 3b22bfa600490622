// Batched matrix products out = alpha * lhs · rhs (+ bias) (+ out when accumulating), the one kernel behind
// matmul forward, both matmul backwards and every LoRA product. Transposes, batching and gradient layouts are
// all expressed as element strides, so the launcher maps each op onto this one shape:
//   out[b, m, n] = alpha * sum_{kb, k} lhs[b, kb, m, k] * rhs[b, kb, k, n]
// where kb is an outer reduction over batches (the batch sum of a shared weight's gradient).
// lhs and out are f32; rhs is f32, f16 or bf16, read through `load_rhs` / `load_rhs4` from the prelude, which
// also supplies `fetch_rows` / `fetch_cols` (the lhs values a team shares: subgroupBroadcast or plain loads).
// The nn and nt tiled kernels read rhs through `rhs4_nn(flat column offset, flat row offset, k)` and
// `rhs4_nt(flat row offset, n, k)`: storage preludes use the flat offsets, the texture prelude (a frozen 2-D
// weight with a texture twin, binding 8) the row and column, so one kernel body serves both.
//
// Two kernels: `mm_general` (any strides, 8x8 register tile per invocation, scalar loads) and the tiled
// kernels for 4-aligned layouts (vec4 loads; a team of 8 lanes shares the lhs values, through
// subgroupBroadcast where the adapter has 8-lane subgroups; layouts nn, nt, tn described at their entry points).
// Neither uses workgroup memory or barriers: on lavapipe loads dominate and barriers cost a coroutine switch.
// The register tiles are unrolled by hand (generated; row r of a tiled kernel's tile lives in c{r}_0 and
// c{r}_1): lavapipe keeps private arrays indexed in loops in memory, which made the looped version 4-10x
// slower. They are therefore const, not override constants; the general kernel's workgroup shape is an
// override. 32 rows per team measured best on lavapipe: 16 was ~20% slower, 64 no faster and 3x slower to
// compile (about 15 s per pipeline).

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
// binding 6: rhs as 4-element groups (prelude), read by load_rhs4
@group(0) @binding(7) var<storage, read_write> out4: array<vec4<f32>>;

override WGX: u32 = 8u;
override WGY: u32 = 8u;

// Tiled kernel: rows per team (a workgroup of 8 lanes). Each lane owns 8 columns.
const FTM: u32 = 32u;

fn bias_at(n: u32) -> f32 {
    if (p.has_bias != 0u) { return bias[n]; }
    return 0.0;
}

fn finish(o: u32, n: u32, v: f32) -> f32 {
    var r = bitcast<f32>(p.alpha) * v + bias_at(n);
    if (p.accumulate != 0u) { r += out[o]; }
    return r;
}

// Out-of-range rows and columns load a clamped (valid) element and are dropped here.
fn store8(b: u32, m: u32, n0: u32, v0: vec4<f32>, v1: vec4<f32>) {
    if (m >= p.m) { return; }
    let base = b * p.o_sb + m * p.o_sm;
    for (var j = 0u; j < 8u; j++) {
        let n = n0 + j;
        if (n >= p.n) { return; }
        let o = base + n * p.o_sn;
        out[o] = finish(o, n, select(v1[max(j, 4u) - 4u], v0[min(j, 3u)], j < 4u));
    }
}

fn store4v(o: u32, n: u32, v: vec4<f32>) {
    var r = bitcast<f32>(p.alpha) * v + vec4<f32>(bias_at(n), bias_at(n + 1u), bias_at(n + 2u), bias_at(n + 3u));
    if (p.accumulate != 0u) { r += out4[o >> 2u]; }
    out4[o >> 2u] = r;
}

fn store8v(b: u32, m: u32, n0: u32, v0: vec4<f32>, v1: vec4<f32>) {
    if (m >= p.m || n0 >= p.n) { return; }
    let o = b * p.o_sb + m * p.o_sm + n0;
    store4v(o, n0, v0);
    if (n0 + 4u < p.n) { store4v(o + 4u, n0 + 4u, v1); }
}

// lhs rows m..m+3 (clamped to the last four) at one k, for M-contiguous lhs; used by fetch_cols.
fn lhs_col4(base: u32, m: u32) -> vec4<f32> {
    return lhs4[(base + min(m, p.m - 4u)) >> 2u];
}

// lhs row m (clamped), elements k..k+3; used by the prelude's fetch_rows.
fn lhs_row4(lbase: u32, m: u32, k: u32) -> vec4<f32> {
    return lhs4[(lbase + min(m, p.m - 1u) * p.l_sm + k) >> 2u];
}

fn mm_general(gid: vec3<u32>) {
    let m0 = gid.y * 8u;
    let n0 = gid.x * 8u;
    let b = gid.z;
    if (m0 >= p.m || n0 >= p.n || b >= p.batch) { return; }
    let lo0 = b * p.l_sb + min(m0 + 0u, p.m - 1u) * p.l_sm;
    let lo1 = b * p.l_sb + min(m0 + 1u, p.m - 1u) * p.l_sm;
    let lo2 = b * p.l_sb + min(m0 + 2u, p.m - 1u) * p.l_sm;
    let lo3 = b * p.l_sb + min(m0 + 3u, p.m - 1u) * p.l_sm;
    let lo4 = b * p.l_sb + min(m0 + 4u, p.m - 1u) * p.l_sm;
    let lo5 = b * p.l_sb + min(m0 + 5u, p.m - 1u) * p.l_sm;
    let lo6 = b * p.l_sb + min(m0 + 6u, p.m - 1u) * p.l_sm;
    let lo7 = b * p.l_sb + min(m0 + 7u, p.m - 1u) * p.l_sm;
    let ro0 = b * p.r_sb + min(n0 + 0u, p.n - 1u) * p.r_sn;
    let ro1 = b * p.r_sb + min(n0 + 1u, p.n - 1u) * p.r_sn;
    let ro2 = b * p.r_sb + min(n0 + 2u, p.n - 1u) * p.r_sn;
    let ro3 = b * p.r_sb + min(n0 + 3u, p.n - 1u) * p.r_sn;
    let ro4 = b * p.r_sb + min(n0 + 4u, p.n - 1u) * p.r_sn;
    let ro5 = b * p.r_sb + min(n0 + 5u, p.n - 1u) * p.r_sn;
    let ro6 = b * p.r_sb + min(n0 + 6u, p.n - 1u) * p.r_sn;
    let ro7 = b * p.r_sb + min(n0 + 7u, p.n - 1u) * p.r_sn;
    var c00 = vec4<f32>(0.0); var c01 = vec4<f32>(0.0);
    var c10 = vec4<f32>(0.0); var c11 = vec4<f32>(0.0);
    var c20 = vec4<f32>(0.0); var c21 = vec4<f32>(0.0);
    var c30 = vec4<f32>(0.0); var c31 = vec4<f32>(0.0);
    var c40 = vec4<f32>(0.0); var c41 = vec4<f32>(0.0);
    var c50 = vec4<f32>(0.0); var c51 = vec4<f32>(0.0);
    var c60 = vec4<f32>(0.0); var c61 = vec4<f32>(0.0);
    var c70 = vec4<f32>(0.0); var c71 = vec4<f32>(0.0);
    for (var kb = 0u; kb < p.kb; kb++) {
        for (var k = 0u; k < p.k; k++) {
            let lk = kb * p.l_skb + k * p.l_sk;
            let rk = kb * p.r_skb + k * p.r_sk;
            let b0 = vec4<f32>(load_rhs(ro0 + rk), load_rhs(ro1 + rk), load_rhs(ro2 + rk), load_rhs(ro3 + rk));
            let b1 = vec4<f32>(load_rhs(ro4 + rk), load_rhs(ro5 + rk), load_rhs(ro6 + rk), load_rhs(ro7 + rk));
            let a0 = vec4<f32>(lhs[lo0 + lk]); c00 = fma(a0, b0, c00); c01 = fma(a0, b1, c01);
            let a1 = vec4<f32>(lhs[lo1 + lk]); c10 = fma(a1, b0, c10); c11 = fma(a1, b1, c11);
            let a2 = vec4<f32>(lhs[lo2 + lk]); c20 = fma(a2, b0, c20); c21 = fma(a2, b1, c21);
            let a3 = vec4<f32>(lhs[lo3 + lk]); c30 = fma(a3, b0, c30); c31 = fma(a3, b1, c31);
            let a4 = vec4<f32>(lhs[lo4 + lk]); c40 = fma(a4, b0, c40); c41 = fma(a4, b1, c41);
            let a5 = vec4<f32>(lhs[lo5 + lk]); c50 = fma(a5, b0, c50); c51 = fma(a5, b1, c51);
            let a6 = vec4<f32>(lhs[lo6 + lk]); c60 = fma(a6, b0, c60); c61 = fma(a6, b1, c61);
            let a7 = vec4<f32>(lhs[lo7 + lk]); c70 = fma(a7, b0, c70); c71 = fma(a7, b1, c71);
        }
    }
    store8(b, m0 + 0u, n0, c00, c01);
    store8(b, m0 + 1u, n0, c10, c11);
    store8(b, m0 + 2u, n0, c20, c21);
    store8(b, m0 + 3u, n0, c30, c31);
    store8(b, m0 + 4u, n0, c40, c41);
    store8(b, m0 + 5u, n0, c50, c51);
    store8(b, m0 + 6u, n0, c60, c61);
    store8(b, m0 + 7u, n0, c70, c71);
}

// Tiled kernel, rhs N-contiguous. Lanes past N keep running: their lhs loads feed the team.
fn tiled_nn(wid: vec3<u32>, lane: u32) {
    let m0 = wid.y * FTM;
    let n0 = (wid.x * 8u + lane) * 8u;
    let b = wid.z;
    let lbase = b * p.l_sb;
    let rbase = b * p.r_sb;
    let c0 = rbase + min(n0, p.n - 4u);
    let c1 = rbase + min(n0 + 4u, p.n - 4u);
    var c0_0 = vec4<f32>(0.0); var c0_1 = vec4<f32>(0.0);
    var c1_0 = vec4<f32>(0.0); var c1_1 = vec4<f32>(0.0);
    var c2_0 = vec4<f32>(0.0); var c2_1 = vec4<f32>(0.0);
    var c3_0 = vec4<f32>(0.0); var c3_1 = vec4<f32>(0.0);
    var c4_0 = vec4<f32>(0.0); var c4_1 = vec4<f32>(0.0);
    var c5_0 = vec4<f32>(0.0); var c5_1 = vec4<f32>(0.0);
    var c6_0 = vec4<f32>(0.0); var c6_1 = vec4<f32>(0.0);
    var c7_0 = vec4<f32>(0.0); var c7_1 = vec4<f32>(0.0);
    var c8_0 = vec4<f32>(0.0); var c8_1 = vec4<f32>(0.0);
    var c9_0 = vec4<f32>(0.0); var c9_1 = vec4<f32>(0.0);
    var c10_0 = vec4<f32>(0.0); var c10_1 = vec4<f32>(0.0);
    var c11_0 = vec4<f32>(0.0); var c11_1 = vec4<f32>(0.0);
    var c12_0 = vec4<f32>(0.0); var c12_1 = vec4<f32>(0.0);
    var c13_0 = vec4<f32>(0.0); var c13_1 = vec4<f32>(0.0);
    var c14_0 = vec4<f32>(0.0); var c14_1 = vec4<f32>(0.0);
    var c15_0 = vec4<f32>(0.0); var c15_1 = vec4<f32>(0.0);
    var c16_0 = vec4<f32>(0.0); var c16_1 = vec4<f32>(0.0);
    var c17_0 = vec4<f32>(0.0); var c17_1 = vec4<f32>(0.0);
    var c18_0 = vec4<f32>(0.0); var c18_1 = vec4<f32>(0.0);
    var c19_0 = vec4<f32>(0.0); var c19_1 = vec4<f32>(0.0);
    var c20_0 = vec4<f32>(0.0); var c20_1 = vec4<f32>(0.0);
    var c21_0 = vec4<f32>(0.0); var c21_1 = vec4<f32>(0.0);
    var c22_0 = vec4<f32>(0.0); var c22_1 = vec4<f32>(0.0);
    var c23_0 = vec4<f32>(0.0); var c23_1 = vec4<f32>(0.0);
    var c24_0 = vec4<f32>(0.0); var c24_1 = vec4<f32>(0.0);
    var c25_0 = vec4<f32>(0.0); var c25_1 = vec4<f32>(0.0);
    var c26_0 = vec4<f32>(0.0); var c26_1 = vec4<f32>(0.0);
    var c27_0 = vec4<f32>(0.0); var c27_1 = vec4<f32>(0.0);
    var c28_0 = vec4<f32>(0.0); var c28_1 = vec4<f32>(0.0);
    var c29_0 = vec4<f32>(0.0); var c29_1 = vec4<f32>(0.0);
    var c30_0 = vec4<f32>(0.0); var c30_1 = vec4<f32>(0.0);
    var c31_0 = vec4<f32>(0.0); var c31_1 = vec4<f32>(0.0);
    for (var k = 0u; k < p.k; k += 4u) {
        let rk0 = (k + 0u) * p.r_sk;
        let b0_0 = rhs4_nn(c0, rk0, k + 0u); let b0_1 = rhs4_nn(c1, rk0, k + 0u);
        let rk1 = (k + 1u) * p.r_sk;
        let b1_0 = rhs4_nn(c0, rk1, k + 1u); let b1_1 = rhs4_nn(c1, rk1, k + 1u);
        let rk2 = (k + 2u) * p.r_sk;
        let b2_0 = rhs4_nn(c0, rk2, k + 2u); let b2_1 = rhs4_nn(c1, rk2, k + 2u);
        let rk3 = (k + 3u) * p.r_sk;
        let b3_0 = rhs4_nn(c0, rk3, k + 3u); let b3_1 = rhs4_nn(c1, rk3, k + 3u);
        let rows0 = fetch_rows(lbase, m0 + 0u, lane, k);
        { let a = rows0[0];
          c0_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c0_0))));
          c0_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c0_1)))); }
        { let a = rows0[1];
          c1_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c1_0))));
          c1_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c1_1)))); }
        { let a = rows0[2];
          c2_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c2_0))));
          c2_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c2_1)))); }
        { let a = rows0[3];
          c3_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c3_0))));
          c3_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c3_1)))); }
        { let a = rows0[4];
          c4_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c4_0))));
          c4_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c4_1)))); }
        { let a = rows0[5];
          c5_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c5_0))));
          c5_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c5_1)))); }
        { let a = rows0[6];
          c6_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c6_0))));
          c6_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c6_1)))); }
        { let a = rows0[7];
          c7_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c7_0))));
          c7_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c7_1)))); }
        let rows1 = fetch_rows(lbase, m0 + 8u, lane, k);
        { let a = rows1[0];
          c8_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c8_0))));
          c8_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c8_1)))); }
        { let a = rows1[1];
          c9_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c9_0))));
          c9_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c9_1)))); }
        { let a = rows1[2];
          c10_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c10_0))));
          c10_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c10_1)))); }
        { let a = rows1[3];
          c11_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c11_0))));
          c11_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c11_1)))); }
        { let a = rows1[4];
          c12_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c12_0))));
          c12_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c12_1)))); }
        { let a = rows1[5];
          c13_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c13_0))));
          c13_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c13_1)))); }
        { let a = rows1[6];
          c14_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c14_0))));
          c14_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c14_1)))); }
        { let a = rows1[7];
          c15_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c15_0))));
          c15_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c15_1)))); }
        let rows2 = fetch_rows(lbase, m0 + 16u, lane, k);
        { let a = rows2[0];
          c16_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c16_0))));
          c16_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c16_1)))); }
        { let a = rows2[1];
          c17_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c17_0))));
          c17_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c17_1)))); }
        { let a = rows2[2];
          c18_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c18_0))));
          c18_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c18_1)))); }
        { let a = rows2[3];
          c19_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c19_0))));
          c19_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c19_1)))); }
        { let a = rows2[4];
          c20_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c20_0))));
          c20_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c20_1)))); }
        { let a = rows2[5];
          c21_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c21_0))));
          c21_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c21_1)))); }
        { let a = rows2[6];
          c22_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c22_0))));
          c22_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c22_1)))); }
        { let a = rows2[7];
          c23_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c23_0))));
          c23_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c23_1)))); }
        let rows3 = fetch_rows(lbase, m0 + 24u, lane, k);
        { let a = rows3[0];
          c24_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c24_0))));
          c24_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c24_1)))); }
        { let a = rows3[1];
          c25_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c25_0))));
          c25_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c25_1)))); }
        { let a = rows3[2];
          c26_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c26_0))));
          c26_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c26_1)))); }
        { let a = rows3[3];
          c27_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c27_0))));
          c27_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c27_1)))); }
        { let a = rows3[4];
          c28_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c28_0))));
          c28_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c28_1)))); }
        { let a = rows3[5];
          c29_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c29_0))));
          c29_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c29_1)))); }
        { let a = rows3[6];
          c30_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c30_0))));
          c30_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c30_1)))); }
        { let a = rows3[7];
          c31_0 = fma(vec4<f32>(a.w), b3_0, fma(vec4<f32>(a.z), b2_0, fma(vec4<f32>(a.y), b1_0, fma(vec4<f32>(a.x), b0_0, c31_0))));
          c31_1 = fma(vec4<f32>(a.w), b3_1, fma(vec4<f32>(a.z), b2_1, fma(vec4<f32>(a.y), b1_1, fma(vec4<f32>(a.x), b0_1, c31_1)))); }
    }
    store8v(b, m0 + 0u, n0, c0_0, c0_1);
    store8v(b, m0 + 1u, n0, c1_0, c1_1);
    store8v(b, m0 + 2u, n0, c2_0, c2_1);
    store8v(b, m0 + 3u, n0, c3_0, c3_1);
    store8v(b, m0 + 4u, n0, c4_0, c4_1);
    store8v(b, m0 + 5u, n0, c5_0, c5_1);
    store8v(b, m0 + 6u, n0, c6_0, c6_1);
    store8v(b, m0 + 7u, n0, c7_0, c7_1);
    store8v(b, m0 + 8u, n0, c8_0, c8_1);
    store8v(b, m0 + 9u, n0, c9_0, c9_1);
    store8v(b, m0 + 10u, n0, c10_0, c10_1);
    store8v(b, m0 + 11u, n0, c11_0, c11_1);
    store8v(b, m0 + 12u, n0, c12_0, c12_1);
    store8v(b, m0 + 13u, n0, c13_0, c13_1);
    store8v(b, m0 + 14u, n0, c14_0, c14_1);
    store8v(b, m0 + 15u, n0, c15_0, c15_1);
    store8v(b, m0 + 16u, n0, c16_0, c16_1);
    store8v(b, m0 + 17u, n0, c17_0, c17_1);
    store8v(b, m0 + 18u, n0, c18_0, c18_1);
    store8v(b, m0 + 19u, n0, c19_0, c19_1);
    store8v(b, m0 + 20u, n0, c20_0, c20_1);
    store8v(b, m0 + 21u, n0, c21_0, c21_1);
    store8v(b, m0 + 22u, n0, c22_0, c22_1);
    store8v(b, m0 + 23u, n0, c23_0, c23_1);
    store8v(b, m0 + 24u, n0, c24_0, c24_1);
    store8v(b, m0 + 25u, n0, c25_0, c25_1);
    store8v(b, m0 + 26u, n0, c26_0, c26_1);
    store8v(b, m0 + 27u, n0, c27_0, c27_1);
    store8v(b, m0 + 28u, n0, c28_0, c28_1);
    store8v(b, m0 + 29u, n0, c29_0, c29_1);
    store8v(b, m0 + 30u, n0, c30_0, c30_1);
    store8v(b, m0 + 31u, n0, c31_0, c31_1);
}

// Tiled kernel, rhs K-contiguous (the Linear weight layout).
fn tiled_nt(wid: vec3<u32>, lane: u32) {
    let m0 = wid.y * FTM;
    let n0 = (wid.x * 8u + lane) * 8u;
    let b = wid.z;
    let lbase = b * p.l_sb;
    let rbase = b * p.r_sb;
    let cn0 = min(n0 + 0u, p.n - 1u);
    let ro0 = rbase + cn0 * p.r_sn;
    let cn1 = min(n0 + 1u, p.n - 1u);
    let ro1 = rbase + cn1 * p.r_sn;
    let cn2 = min(n0 + 2u, p.n - 1u);
    let ro2 = rbase + cn2 * p.r_sn;
    let cn3 = min(n0 + 3u, p.n - 1u);
    let ro3 = rbase + cn3 * p.r_sn;
    let cn4 = min(n0 + 4u, p.n - 1u);
    let ro4 = rbase + cn4 * p.r_sn;
    let cn5 = min(n0 + 5u, p.n - 1u);
    let ro5 = rbase + cn5 * p.r_sn;
    let cn6 = min(n0 + 6u, p.n - 1u);
    let ro6 = rbase + cn6 * p.r_sn;
    let cn7 = min(n0 + 7u, p.n - 1u);
    let ro7 = rbase + cn7 * p.r_sn;
    var c0_0 = vec4<f32>(0.0); var c0_1 = vec4<f32>(0.0);
    var c1_0 = vec4<f32>(0.0); var c1_1 = vec4<f32>(0.0);
    var c2_0 = vec4<f32>(0.0); var c2_1 = vec4<f32>(0.0);
    var c3_0 = vec4<f32>(0.0); var c3_1 = vec4<f32>(0.0);
    var c4_0 = vec4<f32>(0.0); var c4_1 = vec4<f32>(0.0);
    var c5_0 = vec4<f32>(0.0); var c5_1 = vec4<f32>(0.0);
    var c6_0 = vec4<f32>(0.0); var c6_1 = vec4<f32>(0.0);
    var c7_0 = vec4<f32>(0.0); var c7_1 = vec4<f32>(0.0);
    var c8_0 = vec4<f32>(0.0); var c8_1 = vec4<f32>(0.0);
    var c9_0 = vec4<f32>(0.0); var c9_1 = vec4<f32>(0.0);
    var c10_0 = vec4<f32>(0.0); var c10_1 = vec4<f32>(0.0);
    var c11_0 = vec4<f32>(0.0); var c11_1 = vec4<f32>(0.0);
    var c12_0 = vec4<f32>(0.0); var c12_1 = vec4<f32>(0.0);
    var c13_0 = vec4<f32>(0.0); var c13_1 = vec4<f32>(0.0);
    var c14_0 = vec4<f32>(0.0); var c14_1 = vec4<f32>(0.0);
    var c15_0 = vec4<f32>(0.0); var c15_1 = vec4<f32>(0.0);
    var c16_0 = vec4<f32>(0.0); var c16_1 = vec4<f32>(0.0);
    var c17_0 = vec4<f32>(0.0); var c17_1 = vec4<f32>(0.0);
    var c18_0 = vec4<f32>(0.0); var c18_1 = vec4<f32>(0.0);
    var c19_0 = vec4<f32>(0.0); var c19_1 = vec4<f32>(0.0);
    var c20_0 = vec4<f32>(0.0); var c20_1 = vec4<f32>(0.0);
    var c21_0 = vec4<f32>(0.0); var c21_1 = vec4<f32>(0.0);
    var c22_0 = vec4<f32>(0.0); var c22_1 = vec4<f32>(0.0);
    var c23_0 = vec4<f32>(0.0); var c23_1 = vec4<f32>(0.0);
    var c24_0 = vec4<f32>(0.0); var c24_1 = vec4<f32>(0.0);
    var c25_0 = vec4<f32>(0.0); var c25_1 = vec4<f32>(0.0);
    var c26_0 = vec4<f32>(0.0); var c26_1 = vec4<f32>(0.0);
    var c27_0 = vec4<f32>(0.0); var c27_1 = vec4<f32>(0.0);
    var c28_0 = vec4<f32>(0.0); var c28_1 = vec4<f32>(0.0);
    var c29_0 = vec4<f32>(0.0); var c29_1 = vec4<f32>(0.0);
    var c30_0 = vec4<f32>(0.0); var c30_1 = vec4<f32>(0.0);
    var c31_0 = vec4<f32>(0.0); var c31_1 = vec4<f32>(0.0);
    for (var k = 0u; k < p.k; k += 4u) {
        let b0 = rhs4_nt(ro0, cn0, k);
        let b1 = rhs4_nt(ro1, cn1, k);
        let b2 = rhs4_nt(ro2, cn2, k);
        let b3 = rhs4_nt(ro3, cn3, k);
        let b4 = rhs4_nt(ro4, cn4, k);
        let b5 = rhs4_nt(ro5, cn5, k);
        let b6 = rhs4_nt(ro6, cn6, k);
        let b7 = rhs4_nt(ro7, cn7, k);
        let rows0 = fetch_rows(lbase, m0 + 0u, lane, k);
        { let a = rows0[0];
          c0_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c0_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows0[1];
          c1_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c1_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows0[2];
          c2_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c2_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows0[3];
          c3_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c3_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows0[4];
          c4_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c4_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows0[5];
          c5_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c5_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows0[6];
          c6_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c6_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows0[7];
          c7_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c7_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        let rows1 = fetch_rows(lbase, m0 + 8u, lane, k);
        { let a = rows1[0];
          c8_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c8_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows1[1];
          c9_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c9_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows1[2];
          c10_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c10_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows1[3];
          c11_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c11_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows1[4];
          c12_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c12_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows1[5];
          c13_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c13_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows1[6];
          c14_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c14_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows1[7];
          c15_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c15_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        let rows2 = fetch_rows(lbase, m0 + 16u, lane, k);
        { let a = rows2[0];
          c16_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c16_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows2[1];
          c17_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c17_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows2[2];
          c18_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c18_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows2[3];
          c19_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c19_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows2[4];
          c20_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c20_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows2[5];
          c21_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c21_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows2[6];
          c22_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c22_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows2[7];
          c23_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c23_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        let rows3 = fetch_rows(lbase, m0 + 24u, lane, k);
        { let a = rows3[0];
          c24_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c24_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows3[1];
          c25_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c25_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows3[2];
          c26_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c26_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows3[3];
          c27_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c27_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows3[4];
          c28_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c28_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows3[5];
          c29_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c29_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows3[6];
          c30_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c30_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
        { let a = rows3[7];
          c31_0 += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
          c31_1 += vec4<f32>(dot(a, b4), dot(a, b5), dot(a, b6), dot(a, b7)); }
    }
    store8v(b, m0 + 0u, n0, c0_0, c0_1);
    store8v(b, m0 + 1u, n0, c1_0, c1_1);
    store8v(b, m0 + 2u, n0, c2_0, c2_1);
    store8v(b, m0 + 3u, n0, c3_0, c3_1);
    store8v(b, m0 + 4u, n0, c4_0, c4_1);
    store8v(b, m0 + 5u, n0, c5_0, c5_1);
    store8v(b, m0 + 6u, n0, c6_0, c6_1);
    store8v(b, m0 + 7u, n0, c7_0, c7_1);
    store8v(b, m0 + 8u, n0, c8_0, c8_1);
    store8v(b, m0 + 9u, n0, c9_0, c9_1);
    store8v(b, m0 + 10u, n0, c10_0, c10_1);
    store8v(b, m0 + 11u, n0, c11_0, c11_1);
    store8v(b, m0 + 12u, n0, c12_0, c12_1);
    store8v(b, m0 + 13u, n0, c13_0, c13_1);
    store8v(b, m0 + 14u, n0, c14_0, c14_1);
    store8v(b, m0 + 15u, n0, c15_0, c15_1);
    store8v(b, m0 + 16u, n0, c16_0, c16_1);
    store8v(b, m0 + 17u, n0, c17_0, c17_1);
    store8v(b, m0 + 18u, n0, c18_0, c18_1);
    store8v(b, m0 + 19u, n0, c19_0, c19_1);
    store8v(b, m0 + 20u, n0, c20_0, c20_1);
    store8v(b, m0 + 21u, n0, c21_0, c21_1);
    store8v(b, m0 + 22u, n0, c22_0, c22_1);
    store8v(b, m0 + 23u, n0, c23_0, c23_1);
    store8v(b, m0 + 24u, n0, c24_0, c24_1);
    store8v(b, m0 + 25u, n0, c25_0, c25_1);
    store8v(b, m0 + 26u, n0, c26_0, c26_1);
    store8v(b, m0 + 27u, n0, c27_0, c27_1);
    store8v(b, m0 + 28u, n0, c28_0, c28_1);
    store8v(b, m0 + 29u, n0, c29_0, c29_1);
    store8v(b, m0 + 30u, n0, c30_0, c30_1);
    store8v(b, m0 + 31u, n0, c31_0, c31_1);
}

// Tiled kernel, lhs M-contiguous (a gradient's transposed operand), rhs N-contiguous; one k per step.
fn tiled_tn(wid: vec3<u32>, lane: u32) {
    let m0 = wid.y * FTM;
    let n0 = (wid.x * 8u + lane) * 8u;
    let b = wid.z;
    let lbase = b * p.l_sb;
    let rbase = b * p.r_sb;
    let c0 = rbase + min(n0, p.n - 4u);
    let c1 = rbase + min(n0 + 4u, p.n - 4u);
    var c0_0 = vec4<f32>(0.0); var c0_1 = vec4<f32>(0.0);
    var c1_0 = vec4<f32>(0.0); var c1_1 = vec4<f32>(0.0);
    var c2_0 = vec4<f32>(0.0); var c2_1 = vec4<f32>(0.0);
    var c3_0 = vec4<f32>(0.0); var c3_1 = vec4<f32>(0.0);
    var c4_0 = vec4<f32>(0.0); var c4_1 = vec4<f32>(0.0);
    var c5_0 = vec4<f32>(0.0); var c5_1 = vec4<f32>(0.0);
    var c6_0 = vec4<f32>(0.0); var c6_1 = vec4<f32>(0.0);
    var c7_0 = vec4<f32>(0.0); var c7_1 = vec4<f32>(0.0);
    var c8_0 = vec4<f32>(0.0); var c8_1 = vec4<f32>(0.0);
    var c9_0 = vec4<f32>(0.0); var c9_1 = vec4<f32>(0.0);
    var c10_0 = vec4<f32>(0.0); var c10_1 = vec4<f32>(0.0);
    var c11_0 = vec4<f32>(0.0); var c11_1 = vec4<f32>(0.0);
    var c12_0 = vec4<f32>(0.0); var c12_1 = vec4<f32>(0.0);
    var c13_0 = vec4<f32>(0.0); var c13_1 = vec4<f32>(0.0);
    var c14_0 = vec4<f32>(0.0); var c14_1 = vec4<f32>(0.0);
    var c15_0 = vec4<f32>(0.0); var c15_1 = vec4<f32>(0.0);
    var c16_0 = vec4<f32>(0.0); var c16_1 = vec4<f32>(0.0);
    var c17_0 = vec4<f32>(0.0); var c17_1 = vec4<f32>(0.0);
    var c18_0 = vec4<f32>(0.0); var c18_1 = vec4<f32>(0.0);
    var c19_0 = vec4<f32>(0.0); var c19_1 = vec4<f32>(0.0);
    var c20_0 = vec4<f32>(0.0); var c20_1 = vec4<f32>(0.0);
    var c21_0 = vec4<f32>(0.0); var c21_1 = vec4<f32>(0.0);
    var c22_0 = vec4<f32>(0.0); var c22_1 = vec4<f32>(0.0);
    var c23_0 = vec4<f32>(0.0); var c23_1 = vec4<f32>(0.0);
    var c24_0 = vec4<f32>(0.0); var c24_1 = vec4<f32>(0.0);
    var c25_0 = vec4<f32>(0.0); var c25_1 = vec4<f32>(0.0);
    var c26_0 = vec4<f32>(0.0); var c26_1 = vec4<f32>(0.0);
    var c27_0 = vec4<f32>(0.0); var c27_1 = vec4<f32>(0.0);
    var c28_0 = vec4<f32>(0.0); var c28_1 = vec4<f32>(0.0);
    var c29_0 = vec4<f32>(0.0); var c29_1 = vec4<f32>(0.0);
    var c30_0 = vec4<f32>(0.0); var c30_1 = vec4<f32>(0.0);
    var c31_0 = vec4<f32>(0.0); var c31_1 = vec4<f32>(0.0);
    for (var k = 0u; k < p.k; k++) {
        let rk = k * p.r_sk;
        let b_0 = load_rhs4(c0 + rk); let b_1 = load_rhs4(c1 + rk);
        let cols = fetch_cols(lbase + k * p.l_sk, m0, lane);
        { let a = cols[0];
          c0_0 = fma(vec4<f32>(a.x), b_0, c0_0); c0_1 = fma(vec4<f32>(a.x), b_1, c0_1);
          c1_0 = fma(vec4<f32>(a.y), b_0, c1_0); c1_1 = fma(vec4<f32>(a.y), b_1, c1_1);
          c2_0 = fma(vec4<f32>(a.z), b_0, c2_0); c2_1 = fma(vec4<f32>(a.z), b_1, c2_1);
          c3_0 = fma(vec4<f32>(a.w), b_0, c3_0); c3_1 = fma(vec4<f32>(a.w), b_1, c3_1); }
        { let a = cols[1];
          c4_0 = fma(vec4<f32>(a.x), b_0, c4_0); c4_1 = fma(vec4<f32>(a.x), b_1, c4_1);
          c5_0 = fma(vec4<f32>(a.y), b_0, c5_0); c5_1 = fma(vec4<f32>(a.y), b_1, c5_1);
          c6_0 = fma(vec4<f32>(a.z), b_0, c6_0); c6_1 = fma(vec4<f32>(a.z), b_1, c6_1);
          c7_0 = fma(vec4<f32>(a.w), b_0, c7_0); c7_1 = fma(vec4<f32>(a.w), b_1, c7_1); }
        { let a = cols[2];
          c8_0 = fma(vec4<f32>(a.x), b_0, c8_0); c8_1 = fma(vec4<f32>(a.x), b_1, c8_1);
          c9_0 = fma(vec4<f32>(a.y), b_0, c9_0); c9_1 = fma(vec4<f32>(a.y), b_1, c9_1);
          c10_0 = fma(vec4<f32>(a.z), b_0, c10_0); c10_1 = fma(vec4<f32>(a.z), b_1, c10_1);
          c11_0 = fma(vec4<f32>(a.w), b_0, c11_0); c11_1 = fma(vec4<f32>(a.w), b_1, c11_1); }
        { let a = cols[3];
          c12_0 = fma(vec4<f32>(a.x), b_0, c12_0); c12_1 = fma(vec4<f32>(a.x), b_1, c12_1);
          c13_0 = fma(vec4<f32>(a.y), b_0, c13_0); c13_1 = fma(vec4<f32>(a.y), b_1, c13_1);
          c14_0 = fma(vec4<f32>(a.z), b_0, c14_0); c14_1 = fma(vec4<f32>(a.z), b_1, c14_1);
          c15_0 = fma(vec4<f32>(a.w), b_0, c15_0); c15_1 = fma(vec4<f32>(a.w), b_1, c15_1); }
        { let a = cols[4];
          c16_0 = fma(vec4<f32>(a.x), b_0, c16_0); c16_1 = fma(vec4<f32>(a.x), b_1, c16_1);
          c17_0 = fma(vec4<f32>(a.y), b_0, c17_0); c17_1 = fma(vec4<f32>(a.y), b_1, c17_1);
          c18_0 = fma(vec4<f32>(a.z), b_0, c18_0); c18_1 = fma(vec4<f32>(a.z), b_1, c18_1);
          c19_0 = fma(vec4<f32>(a.w), b_0, c19_0); c19_1 = fma(vec4<f32>(a.w), b_1, c19_1); }
        { let a = cols[5];
          c20_0 = fma(vec4<f32>(a.x), b_0, c20_0); c20_1 = fma(vec4<f32>(a.x), b_1, c20_1);
          c21_0 = fma(vec4<f32>(a.y), b_0, c21_0); c21_1 = fma(vec4<f32>(a.y), b_1, c21_1);
          c22_0 = fma(vec4<f32>(a.z), b_0, c22_0); c22_1 = fma(vec4<f32>(a.z), b_1, c22_1);
          c23_0 = fma(vec4<f32>(a.w), b_0, c23_0); c23_1 = fma(vec4<f32>(a.w), b_1, c23_1); }
        { let a = cols[6];
          c24_0 = fma(vec4<f32>(a.x), b_0, c24_0); c24_1 = fma(vec4<f32>(a.x), b_1, c24_1);
          c25_0 = fma(vec4<f32>(a.y), b_0, c25_0); c25_1 = fma(vec4<f32>(a.y), b_1, c25_1);
          c26_0 = fma(vec4<f32>(a.z), b_0, c26_0); c26_1 = fma(vec4<f32>(a.z), b_1, c26_1);
          c27_0 = fma(vec4<f32>(a.w), b_0, c27_0); c27_1 = fma(vec4<f32>(a.w), b_1, c27_1); }
        { let a = cols[7];
          c28_0 = fma(vec4<f32>(a.x), b_0, c28_0); c28_1 = fma(vec4<f32>(a.x), b_1, c28_1);
          c29_0 = fma(vec4<f32>(a.y), b_0, c29_0); c29_1 = fma(vec4<f32>(a.y), b_1, c29_1);
          c30_0 = fma(vec4<f32>(a.z), b_0, c30_0); c30_1 = fma(vec4<f32>(a.z), b_1, c30_1);
          c31_0 = fma(vec4<f32>(a.w), b_0, c31_0); c31_1 = fma(vec4<f32>(a.w), b_1, c31_1); }
    }
    store8v(b, m0 + 0u, n0, c0_0, c0_1);
    store8v(b, m0 + 1u, n0, c1_0, c1_1);
    store8v(b, m0 + 2u, n0, c2_0, c2_1);
    store8v(b, m0 + 3u, n0, c3_0, c3_1);
    store8v(b, m0 + 4u, n0, c4_0, c4_1);
    store8v(b, m0 + 5u, n0, c5_0, c5_1);
    store8v(b, m0 + 6u, n0, c6_0, c6_1);
    store8v(b, m0 + 7u, n0, c7_0, c7_1);
    store8v(b, m0 + 8u, n0, c8_0, c8_1);
    store8v(b, m0 + 9u, n0, c9_0, c9_1);
    store8v(b, m0 + 10u, n0, c10_0, c10_1);
    store8v(b, m0 + 11u, n0, c11_0, c11_1);
    store8v(b, m0 + 12u, n0, c12_0, c12_1);
    store8v(b, m0 + 13u, n0, c13_0, c13_1);
    store8v(b, m0 + 14u, n0, c14_0, c14_1);
    store8v(b, m0 + 15u, n0, c15_0, c15_1);
    store8v(b, m0 + 16u, n0, c16_0, c16_1);
    store8v(b, m0 + 17u, n0, c17_0, c17_1);
    store8v(b, m0 + 18u, n0, c18_0, c18_1);
    store8v(b, m0 + 19u, n0, c19_0, c19_1);
    store8v(b, m0 + 20u, n0, c20_0, c20_1);
    store8v(b, m0 + 21u, n0, c21_0, c21_1);
    store8v(b, m0 + 22u, n0, c22_0, c22_1);
    store8v(b, m0 + 23u, n0, c23_0, c23_1);
    store8v(b, m0 + 24u, n0, c24_0, c24_1);
    store8v(b, m0 + 25u, n0, c25_0, c25_1);
    store8v(b, m0 + 26u, n0, c26_0, c26_1);
    store8v(b, m0 + 27u, n0, c27_0, c27_1);
    store8v(b, m0 + 28u, n0, c28_0, c28_1);
    store8v(b, m0 + 29u, n0, c29_0, c29_1);
    store8v(b, m0 + 30u, n0, c30_0, c30_1);
    store8v(b, m0 + 31u, n0, c31_0, c31_1);
}

// The three ops share one body; separate entry points keep the names of the ops they serve.
@compute @workgroup_size(WGX, WGY)
fn matmul_forward(@builtin(global_invocation_id) gid: vec3<u32>) { mm_general(gid); }
@compute @workgroup_size(WGX, WGY)
fn matmul_backward_input(@builtin(global_invocation_id) gid: vec3<u32>) { mm_general(gid); }
@compute @workgroup_size(WGX, WGY)
fn matmul_backward_weight(@builtin(global_invocation_id) gid: vec3<u32>) { mm_general(gid); }

// Tiled entry points: a workgroup is one team of 8 lanes (one subgroup on lavapipe) covering FTM rows and
// 64 columns; N % 4 = 0, out rows contiguous, all strides multiples of 4. "nn": lhs K-contiguous, rhs
// N-contiguous, K % 4 = 0; "nt": lhs and rhs K-contiguous (a Linear weight), K % 4 = 0; "tn": lhs
// M-contiguous (the transposed activations of a weight gradient), rhs N-contiguous, M % 4 = 0.
@compute @workgroup_size(8)
fn matmul_tiled_nn(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    tiled_nn(wid, lid);
}
@compute @workgroup_size(8)
fn matmul_tiled_tn(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    tiled_tn(wid, lid);
}
@compute @workgroup_size(8)
fn matmul_tiled_nt(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    tiled_nt(wid, lid);
}
