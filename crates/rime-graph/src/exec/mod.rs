//! The executor: builds one graph into GPU work and runs it.
//!
//! Building an executor walks the graph once ([`builder`]): every op's forward rule in order, then (when
//! training) the gradient rules in reverse order, only for nodes that lead to a trainable parameter, then the
//! optimizer update ([`update`]). Each call names the slots it touches; the memory plan ([`plan`]) gives
//! planned slots (activations, activation gradients, scratch) buffers by liveness, reusing freed buffers of the
//! same size. Dispatches (pipelines, bind groups, parameters) are then built once and recorded unchanged every
//! step ([`run`]); optimizer state is saved and loaded by [`optim_state`].

pub(crate) mod builder;
mod optim_state;
mod plan;
mod run;
mod update;

use std::collections::HashMap;

use rime_kernels::{wgpu, DType, Device, Dispatch, Tensor};

use crate::error::{Error, Result};
use crate::graph::{Graph, Op, Var};
use crate::optim::OptimConfig;
use crate::store::{ParamId, ParamStore};
use builder::{Builder, Call, Kind, Phase, Slot, TRef};

pub use plan::MemoryReport;
pub use run::{dropout_seed, StepOutput};

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
    /// Persistent state slots by node name (KV caches), shared with executors built with this one as donor.
    states: Vec<(String, usize)>,
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

fn tensor_of(slots: &[Slot], r: &TRef) -> Tensor {
    let t = slots[r.slot].tensor.as_ref().expect("every slot has a buffer after planning");
    t.view(&r.shape, r.dtype)
}

/// What lowering produced besides the builder's slots and calls.
struct Lowered {
    param_grads: Vec<(ParamId, usize)>,
    opt_state: Vec<(ParamId, Vec<usize>)>,
    states: Vec<(String, usize)>,
    hyper: Vec<usize>,
    dloss: Option<usize>,
}

/// The dispatch lists of one step, per phase, and the dropouts among them.
struct Lists {
    forward: Vec<Dispatch>,
    backward: Vec<Dispatch>,
    optim: Vec<Dispatch>,
    dropouts: Vec<(Phase, usize, u32)>,
}

/// Forward rules, then (training) the loss gradient seed, the gradient rules and the optimizer.
fn lower(b: &mut Builder, loss: Option<Var>, cfg: Option<&OptimConfig>) -> Result<Lowered> {
    let training = loss.is_some() && cfg.is_some();
    b.training = training;
    let param_grads = if training { b.param_grads() } else { Vec::new() };
    for i in 0..b.g.nodes.len() {
        b.forward(i)?;
    }
    let states = (b.g.nodes.iter().enumerate())
        .filter(|(_, nd)| matches!(nd.op, Op::State))
        .filter_map(|(i, nd)| b.var_ref[i].as_ref().map(|r| (nd.name.clone(), r.slot)))
        .collect();
    let mut out = Lowered { param_grads, opt_state: Vec::new(), states, hyper: Vec::new(), dloss: None };
    let (Some(lv), Some(cfg)) = (loss, cfg) else { return Ok(out) };
    if b.g.shape(lv) != [1] {
        return Err(Error::Invalid(format!("loss must be a [1] tensor, got {:?}", b.g.shape(lv))));
    }
    let d = b.slot(&[1], DType::F32, Kind::Fixed);
    b.grad_ref.insert(lv, d.clone());
    out.dloss = Some(d.slot);
    for i in (0..b.g.nodes.len()).rev() {
        b.backward(i)?;
    }
    let wired = update::wire(b, cfg, &out.param_grads);
    out.hyper = wired.hyper.iter().map(|h| h.slot).collect();
    out.opt_state = wired.opt_state;
    Ok(out)
}

/// Shared optimizer state and gradients: take the donor's buffers for the same parameters; persistent state
/// (KV caches) by name.
fn share_from(donor: &Executor, slots: &mut [Slot], lowered: &Lowered) {
    for (name, mine) in &lowered.states {
        if let Some((_, theirs)) = donor.states.iter().find(|(n, _)| n == name) {
            if slots[*mine].bytes == donor.slots[*theirs].bytes {
                slots[*mine].tensor = donor.slots[*theirs].tensor.clone();
            }
        }
    }
    for (id, mine) in &lowered.param_grads {
        if let Some((_, theirs)) = donor.param_grads.iter().find(|(p, _)| p == id) {
            slots[*mine].tensor = donor.slots[*theirs].tensor.clone();
        }
    }
    for (id, mine) in &lowered.opt_state {
        if let Some((_, theirs)) = donor.opt_state.iter().find(|(p, _)| p == id) {
            for (a, b) in mine.iter().zip(theirs) {
                slots[*a].tensor = donor.slots[*b].tensor.clone();
            }
        }
    }
}

