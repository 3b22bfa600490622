//! Causal-LM fine-tuning of a Llama decoder with LoRA: next-token cross-entropy on the completion tokens
//! only (prompt tokens and padding are ignored), the frozen GGUF backbone dequantized to f32 on the device.
//! Data: prompt/completion pairs ([`CausalData`]); without prompts every token of the text is a target.
//!
//! Chat data ([`CausalData::chat`], or a JSONL file with a `messages` field) is rendered through the model's
//! chat template (the GGUF's `tokenizer.chat_template`, as `apply_chat_template(messages, tokenize=False)`)
//! and tokenized without added special tokens; the targets are the assistant turns' tokens only, each turn's
//! content and the end-of-turn token that closes it (as TRL's assistant-only loss with a template whose
//! `{% generation %}` block holds `content + '<|im_end|>'`), never what the template writes around them (role
//! headers, the newline after `<|im_end|>`, system and user turns). [`chat_tokens`] finds each assistant span by
//! rendering the conversation before the turn with the generation prompt and the conversation through the turn,
//! and refuses a template for which these are not prefixes of the whole conversation's tokens.
//!
//! [`CausalTask`] is driven by the shared trainer ([`crate::trainer::train`]): batches grouped by length and
//! padded to a length bucket (one graph per bucket, all sharing parameters and optimizer state), evaluation
//! each epoch (completion loss and perplexity, lower is better) on the eval set or a held-out part of the
//! training data, the best adapter kept in `adapter/` (peft layout, task CAUSAL_LM).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rime_graph::{Executor, Graph, OptimConfig, ParamStore, Var};
use rime_io::peft::PeftAdapter;
use rime_kernels::{DType, Device};
use rime_models::llama::{self, LlamaConfig};

use crate::classifier::EvalMetrics;
use crate::config::{TrainConfig, WeightStorage};
use crate::data::{CausalData, ChatMessage};
use crate::lora::{LoraConfig, LoraHook};
use crate::trainer::{bucket, save_peft, Evaluation, Event, Metric, RunStats, Task};
use crate::{Error, Result};

/// The summary of a causal-LM run (`metrics.json` without the history, plus `"task": "causal-lm"`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CausalSummary {
    pub steps: usize,
    pub first_loss: f32,
    pub last_loss: f32,
    /// Completion loss and perplexity of the best adapter on the eval set (None without one).
    pub eval_loss: Option<f64>,
    pub eval_perplexity: Option<f64>,
    pub best_epoch: Option<usize>,
    pub train_examples_per_s: f64,
    pub train_seconds: f64,
    pub trainable_params: usize,
    pub truncated: usize,
    /// The executor's memory report of a training graph (frozen weights, trainable parameters, gradients,
    /// optimizer state, activation peak, inputs).
    pub memory: String,
}

/// Token ids and targets of one example: targets[i] is the token after ids[i], or -100 where no loss is
/// taken. The bool says whether the text was cut at `max_len`.
fn example(
    tok: &rime_io::tokenizer::Tokenizer,
    prompt: Option<&str>,
    completion: &str,
    bos: Option<u32>,
    eos: Option<u32>,
    max_len: usize,
) -> Result<(Vec<u32>, Vec<i32>, bool)> {
    let mut ids: Vec<u32> = bos.into_iter().collect();
    let mut counted: Vec<bool> = vec![false; ids.len()];
    if let Some(p) = prompt {
        let p = tok.encode(p, false)?;
        counted.extend(std::iter::repeat_n(false, p.len()));
        ids.extend(p);
    }
    let c = tok.encode(completion, false)?;
    counted.extend(std::iter::repeat_n(true, c.len()));
    ids.extend(c);
    if let Some(e) = eos {
        ids.push(e);
        counted.push(true);
    }
    let cut = ids.len() > max_len + 1;
    ids.truncate(max_len + 1);
    counted.truncate(max_len + 1);
    let n = ids.len().saturating_sub(1);
    let targets: Vec<i32> = (0..n).map(|i| if counted[i + 1] { ids[i + 1] as i32 } else { -100 }).collect();
    ids.truncate(n);
    Ok((ids, targets, cut))
}

