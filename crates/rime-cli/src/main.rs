//! The `rime` command-line tool: a thin layer over the library crates that parses flags, prints progress
//! and results, and turns errors into messages that name the file, tensor or flag at fault.

mod bench;
mod embed;
mod facade_err;
mod generate;
mod info;
mod inspect;
mod merge;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rime",
    version,
    about = "Fine-tune and merge pretrained transformers on any GPU (Vulkan, Metal, DX12; lavapipe on CPU-only machines)",
    long_about = None,
)]
struct Cli {
    /// Choose the GPU by a substring of its adapter name (see `rime info`); also RIME_ADAPTER. (`--adapter`
    /// of eval/embed/generate names a peft adapter folder; `rime info --adapter NAME` picks a GPU too.)
    #[arg(long, global = true, value_name = "NAME")]
    gpu: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the adapters wgpu sees, the one rime picks, its limits and features, and run a kernel self-check.
    Info(info::InfoArgs),
    /// Fine-tune a model (no arguments: the main job, LoRA on MiniLM for fine_foods reviews).
    Train(train::TrainArgs),
    /// Evaluate an adapter written by `rime train` on labelled data.
    Eval(train::EvalArgs),
    /// Merge checkpoints (mergekit-style YAML: linear, task_arithmetic, ties, dare, slerp) or fold a LoRA adapter.
    Merge(merge::MergeArgs),
    /// Sentence embeddings (mean-pooled, L2-normalized), one JSON line per text.
    Embed(embed::EmbedArgs),
    /// Show a checkpoint's tensors, dtypes, shapes, parameter count and architecture (safetensors, GGUF, peft).
    Inspect(inspect::InspectArgs),
    /// Benchmark kernels and a LoRA training step against a CPU baseline measured in the same run.
    Bench(bench::BenchArgs),
    /// Generate text from a Llama GGUF model (greedy, KV cache); --chat applies the model's chat template.
    Generate(generate::GenerateArgs),
}

fn main() {
    let cli = Cli::parse();
    let opts = rime_kernels::DeviceOptions { adapter: cli.gpu.clone() };
    let r = match cli.cmd {
        Cmd::Info(a) => info::run(&opts, &a),
        Cmd::Train(a) => train::run(&opts, &a),
        Cmd::Merge(a) => merge::run(&opts, &a),
        Cmd::Eval(a) => train::run_eval(&opts, &a),
        Cmd::Embed(a) => embed::run(&opts, &a),
        Cmd::Inspect(a) => inspect::run(&opts, &a),
        Cmd::Bench(a) => bench::run(&opts, &a),
        Cmd::Generate(a) => generate::run(&opts, &a),
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        let mut src = std::error::Error::source(&*e);
        while let Some(s) = src {
            eprintln!("  caused by: {s}");
            src = s.source();
        }
        std::process::exit(1);
    }
}
