// Fused multi-head attention (flash-attention style): forward with an online softmax, backward that
// recomputes the probabilities from the saved log-sum-exp. Memory stays linear in the sequence length: no
// T x S score matrix is ever stored.
//
// Layouts: q/out/dout/dq [B, T, NH, HS]; k/v/dk/dv [B, S, NKV, HS]; lse/delta [B, NH, T]; mask [B, S].
// Query head h reads kv head h / (NH / NKV) (grouped-query attention).
//
// One invocation owns one row (a query row in the forward and dQ kernels, a key row in the dK/dV kernel)
// and keeps its head vectors in registers. A workgroup holds consecutive rows of the same (batch, head), so
// the rows it streams over (keys, or queries) and the loop bounds are workgroup-uniform: no barrier or shared
// memory is needed, and subgroup operations stay in uniform control flow. Per-lane causal/padding
// visibility is applied as a select, never as divergent control flow.
//
// The prelude declares `const HS4: u32` (head size / 4) and the broadcast helpers bc0..bc7 (vec4) and
// bcf0..bcf7 (f32) used by the subgroup variants at the end: subgroupBroadcast from lane i in the subgroup
// specialization, never-dispatched stand-ins in the plain one (so that it compiles without subgroups).
//
// Plain variant (discrete GPUs, any device): one invocation per row, WG rows per workgroup, every lane reads
// the same streamed row, which a GPU serves as one broadcast load.

struct Params {
    b: u32, t: u32, s: u32, nh: u32,
    nkv: u32, causal: u32, has_mask: u32, scale_bits: u32,
    neg_inf_bits: u32, _p0: u32, _p1: u32, _p2: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
// When there is no padding mask the launcher binds another read-only tensor here and sets has_mask = 0.
@group(0) @binding(4) var<storage, read> mask: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> lse: array<f32>;
@group(0) @binding(7) var<storage, read> dout: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read> out_in: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read> lse_in: array<f32>;
@group(0) @binding(10) var<storage, read_write> delta: array<f32>;
@group(0) @binding(11) var<storage, read> delta_in: array<f32>;
@group(0) @binding(12) var<storage, read_write> dq: array<vec4<f32>>;
@group(0) @binding(13) var<storage, read_write> dk: array<vec4<f32>>;
@group(0) @binding(14) var<storage, read_write> dv: array<vec4<f32>>;

override WG: u32 = 8u;
// Keys per online-softmax step: the running output is rescaled once per block rather than once per key.
const KB: u32 = 8u;
// Below any real score; marks an excluded key inside a block (exp of it underflows to 0).
const NEG_BIG: f32 = -3.0e38;

// Exclusive end of the keys query row `t` sees under the causal rule j <= t + (S - T), clamped to [0, S].
fn causal_end(t: u32) -> u32 {
    return u32(clamp(i32(t) + i32(p.s) - i32(p.t) + 1, 0, i32(p.s)));
}

fn hsum(a: vec4<f32>) -> f32 {
    return a.x + a.y + a.z + a.w;
}

fn key_kept(b: u32, j: u32) -> bool {
    if (p.has_mask != 0u) {
        return mask[b * p.s + j] != 0.0;
    }
    return true;
}

@compute @workgroup_size(WG)
fn attention_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.y;
    let b = wid.z;
    let t0 = wid.x * WG;
    let t = t0 + lid;
    let tc = min(t, p.t - 1u);
    let kh = h / (p.nh / p.nkv);
    let scale = bitcast<f32>(p.scale_bits);

    var qr: array<vec4<f32>, HS4>;
    let qbase = ((b * p.t + tc) * p.nh + h) * HS4;
    for (var c = 0u; c < HS4; c++) { qr[c] = q[qbase + c] * scale; }

    // jend bounds the keys any lane of this workgroup may see (uniform); my_end is this lane's own bound.
    var jend = p.s;
    var my_end = p.s;
    if (p.causal != 0u) {
        jend = causal_end(min(t0 + WG - 1u, p.t - 1u));
        my_end = causal_end(tc);
    }

