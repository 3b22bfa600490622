//! CPU reference for shaders/attention.wgsl (not written yet).
