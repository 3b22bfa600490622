//! The embedding task: the MNRL + Matryoshka loss graph against a plain-Rust reference (value), its gradients
//! against central finite differences, a short batch's loss equal to the unpadded loss, retrieval metrics on
//! a hand-made case, bad input (dims, weights, empty sides, too few rows, probe), and a tiny training run on
//! the real MiniLM (SKIPPED without it) whose adapter records FEATURE_EXTRACTION and the dims.

mod common;

use common::{dev, rnd};
use rand::{Rng, SeedableRng};
use rime_graph::{Executor, Graph, OptimConfig, ParamStore, Var};
use rime_peft::classifier::Method;
use rime_peft::embedding::{self, LossFeeds, MatryoshkaConfig, PairColumns, PairData};
use rime_peft::lora::{LoraConfig, LoraInit};
use rime_peft::{EmbedTask, Error, TrainConfig};

/// MNRL + Matryoshka as sentence-transformers computes it, in f64: rows [anchors; positives; negatives] of
/// `x` ([k·n, h]), for each dim the first d values scaled to unit length, scores 20·cos(anchor i, candidate j)
/// over the candidates [positives; negatives], cross-entropy with target i, mean over anchors, Σ w_d · loss_d.
fn reference_loss(x: &[f32], h: usize, n: usize, k: usize, dims: &[usize], weights: &[f32]) -> f64 {
    let row = |r: usize, d: usize| -> Vec<f64> {
        let v: Vec<f64> = x[r * h..r * h + d].iter().map(|&a| a as f64).collect();
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
        v.iter().map(|a| a / norm).collect()
    };
    let mut total = 0.0;
    for (&d, &w) in dims.iter().zip(weights) {
        let mut loss = 0.0;
        for i in 0..n {
            let a = row(i, d);
            let scores: Vec<f64> =
                (n..k * n).map(|j| 20.0 * a.iter().zip(row(j, d)).map(|(p, q)| p * q).sum::<f64>()).collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + scores.iter().map(|s| (s - m).exp()).sum::<f64>().ln();
            loss += lse - scores[i];
        }
        total += w as f64 * loss / n as f64;
    }
    total
}

/// A loss graph over a trainable [k·b, h] "pooled" tensor; returns (executor, store, loss).
fn loss_exec(x: &[f32], h: usize, b: usize, k: usize, dims: &[usize], weights: &[f32]) -> (Executor, ParamStore, Var) {
    let d = dev();
    let mut store = ParamStore::new();
    store.add_f32(d, "pooled", x, &[k * b, h], true).unwrap();
    embedding::add_loss_constants(d, &mut store, h, dims).unwrap();
    let mut g = Graph::new();
    let p = g.param(&store, "pooled").unwrap();
    let loss = embedding::loss_graph(&mut g, &store, p, b, k, dims, weights).unwrap();
    let ex = Executor::new(d, g, &store, Some(loss), &[], Some(OptimConfig::adamw(0.0, 0.0))).unwrap();
    (ex, store, loss)
}

fn run_loss(ex: &mut Executor, loss: Var, n: usize, b: usize, k: usize) -> f32 {
    let d = dev();
    LossFeeds::new(n, b, k).feed(d, ex).unwrap();
    ex.forward(d).unwrap();
    ex.read(d, loss).unwrap()[0]
}

/// Rows of `n` real examples laid out in a graph of `b` rows per block; the padding rows hold `pad` values.
fn padded(real: &[f32], h: usize, n: usize, b: usize, k: usize, pad: &[f32]) -> Vec<f32> {
    let mut out = vec![];
    for blk in 0..k {
        out.extend_from_slice(&real[blk * n * h..(blk + 1) * n * h]);
        out.extend_from_slice(&pad[blk * (b - n) * h..(blk + 1) * (b - n) * h]);
    }
    out
}

#[test]
fn loss_matches_the_reference_with_and_without_negatives() {
    let h = 16;
    for (k, dims, weights) in [(2, vec![16], vec![1.0]), (3, vec![4, 8, 16], vec![1.0, 0.5, 2.0])] {
        let b = 5;
        let x = rnd(7 + k as u64, k * b * h, 1.0);
        let (mut ex, _, loss) = loss_exec(&x, h, b, k, &dims, &weights);
        let got = run_loss(&mut ex, loss, b, b, k) as f64;
        let want = reference_loss(&x, h, b, k, &dims, &weights);
        assert!(
            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
            "k={k} dims {dims:?}: graph {got} vs reference {want}"
        );
    }
}

