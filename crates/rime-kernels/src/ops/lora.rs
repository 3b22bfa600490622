//! Launchers for shaders/lora.wgsl (not written yet).

use crate::pipeline::Spec;

pub fn specs() -> Vec<(&'static str, Spec)> {
    Vec::new()
}
