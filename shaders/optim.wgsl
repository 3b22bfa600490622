// Optimizer updates and gradient clipping for the training step. Nothing here is read back to the CPU: the
// per-step scalars live in `hyper` [8] = [lr, beta1, beta2, eps, weight_decay, 1-beta1^t, 1-beta2^t,
// grad_scale], rewritten by the executor with queue.write_buffer, and grad_scale is written on the GPU by
// clip_scale_forward. The update formulas follow PyTorch's single-tensor AdamW / SGD operation by operation,
// so rounding matches as closely as f32 allows.

struct Params { n: u32, parts: u32, accumulate: u32, max_norm: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<storage, read> hyper: array<f32>;
@group(0) @binding(6) var<storage, read_write> partial: array<f32>;
@group(0) @binding(7) var<storage, read_write> acc: array<f32>;
@group(0) @binding(8) var<storage, read_write> hyper_rw: array<f32>;

override WG: u32 = 64u;

fn elem(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return flat_group(wid, nwg) * WG + lid;
}

// torch.optim.AdamW (foreach=False, amsgrad=False): decoupled decay, then lerp/addcmul moments, then addcdiv.
@compute @workgroup_size(WG)
fn adamw_update(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = elem(wid, nwg, lid);
    if (i >= p.n) { return; }
    let lr = hyper[0];
    let b1 = hyper[1];
    let b2 = hyper[2];
    let eps = hyper[3];
    let wd = hyper[4];
    let bc1 = hyper[5];
    let bc2 = hyper[6];
    let g = grad[i] * hyper[7];
    var x = param[i] * (1.0 - lr * wd);
    // exp_avg.lerp_(grad, 1 - beta1): torch's lerp takes this branch for weights below one half.
    let w1 = 1.0 - b1;
    var mi = m[i];
    if (abs(w1) < 0.5) { mi = mi + w1 * (g - mi); } else { mi = g - (g - mi) * (1.0 - w1); }
    let vi = v[i] * b2 + (1.0 - b2) * g * g;
    let denom = sqrt(vi) / sqrt(bc2) + eps;
    let step_size = lr / bc1;
    x = x + (-step_size * mi) / denom;
    m[i] = mi;
    v[i] = vi;
    param[i] = x;
}

// torch.optim.SGD with momentum (dampening 0, nesterov off). A zero-initialised buffer reproduces torch's first
// step (buf = d_p) exactly, since momentum * 0 + d_p == d_p.
@compute @workgroup_size(WG)
fn sgd_update(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = elem(wid, nwg, lid);
    if (i >= p.n) { return; }
    let lr = hyper[0];
    let momentum = hyper[1];
    let wd = hyper[4];
    let x = param[i];
    let d = grad[i] * hyper[7] + wd * x;
    let buf = m[i] * momentum + d;
    m[i] = buf;
    param[i] = x + (-lr) * buf;
}

// Stage 1 of the squared-norm reduction: invocation j sums the strided elements j, j + parts, ... so that
// neighbouring lanes read neighbouring words; the fixed order makes the result deterministic.
@compute @workgroup_size(WG)
fn grad_sumsq_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let j = elem(wid, nwg, lid);
    if (j >= p.parts) { return; }
    var s = 0.0;
    for (var i = j; i < p.n; i += p.parts) {
        let g = grad[i];
        s = fma(g, g, s);
    }
    partial[j] = s;
}

// Stage 2: one invocation folds the partial sums in index order into acc[0].
@compute @workgroup_size(1)
fn grad_sumsq_finish_forward() {
    var s = 0.0;
    for (var j = 0u; j < p.parts; j++) { s += partial[j]; }
    if (p.accumulate != 0u) { s = acc[0] + s; }
    acc[0] = s;
}

// torch.nn.utils.clip_grad_norm_: coefficient max_norm / (total_norm + 1e-6), clamped at 1.
@compute @workgroup_size(1)
fn clip_scale_forward() {
    let total = sqrt(acc[0]);
    let coef = bitcast<f32>(p.max_norm) / (total + 1e-6);
    hyper_rw[7] = min(coef, 1.0);
}
