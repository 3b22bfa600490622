//! aTLAS on a tiny random BERT: dL/dλ from the executor's autodiff against central finite differences, and
//! learned coefficients that lower the loss below the uniform ones.

use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rime_graph::ParamStore;
use rime_kernels::{Device, DeviceOptions};
use rime_merge::atlas::{fit, loss_and_grad, mean_loss, set_coefficients, AtlasTensor, TextObjective};
use rime_models::bert::BertConfig;
use rime_peft::classifier;
use rime_peft::classify::{Encoded, GradientProbe, Session};

fn dev() -> &'static Device {
    static D: OnceLock<Device> = OnceLock::new();
    D.get_or_init(|| Device::new(&DeviceOptions::default()).expect("a wgpu adapter (lavapipe in CI)"))
}

fn rnd(seed: u64, n: usize, s: f32) -> Vec<f32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-s..s)).collect()
}

const B: usize = 4;
const T: usize = 5;

fn tiny_cfg() -> BertConfig {
    BertConfig {
        hidden: 8,
        layers: 1,
        heads: 2,
        intermediate: 12,
        vocab: 20,
        max_positions: 16,
        type_vocab: 2,
        eps: 1e-12,
        gelu_tanh: false,
    }
}

fn tiny_store(d: &Device) -> ParamStore {
    let c = tiny_cfg();
    let h = c.hidden;
    let mut st = ParamStore::new();
    let mut seed = 100;
    let mut add = |st: &mut ParamStore, name: &str, shape: &[usize], s: f32, center: f32| {
        seed += 1;
        let v: Vec<f32> = rnd(seed, shape.iter().product(), s).into_iter().map(|x| x + center).collect();
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

/// A session whose value weight and head are merged tensors of K = 2 task vectors, and a labelled set
/// whose label depends on the first token (so the coefficients can fit it).
fn setup(d: &'static Device) -> (TextObjective<'static>, Vec<AtlasTensor>) {
    let mut st = tiny_store(d);
    let mut tensors = Vec::new();
    for (i, name) in
        ["encoder.layer.0.attention.self.value.weight", "encoder.layer.0.output.dense.weight", classifier::HEAD_WEIGHT]
            .iter()
            .enumerate()
    {
        let id = st.id(name).unwrap();
        st.set_trainable(id, true);
        let base = st.read_f32(d, id).unwrap();
        let n = base.len();
        let base = if *name == classifier::HEAD_WEIGHT { vec![0.0; n] } else { base };
        let taus = vec![rnd(500 + i as u64, n, 0.8), rnd(600 + i as u64, n, 0.8)];
        tensors.push(AtlasTensor { name: name.to_string(), id, base, taus });
    }
    let mut r = rand::rngs::StdRng::seed_from_u64(9);
    let mut enc = Encoded { ids: vec![], types: vec![], labels: vec![] };
    for _ in 0..16 {
        let len = r.random_range(2..=T);
        let ids: Vec<u32> = (0..len).map(|_| r.random_range(1..20)).collect();
        enc.labels.push((ids[0] % 3) as i32);
        enc.types.push(vec![0; len]);
        enc.ids.push(ids);
    }
    let sess = Session::for_inference(d, st, tiny_cfg(), String::new(), Box::new(rime_models::Plain), B, T);
    (TextObjective { probe: GradientProbe::from_session(sess, None), train: enc, eval: None, seq: T }, tensors)
}

#[test]
fn atlas_lambda_gradient_matches_finite_differences() {
    let d = dev();
    let (mut sess, tensors) = setup(d);
    let lam: Vec<Vec<f32>> = (0..tensors.len()).map(|t| vec![0.4 + 0.1 * t as f32, 0.7 - 0.2 * t as f32]).collect();
    let idx = [0usize, 1, 2, 3];
    set_coefficients(&mut sess, &tensors, &lam).unwrap();
    let (_, g) = loss_and_grad(&mut sess, &tensors, &idx).unwrap();
    let h = 1e-2f32;
    for t in 0..tensors.len() {
        for k in 0..2 {
            let mut loss_at = |delta: f32| {
                let mut l2 = lam.clone();
                l2[t][k] += delta;
                set_coefficients(&mut sess, &tensors, &l2).unwrap();
                loss_and_grad(&mut sess, &tensors, &idx).unwrap().0
            };
            let fd = (loss_at(h) - loss_at(-h)) / (2.0 * h);
            let tol = 2e-3 + 2e-2 * fd.abs();
            assert!(
                (g[t][k] - fd).abs() <= tol,
                "dL/dλ[{}][{k}]: autodiff {} vs finite difference {fd}",
                tensors[t].name,
                g[t][k]
            );
        }
    }
}

#[test]
fn atlas_learned_coefficients_beat_uniform() {
    let d = dev();
    let (mut sess, tensors) = setup(d);
    let init: Vec<Vec<f32>> = tensors.iter().map(|_| vec![0.5, 0.5]).collect();
    set_coefficients(&mut sess, &tensors, &init).unwrap();
    let uniform = mean_loss(&mut sess).unwrap();
    let f = fit(&mut sess, &tensors, init, 60, 0.1, 3).unwrap();
    let learned = mean_loss(&mut sess).unwrap();
    assert_eq!(f.losses.len(), 60);
    assert!(f.lambdas.iter().flatten().all(|x| x.is_finite()));
    assert!(learned < uniform * 0.9, "learned λ {:?}: loss {learned} vs uniform {uniform}", f.lambdas);
}
