//! Chat with SmolLM2-135M-Instruct: greedy decoding with a KV cache through the model's own chat template,
//! the reply printed as it is generated.
//!
//! `cargo run --release --example generate -- "What is the capital of France?"`

use std::io::Write;

use rime::decoder::GenerateOptions;
use rime::{Decoder, Gpu};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prompt = std::env::args().nth(1).unwrap_or_else(|| "What is the capital of France?".to_string());
    let gpu = Gpu::new()?;
    let mut lm = Decoder::load(&gpu, rime::models_dir().join("smollm2-135m-instruct.Q4_1.gguf"))?;

    println!("user: {prompt}");
    print!("assistant: ");
    let opts = GenerateOptions { max_new_tokens: 48, chat: true };
    let reply = lm.generate_streaming(&prompt, &opts, |piece| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
    })?;
    println!();
    println!(
        "({} prompt tokens, {} generated at {:.1} tokens/s on {})",
        reply.prompt_tokens,
        reply.tokens.len(),
        reply.tokens_per_sec,
        gpu.info().name
    );
    Ok(())
}
