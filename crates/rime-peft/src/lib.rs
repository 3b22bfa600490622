//! rime-peft: parameter-efficient tuning methods as rewrites of a model graph, and the trainer.

pub mod lora;
pub mod metrics;
