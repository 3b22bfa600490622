// Embedding lookup out[i, c] = table[ids[i], c] (table f32, f16 or bf16 through the prelude's load_w), and its
// gradient. An id >= V gives a zero row: the launcher cannot see ids, so the kernel guards instead of reading
// out of bounds. The backward scatter-add runs one invocation per channel walking the ids in order, so
// repeated ids accumulate deterministically without atomics.

// `off`: the table holds rows off..off+V of a larger vocabulary (a table split by rows); id - off wraps below 0
// to a huge value, which gives a zero row like any id past the table.
struct Params { n: u32, c: u32, v: u32, off: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
// binding 2: the table, declared by the prelude with load_w.
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> dout: array<f32>;
@group(0) @binding(5) var<storage, read_write> dtable: array<f32>;

override WG: u32 = 64u;

@compute @workgroup_size(WG)
fn embedding_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let k = flat_group(wid, nwg) * WG + lid;
    if (k >= p.n * p.c) { return; }
    let i = k / p.c;
    let ch = k - i * p.c;
    let id = ids[i] - p.off;
    var v = 0.0;
    if (id < p.v) { v = load_w(id * p.c + ch); }
    out[k] = v;
}

@compute @workgroup_size(WG)
fn embedding_backward_zero(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let k = flat_group(wid, nwg) * WG + lid;
    if (k >= p.v * p.c) { return; }
    dtable[k] = 0.0;
}

@compute @workgroup_size(WG)
fn embedding_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let ch = flat_group(wid, nwg) * WG + lid;
    if (ch >= p.c) { return; }
    for (var i = 0u; i < p.n; i++) {
        let id = ids[i] - p.off;
        if (id < p.v) {
            let k = id * p.c + ch;
            dtable[k] = dtable[k] + dout[i * p.c + ch];
        }
    }
}
