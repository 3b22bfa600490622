//! `attention`: fused scaled-dot-product attention with an optional key mask, causal or not, grouped-query
//! heads, and an optional causal sliding window; forward saves the log-sum-exp per query row, one backward
//! kernel writes dQ, dK and dV.

use rime_kernels::ops::attention;
use rime_kernels::DType;

use crate::error::Result;
use crate::exec::builder::{Builder, Phase, TRef};
use crate::graph::{shape_err, Graph, Op, Var};

impl Graph {
    /// Fused attention: q [B, T, NH, HS], k/v [B, S, NKV, HS], mask [B, S] (1 keep, 0 pad).
    pub fn attention(&mut self, q: Var, k: Var, v: Var, mask: Option<Var>, causal: bool, scale: f32) -> Result<Var> {
        self.attention_window(q, k, v, mask, causal, scale, 0)
    }

    /// [`Graph::attention`] with a causal sliding window: query t also needs key j > t + (S - T) - `window`
    /// (0 = no window; a window needs `causal`).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_window(
        &mut self,
        q: Var,
        k: Var,
        v: Var,
        mask: Option<Var>,
        causal: bool,
        scale: f32,
        window: usize,
    ) -> Result<Var> {
        if window > 0 && !causal {
            return Err(shape_err("attention", format!("a sliding window ({window}) needs causal attention")));
        }
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
        Ok(self.push(Op::Attention { q, k, v, mask, causal, scale, window }, sq, DType::F32, "attention"))
    }
}

/// The operands of one attention node.
pub(crate) struct Attn {
    pub qkv: [Var; 3],
    pub mask: Option<Var>,
    pub causal: bool,
    pub scale: f32,
    pub window: usize,
}

pub(crate) fn forward(bl: &mut Builder, v: Var, o: &TRef, at: Attn) {
    let [q, k, vv] = at.qkv;
    let sq = bl.g.shape(q).to_vec();
    let lse = bl.scratch(&[sq[0], sq[2], sq[1]]);
    bl.save_aux(v, &[&lse]);
    let (qr, kr, vr, mr) = (bl.v(q), bl.v(k), bl.v(vv), at.mask.map(|m| bl.v(m)));
    let (causal, scale, window) = (at.causal, at.scale, at.window);
    bl.call_opt("attention_forward", Phase::Forward, &[o, &lse, &qr, &kr, &vr], &[mr.as_ref()], move |d, t| {
        attention::attention_forward_window(d, &t[0], &t[1], &t[2], &t[3], &t[4], t.opt(0), causal, scale, window)
    });
}

pub(crate) fn backward(bl: &mut Builder, v: Var, dout: &TRef, at: Attn) {
    let [q, k, vv] = at.qkv;
    let (qr, kr, vr, mr) = (bl.v(q), bl.v(k), bl.v(vv), at.mask.map(|m| bl.v(m)));
    let (o, lse) = (bl.v(v), bl.aux(v, 0));
    let delta = bl.scratch(&lse.shape);
    let tq = bl.target_or_scratch(q, false);
    let tk = bl.target_or_scratch(k, false);
    let tv = bl.target_or_scratch(vv, false);
    let (causal, scale, window) = (at.causal, at.scale, at.window);
    let args = [&tq.r, &tk.r, &tv.r, &delta, dout, &qr, &kr, &vr, &o, &lse];
    bl.call_opt("attention_backward", Phase::Backward, &args, &[mr.as_ref()], move |d, t| {
        let (dq, dk, dv, dl) = (&t[0], &t[1], &t[2], &t[3]);
        attention::attention_backward_window(
            d,
            dq,
            dk,
            dv,
            dl,
            &t[4],
            &t[5],
            &t[6],
            &t[7],
            &t[8],
            &t[9],
            t.opt(0),
            causal,
            scale,
            window,
        )
    });
    bl.finish(&tq);
    bl.finish(&tk);
    bl.finish(&tv);
}
