//! Launchers for shaders/softmax.wgsl (not written yet).

use crate::pipeline::Spec;

pub fn specs() -> Vec<(&'static str, Spec)> {
    Vec::new()
}
