//! The LoRA family beyond rank/alpha/targets: LoRA dropout (a fresh mask per step, the same in forward and
//! backward, absent from evaluation graphs), DoRA (magnitude init, detached norm, save/load in peft's names,
//! folding) and PiSSA init (output unchanged at init, adapter converted to a LoRA of the unmodified base),
//! on a tiny random BERT and on a single linear layer against a CPU reference.

mod common;

use common::*;
use rime_graph::{dropout_seed, Executor, Graph, OptimConfig, ParamStore};
use rime_kernels::reference::elementwise::dropout_forward;
use rime_kernels::{DType, Device};
use rime_models::{LinearHook, Plain};
use rime_peft::classifier::{self, Method, ShapeExec};
use rime_peft::lora::{self, LoraConfig, LoraHook, LoraInit};

const Q0: &str = "encoder.layer.0.attention.self.query";

fn lora(init: LoraInit, dropout: f32, dora: bool) -> LoraConfig {
    LoraConfig {
        rank: 2,
        alpha: 4.0,
        targets: vec!["query".into(), "value".into()],
        rslora: false,
        init,
        seed: 3,
        dropout,
        dora,
    }
}

fn logits(se: &mut ShapeExec) -> Vec<f32> {
    se.exec.forward(dev()).unwrap();
    se.exec.read(dev(), se.logits).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// A forward-only graph of `st` under `hook`, fed the fixed batch.
fn infer(d: &Device, st: &ParamStore, hook: &dyn LinearHook) -> ShapeExec {
    let se = classifier::build_exec(d, st, &tiny_cfg(), "", hook, B, T, None).unwrap();
    let (ids, types, mask, labels) = batch();
    classifier::feed(d, &se, &ids, &types, &mask, &labels).unwrap();
    se
}

fn op_count(ex: &Executor, name: &str) -> usize {
    ex.graph().nodes.iter().filter(|n| n.op.name() == name).count()
}

/// The model without its head: what an adapter is loaded into.
fn fresh_base(d: &Device) -> ParamStore {
    let src = tiny_store(d);
    let mut fresh = ParamStore::new();
    for (id, p) in src.iter() {
        if !p.name.starts_with("head.") {
            fresh.add_f32(d, &p.name, &src.read_f32(d, id).unwrap(), &p.tensor.shape, false).unwrap();
        }
    }
    fresh
}

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("rime-lora-family-{name}-{}", std::process::id()))
}

// ------------------------------------------------------------------------------------------- dropout

#[test]
fn lora_dropout_zero_keeps_the_fused_op_and_its_outputs() {
    let d = dev();
    let mut st = tiny_store(d);
    let m = Method::Lora(lora(LoraInit::Kaiming, 0.0, false));
    classifier::prepare_method(d, &mut st, &m).unwrap();
    perturb(d, &st);
    let mut se = exec(d, &st, &m, Some(OptimConfig::adamw(1e-2, 0.0)));
    assert_eq!(op_count(&se.exec, "lora"), 4, "query and value of 2 layers");
    assert_eq!(op_count(&se.exec, "dropout"), 0);
    assert!(classifier::eval_hook_for(&m).is_none(), "p = 0 needs no separate evaluation graph");
    let mut plain = infer(d, &st, &LoraHook::new(lora(LoraInit::Kaiming, 0.0, false).scale()));
    assert_eq!(logits(&mut se), logits(&mut plain), "p = 0 must be the plain fused LoRA path, bit for bit");
}