/// Gradient checkpointing ([`Graph::checkpoint`]): for each segment whose activations a gradient rule reads,
/// the segment's forward calls are repeated just before the first such rule, writing fresh slots, and every
/// gradient rule reads those instead. An activation of the segment (a planned slot first written by one of its
/// forward calls, not an output) then lives only while the forward pass still reads it; its twin lives from
/// the recomputation to the segment's last gradient rule. What enters the segment (an earlier block's output,
/// the weights, the inputs) is read again by the recomputation, so it is kept: the checkpoint; so are the
/// segment's outputs (what later forward calls read).
fn recompute_segments(slots: &mut Vec<Slot>, calls: Vec<Call>, keep: &[usize]) -> Vec<Call> {
    // Twins are appended to `slots`; only the slots lowering made can be a segment's activations.
    let n0 = slots.len();
    let mut first = vec![usize::MAX; n0];
    for (ci, c) in calls.iter().enumerate() {
        for s in c.slots() {
            first[s] = first[s].min(ci);
        }
    }
    let mut segments: Vec<u32> = calls.iter().filter(|c| c.phase == Phase::Forward).filter_map(|c| c.segment).collect();
    segments.sort_unstable();
    segments.dedup();
    // Per call index: the recomputations to insert before it, and the slot replacements of gradient rules.
    let mut before: HashMap<usize, Vec<Call>> = HashMap::new();
    let mut remap: HashMap<usize, HashMap<usize, usize>> = HashMap::new();
    for seg in segments {
        let fwd: Vec<usize> =
            (0..calls.len()).filter(|&i| calls[i].phase == Phase::Forward && calls[i].segment == Some(seg)).collect();
        // The segment's outputs (read by a later forward call outside it) stay as they are: the next segment's
        // recomputation reads them anyway, so twins would only keep two segments' activations at once.
        let outside: std::collections::HashSet<usize> = (0..calls.len())
            .filter(|&i| calls[i].phase == Phase::Forward && calls[i].segment != Some(seg))
            .flat_map(|i| calls[i].slots())
            .collect();
        let internal: std::collections::HashSet<usize> = (0..n0)
            .filter(|&s| {
                slots[s].kind == Kind::Planned
                    && !keep.contains(&s)
                    && !outside.contains(&s)
                    && fwd.binary_search(&first[s]).is_ok()
            })
            .collect();
        let readers: Vec<usize> = (0..calls.len())
            .filter(|&i| calls[i].phase == Phase::Backward && calls[i].slots().any(|s| internal.contains(&s)))
            .collect();
        let Some(&at) = readers.first() else { continue };
        let mut twin = HashMap::new();
        let mut internal: Vec<usize> = internal.into_iter().collect();
        internal.sort_unstable();
        for &s in &internal {
            slots.push(Slot { bytes: slots[s].bytes, kind: Kind::Planned, tensor: None });
            twin.insert(s, slots.len() - 1);
        }
        let map = |s: usize| twin.get(&s).copied().unwrap_or(s);
        before.entry(at).or_default().extend(fwd.iter().map(|&i| calls[i].remapped(Phase::Backward, &map)));
        for &r in &readers {
            remap.entry(r).or_default().extend(twin.iter().map(|(&a, &b)| (a, b)));
        }
    }
    if before.is_empty() {
        return calls;
    }
    let mut out = Vec::with_capacity(calls.len());
    for (i, c) in calls.into_iter().enumerate() {
        if let Some(rc) = before.remove(&i) {
            out.extend(rc);
        }
        match remap.get(&i) {
            Some(m) => out.push(c.remapped(c.phase, &|s| m.get(&s).copied().unwrap_or(s))),
            None => out.push(c),
        }
    }
    out
}

/// Build every call's dispatches once, in call order, per phase.
fn build_dispatches(dev: &Device, slots: &[Slot], calls: &[Call]) -> Result<Lists> {
    let mut l = Lists { forward: Vec::new(), backward: Vec::new(), optim: Vec::new(), dropouts: Vec::new() };
    let resolve = |r: &TRef| tensor_of(slots, r);
    for c in calls {
        let ds = c.build(dev, &resolve).map_err(|e| match e {
            rime_kernels::Error::Shape { op, msg } => Error::Shape { op, msg: format!("{msg} (in {})", c.name) },
            e => Error::Kernel(e),
        })?;
        let list = match c.phase {
            Phase::Forward => &mut l.forward,
            Phase::Backward => &mut l.backward,
            Phase::Optim => &mut l.optim,
        };
        if let Some(seed) = c.reseed {
            l.dropouts.extend((list.len()..list.len() + ds.len()).map(|k| (c.phase, k, seed)));
        }
        list.extend(ds);
    }
    Ok(l)
}

fn loss_staging(dev: &Device) -> Vec<wgpu::Buffer> {
    (0..2)
        .map(|_| {
            dev.wgpu_device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("rime loss readback"),
                size: 4,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })
        .collect()
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
        let mut b = Builder::new(&graph, store);
        let lowered = lower(&mut b, loss, optim_cfg.as_ref())?;
        // Outputs and the loss live forever.
        let keep: Vec<usize> =
            outputs.iter().chain(loss.as_ref()).filter_map(|v| b.var_ref[v.0].as_ref().map(|r| r.slot)).collect();
        let (mut slots, calls, var_ref, grad_ref) = (b.slots, b.calls, b.var_ref, b.grad_ref);
        let calls = recompute_segments(&mut slots, calls, &keep);
        if let Some(d) = donor {
            share_from(d, &mut slots, &lowered);
        }
        let report = plan::plan(dev, &mut slots, &calls, &keep)?;
        let lists = build_dispatches(dev, &slots, &calls)?;
        let inputs = graph
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, nd)| matches!(nd.op, Op::Input))
            .map(|(i, nd)| (nd.name.clone(), Var(i)))
            .collect();
        let ex = Executor {
            graph,
            slots,
            var_ref,
            grad_ref,
            inputs,
            dispatch_count: lists.forward.len() + lists.backward.len() + lists.optim.len(),
            forward: lists.forward,
            backward: lists.backward,
            optim: lists.optim,
            dropouts: lists.dropouts,
            micro: 0,
            param_grads: lowered.param_grads,
            opt_state: lowered.opt_state,
            states: lowered.states,
            hyper: lowered.hyper,
            dloss: lowered.dloss,
            loss,
            optim_cfg,
            staging: loss_staging(dev),
            pending: None,
            step: 0,
            report,
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
}
