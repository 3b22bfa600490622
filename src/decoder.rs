//! Text generation from a decoder (Llama-family GGUF files such as SmolLM2): greedy decoding with a KV cache,
//! optionally through the model's chat template and with a peft LoRA adapter.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rime_models::generate::{generate_greedy, render_chat, Decoder as KvDecoder};
use rime_models::llama::{self, LlamaModel};

use crate::{Error, Gpu, Result};

/// How a [`Decoder`] is loaded.
#[derive(Debug, Clone, Default)]
pub struct DecoderOptions {
    /// A peft LoRA (or DoRA) adapter folder, applied on the GPU while decoding: its factors sit beside the
    /// frozen weights and each adapted linear computes `W·x + s·B·(A·x)` (nothing is folded).
    pub adapter: Option<PathBuf>,
    /// How the matrices are held on the GPU: f32 (the default), f16 (half the memory, about twice the decoding
    /// speed) or the file's quantized blocks ([`Weights::Quantized`], dequantized inside the kernels).
    pub weights: Weights,
}

/// How a GGUF's matrices are held on the GPU ([`DecoderOptions::weights`], and `--weights` of causal-LM training).
pub use rime_models::llama::GgufWeights as Weights;

/// How one generation runs.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate, at least 1 and at most the model's context length; generation stops earlier at
    /// an end-of-sequence or end-of-turn token, or when prompt and generated tokens fill the context
    /// ([`Generation::stopped_at_context`]).
    pub max_new_tokens: usize,
    /// Wrap the prompt in the model's chat template as one user message, generation prompt added.
    pub chat: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 256, chat: false }
    }
}

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated text (the prompt not included).
    pub text: String,
    /// The generated token ids.
    pub tokens: Vec<u32>,
    /// Tokens in the (templated) prompt.
    pub prompt_tokens: usize,
    /// Generation ended at an end-of-sequence token (not at the token limit).
    pub stopped_at_eos: bool,
    /// Generation ended because prompt and generated tokens filled the model's context (before
    /// [`GenerateOptions::max_new_tokens`]).
    pub stopped_at_context: bool,
    /// Seconds to run the prompt.
    pub prefill_secs: f64,
    /// Decoded tokens per second after the prompt.
    pub tokens_per_sec: f64,
}

/// A decoder model on a [`Gpu`].
///
/// ```
/// use rime::{decoder::GenerateOptions, Decoder, Gpu};
/// let gpu = Gpu::new()?;
/// let mut lm = Decoder::load(&gpu, rime::models_dir().join("smollm2-135m-instruct.Q4_1.gguf"))?;
/// let opts = GenerateOptions { max_new_tokens: 8, chat: true };
/// let reply = lm.generate("What is the capital of France?", &opts)?;
/// assert!(reply.text.contains("Paris"));
/// # Ok::<(), rime::Error>(())
/// ```
pub struct Decoder<'g> {
    gpu: &'g Gpu,
    model: LlamaModel,
    eos: Vec<u32>,
    load_secs: f64,
}

