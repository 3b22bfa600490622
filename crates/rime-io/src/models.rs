//! Where the real checkpoints live on this machine: `$RIME_MODELS`, else `<repo>/models` (filled by
//! `scripts/fetch-models.sh`). The repository root is found from this crate's manifest folder at compile time,
//! so tests and examples find the models whatever their working directory.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// The folder models are looked up in: `$RIME_MODELS` when set and non-empty, else `<repo>/models`.
pub fn models_dir() -> PathBuf {
    match std::env::var_os("RIME_MODELS") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_models_dir(),
    }
}

fn repo_models_dir() -> PathBuf {
    // crates/rime-io -> repository root.
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("..").join("models")
}

/// Resolves a model by name (`all-minilm-l6-v2`, `smollm2-135m-instruct.Q4_1.gguf`): first in `$RIME_MODELS`,
/// then in `<repo>/models`.
pub fn locate_model(name: &str) -> Result<PathBuf> {
    let mut searched = Vec::new();
    let mut dirs = Vec::new();
    if let Some(p) = std::env::var_os("RIME_MODELS").filter(|p| !p.is_empty()) {
        dirs.push(PathBuf::from(p));
    }
    dirs.push(repo_models_dir());
    for d in dirs {
        let candidate = d.join(name);
        if candidate.exists() {
            return Ok(candidate);
        }
        searched.push(d.display().to_string());
    }
    Err(Error::ModelNotFound { name: name.to_string(), searched: searched.join(", ") })
}
