//! The embedded WGSL sources (every `shaders/*.wgsl`, found by build.rs), the common prelude prepended to
//! each, and the list of declared specializations that the naga validation test walks.

use crate::error::{Error, Result};
use crate::pipeline::Spec;

include!(concat!(env!("OUT_DIR"), "/shaders_gen.rs"));

/// Helpers every shader may use. f16/bf16 tensors are stored packed, two elements per u32 word, so a
/// kernel reads element `i` of a packed array `w` as `unpack_f16(w[i >> 1u], i)`.
pub const COMMON: &str = r#"
fn unpack_f16(word: u32, i: u32) -> f32 {
    let v = unpack2x16float(word);
    return select(v.x, v.y, (i & 1u) == 1u);
}
fn unpack_bf16(word: u32, i: u32) -> f32 {
    let bits = select(word << 16u, word & 0xffff0000u, (i & 1u) == 1u);
    return bitcast<f32>(bits);
}
// Flat workgroup index over a 2-D dispatch grid (see grid_1d in the launcher).
fn flat_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}
"#;

/// The source of `file`, with the common helpers and a specialization prelude prepended.
pub fn source_with_prelude(file: &str, prelude: &str) -> Result<String> {
    let src = SHADERS
        .iter()
        .find(|(n, _)| *n == file)
        .map(|(_, s)| *s)
        .ok_or_else(|| Error::UnknownShader(file.to_string()))?;
    Ok(format!("{prelude}\n{COMMON}\n{src}"))
}

/// Every (file, specialization) the launchers can ask for; the validation test parses and validates each.
pub fn declared_specs() -> Vec<(&'static str, Spec)> {
    crate::ops::declared_specs()
}
