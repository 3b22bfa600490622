//! Launchers for shaders/elementwise.wgsl (not written yet).

use crate::pipeline::Spec;

pub fn specs() -> Vec<(&'static str, Spec)> {
    Vec::new()
}
