// Cross-entropy of logits against integer targets (rows whose target is ignore_index are left out), mean over
// the kept rows. The logits may come as blocks: rows row0.. of the targets, classes offset.. of p.classes (an
// output head split by vocabulary rows, a batch of tokens taken a chunk at a time); the whole problem is one
// block. Forward: one workgroup per row computes its block row's log-sum-exp in one online pass and folds it
// into the row's running lse (the first block of a row writes it; saved for the backward), and picks the target
// logit when the target falls in the block. A single workgroup then reduces the rows in a fixed order into the
// block's share of the loss: sum over its kept rows of lse - logit[target], divided by the kept rows of all the
// targets, so the shares of row blocks add up to the mean and the loss is deterministic. Backward: a single
// workgroup turns dloss into dloss / kept rows, then one workgroup per row writes scale * (softmax - onehot)
// from the saved lse (no reduction needed). Row elements are V (f32, or vec4<f32> when V is a multiple of 4:
// vec4 loads are what lavapipe is fast at); p.vv counts them per row.

struct Params {
    rows: u32, v: u32, ignore_index: u32, vv: u32,
    // first class of the block, total classes, first target row of the block, rows of the targets
    offset: u32, classes: u32, row0: u32, all_rows: u32,
    // 1 for a row's first block: it writes lse instead of folding into it
    first: u32, _p0: u32, _p1: u32, _p2: u32,
}
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
// Each row's target logit, from whichever block holds it.
@group(0) @binding(9) var<storage, read_write> picked: array<f32>;

override WG: u32 = 64u;
const NEG_BIG: f32 = -3.0e38;

fn ignored(t: i32) -> bool {
    return t == bitcast<i32>(p.ignore_index);
}

fn in_range(t: i32) -> bool {
    return t >= 0 && u32(t) < p.classes;
}

// Whether class t is one of this block's columns.
fn in_block(t: i32) -> bool {
    return t >= 0 && u32(t) >= p.offset && u32(t) - p.offset < p.v;
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
        let b = mx + log(total);
        if (p.first != 0u) {
            lse[row] = b;
        } else {
            // log(e^a + e^b); a NaN in either survives (exp of NaN is NaN whichever max picks)
            let a = lse[row];
            let c = max(a, b);
            lse[row] = c + log(exp(a - c) + exp(b - c));
        }
        let t = targets[p.row0 + row];
        if (in_block(t)) {
            picked[row] = logits_f32[row * p.v + u32(t) - p.offset];
        }
    }
}

// One workgroup: loss[0] = sum over the block's kept rows of lse - logit[target], divided by the kept rows of
// all the targets. A target outside [0, classes) that is not ignore_index makes the loss NaN (PyTorch raises),
// so the error surfaces at the loss check.
@compute @workgroup_size(WG)
fn cross_entropy_forward_loss(@builtin(local_invocation_index) lid: u32) {
    let nan = bitcast<f32>(0x7fc00000u | (p.rows & 0u));
    var s = 0.0;
    for (var r = lid; r < p.rows; r += WG) {
        let t = targets[p.row0 + r];
        if (ignored(t)) { continue; }
        if (in_range(t)) {
            s += lse[r] - picked[r];
        } else {
            s += nan;
        }
    }
    var count = 0.0;
    for (var r = lid; r < p.all_rows; r += WG) {
        if (!ignored(targets[r])) { count += 1.0; }
    }
    let total = row_sum(s, lid);
    let kept = row_sum(count, lid);
    if (lid == 0u) {
        loss[0] = select(total / kept, 0.0, kept == 0.0);
    }
}

// One workgroup: scale[0] = dloss / kept rows of all the targets (0 when none are kept).
@compute @workgroup_size(WG)
fn cross_entropy_backward_scale(@builtin(local_invocation_index) lid: u32) {
    var count = 0.0;
    for (var r = lid; r < p.all_rows; r += WG) {
        if (!ignored(targets[r])) { count += 1.0; }
    }
    let kept = row_sum(count, lid);
    if (lid == 0u) {
        scale[0] = select(dloss[0] / kept, 0.0, kept == 0.0);
    }
}

// One workgroup: scale[0] = 1 / kept rows of all the targets (0 when none are kept): the gradient for a loss
// gradient of one, which a caller scales once the real one is known (a frozen head's input gradient computed in
// the forward pass).
@compute @workgroup_size(WG)
fn cross_entropy_backward_unit_scale(@builtin(local_invocation_index) lid: u32) {
    var count = 0.0;
    for (var r = lid; r < p.all_rows; r += WG) {
        if (!ignored(targets[r])) { count += 1.0; }
    }
    let kept = row_sum(count, lid);
    if (lid == 0u) {
        scale[0] = select(1.0 / kept, 0.0, kept == 0.0);
    }
}

@compute @workgroup_size(WG)
fn cross_entropy_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.vv;
    let t = targets[p.row0 + row];
    // Ignored rows, and rows with an invalid target, get no gradient.
    let g = select(0.0, scale[0], !ignored(t) && in_range(t));
    let l = lse[row];
    // The target's column in this block (none when it lies elsewhere: the wrap makes it >= v)
    let tv = U(bitcast<u32>(t) - p.offset);
    for (var j = lid; j < p.vv; j += WG) {
        let onehot = select(V(0.0), V(1.0), lane_index(j) == tv);
        dlogits[base + j] = g * (exp(logits[base + j] - l) - onehot);
    }
}
