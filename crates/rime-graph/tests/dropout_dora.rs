//! Per-step dropout masks (a fresh mask each training step, the same one in forward and backward of a step,
//! reproducible for a seed) and DoRA's detached scale op: gradients against central finite differences of
//! the GPU forward pass and against a graph with the scale held constant.

mod common;
use common::{dev, rnd};

use rime_graph::{dropout_seed, Executor, Graph, OptimConfig, ParamStore, Var};
use rime_kernels::reference::elementwise as re;
use rime_kernels::{DType, Device};

/// Central differences of the loss vs the executor's gradient for the named trainable parameters (every
/// coordinate). f32 forward: eps 1e-2, tolerance 2e-3 abs + 3% rel.
fn check_grads(ex: &mut Executor, store: &ParamStore, loss: Var, names: &[&str]) {
    let d = dev();
    ex.backward_only(d).unwrap();
    for name in names {
        let id = store.id(name).unwrap();
        let p = store.get(id);
        let g = ex.read_param_grad(d, id).unwrap();
        let mut w = store.read_f32(d, id).unwrap();
        for i in 0..w.len() {
            let orig = w[i];
            let eps = 1e-2f32;
            let mut at = |v: f32, w: &mut Vec<f32>| {
                w[i] = v;
                d.write_f32(&p.tensor, w).unwrap();
                ex.forward(d).unwrap();
                ex.read(d, loss).unwrap()[0] as f64
            };
            let up = at(orig + eps, &mut w);
            let down = at(orig - eps, &mut w);
            at(orig, &mut w);
            let fd = ((up - down) / (2.0 * eps as f64)) as f32;
            let tol = 2e-3 + 0.03 * fd.abs().max(g[i].abs());
            assert!((fd - g[i]).abs() <= tol, "{name}[{i}]: autodiff {} vs finite difference {fd}", g[i]);
        }
    }
}

const P: f32 = 0.4;
const SEED: u32 = 7;

/// x (input [n, c]) → dropout → linear (W trainable) → cross-entropy; the dropout output is readable.
fn dropout_net(d: &Device, n: usize, c: usize, k: usize) -> (Executor, ParamStore, Var, Var) {
    let mut store = ParamStore::new();
    store.add_f32(d, "w", &rnd(1, k * c, 0.5), &[k, c], true).unwrap();
    let mut g = Graph::new();
    let x = g.input("x", &[n, c], DType::F32);
    let t = g.input("targets", &[n], DType::I32);
    let w = g.param(&store, "w").unwrap();
    let xd = g.dropout(x, P, SEED);
    let logits = g.linear(xd, w, None).unwrap();
    let loss = g.cross_entropy(logits, t, -100).unwrap();
    let ex = Executor::new(d, g, &store, Some(loss), &[xd], Some(OptimConfig::adamw(1e-2, 0.0))).unwrap();
    ex.feed_f32(d, "x", &rnd(2, n * c, 1.0).iter().map(|v| v + 2.0).collect::<Vec<_>>()).unwrap();
    ex.feed_i32(d, "targets", &(0..n as i32).map(|i| i % k as i32).collect::<Vec<_>>()).unwrap();
    (ex, store, xd, loss)
}

#[test]
fn dropout_mask_changes_every_step_and_matches_the_reference() {
    let d = dev();
    let (n, c, k) = (6, 9, 3);
    let x: Vec<f32> = rnd(2, n * c, 1.0).iter().map(|v| v + 2.0).collect();
    let (mut ex, _store, xd, _) = dropout_net(d, n, c, k);
    let (mut twin, _, xd2, _) = dropout_net(d, n, c, k);
    let mut masks = Vec::new();
    for step in 0..3u64 {
        assert_eq!(ex.step, step);
        ex.step(d).unwrap();
        twin.step(d).unwrap();
        d.wait().unwrap();
        let got = ex.read(d, xd).unwrap();
        let want = re::dropout_forward(&x, P, dropout_seed(SEED, step, 0));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "step {step} [{i}]: {g} vs reference {w}");
        }
        assert_eq!(got, twin.read(d, xd2).unwrap(), "step {step}: the same seed must draw the same mask");
        masks.push(got.iter().map(|v| *v != 0.0).collect::<Vec<bool>>());
    }
    assert_ne!(masks[0], masks[1], "steps 0 and 1 drew the same dropout mask");
    assert_ne!(masks[1], masks[2], "steps 1 and 2 drew the same dropout mask");
    let kept = masks.iter().flatten().filter(|k| **k).count() as f32 / (3 * n * c) as f32;
    assert!((kept - (1.0 - P)).abs() < 0.2, "kept fraction {kept}, expected about {}", 1.0 - P);
    // Micro-batches of one accumulated step draw their own masks too.
    ex.micro_step(d, true, false).unwrap();
    let m0 = ex.read(d, xd).unwrap();
    ex.micro_step(d, false, true).unwrap();
    let m1 = ex.read(d, xd).unwrap();
    assert_eq!(m0, re::dropout_forward(&x, P, dropout_seed(SEED, 3, 0)));
    assert_eq!(m1, re::dropout_forward(&x, P, dropout_seed(SEED, 3, 1)));
}

