//! Where a node's output lives when it is not a fresh activation: inputs, parameters and persistent state
//! get their own slots; views (`reshape`, and `cache_write`, which writes its cache in place) share the slot
//! of the tensor they view.

use rime_kernels::DType;

use crate::exec::builder::{Builder, Kind, Slot, TRef};
use crate::graph::{Graph, Op, Var};

impl Graph {
    /// A persistent f32 tensor, zeroed when the executor is built and kept across steps (a KV cache). Write
    /// it with [`Graph::cache_write`]; executors built with [`crate::Executor::new_sharing`] share the
    /// donor's state of the same name (a prefill graph and a decode graph over one cache).
    pub fn state(&mut self, name: &str, shape: &[usize]) -> Var {
        self.push(Op::State, shape.to_vec(), DType::F32, name)
    }
}

/// The slot of node `v` when it is not a planned activation (None: give it a fresh planned slot).
pub(crate) fn storage(b: &mut Builder, v: Var) -> Option<TRef> {
    let g = b.g;
    let node = g.node(v);
    match node.op {
        Op::Input => Some(b.slot(&node.shape, node.dtype, Kind::Input)),
        Op::State => Some(b.slot(&node.shape, DType::F32, Kind::State)),
        Op::Param(id) => {
            let p = b.store.get(id);
            let kind = if p.trainable { Kind::TrainParam } else { Kind::FrozenParam };
            // Only frozen parameters are read through texture twins: the optimizer writes trainable buffers.
            let mut t = p.tensor.clone();
            if p.trainable {
                t.texture = None;
            }
            b.slots.push(Slot { bytes: t.bytes(), kind, tensor: Some(t) });
            Some(TRef { slot: b.slots.len() - 1, shape: node.shape.clone(), dtype: p.tensor.dtype })
        }
        Op::Reshape { x } | Op::CacheWrite { cache: x, .. } => {
            let xr = b.v(x);
            Some(TRef { slot: xr.slot, shape: node.shape.clone(), dtype: xr.dtype })
        }
        _ => None,
    }
}
