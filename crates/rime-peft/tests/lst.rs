//! Ladder side-tuning: side-network gradients vs central finite differences (tiny random BERT), the pruned
//! init vs a plain-Rust reference, and on the real MiniLM (skipped when absent): training from the feature
//! cache is bitwise the training that recomputes the encoder, a cache of another dataset or model is refused,
//! and a saved adapter evaluates through the Evaluator exactly as in training.

mod common;

use common::{dev, rnd, tiny_cfg, tiny_store};
use rand::{Rng, SeedableRng};
use rime_graph::{OptimConfig, ParamStore};
use rime_models::bert;
use rime_peft::lst::{self, FeatureCache, LstConfig, LstSpec, LstTask};
use rime_peft::{Evaluator, TextClassData, TrainConfig};

const B: usize = 3;
const T: usize = 5;

/// The tiny model with a side network of width 4 (reduction 2, 2 heads of 2, FFN 6).
fn tiny_lst(cfg: LstConfig) -> (ParamStore, LstSpec) {
    let d = dev();
    let mut st = tiny_store(d);
    let spec = LstSpec::new(cfg, &tiny_cfg(), "").unwrap();
    let frozen = tiny_store(d);
    let mut get = |n: &str| -> rime_peft::Result<Vec<f32>> { Ok(frozen.read_f32(d, frozen.id(n)?)?) };
    lst::add_parameters(d, &mut st, &mut get, &tiny_cfg(), &spec, 3).unwrap();
    (st, spec)
}

fn feed_random(se: &lst::SideExec, spec: &LstSpec) {
    let d = dev();
    let h = spec.dims.hidden;
    for (k, s) in spec.states().into_iter().enumerate() {
        se.exec.feed_f32(d, &lst::state_input(s), &rnd(40 + k as u64, B * T * h, 1.0)).unwrap();
    }
    let mut mask = vec![1u32; B * T];
    mask[T - 1] = 0;
    mask[2 * T - 2..2 * T].fill(0);
    let (_, maskf, pool) = bert::aux_inputs(&mask, B, T);
    se.exec.feed_f32(d, bert::ATTENTION_MASK, &maskf).unwrap();
    se.exec.feed_f32(d, bert::POOL_WEIGHTS, &pool).unwrap();
    se.exec.feed_i32(d, "labels", &[0, 2, 1]).unwrap();
}

fn grads_match(cfg: LstConfig) {
    let d = dev();
    let (st, spec) = tiny_lst(cfg);
    common::perturb(d, &st); // up starts at zero and the gates at 0: give every gradient a path
                             // The optimizer makes the executor build the backward pass; it is never stepped.
    let mut se = lst::build_side_exec(d, &st, &spec, B, T, Some(OptimConfig::adamw(0.0, 0.0)), None).unwrap();
    feed_random(&se, &spec);
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
    // head (2) + down (states) ×2 + per kept layer (gate + 16 layer tensors) + up (2)
    assert!(checked >= 3 * 10, "checked {checked}");
}

#[test]
fn side_network_gradients_match_finite_differences() {
    grads_match(LstConfig { reduction: 2, ..LstConfig::default() });
}

#[test]
fn side_network_gradients_with_a_dropped_layer() {
    let c = LstConfig { reduction: 2, drop_layers: vec![0], gate_temperature: 0.5, heads: None, dropout: 0.0 };
    assert_eq!(c.states(2), vec![0, 2]);
    grads_match(c);
}

