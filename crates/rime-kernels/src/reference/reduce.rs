//! CPU reference for shaders/reduce.wgsl (not written yet).
