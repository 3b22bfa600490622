//! The executor: autodiff, buffer planning and the one-submit training step.
//!
//! Building an executor walks the graph once: forward calls for every node, then (when training) backward
//! calls in reverse order, generated only for nodes that lead to a trainable parameter, then the optimizer
//! update. Each call names the slots it reads and writes; planned slots (activations, activation gradients,
//! scratch) get buffers by liveness, reusing freed buffers of the same size. Dispatches (pipelines, bind
//! groups, parameters) are then built once and recorded unchanged every step.

use std::collections::HashMap;

use rime_kernels::ops::{
    attention, cross_entropy, dora, elementwise, embedding, lora, matmul, norm, optim, prepend, reduce, rope, softmax,
};
use rime_kernels::{DType, Device, Dispatch, Tensor};

use crate::error::{Error, Result};
use crate::graph::{Graph, Op, Var};
use crate::optim::{OptimConfig, OptimKind};
use crate::store::{ParamId, ParamStore};

#[derive(Clone, Debug)]
struct TRef {
    slot: usize,
    shape: Vec<usize>,
    dtype: DType,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    FrozenParam,
    TrainParam,
    ParamGrad,
    Input,
    OptState,
    Fixed,
    Planned,
}

struct Slot {
    bytes: u64,
    kind: Kind,
    tensor: Option<Tensor>,
}

type Build = Box<dyn Fn(&Device, &dyn Fn(&TRef) -> Tensor) -> rime_kernels::Result<Vec<Dispatch>>>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Forward,
    Backward,
    Optim,
}

struct Call {
    name: &'static str,
    phase: Phase,
    reads: Vec<usize>,
    writes: Vec<usize>,
    build: Build,
}

/// Bytes held per category.
#[derive(Debug, Clone, Default)]
pub struct MemoryReport {
    pub frozen_weights: u64,
    pub trainable_params: u64,
    pub gradients: u64,
    /// Gradient bytes held for frozen parameters (always zero: the point of a frozen backbone).
    pub frozen_gradients: u64,
    pub optimizer_state: u64,
    pub activation_peak: u64,
    pub inputs: u64,
}

impl MemoryReport {
    pub fn total(&self) -> u64 {
        self.frozen_weights
            + self.trainable_params
            + self.gradients
            + self.optimizer_state
            + self.activation_peak
            + self.inputs
    }
}

impl std::fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let row = |f: &mut std::fmt::Formatter<'_>, name: &str, b: u64| {
            writeln!(f, "{name:<20}{b:>14} bytes {:>11.3} MiB", b as f64 / (1024.0 * 1024.0))
        };
        row(f, "frozen weights", self.frozen_weights)?;
        row(f, "trainable params", self.trainable_params)?;
        row(f, "gradients", self.gradients)?;
        row(f, "  of frozen weights", self.frozen_gradients)?;
        row(f, "optimizer state", self.optimizer_state)?;
        row(f, "activation peak", self.activation_peak)?;
        row(f, "inputs", self.inputs)?;
        write!(f, "{:<20}{:>14} bytes {:>11.3} MiB", "total", self.total(), self.total() as f64 / (1024.0 * 1024.0))
    }
}

/// What a training step reports.
#[derive(Debug, Clone, Copy)]
pub struct StepOutput {
    /// The loss of the step before this one (read without stalling this one); None on the first step.
    pub prev_loss: Option<f32>,
}

pub struct Executor {
    graph: Graph,
    slots: Vec<Slot>,
    var_ref: Vec<Option<TRef>>,
    grad_ref: HashMap<Var, TRef>,
    inputs: HashMap<String, Var>,
    forward: Vec<Dispatch>,
    backward: Vec<Dispatch>,
    optim: Vec<Dispatch>,
    /// Dropout dispatches (phase, index in that phase's list, graph seed), reseeded every step.
    dropouts: Vec<(Phase, usize, u32)>,
    /// Micro-batches run since the last optimizer update (each draws its own dropout masks).
    micro: u64,
    param_grads: Vec<(ParamId, usize)>,
    opt_state: Vec<(ParamId, Vec<usize>)>,
    hyper: Vec<usize>,
    dloss: Option<usize>,
    loss: Option<Var>,
    optim_cfg: Option<OptimConfig>,
    staging: Vec<wgpu::Buffer>,
    pending: Option<usize>,
    /// Optimizer steps taken (for bias correction and schedules).
    pub step: u64,
    report: MemoryReport,
    dispatch_count: usize,
}

use rime_kernels::wgpu;

struct Builder<'g> {
    g: &'g Graph,
    store: &'g ParamStore,
    slots: Vec<Slot>,
    var_ref: Vec<Option<TRef>>,
    grad_ref: HashMap<Var, TRef>,
    calls: Vec<Call>,
    needs: Vec<bool>,
    param_grad: HashMap<ParamId, usize>,
    /// Extra tensors a forward kernel saves for its backward (lse, mean/rstd, LoRA's x·Aᵀ).
    aux: HashMap<Var, Vec<TRef>>,
    /// Calls (by index) that are dropouts, with their graph seed: their masks are redrawn every step.
    reseed: Vec<(usize, u32)>,
}

fn bytes_of(shape: &[usize], dtype: DType) -> u64 {
    dtype.storage_bytes(shape.iter().product())
}

/// How a backward kernel should write a gradient contribution.
struct Target {
    r: TRef,
    accumulate: bool,
    /// When set, the kernel wrote a temporary that must then be added into this gradient.
    add_into: Option<TRef>,
}

impl<'g> Builder<'g> {
    fn slot(&mut self, shape: &[usize], dtype: DType, kind: Kind) -> TRef {
        self.slots.push(Slot { bytes: bytes_of(shape, dtype), kind, tensor: None });
        TRef { slot: self.slots.len() - 1, shape: shape.to_vec(), dtype }
    }

    fn v(&self, v: Var) -> TRef {
        self.var_ref[v.0].clone().expect("forward value defined before use")
    }

    fn call(&mut self, name: &'static str, phase: Phase, reads: &[&TRef], writes: &[&TRef], build: Build) {
        self.calls.push(Call {
            name,
            phase,
            reads: reads.iter().map(|r| r.slot).collect(),
            writes: writes.iter().map(|r| r.slot).collect(),
            build,
        });
    }

    fn is_train_param(&self, v: Var) -> Option<ParamId> {
        match self.g.node(v).op {
            Op::Param(id) if self.store.get(id).trainable => Some(id),
            _ => None,
        }
    }

    /// Where a gradient contribution to `v` goes. `can_accumulate`: the kernel can add into its output.
    fn target(&mut self, v: Var, can_accumulate: bool) -> Target {
        let shape = self.g.shape(v).to_vec();
        let existing = if let Some(id) = self.is_train_param(v) {
            let slot = self.param_grad[&id];
            Some(TRef { slot, shape: shape.clone(), dtype: DType::F32 })
        } else {
            self.grad_ref.get(&v).cloned()
        };
        match existing {
            Some(r) if can_accumulate => Target { r, accumulate: true, add_into: None },
            Some(r) => {
                let tmp = self.slot(&shape, DType::F32, Kind::Planned);
                Target { r: tmp, accumulate: false, add_into: Some(r) }
            }
            None => {
                let r = self.slot(&shape, DType::F32, Kind::Planned);
                self.grad_ref.insert(v, r.clone());
                Target { r, accumulate: false, add_into: None }
            }
        }
    }

    /// A scratch output for a gradient nobody needs (a kernel that computes two at once).
    fn scratch_target(&mut self, v: Var) -> Target {
        let shape = self.g.shape(v).to_vec();
        Target { r: self.slot(&shape, DType::F32, Kind::Planned), accumulate: false, add_into: None }
    }

    fn finish(&mut self, t: &Target) {
        if let Some(into) = &t.add_into {
            let (a, b) = (into.clone(), t.r.clone());
            self.call(
                "add_inplace",
                Phase::Backward,
                &[&t.r, into],
                &[into],
                Box::new(move |d, r| elementwise::add_inplace_forward(d, &r(&a), &r(&b), 1.0)),
            );
        }
    }

