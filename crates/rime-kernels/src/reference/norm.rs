//! CPU reference for shaders/norm.wgsl (not written yet).
