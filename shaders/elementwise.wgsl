// Elementwise ops and their gradients, one invocation per element over a flat 2-D grid of workgroups.
// A second operand `b` is either the same size as `a` or a row vector [N] broadcast over the rows of a [.., N]
// (index `i % nb`). The column reduction of a broadcast operand's gradient (mul_backward) runs one invocation
// per column over the rows in order, so it is deterministic without atomics.
// The prelude picks the element type V: f32, or vec4<f32> when every size is a multiple of 4 (n and nb then
// count vectors). vec4 halves the time on lavapipe, whose per-lane loads are the bottleneck; every function
// below is written with componentwise ops and select so one body serves both. U is the matching u32 type and
// lane_index(i) the element indices of vector i.

struct Params { n: u32, nb: u32, flags: u32, s: u32, seed: u32, _p0: u32, _p1: u32, _p2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<V>;
@group(0) @binding(2) var<storage, read> b: array<V>;
@group(0) @binding(3) var<storage, read_write> out: array<V>;
@group(0) @binding(4) var<storage, read_write> acc: array<V>;

override WG: u32 = 64u;
const TANH_APPROX: u32 = 1u;
const SQRT_HALF: f32 = 0.7071067811865476;
const INV_SQRT_2PI: f32 = 0.3989422804014327;
const SQRT_2_OVER_PI: f32 = 0.7978845608028654;

fn gid(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return flat_group(wid, nwg) * WG + lid;
}

fn scalar() -> f32 {
    return bitcast<f32>(p.s);
}

@compute @workgroup_size(WG)
fn add_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = gid(wid, nwg, lid);
    if (i >= p.n) { return; }
    out[i] = a[i] + b[i % p.nb];
}

@compute @workgroup_size(WG)
fn mul_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = gid(wid, nwg, lid);
    if (i >= p.n) { return; }
    out[i] = a[i] * b[i % p.nb];
}

// db [nb] = sum over rows of a * dout, with a = the other factor and b = dout, both [n / nb, nb].
@compute @workgroup_size(WG)
fn mul_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let c = gid(wid, nwg, lid);
    if (c >= p.nb) { return; }
    let rows = p.n / p.nb;
    var s = V(0.0);
    for (var r = 0u; r < rows; r++) {
        let k = r * p.nb + c;
        s += a[k] * b[k];
    }
    out[c] = s;
}

@compute @workgroup_size(WG)
fn scale_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = gid(wid, nwg, lid);
    if (i >= p.n) { return; }
    out[i] = a[i] * scalar();
}

// In place, so acc has its own read_write binding (wgpu refuses the same buffer bound twice when written).
@compute @workgroup_size(WG)
fn add_inplace_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let i = gid(wid, nwg, lid);
    if (i >= p.n) { return; }
    acc[i] = acc[i] + scalar() * b[i % p.nb];
}

// erfc(z) for z >= 0.5 (Chebyshev fit of erfc(z) exp(z^2) in t = 1 / (1 + z/2), relative error 1.1e-7);
// 1 - erf through a power series below that. Accurate to ~1e-7 absolute everywhere, which is what matching
// PyTorch's exact-erf GELU to 1e-6 needs (the short Abramowitz-Stegun fits are off by 1e-5..1e-7).
fn erfc_pos(z: V) -> V {
    let z2 = z * z;
    // 2/sqrt(pi) * sum (-1)^k z^(2k+1) / (k! (2k+1)), k = 0..7
    var q = V(-1.0 / (5040.0 * 15.0));
    q = q * z2 + 1.0 / (720.0 * 13.0);
    q = q * z2 - 1.0 / (120.0 * 11.0);
    q = q * z2 + 1.0 / (24.0 * 9.0);
    q = q * z2 - 1.0 / (6.0 * 7.0);
    q = q * z2 + 1.0 / (2.0 * 5.0);
    q = q * z2 - 1.0 / 3.0;
    q = q * z2 + 1.0;
    let small = 1.0 - 1.1283791670955126 * z * q;
    let t = 1.0 / (1.0 + 0.5 * z);
    var r = V(0.17087277);
    r = r * t - 0.82215223;
    r = r * t + 1.48851587;
    r = r * t - 1.13520398;
    r = r * t + 0.27886807;
    r = r * t - 0.18628806;
    r = r * t + 0.09678418;
    r = r * t + 0.37409196;
    r = r * t + 1.00002368;
    r = r * t - 1.26551223;
    // Both branches are cheap next to the loads; select keeps one body for f32 and vec4.
    return select(t * exp(r - z2), small, z < V(0.5));
}