    fn forward_node(&mut self, i: usize) -> Result<()> {
        let node = &self.g.nodes[i];
        let out_shape = node.shape.clone();
        let v = Var(i);
        let op = node.op.clone();
        let out = match op {
            Op::Input => self.slot(&out_shape, node.dtype, Kind::Input),
            Op::Param(id) => {
                let p = self.store.get(id);
                let kind = if p.trainable { Kind::TrainParam } else { Kind::FrozenParam };
                // Only frozen parameters are read through texture twins: the optimizer writes trainable buffers.
                let mut t = p.tensor.clone();
                if p.trainable {
                    t.texture = None;
                }
                self.slots.push(Slot { bytes: t.bytes(), kind, tensor: Some(t) });
                TRef { slot: self.slots.len() - 1, shape: out_shape.clone(), dtype: p.tensor.dtype }
            }
            Op::Reshape { x } => {
                let xr = self.v(x);
                TRef { slot: xr.slot, shape: out_shape.clone(), dtype: xr.dtype }
            }
            _ => self.slot(&out_shape, DType::F32, Kind::Planned),
        };
        self.var_ref[i] = Some(out.clone());
        let o = out.clone();
        let ow = out.clone();
        macro_rules! unary {
            ($x:expr, $f:expr) => {{
                let xr = self.v($x);
                let x2 = xr.clone();
                let f = $f;
                self.call(op.name(), Phase::Forward, &[&xr], &[&ow], Box::new(move |d, r| f(d, &r(&o), &r(&x2))));
            }};
        }
        match op {
            Op::Input | Op::Param(_) | Op::Reshape { .. } => {}
            Op::Matmul { a, b, bias, ta, tb } => {
                let (ar, br, biasr) = (self.v(a), self.v(b), bias.map(|x| self.v(x)));
                let mut reads = vec![&ar, &br];
                if let Some(bb) = &biasr {
                    reads.push(bb);
                }
                let (a2, b2, bias2) = (ar.clone(), br.clone(), biasr.clone());
                self.call(
                    "matmul_forward",
                    Phase::Forward,
                    &reads,
                    &[&ow],
                    Box::new(move |d, r| {
                        let bias_t = bias2.as_ref().map(r);
                        matmul::matmul_forward(d, &r(&o), &r(&a2), &r(&b2), bias_t.as_ref(), ta, tb)
                    }),
                );
            }
            Op::Lora { x, w, bias, a, b, scale } => {
                let mut h_shape = out_shape[..out_shape.len() - 1].to_vec();
                h_shape.push(self.g.shape(a)[0]);
                let h = self.slot(&h_shape, DType::F32, Kind::Planned);
                self.aux.insert(v, vec![h.clone()]);
                let (xr, wr, ar, br, biasr) = (self.v(x), self.v(w), self.v(a), self.v(b), bias.map(|z| self.v(z)));
                let mut reads = vec![&xr, &wr, &ar, &br];
                if let Some(bb) = &biasr {
                    reads.push(bb);
                }
                let (x2, w2, a2, b2, bias2, h2) =
                    (xr.clone(), wr.clone(), ar.clone(), br.clone(), biasr.clone(), h.clone());
                self.call(
                    "lora_forward",
                    Phase::Forward,
                    &reads,
                    &[&ow, &h],
                    Box::new(move |d, r| {
                        let bias_t = bias2.as_ref().map(r);
                        lora::lora_forward(
                            d,
                            &r(&o),
                            &r(&h2),
                            &r(&x2),
                            &r(&w2),
                            bias_t.as_ref(),
                            &r(&a2),
                            &r(&b2),
                            scale,
                        )
                    }),
                );
            }
            Op::DoraScale { w, a, b, m, scale } => {
                let norm = self.slot(&out_shape, DType::F32, Kind::Planned);
                self.aux.insert(v, vec![norm.clone()]);
                let (wr, ar, br, mr) = (self.v(w), self.v(a), self.v(b), self.v(m));
                let (w2, a2, b2, m2, n2) = (wr.clone(), ar.clone(), br.clone(), mr.clone(), norm.clone());
                self.call(
                    "dora_scale_forward",
                    Phase::Forward,
                    &[&wr, &ar, &br, &mr],
                    &[&ow, &norm],
                    Box::new(move |d, r| {
                        dora::dora_scale_forward(d, &r(&o), &r(&n2), &r(&w2), &r(&a2), &r(&b2), &r(&m2), scale)
                    }),
                );
            }
            Op::Add { a, b } => {
                let (ar, br) = (self.v(a), self.v(b));
                let (a2, b2) = (ar.clone(), br.clone());
                self.call(
                    "add_forward",
                    Phase::Forward,
                    &[&ar, &br],
                    &[&ow],
                    Box::new(move |d, r| elementwise::add_forward(d, &r(&o), &r(&a2), &r(&b2))),
                );
            }
            Op::Mul { a, b } => {
                let (ar, br) = (self.v(a), self.v(b));
                let (a2, b2) = (ar.clone(), br.clone());
                self.call(
                    "mul_forward",
                    Phase::Forward,
                    &[&ar, &br],
                    &[&ow],
                    Box::new(move |d, r| elementwise::mul_forward(d, &r(&o), &r(&a2), &r(&b2))),
                );
            }
            Op::Scale { x, s } => {
                unary!(x, move |d: &Device, o: &Tensor, x: &Tensor| elementwise::scale_forward(d, o, x, s))
            }
            Op::Gelu { x, tanh } => {
                unary!(x, move |d: &Device, o: &Tensor, x: &Tensor| elementwise::gelu_forward(d, o, x, tanh))
            }
            Op::Silu { x } => unary!(x, |d: &Device, o: &Tensor, x: &Tensor| elementwise::silu_forward(d, o, x)),
            Op::Relu { x } => unary!(x, |d: &Device, o: &Tensor, x: &Tensor| elementwise::relu_forward(d, o, x)),
            Op::Dropout { x, p, seed } => {
                unary!(x, move |d: &Device, o: &Tensor, x: &Tensor| elementwise::dropout_forward(d, o, x, p, seed));
                self.reseed.push((self.calls.len() - 1, seed));
            }
            Op::Rope { x, pos_offset, theta } => {
                unary!(x, move |d: &Device, o: &Tensor, x: &Tensor| rope::rope_forward(d, o, x, pos_offset, theta))
            }
            Op::LayerNorm { x, gamma, beta, eps } => {
                let rows = [self.g.shape(x).iter().rev().skip(1).product::<usize>()];
                let (mean, rstd) =
                    (self.slot(&rows, DType::F32, Kind::Planned), self.slot(&rows, DType::F32, Kind::Planned));
                self.aux.insert(v, vec![mean.clone(), rstd.clone()]);
                let (xr, gr, br) = (self.v(x), self.v(gamma), self.v(beta));
                let (x2, g2, b2, m2, s2) = (xr.clone(), gr.clone(), br.clone(), mean.clone(), rstd.clone());
                self.call(
                    "layernorm_forward",
                    Phase::Forward,
                    &[&xr, &gr, &br],
                    &[&ow, &mean, &rstd],
                    Box::new(move |d, r| {
                        norm::layernorm_forward(d, &r(&o), &r(&m2), &r(&s2), &r(&x2), &r(&g2), &r(&b2), eps)
                    }),
                );
            }
            Op::RmsNorm { x, gamma, eps } => {
                let rows = [self.g.shape(x).iter().rev().skip(1).product::<usize>()];
                let rstd = self.slot(&rows, DType::F32, Kind::Planned);
                self.aux.insert(v, vec![rstd.clone()]);
                let (xr, gr) = (self.v(x), self.v(gamma));
                let (x2, g2, s2) = (xr.clone(), gr.clone(), rstd.clone());
                self.call(
                    "rmsnorm_forward",
                    Phase::Forward,
                    &[&xr, &gr],
                    &[&ow, &rstd],
                    Box::new(move |d, r| norm::rmsnorm_forward(d, &r(&o), &r(&s2), &r(&x2), &r(&g2), eps)),
                );
            }
            Op::Embedding { ids, table } => {
                let (ir, tr) = (self.v(ids), self.v(table));
                let (i2, t2) = (ir.clone(), tr.clone());
                self.call(
                    "embedding_forward",
                    Phase::Forward,
                    &[&ir, &tr],
                    &[&ow],
                    Box::new(move |d, r| {
                        let (ids, out) = (r(&i2), r(&o));
                        let n = ids.numel();
                        embedding::embedding_forward(
                            d,
                            &out.reshape(&[n, out.numel() / n.max(1)])?,
                            &ids.reshape(&[n])?,
                            &r(&t2),
                        )
                    }),
                );
            }
            Op::Attention { q, k, v: vv, mask, causal, scale } => {
                let sq = self.g.shape(q).to_vec();
                let lse = self.slot(&[sq[0], sq[2], sq[1]], DType::F32, Kind::Planned);
                self.aux.insert(v, vec![lse.clone()]);
                let (qr, kr, vr, mr) = (self.v(q), self.v(k), self.v(vv), mask.map(|m| self.v(m)));
                let mut reads = vec![&qr, &kr, &vr];
                if let Some(m) = &mr {
                    reads.push(m);
                }
                let (q2, k2, v2, m2, l2) = (qr.clone(), kr.clone(), vr.clone(), mr.clone(), lse.clone());
                self.call(
                    "attention_forward",
                    Phase::Forward,
                    &reads,
                    &[&ow, &lse],
                    Box::new(move |d, r| {
                        let mt = m2.as_ref().map(r);
                        attention::attention_forward(
                            d,
                            &r(&o),
                            &r(&l2),
                            &r(&q2),
                            &r(&k2),
                            &r(&v2),
                            mt.as_ref(),
                            causal,
                            scale,
                        )
                    }),
                );
            }
            Op::Softmax { x, mask, causal } => {
                let (xr, mr) = (self.v(x), mask.map(|m| self.v(m)));
                let mut reads = vec![&xr];
                if let Some(m) = &mr {
                    reads.push(m);
                }
                let (x2, m2) = (xr.clone(), mr.clone());
                self.call(
                    "softmax_forward",
                    Phase::Forward,
                    &reads,
                    &[&ow],
                    Box::new(move |d, r| {
                        let mt = m2.as_ref().map(r);
                        softmax::softmax_forward(d, &r(&o), &r(&x2), mt.as_ref(), causal)
                    }),
                );
            }
            Op::CrossEntropy { logits, targets, ignore_index } => {
                let n = self.g.shape(logits)[0];
                let lse = self.slot(&[n], DType::F32, Kind::Planned);
                self.aux.insert(v, vec![lse.clone()]);
                let (lr, tr) = (self.v(logits), self.v(targets));
                let (l2, t2, s2) = (lr.clone(), tr.clone(), lse.clone());
                self.call(
                    "cross_entropy_forward",
                    Phase::Forward,
                    &[&lr, &tr],
                    &[&ow, &lse],
                    Box::new(move |d, r| {
                        cross_entropy::cross_entropy_forward(d, &r(&o), &r(&s2), &r(&l2), &r(&t2), ignore_index)
                    }),
                );
            }
            Op::Prepend { x, rows } => {
                let (xr, rr) = (self.v(x), self.v(rows));
                let (x2, r2) = (xr.clone(), rr.clone());
                self.call(
                    "prepend_forward",
                    Phase::Forward,
                    &[&xr, &rr],
                    &[&ow],
                    Box::new(move |d, r| prepend::prepend_forward(d, &r(&o), &r(&x2), &r(&r2))),
                );
            }
        }
        Ok(())
    }
}

