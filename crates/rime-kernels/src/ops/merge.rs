//! Launchers for shaders/merge.wgsl (not written yet).

use crate::pipeline::Spec;

pub fn specs() -> Vec<(&'static str, Spec)> {
    Vec::new()
}
