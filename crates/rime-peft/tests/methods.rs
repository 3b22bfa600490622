//! Tuning methods beside LoRA (SVFit, IA3, bottleneck adapters) on a tiny random BERT: gradients of every
//! trainable tensor against central finite differences, a few AdamW steps that must lower the loss, and a
//! save → load round trip of the peft-layout adapter that must reproduce the logits. Plus the SVD itself.

use rime_graph::OptimConfig;
use rime_peft::adapter::{AdapterMode, BottleneckConfig};
use rime_peft::classifier::{self, Method};
use rime_peft::svfit::{self, SvfitConfig};

mod common;
use common::*;

#[test]
fn svd_reconstructs_and_is_orthonormal() {
    for (m, n) in [(7, 5), (5, 7), (6, 6)] {
        let w = rnd(m as u64 * 10 + n as u64, m * n, 1.0);
        let (u, s, vt) = svfit::svd(&w, m, n);
        let k = m.min(n);
        assert_eq!((u.len(), s.len(), vt.len()), (m * k, k, k * n));
        assert!(s.windows(2).all(|p| p[0] >= p[1]), "σ not descending: {s:?}");
        for i in 0..m {
            for j in 0..n {
                let r: f32 = (0..k).map(|a| u[i * k + a] * s[a] * vt[a * n + j]).sum();
                assert!((r - w[i * n + j]).abs() < 1e-5, "USVᵀ[{i},{j}] = {r}, W = {}", w[i * n + j]);
            }
        }
        for a in 0..k {
            for b2 in 0..k {
                let uu: f32 = (0..m).map(|i| u[i * k + a] * u[i * k + b2]).sum();
                let vv: f32 = (0..n).map(|j| vt[a * n + j] * vt[b2 * n + j]).sum();
                let e = if a == b2 { 1.0 } else { 0.0 };
                assert!((uu - e).abs() < 1e-5 && (vv - e).abs() < 1e-5, "UᵀU or VᵀV [{a},{b2}] = {uu}, {vv}");
            }
        }
    }
    // energy: σ = [3, 2, 1] has Σσ² = 14; 0.6 needs 9+4 = 13 ≥ 8.4 → no, 9 ≥ 8.4 → 1 value
    assert_eq!(svfit::choose_rank(&[3.0, 2.0, 1.0], 8, Some(0.6)), 1);
    assert_eq!(svfit::choose_rank(&[3.0, 2.0, 1.0], 8, Some(0.9)), 2);
    assert_eq!(svfit::choose_rank(&[3.0, 2.0, 1.0], 8, None), 3);
    assert_eq!(svfit::choose_rank(&[3.0, 2.0, 1.0], 2, None), 2);
}

fn svfit_method() -> Method {
    Method::Svfit(SvfitConfig { rank: 3, energy: None, targets: vec!["query".into(), "value".into()] })
}
fn ia3_method() -> Method {
    Method::Ia3 { targets: rime_peft::ia3::default_targets() }
}
fn adapter_method(mode: AdapterMode, scale: f32) -> Method {
    Method::Adapter(BottleneckConfig { size: 4, mode, scale, seed: 1 })
}

#[test]
fn svfit_split_keeps_the_model_and_energy_picks_rank() {
    let d = dev();
    let plain = tiny_store(d);
    let mut se0 = exec(d, &plain, &Method::Probe, None);
    se0.exec.forward(d).unwrap();
    let want = se0.exec.read(d, se0.logits).unwrap();
    let mut st = tiny_store(d);
    let e = Method::Svfit(SvfitConfig { rank: 0, energy: Some(0.9), targets: vec!["query".into()] });
    let info = classifier::prepare_method(d, &mut st, &e).unwrap();
    println!("{info}");
    let sig = st.id(&svfit::sigma_name("encoder.layer.0.attention.self.query")).unwrap();
    let r = st.get(sig).tensor.numel();
    assert!((1..8).contains(&r), "energy 0.9 of a random 8×8 kept {r} values");
    // σ at its initial value: W_rest + UσVᵀ is W, the logits are the pretrained model's.
    let mut se = exec(d, &st, &e, Some(OptimConfig::adamw(1e-2, 0.0)));
    se.exec.forward(d).unwrap();
    let got = se.exec.read(d, se.logits).unwrap();
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-4, "svfit at init changes the logits by {diff}");
    assert_eq!(se.exec.gradient_buffers(), 2 + 2, "σ of 2 layers and the head (weight, bias)");
}

