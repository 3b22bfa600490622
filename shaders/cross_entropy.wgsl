// Cross-entropy of logits [N, V] against integer targets [N] (rows whose target is ignore_index are left
// out), mean over the kept rows. Forward: one workgroup per row computes the row's log-sum-exp in one online
// pass (saved for the backward); a single workgroup then reduces the rows in a fixed order, so the loss is
// deterministic. Backward: a single workgroup turns dloss into dloss / kept_rows, then one workgroup per row
// writes scale * (softmax - onehot) from the saved lse (no reduction needed). Row elements are V (f32, or
// vec4<f32> when V is a multiple of 4: vec4 loads are what lavapipe is fast at); p.vv counts them per row.

struct Params { rows: u32, v: u32, ignore_index: u32, vv: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<V>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
@group(0) @binding(4) var<storage, read_write> loss: array<f32>;
@group(0) @binding(5) var<storage, read> dloss: array<f32>;
@group(0) @binding(6) var<storage, read_write> dlogits: array<V>;
@group(0) @binding(7) var<storage, read_write> scale: array<f32>;
// The logits again, element-wise, for picking the target logit.
@group(0) @binding(8) var<storage, read> logits_f32: array<f32>;

override WG: u32 = 64u;
const NEG_BIG: f32 = -3.0e38;

fn ignored(t: i32) -> bool {
    return t == bitcast<i32>(p.ignore_index);
}

fn in_range(t: i32) -> bool {
    return t >= 0 && u32(t) < p.v;
}

@compute @workgroup_size(WG)
fn cross_entropy_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg);
    let valid = row < p.rows;
    let n = select(0u, p.vv, valid);
    let base = row * p.vv;
    // Running max and rescaled sum per component (two exps per element, but no divergent branch).
    var m = V(NEG_BIG);
    var l = V(0.0);
    for (var j = lid; j < n; j += WG) {
        let x = logits[base + j];
        let mn = max(m, x);
        l = l * exp(m - mn) + exp(x - mn);
        m = mn;
    }
    let mx = row_max(hmax(m), lid);
    let total = row_sum(hsum(l * exp(m - mx)), lid);
    if (valid && lid == 0u) {
        lse[row] = mx + log(total);
    }
}

// One workgroup: loss[0] = mean over kept rows of lse - logit[target]. A target outside [0, V) that is not
// ignore_index makes the loss NaN (PyTorch raises), so the error surfaces at the loss check.
@compute @workgroup_size(WG)
fn cross_entropy_forward_loss(@builtin(local_invocation_index) lid: u32) {
    let nan = bitcast<f32>(0x7fc00000u | (p.rows & 0u));
    var s = 0.0;
    var count = 0.0;
    for (var r = lid; r < p.rows; r += WG) {
        let t = targets[r];
        if (ignored(t)) { continue; }
        count += 1.0;
        if (in_range(t)) {
            s += lse[r] - logits_f32[r * p.v + u32(t)];
        } else {
            s += nan;
        }
    }
    let total = row_sum(s, lid);
    let kept = row_sum(count, lid);
    if (lid == 0u) {
        loss[0] = select(total / kept, 0.0, kept == 0.0);
    }
}

// One workgroup: scale[0] = dloss / kept rows (0 when none are kept).
@compute @workgroup_size(WG)
fn cross_entropy_backward_scale(@builtin(local_invocation_index) lid: u32) {
    var count = 0.0;
    for (var r = lid; r < p.rows; r += WG) {
        if (!ignored(targets[r])) { count += 1.0; }
    }
    let kept = row_sum(count, lid);
    if (lid == 0u) {
        scale[0] = select(dloss[0] / kept, 0.0, kept == 0.0);
    }
}

@compute @workgroup_size(WG)
fn cross_entropy_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.vv;
    let t = targets[row];
    // Ignored rows, and rows with an invalid target, get no gradient.
    let g = select(0.0, scale[0], !ignored(t) && in_range(t));
    let l = lse[row];
    let tv = U(bitcast<u32>(t));
    for (var j = lid; j < p.vv; j += WG) {
        let onehot = select(V(0.0), V(1.0), lane_index(j) == tv);
        dlogits[base + j] = g * (exp(logits[base + j] - l) - onehot);
    }
}
