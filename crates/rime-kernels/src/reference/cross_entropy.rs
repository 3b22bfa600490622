//! CPU reference for shaders/cross_entropy.wgsl (not written yet).
