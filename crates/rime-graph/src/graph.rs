//! The graph builder: ops over tensor ids with static shapes, in the order model code calls them (which is
//! a topological order). Shapes are checked here, when the model is built, so that a wrong checkpoint or
//! config fails with the op and the shapes named rather than inside a kernel.

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
    /// DoRA's output scale m / ||W + scale·B·A||_row [OC]; the norm is detached (gradient only to m).
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
    },
    Softmax {
        x: Var,
        mask: Option<Var>,
        causal: bool,
    },
    CrossEntropy {
        logits: Var,
        targets: Var,
        ignore_index: i32,
    },
    /// rows [P, C] in front of every sequence of x [B, T, C].
    Prepend {
        x: Var,
        rows: Var,
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
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::Softmax { .. } => "softmax",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::Prepend { .. } => "prepend",
        }
    }

    /// The tensors this op reads.
    pub fn inputs(&self) -> Vec<Var> {
        match *self {
            Op::Input | Op::Param(_) => vec![],
            Op::Reshape { x }
            | Op::Scale { x, .. }
            | Op::Gelu { x, .. }
            | Op::Silu { x }
            | Op::Relu { x }
            | Op::Dropout { x, .. }
            | Op::Rope { x, .. } => vec![x],
            Op::Matmul { a, b, bias, .. } => [Some(a), Some(b), bias].into_iter().flatten().collect(),
            Op::Lora { x, w, bias, a, b, .. } => {
                [Some(x), Some(w), bias, Some(a), Some(b)].into_iter().flatten().collect()
            }
            Op::DoraScale { w, a, b, m, .. } => vec![w, a, b, m],
            Op::Add { a, b } | Op::Mul { a, b } => vec![a, b],
            Op::LayerNorm { x, gamma, beta, .. } => vec![x, gamma, beta],
            Op::RmsNorm { x, gamma, .. } => vec![x, gamma],
            Op::Embedding { ids, table } => vec![ids, table],
            Op::Attention { q, k, v, mask, .. } => [Some(q), Some(k), Some(v), mask].into_iter().flatten().collect(),
            Op::Softmax { x, mask, .. } => [Some(x), mask].into_iter().flatten().collect(),
            Op::CrossEntropy { logits, targets, .. } => vec![logits, targets],
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
}

/// A model as a list of ops. Build it with the methods below, in forward order.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub nodes: Vec<Node>,
}

