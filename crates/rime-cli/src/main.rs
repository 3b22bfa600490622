//! The `rime` command-line tool: a thin layer over the library crates that parses flags, prints progress
//! and results, and turns errors into messages that name the file, tensor or flag at fault.

#[macro_use]
mod out;

mod bench;
mod embed;
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
    Train(Box<train::TrainArgs>),
    /// Evaluate an adapter written by `rime train` on labelled data.
    Eval(train::EvalArgs),
    // No doc comment here: it would replace MergeArgs' long help (the YAML reference) in `rime merge --help`.
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
    out::flush();
    if let Err(e) = r {
        // stderr may be closed too: the message is lost then, never a panic.
        use std::io::Write;
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "error: {}", message(e.as_ref()));
        let mut src = std::error::Error::source(&*e);
        while let Some(s) = src {
            let _ = writeln!(err, "  caused by: {s}");
            src = s.source();
        }
        std::process::exit(1);
    }
}

/// The flag of each config field the library names in [`rime_peft::Error::Invalid`] (the library never names a
/// flag; the CLI prints its own spelling).
const FLAGS: &[(&str, &str)] = &[
    // tuning methods
    ("rank", "--rank"),
    ("alpha", "--alpha"),
    ("lora_dropout", "--lora-dropout"),
    ("targets", "--targets"),
    ("init", "--init"),
    ("svfit_energy", "--svfit-energy"),
    ("adapter_size", "--adapter-size"),
    ("adapter_mode", "--adapter-mode"),
    ("adapter_scale", "--adapter-scale"),
    ("num_virtual_tokens", "--num-virtual-tokens"),
    ("prompt_init", "--prompt-init"),
    ("reduction", "--reduction"),
    ("drop_layers", "--lst-drop-layers"),
    ("gate_temperature", "--lst-gate-temperature"),
    ("heads", "--lst-heads"),
    ("dropout", "--lst-dropout"),
    // the run
    ("epochs", "--epochs"),
    ("lr", "--lr"),
    ("weight_decay", "--weight-decay"),
    ("batch_size", "--batch-size"),
    ("micro_batch_size", "--micro-batch-size"),
    ("max_length", "--max-length"),
    ("seed", "--seed"),
    ("warmup_ratio", "--warmup-ratio"),
    ("schedule", "--schedule"),
    ("max_grad_norm", "--max-grad-norm"),
    ("patience", "--patience"),
    ("eval_fraction", "--eval-fraction"),
    ("crop_scale", "--crop-scale"),
    ("save_every", "--save-every"),
    ("resume", "--resume"),
    ("overwrite", "--force"),
    ("max_steps", "--max-steps"),
    ("weights", "--weights"),
    ("gradient_checkpointing", "--gradient-checkpointing"),
    ("method", "--method"),
    ("matryoshka_dims", "--matryoshka"),
    ("matryoshka_weights", "--matryoshka-weights"),
    ("dim", "--dim"),
    // data and model
    ("model", "--model"),
    ("train", "--train"),
    ("eval", "--eval"),
    ("data", "--data"),
    // embed and generate (the facade's arguments)
    ("adapter", "--adapter"),
    ("prompt", "--prompt"),
    ("chat", "--chat"),
    ("max_new_tokens", "--max-new-tokens"),
];

/// The flag for a library config field (the field itself when the CLI has no such flag).
fn flag(field: &str) -> &str {
    FLAGS.iter().find(|(f, _)| *f == field).map_or(field, |(_, flag)| flag)
}

/// An error as the CLI prints it: a refused config value or facade argument names its flag.
fn message(e: &(dyn std::error::Error + 'static)) -> String {
    let peft = match e.downcast_ref::<rime::Error>() {
        Some(rime::Error::Invalid { argument, message }) => return format!("{}: {message}", flag(argument)),
        // The merge library says how to replace an output in its own terms; here that is --force.
        Some(rime::Error::Merge(rime_merge::Error::OutputExists { path, when })) => {
            return format!("{path}: {when}; not replaced without --force")
        }
        Some(rime::Error::Tuning(p)) => Some(p),
        _ => e.downcast_ref::<rime_peft::Error>(),
    };
    match peft {
        Some(rime_peft::Error::Invalid { field, message }) => format!("{} {message}", flag(field)),
        // The trainer says how to replace or continue an output folder in its own terms: --force, --resume.
        Some(rime_peft::Error::OutputExists { path }) => format!(
            "{}: the output folder exists and is not empty; not replaced without --force (or continue its run with \
             --resume)",
            path.display()
        ),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_fields_print_as_flags() {
        let e: Box<dyn std::error::Error> = Box::new(rime_peft::Error::invalid("lora_dropout", "1.5: must be below 1"));
        assert_eq!(message(e.as_ref()), "--lora-dropout 1.5: must be below 1");
        let e: Box<dyn std::error::Error> = Box::new(rime_peft::Error::invalid("unknown_field", "x"));
        assert_eq!(message(e.as_ref()), "unknown_field x");
        // through the facade: its own arguments and the tuning layer's fields
        let e: Box<dyn std::error::Error> =
            Box::new(rime::Error::Invalid { argument: "batch_size", message: "must be at least 1".into() });
        assert_eq!(message(e.as_ref()), "--batch-size: must be at least 1");
        let e: Box<dyn std::error::Error> =
            Box::new(rime::Error::from(rime_peft::Error::invalid("rank", "0: must be at least 1")));
        assert_eq!(message(e.as_ref()), "--rank 0: must be at least 1");
        let exists = rime_merge::Error::OutputExists { path: "out".into(), when: "exists" };
        let e: Box<dyn std::error::Error> = Box::new(rime::Error::from(exists));
        assert_eq!(message(e.as_ref()), "out: exists; not replaced without --force");
        for f in
            ["rank", "alpha", "lora_dropout", "targets", "init", "svfit_energy", "adapter_size", "num_virtual_tokens"]
        {
            assert!(flag(f).starts_with("--"), "{f}");
        }
    }
}
