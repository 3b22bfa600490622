//! `rime generate`: greedy text generation from a Llama GGUF file with the KV-cache decoder, printing text as
//! it is decoded; `--chat` wraps the prompt in the model's own chat template (rendered with minijinja).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use rime_kernels::{DType, Device, DeviceOptions};
use rime_models::generate::{generate_greedy, render_chat, Decoder};
use rime_models::llama;

type BoxErr = Box<dyn std::error::Error>;

/// Generate text from a Llama GGUF model (greedy decoding with a KV cache).
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// GGUF file (default: the fetched SmolLM2-135M-Instruct, models/smollm2-135m-instruct.Q4_1.gguf).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Apply the model's chat template (one user message, generation prompt added).
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate (stops earlier at an end-of-sequence token).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// A peft LoRA adapter folder, applied on the GPU while decoding (its factors beside the weights).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// How matrices are held on the GPU: f32 or f16.
    #[arg(long, default_value = "f32")]
    pub weights: String,
}

/// Streams decoded text: decodes everything generated so far and prints what is new, holding back an
/// incomplete UTF-8 sequence (byte-level BPE splits characters across tokens).
struct Streamer {
    ids: Vec<u32>,
    printed: usize,
}

impl Streamer {
    fn push(&mut self, tok: &rime_io::Tokenizer, id: u32) -> Result<(), BoxErr> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.printed || !text.is_char_boundary(self.printed) {
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        out.write_all(text[self.printed..].as_bytes())?;
        out.flush()?;
        self.printed = text.len();
        Ok(())
    }
}

pub fn run(opts: &DeviceOptions, a: &GenerateArgs) -> Result<(), BoxErr> {
    let path = a.model.clone().unwrap_or_else(|| rime_io::models_dir().join("smollm2-135m-instruct.Q4_1.gguf"));
    if !path.exists() {
        return Err(
            format!("--model {}: no such file (run scripts/fetch-models.sh for the default)", path.display()).into()
        );
    }
    let dtype = match a.weights.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        w => return Err(format!("--weights {w}: expected f32 or f16").into()),
    };
    let dev = Device::new(opts)?;
    let t0 = Instant::now();
    let m = llama::load_gguf(&dev, &path, a.adapter.as_deref(), dtype)?;
    let load_secs = t0.elapsed().as_secs_f64();
    let tok = &m.tokenizer;
    let ids = if a.chat {
        let tmpl = m
            .chat_template
            .as_deref()
            .ok_or_else(|| format!("--chat: {} has no chat template (tokenizer.chat_template)", path.display()))?;
        let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
        let text = render_chat(tmpl, &a.prompt, &name(m.bos_token), &name(m.eos_tokens.first().copied()))?;
        tok.encode(&text, false)?
    } else {
        tok.encode(&a.prompt, true)?
    };
    if ids.is_empty() {
        return Err("--prompt: the prompt encodes to no tokens".into());
    }
    let max_seq = (ids.len() + a.max_new_tokens).min(m.cfg.max_positions);
    if ids.len() >= max_seq {
        return Err(format!(
            "--prompt: {} tokens leave no room under the model's context of {}",
            ids.len(),
            m.cfg.max_positions
        )
        .into());
    }
    let mut dec = Decoder::new(&dev, &m.store, &m.cfg, max_seq)?;
    let mut eos = m.eos_tokens.clone();
    // Chat models end a turn with their end-of-turn token, which may differ from the file's eos.
    for t in ["<|im_end|>", "<|eot_id|>", "<|end|>"] {
        if let Some(id) = tok.token_to_id(t) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    let mut s = Streamer { ids: Vec::new(), printed: 0 };
    let mut err: Option<BoxErr> = None;
    let st = generate_greedy(&dev, &mut dec, &ids, a.max_new_tokens, &eos, &mut |id| {
        if let Err(e) = s.push(tok, id) {
            err.get_or_insert(e);
        }
        Ok(())
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    println!();
    let n = st.generated.len();
    eprintln!(
        "{} on {}: loaded in {load_secs:.1}s{}; prompt {} tokens in {:.2}s ({:.1} tokens/s); generated {n} tokens{}, \
         {:.2} tokens/s decoding",
        path.display(),
        dev.info().name,
        if m.folded.is_empty() { String::new() } else { format!(" with {} LoRA modules adapted", m.folded.len()) },
        st.prompt_tokens,
        st.prefill_secs,
        st.prompt_tokens as f64 / st.prefill_secs.max(1e-9),
        if st.stopped_at_eos { " (stopped at eos)" } else { "" },
        st.decode_tokens_per_sec(),
    );
    Ok(())
}