#[test]
fn a_short_batch_gives_the_unpadded_loss_and_gradients() {
    let (h, k, n, b) = (8, 3, 3, 5);
    let dims = [2, 8];
    let weights = [1.0, 1.0];
    let real = rnd(11, k * n * h, 1.0);
    // Padding rows: zeros as the encoder gives them, and junk (the masks must keep it out either way).
    for pad in [vec![0.0; k * (b - n) * h], rnd(12, k * (b - n) * h, 3.0)] {
        let x = padded(&real, h, n, b, k, &pad);
        let (mut ex, store, loss) = loss_exec(&x, h, b, k, &dims, &weights);
        let short = run_loss(&mut ex, loss, n, b, k) as f64;
        let want = reference_loss(&real, h, n, k, &dims, &weights);
        assert!((short - want).abs() <= 1e-5 * want.abs().max(1.0), "short batch {short} vs unpadded {want}");
        let (mut ex2, store2, loss2) = loss_exec(&real, h, n, k, &dims, &weights);
        let exact = run_loss(&mut ex2, loss2, n, n, k) as f64;
        assert!((short - exact).abs() <= 1e-5 * exact.abs().max(1.0), "padded {short} vs exact graph {exact}");
        // Gradients of the real rows agree; the padding rows get none.
        let d = dev();
        ex.backward_only(d).unwrap();
        ex2.backward_only(d).unwrap();
        let g = ex.read_param_grad(d, store.id("pooled").unwrap()).unwrap();
        let g2 = ex2.read_param_grad(d, store2.id("pooled").unwrap()).unwrap();
        let zeros = vec![0.0; k * (b - n) * h];
        let want_g = padded(&g2, h, n, b, k, &zeros);
        for (i, (a, w)) in g.iter().zip(&want_g).enumerate() {
            assert!((a - w).abs() <= 1e-5 + 1e-3 * w.abs(), "grad[{i}]: padded {a} vs exact {w}");
        }
    }
}

/// The executor's gradient of every trainable parameter against central differences of the GPU loss.
fn check_grads(ex: &mut Executor, store: &ParamStore, loss: Var, probes: usize, seed: u64) {
    let d = dev();
    ex.backward_only(d).unwrap();
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    for (id, p) in store.trainable() {
        let g = ex.read_param_grad(d, id).unwrap();
        let mut w = store.read_f32(d, id).unwrap();
        for _ in 0..probes {
            let i = r.random_range(0..w.len());
            let orig = w[i];
            let eps = 1e-2f32;
            let mut at = |v: f32| {
                w[i] = v;
                d.write_f32(&p.tensor, &w).unwrap();
                ex.forward(d).unwrap();
                ex.read(d, loss).unwrap()[0] as f64
            };
            let (up, down) = (at(orig + eps), at(orig - eps));
            w[i] = orig;
            d.write_f32(&p.tensor, &w).unwrap();
            let fd = ((up - down) / (2.0 * eps as f64)) as f32;
            let tol = 2e-3 + 0.03 * fd.abs().max(g[i].abs());
            assert!((fd - g[i]).abs() <= tol, "{}[{i}]: autodiff {} vs finite difference {fd}", p.name, g[i]);
        }
    }
}

#[test]
fn loss_gradients_match_finite_differences() {
    let (h, k, b) = (8, 3, 4);
    let dims = [2, 4, 8];
    let weights = [1.0, 0.5, 2.0];
    for n in [4, 3] {
        let x = rnd(21 + n as u64, k * b * h, 1.0);
        let (mut ex, store, loss) = loss_exec(&x, h, b, k, &dims, &weights);
        LossFeeds::new(n, b, k).feed(dev(), &ex).unwrap();
        check_grads(&mut ex, &store, loss, 24, 5);
    }
}

