//! Helpers shared by rime-graph's tests: one device per test binary and seeded uniform values.

use rand::{Rng, SeedableRng};
use rime_kernels::{Device, DeviceOptions};
use std::sync::OnceLock;

pub fn dev() -> &'static Device {
    static D: OnceLock<Device> = OnceLock::new();
    D.get_or_init(|| Device::new(&DeviceOptions::default()).expect("a wgpu adapter (lavapipe in CI)"))
}

/// `n` values uniform in [-s, s), seeded.
pub fn rnd(seed: u64, n: usize, s: f32) -> Vec<f32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-s..s)).collect()
}