impl<'g> Decoder<'g> {
    /// Loads a GGUF file (weights dequantized to f32 on the GPU; tokenizer and chat template from its metadata).
    pub fn load(gpu: &'g Gpu, path: impl AsRef<Path>) -> Result<Decoder<'g>> {
        Decoder::load_with(gpu, path, &DecoderOptions::default())
    }

    /// [`Decoder::load`] with an adapter or half-precision weights.
    pub fn load_with(gpu: &'g Gpu, path: impl AsRef<Path>, opts: &DecoderOptions) -> Result<Decoder<'g>> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::invalid("model", format!("{}: no such file", path.display())));
        }
        let t0 = Instant::now();
        let model = llama::load_gguf_with(gpu.device(), path, opts.adapter.as_deref(), opts.weights)?;
        let mut eos = model.eos_tokens.clone();
        // Chat models end a turn with their end-of-turn token, which may differ from the file's eos.
        for t in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"] {
            if let Some(id) = model.tokenizer.token_to_id(t) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        Ok(Decoder { gpu, model, eos, load_secs: t0.elapsed().as_secs_f64() })
    }

    /// Seconds the load took.
    pub fn load_secs(&self) -> f64 {
        self.load_secs
    }

    /// Modules a LoRA adapter adapts.
    pub fn adapted_modules(&self) -> &[String] {
        &self.model.folded
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &rime_io::Tokenizer {
        &self.model.tokenizer
    }

    /// The token ids a prompt becomes (through the chat template when `chat`).
    pub fn encode_prompt(&self, prompt: &str, chat: bool) -> Result<Vec<u32>> {
        let m = &self.model;
        let tok = &m.tokenizer;
        let ids = if chat {
            let tmpl = m.chat_template.as_deref().ok_or_else(|| {
                Error::invalid("chat", format!("{} has no chat template (tokenizer.chat_template)", m.source.display()))
            })?;
            let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
            let text = render_chat(tmpl, prompt, &name(m.bos_token), &name(m.eos_tokens.first().copied()))?;
            tok.encode(&text, false)?
        } else {
            tok.encode(prompt, true)?
        };
        if ids.is_empty() {
            return Err(Error::invalid("prompt", "encodes to no tokens"));
        }
        Ok(ids)
    }

    /// Generates greedily from `prompt`.
    pub fn generate(&mut self, prompt: &str, opts: &GenerateOptions) -> Result<Generation> {
        self.generate_streaming(prompt, opts, |_| {})
    }

    /// [`Decoder::generate`], handing each new piece of text to `on_text` as soon as it is complete (byte-level
    /// tokens can split a character; a piece never does).
    pub fn generate_streaming(
        &mut self,
        prompt: &str,
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let ctx = self.model.cfg.max_positions;
        if opts.max_new_tokens == 0 {
            return Err(Error::invalid("max_new_tokens", "must be at least 1"));
        }
        if opts.max_new_tokens > ctx {
            return Err(Error::invalid(
                "max_new_tokens",
                format!("{} is beyond the model's context of {ctx} tokens (prompt included)", opts.max_new_tokens),
            ));
        }
        let ids = self.encode_prompt(prompt, opts.chat)?;
        let m = &self.model;
        let max_seq = ids.len().saturating_add(opts.max_new_tokens).min(ctx);
        if ids.len() >= max_seq {
            return Err(Error::invalid(
                "prompt",
                format!("{} tokens leave no room under the model's context of {}", ids.len(), m.cfg.max_positions),
            ));
        }
        let dev = self.gpu.device();
        let mut dec = KvDecoder::new(dev, &m.store, &m.cfg, max_seq)?;
        let tok = &m.tokenizer;
        let (mut generated, mut shown) = (Vec::new(), 0usize);
        let mut fault = None;
        let st = generate_greedy(dev, &mut dec, &ids, opts.max_new_tokens, &self.eos, &mut |id| {
            generated.push(id);
            match tok.decode(&generated, true) {
                Ok(text) => {
                    if !text.ends_with('\u{FFFD}') && text.len() >= shown && text.is_char_boundary(shown) {
                        on_text(&text[shown..]);
                        shown = text.len();
                    }
                }
                Err(e) => {
                    fault.get_or_insert(e);
                }
            }
            Ok(())
        })?;
        if let Some(e) = fault {
            return Err(e.into());
        }
        let text = tok.decode(&st.generated, true)?;
        Ok(Generation {
            text,
            tokens: st.generated.clone(),
            prompt_tokens: st.prompt_tokens,
            stopped_at_eos: st.stopped_at_eos,
            stopped_at_context: !st.stopped_at_eos && st.generated.len() < opts.max_new_tokens,
            prefill_secs: st.prefill_secs,
            tokens_per_sec: st.decode_tokens_per_sec(),
        })
    }
}
