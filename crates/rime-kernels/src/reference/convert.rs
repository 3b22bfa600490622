//! CPU reference for shaders/convert.wgsl (via the `half` crate, which rounds to nearest even).

use half::{bf16, f16};

pub fn convert_to_f32_forward_f16(src: &[f16]) -> Vec<f32> {
    src.iter().map(|x| x.to_f32()).collect()
}
pub fn convert_to_f32_forward_bf16(src: &[bf16]) -> Vec<f32> {
    src.iter().map(|x| x.to_f32()).collect()
}
pub fn convert_from_f32_forward_f16(src: &[f32]) -> Vec<f16> {
    src.iter().map(|&x| f16::from_f32(x)).collect()
}
pub fn convert_from_f32_forward_bf16(src: &[f32]) -> Vec<bf16> {
    src.iter().map(|&x| bf16::from_f32(x)).collect()
}
