//! Sentence embeddings from a BERT-family encoder (all-MiniLM-L6-v2 and the like), the sentence-transformers
//! way: mean pool over the attention mask, then L2 normalization; optionally with a peft adapter applied on the
//! GPU (its parameters run beside the frozen weights; nothing is folded).

use std::path::{Path, PathBuf};

use rime_graph::ParamStore;
use rime_io::tokenizer::{Padding, Tokenizer};
use rime_models::bert::BertConfig;
use rime_models::LinearHook;
use rime_peft::classifier;
use rime_peft::trainer::{self, Encoded, Session};

use crate::{Error, Gpu, Result};

/// How an [`Encoder`] reads and pools.
#[derive(Debug, Clone)]
pub struct EncoderOptions {
    /// Texts per forward pass.
    pub batch_size: usize,
    /// Longer texts are truncated (counted in [`Embeddings::truncated`]). None: the folder's
    /// `sentence_bert_config.json` `max_seq_length`, else 512, capped at the model's position table.
    pub max_length: Option<usize>,
    /// L2-normalize each embedding (sentence-transformers' `normalize_embeddings`).
    pub normalize: bool,
    /// A peft adapter folder applied to the encoder: any method rime trains (LoRA and its variants, SVFit, IA3,
    /// bottleneck adapters, prompt, prefix), a head-only probe adapter (no change), or a ladder side-tuning
    /// (`RIME_LST`) adapter, whose side network runs beside the frozen encoder (the embedding is its pooled
    /// output; the encoder's states rounded to f16 as in training).
    pub adapter: Option<PathBuf>,
    /// Keep the first `dim` values of each embedding (a Matryoshka prefix), re-normalized when
    /// [`EncoderOptions::normalize`] is on. None: all of them. 0 or more than the model's hidden size is refused.
    /// An adapter trained with Matryoshka dims records them ([`Encoder::trained_dims`]).
    pub dim: Option<usize>,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        EncoderOptions { batch_size: 32, max_length: None, normalize: true, adapter: None, dim: None }
    }
}

/// Embeddings of a list of texts, in order, with what happened on the way.
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// One vector per text.
    pub vectors: Vec<Vec<f32>>,
    /// Texts longer than the maximum length (truncated).
    pub truncated: usize,
}

/// An encoder model on a [`Gpu`].
///
/// ```
/// use rime::{Encoder, Gpu};
/// let gpu = Gpu::new()?;
/// let mut enc = Encoder::load(&gpu, rime::models_dir().join("all-minilm-l6-v2"))?;
/// let v = enc.embed(&["A man is eating food.", "A man is eating a piece of bread."])?;
/// assert!(rime::encoder::cosine(&v[0], &v[1]) > 0.5); // paraphrases lie close
/// # Ok::<(), rime::Error>(())
/// ```
pub struct Encoder<'g> {
    gpu: &'g Gpu,
    store: Option<ParamStore>,
    hook: Option<Box<dyn LinearHook>>,
    session: Option<Session<'g>>,
    cfg: BertConfig,
    prefix: String,
    tok: Tokenizer,
    opts: EncoderOptions,
    max_length: usize,
    notes: Vec<String>,
    trained_dims: Option<Vec<usize>>,
    /// A `RIME_LST` adapter's side network (then `store` and `session` stay empty).
    side: Option<rime_peft::lst_embed::SideEncoder<'g>>,
}