    var o: array<vec4<f32>, HS4>;
    var m = NEG_BIG;
    var l = 0.0;
    for (var j0 = 0u; j0 < jend; j0 += KB) {
        var sc: array<f32, KB>;
        var bm = m;
        for (var i = 0u; i < KB; i++) {
            let j = j0 + i;
            let jc = min(j, p.s - 1u);
            let kb = ((b * p.s + jc) * p.nkv + kh) * HS4;
            var acc = vec4<f32>(0.0);
            for (var c = 0u; c < HS4; c++) { acc = fma(qr[c], k[kb + c], acc); }
            let kept = key_kept(b, jc);
            let ok = kept && j < my_end;
            let s = select(NEG_BIG, acc.x + acc.y + acc.z + acc.w, ok);
            sc[i] = s;
            bm = max(bm, s);
        }
        let corr = exp(m - bm);
        l *= corr;
        for (var c = 0u; c < HS4; c++) { o[c] *= corr; }
        for (var i = 0u; i < KB; i++) {
            let jc = min(j0 + i, p.s - 1u);
            let vb = ((b * p.s + jc) * p.nkv + kh) * HS4;
            let pi = select(0.0, exp(sc[i] - bm), sc[i] > NEG_BIG);
            l += pi;
            for (var c = 0u; c < HS4; c++) { o[c] = fma(vec4<f32>(pi), v[vb + c], o[c]); }
        }
        m = bm;
    }

    if (t < p.t) {
        let inv = select(0.0, 1.0 / l, l > 0.0);
        for (var c = 0u; c < HS4; c++) { out[qbase + c] = o[c] * inv; }
        lse[(b * p.nh + h) * p.t + t] = select(bitcast<f32>(p.neg_inf_bits), m + log(l), l > 0.0);
    }
}

// dQ = scale * sum_j P_tj (dP_tj - D_t) k_j, with dP_tj = dO_t . v_j and D_t = dO_t . O_t, which this kernel
// also writes to `delta` for the dK/dV kernel that runs after it.
@compute @workgroup_size(WG)
fn attention_backward_query(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.y;
    let b = wid.z;
    let t0 = wid.x * WG;
    let t = t0 + lid;
    let tc = min(t, p.t - 1u);
    let kh = h / (p.nh / p.nkv);
    let scale = bitcast<f32>(p.scale_bits);

    var qr: array<vec4<f32>, HS4>;
    var dor: array<vec4<f32>, HS4>;
    let qbase = ((b * p.t + tc) * p.nh + h) * HS4;
    var dacc = vec4<f32>(0.0);
    for (var c = 0u; c < HS4; c++) {
        qr[c] = q[qbase + c] * scale;
        dor[c] = dout[qbase + c];
        dacc = fma(dor[c], out_in[qbase + c], dacc);
    }
    let d_t = dacc.x + dacc.y + dacc.z + dacc.w;
    let row = (b * p.nh + h) * p.t + tc;
    let lse_t = lse_in[row];
    if (t < p.t) { delta[row] = d_t; }

    var jend = p.s;
    var my_end = p.s;
    if (p.causal != 0u) {
        jend = causal_end(min(t0 + WG - 1u, p.t - 1u));
        my_end = causal_end(tc);
    }

    var g: array<vec4<f32>, HS4>;
    for (var j = 0u; j < jend; j++) {
        let kb = ((b * p.s + j) * p.nkv + kh) * HS4;
        var sacc = vec4<f32>(0.0);
        var pacc = vec4<f32>(0.0);
        for (var c = 0u; c < HS4; c++) {
            sacc = fma(qr[c], k[kb + c], sacc);
            pacc = fma(dor[c], v[kb + c], pacc);
        }
        // A visible key implies the row saw at least one key, so lse_t is finite wherever it is used.
        let kept = key_kept(b, j);
        let ok = kept && j < my_end;
        let pj = select(0.0, exp(sacc.x + sacc.y + sacc.z + sacc.w - lse_t), ok);
        let ds = pj * (pacc.x + pacc.y + pacc.z + pacc.w - d_t);
        for (var c = 0u; c < HS4; c++) { g[c] = fma(vec4<f32>(ds), k[kb + c], g[c]); }
    }

    if (t < p.t) {
        for (var c = 0u; c < HS4; c++) { dq[qbase + c] = g[c] * scale; }
    }
}