#[test]
fn lora_dropout_redraws_per_step_is_absent_at_eval_and_has_correct_gradients() {
    let d = dev();
    let mut st = tiny_store(d);
    let m = Method::Lora(lora(LoraInit::Kaiming, 0.3, false));
    classifier::prepare_method(d, &mut st, &m).unwrap();
    perturb(d, &st);
    let mut se = exec(d, &st, &m, Some(OptimConfig::adamw(1e-2, 0.0)));
    assert_eq!(op_count(&se.exec, "dropout"), 4, "one dropout per adapted module");
    assert_eq!(op_count(&se.exec, "lora"), 0, "p > 0 composes the low-rank path from plain ops");
    // Forward and backward of one step share the mask: finite differences (forward re-run at the same step)
    // agree with the gradients of every trainable tensor.
    assert!(check_grads(d, &st, &mut se) > 0);
    let at = |se: &mut ShapeExec, step: u64| {
        se.exec.step = step;
        se.exec.forward(d).unwrap();
        se.exec.read(d, se.loss).unwrap()[0]
    };
    let (l0, l0again, l1) = (at(&mut se, 0), at(&mut se, 0), at(&mut se, 1));
    assert_eq!(l0, l0again, "the same step must draw the same masks");
    assert_ne!(l0, l1, "steps 0 and 1 drew the same dropout masks");
    // Evaluation: no dropout node, and the composed path equals the fused one without dropout.
    let eval_hook = classifier::eval_hook_for(&m).expect("p > 0 evaluates with its own graph");
    let mut ev = infer(d, &st, eval_hook.as_ref());
    assert_eq!(op_count(&ev.exec, "dropout"), 0, "evaluation graphs must not contain dropout");
    let mut fused = infer(d, &st, &LoraHook { scale: 2.0, dropout: 0.0, seed: 3 });
    assert!(max_diff(&logits(&mut ev), &logits(&mut fused)) < 1e-5);
    // Training with dropout still learns.
    loss_falls(&m, 0.8);
}

/// One linear layer "lin" ([OC, C] weight and bias, factors, optional magnitude) and its CPU reference.
struct Lin {
    c: usize,
    oc: usize,
    r: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    m: Vec<f32>,
}

const N: usize = 7;

impl Lin {
    fn new() -> Lin {
        let (c, oc, r) = (6, 5, 2);
        Lin {
            c,
            oc,
            r,
            x: rnd(1, N * c, 1.0),
            w: rnd(2, oc * c, 0.7),
            bias: rnd(3, oc, 0.3),
            a: rnd(4, r * c, 0.5),
            b: rnd(5, oc * r, 0.5),
            m: rnd(6, oc, 0.5).iter().map(|v| v + 2.0).collect(),
        }
    }

    fn store(&self, d: &Device, dora: bool) -> ParamStore {
        let mut st = ParamStore::new();
        st.add_f32(d, "lin.weight", &self.w, &[self.oc, self.c], false).unwrap();
        st.add_f32(d, "lin.bias", &self.bias, &[self.oc], false).unwrap();
        st.add_f32(d, &lora::factor_name("lin", 'A'), &self.a, &[self.r, self.c], true).unwrap();
        st.add_f32(d, &lora::factor_name("lin", 'B'), &self.b, &[self.oc, self.r], true).unwrap();
        if dora {
            st.add_f32(d, &lora::magnitude_name("lin"), &self.m, &[self.oc], true).unwrap();
        }
        st
    }

    /// y = xd·... per peft: x·Wᵀ + b + (g − 1)·(x̃·Wᵀ) + g·s·(x̃·Aᵀ)·Bᵀ, g = 1 without DoRA.
    fn reference(&self, xd: &[f32], s: f32, dora: bool) -> Vec<f32> {
        let (c, oc, r) = (self.c, self.oc, self.r);
        let g: Vec<f64> = if dora {
            let norms = lora::row_norms(&self.w, &self.a, &self.b, oc, c, r, s);
            self.m.iter().zip(&norms).map(|(m, n)| *m as f64 / *n as f64).collect()
        } else {
            vec![1.0; oc]
        };
        let mut y = vec![0f32; N * oc];
        for i in 0..N {
            let h: Vec<f64> =
                (0..r).map(|k| (0..c).map(|j| xd[i * c + j] as f64 * self.a[k * c + j] as f64).sum()).collect();
            for o in 0..oc {
                let dot = |v: &[f32]| (0..c).map(|j| v[i * c + j] as f64 * self.w[o * c + j] as f64).sum::<f64>();
                let low: f64 = (0..r).map(|k| h[k] * self.b[o * r + k] as f64).sum();
                y[i * oc + o] =
                    (dot(&self.x) + self.bias[o] as f64 + (g[o] - 1.0) * dot(xd) + g[o] * s as f64 * low) as f32;
            }
        }
        y
    }
}

