//! A uniform model soup of LoRA adapters: train two adapters of all-MiniLM-L6-v2 on different slices of the
//! food reviews (seeds differ too), average them (peft's `add_weighted_adapter`, `cat`, equal weights) and
//! compare each ingredient with the soup on held-out reviews.
//!
//! `cargo run --release --example merge_soup [OUT_DIR]`

use std::path::PathBuf;

use rime::finetune::{self, Columns, LoraConfig, TextClassData, TrainConfig};
use rime::merge::{self, Combination, CombineOptions};

fn main() -> Result<(), rime::Error> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "runs/merge_soup".into()));
    let gpu = rime::Gpu::new()?;
    let model = rime::models_dir().join("all-minilm-l6-v2");
    let all = TextClassData::from_file("data/fine_foods/train.jsonl", &Columns::default())?;
    let slice = |a: usize, b: usize| TextClassData::new(all.texts[a..b].to_vec(), all.labels[a..b].to_vec());
    let held_out = slice(3800, 4000);

    let mut ingredients = Vec::new();
    for (i, start) in [0, 320].into_iter().enumerate() {
        let cfg = TrainConfig { lr: 3e-3, batch_size: 16, max_length: 64, seed: i as u64, ..TrainConfig::default() };
        let lora = LoraConfig { rank: 8, alpha: 16.0, seed: i as u64, ..LoraConfig::default() };
        let run = finetune::classify(&gpu, &model, lora.into(), slice(start, start + 320), None, &cfg, |_| {})?;
        let dir = out.join(format!("ingredient{i}"));
        run.save(&dir)?;
        ingredients.push(dir.join(run.adapter_folder));
    }
    let soup = out.join("soup");
    let weights = vec![1.0 / ingredients.len() as f64; ingredients.len()];
    merge::combine_lora(&gpu, &ingredients, &weights, &CombineOptions::new(Combination::Cat), &soup, true)?;

    for (name, adapter) in ingredients.iter().map(|p| (p.display().to_string(), p)).chain([("soup".into(), &soup)]) {
        let m = finetune::evaluate(&gpu, &model, adapter, &held_out, 32, 64)?;
        println!("{name:40} accuracy {:.3}  loss {:.4}", m.accuracy, m.loss);
    }
    Ok(())
}
