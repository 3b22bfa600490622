//! Bad input through the facade: clear errors naming the argument, file or adapter, never a panic.

use rime::encoder::EncoderOptions;
use rime::{Decoder, Encoder, Gpu};

use crate::common::*;

#[test]
fn no_such_gpu_lists_what_there_is() {
    let err = Gpu::by_name("no-such-gpu-anywhere").err().expect("an error");
    let msg = err.to_string();
    assert!(msg.contains("no-such-gpu-anywhere"), "{msg}");
    assert!(!msg.contains("--"), "a library error names a CLI flag: {msg}");
}

#[test]
fn missing_models_name_the_path() {
    let err = Encoder::load(gpu(), "/nonexistent/model").err().expect("an error").to_string();
    assert!(err.starts_with("model: /nonexistent/model"), "{err}");
    let err = Decoder::load(gpu(), "/nonexistent/model.gguf").err().expect("an error").to_string();
    assert!(err.starts_with("model: /nonexistent/model.gguf"), "{err}");
}

#[test]
fn encoder_arguments_are_checked() {
    let Some(model) = minilm() else { return };
    let err = Encoder::load_with(gpu(), &model, EncoderOptions { batch_size: 0, ..Default::default() });
    assert!(err.err().expect("an error").to_string().starts_with("batch_size:"));
    // An adapter for another model (a module MiniLM lacks) is refused, not silently ignored.
    let dir = scratch("foreign-adapter");
    let mut ad = rime_io::PeftAdapter::load(golden("minilm_lora_peft_adapter")).unwrap();
    for t in &mut ad.tensors {
        t.name = t.name.replace("layer.0.", "layer.17.");
    }
    ad.save(&dir).unwrap();
    let opts = EncoderOptions { adapter: Some(dir.clone()), ..Default::default() };
    let err = Encoder::load_with(gpu(), &model, opts).err().expect("an error").to_string();
    assert!(err.contains("layer.17") && err.contains(&dir.display().to_string()), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
