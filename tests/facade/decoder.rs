//! `rime::Decoder` on SmolLM2-135M-Instruct: chat generation, streaming, limits.

use rime::decoder::GenerateOptions;
use rime::Decoder;

use crate::common::*;

#[test]
fn chat_generation_streams_the_same_text() {
    let Some(path) = smollm() else { return };
    let mut lm = Decoder::load(gpu(), &path).unwrap();
    let opts = GenerateOptions { max_new_tokens: 8, chat: true };
    let mut streamed = String::new();
    let out = lm.generate_streaming("What is the capital of France?", &opts, |p| streamed.push_str(p)).unwrap();
    assert_eq!(streamed, out.text);
    assert!(out.text.contains("Paris"), "unexpected reply {:?}", out.text);
    assert!(out.tokens.len() <= 8);
    // The chat template wraps the prompt: more tokens than the plain prompt.
    let plain = lm.encode_prompt("What is the capital of France?", false).unwrap();
    assert!(out.prompt_tokens > plain.len());
    // Greedy decoding is deterministic.
    assert_eq!(lm.generate("What is the capital of France?", &opts).unwrap().tokens, out.tokens);
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let Some(path) = smollm() else { return };
    let mut lm = Decoder::load(gpu(), &path).unwrap();
    let long = "word ".repeat(9000);
    let err = lm.generate(&long, &GenerateOptions { max_new_tokens: 4, chat: false }).unwrap_err();
    assert!(err.to_string().starts_with("prompt:"), "{err}");
}

#[test]
fn max_new_tokens_of_zero_or_beyond_the_context_is_refused_by_name() {
    let Some(path) = smollm() else { return };
    let mut lm = Decoder::load(gpu(), &path).unwrap();
    let err = lm.generate("Hi", &GenerateOptions { max_new_tokens: 0, chat: false }).unwrap_err().to_string();
    assert!(err.starts_with("max_new_tokens:") && err.contains("at least 1"), "{err}");
    for n in [usize::MAX, usize::MAX / 2 + 3, 1 << 40] {
        let err = lm.generate("Hi", &GenerateOptions { max_new_tokens: n, chat: false }).unwrap_err().to_string();
        assert!(err.starts_with("max_new_tokens:") && err.contains("context of 8192 tokens"), "{n}: {err}");
    }
    let out = lm.generate("Hi", &GenerateOptions { max_new_tokens: 1, chat: false }).unwrap();
    assert!(!out.stopped_at_context && out.tokens.len() <= 1);
}
