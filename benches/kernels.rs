//! `cargo bench`: the cases of `rime bench` (crates/rime-bench) with the same-run CPU baselines.
//! `cargo bench --bench kernels -- [matmul|attention|lora|merge|train-step|all] [--quick] [--json]`.

use rime_bench::{Options, Suite};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    // `cargo bench` passes `--bench`; without it (`cargo test --benches`) only a smoke run on toy shapes.
    let tiny = flag("--tiny") || !flag("--bench");
    let case = args.iter().find(|a| !a.starts_with('-')).map_or("all", |s| s.as_str());
    let suite = Suite::parse(case)?;
    let mut opts = Options::new(flag("--quick"), tiny);
    opts.wall = flag("--wall");
    let dev = rime_kernels::Device::new(&rime_kernels::DeviceOptions::default())?;
    let json = flag("--json");
    if !json {
        println!("adapter: {} | CPU baseline threads: {}", rime_bench::adapter_label(&dev), rime_bench::cpu_threads());
        println!("{}", rime_bench::table_header());
    }
    rime_bench::run(&dev, suite, &opts, &mut |r| {
        if json {
            println!("{}", r.to_json());
        } else {
            println!("{r}");
        }
    })?;
    Ok(())
}
