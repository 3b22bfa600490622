// Row softmax over the last axis of x [B, .., T, S] (rows of S), with an optional key mask [B, S] (1 keep,
// 0 masked) and causal masking (column j masked when j > i + S - T, i the row's position in T). One workgroup
// per row: a single pass keeps a running max and rescaled sum per invocation (online softmax), the row
// combines them with row_max / row_sum from the variant prelude, and a second pass writes. A fully masked row
// gets zeros rather than NaN.

struct Params { rows: u32, s: u32, t: u32, rows_per_batch: u32, flags: u32, _p0: u32, _p1: u32, _p2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> mask: array<f32>;
@group(0) @binding(4) var<storage, read> dout: array<f32>;
@group(0) @binding(5) var<storage, read> y: array<f32>;

override WG: u32 = 64u;
const HAS_MASK: u32 = 1u;
const CAUSAL: u32 = 2u;
// Stands in for -inf, which WGSL has no literal for; below every finite score that matters.
const NEG_BIG: f32 = -3.0e38;

fn kept(row: u32, j: u32) -> bool {
    if ((p.flags & HAS_MASK) != 0u && mask[(row / p.rows_per_batch) * p.s + j] == 0.0) { return false; }
    // j > i + (S - T) without going negative.
    if ((p.flags & CAUSAL) != 0u && j + p.t > (row % p.t) + p.s) { return false; }
    return true;
}

@compute @workgroup_size(WG)
fn softmax_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg);
    let valid = row < p.rows;
    let n = select(0u, p.s, valid);
    let base = row * p.s;
    var m = NEG_BIG;
    var l = 0.0;
    for (var j = lid; j < n; j += WG) {
        if (!kept(row, j)) { continue; }
        let v = x[base + j];
        if (v > m) {
            l = l * exp(m - v) + 1.0;
            m = v;
        } else {
            l += exp(v - m);
        }
    }
    let mx = row_max(m, lid);
    let total = row_sum(l * exp(m - mx), lid);
    let inv = select(1.0 / total, 0.0, total == 0.0);
    for (var j = lid; j < n; j += WG) {
        var e = 0.0;
        if (kept(row, j)) { e = exp(x[base + j] - mx) * inv; }
        out[base + j] = e;
    }
}

// dx = y * (dout - sum(dout * y)); masked positions have y = 0 and so get 0. out = dx.
@compute @workgroup_size(WG)
fn softmax_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg);
    let n = select(0u, p.s, row < p.rows);
    let base = row * p.s;
    var d = 0.0;
    for (var j = lid; j < n; j += WG) {
        d += dout[base + j] * y[base + j];
    }
    let dot = row_sum(d, lid);
    for (var j = lid; j < n; j += WG) {
        let k = base + j;
        out[k] = y[k] * (dout[k] - dot);
    }
}
