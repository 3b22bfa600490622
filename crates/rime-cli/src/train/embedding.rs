//! `rime train --task embedding`: contrastive fine-tuning for sentence embeddings (MNRL, optionally
//! Matryoshka), retrieval evaluation per dim, and the frozen model's scores beside them.

use std::path::{Path, PathBuf};

use rime::finetune::{self, Event, FeatureCache, MatryoshkaConfig, Method, PairColumns, PairData, RetrievalMetrics};
use rime_kernels::{Device, DeviceOptions};

use super::{default_model, method_of, repo_data, train_config, BoxErr, Progress, TrainArgs};

/// A comma-separated list of `flag`'s values.
fn list<T: std::str::FromStr>(flag: &str, text: &str) -> Result<Vec<T>, BoxErr> {
    text.split(',')
        .map(|x| x.trim())
        .map(|x| x.parse::<T>().map_err(|_| format!("{flag} {text}: '{x}' is not a number").into()))
        .collect()
}

/// The pairs of `path` with the column flags; a named --negative-column must be there.
fn pairs(a: &TrainArgs, path: &Path) -> Result<PairData, BoxErr> {
    let cols = PairColumns {
        anchor: a.anchor_column.clone(),
        positive: a.positive_column.clone(),
        negative: Some(a.negative_column.clone().unwrap_or_else(|| "negative".into())),
    };
    let data = PairData::from_file(path, &cols)?;
    if let (Some(n), false) = (&a.negative_column, data.has_negatives()) {
        return Err(format!("--negative-column {n}: {} has no column `{n}`", path.display()).into());
    }
    Ok(data)
}

fn table(title: &str, rows: &[(&str, &[RetrievalMetrics])]) -> String {
    let mut s = format!("\n{title}\n{:<22}{:>6}{:>10}{:>11}{:>9}\n", "", "dim", "recall@1", "recall@10", "MRR");
    for (name, ms) in rows {
        for m in ms.iter() {
            s.push_str(&format!(
                "{:<22}{:>6}{:>10.4}{:>11.4}{:>9.4}\n",
                name, m.dim, m.recall_at_1, m.recall_at_10, m.mrr
            ));
        }
    }
    s
}

pub(super) fn run(opts: &DeviceOptions, a: &TrainArgs) -> Result<(), BoxErr> {
    if a.method != "lst" && (a.no_feature_cache || a.feature_cache.is_some()) {
        return Err(format!(
            "--feature-cache and --no-feature-cache apply to --method lst (and probe with --task classify); \
             --task embedding with --method {} caches nothing",
            a.method
        )
        .into());
    }
    let defaults = a.train.is_none();
    let model = match &a.model {
        Some(m) => m.clone(),
        None => default_model()?,
    };
    let train: PathBuf = a.train.clone().unwrap_or_else(|| repo_data("data/snli_demo/train.jsonl"));
    let eval = a.eval.clone().or_else(|| defaults.then(|| repo_data("data/snli_demo/test.jsonl")));
    let mut matryoshka = MatryoshkaConfig::default();
    if let Some(d) = &a.matryoshka {
        matryoshka.dims = list("--matryoshka", d)?;
    }
    if let Some(w) = &a.matryoshka_weights {
        if a.matryoshka.is_none() {
            return Err("--matryoshka-weights needs --matryoshka (one weight per dim)".into());
        }
        matryoshka.weights = list("--matryoshka-weights", w)?;
    }
    if a.head != "mean" {
        return Err("--head applies to --task classify; an embedding adapter has no head".into());
    }
    let method = method_of(a)?;
    let cfg = train_config(a)?;
    let train_data = pairs(a, &train)?;
    let eval_data = eval.as_ref().map(|p| pairs(a, p)).transpose()?;
    let gpu = rime::Gpu::from_device(Device::new(opts)?);
    errln!("adapter: {} ({:?})", gpu.device().info().name, gpu.device().info().backend);
    let out = a.out();
    let progress = Progress::new(10);
    let mut on = |e: Event| match e {
        Event::Eval { epoch, metrics, best } => progress.say(format!(
            "epoch {epoch}: eval recall@1 {:.4}  MRR {:.4} (full dim, {} queries){}",
            metrics.accuracy,
            metrics.macro_f1,
            metrics.examples,
            if best { "  (best, saved)" } else { "" }
        )),
        e => progress.on(e),
    };
    let (tr, ev) = (train_data.clone(), eval_data.clone());
    let run = match method {
        Method::Lst(lst) => {
            let cache = match &a.feature_cache {
                _ if a.no_feature_cache => FeatureCache::Off,
                Some(p) if p.as_os_str() == "memory" => FeatureCache::Memory,
                Some(p) => FeatureCache::Dir(p.clone()),
                None => FeatureCache::Dir(out.join("feature_cache")),
            };
            finetune::embedding_lst(&gpu, &model, lst, cache, tr, ev, matryoshka, &cfg, Some(&out), &mut on)?
        }
        method => finetune::embedding_in(&gpu, &model, method, tr, ev, matryoshka, &cfg, &out, &mut on)?,
    };
    progress.bar.finish_and_clear();
    let s = run.summary;
    outln!(
        "{} embedding{}: eval MRR {:.4} (full dim); {:.1} train examples/s over {:.0} s; adapter in {}",
        s.method,
        if s.matryoshka_dims.len() > 1 { format!(" (matryoshka {:?})", s.matryoshka_dims) } else { String::new() },
        s.eval_mrr,
        s.train_examples_per_s,
        s.train_seconds,
        out.join("best").display()
    );
    let mut rows: Vec<(&str, &[RetrievalMetrics])> = vec![("tuned (best epoch)", &s.retrieval)];
    let frozen;
    if !a.no_baseline {
        let held = match &eval_data {
            Some(e) => e.clone(),
            None => train_data.split(cfg.eval_fraction, cfg.seed)?.1,
        };
        let dims: Vec<usize> = s.retrieval.iter().map(|r| r.dim).collect();
        frozen = finetune::evaluate_retrieval(&gpu, &model, None, &held, &dims, cfg.batch_size, cfg.max_length)?;
        rows.insert(0, ("frozen model", &frozen));
        let path = out.join("metrics.json");
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&text) {
                v["baseline_frozen"] = serde_json::json!(frozen);
                let _ = std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap_or_default());
            }
        }
    }
    outln!(
        "{}",
        table(&format!("retrieval: {} queries over {} distinct positives", s.eval_queries, s.eval_corpus), &rows)
    );
    Ok(())
}
