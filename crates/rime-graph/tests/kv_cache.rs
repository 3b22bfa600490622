//! Decoding with a KV cache expressed in the graph: persistent state written in place at a runtime position
//! (`state`, `cache_write`), rotary embedding and attention taking that position from a U32 input (`rope_at`,
//! `attention_at`), one decode executor built once and replayed for every step, sharing the cache with the
//! prefill executor by name. Checked against the same attention layer run over the whole sequence.

mod common;
use common::{dev, rnd};

use rand::{Rng, SeedableRng};
use rime_graph::{Executor, Graph, OptimConfig, ParamStore, Var};
use rime_kernels::DType;

const NH: usize = 2;
const NKV: usize = 1;
const HS: usize = 4;
const C: usize = NH * HS;
const S: usize = 7;
const THETA: f32 = 10000.0;

fn store() -> ParamStore {
    let d = dev();
    let mut st = ParamStore::new();
    st.add_f32(d, "wq", &rnd(1, C * C, 0.5), &[C, C], false).unwrap();
    st.add_f32(d, "wk", &rnd(2, NKV * HS * C, 0.5), &[NKV * HS, C], false).unwrap();
    st.add_f32(d, "wv", &rnd(3, NKV * HS * C, 0.5), &[NKV * HS, C], false).unwrap();
    st
}

/// q [1, T, NH, HS], k and v [1, T, NKV, HS] of x [1, T, C].
fn qkv(g: &mut Graph, st: &ParamStore, x: Var, t: usize) -> (Var, Var, Var) {
    let (wq, wk, wv) = (g.param(st, "wq").unwrap(), g.param(st, "wk").unwrap(), g.param(st, "wv").unwrap());
    let q = g.linear(x, wq, None).unwrap();
    let k = g.linear(x, wk, None).unwrap();
    let v = g.linear(x, wv, None).unwrap();
    let q = g.reshape(q, &[1, t, NH, HS]).unwrap();
    let k = g.reshape(k, &[1, t, NKV, HS]).unwrap();
    let v = g.reshape(v, &[1, t, NKV, HS]).unwrap();
    (q, k, v)
}

fn scale() -> f32 {
    1.0 / (HS as f32).sqrt()
}

/// The reference: causal attention over the whole sequence at positions 0..T.
fn full(st: &ParamStore, xs: &[f32], t: usize) -> Vec<f32> {
    let d = dev();
    let mut g = Graph::new();
    let x = g.input("x", &[1, t, C], DType::F32);
    let (q, k, v) = qkv(&mut g, st, x, t);
    let (qr, kr) = (g.rope(q, 0, THETA).unwrap(), g.rope(k, 0, THETA).unwrap());
    let att = g.attention(qr, kr, v, None, true, scale()).unwrap();
    let mut ex = Executor::new(d, g, st, None, &[att], None).unwrap();
    ex.feed_f32(d, "x", xs).unwrap();
    ex.forward(d).unwrap();
    ex.read(d, att).unwrap()
}

/// A chunk of `t` tokens at the runtime position: rope_at, writes into the caches, and attention either
/// causal over the chunk itself (a prompt at position 0) or, for one token, over the cache (`attention_at`).
fn chunk(g: &mut Graph, st: &ParamStore, t: usize) -> Var {
    let x = g.input("x", &[1, t, C], DType::F32);
    let pos = g.position_input("pos");
    let (q, k, v) = qkv(g, st, x, t);
    let (qr, kr) = (g.rope_at(q, pos, THETA).unwrap(), g.rope_at(k, pos, THETA).unwrap());
    let (kc, vc) = (g.state("cache.k.0", &[S, NKV * HS]), g.state("cache.v.0", &[S, NKV * HS]));
    let kw = g.cache_write(kc, kr, pos).unwrap();
    let vw = g.cache_write(vc, v, pos).unwrap();
    if t > 1 {
        return g.attention(qr, kr, v, None, true, scale()).unwrap();
    }
    let (ka, va) = (g.reshape(kw, &[1, S, NKV, HS]).unwrap(), g.reshape(vw, &[1, S, NKV, HS]).unwrap());
    g.attention_at(qr, ka, va, pos, scale()).unwrap()
}

#[test]
fn decoding_with_the_graph_cache_equals_attention_over_the_whole_sequence() {
    let d = dev();
    let st = store();
    let (t_all, t0) = (S, 3);
    let xs = rnd(4, t_all * C, 1.0);
    let want = full(&st, &xs, t_all);
    let close = |got: &[f32], want: &[f32], what: &str| {
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= 1e-5, "{what}[{i}]: {a} vs whole-sequence {b}");
        }
    };
    let mut gp = Graph::new();
    let att_p = chunk(&mut gp, &st, t0);
    let mut prefill = Executor::new(d, gp, &st, None, &[att_p], None).unwrap();
    let mut gd = Graph::new();
    let att_d = chunk(&mut gd, &st, 1);
    let mut decode = Executor::new_sharing(d, gd, &st, None, &[att_d], None, Some(&prefill)).unwrap();
    let per_step = decode.dispatches_per_step();
    assert!(decode.step_dispatches().any(|x| x.label == "cache_write"));
    // Twice: the second pass overwrites the cache from position 0 (stale rows beyond are masked out).
    for round in 0..2 {
        prefill.feed_u32(d, "pos", &[0]).unwrap();
        prefill.feed_f32(d, "x", &xs[..t0 * C]).unwrap();
        prefill.forward(d).unwrap();
        close(&prefill.read(d, att_p).unwrap(), &want[..t0 * C], &format!("prefill (round {round})"));
        for t in t0..t_all {
            decode.feed_u32(d, "pos", &[t as u32]).unwrap();
            decode.feed_f32(d, "x", &xs[t * C..(t + 1) * C]).unwrap();
            decode.forward(d).unwrap();
            close(&decode.read(d, att_d).unwrap(), &want[t * C..(t + 1) * C], &format!("decode step {t} ({round})"));
        }
    }
    assert_eq!(decode.dispatches_per_step(), per_step);
}