/// `max_seq_length` of a sentence-transformers folder, when it says.
fn sentence_max_length(model: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(model.join("sentence_bert_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("max_seq_length")?.as_u64().map(|x| x as usize)
}

impl<'g> Encoder<'g> {
    /// Loads a Hugging Face model folder (config.json, model.safetensors, tokenizer.json) with the default
    /// [`EncoderOptions`].
    pub fn load(gpu: &'g Gpu, model: impl AsRef<Path>) -> Result<Encoder<'g>> {
        Encoder::load_with(gpu, model, EncoderOptions::default())
    }

    /// Loads a model folder with `opts` (an adapter, batch size, maximum length, normalization).
    pub fn load_with(gpu: &'g Gpu, model: impl AsRef<Path>, opts: EncoderOptions) -> Result<Encoder<'g>> {
        let model = model.as_ref();
        if opts.batch_size == 0 {
            return Err(Error::invalid("batch_size", "must be at least 1"));
        }
        let max_length = opts.max_length.or_else(|| sentence_max_length(model)).unwrap_or(512);
        if max_length < 2 {
            return Err(Error::invalid("max_length", format!("{max_length}: must be at least 2 ([CLS] and [SEP])")));
        }
        if !model.is_dir() {
            return Err(Error::invalid(
                "model",
                format!(
                    "{}: expected a Hugging Face model folder of a BERT encoder (config.json, model.safetensors, \
                     tokenizer.json)",
                    model.display()
                ),
            ));
        }
        let dev = gpu.device();
        let (mut store, cfg, prefix, mut tok) = trainer::open_model(dev, model, max_length)?;
        tok.set_vocab_limit(cfg.vocab, &format!("{prefix}embeddings.word_embeddings.weight"))?;
        let max_length = tok.max_length().unwrap_or(max_length);
        if let Some(d) = opts.dim.filter(|&d| d == 0 || d > cfg.hidden) {
            return Err(Error::invalid(
                "dim",
                format!("{d}: must be in 1..={} (the model's embedding width)", cfg.hidden),
            ));
        }
        let trained_dims = match &opts.adapter {
            Some(dir) => {
                rime_io::PeftAdapter::load(dir).ok().and_then(|a| rime_peft::embedding::trained_dims(&a.config))
            }
            None => None,
        };
        let mut notes = Vec::new();
        let (hook, lst) = match &opts.adapter {
            Some(dir) => load_adapter(gpu, &mut store, dir, &mut notes)?,
            None => (classifier::hook_for(&classifier::Method::Probe), None),
        };
        // The inference session ends in a classification head; without one it gets a dummy 1-class head
        // whose logits are ignored.
        if store.find(classifier::HEAD_WEIGHT).is_none() {
            classifier::init_head(dev, &mut store, cfg.hidden, 1, 0)?;
        }
        let (store, side) = match (lst, &opts.adapter) {
            (Some(acfg), Some(dir)) => {
                let side = rime_peft::lst_embed::SideEncoder::new(
                    dev,
                    store,
                    &cfg,
                    &prefix,
                    &acfg,
                    opts.batch_size,
                    max_length,
                )
                .map_err(|e| Error::invalid("adapter", format!("{}: {e}", dir.display())))?;
                (None, Some(side))
            }
            _ => (Some(store), None),
        };
        Ok(Encoder {
            gpu,
            store,
            hook: Some(hook),
            session: None,
            cfg,
            prefix,
            tok,
            opts,
            max_length,
            notes,
            trained_dims,
            side,
        })
    }

    /// The embedding width (384 for MiniLM), or [`EncoderOptions::dim`] when set.
    pub fn dim(&self) -> usize {
        self.opts.dim.unwrap_or(self.cfg.hidden)
    }

    /// The Matryoshka dims the adapter was trained with (`rime_matryoshka_dims`, written by the embedding
    /// task), if it records them. A front end may warn when [`EncoderOptions::dim`] is not one of them.
    pub fn trained_dims(&self) -> Option<&[usize]> {
        self.trained_dims.as_deref()
    }

    /// The longest input in tokens; longer texts are truncated.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Remarks about the loaded adapter (e.g. that it holds only a classification head).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// One embedding per text (mean-pooled, L2-normalized unless [`EncoderOptions::normalize`] is off).
    pub fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        Ok(self.embed_all(texts)?.vectors)
    }

    /// [`Encoder::embed`], also counting the texts that were truncated.
    pub fn embed_all(&mut self, texts: &[&str]) -> Result<Embeddings> {
        if texts.is_empty() {
            return Ok(Embeddings { vectors: Vec::new(), truncated: 0 });
        }
        let enc = self.tok.encode_batch(texts, None, Padding::Longest)?;
        let t = enc.seq_len;
        let mut e = Encoded { ids: vec![], types: vec![], labels: vec![-100; texts.len()] };
        for (r, len) in enc.lengths().into_iter().enumerate() {
            e.ids.push(enc.input_ids[r * t..r * t + len].to_vec());
            e.types.push(enc.token_type_ids[r * t..r * t + len].to_vec());
        }
        let truncated = enc.truncated.iter().filter(|&&x| x).count();
        let mut pooled = match &mut self.side {
            Some(side) => side.embed(&e)?,
            None => self.session(texts.len())?.predict(&e, |_| {})?.1,
        };
        let mut hidden = self.cfg.hidden;
        if let Some(d) = self.opts.dim.filter(|&d| d < hidden) {
            // The Matryoshka prefix: the first d values of each row.
            pooled = pooled.chunks(hidden).flat_map(|r| r[..d].iter().copied()).collect();
            hidden = d;
        }
        if self.opts.normalize {
            pooled.chunks_mut(hidden).for_each(l2_normalize);
        }
        check_output(&pooled, hidden)?;
        Ok(Embeddings { vectors: pooled.chunks(hidden).map(<[f32]>::to_vec).collect(), truncated })
    }

    /// The inference session, built on first use with a batch of at most `n` rows.
    fn session(&mut self, n: usize) -> Result<&mut Session<'g>> {
        if self.session.is_none() {
            let store = self.store.take().expect("the store moves into the session once");
            let hook = self.hook.take().expect("the hook moves into the session once");
            let batch = self.opts.batch_size.min(n).max(1);
            self.session = Some(Session::for_inference(
                self.gpu.device(),
                store,
                self.cfg.clone(),
                self.prefix.clone(),
                hook,
                batch,
                self.max_length,
            ));
        }
        Ok(self.session.as_mut().expect("just built"))
    }
}

/// The NaN policy where embeddings leave rime: an embedding holding NaN or ±Inf (weights or an adapter that
/// overflow) is an error naming the text, never a vector handed on.
fn check_output(pooled: &[f32], hidden: usize) -> Result<()> {
    for (i, row) in pooled.chunks(hidden).enumerate() {
        if let Some(j) = row.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFiniteOutput {
                output: format!("the embedding of text {i}"),
                detail: format!("{} at dimension {j}", row[j]),
            });
        }
    }
    Ok(())
}

