//! Gradient checks of composed graphs against central finite differences of the GPU forward pass, the
//! frozen-backbone memory guarantee, and a tiny training problem.

mod common;
use common::{check_grads, dev, rnd};

use rand::{Rng, SeedableRng};
use rime_graph::{Executor, Graph, OptimConfig, ParamStore, Var};
use rime_kernels::DType;

fn targets(g: &mut Graph, n: usize) -> Var {
    g.input("targets", &[n], DType::I32)
}

#[test]
fn mlp_gradients_match_finite_differences() {
    let d = dev();
    let (n, c, h, k) = (5, 7, 13, 3);
    let mut store = ParamStore::new();
    store.add_f32(d, "w1", &rnd(1, h * c, 0.5), &[h, c], true).unwrap();
    store.add_f32(d, "b1", &rnd(2, h, 0.5), &[h], true).unwrap();
    store.add_f32(d, "w2", &rnd(3, k * h, 0.5), &[k, h], true).unwrap();
    store.add_f32(d, "b2", &rnd(4, k, 0.5), &[k], true).unwrap();
    let mut g = Graph::new();
    let x = g.input("x", &[n, c], DType::F32);
    let t = targets(&mut g, n);
    let (w1, b1, w2, b2) = (
        g.param(&store, "w1").unwrap(),
        g.param(&store, "b1").unwrap(),
        g.param(&store, "w2").unwrap(),
        g.param(&store, "b2").unwrap(),
    );
    let h1 = g.linear(x, w1, Some(b1)).unwrap();
    let a = g.gelu(h1, false);
    let logits = g.linear(a, w2, Some(b2)).unwrap();
    let loss = g.cross_entropy(logits, t, -100).unwrap();
    let mut ex = Executor::new(d, g, &store, Some(loss), &[logits], Some(OptimConfig::adamw(1e-2, 0.0))).unwrap();
    ex.feed_f32(d, "x", &rnd(5, n * c, 1.0)).unwrap();
    ex.feed_i32(d, "targets", &[0, 2, 1, -100, 2]).unwrap();
    check_grads(&mut ex, &store, loss, 6, 99);
    assert_eq!(ex.gradient_buffers(), 4);
}

#[test]
fn transformer_block_gradients_match_finite_differences() {
    let d = dev();
    let (b, t, nh, hs) = (2, 5, 2, 4);
    let c = nh * hs;
    let f = 2 * c;
    let mut store = ParamStore::new();
    let mut seed = 10;
    let mut add = |store: &mut ParamStore, name: &str, shape: &[usize], s: f32, center: f32| {
        seed += 1;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = rnd(seed, n, s).into_iter().map(|x| x + center).collect();
        store.add_f32(d, name, &v, shape, true).unwrap();
    };
    for nm in ["q", "k", "v", "o"] {
        add(&mut store, &format!("{nm}.w"), &[c, c], 0.4, 0.0);
        add(&mut store, &format!("{nm}.b"), &[c], 0.1, 0.0);
    }
    add(&mut store, "ln1.g", &[c], 0.1, 1.0);
    add(&mut store, "ln1.b", &[c], 0.1, 0.0);
    add(&mut store, "fc1.w", &[f, c], 0.4, 0.0);
    add(&mut store, "fc2.w", &[c, f], 0.4, 0.0);
    add(&mut store, "head.w", &[3, c], 0.4, 0.0);
    let mut g = Graph::new();
    let x = g.input("x", &[b, t, c], DType::F32);
    let mask = g.input("mask", &[b, t], DType::F32);
    let tg = targets(&mut g, b * t);
    let pr = |g: &mut Graph, n: &str| g.param(&store, n).unwrap();
    let lin = |g: &mut Graph, x: Var, n: &str| {
        let w = pr(g, &format!("{n}.w"));
        let bias = store.find(&format!("{n}.b")).map(|_| pr(g, &format!("{n}.b")));
        g.linear(x, w, bias).unwrap()
    };
    let q = lin(&mut g, x, "q");
    let k = lin(&mut g, x, "k");
    let v = lin(&mut g, x, "v");
    let (q, k, v) = (
        g.reshape(q, &[b, t, nh, hs]).unwrap(),
        g.reshape(k, &[b, t, nh, hs]).unwrap(),
        g.reshape(v, &[b, t, nh, hs]).unwrap(),
    );
    let a = g.attention(q, k, v, Some(mask), false, 0.5).unwrap();
    let a = g.reshape(a, &[b, t, c]).unwrap();
    let o = lin(&mut g, a, "o");
    let r = g.add(o, x).unwrap();
    let (lg, lb) = (pr(&mut g, "ln1.g"), pr(&mut g, "ln1.b"));
    let x1 = g.layernorm(r, lg, lb, 1e-5).unwrap();
    let h = lin(&mut g, x1, "fc1");
    let h = g.gelu(h, false);
    let o2 = lin(&mut g, h, "fc2");
    let x2 = g.add(o2, x1).unwrap();
    let flat = g.reshape(x2, &[b * t, c]).unwrap();
    let logits = lin(&mut g, flat, "head");
    let loss = g.cross_entropy(logits, tg, -100).unwrap();
    let mut ex = Executor::new(d, g, &store, Some(loss), &[], Some(OptimConfig::adamw(1e-2, 0.0))).unwrap();
    ex.feed_f32(d, "x", &rnd(50, b * t * c, 1.0)).unwrap();
    ex.feed_f32(d, "mask", &[1., 1., 1., 1., 0., 1., 1., 1., 1., 1.]).unwrap();
    ex.feed_i32(d, "targets", &[0, 1, 2, 0, -100, 1, 2, 0, 1, 2]).unwrap();
    check_grads(&mut ex, &store, loss, 4, 99);
}