#[test]
fn rope_at_equals_rope_at_that_position_and_its_gradient_matches_finite_differences() {
    let d = dev();
    let (t, p) = (3, 5u32);
    let mut st = ParamStore::new();
    st.add_f32(d, "x", &rnd(5, t * C, 1.0), &[1, t, NH, HS], true).unwrap();
    let mut g = Graph::new();
    let x = g.param(&st, "x").unwrap();
    let pos = g.position_input("pos");
    let (y, want) = (g.rope_at(x, pos, THETA).unwrap(), g.rope(x, p, THETA).unwrap());
    let logits = g.reshape(y, &[t * NH, HS]).unwrap();
    let targets = g.input("targets", &[t * NH], DType::I32);
    let loss = g.cross_entropy(logits, targets, -100).unwrap();
    let mut ex = Executor::new(d, g, &st, Some(loss), &[y, want], Some(OptimConfig::adamw(1e-2, 0.0))).unwrap();
    ex.feed_u32(d, "pos", &[p]).unwrap();
    ex.feed_i32(d, "targets", &[0, 3, 1, 2, 2, 1]).unwrap();
    ex.backward_only(d).unwrap();
    assert_eq!(ex.read(d, y).unwrap(), ex.read(d, want).unwrap());
    let id = st.id("x").unwrap();
    let grad = ex.read_param_grad(d, id).unwrap();
    let mut w = st.read_f32(d, id).unwrap();
    let mut r = rand::rngs::StdRng::seed_from_u64(3);
    for _ in 0..8 {
        let i = r.random_range(0..w.len());
        let (orig, eps) = (w[i], 1e-2f32);
        let mut at = |v: f32| {
            w[i] = v;
            d.write_f32(&st.get(id).tensor, &w).unwrap();
            ex.forward(d).unwrap();
            ex.read(d, loss).unwrap()[0] as f64
        };
        let fd = ((at(orig + eps) - at(orig - eps)) / (2.0 * eps as f64)) as f32;
        w[i] = orig;
        d.write_f32(&st.get(id).tensor, &w).unwrap();
        assert!((fd - grad[i]).abs() <= 2e-3 + 0.03 * fd.abs().max(grad[i].abs()), "x[{i}]: {} vs {fd}", grad[i]);
    }
}

#[test]
fn cache_ops_name_bad_inputs_and_refuse_gradients() {
    let d = dev();
    let mut st = store();
    let mut g = Graph::new();
    let pos_f = g.input("pos_f", &[1], DType::F32);
    let x = g.input("x", &[1, 2, NH, HS], DType::F32);
    let e = g.rope_at(x, pos_f, THETA).unwrap_err().to_string();
    assert!(e.contains("rope_at") && e.contains("U32"), "{e}");
    let pos = g.position_input("pos");
    let not_state = g.input("c", &[S, HS], DType::F32);
    let e = g.cache_write(not_state, x, pos).unwrap_err().to_string();
    assert!(e.contains("cache_write") && e.contains("state"), "{e}");
    let kc = g.state("k", &[S, 3]);
    assert!(g.cache_write(kc, x, pos).unwrap_err().to_string().contains("whole F32 rows"));
    let e = g.attention_at(x, x, x, pos, 1.0).unwrap_err().to_string();
    assert!(e.contains("attention_at") && e.contains("one new token"), "{e}");
    // A trainable projection feeding the cache on the way to a loss: a clear error, not a wrong gradient.
    st.add_f32(d, "wk_train", &rnd(6, NKV * HS * C, 0.5), &[NKV * HS, C], true).unwrap();
    let mut g = Graph::new();
    let x = g.input("x", &[1, 1, C], DType::F32);
    let pos = g.position_input("pos");
    let wk = g.param(&st, "wk_train").unwrap();
    let k = g.linear(x, wk, None).unwrap();
    let kc = g.state("cache.k", &[S, NKV * HS]);
    let kw = g.cache_write(kc, k, pos).unwrap();
    let logits = g.reshape(kw, &[S, NKV * HS]).unwrap();
    let targets = g.input("targets", &[S], DType::I32);
    let loss = g.cross_entropy(logits, targets, -100).unwrap();
    let e = match Executor::new(d, g, &st, Some(loss), &[], Some(OptimConfig::adamw(1e-2, 0.0))) {
        Ok(_) => panic!("a loss through a cache write was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("cache_write") && e.contains("no gradient"), "{e}");
}
