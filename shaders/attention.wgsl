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
// Subgroup variants (lavapipe): the workgroup is one subgroup of 8 lanes. Inside a loop lavapipe turns every
// storage load into a per-lane scalar loop, so instead of each lane loading the same key row, lane i loads row
// (block start + i) and the rows are shared with subgroupBroadcast (helpers bc0..bc7 / bcf0..bcf7 from the
// prelude), which makes 8 keys (or queries) cost one load each per lane.

@compute @workgroup_size(8)
fn attention_forward_subgroup(@builtin(workgroup_id) wid: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32) {
    let h = wid.y;
    let b = wid.z;
    let t0 = wid.x * 8u;
    let t = t0 + lid;
    let tc = min(t, p.t - 1u);
    let kh = h / (p.nh / p.nkv);
    let scale = bitcast<f32>(p.scale_bits);

    var qr: array<vec4<f32>, HS4>;
    let qbase = ((b * p.t + tc) * p.nh + h) * HS4;
    for (var c = 0u; c < HS4; c++) { qr[c] = q[qbase + c] * scale; }

    var jend = p.s;
    var my_end = p.s;
    if (p.causal != 0u) {
        jend = causal_end(min(t0 + 7u, p.t - 1u));
        my_end = causal_end(tc);
    }

    var o: array<vec4<f32>, HS4>;
    var m = NEG_BIG;
    var l = 0.0;
    for (var j0 = 0u; j0 < jend; j0 += 8u) {
        let jl = min(j0 + lid, p.s - 1u);
        let kb = ((b * p.s + jl) * p.nkv + kh) * HS4;
        let keep = select(0.0, 1.0, key_kept(b, jl));
        var a: array<vec4<f32>, 8>;
        for (var c = 0u; c < HS4; c++) {
            let kc = k[kb + c];
            let qc = qr[c];
            a[0] = fma(qc, bc0(kc), a[0]);
            a[1] = fma(qc, bc1(kc), a[1]);
            a[2] = fma(qc, bc2(kc), a[2]);
            a[3] = fma(qc, bc3(kc), a[3]);
            a[4] = fma(qc, bc4(kc), a[4]);
            a[5] = fma(qc, bc5(kc), a[5]);
            a[6] = fma(qc, bc6(kc), a[6]);
            a[7] = fma(qc, bc7(kc), a[7]);
        }
        var sc: array<f32, 8>;
        sc[0] = select(NEG_BIG, hsum(a[0]), bcf0(keep) != 0.0 && j0 + 0u < my_end);
        sc[1] = select(NEG_BIG, hsum(a[1]), bcf1(keep) != 0.0 && j0 + 1u < my_end);
        sc[2] = select(NEG_BIG, hsum(a[2]), bcf2(keep) != 0.0 && j0 + 2u < my_end);
        sc[3] = select(NEG_BIG, hsum(a[3]), bcf3(keep) != 0.0 && j0 + 3u < my_end);
        sc[4] = select(NEG_BIG, hsum(a[4]), bcf4(keep) != 0.0 && j0 + 4u < my_end);
        sc[5] = select(NEG_BIG, hsum(a[5]), bcf5(keep) != 0.0 && j0 + 5u < my_end);
        sc[6] = select(NEG_BIG, hsum(a[6]), bcf6(keep) != 0.0 && j0 + 6u < my_end);
        sc[7] = select(NEG_BIG, hsum(a[7]), bcf7(keep) != 0.0 && j0 + 7u < my_end);
        var bm = m;
        for (var i = 0u; i < 8u; i++) { bm = max(bm, sc[i]); }
        let corr = exp(m - bm);
        var pr: array<f32, 8>;
        l *= corr;
        for (var i = 0u; i < 8u; i++) {
            pr[i] = select(0.0, exp(sc[i] - bm), sc[i] > NEG_BIG);
            l += pr[i];
        }
        for (var c = 0u; c < HS4; c++) {
            let vc = v[kb + c];
            var acc = o[c] * corr;
            acc = fma(vec4<f32>(pr[0]), bc0(vc), acc);
            acc = fma(vec4<f32>(pr[1]), bc1(vc), acc);
            acc = fma(vec4<f32>(pr[2]), bc2(vc), acc);
            acc = fma(vec4<f32>(pr[3]), bc3(vc), acc);
            acc = fma(vec4<f32>(pr[4]), bc4(vc), acc);
            acc = fma(vec4<f32>(pr[5]), bc5(vc), acc);
            acc = fma(vec4<f32>(pr[6]), bc6(vc), acc);
            acc = fma(vec4<f32>(pr[7]), bc7(vc), acc);
            o[c] = acc;
        }
        m = bm;
    }

    if (t < p.t) {
        let inv = select(0.0, 1.0 / l, l > 0.0);
        for (var c = 0u; c < HS4; c++) { out[qbase + c] = o[c] * inv; }
        lse[(b * p.nh + h) * p.t + t] = select(bitcast<f32>(p.neg_inf_bits), m + log(l), l > 0.0);
    }
}