/// LoRA over a frozen linear: gradients for A, B and the head only, checked against finite differences;
/// the memory report shows no gradient bytes for frozen weights. Also prints the full fine-tuning report.
#[test]
fn lora_on_frozen_mlp_allocates_no_frozen_gradients() {
    let d = dev();
    let (n, c, h, k, rank) = (6, 16, 32, 2, 4);
    let build = |lora: bool| {
        let mut store = ParamStore::new();
        store.add_f32(d, "fc1.weight", &rnd(1, h * c, 0.3), &[h, c], !lora).unwrap();
        store.add_f32(d, "fc1.bias", &rnd(2, h, 0.3), &[h], !lora).unwrap();
        store.add_f32(d, "fc2.weight", &rnd(3, c * h, 0.3), &[c, h], !lora).unwrap();
        store.add_f32(d, "head.weight", &rnd(4, k * c, 0.3), &[k, c], true).unwrap();
        if lora {
            store.add_f32(d, "fc1.A", &rnd(5, rank * c, 0.3), &[rank, c], true).unwrap();
            store.add_f32(d, "fc1.B", &rnd(6, h * rank, 0.3), &[h, rank], true).unwrap();
        }
        let mut g = Graph::new();
        let x = g.input("x", &[n, c], DType::F32);
        let t = targets(&mut g, n);
        let w1 = g.param(&store, "fc1.weight").unwrap();
        let b1 = g.param(&store, "fc1.bias").unwrap();
        let h1 = if lora {
            let (a, bb) = (g.param(&store, "fc1.A").unwrap(), g.param(&store, "fc1.B").unwrap());
            g.lora(x, w1, Some(b1), a, bb, 2.0).unwrap()
        } else {
            g.linear(x, w1, Some(b1)).unwrap()
        };
        let h1 = g.relu(h1);
        let w2 = g.param(&store, "fc2.weight").unwrap();
        let o = g.linear(h1, w2, None).unwrap();
        let hw = g.param(&store, "head.weight").unwrap();
        let logits = g.linear(o, hw, None).unwrap();
        let loss = g.cross_entropy(logits, t, -100).unwrap();
        let ex = Executor::new(d, g, &store, Some(loss), &[], Some(OptimConfig::adamw(1e-2, 0.01))).unwrap();
        ex.feed_f32(d, "x", &rnd(7, n * c, 1.0)).unwrap();
        ex.feed_i32(d, "targets", &[0, 1, 1, 0, 1, 0]).unwrap();
        (ex, store, loss)
    };
    let (mut ex, store, loss) = build(true);
    let rep = ex.memory_report().clone();
    assert_eq!(rep.frozen_gradients, 0);
    assert_eq!(ex.gradient_buffers(), 3, "only A, B and the head get gradients");
    let trainable_bytes: u64 = store.trainable().map(|(_, p)| p.tensor.bytes()).sum();
    assert_eq!(rep.gradients, trainable_bytes, "gradient bytes are exactly the trainable parameters'");
    let frozen_bytes: u64 = store.iter().filter(|(_, p)| !p.trainable).map(|(_, p)| p.tensor.bytes()).sum();
    assert_eq!(rep.frozen_weights, frozen_bytes);
    check_grads(&mut ex, &store, loss, 8, 99);
    let (full, _, _) = build(false);
    println!("LoRA on a frozen MLP:\n{rep}\n\nfull fine-tuning of the same MLP:\n{}", full.memory_report());
    assert!(full.memory_report().gradients > rep.gradients);
}

