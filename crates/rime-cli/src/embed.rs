//! `rime embed`: sentence embeddings from a BERT encoder, the sentence-transformers way (mean pool over the
//! attention mask, then L2 normalization), optionally with a LoRA adapter applied. One JSON line per text.

use std::io::Write;
use std::path::{Path, PathBuf};

use rime_io::tokenizer::Padding;
use rime_kernels::{Device, DeviceOptions};
use rime_peft::classifier::{self, Method};
use rime_peft::lora::{LoraConfig, LoraInit};
use rime_peft::trainer::{self, Encoded, Session};

type BoxErr = Box<dyn std::error::Error>;

/// Embed texts with an encoder (mean-pooled, L2-normalized; sentence-transformers' convention).
///
/// Examples:
///   rime embed "The quick brown fox" "A lazy dog"
///   rime embed --model models/all-minilm-l6-v2 --file sentences.txt > embeddings.jsonl
///   rime embed --adapter runs/fine_foods/best "tasty snack"
#[derive(clap::Args, Debug)]
pub struct EmbedArgs {
    /// Texts to embed (one JSON line each, in this order, after those of --file).
    pub texts: Vec<String>,
    /// Model folder (config.json, model.safetensors, tokenizer.json). Default: the fetched all-MiniLM-L6-v2.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Read texts from a file, one per line (empty lines are skipped).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Keep the mean-pooled vectors as they are (no L2 normalization).
    #[arg(long)]
    pub no_normalize: bool,
    /// A LoRA adapter folder (adapter_config.json + adapter_model.safetensors, peft's format) applied to the
    /// model. With it, choose the GPU with RIME_ADAPTER.
    // A String, not a PathBuf: clap copies this value into the global `--adapter` (GPU) of the top-level
    // command, which shares the id and reads it as a String; see `run`.
    #[arg(long)]
    pub adapter: Option<String>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Longer texts are truncated (reported on stderr). Default: the model's sentence_bert_config.json
    /// max_seq_length, else 512 (capped at the model's max_position_embeddings).
    #[arg(long)]
    pub max_length: Option<usize>,
}

