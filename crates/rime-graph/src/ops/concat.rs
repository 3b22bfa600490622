//! `concat_last`: parts [.., w_i] side by side along the last axis (the output head of a vocabulary split by
//! rows); each part's gradient is its block of columns of the output's. `rows`: a chunk of rows (a batch of
//! tokens taken a chunk at a time), the same kernels on the matrix seen as one row.

use rime_kernels::ops::concat;
use rime_kernels::DType;

use crate::error::Result;
use crate::exec::builder::{Builder, Phase, TRef};
use crate::graph::{shape_err, Graph, Op, Var};

impl Graph {
    /// Parts [.., w_i] (the same leading dimensions) -> [.., Σ w_i].
    pub fn concat_last(&mut self, parts: &[Var]) -> Result<Var> {
        let first = parts.first().map(|&p| self.shape(p).to_vec()).unwrap_or_default();
        let lead = &first[..first.len().saturating_sub(1)];
        let mut width = 0;
        for &p in parts {
            let s = self.shape(p);
            if s.is_empty() || &s[..s.len() - 1] != lead || self.node(p).dtype != DType::F32 {
                let all: Vec<Vec<usize>> = parts.iter().map(|&p| self.shape(p).to_vec()).collect();
                return Err(shape_err("concat_last", format!("parts {all:?} must share their leading dimensions")));
            }
            width += s[s.len() - 1];
        }
        if first.is_empty() {
            return Err(shape_err("concat_last", "needs at least one part".to_string()));
        }
        let mut shape = lead.to_vec();
        shape.push(width);
        Ok(self.push(Op::ConcatLast { parts: parts.to_vec() }, shape, DType::F32, "concat_last"))
    }

    /// Rows start..start + n of x [N, ..] (f32): [n, ..]. Its gradient is dout in those rows of x's.
    pub fn rows(&mut self, x: Var, start: usize, n: usize) -> Result<Var> {
        let s = self.shape(x).to_vec();
        if s.is_empty() || n == 0 || start + n > s[0] || self.node(x).dtype != DType::F32 {
            return Err(shape_err(
                "rows",
                format!("rows {start}..{} of x {s:?} ({:?})", start + n, self.node(x).dtype),
            ));
        }
        let mut shape = s;
        shape[0] = n;
        Ok(self.push(Op::Rows { x, start }, shape, DType::F32, "rows"))
    }
}

/// x, the output and the offset seen as one row each: ([1, N·inner], [1, n·inner], start·inner).
fn row_views(bl: &Builder, x: Var, out: &TRef, start: usize) -> (TRef, TRef, usize) {
    let xs = bl.g.shape(x);
    let inner: usize = xs[1..].iter().product();
    let whole = bl.v(x).as_shape(&[1, xs[0] * inner]);
    let part = out.as_shape(&[1, out.shape.iter().product()]);
    (whole, part, start * inner)
}

pub(crate) fn rows_forward(bl: &mut Builder, o: &TRef, x: Var, start: usize) {
    let (whole, part, off) = row_views(bl, x, o, start);
    bl.call("slice_rows", Phase::Forward, &[&part, &whole], move |d, t| concat::slice_cols(d, &t[0], &t[1], off));
}

pub(crate) fn rows_backward(bl: &mut Builder, dout: &TRef, x: Var, start: usize) {
    let (whole, part, off) = row_views(bl, x, dout, start);
    let shape = whole.shape.clone();
    bl.grad_to(x, true, "place_rows", &[&part], move |d, t, acc| {
        concat::place_cols(d, &t[0].view(&shape, DType::F32), &t[1], off, acc)
    });
}

fn offsets(bl: &Builder, parts: &[Var]) -> Vec<usize> {
    let mut off = 0;
    parts
        .iter()
        .map(|&p| {
            let o = off;
            off += *bl.g.shape(p).last().unwrap_or(&0);
            o
        })
        .collect()
}

pub(crate) fn forward(bl: &mut Builder, o: &TRef, parts: &[Var]) {
    for (&p, off) in parts.iter().zip(offsets(bl, parts)) {
        let pr = bl.v(p);
        bl.call("concat_cols", Phase::Forward, &[o, &pr], move |d, t| concat::concat_cols(d, &t[0], &t[1], off));
    }
}

pub(crate) fn backward(bl: &mut Builder, dout: &TRef, parts: &[Var]) {
    for (&p, off) in parts.iter().zip(offsets(bl, parts)) {
        bl.grad_to(p, false, "slice_cols", &[dout], move |d, t, _| concat::slice_cols(d, &t[0], &t[1], off));
    }
}
