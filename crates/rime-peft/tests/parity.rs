//! Parity with PyTorch + peft on the real all-MiniLM-L6-v2 (../shared/golden, tolerances from its README):
//! the encoder forward, and a LoRA training step (loss, every gradient, three AdamW steps).

use std::path::PathBuf;
use std::sync::OnceLock;

use rime_graph::{Executor, Graph, OptimConfig};
use rime_io::Checkpoint;
use rime_kernels::{DType, Device, DeviceOptions};
use rime_models::bert;
use rime_peft::{classifier, lora::LoraHook, trainer};

fn dev() -> &'static Device {
    static D: OnceLock<Device> = OnceLock::new();
    D.get_or_init(|| Device::new(&DeviceOptions::default()).expect("a wgpu adapter (lavapipe in CI)"))
}

fn golden(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden").join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIPPED: golden file {} not found (../shared/golden beside the checkout)", p.display());
        None
    }
}

fn model() -> Option<PathBuf> {
    match rime_io::locate_model("all-minilm-l6-v2") {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("SKIPPED: model not found, run scripts/fetch-models.sh ({e})");
            None
        }
    }
}

fn u32s(ck: &Checkpoint, name: &str) -> Vec<u32> {
    ck.get_i64(name).unwrap().into_iter().map(|x| x as u32).collect()
}

fn max_rel(got: &[f32], want: &[f32]) -> f32 {
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let scale = want.iter().map(|x| x.abs()).fold(0f32, f32::max);
    diff / scale.max(1e-12)
}

/// MiniLM's hidden states and mean pool against transformers' with the linear weights stored as `weights`;
/// returns the worst |diff| of `last_hidden_state` at unmasked positions (asserted within `tol`) and the worst
/// cosine of the pooled rows (asserted at least `min_cos`).
fn forward_against_torch(weights: DType, tol: f32, min_cos: f64) -> Option<f32> {
    let (Some(g), Some(m)) = (golden("minilm_forward.safetensors"), model()) else { return None };
    let d = dev();
    let ck = Checkpoint::open(&g).unwrap();
    let (store, cfg, prefix, _) = trainer::open_model_as(d, &m, 128, weights).unwrap();
    let (b, t) = (4, 25);
    let mut gr = Graph::new();
    let enc = bert::build(&mut gr, &store, &cfg, &prefix, b, t, &rime_models::Plain).unwrap();
    let mut ex = Executor::new(d, gr, &store, None, &[enc.last_hidden, enc.pooled], None).unwrap();
    let mask = u32s(&ck, "attention_mask");
    let (pos, maskf, pool) = bert::aux_inputs(&mask, b, t);
    ex.feed_u32(d, bert::INPUT_IDS, &u32s(&ck, "input_ids")).unwrap();
    ex.feed_u32(d, bert::TOKEN_TYPE_IDS, &u32s(&ck, "token_type_ids")).unwrap();
    ex.feed_u32(d, bert::POSITION_IDS, &pos).unwrap();
    ex.feed_f32(d, bert::ATTENTION_MASK, &maskf).unwrap();
    ex.feed_f32(d, bert::POOL_WEIGHTS, &pool).unwrap();
    ex.forward(d).unwrap();
    let hidden = ex.read(d, enc.last_hidden).unwrap();
    let want = ck.get_f32("last_hidden_state").unwrap();
    let c = 384;
    let mut worst = 0f32;
    for (r, &mk) in mask.iter().enumerate() {
        if mk == 0 {
            continue;
        }
        for j in 0..c {
            worst = worst.max((hidden[r * c + j] - want[r * c + j]).abs());
        }
    }
    println!("minilm ({weights:?} weights) last_hidden_state max |diff| at unmasked positions: {worst:.3e}");
    assert!(worst <= tol, "last_hidden_state differs from torch by {worst} (tolerance {tol})");
    let pooled = ex.read(d, enc.pooled).unwrap();
    let want_p = ck.get_f32("mean_pooled").unwrap();
    for r in 0..b {
        let (a, w) = (&pooled[r * c..(r + 1) * c], &want_p[r * c..(r + 1) * c]);
        let dot: f64 = a.iter().zip(w).map(|(x, y)| (*x as f64) * (*y as f64)).sum();
        let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let nw: f64 = w.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let cos = dot / (na * nw);
        assert!(cos >= min_cos, "row {r}: cosine of mean_pooled {cos}");
    }
    Some(worst)
}

#[test]
fn minilm_forward_matches_torch() {
    forward_against_torch(DType::F32, 1e-4, 0.99999);
}

/// `--weights f16`: the frozen linear weights really are half precision (the result moves) and stay close.
#[test]
fn minilm_forward_with_f16_weights_stays_close_to_torch() {
    let Some(worst) = forward_against_torch(DType::F16, 5e-3, 0.9999) else { return };
    assert!(worst > 1e-5, "f16 weights gave f32's result ({worst}): were they stored as f16?");
}

