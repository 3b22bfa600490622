//! `rime bench`: kernel and training-step benchmarks with a CPU baseline measured in the same run (the
//! cases live in rime-bench, shared with `cargo bench`). Prints a table, or one JSON object per case.

use std::io::Write;

use rime_bench::{CaseResult, Options, Suite};
use rime_kernels::{Device, DeviceOptions};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Which cases: matmul, attention, lora, merge, train-step or all.
    #[arg(default_value = "all", value_parser = Suite::NAMES)]
    pub case: String,
    /// One JSON object per case on stdout (one per line) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Skip the largest shapes (2048², the 4096-wide Llama layer) and take fewer runs.
    #[arg(long)]
    pub quick: bool,
    /// Time with wall clock and a device sync even where the adapter has timestamp queries.
    #[arg(long)]
    pub wall: bool,
    /// Timed runs per case (the median is reported).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Toy shapes, for smoke tests.
    #[arg(long, hide = true)]
    pub tiny: bool,
}

/// The 1-minute load average (other jobs on the same cores skew every number).
fn load_avg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

pub fn run(opts: &DeviceOptions, a: &BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    let suite = Suite::parse(&a.case)?;
    let dev = Device::new(opts)?;
    let mut o = Options::new(a.quick, a.tiny);
    o.wall = a.wall;
    if let Some(r) = a.runs {
        if r == 0 {
            return Err("--runs must be at least 1".into());
        }
        o.runs = r;
        o.train_steps = r;
    }
    let timing = if dev.has_timestamps() && !a.wall { "GPU timestamp queries" } else { "wall time + device sync" };
    let load = load_avg();
    let load_s = load.map_or("unknown".to_string(), |l| format!("{l:.2}"));
    let mut stdout = crate::out::Out;
    if a.json {
        errln!(
            "rime bench {}: {} | timing: {timing} | CPU baseline threads: {} | load {load_s}",
            a.case,
            rime_bench::adapter_label(&dev),
            rime_bench::cpu_threads()
        );
    } else {
        outln!("adapter:  {}", rime_bench::adapter_label(&dev));
        outln!("timing:   {timing}, median of {} runs after {} warm-up", o.runs, o.warmup.max(1));
        outln!("baseline: CPU, {} threads (gemm crate; Rust loop for merge)", rime_bench::cpu_threads());
        outln!("load:     {load_s} (1-minute average before the run; other jobs skew every number)");
        outln!();
        outln!("{}", rime_bench::table_header());
    }
    let mut on_result = |r: &CaseResult| {
        if a.json {
            let mut v = r.to_json();
            if let (Some(m), Some(l)) = (v.as_object_mut(), load_avg()) {
                m.insert("load_avg_1m".into(), l.into());
            }
            let _ = writeln!(stdout, "{v}");
        } else {
            let _ = writeln!(stdout, "{r}");
            if let Some(x) = r.extra.get("examples_per_s").and_then(|x| x.as_f64()) {
                let share = r.extra.get("outside_kernels_share").and_then(|x| x.as_f64());
                let _ = writeln!(
                    stdout,
                    "{:<28} {:.2} examples/s (baseline {:.2}), {:.0} ms/step, outside kernels {}",
                    "",
                    x,
                    r.extra.get("baseline_examples_per_s").and_then(|x| x.as_f64()).unwrap_or(f64::NAN),
                    r.ms,
                    share.map_or("n/a".to_string(), |s| format!("{:.1}%", 100.0 * s)),
                );
            }
            if let Some(rows) = r.extra.get("profile").and_then(|p| p.as_array()) {
                let _ = writeln!(stdout, "{:<28} where one step's kernel time goes (each dispatch timed alone):", "");
                for row in rows.iter().take(12) {
                    let _ = writeln!(
                        stdout,
                        "{:<30} {:<34} {:>4} calls {:>9.2} ms {:>6.1}%",
                        "",
                        row["kernel"].as_str().unwrap_or("?"),
                        row["calls"].as_u64().unwrap_or(0),
                        row["ms"].as_f64().unwrap_or(f64::NAN),
                        100.0 * row["share"].as_f64().unwrap_or(f64::NAN)
                    );
                }
            }
        }
        let _ = stdout.flush();
    };
    let results = rime_bench::run(&dev, suite, &o, &mut on_result)?;
    if !a.json {
        if let Some(worst) = results.iter().min_by(|x, y| x.ratio.total_cmp(&y.ratio)) {
            outln!();
            outln!("furthest from the baseline: {} (ratio {:.3})", worst.name, worst.ratio);
        }
        outln!("load after the run: {}", load_avg().map_or("unknown".to_string(), |l| format!("{l:.2}")));
    }
    Ok(())
}
