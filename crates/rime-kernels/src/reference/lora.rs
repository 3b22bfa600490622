//! CPU reference for shaders/lora.wgsl (not written yet).
