//! The graph: ops over tensor ids with static shapes, in the order model code calls them (which is a
//! topological order). The builder methods of each op (`g.linear`, `g.attention`, ...) live beside its
//! lowering and gradient rule in `crate::ops`; they check shapes when the model is built, so that a wrong
//! checkpoint or config fails with the op and the shapes named rather than inside a kernel.

use rime_kernels::DType;

use crate::error::{Error, Result};
use crate::store::{ParamId, ParamStore};

/// A tensor in the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Var(pub usize);

#[derive(Debug, Clone)]
pub enum Op {
    /// Fed per step (token ids, masks, targets, pooling weights).
    Input,
    Param(ParamId),
    /// A constant-shaped view of another tensor (same buffer).
    Reshape {
        x: Var,
    },
    Matmul {
        a: Var,
        b: Var,
        bias: Option<Var>,
        ta: bool,
        tb: bool,
    },
    Lora {
        x: Var,
        w: Var,
        bias: Option<Var>,
        a: Var,
        b: Var,
        scale: f32,
    },
    /// DoRA's output scale m / ||W + scale·B·A||_row \[OC\]; the norm is detached (gradient only to m).
    DoraScale {
        w: Var,
        a: Var,
        b: Var,
        m: Var,
        scale: f32,
    },
    Add {
        a: Var,
        b: Var,
    },
    Mul {
        a: Var,
        b: Var,
    },
    Scale {
        x: Var,
        s: f32,
    },
    Gelu {
        x: Var,
        tanh: bool,
    },
    Silu {
        x: Var,
    },
    Relu {
        x: Var,
    },
    Dropout {
        x: Var,
        p: f32,
        seed: u32,
    },
    LayerNorm {
        x: Var,
        gamma: Var,
        beta: Var,
        eps: f32,
    },
    RmsNorm {
        x: Var,
        gamma: Var,
        eps: f32,
    },
    Embedding {
        ids: Var,
        table: Var,
        /// The table holds rows offset.. of the vocabulary (a table split by rows); other ids give zeros.
        offset: u32,
    },
    /// Parts [.., w_i] side by side along the last axis.
    ConcatLast {
        parts: Vec<Var>,
    },
    Rope {
        x: Var,
        pos_offset: u32,
        theta: f32,
    },
    Attention {
        q: Var,
        k: Var,
        v: Var,
        mask: Option<Var>,
        causal: bool,
        scale: f32,
        /// Causal sliding window in keys (0 = none).
        window: usize,
    },
    Softmax {
        x: Var,
        mask: Option<Var>,
        causal: bool,
    },
    /// Logits as blocks of classes side by side (one block: the whole row) for rows row0.. of `targets`; the
    /// output is their share of the mean over all of `targets`' kept rows.
    CrossEntropy {
        parts: Vec<Var>,
        targets: Var,
        row0: usize,
        ignore_index: i32,
    },
    /// The cross-entropy share of rows row0.. of `targets` for the logits h·Wᵀ of frozen weights (blocks of
    /// classes side by side), without keeping the logits: the forward also computes h's gradient for a loss
    /// gradient of one.
    LinearCrossEntropy {
        h: Var,
        weights: Vec<Var>,
        targets: Var,
        row0: usize,
        ignore_index: i32,
    },
    /// Rows start..start + n of x [N, ..] (n from the node's shape).
    Rows {
        x: Var,
        start: usize,
    },
    /// rows [P, C] in front of every sequence of x [B, T, C].
    Prepend {
        x: Var,
        rows: Var,
    },
    /// x [B, C, H, W] -> [B, (H/p)·(W/p), C·p·p]: ViT's patches, each flattened as a Conv2d weight.
    PatchUnfold {
        x: Var,
        p: usize,
    },
    /// A persistent f32 tensor (a KV cache): zeroed once, kept across steps, shared by name with a donor.
    State,
    /// `cache` [S, R] (a state) with rows pos..pos+T replaced by src [T, R]; the same buffer, written in place.
    CacheWrite {
        cache: Var,
        src: Var,
        pos: Var,
    },
    /// Rotary embedding with token 0 at the position held in `pos` (one U32 input) when the step runs.
    RopeAt {
        x: Var,
        pos: Var,
        theta: f32,
    },
    /// [B, S] mask, 1 where s < pos + t: the filled prefix of a cache after writing t rows at `pos`.
    CacheMask {
        pos: Var,
        t: usize,
    },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input => "input",
            Op::Param(_) => "param",
            Op::Reshape { .. } => "reshape",
            Op::Matmul { .. } => "matmul",
            Op::Lora { .. } => "lora",
            Op::DoraScale { .. } => "dora_scale",
            Op::Add { .. } => "add",
            Op::Mul { .. } => "mul",
            Op::Scale { .. } => "scale",
            Op::Gelu { .. } => "gelu",
            Op::Silu { .. } => "silu",
            Op::Relu { .. } => "relu",
            Op::Dropout { .. } => "dropout",
            Op::LayerNorm { .. } => "layernorm",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::Embedding { .. } => "embedding",
            Op::ConcatLast { .. } => "concat_last",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::Softmax { .. } => "softmax",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::LinearCrossEntropy { .. } => "linear_cross_entropy",
            Op::Rows { .. } => "rows",
            Op::Prepend { .. } => "prepend",
            Op::PatchUnfold { .. } => "patch_unfold",
            Op::State => "state",
            Op::CacheWrite { .. } => "cache_write",
            Op::RopeAt { .. } => "rope_at",
            Op::CacheMask { .. } => "cache_mask",
        }
    }

    /// The tensors this op reads.
    pub fn inputs(&self) -> Vec<Var> {
        match self {
            Op::ConcatLast { parts } => return parts.clone(),
            Op::CrossEntropy { parts, targets, .. } => return parts.iter().copied().chain([*targets]).collect(),
            Op::LinearCrossEntropy { h, weights, targets, .. } => {
                return [*h].into_iter().chain(weights.iter().copied()).chain([*targets]).collect()
            }
            _ => {}
        }
        match *self {
            Op::ConcatLast { .. } | Op::CrossEntropy { .. } | Op::LinearCrossEntropy { .. } => vec![],
            Op::Input | Op::Param(_) | Op::State => vec![],
            Op::CacheWrite { cache, src, pos } => vec![cache, src, pos],
            Op::RopeAt { x, pos, .. } => vec![x, pos],
            Op::CacheMask { pos, .. } => vec![pos],
            Op::Reshape { x }
            | Op::Scale { x, .. }
            | Op::Gelu { x, .. }
            | Op::Silu { x }
            | Op::Relu { x }
            | Op::Dropout { x, .. }
            | Op::Rope { x, .. }
            | Op::Rows { x, .. }
            | Op::PatchUnfold { x, .. } => vec![x],
            Op::Matmul { a, b, bias, .. } => [Some(a), Some(b), bias].into_iter().flatten().collect(),
            Op::Lora { x, w, bias, a, b, .. } => {
                [Some(x), Some(w), bias, Some(a), Some(b)].into_iter().flatten().collect()
            }
            Op::DoraScale { w, a, b, m, .. } => vec![w, a, b, m],
            Op::Add { a, b } | Op::Mul { a, b } => vec![a, b],
            Op::LayerNorm { x, gamma, beta, .. } => vec![x, gamma, beta],
            Op::RmsNorm { x, gamma, .. } => vec![x, gamma],
            Op::Embedding { ids, table, .. } => vec![ids, table],
            Op::Attention { q, k, v, mask, .. } => [Some(q), Some(k), Some(v), mask].into_iter().flatten().collect(),
            Op::Softmax { x, mask, .. } => [Some(x), mask].into_iter().flatten().collect(),
            Op::Prepend { x, rows } => vec![x, rows],
        }
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub op: Op,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub name: String,
    /// The gradient-checkpoint segment the node was built in ([`Graph::checkpoint`]), if any.
    pub segment: Option<u32>,
}

