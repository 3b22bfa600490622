// A KV cache written in place at a position read when the kernel runs (one u32), so one recorded dispatch
// serves every decode step. cache_write: rows src [T, R] go to rows pos..pos+T of cache [S, R] (rows past S are
// dropped, never written out of bounds). cache_mask: mask [B, S] = 1 where s < pos + T (the filled prefix
// after writing T rows at pos), else 0: attention over the whole cache under this mask attends exactly to the
// tokens so far.

struct Params { t: u32, r: u32, s: u32, b: u32 }
@group(0) @binding(0) var<uniform> u: Params;
@group(0) @binding(1) var<storage, read> pos: array<u32>;
@group(0) @binding(2) var<storage, read> src: array<f32>;
@group(0) @binding(3) var<storage, read_write> cache: array<f32>;
@group(0) @binding(4) var<storage, read_write> mask: array<f32>;

override WG: u32 = 64u;

@compute @workgroup_size(WG)
fn cache_write(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * WG + lid;
    if (i >= u.t * u.r) { return; }
    let row = pos[0] + i / u.r;
    if (row >= u.s) { return; }
    cache[row * u.r + i % u.r] = src[i];
}

@compute @workgroup_size(WG)
fn cache_mask(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * WG + lid;
    if (i >= u.b * u.s) { return; }
    mask[i] = select(0.0, 1.0, i % u.s < pos[0] + u.t);
}