#[test]
fn dropout_backward_uses_the_forward_mask() {
    // x trainable, so the gradient flows through dropout_backward: dL/dx = mask/(1-p) · dL/dxd. Central
    // differences (forward re-run at the same step, same mask) agree only if backward regenerates the mask.
    let d = dev();
    let (n, c, k) = (4, 5, 3);
    let mut store = ParamStore::new();
    store.add_f32(d, "x", &rnd(3, n * c, 1.0), &[n, c], true).unwrap();
    store.add_f32(d, "w", &rnd(4, k * c, 0.5), &[k, c], true).unwrap();
    let mut g = Graph::new();
    let t = g.input("targets", &[n], DType::I32);
    let (x, w) = (g.param(&store, "x").unwrap(), g.param(&store, "w").unwrap());
    let xd = g.dropout(x, P, SEED);
    let logits = g.linear(xd, w, None).unwrap();
    let loss = g.cross_entropy(logits, t, -100).unwrap();
    let mut ex = Executor::new(d, g, &store, Some(loss), &[xd], Some(OptimConfig::adamw(1e-2, 0.0))).unwrap();
    ex.feed_i32(d, "targets", &[0, 1, 2, 1]).unwrap();
    for step in [0u64, 5] {
        ex.step = step;
        check_grads(&mut ex, &store, loss, &["x", "w"]);
        let gx = ex.read_param_grad(d, store.id("x").unwrap()).unwrap();
        let keep = re::dropout_forward(&vec![1.0; n * c], P, dropout_seed(SEED, step, 0));
        for (i, (gv, kv)) in gx.iter().zip(&keep).enumerate() {
            if *kv == 0.0 {
                assert_eq!(*gv, 0.0, "step {step}: x[{i}] was dropped but has gradient {gv}");
            }
        }
    }
}

/// y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + bias with g = m / ||W + s·B·A||_row, or with g fed as a constant.
fn dora_net(d: &Device, store: &ParamStore, fixed_g: bool) -> (Executor, Var, Var) {
    let (n, oc, s) = (5, 4, 1.5);
    let mut g = Graph::new();
    let x = g.input("x", &[n, 6], DType::F32);
    let t = g.input("targets", &[n], DType::I32);
    let p = |g: &mut Graph, name: &str| g.param(store, name).unwrap();
    let (w, bias, a, b) = (p(&mut g, "w"), p(&mut g, "bias"), p(&mut g, "a"), p(&mut g, "b"));
    let scale = if fixed_g {
        g.input("g", &[oc], DType::F32)
    } else {
        let m = p(&mut g, "m");
        g.dora_scale(w, a, b, m, s).unwrap()
    };
    let y = g.lora(x, w, None, a, b, s).unwrap();
    let y = g.mul(y, scale).unwrap();
    let logits = g.add(y, bias).unwrap();
    let loss = g.cross_entropy(logits, t, -100).unwrap();
    let ex = Executor::new(d, g, store, Some(loss), &[scale], Some(OptimConfig::adamw(1e-2, 0.0))).unwrap();
    ex.feed_f32(d, "x", &rnd(20, n * 6, 1.0)).unwrap();
    ex.feed_i32(d, "targets", &[0, 3, 1, 2, 0]).unwrap();
    (ex, scale, loss)
}

fn dora_store(d: &Device) -> ParamStore {
    let (oc, c, r) = (4, 6, 2);
    let mut store = ParamStore::new();
    store.add_f32(d, "w", &rnd(11, oc * c, 0.6), &[oc, c], false).unwrap();
    store.add_f32(d, "bias", &rnd(12, oc, 0.2), &[oc], false).unwrap();
    store.add_f32(d, "a", &rnd(13, r * c, 0.5), &[r, c], true).unwrap();
    store.add_f32(d, "b", &rnd(14, oc * r, 0.5), &[oc, r], true).unwrap();
    store.add_f32(d, "m", &rnd(15, oc, 0.5).iter().map(|v| v + 1.5).collect::<Vec<_>>(), &[oc], true).unwrap();
    store
}

