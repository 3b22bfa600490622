//! Launchers for shaders/rope.wgsl (not written yet).

use crate::pipeline::Spec;

pub fn specs() -> Vec<(&'static str, Spec)> {
    Vec::new()
}