/// Loads an adapter folder's tensors into the store, as `rime eval` does: any method rime trains (LoRA with DoRA,
/// rsLoRA and rank/alpha patterns, SVFit, IA3, bottleneck adapters, prompt and prefix tuning) changes the
/// embedding; a head-only probe adapter leaves it as the base model's (a note says so). A LoRA module the model
/// lacks is refused (the adapter would silently do nothing there).
fn load_adapter(
    gpu: &Gpu,
    store: &mut ParamStore,
    dir: &Path,
    notes: &mut Vec<String>,
) -> Result<(Box<dyn LinearHook>, Option<rime_io::peft::AdapterConfig>)> {
    let mut ad = rime_io::PeftAdapter::load(dir)?;
    // peft's layouts (`bert.` for a BertForSequenceClassification adapter) as the store names the model.
    classifier::to_store_names(&mut ad, store);
    let c = &ad.config;
    let bad = |m: String| -> Result<(Box<dyn LinearHook>, Option<rime_io::peft::AdapterConfig>)> {
        Err(Error::invalid("adapter", format!("{}: {m}", dir.display())))
    };
    if c.peft_type == "RIME_PROBE" {
        notes.push(format!(
            "{} holds a classification head only; embeddings are those of the base model",
            dir.display()
        ));
        return Ok((classifier::hook_for(&classifier::Method::Probe), None));
    }
    if c.peft_type == rime_peft::methods::lst::PEFT_TYPE {
        // Its side network is a graph beside the encoder: the Encoder builds it (the encoder's linears stay
        // plain).
        let (acfg, _) = classifier::load_adapter(gpu.device(), store, dir)?;
        return Ok((classifier::hook_for(&classifier::Method::Probe), Some(acfg)));
    }
    if c.peft_type == "LORA" {
        let pairs = ad.lora_pairs();
        if pairs.is_empty() {
            return bad("a LORA adapter without lora_A/lora_B tensors".into());
        }
        for p in &pairs {
            if store.find(&format!("{}.weight", p.module)).is_none() {
                return bad(format!(
                    "tensor '{}' adapts module '{}', which this model does not have (another base model?)",
                    p.a, p.module
                ));
            }
        }
    }
    classifier::load_adapter(gpu.device(), store, dir)?;
    Ok((classifier::hook_for_adapter(c)?, None))
}

/// Scales `row` to unit length as torch.nn.functional.normalize does: x / max(‖x‖, 1e-12).
pub(crate) fn l2_normalize(row: &mut [f32]) {
    let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    row.iter_mut().for_each(|x| *x /= n);
}

/// Cosine similarity of two vectors (their dot product when both are normalized).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb).max(1e-12)
}
