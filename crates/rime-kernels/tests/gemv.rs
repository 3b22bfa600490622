//! The matrix-vector kernels (shaders/gemv.wgsl) that the matmul launcher picks for products with few rows,
//! against the matmul reference: M = 1..=GEMV_MAX_M, K and N off the 4/8/32 multiples (scalar path, vec
//! path with and without a tail), f32/f16/bf16 weights, bias, alpha and accumulate, other layouts through the
//! scalar path, and which kernel `Variant::Auto` picks.
mod common;
use common::*;
use half::{bf16, f16};
use rime_kernels::ops::matmul::*;
use rime_kernels::reference::matmul::{self as r, MatmulDims};
use rime_kernels::{DType, Device, Tensor};

const GEMV: [Variant; 2] = [Variant::Gemv, Variant::GemvSubgroup];

fn tol(k: usize) -> (f32, f32) {
    (1e-5 + 2e-6 * k as f32, 1e-4)
}

/// Upload `x` as `dt`, returning the tensor and the values the GPU will actually see.
fn upload_as(d: &Device, x: &[f32], shape: &[usize], dt: DType) -> (Tensor, Vec<f32>) {
    match dt {
        DType::F16 => {
            let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            (d.upload_f16(&h, shape).unwrap(), h.iter().map(|v| v.to_f32()).collect())
        }
        DType::BF16 => {
            let h: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            (d.upload_bf16(&h, shape).unwrap(), h.iter().map(|v| v.to_f32()).collect())
        }
        _ => (d.upload_f32(x, shape).unwrap(), x.to_vec()),
    }
}

/// (K, N): K below 8, not a multiple of 4 or 8 (scalar path), a multiple of 8 below 32, with a tail after
/// whole 32-chunks, and whole chunks only (vec path); N below and above a workgroup's 32 columns, odd.
const KN: &[(usize, usize)] = &[(1, 1), (3, 5), (13, 7), (8, 33), (40, 67), (96, 13), (100, 37), (72, 130)];

/// x [M, K] · Wᵀ (W [N, K]) through `variant`, with optional bias, alpha and accumulate, against the reference.
#[allow(clippy::too_many_arguments)]
fn check_linear(
    variant: Variant,
    m: usize,
    k: usize,
    n: usize,
    dt: DType,
    with_bias: bool,
    alpha: f32,
    accumulate: bool,
    seed: u64,
) {
    let d = dev();
    let dm = MatmulDims { batch: 1, m, k, n, b_batched: false, trans_a: false, trans_b: true };
    let x = randn(seed, m * k, 1.0);
    let w = randn(seed + 1, n * k, 1.0);
    let bias = randn(seed + 2, n, 1.0);
    let prev = randn(seed + 3, m * n, 1.0);
    let tx = d.upload_f32(&x, &[m, k]).unwrap();
    let (tw, w_seen) = upload_as(d, &w, &[n, k], dt);
    let tbias = d.upload_f32(&bias, &[n]).unwrap();
    let out = d.upload_f32(&prev, &[m, n]).unwrap();
    let ds =
        matmul_forward_scaled(d, variant, &out, &tx, &tw, with_bias.then_some(&tbias), false, true, alpha, accumulate)
            .unwrap();
    d.run(&ds).unwrap();
    let prod = r::matmul_forward(&x, &w_seen, None, &dm);
    let want: Vec<f32> = (0..m * n)
        .map(|i| {
            let mut v = alpha * prod[i] + if with_bias { bias[i % n] } else { 0.0 };
            if accumulate {
                v += prev[i];
            }
            v
        })
        .collect();
    let (at, rt) = tol(k);
    assert_close(
        &format!("{variant:?} {dt:?} m={m} k={k} n={n} bias={with_bias} alpha={alpha} acc={accumulate}"),
        &d.download_f32(&out).unwrap(),
        &want,
        at * alpha.abs().max(1.0),
        rt,
    );
}

#[test]
fn gemv_linear_matches_reference() {
    let mut seed = 0;
    for m in 1..=GEMV_MAX_M {
        for &(k, n) in KN {
            for v in GEMV {
                seed += 10;
                check_linear(v, m, k, n, DType::F32, seed % 20 == 0, 1.0, false, seed);
            }
        }
    }
}

