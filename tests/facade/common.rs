//! Shared by the facade tests: one GPU per test binary, real models that may be absent (a loud SKIPPED line),
//! golden files, scratch folders.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use rime::Gpu;

pub fn gpu() -> &'static Gpu {
    static G: OnceLock<Gpu> = OnceLock::new();
    G.get_or_init(|| Gpu::new().expect("a wgpu adapter (lavapipe on machines without a GPU)"))
}

pub fn model(name: &str) -> Option<PathBuf> {
    let p = rime::models_dir().join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("\n!!!!!!!! SKIPPED: {} not found; run scripts/fetch-models.sh !!!!!!!!\n", p.display());
        None
    }
}

pub fn minilm() -> Option<PathBuf> {
    model("all-minilm-l6-v2")
}

pub fn smollm() -> Option<PathBuf> {
    model("smollm2-135m-instruct.Q4_1.gguf")
}

pub fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/golden").join(name)
}

/// A fresh, empty folder unique to this process and `name`.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rime-facade-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch folder");
    dir
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Seeded values in [-1, 1).
pub fn rnd(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