impl<'g> Builder<'g> {
    fn needs(&self, v: Var) -> bool {
        self.needs[v.0]
    }

    /// Backward rule of node `i`, given the gradient of its output.
    fn backward_node(&mut self, i: usize) -> Result<()> {
        let v = Var(i);
        let Some(dout) = self.grad_ref.get(&v).cloned() else { return Ok(()) };
        let op = self.g.nodes[i].op.clone();
        let o = self.v(v);
        let bw = Phase::Backward;
        match op {
            Op::Input | Op::Param(_) => {}
            Op::Reshape { x } => {
                if self.needs(x) {
                    let xs = self.g.shape(x).to_vec();
                    let as_x = TRef { slot: dout.slot, shape: xs, dtype: DType::F32 };
                    match self.grad_ref.get(&x).cloned() {
                        None if self.is_train_param(x).is_none() => {
                            self.grad_ref.insert(x, as_x);
                        }
                        _ => {
                            let t = self.target(x, true);
                            let (dst, src) = (t.r.clone(), as_x.clone());
                            self.call(
                                "add_inplace",
                                bw,
                                &[&as_x, &t.r],
                                &[&t.r],
                                Box::new(move |d, r| elementwise::add_inplace_forward(d, &r(&dst), &r(&src), 1.0)),
                            );
                        }
                    }
                }
            }
            Op::Matmul { a, b, bias, ta, tb } => {
                let (ar, br) = (self.v(a), self.v(b));
                if self.needs(a) {
                    let t = self.target(a, false);
                    let (da, d2, b2) = (t.r.clone(), dout.clone(), br.clone());
                    self.call(
                        "matmul_backward_input",
                        bw,
                        &[&dout, &br],
                        &[&t.r],
                        Box::new(move |d, r| matmul::matmul_backward_input(d, &r(&da), &r(&d2), &r(&b2), ta, tb)),
                    );
                    self.finish(&t);
                }
                if self.needs(b) {
                    let t = self.target(b, true);
                    let (db, d2, a2, acc) = (t.r.clone(), dout.clone(), ar.clone(), t.accumulate);
                    self.call(
                        "matmul_backward_weight",
                        bw,
                        &[&dout, &ar],
                        &[&t.r],
                        Box::new(move |d, r| matmul::matmul_backward_weight(d, &r(&db), &r(&a2), &r(&d2), ta, tb, acc)),
                    );
                    self.finish(&t);
                }
                if let Some(bias) = bias.filter(|&b| self.needs(b)) {
                    self.bias_grad(bias, &dout);
                }
            }
            Op::Lora { x, w, bias, a, b, scale } => {
                if self.needs(w) {
                    return Err(Error::Invalid(format!(
                        "lora on '{}': the base weight is trainable; LoRA trains A and B over a frozen W",
                        self.g.node(w).name
                    )));
                }
                let (xr, wr, ar, br) = (self.v(x), self.v(w), self.v(a), self.v(b));
                let h = self.aux[&v][0].clone();
                let mut dh_shape = h.shape.clone();
                dh_shape.truncate(h.shape.len());
                let dh = self.slot(&dh_shape, DType::F32, Kind::Planned);
                if self.needs(a) || self.needs(b) {
                    let ta = if self.needs(a) { self.target(a, true) } else { self.scratch_target(a) };
                    let tbt = if self.needs(b) { self.target(b, true) } else { self.scratch_target(b) };
                    if ta.accumulate != tbt.accumulate {
                        return Err(Error::Invalid("lora: A and B gradients must both accumulate or neither".into()));
                    }
                    let (da, db, dh2, d2, x2, h2, b2, acc) = (
                        ta.r.clone(),
                        tbt.r.clone(),
                        dh.clone(),
                        dout.clone(),
                        xr.clone(),
                        h.clone(),
                        br.clone(),
                        ta.accumulate,
                    );
                    self.call(
                        "lora_backward_weight",
                        bw,
                        &[&dout, &xr, &h, &br],
                        &[&ta.r, &tbt.r, &dh],
                        Box::new(move |d, r| {
                            lora::lora_backward_weight(
                                d,
                                &r(&da),
                                &r(&db),
                                &r(&dh2),
                                &r(&d2),
                                &r(&x2),
                                &r(&h2),
                                &r(&b2),
                                scale,
                                acc,
                            )
                        }),
                    );
                    self.finish(&ta);
                    self.finish(&tbt);
                }
                if self.needs(x) {
                    let t = self.target(x, false);
                    let (dx, dh2, d2, w2, a2, b2) =
                        (t.r.clone(), dh.clone(), dout.clone(), wr.clone(), ar.clone(), br.clone());
                    self.call(
                        "lora_backward_input",
                        bw,
                        &[&dout, &wr, &ar, &br],
                        &[&t.r, &dh],
                        Box::new(move |d, r| {
                            lora::lora_backward_input(d, &r(&dx), &r(&dh2), &r(&d2), &r(&w2), &r(&a2), &r(&b2), scale)
                        }),
                    );
                    self.finish(&t);
                }
                if let Some(bias) = bias.filter(|&b| self.needs(b)) {
                    self.bias_grad(bias, &dout);
                }
            }
            // The norm is detached (peft's DoRA): W, A and B get nothing from it, m gets dg / norm.
            Op::DoraScale { m, .. } => {
                if self.needs(m) {
                    let norm = self.aux[&v][0].clone();
                    let t = self.target(m, true);
                    let (dm, d2, n2, acc) = (t.r.clone(), dout.clone(), norm.clone(), t.accumulate);
                    self.call(
                        "dora_scale_backward",
                        bw,
                        &[&dout, &norm],
                        &[&t.r],
                        Box::new(move |d, r| dora::dora_scale_backward(d, &r(&dm), &r(&d2), &r(&n2), acc)),
                    );
                    self.finish(&t);
                }
            }
            Op::Add { a, b } => {
                for (k, x) in [a, b].into_iter().enumerate() {
                    if !self.needs(x) {
                        continue;
                    }
                    if self.g.shape(x).len() == 1 && self.g.shape(x) != self.g.shape(v) {
                        self.bias_grad(x, &dout);
                        continue;
                    }
                    // The first addend may take over the output gradient's buffer: nothing reads it later.
                    let alias_ok = k == 0 && !self.grad_ref.contains_key(&x) && self.is_train_param(x).is_none();
                    if alias_ok {
                        self.grad_ref
                            .insert(x, TRef { slot: dout.slot, shape: self.g.shape(x).to_vec(), dtype: DType::F32 });
                    } else {
                        let t = self.target(x, true);
                        let (dst, src, acc) = (t.r.clone(), dout.clone(), t.accumulate);
                        self.call(
                            if acc { "add_inplace" } else { "scale_forward" },
                            bw,
                            &[&dout, &t.r],
                            &[&t.r],
                            Box::new(move |d, r| {
                                if acc {
                                    elementwise::add_inplace_forward(d, &r(&dst), &r(&src), 1.0)
                                } else {
                                    elementwise::scale_forward(d, &r(&dst), &r(&src), 1.0)
                                }
                            }),
                        );
                    }
                }
            }
            Op::Mul { a, b } => {
                let (ar, br) = (self.v(a), self.v(b));
                let ta = self.needs(a).then(|| self.target(a, false));
                let tbt = self.needs(b).then(|| self.target(b, false));
                let mut writes = vec![];
                if let Some(t) = &ta {
                    writes.push(t.r.clone());
                }
                if let Some(t) = &tbt {
                    writes.push(t.r.clone());
                }
                let (da, db, d2, a2, b2) = (
                    ta.as_ref().map(|t| t.r.clone()),
                    tbt.as_ref().map(|t| t.r.clone()),
                    dout.clone(),
                    ar.clone(),
                    br.clone(),
                );
                let wr: Vec<&TRef> = writes.iter().collect();
                self.call(
                    "mul_backward",
                    bw,
                    &[&dout, &ar, &br],
                    &wr,
                    Box::new(move |d, r| {
                        let (dat, dbt) = (da.as_ref().map(r), db.as_ref().map(r));
                        elementwise::mul_backward(d, dat.as_ref(), dbt.as_ref(), &r(&d2), &r(&a2), &r(&b2))
                    }),
                );
                if let Some(t) = ta {
                    self.finish(&t);
                }
                if let Some(t) = tbt {
                    self.finish(&t);
                }
            }
            Op::Scale { x, s } => self.unary_bw(
                x,
                &dout,
                None,
                "scale_forward",
                Box::new(move |d, dx, dy, _| elementwise::scale_forward(d, dx, dy, s)),
            ),
            Op::Gelu { x, tanh } => {
                let xr = self.v(x);
                self.unary_bw(
                    x,
                    &dout,
                    Some(xr),
                    "gelu_backward",
                    Box::new(move |d, dx, dy, x| elementwise::gelu_backward(d, dx, dy, x.unwrap(), tanh)),
                )
            }
            Op::Silu { x } => {
                let xr = self.v(x);
                self.unary_bw(
                    x,
                    &dout,
                    Some(xr),
                    "silu_backward",
                    Box::new(|d, dx, dy, x| elementwise::silu_backward(d, dx, dy, x.unwrap())),
                )
            }
            Op::Relu { x } => {
                let xr = self.v(x);
                self.unary_bw(
                    x,
                    &dout,
                    Some(xr),
                    "relu_backward",
                    Box::new(|d, dx, dy, x| elementwise::relu_backward(d, dx, dy, x.unwrap())),
                )
            }
            Op::Dropout { x, p, seed } => {
                let before = self.calls.len();
                self.unary_bw(
                    x,
                    &dout,
                    None,
                    "dropout_backward",
                    Box::new(move |d, dx, dy, _| elementwise::dropout_backward(d, dx, dy, p, seed)),
                );
                if self.calls.len() > before {
                    self.reseed.push((before, seed));
                }
            }
            Op::Rope { x, pos_offset, theta } => self.unary_bw(
                x,
                &dout,
                None,
                "rope_backward",
                Box::new(move |d, dx, dy, _| rope::rope_backward(d, dx, dy, pos_offset, theta)),
            ),
            Op::Softmax { x, .. } => {
                let y = o.clone();
                self.unary_bw(
                    x,
                    &dout,
                    Some(y),
                    "softmax_backward",
                    Box::new(|d, dx, dy, y| softmax::softmax_backward(d, dx, dy, y.unwrap())),
                )
            }
            Op::LayerNorm { x, gamma, beta, .. } => {
                let (xr, gr) = (self.v(x), self.v(gamma));
                let (mean, rstd) = (self.aux[&v][0].clone(), self.aux[&v][1].clone());
                if self.needs(gamma) || self.needs(beta) {
                    let tg = if self.needs(gamma) { self.target(gamma, true) } else { self.scratch_target(gamma) };
                    let tb = if self.needs(beta) { self.target(beta, true) } else { self.scratch_target(beta) };
                    let acc = tg.accumulate && tb.accumulate;
                    let tg = if tg.accumulate && !acc { self.scratch_target(gamma) } else { tg };
                    let tb = if tb.accumulate && !acc { self.scratch_target(beta) } else { tb };
                    let (dg, db, d2, x2, m2, s2) =
                        (tg.r.clone(), tb.r.clone(), dout.clone(), xr.clone(), mean.clone(), rstd.clone());
                    self.call(
                        "layernorm_backward_weight",
                        bw,
                        &[&dout, &xr, &mean, &rstd],
                        &[&tg.r, &tb.r],
                        Box::new(move |d, r| {
                            norm::layernorm_backward_weight(
                                d,
                                &r(&dg),
                                &r(&db),
                                &r(&d2),
                                &r(&x2),
                                &r(&m2),
                                &r(&s2),
                                acc,
                            )
                        }),
                    );
                    self.finish(&tg);
                    self.finish(&tb);
                }
                if self.needs(x) {
                    let t = self.target(x, false);
                    let (dx, d2, x2, m2, s2, g2) =
                        (t.r.clone(), dout.clone(), xr.clone(), mean.clone(), rstd.clone(), gr.clone());
                    self.call(
                        "layernorm_backward_input",
                        bw,
                        &[&dout, &xr, &mean, &rstd, &gr],
                        &[&t.r],
                        Box::new(move |d, r| {
                            norm::layernorm_backward_input(d, &r(&dx), &r(&d2), &r(&x2), &r(&m2), &r(&s2), &r(&g2))
                        }),
                    );
                    self.finish(&t);
                }
            }
            Op::RmsNorm { x, gamma, .. } => {
                let (xr, gr) = (self.v(x), self.v(gamma));
                let rstd = self.aux[&v][0].clone();
                if self.needs(gamma) {
                    let t = self.target(gamma, true);
                    let (dg, d2, x2, s2, acc) = (t.r.clone(), dout.clone(), xr.clone(), rstd.clone(), t.accumulate);
                    self.call(
                        "rmsnorm_backward_weight",
                        bw,
                        &[&dout, &xr, &rstd],
                        &[&t.r],
                        Box::new(move |d, r| norm::rmsnorm_backward_weight(d, &r(&dg), &r(&d2), &r(&x2), &r(&s2), acc)),
                    );
                    self.finish(&t);
                }
                if self.needs(x) {
                    let t = self.target(x, false);
                    let (dx, d2, x2, s2, g2) = (t.r.clone(), dout.clone(), xr.clone(), rstd.clone(), gr.clone());
                    self.call(
                        "rmsnorm_backward_input",
                        bw,
                        &[&dout, &xr, &rstd, &gr],
                        &[&t.r],
                        Box::new(move |d, r| {
                            norm::rmsnorm_backward_input(d, &r(&dx), &r(&d2), &r(&x2), &r(&s2), &r(&g2))
                        }),
                    );
                    self.finish(&t);
                }
            }
            Op::Embedding { ids, table } => {
                if self.needs(table) {
                    let ir = self.v(ids);
                    let t = self.target(table, true);
                    let (dt, d2, i2, acc) = (t.r.clone(), dout.clone(), ir.clone(), t.accumulate);
                    self.call(
                        "embedding_backward",
                        bw,
                        &[&dout, &ir],
                        &[&t.r],
                        Box::new(move |d, r| {
                            let (ids, dy) = (r(&i2), r(&d2));
                            let n = ids.numel();
                            embedding::embedding_backward(
                                d,
                                &r(&dt),
                                &dy.reshape(&[n, dy.numel() / n.max(1)])?,
                                &ids.reshape(&[n])?,
                                acc,
                            )
                        }),
                    );
                    self.finish(&t);
                }
            }
            Op::Attention { q, k, v: vv, mask, causal, scale } => {
                let (qr, kr, vr, mr) = (self.v(q), self.v(k), self.v(vv), mask.map(|m| self.v(m)));
                let lse = self.aux[&v][0].clone();
                let delta = self.slot(&lse.shape, DType::F32, Kind::Planned);
                let tq = if self.needs(q) { self.target(q, false) } else { self.scratch_target(q) };
                let tk = if self.needs(k) { self.target(k, false) } else { self.scratch_target(k) };
                let tv = if self.needs(vv) { self.target(vv, false) } else { self.scratch_target(vv) };
                let mut reads = vec![&dout, &qr, &kr, &vr, &o, &lse];
                if let Some(m) = &mr {
                    reads.push(m);
                }
                let (dq, dk, dv, dl, d2, q2, k2, v2, o2, l2, m2) = (
                    tq.r.clone(),
                    tk.r.clone(),
                    tv.r.clone(),
                    delta.clone(),
                    dout.clone(),
                    qr.clone(),
                    kr.clone(),
                    vr.clone(),
                    o.clone(),
                    lse.clone(),
                    mr.clone(),
                );
                self.call(
                    "attention_backward",
                    bw,
                    &reads,
                    &[&tq.r, &tk.r, &tv.r, &delta],
                    Box::new(move |d, r| {
                        let mt = m2.as_ref().map(r);
                        attention::attention_backward(
                            d,
                            &r(&dq),
                            &r(&dk),
                            &r(&dv),
                            &r(&dl),
                            &r(&d2),
                            &r(&q2),
                            &r(&k2),
                            &r(&v2),
                            &r(&o2),
                            &r(&l2),
                            mt.as_ref(),
                            causal,
                            scale,
                        )
                    }),
                );
                self.finish(&tq);
                self.finish(&tk);
                self.finish(&tv);
            }
            Op::CrossEntropy { logits, targets, ignore_index } => {
                if self.needs(logits) {
                    let (lr, tr) = (self.v(logits), self.v(targets));
                    let lse = self.aux[&v][0].clone();
                    let t = self.target(logits, false);
                    let (dl, d2, l2, s2, t2) = (t.r.clone(), dout.clone(), lr.clone(), lse.clone(), tr.clone());
                    self.call(
                        "cross_entropy_backward",
                        bw,
                        &[&dout, &lr, &lse, &tr],
                        &[&t.r],
                        Box::new(move |d, r| {
                            cross_entropy::cross_entropy_backward(
                                d,
                                &r(&dl),
                                &r(&d2),
                                &r(&l2),
                                &r(&s2),
                                &r(&t2),
                                ignore_index,
                            )
                        }),
                    );
                    self.finish(&t);
                }
            }
            Op::Prepend { x, rows } => {
                if self.needs(x) {
                    let t = self.target(x, false);
                    let (dx, d2) = (t.r.clone(), dout.clone());
                    self.call(
                        "prepend_backward_input",
                        bw,
                        &[&dout],
                        &[&t.r],
                        Box::new(move |d, r| prepend::prepend_backward_input(d, &r(&dx), &r(&d2))),
                    );
                    self.finish(&t);
                }
                if self.needs(rows) {
                    let t = self.target(rows, true);
                    let (dr, d2, acc) = (t.r.clone(), dout.clone(), t.accumulate);
                    self.call(
                        "prepend_backward_weight",
                        bw,
                        &[&dout, &t.r],
                        &[&t.r],
                        Box::new(move |d, r| prepend::prepend_backward_weight(d, &r(&dr), &r(&d2), acc)),
                    );
                    self.finish(&t);
                }
            }
        }
        Ok(())
    }

