//! `rime merge`: merge checkpoints from a mergekit-style YAML config, or fold a peft LoRA adapter into its
//! base. All the work is in `rime_merge`; this module parses flags and prints the report.

use std::path::PathBuf;

/// Merge checkpoints without training, on the GPU, one tensor at a time.
///
/// With a CONFIG (mergekit's YAML shape; a mergekit file for these methods runs unchanged):
///
///   merge_method: ties            # linear | task_arithmetic | ties | dare_linear | dare_ties | slerp
///   base_model: models/all-minilm-l6-v2
///   models:
///     - model: runs/sst2          # folder with model.safetensors (or an index), or a .safetensors file
///       parameters: {weight: 0.5, density: 0.5}
///     - model: runs/mnli
///       parameters:
///         weight: [{filter: attention, value: 0.7}, {value: 0.3}]   # per-tensor: first substring match wins
///         density: 0.5
///   parameters: {normalize: true, lambda: 1.0}   # dare_*: also `seed` (default 0); slerp: `t`
///   dtype: float16                # float32 | float16 | bfloat16; default: each tensor as stored in the base
///
/// Formulas and defaults are mergekit 0.1.5's: `normalize` true for linear and ties, false for task_arithmetic
/// and dare_*; `lambda` 1; `density` 1; `weight` 1 (mergekit requires it). task-vector methods (all but
/// linear) need `base_model`; slerp needs the base and exactly one other model. `int8_mask` is accepted and
/// has no effect; `slices`, gradient lists and unknown keys or parameters are errors.
///
/// Folding a LoRA adapter (peft folder with adapter_config.json and adapter_model.safetensors):
///
///   rime merge --fold-lora runs/lora --base models/all-minilm-l6-v2 --out merged
///
/// writes W + (alpha/r)·B·A (alpha/√r with use_rslora) for every adapted module.
///
/// The output folder gets model.safetensors (shards and model.safetensors.index.json above --shard-size),
/// the base's config.json and tokenizer files, and merge_report.json (method, inputs, bytes read and written,
/// seconds, GB/s). It is built in a temporary sibling folder and renamed into place at the end, so a failed
/// merge leaves nothing behind; an existing output folder is refused unless --force.
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct MergeArgs {
    /// The merge config (YAML). Not used with --fold-lora.
    #[arg(required_unless_present = "fold_lora", conflicts_with = "fold_lora")]
    pub config: Option<PathBuf>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace the output folder if it exists.
    #[arg(long)]
    pub force: bool,
    /// Largest shard of the output (e.g. 5GB, 500MB, 2GiB); above it the output is sharded with an index.
    #[arg(long, default_value = "5GB")]
    pub shard_size: String,
    /// Fold this peft LoRA adapter folder into --base instead of merging a config.
    #[arg(long, requires = "base")]
    pub fold_lora: Option<PathBuf>,
    /// The base checkpoint for --fold-lora (folder or .safetensors file).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Output dtype for --fold-lora (float32, float16, bfloat16); default: as stored in the base.
    #[arg(long)]
    pub dtype: Option<String>,
}

pub fn run(opts: &rime_kernels::DeviceOptions, args: &MergeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let shard_size = rime_merge::parse_size(&args.shard_size)?;
    let mopts = rime_merge::MergeOptions { force: args.force, shard_size };
    let report = match (&args.fold_lora, &args.config) {
        (Some(adapter), _) => {
            let base = args.base.as_ref().ok_or("--fold-lora needs --base MODEL")?;
            let dtype = match args.dtype.as_deref() {
                None => None,
                Some("float32") | Some("fp32") => Some(rime_merge::OutDtype::F32),
                Some("float16") | Some("fp16") => Some(rime_merge::OutDtype::F16),
                Some("bfloat16") | Some("bf16") => Some(rime_merge::OutDtype::BF16),
                Some(d) => return Err(format!("--dtype {d}: expected float32, float16 or bfloat16").into()),
            };
            rime_merge::fold_lora(adapter, base, &args.out, dtype, &mopts)?
        }
        (None, Some(config)) => {
            if args.dtype.is_some() {
                return Err("--dtype applies to --fold-lora; put `dtype:` in the merge config".into());
            }
            let cfg = rime_merge::MergeConfig::from_file(config)?;
            let dev = rime_kernels::Device::new(opts)?;
            rime_merge::merge(&dev, &cfg, &args.out, &mopts)?
        }
        (None, None) => return Err("give a merge CONFIG or --fold-lora ADAPTER --base MODEL".into()),
    };
    println!(
        "{}: {} tensors ({} copied) from {} input(s) into {} on {}",
        report.method,
        report.tensors,
        report.copied,
        report.inputs.len(),
        report.output,
        report.adapter
    );
    println!(
        "read {:.1} MB, wrote {:.1} MB in {:.2} s ({:.2} GB/s)",
        report.bytes_read as f64 / 1e6,
        report.bytes_written as f64 / 1e6,
        report.seconds,
        report.gb_per_s
    );
    for n in &report.notes {
        println!("note: {n}");
    }
    Ok(())
}
