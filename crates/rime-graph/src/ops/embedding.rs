//! `embedding`: rows of a table [V, C] picked by ids; the table's gradient scatters the output gradient back.

use rime_kernels::ops::embedding;
use rime_kernels::DType;

use crate::error::Result;
use crate::exec::builder::{Builder, Phase, TRef};
use crate::graph::{shape_err, Graph, Op, Var};

impl Graph {
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
}

pub(crate) fn forward(bl: &mut Builder, o: &TRef, ids: Var, table: Var) {
    let (ir, tr) = (bl.v(ids), bl.v(table));
    bl.call("embedding_forward", Phase::Forward, &[o, &ir, &tr], |d, t| {
        let (out, ids) = (&t[0], &t[1]);
        let n = ids.numel();
        embedding::embedding_forward(d, &out.reshape(&[n, out.numel() / n.max(1)])?, &ids.reshape(&[n])?, &t[2])
    });
}

pub(crate) fn backward(bl: &mut Builder, dout: &TRef, ids: Var, table: Var) {
    if bl.needs(table) {
        let ir = bl.v(ids);
        bl.grad_to(table, true, "embedding_backward", &[dout, &ir], |d, t, acc| {
            let (dy, ids) = (&t[1], &t[2]);
            let n = ids.numel();
            embedding::embedding_backward(d, &t[0], &dy.reshape(&[n, dy.numel() / n.max(1)])?, &ids.reshape(&[n])?, acc)
        });
    }
}
