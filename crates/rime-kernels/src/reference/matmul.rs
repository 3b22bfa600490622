//! CPU reference for shaders/matmul.wgsl (not written yet).