#[test]
fn gemv_half_weights_match_reference() {
    let mut seed = 5;
    for dt in [DType::F16, DType::BF16] {
        for m in 1..=GEMV_MAX_M {
            for &(k, n) in KN {
                seed += 10;
                check_linear(Variant::Auto, m, k, n, dt, m % 2 == 0, 1.0, false, seed);
            }
        }
    }
}

#[test]
fn gemv_alpha_accumulate_and_bias_match_reference() {
    let mut seed = 7;
    for dt in [DType::F32, DType::F16] {
        for m in [1, 3, 5, GEMV_MAX_M] {
            for &(k, n) in KN {
                for (alpha, accumulate, bias) in [(0.5, true, true), (-1.25, false, true), (2.0, true, false)] {
                    seed += 10;
                    check_linear(Variant::Auto, m, k, n, dt, bias, alpha, accumulate, seed);
                }
            }
        }
    }
}

/// A decoder-sized product: K = 576 (18 whole chunks), f32 and f16 weights, M = 1 and 5 (a short prompt).
#[test]
fn gemv_decoder_shape_matches_reference() {
    for dt in [DType::F32, DType::F16] {
        for m in [1, 5] {
            check_linear(Variant::Auto, m, 576, 200, dt, false, 1.0, false, 99);
        }
    }
}

/// Every layout through the scalar path (transposed lhs, N-contiguous rhs, batched rhs), and the vec path's
/// batched-lhs strides, against the reference.
#[test]
fn gemv_other_layouts_match_reference() {
    let d = dev();
    let mut seed = 300;
    for (m, k, n) in [(1, 5, 9), (3, 16, 7), (6, 40, 12)] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for b_batched in [false, true] {
                seed += 10;
                let dm = MatmulDims { batch: 2, m, k, n, b_batched, trans_a: ta, trans_b: tb };
                let a = randn(seed, 2 * m * k, 1.0);
                let b = randn(seed + 1, dm.b_len(), 1.0);
                let bias = randn(seed + 2, n, 1.0);
                let a_shape = if ta { [2, k, m] } else { [2, m, k] };
                let bl = if tb { [n, k] } else { [k, n] };
                let b_shape: Vec<usize> = if b_batched { vec![2, bl[0], bl[1]] } else { bl.to_vec() };
                let ta_ = d.upload_f32(&a, &a_shape).unwrap();
                let tb_ = d.upload_f32(&b, &b_shape).unwrap();
                let tbias = d.upload_f32(&bias, &[n]).unwrap();
                let want = r::matmul_forward(&a, &b, Some(&bias), &dm);
                for v in GEMV {
                    let out = d.empty(&[2, m, n], DType::F32).unwrap();
                    d.run(&matmul_forward_variant(d, v, &out, &ta_, &tb_, Some(&tbias), ta, tb).unwrap()).unwrap();
                    let (at, rt) = tol(k);
                    assert_close(&format!("{v:?} {dm:?}"), &d.download_f32(&out).unwrap(), &want, at, rt);
                }
                // backward_input through the scalar path: rows M, columns K, reduction N.
                let dout = randn(seed + 3, 2 * m * n, 1.0);
                let tdout = d.upload_f32(&dout, &[2, m, n]).unwrap();
                let want = r::matmul_backward_input(&dout, &b, &dm);
                for v in GEMV {
                    let da = d.empty(&a_shape, DType::F32).unwrap();
                    d.run(&matmul_backward_input_variant(d, v, &da, &tdout, &tb_, ta, tb).unwrap()).unwrap();
                    let (at, rt) = tol(n);
                    assert_close(&format!("backward_input {v:?} {dm:?}"), &d.download_f32(&da).unwrap(), &want, at, rt);
                }
            }
        }
    }
}

fn picked(m: usize, k: usize, n: usize, trans_b: bool) -> String {
    let d = dev();
    let x = d.empty(&[m, k], DType::F32).unwrap();
    let w = d.empty(&(if trans_b { [n, k] } else { [k, n] }), DType::F32).unwrap();
    let out = d.empty(&[m, n], DType::F32).unwrap();
    let ds = matmul_forward(d, &out, &x, &w, None, false, trans_b).unwrap();
    assert_eq!(ds.len(), 1);
    ds[0].label.clone()
}

