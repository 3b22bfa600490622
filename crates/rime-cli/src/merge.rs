//! `rime merge`: merge checkpoints from a mergekit-style YAML config, or fold a peft LoRA adapter into its
//! base. All the work is in `rime_merge`; this module parses flags and prints the report.

use std::path::PathBuf;

use rime::merge;

/// Merge checkpoints (mergekit YAML: 17 methods, slices, gradient lists, tokenizer, dtype) or fold/combine LoRA adapters, on the GPU.
///
/// With a CONFIG (mergekit's YAML shape; a mergekit file for these methods runs unchanged):
///
///   merge_method: ties            # linear | task_arithmetic | ties | dare_linear | dare_ties | slerp |
///                                 # passthrough | breadcrumbs | breadcrumbs_ties | della | della_linear | sce |
///                                 # model_stock | nuslerp | multislerp | karcher | arcee_fusion
///   base_model: models/all-minilm-l6-v2
///   models:
///     - model: runs/sst2          # folder with model.safetensors (or an index), or a .safetensors file
///       parameters: {weight: 0.5, density: 0.5}
///     - model: runs/mnli
///       parameters:
///         weight: [{filter: attention, value: 0.7}, {value: 0.3}]   # per-tensor: first substring match wins
///         density: 0.5
///   parameters: {normalize: true, lambda: 1.0}   # dare_*, della*: also `seed` (default 0); slerp: `t`
///   dtype: float16                # compute dtype: float32 | float16 | bfloat16 (default: the inputs' type)
///   out_dtype: float32            # output dtype (default: dtype, else each tensor as stored in the base)
///
/// Formulas and defaults are mergekit 0.1.5's: `normalize` true for linear and ties, false for task_arithmetic
/// and dare_*; `lambda` 1; `density` 1; `weight` 1 (mergekit requires it). task-vector methods (all but
/// linear) need `base_model`; slerp needs the base and exactly one other model. `rescale` (L1-norm rescale
/// after sparsifying; default true for dare_* and della*); breadcrumbs*: per-model `gamma` (default 0.01);
/// della*: per-model `epsilon` (default 0.15); sce: `select_topk` (default 1). `dtype` is computed in as
/// mergekit does (inputs rounded to it, each step rounded). `int8_mask` is accepted and changes no value (in
/// mergekit either); unknown keys or parameters are errors.
///
/// Gradient lists, slices, tokenizer and chat template, as mergekit:
///
///   parameters: {t: [0, 0.5, 0.3, 0.7, 1]}   # anchors spread over the layers, interpolated linearly (a layer i
///                                           # of L at i/(L-1); embeddings, norm, head at 0); also inside filters
///   merge_method: passthrough     # one input per output tensor (optional `scale`): layer stacking
///   slices:                       # output layers = the slices' layer ranges in order; config.json's
///     - sources:                  # num_hidden_layers updated; embeddings from the first slice, norm/head
///         - {model: a, layer_range: [0, 16]}   # from the last
///     - sources:
///         - {model: b, layer_range: [8, 24]}
///   tokenizer_source: base        # base | union (equal vocabularies only) | a model path; or
///                                 # tokenizer: {source: ..., pad_to_multiple_of: N}; embedding and lm_head rows
///                                 # re-indexed to that vocabulary as mergekit fills them
///   chat_template: chatml         # chatml | llama3 | mistral | alpaca | exaone | auto | a Jinja template
///
/// Folding a LoRA adapter (peft folder with adapter_config.json and adapter_model.safetensors):
///
///   rime merge --fold-lora runs/lora --base models/all-minilm-l6-v2 --out merged
///
/// writes W + (alpha/r)·B·A (alpha/√r with use_rslora) for every adapted module. The classification head of an
/// adapter `rime train` wrote (under modules_to_save, not part of the base) is written to OUT/head as a
/// head-only adapter: `rime eval --model OUT --adapter OUT/head` evaluates the folded classifier.
///
/// Combining LoRA adapters into one (peft's add_weighted_adapter: linear, cat, svd, ties, dare_linear,
/// dare_ties, magnitude_prune, with peft's semantics; heads of rime adapters are averaged with the weights):
///
///   rime merge --combine-lora A1,A2,A3 --weights .5,.3,.2 --combination ties --density 0.4 --out DIR
///
/// writes a peft adapter folder (adapter_config.json, adapter_model.safetensors, merge_report.json).
///
/// Learned merges of rime adapters with heads (`rime train` outputs), base_model = the model they tuned:
///   merge_method: greedy_soup    # parameters: {eval_data: FILE, combination: linear|cat, max_length, batch_size}
///   merge_method: atlas          # parameters: {train_data: FILE, eval_data: FILE, examples: 64, steps: 30, lr: 0.05}
/// greedy_soup writes the soup adapter (decisions in merge_report.json); atlas writes the merged model, head/
/// (rime eval --model OUT --adapter OUT/head) and atlas_coefficients.json.
///
/// Geometric merges and arcee_fusion (mergekit 0.1.5's formulas, parameters and defaults):
///   merge_method: model_stock    # base_model + 2 or more models; parameters: {filter_wise: false}
///   merge_method: nuslerp        # 2 models with `weight`, base_model optional;
///                                # parameters: {nuslerp_flatten: true, nuslerp_row_wise: false}
///   merge_method: multislerp     # 1 or more models with `weight`, base_model optional;
///                                # parameters: {normalize_weights: true, eps: 1e-8}
///   merge_method: karcher        # the models (and base_model, if given); parameters: {max_iter: 10, tol: 1e-5}
///   merge_method: arcee_fusion   # base_model + 1 model: the model's values where their importance is an outlier
///
/// The output folder gets model.safetensors (shards and model.safetensors.index.json above --shard-size),
/// the base's config.json and tokenizer files, and merge_report.json (method, inputs, bytes read and written,
/// seconds, GB/s). It is built in a temporary sibling folder and renamed into place at the end, so a failed
/// merge leaves nothing behind; an existing output folder is refused unless --force, and an --out that is (or
/// holds) an input always. Every output tensor is checked: a NaN/Inf weight (e.g. from weights that overflow
/// f32) stops the merge naming the tensor, with nothing written. A merge killed midway leaves only a hidden
/// .OUT.rime-merge-tmp-PID folder (or, killed while replacing with --force, the previous output as
/// .OUT.rime-merge-old-PID); the next merge into OUT removes the first and restores the second (with a note).
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct MergeArgs {
    /// The merge config (YAML). Not used with --fold-lora.
    #[arg(required_unless_present_any = ["fold_lora", "combine_lora"], conflicts_with_all = ["fold_lora", "combine_lora"])]
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
    /// Combine these peft LoRA adapter folders (comma-separated) into one adapter.
    #[arg(long, value_delimiter = ',', conflicts_with = "fold_lora")]
    pub combine_lora: Option<Vec<PathBuf>>,
    /// Weights of --combine-lora, one per adapter (default: 1/N each).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub weights: Option<Vec<f64>>,
    /// peft combination_type: linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune.
    #[arg(long, default_value = "svd")]
    pub combination: String,
    /// Fraction kept by ties, dare_*, magnitude_prune, in (0, 1].
    #[arg(long)]
    pub density: Option<f64>,
    /// peft majority_sign_method for ties / dare_ties: total or frequency.
    #[arg(long, default_value = "total")]
    pub majority_sign: String,
    /// Rank of an svd combination (default: the largest input rank).
    #[arg(long)]
    pub svd_rank: Option<usize>,
    /// Seed of DARE's random drop.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// A merge library error as the CLI prints it: an out-of-range library argument names its flag.
fn flagged(e: Box<dyn std::error::Error>) -> Box<dyn std::error::Error> {
    let arg = match (e.downcast_ref::<rime::Error>(), e.downcast_ref::<rime_merge::Error>()) {
        (Some(rime::Error::Merge(rime_merge::Error::Argument { argument, message })), _)
        | (_, Some(rime_merge::Error::Argument { argument, message })) => Some((*argument, message.clone())),
        _ => None,
    };
    match arg {
        Some((argument, message)) => format!("{} {message}", merge_flag(argument)).into(),
        None => e,
    }
}

/// The flag of a merge library argument.
fn merge_flag(argument: &str) -> &str {
    match argument {
        "shard_size" => "--shard-size",
        "density" => "--density",
        "svd_rank" => "--svd-rank",
        a => crate::flag(a),
    }
}

pub fn run(opts: &rime_kernels::DeviceOptions, args: &MergeArgs) -> Result<(), Box<dyn std::error::Error>> {
    run_merge(opts, args).map_err(flagged)
}

fn run_merge(opts: &rime_kernels::DeviceOptions, args: &MergeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let shard_size = merge::parse_size(&args.shard_size)?;
    let mopts = merge::MergeOptions { force: args.force, shard_size };
    let report = match (&args.fold_lora, &args.config) {
        _ if args.combine_lora.is_some() => {
            let list = args.combine_lora.as_deref().unwrap_or_default();
            if list.is_empty() {
                return Err("--combine-lora needs at least one adapter folder".into());
            }
            let weights = match &args.weights {
                Some(w) => w.clone(),
                None => vec![1.0 / list.len() as f64; list.len()],
            };
            if weights.len() != list.len() {
                return Err(format!("--weights has {} values for {} adapters", weights.len(), list.len()).into());
            }
            let combination = merge::Combination::parse(&args.combination).ok_or_else(|| {
                let known: Vec<&str> = merge::Combination::ALL.iter().map(|(n, _)| *n).collect();
                format!("--combination {}: expected one of {}", args.combination, known.join(", "))
            })?;
            let majority_sign_total = match args.majority_sign.as_str() {
                "total" => true,
                "frequency" => false,
                m => return Err(format!("--majority-sign {m}: expected total or frequency").into()),
            };
            let copts = merge::CombineOptions {
                combination,
                density: args.density,
                majority_sign_total,
                svd_rank: args.svd_rank,
                seed: args.seed,
            };
            let gpu = rime::Gpu::from_device(rime_kernels::Device::new(opts)?);
            merge::combine_lora(&gpu, list, &weights, &copts, &args.out, args.force)?
        }
        (Some(adapter), _) => {
            let base = args.base.as_ref().ok_or("--fold-lora needs --base MODEL")?;
            let dtype = match args.dtype.as_deref() {
                None => None,
                Some("float32") | Some("fp32") => Some(merge::OutDtype::F32),
                Some("float16") | Some("fp16") => Some(merge::OutDtype::F16),
                Some("bfloat16") | Some("bf16") => Some(merge::OutDtype::BF16),
                Some(d) => return Err(format!("--dtype {d}: expected float32, float16 or bfloat16").into()),
            };
            merge::fold_lora(adapter, base, &args.out, dtype, &mopts)?
        }
        (None, Some(config)) => {
            if args.dtype.is_some() {
                return Err("--dtype applies to --fold-lora; put `dtype:` in the merge config".into());
            }
            let cfg = merge::MergeConfig::from_file(config)?;
            let gpu = rime::Gpu::from_device(rime_kernels::Device::new(opts)?);
            merge::run(&gpu, &cfg, &args.out, &mopts)?
        }
        (None, None) => return Err("give a merge CONFIG or --fold-lora ADAPTER --base MODEL".into()),
    };
    outln!(
        "{}: {} tensors ({} copied) from {} input(s) into {} on {}",
        report.method,
        report.tensors,
        report.copied,
        report.inputs.len(),
        report.output,
        report.adapter
    );
    outln!(
        "read {:.1} MB, wrote {:.1} MB in {:.2} s ({:.2} GB/s)",
        report.bytes_read as f64 / 1e6,
        report.bytes_written as f64 / 1e6,
        report.seconds,
        report.gb_per_s
    );
    for n in &report.notes {
        eprintln!("note: {n}");
    }
    Ok(())
}