/// Token ids and their targets (-100 where unscored), one pair per example.
type Examples = Vec<(Vec<u32>, Vec<i32>)>;

/// A conversation rendered through a chat template and tokenized: `scored[i]` says whether `ids[i]` is a target
/// (an assistant turn's token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTokens {
    pub ids: Vec<u32>,
    pub scored: Vec<bool>,
}

impl ChatTokens {
    /// Token ids and next-token targets (-100 where unscored) over at most `max_len` input positions; the
    /// bool says whether the conversation was cut.
    pub fn targets(&self, max_len: usize) -> (Vec<u32>, Vec<i32>, bool) {
        let cut = self.ids.len() > max_len + 1;
        let n = self.ids.len().min(max_len + 1).saturating_sub(1);
        let targets = (0..n).map(|i| if self.scored[i + 1] { self.ids[i + 1] as i32 } else { -100 }).collect();
        (self.ids[..n].to_vec(), targets, cut)
    }
}

/// Renders `messages` (the template's `add_generation_prompt` as the bool) — a chat template with its special
/// tokens bound.
pub type RenderFn<'a> = dyn Fn(&[ChatMessage], bool) -> Result<String> + 'a;
/// Tokenizes rendered text (no special tokens added).
pub type EncodeFn<'a> = dyn Fn(&str) -> Result<Vec<u32>> + 'a;

/// Renders and tokenizes a conversation and marks its assistant tokens. For each assistant message k, the
/// tokens of the conversation before it with the generation prompt (`render(&messages[..k], true)`) must be a
/// prefix of the tokens through it (`render(&messages[..=k], false)`), and those a prefix of the whole
/// conversation's; the turn's span is what lies between. The span is scored up to and including the first of
/// `end_of_turn` in it (the token that closes the turn); what the template writes after it (a newline) is not.
/// Without such a token in the span the whole span is scored. A template that is not prefix-stable is an error
/// naming the message.
pub fn chat_tokens(
    messages: &[ChatMessage],
    render: &RenderFn,
    encode: &EncodeFn,
    end_of_turn: &[u32],
) -> Result<ChatTokens> {
    let full_text = render(messages, false)?;
    let ids = encode(&full_text)?;
    let mut scored = vec![false; ids.len()];
    let unstable = |k: usize, what: &str| {
        Error::Msg(format!(
            "the chat template is not prefix-stable at message {} (assistant): {what}, so its tokens cannot be \
             told apart from the template's",
            k + 1
        ))
    };
    for (k, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = render(&messages[..k], true)?;
        let through = render(&messages[..=k], false)?;
        if !through.starts_with(&before) {
            return Err(unstable(
                k,
                "the conversation before it with the generation prompt does not begin the text through it",
            ));
        }
        if !full_text.starts_with(&through) {
            return Err(unstable(k, "the text through it does not begin the whole conversation's text"));
        }
        let (b, t) = (encode(&before)?, encode(&through)?);
        if !t.starts_with(&b) || !ids.starts_with(&t) {
            return Err(unstable(k, "the tokens of the text before it are not a prefix of the tokens after it"));
        }
        if t.len() == b.len() {
            return Err(unstable(k, "the template writes nothing for it"));
        }
        let end = (b.len()..t.len()).find(|&i| end_of_turn.contains(&t[i])).map_or(t.len(), |i| i + 1);
        scored[b.len()..end].iter_mut().for_each(|s| *s = true);
    }
    Ok(ChatTokens { ids, scored })
}

/// A model's chat template with what it needs: its special tokens' text and the end-of-turn token ids.
pub struct ChatTemplate {
    pub template: String,
    pub bos_token: String,
    pub eos_token: String,
    /// Tokens that close a turn: the file's eos tokens and, if the vocabulary has them, `<|im_end|>`,
    /// `<|eot_id|>`, `<|end|>`, `<end_of_turn>`.
    pub end_of_turn: Vec<u32>,
}

