// Cross-entropy of logits [N, V] against integer targets [N] (rows whose target is ignore_index are left
// out), mean over the kept rows. Forward: one workgroup per row computes the row's log-sum-exp in one online
// pass (saved for the backward); a single workgroup then reduces the rows in a fixed order, so the loss is
// deterministic. Backward: a single workgroup turns dloss into dloss / kept_rows, then one workgroup per row
// writes scale * (softmax - onehot) from the saved lse (no reduction needed).

struct Params { rows: u32, v: u32, ignore_index: u32, _p0: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
@group(0) @binding(4) var<storage, read_write> loss: array<f32>;
@group(0) @binding(5) var<storage, read> dloss: array<f32>;
@group(0) @binding(6) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(7) var<storage, read_write> scale: array<f32>;

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
    let n = select(0u, p.v, valid);
    let base = row * p.v;
    var m = NEG_BIG;
    var l = 0.0;
    for (var j = lid; j < n; j += WG) {
        let x = logits[base + j];
        if (x > m) {
            l = l * exp(m - x) + 1.0;
            m = x;
        } else {
            l += exp(x - m);
        }
    }
    let mx = row_max(m, lid);
    let total = row_sum(l * exp(m - mx), lid);
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
            s += lse[r] - logits[r * p.v + u32(t)];
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
    let base = row * p.v;
    let t = targets[row];
    // Ignored rows, and rows with an invalid target, get no gradient.
    let g = select(0.0, scale[0], !ignored(t) && in_range(t));
    let l = lse[row];
    for (var j = lid; j < p.v; j += WG) {
        let onehot = select(0.0, 1.0, i32(j) == t);
        dlogits[base + j] = g * (exp(logits[base + j] - l) - onehot);
    }
}
