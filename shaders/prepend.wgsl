// Prepend rows along the sequence axis: out [B, P+T, C] = (p [P, C] broadcast over the batch, then x [B, T, C]).
// Soft prompts put trainable rows in front of the word embeddings, prefix tuning in front of every layer's keys
// and values. The gradients are the two pieces of dout: dx is its last T rows; dp is the sum over the batch of
// its first P rows, each invocation walking the batch in order (deterministic, no atomics).

struct Params { b: u32, t: u32, p: u32, c: u32, accumulate: u32, _p0: u32, _p1: u32, _p2: u32 }
@group(0) @binding(0) var<uniform> u: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> rows: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> dout: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;
@group(0) @binding(6) var<storage, read_write> drows: array<f32>;

override WG: u32 = 64u;

@compute @workgroup_size(WG)
fn prepend_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let k = flat_group(wid, nwg) * WG + lid;
    let s_len = u.p + u.t;
    if (k >= u.b * s_len * u.c) { return; }
    let ch = k % u.c;
    let s = (k / u.c) % s_len;
    let bi = k / (u.c * s_len);
    if (s < u.p) {
        out[k] = rows[s * u.c + ch];
    } else {
        out[k] = x[(bi * u.t + (s - u.p)) * u.c + ch];
    }
}

@compute @workgroup_size(WG)
fn prepend_backward_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let k = flat_group(wid, nwg) * WG + lid;
    if (k >= u.b * u.t * u.c) { return; }
    let ch = k % u.c;
    let t = (k / u.c) % u.t;
    let bi = k / (u.c * u.t);
    dx[k] = dout[(bi * (u.p + u.t) + u.p + t) * u.c + ch];
}

@compute @workgroup_size(WG)
fn prepend_backward_weight(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let k = flat_group(wid, nwg) * WG + lid;
    if (k >= u.p * u.c) { return; }
    var acc = 0.0;
    if (u.accumulate != 0u) { acc = drows[k]; }
    let stride = (u.p + u.t) * u.c;
    for (var bi = 0u; bi < u.b; bi++) {
        acc = acc + dout[bi * stride + k];
    }
    drows[k] = acc;
}
