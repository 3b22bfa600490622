//! CPU reference for shaders/elementwise.wgsl (not written yet).