// dV_j = sum_{h in group, t} P_tj dO_t and dK_j = scale * sum_{h in group, t} P_tj (dP_tj - D_t) q_t: one
// invocation per key row, looping over every query head that shares its kv head, so the GQA sum needs no
// atomics and is deterministic.
@compute @workgroup_size(WG)
fn attention_backward_key_value(@builtin(workgroup_id) wid: vec3<u32>,
                                @builtin(local_invocation_index) lid: u32) {
    let kh = wid.y;
    let b = wid.z;
    let j0 = wid.x * WG;
    let j = j0 + lid;
    let jc = min(j, p.s - 1u);
    let group = p.nh / p.nkv;
    let scale = bitcast<f32>(p.scale_bits);

    var kr: array<vec4<f32>, HS4>;
    var vr: array<vec4<f32>, HS4>;
    let kbase = ((b * p.s + jc) * p.nkv + kh) * HS4;
    for (var c = 0u; c < HS4; c++) {
        kr[c] = k[kbase + c] * scale;
        vr[c] = v[kbase + c];
    }
    let kept = key_kept(b, jc);

    // Causal: query t sees key j iff t >= j + T - S. tstart is the first query any lane here needs.
    var tstart = 0u;
    var my_start = 0u;
    if (p.causal != 0u) {
        tstart = u32(clamp(i32(j0) + i32(p.t) - i32(p.s), 0, i32(p.t)));
        my_start = u32(clamp(i32(jc) + i32(p.t) - i32(p.s), 0, i32(p.t)));
    }

    var gk: array<vec4<f32>, HS4>;
    var gv: array<vec4<f32>, HS4>;
    for (var hh = 0u; hh < group; hh++) {
        let h = kh * group + hh;
        for (var t = tstart; t < p.t; t++) {
            let qb = ((b * p.t + t) * p.nh + h) * HS4;
            let row = (b * p.nh + h) * p.t + t;
            var sacc = vec4<f32>(0.0);
            var pacc = vec4<f32>(0.0);
            for (var c = 0u; c < HS4; c++) {
                sacc = fma(kr[c], q[qb + c], sacc);
                pacc = fma(vr[c], dout[qb + c], pacc);
            }
            let ok = kept && t >= my_start;
            let pj = select(0.0, exp(sacc.x + sacc.y + sacc.z + sacc.w - lse_in[row]), ok);
            let ds = pj * (pacc.x + pacc.y + pacc.z + pacc.w - delta_in[row]);
            for (var c = 0u; c < HS4; c++) {
                gv[c] = fma(vec4<f32>(pj), dout[qb + c], gv[c]);
                gk[c] = fma(vec4<f32>(ds), q[qb + c], gk[c]);
            }
        }
    }

    if (j < p.s) {
        for (var c = 0u; c < HS4; c++) {
            dk[kbase + c] = gk[c] * scale;
            dv[kbase + c] = gv[c];
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Subgroup variants (lavapipe). The workgroup is one subgroup of 8 lanes and each lane owns RB rows (prelude
// const), rows r * 8 + lane of the workgroup's block. Inside a loop lavapipe turns every storage load into a
// per-lane scalar loop, so rather than each lane loading the same streamed row, lane i loads row (block start
// + i) and the rows are shared with subgroupBroadcast (bc0..bc7 / bcf0..bcf7); each broadcast value then feeds
// the RB rows of the lane, which amortises the broadcast (itself not free on lavapipe). These kernels take the
// 8 invocations of a workgroup to be lanes 0..7 of one subgroup (the launcher asks for subgroups of at least 8).
// The per-key steps are written out for keys 0..7: broadcast lanes must be constants, and a dynamically
// indexed array costs per-lane scratch memory on lavapipe.

@compute @workgroup_size(8)
fn attention_forward_subgroup(@builtin(workgroup_id) wid: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32) {
    let h = wid.y;
    let b = wid.z;
    let t0 = wid.x * 8u * RB;
    let kh = h / (p.nh / p.nkv);
    let scale = bitcast<f32>(p.scale_bits);

    var qr: array<array<vec4<f32>, HS4>, RB>;
    var my_end: array<u32, RB>;
    for (var r = 0u; r < RB; r++) {
        let tc = min(t0 + r * 8u + lid, p.t - 1u);
        let qbase = ((b * p.t + tc) * p.nh + h) * HS4;
        for (var c = 0u; c < HS4; c++) { qr[r][c] = q[qbase + c] * scale; }
        my_end[r] = select(p.s, causal_end(tc), p.causal != 0u);
    }
    let jend = select(p.s, causal_end(min(t0 + 8u * RB - 1u, p.t - 1u)), p.causal != 0u);

    var o: array<array<vec4<f32>, HS4>, RB>;
    var m: array<f32, RB>;
    var l: array<f32, RB>;
    for (var r = 0u; r < RB; r++) { m[r] = NEG_BIG; }
    for (var j0 = 0u; j0 < jend; j0 += 8u) {
        let jl = min(j0 + lid, p.s - 1u);
        let kb = ((b * p.s + jl) * p.nkv + kh) * HS4;
        let keep = select(0.0, 1.0, key_kept(b, jl));
        let kp = array<f32, 8>(bcf0(keep), bcf1(keep), bcf2(keep), bcf3(keep), bcf4(keep), bcf5(keep), bcf6(keep), bcf7(keep));
        var a: array<array<f32, 8>, RB>;
        for (var c = 0u; c < HS4; c++) {
            let kc = k[kb + c];
            let kk = array<vec4<f32>, 8>(bc0(kc), bc1(kc), bc2(kc), bc3(kc), bc4(kc), bc5(kc), bc6(kc), bc7(kc));
            for (var r = 0u; r < RB; r++) {
                let qc = qr[r][c];
                a[r][0] += dot(qc, kk[0]);
                a[r][1] += dot(qc, kk[1]);
                a[r][2] += dot(qc, kk[2]);
                a[r][3] += dot(qc, kk[3]);
                a[r][4] += dot(qc, kk[4]);
                a[r][5] += dot(qc, kk[5]);
                a[r][6] += dot(qc, kk[6]);
                a[r][7] += dot(qc, kk[7]);
            }
        }
        var corr: array<f32, RB>;
        for (var r = 0u; r < RB; r++) {
            var bm = m[r];
            for (var i = 0u; i < 8u; i++) {
                let s = select(NEG_BIG, a[r][i], kp[i] != 0.0 && j0 + i < my_end[r]);
                a[r][i] = s;
                bm = max(bm, s);
            }
            corr[r] = exp(m[r] - bm);
            var lr = l[r] * corr[r];
            for (var i = 0u; i < 8u; i++) {
                let pi = select(0.0, exp(a[r][i] - bm), a[r][i] > NEG_BIG);
                a[r][i] = pi;
                lr += pi;
            }
            l[r] = lr;
            m[r] = bm;
        }
        for (var c = 0u; c < HS4; c++) {
            let vc = v[kb + c];
            let vv = array<vec4<f32>, 8>(bc0(vc), bc1(vc), bc2(vc), bc3(vc), bc4(vc), bc5(vc), bc6(vc), bc7(vc));
            for (var r = 0u; r < RB; r++) {
                var acc = o[r][c] * corr[r];
                acc = fma(vec4<f32>(a[r][0]), vv[0], acc);
                acc = fma(vec4<f32>(a[r][1]), vv[1], acc);
                acc = fma(vec4<f32>(a[r][2]), vv[2], acc);
                acc = fma(vec4<f32>(a[r][3]), vv[3], acc);
                acc = fma(vec4<f32>(a[r][4]), vv[4], acc);
                acc = fma(vec4<f32>(a[r][5]), vv[5], acc);
                acc = fma(vec4<f32>(a[r][6]), vv[6], acc);
                acc = fma(vec4<f32>(a[r][7]), vv[7], acc);
                o[r][c] = acc;
            }
        }
    }

    for (var r = 0u; r < RB; r++) {
        let t = t0 + r * 8u + lid;
        if (t < p.t) {
            let qbase = ((b * p.t + t) * p.nh + h) * HS4;
            let inv = select(0.0, 1.0 / l[r], l[r] > 0.0);
            for (var c = 0u; c < HS4; c++) { out[qbase + c] = o[r][c] * inv; }
            lse[(b * p.nh + h) * p.t + t] = select(bitcast<f32>(p.neg_inf_bits), m[r] + log(l[r]), l[r] > 0.0);
        }
    }
}

@compute @workgroup_size(8)
fn attention_backward_query_subgroup(@builtin(workgroup_id) wid: vec3<u32>,
                                     @builtin(local_invocation_index) lid: u32) {
    let h = wid.y;
    let b = wid.z;
    let t0 = wid.x * 8u * RB;
    let kh = h / (p.nh / p.nkv);
    let scale = bitcast<f32>(p.scale_bits);

    var qr: array<array<vec4<f32>, HS4>, RB>;
    var dor: array<array<vec4<f32>, HS4>, RB>;
    var d_t: array<f32, RB>;
    var lse_t: array<f32, RB>;
    var my_end: array<u32, RB>;
    for (var r = 0u; r < RB; r++) {
        let t = t0 + r * 8u + lid;
        let tc = min(t, p.t - 1u);
        let qbase = ((b * p.t + tc) * p.nh + h) * HS4;
        var dacc = 0.0;
        for (var c = 0u; c < HS4; c++) {
            qr[r][c] = q[qbase + c] * scale;
            dor[r][c] = dout[qbase + c];
            dacc += dot(dor[r][c], out_in[qbase + c]);
        }
        d_t[r] = dacc;
        let row = (b * p.nh + h) * p.t + tc;
        lse_t[r] = lse_in[row];
        if (t < p.t) { delta[row] = dacc; }
        my_end[r] = select(p.s, causal_end(tc), p.causal != 0u);
    }
    let jend = select(p.s, causal_end(min(t0 + 8u * RB - 1u, p.t - 1u)), p.causal != 0u);

    var g: array<array<vec4<f32>, HS4>, RB>;
    for (var j0 = 0u; j0 < jend; j0 += 8u) {
        let jl = min(j0 + lid, p.s - 1u);
        let kb = ((b * p.s + jl) * p.nkv + kh) * HS4;
        let keep = select(0.0, 1.0, key_kept(b, jl));
        let kp = array<f32, 8>(bcf0(keep), bcf1(keep), bcf2(keep), bcf3(keep), bcf4(keep), bcf5(keep), bcf6(keep), bcf7(keep));
        var kl: array<vec4<f32>, HS4>;
        var sa: array<array<f32, 8>, RB>;
        var pa: array<array<f32, 8>, RB>;
        for (var c = 0u; c < HS4; c++) {
            let kc = k[kb + c];
            let vc = v[kb + c];
            kl[c] = kc;
            let kk = array<vec4<f32>, 8>(bc0(kc), bc1(kc), bc2(kc), bc3(kc), bc4(kc), bc5(kc), bc6(kc), bc7(kc));
            let vv = array<vec4<f32>, 8>(bc0(vc), bc1(vc), bc2(vc), bc3(vc), bc4(vc), bc5(vc), bc6(vc), bc7(vc));
            for (var r = 0u; r < RB; r++) {
                let qc = qr[r][c];
                let dc = dor[r][c];
                sa[r][0] += dot(qc, kk[0]);
                sa[r][1] += dot(qc, kk[1]);
                sa[r][2] += dot(qc, kk[2]);
                sa[r][3] += dot(qc, kk[3]);
                sa[r][4] += dot(qc, kk[4]);
                sa[r][5] += dot(qc, kk[5]);
                sa[r][6] += dot(qc, kk[6]);
                sa[r][7] += dot(qc, kk[7]);
                pa[r][0] += dot(dc, vv[0]);
                pa[r][1] += dot(dc, vv[1]);
                pa[r][2] += dot(dc, vv[2]);
                pa[r][3] += dot(dc, vv[3]);
                pa[r][4] += dot(dc, vv[4]);
                pa[r][5] += dot(dc, vv[5]);
                pa[r][6] += dot(dc, vv[6]);
                pa[r][7] += dot(dc, vv[7]);
            }
        }
        // A visible key implies the row saw at least one key, so lse_t is finite wherever it is used.
        for (var r = 0u; r < RB; r++) {
            for (var i = 0u; i < 8u; i++) {
                let pj = select(0.0, exp(sa[r][i] - lse_t[r]), kp[i] != 0.0 && j0 + i < my_end[r]);
                sa[r][i] = pj * (pa[r][i] - d_t[r]);
            }
        }
        for (var c = 0u; c < HS4; c++) {
            let kc = kl[c];
            let kk = array<vec4<f32>, 8>(bc0(kc), bc1(kc), bc2(kc), bc3(kc), bc4(kc), bc5(kc), bc6(kc), bc7(kc));
            for (var r = 0u; r < RB; r++) {
                var acc = g[r][c];
                acc = fma(vec4<f32>(sa[r][0]), kk[0], acc);
                acc = fma(vec4<f32>(sa[r][1]), kk[1], acc);
                acc = fma(vec4<f32>(sa[r][2]), kk[2], acc);
                acc = fma(vec4<f32>(sa[r][3]), kk[3], acc);
                acc = fma(vec4<f32>(sa[r][4]), kk[4], acc);
                acc = fma(vec4<f32>(sa[r][5]), kk[5], acc);
                acc = fma(vec4<f32>(sa[r][6]), kk[6], acc);
                acc = fma(vec4<f32>(sa[r][7]), kk[7], acc);
                g[r][c] = acc;
            }
        }
    }

    for (var r = 0u; r < RB; r++) {
        let t = t0 + r * 8u + lid;
        if (t < p.t) {
            let qbase = ((b * p.t + t) * p.nh + h) * HS4;
            for (var c = 0u; c < HS4; c++) { dq[qbase + c] = g[r][c] * scale; }
        }
    }
}

@compute @workgroup_size(8)
fn attention_backward_key_value_subgroup(@builtin(workgroup_id) wid: vec3<u32>,
                                         @builtin(local_invocation_index) lid: u32) {
    let kh = wid.y;
    let b = wid.z;
    let j0 = wid.x * 8u * RB;
    let group = p.nh / p.nkv;
    let scale = bitcast<f32>(p.scale_bits);

    var kr: array<array<vec4<f32>, HS4>, RB>;
    var vr: array<array<vec4<f32>, HS4>, RB>;
    var kept: array<bool, RB>;
    var my_start: array<u32, RB>;
    for (var r = 0u; r < RB; r++) {
        let jc = min(j0 + r * 8u + lid, p.s - 1u);
        let kbase = ((b * p.s + jc) * p.nkv + kh) * HS4;
        for (var c = 0u; c < HS4; c++) {
            kr[r][c] = k[kbase + c] * scale;
            vr[r][c] = v[kbase + c];
        }
        kept[r] = key_kept(b, jc);
        // Causal: query t sees key j iff t >= j + T - S.
        my_start[r] = select(0u, u32(clamp(i32(jc) + i32(p.t) - i32(p.s), 0, i32(p.t))), p.causal != 0u);
    }
    let tstart = select(0u, u32(clamp(i32(j0) + i32(p.t) - i32(p.s), 0, i32(p.t))), p.causal != 0u);

    var gk: array<array<vec4<f32>, HS4>, RB>;
    var gv: array<array<vec4<f32>, HS4>, RB>;
    for (var hh = 0u; hh < group; hh++) {
        let h = kh * group + hh;
        for (var t0 = tstart; t0 < p.t; t0 += 8u) {
            let tl = min(t0 + lid, p.t - 1u);
            let qb = ((b * p.t + tl) * p.nh + h) * HS4;
            let row = (b * p.nh + h) * p.t + tl;
            let lse_l = lse_in[row];
            let d_l = delta_in[row];
            let ls = array<f32, 8>(bcf0(lse_l), bcf1(lse_l), bcf2(lse_l), bcf3(lse_l), bcf4(lse_l), bcf5(lse_l), bcf6(lse_l), bcf7(lse_l));
            let dd = array<f32, 8>(bcf0(d_l), bcf1(d_l), bcf2(d_l), bcf3(d_l), bcf4(d_l), bcf5(d_l), bcf6(d_l), bcf7(d_l));
            var ql: array<vec4<f32>, HS4>;
            var dl: array<vec4<f32>, HS4>;
            var sa: array<array<f32, 8>, RB>;
            var pa: array<array<f32, 8>, RB>;
            for (var c = 0u; c < HS4; c++) {
                let qc = q[qb + c];
                let dc = dout[qb + c];
                ql[c] = qc;
                dl[c] = dc;
                let qq = array<vec4<f32>, 8>(bc0(qc), bc1(qc), bc2(qc), bc3(qc), bc4(qc), bc5(qc), bc6(qc), bc7(qc));
                let oo = array<vec4<f32>, 8>(bc0(dc), bc1(dc), bc2(dc), bc3(dc), bc4(dc), bc5(dc), bc6(dc), bc7(dc));
                for (var r = 0u; r < RB; r++) {
                    let kc = kr[r][c];
                    let vc = vr[r][c];
                    sa[r][0] += dot(kc, qq[0]);
                    sa[r][1] += dot(kc, qq[1]);
                    sa[r][2] += dot(kc, qq[2]);
                    sa[r][3] += dot(kc, qq[3]);
                    sa[r][4] += dot(kc, qq[4]);
                    sa[r][5] += dot(kc, qq[5]);
                    sa[r][6] += dot(kc, qq[6]);
                    sa[r][7] += dot(kc, qq[7]);
                    pa[r][0] += dot(vc, oo[0]);
                    pa[r][1] += dot(vc, oo[1]);
                    pa[r][2] += dot(vc, oo[2]);
                    pa[r][3] += dot(vc, oo[3]);
                    pa[r][4] += dot(vc, oo[4]);
                    pa[r][5] += dot(vc, oo[5]);
                    pa[r][6] += dot(vc, oo[6]);
                    pa[r][7] += dot(vc, oo[7]);
                }
            }
            for (var r = 0u; r < RB; r++) {
                for (var i = 0u; i < 8u; i++) {
                    let t = t0 + i;
                    let ok = kept[r] && t < p.t && t >= my_start[r];
                    let pj = select(0.0, exp(sa[r][i] - ls[i]), ok);
                    sa[r][i] = pj;
                    pa[r][i] = pj * (pa[r][i] - dd[i]);
                }
            }
            for (var c = 0u; c < HS4; c++) {
                let qq = array<vec4<f32>, 8>(bc0(ql[c]), bc1(ql[c]), bc2(ql[c]), bc3(ql[c]), bc4(ql[c]), bc5(ql[c]), bc6(ql[c]), bc7(ql[c]));
                let oo = array<vec4<f32>, 8>(bc0(dl[c]), bc1(dl[c]), bc2(dl[c]), bc3(dl[c]), bc4(dl[c]), bc5(dl[c]), bc6(dl[c]), bc7(dl[c]));
                for (var r = 0u; r < RB; r++) {
                    var ak = gk[r][c];
                    var av = gv[r][c];
                    av = fma(vec4<f32>(sa[r][0]), oo[0], av);
                    av = fma(vec4<f32>(sa[r][1]), oo[1], av);
                    av = fma(vec4<f32>(sa[r][2]), oo[2], av);
                    av = fma(vec4<f32>(sa[r][3]), oo[3], av);
                    av = fma(vec4<f32>(sa[r][4]), oo[4], av);
                    av = fma(vec4<f32>(sa[r][5]), oo[5], av);
                    av = fma(vec4<f32>(sa[r][6]), oo[6], av);
                    av = fma(vec4<f32>(sa[r][7]), oo[7], av);
                    ak = fma(vec4<f32>(pa[r][0]), qq[0], ak);
                    ak = fma(vec4<f32>(pa[r][1]), qq[1], ak);
                    ak = fma(vec4<f32>(pa[r][2]), qq[2], ak);
                    ak = fma(vec4<f32>(pa[r][3]), qq[3], ak);
                    ak = fma(vec4<f32>(pa[r][4]), qq[4], ak);
                    ak = fma(vec4<f32>(pa[r][5]), qq[5], ak);
                    ak = fma(vec4<f32>(pa[r][6]), qq[6], ak);
                    ak = fma(vec4<f32>(pa[r][7]), qq[7], ak);
                    gk[r][c] = ak;
                    gv[r][c] = av;
                }
            }
        }
    }

    for (var r = 0u; r < RB; r++) {
        let j = j0 + r * 8u + lid;
        if (j < p.s) {
            let kbase = ((b * p.s + j) * p.nkv + kh) * HS4;
            for (var c = 0u; c < HS4; c++) {
                dk[kbase + c] = gk[r][c] * scale;
                dv[kbase + c] = gv[r][c];
            }
        }
    }
}