impl ChatTemplate {
    /// The template and special tokens of a GGUF model (`source` names the file in the error when it has no
    /// template).
    pub fn from_parts(
        tok: &rime_io::tokenizer::Tokenizer,
        template: Option<&str>,
        bos: Option<u32>,
        eos: &[u32],
        source: &Path,
    ) -> Result<ChatTemplate> {
        let template = template.ok_or_else(|| {
            Error::Msg(format!(
                "{}: the model has no chat template (tokenizer.chat_template), so chat data cannot be rendered",
                source.display()
            ))
        })?;
        let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
        let mut end_of_turn = eos.to_vec();
        for t in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"] {
            if let Some(id) = tok.token_to_id(t).filter(|id| !end_of_turn.contains(id)) {
                end_of_turn.push(id);
            }
        }
        Ok(ChatTemplate {
            template: template.to_string(),
            bos_token: name(bos),
            eos_token: name(eos.first().copied()),
            end_of_turn,
        })
    }

    /// The text of `messages` (see [`rime_models::generate::render_messages`]).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        rime_models::generate::render_messages(
            &self.template,
            messages,
            add_generation_prompt,
            &self.bos_token,
            &self.eos_token,
        )
        .map_err(|e| Error::Msg(e.to_string()))
    }

    /// [`chat_tokens`] with this template and `tok`.
    pub fn tokens(&self, tok: &rime_io::tokenizer::Tokenizer, messages: &[ChatMessage]) -> Result<ChatTokens> {
        let render = |m: &[ChatMessage], g: bool| self.render(m, g);
        let encode = |t: &str| -> Result<Vec<u32>> { Ok(tok.encode(t, false)?) };
        chat_tokens(messages, &render, &encode, &self.end_of_turn)
    }
}

/// What encoding a data set did besides the examples.
#[derive(Default)]
struct Encoded {
    data: Examples,
    /// Examples cut at the maximum length.
    cut: usize,
    /// Examples left out because no target token remained (all cut, or an empty completion).
    dropped: usize,
}

/// Tokenized examples that have at least one target token, and how many were cut at the maximum length.
/// Chat data: a conversation longer than `max_len` (+1: the last token is only predicted) is an error naming
/// its line, unless the data allows truncation.
fn encode_all(model: &llama::LlamaModel, data: &CausalData, name: &'static str, max_len: usize) -> Result<Encoded> {
    let mut out = Encoded::default();
    let mut push = |ids: Vec<u32>, t: Vec<i32>, c: bool| {
        out.cut += c as usize;
        if t.iter().any(|&x| x >= 0) {
            out.data.push((ids, t));
        } else {
            out.dropped += 1;
        }
    };
    let Some(convs) = &data.conversations else {
        let eos = model.eos_tokens.first().copied();
        for ex in &data.dataset(name)?.examples {
            let (ids, t, c) =
                example(&model.tokenizer, ex.text_pair.as_deref(), &ex.text, model.bos_token, eos, max_len)?;
            push(ids, t, c);
        }
        return Ok(out);
    };
    let tmpl = ChatTemplate::from_parts(
        &model.tokenizer,
        model.chat_template.as_deref(),
        model.bos_token,
        &model.eos_tokens,
        &model.source,
    )?;
    let (path, lines) = data.origin(name);
    let at = |i: usize, msg: String| -> Error {
        rime_io::Error::DatasetLine { file: path.display().to_string(), line: lines[i], msg }.into()
    };
    for (i, conv) in convs.iter().enumerate() {
        let ct = tmpl.tokens(&model.tokenizer, conv).map_err(|e| at(i, e.to_string()))?;
        if ct.ids.len() > max_len + 1 && !data.truncate {
            return Err(at(
                i,
                format!(
                    "the conversation is {} tokens through the chat template, longer than max_length {max_len} (+1: \
                     the last token is only predicted); raise max_length or allow truncation",
                    ct.ids.len()
                ),
            ));
        }
        let (ids, t, c) = ct.targets(max_len);
        push(ids, t, c);
    }
    Ok(out)
}