/// Auto sends x·Wᵀ with at most GEMV_MAX_M rows to gemv (vec path when K % 8 = 0), and leaves larger M and
/// other layouts to the matmul kernels.
#[test]
fn auto_picks_gemv_for_few_rows() {
    for m in 1..=GEMV_MAX_M {
        assert_eq!(picked(m, 64, 40, true), "gemv_vec_entry", "m={m}");
    }
    assert_eq!(picked(1, 13, 40, true), "gemv_scalar_entry");
    assert!(!picked(GEMV_MAX_M + 1, 64, 40, true).starts_with("gemv"));
    assert!(!picked(1, 64, 40, false).starts_with("gemv"));
}

/// Time of one product, best of `reps` batched runs of `inner` dispatches (seconds per dispatch).
fn time_product(ds: &[rime_kernels::Dispatch], inner: usize, reps: usize) -> f64 {
    let d = dev();
    d.run(ds).unwrap();
    let all: Vec<&rime_kernels::Dispatch> = (0..inner).flat_map(|_| ds.iter()).collect();
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = std::time::Instant::now();
        let mut enc = d.wgpu_device().create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for x in &all {
                x.record(&mut pass);
            }
        }
        d.queue().submit([enc.finish()]);
        d.wait().unwrap();
        best = best.min(t.elapsed().as_secs_f64() / inner as f64);
    }
    best
}

/// Decode-shaped products per kernel, and where the tiled kernel wins again as M grows; run with
/// `cargo test --release -p rime-kernels --test gemv -- --ignored --nocapture` (RIME_GEMV_M=1,2,4,8,16).
#[test]
#[ignore]
fn gemv_throughput() {
    let d = dev();
    let ms: Vec<usize> = std::env::var("RIME_GEMV_M")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or(vec![1, 2, 4, 8, 12, 16]);
    for (k, n) in [(576, 49152), (576, 1536), (1536, 576)] {
        for dt in [DType::F32, DType::F16] {
            let (w, _) = upload_as(d, &randn(2, n * k, 1.0), &[n, k], dt);
            for &m in &ms {
                let x = d.upload_f32(&randn(1, m * k, 1.0), &[m, k]).unwrap();
                let out = d.empty(&[m, n], DType::F32).unwrap();
                let mut line = format!("{m}x{k}x{n} {dt:?}:");
                for v in [Variant::TiledSubgroup, Variant::Gemv, Variant::GemvSubgroup] {
                    let ds = matmul_forward_scaled(d, v, &out, &x, &w, None, false, true, 1.0, false).unwrap();
                    let inner = if n > 10_000 { 4 } else { 40 };
                    let s = time_product(&ds, inner, 5);
                    line +=
                        &format!(" {v:?} {:.3} ms ({:.1} GB/s of W)", s * 1e3, (n * k * dt.size()) as f64 / s / 1e9);
                }
                println!("{line}");
            }
        }
    }
}

/// K = 0: out is the bias alone (plus out when accumulating).
#[test]
fn gemv_empty_inner_dim() {
    let d = dev();
    for v in [Variant::Auto, Variant::Gemv, Variant::GemvSubgroup] {
        let out = d.upload_f32(&[1.0; 10], &[2, 5]).unwrap();
        let (a, w) = (d.empty(&[2, 0], DType::F32).unwrap(), d.empty(&[5, 0], DType::F32).unwrap());
        let bias = d.upload_f32(&[0.0, 1.0, 2.0, 3.0, 4.0], &[5]).unwrap();
        d.run(&matmul_forward_scaled(d, v, &out, &a, &w, Some(&bias), false, true, 2.0, true).unwrap()).unwrap();
        let want: Vec<f32> = (0..10).map(|i| (i % 5) as f32 + 1.0).collect();
        assert_close(&format!("K=0 {v:?}"), &d.download_f32(&out).unwrap(), &want, 0.0, 0.0);
    }
}
