//! What a training run does, independent of the task: every field has a default (the CLI's defaults, so
//! `TrainConfig::default()` is the README's main job) and every choice is an enum. The model, the data and
//! the output folder are arguments of [`crate::trainer::train`], not fields here.

use rime_graph::{LrSchedule, OptimConfig};

use crate::{Error, Result};

/// How the learning rate moves after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// The peak rate throughout (after warmup).
    #[default]
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Half-cosine decay to 0 at the last step.
    Cosine,
}

impl Schedule {
    /// `constant`, `linear` or `cosine`.
    pub fn parse(s: &str) -> Option<Schedule> {
        match s {
            "constant" => Some(Schedule::Constant),
            "linear" => Some(Schedule::Linear),
            "cosine" => Some(Schedule::Cosine),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        }
    }

    /// The executor's schedule for `warmup` and `total` steps.
    pub fn lr_schedule(self, warmup: u64, total: u64) -> LrSchedule {
        match self {
            Schedule::Constant => LrSchedule::Constant,
            Schedule::Linear => LrSchedule::Linear { warmup, total },
            Schedule::Cosine => LrSchedule::Cosine { warmup, total },
        }
    }
}

/// How the frozen linear weights are stored on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightStorage {
    /// Exact.
    #[default]
    F32,
    /// Half the memory; results move by about f16's precision.
    F16,
    /// Half the memory, f32's range.
    BF16,
    /// A GGUF decoder's matrices kept in the file's block types (Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K),
    /// dequantized inside the kernels (QLoRA-style: causal-LM training and generation). Encoders (safetensors)
    /// have no quantized weights and refuse it.
    Quantized,
}

impl WeightStorage {
    /// `f32`, `f16`, `bf16` or `q`.
    pub fn parse(s: &str) -> Option<WeightStorage> {
        match s {
            "f32" => Some(WeightStorage::F32),
            "f16" => Some(WeightStorage::F16),
            "bf16" => Some(WeightStorage::BF16),
            "q" | "quantized" => Some(WeightStorage::Quantized),
            _ => None,
        }
    }

    /// The dtype an encoder's frozen matrices are stored in; an error naming the setting for
    /// [`WeightStorage::Quantized`], which only a GGUF decoder has.
    pub fn dtype(self) -> crate::Result<rime_kernels::DType> {
        Ok(match self {
            WeightStorage::F32 => rime_kernels::DType::F32,
            WeightStorage::F16 => rime_kernels::DType::F16,
            WeightStorage::BF16 => rime_kernels::DType::BF16,
            WeightStorage::Quantized => {
                return Err(crate::Error::invalid(
                    "weights",
                    "quantized: only a GGUF decoder (causal-LM training) keeps quantized weights; an encoder's \
                     safetensors have none (use f32, f16 or bf16)",
                ))
            }
        })
    }
}

/// The classification head of a text classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadKind {
    /// A linear layer on the mask-weighted mean of the real tokens' last hidden states (sentence-transformers
    /// pooling); saved as `head.*`.
    #[default]
    Mean,
    /// The head of Hugging Face's `BertForSequenceClassification`: the checkpoint's pooler (dense + tanh on the
    /// first token, frozen, as peft leaves it for `task_type: SEQ_CLS`) and a trainable linear `classifier`;
    /// saved as `classifier.*`, the names `PeftModel` loads into that class.
    Hf,
}

impl HeadKind {
    /// `mean` or `hf`.
    pub fn parse(s: &str) -> Option<HeadKind> {
        match s {
            "mean" => Some(HeadKind::Mean),
            "hf" => Some(HeadKind::Hf),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HeadKind::Mean => "mean",
            HeadKind::Hf => "hf",
        }
    }
}