/// One graph per padded length, all over the same parameters; the first one built owns the optimizer state
/// and the others share it.
struct Buckets {
    b: usize,
    max_length: usize,
    cfg: LlamaConfig,
    hook: LoraHook,
    /// None: forward-only graphs (evaluation without dropout).
    optim: Option<OptimConfig>,
    /// Each decoder layer a gradient-checkpoint segment (training graphs).
    checkpoint: bool,
    execs: HashMap<usize, (Executor, Var)>,
    first: Option<usize>,
}

impl Buckets {
    fn get(&mut self, dev: &Device, store: &ParamStore, t: usize) -> Result<&mut (Executor, Var)> {
        if !self.execs.contains_key(&t) {
            let b = self.b;
            let mut g = Graph::new();
            let targets = g.input("targets", &[b * t], DType::I32);
            let block = ((dev.max_binding() / 4) as usize).min(llama::LOSS_BLOCK_VALUES);
            let loss =
                llama::build_loss(&mut g, store, &self.cfg, (b, t), &self.hook, self.checkpoint, targets, block)?;
            let donor = self.first.and_then(|f| self.execs.get(&f)).map(|(e, _)| e);
            let ex = Executor::new_sharing(dev, g, store, Some(loss), &[loss], self.optim.clone(), donor)?;
            self.execs.insert(t, (ex, loss));
            self.first.get_or_insert(t);
        }
        Ok(self.execs.get_mut(&t).expect("just inserted"))
    }

    /// The executor that owns the optimizer state (for checkpoints).
    fn owner(&self) -> Option<&Executor> {
        self.first.and_then(|f| self.execs.get(&f)).map(|(e, _)| e)
    }
}

/// Pad rows `idx` of `data` into a [b, t] batch (ids padded with `pad`, targets with -100).
fn make_batch(data: &[(Vec<u32>, Vec<i32>)], idx: &[usize], b: usize, t: usize, pad: u32) -> (Vec<u32>, Vec<i32>) {
    let mut ids = vec![pad; b * t];
    let mut tg = vec![-100i32; b * t];
    for (r, &i) in idx.iter().enumerate() {
        let (x, y) = &data[i];
        ids[r * t..r * t + x.len()].copy_from_slice(x);
        tg[r * t..r * t + y.len()].copy_from_slice(y);
    }
    (ids, tg)
}

/// Mean completion loss over every target token of `data` (forward only).
fn evaluate(
    dev: &Device,
    store: &ParamStore,
    buckets: &mut Buckets,
    data: &[(Vec<u32>, Vec<i32>)],
    pad: u32,
) -> Result<EvalMetrics> {
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by_key(|&i| data[i].0.len());
    let (b, maxl) = (buckets.b, buckets.max_length);
    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in order.chunks(b) {
        let t = bucket(chunk.iter().map(|&i| data[i].0.len()).max().unwrap_or(1), maxl);
        let (ids, tg) = make_batch(data, chunk, b, t, pad);
        let n = tg.iter().filter(|&&x| x >= 0).count();
        let (ex, loss) = buckets.get(dev, store, t)?;
        let loss = *loss;
        ex.feed_u32(dev, llama::INPUT_IDS, &ids)?;
        ex.feed_i32(dev, "targets", &tg)?;
        ex.forward(dev)?;
        let l = ex.read(dev, loss)?[0] as f64;
        sum += l * n as f64;
        count += n;
    }
    let loss = sum / count.max(1) as f64;
    Ok(EvalMetrics { accuracy: f64::NAN, macro_f1: f64::NAN, loss, examples: data.len() })
}

/// What [`CausalTask::prepare`] loads.
struct Loaded {
    model: llama::LlamaModel,
    pad: u32,
    data: Vec<(Vec<u32>, Vec<i32>)>,
    eval: Vec<(Vec<u32>, Vec<i32>)>,
    buckets: Buckets,
    /// With LoRA dropout the training graphs drop activations: evaluation gets its own graphs without it.
    eval_buckets: Option<Buckets>,
    trainable: usize,
    truncated: usize,
}

