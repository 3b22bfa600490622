//! Launchers: one function per WGSL entry point, same name, checking shapes and returning dispatches.

pub mod attention;
pub mod cache;
pub mod concat;
pub mod convert;
pub mod cross_entropy;
pub mod dora;
pub mod elementwise;
pub mod embedding;
pub mod gemv;
pub mod lora;
pub mod matmul;
pub mod merge;
pub mod merge_geo;
pub mod merge_sparse;
pub mod norm;
pub mod optim;
pub mod patch;
pub mod prepend;
pub mod qmatmul;
pub mod reduce;
pub mod rope;
pub mod softmax;

pub use crate::device::grid_1d;
use crate::pipeline::Spec;

/// Each family lists the specializations its launchers use (at least one each).
pub fn declared_specs() -> Vec<(&'static str, Spec)> {
    let mut v = Vec::new();
    v.extend(attention::specs());
    v.extend(cache::specs());
    v.extend(convert::specs());
    v.extend(cross_entropy::specs());
    v.extend(dora::specs());
    v.extend(elementwise::specs());
    v.extend(concat::specs());
    v.extend(embedding::specs());
    v.extend(gemv::specs());
    v.extend(lora::specs());
    v.extend(matmul::specs());
    v.extend(merge::specs());
    v.extend(merge_geo::specs());
    v.extend(merge_sparse::specs());
    v.extend(norm::specs());
    v.extend(optim::specs());
    v.extend(patch::specs());
    v.extend(prepend::specs());
    v.extend(qmatmul::specs());
    v.extend(reduce::specs());
    v.extend(rope::specs());
    v.extend(softmax::specs());
    v
}

/// Uniform parameters as 32-bit words (u32 or f32 bit patterns), the layout every shader's `Params` uses.
pub(crate) fn words(w: &[u32]) -> Vec<u8> {
    bytemuck::cast_slice(w).to_vec()
}
