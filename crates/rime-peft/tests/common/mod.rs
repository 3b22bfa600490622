//! Helpers shared by the rime-peft tests: one device per test binary, seeded random data, and a tiny random
//! BERT (Hugging Face names, frozen) with a 3-class head, plus one fixed padded batch for it, and
//! the checks every tuning method goes through (gradients vs finite differences, loss falls, adapter round trip).
#![allow(dead_code)]

use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rime_graph::{OptimConfig, ParamStore};
use rime_kernels::{Device, DeviceOptions};
use rime_models::bert::BertConfig;
use rime_peft::classifier::{self, Method, ShapeExec};

pub fn dev() -> &'static Device {
    static D: OnceLock<Device> = OnceLock::new();
    D.get_or_init(|| Device::new(&DeviceOptions::default()).expect("a wgpu adapter (lavapipe in CI)"))
}

pub fn rnd(seed: u64, n: usize, s: f32) -> Vec<f32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-s..s)).collect()
}

pub const B: usize = 3;
pub const T: usize = 5;

pub fn tiny_cfg() -> BertConfig {
    BertConfig {
        hidden: 8,
        layers: 2,
        heads: 2,
        intermediate: 12,
        vocab: 20,
        max_positions: 16,
        type_vocab: 2,
        eps: 1e-12,
        gelu_tanh: false,
    }
}

/// A random BertModel under Hugging Face names (frozen) and a 3-class head (trainable).
pub fn tiny_store(d: &Device) -> ParamStore {
    let c = tiny_cfg();
    let h = c.hidden;
    let mut st = ParamStore::new();
    let mut seed = 100;
    let mut add = |st: &mut ParamStore, name: &str, shape: &[usize], s: f32, center: f32| {
        seed += 1;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = rnd(seed, n, s).into_iter().map(|x| x + center).collect();
        st.add_f32(d, name, &v, shape, false).unwrap();
    };
    for (name, shape) in rime_models::bert::param_shapes(&c) {
        let (s, center) = if name.ends_with("LayerNorm.weight") {
            (0.1, 1.0)
        } else if name.ends_with(".bias") {
            (0.1, 0.0)
        } else if name.contains("embeddings.word") {
            (1.0, 0.0)
        } else if name.contains("embeddings.") {
            (0.3, 0.0)
        } else {
            (0.5, 0.0)
        };
        add(&mut st, &name, &shape, s, center);
    }
    classifier::init_head(d, &mut st, h, 3, 7).unwrap();
    st
}

pub fn batch() -> (Vec<u32>, Vec<u32>, Vec<u32>, Vec<i32>) {
    let ids: Vec<u32> = (0..B * T).map(|i| ((i * 7 + 3) % 20) as u32).collect();
    let types = vec![0u32; B * T];
    let mut mask = vec![1u32; B * T];
    mask[T - 1] = 0; // one padded position
    mask[2 * T - 2..2 * T].fill(0);
    (ids, types, mask, vec![0, 2, 1])
}

pub fn exec(d: &Device, st: &ParamStore, method: &Method, optim: Option<OptimConfig>) -> ShapeExec {
    let hook = classifier::hook_for(method);
    let se = classifier::build_exec(d, st, &tiny_cfg(), "", hook.as_ref(), B, T, optim).unwrap();
    let (ids, types, mask, labels) = batch();
    classifier::feed(d, &se, &ids, &types, &mask, &labels).unwrap();
    se
}

/// Give zero-initialised trainable tensors (adapter up-projections) random values so that every gradient
/// is exercised; multiplicative ones (σ, IA3 vectors) get a perturbation around their value.
pub fn perturb(d: &Device, st: &ParamStore) {
    for (k, (id, p)) in st.trainable().enumerate() {
        let mut w = st.read_f32(d, id).unwrap();
        for (x, r) in w.iter_mut().zip(rnd(500 + k as u64, p.tensor.numel(), 0.3)) {
            *x = if *x == 0.0 { r } else { *x * (1.0 + r) };
        }
        d.write_f32(&p.tensor, &w).unwrap();
    }
}

