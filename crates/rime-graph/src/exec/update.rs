//! Optimizer wiring: the per-group hyperparameter buffers, the optional global-norm clip, and one update
//! kernel per trainable parameter with its state (Adam moments, SGD momentum).

use rime_kernels::ops::optim;
use rime_kernels::DType;

use super::builder::{Builder, Kind, Phase, TRef};
use crate::graph::{Op, Var};
use crate::optim::{OptimConfig, OptimKind};
use crate::store::ParamId;

/// The hyperparameter slots (one per group) and each parameter's optimizer-state slots.
pub(crate) struct Wired {
    pub hyper: Vec<TRef>,
    pub opt_state: Vec<(ParamId, Vec<usize>)>,
}

pub(crate) fn wire(b: &mut Builder, cfg: &OptimConfig, param_grads: &[(ParamId, usize)]) -> Wired {
    let hyper: Vec<TRef> = cfg.groups.iter().map(|_| b.slot(&[8], DType::F32, Kind::Fixed)).collect();
    if let Some(max_norm) = cfg.max_grad_norm {
        clip(b, &hyper, param_grads, max_norm);
    }
    let opt_state = param_grads.iter().map(|&(id, slot)| (id, update(b, cfg, &hyper, id, slot))).collect();
    Wired { hyper, opt_state }
}

fn grad_ref(b: &Builder, id: ParamId, slot: usize) -> TRef {
    TRef { slot, shape: b.store.get(id).tensor.shape.clone(), dtype: DType::F32 }
}

/// Sum of squares over every gradient, then each group's hyperparameters get the clip factor.
fn clip(b: &mut Builder, hyper: &[TRef], param_grads: &[(ParamId, usize)], max_norm: f32) {
    let acc = b.scratch(&[1]);
    for (k, &(id, slot)) in param_grads.iter().enumerate() {
        let g = grad_ref(b, id, slot);
        b.call("grad_sumsq_forward", Phase::Optim, &[&acc, &g], move |d, t| {
            optim::grad_sumsq_forward(d, &t[0], &t[1], k > 0)
        });
    }
    for h in hyper {
        b.call("clip_scale_forward", Phase::Optim, &[h, &acc], move |d, t| {
            optim::clip_scale_forward(d, &t[0], &t[1], max_norm)
        });
    }
}

/// The update of one parameter; returns its state slots.
fn update(b: &mut Builder, cfg: &OptimConfig, hyper: &[TRef], id: ParamId, slot: usize) -> Vec<usize> {
    let p = b.store.get(id);
    let shape = p.tensor.shape.clone();
    let node = b.g.nodes.iter().position(|nd| matches!(nd.op, Op::Param(q) if q == id)).unwrap_or(0);
    let pr = b.v(Var(node));
    let g = grad_ref(b, id, slot);
    let h = hyper[p.group.min(hyper.len() - 1)].clone();
    match cfg.kind {
        OptimKind::AdamW { .. } => {
            let (m, v) = (b.slot(&shape, DType::F32, Kind::OptState), b.slot(&shape, DType::F32, Kind::OptState));
            b.call("adamw_update", Phase::Optim, &[&pr, &g, &m, &v, &h], |d, t| {
                optim::adamw_update(d, &t[0], &t[1], &t[2], &t[3], &t[4])
            });
            vec![m.slot, v.slot]
        }
        OptimKind::Sgd { .. } => {
            let m = b.slot(&shape, DType::F32, Kind::OptState);
            b.call("sgd_update", Phase::Optim, &[&pr, &g, &m, &h], |d, t| {
                optim::sgd_update(d, &t[0], &t[1], &t[2], &t[3])
            });
            vec![m.slot]
        }
    }
}