#[test]
fn tiny_training_problem_loss_falls() {
    // Two Gaussian blobs; a 2-layer MLP must separate them: loss from ~0.69 to below 0.1 in 60 AdamW steps.
    let d = dev();
    let (n, c, h) = (32, 4, 16);
    let mut store = ParamStore::new();
    store.add_f32(d, "w1", &rnd(1, h * c, 0.5), &[h, c], true).unwrap();
    store.add_f32(d, "b1", &vec![0.0; h], &[h], true).unwrap();
    store.add_f32(d, "w2", &rnd(2, 2 * h, 0.5), &[2, h], true).unwrap();
    let mut g = Graph::new();
    let x = g.input("x", &[n, c], DType::F32);
    let t = targets(&mut g, n);
    let (w1, b1, w2) = (g.param(&store, "w1").unwrap(), g.param(&store, "b1").unwrap(), g.param(&store, "w2").unwrap());
    let h1 = g.linear(x, w1, Some(b1)).unwrap();
    let h1 = g.silu(h1);
    let logits = g.linear(h1, w2, None).unwrap();
    let loss = g.cross_entropy(logits, t, -100).unwrap();
    let mut cfg = OptimConfig::adamw(3e-2, 0.0);
    cfg.max_grad_norm = Some(1.0);
    let mut ex = Executor::new(d, g, &store, Some(loss), &[], Some(cfg)).unwrap();
    let mut r = rand::rngs::StdRng::seed_from_u64(3);
    let labels: Vec<i32> = (0..n as i32).map(|i| i % 2).collect();
    let xs: Vec<f32> = labels
        .iter()
        .flat_map(|&l| {
            let center = if l == 0 { -1.0 } else { 1.0 };
            (0..c).map(|_| center + r.random_range(-0.8f32..0.8)).collect::<Vec<_>>()
        })
        .collect();
    ex.feed_f32(d, "x", &xs).unwrap();
    ex.feed_i32(d, "targets", &labels).unwrap();
    let mut losses = vec![];
    for _ in 0..60 {
        if let Some(l) = ex.step(d).unwrap().prev_loss {
            losses.push(l);
        }
    }
    losses.push(ex.last_loss(d).unwrap().unwrap());
    assert!(losses[0] > 0.4, "initial loss {}", losses[0]);
    assert!(*losses.last().unwrap() < 0.1, "final loss {} (losses {losses:?})", losses.last().unwrap());
}

