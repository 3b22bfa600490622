// Column blocks of a row-major matrix: `concat_cols` writes src [N, w] into columns off..off+w of dst [N, W]
// (concatenation along the last axis, one part per call); `slice_cols` reads those columns back into dst [N, w]
// (its gradient); `place_cols` writes src [N, w] into those columns and zeros elsewhere, or with `accumulate`
// adds it into them and leaves the rest (the gradient of a slice: a chunk of rows is a column block of the
// matrix seen as one row).

struct Params { n: u32, w: u32, total: u32, off: u32, accumulate: u32, _p0: u32, _p1: u32, _p2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

override WG: u32 = 64u;

@compute @workgroup_size(WG)
fn concat_cols(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let k = flat_group(wid, nwg) * WG + lid;
    if (k >= p.n * p.w) { return; }
    let r = k / p.w;
    let j = k - r * p.w;
    dst[r * p.total + p.off + j] = src[k];
}

@compute @workgroup_size(WG)
fn slice_cols(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let k = flat_group(wid, nwg) * WG + lid;
    if (k >= p.n * p.w) { return; }
    let r = k / p.w;
    let j = k - r * p.w;
    dst[k] = src[r * p.total + p.off + j];
}

@compute @workgroup_size(WG)
fn place_cols(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let k = flat_group(wid, nwg) * WG + lid;
    if (p.accumulate != 0u) {
        if (k >= p.n * p.w) { return; }
        let r = k / p.w;
        let j = k - r * p.w;
        let at = r * p.total + p.off + j;
        dst[at] = dst[at] + src[k];
        return;
    }
    if (k >= p.n * p.total) { return; }
    let r = k / p.total;
    let j = k - r * p.total;
    let inside = j >= p.off && j - p.off < p.w;
    dst[k] = select(0.0, src[r * p.w + j - p.off], inside);
}