#[test]
fn dora_scale_gradient_reaches_m_and_treats_the_norm_as_constant() {
    let d = dev();
    let store = dora_store(d);
    let (mut ex, gv, loss) = dora_net(d, &store, false);
    // g is linear in m (the norm does not depend on m): finite differences in m are exact.
    check_grads(&mut ex, &store, loss, &["m"]);
    let g = ex.read(d, gv).unwrap();
    let [w, a, b, m] = ["w", "a", "b", "m"].map(|n| store.read_f32(d, store.id(n).unwrap()).unwrap());
    let (want, _) = rime_kernels::reference::dora::dora_scale_forward(&w, &a, &b, &m, 1.5, 6);
    for (x, y) in g.iter().zip(&want) {
        assert!((x - y).abs() < 1e-5, "g {g:?} vs reference {want:?}");
    }
    // A and B: the same gradients as a graph where g is a constant input (the detached norm), whose
    // gradients are checked against finite differences.
    let (mut fixed, _, floss) = dora_net(d, &store, true);
    fixed.feed_f32(d, "g", &g).unwrap();
    check_grads(&mut fixed, &store, floss, &["a", "b"]);
    ex.backward_only(d).unwrap();
    fixed.backward_only(d).unwrap();
    for n in ["a", "b"] {
        let id = store.id(n).unwrap();
        let (x, y) = (ex.read_param_grad(d, id).unwrap(), fixed.read_param_grad(d, id).unwrap());
        for (i, (p, q)) in x.iter().zip(&y).enumerate() {
            assert!((p - q).abs() <= 1e-5 + 1e-4 * q.abs(), "{n}[{i}]: {p} with DoRA vs {q} with g constant");
        }
    }
}

/// Gradient checkpointing ([`Graph::checkpoint`]): two segments (linear → GELU → dropout → linear, twice, the
/// weights trainable) give bitwise the loss and gradients of the same graph without segments over three
/// Adam steps (so the recomputed dropout redraws the step's mask, not another), with a lower activation peak
/// and the recomputation's extra dispatches.
#[test]
fn checkpointed_segments_give_bitwise_the_same_training() {
    let d = dev();
    let (n, c, h) = (64, 16, 48);
    let run = |checkpoint: bool| {
        let mut store = ParamStore::new();
        for (i, (name, shape)) in
            [("w1", [h, c]), ("w2", [c, h]), ("w3", [h, c]), ("w4", [4, h])].into_iter().enumerate()
        {
            store.add_f32(d, name, &rnd(10 + i as u64, shape[0] * shape[1], 0.3), &shape, true).unwrap();
        }
        let mut g = Graph::new();
        let x = g.input("x", &[n, c], DType::F32);
        let t = g.input("targets", &[n], DType::I32);
        let block = |g: &mut Graph, x: Var, wa: &str, wb: &str, seed: u32| {
            if checkpoint {
                g.checkpoint();
            }
            let (wa, wb) = (g.param(&store, wa).unwrap(), g.param(&store, wb).unwrap());
            let a = g.linear(x, wa, None).unwrap();
            let a = g.gelu(a, false);
            let a = g.dropout(a, P, seed);
            let y = g.linear(a, wb, None).unwrap();
            g.end_checkpoint();
            y
        };
        let y = block(&mut g, x, "w1", "w2", 3);
        let y = block(&mut g, y, "w3", "w4", 4);
        let loss = g.cross_entropy(y, t, -100).unwrap();
        let mut ex = Executor::new(d, g, &store, Some(loss), &[loss], Some(OptimConfig::adamw(1e-2, 0.0))).unwrap();
        ex.feed_f32(d, "x", &rnd(2, n * c, 1.0)).unwrap();
        ex.feed_i32(d, "targets", &(0..n as i32).map(|i| i % 4).collect::<Vec<_>>()).unwrap();
        let mut losses = vec![];
        for _ in 0..3 {
            ex.step(d).unwrap();
            losses.push(ex.read(d, loss).unwrap()[0]);
        }
        let weights: Vec<Vec<f32>> = store.iter().map(|(id, _)| store.read_f32(d, id).unwrap()).collect();
        (losses, weights, ex.memory_report().activation_peak, ex.dispatches_per_step())
    };
    let (l0, w0, peak0, n0) = run(false);
    let (l1, w1, peak1, n1) = run(true);
    assert!(l0.iter().zip(&l1).all(|(a, b)| a.to_bits() == b.to_bits()), "losses {l0:?} vs {l1:?}");
    for (a, b) in w0.iter().zip(&w1) {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "weights differ after 3 steps");
    }
    assert!(peak1 < peak0, "activation peak {peak0} -> {peak1}");
    assert!(n1 > n0, "dispatches {n0} -> {n1}");
}
