// Geometric merges (mergekit's model_stock, nuslerp, multislerp, karcher). Each is, per vector (the whole
// tensor, a row, or a column), a linear combination of its inputs whose coefficients depend only on the
// inputs' Gram matrix (their dot products). So a merge is: merge_gram_forward over the stacked inputs, chunk
// by chunk (it accumulates), the coefficients from the Gram matrix (a few numbers per vector), then
// merge_blend_forward chunk by chunk.
//
// xs [p.rows, p.n] is a chunk of the stacked inputs: element e of the chunk is element p.g0 + e of the
// tensor. Vectors (p.lay): 0 the whole tensor, 1 contiguous rows of p.width elements (vector g / width),
// 2 columns (vector g % width, the chunk starting at a multiple of width).

struct Params {
    n: u32, rows: u32, j: u32, a: u32, b: u32, cnt: u32, slot0: u32, sub: u32,
    mode: u32, lay: u32, width: u32, g0: u32, m: u32, p0: u32, p1: u32, p2: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> xs: array<f32>;
@group(0) @binding(3) var<storage, read_write> gram: array<f32>;
@group(0) @binding(4) var<storage, read> coef: array<f32>;

override WG: u32 = 64u;

// Vector a at chunk element e: the input row a, or with p.sub the task vector row (a + 1) - row 0.
fn vec_at(a: u32, e: u32) -> f32 {
    if (p.sub != 0u) {
        return xs[(a + 1u) * p.n + e] - xs[e];
    }
    return xs[a * p.n + e];
}

// Gram entries, compensated (Neumaier) sums accumulated into gram[((slot0 + j) * m + pair) * 2 + {0: sum,
// 1: compensation}]. Invocation (j, pair) visits chunk elements j * p.a + i * p.b for i < p.cnt while below
// p.n (at most 65535 of them: lavapipe ends a loop after that many iterations). Pairs (x, y), x <= y over the p.rows - p.sub vectors, in row-major upper-triangle order.
@compute @workgroup_size(WG)
fn merge_gram_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let m = gid.y;
    if (j >= p.j || m >= p.m) { return; }
    let nv = p.rows - p.sub;
    var x = 0u;
    var r = m;
    loop {
        let len = nv - x;
        if (r < len) { break; }
        r -= len;
        x += 1u;
    }
    let y = x + r;
    var s = 0.0;
    var c = 0.0;
    var e = j * p.a;
    for (var i = 0u; i < p.cnt && e < p.n; i++) {
        let v = vec_at(x, e) * vec_at(y, e);
        let t = s + v;
        if (abs(s) >= abs(v)) { c += (s - t) + v; } else { c += (v - t) + s; }
        s = t;
        e += p.b;
    }
    let o = ((p.slot0 + j) * p.m + m) * 2u;
    let s0 = gram[o];
    let t = s0 + s;
    var c0 = gram[o + 1u] + c;
    if (abs(s0) >= abs(s)) { c0 += (s0 - t) + s; } else { c0 += (s - t) + s0; }
    gram[o] = t;
    gram[o + 1u] = c0;
}

// out[e] from the coefficients of its vector v, coef[v * (p.rows + 1) ..]:
// p.mode 0: (sum_k coef[k] xs[k]) / coef[rows];
// p.mode 1: xs[0] + (sum_{k>=1} coef[k] (xs[k] - xs[0])) / coef[rows] (task vectors about row 0, the base);
// p.mode 2 (model_stock): coef[0] * ((xs[1] + ... + xs[rows-1]) / (rows - 1)) + coef[1] * xs[0].
@compute @workgroup_size(WG)
fn merge_blend_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let e = flat_group(wid, nwg) * WG + lid;
    if (e >= p.n) { return; }
    let g = p.g0 + e;
    var v = 0u;
    if (p.lay == 1u) {
        v = g / p.width;
    } else if (p.lay == 2u) {
        v = g % p.width;
    }
    let o = v * (p.rows + 1u);
    if (p.mode == 2u) {
        var s = xs[p.n + e];
        for (var k = 2u; k < p.rows; k++) { s += xs[k * p.n + e]; }
        let avg = s / f32(p.rows - 1u);
        out[e] = coef[o] * avg + coef[o + 1u] * xs[e];
        return;
    }
    var s = 0.0;
    if (p.mode == 1u) {
        let b = xs[e];
        for (var k = 1u; k < p.rows; k++) { s += coef[o + k] * (xs[k * p.n + e] - b); }
        out[e] = b + s / coef[o + p.rows];
    } else {
        for (var k = 0u; k < p.rows; k++) { s += coef[o + k] * xs[k * p.n + e]; }
        out[e] = s / coef[o + p.rows];
    }
}