#[test]
fn lora_and_dora_layers_with_dropout_match_the_cpu_reference_with_the_same_mask() {
    let d = dev();
    let lin = Lin::new();
    let (p, s) = (0.4, 1.5);
    for dora in [false, true] {
        let st = lin.store(d, dora);
        let hook = LoraHook { scale: s, dropout: p, seed: 11 };
        let mut g = Graph::new();
        let x = g.input("x", &[N, lin.c], DType::F32);
        let w = g.param(&st, "lin.weight").unwrap();
        let b = g.param(&st, "lin.bias").unwrap();
        let y = hook.linear(&mut g, &st, "lin", x, w, Some(b)).unwrap();
        let t = g.input("t", &[N], DType::I32);
        let loss = g.cross_entropy(y, t, -100).unwrap();
        let mut ex = Executor::new(d, g, &st, Some(loss), &[y], Some(OptimConfig::adamw(1e-2, 0.0))).unwrap();
        ex.feed_f32(d, "x", &lin.x).unwrap();
        ex.feed_i32(d, "t", &[0, 1, 2, 3, 4, 0, 1]).unwrap();
        for step in [0u64, 1, 2] {
            ex.step = step;
            ex.forward(d).unwrap();
            let xd = dropout_forward(&lin.x, p, dropout_seed(hook.module_seed("lin"), step, 0));
            let want = lin.reference(&xd, s, dora);
            let got = ex.read(d, y).unwrap();
            assert!(max_diff(&got, &want) < 1e-4, "dora={dora} step {step}: {got:?} vs reference {want:?}");
        }
        // Without dropout the reference is the layer itself (x̃ = x).
        let mut g = Graph::new();
        let x = g.input("x", &[N, lin.c], DType::F32);
        let (w, b) = (g.param(&st, "lin.weight").unwrap(), g.param(&st, "lin.bias").unwrap());
        let y = LoraHook::new(s).linear(&mut g, &st, "lin", x, w, Some(b)).unwrap();
        let mut ex = Executor::new(d, g, &st, None, &[y], None).unwrap();
        ex.feed_f32(d, "x", &lin.x).unwrap();
        ex.forward(d).unwrap();
        let want = lin.reference(&lin.x, s, dora);
        assert!(max_diff(&ex.read(d, y).unwrap(), &want) < 1e-4, "dora={dora} without dropout");
    }
}

// ---------------------------------------------------------------------------------------------- DoRA

#[test]
fn dora_starts_at_the_base_model_and_its_magnitude_is_the_weight_norm() {
    let d = dev();
    let mut st = tiny_store(d);
    let mut base = infer(d, &st, &Plain);
    let want = logits(&mut base);
    let m = Method::Lora(lora(LoraInit::Kaiming, 0.0, true));
    classifier::prepare_method(d, &mut st, &m).unwrap();
    let mag = st.read_f32(d, st.id(&lora::magnitude_name(Q0)).unwrap()).unwrap();
    let w = st.read_f32(d, st.id(&format!("{Q0}.weight")).unwrap()).unwrap();
    for (o, mo) in mag.iter().enumerate() {
        let n = w[o * 8..(o + 1) * 8].iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((mo - n).abs() < 1e-5, "m[{o}] = {mo}, ||W[{o}]|| = {n}");
    }
    let mut se = exec(d, &st, &m, None);
    assert_eq!(op_count(&se.exec, "dora_scale"), 4);
    assert!(max_diff(&logits(&mut se), &want) < 1e-5, "B = 0 and m = ||W||: DoRA starts as the base model");
    loss_falls(&m, 0.8);
}

