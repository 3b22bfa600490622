#![allow(dead_code)]
//! Helpers shared by rime-graph's tests: one device per test binary and seeded uniform values.

use rand::{Rng, SeedableRng};
use rime_graph::{Executor, ParamStore, Var};
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

/// Compares the executor's gradient of every trainable parameter with central differences of the GPU loss at
/// `probes` coordinates each, drawn with `seed`. f32 forward: eps 1e-2, tolerance 2e-3 abs + 3% rel.
#[allow(dead_code)]
pub fn check_grads(ex: &mut Executor, store: &ParamStore, loss: Var, probes: usize, seed: u64) {
    let d = dev();
    ex.backward_only(d).unwrap();
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    for (id, p) in store.trainable() {
        let g = ex.read_param_grad(d, id).unwrap();
        let mut w = store.read_f32(d, id).unwrap();
        for _ in 0..probes {
            let i = r.random_range(0..w.len());
            let orig = w[i];
            let eps = 1e-2f32;
            let mut at = |v: f32| {
                w[i] = v;
                d.write_f32(&p.tensor, &w).unwrap();
                ex.forward(d).unwrap();
                ex.read(d, loss).unwrap()[0] as f64
            };
            let (up, down) = (at(orig + eps), at(orig - eps));
            w[i] = orig;
            d.write_f32(&p.tensor, &w).unwrap();
            let fd = ((up - down) / (2.0 * eps as f64)) as f32;
            let tol = 2e-3 + 0.03 * fd.abs().max(g[i].abs());
            assert!((fd - g[i]).abs() <= tol, "{}[{i}]: autodiff {} vs finite difference {fd}", p.name, g[i]);
        }
    }
}
