//! CPU reference for shaders/softmax.wgsl (not written yet).
