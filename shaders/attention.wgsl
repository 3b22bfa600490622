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
// The prelude declares `const HS4: u32` (head size / 4); in the subgroup specialization it also holds the
// broadcast helpers bc0..bc7 (vec4) and bcf0..bcf7 (f32) and the generated subgroup kernels (see the end).
//
// Plain variant (discrete GPUs, any device): one invocation per row, WG rows per workgroup, every lane reads
// the same streamed row, which a GPU serves as one broadcast load.

struct Params {
    b: u32, t: u32, s: u32, nh: u32,
    nkv: u32, causal: u32, has_mask: u32, scale_bits: u32,
    neg_inf_bits: u32, window: u32, _p1: u32, _p2: u32,
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

// First key query row `t` sees: with a sliding window W (causal only; 0 = none) the rule adds
// j > t + (S - T) - W, so a query sees at most W keys, itself included.
fn window_start(t: u32) -> u32 {
    if (p.causal == 0u || p.window == 0u) {
        return 0u;
    }
    return u32(clamp(i32(t) + i32(p.s) - i32(p.t) - i32(p.window) + 1, 0, i32(p.s)));
}

// Exclusive end of the query rows that see key `j` under the sliding window: t < j + W + (T - S).
fn window_query_end(j: u32) -> u32 {
    if (p.causal == 0u || p.window == 0u) {
        return p.t;
    }
    return u32(clamp(i32(j) + i32(p.window) + i32(p.t) - i32(p.s), 0, i32(p.t)));
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
    let my_start = window_start(tc);

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
            let ok = kept && j < my_end && j >= my_start;
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
            // `!(s <= NEG_BIG)`: a NaN score is kept (the row turns NaN, as it should); only masked keys drop.
            let pi = select(0.0, exp(sc[i] - bm), !(sc[i] <= NEG_BIG));
            l += pi;
            for (var c = 0u; c < HS4; c++) { o[c] = fma(vec4<f32>(pi), v[vb + c], o[c]); }
        }
        m = bm;
    }

    if (t < p.t) {
        // only an exact 0 (no visible key) gives 0; a NaN sum stays NaN
        let inv = select(1.0 / l, 0.0, l == 0.0);
        for (var c = 0u; c < HS4; c++) { out[qbase + c] = o[c] * inv; }
        lse[(b * p.nh + h) * p.t + t] = select(m + log(l), bitcast<f32>(p.neg_inf_bits), l == 0.0);
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
    let my_start = window_start(tc);

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
        let ok = kept && j < my_end && j >= my_start;
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
    let my_tend = window_query_end(jc);

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
            let ok = kept && t >= my_start && t < my_tend;
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
// Subgroup variants (lavapipe): attention_forward_subgroup, attention_backward_query_subgroup and
// attention_backward_key_value_subgroup are generated per head size into the prelude by the launcher
// (crates/rime-kernels/src/ops/attention.rs) and use the declarations above. They compute the same as the
// plain kernels. The workgroup is one subgroup of 8 lanes and each lane owns R rows (rows r * 8 + lane of the
// workgroup's block). Inside a loop lavapipe turns every storage load into a per-lane scalar loop, so rather
// than each lane loading the same streamed row, lane i loads row (block start + i) and the rows are shared
// with subgroupBroadcast (bc0..bc7 / bcf0..bcf7, constant lanes); each broadcast value then feeds the R rows
// of the lane. Everything per row, per head chunk and per streamed row is written out as its own variable:
// lavapipe keeps an array indexed in a loop in per-lane scratch memory, and the looped form of these kernels
// ran at less than half the speed. These kernels take the 8 invocations of a workgroup to be lanes 0..7 of one
// subgroup (the launcher asks for subgroups of at least 8).