/// A model as a list of ops. Build it with the methods below, in forward order.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub nodes: Vec<Node>,
    /// The segment new nodes join ([`Graph::checkpoint`]).
    segment: Option<u32>,
    segments: u32,
}

pub(crate) fn shape_err(op: &'static str, msg: String) -> Error {
    Error::Shape { op, msg }
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn push(&mut self, op: Op, shape: Vec<usize>, dtype: DType, name: &str) -> Var {
        self.nodes.push(Node { op, shape, dtype, name: name.to_string(), segment: self.segment });
        Var(self.nodes.len() - 1)
    }

    /// Gradient checkpointing: the nodes built from now until [`Graph::end_checkpoint`] form one segment
    /// whose activations a training executor does not keep for the backward pass. It keeps what enters the
    /// segment, and just before the segment's gradient rules run it recomputes the segment's forward (the
    /// same kernels on the same inputs, dropout masks included, so the gradients are bitwise those without
    /// checkpointing) into fresh buffers. A model marks each frozen block so: activation memory then holds
    /// one block's activations plus the block boundaries, at the cost of a second forward pass.
    pub fn checkpoint(&mut self) {
        self.segments += 1;
        self.segment = Some(self.segments);
    }

    /// Close the segment opened by [`Graph::checkpoint`].
    pub fn end_checkpoint(&mut self) {
        self.segment = None;
    }

    pub fn node(&self, v: Var) -> &Node {
        &self.nodes[v.0]
    }
    pub fn shape(&self, v: Var) -> &[usize] {
        &self.nodes[v.0].shape
    }

    /// A per-step input (f32, or U32/I32 for ids and targets).
    pub fn input(&mut self, name: &str, shape: &[usize], dtype: DType) -> Var {
        self.push(Op::Input, shape.to_vec(), dtype, name)
    }

    /// A parameter from the store, by name.
    pub fn param(&mut self, store: &ParamStore, name: &str) -> Result<Var> {
        let id = store.id(name)?;
        // One node per parameter, however often the model refers to it.
        if let Some(i) = self.nodes.iter().position(|n| matches!(n.op, Op::Param(p) if p == id)) {
            return Ok(Var(i));
        }
        let p = store.get(id);
        Ok(self.push(Op::Param(id), p.tensor.shape.clone(), p.tensor.dtype, name))
    }

    /// Name a tensor (for memory reports and debugging).
    pub fn name(&mut self, v: Var, name: &str) -> Var {
        self.nodes[v.0].name = name.to_string();
        v
    }
}
