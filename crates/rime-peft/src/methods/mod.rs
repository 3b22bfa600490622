//! Tuning methods, one file each.

pub mod bottleneck;
pub mod ia3;
pub mod lora;
pub mod prompt;
pub mod svfit;
