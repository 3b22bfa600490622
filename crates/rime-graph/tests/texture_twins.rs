//! Texture twins in the parameter store and the executor: which parameters get one, that a trainable parameter
//! never keeps one (the optimizer writes its buffer), and that training through a frozen weight's twin gives
//! exactly the losses and parameters of training through its buffer.

mod common;
use common::{dev, rnd};

use rime_graph::{Executor, Graph, OptimConfig, ParamStore};
use rime_kernels::DType;

#[test]
fn only_frozen_linear_weights_get_twins() {
    let d = dev();
    let mut st = ParamStore::new();
    st.add_f32(d, "fc.weight", &rnd(1, 4 * 128, 1.0), &[4, 128], false).unwrap();
    st.add_f32(d, "head.weight", &rnd(2, 4 * 128, 1.0), &[4, 128], true).unwrap();
    st.add_f32(d, "embeddings.word_embeddings.weight", &rnd(3, 4 * 128, 1.0), &[4, 128], false).unwrap();
    st.add_f32(d, "fc.bias", &rnd(4, 128, 1.0), &[128], false).unwrap();
    st.add_f32(d, "odd.weight", &rnd(5, 4 * 36, 1.0), &[4, 36], false).unwrap();
    let n = st.add_texture_twins(d).unwrap();
    let has = |st: &ParamStore, name: &str| st.get(st.id(name).unwrap()).tensor.texture.is_some();
    assert_eq!(n, d.is_cpu() as usize);
    assert_eq!(has(&st, "fc.weight"), d.is_cpu());
    for name in ["head.weight", "embeddings.word_embeddings.weight", "fc.bias", "odd.weight"] {
        assert!(!has(&st, name), "{name} got a twin");
    }
    // Made trainable later (aTLAS does this), a weight drops its twin.
    st.set_trainable(st.id("fc.weight").unwrap(), true);
    assert!(!has(&st, "fc.weight"));
    // A tensor that arrives with a twin but is trainable keeps none either.
    let tw = d.with_texture_twin(&d.upload_f32(&rnd(6, 4 * 128, 1.0), &[4, 128]).unwrap()).unwrap();
    let id = st.add("new.weight", tw, true).unwrap();
    assert!(st.get(id).tensor.texture.is_none());
}

/// Five AdamW steps of a trainable layer, a frozen 64→64 layer and a head, with and without the frozen
/// weight's twin (its forward and its input gradient both read the twin).
fn train(twins: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = dev();
    let (n, c) = (40, 64);
    let mut st = ParamStore::new();
    st.add_f32(d, "pre.weight", &rnd(9, c * c, 0.2), &[c, c], true).unwrap();
    st.add_f32(d, "fc.weight", &rnd(10, c * c, 0.2), &[c, c], false).unwrap();
    st.add_f32(d, "fc.bias", &rnd(11, c, 0.2), &[c], false).unwrap();
    st.add_f32(d, "head.weight", &rnd(12, 2 * c, 0.2), &[2, c], true).unwrap();
    if twins {
        assert_eq!(st.add_texture_twins(d).unwrap(), d.is_cpu() as usize);
    }
    let mut g = Graph::new();
    let x = g.input("x", &[n, c], DType::F32);
    let t = g.input("targets", &[n], DType::I32);
    let (w, b, hw) =
        (g.param(&st, "fc.weight").unwrap(), g.param(&st, "fc.bias").unwrap(), g.param(&st, "head.weight").unwrap());
    let pw = g.param(&st, "pre.weight").unwrap();
    let x = g.linear(x, pw, None).unwrap();
    let h = g.linear(x, w, Some(b)).unwrap();
    let h = g.silu(h);
    let logits = g.linear(h, hw, None).unwrap();
    let loss = g.cross_entropy(logits, t, -100).unwrap();
    let mut ex = Executor::new(d, g, &st, Some(loss), &[], Some(OptimConfig::adamw(1e-2, 0.0))).unwrap();
    ex.feed_f32(d, "x", &rnd(13, n * c, 1.0)).unwrap();
    ex.feed_i32(d, "targets", &(0..n as i32).map(|i| i % 2).collect::<Vec<_>>()).unwrap();
    let mut losses = vec![];
    for _ in 0..5 {
        if let Some(l) = ex.step(d).unwrap().prev_loss {
            losses.push(l);
        }
    }
    losses.push(ex.last_loss(d).unwrap().unwrap());
    let read = |name: &str| st.read_f32(d, st.id(name).unwrap()).unwrap();
    (losses, read("pre.weight"), read("head.weight"))
}

#[test]
fn training_through_a_twin_equals_training_through_the_buffer() {
    let (l0, pre0, head0) = train(false);
    let (l1, pre1, head1) = train(true);
    assert!(l0[0] > 0.0 && l0.last() != l0.first(), "the loss moved: {l0:?}");
    assert_eq!(l0, l1, "losses with and without the twin");
    assert_eq!(pre0, pre1, "trained layer below the frozen one, with and without the twin");
    assert_eq!(head0, head1, "trained head with and without the twin");
}
