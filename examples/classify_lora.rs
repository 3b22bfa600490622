//! Fine-tune all-MiniLM-L6-v2 with LoRA on 384 food reviews held in memory, report test accuracy, and save
//! the adapter in Hugging Face peft's format.
//!
//! `cargo run --release --example classify_lora [OUT_DIR]`

use rime::finetune::{self, Event, LoraConfig, TextClassData, TrainConfig};

/// (texts, labels) of the first `n` rows of a JSONL file of {"text", "label"} objects.
fn rows(file: &str, n: usize) -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(file).expect("the repository's data/ folder");
    let v: Vec<serde_json::Value> = text.lines().take(n).map(|l| serde_json::from_str(l).unwrap()).collect();
    let field = |k: &str| v.iter().map(|r| r[k].as_str().unwrap().to_string()).collect();
    (field("text"), field("label"))
}

fn main() -> Result<(), rime::Error> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "runs/classify_lora".into());
    let (texts, labels) = rows("data/fine_foods/train.jsonl", 384);
    let (test_texts, test_labels) = rows("data/fine_foods/test.jsonl", 200);

    let gpu = rime::Gpu::new()?;
    let lora = LoraConfig { rank: 8, alpha: 16.0, ..LoraConfig::default() };
    let cfg = TrainConfig { epochs: 2, lr: 3e-3, batch_size: 16, max_length: 64, ..TrainConfig::default() };
    let run = finetune::classify(
        &gpu,
        rime::models_dir().join("all-minilm-l6-v2"),
        lora.into(),
        TextClassData::new(texts, labels),
        Some(TextClassData::new(test_texts, test_labels)),
        &cfg,
        |e| match e {
            Event::Eval { epoch, metrics, .. } => println!("epoch {epoch}: accuracy {:.3}", metrics.accuracy),
            Event::Step { step, loss, .. } if step % 5 == 0 => println!("step {step:3}: loss {loss:.4}"),
            _ => {}
        },
    )?;
    println!("test accuracy {:.4}, macro-F1 {:.4}", run.summary.eval_accuracy, run.summary.eval_macro_f1);
    run.save(&out)?;
    println!("peft adapter written to {out}/{}", run.adapter_folder);
    Ok(())
}
