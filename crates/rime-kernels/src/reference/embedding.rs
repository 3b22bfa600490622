//! CPU reference for shaders/embedding.wgsl (not written yet).
