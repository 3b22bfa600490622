// Sums of f32 tensors viewed as [rows, n]. Over the last axis: one workgroup per row, each invocation striding
// the row, partial sums combined by `row_sum` from the row-variant prelude (subgroup or shared-memory tree).
// Over rows (bias gradients): one invocation per column adding the rows in order, so results are bitwise
// deterministic and need no atomics. Elements are V (f32, or vec4<f32> when N is a multiple of 4, for
// lavapipe's sake); p.nv counts them per row.

struct Params { rows: u32, n: u32, flags: u32, nv: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<V>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read_write> out_cols: array<V>;

override WG: u32 = 64u;
const MEAN: u32 = 1u;
const ACCUMULATE: u32 = 2u;

@compute @workgroup_size(WG)
fn sum_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg);
    // Surplus groups of a 2-D grid still take part in the reduction (no early return before barriers).
    let valid = row < p.rows;
    let n = select(0u, p.nv, valid);
    let base = row * p.nv;
    var s = V(0.0);
    for (var j = lid; j < n; j += WG) {
        s += x[base + j];
    }
    let total = row_sum(hsum(s), lid);
    if (valid && lid == 0u) {
        out[row] = select(total, total / f32(p.n), (p.flags & MEAN) != 0u);
    }
}

@compute @workgroup_size(WG)
fn sum_rows_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let c = flat_group(wid, nwg) * WG + lid;
    if (c >= p.nv) { return; }
    var s = V(0.0);
    for (var r = 0u; r < p.rows; r++) {
        s += x[r * p.nv + c];
    }
    if ((p.flags & MEAN) != 0u) { s = s / f32(p.rows); }
    if ((p.flags & ACCUMULATE) != 0u) { s += out_cols[c]; }
    out_cols[c] = s;
}
