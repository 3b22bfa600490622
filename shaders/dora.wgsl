// DoRA's magnitude scale (Liu et al. 2024; peft's DoraLinearLayer): per output feature o of a LoRA linear
// layer W [OC, C] + s·B·A (A [R, C], B [OC, R]), the row norm n[o] = ||W[o, :] + s·B[o, :]·A||₂ and the
// scale g[o] = m[o] / n[o] that multiplies the layer's output. peft detaches the norm, so the only gradient
// is the magnitude's: dm[o] = dg[o] / n[o] (dora_scale_backward). The forward runs one workgroup per output
// row, reducing over C in shared memory (R is small: the B row is read from global memory per element);
// the backward one invocation per row.

struct Params { oc: u32, c: u32, r: u32, scale: u32, flags: u32, _p0: u32, _p1: u32, _p2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read> m: array<f32>;
@group(0) @binding(5) var<storage, read_write> g: array<f32>;
@group(0) @binding(6) var<storage, read_write> norm: array<f32>;
@group(0) @binding(7) var<storage, read> dg: array<f32>;
@group(0) @binding(8) var<storage, read> norm_in: array<f32>;
@group(0) @binding(9) var<storage, read_write> dm: array<f32>;

override WG: u32 = 64u;
const ACCUMULATE: u32 = 1u;

var<workgroup> partial: array<f32, WG>;

// g = m / ||W + s·B·A||_row, norm saved for the backward.
@compute @workgroup_size(WG)
fn dora_scale_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let o = flat_group(wid, nwg);
    let valid = o < p.oc;
    let n = select(0u, p.c, valid);
    let s = bitcast<f32>(p.scale);
    var q = 0.0;
    for (var i = lid; i < n; i += WG) {
        var low = 0.0;
        for (var k = 0u; k < p.r; k++) {
            low += b[o * p.r + k] * a[k * p.c + i];
        }
        let v = w[o * p.c + i] + s * low;
        q += v * v;
    }
    partial[lid] = q;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h >>= 1u) {
        if (lid < h) { partial[lid] += partial[lid + h]; }
        workgroupBarrier();
    }
    if (valid && lid == 0u) {
        let nr = sqrt(partial[0]);
        norm[o] = nr;
        g[o] = m[o] / nr;
    }
}

// dm (+)= dg / norm (flags & ACCUMULATE adds into dm).
@compute @workgroup_size(WG)
fn dora_scale_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let o = flat_group(wid, nwg) * WG + lid;
    if (o >= p.oc) { return; }
    let v = dg[o] / norm_in[o];
    dm[o] = select(v, dm[o] + v, (p.flags & ACCUMULATE) != 0u);
}