#[test]
fn svfit_gradients_match_finite_differences() {
    let d = dev();
    let mut st = tiny_store(d);
    classifier::prepare_method(d, &mut st, &svfit_method()).unwrap();
    perturb(d, &st);
    let mut se = exec(d, &st, &svfit_method(), Some(OptimConfig::adamw(1e-2, 0.0)));
    assert!(check_grads(d, &st, &mut se) >= 3 * 6);
}

#[test]
fn svfit_loss_falls() {
    loss_falls(&svfit_method(), 0.95);
}

#[test]
fn svfit_adapter_round_trip() {
    round_trip(
        &svfit_method(),
        "RIME_SVFIT",
        &[
            "base_model.model.encoder.layer.1.attention.self.value.svfit_sigma",
            "base_model.model.encoder.layer.1.attention.self.value.svfit_U",
            "base_model.model.encoder.layer.1.attention.self.value.svfit_V",
            "base_model.model.head.weight",
        ],
    );
}

#[test]
fn ia3_gradients_match_finite_differences() {
    let d = dev();
    let mut st = tiny_store(d);
    let info = classifier::prepare_method(d, &mut st, &ia3_method()).unwrap();
    assert!(info.contains("4 output-scaled and 2 input-scaled"), "{info}");
    perturb(d, &st);
    let mut se = exec(d, &st, &ia3_method(), Some(OptimConfig::adamw(1e-2, 0.0)));
    assert!(check_grads(d, &st, &mut se) >= 3 * 8);
}

#[test]
fn ia3_loss_falls() {
    loss_falls(&ia3_method(), 0.8);
}

#[test]
fn ia3_adapter_round_trip_with_peft_names_and_shapes() {
    round_trip(
        &ia3_method(),
        "IA3",
        &[
            "base_model.model.encoder.layer.0.attention.self.key.ia3_l",
            "base_model.model.encoder.layer.0.attention.self.value.ia3_l",
            "base_model.model.encoder.layer.0.output.dense.ia3_l",
        ],
    );
    let d = dev();
    let mut st = tiny_store(d);
    classifier::prepare_method(d, &mut st, &ia3_method()).unwrap();
    let shape = |n: &str| st.get(st.id(n).unwrap()).tensor.shape.clone();
    // peft: [out, 1] for key/value, [1, in] for a feed-forward module
    assert_eq!(shape("base_model.model.encoder.layer.0.attention.self.key.ia3_l"), [8, 1]);
    assert_eq!(shape("base_model.model.encoder.layer.0.output.dense.ia3_l"), [1, 12]);
    assert!(st.find("base_model.model.encoder.layer.0.attention.output.dense.ia3_l").is_none());
}

#[test]
fn adapter_gradients_match_finite_differences() {
    let d = dev();
    for m in [adapter_method(AdapterMode::Serial, 1.0), adapter_method(AdapterMode::Parallel, 4.0)] {
        let mut st = tiny_store(d);
        classifier::prepare_method(d, &mut st, &m).unwrap();
        perturb(d, &st);
        let mut se = exec(d, &st, &m, Some(OptimConfig::adamw(1e-2, 0.0)));
        assert!(check_grads(d, &st, &mut se) >= 3 * 18);
    }
}

#[test]
fn adapter_starts_as_identity_and_loss_falls() {
    let d = dev();
    let plain = tiny_store(d);
    let mut se0 = exec(d, &plain, &Method::Probe, None);
    se0.exec.forward(d).unwrap();
    let want = se0.exec.read(d, se0.logits).unwrap();
    for m in [adapter_method(AdapterMode::Serial, 1.0), adapter_method(AdapterMode::Parallel, 4.0)] {
        let mut st = tiny_store(d);
        classifier::prepare_method(d, &mut st, &m).unwrap();
        let mut se = exec(d, &st, &m, None);
        se.exec.forward(d).unwrap();
        let got = se.exec.read(d, se.logits).unwrap();
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-6, "{m:?} at init changes the logits by {diff}");
        loss_falls(&m, 0.5);
    }
}

#[test]
fn adapter_round_trip() {
    round_trip(
        &adapter_method(AdapterMode::Parallel, 4.0),
        "RIME_BOTTLENECK",
        &[
            "base_model.model.encoder.layer.0.attention.output.adapter.down.weight",
            "base_model.model.encoder.layer.1.output.adapter.up.bias",
        ],
    );
}
