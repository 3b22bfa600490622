// Model-merging arithmetic (peft's add_weighted_adapter / mergekit semantics) over stacked inputs:
// xs [N, L] holds N task vectors (or models) of one tensor of L elements, row-major. Merging runs once per
// checkpoint, not per step, so reductions favour exactness and determinism over dispatch count: the top-k of
// magnitude pruning is an exact radix select over (|x| bits, index) keys, one counting pass per 4-bit digit.

struct Params { l: u32, rows: u32, parts: u32, k: u32, a: u32, b: u32, c: u32, d: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> xs: array<f32>;
@group(0) @binding(3) var<storage, read> wts: array<f32>;
@group(0) @binding(5) var<storage, read> mask: array<f32>;
@group(0) @binding(6) var<storage, read_write> state: array<u32>;
@group(0) @binding(7) var<storage, read_write> counts: array<u32>;
@group(0) @binding(8) var<storage, read> b_in: array<f32>;
@group(0) @binding(9) var<storage, read_write> sums: array<f32>;
@group(0) @binding(10) var<storage, read_write> coef: array<f32>;

override WG: u32 = 64u;

fn elem(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return flat_group(wid, nwg) * WG + lid;
}

// out[l] = sum_i w_i * xs[i, l], summed in row order like torch's (xs * w).sum(0).
@compute @workgroup_size(WG)
fn merge_weighted_sum_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32) {
    let l = elem(wid, nwg, lid);
    if (l >= p.l) { return; }
    var s = 0.0;
    for (var i = 0u; i < p.rows; i++) { s += wts[i] * xs[i * p.l + l]; }
    out[l] = s;
}

// TIES sign election and disjoint merge (peft calculate_majority_sign_mask + disjoint_merge). p.a = 1: the
// sign of the sum elects ("total"); 0: the sign of the count of signs ("frequency"); ties go to +1. p.b = 0:
// the election and the agreement test use the rows as given (peft's `ties`); 1: they use the weighted rows
// w_i * x_i. p.c says what the sum of the agreeing weighted rows is divided by: 0 their count (peft; 0 where
// none agree), 1 the sum of their weights, or 1 where that sum is 0 (mergekit with `normalize`), 2 nothing
// (mergekit without `normalize`).
@compute @workgroup_size(WG)
fn merge_ties_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let l = elem(wid, nwg, lid);
    if (l >= p.l) { return; }
    let total = p.a != 0u;
    let weighted = p.b != 0u;
    var s = 0.0;
    for (var i = 0u; i < p.rows; i++) {
        let x = xs[i * p.l + l];
        let e = select(x, wts[i] * x, weighted);
        s += select(sign(e), e, total);
    }
    let majority = select(-1.0, 1.0, s >= 0.0);
    var acc = 0.0;
    var cnt = 0.0;
    var wsum = 0.0;
    for (var i = 0u; i < p.rows; i++) {
        let x = xs[i * p.l + l];
        let wx = wts[i] * x;
        if (sign(select(x, wx, weighted)) == majority) {
            acc += wx;
            cnt += 1.0;
            wsum += wts[i];
        }
    }
    if (p.c == 0u) {
        out[l] = acc / max(cnt, 1.0);
    } else if (p.c == 1u) {
        out[l] = acc / select(wsum, 1.0, wsum == 0.0);
    } else {
        out[l] = acc;
    }
}

// DARE rescaled random pruning with a given Bernoulli keep-mask: x * mask / density (peft random_pruning).
@compute @workgroup_size(WG)
fn merge_dare_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = elem(wid, nwg, lid);
    if (i >= p.l) { return; }
    out[i] = (xs[i] * mask[i]) / bitcast<f32>(p.a);
}

// ---------------------------------------------------------------- exact top-k of |x| per row
// Each element has the distinct key (bits of |x|, L-1-index): larger magnitude first, then lower index, so
// exactly k keys are >= the k-th largest key. state[2r..2r+2] holds row r's threshold (hi, lo), built digit by
// digit from the most significant down (a radix select): a step fixes the digit of p.c bits (at most 4) at bit
// p.b of word p.a (0: hi = |x| bits, 31 of them; 1: lo = the index part) to the largest value d such that at
// least k keys are >= the threshold with that digit (lower bits 0). Every lower bit of the state is still 0.

const BUCKETS: u32 = 16u;

fn shr(x: u32, s: u32) -> u32 {
    return select(x >> min(s, 31u), 0u, s >= 32u);
}

// Which candidates of this step a key reaches: 0 when its already-fixed prefix is below the threshold's, its
// digit when the prefix is equal, the largest digit when the prefix is above. A key is >= candidate d exactly
// when its bucket is >= d.
fn bucket(x: f32, l: u32, st: vec2<u32>) -> u32 {
    let hi = bitcast<u32>(abs(x));
    // p.d = 1 (counting passes only): the index part is l, so that equal magnitudes rank in ascending index order
    // (merge_sparse.wgsl's breadcrumbs band).
    let lo = select(p.l - 1u - l, l, p.d != 0u);
    let top = p.b + p.c;
    let maxd = (1u << p.c) - 1u;
    var kw = hi;
    var sw = st.x;
    if (p.a != 0u) {
        if (hi != st.x) { return select(0u, maxd, hi > st.x); }
        kw = lo;
        sw = st.y;
    }
    let kp = shr(kw, top);
    let sp = shr(sw, top);
    if (kp != sp) { return select(0u, maxd, kp > sp); }
    return (kw >> p.b) & maxd;
}

