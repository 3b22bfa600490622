//! CPU reference for shaders/rope.wgsl (not written yet).
