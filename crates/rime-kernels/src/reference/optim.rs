//! CPU reference for shaders/optim.wgsl: the same operation order as torch.optim.AdamW / SGD and
//! torch.nn.utils.clip_grad_norm_, on slices. `hyper` is [lr, beta1, beta2, eps, weight_decay,
//! 1-beta1^t, 1-beta2^t, grad_scale].

/// One AdamW step in place (see ops::optim::adamw_update).
pub fn adamw_update(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hyper: &[f32]) {
    let [lr, b1, b2, eps, wd, bc1, bc2, scale] = hyper8(hyper);
    for i in 0..param.len() {
        let g = grad[i] * scale;
        let x = param[i] * (1.0 - lr * wd);
        let w1 = 1.0 - b1;
        let mi = if w1.abs() < 0.5 { m[i] + w1 * (g - m[i]) } else { g - (g - m[i]) * (1.0 - w1) };
        let vi = v[i] * b2 + (1.0 - b2) * g * g;
        let denom = vi.sqrt() / bc2.sqrt() + eps;
        param[i] = x + (-(lr / bc1) * mi) / denom;
        m[i] = mi;
        v[i] = vi;
    }
}

/// One SGD-with-momentum step in place (hyper\[1] = momentum, dampening 0; `momentum_buf` starts at zero).
pub fn sgd_update(param: &mut [f32], grad: &[f32], momentum_buf: &mut [f32], hyper: &[f32]) {
    let [lr, momentum, _, _, wd, _, _, scale] = hyper8(hyper);
    for i in 0..param.len() {
        let d = grad[i] * scale + wd * param[i];
        let buf = momentum_buf[i] * momentum + d;
        momentum_buf[i] = buf;
        param[i] += -lr * buf;
    }
}

/// acc\[0] (+)= sum(grad²), accumulated in f64.
pub fn grad_sumsq_forward(acc: &mut [f32], grad: &[f32], accumulate: bool) {
    let s: f64 = grad.iter().map(|&g| (g as f64) * (g as f64)).sum();
    acc[0] = if accumulate { (acc[0] as f64 + s) as f32 } else { s as f32 };
}

/// hyper\[7] = min(1, max_norm / (sqrt(acc\[0]) + 1e-6)).
pub fn clip_scale_forward(hyper: &mut [f32], acc: &[f32], max_norm: f32) {
    hyper[7] = (max_norm / (acc[0].sqrt() + 1e-6)).min(1.0);
}

fn hyper8(h: &[f32]) -> [f32; 8] {
    let mut o = [0.0; 8];
    o.copy_from_slice(&h[..8]);
    o
}
