//! `concat_last`: parts [.., w_i] side by side along the last axis (the output head of a vocabulary split by
//! rows); each part's gradient is its block of columns of the output's.

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