/// The settings of a training run shared by every task. Field names are the names errors use
/// ([`crate::Error::Invalid`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Passes over the training data (evaluation and a checkpoint after each). Default 1.
    pub epochs: usize,
    /// Peak learning rate of AdamW. Default 1e-3.
    pub lr: f32,
    /// AdamW's decoupled weight decay. Default 0.01.
    pub weight_decay: f32,
    /// Rows per optimizer step. Default 32.
    pub batch_size: usize,
    /// Run each step as micro-batches of this many rows, accumulating gradients (the same update, a
    /// micro-batch's activation memory). None (default): the whole batch at once.
    pub micro_batch_size: Option<usize>,
    /// Longer examples are truncated (in tokens). Default 128.
    pub max_length: usize,
    /// Seeds initialization, shuffling, the held-out split and dropout. Default 0.
    pub seed: u64,
    /// Fraction of the steps spent warming the learning rate up. Default 0.
    pub warmup_ratio: f32,
    /// Default [`Schedule::Constant`].
    pub schedule: Schedule,
    /// Clip the global gradient norm to this (None: no clipping). Default Some(1.0).
    pub max_grad_norm: Option<f32>,
    /// Stop after this many evaluations without improvement (None, the default: never).
    pub patience: Option<usize>,
    /// Without an eval set: the fraction of the training data held out (seeded) for evaluation. Default 0.1.
    pub eval_fraction: f64,
    /// With an output folder: write a resumable checkpoint every this many steps (and at each epoch end);
    /// 0: epoch ends only. Default 50.
    pub save_every: usize,
    /// Continue from the output folder's checkpoint. Default false. A run that had finished is not
    /// resumed (an error says so; its results stay as they are).
    pub resume: bool,
    /// Replace the files of a previous run in a non-empty output folder (best/, checkpoint/, metrics, plots;
    /// nothing else in it). Default false: a non-empty output folder is refused unless resuming
    /// ([`crate::Error::OutputExists`]).
    pub overwrite: bool,
    /// Stop after this many steps. Default None.
    pub max_steps: Option<usize>,
    /// Storage of the frozen linear weights. Default [`WeightStorage::F32`].
    pub weights: WeightStorage,
    /// Text classification's head. Default [`HeadKind::Mean`].
    pub head: HeadKind,
    /// Gradient checkpointing of the frozen blocks (causal-LM decoders): each decoder layer's activations are
    /// recomputed for its backward instead of kept (`rime_graph::Graph::checkpoint`), the same gradients
    /// for about a third more compute and a fraction of the activation memory. Default false.
    pub gradient_checkpointing: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            lr: 1e-3,
            weight_decay: 0.01,
            batch_size: 32,
            micro_batch_size: None,
            max_length: 128,
            seed: 0,
            warmup_ratio: 0.0,
            schedule: Schedule::Constant,
            max_grad_norm: Some(1.0),
            patience: None,
            eval_fraction: 0.1,
            save_every: 50,
            resume: false,
            overwrite: false,
            max_steps: None,
            weights: WeightStorage::F32,
            head: HeadKind::Mean,
            gradient_checkpointing: false,
        }
    }
}

impl TrainConfig {
    /// Refuse values no run can use, naming the field. Every entry point ([`crate::train`], the evaluators
    /// and baselines) calls it before anything is loaded or written.
    pub fn validate(&self) -> Result<()> {
        at_least("batch_size", self.batch_size, 1)?;
        at_least("epochs", self.epochs, 1)?;
        check_max_length(self.max_length)?;
        if let Some(m) = self.micro_batch_size {
            if m == 0 || m > self.batch_size {
                return Err(Error::invalid(
                    "micro_batch_size",
                    format!("{m} must be between 1 and batch_size {}", self.batch_size),
                ));
            }
        }
        if let Some(m) = self.max_steps {
            at_least("max_steps", m, 1)?;
        }
        if let Some(p) = self.patience {
            at_least("patience", p, 1)?;
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(Error::invalid("lr", format!("{}: must be a finite number >= 0", self.lr)));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::invalid("weight_decay", format!("{}: must be a finite number >= 0", self.weight_decay)));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(Error::invalid("warmup_ratio", format!("{}: must be between 0 and 1", self.warmup_ratio)));
        }
        if let Some(g) = self.max_grad_norm {
            if !(g.is_finite() && g > 0.0) {
                return Err(Error::invalid(
                    "max_grad_norm",
                    format!("{g}: must be a finite number > 0 (None turns clipping off)"),
                ));
            }
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return Err(Error::invalid(
                "eval_fraction",
                format!("{}: must be at least 0 and below 1", self.eval_fraction),
            ));
        }
        Ok(())
    }

    /// Rows of one graph: the micro-batch, or the whole batch.
    pub fn rows(&self) -> usize {
        self.micro_batch_size.unwrap_or(self.batch_size)
    }

    /// AdamW with this run's schedule over `total` steps and its clipping.
    pub fn optimizer(&self, total: usize) -> OptimConfig {
        let warmup = (self.warmup_ratio * total as f32).round() as u64;
        let mut optim = OptimConfig::adamw(self.lr, self.weight_decay);
        optim.schedule = self.schedule.lr_schedule(warmup, total as u64);
        optim.max_grad_norm = self.max_grad_norm;
        optim
    }
}

