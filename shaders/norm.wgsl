// LayerNorm and RMSNorm over the last axis of x [rows, C], with their input and weight gradients.
// Forward and backward_input run one workgroup per row (row_sum from the variant prelude); the forward saves
// mean / rstd per row for the backward. The weight gradients run one invocation per channel adding the rows in
// order: deterministic, no atomics. Elements are V (f32, or vec4<f32> when C is a multiple of 4: vec4 loads
// are what lavapipe is fast at); p.cv counts V per row, p.c channels.

struct Params { rows: u32, c: u32, eps: u32, flags: u32, cv: u32, _p0: u32, _p1: u32, _p2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<V>;
@group(0) @binding(2) var<storage, read> gamma: array<V>;
@group(0) @binding(3) var<storage, read> beta: array<V>;
@group(0) @binding(4) var<storage, read_write> out: array<V>;
@group(0) @binding(5) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> rstd_out: array<f32>;
@group(0) @binding(7) var<storage, read> dout: array<V>;
@group(0) @binding(8) var<storage, read> mean_in: array<f32>;
@group(0) @binding(9) var<storage, read> rstd_in: array<f32>;
@group(0) @binding(10) var<storage, read_write> dgamma: array<V>;
@group(0) @binding(11) var<storage, read_write> dbeta: array<V>;

override WG: u32 = 64u;
const ACCUMULATE: u32 = 1u;

@compute @workgroup_size(WG)
fn layernorm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg);
    let valid = row < p.rows;
    let n = select(0u, p.cv, valid);
    let base = row * p.cv;
    var s = V(0.0);
    for (var j = lid; j < n; j += WG) { s += x[base + j]; }
    let mu = row_sum(hsum(s), lid) / f32(p.c);
    // Two passes: the centred sum of squares does not cancel the way E[x^2] - E[x]^2 does.
    var q = V(0.0);
    for (var j = lid; j < n; j += WG) {
        let d = x[base + j] - mu;
        q += d * d;
    }
    let rs = 1.0 / sqrt(row_sum(hsum(q), lid) / f32(p.c) + bitcast<f32>(p.eps));
    for (var j = lid; j < n; j += WG) {
        out[base + j] = (x[base + j] - mu) * rs * gamma[j] + beta[j];
    }
    if (valid && lid == 0u) {
        mean_out[row] = mu;
        rstd_out[row] = rs;
    }
}

// dx = rstd * (dn - mean(dn) - xhat * mean(dn * xhat)), dn = dout * gamma. out = dx.
@compute @workgroup_size(WG)
fn layernorm_backward_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg);
    let valid = row < p.rows;
    let n = select(0u, p.cv, valid);
    let base = row * p.cv;
    let mu = select(0.0, mean_in[min(row, p.rows - 1u)], valid);
    let rs = select(0.0, rstd_in[min(row, p.rows - 1u)], valid);
    var a = V(0.0);
    var b = V(0.0);
    for (var j = lid; j < n; j += WG) {
        let dn = dout[base + j] * gamma[j];
        a += dn;
        b += dn * (x[base + j] - mu) * rs;
    }
    let mean_dn = row_sum(hsum(a), lid) / f32(p.c);
    let mean_dnx = row_sum(hsum(b), lid) / f32(p.c);
    for (var j = lid; j < n; j += WG) {
        let xhat = (x[base + j] - mu) * rs;
        out[base + j] = rs * (dout[base + j] * gamma[j] - mean_dn - xhat * mean_dnx);
    }
}

@compute @workgroup_size(WG)
fn layernorm_backward_weight(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) lid: u32) {
    let c = flat_group(wid, nwg) * WG + lid;
    if (c >= p.cv) { return; }
    var g = V(0.0);
    var bsum = V(0.0);
    for (var r = 0u; r < p.rows; r++) {
        let k = r * p.cv + c;
        g += dout[k] * (x[k] - mean_in[r]) * rstd_in[r];
        bsum += dout[k];
    }
    if ((p.flags & ACCUMULATE) != 0u) {
        g += dgamma[c];
        bsum += dbeta[c];
    }
    dgamma[c] = g;
    dbeta[c] = bsum;
}

// Llama: out = x * rstd * gamma, rstd = 1 / sqrt(mean(x^2) + eps).
@compute @workgroup_size(WG)
fn rmsnorm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg);
    let valid = row < p.rows;
    let n = select(0u, p.cv, valid);
    let base = row * p.cv;
    var q = V(0.0);
    for (var j = lid; j < n; j += WG) {
        let v = x[base + j];
        q += v * v;
    }
    let rs = 1.0 / sqrt(row_sum(hsum(q), lid) / f32(p.c) + bitcast<f32>(p.eps));
    for (var j = lid; j < n; j += WG) {
        out[base + j] = x[base + j] * rs * gamma[j];
    }
    if (valid && lid == 0u) {
        rstd_out[row] = rs;
    }
}

// dx = rstd * (dn - xhat * mean(dn * xhat)), dn = dout * gamma, xhat = x * rstd. out = dx.
@compute @workgroup_size(WG)
fn rmsnorm_backward_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg);
    let valid = row < p.rows;
    let n = select(0u, p.cv, valid);
    let base = row * p.cv;
    let rs = select(0.0, rstd_in[min(row, p.rows - 1u)], valid);
    var b = V(0.0);
    for (var j = lid; j < n; j += WG) {
        b += dout[base + j] * gamma[j] * x[base + j] * rs;
    }
    let mean_dnx = row_sum(hsum(b), lid) / f32(p.c);
    for (var j = lid; j < n; j += WG) {
        let xhat = x[base + j] * rs;
        out[base + j] = rs * (dout[base + j] * gamma[j] - xhat * mean_dnx);
    }
}

@compute @workgroup_size(WG)
fn rmsnorm_backward_weight(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let c = flat_group(wid, nwg) * WG + lid;
    if (c >= p.cv) { return; }
    var g = V(0.0);
    for (var r = 0u; r < p.rows; r++) {
        let k = r * p.cv + c;
        g += dout[k] * x[k] * rstd_in[r];
    }
    if ((p.flags & ACCUMULATE) != 0u) { g += dgamma[c]; }
    dgamma[c] = g;
}