/// The paper's pruning written independently: an index is kept when fewer than `keep` others rank above it
/// (larger L1 norm, or an equal norm and a lower index).
#[test]
fn dropout_acts_in_training_graphs_only() {
    let d = dev();
    let cfg = LstConfig { dropout: 0.5, ..LstConfig::default() };
    let (st, spec) = tiny_lst(LstConfig { reduction: 2, ..cfg });
    common::perturb(d, &st);
    let loss = |se: &mut lst::SideExec| {
        feed_random(se, &spec);
        se.exec.forward(d).unwrap();
        se.exec.read(d, se.loss).unwrap()[0]
    };
    let optim = || Some(OptimConfig::adamw(0.0, 0.0));
    let mut train = lst::build_side_exec(d, &st, &spec, B, T, optim(), None).unwrap();
    let mut eval = lst::build_side_exec(d, &st, &spec, B, T, None, None).unwrap();
    let plain = LstSpec { cfg: LstConfig { dropout: 0.0, ..spec.cfg.clone() }, ..spec.clone() };
    let mut undropped = lst::build_side_exec(d, &st, &plain, B, T, optim(), None).unwrap();
    let (e1, e2, p) = (loss(&mut eval), loss(&mut eval), loss(&mut undropped));
    assert_eq!(e1.to_bits(), e2.to_bits(), "evaluation is deterministic");
    assert_eq!(e1.to_bits(), p.to_bits(), "the evaluation graph has no dropout: {e1} vs {p}");
    let t = loss(&mut train);
    assert!((t - e1).abs() > 1e-4, "the training graph drops: {t} vs {e1}");
    let e = LstConfig { dropout: 1.0, ..LstConfig::default() }.validate(2).unwrap_err().to_string();
    assert!(e.starts_with("dropout"), "{e}");
    let e = LstConfig { heads: Some(5), ..LstConfig::default() }.dims(&common::tiny_cfg()).unwrap_err().to_string();
    assert!(e.starts_with("heads"), "{e}");
}

fn kept_ref(w: &[f32], rows: usize, cols: usize, keep: usize, by_rows: bool) -> Vec<usize> {
    let n = if by_rows { rows } else { cols };
    let norm = |i: usize| -> f64 {
        let mut s = 0f64;
        for k in 0..if by_rows { cols } else { rows } {
            s += if by_rows { w[i * cols + k] } else { w[k * cols + i] }.abs() as f64;
        }
        s
    };
    (0..n).filter(|&i| (0..n).filter(|&j| norm(j) > norm(i) || (norm(j) == norm(i) && j < i)).count() < keep).collect()
}

#[test]
fn pruned_init_matches_a_plain_reference() {
    let d = dev();
    let (st, spec) = tiny_lst(LstConfig { reduction: 2, ..LstConfig::default() });
    let frozen = tiny_store(d);
    let get = |n: &str| frozen.read_f32(d, frozen.id(&format!("encoder.layer.1.{n}")).unwrap()).unwrap();
    let (h, f, s, fi) = (8, 12, 4, 6);
    let side = |n: &str| st.read_f32(d, st.id(&format!("lst.layer.1.{n}")).unwrap()).unwrap();
    let mut rows_of = std::collections::HashMap::new();
    for (m, out_f, in_f, ko, ki) in [
        ("attention.self.query", h, h, s, s),
        ("attention.self.key", h, h, s, s),
        ("attention.self.value", h, h, s, s),
        ("attention.output.dense", h, h, s, s),
        ("intermediate.dense", f, h, fi, s),
        ("output.dense", h, f, s, fi),
    ] {
        let w = get(&format!("{m}.weight"));
        let b = get(&format!("{m}.bias"));
        let rows = kept_ref(&w, out_f, in_f, ko, true);
        let cols = kept_ref(&w, out_f, in_f, ki, false);
        assert_eq!((rows.len(), cols.len()), (ko, ki));
        let mut want = vec![];
        for &r in &rows {
            for &c in &cols {
                want.push(w[r * in_f + c]);
            }
        }
        assert_eq!(side(&format!("{m}.weight")), want, "{m}.weight");
        assert_eq!(side(&format!("{m}.bias")), rows.iter().map(|&r| b[r]).collect::<Vec<_>>(), "{m}.bias");
        rows_of.insert(m, rows);
    }
    for (ln, dense) in [("attention.output.LayerNorm", "attention.output.dense"), ("output.LayerNorm", "output.dense")]
    {
        for part in ["weight", "bias"] {
            let v = get(&format!("{ln}.{part}"));
            let want: Vec<f32> = rows_of[dense].iter().map(|&r| v[r]).collect();
            assert_eq!(side(&format!("{ln}.{part}")), want, "{ln}.{part}");
        }
    }
    // The gates start at α = 0 (μ = 1/2) and the upsampler at zero.
    assert_eq!(st.read_f32(d, st.id("lst.gate.0").unwrap()).unwrap(), vec![0.0]);
    assert!(st.read_f32(d, st.id("lst.up.weight").unwrap()).unwrap().iter().all(|&x| x == 0.0));
    assert_eq!(spec.dims.side, 4);
}