// Phi(x) = P(N(0,1) <= x), taking the small tail directly on each side to avoid 1 - (1 - tiny).
fn std_normal_cdf(x: V) -> V {
    let tail = 0.5 * erfc_pos(abs(x) * SQRT_HALF);
    return select(1.0 - tail, tail, x < V(0.0));
}

// tanh via exp of a clamped argument: no inf/inf for large |u|, and tanh(10) is 1 in f32.
// A NaN argument gives NaN (min and sign would turn it into a number).
fn tanh_safe(u: V) -> V {
    let e = exp(-2.0 * min(abs(u), V(10.0)));
    // `!(u == u)` is the NaN test: naga compiles `!=` to an ordered compare, false for NaN
    return select(sign(u) * (1.0 - e) / (1.0 + e), u, !(u == u));
}

fn gelu_tanh_inner(x: V) -> V {
    return SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
}

@compute @workgroup_size(WG)
fn gelu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = gid(wid, nwg, lid);
    if (i >= p.n) { return; }
    let x = a[i];
    if ((p.flags & TANH_APPROX) != 0u) {
        out[i] = 0.5 * x * (1.0 + tanh_safe(gelu_tanh_inner(x)));
    } else {
        out[i] = x * std_normal_cdf(x);
    }
}

// dx = dout * d/dx gelu(x); a = x, b = dout.
@compute @workgroup_size(WG)
fn gelu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = gid(wid, nwg, lid);
    if (i >= p.n) { return; }
    let x = a[i];
    var g: V;
    if ((p.flags & TANH_APPROX) != 0u) {
        let t = tanh_safe(gelu_tanh_inner(x));
        g = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x);
    } else {
        g = std_normal_cdf(x) + x * INV_SQRT_2PI * exp(-0.5 * x * x);
    }
    out[i] = b[i] * g;
}

fn sigmoid(x: V) -> V {
    return 1.0 / (1.0 + exp(-x));
}

@compute @workgroup_size(WG)
fn silu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = gid(wid, nwg, lid);
    if (i >= p.n) { return; }
    let x = a[i];
    out[i] = x * sigmoid(x);
}

@compute @workgroup_size(WG)
fn silu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = gid(wid, nwg, lid);
    if (i >= p.n) { return; }
    let x = a[i];
    let s = sigmoid(x);
    out[i] = b[i] * s * (1.0 + x * (1.0 - s));
}

@compute @workgroup_size(WG)
fn relu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = gid(wid, nwg, lid);
    if (i >= p.n) { return; }
    // select, not max: max(NaN, 0) may be 0; a NaN input stays NaN
    out[i] = select(a[i], V(0.0), a[i] < V(0.0));
}

@compute @workgroup_size(WG)
fn relu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = gid(wid, nwg, lid);
    if (i >= p.n) { return; }
    // relu'(NaN) is NaN: a NaN input gives a NaN gradient
    out[i] = select(select(V(0.0), b[i], a[i] > V(0.0)), a[i], !(a[i] == a[i]));
}

// lowbias32 integer hash (Wellons): a full-avalanche mix, cheap in 32-bit integer ops.
fn hash_u32(v: U) -> U {
    var h = v;
    h ^= h >> U(16u);
    h *= U(0x7feb352du);
    h ^= h >> U(15u);
    h *= U(0x846ca68bu);
    h ^= h >> U(16u);
    return h;
}

// The keep mask is a pure function of (seed, element index), so backward regenerates it instead of storing
// it. p.s holds 1/(1-p) and p.flags holds the drop threshold as a 24-bit fraction.
fn dropout_scale(i: u32) -> V {
    let h = hash_u32(lane_index(i) ^ hash_u32(U(p.seed ^ 0x9e3779b9u)));
    return select(V(0.0), V(scalar()), (h >> U(8u)) >= U(p.flags));
}

@compute @workgroup_size(WG)
fn dropout_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = gid(wid, nwg, lid);
    if (i >= p.n) { return; }
    out[i] = a[i] * dropout_scale(i);
}

// a = dout.
@compute @workgroup_size(WG)
fn dropout_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = gid(wid, nwg, lid);
    if (i >= p.n) { return; }
    out[i] = a[i] * dropout_scale(i);
}
