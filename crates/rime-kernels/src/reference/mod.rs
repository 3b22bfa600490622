//! Plain-Rust CPU versions of every kernel, with the same names as the WGSL entry points and launchers.
//! They are the test oracle: simple loops, f32 (f64 where accumulation order matters), no cleverness.

pub mod attention;
pub mod cache;
pub mod concat;
pub mod convert;
pub mod cross_entropy;
pub mod dora;
pub mod elementwise;
pub mod embedding;
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

/// The larger of two values, NaN when either is NaN (`f64::max` returns the other operand, which would turn a
/// NaN row into numbers: rime's kernels propagate NaN).
pub fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}
