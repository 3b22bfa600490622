//! CPU reference for shaders/rope.wgsl (Hugging Face rotate_half): the f32 angle pos * inv_freq as PyTorch
//! forms it, then sin/cos in f64.

use crate::ops::rope::inv_freq;

/// x [b, t, nh, hs]; `sign` -1 gives the backward (transposed) rotation.
fn rotate(x: &[f32], t: usize, nh: usize, hs: usize, pos_offset: u32, theta: f32, sign: f64) -> Vec<f32> {
    let f = inv_freq(hs, theta);
    let half = hs / 2;
    let mut out = vec![0f32; x.len()];
    for (head, v) in x.chunks(hs).enumerate() {
        let pos = pos_offset as usize + (head / nh) % t;
        for i in 0..half {
            let angle = (pos as f32 * f[i]) as f64;
            let (s, c) = (sign * angle.sin(), angle.cos());
            let (x1, x2) = (v[i] as f64, v[i + half] as f64);
            out[head * hs + i] = (x1 * c - x2 * s) as f32;
            out[head * hs + i + half] = (x2 * c + x1 * s) as f32;
        }
    }
    out
}

pub fn rope_forward(x: &[f32], t: usize, nh: usize, hs: usize, pos_offset: u32, theta: f32) -> Vec<f32> {
    rotate(x, t, nh, hs, pos_offset, theta, 1.0)
}

pub fn rope_backward(dout: &[f32], t: usize, nh: usize, hs: usize, pos_offset: u32, theta: f32) -> Vec<f32> {
    rotate(dout, t, nh, hs, pos_offset, theta, -1.0)
}

/// rope_forward_at: the position of token 0 is `pos[0]`.
pub fn rope_forward_at(x: &[f32], t: usize, nh: usize, hs: usize, pos: &[u32], theta: f32) -> Vec<f32> {
    rope_forward(x, t, nh, hs, pos[0], theta)
}

pub fn rope_backward_at(dout: &[f32], t: usize, nh: usize, hs: usize, pos: &[u32], theta: f32) -> Vec<f32> {
    rope_backward(dout, t, nh, hs, pos[0], theta)
}
