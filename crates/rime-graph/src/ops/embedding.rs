//! `embedding`: rows of a table [V, C] picked by ids; the table's gradient scatters the output gradient back.

use rime_kernels::ops::embedding;
use rime_kernels::DType;

use crate::error::Result;
use crate::exec::builder::{Builder, Phase, TRef};
use crate::graph::{shape_err, Graph, Op, Var};

impl Graph {
    /// ids [..] (U32) into table [V, C] -> [.., C].
    pub fn embedding(&mut self, ids: Var, table: Var) -> Result<Var> {
        self.embedding_offset(ids, table, 0)
    }

    /// [`Graph::embedding`] into a table holding rows `offset..offset + V` of a larger vocabulary (a table split
    /// by rows): ids outside that range give zero rows, so the sum over the parts is the whole lookup.
    pub fn embedding_offset(&mut self, ids: Var, table: Var, offset: u32) -> Result<Var> {
        let st = self.shape(table).to_vec();
        if st.len() != 2 || self.node(ids).dtype != DType::U32 {
            return Err(shape_err(
                "embedding",
                format!("ids {:?} ({:?}) into table {st:?}", self.shape(ids), self.node(ids).dtype),
            ));
        }
        let mut shape = self.shape(ids).to_vec();
        shape.push(st[1]);
        Ok(self.push(Op::Embedding { ids, table, offset }, shape, DType::F32, "embedding"))
    }
}

pub(crate) fn forward(bl: &mut Builder, o: &TRef, ids: Var, table: Var, offset: u32) {
    let (ir, tr) = (bl.v(ids), bl.v(table));
    bl.call("embedding_forward", Phase::Forward, &[o, &ir, &tr], move |d, t| {
        let (out, ids) = (&t[0], &t[1]);
        let n = ids.numel();
        let out = out.reshape(&[n, out.numel() / n.max(1)])?;
        embedding::embedding_forward_offset(d, &out, &ids.reshape(&[n])?, &t[2], offset)
    });
}

pub(crate) fn backward(bl: &mut Builder, dout: &TRef, ids: Var, table: Var, offset: u32) {
    if bl.needs(table) {
        let ir = bl.v(ids);
        bl.grad_to(table, true, "embedding_backward", &[dout, &ir], move |d, t, acc| {
            let (dy, ids) = (&t[1], &t[2]);
            let n = ids.numel();
            let dy = dy.reshape(&[n, dy.numel() / n.max(1)])?;
            embedding::embedding_backward_offset(d, &t[0], &dy, &ids.reshape(&[n])?, acc, offset)
        });
    }
}
