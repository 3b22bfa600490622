//! CPU reference for shaders/merge.wgsl (not written yet).