#[test]
fn retrieval_metrics_on_a_hand_made_case() {
    // 2-d embeddings (the second value only counts at dim 2). Corpus: c0 = (1, 0), c1 = (0, 1), c2 = (1, 1).
    let corpus = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
    // q0 → c0: ranks first at dim 2 (cos 1 vs 0.707); q1 → c1 = (0, 1): at dim 2 it ranks first; q2 → c1 but
    // it is (1, 0.1): c0 and c2 score higher, rank 2.
    let queries = [2.0, 0.0, 0.0, 3.0, 1.0, 0.1];
    let gold = [0, 1, 1];
    let m = embedding::retrieval_metrics(&queries, &corpus, 2, &gold, &[1, 2]);
    // dim 1: values (1), (0), (1); c1's first value is 0 → normalized to 0. q0 = 1: c0 1, c1 0, c2 1 → c0 ties
    // with c2 (not strictly higher) → rank 0. q1 = 0 → all scores 0 → rank 0. q2 = 1 → c1 0 < c0, c2 → rank 2.
    assert_eq!(m[0].dim, 1);
    assert!((m[0].recall_at_1 - 2.0 / 3.0).abs() < 1e-12);
    assert!((m[0].recall_at_10 - 1.0).abs() < 1e-12);
    assert!((m[0].mrr - (1.0 + 1.0 + 1.0 / 3.0) / 3.0).abs() < 1e-12);
    assert_eq!(m[1].dim, 2);
    assert!((m[1].recall_at_1 - 2.0 / 3.0).abs() < 1e-12);
    assert!((m[1].mrr - (1.0 + 1.0 + 1.0 / 3.0) / 3.0).abs() < 1e-12);
    // recall@10 needs more than 10 corpus rows to differ from 1: 12 rows, the answer last by score.
    let h = 1;
    let corpus: Vec<f32> = (0..12).map(|i| if i == 11 { -1.0 } else { 1.0 }).collect();
    let m = embedding::retrieval_metrics(&[1.0], &corpus, h, &[11], &[1]);
    assert_eq!((m[0].recall_at_1, m[0].recall_at_10), (0.0, 0.0));
    assert!((m[0].mrr - 1.0 / 12.0).abs() < 1e-12);
    // The retrieval set: distinct positives in first-occurrence order.
    let data = PairData::new(vec!["a".into(), "b".into(), "c".into()], vec!["x".into(), "y".into(), "x".into()]);
    let (q, c, gold) = embedding::retrieval_set(&data);
    assert_eq!((q.len(), c, gold), (3, vec!["x".to_string(), "y".into()], vec![0, 1, 0]));
}