#[test]
fn minilm_lora_step_matches_peft() {
    let (Some(g), Some(m)) = (golden("minilm_lora_step.safetensors"), model()) else { return };
    let d = dev();
    let ck = Checkpoint::open(&g).unwrap();
    let (mut store, cfg, prefix, _) = trainer::open_model(d, &m, 128).unwrap();
    // Trainable tensors from init.*: peft's names without the adapter name `.default`.
    let mut names = vec![];
    for n in ck.names() {
        if let Some(rest) = n.strip_prefix("init.") {
            let local = rest.replace(".default.weight", ".weight");
            let (_, shape) = ck.info(n).unwrap();
            let shape = shape.to_vec();
            let data = ck.get_f32(n).unwrap();
            store.add_f32(d, &local, &data, &shape, true).unwrap();
            names.push((rest.to_string(), local));
        }
    }
    assert_eq!(names.len(), 26, "24 LoRA factors + head weight and bias");
    let (b, t) = (8, 64);
    let mut gr = Graph::new();
    let enc = bert::build(&mut gr, &store, &cfg, &prefix, b, t, &LoraHook::new(2.0)).unwrap();
    let hw = gr.param(&store, classifier::HEAD_WEIGHT).unwrap();
    let hb = gr.param(&store, classifier::HEAD_BIAS).unwrap();
    let logits = gr.linear(enc.pooled, hw, Some(hb)).unwrap();
    let labels = gr.input("labels", &[b], DType::I32);
    let loss = gr.cross_entropy(logits, labels, -100).unwrap();
    let mut ex = Executor::new(d, gr, &store, Some(loss), &[logits], Some(OptimConfig::adamw(1e-3, 0.01))).unwrap();
    let mask = u32s(&ck, "attention_mask");
    let (pos, maskf, pool) = bert::aux_inputs(&mask, b, t);
    ex.feed_u32(d, bert::INPUT_IDS, &u32s(&ck, "input_ids")).unwrap();
    ex.feed_u32(d, bert::TOKEN_TYPE_IDS, &u32s(&ck, "token_type_ids")).unwrap();
    ex.feed_u32(d, bert::POSITION_IDS, &pos).unwrap();
    ex.feed_f32(d, bert::ATTENTION_MASK, &maskf).unwrap();
    ex.feed_f32(d, bert::POOL_WEIGHTS, &pool).unwrap();
    let lab: Vec<i32> = ck.get_i64("labels").unwrap().into_iter().map(|x| x as i32).collect();
    ex.feed_i32(d, "labels", &lab).unwrap();

    ex.backward_only(d).unwrap();
    let l = ex.read(d, loss).unwrap()[0];
    let want_l = ck.get_f32("loss").unwrap()[0];
    println!("loss {l} vs torch {want_l}");
    assert!((l - want_l).abs() <= 1e-5, "loss {l} vs torch {want_l} (tolerance 1e-5)");
    assert!(max_rel(&ex.read(d, logits).unwrap(), &ck.get_f32("logits").unwrap()) < 1e-4);
    let mut worst = 0f32;
    for (golden_name, local) in &names {
        let id = store.id(local).unwrap();
        let got = ex.read_param_grad(d, id).unwrap();
        let want = ck.get_f32(&format!("grad.{golden_name}")).unwrap();
        let rel = max_rel(&got, &want);
        worst = worst.max(rel);
        assert!(rel <= 1e-3, "gradient of {local}: relative difference {rel} (tolerance 1e-3)");
    }
    println!("worst gradient relative difference: {worst:.3e}");

    let want_steps = ck.get_f32("step_losses").unwrap();
    let mut got_steps = vec![];
    for _ in 0..3 {
        ex.step(d).unwrap();
        got_steps.push(ex.last_loss(d).unwrap().unwrap());
    }
    ex.forward(d).unwrap();
    got_steps.push(ex.read(d, loss).unwrap()[0]);
    println!("step losses {got_steps:?} vs torch {want_steps:?}");
    for (g, w) in got_steps.iter().zip(&want_steps) {
        assert!((g - w).abs() <= 1e-4, "step losses {got_steps:?} vs torch {want_steps:?} (tolerance 1e-4)");
    }
    let mut worst_final = 0f32;
    for (golden_name, local) in &names {
        let got = store.read_f32(d, store.id(local).unwrap()).unwrap();
        let want = ck.get_f32(&format!("final.{golden_name}")).unwrap();
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        worst_final = worst_final.max(diff);
        assert!(diff <= 1e-4, "{local} after 3 AdamW steps differs by {diff} (tolerance 1e-4)");
    }
    println!("worst |diff| after 3 AdamW steps: {worst_final:.3e}");
}

#[test]
fn golden_peft_adapter_loads_into_the_classifier() {
    let (Some(g), Some(m)) = (golden("minilm_lora_peft_adapter"), model()) else { return };
    let d = dev();
    let (mut store, _, _, _) = trainer::open_model(d, &m, 128).unwrap();
    let (cfg, _) = classifier::load_adapter(d, &mut store, &g).unwrap();
    assert_eq!(cfg.r, 8);
    assert_eq!(store.trainable().count(), 24);
    // And written back in peft's layout: same keys and values.
    let dir = std::env::temp_dir().join(format!("rime-adapter-{}", std::process::id()));
    let method = classifier::Method::Lora(rime_peft::lora::LoraConfig {
        rank: 8,
        alpha: 16.0,
        targets: vec!["query".into(), "value".into()],
        rslora: false,
        init: rime_peft::lora::LoraInit::Kaiming,
        seed: 0,
        dropout: 0.0,
        dora: false,
    });
    classifier::save_adapter(d, &store, &method, "all-MiniLM-L6-v2", &[], &dir).unwrap();
    let a = rime_io::peft::PeftAdapter::load(&g).unwrap();
    let b = rime_io::peft::PeftAdapter::load(&dir).unwrap();
    let na: Vec<_> = a.tensors.iter().map(|t| (&t.name, &t.shape)).collect();
    let nb: Vec<_> = b.tensors.iter().map(|t| (&t.name, &t.shape)).collect();
    assert_eq!(na, nb);
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!(x.data, y.data, "{}", x.name);
    }
    std::fs::remove_dir_all(&dir).ok();
}