#[test]
fn bad_settings_name_their_field() {
    let c = tiny_cfg(); // width 8, 2 heads, 2 layers
    let e = LstConfig { reduction: 3, ..LstConfig::default() }.dims(&c).unwrap_err().to_string();
    assert!(e.starts_with("reduction 3: the model's width 8"), "{e}");
    let e = LstConfig { reduction: 8, ..LstConfig::default() }.dims(&c).unwrap_err().to_string();
    assert!(e.starts_with("reduction 8") && e.contains("2 attention heads"), "{e}");
    let e = LstConfig { drop_layers: vec![2], ..LstConfig::default() }.validate(2).unwrap_err().to_string();
    assert!(e.starts_with("drop_layers has layer 2"), "{e}");
    let e = LstConfig { gate_temperature: 0.0, ..LstConfig::default() }.validate(2).unwrap_err().to_string();
    assert!(e.starts_with("gate_temperature"), "{e}");
}

// ---- on the real MiniLM ----

fn model() -> Option<std::path::PathBuf> {
    match rime_io::locate_model("all-minilm-l6-v2") {
        Ok(p) => Some(p),
        Err(_) => {
            eprintln!("SKIPPED: all-minilm-l6-v2 not found, run scripts/fetch-models.sh");
            None
        }
    }
}

/// Texts of varied lengths (so batches mix buckets and padding).
fn data(n: usize, salt: &str) -> TextClassData {
    let (mut texts, mut labels) = (vec![], vec![]);
    for i in 0..n {
        let good = i % 2 == 0;
        let extra = " really".repeat(i % 7);
        texts.push(if good {
            format!("lovely{extra} fresh tasty snack {salt}{i}")
        } else {
            format!("stale{extra} broken bag {salt}{i}")
        });
        labels.push(if good { "pos" } else { "neg" }.to_string());
    }
    TextClassData::new(texts, labels)
}

fn cfg() -> TrainConfig {
    TrainConfig { batch_size: 8, max_length: 40, epochs: 2, lr: 3e-3, save_every: 0, ..TrainConfig::default() }
}