#[test]
fn optimizer_state_round_trips() {
    let d = dev();
    let mut store = ParamStore::new();
    store.add_f32(d, "w", &rnd(1, 6, 0.5), &[2, 3], true).unwrap();
    let mut g = Graph::new();
    let x = g.input("x", &[4, 3], DType::F32);
    let t = targets(&mut g, 4);
    let w = g.param(&store, "w").unwrap();
    let logits = g.linear(x, w, None).unwrap();
    let loss = g.cross_entropy(logits, t, -100).unwrap();
    let mut ex = Executor::new(d, g.clone(), &store, Some(loss), &[], Some(OptimConfig::adamw(1e-2, 0.0))).unwrap();
    ex.feed_f32(d, "x", &rnd(2, 12, 1.0)).unwrap();
    ex.feed_i32(d, "targets", &[0, 1, 1, 0]).unwrap();
    for _ in 0..3 {
        ex.step(d).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("rime-opt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("optimizer.safetensors");
    ex.save_optimizer_state(d, &store, &path).unwrap();
    let mut ex2 = Executor::new(d, g, &store, Some(loss), &[], Some(OptimConfig::adamw(1e-2, 0.0))).unwrap();
    ex2.load_optimizer_state(d, &store, &path).unwrap();
    assert_eq!(ex2.step, 3);
    let bad = dir.join("missing.safetensors");
    let e = ex2.load_optimizer_state(d, &store, &bad).unwrap_err().to_string();
    assert!(e.contains("missing.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Two micro-batches of 4 rows with loss scale 1/2 accumulate the same gradient as one batch of 8 rows
/// (mean losses of equal-size halves average to the full mean).
#[test]
fn micro_batch_accumulation_equals_the_full_batch_gradient() {
    let d = dev();
    let (c, k) = (5, 3);
    let x = rnd(40, 8 * c, 1.0);
    let t = [0, 2, 1, 1, 2, 0, 1, 2];
    let build = |n: usize| {
        let mut store = ParamStore::new();
        store.add_f32(d, "w", &rnd(41, k * c, 0.5), &[k, c], true).unwrap();
        let mut g = Graph::new();
        let xi = g.input("x", &[n, c], DType::F32);
        let ti = targets(&mut g, n);
        let w = g.param(&store, "w").unwrap();
        let logits = g.linear(xi, w, None).unwrap();
        let loss = g.cross_entropy(logits, ti, -100).unwrap();
        let ex = Executor::new(d, g, &store, Some(loss), &[], Some(OptimConfig::sgd(0.0, 0.0, 0.0))).unwrap();
        (ex, store)
    };
    let (mut full, fs) = build(8);
    full.feed_f32(d, "x", &x).unwrap();
    full.feed_i32(d, "targets", &t).unwrap();
    full.backward_only(d).unwrap();
    let want = full.read_param_grad(d, fs.id("w").unwrap()).unwrap();

    let (mut half, hs) = build(4);
    half.set_loss_scale(d, 0.5).unwrap();
    // lr 0: the update leaves w unchanged, so the accumulated gradient stays readable after the last micro-step.
    for (i, last) in [(0usize, false), (1, true)] {
        half.feed_f32(d, "x", &x[i * 4 * c..(i + 1) * 4 * c]).unwrap();
        half.feed_i32(d, "targets", &t[i * 4..(i + 1) * 4]).unwrap();
        half.micro_step(d, i == 0, last).unwrap();
    }
    d.wait().unwrap();
    let got = half.read_param_grad(d, hs.id("w").unwrap()).unwrap();
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-5, "accumulated {got:?} vs full batch {want:?}");
    }
}

/// Micro-batches of one step on two graphs of different batch sizes (as length buckets are) that share
/// gradients and optimizer state: scaled by their share of the rows, they accumulate the full batch's gradient.
#[test]
fn micro_batches_on_graphs_of_different_shapes_share_one_gradient() {
    let d = dev();
    let (c, k) = (5, 3);
    let x = rnd(42, 8 * c, 1.0);
    let t = [0, 2, 1, 1, 2, 0, 1, 2];
    let mut store = ParamStore::new();
    store.add_f32(d, "w", &rnd(43, k * c, 0.5), &[k, c], true).unwrap();
    let graph = |n: usize| {
        let mut g = Graph::new();
        let xi = g.input("x", &[n, c], DType::F32);
        let ti = targets(&mut g, n);
        let w = g.param(&store, "w").unwrap();
        let logits = g.linear(xi, w, None).unwrap();
        let loss = g.cross_entropy(logits, ti, -100).unwrap();
        (g, loss)
    };
    let (g8, l8) = graph(8);
    let mut full = Executor::new(d, g8, &store, Some(l8), &[], Some(OptimConfig::sgd(0.0, 0.0, 0.0))).unwrap();
    full.feed_f32(d, "x", &x).unwrap();
    full.feed_i32(d, "targets", &t).unwrap();
    full.backward_only(d).unwrap();
    let want = full.read_param_grad(d, store.id("w").unwrap()).unwrap();

    let sgd = || Some(OptimConfig::sgd(0.0, 0.0, 0.0));
    let (g3, l3) = graph(3);
    let mut a = Executor::new(d, g3, &store, Some(l3), &[], sgd()).unwrap();
    let (g5, l5) = graph(5);
    let mut b = Executor::new_sharing(d, g5, &store, Some(l5), &[], sgd(), Some(&a)).unwrap();
    a.feed_f32(d, "x", &x[..3 * c]).unwrap();
    a.feed_i32(d, "targets", &t[..3]).unwrap();
    a.set_loss_scale(d, 3.0 / 8.0).unwrap();
    a.micro_step(d, true, false).unwrap();
    b.feed_f32(d, "x", &x[3 * c..]).unwrap();
    b.feed_i32(d, "targets", &t[3..]).unwrap();
    b.set_loss_scale(d, 5.0 / 8.0).unwrap();
    b.micro_step(d, false, true).unwrap();
    d.wait().unwrap();
    for ex in [&a, &b] {
        let got = ex.read_param_grad(d, store.id("w").unwrap()).unwrap();
        for (p, q) in got.iter().zip(&want) {
            assert!((p - q).abs() < 1e-5, "accumulated {got:?} vs full batch {want:?}");
        }
    }
}

/// SGD with momentum and parameter groups: group 1 trains at a tenth of the learning rate with its own weight
/// decay; the updates match torch.optim.SGD's rule computed on the CPU from the gradients.
#[test]
fn sgd_momentum_with_parameter_groups_matches_the_update_rule() {
    let d = dev();
    let mut store = ParamStore::new();
    let w0 = rnd(50, 6, 0.5);
    let v0 = rnd(51, 2, 0.5);
    store.add_f32(d, "w", &w0, &[2, 3], true).unwrap();
    store.add_f32(d, "b", &v0, &[2], true).unwrap();
    store.set_group(store.id("b").unwrap(), 1);
    let mut g = Graph::new();
    let x = g.input("x", &[4, 3], DType::F32);
    let t = targets(&mut g, 4);
    let (w, b) = (g.param(&store, "w").unwrap(), g.param(&store, "b").unwrap());
    let logits = g.linear(x, w, Some(b)).unwrap();
    let loss = g.cross_entropy(logits, t, -100).unwrap();
    let mut cfg = OptimConfig::sgd(0.1, 0.9, 0.01);
    cfg.groups.push(rime_graph::ParamGroup { lr_scale: 0.1, weight_decay: 0.0 });
    let mut ex = Executor::new(d, g, &store, Some(loss), &[], Some(cfg)).unwrap();
    ex.feed_f32(d, "x", &rnd(52, 12, 1.0)).unwrap();
    ex.feed_i32(d, "targets", &[0, 1, 1, 0]).unwrap();
    // Step 1 from the gradient at w0.
    ex.backward_only(d).unwrap();
    let (gw, gb) = (
        ex.read_param_grad(d, store.id("w").unwrap()).unwrap(),
        ex.read_param_grad(d, store.id("b").unwrap()).unwrap(),
    );
    ex.step(d).unwrap();
    d.wait().unwrap();
    let w1 = store.read_f32(d, store.id("w").unwrap()).unwrap();
    let b1 = store.read_f32(d, store.id("b").unwrap()).unwrap();
    for i in 0..6 {
        // torch: g += wd * p; buf = g (first step); p -= lr * buf
        let want = w0[i] - 0.1 * (gw[i] + 0.01 * w0[i]);
        assert!((w1[i] - want).abs() < 1e-6, "w[{i}] {} vs {want}", w1[i]);
    }
    for i in 0..2 {
        let want = v0[i] - 0.01 * gb[i];
        assert!((b1[i] - want).abs() < 1e-6, "b[{i}] {} vs {want}", b1[i]);
    }
}

#[test]
fn learning_rate_schedules_follow_transformers() {
    use rime_graph::LrSchedule;
    let lin = LrSchedule::Linear { warmup: 10, total: 110 };
    assert_eq!(lin.factor(0), 0.0);
    assert!((lin.factor(5) - 0.5).abs() < 1e-6);
    assert!((lin.factor(10) - 1.0).abs() < 1e-6);
    assert!((lin.factor(60) - 0.5).abs() < 1e-6);
    assert_eq!(lin.factor(110), 0.0);
    let cos = LrSchedule::Cosine { warmup: 0, total: 100 };
    assert!((cos.factor(50) - 0.5).abs() < 1e-6);
    assert!(cos.factor(100).abs() < 1e-6);
    assert_eq!(LrSchedule::Constant.factor(12345), 1.0);
    let cfg = OptimConfig::adamw(1e-3, 0.01);
    let h = cfg.hyper(0, 0);
    assert!((h[5] - 0.1).abs() < 1e-7 && (h[6] - 0.001).abs() < 1e-7, "bias corrections of step 1: {h:?}");
}

#[test]
fn store_reads_f16_and_bf16_parameters_back_as_f32() {
    let d = dev();
    let vals = [1.5f32, -0.25, 3.0];
    let mut store = ParamStore::new();
    let h: Vec<half::f16> = vals.iter().map(|&v| half::f16::from_f32(v)).collect();
    let b: Vec<half::bf16> = vals.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let ih = store.add("h", d.upload_f16(&h, &[3]).unwrap(), false).unwrap();
    let ib = store.add("b", d.upload_bf16(&b, &[3]).unwrap(), false).unwrap();
    assert_eq!(store.read_f32(d, ih).unwrap(), vals);
    assert_eq!(store.read_f32(d, ib).unwrap(), vals);
}

/// Soft prompt and key/value prefixes: prompt rows go in front of a projected input (its gradient flows back
/// through the prepend to `w`), then prefix rows in front of the keys and values, so the attention runs with
/// S = P + P2 + T keys for P2 + T queries under a [B, S] mask. One computed prefix feeds both K and V (two
/// contributions into one non-parameter gradient). Every parameter's gradient vs finite differences.
#[test]
fn prepend_prompt_and_prefix_gradients_match_finite_differences() {
    let d = dev();
    let (b, t, p2, p, nh, hs) = (2, 3, 2, 3, 2, 4);
    let c = nh * hs;
    let (tq, s) = (p2 + t, p + p2 + t);
    let mut store = ParamStore::new();
    store.add_f32(d, "w", &rnd(1, c * c, 0.5), &[c, c], true).unwrap();
    store.add_f32(d, "prompt", &rnd(2, p2 * c, 1.0), &[p2, c], true).unwrap();
    store.add_f32(d, "prefix", &rnd(3, p * c, 1.0), &[p, c], true).unwrap();
    for (i, n) in ["wq", "wk", "wv"].iter().enumerate() {
        store.add_f32(d, n, &rnd(4 + i as u64, c * c, 0.5), &[c, c], false).unwrap();
    }
    store.add_f32(d, "head", &rnd(8, 3 * c, 0.5), &[3, c], true).unwrap();
    let mut g = Graph::new();
    let x = g.input("x", &[b, t, c], DType::F32);
    let mask = g.input("mask", &[b, s], DType::F32);
    let tg = targets(&mut g, b * tq);
    let pr = |g: &mut Graph, n: &str| g.param(&store, n).unwrap();
    let (w, prompt, prefix) = (pr(&mut g, "w"), pr(&mut g, "prompt"), pr(&mut g, "prefix"));
    let h = g.linear(x, w, None).unwrap();
    let h = g.prepend(h, prompt).unwrap(); // [B, P2+T, C]
    assert_eq!(g.shape(h), [b, tq, c]);
    let rows = g.scale(prefix, 0.7);
    let (wq, wk, wv) = (pr(&mut g, "wq"), pr(&mut g, "wk"), pr(&mut g, "wv"));
    let q = g.linear(h, wq, None).unwrap();
    let k = g.linear(h, wk, None).unwrap();
    let v = g.linear(h, wv, None).unwrap();
    let k = g.prepend(k, rows).unwrap();
    let v = g.prepend(v, rows).unwrap();
    let q = g.reshape(q, &[b, tq, nh, hs]).unwrap();
    let k = g.reshape(k, &[b, s, nh, hs]).unwrap();
    let v = g.reshape(v, &[b, s, nh, hs]).unwrap();
    let a = g.attention(q, k, v, Some(mask), false, 0.5).unwrap();
    let a = g.reshape(a, &[b * tq, c]).unwrap();
    let head = pr(&mut g, "head");
    let logits = g.linear(a, head, None).unwrap();
    let loss = g.cross_entropy(logits, tg, -100).unwrap();
    assert!(g.prepend(x, logits).is_err(), "rows [10, 3] in front of x [2, 3, 8] are refused");
    let mut ex = Executor::new(d, g, &store, Some(loss), &[], Some(OptimConfig::adamw(1e-2, 0.0))).unwrap();
    ex.feed_f32(d, "x", &rnd(9, b * t * c, 1.0)).unwrap();
    // the second sequence has its last real key padded
    let mut m = vec![1f32; b * s];
    m[2 * s - 1] = 0.0;
    ex.feed_f32(d, "mask", &m).unwrap();
    ex.feed_i32(d, "targets", &[0, 1, 2, 0, 1, 2, 0, 1, 2, -100]).unwrap();
    check_grads(&mut ex, &store, loss, 5, 99);
    assert_eq!(ex.gradient_buffers(), 4, "w, prompt, prefix, head; the frozen projections get none");
}

/// How [`head_problem`]'s loss reads the head's logits.
#[derive(Clone, Copy, Debug)]
enum HeadLoss {
    /// concat_last + cross_entropy over all rows.
    Whole,
    /// Three rows at a time: linear + cross_entropy_blocks, each chunk a checkpoint segment if asked.
    Blocks { checkpoint: bool },
    /// Three rows at a time: linear_cross_entropy.
    Fused,
}

/// x [7, 5] → gelu(linear w0) → a head over 15 classes in two weight parts (6 + 9 rows, trainable or not) →
/// the mean cross-entropy read as `how` says, times `scale`; the store's values drawn from `seed`. Returns the
/// store and a built executor (with an AdamW optimizer when `train`) fed and run forward.
fn head_problem(
    seed: u64,
    trainable_head: bool,
    how: HeadLoss,
    scale: f32,
    train: bool,
    tg: &[i32; 7],
) -> (ParamStore, Executor, Var) {
    let d = dev();
    let (n, c, v1, v2, chunk) = (7, 5, 6, 9, 3);
    let mut store = ParamStore::new();
    store.add_f32(d, "w0", &rnd(seed, c * c, 0.6), &[c, c], true).unwrap();
    store.add_f32(d, "head0", &rnd(seed + 1, v1 * c, 0.6), &[v1, c], trainable_head).unwrap();
    store.add_f32(d, "head1", &rnd(seed + 2, v2 * c, 0.6), &[v2, c], trainable_head).unwrap();
    let mut g = Graph::new();
    let x = g.input("x", &[n, c], DType::F32);
    let t = targets(&mut g, n);
    let w0 = g.param(&store, "w0").unwrap();
    let parts = [g.param(&store, "head0").unwrap(), g.param(&store, "head1").unwrap()];
    let h = g.linear(x, w0, None).unwrap();
    let h = g.gelu(h, false);
    let loss = if let HeadLoss::Whole = how {
        let ys = parts.map(|w| g.linear(h, w, None).unwrap());
        let logits = g.concat_last(&ys).unwrap();
        g.cross_entropy(logits, t, -100).unwrap()
    } else {
        let mut total = None;
        for r0 in (0..n).step_by(chunk) {
            let checkpoint = matches!(how, HeadLoss::Blocks { checkpoint: true });
            if checkpoint {
                g.checkpoint();
            }
            let hc = g.rows(h, r0, chunk.min(n - r0)).unwrap();
            let share = if let HeadLoss::Fused = how {
                g.linear_cross_entropy(hc, &parts, t, r0, -100).unwrap()
            } else {
                let ys = parts.map(|w| g.linear(hc, w, None).unwrap());
                g.cross_entropy_blocks(&ys, t, r0, -100).unwrap()
            };
            if checkpoint {
                g.end_checkpoint();
            }
            total = Some(match total {
                Some(s) => g.add(s, share).unwrap(),
                None => share,
            });
        }
        total.unwrap()
    };
    let loss = if scale == 1.0 { loss } else { g.scale(loss, scale) };
    let optim = train.then(|| OptimConfig::adamw(1e-2, 0.0));
    let mut ex = Executor::new(d, g, &store, Some(loss), &[loss], optim).unwrap();
    ex.feed_f32(d, "x", &rnd(seed + 3, n * c, 1.0)).unwrap();
    ex.feed_i32(d, "targets", tg).unwrap();
    ex.forward(d).unwrap();
    (store, ex, loss)
}

/// The loss and every trainable gradient of a problem after a forward and backward pass.
fn loss_and_grads(store: &ParamStore, ex: &mut Executor, loss: Var) -> (f32, Vec<Vec<f32>>) {
    let d = dev();
    ex.backward_only(d).unwrap();
    let l = ex.read(d, loss).unwrap()[0];
    (l, store.trainable().map(|(id, _)| ex.read_param_grad(d, id).unwrap()).collect())
}

/// A head over classes split into two weight parts, taken three rows at a time (`rows`, blocks of logits,
/// `cross_entropy_blocks`, the chunks' shares added; each chunk a checkpoint segment when `checkpoint`): the
/// loss is the whole head's (concat_last + cross_entropy), the gradients of every parameter (a layer below the
/// slices and both head parts) are the whole head's and match finite differences.
#[test]
fn chunked_head_cross_entropy_matches_the_whole_head() {
    let tg = [0, 14, -100, 6, 5, 2, 11];
    let (store, mut ex, loss) = head_problem(41, true, HeadLoss::Whole, 1.0, true, &tg);
    let (whole, want) = loss_and_grads(&store, &mut ex, loss);
    for checkpoint in [false, true] {
        let (store, mut ex, loss) = head_problem(41, true, HeadLoss::Blocks { checkpoint }, 1.0, true, &tg);
        let (l, grads) = loss_and_grads(&store, &mut ex, loss);
        assert!((l - whole).abs() <= 1e-6 * whole.abs().max(1.0), "chunked loss {l} vs whole {whole}");
        for (g, w) in grads.iter().zip(&want) {
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() <= 1e-6 + 1e-5 * b.abs(), "checkpoint {checkpoint}: gradient {a} vs whole {b}");
            }
        }
        check_grads(&mut ex, &store, loss, 4, 7);
    }
}

#[test]
fn rows_and_cross_entropy_blocks_reject_bad_shapes() {
    let mut g = Graph::new();
    let x = g.input("x", &[4, 3], DType::F32);
    let t = targets(&mut g, 4);
    let e = g.rows(x, 3, 2).err().unwrap().to_string();
    assert!(e.contains("rows 3..5"), "{e}");
    assert!(g.rows(x, 0, 0).is_err());
    let r = g.rows(x, 2, 2).unwrap();
    assert_eq!(g.shape(r), &[2, 3]);
    let y = g.input("y", &[3, 3], DType::F32);
    let e = g.cross_entropy_blocks(&[r, y], t, 2, -100).err().unwrap().to_string();
    assert!(e.contains("cross_entropy_blocks"), "{e}");
    assert!(g.cross_entropy_blocks(&[r], t, 3, -100).is_err());
    assert!(g.cross_entropy_blocks(&[], t, 0, -100).is_err());
    assert!(g.cross_entropy_blocks(&[r], t, 2, -100).is_ok());
}

/// `linear_cross_entropy` over a frozen head in two parts, three rows at a time: the loss and the gradient of
/// the layer below are the whole head's (concat_last + cross_entropy) and match finite differences; the
/// gradient reaches h through the forward's unit gradient times the real loss gradient (here 1 per chunk, and
/// the loss scaled by 0.5 to check the scaling). Evaluation graphs compute no gradient in the forward, and a
/// trainable head weight is refused.
#[test]
fn linear_cross_entropy_matches_the_whole_head() {
    let d = dev();
    let tg = [3, 14, -100, 6, 5, 2, 11];
    let (store, mut whole, wl) = head_problem(51, false, HeadLoss::Whole, 0.5, true, &tg);
    let (want_loss, want) = loss_and_grads(&store, &mut whole, wl);
    let (store, mut ex, loss) = head_problem(51, false, HeadLoss::Fused, 0.5, true, &tg);
    let (l, got) = loss_and_grads(&store, &mut ex, loss);
    assert!((l - want_loss).abs() <= 1e-6 * want_loss.abs().max(1.0), "fused loss {l} vs whole {want_loss}");
    assert_eq!(got.len(), 1, "w0 only: the head is frozen");
    assert!(want[0].iter().any(|x| *x != 0.0));
    for (a, b) in got[0].iter().zip(&want[0]) {
        assert!((a - b).abs() <= 1e-6 + 1e-5 * b.abs(), "gradient {a} vs whole {b}");
    }
    check_grads(&mut ex, &store, loss, 6, 8);
    // forward only: the same loss, and the dispatches of the unfused chunks (no gradient prepared)
    let (_, ev, el) = head_problem(51, false, HeadLoss::Fused, 0.5, false, &tg);
    assert_eq!(ev.read(d, el).unwrap()[0], l);
    let (_, eu, _) = head_problem(51, false, HeadLoss::Blocks { checkpoint: false }, 0.5, false, &tg);
    assert_eq!(ev.dispatches_per_step(), eu.dispatches_per_step());
    // a trainable head weight is refused when the graph is lowered
    let mut trainable = ParamStore::new();
    trainable.add_f32(d, "w", &rnd(55, 6 * 5, 0.6), &[6, 5], true).unwrap();
    let mut g = Graph::new();
    let h = g.input("h", &[2, 5], DType::F32);
    let t = targets(&mut g, 2);
    let w = g.param(&trainable, "w").unwrap();
    let l = g.linear_cross_entropy(h, &[w], t, 0, -100).unwrap();
    let e = Executor::new(d, g, &trainable, Some(l), &[l], Some(OptimConfig::sgd(0.1, 0.0, 0.0))).err().unwrap();
    assert!(e.to_string().contains("trainable"), "{e}");
}