/// Central differences of the GPU loss vs the executor's gradients, a few coordinates per tensor.
/// f32 forward through two post-LN layers: eps 1e-2, tolerance 3e-3 abs + 5% rel.
pub fn check_grads(d: &Device, st: &ParamStore, se: &mut ShapeExec) -> usize {
    se.exec.backward_only(d).unwrap();
    let mut r = rand::rngs::StdRng::seed_from_u64(9);
    let mut checked = 0;
    for (id, p) in st.trainable() {
        let g = se.exec.read_param_grad(d, id).unwrap();
        let mut w = st.read_f32(d, id).unwrap();
        for _ in 0..3 {
            let i = r.random_range(0..w.len());
            let orig = w[i];
            let eps = 1e-2f32;
            let mut at = |v: f32, w: &mut Vec<f32>| {
                w[i] = v;
                d.write_f32(&p.tensor, w).unwrap();
                se.exec.forward(d).unwrap();
                se.exec.read(d, se.loss).unwrap()[0] as f64
            };
            let up = at(orig + eps, &mut w);
            let down = at(orig - eps, &mut w);
            at(orig, &mut w);
            let fd = ((up - down) / (2.0 * eps as f64)) as f32;
            let tol = 3e-3 + 0.05 * fd.abs().max(g[i].abs());
            assert!((fd - g[i]).abs() <= tol, "{}[{i}]: autodiff {} vs finite difference {fd}", p.name, g[i]);
            checked += 1;
        }
    }
    checked
}

/// 40 AdamW steps on one batch with the head frozen must bring the loss below `factor` × the first.
pub fn loss_falls(method: &Method, factor: f32) {
    let d = dev();
    let mut st = tiny_store(d);
    classifier::prepare_method(d, &mut st, method).unwrap();
    // The head stays fixed: the fall is the method's own doing.
    for n in [classifier::HEAD_WEIGHT, classifier::HEAD_BIAS] {
        let id = st.id(n).unwrap();
        st.set_trainable(id, false);
    }
    let mut se = exec(d, &st, method, Some(OptimConfig::adamw(2e-2, 0.0)));
    se.exec.forward(d).unwrap();
    let first = se.exec.read(d, se.loss).unwrap()[0];
    for _ in 0..40 {
        se.exec.step(d).unwrap();
    }
    se.exec.forward(d).unwrap();
    let last = se.exec.read(d, se.loss).unwrap()[0];
    println!("{}: loss {first:.4} -> {last:.4} after 40 AdamW steps", method.name());
    assert!(last.is_finite() && last < factor * first, "{}: loss {first} -> {last}", method.name());
}

/// Train a little, save the adapter, load it into a fresh copy of the model: same logits.
pub fn round_trip(method: &Method, peft_type: &str, expect_names: &[&str]) {
    let d = dev();
    let mut st = tiny_store(d);
    classifier::prepare_method(d, &mut st, method).unwrap();
    perturb(d, &st);
    let mut se = exec(d, &st, method, None);
    se.exec.forward(d).unwrap();
    let want = se.exec.read(d, se.logits).unwrap();
    let dir = std::env::temp_dir().join(format!("rime-methods-{}-{}", method.name(), std::process::id()));
    classifier::save_adapter(d, &st, method, "tiny", &["a".into(), "b".into(), "c".into()], &dir).unwrap();
    let ad = rime_io::peft::PeftAdapter::load(&dir).unwrap();
    assert_eq!(ad.config.peft_type, peft_type);
    for n in expect_names {
        assert!(
            ad.get(n).is_some(),
            "{n} missing; adapter has {:?}",
            ad.tensors.iter().map(|t| &t.name).collect::<Vec<_>>()
        );
    }
    let mut fresh = ParamStore::new();
    for (id, p) in tiny_store(d).iter() {
        if !p.name.starts_with("head.") {
            fresh.add_f32(d, &p.name, &tiny_store(d).read_f32(d, id).unwrap(), &p.tensor.shape, false).unwrap();
        }
    }
    let (cfg, labels) = classifier::load_adapter(d, &mut fresh, &dir).unwrap();
    assert_eq!(labels, ["a", "b", "c"]);
    let hook = classifier::hook_for_adapter(&cfg).unwrap();
    let mut se2 = classifier::build_exec(d, &fresh, &tiny_cfg(), "", hook.as_ref(), B, T, None).unwrap();
    let (ids, types, mask, labels) = batch();
    classifier::feed(d, &se2, &ids, &types, &mask, &labels).unwrap();
    se2.exec.forward(d).unwrap();
    let got = se2.exec.read(d, se2.logits).unwrap();
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-4, "{}: logits after load differ by {diff}", method.name());
    let _ = std::fs::remove_dir_all(&dir);
}
