//! rime as an accelerator backend: upload tensors, run the matmul and attention kernels on the GPU, read the
//! results back and check them against rime's plain-Rust references (the same names as in `shaders/`).
//!
//! `cargo run --release --example kernels`

use rime::kernels::{self, reference};
use rime::Gpu;

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn main() -> Result<(), rime::Error> {
    let gpu = Gpu::new()?;
    let info = gpu.info();
    println!("GPU: {} ({}), subgroups: {}, f16: {}", info.name, info.backend, info.subgroups, info.shader_f16);
    let fill = |n: usize, seed: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect() };

    // A Linear layer: x [M, K] times a weight [N, K] transposed, plus a bias [N].
    let (m, k, n) = (64, 96, 48);
    let (x, w, bias) = (fill(m * k, 0.1), fill(n * k, 0.7), fill(n, 1.3));
    let y = kernels::matmul_forward(
        &gpu,
        &gpu.upload(&x, &[m, k])?,
        &gpu.upload(&w, &[n, k])?,
        Some(&gpu.upload(&bias, &[n])?),
        false,
        true,
    )?;
    let dims = reference::matmul::MatmulDims { batch: 1, m, k, n, b_batched: false, trans_a: false, trans_b: true };
    let want = reference::matmul::matmul_forward(&x, &w, Some(&bias), &dims);
    println!("matmul_forward    [{m}x{k}]·[{n}x{k}]ᵀ  max |GPU − CPU| = {:.2e}", max_diff(&gpu.download(&y)?, &want));

    // Causal self-attention: batch 2, 16 tokens, 4 heads of 32.
    let (b, t, h, d) = (2, 16, 4, 32);
    let (q, kk, v) = (fill(b * t * h * d, 0.2), fill(b * t * h * d, 0.5), fill(b * t * h * d, 0.9));
    let up = |data: &[f32]| gpu.upload(data, &[b, t, h, d]);
    let scale = 1.0 / (d as f32).sqrt();
    let (out, _lse) = kernels::attention_forward(&gpu, &up(&q)?, &up(&kk)?, &up(&v)?, None, true, scale)?;
    let dims = reference::attention::Dims { b, t, s: t, nh: h, nkv: h, hs: d };
    let (want, _) = reference::attention::attention_forward(&dims, &q, &kk, &v, None, true, scale);
    println!(
        "attention_forward [{b}x{t}x{h}x{d}] causal max |GPU − CPU| = {:.2e}",
        max_diff(&gpu.download(&out)?, &want)
    );
    Ok(())
}
