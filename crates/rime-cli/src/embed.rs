//! `rime embed`: sentence embeddings from a BERT encoder, the sentence-transformers way (mean pool over the
//! attention mask, then L2 normalization), optionally with a LoRA adapter applied. One JSON line per text.

use std::io::Write;
use std::path::PathBuf;

use rime::encoder::EncoderOptions;
use rime::Encoder;
use rime_kernels::{Device, DeviceOptions};

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

pub fn run(opts: &DeviceOptions, a: &EmbedArgs) -> Result<(), BoxErr> {
    let texts = read_texts(a)?;
    let model = match &a.model {
        Some(m) => m.clone(),
        None => crate::train::default_model()?,
    };
    let gpu = rime::Gpu::from_device(Device::new(opts)?);
    let eopts = EncoderOptions {
        batch_size: a.batch_size,
        max_length: a.max_length,
        normalize: !a.no_normalize,
        adapter: a.adapter.as_ref().map(PathBuf::from),
    };
    let mut encoder = Encoder::load_with(&gpu, &model, eopts)?;
    for n in encoder.notes() {
        eprintln!("note: {n}");
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let emb = encoder.embed_all(&refs)?;
    if emb.truncated > 0 {
        eprintln!("warning: {} of {} texts truncated to {} tokens", emb.truncated, texts.len(), encoder.max_length());
    }
    let mut out = std::io::BufWriter::new(crate::out::Out);
    for (text, row) in texts.iter().zip(&emb.vectors) {
        if let Some(i) = row.iter().position(|x| !x.is_finite()) {
            return Err(format!("embedding of {text:?} has a non-finite value at {i}: {}", row[i]).into());
        }
        // Written by hand to keep the key order (text first); f32 values in their shortest round-trip form.
        writeln!(out, "{{\"text\":{},\"embedding\":{}}}", serde_json::to_string(text)?, serde_json::to_string(row)?)?;
    }
    out.flush()?;
    Ok(())
}