#[test]
fn matryoshka_dims_and_weights_are_checked() {
    let field = |m: MatryoshkaConfig| match m.resolve(384) {
        Err(Error::Invalid { field, message }) => (field, message),
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(MatryoshkaConfig::default().resolve(384).unwrap(), (vec![384], vec![1.0]));
    assert_eq!(MatryoshkaConfig::dims(vec![32, 384]).resolve(384).unwrap(), (vec![32, 384], vec![1.0, 1.0]));
    let (f, m) = field(MatryoshkaConfig::dims(vec![64, 32]));
    assert_eq!(f, "matryoshka_dims");
    assert!(m.contains("64,32") && m.contains("strictly increasing"), "{m}");
    let (f, m) = field(MatryoshkaConfig::dims(vec![32, 512]));
    assert!(f == "matryoshka_dims" && m.contains("512") && m.contains("384"), "{m}");
    assert_eq!(field(MatryoshkaConfig::dims(vec![0, 8])).0, "matryoshka_dims");
    assert_eq!(field(MatryoshkaConfig::dims(vec![32, 32])).0, "matryoshka_dims");
    let w = |w: Vec<f32>| MatryoshkaConfig { dims: vec![32, 64], weights: w };
    assert_eq!(field(w(vec![1.0])).0, "matryoshka_weights");
    assert_eq!(field(w(vec![1.0, -1.0])).0, "matryoshka_weights");
    assert_eq!(field(w(vec![0.0, 0.0])).0, "matryoshka_weights");
    assert_eq!(field(w(vec![f32::NAN, 1.0])).0, "matryoshka_weights");
    assert_eq!(embedding::eval_dims(&[48, 384], 384), vec![32, 48, 64, 128, 256, 384]);
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("rime-embed-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn pair_files_name_the_file_and_line_of_bad_rows() {
    let dir = tmp("pairs");
    let f = dir.join("p.jsonl");
    std::fs::write(
        &f,
        "{\"anchor\": \"a\", \"positive\": \"b\", \"negative\": \"c\"}\n\n{\"anchor\": \"a2\", \"positive\": \"  \", \"negative\": \"c2\"}\n",
    )
    .unwrap();
    let e = PairData::from_file(&f, &PairColumns::default()).unwrap_err().to_string();
    assert!(e.contains("p.jsonl: line 3") && e.contains("`positive`"), "{e}");
    std::fs::write(&f, "{\"anchor\": \"a\", \"pos\": \"b\"}\n").unwrap();
    let e = PairData::from_file(&f, &PairColumns::default()).unwrap_err().to_string();
    assert!(e.contains("p.jsonl") && e.contains("line 1") && e.contains("positive"), "{e}");
    // Without a negative column the pairs have none; CSV with other names works too.
    let c = dir.join("p.csv");
    std::fs::write(&c, "q,d\nhello,world\nfoo,bar\n").unwrap();
    let cols = PairColumns { anchor: "q".into(), positive: "d".into(), negative: Some("negative".into()) };
    let p = PairData::from_file(&c, &cols).unwrap();
    assert_eq!((p.len(), p.has_negatives()), (2, false));
    std::fs::write(&c, "q,d,n\nhello,world,x\nfoo,bar,\n").unwrap();
    let cols = PairColumns { negative: Some("n".into()), ..cols };
    let e = PairData::from_file(&c, &cols).unwrap_err().to_string();
    assert!(e.contains("p.csv: line 3") && e.contains("`n`"), "{e}");
    // In memory: counts and empty sides, checked when training starts.
    let m = PairData::new(vec!["a".into(), "".into()], vec!["b".into(), "c".into()]);
    let e = m.check("train").unwrap_err().to_string();
    assert!(e.contains("row 2") && e.contains("anchor"), "{e}");
    let m = PairData::new(vec!["a".into()], vec!["b".into(), "c".into()]);
    assert!(matches!(m.check("train"), Err(Error::Invalid { field: "train", .. })));
    std::fs::remove_dir_all(&dir).ok();
}

fn lora() -> Method {
    Method::Lora(LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec!["query".into(), "value".into()],
        rslora: false,
        init: LoraInit::Kaiming,
        seed: 0,
        dropout: 0.0,
        dora: false,
    })
}

fn pairs(n: usize) -> PairData {
    let a = (0..n).map(|i| format!("anchor sentence {i}")).collect();
    let p = (0..n).map(|i| format!("positive sentence {i}")).collect();
    PairData::new(a, p)
}

#[test]
fn too_few_rows_for_the_batch_probe_and_lst_are_refused_before_loading() {
    // The model path does not exist: these refusals come first.
    let cfg = TrainConfig { batch_size: 16, ..TrainConfig::default() };
    let mut t = EmbedTask::new(dev(), "/nonexistent-model", lora(), pairs(10), Some(pairs(4)));
    match rime_peft::train(&mut t, &cfg, None, &mut |_| {}) {
        Err(Error::Invalid { field: "batch_size", message }) => {
            assert!(message.contains("16") && message.contains("10 training pairs"), "{message}")
        }
        other => panic!("expected a batch_size refusal, got {:?}", other.err()),
    }
    let mut t = EmbedTask::new(dev(), "/nonexistent-model", Method::Probe, pairs(40), None);
    match rime_peft::train(&mut t, &cfg, None, &mut |_| {}) {
        Err(Error::Invalid { field: "method", message }) => assert!(message.contains("probe"), "{message}"),
        other => panic!("expected a method refusal, got {:?}", other.err()),
    }
    // Ladder side-tuning is not built by EmbedTask (LstEmbedTask trains it): refused before anything loads, not
    // trained as a no-op.
    let lst = Method::Lst(rime_peft::lst::LstConfig::default());
    let mut t = EmbedTask::new(dev(), "/nonexistent-model", lst, pairs(40), None);
    match rime_peft::train(&mut t, &cfg, None, &mut |_| {}) {
        Err(Error::Invalid { field: "method", message }) => {
            assert!(message.contains("lst") && message.contains("LstEmbedTask"), "{message}")
        }
        other => panic!("expected a method refusal, got {:?}", other.err()),
    }
    let cfg = TrainConfig { batch_size: 4, micro_batch_size: Some(2), ..TrainConfig::default() };
    let mut t = EmbedTask::new(dev(), "/nonexistent-model", lora(), pairs(10), None);
    assert!(matches!(
        rime_peft::train(&mut t, &cfg, None, &mut |_| {}),
        Err(Error::Invalid { field: "micro_batch_size", .. })
    ));
}

fn model() -> Option<std::path::PathBuf> {
    match rime_io::locate_model("all-minilm-l6-v2") {
        Ok(p) => Some(p),
        Err(_) => {
            eprintln!("\n!!!!!!!! SKIPPED: all-minilm-l6-v2 not found, run scripts/fetch-models.sh !!!!!!!!\n");
            None
        }
    }
}

fn snli(n: usize, file: &str) -> PairData {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/snli_demo").join(file);
    let d = PairData::from_file(&p, &PairColumns::default()).unwrap();
    let idx: Vec<usize> = (0..n).collect();
    PairData::new(
        idx.iter().map(|&i| d.anchors[i].clone()).collect(),
        idx.iter().map(|&i| d.positives[i].clone()).collect(),
    )
    .with_negatives(idx.iter().map(|&i| d.negatives.as_ref().unwrap()[i].clone()).collect())
}

#[test]
fn minilm_trains_embeddings_and_saves_a_feature_extraction_adapter() {
    let Some(m) = model() else { return };
    let d = dev();
    // One batch of 8 SNLI triplets seen 4 times: the loss on it falls.
    let train = snli(8, "train.jsonl");
    let eval = snli(16, "test.jsonl");
    let cfg = TrainConfig { epochs: 4, batch_size: 8, max_length: 32, lr: 5e-3, ..TrainConfig::default() };
    let mut task = EmbedTask::new(d, &m, lora(), train, Some(eval.clone()))
        .with_matryoshka(MatryoshkaConfig::dims(vec![32, 128, 384]));
    let out = tmp("minilm");
    let dir = out.join("run");
    let r = rime_peft::train(&mut task, &cfg, Some(&dir), &mut |_| {}).unwrap();
    let losses: Vec<f64> = r.log.iter().filter_map(|v| v["loss"].as_f64()).collect();
    assert_eq!(losses.len(), 4);
    assert!(losses[3] < losses[0], "loss did not fall: {losses:?}");
    let s = &r.summary;
    assert!(s.eval_mrr.is_finite() && s.eval_mrr > 0.0, "{s:?}");
    assert_eq!(s.retrieval.iter().map(|x| x.dim).collect::<Vec<_>>(), vec![32, 64, 128, 256, 384]);
    assert!(s.hard_negatives && s.eval_queries == 16);
    assert!(r.log.iter().any(|v| v["eval_recall@1@32"].is_number() && v["eval_mrr"].is_number()));
    // The adapter: peft layout, no head, FEATURE_EXTRACTION, the dims.
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("best/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["task_type"], "FEATURE_EXTRACTION");
    assert_eq!(cfg_json["peft_type"], "LORA");
    // rime's own keys sit in rime.json beside it (peft's config classes refuse unknown keys).
    let rime_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("best/rime.json")).unwrap()).unwrap();
    assert_eq!(rime_json[embedding::DIMS_FIELD], serde_json::json!([32, 128, 384]));
    let ad = rime_io::PeftAdapter::load(dir.join("best")).unwrap();
    assert_eq!(embedding::trained_dims(&ad.config), Some(vec![32, 128, 384]));
    assert!(cfg_json["modules_to_save"].as_array().is_none_or(|a| a.is_empty()), "{cfg_json}");
    assert!(
        ad.tensors.iter().all(|t| t.name.contains("lora_")),
        "{:?}",
        ad.tensors.iter().map(|t| &t.name).collect::<Vec<_>>()
    );
    // The saved adapter scores as the run's best evaluation; the frozen model differs from it.
    let saved = embedding::evaluate_retrieval(d, &m, Some(&dir.join("best")), &eval, &[], 24, 32).unwrap();
    for (a, b) in saved.iter().zip(&s.retrieval) {
        assert!((a.mrr - b.mrr).abs() < 1e-6, "dim {}: saved {} vs run {}", a.dim, a.mrr, b.mrr);
    }
    let frozen = embedding::evaluate_retrieval(d, &m, None, &eval, &[32, 384], 8, 32).unwrap();
    assert_eq!(frozen.len(), 2);
    assert!(frozen.iter().all(|x| x.mrr.is_finite() && x.mrr > 0.0));
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn an_embedding_run_resumed_from_its_checkpoint_ends_as_the_straight_run() {
    let Some(m) = model() else { return };
    let d = dev();
    let train = snli(8, "train.jsonl");
    let eval = snli(8, "test.jsonl");
    let out = tmp("resume");
    let run = |dir: &std::path::Path, epochs: usize, resume: bool| {
        let cfg = TrainConfig { epochs, batch_size: 4, max_length: 32, lr: 5e-3, resume, ..TrainConfig::default() };
        let mut task = EmbedTask::new(d, &m, lora(), train.clone(), Some(eval.clone()))
            .with_matryoshka(MatryoshkaConfig::dims(vec![64, 384]));
        rime_peft::train(&mut task, &cfg, Some(dir), &mut |_| {}).unwrap()
    };
    let straight = run(&out.join("straight"), 2, false);
    run(&out.join("resumed"), 1, false);
    let resumed = run(&out.join("resumed"), 2, true);
    assert_eq!(straight.summary.steps, 4);
    assert_eq!(resumed.summary.steps, 4);
    let (a, b) = (&straight.adapter.tensors, &resumed.adapter.tensors);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.name, y.name);
        let diff = x.data.iter().zip(&y.data).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-6, "{}: resumed differs from straight by {diff}", x.name);
    }
    assert_eq!(straight.summary.eval_mrr, resumed.summary.eval_mrr);
    std::fs::remove_dir_all(&out).ok();
}

