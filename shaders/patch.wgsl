// ViT patch embedding's im2col with stride = kernel = p: x [B, C, H, W] -> out [B, Hp·Wp, C·p·p], Hp = H / p,
// Wp = W / p (floored, as Conv2d: a border narrower than p is dropped). Patches run row-major over the image;
// the last axis is ordered (c, dy, dx), as a PyTorch Conv2d weight [OC, C, p, p] flattens, so the patch
// embedding is this followed by a matmul with the weight viewed as [OC, C·p·p]. The backward is the inverse
// permutation, one invocation per input element (zero for the dropped border): no atomics, deterministic.

struct Params { b: u32, c: u32, h: u32, w: u32, p: u32, hp: u32, wp: u32, _p0: u32 }
@group(0) @binding(0) var<uniform> u: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> dout: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;

override WG: u32 = 64u;

@compute @workgroup_size(WG)
fn patch_unfold(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * WG + lid;
    let pp = u.p * u.p;
    let k_len = u.c * pp;
    let n_len = u.hp * u.wp;
    if (i >= u.b * n_len * k_len) { return; }
    let k = i % k_len;
    let n = (i / k_len) % n_len;
    let bi = i / (k_len * n_len);
    let ch = k / pp;
    let dy = (k % pp) / u.p;
    let dxx = k % u.p;
    let row = (n / u.wp) * u.p + dy;
    let col = (n % u.wp) * u.p + dxx;
    out[i] = x[((bi * u.c + ch) * u.h + row) * u.w + col];
}

@compute @workgroup_size(WG)
fn patch_unfold_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * WG + lid;
    if (i >= u.b * u.c * u.h * u.w) { return; }
    let col = i % u.w;
    let row = (i / u.w) % u.h;
    let ch = (i / (u.w * u.h)) % u.c;
    let bi = i / (u.w * u.h * u.c);
    let py = row / u.p;
    let px = col / u.p;
    if (py >= u.hp || px >= u.wp) {
        dx[i] = 0.0;
        return;
    }
    let n = py * u.wp + px;
    let k = (ch * u.p + row % u.p) * u.p + col % u.p;
    dx[i] = dout[(bi * u.hp * u.wp + n) * (u.c * u.p * u.p) + k];
}