/// `max_seq_length` of a sentence-transformers folder, when it says.
fn sentence_max_length(model: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(model.join("sentence_bert_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("max_seq_length")?.as_u64().map(|x| x as usize)
}

fn read_texts(a: &EmbedArgs) -> Result<Vec<String>, BoxErr> {
    let mut texts = Vec::new();
    if let Some(f) = &a.file {
        let s = std::fs::read_to_string(f).map_err(|e| format!("--file {}: {e}", f.display()))?;
        texts.extend(s.lines().filter(|l| !l.trim().is_empty()).map(String::from));
    }
    texts.extend(a.texts.iter().cloned());
    if texts.is_empty() {
        return Err(match &a.file {
            Some(f) => format!("--file {}: no text in it (and none on the command line)", f.display()).into(),
            None => "no text to embed: give TEXT arguments or --file".into(),
        });
    }
    Ok(texts)
}

/// Load an adapter folder's tensors into the session's store; returns the method whose graph rewrite applies
/// it. Only LoRA changes the encoder; the modules it adapts must exist in the model (or the adapter would
/// silently do nothing).
fn load_adapter(dev: &Device, store: &mut rime_graph::ParamStore, dir: &Path) -> Result<Method, BoxErr> {
    let ad = rime_io::PeftAdapter::load(dir)?;
    let c = &ad.config;
    match c.peft_type.as_str() {
        "LORA" => {}
        "RIME_PROBE" => {
            eprintln!(
                "note: {} holds a classification head only; embeddings are those of the base model",
                dir.display()
            );
            return Ok(Method::Probe);
        }
        t => {
            return Err(format!("--adapter {}: peft_type {t} is not supported by embed (LORA is)", dir.display()).into())
        }
    }
    if c.r == 0 {
        return Err(format!("--adapter {}: adapter_config.json has r = 0", dir.display()).into());
    }
    if c.use_dora || !c.rank_pattern.is_empty() || !c.alpha_pattern.is_empty() {
        return Err(format!(
            "--adapter {}: DoRA and per-module rank_pattern/alpha_pattern are not supported by embed",
            dir.display()
        )
        .into());
    }
    let pairs = ad.lora_pairs();
    if pairs.is_empty() {
        return Err(format!("--adapter {}: a LORA adapter without lora_A/lora_B tensors", dir.display()).into());
    }
    for p in &pairs {
        if store.find(&format!("{}.weight", p.module)).is_none() {
            return Err(format!(
                "--adapter {}: tensor '{}' adapts module '{}', which this model does not have (another base model?)",
                dir.display(),
                p.a,
                p.module
            )
            .into());
        }
    }
    classifier::load_adapter(dev, store, dir)?;
    Ok(Method::Lora(LoraConfig {
        rank: c.r,
        alpha: c.lora_alpha as f32,
        targets: c.target_modules.clone(),
        rslora: c.use_rslora,
        init: LoraInit::Kaiming,
        seed: 0,
        dropout: 0.0,
        dora: c.use_dora,
    }))
}

/// Mean-pooled (and, unless told otherwise, L2-normalized) embeddings of `texts`, [n, hidden] row-major.
pub fn embed(
    dev: &Device,
    model: &Path,
    adapter: Option<&Path>,
    texts: &[String],
    batch_size: usize,
    max_length: usize,
    normalize: bool,
) -> Result<(Vec<f32>, usize), BoxErr> {
    if batch_size == 0 {
        return Err("--batch-size must be at least 1".into());
    }
    if max_length < 2 {
        return Err("--max-length must be at least 2 (the [CLS] and [SEP] tokens)".into());
    }
    if !model.is_dir() {
        return Err(format!(
            "--model {}: expected a Hugging Face model folder of a BERT encoder (config.json, model.safetensors, \
             tokenizer.json)",
            model.display()
        )
        .into());
    }
    let (mut store, bcfg, prefix, tok) = trainer::open_model(dev, model, max_length)?;
    let max_length = tok.max_length().unwrap_or(max_length);
    let method = match adapter {
        Some(dir) => load_adapter(dev, &mut store, dir)?,
        None => Method::Probe,
    };
    let hook = classifier::hook_for(&method);
    // The session's graph ends in a classification head; an adapter without one gets a dummy 1-class head
    // (its logits are ignored).
    if store.find(classifier::HEAD_WEIGHT).is_none() {
        classifier::init_head(dev, &mut store, bcfg.hidden, 1, 0)?;
    }
    let hidden = bcfg.hidden;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let enc = tok.encode_batch(&refs, None, Padding::Longest)?;
    let t = enc.seq_len;
    let mut e = Encoded { ids: vec![], types: vec![], labels: vec![-100; texts.len()] };
    for (r, len) in enc.lengths().into_iter().enumerate() {
        e.ids.push(enc.input_ids[r * t..r * t + len].to_vec());
        e.types.push(enc.token_type_ids[r * t..r * t + len].to_vec());
    }
    let truncated = enc.truncated.iter().filter(|&&x| x).count();
    if truncated > 0 {
        eprintln!("warning: {truncated} of {} texts truncated to {max_length} tokens", texts.len());
    }
    let batch = batch_size.min(texts.len());
    let mut sess = Session::for_inference(dev, store, bcfg, prefix, hook, batch, max_length);
    let (_, mut pooled) = sess.predict(&e, |_| {})?;
    if normalize {
        // torch.nn.functional.normalize: x / max(‖x‖, 1e-12)
        for row in pooled.chunks_mut(hidden) {
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|x| *x /= n);
        }
    }
    Ok((pooled, hidden))
}

pub fn run(opts: &DeviceOptions, a: &EmbedArgs) -> Result<(), BoxErr> {
    let texts = read_texts(a)?;
    let model = match &a.model {
        Some(m) => m.clone(),
        None => crate::train::default_model()?,
    };
    let max_length = a.max_length.or_else(|| sentence_max_length(&model)).unwrap_or(512);
    let dev = Device::new(opts)?;
    let adapter = a.adapter.as_ref().map(PathBuf::from);
    let (emb, hidden) = embed(&dev, &model, adapter.as_deref(), &texts, a.batch_size, max_length, !a.no_normalize)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (text, row) in texts.iter().zip(emb.chunks(hidden)) {
        if let Some(i) = row.iter().position(|x| !x.is_finite()) {
            return Err(format!("embedding of {text:?} has a non-finite value at {i}: {}", row[i]).into());
        }
        // Written by hand to keep the key order (text first); f32 values in their shortest round-trip form.
        writeln!(out, "{{\"text\":{},\"embedding\":{}}}", serde_json::to_string(text)?, serde_json::to_string(row)?)?;
    }
    out.flush()?;
    Ok(())
}