@compute @workgroup_size(8)
fn attention_backward_query_subgroup(@builtin(workgroup_id) wid: vec3<u32>,
                                     @builtin(local_invocation_index) lid: u32) {
    let h = wid.y;
    let b = wid.z;
    let t0 = wid.x * 8u;
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
    let d_t = hsum(dacc);
    let row = (b * p.nh + h) * p.t + tc;
    let lse_t = lse_in[row];
    if (t < p.t) { delta[row] = d_t; }

    var jend = p.s;
    var my_end = p.s;
    if (p.causal != 0u) {
        jend = causal_end(min(t0 + 7u, p.t - 1u));
        my_end = causal_end(tc);
    }

    var g: array<vec4<f32>, HS4>;
    for (var j0 = 0u; j0 < jend; j0 += 8u) {
        let jl = min(j0 + lid, p.s - 1u);
        let kb = ((b * p.s + jl) * p.nkv + kh) * HS4;
        let keep = select(0.0, 1.0, key_kept(b, jl));
        var kl: array<vec4<f32>, HS4>;
        var sa: array<vec4<f32>, 8>;
        var pa: array<vec4<f32>, 8>;
        for (var c = 0u; c < HS4; c++) {
            let kc = k[kb + c];
            let vc = v[kb + c];
            kl[c] = kc;
            let qc = qr[c];
            let dc = dor[c];
            sa[0] = fma(qc, bc0(kc), sa[0]);
            sa[1] = fma(qc, bc1(kc), sa[1]);
            sa[2] = fma(qc, bc2(kc), sa[2]);
            sa[3] = fma(qc, bc3(kc), sa[3]);
            sa[4] = fma(qc, bc4(kc), sa[4]);
            sa[5] = fma(qc, bc5(kc), sa[5]);
            sa[6] = fma(qc, bc6(kc), sa[6]);
            sa[7] = fma(qc, bc7(kc), sa[7]);
            pa[0] = fma(dc, bc0(vc), pa[0]);
            pa[1] = fma(dc, bc1(vc), pa[1]);
            pa[2] = fma(dc, bc2(vc), pa[2]);
            pa[3] = fma(dc, bc3(vc), pa[3]);
            pa[4] = fma(dc, bc4(vc), pa[4]);
            pa[5] = fma(dc, bc5(vc), pa[5]);
            pa[6] = fma(dc, bc6(vc), pa[6]);
            pa[7] = fma(dc, bc7(vc), pa[7]);
        }
        // A visible key implies the row saw at least one key, so lse_t is finite wherever it is used.
        var ds: array<f32, 8>;
        ds[0] = select(0.0, exp(hsum(sa[0]) - lse_t), bcf0(keep) != 0.0 && j0 + 0u < my_end);
        ds[1] = select(0.0, exp(hsum(sa[1]) - lse_t), bcf1(keep) != 0.0 && j0 + 1u < my_end);
        ds[2] = select(0.0, exp(hsum(sa[2]) - lse_t), bcf2(keep) != 0.0 && j0 + 2u < my_end);
        ds[3] = select(0.0, exp(hsum(sa[3]) - lse_t), bcf3(keep) != 0.0 && j0 + 3u < my_end);
        ds[4] = select(0.0, exp(hsum(sa[4]) - lse_t), bcf4(keep) != 0.0 && j0 + 4u < my_end);
        ds[5] = select(0.0, exp(hsum(sa[5]) - lse_t), bcf5(keep) != 0.0 && j0 + 5u < my_end);
        ds[6] = select(0.0, exp(hsum(sa[6]) - lse_t), bcf6(keep) != 0.0 && j0 + 6u < my_end);
        ds[7] = select(0.0, exp(hsum(sa[7]) - lse_t), bcf7(keep) != 0.0 && j0 + 7u < my_end);
        for (var i = 0u; i < 8u; i++) { ds[i] = ds[i] * (hsum(pa[i]) - d_t); }
        for (var c = 0u; c < HS4; c++) {
            let kc = kl[c];
            var acc = g[c];
            acc = fma(vec4<f32>(ds[0]), bc0(kc), acc);
            acc = fma(vec4<f32>(ds[1]), bc1(kc), acc);
            acc = fma(vec4<f32>(ds[2]), bc2(kc), acc);
            acc = fma(vec4<f32>(ds[3]), bc3(kc), acc);
            acc = fma(vec4<f32>(ds[4]), bc4(kc), acc);
            acc = fma(vec4<f32>(ds[5]), bc5(kc), acc);
            acc = fma(vec4<f32>(ds[6]), bc6(kc), acc);
            acc = fma(vec4<f32>(ds[7]), bc7(kc), acc);
            g[c] = acc;
        }
    }

    if (t < p.t) {
        for (var c = 0u; c < HS4; c++) { dq[qbase + c] = g[c] * scale; }
    }
}

