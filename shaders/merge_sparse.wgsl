// mergekit's sparsifying task-vector merges and its dtype semantics (ops/merge_sparse.rs): the generalized task
// arithmetic combine, linear, L1 rescaling, breadcrumbs' band of magnitudes, DELLA's rank-based drop and SCE.
// Values are carried as f32 and rounded where mergekit's torch ops round when it computes in float16 or
// bfloat16: `rnd(x, mode)` (0: f32, nothing; 1: float16; 2: bfloat16; round to nearest, ties to even).
// Sums accumulate in f32 in row order and round once, as torch's CPU reductions of half types do.

struct Params { l: u32, rows: u32, parts: u32, k: u32, a: u32, b: u32, c: u32, d: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> xs: array<f32>;
@group(0) @binding(3) var<storage, read> wts: array<f32>;
@group(0) @binding(5) var<storage, read> mask: array<f32>;
@group(0) @binding(6) var<storage, read_write> state: array<u32>;
@group(0) @binding(8) var<storage, read> b_in: array<f32>;
@group(0) @binding(9) var<storage, read_write> sums: array<f32>;
@group(0) @binding(10) var<storage, read_write> acc: array<f32>;
@group(0) @binding(11) var<storage, read> state2: array<u32>;

override WG: u32 = 64u;

fn gidx(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return flat_group(wid, nwg) * WG + lid;
}

// x rounded to float16 (mode 1) or bfloat16 (mode 2), kept as f32; Inf and NaN pass through.
fn rnd(x: f32, mode: u32) -> f32 {
    if (mode == 0u) { return x; }
    let bits = bitcast<u32>(x);
    if ((bits & 0x7f800000u) == 0x7f800000u) { return x; }
    if (mode == 2u) {
        return bitcast<f32>((bits + 0x7fffu + ((bits >> 16u) & 1u)) & 0xffff0000u);
    }
    let sgn = bits & 0x80000000u;
    let e = (bits >> 23u) & 0xffu;
    if (e == 0u) { return bitcast<f32>(sgn); }
    let m = (bits & 0x7fffffu) | 0x800000u;
    // Low mantissa bits dropped: 13 for normal float16 results, more below 2^-14 (float16 subnormals).
    let s = 13u + select(0u, 113u - e, e < 113u);
    var r = 0u;
    if (s < 32u) {
        let half_ = 1u << (s - 1u);
        let rem = m & ((1u << s) - 1u);
        r = m >> s;
        if (rem > half_ || (rem == half_ && (r & 1u) == 1u)) { r += 1u; }
    }
    let v = ldexp(f32(r), i32(s + e) - 150);
    if (v > 65504.0) { return bitcast<f32>(sgn | 0x7f800000u); }
    return bitcast<f32>(sgn | bitcast<u32>(v));
}

fn sgn(x: f32) -> f32 {
    return select(select(0.0, -1.0, x < 0.0), 1.0, x > 0.0);
}

// out[p.k + i] = rnd(xs[i] - b_in[i]) for i < p.l: a task vector (model - base) in the compute dtype.
@compute @workgroup_size(WG)
fn merge_delta_round_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) lid: u32) {
    let i = gidx(wid, nwg, lid);
    if (i >= p.l) { return; }
    out[p.k + i] = rnd(xs[i] - b_in[i], p.a);
}

// mergekit's generalized_task_arithmetic combine. xs [rows + 1, l]: rows task vectors (p.b bit 2: raw models,
// the task vector taken here as rnd(x - base)), then the base. wts: the weights in the compute dtype.
// p.a: mode; p.b bits: 0 sign consensus ("sum"), 1 normalize, 2 raw, 3 lambda != 1; p.c: lambda (f32 bits).
@compute @workgroup_size(WG)
fn merge_gta_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let j = gidx(wid, nwg, lid);
    if (j >= p.l) { return; }
    let mode = p.a;
    let consensus = (p.b & 1u) != 0u;
    let raw = (p.b & 4u) != 0u;
    let base = xs[p.rows * p.l + j];
    var s = 0.0;
    for (var i = 0u; i < p.rows; i++) {
        var d = xs[i * p.l + j];
        if (raw) { d = rnd(d - base, mode); }
        s += rnd(d * wts[i], mode);
    }
    s = rnd(s, mode);
    let majority = select(-1.0, 1.0, s >= 0.0);
    var mixed = 0.0;
    var div = 0.0;
    for (var i = 0u; i < p.rows; i++) {
        var d = xs[i * p.l + j];
        if (raw) { d = rnd(d - base, mode); }
        let y = rnd(d * wts[i], mode);
        if (!consensus || sgn(y) == majority) {
            mixed += y;
            div += wts[i];
        }
    }
    mixed = rnd(mixed, mode);
    div = rnd(div, mode);
    if (consensus) {
        div = select(div, 1.0, div == 0.0);
    } else {
        div = select(div, 1.0, abs(div) < 1e-8);
    }
    if ((p.b & 2u) != 0u) { mixed = rnd(mixed / div, mode); }
    if ((p.b & 8u) != 0u) { mixed = rnd(mixed * bitcast<f32>(p.c), mode); }
    out[j] = rnd(base + mixed, mode);
}

