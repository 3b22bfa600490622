//! Lowering: the builder that op rules write into. It hands out slots (tensors with a shape; buffers come
//! later from the memory plan), records kernel calls with the slots they touch, and decides where each
//! gradient contribution goes. Every op's own forward and gradient rule lives in `crate::ops`; this file only
//! walks the graph: forward rules in order, then gradient rules in reverse order along the paths that reach a
//! trainable parameter.

use std::collections::HashMap;
use std::ops::Index;

use rime_kernels::ops::{elementwise, reduce};
use rime_kernels::{DType, Device, Dispatch, Tensor};

use crate::error::Result;
use crate::graph::{Graph, Op, Var};
use crate::ops;
use crate::store::{ParamId, ParamStore};

/// A tensor as the plan sees it: a slot (one buffer once planned) seen with a shape and dtype.
#[derive(Clone, Debug)]
pub(crate) struct TRef {
    pub slot: usize,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl TRef {
    /// The same slot seen as an f32 tensor of another shape.
    pub(crate) fn as_shape(&self, shape: &[usize]) -> TRef {
        TRef { slot: self.slot, shape: shape.to_vec(), dtype: DType::F32 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    FrozenParam,
    TrainParam,
    ParamGrad,
    Input,
    /// Persistent tensors a graph writes in place (KV caches).
    State,
    OptState,
    Fixed,
    Planned,
}

pub(crate) struct Slot {
    pub bytes: u64,
    pub kind: Kind,
    pub tensor: Option<Tensor>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Phase {
    Forward,
    Backward,
    Optim,
}

/// The tensors a call's kernel launcher receives, in the order the rule listed them: `a[i]` for the required
/// ones, `a.opt(k)` for the optional ones.
pub(crate) struct Args {
    req: Vec<Tensor>,
    opt: Vec<Option<Tensor>>,
}

impl Args {
    pub(crate) fn opt(&self, k: usize) -> Option<&Tensor> {
        self.opt[k].as_ref()
    }
}

impl Index<usize> for Args {
    type Output = Tensor;
    fn index(&self, i: usize) -> &Tensor {
        &self.req[i]
    }
}

pub(crate) type KResult = rime_kernels::Result<Vec<Dispatch>>;
type Build = std::rc::Rc<dyn Fn(&Device, &Args) -> KResult>;

/// One kernel launch (or a few, from one launcher) with every slot it reads or writes.
pub(crate) struct Call {
    pub name: &'static str,
    pub phase: Phase,
    args: Vec<TRef>,
    opt: Vec<Option<TRef>>,
    build: Build,
    /// A dropout's graph seed: its mask is redrawn every step.
    pub reseed: Option<u32>,
    /// The checkpoint segment of the node whose forward rule made the call ([`Graph::checkpoint`]).
    pub segment: Option<u32>,
}

impl Call {
    /// Every slot the call touches (for liveness, reads and writes count alike).
    pub(crate) fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.args.iter().chain(self.opt.iter().flatten()).map(|r| r.slot)
    }

    /// The same call on other slots (`remap` gives each slot's replacement) in another phase.
    pub(crate) fn remapped(&self, phase: Phase, remap: &dyn Fn(usize) -> usize) -> Call {
        let r = |t: &TRef| TRef { slot: remap(t.slot), ..t.clone() };
        Call {
            name: self.name,
            phase,
            args: self.args.iter().map(r).collect(),
            opt: self.opt.iter().map(|o| o.as_ref().map(r)).collect(),
            build: self.build.clone(),
            reseed: self.reseed,
            segment: self.segment,
        }
    }

    pub(crate) fn build(&self, dev: &Device, resolve: &dyn Fn(&TRef) -> Tensor) -> KResult {
        let args = Args {
            req: self.args.iter().map(resolve).collect(),
            opt: self.opt.iter().map(|o| o.as_ref().map(resolve)).collect(),
        };
        (self.build)(dev, &args)
    }
}

fn bytes_of(shape: &[usize], dtype: DType) -> u64 {
    dtype.storage_bytes(shape.iter().product())
}

/// How a backward kernel should write a gradient contribution.
pub(crate) struct Target {
    pub r: TRef,
    pub accumulate: bool,
    /// When set, the kernel wrote a temporary that must then be added into this gradient.
    add_into: Option<TRef>,
}

pub(crate) struct Builder<'g> {
    pub g: &'g Graph,
    pub store: &'g ParamStore,
    pub slots: Vec<Slot>,
    pub var_ref: Vec<Option<TRef>>,
    pub grad_ref: HashMap<Var, TRef>,
    pub calls: Vec<Call>,
    /// Whether a node leads to a trainable parameter (only those get gradient rules).
    needs: Vec<bool>,
    pub param_grad: HashMap<ParamId, usize>,
    /// Extra tensors a forward kernel saves for its backward (lse, mean/rstd, LoRA's x·Aᵀ).
    aux: HashMap<Var, Vec<TRef>>,
    /// The checkpoint segment of the node whose forward rule is running.
    segment: Option<u32>,
    /// Whether gradient rules follow the forward rules (a training graph); forward rules that prepare a gradient
    /// themselves skip it otherwise.
    pub(crate) training: bool,
}

impl<'g> Builder<'g> {
    pub(crate) fn new(g: &'g Graph, store: &'g ParamStore) -> Self {
        let n = g.nodes.len();
        let mut needs = vec![false; n];
        for (i, node) in g.nodes.iter().enumerate() {
            needs[i] = match node.op {
                Op::Param(id) => store.get(id).trainable,
                Op::Input => false,
                _ => node.op.inputs().iter().any(|x| needs[x.0]),
            };
        }
        Builder {
            g,
            store,
            slots: Vec::new(),
            var_ref: vec![None; n],
            grad_ref: HashMap::new(),
            calls: Vec::new(),
            needs,
            training: false,
            param_grad: HashMap::new(),
            aux: HashMap::new(),
            segment: None,
        }
    }

    pub(crate) fn slot(&mut self, shape: &[usize], dtype: DType, kind: Kind) -> TRef {
        self.slots.push(Slot { bytes: bytes_of(shape, dtype), kind, tensor: None });
        TRef { slot: self.slots.len() - 1, shape: shape.to_vec(), dtype }
    }

    /// A planned f32 scratch or activation slot.
    pub(crate) fn scratch(&mut self, shape: &[usize]) -> TRef {
        self.slot(shape, DType::F32, Kind::Planned)
    }

    /// The forward value of `v`.
    pub(crate) fn v(&self, v: Var) -> TRef {
        self.var_ref[v.0].clone().expect("forward value defined before use")
    }

    /// Keep tensors a forward kernel wrote for the gradient rule of the same node.
    pub(crate) fn save_aux(&mut self, v: Var, saved: &[&TRef]) {
        self.aux.insert(v, saved.iter().map(|r| (*r).clone()).collect());
    }
    pub(crate) fn aux(&self, v: Var, k: usize) -> TRef {
        self.aux[&v][k].clone()
    }

    pub(crate) fn needs(&self, v: Var) -> bool {
        self.needs[v.0]
    }

    /// Record a kernel call over `args` (everything it reads or writes, in the launcher's order).
    pub(crate) fn call(
        &mut self,
        name: &'static str,
        phase: Phase,
        args: &[&TRef],
        build: impl Fn(&Device, &Args) -> KResult + 'static,
    ) -> usize {
        self.call_opt(name, phase, args, &[], build)
    }

    /// [`Builder::call`] with optional tensors too (a bias, a mask), given to the launcher as `a.opt(k)`.
    pub(crate) fn call_opt(
        &mut self,
        name: &'static str,
        phase: Phase,
        args: &[&TRef],
        opt: &[Option<&TRef>],
        build: impl Fn(&Device, &Args) -> KResult + 'static,
    ) -> usize {
        self.calls.push(Call {
            name,
            phase,
            args: args.iter().map(|r| (*r).clone()).collect(),
            opt: opt.iter().map(|o| o.cloned()).collect(),
            build: std::rc::Rc::new(build),
            reseed: None,
            segment: if phase == Phase::Forward { self.segment } else { None },
        });
        self.calls.len() - 1
    }

    pub(crate) fn is_train_param(&self, v: Var) -> Option<ParamId> {
        match self.g.node(v).op {
            Op::Param(id) if self.store.get(id).trainable => Some(id),
            _ => None,
        }
    }

    /// Where a gradient contribution to `v` goes. `can_accumulate`: the kernel can add into its output.
    pub(crate) fn target(&mut self, v: Var, can_accumulate: bool) -> Target {
        let shape = self.g.shape(v).to_vec();
        let existing = if let Some(id) = self.is_train_param(v) {
            let slot = self.param_grad[&id];
            Some(TRef { slot, shape: shape.clone(), dtype: DType::F32 })
        } else {
            self.grad_ref.get(&v).cloned()
        };
        match existing {
            Some(r) if can_accumulate => Target { r, accumulate: true, add_into: None },
            Some(r) => Target { r: self.scratch(&shape), accumulate: false, add_into: Some(r) },
            None => {
                let r = self.scratch(&shape);
                self.grad_ref.insert(v, r.clone());
                Target { r, accumulate: false, add_into: None }
            }
        }
    }

    /// Where the gradient of `v` goes if it is needed, else a scratch output (a kernel that computes several
    /// gradients at once writes them all).
    pub(crate) fn target_or_scratch(&mut self, v: Var, can_accumulate: bool) -> Target {
        if self.needs(v) {
            self.target(v, can_accumulate)
        } else {
            self.scratch_target(v)
        }
    }

    /// A scratch output for a gradient nobody needs.
    pub(crate) fn scratch_target(&mut self, v: Var) -> Target {
        let shape = self.g.shape(v).to_vec();
        Target { r: self.scratch(&shape), accumulate: false, add_into: None }
    }

    /// After a kernel wrote a target: add a temporary into the gradient it belongs to.
    pub(crate) fn finish(&mut self, t: &Target) {
        if let Some(into) = &t.add_into {
            self.call("add_inplace", Phase::Backward, &[into, &t.r], |d, a| {
                elementwise::add_inplace_forward(d, &a[0], &a[1], 1.0)
            });
        }
    }

    /// The common gradient rule shape: if `x` needs a gradient, one kernel writes it. The launcher gets the
    /// target as `a[0]`, then `reads`, and whether to accumulate into the target.
    pub(crate) fn grad_to(
        &mut self,
        x: Var,
        can_accumulate: bool,
        name: &'static str,
        reads: &[&TRef],
        build: impl Fn(&Device, &Args, bool) -> KResult + 'static,
    ) -> Option<usize> {
        if !self.needs(x) {
            return None;
        }
        let t = self.target(x, can_accumulate);
        let acc = t.accumulate;
        let mut args = vec![&t.r];
        args.extend_from_slice(reads);
        let ci = self.call(name, Phase::Backward, &args, move |d, a| build(d, a, acc));
        self.finish(&t);
        Some(ci)
    }

    /// A bias's gradient: the column sums of the output gradient seen as [rows, n].
    pub(crate) fn bias_grad(&mut self, bias: Var, dout: &TRef) {
        let n = self.g.shape(bias)[0];
        let rows = dout.shape.iter().product::<usize>() / n.max(1);
        let d2 = dout.as_shape(&[rows, n]);
        self.grad_to(bias, true, "sum_rows_forward", &[&d2], |d, a, acc| {
            reduce::sum_rows_forward(d, &a[0], &a[1], false, acc)
        });
    }

    /// Trainable parameters get a persistent gradient buffer each; nothing else does.
    pub(crate) fn param_grads(&mut self) -> Vec<(ParamId, usize)> {
        let mut out = Vec::new();
        for node in self.g.nodes.iter() {
            if let Op::Param(id) = node.op {
                if self.store.get(id).trainable && !self.param_grad.contains_key(&id) {
                    let r = self.slot(&node.shape, DType::F32, Kind::ParamGrad);
                    self.param_grad.insert(id, r.slot);
                    out.push((id, r.slot));
                }
            }
        }
        out
    }

    /// Storage for node `i`'s output (its own, or a view of another's: see `ops::storage`), then its op's
    /// forward rule.
    pub(crate) fn forward(&mut self, i: usize) -> Result<()> {
        let v = Var(i);
        let out = match ops::storage(self, v) {
            Some(r) => r,
            None => {
                let g = self.g;
                self.scratch(g.shape(v))
            }
        };
        self.var_ref[i] = Some(out.clone());
        self.segment = self.g.nodes[i].segment;
        let r = ops::forward(self, v, &out);
        self.segment = None;
        r
    }

    /// The gradient rule of node `i`, given the gradient of its output (nothing when no gradient reached it).
    pub(crate) fn backward(&mut self, i: usize) -> Result<()> {
        if !self.needs[i] {
            return Ok(());
        }
        let v = Var(i);
        let Some(dout) = self.grad_ref.get(&v).cloned() else { return Ok(()) };
        ops::backward(self, v, &dout)
    }
}