/// Causal-LM LoRA on a Llama GGUF (see the module doc).
pub struct CausalTask<'d> {
    dev: &'d Device,
    model: PathBuf,
    lora: LoraConfig,
    train: CausalData,
    eval: Option<CausalData>,
    loaded: Option<Loaded>,
}

impl<'d> CausalTask<'d> {
    /// Train LoRA (`lora.targets` are Llama module names, e.g. `q_proj`, `v_proj`) on `train`; evaluate on
    /// `eval`, or on a held-out part of `train` when it has enough rows, else not at all (the last adapter is
    /// kept).
    pub fn new(
        dev: &'d Device,
        model: impl Into<PathBuf>,
        lora: LoraConfig,
        train: CausalData,
        eval: Option<CausalData>,
    ) -> Self {
        CausalTask { dev, model: model.into(), lora, train, eval, loaded: None }
    }

    fn loaded(&self) -> Result<&Loaded> {
        self.loaded.as_ref().ok_or_else(|| Error::Msg("the causal-LM task is not prepared".into()))
    }

    fn loaded_mut(&mut self) -> Result<&mut Loaded> {
        self.loaded.as_mut().ok_or_else(|| Error::Msg("the causal-LM task is not prepared".into()))
    }

    fn splits(&self, cfg: &TrainConfig, on: &mut dyn FnMut(Event)) -> Result<(CausalData, Option<CausalData>)> {
        let full = &self.train;
        if full.is_empty() {
            return Err(Error::invalid("train", "has no rows"));
        }
        let n = full.len() as f64;
        let shown = full.source().map_or_else(|| "the training data".to_string(), |p| p.display().to_string());
        Ok(match &self.eval {
            Some(e) => (full.clone(), Some(e.clone())),
            None if (n * cfg.eval_fraction).round() >= 1.0 && n * (1.0 - cfg.eval_fraction) >= 10.0 => {
                on(Event::Info(format!(
                    "no eval set: holding out {:.0}% of {shown} for evaluation",
                    cfg.eval_fraction * 100.0,
                )));
                let (t, e) = full.split("train", cfg.eval_fraction, cfg.seed)?;
                (t, Some(e))
            }
            None => {
                on(Event::Info(format!(
                    "no eval set and {} rows are too few to hold some out: no evaluation; the last adapter is kept",
                    full.len()
                )));
                (full.clone(), None)
            }
        })
    }

    /// The trained LoRA as a peft adapter: the LoRA-family config (DoRA magnitudes, PiSSA converted to a
    /// LoRA of the unmodified base) with the causal-LM task.
    fn adapter_value(&self) -> Result<PeftAdapter> {
        let (dev, store) = (self.dev, &self.loaded()?.model.store);
        let mut tensors = crate::classifier::trainable_tensors(dev, store)?;
        let mut acfg = crate::classifier::lora_adapter_config(dev, store, &self.lora, &mut tensors)?;
        acfg.task_type = Some("CAUSAL_LM".into());
        acfg.base_model_name_or_path = Some(self.model.display().to_string());
        let tensors =
            tensors.into_iter().map(|(name, shape, data)| rime_io::peft::AdapterTensor { name, shape, data }).collect();
        Ok(PeftAdapter::new(acfg, tensors))
    }
}