// mergekit's linear: s = 0, s = fma(x_i, w_i, s) in f32 (torch's addcmul_), / p.c (the f32 sum of the weights)
// when p.b = 1, rounded to the compute dtype p.a.
@compute @workgroup_size(WG)
fn merge_linear_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let j = gidx(wid, nwg, lid);
    if (j >= p.l) { return; }
    var s = 0.0;
    for (var i = 0u; i < p.rows; i++) { s = fma(xs[i * p.l + j], wts[i], s); }
    if (p.b != 0u) { s = s / bitcast<f32>(p.c); }
    out[j] = rnd(s, p.a);
}

// Strided partial sums over xs [p.l] into sums[p.parts]: p.a = 0 |x|, 1 rnd(x * x, p.b), 2 count of x != 0.
@compute @workgroup_size(WG)
fn merge_sparse_partial_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                @builtin(local_invocation_index) lid: u32) {
    let j = gidx(wid, nwg, lid);
    if (j >= p.parts) { return; }
    var s = 0.0;
    for (var i = j; i < p.l; i += p.parts) {
        let x = xs[i];
        if (p.a == 0u) {
            s += abs(x);
        } else if (p.a == 1u) {
            s += rnd(x * x, p.b);
        } else {
            s += select(0.0, 1.0, x != 0.0);
        }
    }
    sums[j] = s;
}

// acc[p.k] = the sum of sums[0..p.parts] (one invocation, in order).
@compute @workgroup_size(1)
fn merge_sparse_accum_forward() {
    var s = 0.0;
    for (var j = 0u; j < p.parts; j++) { s += sums[j]; }
    acc[p.k] = s;
}

// mergekit's rescaled_masked_tensor, in place on out [p.l]: x = out[i] (times mask[i] when p.c bit 0); with p.c
// bit 1 (rescale, L1 norm) x = rnd(x * rnd(rnd(acc[0]) / rnd(acc[1]))) in the work dtype p.b, unless either
// norm is below 1e-7 (acc[0]: sum |x| before masking, acc[1]: after); then rounded to the compute dtype p.a.
@compute @workgroup_size(WG)
fn merge_sparse_rescale_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                @builtin(local_invocation_index) lid: u32) {
    let i = gidx(wid, nwg, lid);
    if (i >= p.l) { return; }
    var x = out[i];
    if ((p.c & 1u) != 0u) { x = x * mask[i]; }
    if ((p.c & 2u) != 0u) {
        let before = rnd(acc[0], p.b);
        let after = rnd(acc[1], p.b);
        if (!(before < 1e-7 || after < 1e-7)) {
            x = rnd(x * rnd(before / after, p.b), p.b);
        }
    }
    out[i] = rnd(x, p.a);
}

// Keys (|x| bits, index) as merge.wgsl's radix select builds them; p.a bit 0: the index part is i (ascending
// sort order, breadcrumbs), else p.l - 1 - i (lower index first, top-k).
fn key_ge(x: f32, i: u32, hi_t: u32, lo_t: u32) -> bool {
    let hi = bitcast<u32>(abs(x));
    let lo = select(p.l - 1u - i, i, (p.a & 1u) != 0u);
    return hi > hi_t || (hi == hi_t && lo >= lo_t);
}

// In place on out [p.l]: keep the element whose key is among the top k1 (threshold state[0..2]) and not among
// the top k2 (state2[0..2]); p.c = 1: k1 = 0 (keep nothing), p.d = 1: k2 = 0 (exclude nothing). p.a bit 1: the
// keys come from b_in (SCE's variances), else from out itself.
@compute @workgroup_size(WG)
fn merge_band_mask_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let i = gidx(wid, nwg, lid);
    if (i >= p.l) { return; }
    let x = out[i];
    var kx = x;
    if ((p.a & 2u) != 0u) { kx = b_in[i]; }
    let in1 = p.c == 0u && key_ge(kx, i, state[0], state[1]);
    let in2 = p.d == 0u && key_ge(kx, i, state2[0], state2[1]);
    out[i] = select(0.0, x, in1 && !in2);
}