fn key_at_least(x: f32, l: u32, c: vec2<u32>) -> bool {
    let hi = bitcast<u32>(abs(x));
    let lo = p.l - 1u - l;
    return hi > c.x || (hi == c.x && lo >= c.y);
}

@compute @workgroup_size(WG)
fn merge_magnitude_init_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.rows) { return; }
    state[2u * r] = 0u;
    state[2u * r + 1u] = 0u;
}

// Partial bucket histograms: invocation j of row r (workgroup row wid.y) strides j, j+parts, ... and writes
// counts[(r * parts + j) * 16 + d].
@compute @workgroup_size(WG)
fn merge_magnitude_count_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = wid.x * WG + lid;
    let r = wid.y;
    if (j >= p.parts || r >= p.rows) { return; }
    let st = vec2<u32>(state[2u * r], state[2u * r + 1u]);
    let base = r * p.l;
    var h: array<u32, BUCKETS>;
    for (var l = j; l < p.l; l += p.parts) {
        h[bucket(xs[base + l], l, st)] += 1u;
    }
    let o = (r * p.parts + j) * BUCKETS;
    for (var d = 0u; d < BUCKETS; d++) { counts[o + d] = h[d]; }
}

@compute @workgroup_size(WG)
fn merge_magnitude_select_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.rows) { return; }
    var h: array<u32, BUCKETS>;
    for (var j = 0u; j < p.parts; j++) {
        let o = (r * p.parts + j) * BUCKETS;
        for (var d = 0u; d < BUCKETS; d++) { h[d] += counts[o + d]; }
    }
    // The largest digit whose candidate still has at least k keys at or above it.
    var n = 0u;
    var best = 0u;
    for (var d = (1u << p.c) - 1u; d >= 1u; d--) {
        n += h[d];
        if (n >= p.k) {
            best = d;
            break;
        }
    }
    if (p.a == 0u) {
        state[2u * r] |= best << p.b;
    } else {
        state[2u * r + 1u] |= best << p.b;
    }
}

// out = xs where the key reaches the row's threshold, else 0. p.c: 1 keeps everything (k = L), p.d: 1 keeps
// nothing (k = 0).
@compute @workgroup_size(WG)
fn merge_magnitude_mask_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                @builtin(local_invocation_index) lid: u32) {
    let i = elem(wid, nwg, lid);
    if (i >= p.l * p.rows) { return; }
    let r = i / p.l;
    let l = i - r * p.l;
    let x = xs[i];
    let c = vec2<u32>(state[2u * r], state[2u * r + 1u]);
    let keep = p.c != 0u || (p.d == 0u && key_at_least(x, l, c));
    out[i] = select(0.0, x, keep);
}

// The same in place on `out` (rows [p.rows, p.l], counted through `xs` bound to the same buffer in the
// counting passes): zero what the key does not keep, leave the rest.
@compute @workgroup_size(WG)
fn merge_magnitude_mask_inplace_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                        @builtin(local_invocation_index) lid: u32) {
    let i = elem(wid, nwg, lid);
    if (i >= p.l * p.rows) { return; }
    let r = i / p.l;
    let l = i - r * p.l;
    let x = out[i];
    let c = vec2<u32>(state[2u * r], state[2u * r + 1u]);
    let keep = p.c != 0u || (p.d == 0u && key_at_least(x, l, c));
    out[i] = select(0.0, x, keep);
}

// ---------------------------------------------------------------- SLERP (mergekit)
// a = xs, b = b_in. Stage 1: strided partial sums of a·a, b·b, a·b per invocation.
@compute @workgroup_size(WG)
fn merge_slerp_partial_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                               @builtin(local_invocation_index) lid: u32) {
    let j = elem(wid, nwg, lid);
    if (j >= p.parts) { return; }
    var aa = 0.0;
    var bb = 0.0;
    var ab = 0.0;
    for (var l = j; l < p.l; l += p.parts) {
        let x = xs[l];
        let y = b_in[l];
        aa = fma(x, x, aa);
        bb = fma(y, y, bb);
        ab = fma(x, y, ab);
    }
    sums[3u * j] = aa;
    sums[3u * j + 1u] = bb;
    sums[3u * j + 2u] = ab;
}

// Stage 2: the interpolation coefficients. mergekit normalises copies (only when the norm exceeds 1e-8),
// lerps the originals when |dot| > 0.9995, else slerps the ORIGINAL vectors with the angle of the normalised
// ones. p.a = t (f32 bits).
@compute @workgroup_size(1)
fn merge_slerp_coef_forward() {
    var aa = 0.0;
    var bb = 0.0;
    var ab = 0.0;
    for (var j = 0u; j < p.parts; j++) {
        aa += sums[3u * j];
        bb += sums[3u * j + 1u];
        ab += sums[3u * j + 2u];
    }
    let t = bitcast<f32>(p.a);
    let na = sqrt(aa);
    let nb = sqrt(bb);
    let da = select(1.0, na, na > 1e-8);
    let db = select(1.0, nb, nb > 1e-8);
    let dot = ab / da / db;
    var s0 = 1.0 - t;
    var s1 = t;
    if (abs(dot) <= 0.9995) {
        let theta0 = acos(dot);
        let sin0 = sin(theta0);
        let theta_t = theta0 * t;
        s0 = sin(theta0 - theta_t) / sin0;
        s1 = sin(theta_t) / sin0;
    }
    coef[0] = s0;
    coef[1] = s1;
}

@compute @workgroup_size(WG)
fn merge_slerp_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let l = elem(wid, nwg, lid);
    if (l >= p.l) { return; }
    out[l] = coef[0] * xs[l] + coef[1] * b_in[l];
}
