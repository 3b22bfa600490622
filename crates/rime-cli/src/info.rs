//! `rime info`: what wgpu sees and what rime chose, plus a quick self-check of a few kernels against
//! their CPU references on this adapter.

use rime_kernels::{reference, DType, Device, DeviceOptions};
use serde_json::json;

#[derive(clap::Args)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Choose the GPU adapter by a substring of its name (same as the global --gpu and RIME_ADAPTER).
    #[arg(long, value_name = "NAME")]
    adapter: Option<String>,
    /// Skip the kernel self-check.
    #[arg(long)]
    no_check: bool,
}

type BoxErr = Box<dyn std::error::Error>;

pub fn run(opts: &DeviceOptions, args: &InfoArgs) -> Result<(), BoxErr> {
    let opts = DeviceOptions { adapter: args.adapter.clone().or_else(|| opts.adapter.clone()) };
    let dev = Device::new(&opts)?;
    let info = dev.info();
    let l = dev.limits();
    let check = if args.no_check { None } else { Some(self_check(&dev)) };
    let adapters: Vec<_> = dev
        .adapters_seen()
        .iter()
        .map(|a| {
            json!({"name": a.name, "backend": a.backend, "type": a.device_type, "driver": a.driver, "driver_info": a.driver_info})
        })
        .collect();
    let features: Vec<&str> = [
        (wgpu_f::SHADER_F16, "SHADER_F16"),
        (wgpu_f::SUBGROUP, "SUBGROUP"),
        (wgpu_f::TIMESTAMP_QUERY, "TIMESTAMP_QUERY"),
    ]
    .iter()
    .filter(|(f, _)| dev.features().contains(*f))
    .map(|(_, n)| *n)
    .collect();
    let v = json!({
        "adapters": adapters,
        "chosen": {
            "name": info.name, "backend": format!("{:?}", info.backend), "type": format!("{:?}", info.device_type),
            "driver": info.driver, "driver_info": info.driver_info, "cpu_adapter": dev.is_cpu(),
            "texture_twins": dev.uses_texture_twins(),
        },
        "limits": {
            "max_storage_buffer_binding_size": l.max_storage_buffer_binding_size,
            "max_buffer_size": l.max_buffer_size,
            "max_compute_workgroup_size_x": l.max_compute_workgroup_size_x,
            "max_compute_invocations_per_workgroup": l.max_compute_invocations_per_workgroup,
            "max_compute_workgroup_storage_size": l.max_compute_workgroup_storage_size,
            "max_compute_workgroups_per_dimension": l.max_compute_workgroups_per_dimension,
            "max_storage_buffers_per_shader_stage": l.max_storage_buffers_per_shader_stage,
            "min_subgroup_size": info.subgroup_min_size,
            "max_subgroup_size": info.subgroup_max_size,
        },
        "features": features,
        "self_check": check.as_ref().map(|c| match c { Ok(s) => json!({"ok": true, "detail": s}), Err(e) => json!({"ok": false, "error": e}) }),
    });
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        outln!("adapters seen:");
        for a in dev.adapters_seen() {
            outln!("  - {} ({}, {}, driver: {} {})", a.name, a.backend, a.device_type, a.driver, a.driver_info);
        }
        outln!(
            "chosen: {} ({:?}, {:?}){}",
            info.name,
            info.backend,
            info.device_type,
            if dev.is_cpu() { " [CPU adapter: lavapipe-tuned kernels]" } else { "" }
        );
        outln!(
            "frozen weights: {}",
            if dev.uses_texture_twins() {
                "read through texture twins (CPU adapter; RIME_TEXTURE_TWINS=0 reads their buffers)"
            } else if dev.is_cpu() {
                "read from their buffers (RIME_TEXTURE_TWINS=0)"
            } else {
                "read from their buffers"
            }
        );
        outln!("limits:");
        for (k, val) in v["limits"].as_object().into_iter().flatten() {
            outln!("  {k}: {val}");
        }
        outln!(
            "features: {}",
            if features.is_empty() {
                "(none of SHADER_F16, SUBGROUP, TIMESTAMP_QUERY)".to_string()
            } else {
                features.join(", ")
            }
        );
        match &check {
            Some(Ok(s)) => outln!("kernel self-check: ok ({s})"),
            Some(Err(e)) => outln!("kernel self-check: FAILED: {e}"),
            None => {}
        }
    }
    if let Some(Err(e)) = check {
        return Err(format!("kernel self-check failed: {e}").into());
    }
    Ok(())
}

use rime_kernels::wgpu::Features as wgpu_f;

/// A small matmul, softmax and f16 round trip compared with the CPU references.
fn self_check(dev: &Device) -> Result<String, String> {
    let (m, k, n) = (17usize, 33usize, 9usize);
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    let b: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
    let e = |e: rime_kernels::Error| e.to_string();
    let ta = dev.upload_f32(&a, &[m, k]).map_err(e)?;
    let tb = dev.upload_f32(&b, &[n, k]).map_err(e)?;
    let out = dev.empty(&[m, n], DType::F32).map_err(e)?;
    dev.run(&rime_kernels::ops::matmul::matmul_forward(dev, &out, &ta, &tb, None, false, true).map_err(e)?)
        .map_err(e)?;
    let got = dev.download_f32(&out).map_err(e)?;
    let dims = reference::matmul::MatmulDims { batch: 1, m, k, n, b_batched: false, trans_a: false, trans_b: true };
    let want = reference::matmul::matmul_forward(&a, &b, None, &dims);
    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
    if worst > 1e-4 {
        return Err(format!("matmul_forward differs from the CPU reference by {worst}"));
    }
    // The same product through a texture twin of the weight (rows padded to 64), where the device makes them.
    let mut twin_note = String::new();
    if dev.uses_texture_twins() {
        let kp = 64;
        let bp: Vec<f32> = (0..n * kp).map(|i| if i % kp < k { b[i / kp * k + i % kp] } else { 0.0 }).collect();
        let ap: Vec<f32> = (0..m * kp).map(|i| if i % kp < k { a[i / kp * k + i % kp] } else { 0.0 }).collect();
        let tw = dev.with_texture_twin(&dev.upload_f32(&bp, &[n, kp]).map_err(e)?).map_err(e)?;
        let tap = dev.upload_f32(&ap, &[m, kp]).map_err(e)?;
        dev.run(&rime_kernels::ops::matmul::matmul_forward(dev, &out, &tap, &tw, None, false, true).map_err(e)?)
            .map_err(e)?;
        let got = dev.download_f32(&out).map_err(e)?;
        let w2 = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
        if tw.texture.is_none() || w2 > 1e-4 {
            return Err(format!("matmul_forward through a texture twin differs from the CPU reference by {w2}"));
        }
        twin_note = format!(", through a texture twin {w2:.2e}");
    }
    Ok(format!("matmul_forward {m}x{k}x{n} max |diff| {worst:.2e}{twin_note}"))
}