@compute @workgroup_size(8)
fn attention_backward_key_value_subgroup(@builtin(workgroup_id) wid: vec3<u32>,
                                         @builtin(local_invocation_index) lid: u32) {
    let kh = wid.y;
    let b = wid.z;
    let j0 = wid.x * 8u;
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
        for (var t0 = tstart; t0 < p.t; t0 += 8u) {
            let tl = min(t0 + lid, p.t - 1u);
            let qb = ((b * p.t + tl) * p.nh + h) * HS4;
            let row = (b * p.nh + h) * p.t + tl;
            let lse_l = lse_in[row];
            let d_l = delta_in[row];
            var ql: array<vec4<f32>, HS4>;
            var dl: array<vec4<f32>, HS4>;
            var sa: array<vec4<f32>, 8>;
            var pa: array<vec4<f32>, 8>;
            for (var c = 0u; c < HS4; c++) {
                let qc = q[qb + c];
                let dc = dout[qb + c];
                ql[c] = qc;
                dl[c] = dc;
                let kc = kr[c];
                let vc = vr[c];
                sa[0] = fma(kc, bc0(qc), sa[0]);
                sa[1] = fma(kc, bc1(qc), sa[1]);
                sa[2] = fma(kc, bc2(qc), sa[2]);
                sa[3] = fma(kc, bc3(qc), sa[3]);
                sa[4] = fma(kc, bc4(qc), sa[4]);
                sa[5] = fma(kc, bc5(qc), sa[5]);
                sa[6] = fma(kc, bc6(qc), sa[6]);
                sa[7] = fma(kc, bc7(qc), sa[7]);
                pa[0] = fma(vc, bc0(dc), pa[0]);
                pa[1] = fma(vc, bc1(dc), pa[1]);
                pa[2] = fma(vc, bc2(dc), pa[2]);
                pa[3] = fma(vc, bc3(dc), pa[3]);
                pa[4] = fma(vc, bc4(dc), pa[4]);
                pa[5] = fma(vc, bc5(dc), pa[5]);
                pa[6] = fma(vc, bc6(dc), pa[6]);
                pa[7] = fma(vc, bc7(dc), pa[7]);
            }
            var pr: array<f32, 8>;
            var ds: array<f32, 8>;
            pr[0] = select(0.0, exp(hsum(sa[0]) - bcf0(lse_l)), kept && t0 + 0u < p.t && t0 + 0u >= my_start);
            pr[1] = select(0.0, exp(hsum(sa[1]) - bcf1(lse_l)), kept && t0 + 1u < p.t && t0 + 1u >= my_start);
            pr[2] = select(0.0, exp(hsum(sa[2]) - bcf2(lse_l)), kept && t0 + 2u < p.t && t0 + 2u >= my_start);
            pr[3] = select(0.0, exp(hsum(sa[3]) - bcf3(lse_l)), kept && t0 + 3u < p.t && t0 + 3u >= my_start);
            pr[4] = select(0.0, exp(hsum(sa[4]) - bcf4(lse_l)), kept && t0 + 4u < p.t && t0 + 4u >= my_start);
            pr[5] = select(0.0, exp(hsum(sa[5]) - bcf5(lse_l)), kept && t0 + 5u < p.t && t0 + 5u >= my_start);
            pr[6] = select(0.0, exp(hsum(sa[6]) - bcf6(lse_l)), kept && t0 + 6u < p.t && t0 + 6u >= my_start);
            pr[7] = select(0.0, exp(hsum(sa[7]) - bcf7(lse_l)), kept && t0 + 7u < p.t && t0 + 7u >= my_start);
            ds[0] = pr[0] * (hsum(pa[0]) - bcf0(d_l));
            ds[1] = pr[1] * (hsum(pa[1]) - bcf1(d_l));
            ds[2] = pr[2] * (hsum(pa[2]) - bcf2(d_l));
            ds[3] = pr[3] * (hsum(pa[3]) - bcf3(d_l));
            ds[4] = pr[4] * (hsum(pa[4]) - bcf4(d_l));
            ds[5] = pr[5] * (hsum(pa[5]) - bcf5(d_l));
            ds[6] = pr[6] * (hsum(pa[6]) - bcf6(d_l));
            ds[7] = pr[7] * (hsum(pa[7]) - bcf7(d_l));
            for (var c = 0u; c < HS4; c++) {
                let qc = ql[c];
                let dc = dl[c];
                var ak = gk[c];
                var av = gv[c];
                av = fma(vec4<f32>(pr[0]), bc0(dc), av);
                av = fma(vec4<f32>(pr[1]), bc1(dc), av);
                av = fma(vec4<f32>(pr[2]), bc2(dc), av);
                av = fma(vec4<f32>(pr[3]), bc3(dc), av);
                av = fma(vec4<f32>(pr[4]), bc4(dc), av);
                av = fma(vec4<f32>(pr[5]), bc5(dc), av);
                av = fma(vec4<f32>(pr[6]), bc6(dc), av);
                av = fma(vec4<f32>(pr[7]), bc7(dc), av);
                ak = fma(vec4<f32>(ds[0]), bc0(qc), ak);
                ak = fma(vec4<f32>(ds[1]), bc1(qc), ak);
                ak = fma(vec4<f32>(ds[2]), bc2(qc), ak);
                ak = fma(vec4<f32>(ds[3]), bc3(qc), ak);
                ak = fma(vec4<f32>(ds[4]), bc4(qc), ak);
                ak = fma(vec4<f32>(ds[5]), bc5(qc), ak);
                ak = fma(vec4<f32>(ds[6]), bc6(qc), ak);
                ak = fma(vec4<f32>(ds[7]), bc7(qc), ak);
                gk[c] = ak;
                gv[c] = av;
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
