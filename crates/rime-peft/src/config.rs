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
}

impl WeightStorage {
    /// `f32`, `f16` or `bf16`.
    pub fn parse(s: &str) -> Option<WeightStorage> {
        match s {
            "f32" => Some(WeightStorage::F32),
            "f16" => Some(WeightStorage::F16),
            "bf16" => Some(WeightStorage::BF16),
            _ => None,
        }
    }

    pub fn dtype(self) -> rime_kernels::DType {
        match self {
            WeightStorage::F32 => rime_kernels::DType::F32,
            WeightStorage::F16 => rime_kernels::DType::F16,
            WeightStorage::BF16 => rime_kernels::DType::BF16,
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
    /// Continue from the output folder's checkpoint. Default false.
    pub resume: bool,
    /// Stop after this many steps. Default None.
    pub max_steps: Option<usize>,
    /// Storage of the frozen linear weights. Default [`WeightStorage::F32`].
    pub weights: WeightStorage,
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
            max_steps: None,
            weights: WeightStorage::F32,
        }
    }
}

impl TrainConfig {
    /// Refuse values no run can use, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::invalid("batch_size", "0: must be at least 1"));
        }
        if self.epochs == 0 {
            return Err(Error::invalid("epochs", "0: must be at least 1"));
        }
        if self.max_length == 0 {
            return Err(Error::invalid("max_length", "0: must be at least 1"));
        }
        if let Some(m) = self.micro_batch_size {
            if m == 0 || m > self.batch_size {
                return Err(Error::invalid(
                    "micro_batch_size",
                    format!("{m} must be between 1 and batch_size {}", self.batch_size),
                ));
            }
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(Error::invalid("lr", format!("{}: must be a finite number >= 0", self.lr)));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err(Error::invalid("warmup_ratio", format!("{}: must be between 0 and 1", self.warmup_ratio)));
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
        let o = TrainConfig { schedule: Schedule::Linear, warmup_ratio: 0.1, ..TrainConfig::default() }.optimizer(100);
        assert!(matches!(o.schedule, LrSchedule::Linear { warmup: 10, total: 100 }));
    }
}