fn tmp(name: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("rime-lst-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

fn run(
    model: &std::path::Path,
    cache: FeatureCache,
    train: TextClassData,
) -> rime_peft::Result<rime_peft::TrainResult<rime_peft::ClassifySummary>> {
    let mut task = LstTask::new(dev(), model, LstConfig::default(), train, Some(data(12, "e"))).with_cache(cache);
    rime_peft::train(&mut task, &cfg(), None, &mut |_| {})
}

fn losses(r: &rime_peft::TrainResult<rime_peft::ClassifySummary>) -> Vec<u32> {
    r.log.iter().filter_map(|v| v["loss"].as_f64()).map(|l| (l as f32).to_bits()).collect()
}

#[test]
fn cache_training_is_bitwise_the_recompute_training() {
    let Some(m) = model() else { return };
    let dir = tmp("cache");
    let mem = run(&m, FeatureCache::Memory, data(24, "t")).unwrap();
    let off = run(&m, FeatureCache::Off, data(24, "t")).unwrap();
    let file = run(&m, FeatureCache::Dir(dir.clone()), data(24, "t")).unwrap();
    let again = run(&m, FeatureCache::Dir(dir.clone()), data(24, "t")).unwrap(); // reuses the files
    assert!(dir.join("meta.json").is_file() && dir.join("train.f16").is_file());
    let l = losses(&off);
    assert_eq!(l.len(), 6, "3 steps × 2 epochs");
    for (name, r) in [("memory", &mem), ("file", &file), ("file reused", &again)] {
        assert_eq!(losses(r), l, "{name}: losses differ from the recompute run");
        assert_eq!(r.adapter.tensors.len(), off.adapter.tensors.len());
        for (a, b) in r.adapter.tensors.iter().zip(&off.adapter.tensors) {
            assert_eq!(a.name, b.name);
            let same = a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{name}: adapter tensor {} differs from the recompute run", a.name);
        }
        assert_eq!(r.summary.eval_loss.to_bits(), off.summary.eval_loss.to_bits(), "{name}: eval loss");
    }
    assert!(off.adapter.tensors.iter().any(|t| t.name.contains("lst.layer.0.attention.self.query.weight")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cache_of_another_dataset_or_model_is_refused() {
    let Some(m) = model() else { return };
    let dir = tmp("refuse");
    run(&m, FeatureCache::Dir(dir.clone()), data(16, "a")).unwrap();
    let e = run(&m, FeatureCache::Dir(dir.clone()), data(16, "b")).unwrap_err().to_string();
    assert!(e.contains("another training set") && e.contains("not reused"), "{e}");
    // The same weights and tokenizer with another config.json: another model.
    let other = tmp("model");
    std::fs::create_dir_all(&other).unwrap();
    for f in std::fs::read_dir(&m).unwrap() {
        let p = f.unwrap().path();
        let name = p.file_name().unwrap().to_owned();
        if name == "config.json" {
            let mut text = std::fs::read_to_string(&p).unwrap();
            text.push('\n');
            std::fs::write(other.join(&name), text).unwrap();
        } else {
            std::os::unix::fs::symlink(&p, other.join(&name)).unwrap();
        }
    }
    let e = run(&other, FeatureCache::Dir(dir.clone()), data(16, "a")).unwrap_err().to_string();
    assert!(e.contains("another model"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&other);
}

#[test]
fn saved_adapter_evaluates_as_in_training() {
    let Some(m) = model() else { return };
    let r = run(&m, FeatureCache::Memory, data(24, "t")).unwrap();
    let out = tmp("saved");
    r.save(&out).unwrap();
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("best/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["peft_type"], "RIME_LST");
    assert_eq!(cfg_json["lst_reduction"], 8);
    assert_eq!(cfg_json["lst_side_hidden"], 48);
    let ev = Evaluator::new(dev(), &m, cfg().batch_size, cfg().max_length).unwrap();
    let got = ev.evaluate(&out.join("best"), &data(12, "e")).unwrap();
    println!("in training {:?}, from the saved adapter {got:?}", r.summary);
    assert_eq!(got.accuracy, r.summary.eval_accuracy);
    assert!((got.loss - r.summary.eval_loss).abs() < 1e-6, "{} vs {}", got.loss, r.summary.eval_loss);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn probe_and_baseline_read_an_lst_cache() {
    let Some(m) = model() else { return };
    let dir = tmp("probe");
    run(&m, FeatureCache::Dir(dir.clone()), data(16, "p")).unwrap();
    let mut infos = vec![];
    let mut task =
        LstTask::probe(dev(), &m, data(16, "p"), Some(data(12, "e"))).with_cache(FeatureCache::Dir(dir.clone()));
    let r = rime_peft::train(&mut task, &cfg(), None, &mut |e| {
        if let rime_peft::Event::Info(s) = e {
            infos.push(s)
        }
    })
    .unwrap();
    assert!(infos.iter().any(|s| s.contains("reused (fingerprint matches)")), "{infos:?}");
    assert_eq!(r.adapter.config.peft_type, "RIME_PROBE");
    assert_eq!(r.adapter.tensors.len(), 2, "the head alone");
    let plain = rime_peft::classify::probe_baseline(dev(), &m, &data(16, "p"), Some(&data(12, "e")), &cfg()).unwrap();
    let cached = lst::probe_baseline_cached(
        dev(),
        &m,
        &data(16, "p"),
        Some(&data(12, "e")),
        &cfg(),
        &FeatureCache::Dir(dir.clone()),
    )
    .unwrap();
    println!("baseline plain {plain:?}, from the cache {cached:?}");
    // The same features up to f16 rounding of the last state.
    assert!((plain.loss - cached.loss).abs() < 1e-2, "{} vs {}", plain.loss, cached.loss);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The executors' memory reports at the main job's largest graph (32 rows of 128 tokens): LST (side network
/// on cached states: the states are inputs) against LoRA r=8 on query and value (the main job's method).
#[test]
fn memory_at_the_main_jobs_largest_graph() {
    let Some(m) = model() else { return };
    let d = dev();
    let (mut store, bcfg, prefix, _) = rime_peft::classify::open_model(d, &m, 128).unwrap();
    rime_peft::classifier::init_head(d, &mut store, bcfg.hidden, 2, 0).unwrap();
    let lora = rime_peft::classifier::Method::Lora(rime_peft::lora::LoraConfig::default());
    rime_peft::classifier::prepare_method(d, &mut store, &lora).unwrap();
    let hook = rime_peft::classifier::hook_for(&lora);
    let optim = Some(OptimConfig::adamw(1e-3, 0.01));
    let se =
        rime_peft::classifier::build_exec(d, &store, &bcfg, &prefix, hook.as_ref(), 32, 128, optim.clone()).unwrap();
    let lo = se.exec.memory_report().clone();
    drop(se);
    let spec = LstSpec::new(LstConfig::default(), &bcfg, &prefix).unwrap();
    let ck = rime_io::Checkpoint::open(&m).unwrap();
    let mut get = |n: &str| -> rime_peft::Result<Vec<f32>> { Ok(ck.get_f32(&format!("{prefix}{n}"))?) };
    lst::add_parameters(d, &mut store, &mut get, &bcfg, &spec, 0).unwrap();
    let side = lst::build_side_exec(d, &store, &spec, 32, 128, optim, None).unwrap();
    let ls = side.exec.memory_report().clone();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "B32 T128: LoRA activation peak {:.1} MiB, inputs {:.2} MiB, frozen weights {:.1} MiB; LST activation peak \
         {:.1} MiB, inputs (cached states) {:.1} MiB, frozen {:.3} MiB; LST (activations + inputs) / LoRA activations \
         = {:.3}",
        mib(lo.activation_peak),
        mib(lo.inputs),
        mib(lo.frozen_weights),
        mib(ls.activation_peak),
        mib(ls.inputs),
        mib(ls.frozen_weights),
        (ls.activation_peak + ls.inputs) as f64 / lo.activation_peak as f64
    );
    assert!(ls.activation_peak < lo.activation_peak);
    // The layer-dropping variant the README's tables measure (--lst-drop-layers 0,2,4), in a store of its own.
    let (mut store2, ..) = rime_peft::classify::open_model(d, &m, 128).unwrap();
    rime_peft::classifier::init_head(d, &mut store2, bcfg.hidden, 2, 0).unwrap();
    let drop = LstSpec::new(LstConfig { drop_layers: vec![0, 2, 4], ..LstConfig::default() }, &bcfg, &prefix).unwrap();
    lst::add_parameters(d, &mut store2, &mut get, &bcfg, &drop, 0).unwrap();
    let side = lst::build_side_exec(d, &store2, &drop, 32, 128, Some(OptimConfig::adamw(1e-3, 0.01)), None).unwrap();
    let ld = side.exec.memory_report().clone();
    println!(
        "B32 T128, --lst-drop-layers 0,2,4: LST activation peak {:.1} MiB, inputs (cached states) {:.1} MiB; \
         (activations + inputs) / LoRA activations = {:.3}",
        mib(ld.activation_peak),
        mib(ld.inputs),
        (ld.activation_peak + ld.inputs) as f64 / lo.activation_peak as f64
    );
    assert!(ld.activation_peak < ls.activation_peak && ld.inputs < ls.inputs);
}

#[test]
fn an_interrupted_run_resumes_with_its_cache_to_the_straight_runs_adapter() {
    let Some(m) = model() else { return };
    let straight = run(&m, FeatureCache::Memory, data(24, "t")).unwrap();
    let out = tmp("resume");
    let task = || {
        LstTask::new(dev(), &m, LstConfig::default(), data(24, "t"), Some(data(12, "e")))
            .with_cache(FeatureCache::Dir(out.join("feature_cache")))
    };
    // Stopped after the first epoch (its checkpoint written), then resumed for both.
    let first = TrainConfig { max_steps: Some(3), ..cfg() };
    rime_peft::train(&mut task(), &first, Some(&out), &mut |_| {}).unwrap();
    let mut infos = vec![];
    let resumed = rime_peft::train(&mut task(), &TrainConfig { resume: true, ..cfg() }, Some(&out), &mut |e| {
        if let rime_peft::Event::Info(s) = e {
            infos.push(s)
        }
    })
    .unwrap();
    assert!(infos.iter().any(|s| s.contains("reused (fingerprint matches)")), "{infos:?}");
    assert!(infos.iter().any(|s| s.contains("resumed from")), "{infos:?}");
    assert_eq!(losses(&resumed), losses(&straight));
    for (a, b) in resumed.adapter.tensors.iter().zip(&straight.adapter.tensors) {
        assert!(a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits()), "{} differs", a.name);
    }
    let _ = std::fs::remove_dir_all(&out);
}