    fn bias_grad(&mut self, bias: Var, dout: &TRef) {
        let n = self.g.shape(bias)[0];
        let rows = dout.shape.iter().product::<usize>() / n.max(1);
        let d2 = TRef { slot: dout.slot, shape: vec![rows, n], dtype: DType::F32 };
        let t = self.target(bias, true);
        let (db, acc, dd) = (t.r.clone(), t.accumulate, d2.clone());
        self.call(
            "sum_rows_forward",
            Phase::Backward,
            &[&d2],
            &[&t.r],
            Box::new(move |d, r| reduce::sum_rows_forward(d, &r(&db), &r(&dd), false, acc)),
        );
        self.finish(&t);
    }

    #[allow(clippy::type_complexity)]
    fn unary_bw(
        &mut self,
        x: Var,
        dout: &TRef,
        saved: Option<TRef>,
        name: &'static str,
        f: Box<dyn Fn(&Device, &Tensor, &Tensor, Option<&Tensor>) -> rime_kernels::Result<Vec<Dispatch>>>,
    ) {
        if !self.needs(x) {
            return;
        }
        let t = self.target(x, false);
        let (dx, d2, s2) = (t.r.clone(), dout.clone(), saved.clone());
        let mut reads = vec![dout];
        if let Some(s) = &saved {
            reads.push(s);
        }
        self.call(
            name,
            Phase::Backward,
            &reads,
            &[&t.r],
            Box::new(move |d, r| {
                let st = s2.as_ref().map(r);
                f(d, &r(&dx), &r(&d2), st.as_ref())
            }),
        );
        self.finish(&t);
    }
}

