//! `rime generate`: greedy text generation from a Llama GGUF file with the KV-cache decoder, printing text as
//! it is decoded; `--chat` wraps the prompt in the model's own chat template (rendered with minijinja).

use std::io::Write;
use std::path::PathBuf;

use rime::decoder::{DecoderOptions, GenerateOptions};
use rime::Decoder;
use rime_kernels::{Device, DeviceOptions};

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
    /// How matrices are held on the GPU: f32, f16 or q (the GGUF's quantized blocks, dequantized inside the
    /// kernels: the least memory).
    #[arg(long, default_value = "f32")]
    pub weights: String,
}

pub fn run(opts: &DeviceOptions, a: &GenerateArgs) -> Result<(), BoxErr> {
    let path = a.model.clone().unwrap_or_else(|| rime_io::models_dir().join("smollm2-135m-instruct.Q4_1.gguf"));
    if !path.exists() {
        return Err(
            format!("--model {}: no such file (run scripts/fetch-models.sh for the default)", path.display()).into()
        );
    }
    let weights = rime::decoder::Weights::parse(&a.weights)
        .ok_or_else(|| format!("--weights {}: expected f32, f16 or q", a.weights))?;
    let gpu = rime::Gpu::from_device(Device::new(opts)?);
    let dopts = DecoderOptions { adapter: a.adapter.clone(), weights };
    let mut lm = Decoder::load_with(&gpu, &path, &dopts)?;
    let gopts = GenerateOptions { max_new_tokens: a.max_new_tokens, chat: a.chat };
    let mut out = crate::out::Out;
    let mut fault = None;
    let st = lm.generate_streaming(&a.prompt, &gopts, |piece| {
        if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
            fault.get_or_insert(e);
        }
    })?;
    if let Some(e) = fault {
        return Err(e.into());
    }
    outln!();
    let n = st.tokens.len();
    let adapted = lm.adapted_modules().len();
    eprintln!(
        "{} on {}: loaded in {:.1}s{}; prompt {} tokens in {:.2}s ({:.1} tokens/s); generated {n} tokens{}, \
         {:.2} tokens/s decoding",
        path.display(),
        gpu.info().name,
        lm.load_secs(),
        if adapted == 0 { String::new() } else { format!(" with {adapted} LoRA modules adapted") },
        st.prompt_tokens,
        st.prefill_secs,
        st.prompt_tokens as f64 / st.prefill_secs.max(1e-9),
        if st.stopped_at_eos {
            " (stopped at eos)".to_string()
        } else if st.stopped_at_context {
            format!(" (stopped: the model's context is full at {} tokens)", st.prompt_tokens + n)
        } else {
            String::new()
        },
        st.tokens_per_sec,
    );
    Ok(())
}
