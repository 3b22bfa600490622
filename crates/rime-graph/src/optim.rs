//! Optimizer configuration: AdamW or SGD with momentum, parameter groups with their own learning rate and
//! weight decay, learning-rate schedules and gradient clipping. The update itself runs on the GPU
//! (`shaders/optim.wgsl`); per-step values reach it through a small `hyper` tensor per group.

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimKind {
    AdamW { beta1: f32, beta2: f32, eps: f32 },
    Sgd { momentum: f32 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParamGroup {
    /// Multiplies the scheduled learning rate.
    pub lr_scale: f32,
    pub weight_decay: f32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedule {
    Constant,
    /// Linear warmup over `warmup` steps, then linear decay to 0 at `total`.
    Linear {
        warmup: u64,
        total: u64,
    },
    /// Linear warmup, then half-cosine decay to 0 at `total`.
    Cosine {
        warmup: u64,
        total: u64,
    },
}

impl LrSchedule {
    /// Multiplier of the base learning rate for optimizer step `step` (0-based), as transformers'
    /// get_linear_schedule_with_warmup / get_cosine_schedule_with_warmup compute it.
    pub fn factor(&self, step: u64) -> f32 {
        match *self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Linear { warmup, total } | LrSchedule::Cosine { warmup, total } => {
                if step < warmup {
                    return step as f32 / warmup.max(1) as f32;
                }
                let progress = (step - warmup) as f32 / (total.saturating_sub(warmup)).max(1) as f32;
                let progress = progress.min(1.0);
                if matches!(self, LrSchedule::Linear { .. }) {
                    (1.0 - progress).max(0.0)
                } else {
                    0.5 * (1.0 + (std::f32::consts::PI * progress).cos())
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OptimConfig {
    pub kind: OptimKind,
    pub lr: f32,
    pub schedule: LrSchedule,
    /// Group 0 is the default; a parameter's `group` indexes this list.
    pub groups: Vec<ParamGroup>,
    /// Clip the global gradient norm to this value (torch.nn.utils.clip_grad_norm_).
    pub max_grad_norm: Option<f32>,
}

impl OptimConfig {
    /// PyTorch's AdamW defaults with the given learning rate and weight decay.
    pub fn adamw(lr: f32, weight_decay: f32) -> Self {
        OptimConfig {
            kind: OptimKind::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
            lr,
            schedule: LrSchedule::Constant,
            groups: vec![ParamGroup { lr_scale: 1.0, weight_decay }],
            max_grad_norm: None,
        }
    }
    pub fn sgd(lr: f32, momentum: f32, weight_decay: f32) -> Self {
        OptimConfig {
            kind: OptimKind::Sgd { momentum },
            lr,
            schedule: LrSchedule::Constant,
            groups: vec![ParamGroup { lr_scale: 1.0, weight_decay }],
            max_grad_norm: None,
        }
    }

    /// The `hyper` words for group `g` at optimizer step `step` (0-based; the update is step+1):
    /// [lr, beta1, beta2, eps, weight_decay, 1-beta1^t, 1-beta2^t, grad_scale].
    pub fn hyper(&self, g: usize, step: u64) -> [f32; 8] {
        let group = &self.groups[g.min(self.groups.len() - 1)];
        let lr = self.lr * group.lr_scale * self.schedule.factor(step);
        let t = (step + 1) as i32;
        match self.kind {
            OptimKind::AdamW { beta1, beta2, eps } => [
                lr,
                beta1,
                beta2,
                eps,
                group.weight_decay,
                1.0 - (beta1 as f64).powi(t) as f32,
                1.0 - (beta2 as f64).powi(t) as f32,
                1.0,
            ],
            OptimKind::Sgd { momentum } => [lr, momentum, 0.0, 0.0, group.weight_decay, 1.0, 1.0, 1.0],
        }
    }
}
