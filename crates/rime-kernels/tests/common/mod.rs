//! Shared test helpers: one device per test binary, seeded random data, tolerance checks that say where
//! and by how much a kernel differs from its reference.
#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rime_kernels::{Device, DeviceOptions};
use std::sync::OnceLock;

pub fn dev() -> &'static Device {
    static DEV: OnceLock<Device> = OnceLock::new();
    DEV.get_or_init(|| Device::new(&DeviceOptions::default()).expect("a wgpu adapter (lavapipe in CI)"))
}

pub fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Uniform values in [-scale, scale).
pub fn randn(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut r = rng(seed);
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

/// Assert |got - want| <= atol + rtol * |want| everywhere; the message names the first offender.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs reference {}", got.len(), want.len());
    let mut worst = (0usize, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        let tol = atol + rtol * w.abs();
        assert!(
            d <= tol || (g.is_nan() && w.is_nan()),
            "{what}: index {i}: got {g}, want {w} (|diff| {d} > tol {tol})"
        );
        if d > worst.1 {
            worst = (i, d);
        }
    }
}

/// Central finite difference of a scalar function f at x along each coordinate (f64 accumulation).
pub fn finite_diff(x: &[f32], eps: f32, mut f: impl FnMut(&[f32]) -> f64) -> Vec<f32> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = x[i];
            x[i] = orig + eps;
            let up = f(&x);
            x[i] = orig - eps;
            let down = f(&x);
            x[i] = orig;
            ((up - down) / (2.0 * eps as f64)) as f32
        })
        .collect()
}

/// Random valid blocks for a weight [rows, cols]: random bytes, each f16 scale replaced by a finite value of
/// either sign in [1e-3, 0.1] (any other bytes form a valid block of these types).
pub fn random_blocks(qtype: rime_kernels::QType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    use rand::Rng;
    let mut g = rng(seed);
    let (bs, bb) = qtype.block();
    let scales: &[usize] = match qtype {
        rime_kernels::QType::Q8_0 | rime_kernels::QType::Q4_0 | rime_kernels::QType::Q5_0 => &[0],
        rime_kernels::QType::Q4_1 | rime_kernels::QType::Q4K => &[0, 2],
        rime_kernels::QType::Q6K => &[208],
    };
    let mut out = Vec::with_capacity(rows * cols / bs * bb);
    for _ in 0..rows * cols / bs {
        let mut blk: Vec<u8> = (0..bb).map(|_| g.random::<u8>()).collect();
        for &o in scales {
            let v: f32 = g.random_range(1e-3..0.1) * if g.random::<bool>() { 1.0 } else { -1.0 };
            blk[o..o + 2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
        }
        out.extend(blk);
    }
    out
}