/// The dropout seed of a step: the graph's seed mixed (splitmix64) with the optimizer step and the micro-batch
/// index. [`Executor::forward`] and [`Executor::backward_only`] use the current step and micro-batch without
/// advancing them, so repeated calls see the same masks (what a finite-difference check needs).
pub fn dropout_seed(seed: u32, step: u64, micro: u64) -> u32 {
    let mut z = (seed as u64) ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ micro.wrapping_mul(0xd1b5_4a32_d192_ed03);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

fn tensor_of(slots: &[Slot], r: &TRef) -> Tensor {
    let t = slots[r.slot].tensor.as_ref().expect("every slot has a buffer after planning");
    t.view(&r.shape, r.dtype)
}

impl Executor {
    /// Plan and build everything for `graph`. With `loss` and `optim`, each [`Executor::step`] runs forward,
    /// backward and the update; without them the executor only runs forward (evaluation, embedding).
    /// `outputs` are tensors the caller will read back (kept alive, never reused).
    pub fn new(
        dev: &Device,
        graph: Graph,
        store: &ParamStore,
        loss: Option<Var>,
        outputs: &[Var],
        optim_cfg: Option<OptimConfig>,
    ) -> Result<Self> {
        Self::new_sharing(dev, graph, store, loss, outputs, optim_cfg, None)
    }

    /// Like [`Executor::new`], sharing the optimizer state (Adam moments) and the gradient buffers of `donor`
    /// for the parameters both train: graphs of the same model at other shapes (sequence-length buckets) then
    /// take turns stepping one optimizer, and micro-batches of one step may run on different graphs
    /// ([`Executor::micro_step`] accumulates into the shared gradients). Set [`Executor::step`] to the global
    /// step count before each step.
    pub fn new_sharing(
        dev: &Device,
        graph: Graph,
        store: &ParamStore,
        loss: Option<Var>,
        outputs: &[Var],
        optim_cfg: Option<OptimConfig>,
        donor: Option<&Executor>,
    ) -> Result<Self> {
        let n = graph.nodes.len();
        let mut needs = vec![false; n];
        for (i, node) in graph.nodes.iter().enumerate() {
            needs[i] = match node.op {
                Op::Param(id) => store.get(id).trainable,
                Op::Input => false,
                _ => node.op.inputs().iter().any(|x| needs[x.0]),
            };
        }
        let training = loss.is_some() && optim_cfg.is_some();
        let mut b = Builder {
            g: &graph,
            store,
            slots: Vec::new(),
            var_ref: vec![None; n],
            grad_ref: HashMap::new(),
            calls: Vec::new(),
            needs,
            param_grad: HashMap::new(),
            aux: HashMap::new(),
            reseed: Vec::new(),
        };
        // Trainable parameters that the loss reaches get a persistent gradient buffer; nothing else does.
        let mut param_grads = Vec::new();
        if training {
            for node in graph.nodes.iter() {
                if let Op::Param(id) = node.op {
                    if store.get(id).trainable && !b.param_grad.contains_key(&id) {
                        let r = b.slot(&node.shape, DType::F32, Kind::ParamGrad);
                        b.param_grad.insert(id, r.slot);
                        param_grads.push((id, r.slot));
                    }
                }
            }
        }
        for i in 0..n {
            b.forward_node(i)?;
        }
        let mut dloss = None;
        let mut hyper = Vec::new();
        let mut opt_state = Vec::new();
        if let (true, Some(lv), Some(cfg)) = (training, loss, optim_cfg.as_ref()) {
            if graph.shape(lv) != [1] {
                return Err(Error::Invalid(format!("loss must be a [1] tensor, got {:?}", graph.shape(lv))));
            }
            let d = b.slot(&[1], DType::F32, Kind::Fixed);
            b.grad_ref.insert(lv, d.clone());
            dloss = Some(d.slot);
            for i in (0..n).rev() {
                if b.needs[i] {
                    b.backward_node(i)?;
                }
            }
            // Optimizer: optional global-norm clip, then one update per trainable parameter.
            for _ in &cfg.groups {
                hyper.push(b.slot(&[8], DType::F32, Kind::Fixed));
            }
            if let Some(max_norm) = cfg.max_grad_norm {
                let acc = b.slot(&[1], DType::F32, Kind::Planned);
                for (k, (id, slot)) in param_grads.iter().enumerate() {
                    let g = TRef { slot: *slot, shape: store.get(*id).tensor.shape.clone(), dtype: DType::F32 };
                    let (a2, g2) = (acc.clone(), g.clone());
                    b.call(
                        "grad_sumsq_forward",
                        Phase::Optim,
                        &[&g, &acc],
                        &[&acc],
                        Box::new(move |d, r| optim::grad_sumsq_forward(d, &r(&a2), &r(&g2), k > 0)),
                    );
                }
                for h in &hyper {
                    let (h2, a2) = (h.clone(), acc.clone());
                    b.call(
                        "clip_scale_forward",
                        Phase::Optim,
                        &[&acc, h],
                        &[h],
                        Box::new(move |d, r| optim::clip_scale_forward(d, &r(&h2), &r(&a2), max_norm)),
                    );
                }
            }
            for (id, slot) in &param_grads {
                let p = store.get(*id);
                let shape = p.tensor.shape.clone();
                let pr =
                    b.v(Var(graph.nodes.iter().position(|nd| matches!(nd.op, Op::Param(q) if q == *id)).unwrap_or(0)));
                let g = TRef { slot: *slot, shape: shape.clone(), dtype: DType::F32 };
                let h = hyper[p.group.min(hyper.len() - 1)].clone();
                match cfg.kind {
                    OptimKind::AdamW { .. } => {
                        let (m, v) =
                            (b.slot(&shape, DType::F32, Kind::OptState), b.slot(&shape, DType::F32, Kind::OptState));
                        opt_state.push((*id, vec![m.slot, v.slot]));
                        let (p2, g2, m2, v2, h2) = (pr.clone(), g.clone(), m.clone(), v.clone(), h.clone());
                        b.call(
                            "adamw_update",
                            Phase::Optim,
                            &[&g, &h, &pr, &m, &v],
                            &[&pr, &m, &v],
                            Box::new(move |d, r| optim::adamw_update(d, &r(&p2), &r(&g2), &r(&m2), &r(&v2), &r(&h2))),
                        );
                    }
                    OptimKind::Sgd { .. } => {
                        let m = b.slot(&shape, DType::F32, Kind::OptState);
                        opt_state.push((*id, vec![m.slot]));
                        let (p2, g2, m2, h2) = (pr.clone(), g.clone(), m.clone(), h.clone());
                        b.call(
                            "sgd_update",
                            Phase::Optim,
                            &[&g, &h, &pr, &m],
                            &[&pr, &m],
                            Box::new(move |d, r| optim::sgd_update(d, &r(&p2), &r(&g2), &r(&m2), &r(&h2))),
                        );
                    }
                }
            }
        }

        // Liveness: a planned slot lives from its first write to its last use; outputs and the loss live forever.
        let mut keep: Vec<usize> = outputs.iter().filter_map(|v| b.var_ref[v.0].as_ref().map(|r| r.slot)).collect();
        if let Some(l) = loss {
            if let Some(r) = &b.var_ref[l.0] {
                keep.push(r.slot);
            }
        }
        let ns = b.slots.len();
        let mut first = vec![usize::MAX; ns];
        let mut last = vec![0usize; ns];
        for (ci, c) in b.calls.iter().enumerate() {
            for &s in c.writes.iter().chain(c.reads.iter()) {
                first[s] = first[s].min(ci);
                last[s] = last[s].max(ci);
            }
        }
        for &s in &keep {
            last[s] = usize::MAX;
        }
        let mut slots = b.slots;
        let mut report = MemoryReport::default();
        let mut free: HashMap<u64, Vec<Tensor>> = HashMap::new();
        let mut live_bytes = 0u64;
        let mut frees_at: HashMap<usize, Vec<usize>> = HashMap::new();
        for s in 0..ns {
            if slots[s].kind == Kind::Planned && last[s] != usize::MAX && first[s] != usize::MAX {
                frees_at.entry(last[s]).or_default().push(s);
            }
        }
        // Shared optimizer state and gradients: take the donor's buffers for the same parameters.
        if let Some(d) = donor {
            for (id, mine) in &param_grads {
                if let Some((_, theirs)) = d.param_grads.iter().find(|(p, _)| p == id) {
                    slots[*mine].tensor = d.slots[*theirs].tensor.clone();
                }
            }
            for (id, mine) in &opt_state {
                if let Some((_, theirs)) = d.opt_state.iter().find(|(p, _)| p == id) {
                    for (a, b) in mine.iter().zip(theirs) {
                        slots[*a].tensor = d.slots[*b].tensor.clone();
                    }
                }
            }
        }
        // Non-planned slots get their own buffers now.
        for s in slots.iter_mut() {
            let bytes = s.bytes;
            match s.kind {
                Kind::FrozenParam => report.frozen_weights += bytes,
                Kind::TrainParam => report.trainable_params += bytes,
                Kind::ParamGrad => report.gradients += bytes,
                Kind::OptState => report.optimizer_state += bytes,
                Kind::Input => report.inputs += bytes,
                Kind::Fixed | Kind::Planned => {}
            }
            if s.tensor.is_none() && s.kind != Kind::Planned {
                s.tensor = Some(dev.zeros(&[(bytes / 4) as usize], DType::F32)?);
            }
        }
        let mut by_first: HashMap<usize, Vec<usize>> = HashMap::new();
        for s in 0..ns {
            if slots[s].kind == Kind::Planned {
                if first[s] == usize::MAX {
                    continue; // never used (e.g. a scratch of a pruned branch)
                }
                by_first.entry(first[s]).or_default().push(s);
            }
        }
        for ci in 0..b.calls.len() {
            for &s in by_first.get(&ci).map(|v| v.as_slice()).unwrap_or(&[]) {
                let bytes = slots[s].bytes;
                let t = match free.get_mut(&bytes).and_then(|v| v.pop()) {
                    Some(t) => t,
                    None => {
                        live_bytes += bytes;
                        report.activation_peak = report.activation_peak.max(live_bytes);
                        dev.empty(&[(bytes / 4) as usize], DType::F32)?
                    }
                };
                slots[s].tensor = Some(t);
            }
            for &s in frees_at.get(&ci).map(|v| v.as_slice()).unwrap_or(&[]) {
                if let Some(t) = slots[s].tensor.clone() {
                    free.entry(slots[s].bytes).or_default().push(t);
                }
            }
        }
        // Buffers are never freed back during the plan: the peak is every buffer allocated.
        report.activation_peak = live_bytes;
        report.frozen_gradients = 0;

        let mut forward = Vec::new();
        let mut backward = Vec::new();
        let mut optim_d = Vec::new();
        let mut dropouts = Vec::new();
        {
            let resolve = |r: &TRef| tensor_of(&slots, r);
            for (ci, c) in b.calls.iter().enumerate() {
                let ds = (c.build)(dev, &resolve).map_err(|e| match e {
                    rime_kernels::Error::Shape { op, msg } => {
                        Error::Shape { op, msg: format!("{msg} (in {})", c.name) }
                    }
                    e => Error::Kernel(e),
                })?;
                let list = match c.phase {
                    Phase::Forward => &mut forward,
                    Phase::Backward => &mut backward,
                    Phase::Optim => &mut optim_d,
                };
                if let Some(&(_, seed)) = b.reseed.iter().find(|(i, _)| *i == ci) {
                    dropouts.extend((list.len()..list.len() + ds.len()).map(|k| (c.phase, k, seed)));
                }
                list.extend(ds);
            }
        }
        let dispatch_count = forward.len() + backward.len() + optim_d.len();
        let inputs = graph
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, nd)| matches!(nd.op, Op::Input))
            .map(|(i, nd)| (nd.name.clone(), Var(i)))
            .collect();
        let staging = (0..2)
            .map(|_| {
                dev.wgpu_device().create_buffer(&wgpu::BufferDescriptor {
                    label: Some("rime loss readback"),
                    size: 4,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            })
            .collect();
        let var_ref = b.var_ref;
        let grad_ref = b.grad_ref;
        let ex = Executor {
            graph,
            slots,
            var_ref,
            grad_ref,
            inputs,
            forward,
            backward,
            optim: optim_d,
            dropouts,
            micro: 0,
            param_grads,
            opt_state,
            hyper: hyper.iter().map(|h| h.slot).collect(),
            dloss,
            loss,
            optim_cfg,
            staging,
            pending: None,
            step: 0,
            report,
            dispatch_count,
        };
        if let Some(d) = ex.dloss {
            dev.write_f32(&ex.slots[d].tensor.clone().expect("planned"), &[1.0])?;
        }
        Ok(ex)
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }
    pub fn memory_report(&self) -> &MemoryReport {
        &self.report
    }
    /// Kernel launches recorded per training step.
    pub fn dispatches_per_step(&self) -> usize {
        self.dispatch_count
    }
    /// The dispatches of one training step in the order a step records them (forward, backward, optimizer
    /// update), for profilers that time each one; each carries its kernel's entry point as `label`.
    pub fn step_dispatches(&self) -> impl Iterator<Item = &Dispatch> {
        self.forward.iter().chain(&self.backward).chain(&self.optim)
    }
    /// Number of trainable parameters that received a gradient buffer.
    pub fn gradient_buffers(&self) -> usize {
        self.param_grads.len()
    }

    fn input_tensor(&self, name: &str) -> Result<Tensor> {
        let v = *self.inputs.get(name).ok_or_else(|| Error::Input {
            name: name.to_string(),
            msg: format!("no such input; the graph has {:?}", self.inputs.keys().collect::<Vec<_>>()),
        })?;
        let r = self.var_ref[v.0].as_ref().ok_or_else(|| Error::Invalid(format!("input '{name}' unplanned")))?;
        Ok(tensor_of(&self.slots, r))
    }

    /// Feed an input for the next step (f32, or the bit patterns of u32/i32 data via the typed helpers).
    pub fn feed_bytes(&self, dev: &Device, name: &str, bytes: &[u8]) -> Result<()> {
        let t = self.input_tensor(name)?;
        let want = t.dtype.size() * t.numel();
        if bytes.len() != want {
            return Err(Error::Input {
                name: name.to_string(),
                msg: format!("{} bytes given, shape {:?} of {:?} needs {want}", bytes.len(), t.shape, t.dtype),
            });
        }
        dev.queue().write_buffer(&t.buffer, 0, bytes);
        Ok(())
    }
    pub fn feed_f32(&self, dev: &Device, name: &str, data: &[f32]) -> Result<()> {
        self.feed_bytes(dev, name, bytemuck::cast_slice(data))
    }
    pub fn feed_u32(&self, dev: &Device, name: &str, data: &[u32]) -> Result<()> {
        self.feed_bytes(dev, name, bytemuck::cast_slice(data))
    }
    pub fn feed_i32(&self, dev: &Device, name: &str, data: &[i32]) -> Result<()> {
        self.feed_bytes(dev, name, bytemuck::cast_slice(data))
    }

    /// Read a forward value (an output given at construction, or the loss) after a step or forward run.
    pub fn read(&self, dev: &Device, v: Var) -> Result<Vec<f32>> {
        let r = self.var_ref[v.0].as_ref().ok_or_else(|| Error::Invalid(format!("tensor {v:?} not planned")))?;
        Ok(dev.download_f32(&tensor_of(&self.slots, r))?)
    }
    /// Read the gradient of a trainable parameter (after a step; before the update is applied it is not
    /// observable, so use [`Executor::backward_only`] to inspect gradients).
    pub fn read_param_grad(&self, dev: &Device, id: ParamId) -> Result<Vec<f32>> {
        let (_, slot) = self
            .param_grads
            .iter()
            .find(|(p, _)| *p == id)
            .ok_or_else(|| Error::Invalid(format!("parameter {id:?} has no gradient (frozen or unused)")))?;
        Ok(dev.download_f32(self.slots[*slot].tensor.as_ref().expect("planned"))?)
    }
    /// The gradient of any forward tensor that has one (for tests).
    pub fn read_grad(&self, dev: &Device, v: Var) -> Result<Vec<f32>> {
        let r = self.grad_ref.get(&v).ok_or_else(|| Error::Invalid(format!("tensor {v:?} has no gradient")))?;
        Ok(dev.download_f32(&tensor_of(&self.slots, r))?)
    }

    fn record(&mut self, dev: &Device, phases: &[Phase], zero_grads: bool, copy_loss: bool) -> Result<()> {
        let mut enc =
            dev.wgpu_device().create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("rime step") });
        if zero_grads {
            for (_, s) in &self.param_grads {
                enc.clear_buffer(&self.slots[*s].tensor.as_ref().expect("planned").buffer, 0, None);
            }
        }
        {
            let mut pass = enc
                .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("rime step"), timestamp_writes: None });
            for ph in phases {
                let list = match ph {
                    Phase::Forward => &self.forward,
                    Phase::Backward => &self.backward,
                    Phase::Optim => &self.optim,
                };
                for d in list {
                    d.record(&mut pass);
                }
            }
        }
        if copy_loss {
            if let Some(l) = self.loss {
                let r = self.var_ref[l.0].as_ref().expect("loss planned");
                let buf = &self.slots[r.slot].tensor.as_ref().expect("planned").buffer;
                let k = (self.step % 2) as usize;
                enc.copy_buffer_to_buffer(buf, 0, &self.staging[k], 0, 4);
            }
        }
        dev.queue().submit([enc.finish()]);
        Ok(())
    }

    fn write_hyper(&self, dev: &Device) -> Result<()> {
        if let Some(cfg) = &self.optim_cfg {
            for (g, s) in self.hyper.iter().enumerate() {
                dev.write_f32(self.slots[*s].tensor.as_ref().expect("planned"), &cfg.hyper(g, self.step))?;
            }
        }
        Ok(())
    }

    /// Point every dropout at this step's masks: the seed mixes the graph's seed with the optimizer step and
    /// the micro-batch, so masks differ from step to step, repeat for the same `--seed`, and forward and
    /// backward of one step (recorded in the same submit) share theirs.
    fn write_dropout_seeds(&self, dev: &Device) -> Result<()> {
        for &(ph, k, seed) in &self.dropouts {
            let list = match ph {
                Phase::Forward => &self.forward,
                Phase::Backward => &self.backward,
                Phase::Optim => &self.optim,
            };
            elementwise::dropout_set_seed(dev, &list[k], dropout_seed(seed, self.step, self.micro))?;
        }
        Ok(())
    }

    fn read_staged(&mut self, dev: &Device, k: usize) -> Result<f32> {
        let bytes = dev.map_read(&self.staging[k])?;
        Ok(f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// One training step: forward, backward and optimizer update in one submit. Returns the previous
    /// step's loss, read while this one runs.
    pub fn step(&mut self, dev: &Device) -> Result<StepOutput> {
        self.micro_step(dev, true, true)
    }

    /// Gradient accumulation: call with `first` on the first micro-batch (zeroes gradients) and `last` on
    /// the last (applies the update). Set [`Executor::set_loss_scale`] to 1/micro_batches beforehand.
    pub fn micro_step(&mut self, dev: &Device, first: bool, last: bool) -> Result<StepOutput> {
        if self.optim_cfg.is_none() || self.loss.is_none() {
            return Err(Error::Invalid("this executor was built without a loss and optimizer".into()));
        }
        if last {
            self.write_hyper(dev)?;
        }
        if first {
            self.micro = 0;
        }
        self.write_dropout_seeds(dev)?;
        self.micro += 1;
        let phases: &[Phase] =
            if last { &[Phase::Forward, Phase::Backward, Phase::Optim] } else { &[Phase::Forward, Phase::Backward] };
        self.record(dev, phases, first, last)?;
        let prev = match self.pending.take() {
            Some(k) => Some(self.read_staged(dev, k)?),
            None => None,
        };
        if last {
            self.pending = Some((self.step % 2) as usize);
            self.step += 1;
        }
        Ok(StepOutput { prev_loss: prev })
    }

    /// The loss of the most recent step (waits for it).
    pub fn last_loss(&mut self, dev: &Device) -> Result<Option<f32>> {
        match self.pending.take() {
            Some(k) => Ok(Some(self.read_staged(dev, k)?)),
            None => Ok(None),
        }
    }

    /// Scale of the loss gradient (1/k for k accumulated micro-batches of equal size).
    pub fn set_loss_scale(&self, dev: &Device, s: f32) -> Result<()> {
        if let Some(d) = self.dloss {
            dev.write_f32(self.slots[d].tensor.as_ref().expect("planned"), &[s])?;
        }
        Ok(())
    }

    /// Forward only (evaluation); read outputs with [`Executor::read`].
    pub fn forward(&mut self, dev: &Device) -> Result<()> {
        self.write_dropout_seeds(dev)?;
        self.record(dev, &[Phase::Forward], false, false)?;
        dev.wait()?;
        Ok(())
    }

    /// Forward and backward without the update (gradients readable with `read_param_grad`).
    pub fn backward_only(&mut self, dev: &Device) -> Result<()> {
        self.write_dropout_seeds(dev)?;
        self.record(dev, &[Phase::Forward, Phase::Backward], true, false)?;
        dev.wait()?;
        Ok(())
    }

    /// Save optimizer state (moments per parameter and the step count) as safetensors, atomically.
    pub fn save_optimizer_state(&self, dev: &Device, store: &ParamStore, path: &std::path::Path) -> Result<()> {
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (id, slots) in &self.opt_state {
            let p = store.get(*id);
            for (k, s) in slots.iter().enumerate() {
                let data = dev.download_bytes(self.slots[*s].tensor.as_ref().expect("planned"))?;
                let n = p.tensor.numel() * 4;
                tensors.push((
                    format!("{}.{}", ["exp_avg", "exp_avg_sq"][k.min(1)], p.name),
                    p.tensor.shape.clone(),
                    data[..n].to_vec(),
                ));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, s, d)| {
                Ok((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)?))
            })
            .collect::<std::result::Result<_, safetensors::SafeTensorError>>()
            .map_err(|e| Error::State { path: path.display().to_string(), msg: e.to_string() })?;
        let meta: HashMap<String, String> = [("step".to_string(), self.step.to_string())].into_iter().collect();
        let tmp = path.with_extension("tmp");
        safetensors::serialize_to_file(views, Some(meta), &tmp)
            .map_err(|e| Error::State { path: path.display().to_string(), msg: e.to_string() })?;
        std::fs::rename(&tmp, path)
            .map_err(|e| Error::State { path: path.display().to_string(), msg: e.to_string() })?;
        Ok(())
    }

    /// Load optimizer state written by [`Executor::save_optimizer_state`]; names and shapes must match.
    pub fn load_optimizer_state(&mut self, dev: &Device, store: &ParamStore, path: &std::path::Path) -> Result<()> {
        let err = |msg: String| Error::State { path: path.display().to_string(), msg };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| err(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
        for (id, slots) in &self.opt_state {
            let p = store.get(*id);
            for (k, s) in slots.iter().enumerate() {
                let name = format!("{}.{}", ["exp_avg", "exp_avg_sq"][k.min(1)], p.name);
                let t = st.tensor(&name).map_err(|_| err(format!("missing tensor '{name}'")))?;
                if t.shape() != p.tensor.shape.as_slice() || t.dtype() != safetensors::Dtype::F32 {
                    return Err(err(format!(
                        "tensor '{name}': {:?} {:?}, expected F32 {:?}",
                        t.dtype(),
                        t.shape(),
                        p.tensor.shape
                    )));
                }
                let data: Vec<f32> = bytemuck::pod_collect_to_vec(t.data());
                dev.write_f32(self.slots[*s].tensor.as_ref().expect("planned"), &data)?;
            }
        }
        self.step = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| err("metadata has no 'step'".into()))?;
        Ok(())
    }
}
