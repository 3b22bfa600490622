//! rime-bench: the benchmark cases behind `rime bench` and `cargo bench`. Each case times a rime kernel (or a
//! whole LoRA training step) on the device and, in the same run and on the same machine, the same work on the
//! CPU through the `gemm` crate (candle's CPU GEMM) or a plain Rust loop, and reports both rates and their
//! ratio. Kernel time comes from GPU timestamp queries when the adapter has them (pass begin/end), else from
//! wall time around a submit and a device sync; every number is the median of several runs after warm-up.
//! Nothing here asserts on time: the library returns [`CaseResult`]s and the caller prints them.

mod cases;
mod cpu;
mod timer;

use std::fmt;

pub use timer::{Stats, Timer};

/// Errors of a benchmark run; the lower crates' errors name their tensors and files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kernel(#[from] rime_kernels::Error),
    #[error(transparent)]
    Graph(#[from] rime_graph::Error),
    #[error(transparent)]
    Peft(#[from] rime_peft::Error),
    #[error("bench: {0}")]
    Msg(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which cases to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    Matmul,
    Attention,
    Lora,
    Merge,
    TrainStep,
    LstStep,
    All,
}

impl Suite {
    pub const NAMES: [&'static str; 7] = ["matmul", "attention", "lora", "merge", "train-step", "lst-step", "all"];

    pub fn parse(s: &str) -> Result<Suite> {
        Ok(match s {
            "matmul" => Suite::Matmul,
            "attention" => Suite::Attention,
            "lora" => Suite::Lora,
            "merge" => Suite::Merge,
            "train-step" | "train_step" => Suite::TrainStep,
            "lst-step" | "lst_step" => Suite::LstStep,
            "all" => Suite::All,
            _ => return Err(Error::Msg(format!("unknown case '{s}': expected one of {}", Suite::NAMES.join(", ")))),
        })
    }

    fn includes(self, s: Suite) -> bool {
        self == Suite::All || self == s
    }
}

/// How much to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Skip the largest shapes (2048², the 4096-wide Llama layer) and take fewer runs.
    pub quick: bool,
    /// Toy shapes (smoke tests): every case runs in well under a second.
    pub tiny: bool,
    /// Time with wall clock and a device sync even where timestamp queries exist.
    pub wall: bool,
    /// Warm-up runs before timing.
    pub warmup: usize,
    /// Timed runs; the median is reported.
    pub runs: usize,
    /// Timed training steps.
    pub train_steps: usize,
}

impl Options {
    pub fn new(quick: bool, tiny: bool) -> Options {
        let (warmup, runs, train_steps) = if tiny {
            (1, 2, 2)
        } else if quick {
            (1, 3, 3)
        } else {
            (2, 7, 6)
        };
        Options { quick, tiny, wall: false, warmup, runs, train_steps }
    }
}

/// A measured rate: what it counts and its value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unit {
    /// 10⁹ floating-point operations per second (a multiply-add counts two).
    Gflops,
    /// 10⁹ bytes read plus written per second.
    Gbps,
}

impl Unit {
    pub fn key(self) -> &'static str {
        match self {
            Unit::Gflops => "gflops",
            Unit::Gbps => "gbps",
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Unit::Gflops => "GFLOP/s",
            Unit::Gbps => "GB/s",
        }
    }
}

/// One benchmark case: rime's rate and the baseline's, measured in the same run.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// e.g. `matmul_minilm_ffn_up`.
    pub name: String,
    /// e.g. `4096x384x1536 (MxKxN, x·Wᵀ)`.
    pub shape: String,
    pub unit: Unit,
    /// rime's rate (median run).
    pub value: f64,
    /// What the baseline is (`gemm 0.18 (rayon, 2 threads)`).
    pub baseline: String,
    pub baseline_value: f64,
    /// rime / baseline (above 1: rime is faster).
    pub ratio: f64,
    /// rime's median time per run, and the baseline's, in milliseconds.
    pub ms: f64,
    pub baseline_ms: f64,
    /// `gpu-timestamps` or `wall+sync`.
    pub timing: &'static str,
    pub adapter: String,
    /// Case-specific numbers (train-step: examples/s, time outside kernels ...).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl CaseResult {
    /// One flat JSON object: name, shape, gflops|gbps, baseline, baseline_gflops|baseline_gbps, ratio,
    /// adapter, and the rest.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        let k = self.unit.key();
        m.insert("name".into(), self.name.clone().into());
        m.insert("shape".into(), self.shape.clone().into());
        m.insert(k.into(), round_sig(self.value, 5).into());
        m.insert("baseline".into(), self.baseline.clone().into());
        m.insert(format!("baseline_{k}"), round_sig(self.baseline_value, 5).into());
        m.insert("ratio".into(), round_sig(self.ratio, 5).into());
        m.insert("adapter".into(), self.adapter.clone().into());
        m.insert("ms".into(), round(self.ms, 4).into());
        m.insert("baseline_ms".into(), round(self.baseline_ms, 4).into());
        m.insert("timing".into(), self.timing.into());
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        serde_json::Value::Object(m)
    }
}

impl fmt::Display for CaseResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<28} {:<44} {:>9.2} {:>9.2} {:>7.3}  {}",
            self.name,
            self.shape,
            self.value,
            self.baseline_value,
            self.ratio,
            self.unit.label()
        )
    }
}

/// The table header matching [`CaseResult`]'s `Display`.
pub fn table_header() -> String {
    format!("{:<28} {:<44} {:>9} {:>9} {:>7}  unit", "case", "shape", "rime", "baseline", "ratio")
}

/// `x` to `digits` significant digits (rates span 0.01 to 10⁴: a fixed number of decimals loses small ones).
fn round_sig(x: f64, digits: i32) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    round(x, digits - 1 - x.abs().log10().floor() as i32)
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    if x.is_finite() {
        (x * p).round() / p
    } else {
        x
    }
}

/// The adapter as reported in results: `name (backend, device type)`.
pub fn adapter_label(dev: &rime_kernels::Device) -> String {
    let i = dev.info();
    format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
}

/// Run the cases of `suite`, calling `on_result` as each finishes (they can take seconds each).
pub fn run(
    dev: &rime_kernels::Device,
    suite: Suite,
    opts: &Options,
    on_result: &mut dyn FnMut(&CaseResult),
) -> Result<Vec<CaseResult>> {
    let ctx = cases::Ctx::new(dev, opts);
    let mut out = Vec::new();
    let mut push = |r: CaseResult| {
        on_result(&r);
        out.push(r);
    };
    if suite.includes(Suite::Matmul) {
        for r in cases::matmul(&ctx)? {
            push(r);
        }
    }
    if suite.includes(Suite::Attention) {
        for r in cases::attention(&ctx)? {
            push(r);
        }
    }
    if suite.includes(Suite::Lora) {
        push(cases::lora(&ctx)?);
    }
    if suite.includes(Suite::Merge) {
        push(cases::merge(&ctx)?);
    }
    if suite.includes(Suite::TrainStep) {
        push(cases::train_step(&ctx)?);
    }
    if suite.includes(Suite::LstStep) {
        push(cases::lst_step(&ctx)?);
    }
    Ok(out)
}

/// The CPU threads the baselines use (rayon's pool: all cores unless RAYON_NUM_THREADS says otherwise).
pub fn cpu_threads() -> usize {
    rayon::current_num_threads()
}
