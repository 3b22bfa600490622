// Batched matrix products out = alpha * lhs · rhs (+ bias) (+ out when accumulating), the one kernel behind
// matmul forward, both matmul backwards and every LoRA product. Transposes, batching and gradient layouts are
// all expressed as element strides, so the launcher maps each op onto this one shape:
//   out[b, m, n] = alpha * sum_{kb, k} lhs[b, kb, m, k] * rhs[b, kb, k, n]
// where kb is an outer reduction over batches (the batch sum of a shared weight's gradient).
// lhs and out are f32; rhs is f32, f16 or bf16, read through `load_rhs` / `load_rhs4` from the prelude, which
// also supplies `bias_at` and the team sharing `share_rows` (subgroupBroadcast or nothing).
//
// Two kernels: `mm_general` (any strides, 8x8 register tile per invocation, scalar loads) and the tiled
// kernel for K-contiguous lhs and 4-aligned shapes (vec4 loads, a team of 8 lanes sharing the lhs rows).
// Neither uses workgroup memory or barriers: on lavapipe loads dominate and barriers cost a coroutine switch.

struct Params {
    m: u32, n: u32, k: u32, batch: u32,
    l_sm: u32, l_sk: u32, l_sb: u32, l_skb: u32,
    r_sk: u32, r_sn: u32, r_sb: u32, r_skb: u32,
    o_sm: u32, o_sn: u32, o_sb: u32, kb: u32,
    alpha: u32, accumulate: u32, _p0: u32, _p1: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> lhs: array<f32>;
// binding 2: rhs (prelude), read by load_rhs
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// binding 4: bias (prelude, optional), read by bias_at
@group(0) @binding(5) var<storage, read> lhs4: array<vec4<f32>>;
// binding 6: rhs as 4-element groups (prelude), read by load_rhs4
@group(0) @binding(7) var<storage, read_write> out4: array<vec4<f32>>;

override WGX: u32 = 8u;
override WGY: u32 = 8u;

// Register tiles size private arrays, which WGSL requires to be const, hence const rather than override.
const GTM: u32 = 8u;  // general kernel: rows per invocation
const GTN: u32 = 8u;  // general kernel: columns per invocation (two vec4 accumulators per row)

fn finish(o: u32, n: u32, v: f32) -> f32 {
    var r = bitcast<f32>(p.alpha) * v + bias_at(n);
    if (p.accumulate != 0u) { r += out[o]; }
    return r;
}

fn mm_general(gid: vec3<u32>) {
    let m0 = gid.y * GTM;
    let n0 = gid.x * GTN;
    let b = gid.z;
    if (m0 >= p.m || n0 >= p.n || b >= p.batch) { return; }
    // Out-of-range rows and columns load a clamped (valid) element and are not stored.
    var loff: array<u32, GTM>;
    for (var i = 0u; i < GTM; i++) { loff[i] = b * p.l_sb + min(m0 + i, p.m - 1u) * p.l_sm; }
    var roff: array<u32, GTN>;
    for (var j = 0u; j < GTN; j++) { roff[j] = b * p.r_sb + min(n0 + j, p.n - 1u) * p.r_sn; }
    var acc: array<vec4<f32>, 16>;  // GTM * GTN / 4
    for (var i = 0u; i < 16u; i++) { acc[i] = vec4<f32>(0.0); }
    for (var kb = 0u; kb < p.kb; kb++) {
        for (var k = 0u; k < p.k; k++) {
            let lk = kb * p.l_skb + k * p.l_sk;
            let rk = kb * p.r_skb + k * p.r_sk;
            let b0 = vec4<f32>(load_rhs(roff[0] + rk), load_rhs(roff[1] + rk), load_rhs(roff[2] + rk), load_rhs(roff[3] + rk));
            let b1 = vec4<f32>(load_rhs(roff[4] + rk), load_rhs(roff[5] + rk), load_rhs(roff[6] + rk), load_rhs(roff[7] + rk));
            for (var i = 0u; i < GTM; i++) {
                let a = vec4<f32>(lhs[loff[i] + lk]);
                acc[2u * i] = fma(a, b0, acc[2u * i]);
                acc[2u * i + 1u] = fma(a, b1, acc[2u * i + 1u]);
            }
        }
    }
    for (var i = 0u; i < GTM; i++) {
        let m = m0 + i;
        if (m >= p.m) { break; }
        for (var j = 0u; j < GTN; j++) {
            let n = n0 + j;
            if (n >= p.n) { break; }
            let o = b * p.o_sb + m * p.o_sm + n * p.o_sn;
            out[o] = finish(o, n, acc[2u * i + j / 4u][j % 4u]);
        }
    }
}

// The three ops share one body; separate entry points keep the names of the ops they serve.
@compute @workgroup_size(WGX, WGY)
fn matmul_forward(@builtin(global_invocation_id) gid: vec3<u32>) { mm_general(gid); }
@compute @workgroup_size(WGX, WGY)
fn matmul_backward_input(@builtin(global_invocation_id) gid: vec3<u32>) { mm_general(gid); }
@compute @workgroup_size(WGX, WGY)
fn matmul_backward_weight(@builtin(global_invocation_id) gid: vec3<u32>) { mm_general(gid); }

// ------------------------------------------------------------------ tiled kernel (vec4, team-shared rows)
// A workgroup is one team of 8 lanes (one subgroup on lavapipe). The team owns FTM rows; lane l owns the
// FTN columns starting at (wid.x * 8 + l) * FTN. Per 4-step of k, lane l loads the lhs rows
// m0 + TEAM*j + l (TEAM = 8 with subgroups, 1 without) and `share_rows` hands every lane all of them.
// Requires: lhs K-contiguous (l_sk = 1) with l_sm, l_sb multiple of 4, K % 4 = 0, N % 4 = 0, out
// contiguous rows; rhs either N-contiguous ("nn": r_sn = 1) or K-contiguous ("nt": r_sk = 1).

const FTM: u32 = 32u;  // rows per team
const FTN: u32 = 8u;   // columns per lane
var<private> facc: array<vec4<f32>, 64>;  // FTM * FTN / 4
var<private> fb: array<vec4<f32>, 8>;     // nn: rhs rows k..k+3, two vec4 each; nt: 8 columns, 4 k each

fn row_nn(r: u32, a: vec4<f32>) {
    let i = 2u * r;
    facc[i] = fma(vec4<f32>(a.w), fb[6], fma(vec4<f32>(a.z), fb[4], fma(vec4<f32>(a.y), fb[2], fma(vec4<f32>(a.x), fb[0], facc[i]))));
    facc[i + 1u] = fma(vec4<f32>(a.w), fb[7], fma(vec4<f32>(a.z), fb[5], fma(vec4<f32>(a.y), fb[3], fma(vec4<f32>(a.x), fb[1], facc[i + 1u]))));
}

fn row_nt(r: u32, a: vec4<f32>) {
    let i = 2u * r;
    facc[i] += vec4<f32>(dot(a, fb[0]), dot(a, fb[1]), dot(a, fb[2]), dot(a, fb[3]));
    facc[i + 1u] += vec4<f32>(dot(a, fb[4]), dot(a, fb[5]), dot(a, fb[6]), dot(a, fb[7]));
}

fn tiled_store(m0: u32, n0: u32, b: u32) {
    for (var r = 0u; r < FTM; r++) {
        let m = m0 + r;
        if (m >= p.m) { break; }
        for (var q = 0u; q < 2u; q++) {
            let n = n0 + 4u * q;
            if (n >= p.n) { break; }
            let o = b * p.o_sb + m * p.o_sm + n;
            var v = bitcast<f32>(p.alpha) * facc[2u * r + q]
                + vec4<f32>(bias_at(n), bias_at(n + 1u), bias_at(n + 2u), bias_at(n + 3u));
            if (p.accumulate != 0u) { v += out4[o >> 2u]; }
            out4[o >> 2u] = v;
        }
    }
}

// Lanes past N keep running: their lhs loads feed the team.
fn tiled(wid: vec3<u32>, lid: u32, nt: bool) {
    let m0 = wid.y * FTM;
    let n0 = (wid.x * 8u + lid) * FTN;
    let b = wid.z;
    let lane = lid % TEAM;
    for (var i = 0u; i < 64u; i++) { facc[i] = vec4<f32>(0.0); }
    let lbase = b * p.l_sb;
    let rbase = b * p.r_sb;
    for (var k = 0u; k < p.k; k += 4u) {
        if (nt) {
            for (var c = 0u; c < 8u; c++) {
                fb[c] = load_rhs4(rbase + min(n0 + c, p.n - 1u) * p.r_sn + k);
            }
        } else {
            let c0 = min(n0, p.n - 4u);
            let c1 = min(n0 + 4u, p.n - 4u);
            for (var kk = 0u; kk < 4u; kk++) {
                let rk = rbase + (k + kk) * p.r_sk;
                fb[2u * kk] = load_rhs4(rk + c0);
                fb[2u * kk + 1u] = load_rhs4(rk + c1);
            }
        }
        for (var j = 0u; j < FTM / TEAM; j++) {
            let row = min(m0 + TEAM * j + lane, p.m - 1u);
            let rows = share_rows(lhs4[(lbase + row * p.l_sm + k) >> 2u]);
            for (var s = 0u; s < TEAM; s++) {
                if (nt) { row_nt(TEAM * j + s, rows[s]); } else { row_nn(TEAM * j + s, rows[s]); }
            }
        }
    }
    tiled_store(m0, n0, b);
}

@compute @workgroup_size(8)
fn matmul_tiled_nn(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    tiled(wid, lid, false);
}
@compute @workgroup_size(8)
fn matmul_tiled_nt(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    tiled(wid, lid, true);
}