impl<'d> Task<'d> for CausalTask<'d> {
    type Summary = CausalSummary;

    fn device(&self) -> &'d Device {
        self.dev
    }

    fn prepare(&mut self, cfg: &TrainConfig, on: &mut dyn FnMut(Event)) -> Result<Vec<usize>> {
        if cfg.head != crate::config::HeadKind::Mean {
            return Err(Error::invalid(
                "head",
                "a causal language model has no BertForSequenceClassification head (hf)",
            ));
        }
        let weights = match cfg.weights {
            WeightStorage::F32 => llama::GgufWeights::F32,
            WeightStorage::F16 => llama::GgufWeights::F16,
            WeightStorage::Quantized => llama::GgufWeights::Quantized,
            WeightStorage::BF16 => {
                return Err(Error::invalid("weights", "bf16: a GGUF decoder's weights are f32, f16 or quantized (q)"))
            }
        };
        let (train_ds, eval_ds) = self.splits(cfg, on)?;
        let dev = self.dev;
        let mut model =
            llama::load_gguf_with(dev, &self.model, None, weights).map_err(|e| Error::Msg(e.to_string()))?;
        model.store.add_texture_twins(dev)?;
        let (wbytes, qbytes, twins) = model.store.iter().fold((0u64, 0u64, 0u64), |(a, q, t), (_, p)| {
            let tw = p.tensor.texture.as_ref().map_or(0, |tw| (tw.rows * tw.cols * tw.dtype.size()) as u64);
            (a + p.tensor.bytes(), q + if p.tensor.dtype.is_quantized() { p.tensor.bytes() } else { 0 }, t + tw)
        });
        on(Event::Info(format!(
            "weights: {:.1} MB on the device ({:.1} MB of it in GGUF blocks){}{}",
            wbytes as f64 / 1e6,
            qbytes as f64 / 1e6,
            match twins {
                0 => String::new(),
                t => format!(", plus {:.1} MB of texture twins", t as f64 / 1e6),
            },
            match dev.dequant_scratch_bytes() {
                0 => String::new(),
                s => format!(", plus a {:.1} MB dequantization scratch", s as f64 / 1e6),
            }
        )));
        let pad = model.eos_tokens.first().copied().unwrap_or(0);
        let train = encode_all(&model, &train_ds, "train", cfg.max_length)?;
        let ev = match &eval_ds {
            Some(e) => encode_all(&model, e, "eval", cfg.max_length)?,
            None => Encoded::default(),
        };
        let what = if self.train.conversations.is_some() { "an assistant token" } else { "a completion token" };
        if train.data.is_empty() {
            let (p, _) = train_ds.origin("train");
            return Err(Error::Msg(format!("{}: no example has {what} to learn", p.display())));
        }
        if eval_ds.is_some() && ev.data.is_empty() {
            return Err(Error::Msg(format!("the eval set has no example with {what}")));
        }
        let (cut, dropped) = (train.cut + ev.cut, train.dropped + ev.dropped);
        if cut > 0 {
            on(Event::Warn(format!(
                "{cut} of {} examples are longer than max_length {} tokens and were truncated",
                train.data.len() + ev.data.len() + dropped,
                cfg.max_length
            )));
        }
        if dropped > 0 {
            on(Event::Warn(format!("{dropped} examples have no target token left ({what}) and are left out")));
        }
        let (data, eval) = (train.data, ev.data);
        let modules = crate::lora::add_lora(dev, &mut model.store, &self.lora)?;
        let trainable: usize = model.store.trainable().map(|(_, p)| p.tensor.numel()).sum();
        on(Event::Info(format!(
            "LoRA r={} alpha={} on {} modules: {trainable} trainable parameters",
            self.lora.rank,
            self.lora.alpha,
            modules.len()
        )));
        let buckets = |hook: LoraHook, checkpoint: bool| Buckets {
            b: cfg.batch_size,
            max_length: cfg.max_length,
            cfg: model.cfg.clone(),
            hook,
            optim: None,
            checkpoint,
            execs: HashMap::new(),
            first: None,
        };
        let l = &self.lora;
        let hook = LoraHook { scale: l.scale(), dropout: l.dropout, seed: l.seed };
        let train_buckets = buckets(hook, cfg.gradient_checkpointing);
        let eval_buckets = (l.dropout > 0.0).then(|| buckets(LoraHook::new(l.scale()), false));
        let lens = data.iter().map(|(x, _)| x.len()).collect();
        let truncated = cut;
        self.loaded =
            Some(Loaded { model, pad, data, eval, buckets: train_buckets, eval_buckets, trainable, truncated });
        Ok(lens)
    }

    fn compile(&mut self, optim: OptimConfig, rows: usize) -> Result<()> {
        let l = self.loaded_mut()?;
        l.buckets.optim = Some(optim);
        l.buckets.b = rows;
        if let Some(e) = &mut l.eval_buckets {
            e.b = rows;
        }
        Ok(())
    }

    fn bucket(&self, longest: usize) -> usize {
        bucket(longest, self.loaded.as_ref().map_or(longest, |l| l.buckets.max_length))
    }

    fn executor(&mut self, key: usize) -> Result<(&mut Executor, &ParamStore)> {
        let dev = self.dev;
        let l = self.loaded_mut()?;
        let (ex, _) = l.buckets.get(dev, &l.model.store, key)?;
        Ok((ex, &l.model.store))
    }

    fn feed(&mut self, idx: &[usize], key: usize) -> Result<(&mut Executor, Var)> {
        let dev = self.dev;
        let l = self.loaded_mut()?;
        let (ids, tg) = make_batch(&l.data, idx, l.buckets.b, key, l.pad);
        let (ex, loss) = l.buckets.get(dev, &l.model.store, key)?;
        ex.feed_u32(dev, llama::INPUT_IDS, &ids)?;
        ex.feed_i32(dev, "targets", &tg)?;
        Ok((ex, *loss))
    }

    fn any_executor(&self) -> Option<&Executor> {
        self.loaded.as_ref().and_then(|l| l.buckets.owner())
    }

    fn store(&self) -> &ParamStore {
        match &self.loaded {
            Some(l) => &l.model.store,
            None => crate::classify::empty_store(),
        }
    }

    fn evaluate(&mut self) -> Result<Option<Evaluation>> {
        let dev = self.dev;
        let l = self.loaded_mut()?;
        if l.eval.is_empty() {
            return Ok(None);
        }
        let buckets = l.eval_buckets.as_mut().unwrap_or(&mut l.buckets);
        let m = evaluate(dev, &l.model.store, buckets, &l.eval, l.pad)?;
        let values = vec![("eval_loss".into(), m.loss), ("eval_perplexity".into(), m.loss.exp())];
        Ok(Some(Evaluation { score: m.loss, metrics: m, values }))
    }

    fn metric(&self) -> Metric {
        Metric { name: "eval_loss", higher_is_better: false }
    }

    fn supports_checkpointing(&self) -> bool {
        true
    }

    /// The loss is the mean over the scored (completion) tokens of the batch.
    fn loss_weight(&self, idx: &[usize]) -> usize {
        self.loaded
            .as_ref()
            .map_or(idx.len(), |l| idx.iter().map(|&i| l.data[i].1.iter().filter(|&&t| t != -100).count()).sum())
    }

    fn adapter(&self) -> Result<PeftAdapter> {
        self.adapter_value()
    }

    fn save_adapter(&self, dir: &Path) -> Result<()> {
        save_peft(&self.adapter_value()?, dir)
    }

    fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let dev = self.dev;
        crate::classifier::load_adapter(dev, &mut self.loaded_mut()?.model.store, dir)?;
        Ok(())
    }

    fn adapter_folder(&self) -> &'static str {
        "adapter"
    }

    fn title(&self) -> String {
        let data = self.train.source().and_then(|p| p.file_name()).map(|f| f.to_string_lossy().into_owned());
        format!(
            "{} · LoRA r={} · {}",
            self.model.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            self.lora.rank,
            data.unwrap_or_else(|| format!("{} texts", self.train.len()))
        )
    }

    fn summary(&self, run: &RunStats) -> CausalSummary {
        let l = self.loaded.as_ref();
        CausalSummary {
            steps: run.steps,
            first_loss: run.first_loss,
            last_loss: run.last_loss,
            eval_loss: run.best_score,
            eval_perplexity: run.best_score.map(f64::exp),
            best_epoch: run.best_epoch,
            train_examples_per_s: run.train_examples_per_s,
            train_seconds: run.train_seconds,
            trainable_params: l.map_or(0, |l| l.trainable),
            truncated: l.map_or(0, |l| l.truncated),
            memory: run.memory.clone(),
        }
    }

    fn summary_json(&self, s: &CausalSummary) -> serde_json::Value {
        let mut v = serde_json::to_value(s).unwrap_or_default();
        v["task"] = serde_json::json!("causal-lm");
        v
    }
}