/// The fewest tokens a `max_length` may hold: the two special tokens of a sequence (`[CLS]` and `[SEP]`, or a
/// decoder's BOS and EOS) and one token of text.
pub const MIN_MAX_LENGTH: usize = 3;

/// Refuse a `max_length` too short to hold the special tokens and a token of text.
pub fn check_max_length(max_length: usize) -> Result<()> {
    if max_length < MIN_MAX_LENGTH {
        return Err(Error::invalid(
            "max_length",
            format!(
                "{max_length}: must be at least {MIN_MAX_LENGTH} (the two special tokens of a sequence and one token \
                 of text)"
            ),
        ));
    }
    Ok(())
}

/// Refuse a count below `min`, naming `field`.
pub(crate) fn at_least(field: &'static str, value: usize, min: usize) -> Result<()> {
    if value < min {
        return Err(Error::invalid(field, format!("{value}: must be at least {min}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_main_job_and_bad_values_name_their_field() {
        let c = TrainConfig::default();
        assert_eq!((c.epochs, c.batch_size, c.max_length, c.save_every), (1, 32, 128, 50));
        assert_eq!(c.max_grad_norm, Some(1.0));
        assert!(c.validate().is_ok());
        let bad = TrainConfig { micro_batch_size: Some(40), ..TrainConfig::default() };
        match bad.validate() {
            Err(Error::Invalid { field, .. }) => assert_eq!(field, "micro_batch_size"),
            other => panic!("{other:?}"),
        }
        let bad = TrainConfig { batch_size: 0, ..TrainConfig::default() };
        assert!(matches!(bad.validate(), Err(Error::Invalid { field: "batch_size", .. })));
        assert_eq!(Schedule::parse("cosine"), Some(Schedule::Cosine));
        assert_eq!(Schedule::parse("nope"), None);
        let base = TrainConfig::default;
        let cases: Vec<(TrainConfig, &str)> = vec![
            (TrainConfig { epochs: 0, ..base() }, "epochs"),
            (TrainConfig { max_length: 1, ..base() }, "max_length"),
            (TrainConfig { max_length: 2, ..base() }, "max_length"),
            (TrainConfig { lr: f32::NAN, ..base() }, "lr"),
            (TrainConfig { lr: -1e-3, ..base() }, "lr"),
            (TrainConfig { lr: f32::INFINITY, ..base() }, "lr"),
            (TrainConfig { weight_decay: f32::NAN, ..base() }, "weight_decay"),
            (TrainConfig { warmup_ratio: -1.0, ..base() }, "warmup_ratio"),
            (TrainConfig { warmup_ratio: f32::NAN, ..base() }, "warmup_ratio"),
            (TrainConfig { warmup_ratio: 1.5, ..base() }, "warmup_ratio"),
            (TrainConfig { max_grad_norm: Some(f32::NAN), ..base() }, "max_grad_norm"),
            (TrainConfig { max_grad_norm: Some(-1.0), ..base() }, "max_grad_norm"),
            (TrainConfig { max_grad_norm: Some(0.0), ..base() }, "max_grad_norm"),
            (TrainConfig { eval_fraction: f64::NAN, ..base() }, "eval_fraction"),
            (TrainConfig { eval_fraction: 1.0, ..base() }, "eval_fraction"),
            (TrainConfig { eval_fraction: -0.1, ..base() }, "eval_fraction"),
            (TrainConfig { max_steps: Some(0), ..base() }, "max_steps"),
            (TrainConfig { patience: Some(0), ..base() }, "patience"),
            (TrainConfig { micro_batch_size: Some(0), ..base() }, "micro_batch_size"),
        ];
        for (c, field) in cases {
            match c.validate() {
                Err(Error::Invalid { field: f, message }) => assert_eq!(f, field, "{message}"),
                other => panic!("{field}: expected a refusal, got {other:?}"),
            }
        }
        assert!(TrainConfig { max_length: MIN_MAX_LENGTH, max_grad_norm: None, ..base() }.validate().is_ok());
        let o = TrainConfig { schedule: Schedule::Linear, warmup_ratio: 0.1, ..TrainConfig::default() }.optimizer(100);
        assert!(matches!(o.schedule, LrSchedule::Linear { warmup: 10, total: 100 }));
    }
}
