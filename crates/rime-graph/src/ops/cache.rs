//! Decoding with a KV cache inside the graph: `cache_write` writes rows into a persistent [`Graph::state`] at a
//! position held in a U32 input, `cache_mask` marks the filled prefix, and [`Graph::attention_at`] attends one
//! new token over the whole cache under that mask. With `rope_at` (rotary embedding at the same runtime
//! position) one built executor serves every decode step: only the position and the token are fed.

use rime_kernels::ops::cache;
use rime_kernels::DType;

use crate::error::{Error, Result};
use crate::exec::builder::{Builder, Phase, TRef};
use crate::graph::{shape_err, Graph, Op, Var};

impl Graph {
    /// The position input of a decode step: one U32, fed per step (`feed_u32(dev, name, &[pos])`).
    pub fn position_input(&mut self, name: &str) -> Var {
        self.input(name, &[1], DType::U32)
    }

    pub(crate) fn need_position(&self, op: &'static str, pos: Var) -> Result<()> {
        if self.shape(pos) != [1] || self.node(pos).dtype != DType::U32 {
            let (s, dt) = (self.shape(pos), self.node(pos).dtype);
            return Err(shape_err(op, format!("pos {s:?} ({dt:?}) must be a [1] U32 input")));
        }
        Ok(())
    }

    /// `cache` [S, R] (a [`Graph::state`]) with rows pos..pos+T replaced by src (T·R values, e.g. [B=1, T, R]
    /// or [T, NKV, HS]); returns the cache after the write (read it through this Var so that readers come
    /// after the writer). Rows past S are dropped. No gradient: build decoding graphs without a loss.
    pub fn cache_write(&mut self, cache: Var, src: Var, pos: Var) -> Result<Var> {
        self.need_position("cache_write", pos)?;
        let (sc, ss) = (self.shape(cache).to_vec(), self.shape(src).to_vec());
        let n: usize = ss.iter().product();
        let ok = matches!(self.node(cache).op, Op::State) && sc.len() == 2 && sc[1] > 0 && n.is_multiple_of(sc[1]);
        if !ok || self.node(src).dtype != DType::F32 {
            return Err(shape_err(
                "cache_write",
                format!("cache {sc:?} must be a [S, R] state and src {ss:?} whole F32 rows of R"),
            ));
        }
        Ok(self.push(Op::CacheWrite { cache, src, pos }, sc, DType::F32, "cache_write"))
    }

    /// [b, s] mask: 1 where column < pos + t (the cache's filled prefix after writing t rows at pos), else 0.
    pub fn cache_mask(&mut self, pos: Var, b: usize, s: usize, t: usize) -> Result<Var> {
        self.need_position("cache_mask", pos)?;
        Ok(self.push(Op::CacheMask { pos, t }, vec![b, s], DType::F32, "cache_mask"))
    }

    /// One new token per sequence, q [B, 1, NH, HS], attending over a whole cache k/v [B, S, NKV, HS] (views of
    /// [`Graph::cache_write`] outputs) up to and including position `pos`: attention under
    /// [`Graph::cache_mask`]. Several new tokens need a causal offset the mask cannot express: run a prompt
    /// through a graph with ordinary causal `attention` over its own keys (writing the cache too), then decode.
    pub fn attention_at(&mut self, q: Var, k: Var, v: Var, pos: Var, scale: f32) -> Result<Var> {
        let (sq, sk) = (self.shape(q).to_vec(), self.shape(k).to_vec());
        if sq.len() != 4 || sq[1] != 1 || sk.len() != 4 {
            return Err(shape_err(
                "attention_at",
                format!("q {sq:?} must be [B, 1, NH, HS] (one new token) and k {sk:?} [B, S, NKV, HS]"),
            ));
        }
        let mask = self.cache_mask(pos, sk[0], sk[1], 1)?;
        self.attention(q, k, v, Some(mask), false, scale)
    }
}

pub(crate) fn write_forward(bl: &mut Builder, o: &TRef, src: Var, pos: Var) {
    let (sr, pr) = (bl.v(src), bl.v(pos));
    let rows = sr.shape.iter().product::<usize>() / o.shape[1];
    let src2 = sr.as_shape(&[rows, o.shape[1]]);
    bl.call("cache_write", Phase::Forward, &[o, &src2, &pr], |d, t| cache::cache_write(d, &t[0], &t[1], &t[2]));
}

pub(crate) fn mask_forward(bl: &mut Builder, o: &TRef, pos: Var, t: usize) {
    let pr = bl.v(pos);
    bl.call("cache_mask", Phase::Forward, &[o, &pr], move |d, a| cache::cache_mask(d, &a[0], &a[1], t));
}

/// A cache write has no gradient rule; reaching one from a loss is a graph-building error.
pub(crate) fn write_backward(bl: &Builder, v: Var) -> Result<()> {
    Err(Error::Invalid(format!(
        "cache_write '{}' lies on a path to the loss; KV-cache writes have no gradient (decode without a loss)",
        bl.g.node(v).name
    )))
}