// ---------------------------------------------------------------- arcee_fusion (mergekit)
// Rows of p.width elements; row 0 of the chunk xs is the base b, row 1 the model x. KL(softmax(x) + 1e-8 ||
// softmax(b) + 1e-8) of each of the p.j rows in the chunk, written to gram[p.slot0 + row]. Three loops over
// the row (at most 65535 iterations in all, see merge_gram_forward).
@compute @workgroup_size(WG)
fn merge_fusion_kl_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if (j >= p.j) { return; }
    let o = j * p.width;
    var mx = xs[p.n + o];
    var mb = xs[o];
    for (var i = 1u; i < p.width; i++) {
        mx = max(mx, xs[p.n + o + i]);
        mb = max(mb, xs[o + i]);
    }
    // Compensated sums: a relative error e in a softmax's denominator shifts the KL by about e (sum p = 1),
    // which is the size of the KL itself for close rows.
    var sx = vec2<f32>(0.0, 0.0);
    var sb = vec2<f32>(0.0, 0.0);
    for (var i = 0u; i < p.width; i++) {
        sx = neumaier(sx, exp(xs[p.n + o + i] - mx));
        sb = neumaier(sb, exp(xs[o + i] - mb));
    }
    let dx = sx.x + sx.y;
    let db = sb.x + sb.y;
    var kl = vec2<f32>(0.0, 0.0);
    for (var i = 0u; i < p.width; i++) {
        let pp = exp(xs[p.n + o + i] - mx) / dx + 1e-8;
        let q = exp(xs[o + i] - mb) / db + 1e-8;
        kl = neumaier(kl, pp * log(pp / q));
    }
    gram[p.slot0 + j] = kl.x + kl.y;
}

// One Neumaier step: (sum, compensation) plus v.
fn neumaier(sc: vec2<f32>, v: f32) -> vec2<f32> {
    let t = sc.x + v;
    var c = sc.y;
    if (abs(sc.x) >= abs(v)) { c += (sc.x - t) + v; } else { c += (v - t) + sc.x; }
    return vec2<f32>(t, c);
}

// Importance |x - b| * kl[row] of chunk element e, written to out[p.g0 + e] (out holds the whole tensor; kl
// is read through coef).
@compute @workgroup_size(WG)
fn merge_fusion_importance_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                   @builtin(local_invocation_index) lid: u32) {
    let e = flat_group(wid, nwg) * WG + lid;
    if (e >= p.n) { return; }
    let g = p.g0 + e;
    out[g] = abs(xs[p.n + e] - xs[e]) * coef[g / p.width];
}

// out[e] = b + (x - b) * (importance >= threshold), the importance of the whole tensor read through coef at
// p.g0 + e, the threshold = bitcast(p.a).
@compute @workgroup_size(WG)
fn merge_fusion_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let e = flat_group(wid, nwg) * WG + lid;
    if (e >= p.n) { return; }
    let b = xs[e];
    let keep = select(0.0, 1.0, coef[p.g0 + e] >= bitcast<f32>(p.a));
    out[e] = b + (xs[p.n + e] - b) * keep;
}
