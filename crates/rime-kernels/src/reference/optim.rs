//! CPU reference for shaders/optim.wgsl (not written yet).
