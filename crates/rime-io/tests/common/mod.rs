//! Helpers shared by rime-io's integration tests: scratch folders, the golden folder, and real models that
//! may be absent (a test on one prints a loud SKIPPED line and returns).
#![allow(dead_code)]

use std::path::PathBuf;

/// A fresh, empty scratch folder unique to this test process and `name`.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rime-io-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// `shared/golden/` next to the repository.
pub fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden").join(name)
}

/// The path of a real model, or None after printing why the test is skipped.
pub fn model(name: &str) -> Option<PathBuf> {
    match rime_io::locate_model(name) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("\n!!!!!!!! SKIPPED: model not found, run scripts/fetch-models.sh ({e}) !!!!!!!!\n");
            None
        }
    }
}

/// The path of a golden file, or None after printing why the test is skipped.
pub fn golden_file(name: &str) -> Option<PathBuf> {
    let p = golden(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("\n!!!!!!!! SKIPPED: golden file {} not found !!!!!!!!\n", p.display());
        None
    }
}