#[test]
fn dora_adapter_saves_in_peft_names_loads_back_and_folds() {
    let d = dev();
    let m = Method::Lora(lora(LoraInit::Kaiming, 0.1, true));
    let mut st = tiny_store(d);
    classifier::prepare_method(d, &mut st, &m).unwrap();
    perturb(d, &st);
    let mut ev = infer(d, &st, classifier::eval_hook_for(&m).unwrap().as_ref());
    let want = logits(&mut ev);
    let dir = tmp("dora");
    classifier::save_adapter(d, &st, &m, "tiny", &["a".into(), "b".into(), "c".into()], &dir).unwrap();
    let ad = rime_io::peft::PeftAdapter::load(&dir).unwrap();
    assert!(ad.config.use_dora && (ad.config.lora_dropout - 0.1).abs() < 1e-6);
    let json = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    assert!(json.contains("\"use_dora\": true") && json.contains("\"lora_dropout\": 0.1"), "{json}");
    let mname = format!("base_model.model.{Q0}.lora_magnitude_vector");
    assert_eq!(ad.get(&mname).map(|t| t.shape.clone()), Some(vec![8]), "peft's key {mname}");
    // Loaded on a fresh base: the same logits.
    let mut fresh = fresh_base(d);
    let (cfg, _) = classifier::load_adapter(d, &mut fresh, &dir).unwrap();
    let hook = classifier::hook_for_adapter(&cfg).unwrap();
    assert!(max_diff(&logits(&mut infer(d, &fresh, hook.as_ref())), &want) < 1e-4);
    // Folded (W' = m / ||W + sBA|| ⊙ (W + sBA)) into the base tensors: the plain model gives the same logits.
    let src = tiny_store(d);
    let mut tensors: Vec<rime_io::NamedTensor> =
        src.iter().map(|(id, p)| (p.name.clone(), p.tensor.shape.clone(), src.read_f32(d, id).unwrap())).collect();
    let done = rime_models::llama::fold_lora(&mut tensors, &ad, &dir).unwrap();
    assert_eq!(done.len(), 4);
    let mut folded = ParamStore::new();
    for (n, s, v) in &tensors {
        if !n.starts_with("head.") {
            folded.add_f32(d, n, v, s, false).unwrap();
        }
    }
    for t in &ad.tensors {
        if let Some(n) = t.name.strip_prefix("base_model.model.").filter(|n| n.starts_with("head.")) {
            folded.add_f32(d, n, &t.data, &t.shape, false).unwrap();
        }
    }
    assert!(max_diff(&logits(&mut infer(d, &folded, &Plain)), &want) < 1e-4, "folded DoRA differs");
    // use_dora without magnitudes, or magnitudes without use_dora, is refused naming the field.
    let mut cfg_json: serde_json::Value = serde_json::from_str(&json).unwrap();
    cfg_json["use_dora"] = serde_json::json!(false);
    std::fs::write(dir.join("adapter_config.json"), cfg_json.to_string()).unwrap();
    let e = classifier::load_adapter(d, &mut fresh_base(d), &dir).unwrap_err().to_string();
    assert!(
        e.contains("use_dora is false") && e.contains("lora_magnitude_vector") || e.contains("DoRA magnitude"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// --------------------------------------------------------------------------------------------- PiSSA

#[test]
fn pissa_init_leaves_the_output_unchanged_and_refuses_a_rank_above_min_dim() {
    let d = dev();
    let mut st = tiny_store(d);
    let want = logits(&mut infer(d, &st, &Plain));
    let w0 = st.read_f32(d, st.id(&format!("{Q0}.weight")).unwrap()).unwrap();
    let cfg = lora(LoraInit::Pissa, 0.0, false);
    classifier::prepare_method(d, &mut st, &Method::Lora(cfg.clone())).unwrap();
    // W_res + s·B·A = W, and B·A is the best rank-r approximation (not zero).
    let res = st.read_f32(d, st.id(&format!("{Q0}.weight")).unwrap()).unwrap();
    let a = st.read_f32(d, st.id(&lora::factor_name(Q0, 'A')).unwrap()).unwrap();
    let b = st.read_f32(d, st.id(&lora::factor_name(Q0, 'B')).unwrap()).unwrap();
    let s = cfg.scale();
    let mut moved = 0f32;
    for o in 0..8 {
        for i in 0..8 {
            let low: f32 = (0..2).map(|k| b[o * 2 + k] * a[k * 8 + i]).sum();
            assert!((res[o * 8 + i] + s * low - w0[o * 8 + i]).abs() < 1e-5, "W_res + sBA != W at [{o}, {i}]");
            moved = moved.max((res[o * 8 + i] - w0[o * 8 + i]).abs());
        }
    }
    assert!(moved > 1e-2, "PiSSA did not move the principal part out of W");
    let mut se = exec(d, &st, &Method::Lora(cfg), None);
    assert!(max_diff(&logits(&mut se), &want) < 1e-4, "PiSSA at init must equal the base model");
    let mut st = tiny_store(d);
    let e = classifier::prepare_method(
        d,
        &mut st,
        &Method::Lora(LoraConfig { rank: 9, ..lora(LoraInit::Pissa, 0.0, false) }),
    )
    .unwrap_err();
    // The library names the config field, never a CLI flag (the CLI maps `rank` to its `--rank`).
    assert!(matches!(e, rime_peft::Error::Invalid { field: "rank", .. }), "{e}");
    let e = e.to_string();
    assert!(e.starts_with("rank 9 ") && e.contains("init pissa") && !e.contains("--"), "{e}");
    let e = classifier::prepare_method(d, &mut st, &Method::Lora(lora(LoraInit::Kaiming, 1.0, false))).unwrap_err();
    assert!(matches!(e, rime_peft::Error::Invalid { field: "lora_dropout", .. }), "{e}");
    assert!(e.to_string().starts_with("lora_dropout 1: "), "{e}");
}

#[test]
fn pissa_adapter_converted_reproduces_the_trained_model_on_the_unmodified_base() {
    let d = dev();
    for (rslora, dora) in [(false, false), (true, true)] {
        let cfg = LoraConfig { rslora, ..lora(LoraInit::Pissa, 0.0, dora) };
        let m = Method::Lora(cfg.clone());
        let mut st = tiny_store(d);
        classifier::prepare_method(d, &mut st, &m).unwrap();
        let mut se = exec(d, &st, &m, Some(OptimConfig::adamw(2e-2, 0.0)));
        for _ in 0..5 {
            se.exec.step(d).unwrap();
        }
        let want = logits(&mut se);
        let dir = tmp(&format!("pissa-{rslora}"));
        classifier::save_adapter(d, &st, &m, "tiny", &["a".into(), "b".into(), "c".into()], &dir).unwrap();
        let ad = rime_io::peft::PeftAdapter::load(&dir).unwrap();
        assert_eq!(ad.config.r, 4, "rank 2r");
        let alpha = if rslora { 4.0 * 2f64.sqrt() } else { 8.0 };
        assert!((ad.config.lora_alpha - alpha).abs() < 1e-6, "lora_alpha {}", ad.config.lora_alpha);
        assert!((ad.config.scale() - cfg.scale() as f64).abs() < 1e-6, "the scale must stay alpha/r");
        assert_eq!(ad.get(&lora::factor_name(Q0, 'A')).unwrap().shape, [4, 8]);
        assert!(ad.config.raw.contains_key("rime_pissa"));
        // On the unmodified base: a plain rank-2r LoRA (DoRA) with the trained model's outputs.
        let mut fresh = fresh_base(d);
        let (acfg, _) = classifier::load_adapter(d, &mut fresh, &dir).unwrap();
        let hook = classifier::hook_for_adapter(&acfg).unwrap();
        let got = logits(&mut infer(d, &fresh, hook.as_ref()));
        assert!(max_diff(&got, &want) < 1e-4, "rslora={rslora} dora={dora}: {got:?} vs trained {want:?}");
        // Resume: loaded back into a PiSSA store (residual weights), the trained rank-r factors come back.
        let mut again = tiny_store(d);
        classifier::prepare_method(d, &mut again, &m).unwrap();
        classifier::load_adapter(d, &mut again, &dir).unwrap();
        assert_eq!(again.get(again.id(&lora::factor_name(Q0, 'A')).unwrap()).tensor.shape, [2, 8]);
        let got = logits(&mut exec(d, &again, &m, None));
        assert!(max_diff(&got, &want) < 1e-4, "resumed PiSSA differs");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