// ---- ladder side-tuning for embeddings (rime_peft::lst_embed) ----

fn lst_run(
    m: &std::path::Path,
    cache: rime_peft::lst::FeatureCache,
    train: PairData,
    eval: PairData,
    cfg: &TrainConfig,
    dir: Option<&std::path::Path>,
) -> rime_peft::Result<rime_peft::TrainResult<rime_peft::EmbedSummary>> {
    let mut task =
        rime_peft::lst_embed::LstEmbedTask::new(dev(), m, rime_peft::lst::LstConfig::default(), train, Some(eval))
            .with_cache(cache)
            .with_matryoshka(MatryoshkaConfig::dims(vec![32, 384]));
    rime_peft::train(&mut task, cfg, dir, &mut |_| {})
}

#[test]
fn lst_trains_embeddings_on_the_side_network_and_saves_a_feature_extraction_adapter() {
    let Some(m) = model() else { return };
    let train = snli(8, "train.jsonl");
    // 64 held-out pairs: enough that retrieval is not perfect, so the comparisons below mean something.
    let eval = snli(64, "test.jsonl");
    let cfg = TrainConfig { epochs: 4, batch_size: 8, max_length: 32, lr: 5e-3, ..TrainConfig::default() };
    let out = tmp("lst-embed");
    let dir = out.join("run");
    let r = lst_run(&m, rime_peft::lst::FeatureCache::Memory, train, eval.clone(), &cfg, Some(&dir)).unwrap();
    let losses: Vec<f64> = r.log.iter().filter_map(|v| v["loss"].as_f64()).collect();
    assert_eq!(losses.len(), 4);
    assert!(losses[3] < losses[0], "loss did not fall: {losses:?}");
    let s = &r.summary;
    assert_eq!(s.method, "lst");
    assert!(s.eval_mrr.is_finite() && s.eval_mrr > 0.0 && s.eval_mrr < 1.0, "{s:?}");
    assert_eq!(s.retrieval.iter().map(|x| x.dim).collect::<Vec<_>>(), vec![32, 64, 128, 256, 384]);
    assert!(s.hard_negatives && s.eval_queries == 64);
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("best/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["task_type"], "FEATURE_EXTRACTION");
    assert_eq!(cfg_json["peft_type"], "RIME_LST");
    assert!(cfg_json["modules_to_save"].as_array().is_none_or(|a| a.is_empty()), "{cfg_json}");
    let ad = rime_io::PeftAdapter::load(dir.join("best")).unwrap();
    assert_eq!(embedding::trained_dims(&ad.config), Some(vec![32, 384]));
    let names: Vec<&String> = ad.tensors.iter().map(|t| &t.name).collect();
    assert!(names.iter().all(|n| n.contains("lst.")), "{names:?}");
    assert!(names.iter().any(|n| n.contains("lst.up.weight")), "{names:?}");
    // The zero-initialised upsampler moved: the side network changed the embedding.
    let up = ad.tensors.iter().find(|t| t.name.contains("lst.up.weight")).unwrap();
    assert!(up.data.iter().any(|&x| x != 0.0));
    // The saved adapter scores (through its side network) as the run's best evaluation, and not as the frozen
    // model does.
    let saved = embedding::evaluate_retrieval(dev(), &m, Some(&dir.join("best")), &eval, &[], 24, 32).unwrap();
    assert_eq!(saved.len(), s.retrieval.len());
    for (a, b) in saved.iter().zip(&s.retrieval) {
        assert!((a.mrr - b.mrr).abs() < 1e-6, "dim {}: saved {} vs run {}", a.dim, a.mrr, b.mrr);
    }
    let frozen = embedding::evaluate_retrieval(dev(), &m, None, &eval, &[], 24, 32).unwrap();
    assert!(frozen.iter().zip(&saved).any(|(f, a)| f.mrr != a.mrr), "{frozen:?} {saved:?}");
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn lst_embedding_cache_is_bitwise_the_recompute_and_another_datasets_cache_is_refused() {
    use rime_peft::lst::FeatureCache;
    let Some(m) = model() else { return };
    let train = snli(8, "train.jsonl");
    let eval = snli(8, "test.jsonl");
    let cfg = TrainConfig { epochs: 2, batch_size: 4, max_length: 32, lr: 5e-3, ..TrainConfig::default() };
    let out = tmp("lst-embed-cache");
    let cache = out.join("cache");
    let bits = |r: &rime_peft::TrainResult<rime_peft::EmbedSummary>| -> Vec<u32> {
        r.log.iter().filter_map(|v| v["loss"].as_f64()).map(|l| (l as f32).to_bits()).collect()
    };
    let off = lst_run(&m, FeatureCache::Off, train.clone(), eval.clone(), &cfg, None).unwrap();
    let mem = lst_run(&m, FeatureCache::Memory, train.clone(), eval.clone(), &cfg, None).unwrap();
    let file = lst_run(&m, FeatureCache::Dir(cache.clone()), train.clone(), eval.clone(), &cfg, None).unwrap();
    let again = lst_run(&m, FeatureCache::Dir(cache.clone()), train.clone(), eval.clone(), &cfg, None).unwrap();
    assert!(cache.join("meta.json").is_file() && cache.join("train.negative.f16").is_file());
    assert!(cache.join("eval.corpus.f16").is_file());
    let l = bits(&off);
    assert_eq!(l.len(), 4, "2 steps × 2 epochs");
    for (name, r) in [("memory", &mem), ("file", &file), ("file reused", &again)] {
        assert_eq!(bits(r), l, "{name}: losses differ from the recompute run");
        assert_eq!(r.adapter.tensors.len(), off.adapter.tensors.len());
        for (a, b) in r.adapter.tensors.iter().zip(&off.adapter.tensors) {
            assert_eq!(a.name, b.name);
            let same = a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{name}: adapter tensor {} differs from the recompute run", a.name);
        }
        assert_eq!(r.summary.eval_mrr.to_bits(), off.summary.eval_mrr.to_bits(), "{name}: eval MRR");
    }
    // Another training set in the same cache folder: refused, naming the set.
    let other = snli(8, "test.jsonl");
    let e = match lst_run(&m, FeatureCache::Dir(cache.clone()), other, eval.clone(), &cfg, None) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a cache of another training set was reused"),
    };
    assert!(e.contains("made for another data set (train.anchor)") && e.contains("not reused"), "{e}");
    std::fs::remove_dir_all(&out).ok();
}
