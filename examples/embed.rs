//! Sentence similarity with all-MiniLM-L6-v2: embed a few sentences on the GPU and print, for each query, the
//! most similar sentence of a small corpus.
//!
//! `cargo run --release --example embed` (after `scripts/fetch-models.sh`)

use rime::encoder::cosine;
use rime::{Encoder, Gpu};

fn main() -> Result<(), rime::Error> {
    let gpu = Gpu::new()?;
    println!("GPU: {}", gpu.info().name);
    let mut encoder = Encoder::load(&gpu, rime::models_dir().join("all-minilm-l6-v2"))?;

    let corpus = [
        "A man is eating food.",
        "A man is riding a horse.",
        "The new movie is awesome.",
        "A cheetah is running behind its prey.",
    ];
    let queries = ["Someone is having a meal.", "The film was great.", "A wild animal chases another one."];
    let docs = encoder.embed(&corpus)?;
    let qs = encoder.embed(&queries)?;
    println!("{} sentences embedded into {} dimensions", docs.len() + qs.len(), encoder.dim());

    for (query, q) in queries.iter().zip(&qs) {
        let (best, score) = docs
            .iter()
            .enumerate()
            .map(|(i, d)| (i, cosine(q, d)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .expect("a non-empty corpus");
        println!("{query:40} -> {:40} (cosine {score:.3})", corpus[best]);
    }
    Ok(())
}