// ---------------------------------------------------------------- DELLA: ranks of |x| within each row
// state [p.rows, p.parts] (p.parts = the row length p.k rounded up to a power of two) holds column indices, sorted
// per row by (|x|, index) ascending by a bitonic network; 0xffffffff pads and sorts last.

@compute @workgroup_size(WG)
fn merge_della_sort_init_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                 @builtin(local_invocation_index) lid: u32) {
    let i = gidx(wid, nwg, lid);
    if (i >= p.rows * p.parts) { return; }
    let c = i % p.parts;
    state[i] = select(0xffffffffu, c, c < p.k);
}

fn della_gt(r: u32, a: u32, b: u32) -> bool {
    if (a == 0xffffffffu) { return b != 0xffffffffu; }
    if (b == 0xffffffffu) { return false; }
    let ha = bitcast<u32>(abs(xs[r * p.k + a]));
    let hb = bitcast<u32>(abs(xs[r * p.k + b]));
    return ha > hb || (ha == hb && a > b);
}

// One compare-exchange step of the bitonic sort: p.a = the block size k, p.b = the distance j.
@compute @workgroup_size(WG)
fn merge_della_sort_step_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                 @builtin(local_invocation_index) lid: u32) {
    let i = gidx(wid, nwg, lid);
    if (i >= p.rows * p.parts) { return; }
    let r = i / p.parts;
    let a = i - r * p.parts;
    let b = a ^ p.b;
    if (b <= a) { return; }
    let ia = state[r * p.parts + a];
    let ib = state[r * p.parts + b];
    let ascending = (a & p.a) == 0u;
    if (della_gt(r, ia, ib) == ascending) {
        state[r * p.parts + a] = ib;
        state[r * p.parts + b] = ia;
    }
}

// DELLA's drop, in place on out [p.rows, p.k]: the element of ascending rank j (0-based) in its row is kept when
// mask[e] (a uniform draw in [0, 1)) < lo + (j / (p.k - 1)) * 2 * eps; p.c = lo, p.d = eps (f32 bits).
@compute @workgroup_size(WG)
fn merge_della_mask_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) lid: u32) {
    let i = gidx(wid, nwg, lid);
    if (i >= p.rows * p.k) { return; }
    let r = i / p.k;
    let j = i - r * p.k;
    let e = r * p.k + state[r * p.parts + j];
    let rank_norm = clamp(f32(j) / f32(p.k - 1u), 0.0, 1.0);
    let prob = bitcast<f32>(p.c) + rank_norm * 2.0 * bitcast<f32>(p.d);
    if (!(mask[e] < prob)) { out[e] = 0.0; }
}

// ---------------------------------------------------------------- SCE
// out[l] = rnd(var(xs[:, l]), p.a): the population variance over the p.rows task vectors (mean first).
@compute @workgroup_size(WG)
fn merge_sce_var_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let j = gidx(wid, nwg, lid);
    if (j >= p.l) { return; }
    var s = 0.0;
    for (var i = 0u; i < p.rows; i++) { s += xs[i * p.l + j]; }
    let mean = s / f32(p.rows);
    var v = 0.0;
    for (var i = 0u; i < p.rows; i++) {
        let d = xs[i * p.l + j] - mean;
        v += d * d;
    }
    out[j] = rnd(v / f32(p.rows), p.a);
}

// SCE's combine: xs [rows + 1, l] (selected task vectors, then the base), wts the task-vector weights (compute
// dtype). Signs elected by rnd(sum_i tv_i); erased weights ew_i = w_i where sign(tv_i) agrees, else 0;
// out = rnd(base + rnd(rnd(sum_i rnd(tv_i ew_i)) / max(rnd(sum_i ew_i), p.b))), p.b = rnd(1e-6) (f32 bits).
@compute @workgroup_size(WG)
fn merge_sce_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let j = gidx(wid, nwg, lid);
    if (j >= p.l) { return; }
    let mode = p.a;
    var s = 0.0;
    for (var i = 0u; i < p.rows; i++) { s += xs[i * p.l + j]; }
    let majority = select(-1.0, 1.0, rnd(s, mode) >= 0.0);
    var merged = 0.0;
    var den = 0.0;
    for (var i = 0u; i < p.rows; i++) {
        let x = xs[i * p.l + j];
        if (sgn(x) == majority) {
            merged += rnd(x * wts[i], mode);
            den += wts[i];
        }
    }
    den = max(rnd(den, mode), bitcast<f32>(p.b));
    let fin = rnd(rnd(merged, mode) / den, mode);
    out[j] = rnd(xs[p.rows * p.l + j] + fin, mode);
}