fn shape_err(op: &'static str, msg: String) -> Error {
    Error::Shape { op, msg }
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, op: Op, shape: Vec<usize>, dtype: DType, name: &str) -> Var {
        self.nodes.push(Node { op, shape, dtype, name: name.to_string() });
        Var(self.nodes.len() - 1)
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

    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Result<Var> {
        let n: usize = shape.iter().product();
        let have: usize = self.shape(x).iter().product();
        if n != have {
            return Err(shape_err("reshape", format!("{:?} -> {shape:?}", self.shape(x))));
        }
        let dt = self.node(x).dtype;
        Ok(self.push(Op::Reshape { x }, shape.to_vec(), dt, "reshape"))
    }

    /// out = op(a)·op(b) (+ bias); b is 2-D (shared) or batched like a.
    pub fn matmul_ex(&mut self, a: Var, b: Var, bias: Option<Var>, ta: bool, tb: bool) -> Result<Var> {
        let (sa, sb) = (self.shape(a).to_vec(), self.shape(b).to_vec());
        if sa.len() < 2 || sb.len() < 2 {
            return Err(shape_err("matmul", format!("operands must be at least 2-D: {sa:?} · {sb:?}")));
        }
        let (m, k) = if ta { (sa[sa.len() - 1], sa[sa.len() - 2]) } else { (sa[sa.len() - 2], sa[sa.len() - 1]) };
        let (kb, n) = if tb { (sb[sb.len() - 1], sb[sb.len() - 2]) } else { (sb[sb.len() - 2], sb[sb.len() - 1]) };
        if k != kb {
            return Err(shape_err("matmul", format!("inner dimensions differ: {sa:?} (t={ta}) · {sb:?} (t={tb})")));
        }
        if sb.len() > 2 && sb[..sb.len() - 2] != sa[..sa.len() - 2] {
            return Err(shape_err("matmul", format!("batch dimensions differ: {sa:?} · {sb:?}")));
        }
        if let Some(bv) = bias {
            if self.shape(bv) != [n] {
                return Err(shape_err("matmul", format!("bias {:?} for {n} outputs", self.shape(bv))));
            }
        }
        let mut shape = sa[..sa.len() - 2].to_vec();
        shape.extend([m, n]);
        Ok(self.push(Op::Matmul { a, b, bias, ta, tb }, shape, DType::F32, "matmul"))
    }

    pub fn matmul(&mut self, a: Var, b: Var) -> Result<Var> {
        self.matmul_ex(a, b, None, false, false)
    }

    /// PyTorch Linear: x [.., C] · Wᵀ (W [OC, C]) + bias.
    pub fn linear(&mut self, x: Var, w: Var, bias: Option<Var>) -> Result<Var> {
        self.matmul_ex(x, w, bias, false, true)
    }

    /// Linear plus a low-rank update: x·Wᵀ + scale·(x·Aᵀ)·Bᵀ (+ bias), A [R, C], B [OC, R].
    pub fn lora(&mut self, x: Var, w: Var, bias: Option<Var>, a: Var, b: Var, scale: f32) -> Result<Var> {
        let (sx, sw, sa, sb) =
            (self.shape(x).to_vec(), self.shape(w).to_vec(), self.shape(a).to_vec(), self.shape(b).to_vec());
        let c = *sx.last().unwrap_or(&0);
        if sw.len() != 2
            || sw[1] != c
            || sa.len() != 2
            || sa[1] != c
            || sb.len() != 2
            || sb[0] != sw[0]
            || sb[1] != sa[0]
        {
            return Err(shape_err("lora", format!("x {sx:?}, W {sw:?}, A {sa:?}, B {sb:?}")));
        }
        let mut shape = sx[..sx.len() - 1].to_vec();
        shape.push(sw[0]);
        Ok(self.push(Op::Lora { x, w, bias, a, b, scale }, shape, DType::F32, "lora"))
    }

    /// DoRA's scale g = m / ||W + scale·B·A||_row for W [OC, C], A [R, C], B [OC, R], m [OC]: the factor that
    /// multiplies a DoRA layer's output row-wise (`mul` with g as the row operand). As in peft the norm is
    /// detached: backward reaches m only, never A or B.
    pub fn dora_scale(&mut self, w: Var, a: Var, b: Var, m: Var, scale: f32) -> Result<Var> {
        let (sw, sa, sb, sm) =
            (self.shape(w).to_vec(), self.shape(a).to_vec(), self.shape(b).to_vec(), self.shape(m).to_vec());
        let ok = sw.len() == 2
            && sa.len() == 2
            && sb.len() == 2
            && sa[1] == sw[1]
            && sb == [sw[0], sa[0]]
            && sm == [sw[0]]
            && self.node(w).dtype == DType::F32;
        if !ok {
            return Err(shape_err(
                "dora_scale",
                format!("W {sw:?} ({:?}, must be F32), A {sa:?}, B {sb:?}, m {sm:?}", self.node(w).dtype),
            ));
        }
        Ok(self.push(Op::DoraScale { w, a, b, m, scale }, vec![sw[0]], DType::F32, "dora_scale"))
    }

    fn same_or_row(&self, op: &'static str, a: Var, b: Var) -> Result<Vec<usize>> {
        let (sa, sb) = (self.shape(a), self.shape(b));
        let ok = sa == sb || (sb.len() == 1 && sa.last() == sb.last());
        if !ok {
            return Err(shape_err(op, format!("{sa:?} with {sb:?} (same shape or a row of the last dim)")));
        }
        Ok(sa.to_vec())
    }

    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let s = self.same_or_row("add", a, b)?;
        Ok(self.push(Op::Add { a, b }, s, DType::F32, "add"))
    }
    pub fn mul(&mut self, a: Var, b: Var) -> Result<Var> {
        let s = self.same_or_row("mul", a, b)?;
        Ok(self.push(Op::Mul { a, b }, s, DType::F32, "mul"))
    }
    pub fn scale(&mut self, x: Var, s: f32) -> Var {
        let sh = self.shape(x).to_vec();
        self.push(Op::Scale { x, s }, sh, DType::F32, "scale")
    }
    fn unary(&mut self, op: Op, x: Var) -> Var {
        let sh = self.shape(x).to_vec();
        let name = op.name();
        self.push(op, sh, DType::F32, name)
    }
    pub fn gelu(&mut self, x: Var, tanh: bool) -> Var {
        self.unary(Op::Gelu { x, tanh }, x)
    }
    pub fn silu(&mut self, x: Var) -> Var {
        self.unary(Op::Silu { x }, x)
    }
    pub fn relu(&mut self, x: Var) -> Var {
        self.unary(Op::Relu { x }, x)
    }
    /// Dropout with probability p. `seed` tells dropouts of one graph apart; the executor mixes it with the step
    /// (see [`crate::dropout_seed`]) so each training step draws a fresh mask, shared by that step's forward and
    /// backward. Build evaluation graphs without dropout.
    pub fn dropout(&mut self, x: Var, p: f32, seed: u32) -> Var {
        if p <= 0.0 {
            return x;
        }
        self.unary(Op::Dropout { x, p, seed }, x)
    }
    pub fn rope(&mut self, x: Var, pos_offset: u32, theta: f32) -> Result<Var> {
        if self.shape(x).len() != 4 {
            return Err(shape_err("rope", format!("x must be [B, T, NH, HS], got {:?}", self.shape(x))));
        }
        Ok(self.unary(Op::Rope { x, pos_offset, theta }, x))
    }

    pub fn layernorm(&mut self, x: Var, gamma: Var, beta: Var, eps: f32) -> Result<Var> {
        let c = *self.shape(x).last().unwrap_or(&0);
        if self.shape(gamma) != [c] || self.shape(beta) != [c] {
            return Err(shape_err(
                "layernorm",
                format!("x {:?}, gamma {:?}, beta {:?}", self.shape(x), self.shape(gamma), self.shape(beta)),
            ));
        }
        Ok(self.unary(Op::LayerNorm { x, gamma, beta, eps }, x))
    }
    pub fn rmsnorm(&mut self, x: Var, gamma: Var, eps: f32) -> Result<Var> {
        let c = *self.shape(x).last().unwrap_or(&0);
        if self.shape(gamma) != [c] {
            return Err(shape_err("rmsnorm", format!("x {:?}, gamma {:?}", self.shape(x), self.shape(gamma))));
        }
        Ok(self.unary(Op::RmsNorm { x, gamma, eps }, x))
    }

    /// ids [..] (U32) into table [V, C] -> [.., C].
    pub fn embedding(&mut self, ids: Var, table: Var) -> Result<Var> {
        let st = self.shape(table).to_vec();
        if st.len() != 2 || self.node(ids).dtype != DType::U32 {
            return Err(shape_err(
                "embedding",
                format!("ids {:?} ({:?}) into table {st:?}", self.shape(ids), self.node(ids).dtype),
            ));
        }
        let mut shape = self.shape(ids).to_vec();
        shape.push(st[1]);
        Ok(self.push(Op::Embedding { ids, table }, shape, DType::F32, "embedding"))
    }

    /// Fused attention: q [B, T, NH, HS], k/v [B, S, NKV, HS], mask [B, S] (1 keep, 0 pad).
    pub fn attention(&mut self, q: Var, k: Var, v: Var, mask: Option<Var>, causal: bool, scale: f32) -> Result<Var> {
        let (sq, sk, sv) = (self.shape(q).to_vec(), self.shape(k).to_vec(), self.shape(v).to_vec());
        let ok = sq.len() == 4
            && sk.len() == 4
            && sk == sv
            && sq[0] == sk[0]
            && sq[3] == sk[3]
            && sk[2] > 0
            && sq[2] % sk[2] == 0;
        if !ok {
            return Err(shape_err("attention", format!("q {sq:?}, k {sk:?}, v {sv:?}")));
        }
        if let Some(m) = mask {
            if self.shape(m) != [sk[0], sk[1]] {
                return Err(shape_err(
                    "attention",
                    format!("mask {:?}, expected [{}, {}]", self.shape(m), sk[0], sk[1]),
                ));
            }
        }
        Ok(self.push(Op::Attention { q, k, v, mask, causal, scale }, sq, DType::F32, "attention"))
    }

    pub fn softmax(&mut self, x: Var, mask: Option<Var>, causal: bool) -> Var {
        self.unary(Op::Softmax { x, mask, causal }, x)
    }

    /// Mean cross-entropy over rows whose target is not `ignore_index`; logits [N, V], targets [N] (I32).
    pub fn cross_entropy(&mut self, logits: Var, targets: Var, ignore_index: i32) -> Result<Var> {
        let (sl, st) = (self.shape(logits).to_vec(), self.shape(targets).to_vec());
        if sl.len() != 2 || st != [sl[0]] || self.node(targets).dtype != DType::I32 {
            return Err(shape_err(
                "cross_entropy",
                format!("logits {sl:?}, targets {st:?} ({:?})", self.node(targets).dtype),
            ));
        }
        Ok(self.push(Op::CrossEntropy { logits, targets, ignore_index }, vec![1], DType::F32, "cross_entropy"))
    }

    /// x [B, T, C] with rows [P, C] put in front of every sequence: [B, P+T, C] (soft prompts, prefix keys and
    /// values). The gradient of x is the last T rows of the output's; that of rows the batch sum of the first P.
    pub fn prepend(&mut self, x: Var, rows: Var) -> Result<Var> {
        let (sx, sr) = (self.shape(x).to_vec(), self.shape(rows).to_vec());
        if sx.len() != 3 || sr.len() != 2 || sr[1] != sx[2] {
            return Err(shape_err("prepend", format!("x {sx:?} must be [B, T, C] and rows {sr:?} [P, C]")));
        }
        Ok(self.push(Op::Prepend { x, rows }, vec![sx[0], sr[0] + sx[1], sx[2]], DType::F32, "prepend"))
    }

    /// Name a tensor (for memory reports and debugging).
    pub fn name(&mut self, v: Var, name: &str) -> Var {
        self.nodes[v.0].name = name.to_string();
        v
    }
}
